//! A linux-process PU whose cgroup is a net_cls cgroup v1 (`[cgroups]
//! version = "v1"`), on the iptables datapath: the agent gives it a class
//! id, its processes' traffic is matched by that id, and the PU's ACLs and
//! the trap apply exactly as to a cgroup v2 PU; a process outside is
//! untouched; an update keeps the id; the id is reset when the agent
//! stops, and after a crash by `cleanup`. The eBPF datapath refuses such a PU by name, and `auto`
//! picks iptables for it.
//!
//! The world is the behaviour suite's ([`enforcer_tests::world`]): host
//! `a` runs the agent, host `b` the peers (target, ACL peer, other,
//! excluded), with the PU's cgroup a fresh child of a private mount of the
//! net_cls hierarchy ([`NetClsMount`]), unmounted at the end even when a
//! test fails.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netcls::NetClsMount,
    netfilter::{self, Family},
    netns::TwoHosts,
    nettool, privilege, roles,
    traffic::{Outcome, TcpEchoServer, UdpReceiver, run_nettool},
    world::{ACL_PEER, EXCLUDED, OTHER, PORT, Peer as Role, PuWorld, TARGET, index},
};
use nix::sys::signal::Signal;

/// The first class id the agent assigns: tc handle `1111:100` (the
/// seed's `0x1111` base, `100 + n`).
const FIRST_CLASS_ID: u32 = 0x1111_0064;

/// Packets of a PU's TCP connection with a target that reach user space:
/// the SYN, the SYN-ACK and the first ACK.
const HANDSHAKE: u64 = 3;

/// The test world of one family, the PU's cgroup a net_cls v1 cgroup.
/// Fields drop in order: the servers, the world (its cgroup: every
/// process in it killed, the cgroup removed), then the mount.
struct World {
    _servers: Vec<TcpEchoServer>,
    world: PuWorld,
    mount: NetClsMount,
}

impl World {
    fn new(family: Family) -> Result<Self> {
        let mount = NetClsMount::new()?;
        let hosts = TwoHosts::new()?;
        let roles = [TARGET, ACL_PEER, OTHER, EXCLUDED];
        let b_end = hosts.b_end.ip(family);
        let addrs = roles
            .iter()
            .map(|role| role.addr[index(family)].parse().expect("literal address"))
            .filter(|&addr| addr != b_end);
        roles::add_addresses(&hosts, addrs)?;
        let world = PuWorld {
            family,
            cgroup: Cgroup::new(mount.path())?,
            hosts,
        };
        let servers = roles
            .map(|role| TcpEchoServer::start(&world.hosts.b, world.addr(role)))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            _servers: servers,
            world,
            mount,
        })
    }

    /// TCP target [`TARGET`], UDP target and excluded networks, and PU
    /// `web` of the net_cls cgroup accepting TCP and UDP to [`ACL_PEER`]'s
    /// port [`PORT`] (with `acl`; without, no ACL).
    fn config_with(&self, acl: bool) -> String {
        let mut web = Pu::process_of("web", &self.world.cgroup);
        if acl {
            web = web.application_acl(
                Acl::accept("to-acl-peer", ACL_PEER.nets)
                    .tcp([PORT])
                    .udp([PORT]),
            );
        }
        Config::local_server()
            .net_cls(self.mount.path())
            .target_tcp(TARGET.nets)
            .target_udp(TARGET.nets)
            .excluded(EXCLUDED.nets)
            .pu(web)
            .to_toml()
    }

    fn config(&self) -> String {
        self.config_with(true)
    }

    fn start(&self, args: &[&str]) -> Result<Agent> {
        Agent::start_with(
            env!("CARGO_BIN_EXE_agent"),
            &self.world.hosts.a,
            None,
            args,
            &self.config(),
            |_| {},
        )
    }

    /// A nettool of a process in the PU's cgroup (`in_pu`, placed there
    /// through the v1 cgroup's `cgroup.procs`) or of host `a` outside it.
    fn nettool(&self, in_pu: bool) -> Result<Command> {
        match in_pu {
            true => self
                .world
                .cgroup
                .command_in(&self.world.hosts.a, nettool!()),
            false => self.world.hosts.a.command(nettool!()),
        }
    }

    fn connects(&self, in_pu: bool, peer: Role) -> Result<Outcome> {
        let mut cmd = self.nettool(in_pu)?;
        cmd.args(["tcp-exchange", &self.world.addr(peer).to_string()]);
        run_nettool(cmd)
    }

    /// One datagram (`sendto`); whether it got through is judged by what
    /// arrives (a refused one makes `sendto` fail).
    fn udp_send(&self, in_pu: bool, to: &UdpReceiver, payload: &str) -> Result<()> {
        let mut cmd = self.nettool(in_pu)?;
        cmd.args(["udp-send", &to.addr().to_string(), "--payload", payload]);
        run_nettool(cmd)?;
        Ok(())
    }

    fn classid(&self, dir: &Path) -> Result<u32> {
        NetClsMount::classid(dir)
    }
}

/// The PU's counters from `status`: trapped, accepted, dropped.
fn pu_counts(agent: &Agent) -> Result<(u64, u64, u64)> {
    let status = agent.status()?;
    let c = &status["counters"]["per_pu"]["web"];
    let get = |k: &str| c[k].as_u64().unwrap_or_default();
    Ok((get("trapped"), get("accepted"), get("dropped")))
}

#[test]
fn iptables_v4_a_net_cls_pu_gets_its_acls_and_the_trap() -> Result<()> {
    acls_and_trap_apply_by_class_id(Family::V4)
}

#[test]
fn iptables_v6_a_net_cls_pu_gets_its_acls_and_the_trap() -> Result<()> {
    acls_and_trap_apply_by_class_id(Family::V6)
}

fn acls_and_trap_apply_by_class_id(family: Family) -> Result<()> {
    let Some(_env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(family)?;
    // A child of the PU's cgroup made before the agent starts: it is the
    // PU's too, so it gets the class id as well.
    let worker = Cgroup::named(w.world.cgroup.path(), "worker")?;
    let acl_udp = UdpReceiver::start(&w.world.hosts.b, w.world.addr(ACL_PEER))?;
    let other_udp = UdpReceiver::start(&w.world.hosts.b, w.world.addr(OTHER))?;
    let mut agent = w.start(&Datapath::Iptables.args())?;

    let status = agent.status()?;
    let cgroups = &status["datapath"]["cgroups"];
    assert_eq!(cgroups["flavour"], "net-cls-v1", "{status:#}");
    assert_eq!(
        cgroups["mount"].as_str(),
        w.mount.path().to_str(),
        "{status:#}"
    );
    assert!(
        cgroups["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("cgroups.version = v1"),
        "{status:#}"
    );
    assert_eq!(w.classid(w.world.cgroup.path())?, FIRST_CLASS_ID);
    assert_eq!(w.classid(worker.path())?, FIRST_CLASS_ID);
    let mangle = netfilter::save(&w.world.hosts.a, family, "mangle")?;
    let hook = format!("-A TRI-Pid-App -m cgroup --cgroup {FIRST_CLASS_ID} ");
    assert!(
        mangle.contains(&hook),
        "the hook matches the class id:\n{mangle}"
    );

    // The PU's ACLs decide for peers outside the targets.
    assert_eq!(
        w.connects(true, ACL_PEER)?,
        Outcome::Exchanged,
        "accept ACL"
    );
    let blocked = w.connects(true, OTHER)?;
    assert!(blocked.is_blocked(), "no ACL: blocked, got {blocked:?}");
    assert_eq!(w.connects(false, OTHER)?, Outcome::Exchanged, "outsider");
    let wait = Duration::from_secs(2);
    w.udp_send(true, &acl_udp, "pu-to-acl-peer")?;
    assert!(
        acl_udp.wait_for(b"pu-to-acl-peer", wait).is_some(),
        "UDP accept ACL"
    );
    w.udp_send(true, &other_udp, "pu-to-other")?;
    w.udp_send(false, &other_udp, "outsider-to-other")?;
    assert!(other_udp.wait_for(b"outsider-to-other", wait).is_some());
    assert!(
        other_udp
            .wait_for(b"pu-to-other", Duration::from_millis(300))
            .is_none(),
        "no ACL: the PU's datagram must not arrive"
    );
    assert_eq!(w.world.kernel_queued()?, 0, "no ACL traffic is trapped");
    // The excluded peer is never touched.
    assert_eq!(w.connects(true, EXCLUDED)?, Outcome::Exchanged);
    assert_eq!(w.world.kernel_queued()?, 0);

    // A target's handshake is trapped once and the connection proceeds.
    assert_eq!(w.connects(true, TARGET)?, Outcome::Exchanged);
    assert_eq!(w.world.kernel_queued()?, HANDSHAKE);
    // A process outside the PU: only its SYN-ACK, by the global rule.
    assert_eq!(w.connects(false, TARGET)?, Outcome::Exchanged);
    assert_eq!(w.world.kernel_queued()?, HANDSHAKE + 1);

    // And a process in the child cgroup is the PU's.
    let mut cmd = worker.command_in(&w.world.hosts.a, nettool!())?;
    cmd.args(["tcp-exchange", &w.world.addr(OTHER).to_string()]);
    let blocked = run_nettool(cmd)?;
    assert!(
        blocked.is_blocked(),
        "child cgroup: blocked, got {blocked:?}"
    );

    let (trapped, accepted, dropped) = pu_counts(&agent)?;
    assert_eq!(trapped, 1, "one set-up trapped");
    assert!(accepted >= 2, "accepted {accepted}");
    assert!(dropped >= 2, "dropped {dropped}");

    // An update (a reload without the ACL) keeps the class id and the
    // hook; the new policy applies.
    agent.reload(&w.config_with(false))?;
    assert_eq!(agent.reloads()?.applied, 1, "{:?}", agent.reloads()?);
    assert_eq!(w.classid(w.world.cgroup.path())?, FIRST_CLASS_ID);
    let blocked = w.connects(true, ACL_PEER)?;
    assert!(blocked.is_blocked(), "the ACL is gone: got {blocked:?}");
    assert_eq!(w.connects(false, ACL_PEER)?, Outcome::Exchanged);

    // Stopping the agent resets the class ids it wrote.
    let status = agent.stop_with(Signal::SIGTERM)?;
    assert!(status.success(), "{status}");
    assert_eq!(w.classid(w.world.cgroup.path())?, 0);
    assert_eq!(w.classid(worker.path())?, 0);
    Ok(())
}

/// After a crash the class id stays on the cgroup; `cleanup` resets it
/// from the instance's record.
#[test]
fn iptables_cleanup_after_a_crash_resets_the_class_id() -> Result<()> {
    let Some(_env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(Family::V4)?;
    let mut agent = w.start(&Datapath::Iptables.args())?;
    assert_eq!(w.classid(w.world.cgroup.path())?, FIRST_CLASS_ID);
    agent.stop_with(Signal::SIGKILL)?;
    assert_eq!(
        w.classid(w.world.cgroup.path())?,
        FIRST_CLASS_ID,
        "a killed agent resets nothing"
    );
    agent.cleanup()?;
    assert_eq!(w.classid(w.world.cgroup.path())?, 0);
    Ok(())
}

/// The eBPF datapath refuses a net_cls PU, naming it; `auto` picks
/// iptables for it and says why.
#[test]
fn ebpf_refuses_a_net_cls_pu_and_auto_picks_iptables() -> Result<()> {
    let Some(_env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(Family::V4)?;
    let err = w
        .start(&Datapath::Ebpf.args())
        .err()
        .expect("the eBPF datapath must refuse a net_cls PU");
    let message = format!("{err:#}");
    assert!(
        message.contains(
            "PU web: a net_cls (cgroup v1) cgroup ([cgroups] version = \"v1\") is not \
             supported by the ebpf datapath"
        ),
        "{message}"
    );
    assert_eq!(
        w.classid(w.world.cgroup.path())?,
        0,
        "a refused start leaves no class id"
    );

    let agent = w.start(&["--datapath", "auto"])?;
    let status = agent.status()?;
    assert_eq!(status["datapath"]["kind"], "iptables", "{status:#}");
    let reason = status["datapath"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("net_cls"), "auto must say why: {reason}");
    assert_eq!(w.connects(true, ACL_PEER)?, Outcome::Exchanged);
    assert!(w.connects(true, OTHER)?.is_blocked());
    Ok(())
}
