//! `cargo xtask test`, the command CI runs: setup, lint, then every test of
//! the host crates, the privileged kernel tests included, then a check that
//! the tests left no namespace, cgroup or pin behind. Lint and test
//! both run even if the other fails, so one run reports everything; a
//! failed setup stops the rest, which cannot build without it.

use std::{process::Command, time::Instant};

use anyhow::{Result, bail};

use crate::{
    cmd, lint, setup,
    workspace::{HOST_CRATES, Workspace},
};

/// One phase's name, how long it took, and its error if it failed.
struct Phase {
    name: &'static str,
    seconds: f64,
    error: Option<anyhow::Error>,
}

/// Runs one phase under a `==> name` header.
fn phase(name: &'static str, work: impl FnOnce() -> Result<()>) -> Phase {
    println!("==> {name}");
    let start = Instant::now();
    let error = work().err();
    Phase {
        name,
        seconds: start.elapsed().as_secs_f64(),
        error,
    }
}

/// `cargo_test_args` go to `cargo test` as they are: a test name filter,
/// and after another `--`, arguments for the test binaries.
pub fn run(ws: &Workspace, cargo_test_args: &[String]) -> Result<()> {
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        print_tool_versions();
    }
    let mut phases = vec![phase("setup", setup::run)];
    if phases[0].error.is_none() {
        phases.push(phase("lint", || lint::run(ws)));
        phases.push(phase("test", || {
            cmd::run(
                ws.cargo(["test"])
                    .args(HOST_CRATES)
                    .arg("--no-fail-fast")
                    .args(cargo_test_args),
            )
        }));
        // Every kernel test cleans up after itself; prove it for the run.
        phases.push(phase("leftovers", || {
            cmd::run(&mut ws.cargo([
                "run",
                "--quiet",
                "-p",
                "enforcer-tests",
                "--bin",
                "nettool",
                "--",
                "leftovers",
            ]))
        }));
    }
    summarize(&phases)
}

fn summarize(phases: &[Phase]) -> Result<()> {
    println!("==> summary");
    for Phase {
        name,
        seconds,
        error,
    } in phases
    {
        match error {
            None => println!("  ok      {name} ({seconds:.1} s)"),
            Some(error) => {
                let lines = format!("{error:#}").replace('\n', "\n          ");
                println!("  FAILED  {name} ({seconds:.1} s):\n          {lines}");
            }
        }
    }
    let failed: Vec<_> = phases
        .iter()
        .filter(|phase| phase.error.is_some())
        .map(|phase| phase.name)
        .collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// For CI logs: which tools and kernel this run used. A tool that is
/// missing is reported, not fatal (setup comes next and says more).
fn print_tool_versions() {
    println!("==> tool versions");
    let tools: [(&str, &[&str]); 5] = [
        ("rustc", &["rustc", "-V"]),
        ("nightly rustc", &["rustc", "+nightly", "-V"]),
        (
            "bpf-linker",
            &["rustup", "run", "nightly", "bpf-linker", "--version"],
        ),
        ("iptables", &["iptables", "--version"]),
        ("kernel", &["uname", "-r"]),
    ];
    for (name, argv) in tools {
        let version = cmd::stdout(Command::new(argv[0]).args(&argv[1..])).map_or_else(
            |error| format!("unavailable: {error:#}"),
            |out| out.trim().to_string(),
        );
        println!("  {name:<14} {version}");
    }
}
