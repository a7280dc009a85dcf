//! Fail-open and fail-closed (SPEC, "The trap"), on both datapaths and
//! both families, with real traffic and the kernel's own NFQUEUE counters.
//!
//! The trap can fail in two ways, and the `[queues] fail_mode` setting
//! decides both at once:
//! - *a queue is full* — the agent is alive, its queues bound, but it does
//!   not read (here: SIGSTOP). Failing open (`NFQA_CFG_F_FAIL_OPEN` on the
//!   bound queue) the packets past the queue's length pass without a
//!   verdict; failing closed they are dropped, and the kernel counts them
//!   (`queue_dropped`).
//! - *no one listens* — the agent is gone but its rules (and, on eBPF, its
//!   pinned programs) stay (here: SIGKILL). Failing open (`--queue-bypass`
//!   on every NFQUEUE rule) a new trapped connection succeeds; failing
//!   closed it cannot be set up.
//!
//! Host `a` runs the agent with one linux-process PU listening on port
//! 8080, and a server there; host `b` (`10.1.0.2` / `fd00:1::2`, a target
//! network) connects to it, so every SYN is trapped on the network side.
//! The layout has one queue per range and room for [`QUEUE_LENGTH`]
//! packets: the network SYN range is queue [`NET_SYN_QUEUE`].

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    netfilter::{self, Family},
    netns::TwoHosts,
    privilege,
    traffic::{Outcome, TcpEchoServer, tcp_exchange_from},
};
use nix::sys::signal::Signal;
use socket2::{Domain, Socket, Type};

const PU_PORT: u16 = 8080;
const QUEUE_LENGTH: u32 = 8;
/// With one queue per range: app SYN, ACK, SYN-ACK, service (0-3), then
/// the network SYN range.
const NET_SYN_QUEUE: u16 = 4;
/// Connection attempts while the agent is frozen: more than a queue holds.
const SYNS: u32 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Closed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Closed => "closed",
        }
    }
}

macro_rules! cases {
    ($datapath:ident $family:ident) => {
        #[test]
        fn fail_open() -> anyhow::Result<()> {
            crate::fail_mode(
                crate::Datapath::$datapath,
                crate::Family::$family,
                crate::Mode::Open,
            )
        }
        #[test]
        fn fail_closed() -> anyhow::Result<()> {
            crate::fail_mode(
                crate::Datapath::$datapath,
                crate::Family::$family,
                crate::Mode::Closed,
            )
        }
    };
}

mod ebpf {
    mod v4 {
        cases!(Ebpf V4);
    }
    mod v6 {
        cases!(Ebpf V6);
    }
}

mod iptables {
    mod v4 {
        cases!(Iptables V4);
    }
    mod v6 {
        cases!(Iptables V6);
    }
}

fn config(cgroup: &str, mode: Mode) -> String {
    format!(
        "mode = \"local-server\"\n\
         [networks]\n\
         target_tcp = [\"10.1.0.0/24\", \"fd00:1::/64\"]\n\
         excluded = [\"10.9.0.0/16\", \"fd00:9::/64\"]\n\
         [queues]\n\
         queues_per_range = 1\n\
         queue_length = {QUEUE_LENGTH}\n\
         fail_mode = \"{}\"\n\
         [[pus]]\n\
         id = \"web\"\n\
         kind = \"linux-process\"\n\
         cgroup = \"{cgroup}\"\n\
         tcp_ports = [{PU_PORT}]\n",
        mode.name()
    )
}

/// SIGSTOP now, SIGCONT when dropped — also when the test fails, so that
/// the agent can then be stopped and clean up. Returns once every thread
/// of the agent is stopped ([`Agent::freeze`]): `kill(2)` alone returns
/// before the trap thread stops, and under load it went on giving
/// verdicts to the SYNs the test sent "while frozen".
struct Frozen<'a>(&'a Agent);

impl<'a> Frozen<'a> {
    fn new(agent: &'a Agent) -> Result<Self> {
        agent.freeze()?;
        Ok(Self(agent))
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.signal(Signal::SIGCONT) {
            eprintln!("SIGCONT to the agent failed: {e:#}");
        }
    }
}

/// `agent cleanup` when dropped: a killed agent leaves its rules and pins
/// (that is the point), and the namespace's teardown does not reach pins.
struct CleanUp<'a>(&'a Agent);

impl Drop for CleanUp<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.cleanup() {
            eprintln!("agent cleanup failed: {e:#}");
        }
    }
}

fn fail_mode(datapath: Datapath, family: Family, mode: Mode) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let hosts = TwoHosts::new()?;
    let server = SocketAddr::new(hosts.a_end.ip(family), PU_PORT);
    let client = hosts.b_end.ip(family);
    // Each phase connects from an address of its own in the target
    // network, so that no SYN reuses the 4-tuple of an earlier, authorised
    // connection (whose conntrack or flow state would let it pass).
    let flood_from = extra_address(&hosts, family, 3)?;
    let probe_from = extra_address(&hosts, family, 4)?;
    let _server = TcpEchoServer::start(&hosts.a, server)?;
    let cgroup = Cgroup::new(&env.cgroup2)?;
    let rel = cgroup
        .path()
        .file_name()
        .context("cgroup dir name")?
        .to_string_lossy()
        .into_owned();
    let mut agent = Agent::start(
        env!("CARGO_BIN_EXE_agent"),
        &hosts.a,
        datapath,
        &config(&rel, mode),
    )?;
    assert_eq!(agent.status()?["datapath"]["kind"], datapath.expected());
    let connect_from = |from: IpAddr| -> Result<Outcome> {
        hosts
            .b
            .run(|| tcp_exchange_from(Some(from), server, b"ping"))
    };
    let connect = || connect_from(client);
    let net_syn = || -> Result<(u32, u32, u32)> {
        let stats = netfilter::queue_stats(&hosts.a)?;
        let q = stats
            .iter()
            .find(|q| q.queue == NET_SYN_QUEUE)
            .with_context(|| format!("queue {NET_SYN_QUEUE} is not bound: {stats:?}"))?;
        Ok((q.waiting, q.queue_dropped, q.id_sequence))
    };

    // The agent up: the SYN is trapped, given its verdict, and the
    // connection proceeds whatever the mode.
    assert_eq!(connect()?, Outcome::Exchanged, "trapped and accepted");
    assert_eq!(net_syn()?, (0, 0, 1), "(waiting, dropped, queued)");

    // (b) A full queue: the agent frozen with its queues bound.
    netfilter::restore(
        &hosts.b,
        family,
        &format!(
            "*filter\n\
             -A INPUT -p tcp --sport {PU_PORT} --tcp-flags SYN,ACK SYN,ACK \
             -m comment --comment synack-seen -j ACCEPT\n\
             COMMIT\n"
        ),
    )?;
    {
        let _frozen = Frozen::new(&agent)?;
        let sockets = hosts
            .b
            .run(|| start_connections(flood_from, server, SYNS))??;
        let excess = SYNS - QUEUE_LENGTH;
        let synacks = || netfilter::packets(&hosts.b, family, "filter", "synack-seen");
        // Until the queue is full and the excess has gone its way (passed,
        // or dropped by the kernel); retransmissions only add to both.
        let mut last = None;
        let settled = wait_until("the SYNs settle", || {
            let (waiting, dropped, _) = net_syn()?;
            let seen = synacks()?;
            last = Some((waiting, dropped, seen));
            Ok(waiting == QUEUE_LENGTH
                && match mode {
                    Mode::Open => seen >= u64::from(excess),
                    Mode::Closed => dropped >= excess,
                })
        });
        let (waiting, dropped, seen) = last.context("no reading")?;
        let got = format!(
            "waiting {waiting}, queue_dropped {dropped}, SYN-ACKs {seen}\n\
             queues: {:?}\nmangle on a:\n{}",
            netfilter::queue_stats(&hosts.a)?,
            netfilter::save(&hosts.a, family, "mangle")?
        );
        assert!(
            settled.is_ok(),
            "{mode:?}: {SYNS} SYNs, queue of {QUEUE_LENGTH}: {got}"
        );
        assert_eq!(waiting, QUEUE_LENGTH, "the queue is full: {got}");
        match mode {
            // The excess SYNs past the full queue reached the server.
            Mode::Open => assert_eq!(dropped, 0, "failing open, nothing is dropped: {got}"),
            // The kernel dropped the excess, and none reached the server.
            Mode::Closed => assert_eq!(seen, 0, "failing closed, no SYN passes: {got}"),
        }
        drop(sockets);
    }
    // Thawed, the agent gives the waiting packets their verdicts.
    wait_until("the queue drains after SIGCONT", || Ok(net_syn()?.0 == 0))?;
    assert_eq!(connect()?, Outcome::Exchanged, "the agent serves again");
    // Every packet it read got a verdict the kernel took (the backlog as
    // batch verdicts: one message per run of a queue).
    let status = agent.status()?;
    let trap = &status["trap"];
    assert_eq!(trap["verdicts"], trap["received"], "{trap:#}");
    assert_eq!(trap["verdict_errors"], 0, "{trap:#}");

    // (a) No listener: the agent killed, its rules (and pins) left.
    agent.stop_with(Signal::SIGKILL)?;
    let _clean_up = CleanUp(&agent);
    let stats = netfilter::queue_stats(&hosts.a)?;
    assert!(
        stats.iter().all(|q| q.queue != NET_SYN_QUEUE),
        "nothing listens on the queue any more: {stats:?}"
    );
    let outcome = connect_from(probe_from)?;
    match mode {
        Mode::Open => assert_eq!(
            outcome,
            Outcome::Exchanged,
            "failing open, a new trapped connection passes without the agent"
        ),
        Mode::Closed => assert!(
            outcome.is_blocked(),
            "failing closed, a new trapped connection fails without the agent: {outcome:?}"
        ),
    }
    Ok(())
}

/// Adds `10.1.0.<host>` / `fd00:1::<host>` to `b`'s end of the veth (in
/// the target network, on `a`'s link).
fn extra_address(hosts: &TwoHosts, family: Family, host: u8) -> Result<IpAddr> {
    let (addr, plen) = match family {
        Family::V4 => (format!("10.1.0.{host}"), 32),
        Family::V6 => (format!("fd00:1::{host}"), 128),
    };
    hosts.b.ip(&[
        "addr",
        "add",
        &format!("{addr}/{plen}"),
        "dev",
        &hosts.b_end.ifname,
        "nodad",
    ])?;
    Ok(addr.parse()?)
}

/// `count` non-blocking connects from `from` to `to`, left in progress:
/// the sockets are returned so that their SYNs are not withdrawn (by a
/// RST on close) before the test has looked.
fn start_connections(from: std::net::IpAddr, to: SocketAddr, count: u32) -> Result<Vec<Socket>> {
    let domain = Domain::for_address(to);
    (0..count)
        .map(|_| {
            let socket = Socket::new(domain, Type::STREAM, None)?;
            socket.set_nonblocking(true)?;
            socket.bind(&SocketAddr::new(from, 0).into())?;
            match socket.connect(&to.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e).context("starting a connection"),
            }
            Ok(socket)
        })
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
