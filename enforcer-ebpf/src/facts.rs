//! Kernel-facts probes: the smallest programs that exercise each kernel
//! mechanism the eBPF datapath is built on, so that tests can prove the
//! mechanism on the running kernel before anything relies on it.
//!
//! - `facts_connect4` / `facts_connect6` (cgroup/connect4|6): stamp
//!   [`CONNECT_MARK`] on the connecting socket with
//!   `bpf_setsockopt(SO_MARK)`, so netfilter sees the mark on the SYN.
//! - `facts_tc_ingress` (TC classifier): look the packet's source address
//!   up in an LPM trie per family and, on a hit, set `skb->mark` to the
//!   value of the longest matching prefix.
//! - `facts_egress_drop` (cgroup_skb egress): drop every packet of the
//!   cgroup it is attached to, counting them per CPU.
//! - `facts_sendmsg4` / `facts_sendmsg6` (cgroup/sendmsg4|6): stamp
//!   [`SENDMSG_MARK`] on the sending socket, and record the datagram's
//!   (socket cookie, destination, port) in `FACTS_SENT`.
//! - `facts_sent_match` (socket filter, for `-m bpf --object-pinned`):
//!   match a packet whose (socket cookie, destination, port) is recorded.
//! - `facts_egress_icmp` (cgroup_skb egress): drop ICMP and ICMPv6,
//!   counting them, and pass the rest.
//!
//! Names shared with the tests live in `enforcer_common::facts`.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{TC_ACT_OK, bpf_sock_addr},
    helpers::generated::{bpf_get_socket_cookie, bpf_setsockopt},
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map, socket_filter},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, TcContext},
};
use enforcer_common::{
    facts::{CONNECT_MARK, LPM_MAX_ENTRIES, SENDMSG_MARK},
    maps::UdpTrapKey,
};

/// `SOL_SOCKET` / `SO_MARK` from the kernel's uapi (asm-generic/socket.h).
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

/// cgroup/sock_addr verdicts: 1 lets the call proceed, 0 refuses it (EPERM).
const SOCK_ADDR_PROCEED: i32 = 1;
/// cgroup_skb verdicts.
const SKB_DROP: i32 = 0;
const SKB_PASS: i32 = 1;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Offset of the source address inside the IPv4 / IPv6 header.
const IPV4_SRC_OFF: usize = 12;
const IPV6_SRC_OFF: usize = 8;

#[map(name = "FACTS_SRC_V4")]
static FACTS_SRC_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);

#[map(name = "FACTS_SRC_V6")]
static FACTS_SRC_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(LPM_MAX_ENTRIES, 0);

/// Per-CPU so that the count needs no atomics; user space sums the CPUs.
#[map(name = "FACTS_DROPS")]
static FACTS_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "FACTS_SENT")]
static FACTS_SENT: HashMap<UdpTrapKey, u8> = HashMap::with_max_entries(LPM_MAX_ENTRIES, 0);

#[map(name = "FACTS_ICMP_DROPS")]
static FACTS_ICMP_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn facts_connect4(ctx: SockAddrContext) -> i32 {
    mark_socket(ctx.sock_addr, CONNECT_MARK);
    SOCK_ADDR_PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn facts_connect6(ctx: SockAddrContext) -> i32 {
    mark_socket(ctx.sock_addr, CONNECT_MARK);
    SOCK_ADDR_PROCEED
}

#[cgroup_sock_addr(sendmsg4)]
pub fn facts_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid context; user_ip4 is in network
    // order, so its in-memory bytes are the address octets.
    let o = unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes();
    let addr = [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
    ];
    record_send(ctx.sock_addr, addr);
    SOCK_ADDR_PROCEED
}

#[cgroup_sock_addr(sendmsg6)]
pub fn facts_sendmsg6(ctx: SockAddrContext) -> i32 {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // SAFETY: as above; each word read whole.
        let word = unsafe { (*ctx.sock_addr).user_ip6[i] }.to_ne_bytes();
        addr[i * 4..i * 4 + 4].copy_from_slice(&word);
        i += 1;
    }
    record_send(ctx.sock_addr, addr);
    SOCK_ADDR_PROCEED
}

/// Stamps [`SENDMSG_MARK`] and records (cookie, destination, port).
#[inline(always)]
fn record_send(sock_addr: *mut bpf_sock_addr, addr: [u8; 16]) {
    mark_socket(sock_addr, SENDMSG_MARK);
    // SAFETY: the program's own context; the port is in network order in
    // the low 16 bits.
    let (cookie, port) = unsafe {
        (
            bpf_get_socket_cookie(sock_addr.cast::<c_void>()),
            u16::from_be((*sock_addr).user_port as u16),
        )
    };
    let _ = FACTS_SENT.insert(UdpTrapKey::new(cookie, addr, port), 1, 0);
}

/// Matches a packet (from its IP header, as netfilter hands it) whose
/// socket, destination and UDP port a sendmsg probe recorded.
#[socket_filter]
pub fn facts_sent_match(ctx: SkBuffContext) -> i64 {
    let Some((proto, dst, l4)) = ip_header(&ctx) else {
        return 0;
    };
    let Ok(port) = ctx.load::<u16>(l4 + 2) else {
        return 0;
    };
    if proto != 17 {
        return 0;
    }
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let key = UdpTrapKey::new(cookie, dst, u16::from_be(port));
    // SAFETY: a map lookup with a key on the stack.
    i64::from(unsafe { FACTS_SENT.get(key) }.is_some())
}

/// Protocol, destination (IPv4-mapped for IPv4) and transport offset of a
/// packet that starts with its IP header (no IPv6 extension headers).
#[inline(always)]
fn ip_header(ctx: &SkBuffContext) -> Option<(u8, [u8; 16], usize)> {
    let first = ctx.load::<u8>(0).ok()?;
    match first >> 4 {
        4 => {
            let proto = ctx.load::<u8>(9).ok()?;
            let d: [u8; 4] = ctx.load(16).ok()?;
            let dst = [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, d[0], d[1], d[2], d[3],
            ];
            Some((proto, dst, usize::from(first & 0x0f) * 4))
        }
        6 => Some((ctx.load::<u8>(6).ok()?, ctx.load(24).ok()?, 40)),
        _ => None,
    }
}

#[cgroup_skb]
pub fn facts_egress_icmp(ctx: SkBuffContext) -> i32 {
    match ip_header(&ctx) {
        Some((IPPROTO_ICMP | IPPROTO_ICMPV6, _, _)) => {
            if let Some(counter) = FACTS_ICMP_DROPS.get_ptr_mut(0) {
                // SAFETY: this CPU's own slot of the map.
                unsafe { *counter += 1 };
            }
            SKB_DROP
        }
        _ => SKB_PASS,
    }
}

/// Sets `SO_MARK` on the socket behind a sock_addr context. A failure is
/// not fatal to the call: the test sees the missing mark instead.
#[inline(always)]
fn mark_socket(sock_addr: *mut bpf_sock_addr, mark: u32) {
    let mut mark = mark;
    // SAFETY: `sock_addr` is the context the kernel handed to this program,
    // and the option value points at a live local of the length given.
    unsafe {
        bpf_setsockopt(
            sock_addr.cast::<c_void>(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast::<c_void>(),
            size_of::<u32>() as i32,
        );
    }
}

#[classifier]
pub fn facts_tc_ingress(ctx: TcContext) -> i32 {
    if let Some(mark) = source_mark(&ctx) {
        ctx.set_mark(mark);
    }
    TC_ACT_OK
}

/// The mark of the longest prefix covering the packet's source address,
/// if any. Packets too short to hold the header are left alone.
#[inline(always)]
fn source_mark(ctx: &TcContext) -> Option<u32> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    match ethertype {
        ETH_P_IP => {
            let src: [u8; 4] = ctx.load(ETH_HDR_LEN + IPV4_SRC_OFF).ok()?;
            FACTS_SRC_V4.get(Key::new(32, src)).copied()
        }
        ETH_P_IPV6 => {
            let src: [u8; 16] = ctx.load(ETH_HDR_LEN + IPV6_SRC_OFF).ok()?;
            FACTS_SRC_V6.get(Key::new(128, src)).copied()
        }
        _ => None,
    }
}

#[cgroup_skb]
pub fn facts_egress_drop(_ctx: SkBuffContext) -> i32 {
    if let Some(counter) = FACTS_DROPS.get_ptr_mut(0) {
        // SAFETY: the pointer comes from the map and stays valid for the
        // program's run; the slot is this CPU's own, so no other writer races.
        unsafe { *counter += 1 };
    }
    SKB_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
