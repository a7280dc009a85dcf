//! `cgroup_skb` egress, attached to each linux-process PU's cgroup and
//! (as `enforcer_host_egress`) to the host scope, as the sock_addr hooks
//! are (see `connect`; [`judging_pu`] picks the one PU that judges): the
//! application side of a PU's policy for what the sock_addr hooks never
//! see — ICMP from ping and raw sockets, every other protocol but TCP
//! and UDP, and TCP and UDP that a raw socket (`SOCK_RAW`, CAP_NET_RAW)
//! builds itself: the connect and sendmsg hooks judge only TCP and UDP
//! sockets, so a hand-built SYN or datagram would otherwise skip the
//! PU's ACLs, where the fallback's chain judges it like any packet. It
//! runs after netfilter, so it can only let a packet go or drop it
//! (ARCHITECTURE.md); nothing it judges is trapped.
//!
//! For such a packet, in SPEC's order ("Order of evaluation inside a PU",
//! outgoing), as the fallback's chain does:
//! 1. a destination in the excluded networks is never touched;
//! 2. if the destination is not a target TCP network, the
//!    specific-protocol ACLs (an `icmp` ACL matches IPv4's ICMP, an
//!    `icmpv6` one IPv6's; a `tcp` or `udp` one the raw packet's
//!    destination port) in bucket order;
//! 3. ICMPv6 is accepted (IPv6 only: neighbour discovery and path MTU
//!    must work whatever the ACLs);
//! 4. a sidecar's DNS (UDP to port 53) passes;
//! 5. a packet of a flow conntrack knows passes, where the fallback's
//!    chain accepts ESTABLISHED and RELATED packets: a fixed rule in
//!    OUTPUT classes such ICMP packets `KnownFlow` (an echo reply, an
//!    error about a flow — the kernel sends them from sockets of its own,
//!    which a host scope at the cgroup root holds). The ICMP type alone
//!    proves nothing: a raw socket writes any type it likes;
//! 6. raw TCP to a target TCP network, raw UDP to a target UDP network is
//!    dropped: the fallback traps it, but a packet here has passed
//!    netfilter, so it can no longer be queued — a refusal, never a pass
//!    that skips the handshake;
//! 7. the protocol-any ACLs;
//! 8. anything else is dropped.
//!
//! One raw TCP segment passes unjudged: one with neither SYN nor payload
//! (a bare ACK or RST). The kernel sends its own RSTs and TIME-WAIT ACKs
//! from a raw control socket, which a host scope at the cgroup root holds
//! and which cannot be told from an application's raw socket here; such
//! a segment opens no connection and carries no data.
//!
//! For TCP and UDP sockets it only completes the hooks' flow-log events:
//! a connect or sendmsg hook runs before routing (and, for TCP, the
//! bind), so it holds the events of a decision it lets through back until
//! the socket's first packet passes here with the source address and port
//! (`policy::Deferral`).
//!
//! Each packet is judged by the policy in force (there is no connection
//! state here but the conntrack class of step 5): a policy update applies
//! to the next echo request.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_socket_cookie, bpf_get_socket_uid, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use enforcer_common::{
    maps::{
        DIRECTION_APP, DNS_PORT, FlowEvent, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
        SCOPE_EXCLUDED, SCOPE_TARGET_TCP, SCOPE_TARGET_UDP, is_v4_mapped,
    },
    marks::Class,
};

use crate::{
    packet::{self, L4, Parsed},
    policy::{
        AclVerdict, Count, Deferral, Scope, Side, acl_entry, allow_dns, count, evaluate,
        in_agent_netns, in_set, judging_pu, log_final_drop, mark_layout, pu_of_cgroup,
        take_pending,
    },
};

const PASS: i32 = 1;
const DROP: i32 = 0;
/// `SOCK_RAW` from the kernel's uapi.
const SOCK_RAW: u32 = 3;
const TCP_SYN: u8 = 0x02;

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
    if hooked_transport(ctx) && !from_raw_socket(ctx) {
        // Whichever program runs first takes the held-back events; the
        // other finds none.
        log_held_back(ctx);
        return PASS;
    }
    match parse(ctx) {
        Parsed::L4(l4) => {
            let transport = l4.proto == PROTO_TCP || l4.proto == PROTO_UDP;
            // TCP or UDP of a TCP or UDP socket behind IPv6 extension
            // headers: the sock_addr hooks' too.
            if transport && !from_raw_socket(ctx) {
                return PASS;
            }
            if l4.proto == PROTO_TCP && bare_segment(ctx, l4.tcp_flags) {
                return PASS;
            }
            decide(ctx, &l4, scope)
        }
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
        // Later fragments follow their first; the kernel built what it
        // cannot read.
        _ => PASS,
    }
}

/// The packet's headers ([`packet::parse_ip`]), in a subprogram of its
/// own, not inlined: the parse's temporaries then live in its own stack
/// frame, gone by the time the ACL walk's callback runs, instead of in
/// the program's, which the verifier adds to the callback's against the
/// 512-byte limit (as TC ingress's `packet::parse`).
#[inline(never)]
fn parse(ctx: &SkBuffContext) -> Parsed {
    packet::parse_ip(ctx)
}

/// Was this packet written by a raw socket (`SOCK_RAW`)? Then no
/// sock_addr hook judged it, whatever its protocol. A packet without a
/// full socket (a SYN-ACK of a request socket, a TIME-WAIT answer) is the
/// kernel's own.
#[inline(always)]
fn from_raw_socket(ctx: &SkBuffContext) -> bool {
    // SAFETY: reading a field of the program's own context; the socket is
    // checked for null before the helper, which the verifier requires.
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return false;
        }
        let full = bpf_sk_fullsock(sk);
        !full.is_null() && (*full).type_ == SOCK_RAW
    }
}

/// A TCP segment with neither SYN nor payload (a bare ACK or RST): what
/// the kernel's raw control socket sends (see the module doc). The IP
/// header's length is read again here rather than carried by the parser,
/// which TC ingress shares and whose every stack byte counts there; IPv6
/// behind extension headers is never bare.
#[inline(always)]
fn bare_segment(ctx: &SkBuffContext, tcp_flags: u8) -> bool {
    if tcp_flags & TCP_SYN != 0 {
        return false;
    }
    let ip_len = match ctx.load::<u8>(0) {
        Ok(first) if first >> 4 == 4 => usize::from(first & 0x0f) * 4,
        Ok(first) if first >> 4 == 6 && ctx.load::<u8>(6) == Ok(PROTO_TCP) => 40,
        _ => return false,
    };
    let Ok(offset) = ctx.load::<u8>(ip_len + 12) else {
        return false;
    };
    ctx.len() as usize == ip_len + usize::from(offset >> 4) * 4
}

/// Did a fixed rule in OUTPUT class this packet `KnownFlow` — an ICMP
/// packet conntrack calls ESTABLISHED or RELATED?
#[inline(always)]
fn known_flow(ctx: &SkBuffContext) -> bool {
    let layout = mark_layout();
    // SAFETY: reading a field of the program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    mark & layout.class_mask() == layout.class(Class::KnownFlow)
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
/// sock_addr hooks' business (unless a raw socket wrote them), and nearly
/// every packet of a PU is one: two reads and a socket check, and no full
/// parse, on the common path. (IPv6 TCP or UDP behind
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
/// A host-service PU is found by its sockets' bound port, and nothing
/// judged here comes from one (a raw socket has no port): it never
/// claims these packets.
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
        src_port: l4.src_port,
        dst_port: l4.dst_port,
        proto: l4.proto,
        direction: DIRECTION_APP,
        ..FlowEvent::default()
    };
    let target_tcp = in_set(SCOPE_TARGET_TCP, l4.dst);
    if !target_tcp
        && let Some(entry) = entry
        && let Some(verdict) = evaluate(
            entry,
            0,
            entry.specific,
            l4.dst_port,
            &flow,
            &mut Deferral::none(),
        )
    {
        return apply(slot, verdict);
    }
    if l4.proto == PROTO_ICMPV6 && !is_v4_mapped(&l4.dst) {
        return PASS;
    }
    if allow_dns() && l4.proto == PROTO_UDP && l4.dst_port == DNS_PORT {
        return PASS;
    }
    // Only ICMP's class is the fixed rule's (and cleared when not):
    // a raw TCP or UDP packet's could come from its socket's mark.
    if (l4.proto == PROTO_ICMP || l4.proto == PROTO_ICMPV6) && known_flow(ctx) {
        return PASS;
    }
    let trapped = (l4.proto == PROTO_TCP && target_tcp)
        || (l4.proto == PROTO_UDP && in_set(SCOPE_TARGET_UDP, l4.dst));
    if !trapped
        && let Some(entry) = entry
        && let Some(verdict) = evaluate(
            entry,
            entry.specific,
            entry.any,
            l4.dst_port,
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
