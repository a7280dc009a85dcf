//! The network side of a PU's policy, on both datapaths and both families:
//! connections *to* a PU's listening port are judged by the source — the
//! excluded networks untouched, the target networks trapped, the network
//! ACLs for everyone else, and the rest dropped — while ports of no PU are
//! left alone (SPEC, "Order of evaluation inside a PU", incoming).
//!
//! Host `a` runs the agent and a server on the PU's port 8080 (and on 9090,
//! no PU's port); host `b` connects from one source address per role.

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    netfilter::{self, Family},
    netns::TwoHosts,
    privilege,
    traffic::{Outcome, TcpEchoServer, tcp_exchange_from},
};

const PU_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;

macro_rules! matrix {
    ($($name:ident),+ $(,)?) => {
        mod ebpf {
            mod v4 { $(#[test] fn $name() -> anyhow::Result<()> { super::super::$name(super::super::Datapath::Ebpf, super::super::Family::V4) })+ }
            mod v6 { $(#[test] fn $name() -> anyhow::Result<()> { super::super::$name(super::super::Datapath::Ebpf, super::super::Family::V6) })+ }
        }
        mod iptables {
            mod v4 { $(#[test] fn $name() -> anyhow::Result<()> { super::super::$name(super::super::Datapath::Iptables, super::super::Family::V4) })+ }
            mod v6 { $(#[test] fn $name() -> anyhow::Result<()> { super::super::$name(super::super::Datapath::Iptables, super::super::Family::V6) })+ }
        }
    };
}

matrix!(connections_to_a_pu_port_are_judged_by_their_source);

/// Source addresses on host `b`, per role and family.
fn source(family: Family, role: u8) -> IpAddr {
    let text = match family {
        Family::V4 => format!("10.{role}.0.2"),
        Family::V6 => format!("fd00:{role}::2"),
    };
    text.parse().expect("literal address")
}

const TARGET: u8 = 1;
const ACL_PEER: u8 = 2;
const OTHER: u8 = 3;
const EXCLUDED: u8 = 9;

fn config(cgroup: &str) -> String {
    format!(
        "mode = \"local-server\"\n\
         [networks]\n\
         target_tcp = [\"10.1.0.0/24\", \"fd00:1::/64\"]\n\
         target_udp = [\"10.1.0.0/24\", \"fd00:1::/64\"]\n\
         excluded = [\"10.9.0.0/16\", \"fd00:9::/64\"]\n\
         [[pus]]\n\
         id = \"web\"\n\
         kind = \"linux-process\"\n\
         cgroup = \"{cgroup}\"\n\
         tcp_ports = [{PU_PORT}]\n\
         [[pus.network_acls]]\n\
         networks = [\"10.2.0.0/16\", \"fd00:2::/64\"]\n\
         protocols = [\"tcp\"]\n\
         ports = [{PU_PORT}]\n\
         action = \"accept\"\n\
         policy_id = \"from-acl-peer\"\n"
    )
}

fn connections_to_a_pu_port_are_judged_by_their_source(
    datapath: Datapath,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let hosts = TwoHosts::new()?;
    let plen = match family {
        Family::V4 => "32",
        Family::V6 => "128",
    };
    for role in [ACL_PEER, OTHER, EXCLUDED] {
        let src = source(family, role).to_string();
        hosts.b.ip(&[
            "addr",
            "add",
            &format!("{src}/{plen}"),
            "dev",
            &hosts.b_end.ifname,
            "nodad",
        ])?;
        hosts.a.ip(&[
            "route",
            "add",
            &format!("{src}/{plen}"),
            "dev",
            &hosts.a_end.ifname,
        ])?;
    }
    let server_ip = hosts.a_end.ip(family);
    let _pu_server = TcpEchoServer::start(&hosts.a, SocketAddr::new(server_ip, PU_PORT))?;
    let _other_server = TcpEchoServer::start(&hosts.a, SocketAddr::new(server_ip, OTHER_PORT))?;
    let cgroup = Cgroup::new(&env.cgroup2)?;
    let rel = cgroup
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let agent = Agent::start(
        env!("CARGO_BIN_EXE_agent"),
        &hosts.a,
        datapath,
        &config(&rel),
    )?;
    assert_eq!(agent.status()?["datapath"]["kind"], datapath.expected());

    let connect = |role: u8, port: u16| -> Result<Outcome> {
        let (from, to) = (source(family, role), SocketAddr::new(server_ip, port));
        hosts.b.run(|| tcp_exchange_from(Some(from), to, b"ping"))
    };
    let queued = || -> Result<u64> {
        Ok(netfilter::queue_stats(&hosts.a)?
            .iter()
            .map(|q| u64::from(q.id_sequence))
            .sum())
    };
    assert_eq!(
        connect(ACL_PEER, PU_PORT)?,
        Outcome::Exchanged,
        "network ACL accepts"
    );
    let blocked = connect(OTHER, PU_PORT)?;
    assert!(blocked.is_blocked(), "no ACL: blocked, got {blocked:?}");
    assert_eq!(
        connect(EXCLUDED, PU_PORT)?,
        Outcome::Exchanged,
        "excluded: untouched"
    );
    assert_eq!(
        connect(OTHER, OTHER_PORT)?,
        Outcome::Exchanged,
        "not a PU port: untouched"
    );
    assert_eq!(queued()?, 0, "nothing trapped yet");
    assert_eq!(
        connect(TARGET, PU_PORT)?,
        Outcome::Exchanged,
        "target: trapped, accepted"
    );
    assert_eq!(
        queued()?,
        1,
        "only the SYN from the target network reaches user space"
    );
    Ok(())
}
