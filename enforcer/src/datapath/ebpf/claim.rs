//! How the eBPF datapath finds the tasks and packets of a PU — its
//! *claim* — by kind:
//! - linux-process: its cgroup, mapped in `PU_BY_CGROUP`; the programs
//!   are attached to that cgroup;
//! - uid: its uid, mapped in `PU_BY_UID`;
//! - host-service: its ports, in `PU_PORTS` with `PORT_OF_SERVICE` (a
//!   socket bound to one of them is the service's);
//! - host (local-server) and container (remote-container, sidecar): the
//!   namespace-wide PU, in `FALLBACK_PU`: every task and packet of the
//!   agent's network namespace that no other PU claims.
//!
//! The last three are judged by the *host scope*'s programs, attached once
//! to one cgroup (`[host] cgroup`, by default the cgroup v2 root) while
//! any such PU is configured, and limited to the agent's network
//! namespace by its cookie. Cgroup hooks are not scoped to a network
//! namespace, and programs linked to a cgroup and to its ancestor both run
//! (links always stack): a task in a linux-process PU's cgroup meets that
//! cgroup's programs and the host scope's. The choice of which one judges
//! is made in the programs (`enforcer-ebpf/src/policy.rs`, `judging_pu`):
//! the host scope's leave every task of a mapped PU cgroup to the PU
//! cgroup's, which judge it by its uid PU if it has one (SPEC: the uid
//! chain first), else by the cgroup's PU. So every task is judged exactly
//! once, in SPEC's priority: uid, process, host-service, host.
//!
//! For that to leave no gap, a PU cgroup is mapped only while its own
//! programs are attached: `configure` attaches, then maps; `delete`
//! unmaps, then detaches. In between, the host scope judges its tasks.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use enforcer_common::maps::{PortKey, port_owner};

use super::{BPF_NOEXIST, Loaded, entries};
use crate::policy::{Pu, PuKind, UserSpec};

/// What a PU claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// A linux-process PU's cgroup: its id (the directory's inode) and
    /// directory (the sockets an update cuts are found by it).
    Cgroup { id: u64, path: PathBuf },
    /// A uid PU's uid, resolved.
    Uid(u32),
    /// A host-service PU: its ports.
    Service,
    /// The host or container PU.
    Fallback,
}

impl Claim {
    /// The claim of `pu`, read from the host: its cgroup's id, its user's
    /// uid.
    pub fn of(pu: &Pu, cgroup2: &Path) -> anyhow::Result<Self> {
        Ok(match &pu.kind {
            PuKind::LinuxProcess { cgroup } => {
                let path = cgroup2.join(cgroup.as_path());
                let id = std::fs::metadata(&path)
                    .with_context(|| format!("cgroup {} of PU {}", path.display(), pu.id))?
                    .ino();
                Claim::Cgroup { id, path }
            }
            PuKind::Uid { user } => Claim::Uid(resolve(user)?),
            PuKind::HostService => Claim::Service,
            PuKind::Host | PuKind::Container => Claim::Fallback,
        })
    }

    /// Whether the host scope's programs judge this PU.
    pub fn in_host_scope(&self) -> bool {
        !matches!(self, Claim::Cgroup { .. })
    }

    /// The PU's cgroup directory, for a linux-process PU.
    pub fn cgroup(&self) -> Option<&Path> {
        match self {
            Claim::Cgroup { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The `PU_PORTS` value of the PU's ports.
    pub fn port_owner(&self, slot: u32) -> u32 {
        port_owner(slot, *self == Claim::Service)
    }

    /// The ports `PU_PORTS` maps to the PU: its listening ports, except
    /// for the namespace-wide PU, which has every packet no other PU's
    /// port claims.
    pub fn ports(&self, pu: &Pu) -> BTreeSet<PortKey> {
        match self {
            Claim::Fallback => BTreeSet::new(),
            _ => entries::port_keys(pu),
        }
    }

    /// Maps the claim to `slot` (never taking over another PU's: a cgroup
    /// or uid mapped already, a second namespace-wide PU, is an error).
    pub fn register(&self, maps: &mut Loaded, slot: u32) -> anyhow::Result<()> {
        match self {
            Claim::Cgroup { id, .. } => maps
                .pu_by_cgroup
                .insert(id, slot, BPF_NOEXIST)
                .with_context(|| format!("registering cgroup id {id} (is it another PU's?)")),
            Claim::Uid(uid) => maps
                .pu_by_uid
                .insert(uid, slot, BPF_NOEXIST)
                .with_context(|| format!("registering uid {uid} (is it another PU's?)")),
            Claim::Service => Ok(()),
            Claim::Fallback => {
                let current = maps.fallback.get(&0, 0).context("reading FALLBACK_PU")?;
                if current != 0 {
                    bail!(
                        "the namespace-wide PU is slot {} already; a second host or container \
                         PU would never see any traffic",
                        current - 1
                    );
                }
                maps.fallback
                    .set(0, slot + 1, 0)
                    .context("registering the namespace-wide PU")
            }
        }
    }

    /// Unmaps the claim, only where it is still `slot`'s own.
    pub fn unregister(&self, maps: &mut Loaded, slot: u32) {
        let result = match self {
            Claim::Cgroup { id, .. } if maps.pu_by_cgroup.get(id, 0).ok() == Some(slot) => {
                maps.pu_by_cgroup.remove(id)
            }
            Claim::Uid(uid) if maps.pu_by_uid.get(uid, 0).ok() == Some(slot) => {
                maps.pu_by_uid.remove(uid)
            }
            Claim::Fallback if maps.fallback.get(&0, 0).ok() == Some(slot + 1) => {
                maps.fallback.set(0, 0, 0)
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!("unmapping the claim {self:?} of slot {slot}: {e}");
        }
    }
}

/// The uid of a uid PU's user: a number as it is, a name from the user
/// database (as `-m owner --uid-owner` resolves it in the fallback).
pub fn resolve(user: &UserSpec) -> anyhow::Result<u32> {
    match user {
        UserSpec::Id(uid) => Ok(*uid),
        UserSpec::Name(name) => nix::unistd::User::from_name(name.as_str())
            .with_context(|| format!("looking up user {}", name.as_str()))?
            .map(|user| user.uid.as_raw())
            .ok_or_else(|| anyhow!("no user {} on this host", name.as_str())),
    }
}
