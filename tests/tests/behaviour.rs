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

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    netfilter::{self, Backend, Family},
    netns::{TwoHosts, output_ok},
    nettool, privilege,
    traffic::{Outcome, TcpEchoServer, UdpReceiver, run_nettool},
};
use nix::sys::signal::Signal;

const PORT: u16 = 7000;

/// A peer's role: its address and its network, in each family.
#[derive(Debug, Clone, Copy)]
struct Role {
    /// The peer's address: IPv4, IPv6.
    addr: [&'static str; 2],
    /// The network the config names for the role: IPv4, IPv6.
    nets: Nets,
}

/// One network of each family, as the config writes them: IPv4, IPv6.
type Nets = [&'static str; 2];

const TARGET: Role = Role {
    addr: ["10.1.0.2", "fd00:1::2"],
    nets: ["10.1.0.0/24", "fd00:1::/64"],
};
const ACL_PEER: Role = Role {
    addr: ["10.2.0.2", "fd00:2::2"],
    nets: ["10.2.0.0/16", "fd00:2::/64"],
};
const OTHER: Role = Role {
    addr: ["10.3.0.2", "fd00:3::2"],
    nets: ["10.3.0.0/16", "fd00:3::/64"],
};
const EXCLUDED: Role = Role {
    addr: ["10.9.0.2", "fd00:9::2"],
    nets: ["10.9.0.0/16", "fd00:9::/64"],
};
/// Networks holding every peer above, the excluded one included.
const EVERY_PEER: Nets = ["10.0.0.0/8", "fd00::/16"];

/// The index of a family's entry in [`Role`] and [`Nets`].
fn index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// Runs each listed test body once per datapath — and once more with
/// `--datapath auto` on a "kernel" without `bpf(2)`, where the agent must
/// fall back to iptables and the same behaviour must hold, and once more
/// with the iptables datapath on the legacy iptables flavour (the others
/// detect nf_tables) — and, in each, once per address family:
/// `ebpf::v4::name`, `ebpf::v6::name`, …
macro_rules! on_every_datapath_and_family {
    ($($name:ident),+ $(,)?) => {
        on_every_datapath_and_family!(
            @datapaths [$($name),+]
            ebpf Ebpf, iptables Iptables, auto_without_bpf AutoWithoutBpf,
            iptables_legacy IptablesLegacy
        );
    };
    (@datapaths $names:tt $($module:ident $datapath:ident),+) => {
        $(mod $module {
            on_every_datapath_and_family!(@families $names $datapath);
        })+
    };
    (@families [$($name:ident),+] $datapath:ident) => {
        mod v4 {
            $(#[test] fn $name() -> anyhow::Result<()> {
                crate::$name(crate::Datapath::$datapath, crate::Family::V4)
            })+
        }
        mod v6 {
            $(#[test] fn $name() -> anyhow::Result<()> {
                crate::$name(crate::Datapath::$datapath, crate::Family::V6)
            })+
        }
    };
}

on_every_datapath_and_family!(
    excluded_traffic_is_never_trapped_nor_dropped,
    target_syn_is_trapped_once_and_the_connection_proceeds,
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
on_every_datapath_and_family!(
    @datapaths [
        target_syn_is_trapped_once_and_the_connection_proceeds,
        sigint_and_sigterm_leave_nothing_behind
    ]
    ebpf_legacy EbpfLegacy
);

/// The test world of one family: hosts, peers listening on every role's
/// address, the PU's cgroup.
struct World {
    family: Family,
    cgroup: Cgroup,
    _servers: Vec<TcpEchoServer>,
    hosts: TwoHosts,
}

impl World {
    fn new(env: &privilege::Env, family: Family) -> Result<Self> {
        let hosts = TwoHosts::new()?;
        let mut servers = Vec::new();
        let i = index(family);
        for role in [TARGET, ACL_PEER, OTHER, EXCLUDED] {
            // The target's address is `b`'s end of the veth itself; the
            // others are added to it, with a route on `a` to their network.
            if role.addr != TARGET.addr {
                let (flag, host_prefix) = match family {
                    Family::V4 => ("-4", 32),
                    Family::V6 => ("-6", 128),
                };
                let addr = format!("{}/{host_prefix}", role.addr[i]);
                let mut add = vec![flag, "addr", "add", &addr, "dev", &hosts.b_end.ifname];
                if family == Family::V6 {
                    // Usable at once, without duplicate address detection.
                    add.push("nodad");
                }
                hosts.b.ip(&add)?;
                hosts.a.ip(&[
                    flag,
                    "route",
                    "add",
                    role.nets[i],
                    "dev",
                    &hosts.a_end.ifname,
                ])?;
            }
            let peer = SocketAddr::new(role.addr[i].parse()?, PORT);
            servers.push(TcpEchoServer::start(&hosts.b, peer)?);
        }
        Ok(Self {
            family,
            cgroup: Cgroup::new(&env.cgroup2)?,
            _servers: servers,
            hosts,
        })
    }

    /// A role's address in this world's family.
    fn ip(&self, role: Role) -> IpAddr {
        role.addr[index(self.family)]
            .parse()
            .expect("literal address")
    }

    /// A role's service: its address in this world's family, [`PORT`].
    fn addr(&self, role: Role) -> SocketAddr {
        SocketAddr::new(self.ip(role), PORT)
    }

    /// A role's network in this world's family, as the config writes it.
    fn net(&self, role: Role) -> &'static str {
        role.nets[index(self.family)]
    }

    /// The PU's cgroup, relative to the cgroup v2 mount.
    fn cgroup_rel(&self) -> String {
        cgroup_rel(&self.cgroup)
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
        let mut cmd = self.hosts.a.command(nettool!())?;
        cmd.args(["tcp-exchange", &self.addr(peer).to_string()]);
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

/// A cgroup's path relative to the cgroup v2 mount.
fn cgroup_rel(cgroup: &Cgroup) -> String {
    cgroup
        .path()
        .file_name()
        .expect("cgroup dir name")
        .to_string_lossy()
        .into_owned()
}

/// A TOML list of the networks of both families.
fn toml_list(nets: &[Nets]) -> String {
    let quoted: Vec<String> = nets.iter().flatten().map(|n| format!("\"{n}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The config: TCP targets `target_tcp`, the UDP target and excluded
/// networks of [`TARGET`] and [`EXCLUDED`], in both families, and the
/// given PUs.
fn config(target_tcp: &[Nets], pus: &str) -> String {
    format!(
        "mode = \"local-server\"\n\
         [networks]\n\
         target_tcp = {}\n\
         target_udp = {}\n\
         excluded = {}\n\
         {pus}",
        toml_list(target_tcp),
        toml_list(&[TARGET.nets]),
        toml_list(&[EXCLUDED.nets]),
    )
}

/// A linux-process PU with an accept ACL for TCP and UDP port 7000 to
/// `acl`'s networks, both families.
fn pu(id: &str, cgroup: &str, acl: Nets) -> String {
    format!(
        "[[pus]]\n\
         id = \"{id}\"\n\
         kind = \"linux-process\"\n\
         cgroup = \"{cgroup}\"\n\
         [[pus.application_acls]]\n\
         networks = {}\n\
         protocols = [\"tcp\", \"udp\"]\n\
         ports = [{PORT}]\n\
         action = \"accept\"\n\
         policy_id = \"to-acl-peer\"\n",
        toml_list(&[acl])
    )
}

/// The usual config: TCP target [`TARGET`], one PU `web` whose ACL
/// accepts [`ACL_PEER`].
fn web_config(w: &World) -> String {
    config(&[TARGET.nets], &pu("web", &w.cgroup_rel(), ACL_PEER.nets))
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
        &config(&[EVERY_PEER], &pu("web", &w.cgroup_rel(), ACL_PEER.nets)),
    )?;
    // The excluded peer is inside the target networks too: exclusion wins.
    assert_eq!(w.pu_connects(EXCLUDED)?, Outcome::Exchanged);
    assert_eq!(w.outsider_connects(EXCLUDED)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 0, "nothing may reach user space");
    assert_eq!(pu_counts(&agent.status()?, "web")?, (0, 0, 0));
    // And the target networks do hold it but for the exclusion: the
    // target peer beside it is trapped.
    assert_eq!(w.pu_connects(TARGET)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 1, "the target's SYN is trapped");
    Ok(())
}

fn target_syn_is_trapped_once_and_the_connection_proceeds(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let agent = w.start(datapath, &web_config(&w))?;
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
    let acl = |nets: Nets, action: &str, id: &str| {
        format!(
            "[[pus.application_acls]]
networks = {}
protocols = [\"tcp\"]
ports = [{PORT}]
\
             action = \"{action}\"
policy_id = \"{id}\"
",
            toml_list(&[nets])
        )
    };
    let wide_reject = acl(EVERY_PEER, "reject", "wide-reject");
    let narrow_accept = acl(ACL_PEER.nets, "accept", "narrow-accept");
    for (first, second) in [
        (&wide_reject, &narrow_accept),
        (&narrow_accept, &wide_reject),
    ] {
        let head = format!(
            "[[pus]]
id = \"web\"
kind = \"linux-process\"
cgroup = \"{}\"
",
            w.cgroup_rel()
        );
        let agent = w.start(datapath, &config(&[TARGET.nets], &(head + first + second)))?;
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
    let pus = pu("web", &w.cgroup_rel(), ACL_PEER.nets);
    let agent = w.start(datapath, &config(&[TARGET.nets], &pus))?;
    assert!(w.pu_connects(OTHER)?.is_blocked());
    // The other peer's network becomes a target: its set-up is now
    // trapped (and, in this slice, accepted by the agent).
    agent.reload(&config(&[TARGET.nets, OTHER.nets], &pus))?;
    assert_eq!(w.pu_connects(OTHER)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 1);
    // And back: the target's network is no target any more, and has no
    // ACL.
    agent.reload(&config(&[OTHER.nets], &pus))?;
    assert!(w.pu_connects(TARGET)?.is_blocked());
    assert_eq!(w.pu_connects(OTHER)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 2);
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
    let send = |to: &UdpReceiver, payload: &str, in_pu: bool| -> Result<Outcome> {
        let mut cmd = if in_pu {
            w.cgroup.command_in(&w.hosts.a, nettool!())?
        } else {
            w.hosts.a.command(nettool!())?
        };
        cmd.args(["udp-send", &to.addr().to_string(), "--payload", payload]);
        run_nettool(cmd)
    };
    assert_eq!(send(&acl_peer, "pu-to-acl-peer", true)?, Outcome::Exchanged);
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
        send(&target, "outsider-to-target", false)?,
        Outcome::Exchanged
    );
    assert_eq!(w.kernel_queued()?, 0, "outside every PU: not trapped");
    assert_eq!(send(&target, "pu-to-target", true)?, Outcome::Exchanged);
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
    let icmp_acl = |nets: Nets, action: &str, id: &str| {
        format!(
            "[[pus.application_acls]]\n\
             networks = {}\n\
             protocols = [\"icmp\", \"icmpv6\"]\n\
             action = \"{action}\"\n\
             policy_id = \"{id}\"\n",
            toml_list(&[nets])
        )
    };
    let pus = pu("web", &w.cgroup_rel(), ACL_PEER.nets)
        + &icmp_acl(ACL_PEER.nets, "accept", "ping-acl-peer")
        + &icmp_acl(OTHER.nets, "reject", "no-ping-other");
    let _agent = w.start(datapath, &config(&[TARGET.nets], &pus))?;
    // Ping sockets for every group, in host `a`'s namespace only.
    output_ok(
        w.hosts
            .a
            .command("sysctl")?
            .args(["-w", "net.ipv4.ping_group_range=0 2147483647"]),
    )?;
    let ping_from = |peer: Role, in_pu: bool, dgram: bool| -> Result<Outcome> {
        let mut cmd = if in_pu {
            w.cgroup.command_in(&w.hosts.a, nettool!())?
        } else {
            w.hosts.a.command(nettool!())?
        };
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
    let second_rel = cgroup_rel(&second);
    let from_second = |peer: Role| w.connects_from(&second, peer);
    let web = pu("web", &w.cgroup_rel(), ACL_PEER.nets);
    let agent = w.start(datapath, &config(&[TARGET.nets], &web))?;
    assert_eq!(from_second(OTHER)?, Outcome::Exchanged, "not a PU yet");

    // Add a PU.
    let both = web.clone() + &pu("batch", &second_rel, ACL_PEER.nets);
    agent.reload(&config(&[TARGET.nets], &both))?;
    assert!(from_second(OTHER)?.is_blocked(), "batch is enforced now");
    assert!(agent.status()?["counters"]["per_pu"]["batch"].is_object());

    // Change it: batch may now reach the other peer, and no longer the
    // ACL peer.
    let changed = web.clone() + &pu("batch", &second_rel, OTHER.nets);
    agent.reload(&config(&[TARGET.nets], &changed))?;
    assert_eq!(
        from_second(OTHER)?,
        Outcome::Exchanged,
        "changed ACL applies"
    );
    assert!(from_second(ACL_PEER)?.is_blocked(), "old ACL is gone");
    assert!(w.pu_connects(OTHER)?.is_blocked(), "web unchanged");

    // Remove it.
    agent.reload(&config(&[TARGET.nets], &web))?;
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
    assert_eq!(w.kernel_queued()?, 1);
    assert!(second.stop_with(Signal::SIGTERM)?.success());
    assert_nothing_left(&w, &env.bpffs, first.instance())?;
    Ok(())
}
