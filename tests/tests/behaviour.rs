//! The shared behavioural suite: the same tests, run against each
//! datapath and in each address family, asserting only what applications
//! and peers observe (SPEC, "Observable behaviour") plus the kernel's own
//! counters of what reached user space.
//!
//! The world: host `a` runs the agent in `local-server` mode with one
//! linux-process PU (a cgroup of the test's own); host `b` holds the peers,
//! one address per role and family ([`Role`]):
//! - target   `10.1.0.2` / `fd00:1::2`, in the target networks
//!   (`10.1.0.0/24`, `fd00:1::/64`): TCP set-up is trapped;
//! - ACL peer `10.2.0.2` / `fd00:2::2`, not a target, covered by an accept
//!   ACL for TCP and UDP port 7000;
//! - other    `10.3.0.2` / `fd00:3::2`, not a target, no ACL: blocked for
//!   the PU;
//! - excluded `10.9.0.2` / `fd00:9::2`, in the excluded networks
//!   (`10.9.0.0/16`, `fd00:9::/64`): never touched.
//!
//! Every config lists the networks of both families, as a real one does;
//! a test exercises the peers of its own family only, so each family's
//! run also proves that the other family's entries do not leak into it.

use std::{net::SocketAddr, ops::Deref, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::{self, Backend, Family},
    netns::output_ok,
    nettool, privilege,
    traffic::{Outcome, PingSocket, TcpEchoServer, UdpReceiver, ping, run_nettool},
    two_agents::{Capture, is_syn},
    world::{ACL_PEER, EVERY_PEER, EXCLUDED, OTHER, PORT, Peer as Role, PuWorld, TARGET},
};
use nix::sys::signal::Signal;

/// One network of each family, as the config writes them: IPv4, IPv6.
type Nets = [&'static str; 2];

/// Packets of a PU's TCP connection with a target that reach user space:
/// its set-up — the SYN, the SYN-ACK and the first ACK — and nothing
/// after (`tests/tests/trap_contract.rs` checks each one's queue).
const HANDSHAKE: u64 = 3;

// Each body once per datapath (ebpf, iptables, auto_without_bpf,
// iptables_legacy) and, in each, once per address family:
// `ebpf::v4::name`, `ebpf::v6::name`, …
enforcer_tests::on_every_datapath_and_family!(
    excluded_traffic_is_never_trapped_nor_dropped,
    target_handshake_is_trapped_once_and_the_connection_proceeds,
    acl_decides_for_non_target_peers_and_others_are_untouched,
    overlapping_acls_resolve_by_bucket_not_by_longest_prefix,
    target_network_changes_apply_to_new_connections,
    udp_datagrams_from_a_pu_follow_its_acls,
    unconnected_udp_to_a_target_is_trapped_and_to_an_acl_peer_is_not,
    pings_from_a_pu_follow_its_icmp_acls,
    sighup_adds_changes_and_removes_pus,
    sighup_with_a_broken_config_changes_nothing,
    sigint_and_sigterm_leave_nothing_behind,
    run_after_sigkill_starts_clean,
);

// The eBPF datapath's few fixed netfilter rules on the legacy flavour:
// the trap and the cleanup are what they touch.
enforcer_tests::on_datapaths_and_families!(
    [
        target_handshake_is_trapped_once_and_the_connection_proceeds,
        sigint_and_sigterm_leave_nothing_behind,
    ]
    ebpf_legacy EbpfLegacy
);

// What a PU's raw sockets (CAP_NET_RAW) send: hand-built TCP, UDP and
// ICMP that no connect or sendmsg hook sees.
mod raw {
    enforcer_tests::on_both_datapaths_and_families!(
        raw_tcp_and_udp_from_a_pu_follow_its_acls,
        icmp_answers_from_a_pu_pass_only_for_flows_conntrack_knows,
    );
}

/// The test world of one family: the shared [`PuWorld`] with every role
/// on `b`, and a TCP echo server on each role's address.
struct World {
    _servers: Vec<TcpEchoServer>,
    world: PuWorld,
}

impl Deref for World {
    type Target = PuWorld;

    fn deref(&self) -> &PuWorld {
        &self.world
    }
}

impl World {
    fn new(env: &privilege::Env, family: Family) -> Result<Self> {
        let roles = [TARGET, ACL_PEER, OTHER, EXCLUDED];
        let world = PuWorld::new(env, family, &roles)?;
        let servers = roles
            .map(|role| TcpEchoServer::start(&world.hosts.b, world.addr(role)))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            _servers: servers,
            world,
        })
    }

    /// A nettool run by a process inside the PU (`in_pu`) or by one of
    /// host `a` outside every PU.
    fn nettool(&self, in_pu: bool) -> Result<Command> {
        if in_pu {
            self.cgroup.command_in(&self.hosts.a, nettool!())
        } else {
            self.hosts.a.command(nettool!())
        }
    }

    /// One UDP datagram (`sendto`) to `to`, from inside the PU or not.
    fn udp_send(&self, to: &UdpReceiver, payload: &str, in_pu: bool) -> Result<Outcome> {
        let mut cmd = self.nettool(in_pu)?;
        cmd.args(["udp-send", &to.addr().to_string(), "--payload", payload]);
        run_nettool(cmd)
    }

    /// A TCP exchange from a process inside the PU.
    fn pu_connects(&self, peer: Role) -> Result<Outcome> {
        self.connects_from(&self.cgroup, peer)
    }

    /// A TCP exchange from a process inside `cgroup`.
    fn connects_from(&self, cgroup: &Cgroup, peer: Role) -> Result<Outcome> {
        let mut cmd = cgroup.command_in(&self.hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &self.addr(peer).to_string()]);
        run_nettool(cmd)
    }

    /// A TCP exchange from a process of host `a` outside every PU.
    fn outsider_connects(&self, peer: Role) -> Result<Outcome> {
        let mut cmd = self.nettool(false)?;
        cmd.args(["tcp-exchange", &self.addr(peer).to_string()]);
        run_nettool(cmd)
    }

    fn start(&self, datapath: Datapath, config: &str) -> Result<Agent> {
        self.start_as(None, datapath, config)
    }

    fn start_as(&self, instance: Option<&str>, datapath: Datapath, config: &str) -> Result<Agent> {
        let args = datapath.args();
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
        assert_eq!(
            status["datapath"]["iptables"]["backend"].as_str(),
            Some(datapath.backend().as_str()),
            "status must report the iptables flavour in use: {status:#}"
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

/// The config: TCP targets `target_tcp`, the UDP target and excluded
/// networks of [`TARGET`] and [`EXCLUDED`], in both families, and the
/// given PUs.
fn config(target_tcp: &[Nets], pus: &[Pu]) -> String {
    let config = Config::local_server()
        .target_tcp(target_tcp.iter().flatten().copied())
        .target_udp(TARGET.nets)
        .excluded(EXCLUDED.nets);
    pus.iter()
        .fold(config, |config, pu| config.pu(pu.clone()))
        .to_toml()
}

/// A linux-process PU of `cgroup` with an accept ACL for TCP and UDP port
/// 7000 to `acl`'s networks, both families.
fn pu(id: &str, cgroup: &Cgroup, acl: Nets) -> Pu {
    Pu::process_of(id, cgroup)
        .application_acl(Acl::accept("to-acl-peer", acl).tcp([PORT]).udp([PORT]))
}

/// The usual config: TCP target [`TARGET`], one PU `web` whose ACL
/// accepts [`ACL_PEER`].
fn web_config(w: &World) -> String {
    config(&[TARGET.nets], &[pu("web", &w.cgroup, ACL_PEER.nets)])
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

fn excluded_traffic_is_never_trapped_nor_dropped(datapath: Datapath, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let agent = w.start(
        datapath,
        &config(&[EVERY_PEER], &[pu("web", &w.cgroup, ACL_PEER.nets)]),
    )?;
    // The excluded peer is inside the target networks too: exclusion wins.
    assert_eq!(w.pu_connects(EXCLUDED)?, Outcome::Exchanged);
    assert_eq!(w.outsider_connects(EXCLUDED)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 0, "nothing may reach user space");
    assert_eq!(pu_counts(&agent.status()?, "web")?, (0, 0, 0));
    // And the target networks do hold it but for the exclusion: the
    // target peer beside it is trapped.
    assert_eq!(w.pu_connects(TARGET)?, Outcome::Exchanged);
    assert_eq!(
        w.kernel_queued()?,
        HANDSHAKE,
        "the target's handshake is trapped"
    );
    Ok(())
}

fn target_handshake_is_trapped_once_and_the_connection_proceeds(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let agent = w.start(datapath, &web_config(&w))?;
    assert_eq!(w.pu_connects(TARGET)?, Outcome::Exchanged);
    assert_eq!(
        w.kernel_queued()?,
        HANDSHAKE,
        "only the handshake reaches user space"
    );
    assert_eq!(w.pu_connects(TARGET)?, Outcome::Exchanged);
    assert_eq!(
        w.kernel_queued()?,
        2 * HANDSHAKE,
        "one handshake per connection"
    );
    let (trapped, _, dropped) = pu_counts(&agent.status()?, "web")?;
    assert_eq!((trapped, dropped), (2, 0), "one set-up per connection");
    // A process outside the PU: only its SYN-ACK from the target network
    // is trapped, by the global rule (SPEC, "Global steering").
    assert_eq!(w.outsider_connects(TARGET)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 2 * HANDSHAKE + 1);
    Ok(())
}

fn acl_decides_for_non_target_peers_and_others_are_untouched(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let agent = w.start(datapath, &web_config(&w))?;
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

/// A reject on a wide network and an accept on a narrower one inside it:
/// SPEC's bucket order puts every reject before every accept, so the
/// narrow accept never applies — whichever is declared first, and although
/// the accept's prefix is the longer one. A peer covered by the wide
/// network alone is refused the same way; one outside both gets the final
/// drop.
fn overlapping_acls_resolve_by_bucket_not_by_longest_prefix(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let wide_reject = Acl::reject("wide-reject", EVERY_PEER).tcp([PORT]);
    let narrow_accept = Acl::accept("narrow-accept", ACL_PEER.nets).tcp([PORT]);
    for (first, second) in [
        (&wide_reject, &narrow_accept),
        (&narrow_accept, &wide_reject),
    ] {
        let web = Pu::process_of("web", &w.cgroup)
            .application_acl(first.clone())
            .application_acl(second.clone());
        let agent = w.start(datapath, &config(&[TARGET.nets], &[web]))?;
        let outcome = w.pu_connects(ACL_PEER)?;
        assert!(
            outcome.is_blocked(),
            "the reject bucket comes first: got {outcome:?}"
        );
        assert!(w.pu_connects(OTHER)?.is_blocked(), "wide reject");
        assert_eq!(w.outsider_connects(ACL_PEER)?, Outcome::Exchanged);
        drop(agent);
    }
    Ok(())
}

fn target_network_changes_apply_to_new_connections(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let pus = [pu("web", &w.cgroup, ACL_PEER.nets)];
    let agent = w.start(datapath, &config(&[TARGET.nets], &pus))?;
    assert!(w.pu_connects(OTHER)?.is_blocked());
    // The other peer's network becomes a target: its set-up is now
    // trapped (and, in this slice, accepted by the agent).
    agent.reload(&config(&[TARGET.nets, OTHER.nets], &pus))?;
    assert_eq!(w.pu_connects(OTHER)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, HANDSHAKE);
    // And back: the target's network is no target any more, and has no
    // ACL.
    agent.reload(&config(&[OTHER.nets], &pus))?;
    assert!(w.pu_connects(TARGET)?.is_blocked());
    assert_eq!(w.pu_connects(OTHER)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 2 * HANDSHAKE);
    Ok(())
}

/// Unconnected UDP (`sendto`) from a PU: to a non-target peer its ACLs
/// decide, and a datagram without an accepting ACL never arrives.
fn udp_datagrams_from_a_pu_follow_its_acls(datapath: Datapath, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let acl_peer = UdpReceiver::start(&w.hosts.b, w.addr(ACL_PEER))?;
    let other = UdpReceiver::start(&w.hosts.b, w.addr(OTHER))?;
    let _agent = w.start(datapath, &web_config(&w))?;
    let wait = Duration::from_secs(2);
    w.udp_send(&acl_peer, "pu-to-acl-peer", true)?;
    assert!(
        acl_peer.wait_for(b"pu-to-acl-peer", wait).is_some(),
        "accept ACL"
    );
    w.udp_send(&other, "pu-to-other", true)?;
    w.udp_send(&other, "outsider-to-other", false)?;
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

/// Unconnected UDP (`sendto`) from a PU to a target UDP network is
/// trapped — its first datagram included — and to an ACL-accepted peer
/// outside the targets it is not; a process outside the PU is never
/// trapped.
fn unconnected_udp_to_a_target_is_trapped_and_to_an_acl_peer_is_not(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let target = UdpReceiver::start(&w.hosts.b, w.addr(TARGET))?;
    let acl_peer = UdpReceiver::start(&w.hosts.b, w.addr(ACL_PEER))?;
    let agent = w.start(datapath, &web_config(&w))?;
    assert_eq!(
        w.udp_send(&acl_peer, "pu-to-acl-peer", true)?,
        Outcome::Exchanged
    );
    assert!(
        acl_peer
            .wait_for(b"pu-to-acl-peer", Duration::from_secs(2))
            .is_some(),
        "accept ACL: delivered"
    );
    assert_eq!(
        w.kernel_queued()?,
        0,
        "an ACL-accepted datagram is not trapped"
    );
    assert_eq!(
        w.udp_send(&target, "outsider-to-target", false)?,
        Outcome::Exchanged
    );
    assert_eq!(w.kernel_queued()?, 0, "outside every PU: not trapped");
    assert_eq!(
        w.udp_send(&target, "pu-to-target", true)?,
        Outcome::Exchanged
    );
    assert_eq!(
        w.kernel_queued()?,
        1,
        "the PU's first datagram to a target UDP network goes to user space"
    );
    assert!(
        target
            .wait_for(b"pu-to-target", Duration::from_secs(2))
            .is_some(),
        "the trap's verdict lets it through (the agent accepts what it traps)"
    );
    let (trapped, _, _) = pu_counts(&agent.status()?, "web")?;
    assert!(trapped >= 1, "the agent counts the trap: {trapped}");
    Ok(())
}

/// ICMP from a PU (echo requests from raw and ping sockets: no connect
/// or sendmsg hook sees them) follows the PU's ICMP ACLs in SPEC's order: an accept
/// ACL lets the echo through and its reply back; a reject ACL drops it;
/// a peer no specific ACL covers (the target: specific ACLs skip target
/// TCP networks) gets the final drop in IPv4, and the "ICMPv6 accepted"
/// step in IPv6; an excluded peer is never touched; a process outside the
/// PU is untouched.
fn pings_from_a_pu_follow_its_icmp_acls(datapath: Datapath, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let pus = [pu("web", &w.cgroup, ACL_PEER.nets)
        .application_acl(Acl::accept("ping-acl-peer", ACL_PEER.nets).icmp())
        .application_acl(Acl::reject("no-ping-other", OTHER.nets).icmp())];
    let _agent = w.start(datapath, &config(&[TARGET.nets], &pus))?;
    // Ping sockets for every group, in host `a`'s namespace only.
    output_ok(
        w.hosts
            .a
            .command("sysctl")?
            .args(["-w", "net.ipv4.ping_group_range=0 2147483647"]),
    )?;
    let ping_from = |peer: Role, in_pu: bool, dgram: bool| -> Result<Outcome> {
        let mut cmd = w.nettool(in_pu)?;
        cmd.args(["ping", &w.ip(peer).to_string()]);
        if dgram {
            cmd.arg("--dgram");
        }
        run_nettool(cmd)
    };
    let ping = |peer: Role, in_pu: bool| ping_from(peer, in_pu, false);
    for dgram in [false, true] {
        assert_eq!(
            ping_from(ACL_PEER, true, dgram)?,
            Outcome::Exchanged,
            "icmp accept ACL (ping socket: {dgram})"
        );
        let rejected = ping_from(OTHER, true, dgram)?;
        assert!(
            rejected.is_blocked(),
            "icmp reject ACL (ping socket: {dgram}): got {rejected:?}"
        );
    }
    assert_eq!(ping(OTHER, false)?, Outcome::Exchanged, "outside every PU");
    assert_eq!(ping(EXCLUDED, true)?, Outcome::Exchanged, "excluded");
    let to_target = ping(TARGET, true)?;
    match family {
        Family::V4 => assert!(
            to_target.is_blocked(),
            "no ACL for ICMP: the final drop, got {to_target:?}"
        ),
        Family::V6 => assert_eq!(to_target, Outcome::Exchanged, "ICMPv6 accepted"),
    }
    assert_eq!(w.kernel_queued()?, 0, "ICMP is never trapped");
    Ok(())
}

fn sighup_adds_changes_and_removes_pus(datapath: Datapath, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let second = Cgroup::new(&env.cgroup2)?;
    let from_second = |peer: Role| w.connects_from(&second, peer);
    let web = pu("web", &w.cgroup, ACL_PEER.nets);
    let agent = w.start(
        datapath,
        &config(&[TARGET.nets], std::slice::from_ref(&web)),
    )?;
    assert_eq!(from_second(OTHER)?, Outcome::Exchanged, "not a PU yet");

    // Add a PU.
    let both = [web.clone(), pu("batch", &second, ACL_PEER.nets)];
    agent.reload(&config(&[TARGET.nets], &both))?;
    assert!(from_second(OTHER)?.is_blocked(), "batch is enforced now");
    assert!(agent.status()?["counters"]["per_pu"]["batch"].is_object());

    // Change it: batch may now reach the other peer, and no longer the
    // ACL peer.
    let changed = [web.clone(), pu("batch", &second, OTHER.nets)];
    agent.reload(&config(&[TARGET.nets], &changed))?;
    assert_eq!(
        from_second(OTHER)?,
        Outcome::Exchanged,
        "changed ACL applies"
    );
    assert!(from_second(ACL_PEER)?.is_blocked(), "old ACL is gone");
    assert!(w.pu_connects(OTHER)?.is_blocked(), "web unchanged");

    // Remove it.
    agent.reload(&config(&[TARGET.nets], &[web]))?;
    assert_eq!(
        from_second(ACL_PEER)?,
        Outcome::Exchanged,
        "batch is no PU any more"
    );
    assert!(agent.status()?["counters"]["per_pu"]["batch"].is_null());
    Ok(())
}

fn sighup_with_a_broken_config_changes_nothing(datapath: Datapath, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let good = web_config(&w);
    let agent = w.start(datapath, &good)?;
    let rules_before = agent_tables(&w, datapath)?;
    let reloads_before = agent.reloads()?;
    // The ACL network of this family, one bit too long.
    let (net, _) = w.net(ACL_PEER).split_once('/').expect("a CIDR");
    let too_long = match family {
        Family::V4 => 33,
        Family::V6 => 129,
    };
    let bad = format!("{net}/{too_long}");
    let broken = good.replace(w.net(ACL_PEER), &bad);
    assert_ne!(broken, good);
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
        why.contains(&bad),
        "status names the refused value: {why:?}"
    );
    assert!(
        agent.log().contains(&bad),
        "the logged refusal names the value:\n{}",
        agent.log()
    );
    assert_eq!(
        w.pu_connects(ACL_PEER)?,
        Outcome::Exchanged,
        "old policy still in force"
    );
    assert!(w.pu_connects(OTHER)?.is_blocked());
    assert_eq!(rules_before, agent_tables(&w, datapath)?);
    Ok(())
}

/// The tables the agent writes to in host `a`'s namespace, IPv4 and IPv6
/// mangle and nat, counters stripped, in the flavour it uses.
fn agent_tables(w: &World, datapath: Datapath) -> Result<String> {
    let mut all = String::new();
    for family in [Family::V4, Family::V6] {
        for table in ["mangle", "nat"] {
            let dump = netfilter::save_in(&w.hosts.a, datapath.backend(), family, table)?;
            all += &format!("# {family:?} {table}\n");
            all += &netfilter::rules_without_counters(&dump);
        }
    }
    Ok(all)
}

/// After the agent is gone: no TRI- chain or set in the namespace (in
/// either iptables flavour), no pin directory of its instance on the
/// harness's bpffs, and the PU's traffic is no longer enforced.
fn assert_nothing_left(w: &World, bpffs: &Path, instance: &str) -> Result<()> {
    for backend in Backend::ALL {
        for family in [Family::V4, Family::V6] {
            let dump = netfilter::save_all(&w.hosts.a, backend, family)?;
            assert!(
                !dump.contains("TRI-"),
                "{backend} {family:?} still has rules:\n{dump}"
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

fn sigint_and_sigterm_leave_nothing_behind(datapath: Datapath, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let mut agent = w.start(datapath, &web_config(&w))?;
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

fn run_after_sigkill_starts_clean(datapath: Datapath, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let cfg = web_config(&w);
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
    assert_eq!(w.kernel_queued()?, HANDSHAKE);
    assert!(second.stop_with(Signal::SIGTERM)?.success());
    assert_nothing_left(&w, &env.bpffs, first.instance())?;
    Ok(())
}

impl World {
    /// `nettool raw-send KIND TO` from inside the PU or not, from `a`'s
    /// veth address; the send's own outcome.
    fn raw_send(&self, in_pu: bool, kind: &str, to: SocketAddr, extra: &[&str]) -> Result<Outcome> {
        let from = self.hosts.a_end.ip(self.family).to_string();
        let mut cmd = self.nettool(in_pu)?;
        cmd.args(["raw-send", kind, &to.to_string(), "--from", &from]);
        cmd.args(extra);
        run_nettool(cmd)
    }

    /// A TCP SYN seen arriving on `b` from source port `sport`.
    fn syn_arrives(capture: &Capture, sport: u16, within: Duration) -> bool {
        capture
            .wait_for(within, |from, _, flags, _| from == sport && is_syn(flags))
            .is_some()
    }
}

/// An IP packet seen on `b` carrying `marker` somewhere.
fn carried(capture: &Capture, marker: &[u8], within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if capture
            .packets()
            .iter()
            .any(|p| p.windows(marker.len()).any(|w| w == marker))
        {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long to wait for a packet that must come.
const COMES: Duration = Duration::from_secs(2);
/// How long to wait for a packet that must not.
const STAYS_AWAY: Duration = Duration::from_millis(500);

/// A PU's raw socket (CAP_NET_RAW) builds a TCP SYN or a UDP datagram
/// itself: no connect or sendmsg hook sees it, and the fallback's chain
/// judges it like any packet of the PU. So it reaches a peer an ACL
/// accepts and no other; a process outside every PU is untouched.
fn raw_tcp_and_udp_from_a_pu_follow_its_acls(datapath: Datapath, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let acl_peer = UdpReceiver::start(&w.hosts.b, w.addr(ACL_PEER))?;
    let other = UdpReceiver::start(&w.hosts.b, w.addr(OTHER))?;
    let capture = Capture::start(&w.hosts.b, &w.hosts.b_end.ifname)?;
    let agent = w.start(datapath, &web_config(&w))?;
    w.raw_send(
        true,
        "udp",
        w.addr(ACL_PEER),
        &["--payload", "raw-to-acl-peer"],
    )?;
    assert!(
        acl_peer.wait_for(b"raw-to-acl-peer", COMES).is_some(),
        "a UDP accept ACL: the raw datagram arrives\n{}",
        agent.log()
    );
    w.raw_send(true, "udp", w.addr(OTHER), &["--payload", "raw-to-other"])?;
    w.raw_send(false, "udp", w.addr(OTHER), &["--payload", "raw-outsider"])?;
    assert!(
        other.wait_for(b"raw-outsider", COMES).is_some(),
        "outside every PU: untouched"
    );
    assert!(
        other.wait_for(b"raw-to-other", STAYS_AWAY).is_none(),
        "no ACL: the PU's raw datagram must not arrive"
    );
    w.raw_send(true, "tcp-syn", w.addr(ACL_PEER), &["--sport", "41001"])?;
    assert!(
        World::syn_arrives(&capture, 41001, COMES),
        "a TCP accept ACL: the raw SYN arrives"
    );
    w.raw_send(false, "tcp-syn", w.addr(OTHER), &["--sport", "41002"])?;
    assert!(
        World::syn_arrives(&capture, 41002, COMES),
        "outside every PU: untouched"
    );
    w.raw_send(true, "tcp-syn", w.addr(OTHER), &["--sport", "41003"])?;
    assert!(
        !World::syn_arrives(&capture, 41003, STAYS_AWAY),
        "no ACL: the PU's raw SYN must not arrive"
    );
    Ok(())
}

/// ICMP "answer" types (an echo reply, a destination unreachable) leave a
/// PU only as the fallback lets them: when conntrack knows their flow
/// (ESTABLISHED, RELATED), or an ACL accepts them — never by their type
/// alone, which a raw socket writes as it likes. IPv6's ICMPv6 is
/// accepted whatever (SPEC).
fn icmp_answers_from_a_pu_pass_only_for_flows_conntrack_knows(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let capture = Capture::start(&w.hosts.b, &w.hosts.b_end.ifname)?;
    let agent = w.start(datapath, &web_config(&w))?;
    let answered = |kind: &str, to: Role, marker: &str, in_pu: bool| -> Result<bool> {
        let to = SocketAddr::new(w.ip(to), 0);
        w.raw_send(in_pu, kind, to, &["--payload", marker])?;
        let within = match (in_pu, family) {
            (true, Family::V4) => STAYS_AWAY,
            _ => COMES,
        };
        Ok(carried(&capture, marker.as_bytes(), within))
    };
    let made_up = family == Family::V6;
    assert_eq!(
        answered("echo-reply", OTHER, "made-up-echo-reply", true)?,
        made_up,
        "an echo reply nobody asked for (ICMPv6: accepted)\n{}",
        agent.log()
    );
    assert_eq!(
        answered("unreachable", OTHER, "made-up-unreachable", true)?,
        made_up,
        "an error about nothing the PU received (ICMPv6: accepted)"
    );
    assert!(
        answered("echo-reply", OTHER, "outsider-echo-reply", false)?,
        "outside every PU: untouched"
    );
    // `b` pings `a` (the kernel answers); conntrack now knows the echo
    // flow, so the PU's own reply to that request is ESTABLISHED.
    let a_ip = w.hosts.a_end.ip(family);
    assert_eq!(
        w.hosts.b.run(|| ping(a_ip, PingSocket::Raw))?,
        Outcome::Exchanged,
        "b pings a"
    );
    let id = (std::process::id() as u16).to_string();
    let to = SocketAddr::new(w.hosts.b_end.ip(family), 0);
    w.raw_send(
        true,
        "echo-reply",
        to,
        &["--id", &id, "--payload", "known-echo-reply"],
    )?;
    assert!(
        carried(&capture, b"known-echo-reply", COMES),
        "an echo reply to a request conntrack saw: ESTABLISHED"
    );
    Ok(())
}
