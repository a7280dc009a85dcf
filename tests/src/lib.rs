//! Kernel test harness for the enforcer.
//!
//! Every privileged test builds its own little world — network namespaces,
//! veth pairs, cgroups — with unique names, and tears it down in `Drop`,
//! also when the test panics. Nothing here touches the machine's root
//! network namespace or its root cgroup.
//!
//! - [`privilege`]: what a privileged test needs, and the loud failure (or
//!   the explicit, opt-in skip) when it is missing.
//! - [`netns`], [`cgroup`], [`traffic`]: namespaces and veth pairs,
//!   cgroups, TCP servers and clients — the library's
//!   [`enforcer::sandbox`], which the demo uses too — plus the test-only
//!   UDP, raw-packet and `nettool` helpers.
//! - [`netfilter`]: rules loaded into a namespace and their counters.
//! - [`netcls`]: a private mount of the net_cls cgroup v1 hierarchy.
//! - [`leftovers`]: what a run left on the machine (must be nothing).
//! - [`config`]: agent configs built as values, written out as TOML.
//! - [`roles`]: peers on host `b` by role, one source address each.
//! - [`matrix`]: a test body run on both datapaths and/or both families.
//! - [`world`]: one PU, a few UDP peers, the agent (targets and marks
//!   suites).
//! - [`two_agents`]: two hosts, each running its own agent with its own
//!   key pair, PUs on both (the identity handshake suite).

pub mod agent;
pub mod bench;
pub mod cgroup;
pub mod config;
pub mod leftovers;
pub mod matrix;
pub mod netcls;
pub mod netfilter;
pub mod netns;
pub mod privilege;
pub mod proxy;
pub mod roles;
pub mod seccomp;
pub mod traffic;
pub mod two_agents;
pub mod world;

/// Prefix of every kernel object the harness creates (namespaces, cgroups,
/// pins), so that [`leftovers`] can find whatever a run left behind.
pub const NAME_PREFIX: &str = enforcer::sandbox::TEST_PREFIX;

/// A name unique to this process and call: `enft<pid>x<n>`.
pub fn unique_name() -> String {
    enforcer::sandbox::unique_name(NAME_PREFIX)
}
