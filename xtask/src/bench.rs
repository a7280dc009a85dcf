//! `cargo xtask bench`: setup, a release build of the host crates, then
//! the benchmark runner (`target/release/bench run`, from the tests
//! crate) against the release agent (`target/release/enforcer`). The
//! runner shows a progress line per step on stderr and prints the
//! report's path on stdout, which this task passes on.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{SigHandler, Signal, signal};

use crate::{
    cmd, setup,
    workspace::{HOST_CRATES, Workspace},
};

/// What `cargo xtask bench` is told.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct BenchArgs {
    /// The short run: fewer repetitions and scales, under 5 minutes
    #[arg(long)]
    pub quick: bool,
    /// Where the report and its plots go [default: bench/results]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Only these parts (repeatable): base, handshake, proxy, pus, acls, targets, footprint
    #[arg(long, value_name = "PART")]
    pub only: Vec<String>,
}

pub fn run(ws: &Workspace, args: &BenchArgs) -> Result<()> {
    setup::run()?;
    cmd::run(ws.cargo(["build", "--release"]).args(HOST_CRATES))?;
    let release = ws.target_dir().join("release");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| ws.root().join("bench").join("results"));
    let mut bench = Command::new(release.join("bench"));
    bench
        .current_dir(ws.root())
        .arg("run")
        .arg("--agent")
        .arg(release.join("enforcer"))
        .arg("--out")
        .arg(&out);
    if args.quick {
        bench.arg("--quick");
    }
    for part in &args.only {
        bench.args(["--only", part]);
    }
    let line = cmd::describe(&bench);
    println!("$ {line}");
    // Ctrl-C reaches the runner too, which stops in order and removes
    // what it made; this process waits for that instead of dying first.
    // The runner installs its own handlers, so the ignored disposition it
    // inherits lasts only until then.
    let ignore = |sig| {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { signal(sig, SigHandler::SigIgn) }
    };
    let (int, term) = (ignore(Signal::SIGINT)?, ignore(Signal::SIGTERM)?);
    let output = bench
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output();
    // SAFETY: putting back the dispositions saved above.
    unsafe {
        signal(Signal::SIGINT, int)?;
        signal(Signal::SIGTERM, term)?;
    }
    let output = output.with_context(|| format!("cannot start `{line}`"))?;
    if !output.status.success() {
        bail!("`{line}` failed ({})", output.status);
    }
    let report = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    println!("bench report: {report} (plots beside it)");
    Ok(())
}
