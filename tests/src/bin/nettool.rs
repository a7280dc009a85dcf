//! `nettool`: the client side of kernel tests, as a process of its own so
//! that the harness can place it in a network namespace *and* a cgroup
//! (cgroup membership is per process). Its exit code is the
//! [`Outcome`](enforcer_tests::traffic::Outcome) of the attempt.
//!
//! `nettool tcp-stream` keeps one connection busy for a while (see
//! [`tcp_stream`]): the long-lived connection of the update tests.
//! `nettool tcp-echo-server` is the server side as a process, so that a
//! PU's listening socket (and the connections it accepts) belong to the
//! PU's cgroup.
//!
//! Also `nettool leftovers`: lists harness objects a test run left on the
//! machine — namespaces, cgroups, pins, control sockets, and any `TRI-`
//! chain or ipset in the root network namespace, where tests never run an
//! agent — and exits 1 if there are any (run after the suite, in the root
//! namespace; it only reads).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use enforcer_tests::{leftovers, privilege, traffic};

#[derive(Parser)]
#[command(about = "Traffic client for enforcer kernel tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect over TCP, send the payload, expect it echoed back.
    TcpExchange {
        to: SocketAddr,
        #[arg(long, default_value = "ping")]
        payload: String,
        /// Local port to bind to first (a host service's, say).
        #[arg(long)]
        sport: Option<u16>,
        /// SO_MARK to try on the socket before connecting; a refusal is
        /// reported on stderr and the connection is tried anyway, as a
        /// process would that hoped to skip its policy.
        #[arg(long)]
        mark: Option<u32>,
    },
    /// Send one UDP datagram.
    UdpSend {
        to: SocketAddr,
        #[arg(long, default_value = "ping")]
        payload: String,
        /// Source address to bind to.
        #[arg(long)]
        from: Option<std::net::IpAddr>,
        /// Datagrams to send, all from one unconnected socket.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// SO_MARK of the socket (the agent's injected kind, say).
        #[arg(long)]
        mark: Option<u32>,
        /// With `--mark`: the local port to bind to *after* the mark is
        /// set (a host service's, say).
        #[arg(long)]
        sport: Option<u16>,
    },
    /// From one UDP socket, COUNT times: send the payload to an echo
    /// server and wait for it back (every datagram of one flow).
    UdpExchange {
        to: SocketAddr,
        /// Local port to bind to first (a PU's own UDP port, say).
        #[arg(long)]
        sport: Option<u16>,
        #[arg(long, default_value = "ping")]
        payload: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Send one ICMP or ICMPv6 echo request and wait for its reply.
    Ping {
        to: std::net::IpAddr,
        /// From a ping socket (SOCK_DGRAM) rather than a raw socket.
        #[arg(long)]
        dgram: bool,
    },
    /// Send one packet the process builds itself through a raw socket
    /// (`SOCK_RAW`): no connect or sendmsg hook sees it. KIND is
    /// `tcp-syn` or `udp` (to TO's port), `echo-reply` or `unreachable`
    /// (ICMP or ICMPv6, TO's port unused), each carrying PAYLOAD.
    RawSend {
        kind: RawKind,
        to: SocketAddr,
        /// The source address (the raw socket is bound to it).
        #[arg(long)]
        from: std::net::IpAddr,
        /// Source port (TCP, UDP).
        #[arg(long, default_value_t = 40_000)]
        sport: u16,
        /// Echo identifier (echo-reply).
        #[arg(long, default_value_t = 0)]
        id: u16,
        #[arg(long, default_value = "raw")]
        payload: String,
    },
    /// One connected UDP socket to TO: prints `connected <local address>`,
    /// then sends each line of stdin as a datagram (`send`, no address)
    /// and prints `sent` or `error=<io error kind>` for it; ends at EOF.
    /// The flow of the target-network tests: every datagram has the same
    /// 5-tuple.
    UdpFlow { to: SocketAddr },
    /// Keep one TCP connection to an echo server busy — send a chunk,
    /// read it back, again — until stdin closes or SECONDS pass. Prints
    /// `connected` once connected, then one line of `key=value` pairs:
    /// `bytes`, `rounds`, `max_gap_ms` (longest time between two completed
    /// rounds), `retransmits` (the kernel's count for the connection) and,
    /// if the connection failed, `error`. Exits 0 if it never failed.
    TcpStream {
        to: SocketAddr,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// TCP_USER_TIMEOUT and read timeout: how long unanswered data may
        /// wait before the connection counts as failed.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Source address to bind to.
        #[arg(long)]
        from: Option<std::net::IpAddr>,
    },
    /// Listen on ADDR and echo every connection's data back, until stdin
    /// closes. Prints `listening` once bound (and, with
    /// `--report-accepted`, `accepted <peer>` for each connection).
    TcpEchoServer {
        addr: SocketAddr,
        #[arg(long)]
        report_accepted: bool,
    },
    /// Bind ADDR and send every datagram back to its sender (`sendto` on
    /// the unconnected socket, as a UDP server does), until stdin closes.
    /// Prints `listening` once bound.
    UdpEchoServer { addr: SocketAddr },
    /// Send one DNS query for NAME (A, or AAAA to an IPv6 server) to
    /// SERVER and wait for its answer: prints `answer <address>` and
    /// exits 0 if one came. From a connected socket, whose peer must be
    /// SERVER, or with `--unconnected` by `sendto` / `recvfrom`, where an
    /// answer must come from SERVER itself (a resolver drops one from
    /// elsewhere).
    DnsQuery {
        server: SocketAddr,
        name: String,
        #[arg(long)]
        unconnected: bool,
    },
    /// COUNT requests one after the other, each a new TCP connection to
    /// an echo server at TO that sends the payload, reads it back and
    /// closes: prints `requests=<n> per_sec=<rate> p50_us=<µs> p99_us=<µs>
    /// max_us=<µs>` (a measurement, not a check; exits non-zero on the
    /// first failure).
    TcpExchanges { to: SocketAddr, count: u32 },
    /// Listen on ADDR (TCP; IPv6 only for an IPv6 address) and hold the
    /// socket for the harness to take (`pidfd_getfd`): prints
    /// `listening fd=<descriptor>`, then waits until stdin closes. The
    /// socket, and what it accepts, belong to this process's cgroup.
    HoldListener { addr: SocketAddr },
    /// List what tests left behind: namespaces, cgroups, pins, control
    /// sockets, and `TRI-` chains or ipsets in this network namespace.
    Leftovers,
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().cmd {
        Cmd::TcpExchange {
            to,
            payload,
            mark: Some(mark),
            ..
        } => tcp_exchange_marked(to, mark, payload.as_bytes()),
        Cmd::TcpExchange {
            to, payload, sport, ..
        } => {
            let bind = sport.map(|port| {
                let any: std::net::IpAddr = match to {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                };
                SocketAddr::new(any, port)
            });
            traffic::tcp_exchange_bound(bind, to, payload.as_bytes())
        }
        Cmd::UdpSend {
            to,
            payload,
            from,
            count,
            mark: None,
            ..
        } => traffic::udp_send_n(from, to, payload.as_bytes(), count),
        Cmd::UdpSend {
            to,
            payload,
            mark: Some(mark),
            sport,
            ..
        } => udp_send_marked(to, mark, sport, payload.as_bytes()),
        Cmd::UdpExchange {
            to,
            sport,
            payload,
            count,
        } => traffic::udp_exchanges(to, sport, payload.as_bytes(), count),
        Cmd::Ping { to, dgram } => traffic::ping(
            to,
            match dgram {
                true => traffic::PingSocket::Dgram,
                false => traffic::PingSocket::Raw,
            },
        ),
        Cmd::RawSend {
            kind,
            to,
            from,
            sport,
            id,
            payload,
        } => raw_send(kind, to, from, sport, id, payload.as_bytes()),
        Cmd::UdpFlow { to } => return udp_flow(to),
        Cmd::TcpStream {
            to,
            seconds,
            timeout_ms,
            from,
        } => {
            return tcp_stream(
                to,
                from,
                Duration::from_secs(seconds),
                Duration::from_millis(timeout_ms),
            );
        }
        Cmd::TcpEchoServer {
            addr,
            report_accepted,
        } => return tcp_echo_server(addr, report_accepted),
        Cmd::UdpEchoServer { addr } => return udp_echo_server(addr),
        Cmd::DnsQuery {
            server,
            name,
            unconnected,
        } => dns_query(server, &name, unconnected),
        Cmd::HoldListener { addr } => return hold_listener(addr),
        Cmd::TcpExchanges { to, count } => tcp_exchanges(to, count),
        Cmd::Leftovers => return report_leftovers(),
    };
    if let traffic::Outcome::Failed(why) = &outcome {
        eprintln!("{why}");
    }
    ExitCode::from(outcome.exit_code())
}

/// `nettool tcp-exchange --mark`: tries SO_MARK, then connects whatever
/// came of it.
fn tcp_exchange_marked(to: SocketAddr, mark: u32, payload: &[u8]) -> traffic::Outcome {
    let connected = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .and_then(|socket| {
        if let Err(e) = socket.set_mark(mark) {
            eprintln!("setsockopt(SO_MARK, {mark:#x}): {e}");
        }
        socket.connect_timeout(&to.into(), traffic::CONNECT_TIMEOUT)?;
        Ok(TcpStream::from(socket))
    });
    match connected {
        Ok(stream) => traffic::tcp_exchange_on(stream, payload),
        Err(e) => traffic::Outcome::from_io(&e),
    }
}

/// `nettool udp-send --mark`: one datagram from a socket with SO_MARK set
/// (then bound to `sport`, if given).
fn udp_send_marked(
    to: SocketAddr,
    mark: u32,
    sport: Option<u16>,
    payload: &[u8],
) -> traffic::Outcome {
    let sent = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .and_then(|socket| {
        socket.set_mark(mark)?;
        if let Some(port) = sport {
            let any: std::net::IpAddr = match to {
                SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            };
            socket.bind(&SocketAddr::new(any, port).into())?;
        }
        socket.send_to(payload, &to.into())
    });
    match sent {
        Ok(_) => traffic::Outcome::Exchanged,
        Err(e) => traffic::Outcome::from_io(&e),
    }
}

/// `nettool dns-query`.
fn dns_query(server: SocketAddr, name: &str, unconnected: bool) -> traffic::Outcome {
    use enforcer_tests::{netfilter::Family, proxy};
    let family = match server {
        SocketAddr::V4(_) => Family::V4,
        SocketAddr::V6(_) => Family::V6,
    };
    let bind: SocketAddr = match family {
        Family::V4 => "0.0.0.0:0".parse().expect("literal"),
        Family::V6 => "[::]:0".parse().expect("literal"),
    };
    let id = std::process::id() as u16;
    let asked = std::net::UdpSocket::bind(bind).and_then(|socket| {
        socket.set_read_timeout(Some(traffic::UDP_ANSWER_WAIT))?;
        let query = proxy::dns_query(id, name, family);
        let mut buf = [0u8; 1500];
        let (n, from) = match unconnected {
            false => {
                socket.connect(server)?;
                socket.send(&query)?;
                // The peer the socket names (`getpeername`) is where the
                // answer comes from.
                (socket.recv(&mut buf)?, socket.peer_addr()?)
            }
            true => {
                socket.send_to(&query, server)?;
                socket.recv_from(&mut buf)?
            }
        };
        Ok((proxy::parse_dns_answer(&buf[..n], id), from))
    });
    match asked {
        Ok((_, from)) if from != server => {
            traffic::Outcome::Failed(format!("an answer from {from}, not from {server}"))
        }
        Ok((Some(addr), _)) => {
            println!("answer {addr}");
            traffic::Outcome::Exchanged
        }
        Ok((None, _)) => traffic::Outcome::Failed("a reply without the answer".into()),
        Err(e) => traffic::Outcome::from_io(&e),
    }
}

/// `nettool udp-flow`.
fn udp_flow(to: SocketAddr) -> ExitCode {
    let bind: SocketAddr = match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let socket = match std::net::UdpSocket::bind(bind).and_then(|s| s.connect(to).map(|()| s)) {
        Ok(socket) => socket,
        Err(e) => {
            println!("error={:?}", e.kind());
            return ExitCode::FAILURE;
        }
    };
    let local = socket
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("connected {local}");
    let _ = std::io::stdout().flush();
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { break };
        match socket.send(line.as_bytes()) {
            Ok(_) => println!("sent"),
            // The errno says more than the kind (ECONNABORTED, EPERM…).
            Err(e) => println!("error={:?}/{}", e.kind(), e.raw_os_error().unwrap_or(0)),
        }
        let _ = std::io::stdout().flush();
    }
    ExitCode::SUCCESS
}

/// `nettool tcp-echo-server`.
fn tcp_echo_server(addr: SocketAddr, report_accepted: bool) -> ExitCode {
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(listener) => listener,
        Err(e) => {
            println!("error={e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening");
    let _ = std::io::stdout().flush();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if report_accepted && let Ok(peer) = stream.peer_addr() {
                println!("accepted {peer}");
                let _ = std::io::stdout().flush();
            }
            std::thread::spawn(move || traffic::echo(stream));
        }
    });
    // The harness closes our stdin to say "stop now".
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    ExitCode::SUCCESS
}

/// `nettool tcp-exchanges`.
fn tcp_exchanges(to: SocketAddr, count: u32) -> traffic::Outcome {
    let mut took = Vec::with_capacity(count as usize);
    let start = Instant::now();
    for _ in 0..count {
        let begun = Instant::now();
        match traffic::tcp_exchange(to, b"ping") {
            traffic::Outcome::Exchanged => took.push(begun.elapsed()),
            failed => return failed,
        }
    }
    let total = start.elapsed();
    took.sort();
    let at = |q: f64| {
        let i = ((took.len() as f64 * q).ceil() as usize).clamp(1, took.len().max(1)) - 1;
        took.get(i).map_or(0, |d| d.as_micros())
    };
    println!(
        "requests={} per_sec={:.0} p50_us={} p99_us={} max_us={}",
        took.len(),
        took.len() as f64 / total.as_secs_f64(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    traffic::Outcome::Exchanged
}

/// `nettool hold-listener`.
fn hold_listener(addr: SocketAddr) -> ExitCode {
    let listener = match enforcer_tests::proxy::bind_tcp(addr) {
        Ok(listener) => listener,
        Err(e) => {
            println!("error={e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening fd={}", listener.as_raw_fd());
    let _ = std::io::stdout().flush();
    // The harness closes our stdin once it holds its own copy.
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    ExitCode::SUCCESS
}

/// `nettool udp-echo-server`.
fn udp_echo_server(addr: SocketAddr) -> ExitCode {
    let socket = match std::net::UdpSocket::bind(addr) {
        Ok(socket) => socket,
        Err(e) => {
            println!("error={e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening");
    let _ = std::io::stdout().flush();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        // A refused reply (EPERM from a hook) is the policy's answer,
        // not the server's end: keep serving.
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    ExitCode::SUCCESS
}

/// `nettool tcp-stream`.
fn tcp_stream(
    to: SocketAddr,
    from: Option<std::net::IpAddr>,
    duration: Duration,
    timeout: Duration,
) -> ExitCode {
    let mut stream = match traffic::tcp_connect(from, to) {
        Ok(stream) => stream,
        Err(e) => {
            println!("bytes=0 rounds=0 max_gap_ms=0 retransmits=0 error=connect:{e}");
            return ExitCode::FAILURE;
        }
    };
    println!("connected");
    let _ = std::io::stdout().flush();
    // The harness closes our stdin to say "stop now".
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = stop.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        stopper.store(true, Ordering::Relaxed);
    });
    let socket = socket2::SockRef::from(&stream);
    let _ = socket.set_tcp_user_timeout(Some(timeout));
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));

    let (mut bytes, mut rounds, mut max_gap) = (0u64, 0u64, Duration::ZERO);
    let (start, mut last) = (Instant::now(), Instant::now());
    let mut chunk = [0u8; 1024];
    let mut back = [0u8; 1024];
    let mut error = None;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < duration {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (rounds as usize + i) as u8;
        }
        let round = stream
            .write_all(&chunk)
            .and_then(|()| stream.read_exact(&mut back));
        match round {
            Ok(()) if back == chunk => {}
            Ok(()) => error = Some("echo mismatch".to_owned()),
            Err(e) => error = Some(e.to_string()),
        }
        if error.is_some() {
            break;
        }
        bytes += chunk.len() as u64;
        rounds += 1;
        max_gap = max_gap.max(last.elapsed());
        last = Instant::now();
    }
    let retransmits = total_retransmits(&stream);
    let mut report = format!(
        "bytes={bytes} rounds={rounds} max_gap_ms={} retransmits={retransmits}",
        max_gap.as_millis()
    );
    if let Some(error) = &error {
        report += &format!(" error={}", error.replace(' ', "_"));
    }
    println!("{report}");
    match error {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::FAILURE,
    }
}

/// `tcpi_total_retrans` of the connection (0 if the kernel will not say):
/// every retransmission is a segment that went unanswered.
fn total_retransmits(stream: &TcpStream) -> u32 {
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // live and that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { info.tcpi_total_retrans } else { 0 }
}

fn report_leftovers() -> ExitCode {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let cgroup2 =
        privilege::mount_of_type(&mounts, "cgroup2").unwrap_or_else(|| "/sys/fs/cgroup".into());
    let bpffs = privilege::mount_of_type(&mounts, "bpf").unwrap_or_else(|| "/sys/fs/bpf".into());
    match leftovers::find(&cgroup2, &bpffs) {
        Ok(found) if found.is_empty() => {
            println!("leftovers: none");
            ExitCode::SUCCESS
        }
        Ok(found) => {
            println!("leftovers: {} object(s) left behind by tests:", found.len());
            for f in found {
                println!("  {f}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("leftovers: could not look: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `nettool raw-send` builds.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RawKind {
    TcpSyn,
    Udp,
    EchoReply,
    Unreachable,
}

/// `nettool raw-send`: the send's own outcome (a hook's EPERM, say);
/// whether the packet arrived is for the peer's side to say.
fn raw_send(
    kind: RawKind,
    to: SocketAddr,
    from: std::net::IpAddr,
    sport: u16,
    id: u16,
    payload: &[u8],
) -> traffic::Outcome {
    let v4 = to.is_ipv4();
    let sent = match kind {
        RawKind::TcpSyn => traffic::send_tcp_syn(from, sport, to, &[]),
        RawKind::Udp => traffic::send_raw_udp(from, sport, to, payload),
        RawKind::EchoReply => {
            let mut body = id.to_be_bytes().to_vec();
            body.extend_from_slice(&1u16.to_be_bytes()); // sequence
            body.extend_from_slice(payload);
            let reply = if v4 { 0 } else { 129 };
            traffic::send_raw_icmp(from, to.ip(), reply, 0, &body)
        }
        RawKind::Unreachable => {
            // Port unreachable, quoting a datagram that was never sent.
            let (unreachable, code) = if v4 { (3, 3) } else { (1, 4) };
            let mut body = vec![0; 4];
            body.extend_from_slice(payload);
            traffic::send_raw_icmp(from, to.ip(), unreachable, code, &body)
        }
    };
    match sent {
        Ok(()) => traffic::Outcome::Exchanged,
        Err(e) => match e.root_cause().downcast_ref::<std::io::Error>() {
            Some(io) => traffic::Outcome::from_io(io),
            None => traffic::Outcome::Failed(format!("{e:#}")),
        },
    }
}
