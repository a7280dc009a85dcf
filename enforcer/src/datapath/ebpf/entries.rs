//! Policy → map entries, pure: the keys and values the eBPF datapath
//! writes, built and tested without a kernel.
//!
//! ACL semantics are bucket order over *every* ACL covering an address,
//! but an LPM trie returns only the longest matching prefix. So each
//! prefix named by any of a PU's ACLs gets an entry holding every rule
//! whose network covers that prefix, already in evaluation order. For an
//! address `a`, all ACL networks containing `a` are nested prefixes of one
//! another, so the longest one, `P`, is covered by all the others: the
//! rules stored at `P` are exactly the rules covering `a`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use enforcer_common::maps::{
    ACTION_ACCEPT, ACTION_REJECT, AclEntry, AclRule, MAX_ACL_RULES, NetKey, OBSERVE_APPLY,
    OBSERVE_CONTINUE, OBSERVE_NONE, PROTO_ANY, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    PortKey, RULE_LOG, SCOPE_BITS, V4_MAPPED_BITS, acl_scope, family_scope, net_acl_scope,
};
use ipnet::IpNet;

use crate::datapath::DatapathError;
use crate::datapath::ports::{ListenPort, Transport};
use crate::policy::{
    Acl, Action, ObserveMode, PortRange, Protocol, Pu, in_bucket_order, split_zero_prefix,
};

/// An address in the maps' one family: IPv4 as `::ffff:a.b.c.d`.
pub fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The LPM key (prefix length in bits, data) of a network in `scope`,
/// with the scope's family bit set for IPv4.
pub fn net_key(scope: u32, net: IpNet) -> (u32, NetKey) {
    let (bits, v4) = match net {
        IpNet::V4(n) => (V4_MAPPED_BITS + u32::from(n.prefix_len()), true),
        IpNet::V6(n) => (u32::from(n.prefix_len()), false),
    };
    (
        SCOPE_BITS + bits,
        NetKey::new(family_scope(scope, v4), mapped(net.network())),
    )
}

/// The ACL entries of one side (application or network) of a PU: one per
/// distinct prefix its ACLs name, with every covering rule in order.
/// `policy_index` maps a policy id to the number carried in the rules.
pub fn acl_entries(
    acls: &[Acl],
    mut policy_index: impl FnMut(&Acl) -> u32,
) -> Result<BTreeMap<IpNet, AclEntry>, DatapathError> {
    // Rules per ACL, and the ACLs split into the two evaluation phases.
    let ordered = in_bucket_order(acls);
    let (specific, any): (Vec<&Acl>, Vec<&Acl>) =
        ordered.into_iter().partition(|acl| !acl.is_protocol_any());
    let rules_of = |acl: &Acl, index: u32| -> Vec<AclRule> { acl_rules(acl, index) };
    let specific: Vec<(&Acl, Vec<AclRule>)> = specific
        .into_iter()
        .map(|a| (a, rules_of(a, policy_index(a))))
        .collect();
    let any: Vec<(&Acl, Vec<AclRule>)> = any
        .into_iter()
        .map(|a| (a, rules_of(a, policy_index(a))))
        .collect();

    let prefixes: std::collections::BTreeSet<IpNet> = acls
        .iter()
        .flat_map(|acl| acl.networks.iter().copied().flat_map(split_zero_prefix))
        .collect();
    let mut entries = BTreeMap::new();
    for prefix in prefixes {
        let covering = |phase: &[(&Acl, Vec<AclRule>)]| -> Vec<AclRule> {
            phase
                .iter()
                .filter(|(acl, _)| acl.networks.iter().any(|n| n.contains(&prefix)))
                .flat_map(|(_, rules)| rules.iter().copied())
                .collect()
        };
        let (s, a) = (covering(&specific), covering(&any));
        if s.len() + a.len() > MAX_ACL_RULES {
            return Err(DatapathError::Full {
                what: format!(
                    "the ACL rules covering {prefix} ({} rules)",
                    s.len() + a.len()
                ),
                capacity: MAX_ACL_RULES,
            });
        }
        let mut entry = AclEntry {
            specific: s.len() as u32,
            any: a.len() as u32,
            rules: [AclRule::default(); MAX_ACL_RULES],
        };
        for (slot, rule) in entry.rules.iter_mut().zip(s.into_iter().chain(a)) {
            *slot = rule;
        }
        entries.insert(prefix, entry);
    }
    Ok(entries)
}

/// Which of a PU's ACLs an entry belongs to: application (destinations of
/// its outgoing traffic) or network (sources of its incoming traffic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    App,
    Net,
}

impl Side {
    /// The trie scope of this side's entries for a PU slot and generation.
    pub fn scope(self, slot: u32, generation: u32) -> u32 {
        match self {
            Side::App => acl_scope(slot, generation),
            Side::Net => net_acl_scope(slot, generation),
        }
    }
}

/// An ACL entry's place: its side and prefix.
pub type AclPrefix = (Side, IpNet);

/// The `PU_PORTS` keys of a PU's listening ports: one per port of every
/// TCP and UDP range.
pub fn port_keys(pu: &Pu) -> BTreeSet<PortKey> {
    let keys = |proto: u8, ranges: &[PortRange]| -> Vec<PortKey> {
        ranges
            .iter()
            .flat_map(|r| r.start()..=r.end())
            .map(|port| PortKey::new(proto, port))
            .collect()
    };
    keys(PROTO_TCP, &pu.tcp_ports)
        .into_iter()
        .chain(keys(PROTO_UDP, &pu.udp_ports))
        .collect()
}

/// The `PU_PORTS` key of one run-time port.
pub fn port_key(port: ListenPort) -> PortKey {
    let proto = match port.transport {
        Transport::Tcp => PROTO_TCP,
        Transport::Udp => PROTO_UDP,
    };
    PortKey::new(proto, port.port.get())
}

/// One rule per protocol and port range of an ACL.
fn acl_rules(acl: &Acl, policy: u32) -> Vec<AclRule> {
    let base = AclRule {
        port_lo: 0,
        port_hi: u16::MAX,
        proto: PROTO_ANY,
        action: match acl.action {
            Action::Accept => ACTION_ACCEPT,
            Action::Reject => ACTION_REJECT,
        },
        observe: match acl.observe {
            ObserveMode::None => OBSERVE_NONE,
            ObserveMode::Continue => OBSERVE_CONTINUE,
            ObserveMode::Apply => OBSERVE_APPLY,
        },
        // An observed ACL is always logged, whatever its `log` flag, as
        // the fallback's rules do: observing is logging.
        flags: if acl.log || acl.observe != ObserveMode::None {
            RULE_LOG
        } else {
            0
        },
        policy,
    };
    acl.protocols
        .iter()
        .flat_map(|&protocol| {
            let proto = match protocol {
                Protocol::Tcp => PROTO_TCP,
                Protocol::Udp => PROTO_UDP,
                Protocol::Icmp => PROTO_ICMP,
                Protocol::Icmpv6 => PROTO_ICMPV6,
                Protocol::Any => PROTO_ANY,
            };
            let ranges: Vec<(u16, u16)> = if protocol.has_ports() && !acl.ports.is_empty() {
                acl.ports.iter().map(|r| (r.start(), r.end())).collect()
            } else {
                vec![(0, u16::MAX)]
            };
            ranges.into_iter().map(move |(lo, hi)| AclRule {
                proto,
                port_lo: lo,
                port_hi: hi,
                ..base
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::acl;

    #[test]
    fn ipv4_is_mapped_and_prefix_lengths_count_scope_and_mapping() {
        let (bits, key) = net_key(7, "10.1.0.0/16".parse().unwrap());
        assert_eq!(bits, 32 + 96 + 16);
        assert_eq!(key.scope, [0x80, 0, 0, 7], "IPv4 carries the family bit");
        assert_eq!(&key.addr[10..], &[0xff, 0xff, 10, 1, 0, 0]);
        let (bits6, key6) = net_key(7, "fd00::/8".parse().unwrap());
        assert_eq!(bits6, 32 + 8);
        assert_eq!(key6.scope, [0, 0, 0, 7]);
        assert_eq!(key6.addr[0], 0xfd);
        // Half of "all of IPv6" covers ::ffff:0:0/96 by address, but never
        // an IPv4 key: the scopes differ.
        let (_, half) = net_key(7, "::/1".parse().unwrap());
        assert_ne!(half.scope, key.scope);
    }

    /// A reject on a /8 and an accept on a /16 inside it: the /16 entry
    /// holds both, reject first (bucket order), whatever the declaration
    /// order; the /8 entry holds only the reject.
    #[test]
    fn overlapping_acls_resolve_by_bucket_not_prefix() {
        for reversed in [false, true] {
            let mut acls = vec![
                acl(
                    &["10.0.0.0/8"],
                    &[Protocol::Tcp],
                    &[],
                    Action::Reject,
                    "wide-reject",
                ),
                acl(
                    &["10.1.0.0/16"],
                    &[Protocol::Tcp],
                    &[(443, 443)],
                    Action::Accept,
                    "narrow-accept",
                ),
            ];
            if reversed {
                acls.reverse();
            }
            let entries =
                acl_entries(&acls, |a| if a.action == Action::Reject { 1 } else { 2 }).unwrap();
            let narrow = &entries[&"10.1.0.0/16".parse().unwrap()];
            assert_eq!(narrow.specific, 2);
            assert_eq!(narrow.rules[0].action, ACTION_REJECT);
            assert_eq!(narrow.rules[1].action, ACTION_ACCEPT);
            assert_eq!(
                (narrow.rules[1].port_lo, narrow.rules[1].port_hi),
                (443, 443)
            );
            let wide = &entries[&"10.0.0.0/8".parse().unwrap()];
            assert_eq!((wide.specific, wide.any), (1, 0));
            assert_eq!(wide.rules[0].policy, 1);
        }
    }

    #[test]
    fn protocol_any_rules_come_after_specific_ones() {
        let acls = vec![
            acl(
                &["10.0.0.0/8"],
                &[Protocol::Any],
                &[],
                Action::Accept,
                "any",
            ),
            acl(
                &["10.0.0.0/8"],
                &[Protocol::Udp, Protocol::Tcp],
                &[(53, 53), (80, 90)],
                Action::Accept,
                "dns",
            ),
        ];
        let entries = acl_entries(&acls, |_| 0).unwrap();
        let e = &entries[&"10.0.0.0/8".parse().unwrap()];
        assert_eq!((e.specific, e.any), (4, 1));
        assert_eq!(e.rules[4].proto, PROTO_ANY);
        assert_eq!((e.rules[4].port_lo, e.rules[4].port_hi), (0, u16::MAX));
    }

    #[test]
    fn zero_prefix_becomes_two_halves() {
        let acls = vec![acl(
            &["0.0.0.0/0"],
            &[Protocol::Tcp],
            &[],
            Action::Accept,
            "all",
        )];
        let entries = acl_entries(&acls, |_| 0).unwrap();
        let keys: Vec<String> = entries.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["0.0.0.0/1", "128.0.0.0/1"]);
    }

    #[test]
    fn too_many_covering_rules_is_an_error_not_a_silent_cut() {
        let ports: Vec<(u16, u16)> = (1..=MAX_ACL_RULES as u16 + 1).map(|p| (p, p)).collect();
        let acls = vec![acl(
            &["10.0.0.0/8"],
            &[Protocol::Tcp],
            &ports,
            Action::Accept,
            "many",
        )];
        assert!(matches!(
            acl_entries(&acls, |_| 0),
            Err(DatapathError::Full { .. })
        ));
    }

    /// An observed ACL logs whatever its `log` flag says, as the
    /// fallback's NFLOG rules do; an unobserved one only when asked.
    #[test]
    fn observed_acls_always_log() {
        let mut a = acl(&["10.0.0.0/8"], &[Protocol::Tcp], &[], Action::Reject, "p");
        assert_eq!(acl_rules(&a, 0)[0].flags & RULE_LOG, 0);
        a.observe = ObserveMode::Continue;
        assert_eq!(acl_rules(&a, 0)[0].flags & RULE_LOG, RULE_LOG);
        a.observe = ObserveMode::Apply;
        assert_eq!(acl_rules(&a, 0)[0].flags & RULE_LOG, RULE_LOG);
        a.observe = ObserveMode::None;
        a.log = true;
        assert_eq!(acl_rules(&a, 0)[0].flags & RULE_LOG, RULE_LOG);
    }
}
