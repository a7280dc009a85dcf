//! Which datapath this kernel can run, and why.
//!
//! `auto` picks eBPF when every kernel feature the eBPF datapath uses is
//! there, else iptables; `ebpf` insists and fails naming the first missing
//! feature; `iptables` never probes. Each feature is probed the kernel's
//! own way (a tiny map or program load, aya's feature probes), then the
//! real object is loaded once — without attaching anything — so a
//! verifier refusal counts as missing too.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

use super::DatapathKind;
use crate::policy::DatapathChoice;

/// The datapath to use and a sentence saying why, for the log and
/// `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub kind: DatapathKind,
    pub reason: String,
}

/// Resolves the configured choice; see the module docs.
pub fn choose(choice: DatapathChoice) -> anyhow::Result<Choice> {
    match choice {
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
        let c = choose(DatapathChoice::Iptables).unwrap();
        assert_eq!(c.kind, DatapathKind::Iptables);
    }
}
