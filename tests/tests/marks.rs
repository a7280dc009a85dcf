//! The mark layout beside kube-proxy (issue 5; SPEC, "Marks"): the agent's
//! marks live in its own field and leave kube-proxy's masquerade
//! (`0x4000`) and drop (`0x8000`) bits alone — on both datapaths, IPv4,
//! with the default field and with a moved one (`[marks] shift`). And a
//! packet carrying the agent's injected kind is never trapped (SPEC,
//! "Global steering"), on both datapaths and in both families.
//!
//! On eBPF, a PU's process cannot set the agent's mark kinds on its own
//! sockets, even as root (CAP_NET_ADMIN): the `cgroup/setsockopt` guard
//! refuses the `SO_MARK` with EPERM, and kube-proxy's bits stay settable;
//! a socket marked where the guard cannot see it (a host service's, before
//! its `bind`) is refused at `sendto` by the sendmsg hook.
//! The iptables datapath has no such guard (README, "Not enforced yet").
//!
//! Kube-proxy-like rules are installed in host `a` before the agent: raw
//! OUTPUT sets both bits on the packets of the PU's peers (as kube-proxy
//! marks service traffic before the agent's mangle chains), mangle
//! POSTROUTING ORs them into the connection mark too, and counting rules
//! there see what left after the agent's chains.

use std::time::Duration;

use anyhow::{Context as _, Result};
use enforcer_common::marks::{Class, Kind, MarkLayout};
use enforcer_tests::{
    agent::Datapath,
    cgroup::Cgroup,
    config::{Acl, Config, Pu},
    netfilter::{self, Family},
    nettool, privilege,
    traffic::{Outcome, TcpEchoServer, UdpReceiver, run_nettool},
    world::{ACL_PEER, OTHER, PORT, Peer, PuWorld, TARGET},
};

/// kube-proxy's masquerade and drop bits.
const KUBE_MASQ: u32 = 0x4000;
const KUBE_DROP: u32 = 0x8000;
const KUBE: u32 = KUBE_MASQ | KUBE_DROP;

enforcer_tests::on_both_datapaths!(
    kube_proxy_bits_survive_beside_the_default_field,
    kube_proxy_bits_survive_beside_a_moved_field,
    injected_packets_are_never_trapped_v4,
    injected_packets_are_never_trapped_v6,
);

mod ebpf_guard {
    enforcer_tests::matrix_tests!([
        a_pu_cannot_set_the_agents_mark_kinds,
        a_mark_set_before_a_socket_is_a_pus_does_not_skip_the_trap
    ](enforcer_tests::agent::Datapath::Ebpf));
}

/// One PU whose ACL accepts [`ACL_PEER`] (TCP and UDP, port 7000);
/// [`TARGET`]'s networks are the TCP and UDP targets; the field at `shift`
/// (none: the default).
fn config(cgroup: &Cgroup, shift: Option<u32>) -> String {
    let mut config = Config::local_server()
        .target_tcp(TARGET.nets)
        .target_udp(TARGET.nets)
        .pu(Pu::process_of("web", cgroup).application_acl(
            Acl::accept("to-acl-peer", ACL_PEER.nets)
                .tcp([PORT])
                .udp([PORT]),
        ));
    if let Some(shift) = shift {
        config = config.mark_shift(shift);
    }
    config.to_toml()
}

fn kube_proxy_bits_survive_beside_the_default_field(datapath: Datapath) -> Result<()> {
    beside_kube_proxy(datapath, None)
}

fn kube_proxy_bits_survive_beside_a_moved_field(datapath: Datapath) -> Result<()> {
    beside_kube_proxy(datapath, Some(16))
}

fn beside_kube_proxy(datapath: Datapath, shift: Option<u32>) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let family = Family::V4;
    let layout =
        MarkLayout::new(shift.unwrap_or(enforcer_common::marks::DEFAULT_SHIFT)).context("shift")?;
    assert_eq!(
        layout.field_mask() & KUBE,
        0,
        "the test's field must avoid kube-proxy's bits"
    );
    let w = PuWorld::new(&env, family, &[TARGET, ACL_PEER, OTHER])?;
    let _servers = [TARGET, ACL_PEER, OTHER]
        .map(|p| TcpEchoServer::start(&w.hosts.b, w.addr(p)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;

    let kind = layout.kind_mask();
    let authorised = layout.kind(Kind::Authorised);
    // How the agent remembers an ACL's accept: the connection's kind on
    // iptables, the socket's class (so every packet's mark) on eBPF.
    let acl_accepted = match datapath {
        Datapath::Ebpf => format!(
            "-m mark --mark {:#x}/{:#x}",
            layout.class(Class::AclAccept),
            layout.class_mask()
        ),
        _ => format!(
            "-m connmark --mark {:#x}/{kind:#x}",
            layout.kind(Kind::ExternalAccepted)
        ),
    };
    let (target, acl_peer) = (w.ip(TARGET), w.ip(ACL_PEER));
    let rules = format!(
        "*raw\n\
         -A OUTPUT -d {target} -j MARK --or-mark {KUBE:#x}\n\
         -A OUTPUT -d {acl_peer} -j MARK --or-mark {KUBE:#x}\n\
         COMMIT\n\
         *mangle\n\
         -A POSTROUTING -d {target} -m comment --comment target-out -m connmark --mark {authorised:#x}/{kind:#x}\n\
         -A POSTROUTING -d {target} -m comment --comment target-kube-and-agent -m mark --mark {KUBE_MASQ:#x}/{KUBE_MASQ:#x} -m mark --mark {KUBE_DROP:#x}/{KUBE_DROP:#x} -m connmark --mark {authorised:#x}/{kind:#x}\n\
         -A POSTROUTING -d {acl_peer} -m comment --comment acl-out -m mark --mark 0x0/0x0\n\
         -A POSTROUTING -d {acl_peer} -m comment --comment acl-kube-and-agent -m mark --mark {KUBE:#x}/{KUBE:#x} {acl_accepted}\n\
         -A POSTROUTING -d {target} -j CONNMARK --or-mark {KUBE:#x}\n\
         -A POSTROUTING -d {acl_peer} -j CONNMARK --or-mark {KUBE:#x}\n\
         COMMIT\n"
    );
    netfilter::restore(&w.hosts.a, family, &rules)?;
    let agent = w.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&w.cgroup, shift),
    )?;

    let connect = |peer: Peer| -> Result<Outcome> {
        let mut cmd = w.cgroup.command_in(&w.hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &w.addr(peer).to_string()]);
        run_nettool(cmd)
    };
    // The agent's decisions, unchanged by the foreign bits.
    assert_eq!(connect(TARGET)?, Outcome::Exchanged, "{}", agent.log());
    assert_eq!(
        w.kernel_queued()?,
        3,
        "the target's handshake (SYN, SYN-ACK, first ACK) is trapped, once"
    );
    assert_eq!(connect(TARGET)?, Outcome::Exchanged);
    assert_eq!(w.kernel_queued()?, 6, "each connection's handshake, once");
    assert_eq!(connect(ACL_PEER)?, Outcome::Exchanged);
    assert!(connect(OTHER)?.is_blocked());
    assert_eq!(w.kernel_queued()?, 6, "ACL peers are not trapped");

    // Every packet that left for the target in a connection the agent
    // authorised (it decides one at its first ACK: from then on, and a
    // packet that raced that verdict out may not be counted) carried
    // kube-proxy's bits beside the agent's kind; every one for the ACL
    // peer carried them beside the agent's accept.
    let count = |comment: &str| netfilter::packets(&w.hosts.a, family, "mangle", comment);
    let (target_out, target_both) = (count("target-out")?, count("target-kube-and-agent")?);
    let (acl_out, acl_both) = (count("acl-out")?, count("acl-kube-and-agent")?);
    eprintln!(
        "{datapath:?} shift {shift:?}: to the target {target_both}/{target_out}, \
         to the ACL peer {acl_both}/{acl_out} packets with both marks"
    );
    // At least the first ACK and the FIN of each connection.
    assert!(target_out >= 4 && acl_out >= 3, "{target_out} {acl_out}");
    assert_eq!(target_both, target_out, "to the target");
    assert_eq!(acl_both, acl_out, "to the ACL peer");

    // The connection marks hold kube-proxy's bits beside the agent's kind,
    // and the agent's kind only in its own field.
    let out = enforcer_tests::netns::output_ok(w.hosts.a.command("conntrack")?.args([
        "-L",
        "-f",
        "ipv4",
        "-d",
        &target.to_string(),
    ]))?;
    let listing = String::from_utf8(out.stdout)?;
    let marks: Vec<u32> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("mark=")))
        .filter_map(|m| m.parse().ok())
        .collect();
    assert!(!marks.is_empty(), "{listing}");
    for mark in marks {
        assert_eq!(mark & KUBE, KUBE, "kube-proxy's bits: {mark:#x}");
        assert_eq!(mark & kind, authorised, "the agent's kind: {mark:#x}");
        assert_eq!(
            mark & !(KUBE | layout.field_mask()),
            0,
            "nothing outside the two: {mark:#x}"
        );
    }
    Ok(())
}

fn injected_packets_are_never_trapped_v4(datapath: Datapath) -> Result<()> {
    injected_packets_are_never_trapped(datapath, Family::V4)
}

fn injected_packets_are_never_trapped_v6(datapath: Datapath) -> Result<()> {
    injected_packets_are_never_trapped(datapath, Family::V6)
}

/// A UDP datagram to the target whose socket carries the injected kind is
/// not queued and arrives; one without it is trapped. To [`OTHER`] (no
/// ACL) the injected one arrives too. The marked datagrams are sent from
/// the PU's host but outside its cgroup, as the agent's own are: the
/// agent's injected packets never come from a PU's task (and on eBPF a
/// PU's task cannot set the kind, [`a_pu_cannot_set_the_agents_mark_kinds`]).
fn injected_packets_are_never_trapped(datapath: Datapath, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = PuWorld::new(&env, family, &[TARGET, OTHER])?;
    let target = UdpReceiver::start(&w.hosts.b, w.addr(TARGET))?;
    let other = UdpReceiver::start(&w.hosts.b, w.addr(OTHER))?;
    let agent = w.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&w.cgroup, None),
    )?;
    let injected = MarkLayout::default().kind(Kind::Injected);
    let send = |to: &UdpReceiver, payload: &str, mark: Option<u32>| -> Result<Outcome> {
        let mut cmd = w.hosts.a.command(nettool!())?;
        cmd.args(["udp-send", &to.addr().to_string(), "--payload", payload]);
        if let Some(mark) = mark {
            cmd.args(["--mark", &mark.to_string()]);
        }
        run_nettool(cmd)
    };
    let wait = Duration::from_secs(2);

    assert_eq!(
        send(&target, "injected", Some(injected))?,
        Outcome::Exchanged
    );
    assert!(
        target.wait_for(b"injected", wait).is_some(),
        "{}",
        agent.log()
    );
    assert_eq!(
        w.kernel_queued()?,
        0,
        "the injected datagram is not trapped"
    );
    // Even with a trap class beside the kind (as a hook would have given
    // a connected socket): the fixed OUTPUT rule accepts it first.
    let classed = MarkLayout::default().with_class(injected, Class::TrapUdp);
    assert_eq!(
        send(&target, "injected-classed", Some(classed))?,
        Outcome::Exchanged
    );
    assert!(target.wait_for(b"injected-classed", wait).is_some());
    assert_eq!(
        w.kernel_queued()?,
        0,
        "the classed injected datagram is not trapped"
    );
    assert_eq!(
        send(&other, "injected-other", Some(injected))?,
        Outcome::Exchanged
    );
    assert!(
        other.wait_for(b"injected-other", wait).is_some(),
        "the injected datagram is accepted whatever its destination"
    );

    // The same from a connected socket: `connect()` judges it on eBPF.
    let mut flow = w.udp_flow(nettool!(), w.addr(TARGET))?;
    assert_eq!(flow.send("plain")?, None);
    assert!(target.wait_for(b"plain", wait).is_some());
    assert_eq!(
        w.kernel_queued()?,
        1,
        "without the mark, the flow is trapped"
    );
    Ok(())
}

/// On eBPF, a process of the PU (root, so holding CAP_NET_ADMIN) that
/// tries to put the agent's injected or authorised kind on its socket
/// with `SO_MARK` gets EPERM, and what it sends is judged as without the
/// mark: UDP to the ACL peer still goes out (unmarked: the `udp-send`
/// client gives up at the refused `setsockopt`), a TCP connection to a
/// peer no ACL accepts is still refused, one to the target still trapped.
/// kube-proxy's bits outside the field stay the PU's to set.
fn a_pu_cannot_set_the_agents_mark_kinds(datapath: Datapath) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let family = Family::V4;
    let w = PuWorld::new(&env, family, &[TARGET, ACL_PEER, OTHER])?;
    let _servers = [TARGET, OTHER]
        .map(|p| TcpEchoServer::start(&w.hosts.b, w.addr(p)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let acl_peer = UdpReceiver::start(&w.hosts.b, w.addr(ACL_PEER))?;
    let agent = w.start(
        env!("CARGO_BIN_EXE_agent"),
        datapath,
        &config(&w.cgroup, None),
    )?;
    let layout = MarkLayout::default();
    let wait = Duration::from_secs(2);
    let udp = |payload: &str, mark: u32| -> Result<Outcome> {
        let mut cmd = w.cgroup.command_in(&w.hosts.a, nettool!())?;
        cmd.args([
            "udp-send",
            &acl_peer.addr().to_string(),
            "--payload",
            payload,
        ]);
        cmd.args(["--mark", &mark.to_string()]);
        run_nettool(cmd)
    };
    let tcp = |peer: Peer, mark: u32| -> Result<Outcome> {
        let mut cmd = w.cgroup.command_in(&w.hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &w.addr(peer).to_string()]);
        cmd.args(["--mark", &mark.to_string()]);
        run_nettool(cmd)
    };

    // kube-proxy's bit: set, and the datagram the ACL accepts arrives.
    assert_eq!(
        udp("kube", KUBE_MASQ)?,
        Outcome::Exchanged,
        "{}",
        agent.log()
    );
    assert!(acl_peer.wait_for(b"kube", wait).is_some());
    for (name, kind) in [
        ("injected", Kind::Injected),
        ("authorised", Kind::Authorised),
    ] {
        let mark = layout.kind(kind);
        // The ACL accepts the peer, so the only refusal is the guard's.
        assert_eq!(
            udp(name, mark)?,
            Outcome::Refused,
            "SO_MARK {mark:#x} ({name}) is refused with EPERM"
        );
        assert_eq!(
            udp(name, mark | KUBE_MASQ)?,
            Outcome::Refused,
            "SO_MARK {mark:#x} with kube-proxy's bit ({name}) is refused"
        );
        assert!(
            acl_peer
                .wait_for(name.as_bytes(), Duration::from_millis(300))
                .is_none(),
            "nothing was sent from the socket the mark was refused on"
        );
        assert!(
            tcp(OTHER, mark)?.is_blocked(),
            "a connection to a peer no ACL accepts is still refused ({name})"
        );
    }
    // A class the agent did not write is refused too.
    let classed = layout.class(Class::AclAccept);
    assert_eq!(udp("classed", classed)?, Outcome::Refused);
    assert!(tcp(OTHER, classed)?.is_blocked());

    // To the target, with the authorised kind tried: trapped as ever.
    let queued = w.kernel_queued()?;
    assert_eq!(
        tcp(TARGET, layout.kind(Kind::Authorised))?,
        Outcome::Exchanged
    );
    assert_eq!(
        w.kernel_queued()? - queued,
        3,
        "the connection's handshake is trapped (SYN, SYN-ACK, first ACK)"
    );
    // And kube-proxy's bits on a TCP socket leave the agent's decisions.
    assert!(tcp(OTHER, KUBE_MASQ)?.is_blocked());
    assert_eq!(tcp(TARGET, KUBE_MASQ)?, Outcome::Exchanged);
    Ok(())
}

/// A host-service PU's socket is the PU's from its `bind` on: an
/// `SO_MARK` set before that is no PU's to the `cgroup/setsockopt` guard
/// (README), as is a socket marked before its task joined a PU's cgroup
/// or passed in over `SCM_RIGHTS`. The sendmsg and connect hooks close
/// what that leaves: a PU's socket carrying one of the agent's kinds is
/// refused, so the datagram neither skips the trap (the injected kind is
/// accepted first in OUTPUT) nor leaves at all. eBPF only: on iptables a
/// PU's `SO_MARK` is not guarded (README, "Not enforced yet").
fn a_mark_set_before_a_socket_is_a_pus_does_not_skip_the_trap(datapath: Datapath) -> Result<()> {
    const SERVICE_PORT: u16 = 8080;
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let w = PuWorld::new(&env, Family::V4, &[TARGET])?;
    let target = UdpReceiver::start(&w.hosts.b, w.addr(TARGET))?;
    let config = Config::local_server()
        .target_tcp(TARGET.nets)
        .target_udp(TARGET.nets)
        .host_scope(&w.cgroup)
        .pu(Pu::host_service("service").udp_ports([SERVICE_PORT]));
    let agent = w.start(env!("CARGO_BIN_EXE_agent"), datapath, &config.to_toml())?;
    let injected = MarkLayout::default().kind(Kind::Injected);
    let queued = w.kernel_queued()?;
    let mut cmd = w.cgroup.command_in(&w.hosts.a, nettool!())?;
    cmd.args([
        "udp-send",
        &target.addr().to_string(),
        "--payload",
        "marked-before-bind",
        "--mark",
        &injected.to_string(),
        "--sport",
        &SERVICE_PORT.to_string(),
    ]);
    let outcome = run_nettool(cmd)?;
    let arrived = target
        .wait_for(b"marked-before-bind", Duration::from_secs(1))
        .is_some();
    let trapped = w.kernel_queued()? > queued;
    assert!(
        trapped || !arrived,
        "the service's datagram to the target left untrapped \
         (send: {outcome:?})\n{}",
        agent.log()
    );
    Ok(())
}
