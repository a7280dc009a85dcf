//! The eBPF side of the flow log: a thread reads `FLOW_EVENTS` (the ring
//! buffer the hooks fill when a logged rule matches) and turns each
//! [`FlowEvent`] into a [`FlowRecord`], naming the slot's PU and the
//! rule's policy from the datapath's tables ([`FlowNames`]).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
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
    ACTION_ACCEPT, DIRECTION_APP, FlowEvent, OBSERVE_APPLY, OBSERVE_CONTINUE,
};

use crate::flowlog::{
    self, FlowAction, FlowDirection, FlowObserve, FlowRecord, FlowSender, endpoint,
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
        let policy_id = self
            .policies
            .get(&event.policy)
            .cloned()
            .unwrap_or_else(|| format!("policy-{}", event.policy));
        let ip = |a: [u8; 16]| IpAddr::V6(Ipv6Addr::from(a));
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
                            if sender.send(record).is_err() {
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
}
