//! The traffic generators' client side. A client must be a process of its
//! own inside the PU's cgroup (cgroup membership is per process), so the
//! runner re-executes its own binary as `bench client KIND ARGS…` through
//! [`Cgroup::command_in`]; the client prints one JSON line with what it
//! measured and exits 0, or exits non-zero with the reason on stderr.
//!
//! Every loop is bounded by the requested duration (and each socket call
//! by a timeout); the runner kills a client that outlives its deadline.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use enforcer::sandbox::{cgroup::Cgroup, netns::Netns};
use serde_json::{Value, json};
use socket2::SockRef;

use super::stats::percentile;

/// Concurrent connectors of the connection-rate probe.
pub const CONNECT_THREADS: usize = 4;
/// Payload of the small-datagram probe.
pub const UDP_PAYLOAD: usize = 64;
/// A request of the proxy scenario, and its echo.
pub const REQUEST_BYTES: usize = 64;
/// The largest request: one the echo server reads in one go.
const MAX_REQUEST: usize = 1024;

/// How long any one socket call may block.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// What the throughput client writes per call.
const CHUNK: usize = 128 * 1024;
/// After the first datagram of a flow (which a trap holds until the
/// agent's verdict), the sender waits this long before timing.
const UDP_WARMUP: Duration = Duration::from_millis(100);
/// Time a client may take beyond its duration before it is killed.
const GRACE: Duration = Duration::from_secs(30);

/// A client run, as the hidden `client` subcommand takes it.
#[derive(Debug, Clone, PartialEq, clap::Subcommand)]
pub enum Client {
    /// One TCP flow: write for SECS, close, wait for the peer's close.
    TcpThroughput { to: SocketAddr, secs: f64 },
    /// Datagrams of SIZE bytes from one UDP socket for SECS: connected
    /// (`send`), or with `--unconnected` addressed per datagram
    /// (`sendto`).
    UdpFlood {
        to: SocketAddr,
        secs: f64,
        size: usize,
        #[arg(long)]
        unconnected: bool,
    },
    /// New TCP connections from THREADS threads for SECS, each closed with
    /// a reset (no TIME_WAIT left to exhaust the ports).
    ConnectRate {
        to: SocketAddr,
        secs: f64,
        threads: usize,
        /// Bind this source address first (a peer with several).
        #[arg(long)]
        from: Option<IpAddr>,
        /// Make each connection a request: send BYTES, read their echo,
        /// then close; the latency is then connect() to the echo's last
        /// byte.
        #[arg(long, value_name = "BYTES")]
        request: Option<usize>,
    },
    /// A server on PORT (every address) that accepts and drops
    /// connections for SECS: the PU's side of the incoming probe. Prints
    /// `ready` once it listens, then its count.
    Accept { port: u16, secs: f64 },
}

impl Client {
    /// The command-line words after `client` that parse back to `self`.
    pub fn args(&self) -> Vec<String> {
        match self {
            Client::TcpThroughput { to, secs } => {
                vec!["tcp-throughput".into(), to.to_string(), secs.to_string()]
            }
            Client::UdpFlood {
                to,
                secs,
                size,
                unconnected,
            } => {
                let mut args = vec![
                    "udp-flood".into(),
                    to.to_string(),
                    secs.to_string(),
                    size.to_string(),
                ];
                if *unconnected {
                    args.push("--unconnected".into());
                }
                args
            }
            Client::ConnectRate {
                to,
                secs,
                threads,
                from,
                request,
            } => {
                let mut args = vec![
                    "connect-rate".into(),
                    to.to_string(),
                    secs.to_string(),
                    threads.to_string(),
                ];
                if let Some(from) = from {
                    args.extend(["--from".into(), from.to_string()]);
                }
                if let Some(bytes) = request {
                    args.extend(["--request".into(), bytes.to_string()]);
                }
                args
            }
            Client::Accept { port, secs } => {
                vec!["accept".into(), port.to_string(), secs.to_string()]
            }
        }
    }

    fn secs(&self) -> f64 {
        match self {
            Client::TcpThroughput { secs, .. }
            | Client::UdpFlood { secs, .. }
            | Client::ConnectRate { secs, .. }
            | Client::Accept { secs, .. } => *secs,
        }
    }

    /// Runs the client in this process (the `bench client` side) and
    /// returns the line to print.
    pub fn run_here(&self) -> Result<Value> {
        let secs = self.secs();
        if !(0.0..=600.0).contains(&secs) {
            bail!("a client runs 0 to 600 seconds, not {secs}");
        }
        let duration = Duration::from_secs_f64(secs);
        match *self {
            Client::TcpThroughput { to, .. } => tcp_throughput(to, duration),
            Client::UdpFlood {
                to,
                size,
                unconnected,
                ..
            } => udp_flood(to, duration, size.clamp(1, 1472), !unconnected),
            Client::ConnectRate {
                to,
                threads,
                from,
                request,
                ..
            } => connect_rate(
                to,
                from,
                request.map(|b| b.clamp(1, MAX_REQUEST)),
                duration,
                threads.clamp(1, 64),
            ),
            Client::Accept { port, .. } => accept(port, duration),
        }
    }

    /// Runs the client as a process of its own inside `ns` and `cgroup`
    /// (`exe` is this binary) and returns what it printed.
    pub fn run_in(&self, exe: &std::path::Path, ns: &Netns, cgroup: &Cgroup) -> Result<Value> {
        let mut cmd = cgroup.command_in(ns, exe)?;
        cmd.arg("client").args(self.args());
        run_process(cmd, Duration::from_secs_f64(self.secs()) + GRACE)
    }

    /// Runs the client as a process of its own inside `ns`, in this
    /// process's cgroup (a peer's side, which no PU policy covers).
    pub fn run_in_netns(&self, exe: &std::path::Path, ns: &Netns) -> Result<Value> {
        let mut cmd = ns.command(exe)?;
        cmd.arg("client").args(self.args());
        run_process(cmd, Duration::from_secs_f64(self.secs()) + GRACE)
    }

    /// Starts a server client ([`Client::Accept`]) inside `ns` and
    /// `cgroup` and returns once it listens; [`Server::finish`] collects
    /// what it printed.
    pub fn serve_in(&self, exe: &std::path::Path, ns: &Netns, cgroup: &Cgroup) -> Result<Server> {
        use std::io::BufRead as _;
        use std::os::unix::process::CommandExt as _;
        let mut cmd = cgroup.command_in(ns, exe)?;
        cmd.arg("client")
            .args(self.args())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting a server")?;
        let mut lines = std::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
        match lines.next() {
            Some(Ok(line)) if line == "ready" => Ok(Server {
                child,
                lines,
                limit: Duration::from_secs_f64(self.secs()) + GRACE,
            }),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the server did not start listening (it printed {other:?})")
            }
        }
    }
}

/// A running server client.
pub struct Server {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    limit: Duration,
}

impl Server {
    /// Waits for the server's end (killing it after its time) and
    /// returns the last line it printed.
    pub fn finish(mut self) -> Result<Value> {
        let deadline = Instant::now() + self.limit;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("the server did not finish within {:?}", self.limit);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let last = self.lines.by_ref().map_while(Result::ok).last();
        let line = last.context("the server printed nothing after ready")?;
        serde_json::from_str(&line).with_context(|| format!("the server printed {line:?}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server given up on (an error on the way) must not outlive the
        // run: it holds the PU's cgroup.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a client process to its end (killing it after `limit`) and parses
/// the last line it printed.
fn run_process(mut cmd: Command, limit: Duration) -> Result<Value> {
    use std::os::unix::process::CommandExt as _;
    // A group of its own: Ctrl-C reaches the runner, which stops in order.
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting a client")?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the client did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    if !status.success() {
        bail!("the client failed ({status}): {}", err.trim());
    }
    let line = out.lines().last().context("the client printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("the client printed {line:?}"))
}

fn tcp_throughput(to: SocketAddr, duration: Duration) -> Result<Value> {
    let mut stream =
        TcpStream::connect_timeout(&to, IO_TIMEOUT).with_context(|| format!("connecting {to}"))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let chunk = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < duration {
        stream.write_all(&chunk).context("writing")?;
        bytes += CHUNK as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    // The peer closes once it has read everything: the flow is over.
    let mut rest = [0u8; 64];
    while stream
        .read(&mut rest)
        .context("waiting for the peer's close")?
        > 0
    {}
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({ "bytes": bytes, "secs": secs }))
}

fn udp_flood(to: SocketAddr, duration: Duration, size: usize, connected: bool) -> Result<Value> {
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    let socket = UdpSocket::bind(local)?;
    if connected {
        // connect(2) is where the eBPF datapath decides a connected flow;
        // an unconnected one is decided per datagram (its sendmsg hook).
        socket
            .connect(to)
            .with_context(|| format!("connecting UDP {to}"))?;
    }
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    let payload = vec![0x5au8; size];
    let send = |payload: &[u8]| match connected {
        true => socket.send(payload),
        false => socket.send_to(payload, to),
    };
    send(&payload).context("sending the first datagram")?;
    std::thread::sleep(UDP_WARMUP);
    let start = Instant::now();
    let (mut sent, mut dropped) = (0u64, 0u64);
    'sending: loop {
        // The clock is read once per batch: it is not free either.
        for _ in 0..64 {
            match send(&payload) {
                Ok(_) => sent += 1,
                // A full queue on the way: the datagram is lost, as it
                // would be on a real link.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => dropped += 1,
                Err(e) => return Err(e).context("sending"),
            }
        }
        if start.elapsed() >= duration {
            break 'sending;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({ "sent": sent, "dropped": dropped, "secs": secs }))
}

/// Accepts and drops connections on `port` for `duration`, as the
/// peers' acceptor does (a plain close; the connector resets); says
/// `ready` once it listens.
fn accept(port: u16, duration: Duration) -> Result<Value> {
    // A deep accept queue: a full one drops the SYN, and the connector
    // waits a second for its retransmission.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .and_then(|()| socket.listen(4096))
        .with_context(|| format!("listening on {port}"))?;
    let listener: TcpListener = socket.into();
    // accept(2) honours SO_RCVTIMEO: the loop looks at the clock at least
    // this often without a busy wait.
    SockRef::from(&listener).set_read_timeout(Some(Duration::from_millis(50)))?;
    println!("ready");
    std::io::stdout().flush()?;
    let start = Instant::now();
    let mut accepted = 0u64;
    while start.elapsed() < duration {
        match listener.accept() {
            Ok(_) => accepted += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("accepting"),
        }
    }
    Ok(json!({ "accepted": accepted }))
}

fn connect_rate(
    to: SocketAddr,
    from: Option<IpAddr>,
    request: Option<usize>,
    duration: Duration,
    threads: usize,
) -> Result<Value> {
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut failed = 0u64;
                let mut last_error = None;
                while start.elapsed() < duration {
                    let t0 = Instant::now();
                    let done = connect_from(from, to).and_then(|stream| match request {
                        Some(bytes) => exchange(stream, bytes),
                        None => Ok(stream),
                    });
                    match done {
                        Ok(stream) => {
                            latencies.push(t0.elapsed().as_secs_f64());
                            // Linger 0: close with a reset, leaving no
                            // TIME_WAIT behind.
                            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        }
                        Err(e) => {
                            failed += 1;
                            last_error = Some(e.to_string());
                        }
                    }
                }
                (latencies, failed, last_error)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failed = 0;
    let mut last_error = None;
    for worker in workers {
        let (l, f, e) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a connector panicked"))?;
        latencies.extend(l);
        failed += f;
        last_error = last_error.or(e);
    }
    let secs = start.elapsed().as_secs_f64();
    if latencies.is_empty() {
        bail!(
            "no connection to {to} succeeded ({failed} failed: {})",
            last_error.unwrap_or_default()
        );
    }
    latencies.sort_by(f64::total_cmp);
    Ok(json!({
        "connections": latencies.len(),
        "failed": failed,
        "last_error": last_error,
        "secs": secs,
        "p50": percentile(&latencies, 50.0),
        "p99": percentile(&latencies, 99.0),
    }))
}

/// One request on a new connection: `bytes` sent, their echo read back
/// whole (the server answers once; a request fits one segment).
fn exchange(mut stream: TcpStream, bytes: usize) -> std::io::Result<TcpStream> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = vec![0x5au8; bytes];
    stream.write_all(&request)?;
    let mut echo = vec![0u8; bytes];
    stream.read_exact(&mut echo)?;
    if echo != request {
        return Err(std::io::Error::other("the echo differs from the request"));
    }
    Ok(stream)
}

/// A TCP connection to `to`, from `from` when given.
fn connect_from(from: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect_timeout(&to, IO_TIMEOUT);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // The port is picked at connect(2), knowing the destination, as for
    // an unbound socket: bind(2) alone would pick it blind, and at
    // thousands of connections a second it lands on a 4-tuple the server
    // side still holds, costing a SYN retransmission (a 1 s connect).
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the stated size.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), IO_TIMEOUT)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(subcommand)]
        client: Client,
    }

    #[test]
    fn args_parse_back_to_the_same_client() {
        let to: SocketAddr = "10.1.0.2:5001".parse().unwrap();
        for client in [
            Client::TcpThroughput { to, secs: 1.5 },
            Client::UdpFlood {
                to,
                secs: 2.0,
                size: 64,
                unconnected: false,
            },
            Client::UdpFlood {
                to,
                secs: 2.0,
                size: 64,
                unconnected: true,
            },
            Client::ConnectRate {
                to,
                secs: 1.0,
                threads: 4,
                from: None,
                request: None,
            },
            Client::ConnectRate {
                to,
                secs: 1.0,
                threads: 4,
                from: Some("10.2.0.2".parse().unwrap()),
                request: Some(64),
            },
            Client::Accept {
                port: 5004,
                secs: 3.0,
            },
        ] {
            let argv = std::iter::once("bench".to_string()).chain(client.args());
            assert_eq!(Wrapper::try_parse_from(argv).unwrap().client, client);
        }
    }

    #[test]
    fn a_client_refuses_an_unbounded_duration() {
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let err = Client::TcpThroughput { to, secs: 1e9 }
            .run_here()
            .unwrap_err();
        assert!(err.to_string().contains("0 to 600 seconds"), "{err}");
    }
}
