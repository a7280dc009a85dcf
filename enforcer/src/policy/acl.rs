//! ACLs: the per-PU rules for peers outside the target networks (and for
//! protocols without a handshake), and the port ranges they and the
//! services use.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU16;

use ipnet::IpNet;

use super::error::Problem;
use super::pu::PolicyId;

/// One ACL. Application ACLs match the *destinations* of a PU's outgoing
/// traffic, network ACLs the *sources* of its incoming traffic. When
/// several ACLs cover an address, the SPEC's bucket order (by action and
/// observe mode) decides, not the longest prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    /// Peers it matches; IPv4 and IPv6 mixed, host bits cleared.
    pub networks: Vec<IpNet>,
    /// Protocols it matches; never empty, and `any` stands alone.
    pub protocols: Vec<Protocol>,
    /// Peer ports for TCP/UDP; empty means every port.
    pub ports: Vec<PortRange>,
    pub action: Action,
    /// Log each decision (NFLOG or ring-buffer event).
    pub log: bool,
    pub observe: ObserveMode,
    /// Carried into flow logs so a decision can be traced to its policy.
    pub policy_id: PolicyId,
}

/// SPEC's evaluation order for ACLs that cover the same peer: all rejects
/// before all accepts, and within each, observe-continue (which only logs),
/// then enforced, then observe-apply. Declaration order breaks ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bucket {
    RejectObserveContinue,
    Reject,
    RejectObserveApply,
    AcceptObserveContinue,
    Accept,
    AcceptObserveApply,
}

impl Acl {
    pub fn bucket(&self) -> Bucket {
        match (self.action, self.observe) {
            (Action::Reject, ObserveMode::Continue) => Bucket::RejectObserveContinue,
            (Action::Reject, ObserveMode::None) => Bucket::Reject,
            (Action::Reject, ObserveMode::Apply) => Bucket::RejectObserveApply,
            (Action::Accept, ObserveMode::Continue) => Bucket::AcceptObserveContinue,
            (Action::Accept, ObserveMode::None) => Bucket::Accept,
            (Action::Accept, ObserveMode::Apply) => Bucket::AcceptObserveApply,
        }
    }

    /// Whether this ACL matches every protocol (evaluated after the trap
    /// rules) rather than specific ones.
    pub fn is_protocol_any(&self) -> bool {
        self.protocols.contains(&Protocol::Any)
    }
}

impl Acl {
    /// Whether the ACL covers a packet exchanged with `peer`, of IP
    /// protocol number `protocol`, to destination `port` (the peer's port
    /// for an application ACL, the PU's for a network ACL, as both
    /// datapaths match `--dports`).
    pub fn covers(&self, peer: IpAddr, protocol: u8, port: Option<u16>) -> bool {
        let protocol_ok =
            self.protocols.iter().any(|p| p.number() == Some(protocol)) || self.is_protocol_any();
        let port_ok = self.ports.is_empty()
            || port
                .is_some_and(|port| self.ports.iter().any(|r| (r.start..=r.end).contains(&port)));
        protocol_ok && port_ok && self.networks.iter().any(|net| net.contains(&peer))
    }
}

/// The ACL that decides for a packet, as the datapaths would for a peer
/// outside the target networks: the first in bucket order that covers it
/// ([`Acl::covers`]) and is enforced (observe-continue only logs). `None`:
/// no ACL decides, the PU's default refuses. User space needs it for the
/// peers in the target networks that send no handshake token (issue 7:
/// judged by the ACLs as an external peer would be).
pub fn deciding(acls: &[Acl], peer: IpAddr, protocol: u8, port: Option<u16>) -> Option<&Acl> {
    in_bucket_order(acls)
        .into_iter()
        .find(|acl| acl.observe != ObserveMode::Continue && acl.covers(peer, protocol, port))
}

/// `acls` in SPEC's bucket order (a stable sort: declaration order within
/// a bucket). Both datapaths evaluate ACLs in exactly this order.
pub fn in_bucket_order<'a>(acls: impl IntoIterator<Item = &'a Acl>) -> Vec<&'a Acl> {
    let mut ordered: Vec<&Acl> = acls.into_iter().collect();
    ordered.sort_by_key(|acl| acl.bucket());
    ordered
}

/// The protocols an ACL can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    /// Every protocol; evaluated after the specific-protocol ACLs.
    Any,
}

keywords!(Protocol {
    Tcp = "tcp",
    Udp = "udp",
    Icmp = "icmp",
    Icmpv6 = "icmpv6",
    Any = "any",
});

impl Protocol {
    /// The IP protocol number; `None` for `any`.
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Tcp => Some(6),
            Protocol::Udp => Some(17),
            Protocol::Icmp => Some(1),
            Protocol::Icmpv6 => Some(58),
            Protocol::Any => None,
        }
    }

    /// Whether the protocol has ports an ACL can match on. `any` has none:
    /// a port match would silently narrow it to TCP and UDP.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// What an ACL does with what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Accept,
    Reject,
}

keywords!(Action {
    Accept = "accept",
    Reject = "reject",
});

/// Whether an ACL is enforced or only observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ObserveMode {
    /// Enforced.
    #[default]
    None,
    /// Logged as if it applied, then evaluation continues.
    Continue,
    /// Logged, and applied.
    Apply,
}

keywords!(ObserveMode {
    None = "none",
    Continue = "observe-continue",
    Apply = "observe-apply",
});

/// An inclusive range of ports, `start..=end`, never containing port 0.
/// A single port is the range `p..=p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// The range `start..=end`; refuses port 0 and a reversed range.
    pub fn new(start: u16, end: u16) -> Result<Self, Problem> {
        if start == 0 || end == 0 {
            Err(Problem::PortOutOfRange)
        } else if start > end {
            Err(Problem::ReversedPortRange)
        } else {
            Ok(Self { start, end })
        }
    }

    /// The one-port range `port..=port`.
    pub fn single(port: NonZeroU16) -> Self {
        Self {
            start: port.get(),
            end: port.get(),
        }
    }

    pub fn start(self) -> u16 {
        self.start
    }

    pub fn end(self) -> u16 {
        self.end
    }

    pub fn is_single(self) -> bool {
        self.start == self.end
    }

    /// Parses `"80"`, `"8000:8080"` (the seed's and iptables' spelling) or
    /// `"8000-8080"`.
    pub(crate) fn parse(text: &str) -> Result<Self, Problem> {
        match text.split_once([':', '-']) {
            Some((start, end)) => Self::new(parse_port(start)?, parse_port(end)?),
            None => {
                let port = parse_port(text)?;
                Self::new(port, port)
            }
        }
    }

    /// A port written as a TOML integer.
    pub(crate) fn from_number(number: i64) -> Result<Self, Problem> {
        u16::try_from(number)
            .ok()
            .and_then(NonZeroU16::new)
            .map(Self::single)
            .ok_or(Problem::PortOutOfRange)
    }
}

/// Formats as `80` or `8000:8080`, the spelling iptables' multiport takes.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}:{}", self.start, self.end)
        }
    }
}

/// Decimal digits only: `u32::from_str` would also take `+80`.
fn parse_port(text: &str) -> Result<u16, Problem> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Problem::InvalidPortSyntax);
    }
    // All digits: a number too long for u32 is simply too large a port.
    text.parse::<u32>()
        .ok()
        .and_then(|n| u16::try_from(n).ok())
        .ok_or(Problem::PortOutOfRange)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Keyword;

    fn acl(action: Action, observe: ObserveMode, id: &str) -> Acl {
        Acl {
            networks: vec!["10.0.0.0/8".parse().unwrap()],
            protocols: vec![Protocol::Tcp],
            ports: vec![],
            action,
            log: false,
            observe,
            policy_id: PolicyId::new(id).unwrap(),
        }
    }

    /// SPEC, "Order of evaluation inside a PU": reject observe-continue,
    /// reject, reject observe-apply, accept observe-continue, accept,
    /// accept observe-apply; written out by hand, not derived from Bucket.
    #[test]
    fn bucket_order_is_specs() {
        use Action::*;
        use ObserveMode::*;
        let acls = [
            acl(Accept, Apply, "a-apply"),
            acl(Accept, None, "a1"),
            acl(Reject, None, "r1"),
            acl(Accept, Continue, "a-cont"),
            acl(Reject, Apply, "r-apply"),
            acl(Accept, None, "a2"),
            acl(Reject, Continue, "r-cont"),
        ];
        let order: Vec<&str> = in_bucket_order(&acls)
            .iter()
            .map(|a| a.policy_id.as_str())
            .collect();
        assert_eq!(
            order,
            ["r-cont", "r1", "r-apply", "a-cont", "a1", "a2", "a-apply"]
        );
    }

    #[test]
    fn the_deciding_acl_follows_bucket_order_and_skips_observe_continue() {
        use Action::*;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut narrow = acl(Accept, ObserveMode::None, "narrow-accept");
        narrow.networks = vec!["10.1.0.0/24".parse().unwrap()];
        narrow.ports = vec![PortRange::new(7000, 7001).unwrap()];
        let mut wide = acl(Reject, ObserveMode::None, "wide-reject");
        wide.networks = vec!["10.1.0.0/16".parse().unwrap()];
        wide.protocols = vec![Protocol::Udp];
        let watch = acl(Reject, ObserveMode::Continue, "watch");
        let mut any = acl(Accept, ObserveMode::None, "any");
        any.networks = vec!["fd00::/16".parse().unwrap()];
        any.protocols = vec![Protocol::Any];
        let acls = [narrow, wide, watch, any];
        let id = |peer: &str, proto: u8, port: u16| {
            deciding(&acls, ip(peer), proto, Some(port)).map(|a| a.policy_id.as_str())
        };
        // TCP: the UDP reject does not cover it, observe-continue only logs.
        assert_eq!(id("10.1.0.2", 6, 7000), Some("narrow-accept"));
        assert_eq!(id("10.1.0.2", 6, 7002), None, "port outside the ACL");
        // UDP: the wide reject's bucket comes first.
        assert_eq!(id("10.1.0.2", 17, 7000), Some("wide-reject"));
        assert_eq!(id("10.2.0.2", 6, 7000), None);
        assert_eq!(id("fd00:1::2", 132, 1), Some("any"));
        assert_eq!(
            deciding(&acls, ip("fd00::1"), 6, None).map(|a| a.policy_id.as_str()),
            Some("any")
        );
    }

    #[test]
    fn port_ranges_parse_in_every_accepted_spelling() {
        assert_eq!(PortRange::parse("80"), PortRange::new(80, 80));
        assert_eq!(PortRange::parse("8000:8080"), PortRange::new(8000, 8080));
        assert_eq!(PortRange::parse("8000-8080"), PortRange::new(8000, 8080));
        assert_eq!(PortRange::parse("65535"), PortRange::new(65535, 65535));
        assert_eq!(PortRange::from_number(443), PortRange::new(443, 443));
    }

    #[test]
    fn bad_ports_are_refused_with_the_right_problem() {
        for bad in ["0", "65536", "99999999999", "0:80"] {
            assert_eq!(PortRange::parse(bad), Err(Problem::PortOutOfRange), "{bad}");
        }
        for bad in [
            "", "http", "+80", " 80", "80:", ":80", "1:2:3", "1-2-3", "1:2-3",
        ] {
            assert_eq!(
                PortRange::parse(bad),
                Err(Problem::InvalidPortSyntax),
                "{bad}"
            );
        }
        assert_eq!(
            PortRange::parse("9000:8000"),
            Err(Problem::ReversedPortRange)
        );
        for bad in [0, -1, 65536] {
            assert_eq!(PortRange::from_number(bad), Err(Problem::PortOutOfRange));
        }
    }

    #[test]
    fn port_ranges_display_in_the_seed_spelling() {
        assert_eq!(
            PortRange::parse("8000-8080").unwrap().to_string(),
            "8000:8080"
        );
        assert_eq!(PortRange::parse("53").unwrap().to_string(), "53");
    }

    #[test]
    fn keywords_round_trip_and_only_tcp_udp_have_ports() {
        for name in Protocol::NAMES {
            let protocol = Protocol::from_name(name).unwrap();
            assert_eq!(protocol.as_str(), *name);
            assert_eq!(protocol.has_ports(), matches!(*name, "tcp" | "udp"));
        }
        assert_eq!(Protocol::from_name("TCP"), None);
        assert_eq!(
            ObserveMode::from_name("observe-apply"),
            Some(ObserveMode::Apply)
        );
        assert_eq!(Action::NAMES, ["accept", "reject"]);
    }
}
