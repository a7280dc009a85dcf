//! Flow logs on each datapath and in each address family: one line per
//! logged decision, with the same fields on both datapaths (SPEC,
//! "Observable behaviour": a decision is logged with its PU, policy id
//! and action; "Order of evaluation inside a PU": the final drop logs).
//!
//! The world: host `a` runs the agent and one PU (a cgroup of the test's
//! own) listening on [`PU_PORT`]; host `b` holds one address per peer and
//! family ([`PuWorld`]), each serving TCP [`PORT`]. The target networks are the veth's,
//! so no peer below is trapped.
//!
//! App side (the PU connects out to `b`):
//! - ACL peer: a reject observe-continue ACL (`watch-peer`) only logs, and
//!   the logged accept ACL (`allow-peer`) decides: the exchange works;
//! - denied peer: the logged reject ACL (`deny-other`) refuses it;
//! - other peer: no ACL, the final drop refuses it, logged as `default`;
//!   so are two UDP datagrams to it, from two sockets: two flows, two
//!   lines (a flow's repeats are folded, distinct flows are not).
//!
//! Net side (`b` connects to the PU's port, from each role's address):
//! - ACL peer: the network accept ACL (`from-peer`, logged) decides;
//! - other peer: the final drop, logged as `default`.
//!
//! Every line is asserted field by field, and no other line may appear.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use enforcer_tests::{
    agent::Datapath,
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::Family,
    netns::TwoHosts,
    nettool, privilege,
    traffic::{Outcome, TcpEchoServer, run_nettool, tcp_exchange_from},
    world::{ACL_PEER, OTHER, PORT, Peer, PuWorld, TARGET},
};
use serde_json::Value;

/// The PU's listening port on `a` (net side).
const PU_PORT: u16 = 8080;

/// Refused by a logged reject ACL (the usual peers are `world`'s).
const DENIED: Peer = Peer {
    addr: ["10.4.0.2", "fd00:4::2"],
    nets: ["10.4.0.0/16", "fd00:4::/64"],
};

enforcer_tests::on_both_datapaths_and_families!(acl_observe_and_final_drop_decisions_are_logged);

fn config(cgroup: &Cgroup, log: &Path) -> String {
    Config::local_server()
        .target_tcp(TARGET.nets)
        // An empty list would mean every network.
        .target_udp(TARGET.nets)
        .flow_log_file(log)
        .pu(Pu::process_of("web", cgroup)
            .tcp_ports([PU_PORT])
            .application_acl(
                Acl::reject("watch-peer", ACL_PEER.nets)
                    .tcp([PORT])
                    .observe_continue(),
            )
            .application_acl(Acl::accept("allow-peer", ACL_PEER.nets).tcp([PORT]).log())
            .application_acl(Acl::reject("deny-other", DENIED.nets).tcp([PORT]).log())
            .network_acl(Acl::accept("from-peer", ACL_PEER.nets).tcp([PU_PORT]).log()))
        .to_toml()
}

/// Expected lines: the fields every datapath must write alike. The
/// source is checked apart ([`check_src`]).
#[derive(Debug)]
struct Expected {
    /// How many lines (flows) with these fields.
    count: usize,
    protocol: &'static str,
    policy_id: &'static str,
    action: &'static str,
    observe: &'static str,
    dst: SocketAddr,
    direction: &'static str,
    /// The peer's address for a net-side line (its port is the client's).
    src_ip: Option<IpAddr>,
    /// The flow's packets leave the PU (an app-side accept): its line
    /// carries the PU's own source on both datapaths.
    leaves: bool,
}

fn acl_observe_and_final_drop_decisions_are_logged(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = PuWorld::new(&env, family, &[ACL_PEER, OTHER, DENIED])?;
    let _servers = [ACL_PEER, OTHER, DENIED]
        .map(|peer| TcpEchoServer::start(&w.hosts.b, w.addr(peer)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let pu_addr = SocketAddr::new(w.hosts.a_end.ip(family), PU_PORT);
    let _pu_server = TcpEchoServer::start(&w.hosts.a, pu_addr)?;
    let dir = tempdir()?;
    let log = dir.join("flows.log");
    let agent = w.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&w.cgroup, &log),
    )?;

    let pu_connects = |peer: Peer| -> Result<Outcome> {
        let mut cmd = w.cgroup.command_in(&w.hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &w.addr(peer).to_string()]);
        run_nettool(cmd)
    };
    let connects_to_pu = |peer: Peer| -> Result<Outcome> {
        let from = w.ip(peer);
        w.hosts
            .b
            .run(|| tcp_exchange_from(Some(from), pu_addr, b"ping"))
    };
    assert_eq!(
        pu_connects(ACL_PEER)?,
        Outcome::Exchanged,
        "the accept ACL decides, the observed reject does not"
    );
    let denied = pu_connects(DENIED)?;
    assert!(denied.is_blocked(), "reject ACL: got {denied:?}");
    let other = pu_connects(OTHER)?;
    assert!(other.is_blocked(), "final drop: got {other:?}");
    for payload in ["first", "second"] {
        let mut cmd = w.cgroup.command_in(&w.hosts.a, nettool!())?;
        let to = w.addr(OTHER).to_string();
        cmd.args(["udp-send", &to, "--payload", payload]);
        let sent = run_nettool(cmd)?;
        assert!(sent.is_blocked(), "UDP final drop: got {sent:?}");
    }
    assert_eq!(
        connects_to_pu(ACL_PEER)?,
        Outcome::Exchanged,
        "network accept ACL"
    );
    let other_in = connects_to_pu(OTHER)?;
    assert!(other_in.is_blocked(), "net final drop: got {other_in:?}");

    let app = |policy_id, action, observe, peer| Expected {
        count: 1,
        protocol: "tcp",
        policy_id,
        action,
        observe,
        dst: w.addr(peer),
        direction: "app",
        src_ip: None,
        // The ACL peer's connection is the one let through (the observed
        // reject only watches it).
        leaves: peer.addr == ACL_PEER.addr,
    };
    let net = |policy_id, action, peer: Peer| Expected {
        count: 1,
        protocol: "tcp",
        policy_id,
        action,
        observe: "none",
        dst: pu_addr,
        direction: "net",
        src_ip: Some(w.ip(peer)),
        leaves: false,
    };
    let expected = [
        app("watch-peer", "reject", "observe-continue", ACL_PEER),
        app("allow-peer", "accept", "none", ACL_PEER),
        app("deny-other", "reject", "none", DENIED),
        app("default", "reject", "none", OTHER),
        Expected {
            count: 2,
            protocol: "udp",
            ..app("default", "reject", "none", OTHER)
        },
        net("from-peer", "accept", ACL_PEER),
        net("default", "reject", OTHER),
    ];
    let total = expected.iter().map(|e| e.count).sum();
    let lines = wait_for_lines(&log, total, Duration::from_secs(10))?;
    let context = || format!("lines: {lines:#?}\nagent log:\n{}", agent.log());
    for want in &expected {
        let matching: Vec<&Value> = lines
            .iter()
            .filter(|l| {
                l["policy_id"] == want.policy_id
                    && l["protocol"] == want.protocol
                    && l["direction"] == want.direction
                    && l["dst"] == want.dst.to_string()
            })
            .collect();
        assert_eq!(
            matching.len(),
            want.count,
            "lines for {want:?}; {}",
            context()
        );
        let mut sources = Vec::new();
        for line in matching {
            assert_eq!(line["pu"], "web", "{line}");
            assert_eq!(line["action"], want.action, "{line}");
            assert_eq!(line["observe"], want.observe, "{line}");
            assert!(
                line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
                "{line}"
            );
            sources.push(check_src(datapath, family, &w.hosts, want, line));
        }
        sources.sort();
        sources.dedup();
        assert_eq!(sources.len(), want.count, "one line per flow: {sources:?}");
    }
    // The observed reject and the accept are one connection: one source.
    let accepted_sources: Vec<&Value> = lines
        .iter()
        .filter(|l| l["direction"] == "app" && l["dst"] == w.addr(ACL_PEER).to_string())
        .map(|l| &l["src"])
        .collect();
    assert_eq!(accepted_sources.len(), 2, "{}", context());
    assert_eq!(accepted_sources[0], accepted_sources[1], "{}", context());
    assert_eq!(lines.len(), total, "no other line; {}", context());
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The source: on the net side the peer, from a client port. On the app
/// side the PU host's address and port, on both datapaths, for every flow
/// whose packets leave (eBPF completes the hooks' events from the first
/// packet; NFLOG sees the packet). A refused flow's packet leaves only in
/// the fallback (its drop is in OUTPUT); eBPF refuses the connect or send
/// before any packet exists, so there the line carries the unspecified
/// address of the family, with the port of a bound socket (UDP binds
/// before sending) or 0 (a TCP connect runs before the bind).
fn check_src(
    datapath: Datapath,
    family: Family,
    hosts: &TwoHosts,
    want: &Expected,
    line: &Value,
) -> SocketAddr {
    let src: SocketAddr = line["src"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("src is ip:port: {line}"));
    match (want.src_ip, datapath) {
        (Some(ip), _) => {
            assert_eq!(src.ip(), ip, "{line}");
            assert_ne!(src.port(), 0, "{line}");
        }
        (None, Datapath::Ebpf) if !want.leaves => {
            let unspecified: IpAddr = match family {
                Family::V4 => "0.0.0.0".parse().expect("literal"),
                Family::V6 => "::".parse().expect("literal"),
            };
            assert_eq!(src.ip(), unspecified, "{line}");
            assert_eq!(src.port() != 0, want.protocol == "udp", "{line}");
        }
        (None, _) => {
            assert_eq!(src.ip(), hosts.a_end.ip(family), "{line}");
            assert_ne!(src.port(), 0, "{line}");
        }
    }
    src
}

/// A fresh directory for the flow log.
fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "enforcer-flowlog-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The file's lines as JSON, once it has at least `count` of them (a
/// little longer, so that an extra line would show).
fn wait_for_lines(path: &Path, count: usize, within: Duration) -> Result<Vec<Value>> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= count || start.elapsed() > within {
            std::thread::sleep(Duration::from_millis(300));
            let text = std::fs::read_to_string(path).unwrap_or_default();
            return text
                .lines()
                .map(|l| serde_json::from_str(l).with_context(|| format!("line {l:?}")))
                .collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
