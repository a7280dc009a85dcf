//! The kernel's socket table through `NETLINK_SOCK_DIAG` (linux/inet_diag.h):
//! the TCP and connected UDP sockets of the calling thread's network
//! namespace, each with its cgroup, owner uid and mark, and `SOCK_DESTROY` to abort
//! one (`CONFIG_INET_DIAG_DESTROY`); and the listening ones ([`listening`]),
//! from which the agent learns the PUs' ports, and an update which of a
//! namespace-wide PU's connections peers set up ([`listeners`]).
//!
//! This is how an `update` cuts a PU's connections that the new policy
//! refuses ([`super::revoke`]): a socket judged once at `connect()` (eBPF)
//! or by conntrack state (iptables) would otherwise go on. Aborting it is
//! what the application and its peer see at once: the next call on the
//! socket fails with `ECONNABORTED`, and a TCP peer gets a RST.
//!
//! Hand-written rather than a crate (`netlink-packet-sock-diag` has no
//! `SOCK_DESTROY`): two fixed-layout requests and one reply format over
//! [`crate::netlink`]'s framing, read with bounds checks only
//! ([`parse_dump`] is pure and tested on crafted bytes).

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use anyhow::Context as _;

use super::owner::PuSockets;
use super::revoke::{self, Listeners, TCP, UDP};
use crate::netlink::{self as nl, Builder, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE};
use crate::policy::Pu;

/// linux/sock_diag.h
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// linux/inet_diag.h attribute types.
const INET_DIAG_MARK: u16 = 15;
const INET_DIAG_CGROUP_ID: u16 = 21;

/// `struct inet_diag_sockid`: ports, two 16-byte addresses, interface,
/// cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans, id, expires,
/// rqueue, wqueue, uid, inode.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// Where `idiag_uid` is in it: after the id, `idiag_expires`,
/// `idiag_rqueue` and `idiag_wqueue` (4 bytes each).
const UID_AT: usize = 4 + SOCKID_LEN + 12;

/// TCP states (include/net/tcp_states.h) of sockets that carry a
/// connection: everything but LISTEN (10), CLOSE (7), TIME_WAIT (6, no
/// socket to abort) and NEW_SYN_RECV (12, a request, not a socket yet).
const TCP_CONNECTION_STATES: u32 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
/// A listening TCP socket is in TCP_LISTEN (10).
const TCP_LISTENING: u32 = 1 << 10;
/// A connected UDP socket is in TCP_ESTABLISHED (1).
const UDP_CONNECTED: u32 = 1 << 1;
/// UDP sockets that are bound but not connected (`TCP_CLOSE`).
const UDP_UNCONNECTED: u32 = 1 << 7;

/// One socket of the dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    pub local: SocketAddr,
    /// The peer; an IPv4 peer of an IPv6 socket is given as IPv4.
    pub remote: SocketAddr,
    /// The cgroup v2 id (the inode of its directory) of the socket's
    /// creator; `None` if the kernel did not say.
    pub cgroup: Option<u64>,
    /// `SO_MARK`; reported to CAP_NET_ADMIN callers only.
    pub mark: Option<u32>,
    /// The socket's owner (`idiag_uid`: its creator's fsuid, the uid
    /// `-m owner --uid-owner` matches), in the caller's user namespace.
    pub uid: u32,
    family: u8,
    /// The kernel's `inet_diag_sockid` as dumped: SOCK_DESTROY finds the
    /// socket by it, cookie included, so it never hits a newer socket that
    /// reuses the addresses.
    id: [u8; SOCKID_LEN],
}

/// Every TCP socket with a connection and every connected UDP socket, of
/// both families, in the calling thread's network namespace.
pub fn sockets() -> io::Result<Vec<Socket>> {
    dump(TCP_CONNECTION_STATES, UDP_CONNECTED)
}

/// Every listening TCP socket and every bound, unconnected UDP socket, of
/// both families, in the calling thread's network namespace: the
/// listening ports the agent's discovery looks for.
pub fn listening() -> io::Result<Vec<Socket>> {
    dump(TCP_LISTENING, UDP_UNCONNECTED)
}

/// Where peers connect to `pu` when it is namespace-wide ([`Listeners`],
/// [`revoke::side`]): the endpoints of [`listening`], one dump. Empty for
/// a PU found by its ports, whose port set says it without a dump.
pub fn listeners(pu: &Pu) -> io::Result<Listeners> {
    if !revoke::namespace_wide(pu) {
        return Ok(Listeners::default());
    }
    let listening = listening()?;
    Ok(Listeners::new(
        listening.into_iter().map(|s| (s.protocol, s.local)),
    ))
}

/// Every TCP socket with a connection and every UDP socket, connected or
/// only bound, that is the PU's ([`PuSockets`]).
pub fn pu_sockets(pu: &PuSockets) -> anyhow::Result<Vec<Socket>> {
    let selector = pu.resolve().context("finding the PU's sockets")?;
    let all = dump(TCP_CONNECTION_STATES, UDP_CONNECTED | UDP_UNCONNECTED)
        .context("listing sockets (sock_diag)")?;
    Ok(all.into_iter().filter(|s| selector.owns(s)).collect())
}

/// TCP sockets in `tcp_states` and UDP sockets in `udp_states`, of both
/// families.
fn dump(tcp_states: u32, udp_states: u32) -> io::Result<Vec<Socket>> {
    let nl = nl::Socket::open(libc::NETLINK_SOCK_DIAG, false)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut all = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for (protocol, states) in [(TCP, tcp_states), (UDP, udp_states)] {
            let request = message(
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST | NLM_F_DUMP,
                &request(family, protocol, states, &[0; SOCKID_LEN]),
            );
            nl.send(&request)?;
            loop {
                let n = nl.recv(&mut buf)?;
                match parse_dump(&buf[..n], protocol)? {
                    Dump::More(sockets) => all.extend(sockets),
                    Dump::Done(sockets) => {
                        all.extend(sockets);
                        break;
                    }
                }
            }
        }
    }
    Ok(all)
}

impl Socket {
    /// A socket as a dump would give it, for the tests of code that
    /// selects sockets.
    #[cfg(test)]
    pub fn fake(
        protocol: u8,
        local: SocketAddr,
        remote: SocketAddr,
        uid: u32,
        cgroup: Option<u64>,
    ) -> Self {
        Self {
            protocol,
            local,
            remote,
            cgroup,
            mark: None,
            uid,
            family: libc::AF_INET as u8,
            id: [0; SOCKID_LEN],
        }
    }
}

/// Aborts `socket` (SOCK_DESTROY). `Ok(false)` if it is gone already.
pub fn destroy(socket: &Socket) -> io::Result<bool> {
    let nl = nl::Socket::open(libc::NETLINK_SOCK_DIAG, false)?;
    let body = request(socket.family, socket.protocol, u32::MAX, &socket.id);
    match nl.request(&mut message(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &body)) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The ids of the cgroup at `dir` and of every cgroup below it: a PU's
/// processes may sit in sub-cgroups, and both datapaths count them in
/// (`-m cgroup --path` matches descendants; the eBPF hooks look up
/// ancestors). On cgroup v2 a cgroup's id is its directory's inode.
pub fn cgroup_tree_ids(dir: &Path) -> io::Result<BTreeSet<u64>> {
    let mut ids = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        ids.insert(std::fs::metadata(&dir)?.ino());
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(ids)
}

/// Aborts every socket of the PU ([`PuSockets`]) that `cut` selects;
/// returns the sockets aborted. A socket that closed meanwhile is not an
/// error; any other failure stops and names the socket.
pub fn abort_sockets(pu: &PuSockets, cut: impl Fn(&Socket) -> bool) -> anyhow::Result<Vec<Socket>> {
    let selector = pu.resolve().context("finding the PU's sockets")?;
    let mut aborted = Vec::new();
    for socket in sockets().context("listing sockets (sock_diag)")? {
        if selector.owns(&socket) && cut(&socket) {
            let gone = !destroy(&socket).with_context(|| {
                format!(
                    "aborting the socket {} -> {} (SOCK_DESTROY)",
                    socket.local, socket.remote
                )
            })?;
            if !gone {
                aborted.push(socket);
            }
        }
    }
    Ok(aborted)
}

/// Finds one socket by its addresses: an exact `sock_diag` lookup (the
/// kernel's own hash lookup, no dump), on one socket kept open. The
/// trap's handshake finds the cgroup of a PU's sending socket with it.
#[derive(Debug)]
pub struct Finder {
    nl: nl::Socket,
    buf: Vec<u8>,
}

/// `INET_DIAG_NOCOOKIE`: match whatever socket has the addresses.
const NO_COOKIE: [u8; 8] = [0xff; 8];

impl Finder {
    pub fn open() -> io::Result<Self> {
        let nl = nl::Socket::open(libc::NETLINK_SOCK_DIAG, false)?;
        // The kernel answers at once; a bound wait keeps a lost answer
        // from stalling the caller (the trap thread).
        nl.set_recv_timeout(std::time::Duration::from_millis(100))?;
        Ok(Self {
            nl,
            buf: vec![0u8; 8 * 1024],
        })
    }

    /// The TCP (connecting, connected or listening) or UDP (connected or
    /// only bound) socket that sends from `local` to `remote`;
    /// `Ok(None)` when there is none.
    pub fn find(
        &mut self,
        protocol: u8,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<Option<Socket>> {
        let (family, len) = match local.ip() {
            IpAddr::V4(_) => (libc::AF_INET as u8, 4),
            IpAddr::V6(_) => (libc::AF_INET6 as u8, 16),
        };
        let octets = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        // TCP's exact lookup reads the id as the socket has it (source =
        // local end); UDP's as a received datagram would (source = the
        // peer): net/ipv4/inet_diag.c and udp_diag.c.
        let (first, second) = if protocol == UDP {
            (remote, local)
        } else {
            (local, remote)
        };
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&first.port().to_be_bytes());
        id[2..4].copy_from_slice(&second.port().to_be_bytes());
        id[4..4 + len].copy_from_slice(&octets(first.ip()));
        id[20..20 + len].copy_from_slice(&octets(second.ip()));
        id[40..48].copy_from_slice(&NO_COOKIE);
        let body = request(family, protocol, u32::MAX, &id);
        self.nl
            .send(&message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, &body))?;
        // The socket found sends from `local`; it is connected to
        // `remote`, or (listening TCP, unconnected UDP) to nothing.
        let fits = |s: &Socket| {
            s.local.port() == local.port()
                && (s.remote == remote || s.remote.port() == 0 && s.remote.ip().is_unspecified())
        };
        // An answer that came after an earlier call gave up waiting may
        // still be queued: skip answers about other sockets.
        for _ in 0..4 {
            let n = self.nl.recv(&mut self.buf)?;
            match parse_dump(&self.buf[..n], protocol) {
                Ok(Dump::More(sockets) | Dump::Done(sockets)) => {
                    if let Some(found) = sockets.into_iter().find(fits) {
                        return Ok(Some(found));
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Err(malformed("no answer about the socket asked for"))
    }
}

/// A netlink message: header, then `body`.
fn message(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    let mut b = Builder::new(&mut m, kind, flags);
    b.bytes(body);
    b.finish();
    m
}

/// `struct inet_diag_req_v2`.
fn request(family: u8, protocol: u8, states: u32, id: &[u8; SOCKID_LEN]) -> [u8; REQ_LEN] {
    let mut r = [0u8; REQ_LEN];
    r[0] = family;
    r[1] = protocol;
    r[4..8].copy_from_slice(&states.to_ne_bytes());
    r[8..].copy_from_slice(id);
    r
}

/// What one reply datagram of a dump held.
#[derive(Debug, PartialEq, Eq)]
enum Dump {
    More(Vec<Socket>),
    Done(Vec<Socket>),
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("sock_diag reply: {what}"),
    )
}

/// Parses one reply datagram of a dump of `protocol` sockets.
fn parse_dump(buf: &[u8], protocol: u8) -> io::Result<Dump> {
    let mut sockets = Vec::new();
    for msg in nl::messages(buf) {
        let msg = msg.map_err(|e| malformed(&e.to_string()))?;
        match msg.kind {
            NLMSG_DONE => return Ok(Dump::Done(sockets)),
            nl::NLMSG_ERROR => {
                let errno = msg.error().ok_or_else(|| malformed("short error"))?;
                // An error message always carries one; 0 would be an
                // acknowledgement, which a dump does not send.
                return Err(io::Error::from_raw_os_error(errno));
            }
            SOCK_DIAG_BY_FAMILY => sockets.push(parse_socket(msg.payload, protocol)?),
            _ => {}
        }
    }
    Ok(Dump::More(sockets))
}

/// One `inet_diag_msg` and its attributes.
fn parse_socket(payload: &[u8], protocol: u8) -> io::Result<Socket> {
    if payload.len() < MSG_LEN {
        return Err(malformed("short inet_diag_msg"));
    }
    let family = payload[0];
    let id: [u8; SOCKID_LEN] = payload[4..4 + SOCKID_LEN].try_into().expect("sockid");
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let addr = |at: usize| -> io::Result<IpAddr> {
        let bytes: [u8; 16] = id[at..at + 16].try_into().expect("16 bytes");
        match i32::from(family) {
            libc::AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            libc::AF_INET6 => Ok(Ipv6Addr::from(bytes).to_canonical()),
            other => Err(malformed(&format!("address family {other}"))),
        }
    };
    let mut socket = Socket {
        protocol,
        local: SocketAddr::new(addr(4)?, port(0)),
        remote: SocketAddr::new(addr(20)?, port(2)),
        cgroup: None,
        mark: None,
        uid: u32::from_ne_bytes(payload[UID_AT..UID_AT + 4].try_into().expect("4 bytes")),
        family,
        id,
    };
    for attr in nl::attributes(&payload[MSG_LEN..]) {
        let attr = attr.map_err(|e| malformed(&e.to_string()))?;
        let value = attr.data;
        match (attr.kind, value.len()) {
            (INET_DIAG_CGROUP_ID, 8) => {
                socket.cgroup = Some(u64::from_ne_bytes(value.try_into().expect("8 bytes")));
            }
            (INET_DIAG_MARK, 4) => {
                socket.mark = Some(u32::from_ne_bytes(value.try_into().expect("4 bytes")));
            }
            _ => {}
        }
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `inet_diag_msg` for `local` → `remote` with the given attributes,
    /// owned by uid 1000.
    fn diag_msg(
        family: u8,
        local: &[u8],
        remote: &[u8],
        ports: (u16, u16),
        attrs: &[(u16, &[u8])],
    ) -> Vec<u8> {
        owned_diag_msg(family, local, remote, ports, 1000, attrs)
    }

    /// [`diag_msg`] owned by `uid`; the fields around the uid (expires,
    /// rqueue, wqueue before it, the inode after) hold other numbers.
    fn owned_diag_msg(
        family: u8,
        local: &[u8],
        remote: &[u8],
        ports: (u16, u16),
        uid: u32,
        attrs: &[(u16, &[u8])],
    ) -> Vec<u8> {
        let mut m = vec![family, 1, 0, 0];
        m.extend_from_slice(&ports.0.to_be_bytes());
        m.extend_from_slice(&ports.1.to_be_bytes());
        let mut src = [0u8; 16];
        src[..local.len()].copy_from_slice(local);
        let mut dst = [0u8; 16];
        dst[..remote.len()].copy_from_slice(remote);
        m.extend_from_slice(&src);
        m.extend_from_slice(&dst);
        m.extend_from_slice(&[7; 12]); // interface and cookie
        for field in [11u32, 12, 13, uid, 15] {
            m.extend_from_slice(&field.to_ne_bytes());
        }
        // The attributes, laid out by the shared builder (its header
        // dropped).
        let mut msg = Vec::new();
        let mut b = Builder::new(&mut msg, 0, 0);
        for (kind, value) in attrs {
            b.attr(*kind, value);
        }
        b.finish();
        m.extend_from_slice(&msg[nl::NLMSG_HDR..]);
        m
    }

    #[test]
    fn parses_sockets_with_cgroup_and_mark_then_done() {
        let v4 = diag_msg(
            libc::AF_INET as u8,
            &[10, 0, 0, 1],
            &[10, 2, 0, 2],
            (40000, 7000),
            &[
                (INET_DIAG_MARK, &0x1800u32.to_ne_bytes()),
                (INET_DIAG_CGROUP_ID, &42u64.to_ne_bytes()),
            ],
        );
        let mapped: Vec<u8> = Ipv4Addr::new(10, 4, 0, 2)
            .to_ipv6_mapped()
            .octets()
            .to_vec();
        let v6 = diag_msg(
            libc::AF_INET6 as u8,
            &Ipv6Addr::LOCALHOST.octets(),
            &mapped,
            (1, 2),
            &[],
        );
        let mut reply = message(SOCK_DIAG_BY_FAMILY, 0, &v4);
        reply.extend(message(SOCK_DIAG_BY_FAMILY, 0, &v6));
        let Dump::More(sockets) = parse_dump(&reply, TCP).unwrap() else {
            panic!("no DONE in the reply")
        };
        assert_eq!(sockets[0].local, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(sockets[0].remote, "10.2.0.2:7000".parse().unwrap());
        assert_eq!(
            (sockets[0].cgroup, sockets[0].mark),
            (Some(42), Some(0x1800))
        );
        assert_eq!(sockets[0].id[..4], [0x9c, 0x40, 0x1b, 0x58]);
        assert_eq!(
            sockets[1].remote,
            "10.4.0.2:2".parse().unwrap(),
            "IPv4-mapped peer"
        );
        assert_eq!((sockets[1].cgroup, sockets[1].mark), (None, None));
        let done = message(NLMSG_DONE, 0, &0i32.to_ne_bytes());
        assert_eq!(parse_dump(&done, UDP).unwrap(), Dump::Done(vec![]));
    }

    #[test]
    fn the_owner_uid_is_read_after_the_queues() {
        let msg = owned_diag_msg(
            libc::AF_INET6 as u8,
            &Ipv6Addr::UNSPECIFIED.octets(),
            &Ipv6Addr::UNSPECIFIED.octets(),
            (8081, 0),
            4_042_424,
            &[(INET_DIAG_CGROUP_ID, &7u64.to_ne_bytes())],
        );
        let reply = message(SOCK_DIAG_BY_FAMILY, 0, &msg);
        let Dump::More(sockets) = parse_dump(&reply, TCP).unwrap() else {
            panic!("no DONE in the reply")
        };
        assert_eq!(
            (sockets[0].local.port(), sockets[0].uid, sockets[0].cgroup),
            (8081, 4_042_424, Some(7))
        );
    }

    #[test]
    fn errors_and_truncation_are_refused_not_read_past() {
        let error = message(nl::NLMSG_ERROR, 0, &(-libc::EPERM).to_ne_bytes());
        let err = parse_dump(&error, TCP).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        let msg = diag_msg(
            libc::AF_INET as u8,
            &[1, 2, 3, 4],
            &[5, 6, 7, 8],
            (1, 2),
            &[],
        );
        let mut short = message(SOCK_DIAG_BY_FAMILY, 0, &msg[..MSG_LEN - 1]);
        assert!(parse_dump(&short, TCP).is_err());
        short.truncate(10);
        assert_eq!(parse_dump(&short, TCP).unwrap(), Dump::More(vec![]));
        let mut lying = message(SOCK_DIAG_BY_FAMILY, 0, &msg);
        lying[0] = 255;
        assert!(parse_dump(&lying, TCP).is_err());
        let mut bad_attr = msg.clone();
        bad_attr.extend_from_slice(&[200, 0, 21, 0]);
        assert!(parse_dump(&message(SOCK_DIAG_BY_FAMILY, 0, &bad_attr), TCP).is_err());
    }

    #[test]
    fn requests_have_the_kernels_layout() {
        let id = [9u8; SOCKID_LEN];
        let body = request(libc::AF_INET6 as u8, UDP, UDP_CONNECTED, &id);
        let m = message(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &body);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            SOCK_DESTROY
        );
        assert_eq!(&m[16..20], &[libc::AF_INET6 as u8, UDP, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 2);
        assert_eq!(&m[24..], &id);
    }
}
