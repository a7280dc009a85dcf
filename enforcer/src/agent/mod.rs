//! The agent: wiring from config to datapath to trap to control socket.
//!
//! [`run`] is `enforcer run`: it loads and validates the config (a bad one
//! is refused before anything changes, as a [`ConfigError`]), chooses and
//! opens the datapath, binds the trap's queues, starts the datapath on its
//! owner thread, and hands over to the `daemon` loop, which serves the
//! control socket, applies SIGHUP reloads through the [`plan`] diff, runs
//! port discovery ([`ports`]), and removes everything on SIGINT/SIGTERM.
//! [`cleanup`] is `enforcer cleanup`, for after a crash.
//!
//! The caller must have entered the agent's network namespace first
//! ([`host::enter_netns`]); everything here may start threads.

mod daemon;
mod enforcement;
pub mod host;
mod instance;
mod owner;
pub mod plan;
mod ports;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::control::{self, ControlSocket, DatapathStatus};
use crate::datapath::iptables::backend::{self, Backend};
use crate::datapath::probe::{CgroupChoice, CgroupFlavour};
use crate::datapath::{self, DatapathKind, DatapathSettings, probe};
use crate::flowlog::FlowLogWriter;
use crate::identity::Keys;
use crate::policy::{
    CgroupV2Host, Configuration, DatapathChoice, IptablesBackendChoice, MarkSettings, Mode,
    PolicyError, PuKind, QueueSettings,
};
use crate::trap::{HandshakeSetup, PuIndex, TrapConsumer};

use daemon::{Daemon, Event, Identity};
use enforcement::Enforcement;
use host::Mounts;
use owner::DatapathOwner;
use ports::PortDiscovery;

pub use instance::InstanceName;

/// What `enforcer run` is told.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Overrides the config's `datapath` (`--datapath`).
    pub datapath: Option<DatapathChoice>,
    /// Overrides the config's `[iptables] backend` (`--iptables-backend`).
    pub iptables_backend: Option<IptablesBackendChoice>,
    pub instance: InstanceName,
    /// The control socket; default `/run/enforcer/<instance>.sock`.
    pub control: Option<PathBuf>,
}

/// The config file could not be read or was refused; nothing was changed.
/// The reason is the `source` (shown by `{:#}` through anyhow).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the config file {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {} is refused", path.display())]
    Invalid { path: PathBuf, source: PolicyError },
    /// `[cgroups]` asks for a hierarchy the host does not have.
    #[error("the config file {} is refused: {reason}", path.display())]
    Cgroups { path: PathBuf, reason: String },
    /// A key file named in `[identity]` cannot be used.
    #[error("the config file {} names identity keys that cannot be loaded", path.display())]
    Keys {
        path: PathBuf,
        source: crate::identity::KeyError,
    },
}

/// Where the configuration comes from, at start and on every reload.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    path: PathBuf,
    /// Where the cgroup hierarchies are, for `[cgroups]` to choose from.
    mounts: Mounts,
    /// `--datapath`, which wins over the file's `datapath`.
    datapath: Option<DatapathChoice>,
    /// `--iptables-backend`, which wins over the file's `[iptables]
    /// backend`.
    iptables_backend: Option<IptablesBackendChoice>,
}

/// A configuration as [`ConfigSource`] loads it.
struct Loaded {
    config: Configuration,
    /// The cgroup hierarchy its `[cgroups]` chose, against which its PU
    /// cgroups were checked.
    cgroups: CgroupChoice,
    /// The identity keys it names (loaded from their files), when
    /// `[identity]` is configured.
    keys: Option<Keys>,
}

impl ConfigSource {
    /// Reads and validates the file, host checks included.
    #[cfg(test)]
    fn load(&self) -> Result<Configuration, ConfigError> {
        self.load_all().map(|loaded| loaded.config)
    }

    /// [`Self::load`], and the identity keys it names.
    fn load_with_keys(&self) -> Result<(Configuration, Option<Keys>), ConfigError> {
        self.load_all().map(|loaded| (loaded.config, loaded.keys))
    }

    /// Reads and validates the file, host checks included; loads its keys.
    fn load_all(&self) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| ConfigError::Read {
            path: self.path.clone(),
            source,
        })?;
        let invalid = |source| ConfigError::Invalid {
            path: self.path.clone(),
            source,
        };
        // The file says which hierarchy its cgroups are in: parsed first,
        // then checked against that hierarchy.
        let mut config = Configuration::from_toml_str(&text).map_err(invalid)?;
        let cgroups = probe::choose_cgroups(
            &config.cgroups,
            self.mounts.cgroup2.as_deref(),
            self.mounts.net_cls.as_deref(),
        )
        .and_then(|choice| {
            let classid = choice.mount.join("net_cls.classid");
            if choice.flavour == CgroupFlavour::NetClsV1 && !classid.is_file() {
                anyhow::bail!(
                    "{} is not a net_cls cgroup hierarchy (it has no net_cls.classid)",
                    choice.mount.display()
                );
            }
            Ok(choice)
        })
        .map_err(|e| ConfigError::Cgroups {
            path: self.path.clone(),
            reason: format!("{e:#}"),
        })?;
        config
            .validate(&CgroupV2Host::new(&cgroups.mount))
            .map_err(|e| invalid(e.into()))?;
        // Keys load at start and on every reload, so a bad key file stops
        // the agent (or the reload) before anything changes.
        let keys =
            match config.identity.key_files() {
                Some(files) => Some(crate::identity::keys::load(&files).map_err(|source| {
                    ConfigError::Keys {
                        path: self.path.clone(),
                        source,
                    }
                })?),
                None => None,
            };
        let process_pus = config
            .pus
            .iter()
            .any(|pu| matches!(pu.kind, PuKind::LinuxProcess { .. }));
        if keys.is_some() && process_pus && cgroups.flavour == CgroupFlavour::NetClsV1 {
            // Refused rather than a PU's connections signed as another's.
            return Err(ConfigError::Cgroups {
                path: self.path.clone(),
                reason: "the identity handshake finds a linux-process PU's sockets by their \
                         cgroup v2 id, and these PUs' cgroups are net_cls (cgroup v1)"
                    .to_owned(),
            });
        }
        if let Some(choice) = self.datapath {
            // Overriding here, not later, makes a reload compare like with
            // like: a file's `datapath` that the flag overrides is moot.
            config.datapath = choice;
        }
        if let Some(choice) = self.iptables_backend {
            config.iptables.backend = choice;
        }
        Ok(Loaded {
            config,
            cgroups,
            keys,
        })
    }

    /// The trap's PU lookup for `config`: ports and uids, the cgroups of
    /// the linux-process PUs (an outgoing packet's PU is found by its
    /// socket's cgroup), and with `[identity]` what the handshake needs
    /// of each PU.
    fn trap_index(&self, config: &Configuration) -> PuIndex {
        let mut index = PuIndex::new(config.mode, &config.pus);
        if config.identity.key.is_none() {
            return index;
        }
        index.set_identities(&config.pus, &config.identity);
        let cgroup2 = self.mounts.cgroup2_or_default();
        for pu in &config.pus {
            if let PuKind::LinuxProcess { cgroup } = &pu.kind {
                let dir = cgroup2.join(cgroup.as_path());
                if let Err(e) = index.add_process_dir(dir.clone(), pu.id.clone()) {
                    // Validation saw it; a PU whose cgroup went since is
                    // found by its ports only (its outgoing SYNs refused).
                    tracing::warn!(pu = %pu.id, dir = %dir.display(), error = %e,
                        "reading a PU's cgroup ids for the handshake failed");
                }
            }
        }
        index
    }
}

/// `enforcer run`: returns when the agent has shut down and removed its
/// datapath state, or with the error that stopped it.
pub fn run(options: RunOptions) -> Result<()> {
    let mounts = Mounts::read()?;
    let cgroup2 = mounts.cgroup2_or_default();
    let source = ConfigSource {
        path: options.config.clone(),
        mounts: mounts.clone(),
        datapath: options.datapath,
        iptables_backend: options.iptables_backend,
    };
    let Loaded {
        config,
        cgroups,
        keys,
    } = source.load_all()?;
    tracing::info!(cgroups = %cgroups.flavour, reason = %cgroups.reason, "PU cgroups chosen");
    let control = options
        .control
        .clone()
        .unwrap_or_else(|| options.instance.control_socket());
    host::check_socket_path(&control)?;
    // A second agent of the same instance must stop here, not after
    // wiping the first's state.
    control::claim(&control)?;

    let requested = config.datapath;
    let choice = probe::choose(requested, cgroups.flavour)
        .with_context(|| format!("choosing the datapath (asked for {requested})"))?;
    let reason = match options.datapath {
        Some(flag) => format!("{} (--datapath {flag})", choice.reason),
        None => choice.reason,
    };
    tracing::info!(datapath = %choice.kind, reason = %reason, "datapath chosen");
    // In the agent's namespace (entered before this): the flavour whose
    // rules are here. Both datapaths install netfilter rules with it.
    let forced_by = match options.iptables_backend {
        Some(_) => "--iptables-backend",
        None => "iptables.backend",
    };
    let iptables = backend::choose(config.iptables.backend, forced_by);
    tracing::info!(
        "iptables backend: {} ({})",
        iptables.backend,
        iptables.reason
    );
    let host_scope = match &config.host.cgroup {
        Some(cgroup) => cgroup2.join(cgroup.as_path()),
        None => cgroup2.clone(),
    };
    let settings = DatapathSettings {
        mode: config.mode,
        queues: config.queues.clone(),
        marks: config.marks.layout(),
        cgroup2: cgroup2.clone(),
        host_scope,
        net_cls_mount: (cgroups.flavour == CgroupFlavour::NetClsV1).then(|| cgroups.mount.clone()),
        net_cls_record: options.instance.net_cls_record(),
        pin_dir: options.instance.pin_dir(&mounts.bpffs_or_default()),
        iptables_backend: iptables.backend,
    };
    let datapath = datapath::open(choice.kind, settings)
        .with_context(|| format!("opening the {} datapath", choice.kind))?;
    let identity = Identity {
        instance: options.instance.to_string(),
        control,
        datapath: DatapathStatus {
            kind: choice.kind,
            reason,
            iptables,
            cgroups: cgroups.clone(),
        },
        mode: config.mode,
        started: Instant::now(),
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut discovery = config
        .ports
        .discover_interval()
        .map(|interval| PortDiscovery { interval, cgroup2 });
    if discovery.is_some() && cgroups.flavour == CgroupFlavour::NetClsV1 {
        // sock_diag names a socket's cgroup v2 id only: a net_cls PU's
        // sockets cannot be told apart by it.
        tracing::warn!(
            "port discovery is off: it finds a PU's sockets by cgroup v2 id, and the PUs' \
             cgroups are net_cls (cgroup v1); list their ports in the config"
        );
        discovery = None;
    }
    runtime.block_on(serve(datapath, (config, keys), source, identity, discovery))
}

/// The async part of [`run`]. `loaded`: the configuration and its
/// identity keys.
async fn serve(
    datapath: Box<dyn datapath::Datapath>,
    loaded: (Configuration, Option<Keys>),
    source: ConfigSource,
    identity: Identity,
    discovery: Option<PortDiscovery>,
) -> Result<()> {
    // Signals first, so that one arriving during start-up is not fatal
    // (the default action) but handled once the agent is up.
    let events = listen_for_signals()?;
    // Bound before the kernel is touched; connections wait in the backlog
    // until the agent is ready.
    let control = identity.control.clone();
    let socket = ControlSocket::bind(&control)?;
    let result = start_and_serve(
        datapath, loaded, source, identity, discovery, events, socket,
    )
    .await;
    control::remove(&control)?;
    result
}

async fn start_and_serve(
    mut datapath: Box<dyn datapath::Datapath>,
    (config, keys): (Configuration, Option<Keys>),
    source: ConfigSource,
    identity: Identity,
    discovery: Option<PortDiscovery>,
    events: mpsc::Receiver<Event>,
    socket: ControlSocket,
) -> Result<()> {
    let flow_log = FlowLogWriter::start(&config.flow_log)?;
    // The trap binds its queues before the datapath installs the rules
    // that feed them, so no trapped packet ever finds the queue without a
    // listener (dropped when failing closed).
    let handshake = keys.map(|keys| HandshakeSetup {
        keys,
        window: config.identity.window,
        flow_log: Some(flow_log.sender()),
    });
    let trap = match TrapConsumer::start(&config.queues, config.marks.layout(), handshake) {
        Ok(trap) => trap,
        Err(e) => {
            flow_log.stop();
            return Err(e);
        }
    };
    trap.set_pus(source.trap_index(&config));
    datapath.set_flow_log(flow_log.sender());
    let owner = DatapathOwner::spawn(Enforcement::new(datapath, &config))?;
    let start = {
        let config = config.clone();
        owner.call(move |e| e.start(&config)).await.and_then(|r| r)
    };
    if let Err(e) = start {
        tracing::error!("starting the datapath failed: {e:#}; removing what it made");
        match owner.call(|e| e.cleanup()).await.and_then(|r| r) {
            Ok(()) => tracing::info!("removed what the failed start made"),
            Err(c) => tracing::error!("cleaning up after the failed start failed too: {c:#}"),
        }
        trap.stop();
        flow_log.stop();
        return Err(e.context("starting the datapath"));
    }
    let daemon = Daemon::new(owner, trap.counters(), identity, source)
        .with_trap_updater(trap.updater())
        .with_port_discovery(discovery);
    let result = daemon.run(events, socket).await;
    // After the datapath's cleanup no rule queues any more: stopping the
    // consumer now strands no packet.
    trap.stop();
    flow_log.stop();
    result
}

/// SIGHUP, SIGINT and SIGTERM as [`Event`]s.
fn listen_for_signals() -> Result<mpsc::Receiver<Event>> {
    let install = |kind: SignalKind, name: &str| {
        signal(kind).with_context(|| format!("installing the {name} handler"))
    };
    let mut hup = install(SignalKind::hangup(), "SIGHUP")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = hup.recv() => Event::Reload,
                _ = int.recv() => Event::Shutdown("SIGINT"),
                _ = term.recv() => Event::Shutdown("SIGTERM"),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// `enforcer cleanup`: removes whatever any datapath of `instance` could
/// have left, for use after a crash. Refuses while an agent of the
/// instance answers on its control socket. Idempotent.
///
/// It reads no config, so it cannot know which iptables flavour the agent
/// used: it removes the agent's chains with each flavour's tools (a save
/// of every table creates none, so the flavour not in use stays
/// untouched).
pub fn cleanup(instance: &InstanceName) -> Result<()> {
    control::claim(&instance.control_socket())?;
    let mounts = Mounts::read()?;
    // What each datapath removes depends on the instance (its pin
    // directory) only; mode, queues and marks are the defaults.
    let settings = |iptables_backend| DatapathSettings {
        mode: Mode::LocalServer,
        queues: QueueSettings::default(),
        marks: MarkSettings::default().layout(),
        cgroup2: mounts.cgroup2_or_default(),
        host_scope: mounts.cgroup2_or_default(),
        // Class ids are reset from the instance's record, which names
        // every cgroup written: no mount needed.
        net_cls_mount: None,
        net_cls_record: instance.net_cls_record(),
        pin_dir: instance.pin_dir(&mounts.bpffs_or_default()),
        iptables_backend,
    };
    let mut failed = Vec::new();
    let each = [DatapathKind::Iptables, DatapathKind::Ebpf]
        .into_iter()
        .flat_map(|kind| Backend::ALL.map(|backend| (kind, backend)));
    for (kind, backend) in each {
        // One datapath's failure, even a panic, must not keep the other's
        // state in place.
        let settings = settings(backend);
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
            datapath::open(kind, settings)?.cleanup()?;
            Ok(())
        }))
        .unwrap_or_else(|panic| {
            let message = owner::panic_message(panic.as_ref());
            Err(anyhow!("the {kind} cleanup panicked: {message}"))
        });
        match outcome {
            Ok(()) => {
                tracing::info!(datapath = %kind, iptables = %backend, instance = %instance, "cleaned up");
            }
            Err(e) => {
                tracing::error!(datapath = %kind, iptables = %backend, "cleanup failed: {e:#}");
                failed.push(format!("{kind} ({backend})"));
            }
        }
    }
    if !failed.is_empty() {
        bail!("cleanup failed for the {} datapath", failed.join(" and "));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
