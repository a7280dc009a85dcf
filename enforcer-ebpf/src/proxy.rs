//! Proxy redirection without netfilter (issue 6): what the fallback does
//! with per-PU nat `REDIRECT` rules, done at the socket.
//!
//! - [`redirect`], called by the connect and sendmsg hooks
//!   (`connect.rs`) once they know the judging PU and the destination is
//!   not excluded, before any ACL or trap — the fallback accepts these
//!   first in its mangle proxy chain, and its nat redirect chains skip
//!   excluded destinations (SPEC): a PU's TCP connect to one of its dependent
//!   services (`PROXY_SERVICES`: an LPM trie keyed by slot and address,
//!   each prefix holding the port ranges of every service covering it) is
//!   rewritten to loopback at its proxy port (`127.0.0.1`, `::1`, as
//!   `REDIRECT` sends locally generated traffic), and its UDP to port 53
//!   (connected or not) to loopback at its DNS proxy port. A socket
//!   carrying the proxy mark is never redirected (the proxy's own onward
//!   connection, were it to run in the PU). The original destination is
//!   filed under the socket's cookie (`REDIRECTS`).
//! - `enforcer_proxy_sockops` (sock_ops, `ACTIVE_ESTABLISHED_CB`): once a
//!   redirected TCP connection is up, its original is filed again under
//!   the client's address and port (`REDIRECTS_BY_PEER`) — the proxy's
//!   accepted socket has another cookie, but its peer is that address.
//!   The client's callback runs when the SYN-ACK arrives, before it sends
//!   the ACK the proxy's `accept` waits for, so the entry is always there
//!   first.
//! - `enforcer_proxy_original_dst` (cgroup/getsockopt, on the host scope,
//!   where proxies run): answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)`
//!   (IPv4 original) and `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`
//!   (IPv6) on such an accepted socket, so a proxy written for iptables
//!   works unchanged. For any other socket or option the kernel's own
//!   answer (retval, optval, optlen) is left as it is.
//! - `enforcer_proxy_recvmsg4|6` and `enforcer_proxy_getpeername4|6`: a
//!   redirected socket sees the original destination, never the proxy —
//!   the DNS proxy's answer comes from the server asked (resolvers drop
//!   answers from elsewhere), and `getpeername` names it, as conntrack's
//!   reverse NAT makes it look with `REDIRECT`.
//!
//! The maps keyed by socket are LRU maps: entries of closed sockets age
//! out by themselves, with no hook on socket release. An entry by peer
//! is only trusted for a socket at the proxy port it names, so a reused
//! client address never hands a stale original to an unrelated connection.

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr, bpf_sockopt},
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, cgroup_sockopt, sock_ops},
    maps::lpm_trie::Key,
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use enforcer_common::{
    maps::{DNS_PORT, NetKey, PROTO_TCP, PROTO_UDP, SCOPE_BITS, family_scope, is_v4_mapped},
    marks::Kind,
    proxy::{MAX_SERVICE_PORTS, PeerKey, Redirect, loopback_for},
};

use crate::connect::{addr4, addr6};
use crate::maps::{PROXY_PORTS, PROXY_SERVICES, REDIRECTS, REDIRECTS_BY_PEER};
use crate::policy::{in_agent_netns, mark_layout};

const AF_INET: u32 = 2;
const AF_INET6: u16 = 10;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` are both 80.
const SO_ORIGINAL_DST: i32 = 80;
/// `struct sockaddr_in` and `struct sockaddr_in6`.
const SOCKADDR_IN: usize = 16;
const SOCKADDR_IN6: usize = 28;

/// Redirects the connect or datagram of `slot`'s socket to `addr`:`port`
/// (`proto`) to its proxy if its configuration says so, rewriting the
/// hook's destination; true if it did.
#[inline(always)]
pub fn redirect(
    sa: *mut bpf_sock_addr,
    v6: bool,
    slot: u32,
    proto: u8,
    addr: [u8; 16],
    port: u16,
) -> bool {
    let Some(ports) = PROXY_PORTS.get(slot) else {
        return false;
    };
    let to_port = if proto == PROTO_TCP && ports.proxy != 0 && dependent(slot, addr, port) {
        ports.proxy
    } else if proto == PROTO_UDP && ports.dns != 0 && port == DNS_PORT {
        ports.dns
    } else {
        return false;
    };
    // SAFETY: `sk` of a sock_addr context is always a valid socket (the
    // verifier types it so); its mark is a readable field.
    let mark = unsafe { (*(*sa).__bindgen_anon_1.sk).mark };
    let layout = mark_layout();
    if mark & layout.kind_mask() == layout.kind(Kind::Proxy) {
        return false;
    }
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast::<c_void>()) };
    let original = Redirect {
        addr,
        port,
        to_port,
        pad: 0,
    };
    // Redirected even if the map refused the entry (an LRU map evicts
    // rather than refuse): as with `REDIRECT`, the PU reaches its
    // dependent services through the proxy only; the proxy then cannot
    // learn the destination and closes the connection.
    let _ = REDIRECTS.insert(cookie, original, 0);
    set_addr(sa, v6, loopback_for(&addr), to_port);
    true
}

/// Is `addr`:`port` one of `slot`'s dependent services (TCP)?
#[inline(always)]
fn dependent(slot: u32, addr: [u8; 16], port: u16) -> bool {
    let scope = family_scope(slot, is_v4_mapped(&addr));
    let key = Key::new(SCOPE_BITS + 128, NetKey::new(scope, addr));
    let Some(entry) = PROXY_SERVICES.get(key) else {
        return false;
    };
    let mut i = 0;
    while i < MAX_SERVICE_PORTS {
        let span = entry.ports[i];
        if (i as u32) < entry.count && span.lo <= port && port <= span.hi {
            return true;
        }
        i += 1;
    }
    false
}

/// Writes `addr` (IPv4-mapped for an IPv4 hook) and `port` (host order)
/// into the hook's address: user_ip6 for an IPv6 hook (`v6`, a constant
/// at every call, so the other branch is compiled out — the verifier
/// refuses an IPv4 hook that so much as contains a write of user_ip6).
#[inline(always)]
fn set_addr(sa: *mut bpf_sock_addr, v6: bool, addr: [u8; 16], port: u16) {
    // SAFETY: the program's own context; the verifier lets these hooks
    // write user_ip4 (IPv4), each word of user_ip6 (IPv6) and user_port
    // (network order in the low 16 bits), whole.
    unsafe {
        if !v6 {
            (*sa).user_ip4 = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
        } else {
            let mut i = 0;
            while i < 4 {
                (*sa).user_ip6[i] = u32::from_ne_bytes([
                    addr[i * 4],
                    addr[i * 4 + 1],
                    addr[i * 4 + 2],
                    addr[i * 4 + 3],
                ]);
                i += 1;
            }
        }
        (*sa).user_port = u32::from(port.to_be());
    }
}

/// Puts the original destination back where a redirected socket would
/// see the proxy (`seen`: the hook's address, IPv4-mapped for IPv4).
#[inline(always)]
fn restore(sa: *mut bpf_sock_addr, v6: bool, seen: [u8; 16]) {
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast::<c_void>()) };
    // SAFETY: a map lookup with a key on the stack.
    let Some(original) = (unsafe { REDIRECTS.get(cookie) }) else {
        return;
    };
    // SAFETY: valid context. The port is in network order in the low 16 bits.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    if port != original.to_port || !same(&seen, &loopback_for(&original.addr)) {
        return;
    }
    set_addr(sa, v6, original.addr, original.port);
}

/// Address equality byte by byte: a whole-array compare becomes a 128-bit
/// one, which BPF cannot do.
#[inline(always)]
fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cgroup_sock_addr(recvmsg4)]
pub fn enforcer_proxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(ctx.sock_addr, false, addr4(&ctx));
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn enforcer_proxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(ctx.sock_addr, true, addr6(&ctx));
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn enforcer_proxy_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(ctx.sock_addr, false, addr4(&ctx));
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn enforcer_proxy_getpeername6(ctx: SockAddrContext) -> i32 {
    restore(ctx.sock_addr, true, addr6(&ctx));
    1
}

#[sock_ops]
pub fn enforcer_proxy_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        file_by_peer(&ctx);
    }
    1
}

/// Files a redirected connection's original under its client end.
#[inline(always)]
fn file_by_peer(ctx: &SockOpsContext) {
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast::<c_void>()) };
    // SAFETY: a map lookup with a key on the stack.
    let Some(original) = (unsafe { REDIRECTS.get(cookie) }) else {
        return;
    };
    let ops = ctx.ops;
    // SAFETY: the program's own context. Every field is read whole and
    // unconditionally, volatile: a read the compiler merged into a pointer
    // chosen by the family would be a modified context pointer, which the
    // verifier refuses. local_port is in host order.
    let (family, ip4, ip6, port) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
            read_volatile(&(*ops).local_port),
        )
    };
    let addr = match family {
        AF_INET => v4_mapped(ip4),
        _ => words_to_bytes(ip6),
    };
    let key = PeerKey::new(addr, port as u16);
    let _ = REDIRECTS_BY_PEER.insert(key, *original, 0);
}

/// An IPv4 address as a context holds it (network order) in the maps'
/// IPv4-mapped form.
#[inline(always)]
fn v4_mapped(ip4: u32) -> [u8; 16] {
    let o = ip4.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
    ]
}

/// An IPv6 address as a context holds it (four words in network order).
#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = words[i].to_ne_bytes();
        addr[i * 4] = w[0];
        addr[i * 4 + 1] = w[1];
        addr[i * 4 + 2] = w[2];
        addr[i * 4 + 3] = w[3];
        i += 1;
    }
    addr
}

#[cgroup_sockopt(getsockopt)]
pub fn enforcer_proxy_original_dst(ctx: SockoptContext) -> i32 {
    original_dst(ctx.sockopt);
    1
}

/// Answers `SO_ORIGINAL_DST` for a redirected connection's accepted
/// socket; anything else is left as the kernel answered it.
#[inline(always)]
fn original_dst(opt: *mut bpf_sockopt) {
    // SAFETY: the kernel hands a valid context; plain reads.
    let (level, optname) = unsafe { ((*opt).level, (*opt).optname) };
    let v6 = match level {
        SOL_IP => false,
        SOL_IPV6 => true,
        _ => return,
    };
    if optname != SO_ORIGINAL_DST || !in_agent_netns(opt.cast()) {
        return;
    }
    // SAFETY: `sk` of a sockopt context is always a valid socket (the
    // verifier types it so); these are readable fields. dst_port is in
    // network order, src_port in host order.
    // SAFETY: `sk` of a sockopt context is always a valid socket (the
    // verifier types it so); these are readable fields, each read whole and
    // unconditionally as in `file_by_peer`. dst_port is in network order,
    // src_port in host order.
    let (family, proto, local_port, ip4, ip6, peer_port) = unsafe {
        let sk = (*opt).__bindgen_anon_1.sk;
        (
            read_volatile(&(*sk).family),
            read_volatile(&(*sk).protocol) as u8,
            read_volatile(&(*sk).src_port) as u16,
            read_volatile(&(*sk).dst_ip4),
            [
                read_volatile(&(*sk).dst_ip6[0]),
                read_volatile(&(*sk).dst_ip6[1]),
                read_volatile(&(*sk).dst_ip6[2]),
                read_volatile(&(*sk).dst_ip6[3]),
            ],
            u16::from_be(read_volatile(&(*sk).dst_port)),
        )
    };
    let peer = match family {
        AF_INET => v4_mapped(ip4),
        _ => words_to_bytes(ip6),
    };
    if proto != PROTO_TCP {
        return;
    }
    // SAFETY: a map lookup with a key on the stack.
    let Some(original) = (unsafe { REDIRECTS_BY_PEER.get(PeerKey::new(peer, peer_port)) }) else {
        return;
    };
    // iptables answers each level for its own family only.
    if local_port != original.to_port || is_v4_mapped(&original.addr) == v6 {
        return;
    }
    if v6 {
        let mut out = [0u8; SOCKADDR_IN6];
        out[0..2].copy_from_slice(&AF_INET6.to_ne_bytes());
        out[2..4].copy_from_slice(&original.port.to_be_bytes());
        let mut i = 0;
        while i < 16 {
            out[8 + i] = original.addr[i];
            i += 1;
        }
        answer(opt, &out);
    } else {
        let mut out = [0u8; SOCKADDR_IN];
        out[0..2].copy_from_slice(&(AF_INET as u16).to_ne_bytes());
        out[2..4].copy_from_slice(&original.port.to_be_bytes());
        out[4..8].copy_from_slice(&original.addr[12..16]);
        answer(opt, &out);
    }
}

/// Replaces the kernel's answer to a getsockopt with `value`, if the
/// caller's buffer holds it.
#[inline(always)]
fn answer<const N: usize>(opt: *mut bpf_sockopt, value: &[u8; N]) {
    // SAFETY: valid context; optval is written only within optval_end, as
    // the verifier demands; optlen may only shrink (the caller's buffer
    // holds at least N bytes here), and retval 0 reports success.
    unsafe {
        let start = (*opt).__bindgen_anon_2.optval as *mut u8;
        let end = (*opt).__bindgen_anon_3.optval_end as *mut u8;
        if start.add(N) > end {
            return;
        }
        let mut i = 0;
        while i < N {
            *start.add(i) = value[i];
            i += 1;
        }
        (*opt).optlen = N as i32;
        (*opt).retval = 0;
    }
}
