//! `cargo xtask`: the project's developer and CI commands, in Rust so that
//! they run wherever cargo does. `cargo xtask test` is what CI runs;
//! `cargo xtask build-and-load` builds the agent and runs its demo;
//! `cargo xtask bench` measures it against the fallback and the bare
//! kernel; `cargo xtask fuzz` runs the fuzz targets.

mod bench;
mod build;
mod cmd;
mod fuzz;
mod lint;
mod setup;
mod test;
mod workspace;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::workspace::Workspace;

#[derive(Parser)]
#[command(
    bin_name = "cargo xtask",
    about = "Set up, build, lint, test and run the enforcer"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check and install what building and testing need (idempotent)
    Setup,
    /// Set up, then build every host crate (the agent embeds the eBPF programs)
    Build {
        /// Build with the release profile
        #[arg(long)]
        release: bool,
    },
    /// cargo fmt --check, and clippy -D warnings on the host and eBPF crates
    Lint,
    /// What CI runs: setup, lint, then all tests (kernel tests need root)
    Test {
        /// Passed to `cargo test`, e.g. a test name filter
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Set up, build for release, then run `enforcer demo ARGS...`
    BuildAndLoad {
        /// Arguments for `enforcer demo`, e.g. --duration 20 --datapath iptables
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build for release, then benchmark eBPF vs iptables vs the bare kernel
    /// (needs root; writes bench/results/<date>.md and SVG plots)
    Bench(bench::BenchArgs),
    /// Run the fuzz targets (token, packet) from the committed corpus
    /// (nightly; installs cargo-fuzz if missing)
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> Result<()> {
    let ws = Workspace::locate()?;
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => build::build(&ws, release),
        Task::Lint => lint::run(&ws),
        Task::Test { cargo_test_args } => test::run(&ws, &cargo_test_args),
        Task::BuildAndLoad { args } => build::build_and_load(&ws, &args),
        Task::Bench(args) => bench::run(&ws, &args),
        Task::Fuzz(args) => fuzz::run(&ws, &args),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Task};

    fn parse(argv: &[&str]) -> Task {
        Cli::try_parse_from(argv).expect("arguments parse").task
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_everything_after_the_separator_to_cargo_test() {
        let Task::Test { cargo_test_args } =
            parse(&["xtask", "test", "--", "kernel_facts", "--", "--nocapture"])
        else {
            panic!("not the test task");
        };
        assert_eq!(cargo_test_args, ["kernel_facts", "--", "--nocapture"]);
    }

    #[test]
    fn build_and_load_forwards_options_to_the_demo() {
        let argv = [
            "xtask",
            "build-and-load",
            "--duration",
            "20",
            "--datapath",
            "iptables",
        ];
        let Task::BuildAndLoad { args } = parse(&argv) else {
            panic!("not the build-and-load task");
        };
        assert_eq!(args, argv[2..]);
    }

    #[test]
    fn fuzz_takes_runs_targets_and_merge() {
        let Task::Fuzz(args) = parse(&["xtask", "fuzz"]) else {
            panic!("not the fuzz task");
        };
        assert_eq!(
            (args.runs, args.only.len(), args.merge),
            (1_000_000, 0, false)
        );
        let Task::Fuzz(args) = parse(&[
            "xtask", "fuzz", "--runs", "10", "--only", "token", "--merge",
        ]) else {
            panic!("not the fuzz task");
        };
        assert_eq!(
            (args.runs, args.only, args.merge),
            (10, vec!["token".to_owned()], true)
        );
        assert!(Cli::try_parse_from(["xtask", "fuzz", "--only", "nope"]).is_err());
    }

    #[test]
    fn bench_takes_quick_out_and_parts() {
        let Task::Bench(args) = parse(&[
            "xtask", "bench", "--quick", "--out", "/tmp/r", "--only", "base", "--only", "pus",
        ]) else {
            panic!("not the bench task");
        };
        assert!(args.quick);
        assert_eq!(args.out, Some("/tmp/r".into()));
        assert_eq!(args.only, ["base", "pus"]);
        let Task::Bench(args) = parse(&["xtask", "bench"]) else {
            panic!("not the bench task");
        };
        assert_eq!((args.quick, args.out, args.only.len()), (false, None, 0));
    }
}
