//! Flow logs: one structured line per logged decision, the same for both
//! datapaths (SPEC, "Observable behaviour": a decision is logged with its
//! PU, policy id and action).
//!
//! A datapath turns what the kernel reports (the eBPF ring buffer, NFLOG
//! in the fallback) into [`FlowRecord`]s and sends them on the channel the
//! agent gave it ([`crate::datapath::Datapath::set_flow_log`]); the
//! agent's [`FlowLogWriter`] thread writes each as one JSON object per
//! line, to stdout or appended to the configured file.
//!
//! What is logged, on both datapaths:
//! - an ACL with `log = true` that decides, and every observe-continue or
//!   observe-apply ACL that matches (observe-continue is logged with its
//!   own action and `observe-continue` while a later rule decides);
//! - the final drop (SPEC, "Order of evaluation inside a PU": "log NEW and
//!   log-and-drop everything else"): a new connection (or datagram) that
//!   no ACL decided and that is not trapped is refused and logged with
//!   policy id [`DEFAULT_POLICY_ID`] (the seed's `default` log prefix),
//!   action `reject`, observe `none`. Nothing reaches the end of a PU's
//!   rules and is accepted, so "log NEW" never logs an accepted flow. The
//!   fallback's second final log (`default-other`: a packet of a
//!   connection that is not new, e.g. one conntrack no longer knows) is a
//!   packet drop, not a flow decision, and has no eBPF equivalent (TC
//!   judges only connection set-up there): it writes no line.
//!
//! A flow is logged once per decision. NFLOG sees every packet (a refused
//! SYN's retransmissions too) and the TC hook every SYN, so records of
//! one 5-tuple repeated within a minute are dropped ([`Repeats`]).
//!
//! App-side records carry the PU's source address and port on both
//! datapaths for every flow whose packets leave. The eBPF connect and
//! sendmsg hooks decide before the kernel routes the first packet (and,
//! for a TCP connect on an unbound socket, binds it), so they hold the
//! events of a decision that lets the flow through back, by socket
//! cookie, and the PU's egress program completes them from the socket's
//! first packet (the SYN, the datagram) and puts them on the ring. A
//! flow the eBPF hooks refuse never has a packet: its record carries the
//! family's unspecified address, with the port when the socket is bound
//! (always for sendmsg, as UDP binds before its hook; for connect only if
//! the application bound it), 0 otherwise. The fallback's refusal is a
//! drop in OUTPUT, after the SYN was built, so NFLOG sees its source. Two
//! refused connects from a PU's unbound sockets to one peer are then
//! indistinguishable on eBPF, and each is its own decision, so those
//! records are never folded. A let-through connection whose first packet
//! never leaves (its route lookup fails after the hook, the trap drops
//! its SYN) writes no app-side line on eBPF; its held-back events age out
//! of an LRU map.

use std::{
    collections::HashMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError, Sender, channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::policy::FlowLogOutput;

/// The policy id of the final drop's records.
pub const DEFAULT_POLICY_ID: &str = "default";

/// Where records go: the sending half of the agent's flow-log channel.
pub type FlowSender = Sender<FlowRecord>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowAction {
    Accept,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowObserve {
    None,
    ObserveContinue,
    ObserveApply,
}

/// `app`: the PU's outgoing traffic; `net`: its incoming traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowDirection {
    App,
    Net,
}

/// One logged decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC, millisecond precision.
    pub time: String,
    pub pu: String,
    pub policy_id: String,
    pub action: FlowAction,
    pub observe: FlowObserve,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub protocol: String,
    /// `ip:port` (`[ip]:port` for IPv6); an unknown address is the
    /// unspecified one, an unknown port 0.
    pub src: String,
    pub dst: String,
    pub direction: FlowDirection,
    /// A decision of the identity handshake (the trap consumer's): why,
    /// and who was on each side. Absent from the datapaths' records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake: Option<HandshakeLog>,
}

/// The identity side of a handshake decision (docs/identity.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandshakeLog {
    /// `allowed`, `not-allowed-by-policy`, `no-token`, `bad-signature`,
    /// `untrusted-key`, `replayed`, `expired`, … (the counters' names).
    pub reason: String,
    /// The PU's own labels (`app=web,env=prod`; `-` for none).
    pub labels: String,
    /// The peer's labels, from its verified token; absent when no token
    /// verified (the peer's identity is then unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_labels: Option<String>,
    /// The key id of the agent that signed the peer's token (tokens name
    /// the signing agent and the PU's labels, not the peer agent's
    /// private PU id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_agent: Option<String>,
}

impl FlowRecord {
    /// The line written for this record, without the newline.
    pub fn line(&self) -> String {
        serde_json::to_string(self).expect("a flow record always serializes")
    }
}

/// The protocol's name in a record.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// An address as a record writes it; IPv4-mapped IPv6 addresses are shown
/// as IPv4.
pub fn endpoint(ip: IpAddr, port: u16) -> String {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    SocketAddr::new(ip, port).to_string()
}

/// `t` as RFC 3339 in UTC, with milliseconds: `2026-01-02T03:04:05.678Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The current time as a record writes it.
pub fn now() -> String {
    rfc3339(SystemTime::now())
}

/// A refused SYN's retransmissions (or the datagrams of one UDP flow) hit
/// the datapath again: a flow is logged once per decision. Same PU,
/// policy, action, direction and 5-tuple within this window: not logged
/// again.
const REPEAT_WINDOW: Duration = Duration::from_secs(60);
/// Flows remembered for [`REPEAT_WINDOW`] before old ones are dropped.
const MAX_REMEMBERED: usize = 4096;

/// The flows a reader logged lately.
#[derive(Default)]
pub struct Repeats {
    seen: HashMap<String, Instant>,
}

impl Repeats {
    /// Whether `record` is new (and remembers it).
    pub fn is_new(&mut self, record: &FlowRecord) -> bool {
        let now = Instant::now();
        let key = format!(
            "{} {} {:?} {:?} {} {} {}",
            record.pu,
            record.policy_id,
            record.action,
            record.direction,
            record.protocol,
            record.src,
            record.dst
        );
        if self
            .seen
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < REPEAT_WINDOW)
        {
            return false;
        }
        if self.seen.len() >= MAX_REMEMBERED {
            self.seen
                .retain(|_, t| now.duration_since(*t) < REPEAT_WINDOW);
            if self.seen.len() >= MAX_REMEMBERED {
                self.seen.clear();
            }
        }
        self.seen.insert(key, now);
        true
    }
}

/// The agent's flow-log writer: a thread that writes every record it
/// receives, until stopped or every sender is gone.
pub struct FlowLogWriter {
    sender: Option<FlowSender>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FlowLogWriter {
    /// Opens the output (a file is created if missing and appended to) and
    /// starts the writer thread.
    pub fn start(output: &FlowLogOutput) -> Result<Self> {
        let mut out: Box<dyn Write + Send> = match output {
            FlowLogOutput::Stdout => Box::new(std::io::stdout()),
            FlowLogOutput::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening the flow log {}", path.display()))?,
            ),
        };
        let (sender, receiver): (FlowSender, Receiver<FlowRecord>) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("flowlog".into())
            .spawn({
                let stop = stop.clone();
                move || write_until_stopped(&receiver, &mut out, &stop)
            })
            .context("starting the flow-log thread")?;
        Ok(Self {
            sender: Some(sender),
            stop,
            thread: Some(thread),
        })
    }

    /// A sender for a datapath.
    pub fn sender(&self) -> FlowSender {
        self.sender.clone().expect("present until stop")
    }

    /// Writes what was sent so far, then stops the thread.
    pub fn stop(mut self) {
        self.sender = None;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the flow-log thread panicked");
        }
    }
}

fn write_until_stopped(receiver: &Receiver<FlowRecord>, out: &mut dyn Write, stop: &AtomicBool) {
    let mut write = |record: FlowRecord| {
        let mut line = record.line();
        line.push('\n');
        // One write per line, so concurrent appenders never interleave
        // inside a line.
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            tracing::warn!("writing the flow log: {e}");
        }
    };
    loop {
        match receiver.recv_timeout(POLL) {
            Ok(record) => write(record),
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Relaxed) => {
                while let Ok(record) = receiver.try_recv() {
                    write(record);
                }
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// How often the writer looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> FlowRecord {
        FlowRecord {
            time: rfc3339(UNIX_EPOCH + Duration::from_millis(1_767_323_045_678)),
            pu: "web".into(),
            policy_id: "allow-dns".into(),
            action: FlowAction::Accept,
            observe: FlowObserve::ObserveContinue,
            protocol: protocol_name(6),
            src: endpoint("::ffff:10.0.0.1".parse().unwrap(), 40000),
            dst: endpoint("fd00::2".parse().unwrap(), 53),
            direction: FlowDirection::App,
            handshake: None,
        }
    }

    #[test]
    fn line_is_one_json_object_with_every_field() {
        assert_eq!(
            record().line(),
            r#"{"time":"2026-01-02T03:04:05.678Z","pu":"web","policy_id":"allow-dns","action":"accept","observe":"observe-continue","protocol":"tcp","src":"10.0.0.1:40000","dst":"[fd00::2]:53","direction":"app"}"#
        );
    }

    #[test]
    fn a_handshake_decision_carries_both_identities() {
        let mut r = record();
        r.handshake = Some(HandshakeLog {
            reason: "allowed".into(),
            labels: "app=web".into(),
            peer_labels: Some("app=db,env=prod".into()),
            peer_agent: Some("0011223344556677".into()),
        });
        let v: serde_json::Value = serde_json::from_str(&r.line()).unwrap();
        assert_eq!(v["handshake"]["reason"], "allowed");
        assert_eq!(v["handshake"]["peer_labels"], "app=db,env=prod");
        assert_eq!(v["handshake"]["peer_agent"], "0011223344556677");
        r.handshake.as_mut().unwrap().peer_labels = None;
        assert!(!r.line().contains("peer_labels"));
    }

    #[test]
    fn enums_render_as_documented() {
        let mut r = record();
        r.action = FlowAction::Reject;
        r.observe = FlowObserve::None;
        r.direction = FlowDirection::Net;
        r.protocol = protocol_name(132);
        let v: serde_json::Value = serde_json::from_str(&r.line()).unwrap();
        assert_eq!(v["action"], "reject");
        assert_eq!(v["observe"], "none");
        assert_eq!(v["direction"], "net");
        assert_eq!(v["protocol"], "132");
        r.observe = FlowObserve::ObserveApply;
        assert!(r.line().contains(r#""observe":"observe-apply""#));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(1_709_208_000);
        assert_eq!(rfc3339(t), "2024-02-29T12:00:00.000Z");
    }

    #[test]
    fn writer_appends_lines_to_the_file() {
        let dir = std::env::temp_dir().join(format!("flowlog-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.log");
        std::fs::write(&path, "earlier\n").unwrap();
        let writer = FlowLogWriter::start(&FlowLogOutput::File(path.clone())).unwrap();
        let tx = writer.sender();
        tx.send(record()).unwrap();
        tx.send(record()).unwrap();
        drop(tx);
        writer.stop();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "earlier");
        assert_eq!(lines[1], record().line());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
