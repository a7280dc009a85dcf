//! Conntrack entries as the `conntrack` tool (conntrack-tools) lists them,
//! the argument lists that delete one, and which UDP entries a change of
//! the target networks makes stale ([`no_longer_udp_target`]). Pure:
//! [`super::iptables::exec`] runs the tool.
//!
//! The tool rather than ctnetlink: the iptables datapath already works
//! through the netfilter tools (and setup installs this one), deletions
//! happen only on an update that revokes something, and its listing
//! format (`tcp 6 431999 ESTABLISHED src=… dst=… sport=… dport=… src=…`)
//! has been stable for a decade. Every argument is formatted from a parsed
//! address, port or number — nothing from a policy or the listing is
//! passed through as text, and no shell is involved.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::queues::Direction;
use crate::policy::IpFamily;

/// The original direction of a TCP or UDP conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    /// The flow's ends as a PU's socket sees them, (local, peer), if the
    /// PU is on `side` of it: the sender of the original direction for an
    /// outgoing flow, its receiver for an incoming one. Addresses as a
    /// socket dump gives them (an IPv4-mapped address as IPv4).
    pub fn ends(&self, side: Direction) -> (SocketAddr, SocketAddr) {
        let src = SocketAddr::new(self.src.to_canonical(), self.sport);
        let dst = SocketAddr::new(self.dst.to_canonical(), self.dport);
        match side {
            Direction::App => (src, dst),
            Direction::Net => (dst, src),
        }
    }
}

/// The TCP and UDP entries of `conntrack -L` output, original direction
/// (the first `src=`, `dst=`, `sport=`, `dport=` of a line). Lines of other
/// protocols (no ports) and lines that do not parse are skipped: the
/// listing is only used to find entries to delete, and an entry not found
/// is one not deleted.
pub fn parse_list(text: &str) -> Vec<Flow> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Flow> {
    let mut words = line.split_whitespace();
    let protocol = match words.next()? {
        "tcp" => super::revoke::TCP,
        "udp" => super::revoke::UDP,
        _ => return None,
    };
    let mut field = |key: &str| -> Option<&str> {
        words
            .by_ref()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    };
    // In listing order: src, dst, sport, dport of the original direction.
    let src = field("src")?.parse().ok()?;
    let dst = field("dst")?.parse().ok()?;
    let sport = field("sport")?.parse().ok()?;
    let dport = field("dport")?.parse().ok()?;
    Some(Flow {
        protocol,
        src,
        dst,
        sport,
        dport,
    })
}

/// `conntrack` arguments listing the entries of `family` whose mark
/// matches `value` under `mask`.
pub fn list_args(family: IpFamily, value: u32, mask: u32) -> Vec<String> {
    vec![
        "-L".into(),
        "-f".into(),
        family_arg(family).into(),
        "-m".into(),
        format!("{value:#x}/{mask:#x}"),
    ]
}

/// `conntrack` arguments deleting exactly the entry of `flow` (original
/// direction), and only while its mark still matches `value` under `mask`
/// (an entry re-created since, unmarked, is left alone).
pub fn delete_args(flow: &Flow, value: u32, mask: u32) -> Vec<String> {
    let family = match flow.src {
        IpAddr::V4(_) => IpFamily::V4,
        IpAddr::V6(_) => IpFamily::V6,
    };
    let protocol = if flow.protocol == super::revoke::TCP {
        "tcp"
    } else {
        "udp"
    };
    vec![
        "-D".into(),
        "-f".into(),
        family_arg(family).into(),
        "-p".into(),
        protocol.into(),
        "--orig-src".into(),
        flow.src.to_string(),
        "--orig-dst".into(),
        flow.dst.to_string(),
        "--orig-port-src".into(),
        flow.sport.to_string(),
        "--orig-port-dst".into(),
        flow.dport.to_string(),
        "-m".into(),
        format!("{value:#x}/{mask:#x}"),
    ]
}

/// Whether a change of the target UDP networks from `old` to `new` makes
/// `flow` stale (SPEC, `set_target_networks`: "removing a UDP target
/// flushes its conntrack entries"): a UDP flow with an end that was in a
/// target UDP network and is in none now. Its entry may carry the trap's
/// verdict (the connection mark of an authorised flow), which no longer
/// applies: forgetting it makes the next datagram NEW, judged by the PU's
/// ACLs. Either end, as an entry's original direction is outgoing for a
/// PU's own flows and incoming for a peer's. Flows of other protocols and
/// flows whose ends stay covered (a narrowed or split target) are kept.
pub fn no_longer_udp_target(flow: &Flow, old: &[IpNet], new: &[IpNet]) -> bool {
    let covered = |list: &[IpNet], addr: &IpAddr| list.iter().any(|net| net.contains(addr));
    flow.protocol == super::revoke::UDP
        && [flow.src, flow.dst]
            .iter()
            .any(|end| covered(old, end) && !covered(new, end))
}

fn family_arg(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    }
}

/// Whether a failed `conntrack -D` only found nothing to delete (the tool
/// exits 1 then): the entry ended meanwhile, which is what was wanted.
pub fn nothing_deleted(stderr: &str) -> bool {
    stderr.contains(" 0 flow entries have been deleted")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_original_direction_of_tcp_and_udp_entries() {
        let text = "\
tcp      6 431999 ESTABLISHED src=10.0.0.1 dst=10.2.0.2 sport=34436 dport=7000 src=10.2.0.2 dst=10.0.0.1 sport=7000 dport=34436 [ASSURED] mark=512 use=1
udp      17 29 src=fd00::1 dst=fd02::2 sport=5000 dport=53 [UNREPLIED] src=fd02::2 dst=fd00::1 sport=53 dport=5000 mark=512 use=1
icmp     1 29 src=10.0.0.1 dst=10.2.0.2 type=8 code=0 id=7 src=10.2.0.2 dst=10.0.0.1 type=0 code=0 id=7 mark=512 use=1
tcp      6 10 CLOSE src=10.0.0.1 dst=not-an-address sport=1 dport=2
";
        let flows = parse_list(text);
        assert_eq!(
            flows,
            [
                Flow {
                    protocol: 6,
                    src: "10.0.0.1".parse().unwrap(),
                    dst: "10.2.0.2".parse().unwrap(),
                    sport: 34436,
                    dport: 7000
                },
                Flow {
                    protocol: 17,
                    src: "fd00::1".parse().unwrap(),
                    dst: "fd02::2".parse().unwrap(),
                    sport: 5000,
                    dport: 53
                }
            ]
        );
    }

    #[test]
    fn a_flows_ends_are_the_pus_and_the_peers_by_side() {
        let flow = parse_list(
            "tcp 6 99 ESTABLISHED src=10.4.0.2 dst=10.0.0.1 sport=40000 dport=8080 \
             src=10.0.0.1 dst=10.4.0.2 sport=8080 dport=40000\n",
        )[0];
        let (pu, peer): (SocketAddr, SocketAddr) = (
            "10.0.0.1:8080".parse().unwrap(),
            "10.4.0.2:40000".parse().unwrap(),
        );
        assert_eq!(flow.ends(Direction::Net), (pu, peer), "incoming");
        assert_eq!(flow.ends(Direction::App), (peer, pu), "as if outgoing");
    }

    #[test]
    fn udp_flows_with_an_end_no_longer_a_target_are_stale() {
        let nets = |l: &[&str]| -> Vec<IpNet> { l.iter().map(|n| n.parse().unwrap()).collect() };
        let flows = parse_list(
            "udp 17 29 src=10.0.0.1 dst=10.5.0.2 sport=5000 dport=53 src=10.5.0.2 dst=10.0.0.1 sport=53 dport=5000\n\
             udp 17 29 src=10.5.0.2 dst=10.0.0.1 sport=53 dport=5000 src=10.0.0.1 dst=10.5.0.2 sport=5000 dport=53\n\
             tcp 6 99 ESTABLISHED src=10.0.0.1 dst=10.5.0.2 sport=5000 dport=53 src=10.5.0.2 dst=10.0.0.1 sport=53 dport=5000\n\
             udp 17 29 src=fd00::1 dst=fd05::2 sport=5000 dport=53 src=fd05::2 dst=fd00::1 sport=53 dport=5000\n",
        );
        let old = nets(&["10.5.0.0/16", "fd05::/64"]);
        let stale = |new: &[&str]| -> Vec<bool> {
            let new = nets(new);
            flows
                .iter()
                .map(|f| no_longer_udp_target(f, &old, &new))
                .collect()
        };
        // Both directions, both families; never TCP.
        assert_eq!(stale(&[]), [true, true, false, true]);
        // Still covered by a narrower or another target: kept.
        assert_eq!(
            stale(&["10.5.0.0/24", "fd05::2/128"]),
            [false, false, false, false]
        );
        assert_eq!(stale(&["fd05::/64"]), [true, true, false, false]);
        // Never a target: not this change's business.
        assert!(!no_longer_udp_target(
            &flows[0],
            &nets(&["10.9.0.0/16"]),
            &[]
        ));
    }

    #[test]
    fn arguments_name_the_exact_entry_and_its_mark() {
        let flow = parse_list(
            "udp 17 29 src=fd00::1 dst=fd02::2 sport=5000 dport=53 src=fd02::2 dst=fd00::1 sport=53 dport=5000\n",
        )[0];
        assert_eq!(
            delete_args(&flow, 0x200, 0x700).join(" "),
            "-D -f ipv6 -p udp --orig-src fd00::1 --orig-dst fd02::2 \
             --orig-port-src 5000 --orig-port-dst 53 -m 0x200/0x700"
        );
        assert_eq!(
            list_args(IpFamily::V4, 0x200, 0x700).join(" "),
            "-L -f ipv4 -m 0x200/0x700"
        );
        assert!(nothing_deleted(
            "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"
        ));
        assert!(!nothing_deleted(
            "conntrack v1.4.7 (conntrack-tools): Operation not permitted\n"
        ));
    }
}
