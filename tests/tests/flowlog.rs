//! Flow logs on each datapath: a PU with a logged accept ACL and a logged
//! reject ACL makes one accepted and one rejected connection; the
//! configured flow-log file gets one line for each, with the PU, the
//! policy id, the action and the destination (SPEC, "Observable
//! behaviour": a decision is logged with its PU, policy id and action).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    netns::TwoHosts,
    nettool, privilege,
    traffic::{Outcome, TcpEchoServer, run_nettool},
};

const PORT: u16 = 7000;
/// The target network: `b`'s end of the veth.
const TARGET_NET: &str = "10.1.0.0/24";
/// Accepted and logged.
const ALLOWED: &str = "10.2.0.2";
const ALLOWED_NET: &str = "10.2.0.0/16";
/// Rejected and logged.
const DENIED: &str = "10.3.0.2";
const DENIED_NET: &str = "10.3.0.0/16";

#[test]
fn ebpf_logs_accepted_and_rejected_connections() -> Result<()> {
    logs_accepted_and_rejected_connections(Datapath::Ebpf)
}

#[test]
fn iptables_logs_accepted_and_rejected_connections() -> Result<()> {
    logs_accepted_and_rejected_connections(Datapath::Iptables)
}

fn logs_accepted_and_rejected_connections(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let hosts = TwoHosts::new()?;
    let mut servers = Vec::new();
    for (addr, net) in [(ALLOWED, ALLOWED_NET), (DENIED, DENIED_NET)] {
        hosts.b.ip(&[
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            &hosts.b_end.ifname,
        ])?;
        hosts
            .a
            .ip(&["route", "add", net, "dev", &hosts.a_end.ifname])?;
        let peer = SocketAddr::new(addr.parse()?, PORT);
        servers.push(TcpEchoServer::start(&hosts.b, peer)?);
    }
    let cgroup = Cgroup::new(&env.cgroup2)?;
    let cgroup_rel = cgroup
        .path()
        .file_name()
        .context("cgroup dir name")?
        .to_string_lossy()
        .into_owned();
    let dir = tempdir()?;
    let log = dir.join("flows.log");
    let config = format!(
        "mode = \"local-server\"
[networks]
target_tcp = [\"{TARGET_NET}\"]
[flow_log]
output = \"{}\"
[[pus]]
id = \"web\"
kind = \"linux-process\"
cgroup = \"{cgroup_rel}\"
[[pus.application_acls]]
networks = [\"{ALLOWED_NET}\"]
protocols = [\"tcp\"]
ports = [{PORT}]
action = \"accept\"
log = true
policy_id = \"allow-peer\"
[[pus.application_acls]]
networks = [\"{DENIED_NET}\"]
protocols = [\"tcp\"]
ports = [{PORT}]
action = \"reject\"
log = true
policy_id = \"deny-other\"
",
        log.display()
    );
    let agent = Agent::start_with(
        env!("CARGO_BIN_EXE_agent"),
        &hosts.a,
        None,
        &["--datapath", datapath.arg()],
        &config,
        |cmd| datapath.prepare(cmd),
    )?;
    let connect = |addr: &str| -> Result<Outcome> {
        let mut cmd = cgroup.command_in(&hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &format!("{addr}:{PORT}")]);
        run_nettool(cmd)
    };
    assert_eq!(connect(ALLOWED)?, Outcome::Exchanged, "accept ACL");
    let blocked = connect(DENIED)?;
    assert!(blocked.is_blocked(), "reject ACL: blocked, got {blocked:?}");

    let lines = wait_for_lines(&log, 2, Duration::from_secs(10))?;
    let find = |action: &str, dst: &str, policy: &str| {
        let matching: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["action"] == action && l["dst"] == format!("{dst}:{PORT}"))
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "one {action} line for {dst} in {lines:#?}\nagent log:\n{}",
            agent.log()
        );
        let line = matching[0];
        assert_eq!(line["pu"], "web", "{line}");
        assert_eq!(line["policy_id"], policy, "{line}");
        assert_eq!(line["protocol"], "tcp", "{line}");
        assert_eq!(line["direction"], "app", "{line}");
        assert_eq!(line["observe"], "none", "{line}");
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    };
    find("accept", ALLOWED, "allow-peer");
    find("reject", DENIED, "deny-other");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A fresh directory for the flow log.
fn tempdir() -> Result<std::path::PathBuf> {
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
fn wait_for_lines(path: &Path, count: usize, within: Duration) -> Result<Vec<serde_json::Value>> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() >= count || start.elapsed() > within {
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
