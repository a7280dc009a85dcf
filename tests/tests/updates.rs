//! Gapless policy updates and revocation (SPEC, `update`; issue 4 item 4),
//! on both datapaths, through the real agent and SIGHUP.
//!
//! Two policies for one linux-process PU, each peer on host `b` at port
//! 7000:
//! - `10.2.0.2` is allowed by both A and B;
//! - `10.3.0.2` by neither;
//! - `10.4.0.2` by A only.
//!
//! While the PU's policy flips between A and B a hundred times, one
//! connection to the peer both allow keeps exchanging data and must never
//! fail; new connections to that peer must all succeed, to the peer
//! neither allows all fail. Then: a connection only A allowed is cut when
//! B comes in.
//!
//! The network side too, on both families: a peer's connection to the
//! PU's listening port that only the old network ACLs accepted is cut by
//! the update, while another peer's, which both accept, goes on.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, ChildStdout, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::Family,
    netns::TwoHosts,
    nettool, on_both_datapaths, privilege,
    roles::{self, ACL_PEER, TARGET_NETS},
    traffic::{
        Outcome, PuEchoServer, TEST_UID, TcpEchoServer, Transport, become_user, run_nettool,
        tcp_exchange_from, udp_exchange_from,
    },
    world::{self, PuWorld},
};

const PORT: u16 = 7000;
const BOTH: &str = "10.2.0.2";
const NEITHER: &str = "10.3.0.2";
const A_ONLY: &str = "10.4.0.2";
const UPDATES: usize = 100;
/// How long a cut connection may take to notice (it is aborted at once;
/// this leaves room for a loaded machine).
const CUT_WITHIN: Duration = Duration::from_secs(5);

on_both_datapaths!(
    a_hundred_updates_leave_no_gap,
    a_connection_only_the_old_policy_allowed_is_cut,
    an_update_cuts_nothing_of_another_pu,
);

/// The network side, on both families as well (its own module: the
/// matrices above and here would both make `ebpf` and `iptables`).
mod incoming {
    enforcer_tests::on_both_datapaths_and_families!(
        an_incoming_connection_only_the_old_policy_allowed_is_cut
    );
}

/// The same cut for the PU kinds found without a cgroup — a uid PU (its
/// user's processes, its listening port) and the host PU (every process
/// of the namespace no other PU has; no port set: the connections peers
/// made to it are found by where its sockets listen) — on both families.
mod kinds {
    enforcer_tests::on_both_datapaths_and_families!(
        a_uid_pus_connection_only_the_old_policy_allowed_is_cut,
        a_uid_pus_incoming_connection_only_the_old_policy_allowed_is_cut,
        a_host_pus_connection_only_the_old_policy_allowed_is_cut,
        a_host_pus_incoming_connection_only_the_old_policy_allowed_is_cut,
        a_host_pus_incoming_udp_flow_only_the_old_policy_allowed_is_cut,
    );
}

/// The PU's listening port, for the network side.
const PU_PORT: u16 = 8080;
/// A peer role only the old policy's network ACLs accept ([`roles`]).
const OLD_ONLY: u8 = 4;

struct World {
    cgroup: Cgroup,
    _servers: Vec<TcpEchoServer>,
    hosts: TwoHosts,
}

impl World {
    fn new(env: &privilege::Env) -> Result<Self> {
        let hosts = TwoHosts::new()?;
        let mut servers = Vec::new();
        for peer in [BOTH, NEITHER, A_ONLY] {
            let ifname = &hosts.b_end.ifname;
            hosts
                .b
                .ip(&["addr", "add", &format!("{peer}/32"), "dev", ifname])?;
            let net = format!("{}/16", peer.replace(".0.2", ".0.0"));
            hosts
                .a
                .ip(&["route", "add", &net, "dev", &hosts.a_end.ifname])?;
            servers.push(TcpEchoServer::start(&hosts.b, addr(peer))?);
        }
        Ok(Self {
            cgroup: Cgroup::new(&env.cgroup2)?,
            _servers: servers,
            hosts,
        })
    }

    fn start(&self, datapath: Datapath, config: &str) -> Result<Agent> {
        let agent = Agent::start(env!("CARGO_BIN_EXE_agent"), &self.hosts.a, datapath, config)?;
        let kind = agent.status()?["datapath"]["kind"].clone();
        ensure!(kind == datapath.expected(), "datapath in use: {kind}");
        Ok(agent)
    }

    /// One TCP exchange from a new process inside the PU.
    fn pu_connects(&self, peer: &str) -> Result<Outcome> {
        let mut cmd = self.cgroup.command_in(&self.hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &addr(peer).to_string()]);
        run_nettool(cmd)
    }

    /// A long-lived connection from a process inside the PU.
    fn stream(&self, peer: &str) -> Result<Stream> {
        self.stream_from(&self.cgroup, peer)
    }

    /// A long-lived connection from a process inside `cgroup`.
    fn stream_from(&self, cgroup: &Cgroup, peer: &str) -> Result<Stream> {
        let cmd = cgroup.command_in(&self.hosts.a, nettool!())?;
        Stream::start(cmd, addr(peer), None)
    }
}

fn addr(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("literal address"), PORT)
}

/// A `nettool tcp-stream` child and its report.
struct Stream {
    peer: String,
    child: Child,
    stdout: BufReader<ChildStdout>,
}

/// What `nettool tcp-stream` reported, and whether it ended well.
#[derive(Debug)]
struct Report {
    ok: bool,
    fields: HashMap<String, String>,
}

impl Report {
    fn number(&self, key: &str) -> u64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Stream {
    /// Starts `nettool tcp-stream` to `to`, from `from` if given, with
    /// `cmd` (a `nettool` placed in a namespace, maybe a cgroup); returns
    /// once it connected. Its peer, for messages, is `from` when given (a
    /// peer connecting to the PU), else `to`.
    fn start(
        mut cmd: std::process::Command,
        to: SocketAddr,
        from: Option<std::net::IpAddr>,
    ) -> Result<Self> {
        cmd.args(["tcp-stream", &to.to_string(), "--seconds", "300"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(from) = from {
            cmd.args(["--from", &from.to_string()]);
        }
        let peer = from.unwrap_or(to.ip()).to_string();
        let mut child = cmd.spawn().context("starting nettool tcp-stream")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        if first.trim() != "connected" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the stream to {peer} did not connect: {first}");
        }
        Ok(Self {
            peer,
            child,
            stdout,
        })
    }

    /// Still exchanging?
    fn running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    /// Waits up to `within` for the stream to end by itself.
    fn ended_within(&mut self, within: Duration) -> Result<Option<Report>> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !self.running()? {
                return self.report().map(Some);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }

    /// Tells the stream to stop (closes its stdin) and reads its report.
    fn finish(mut self) -> Result<Report> {
        drop(self.child.stdin.take());
        self.report()
    }

    fn report(&mut self) -> Result<Report> {
        let status = self.child.wait()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let fields = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(Report {
            ok: status.success(),
            fields,
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A PU whose application ACLs accept TCP/7000 to each of `networks`.
fn config(cgroup: &Cgroup, networks: &[&str]) -> String {
    Config::local_server()
        .target_tcp(["10.1.0.0/24"])
        .target_udp(["10.1.0.0/24"])
        .pu(Pu::process_of("web", cgroup).accepting_tcp_to(networks, PORT))
        .to_toml()
}

fn policy_a(cgroup: &Cgroup) -> String {
    config(cgroup, &["10.2.0.0/16", "10.4.0.0/16"])
}

fn policy_b(cgroup: &Cgroup) -> String {
    config(cgroup, &["10.2.0.0/16"])
}

/// Outcomes of new connections tried over and over from a thread, until
/// stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(world: &Arc<World>, peer: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (w, s, o) = (world.clone(), stop.clone(), outcomes.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let outcome = w
                    .pu_connects(peer)
                    .unwrap_or_else(|e| Outcome::Failed(format!("harness: {e:#}")));
                o.lock().expect("outcomes").push(outcome);
            }
        });
        Self {
            stop,
            outcomes,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.outcomes.lock().expect("outcomes"))
    }
}

fn a_hundred_updates_leave_no_gap(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = Arc::new(World::new(&env)?);
    let (a, b) = (policy_a(&w.cgroup), policy_b(&w.cgroup));
    let agent = w.start(datapath, &a)?;
    let stream = w.stream(BOTH)?;
    let allowed = Prober::start(&w, BOTH);
    let denied = Prober::start(&w, NEITHER);

    let started = Instant::now();
    let before = agent.reloads()?;
    for i in 0..UPDATES {
        agent.reload(if i % 2 == 0 { &b } else { &a })?;
    }
    let reloads = agent.reloads()?;
    let took = started.elapsed();
    let (allowed, denied) = (allowed.finish(), denied.finish());
    let report = stream.finish()?;

    assert_eq!(
        (
            reloads.applied - before.applied,
            reloads.failed,
            reloads.refused
        ),
        (UPDATES as u64, before.failed, before.refused),
        "every update applied: {reloads:?}\n{}",
        agent.log()
    );
    let status = agent.status()?;
    assert_eq!(status["pus"][0]["id"], "web");
    assert!(
        report.ok && !report.fields.contains_key("error"),
        "the connection both policies allow failed during the updates: {report:?}"
    );
    assert!(
        report.number("rounds") > UPDATES as u64,
        "it kept exchanging data: {report:?}"
    );
    eprintln!(
        "{datapath:?}: {UPDATES} updates in {took:?}; stream {report:?}; \
         new connections allowed by both {}, denied by both {}",
        allowed.len(),
        denied.len()
    );
    // A dropped segment shows as a retransmission (or a stall of at least
    // the minimal RTO, 200 ms); none may happen to a connection both
    // policies allow.
    assert_eq!(
        report.number("retransmits"),
        0,
        "segments of the connection were lost: {report:?}"
    );
    assert!(
        allowed.len() >= 5 && denied.len() >= 2,
        "too few probes during the updates: {} allowed, {} denied",
        allowed.len(),
        denied.len()
    );
    let failed: Vec<&Outcome> = allowed
        .iter()
        .filter(|o| **o != Outcome::Exchanged)
        .collect();
    assert!(
        failed.is_empty(),
        "new connections both policies allow failed: {failed:?} of {}",
        allowed.len()
    );
    let through: Vec<&Outcome> = denied.iter().filter(|o| !o.is_blocked()).collect();
    assert!(
        through.is_empty(),
        "new connections both policies deny got through: {through:?} of {}",
        denied.len()
    );
    Ok(())
}

fn a_connection_only_the_old_policy_allowed_is_cut(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let (a, b) = (policy_a(&w.cgroup), policy_b(&w.cgroup));
    let agent = w.start(datapath, &a)?;
    let mut revoked = w.stream(A_ONLY)?;
    let mut kept = w.stream(BOTH)?;
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        revoked.running()? && kept.running()?,
        "both streams run under A"
    );

    agent.reload(&b)?;
    let cut = revoked.ended_within(CUT_WITHIN)?;
    let Some(cut) = cut else {
        bail!(
            "the connection to {} (allowed by A only) still runs {CUT_WITHIN:?} after B came in:\n{}",
            revoked.peer,
            agent.log()
        );
    };
    assert!(
        !cut.ok && cut.fields.contains_key("error"),
        "the cut connection must fail, not end cleanly: {cut:?}"
    );
    eprintln!("{datapath:?}: the connection only A allowed ended with {cut:?}");
    assert!(
        kept.running()?,
        "the connection both allow must go on: {:?}",
        kept.report()
    );
    let kept = kept.finish()?;
    assert!(kept.ok, "the connection both allow: {kept:?}");
    if datapath == Datapath::Iptables {
        // Mechanism: the update also forgot the flow's conntrack entry
        // (which is what cuts unconnected UDP, with no socket to abort).
        let out = w
            .hosts
            .a
            .command("conntrack")?
            .args(["-L", "-f", "ipv4", "-d", A_ONLY])
            .output()?;
        let entries = String::from_utf8_lossy(&out.stdout);
        assert!(
            entries.trim().is_empty(),
            "conntrack still has the revoked flow:\n{entries}"
        );
    }
    assert!(
        w.pu_connects(A_ONLY)?.is_blocked(),
        "a new connection to the peer only A allows is refused under B"
    );
    assert_eq!(w.pu_connects(BOTH)?, Outcome::Exchanged);
    Ok(())
}

/// Another PU's connection to a peer the updated PU may no longer reach is
/// not the update's to cut (SPEC `update`: only what the old policy alone
/// allowed, of this PU).
fn an_update_cuts_nothing_of_another_pu(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env)?;
    let other = Cgroup::new(&env.cgroup2)?;
    let two = |web: &[&str]| {
        Config::local_server()
            .target_tcp(["10.1.0.0/24"])
            .target_udp(["10.1.0.0/24"])
            .pu(Pu::process_of("web", &w.cgroup).accepting_tcp_to(web, PORT))
            .pu(Pu::process_of("api", &other).accepting_tcp_to(["10.4.0.0/16"], PORT))
            .to_toml()
    };
    let agent = w.start(datapath, &two(&["10.2.0.0/16", "10.4.0.0/16"]))?;
    let mut others = w.stream_from(&other, A_ONLY)?;
    let mut own = w.stream(A_ONLY)?;
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        own.running()? && others.running()?,
        "both PUs' streams run before the update"
    );

    agent.reload(&two(&["10.2.0.0/16"]))?;
    ensure!(
        own.ended_within(CUT_WITHIN)?.is_some(),
        "web's own connection to {A_ONLY} still runs {CUT_WITHIN:?} after its update:\n{}",
        agent.log()
    );
    assert!(
        others.running()?,
        "api's connection, allowed by api's unchanged policy, must go on: {:?}\n{}",
        others.report(),
        agent.log()
    );
    let others = others.finish()?;
    assert!(others.ok, "api's connection: {others:?}");
    Ok(())
}

/// A PU listening on TCP [`PU_PORT`] whose network ACLs accept that port
/// from each of `roles`' networks.
fn listening_config(cgroup: &Cgroup, accepted: &[u8]) -> String {
    let mut pu = Pu::process_of("web", cgroup).tcp_ports([PU_PORT]);
    for &role in accepted {
        let acl = Acl::accept(&format!("from-{role}"), roles::networks(role)).tcp([PU_PORT]);
        pu = pu.network_acl(acl);
    }
    Config::local_server()
        .target_tcp(TARGET_NETS)
        .target_udp(TARGET_NETS)
        .pu(pu)
        .to_toml()
}

/// SPEC `update`, the network side: peers connect to the PU's listening
/// port; the update's network ACLs refuse one of them. Its connection is
/// cut at once, the other peer's (accepted by both) goes on, and the
/// refused peer cannot connect again.
fn an_incoming_connection_only_the_old_policy_allowed_is_cut(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OLD_ONLY])? else {
        return Ok(());
    };
    let hosts = &stage.hosts;
    let server = SocketAddr::new(stage.server_ip(), PU_PORT);
    let _server = PuEchoServer::start(nettool!(), Transport::Tcp, &stage.cgroup, &hosts.a, server)?;
    let agent = stage.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &listening_config(&stage.cgroup, &[ACL_PEER, OLD_ONLY]),
    )?;
    let from = |role: u8| -> Result<Stream> {
        let cmd = hosts.b.command(nettool!())?;
        Stream::start(cmd, server, Some(roles::source(family, role)))
    };
    let mut revoked = from(OLD_ONLY)?;
    let mut kept = from(ACL_PEER)?;
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        revoked.running()? && kept.running()?,
        "both peers' streams run under the old policy"
    );

    agent.reload(&listening_config(&stage.cgroup, &[ACL_PEER]))?;
    let Some(cut) = revoked.ended_within(CUT_WITHIN)? else {
        bail!(
            "{datapath:?}/{family:?}: the connection from {} (accepted by the old network ACLs \
             only) still runs {CUT_WITHIN:?} after the update:\n{}",
            revoked.peer,
            agent.log()
        );
    };
    assert!(
        !cut.ok && cut.fields.contains_key("error"),
        "the cut connection must fail, not end cleanly: {cut:?}"
    );
    eprintln!(
        "{datapath:?}/{family:?}: the connection only the old policy accepted ended with {cut:?}"
    );
    assert!(
        kept.running()?,
        "the connection both policies accept must go on: {:?}\n{}",
        kept.report(),
        agent.log()
    );
    if datapath == Datapath::Iptables {
        // Mechanism: the accepted flow's conntrack entry is gone too, so
        // no later packet of it is accepted by its mark.
        let conntrack_family = match family {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        };
        let source = roles::source(family, OLD_ONLY).to_string();
        let out = hosts
            .a
            .command("conntrack")?
            .args(["-L", "-f", conntrack_family, "-s", &source])
            .output()?;
        let entries = String::from_utf8_lossy(&out.stdout);
        assert!(
            entries.trim().is_empty(),
            "conntrack still has the revoked flow:\n{entries}"
        );
    }
    let connect = |role: u8| -> Result<Outcome> {
        let source = roles::source(family, role);
        hosts
            .b
            .run(|| tcp_exchange_from(Some(source), server, b"ping"))
    };
    let again = connect(OLD_ONLY)?;
    assert!(
        again.is_blocked(),
        "a new connection from the refused peer: {again:?}"
    );
    assert_eq!(connect(ACL_PEER)?, Outcome::Exchanged);
    let kept = kept.finish()?;
    assert!(
        kept.ok && !kept.fields.contains_key("error"),
        "the connection both policies accept: {kept:?}"
    );
    Ok(())
}

/// A world for the uid and host PUs: [`PuWorld`] whose cgroup is the eBPF
/// host scope, with echo servers on `b` at [`world::PORT`] for the peer
/// both policies accept ([`world::ACL_PEER`]) and the one only the old
/// accepts ([`world::OTHER`]).
struct KindStage {
    _servers: Vec<TcpEchoServer>,
    world: PuWorld,
}

impl KindStage {
    fn new(family: Family) -> Result<Option<Self>> {
        let Some(env) = privilege::require() else {
            return Ok(None);
        };
        let world = PuWorld::new(&env, family, &[world::ACL_PEER, world::OTHER])?;
        let servers = [world::ACL_PEER, world::OTHER]
            .iter()
            .map(|&peer| TcpEchoServer::start(&world.hosts.b, world.addr(peer)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            _servers: servers,
            world,
        }))
    }

    /// A local-server config with `pu`, the scope as host scope.
    fn config(&self, pu: Pu) -> String {
        Config::local_server()
            .target_tcp(world::TARGET.nets)
            .target_udp(world::TARGET.nets)
            .host_scope(&self.world.cgroup)
            .pu(pu)
            .to_toml()
    }

    /// A long-lived connection to `peer` from a process of `a` in the
    /// scope, running as `uid` if given.
    fn stream(&self, peer: world::Peer, uid: Option<u32>) -> Result<Stream> {
        let mut cmd = self
            .world
            .cgroup
            .command_in(&self.world.hosts.a, nettool!())?;
        if let Some(uid) = uid {
            become_user(&mut cmd, uid);
        }
        Stream::start(cmd, self.world.addr(peer), None)
    }
}

/// Application ACLs accepting TCP to [`world::PORT`] of each of `peers`.
fn accepting_to(mut pu: Pu, peers: &[world::Peer]) -> Pu {
    for (i, peer) in peers.iter().enumerate() {
        pu = pu.application_acl(Acl::accept(&format!("to-{i}"), peer.nets).tcp([world::PORT]));
    }
    pu
}

/// [`a_connection_only_the_old_policy_allowed_is_cut`] for a PU made by
/// `pu` whose processes run as `uid` (root if `None`): its connection to
/// the peer only the old policy accepts is cut, the one to the peer both
/// accept goes on; and (`bystander`) a process that is not the PU's keeps
/// its connection to the same peer.
fn cut_for_kind(
    datapath: Datapath,
    family: Family,
    pu: fn() -> Pu,
    uid: Option<u32>,
    bystander: Option<u32>,
) -> Result<()> {
    let Some(stage) = KindStage::new(family)? else {
        return Ok(());
    };
    let old = stage.config(accepting_to(pu(), &[world::ACL_PEER, world::OTHER]));
    let new = stage.config(accepting_to(pu(), &[world::ACL_PEER]));
    let agent = stage
        .world
        .start(env!("CARGO_BIN_EXE_agent"), datapath, &old)?;
    let mut revoked = stage.stream(world::OTHER, uid)?;
    let mut kept = stage.stream(world::ACL_PEER, uid)?;
    let mut other = bystander
        .map(|u| stage.stream(world::OTHER, Some(u)))
        .transpose()?;
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        revoked.running()? && kept.running()?,
        "both streams run under the old policy"
    );

    agent.reload(&new)?;
    let Some(cut) = revoked.ended_within(CUT_WITHIN)? else {
        bail!(
            "{datapath:?}/{family:?}: the connection to {} (allowed by the old policy only) \
             still runs {CUT_WITHIN:?} after the update:\n{}",
            revoked.peer,
            agent.log()
        );
    };
    assert!(
        !cut.ok && cut.fields.contains_key("error"),
        "the cut connection must fail, not end cleanly: {cut:?}"
    );
    assert!(
        kept.running()?,
        "the connection both policies allow must go on: {:?}\n{}",
        kept.report(),
        agent.log()
    );
    if let Some(other) = &mut other {
        assert!(
            other.running()?,
            "a process that is not the PU's keeps its connection: {:?}\n{}",
            other.report(),
            agent.log()
        );
    }
    let kept = kept.finish()?;
    assert!(kept.ok, "the connection both policies allow: {kept:?}");
    Ok(())
}

fn uid_pu() -> Pu {
    Pu::uid("user", TEST_UID)
}

fn a_uid_pus_connection_only_the_old_policy_allowed_is_cut(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    // Root's connection to the same peer is no PU's: untouched.
    cut_for_kind(datapath, family, uid_pu, Some(TEST_UID), Some(0))
}

fn a_host_pus_connection_only_the_old_policy_allowed_is_cut(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    cut_for_kind(datapath, family, || Pu::host("host"), None, None)
}

/// [`an_incoming_connection_only_the_old_policy_allowed_is_cut`] for a
/// uid PU: its user's server on the PU's port.
fn a_uid_pus_incoming_connection_only_the_old_policy_allowed_is_cut(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let pu = || Pu::uid("user", TEST_UID).tcp_ports([PU_PORT]);
    incoming_cut_for_kind(datapath, family, pu, Some(TEST_UID))
}

/// [`an_incoming_connection_only_the_old_policy_allowed_is_cut`] for the
/// host PU, which has no port set: its network ACLs judge whatever peers
/// connect to, and the cut finds the connections peers made by the
/// server's listening socket.
fn a_host_pus_incoming_connection_only_the_old_policy_allowed_is_cut(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    incoming_cut_for_kind(datapath, family, || Pu::host("host"), None)
}

/// Peers connect to a server of the PU made by `pu` (on [`PU_PORT`],
/// running as `uid` if given) whose network ACLs accept both; the update's
/// refuse one of them. Its connection is cut within [`CUT_WITHIN`], the
/// other's goes on, and a new connection from the refused peer fails while
/// one from the other still succeeds.
fn incoming_cut_for_kind(
    datapath: Datapath,
    family: Family,
    pu: fn() -> Pu,
    uid: Option<u32>,
) -> Result<()> {
    let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OLD_ONLY])? else {
        return Ok(());
    };
    let hosts = &stage.hosts;
    let server = SocketAddr::new(stage.server_ip(), PU_PORT);
    let (nettool, tcp) = (nettool!(), Transport::Tcp);
    let _server = match uid {
        Some(uid) => {
            PuEchoServer::start_as_user(nettool, tcp, &stage.cgroup, &hosts.a, server, uid)?
        }
        None => PuEchoServer::start(nettool, tcp, &stage.cgroup, &hosts.a, server)?,
    };
    let config = |accepted: &[u8]| {
        let mut pu = pu();
        for &role in accepted {
            let acl = Acl::accept(&format!("from-{role}"), roles::networks(role)).tcp([PU_PORT]);
            pu = pu.network_acl(acl);
        }
        Config::local_server()
            .target_tcp(TARGET_NETS)
            .target_udp(TARGET_NETS)
            .host_scope(&stage.cgroup)
            .pu(pu)
            .to_toml()
    };
    let agent = stage.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&[ACL_PEER, OLD_ONLY]),
    )?;
    let from = |role: u8| -> Result<Stream> {
        let cmd = hosts.b.command(nettool!())?;
        Stream::start(cmd, server, Some(roles::source(family, role)))
    };
    let mut revoked = from(OLD_ONLY)?;
    let mut kept = from(ACL_PEER)?;
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        revoked.running()? && kept.running()?,
        "both peers' streams run under the old policy"
    );

    agent.reload(&config(&[ACL_PEER]))?;
    let Some(cut) = revoked.ended_within(CUT_WITHIN)? else {
        bail!(
            "{datapath:?}/{family:?}: the connection from {} to the PU's server (accepted by \
             the old network ACLs only) still runs {CUT_WITHIN:?} after the update:\n{}",
            revoked.peer,
            agent.log()
        );
    };
    assert!(
        !cut.ok && cut.fields.contains_key("error"),
        "the cut connection must fail, not end cleanly: {cut:?}"
    );
    assert!(
        kept.running()?,
        "the connection both policies accept must go on: {:?}\n{}",
        kept.report(),
        agent.log()
    );
    let connect = |role: u8| -> Result<Outcome> {
        let source = roles::source(family, role);
        hosts
            .b
            .run(|| tcp_exchange_from(Some(source), server, b"ping"))
    };
    let again = connect(OLD_ONLY)?;
    assert!(
        again.is_blocked(),
        "a new connection from the refused peer: {again:?}"
    );
    assert_eq!(connect(ACL_PEER)?, Outcome::Exchanged);
    let kept = kept.finish()?;
    assert!(kept.ok, "the connection both policies accept: {kept:?}");
    Ok(())
}

/// The UDP side of [`a_host_pus_incoming_connection_only_the_old_policy_allowed_is_cut`]:
/// a server of the host PU on an unconnected UDP socket (one socket for
/// every peer, so nothing to abort). Each peer's flow (one socket, one
/// 5-tuple) is echoed under the old policy; after the update the refused
/// peer's flow stops being answered within [`CUT_WITHIN`] and stays so,
/// the other's goes on, and a new flow from the refused peer fails.
fn a_host_pus_incoming_udp_flow_only_the_old_policy_allowed_is_cut(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OLD_ONLY])? else {
        return Ok(());
    };
    let hosts = &stage.hosts;
    let server = SocketAddr::new(stage.server_ip(), PU_PORT);
    let _server = PuEchoServer::start(nettool!(), Transport::Udp, &stage.cgroup, &hosts.a, server)?;
    let config = |accepted: &[u8]| {
        // Its answers to both peers are accepted by both policies (on
        // eBPF the host PU's datagrams are judged by its application ACLs,
        // answers too): only the network side changes.
        let mut pu = Pu::host("host");
        for role in [ACL_PEER, OLD_ONLY] {
            let acl = Acl::accept(&format!("to-{role}"), roles::networks(role))
                .udp(std::iter::empty::<u16>());
            pu = pu.application_acl(acl);
        }
        for &role in accepted {
            let acl = Acl::accept(&format!("from-{role}"), roles::networks(role)).udp([PU_PORT]);
            pu = pu.network_acl(acl);
        }
        Config::local_server()
            .target_tcp(TARGET_NETS)
            .target_udp(TARGET_NETS)
            .host_scope(&stage.cgroup)
            .pu(pu)
            .to_toml()
    };
    let agent = stage.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&[ACL_PEER, OLD_ONLY]),
    )?;
    // A peer's flow: one socket of `b`, made there, used from here.
    let flow = |role: u8| -> Result<std::net::UdpSocket> {
        let source = SocketAddr::new(roles::source(family, role), 0);
        let socket = hosts.b.run(|| std::net::UdpSocket::bind(source))??;
        socket.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(socket)
    };
    let echoed = |socket: &std::net::UdpSocket| -> Result<bool> {
        socket.send_to(b"ping", server)?;
        let mut buf = [0u8; 64];
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) if from == server && &buf[..n] == b"ping" => return Ok(true),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let (revoked, kept) = (flow(OLD_ONLY)?, flow(ACL_PEER)?);
    for _ in 0..3 {
        assert!(
            echoed(&revoked)? && echoed(&kept)?,
            "both peers' flows are answered under the old policy"
        );
    }

    agent.reload(&config(&[ACL_PEER]))?;
    let deadline = Instant::now() + CUT_WITHIN;
    while echoed(&revoked)? {
        ensure!(
            Instant::now() < deadline,
            "{datapath:?}/{family:?}: the UDP flow from {} (accepted by the old network ACLs \
             only) is still answered {CUT_WITHIN:?} after the update:\n{}",
            roles::source(family, OLD_ONLY),
            agent.log()
        );
    }
    for _ in 0..3 {
        assert!(!echoed(&revoked)?, "the refused peer's flow stays cut");
        assert!(
            echoed(&kept)?,
            "the flow both policies accept goes on:\n{}",
            agent.log()
        );
    }
    let exchange = |role: u8| -> Result<Outcome> {
        let source = roles::source(family, role);
        hosts
            .b
            .run(|| udp_exchange_from(Some(source), server, b"again"))
    };
    let again = exchange(OLD_ONLY)?;
    assert!(
        again != Outcome::Exchanged,
        "a new flow from the refused peer: {again:?}"
    );
    assert_eq!(exchange(ACL_PEER)?, Outcome::Exchanged);
    Ok(())
}

/// The eBPF datapath's fallback way to wait for an RCU grace period (the
/// one used where `membarrier` cannot promise one: a single online CPU,
/// `nohz_full`): a map-in-map update returns, and the usual way works too.
#[test]
fn grace_periods_can_be_waited_for() -> Result<()> {
    use enforcer::datapath::ebpf::grace::{GracePeriod, Waited};
    let Some(_env) = privilege::require() else {
        return Ok(());
    };
    let grace = GracePeriod::new()?;
    let started = Instant::now();
    grace.map_in_map()?;
    let waited = grace.wait()?;
    // SAFETY: sysconf takes no pointers.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if online > 1 {
        assert_eq!(waited, Waited::Membarrier);
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}
