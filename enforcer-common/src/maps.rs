//! Keys, values and sizes of the eBPF datapath's maps, shared by the
//! programs (`enforcer-ebpf/src/main.rs`) and the loader
//! (`enforcer/src/datapath/ebpf/`).
//!
//! IPv4 and IPv6 share every map: an IPv4 address is stored as its
//! IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), so one LPM trie and one code
//! path serve both families. Each trie key starts with a 32-bit *scope*
//! (which global set, or which PU and policy generation, and which
//! family), always matched in full, followed by the address. The family
//! bit keeps an IPv6 prefix that happens to cover `::ffff:0:0/96` (such as
//! `::/1`, half of "all of IPv6") from matching IPv4 traffic, as an
//! ip6tables set never sees IPv4 packets.

/// Global sets in [`NETS`](MAP_NETS), by scope.
pub const SCOPE_TARGET_TCP: u32 = 1;
pub const SCOPE_TARGET_UDP: u32 = 2;
pub const SCOPE_EXCLUDED: u32 = 3;

/// Map names, as the loader finds them in the object.
pub const MAP_NETS: &str = "NETS";
pub const MAP_ACLS: &str = "ACLS";
pub const MAP_PU_BY_CGROUP: &str = "PU_BY_CGROUP";
pub const MAP_PU_GENERATION: &str = "PU_GENERATION";
pub const MAP_PU_COUNTS: &str = "PU_COUNTS";
pub const MAP_PU_PORTS: &str = "PU_PORTS";
pub const MAP_FLOW_EVENTS: &str = "FLOW_EVENTS";
pub const MAP_UDP_TRAPS: &str = "UDP_TRAPS";
pub const MAP_UDP_ANSWERS: &str = "UDP_ANSWERS";
pub const MAP_PU_BY_UID: &str = "PU_BY_UID";
pub const MAP_FALLBACK_PU: &str = "FALLBACK_PU";
pub const MAP_EXPOSED: &str = "EXPOSED";
pub const MAP_PROXY_LISTENERS: &str = "PROXY_LISTENERS";
pub const MAP_REUSED_TUPLES: &str = "REUSED_TUPLES";

/// Bytes of the flow-log ring buffer (a power of two, a multiple of the
/// page size).
pub const FLOW_EVENTS_BYTES: u32 = 256 * 1024;

/// Program names.
pub const PROG_CONNECT4: &str = "enforcer_connect4";
pub const PROG_CONNECT6: &str = "enforcer_connect6";
pub const PROG_SENDMSG4: &str = "enforcer_sendmsg4";
pub const PROG_SENDMSG6: &str = "enforcer_sendmsg6";
/// The TC ingress classifier, attached to every interface of the agent's
/// network namespace.
pub const PROG_INGRESS: &str = "enforcer_ingress";
/// Every cgroup/sock_addr program, attached to each PU's cgroup.
pub const PU_PROGRAMS: [&str; 4] = [PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6];
/// The sk_lookup program, attached to the agent's network namespace: hands
/// a SYN that reuses a TIME_WAIT tuple of an exposed port to the proxy
/// (`enforcer-ebpf/src/exposed.rs`).
pub const PROG_EXPOSED_LOOKUP: &str = "enforcer_exposed_lookup";
/// The cgroup_skb egress program, attached to each PU's cgroup: judges
/// what the sock_addr hooks never see (ICMP from ping and raw sockets).
pub const PROG_EGRESS: &str = "enforcer_egress";
/// The sock_addr programs of the *host scope*: the same decisions as
/// [`PU_PROGRAMS`], attached once to the host-scope cgroup (by default the
/// cgroup v2 root) while a PU that is not a cgroup's is configured — uid,
/// host-service, host and container PUs. They leave alone a task in a
/// linux-process PU's cgroup: its own cgroup's programs judge it.
pub const PROG_HOST_CONNECT4: &str = "enforcer_host_connect4";
pub const PROG_HOST_CONNECT6: &str = "enforcer_host_connect6";
pub const PROG_HOST_SENDMSG4: &str = "enforcer_host_sendmsg4";
pub const PROG_HOST_SENDMSG6: &str = "enforcer_host_sendmsg6";
pub const HOST_PROGRAMS: [&str; 4] = [
    PROG_HOST_CONNECT4,
    PROG_HOST_CONNECT6,
    PROG_HOST_SENDMSG4,
    PROG_HOST_SENDMSG6,
];
/// The cgroup_skb egress program of the host scope ([`HOST_PROGRAMS`]).
pub const PROG_HOST_EGRESS: &str = "enforcer_host_egress";
/// The cgroup/setsockopt guard, attached to each PU's cgroup beside
/// [`PU_PROGRAMS`]: a PU task's `SO_MARK` that would change the agent's
/// mark field is refused.
pub const PROG_MARK_GUARD: &str = "enforcer_mark_guard";
/// The same guard for the host scope ([`HOST_PROGRAMS`]).
pub const PROG_HOST_MARK_GUARD: &str = "enforcer_host_mark_guard";
/// The socket filter a fixed netfilter rule runs (`-m bpf
/// --object-pinned`): does this datagram's socket have a trap decision of
/// a sendmsg hook for this destination ([`UdpTrapKey`])?
pub const PROG_UDP_TRAP: &str = "enforcer_udp_trap";
/// The socket filters the handshake's global trap rules run (`-m bpf
/// --object-pinned`): is the packet's source (incoming) or destination
/// (outgoing) in the target networks of its protocol?
pub const PROG_TARGET_SRC: &str = "enforcer_target_src";
pub const PROG_TARGET_DST: &str = "enforcer_target_dst";
/// Every socket filter a fixed netfilter rule names by its pin.
pub const RULE_FILTERS: [&str; 3] = [PROG_UDP_TRAP, PROG_TARGET_SRC, PROG_TARGET_DST];

/// Globals the loader sets before loading: the mark layout's shift, the
/// cookie of the agent's network namespace, whether DNS is let through
/// (1 in sidecar mode, as the seed does for sidecars), and the agent's
/// own thread group id (its sockets are no PU's for the mark guard).
pub const GLOBAL_MARK_SHIFT: &str = "MARK_SHIFT";
pub const GLOBAL_NETNS_COOKIE: &str = "NETNS_COOKIE";
pub const GLOBAL_ALLOW_DNS: &str = "ALLOW_DNS";
pub const GLOBAL_AGENT_TGID: &str = "AGENT_TGID";

/// The DNS port a sidecar lets through.
pub const DNS_PORT: u16 = 53;

/// Capacities. A full map is an error in user space, never a silent drop.
pub const MAX_NETS: u32 = 65_536;
pub const MAX_ACL_PREFIXES: u32 = 262_144;
pub const MAX_PUS: u32 = 16_384;
/// ACL rules that can cover one address of one PU (after expansion into
/// one rule per protocol and port range).
pub const MAX_ACL_RULES: usize = 32;
/// Unconnected UDP destinations with a trap decision ([`UdpTrapKey`]):
/// an LRU map, so entries of closed sockets age out by themselves. An
/// entry is needed only from the sendmsg hook to the netfilter rule, a few
/// microseconds of the same system call, so the map can be small.
pub const MAX_UDP_TRAPS: u32 = 16_384;
/// UDP flows a PU's port may be answered on ([`UdpAnswerKey`]): an LRU
/// map, so flows that ended age out by themselves; one that was evicted
/// while still alive is answered again after the opening side's next
/// datagram.
pub const MAX_UDP_ANSWERS: u32 = 16_384;
/// How long after the opening side's last accepted datagram the other
/// side may answer it:
/// conntrack's timeout for a UDP flow seen both ways
/// (`nf_conntrack_udp_timeout_stream`, 120 s), which bounds the fallback's
/// reverse ESTABLISHED accept the same way.
pub const UDP_ANSWER_WINDOW_NS: u64 = 120_000_000_000;
/// How stale a [`UdpAnswerKey`]'s time may get before a datagram of the
/// flow refreshes it: one map write per second per flow, not per datagram.
pub const UDP_ANSWER_REFRESH_NS: u64 = 1_000_000_000;
/// Held-back flow events ([`PendingFlowKey`]): an LRU map, so events of
/// a connection whose first packet never leaves (the route lookup after
/// the hook failed, the trap dropped the SYN) age out by themselves.
pub const MAX_PENDING_FLOWS: u32 = 16_384;
/// Flow events one decision can hold back; a decision logging more (many
/// matching observe-continue rules) emits the rest without a source.
pub const MAX_DEFERRED_FLOWS: u32 = 4;
/// Depth of cgroup nesting searched for a PU's cgroup above the current
/// task's cgroup.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// Bits in an LPM key before the address: the scope.
pub const SCOPE_BITS: u32 = 32;
/// Bits of the IPv4-mapped prefix `::ffff:0:0/96`.
pub const V4_MAPPED_BITS: u32 = 96;

/// The `PU_PORTS` value of a port of a host-service PU: its slot with this
/// bit set. A host-service PU is also found by its ports on the
/// application side (a socket bound to one of them is the service's);
/// a listening port of a linux-process or uid PU only says where incoming
/// connections go.
pub const PORT_OF_SERVICE: u32 = 1 << 31;

/// The `PU_PORTS` value for a port of `slot`: [`PORT_OF_SERVICE`] set for a
/// host-service PU.
pub const fn port_owner(slot: u32, service: bool) -> u32 {
    if service {
        slot | PORT_OF_SERVICE
    } else {
        slot
    }
}

/// The slot of a `PU_PORTS` value.
pub const fn port_slot(owner: u32) -> u32 {
    owner & !PORT_OF_SERVICE
}

/// A PU's listening port: which PU an incoming connection is for.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub pad: u8,
    /// Host order.
    pub port: u16,
}

impl PortKey {
    pub const fn new(proto: u8, port: u16) -> Self {
        Self {
            proto,
            pad: 0,
            port,
        }
    }
}

/// A sendmsg hook's trap decision for one unconnected UDP datagram: its
/// socket (cookie), destination address (IPv4-mapped for IPv4) and port.
/// The hook writes it before the datagram is built; the fixed netfilter
/// rule's socket filter finds it by the datagram's own socket and
/// destination (a socket mark set in the hook would miss the datagram:
/// `udp_sendmsg` reads the mark before the hook runs).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpTrapKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub pad: [u8; 6],
}

impl UdpTrapKey {
    pub const fn new(cookie: u64, addr: [u8; 16], port: u16) -> Self {
        Self {
            cookie,
            addr,
            port,
            pad: [0; 6],
        }
    }
}

/// A UDP flow between a PU's port and a peer that one side of the PU's
/// ACLs accepted lately, so that the other way is let through too (SPEC:
/// "UDP accepts add a reverse ESTABLISHED accept on the other side"):
/// - opened by the peer ([`DIRECTION_NET`]): TC ingress let a datagram
///   through to the PU's port because a network ACL accepts its source;
///   the PU may answer from that port (the sendmsg and connect hooks);
/// - opened by the PU ([`DIRECTION_APP`]): a sendmsg or connect hook let a
///   datagram out from the PU's port because an application ACL accepts
///   its destination; the peer's answers may come in to that port (TC
///   ingress).
///
/// The value is the time (`bpf_ktime_get_ns`) of the opening side's last
/// such datagram.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpAnswerKey {
    /// The peer (IPv4-mapped for IPv4).
    pub peer: [u8; 16],
    /// Host order, as the other ports here.
    pub peer_port: u16,
    /// The PU's port.
    pub local_port: u16,
    /// Which side opened the flow: [`DIRECTION_NET`] or [`DIRECTION_APP`].
    pub opened_by: u8,
    pub pad: [u8; 3],
}

impl UdpAnswerKey {
    pub const fn new(peer: [u8; 16], peer_port: u16, local_port: u16, opened_by: u8) -> Self {
        Self {
            peer,
            peer_port,
            local_port,
            opened_by,
            pad: [0; 3],
        }
    }
}

/// A flow event a connect or sendmsg hook held back until its socket's
/// first packet, which carries the source address and port the hook
/// cannot know yet: the socket (cookie) and the event's place among that
/// decision's events (an observe-continue rule's, then the deciding
/// rule's).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingFlowKey {
    pub cookie: u64,
    pub index: u32,
    pub pad: u32,
}

impl PendingFlowKey {
    pub const fn new(cookie: u64, index: u32) -> Self {
        Self {
            cookie,
            index,
            pad: 0,
        }
    }
}

/// Ports TCP listeners may expose to a proxy ([`ExposedService`]): one
/// entry per port at most, and a port is one PU's.
pub const MAX_EXPOSED_PORTS: u32 = 65_536;

/// An exposed service (issue 6): TC ingress hands an incoming TCP
/// connection to this port (the map's key, host order) to the proxy
/// listening on `proxy_port` at the same address, in place of the nat
/// `REDIRECT` of the fallback (`enforcer-ebpf/src/exposed.rs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExposedService {
    /// The PU's slot, for its counters.
    pub slot: u32,
    /// Host order.
    pub proxy_port: u16,
    pub pad: u16,
}

impl ExposedService {
    pub const fn new(slot: u32, proxy_port: u16) -> Self {
        Self {
            slot,
            proxy_port,
            pad: 0,
        }
    }
}

/// Proxy listeners TC ingress found (a SOCKHASH keyed by the proxy port)
/// for the sk_lookup program: one per PU with a proxy port at most.
pub const MAX_PROXY_LISTENERS: u32 = MAX_PUS;
/// SYNs reusing a TIME_WAIT tuple, parked by TC ingress for the sk_lookup
/// program a moment later: an LRU map (an entry is used within the same
/// packet's processing).
pub const MAX_REUSED_TUPLES: u32 = 4096;

/// A SYN to an exposed port that reuses the tuple of a TIME_WAIT socket:
/// TC ingress lets the kernel end the TIME_WAIT and parks the tuple here
/// with the proxy port (the value); the sk_lookup program, which the
/// kernel then runs to find a listener, hands it to the proxy.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReusedTuple {
    /// The peer (IPv4-mapped for IPv4).
    pub remote: [u8; 16],
    /// The local address the SYN is for (IPv4-mapped for IPv4).
    pub local: [u8; 16],
    /// Host order.
    pub remote_port: u16,
    /// Host order: the exposed port.
    pub local_port: u16,
    pub pad: u32,
}

impl ReusedTuple {
    pub const fn new(remote: [u8; 16], local: [u8; 16], remote_port: u16, local_port: u16) -> Self {
        Self {
            remote,
            local,
            remote_port,
            local_port,
            pad: 0,
        }
    }
}

/// Trie key data: scope, then the address (IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetKey {
    /// Big-endian, so that the trie's byte-wise prefix compares it first.
    pub scope: [u8; 4],
    pub addr: [u8; 16],
}

impl NetKey {
    pub const fn new(scope: u32, addr: [u8; 16]) -> Self {
        Self {
            scope: scope.to_be_bytes(),
            addr,
        }
    }
}

/// The scope of a PU slot's application ACLs (destinations of its
/// outgoing traffic) under one policy generation (0 or 1).
pub const fn acl_scope(slot: u32, generation: u32) -> u32 {
    (slot << 2) | (generation & 1)
}

/// The scope of a PU slot's network ACLs (sources of its incoming
/// traffic) under one policy generation.
pub const fn net_acl_scope(slot: u32, generation: u32) -> u32 {
    (slot << 2) | 2 | (generation & 1)
}

/// Marks a scope as IPv4's.
const SCOPE_V4: u32 = 1 << 31;

/// A scope for one family: IPv4 entries and lookups carry [`SCOPE_V4`].
pub const fn family_scope(scope: u32, v4: bool) -> u32 {
    if v4 { scope | SCOPE_V4 } else { scope }
}

/// Is this address an IPv4 address in its mapped form (`::ffff:a.b.c.d`)?
/// Such a destination on an IPv6 socket is IPv4 traffic.
pub const fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[10] == 0xff && addr[11] == 0xff
}

/// IANA protocol numbers an ACL rule matches; 0 is "any".
pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

pub const ACTION_ACCEPT: u8 = 1;
pub const ACTION_REJECT: u8 = 2;

pub const OBSERVE_NONE: u8 = 0;
pub const OBSERVE_CONTINUE: u8 = 1;
pub const OBSERVE_APPLY: u8 = 2;

/// `AclRule::flags`: log the decision.
pub const RULE_LOG: u8 = 1;

/// `FlowEvent::policy` of the final drop (no ACL decided, the peer is not
/// in a target network): no ACL's index, logged as policy `default` like
/// the fallback's `<short>:default:` NFLOG prefix.
pub const POLICY_DEFAULT: u32 = u32::MAX;

/// One ACL rule: a protocol and a port range of one ACL.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AclRule {
    /// Inclusive destination (app side) or source (net side) port range;
    /// 0..=65535 for every port.
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    pub action: u8,
    pub observe: u8,
    pub flags: u8,
    /// Index of the ACL's policy id in the agent's table, for logs.
    pub policy: u32,
}

/// Everything the PU's ACLs say about the addresses under one prefix:
/// every rule whose network covers the prefix, in SPEC's evaluation order.
/// The first `specific` rules are the specific-protocol ACLs (evaluated
/// before the trap); the next `any` rules are the protocol-any ACLs
/// (evaluated after it).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AclEntry {
    pub specific: u32,
    pub any: u32,
    pub rules: [AclRule; MAX_ACL_RULES],
}

/// `FlowEvent::direction`: the PU's outgoing traffic (application ACLs).
pub const DIRECTION_APP: u8 = 0;
/// `FlowEvent::direction`: the PU's incoming traffic (network ACLs).
pub const DIRECTION_NET: u8 = 1;

/// One logged decision, as the hooks put it on the flow-log ring buffer:
/// a rule with [`RULE_LOG`] decided (or, observe-continue, matched), or
/// the final drop refused the connection ([`POLICY_DEFAULT`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowEvent {
    /// The PU's slot.
    pub slot: u32,
    /// The rule's `AclRule::policy` index, or [`POLICY_DEFAULT`].
    pub policy: u32,
    /// Addresses, IPv4-mapped for IPv4; all zero when not known (the
    /// source of an app-side refusal: no packet is ever built).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host order; 0 when not known (the source port of an app-side TCP
    /// refusal on a socket not bound yet).
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// [`ACTION_ACCEPT`] or [`ACTION_REJECT`].
    pub action: u8,
    /// [`OBSERVE_NONE`], [`OBSERVE_CONTINUE`] or [`OBSERVE_APPLY`].
    pub observe: u8,
    /// [`DIRECTION_APP`] or [`DIRECTION_NET`].
    pub direction: u8,
}

/// Connections of one PU as its hooks decided them.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PuCounts {
    /// Marked for the trap (the SYN goes to user space).
    pub trapped: u64,
    /// Accepted by an ACL.
    pub accepted: u64,
    /// Refused by an ACL or by the final drop.
    pub dropped: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four are #[repr(C)], Copy, made of integers and arrays
    // of integers with no padding that could leak (AclRule: 2+2+1+1+1+1+4;
    // AclEntry: 4+4+12*N; NetKey: 4+16; PuCounts: 3*8).
    unsafe impl aya::Pod for super::NetKey {}
    unsafe impl aya::Pod for super::AclRule {}
    unsafe impl aya::Pod for super::AclEntry {}
    unsafe impl aya::Pod for super::PuCounts {}
    // SAFETY: #[repr(C)], 4+4+16+16+2+2+1+1+1+1 = 48 bytes, no padding.
    unsafe impl aya::Pod for super::FlowEvent {}
    // SAFETY: #[repr(C)], 1+1+2 bytes, the pad byte always written as 0.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: #[repr(C)], 8+16+2+6 bytes, the pad always written as 0.
    unsafe impl aya::Pod for super::UdpTrapKey {}
    // SAFETY: #[repr(C)], 4+2+2 bytes, the pad always written as 0.
    unsafe impl aya::Pod for super::ExposedService {}
}
