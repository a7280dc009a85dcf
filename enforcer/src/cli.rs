//! The `enforcer` command line: `run`, `status`, `cleanup`, `demo` and
//! `keygen`.
//!
//! `main.rs` (and the test crate's `agent` binary) call [`main`] and nothing
//! else. Exit codes: 0 success, 1 failure, 2 a bad command line or a config
//! refused before anything changed.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::agent::{self, ConfigError, InstanceName, RunOptions, host};
use crate::control::{self, Request, Response, StatusReport};
use crate::demo::{self, DemoOptions};
use crate::policy::{DatapathChoice, IptablesBackendChoice, Keyword};
use crate::trap::KernelQueueStats;

/// Enforces network policy for processing units, in eBPF or iptables.
#[derive(Debug, Parser)]
#[command(name = "enforcer", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM; SIGHUP reloads the config.
    Run(RunArgs),
    /// Ask a running agent what it is doing.
    Status(StatusArgs),
    /// Remove everything any datapath of an instance left (after a crash).
    Cleanup(CleanupArgs),
    /// Run the agent on a throwaway world, with demo traffic and counters.
    ///
    /// Builds new network namespaces and a cgroup, starts the agent on them
    /// with a demo policy, sends traffic of every kind and shows a live
    /// table of the counters; on Ctrl-C or after --duration, checks them
    /// and removes it all. Never touches the host's own network.
    Demo(DemoArgs),
    /// One TCP exchange with ADDR; the exit code is the outcome (the demo's
    /// client, a process of its own so that it can join the PU's cgroup).
    #[command(hide = true)]
    DemoClient(DemoClientArgs),
    /// Make this agent's identity key pair for the handshake.
    ///
    /// Writes the Ed25519 private key to FILE (PKCS#8 PEM, mode 0600) and
    /// its public key to FILE.pub, for the other agents' `[identity]
    /// trusted` lists; prints the key id. Never overwrites a file.
    Keygen(KeygenArgs),
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Where the private key goes (name it in `[identity] key`).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The config file (TOML; see examples/enforcer.toml).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Overrides the config's `datapath`.
    #[arg(long, value_parser = datapath_choice())]
    datapath: Option<DatapathChoice>,
    /// Overrides the config's `[iptables] backend`: the iptables flavour
    /// both datapaths use.
    #[arg(long, value_parser = keyword::<IptablesBackendChoice>())]
    iptables_backend: Option<IptablesBackendChoice>,
    #[command(flatten)]
    netns: NetnsArg,
    #[command(flatten)]
    instance: InstanceArg,
    /// The control socket [default: /run/enforcer/<INSTANCE>.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Print the report as JSON (stable field names).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    instance: InstanceArg,
    /// The agent's control socket, instead of the instance's default.
    #[arg(long, value_name = "PATH", conflicts_with = "instance")]
    control: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CleanupArgs {
    #[command(flatten)]
    instance: InstanceArg,
    #[command(flatten)]
    netns: NetnsArg,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Stop after SECS seconds of traffic [default: run until Ctrl-C].
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// The datapath the agent runs.
    #[arg(long, value_parser = datapath_choice(), default_value = "auto")]
    datapath: DatapathChoice,
}

#[derive(Debug, Args)]
struct DemoClientArgs {
    to: SocketAddr,
}

#[derive(Debug, Args)]
struct InstanceArg {
    /// The agent instance: names its pin directory (<bpffs>/<INSTANCE>)
    /// and its control socket.
    #[arg(long, value_name = "NAME", default_value = InstanceName::DEFAULT)]
    instance: InstanceName,
}

#[derive(Debug, Args)]
struct NetnsArg {
    /// Enter the network namespace /run/netns/NAME first (only the network
    /// namespace: /sys/fs/cgroup and /sys/fs/bpf stay visible).
    #[arg(long, value_name = "NAME", value_parser = host::netns_name)]
    netns: Option<String>,
}

/// Parses the datapath keywords the config file accepts.
fn datapath_choice() -> impl clap::builder::TypedValueParser<Value = DatapathChoice> {
    keyword::<DatapathChoice>()
}

/// Parses the keywords of a config setting, as the config file spells them.
fn keyword<T: Keyword + Clone + Send + Sync + 'static>()
-> impl clap::builder::TypedValueParser<Value = T> {
    PossibleValuesParser::new(T::NAMES)
        .map(|name| T::from_name(&name).expect("clap checked the possible values"))
}

/// The whole program.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The namespace before anything else: threads inherit it from their
    // creator, so none may exist yet (tokio's, the trap's, the datapath's).
    let netns = match &cli.command {
        Command::Run(args) => args.netns.netns.as_deref(),
        Command::Cleanup(args) => args.netns.netns.as_deref(),
        Command::Status(_) | Command::Demo(_) | Command::DemoClient(_) | Command::Keygen(_) => None,
    };
    if let Some(name) = netns
        && let Err(e) = host::enter_netns(name)
    {
        eprintln!("enforcer: {e:#}");
        return ExitCode::FAILURE;
    }
    init_logging();
    let result = match cli.command {
        Command::Run(args) => agent::run(RunOptions {
            config: args.config,
            datapath: args.datapath,
            iptables_backend: args.iptables_backend,
            instance: args.instance.instance,
            control: args.control,
        }),
        Command::Status(args) => status(&args),
        Command::Cleanup(args) => agent::cleanup(&args.instance.instance),
        Command::Demo(args) => demo::run(&DemoOptions {
            duration: args.duration.map(Duration::from_secs),
            datapath: args.datapath,
        }),
        Command::DemoClient(args) => return demo::client(args.to),
        Command::Keygen(args) => keygen(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn keygen(args: &KeygenArgs) -> Result<()> {
    let (id, public) = crate::identity::keys::generate_files(&args.out)?;
    println!(
        "wrote {} (private) and {} (public); key id {id}",
        args.out.display(),
        public.display()
    );
    Ok(())
}

fn status(args: &StatusArgs) -> Result<()> {
    let path = args
        .control
        .clone()
        .unwrap_or_else(|| args.instance.instance.control_socket());
    let report = match control::request(&path, &Request::Status)? {
        Response::Status(report) => report,
        Response::Error { message } => bail!("the agent on {} answered: {message}", path.display()),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report always serializes")
        );
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// The human form of a report: a header, then PUs, then queues with
/// activity.
fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    write_report(&mut out, report).expect("writing to a String cannot fail");
    out
}

fn write_report(w: &mut impl std::fmt::Write, r: &StatusReport) -> std::fmt::Result {
    let up = r.uptime_secs;
    let uptime = format!("{}h{:02}m{:02}s", up / 3600, up / 60 % 60, up % 60);
    writeln!(w, "instance  {} (pid {}, up {uptime})", r.instance, r.pid)?;
    writeln!(w, "datapath  {}: {}", r.datapath.kind, r.datapath.reason)?;
    let iptables = &r.datapath.iptables;
    writeln!(w, "iptables  {}: {}", iptables.backend, iptables.reason)?;
    let cgroups = &r.datapath.cgroups;
    writeln!(w, "cgroups   {}: {}", cgroups.flavour, cgroups.reason)?;
    writeln!(w, "mode      {}", r.mode)?;
    writeln!(w, "config    {}", r.config)?;
    writeln!(w, "control   {}", r.control)?;
    let reloads = &r.reloads;
    let last = reloads
        .last_error
        .as_ref()
        .map(|why| format!(" (last: {why})"))
        .unwrap_or_default();
    writeln!(
        w,
        "reloads   {} applied, {} refused, {} failed{last}",
        reloads.applied, reloads.refused, reloads.failed
    )?;

    let row = |w: &mut dyn std::fmt::Write, cells: [&dyn std::fmt::Display; 6]| {
        let [id, kind, version, trapped, accepted, dropped] = cells;
        writeln!(
            w,
            "{id:<24} {kind:<14} {version:>3} {trapped:>10} {accepted:>10} {dropped:>10}"
        )
    };
    writeln!(w)?;
    row(
        w,
        [&"PU", &"KIND", &"VER", &"TRAPPED", &"ACCEPTED", &"DROPPED"],
    )?;
    for pu in &r.pus {
        match r.counters.as_ref().and_then(|c| c.per_pu.get(&pu.id)) {
            Some(c) => row(
                w,
                [
                    &pu.id,
                    &pu.kind,
                    &pu.version,
                    &c.trapped,
                    &c.accepted,
                    &c.dropped,
                ],
            )?,
            None => row(w, [&pu.id, &pu.kind, &pu.version, &"-", &"-", &"-"])?,
        }
    }
    if let Some(c) = &r.counters {
        let t = c.total;
        row(
            w,
            [&"(total)", &"", &"", &t.trapped, &t.accepted, &t.dropped],
        )?;
    }
    // Each PU's port set: what its config lists, what discovery found it
    // listening on.
    let with_ports = r
        .pus
        .iter()
        .filter(|pu| !pu.config_ports.is_empty() || !pu.discovered_ports.is_empty());
    for (n, pu) in with_ports.enumerate() {
        if n == 0 {
            writeln!(w, "\n{:<24} CONFIG | DISCOVERED", "PU PORTS")?;
        }
        let list = |ports: &[String]| match ports.is_empty() {
            true => "-".to_owned(),
            false => ports.join(" "),
        };
        writeln!(
            w,
            "{:<24} {} | {}",
            pu.id,
            list(&pu.config_ports),
            list(&pu.discovered_ports)
        )?;
    }

    let t = &r.trap;
    writeln!(
        w,
        "\ntrap      {} received, {} verdicts, {} verdict errors, {} receive errors, \
         {} queues bound",
        t.received,
        t.verdicts,
        t.verdict_errors,
        t.receive_errors,
        t.queues.len()
    )?;
    if let Some(handshake) = &t.handshake {
        // The reasons seen so far; all of them are in `status --json`.
        let seen: Vec<String> = handshake
            .iter()
            .filter(|&(_, &n)| n > 0)
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        let seen = if seen.is_empty() {
            "nothing yet".to_owned()
        } else {
            seen.join(", ")
        };
        writeln!(w, "handshake {seen}")?;
    }
    let kernel = |queue: u16| r.kernel_queues.iter().find(|k| k.queue == queue);
    // Only queues that saw something: 32 idle lines would hide the rest.
    let active: Vec<_> = t
        .queues
        .iter()
        .filter(|q| {
            q.received > 0
                || kernel(q.queue).is_some_and(|k| k.waiting + k.queue_dropped + k.user_dropped > 0)
        })
        .collect();
    if !active.is_empty() {
        writeln!(
            w,
            "{:>5} {:<12} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9}",
            "QUEUE", "RANGE", "RECEIVED", "VERDICTS", "WAITING", "Q-DROP", "USER-DROP", "ID-SEQ"
        )?;
    }
    for q in active {
        let k = kernel(q.queue);
        let field =
            |f: fn(&KernelQueueStats) -> u32| k.map_or("-".to_owned(), |k| f(k).to_string());
        writeln!(
            w,
            "{:>5} {:<12} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9}",
            q.queue,
            q.range,
            q.received,
            q.verdicts,
            field(|k| k.waiting),
            field(|k| k.queue_dropped),
            field(|k| k.user_dropped),
            field(|k| k.id_sequence)
        )?;
    }
    for problem in &r.problems {
        writeln!(w, "\nproblem: {problem}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::tests::sample_report;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("enforcer").chain(args.iter().copied()))
    }

    #[test]
    fn run_takes_its_options_with_defaults() {
        let cli = parse(&["run", "--config", "/etc/e.toml"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.config, PathBuf::from("/etc/e.toml"));
        assert_eq!(args.datapath, None);
        assert_eq!(args.iptables_backend, None);
        assert_eq!(args.instance.instance.as_str(), "enforcer");
        assert_eq!((args.netns.netns, args.control), (None, None));

        let cli = parse(&[
            "run",
            "--config",
            "c.toml",
            "--datapath",
            "iptables",
            "--netns",
            "agentdev1",
            "--instance",
            "t1",
            "--control",
            "/tmp/t1.sock",
            "--iptables-backend",
            "legacy",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.datapath, Some(DatapathChoice::Iptables));
        assert_eq!(args.netns.netns.as_deref(), Some("agentdev1"));
        assert_eq!(args.instance.instance.as_str(), "t1");
        assert_eq!(args.control, Some(PathBuf::from("/tmp/t1.sock")));
        assert_eq!(args.iptables_backend, Some(IptablesBackendChoice::Legacy));
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&["run"]).is_err(), "--config is required");
        let err = parse(&["run", "--config", "c", "--datapath", "nft"]).unwrap_err();
        assert!(err.to_string().contains("auto, ebpf, iptables"), "{err}");
        let err = parse(&["run", "--config", "c", "--iptables-backend", "nf_tables"]).unwrap_err();
        assert!(err.to_string().contains("auto, nft, legacy"), "{err}");
        let err = parse(&["run", "--config", "c", "--instance", "../x"]).unwrap_err();
        assert!(err.to_string().contains("is not a valid id"), "{err}");
        let err = parse(&["cleanup", "--netns", "a/b"]).unwrap_err();
        assert!(err.to_string().contains("network namespace name"), "{err}");
        assert!(parse(&["status", "--instance", "a", "--control", "/x.sock"]).is_err());
        assert!(parse(&["status", "--netns", "a"]).is_err());
    }

    #[test]
    fn status_and_cleanup_parse() {
        let cli = parse(&["status", "--json", "--control", "/tmp/x.sock"]).unwrap();
        let Command::Status(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert!(args.json);
        assert_eq!(args.control, Some(PathBuf::from("/tmp/x.sock")));
        let cli = parse(&["cleanup", "--instance", "t2", "--netns", "ns2"]).unwrap();
        let Command::Cleanup(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.instance.instance.as_str(), "t2");
        assert_eq!(args.netns.netns.as_deref(), Some("ns2"));
    }

    #[test]
    fn demo_takes_a_duration_and_a_datapath() {
        let cli = parse(&["demo"]).unwrap();
        let Command::Demo(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!((args.duration, args.datapath), (None, DatapathChoice::Auto));
        let cli = parse(&["demo", "--duration", "20", "--datapath", "iptables"]).unwrap();
        let Command::Demo(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (args.duration, args.datapath),
            (Some(20), DatapathChoice::Iptables)
        );
        assert!(parse(&["demo", "--datapath", "nft"]).is_err());
        assert!(parse(&["demo", "--duration", "-1"]).is_err());

        // The demo's client is there, but not in the help.
        let cli = parse(&["demo-client", "10.1.0.2:7000"]).unwrap();
        let Command::DemoClient(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.to, "10.1.0.2:7000".parse().unwrap());
        let help = parse(&["--help"]).unwrap_err().to_string();
        assert!(
            help.contains("demo ") && !help.contains("demo-client"),
            "{help}"
        );
    }

    #[test]
    fn keygen_needs_an_output_file() {
        let cli = parse(&["keygen", "--out", "/etc/enforcer/agent.key"]).unwrap();
        let Command::Keygen(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.out, PathBuf::from("/etc/enforcer/agent.key"));
        assert!(parse(&["keygen"]).is_err());
    }

    #[test]
    fn the_human_report_is_a_compact_table() {
        let text = render(&sample_report());
        assert!(
            text.contains("datapath  iptables: forced by configuration"),
            "{text}"
        );
        assert!(
            text.contains("iptables  nft: auto: 0 legacy rules, 12 nft rules"),
            "{text}"
        );
        assert!(
            text.contains("cgroups   net_cls (cgroup v1): cgroups.version = v1; net_cls at"),
            "{text}"
        );
        assert!(text.contains("up 0h01m01s"), "{text}");
        let web = text.lines().find(|l| l.starts_with("web ")).unwrap();
        assert_eq!(
            web.split_whitespace().collect::<Vec<_>>(),
            ["web", "linux-process", "1", "3", "2", "1"]
        );
        let ports = text.lines().filter(|l| l.starts_with("web ")).nth(1);
        assert_eq!(
            ports.unwrap().split_whitespace().collect::<Vec<_>>(),
            ["web", "80/tcp", "8000:8080/tcp", "|", "80/tcp", "9090/tcp"]
        );
        let queue = text.lines().find(|l| l.contains("app-syn")).unwrap();
        assert_eq!(
            queue.split_whitespace().collect::<Vec<_>>(),
            ["0", "app-syn", "3", "3", "0", "0", "0", "3"]
        );
        assert!(text.contains("handshake allowed 2, replayed 1"), "{text}");
        let mut without_counters = sample_report();
        without_counters.counters = None;
        without_counters.problems = vec!["datapath counters: not ready".into()];
        let text = render(&without_counters);
        let web = text.lines().find(|l| l.starts_with("web ")).unwrap();
        assert!(web.ends_with("-          -          -"), "{web}");
        assert!(text.contains("problem: datapath counters: not ready"));
    }
}
