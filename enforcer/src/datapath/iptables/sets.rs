//! `ipset restore` text: creating and filling sets, destroying them, and
//! the exact difference between two contents. Pure text.
//!
//! Every `create` and `add` carries `-exist`: a set left behind by a
//! failed step is reused (and flushed) rather than refused, and a network
//! or port listed twice in a policy is not an error. `del` carries it too,
//! so applying a difference twice — or undoing a half-applied one — is
//! harmless.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use ipnet::IpNet;

use crate::policy::{IpFamily, PortRange};

/// A set to create, with its whole content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub kind: SetKind,
    /// Entries in ipset's own spelling.
    pub entries: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// `hash:net` of one family: target, excluded and ACL networks.
    Networks(IpFamily),
    /// `bitmap:port` over every port: a PU's listening ports.
    Ports,
    /// `hash:net,port` of one family: a PU's dependent services
    /// (`<net>,tcp:<port or range>`).
    NetPorts(IpFamily),
}

impl SetSpec {
    /// A `hash:net` set holding `nets` (which must not hold a /0: ipset
    /// refuses it; callers split it with `split_zero_prefix`).
    pub fn networks(name: String, family: IpFamily, nets: &[IpNet]) -> Self {
        Self {
            name,
            kind: SetKind::Networks(family),
            entries: nets.iter().map(IpNet::to_string).collect(),
        }
    }

    /// A `bitmap:port` set holding `ports`.
    pub fn ports(name: String, ports: &[PortRange]) -> Self {
        Self {
            name,
            kind: SetKind::Ports,
            entries: ports.iter().copied().map(port_entry).collect(),
        }
    }
}

/// Creates each set (or takes over a leftover of the same name and type),
/// empties it and fills it.
pub fn create(specs: &[SetSpec]) -> String {
    let mut text = String::new();
    for spec in specs {
        let name = &spec.name;
        let kind = match spec.kind {
            SetKind::Networks(IpFamily::V4) => "hash:net family inet",
            SetKind::Networks(IpFamily::V6) => "hash:net family inet6",
            SetKind::Ports => "bitmap:port range 0-65535",
            SetKind::NetPorts(IpFamily::V4) => "hash:net,port family inet",
            SetKind::NetPorts(IpFamily::V6) => "hash:net,port family inet6",
        };
        // Writing to a String cannot fail.
        let _ = writeln!(text, "create {name} {kind} -exist");
        let _ = writeln!(text, "flush {name}");
        for entry in &spec.entries {
            let _ = writeln!(text, "add {name} {entry} -exist");
        }
    }
    text
}

/// Destroys the sets; each must exist and be unreferenced.
pub fn destroy<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|name| format!("destroy {name}\n"))
        .collect()
}

/// Turns the `hash:net` set `name` from holding `old` into holding `new`:
/// only the entries that differ are touched, additions first (a target
/// set going from "everything" to a list never passes through empty).
pub fn network_diff(name: &str, old: &[IpNet], new: &[IpNet]) -> String {
    let old: BTreeSet<IpNet> = old.iter().copied().collect();
    let new: BTreeSet<IpNet> = new.iter().copied().collect();
    let added = new.difference(&old).map(IpNet::to_string);
    let removed = old.difference(&new).map(IpNet::to_string);
    diff_lines(name, added, removed)
}

/// Turns the set `name` from holding the entries of `old` into those of
/// `new` (the same set, in ipset's spelling): only what differs.
pub fn entry_diff(name: &str, old: &[String], new: &[String]) -> String {
    let old: BTreeSet<&String> = old.iter().collect();
    let new: BTreeSet<&String> = new.iter().collect();
    let added = new.difference(&old).map(|e| e.to_string());
    let removed = old.difference(&new).map(|e| e.to_string());
    diff_lines(name, added, removed)
}

/// Turns the `bitmap:port` set `name` from holding `old` into holding
/// `new`. Ranges may overlap, so the difference is taken port by port and
/// written back as runs: deleting a listed range could otherwise remove a
/// port that another range still covers.
pub fn port_diff(name: &str, old: &[PortRange], new: &[PortRange]) -> String {
    let expand = |ranges: &[PortRange]| -> BTreeSet<u16> {
        ranges.iter().flat_map(|r| r.start()..=r.end()).collect()
    };
    let (old, new) = (expand(old), expand(new));
    let added = runs(new.difference(&old).copied());
    let removed = runs(old.difference(&new).copied());
    diff_lines(name, added, removed)
}

fn diff_lines(
    name: &str,
    added: impl Iterator<Item = String>,
    removed: impl Iterator<Item = String>,
) -> String {
    let adds = added.map(|entry| format!("add {name} {entry} -exist\n"));
    let dels = removed.map(|entry| format!("del {name} {entry} -exist\n"));
    adds.chain(dels).collect()
}

/// Ascending ports as maximal runs, in ipset's spelling.
fn runs(ports: impl Iterator<Item = u16>) -> impl Iterator<Item = String> {
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for port in ports {
        match runs.last_mut() {
            Some((_, end)) if u32::from(*end) + 1 == u32::from(port) => *end = port,
            _ => runs.push((port, port)),
        }
    }
    runs.into_iter().map(|(start, end)| match start == end {
        true => start.to_string(),
        false => format!("{start}-{end}"),
    })
}

/// ipset writes a port range with `-` (iptables' multiport with `:`).
fn port_entry(range: PortRange) -> String {
    if range.is_single() {
        range.start().to_string()
    } else {
        format!("{}-{}", range.start(), range.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ports(list: &[(u16, u16)]) -> Vec<PortRange> {
        list.iter()
            .map(|&(a, b)| PortRange::new(a, b).unwrap())
            .collect()
    }

    #[test]
    fn creates_fills_and_destroys() {
        let specs = [
            SetSpec::networks(
                "TRI-v6-Acl-x-1a0".into(),
                IpFamily::V6,
                &nets(&["fd00::/8"]),
            ),
            SetSpec::ports(
                "TRI-v4-ProcPort-x".into(),
                &ports(&[(80, 80), (8000, 8080)]),
            ),
        ];
        assert_eq!(
            create(&specs),
            "create TRI-v6-Acl-x-1a0 hash:net family inet6 -exist\n\
             flush TRI-v6-Acl-x-1a0\n\
             add TRI-v6-Acl-x-1a0 fd00::/8 -exist\n\
             create TRI-v4-ProcPort-x bitmap:port range 0-65535 -exist\n\
             flush TRI-v4-ProcPort-x\n\
             add TRI-v4-ProcPort-x 80 -exist\n\
             add TRI-v4-ProcPort-x 8000-8080 -exist\n"
        );
        assert_eq!(destroy(["a", "b"]), "destroy a\ndestroy b\n");
    }

    #[test]
    fn network_diff_touches_only_changed_entries_additions_first() {
        let old = nets(&["0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8"]);
        let new = nets(&["10.0.0.0/8", "192.168.0.0/16"]);
        assert_eq!(
            network_diff("S", &old, &new),
            "add S 192.168.0.0/16 -exist\n\
             del S 0.0.0.0/1 -exist\n\
             del S 128.0.0.0/1 -exist\n"
        );
        assert_eq!(network_diff("S", &new, &new), "");
    }

    #[test]
    fn port_diff_is_exact_with_overlapping_ranges() {
        // 85 stays: it is still covered by the single port in `new`.
        let old = ports(&[(80, 90), (85, 85)]);
        let new = ports(&[(85, 85), (443, 443)]);
        assert_eq!(
            port_diff("P", &old, &new),
            "add P 443 -exist\n\
             del P 80-84 -exist\n\
             del P 86-90 -exist\n"
        );
        assert_eq!(port_diff("P", &old, &ports(&[(85, 85), (80, 90)])), "");
        let top = ports(&[(65534, 65535)]);
        assert_eq!(port_diff("P", &[], &top), "add P 65534-65535 -exist\n");
    }
}
