//! The shared behavioural suite: the same tests, run against each
//! datapath, asserting only what applications and peers observe (SPEC,
//! "Observable behaviour") plus the kernel's own counters of what reached
//! user space.
//!
//! The world: host `a` runs the agent in `local-server` mode with one
//! linux-process PU (a cgroup of the test's own); host `b` holds the peers,
//! one address per role:
//! - `10.1.0.2`   target network (10.1.0.0/24): TCP set-up is trapped;
//! - `10.2.0.2`   not a target, covered by an accept ACL for TCP/7000;
//! - `10.3.0.2`   not a target, no ACL: blocked for the PU;
//! - `10.9.0.2`   excluded (10.9.0.0/16): never touched.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    netfilter,
    netns::TwoHosts,
    nettool, privilege,
    traffic::{Outcome, TcpEchoServer, UdpReceiver, run_nettool},
};
use nix::sys::signal::Signal;

const PORT: u16 = 7000;
const TARGET: &str = "10.1.0.2";
const ACL_PEER: &str = "10.2.0.2";
const OTHER: &str = "10.3.0.2";
const EXCLUDED: &str = "10.9.0.2";

/// Runs each listed test body once per datapath — and once more with
/// `--datapath auto` on a "kernel" without `bpf(2)`, where the agent must
/// fall back to iptables and the same behaviour must hold.
macro_rules! on_both_datapaths {
    ($($name:ident),+ $(,)?) => {
        mod ebpf {
            $(#[test] fn $name() -> anyhow::Result<()> { super::$name(super::Datapath::Ebpf) })+
        }
        mod iptables {
            $(#[test] fn $name() -> anyhow::Result<()> { super::$name(super::Datapath::Iptables) })+
        }
        mod auto_without_bpf {
            $(#[test] fn $name() -> anyhow::Result<()> { super::$name(super::Datapath::AutoWithoutBpf) })+
        }
    };
}

on_both_datapaths!(
    excluded_traffic_is_never_trapped_nor_dropped,
    target_syn_is_trapped_once_and_the_connection_proceeds,
    acl_decides_for_non_target_peers_and_others_are_untouched,
    target_network_changes_apply_to_new_connections,
    udp_datagrams_from_a_pu_follow_its_acls,
    sighup_adds_changes_and_removes_pus,
    sighup_with_a_broken_config_changes_nothing,
    sigint_and_sigterm_leave_nothing_behind,
    run_after_sigkill_starts_clean,
);

/// The test world: hosts, peers listening on every role's address, the
/// PU's cgroup.
struct World {
    cgroup: Cgroup,
    _servers: Vec<TcpEchoServer>,
    hosts: TwoHosts,
}

impl World {
    fn new(env: &privilege::Env) -> Result<Self> {
        let hosts = TwoHosts::new()?;
        let mut servers = Vec::new();
        for peer in [TARGET, ACL_PEER, OTHER, EXCLUDED] {
            if peer != TARGET {
                hosts.b.ip(&[
                    "addr",
                    "add",
                    &format!("{peer}/32"),
                    "dev",
                    &hosts.b_end.ifname,
                ])?;
                let net = format!("{}/16", peer.replace(".0.2", ".0.0"));
                hosts
                    .a
                    .ip(&["route", "add", &net, "dev", &hosts.a_end.ifname])?;
            }
            servers.push(TcpEchoServer::start(&hosts.b, addr(peer))?);
        }
        Ok(Self {
            cgroup: Cgroup::new(&env.cgroup2)?,
            _servers: servers,
            hosts,
        })
    }

    /// The PU's cgroup, relative to the cgroup v2 mount.
    fn cgroup_rel(&self) -> String {
        self.cgroup
            .path()
            .file_name()
            .expect("cgroup dir name")
            .to_string_lossy()
            .into_owned()
    }

    /// A TCP exchange from a process inside the PU.
    fn pu_connects(&self, peer: &str) -> Result<Outcome> {
        let mut cmd = self.cgroup.command_in(&self.hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &addr(peer).to_string()]);
        run_nettool(cmd)
    }

    /// A TCP exchange from a process of host `a` outside every PU.
    fn outsider_connects(&self, peer: &str) -> Result<Outcome> {
        let mut cmd = self.hosts.a.command(nettool!())?;
        cmd.args(["tcp-exchange", &addr(peer).to_string()]);
        run_nettool(cmd)
    }

    /// Packets the kernel ever queued in host `a`'s namespace.
    fn kernel_queued(&self) -> Result<u64> {
        Ok(netfilter::queue_stats(&self.hosts.a)?
            .iter()
            .map(|q| u64::from(q.id_sequence))
            .sum())
    }

    fn start(&self, datapath: Datapath, config: &str) -> Result<Agent> {
        self.start_as(None, datapath, config)
    }

    fn start_as(&self, instance: Option<&str>, datapath: Datapath, config: &str) -> Result<Agent> {
        let args = ["--datapath", datapath.arg()];
        let agent = Agent::start_with(
            env!("CARGO_BIN_EXE_agent"),
            &self.hosts.a,
            instance,
            &args,
            config,
            |cmd| datapath.prepare(cmd),
        )?;
        let status = agent.status()?;
        assert_eq!(
            status["datapath"]["kind"].as_str(),
            Some(datapath.expected()),
            "status must report the datapath in use: {status:#}"
        );
        if datapath == Datapath::AutoWithoutBpf {
            let reason = status["datapath"]["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains("bpf"),
                "the fallback must say why: {reason:?}"
            );
            assert!(agent.log().contains(reason), "and log it:\n{}", agent.log());
        }
        Ok(agent)
    }
}

fn addr(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("literal address"), PORT)
}

/// The config: target 10.1.0.0/24, excluded 10.9.0.0/16, and the given PUs.
fn config(target_tcp: &[&str], pus: &str) -> String {
    let targets: Vec<String> = target_tcp.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "mode = \"local-server\"\n\
         [networks]\n\
         target_tcp = [{}]\n\
         target_udp = [\"10.1.0.0/24\"]\n\
         excluded = [\"10.9.0.0/16\"]\n\
         {pus}",
        targets.join(", ")
    )
}

/// A linux-process PU with an accept ACL for TCP and UDP port 7000 to
/// 10.2.0.0/16.
fn pu(id: &str, cgroup: &str) -> String {
    format!(
        "[[pus]]\n\
         id = \"{id}\"\n\
         kind = \"linux-process\"\n\
         cgroup = \"{cgroup}\"\n\
         [[pus.application_acls]]\n\
         networks = [\"10.2.0.0/16\"]\n\
         protocols = [\"tcp\", \"udp\"]\n\
         ports = [{PORT}]\n\
         action = \"accept\"\n\
         policy_id = \"to-acl-peer\"\n"
    )
}

/// The per-PU counters the agent reports.
fn pu_counts(status: &serde_json::Value, id: &str) -> Result<(u64, u64, u64)> {
    let c = &status["counters"]["per_pu"][id];
    let get = |k: &str| {
        c[k].as_u64()
            .with_context(|| format!("status counters.per_pu.{id}.{k} in {status:#}"))
    };
    Ok((get("trapped")?, get("accepted")?, get("dropped")?))
}

fn excluded_traffic_is_never_trapped_nor_dropped(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let agent = w.start(
        datapath,
        &config(&["10.0.0.0/8"], &pu("web", &w.cgroup_rel())),
    )?;
    // 10.9.0.2 is inside the target 10.0.0.0/8 too: exclusion wins.
    assert_eq!(w.pu_connects(EXCLUDED)?, Outcome::Exchanged);
    assert_eq!(w.outsider_connects(EXCLUDED)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 0, "nothing may reach user space");
    assert_eq!(pu_counts(&agent.status()?, "web")?, (0, 0, 0));
    Ok(())
}

fn target_syn_is_trapped_once_and_the_connection_proceeds(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let agent = w.start(
        datapath,
        &config(&["10.1.0.0/24"], &pu("web", &w.cgroup_rel())),
    )?;
    assert_eq!(w.pu_connects(TARGET)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 1, "only the SYN reaches user space");
    assert_eq!(w.pu_connects(TARGET)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 2, "one SYN per connection");
    let (trapped, _, dropped) = pu_counts(&agent.status()?, "web")?;
    assert_eq!((trapped, dropped), (2, 0));
    // A process outside the PU is not trapped.
    assert_eq!(w.outsider_connects(TARGET)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 2);
    Ok(())
}

fn acl_decides_for_non_target_peers_and_others_are_untouched(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let agent = w.start(
        datapath,
        &config(&["10.1.0.0/24"], &pu("web", &w.cgroup_rel())),
    )?;
    assert_eq!(w.pu_connects(ACL_PEER)?, Outcome::Exchanged, "accept ACL");
    let blocked = w.pu_connects(OTHER)?;
    assert!(blocked.is_blocked(), "no ACL: blocked, got {blocked:?}");
    assert_eq!(
        w.outsider_connects(OTHER)?,
        Outcome::Exchanged,
        "outside every PU: untouched"
    );
    assert_eq!(w.kernel_queued()?, 0);
    let (trapped, accepted, dropped) = pu_counts(&agent.status()?, "web")?;
    assert_eq!(trapped, 0);
    assert!(accepted >= 1, "accepted {accepted}");
    assert!(dropped >= 1, "dropped {dropped}");
    Ok(())
}

fn target_network_changes_apply_to_new_connections(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let pus = pu("web", &w.cgroup_rel());
    let agent = w.start(datapath, &config(&["10.1.0.0/24"], &pus))?;
    assert!(w.pu_connects(OTHER)?.is_blocked());
    // 10.3.0.0/16 becomes a target: its set-up is now trapped (and, in
    // this slice, accepted by the agent).
    agent.reload(&config(&["10.1.0.0/24", "10.3.0.0/16"], &pus))?;
    assert_eq!(w.pu_connects(OTHER)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 1);
    // And back: 10.1.0.0/24 is no target any more, and has no ACL.
    agent.reload(&config(&["10.3.0.0/16"], &pus))?;
    assert!(w.pu_connects(TARGET)?.is_blocked());
    assert_eq!(w.pu_connects(OTHER)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 2);
    Ok(())
}

/// Unconnected UDP (`sendto`) from a PU: to a non-target peer its ACLs
/// decide, and a datagram without an accepting ACL never arrives.
fn udp_datagrams_from_a_pu_follow_its_acls(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let acl_peer = UdpReceiver::start(&w.hosts.b, addr(ACL_PEER))?;
    let other = UdpReceiver::start(&w.hosts.b, addr(OTHER))?;
    let _agent = w.start(
        datapath,
        &config(&["10.1.0.0/24"], &pu("web", &w.cgroup_rel())),
    )?;
    let send = |to: &UdpReceiver, payload: &str, in_pu: bool| -> Result<Outcome> {
        let mut cmd = if in_pu {
            w.cgroup.command_in(&w.hosts.a, nettool!())?
        } else {
            w.hosts.a.command(nettool!())?
        };
        cmd.args(["udp-send", &to.addr().to_string(), "--payload", payload]);
        run_nettool(cmd)
    };
    let wait = Duration::from_secs(2);
    send(&acl_peer, "pu-to-acl-peer", true)?;
    assert!(
        acl_peer.wait_for(b"pu-to-acl-peer", wait).is_some(),
        "accept ACL"
    );
    send(&other, "pu-to-other", true)?;
    send(&other, "outsider-to-other", false)?;
    assert!(
        other.wait_for(b"outsider-to-other", wait).is_some(),
        "outside every PU: untouched"
    );
    assert!(
        other
            .wait_for(b"pu-to-other", Duration::from_millis(300))
            .is_none(),
        "no ACL: the PU's datagram must not arrive"
    );
    Ok(())
}

fn sighup_adds_changes_and_removes_pus(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let second = Cgroup::new(&env.cgroup2)?;
    let second_rel = second
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let from_second = |peer: &str| -> Result<Outcome> {
        let mut cmd = second.command_in(&w.hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &addr(peer).to_string()]);
        run_nettool(cmd)
    };
    let agent = w.start(
        datapath,
        &config(&["10.1.0.0/24"], &pu("web", &w.cgroup_rel())),
    )?;
    assert_eq!(from_second(OTHER)?, Outcome::Exchanged, "not a PU yet");

    // Add a PU.
    let both = pu("web", &w.cgroup_rel()) + &pu("batch", &second_rel);
    agent.reload(&config(&["10.1.0.0/24"], &both))?;
    assert!(from_second(OTHER)?.is_blocked(), "batch is enforced now");
    assert!(agent.status()?["counters"]["per_pu"]["batch"].is_object());

    // Change it: batch may now reach 10.3.0.0/16.
    let changed = pu("web", &w.cgroup_rel())
        + &pu("batch", &second_rel).replace("10.2.0.0/16", "10.3.0.0/16");
    agent.reload(&config(&["10.1.0.0/24"], &changed))?;
    assert_eq!(
        from_second(OTHER)?,
        Outcome::Exchanged,
        "changed ACL applies"
    );
    assert!(from_second(ACL_PEER)?.is_blocked(), "old ACL is gone");
    assert!(w.pu_connects(OTHER)?.is_blocked(), "web unchanged");

    // Remove it.
    agent.reload(&config(&["10.1.0.0/24"], &pu("web", &w.cgroup_rel())))?;
    assert_eq!(
        from_second(ACL_PEER)?,
        Outcome::Exchanged,
        "batch is no PU any more"
    );
    assert!(agent.status()?["counters"]["per_pu"]["batch"].is_null());
    Ok(())
}

fn sighup_with_a_broken_config_changes_nothing(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let good = config(&["10.1.0.0/24"], &pu("web", &w.cgroup_rel()));
    let agent = w.start(datapath, &good)?;
    let rules_before = agent_tables(&w)?;
    let reloads_before = agent.reloads()?;
    let broken = good.replace("10.2.0.0/16", "10.2.0.0/33");
    agent.reload(&broken)?;
    let reloads = agent.reloads()?;
    assert_eq!(
        (reloads.applied, reloads.refused, reloads.failed),
        (
            reloads_before.applied,
            reloads_before.refused + 1,
            reloads_before.failed
        ),
        "one more refused reload, nothing else: {reloads:?}"
    );
    let why = reloads.last_error.as_deref().unwrap_or_default();
    assert!(
        why.contains("10.2.0.0/33"),
        "status names the refused value: {why:?}"
    );
    assert!(
        agent.log().contains("10.2.0.0/33"),
        "the logged refusal names the value:\n{}",
        agent.log()
    );
    assert_eq!(
        w.pu_connects(ACL_PEER)?,
        Outcome::Exchanged,
        "old policy still in force"
    );
    assert!(w.pu_connects(OTHER)?.is_blocked());
    assert_eq!(rules_before, agent_tables(&w)?);
    Ok(())
}

/// The tables the agent writes to in host `a`'s namespace, IPv4 and IPv6
/// mangle and nat, counters stripped.
fn agent_tables(w: &World) -> Result<String> {
    let mut all = String::new();
    for family in [netfilter::Family::V4, netfilter::Family::V6] {
        for table in ["mangle", "nat"] {
            let dump = netfilter::save(&w.hosts.a, family, table)?;
            all += &format!("# {family:?} {table}\n");
            all += &netfilter::rules_without_counters(&dump);
        }
    }
    Ok(all)
}

/// After the agent is gone: no TRI- chain or set in the namespace, no pin
/// directory of its instance on the harness's bpffs, and the PU's traffic
/// is no longer enforced.
fn assert_nothing_left(w: &World, bpffs: &Path, instance: &str) -> Result<()> {
    for family in [netfilter::Family::V4, netfilter::Family::V6] {
        for table in ["mangle", "nat"] {
            let dump = netfilter::save(&w.hosts.a, family, table)?;
            assert!(
                !dump.contains("TRI-"),
                "{family:?} {table} still has rules:\n{dump}"
            );
        }
    }
    let sets = w.hosts.a.command("ipset")?.args(["list", "-n"]).output()?;
    let sets = String::from_utf8_lossy(&sets.stdout);
    assert!(!sets.contains("TRI-"), "ipsets left: {sets}");
    // Where the agent pins now, and where it pinned before (a leftover of
    // either is a leftover).
    for pins in [bpffs.join("enforcer").join(instance), bpffs.join(instance)] {
        assert!(!pins.exists(), "{} left", pins.display());
    }
    assert_eq!(
        w.pu_connects(OTHER)?,
        Outcome::Exchanged,
        "no enforcement may remain"
    );
    Ok(())
}

fn sigint_and_sigterm_leave_nothing_behind(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let mut agent = w.start(
            datapath,
            &config(&["10.1.0.0/24"], &pu("web", &w.cgroup_rel())),
        )?;
        assert!(
            w.pu_connects(OTHER)?.is_blocked(),
            "enforcing before {signal}"
        );
        let status = agent.stop_with(signal)?;
        assert!(
            status.success(),
            "exit after {signal}: {status}\n{}",
            agent.log()
        );
        assert_nothing_left(&w, &env.bpffs, agent.instance())?;
    }
    Ok(())
}

fn run_after_sigkill_starts_clean(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let cfg = config(&["10.1.0.0/24"], &pu("web", &w.cgroup_rel()));
    let mut first = w.start(datapath, &cfg)?;
    first.stop_with(Signal::SIGKILL)?;
    // Killed: its state stays in the kernel, still enforcing.
    assert!(
        w.pu_connects(OTHER)?.is_blocked(),
        "a killed agent's policy stays in force"
    );
    // The same instance, restarted, takes over from whatever was left.
    let mut second = w.start_as(Some(first.instance()), datapath, &cfg)?;
    assert_eq!(w.pu_connects(ACL_PEER)?, Outcome::Exchanged);
    assert!(w.pu_connects(OTHER)?.is_blocked());
    assert_eq!(w.pu_connects(TARGET)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 1);
    assert!(second.stop_with(Signal::SIGTERM)?.success());
    assert_nothing_left(&w, &env.bpffs, first.instance())?;
    Ok(())
}
