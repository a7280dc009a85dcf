//! The socket filter that one fixed netfilter rule runs on new outgoing
//! UDP flows (`-m bpf --object-pinned`, before its NFQUEUE): it matches a
//! datagram when a sendmsg hook recorded a trap decision for the
//! datagram's own socket and destination (`UDP_TRAPS`, see `connect`).
//!
//! Netfilter hands the program the packet from its IP header, with
//! `skb->sk` the sending socket, so `bpf_get_socket_cookie` names the same
//! socket the hook saw. Anything unreadable does not match: such a
//! datagram was built by the kernel from a socket call the hook judged,
//! and this rule only adds the trap.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::socket_filter, programs::SkBuffContext,
};
use enforcer_common::maps::{PROTO_UDP, UdpTrapKey};

use crate::{
    maps::UDP_TRAPS,
    packet::{self, Parsed},
};

const MATCH: i64 = 1;
const NO_MATCH: i64 = 0;

#[socket_filter]
pub fn enforcer_udp_trap(ctx: SkBuffContext) -> i64 {
    let Parsed::L4(l4) = packet::parse_ip(&ctx) else {
        return NO_MATCH;
    };
    if l4.proto != PROTO_UDP {
        return NO_MATCH;
    }
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a map lookup with a key on the stack.
    match unsafe { UDP_TRAPS.get(UdpTrapKey::new(cookie, l4.dst, l4.dst_port)) } {
        Some(_) => MATCH,
        None => NO_MATCH,
    }
}
