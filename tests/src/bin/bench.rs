//! `bench`: the benchmark runner behind `cargo xtask bench` (see
//! [`enforcer_tests::bench`]). `bench run --agent PATH [--quick]
//! [--out DIR]` measures and writes the report, printing its path on
//! stdout (progress goes to stderr); the hidden `bench client …` is the
//! traffic client the runner starts inside a PU's cgroup.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use enforcer_tests::bench::{self, Client, Options};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Benchmarks of the enforcer: eBPF datapath vs iptables fallback vs bare kernel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmarks and write the report (needs root)
    Run(Options),
    /// One traffic client run; prints a JSON result line
    #[command(subcommand, hide = true)]
    Client(Client),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run(options) => bench::run(&options).map(|report| {
            println!("{}", report.display());
        }),
        Command::Client(client) => client.run_here().map(|line| {
            println!("{line}");
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
