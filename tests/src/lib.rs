//! Kernel test harness for the enforcer.
//!
//! Every privileged test builds its own little world — network namespaces,
//! veth pairs, cgroups — with unique names, and tears it down in `Drop`,
//! also when the test panics. Nothing here touches the machine's root
//! network namespace or its root cgroup.
//!
//! - [`privilege`]: what a privileged test needs, and the loud failure (or
//!   the explicit, opt-in skip) when it is missing.
//! - [`netns`]: namespaces, veth pairs, running code or commands inside.
//! - [`cgroup`]: cgroup v2 directories and processes placed in them.
//! - [`traffic`]: TCP/UDP servers and clients, raw IP packets.
//! - [`netfilter`]: rules loaded into a namespace and their counters.
//! - [`leftovers`]: what a run left on the machine (must be nothing).

pub mod agent;
pub mod cgroup;
pub mod leftovers;
pub mod netfilter;
pub mod netns;
pub mod privilege;
pub mod seccomp;
pub mod traffic;

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every kernel object the harness creates (namespaces, cgroups,
/// pins), so that [`leftovers`] can find whatever a run left behind.
pub const NAME_PREFIX: &str = "enft";

/// A name unique to this process and call: `enft<pid>x<n>`, short enough
/// for an interface name (15 bytes) once a one-letter suffix is added.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{}x{n}", std::process::id() % 1_000_000)
}
