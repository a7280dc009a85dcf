//! Every map of the datapath, declared once. Types and capacities come
//! from `enforcer_common::maps`, which the loader shares.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use enforcer_common::maps::{
    AclEntry, ExposedService, FLOW_EVENTS_BYTES, FlowEvent, MAX_ACL_PREFIXES, MAX_EXPOSED_PORTS,
    MAX_NETS, MAX_PENDING_FLOWS, MAX_PROXY_LISTENERS, MAX_PUS, MAX_REUSED_TUPLES, MAX_UDP_ANSWERS,
    MAX_UDP_TRAPS, NetKey, PendingFlowKey, PortKey, PuCounts, ReusedTuple, UdpAnswerKey,
    UdpTrapKey,
};
use enforcer_common::proxy::{
    MAX_REDIRECTS, MAX_SERVICE_PREFIXES, PeerKey, ProxyPorts, Redirect, ServiceEntry,
};

/// Global sets (target TCP, target UDP, excluded), by scope.
#[map(name = "NETS")]
pub static NETS: LpmTrie<NetKey, u8> = LpmTrie::with_max_entries(MAX_NETS, 0);

/// Per PU slot and generation: the ACL rules covering each prefix.
#[map(name = "ACLS")]
pub static ACLS: LpmTrie<NetKey, AclEntry> = LpmTrie::with_max_entries(MAX_ACL_PREFIXES, 0);

/// cgroup id of a PU's cgroup → its slot.
#[map(name = "PU_BY_CGROUP")]
pub static PU_BY_CGROUP: HashMap<u64, u32> = HashMap::with_max_entries(MAX_PUS, 0);

/// Slot → the policy generation in force (0 or 1). One write of this
/// flips a PU from its old policy to its new one.
#[map(name = "PU_GENERATION")]
pub static PU_GENERATION: Array<u32> = Array::with_max_entries(MAX_PUS, 0);

/// Slot → connections the hooks decided, per CPU.
#[map(name = "PU_COUNTS")]
pub static PU_COUNTS: PerCpuArray<PuCounts> = PerCpuArray::with_max_entries(MAX_PUS, 0);

/// A uid PU's uid → its slot.
#[map(name = "PU_BY_UID")]
pub static PU_BY_UID: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PUS, 0);

/// The namespace-wide PU (the host PU of a local-server agent, or the
/// container PU of a remote-container or sidecar one): its slot plus one,
/// 0 while there is none.
#[map(name = "FALLBACK_PU")]
pub static FALLBACK_PU: Array<u32> = Array::with_max_entries(1, 0);

/// A PU's listening port → its slot (`enforcer_common::maps::port_owner`:
/// with `PORT_OF_SERVICE` set for a host-service PU's): which PU an
/// incoming connection is for, and which host-service PU a socket bound
/// to the port belongs to.
#[map(name = "PU_PORTS")]
pub static PU_PORTS: HashMap<PortKey, u32> = HashMap::with_max_entries(MAX_PUS * 4, 0);

/// Logged decisions (`FlowEvent`), read by the agent for its flow log.
#[map(name = "FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

/// Unconnected UDP datagrams a sendmsg hook decided to trap, by socket and
/// destination; the fixed netfilter rule's socket filter reads it.
#[map(name = "UDP_TRAPS")]
pub static UDP_TRAPS: LruHashMap<UdpTrapKey, u8> = LruHashMap::with_max_entries(MAX_UDP_TRAPS, 0);

/// Peers a PU's UDP service may answer, written by TC ingress when a
/// network ACL accepts a datagram, read by the sendmsg and connect hooks.
#[map(name = "UDP_ANSWERS")]
pub static UDP_ANSWERS: LruHashMap<UdpAnswerKey, u64> =
    LruHashMap::with_max_entries(MAX_UDP_ANSWERS, 0);

/// App-side flow events held back until the socket's first packet fills
/// in the source (`policy::Deferral`); the egress program emits them.
#[map(name = "PENDING_FLOWS")]
pub static PENDING_FLOWS: LruHashMap<PendingFlowKey, FlowEvent> =
    LruHashMap::with_max_entries(MAX_PENDING_FLOWS, 0);

/// One counter: decisions whose events are waiting in `PENDING_FLOWS`, so
/// that the egress program looks a TCP or UDP packet's socket up only
/// while there may be some. It may overcount (a connection whose first
/// packet never leaves, an entry the LRU evicted), never undercount: the
/// cost of an overcount is that lookup per packet, never a lost line.
#[map(name = "PENDING_COUNT")]
pub static PENDING_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// Per PU slot (the scope) and prefix: the port ranges of the PU's
/// dependent services covering it (`proxy::redirect`).
#[map(name = "PROXY_SERVICES")]
pub static PROXY_SERVICES: LpmTrie<NetKey, ServiceEntry> =
    LpmTrie::with_max_entries(MAX_SERVICE_PREFIXES, 0);

/// Slot → its proxy and DNS proxy ports (0: none).
#[map(name = "PROXY_PORTS")]
pub static PROXY_PORTS: Array<ProxyPorts> = Array::with_max_entries(MAX_PUS, 0);

/// A redirected socket's cookie → where it was going.
#[map(name = "REDIRECTS")]
pub static REDIRECTS: LruHashMap<u64, Redirect> = LruHashMap::with_max_entries(MAX_REDIRECTS, 0);

/// A redirected TCP connection's client end → where it was going: what
/// the proxy's accepted socket asks for.
#[map(name = "REDIRECTS_BY_PEER")]
pub static REDIRECTS_BY_PEER: LruHashMap<PeerKey, Redirect> =
    LruHashMap::with_max_entries(MAX_REDIRECTS, 0);

/// A PU's exposed TCP port → the proxy incoming connections to it go to
/// (`exposed`).
#[map(name = "EXPOSED")]
pub static EXPOSED: HashMap<u16, ExposedService> = HashMap::with_max_entries(MAX_EXPOSED_PORTS, 0);

/// Proxy listeners by proxy port (a SOCKHASH), written by TC ingress when it
/// parks a tuple in `REUSED_TUPLES`, read by the sk_lookup program.
#[map(name = "PROXY_LISTENERS")]
pub static PROXY_LISTENERS: SockHash<u32> = SockHash::with_max_entries(MAX_PROXY_LISTENERS, 0);

/// SYNs reusing a TIME_WAIT tuple of an exposed port → the proxy port
/// (`exposed`).
#[map(name = "REUSED_TUPLES")]
pub static REUSED_TUPLES: LruHashMap<ReusedTuple, u16> =
    LruHashMap::with_max_entries(MAX_REUSED_TUPLES, 0);
