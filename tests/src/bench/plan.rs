//! What a run measures: the setups (a policy scale run under each mode),
//! the probes and control-plane operations in each, how often and how
//! long — for `--quick` and for the full run — and the metrics they
//! yield.

use std::fmt;
use std::time::Duration;

use super::stats::Unit;

/// The parts of a run, selectable with `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Part {
    /// Scenarios 1 and 3 (and the base of 2, 4, 5): one PU, one ACL, one
    /// target network, under every mode.
    Base,
    /// Scenario 2, 4 and 5 as the number of PUs grows.
    Pus,
    /// Scenario 2 and 4 as the last PU's ACLs grow.
    Acls,
    /// Scenario 2 and 4 as the target networks grow.
    Targets,
    /// Scenario 5 (and 4's start-up) at the largest number of PUs.
    Footprint,
    /// Scenario 3 through the identity handshake: the peer host runs an
    /// agent too, both with `[identity]`.
    Handshake,
    /// Requests from the PU through its proxy (a dependent service, issue
    /// 6) against the same PU's direct requests to an ACL peer.
    Proxy,
}

/// How the PU's traffic is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// No agent at all: the kernel alone.
    Bare,
    Iptables,
    Ebpf,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Bare, Mode::Iptables, Mode::Ebpf];
    pub const DATAPATHS: [Mode; 2] = [Mode::Iptables, Mode::Ebpf];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Bare => "bare",
            Mode::Iptables => "iptables",
            Mode::Ebpf => "ebpf",
        }
    }
}

/// The size of the policy: the measured PU is always the last of `pus`;
/// it has `acls` application ACLs (the one that covers the ACL peer
/// last); there are `targets` target networks (the target peer's among
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scale {
    pub pus: usize,
    pub acls: usize,
    pub targets: usize,
}

impl Scale {
    pub const BASE: Scale = Scale {
        pus: 1,
        acls: 1,
        targets: 1,
    };
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PUs={} ACLs={} targets={}",
            self.pus, self.acls, self.targets
        )
    }
}

/// Where the PU's traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Not a target network; an accept ACL covers it (no trap).
    Acl,
    /// In a target network: connection set-up is trapped to the agent.
    Target,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Acl => "ACL peer",
            Peer::Target => "target peer",
        }
    }
}

/// How the proxy scenario's requests travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    /// Straight to the ACL peer, accepted by the PU's ACL.
    Direct,
    /// To the PU's dependent service, redirected to its proxy, which
    /// connects onward; under the bare kernel (nothing redirects) the
    /// client connects to the proxy's address itself.
    Proxy,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct → ACL peer",
            Route::Proxy => "through the proxy → dependent service",
        }
    }
}

/// One traffic measurement from a process inside the measured PU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// One TCP flow, bulk data, for the probe's duration.
    TcpThroughput(Peer),
    /// Small (64-byte) datagrams on one connected UDP socket.
    Udp(Peer),
    /// The same from an unconnected socket (`sendto` per datagram).
    UdpSendto(Peer),
    /// New TCP connections, [`super::client::CONNECT_THREADS`] at a time.
    Connect(Peer),
    /// New TCP connections from the peer to a server in the PU (its
    /// listening port), as many at a time: the network side.
    Incoming(Peer),
    /// New TCP connections, as many at a time, to the identity peer: a
    /// server in a PU on the peer host, both hosts' agents running the
    /// identity handshake (a [`Setup::identity`] setup).
    Handshake,
    /// Requests (a new connection each: connect, a small request, its
    /// echo, close), as many at a time, by `route` (a [`Setup::proxy`]
    /// setup).
    Request(Route),
}

impl Probe {
    pub fn name(self) -> String {
        match self {
            Probe::TcpThroughput(p) => format!("tcp throughput → {}", p.name()),
            Probe::Udp(p) => format!("udp 64 B → {}", p.name()),
            Probe::UdpSendto(p) => format!("udp 64 B sendto → {}", p.name()),
            Probe::Connect(p) => format!("connect rate → {}", p.name()),
            Probe::Incoming(p) => format!("incoming connect rate ← {}", p.name()),
            Probe::Handshake => "connect rate → identity peer".into(),
            // Short: the progress lines' column is 30 wide.
            Probe::Request(Route::Direct) => "requests direct → ACL peer".into(),
            Probe::Request(Route::Proxy) => "requests via proxy → service".into(),
        }
    }
}

/// A control-plane operation, timed from SIGHUP to the reload applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOp {
    /// One more PU (then removed again, timed as [`Metric::DeletePu`]).
    AddPu,
    /// A change to the last PU's ACLs.
    UpdatePu,
    /// One more target network (then removed again; both timed).
    TargetChange,
}

impl ControlOp {
    /// Reloads one repetition takes.
    pub fn reloads(self) -> usize {
        match self {
            ControlOp::AddPu | ControlOp::TargetChange => 2,
            ControlOp::UpdatePu => 1,
        }
    }
}

/// A measured quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    TcpThroughput(Peer),
    /// Datagrams the peer received, per second of sending.
    UdpDelivered(Peer),
    /// Datagrams the client's `send` accepted, per second.
    UdpSent(Peer),
    /// Datagrams delivered from an unconnected socket, per second.
    UdpSendtoDelivered(Peer),
    ConnRate(Peer),
    ConnP50(Peer),
    ConnP99(Peer),
    /// New TCP connections from the peer to the PU's listening port.
    InConnRate(Peer),
    InConnP50(Peer),
    InConnP99(Peer),
    /// Connections to the target peer the client completed during one
    /// probe whose SYN the kernel never queued to the agent: they went
    /// past the trap.
    PastTrap,
    /// New TCP connections through both hosts' identity handshake.
    HsConnRate,
    HsConnP50,
    HsConnP99,
    /// Handshakes the two agents refused during one probe (their
    /// `status` counters of refusals, summed).
    HsRefused,
    /// Connections the client completed during one probe that host A's
    /// agent never verified: they went past the handshake.
    HsBypassed,
    /// Requests (new connection, request, echo, close) by route.
    ReqRate(Route),
    ReqP50(Route),
    ReqP99(Route),
    /// Agent start to "enforcer ready" (every PU configured).
    Startup,
    /// SIGTERM to exit (everything removed).
    Shutdown,
    /// A `status` request's round trip, once the agent is ready.
    Status,
    AddPu,
    DeletePu,
    UpdatePu,
    TargetChange,
    /// Agent resident memory after the probes.
    Rss,
    /// eBPF: memlock of the agent's maps; iptables: ipset's "Size in
    /// memory" of every set.
    KernelMemory,
    /// `-A` lines in iptables-save and ip6tables-save of every table.
    Rules,
    /// File descriptors the agent holds open.
    OpenFiles,
}

impl Metric {
    pub fn name(self) -> String {
        match self {
            Metric::TcpThroughput(p) => format!("TCP throughput → {}", p.name()),
            Metric::UdpDelivered(p) => format!("UDP 64 B delivered → {}", p.name()),
            Metric::UdpSent(p) => format!("UDP 64 B sent → {}", p.name()),
            Metric::UdpSendtoDelivered(p) => {
                format!("UDP 64 B unconnected (sendto) delivered → {}", p.name())
            }
            Metric::ConnRate(p) => format!("new TCP connections → {}", p.name()),
            Metric::ConnP50(p) => format!("connect latency p50 → {}", p.name()),
            Metric::ConnP99(p) => format!("connect latency p99 → {}", p.name()),
            Metric::InConnRate(p) => format!("new incoming TCP connections ← {}", p.name()),
            Metric::InConnP50(p) => format!("incoming connect latency p50 ← {}", p.name()),
            Metric::InConnP99(p) => format!("incoming connect latency p99 ← {}", p.name()),
            Metric::PastTrap => "connections past the trap per probe → target peer".into(),
            Metric::HsConnRate => "new TCP connections through the identity handshake".into(),
            Metric::HsConnP50 => "identity handshake connect latency p50".into(),
            Metric::HsConnP99 => "identity handshake connect latency p99".into(),
            Metric::HsRefused => "handshakes refused per probe (both agents)".into(),
            Metric::HsBypassed => "connections past the handshake per probe".into(),
            Metric::ReqRate(r) => format!("requests {}", r.name()),
            Metric::ReqP50(r) => format!("request latency p50 {}", r.name()),
            Metric::ReqP99(r) => format!("request latency p99 {}", r.name()),
            Metric::Startup => "start-up to ready".into(),
            Metric::Shutdown => "shutdown (cleanup)".into(),
            Metric::Status => "status request".into(),
            Metric::AddPu => "configure one more PU (SIGHUP)".into(),
            Metric::DeletePu => "delete that PU (SIGHUP)".into(),
            Metric::UpdatePu => "update the last PU (SIGHUP)".into(),
            Metric::TargetChange => "one target network change (SIGHUP)".into(),
            Metric::Rss => "agent resident memory".into(),
            Metric::KernelMemory => "kernel memory of maps / sets".into(),
            Metric::Rules => "netfilter rules".into(),
            Metric::OpenFiles => "agent open file descriptors".into(),
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Metric::TcpThroughput(_) => Unit::BitsPerSecond,
            Metric::UdpDelivered(_) | Metric::UdpSent(_) | Metric::UdpSendtoDelivered(_) => {
                Unit::PacketsPerSecond
            }
            Metric::ConnRate(_)
            | Metric::InConnRate(_)
            | Metric::HsConnRate
            | Metric::ReqRate(_) => Unit::ConnectionsPerSecond,
            Metric::Rss | Metric::KernelMemory => Unit::Bytes,
            Metric::Rules
            | Metric::OpenFiles
            | Metric::PastTrap
            | Metric::HsRefused
            | Metric::HsBypassed => Unit::Count,
            _ => Unit::Seconds,
        }
    }

    /// Rates are better high; times, memory and rule counts low.
    pub fn higher_is_better(self) -> bool {
        matches!(
            self.unit(),
            Unit::BitsPerSecond | Unit::PacketsPerSecond | Unit::ConnectionsPerSecond
        )
    }

    /// A count of connections that failed or went past the agent: not a
    /// cost, no datapath is ahead by it.
    pub fn counts_failures(self) -> bool {
        matches!(
            self,
            Metric::PastTrap | Metric::HsRefused | Metric::HsBypassed
        )
    }

    /// The same figure through the trap without the identity handshake
    /// (the base setup's, to the target peer): what a handshake figure is
    /// compared with, under each mode and the bare kernel.
    pub fn without_identity(self) -> Option<Metric> {
        match self {
            Metric::HsConnRate => Some(Metric::ConnRate(Peer::Target)),
            Metric::HsConnP50 => Some(Metric::ConnP50(Peer::Target)),
            Metric::HsConnP99 => Some(Metric::ConnP99(Peer::Target)),
            _ => None,
        }
    }
}

/// One policy scale, run under each of `modes` in turn.
#[derive(Debug, Clone)]
pub struct Setup {
    pub part: Part,
    pub scale: Scale,
    pub modes: Vec<Mode>,
    pub probes: Vec<Probe>,
    pub control: Vec<ControlOp>,
    /// Read RSS, kernel memory and rules once the probes are done.
    pub footprint: bool,
    /// Two hosts, two agents with `[identity]`: the peer namespace runs
    /// an agent too, for a PU holding the server ([`super::handshake`]).
    /// Its agents' start-up and shutdown are not the scale's figures.
    pub identity: bool,
    /// The PU with a proxy port and a dependent service, the test proxy
    /// beside it ([`super::proxy`]); its agent's start-up and shutdown
    /// are not the scale's figures either.
    pub proxy: bool,
}

impl Setup {
    /// Whether running this setup under `mode` yields `metric`.
    pub fn yields(&self, mode: Mode, metric: Metric) -> bool {
        let agent = mode != Mode::Bare;
        let op = |op| agent && self.control.contains(&op);
        let hs = |probe| agent && self.probes.contains(&probe);
        let probe = |probe| self.probes.contains(&probe);
        match metric {
            Metric::TcpThroughput(p) => probe(Probe::TcpThroughput(p)),
            Metric::UdpDelivered(p) | Metric::UdpSent(p) => probe(Probe::Udp(p)),
            Metric::UdpSendtoDelivered(p) => probe(Probe::UdpSendto(p)),
            Metric::ConnRate(p) | Metric::ConnP50(p) | Metric::ConnP99(p) => {
                probe(Probe::Connect(p))
            }
            Metric::InConnRate(p) | Metric::InConnP50(p) | Metric::InConnP99(p) => {
                probe(Probe::Incoming(p))
            }
            Metric::PastTrap => agent && probe(Probe::Connect(Peer::Target)),
            Metric::HsConnRate
            | Metric::HsConnP50
            | Metric::HsConnP99
            | Metric::HsRefused
            | Metric::HsBypassed => hs(Probe::Handshake),
            Metric::ReqRate(r) | Metric::ReqP50(r) | Metric::ReqP99(r) => probe(Probe::Request(r)),
            Metric::Startup | Metric::Shutdown | Metric::Status => {
                agent && !self.identity && !self.proxy
            }
            Metric::AddPu | Metric::DeletePu => op(ControlOp::AddPu),
            Metric::UpdatePu => op(ControlOp::UpdatePu),
            Metric::TargetChange => op(ControlOp::TargetChange),
            Metric::Rss | Metric::KernelMemory | Metric::Rules | Metric::OpenFiles => {
                agent && self.footprint
            }
        }
    }

    /// Progress steps of one mode: start (each agent), probe runs,
    /// reloads, footprint, stop (each agent).
    pub fn steps(&self, mode: Mode, reps: usize) -> usize {
        let agent = usize::from(mode != Mode::Bare);
        let agents = 1 + usize::from(self.identity);
        let probes = self.probes.len() * reps;
        let control: usize = self.control.iter().map(|op| op.reloads() * reps).sum();
        let footprint = usize::from(self.footprint);
        probes + agent * (2 * agents + control + footprint)
    }
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub setups: Vec<Setup>,
    /// Repetitions of each probe and reload.
    pub reps: usize,
    /// How long each probe runs.
    pub probe_time: Duration,
    /// How long an agent may take to start before the setup is reported
    /// as not measurable at that scale.
    pub start_budget: Duration,
}

/// The probes of scenarios 1 and 3, out of the PU and into it.
const BASE_PROBES: [Probe; 10] = [
    Probe::TcpThroughput(Peer::Acl),
    Probe::TcpThroughput(Peer::Target),
    Probe::Udp(Peer::Acl),
    Probe::Udp(Peer::Target),
    Probe::UdpSendto(Peer::Acl),
    Probe::UdpSendto(Peer::Target),
    Probe::Connect(Peer::Target),
    Probe::Connect(Peer::Acl),
    Probe::Incoming(Peer::Target),
    Probe::Incoming(Peer::Acl),
];

/// Scenario 1 and 3 for the last PU at scale: established TCP, small UDP
/// after the trap, and new connections through the trap and through the
/// ACLs.
const SCALE_PROBES: [Probe; 4] = [
    Probe::TcpThroughput(Peer::Acl),
    Probe::Udp(Peer::Target),
    Probe::Connect(Peer::Target),
    Probe::Connect(Peer::Acl),
];

impl Plan {
    pub fn new(quick: bool, only: &[Part]) -> Self {
        let (pus, acls, targets, footprint_pus): (&[usize], &[usize], &[usize], usize) = if quick {
            (&[100], &[1000], &[10_000], 1000)
        } else {
            (
                &[10, 100, 1000],
                &[10, 1000, 10_000],
                &[10, 1000, 10_000],
                10_000,
            )
        };
        let datapaths = Mode::DATAPATHS.to_vec();
        let scaled = |part, scale, control: Vec<ControlOp>| Setup {
            part,
            scale,
            modes: datapaths.clone(),
            probes: SCALE_PROBES.to_vec(),
            control,
            footprint: true,
            identity: false,
            proxy: false,
        };
        let mut setups = vec![Setup {
            part: Part::Base,
            scale: Scale::BASE,
            modes: Mode::ALL.to_vec(),
            probes: BASE_PROBES.to_vec(),
            control: vec![
                ControlOp::AddPu,
                ControlOp::UpdatePu,
                ControlOp::TargetChange,
            ],
            footprint: true,
            identity: false,
            proxy: false,
        }];
        // Right after the base: its trap figures are what the handshake's
        // are compared with.
        setups.push(Setup {
            part: Part::Handshake,
            scale: Scale::BASE,
            modes: datapaths.clone(),
            probes: vec![Probe::Handshake],
            control: Vec::new(),
            footprint: false,
            identity: true,
            proxy: false,
        });
        // Every mode: the bare kernel's direct requests are the reference,
        // and its proxy reached by address is the proxy's own cost.
        setups.push(Setup {
            part: Part::Proxy,
            scale: Scale::BASE,
            modes: Mode::ALL.to_vec(),
            probes: vec![Probe::Request(Route::Direct), Probe::Request(Route::Proxy)],
            control: Vec::new(),
            footprint: false,
            identity: false,
            proxy: true,
        });
        let base = Scale::BASE;
        for &n in pus {
            let scale = Scale { pus: n, ..base };
            setups.push(scaled(
                Part::Pus,
                scale,
                vec![ControlOp::AddPu, ControlOp::UpdatePu],
            ));
        }
        for &n in acls {
            let scale = Scale { acls: n, ..base };
            setups.push(scaled(Part::Acls, scale, vec![ControlOp::UpdatePu]));
        }
        for &n in targets {
            let scale = Scale { targets: n, ..base };
            setups.push(scaled(Part::Targets, scale, vec![ControlOp::TargetChange]));
        }
        setups.push(Setup {
            part: Part::Footprint,
            scale: Scale {
                pus: footprint_pus,
                ..base
            },
            modes: datapaths,
            probes: Vec::new(),
            control: Vec::new(),
            footprint: true,
            identity: false,
            proxy: false,
        });
        setups.retain(|s| only.is_empty() || only.contains(&s.part));
        Self {
            quick,
            setups,
            reps: if quick { 3 } else { 5 },
            probe_time: Duration::from_secs_f64(if quick { 1.0 } else { 2.0 }),
            start_budget: Duration::from_secs(if quick { 90 } else { 300 }),
        }
    }

    /// Whether the run measures `metric` at `scale` under `mode`.
    pub fn yields(&self, scale: Scale, mode: Mode, metric: Metric) -> bool {
        self.setups
            .iter()
            .any(|s| s.scale == scale && s.modes.contains(&mode) && s.yields(mode, metric))
    }

    /// Progress steps of the whole run.
    pub fn steps(&self) -> usize {
        self.setups
            .iter()
            .flat_map(|s| s.modes.iter().map(move |&m| s.steps(m, self.reps)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_plan_is_a_subset_with_fewer_repetitions() {
        let quick = Plan::new(true, &[]);
        let full = Plan::new(false, &[]);
        assert!(quick.reps >= 3 && full.reps >= 5);
        assert!(quick.steps() < full.steps());
        assert_eq!(full.setups[0].scale, Scale::BASE);
        assert_eq!(full.setups[0].modes, Mode::ALL);
        let biggest = full.setups.iter().map(|s| s.scale.pus).max();
        assert_eq!(biggest, Some(10_000));
    }

    #[test]
    fn only_selects_parts_and_steps_count_every_line() {
        let plan = Plan::new(true, &[Part::Base]);
        assert_eq!(plan.setups.len(), 1);
        // bare: 10 probes × 3; each datapath: start, 30 probe runs,
        // (2 + 1 + 2) reloads × 3, footprint, stop.
        assert_eq!(plan.steps(), 30 + 2 * (2 + 30 + 15 + 1));
    }

    #[test]
    fn the_handshake_setup_runs_two_agents_per_datapath_after_the_base() {
        let full = Plan::new(false, &[]);
        assert_eq!(full.setups[1].part, Part::Handshake);
        let plan = Plan::new(true, &[Part::Handshake]);
        let [setup] = plan.setups.as_slice() else {
            panic!("one setup: {:?}", plan.setups);
        };
        assert!(setup.identity && setup.modes == Mode::DATAPATHS);
        // Each datapath: two agents started, 3 probe runs, two stopped.
        assert_eq!(plan.steps(), 2 * (2 + 3 + 2));
        // Its agents' start-up is not the base scale's.
        assert!(!setup.yields(Mode::Ebpf, Metric::Startup));
        assert!(setup.yields(Mode::Ebpf, Metric::HsRefused));
        assert!(!setup.yields(Mode::Bare, Metric::HsConnRate));
    }

    #[test]
    fn the_proxy_setup_runs_every_mode_and_keeps_the_base_start_up() {
        let full = Plan::new(false, &[]);
        assert!(full.setups.iter().any(|s| s.part == Part::Proxy));
        let plan = Plan::new(true, &[Part::Proxy]);
        let [setup] = plan.setups.as_slice() else {
            panic!("one setup: {:?}", plan.setups);
        };
        assert!(setup.proxy && setup.modes == Mode::ALL && setup.scale == Scale::BASE);
        // bare: 2 probes × 3; each datapath: start, 6 probe runs, stop.
        assert_eq!(plan.steps(), 6 + 2 * (1 + 6 + 1));
        for route in [Route::Direct, Route::Proxy] {
            assert!(setup.yields(Mode::Bare, Metric::ReqRate(route)));
            assert!(setup.yields(Mode::Ebpf, Metric::ReqP99(route)));
        }
        // Its agents' start-up is not the base scale's.
        assert!(!setup.yields(Mode::Iptables, Metric::Startup));
        assert!(!setup.yields(Mode::Ebpf, Metric::Rss));
    }
}
