//! Removing a UDP target network (SPEC, `set_target_networks`: "removing
//! a UDP target flushes its conntrack entries"), on both datapaths and in
//! both families, through the real agent and SIGHUP.
//!
//! A PU's connected UDP flow to a peer in a target UDP network is trapped
//! and accepted; then a reload takes the peer's network out of the target
//! UDP networks. The flow's conntrack entry (which carried the trap's
//! verdict) must be gone, and the flow's next datagram must get the PU's
//! ACL verdict: dropped when no ACL accepts the peer (the final drop),
//! delivered when one does.

use std::time::Duration;

use anyhow::Result;
use enforcer_tests::{
    agent::Datapath,
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::Family,
    nettool, privilege,
    traffic::UdpReceiver,
    world::{Peer, PuWorld},
};

/// The peer whose network stops being a UDP target.
const PEER: Peer = Peer {
    addr: ["10.5.0.2", "fd00:5::2"],
    nets: ["10.5.0.0/16", "fd00:5::/64"],
};
/// A target UDP network that stays (an empty list would mean everything).
const STAYS: [&str; 2] = ["10.1.0.0/24", "fd00:1::/64"];

enforcer_tests::on_both_datapaths_and_families!(
    a_flow_to_a_removed_udp_target_meets_the_final_drop,
    a_flow_to_a_removed_udp_target_meets_an_accepting_acl,
);

/// One PU `web`; `peer_is_target` puts [`PEER`]'s networks in the target
/// UDP networks beside [`STAYS`]; `acl` adds a protocol-any accept ACL for
/// them (protocol-any ACLs come after the trap, so it decides only once
/// the peer is no target).
fn config(cgroup: &Cgroup, peer_is_target: bool, acl: bool) -> String {
    let mut udp: Vec<&str> = STAYS.to_vec();
    if peer_is_target {
        udp.extend(PEER.nets);
    }
    let mut web = Pu::process_of("web", cgroup);
    if acl {
        web = web.application_acl(Acl::accept("peer", PEER.nets).any());
    }
    Config::local_server()
        .target_tcp(STAYS)
        .target_udp(udp)
        .pu(web)
        .to_toml()
}

/// The flow is trapped and accepted; the peer's network leaves the UDP
/// targets; its entry is gone; the next datagram meets the PU's ACLs
/// (`acl`: one accepts the peer; else none does).
fn run(datapath: Datapath, family: Family, acl: bool) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = PuWorld::new(&env, family, &[PEER])?;
    let peer = UdpReceiver::start(&w.hosts.b, w.addr(PEER))?;
    let agent = w.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&w.cgroup, true, acl),
    )?;
    let mut flow = w.udp_flow(nettool!(), w.addr(PEER))?;
    let wait = Duration::from_secs(2);

    assert_eq!(flow.send("first")?, None);
    assert!(
        peer.wait_for(b"first", wait).is_some(),
        "the trapped datagram is accepted:\n{}",
        agent.log()
    );
    assert_eq!(
        w.kernel_queued()?,
        1,
        "the flow's first datagram is trapped"
    );
    assert_eq!(flow.send("second")?, None);
    assert!(peer.wait_for(b"second", wait).is_some());
    assert_eq!(
        w.kernel_queued()?,
        1,
        "once decided, the flow is not trapped again"
    );
    assert_eq!(w.udp_entries(PEER)?.len(), 1, "the flow's entry");

    agent.reload(&config(&w.cgroup, false, acl))?;
    let entries = w.udp_entries(PEER)?;
    assert!(
        entries.is_empty(),
        "the flow's conntrack entry must be forgotten with its target network: {entries:#?}\n{}",
        agent.log()
    );

    let sent = flow.send("third")?;
    let arrived = peer.wait_for(
        b"third",
        Duration::from_millis(if acl { 2000 } else { 500 }),
    );
    if acl {
        assert_eq!(sent, None, "the ACL accepts the peer: the socket sends");
        assert!(
            arrived.is_some(),
            "the ACL accepts the peer: the next datagram arrives\n{}",
            agent.log()
        );
    } else {
        assert!(
            arrived.is_none(),
            "no ACL accepts the peer: the next datagram must not arrive (socket said {sent:?})\n{}",
            agent.log()
        );
        eprintln!("{datapath:?} {family:?}: the next datagram: {sent:?}, not delivered");
    }
    Ok(())
}

fn a_flow_to_a_removed_udp_target_meets_the_final_drop(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    run(datapath, family, false)
}

fn a_flow_to_a_removed_udp_target_meets_an_accepting_acl(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    run(datapath, family, true)
}
