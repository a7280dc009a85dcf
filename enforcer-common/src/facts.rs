//! Names and numbers shared by the kernel-facts programs
//! (`enforcer-ebpf/src/facts.rs`) and the tests that drive them
//! (`tests/tests/kernel_facts.rs`).
//!
//! The kernel-facts programs are small probes that prove, on the running
//! kernel, each mechanism the eBPF datapath relies on (see
//! ARCHITECTURE.md). They are not part of the datapath.

/// Socket mark that `facts_connect4` / `facts_connect6` stamp on every
/// socket that connects from the cgroup they are attached to.
pub const CONNECT_MARK: u32 = 0x00c0_ffee;

/// Map: IPv4 source prefix → packet mark, read by `facts_tc_ingress`.
pub const MAP_SRC_MARK_V4: &str = "FACTS_SRC_V4";
/// Map: IPv6 source prefix → packet mark, read by `facts_tc_ingress`.
pub const MAP_SRC_MARK_V6: &str = "FACTS_SRC_V6";
/// Map: one `u64` counter of packets dropped by `facts_egress_drop`.
pub const MAP_EGRESS_DROPS: &str = "FACTS_DROPS";

/// Socket mark that `facts_sendmsg4` / `facts_sendmsg6` stamp on every
/// socket that sends an unconnected datagram from their cgroup.
pub const SENDMSG_MARK: u32 = 0x00be_ef00;

/// Map: (socket cookie, destination, port) of every datagram the sendmsg
/// probes saw, as `enforcer_common::maps::UdpTrapKey` → 1.
pub const MAP_SENT: &str = "FACTS_SENT";
/// Map: one `u64` counter of ICMP packets dropped by `facts_egress_icmp`.
pub const MAP_ICMP_DROPS: &str = "FACTS_ICMP_DROPS";

/// Program names, as the loader finds them in the object.
pub const PROG_CONNECT4: &str = "facts_connect4";
pub const PROG_CONNECT6: &str = "facts_connect6";
pub const PROG_TC_INGRESS: &str = "facts_tc_ingress";
pub const PROG_EGRESS_DROP: &str = "facts_egress_drop";
pub const PROG_SENDMSG4: &str = "facts_sendmsg4";
pub const PROG_SENDMSG6: &str = "facts_sendmsg6";
/// Socket filter for `-m bpf --object-pinned`: matches a datagram whose
/// (socket cookie, destination, port) a sendmsg probe recorded.
pub const PROG_SENT_MATCH: &str = "facts_sent_match";
/// cgroup_skb egress: drops ICMP and ICMPv6 packets, passes the rest.
pub const PROG_EGRESS_ICMP: &str = "facts_egress_icmp";

/// Entries each LPM trie of the probes can hold.
pub const LPM_MAX_ENTRIES: u32 = 64;
