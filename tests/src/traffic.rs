//! Traffic for kernel tests: servers that run inside a namespace on a
//! thread of their own, clients that run on a thread ([`Netns::run`]) or as
//! the `nettool` child process inside a namespace and a cgroup, and raw IP
//! packets for headers no socket API would send.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

/// How long a client waits before calling a connection blocked.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(10);

/// A TCP server inside a namespace that echoes what it reads, until the
/// client closes its side. Stops when dropped.
pub struct TcpEchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl TcpEchoServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (acc, stp) = (accepted.clone(), stop.clone());
        let thread = ns.spawn(move || -> Result<()> {
            let listener = TcpListener::bind(addr);
            let listener = match listener {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            listener.set_nonblocking(true)?;
            while !stp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        acc.fetch_add(1, Ordering::Relaxed);
                        std::thread::spawn(move || echo(stream));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(POLL)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })?;
        ready_rx
            .recv()
            .context("echo server thread died")?
            .with_context(|| format!("binding TCP {addr}"))?;
        Ok(Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A datagram as received: sender and payload.
type Datagram = (SocketAddr, Vec<u8>);

/// A UDP socket inside a namespace that records every datagram it gets.
pub struct UdpReceiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Datagram>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl UdpReceiver {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (g, stp) = (got.clone(), stop.clone());
        let thread = ns.spawn(move || -> Result<()> {
            let sock = match UdpSocket::bind(addr) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            sock.set_read_timeout(Some(POLL))?;
            let mut buf = [0u8; 65536];
            while !stp.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    g.lock()
                        .expect("receiver lock")
                        .push((from, buf[..n].to_vec()));
                }
            }
            Ok(())
        })?;
        ready_rx
            .recv()
            .context("UDP receiver thread died")?
            .with_context(|| format!("binding UDP {addr}"))?;
        Ok(Self {
            addr,
            got,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits up to `within` for a datagram with this payload; returns the
    /// sender's address if it came.
    pub fn wait_for(&self, payload: &[u8], within: Duration) -> Option<SocketAddr> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some((from, _)) = self
                .got
                .lock()
                .expect("receiver lock")
                .iter()
                .find(|(_, p)| p == payload)
            {
                return Some(*from);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for UdpReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a client attempt ended, as the application sees it. "Blocked"
/// outcomes are the two a policy refusal can produce (SPEC: how fast a
/// refusal comes is not observable behaviour, but tests record which).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Connected and got the payload echoed back.
    Exchanged,
    /// The connect call was refused locally with EPERM (a connect hook).
    Refused,
    /// No answer within [`CONNECT_TIMEOUT`] (a dropped SYN).
    TimedOut,
    /// Anything else, e.g. a RST from the peer.
    Failed(String),
}

impl Outcome {
    pub fn is_blocked(&self) -> bool {
        matches!(self, Outcome::Refused | Outcome::TimedOut)
    }

    /// Exit code `nettool` uses for this outcome, and back.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Exchanged => 0,
            Outcome::Failed(_) => 1,
            Outcome::Refused => 3,
            Outcome::TimedOut => 4,
        }
    }

    fn from_exit(code: Option<i32>, stderr: &str) -> Self {
        match code {
            Some(0) => Outcome::Exchanged,
            Some(3) => Outcome::Refused,
            Some(4) => Outcome::TimedOut,
            _ => Outcome::Failed(stderr.trim().to_string()),
        }
    }

    fn from_io(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => Outcome::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::TimedOut,
            _ => Outcome::Failed(e.to_string()),
        }
    }
}

/// Connects, sends `payload`, and expects it echoed back.
pub fn tcp_exchange(to: SocketAddr, payload: &[u8]) -> Outcome {
    let mut stream = match TcpStream::connect_timeout(&to, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return Outcome::from_io(&e),
    };
    let mut exchange = || -> std::io::Result<Vec<u8>> {
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        stream.write_all(payload)?;
        stream.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back)?;
        Ok(back)
    };
    match exchange() {
        Ok(back) if back == payload => Outcome::Exchanged,
        Ok(back) => Outcome::Failed(format!("echo mismatch: {} bytes back", back.len())),
        Err(e) => Outcome::from_io(&e),
    }
}

/// Sends one datagram, optionally from a given source address.
pub fn udp_send(from: Option<IpAddr>, to: SocketAddr, payload: &[u8]) -> Outcome {
    let bind: SocketAddr = match (from, to) {
        (Some(ip), _) => SocketAddr::new(ip, 0),
        (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().expect("literal"),
        (None, SocketAddr::V6(_)) => "[::]:0".parse().expect("literal"),
    };
    match UdpSocket::bind(bind).and_then(|s| s.send_to(payload, to)) {
        Ok(_) => Outcome::Exchanged,
        Err(e) => Outcome::from_io(&e),
    }
}

/// Path of the `nettool` binary; cargo tells it only to integration
/// tests, hence a macro that expands in the test crate.
#[macro_export]
macro_rules! nettool {
    () => {
        env!("CARGO_BIN_EXE_nettool")
    };
}

/// Runs a prepared `nettool` command (e.g. from
/// [`crate::cgroup::Cgroup::command_in`]) and reads its outcome.
pub fn run_nettool(mut cmd: Command) -> Result<Outcome> {
    let out = cmd.output().context("running nettool")?;
    Ok(Outcome::from_exit(
        out.status.code(),
        &String::from_utf8_lossy(&out.stderr),
    ))
}

/// Sends a complete IP packet (header included) through a raw socket.
/// Call it inside a namespace ([`Netns::run`]).
pub fn send_raw_ip(dst: IpAddr, packet: &[u8]) -> Result<()> {
    let domain = match dst {
        IpAddr::V4(_) => Domain::IPV4,
        IpAddr::V6(_) => Domain::IPV6,
    };
    let sock = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
        .context("opening a raw socket")?;
    sock.send_to(packet, &SocketAddr::new(dst, 0).into())
        .with_context(|| format!("raw send to {dst}"))?;
    Ok(())
}
