//! The proxy scenario (issue 6): requests from the measured PU to a
//! dependent service through its proxy, against the same PU's direct
//! requests to an ACL peer, under each datapath and the bare kernel.
//!
//! Each mode's world gets the harness's [`TestProxy`] (a proxy written
//! for iptables `REDIRECT`: `SO_ORIGINAL_DST`, onward with the proxy
//! mark, a thread per connection) on the PU's proxy port, its listening
//! socket made in the world's host-scope cgroup — on eBPF the agent's
//! `getsockopt` program answers `SO_ORIGINAL_DST` there only — and the
//! agent runs a config of one PU with that proxy port and the service's
//! echo port as its dependent service ([`World::proxy_config`]). No ACL
//! accepts the service: a request completes through the proxy or not at
//! all, and the proxy's count of connections must grow by the requests
//! completed (a note says otherwise).
//!
//! The probe is the connection-rate client ([`Client::ConnectRate`]) with
//! a request on each connection: connect, 64 bytes, their echo, close —
//! the echo server closes first, so neither the client nor the proxy's
//! onward socket keeps a TIME_WAIT. Under the bare kernel nothing
//! redirects, so its "through the proxy" is the same proxy reached by its
//! loopback address (where `REDIRECT` and the eBPF connect hook send a
//! PU's connection), forwarding to the service without asking: the
//! proxy's own cost, against which each datapath's adds the redirection.

use anyhow::{Context as _, Result};

use super::agent::Agent;
use super::client::{self, Client};
use super::plan::{Metric, Mode, Probe, Route, Setup};
use super::progress::interrupted;
use super::world::{PROXY_PORT, World};
use super::{Bench, check_status, secs};
use crate::netfilter::Family;
use crate::proxy::{TestProxy, proxy_mark};

/// The harness's traffic tool beside this binary (`target/release/`):
/// the proxy's listening socket is made by its `hold-listener` in the
/// host-scope cgroup.
fn nettool(exe: &std::path::Path) -> Result<String> {
    let path = exe.with_file_name("nettool");
    if !path.is_file() {
        anyhow::bail!(
            "the proxy scenario needs nettool beside the runner ({}): build the tests crate \
             (`cargo build --release --workspace`)",
            path.display()
        );
    }
    path.to_str()
        .map(str::to_owned)
        .context("nettool's path is not UTF-8")
}

/// A mode of the proxy setup while it runs: its proxy, and its agent if
/// it has one.
struct Proxied {
    mode: Mode,
    proxy: TestProxy,
    agent: Option<Agent>,
}

/// What one run of a request probe saw.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRun {
    pub ok: u64,
    pub failed: u64,
    pub secs: f64,
    pub p50: f64,
    pub p99: f64,
    /// Connections the proxy accepted during the run, and how many of
    /// them it forwarded.
    pub proxied: u64,
    pub forwarded: u64,
}

impl RequestRun {
    /// The figures of `route` this run yields.
    pub fn values(&self, route: Route) -> Vec<(Metric, f64)> {
        vec![
            (Metric::ReqRate(route), self.ok as f64 / self.secs),
            (Metric::ReqP50(route), self.p50),
            (Metric::ReqP99(route), self.p99),
        ]
    }

    /// What was wrong with the run, for a note: failed requests, requests
    /// that went past the proxy (or into it, when direct), connections
    /// the proxy could not forward.
    pub fn trouble(&self, route: Route) -> Vec<String> {
        let mut found = Vec::new();
        if self.failed > 0 {
            let total = self.ok + self.failed;
            found.push(format!("{} of {total} requests failed", self.failed));
        }
        match route {
            Route::Proxy if self.proxied < self.ok => found.push(format!(
                "{} of {} requests completed without reaching the proxy",
                self.ok - self.proxied,
                self.ok
            )),
            Route::Direct if self.proxied > 0 => found.push(format!(
                "{} direct requests were redirected to the proxy",
                self.proxied
            )),
            _ => {}
        }
        if self.forwarded < self.proxied {
            found.push(format!(
                "the proxy could not forward {} of {} connections",
                self.proxied - self.forwarded,
                self.proxied
            ));
        }
        found
    }
}

impl Bench<'_> {
    /// A [`Setup::proxy`] setup: every mode's proxy and agent, the probes
    /// with the modes taking turns, then the agents stopped.
    pub(super) fn proxy_setup(&mut self, setup: &Setup) -> Result<()> {
        let nettool = nettool(&self.exe)?;
        let mut running = Vec::new();
        for &mode in &setup.modes {
            let world = self.worlds.iter_mut().find(|(m, _)| *m == mode);
            let world = &mut world.expect("a world for every mode of the plan").1;
            world.ensure_cgroups(setup.scale.pus)?;
            let (scope, ns) = (world.scope(), &world.host);
            let proxy = match mode {
                Mode::Bare => TestProxy::start_forwarding_to(
                    &nettool,
                    scope,
                    ns,
                    PROXY_PORT,
                    proxy_mark(),
                    World::echo_addr(Route::Proxy),
                ),
                _ => TestProxy::start(&nettool, scope, ns, Family::V4, PROXY_PORT, proxy_mark()),
            }?;
            let agent = match mode {
                Mode::Bare => None,
                _ => match self.start_proxied(setup, mode)? {
                    Some(agent) => Some(agent),
                    None => continue,
                },
            };
            running.push(Proxied { mode, proxy, agent });
        }
        for &probe in &setup.probes {
            for rep in 1..=self.plan.reps {
                for p in &running {
                    self.request_step(setup, p, probe, rep)?;
                }
            }
        }
        for p in running {
            let Some(agent) = p.agent else { continue };
            let label = Self::label(setup, p.mode, "stop agent (proxy)");
            let outcome = match agent.stop() {
                Ok(took) => Metric::Shutdown.unit().format(secs(took)),
                Err(e) => {
                    self.note(format!("stopping the {:?} agent (proxy): {e:#}", p.mode));
                    "failed".into()
                }
            };
            self.progress.step(&label, &outcome);
        }
        Ok(())
    }

    /// Starts the agent with the proxy config; `None` when it failed (a
    /// note, the mode's remaining steps skipped).
    fn start_proxied(&mut self, setup: &Setup, mode: Mode) -> Result<Option<Agent>> {
        let config = self.world(mode).proxy_config();
        let started = self.launch(
            mode,
            |w| &w.host,
            &config,
            |agent| check_status(agent, setup, mode).map(drop),
        )?;
        let label = Self::label(setup, mode, "start agent (proxy)");
        let why = match self.ready_or_why(&label, started)? {
            Ok(agent) => return Ok(Some(agent)),
            Err(why) => why,
        };
        let steps = setup.steps(mode, self.plan.reps);
        self.progress
            .skip(steps - 1, &Self::label(setup, mode, "not measurable"));
        // A note, not the scale's N/A: the base setup's figures stand.
        self.note(format!("the proxy scenario ({mode:?}): the agent {why}"));
        Ok(None)
    }

    /// One run of a request probe, recorded and shown.
    fn request_step(&mut self, setup: &Setup, p: &Proxied, probe: Probe, rep: usize) -> Result<()> {
        let Probe::Request(route) = probe else {
            anyhow::bail!("the proxy setup runs request probes only, not {probe:?}");
        };
        let (scale, mode) = (setup.scale, p.mode);
        let outcome = match self.request_probe(setup, p, route) {
            Ok(run) => {
                let values = run.values(route);
                let shown = Metric::ReqRate(route).unit().format(values[0].1);
                for (metric, value) in values {
                    if value.is_finite() {
                        self.results.add(scale, mode, metric, value);
                    }
                }
                let trouble = run.trouble(route);
                if !trouble.is_empty() {
                    self.note(format!(
                        "{} ({mode:?}), run {rep}: {}",
                        probe.name(),
                        trouble.join("; ")
                    ));
                }
                shown
            }
            Err(e) => {
                interrupted()?;
                self.note(format!("{} ({mode:?}), run {rep}: {e:#}", probe.name()));
                "failed".into()
            }
        };
        let label = Self::label(setup, mode, &probe.name());
        self.progress
            .step(&format!("{label} run {rep}/{}", self.plan.reps), &outcome);
        Ok(())
    }

    /// The client in the PU for the probe's time, the proxy's count of
    /// connections around it.
    fn request_probe(&self, setup: &Setup, p: &Proxied, route: Route) -> Result<RequestRun> {
        let world = self.world(p.mode);
        let to = match (route, p.mode) {
            (Route::Direct, _) => World::echo_addr(Route::Direct),
            // Nothing redirects: the proxy at the address a redirect
            // would have sent the connection to.
            (Route::Proxy, Mode::Bare) => (std::net::Ipv4Addr::LOCALHOST, PROXY_PORT).into(),
            (Route::Proxy, _) => World::echo_addr(Route::Proxy),
        };
        let before = p.proxy.seen().len();
        let v = Client::ConnectRate {
            to,
            secs: self.plan.probe_time.as_secs_f64(),
            threads: client::CONNECT_THREADS,
            from: None,
            request: Some(client::REQUEST_BYTES),
        }
        .run_in(&self.exe, &world.host, world.measured(setup.scale))?;
        let seen = p.proxy.seen();
        let during = seen.get(before..).unwrap_or_default();
        let num = |field: &str| {
            v[field]
                .as_f64()
                .with_context(|| format!("no {field} in the client's result {v}"))
        };
        Ok(RequestRun {
            ok: num("connections")? as u64,
            failed: num("failed")? as u64,
            secs: num("secs")?,
            p50: num("p50")?,
            p99: num("p99")?,
            proxied: during.len() as u64,
            forwarded: during.iter().filter(|s| s.forwarded).count() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ok: u64, failed: u64, proxied: u64, forwarded: u64) -> RequestRun {
        RequestRun {
            ok,
            failed,
            secs: 2.0,
            p50: 0.0003,
            p99: 0.002,
            proxied,
            forwarded,
        }
    }

    #[test]
    fn a_run_yields_its_rate_and_latencies() {
        let values = run(3000, 0, 3000, 3000).values(Route::Proxy);
        assert_eq!(
            values,
            vec![
                (Metric::ReqRate(Route::Proxy), 1500.0),
                (Metric::ReqP50(Route::Proxy), 0.0003),
                (Metric::ReqP99(Route::Proxy), 0.002),
            ]
        );
    }

    #[test]
    fn trouble_names_requests_past_or_into_the_proxy() {
        assert!(run(3000, 0, 3000, 3000).trouble(Route::Proxy).is_empty());
        assert!(run(3000, 0, 0, 0).trouble(Route::Direct).is_empty());
        // The proxy may have accepted a connection whose request then
        // failed: more seen than completed is no trouble.
        assert!(run(3000, 0, 3001, 3001).trouble(Route::Proxy).is_empty());
        assert_eq!(
            run(3000, 2, 2990, 2989).trouble(Route::Proxy),
            [
                "2 of 3002 requests failed",
                "10 of 3000 requests completed without reaching the proxy",
                "the proxy could not forward 1 of 2990 connections",
            ]
        );
        assert_eq!(
            run(3000, 0, 5, 5).trouble(Route::Direct),
            ["5 direct requests were redirected to the proxy"]
        );
    }
}
