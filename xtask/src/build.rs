//! `cargo xtask build` and `cargo xtask build-and-load`. The agent's
//! build script builds the eBPF objects and embeds them, which needs the
//! toolchain that setup provides; both tasks therefore run setup first.

use std::os::unix::process::CommandExt as _;

use anyhow::{Context as _, Result};

use crate::{
    cmd, setup,
    workspace::{HOST_CRATES, Workspace},
};

/// The agent binary.
const AGENT: &str = "enforcer";

pub fn build(ws: &Workspace, release: bool) -> Result<()> {
    setup::run()?;
    let mut cargo = ws.cargo(["build"]);
    cargo.args(HOST_CRATES);
    if release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo)
}

/// Builds for release and replaces this process with `enforcer demo ARGS`,
/// so that signals (Ctrl-C) reach the agent directly.
pub fn build_and_load(ws: &Workspace, args: &[String]) -> Result<()> {
    build(ws, true)?;
    let agent = ws.target_dir().join("release").join(AGENT);
    let mut demo = std::process::Command::new(&agent);
    demo.arg("demo").args(args);
    let line = cmd::describe(&demo);
    println!("$ {line}");
    Err(demo.exec()).with_context(|| format!("cannot start `{line}`"))
}
