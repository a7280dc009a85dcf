//! Waiting until no eBPF program still uses what user space is about to
//! delete: an RCU grace period.
//!
//! A connect hook reads a PU's generation (`PU_GENERATION`), then looks up
//! the PU's ACL entries under that generation (`ACLS`). `update` writes the
//! new generation's entries, flips the generation, and deletes the old
//! generation's entries; a hook that read the old generation just before
//! the flip would miss its entry if the deletion came before its lookup,
//! and refuse a connection both policies allow. The same holds for a
//! deleted PU's entries and slot (a hook may have read the slot from
//! `PU_BY_CGROUP` just before the links were detached).
//!
//! cgroup programs run inside `rcu_read_lock()` (`bpf_prog_run_array_cg`,
//! kernel/bpf/cgroup.c), from the first lookup to the last, and none of
//! them is sleepable. So once an RCU grace period has passed after the
//! flip, every program that could have read the old generation has
//! returned: [`GracePeriod::wait`] between the flip and the deletion.
//!
//! Two ways to wait for one from user space, both kernel guarantees:
//! - `membarrier(MEMBARRIER_CMD_GLOBAL)` calls `synchronize_rcu()`
//!   (kernel/sched/membarrier.c) — but only when more than one CPU is
//!   online (with one it returns at once: fine for memory ordering, not
//!   for a reader preempted inside its read-side section under
//!   preemptible RCU), and it is refused with EINVAL under `nohz_full`;
//! - updating an element of a map-in-map: the kernel waits for a grace
//!   period before returning "so that userspace, when we return to it,
//!   knows that all non-sleepable programs that could be running use the
//!   new map value" (`maybe_wait_bpf_programs`, kernel/bpf/syscall.c). It
//!   needs a map pair of its own, made at load time.
//!
//! The first is used when it applies; the second otherwise.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};

/// linux/membarrier.h
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
/// linux/bpf.h commands and map types.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// How a grace period was waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    Membarrier,
    MapInMap,
}

/// The means to wait for a grace period: a one-slot array of maps and the
/// map it holds, used when `membarrier` cannot promise one.
pub struct GracePeriod {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GracePeriod {
    /// Makes the map pair (not pinned: only this agent uses it, and it
    /// goes with the agent).
    pub fn new() -> Result<Self> {
        let inner =
            create_map(BPF_MAP_TYPE_ARRAY, None).context("creating the grace-period inner map")?;
        let outer = create_map(BPF_MAP_TYPE_ARRAY_OF_MAPS, Some(&inner))
            .context("creating the grace-period array of maps")?;
        Ok(Self { outer, inner })
    }

    /// Returns once every eBPF program that was running when it was
    /// called has returned.
    pub fn wait(&self) -> Result<Waited> {
        if online_cpus() > 1 {
            // SAFETY: membarrier(2) takes no pointers.
            let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
            if rc == 0 {
                return Ok(Waited::Membarrier);
            }
            // EINVAL under nohz_full; ENOSYS or EPERM where it is missing or
            // filtered. The map update below does not depend on either.
            tracing::debug!(
                "membarrier(MEMBARRIER_CMD_GLOBAL) failed ({}); waiting through a map-in-map update",
                std::io::Error::last_os_error()
            );
        }
        self.map_in_map()?;
        Ok(Waited::MapInMap)
    }

    /// Stores the inner map in the outer map's one slot again: the kernel
    /// waits for a grace period before the syscall returns. [`Self::wait`]
    /// falls back to it; public so that the kernel tests can exercise it
    /// on a machine where the fallback is not needed.
    pub fn map_in_map(&self) -> Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        let mut attr = [0u8; 32];
        attr[0..4].copy_from_slice(&(self.outer.as_raw_fd() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(std::ptr::from_ref(&key) as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(std::ptr::from_ref(&value) as u64).to_ne_bytes());
        // flags (24..32) 0: BPF_ANY.
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("updating the grace-period array of maps")?;
        Ok(())
    }
}

/// CPUs online now; 1 if the system will not say (the cautious answer:
/// it sends [`GracePeriod::wait`] to the map update).
fn online_cpus() -> libc::c_long {
    // SAFETY: sysconf takes no pointers.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1)
}

/// A one-entry map with 4-byte keys and values; `inner` makes it an array
/// of maps holding maps like `inner`.
fn create_map(map_type: u32, inner: Option<&OwnedFd>) -> Result<OwnedFd> {
    let mut attr = [0u8; 48];
    attr[0..4].copy_from_slice(&map_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&4u32.to_ne_bytes()); // key size
    attr[8..12].copy_from_slice(&4u32.to_ne_bytes()); // value size
    attr[12..16].copy_from_slice(&1u32.to_ne_bytes()); // max entries
    if let Some(inner) = inner {
        attr[20..24].copy_from_slice(&(inner.as_raw_fd() as u32).to_ne_bytes());
    }
    let name = b"enforcer_grace";
    attr[28..28 + name.len()].copy_from_slice(name);
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// bpf(2) with an attribute block of the given size (the kernel takes a
/// shorter `union bpf_attr` as zero-extended).
pub(super) fn bpf(cmd: libc::c_int, attr: &mut [u8]) -> Result<libc::c_int> {
    // SAFETY: `attr` is live and writable for its whole length, which is
    // the size passed; any pointers in it point at live locals of the
    // caller.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if rc < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    Ok(rc as libc::c_int)
}
