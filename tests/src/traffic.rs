//! Traffic for kernel tests: the library's TCP servers, clients and
//! [`Outcome`]s ([`enforcer::sandbox::traffic`]), plus what only tests
//! need: a UDP receiver and sender, the `nettool` client process, and raw
//! IP packets for headers no socket API would send.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};

/// Runs a prepared `nettool` command (e.g. from
/// [`crate::cgroup::Cgroup::command_in`]) and reads its outcome.
pub use enforcer::sandbox::traffic::run_client as run_nettool;
pub use enforcer::sandbox::traffic::*;

use crate::netns::Netns;

/// How often the receiver looks for a stop.
const POLL: Duration = Duration::from_millis(10);

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
