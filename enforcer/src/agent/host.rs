//! What the agent takes from the host before it starts: the network
//! namespace it runs in, and where cgroup v2, a net_cls cgroup v1
//! hierarchy and bpffs are mounted.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// Where named network namespaces live (`ip netns add`).
const NETNS_DIR: &str = "/run/netns";

/// Checks a `--netns` name: one file name under `/run/netns`.
pub fn netns_name(name: &str) -> Result<String, String> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        Err(format!(
            "{name:?} is not a network namespace name (a file name under {NETNS_DIR})"
        ))
    } else {
        Ok(name.to_owned())
    }
}

/// Moves the calling thread into the named network namespace.
///
/// Call it before any other thread exists: a thread inherits the
/// namespace of the thread that creates it, so every thread the agent
/// starts later (tokio's, the trap's, the datapath owner's) is inside.
/// Only the network namespace changes: `/sys/fs/cgroup` and `/sys/fs/bpf`
/// stay visible, unlike under `ip netns exec`, which remounts `/sys`.
pub fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let file = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    // SAFETY: setns(2) only reads the descriptor, which `file` keeps open
    // for the duration of the call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("entering network namespace {}", path.display()));
    }
    Ok(())
}

/// The mounts the agent needs, from `/proc/self/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounts {
    /// The first cgroup v2 mount (`/sys/fs/cgroup` on a unified host,
    /// `/sys/fs/cgroup/unified` on a hybrid one).
    pub cgroup2: Option<PathBuf>,
    /// The first cgroup v1 mount with the net_cls controller (alone or
    /// beside others, as in `/sys/fs/cgroup/net_cls,net_prio`).
    pub net_cls: Option<PathBuf>,
    /// The bpffs mount, `/sys/fs/bpf` when it is one of several.
    pub bpffs: Option<PathBuf>,
}

impl Mounts {
    const CONVENTIONAL_BPFFS: &str = "/sys/fs/bpf";

    pub fn read() -> Result<Self> {
        let text =
            std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
        Ok(Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        let mounts: Vec<(PathBuf, &str, &str)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(' ');
                let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
                Some((unescape(target), fstype, fields.next().unwrap_or_default()))
            })
            .collect();
        let of_type = |fstype: &'static str| {
            mounts
                .iter()
                .filter(move |(_, t, _)| *t == fstype)
                .map(|(path, _, _)| path.clone())
        };
        let net_cls = mounts
            .iter()
            .find(|(_, t, options)| *t == "cgroup" && options.split(',').any(|o| o == "net_cls"))
            .map(|(path, _, _)| path.clone());
        let bpffs = of_type("bpf")
            .find(|p| p == Path::new(Self::CONVENTIONAL_BPFFS))
            .or_else(|| of_type("bpf").next());
        Self {
            cgroup2: of_type("cgroup2").next(),
            net_cls,
            bpffs,
        }
    }

    /// Only cgroup v2, at `dir` (tests of the config's host checks).
    #[cfg(test)]
    pub fn cgroup2_at(dir: &Path) -> Self {
        Self {
            cgroup2: Some(dir.to_path_buf()),
            net_cls: None,
            bpffs: None,
        }
    }

    /// The cgroup v2 mount, or the conventional one with a warning (a
    /// linux-process PU's cgroup is then reported missing by validation).
    pub fn cgroup2_or_default(&self) -> PathBuf {
        self.cgroup2.clone().unwrap_or_else(|| {
            let default = PathBuf::from(crate::policy::CgroupV2Host::DEFAULT_MOUNT);
            tracing::warn!(
                "no cgroup2 mount in /proc/self/mounts; assuming {}",
                default.display()
            );
            default
        })
    }

    /// The bpffs mount, or the conventional one with a warning (the eBPF
    /// datapath then fails to pin, naming the path).
    pub fn bpffs_or_default(&self) -> PathBuf {
        self.bpffs.clone().unwrap_or_else(|| {
            tracing::warn!(
                "no bpffs mount in /proc/self/mounts; assuming {} \
                 (mount it with `mount -t bpf bpf {0}`)",
                Self::CONVENTIONAL_BPFFS
            );
            PathBuf::from(Self::CONVENTIONAL_BPFFS)
        })
    }
}

/// Undoes the octal escapes of `/proc/self/mounts` (`\040` for a space).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Refuses to go on unless `path` can hold a Unix socket address.
pub fn check_socket_path(path: &Path) -> Result<()> {
    // sun_path is 108 bytes including the terminating NUL.
    const MAX: usize = 107;
    let len = path.as_os_str().len();
    if len > MAX {
        bail!(
            "control socket path {} is {len} bytes long; a Unix socket path holds at most {MAX}",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_and_bpffs_mounts() {
        let text = "sysfs /sys sysfs rw 0 0\n\
                    cgroup /sys/fs/cgroup/net_prio cgroup rw,net_prio 0 0\n\
                    cgroup /sys/fs/cgroup/net_cls,net_prio cgroup rw,net_cls,net_prio 0 0\n\
                    cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n\
                    bpf /mnt/other\\040bpf bpf rw 0 0\n\
                    bpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        let mounts = Mounts::parse(text);
        assert_eq!(
            mounts.cgroup2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mounts.bpffs.as_deref(), Some(Path::new("/sys/fs/bpf")));
        assert_eq!(
            mounts.net_cls.as_deref(),
            Some(Path::new("/sys/fs/cgroup/net_cls,net_prio"))
        );

        let only_other = Mounts::parse("bpf /mnt/other\\040bpf bpf rw 0 0\n");
        assert_eq!(
            only_other.bpffs.as_deref(),
            Some(Path::new("/mnt/other bpf"))
        );
        assert_eq!((only_other.cgroup2, only_other.net_cls), (None, None));
        assert_eq!(Mounts::parse("").bpffs, None);
    }

    #[test]
    fn unescapes_only_octal_escapes() {
        assert_eq!(unescape("/a\\011b\\\\c\\9"), PathBuf::from("/a\tb\\\\c\\9"));
        assert_eq!(unescape("/trailing\\04"), PathBuf::from("/trailing\\04"));
    }

    #[test]
    fn netns_names_are_single_file_names() {
        assert_eq!(netns_name("agentdev1"), Ok("agentdev1".into()));
        for bad in ["", ".", "..", "a/b", "/run/netns/x"] {
            assert!(netns_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn socket_paths_must_fit_sun_path() {
        assert!(check_socket_path(Path::new("/run/enforcer/enforcer.sock")).is_ok());
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(103)));
        assert!(check_socket_path(&long).is_err());
    }
}
