//! What a privileged test needs, checked once per test.
//!
//! A privileged test starts with
//! `let Some(_env) = enforcer_tests::privilege::require() else { return };`
//! (or builds its world with [`require_then`]).
//! When something is missing it panics with a message listing exactly
//! what — unless `ENFORCER_SKIP_PRIVILEGED=1` is set, in which case it
//! prints a loud `SKIPPED` line and returns `None`. CI never sets it.

use std::path::{Path, PathBuf};

pub use enforcer::datapath::probe::mount_of_type;

/// The opt-out variable for machines that cannot run kernel tests.
pub const OPT_OUT_VAR: &str = "ENFORCER_SKIP_PRIVILEGED";

/// Tools the harness and the tests run.
const TOOLS: &[&str] = &[
    "ip",
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
    "ipset",
    "conntrack",
];

/// Facts about the machine a privileged test may rely on.
#[derive(Debug, Clone)]
pub struct Env {
    /// Where cgroup v2 is mounted (`/sys/fs/cgroup/unified` in the hybrid
    /// layout, `/sys/fs/cgroup` in the unified one).
    pub cgroup2: PathBuf,
    /// Where bpffs is mounted.
    pub bpffs: PathBuf,
}

/// Checks root, tools, bpffs and cgroup v2. See the module docs.
pub fn require() -> Option<Env> {
    match check() {
        Ok(env) => Some(env),
        Err(missing) => {
            let list = missing.join("\n  - ");
            if std::env::var(OPT_OUT_VAR).is_ok_and(|v| v == "1") {
                eprintln!("SKIPPED ({OPT_OUT_VAR}=1): this privileged test needs:\n  - {list}");
                None
            } else {
                panic!(
                    "this privileged test cannot run; missing:\n  - {list}\n\
                     Run `cargo xtask setup` as root (or set {OPT_OUT_VAR}=1 to skip \
                     privileged tests on purpose; CI never does)."
                );
            }
        }
    }
}

/// [`require`], then what `make` builds from its [`Env`] (a test's world):
/// `None` where privileged tests are skipped on purpose. For tests whose
/// world is all they need of the environment.
pub fn require_then<T>(make: impl FnOnce(&Env) -> anyhow::Result<T>) -> anyhow::Result<Option<T>> {
    require().map(|env| make(&env)).transpose()
}

fn check() -> Result<Env, Vec<String>> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (kernel tests create namespaces, programs and rules)".to_string());
    }
    for tool in TOOLS {
        if !on_path(tool) {
            missing.push(format!(
                "the `{tool}` command (apt-get install iptables ipset conntrack iproute2)"
            ));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let cgroup2 = mount_of_type(&mounts, "cgroup2");
    if cgroup2.is_none() {
        missing.push("a cgroup v2 mount".to_string());
    }
    let bpffs = mount_of_type(&mounts, "bpf");
    if bpffs.is_none() {
        missing.push("bpffs mounted (mount -t bpf bpf /sys/fs/bpf)".to_string());
    }
    match (cgroup2, bpffs) {
        (Some(cgroup2), Some(bpffs)) if missing.is_empty() => Ok(Env { cgroup2, bpffs }),
        _ => Err(missing),
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(tool))))
        .unwrap_or(false)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
