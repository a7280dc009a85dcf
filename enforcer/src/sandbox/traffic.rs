//! TCP traffic in a sandbox: echo servers that run inside a namespace on a
//! thread of their own, a client ([`tcp_exchange`]) that runs on a thread
//! inside a namespace ([`Netns::run`]) or in a child process of its own
//! (placed in a namespace and a cgroup, whose exit code is its
//! [`Outcome`]: [`run_client`]), and the outcome of an attempt as the
//! application sees it.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::netns::Netns;

/// How long a client waits before calling a connection blocked.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a server thread looks for new connections or a stop.
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
    /// Binds `addr` inside `ns`; returns once the server listens.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (acc, stp) = (accepted.clone(), stop.clone());
        let thread = ns.spawn(move || -> Result<()> {
            let listener = match TcpListener::bind(addr) {
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

/// Echoes what `stream` reads until the client closes its side (or stays
/// silent for 10 s): the server side of every TCP exchange, also for
/// servers that run in a process of their own (`nettool tcp-echo-server`).
pub fn echo(mut stream: TcpStream) {
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

    /// The exit code a client process reports this outcome with
    /// ([`run_client`] reads it back).
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Exchanged => 0,
            Outcome::Failed(_) => 1,
            Outcome::Refused => 3,
            Outcome::TimedOut => 4,
        }
    }

    pub fn from_exit(code: Option<i32>, stderr: &str) -> Self {
        match code {
            Some(0) => Outcome::Exchanged,
            Some(3) => Outcome::Refused,
            Some(4) => Outcome::TimedOut,
            _ => Outcome::Failed(stderr.trim().to_string()),
        }
    }

    /// How a socket call's error reads to the application.
    pub fn from_io(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => Outcome::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::TimedOut,
            _ => Outcome::Failed(e.to_string()),
        }
    }
}

/// Connects, sends `payload`, and expects it echoed back.
pub fn tcp_exchange(to: SocketAddr, payload: &[u8]) -> Outcome {
    tcp_exchange_from(None, to, payload)
}

/// A TCP connection to `to`, from a given local address (a peer with
/// several) or the one routing picks, within [`CONNECT_TIMEOUT`].
pub fn tcp_connect(from: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    tcp_connect_bound(from.map(|ip| SocketAddr::new(ip, 0)), to)
}

/// [`tcp_connect`] from a socket bound to `bind` first (an address, a
/// port, or both), with `SO_REUSEADDR` so that a port just used can be
/// used again towards another peer.
pub fn tcp_connect_bound(bind: Option<SocketAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(bind) = bind {
        socket.set_reuse_address(true)?;
        socket.bind(&bind.into())?;
    }
    socket.connect_timeout(&to.into(), CONNECT_TIMEOUT)?;
    Ok(socket.into())
}

/// [`tcp_exchange`] from a given local address (a peer with several).
pub fn tcp_exchange_from(from: Option<IpAddr>, to: SocketAddr, payload: &[u8]) -> Outcome {
    tcp_exchange_bound(from.map(|ip| SocketAddr::new(ip, 0)), to, payload)
}

/// [`tcp_exchange`] from a socket bound to `bind` first ([`tcp_connect_bound`]).
pub fn tcp_exchange_bound(bind: Option<SocketAddr>, to: SocketAddr, payload: &[u8]) -> Outcome {
    match tcp_connect_bound(bind, to) {
        Ok(stream) => tcp_exchange_on(stream, payload),
        Err(e) => Outcome::from_io(&e),
    }
}

/// Sends `payload` on a connected stream and expects it echoed back.
pub fn tcp_exchange_on(mut stream: TcpStream, payload: &[u8]) -> Outcome {
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

/// Runs a prepared client command (e.g. from
/// [`Cgroup::command_in`](super::cgroup::Cgroup::command_in)) that exits
/// with [`Outcome::exit_code`], and reads its outcome.
pub fn run_client(mut cmd: Command) -> Result<Outcome> {
    let out = cmd
        .output()
        .with_context(|| format!("running the client {:?}", cmd.get_program()))?;
    Ok(Outcome::from_exit(
        out.status.code(),
        &String::from_utf8_lossy(&out.stderr),
    ))
}
