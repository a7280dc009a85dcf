//! In eBPF mode what stays in netfilter is small and fixed: the rule set
//! (as the backend itself saves it) is the same for 1 PU and for 100 PUs
//! with ACLs and exposed services, and no ipset exists at all (SPEC, "The
//! two datapaths").

use anyhow::Result;
use enforcer_tests::{
    agent::{Agent, Datapath},
    cgroup::Cgroup,
    netfilter::{self, Family},
    netns::{Netns, output_ok},
    privilege,
};

fn pus(cgroups: &[Cgroup]) -> String {
    cgroups
        .iter()
        .enumerate()
        .map(|(i, cg)| {
            let rel = cg.path().file_name().unwrap().to_string_lossy();
            format!(
                "[[pus]]\nid = \"pu-{i}\"\nkind = \"linux-process\"\ncgroup = \"{rel}\"\n\
                 proxy_port = 15001\nexposed_services = [{}]\n\
                 [[pus.application_acls]]\nnetworks = [\"10.{}.0.0/16\", \"fd00:{i:x}::/64\"]\n\
                 protocols = [\"tcp\", \"udp\"]\nports = [80, \"8000:8100\"]\naction = \"accept\"\n\
                 policy_id = \"p{i}\"\n\
                 [[pus.application_acls]]\nnetworks = [\"10.{}.1.0/24\"]\nprotocols = [\"any\"]\n\
                 action = \"reject\"\nlog = true\npolicy_id = \"r{i}\"\n",
                20_000 + i,
                i % 250,
                i % 250
            )
        })
        .collect()
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

#[test]
fn netfilter_rules_do_not_grow_with_pus_and_no_ipset_exists() -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let ns = Netns::new()?;
    let cgroups: Vec<Cgroup> = (0..100)
        .map(|_| Cgroup::new(&env.cgroup2))
        .collect::<Result<_>>()?;
    let config = |pus: &str| {
        format!("mode = \"local-server\"\n[networks]\ntarget_tcp = [\"10.200.0.0/16\"]\n{pus}")
    };
    let bin = env!("CARGO_BIN_EXE_agent");

    let one = Agent::start(bin, &ns, Datapath::Ebpf, &config(&pus(&cgroups[..1])))?;
    assert_eq!(one.status()?["datapath"]["kind"], "ebpf");
    // The same instance both times: the UDP trap rule names the instance's
    // pin path.
    let instance = one.instance().to_string();
    let with_one = netfilter_state(&ns)?;
    let sets = output_ok(ns.command("ipset")?.args(["list", "-n"]))?;
    assert_eq!(
        String::from_utf8_lossy(&sets.stdout).trim(),
        "",
        "no ipset in eBPF mode"
    );
    drop(one);

    let hundred = Agent::start_with(
        bin,
        &ns,
        Some(&instance),
        &["--datapath", Datapath::Ebpf.arg()],
        &config(&pus(&cgroups)),
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
    let sets = output_ok(ns.command("ipset")?.args(["list", "-n"]))?;
    assert_eq!(
        String::from_utf8_lossy(&sets.stdout).trim(),
        "",
        "no ipset in eBPF mode"
    );

    assert!(
        with_one.contains("NFQUEUE"),
        "the trap rule is there:\n{with_one}"
    );
    assert_eq!(
        with_one, with_hundred,
        "the netfilter rule set must not depend on the PUs"
    );
    Ok(())
}
