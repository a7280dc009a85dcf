//! Exposed services (issue 6) without NAT: at TC ingress, an incoming TCP
//! connection to a PU's exposed port is handed to the proxy listening on
//! the PU's proxy port, at the same address (`EXPOSED`: port → proxy
//! port), with `bpf_sk_assign` — TPROXY without a rule.
//!
//! Why this and not the other ways (ARCHITECTURE.md, "nat REDIRECT for
//! exposed services"):
//! - no per-PU netfilter rule, and no NAT: the proxy's listener gets the
//!   SYN as it is, so the accepted socket's local address *is* the
//!   original destination. A proxy written for iptables `REDIRECT` still
//!   asks `getsockopt(SO_ORIGINAL_DST)`: conntrack (which the fixed rules
//!   keep on in the namespace) finds the connection by the socket's own
//!   tuple and answers its original destination — the same address and
//!   port. The proxy needs no `IP_TRANSPARENT`: the destination is one of
//!   the host's own addresses, so its answers pass the source check;
//! - an `sk_lookup` program alone would need the proxy's listening socket
//!   in a SOCKMAP, and the agent to hold it (found by inode, taken with
//!   `pidfd_getfd`) and to refresh it whenever the proxy restarts; and it
//!   cannot see the packet mark that tells the proxy's own connection
//!   onward apart. Here the listener is looked up per connection
//!   (`bpf_skc_lookup_tcp`), so a restarted proxy is found as it comes
//!   back; sk_lookup only completes the TIME_WAIT case below, with the
//!   socket TC found.
//!
//! The steps, for a TCP packet to an exposed port (SPEC's order of the
//! fallback, where nat PREROUTING redirects before mangle INPUT and the
//! PU's proxy chain accepts what reaches the proxy port before any ACL or
//! trap):
//! 1. a source in the excluded networks is never touched: the PU's own
//!    listener gets it, as the fallback's redirect skips excluded sources;
//! 2. a packet of a connection that has its own socket (established, or
//!    half open: the final ACK of a handshake the proxy answered) goes on
//!    to it — the kernel finds it by its tuple. Only a packet for which the
//!    lookup finds the PU's listener, or nothing, is steered: a SYN, or
//!    the ACK of a SYN cookie;
//! 3. a packet the host forwards passes untouched ([`forwarded`]);
//! 4. the proxy's listener at (destination address, proxy port) gets the
//!    packet; with no proxy listening there the packet is dropped — never
//!    left to the PU's own listener, which the proxy is there to front
//!    (the fallback's redirect to a closed port is refused too).
//!
//! One case needs more than TC: a SYN reusing the tuple of a TIME_WAIT
//! socket the proxy left (the same client address and port within 60 s
//! of a connection the proxy closed first). The proxy's listener cannot
//! take it while the TIME_WAIT socket holds the tuple (its request socket
//! would clash with it), and the kernel, which ends the TIME_WAIT and
//! looks a listener up by the packet's port, would find the PU's own — the
//! fallback has no such case, as after `REDIRECT` the TIME_WAIT socket's
//! port is the proxy's. So TC *parks* that SYN ([`park`]): it puts the
//! proxy's listener into `PROXY_LISTENERS` (a SOCKHASH, which TC may write
//! with a socket it looked up) and the tuple into `REUSED_TUPLES`, and
//! lets the SYN on unassigned; the kernel's listener lookup on the
//! TIME_WAIT path then runs [`enforcer_exposed_lookup`] (sk_lookup,
//! attached to the namespace), which assigns the proxy's listener. No
//! descriptor plumbing: TC found the socket. Without it, one client at
//! about 1000 connections/s to a proxy closing first lost about 2 % of
//! its connections (dropped until the TIME_WAIT ended);
//! `tests/tests/proxy.rs` checks the reuse lands on the proxy with no SYN
//! sent again.
//!
//! A steered connection is accepted before the PU's network ACLs and the
//! trap, as the fallback's proxy chain accepts it. The proxy's own
//! connection onward to the PU's service carries the proxy mark, which TC
//! ingress passes first (`ingress`), so it is neither steered again nor
//! judged.
//!
//! The cost: one socket lookup per packet to an exposed port, and for a
//! new connection a FIB lookup and a second socket lookup; other ports pay
//! one hash lookup. Against the fallback's `REDIRECT`, measured ad hoc on
//! this 2-core machine (shared and noisy): one client in another
//! namespace, sequential connect + 4-byte echo through a minimal proxy,
//! 3 × 2000 connections twice per datapath — 1900–5900 connections/s
//! through the proxy on eBPF, 1900–5800/s on iptables; the datapath's
//! share is lost in the noise, the proxy's accept and onward connect
//! dominate.

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_CURRENT_NETNS, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, TC_ACT_OK, TC_ACT_SHOT,
        bpf_fib_lookup, bpf_sock, bpf_sock_tuple,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_map_update_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::sk_lookup,
    programs::{SkLookupContext, TcContext},
};
use enforcer_common::maps::{ExposedService, PROTO_TCP, ReusedTuple, SCOPE_EXCLUDED, is_v4_mapped};

use crate::{
    maps::{EXPOSED, PROXY_LISTENERS, REUSED_TUPLES},
    packet::L4,
    policy::{Count, count, in_set},
};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The exposed service of a TCP destination port, if any.
#[inline(always)]
pub fn service(port: u16) -> Option<ExposedService> {
    // SAFETY: a map lookup with a key on the stack; the value is copied.
    unsafe { EXPOSED.get(port) }.copied()
}

/// The verdict for the TCP packet `l4`, to an exposed port of `service`.
/// A source in the excluded networks passes untouched, as it would on
/// the PU's own path (its listener gets the connection).
///
/// A subprogram of its own, not inlined, and called last (TC ingress
/// keeps nothing across the call): what it needs lives in its own stack
/// frame and its callees', not in TC ingress's, which the verifier adds to
/// the ACL walk's callback's against the 512-byte limit (as
/// `packet::parse`).
#[inline(never)]
pub fn steer(ctx: &TcContext, l4: &L4, service: ExposedService) -> i32 {
    if in_set(SCOPE_EXCLUDED, l4.src) {
        return TC_ACT_OK;
    }
    let new = l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut reused = false;
    if let Some(state) = own_socket(ctx, l4) {
        reused = new && state == BPF_TCP_TIME_WAIT;
        if state != BPF_TCP_LISTEN && !reused {
            return TC_ACT_OK;
        }
    }
    if forwarded(ctx, l4) {
        return TC_ACT_OK;
    }
    let assigned = match reused {
        true => park(ctx, l4, service.proxy_port),
        false => assign_listener(ctx, l4, service.proxy_port),
    };
    if new {
        let counted = if assigned {
            Count::Accepted
        } else {
            Count::Dropped
        };
        count(service.slot, counted);
    }
    if assigned { TC_ACT_OK } else { TC_ACT_SHOT }
}

/// Would the host forward this packet rather than take it in? A FIB
/// lookup from the interface it came in on says so (`SUCCESS`, and the
/// answers that come with a next hop: no neighbour yet, fragmentation
/// needed). The fallback redirects only what goes to a local address
/// (`--dst-type LOCAL`), and judges forwarded traffic by no PU's rules:
/// such a packet passes untouched. Every other answer steers: a local
/// address (`NOT_FWDED`), forwarding off on the interface
/// (`FWD_DISABLED`: what is not local is dropped anyway), a route that
/// drops, or an error.
#[inline(never)]
fn forwarded(ctx: &TcContext, l4: &L4) -> bool {
    // SAFETY: plain data; zero is a valid value of every field.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.l4_protocol = PROTO_TCP;
    fib.sport = l4.src_port.to_be();
    fib.dport = l4.dst_port.to_be();
    // SAFETY: reading a field of the program's own context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (src, dst, len) = match is_v4_mapped(&l4.dst) {
        true => {
            fib.family = AF_INET;
            (&l4.src[12..], &l4.dst[12..], 4)
        }
        false => {
            fib.family = AF_INET6;
            (&l4.src[..], &l4.dst[..], 16)
        }
    };
    // SAFETY: byte copies of `len` (4 or 16) bytes into the address
    // unions, which are 16 bytes each.
    unsafe {
        core::ptr::copy_nonoverlapping(
            src.as_ptr(),
            (&raw mut fib.__bindgen_anon_3).cast::<u8>(),
            len,
        );
        core::ptr::copy_nonoverlapping(
            dst.as_ptr(),
            (&raw mut fib.__bindgen_anon_4).cast::<u8>(),
            len,
        );
    }
    // SAFETY: the program's own skb and a parameter block on the stack of
    // the size given.
    let answer = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast::<c_void>(),
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    matches!(
        answer,
        ANSWER_SUCCESS | ANSWER_NO_NEIGH | ANSWER_FRAG_NEEDED
    )
}

/// `bpf_fib_lookup`'s answers that mean "forwarded".
const ANSWER_SUCCESS: i64 = BPF_FIB_LKUP_RET_SUCCESS as i64;
const ANSWER_NO_NEIGH: i64 = BPF_FIB_LKUP_RET_NO_NEIGH as i64;
const ANSWER_FRAG_NEEDED: i64 = BPF_FIB_LKUP_RET_FRAG_NEEDED as i64;
/// Address families (linux/socket.h).
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The state of the socket the kernel finds for the packet's own tuple
/// (its connection's, else a listener on its port), if any.
///
/// This, [`forwarded`] and [`assign_listener`] are subprograms of their
/// own: each one's tuple or FIB parameters live only in its frame, so
/// [`steer`]'s stays small (TC ingress's frame and the deepest call below
/// it must fit in 512 bytes together).
#[inline(never)]
fn own_socket(ctx: &TcContext, l4: &L4) -> Option<u32> {
    let sk = Tuple::of(l4, l4.dst_port).lookup(ctx);
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null socket the lookup returned; read before the
    // release, which every socket a lookup returns gets once.
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk.cast::<c_void>()) };
    Some(state)
}

/// Hands the packet to the listener on `port` at its destination address;
/// false when there is none (nothing, another socket, or the kernel
/// refuses).
#[inline(never)]
fn assign_listener(ctx: &TcContext, l4: &L4, port: u16) -> bool {
    let sk = Tuple::of(l4, port).lookup(ctx);
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null socket the lookup returned.
    let listening = unsafe { (*sk).state } == BPF_TCP_LISTEN;
    // SAFETY: the program's own skb, a socket from a lookup, no flags.
    let assigned = listening
        && unsafe { bpf_sk_assign(ctx.skb.skb.cast::<c_void>(), sk.cast::<c_void>(), 0) } == 0;
    // SAFETY: every socket a lookup returns is released once (the skb
    // holds its own reference after an assignment).
    unsafe { bpf_sk_release(sk.cast::<c_void>()) };
    assigned
}

/// A SYN reusing the tuple of a TIME_WAIT socket: the proxy's listener on
/// `port` (at the SYN's destination) goes into `PROXY_LISTENERS` and the
/// tuple into `REUSED_TUPLES`, and the SYN goes on unassigned — the kernel
/// ends the TIME_WAIT and looks a listener up, which runs
/// [`enforcer_exposed_lookup`]. False when there is no proxy listening
/// (or a write fails): the SYN is dropped, never left to the PU's own
/// listener.
#[inline(never)]
fn park(ctx: &TcContext, l4: &L4, port: u16) -> bool {
    let sk = Tuple::of(l4, port).lookup(ctx);
    if sk.is_null() {
        return false;
    }
    let key = u32::from(port);
    // SAFETY: a non-null socket the lookup returned; a SOCKHASH takes a
    // socket as its value (the verifier checks it is one).
    let stored = unsafe { (*sk).state } == BPF_TCP_LISTEN
        && unsafe {
            bpf_map_update_elem(
                (&raw const PROXY_LISTENERS).cast_mut().cast::<c_void>(),
                (&raw const key).cast::<c_void>(),
                sk.cast::<c_void>().cast_const(),
                u64::from(BPF_ANY),
            )
        } == 0;
    // SAFETY: every socket a lookup returns is released once (the map
    // holds its own reference).
    unsafe { bpf_sk_release(sk.cast::<c_void>()) };
    let tuple = ReusedTuple::new(l4.src, l4.dst, l4.src_port, l4.dst_port);
    stored && REUSED_TUPLES.insert(tuple, port, 0).is_ok()
}

/// The sk_lookup program of the agent's network namespace: a listener
/// lookup for a tuple TC ingress parked ([`park`]) gets the proxy's
/// listener; with none there (the proxy closed in between) the SYN is
/// dropped. Every other lookup goes on as usual.
#[sk_lookup]
pub fn enforcer_exposed_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: reading fields of the program's own context.
    let protocol = unsafe { read_volatile(&raw const (*l).protocol) };
    if protocol != u32::from(PROTO_TCP) {
        return SK_PASS;
    }
    // Every field read, each at its own fixed offset (volatile), before
    // the family picks among them: the verifier refuses a context pointer
    // that the compiler chose between two offsets and then dereferenced.
    // SAFETY: as above.
    let (family, remote4, local4, remote6, local6, remote_port, local_port) = unsafe {
        (
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).remote_ip4),
            read_volatile(&raw const (*l).local_ip4),
            [
                read_volatile(&raw const (*l).remote_ip6[0]),
                read_volatile(&raw const (*l).remote_ip6[1]),
                read_volatile(&raw const (*l).remote_ip6[2]),
                read_volatile(&raw const (*l).remote_ip6[3]),
            ],
            [
                read_volatile(&raw const (*l).local_ip6[0]),
                read_volatile(&raw const (*l).local_ip6[1]),
                read_volatile(&raw const (*l).local_ip6[2]),
                read_volatile(&raw const (*l).local_ip6[3]),
            ],
            read_volatile(&raw const (*l).remote_port),
            read_volatile(&raw const (*l).local_port),
        )
    };
    let (remote, local) = match family {
        AF_INET_CTX => (mapped(remote4), mapped(local4)),
        AF_INET6_CTX => (bytes(remote6), bytes(local6)),
        _ => return SK_PASS,
    };
    let tuple = ReusedTuple::new(remote, local, u16::from_be(remote_port), local_port as u16);
    // SAFETY: a map lookup with a key on the stack; the value is copied.
    let Some(port) = unsafe { REUSED_TUPLES.get(tuple) }.copied() else {
        return SK_PASS;
    };
    let _ = REUSED_TUPLES.remove(tuple);
    match PROXY_LISTENERS.redirect_sk_lookup(&ctx, u32::from(port), 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}

/// `bpf_sk_lookup::family` values.
const AF_INET_CTX: u32 = AF_INET as u32;
const AF_INET6_CTX: u32 = AF_INET6 as u32;

/// An IPv4 address as the context holds it (network order), IPv4-mapped.
#[inline(always)]
fn mapped(addr: u32) -> [u8; 16] {
    let b = addr.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// An IPv6 address as the context holds it (four network-order words).
#[inline(always)]
fn bytes(words: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = words.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// A packet's socket tuple, as `bpf_skc_lookup_tcp` takes it.
struct Tuple {
    tuple: bpf_sock_tuple,
    v4: bool,
}

impl Tuple {
    /// The packet's addresses and source port, with `dport` (host order)
    /// as the destination port; in network order.
    #[inline(always)]
    fn of(l4: &L4, dport: u16) -> Self {
        // SAFETY: plain data; zero is a valid value of every field.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        let v4 = is_v4_mapped(&l4.dst);
        let base = (&raw mut tuple).cast::<u8>();
        // SAFETY: byte copies into the tuple's own storage, within its
        // size: IPv4's saddr and daddr are its first 8 bytes, IPv6's its
        // first 32.
        unsafe {
            if v4 {
                core::ptr::copy_nonoverlapping(l4.src.as_ptr().add(12), base, 4);
                core::ptr::copy_nonoverlapping(l4.dst.as_ptr().add(12), base.add(4), 4);
                tuple.__bindgen_anon_1.ipv4.sport = l4.src_port.to_be();
                tuple.__bindgen_anon_1.ipv4.dport = dport.to_be();
            } else {
                core::ptr::copy_nonoverlapping(l4.src.as_ptr(), base, 16);
                core::ptr::copy_nonoverlapping(l4.dst.as_ptr(), base.add(16), 16);
                tuple.__bindgen_anon_1.ipv6.sport = l4.src_port.to_be();
                tuple.__bindgen_anon_1.ipv6.dport = dport.to_be();
            }
        }
        Self { tuple, v4 }
    }

    /// `bpf_skc_lookup_tcp` in the packet's network namespace:
    /// established, request and TIME_WAIT sockets by the whole tuple, then
    /// a listener by the destination. Null when none.
    #[inline(always)]
    fn lookup(&mut self, ctx: &TcContext) -> *mut bpf_sock {
        // SAFETY: sizes of the union's members.
        let size = unsafe {
            match self.v4 {
                true => size_of_val(&self.tuple.__bindgen_anon_1.ipv4),
                false => size_of_val(&self.tuple.__bindgen_anon_1.ipv6),
            }
        };
        // SAFETY: the program's own skb and a tuple on the stack of
        // `size` bytes; every caller checks the result for null.
        unsafe {
            bpf_skc_lookup_tcp(
                ctx.skb.skb.cast::<c_void>(),
                &mut self.tuple,
                size as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        }
    }
}
