//! The demo's world: what it builds on the machine, the policy it gives
//! the agent, and the kinds of traffic it sends.
//!
//! ```text
//!  host netns enfdemo<pid>-host                 peer netns enfdemo<pid>-peer
//!  ┌──────────────────────────────┐             ┌──────────────────────────┐
//!  │ agent (run --netns …-host)   │             │ TCP echo servers, :7000: │
//!  │ cgroup enfdemo<pid>-pu:      │ veth1a      │   10.1.0.2  target       │
//!  │   the PU's clients           ├─────────────┤   10.2.0.2  ACL-allowed  │
//!  │ clients outside any PU       │ 10.1.0.1    │   10.3.0.2  no ACL       │
//!  │ route 10.0.0.0/8 → veth1a    │      veth1b │   10.9.0.2  excluded     │
//!  └──────────────────────────────┘             └──────────────────────────┘
//! ```
//!
//! The cgroup is a child of the cgroup v2 root, never the root itself; the
//! namespaces are new ones, never the host's own. Dropping a [`World`]
//! stops the servers and removes the cgroup and both namespaces.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::sandbox::cgroup::Cgroup;
use crate::sandbox::netns::{Netns, TwoHosts};
use crate::sandbox::traffic::TcpEchoServer;

/// The port every echo server listens on.
pub const PORT: u16 = 7000;

/// The demo's policy, given to the agent as its config file.
/// `@CGROUP@` stands for the PU's cgroup, relative to the cgroup v2
/// mount; [`World::config`] fills it in. The networks match
/// [`Kind::peer`]: a unit test checks that they do.
pub const CONFIG: &str = r#"# The policy of `enforcer demo` (see `enforcer demo --help`).
mode = "local-server"

[networks]
# The target network: TCP set-up with it is trapped to the agent, which
# accepts it (the identity handshake's place).
target_tcp = ["10.1.0.0/24"]
target_udp = ["10.1.0.0/24"]
# Never touched: no trap, no policy, no log.
excluded = ["10.9.0.0/16"]

[flow_log]
# The agent's stdout goes to its log file.
output = "stdout"

# The one PU: every process in the demo's cgroup.
[[pus]]
id = "demo"
kind = "linux-process"
cgroup = "@CGROUP@"

# Peers outside the target network need an ACL: 10.2.0.0/16 has one,
# 10.3.0.0/16 has none, so the PU's connections there are blocked.
[[pus.application_acls]]
networks = ["10.2.0.0/16"]
protocols = ["tcp"]
ports = [7000]
action = "accept"
policy_id = "demo-acl"
"#;

/// The PU's id in [`CONFIG`].
pub const PU: &str = "demo";

/// A kind of connection the demo makes, once per round each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// From the PU to the target network: trapped, and accepted by the
    /// agent.
    Target,
    /// From the PU to a peer an accept ACL covers: connects.
    AclAllowed,
    /// From the PU to a peer with no ACL: blocked.
    NoAcl,
    /// From the PU to an excluded peer: connects, untouched.
    Excluded,
    /// From a process outside every PU to the target network: connects;
    /// only its SYN-ACK is trapped (the global rule for every SYN-ACK from
    /// a target TCP network), and accepted.
    OutsidePu,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Target,
        Kind::AclAllowed,
        Kind::NoAcl,
        Kind::Excluded,
        Kind::OutsidePu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Target => "target",
            Kind::AclAllowed => "acl-allowed",
            Kind::NoAcl => "no-acl",
            Kind::Excluded => "excluded",
            Kind::OutsidePu => "outside-pu",
        }
    }

    /// The peer it connects to.
    pub fn peer(self) -> SocketAddr {
        let host = match self {
            Kind::Target | Kind::OutsidePu => Ipv4Addr::new(10, 1, 0, 2),
            Kind::AclAllowed => Ipv4Addr::new(10, 2, 0, 2),
            Kind::NoAcl => Ipv4Addr::new(10, 3, 0, 2),
            Kind::Excluded => Ipv4Addr::new(10, 9, 0, 2),
        };
        SocketAddr::new(IpAddr::V4(host), PORT)
    }

    /// Whether its client runs inside the PU's cgroup.
    pub fn in_pu(self) -> bool {
        self != Kind::OutsidePu
    }

    /// Whether the policy lets it connect.
    pub fn connects(self) -> bool {
        self != Kind::NoAcl
    }

    /// Whether its set-up is trapped to the agent for the PU.
    pub fn trapped(self) -> bool {
        self == Kind::Target
    }

    /// Packets of one such connection the kernel queues to the agent: a
    /// PU's set-up with the target network, its SYN, SYN-ACK and first
    /// ACK; an outside process's SYN-ACK from the target network (SPEC,
    /// "Global steering"); nothing else.
    pub fn queued(self) -> u64 {
        match self {
            Kind::Target => 3,
            Kind::OutsidePu => 1,
            Kind::AclAllowed | Kind::NoAcl | Kind::Excluded => 0,
        }
    }

    /// What should happen, in words.
    pub fn expected(self) -> &'static str {
        match self {
            Kind::Target => "connects, trapped",
            Kind::AclAllowed => "connects (ACL)",
            Kind::NoAcl => "blocked",
            Kind::Excluded => "connects, untouched",
            Kind::OutsidePu => "connects, SYN-ACK trapped",
        }
    }
}

/// The demo's namespaces, cgroup and echo servers.
pub struct World {
    // Fields drop in order: the servers (threads in the peer namespace)
    // first, the namespaces last.
    _servers: Vec<TcpEchoServer>,
    cgroup: Cgroup,
    hosts: TwoHosts,
}

impl World {
    /// Builds it all under names starting with `base`: namespaces
    /// `<base>-host` and `<base>-peer`, cgroup `<cgroup2>/<base>-pu`.
    /// Whatever was made before a failure is removed again.
    pub fn build(base: &str, cgroup2: &Path) -> Result<Self> {
        let [host, peer, cgroup] = Self::names(base);
        let hosts = TwoHosts::join(Netns::named(host)?, Netns::named(peer)?)?;
        hosts
            .a
            .ip(&["route", "add", "10.0.0.0/8", "dev", &hosts.a_end.ifname])?;
        let mut servers = Vec::new();
        for kind in Kind::ALL {
            let peer = kind.peer();
            if servers.iter().any(|s: &TcpEchoServer| s.addr() == peer) {
                continue;
            }
            if peer.ip() != hosts.b_end.v4 {
                let address = format!("{}/32", peer.ip());
                hosts
                    .b
                    .ip(&["addr", "add", &address, "dev", &hosts.b_end.ifname])?;
            }
            servers.push(TcpEchoServer::start(&hosts.b, peer)?);
        }
        let cgroup = Cgroup::named(cgroup2, &cgroup)?;
        Ok(Self {
            _servers: servers,
            cgroup,
            hosts,
        })
    }

    /// The host namespace's, the peer namespace's and the cgroup's names.
    fn names(base: &str) -> [String; 3] {
        ["host", "peer", "pu"].map(|role| format!("{base}-{role}"))
    }

    /// Where what [`World::build`] makes shows on the machine: to check
    /// that none of it is left.
    pub fn paths(base: &str, cgroup2: &Path) -> Vec<PathBuf> {
        let [host, peer, cgroup] = Self::names(base);
        vec![
            Netns::path_of(&host),
            Netns::path_of(&peer),
            cgroup2.join(cgroup),
        ]
    }

    /// The namespace the agent and the clients run in.
    pub fn host(&self) -> &Netns {
        &self.hosts.a
    }

    /// The namespace the peers listen in.
    pub fn peer(&self) -> &Netns {
        &self.hosts.b
    }

    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    /// [`CONFIG`] for this world's cgroup.
    pub fn config(&self) -> String {
        let name = self.cgroup.path().file_name().unwrap_or_default();
        CONFIG.replace("@CGROUP@", &name.to_string_lossy())
    }

    /// A command running `program` where `kind`'s client belongs: in the
    /// host namespace, and in the PU's cgroup unless it is
    /// [`Kind::OutsidePu`].
    pub fn client(&self, kind: Kind, program: &Path) -> Result<Command> {
        if kind.in_pu() {
            self.cgroup.command_in(self.host(), program)
        } else {
            self.host().command(program)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, Configuration, Protocol};

    /// The policy and the kinds tell the same story.
    #[test]
    fn the_config_matches_the_kinds() {
        let config =
            Configuration::from_toml_str(&CONFIG.replace("@CGROUP@", "enfdemo1-pu")).unwrap();
        let covers =
            |nets: &[ipnet::IpNet], kind: Kind| nets.iter().any(|n| n.contains(&kind.peer().ip()));
        let [pu] = config.pus.as_slice() else {
            panic!("one PU: {:?}", config.pus)
        };
        assert_eq!(pu.id.as_str(), PU);
        for kind in Kind::ALL {
            let target = covers(&config.networks.target_tcp, kind);
            let excluded = covers(&config.networks.excluded, kind);
            let accepted = pu.application_acls.iter().any(|acl| {
                acl.action == Action::Accept
                    && acl.protocols.contains(&Protocol::Tcp)
                    && acl
                        .ports
                        .iter()
                        .any(|p| (p.start()..=p.end()).contains(&PORT))
                    && covers(&acl.networks, kind)
            });
            let name = kind.name();
            assert_eq!(
                target && !excluded,
                kind.trapped() || kind == Kind::OutsidePu,
                "{name}"
            );
            assert_eq!(excluded, kind == Kind::Excluded, "{name}");
            assert_eq!(accepted, kind == Kind::AclAllowed, "{name}");
            assert_eq!(
                kind.connects(),
                !kind.in_pu() || target || excluded || accepted,
                "{name}"
            );
        }
    }
}
