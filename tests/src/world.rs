//! A small world for tests about one linux-process PU and a few peers:
//! host `a` runs the agent and holds the PU's cgroup, host `b` the peers,
//! one address per [`Peer`] in the world's family, routed from `a` (the
//! addresses go on `b` as [`roles`] adds a role's). The usual peers are
//! here ([`TARGET`], [`ACL_PEER`], [`OTHER`], [`EXCLUDED`]). Used by the
//! behaviour, flow-log, target-network and mark-layout suites, and (built
//! by role, [`roles`]) by the incoming and malformed-packet suites.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    process::{Child, ChildStdin, ChildStdout, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    netfilter::{self, Family},
    netns::{Netns, TwoHosts, output_ok},
    privilege, roles,
};

/// The port every peer listens on.
pub const PORT: u16 = 7000;

/// A peer on host `b`: its address and network, IPv4 and IPv6.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: [&'static str; 2],
    pub nets: [&'static str; 2],
}

/// In the target networks (`b`'s veth end itself): set-up is trapped.
pub const TARGET: Peer = Peer {
    addr: ["10.1.0.2", "fd00:1::2"],
    nets: ["10.1.0.0/24", "fd00:1::/64"],
};
/// Not a target; the usual config's accept ACL covers it.
pub const ACL_PEER: Peer = Peer {
    addr: ["10.2.0.2", "fd00:2::2"],
    nets: ["10.2.0.0/16", "fd00:2::/64"],
};
/// Not a target, no ACL: blocked for the PU.
pub const OTHER: Peer = Peer {
    addr: ["10.3.0.2", "fd00:3::2"],
    nets: ["10.3.0.0/16", "fd00:3::/64"],
};
/// In the excluded networks: never touched.
pub const EXCLUDED: Peer = Peer {
    addr: ["10.9.0.2", "fd00:9::2"],
    nets: ["10.9.0.0/16", "fd00:9::/64"],
};
/// Networks holding every peer above, the excluded one included.
pub const EVERY_PEER: [&str; 2] = ["10.0.0.0/8", "fd00::/16"];

/// The index of a family's entry in [`Peer`].
pub fn index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

pub struct PuWorld {
    pub family: Family,
    pub cgroup: Cgroup,
    pub hosts: TwoHosts,
}

impl PuWorld {
    /// Hosts `a` and `b` with each of `peers` on `b` (a host route to it
    /// on `a`, [`roles::add_addresses`]), and the PU's cgroup. A peer on `b`'s veth end itself
    /// (`10.1.0.2`, `fd00:1::2`) needs nothing more.
    pub fn new(env: &privilege::Env, family: Family, peers: &[Peer]) -> Result<Self> {
        let hosts = TwoHosts::new()?;
        let i = index(family);
        let b_end = hosts.b_end.ip(family);
        let addrs = peers
            .iter()
            .map(|peer| peer.addr[i].parse().expect("literal address"))
            .filter(|&addr| addr != b_end);
        roles::add_addresses(&hosts, addrs)?;
        Ok(Self {
            family,
            cgroup: Cgroup::new(&env.cgroup2)?,
            hosts,
        })
    }

    pub fn ip(&self, peer: Peer) -> IpAddr {
        peer.addr[index(self.family)]
            .parse()
            .expect("literal address")
    }

    /// A peer's service: its address in this world's family, [`PORT`].
    pub fn addr(&self, peer: Peer) -> SocketAddr {
        SocketAddr::new(self.ip(peer), PORT)
    }

    /// A peer's network in this world's family, as a config writes it.
    pub fn net(&self, peer: Peer) -> &'static str {
        peer.nets[index(self.family)]
    }

    /// Starts the agent in `a` with `config`, on `datapath`.
    pub fn start(&self, bin: &str, datapath: Datapath, config: &str) -> Result<Agent> {
        let agent = Agent::start(bin, &self.hosts.a, datapath, config)?;
        let kind = agent.status()?["datapath"]["kind"].clone();
        ensure!(kind == datapath.expected(), "datapath in use: {kind}");
        Ok(agent)
    }

    /// Packets the kernel ever queued in host `a`'s namespace.
    pub fn kernel_queued(&self) -> Result<u64> {
        Ok(netfilter::queue_stats(&self.hosts.a)?
            .iter()
            .map(|q| u64::from(q.id_sequence))
            .sum())
    }

    /// The UDP conntrack entries of host `a` with `peer` at either end, as
    /// `conntrack -L` prints them.
    pub fn udp_entries(&self, peer: Peer) -> Result<Vec<String>> {
        let family = match self.family {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        };
        let out = output_ok(
            self.hosts
                .a
                .command("conntrack")?
                .args(["-L", "-f", family, "-p", "udp"]),
        )?;
        let ip = self.ip(peer).to_string();
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .filter(|l| l.contains(&format!("={ip} ")))
            .map(str::to_owned)
            .collect())
    }

    /// A connected UDP socket of a process inside the PU, to `to`.
    pub fn udp_flow(&self, nettool: &str, to: SocketAddr) -> Result<UdpFlow> {
        UdpFlow::start(nettool, &self.cgroup, &self.hosts.a, to)
    }
}

impl UdpFlow {
    /// A connected UDP socket of a process inside `cgroup` and `ns`, to
    /// `to`.
    pub fn start(nettool: &str, cgroup: &Cgroup, ns: &Netns, to: SocketAddr) -> Result<Self> {
        let mut cmd = cgroup.command_in(ns, nettool)?;
        cmd.args(["udp-flow", &to.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().context("starting nettool udp-flow")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        if !first.starts_with("connected ") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the UDP flow to {to} did not connect: {first}");
        }
        Ok(UdpFlow {
            child,
            stdin,
            stdout,
        })
    }
}

/// A `nettool udp-flow` child: one connected UDP socket.
pub struct UdpFlow {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl UdpFlow {
    /// Sends one datagram; `Ok(None)` if the socket sent it, else the
    /// error kind the socket gave.
    pub fn send(&mut self, payload: &str) -> Result<Option<String>> {
        writeln!(self.stdin, "{payload}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        match line.trim() {
            "sent" => Ok(None),
            other => Ok(Some(other.to_owned())),
        }
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
