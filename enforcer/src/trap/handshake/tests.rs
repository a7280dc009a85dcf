//! The engine between two "agents" in one process: every step on real
//! packets (IPv4 and IPv6), the refusals with their reasons, the bounds.

use std::net::IpAddr;
use std::sync::mpsc::{Receiver, channel};

use ed25519_dalek::SigningKey;

use super::*;
use crate::identity::keys::{AgentKey, TrustStore};
use crate::identity::token::tests::NOW;
use crate::policy::Configuration;

const WEB_CGROUP: u64 = 11;
const DB_CGROUP: u64 = 22;

/// An agent: its engine, its PUs, and its flow log.
struct Agent {
    engine: Engine,
    pus: PuIndex,
    counters: Arc<HandshakeCounters>,
    flows: Receiver<FlowRecord>,
}

fn key(seed: u8) -> AgentKey {
    AgentKey::from_signing_key(SigningKey::from_bytes(&[seed; 32]))
}

/// Agent `own` trusting `trusted`, with the PUs of `config` (TOML: PUs
/// only), in local-server mode.
fn agent(own: u8, trusted: &[u8], pus: &str, capacity: usize) -> Agent {
    let agent_key = key(own);
    let mut trust = TrustStore::default();
    trust.add(agent_key.public()).unwrap();
    for &seed in trusted {
        trust.add(key(seed).public()).unwrap();
    }
    let text = format!("mode = \"local-server\"\n[identity]\nkey = \"/k\"\n{pus}");
    let config = Configuration::from_toml_str(&text).unwrap();
    let mut index = PuIndex::new(config.mode, &config.pus);
    index.set_identities(&config.pus, &config.identity);
    for pu in &config.pus {
        match pu.id.as_str() {
            "web" => index.add_cgroup(WEB_CGROUP, pu.id.clone()),
            "db" => index.add_cgroup(DB_CGROUP, pu.id.clone()),
            _ => {}
        }
    }
    let (tx, flows) = channel();
    let counters = Arc::new(HandshakeCounters::default());
    let setup = Setup {
        keys: Keys {
            agent: agent_key,
            trust,
        },
        window: Window::default(),
        flow_log: Some(tx),
    };
    Agent {
        engine: Engine::with_capacity(setup, counters.clone(), capacity),
        pus: index,
        counters,
        flows,
    }
}

/// Host A: PU `web` (a cgroup), labels `app=web`, allowed to reach
/// `app=db` on 443. `labels` overrides its labels.
fn host_a(labels: &str, seed: u8) -> Agent {
    let pus = format!(
        r#"
[[pus]]
id = "web"
kind = "linux-process"
cgroup = "web"
labels = {{ {labels} }}
[[pus.application_policy]]
to = ["app=db"]
ports = [443]
policy_id = "web-to-db"
"#
    );
    agent(seed, &[2], &pus, MAX_CONNECTIONS)
}

/// Host B: PU `db` listening on 443, labels `app=db`, reachable from
/// `app=web`; `acls` adds network ACLs.
fn host_b(acls: &str, capacity: usize) -> Agent {
    let pus = format!(
        r#"
[[pus]]
id = "db"
kind = "linux-process"
cgroup = "db"
labels = {{ app = "db" }}
tcp_ports = [443]
udp_ports = [53]
[[pus.network_policy]]
from = ["app=web"]
policy_id = "web-in"
{acls}
"#
    );
    agent(2, &[1], &pus, capacity)
}

/// A network ACL of `db` accepting `protocol` on `port` from
/// 10.0.0.0/24, as `policy_id`.
fn accept_from_lan(protocol: &str, port: u16, policy_id: &str) -> String {
    format!(
        r#"
[[pus.network_acls]]
networks = ["10.0.0.0/24"]
protocols = ["{protocol}"]
ports = [{port}]
action = "accept"
policy_id = "{policy_id}"
"#
    )
}

/// Network ACLs of `db` accepting UDP 53 from 10.0.0.0/24.
fn dns_in() -> String {
    accept_from_lan("udp", 53, "dns-in")
}

/// The cgroup of every socket asked about.
struct Cgroup(Option<u64>);

impl SocketCgroups for Cgroup {
    fn cgroup(&mut self, _: u8, _: SocketAddr, _: SocketAddr) -> Option<u64> {
        self.0
    }
}

const CLIENT: &str = "10.0.0.1:40000";
const SERVER: &str = "10.0.0.2:443";
const CLIENT6: &str = "[fd00::1]:40000";
const SERVER6: &str = "[fd00::2]:443";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A TCP segment (Linux's SYN options on SYNs) from `src` to `dst`,
/// whole; checksums left zero (nothing here trusts incoming ones).
fn segment(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    let opts: &[u8] = if flags & SYN != 0 {
        &wire::tests::LINUX_SYN_OPTIONS
    } else {
        &[]
    };
    let mut tcp = Vec::new();
    tcp.extend(src.port().to_be_bytes());
    tcp.extend(dst.port().to_be_bytes());
    tcp.extend([0, 0, 0, 1, 0, 0, 0, 0]);
    tcp.push((((20 + opts.len()) / 4) as u8) << 4);
    tcp.extend([flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    tcp.extend(opts);
    let mut p = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + tcp.len()) as u16;
            let mut p = vec![0x45, 0];
            p.extend(total.to_be_bytes());
            p.extend([0, 0, 0x40, 0, 64, TCP, 0, 0]);
            p.extend(s.octets());
            p.extend(d.octets());
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = vec![0x60, 0, 0, 0];
            p.extend((tcp.len() as u16).to_be_bytes());
            p.extend([TCP, 64]);
            p.extend(s.octets());
            p.extend(d.octets());
            p
        }
        _ => unreachable!("one family"),
    };
    p.extend(tcp);
    p
}

impl Agent {
    fn decide(&mut self, direction: Direction, packet: &[u8], now: u64) -> Action {
        self.decide_from(direction, packet, Some(WEB_CGROUP), now)
    }

    fn decide_from(
        &mut self,
        direction: Direction,
        packet: &[u8],
        cgroup: Option<u64>,
        now: u64,
    ) -> Action {
        self.engine.decide(
            Some(direction),
            packet,
            None,
            &self.pus,
            now,
            &mut Cgroup(cgroup),
        )
    }

    fn count(&self, what: Counted) -> u64 {
        self.counters.get(what)
    }

    fn flows(&self) -> Vec<FlowRecord> {
        self.flows.try_iter().collect()
    }
}

/// The packet of a `Rewrite` that lets it pass, undecided.
fn passed(action: Action) -> Vec<u8> {
    match action {
        Action::Rewrite {
            packet,
            authorise: false,
        } => packet,
        other => panic!("expected a changed packet passed on, got {other:?}"),
    }
}

#[test]
fn an_allowed_identity_completes_the_handshake_in_both_families() {
    for (client, server) in [(CLIENT, SERVER), (CLIENT6, SERVER6)] {
        let (mut a, mut b) = (host_a(r#"app = "web""#, 1), host_b("", MAX_CONNECTIONS));
        let (client, server) = (addr(client), addr(server));
        let syn = segment(client, server, SYN);
        let marked = passed(a.decide(Direction::App, &syn, NOW));
        assert!(wire::checksums_valid(&marked));
        assert_eq!(a.count(Counted::TokensSent), 1);

        // B's application sees exactly A's SYN (with its checksums
        // computed: the test's SYN has none).
        let stripped = passed(b.decide(Direction::Net, &marked, NOW + 2));
        let original = wire::take_token(&wire::attach_token(&syn, b"x").unwrap())
            .unwrap()
            .unwrap()
            .stripped;
        assert_eq!(stripped, original);

        let syn_ack = segment(server, client, SYN | ACK);
        let answer = passed(b.decide(Direction::App, &syn_ack, NOW + 3));
        let action = a.decide(Direction::Net, &answer, NOW + 4);
        let Action::Rewrite {
            packet,
            authorise: true,
        } = action
        else {
            panic!("the initiator authorises at the SYN-ACK: {action:?}");
        };
        assert_eq!(wire::take_token(&packet), Ok(None));

        let ack = segment(client, server, ACK);
        assert_eq!(b.decide(Direction::Net, &ack, NOW + 5), Action::Authorise);
        assert_eq!(
            (a.count(Counted::Allowed), b.count(Counted::Allowed)),
            (1, 1)
        );
        assert_eq!(
            (a.count(Counted::Authorised), b.count(Counted::Authorised)),
            (1, 1)
        );
        // Both forgot the finished handshake; a second ACK that raced
        // the verdict (or a SYN-ACK sent again) is authorised again.
        assert_eq!(b.engine.in_progress(), 0);
        assert_eq!(a.engine.in_progress(), 0);
        assert_eq!(b.decide(Direction::Net, &ack, NOW + 6), Action::Authorise);
        assert_eq!(b.count(Counted::UnknownConnection), 0);

        // Each side logged its decision with both identities.
        let [logged] = &b.flows()[..] else {
            panic!("one decision on B");
        };
        assert_eq!(
            (logged.pu.as_str(), logged.policy_id.as_str()),
            ("db", "web-in")
        );
        assert_eq!(logged.action, FlowAction::Accept);
        assert_eq!(logged.direction, FlowDirection::Net);
        let h = logged.handshake.as_ref().unwrap();
        assert_eq!(h.reason, "allowed");
        assert_eq!(h.labels, "app=db");
        assert_eq!(h.peer_labels.as_deref(), Some("app=web"));
        assert_eq!(h.peer_agent, Some(key(1).id().to_string()));
        let [logged] = &a.flows()[..] else {
            panic!("one decision on A");
        };
        assert_eq!(
            (logged.pu.as_str(), logged.policy_id.as_str()),
            ("web", "web-to-db")
        );
        // The initiator's decision is about its outgoing connection.
        assert_eq!(logged.direction, FlowDirection::App);
        assert_eq!(logged.src, flowlog::endpoint(client.ip(), client.port()));
        assert_eq!(logged.dst, flowlog::endpoint(server.ip(), server.port()));
        assert_eq!(
            logged.handshake.as_ref().unwrap().peer_labels.as_deref(),
            Some("app=db")
        );
    }
}

#[test]
fn refused_syns_are_dropped_with_their_reason() {
    let (client, server) = (addr(CLIENT), addr(SERVER));
    let syn = segment(client, server, SYN);
    let mut b = host_b("", MAX_CONNECTIONS);
    let mut a = host_a(r#"app = "web""#, 1);
    let good = passed(a.decide(Direction::App, &syn, NOW));

    // A replay of a SYN B accepted.
    assert!(matches!(
        b.decide(Direction::Net, &good, NOW),
        Action::Rewrite { .. }
    ));
    assert_eq!(b.decide(Direction::Net, &good, NOW + 1), Action::Drop);
    assert_eq!(b.count(Counted::Replayed), 1);

    // A token changed on the way: its last byte (in the signature).
    let mut tampered = passed(a.decide(Direction::App, &syn, NOW));
    *tampered.last_mut().unwrap() ^= 1;
    assert_eq!(b.decide(Direction::Net, &tampered, NOW), Action::Drop);
    assert_eq!(b.count(Counted::BadSignature), 1);

    // Signed by an agent B does not trust (key 9).
    let mut stranger = host_a(r#"app = "web""#, 9);
    let untrusted = passed(stranger.decide(Direction::App, &syn, NOW));
    assert_eq!(b.decide(Direction::Net, &untrusted, NOW), Action::Drop);
    assert_eq!(b.count(Counted::UntrustedKey), 1);

    // An identity B's policy does not allow.
    let mut batch = host_a(r#"app = "batch""#, 1);
    let other = passed(batch.decide(Direction::App, &syn, NOW));
    assert_eq!(b.decide(Direction::Net, &other, NOW), Action::Drop);
    assert_eq!(b.count(Counted::NotAllowedByPolicy), 1);

    // An old token.
    let old = passed(a.decide(Direction::App, &syn, NOW - 60_000));
    assert_eq!(b.decide(Direction::Net, &old, NOW), Action::Drop);
    assert_eq!(b.count(Counted::Expired), 1);

    // No token at all, and no ACL: blocked, never waved through.
    assert_eq!(b.decide(Direction::Net, &syn, NOW), Action::Drop);
    assert_eq!(b.count(Counted::NoToken), 1);

    // A marker with a broken option list.
    let mut broken = good.clone();
    broken[20 + 20 + 1] = 40;
    assert_eq!(b.decide(Direction::Net, &broken, NOW), Action::Drop);
    assert_eq!(b.count(Counted::BadPacket), 1);

    let flows = b.flows();
    let accepted: Vec<bool> = flows
        .iter()
        .map(|f| f.action == FlowAction::Accept)
        .collect();
    assert_eq!(
        accepted,
        [true, false, false, false, false, false, false, false]
    );
    let reasons: Vec<&str> = flows
        .iter()
        .map(|f| f.handshake.as_ref().unwrap().reason.as_str())
        .collect();
    assert_eq!(
        reasons,
        [
            "allowed",
            "replayed",
            "bad-signature",
            "untrusted-key",
            "not-allowed-by-policy",
            "expired",
            "no-token",
            "bad-packet"
        ]
    );
    // Nothing refused is remembered.
    assert_eq!(b.engine.in_progress(), 1);
}

#[test]
fn a_peer_without_an_agent_is_judged_by_the_acls() {
    let mut b = host_b(&accept_from_lan("tcp", 443, "lan-in"), MAX_CONNECTIONS);
    let (client, server) = (addr(CLIENT), addr(SERVER));
    let syn = segment(client, server, SYN);
    assert_eq!(b.decide(Direction::Net, &syn, NOW), Action::Pass);
    assert_eq!(b.count(Counted::ExternalAllowed), 1);
    // Its SYN-ACK goes out without a token, its ACK completes it.
    let syn_ack = segment(server, client, SYN | ACK);
    assert_eq!(b.decide(Direction::App, &syn_ack, NOW), Action::Pass);
    let ack = segment(client, server, ACK);
    assert_eq!(b.decide(Direction::Net, &ack, NOW), Action::Authorise);
    let [logged] = &b.flows()[..] else {
        panic!("one decision");
    };
    assert_eq!(logged.policy_id, "lan-in");
    assert_eq!(logged.handshake.as_ref().unwrap().reason, "no-token");
    assert_eq!(logged.handshake.as_ref().unwrap().peer_labels, None);
    // From a network the ACL does not cover: blocked.
    let far = segment(addr("10.9.0.1:40000"), server, SYN);
    assert_eq!(b.decide(Direction::Net, &far, NOW), Action::Drop);
    // The ACK of a handshake never begun.
    let stray = segment(addr("10.9.0.1:40001"), server, ACK);
    assert_eq!(b.decide(Direction::Net, &stray, NOW), Action::Drop);
    assert_eq!(b.count(Counted::UnknownConnection), 1);
}

#[test]
fn the_initiator_judges_the_answer() {
    let (client, server) = (addr(CLIENT), addr(SERVER));
    let syn = segment(client, server, SYN);
    let syn_ack = segment(server, client, SYN | ACK);

    // A SYN to a port of no PU on B.
    let mut a = host_a(r#"app = "web""#, 1);
    let mut b = host_b("", MAX_CONNECTIONS);
    let other_port = addr("10.0.0.2:444");
    let syn_444 = segment(client, other_port, SYN);
    let marked = passed(a.decide(Direction::App, &syn_444, NOW));
    // B has no PU on 444: not the handshake's business, it goes on
    // without the token (and its tokenless answer is A's to judge).
    let stripped = passed(b.decide(Direction::Net, &marked, NOW));
    assert_eq!(wire::take_token(&stripped), Ok(None));
    assert_eq!(b.count(Counted::UnknownPu), 1);
    // Unmarked, it came through a PU's rules: refused.
    assert_eq!(b.decide(Direction::Net, &syn_444, NOW), Action::Drop);

    // A SYN-ACK without a token: A's application ACLs decide (none).
    let _ = passed(a.decide(Direction::App, &syn, NOW));
    assert_eq!(a.decide(Direction::Net, &syn_ack, NOW), Action::Drop);
    assert_eq!(a.count(Counted::NoToken), 1);

    // A SYN-ACK token answering another SYN.
    let marked = passed(a.decide(Direction::App, &syn, NOW));
    let _ = passed(b.decide(Direction::Net, &marked, NOW));
    let mut c = host_a(r#"app = "web""#, 1);
    let foreign_syn = passed(c.decide(Direction::App, &syn, NOW));
    let mut b2 = host_b("", MAX_CONNECTIONS);
    let _ = passed(b2.decide(Direction::Net, &foreign_syn, NOW));
    let foreign_answer = passed(b2.decide(Direction::App, &syn_ack, NOW));
    assert_eq!(a.decide(Direction::Net, &foreign_answer, NOW), Action::Drop);
    assert_eq!(a.count(Counted::WrongHandshake), 1);

    // The right answer, to an earlier transmission of the SYN: accepted.
    let answer = passed(b.decide(Direction::App, &syn_ack, NOW));
    let _ = passed(a.decide(Direction::App, &syn, NOW + 1000));
    assert!(matches!(
        a.decide(Direction::Net, &answer, NOW + 1001),
        Action::Rewrite {
            authorise: true,
            ..
        }
    ));
    // Its retransmission carries a fresh token, also accepted.
    let again = passed(b.decide(Direction::App, &syn_ack, NOW + 1002));
    assert_ne!(again, answer);
    assert!(matches!(
        a.decide(Direction::Net, &again, NOW + 1003),
        Action::Rewrite {
            authorise: true,
            ..
        }
    ));
}

#[test]
fn a_tokenless_answer_is_judged_by_the_application_acls_on_the_peers_port() {
    let pus = r#"
[[pus]]
id = "web"
kind = "linux-process"
cgroup = "web"
[[pus.application_acls]]
networks = ["10.0.0.2/32"]
protocols = ["tcp"]
ports = [443]
action = "accept"
policy_id = "to-server"
"#;
    let mut a = agent(1, &[], pus, MAX_CONNECTIONS);
    for (server, expected) in [(SERVER, Action::Authorise), ("10.0.0.2:444", Action::Drop)] {
        let (client, server) = (addr(CLIENT), addr(server));
        let _ = passed(a.decide(Direction::App, &segment(client, server, SYN), NOW));
        let syn_ack = segment(server, client, SYN | ACK);
        assert_eq!(
            a.decide(Direction::Net, &syn_ack, NOW),
            expected,
            "{server}"
        );
    }
    let flows = a.flows();
    assert_eq!(flows[0].policy_id, "to-server");
    assert_eq!(flows[0].direction, FlowDirection::App);
    assert_eq!(flows[0].dst, "10.0.0.2:443");
    assert_eq!(flows[1].action, FlowAction::Reject);
}

#[test]
fn a_syn_ack_of_no_handshake_goes_on_without_a_token() {
    let mut a = host_a(r#"app = "web""#, 1);
    let mut b = host_b("", MAX_CONNECTIONS);
    let (client, server) = (addr(CLIENT), addr(SERVER));
    let syn_ack = segment(server, client, SYN | ACK);
    // A process outside every PU: its SYN was never trapped.
    assert_eq!(b.decide(Direction::App, &syn_ack, NOW), Action::Pass);
    assert_eq!(a.decide(Direction::Net, &syn_ack, NOW), Action::Pass);
    let marked = wire::attach_token(&syn_ack, b"token bytes").unwrap();
    let stripped = passed(a.decide(Direction::Net, &marked, NOW));
    assert_eq!(wire::take_token(&stripped), Ok(None));
}

#[test]
fn the_pu_of_an_outgoing_syn_is_its_sockets_cgroup() {
    let mut a = host_a(r#"app = "web""#, 1);
    let syn = segment(addr(CLIENT), addr(SERVER), SYN);
    // No socket found: refused, not signed as another PU.
    assert_eq!(a.decide_from(Direction::App, &syn, None, NOW), Action::Drop);
    // A socket of a cgroup no PU has: no host PU here either.
    assert_eq!(
        a.decide_from(Direction::App, &syn, Some(999), NOW),
        Action::Drop
    );
    assert_eq!(a.count(Counted::UnknownPu), 2);
    assert!(matches!(
        a.decide_from(Direction::App, &syn, Some(WEB_CGROUP), NOW),
        Action::Rewrite { .. }
    ));
}

#[test]
fn a_port_the_pu_listens_on_without_configuring_it_is_found_by_its_socket() {
    let pus = r#"
[[pus]]
id = "db"
kind = "linux-process"
cgroup = "db"
labels = { app = "db" }
[[pus.network_policy]]
from = ["app=web"]
policy_id = "web-in"
"#;
    let mut b = agent(2, &[1], pus, MAX_CONNECTIONS);
    let mut a = host_a(r#"app = "web""#, 1);
    let syn = segment(addr(CLIENT), addr(SERVER), SYN);
    // No socket listening in a PU: no PU to judge it.
    assert_eq!(b.decide_from(Direction::Net, &syn, None, NOW), Action::Drop);
    assert_eq!(b.count(Counted::UnknownPu), 1);
    assert_eq!(b.count(Counted::Allowed), 0);
    let marked = passed(a.decide(Direction::App, &syn, NOW));
    assert!(matches!(
        b.decide_from(Direction::Net, &marked, Some(DB_CGROUP), NOW),
        Action::Rewrite { .. }
    ));
    assert_eq!(b.count(Counted::Allowed), 1);
}

#[test]
fn the_table_is_bounded_and_forgets_by_age() {
    let mut b = host_b("", 1);
    let mut a = host_a(r#"app = "web""#, 1);
    let server = addr(SERVER);
    let first = segment(addr("10.0.0.1:40000"), server, SYN);
    let second = segment(addr("10.0.0.1:40001"), server, SYN);
    let marked = passed(a.decide(Direction::App, &first, NOW));
    let _ = passed(b.decide(Direction::Net, &marked, NOW));
    let marked = passed(a.decide(Direction::App, &second, NOW));
    assert_eq!(b.decide(Direction::Net, &marked, NOW), Action::Drop);
    assert_eq!(b.count(Counted::TableFull), 1);
    // Once the first handshake timed out, there is room again.
    let later = NOW + HANDSHAKE_TIMEOUT_MS;
    let marked = passed(a.decide(Direction::App, &second, later));
    let _ = passed(b.decide(Direction::Net, &marked, later));
    assert_eq!(b.engine.in_progress(), 1);
    // Its ACK is now of a forgotten handshake.
    let ack = segment(addr("10.0.0.1:40000"), server, ACK);
    assert_eq!(b.decide(Direction::Net, &ack, later), Action::Drop);
}

#[test]
fn recent_keys_are_bounded_and_a_refreshed_one_crowds_out_no_other() {
    let mut r = Recent::new(100, 4);
    let k = |port: u16| ConnKey {
        local: SocketAddr::new(addr(CLIENT).ip(), port),
        remote: addr(SERVER),
    };
    r.insert(k(1), 0);
    // One key remembered again and again (a refused flow's datagrams).
    for t in 0..50 {
        r.insert(k(2), t);
    }
    assert!(r.contains(&k(1), 50));
    assert!(r.contains(&k(2), 148));
    assert!(!r.contains(&k(2), 149));
    // Full: the oldest goes first.
    r.insert(k(3), 60);
    r.insert(k(4), 61);
    r.insert(k(5), 62);
    assert!(!r.contains(&k(1), 62));
    for port in 2..=5 {
        assert!(r.contains(&k(port), 62), "{port}");
    }
    r.remove(&k(3));
    assert!(!r.contains(&k(3), 63));
    assert!(!r.contains(&k(5), 162));
}

/// An ordinary datagram (no signature) from `src` to `dst`.
fn datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut p = wire::udp_handshake(src, dst, payload).unwrap();
    // The signature's bytes overwritten: ordinary data, checksums redone.
    let at = p.len() - payload.len() - wire::UDP_SIGNATURE.len();
    p[at..at + wire::UDP_SIGNATURE.len()].fill(b'z');
    wire::udp_whole(&p).unwrap()
}

#[test]
fn an_ordinary_incoming_datagram_is_judged_by_the_acls() {
    let mut b = host_b(&dns_in(), MAX_CONNECTIONS);
    let from = |src: &str| datagram(addr(src), addr("10.0.0.2:53"), b"query");
    assert_eq!(
        b.decide(Direction::Net, &from("10.0.0.1:5000"), NOW),
        Action::Authorise
    );
    assert_eq!(
        b.decide(Direction::Net, &from("10.0.1.1:5000"), NOW),
        Action::Drop
    );
    let protocols: Vec<String> = b.flows().into_iter().map(|f| f.protocol).collect();
    assert_eq!(protocols, ["udp", "udp"]);
}

/// An undecided flow's datagram with the signature elsewhere than at its
/// payload's start (SPEC's rule traps it: the signature anywhere) is no
/// handshake: judged as the flow's ordinary datagram by the PU's network
/// ACLs, never answered nor let on as it is; to a port of no PU, dropped.
#[test]
fn the_signature_inside_an_undecided_flows_datagram_is_no_handshake() {
    let mut b = host_b(&dns_in(), MAX_CONNECTIONS);
    let payload = [&b"data "[..], wire::UDP_SIGNATURE, b" more"].concat();
    let from = |src: &str, dst: &str| datagram(addr(src), addr(dst), &payload);
    assert_eq!(
        b.decide(Direction::Net, &from("10.0.0.1:5000", "10.0.0.2:53"), NOW),
        Action::Authorise
    );
    assert_eq!(b.count(Counted::ExternalAllowed), 1);
    assert_eq!(
        b.decide(Direction::Net, &from("10.0.1.1:5000", "10.0.0.2:53"), NOW),
        Action::Drop
    );
    assert_eq!(b.count(Counted::NoToken), 1);
    assert_eq!(
        b.decide(Direction::Net, &from("10.0.0.1:5001", "10.0.0.2:9999"), NOW),
        Action::Drop
    );
    assert_eq!(b.count(Counted::UnknownPu), 1);
    assert!(b.engine.take_outgoing().is_empty(), "nothing answered");
    assert_eq!(b.count(Counted::BadToken) + b.count(Counted::BadPacket), 0);
}

/// Host A's `web` with a rule for `app=db` on UDP 53 too.
fn host_a_udp(seed: u8) -> Agent {
    let pus = r#"
[[pus]]
id = "web"
kind = "linux-process"
cgroup = "web"
labels = { app = "web" }
[[pus.application_policy]]
to = ["app=db"]
ports = [53]
policy_id = "web-to-dns"
"#;
    agent(seed, &[2], pus, MAX_CONNECTIONS)
}

/// The one packet an engine made, and whether it goes out authorised.
fn one_out(a: &mut Agent) -> (Vec<u8>, bool) {
    let mut out = a.engine.take_outgoing();
    assert_eq!(out.len(), 1, "{out:?}");
    let o = out.remove(0);
    (o.packet, o.authorise)
}

#[test]
fn a_udp_flow_is_held_until_the_peer_answers_its_handshake() {
    for (client, server) in [
        ("10.0.0.1:5000", "10.0.0.2:53"),
        ("[fd00::1]:5000", "[fd00::2]:53"),
    ] {
        let (mut a, mut b) = (host_a_udp(1), host_b("", MAX_CONNECTIONS));
        let (client, server) = (addr(client), addr(server));
        let first = datagram(client, server, b"query-1");
        let second = datagram(client, server, b"query-2");
        // The first datagram is held and the handshake goes out instead,
        // same addresses and ports, with the injected kind.
        assert_eq!(a.decide(Direction::App, &first, NOW), Action::Drop);
        let (hello, authorised) = one_out(&mut a);
        assert!(!authorised);
        assert_eq!(
            packet::parse(&hello).unwrap().to_string(),
            packet::parse(&first).unwrap().to_string()
        );
        assert!(wire::udp_token(&hello).unwrap().is_some());
        assert_eq!(a.decide(Direction::App, &second, NOW), Action::Drop);
        assert!(a.engine.take_outgoing().is_empty());
        assert_eq!(a.count(Counted::Held), 2);

        // b verifies, allows, answers authorised; the handshake itself
        // never reaches db.
        assert_eq!(
            b.decide_from(Direction::Net, &hello, Some(DB_CGROUP), NOW + 1),
            Action::Drop
        );
        let (answer, authorised) = one_out(&mut b);
        assert!(authorised);
        assert_eq!(b.count(Counted::Allowed), 1);
        let line = b.flows().pop().unwrap();
        assert_eq!(
            (line.protocol.as_str(), line.policy_id.as_str()),
            ("udp", "web-in")
        );

        // a checks the answer and releases both datagrams, authorised,
        // as they were sent.
        assert_eq!(a.decide(Direction::Net, &answer, NOW + 2), Action::Drop);
        let out = a.engine.take_outgoing();
        let released: Vec<_> = out
            .iter()
            .map(|o| (o.packet.clone(), o.authorise))
            .collect();
        assert_eq!(released, [(first.clone(), true), (second, true)]);
        assert_eq!(a.count(Counted::Allowed), 1);
        assert!(!a.engine.waiting());
        // A datagram of the flow racing the connection mark is authorised.
        assert_eq!(a.decide(Direction::App, &first, NOW + 3), Action::Authorise);
        // The same answer again is of no wait.
        assert_eq!(a.decide(Direction::Net, &answer, NOW + 3), Action::Drop);
        assert_eq!(a.count(Counted::UnknownConnection), 1);
    }
}

#[test]
fn a_refused_udp_identity_gets_a_signed_refusal_and_stays_refused() {
    let mut a = host_a(r#"app = "batch""#, 1);
    // b's ACLs accept a's address: a refused identity must not fall back
    // to them.
    let mut b = host_b(&dns_in(), MAX_CONNECTIONS);
    let (client, server) = (addr("10.0.0.1:5000"), addr("10.0.0.2:53"));
    let first = datagram(client, server, b"query");
    assert_eq!(a.decide(Direction::App, &first, NOW), Action::Drop);
    let (hello, _) = one_out(&mut a);
    assert_eq!(
        b.decide_from(Direction::Net, &hello, Some(DB_CGROUP), NOW),
        Action::Drop
    );
    assert_eq!(b.count(Counted::NotAllowedByPolicy), 1);
    // The refusal goes out unauthorised, and the conntrack entry it makes
    // is to go after it.
    let (refusal, authorised) = one_out(&mut b);
    assert!(!authorised);
    assert_eq!(b.engine.take_refused(), [(server, client)]);
    // The flow's plain datagrams (an initiator that fell back to its
    // ACLs) are dropped, not judged by b's ACLs, as long as they come.
    let plain = datagram(client, server, b"plain");
    let mut at = NOW;
    for _ in 0..3 {
        at += REFUSED_IN_MS - 1;
        assert_eq!(
            b.decide_from(Direction::Net, &plain, Some(DB_CGROUP), at),
            Action::Drop
        );
    }
    assert_eq!(b.count(Counted::RefusedFlow), 3);
    assert_eq!(b.count(Counted::ExternalAllowed), 0);
    // Once they stop, the memory ends: a new flow on the same ports is a
    // peer without an agent's.
    assert_eq!(
        b.decide_from(Direction::Net, &plain, Some(DB_CGROUP), at + REFUSED_IN_MS),
        Action::Authorise
    );

    // a verifies the refusal: nothing released, no ACL asked, the flow's
    // entry to go and the flow remembered.
    a.flows();
    assert_eq!(a.decide(Direction::Net, &refusal, NOW + 1), Action::Drop);
    assert!(!a.engine.waiting());
    assert!(a.engine.take_outgoing().is_empty());
    assert_eq!(a.count(Counted::RefusedByPeer), 1);
    assert_eq!(a.count(Counted::ExternalAllowed), 0);
    assert_eq!(a.engine.take_refused(), [(client, server)]);
    let line = a.flows().pop().unwrap();
    assert_eq!(line.action, FlowAction::Reject);
    let handshake = line.handshake.unwrap();
    assert_eq!(handshake.reason, "refused-by-peer");
    assert_eq!(handshake.peer_labels.as_deref(), Some("app=db"));
    // The timeout passes: nothing to judge.
    a.engine.tick(&a.pus, NOW + UDP_ANSWER_WAIT_MS);
    assert!(a.engine.take_outgoing().is_empty());
    // Later datagrams of the flow are dropped without a new handshake,
    // until the memory ends.
    assert_eq!(a.decide(Direction::App, &first, NOW + 2), Action::Drop);
    assert!(a.engine.take_outgoing().is_empty());
    assert_eq!(a.count(Counted::RefusedFlow), 1);
    assert_eq!(
        a.decide(Direction::App, &first, NOW + 1 + REFUSED_OUT_MS),
        Action::Drop
    );
    let _again = one_out(&mut a);
}

#[test]
fn an_answer_the_application_policy_refuses_releases_nothing() {
    // web may reach app=db on 443 only; b answers on 53.
    let mut a = host_a(r#"app = "web""#, 1);
    let mut b = host_b("", MAX_CONNECTIONS);
    let (client, server) = (addr("10.0.0.1:5000"), addr("10.0.0.2:53"));
    let first = datagram(client, server, b"query");
    assert_eq!(a.decide(Direction::App, &first, NOW), Action::Drop);
    let (hello, _) = one_out(&mut a);
    assert_eq!(
        b.decide_from(Direction::Net, &hello, Some(DB_CGROUP), NOW + 1),
        Action::Drop
    );
    let (answer, _) = one_out(&mut b);
    assert_eq!(a.decide(Direction::Net, &answer, NOW + 2), Action::Drop);
    assert!(a.engine.take_outgoing().is_empty());
    assert!(!a.engine.waiting());
    assert_eq!(a.count(Counted::NotAllowedByPolicy), 1);
    assert_eq!(a.engine.take_refused(), [(client, server)]);
    // The flow's next datagram is dropped, no new handshake.
    assert_eq!(a.decide(Direction::App, &first, NOW + 3), Action::Drop);
    assert!(a.engine.take_outgoing().is_empty());
    assert_eq!(a.count(Counted::RefusedFlow), 1);
}

/// A spoofed answer — from the peer's address and port, with a token
/// that does not verify for this handshake — is dropped and counted and
/// ends nothing: the held datagrams wait for the real answer (or the
/// timeout).
#[test]
fn an_answer_that_does_not_verify_leaves_the_wait_alone() {
    let mut a = host_a_udp(1);
    let mut b = host_b("", MAX_CONNECTIONS);
    let (client, server) = (addr("10.0.0.1:5000"), addr("10.0.0.2:53"));
    let first = datagram(client, server, b"query");
    assert_eq!(a.decide(Direction::App, &first, NOW), Action::Drop);
    let (hello, _) = one_out(&mut a);
    let labels = crate::identity::Labels::new([("app", "db")]).unwrap();
    let stranger = crate::identity::Handshaker::new(
        Keys {
            agent: key(9),
            trust: TrustStore::default(),
        },
        Window::default(),
    );
    let nonce = wire::udp_token(&hello)
        .ok()
        .flatten()
        .and_then(|t| token::parse(t).ok())
        .map(|t| t.claims.nonce)
        .unwrap();
    // b's own key, answering another nonce (a replay of an old answer).
    let other = b.engine.handshaker.syn_ack(&labels, &[7; 16], NOW).unwrap();
    let spoofs: Vec<(Vec<u8>, Counted)> = vec![
        (
            stranger.syn_ack(&labels, &nonce, NOW).unwrap().token,
            Counted::UntrustedKey,
        ),
        (
            stranger.refusal(&labels, &nonce, NOW).unwrap().token,
            Counted::UntrustedKey,
        ),
        (b"garbage".to_vec(), Counted::BadToken),
        (other.token, Counted::WrongHandshake),
    ];
    for (i, (token, counted)) in spoofs.into_iter().enumerate() {
        let spoof = wire::udp_handshake(server, client, &token).unwrap();
        assert_eq!(a.decide(Direction::Net, &spoof, NOW + 1), Action::Drop);
        assert!(a.count(counted) >= 1, "spoof {i}: {counted:?}");
        assert!(a.engine.waiting(), "spoof {i} ended the wait");
        assert!(a.engine.take_outgoing().is_empty());
        assert!(a.engine.take_refused().is_empty());
    }
    // Our own handshake echoed back, and a plain datagram on the flow.
    assert_eq!(
        a.decide(Direction::Net, &echo(&hello), NOW + 1),
        Action::Drop
    );
    let plain = datagram(server, client, b"plain");
    assert_eq!(a.decide(Direction::Net, &plain, NOW + 1), Action::Drop);
    assert!(a.engine.waiting());
    assert_eq!(a.count(Counted::ExternalAllowed), 0);
    // The real answer still releases the held datagram.
    assert_eq!(
        b.decide_from(Direction::Net, &hello, Some(DB_CGROUP), NOW + 2),
        Action::Drop
    );
    let (answer, _) = one_out(&mut b);
    assert_eq!(a.decide(Direction::Net, &answer, NOW + 3), Action::Drop);
    assert_eq!(one_out(&mut a), (first, true));
    assert_eq!(a.count(Counted::Allowed), 1);
}

/// `packet` sent back: addresses and ports swapped, payload kept.
fn echo(packet: &[u8]) -> Vec<u8> {
    let token = wire::udp_token(packet).unwrap().unwrap();
    let h = packet::parse(packet).unwrap();
    let packet::L4::Udp { src, dst } = h.l4 else {
        panic!("UDP")
    };
    wire::udp_handshake(
        SocketAddr::new(h.dst, dst),
        SocketAddr::new(h.src, src),
        token,
    )
    .unwrap()
}

#[test]
fn a_peer_without_an_agent_gets_the_held_datagrams_when_an_acl_accepts() {
    let pus = r#"
[[pus]]
id = "web"
kind = "linux-process"
cgroup = "web"
labels = { app = "web" }
[[pus.application_acls]]
networks = ["10.0.0.0/24"]
protocols = ["udp"]
ports = [53]
action = "accept"
policy_id = "dns-out"
"#;
    let mut a = agent(1, &[2], pus, MAX_CONNECTIONS);
    let first = datagram(addr("10.0.0.1:5000"), addr("10.0.0.2:53"), b"query");
    assert_eq!(a.decide(Direction::App, &first, NOW), Action::Drop);
    let _hello = one_out(&mut a);
    a.engine.tick(&a.pus, NOW + UDP_ANSWER_WAIT_MS);
    assert_eq!(one_out(&mut a), (first, true));
    assert_eq!(a.count(Counted::ExternalAllowed), 1);
}

#[test]
fn the_udp_hold_is_bounded() {
    let mut a = host_a_udp(1);
    let (client, server) = (addr("10.0.0.1:5000"), addr("10.0.0.2:53"));
    let d = datagram(client, server, b"q");
    for _ in 0..MAX_HELD_PER_FLOW {
        assert_eq!(a.decide(Direction::App, &d, NOW), Action::Drop);
    }
    assert_eq!(a.decide(Direction::App, &d, NOW), Action::Drop);
    assert_eq!(a.count(Counted::Held), MAX_HELD_PER_FLOW as u64);
    assert_eq!(a.count(Counted::HoldFull), 1);
    // A datagram copied short cannot be held.
    assert_eq!(
        a.decide(Direction::App, &d[..d.len() - 1], NOW),
        Action::Drop
    );
    assert_eq!(a.count(Counted::BadPacket), 1);
}

#[test]
fn reloaded_keys_keep_the_replay_cache() {
    let mut a = host_a(r#"app = "web""#, 1);
    let mut b = host_b("", MAX_CONNECTIONS);
    let syn = segment(addr(CLIENT), addr(SERVER), SYN);
    let marked = passed(a.decide(Direction::App, &syn, NOW));
    let _ = passed(b.decide(Direction::Net, &marked, NOW));
    // B stops trusting A's key: A's next SYN is refused; the old one is
    // still a replay once A is trusted again.
    let mut trust = TrustStore::default();
    trust.add(key(2).public()).unwrap();
    b.engine.set_keys(
        Keys {
            agent: key(2),
            trust: trust.clone(),
        },
        Window::default(),
    );
    let fresh = passed(a.decide(Direction::App, &syn, NOW));
    assert_eq!(b.decide(Direction::Net, &fresh, NOW), Action::Drop);
    assert_eq!(b.count(Counted::UntrustedKey), 1);
    trust.add(key(1).public()).unwrap();
    b.engine.set_keys(
        Keys {
            agent: key(2),
            trust,
        },
        Window::default(),
    );
    assert_eq!(b.decide(Direction::Net, &marked, NOW), Action::Drop);
    assert_eq!(b.count(Counted::Replayed), 1);
}

#[test]
fn unreadable_packets_are_dropped() {
    let mut b = host_b("", MAX_CONNECTIONS);
    for junk in [&[][..], &[0x45, 0, 0], &[0x60; 10]] {
        assert_eq!(b.decide(Direction::Net, junk, NOW), Action::Drop);
    }
    assert_eq!(
        b.engine.decide(
            None,
            &segment(addr(CLIENT), addr(SERVER), SYN),
            None,
            &b.pus,
            NOW,
            &mut Cgroup(None)
        ),
        Action::Drop
    );
    // A FIN or a RST is never a handshake step.
    let fin = segment(addr(CLIENT), addr(SERVER), ACK | 0x01);
    assert_eq!(b.decide(Direction::Net, &fin, NOW), Action::Drop);
    assert_eq!(b.count(Counted::BadPacket), 5);
}

/// Every prefix and every one-byte change of a marked SYN B accepted:
/// no panic, nothing authorised, and whatever goes on is a well-formed
/// packet without the token (a copy of the token is a replay, a changed
/// token does not verify).
#[test]
fn mangled_copies_of_an_accepted_syn_get_nothing() {
    for (client, server) in [(CLIENT, SERVER), (CLIENT6, SERVER6)] {
        let mut a = host_a(r#"app = "web""#, 1);
        let mut b = host_b("", MAX_CONNECTIONS);
        let syn = segment(addr(client), addr(server), SYN);
        let marked = passed(a.decide(Direction::App, &syn, NOW));
        let _ = passed(b.decide(Direction::Net, &marked, NOW));
        let check = |action: Action, what: &str| match action {
            Action::Drop | Action::Pass => {}
            Action::Rewrite {
                packet,
                authorise: false,
            } => {
                assert!(wire::checksums_valid(&packet), "{what}");
                assert_eq!(wire::take_token(&packet), Ok(None), "{what}");
            }
            other => panic!("{what}: {other:?}"),
        };
        for len in 0..marked.len() {
            check(b.decide(Direction::Net, &marked[..len], NOW), "a prefix");
        }
        for at in 0..marked.len() {
            let mut mangled = marked.clone();
            mangled[at] ^= 0x01;
            check(
                b.decide(Direction::Net, &mangled, NOW),
                &format!("byte {at} flipped"),
            );
        }
        assert_eq!(b.count(Counted::Allowed), 1, "only the original");
    }
}
