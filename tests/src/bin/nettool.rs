//! `nettool`: the client side of kernel tests, as a process of its own so
//! that the harness can place it in a network namespace *and* a cgroup
//! (cgroup membership is per process). Its exit code is the
//! [`Outcome`](enforcer_tests::traffic::Outcome) of the attempt.
//!
//! Also `nettool leftovers`: lists harness objects a test run left on the
//! machine — namespaces, cgroups, pins, control sockets, and any `TRI-`
//! chain or ipset in the root network namespace, where tests never run an
//! agent — and exits 1 if there are any (run after the suite, in the root
//! namespace; it only reads).

use std::{net::SocketAddr, process::ExitCode};

use clap::{Parser, Subcommand};
use enforcer_tests::{leftovers, privilege, traffic};

#[derive(Parser)]
#[command(about = "Traffic client for enforcer kernel tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect over TCP, send the payload, expect it echoed back.
    TcpExchange {
        to: SocketAddr,
        #[arg(long, default_value = "ping")]
        payload: String,
    },
    /// Send one UDP datagram.
    UdpSend {
        to: SocketAddr,
        #[arg(long, default_value = "ping")]
        payload: String,
        /// Source address to bind to.
        #[arg(long)]
        from: Option<std::net::IpAddr>,
    },
    /// List what tests left behind: namespaces, cgroups, pins, control
    /// sockets, and `TRI-` chains or ipsets in this network namespace.
    Leftovers,
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().cmd {
        Cmd::TcpExchange { to, payload } => traffic::tcp_exchange(to, payload.as_bytes()),
        Cmd::UdpSend { to, payload, from } => traffic::udp_send(from, to, payload.as_bytes()),
        Cmd::Leftovers => return report_leftovers(),
    };
    if let traffic::Outcome::Failed(why) = &outcome {
        eprintln!("{why}");
    }
    ExitCode::from(outcome.exit_code())
}

fn report_leftovers() -> ExitCode {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let cgroup2 =
        privilege::mount_of_type(&mounts, "cgroup2").unwrap_or_else(|| "/sys/fs/cgroup".into());
    let bpffs = privilege::mount_of_type(&mounts, "bpf").unwrap_or_else(|| "/sys/fs/bpf".into());
    match leftovers::find(&cgroup2, &bpffs) {
        Ok(found) if found.is_empty() => {
            println!("leftovers: none");
            ExitCode::SUCCESS
        }
        Ok(found) => {
            println!("leftovers: {} object(s) left behind by tests:", found.len());
            for f in found {
                println!("  {f}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("leftovers: could not look: {e:#}");
            ExitCode::FAILURE
        }
    }
}
