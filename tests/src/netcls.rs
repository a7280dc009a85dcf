//! A private mount of the net_cls cgroup v1 hierarchy, for tests of PUs
//! whose cgroup is a net_cls cgroup.
//!
//! This machine leaves the net_cls controller unmounted (`/proc/cgroups`
//! shows it in hierarchy 0). [`NetClsMount::new`] mounts it at a fresh
//! directory named with the harness prefix; dropping it unmounts and
//! removes the directory, also when the test panics. Tests running at the
//! same time each mount their own directory: the kernel gives them the
//! same hierarchy (a controller lives in one hierarchy at a time), which
//! stays until the last mount is gone and it has no child cgroups left —
//! so every child cgroup ([`crate::cgroup::Cgroup::named`] under
//! [`NetClsMount::path`]) must be dropped before its mount.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::unique_name;

/// The net_cls hierarchy mounted at a directory of the test's own.
#[derive(Debug)]
pub struct NetClsMount {
    path: PathBuf,
}

impl NetClsMount {
    /// `mount -t cgroup -o net_cls <name> <tmp>/<name>`.
    pub fn new() -> Result<Self> {
        let name = unique_name();
        let path = std::env::temp_dir().join(&name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        if let Err(e) = mount(
            Some(name.as_str()),
            &path,
            Some("cgroup"),
            MsFlags::empty(),
            Some("net_cls"),
        ) {
            let _ = std::fs::remove_dir(&path);
            bail!(
                "mounting the net_cls cgroup v1 hierarchy at {} failed: {e} (is the \
                 net_cls controller free, i.e. in hierarchy 0 of /proc/cgroups, or \
                 mounted with net_cls alone?)",
                path.display()
            );
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The class id of the cgroup at `dir` (below this mount).
    pub fn classid(dir: &Path) -> Result<u32> {
        let file = dir.join("net_cls.classid");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("parsing {}: {text:?}", file.display()))
    }
}

/// How many cgroups the net_cls hierarchy has, its root included, from
/// `/proc/cgroups`; a removed cgroup counts until the kernel frees it.
fn net_cls_cgroups() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cgroups").ok()?;
    let line = text.lines().find(|l| l.starts_with("net_cls\t"))?;
    line.split('\t').nth(2)?.parse().ok()
}

impl Drop for NetClsMount {
    fn drop(&mut self) {
        // The kernel destroys the hierarchy when its last mount goes and
        // it has no child cgroup, and a removed child stays one until it
        // is freed, a moment later: wait for that, or the hierarchy would
        // outlive every mount. (Another test's children keep it longer;
        // the last test to unmount waits for them.)
        let deadline = Instant::now() + Duration::from_secs(5);
        while net_cls_cgroups().is_some_and(|n| n > 1) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // A child cgroup being removed can keep the mount busy briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match umount2(&self.path, MntFlags::empty()) {
                Ok(()) => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!(
                        "warning: unmounting {} failed ({e}); detaching it",
                        self.path.display()
                    );
                    let _ = umount2(&self.path, MntFlags::MNT_DETACH);
                    break;
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}
