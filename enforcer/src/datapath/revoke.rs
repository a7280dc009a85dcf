//! Which connections an `update` must cut (SPEC, `update`: "a connection
//! allowed only by the old policy is cut"). Pure: the decision a PU's
//! application policy gives a connection set-up, and the choice of flows
//! and sockets to cut from it; the datapaths do the cutting
//! ([`super::sockdiag`], [`super::conntrack`]).
//!
//! [`app_verdict`] is SPEC's "Order of evaluation inside a PU" for the
//! outgoing side, as both datapaths install it (the connect hooks of
//! `enforcer-ebpf/src/connect.rs`, the PU chain of `iptables/pu.rs`):
//! excluded peers are untouched; the specific-protocol ACLs, in bucket
//! order, for peers outside the target TCP networks; then the trap (TCP
//! to a target TCP network, UDP to a target UDP network); then the
//! protocol-any ACLs; then refusal. Observe-continue ACLs only log.
//!
//! Only a connection some ACL accepted can be revoked: a trapped one was
//! authorised by the handshake, which a policy update does not redo, and an
//! excluded one is never touched. A connection the new policy would trap
//! is not cut either — the new policy does not refuse it, it would ask.
//!
//! What the cut can miss, by a hair: a connection whose set-up was judged
//! under the old policy just before the switch but that reaches the
//! kernel's tables (the socket hash for eBPF, confirmed conntrack entries
//! for iptables) only after they were read, microseconds later.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::{Acl, Action, FamilyNetworks, ObserveMode, Protocol, Pu, in_bucket_order};

/// A connection's set-up as a policy judges it: protocol, peer, peer port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`; anything else is never revoked.
    pub protocol: u8,
    pub peer: IpAddr,
    pub port: u16,
}

/// What a PU's application policy does with a connection set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The peer is in the excluded networks: no policy applies.
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

/// The verdict of `pu`'s application ACLs on `setup`, with the target and
/// excluded networks `networks` (either family, or both mixed).
pub fn app_verdict(pu: &Pu, networks: &FamilyNetworks, setup: Setup) -> Verdict {
    let within = |list: &[IpNet]| list.iter().any(|net| net.contains(&setup.peer));
    if within(&networks.excluded) {
        return Verdict::Untouched;
    }
    let ordered = in_bucket_order(&pu.application_acls);
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
/// set-up: the old policy accepted it by an ACL and the new one refuses it.
pub fn revoked(old: &Pu, new: &Pu, networks: &FamilyNetworks, setup: Setup) -> bool {
    app_verdict(old, networks, setup) == Verdict::Accept
        && app_verdict(new, networks, setup) == Verdict::Refuse
}

/// Whether a socket an ACL accepted when it connected (the eBPF datapath
/// knows this from the class in its mark) must be cut now that `pu` is in
/// force: the policy in force refuses it. Whatever earlier policy accepted
/// it, it is not allowed now.
pub fn refused_now(pu: &Pu, networks: &FamilyNetworks, setup: Setup) -> bool {
    app_verdict(pu, networks, setup) == Verdict::Refuse
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::acl;
    use crate::policy::{CgroupPath, PuId, PuKind};

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
            app_verdict(&p, &nets, tcp("10.9.0.2", 7000)),
            Verdict::Untouched
        );
        assert_eq!(
            app_verdict(&p, &nets, tcp("10.2.0.2", 7000)),
            Verdict::Accept
        );
        assert_eq!(
            app_verdict(&p, &nets, tcp("fd02::2", 7000)),
            Verdict::Accept
        );
        // Another port: the any ACL after the trap accepts it.
        assert_eq!(
            app_verdict(&p, &nets, tcp("10.2.0.2", 7001)),
            Verdict::Accept
        );
        assert_eq!(app_verdict(&p, &nets, tcp("10.1.0.2", 7000)), Verdict::Trap);
        assert_eq!(app_verdict(&p, &nets, udp("10.5.0.2", 53)), Verdict::Trap);
        assert_eq!(
            app_verdict(&p, &nets, tcp("192.168.0.1", 7000)),
            Verdict::Refuse
        );
        assert_eq!(
            app_verdict(&p, &nets, tcp("fd03::2", 7000)),
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
            app_verdict(&p, &nets, tcp("10.2.0.2", 80)),
            Verdict::Refuse,
            "the wider reject comes first"
        );
        let p = pu(vec![
            p.application_acls[0].clone(),
            p.application_acls[2].clone(),
        ]);
        assert_eq!(app_verdict(&p, &nets, tcp("10.2.0.2", 80)), Verdict::Accept);
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
        assert!(revoked(&a, &b, &nets, tcp("10.4.0.2", 7000)));
        assert!(revoked(&a, &b, &nets, udp("10.4.0.2", 7000)));
        assert!(!revoked(&a, &b, &nets, tcp("10.2.0.2", 7000)), "both allow");
        assert!(!revoked(&b, &a, &nets, tcp("10.4.0.2", 7000)), "new allows");
        assert!(!revoked(&a, &b, &nets, tcp("10.4.0.2", 7001)), "neither");
        assert!(!revoked(&a, &b, &nets, tcp("10.4.9.2", 7000)), "excluded");
        assert!(
            !revoked(&a, &b, &nets, udp("10.4.3.2", 7000)),
            "the new policy traps it: not refused"
        );
        assert!(refused_now(&b, &nets, tcp("10.4.0.2", 7000)));
        assert!(!refused_now(&b, &nets, tcp("10.2.0.2", 7000)));
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
        assert_eq!(app_verdict(&p, &nets, udp("10.2.0.2", 55)), Verdict::Accept);
        assert_eq!(app_verdict(&p, &nets, udp("10.2.0.2", 61)), Verdict::Refuse);
        assert_eq!(app_verdict(&p, &nets, tcp("10.2.0.2", 55)), Verdict::Refuse);
        let other = Setup {
            protocol: libc::IPPROTO_SCTP as u8,
            ..udp("10.2.0.2", 55)
        };
        assert_eq!(app_verdict(&p, &nets, other), Verdict::Refuse);
    }
}
