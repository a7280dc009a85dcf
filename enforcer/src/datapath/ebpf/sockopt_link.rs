//! Linking a cgroup sockopt program (the `cgroup/setsockopt` guard, the
//! proxies' `cgroup/getsockopt`) to a cgroup and pinning the link; and
//! detaching any pinned link at once ([`detach_now`]).
//!
//! Every other cgroup program's link is pinned under the agent's bpffs
//! directory, so it outlives a crash or restart of the agent and `run` /
//! `cleanup` remove it by its pin. aya (0.14) attaches a sockopt program
//! through a bpf_link too, but keeps the link's descriptor private (no
//! conversion into an `FdLink`), so it could never be pinned; here the
//! loaded program's descriptor is linked and pinned with the two bpf(2)
//! commands aya would use, and the guard's link then behaves as the others.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use aya::programs::CgroupSockopt;

use super::grace::bpf;

/// linux/bpf.h commands and the attach type.
const BPF_OBJ_PIN: libc::c_int = 6;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_LINK_DETACH: libc::c_int = 34;
const BPF_CGROUP_GETSOCKOPT: u32 = 21;
const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// Which of the two sockopt hooks a program is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Get,
    Set,
}

/// Links the loaded `prog` to `cgroup` as its `hook` and pins the link at
/// `pin`. The link's descriptor closes on return; the pin keeps
/// the link, and removing the pin detaches it.
pub fn attach_pinned(prog: &CgroupSockopt, cgroup: &File, pin: &Path, hook: Hook) -> Result<()> {
    let prog_fd = prog.fd().context("the program is not loaded")?;
    let attach_type = match hook {
        Hook::Get => BPF_CGROUP_GETSOCKOPT,
        Hook::Set => BPF_CGROUP_SETSOCKOPT,
    };
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(prog_fd.as_fd().as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    // flags (12..16) 0: a link takes no attach flags; links on one cgroup
    // coexist anyway.
    let fd = bpf(BPF_LINK_CREATE, &mut attr).context("BPF_LINK_CREATE")?;
    // SAFETY: BPF_LINK_CREATE returned a new descriptor nobody else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = CString::new(pin.as_os_str().as_bytes())
        .with_context(|| format!("pin path {}", pin.display()))?;
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// Detaches the link pinned at `pin` now (`BPF_LINK_DETACH`), whoever
/// else still holds it. Removing the pin alone detaches it only when the
/// kernel frees the link, which it defers to a workqueue when the pin was
/// the last reference: under load a connection made just after the agent
/// stopped could still meet its programs.
pub fn detach_now(pin: &Path) -> Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .with_context(|| format!("pin path {}", pin.display()))?;
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {}", pin.display()))?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor nobody else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_LINK_DETACH, &mut attr).with_context(|| format!("detaching {}", pin.display()))?;
    Ok(())
}
