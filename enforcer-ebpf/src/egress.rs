//! `cgroup_skb` egress, attached to each linux-process PU's cgroup and
//! (as `enforcer_host_egress`) to the host scope, as the sock_addr hooks
//! are (see `connect`; [`judging_pu`] picks the one PU that judges): the
//! application side of a PU's policy for what the sock_addr hooks never
//! see — ICMP from ping and raw sockets, and every other protocol but TCP
//! and UDP (whose sockets the connect and sendmsg hooks judge). It runs
//! after netfilter, so it can only let a packet go or drop it
//! (ARCHITECTURE.md), which is all these protocols need: nothing of them
//! is trapped.
//!
//! For such a packet, in SPEC's order ("Order of evaluation inside a PU",
//! outgoing), as the fallback's chain does:
//! 1. a destination in the excluded networks is never touched;
//! 2. if the destination is not a target TCP network, the
//!    specific-protocol ACLs (an `icmp` ACL matches IPv4's ICMP, an
//!    `icmpv6` one IPv6's) in bucket order;
//! 3. ICMPv6 is accepted (IPv6 only: neighbour discovery and path MTU
//!    must work whatever the ACLs);
//! 4. an ICMP answer (echo reply, error) passes, where the fallback's
//!    chain accepts ESTABLISHED and RELATED packets: the kernel answers
//!    pings and sends errors from sockets of its own, which a host scope
//!    at the cgroup root holds;
//! 5. the protocol-any ACLs;
//! 6. anything else is dropped.
//!
//! For TCP and UDP it only completes the hooks' flow-log events: a
//! connect or sendmsg hook runs before routing (and, for TCP, the bind),
//! so it holds the events of a decision it lets through back until the
//! socket's first packet passes here with the source address and port
//! (`policy::Deferral`).
//!
//! Each packet is judged by the policy in force (there is no connection
//! state here): a policy update applies to the next echo request.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_socket_cookie, bpf_get_socket_uid, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use enforcer_common::maps::{
    DIRECTION_APP, FlowEvent, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, SCOPE_EXCLUDED, SCOPE_TARGET_TCP,
    is_v4_mapped,
};

use crate::{
    packet::{self, L4, Parsed, is_icmp_answer},
    policy::{
        AclVerdict, Count, Deferral, Scope, Side, acl_entry, count, evaluate, in_agent_netns,
        in_set, judging_pu, log_final_drop, pu_of_cgroup, take_pending,
    },
};

const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb]
pub fn enforcer_egress(ctx: SkBuffContext) -> i32 {
    egress(&ctx, Scope::PuCgroup)
}

#[cgroup_skb]
pub fn enforcer_host_egress(ctx: SkBuffContext) -> i32 {
    egress(&ctx, Scope::Host)
}

#[inline(always)]
fn egress(ctx: &SkBuffContext, scope: Scope) -> i32 {
    if hooked_transport(ctx) {
        // Whichever program runs first takes the held-back events; the
        // other finds none.
        log_held_back(ctx);
        return PASS;
    }
    match packet::parse_ip(ctx) {
        Parsed::L4(l4) if l4.proto != PROTO_TCP && l4.proto != PROTO_UDP => decide(ctx, &l4, scope),
        // Headers this program cannot read whole (a raw socket's own IP
        // header, a runaway extension-header chain) never get a more
        // permissive verdict than a readable packet: a PU's is dropped.
        Parsed::Malformed => match pu_slot(ctx, scope) {
            Some(slot) => {
                count(slot, Count::Dropped);
                DROP
            }
            None => PASS,
        },
        // TCP and UDP: judged by the sock_addr hooks. Later fragments
        // follow their first; the kernel built what it cannot read.
        _ => PASS,
    }
}

/// The flow events a connect or sendmsg hook held back for this packet's
/// socket, now that its source is known: the first packet (a SYN, a
/// datagram) carries the address the route picked and the port the bind
/// did.
#[inline(always)]
fn log_held_back(ctx: &SkBuffContext) {
    take_pending(
        // SAFETY: the program's own context; `skb->sk` is the sending
        // socket, the one whose cookie the hook had.
        || unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) },
        || match packet::parse_ip(ctx) {
            Parsed::L4(l4) => Some((l4.src, l4.src_port)),
            _ => None,
        },
    );
}

/// Is this TCP or UDP by its fixed IP header alone? Those are the
/// sock_addr hooks' business, and nearly every packet of a PU is one: two
/// reads, and no full parse, on the common path. (IPv6 TCP or UDP behind
/// extension headers takes the full parse, which says the same.)
#[inline(always)]
fn hooked_transport(ctx: &SkBuffContext) -> bool {
    let proto = match ctx.load::<u8>(0).map(|first| first >> 4) {
        Ok(4) => ctx.load::<u8>(9),
        Ok(6) => ctx.load::<u8>(6),
        _ => return false,
    };
    matches!(proto, Ok(PROTO_TCP | PROTO_UDP))
}

/// The PU that judges a packet of the agent's network namespace from
/// `scope` ([`judging_pu`]), by the sending socket's cgroup and owner.
/// These protocols have no port: a host-service PU never claims them.
#[inline(always)]
fn pu_slot(ctx: &SkBuffContext, scope: Scope) -> Option<u32> {
    let skb = ctx.skb.skb;
    if !in_agent_netns(skb.cast()) {
        return None;
    }
    let cgroup = || {
        // SAFETY: helpers on the program's own context; 0 means none.
        let own = unsafe { bpf_skb_cgroup_id(skb) };
        pu_of_cgroup(own, |level| unsafe {
            bpf_skb_ancestor_cgroup_id(skb, level)
        })
    };
    // SAFETY: as above; the overflow uid when there is no socket.
    let uid = || unsafe { bpf_get_socket_uid(skb) };
    judging_pu(scope, cgroup, uid, None)
}

#[inline(always)]
fn decide(ctx: &SkBuffContext, l4: &L4, scope: Scope) -> i32 {
    let Some(slot) = pu_slot(ctx, scope) else {
        return PASS;
    };
    if in_set(SCOPE_EXCLUDED, l4.dst) {
        return PASS;
    }
    let entry = acl_entry(Side::App, slot, l4.dst);
    let flow = FlowEvent {
        slot,
        src: l4.src,
        dst: l4.dst,
        proto: l4.proto,
        direction: DIRECTION_APP,
        ..FlowEvent::default()
    };
    if !in_set(SCOPE_TARGET_TCP, l4.dst)
        && let Some(entry) = entry
        && let Some(verdict) = evaluate(entry, 0, entry.specific, 0, &flow, &mut Deferral::none())
    {
        return apply(slot, verdict);
    }
    if l4.proto == PROTO_ICMPV6 && !is_v4_mapped(&l4.dst) {
        return PASS;
    }
    if is_icmp_answer(l4.proto, l4.icmp_type) {
        return PASS;
    }
    if let Some(entry) = entry
        && let Some(verdict) = evaluate(
            entry,
            entry.specific,
            entry.any,
            0,
            &flow,
            &mut Deferral::none(),
        )
    {
        return apply(slot, verdict);
    }
    log_final_drop(&flow);
    count(slot, Count::Dropped);
    DROP
}

#[inline(always)]
fn apply(slot: u32, verdict: AclVerdict) -> i32 {
    match verdict {
        AclVerdict::Accept => {
            count(slot, Count::Accepted);
            PASS
        }
        AclVerdict::Reject => {
            count(slot, Count::Dropped);
            DROP
        }
    }
}
