//! Flow logs on each datapath and in each address family: one line per
//! logged decision, with the same fields on both datapaths (SPEC,
//! "Observable behaviour": a decision is logged with its PU, policy id
//! and action; "Order of evaluation inside a PU": the final drop logs).
//!
//! The world: host `a` runs the agent and one PU (a cgroup of the test's
//! own) listening on [`PU_PORT`]; host `b` holds one address per role and
//! family, each serving TCP [`PORT`]. The target networks are the veth's,
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
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::Family,
    netns::TwoHosts,
    nettool, privilege,
    traffic::{Outcome, TcpEchoServer, run_nettool, tcp_exchange_from},
};
use serde_json::Value;

/// The peers' service on `b` (app side).
const PORT: u16 = 7000;
/// The PU's listening port on `a` (net side).
const PU_PORT: u16 = 8080;

/// A peer's role on `b`: the second octet of its IPv4 address, the second
/// group of its IPv6 one (`10.<n>.0.2`, `fd00:<n>::2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    AclPeer = 2,
    Other = 3,
    Denied = 4,
}

impl Role {
    fn ip(self, family: Family) -> IpAddr {
        let n = self as u8;
        let text = match family {
            Family::V4 => format!("10.{n}.0.2"),
            Family::V6 => format!("fd00:{n}::2"),
        };
        text.parse().expect("literal address")
    }

    fn net(self, family: Family) -> String {
        let n = self as u8;
        match family {
            Family::V4 => format!("10.{n}.0.0/16"),
            Family::V6 => format!("fd00:{n}::/64"),
        }
    }
}

macro_rules! on_both_datapaths_and_families {
    ($($name:ident),+ $(,)?) => {
        on_both_datapaths_and_families!(@datapaths [$($name),+] ebpf Ebpf, iptables Iptables);
    };
    (@datapaths $names:tt $($module:ident $datapath:ident),+) => {
        $(mod $module {
            on_both_datapaths_and_families!(@families $names $datapath);
        })+
    };
    (@families [$($name:ident),+] $datapath:ident) => {
        mod v4 {
            $(#[test] fn $name() -> anyhow::Result<()> {
                crate::$name(crate::Datapath::$datapath, crate::Family::V4)
            })+
        }
        mod v6 {
            $(#[test] fn $name() -> anyhow::Result<()> {
                crate::$name(crate::Datapath::$datapath, crate::Family::V6)
            })+
        }
    };
}

on_both_datapaths_and_families!(acl_observe_and_final_drop_decisions_are_logged);

/// Every role's network, both families, as a real config lists them.
fn nets(role: Role) -> [String; 2] {
    [role.net(Family::V4), role.net(Family::V6)]
}

fn config(cgroup: &str, log: &Path) -> String {
    Config::local_server()
        .target_tcp(["10.1.0.0/24", "fd00:1::/64"])
        // An empty list would mean every network.
        .target_udp(["10.1.0.0/24", "fd00:1::/64"])
        .flow_log_file(log)
        .pu(Pu::process("web", cgroup)
            .tcp_ports([PU_PORT])
            .application_acl(
                Acl::reject("watch-peer", nets(Role::AclPeer))
                    .tcp([PORT])
                    .observe_continue(),
            )
            .application_acl(
                Acl::accept("allow-peer", nets(Role::AclPeer))
                    .tcp([PORT])
                    .log(),
            )
            .application_acl(
                Acl::reject("deny-other", nets(Role::Denied))
                    .tcp([PORT])
                    .log(),
            )
            .network_acl(
                Acl::accept("from-peer", nets(Role::AclPeer))
                    .tcp([PU_PORT])
                    .log(),
            ))
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
    let hosts = TwoHosts::new()?;
    let (flag, plen) = match family {
        Family::V4 => ("-4", "32"),
        Family::V6 => ("-6", "128"),
    };
    let mut servers = Vec::new();
    for role in [Role::AclPeer, Role::Other, Role::Denied] {
        let ip = role.ip(family);
        let host = format!("{ip}/{plen}");
        let mut add = vec![flag, "addr", "add", &host, "dev", &hosts.b_end.ifname];
        if family == Family::V6 {
            add.push("nodad");
        }
        hosts.b.ip(&add)?;
        hosts
            .a
            .ip(&[flag, "route", "add", &host, "dev", &hosts.a_end.ifname])?;
        servers.push(TcpEchoServer::start(&hosts.b, SocketAddr::new(ip, PORT))?);
    }
    let pu_addr = SocketAddr::new(hosts.a_end.ip(family), PU_PORT);
    let _pu_server = TcpEchoServer::start(&hosts.a, pu_addr)?;
    let cgroup = Cgroup::new(&env.cgroup2)?;
    let cgroup_rel = cgroup
        .path()
        .file_name()
        .context("cgroup dir name")?
        .to_string_lossy()
        .into_owned();
    let dir = tempdir()?;
    let log = dir.join("flows.log");
    let agent = Agent::start(
        env!("CARGO_BIN_EXE_agent"),
        &hosts.a,
        datapath,
        &config(&cgroup_rel, &log),
    )?;
    assert_eq!(agent.status()?["datapath"]["kind"], datapath.expected());

    let pu_connects = |role: Role| -> Result<Outcome> {
        let mut cmd = cgroup.command_in(&hosts.a, nettool!())?;
        cmd.args([
            "tcp-exchange",
            &SocketAddr::new(role.ip(family), PORT).to_string(),
        ]);
        run_nettool(cmd)
    };
    let connects_to_pu = |role: Role| -> Result<Outcome> {
        let from = role.ip(family);
        hosts
            .b
            .run(|| tcp_exchange_from(Some(from), pu_addr, b"ping"))
    };
    assert_eq!(
        pu_connects(Role::AclPeer)?,
        Outcome::Exchanged,
        "the accept ACL decides, the observed reject does not"
    );
    let denied = pu_connects(Role::Denied)?;
    assert!(denied.is_blocked(), "reject ACL: got {denied:?}");
    let other = pu_connects(Role::Other)?;
    assert!(other.is_blocked(), "final drop: got {other:?}");
    for payload in ["first", "second"] {
        let mut cmd = cgroup.command_in(&hosts.a, nettool!())?;
        let to = SocketAddr::new(Role::Other.ip(family), PORT).to_string();
        cmd.args(["udp-send", &to, "--payload", payload]);
        let sent = run_nettool(cmd)?;
        assert!(sent.is_blocked(), "UDP final drop: got {sent:?}");
    }
    assert_eq!(
        connects_to_pu(Role::AclPeer)?,
        Outcome::Exchanged,
        "network accept ACL"
    );
    let other_in = connects_to_pu(Role::Other)?;
    assert!(other_in.is_blocked(), "net final drop: got {other_in:?}");

    let peer = |role: Role| SocketAddr::new(role.ip(family), PORT);
    let app = |policy_id, action, observe, role| Expected {
        count: 1,
        protocol: "tcp",
        policy_id,
        action,
        observe,
        dst: peer(role),
        direction: "app",
        src_ip: None,
        // The ACL peer's connection is the one let through (the observed
        // reject only watches it).
        leaves: matches!(role, Role::AclPeer),
    };
    let net = |policy_id, action, role: Role| Expected {
        count: 1,
        protocol: "tcp",
        policy_id,
        action,
        observe: "none",
        dst: pu_addr,
        direction: "net",
        src_ip: Some(role.ip(family)),
        leaves: false,
    };
    let expected = [
        app("watch-peer", "reject", "observe-continue", Role::AclPeer),
        app("allow-peer", "accept", "none", Role::AclPeer),
        app("deny-other", "reject", "none", Role::Denied),
        app("default", "reject", "none", Role::Other),
        Expected {
            count: 2,
            protocol: "udp",
            ..app("default", "reject", "none", Role::Other)
        },
        net("from-peer", "accept", Role::AclPeer),
        net("default", "reject", Role::Other),
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
            sources.push(check_src(datapath, family, &hosts, want, line));
        }
        sources.sort();
        sources.dedup();
        assert_eq!(sources.len(), want.count, "one line per flow: {sources:?}");
    }
    // The observed reject and the accept are one connection: one source.
    let accepted_sources: Vec<&Value> = lines
        .iter()
        .filter(|l| l["direction"] == "app" && l["dst"] == peer(Role::AclPeer).to_string())
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
