//! The eBPF side of the flow log: a thread reads `FLOW_EVENTS` (the ring
//! buffer the hooks fill when a logged rule matches, or the final drop
//! refuses a connection) and turns each [`FlowEvent`] into a
//! [`FlowRecord`], naming the slot's PU and the rule's policy from the
//! datapath's tables ([`FlowNames`]; the final drop's
//! [`POLICY_DEFAULT`] is [`DEFAULT_POLICY_ID`]). Repeats of one flow are
//! logged once ([`Repeats`]), except a connect's on an unbound socket:
//! see [`crate::flowlog`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use enforcer_common::maps::{
    ACTION_ACCEPT, DIRECTION_APP, FlowEvent, OBSERVE_APPLY, OBSERVE_CONTINUE, POLICY_DEFAULT,
    PROTO_TCP, PROTO_UDP, is_v4_mapped,
};

use crate::flowlog::{
    self, DEFAULT_POLICY_ID, FlowAction, FlowDirection, FlowObserve, FlowRecord, FlowSender,
    Repeats, endpoint,
};

/// Slot → PU id and policy index → policy id, as the datapath assigned
/// them.
#[derive(Debug, Default)]
pub struct FlowNames {
    pub slots: BTreeMap<u32, String>,
    pub policies: BTreeMap<u32, String>,
}

impl FlowNames {
    /// The record of one event.
    pub fn record(&self, event: &FlowEvent) -> FlowRecord {
        let pu = self
            .slots
            .get(&event.slot)
            .cloned()
            .unwrap_or_else(|| format!("slot-{}", event.slot));
        let policy_id = match event.policy {
            POLICY_DEFAULT => DEFAULT_POLICY_ID.to_string(),
            index => self
                .policies
                .get(&index)
                .cloned()
                .unwrap_or_else(|| format!("policy-{index}")),
        };
        // An unknown source (all zero) of an IPv4 flow is shown as IPv4's
        // unspecified address, as the flow's family.
        let v4 = is_v4_mapped(&event.dst);
        let ip = |a: [u8; 16]| {
            if v4 && a == [0; 16] {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::from(a))
            }
        };
        FlowRecord {
            time: flowlog::now(),
            pu,
            policy_id,
            action: if event.action == ACTION_ACCEPT {
                FlowAction::Accept
            } else {
                FlowAction::Reject
            },
            observe: match event.observe {
                OBSERVE_CONTINUE => FlowObserve::ObserveContinue,
                OBSERVE_APPLY => FlowObserve::ObserveApply,
                _ => FlowObserve::None,
            },
            protocol: flowlog::protocol_name(event.proto),
            src: endpoint(ip(event.src), event.src_port),
            dst: endpoint(ip(event.dst), event.dst_port),
            direction: if event.direction == DIRECTION_APP {
                FlowDirection::App
            } else {
                FlowDirection::Net
            },
            handshake: None,
        }
    }
}

/// The reader thread; stops when dropped.
pub struct FlowReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FlowReader {
    pub fn start(
        mut ring: RingBuf<MapData>,
        names: Arc<Mutex<FlowNames>>,
        sender: FlowSender,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("flowlog-ebpf".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    let mut recent = Repeats::default();
                    while !stop.load(Ordering::Relaxed) {
                        wait_readable(&ring);
                        while let Some(item) = ring.next() {
                            if item.len() < size_of::<FlowEvent>() {
                                continue;
                            }
                            // SAFETY: the item holds at least one FlowEvent,
                            // a Pod written whole by the hooks; read
                            // unaligned from the ring's memory.
                            let event: FlowEvent =
                                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                            drop(item);
                            let record = names.lock().expect("flow names lock").record(&event);
                            if (is_unbound_connect(&event) || recent.is_new(&record))
                                && sender.send(record).is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            })
            .context("starting the eBPF flow-log reader")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// Whether the event is a connect's on an unbound socket: TCP or UDP
/// with no source port, so nothing tells it from the last connect to the
/// same peer, and each is its own decision (never a retransmission).
fn is_unbound_connect(event: &FlowEvent) -> bool {
    event.direction == DIRECTION_APP
        && matches!(event.proto, PROTO_TCP | PROTO_UDP)
        && event.src_port == 0
}

/// Waits up to 100 ms for the ring to have data.
fn wait_readable(ring: &RingBuf<MapData>) {
    let mut pfd = libc::pollfd {
        fd: ring.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack; the fd lives as long as `ring`.
    unsafe { libc::poll(&raw mut pfd, 1, 100) };
}

impl Drop for FlowReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the eBPF flow-log reader panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use enforcer_common::maps::{ACTION_REJECT, DIRECTION_NET, PROTO_TCP};

    use super::*;

    #[test]
    fn events_are_named_from_the_tables() {
        let mut names = FlowNames::default();
        names.slots.insert(3, "web".into());
        names.policies.insert(7, "deny-db".into());
        let mut src = [0u8; 16];
        src[10] = 0xff;
        src[11] = 0xff;
        src[12..].copy_from_slice(&[10, 2, 0, 2]);
        let event = FlowEvent {
            slot: 3,
            policy: 7,
            src,
            dst: "fd00::1".parse::<Ipv6Addr>().unwrap().octets(),
            src_port: 40000,
            dst_port: 7000,
            proto: PROTO_TCP,
            action: ACTION_REJECT,
            observe: OBSERVE_APPLY,
            direction: DIRECTION_NET,
        };
        let r = names.record(&event);
        assert_eq!(r.pu, "web");
        assert_eq!(r.policy_id, "deny-db");
        assert_eq!(r.action, FlowAction::Reject);
        assert_eq!(r.observe, FlowObserve::ObserveApply);
        assert_eq!(r.protocol, "tcp");
        assert_eq!(r.src, "10.2.0.2:40000");
        assert_eq!(r.dst, "[fd00::1]:7000");
        assert_eq!(r.direction, FlowDirection::Net);
        let unknown = FlowNames::default().record(&event);
        assert_eq!(
            (unknown.pu.as_str(), unknown.policy_id.as_str()),
            ("slot-3", "policy-7")
        );
    }

    #[test]
    fn the_final_drop_is_the_default_policy_and_an_unknown_source_keeps_the_family() {
        let mut names = FlowNames::default();
        names.slots.insert(3, "web".into());
        let mut dst = [0u8; 16];
        dst[10] = 0xff;
        dst[11] = 0xff;
        dst[12..].copy_from_slice(&[10, 3, 0, 2]);
        let event = FlowEvent {
            slot: 3,
            policy: POLICY_DEFAULT,
            dst,
            dst_port: 7000,
            proto: PROTO_TCP,
            action: ACTION_REJECT,
            direction: DIRECTION_APP,
            ..FlowEvent::default()
        };
        let r = names.record(&event);
        assert_eq!(r.policy_id, "default");
        assert_eq!(r.action, FlowAction::Reject);
        assert_eq!(r.observe, FlowObserve::None);
        assert_eq!(r.src, "0.0.0.0:0");
        assert_eq!(r.dst, "10.3.0.2:7000");
        assert_eq!(r.direction, FlowDirection::App);
        assert!(is_unbound_connect(&event), "never deduplicated");
        let sendmsg = FlowEvent {
            proto: PROTO_UDP,
            src_port: 40000,
            ..event
        };
        assert_eq!(names.record(&sendmsg).src, "0.0.0.0:40000");
        assert!(!is_unbound_connect(&sendmsg), "one socket's datagrams fold");
        let v6 = FlowEvent {
            dst: "fd00:3::2".parse::<Ipv6Addr>().unwrap().octets(),
            ..event
        };
        assert_eq!(names.record(&v6).src, "[::]:0");
        let net = FlowEvent {
            direction: DIRECTION_NET,
            ..event
        };
        assert!(!is_unbound_connect(&net), "a retransmitted SYN is a repeat");
    }
}
