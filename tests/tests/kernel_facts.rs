//! Kernel facts: each mechanism the eBPF datapath is built on, proven on
//! the running kernel with the probes in `enforcer-ebpf/src/facts.rs` and
//! real traffic between test namespaces (ARCHITECTURE.md, "verify each
//! claim you rely on with a kernel test").
//!
//! (a) cgroup/connect4|6 marks a socket with bpf_setsockopt(SO_MARK) and
//!     an OUTPUT mark rule matches the SYN;
//! (b) a TC ingress mark is seen by an INPUT mark rule;
//! (c) NFQUEUE round trip: the SYN is queued, accepted with a connection
//!     mark, and no later packet of the connection is queued;
//! (d) LPM tries return the longest prefix, in the program and from user
//!     space;
//! (e) a cgroup_skb egress program drops a process's packets and no one
//!     else's;
//! (f) a cgroup/sendmsg4|6 hook's SO_MARK misses the datagram being sent
//!     (only later ones carry it), but a decision it records by socket
//!     cookie and destination reaches netfilter with that very datagram:
//!     an `-m bpf --object-pinned` match (xt_bpf) runs a pinned socket
//!     filter that finds it by `bpf_get_socket_cookie` of the packet — on
//!     both iptables backends (nf_tables through its xt compatibility, and
//!     legacy);
//! (g) a cgroup_skb egress program sees, and can drop, the ICMP and
//!     ICMPv6 echo requests of raw and ping sockets (which no connect or
//!     sendmsg hook sees), and lets the process's other traffic pass.
//! IPv4 and IPv6 run the same test bodies.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SchedClassifier,
        SocketFilter, TcAttachType,
    },
};
use enforcer::trap::packet::L4;
use enforcer_common::facts;
use enforcer_tests::{
    cgroup::Cgroup,
    netfilter::{self, Family},
    netns::{TwoHosts, output_ok},
    nettool, on_both_families, privilege,
    traffic::{Outcome, TcpEchoServer, UdpReceiver, run_nettool, tcp_exchange, udp_send},
};

const PORT: u16 = 7000;

on_both_families!(
    connect_hook_marks_the_syn,
    tc_ingress_mark_by_longest_prefix,
    nfqueue_round_trip,
    cgroup_skb_egress_drops_only_its_cgroup,
    sendmsg_decision_reaches_netfilter_by_socket_cookie,
    cgroup_skb_egress_sees_raw_and_ping_socket_icmp,
);

/// Loads the facts program `name` and attaches it to `cgroup`'s egress
/// (it stays attached while `bpf` lives).
fn attach_egress(bpf: &mut Ebpf, name: &str, cgroup: &Cgroup) -> Result<()> {
    let prog: &mut CgroupSkb = bpf.program_mut(name).context(name.to_owned())?.try_into()?;
    prog.load()?;
    prog.attach(
        cgroup.dir()?,
        CgroupSkbAttachType::Egress,
        CgroupAttachMode::Single,
    )?;
    Ok(())
}

fn load_facts() -> Result<Ebpf> {
    Ebpf::load(enforcer::bpf::kernel_facts_object()?).context("loading the kernel-facts object")
}

/// Two hosts with a TCP echo server on `b`, and on `a` one mangle OUTPUT
/// rule per `(matches, comment, target)` for TCP to the server, in order.
fn echo_with_output_rules(
    family: Family,
    rules: &[(&str, &str, &str)],
) -> Result<(TwoHosts, TcpEchoServer, SocketAddr)> {
    let hosts = TwoHosts::new()?;
    let server = SocketAddr::new(hosts.b_end.ip(family), PORT);
    let echo = TcpEchoServer::start(&hosts.b, server)?;
    let dst = server.ip();
    let mut text = String::from("*mangle\n");
    for (matches, comment, target) in rules {
        text += &format!(
            "-A OUTPUT -p tcp -d {dst} --dport {PORT} {matches} -m comment --comment {comment} -j {target}\n"
        );
    }
    text += "COMMIT\n";
    netfilter::restore(&hosts.a, family, &text)?;
    Ok((hosts, echo, server))
}

// ---------------------------------------------------------------- (a)

fn connect_hook_marks_the_syn(family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let marked = format!("--syn -m mark --mark {:#x}", facts::CONNECT_MARK);
    let (hosts, _echo, server) = echo_with_output_rules(
        family,
        &[
            (&marked, "marked-syn", "ACCEPT"),
            ("--syn", "unmarked-syn", "ACCEPT"),
        ],
    )?;

    let cgroup = Cgroup::new(&env.cgroup2)?;
    let mut bpf = load_facts()?;
    let name = match family {
        Family::V4 => facts::PROG_CONNECT4,
        Family::V6 => facts::PROG_CONNECT6,
    };
    let prog: &mut CgroupSockAddr = bpf.program_mut(name).context(name)?.try_into()?;
    prog.load()?;
    prog.attach(cgroup.dir()?, CgroupAttachMode::Single)?;

    let syns = || -> Result<(u64, u64)> {
        Ok((
            netfilter::packets(&hosts.a, family, "mangle", "marked-syn")?,
            netfilter::packets(&hosts.a, family, "mangle", "unmarked-syn")?,
        ))
    };

    // A process inside the cgroup: its SYN carries the mark.
    let mut inside = cgroup.command_in(&hosts.a, nettool!())?;
    inside.args(["tcp-exchange", &server.to_string()]);
    assert_eq!(run_nettool(inside)?, Outcome::Exchanged);
    assert_eq!(syns()?, (1, 0), "(marked, unmarked) SYNs from inside");

    // A process of the same namespace outside the cgroup: untouched.
    let mut outside = hosts.a.command(nettool!())?;
    outside.args(["tcp-exchange", &server.to_string()]);
    assert_eq!(run_nettool(outside)?, Outcome::Exchanged);
    assert_eq!(
        syns()?,
        (1, 1),
        "(marked, unmarked) SYNs, then from outside"
    );
    Ok(())
}

// ---------------------------------------------------------- (b) + (d)

/// Marks the TC program gives per matched prefix length.
const MARK_WIDE: u32 = 0x8;
const MARK_NARROW: u32 = 0x18;
const MARK_HOST: u32 = 0x20;

/// Prefixes for the trie and the sources that exercise them, per family:
/// (wide, narrow, host) prefixes, and a source covered by none.
struct LpmCase {
    wide: (IpAddr, u32),
    narrow: (IpAddr, u32),
    host: IpAddr,
    uncovered: IpAddr,
}

fn lpm_case(family: Family) -> LpmCase {
    let ip = |s: &str| s.parse::<IpAddr>().expect("literal address");
    match family {
        Family::V4 => LpmCase {
            wide: (ip("10.0.0.0"), 8),
            narrow: (ip("10.1.0.0"), 24),
            host: ip("10.1.0.77"),
            uncovered: ip("198.18.0.5"),
        },
        Family::V6 => LpmCase {
            wide: (ip("fd00::"), 8),
            narrow: (ip("fd00:1::"), 64),
            host: ip("fd00:1::77"),
            uncovered: ip("2001:db8::5"),
        },
    }
}

/// TC ingress on the receiver looks the source up in the LPM trie and sets
/// the mark of the longest covering prefix; the receiver's INPUT rules
/// count each mark. One datagram per source: the veth address (narrow
/// prefix), an extra host address (host prefix) and an address outside the
/// narrow prefix (wide prefix only) and one covered by nothing.
fn tc_ingress_mark_by_longest_prefix(family: Family) -> Result<()> {
    let Some(_env) = privilege::require() else {
        return Ok(());
    };
    let hosts = TwoHosts::new()?;
    let case = lpm_case(family);
    let wide_only: IpAddr = match family {
        Family::V4 => "10.200.0.9".parse()?,
        Family::V6 => "fd77::9".parse()?,
    };
    let plen = match family {
        Family::V4 => "32",
        Family::V6 => "128",
    };
    // Extra source addresses on the sender, routes back on the receiver.
    for extra in [case.host, wide_only, case.uncovered] {
        let extra = extra.to_string();
        hosts.a.ip(&[
            "addr",
            "add",
            &format!("{extra}/{plen}"),
            "dev",
            &hosts.a_end.ifname,
            "nodad",
        ])?;
        hosts.b.ip(&[
            "route",
            "add",
            &format!("{extra}/{plen}"),
            "dev",
            &hosts.b_end.ifname,
        ])?;
    }
    let receiver = UdpReceiver::start(&hosts.b, SocketAddr::new(hosts.b_end.ip(family), PORT))?;
    let mut rules = String::from("*mangle\n");
    for (mark, comment) in [
        (MARK_WIDE, "mark-wide"),
        (MARK_NARROW, "mark-narrow"),
        (MARK_HOST, "mark-host"),
        (0, "mark-none"),
    ] {
        rules += &format!(
            "-A INPUT -p udp --dport {PORT} -m mark --mark {mark:#x} -m comment --comment {comment} -j ACCEPT\n"
        );
    }
    rules += "COMMIT\n";
    netfilter::restore(&hosts.b, family, &rules)?;

    let mut bpf = load_facts()?;
    fill_trie(&mut bpf, family, &case)?;
    let prog: &mut SchedClassifier = bpf
        .program_mut(facts::PROG_TC_INGRESS)
        .context(facts::PROG_TC_INGRESS)?
        .try_into()?;
    prog.load()?;
    let ifname = hosts.b_end.ifname.clone();
    hosts
        .b
        .run(|| prog.attach(&ifname, TcAttachType::Ingress))??;

    let to = receiver.addr();
    let sources = [
        (hosts.a_end.ip(family), "narrow"),
        (case.host, "host"),
        (wide_only, "wide"),
        (case.uncovered, "none"),
    ];
    for (src, label) in sources {
        let payload = format!("from-{label}");
        let sent = hosts
            .a
            .run(|| udp_send(Some(src), to, payload.as_bytes()))?;
        assert_eq!(sent, Outcome::Exchanged, "sending from {src}");
        ensure!(
            receiver
                .wait_for(payload.as_bytes(), Duration::from_secs(2))
                .is_some(),
            "datagram from {src} never arrived"
        );
    }
    for label in ["mark-wide", "mark-narrow", "mark-host", "mark-none"] {
        assert_eq!(
            netfilter::packets(&hosts.b, family, "mangle", label)?,
            1,
            "INPUT rule {label} should have counted exactly one datagram"
        );
    }
    Ok(())
}

/// Loads the wide, narrow and host prefixes of `case` into the family's
/// trie and checks user-space lookups return the longest prefix too.
fn fill_trie(bpf: &mut Ebpf, family: Family, case: &LpmCase) -> Result<()> {
    fn fill<const N: usize>(
        bpf: &mut Ebpf,
        map: &str,
        octets: impl Fn(IpAddr) -> [u8; N],
        case: &LpmCase,
    ) -> Result<()> {
        let mut trie: LpmTrie<_, [u8; N], u32> =
            LpmTrie::try_from(bpf.map_mut(map).context(map.to_string())?)?;
        let host_len = (N * 8) as u32;
        trie.insert(&Key::new(case.wide.1, octets(case.wide.0)), MARK_WIDE, 0)?;
        trie.insert(
            &Key::new(case.narrow.1, octets(case.narrow.0)),
            MARK_NARROW,
            0,
        )?;
        trie.insert(&Key::new(host_len, octets(case.host)), MARK_HOST, 0)?;
        // User-space lookups go through the kernel's trie as well.
        assert_eq!(
            trie.get(&Key::new(host_len, octets(case.host)), 0)?,
            MARK_HOST
        );
        assert_eq!(
            trie.get(&Key::new(host_len, octets(case.narrow.0)), 0)?,
            MARK_NARROW
        );
        assert!(
            trie.get(&Key::new(host_len, octets(case.uncovered)), 0)
                .is_err()
        );
        Ok(())
    }
    match family {
        Family::V4 => fill(bpf, facts::MAP_SRC_MARK_V4, v4_octets, case),
        Family::V6 => fill(bpf, facts::MAP_SRC_MARK_V6, v6_octets, case),
    }
}

fn v4_octets(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(_) => panic!("{ip} is not IPv4"),
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(_) => panic!("{ip} is not IPv6"),
    }
}

// ---------------------------------------------------------------- (c)

/// The trap's kernel half: the first packet of a connection is queued to a
/// Rust consumer, which accepts it with a packet mark and NF_REPEAT; the
/// repeated packet's mark is saved into the connection, and the connmark
/// rule keeps every later packet out of the queue.
fn nfqueue_round_trip(family: Family) -> Result<()> {
    const QUEUE: u16 = 3;
    const DECIDED: u32 = 0xeeee;
    let Some(_env) = privilege::require() else {
        return Ok(());
    };
    let (hosts, _echo, server) = echo_with_output_rules(
        family,
        &[
            (
                &format!("-m mark --mark {DECIDED:#x}"),
                "save-verdict",
                "CONNMARK --save-mark",
            ),
            (
                &format!("-m connmark --mark {DECIDED:#x}"),
                "decided",
                "ACCEPT",
            ),
            ("", "to-queue", &format!("NFQUEUE --queue-num {QUEUE}")),
        ],
    )?;

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let syns = Arc::new(AtomicU32::new(0));
    let (stop2, syns2) = (stop.clone(), syns.clone());
    let consumer = hosts.a.spawn(move || -> Result<u32> {
        let mut queue = nfq::Queue::open()?;
        queue.bind(QUEUE)?;
        queue.set_nonblocking(true);
        ready_tx.send(()).ok();
        let mut seen = 0;
        while !stop2.load(Ordering::Relaxed) {
            let mut msg = match queue.recv() {
                Ok(msg) => msg,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            seen += 1;
            if is_tcp_syn(msg.get_payload()) {
                syns2.fetch_add(1, Ordering::Relaxed);
            }
            msg.set_nfmark(DECIDED);
            msg.set_verdict(nfq::Verdict::Repeat);
            queue.verdict(msg)?;
        }
        Ok(seen)
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("queue consumer did not start")?;

    // Several round trips on one connection: many packets, one decision.
    let payload = vec![b'x'; 64 * 1024];
    let outcome = hosts.a.run(|| tcp_exchange(server, &payload))?;
    // Read the kernel's queue statistics while the consumer is bound.
    let stats = netfilter::queue_stats(&hosts.a)?;
    stop.store(true, Ordering::Relaxed);
    let queued = consumer.join().expect("consumer thread")??;

    assert_eq!(outcome, Outcome::Exchanged);
    assert_eq!(queued, 1, "exactly one packet should reach user space");
    assert_eq!(
        syns.load(Ordering::Relaxed),
        1,
        "the queued packet is the SYN"
    );
    assert_eq!(
        netfilter::packets(&hosts.a, family, "mangle", "to-queue")?,
        1
    );
    assert_eq!(
        netfilter::packets(&hosts.a, family, "mangle", "save-verdict")?,
        1
    );
    let decided = netfilter::packets(&hosts.a, family, "mangle", "decided")?;
    assert!(
        decided > 5,
        "later packets pass by connmark, counted {decided}"
    );
    // The kernel's own count: the id sequence of a bound queue is the
    // number of packets ever queued on it.
    let q = stats
        .iter()
        .find(|q| q.queue == QUEUE)
        .with_context(|| format!("queue {QUEUE} not bound: {stats:?}"))?;
    assert_eq!(q.id_sequence, 1, "kernel queue stats: {q:?}");
    assert_eq!(
        (q.waiting, q.queue_dropped, q.user_dropped),
        (0, 0, 0),
        "{q:?}"
    );
    Ok(())
}

/// Is this IPv4/IPv6 packet a TCP SYN (without ACK)? Read with the
/// agent's own defensive parser.
fn is_tcp_syn(packet: &[u8]) -> bool {
    matches!(
        enforcer::trap::packet::parse(packet).map(|h| h.l4),
        Ok(L4::Tcp { flags, .. }) if flags.is_syn_only()
    )
}

// ---------------------------------------------------------------- (e)

fn cgroup_skb_egress_drops_only_its_cgroup(family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let hosts = TwoHosts::new()?;
    let receiver = UdpReceiver::start(&hosts.b, SocketAddr::new(hosts.b_end.ip(family), PORT))?;
    let to = receiver.addr().to_string();

    let cgroup = Cgroup::new(&env.cgroup2)?;
    let mut bpf = load_facts()?;
    attach_egress(&mut bpf, facts::PROG_EGRESS_DROP, &cgroup)?;

    let mut inside = cgroup.command_in(&hosts.a, nettool!())?;
    inside.args(["udp-send", &to, "--payload", "from-cgroup"]);
    let inside_outcome = run_nettool(inside)?;
    let mut outside = hosts.a.command(nettool!())?;
    outside.args(["udp-send", &to, "--payload", "from-outside"]);
    assert_eq!(run_nettool(outside)?, Outcome::Exchanged);

    assert!(
        receiver
            .wait_for(b"from-outside", Duration::from_secs(2))
            .is_some(),
        "a process outside the cgroup must not be affected"
    );
    assert!(
        receiver
            .wait_for(b"from-cgroup", Duration::from_millis(300))
            .is_none(),
        "the cgroup's datagram must be dropped"
    );
    // The sender learns of the drop: the kernel returns EPERM on egress.
    assert_eq!(inside_outcome, Outcome::Refused);
    let drops: PerCpuArray<_, u64> = PerCpuArray::try_from(
        bpf.map(facts::MAP_EGRESS_DROPS)
            .context(facts::MAP_EGRESS_DROPS)?,
    )?;
    let total: u64 = drops.get(&0, 0)?.iter().sum();
    assert!(total >= 1, "the program counted {total} drops");
    Ok(())
}

// ---------------------------------------------------------------- (f)

/// A pin of the test's own on the harness's bpffs, removed when dropped.
struct Pin(std::path::PathBuf);

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The restore and save tools of one iptables backend and family.
fn backend_tools(legacy: bool, family: Family) -> (String, String) {
    let flavour = if legacy { "legacy" } else { "nft" };
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    (
        format!("{base}-{flavour}-restore"),
        format!("{base}-{flavour}-save"),
    )
}

fn sendmsg_decision_reaches_netfilter_by_socket_cookie(family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    for legacy in [false, true] {
        sendmsg_decision_on_backend(&env, family, legacy)
            .with_context(|| format!("iptables backend legacy={legacy}"))?;
    }
    Ok(())
}

fn sendmsg_decision_on_backend(env: &privilege::Env, family: Family, legacy: bool) -> Result<()> {
    let hosts = TwoHosts::new()?;
    let receiver = UdpReceiver::start(&hosts.b, SocketAddr::new(hosts.b_end.ip(family), PORT))?;
    let to = receiver.addr();

    let cgroup = Cgroup::new(&env.cgroup2)?;
    let mut bpf = load_facts()?;
    let name = match family {
        Family::V4 => facts::PROG_SENDMSG4,
        Family::V6 => facts::PROG_SENDMSG6,
    };
    let prog: &mut CgroupSockAddr = bpf.program_mut(name).context(name)?.try_into()?;
    prog.load()?;
    prog.attach(cgroup.dir()?, CgroupAttachMode::Single)?;
    let filter: &mut SocketFilter = bpf
        .program_mut(facts::PROG_SENT_MATCH)
        .context(facts::PROG_SENT_MATCH)?
        .try_into()?;
    filter.load()?;
    let pin = Pin(env.bpffs.join(enforcer_tests::unique_name()));
    filter.pin(&pin.0)?;

    let (restore, save) = backend_tools(legacy, family);
    let dst = to.ip();
    let rules = format!(
        "*mangle\n\
         -A OUTPUT -p udp -d {dst} --dport {PORT} -m comment --comment marked \
           -m mark --mark {mark:#x}\n\
         -A OUTPUT -p udp -d {dst} --dport {PORT} -m bpf --object-pinned {pin} \
           -m comment --comment decided -j ACCEPT\n\
         -A OUTPUT -p udp -d {dst} --dport {PORT} -m comment --comment undecided -j ACCEPT\n\
         COMMIT\n",
        mark = facts::SENDMSG_MARK,
        pin = pin.0.display(),
    );
    netfilter::feed(&hosts.a, &restore, &["--noflush"], &rules)?;
    let count = |comment| netfilter::packets_as(&hosts.a, &save, "mangle", comment);

    // Two datagrams from one unconnected socket inside the cgroup.
    let mut inside = cgroup.command_in(&hosts.a, nettool!())?;
    inside.args([
        "udp-send",
        &to.to_string(),
        "--count",
        "2",
        "--payload",
        "in",
    ]);
    assert_eq!(run_nettool(inside)?, Outcome::Exchanged);
    ensure!(
        receiver.wait_for(b"in", Duration::from_secs(2)).is_some(),
        "the datagrams never arrived"
    );
    assert_eq!(
        count("marked")?,
        1,
        "SO_MARK from the sendmsg hook misses the first datagram, reaches the second"
    );
    assert_eq!(
        count("decided")?,
        2,
        "the recorded decision is found for both datagrams, the first included"
    );
    assert_eq!(count("undecided")?, 0);

    // A process outside the cgroup: no hook, no decision.
    let mut outside = hosts.a.command(nettool!())?;
    outside.args(["udp-send", &to.to_string(), "--payload", "out"]);
    assert_eq!(run_nettool(outside)?, Outcome::Exchanged);
    assert_eq!(count("decided")?, 2);
    assert_eq!(count("undecided")?, 1);

    // The rule survives the backend rewriting the table (legacy re-checks
    // every rule then, opening the pin by its path again).
    netfilter::feed(
        &hosts.a,
        &restore,
        &["--noflush"],
        "*mangle\n-A OUTPUT -p tcp --dport 1 -m comment --comment later -j ACCEPT\nCOMMIT\n",
    )?;
    let mut again = cgroup.command_in(&hosts.a, nettool!())?;
    again.args(["udp-send", &to.to_string(), "--payload", "again"]);
    assert_eq!(run_nettool(again)?, Outcome::Exchanged);
    assert_eq!(count("decided")?, 3);
    Ok(())
}

// ---------------------------------------------------------------- (g)

fn cgroup_skb_egress_sees_raw_and_ping_socket_icmp(family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let hosts = TwoHosts::new()?;
    let peer = hosts.b_end.ip(family);
    let receiver = UdpReceiver::start(&hosts.b, SocketAddr::new(peer, PORT))?;
    let cgroup = Cgroup::new(&env.cgroup2)?;
    // Ping sockets for every group, in the test's own namespace only (the
    // sysctl is per network namespace; IPv6 ping sockets obey it too).
    output_ok(
        hosts
            .a
            .command("sysctl")?
            .args(["-w", "net.ipv4.ping_group_range=0 2147483647"]),
    )?;
    let ping = |inside: bool, dgram: bool| -> Result<Outcome> {
        let mut cmd = match inside {
            true => cgroup.command_in(&hosts.a, nettool!())?,
            false => hosts.a.command(nettool!())?,
        };
        cmd.args(["ping", &peer.to_string()]);
        if dgram {
            cmd.arg("--dgram");
        }
        run_nettool(cmd)
    };
    // Before anything is attached, the echo works from inside.
    for dgram in [false, true] {
        assert_eq!(ping(true, dgram)?, Outcome::Exchanged, "dgram={dgram}");
    }

    let mut bpf = load_facts()?;
    attach_egress(&mut bpf, facts::PROG_EGRESS_ICMP, &cgroup)?;

    for dgram in [false, true] {
        let inside = ping(true, dgram)?;
        assert!(
            inside != Outcome::Exchanged,
            "the cgroup's echo request (dgram={dgram}) must be dropped, got {inside:?}"
        );
        assert_eq!(
            ping(false, dgram)?,
            Outcome::Exchanged,
            "outside (dgram={dgram}): untouched"
        );
    }
    let mut udp = cgroup.command_in(&hosts.a, nettool!())?;
    udp.args([
        "udp-send",
        &receiver.addr().to_string(),
        "--payload",
        "not-icmp",
    ]);
    assert_eq!(run_nettool(udp)?, Outcome::Exchanged);
    ensure!(
        receiver
            .wait_for(b"not-icmp", Duration::from_secs(2))
            .is_some(),
        "the cgroup's other traffic must pass"
    );
    let drops: PerCpuArray<_, u64> = PerCpuArray::try_from(
        bpf.map(facts::MAP_ICMP_DROPS)
            .context(facts::MAP_ICMP_DROPS)?,
    )?;
    let total: u64 = drops.get(&0, 0)?.iter().sum();
    assert!(total >= 2, "the program counted {total} ICMP drops");
    Ok(())
}
