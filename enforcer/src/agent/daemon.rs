//! The running agent once its datapath is up: it answers the control
//! socket, applies SIGHUP reloads, and on SIGINT/SIGTERM removes
//! everything the datapath made.
//!
//! Signals arrive as [`Event`]s on a channel (see [`super::signals`]), so
//! the loop is driven the same way by the kernel and by tests.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;

use super::ConfigSource;
use super::owner::DatapathOwner;
use super::plan::{needs_restart, plan};
use super::ports::{Discovery, PortDiscovery};
use crate::control::{ControlSocket, DatapathStatus, ReloadStats, Request, Response, StatusReport};
use crate::trap::{self, TrapCounters, TrapUpdater};

/// What the agent is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP: re-read the config file and apply the difference.
    Reload,
    /// SIGINT or SIGTERM (named): clean up and exit.
    Shutdown(&'static str),
}

/// Facts fixed for the agent's lifetime, for `status`.
#[derive(Debug)]
pub struct Identity {
    pub instance: String,
    pub control: PathBuf,
    pub datapath: DatapathStatus,
    pub mode: crate::policy::Mode,
    pub started: Instant,
}

/// What the control handler needs, shared with the loop.
struct Shared {
    owner: DatapathOwner,
    trap: Arc<TrapCounters>,
    identity: Identity,
    config: PathBuf,
    reloads: Mutex<ReloadStats>,
}

pub struct Daemon {
    shared: Arc<Shared>,
    source: ConfigSource,
    /// Hands each applied configuration to the trap consumer.
    trap: Option<TrapUpdater>,
    /// How port discovery runs; `None`: it does not.
    port_discovery: Option<PortDiscovery>,
}

/// Why a reload did not (fully) happen.
enum ReloadError {
    /// Nothing changed.
    Refused(String),
    /// A datapath operation failed; the steps before it are in force.
    Failed(String),
}

impl Daemon {
    /// `owner` holds a started datapath.
    pub fn new(
        owner: DatapathOwner,
        trap: Arc<TrapCounters>,
        identity: Identity,
        source: ConfigSource,
    ) -> Self {
        let shared = Arc::new(Shared {
            owner,
            trap,
            identity,
            config: source.path.clone(),
            reloads: Mutex::new(ReloadStats::default()),
        });
        Self {
            shared,
            source,
            trap: None,
            port_discovery: None,
        }
    }

    /// The trap consumer that each applied reload updates (its PU lookup,
    /// identities and keys).
    pub fn with_trap_updater(mut self, trap: TrapUpdater) -> Self {
        self.trap = Some(trap);
        self
    }

    /// Runs port discovery ([`super::ports`]) while the daemon serves.
    pub fn with_port_discovery(mut self, discovery: Option<PortDiscovery>) -> Self {
        self.port_discovery = discovery;
        self
    }

    /// Serves `control` and handles `events` until a shutdown; then
    /// removes everything the datapath made and stops serving. A second
    /// shutdown signal during the cleanup is logged and does not stop it.
    pub async fn run(
        self,
        mut events: mpsc::Receiver<Event>,
        control: ControlSocket,
    ) -> Result<()> {
        let shared = self.shared.clone();
        let server = tokio::spawn(control.serve(move |request| {
            let shared = shared.clone();
            async move { shared.answer(request).await }
        }));
        self.log_ready().await;
        let discovery = self
            .port_discovery
            .clone()
            .map(|d| tokio::spawn(discover_ports(self.shared.clone(), d)));

        let why = loop {
            match events.recv().await {
                Some(Event::Reload) => self.reload().await,
                Some(Event::Shutdown(signal)) => break signal,
                None => break "the signal listener ended",
            }
        };
        tracing::info!("{why}: shutting down; removing everything the datapath made");
        if let Some(task) = discovery {
            // A round already queued on the owner thread runs before the
            // cleanup, never after it.
            task.abort();
        }
        let cleanup = self.shared.owner.call(|e| e.cleanup());
        tokio::pin!(cleanup);
        let cleaned = loop {
            tokio::select! {
                result = &mut cleanup => break result.and_then(|r| r),
                Some(event) = events.recv() => match event {
                    Event::Shutdown(signal) => {
                        tracing::warn!("{signal} received while cleaning up; still cleaning up");
                    }
                    Event::Reload => tracing::info!("SIGHUP ignored: shutting down"),
                },
            }
        };
        server.abort();
        cleaned.context("cleaning up the datapath")?;
        tracing::info!("enforcer stopped; everything it made is removed");
        Ok(())
    }

    async fn log_ready(&self) {
        let summary = self
            .shared
            .owner
            .call(|e| {
                let config = e.applied();
                let networks = &config.networks;
                (
                    config.pus.len(),
                    networks.target_tcp.len(),
                    networks.target_udp.len(),
                    networks.excluded.len(),
                )
            })
            .await;
        let identity = &self.shared.identity;
        let (pus, tcp, udp, excluded) = summary.unwrap_or_default();
        tracing::info!(
            datapath = %identity.datapath.kind,
            mode = %identity.mode,
            pus,
            target_tcp = tcp,
            target_udp = udp,
            excluded,
            queues = self.shared.trap.snapshot().queues.len(),
            control = %identity.control.display(),
            "enforcer ready"
        );
    }

    /// Re-reads the config file and applies the difference; a bad or
    /// restart-needing config is refused with nothing changed.
    async fn reload(&self) {
        tracing::info!("SIGHUP: re-reading {}", self.source.path.display());
        let outcome = self.try_reload().await;
        let mut stats = self.shared.reloads.lock().expect("reload stats lock");
        match outcome {
            Ok(steps) if steps.is_empty() => {
                stats.applied += 1;
                tracing::info!("reload: nothing changed");
            }
            Ok(steps) => {
                stats.applied += 1;
                tracing::info!(steps = %steps.join(", "), "reload applied");
            }
            Err(ReloadError::Refused(why)) => {
                stats.refused += 1;
                tracing::error!("reload refused, the configuration in force is unchanged: {why}");
                stats.last_error = Some(why);
            }
            Err(ReloadError::Failed(why)) => {
                stats.failed += 1;
                tracing::error!(
                    "reload failed part-way; the steps before the failure are in force \
                     (the next SIGHUP retries the rest): {why}"
                );
                stats.last_error = Some(why);
            }
        }
    }

    /// The steps applied, by name.
    async fn try_reload(&self) -> Result<Vec<String>, ReloadError> {
        let (new, keys) = self
            .source
            .load_with_keys()
            .map_err(|e| ReloadError::Refused(format!("{:#}", anyhow::Error::from(e))))?;
        let index = self.trap.as_ref().map(|_| self.source.trap_index(&new));
        let window = new.identity.window;
        // Comparing and applying in one job: nothing can change what is in
        // force between the two.
        let job = self.shared.owner.call(move |e| {
            let restart = needs_restart(e.applied(), &new);
            if !restart.is_empty() {
                return Err(ReloadError::Refused(format!(
                    "changing {} needs a restart of the agent",
                    restart.join(", ")
                )));
            }
            let steps = plan(e.applied(), &new);
            let names = steps.iter().map(ToString::to_string).collect();
            e.apply(steps, &new)
                .map(|()| names)
                .map_err(|err| ReloadError::Failed(format!("{err:#}")))
        });
        let steps = job
            .await
            .map_err(|e| ReloadError::Failed(format!("{e:#}")))??;
        // The trap follows once the datapath has the new configuration:
        // a PU's packets are found and judged by its new policy from then
        // on.
        if let (Some(trap), Some(index)) = (&self.trap, index) {
            trap.set_pus(index);
            if let Some(keys) = keys {
                trap.set_keys(keys, window);
            }
        }
        Ok(steps)
    }
}

/// Runs a port discovery round every `interval` until aborted. A failing
/// round (the socket table unreadable, say) is logged when it starts
/// failing and when it works again, not in every round.
async fn discover_ports(shared: Arc<Shared>, config: PortDiscovery) {
    tracing::info!(
        interval_ms = config.interval.as_millis() as u64,
        "port discovery running"
    );
    let discovery = Arc::new(Mutex::new(Discovery::new(config.cgroup2)));
    let mut ticks = tokio::time::interval(config.interval);
    // A slow round delays the next; rounds never pile up.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        let d = discovery.clone();
        let round = shared
            .owner
            .call(move |e| e.discover_ports(&mut d.lock().expect("discovery lock")))
            .await
            .and_then(|r| r);
        match round {
            Ok(_) if failing => {
                tracing::info!("port discovery works again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::error!("port discovery failed (retrying every round): {e:#}");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

impl Shared {
    async fn answer(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(Box::new(self.status().await)),
        }
    }

    async fn status(&self) -> StatusReport {
        let mut problems = Vec::new();
        // Read before the PUs: a reload is counted only after it was
        // applied, so the PUs reported are at least as new as the counts
        // (a client that waits for a reload to be counted then sees its
        // effect).
        let reloads = self.reloads.lock().expect("reload stats lock").clone();
        // Separate jobs: a failing counter read must not hide the PUs.
        let pus = self.owner.call(|e| e.pus()).await.unwrap_or_else(|e| {
            problems.push(format!("PUs: {e:#}"));
            Vec::new()
        });
        let counters = match self.owner.call(|e| e.counters()).await {
            Ok(Ok(counters)) => Some(counters),
            Ok(Err(e)) => {
                problems.push(format!("datapath counters: {e}"));
                None
            }
            Err(e) => {
                problems.push(format!("datapath counters: {e:#}"));
                None
            }
        };
        // This runs on a runtime thread, which is in the agent's network
        // namespace like every thread of the agent.
        let kernel_queues = trap::read_kernel_stats().unwrap_or_else(|e| {
            problems.push(format!("kernel queue stats: {e:#}"));
            Vec::new()
        });
        let identity = &self.identity;
        StatusReport {
            instance: identity.instance.clone(),
            pid: std::process::id(),
            config: self.config.display().to_string(),
            control: identity.control.display().to_string(),
            datapath: identity.datapath.clone(),
            mode: identity.mode.to_string(),
            uptime_secs: identity.started.elapsed().as_secs(),
            pus,
            counters,
            trap: self.trap.snapshot(),
            kernel_queues,
            reloads,
            problems,
        }
    }
}
