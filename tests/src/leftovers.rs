//! What a test run left on the machine. Every harness object carries
//! [`NAME_PREFIX`](crate::NAME_PREFIX); after a run, none may remain.
//! Tests run their agents in namespaces of their own, so the root network
//! namespace must hold no `TRI-` chain or set at all.
//!
//! Read-only: it lists directories and runs each flavour's `iptables-save`
//! and `ip6tables-save` (of every table, which creates none) and `ipset
//! list -n`, nothing else.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use enforcer::agent::InstanceName;
use enforcer::datapath::iptables::exec;

use crate::NAME_PREFIX;
use crate::netfilter::{Backend, Family};

/// Prefix of every chain and set the agent makes.
const AGENT_PREFIX: &str = "TRI-";

/// Harness objects left on the machine, as `kind: name` lines: namespaces,
/// cgroups, pins and pin directories, and control sockets whose names
/// carry the harness prefix; and any `TRI-` chain, hook rule or ipset in
/// the network namespace of the caller (`nettool leftovers` runs in the
/// root one).
pub fn find(cgroup2: &Path, bpffs: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let pin_root = bpffs.join("enforcer");
    for (kind, dir, suffix) in [
        ("netns", Path::new("/run/netns"), ""),
        ("cgroup", cgroup2, ""),
        // `<bpffs>/<instance>`, where the agent pinned before it had a
        // directory of its own, and `<bpffs>/enforcer/<instance>`.
        ("pin", bpffs, ""),
        ("pin", pin_root.as_path(), ""),
        (
            "control socket",
            Path::new(InstanceName::CONTROL_DIR),
            ".sock",
        ),
    ] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(NAME_PREFIX) && name.ends_with(suffix) {
                found.push(format!("{kind}: {}", dir.join(name).display()));
            }
        }
    }
    found.extend(agent_netfilter()?);
    Ok(found)
}

/// `TRI-` chains, rules that jump to them from other chains, and `TRI-`
/// ipsets in the calling thread's network namespace, in either iptables
/// flavour.
fn agent_netfilter() -> Result<Vec<String>> {
    let mut found = Vec::new();
    for backend in Backend::ALL {
        for family in [Family::V4, Family::V6] {
            let tool = *exec::tools(backend).save.get(family);
            let dump = output(&mut Command::new(tool))?;
            found.extend(agent_rules(&dump).map(|item| format!("netfilter ({tool}): {item}")));
        }
    }
    let sets = output(Command::new(exec::IPSET).args(["list", "-n"]))?;
    found.extend(
        sets.lines()
            .filter(|name| name.starts_with(AGENT_PREFIX))
            .map(|name| format!("ipset: {name}")),
    );
    Ok(found)
}

/// From an `iptables-save` dump: each `TRI-` chain, and each rule of
/// another chain that mentions one (the agent's hooks); rules inside a
/// `TRI-` chain go with it.
fn agent_rules(dump: &str) -> impl Iterator<Item = String> + '_ {
    dump.lines().filter_map(|line| {
        if let Some(declared) = line.strip_prefix(':') {
            let chain = declared.split_whitespace().next().unwrap_or(declared);
            return chain
                .starts_with(AGENT_PREFIX)
                .then(|| format!("chain {chain}"));
        }
        let rule = line.strip_prefix("-A ")?;
        let in_agent_chain = rule.starts_with(AGENT_PREFIX);
        (!in_agent_chain && rule.contains(AGENT_PREFIX)).then(|| format!("rule -A {rule}"))
    })
}

/// Runs a read-only tool; its stdout, or an error naming it.
fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed non-UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_rules_lists_chains_and_hooks_only() {
        let dump = "*mangle\n:OUTPUT ACCEPT [0:0]\n:TRI-App - [0:0]\n:KUBE-X - [0:0]\n\
                    -A OUTPUT -j KUBE-X\n-A OUTPUT -m set ! --match-set TRI-v4-Excluded dst -j TRI-App\n\
                    -A TRI-App -j ACCEPT\nCOMMIT\n";
        let found: Vec<String> = agent_rules(dump).collect();
        assert_eq!(
            found,
            [
                "chain TRI-App",
                "rule -A OUTPUT -m set ! --match-set TRI-v4-Excluded dst -j TRI-App",
            ]
        );
        assert_eq!(
            agent_rules("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").count(),
            0
        );
    }
}
