//! The peers' side of the traffic: servers on threads inside the peer
//! namespace (entered with [`Netns::spawn`]), one set per peer address.
//!
//! - a TCP sink ([`TCP_SINK_PORT`]) that reads and discards until the
//!   client closes, then closes (the client times the flow to that close);
//! - a UDP counter ([`UDP_PORT`]) that counts the datagrams it receives;
//! - a TCP acceptor ([`ACCEPT_PORT`]) that accepts and drops connections,
//!   for the connection-rate probe;
//! - a TCP echo server ([`ECHO_PORT`], [`EchoServer`], only where the
//!   proxy scenario sends requests) that answers one request per
//!   connection and closes, as an HTTP/1.0 server does.
//!
//! Every loop wakes at least every [`POLL`] to look for a stop; dropping a
//! server stops and joins its thread.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use enforcer::sandbox::netns::Netns;
use socket2::{Domain, Socket, Type};

pub const TCP_SINK_PORT: u16 = 5001;
pub const UDP_PORT: u16 = 5002;
pub const ACCEPT_PORT: u16 = 5003;
pub const ECHO_PORT: u16 = 5006;

/// Threads of an echo server, each accepting and answering in turn: as
/// many as the client has connectors, so that none waits for another's
/// request.
const ECHO_THREADS: usize = 4;
/// How long an echo connection may wait for its request.
const ECHO_IDLE: Duration = Duration::from_secs(5);

/// How often a blocked server thread looks for a stop.
const POLL: Duration = Duration::from_millis(50);
/// The UDP counter's receive buffer: bursts must not be lost to it.
const UDP_RCVBUF: libc::c_int = 16 << 20;
/// A sink connection's read timeout: a client that stalls this long is
/// given up on.
const SINK_IDLE: Duration = Duration::from_secs(30);

/// The three servers of one peer address.
pub struct PeerServers {
    udp_count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl PeerServers {
    /// Starts the servers on `ip` inside `ns`; returns once all listen.
    pub fn start(ns: &Netns, ip: IpAddr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let udp_count = Arc::new(AtomicU64::new(0));
        let mut servers = Self {
            udp_count: udp_count.clone(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();

        let (tx, stp) = (ready_tx.clone(), stop.clone());
        servers.threads.push(flatten(ns.spawn(move || {
            let listener = bound(&tx, listener(SocketAddr::new(ip, TCP_SINK_PORT)))?;
            accept_loop(&listener, &stp, |stream| {
                std::thread::spawn(move || sink(stream));
            })
        })?));

        let (tx, stp) = (ready_tx.clone(), stop.clone());
        servers.threads.push(flatten(ns.spawn(move || {
            let listener = bound(&tx, listener(SocketAddr::new(ip, ACCEPT_PORT)))?;
            accept_loop(&listener, &stp, drop)
        })?));

        let (tx, stp) = (ready_tx, stop);
        servers.threads.push(flatten(ns.spawn(move || {
            let socket = bound(&tx, udp_socket(SocketAddr::new(ip, UDP_PORT)))?;
            let mut buf = [0u8; 2048];
            while !stp.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    udp_count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        })?));

        for _ in 0..servers.threads.len() {
            ready_rx
                .recv()
                .context("a server thread died before listening")?
                .with_context(|| format!("starting the servers on {ip}"))?;
        }
        Ok(servers)
    }

    /// Datagrams the UDP counter received so far.
    pub fn udp_received(&self) -> u64 {
        self.udp_count.load(Ordering::Relaxed)
    }
}

impl Drop for PeerServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("warning: a benchmark server failed: {e:#}"),
                Err(_) => eprintln!("warning: a benchmark server panicked"),
            }
        }
    }
}

/// A TCP echo server on one address: each connection gets back what its
/// first read returned, then the server closes — first, so that its
/// side keeps the TIME_WAIT, not the client's or a proxy's onward
/// socket, whose ports would run out at thousands of requests a second.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl EchoServer {
    /// Starts the server on `addr` inside `ns`; returns once it listens.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (tx, stp) = (ready_tx, stop.clone());
        // One listener, bound in the namespace, shared by the threads.
        let first = flatten(ns.spawn(move || {
            let listener = bound(&tx, listener(addr))?;
            let mut threads = Vec::new();
            for _ in 1..ECHO_THREADS {
                let (listener, stp) = (listener.try_clone()?, stp.clone());
                threads.push(std::thread::spawn(move || echo_loop(&listener, &stp)));
            }
            let mine = echo_loop(&listener, &stp);
            for t in threads {
                t.join()
                    .map_err(|_| anyhow::anyhow!("an echo thread panicked"))??;
            }
            mine
        })?);
        ready_rx
            .recv()
            .context("the echo server died before listening")?
            .with_context(|| format!("starting the echo server on {addr}"))?;
        Ok(Self {
            stop,
            threads: vec![first],
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("warning: a benchmark echo server failed: {e:#}"),
                Err(_) => eprintln!("warning: a benchmark echo server panicked"),
            }
        }
    }
}

/// Accepts and answers connections one at a time until `stop`.
fn echo_loop(listener: &TcpListener, stop: &AtomicBool) -> Result<()> {
    accept_loop(listener, stop, |mut stream| {
        let _ = stream.set_read_timeout(Some(ECHO_IDLE));
        let mut buf = [0u8; 2048];
        if let Ok(n @ 1..) = stream.read(&mut buf) {
            let _ = stream.write_all(&buf[..n]);
        }
        // Dropped: closed, the server first.
    })
}

/// A spawned server's two layers of result as one.
fn flatten(handle: JoinHandle<Result<Result<()>>>) -> JoinHandle<Result<()>> {
    std::thread::spawn(move || match handle.join() {
        Ok(result) => result.and_then(|r| r),
        Err(_) => bail!("server thread panicked"),
    })
}

/// Reports a bind's outcome to the starter, and passes the socket on.
fn bound<T>(ready: &std::sync::mpsc::Sender<Result<()>>, socket: Result<T>) -> Result<T> {
    match socket {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            Ok(s)
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
            Err(e)
        }
    }
}

/// A listening TCP socket with a deep backlog (the connection-rate probe
/// opens connections faster than a default backlog of 128 drains) and an
/// accept timeout of [`POLL`] (Linux honours SO_RCVTIMEO in accept).
fn listener(addr: SocketAddr) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding TCP {addr}"))?;
    socket.listen(4096)?;
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket.into())
}

/// A UDP socket with a large receive buffer (SO_RCVBUFFORCE: as root,
/// above net.core.rmem_max) and a read timeout of [`POLL`].
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    let socket = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
    let size: libc::c_int = UDP_RCVBUF;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live int
    // of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting SO_RCVBUFFORCE");
    }
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket)
}

/// Accepts until `stop`, handing each connection to `each`.
fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    mut each: impl FnMut(std::net::TcpStream),
) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => each(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("accepting"),
        }
    }
    Ok(())
}

/// Reads and discards until the client closes (or stalls or resets).
fn sink(mut stream: std::net::TcpStream) {
    let _ = stream.set_read_timeout(Some(SINK_IDLE));
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}
