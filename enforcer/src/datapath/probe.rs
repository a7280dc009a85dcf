//! Which datapath this kernel can run, and why.
//!
//! `auto` picks eBPF when every kernel feature the eBPF datapath uses is
//! there, else iptables; `ebpf` insists and fails naming the first missing
//! feature; `iptables` never probes. Each feature is probed the kernel's
//! own way (a tiny map or program load, aya's feature probes), then the
//! real object is loaded once — without attaching anything — so a
//! verifier refusal counts as missing too.
//!
//! Before that, [`choose_cgroups`] decides which cgroups identify
//! linux-process PUs (`[cgroups] version`): cgroup v2, or net_cls v1 class
//! ids — which only the iptables datapath matches, so `auto` then picks
//! iptables without probing.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

use serde::{Deserialize, Serialize};

use super::DatapathKind;
use crate::policy::{CgroupSettings, CgroupV2Host, CgroupVersion, DatapathChoice};

/// Which cgroups identify linux-process PUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CgroupFlavour {
    /// cgroup v2 paths (`-m cgroup --path`, eBPF cgroup hooks).
    V2,
    /// net_cls cgroup v1 class ids (`-m cgroup --cgroup`, iptables only).
    NetClsV1,
}

impl std::fmt::Display for CgroupFlavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupFlavour::V2 => "cgroup v2",
            CgroupFlavour::NetClsV1 => "net_cls (cgroup v1)",
        })
    }
}

/// The cgroup flavour in use, the mount PU cgroup paths are relative to,
/// and a sentence saying why, for the log and `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupChoice {
    pub flavour: CgroupFlavour,
    pub mount: PathBuf,
    pub reason: String,
}

/// Resolves `[cgroups]` against the mounts found (`cgroup2`: the first
/// cgroup v2 mount; `net_cls`: the first cgroup v1 mount with the net_cls
/// controller). `auto` prefers cgroup v2, which the eBPF datapath needs
/// too, and takes net_cls only on a host without it. Only an explicit
/// `v1` fails, when no net_cls hierarchy is there; cgroup v2 that is not
/// mounted is assumed at its usual place (a linux-process PU's cgroup is
/// then reported missing by validation).
pub fn choose_cgroups(
    settings: &CgroupSettings,
    cgroup2: Option<&Path>,
    net_cls: Option<&Path>,
) -> anyhow::Result<CgroupChoice> {
    let configured = settings.net_cls_mount.as_deref();
    let net_cls_choice = |why: &str| -> anyhow::Result<CgroupChoice> {
        let (mount, from) = match (configured, net_cls) {
            (Some(mount), _) => (mount, "cgroups.net_cls_mount"),
            (None, Some(mount)) => (mount, "found in /proc/self/mounts"),
            (None, None) => bail!(
                "{why}, but no cgroup v1 hierarchy with the net_cls controller is mounted \
                 (mount -t cgroup -o net_cls net_cls /sys/fs/cgroup/net_cls, or set \
                 cgroups.net_cls_mount)"
            ),
        };
        Ok(CgroupChoice {
            flavour: CgroupFlavour::NetClsV1,
            mount: mount.to_path_buf(),
            reason: format!("{why}; net_cls at {} ({from})", mount.display()),
        })
    };
    let v2 = |why: &str| {
        let (mount, found) = match cgroup2 {
            Some(mount) => (mount, "mounted"),
            None => (
                Path::new(CgroupV2Host::DEFAULT_MOUNT),
                "assumed, none is mounted",
            ),
        };
        Ok(CgroupChoice {
            flavour: CgroupFlavour::V2,
            mount: mount.to_path_buf(),
            reason: format!("{why}; cgroup v2 at {} ({found})", mount.display()),
        })
    };
    match (settings.version, cgroup2, net_cls) {
        (CgroupVersion::V1, ..) => net_cls_choice("cgroups.version = v1"),
        (CgroupVersion::V2, ..) => v2("cgroups.version = v2"),
        (CgroupVersion::Auto, None, Some(_)) => {
            net_cls_choice("auto: no cgroup2 filesystem is mounted")
        }
        (CgroupVersion::Auto, ..) => v2("auto"),
    }
}

/// The datapath to use and a sentence saying why, for the log and
/// `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub kind: DatapathKind,
    pub reason: String,
}

/// Resolves the configured choice; see the module docs.
pub fn choose(choice: DatapathChoice, cgroups: CgroupFlavour) -> anyhow::Result<Choice> {
    match choice {
        DatapathChoice::Auto if cgroups == CgroupFlavour::NetClsV1 => Ok(Choice {
            kind: DatapathKind::Iptables,
            reason: "auto: PU cgroups are net_cls (cgroup v1), which only the iptables \
                     datapath matches"
                .into(),
        }),
        DatapathChoice::Iptables => Ok(Choice {
            kind: DatapathKind::Iptables,
            reason: "iptables was asked for".into(),
        }),
        DatapathChoice::Ebpf => match probe() {
            Ok(found) => Ok(Choice {
                kind: DatapathKind::Ebpf,
                reason: format!("eBPF was asked for and the kernel has {found}"),
            }),
            Err(missing) => {
                bail!("the eBPF datapath was asked for but the kernel lacks {missing:#}")
            }
        },
        DatapathChoice::Auto => Ok(match probe() {
            Ok(found) => Choice {
                kind: DatapathKind::Ebpf,
                reason: format!("auto: the kernel has {found}"),
            },
            Err(missing) => Choice {
                kind: DatapathKind::Iptables,
                reason: format!("auto: falling back to iptables, the kernel lacks {missing:#}"),
            },
        }),
    }
}

/// Probes every feature; the error names the first one missing.
fn probe() -> anyhow::Result<String> {
    let cgroup2 = cgroup2_mount().context("a cgroup v2 mount")?;
    // Pins keep the programs attached through a restart.
    let bpffs = bpffs_mount().context("a bpf filesystem for pins")?;
    let map =
        |ty: MapType, what: &str| -> anyhow::Result<()> {
            match is_map_supported(ty) {
                Ok(true) => Ok(()),
                Ok(false) => bail!("{what} maps"),
                Err(e) => Err(anyhow::Error::new(e)
                    .context(format!("{what} maps (the bpf() syscall failed)"))),
            }
        };
    map(MapType::LpmTrie, "LPM trie")?;
    map(MapType::Hash, "hash")?;
    map(MapType::PerCpuArray, "per-CPU array")?;
    match is_program_supported(ProgramType::CgroupSockAddr) {
        Ok(true) => {}
        Ok(false) => bail!("cgroup/connect programs (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)"),
        Err(e) => return Err(anyhow::Error::new(e).context("cgroup/connect programs")),
    }
    load_without_attaching().context("a verifier that accepts the datapath's programs")?;
    Ok(format!(
        "the bpf() syscall, LPM trie, hash and per-CPU maps, cgroup/connect programs \
         that pass the verifier, cgroup v2 at {} and bpffs at {}",
        cgroup2.display(),
        bpffs.display()
    ))
}

fn load_without_attaching() -> anyhow::Result<()> {
    let mut bpf = aya::Ebpf::load(crate::bpf::datapath_object()?)?;
    for name in enforcer_common::maps::PU_PROGRAMS {
        let prog: &mut aya::programs::CgroupSockAddr = bpf
            .program_mut(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(())
}

/// Where cgroup v2 is mounted, from `/proc/self/mounts`.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mount_of_type(&mounts, "cgroup2").context("no cgroup2 filesystem is mounted")
}

/// Where bpffs is mounted, from `/proc/self/mounts`.
pub fn bpffs_mount() -> anyhow::Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mount_of_type(&mounts, "bpf")
        .context("no bpf filesystem is mounted (mount -t bpf bpf /sys/fs/bpf)")
}

/// The first mount point of a filesystem type in `/proc/self/mounts` text.
pub fn mount_of_type(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_src, dir, ty) = (fields.next()?, fields.next()?, fields.next()?);
        (ty == fstype).then(|| Path::new(dir).to_path_buf())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_by_type() {
        let mounts = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n";
        assert_eq!(
            mount_of_type(mounts, "cgroup2").unwrap(),
            Path::new("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            mount_of_type(mounts, "bpf").unwrap(),
            Path::new("/sys/fs/bpf")
        );
        assert!(mount_of_type(mounts, "tmpfs").is_none());
    }

    #[test]
    fn iptables_needs_no_probe() {
        let c = choose(DatapathChoice::Iptables, CgroupFlavour::V2).unwrap();
        assert_eq!(c.kind, DatapathKind::Iptables);
    }

    #[test]
    fn net_cls_cgroups_make_auto_iptables() {
        let c = choose(DatapathChoice::Auto, CgroupFlavour::NetClsV1).unwrap();
        assert_eq!(c.kind, DatapathKind::Iptables);
        assert!(c.reason.contains("net_cls"), "{}", c.reason);
    }

    #[test]
    fn cgroup_flavour_follows_the_setting_and_the_mounts() {
        let settings = |version, mount: Option<&str>| CgroupSettings {
            version,
            net_cls_mount: mount.map(PathBuf::from),
        };
        let (v2, nc) = (Path::new("/sys/fs/cgroup/unified"), Path::new("/nc"));
        let choose = |version, mount, cgroup2, net_cls| {
            choose_cgroups(&settings(version, mount), cgroup2, net_cls)
        };
        let auto = choose(CgroupVersion::Auto, None, Some(v2), Some(nc)).unwrap();
        assert_eq!(
            (auto.flavour, auto.mount.as_path()),
            (CgroupFlavour::V2, v2)
        );
        assert_eq!(
            auto.reason,
            "auto; cgroup v2 at /sys/fs/cgroup/unified (mounted)"
        );
        let auto = choose(CgroupVersion::Auto, None, None, Some(nc)).unwrap();
        assert_eq!(
            (auto.flavour, auto.mount.as_path()),
            (CgroupFlavour::NetClsV1, nc)
        );
        assert_eq!(
            auto.reason,
            "auto: no cgroup2 filesystem is mounted; net_cls at /nc (found in /proc/self/mounts)"
        );
        let v1 = choose(CgroupVersion::V1, Some("/mine"), Some(v2), Some(nc)).unwrap();
        assert_eq!(
            (v1.flavour, v1.mount.as_path()),
            (CgroupFlavour::NetClsV1, Path::new("/mine"))
        );
        assert!(v1.reason.contains("cgroups.net_cls_mount"), "{}", v1.reason);
        let err = choose(CgroupVersion::V1, None, Some(v2), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("no cgroup v1 hierarchy with the net_cls"),
            "{err}"
        );
        let assumed = choose(CgroupVersion::V2, None, None, Some(nc)).unwrap();
        assert_eq!(
            (assumed.flavour, assumed.mount.as_path()),
            (CgroupFlavour::V2, Path::new("/sys/fs/cgroup"))
        );
        assert!(assumed.reason.contains("assumed"), "{}", assumed.reason);
        let none = choose(CgroupVersion::Auto, None, None, None).unwrap();
        assert_eq!(none.flavour, CgroupFlavour::V2);
    }
}
