//! `cargo xtask setup`: checks everything that building, loading and
//! testing need, and installs what is missing. Idempotent: on a ready
//! machine it only checks, in about a second. Each step prints one line.
//!
//! Fixing system state (apt packages, the bpffs mount) needs root; without
//! it, setup lists what is missing with the command that fixes it.

mod system;
mod toolchain;

use anyhow::{Context as _, Result, bail};

/// What one step found or did.
pub enum Outcome {
    /// Already in place; nothing was done.
    Ready(String),
    /// Was missing and is in place now.
    Fixed(String),
    /// Missing, and fixing it needs root.
    NeedsRoot { missing: String, fix: String },
}

/// The machine as the steps see it.
pub struct Host {
    /// Effective uid 0: allowed to run apt-get and mount.
    pub root: bool,
    /// The lines of `/proc/self/mounts`, read once.
    pub mounts: String,
}

type Step = fn(&Host) -> Result<Outcome>;

/// The steps in order: later ones rely on earlier ones (bpf-linker needs
/// the nightly toolchain).
const STEPS: [(&str, Step); 6] = [
    ("apt packages", system::apt_packages),
    ("nightly toolchain", toolchain::nightly),
    ("rust-src", toolchain::rust_src),
    ("bpf-linker", toolchain::bpf_linker),
    ("bpffs", system::bpffs),
    ("cgroup v2", system::cgroup2),
];

pub fn run() -> Result<()> {
    let host = system::inspect()?;
    let mut needs_root = Vec::new();
    for (name, step) in STEPS {
        match step(&host).with_context(|| format!("setup step `{name}` failed"))? {
            Outcome::Ready(detail) => println!("  ok       {name}: {detail}"),
            Outcome::Fixed(detail) => println!("  fixed    {name}: {detail}"),
            Outcome::NeedsRoot { missing, fix } => {
                println!("  MISSING  {name}: {missing} (needs root: {fix})");
                needs_root.push(fix);
            }
        }
    }
    if !needs_root.is_empty() {
        bail!(
            "fixing what is missing needs root: run `cargo xtask setup` as root, or these commands:\n  {}",
            needs_root.join("\n  ")
        );
    }
    Ok(())
}
