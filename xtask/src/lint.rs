//! `cargo xtask lint`: formatting, then clippy on the host crates and on
//! the eBPF crate, all with warnings as errors. Every check runs even if
//! an earlier one fails, so one run reports all of them.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{
    cmd,
    workspace::{EBPF_CRATE, HOST_CRATES, Workspace},
};

pub fn run(ws: &Workspace) -> Result<()> {
    let failures: Vec<String> = [fmt_check(ws), host_clippy(ws), ebpf_clippy(ws)]
        .into_iter()
        .filter_map(|mut check| cmd::run(&mut check).err())
        .map(|error| format!("{error:#}"))
        .collect();
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}

fn fmt_check(ws: &Workspace) -> Command {
    ws.cargo(["fmt", "--all", "--", "--check"])
}

fn host_clippy(ws: &Workspace) -> Command {
    let mut cmd = ws.cargo(["clippy"]);
    cmd.args(HOST_CRATES)
        .args(["--all-targets", "--", "-D", "warnings"]);
    cmd
}

/// Clippy for the eBPF crate, on its own target with nightly's build-std,
/// in a target directory of its own so that host builds stay untouched.
/// (The bpfel target already aborts on panic; no extra rustflags needed.)
fn ebpf_clippy(ws: &Workspace) -> Command {
    let mut cmd = ws.cargo(["+nightly", "clippy", "--package", EBPF_CRATE]);
    cmd.args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .env("CARGO_TARGET_DIR", ws.target_dir().join("ebpf-lint"));
    cmd
}
