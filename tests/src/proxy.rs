//! A real test proxy and a small DNS proxy, as users bring them: written
//! for iptables `REDIRECT`, unchanged whatever datapath steers traffic to
//! them (issue 6).
//!
//! [`TestProxy`] listens on a PU's proxy port in a namespace (a thread
//! there, outside every PU's cgroup, as a sidecar proxy is), on a
//! listening socket made in a cgroup of the test's choosing — the agent's
//! host scope, where the eBPF datapath answers `SO_ORIGINAL_DST`
//! ([`listener_in`]) — asks each
//! accepted socket where it was going (`getsockopt(SOL_IP,
//! SO_ORIGINAL_DST)`, or `SOL_IPV6, IP6T_SO_ORIGINAL_DST`), records it,
//! connects onward to that original destination from a socket carrying
//! the proxy mark (`SO_MARK`, kind `Proxy` of the mark layout: "never
//! redirected again") and relays bytes both ways. [`DnsProxy`] answers
//! every DNS query it gets with one fixed address ([`dns_answer`]).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener,
        TcpStream, UdpSocket,
    },
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use enforcer_common::marks::{Kind, MarkLayout};

use crate::cgroup::Cgroup;
use crate::netfilter::Family;
use crate::netns::Netns;

/// How often the proxies look for a stop.
const POLL: Duration = Duration::from_millis(10);

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h): both 80.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The proxy mark at the default layout: what the proxy's own sockets
/// carry so that they are never redirected again.
pub fn proxy_mark() -> u32 {
    MarkLayout::default().kind(Kind::Proxy)
}

/// One connection the proxy accepted: who made it, where it was going
/// (as `getsockopt` told), and whether relaying it onward worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub peer: SocketAddr,
    pub original: SocketAddr,
    /// The onward connection to `original` was made.
    pub forwarded: bool,
}

/// A TCP proxy on `port` of one family in a namespace; stops on drop.
pub struct TestProxy {
    seen: Arc<Mutex<Vec<Seen>>>,
    _thread: Stopping,
}

impl TestProxy {
    /// Listens on the family's wildcard address, `port`, in `ns`, on a
    /// socket made in `scope` (by `nettool`, [`listener_in`]); its onward
    /// sockets carry `mark` (normally [`proxy_mark`]).
    pub fn start(
        nettool: &str,
        scope: &Cgroup,
        ns: &Netns,
        family: Family,
        port: u16,
        mark: u32,
    ) -> Result<Self> {
        Self::start_with(nettool, scope, ns, family, port, mark, None)
    }

    /// The same proxy, but every connection goes on to `to` without
    /// asking where it was going: a proxy reached by its own address,
    /// with nothing redirecting (the benchmark's bare-kernel reference,
    /// where `SO_ORIGINAL_DST` has no answer, or would name the proxy).
    pub fn start_forwarding_to(
        nettool: &str,
        scope: &Cgroup,
        ns: &Netns,
        port: u16,
        mark: u32,
        to: SocketAddr,
    ) -> Result<Self> {
        let family = match to {
            SocketAddr::V4(_) => Family::V4,
            SocketAddr::V6(_) => Family::V6,
        };
        Self::start_with(nettool, scope, ns, family, port, mark, Some(to))
    }

    fn start_with(
        nettool: &str,
        scope: &Cgroup,
        ns: &Netns,
        family: Family,
        port: u16,
        mark: u32,
        fixed: Option<SocketAddr>,
    ) -> Result<Self> {
        let listener = listener_in(nettool, scope, ns, SocketAddr::new(wildcard(family), port))
            .with_context(|| format!("binding the test proxy on port {port}"))?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stp) = (seen.clone(), stop.clone());
        let thread = ns.spawn(move || -> Result<()> {
            listener.set_nonblocking(true)?;
            while !stp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, peer)) => {
                        client.set_nonblocking(false)?;
                        let log = log.clone();
                        std::thread::spawn(move || serve(client, peer, mark, fixed, &log));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait_readable(&listener, POLL)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })?;
        Ok(Self {
            seen,
            _thread: Stopping {
                stop,
                thread: Some(thread),
            },
        })
    }

    /// Every connection accepted so far, in order (one is recorded as soon
    /// as its onward connection was tried).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("proxy log").clone()
    }
}

/// Waits until `listener` has a connection to accept, or `timeout` passes
/// (so that a stop is seen): a connection is taken at once, never up to a
/// poll interval late, which would swamp a measurement of the path.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the result only says whether to look.
    unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
}

/// A proxy's thread (from [`Netns::spawn`]): told to stop and joined on
/// drop.
struct Stopping {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl Drop for Stopping {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The family's wildcard address (`0.0.0.0`, `::`).
pub fn wildcard(family: Family) -> IpAddr {
    match family {
        Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
        Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// A TCP listener on `addr` in `ns`, made by a process in `cgroup`
/// (`nettool hold-listener`) and taken from it with `pidfd_getfd(2)`.
///
/// Cgroup hooks run for a socket by the cgroup of the task that created
/// it, and an accepted socket inherits its listener's: so the proxy's
/// accepted sockets meet the programs of `cgroup` (on eBPF, the host
/// scope's getsockopt program, which answers `SO_ORIGINAL_DST`) while
/// the proxy itself stays a thread of the test. A thread cannot join a
/// cgroup of its own (cgroup v2 moves whole processes, but for threaded
/// subtrees), hence the short-lived child.
pub fn listener_in(
    nettool: &str,
    cgroup: &Cgroup,
    ns: &Netns,
    addr: SocketAddr,
) -> Result<TcpListener> {
    let mut cmd = cgroup.command_in(ns, nettool)?;
    cmd.args(["hold-listener", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().context("starting nettool hold-listener")?;
    let taken = (|| -> Result<OwnedFd> {
        let mut line = String::new();
        let stdout = child.stdout.take().context("nettool's stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let fd: libc::c_int = line
            .trim()
            .strip_prefix("listening fd=")
            .and_then(|fd| fd.parse().ok())
            .with_context(|| format!("nettool hold-listener said {line:?}"))?;
        // SAFETY: plain system calls; each descriptor returned is new and
        // ours, owned from here on.
        unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, child.id(), 0);
            if pidfd < 0 {
                return Err(std::io::Error::last_os_error()).context("pidfd_open");
            }
            let pidfd = OwnedFd::from_raw_fd(pidfd as libc::c_int);
            let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("pidfd_getfd");
            }
            Ok(OwnedFd::from_raw_fd(fd as libc::c_int))
        }
    })();
    // Closing its stdin ends it; its copy of the socket goes with it.
    drop(child.stdin.take());
    let _ = child.wait();
    Ok(TcpListener::from(taken?))
}

/// A TCP listener on `addr` as a proxy has it: the address reusable, and
/// an IPv6 one for IPv6 only (`SO_ORIGINAL_DST` is asked at the family's
/// level).
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(64)?;
    Ok(socket.into())
}

/// One accepted connection: learn (unless `fixed` says where to),
/// record, forward, relay.
fn serve(
    client: TcpStream,
    peer: SocketAddr,
    mark: u32,
    fixed: Option<SocketAddr>,
    log: &Mutex<Vec<Seen>>,
) {
    let Some(original) = fixed.or_else(|| original_dst(&client).ok()) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let onward = connect_marked(original, mark);
    log.lock().expect("proxy log").push(Seen {
        peer,
        original,
        forwarded: onward.is_ok(),
    });
    let Ok(server) = onward else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    relay(client, server);
}

/// Where the connection was going before a `REDIRECT` (or what a
/// datapath answering the same `getsockopt` says).
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    match stream.local_addr()? {
        SocketAddr::V4(_) => {
            // SAFETY: sockaddr_in is plain data; zero is a valid value.
            let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            getsockopt(fd, libc::SOL_IP, &mut addr)?;
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Ok(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)).into())
        }
        SocketAddr::V6(_) => {
            // SAFETY: as above.
            let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            getsockopt(fd, libc::SOL_IPV6, &mut addr)?;
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            Ok(SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, 0).into())
        }
    }
}

fn getsockopt<T>(fd: libc::c_int, level: libc::c_int, out: &mut T) -> std::io::Result<()> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `out` is a valid, writable T of `len` bytes.
    let rc =
        unsafe { libc::getsockopt(fd, level, SO_ORIGINAL_DST, (out as *mut T).cast(), &mut len) };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// A TCP connection to `to` from a socket carrying `mark` (`SO_MARK`),
/// as a proxy connects onward.
pub fn connect_marked(to: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    socket.connect_timeout(&to.into(), Duration::from_secs(3))?;
    Ok(socket.into())
}

/// Copies bytes both ways until each side has closed its sending half.
fn relay(client: TcpStream, server: TcpStream) {
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = pipe(client, server);
    let down = pipe(s2, c2);
    let _ = up.join();
    let _ = down.join();
}

/// A DNS proxy on UDP `port` of the family's loopback address in a
/// namespace (where the nat OUTPUT redirect of a PU's queries lands):
/// answers every query with [`dns_answer`] holding `answer`, and records
/// who asked.
pub struct DnsProxy {
    asked: Arc<Mutex<Vec<SocketAddr>>>,
    _thread: Stopping,
}

impl DnsProxy {
    pub fn start(ns: &Netns, family: Family, port: u16, answer: IpAddr) -> Result<Self> {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (log, stp) = (asked.clone(), stop.clone());
        let thread = ns.spawn(move || -> Result<()> {
            // On loopback, where a REDIRECT in OUTPUT sends local queries:
            // an answer must leave from the address the query was
            // redirected to, or conntrack cannot turn it back into the
            // server's (a wildcard socket would answer from the host's
            // own address).
            let loopback: IpAddr = match family {
                Family::V4 => Ipv4Addr::LOCALHOST.into(),
                Family::V6 => Ipv6Addr::LOCALHOST.into(),
            };
            let socket = match UdpSocket::bind(SocketAddr::new(loopback, port)) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            socket.set_read_timeout(Some(POLL))?;
            let mut buf = [0u8; 1500];
            while !stp.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = dns_answer(&buf[..n], answer) {
                    log.lock().expect("dns log").push(from);
                    let _ = socket.send_to(&reply, from);
                }
            }
            Ok(())
        })?;
        ready_rx
            .recv()
            .context("DNS proxy thread died")?
            .with_context(|| format!("binding the DNS proxy on port {port}"))?;
        Ok(Self {
            asked,
            _thread: Stopping {
                stop,
                thread: Some(thread),
            },
        })
    }

    /// Who asked so far (the source of each query, as the proxy saw it).
    pub fn asked(&self) -> Vec<SocketAddr> {
        self.asked.lock().expect("dns log").clone()
    }
}

/// A DNS query (RFC 1035) for `name`, type A for an IPv4 `family` and
/// AAAA for IPv6, with the id `id`.
pub fn dns_query(id: u16, name: &str, family: Family) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend(id.to_be_bytes());
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.push(0);
    let qtype: u16 = match family {
        Family::V4 => 1,
        Family::V6 => 28,
    };
    q.extend(qtype.to_be_bytes());
    q.extend(1u16.to_be_bytes()); // IN
    q
}

/// The answer to a one-question `query` (as [`dns_query`] makes it): the
/// question back, and one record of `answer`. `None` for what is no such
/// query.
pub fn dns_answer(query: &[u8], answer: IpAddr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[4..6] != [0, 1] {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let question = query.get(12..at + 4)?;
    let mut reply = Vec::new();
    reply.extend(&query[..2]);
    reply.extend([0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]); // QR RD RA; 1 q, 1 a
    reply.extend(question);
    reply.extend([0xc0, 12]); // the name: a pointer to the question's
    let (rtype, rdata): (u16, Vec<u8>) = match answer {
        IpAddr::V4(a) => (1, a.octets().to_vec()),
        IpAddr::V6(a) => (28, a.octets().to_vec()),
    };
    reply.extend(rtype.to_be_bytes());
    reply.extend(1u16.to_be_bytes());
    reply.extend(60u32.to_be_bytes());
    reply.extend((rdata.len() as u16).to_be_bytes());
    reply.extend(rdata);
    Some(reply)
}

/// The address of the one record in a reply to the query with `id`, as
/// [`dns_answer`] writes it.
pub fn parse_dns_answer(reply: &[u8], id: u16) -> Option<IpAddr> {
    if reply.get(..2)? != id.to_be_bytes() || reply.get(2)? & 0x80 == 0 {
        return None;
    }
    // The record ends the reply: RDLENGTH, then 4 (A) or 16 (AAAA) bytes.
    [4usize, 16].into_iter().find_map(|n| {
        let start = reply.len().checked_sub(n)?;
        let rdlength = reply.get(start.checked_sub(2)?..start)?;
        (rdlength == (n as u16).to_be_bytes()).then_some(())?;
        match n {
            4 => <[u8; 4]>::try_from(&reply[start..])
                .ok()
                .map(|o| Ipv4Addr::from(o).into()),
            _ => <[u8; 16]>::try_from(&reply[start..])
                .ok()
                .map(|o| Ipv6Addr::from(o).into()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_carries_the_question_and_the_address() {
        for (family, addr) in [
            (Family::V4, IpAddr::from(Ipv4Addr::new(192, 0, 2, 7))),
            (Family::V6, "2001:db8::7".parse().unwrap()),
        ] {
            let q = dns_query(0x1234, "svc.example", family);
            let a = dns_answer(&q, addr).unwrap();
            assert_eq!(parse_dns_answer(&a, 0x1234), Some(addr));
            assert_eq!(parse_dns_answer(&a, 0x1235), None);
            assert_eq!(parse_dns_answer(&q, 0x1234), None, "a query is no answer");
        }
        assert_eq!(dns_answer(b"short", Ipv4Addr::LOCALHOST.into()), None);
    }
}
