//! Two "hosts" that each run an agent: the identity handshake's world
//! (`tests/tests/handshake.rs`).
//!
//! Host `a` (`10.1.0.1` / `fd00:1::1`) holds the client PUs `web`
//! (`app=web`) and `batch` (`app=batch`); host `b` (`10.1.0.2` /
//! `fd00:1::2`) holds the server PU `db` (`app=db`), a TCP echo server
//! running inside its cgroup on [`PORT`]. Each PU is a cgroup of the
//! test's own. Each agent has its own key pair (made with the agent's
//! `keygen` code) and trusts the other's public key; a third pair,
//! `stranger`, is trusted by no one. Each host is the other's target
//! network, so connection set-up between them goes through the trap.
//!
//! Also here: [`Capture`], the frames a veth end sees (an `AF_PACKET`
//! socket, before netfilter), to take a real SYN off the wire and to see
//! whether an answer came; and [`syn_with_token`], which re-addresses a
//! captured SYN and attaches another token, for the raw-socket replays.
//!
//! The benchmark's handshake scenario (`bench::handshake`) builds its two
//! agents' configs from the same pieces: [`KeyPairs`], [`identity_host`],
//! [`client_pu`] and [`server_pu`].

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use enforcer::identity::wire;
use socket2::{Domain, Socket, Type};

use crate::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Config, Pu},
    netfilter::{self, Family},
    netns::{Netns, TwoHosts},
    privilege,
    traffic::{Outcome, run_nettool},
    unique_name,
};

/// The server PU's port.
pub const PORT: u16 = 7000;

/// The veth network both hosts are on: each is the other's target.
pub const LINK: [&str; 2] = ["10.1.0.0/24", "fd00:1::/64"];

/// Key pairs in a directory of the test's own: `<name>.key` (mode 0600)
/// and `<name>.key.pub`.
pub struct KeyPairs {
    dir: PathBuf,
}

impl KeyPairs {
    /// A pair for each of `names`, in the system's temporary directory.
    pub fn new(names: &[&str]) -> Result<Self> {
        Self::new_in(&std::env::temp_dir(), names)
    }

    /// A pair for each of `names`, in a new directory under `parent`
    /// (the benchmark's private one, removed with it).
    pub fn new_in(parent: &Path, names: &[&str]) -> Result<Self> {
        let dir = parent.join(unique_name());
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pairs = Self { dir };
        for name in names {
            enforcer::identity::keys::generate_files(&pairs.key(name))?;
        }
        Ok(pairs)
    }

    /// The private key of `name`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// The public key of `name`.
    pub fn public(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key.pub"))
    }
}

impl Drop for KeyPairs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `nettool tcp-echo-server` inside a cgroup and a namespace: a PU's
/// server. Stopped (stdin closed, then killed) when dropped.
pub struct PuServer {
    child: Child,
    accepted: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl PuServer {
    pub fn start(nettool: &str, cgroup: &Cgroup, ns: &Netns, at: SocketAddr) -> Result<Self> {
        let mut cmd = cgroup.command_in(ns, nettool)?;
        cmd.args(["tcp-echo-server", &at.to_string(), "--report-accepted"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().context("starting nettool tcp-echo-server")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        if first.trim() != "listening" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the PU's server on {at} did not start: {first:?}");
        }
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let seen = accepted.clone();
        let reader = std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(peer) = line.strip_prefix("accepted ") {
                    seen.lock().expect("server lines").push(peer.to_owned());
                }
            }
        });
        Ok(Self {
            child,
            accepted,
            reader: Some(reader),
        })
    }

    /// Connections the server accepted so far (their peers).
    pub fn accepted(&self) -> Vec<String> {
        self.accepted.lock().expect("server lines").clone()
    }

    /// How many connections the server accepted, once it reports at least
    /// `n` (its lines are read by a thread) or a second passed.
    pub fn wait_accepted(&self, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let seen = self.accepted().len();
            if seen >= n || Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PuServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Which host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    A,
    B,
}

/// The world.
pub struct TwoAgents {
    pub family: Family,
    pub keys: KeyPairs,
    /// The flow log of each host's agent.
    pub flows: [PathBuf; 2],
    pub server: PuServer,
    /// Connections the server accepted before any agent ran.
    warm_ups: usize,
    pub web: Cgroup,
    pub batch: Cgroup,
    pub db: Cgroup,
    // Declared last: dropped after the processes in them.
    pub hosts: TwoHosts,
}

impl TwoAgents {
    /// Hosts, keys, cgroups, and the `db` server running on `b`.
    pub fn new(env: &privilege::Env, family: Family, nettool: &str) -> Result<Self> {
        let hosts = TwoHosts::new()?;
        let keys = KeyPairs::new(&["a", "b", "stranger"])?;
        let (web, batch, db) = (
            Cgroup::new(&env.cgroup2)?,
            Cgroup::new(&env.cgroup2)?,
            Cgroup::new(&env.cgroup2)?,
        );
        let at = SocketAddr::new(hosts.b_end.ip(family), PORT);
        let server = PuServer::start(nettool, &db, &hosts.b, at)?;
        // One exchange before any agent runs: the neighbour entries exist
        // (IPv6's first solicitation on a fresh link can take a second or
        // two, which a test would see as a retransmitted SYN) and the
        // server answers. A fresh link gets a few tries.
        let mut warm_up = Outcome::TimedOut;
        for _ in 0..4 {
            warm_up = hosts
                .a
                .run(move || crate::traffic::tcp_exchange(at, b"warm-up"))?;
            if warm_up == Outcome::Exchanged {
                break;
            }
        }
        ensure!(
            warm_up == Outcome::Exchanged,
            "the server at {at} before any agent: {warm_up:?}"
        );
        let warm_ups = server.wait_accepted(1);
        let flows = [Host::A, Host::B].map(|_| std::env::temp_dir().join(unique_name()));
        Ok(Self {
            family,
            keys,
            flows,
            server,
            warm_ups,
            web,
            batch,
            db,
            hosts,
        })
    }

    /// Connections the `db` server accepted since the agents could run,
    /// once it reports at least `n` or a second passed.
    pub fn accepted(&self, n: usize) -> usize {
        self.server.wait_accepted(self.warm_ups + n) - self.warm_ups
    }

    pub fn ns(&self, host: Host) -> &Netns {
        match host {
            Host::A => &self.hosts.a,
            Host::B => &self.hosts.b,
        }
    }

    /// The `db` server's address.
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(self.hosts.b_end.ip(self.family), PORT)
    }

    /// Host `a`'s agent config, signing with the key pair `key`: `web`
    /// and `batch`, each allowed to reach `app=db` on [`PORT`].
    pub fn config_a(&self, key: &str) -> Config {
        let client =
            |id: &str, cgroup: &Cgroup| client_pu(Pu::process_of(id, cgroup), id, "db", PORT);
        identity_host(&self.keys, key, "b", LINK)
            .flow_log_file(&self.flows[0])
            .pu(client("web", &self.web))
            .pu(client("batch", &self.batch))
    }

    /// Host `b`'s agent config: `db` on [`PORT`], reachable by `app=web`.
    pub fn config_b(&self) -> Config {
        self.config_b_with(self.db_pu())
    }

    /// Host `b`'s agent config with `db` as given.
    pub fn config_b_with(&self, db: Pu) -> Config {
        identity_host(&self.keys, "b", "a", LINK)
            .flow_log_file(&self.flows[1])
            .pu(db)
    }

    /// The `db` PU as [`Self::config_b`] has it.
    pub fn db_pu(&self) -> Pu {
        server_pu(Pu::process_of("db", &self.db), "db", "web", PORT)
    }

    /// Starts an agent on `host` with `config`.
    pub fn start(&self, host: Host, bin: &str, datapath: Datapath, config: &str) -> Result<Agent> {
        let agent = Agent::start(bin, self.ns(host), datapath, config)?;
        let kind = agent.status()?["datapath"]["kind"].clone();
        ensure!(kind == datapath.expected(), "datapath in use: {kind}");
        Ok(agent)
    }

    /// A TCP exchange with the `db` server from a process in `cgroup` on
    /// host `a`, sending `payload`.
    pub fn connect(&self, nettool: &str, cgroup: &Cgroup, payload: &str) -> Result<Outcome> {
        let mut cmd = cgroup.command_in(&self.hosts.a, nettool)?;
        cmd.args([
            "tcp-exchange",
            &self.server_addr().to_string(),
            "--payload",
            payload,
        ]);
        run_nettool(cmd)
    }

    /// Packets the kernel ever queued to user space on `host`.
    pub fn queued(&self, host: Host) -> Result<u64> {
        Ok(netfilter::queue_stats(self.ns(host))?
            .iter()
            .map(|q| u64::from(q.id_sequence))
            .sum())
    }

    /// Packets the kernel ever queued on `host`, by queue range
    /// (`app-syn`, `net-synack`, …; the default layout), ranges with none
    /// left out.
    pub fn queued_by_range(&self, host: Host) -> Result<Vec<(&'static str, u64)>> {
        let stats = netfilter::queue_stats(self.ns(host))?;
        let ranges = enforcer::datapath::queues::ranges(&Default::default());
        Ok(ranges
            .into_iter()
            .map(|range| {
                let queued = stats
                    .iter()
                    .filter(|q| range.queues().contains(&q.queue))
                    .map(|q| u64::from(q.id_sequence))
                    .sum();
                (range.name, queued)
            })
            .filter(|&(_, queued)| queued > 0)
            .collect())
    }

    /// The flow log lines of `host`'s agent so far.
    pub fn flow_lines(&self, host: Host) -> Vec<serde_json::Value> {
        let path = &self.flows[host as usize];
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Sends a whole IP packet from host `a` through a raw socket.
    pub fn send_raw_from_a(&self, packet: &[u8]) -> Result<()> {
        self.send_raw(Host::A, packet)
    }

    /// Sends a whole IP packet from `host` to the other host through a
    /// raw socket.
    pub fn send_raw(&self, from: Host, packet: &[u8]) -> Result<()> {
        let dst = match from {
            Host::A => self.server_addr().ip(),
            Host::B => self.hosts.a_end.ip(self.family),
        };
        let packet = packet.to_vec();
        self.ns(from)
            .run(move || crate::traffic::send_raw_ip(dst, &packet))?
    }
}

impl Drop for TwoAgents {
    fn drop(&mut self) {
        for path in &self.flows {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The agent config of one host of a handshake world (this suite's, and
/// the benchmark's): local-server, `links` as target TCP networks (each
/// host the other's), `[identity]` signing with the pair `own` of `keys`
/// and trusting the public key of `trusts`.
pub fn identity_host<S: Into<String>>(
    keys: &KeyPairs,
    own: &str,
    trusts: &str,
    links: impl IntoIterator<Item = S>,
) -> Config {
    Config::local_server()
        .target_tcp(links)
        .identity(&keys.key(own), [keys.public(trusts)])
}

/// A client PU of a handshake world: `pu` labelled `app=<app>`, its
/// application policy `to-<server>` letting it reach `app=<server>` on
/// `port`.
pub fn client_pu(pu: Pu, app: &str, server: &str, port: u16) -> Pu {
    pu.label("app", app).application_policy(
        &format!("to-{server}"),
        &[&format!("app={server}")],
        [port],
    )
}

/// A server PU of a handshake world: `pu` labelled `app=<app>`, listening
/// on `port`, its network policy `<client>-in` letting `app=<client>` in
/// there.
pub fn server_pu(pu: Pu, app: &str, client: &str, port: u16) -> Pu {
    pu.label("app", app).tcp_ports([port]).network_policy(
        &format!("{client}-in"),
        &[&format!("app={client}")],
        [port],
    )
}

/// The handshake counters of an agent's `status` (`trap.handshake`).
pub fn handshake_count(agent: &Agent, reason: &str) -> Result<u64> {
    let status = agent.status()?;
    status["trap"]["handshake"][reason]
        .as_u64()
        .with_context(|| format!("status trap.handshake.{reason} in {status:#}"))
}

/// Waits up to `within` for `agent`'s counter of `reason` to reach
/// `count`; returns the last value read.
pub fn wait_for_count(agent: &Agent, reason: &str, count: u64, within: Duration) -> Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        let now = handshake_count(agent, reason)?;
        if now >= count || Instant::now() > deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `packet` (a SYN) from another source port, carrying `token` (its own
/// token, if any, taken out first); lengths and checksums right.
pub fn syn_with_token(packet: &[u8], sport: u16, token: &[u8]) -> Result<Vec<u8>> {
    let mut plain = match wire::take_token(packet)? {
        Some(taken) => taken.stripped,
        None => packet.to_vec(),
    };
    let l4 = l4_offset(&plain)?;
    plain[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
    Ok(wire::attach_token(&plain, token)?)
}

/// Where the transport header of a packet without IPv6 extension headers
/// starts.
fn l4_offset(packet: &[u8]) -> Result<usize> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => Ok(usize::from(packet[0] & 0x0f) * 4),
        Some(6) => Ok(40),
        _ => bail!("not an IP packet"),
    }
}

/// The TCP ports and flags of an IP packet (no IPv6 extension headers).
pub fn tcp_of(packet: &[u8]) -> Option<(u16, u16, u8)> {
    let protocol = match packet.first()? >> 4 {
        4 => *packet.get(9)?,
        6 => *packet.get(6)?,
        _ => return None,
    };
    if protocol != 6 {
        return None;
    }
    let l4 = l4_offset(packet).ok()?;
    let port = |at: usize| Some(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]));
    Some((port(l4)?, port(l4 + 2)?, *packet.get(l4 + 13)?))
}

/// The UDP ports and payload of an IP packet (no IPv6 extension
/// headers).
pub fn udp_of(packet: &[u8]) -> Option<(u16, u16, &[u8])> {
    let protocol = match packet.first()? >> 4 {
        4 => *packet.get(9)?,
        6 => *packet.get(6)?,
        _ => return None,
    };
    if protocol != 17 {
        return None;
    }
    let l4 = l4_offset(packet).ok()?;
    let port = |at: usize| Some(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]));
    Some((port(l4)?, port(l4 + 2)?, packet.get(l4 + 8..)?))
}

/// The IP packets a veth end sees, in both directions, from an
/// `AF_PACKET` socket on it (before netfilter on the way in, after it on
/// the way out). Stops when dropped.
pub struct Capture {
    packets: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl Capture {
    /// Starts capturing on `ifname` in `ns`; returns once the socket is
    /// bound.
    pub fn start(ns: &Netns, ifname: &str) -> Result<Self> {
        let packets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (seen, stopped, ifname) = (packets.clone(), stop.clone(), ifname.to_owned());
        let thread = ns.spawn(move || -> Result<()> {
            let bound = || -> Result<Socket> {
                let all = (libc::ETH_P_ALL as u16).to_be();
                let sock = Socket::new(Domain::PACKET, Type::RAW, Some(i32::from(all).into()))?;
                let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())?;
                // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
                let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = all;
                addr.sll_ifindex = i32::try_from(ifindex)?;
                // SAFETY: the address outlives the call; its length is its own.
                let rc = unsafe {
                    libc::bind(
                        sock.as_raw_fd(),
                        std::ptr::from_ref(&addr).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    bail!("binding to {ifname}: {}", std::io::Error::last_os_error());
                }
                sock.set_read_timeout(Some(Duration::from_millis(10)))?;
                Ok(sock)
            };
            let sock = match bound() {
                Ok(sock) => {
                    let _ = ready_tx.send(Ok(()));
                    sock
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let mut buf = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: reads into a live buffer of its length.
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 14 {
                    continue;
                }
                let frame = &buf[..n as usize];
                if matches!(u16::from_be_bytes([frame[12], frame[13]]), 0x0800 | 0x86dd) {
                    seen.lock().expect("capture").push(frame[14..].to_vec());
                }
            }
            Ok(())
        })?;
        ready_rx.recv().context("capture thread died")??;
        Ok(Self {
            packets,
            stop,
            thread: Some(thread),
        })
    }

    /// Every IP packet seen so far.
    pub fn packets(&self) -> Vec<Vec<u8>> {
        self.packets.lock().expect("capture").clone()
    }

    /// Waits up to `within` for a TCP packet that `pick` accepts (given
    /// its source port, destination port and flags, and the packet).
    pub fn wait_for(
        &self,
        within: Duration,
        pick: impl Fn(u16, u16, u8, &[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + within;
        loop {
            let found = self.packets().into_iter().find(|p| {
                tcp_of(p).is_some_and(|(sport, dport, flags)| pick(sport, dport, flags, p))
            });
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Capture {
    /// Waits up to `within` for a UDP datagram that `pick` accepts (given
    /// its source port, destination port and payload).
    pub fn wait_for_udp(
        &self,
        within: Duration,
        pick: impl Fn(u16, u16, &[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + within;
        loop {
            let found = self.packets().into_iter().find(|p| {
                udp_of(p).is_some_and(|(sport, dport, payload)| pick(sport, dport, payload))
            });
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether the flags are a SYN-ACK's.
pub fn is_syn_ack(flags: u8) -> bool {
    flags & 0x12 == 0x12
}

/// Whether the flags are a SYN's (no ACK).
pub fn is_syn(flags: u8) -> bool {
    flags & 0x12 == 0x02
}
