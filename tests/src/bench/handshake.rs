//! Scenario 3 through the identity handshake: new TCP connections from the
//! measured PU on host A (the world's `host` namespace) to a server in a
//! PU on host B (its `peers` namespace, at the target peer's address),
//! both hosts running the release agent of the same datapath with
//! `[identity]`, each host the other's target network. Every connection's
//! SYN and SYN-ACK are signed and verified in user space on both hosts,
//! and B's first ACK authorises it there.
//!
//! The configs are built from the handshake suite's own pieces
//! ([`crate::two_agents`]: key pairs made by the agent's keygen code,
//! [`identity_host`], [`client_pu`], [`server_pu`]), so the benchmark
//! measures the setting the suite proves correct.
//!
//! The probe is the trap scenario's ([`Client::ConnectRate`] from inside
//! the PU, the same threads and duration), so its figures compare with
//! the base setup's connections to the target peer: under the same
//! datapath without identity, and under the bare kernel. Before and after
//! each probe the runner reads both agents' handshake counters (`status`
//! → `trap.handshake`): the refusals among them (a full connection table,
//! a full replay cache, a token that did not verify, …) are a figure of
//! their own and named in a note, so an overloaded handshake is reported
//! as what happened — connects time out after the client's bound, nothing
//! waits longer.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail, ensure};
use enforcer::datapath::DatapathKind;
use enforcer::sandbox::netns::output_ok;

use super::agent::Agent;
use super::client::{self, Client};
use super::plan::{Metric, Mode, Peer, Setup};
use super::world::{LINK_NET, PEER_PU_PORT, World};
use super::{Bench, secs};
use crate::config::Pu;
use crate::two_agents::{KeyPairs, client_pu, identity_host, server_pu};

/// The labels of the two PUs (`app=…`).
const CLIENT_APP: &str = "client";
const SERVER_APP: &str = "server";

/// Counters of `trap.handshake` that count steps and successes; every
/// other one counts a packet refused or not understood.
const NOT_REFUSALS: [&str; 6] = [
    "allowed",
    "external-allowed",
    "tokens-sent",
    "sent-without-token",
    "authorised",
    "held",
];

/// The refusals counted between two readings of an agent's handshake
/// counters, by reason; reasons with none left out.
pub fn refusals(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|(reason, _)| !NOT_REFUSALS.contains(&reason.as_str()))
        .filter_map(|(reason, _)| {
            let n = grew(before, after, reason);
            (n > 0).then(|| (reason.clone(), n))
        })
        .collect()
}

/// How much the counter `reason` grew between two readings.
fn grew(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, reason: &str) -> u64 {
    let at = |m: &BTreeMap<String, u64>| m.get(reason).copied().unwrap_or(0);
    at(after).saturating_sub(at(before))
}

/// Every counter that grew between two readings, and by how much.
fn show_growth(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let grown: BTreeMap<String, u64> = after
        .keys()
        .map(|reason| (reason.clone(), grew(before, after, reason)))
        .filter(|&(_, n)| n > 0)
        .collect();
    show_refusals(&grown)
}

/// `table-full 12, replayed 1`, or `none`.
fn show_refusals(refused: &BTreeMap<String, u64>) -> String {
    if refused.is_empty() {
        return "none".into();
    }
    refused
        .iter()
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The two agents' configs, host A's then host B's: A's measured PU (the
/// `measured`-th, its only one) may reach B's PU on [`PEER_PU_PORT`],
/// which B's PU lets it in on.
fn configs(world: &World, keys: &KeyPairs, measured: usize) -> (String, String) {
    let client = Pu::process(&format!("pu{measured}"), &world.pu_cgroup_path(measured));
    let a = identity_host(keys, "a", "b", [LINK_NET]).pu(client_pu(
        client,
        CLIENT_APP,
        SERVER_APP,
        PEER_PU_PORT,
    ));
    let server = Pu::process("server", &world.peer_pu_cgroup_path());
    let b = identity_host(keys, "b", "a", [LINK_NET]).pu(server_pu(
        server,
        SERVER_APP,
        CLIENT_APP,
        PEER_PU_PORT,
    ));
    (a.to_toml(), b.to_toml())
}

/// Which host an agent runs on.
#[derive(Debug, Clone, Copy)]
enum Host {
    /// The measured PU's (the world's `host` namespace).
    A,
    /// The server PU's (the world's `peers` namespace).
    B,
}

impl Host {
    fn name(self) -> &'static str {
        match self {
            Host::A => "host A",
            Host::B => "host B",
        }
    }
}

/// Both hosts' agents of one mode. A is stopped first (declared first).
struct Pair {
    a: Agent,
    b: Agent,
}

/// The handshake counters of an agent's status.
fn counters(agent: &Agent) -> Result<BTreeMap<String, u64>> {
    agent
        .status()?
        .0
        .trap
        .handshake
        .context("the agent's status has no handshake counters")
}

impl Bench<'_> {
    /// A [`Setup::identity`] setup: both agents of every mode, the probe
    /// runs with the modes taking turns, then the agents stopped.
    pub(super) fn identity_setup(&mut self, setup: &Setup) -> Result<()> {
        let keys = KeyPairs::new_in(&self.tmp, &["a", "b"])?;
        let mut running = Vec::new();
        for &mode in &setup.modes {
            if mode == Mode::Bare {
                continue;
            }
            let world = self.worlds.iter_mut().find(|(m, _)| *m == mode);
            world
                .expect("a world for every mode of the plan")
                .1
                .ensure_cgroups(setup.scale.pus)?;
            if let Some(pair) = self.start_pair(setup, mode, &keys)? {
                running.push((mode, pair));
            }
        }
        for rep in 1..=self.plan.reps {
            for (mode, pair) in &running {
                self.handshake_step(setup, *mode, pair, rep)?;
            }
        }
        for (mode, pair) in running {
            for (host, agent) in [(Host::A, pair.a), (Host::B, pair.b)] {
                let label = Self::label(setup, mode, &format!("stop agent ({})", host.name()));
                let outcome = match agent.stop() {
                    Ok(took) => Metric::Shutdown.unit().format(secs(took)),
                    Err(e) => {
                        self.note(format!(
                            "stopping the {mode:?} agent on {}: {e:#}",
                            host.name()
                        ));
                        "failed".into()
                    }
                };
                self.progress.step(&label, &outcome);
            }
        }
        Ok(())
    }

    /// Starts B's agent, then A's; `None` when either failed (a note, the
    /// mode's remaining steps skipped).
    fn start_pair(&mut self, setup: &Setup, mode: Mode, keys: &KeyPairs) -> Result<Option<Pair>> {
        let measured = setup.scale.pus - 1;
        let (config_a, config_b) = configs(self.world(mode), keys, measured);
        let steps = setup.steps(mode, self.plan.reps);
        let b = match self.start_on(setup, mode, Host::B, &config_b)? {
            Some(agent) => agent,
            None => {
                let label = Self::label(setup, mode, "not measurable");
                self.progress.skip(steps - 1, &label);
                return Ok(None);
            }
        };
        match self.start_on(setup, mode, Host::A, &config_a)? {
            Some(a) => Ok(Some(Pair { a, b })),
            None => {
                drop(b);
                let label = Self::label(setup, mode, "not measurable");
                self.progress.skip(steps - 2, &label);
                Ok(None)
            }
        }
    }

    /// Starts one host's agent with `config` and checks that it runs the
    /// datapath asked for with the handshake on; one progress line.
    fn start_on(
        &mut self,
        setup: &Setup,
        mode: Mode,
        host: Host,
        config: &str,
    ) -> Result<Option<Agent>> {
        let started = self.launch(
            mode,
            |w| match host {
                Host::A => &w.host,
                Host::B => &w.peers,
            },
            config,
            |agent| check_identity(agent, mode),
        )?;
        let label = Self::label(
            setup,
            mode,
            &format!("start agent ({}, identity)", host.name()),
        );
        let why = match self.ready_or_why(&label, started)? {
            Ok(agent) => {
                if self.results.nofile.is_none() {
                    self.results.nofile = agent.open_files_limit().ok();
                }
                return Ok(Some(agent));
            }
            Err(why) => why,
        };
        // A note, not the scale's N/A: the base setup's figures stand.
        self.note(format!(
            "the identity handshake ({mode:?}): the agent on {} {why}",
            host.name()
        ));
        Ok(None)
    }

    /// One run of the handshake probe, recorded and shown.
    fn handshake_step(&mut self, setup: &Setup, mode: Mode, pair: &Pair, rep: usize) -> Result<()> {
        let scale = setup.scale;
        let what = super::plan::Probe::Handshake.name();
        let outcome = match self.handshake_probe(setup, mode, pair) {
            Ok(run) => {
                let mut shown = Metric::HsConnRate.unit().format(run.rate);
                let refused: u64 = run.refused.values().flat_map(|r| r.values()).sum();
                if refused > 0 {
                    shown.push_str(&format!(", {refused} refused"));
                }
                if run.failed > 0 || refused > 0 {
                    let by_host = run
                        .refused
                        .iter()
                        .map(|(host, r)| format!("{host}: {}", show_refusals(r)))
                        .collect::<Vec<_>>()
                        .join("; ");
                    self.note(format!(
                        "{what} ({mode:?}), run {rep}: {} of {} connections failed (last: {}); \
                         the handshake refused — {by_host}",
                        run.failed,
                        run.ok + run.failed,
                        run.last_error
                    ));
                }
                if run.bypassed > 0 {
                    shown.push_str(&format!(", {} past the handshake", run.bypassed));
                    self.note(format!(
                        "{what} ({mode:?}), run {rep}: {} of {} connections the client completed \
                         went past both agents' handshake (counted on host A: {}; host B: {}) — \
                         a new SYN on the addresses and ports of a connection closed moments \
                         earlier finds its conntrack entry (CLOSE, kept 10 s) still carrying the \
                         Authorised connection mark, which the datapath accepts before the trap",
                        run.bypassed, run.ok, run.growth[0], run.growth[1]
                    ));
                }
                for (metric, value) in [
                    (Metric::HsConnRate, run.rate),
                    (Metric::HsConnP50, run.p50),
                    (Metric::HsConnP99, run.p99),
                    (Metric::HsRefused, refused as f64),
                    (Metric::HsBypassed, run.bypassed as f64),
                ] {
                    if value.is_finite() {
                        self.results.add(scale, mode, metric, value);
                    }
                }
                shown
            }
            Err(e) => {
                super::progress::interrupted()?;
                self.note(format!("{what} ({mode:?}), run {rep}: {e:#}"));
                "failed".into()
            }
        };
        let label = Self::label(setup, mode, &what);
        self.progress
            .step(&format!("{label} run {rep}/{}", self.plan.reps), &outcome);
        Ok(())
    }

    /// The server in B's PU for the probe's time, the connectors in A's
    /// PU, and both agents' counters around them.
    fn handshake_probe(&self, setup: &Setup, mode: Mode, pair: &Pair) -> Result<HandshakeRun> {
        let secs = self.plan.probe_time.as_secs_f64();
        let world = self.world(mode);
        // The server lives a little longer than the connectors, so that
        // none of them finds it gone.
        let server = Client::Accept {
            port: PEER_PU_PORT,
            secs: secs + 1.0,
        }
        .serve_in(&self.exe, &world.peers, world.peer_pu())?;
        // Each run starts without the last one's closed connections:
        // their conntrack entries keep the Authorised mark for 10 s, and
        // a new connection on the same addresses and ports would ride
        // them past the handshake (see the bypass count below).
        for ns in [&world.host, &world.peers] {
            let mut cmd = ns.command("conntrack")?;
            cmd.arg("-F");
            output_ok(&mut cmd).context("flushing the conntrack table")?;
        }
        let before = [counters(&pair.a)?, counters(&pair.b)?];
        let connected = Client::ConnectRate {
            to: World::addr(Peer::Target, PEER_PU_PORT),
            secs,
            threads: client::CONNECT_THREADS,
            from: None,
            request: None,
        }
        .run_in(&self.exe, &world.host, world.measured(setup.scale));
        // Read whatever the client's outcome: when no connection got
        // through, the counters say why.
        let after = [counters(&pair.a)?, counters(&pair.b)?];
        let refused: BTreeMap<&'static str, BTreeMap<String, u64>> = [Host::A, Host::B]
            .into_iter()
            .zip(before.iter().zip(&after))
            .map(|(host, (b, a))| (host.name(), refusals(b, a)))
            .collect();
        let v = match connected {
            Ok(v) => v,
            Err(e) => {
                let by_host: Vec<String> = refused
                    .iter()
                    .map(|(host, r)| format!("{host}: {}", show_refusals(r)))
                    .collect();
                bail!("{e:#}; the handshake refused — {}", by_host.join("; "));
            }
        };
        server.finish()?;
        let num = |field: &str| {
            v[field]
                .as_f64()
                .with_context(|| format!("no {field} in the client's result {v}"))
        };
        let ok = num("connections")? as u64;
        // A connection through the handshake had its SYN-ACK verified by
        // A's agent (counted before the verdict that let it on). One the
        // client completed without that went past both agents: counted
        // apart, never in the rate.
        let verified = grew(&before[0], &after[0], "allowed").min(ok);
        Ok(HandshakeRun {
            rate: verified as f64 / num("secs")?,
            bypassed: ok - verified,
            growth: [
                show_growth(&before[0], &after[0]),
                show_growth(&before[1], &after[1]),
            ],
            p50: num("p50")?,
            p99: num("p99")?,
            ok,
            failed: num("failed")? as u64,
            last_error: v["last_error"].to_string(),
            refused,
        })
    }
}

/// What one probe saw.
struct HandshakeRun {
    /// Connections through the handshake per second.
    rate: f64,
    /// Connections the client completed without A's agent verifying
    /// their SYN-ACK.
    bypassed: u64,
    /// Every handshake counter that grew, on host A and on host B.
    growth: [String; 2],
    p50: f64,
    p99: f64,
    ok: u64,
    failed: u64,
    last_error: String,
    /// Refusals by host, then reason.
    refused: BTreeMap<&'static str, BTreeMap<String, u64>>,
}

/// The agent runs the datapath asked for, with the handshake on and its
/// one PU in force.
fn check_identity(agent: &Agent, mode: Mode) -> Result<()> {
    let (status, _) = agent.status()?;
    let expected = match mode {
        Mode::Ebpf => DatapathKind::Ebpf,
        _ => DatapathKind::Iptables,
    };
    ensure!(
        status.datapath.kind == expected,
        "the agent runs {} ({}), not {expected}",
        status.datapath.kind,
        status.datapath.reason
    );
    ensure!(
        status.trap.handshake.is_some(),
        "the agent runs without the identity handshake"
    );
    if status.pus.len() != 1 {
        bail!("the agent has {} PUs in force, not 1", status.pus.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|&(k, v)| (k.to_owned(), v)).collect()
    }

    #[test]
    fn refusals_are_the_growth_of_every_counter_but_steps_and_successes() {
        let before = map(&[("allowed", 10), ("table-full", 2), ("authorised", 10)]);
        let after = map(&[
            ("allowed", 900),
            ("authorised", 900),
            ("tokens-sent", 1800),
            ("table-full", 7),
            ("replayed", 0),
            ("replay-cache-full", 3),
        ]);
        let refused = refusals(&before, &after);
        assert_eq!(refused, map(&[("table-full", 5), ("replay-cache-full", 3)]));
        assert_eq!(show_refusals(&refused), "replay-cache-full 3, table-full 5");
        assert_eq!(show_refusals(&refusals(&after, &after)), "none");
        // A counter that went down (an agent restarted) is no refusal.
        assert!(refusals(&after, &before).is_empty());
    }
}
