//! The datapath together with what is in force in it: the configuration
//! applied so far and the version each PU's policy is installed under.
//!
//! Synchronous, like the [`Datapath`] trait; the agent gives it to one
//! owner thread ([`super::owner`]) so that no two operations ever run at
//! once. Each successful operation updates the record at once, so after a
//! failure part-way through a reload the record still says exactly what
//! is in force, and the next reload's plan starts from there.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use crate::control::PuStatus;
use crate::datapath::ports::{self, Transport};
use crate::datapath::{self, Counters, Datapath};
use crate::policy::{Configuration, PuId};

use super::plan::Step;
use super::ports::{Changes, Discovery};

pub struct Enforcement {
    datapath: Box<dyn Datapath>,
    /// What is in force; before [`Self::start`], the settings of the
    /// configuration with no PU.
    applied: Configuration,
    /// The version (0 or 1) each PU in force is installed under.
    versions: BTreeMap<PuId, u8>,
}

impl Enforcement {
    /// Takes an opened datapath; nothing in the kernel changes yet.
    pub fn new(datapath: Box<dyn Datapath>, config: &Configuration) -> Self {
        let mut applied = config.clone();
        applied.pus.clear();
        Self {
            datapath,
            applied,
            versions: BTreeMap::new(),
        }
    }

    /// `run` (which first removes whatever a previous instance left), then
    /// the target networks, then every PU under version 0, in one
    /// [`Datapath::configure_all`].
    pub fn start(&mut self, config: &Configuration) -> Result<()> {
        self.datapath.run().context("run")?;
        let networks = Step::SetTargetNetworks(config.networks.clone());
        self.apply(
            [networks],
            &Configuration {
                pus: Vec::new(),
                ..config.clone()
            },
        )?;
        let n = config.pus.len();
        self.datapath
            .configure_all(0, &config.pus)
            .with_context(|| format!("configure the {n} PUs"))?;
        for pu in &config.pus {
            self.versions.insert(pu.id.clone(), 0);
        }
        self.applied = config.clone();
        Ok(())
    }

    /// Runs `steps` in order, stopping at the first that fails (the error
    /// names it). When all succeed, `target` is what is in force.
    pub fn apply(
        &mut self,
        steps: impl IntoIterator<Item = Step>,
        target: &Configuration,
    ) -> Result<()> {
        for step in steps {
            let what = step.to_string();
            self.step(step).context(what)?;
        }
        self.applied = target.clone();
        Ok(())
    }

    fn step(&mut self, step: Step) -> datapath::Result<()> {
        let pus = &mut self.applied.pus;
        match step {
            Step::SetTargetNetworks(networks) => {
                self.datapath.set_target_networks(&networks)?;
                self.applied.networks = networks;
            }
            Step::Configure(pu) => {
                self.datapath.configure(0, &pu)?;
                self.versions.insert(pu.id.clone(), 0);
                pus.push(pu);
            }
            Step::Update { new, old } => {
                let version = self.versions.get(&old.id).copied().unwrap_or(0) ^ 1;
                self.datapath.update(version, &new, &old)?;
                self.versions.insert(new.id.clone(), version);
                if let Some(slot) = pus.iter_mut().find(|pu| pu.id == new.id) {
                    *slot = new;
                }
            }
            Step::Delete(pu) => {
                let version = self.versions.get(&pu.id).copied().unwrap_or(0);
                self.datapath.delete(version, &pu)?;
                self.versions.remove(&pu.id);
                pus.retain(|p| p.id != pu.id);
            }
        }
        Ok(())
    }

    /// Removes everything the datapath made.
    pub fn cleanup(&mut self) -> Result<()> {
        self.datapath.cleanup().context("cleanup")?;
        self.applied.pus.clear();
        self.versions.clear();
        Ok(())
    }

    pub fn counters(&self) -> datapath::Result<Counters> {
        self.datapath.counters()
    }

    pub fn applied(&self) -> &Configuration {
        &self.applied
    }

    /// The PUs in force, in config order, with their versions and ports.
    pub fn pus(&self) -> Vec<PuStatus> {
        self.applied
            .pus
            .iter()
            .map(|pu| {
                let config = [(Transport::Tcp, "tcp"), (Transport::Udp, "udp")]
                    .into_iter()
                    .flat_map(|(transport, name)| {
                        ports::configured_ranges(pu, transport)
                            .iter()
                            .map(move |range| format!("{range}/{name}"))
                    });
                PuStatus {
                    id: pu.id.to_string(),
                    kind: pu.kind.name().to_owned(),
                    version: self.versions.get(&pu.id).copied().unwrap_or(0),
                    config_ports: config.collect(),
                    discovered_ports: self
                        .datapath
                        .runtime_ports(&pu.id)
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                }
            })
            .collect()
    }

    /// One round of port discovery ([`super::ports`]) for the PUs in
    /// force.
    pub fn discover_ports(&mut self, discovery: &mut Discovery) -> Result<Changes> {
        discovery.round(self.datapath.as_mut(), &self.applied.pus)
    }
}

#[cfg(test)]
pub(super) mod fake {
    //! A datapath that records the operations it is asked for, and fails
    //! the ones it is told to.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use crate::datapath::ports::{ListenPort, RuntimePorts};
    use crate::datapath::{Counters, Datapath, DatapathError, DatapathKind, PacketCounts, Result};
    use crate::policy::{NetworkSettings, Pu, PuId};

    /// The config the agent's unit tests start from: PU `a` (uid 1000) and
    /// PU `b` (the host). Tests that change it edit its lines as text.
    pub const TWO_PUS: &str = r#"
mode = "local-server"
[[pus]]
id = "a"
kind = "uid"
uid = 1000
[[pus]]
id = "b"
kind = "host"
"#;

    #[derive(Debug, Clone, Default)]
    pub struct FakeDatapath {
        /// Every call, as `configure 0 web`.
        pub log: Arc<Mutex<Vec<String>>>,
        /// A call whose log line starts with this fails.
        pub fail: Arc<Mutex<Option<String>>>,
        /// How long `cleanup` takes.
        pub cleanup_delay: Duration,
        /// Each PU's run-time ports.
        pub runtime: Arc<Mutex<BTreeMap<PuId, RuntimePorts>>>,
    }

    impl FakeDatapath {
        pub fn calls(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }

        pub fn fail_on(&self, prefix: &str) {
            *self.fail.lock().unwrap() = Some(prefix.to_owned());
        }

        fn record(&self, call: String) -> Result<()> {
            let failing = self
                .fail
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|prefix| call.starts_with(prefix.as_str()));
            self.log.lock().unwrap().push(call.clone());
            if failing {
                return Err(DatapathError::Other(anyhow::anyhow!("{call} failed")));
            }
            Ok(())
        }
    }

    impl Datapath for FakeDatapath {
        fn kind(&self) -> DatapathKind {
            DatapathKind::Iptables
        }
        fn run(&mut self) -> Result<()> {
            self.record("run".into())
        }
        fn set_target_networks(&mut self, networks: &NetworkSettings) -> Result<()> {
            self.record(format!("networks {}", networks.target_tcp.len()))
        }
        fn configure(&mut self, version: u8, pu: &Pu) -> Result<()> {
            self.record(format!("configure {version} {}", pu.id))
        }
        fn update(&mut self, version: u8, new: &Pu, old: &Pu) -> Result<()> {
            assert_eq!(new.id, old.id);
            self.record(format!("update {version} {}", new.id))
        }
        fn delete(&mut self, version: u8, pu: &Pu) -> Result<()> {
            self.record(format!("delete {version} {}", pu.id))
        }
        fn cleanup(&mut self) -> Result<()> {
            std::thread::sleep(self.cleanup_delay);
            self.record("cleanup".into())
        }
        fn add_port(&mut self, id: &PuId, port: ListenPort) -> Result<()> {
            self.record(format!("add-port {id} {port}"))?;
            let mut runtime = self.runtime.lock().unwrap();
            runtime.entry(id.clone()).or_default().insert(port);
            Ok(())
        }
        fn remove_port(&mut self, id: &PuId, port: ListenPort) -> Result<()> {
            self.record(format!("remove-port {id} {port}"))?;
            let mut runtime = self.runtime.lock().unwrap();
            runtime.entry(id.clone()).or_default().remove(&port);
            Ok(())
        }
        fn runtime_ports(&self, id: &PuId) -> RuntimePorts {
            let runtime = self.runtime.lock().unwrap();
            runtime.get(id).cloned().unwrap_or_default()
        }
        fn counters(&self) -> Result<Counters> {
            Ok(Counters {
                total: PacketCounts {
                    trapped: 7,
                    accepted: 5,
                    dropped: 2,
                },
                ..Counters::default()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeDatapath, TWO_PUS};
    use super::*;
    use crate::agent::plan::plan;
    use crate::policy::PortRange;

    fn started() -> (Enforcement, FakeDatapath, Configuration) {
        let config = Configuration::from_toml_str(TWO_PUS).unwrap();
        let fake = FakeDatapath::default();
        let mut e = Enforcement::new(Box::new(fake.clone()), &config);
        e.start(&config).unwrap();
        (e, fake, config)
    }

    #[test]
    fn start_runs_then_sets_networks_then_configures_every_pu() {
        let (e, fake, config) = started();
        assert_eq!(
            fake.calls(),
            ["run", "networks 0", "configure 0 a", "configure 0 b"]
        );
        assert_eq!(e.applied(), &config);
        let versions: Vec<_> = e.pus().into_iter().map(|p| (p.id, p.version)).collect();
        assert_eq!(versions, [("a".into(), 0), ("b".into(), 0)]);
    }

    #[test]
    fn updates_flip_the_version_and_deletes_use_the_current_one() {
        let (mut e, fake, old) = started();
        let mut new = old.clone();
        new.pus[0].tcp_ports.push(PortRange::new(80, 80).unwrap());
        e.apply(plan(&old, &new), &new).unwrap();
        let mut newer = new.clone();
        newer.pus[0].tcp_ports.clear();
        e.apply(plan(&new, &newer), &newer).unwrap();
        let mut last = newer.clone();
        last.pus.truncate(1);
        last.pus[0].tcp_ports.push(PortRange::new(22, 22).unwrap());
        e.apply(plan(&newer, &last), &last).unwrap();
        let mut gone = last.clone();
        gone.pus.clear();
        e.apply(plan(&last, &gone), &gone).unwrap();
        assert_eq!(
            fake.calls()[4..],
            [
                "update 1 a",
                "update 0 a",
                "delete 0 b",
                "update 1 a",
                "delete 1 a"
            ]
        );
        assert!(e.pus().is_empty());
    }

    #[test]
    fn a_failed_step_leaves_the_record_of_what_is_in_force() {
        let (mut e, fake, old) = started();
        let mut new = old.clone();
        new.pus.remove(1);
        new.pus[0].tcp_ports.push(PortRange::new(80, 80).unwrap());
        fake.fail_on("update");
        let err = e.apply(plan(&old, &new), &new).unwrap_err();
        assert_eq!(format!("{err:#}"), "update a: update 1 a failed");
        // b's delete went through, a's update did not.
        assert_eq!(e.applied().pus, old.pus[..1]);
        assert_eq!(e.pus()[0].version, 0);
        // Once the datapath works again, the next plan finishes the job.
        *fake.fail.lock().unwrap() = None;
        let rest = plan(e.applied(), &new);
        assert_eq!(rest.len(), 1);
        e.apply(rest, &new).unwrap();
        assert_eq!(e.applied(), &new);
        assert_eq!(e.pus()[0].version, 1);
    }

    #[test]
    fn cleanup_forgets_every_pu() {
        let (mut e, fake, _) = started();
        e.cleanup().unwrap();
        assert_eq!(fake.calls().last().map(String::as_str), Some("cleanup"));
        assert!(e.pus().is_empty());
        assert_eq!(e.counters().unwrap().total.trapped, 7);
    }
}
