//! `configure`, `update` and `set_target_networks` are all or nothing
//! (SPEC, "Bad input and faults"; issue 4 item 5), on both datapaths,
//! against the real kernel.
//!
//! The agent runs with the test-only fault hook armed
//! (`ENFORCER_TEST_FAULT=<operation>:<n>`, see
//! `enforcer::datapath::fault`): the n-th call of the operation fails at
//! its *last* kernel batch — the last `iptables-restore` or `ipset restore`
//! (made to fail by a line that cannot apply, so the tool really fails),
//! the last eBPF map write or attach. A SIGHUP reload drives the operation;
//! it must fail (status `reloads.failed` + 1), and the kernel state the
//! agent owns must be exactly what it was before: `iptables-save` and
//! `ip6tables-save` of every table, in both iptables flavours (the
//! iptables datapath runs on nf_tables and, once more, on legacy), `ipset save`, and in eBPF the
//! pinned maps and links. The same reload then succeeds (the fault struck
//! once) and changes that state, which shows the dump sees the operation.

use std::{collections::BTreeSet, fmt::Debug, net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData},
};
use enforcer::datapath::fault;
use enforcer_common::maps::{
    AclEntry, MAP_ACLS, MAP_NETS, MAP_PU_BY_CGROUP, MAP_PU_GENERATION, NetKey,
};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Config, Pu},
    netfilter,
    netns::TwoHosts,
    nettool, on_every_datapath, privilege,
    traffic::{Outcome, TcpEchoServer, run_nettool},
};

const PORT: u16 = 7000;
/// Allowed by policy A only.
const A_ONLY: &str = "10.4.0.2";
const A_ONLY_NET: &str = "10.4.0.0/16";

on_every_datapath!(
    a_failed_configure_changes_nothing,
    a_failed_update_changes_nothing,
    a_failed_target_network_change_changes_nothing,
);

struct World {
    env: privilege::Env,
    cgroup: Cgroup,
    _server: TcpEchoServer,
    hosts: TwoHosts,
}

impl World {
    fn new(env: privilege::Env) -> Result<Self> {
        let hosts = TwoHosts::new()?;
        let ifname = &hosts.b_end.ifname;
        hosts
            .b
            .ip(&["addr", "add", &format!("{A_ONLY}/32"), "dev", ifname])?;
        hosts
            .a
            .ip(&["route", "add", A_ONLY_NET, "dev", &hosts.a_end.ifname])?;
        let server = TcpEchoServer::start(&hosts.b, SocketAddr::new(A_ONLY.parse()?, PORT))?;
        Ok(Self {
            cgroup: Cgroup::new(&env.cgroup2)?,
            env,
            _server: server,
            hosts,
        })
    }

    /// The agent, with the fault `fault` armed.
    fn start(&self, datapath: Datapath, config: &str, fault: &str) -> Result<Agent> {
        Agent::start_with(
            env!("CARGO_BIN_EXE_agent"),
            &self.hosts.a,
            None,
            &datapath.args(),
            config,
            |cmd| {
                cmd.env(fault::ENV, fault);
            },
        )
    }

    fn pu_connects(&self, peer: &str) -> Result<Outcome> {
        let mut cmd = self.cgroup.command_in(&self.hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &format!("{peer}:{PORT}")]);
        run_nettool(cmd)
    }

    /// Everything of the kernel's state the agent owns, as text.
    fn kernel_state(&self, agent: &Agent) -> Result<String> {
        let mut all = String::new();
        // Every table of both iptables flavours (a save of every table
        // creates none, so the flavour not in use stays empty).
        for backend in netfilter::Backend::ALL {
            for family in [netfilter::Family::V4, netfilter::Family::V6] {
                all += &format!("## {backend} {family:?}\n");
                all += &netfilter::save_all(&self.hosts.a, backend, family)?;
            }
        }
        let out = self.hosts.a.command("ipset")?.arg("save").output()?;
        ensure!(out.status.success(), "ipset save failed: {out:?}");
        // Members of a hash set are listed in hash order, which a delete
        // and re-add may change: the content is what counts.
        let sets: BTreeSet<String> = String::from_utf8(out.stdout)?
            .lines()
            .map(str::to_owned)
            .collect();
        all += "## ipset\n";
        all += &sets.into_iter().collect::<Vec<_>>().join("\n");
        all += "\n";
        all += &self.pins(agent)?;
        Ok(all)
    }

    /// The eBPF datapath's pinned maps (those that decide) and links, if
    /// any: the PU counters are counters, like those of the rule dumps.
    fn pins(&self, agent: &Agent) -> Result<String> {
        let dir = self.env.bpffs.join("enforcer").join(agent.instance());
        if !dir.exists() {
            return Ok("## no pins\n".into());
        }
        let map = |name: &str| -> Result<MapData> {
            let path = dir.join("maps").join(name);
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        let mut lines = BTreeSet::new();
        trie_lines::<u8>("NETS", map(MAP_NETS)?, &mut lines)?;
        trie_lines::<AclEntry>("ACLS", map(MAP_ACLS)?, &mut lines)?;
        let pus: HashMap<_, u64, u32> = Map::HashMap(map(MAP_PU_BY_CGROUP)?).try_into()?;
        for entry in pus.iter() {
            let (cgroup, slot) = entry?;
            lines.insert(format!("PU_BY_CGROUP {cgroup} = {slot}"));
        }
        let generations: Array<_, u32> = Map::Array(map(MAP_PU_GENERATION)?).try_into()?;
        for (slot, generation) in generations.iter().enumerate() {
            let generation = generation?;
            if generation != 0 {
                lines.insert(format!("PU_GENERATION {slot} = {generation}"));
            }
        }
        let links: Vec<PathBuf> = std::fs::read_dir(dir.join("links"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        for link in links {
            lines.insert(format!("link {}", link.display()));
        }
        Ok(format!(
            "## pins\n{}\n",
            lines.into_iter().collect::<Vec<_>>().join("\n")
        ))
    }
}

/// A line per entry of the LPM trie `map`: `<label> <prefix>/<key> = <value>`.
fn trie_lines<V: Pod + Debug>(
    label: &str,
    map: MapData,
    lines: &mut BTreeSet<String>,
) -> Result<()> {
    let trie: LpmTrie<_, NetKey, V> = Map::LpmTrie(map).try_into()?;
    for entry in trie.iter() {
        let (key, value) = entry?;
        lines.insert(format!(
            "{label} {}/{:?} = {value:?}",
            key.prefix_len(),
            key.data()
        ));
    }
    Ok(())
}

/// One config: target `target_tcp` (TCP) and 10.1.0.0/24 (UDP),
/// `excluded`, and the PU with accept ACLs for TCP/7000 to each of
/// `pu_accepts` (no PU if `None`).
struct Policy {
    target_tcp: &'static str,
    excluded: &'static str,
    pu_accepts: Option<&'static [&'static str]>,
}

impl Policy {
    /// Target 10.1.0.0/24, excluded 10.9.0.0/16.
    const fn usual(pu_accepts: Option<&'static [&'static str]>) -> Self {
        Self {
            target_tcp: "10.1.0.0/24",
            excluded: "10.9.0.0/16",
            pu_accepts,
        }
    }

    fn toml(&self, w: &World) -> String {
        let config = Config::local_server()
            .target_tcp([self.target_tcp])
            .target_udp(["10.1.0.0/24"])
            .excluded([self.excluded]);
        match self.pu_accepts {
            Some(networks) => {
                config.pu(Pu::process_of("web", &w.cgroup).accepting_tcp_to(networks, PORT))
            }
            None => config,
        }
        .to_toml()
    }
}

/// One all-or-nothing case: the agent starts on `start` with `fault`
/// armed, then reloads `change`, which must fail, leaving the kernel state
/// as it was and the connection to [`A_ONLY`] working (`still`: why);
/// reloading it again must work, and change the state.
struct Scenario {
    fault: &'static str,
    start: Policy,
    change: Policy,
    still: &'static str,
}

impl Scenario {
    fn run(&self, datapath: Datapath) -> Result<()> {
        let Some(env) = privilege::require() else {
            return Ok(());
        };
        let fault = self.fault;
        let w = World::new(env)?;
        let agent = w.start(datapath, &self.start.toml(&w), fault)?;
        let before = w.kernel_state(&agent)?;
        let reloads = agent.reloads()?;

        agent.reload(&self.change.toml(&w))?;
        let failed = agent.reloads()?;
        assert_eq!(
            (failed.applied, failed.failed),
            (reloads.applied, reloads.failed + 1),
            "the reload must fail: {failed:?}\n{}",
            agent.log()
        );
        let why = failed.last_error.clone().unwrap_or_default();
        assert!(
            why.contains("enforcer-test-fault") || why.contains(fault::ENV),
            "it failed for the injected fault, not something else: {why}"
        );
        let after = w.kernel_state(&agent)?;
        assert_eq!(
            before, after,
            "{fault}: the kernel state changed although the operation failed ({why})"
        );
        assert_eq!(w.pu_connects(A_ONLY)?, Outcome::Exchanged, "{}", self.still);

        agent.reload(&self.change.toml(&w))?;
        let applied = agent.reloads()?;
        assert_eq!(
            applied.applied,
            reloads.applied + 1,
            "the same reload works once the fault has struck: {applied:?}\n{}",
            agent.log()
        );
        assert_ne!(
            before,
            w.kernel_state(&agent)?,
            "{fault}: the dump must show what the operation changes"
        );
        Ok(())
    }
}

const FAILED_CONFIGURE: Scenario = Scenario {
    fault: "configure:1",
    start: Policy::usual(None),
    change: Policy::usual(Some(&[A_ONLY_NET])),
    still: "no PU: untouched",
};

const FAILED_UPDATE: Scenario = Scenario {
    fault: "update:1",
    start: Policy::usual(Some(&["10.2.0.0/16", A_ONLY_NET])),
    change: Policy::usual(Some(&["10.2.0.0/16"])),
    still: "the old policy is still in force",
};

// Call 1 is the agent's start; call 2 the reload. The change both adds
// and removes entries in two sets.
const FAILED_TARGET_NETWORK_CHANGE: Scenario = Scenario {
    fault: "set_target_networks:2",
    start: Policy::usual(Some(&[A_ONLY_NET])),
    change: Policy {
        target_tcp: "10.3.0.0/16",
        excluded: "10.8.0.0/16",
        pu_accepts: Some(&[A_ONLY_NET]),
    },
    still: "the PU's accept ACL still applies",
};

fn a_failed_configure_changes_nothing(datapath: Datapath) -> Result<()> {
    FAILED_CONFIGURE.run(datapath)
}

fn a_failed_update_changes_nothing(datapath: Datapath) -> Result<()> {
    FAILED_UPDATE.run(datapath)
}

fn a_failed_target_network_change_changes_nothing(datapath: Datapath) -> Result<()> {
    FAILED_TARGET_NETWORK_CHANGE.run(datapath)
}
