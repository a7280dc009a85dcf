//! THROWAWAY smoke test of the iptables datapath (to be deleted).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use enforcer::datapath::iptables::IptablesDatapath;
use enforcer::datapath::{Datapath, DatapathSettings};
use enforcer::policy::*;
use enforcer_common::marks::MarkLayout;
use enforcer_tests::{
    cgroup::Cgroup,
    netfilter::{self, Family},
    netns::TwoHosts,
    nettool, privilege,
    traffic::{Outcome, TcpEchoServer, run_nettool},
};

fn acl(nets: &[String], ports: &[u16], action: Action, id: &str) -> Acl {
    Acl {
        networks: nets.iter().map(|n| n.parse().unwrap()).collect(),
        protocols: vec![Protocol::Tcp],
        ports: ports
            .iter()
            .map(|&p| PortRange::new(p, p).unwrap())
            .collect(),
        action,
        log: true,
        observe: ObserveMode::None,
        policy_id: PolicyId::new(id).unwrap(),
    }
}

#[test]
fn smoke() -> Result<()> {
    let env = privilege::require().unwrap();
    let hosts = TwoHosts::new()?;
    let cg = Cgroup::new(&env.cgroup2)?;
    let cg_rel = cg
        .path()
        .strip_prefix(&env.cgroup2)?
        .to_str()
        .unwrap()
        .to_owned();
    let b4 = hosts.b_end.v4;
    let b6 = hosts.b_end.v6;
    let a4 = hosts.a_end.v4;
    let a6 = hosts.a_end.v6;
    let _e1 = TcpEchoServer::start(&hosts.b, SocketAddr::new(b4, 7000))?;
    let _e2 = TcpEchoServer::start(&hosts.b, SocketAddr::new(b4, 7001))?;
    let _e3 = TcpEchoServer::start(&hosts.b, SocketAddr::new(b6, 7000))?;
    let _e4 = TcpEchoServer::start(&hosts.b, SocketAddr::new(b6, 7001))?;
    // A server "of the PU" on a (port set 8080).
    let _s1 = TcpEchoServer::start(&hosts.a, SocketAddr::new(a4, 8080))?;
    let _s2 = TcpEchoServer::start(&hosts.a, SocketAddr::new(a6, 8080))?;
    let _s3 = TcpEchoServer::start(&hosts.a, SocketAddr::new(a4, 8081))?;

    let settings = DatapathSettings {
        mode: Mode::LocalServer,
        queues: QueueSettings::default(),
        marks: MarkLayout::default(),
        cgroup2: env.cgroup2.clone(),
        pin_dir: PathBuf::from("/nonexistent"),
    };
    let b_nets = vec![format!("{b4}/32"), format!("{b6}/128")];
    let pu0 = Pu {
        id: PuId::new("web").unwrap(),
        kind: PuKind::LinuxProcess {
            cgroup: CgroupPath::new(cg_rel.clone()).unwrap(),
        },
        labels: Default::default(),
        tcp_ports: vec![PortRange::new(8080, 8080).unwrap()],
        udp_ports: vec![],
        application_acls: vec![acl(&b_nets, &[7000], Action::Accept, "allow-7000")],
        network_acls: vec![acl(&b_nets, &[8080], Action::Accept, "allow-in-8080")],
        proxy_port: None,
        dns_proxy_port: None,
        dependent_services: vec![],
        exposed_services: vec![],
    };
    let pu1 = Pu {
        application_acls: vec![
            acl(&b_nets, &[7000], Action::Reject, "deny-7000"),
            acl(&b_nets, &[7000, 7001], Action::Accept, "allow-both"),
        ],
        network_acls: vec![],
        ..pu0.clone()
    };
    let in_pu = |to: SocketAddr| -> Result<Outcome> {
        let mut cmd = cg.command_in(&hosts.a, nettool!())?;
        cmd.args(["tcp-exchange", &to.to_string()]);
        run_nettool(cmd)
    };
    let outside = |to: SocketAddr| -> Result<Outcome> {
        let mut cmd = hosts.a.command(nettool!())?;
        cmd.args(["tcp-exchange", &to.to_string()]);
        run_nettool(cmd)
    };
    let from_b = |to: SocketAddr| -> Result<Outcome> {
        let mut cmd = hosts.b.command(nettool!())?;
        cmd.args(["tcp-exchange", &to.to_string()]);
        run_nettool(cmd)
    };

    let mut dp = IptablesDatapath::new(settings)?;
    let nets = NetworkSettings {
        target_tcp: vec!["10.99.0.0/16".parse()?, "fd99::/16".parse()?],
        target_udp: vec!["10.99.0.0/16".parse()?],
        excluded: vec![],
    };
    hosts.a.run(|| -> Result<()> {
        dp.run()?;
        dp.run()?; // idempotent
        dp.set_target_networks(&nets)?;
        dp.configure(0, &pu0)?;
        Ok(())
    })??;
    eprintln!("{}", netfilter::save(&hosts.a, Family::V4, "mangle")?);
    for (b, fam) in [(b4, "v4"), (b6, "v6")] {
        assert_eq!(
            in_pu(SocketAddr::new(b, 7000))?,
            Outcome::Exchanged,
            "{fam} pu->7000 allowed"
        );
        assert!(
            in_pu(SocketAddr::new(b, 7001))?.is_blocked(),
            "{fam} pu->7001 blocked"
        );
        assert_eq!(
            outside(SocketAddr::new(b, 7001))?,
            Outcome::Exchanged,
            "{fam} outside untouched"
        );
    }
    assert_eq!(
        from_b(SocketAddr::new(a4, 8080))?,
        Outcome::Exchanged,
        "b->pu:8080 allowed"
    );
    assert_eq!(
        from_b(SocketAddr::new(a6, 8080))?,
        Outcome::Exchanged,
        "b->pu:8080 v6 allowed"
    );
    assert_eq!(
        from_b(SocketAddr::new(a4, 8081))?,
        Outcome::Exchanged,
        "b->8081 not the PU"
    );
    let c = hosts.a.run(|| dp.counters())??;
    eprintln!("counters after configure: {c:?}");

    // Update: 7000 now rejected (reject bucket first), 7001 accepted.
    hosts.a.run(|| dp.update(1, &pu1, &pu0))??;
    for (b, fam) in [(b4, "v4"), (b6, "v6")] {
        assert!(
            in_pu(SocketAddr::new(b, 7000))?.is_blocked(),
            "{fam} 7000 now blocked"
        );
        assert_eq!(
            in_pu(SocketAddr::new(b, 7001))?,
            Outcome::Exchanged,
            "{fam} 7001 now allowed"
        );
    }
    assert!(
        from_b(SocketAddr::new(a4, 8080))?.is_blocked(),
        "no net ACL any more"
    );

    // Target networks now include b: the PU's SYN is trapped; nothing
    // listens and --queue-bypass lets it through.
    let nets2 = NetworkSettings {
        target_tcp: vec![format!("{b4}/32").parse()?],
        ..nets.clone()
    };
    hosts.a.run(|| dp.set_target_networks(&nets2))??;
    assert_eq!(
        in_pu(SocketAddr::new(b4, 7000))?,
        Outcome::Exchanged,
        "target: trapped + bypass"
    );
    let c = hosts.a.run(|| dp.counters())??;
    eprintln!("counters after trap: {c:?}");
    assert!(c.per_pu["web"].trapped >= 1);
    assert!(c.per_pu["web"].dropped >= 1);
    assert!(c.per_pu["web"].accepted >= 1);
    eprintln!(
        "SAVE-C-V4:\n{}",
        netfilter::save(&hosts.a, Family::V4, "mangle")?
    );

    // A configure that fails in iptables (missing cgroup) leaves nothing.
    let bad = Pu {
        id: PuId::new("ghost").unwrap(),
        kind: PuKind::LinuxProcess {
            cgroup: CgroupPath::new("enft-no-such-cgroup").unwrap(),
        },
        ..pu0.clone()
    };
    let before = hosts.a.run(|| {
        std::process::Command::new("ipset")
            .args(["list", "-n"])
            .output()
    })??;
    let err = hosts.a.run(|| dp.configure(0, &bad))?.unwrap_err();
    eprintln!("bad configure: {err:#}");
    let after = hosts.a.run(|| {
        std::process::Command::new("ipset")
            .args(["list", "-n"])
            .output()
    })??;
    assert_eq!(
        before.stdout, after.stdout,
        "sets restored after failed configure"
    );
    assert!(!netfilter::save(&hosts.a, Family::V4, "mangle")?.contains("TRI-App-ghos"));
    assert!(!netfilter::save(&hosts.a, Family::V6, "mangle")?.contains("TRI-App-ghos"));

    hosts.a.run(|| -> Result<()> {
        dp.delete(1, &pu1)?;
        dp.delete(1, &pu1)?;
        Ok(())
    })??;
    assert_eq!(
        in_pu(SocketAddr::new(b4, 7001))?,
        Outcome::Exchanged,
        "deleted: untouched"
    );
    let v4 = netfilter::save(&hosts.a, Family::V4, "mangle")?;
    assert!(
        !v4.contains("TRI-App-web") && v4.contains("TRI-Pid-App"),
        "{v4}"
    );

    hosts.a.run(|| dp.configure(0, &pu0))??;
    hosts.a.run(|| dp.cleanup())??;
    for (fam, table) in [
        (Family::V4, "mangle"),
        (Family::V4, "nat"),
        (Family::V6, "mangle"),
        (Family::V6, "nat"),
    ] {
        let s = netfilter::save(&hosts.a, fam, table)?;
        assert!(!s.contains("TRI-"), "{s}");
    }
    let sets = hosts.a.run(|| {
        std::process::Command::new("ipset")
            .args(["list", "-n"])
            .output()
    })??;
    assert!(
        sets.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&sets.stdout)
    );
    Ok(())
}

/// The verdict contract: accept = kind Authorised + NF_REPEAT. A trapped
/// SYN-ACK and a UDP handshake datagram must each be queued once.
#[test]
fn verdict_contract() -> Result<()> {
    use enforcer_common::marks::Kind;
    use enforcer_tests::traffic::{UdpReceiver, udp_send};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::Duration;

    let env = privilege::require().unwrap();
    let hosts = TwoHosts::new()?;
    let cg = Cgroup::new(&env.cgroup2)?;
    let cg_rel = cg
        .path()
        .strip_prefix(&env.cgroup2)?
        .to_str()
        .unwrap()
        .to_owned();
    let b4 = hosts.b_end.v4;
    let a4 = hosts.a_end.v4;
    let _e1 = TcpEchoServer::start(&hosts.b, SocketAddr::new(b4, 7000))?;
    let rx = UdpReceiver::start(&hosts.a, SocketAddr::new(a4, 5353))?;
    let marks = MarkLayout::default();
    let settings = DatapathSettings {
        mode: Mode::LocalServer,
        queues: QueueSettings {
            bypass: false,
            ..QueueSettings::default()
        },
        marks,
        cgroup2: env.cgroup2.clone(),
        pin_dir: PathBuf::from("/nonexistent"),
    };
    let pu = Pu {
        id: PuId::new("web").unwrap(),
        kind: PuKind::LinuxProcess {
            cgroup: CgroupPath::new(cg_rel).unwrap(),
        },
        labels: Default::default(),
        tcp_ports: vec![],
        udp_ports: vec![PortRange::new(5353, 5353).unwrap()],
        application_acls: vec![],
        network_acls: vec![],
        proxy_port: None,
        dns_proxy_port: None,
        dependent_services: vec![],
        exposed_services: vec![],
    };
    let mut dp = IptablesDatapath::new(settings)?;
    hosts.a.run(|| -> Result<()> {
        dp.run()?;
        dp.set_target_networks(&NetworkSettings::default())?; // everything
        dp.configure(0, &pu)?;
        Ok(())
    })??;

    let stop = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicU32::new(0));
    let (tx, ready) = std::sync::mpsc::channel();
    let (stop2, queued2) = (stop.clone(), queued.clone());
    let consumer = hosts.a.spawn(move || -> Result<()> {
        let mut q = nfq::Queue::open()?;
        for n in 0..32 {
            q.bind(n)?;
        }
        q.set_nonblocking(true);
        tx.send(()).ok();
        while !stop2.load(Ordering::Relaxed) {
            let mut msg = match q.recv() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let n = queued2.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "queued #{n} on queue {} mark {:#x}",
                msg.get_queue_num(),
                msg.get_nfmark()
            );
            msg.set_nfmark(marks.with_kind(msg.get_nfmark(), Kind::Authorised));
            msg.set_verdict(nfq::Verdict::Repeat);
            q.verdict(msg)?;
            if n > 50 {
                anyhow::bail!("looping");
            }
        }
        Ok(())
    })?;
    ready.recv_timeout(Duration::from_secs(5))?;

    // PU -> b: app SYN trapped (queue 0-3), b's SYN-ACK trapped by the
    // global rule (24-27), the ACK passes by connmark.
    let mut cmd = cg.command_in(&hosts.a, nettool!())?;
    cmd.args(["tcp-exchange", &SocketAddr::new(b4, 7000).to_string()]);
    assert_eq!(run_nettool(cmd)?, Outcome::Exchanged);
    let tcp = queued.load(Ordering::Relaxed);
    // b -> PU: a UDP datagram carrying the signature, trapped once by the
    // global signature rule.
    let payload = b"hello n30njxq7bmiwr6dtxq world";
    let sent = hosts
        .b
        .run(|| udp_send(None, SocketAddr::new(a4, 5353), payload))?;
    assert_eq!(sent, Outcome::Exchanged);
    assert!(
        rx.wait_for(payload, Duration::from_secs(3)).is_some(),
        "datagram delivered"
    );
    std::thread::sleep(Duration::from_millis(200));
    let total = queued.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap()??;
    eprintln!("{}", netfilter::save(&hosts.a, Family::V4, "mangle")?);
    assert_eq!(tcp, 2, "SYN and SYN-ACK, once each");
    assert_eq!(total, 3, "plus the UDP handshake datagram, once");
    hosts.a.run(|| dp.cleanup())??;
    Ok(())
}
