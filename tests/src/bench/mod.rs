//! `cargo xtask bench`: where the eBPF datapath stands against the
//! iptables fallback and the bare kernel (issue 8).
//!
//! One run builds one identical [`world`] per mode — a host namespace for
//! the agent and the PUs, a peer namespace with servers, a veth between
//! them, one cgroup per PU — and goes through the [`plan`]'s setups (a
//! policy scale). For each it starts the release agent of every datapath
//! mode in its world (`--netns`/`--instance` of its own, see [`agent`];
//! `bare` has none), then runs the probes from a process inside the last
//! PU's cgroup (this binary again, as `bench client …`: [`client`]) with
//! the modes taking turns at every repetition, so that a change in the
//! machine's background load hits every mode alike; then the
//! control-plane reloads, likewise in turns, the footprint, and stops
//! the agents. The [`report`] goes to `<out>/<date>[-quick].md` with SVG
//! plots beside it.
//!
//! The scenarios of the issue map onto the plan as follows: 1 and 3 are
//! the base setup's probes, 3 with the identity handshake the
//! [`handshake`] setup's (the peer namespace runs a second agent for a PU
//! of its own); 2 is the scale setups' probes (PUs, ACLs, target
//! networks); 4 is every setup's start-up and reloads; 5 is every setup's
//! footprint, up to the largest PU count. Issue 6's measurement of the
//! proxy redirection against the direct path is the [`proxy`] setup.
//!
//! Everything the run makes is an RAII value removed on every path,
//! errors and Ctrl-C included ([`progress::catch_signals`]), and named
//! `enfbench<pid>…`.

mod agent;
mod client;
mod footprint;
mod handshake;
mod machine;
mod plan;
mod progress;
mod proxy;
mod report;
mod results;
mod servers;
mod stats;
mod svg;
mod world;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use enforcer::agent::InstanceName;
use enforcer::datapath::DatapathKind;
use enforcer::sandbox::netns::Netns;
use enforcer::sandbox::unique_name;

use agent::{Agent, Launch, Started};
use machine::Machine;
use plan::{ControlOp, Metric, Mode, Peer, Plan, Probe, Setup};
use progress::{Progress, interrupted, pause};
use results::Results;
use servers::{ACCEPT_PORT, TCP_SINK_PORT, UDP_PORT};
use world::{PREFIX, PU_PORT, Variant, World};

pub use client::Client;
pub use plan::Part;

/// What `bench run` is told.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The agent to measure: the release `enforcer` binary.
    #[arg(long, value_name = "PATH")]
    pub agent: PathBuf,
    /// The short run: fewer repetitions, shorter probes, smaller scales
    /// (under 5 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Where the report and plots go.
    #[arg(long, value_name = "DIR", default_value = "bench/results")]
    pub out: PathBuf,
    /// Only these parts of the run (repeatable).
    #[arg(long, value_enum, value_name = "PART")]
    pub only: Vec<Part>,
}

/// Runs the benchmarks and writes the report; returns its path.
pub fn run(options: &Options) -> Result<PathBuf> {
    progress::catch_signals()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks need root: they create namespaces, cgroups, programs and rules");
    }
    let env = crate::privilege::require().context("the benchmarks cannot run here")?;
    // A benchmark killed outright (SIGKILL, a lost session) could not
    // remove its world; the next one does, before it makes its own.
    for removed in crate::leftovers::sweep_stale(world::PREFIX, &env.cgroup2, &env.bpffs)
        .context("removing what an earlier, killed benchmark left")?
    {
        eprintln!("removed a killed benchmark's leftover {removed}");
    }
    let agent = std::fs::canonicalize(&options.agent)
        .with_context(|| format!("the agent {}", options.agent.display()))?;
    let plan = Plan::new(options.quick, &options.only);
    if plan.setups.is_empty() {
        bail!("--only selected nothing to run");
    }
    let machine = Machine::read();
    let tmp = TempDir::new()?;
    let mut modes: Vec<Mode> = plan.setups.iter().flat_map(|s| s.modes.clone()).collect();
    modes.sort();
    modes.dedup();
    let mut worlds = Vec::new();
    for mode in modes {
        worlds.push((mode, World::new(&env.cgroup2)?));
    }
    let mut bench = Bench {
        exe: std::env::current_exe().context("finding this program")?,
        agent,
        tmp: tmp.path.clone(),
        worlds,
        progress: Progress::new(plan.steps()),
        results: Results::default(),
        plan: &plan,
    };
    eprintln!(
        "bench: {} run, {} steps, {} repetitions, probes of {:?}",
        if plan.quick { "quick" } else { "full" },
        plan.steps(),
        plan.reps,
        plan.probe_time,
    );
    for setup in &plan.setups {
        bench.setup(setup)?;
    }
    let Bench {
        worlds,
        progress,
        results,
        ..
    } = bench;
    drop(worlds);
    let context = report::Context {
        plan: &plan,
        machine: &machine,
        results: &results,
        elapsed: progress.elapsed(),
        interference: progress.interference(),
        command: reproduce_command(options),
    };
    report::write(&options.out, &context)
}

/// The command that reproduces a run.
fn reproduce_command(options: &Options) -> String {
    let mut command = String::from("cargo xtask bench");
    if options.quick {
        command.push_str(" --quick");
    }
    for part in &options.only {
        let name = clap::ValueEnum::to_possible_value(part).map(|v| v.get_name().to_owned());
        command.push_str(&format!(" --only {}", name.unwrap_or_default()));
    }
    command
}

/// The run in progress.
struct Bench<'p> {
    /// This binary (the clients).
    exe: PathBuf,
    agent: PathBuf,
    tmp: PathBuf,
    /// One identical world per mode, so that the modes' probes can take
    /// turns: each sees the same background load.
    worlds: Vec<(Mode, World)>,
    progress: Progress,
    results: Results,
    plan: &'p Plan,
}

/// A mode of a setup while it runs: its agent, if it has one.
struct Running {
    mode: Mode,
    agent: Option<Agent>,
}

impl Bench<'_> {
    fn world(&self, mode: Mode) -> &World {
        &self
            .worlds
            .iter()
            .find(|(m, _)| *m == mode)
            .expect("a world for every mode of the plan")
            .1
    }

    /// One setup: start every mode's agent, run the probes with the modes
    /// taking turns at each repetition, then the reloads, the footprint,
    /// and stop the agents.
    fn setup(&mut self, setup: &Setup) -> Result<()> {
        if setup.identity {
            return self.identity_setup(setup);
        }
        if setup.proxy {
            return self.proxy_setup(setup);
        }
        let extra = usize::from(setup.control.contains(&ControlOp::AddPu));
        let mut running = Vec::new();
        for &mode in &setup.modes {
            let cgroups = match mode {
                Mode::Bare => setup.scale.pus,
                _ => setup.scale.pus + extra,
            };
            let world = self.worlds.iter_mut().find(|(m, _)| *m == mode);
            world
                .expect("a world for every mode of the plan")
                .1
                .ensure_cgroups(cgroups)?;
            match mode {
                Mode::Bare => running.push(Running { mode, agent: None }),
                _ => {
                    if let Some(agent) = self.start(setup, mode)? {
                        running.push(Running {
                            mode,
                            agent: Some(agent),
                        });
                    }
                }
            }
        }
        for &probe in &setup.probes {
            for rep in 1..=self.plan.reps {
                for mode in running.iter().map(|r| r.mode) {
                    self.probe_step(setup, mode, probe, rep)?;
                }
            }
        }
        for &op in &setup.control {
            self.control(setup, op, &mut running)?;
        }
        if !setup.control.is_empty() {
            // Once per setup: a status costs seconds at scale (iptables).
            for r in &running {
                if let Some(Err(e)) = r.agent.as_ref().map(Agent::confirm_reloads) {
                    let (mode, scale) = (r.mode, setup.scale);
                    self.note(format!("{mode:?} at {scale}: {e:#}"));
                }
            }
        }
        for r in &running {
            if let (true, Some(agent)) = (setup.footprint, &r.agent) {
                self.footprint(setup, r.mode, agent);
            }
        }
        for r in running {
            if let Some(agent) = r.agent {
                self.stop(setup, r.mode, agent);
            }
        }
        Ok(())
    }

    fn label(setup: &Setup, mode: Mode, what: &str) -> String {
        format!("{what:<30} {:<8} {}", mode.name(), setup.scale)
    }

    /// A note for the report, also shown in the progress.
    fn note(&mut self, text: String) {
        eprintln!("    note: {text}");
        self.results.notes.push(text);
    }

    /// Starts an agent of `mode` with `config` in the namespace `netns`
    /// picks of the mode's world, under a fresh instance name, and runs
    /// `check` on it once it is ready: what every scenario's start-up
    /// shares. The outer error (no instance name) ends the bench; the
    /// inner one is the agent's.
    fn launch<T>(
        &self,
        mode: Mode,
        netns: impl FnOnce(&World) -> &Netns,
        config: &str,
        check: impl FnOnce(&Agent) -> Result<T>,
    ) -> Result<Result<(Started, Option<T>)>> {
        let instance: InstanceName = unique_name(PREFIX)
            .parse()
            .map_err(|e: String| anyhow!(e))?;
        let launch = Launch {
            exe: &self.agent,
            netns: netns(self.world(mode)),
            mode,
            dir: &self.tmp,
            instance: &instance,
        };
        Ok(
            Agent::start(&launch, config, self.plan.start_budget).and_then(|s| {
                let checked = match &s {
                    Started::Ready(agent) => Some(check(agent)?),
                    Started::TimedOut { .. } => None,
                };
                Ok((s, checked))
            }),
        )
    }

    /// A scenario's started agent, its progress line `label` saying how
    /// soon it was ready; else why not (the line says it failed), for the
    /// scenario's note.
    fn ready_or_why(
        &mut self,
        label: &str,
        started: Result<(Started, Option<()>)>,
    ) -> Result<std::result::Result<Agent, String>> {
        let why = match started {
            Ok((Started::Ready(agent), _)) => {
                let took = Metric::Startup.unit().format(secs(agent.startup));
                self.progress.step(label, &format!("ready in {took}"));
                return Ok(Ok(agent));
            }
            Ok((Started::TimedOut { after, .. }, _)) => format!(
                "did not get ready within {}",
                Metric::Startup.unit().format(secs(after))
            ),
            Err(e) => {
                interrupted()?;
                format!("failed: {e:#}")
            }
        };
        self.progress.step(label, "failed");
        Ok(Err(why))
    }

    /// Starts the agent; `None` when it did not get ready within the
    /// budget (a finding) or failed — its steps are then skipped.
    fn start(&mut self, setup: &Setup, mode: Mode) -> Result<Option<Agent>> {
        let scale = setup.scale;
        let steps = setup.steps(mode, self.plan.reps);
        let config = self.world(mode).config(scale, Variant::default());
        let label = Self::label(setup, mode, "start agent");
        let started = self.launch(
            mode,
            |w| &w.host,
            &config,
            |agent| check_status(agent, setup, mode),
        )?;
        match started {
            Ok((Started::Ready(agent), status)) => {
                if self.results.nofile.is_none() {
                    self.results.nofile = agent.open_files_limit().ok();
                }
                let took = secs(agent.startup);
                self.results.add(scale, mode, Metric::Startup, took);
                if let Some(status) = status {
                    self.results.add(scale, mode, Metric::Status, secs(status));
                }
                let shown = format!("ready in {}", Metric::Startup.unit().format(took));
                self.progress.step(&label, &shown);
                Ok(Some(agent))
            }
            Ok((Started::TimedOut { after, progress }, _)) => {
                let why = format!(
                    "its start-up did not finish within the budget of {} ({} when stopped)",
                    Metric::Startup.unit().format(secs(after)),
                    progress.unwrap_or_else(|| "progress unknown".into())
                );
                self.progress.step(&label, &why);
                self.results.set_unmeasured(scale, mode, why);
                self.progress
                    .skip(steps - 1, &Self::label(setup, mode, "not measurable"));
                Ok(None)
            }
            Err(e) => {
                interrupted()?;
                let why = format!("the agent failed: {e:#}");
                // In the report's N/A list, not its notes.
                eprintln!("    {} at {scale}: {why}", mode.name());
                self.results.set_unmeasured(scale, mode, why);
                self.progress
                    .skip(steps, &Self::label(setup, mode, "agent failed"));
                Ok(None)
            }
        }
    }

    /// One run of a probe, recorded and shown.
    fn probe_step(&mut self, setup: &Setup, mode: Mode, probe: Probe, rep: usize) -> Result<()> {
        let scale = setup.scale;
        let outcome = match self.probe(setup, mode, probe) {
            Ok(values) => {
                let shown = values
                    .first()
                    .map(|&(m, v)| m.unit().format(v))
                    .unwrap_or_default();
                for (metric, value) in values {
                    self.results.add(scale, mode, metric, value);
                }
                shown
            }
            Err(e) => {
                interrupted()?;
                let what = probe.name();
                self.note(format!("{what} {mode:?} at {scale}, run {rep}: {e:#}"));
                "failed".into()
            }
        };
        let label = Self::label(setup, mode, &probe.name());
        self.progress
            .step(&format!("{label} run {rep}/{}", self.plan.reps), &outcome);
        Ok(())
    }

    /// One run of a probe in `mode`'s world: the metrics it yields.
    fn probe(&mut self, setup: &Setup, mode: Mode, probe: Probe) -> Result<Vec<(Metric, f64)>> {
        let secs = self.plan.probe_time.as_secs_f64();
        let world = self.world(mode);
        let cgroup = world.measured(setup.scale);
        let run = |client: Client| client.run_in(&self.exe, &world.host, cgroup);
        let num = |v: &serde_json::Value, field: &str| {
            v[field]
                .as_f64()
                .with_context(|| format!("no {field} in the client's result {v}"))
        };
        Ok(match probe {
            Probe::TcpThroughput(peer) => {
                let to = World::addr(peer, TCP_SINK_PORT);
                let v = run(Client::TcpThroughput { to, secs })?;
                let bits = num(&v, "bytes")? * 8.0;
                vec![(Metric::TcpThroughput(peer), bits / num(&v, "secs")?)]
            }
            Probe::Udp(peer) | Probe::UdpSendto(peer) => {
                let to = World::addr(peer, UDP_PORT);
                let before = world.servers(peer).udp_received();
                let size = client::UDP_PAYLOAD;
                let unconnected = matches!(probe, Probe::UdpSendto(_));
                let v = run(Client::UdpFlood {
                    to,
                    secs,
                    size,
                    unconnected,
                })?;
                // Let the last datagrams on the way arrive.
                pause(Duration::from_millis(100))?;
                let received = world.servers(peer).udp_received() - before;
                let took = num(&v, "secs")?;
                let delivered = received as f64 / took;
                match unconnected {
                    true => vec![(Metric::UdpSendtoDelivered(peer), delivered)],
                    false => vec![
                        (Metric::UdpDelivered(peer), delivered),
                        (Metric::UdpSent(peer), num(&v, "sent")? / took),
                    ],
                }
            }
            Probe::Connect(peer) => {
                let to = World::addr(peer, ACCEPT_PORT);
                let threads = client::CONNECT_THREADS;
                let trapped = peer == Peer::Target && mode != Mode::Bare;
                let syns_before = match trapped {
                    true => Some(syns_queued(&world.host)?),
                    false => None,
                };
                let v = run(Client::ConnectRate {
                    to,
                    secs,
                    threads,
                    from: None,
                    request: None,
                })?;
                let past = match syns_before {
                    Some(before) => {
                        let queued = syns_queued(&world.host)?.saturating_sub(before);
                        let ok = num(&v, "connections")? as u64;
                        vec![(Metric::PastTrap, ok.saturating_sub(queued) as f64)]
                    }
                    None => Vec::new(),
                };
                let (ok, failed) = (num(&v, "connections")?, num(&v, "failed")?);
                if failed > 0.0 {
                    let total = ok + failed;
                    let last = v["last_error"].clone();
                    self.note(format!(
                        "{} ({mode:?} at {}): {failed} of {total} connections failed \
                         (last: {last})",
                        probe.name(),
                        setup.scale
                    ));
                }
                let mut values = vec![
                    (Metric::ConnRate(peer), ok / num(&v, "secs")?),
                    (Metric::ConnP50(peer), num(&v, "p50")?),
                    (Metric::ConnP99(peer), num(&v, "p99")?),
                ];
                values.extend(past);
                values
            }
            Probe::Handshake => bail!("the handshake probe runs in its own setup"),
            Probe::Request(_) => bail!("the request probes run in the proxy setup"),
            Probe::Incoming(peer) => {
                // The server lives a little longer than the connectors,
                // so that none of them finds it gone.
                let server = Client::Accept {
                    port: PU_PORT,
                    secs: secs + 1.0,
                }
                .serve_in(&self.exe, &world.host, cgroup)?;
                let v = Client::ConnectRate {
                    to: World::pu_addr(),
                    secs,
                    threads: client::CONNECT_THREADS,
                    from: Some(World::ip(peer)),
                    request: None,
                }
                .run_in_netns(&self.exe, &world.peers)?;
                let accepted = num(&server.finish()?, "accepted")?;
                let (ok, failed) = (num(&v, "connections")?, num(&v, "failed")?);
                if failed > 0.0 || accepted < ok {
                    let last = v["last_error"].clone();
                    self.note(format!(
                        "{} ({mode:?} at {}): {failed} connections failed, {ok} succeeded, \
                         the server accepted {accepted} (last error: {last})",
                        probe.name(),
                        setup.scale
                    ));
                }
                vec![
                    (Metric::InConnRate(peer), ok / num(&v, "secs")?),
                    (Metric::InConnP50(peer), num(&v, "p50")?),
                    (Metric::InConnP99(peer), num(&v, "p99")?),
                ]
            }
        })
    }

    /// The reloads of one control-plane operation, repeated, the modes
    /// taking turns.
    fn control(&mut self, setup: &Setup, op: ControlOp, running: &mut [Running]) -> Result<()> {
        let scale = setup.scale;
        let base = Variant::default();
        // (variant to load, metric it times, what the line says)
        let cycle: Vec<(Variant, Metric, &str)> = match op {
            ControlOp::AddPu => vec![
                (
                    Variant {
                        extra_pu: true,
                        ..base
                    },
                    Metric::AddPu,
                    "add a PU",
                ),
                (base, Metric::DeletePu, "delete that PU"),
            ],
            ControlOp::UpdatePu => vec![
                (
                    Variant {
                        updated: true,
                        ..base
                    },
                    Metric::UpdatePu,
                    "update the last PU",
                ),
                (base, Metric::UpdatePu, "update it back"),
            ],
            ControlOp::TargetChange => vec![
                (
                    Variant {
                        extra_target: true,
                        ..base
                    },
                    Metric::TargetChange,
                    "add a target network",
                ),
                (base, Metric::TargetChange, "remove it"),
            ],
        };
        let reloads = self.plan.reps * op.reloads();
        for (i, (variant, metric, what)) in cycle.iter().cycle().take(reloads).enumerate() {
            for r in running.iter_mut() {
                let Some(agent) = r.agent.as_mut() else {
                    continue;
                };
                let mode = r.mode;
                let config = self.world(mode).config(scale, *variant);
                let outcome = match agent.reload(&config) {
                    Ok(took) => {
                        self.results.add(scale, mode, *metric, secs(took));
                        metric.unit().format(secs(took))
                    }
                    Err(e) => {
                        interrupted()?;
                        self.note(format!("{what} ({mode:?} at {scale}): {e:#}"));
                        "failed".into()
                    }
                };
                let label = Self::label(setup, mode, &format!("{what} (SIGHUP)"));
                self.progress
                    .step(&format!("{label} {}/{reloads}", i + 1), &outcome);
            }
        }
        for r in running.iter_mut() {
            let Some(agent) = r.agent.as_mut() else {
                continue;
            };
            // An odd number of updates leaves the changed variant in
            // force: put the base back so that what follows measures the
            // scale as named.
            if op == ControlOp::UpdatePu && reloads % 2 == 1 {
                agent.reload(&self.world(r.mode).config(scale, base))?;
            }
        }
        Ok(())
    }

    /// Agent memory, kernel memory of maps or sets, and rules.
    fn footprint(&mut self, setup: &Setup, mode: Mode, agent: &Agent) {
        let scale = setup.scale;
        let host = &self.world(mode).host;
        let readings = [
            (Metric::Rss, agent.rss_bytes()),
            (
                Metric::KernelMemory,
                match mode {
                    Mode::Ebpf => agent.map_memlock(),
                    _ => footprint::ipset_memory(host),
                },
            ),
            (Metric::Rules, footprint::rule_count(host)),
            (Metric::OpenFiles, agent.open_files()),
        ];
        let mut shown = Vec::new();
        for (metric, reading) in readings {
            match reading {
                Ok(v) => {
                    self.results.add(scale, mode, metric, v as f64);
                    shown.push(metric.unit().format(v as f64));
                }
                Err(e) => {
                    self.note(format!("{} ({mode:?} at {scale}): {e:#}", metric.name()));
                    shown.push("failed".into());
                }
            }
        }
        let label = Self::label(setup, mode, "footprint (RSS, kernel, rules, fds)");
        self.progress.step(&label, &shown.join(", "));
    }

    /// Stops the agent (it removes everything it made), timed.
    fn stop(&mut self, setup: &Setup, mode: Mode, agent: Agent) {
        let scale = setup.scale;
        let label = Self::label(setup, mode, "stop agent");
        match agent.stop() {
            Ok(took) => {
                self.results.add(scale, mode, Metric::Shutdown, secs(took));
                let shown = Metric::Shutdown.unit().format(secs(took));
                self.progress.step(&label, &shown);
            }
            Err(e) => {
                self.note(format!("stopping the {mode:?} agent at {scale}: {e:#}"));
                self.progress.step(&label, "failed");
            }
        }
    }
}

/// SYNs the kernel ever queued to the agent from the PUs in `ns` (the
/// `app-syn` queues of the default layout, which the bench's configs
/// keep).
fn syns_queued(ns: &Netns) -> Result<u64> {
    let stats = crate::netfilter::queue_stats(ns)?;
    let ranges = enforcer::datapath::queues::ranges(&Default::default());
    let syn = ranges
        .iter()
        .find(|r| r.name == "app-syn")
        .context("no app-syn queue range in the default layout")?;
    Ok(stats
        .iter()
        .filter(|q| syn.queues().contains(&q.queue))
        .map(|q| u64::from(q.id_sequence))
        .sum())
}

/// The agent runs the datapath asked for, with every PU in force;
/// returns how long the status took.
fn check_status(agent: &Agent, setup: &Setup, mode: Mode) -> Result<Duration> {
    let (status, took) = agent.status()?;
    let expected = match mode {
        Mode::Ebpf => DatapathKind::Ebpf,
        _ => DatapathKind::Iptables,
    };
    if status.datapath.kind != expected {
        bail!(
            "the agent runs {} ({}), not {expected}",
            status.datapath.kind,
            status.datapath.reason
        );
    }
    if status.pus.len() != setup.scale.pus {
        bail!(
            "the agent has {} PUs in force, not {}",
            status.pus.len(),
            setup.scale.pus
        );
    }
    Ok(took)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A private directory for configs and logs, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let path = std::env::temp_dir().join(unique_name(PREFIX));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: removing {}: {e}", self.path.display());
        }
    }
}
