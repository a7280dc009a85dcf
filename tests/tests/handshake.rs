//! The identity handshake between two agents (issue 7), on both datapaths
//! and in both families: two "hosts", each a namespace running its own
//! agent with its own key pair and trusting the other's
//! ([`enforcer_tests::two_agents`]).
//!
//! What is asserted is what applications and peers see — a connection
//! exchanges data or is blocked, the server accepts it or never sees it,
//! a SYN-ACK comes back on the wire or not — plus the agents' handshake
//! counters (the reason of each refusal), their flow logs, and the
//! kernel's own NFQUEUE counters, which show that after the handshake no
//! packet of the connection reaches user space.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use enforcer::identity::keys::{self, KeyFiles};
use enforcer::identity::{Handshaker, Labels, Window, wire};
use enforcer_tests::{
    agent::{Agent, Datapath},
    config::Acl,
    netfilter::Family,
    nettool, privilege,
    traffic::{Outcome, PuEchoServer, Transport, UdpReceiver, run_nettool},
    two_agents::{
        Capture, Host, LINK, PORT, TwoAgents, handshake_count, is_syn, is_syn_ack, syn_with_token,
        udp_of, wait_for_count,
    },
    world::UdpFlow,
};

enforcer_tests::on_both_datapaths_and_families!(
    an_allowed_identity_connects_and_only_its_handshake_reaches_user_space,
    a_disallowed_identity_is_refused,
    a_token_of_an_untrusted_key_is_refused,
    a_key_removed_from_the_trust_store_by_a_reload_is_refused,
    a_peer_without_an_agent_is_judged_by_the_acls,
    a_server_without_an_agent_is_judged_by_the_application_acls,
    udp_with_a_target_is_judged_by_the_acls,
    udp_an_allowed_identity_exchanges_and_only_its_handshake_reaches_user_space,
    udp_a_disallowed_identity_never_arrives,
    udp_an_answer_the_application_policy_refuses_lets_nothing_through,
    udp_a_refused_identity_stays_refused_where_the_acls_accept_the_peer,
    udp_a_refused_identity_stays_refused_when_the_refusal_cannot_be_verified,
    udp_an_authorised_flow_carries_the_signature_as_data,
    udp_an_answer_that_does_not_verify_does_not_end_the_wait,
    a_replayed_syn_is_refused,
    a_tampered_token_is_refused,
);

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
/// How long to wait for an answer that must not come.
const STAYS_AWAY: Duration = Duration::from_millis(1500);
const COMES: Duration = Duration::from_secs(3);

/// The two hosts of each test, or `None` where privileged tests are
/// skipped on purpose ([`privilege::require_then`]).
fn two_agents(family: Family) -> Result<Option<TwoAgents>> {
    privilege::require_then(|env| TwoAgents::new(env, family, nettool!()))
}

/// Both agents, with the usual configs; `a` signs with `a_key`.
fn both(w: &TwoAgents, datapath: Datapath, a_key: &str) -> Result<(Agent, Agent)> {
    let b = w.start(Host::B, AGENT, datapath, &w.config_b().to_toml())?;
    let a = w.start(Host::A, AGENT, datapath, &w.config_a(a_key).to_toml())?;
    Ok((a, b))
}

fn an_allowed_identity_connects_and_only_its_handshake_reaches_user_space(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let (a, b) = both(&w, datapath, "a")?;
    assert_eq!(w.connect(nettool!(), &w.web, "hello")?, Outcome::Exchanged);
    assert_eq!(w.accepted(1), 1, "the server saw the connection");
    // The initiator's agent sees the SYN it signs and the SYN-ACK it
    // checks; the responder's the SYN, its SYN-ACK and the first ACK.
    // Nothing else: the connection mark keeps the rest in the kernel. (A
    // retransmitted SYN would be queued too: one is tolerated.)
    let first = (w.queued(Host::A)?, w.queued(Host::B)?);
    assert!(
        (2..=3).contains(&first.0) && (3..=4).contains(&first.1),
        "packets queued on a and b for one connection: {first:?}"
    );

    // A connection that moves a hundred segments each way: still only
    // its handshake reaches user space.
    let big = "x".repeat(100_000);
    assert_eq!(w.connect(nettool!(), &w.web, &big)?, Outcome::Exchanged);
    let second = (w.queued(Host::A)? - first.0, w.queued(Host::B)? - first.1);
    assert!(
        (2..=3).contains(&second.0) && (3..=4).contains(&second.1),
        "packets queued on a and b for a 100 kB exchange: {second:?}"
    );
    // By queue range: the initiator's SYNs and the SYN-ACKs it checked;
    // the responder's SYNs, SYN-ACKs and first ACKs. The initiator's ACK
    // and everything after it stayed in the kernel.
    let ranges = |host| -> Result<Vec<&str>> {
        Ok(w.queued_by_range(host)?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    };
    assert_eq!(ranges(Host::A)?, ["app-syn", "net-synack"]);
    assert_eq!(ranges(Host::B)?, ["app-synack", "net-syn", "net-ack"]);
    let acks = w.queued_by_range(Host::B)?;
    assert_eq!(acks.last(), Some(&("net-ack", 2)), "one first ACK each");
    assert_eq!(handshake_count(&a, "allowed")?, 2);
    assert_eq!(handshake_count(&b, "allowed")?, 2);
    assert_eq!(handshake_count(&b, "authorised")?, 2);

    // Each agent logged its decisions with both identities.
    let lines = w.flow_lines(Host::B);
    let decided: Vec<_> = lines
        .iter()
        .filter(|l| l["handshake"]["reason"] == "allowed")
        .collect();
    assert_eq!(decided.len(), 2, "b's flow log: {lines:#?}");
    let line = decided[0];
    assert_eq!(line["pu"], "db");
    assert_eq!(line["policy_id"], "web-in");
    assert_eq!(line["action"], "accept");
    assert_eq!(line["direction"], "net");
    assert_eq!(line["handshake"]["labels"], "app=db");
    assert_eq!(line["handshake"]["peer_labels"], "app=web");
    let lines = w.flow_lines(Host::A);
    let line = lines
        .iter()
        .find(|l| l["handshake"]["reason"] == "allowed")
        .with_context(|| format!("a's flow log: {lines:#?}"))?;
    assert_eq!(line["pu"], "web");
    assert_eq!(line["policy_id"], "to-db");
    assert_eq!(line["handshake"]["peer_labels"], "app=db");
    Ok(())
}

fn a_disallowed_identity_is_refused(datapath: Datapath, family: Family) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let (_a, b) = both(&w, datapath, "a")?;
    let refused = w.connect(nettool!(), &w.batch, "hello")?;
    assert!(refused.is_blocked(), "app=batch got {refused:?}");
    assert_eq!(w.accepted(0), 0, "the server saw it");
    assert!(handshake_count(&b, "not-allowed-by-policy")? >= 1);
    let lines = w.flow_lines(Host::B);
    assert!(
        lines.iter().any(|l| l["action"] == "reject"
            && l["handshake"]["reason"] == "not-allowed-by-policy"
            && l["handshake"]["peer_labels"] == "app=batch"),
        "b's flow log: {lines:#?}"
    );
    // The allowed identity still gets through.
    assert_eq!(w.connect(nettool!(), &w.web, "hello")?, Outcome::Exchanged);
    Ok(())
}

fn a_token_of_an_untrusted_key_is_refused(datapath: Datapath, family: Family) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    // Host a's agent signs with a key b does not trust.
    let (_a, b) = both(&w, datapath, "stranger")?;
    let refused = w.connect(nettool!(), &w.web, "hello")?;
    assert!(refused.is_blocked(), "got {refused:?}");
    assert_eq!(w.accepted(0), 0, "the server saw it");
    assert!(handshake_count(&b, "untrusted-key")? >= 1);
    Ok(())
}

/// Revocation (docs/identity.md, "Key rotation"): b stops trusting a's
/// key by a reload, without a restart.
fn a_key_removed_from_the_trust_store_by_a_reload_is_refused(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let (_a, b) = both(&w, datapath, "a")?;
    assert_eq!(w.connect(nettool!(), &w.web, "hello")?, Outcome::Exchanged);
    let revoked = enforcer_tests::config::Config::local_server()
        .target_tcp(LINK)
        .flow_log_file(&w.flows[1])
        .identity(&w.keys.key("b"), [w.keys.public("stranger")])
        .pu(w.db_pu())
        .to_toml();
    b.reload(&revoked)?;
    assert_eq!(b.reloads()?.applied, 1, "{:?}", b.reloads()?);
    let refused = w.connect(nettool!(), &w.web, "hello")?;
    assert!(refused.is_blocked(), "a's key revoked: got {refused:?}");
    assert!(handshake_count(&b, "untrusted-key")? >= 1);
    // And trusted again.
    b.reload(&w.config_b().to_toml())?;
    assert_eq!(w.connect(nettool!(), &w.web, "hello")?, Outcome::Exchanged);
    Ok(())
}

fn a_peer_without_an_agent_is_judged_by_the_acls(datapath: Datapath, family: Family) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    // Only b runs an agent: a's SYNs carry no token.
    let b = w.start(Host::B, AGENT, datapath, &w.config_b().to_toml())?;
    let refused = w.connect(nettool!(), &w.web, "hello")?;
    assert!(refused.is_blocked(), "no token, no ACL: got {refused:?}");
    assert_eq!(w.accepted(0), 0, "the server saw it");
    assert!(handshake_count(&b, "no-token")? >= 1);

    // An ACL accepting a's network lets it in, as an external peer.
    let db = w
        .db_pu()
        .network_acl(Acl::accept("link-in", LINK).tcp([PORT]));
    let config = w.config_b_with(db).to_toml();
    b.reload(&config)?;
    assert_eq!(b.reloads()?.applied, 1, "{:?}", b.reloads()?);
    assert_eq!(w.connect(nettool!(), &w.web, "hello")?, Outcome::Exchanged);
    // At least once: a SYN resent before the verdict is judged again.
    assert!(handshake_count(&b, "external-allowed")? >= 1);
    let lines = w.flow_lines(Host::B);
    assert!(
        lines.iter().any(|l| l["action"] == "accept"
            && l["policy_id"] == "link-in"
            && l["handshake"]["reason"] == "no-token"),
        "b's flow log: {lines:#?}"
    );
    Ok(())
}

fn a_server_without_an_agent_is_judged_by_the_application_acls(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    // Only a runs an agent: its SYNs carry a token b's kernel ignores (a
    // SYN's payload is not accepted without a Fast Open cookie), b's
    // SYN-ACK carries none.
    let a = w.start(Host::A, AGENT, datapath, &w.config_a("a").to_toml())?;
    let refused = w.connect(nettool!(), &w.web, "hello")?;
    assert!(
        refused.is_blocked(),
        "no token back, no ACL: got {refused:?}"
    );
    assert!(handshake_count(&a, "no-token")? >= 1);
    // An application ACL for b's network accepts it as an external peer;
    // the data that follows is the application's own, the token never
    // reached b's application.
    let web = enforcer_tests::config::Pu::process_of("web", &w.web)
        .label("app", "web")
        .application_policy("to-db", &["app=db"], [PORT])
        .application_acl(Acl::accept("link-out", LINK).tcp([PORT]));
    let config = enforcer_tests::config::Config::local_server()
        .target_tcp(LINK)
        .flow_log_file(&w.flows[0])
        .identity(&w.keys.key("a"), [w.keys.public("b")])
        .pu(web)
        .to_toml();
    a.reload(&config)?;
    assert_eq!(a.reloads()?.applied, 1, "{:?}", a.reloads()?);
    assert_eq!(w.connect(nettool!(), &w.web, "hello")?, Outcome::Exchanged);
    // At least once: under load the server's SYN-ACK may be resent
    // before the verdict on the first, and each copy is judged.
    assert!(handshake_count(&a, "external-allowed")? >= 1);
    let lines = w.flow_lines(Host::A);
    assert!(
        lines.iter().any(|l| l["action"] == "accept"
            && l["policy_id"] == "link-out"
            && l["direction"] == "app"
            && l["handshake"]["reason"] == "no-token"),
        "a's flow log: {lines:#?}"
    );
    Ok(())
}

/// A peer without an agent: with `[identity]`, a PU's datagram to a
/// target UDP network is held while its handshake datagram goes out; no
/// answer comes (b runs no agent), so at the timeout its application ACLs
/// judge it, as an external peer's — the PU found by its socket's cgroup.
fn udp_with_a_target_is_judged_by_the_acls(datapath: Datapath, family: Family) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let a = a_alone_web_to_udp_7001(&w, datapath)?;
    let ip = w.server_addr().ip();
    let receivers =
        [7001, 7002].map(|port| UdpReceiver::start(&w.hosts.b, SocketAddr::new(ip, port)));
    let [accepted, refused] = receivers;
    let (accepted, refused) = (accepted?, refused?);
    // Connected sockets that stay open while the agent looks them up (a
    // one-shot `sendto` whose socket closes first is refused: its PU can
    // no longer be found).
    let mut flows = Vec::new();
    for (to, payload) in [(&accepted, "to-7001"), (&refused, "to-7002")] {
        let mut flow = UdpFlow::start(nettool!(), &w.web, &w.hosts.a, to.addr())?;
        assert_eq!(flow.send(payload)?, None, "sending {payload}");
        flows.push(flow);
    }
    assert!(
        accepted.wait_for(b"to-7001", COMES).is_some(),
        "the ACL's port"
    );
    assert!(
        refused.wait_for(b"to-7002", STAYS_AWAY).is_none(),
        "no ACL for 7002"
    );
    drop(flows);
    assert_eq!(handshake_count(&a, "external-allowed")?, 1);
    assert_eq!(handshake_count(&a, "no-token")?, 1);
    assert_eq!(handshake_count(&a, "unknown-pu")?, 0);
    Ok(())
}

/// The UDP port of `db` in the UDP handshake tests.
const UDP_PORT: u16 = 7101;
/// A port of `db` where a receiver (no echo) shows what arrived.
const UDP_SINK: u16 = 7102;

/// Both agents with `target_udp`, `db` on [`UDP_PORT`] and [`UDP_SINK`]
/// reachable by `app=web`, and `web` and `batch` allowed to reach
/// `app=db` there.
fn both_udp(w: &TwoAgents, datapath: Datapath) -> Result<(Agent, Agent)> {
    both_udp_to(w, datapath, &["app=db"])
}

/// [`both_udp`], `web` and `batch` allowed to reach the identities `to`.
fn both_udp_to(w: &TwoAgents, datapath: Datapath, to: &[&str]) -> Result<(Agent, Agent)> {
    use enforcer_tests::config::{Config, Pu};
    let db = Pu::process_of("db", &w.db)
        .label("app", "db")
        .tcp_ports([PORT])
        .udp_ports([UDP_PORT, UDP_SINK])
        .network_policy("web-in", &["app=web"], [PORT, UDP_PORT, UDP_SINK]);
    let b = w.config_b_with(db).target_udp(LINK);
    let client = |id: &str, cgroup| {
        Pu::process_of(id, cgroup)
            .label("app", id)
            .application_policy("to-db", to, [PORT, UDP_PORT, UDP_SINK])
    };
    let a = Config::local_server()
        .target_tcp(LINK)
        .target_udp(LINK)
        .flow_log_file(&w.flows[0])
        .identity(&w.keys.key("a"), [w.keys.public("b")])
        .pu(client("web", &w.web))
        .pu(client("batch", &w.batch));
    let b = w.start(Host::B, AGENT, datapath, &b.to_toml())?;
    let a = w.start(Host::A, AGENT, datapath, &a.to_toml())?;
    Ok((a, b))
}

/// A receiver (no echo) on db's [`UDP_SINK`], on b.
fn udp_sink(w: &TwoAgents) -> Result<UdpReceiver> {
    UdpReceiver::start(&w.hosts.b, SocketAddr::new(w.server_addr().ip(), UDP_SINK))
}

/// Only a's agent (b runs none), with `target_udp` and web's application
/// ACL accepting UDP to the link on port 7001: whatever b does not
/// answer is judged by that ACL.
fn a_alone_web_to_udp_7001(w: &TwoAgents, datapath: Datapath) -> Result<Agent> {
    let web = enforcer_tests::config::Pu::process_of("web", &w.web)
        .label("app", "web")
        .application_acl(Acl::accept("dns-out", LINK).udp([7001]));
    let config = enforcer_tests::config::Config::local_server()
        .target_tcp(LINK)
        .target_udp(LINK)
        .flow_log_file(&w.flows[0])
        .identity(&w.keys.key("a"), [w.keys.public("b")])
        .pu(web)
        .to_toml();
    w.start(Host::A, AGENT, datapath, &config)
}

/// `count` UDP round trips of one flow from a process in `cgroup` on a
/// to `to`.
fn udp_exchanges(
    w: &TwoAgents,
    cgroup: &enforcer_tests::cgroup::Cgroup,
    to: SocketAddr,
    payload: &str,
    count: u32,
) -> Result<Outcome> {
    let mut cmd = cgroup.command_in(&w.hosts.a, nettool!())?;
    cmd.args([
        "udp-exchange",
        &to.to_string(),
        "--payload",
        payload,
        "--count",
        &count.to_string(),
    ]);
    run_nettool(cmd)
}

/// The seed's UDP handshake: web's first datagram is held while a's
/// agent sends the signature datagram, b's agent answers, a's releases
/// it; the flow is then authorised on both sides, so of 20 round trips
/// only the handshake reaches user space (the kernel's queue counters).
fn udp_an_allowed_identity_exchanges_and_only_its_handshake_reaches_user_space(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let ip = w.server_addr().ip();
    let to = SocketAddr::new(ip, UDP_PORT);
    let _echo = PuEchoServer::start(nettool!(), Transport::Udp, &w.db, &w.hosts.b, to)?;
    let (a, b) = both_udp(&w, datapath)?;
    let before = (w.queued(Host::A)?, w.queued(Host::B)?);
    assert_eq!(
        udp_exchanges(&w, &w.web, to, "hello", 20)?,
        Outcome::Exchanged
    );
    // a: the first datagram (held) and b's answer; b: a's handshake.
    let after = (w.queued(Host::A)? - before.0, w.queued(Host::B)? - before.1);
    assert_eq!(
        after,
        (2, 1),
        "packets queued on a and b for 20 round trips"
    );
    assert_eq!(
        w.queued_by_range(Host::A)?,
        [("app-service", 1), ("net-service", 1)]
    );
    assert_eq!(w.queued_by_range(Host::B)?, [("net-service", 1)]);
    assert_eq!(handshake_count(&a, "allowed")?, 1);
    assert_eq!(handshake_count(&b, "allowed")?, 1);
    assert_eq!(handshake_count(&a, "authorised")?, 1);
    assert_eq!(handshake_count(&b, "authorised")?, 1);

    // The application never sees the handshake: a receiver gets exactly
    // what web sent.
    let sink = udp_sink(&w)?;
    let _ = udp_exchanges(&w, &w.web, sink.addr(), "to-the-sink", 1)?;
    assert!(
        sink.wait_for(b"to-the-sink", COMES).is_some(),
        "web's datagram arrives"
    );
    assert_eq!(sink.received(), 1, "only web's datagram arrived");

    let lines = w.flow_lines(Host::B);
    let line = lines
        .iter()
        .find(|l| l["handshake"]["reason"] == "allowed" && l["protocol"] == "udp")
        .with_context(|| format!("b's flow log: {lines:#?}"))?;
    assert_eq!(line["pu"], "db");
    assert_eq!(line["policy_id"], "web-in");
    assert_eq!(line["handshake"]["peer_labels"], "app=web");
    let lines = w.flow_lines(Host::A);
    let line = lines
        .iter()
        .find(|l| l["handshake"]["reason"] == "allowed" && l["protocol"] == "udp")
        .with_context(|| format!("a's flow log: {lines:#?}"))?;
    assert_eq!(
        (&line["pu"], &line["direction"]),
        (&"web".into(), &"app".into())
    );
    assert_eq!(line["handshake"]["peer_labels"], "app=db");
    Ok(())
}

/// `batch` is not `app=web`: b's agent refuses its handshake with a
/// signed refusal, which a's agent verifies: nothing of batch's ever
/// reaches db's socket, and no ACL is asked.
fn udp_a_disallowed_identity_never_arrives(datapath: Datapath, family: Family) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let sink = udp_sink(&w)?;
    let (a, b) = both_udp(&w, datapath)?;
    let outcome = udp_exchanges(&w, &w.batch, sink.addr(), "from-batch", 1)?;
    assert_ne!(outcome, Outcome::Exchanged);
    assert!(sink.wait_for(b"from-batch", STAYS_AWAY).is_none());
    assert_eq!(sink.received(), 0, "not even the handshake datagram");
    assert_eq!(handshake_count(&b, "not-allowed-by-policy")?, 1);
    assert_eq!(wait_for_count(&a, "refused-by-peer", 1, COMES)?, 1);
    assert_eq!(handshake_count(&a, "no-token")?, 0);
    assert_eq!(handshake_count(&a, "allowed")?, 0);
    Ok(())
}

/// b's agent allows web and answers, but web may only reach `app=cache`:
/// a's agent refuses the answer. The answer went through conntrack, so
/// the flow's entry has seen a reply; its later datagrams must still be
/// judged (and refused), not let through as an established flow.
fn udp_an_answer_the_application_policy_refuses_lets_nothing_through(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let sink = udp_sink(&w)?;
    let (a, b) = both_udp_to(&w, datapath, &["app=cache"])?;
    let mut flow = UdpFlow::start(nettool!(), &w.web, &w.hosts.a, sink.addr())?;
    assert_eq!(flow.send("one")?, None);
    wait_for_count(&a, "not-allowed-by-policy", 1, COMES)?;
    std::thread::sleep(Duration::from_millis(200));
    for payload in ["two", "three"] {
        assert_eq!(flow.send(payload)?, None);
        std::thread::sleep(Duration::from_millis(300));
    }
    let st = a.status()?;
    eprintln!(
        "DEBUG a {:?} {}",
        w.queued_by_range(Host::A)?,
        st["trap"]["handshake"]
    );
    eprintln!(
        "DEBUG b {:?} {}",
        w.queued_by_range(Host::B)?,
        b.status()?["trap"]["handshake"]
    );
    assert!(sink.wait_for(b"three", STAYS_AWAY).is_none());
    assert_eq!(sink.received(), 0, "nothing of web's flow arrived");
    assert!(handshake_count(&b, "allowed")? >= 1);
    // Each later datagram was trapped and judged again (its flow's
    // conntrack entry forgotten after the refusal).
    let app = w
        .queued_by_range(Host::A)?
        .into_iter()
        .find(|(r, _)| *r == "app-service");
    assert_eq!(
        app,
        Some(("app-service", 3)),
        "web's three datagrams trapped"
    );
    Ok(())
}

/// `batch`'s identity is refused by b's agent while both hosts' ACLs
/// accept the peer (a's application ACL, b's network ACL, on the sink's
/// port). A refused identity is not a peer without an agent: b answers a
/// signed refusal, a drops the held datagrams and the flow's later ones,
/// and nothing of batch's arrives however long it sends. (Before the fix,
/// a's wait ended at 1 s as if b had no agent, a's ACL released the
/// datagrams and b's ACL took them as an external peer's.)
fn udp_a_refused_identity_stays_refused_where_the_acls_accept_the_peer(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    refused_identity_with_accepting_acls(datapath, family, true)
}

/// As above, but a's agent trusts no key of b's, so it cannot verify b's
/// refusal: its wait ends at the timeout and its ACL releases the flow;
/// b's agent remembers the flow it refused and drops what follows rather
/// than judging it by its ACLs as a peer without an agent.
fn udp_a_refused_identity_stays_refused_when_the_refusal_cannot_be_verified(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    refused_identity_with_accepting_acls(datapath, family, false)
}

fn refused_identity_with_accepting_acls(
    datapath: Datapath,
    family: Family,
    a_trusts_b: bool,
) -> Result<()> {
    use enforcer_tests::config::{Config, Pu};
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let sink = udp_sink(&w)?;
    let db = Pu::process_of("db", &w.db)
        .label("app", "db")
        .tcp_ports([PORT])
        .udp_ports([UDP_PORT, UDP_SINK])
        .network_policy("web-in", &["app=web"], [UDP_SINK])
        .network_acl(Acl::accept("link-in", LINK).udp([UDP_SINK]));
    let b = w.config_b_with(db).target_udp(LINK);
    let batch = Pu::process_of("batch", &w.batch)
        .label("app", "batch")
        .application_policy("to-db", &["app=db"], [UDP_SINK])
        .application_acl(Acl::accept("link-out", LINK).udp([UDP_SINK]));
    let trusted = if a_trusts_b {
        vec![w.keys.public("b")]
    } else {
        vec![w.keys.public("stranger")]
    };
    let a = Config::local_server()
        .target_tcp(LINK)
        .target_udp(LINK)
        .flow_log_file(&w.flows[0])
        .identity(&w.keys.key("a"), trusted)
        .pu(batch);
    let b = w.start(Host::B, AGENT, datapath, &b.to_toml())?;
    let a = w.start(Host::A, AGENT, datapath, &a.to_toml())?;
    let mut flow = UdpFlow::start(nettool!(), &w.batch, &w.hosts.a, sink.addr())?;
    // 3.6 s of sending: well past a's 1 s wait.
    for i in 0..12 {
        assert_eq!(flow.send(&format!("from-batch-{i}"))?, None);
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(STAYS_AWAY);
    assert_eq!(
        sink.received(),
        0,
        "batch's datagrams arrived (a: {}, b: {})",
        a.status()?["trap"]["handshake"],
        b.status()?["trap"]["handshake"]
    );
    assert!(handshake_count(&b, "not-allowed-by-policy")? >= 1);
    assert_eq!(handshake_count(&b, "external-allowed")?, 0);
    if a_trusts_b {
        assert!(handshake_count(&a, "refused-by-peer")? >= 1);
        assert_eq!(handshake_count(&a, "external-allowed")?, 0);
    } else {
        assert!(handshake_count(&b, "refused-flow")? >= 1);
    }
    Ok(())
}

/// Once a flow is authorised its datagrams are data, whatever they
/// carry: the signature in the middle, the signature at the start, a
/// 6 KiB datagram (beyond the trap's 4 KiB copy range) with the signature
/// inside — all arrive, also after the 10 s the engine remembers a
/// decided flow. SPEC's global rule traps each of them (the signature,
/// anywhere, before the accepts of decided flows); b's consumer knows
/// the flow by its connection mark and lets each on unchanged
/// (`decided-flow-data`), without reading it as a handshake.
fn udp_an_authorised_flow_carries_the_signature_as_data(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let sink = udp_sink(&w)?;
    let (_a, b) = both_udp(&w, datapath)?;
    let mut flow = UdpFlow::start(nettool!(), &w.web, &w.hosts.a, sink.addr())?;
    assert_eq!(flow.send("first")?, None);
    assert!(sink.wait_for(b"first", COMES).is_some(), "the handshake");
    let sig = std::str::from_utf8(wire::UDP_SIGNATURE)?;
    let payloads = [
        format!("data {sig} in the middle"),
        format!("{sig}-not-a-token"),
        format!("{}{sig}{}", "x".repeat(3000), "y".repeat(3000)),
    ];
    for payload in &payloads {
        assert_eq!(flow.send(payload)?, None);
        assert!(
            sink.wait_for(payload.as_bytes(), COMES).is_some(),
            "{} bytes ({}…) did not arrive",
            payload.len(),
            &payload[..24]
        );
    }
    // Past the time a decided flow is remembered (10 s).
    std::thread::sleep(Duration::from_millis(10_500));
    let late = format!("late {sig} in the middle");
    assert_eq!(flow.send(&late)?, None);
    assert!(sink.wait_for(late.as_bytes(), COMES).is_some(), "{late}");
    // The handshake, then the four datagrams carrying the signature.
    assert_eq!(w.queued_by_range(Host::B)?, [("net-service", 5)]);
    assert_eq!(handshake_count(&b, "decided-flow-data")?, 4);
    assert_eq!(handshake_count(&b, "bad-packet")?, 0);
    assert_eq!(handshake_count(&b, "allowed")?, 1);
    Ok(())
}

/// A spoofed answer — a datagram with the signature, from the peer's
/// address and port to the waiting flow's, whose token does not verify
/// (a stranger's, garbage) — is dropped and counted and does not end
/// the wait: b runs no agent, so web's flow is still decided at the
/// timeout by a's ACL, as without the spoof. (Before the fix, the first
/// spoof ended the wait and dropped the held datagram.)
fn udp_an_answer_that_does_not_verify_does_not_end_the_wait(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let a = a_alone_web_to_udp_7001(&w, datapath)?;
    let to = SocketAddr::new(w.server_addr().ip(), 7001);
    let receiver = UdpReceiver::start(&w.hosts.b, to)?;
    let on_b = Capture::start(&w.hosts.b, &w.hosts.b_end.ifname)?;
    let mut flow = UdpFlow::start(nettool!(), &w.web, &w.hosts.a, to)?;
    assert_eq!(flow.send("to-7001")?, None);
    let handshake = on_b
        .wait_for_udp(COMES, |_, dport, payload| {
            dport == 7001 && payload.starts_with(wire::UDP_SIGNATURE)
        })
        .context("no handshake datagram seen on b's veth")?;
    let (sport, _, _) = udp_of(&handshake).context("a UDP datagram")?;
    let web_addr = SocketAddr::new(w.hosts.a_end.ip(family), sport);
    let stranger = keys::load(&KeyFiles {
        key: w.keys.key("stranger"),
        trusted: vec![],
    })?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let strangers = Handshaker::new(stranger, Window::default())
        .syn_ack(&Labels::new([("app", "db")])?, &[0; 16], now)?
        .token;
    for token in [strangers, b"garbage-token".to_vec()] {
        w.send_raw(Host::B, &wire::udp_handshake(to, web_addr, &token)?)?;
    }
    assert!(
        receiver.wait_for(b"to-7001", COMES).is_some(),
        "web's datagram, let through by the ACL at the timeout (a: {})",
        a.status()?["trap"]["handshake"]
    );
    assert_eq!(handshake_count(&a, "untrusted-key")?, 1);
    assert_eq!(handshake_count(&a, "bad-token")?, 1);
    assert_eq!(handshake_count(&a, "external-allowed")?, 1);
    drop(flow);
    Ok(())
}

/// Takes the first SYN `web` sends to the server off b's veth: a SYN
/// with a's token, as a's agent made it.
fn captured_syn(w: &TwoAgents) -> Result<Vec<u8>> {
    let capture = Capture::start(&w.hosts.b, &w.hosts.b_end.ifname)?;
    assert_eq!(w.connect(nettool!(), &w.web, "hello")?, Outcome::Exchanged);
    let syn = capture
        .wait_for(COMES, |_, dport, flags, _| dport == PORT && is_syn(flags))
        .context("no SYN seen on b's veth")?;
    assert!(
        wire::take_token(&syn)?.is_some(),
        "the SYN on the wire carries a token"
    );
    Ok(syn)
}

/// Whether b answers a SYN from `sport` with a SYN-ACK, seen on a's veth.
fn answered(capture: &Capture, sport: u16, within: Duration) -> bool {
    capture
        .wait_for(within, |src, dport, flags, _| {
            src == PORT && dport == sport && is_syn_ack(flags)
        })
        .is_some()
}

/// A fresh SYN token of `key` for labels `app=web`, as a's agent would
/// make it.
fn fresh_token(w: &TwoAgents, key: &str) -> Result<Vec<u8>> {
    let keys = keys::load(&KeyFiles {
        key: w.keys.key(key),
        trusted: vec![],
    })?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let labels = Labels::new([("app", "web")])?;
    Ok(Handshaker::new(keys, Window::default())
        .syn(&labels, now)?
        .token)
}

fn a_replayed_syn_is_refused(datapath: Datapath, family: Family) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let (_a, b) = both(&w, datapath, "a")?;
    let syn = captured_syn(&w)?;
    let token = wire::take_token(&syn)?.context("a token")?.token;
    let on_a = Capture::start(&w.hosts.a, &w.hosts.a_end.ifname)?;

    // Raw-socket SYNs from a fresh port get through when their token is
    // fresh (the raw path works) ...
    let fresh = syn_with_token(&syn, 41001, &fresh_token(&w, "a")?)?;
    w.send_raw_from_a(&fresh)?;
    assert!(answered(&on_a, 41001, COMES), "a fresh token is answered");
    // ... and not when the token was used already, from any port.
    let allowed_before = handshake_count(&b, "allowed")?;
    let replay = syn_with_token(&syn, 41002, &token)?;
    w.send_raw_from_a(&replay)?;
    assert_eq!(wait_for_count(&b, "replayed", 1, COMES)?, 1);
    assert!(
        !answered(&on_a, 41002, STAYS_AWAY),
        "the replay was answered"
    );
    // The very same packet too.
    w.send_raw_from_a(&syn)?;
    assert_eq!(wait_for_count(&b, "replayed", 2, COMES)?, 2);
    assert_eq!(handshake_count(&b, "allowed")?, allowed_before);
    Ok(())
}

fn a_tampered_token_is_refused(datapath: Datapath, family: Family) -> Result<()> {
    let Some(w) = two_agents(family)? else {
        return Ok(());
    };
    let (_a, b) = both(&w, datapath, "a")?;
    let syn = captured_syn(&w)?;
    let on_a = Capture::start(&w.hosts.a, &w.hosts.a_end.ifname)?;
    // A fresh token with one bit of its nonce flipped: it parses, its
    // signature does not verify.
    let mut token = fresh_token(&w, "a")?;
    token[20] ^= 0x01;
    w.send_raw_from_a(&syn_with_token(&syn, 41003, &token)?)?;
    assert_eq!(wait_for_count(&b, "bad-signature", 1, COMES)?, 1);
    assert!(
        !answered(&on_a, 41003, STAYS_AWAY),
        "a tampered token was answered"
    );
    // Cut short: it does not parse.
    let token = fresh_token(&w, "a")?;
    w.send_raw_from_a(&syn_with_token(&syn, 41004, &token[..token.len() - 1])?)?;
    assert_eq!(wait_for_count(&b, "bad-token", 1, COMES)?, 1);
    assert!(!answered(&on_a, 41004, STAYS_AWAY));
    // A stranger's token, sent the same way.
    w.send_raw_from_a(&syn_with_token(&syn, 41005, &fresh_token(&w, "stranger")?)?)?;
    assert_eq!(wait_for_count(&b, "untrusted-key", 1, COMES)?, 1);
    assert!(!answered(&on_a, 41005, STAYS_AWAY));
    // The same SYN untampered is answered.
    w.send_raw_from_a(&syn_with_token(&syn, 41006, &fresh_token(&w, "a")?)?)?;
    assert!(answered(&on_a, 41006, COMES));
    Ok(())
}
