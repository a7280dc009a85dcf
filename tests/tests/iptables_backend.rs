//! The iptables flavour the agent uses (SPEC, "The two datapaths"; issue 5
//! item 6), against the real tools: in a fresh network namespace holding
//! some other user's rules in one flavour, the agent detects that flavour
//! the way kube-proxy's iptables-wrapper does, says so in its log and in
//! `status`, and puts every rule of its own there — the iptables
//! datapath's and the eBPF datapath's fixed ones. The other flavour is
//! never touched: its whole save (every table that exists) is the same
//! before, during and after. A setting (`[iptables] backend`) or the flag
//! `--iptables-backend` wins over the detection. When the agent stops, its
//! chains are gone and the other user's rules are still there.

use anyhow::Result;
use enforcer::datapath::iptables::exec;
use enforcer_tests::{
    agent::Agent,
    cgroup::Cgroup,
    netfilter::{self, Backend, Family},
    netns::Netns,
    privilege,
};
use nix::sys::signal::Signal;

/// Someone else's rules: two in the filter table.
const FOREIGN: &str = "*filter\n\
                       :INPUT ACCEPT [0:0]\n\
                       -A INPUT -p tcp --dport 9 -j ACCEPT\n\
                       -A INPUT -p udp --dport 9 -j ACCEPT\n\
                       COMMIT\n";

/// What kubelet leaves in the flavour it uses: a chain, no rule.
const KUBELET_HINT: &str = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";

/// One case: what each flavour holds before the agent starts, how the
/// agent is run, and what it must choose and say.
struct Case {
    nft: Option<&'static str>,
    legacy: Option<&'static str>,
    datapath: &'static str,
    flag: Option<&'static str>,
    setting: Option<&'static str>,
    chosen: Backend,
    reason: &'static str,
}

#[test]
fn legacy_rules_make_the_agent_use_legacy() -> Result<()> {
    check(Case {
        nft: None,
        legacy: Some(FOREIGN),
        datapath: "iptables",
        flag: None,
        setting: None,
        chosen: Backend::Legacy,
        reason: "auto: 2 legacy rules, 0 nft rules",
    })
}

#[test]
fn nft_rules_make_the_agent_use_nft() -> Result<()> {
    check(Case {
        nft: Some(FOREIGN),
        legacy: None,
        datapath: "iptables",
        flag: None,
        setting: None,
        chosen: Backend::Nft,
        reason: "auto: 0 legacy rules, 2 nft rules",
    })
}

#[test]
fn kubelets_hint_chain_wins_over_rule_counts() -> Result<()> {
    check(Case {
        nft: Some(KUBELET_HINT),
        legacy: Some(FOREIGN),
        datapath: "iptables",
        flag: None,
        setting: None,
        chosen: Backend::Nft,
        reason: "auto: kubelet's hint chain is in nf_tables",
    })
}

#[test]
fn the_flag_overrides_the_detection() -> Result<()> {
    check(Case {
        nft: None,
        legacy: Some(FOREIGN),
        datapath: "iptables",
        flag: Some("nft"),
        setting: None,
        chosen: Backend::Nft,
        reason: "nft was asked for (--iptables-backend)",
    })
}

#[test]
fn the_setting_overrides_the_detection() -> Result<()> {
    check(Case {
        nft: Some(FOREIGN),
        legacy: None,
        datapath: "iptables",
        flag: None,
        setting: Some("legacy"),
        chosen: Backend::Legacy,
        reason: "legacy was asked for (iptables.backend)",
    })
}

#[test]
fn ebpfs_fixed_rules_follow_the_detected_flavour() -> Result<()> {
    check(Case {
        nft: None,
        legacy: Some(FOREIGN),
        datapath: "ebpf",
        flag: None,
        setting: None,
        chosen: Backend::Legacy,
        reason: "auto: 2 legacy rules, 0 nft rules",
    })
}

fn other(backend: Backend) -> Backend {
    match backend {
        Backend::Nft => Backend::Legacy,
        Backend::Legacy => Backend::Nft,
    }
}

/// Every table of `backend` in both families, counters stripped.
fn dump(ns: &Netns, backend: Backend) -> Result<String> {
    let mut all = String::new();
    for family in [Family::V4, Family::V6] {
        all += &format!("## {backend} {family:?}\n");
        all += &netfilter::save_all(ns, backend, family)?;
    }
    Ok(all)
}

fn check(case: Case) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let ns = Netns::new()?;
    let cgroup = Cgroup::new(&env.cgroup2)?;
    for (backend, text) in [(Backend::Nft, case.nft), (Backend::Legacy, case.legacy)] {
        if let Some(text) = text {
            let tool = *exec::tools(backend).restore.get(Family::V4);
            netfilter::feed(&ns, tool, &["--noflush", "--wait"], text)?;
        }
    }
    let (chosen, untouched) = (case.chosen, other(case.chosen));
    let before = dump(&ns, untouched)?;
    let mut config = format!(
        "mode = \"local-server\"\n\
         [networks]\n\
         target_tcp = [\"10.1.0.0/24\"]\n\
         [[pus]]\n\
         id = \"web\"\n\
         kind = \"linux-process\"\n\
         cgroup = \"{}\"\n\
         [[pus.application_acls]]\n\
         networks = [\"10.2.0.0/16\"]\n\
         protocols = [\"tcp\"]\n\
         ports = [7000]\n\
         action = \"accept\"\n\
         policy_id = \"p\"\n",
        cgroup.path().file_name().unwrap().to_string_lossy()
    );
    if let Some(setting) = case.setting {
        config += &format!("[iptables]\nbackend = \"{setting}\"\n");
    }
    let mut args = vec!["--datapath", case.datapath];
    if let Some(flag) = case.flag {
        args.extend(["--iptables-backend", flag]);
    }
    let bin = env!("CARGO_BIN_EXE_agent");
    let mut agent = Agent::start_with(bin, &ns, None, &args, &config, |_| {})?;

    let status = agent.status()?;
    let iptables = &status["datapath"]["iptables"];
    assert_eq!(
        iptables["backend"].as_str(),
        Some(chosen.as_str()),
        "{status:#}"
    );
    assert_eq!(iptables["reason"].as_str(), Some(case.reason), "{status:#}");
    let logged = format!("iptables backend: {chosen} ({})", case.reason);
    assert!(
        agent.log().contains(&logged),
        "{logged:?} in:\n{}",
        agent.log()
    );

    let ours = dump(&ns, chosen)?;
    for chain in [":TRI-App ", ":TRI-Net "] {
        assert!(ours.contains(chain), "{chain} in {chosen}:\n{ours}");
    }
    if case.datapath == "iptables" {
        assert!(ours.contains("-m cgroup --path"), "the PU's hook:\n{ours}");
    }
    assert_eq!(
        dump(&ns, untouched)?,
        before,
        "the {untouched} flavour must not be touched"
    );

    assert!(agent.stop_with(Signal::SIGTERM)?.success());
    let after = dump(&ns, chosen)?;
    assert!(!after.contains("TRI-"), "left behind:\n{after}");
    if case.nft.or(case.legacy) == Some(FOREIGN) {
        let holder = match case.nft {
            Some(_) => Backend::Nft,
            None => Backend::Legacy,
        };
        let kept = dump(&ns, holder)?;
        assert!(
            kept.contains("-A INPUT -p udp -m udp --dport 9 -j ACCEPT"),
            "the other user's rules stay:\n{kept}"
        );
    }
    assert_eq!(dump(&ns, untouched)?, before);
    Ok(())
}
