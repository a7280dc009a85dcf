//! The agent loop driven through its event channel and control socket,
//! against the fake datapath: start-up, status, reloads (applied,
//! refused, failed) and shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::enforcement::fake::{FakeDatapath, TWO_PUS};
use super::*;
use crate::control::{Request, Response, StatusReport};
use crate::datapath::iptables::backend::BackendChoice;
use crate::trap::TrapCounters;

struct Harness {
    dir: PathBuf,
    fake: FakeDatapath,
    events: mpsc::Sender<Event>,
    daemon: JoinHandle<Result<()>>,
}

impl Harness {
    async fn start(name: &str, fake: FakeDatapath) -> Self {
        let dir =
            std::env::temp_dir().join(format!("enforcer-agent-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = ConfigSource {
            path: dir.join("enforcer.toml"),
            mounts: Mounts::cgroup2_at(&dir),
            datapath: None,
            iptables_backend: None,
        };
        std::fs::write(&source.path, TWO_PUS).unwrap();
        let config = source.load().unwrap();
        let owner =
            DatapathOwner::spawn(Enforcement::new(Box::new(fake.clone()), &config)).unwrap();
        let started = config.clone();
        owner
            .call(move |e| e.start(&started))
            .await
            .unwrap()
            .unwrap();
        let identity = Identity {
            instance: name.into(),
            control: dir.join("control.sock"),
            datapath: DatapathStatus {
                kind: DatapathKind::Iptables,
                reason: "a fake for tests".into(),
                iptables: BackendChoice {
                    backend: Backend::Legacy,
                    reason: "a fake for tests".into(),
                },
                cgroups: CgroupChoice {
                    flavour: CgroupFlavour::V2,
                    mount: dir.clone(),
                    reason: "a fake for tests".into(),
                },
            },
            mode: config.mode,
            started: Instant::now(),
        };
        let socket = ControlSocket::bind(&identity.control).unwrap();
        let trap = Arc::new(TrapCounters::new(&config.queues, false));
        let (events, rx) = mpsc::channel(8);
        let daemon = tokio::spawn(Daemon::new(owner, trap, identity, source).run(rx, socket));
        Self {
            dir,
            fake,
            events,
            daemon,
        }
    }

    fn write_config(&self, text: &str) {
        std::fs::write(self.dir.join("enforcer.toml"), text).unwrap();
    }

    async fn status(&self) -> StatusReport {
        let path = self.dir.join("control.sock");
        let answer = tokio::task::spawn_blocking(move || control::request(&path, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        match answer {
            Response::Status(report) => *report,
            other => panic!("{other:?}"),
        }
    }

    /// Sends SIGHUP and waits until the reload counts show it.
    async fn reload(&self) -> StatusReport {
        let before = self.status().await.reloads;
        let done = before.applied + before.refused + before.failed + 1;
        self.events.send(Event::Reload).await.unwrap();
        for _ in 0..500 {
            let status = self.status().await;
            let r = &status.reloads;
            if r.applied + r.refused + r.failed == done {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the reload was not handled");
    }

    async fn shut_down(self, signals: usize) -> Result<()> {
        for _ in 0..signals {
            self.events.send(Event::Shutdown("SIGTERM")).await.unwrap();
        }
        let result = self.daemon.await.unwrap();
        std::fs::remove_dir_all(&self.dir).ok();
        result
    }
}

fn pus(status: &StatusReport) -> Vec<(String, String, u8)> {
    let pus = status.pus.iter();
    pus.map(|p| (p.id.clone(), p.kind.clone(), p.version))
        .collect()
}

fn pu(id: &str, kind: &str, version: u8) -> (String, String, u8) {
    (id.into(), kind.into(), version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_what_is_in_force() {
    let h = Harness::start("status", FakeDatapath::default()).await;
    let status = h.status().await;
    assert_eq!(status.instance, "status");
    assert_eq!(status.pid, std::process::id());
    assert_eq!(status.datapath.kind, DatapathKind::Iptables);
    assert_eq!(status.mode, "local-server");
    assert_eq!(pus(&status), [pu("a", "uid", 0), pu("b", "host", 0)]);
    assert_eq!(status.counters.unwrap().total.trapped, 7);
    assert_eq!(status.trap.queues.len(), 32);
    assert!(status.problems.is_empty(), "{:?}", status.problems);
    h.shut_down(1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_apply_the_difference_and_refuse_bad_configs() {
    let h = Harness::start("reload", FakeDatapath::default()).await;
    let changed = TWO_PUS
        .replace("uid = 1000", "uid = 1000\ntcp_ports = [80]")
        .replace(
            "id = \"b\"\nkind = \"host\"",
            "id = \"c\"\nkind = \"host-service\"\nudp_ports = [53]",
        );
    h.write_config(&changed);
    let status = h.reload().await;
    assert_eq!(status.reloads.applied, 1);
    assert_eq!(
        pus(&status),
        [pu("a", "uid", 1), pu("c", "host-service", 0)]
    );
    let calls = h.fake.calls();
    assert_eq!(calls[4..], ["delete 0 b", "update 1 a", "configure 0 c"]);

    // The same file again: nothing to do.
    assert_eq!(h.reload().await.reloads.applied, 2);
    assert_eq!(h.fake.calls().len(), calls.len());

    // An invalid file is refused with its field and value; nothing changes.
    h.write_config(&changed.replace("tcp_ports = [80]", "tcp_ports = [0]"));
    let status = h.reload().await;
    assert_eq!(status.reloads.refused, 1);
    let why = status.reloads.last_error.unwrap();
    assert!(
        why.contains(r#"pus[0].tcp_ports[0]: "0" is not a port number"#),
        "{why}"
    );
    // A setting the datapath is built for needs a restart.
    h.write_config(&changed.replace(
        "mode = \"local-server\"",
        "mode = \"local-server\"\n[queues]\nqueues_per_range = 2",
    ));
    let status = h.reload().await;
    assert_eq!(status.reloads.refused, 2);
    let why = status.reloads.last_error.unwrap();
    assert_eq!(why, "changing queues needs a restart of the agent");
    // An unreadable file is refused too.
    std::fs::remove_file(h.dir.join("enforcer.toml")).unwrap();
    let status = h.reload().await;
    assert_eq!(status.reloads.refused, 3);
    let why = status.reloads.last_error.as_deref().unwrap();
    assert!(why.starts_with("reading the config file"), "{why}");
    assert!(
        why.ends_with("No such file or directory (os error 2)"),
        "{why}"
    );
    assert_eq!(h.fake.calls().len(), calls.len());
    assert_eq!(
        pus(&status),
        [pu("a", "uid", 1), pu("c", "host-service", 0)]
    );

    let fake = h.fake.clone();
    h.shut_down(1).await.unwrap();
    assert_eq!(fake.calls().last().map(String::as_str), Some("cleanup"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_is_reported_and_the_next_one_finishes() {
    let h = Harness::start("failed", FakeDatapath::default()).await;
    h.write_config(&format!(
        "{TWO_PUS}[[pus]]\nid = \"c\"\nkind = \"uid\"\nuid = 7\n"
    ));
    h.fake.fail_on("configure");
    let status = h.reload().await;
    assert_eq!(status.reloads.failed, 1);
    assert_eq!(
        status.reloads.last_error.as_deref(),
        Some("configure c: configure 0 c failed")
    );
    assert_eq!(status.pus.len(), 2);
    *h.fake.fail.lock().unwrap() = None;
    let status = h.reload().await;
    assert_eq!(status.reloads.applied, 1);
    assert_eq!(status.pus.len(), 3);
    h.shut_down(1).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_does_not_interrupt_the_cleanup() {
    let fake = FakeDatapath {
        cleanup_delay: Duration::from_millis(300),
        ..FakeDatapath::default()
    };
    let h = Harness::start("signals", fake).await;
    let fake = h.fake.clone();
    h.shut_down(2).await.unwrap();
    let cleanups = fake.calls().iter().filter(|c| *c == "cleanup").count();
    assert_eq!(cleanups, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cleanup_is_an_error() {
    let h = Harness::start("cleanup", FakeDatapath::default()).await;
    h.fake.fail_on("cleanup");
    let err = h.shut_down(1).await.unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "cleaning up the datapath: cleanup: cleanup failed"
    );
}

#[test]
fn the_flag_overrides_the_files_datapath() {
    let dir = std::env::temp_dir().join(format!("enforcer-agent-{}-flag", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("enforcer.toml");
    std::fs::write(
        &path,
        "mode = \"sidecar\"\ndatapath = \"ebpf\"\n[iptables]\nbackend = \"legacy\"",
    )
    .unwrap();
    let source = |datapath, iptables_backend| ConfigSource {
        path: path.clone(),
        mounts: Mounts::cgroup2_at(&dir),
        datapath,
        iptables_backend,
    };
    let file = source(None, None).load().unwrap();
    assert_eq!(file.datapath, DatapathChoice::Ebpf);
    assert_eq!(file.iptables.backend, IptablesBackendChoice::Legacy);
    let flagged = source(
        Some(DatapathChoice::Iptables),
        Some(IptablesBackendChoice::Nft),
    )
    .load()
    .unwrap();
    assert_eq!(flagged.datapath, DatapathChoice::Iptables);
    assert_eq!(flagged.iptables.backend, IptablesBackendChoice::Nft);
    std::fs::write(&path, "mode = \"server\"").unwrap();
    let err = source(None, None).load().unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { .. }));
    let message = format!("{:#}", anyhow::Error::from(err));
    assert_eq!(
        message,
        format!(
            "the config file {} is refused: mode: \"server\" is not one of: \
             local-server, remote-container, sidecar",
            path.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn identity_keys_load_with_the_config_and_bad_ones_stop_it() {
    let dir = std::env::temp_dir().join(format!("enforcer-agent-{}-keys", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("enforcer.toml");
    let source = ConfigSource {
        path: path.clone(),
        mounts: Mounts::cgroup2_at(&dir),
        datapath: None,
        iptables_backend: None,
    };
    let key = dir.join("agent.key");
    let config = |trusted: &std::path::Path| {
        format!(
            "mode = \"sidecar\"\n[identity]\nkey = {:?}\ntrusted = [{:?}]\n",
            key.display().to_string(),
            trusted.display().to_string()
        )
    };
    let (_, public) = crate::identity::keys::generate_files(&key).unwrap();
    std::fs::write(&path, config(&public)).unwrap();
    assert_eq!(source.load().unwrap().identity.key.as_ref(), Some(&key));

    let missing = dir.join("peer.pub");
    std::fs::write(&path, config(&missing)).unwrap();
    let err = source.load().unwrap_err();
    assert!(matches!(err, ConfigError::Keys { .. }));
    let message = format!("{:#}", anyhow::Error::from(err));
    assert!(
        message.contains(&format!(
            "identity key file {}: cannot read it",
            missing.display()
        )),
        "{message}"
    );

    // Identity policies are enforced by the trap: a config with one loads,
    // with its keys.
    let policy = "[[pus]]\nid = \"c\"\nkind = \"container\"\n\
                  [[pus.network_policy]]\nfrom = []\npolicy_id = \"p\"\n";
    std::fs::write(&path, config(&public) + policy).unwrap();
    let (loaded, keys) = source.load_with_keys().unwrap();
    assert_eq!(loaded.identity.policies.len(), 1);
    // The own key, listed as trusted too.
    assert_eq!(keys.unwrap().trust.len(), 1);
    let index = source.trap_index(&loaded);
    let id = crate::policy::PuId::new("c").unwrap();
    assert_eq!(index.identity(&id).unwrap().policy.network.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `[cgroups] version = "v1"`: PU cgroups are checked under the net_cls
/// mount, which must be one; without a net_cls mount the file is refused.
#[test]
fn net_cls_pu_cgroups_are_checked_under_the_net_cls_mount() {
    let dir = std::env::temp_dir().join(format!("enforcer-agent-{}-netcls", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (v2, net_cls) = (dir.join("v2"), dir.join("net_cls"));
    std::fs::create_dir_all(v2.join("enforcer/web")).unwrap();
    std::fs::create_dir_all(net_cls.join("enforcer/db")).unwrap();
    let path = dir.join("enforcer.toml");
    let source = |net_cls: Option<&std::path::Path>| ConfigSource {
        path: path.clone(),
        mounts: Mounts {
            net_cls: net_cls.map(std::path::Path::to_path_buf),
            ..Mounts::cgroup2_at(&v2)
        },
        datapath: None,
        iptables_backend: None,
    };
    let config = |cgroup: &str| {
        format!(
            "mode = \"local-server\"\n[cgroups]\nversion = \"v1\"\n\
             [[pus]]\nid = \"db\"\nkind = \"linux-process\"\ncgroup = \"{cgroup}\"\n"
        )
    };
    let message = |err: ConfigError| format!("{:#}", anyhow::Error::from(err));

    std::fs::write(&path, config("enforcer/db")).unwrap();
    let err = source(None).load().unwrap_err();
    assert!(
        message(err).contains("cgroups.version = v1, but no cgroup v1 hierarchy"),
        "no net_cls mount"
    );
    let err = source(Some(&net_cls)).load().unwrap_err();
    assert!(
        message(err).contains("is not a net_cls cgroup hierarchy (it has no net_cls.classid)"),
        "a directory that is no net_cls hierarchy"
    );
    std::fs::write(net_cls.join("net_cls.classid"), "0\n").unwrap();
    let Loaded {
        config: loaded,
        cgroups,
        ..
    } = source(Some(&net_cls)).load_all().unwrap();
    assert_eq!(loaded.pus.len(), 1);
    assert_eq!(
        (cgroups.flavour, cgroups.mount),
        (CgroupFlavour::NetClsV1, net_cls.clone())
    );
    // The cgroup v2 PU's path does not exist under the net_cls mount.
    std::fs::write(&path, config("enforcer/web")).unwrap();
    let err = source(Some(&net_cls)).load().unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { .. }));
    assert!(message(err).contains("pus[0].cgroup: \"enforcer/web\" is not a directory"));
    // The handshake finds a PU's sockets by cgroup v2 id: net_cls PUs
    // with `[identity]` are refused, not signed as another PU.
    let key = dir.join("agent.key");
    crate::identity::keys::generate_files(&key).unwrap();
    let with_identity = format!(
        "{}[identity]\nkey = {:?}\n",
        config("enforcer/db"),
        key.display().to_string()
    );
    std::fs::write(&path, with_identity).unwrap();
    let err = source(Some(&net_cls)).load().unwrap_err();
    assert!(
        message(err).contains("cgroup v2 id, and these PUs' cgroups are net_cls"),
        "net_cls PUs with the handshake"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
