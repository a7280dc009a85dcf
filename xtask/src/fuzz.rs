//! `cargo xtask fuzz`: runs every cargo-fuzz target of `fuzz/` (its own
//! workspace, nightly, sanitizers) for a number of executions each,
//! starting from the committed corpus in `fuzz/corpus/<target>/`.
//!
//! New inputs the fuzzer finds go to a scratch corpus under the target
//! directory, so a run never grows the committed one; `--merge` then adds
//! to the committed corpus only the inputs that reach new coverage
//! (libFuzzer's `-merge=1`), which keeps it small. The ordinary test run
//! replays the committed corpus (`identity::fuzz_check`).

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{cmd, workspace::Workspace};

/// The fuzz targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 2] = ["token", "packet"];

/// What `cargo xtask fuzz` is told.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct FuzzArgs {
    /// Executions per target
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub runs: u64,
    /// Only these targets (repeatable): token, packet
    #[arg(long, value_name = "TARGET", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub only: Vec<String>,
    /// Afterwards, add the inputs that reach new coverage to the committed corpus
    #[arg(long)]
    pub merge: bool,
}

pub fn run(ws: &Workspace, args: &FuzzArgs) -> Result<()> {
    ensure_cargo_fuzz(ws)?;
    let targets: Vec<&str> = if args.only.is_empty() {
        TARGETS.to_vec()
    } else {
        args.only.iter().map(String::as_str).collect()
    };
    for target in targets {
        let committed = ws.root().join("fuzz").join("corpus").join(target);
        let scratch = ws.target_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        // The first corpus directory is where libFuzzer writes; the
        // committed one is only read.
        let mut fuzz = fuzz_cmd(ws, target);
        fuzz.arg(&scratch).arg(&committed).args([
            "--".to_owned(),
            format!("-runs={}", args.runs),
            "-print_final_stats=1".to_owned(),
        ]);
        cmd::run(&mut fuzz)?;
        if args.merge {
            let mut merge = fuzz_cmd(ws, target);
            merge.arg(&committed).arg(&scratch).args(["--", "-merge=1"]);
            cmd::run(&mut merge)?;
        }
    }
    Ok(())
}

/// `cargo +nightly fuzz run TARGET` in the workspace root, optimised,
/// without building the eBPF objects (the targets need none).
fn fuzz_cmd(ws: &Workspace, target: &str) -> Command {
    let mut cmd = ws.cargo(["+nightly", "fuzz", "run", "--release", target]);
    cmd.env("AYA_BUILD_SKIP", "1");
    cmd
}

/// Installs cargo-fuzz when `cargo fuzz` is not there (idempotent).
fn ensure_cargo_fuzz(ws: &Workspace) -> Result<()> {
    let present = ws
        .cargo(["fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !present {
        cmd::run(&mut ws.cargo(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}
