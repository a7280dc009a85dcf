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
//!
//! Names shared with the tests live in `enforcer_common::facts`.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{TC_ACT_OK, bpf_sock_addr},
    helpers::generated::bpf_setsockopt,
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map},
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, TcContext},
};
use enforcer_common::facts::{CONNECT_MARK, LPM_MAX_ENTRIES};

/// `SOL_SOCKET` / `SO_MARK` from the kernel's uapi (asm-generic/socket.h).
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

/// cgroup/sock_addr verdicts: 1 lets the call proceed, 0 refuses it (EPERM).
const SOCK_ADDR_PROCEED: i32 = 1;
/// cgroup_skb verdicts.
const SKB_DROP: i32 = 0;

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

#[cgroup_sock_addr(connect4)]
pub fn facts_connect4(ctx: SockAddrContext) -> i32 {
    mark_socket(ctx.sock_addr);
    SOCK_ADDR_PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn facts_connect6(ctx: SockAddrContext) -> i32 {
    mark_socket(ctx.sock_addr);
    SOCK_ADDR_PROCEED
}

/// Sets `SO_MARK` on the socket behind a sock_addr context. A failure is
/// not fatal to the connect: the test sees the missing mark instead.
#[inline(always)]
fn mark_socket(sock_addr: *mut bpf_sock_addr) {
    let mut mark = CONNECT_MARK;
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
