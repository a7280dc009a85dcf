//! Traffic for kernel tests: the library's TCP servers, clients and
//! [`Outcome`]s ([`enforcer::sandbox::traffic`]), plus what only tests
//! need: a UDP receiver and sender, an ICMP echo ("ping") over a raw
//! socket, the `nettool` client process, and raw IP packets and TCP SYNs
//! for headers no socket API would send.

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
        Self::spawn(ns, addr, false)
    }

    /// [`Self::start`], sending every datagram back to its sender too: a
    /// peer's echo server.
    pub fn echoing(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::spawn(ns, addr, true)
    }

    fn spawn(ns: &Netns, addr: SocketAddr, echo: bool) -> Result<Self> {
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
                    if echo {
                        let _ = sock.send_to(&buf[..n], from);
                    }
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

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.got.lock().expect("receiver lock").len()
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

/// Sends `payload` in one datagram from an unconnected socket (bound to
/// `from` if given) and waits up to [`UDP_ANSWER_WAIT`] for it to come
/// back from `to` (an echo server).
pub fn udp_exchange_from(from: Option<IpAddr>, to: SocketAddr, payload: &[u8]) -> Outcome {
    let exchanged = (|| -> std::io::Result<bool> {
        let socket = UdpSocket::bind(bind_addr(from, to))?;
        socket.set_read_timeout(Some(UDP_ANSWER_WAIT))?;
        socket.send_to(payload, to)?;
        let mut buf = [0u8; 2048];
        loop {
            let (n, sender) = socket.recv_from(&mut buf)?;
            if sender == to {
                return Ok(&buf[..n] == payload);
            }
        }
    })();
    match exchanged {
        Ok(true) => Outcome::Exchanged,
        Ok(false) => Outcome::Failed("the answer differs from what was sent".into()),
        Err(e) => Outcome::from_io(&e),
    }
}

/// Sends `payload` `count` times from one unconnected socket (bound to
/// `sport` if given: a PU's own UDP port, say), each time waiting up to
/// [`UDP_ANSWER_WAIT`] for it to come back from `to` (an echo server):
/// one UDP flow, `count` round trips.
pub fn udp_exchanges(to: SocketAddr, sport: Option<u16>, payload: &[u8], count: u32) -> Outcome {
    let exchanged = (|| -> std::io::Result<bool> {
        let mut bind = bind_addr(None, to);
        bind.set_port(sport.unwrap_or(0));
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(UDP_ANSWER_WAIT))?;
        let mut buf = [0u8; 2048];
        for _ in 0..count {
            socket.send_to(payload, to)?;
            loop {
                let (n, sender) = socket.recv_from(&mut buf)?;
                if sender == to {
                    if &buf[..n] != payload {
                        return Ok(false);
                    }
                    break;
                }
            }
        }
        Ok(true)
    })();
    match exchanged {
        Ok(true) => Outcome::Exchanged,
        Ok(false) => Outcome::Failed("an answer differs from what was sent".into()),
        Err(e) => Outcome::from_io(&e),
    }
}

/// How long [`udp_exchange_from`] waits for its answer.
pub const UDP_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// The local address a client socket binds: `from`, else any of `to`'s
/// family.
fn bind_addr(from: Option<IpAddr>, to: SocketAddr) -> SocketAddr {
    match (from, to) {
        (Some(ip), _) => SocketAddr::new(ip, 0),
        (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().expect("literal"),
        (None, SocketAddr::V6(_)) => "[::]:0".parse().expect("literal"),
    }
}

/// Sends one datagram, optionally from a given source address.
pub fn udp_send(from: Option<IpAddr>, to: SocketAddr, payload: &[u8]) -> Outcome {
    udp_send_n(from, to, payload, 1)
}

/// Sends `count` datagrams from one unconnected socket (`sendto` each
/// time), optionally bound to a given source address.
pub fn udp_send_n(from: Option<IpAddr>, to: SocketAddr, payload: &[u8], count: u32) -> Outcome {
    let sent = UdpSocket::bind(bind_addr(from, to))
        .and_then(|s| (0..count).try_for_each(|_| s.send_to(payload, to).map(drop)));
    match sent {
        Ok(()) => Outcome::Exchanged,
        Err(e) => Outcome::from_io(&e),
    }
}

/// The socket an echo request goes out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingSocket {
    /// `SOCK_RAW`: root's way, allowed in any namespace.
    Raw,
    /// `SOCK_DGRAM` with `IPPROTO_ICMP(V6)`, the unprivileged "ping
    /// socket": allowed only to the groups of the namespace's
    /// `net.ipv4.ping_group_range` (none, in a new namespace).
    Dgram,
}

/// One ICMP (IPv4) or ICMPv6 echo request to `to`, and its reply:
/// [`Outcome::Exchanged`] when the reply came within [`CONNECT_TIMEOUT`].
/// Neither socket kind is seen by a connect or sendmsg hook.
pub fn ping(to: IpAddr, kind: PingSocket) -> Outcome {
    ping_once(to, kind).unwrap_or_else(|e| Outcome::from_io(&e))
}

fn ping_once(to: IpAddr, kind: PingSocket) -> std::io::Result<Outcome> {
    let (domain, protocol, request, reply) = match to {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
    };
    let sock = match kind {
        PingSocket::Raw => Socket::new(domain, Type::RAW, Some(protocol))?,
        PingSocket::Dgram => Socket::new(domain, Type::DGRAM, Some(protocol))?,
    };
    // An id of this process's own: replies to other pings are skipped.
    let id = (std::process::id() as u16).to_be_bytes();
    let mut message = vec![request, 0, 0, 0, id[0], id[1], 0, 1];
    message.extend_from_slice(b"enforcer-ping");
    if to.is_ipv4() {
        // The kernel computes ICMPv6 checksums on raw sockets, not ICMP's.
        let sum = internet_checksum(&message).to_be_bytes();
        message[2..4].copy_from_slice(&sum);
    }
    sock.send_to(&message, &SocketAddr::new(to, 0).into())?;
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(Outcome::TimedOut);
        }
        sock.set_read_timeout(Some(left))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if Outcome::from_io(&e) == Outcome::TimedOut => return Ok(Outcome::TimedOut),
            Err(e) => return Err(e),
        };
        // SAFETY: recv_from initialised the first `n` bytes.
        let data: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        // IPv4 raw sockets deliver the IP header too; IPv6 ones and ping
        // sockets do not. A ping socket gets only its own replies, under
        // the id the kernel chose.
        let icmp = match (to, kind) {
            (IpAddr::V4(_), PingSocket::Raw) => {
                data.get(usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4..)
            }
            _ => Some(&data[..]),
        };
        let from_peer = from.as_socket().map(|a| a.ip()) == Some(to);
        if let Some(icmp) = icmp
            && from_peer
            && icmp.len() >= 8
            && icmp[0] == reply
            && (kind == PingSocket::Dgram || icmp[4..6] == id)
        {
            return Ok(Outcome::Exchanged);
        }
    }
}

/// RFC 1071's checksum of `data`.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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

/// A PU's echo server: `nettool tcp-echo-server` or `udp-echo-server` as
/// a process inside the PU's cgroup and a namespace, so that its sockets
/// (accepted ones too) and its replies are the PU's. Killed on drop.
/// `nettool` is the binary's path (`nettool!()` in a test).
pub struct PuEchoServer(std::process::Child);

/// What a [`PuEchoServer`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl PuEchoServer {
    pub fn start(
        nettool: &str,
        transport: Transport,
        cgroup: &crate::cgroup::Cgroup,
        ns: &Netns,
        addr: SocketAddr,
    ) -> Result<Self> {
        Self::spawn(nettool, transport, cgroup, ns, addr, None)
    }

    /// [`Self::start`], the server running as `uid` ([`become_user`]):
    /// a uid PU's when `uid` is its user's.
    pub fn start_as_user(
        nettool: &str,
        transport: Transport,
        cgroup: &crate::cgroup::Cgroup,
        ns: &Netns,
        addr: SocketAddr,
        uid: u32,
    ) -> Result<Self> {
        Self::spawn(nettool, transport, cgroup, ns, addr, Some(uid))
    }

    fn spawn(
        nettool: &str,
        transport: Transport,
        cgroup: &crate::cgroup::Cgroup,
        ns: &Netns,
        addr: SocketAddr,
        uid: Option<u32>,
    ) -> Result<Self> {
        use std::io::BufRead as _;
        use std::process::Stdio;
        let kind = match transport {
            Transport::Tcp => "tcp-echo-server",
            Transport::Udp => "udp-echo-server",
        };
        let mut cmd = cgroup.command_in(ns, nettool)?;
        if let Some(uid) = uid {
            become_user(&mut cmd, uid);
        }
        cmd.args([kind, &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting nettool {kind}"))?;
        let mut first = String::new();
        let stdout = child.stdout.take().context("the server's stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut first)?;
        let server = Self(child);
        anyhow::ensure!(
            first.trim() == "listening",
            "the PU's {kind} on {addr}: {first}"
        );
        Ok(server)
    }
}

/// A uid no user of the machine has, for the processes of tests' uid PUs:
/// no other process of the machine is one of its.
pub const TEST_UID: u32 = 4_042_424;

/// Makes `cmd`'s child drop to `uid` (and the group of the same number, no
/// supplementary groups) just before it runs: after
/// [`crate::cgroup::Cgroup::command_in`] placed it in its namespace and
/// cgroup, which need root.
pub fn become_user(cmd: &mut std::process::Command, uid: u32) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: runs in the forked child before exec, after the closures
    // registered before it; setgroups, setgid and setuid are
    // async-signal-safe and nothing here allocates.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Drop for PuEchoServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends one TCP SYN from `from`:`src_port` to `to` through a raw TCP
/// socket, carrying `options` (padded with end-of-list bytes to a whole
/// number of 32-bit words) — TCP option 34, say, which no `connect()`
/// sends unasked. The kernel builds the IP header; the TCP checksum is
/// computed here over the family's pseudo-header. Call it inside a
/// namespace ([`Netns::run`]).
pub fn send_tcp_syn(from: IpAddr, src_port: u16, to: SocketAddr, options: &[u8]) -> Result<()> {
    const SYN: u8 = 0x02;
    let padded = options.len().div_ceil(4) * 4;
    let header_len = 20 + padded;
    let mut segment = Vec::with_capacity(header_len);
    segment.extend_from_slice(&src_port.to_be_bytes());
    segment.extend_from_slice(&to.port().to_be_bytes());
    segment.extend_from_slice(&0x5eed_0001u32.to_be_bytes()); // sequence
    segment.extend_from_slice(&[0; 4]); // acknowledgment
    segment.push(u8::try_from(header_len / 4).context("TCP options too long")? << 4);
    segment.push(SYN);
    segment.extend_from_slice(&u16::MAX.to_be_bytes()); // window
    segment.extend_from_slice(&[0; 4]); // checksum, urgent pointer
    segment.extend_from_slice(options);
    segment.resize(header_len, 0);
    send_raw_transport(from, to.ip(), Protocol::TCP, segment, 16)
        .with_context(|| format!("raw SYN to {to}"))
}

/// Sends one UDP datagram from `from`:`src_port` to `to` through a raw UDP
/// socket (`SOCK_RAW`, as a process with CAP_NET_RAW can): no `sendto` on
/// a UDP socket, so no sendmsg hook sees it. Call it inside a namespace.
pub fn send_raw_udp(from: IpAddr, src_port: u16, to: SocketAddr, payload: &[u8]) -> Result<()> {
    let length = u16::try_from(8 + payload.len()).context("payload too long")?;
    let mut datagram = Vec::with_capacity(usize::from(length));
    datagram.extend_from_slice(&src_port.to_be_bytes());
    datagram.extend_from_slice(&to.port().to_be_bytes());
    datagram.extend_from_slice(&length.to_be_bytes());
    datagram.extend_from_slice(&[0; 2]); // checksum
    datagram.extend_from_slice(payload);
    send_raw_transport(from, to.ip(), Protocol::UDP, datagram, 6)
        .with_context(|| format!("raw UDP to {to}"))
}

/// Sends one ICMP (IPv4) or ICMPv6 message of `icmp_type` and `code` with
/// `body` (what follows the checksum) from `from` to `to` through a raw
/// socket: an answer no request asked for, say. Call it inside a
/// namespace.
pub fn send_raw_icmp(from: IpAddr, to: IpAddr, icmp_type: u8, code: u8, body: &[u8]) -> Result<()> {
    let mut message = vec![icmp_type, code, 0, 0];
    message.extend_from_slice(body);
    let protocol = match to {
        IpAddr::V4(_) => Protocol::ICMPV4,
        IpAddr::V6(_) => Protocol::ICMPV6,
    };
    let sock = raw_socket(from, to, protocol)?;
    if to.is_ipv4() {
        // The kernel computes ICMPv6 checksums on raw sockets, not ICMP's.
        let sum = internet_checksum(&message).to_be_bytes();
        message[2..4].copy_from_slice(&sum);
    }
    sock.send_to(&message, &SocketAddr::new(to, 0).into())
        .with_context(|| format!("raw ICMP type {icmp_type} to {to}"))?;
    Ok(())
}

/// A raw socket of `protocol` for `to`'s family, bound to `from`.
fn raw_socket(from: IpAddr, to: IpAddr, protocol: Protocol) -> Result<Socket> {
    let domain = match to {
        IpAddr::V4(_) => Domain::IPV4,
        IpAddr::V6(_) => Domain::IPV6,
    };
    let sock = Socket::new(domain, Type::RAW, Some(protocol)).context("opening a raw socket")?;
    sock.bind(&SocketAddr::new(from, 0).into())
        .with_context(|| format!("binding a raw socket to {from}"))?;
    Ok(sock)
}

/// Sends a TCP or UDP header and payload (`segment`, checksum zero at
/// `checksum_at`) through a raw socket of `protocol`: the kernel builds
/// the IP header, the checksum is computed here over the family's
/// pseudo-header.
fn send_raw_transport(
    from: IpAddr,
    to: IpAddr,
    protocol: Protocol,
    mut segment: Vec<u8>,
    checksum_at: usize,
) -> Result<()> {
    let number = u8::try_from(i32::from(protocol)).context("protocol number")?;
    let length = u16::try_from(segment.len()).context("segment too long")?;
    let mut pseudo = Vec::new();
    match (from, to) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&[0, number]);
            pseudo.extend_from_slice(&length.to_be_bytes());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&u32::from(length).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, number]);
        }
        _ => anyhow::bail!("{from} and {to} are of different families"),
    }
    pseudo.extend_from_slice(&segment);
    // UDP sends a computed zero as all ones (zero means "none").
    let sum = match internet_checksum(&pseudo) {
        0 if protocol == Protocol::UDP => u16::MAX,
        sum => sum,
    };
    segment[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    let sock = raw_socket(from, to, protocol)?;
    sock.send_to(&segment, &SocketAddr::new(to, 0).into())?;
    Ok(())
}
