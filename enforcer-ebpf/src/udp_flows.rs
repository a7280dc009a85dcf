//! UDP flows of a PU's port that one side of its policy opened, and the
//! other way back through them — the fallback's reverse ESTABLISHED
//! accept (SPEC: "UDP accepts add a reverse ESTABLISHED accept on the
//! other side"), which the programs, running without conntrack, keep in
//! `UDP_ANSWERS` (`UdpAnswerKey`):
//! - a peer's datagram that a network ACL accepts (TC ingress) opens the
//!   flow for the PU's answers from that port (the sendmsg and connect
//!   hooks);
//! - a datagram the PU sends from one of its UDP ports that an
//!   application ACL accepts (the sendmsg and connect hooks) opens the
//!   flow for the peer's answers to that port (TC ingress), which would
//!   otherwise be judged as datagrams to the PU's service.
//!
//! Both ways are one idea, so one implementation: [`open`] records, and
//! [`is_open`] checks the window and re-judges the peer by the opening
//! side's ACLs in force (a policy update that refuses the peer ends the
//! flow at once, as the fallback's removal of its conntrack entry does).

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use enforcer_common::maps::{
    DIRECTION_APP, DIRECTION_NET, FlowEvent, PROTO_UDP, SCOPE_TARGET_TCP, SCOPE_TARGET_UDP,
    UDP_ANSWER_REFRESH_NS, UDP_ANSWER_WINDOW_NS, UdpAnswerKey,
};

use crate::{
    maps::UDP_ANSWERS,
    policy::{AclVerdict, Deferral, Side, acl_entry, evaluate, in_set},
};

/// The flow's key; `opened_by` is the side whose ACLs accepted it.
#[inline(always)]
fn key(opened_by: Side, peer: [u8; 16], peer_port: u16, local_port: u16) -> UdpAnswerKey {
    let direction = match opened_by {
        Side::App => DIRECTION_APP,
        Side::Net => DIRECTION_NET,
    };
    UdpAnswerKey::new(peer, peer_port, local_port, direction)
}

/// Records that `opened_by`'s ACLs let a datagram of the flow between
/// `peer`:`peer_port` and the PU's `local_port` through. The time is
/// refreshed at most once per [`UDP_ANSWER_REFRESH_NS`], so a busy flow
/// costs a lookup per datagram, not a write. A full map evicts its least
/// recently used flow.
#[inline(always)]
pub fn open(opened_by: Side, peer: [u8; 16], peer_port: u16, local_port: u16) {
    let key = key(opened_by, peer, peer_port, local_port);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a map lookup with a key on the stack.
    if let Some(&seen) = unsafe { UDP_ANSWERS.get(key) }
        && now.saturating_sub(seen) < UDP_ANSWER_REFRESH_NS
    {
        return;
    }
    let _ = UDP_ANSWERS.insert(key, now, 0);
}

/// Is a datagram between `peer`:`peer_port` and the PU's `local_port`
/// (of `slot`) the other way of a flow `opened_by`'s ACLs opened? It is
/// when the opening side's datagram passed within
/// [`UDP_ANSWER_WINDOW_NS`], and that side's ACLs in force still accept
/// the peer, in its own order: a peer in the target UDP networks is
/// trapped there, never accepted by an ACL; a target TCP peer skips the
/// specific-protocol ACLs. The re-check logs nothing: the opening
/// datagram was logged if its ACL logs.
#[inline(always)]
pub fn is_open(
    opened_by: Side,
    slot: u32,
    peer: &[u8; 16],
    peer_port: u16,
    local_port: u16,
) -> bool {
    let peer = *peer;
    // SAFETY: a map lookup with a key on the stack.
    let Some(&seen) = (unsafe { UDP_ANSWERS.get(key(opened_by, peer, peer_port, local_port)) })
    else {
        return false;
    };
    // SAFETY: a helper without arguments.
    if unsafe { bpf_ktime_get_ns() }.saturating_sub(seen) > UDP_ANSWER_WINDOW_NS {
        return false;
    }
    if in_set(SCOPE_TARGET_UDP, peer) {
        return false;
    }
    let Some(entry) = acl_entry(opened_by, slot, peer) else {
        return false;
    };
    // The port an ACL of the opening side names: the PU's own for a
    // network ACL, the peer's for an application ACL.
    let port = match opened_by {
        Side::Net => local_port,
        Side::App => peer_port,
    };
    let flow = FlowEvent {
        slot,
        proto: PROTO_UDP,
        ..FlowEvent::default()
    };
    // One walk: the specific-protocol rules come first in the entry, so
    // the first rule that decides over both groups is what the opening
    // side's two walks in turn would find.
    let first = match in_set(SCOPE_TARGET_TCP, peer) {
        true => entry.specific,
        false => 0,
    };
    let count = entry.specific + entry.any - first;
    evaluate(entry, first, count, port, &flow, &mut Deferral::silent()) == Some(AclVerdict::Accept)
}

/// [`is_open`] as a subprogram of its own, for TC ingress: its frame and
/// the ACL walk's callback share the verifier's 512-byte stack limit, and
/// this check's temporaries inlined there would not fit (see `ingress`).
/// The sock_addr hooks inline it.
#[inline(never)]
pub fn is_open_outlined(
    opened_by: Side,
    slot: u32,
    peer: &[u8; 16],
    peer_port: u16,
    local_port: u16,
) -> bool {
    is_open(opened_by, slot, peer, peer_port, local_port)
}
