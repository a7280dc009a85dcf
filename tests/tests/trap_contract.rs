//! The trap's rule contract on both datapaths and both families (SPEC,
//! "Global steering", "Order of evaluation inside a PU", "The trap"): what
//! reaches user space, and through which queue range of the layout — read
//! from the kernel's own per-queue counters (`nfnetlink_queue`) in the
//! agent's namespace, mapped back to their ranges with the agent's
//! [`queues::locate`].
//!
//! - A PU connecting to a target peer: its SYN in the app SYN range, the
//!   peer's SYN-ACK in the net SYN-ACK range, its first ACK in the app ACK
//!   range — and nothing after, although the client writes as soon as it
//!   is connected.
//! - A target peer connecting to the PU's port: its SYN in the net SYN
//!   range, the PU's SYN-ACK in the app SYN-ACK range, the peer's first
//!   ACK in the net ACK range.
//! - A SYN carrying TCP option 34 from a target network goes to the net
//!   SYN range by the global rule, to a port of no PU; without the option,
//!   or from outside the target networks, it does not.
//! - A UDP datagram from a target UDP network carrying the handshake
//!   signature, anywhere in its payload, goes to the net service range,
//!   to a port of no PU; one without it does not, nor does one from an
//!   ACL peer (with or without).
//!
//! - A target peer reconnecting from the source port of a connection the
//!   PU's server just aborted (conntrack keeps the closed entry, and its
//!   connection mark, for 10 s and reuses it for the new SYN): the new
//!   connection's SYN and SYN-ACK are queued again — the old connection's
//!   authorisation is not the new one's.
//!
//! Host `a` runs the agent with one linux-process PU (TCP port 8080, UDP
//! port 8053); host `b` speaks from one address per role
//! ([`enforcer_tests::roles`]).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use enforcer::{datapath::queues, policy::QueueSettings};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::{self, Family},
    nettool, on_both_datapaths_and_families,
    roles::{ACL_PEER, OTHER, TARGET, TARGET_NETS, networks, source},
    traffic::{
        Outcome, TcpEchoServer, UdpReceiver, run_nettool, send_tcp_syn, tcp_exchange_from, udp_send,
    },
    world::PuWorld,
};

/// The PU's listening ports.
const PU_TCP_PORT: u16 = 8080;
const PU_UDP_PORT: u16 = 8053;
/// A port of no PU on `a`.
const OTHER_PORT: u16 = 9090;
/// Where the target peer's echo server listens on `b`.
const PEER_PORT: u16 = 7000;
/// TCP option 34 with an empty value (a Fast Open cookie request).
const OPTION_34: [u8; 2] = [34, 2];
const SIGNATURE: &str = enforcer::datapath::handshake::UDP_SIGNATURE;
/// How long a packet that is not trapped is given to show up anyway.
const SETTLE: Duration = Duration::from_millis(300);

on_both_datapaths_and_families!(
    a_pu_connecting_to_a_target_queues_its_handshake_and_nothing_after,
    a_target_connecting_to_the_pu_queues_its_handshake_and_nothing_after,
    a_syn_with_option_34_from_a_target_network_is_queued_by_the_global_rule,
    a_datagram_with_the_signature_from_a_target_udp_network_is_queued,
    a_connection_reopening_a_closed_ones_ports_is_trapped_again,
);

fn config(cgroup: &Cgroup) -> String {
    Config::local_server()
        .target_tcp(TARGET_NETS)
        .target_udp(TARGET_NETS)
        .pu(Pu::process_of("web", cgroup)
            .tcp_ports([PU_TCP_PORT])
            .udp_ports([PU_UDP_PORT])
            .network_acl(
                Acl::accept("from-acl-peer", networks(ACL_PEER))
                    .tcp([PU_TCP_PORT])
                    .udp([PU_UDP_PORT]),
            ))
        .to_toml()
}

/// The stage with `roles` on `b` and the agent on `a`.
fn start(datapath: Datapath, family: Family, roles: &[u8]) -> Result<Option<(PuWorld, Agent)>> {
    let Some(stage) = PuWorld::with_roles(family, roles)? else {
        return Ok(None);
    };
    let agent = stage.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&stage.cgroup),
    )?;
    Ok(Some((stage, agent)))
}

/// Packets the kernel ever queued in `a`, by range of the layout (the
/// config's default one); ranges with none are left out.
fn queued(stage: &PuWorld) -> Result<BTreeMap<&'static str, u64>> {
    let layout = QueueSettings::default();
    let mut by_range = BTreeMap::new();
    for q in netfilter::queue_stats(&stage.hosts.a)? {
        let range = queues::locate(&layout, q.queue).map_or("outside the layout", |l| l.range.name);
        *by_range.entry(range).or_insert(0) += u64::from(q.id_sequence);
    }
    by_range.retain(|_, n| *n > 0);
    Ok(by_range)
}

/// Waits until the counts are `expected` (what was sent may still be on
/// its way), then gives anything more [`SETTLE`] to show up.
fn assert_queued(stage: &PuWorld, expected: &[(&'static str, u64)], why: &str) -> Result<()> {
    let expected: BTreeMap<&str, u64> = expected.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    while queued(stage)? != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(SETTLE);
    let got = queued(stage)?;
    ensure!(
        got == expected,
        "{why}: queued {got:?}, expected {expected:?}"
    );
    Ok(())
}

fn a_pu_connecting_to_a_target_queues_its_handshake_and_nothing_after(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some((stage, agent)) = start(datapath, family, &[])? else {
        return Ok(());
    };
    let peer = SocketAddr::new(source(family, TARGET), PEER_PORT);
    let _server = TcpEchoServer::start(&stage.hosts.b, peer)?;
    let exchange = || -> Result<Outcome> {
        let mut cmd = stage.cgroup.command_in(&stage.hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &peer.to_string()]);
        run_nettool(cmd)
    };
    assert_eq!(exchange()?, Outcome::Exchanged, "{}", agent.log());
    assert_queued(
        &stage,
        &[("app-syn", 1), ("app-ack", 1), ("net-synack", 1)],
        "the PU's SYN, the peer's SYN-ACK, the PU's first ACK",
    )?;
    assert_eq!(exchange()?, Outcome::Exchanged);
    assert_queued(
        &stage,
        &[("app-syn", 2), ("app-ack", 2), ("net-synack", 2)],
        "the second connection's handshake, and nothing of the first's end",
    )
}

fn a_target_connecting_to_the_pu_queues_its_handshake_and_nothing_after(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some((stage, agent)) = start(datapath, family, &[])? else {
        return Ok(());
    };
    let server = SocketAddr::new(stage.server_ip(), PU_TCP_PORT);
    let _server = TcpEchoServer::start(&stage.hosts.a, server)?;
    let from = source(family, TARGET);
    let exchange = || {
        stage
            .hosts
            .b
            .run(|| tcp_exchange_from(Some(from), server, b"ping"))
    };
    assert_eq!(exchange()?, Outcome::Exchanged, "{}", agent.log());
    assert_queued(
        &stage,
        &[("app-synack", 1), ("net-ack", 1), ("net-syn", 1)],
        "the peer's SYN, the PU's SYN-ACK, the peer's first ACK",
    )?;
    assert_eq!(exchange()?, Outcome::Exchanged);
    assert_queued(
        &stage,
        &[("app-synack", 2), ("net-ack", 2), ("net-syn", 2)],
        "the second connection's handshake, and nothing of the first's end",
    )
}

fn a_syn_with_option_34_from_a_target_network_is_queued_by_the_global_rule(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some((stage, _agent)) = start(datapath, family, &[OTHER])? else {
        return Ok(());
    };
    // A port of no PU: only the global rule can queue it (a's kernel
    // answers each SYN with a reset, which is not trapped).
    let to = SocketAddr::new(stage.server_ip(), OTHER_PORT);
    let syn = |from: IpAddr, port: u16, options: &[u8]| {
        stage
            .hosts
            .b
            .run(|| send_tcp_syn(from, port, to, options))?
    };
    let (target, other) = (source(family, TARGET), source(family, OTHER));
    syn(target, 40001, &[])?;
    assert_queued(&stage, &[], "a plain SYN to a port of no PU")?;
    syn(other, 40002, &OPTION_34)?;
    assert_queued(&stage, &[], "option 34 from outside the target networks")?;
    syn(target, 40003, &OPTION_34)?;
    assert_queued(&stage, &[("net-syn", 1)], "option 34 from a target network")?;
    // Among other options, anywhere: MSS, then NOPs, then option 34.
    syn(target, 40004, &[2, 4, 0x05, 0xb4, 1, 1, 34, 2])?;
    assert_queued(&stage, &[("net-syn", 2)], "option 34 after others")
}

fn a_datagram_with_the_signature_from_a_target_udp_network_is_queued(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some((stage, agent)) = start(datapath, family, &[ACL_PEER])? else {
        return Ok(());
    };
    let a = stage.server_ip();
    let other_port = UdpReceiver::start(&stage.hosts.a, SocketAddr::new(a, OTHER_PORT))?;
    let pu_port = UdpReceiver::start(&stage.hosts.a, SocketAddr::new(a, PU_UDP_PORT))?;
    let send = |from: u8, to: &UdpReceiver, payload: &str| -> Result<()> {
        let outcome = stage
            .hosts
            .b
            .run(|| udp_send(Some(source(family, from)), to.addr(), payload.as_bytes()))?;
        ensure!(
            outcome == Outcome::Exchanged,
            "sending {payload}: {outcome:?}"
        );
        Ok(())
    };
    let arrives = |to: &UdpReceiver, payload: &str| {
        to.wait_for(payload.as_bytes(), Duration::from_secs(2))
            .is_some()
    };

    // From an ACL peer to the PU's port: the ACL accepts, nothing trapped,
    // signature or not (it is no target).
    send(ACL_PEER, &pu_port, "acl-peer-plain")?;
    assert!(arrives(&pu_port, "acl-peer-plain"), "{}", agent.log());
    let signed_by_acl_peer = format!("acl-peer-{SIGNATURE}");
    send(ACL_PEER, &pu_port, &signed_by_acl_peer)?;
    assert!(arrives(&pu_port, &signed_by_acl_peer));
    assert_queued(&stage, &[], "an ACL peer is not a target")?;

    // From a target network to a port of no PU: only the signature is
    // trapped (and accepted), anywhere in the payload (SPEC, "Global
    // steering").
    send(TARGET, &other_port, "target-plain")?;
    assert!(arrives(&other_port, "target-plain"));
    assert_queued(&stage, &[], "no signature")?;
    let inside = format!("data {SIGNATURE} inside");
    send(TARGET, &other_port, &inside)?;
    assert!(arrives(&other_port, &inside), "{}", agent.log());
    assert_queued(
        &stage,
        &[("net-service", 1)],
        "the signature mid-payload from a target network",
    )?;
    let signed = format!("{SIGNATURE} handshake");
    send(TARGET, &other_port, &signed)?;
    assert!(arrives(&other_port, &signed), "{}", agent.log());
    assert_queued(
        &stage,
        &[("net-service", 2)],
        "the signature at the payload start from a target network",
    )
}

/// The peer's port for [`a_connection_reopening_a_closed_ones_ports_is_trapped_again`].
const REOPENED_PORT: u16 = 40123;

fn a_connection_reopening_a_closed_ones_ports_is_trapped_again(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    use std::io::{Read as _, Write as _};
    let Some((stage, agent)) = start(datapath, family, &[])? else {
        return Ok(());
    };
    let server = SocketAddr::new(stage.server_ip(), PU_TCP_PORT);
    // The PU's server echoes four bytes, then aborts the connection (a
    // reset from its side: conntrack then reuses the closed entry for the
    // next SYN on the same ports instead of making a new one).
    let listener = stage
        .hosts
        .a
        .run(|| std::net::TcpListener::bind(server))??;
    let _server = std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            let Ok(mut stream) = stream else { return };
            let mut ping = [0u8; 4];
            if stream.read_exact(&mut ping).is_ok() && stream.write_all(&ping).is_ok() {
                std::thread::sleep(Duration::from_millis(50));
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
        }
    });
    let from = SocketAddr::new(source(family, TARGET), REOPENED_PORT);
    let exchange = || -> Result<()> {
        stage.hosts.b.run(|| -> Result<()> {
            let mut stream = enforcer_tests::traffic::tcp_connect_bound(Some(from), server)?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            stream.write_all(b"ping")?;
            let mut back = [0u8; 4];
            stream.read_exact(&mut back)?;
            ensure!(&back == b"ping", "echo mismatch");
            // The server's reset ends it.
            let mut rest = Vec::new();
            ensure!(
                stream.read_to_end(&mut rest).is_err(),
                "the server aborts the connection"
            );
            Ok(())
        })?
    };
    exchange().map_err(|e| e.context(agent.log()))?;
    assert_queued(
        &stage,
        &[("app-synack", 1), ("net-ack", 1), ("net-syn", 1)],
        "the peer's SYN, the PU's SYN-ACK, the peer's first ACK",
    )?;
    exchange()?;
    // Its SYN and SYN-ACK reach user space again, where the handshake
    // decides (identity verified at both). Its first ACK does not: the
    // reused entry's packet count goes on from the old connection's, past
    // the first-ACK rule's bound (datapath/handshake.rs), so the
    // connection is not marked authorised and its later packets take the
    // PU chains' path instead of the connection-mark one.
    assert_queued(
        &stage,
        &[("app-synack", 2), ("net-ack", 1), ("net-syn", 2)],
        "the connection reopened on the same ports: its SYN and SYN-ACK are trapped again",
    )
}
