//! The fallback's side of the flow log: a thread bound to the NFLOG groups
//! of the PU chains' log rules (10 app, 11 net) over `NETLINK_NETFILTER`
//! reads each logged packet, turns its prefix (`<short>:<tag>:<policy>`,
//! [`crate::naming::nflog_prefix`]) back into the PU and ACL that logged
//! it ([`Prefixes`], kept by the datapath; a PU's `<short>:default:`
//! final drop stands for policy `default`, action reject) and its payload
//! into the 5-tuple ([`crate::trap::packet::parse`]).
//!
//! The netlink protocol is small: a bind command and a copy mode per
//! group, then `NFULNL_MSG_PACKET` messages read, of which only the prefix
//! and payload attributes are used; the framing is [`crate::netlink`]'s.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::flowlog::{
    self, FlowAction, FlowDirection, FlowObserve, FlowRecord, FlowSender, Repeats, endpoint,
};
use crate::netlink::{self as nl, Builder, NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST};
use crate::trap::packet::{self, L4};

/// The groups, as the rules name them ([`super::rules::nflog_group`]).
pub const APP_GROUP: u16 = 10;
pub const NET_GROUP: u16 = 11;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
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
        handshake: None,
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

fn read(socket: &nl::Socket, prefixes: &Mutex<Prefixes>, sender: &FlowSender, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    let mut recent = Repeats::default();
    while !stop.load(Ordering::Relaxed) {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                // The receive timeout: look at the stop flag again.
                Some(libc::EAGAIN) => continue,
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
            },
        };
        for (group, prefix, payload) in messages(&buf[..n]) {
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

/// The logged packets in one datagram: (group, prefix, payload). A
/// malformed message ends the walk; a malformed attribute ends its
/// message's attributes (what came before it is kept).
fn messages(buf: &[u8]) -> Vec<(u16, &str, &[u8])> {
    let packet = nl::nfnl_type(NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET);
    nl::messages(buf)
        .map_while(Result::ok)
        .filter(|msg| msg.kind == packet)
        .filter_map(|msg| {
            let (group, attrs) = msg.netfilter()?;
            let (mut prefix, mut payload) = ("", &[][..]);
            for attr in attrs.map_while(Result::ok) {
                match attr.kind {
                    NFULA_PREFIX => {
                        let data = attr.data;
                        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                        prefix = std::str::from_utf8(&data[..end]).unwrap_or("");
                    }
                    NFULA_PAYLOAD => payload = attr.data,
                    _ => {}
                }
            }
            Some((group, prefix, payload))
        })
        .collect()
}

/// A netlink socket bound to `groups`, copying packets, with a receive
/// timeout so the reader sees its stop flag.
fn bind(groups: &[u16]) -> anyhow::Result<nl::Socket> {
    let socket =
        nl::Socket::open(NETLINK_NETFILTER, false).context("opening a netfilter netlink socket")?;
    socket
        .set_recv_timeout(Duration::from_millis(100))
        .context("setting the NFLOG socket's receive timeout")?;
    // Best effort: the default buffer only loses more under a burst.
    let _ = socket.set_int(libc::SOL_SOCKET, libc::SO_RCVBUF, 1 << 20);
    for &group in groups {
        request(&socket, group, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])
            .with_context(|| format!("binding NFLOG group {group}"))?;
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend([NFULNL_COPY_PACKET, 0]);
        request(&socket, group, NFULA_CFG_MODE, &mode)
            .with_context(|| format!("setting the copy mode of NFLOG group {group}"))?;
    }
    Ok(socket)
}

/// Sends one config message with one attribute and waits for its ack.
fn request(socket: &nl::Socket, group: u16, attr: u16, data: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::new();
    let mut b = Builder::netfilter(
        &mut msg,
        NFNL_SUBSYS_ULOG,
        NFULNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        group,
    );
    b.attr(attr, data);
    b.finish();
    socket.request(&mut msg)
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

    #[test]
    fn a_logged_packet_becomes_a_record() {
        let mut msg = Vec::new();
        let mut b = Builder::netfilter(&mut msg, NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET, 0, NET_GROUP);
        b.attr(NFULA_PREFIX, b"webbBzx:reject:deny-db\0")
            .attr(NFULA_PAYLOAD, &syn());
        b.finish();
        // A config message of no interest and a cut one after it.
        let mut b = Builder::netfilter(&mut msg, NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG, 0, 1);
        b.attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
        b.finish();
        let cut = msg[..20].to_vec();
        msg.extend(cut);
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
