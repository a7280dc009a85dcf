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
/// cgroups, pins and pin directories, control sockets and mounts whose
/// names carry the harness prefix; and any `TRI-` chain, hook rule or ipset in
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
    // The net_cls hierarchies tests mount (`crate::netcls`).
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [_, target, "cgroup", ..] = fields[..] else {
            continue;
        };
        let name = Path::new(target).file_name().unwrap_or_default();
        if name.to_string_lossy().starts_with(NAME_PREFIX) {
            found.push(format!("net_cls mount: {target}"));
        }
    }
    found.extend(agent_netfilter()?);
    Ok(found)
}

/// Removes what an earlier run that was killed (SIGKILL, a lost session)
/// left behind under `prefix`: objects named `<prefix><pid>x<n>` (see
/// `enforcer::sandbox::unique_name`) whose `<pid>` is no longer running.
/// Processes still inside them go first (a killed benchmark leaves its
/// agent and servers running in its namespaces and cgroups). Returns what
/// it removed, one `kind: path` line each; an object it could not remove
/// is an error naming it.
pub fn sweep_stale(prefix: &str, cgroup2: &Path, bpffs: &Path) -> Result<Vec<String>> {
    let stale = |name: &str| {
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            return false;
        };
        !Path::new("/proc").join(pid.to_string()).exists()
    };
    let names = |dir: &Path, suffix: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(suffix) && stale(name.trim_end_matches(suffix)))
            .collect()
    };
    let mut removed = Vec::new();
    for name in names(cgroup2, "") {
        let dir = cgroup2.join(&name);
        remove_cgroup_tree(&dir).with_context(|| format!("removing cgroup {}", dir.display()))?;
        removed.push(format!("cgroup: {}", dir.display()));
    }
    let netns_dir = Path::new("/run/netns");
    for name in names(netns_dir, "") {
        let pids = output(Command::new("ip").args(["netns", "pids", &name]))?;
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        output(Command::new("ip").args(["netns", "del", &name]))?;
        removed.push(format!("netns: {}", netns_dir.join(name).display()));
    }
    let pin_root = bpffs.join("enforcer");
    for name in names(&pin_root, "") {
        let dir = pin_root.join(name);
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        removed.push(format!("pin: {}", dir.display()));
    }
    let sockets = Path::new(InstanceName::CONTROL_DIR);
    for name in names(sockets, ".sock") {
        let path = sockets.join(name);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(format!("control socket: {}", path.display()));
    }
    Ok(removed)
}

/// Kills every process of a cgroup tree (`cgroup.kill`), waits until they
/// are gone, and removes the directories, deepest first.
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("cgroup.kill"), "1")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // `populated 0` in cgroup.events: no process in the whole subtree.
    while std::fs::read_to_string(dir.join("cgroup.events"))?
        .lines()
        .any(|line| line == "populated 1")
    {
        if std::time::Instant::now() > deadline {
            bail!("its processes did not end within 5 s of cgroup.kill");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    remove_dirs(dir)
}

fn remove_dirs(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_dirs(&entry.path())?;
        }
    }
    // A cgroup directory holds only the kernel's interface files, which
    // go with it: `rmdir`, never a recursive file removal.
    std::fs::remove_dir(dir)?;
    Ok(())
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

    /// A run "killed" earlier: objects named for a pid above `pid_max`
    /// (never alive), one with a process still inside; the sweep removes
    /// them all, and leaves a live run's (this process's) alone.
    #[test]
    fn sweep_removes_a_dead_runs_objects_and_nothing_else() {
        let Some(env) = crate::privilege::require() else {
            return;
        };
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let prefix = format!("{}sweep", crate::NAME_PREFIX);
        let dead = format!("{prefix}{}x0", pid_max + 1);
        let live = enforcer::sandbox::unique_name(&prefix);
        let cgroup = env.cgroup2.join(&dead);
        std::fs::create_dir_all(cgroup.join("pu0")).unwrap();
        let mut child = Command::new("sleep").arg("600").spawn().unwrap();
        std::fs::write(cgroup.join("pu0/cgroup.procs"), child.id().to_string()).unwrap();
        for name in [&dead, &live] {
            output(Command::new("ip").args(["netns", "add", name])).unwrap();
        }
        let pins = env.bpffs.join("enforcer").join(&dead);
        std::fs::create_dir_all(pins.join("maps")).unwrap();

        let removed = sweep_stale(&prefix, &env.cgroup2, &env.bpffs);
        let live_left = Path::new("/run/netns").join(&live).exists();
        let _ = output(Command::new("ip").args(["netns", "del", &live]));
        let removed = removed.unwrap();

        assert!(live_left, "the live run's namespace was removed");
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(!cgroup.exists() && !pins.exists());
        assert!(!Path::new("/run/netns").join(&dead).exists());
        let status = child.wait().unwrap();
        assert!(!status.success(), "the process inside was not killed");
    }

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
