//! The facts about the host that validation needs, behind a trait so the
//! rest of the policy module stays pure and tests use a fake.

use std::path::PathBuf;

use super::pu::CgroupPath;

/// What validation asks the host.
pub trait HostFacts {
    /// Whether `path` (relative to the PU cgroups' mount: cgroup v2, or
    /// net_cls v1 with `[cgroups] version = "v1"`) is an existing cgroup
    /// directory.
    fn cgroup_dir_exists(&self, path: &CgroupPath) -> bool;
}

/// The real host: the cgroup hierarchy mounted at `mount` — cgroup v2, or
/// the net_cls v1 hierarchy when `[cgroups]` chose it. Which one it is,
/// is the datapath probe's question, not this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupV2Host {
    mount: PathBuf,
}

impl CgroupV2Host {
    /// Where systemd mounts the unified hierarchy.
    pub const DEFAULT_MOUNT: &'static str = "/sys/fs/cgroup";

    pub fn new(mount: impl Into<PathBuf>) -> Self {
        Self {
            mount: mount.into(),
        }
    }

    /// Where the hierarchy is mounted.
    pub fn mount(&self) -> &std::path::Path {
        &self.mount
    }
}

impl Default for CgroupV2Host {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MOUNT)
    }
}

impl HostFacts for CgroupV2Host {
    fn cgroup_dir_exists(&self, path: &CgroupPath) -> bool {
        // CgroupPath is relative with no `..`, so the join stays under the mount.
        self.mount.join(path.as_path()).is_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_directories_under_its_mount_only() {
        let mount = std::env::temp_dir().join(format!("enforcer-host-{}", std::process::id()));
        std::fs::create_dir_all(mount.join("enforcer/web")).unwrap();
        std::fs::write(mount.join("enforcer/file"), b"").unwrap();
        let host = CgroupV2Host::new(&mount);
        let exists = |p: &str| host.cgroup_dir_exists(&CgroupPath::new(p).unwrap());
        let found = (
            exists("enforcer/web"),
            exists("enforcer/file"),
            exists("enforcer/db"),
        );
        std::fs::remove_dir_all(&mount).unwrap();
        assert_eq!(found, (true, false, false));
    }
}
