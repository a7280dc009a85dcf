//! The enforcer's eBPF datapath. One module per attach point; maps and
//! lookups shared in `maps` and `policy`.
//!
//! The pattern (ARCHITECTURE.md): eBPF classifies, a fixed handful of
//! netfilter rules applies conntrack state and queues. The programs here
//! decide per connection and write the decision as the class sub-field of
//! the socket mark (`enforcer_common::marks`), or refuse the connection.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core leaves the atomic
// types without `fetch_add`; the intrinsic compiles to BPF's own atomic
// add (`policy::add_pending`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connect;
mod egress;
mod exposed;
mod ingress;
mod maps;
mod mark_guard;
mod packet;
mod policy;
mod proxy;
mod target_peer;
mod udp_flows;
mod udp_trap;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
