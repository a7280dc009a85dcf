//! A benchmark world, made once per mode and run, removed on every path:
//! a host namespace (the agent and the PUs' processes) and a peer
//! namespace joined by a veth pair, the peers' servers, and a parent
//! cgroup holding one cgroup per PU, one for the peer host's PU (the
//! handshake scenario's server, [`super::handshake`]) and one for the
//! agent's host scope (where the proxy scenario's proxy listens,
//! [`super::proxy`]). Everything is named `enfbench<pid>…` so that strays
//! are easy to find.
//!
//! Addresses (IPv4 only — see the report's N/A list):
//! - `10.1.0.1`: the host end of the veth;
//! - `10.1.0.2`: the target peer, in the target network `10.1.0.0/24`;
//! - `10.2.0.2`: the ACL peer, covered by the PU's accept ACL for
//!   `10.2.0.0/16`, not a target network;
//! - `10.3.0.2`: the dependent service of the proxy scenario, neither a
//!   target network nor covered by any ACL (reached through the proxy or
//!   not at all).
//!
//! It also renders the agent's config for a [`Scale`]: filler ACLs and
//! target networks are distinct prefixes no traffic goes to (ACLs
//! `10.200.x.y/32`, targets `10.64.0.0/10` in /24s), placed so that the
//! measured traffic needs the last rule: the ACL peer's ACL comes last,
//! the measured PU is the last configured.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::Result;
use enforcer::sandbox::{
    cgroup::Cgroup,
    netns::{Netns, veth_pair},
    unique_name,
};

use super::plan::{Peer, Route, Scale};
use super::servers::{ECHO_PORT, EchoServer, PeerServers};
use crate::config::{Acl, Config, Pu};

/// The prefix of every object a run makes.
pub const PREFIX: &str = "enfbench";

/// The host end of the veth: where the peers reach the PU's server.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// The measured PU's listening port (the incoming probe's server).
pub const PU_PORT: u16 = 5004;
/// The listening port of the peer host's PU (the handshake probe's
/// server, at the target peer's address).
pub const PEER_PU_PORT: u16 = 5005;
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const ACL_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
const TARGET_NET: &str = "10.1.0.0/24";
const ACL_NET: &str = "10.2.0.0/16";
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 2);
const SERVICE_NET: &str = "10.3.0.0/16";
/// The measured PU's proxy port in the proxy scenario.
pub const PROXY_PORT: u16 = 15001;
/// Added to the last PU's ACL by an update.
const UPDATE_NET: &str = "10.4.0.0/16";
/// The target network of both hosts of the handshake scenario: the veth's.
pub const LINK_NET: &str = TARGET_NET;
/// Added to the target networks by a target change.
const EXTRA_TARGET: &str = "10.63.0.0/24";

/// Which variant of a scale's config: the reloads of the control-plane
/// scenario switch between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Variant {
    /// One PU more than the scale has.
    pub extra_pu: bool,
    /// The last PU's ACL covers one more network.
    pub updated: bool,
    /// One target network more.
    pub extra_target: bool,
}

pub struct World {
    // Dropped in declaration order: servers (threads inside `peers`),
    // the PU cgroups, their parent, then the namespaces.
    acl_servers: PeerServers,
    target_servers: PeerServers,
    /// The proxy scenario's: the ACL peer's, the dependent service's.
    _echo: [EchoServer; 2],
    cgroups: Vec<Cgroup>,
    peer_pu: Cgroup,
    scope: Cgroup,
    parent: Cgroup,
    parent_name: String,
    pub host: Netns,
    pub peers: Netns,
}

impl World {
    pub fn new(cgroup2: &Path) -> Result<Self> {
        let host = Netns::named(unique_name(PREFIX))?;
        let peers = Netns::named(unique_name(PREFIX))?;
        let (host_end, peer_end) = veth_pair(&host, &peers, 1)?;
        for (ip, net) in [(ACL_IP, ACL_NET), (SERVICE_IP, SERVICE_NET)] {
            peers.ip(&["addr", "add", &format!("{ip}/32"), "dev", &peer_end.ifname])?;
            host.ip(&["route", "add", net, "dev", &host_end.ifname])?;
        }
        let parent_name = unique_name(PREFIX);
        let parent = Cgroup::named(cgroup2, &parent_name)?;
        let peer_pu = Cgroup::named(parent.path(), PEER_PU)?;
        let scope = Cgroup::named(parent.path(), SCOPE)?;
        let echo =
            [Route::Direct, Route::Proxy].map(|r| EchoServer::start(&peers, Self::echo_addr(r)));
        let [direct, service] = echo;
        Ok(Self {
            acl_servers: PeerServers::start(&peers, IpAddr::V4(ACL_IP))?,
            target_servers: PeerServers::start(&peers, IpAddr::V4(TARGET_IP))?,
            _echo: [direct?, service?],
            cgroups: Vec::new(),
            peer_pu,
            scope,
            parent,
            parent_name,
            host,
            peers,
        })
    }

    /// Makes exactly `n` PU cgroups exist (`pu0` … under the parent).
    pub fn ensure_cgroups(&mut self, n: usize) -> Result<()> {
        self.cgroups.truncate(n);
        while self.cgroups.len() < n {
            let name = format!("pu{}", self.cgroups.len());
            self.cgroups.push(Cgroup::named(self.parent.path(), &name)?);
        }
        Ok(())
    }

    /// The cgroup of the measured PU at `scale`: the last one.
    pub fn measured(&self, scale: Scale) -> &Cgroup {
        &self.cgroups[scale.pus - 1]
    }

    /// The `i`-th PU's cgroup as a config names it (relative to the
    /// cgroup v2 mount).
    pub fn pu_cgroup_path(&self, i: usize) -> String {
        format!("{}/pu{i}", self.parent_name)
    }

    /// The cgroup of the peer host's PU (processes in it run in `peers`).
    pub fn peer_pu(&self) -> &Cgroup {
        &self.peer_pu
    }

    /// The peer host's PU's cgroup as a config names it.
    pub fn peer_pu_cgroup_path(&self) -> String {
        format!("{}/{PEER_PU}", self.parent_name)
    }

    /// The agent's host scope in the proxy scenario: where the proxy's
    /// listening socket is made.
    pub fn scope(&self) -> &Cgroup {
        &self.scope
    }

    /// Where the echo server of `route` listens: the ACL peer's address,
    /// or the dependent service's (which the proxy connects onward to).
    pub fn echo_addr(route: Route) -> SocketAddr {
        let ip = match route {
            Route::Direct => ACL_IP,
            Route::Proxy => SERVICE_IP,
        };
        SocketAddr::new(IpAddr::V4(ip), ECHO_PORT)
    }

    /// The proxy scenario's config: the measured PU (the first) accepts
    /// TCP to the ACL peer by an ACL, and has [`PROXY_PORT`] for its proxy
    /// and the dependent service's echo port as its dependent service;
    /// the host scope is [`World::scope`].
    pub fn proxy_config(&self) -> String {
        render_proxy_config(&self.parent_name)
    }

    pub fn servers(&self, peer: Peer) -> &PeerServers {
        match peer {
            Peer::Acl => &self.acl_servers,
            Peer::Target => &self.target_servers,
        }
    }

    pub fn addr(peer: Peer, port: u16) -> SocketAddr {
        SocketAddr::new(Self::ip(peer), port)
    }

    pub fn ip(peer: Peer) -> IpAddr {
        IpAddr::V4(match peer {
            Peer::Acl => ACL_IP,
            Peer::Target => TARGET_IP,
        })
    }

    /// Where the peers reach the measured PU's server.
    pub fn pu_addr() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(HOST_IP), PU_PORT)
    }

    /// The agent's config for `scale` in `variant`.
    pub fn config(&self, scale: Scale, variant: Variant) -> String {
        render_config(&self.parent_name, scale, variant)
    }
}

/// The peer host's PU's cgroup, beside the `pu<i>` ones.
const PEER_PU: &str = "peer-pu";
/// The agent's host scope in the proxy scenario, beside them too.
const SCOPE: &str = "host-scope";

/// The config for `scale` in `variant`, PU cgroups under `parent`.
fn render_config(parent: &str, scale: Scale, variant: Variant) -> String {
    let mut targets = vec![TARGET_NET.to_owned()];
    targets.extend((0..scale.targets.saturating_sub(1)).map(filler_target));
    if variant.extra_target {
        targets.push(EXTRA_TARGET.to_owned());
    }
    let list = targets
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        "# enfbench: {scale}\n\
         mode = \"local-server\"\n\
         [networks]\n\
         target_tcp = [{list}]\n\
         target_udp = [{list}]\n"
    );
    let pus = scale.pus + usize::from(variant.extra_pu);
    for i in 0..pus {
        let last = i + 1 == scale.pus;
        let _ = write!(
            text,
            "\n[[pus]]\nid = \"pu{i}\"\nkind = \"linux-process\"\ncgroup = \"{parent}/pu{i}\"\n"
        );
        if last {
            // The incoming probe's server (keys of the PU itself, so
            // before any table of it).
            let _ = writeln!(text, "tcp_ports = [{PU_PORT}]");
            for j in 0..scale.acls.saturating_sub(1) {
                let _ = write!(
                    text,
                    "[[pus.application_acls]]\nnetworks = [\"{}\"]\n\
                     protocols = [\"tcp\", \"udp\"]\nports = [7000]\naction = \"accept\"\n\
                     policy_id = \"filler{j}\"\n",
                    filler_acl(j)
                );
            }
        }
        let networks = if last && variant.updated {
            format!("\"{ACL_NET}\", \"{UPDATE_NET}\"")
        } else {
            format!("\"{ACL_NET}\"")
        };
        let _ = write!(
            text,
            "[[pus.application_acls]]\nnetworks = [{networks}]\n\
             protocols = [\"tcp\", \"udp\"]\naction = \"accept\"\npolicy_id = \"to-peer\"\n"
        );
        if last {
            // The incoming probe's server: the ACL peer may connect, the
            // target peer's SYN is trapped.
            let _ = write!(
                text,
                "[[pus.network_acls]]\nnetworks = [\"{ACL_NET}\"]\n\
                 protocols = [\"tcp\"]\naction = \"accept\"\npolicy_id = \"from-peer\"\n"
            );
        }
    }
    text
}

/// The proxy scenario's config, cgroups under `parent`.
fn render_proxy_config(parent: &str) -> String {
    let pu = Pu::process("pu0", &format!("{parent}/pu0"))
        .application_acl(Acl::accept("to-peer", [ACL_NET]).tcp([ECHO_PORT]))
        .proxy_port(PROXY_PORT)
        .dependent_service(SERVICE_NET, [ECHO_PORT]);
    Config::local_server()
        .target_tcp([TARGET_NET])
        .target_udp([TARGET_NET])
        .host_scope_at(&format!("{parent}/{SCOPE}"))
        .pu(pu)
        .to_toml()
}

/// The `j`-th filler ACL network: a /32 in 10.200.0.0/14.
fn filler_acl(j: usize) -> String {
    format!("10.{}.{}.{}/32", 200 + j / 65_536, (j / 256) % 256, j % 256)
}

/// The `j`-th filler target network: a /24 in 10.64.0.0/10.
fn filler_target(j: usize) -> String {
    format!("10.{}.{}.0/24", 64 + (j / 256) % 64, j % 256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fillers_are_distinct_and_stay_clear_of_the_peers() {
        let acls: std::collections::BTreeSet<_> = (0..10_000).map(filler_acl).collect();
        assert_eq!(acls.len(), 10_000);
        assert_eq!(filler_acl(0), "10.200.0.0/32");
        assert_eq!(filler_acl(9_999), "10.200.39.15/32");
        let targets: std::collections::BTreeSet<_> = (0..10_000).map(filler_target).collect();
        assert_eq!(targets.len(), 10_000);
        assert_eq!(filler_target(9_999), "10.103.15.0/24");
        for net in targets.iter().chain(&acls) {
            for peer in [TARGET_IP, ACL_IP] {
                assert!(!contains(net, peer), "{net} covers {peer}");
            }
        }
    }

    /// Does the IPv4 CIDR `net` contain `ip`?
    fn contains(net: &str, ip: Ipv4Addr) -> bool {
        let (addr, len) = net.split_once('/').unwrap();
        let addr: Ipv4Addr = addr.parse().unwrap();
        let mask = u32::MAX
            .checked_shl(32 - len.parse::<u32>().unwrap())
            .unwrap_or(0);
        u32::from(addr) & mask == u32::from(ip) & mask
    }

    #[test]
    fn the_proxy_config_parses_and_proxies_only_the_service() {
        use enforcer::policy::Configuration;
        let config = Configuration::from_toml_str(&render_proxy_config("p")).unwrap();
        let [pu] = config.pus.as_slice() else {
            panic!("one PU: {config:?}");
        };
        assert_eq!(pu.proxy_port.map(|p| p.get()), Some(PROXY_PORT));
        assert_eq!(pu.dependent_services.len(), 1);
        assert_eq!(pu.application_acls.len(), 1);
        // The service is neither a target nor covered by the ACL.
        for net in [TARGET_NET, ACL_NET] {
            assert!(!contains(net, SERVICE_IP), "{net}");
        }
        assert!(contains(SERVICE_NET, SERVICE_IP));
        assert!(render_proxy_config("p").contains("p/host-scope"));
    }

    #[test]
    fn configs_parse_and_put_the_measured_traffic_last() {
        use enforcer::policy::Configuration;
        let scale = Scale {
            pus: 3,
            acls: 5,
            targets: 4,
        };
        let parse = |variant| Configuration::from_toml_str(&render_config("p", scale, variant));
        let config = parse(Variant::default()).unwrap();
        assert_eq!(config.pus.len(), 3);
        let last = &config.pus[2];
        assert_eq!(last.application_acls.len(), 5);
        assert_eq!(last.application_acls[4].policy_id.as_str(), "to-peer");
        assert_eq!(last.network_acls.len(), 1);
        assert_eq!(last.tcp_ports.len(), 1);
        assert!(config.pus[0].tcp_ports.is_empty() && config.pus[0].network_acls.is_empty());
        assert_eq!(config.pus[0].application_acls.len(), 1);
        assert_eq!(config.networks.target_tcp.len(), 4);

        let all = Variant {
            extra_pu: true,
            updated: true,
            extra_target: true,
        };
        let changed = parse(all).unwrap();
        assert_eq!(changed.pus.len(), 4);
        assert_eq!(changed.pus[2].application_acls[4].networks.len(), 2);
        assert_eq!(changed.networks.target_udp.len(), 5);
    }
}
