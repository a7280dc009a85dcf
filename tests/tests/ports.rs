//! Port sets at run time (SPEC, "port set add/remove"), on both datapaths
//! and families: a linux-process PU that starts listening on a port its
//! config does not list gets that port's incoming traffic judged by its
//! network policy once the agent's port discovery has found it — the
//! excluded networks untouched, the target networks trapped, the network
//! ACLs for everyone else, the rest dropped — and when it stops
//! listening, the port is no PU's again. A port the config lists and the
//! PU listens on stays the PU's through a reload that drops it from the
//! config. A uid PU's user that starts listening gets the same for its uid
//! PU, found by the socket's owner — in no PU's cgroup, and in a
//! linux-process PU's (the uid PU first, SPEC's priority).
//!
//! Host `a` runs the agent; PU `web` (its config lists TCP 8080 only)
//! starts echo servers on 8081, TCP and UDP, inside its cgroup while the
//! agent runs. Host `b` connects from one source address per role. Discovery is
//! waited for by polling with a deadline; the time it took is printed
//! (`--nocapture`), as the lag README.md reports.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use enforcer_tests::{
    agent::Datapath,
    cgroup::Cgroup,
    config::{Acl, Config, EVERY_PORT, Pu},
    netfilter::Family,
    on_both_datapaths_and_families,
    roles::{self, ACL_PEER, EXCLUDED, OTHER, TARGET, TARGET_NETS, source},
    traffic::{
        Outcome, PuEchoServer, TEST_UID, TcpEchoServer, Transport, tcp_exchange_from,
        udp_exchange_from,
    },
    unique_name,
    world::PuWorld,
};
use serde_json::json;

/// The one port `web`'s config lists.
const CONFIG_PORT: u16 = 8080;
/// The port `web` starts listening on while the agent runs.
const NEW_PORT: u16 = 8081;
/// How long discovery may take to notice a change: the default interval
/// is 500 ms; the rest is room for a loaded machine.
const DISCOVERY_DEADLINE: Duration = Duration::from_secs(15);

on_both_datapaths_and_families!(
    a_port_the_pu_starts_listening_on_follows_its_policy,
    a_port_listened_on_stays_when_a_reload_drops_it_from_the_config,
    a_port_a_uid_pus_user_starts_listening_on_follows_its_policy,
);

fn config(cgroup: &Cgroup) -> String {
    config_with_ports(cgroup, &[CONFIG_PORT])
}

/// `web` with `tcp_ports` in its config.
fn config_with_ports(cgroup: &Cgroup, tcp_ports: &[u16]) -> String {
    networks()
        .pu(with_acls(
            Pu::process_of("web", cgroup).tcp_ports(tcp_ports.iter().copied()),
        ))
        .to_toml()
}

/// The target and excluded networks of every config here.
fn networks() -> Config {
    Config::local_server()
        .target_tcp(TARGET_NETS)
        .target_udp(TARGET_NETS)
        .excluded(roles::networks(EXCLUDED))
}

/// `pu` with the ACLs of every PU here: a network ACL for [`ACL_PEER`],
/// TCP and UDP; and an application ACL for UDP answers.
fn with_acls(pu: Pu) -> Pu {
    let from_acl_peer = Acl::accept("from-acl-peer", roles::networks(ACL_PEER))
        .tcp(EVERY_PORT)
        .udp(EVERY_PORT);
    // The UDP server answers from its unconnected socket: an application
    // ACL lets its answers out to both peers whatever the datapath's own
    // handling of answers, so that only the incoming side decides.
    let peers = [roles::networks(ACL_PEER), roles::networks(OTHER)].concat();
    let answers = Acl::accept("answers", peers).udp(EVERY_PORT);
    pu.network_acl(from_acl_peer).application_acl(answers)
}

fn a_port_the_pu_starts_listening_on_follows_its_policy(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OTHER, EXCLUDED])? else {
        return Ok(());
    };
    let hosts = &stage.hosts;
    let new_port = SocketAddr::new(stage.server_ip(), NEW_PORT);
    let agent = stage.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&stage.cgroup),
    )?;
    let connect = |role: u8| -> Result<Outcome> {
        let from = source(family, role);
        hosts
            .b
            .run(|| tcp_exchange_from(Some(from), new_port, b"ping"))
    };
    let datagram = |role: u8| -> Result<Outcome> {
        let from = source(family, role);
        hosts
            .b
            .run(|| udp_exchange_from(Some(from), new_port, b"ping"))
    };
    let web_ports =
        |key: &str| -> Result<serde_json::Value> { Ok(agent.status()?["pus"][0][key].clone()) };
    let pu_server = |transport| {
        let nettool = env!("CARGO_BIN_EXE_nettool");
        PuEchoServer::start(nettool, transport, &stage.cgroup, &hosts.a, new_port)
    };

    // The PU starts listening: once discovery found the port, a peer no
    // ACL names is blocked (before, the port was no PU's: it connected).
    let servers = [pu_server(Transport::Tcp)?, pu_server(Transport::Udp)?];
    let lag = wait_until(|| Ok(connect(OTHER)?.is_blocked())).context(
        "a peer no ACL names still connects to the port the PU listens on: \
         the port never became the PU's",
    )?;
    eprintln!("{datapath:?} {family:?}: the new port was the PU's within {lag:?} of listen()");
    assert_eq!(web_ports("config_ports")?, json!(["8080/tcp"]));
    assert_eq!(
        web_ports("discovered_ports")?,
        json!(["8081/tcp", "8081/udp"])
    );

    assert_eq!(
        connect(ACL_PEER)?,
        Outcome::Exchanged,
        "network ACL accepts"
    );
    let blocked = connect(OTHER)?;
    assert!(blocked.is_blocked(), "no ACL: blocked, got {blocked:?}");
    assert_eq!(
        connect(EXCLUDED)?,
        Outcome::Exchanged,
        "excluded: untouched"
    );
    let queued = stage.kernel_queued()?;
    assert_eq!(
        connect(TARGET)?,
        Outcome::Exchanged,
        "target: trapped, accepted"
    );
    assert_eq!(
        stage.kernel_queued()? - queued,
        3,
        "the handshake with the target network reaches user space: its SYN, the PU's \
         SYN-ACK and the first ACK (tests/tests/trap_contract.rs has them by range)"
    );
    // UDP in the same port set.
    assert_eq!(
        datagram(ACL_PEER)?,
        Outcome::Exchanged,
        "UDP: network ACL accepts"
    );
    let dropped = datagram(OTHER)?;
    assert!(
        dropped.is_blocked(),
        "UDP, no ACL: dropped, got {dropped:?}"
    );

    // The PU stops listening; a server outside the PU takes the port. Once
    // discovery noticed (waited for in `status`: a blocked connection
    // would succeed on its SYN's retransmission a second later, so it
    // cannot time the change), the port is no PU's: every peer connects.
    drop(servers);
    let _outside = TcpEchoServer::start(&hosts.a, new_port)?;
    let lag = wait_until(|| Ok(web_ports("discovered_ports")? == json!([])))
        .context("the port the PU stopped listening on is still among its discovered ports")?;
    eprintln!("{datapath:?} {family:?}: the closed port left the PU within {lag:?} of close()");
    assert_eq!(
        connect(OTHER)?,
        Outcome::Exchanged,
        "the port is no PU's any more: a peer no ACL names connects"
    );
    assert_eq!(web_ports("config_ports")?, json!(["8080/tcp"]));
    Ok(())
}

/// A port the config lists and the PU listens on is discovered too, so a
/// reload that drops it from the config leaves it in the PU's port set:
/// the update keeps the run-time ports, and at no moment is the port no
/// PU's (a peer no ACL names is blocked right after the reload, not only
/// once discovery has run again).
fn a_port_listened_on_stays_when_a_reload_drops_it_from_the_config(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OTHER])? else {
        return Ok(());
    };
    let hosts = &stage.hosts;
    let new_port = SocketAddr::new(stage.server_ip(), NEW_PORT);
    let both = config_with_ports(&stage.cgroup, &[CONFIG_PORT, NEW_PORT]);
    let agent = stage.start(env!("CARGO_BIN_EXE_agent"), datapath, &both)?;
    let connect = |role: u8| -> Result<Outcome> {
        let from = source(family, role);
        hosts
            .b
            .run(|| tcp_exchange_from(Some(from), new_port, b"ping"))
    };
    let discovered = || -> Result<serde_json::Value> {
        Ok(agent.status()?["pus"][0]["discovered_ports"].clone())
    };
    let nettool = env!("CARGO_BIN_EXE_nettool");
    let _server = PuEchoServer::start(nettool, Transport::Tcp, &stage.cgroup, &hosts.a, new_port)?;
    wait_until(|| Ok(discovered()? == json!(["8081/tcp"])))
        .context("the configured port the PU listens on was never discovered")?;

    agent.reload(&config(&stage.cgroup))?;
    let blocked = connect(OTHER)?;
    assert!(
        blocked.is_blocked(),
        "right after the reload, a peer no ACL names is still blocked, got {blocked:?}"
    );
    assert_eq!(
        connect(ACL_PEER)?,
        Outcome::Exchanged,
        "network ACL accepts"
    );
    assert_eq!(
        agent.status()?["pus"][0]["config_ports"],
        json!(["8080/tcp"])
    );
    assert_eq!(discovered()?, json!(["8081/tcp"]));
    Ok(())
}

/// A uid PU's user (processes run as [`TEST_UID`]) starts echo servers on
/// ports the uid PU's config does not list: once discovery found them by
/// their sockets' owner, the uid PU's network ACLs judge them — TCP and UDP
/// from the world's cgroup (no PU's, and the eBPF host scope), and TCP from
/// a linux-process PU's cgroup too (SPEC's priority: the uid PU first),
/// while root's server in that cgroup is the process PU's. Once the user's
/// servers close, their port is no PU's again.
fn a_port_a_uid_pus_user_starts_listening_on_follows_its_policy(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OTHER])? else {
        return Ok(());
    };
    let hosts = &stage.hosts;
    let web = stage.cgroup.child(&unique_name())?;
    let at = |port| SocketAddr::new(stage.server_ip(), port);
    let (new_port, roots, users_in_web) = (at(NEW_PORT), at(NEW_PORT + 1), at(NEW_PORT + 2));
    // `web` has no ACL: everything to its ports is blocked.
    let config = networks()
        .host_scope(&stage.cgroup)
        .pu(with_acls(
            Pu::uid("user", TEST_UID).tcp_ports([CONFIG_PORT]),
        ))
        .pu(Pu::process_of("web", &web))
        .to_toml();
    let agent = stage.start(env!("CARGO_BIN_EXE_agent"), datapath, &config)?;
    let connect = |role: u8, to: SocketAddr| -> Result<Outcome> {
        let from = source(family, role);
        hosts.b.run(|| tcp_exchange_from(Some(from), to, b"ping"))
    };
    let datagram = |role: u8| -> Result<Outcome> {
        let from = source(family, role);
        hosts
            .b
            .run(|| udp_exchange_from(Some(from), new_port, b"ping"))
    };
    let discovered = || -> Result<[serde_json::Value; 2]> {
        let status = agent.status()?;
        Ok([0, 1].map(|i| status["pus"][i]["discovered_ports"].clone()))
    };
    let nettool = env!("CARGO_BIN_EXE_nettool");
    let user_server = |transport, cgroup, addr| {
        PuEchoServer::start_as_user(nettool, transport, cgroup, &hosts.a, addr, TEST_UID)
    };

    let servers = [
        user_server(Transport::Tcp, &stage.cgroup, new_port)?,
        user_server(Transport::Udp, &stage.cgroup, new_port)?,
        user_server(Transport::Tcp, &web, users_in_web)?,
    ];
    let _root = PuEchoServer::start(nettool, Transport::Tcp, &web, &hosts.a, roots)?;
    let expected = [
        json!(["8081/tcp", "8083/tcp", "8081/udp"]),
        json!(["8082/tcp"]),
    ];
    let lag = wait_until(|| Ok(discovered()? == expected)).with_context(|| {
        format!(
            "the user's ports are the uid PU's, root's in web's cgroup web's: {:?}",
            discovered()
        )
    })?;
    eprintln!(
        "{datapath:?} {family:?}: the uid PU's new ports were its within {lag:?} of listen()"
    );
    assert_eq!(
        agent.status()?["pus"][0]["config_ports"],
        json!(["8080/tcp"])
    );

    assert_eq!(
        connect(ACL_PEER, new_port)?,
        Outcome::Exchanged,
        "network ACL accepts"
    );
    let blocked = connect(OTHER, new_port)?;
    assert!(blocked.is_blocked(), "no ACL: blocked, got {blocked:?}");
    assert_eq!(
        datagram(ACL_PEER)?,
        Outcome::Exchanged,
        "UDP: network ACL accepts"
    );
    let dropped = datagram(OTHER)?;
    assert!(
        dropped.is_blocked(),
        "UDP, no ACL: dropped, got {dropped:?}"
    );
    assert_eq!(
        connect(ACL_PEER, users_in_web)?,
        Outcome::Exchanged,
        "the user's port in web's cgroup: the uid PU's network ACL accepts"
    );
    let blocked = connect(ACL_PEER, roots)?;
    assert!(
        blocked.is_blocked(),
        "root's port in web's cgroup: web's, which has no ACL, got {blocked:?}"
    );

    // The user's servers close; one outside every PU takes the port.
    drop(servers);
    let _outside = TcpEchoServer::start(&hosts.a, new_port)?;
    let expected = [json!([]), json!(["8082/tcp"])];
    wait_until(|| Ok(discovered()? == expected))
        .context("the ports the user stopped listening on are still among its discovered ports")?;
    assert_eq!(
        connect(OTHER, new_port)?,
        Outcome::Exchanged,
        "the port is no PU's any more: a peer no ACL names connects"
    );
    Ok(())
}

/// Polls `done` every 20 ms until it holds; how long that took, or an
/// error after [`DISCOVERY_DEADLINE`].
fn wait_until(mut done: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let attempt = start.elapsed();
        if done()? {
            // When the attempt that saw it began: a blocked connection
            // takes its whole timeout to say so.
            return Ok(attempt);
        }
        if start.elapsed() > DISCOVERY_DEADLINE {
            bail!("not within {DISCOVERY_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
