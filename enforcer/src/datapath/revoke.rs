//! Which connections an `update` must cut (SPEC, `update`: "a connection
//! allowed only by the old policy is cut"). Pure: the decision one side of
//! a PU's policy gives a connection set-up, and the choice of flows and
//! sockets to cut from it; the datapaths do the cutting
//! ([`super::sockdiag`], [`super::conntrack`]).
//!
//! [`verdict`] is SPEC's "Order of evaluation inside a PU" for either
//! side, as both datapaths install it. Outgoing (the connect hooks of
//! `enforcer-ebpf/src/connect.rs`, the PU's app chain of `iptables/pu.rs`),
//! the application ACLs judge the destination; incoming (TC ingress in
//! `enforcer-ebpf/src/ingress.rs`, the PU's net chain), the network ACLs
//! judge the source of a connection a peer set up to the PU: to one of its
//! listening ports (linux-process, uid and host-service PUs: incoming
//! traffic reaches their policy by those ports only), or, for a
//! namespace-wide PU (host, container: no port set, every incoming
//! connection no other PU takes), to any port. Either way,
//! with the peer and the destination port: excluded peers are untouched;
//! the specific-protocol ACLs, in bucket order, for peers outside the
//! target TCP networks; then the trap (TCP with a target TCP network, UDP
//! with a target UDP network); then the protocol-any ACLs; then refusal.
//! Observe-continue ACLs only log.
//!
//! Only a connection some ACL accepted can be revoked: a trapped one was
//! authorised by the handshake, which a policy update does not redo, and an
//! excluded one is never touched. A connection the new policy would trap
//! is not cut either — the new policy does not refuse it, it would ask.
//!
//! Which side set a connection up, seen from the PU's socket ([`side`]):
//! the network side when its local end is one of the PU's listening ports,
//! or, for a namespace-wide PU, an endpoint a socket of the namespace
//! listens at ([`Listeners`]: a connected socket there is the accepting
//! end); else the application side. Both datapaths decide so (the eBPF
//! cut per socket; the iptables cut per conntrack flow, whose original
//! direction must agree).
//!
//! What the cut can miss, by a hair: a connection whose set-up was judged
//! under the old policy just before the switch but that reaches the
//! kernel's tables (the socket hash for eBPF, confirmed conntrack entries
//! for iptables) only after they were read, microseconds later.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::queues::Direction;
use crate::policy::{
    Acl, Action, FamilyNetworks, ObserveMode, Protocol, Pu, PuKind, in_bucket_order,
};

/// A connection's set-up as a policy judges it: protocol, peer, and the
/// port its ACLs match (the destination's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`; anything else is never revoked.
    pub protocol: u8,
    pub peer: IpAddr,
    pub port: u16,
}

impl Setup {
    /// The set-up of a connection between a PU's `local` end and its
    /// `peer`, as the `side` of its policy judges it: ACLs match the
    /// destination port — the peer's for an outgoing connection, the PU's
    /// own for an incoming one. An IPv4 peer of an IPv6 socket counts as
    /// IPv4.
    pub fn between(side: Direction, protocol: u8, local: SocketAddr, peer: SocketAddr) -> Self {
        let port = match side {
            Direction::App => peer.port(),
            Direction::Net => local.port(),
        };
        Self {
            protocol,
            peer: peer.ip().to_canonical(),
            port,
        }
    }
}

/// What one side of a PU's policy does with a connection set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No policy applies: the peer is in the excluded networks, or (the
    /// network side of a PU found by its ports) the port is none of the
    /// PU's listening ports.
    Untouched,
    /// An ACL accepts it.
    Accept,
    /// The set-up goes to the trap (the handshake decides).
    Trap,
    /// A reject ACL, or no ACL at all: refused.
    Refuse,
}

/// `IPPROTO_TCP` and `IPPROTO_UDP`.
pub const TCP: u8 = libc::IPPROTO_TCP as u8;
pub const UDP: u8 = libc::IPPROTO_UDP as u8;

/// The verdict of `pu`'s ACLs of `side` (application ACLs outgoing,
/// network ACLs incoming) on `setup`, with the target and excluded
/// networks `networks` (either family, or both mixed).
pub fn verdict(pu: &Pu, networks: &FamilyNetworks, side: Direction, setup: Setup) -> Verdict {
    let within = |list: &[IpNet]| list.iter().any(|net| net.contains(&setup.peer));
    if within(&networks.excluded) {
        return Verdict::Untouched;
    }
    let acls = match side {
        Direction::App => &pu.application_acls,
        Direction::Net if namespace_wide(pu) || listens(pu, setup.protocol, setup.port) => {
            &pu.network_acls
        }
        Direction::Net => return Verdict::Untouched,
    };
    let ordered = in_bucket_order(acls);
    let (any, specific): (Vec<&Acl>, Vec<&Acl>) =
        ordered.into_iter().partition(|acl| acl.is_protocol_any());
    let decide = |acls: &[&Acl]| {
        acls.iter()
            .find(|acl| acl.observe != ObserveMode::Continue && matches(acl, setup))
            .map(|acl| match acl.action {
                Action::Accept => Verdict::Accept,
                Action::Reject => Verdict::Refuse,
            })
    };
    let target_tcp = within(&networks.target_tcp);
    if !target_tcp && let Some(verdict) = decide(&specific) {
        return verdict;
    }
    let trapped = match setup.protocol {
        TCP => target_tcp,
        UDP => within(&networks.target_udp),
        _ => false,
    };
    if trapped {
        return Verdict::Trap;
    }
    decide(&any).unwrap_or(Verdict::Refuse)
}

/// Whether `port` is one of `pu`'s listening ports (its port set) for
/// `protocol`: where its network side applies.
pub fn listens(pu: &Pu, protocol: u8, port: u16) -> bool {
    let ranges = match protocol {
        TCP => &pu.tcp_ports,
        UDP => &pu.udp_ports,
        _ => return false,
    };
    ranges.iter().any(|r| (r.start()..=r.end()).contains(&port))
}

/// Whether `pu` takes every connection of its namespace that no other PU
/// does, whatever its port — the host PU, and the container PU of a
/// remote-container or sidecar agent (TC ingress's fallback PU, the
/// `TRI-Hst-*` chains) — rather than being found by its ports.
pub fn namespace_wide(pu: &Pu) -> bool {
    matches!(pu.kind, PuKind::Host | PuKind::Container)
}

/// The side of `pu`'s policy that judged the set-up of a connection of
/// `protocol` whose local end (the PU's socket's) is `local`: the network
/// side if a peer set it up — to one of the PU's listening ports, or, for
/// a namespace-wide PU, to an endpoint of `listeners` (the namespace's
/// listening sockets) — else the application side.
///
/// A namespace-wide PU has no port set, so the namespace's listeners say
/// where peers connect to it: a connected TCP socket at a listener's
/// endpoint is the one it accepted; a UDP socket sharing its local
/// endpoint with a bound, unconnected one is a server's socket for one
/// peer. A connection the PU made from a port that something also
/// listens at (bound explicitly with `SO_REUSEPORT`) is taken as incoming:
/// the kernel keeps no record of who started it, and a client seldom binds
/// a server's port.
pub fn side(pu: &Pu, listeners: &Listeners, protocol: u8, local: SocketAddr) -> Direction {
    let incoming = listens(pu, protocol, local.port())
        || (namespace_wide(pu) && listeners.serve(protocol, local));
    match incoming {
        true => Direction::Net,
        false => Direction::App,
    }
}

/// The endpoints peers connect to in a network namespace: the local ends
/// of its listening TCP sockets and of its bound, unconnected UDP ones
/// (`super::sockdiag::listeners`), each with its protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listeners(Vec<(u8, SocketAddr)>);

impl Listeners {
    pub fn new(endpoints: impl IntoIterator<Item = (u8, SocketAddr)>) -> Self {
        Self(endpoints.into_iter().collect())
    }

    /// Whether a socket of `protocol` whose local end is `local` sits at a
    /// listener's endpoint: the same port, and the same address or the
    /// listener's wildcard — IPv4's for IPv4 only, IPv6's for both (a
    /// dual-stack socket; `IPV6_V6ONLY` is not in a dump, and an IPv4
    /// connection to a v6-only wildcard could only be another listener's).
    pub fn serve(&self, protocol: u8, local: SocketAddr) -> bool {
        let ip = local.ip().to_canonical();
        self.0.iter().any(|&(p, at)| {
            p == protocol
                && at.port() == local.port()
                && match at.ip().to_canonical() {
                    IpAddr::V6(any) if any.is_unspecified() => true,
                    IpAddr::V4(any) if any.is_unspecified() => ip.is_ipv4(),
                    exact => exact == ip,
                }
        })
    }
}

/// Does `acl` cover `setup`: its peer in one of the networks, its protocol
/// named (or `any`, which has no ports), its port in one of the ranges
/// (none means every port)?
fn matches(acl: &Acl, setup: Setup) -> bool {
    if !acl.networks.iter().any(|net| net.contains(&setup.peer)) {
        return false;
    }
    let protocol = match setup.protocol {
        TCP => Protocol::Tcp,
        UDP => Protocol::Udp,
        _ => return acl.is_protocol_any(),
    };
    if acl.is_protocol_any() {
        return true;
    }
    acl.protocols.contains(&protocol)
        && (acl.ports.is_empty()
            || acl
                .ports
                .iter()
                .any(|r| (r.start()..=r.end()).contains(&setup.port)))
}

/// Whether `update` from `old` to `new` cuts a connection with this
/// set-up on `side`: the old policy accepted it by an ACL and the new one
/// refuses it.
pub fn revoked(
    old: &Pu,
    new: &Pu,
    networks: &FamilyNetworks,
    side: Direction,
    setup: Setup,
) -> bool {
    verdict(old, networks, side, setup) == Verdict::Accept
        && verdict(new, networks, side, setup) == Verdict::Refuse
}

/// Whether a socket an ACL accepted when it connected (the eBPF datapath
/// knows this from the class in its mark) must be cut now that `pu` is in
/// force: the policy in force refuses it. Whatever earlier policy accepted
/// it, it is not allowed now.
pub fn refused_now(pu: &Pu, networks: &FamilyNetworks, side: Direction, setup: Setup) -> bool {
    verdict(pu, networks, side, setup) == Verdict::Refuse
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::acl;
    use crate::policy::{CgroupPath, PuId, PuKind};
    use Direction::{App, Net};

    fn pu(acls: Vec<Acl>) -> Pu {
        Pu {
            id: PuId::new("web").unwrap(),
            kind: PuKind::LinuxProcess {
                cgroup: CgroupPath::new("web").unwrap(),
            },
            labels: Default::default(),
            tcp_ports: vec![],
            udp_ports: vec![],
            application_acls: acls,
            network_acls: vec![],
            proxy_port: None,
            dns_proxy_port: None,
            dependent_services: vec![],
            exposed_services: vec![],
        }
    }

    /// A PU listening on `tcp` and `udp` port ranges, with network ACLs
    /// `acls` and none on the application side.
    fn listening(tcp: &[(u16, u16)], udp: &[(u16, u16)], acls: Vec<Acl>) -> Pu {
        let ranges = |l: &[(u16, u16)]| {
            l.iter()
                .map(|&(a, b)| crate::policy::PortRange::new(a, b).unwrap())
                .collect()
        };
        Pu {
            tcp_ports: ranges(tcp),
            udp_ports: ranges(udp),
            network_acls: acls,
            ..pu(vec![])
        }
    }

    fn networks(tcp: &[&str], udp: &[&str], excluded: &[&str]) -> FamilyNetworks {
        let list = |l: &[&str]| l.iter().map(|n| n.parse().unwrap()).collect();
        FamilyNetworks {
            target_tcp: list(tcp),
            target_udp: list(udp),
            excluded: list(excluded),
        }
    }

    fn tcp(peer: &str, port: u16) -> Setup {
        Setup {
            protocol: TCP,
            peer: peer.parse().unwrap(),
            port,
        }
    }

    fn udp(peer: &str, port: u16) -> Setup {
        Setup {
            protocol: UDP,
            ..tcp(peer, port)
        }
    }

    #[test]
    fn excluded_then_specific_acls_then_trap_then_any_then_refuse() {
        let p = pu(vec![
            acl(
                &["10.2.0.0/16", "fd02::/16"],
                &[Protocol::Tcp],
                &[(7000, 7000)],
                Action::Accept,
                "a",
            ),
            acl(
                &["10.0.0.0/8"],
                &[Protocol::Any],
                &[],
                Action::Accept,
                "any",
            ),
        ]);
        let nets = networks(&["10.1.0.0/24"], &["10.5.0.0/16"], &["10.9.0.0/16"]);
        assert_eq!(
            verdict(&p, &nets, App, tcp("10.9.0.2", 7000)),
            Verdict::Untouched
        );
        assert_eq!(
            verdict(&p, &nets, App, tcp("10.2.0.2", 7000)),
            Verdict::Accept
        );
        assert_eq!(
            verdict(&p, &nets, App, tcp("fd02::2", 7000)),
            Verdict::Accept
        );
        // Another port: the any ACL after the trap accepts it.
        assert_eq!(
            verdict(&p, &nets, App, tcp("10.2.0.2", 7001)),
            Verdict::Accept
        );
        assert_eq!(
            verdict(&p, &nets, App, tcp("10.1.0.2", 7000)),
            Verdict::Trap
        );
        assert_eq!(verdict(&p, &nets, App, udp("10.5.0.2", 53)), Verdict::Trap);
        assert_eq!(
            verdict(&p, &nets, App, tcp("192.168.0.1", 7000)),
            Verdict::Refuse
        );
        assert_eq!(
            verdict(&p, &nets, App, tcp("fd03::2", 7000)),
            Verdict::Refuse
        );
    }

    #[test]
    fn bucket_order_not_prefix_length_and_observe_continue_only_logs() {
        let mut watch = acl(&["10.2.0.0/16"], &[Protocol::Tcp], &[], Action::Reject, "w");
        watch.observe = ObserveMode::Continue;
        let p = pu(vec![
            acl(&["10.2.0.0/16"], &[Protocol::Tcp], &[], Action::Accept, "a"),
            acl(&["10.0.0.0/8"], &[Protocol::Tcp], &[], Action::Reject, "r"),
            watch,
        ]);
        let nets = networks(&[], &[], &[]);
        assert_eq!(
            verdict(&p, &nets, App, tcp("10.2.0.2", 80)),
            Verdict::Refuse,
            "the wider reject comes first"
        );
        let p = pu(vec![
            p.application_acls[0].clone(),
            p.application_acls[2].clone(),
        ]);
        assert_eq!(
            verdict(&p, &nets, App, tcp("10.2.0.2", 80)),
            Verdict::Accept
        );
    }

    #[test]
    fn only_what_the_old_policy_accepted_and_the_new_refuses_is_revoked() {
        let both = acl(
            &["10.2.0.0/16"],
            &[Protocol::Tcp],
            &[(7000, 7000)],
            Action::Accept,
            "both",
        );
        let only_a = acl(
            &["10.4.0.0/16"],
            &[Protocol::Tcp, Protocol::Udp],
            &[(7000, 7000)],
            Action::Accept,
            "a",
        );
        let a = pu(vec![both.clone(), only_a]);
        let b = pu(vec![both]);
        let nets = networks(&["10.1.0.0/24"], &["10.4.3.0/24"], &["10.4.9.0/24"]);
        assert!(revoked(&a, &b, &nets, App, tcp("10.4.0.2", 7000)));
        assert!(revoked(&a, &b, &nets, App, udp("10.4.0.2", 7000)));
        assert!(
            !revoked(&a, &b, &nets, App, tcp("10.2.0.2", 7000)),
            "both allow"
        );
        assert!(
            !revoked(&b, &a, &nets, App, tcp("10.4.0.2", 7000)),
            "new allows"
        );
        assert!(
            !revoked(&a, &b, &nets, App, tcp("10.4.0.2", 7001)),
            "neither"
        );
        assert!(
            !revoked(&a, &b, &nets, App, tcp("10.4.9.2", 7000)),
            "excluded"
        );
        assert!(
            !revoked(&a, &b, &nets, App, udp("10.4.3.2", 7000)),
            "the new policy traps it: not refused"
        );
        assert!(refused_now(&b, &nets, App, tcp("10.4.0.2", 7000)));
        assert!(!refused_now(&b, &nets, App, tcp("10.2.0.2", 7000)));
    }

    #[test]
    fn ports_and_protocols_must_both_match() {
        let p = pu(vec![acl(
            &["10.2.0.0/16"],
            &[Protocol::Udp],
            &[(50, 60), (7000, 7000)],
            Action::Accept,
            "u",
        )]);
        let nets = networks(&["10.1.0.0/24"], &["10.1.0.0/24"], &[]);
        assert_eq!(
            verdict(&p, &nets, App, udp("10.2.0.2", 55)),
            Verdict::Accept
        );
        assert_eq!(
            verdict(&p, &nets, App, udp("10.2.0.2", 61)),
            Verdict::Refuse
        );
        assert_eq!(
            verdict(&p, &nets, App, tcp("10.2.0.2", 55)),
            Verdict::Refuse
        );
        let other = Setup {
            protocol: libc::IPPROTO_SCTP as u8,
            ..udp("10.2.0.2", 55)
        };
        assert_eq!(verdict(&p, &nets, App, other), Verdict::Refuse);
    }

    #[test]
    fn setups_take_the_destination_port_of_their_side() {
        let (pu_end, peer_end) = (
            "10.0.0.1:8080".parse().unwrap(),
            "10.2.0.2:40000".parse().unwrap(),
        );
        assert_eq!(
            Setup::between(Net, TCP, pu_end, peer_end),
            tcp("10.2.0.2", 8080)
        );
        assert_eq!(
            Setup::between(App, TCP, pu_end, peer_end),
            tcp("10.2.0.2", 40000)
        );
        let mapped = "[::ffff:10.2.0.2]:40000".parse().unwrap();
        assert_eq!(
            Setup::between(Net, UDP, "[::]:53".parse().unwrap(), mapped),
            udp("10.2.0.2", 53),
            "an IPv4 peer of an IPv6 socket is judged as IPv4"
        );
    }

    /// The network side mirrors the application side at the PU's own
    /// listening ports: excluded, specific ACLs in bucket order for
    /// sources outside the target TCP networks, trap, protocol-any ACLs,
    /// refusal — with the network ACLs, never the application ones.
    #[test]
    fn the_network_side_judges_sources_at_the_pus_listening_ports() {
        let mut p = listening(
            &[(8080, 8080)],
            &[(5000, 5001)],
            vec![
                acl(
                    &["10.2.0.0/16", "fd02::/16"],
                    &[Protocol::Tcp],
                    &[(8080, 8080)],
                    Action::Accept,
                    "a",
                ),
                acl(&["10.2.3.0/24"], &[Protocol::Tcp], &[], Action::Reject, "r"),
                acl(
                    &["10.0.0.0/8"],
                    &[Protocol::Any],
                    &[],
                    Action::Accept,
                    "any",
                ),
            ],
        );
        // Application ACLs that accept everything play no part.
        p.application_acls = vec![acl(
            &["0.0.0.0/0", "::/0"],
            &[Protocol::Any],
            &[],
            Action::Accept,
            "app",
        )];
        let nets = networks(&["10.1.0.0/24"], &["10.1.0.0/24"], &["10.9.0.0/16"]);
        let net = |setup| verdict(&p, &nets, Net, setup);
        assert_eq!(net(tcp("10.2.0.2", 8080)), Verdict::Accept);
        assert_eq!(net(tcp("fd02::2", 8080)), Verdict::Accept);
        assert_eq!(
            net(tcp("10.2.3.2", 8080)),
            Verdict::Refuse,
            "the reject on a narrower prefix still comes first"
        );
        assert_eq!(net(tcp("10.9.0.2", 8080)), Verdict::Untouched);
        assert_eq!(
            net(tcp("10.2.0.2", 9090)),
            Verdict::Untouched,
            "not one of its ports: not its traffic"
        );
        assert_eq!(
            net(udp("10.2.0.2", 8080)),
            Verdict::Untouched,
            "8080 is a TCP port of the PU only"
        );
        assert_eq!(net(tcp("10.1.0.2", 8080)), Verdict::Trap);
        assert_eq!(net(udp("10.1.0.2", 5001)), Verdict::Trap);
        assert_eq!(net(udp("10.5.0.2", 5000)), Verdict::Accept, "the any ACL");
        assert_eq!(net(tcp("192.168.0.1", 8080)), Verdict::Refuse);
        assert_eq!(net(tcp("fd03::2", 8080)), Verdict::Refuse);
        // The application side of the same PU judges by its own ACLs.
        assert_eq!(
            verdict(&p, &nets, App, tcp("192.168.0.1", 8080)),
            Verdict::Accept
        );
    }

    #[test]
    fn an_incoming_connection_only_the_old_network_acls_accepted_is_revoked() {
        let both = acl(
            &["10.2.0.0/16", "fd02::/16"],
            &[Protocol::Tcp, Protocol::Udp],
            &[(8080, 8080)],
            Action::Accept,
            "both",
        );
        let only_a = acl(
            &["10.4.0.0/16", "fd04::/16", "10.1.0.0/24"],
            &[Protocol::Tcp, Protocol::Udp],
            &[(8080, 8080)],
            Action::Accept,
            "a",
        );
        let a = listening(&[(8080, 8080)], &[(8080, 8080)], vec![both.clone(), only_a]);
        let b = listening(&[(8080, 8080)], &[(8080, 8080)], vec![both.clone()]);
        let nets = networks(&["10.1.0.0/24"], &["10.1.0.0/24"], &["10.4.9.0/24"]);
        let revoked_net = |old: &Pu, new: &Pu, setup| revoked(old, new, &nets, Net, setup);
        assert!(revoked_net(&a, &b, tcp("10.4.0.2", 8080)));
        assert!(revoked_net(&a, &b, tcp("fd04::2", 8080)));
        assert!(revoked_net(&a, &b, udp("10.4.0.2", 8080)));
        assert!(!revoked_net(&a, &b, tcp("10.2.0.2", 8080)), "both accept");
        assert!(!revoked_net(&b, &a, tcp("10.4.0.2", 8080)), "new accepts");
        assert!(!revoked_net(&a, &b, tcp("10.4.9.2", 8080)), "excluded");
        assert!(
            !revoked_net(&a, &b, tcp("10.1.0.2", 8080)),
            "trapped under both: the handshake decided it"
        );
        assert!(
            !revoked(&a, &b, &nets, App, tcp("10.4.0.2", 8080)),
            "the application side has no ACL in either"
        );
        // A port the new policy no longer listens on is not its to judge.
        let c = listening(&[(9090, 9090)], &[], vec![both]);
        assert!(!revoked_net(&a, &c, tcp("10.4.0.2", 8080)));
    }

    fn host(acls: Vec<Acl>) -> Pu {
        Pu {
            kind: PuKind::Host,
            network_acls: acls,
            ..pu(vec![])
        }
    }

    fn at(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    /// A connected socket is a listener's accepting end at its endpoint:
    /// the same port and protocol, the same address or a wildcard — the
    /// IPv4 one for IPv4 only, the IPv6 one for both.
    #[test]
    fn listeners_serve_their_endpoints() {
        let listeners = Listeners::new([
            (TCP, at("0.0.0.0:22")),
            (TCP, at("[::]:80")),
            (TCP, at("10.0.0.1:443")),
            (TCP, at("[fd00::1]:443")),
            (UDP, at("[::ffff:10.0.0.1]:53")),
        ]);
        let serve = |protocol, local| listeners.serve(protocol, at(local));
        assert!(serve(TCP, "10.0.0.1:22"));
        assert!(!serve(TCP, "[fd00::1]:22"), "an IPv4 wildcard is IPv4's");
        assert!(serve(TCP, "10.0.0.1:80") && serve(TCP, "[fd00::1]:80"));
        assert!(serve(TCP, "10.0.0.1:443") && serve(TCP, "[fd00::1]:443"));
        assert!(!serve(TCP, "10.0.0.2:443"), "another address");
        assert!(!serve(TCP, "10.0.0.1:40000"), "a client's port");
        assert!(serve(UDP, "10.0.0.1:53"), "an IPv4-mapped bind is IPv4");
        assert!(!serve(UDP, "10.0.0.1:22"), "22 listens for TCP only");
        assert!(!Listeners::default().serve(TCP, at("10.0.0.1:22")));
    }

    /// A PU found by its ports is judged incoming at them, whatever
    /// listens; the host and container PUs where a socket listens.
    #[test]
    fn the_side_of_a_socket_is_where_peers_connect() {
        let listeners = Listeners::new([(TCP, at("0.0.0.0:22")), (UDP, at("0.0.0.0:53"))]);
        let web = listening(&[(8080, 8080)], &[], vec![]);
        let side = |p: &Pu, protocol, local| side(p, &listeners, protocol, at(local));
        assert_eq!(side(&web, TCP, "10.0.0.1:8080"), Net);
        assert_eq!(side(&web, TCP, "10.0.0.1:22"), App, "not its port");
        for kind in [PuKind::Host, PuKind::Container] {
            let p = Pu {
                kind,
                ..host(vec![])
            };
            assert_eq!(side(&p, TCP, "10.0.0.1:22"), Net);
            assert_eq!(side(&p, UDP, "10.0.0.1:53"), Net);
            assert_eq!(side(&p, TCP, "10.0.0.1:40000"), App);
            assert_eq!(side(&p, UDP, "10.0.0.1:22"), App);
            assert_eq!(side(&p, TCP, "10.0.0.1:8080"), App, "nothing listens");
        }
    }

    /// The host PU's network ACLs judge every port (it has no port set);
    /// an update cuts what only the old ones accepted.
    #[test]
    fn the_host_pus_network_side_judges_every_port() {
        let any_port = |nets: &[&str]| {
            acl(
                nets,
                &[Protocol::Tcp, Protocol::Udp],
                &[],
                Action::Accept,
                "n",
            )
        };
        let old = host(vec![any_port(&["10.2.0.0/16", "10.4.0.0/16", "fd04::/16"])]);
        let new = host(vec![any_port(&["10.2.0.0/16"])]);
        let nets = networks(&["10.1.0.0/24"], &["10.1.0.0/24"], &["10.9.0.0/16"]);
        assert_eq!(
            verdict(&old, &nets, Net, tcp("10.4.0.2", 22)),
            Verdict::Accept
        );
        assert_eq!(
            verdict(&new, &nets, Net, tcp("10.4.0.2", 22)),
            Verdict::Refuse
        );
        assert_eq!(
            verdict(&new, &nets, Net, tcp("10.1.0.2", 22)),
            Verdict::Trap
        );
        assert_eq!(
            verdict(&new, &nets, Net, tcp("10.9.0.2", 22)),
            Verdict::Untouched
        );
        for setup in [
            tcp("10.4.0.2", 22),
            tcp("fd04::2", 443),
            udp("10.4.0.2", 53),
        ] {
            assert!(revoked(&old, &new, &nets, Net, setup), "{setup:?}");
        }
        assert!(
            !revoked(&old, &new, &nets, Net, tcp("10.2.0.2", 22)),
            "both accept"
        );
        assert!(
            !revoked(&old, &new, &nets, App, tcp("10.4.0.2", 22)),
            "no application ACL in either"
        );
    }
}
