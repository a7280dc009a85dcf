//! Reading the headers of a packet, defensively — at TC (from the
//! Ethernet header) or in a cgroup_skb or socket filter program (from the
//! IP header): every read goes
//! through `bpf_skb_load_bytes` (the kernel refuses one past the end), IP
//! options and IPv6 extension headers are skipped with bounded loops, and
//! anything that cannot be read whole is reported as such — the caller
//! then never gives it a more permissive verdict than a well-formed packet
//! would get.

use aya_ebpf::{
    cty::c_long,
    programs::{SkBuffContext, TcContext},
};
use enforcer_common::maps::{PROTO_TCP, PROTO_UDP};

/// A packet the parser reads: both contexts read through
/// `bpf_skb_load_bytes`, from where their data starts.
pub trait Bytes {
    fn load<T>(&self, offset: usize) -> Result<T, c_long>;
}

impl Bytes for TcContext {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, c_long> {
        TcContext::load(self, offset)
    }
}

impl Bytes for SkBuffContext {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, c_long> {
        SkBuffContext::load(self, offset)
    }
}

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HDR_LEN: usize = 40;
/// IPv6 extension headers skipped before giving up.
const MAX_EXT_HEADERS: usize = 6;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// What the headers of one packet say.
pub enum Parsed {
    /// Not IPv4 or IPv6 (ARP, …): not the enforcer's business.
    NotIp,
    /// A fragment other than the first: no transport header; the first
    /// fragment carries the ports and is judged, and reassembly fails
    /// without it.
    LaterFragment,
    /// An IP packet whose headers could not be read whole.
    Malformed,
    /// A transport header was read.
    L4(L4),
}

/// The transport facts a verdict needs.
pub struct L4 {
    /// Source address, IPv4-mapped for IPv4.
    pub src: [u8; 16],
    /// Destination address, IPv4-mapped for IPv4.
    pub dst: [u8; 16],
    pub proto: u8,
    /// Source port, host order; 0 for protocols without ports.
    pub src_port: u16,
    /// Destination port, host order; 0 for protocols without ports.
    pub dst_port: u16,
    /// TCP flags byte; 0 for other protocols.
    pub tcp_flags: u8,
}

/// A frame at TC: Ethernet, then IP.
///
/// A subprogram of its own, not inlined: the parse's temporaries then
/// live in its own stack frame, which is gone by the time the ACL walk's
/// callback runs, instead of in the caller's, which the verifier adds to
/// the callback's against the 512-byte limit.
#[inline(never)]
pub fn parse(ctx: &TcContext) -> Parsed {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return Parsed::NotIp;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => parse_v4(ctx, ETH_HDR_LEN),
        ETH_P_IPV6 => parse_v6(ctx, ETH_HDR_LEN),
        _ => Parsed::NotIp,
    }
}

/// A packet that starts with its IP header (cgroup_skb, a socket filter
/// run by netfilter); the version nibble says the family.
#[inline(always)]
pub fn parse_ip<B: Bytes>(ctx: &B) -> Parsed {
    let Ok(first) = ctx.load::<u8>(0) else {
        return Parsed::Malformed;
    };
    match first >> 4 {
        4 => parse_v4(ctx, 0),
        6 => parse_v6(ctx, 0),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_v4<B: Bytes>(ctx: &B, ip: usize) -> Parsed {
    let (Ok(vihl), Ok(frag), Ok(proto), Ok(src), Ok(dst)) = (
        ctx.load::<u8>(ip),
        ctx.load::<u16>(ip + 6),
        ctx.load::<u8>(ip + 9),
        ctx.load::<[u8; 4]>(ip + 12),
        ctx.load::<[u8; 4]>(ip + 16),
    ) else {
        return Parsed::Malformed;
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    if u16::from_be(frag) & 0x1fff != 0 {
        return Parsed::LaterFragment;
    }
    let mapped = [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, src[0], src[1], src[2], src[3],
    ];
    let dst = [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, dst[0], dst[1], dst[2], dst[3],
    ];
    transport(ctx, mapped, dst, proto, ip + ihl)
}

#[inline(always)]
fn parse_v6<B: Bytes>(ctx: &B, ip: usize) -> Parsed {
    let (Ok(next), Ok(src), Ok(dst)) = (
        ctx.load::<u8>(ip + 6),
        ctx.load::<[u8; 16]>(ip + 8),
        ctx.load::<[u8; 16]>(ip + 24),
    ) else {
        return Parsed::Malformed;
    };
    let mut next = next;
    let mut off = ip + IPV6_HDR_LEN;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let (Ok(n), Ok(len)) = (ctx.load::<u8>(off), ctx.load::<u8>(off + 1)) else {
                    return Parsed::Malformed;
                };
                next = n;
                off += (usize::from(len) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let (Ok(n), Ok(frag)) = (ctx.load::<u8>(off), ctx.load::<u16>(off + 2)) else {
                    return Parsed::Malformed;
                };
                if u16::from_be(frag) & 0xfff8 != 0 {
                    return Parsed::LaterFragment;
                }
                next = n;
                off += 8;
            }
            _ => return transport(ctx, src, dst, next, off),
        }
        i += 1;
    }
    // More extension headers than we follow: treat as unreadable.
    Parsed::Malformed
}

#[inline(always)]
fn transport<B: Bytes>(ctx: &B, src: [u8; 16], dst: [u8; 16], proto: u8, off: usize) -> Parsed {
    // The destination port is the second 16-bit word of both headers; a
    // header that is not there whole is unreadable.
    let (src_port, dst_port, tcp_flags) = match proto {
        PROTO_TCP => match (
            ctx.load::<u16>(off),
            ctx.load::<u16>(off + 2),
            ctx.load::<u8>(off + 13),
        ) {
            (Ok(sport), Ok(port), Ok(flags)) => (u16::from_be(sport), u16::from_be(port), flags),
            _ => return Parsed::Malformed,
        },
        PROTO_UDP => match (
            ctx.load::<u16>(off),
            ctx.load::<u16>(off + 2),
            ctx.load::<u16>(off + 6),
        ) {
            (Ok(sport), Ok(port), Ok(_checksum)) => (u16::from_be(sport), u16::from_be(port), 0),
            _ => return Parsed::Malformed,
        },
        _ => (0, 0, 0),
    };
    Parsed::L4(L4 {
        src,
        dst,
        proto,
        src_port,
        dst_port,
        tcp_flags,
    })
}
