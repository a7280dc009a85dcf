//! The fallback's side of the flow log: a thread bound to the NFLOG groups
//! of the PU chains' log rules (10 app, 11 net) over `NETLINK_NETFILTER`
//! reads each logged packet, turns its prefix (`<short>:<tag>:<policy>`,
//! [`crate::naming::nflog_prefix`]) back into the PU and ACL that logged
//! it ([`Prefixes`], kept by the datapath; a PU's `<short>:default:`
//! final drop stands for policy `default`, action reject) and its payload
//! into the 5-tuple ([`crate::trap::packet::parse`]).
//!
//! The netlink messages are written by hand: a bind command and a copy
//! mode per group, then `NFULNL_MSG_PACKET` messages read, of which only
//! the prefix and payload attributes are used.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};

use crate::flowlog::{
    self, FlowAction, FlowDirection, FlowObserve, FlowRecord, FlowSender, Repeats, endpoint,
};
use crate::trap::packet::{self, L4};

/// The groups, as the rules name them ([`super::rules::nflog_group`]).
pub const APP_GROUP: u16 = 10;
pub const NET_GROUP: u16 = 11;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
/// Bytes of each packet copied: IP (with options or extension headers)
/// and the transport ports.
const COPY_RANGE: u32 = 256;

/// What a log prefix stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedAcl {
    pub pu: String,
    pub policy_id: String,
    pub action: FlowAction,
    pub observe: FlowObserve,
}

/// Every log prefix of the installed PUs that makes a flow record (their
/// ACLs' and their final drop's) → what it stands for.
pub type Prefixes = BTreeMap<String, LoggedAcl>;

/// The record of one logged packet, if its prefix is known: an ACL's, or
/// a PU's final drop of a new connection (`<short>:default:`, policy id
/// `default`). The final drop's `default-other` log of a packet that is
/// not new is not a flow record (the eBPF datapath has no equivalent; see
/// [`crate::flowlog`]) and is never in [`Prefixes`].
pub fn record(prefixes: &Prefixes, group: u16, prefix: &str, payload: &[u8]) -> Option<FlowRecord> {
    let acl = prefixes.get(prefix)?;
    let headers = packet::parse(payload).ok()?;
    let (src_port, dst_port) = match headers.l4 {
        L4::Tcp { src, dst, .. } | L4::Udp { src, dst } => (src, dst),
        _ => (0, 0),
    };
    Some(FlowRecord {
        time: flowlog::now(),
        pu: acl.pu.clone(),
        policy_id: acl.policy_id.clone(),
        action: acl.action,
        observe: acl.observe,
        protocol: flowlog::protocol_name(headers.protocol),
        src: endpoint(headers.src, src_port),
        dst: endpoint(headers.dst, dst_port),
        direction: if group == NET_GROUP {
            FlowDirection::Net
        } else {
            FlowDirection::App
        },
    })
}

/// The reader thread; stops when dropped.
pub struct NflogReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NflogReader {
    /// Binds both groups (in the calling thread's network namespace, the
    /// agent's) and starts reading.
    pub fn start(prefixes: Arc<Mutex<Prefixes>>, sender: FlowSender) -> anyhow::Result<Self> {
        let socket = bind(&[APP_GROUP, NET_GROUP])?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("flowlog-nflog".into())
            .spawn({
                let stop = stop.clone();
                move || read(&socket, &prefixes, &sender, &stop)
            })
            .context("starting the NFLOG reader")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for NflogReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the NFLOG reader panicked");
        }
    }
}

fn read(socket: &OwnedFd, prefixes: &Mutex<Prefixes>, sender: &FlowSender, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    let mut recent = Repeats::default();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: a valid fd and a buffer of the stated length.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                // Messages were lost (the socket buffer overflowed): the
                // log misses them, the reader goes on.
                Some(libc::ENOBUFS) => {
                    tracing::warn!("flow log: NFLOG messages lost (socket buffer full)");
                    continue;
                }
                _ => {
                    tracing::error!("flow log: reading NFLOG: {e}");
                    return;
                }
            }
        }
        for (group, prefix, payload) in messages(&buf[..n as usize]) {
            let record = {
                let prefixes = prefixes.lock().expect("flow prefixes lock");
                record(&prefixes, group, prefix, payload)
            };
            if let Some(record) = record
                && recent.is_new(&record)
                && sender.send(record).is_err()
            {
                return;
            }
        }
    }
}

/// The logged packets in one datagram: (group, prefix, payload).
fn messages(mut buf: &[u8]) -> Vec<(u16, &str, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
        if len < 16 || len > buf.len() {
            break;
        }
        let msg = &buf[16..len];
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET && msg.len() >= 4 {
            let group = u16::from_be_bytes([msg[2], msg[3]]);
            let (mut prefix, mut payload) = ("", &[][..]);
            let mut attrs = &msg[4..];
            while attrs.len() >= 4 {
                let alen = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
                let atype = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                let data = &attrs[4..alen];
                match atype {
                    NFULA_PREFIX => {
                        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                        prefix = std::str::from_utf8(&data[..end]).unwrap_or("");
                    }
                    NFULA_PAYLOAD => payload = data,
                    _ => {}
                }
                attrs = &attrs[align4(alen).min(attrs.len())..];
            }
            out.push((group, prefix, payload));
        }
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink socket bound to `groups`, copying packets, with a receive
/// timeout so the reader sees its stop flag.
fn bind(groups: &[u16]) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a netfilter netlink socket");
    }
    // SAFETY: a fresh fd nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is valid; then family set.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: a valid fd and address of the stated length.
    let rc = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("binding the netlink socket");
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    let rcvbuf: libc::c_int = 1 << 20;
    // SAFETY: valid options of the stated sizes.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as u32,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const rcvbuf).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
    let mut seq = 0;
    for &group in groups {
        seq += 1;
        request(&socket, seq, group, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])
            .with_context(|| format!("binding NFLOG group {group}"))?;
        seq += 1;
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend([NFULNL_COPY_PACKET, 0]);
        request(&socket, seq, group, NFULA_CFG_MODE, &mode)
            .with_context(|| format!("setting the copy mode of NFLOG group {group}"))?;
    }
    Ok(socket)
}

/// Sends one config message with one attribute and waits for its ack.
fn request(socket: &OwnedFd, seq: u32, group: u16, attr: u16, data: &[u8]) -> anyhow::Result<()> {
    let attr_len = 4 + data.len();
    let len = 16 + 4 + align4(attr_len);
    let mut msg = Vec::with_capacity(len);
    msg.extend((len as u32).to_ne_bytes());
    msg.extend(((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    msg.extend((NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend(seq.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, the group (big-endian).
    msg.extend([0, 0]);
    msg.extend(group.to_be_bytes());
    msg.extend((attr_len as u16).to_ne_bytes());
    msg.extend(attr.to_ne_bytes());
    msg.extend(data);
    msg.resize(len, 0);
    // SAFETY: a valid fd and buffer.
    let sent = unsafe { libc::send(socket.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut buf = [0u8; 4096];
    for _ in 0..10 {
        // SAFETY: a valid fd and buffer.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e).context("waiting for the netlink ack");
        }
        let reply = &buf[..n as usize];
        if reply.len() >= 20
            && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR
            && u32::from_ne_bytes(reply[8..12].try_into().expect("4 bytes")) == seq
        {
            let errno = i32::from_ne_bytes(reply[16..20].try_into().expect("4 bytes"));
            if errno == 0 {
                return Ok(());
            }
            return Err(std::io::Error::from_raw_os_error(-errno).into());
        }
    }
    bail!("no netlink ack")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixes() -> Prefixes {
        let mut p = Prefixes::new();
        p.insert(
            "webbBzx:reject:deny-db".into(),
            LoggedAcl {
                pu: "web".into(),
                policy_id: "deny-db".into(),
                action: FlowAction::Reject,
                observe: FlowObserve::None,
            },
        );
        p.insert(
            "webbBzx:default:".into(),
            LoggedAcl {
                pu: "web".into(),
                policy_id: flowlog::DEFAULT_POLICY_ID.into(),
                action: FlowAction::Reject,
                observe: FlowObserve::None,
            },
        );
        p
    }

    /// An IPv4 TCP SYN 10.0.0.1:40000 → 10.3.0.2:7000.
    fn syn() -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend([10, 0, 0, 1, 10, 3, 0, 2]);
        p.extend(40000u16.to_be_bytes());
        p.extend(7000u16.to_be_bytes());
        p.extend([0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        p
    }

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        a.extend(kind.to_ne_bytes());
        a.extend(data);
        a.resize(align4(a.len()), 0);
        a
    }

    #[test]
    fn a_logged_packet_becomes_a_record() {
        let mut body = vec![2, 0];
        body.extend(NET_GROUP.to_be_bytes());
        body.extend(attr(NFULA_PREFIX, b"webbBzx:reject:deny-db\0"));
        body.extend(attr(NFULA_PAYLOAD, &syn()));
        let mut msg = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        msg.extend(((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET).to_ne_bytes());
        msg.extend([0u8; 10]);
        msg.extend(&body);
        let found = messages(&msg);
        assert_eq!(found.len(), 1);
        let (group, prefix, payload) = found[0];
        assert_eq!((group, prefix), (NET_GROUP, "webbBzx:reject:deny-db"));
        let r = record(&prefixes(), group, prefix, payload).expect("a known prefix");
        assert_eq!(r.pu, "web");
        assert_eq!(r.policy_id, "deny-db");
        assert_eq!(r.action, FlowAction::Reject);
        assert_eq!(r.src, "10.0.0.1:40000");
        assert_eq!(r.dst, "10.3.0.2:7000");
        assert_eq!(r.protocol, "tcp");
        assert_eq!(r.direction, FlowDirection::Net);
        let dropped = record(&prefixes(), group, "webbBzx:default:", payload).expect("final drop");
        assert_eq!(
            (dropped.policy_id.as_str(), dropped.action, dropped.observe),
            ("default", FlowAction::Reject, FlowObserve::None)
        );
        assert_eq!(dropped.dst, "10.3.0.2:7000");
        assert!(record(&prefixes(), group, "webbBzx:default-other:", payload).is_none());
        assert!(record(&prefixes(), group, "otherPU:default:", payload).is_none());
    }

    #[test]
    fn a_repeated_packet_of_one_flow_is_logged_once() {
        let r = record(&prefixes(), APP_GROUP, "webbBzx:reject:deny-db", &syn()).unwrap();
        let mut recent = Repeats::default();
        assert!(recent.is_new(&r));
        assert!(!recent.is_new(&r), "a retransmitted SYN");
        let mut other_port = r.clone();
        other_port.src = "10.0.0.1:40001".into();
        assert!(recent.is_new(&other_port), "a new connection");
    }
}
