//! Every PU kind and mode SPEC allows, on both datapaths and both
//! families (the priority test also through the legacy iptables tools): what a process of the PU may reach (its application ACLs: an
//! ACL peer connects, another peer is blocked, a target peer connects and
//! its handshake is trapped once), what may reach the PU (its network ACLs, the
//! same three ways), and — with several kinds at once — that each process
//! follows exactly one PU, in SPEC's priority (uid, process,
//! host-service, host).
//!
//! The world: host `a` runs the agent and holds the *scope*, a cgroup of
//! the test's own that is the eBPF datapath's host scope (`[host]
//! cgroup`; the iptables datapath sees every process of the namespace
//! anyway). Every client is a `nettool` process of `a` in the scope or in
//! a PU cgroup below it; a uid PU's runs as [`TEST_UID`], a uid no user of
//! the machine has; a host service's binds its port first. Host `b` holds
//! the peers (one address each, TCP echo servers on [`PORT`]) and connects
//! to `a` from them. For remote-container and sidecar modes, `a` is the
//! container's namespace: the agent runs inside it, as those modes mean.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::Family,
    nettool, on_both_datapaths_and_families, privilege,
    traffic::{
        Outcome, TEST_UID, TcpEchoServer, UdpReceiver, become_user, run_nettool, tcp_exchange_from,
    },
    unique_name,
    world::{ACL_PEER, OTHER, PORT, Peer, PuWorld, TARGET},
};

on_both_datapaths_and_families!(
    a_host_pu_holds_every_process_of_the_namespace,
    a_uid_pu_holds_every_process_of_its_user,
    a_host_service_pu_holds_its_ports,
    a_remote_container_agent_enforces_for_its_container,
    a_sidecar_agent_lets_dns_through,
    each_process_follows_exactly_one_pu_by_priority,
);

// Every kind's hook at once, through the legacy iptables tools too (the
// owner and cgroup matches in chains only OUTPUT reaches).
enforcer_tests::on_datapaths_and_families!(
    [each_process_follows_exactly_one_pu_by_priority]
    iptables_legacy IptablesLegacy
);

/// The port a PU listens on (a service's own).
const SERVICE_PORT: u16 = 8080;
/// A port of `a` that is no PU's.
const OTHER_PORT: u16 = 9090;

/// The peers only the priority test's PUs accept, one per kind
/// ([`ACL_PEER`] for the host PU, [`OTHER`] for the process PU).
const UID_PEER: Peer = Peer {
    addr: ["10.4.0.2", "fd00:4::2"],
    nets: ["10.4.0.0/16", "fd00:4::/64"],
};
const SERVICE_PEER: Peer = Peer {
    addr: ["10.5.0.2", "fd00:5::2"],
    nets: ["10.5.0.0/16", "fd00:5::/64"],
};

/// One test's world: [`PuWorld`] (its cgroup is the scope) with echo
/// servers on `b`, and PU cgroups below the scope.
struct Stage {
    _servers: Vec<TcpEchoServer>,
    /// Dropped before the scope that holds them.
    children: Vec<Cgroup>,
    world: PuWorld,
}

impl std::ops::Deref for Stage {
    type Target = PuWorld;

    fn deref(&self) -> &PuWorld {
        &self.world
    }
}

/// A client process of host `a`: where it runs and as whom.
#[derive(Clone, Copy)]
struct Client<'a> {
    cgroup: &'a Cgroup,
    uid: Option<u32>,
    /// The local port its socket binds to first.
    sport: Option<u16>,
}

impl<'a> Client<'a> {
    /// A root process in `cgroup`.
    fn in_cgroup(cgroup: &'a Cgroup) -> Self {
        Self {
            cgroup,
            uid: None,
            sport: None,
        }
    }

    fn as_user(self, uid: u32) -> Self {
        Self {
            uid: Some(uid),
            ..self
        }
    }

    fn bound_to(self, port: u16) -> Self {
        Self {
            sport: Some(port),
            ..self
        }
    }

    /// `nettool` in this client's place, with `args`.
    fn nettool(&self, stage: &Stage, args: &[&str]) -> Result<Command> {
        let mut cmd = self.cgroup.command_in(&stage.hosts.a, nettool!())?;
        if let Some(uid) = self.uid {
            become_user(&mut cmd, uid);
        }
        cmd.args(args);
        Ok(cmd)
    }

    /// A TCP exchange with `peer`'s echo server.
    fn connect(&self, stage: &Stage, peer: Peer) -> Result<Outcome> {
        let to = stage.addr(peer).to_string();
        let sport = self.sport.map(|p| p.to_string());
        let mut args = vec!["tcp-exchange", &to];
        if let Some(sport) = &sport {
            args.extend(["--sport", sport]);
        }
        run_nettool(self.nettool(stage, &args)?)
    }

    /// One UDP datagram to `to`.
    fn udp_send(&self, stage: &Stage, to: SocketAddr, payload: &str) -> Result<Outcome> {
        let to = to.to_string();
        run_nettool(self.nettool(stage, &["udp-send", &to, "--payload", payload])?)
    }
}

impl Stage {
    /// The world of one family with `peers` on `b`, each serving TCP on
    /// [`PORT`]; `None` where [`privilege::require`] lets the test skip.
    fn new(family: Family, peers: &[Peer]) -> Result<Option<Self>> {
        let Some(env) = privilege::require() else {
            return Ok(None);
        };
        let world = PuWorld::new(&env, family, peers)?;
        let servers = peers
            .iter()
            .map(|&peer| TcpEchoServer::start(&world.hosts.b, world.addr(peer)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            _servers: servers,
            children: Vec::new(),
            world,
        }))
    }

    /// A new cgroup below the scope; returns its index in `children`.
    fn add_child(&mut self) -> Result<usize> {
        self.children.push(self.world.cgroup.child(&unique_name())?);
        Ok(self.children.len() - 1)
    }

    /// The networks every config here has: [`TARGET`]'s are the target
    /// TCP and UDP networks; and the scope.
    fn config(&self, mode: Config) -> Config {
        mode.target_tcp(TARGET.nets)
            .target_udp(TARGET.nets)
            .host_scope(&self.cgroup)
    }

    fn start(&self, datapath: Datapath, config: &Config) -> Result<Agent> {
        self.world
            .start(env!("CARGO_BIN_EXE_agent"), datapath, &config.to_toml())
    }

    /// A connection from `peer`'s address on `b` to `a`'s `port`.
    fn connect_in(&self, peer: Peer, port: u16) -> Result<Outcome> {
        let (from, to) = (self.ip(peer), SocketAddr::new(self.server_ip(), port));
        self.hosts
            .b
            .run(|| tcp_exchange_from(Some(from), to, b"ping"))
    }

    /// `attempt` connects and the kernel queued exactly its handshake: the
    /// SYN, the SYN-ACK and the first ACK (trapped; the agent accepts
    /// them; tests/tests/trap_contract.rs has them by range).
    fn trapped_once(&self, what: &str, attempt: impl FnOnce() -> Result<Outcome>) -> Result<()> {
        let before = self.kernel_queued()?;
        assert_eq!(
            attempt()?,
            Outcome::Exchanged,
            "{what}: trapped, then accepted"
        );
        assert_eq!(
            self.kernel_queued()? - before,
            3,
            "{what}: only the handshake reaches user space"
        );
        Ok(())
    }

    /// The application side of a PU with the [`app_acl`]: `client`
    /// reaches [`ACL_PEER`], not [`OTHER`], and [`TARGET`] through the
    /// trap.
    fn outgoing_follows_the_acls(&self, client: Client) -> Result<()> {
        assert_eq!(
            client.connect(self, ACL_PEER)?,
            Outcome::Exchanged,
            "accept ACL"
        );
        let blocked = client.connect(self, OTHER)?;
        assert!(blocked.is_blocked(), "no ACL: blocked, got {blocked:?}");
        self.trapped_once("to the target", || client.connect(self, TARGET))
    }

    /// The network side of a PU with the [`net_acl`] on `port`: a server
    /// there is reached from [`ACL_PEER`], not from [`OTHER`], and from
    /// [`TARGET`] through the trap.
    fn incoming_follows_the_acls(&self, port: u16) -> Result<TcpEchoServer> {
        let server = TcpEchoServer::start(&self.hosts.a, SocketAddr::new(self.server_ip(), port))?;
        let from = |peer| self.connect_in(peer, port);
        assert_eq!(from(ACL_PEER)?, Outcome::Exchanged, "network ACL accepts");
        let blocked = from(OTHER)?;
        assert!(
            blocked.is_blocked(),
            "no network ACL: blocked, got {blocked:?}"
        );
        self.trapped_once("from the target", || from(TARGET))?;
        Ok(server)
    }
    /// A server on `a`'s [`OTHER_PORT`], a port of no single-kind PU.
    fn serve_other_port(&self) -> Result<TcpEchoServer> {
        TcpEchoServer::start(&self.hosts.a, SocketAddr::new(self.server_ip(), OTHER_PORT))
    }

    /// [`OTHER`] reaches a server on [`OTHER_PORT`]: a port of no PU is
    /// untouched.
    fn a_port_of_no_pu_is_untouched(&self) -> Result<()> {
        let _server = self.serve_other_port()?;
        assert_eq!(
            self.connect_in(OTHER, OTHER_PORT)?,
            Outcome::Exchanged,
            "a port of no PU: untouched"
        );
        Ok(())
    }
}

/// The application ACL of every single-kind test: TCP to [`ACL_PEER`]'s
/// [`PORT`].
fn app_acl() -> Acl {
    Acl::accept("to-acl-peer", ACL_PEER.nets).tcp([PORT])
}

/// The network ACL of every single-kind test: TCP from [`ACL_PEER`] to
/// [`SERVICE_PORT`].
fn net_acl() -> Acl {
    Acl::accept("from-acl-peer", ACL_PEER.nets).tcp([SERVICE_PORT])
}

/// The host PU: every process of the namespace (in the scope), every
/// port; then updated, then deleted.
fn a_host_pu_holds_every_process_of_the_namespace(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(stage) = Stage::new(family, &[TARGET, ACL_PEER, OTHER])? else {
        return Ok(());
    };
    let host = Pu::host("host").network_acl(net_acl());
    let config = |pus: &[Pu]| {
        let config = stage.config(Config::local_server());
        pus.iter().fold(config, |config, pu| config.pu(pu.clone()))
    };
    let agent = stage.start(
        datapath,
        &config(&[host.clone().application_acl(app_acl())]),
    )?;
    let anyone = Client::in_cgroup(&stage.cgroup);
    stage.outgoing_follows_the_acls(anyone)?;
    // A port of no listed service is the host's too.
    stage.incoming_follows_the_acls(SERVICE_PORT)?;
    let _other = stage.serve_other_port()?;
    let blocked = stage.connect_in(ACL_PEER, OTHER_PORT)?;
    assert!(
        blocked.is_blocked(),
        "the ACL names another port: blocked, got {blocked:?}"
    );

    // An update: the ACL now names the other peer.
    let to_other = Acl::accept("to-other", OTHER.nets).tcp([PORT]);
    agent.reload(&config(&[host.application_acl(to_other)]).to_toml())?;
    assert_eq!(agent.reloads()?.applied, 1, "{}", agent.log());
    assert_eq!(
        anyone.connect(&stage, OTHER)?,
        Outcome::Exchanged,
        "updated"
    );
    let blocked = anyone.connect(&stage, ACL_PEER)?;
    assert!(blocked.is_blocked(), "updated: blocked, got {blocked:?}");
    // Deleted: nothing of it is left in force.
    agent.reload(&config(&[]).to_toml())?;
    assert_eq!(agent.reloads()?.applied, 2, "{}", agent.log());
    assert_eq!(anyone.connect(&stage, ACL_PEER)?, Outcome::Exchanged);
    assert_eq!(stage.connect_in(ACL_PEER, OTHER_PORT)?, Outcome::Exchanged);
    Ok(())
}

/// A uid PU: the processes of its user, whatever their cgroup; incoming
/// by its ports.
fn a_uid_pu_holds_every_process_of_its_user(datapath: Datapath, family: Family) -> Result<()> {
    let Some(stage) = Stage::new(family, &[TARGET, ACL_PEER, OTHER])? else {
        return Ok(());
    };
    let pu = |uid| {
        Pu::uid("user", uid)
            .tcp_ports([SERVICE_PORT])
            .application_acl(app_acl())
            .network_acl(net_acl())
    };
    let config = |uid| stage.config(Config::local_server()).pu(pu(uid));
    let agent = stage.start(datapath, &config(TEST_UID))?;
    let root = Client::in_cgroup(&stage.cgroup);
    stage.outgoing_follows_the_acls(root.as_user(TEST_UID))?;
    assert_eq!(
        root.connect(&stage, OTHER)?,
        Outcome::Exchanged,
        "another user's process is no PU's: untouched"
    );
    stage.incoming_follows_the_acls(SERVICE_PORT)?;
    stage.a_port_of_no_pu_is_untouched()?;

    // The PU moves to another user: the first is nobody's any more.
    let next = TEST_UID + 1;
    agent.reload(&config(next).to_toml())?;
    assert_eq!(agent.reloads()?.applied, 1, "{}", agent.log());
    let blocked = root.as_user(next).connect(&stage, OTHER)?;
    assert!(
        blocked.is_blocked(),
        "the new user: blocked, got {blocked:?}"
    );
    assert_eq!(
        root.as_user(TEST_UID).connect(&stage, OTHER)?,
        Outcome::Exchanged,
        "the old user: untouched"
    );
    Ok(())
}

/// A host-service PU: its ports — what is sent from them, what comes to
/// them.
fn a_host_service_pu_holds_its_ports(datapath: Datapath, family: Family) -> Result<()> {
    let Some(stage) = Stage::new(family, &[TARGET, ACL_PEER, OTHER])? else {
        return Ok(());
    };
    let pu = Pu::host_service("service")
        .tcp_ports([SERVICE_PORT])
        .application_acl(app_acl())
        .network_acl(net_acl());
    let _agent = stage.start(datapath, &stage.config(Config::local_server()).pu(pu))?;
    let anyone = Client::in_cgroup(&stage.cgroup);
    stage.outgoing_follows_the_acls(anyone.bound_to(SERVICE_PORT))?;
    assert_eq!(
        anyone.connect(&stage, OTHER)?,
        Outcome::Exchanged,
        "a socket on another port is no PU's: untouched"
    );
    stage.incoming_follows_the_acls(SERVICE_PORT)?;
    stage.a_port_of_no_pu_is_untouched()?;
    Ok(())
}

/// The container PU of a remote-container agent, which runs inside the
/// container's namespace (`a`): everything in it.
fn a_remote_container_agent_enforces_for_its_container(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(stage) = Stage::new(family, &[TARGET, ACL_PEER, OTHER])? else {
        return Ok(());
    };
    let config = stage
        .config(Config::remote_container())
        .pu(Pu::container("box")
            .application_acl(app_acl())
            .network_acl(net_acl()));
    let _agent = stage.start(datapath, &config)?;
    stage.outgoing_follows_the_acls(Client::in_cgroup(&stage.cgroup))?;
    stage.incoming_follows_the_acls(SERVICE_PORT)?;
    Ok(())
}

/// A sidecar agent: as remote-container, and DNS goes through whatever
/// the ACLs say (the seed's sidecar rule), while other UDP does not.
fn a_sidecar_agent_lets_dns_through(datapath: Datapath, family: Family) -> Result<()> {
    let Some(stage) = Stage::new(family, &[TARGET, ACL_PEER, OTHER])? else {
        return Ok(());
    };
    let config = stage.config(Config::sidecar()).pu(Pu::container("box")
        .application_acl(app_acl())
        .network_acl(net_acl()));
    let _agent = stage.start(datapath, &config)?;
    let anyone = Client::in_cgroup(&stage.cgroup);
    stage.outgoing_follows_the_acls(anyone)?;
    stage.incoming_follows_the_acls(SERVICE_PORT)?;

    let dns = UdpReceiver::start(&stage.hosts.b, SocketAddr::new(stage.ip(OTHER), 53))?;
    let other = UdpReceiver::start(&stage.hosts.b, SocketAddr::new(stage.ip(OTHER), PORT))?;
    assert_eq!(
        anyone.udp_send(&stage, dns.addr(), "question")?,
        Outcome::Exchanged
    );
    assert!(
        dns.wait_for(b"question", Duration::from_secs(2)).is_some(),
        "DNS goes through"
    );
    // Refused by the sendmsg hook (eBPF) or dropped by the chain.
    let _ = anyone.udp_send(&stage, other.addr(), "not-dns")?;
    assert!(
        other.wait_for(b"not-dns", Duration::from_secs(1)).is_none(),
        "other UDP without an ACL does not"
    );
    Ok(())
}

/// Four kinds at once, each with an ACL for a peer of its own: every
/// process follows one PU — the uid PU of its user, else its cgroup's
/// linux-process PU, else the host service whose port it is bound to,
/// else the host PU — and never also another's (it would be refused by
/// the other's ACLs). Incoming, a service's port is its own, every other
/// port the host's.
fn each_process_follows_exactly_one_pu_by_priority(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let (host_peer, process_peer) = (ACL_PEER, OTHER);
    let peers = [host_peer, process_peer, UID_PEER, SERVICE_PEER];
    let Some(mut stage) = Stage::new(family, &peers)? else {
        return Ok(());
    };
    let web = stage.add_child()?;
    let accept = |id: &str, peer: Peer| Acl::accept(id, peer.nets).tcp([PORT]);
    let accept_in = |id: &str, peer: Peer, port: u16| Acl::accept(id, peer.nets).tcp([port]);
    let config = stage
        .config(Config::local_server())
        .pu(Pu::host("host")
            .application_acl(accept("host-out", host_peer))
            .network_acl(accept_in("host-in", host_peer, OTHER_PORT)))
        .pu(Pu::process_of("web", &stage.children[web])
            .application_acl(accept("web-out", process_peer)))
        .pu(Pu::uid("user", TEST_UID).application_acl(accept("user-out", UID_PEER)))
        .pu(Pu::host_service("service")
            .tcp_ports([SERVICE_PORT])
            .application_acl(accept("service-out", SERVICE_PEER))
            .network_acl(accept_in("service-in", SERVICE_PEER, SERVICE_PORT)));
    let _agent = stage.start(datapath, &config)?;

    let scope = Client::in_cgroup(&stage.cgroup);
    let in_web = Client::in_cgroup(&stage.children[web]);
    let cases = [
        (
            "a process in no PU's cgroup",
            scope,
            host_peer,
            process_peer,
        ),
        (
            "a process in the process PU's cgroup",
            in_web,
            process_peer,
            host_peer,
        ),
        (
            "the uid PU's user",
            scope.as_user(TEST_UID),
            UID_PEER,
            host_peer,
        ),
        (
            "the uid PU's user in the process PU's cgroup",
            in_web.as_user(TEST_UID),
            UID_PEER,
            process_peer,
        ),
        (
            "a socket on the service's port",
            scope.bound_to(SERVICE_PORT),
            SERVICE_PEER,
            host_peer,
        ),
        (
            "a socket on the service's port in the process PU's cgroup",
            in_web.bound_to(SERVICE_PORT),
            process_peer,
            SERVICE_PEER,
        ),
    ];
    for (who, client, own, others) in cases {
        assert_eq!(
            client.connect(&stage, own)?,
            Outcome::Exchanged,
            "{who}: its PU's ACL accepts"
        );
        let blocked = client.connect(&stage, others)?;
        assert!(
            blocked.is_blocked(),
            "{who}: another PU's ACL must not apply, got {blocked:?}"
        );
    }

    let ip = stage.server_ip();
    let _servers = [SERVICE_PORT, OTHER_PORT]
        .map(|port| TcpEchoServer::start(&stage.hosts.a, SocketAddr::new(ip, port)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    for (port, own, others) in [
        (SERVICE_PORT, SERVICE_PEER, host_peer),
        (OTHER_PORT, host_peer, SERVICE_PEER),
    ] {
        assert_eq!(
            stage.connect_in(own, port)?,
            Outcome::Exchanged,
            "to port {port}: its PU's network ACL accepts"
        );
        let blocked = stage.connect_in(others, port)?;
        assert!(
            blocked.is_blocked(),
            "to port {port}: another PU's network ACL must not apply, got {blocked:?}"
        );
    }
    Ok(())
}
