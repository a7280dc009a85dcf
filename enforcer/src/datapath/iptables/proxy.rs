//! A PU's proxy redirection in the fallback (issue 6): its two proxy sets
//! and its rules in the global proxy chains. Pure text.
//!
//! - The sets (only for a PU with a `proxy_port`): `…-dst`, `hash:net,port`
//!   of its dependent services; `…-srv`, `bitmap:port` of its exposed
//!   services. Not versioned: an update changes their content in place.
//! - mangle `TRI-Prx-App` / `TRI-Prx-Net` (first in the main chains, after
//!   the global proxy-mark accept): the PU's connections to its dependent
//!   services, what reaches the proxy port and what the proxy sends from
//!   it, the exposed services, the replies of dependent services (to the
//!   proxy's own connections) — accepted before any ACL or trap, as the
//!   seed does; and for a DNS proxy the PU's queries and the proxy's
//!   answers.
//! - nat `TRI-Redir-App` (OUTPUT) / `TRI-Redir-Net` (PREROUTING), whose
//!   first rule accepts the proxy mark so that the proxy's own connections
//!   are never redirected again: the PU's TCP connections to a dependent
//!   service `REDIRECT` to the proxy port, incoming ones to an exposed
//!   port too, and with a `dns_proxy_port` the PU's UDP DNS queries
//!   (destination port 53, whatever the server) to the DNS proxy.
//!
//! Outgoing rules are the PU's only (its cgroup, class id or user, as its
//! hook); incoming ones are found by the PU's sets and ports. Every rule
//! carries the PU's comment: `delete` finds them by it in a save.
//!
//! The seed also saved the packet's net_cls mark into the connection of a
//! redirected DNS query, so that one DNS proxy could tell the PUs apart by
//! it. Here PUs carry no per-PU mark (cgroup path, class id and user are
//! matched directly), and each PU names its own DNS proxy port: the port a
//! query arrives on tells the PU.

use super::rules::Ctx;
use super::sets::{SetKind, SetSpec};
use crate::naming::{self, PROXY_CHAINS, REDIRECT_CHAINS, ShortName};
use crate::policy::{IpFamily, PortRange, Pu, split_zero_prefix};

/// The DNS port whose queries go to a DNS proxy.
const DNS_PORT: u16 = 53;

/// The PU's proxy sets in `family`: none without a proxy port.
pub fn sets(pu: &Pu, family: IpFamily, short: &ShortName) -> Vec<SetSpec> {
    if pu.proxy_port.is_none() {
        return Vec::new();
    }
    let names = naming::proxy_sets(family, short);
    let destinations = family
        .select(&pu.dependent_services)
        .flat_map(|service| {
            split_zero_prefix(service.network).flat_map(|net| {
                service
                    .ports
                    .iter()
                    .map(move |&ports| format!("{net},tcp:{}", ipset_ports(ports)))
            })
        })
        .collect();
    vec![
        SetSpec {
            name: names.destinations,
            kind: SetKind::NetPorts(family),
            entries: destinations,
        },
        SetSpec::ports(names.server_ports, &pu.exposed_services),
    ]
}

/// ipset's spelling of a port range.
fn ipset_ports(range: PortRange) -> String {
    match range.is_single() {
        true => range.start().to_string(),
        false => format!("{}-{}", range.start(), range.end()),
    }
}

/// The PU's rules in the proxy chains, each `<chain> <spec>` (for `-A` or
/// `-D`): mangle, then nat. `app_match` picks the PU's outgoing traffic
/// (empty for a container PU: the whole namespace).
pub fn rules(ctx: &Ctx, pu: &Pu, short: &ShortName, app_match: &str) -> (Vec<String>, Vec<String>) {
    let comment = comment(pu);
    let (mut mangle, mut nat) = (Vec::new(), Vec::new());
    let rule = |chain: &str, spec: String, target: &str| {
        let spec = [spec.as_str(), comment.as_str()].join(" ");
        format!("{chain} {spec} -j {target}")
    };
    let own = |spec: String| match app_match.is_empty() {
        true => spec,
        false => format!("{spec} {app_match}"),
    };
    let (prx, redir) = (PROXY_CHAINS, REDIRECT_CHAINS);
    if let Some(port) = pu.proxy_port {
        let sets = naming::proxy_sets(ctx.family, short);
        let (dst, srv) = (&sets.destinations, &sets.server_ports);
        let redirect = format!("REDIRECT --to-ports {port}");
        let to_service = format!("-p tcp -m set --match-set {dst} dst,dst");
        let to_exposed = format!("-p tcp -m set --match-set {srv} dst");
        mangle.extend([
            rule(prx.app, own(to_service.clone()), "ACCEPT"),
            rule(prx.app, format!("-p tcp -m tcp --sport {port}"), "ACCEPT"),
            rule(
                prx.app,
                format!("-p tcp -m set --match-set {srv} src"),
                "ACCEPT",
            ),
            rule(prx.net, format!("-p tcp -m tcp --dport {port}"), "ACCEPT"),
            rule(prx.net, to_exposed.clone(), "ACCEPT"),
            rule(
                prx.net,
                format!("-p tcp -m set --match-set {dst} src,src"),
                "ACCEPT",
            ),
        ]);
        nat.extend([
            rule(redir.app, own(to_service), &redirect),
            rule(redir.net, to_exposed, &redirect),
        ]);
    }
    if let Some(port) = pu.dns_proxy_port {
        let query = format!("-p udp -m udp --dport {DNS_PORT}");
        mangle.extend([
            rule(prx.app, own(query.clone()), "ACCEPT"),
            rule(prx.app, format!("-p udp -m udp --sport {port}"), "ACCEPT"),
            rule(prx.net, format!("-p udp -m udp --dport {port}"), "ACCEPT"),
        ]);
        nat.push(rule(
            redir.app,
            own(query),
            &format!("REDIRECT --to-ports {port}"),
        ));
    }
    (mangle, nat)
}

/// The comment on each of the PU's proxy rules, as a save shows it
/// without its quotes.
pub fn comment_text(pu: &Pu) -> String {
    format!("PU {}", pu.id)
}

fn comment(pu: &Pu) -> String {
    format!("-m comment --comment \"{}\"", comment_text(pu))
}
