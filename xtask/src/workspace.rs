//! Where the workspace is, and cargo commands that run in it.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, anyhow};

/// The eBPF crate. It builds only for `bpfel-unknown-none`, through
/// aya-build from `enforcer/build.rs`, so host commands leave it out.
pub const EBPF_CRATE: &str = "enforcer-ebpf";

/// Selects every host crate of the workspace.
pub const HOST_CRATES: [&str; 3] = ["--workspace", "--exclude", EBPF_CRATE];

/// The workspace root, found from where xtask's own manifest is.
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", manifest_dir.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The workspace root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `cargo ARGS` in the workspace root. Plain `cargo` from PATH is the
    /// rustup proxy, so `+nightly` works as a first argument.
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&self.root).args(args);
        cmd
    }

    /// cargo's target directory: `CARGO_TARGET_DIR` (relative to the root,
    /// where every cargo command here runs) or `target/`.
    pub fn target_dir(&self) -> PathBuf {
        let dir = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
        self.root.join(dir)
    }
}
