//! Proxy and DNS-proxy redirection (issue 6), the shared suite: what a
//! PU, its peers and a proxy written for iptables `REDIRECT` observe, on
//! both datapaths and families.
//!
//! The world: host `a` runs the agent (`local-server`) with the
//! linux-process PU `web` (a test cgroup) and the harness's test proxy
//! ([`TestProxy`]: a thread in `a`, outside every PU, learning each
//! connection's original destination with `getsockopt(SO_ORIGINAL_DST)`
//! and forwarding it with the proxy mark) on `web`'s proxy port; host `b`
//! holds the peers of `tests/src/world.rs`. The proxy's listening socket
//! belongs to the agent's host scope (a test cgroup), where the eBPF
//! datapath answers `SO_ORIGINAL_DST` for redirected connections.
//!
//! Dependent services and the DNS proxy: `web` depends on [`OTHER`]'s
//! service (port 7000) — a peer no ACL of its accepts, so only the proxy
//! can complete the request — and has a DNS proxy port ([`proxied`]).
//!
//! Exposed services: `web` has only what they need ([`exposing`]): an
//! exposed port, which nothing accepts from host `b` but the proxy, beside
//! a port its network ACL accepts. One case uses a proxy that closes
//! first ([`ClosingProxy`]), to leave a TIME_WAIT on its side that a
//! reconnecting peer's tuple reuses.
//!
//! Also here: in eBPF mode proxies add no netfilter rule
//! ([`netfilter_rules_do_not_grow_with_proxied_pus`]). What a request
//! through the proxy costs is measured by `cargo xtask bench --only proxy`.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::{self, Family},
    netns::{Netns, output_ok},
    nettool, privilege,
    proxy::{DnsProxy, TestProxy, connect_marked, listener_in, original_dst, proxy_mark, wildcard},
    traffic::{Outcome, PuEchoServer, TcpEchoServer, Transport, run_nettool},
    world::{ACL_PEER, EXCLUDED, OTHER, PORT, Peer, PuWorld, TARGET},
};

enforcer_tests::on_both_datapaths_and_families!(
    a_dependent_service_connection_lands_on_the_proxy_and_is_not_redirected_again,
    a_dns_query_reaches_the_dns_proxy_and_its_answer_gets_back,
    a_pu_without_proxy_configuration_is_unaffected,
    an_update_gives_and_takes_the_proxy,
    a_dependent_service_in_the_excluded_networks_is_not_redirected,
    an_exposed_service_connection_lands_on_the_proxy,
    exposed_services_follow_an_update,
    a_connection_reusing_a_time_wait_tuple_lands_on_the_proxy,
);

const PROXY_PORT: u16 = 15001;
const DNS_PROXY_PORT: u16 = 15053;
const EXPOSED: u16 = 8443;
/// A port [`exposing`] listens on and does not expose.
const NOT_EXPOSED: u16 = 8080;

/// The world of one family: peers on `b` with an echo server each, the
/// test proxy in `a`, listening from the agent's host scope.
struct World {
    world: PuWorld,
    _servers: Vec<TcpEchoServer>,
    proxy: TestProxy,
    scope: Cgroup,
}

impl World {
    fn new(env: &privilege::Env, family: Family) -> Result<Self> {
        let roles = [TARGET, ACL_PEER, OTHER, EXCLUDED];
        let world = PuWorld::new(env, family, &roles)?;
        let servers = roles
            .map(|role| TcpEchoServer::start(&world.hosts.b, world.addr(role)))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let scope = Cgroup::new(&env.cgroup2)?;
        let proxy = TestProxy::start(
            nettool!(),
            &scope,
            &world.hosts.a,
            family,
            PROXY_PORT,
            proxy_mark(),
        )?;
        Ok(Self {
            world,
            _servers: servers,
            proxy,
            scope,
        })
    }

    /// [`World::new`], or `None` where privileged tests are skipped on
    /// purpose ([`privilege::require_then`]).
    fn require(family: Family) -> Result<Option<Self>> {
        privilege::require_then(|env| Self::new(env, family))
    }

    /// The agent on `datapath` with `pus` ([`config`]).
    fn start(&self, datapath: Datapath, pus: &[Pu]) -> Result<Agent> {
        self.start_config(datapath, &config(&self.scope, pus))
    }

    fn start_config(&self, datapath: Datapath, config: &str) -> Result<Agent> {
        self.world
            .start(env!("CARGO_BIN_EXE_agent"), datapath, config)
    }

    /// A TCP exchange with `to` from a process in `cgroup`, or from one of
    /// host `a` outside every PU.
    fn exchange(&self, cgroup: Option<&Cgroup>, to: SocketAddr) -> Result<Outcome> {
        let mut cmd = match cgroup {
            Some(cgroup) => cgroup.command_in(&self.world.hosts.a, nettool!())?,
            None => self.world.hosts.a.command(nettool!())?,
        };
        cmd.args(["tcp-exchange", &to.to_string()]);
        run_nettool(cmd)
    }
}

/// `web` for the dependent-service cases: the proxy port, [`OTHER`]'s
/// service as a dependent service, the DNS proxy port; an accept ACL for
/// [`ACL_PEER`] only.
fn proxied(w: &World) -> Pu {
    Pu::process_of("web", &w.world.cgroup)
        .application_acl(Acl::accept("to-acl-peer", ACL_PEER.nets).tcp([PORT]))
        .proxy_port(PROXY_PORT)
        .dependent_service(w.world.net(OTHER), [PORT])
        .dns_proxy_port(DNS_PROXY_PORT)
}

/// The config of the dependent-service cases: [`TARGET`] the target
/// networks ([`config_targeting`]).
fn config(scope: &Cgroup, pus: &[Pu]) -> String {
    config_targeting(scope, TARGET, pus)
}

/// The config of these tests: `pus`, with `targets`' networks as the
/// target networks, [`EXCLUDED`]'s excluded, and the host scope at
/// `scope` (where the proxy listens).
fn config_targeting(scope: &Cgroup, targets: Peer, pus: &[Pu]) -> String {
    let config = Config::local_server()
        .target_tcp(targets.nets)
        .target_udp(targets.nets)
        .excluded(EXCLUDED.nets)
        .host_scope(scope);
    pus.iter().fold(config, |c, pu| c.pu(pu.clone())).to_toml()
}

fn a_dependent_service_connection_lands_on_the_proxy_and_is_not_redirected_again(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = World::require(family)? else {
        return Ok(());
    };
    let _agent = w.start(datapath, &[proxied(&w)])?;
    let service = w.world.addr(OTHER);
    // No ACL accepts OTHER: the request completes through the proxy only.
    assert_eq!(
        w.exchange(Some(&w.world.cgroup), service)?,
        Outcome::Exchanged
    );
    let seen = w.proxy.seen();
    assert_eq!(seen.len(), 1, "one connection on the proxy: {seen:#?}");
    assert_eq!(seen[0].original, service, "SO_ORIGINAL_DST: {seen:#?}");
    assert!(seen[0].forwarded, "{seen:#?}");
    // Its own onward connection (proxy mark) to the same service was not
    // redirected to itself again: still one.
    assert_eq!(w.proxy.seen().len(), 1);
    // Nothing else is redirected: the PU's other connections, and the
    // same service from outside the PU.
    assert_eq!(
        w.exchange(Some(&w.world.cgroup), w.world.addr(ACL_PEER))?,
        Outcome::Exchanged
    );
    assert_eq!(w.exchange(None, service)?, Outcome::Exchanged);
    assert_eq!(w.proxy.seen().len(), 1, "{:#?}", w.proxy.seen());
    Ok(())
}

fn a_dns_query_reaches_the_dns_proxy_and_its_answer_gets_back(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = World::require(family)? else {
        return Ok(());
    };
    let answer: IpAddr = match family {
        Family::V4 => "192.0.2.53".parse()?,
        Family::V6 => "2001:db8::53".parse()?,
    };
    let dns = DnsProxy::start(&w.world.hosts.a, family, DNS_PROXY_PORT, answer)?;
    let _agent = w.start(datapath, &[proxied(&w)])?;
    // The PU asks the target peer, where no DNS server listens: the DNS
    // proxy answers, as from the server asked — to a connected socket,
    // whose peer is still the server (nettool checks `getpeername`), and
    // to an unconnected one, whose answer must come from the server
    // itself (nettool checks its source).
    let server = SocketAddr::new(w.world.ip(TARGET), 53);
    for (asked, unconnected) in [(1, false), (2, true)] {
        let (outcome, said) = dns_query(&w, Some(&w.world.cgroup), server, unconnected)?;
        assert_eq!(
            outcome,
            Outcome::Exchanged,
            "unconnected {unconnected}: {said}"
        );
        assert_eq!(said, format!("answer {answer}"));
        assert_eq!(dns.asked().len(), asked, "{:?}", dns.asked());
    }
    // A process outside the PU asks the real server: no proxy, no answer.
    let (outcome, said) = dns_query(&w, None, server, false)?;
    assert_ne!(outcome, Outcome::Exchanged, "{said}");
    assert_eq!(dns.asked().len(), 2, "{:?}", dns.asked());
    Ok(())
}

/// `nettool dns-query` to `server` from a process in `cgroup` (or of host
/// `a` outside every PU), connected or not: its outcome and what it
/// printed.
fn dns_query(
    w: &World,
    cgroup: Option<&Cgroup>,
    server: SocketAddr,
    unconnected: bool,
) -> Result<(Outcome, String)> {
    let mut cmd = match cgroup {
        Some(cgroup) => cgroup.command_in(&w.world.hosts.a, nettool!())?,
        None => w.world.hosts.a.command(nettool!())?,
    };
    cmd.args(["dns-query", &server.to_string(), "svc.proxy.test"]);
    if unconnected {
        cmd.arg("--unconnected");
    }
    let out = cmd.output().context("nettool dns-query")?;
    let outcome = Outcome::from_exit(out.status.code(), &String::from_utf8_lossy(&out.stderr));
    Ok((
        outcome,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

fn a_pu_without_proxy_configuration_is_unaffected(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = World::new(&env, family)?;
    let other = Cgroup::new(&env.cgroup2)?;
    let plain = Pu::process_of("plain", &other)
        .application_acl(Acl::accept("to-acl-peer", ACL_PEER.nets).tcp([PORT]));
    let _agent = w.start(datapath, &[proxied(&w), plain])?;
    // `plain` gets its own policy: its ACL peer, and OTHER — `web`'s
    // dependent service — refused, not proxied.
    assert_eq!(
        w.exchange(Some(&other), w.world.addr(ACL_PEER))?,
        Outcome::Exchanged
    );
    let refused = w.exchange(Some(&other), w.world.addr(OTHER))?;
    assert!(refused.is_blocked(), "no ACL, no proxy: {refused:?}");
    assert!(w.proxy.seen().is_empty(), "{:#?}", w.proxy.seen());
    // And its DNS queries go where they were sent, unanswered (no server
    // on b).
    let server = SocketAddr::new(w.world.ip(TARGET), 53);
    let (outcome, said) = dns_query(&w, Some(&other), server, false)?;
    assert_ne!(outcome, Outcome::Exchanged, "{said}");
    Ok(())
}

/// SPEC: the redirect chains skip excluded destinations, so a dependent
/// service there is reached directly (excluded traffic is never touched),
/// while another one is still redirected.
fn a_dependent_service_in_the_excluded_networks_is_not_redirected(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(w) = World::require(family)? else {
        return Ok(());
    };
    let pu = proxied(&w).dependent_service(w.world.net(EXCLUDED), [PORT]);
    let _agent = w.start(datapath, &[pu])?;
    assert_eq!(
        w.exchange(Some(&w.world.cgroup), w.world.addr(EXCLUDED))?,
        Outcome::Exchanged
    );
    assert!(w.proxy.seen().is_empty(), "{:#?}", w.proxy.seen());
    assert_eq!(
        w.exchange(Some(&w.world.cgroup), w.world.addr(OTHER))?,
        Outcome::Exchanged
    );
    assert_eq!(w.proxy.seen().len(), 1, "{:#?}", w.proxy.seen());
    Ok(())
}

/// A running PU gains its proxy configuration by an update, then loses
/// it again: its dependent service goes through the proxy only while it
/// has it, and is its policy's (here: refused) otherwise.
fn an_update_gives_and_takes_the_proxy(datapath: Datapath, family: Family) -> Result<()> {
    let Some(w) = World::require(family)? else {
        return Ok(());
    };
    let plain = Pu::process_of("web", &w.world.cgroup)
        .application_acl(Acl::accept("to-acl-peer", ACL_PEER.nets).tcp([PORT]));
    let agent = w.start(datapath, std::slice::from_ref(&plain))?;
    let service = w.world.addr(OTHER);
    let refused = w.exchange(Some(&w.world.cgroup), service)?;
    assert!(refused.is_blocked(), "no proxy yet: {refused:?}");
    for (pu, redirected) in [(proxied(&w), true), (plain, false)] {
        let before = agent.reloads()?;
        agent.reload(&config(&w.scope, &[pu]))?;
        let after = agent.reloads()?;
        assert_eq!(after.applied, before.applied + 1, "{}", agent.log());
        let outcome = w.exchange(Some(&w.world.cgroup), service)?;
        match redirected {
            true => assert_eq!(outcome, Outcome::Exchanged),
            false => assert!(outcome.is_blocked(), "the proxy is gone: {outcome:?}"),
        }
        // The one connection of the proxied round, and no other.
        assert_eq!(w.proxy.seen().len(), 1, "{:#?}", w.proxy.seen());
    }
    assert_eq!(
        w.exchange(Some(&w.world.cgroup), w.world.addr(ACL_PEER))?,
        Outcome::Exchanged
    );
    Ok(())
}

/// Everything netfilter holds in the namespace, counters stripped.
fn netfilter_state(ns: &Netns) -> Result<String> {
    let mut all = String::new();
    for family in [Family::V4, Family::V6] {
        for table in ["mangle", "nat", "filter", "raw"] {
            let dump = netfilter::save(ns, family, table)?;
            all.push_str(&netfilter::rules_without_counters(&dump));
        }
    }
    Ok(all)
}

/// In eBPF mode the netfilter rule set (as the backend saves it, both
/// families, every table) is the same for 1 and for 100 PUs, each with a
/// proxy port, a DNS proxy port and dependent services of both families:
/// the redirection is the programs' alone (issue 6).
#[test]
fn netfilter_rules_do_not_grow_with_proxied_pus() -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let ns = Netns::new()?;
    let scope = Cgroup::new(&env.cgroup2)?;
    let cgroups: Vec<Cgroup> = (0..100)
        .map(|_| Cgroup::new(&env.cgroup2))
        .collect::<Result<_>>()?;
    let config = |n: usize| {
        let config = Config::local_server()
            .target_tcp(["10.200.0.0/16"])
            .host_scope(&scope);
        cgroups[..n]
            .iter()
            .enumerate()
            .fold(config, |config, (i, cgroup)| {
                let i16 = i as u16;
                config.pu(Pu::process_of(&format!("pu-{i}"), cgroup)
                    .proxy_port(20_000 + i16)
                    .dns_proxy_port(21_000 + i16)
                    .dependent_service(&format!("10.{i}.0.0/16"), [80, 443])
                    .dependent_service(&format!("fd00:{i:x}::/64"), [5432]))
            })
            .to_toml()
    };
    let bin = env!("CARGO_BIN_EXE_agent");
    let one = Agent::start(bin, &ns, Datapath::Ebpf, &config(1))?;
    assert_eq!(one.status()?["datapath"]["kind"], "ebpf");
    // The same instance both times: the UDP trap rule names the instance's
    // pin path.
    let instance = one.instance().to_string();
    let with_one = netfilter_state(&ns)?;
    drop(one);
    let hundred = Agent::start_with(
        bin,
        &ns,
        Some(&instance),
        &["--datapath", Datapath::Ebpf.arg()],
        &config(100),
        |cmd| Datapath::Ebpf.prepare(cmd),
    )?;
    let status = hundred.status()?;
    assert_eq!(status["datapath"]["kind"], "ebpf");
    assert_eq!(
        status["pus"].as_array().map(Vec::len),
        Some(100),
        "{status:#}"
    );
    let with_hundred = netfilter_state(&ns)?;
    assert!(
        with_one.contains("NFQUEUE"),
        "the fixed rules are there:\n{with_one}"
    );
    assert!(
        !with_one.contains("REDIRECT"),
        "no nat redirect:\n{with_one}"
    );
    assert_eq!(
        with_one, with_hundred,
        "the netfilter rule set must not depend on the PUs' proxies"
    );
    Ok(())
}

/// `web` for the exposed-service cases, with only an exposed service: the
/// proxy port and `exposed`, listened on beside `other`, which a network
/// ACL accepts from host `b` (its address is [`TARGET`]'s, which
/// [`exposing_config`] does not make a target network); nothing accepts
/// `b` on `exposed`, so only the proxy can complete a request there.
fn exposing(w: &World, exposed: u16, other: u16) -> Pu {
    Pu::process_of("web", &w.world.cgroup)
        .tcp_ports([exposed, other])
        .network_acl(Acl::accept("from-b", TARGET.nets).tcp([other]))
        .proxy_port(PROXY_PORT)
        .exposed_services([exposed])
}

/// [`exposing`] alone, with host `b` outside the target networks: its
/// connections are judged by the PU's network ACLs, not by the trap.
fn exposing_config(w: &World, exposed: u16, other: u16) -> String {
    config_targeting(&w.scope, OTHER, &[exposing(w, exposed, other)])
}

/// The PU's echo servers on [`EXPOSED`] and [`NOT_EXPOSED`], in its cgroup
/// on host `a`, on the family's wildcard address.
fn pu_servers(w: &World) -> Result<Vec<PuEchoServer>> {
    [EXPOSED, NOT_EXPOSED]
        .map(|port| {
            PuEchoServer::start(
                nettool!(),
                Transport::Tcp,
                &w.world.cgroup,
                &w.world.hosts.a,
                SocketAddr::new(wildcard(w.world.family), port),
            )
        })
        .into_iter()
        .collect()
}

/// The exposed-service tests' start: the world, its agent with
/// [`EXPOSED`] exposed ([`exposing_config`]) and the PU's servers
/// ([`pu_servers`]), in the order they drop in reverse; `None` where
/// privileged tests are skipped on purpose.
fn exposing_world(
    datapath: Datapath,
    family: Family,
) -> Result<Option<(World, Agent, Vec<PuEchoServer>)>> {
    let Some(w) = World::require(family)? else {
        return Ok(None);
    };
    let agent = w.start_config(datapath, &exposing_config(&w, EXPOSED, NOT_EXPOSED))?;
    let servers = pu_servers(&w)?;
    Ok(Some((w, agent, servers)))
}

/// A TCP exchange from host `b` with `port` of host `a`.
fn from_b(world: &PuWorld, port: u16) -> Result<Outcome> {
    let a = world.hosts.a_end.ip(world.family);
    let mut cmd = world.hosts.b.command(nettool!())?;
    cmd.args(["tcp-exchange", &SocketAddr::new(a, port).to_string()]);
    run_nettool(cmd)
}

fn an_exposed_service_connection_lands_on_the_proxy(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some((w, _agent, _servers)) = exposing_world(datapath, family)? else {
        return Ok(());
    };
    let exposed = SocketAddr::new(w.world.hosts.a_end.ip(family), EXPOSED);
    // `b` to the exposed port, where no ACL accepts it: through the
    // proxy, which learns the original destination and forwards to the
    // PU's server (the proxy mark takes it past the PU's ACLs).
    assert_eq!(from_b(&w.world, EXPOSED)?, Outcome::Exchanged);
    let seen = w.proxy.seen();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(seen[0].original, exposed, "{seen:#?}");
    assert_eq!(seen[0].peer.ip(), w.world.hosts.b_end.ip(family));
    assert!(seen[0].forwarded, "and on to the PU's service: {seen:#?}");
    // With forwarding on, a route lookup is what tells a local
    // destination from one the host forwards (eBPF asks the kernel's
    // FIB, the fallback's redirect matches `--dst-type LOCAL`): still the
    // proxy's.
    for setting in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        output_ok(w.world.hosts.a.command("sysctl")?.args(["-qw", setting]))?;
    }
    assert_eq!(from_b(&w.world, EXPOSED)?, Outcome::Exchanged);
    assert_eq!(w.proxy.seen().len(), 2, "{:#?}", w.proxy.seen());
    // Its other port is not redirected: the PU's server answers, as its
    // ACL allows, and the proxy sees nothing more.
    assert_eq!(from_b(&w.world, NOT_EXPOSED)?, Outcome::Exchanged);
    assert_eq!(w.proxy.seen().len(), 2, "{:#?}", w.proxy.seen());
    // Nor is a connection from the excluded networks, which the PU's own
    // server gets though no ACL accepts it.
    let excluded = w.world.ip(EXCLUDED);
    assert_eq!(
        from_b_address(&w.world, excluded, EXPOSED)?,
        Outcome::Exchanged
    );
    assert_eq!(w.proxy.seen().len(), 2, "{:#?}", w.proxy.seen());
    // With no proxy listening the exposed port is closed — refused by a
    // RST after the fallback's redirect, the SYN dropped on eBPF — and
    // never left to the PU's own server.
    drop(w.proxy);
    let closed = from_b(&w.world, EXPOSED)?;
    assert_ne!(closed, Outcome::Exchanged);
    Ok(())
}

/// A TCP exchange with `port` of host `a` from `from`, an address of host
/// `b` (nettool binds no source address): in a thread in `b`.
fn from_b_address(world: &PuWorld, from: IpAddr, port: u16) -> Result<Outcome> {
    Ok(exchange_from(world, SocketAddr::new(from, 0), port, false)?.0)
}

/// [`from_b_address`] from `from`'s port too (0: any); with
/// `until_closed`, it then waits for the other side to close first. With
/// the outcome, how many segments the client sent again (its SYN
/// included: `tcpi_total_retrans`).
fn exchange_from(
    world: &PuWorld,
    from: SocketAddr,
    port: u16,
    until_closed: bool,
) -> Result<(Outcome, u32)> {
    let to = SocketAddr::new(world.hosts.a_end.ip(world.family), port);
    let exchange = move || -> std::io::Result<u32> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.bind(&from.into())?;
        socket.connect_timeout(&to.into(), Duration::from_secs(3))?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"ping")?;
        let mut echoed = [0u8; 4];
        stream.read_exact(&mut echoed)?;
        if &echoed != b"ping" {
            return Err(std::io::Error::other("a wrong echo"));
        }
        if until_closed && stream.read(&mut echoed)? != 0 {
            return Err(std::io::Error::other("more than the echo"));
        }
        retransmitted(&stream)
    };
    let done = world.hosts.b.spawn(exchange)?.join();
    Ok(
        match done.map_err(|_| anyhow::anyhow!("client thread panicked"))?? {
            Ok(again) => (Outcome::Exchanged, again),
            Err(e) => (Outcome::Failed(e.to_string()), 0),
        },
    )
}

/// `tcpi_total_retrans` of a connected socket.
fn retransmitted(stream: &TcpStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: tcp_info is plain data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable tcp_info of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    match rc {
        0 => Ok(info.tcpi_total_retrans),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// An update swaps which port is exposed (and which one the ACL accepts):
/// each connection goes where the policy in force says.
fn exposed_services_follow_an_update(datapath: Datapath, family: Family) -> Result<()> {
    let Some((w, agent, _servers)) = exposing_world(datapath, family)? else {
        return Ok(());
    };
    assert_eq!(from_b(&w.world, EXPOSED)?, Outcome::Exchanged);
    assert_eq!(w.proxy.seen().len(), 1, "{:#?}", w.proxy.seen());
    let applied = agent.reloads()?.applied;
    agent.reload(&exposing_config(&w, NOT_EXPOSED, EXPOSED))?;
    let reloads = agent.reloads()?;
    assert_eq!(reloads.applied, applied + 1, "{reloads:?}");
    // EXPOSED is the PU's own now (its ACL accepts b there), NOT_EXPOSED
    // the proxy's.
    assert_eq!(from_b(&w.world, EXPOSED)?, Outcome::Exchanged);
    assert_eq!(w.proxy.seen().len(), 1, "{:#?}", w.proxy.seen());
    assert_eq!(from_b(&w.world, NOT_EXPOSED)?, Outcome::Exchanged);
    let seen = w.proxy.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    let a = w.world.hosts.a_end.ip(family);
    assert_eq!(seen[1].original, SocketAddr::new(a, NOT_EXPOSED));
    Ok(())
}

/// A proxy on [`PROXY_PORT`] of `ns`, listening from `scope` as
/// [`TestProxy`] does, that closes each connection first, which leaves
/// the TIME_WAIT on its side: per connection it learns the original
/// destination, relays one 4-byte exchange to it from a socket carrying
/// the proxy mark, and closes. The originals it saw; it stops when
/// dropped.
struct ClosingProxy {
    originals: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl ClosingProxy {
    fn start(scope: &Cgroup, ns: &Netns, family: Family) -> Result<Self> {
        let bind = SocketAddr::new(wildcard(family), PROXY_PORT);
        let listener = listener_in(nettool!(), scope, ns, bind)?;
        listener.set_nonblocking(true)?;
        let (originals, stop) = (Arc::default(), Arc::new(AtomicBool::new(false)));
        let (seen, stopped) = (Arc::clone(&originals), Arc::clone(&stop));
        let thread = ns.spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = relay_once(client, &seen);
            }
        })?;
        Ok(Self {
            originals,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ClosingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One connection of [`ClosingProxy`]: learn, record, one exchange
/// onward, close.
fn relay_once(client: TcpStream, seen: &Mutex<Vec<SocketAddr>>) -> std::io::Result<()> {
    let mut client = client;
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(3)))?;
    let original = original_dst(&client)?;
    seen.lock().expect("proxy log").push(original);
    let mut server = connect_marked(original, proxy_mark())?;
    server.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf)?;
    server.write_all(&buf)?;
    server.read_exact(&mut buf)?;
    client.write_all(&buf)?;
    // The client's side first: its TIME_WAIT stays here.
    drop(client);
    Ok(())
}

/// A peer reconnecting from the same address and port to an exposed port
/// while the proxy's side of its last connection is in TIME_WAIT (the
/// proxy closed first): the kernel reuses the tuple, and the connection
/// lands on the proxy again — never on the PU's own server.
fn a_connection_reusing_a_time_wait_tuple_lands_on_the_proxy(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some((w, _agent, _servers)) = exposing_world(datapath, family)? else {
        return Ok(());
    };
    drop(w.proxy);
    let proxy = ClosingProxy::start(&w.scope, &w.world.hosts.a, family)?;
    let from = SocketAddr::new(w.world.hosts.b_end.ip(family), 40_123);
    let (first, _) = exchange_from(&w.world, from, EXPOSED, true)?;
    assert_eq!(first, Outcome::Exchanged);
    // The proxy's side of it waits in TIME_WAIT.
    let waiting = output_ok(
        w.world
            .hosts
            .a
            .command("ss")?
            .args(["-Htn", "state", "time-wait"]),
    )?;
    let waiting = String::from_utf8_lossy(&waiting.stdout).into_owned();
    assert!(waiting.contains(":40123"), "no TIME_WAIT for it: {waiting}");
    // Taken at once: no SYN sent again (the kernel's answer to a SYN the
    // TIME_WAIT refuses would make the client reset it and retry).
    let (second, again) = exchange_from(&w.world, from, EXPOSED, true)?;
    assert_eq!(second, Outcome::Exchanged);
    assert_eq!(again, 0, "segments sent again");
    let exposed = SocketAddr::new(w.world.hosts.a_end.ip(family), EXPOSED);
    let originals = proxy.originals.lock().expect("proxy log").clone();
    assert_eq!(originals, [exposed, exposed]);
    Ok(())
}
