//! The socket filters that fixed netfilter rules run (`-m bpf
//! --object-pinned`) for the identity handshake's global traps (SPEC,
//! "Global steering"): is the packet's peer in the target networks of its
//! own protocol — target TCP for TCP, target UDP for UDP — and not in the
//! excluded networks? The peer is the source of what arrives
//! (`enforcer_target_src`, in INPUT) and the destination of what leaves
//! (`enforcer_target_dst`, in OUTPUT). The fallback skips its main chains
//! for excluded peers; these rules run in chains every packet enters, so
//! the exclusion is checked here (excluded networks are never touched).
//!
//! These traps cover every port, not only a PU's (a SYN-ACK answering a
//! PU's connect, a UDP reply to its ephemeral port), so TC ingress, which
//! classes packets for PU ports only, cannot decide them; netfilter hands
//! the program the packet from its IP header, after reassembly. Anything
//! unreadable, or of another protocol, does not match.

use aya_ebpf::{macros::socket_filter, programs::SkBuffContext};
use enforcer_common::maps::{
    PROTO_TCP, PROTO_UDP, SCOPE_EXCLUDED, SCOPE_TARGET_TCP, SCOPE_TARGET_UDP,
};

use crate::{
    packet::{self, Parsed},
    policy::in_set,
};

const MATCH: i64 = 1;
const NO_MATCH: i64 = 0;

#[socket_filter]
pub fn enforcer_target_src(ctx: SkBuffContext) -> i64 {
    peer_is_target(&ctx, true)
}

#[socket_filter]
pub fn enforcer_target_dst(ctx: SkBuffContext) -> i64 {
    peer_is_target(&ctx, false)
}

#[inline(always)]
fn peer_is_target(ctx: &SkBuffContext, source: bool) -> i64 {
    let Parsed::L4(l4) = packet::parse_ip(ctx) else {
        return NO_MATCH;
    };
    let scope = match l4.proto {
        PROTO_TCP => SCOPE_TARGET_TCP,
        PROTO_UDP => SCOPE_TARGET_UDP,
        _ => return NO_MATCH,
    };
    let peer = if source { l4.src } else { l4.dst };
    if in_set(scope, peer) && !in_set(SCOPE_EXCLUDED, peer) {
        MATCH
    } else {
        NO_MATCH
    }
}
