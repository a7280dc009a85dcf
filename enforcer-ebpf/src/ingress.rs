//! TC ingress, attached to every interface of the agent's network
//! namespace: the network side of a PU's policy (SPEC, "Order of
//! evaluation inside a PU", incoming), decided before netfilter.
//!
//! A packet is for a PU when its destination port is one of the PU's
//! listening ports (`PU_PORTS`: linux-process, uid and host-service PUs);
//! any other packet is the namespace-wide PU's, if there is one (the host
//! PU, or the container PU of a remote-container or sidecar agent). For
//! those, in SPEC's order:
//! 1. a source in the excluded networks is never touched;
//! 2. TCP: only connection set-up (SYN without ACK) is judged here — TC
//!    runs before conntrack, and a connection whose SYN was dropped never
//!    exists; the rest follows the connection;
//! 3. if the source is not a target TCP network, the specific-protocol
//!    network ACLs in bucket order: accept classes the packet `AclAccept`,
//!    reject drops it;
//! 4. TCP from a target TCP network, UDP from a target UDP network: the
//!    packet is classed for the trap and a fixed netfilter rule in INPUT
//!    queues it;
//! 5. the protocol-any network ACLs;
//! 6. anything else is dropped, and logged (policy `default`).
//!
//! Before all of it, a packet carrying the proxy mark (the proxy's own
//! connection, on `lo`) passes, and a TCP packet to an exposed port goes
//! to the PU's proxy ([`crate::exposed`]).
//!
//! Before 4, ICMPv6 is let in (neighbour discovery), and a sidecar lets DNS
//! answers (UDP from port 53) in, as the seed does. A refusal for a port
//! PU drops the packet here; one for the namespace-wide PU is left to a
//! fixed rule in INPUT (class `RefuseNew`), which drops it unless
//! conntrack knows its flow — see [`Refusal`].
//!
//! A UDP datagram a network ACL accepts also lets the PU answer its
//! sender from that port for a while (`udp_flows`, read by the sendmsg
//! and connect hooks): the fallback's reverse ESTABLISHED accept. The
//! mirror: answers to a datagram the PU sent from one of its UDP ports to
//! a peer an application ACL accepts come in to that port for a while
//! (`udp_flows`, written by those hooks), whatever the network ACLs say.
//!
//! Fragments after the first carry no ports and pass: the first fragment
//! carries them and is judged, and a datagram never reassembles without
//! it — so a fragmented datagram gets the verdict of its first fragment,
//! the same as unfragmented. A packet whose headers cannot be read whole
//! is dropped: it never gets a more permissive verdict than a well-formed
//! one (and the stack would discard it anyway).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use enforcer_common::{
    maps::{
        DIRECTION_NET, DNS_PORT, FlowEvent, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PortKey,
        SCOPE_EXCLUDED, SCOPE_TARGET_TCP, SCOPE_TARGET_UDP, is_v4_mapped,
    },
    marks::{Class, Kind},
};

use crate::{
    exposed,
    packet::{self, L4, Parsed},
    policy::{
        AclVerdict, Count, Deferral, Side, acl_entry, allow_dns, count, evaluate, fallback_pu,
        in_set, log_final_drop, mark_layout, port_pu,
    },
    udp_flows,
};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[classifier]
pub fn enforcer_ingress(ctx: TcContext) -> i32 {
    match packet::parse(&ctx) {
        Parsed::NotIp | Parsed::LaterFragment => TC_ACT_OK,
        Parsed::Malformed => TC_ACT_SHOT,
        Parsed::L4(l4) => decide(&ctx, &l4),
    }
}

/// Whose the packet is, and the checks before its ACLs. This, the check
/// of an answer ([`udp_flows::is_open_outlined`]) and [`judge`] are
/// subprograms of their own, not inlined: a frame stacks only on the
/// frames of its callers under the verifier's 512-byte limit for a call
/// chain (the ACL walk's callback included), so the answer check's and
/// the judgement's never add up.
#[inline(never)]
fn decide(ctx: &TcContext, l4: &L4) -> i32 {
    if is_proxy(ctx) {
        // SPEC, "Global steering": the proxy's own traffic first, never
        // redirected again nor judged (on `lo`, the proxy's socket mark
        // is still the packet's).
        return TC_ACT_OK;
    }
    if l4.proto == PROTO_TCP
        && let Some(service) = exposed::service(l4.dst_port)
    {
        return exposed::steer(ctx, l4, service);
    }
    let ported = l4.proto == PROTO_TCP || l4.proto == PROTO_UDP;
    let by_port = match ported {
        true => port_pu(PortKey::new(l4.proto, l4.dst_port)),
        false => None,
    };
    let (slot, refusal) = match by_port.map(|slot| (slot, Refusal::Drop)) {
        Some(found) => found,
        None => match fallback_pu() {
            // No PU's port: the namespace-wide PU's packet. Every protocol
            // is judged (ICMP too, which no port PU ever sees).
            Some(slot) => (slot, Refusal::UnlessKnown),
            None => return TC_ACT_OK,
        },
    };
    if in_set(SCOPE_EXCLUDED, l4.src) {
        return TC_ACT_OK;
    }
    // An answer to what the PU sent from this port to an ACL-accepted
    // peer: the fallback's reverse ESTABLISHED accept. (The namespace-wide
    // PU's answers are conntrack's business, see `Refusal::UnlessKnown`.)
    if l4.proto == PROTO_UDP
        && refusal == Refusal::Drop
        && udp_flows::is_open_outlined(Side::App, slot, &l4.src, l4.src_port, l4.dst_port)
    {
        set_class(ctx, Class::AclAccept);
        count(slot, Count::Accepted);
        return TC_ACT_OK;
    }
    judge(ctx, l4, slot, refusal)
}

/// The rest of [`decide`], SPEC's order from step 2 on.
#[inline(never)]
fn judge(ctx: &TcContext, l4: &L4, slot: u32, refusal: Refusal) -> i32 {
    if l4.proto == PROTO_TCP && l4.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return TC_ACT_OK;
    }
    let entry = acl_entry(Side::Net, slot, l4.src);
    let target_tcp = in_set(SCOPE_TARGET_TCP, l4.src);
    // One for both walks: every byte of this frame counts (the verifier
    // allows 512 for it and the ACL walk's callback together).
    let mut no_deferral = Deferral::none();
    let flow = FlowEvent {
        slot,
        src: l4.src,
        dst: l4.dst,
        src_port: l4.src_port,
        dst_port: l4.dst_port,
        proto: l4.proto,
        direction: DIRECTION_NET,
        ..FlowEvent::default()
    };
    if !target_tcp
        && let Some(entry) = entry
        && let Some(verdict) = evaluate(
            entry,
            0,
            entry.specific,
            l4.dst_port,
            &flow,
            &mut no_deferral,
        )
    {
        return apply(ctx, l4, slot, verdict, refusal);
    }
    if l4.proto == PROTO_ICMPV6 && !is_v4_mapped(&l4.src) {
        // Neighbour discovery and path MTU work whatever the ACLs.
        return TC_ACT_OK;
    }
    if allow_dns() && l4.proto == PROTO_UDP && l4.src_port == DNS_PORT {
        return TC_ACT_OK;
    }
    if (l4.proto == PROTO_TCP && target_tcp)
        || (l4.proto == PROTO_UDP && in_set(SCOPE_TARGET_UDP, l4.src))
    {
        let class = if l4.proto == PROTO_TCP {
            Class::TrapTcp
        } else {
            Class::TrapUdp
        };
        set_class(ctx, class);
        count(slot, Count::Trapped);
        return TC_ACT_OK;
    }
    if let Some(entry) = entry
        && let Some(verdict) = evaluate(
            entry,
            entry.specific,
            entry.any,
            l4.dst_port,
            &flow,
            &mut no_deferral,
        )
    {
        return apply(ctx, l4, slot, verdict, refusal);
    }
    if refusal.counted(l4.proto) {
        log_final_drop(&flow);
        count(slot, Count::Dropped);
    }
    refuse(ctx, refusal)
}

/// How a refusal is carried out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Here: the packet is for a PU's listening port, so it starts
    /// something (a TCP SYN, a datagram to a service).
    Drop,
    /// By the fixed rule in INPUT, unless conntrack knows the flow: a
    /// packet of the namespace-wide PU may answer what the PU sent (a
    /// datagram back, an ICMP error), which the fallback's chain accepts
    /// as ESTABLISHED or RELATED; and only a packet for this host reaches
    /// INPUT, so what the host forwards is never the PU's.
    UnlessKnown,
}

impl Refusal {
    /// Whether a refusal is counted and logged here. A deferred one is
    /// only for a TCP SYN, which always starts a connection; any other
    /// packet may yet turn out to be an answer that conntrack lets in.
    #[inline(always)]
    fn counted(self, proto: u8) -> bool {
        self == Refusal::Drop || proto == PROTO_TCP
    }
}

#[inline(always)]
fn refuse(ctx: &TcContext, refusal: Refusal) -> i32 {
    match refusal {
        Refusal::Drop => TC_ACT_SHOT,
        Refusal::UnlessKnown => {
            set_class(ctx, Class::RefuseNew);
            TC_ACT_OK
        }
    }
}

#[inline(always)]
fn apply(ctx: &TcContext, l4: &L4, slot: u32, verdict: AclVerdict, refusal: Refusal) -> i32 {
    match verdict {
        AclVerdict::Accept => {
            // Only a port PU's service answers from its port; the
            // namespace-wide PU's answers are conntrack's business.
            if l4.proto == PROTO_UDP && refusal == Refusal::Drop {
                udp_flows::open(Side::Net, l4.src, l4.src_port, l4.dst_port);
            }
            set_class(ctx, Class::AclAccept);
            count(slot, Count::Accepted);
            TC_ACT_OK
        }
        AclVerdict::Reject => {
            if refusal.counted(l4.proto) {
                count(slot, Count::Dropped);
            }
            refuse(ctx, refusal)
        }
    }
}

/// Does the packet carry the proxy kind (`Kind::Proxy`)?
#[inline(always)]
fn is_proxy(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let layout = mark_layout();
    mark & layout.kind_mask() == layout.kind(Kind::Proxy)
}

/// Writes the class into `skb->mark`, keeping every other bit.
#[inline(always)]
fn set_class(ctx: &TcContext, class: Class) {
    // SAFETY: reading a field of the program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark_layout().with_class(mark, class));
}
