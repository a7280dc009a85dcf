//! The network side of a PU's policy, on both datapaths and both families:
//! connections *to* a PU's listening port are judged by the source — the
//! excluded networks untouched, the target networks trapped, the network
//! ACLs for everyone else, and the rest dropped — while ports of no PU are
//! left alone (SPEC, "Order of evaluation inside a PU", incoming).
//!
//! Host `a` runs the agent and a server on the PU's port 8080 (and on 9090,
//! no PU's port); host `b` connects from one source address per role.

use std::net::SocketAddr;

use anyhow::Result;
use enforcer_tests::{
    agent::Datapath,
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::{self, Family},
    nettool, on_both_datapaths_and_families,
    roles::{self, ACL_PEER, EXCLUDED, OTHER, TARGET, TARGET_NETS, source},
    traffic::{
        Outcome, PuEchoServer, TcpEchoServer, Transport, UdpReceiver, run_nettool,
        tcp_exchange_from, udp_exchange_from,
    },
    world::PuWorld,
};

const PU_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
/// A port the peers on `b` serve UDP on.
const PEER_PORT: u16 = 7000;

on_both_datapaths_and_families!(connections_to_a_pu_port_are_judged_by_their_source);

mod udp {
    use super::*;
    on_both_datapaths_and_families!(
        datagrams_to_a_pu_port_are_judged_by_their_source_and_answered,
        answers_to_what_a_pu_port_sends_come_back_in,
    );
}

fn config(cgroup: &Cgroup) -> String {
    Config::local_server()
        .target_tcp(TARGET_NETS)
        .target_udp(TARGET_NETS)
        .excluded(roles::networks(EXCLUDED))
        .pu(Pu::process_of("web", cgroup)
            .tcp_ports([PU_PORT])
            .network_acl(Acl::accept("from-acl-peer", roles::networks(ACL_PEER)).tcp([PU_PORT])))
        .to_toml()
}

/// UDP to a PU's port (SPEC: "UDP accepts add a reverse ESTABLISHED
/// accept on the other side"): the PU's server answers with `sendto`,
/// and the answer to a peer that only a *network* ACL accepts must get
/// out although no application ACL covers that peer; a peer no ACL
/// accepts gets nothing through; an excluded one is untouched.
fn datagrams_to_a_pu_port_are_judged_by_their_source_and_answered(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OTHER, EXCLUDED])? else {
        return Ok(());
    };
    let (hosts, server) = (&stage.hosts, SocketAddr::new(stage.server_ip(), PU_PORT));
    let _server = PuEchoServer::start(nettool!(), Transport::Udp, &stage.cgroup, &hosts.a, server)?;
    let config = Config::local_server()
        .target_tcp(TARGET_NETS)
        .target_udp(TARGET_NETS)
        .excluded(roles::networks(EXCLUDED))
        .pu(Pu::process_of("dns", &stage.cgroup)
            .udp_ports([PU_PORT])
            .network_acl(Acl::accept("from-acl-peer", roles::networks(ACL_PEER)).udp([PU_PORT])))
        .to_toml();
    let agent = stage.start(env!("CARGO_BIN_EXE_agent"), datapath, &config)?;
    let exchange = |role: u8, payload: &str| -> Result<Outcome> {
        let from = source(family, role);
        hosts
            .b
            .run(|| udp_exchange_from(Some(from), server, payload.as_bytes()))
    };
    assert_eq!(
        exchange(ACL_PEER, "from-acl-peer")?,
        Outcome::Exchanged,
        "a network ACL accepts the datagram, and the PU's answer goes back\n{}",
        agent.log()
    );
    assert_eq!(
        exchange(ACL_PEER, "again")?,
        Outcome::Exchanged,
        "the flow's next datagram and answer"
    );
    let blocked = exchange(OTHER, "from-other")?;
    assert!(blocked.is_blocked(), "no ACL: blocked, got {blocked:?}");
    assert_eq!(
        exchange(EXCLUDED, "from-excluded")?,
        Outcome::Exchanged,
        "excluded: untouched"
    );
    Ok(())
}

fn connections_to_a_pu_port_are_judged_by_their_source(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OTHER, EXCLUDED])? else {
        return Ok(());
    };
    let (hosts, server_ip) = (&stage.hosts, stage.server_ip());
    let _pu_server = TcpEchoServer::start(&hosts.a, SocketAddr::new(server_ip, PU_PORT))?;
    let _other_server = TcpEchoServer::start(&hosts.a, SocketAddr::new(server_ip, OTHER_PORT))?;
    let _agent = stage.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&stage.cgroup),
    )?;

    let connect = |role: u8, port: u16| -> Result<Outcome> {
        let (from, to) = (source(family, role), SocketAddr::new(server_ip, port));
        hosts.b.run(|| tcp_exchange_from(Some(from), to, b"ping"))
    };
    let queued = || -> Result<u64> {
        Ok(netfilter::queue_stats(&hosts.a)?
            .iter()
            .map(|q| u64::from(q.id_sequence))
            .sum())
    };
    assert_eq!(
        connect(ACL_PEER, PU_PORT)?,
        Outcome::Exchanged,
        "network ACL accepts"
    );
    let blocked = connect(OTHER, PU_PORT)?;
    assert!(blocked.is_blocked(), "no ACL: blocked, got {blocked:?}");
    assert_eq!(
        connect(EXCLUDED, PU_PORT)?,
        Outcome::Exchanged,
        "excluded: untouched"
    );
    assert_eq!(
        connect(OTHER, OTHER_PORT)?,
        Outcome::Exchanged,
        "not a PU port: untouched"
    );
    assert_eq!(queued()?, 0, "nothing trapped yet");
    assert_eq!(
        connect(TARGET, PU_PORT)?,
        Outcome::Exchanged,
        "target: trapped, accepted"
    );
    assert_eq!(
        queued()?,
        3,
        "only the set-up with the target network reaches user space: \
         its SYN, the PU's SYN-ACK and its first ACK"
    );
    Ok(())
}

/// The mirror of the case above: the PU's process sends from its own UDP
/// port to a peer only an *application* ACL accepts, and the peer's
/// answer to that port must come back in although no network ACL covers
/// the peer (the fallback accepts it as ESTABLISHED); a peer no ACL
/// accepts gets nothing out.
fn answers_to_what_a_pu_port_sends_come_back_in(datapath: Datapath, family: Family) -> Result<()> {
    let Some(stage) = PuWorld::with_roles(family, &[ACL_PEER, OTHER])? else {
        return Ok(());
    };
    let hosts = &stage.hosts;
    let peer = |role: u8| SocketAddr::new(source(family, role), PEER_PORT);
    let _echo = [ACL_PEER, OTHER]
        .map(|role| UdpReceiver::echoing(&hosts.b, peer(role)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let config = Config::local_server()
        .target_tcp(TARGET_NETS)
        .target_udp(TARGET_NETS)
        .excluded(roles::networks(EXCLUDED))
        .pu(Pu::process_of("dns", &stage.cgroup)
            .udp_ports([PU_PORT])
            .application_acl(
                Acl::accept("to-acl-peer", roles::networks(ACL_PEER)).udp([PEER_PORT]),
            ))
        .to_toml();
    let agent = stage.start(env!("CARGO_BIN_EXE_agent"), datapath, &config)?;
    let exchange = |role: u8| -> Result<Outcome> {
        let mut cmd = stage.cgroup.command_in(&hosts.a, nettool!())?;
        let (to, sport) = (peer(role).to_string(), PU_PORT.to_string());
        cmd.args(["udp-exchange", &to, "--sport", &sport, "--count", "2"]);
        run_nettool(cmd)
    };
    assert_eq!(
        exchange(ACL_PEER)?,
        Outcome::Exchanged,
        "an application ACL accepts the datagram from the PU's port, and \
         the peer's answers come back to it\n{}",
        agent.log()
    );
    let blocked = exchange(OTHER)?;
    assert!(blocked.is_blocked(), "no ACL: blocked, got {blocked:?}");
    Ok(())
}
