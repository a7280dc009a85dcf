//! `cgroup/connect4|6` and `cgroup/sendmsg4|6` (unconnected UDP): the
//! application side of a PU's policy, decided before the first packet
//! leaves (SPEC, "Order of evaluation inside a PU", outgoing). One set is
//! attached to each linux-process PU's cgroup, another to the host scope
//! for the PUs that are no cgroup's (uid, host-service, host, container);
//! both make the same decision, for the PU [`judging_pu`] names — so each
//! task is judged once, by one PU, in SPEC's priority.
//!
//! The decision:
//!
//! 1. a destination in the excluded networks is never touched; else a
//!    PU's connection to one of its dependent services, or its UDP to
//!    port 53 with a DNS proxy, is redirected to its proxy (`proxy.rs`)
//!    and judged no further (the fallback's proxy chains accept it
//!    before any ACL);
//! 2. if the destination is not a target TCP network, the specific-protocol
//!    ACLs, in bucket order: accept marks the socket `AclAccept`, reject
//!    refuses the connect with EPERM;
//! 3. TCP to a target TCP network, UDP to a target UDP network: the socket
//!    is marked for the trap, and a fixed netfilter rule queues the SYN
//!    (or first datagram). An unconnected datagram's mark is read before
//!    the sendmsg hook runs, so there the decision goes into `UDP_TRAPS`
//!    by (socket cookie, destination, port) instead, and a fixed rule's
//!    socket filter (`udp_trap`) finds it by the datagram's own socket;
//! 4. the protocol-any ACLs;
//! 5. anything else is refused, and logged (policy `default`).
//!
//! Between 2 and 3, a sidecar lets DNS (UDP to port 53) through, as the
//! seed does.
//!
//! A UDP answer from one of the PU's listening ports to a peer whose
//! datagram to that port a network ACL accepted lately (`UDP_ANSWERS`,
//! written by TC ingress) goes out if the network ACLs in force still
//! accept that peer, whatever the application ACLs say: the fallback's
//! reverse ESTABLISHED accept (SPEC: "UDP accepts add a reverse
//! ESTABLISHED accept on the other side"). Anything else sent from the
//! service's port is judged as any datagram of the PU.
//!
//! A connection of a task no PU claims is left alone. A PU's socket that
//! carries the agent's injected or authorised kind is refused:
//! the agent's injected packets never come from a PU's task, and a mark a
//! PU set where `mark_guard` could not see it (before its host-service
//! PU's bind, before joining a PU's cgroup, or on a socket passed in)
//! would otherwise skip its ACLs and the trap in the fixed rules.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{
        bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_getsockopt, bpf_setsockopt,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use enforcer_common::{
    maps::{
        DIRECTION_APP, DNS_PORT, FlowEvent, PROTO_TCP, PROTO_UDP, PortKey, SCOPE_EXCLUDED,
        SCOPE_TARGET_TCP, SCOPE_TARGET_UDP, UdpTrapKey,
    },
    marks::{Class, Kind, MarkLayout},
};

use crate::maps::UDP_TRAPS;
use crate::policy::{
    AclVerdict, Count, Deferral, Scope, Side, acl_entry, agent_tgid, allow_dns, count,
    current_cgroup_pu, current_uid, evaluate, in_agent_netns, in_set, judging_pu, log_final_drop,
    mark_layout, port_pu,
};
use crate::udp_flows;

const PROCEED: i32 = 1;
const REFUSE: i32 = 0;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

/// What the deciding hook can do with a verdict. A connect stamps the
/// socket, and so every later packet of the connection. A datagram's mark
/// is read before the sendmsg hook runs, so a class written there would
/// only reach later datagrams: sendmsg hooks refuse or let through, and
/// record a trap decision in `UDP_TRAPS` for the datagram itself.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Connect,
    SendMsg,
}

#[cgroup_sock_addr(connect4)]
pub fn enforcer_connect4(ctx: SockAddrContext) -> i32 {
    hook_verdict(
        ctx.sock_addr,
        addr4(&ctx),
        false,
        Hook::Connect,
        Scope::PuCgroup,
    )
}

#[cgroup_sock_addr(connect6)]
pub fn enforcer_connect6(ctx: SockAddrContext) -> i32 {
    hook_verdict(
        ctx.sock_addr,
        addr6(&ctx),
        true,
        Hook::Connect,
        Scope::PuCgroup,
    )
}

#[cgroup_sock_addr(sendmsg4)]
pub fn enforcer_sendmsg4(ctx: SockAddrContext) -> i32 {
    hook_verdict(
        ctx.sock_addr,
        addr4(&ctx),
        false,
        Hook::SendMsg,
        Scope::PuCgroup,
    )
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enforcer_sendmsg6(ctx: SockAddrContext) -> i32 {
    hook_verdict(
        ctx.sock_addr,
        addr6(&ctx),
        true,
        Hook::SendMsg,
        Scope::PuCgroup,
    )
}

#[cgroup_sock_addr(connect4)]
pub fn enforcer_host_connect4(ctx: SockAddrContext) -> i32 {
    hook_verdict(
        ctx.sock_addr,
        addr4(&ctx),
        false,
        Hook::Connect,
        Scope::Host,
    )
}

#[cgroup_sock_addr(connect6)]
pub fn enforcer_host_connect6(ctx: SockAddrContext) -> i32 {
    hook_verdict(ctx.sock_addr, addr6(&ctx), true, Hook::Connect, Scope::Host)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn enforcer_host_sendmsg4(ctx: SockAddrContext) -> i32 {
    hook_verdict(
        ctx.sock_addr,
        addr4(&ctx),
        false,
        Hook::SendMsg,
        Scope::Host,
    )
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enforcer_host_sendmsg6(ctx: SockAddrContext) -> i32 {
    hook_verdict(ctx.sock_addr, addr6(&ctx), true, Hook::SendMsg, Scope::Host)
}

/// Records (`trap`) or forgets the trap decision for the datagram being
/// sent on this socket to `addr`:`port`; false when a trap decision could
/// not be recorded (the map refused the entry), so the caller refuses the
/// datagram rather than let it out untrapped. Only a decision that changed
/// (the target networks or the PU's policy did) has anything to forget; a
/// missing entry is fine. A full map evicts its least recently used
/// entry, never the one just written.
#[inline(always)]
fn remember_udp_trap(sa: *mut bpf_sock_addr, addr: [u8; 16], port: u16, trap: bool) -> bool {
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast::<c_void>()) };
    let key = UdpTrapKey::new(cookie, addr, port);
    if trap {
        UDP_TRAPS.insert(key, 1, 0).is_ok()
    } else {
        let _ = UDP_TRAPS.remove(key);
        true
    }
}

/// The IPv4 destination, IPv4-mapped.
#[inline(always)]
pub(crate) fn addr4(ctx: &SockAddrContext) -> [u8; 16] {
    // SAFETY: the kernel hands a valid context; user_ip4 is in network
    // order, so its in-memory bytes are the address octets.
    let o = unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
    ]
}

/// The IPv6 destination.
#[inline(always)]
pub(crate) fn addr6(ctx: &SockAddrContext) -> [u8; 16] {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // SAFETY: as above; each 32-bit word of user_ip6 is read whole, the
        // only access size the verifier allows for it.
        let word = unsafe { (*ctx.sock_addr).user_ip6[i] }.to_ne_bytes();
        addr[i * 4] = word[0];
        addr[i * 4 + 1] = word[1];
        addr[i * 4 + 2] = word[2];
        addr[i * 4 + 3] = word[3];
        i += 1;
    }
    addr
}

/// [`decide`]'s verdict for a connection or datagram it lets through to
/// the trap; the hook itself returns [`PROCEED`] for it.
const TRAP: i32 = 2;

/// What the hook returns for [`decide`]'s verdict; for a datagram, the
/// trap decision is recorded (or an earlier one forgotten) first. `v6`:
/// the hook is the IPv6 one (a redirect rewrites the hook's own fields).
#[inline(always)]
fn hook_verdict(sa: *mut bpf_sock_addr, addr: [u8; 16], v6: bool, hook: Hook, scope: Scope) -> i32 {
    let verdict = decide(sa, addr, v6, hook, scope);
    if hook == Hook::SendMsg && verdict != REFUSE {
        // SAFETY: valid context. The port is in network order in the low
        // 16 bits.
        let port = u16::from_be(unsafe { (*sa).user_port } as u16);
        if !remember_udp_trap(sa, addr, port, verdict == TRAP) {
            return REFUSE;
        }
    }
    match verdict {
        REFUSE => REFUSE,
        _ => PROCEED,
    }
}

/// The verdict for a connect or a datagram: [`PROCEED`], [`TRAP`] (proceed,
/// to be trapped) or [`REFUSE`].
#[inline(always)]
fn decide(sa: *mut bpf_sock_addr, addr: [u8; 16], v6: bool, hook: Hook, scope: Scope) -> i32 {
    if !in_agent_netns(sa.cast()) {
        return PROCEED;
    }
    // SAFETY: valid context. The port is in network order in the low 16 bits.
    let (proto, user_port) = unsafe { ((*sa).protocol as u8, (*sa).user_port) };
    let port = u16::from_be(user_port as u16);
    let local_port = bound_port(sa);
    let local = (local_port != 0).then(|| PortKey::new(proto, local_port));
    let Some(slot) = judging_pu(scope, current_cgroup_pu, current_uid, local) else {
        return PROCEED;
    };
    if carries_agent_kind(sa) {
        count(slot, Count::Dropped);
        return REFUSE;
    }
    if proto == PROTO_UDP && answers(slot, local_port, addr, port) {
        return apply(sa, slot, AclVerdict::Accept, hook);
    }
    if in_set(SCOPE_EXCLUDED, addr) {
        // A socket reconnected from a target to an excluded peer must not
        // keep its old class: excluded traffic is never touched.
        if hook == Hook::Connect {
            clear_class(sa);
        }
        return PROCEED;
    }
    // Before any ACL, as the fallback's proxy chains (SPEC: after the
    // excluded networks): the socket now goes to the PU's proxy, which is
    // no peer of its policy.
    if crate::proxy::redirect(sa, v6, slot, proto, addr, port) {
        if hook == Hook::Connect {
            clear_class(sa);
        }
        return PROCEED;
    }
    let entry = acl_entry(Side::App, slot, addr);
    let target_tcp = in_set(SCOPE_TARGET_TCP, addr);
    // The source address is not known before the first packet is routed;
    // the port is once the socket is bound: always by sendmsg (UDP binds
    // before its hook), by connect only if the application bound it. The
    // events of a decision that lets the connection through wait for its
    // first packet, which the egress program completes them from; a
    // refusal's go out now, as no packet will ever leave.
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast::<c_void>()) };
    let mut defer = Deferral::socket(cookie);
    let flow = FlowEvent {
        slot,
        src_port: local_port,
        dst: addr,
        dst_port: port,
        proto,
        direction: DIRECTION_APP,
        ..FlowEvent::default()
    };

    if !target_tcp
        && let Some(entry) = entry
        && let Some(verdict) = evaluate(entry, 0, entry.specific, port, &flow, &mut defer)
    {
        let verdict = apply(sa, slot, verdict, hook);
        if verdict != REFUSE && proto == PROTO_UDP {
            open_for_answers(slot, local_port, addr, port);
        }
        defer.finish(verdict == REFUSE);
        return verdict;
    }
    if allow_dns() && proto == PROTO_UDP && port == DNS_PORT {
        if hook == Hook::Connect {
            clear_class(sa);
        }
        defer.finish(false);
        return PROCEED;
    }
    if (proto == PROTO_TCP && target_tcp) || (proto == PROTO_UDP && in_set(SCOPE_TARGET_UDP, addr))
    {
        let class = if proto == PROTO_TCP {
            Class::TrapTcp
        } else {
            Class::TrapUdp
        };
        if hook == Hook::Connect {
            set_class(sa, class);
        }
        count(slot, Count::Trapped);
        defer.finish(false);
        return TRAP;
    }
    if let Some(entry) = entry
        && let Some(verdict) = evaluate(entry, entry.specific, entry.any, port, &flow, &mut defer)
    {
        let verdict = apply(sa, slot, verdict, hook);
        if verdict != REFUSE && proto == PROTO_UDP {
            open_for_answers(slot, local_port, addr, port);
        }
        defer.finish(verdict == REFUSE);
        return verdict;
    }
    defer.finish(true);
    log_final_drop(&flow);
    count(slot, Count::Dropped);
    REFUSE
}

#[inline(always)]
fn apply(sa: *mut bpf_sock_addr, slot: u32, verdict: AclVerdict, hook: Hook) -> i32 {
    match verdict {
        AclVerdict::Accept => {
            if hook == Hook::Connect {
                set_class(sa, Class::AclAccept);
            }
            count(slot, Count::Accepted);
            PROCEED
        }
        AclVerdict::Reject => {
            count(slot, Count::Dropped);
            REFUSE
        }
    }
}

/// Is this datagram (or UDP connect) from one of the PU's UDP ports an
/// answer to `peer`:`peer_port`, whose datagram to that port a network
/// ACL accepted lately ([`udp_flows::is_open`])?
#[inline(always)]
fn answers(slot: u32, local: u16, peer: [u8; 16], peer_port: u16) -> bool {
    local != 0
        && port_pu(PortKey::new(PROTO_UDP, local)) == Some(slot)
        && udp_flows::is_open(Side::Net, slot, &peer, peer_port, local)
}

/// A datagram (or UDP connect) an application ACL let out from one of the
/// PU's UDP ports opens the flow for the peer's answers to that port
/// ([`udp_flows::open`]), which TC ingress would otherwise judge as
/// datagrams to the PU's service.
#[inline(always)]
fn open_for_answers(slot: u32, local: u16, peer: [u8; 16], peer_port: u16) {
    if local != 0 && port_pu(PortKey::new(PROTO_UDP, local)) == Some(slot) {
        udp_flows::open(Side::App, peer, peer_port, local);
    }
}

/// Does this PU socket carry a mark kind the fixed netfilter rules accept
/// on — injected or authorised, which skip the ACLs and the trap? The
/// agent sets neither on a PU's sockets, and `mark_guard` refuses a PU
/// task's own `SO_MARK` — where it can tell the socket is a PU's: not one
/// marked before its host-service PU's bind, before its task joined a
/// PU's cgroup, or passed in over `SCM_RIGHTS`. Such a socket is refused
/// here, before its first packet. (The proxy kind only keeps a socket
/// from being redirected to a proxy; no rule accepts on it.) The agent's
/// own sockets are left alone, as the guard leaves them.
#[inline(always)]
fn carries_agent_kind(sa: *mut bpf_sock_addr) -> bool {
    let layout = mark_layout();
    let kind = socket_mark(sa) & layout.kind_mask();
    (kind == layout.kind(Kind::Injected) || kind == layout.kind(Kind::Authorised))
        // SAFETY: a helper without arguments; the high half is the tgid.
        && (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32 != agent_tgid()
}

/// The socket's local port, 0 while it is not bound.
#[inline(always)]
fn bound_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: `sk` of a sock_addr context is always a valid socket (the
    // verifier types it so); src_port is in host order.
    unsafe { (*(*sa).__bindgen_anon_1.sk).src_port as u16 }
}

/// Writes the class into the socket mark, keeping every other bit.
#[inline(always)]
fn set_class(sa: *mut bpf_sock_addr, class: Class) {
    rewrite_mark(sa, |layout, mark| layout.with_class(mark, class));
}

/// Clears the class from the socket mark, keeping every other bit.
#[inline(always)]
fn clear_class(sa: *mut bpf_sock_addr) {
    rewrite_mark(sa, |layout, mark| mark & !layout.class_mask());
}

/// The socket mark; 0 if it cannot be read (no bits set).
#[inline(always)]
fn socket_mark(sa: *mut bpf_sock_addr) -> u32 {
    let mut mark: u32 = 0;
    // SAFETY: `sa` is the program's context; the option buffer is a live
    // local of the stated length. A failed read leaves 0.
    unsafe {
        bpf_getsockopt(
            sa.cast::<c_void>(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast::<c_void>(),
            size_of::<u32>() as i32,
        );
    }
    mark
}

#[inline(always)]
fn rewrite_mark(sa: *mut bpf_sock_addr, rewrite: impl Fn(MarkLayout, u32) -> u32) {
    let mut mark = rewrite(mark_layout(), socket_mark(sa));
    // SAFETY: `sa` is the program's context; the option buffer is a live
    // local of the stated length.
    unsafe {
        bpf_setsockopt(
            sa.cast::<c_void>(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast::<c_void>(),
            size_of::<u32>() as i32,
        );
    }
}
