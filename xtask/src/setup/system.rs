//! System-level steps: the user, apt packages, the bpffs and cgroup v2
//! mounts.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::{Host, Outcome};
use crate::cmd;

/// Debian packages the agent and the kernel tests run.
const APT_PACKAGES: [&str; 4] = ["iptables", "ipset", "conntrack", "iproute2"];

/// Where the agent pins its maps and programs.
const BPFFS: &str = "/sys/fs/bpf";

/// Reads what every step needs to know about the host, and prints who we
/// are running as.
pub fn inspect() -> Result<Host> {
    let uid = nix::unistd::geteuid();
    let root = uid.is_root();
    if root {
        println!("  ok       user: root");
    } else {
        println!("  note     user: uid {uid}, not root; apt and mount fixes will need root");
    }
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(Host { root, mounts })
}

pub fn apt_packages(host: &Host) -> Result<Outcome> {
    let mut missing = Vec::new();
    for package in APT_PACKAGES {
        if !dpkg_installed(package)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(Outcome::Ready(format!(
            "{} installed",
            APT_PACKAGES.join(", ")
        )));
    }
    let names = missing.join(" ");
    if !host.root {
        return Ok(Outcome::NeedsRoot {
            missing: format!("{names} not installed"),
            fix: format!("apt-get update && apt-get install -y {names}"),
        });
    }
    println!("  ...      apt packages: installing {names}");
    cmd::run(apt_get().arg("update"))?;
    cmd::run(apt_get().args(["install", "-y"]).args(&missing))?;
    Ok(Outcome::Fixed(format!("installed {names}")))
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Whether dpkg lists `package` as installed. A package dpkg has never
/// heard of makes dpkg-query exit 1: that is "not installed", not an error.
fn dpkg_installed(package: &str) -> Result<bool> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context(
            "cannot run dpkg-query: setup installs system packages only on Debian-like systems",
        )?;
    let status = String::from_utf8_lossy(&output.stdout);
    Ok(output.status.success() && status.split_whitespace().last() == Some("installed"))
}

pub fn bpffs(host: &Host) -> Result<Outcome> {
    if mount_points(&host.mounts, "bpf").any(|point| point == BPFFS) {
        return Ok(Outcome::Ready(format!("mounted at {BPFFS}")));
    }
    let mut mount = Command::new("mount");
    mount.args(["-t", "bpf", "bpf", BPFFS]);
    if !host.root {
        return Ok(Outcome::NeedsRoot {
            missing: format!("not mounted at {BPFFS}"),
            fix: cmd::describe(&mount),
        });
    }
    cmd::run(&mut mount)?;
    Ok(Outcome::Fixed(format!("mounted at {BPFFS}")))
}

/// cgroup v2 is where PU cgroups and cgroup programs live. It is mounted at
/// `/sys/fs/cgroup` on unified hosts and `/sys/fs/cgroup/unified` on hybrid
/// ones; setup only reports where.
pub fn cgroup2(host: &Host) -> Result<Outcome> {
    match mount_points(&host.mounts, "cgroup2").next() {
        Some(point) => Ok(Outcome::Ready(format!("mounted at {point}"))),
        None => bail!(
            "no cgroup2 file system is mounted (see /proc/self/mounts); \
             the eBPF datapath and the kernel tests need cgroup v2"
        ),
    }
}

/// Mount points of file systems of type `fs_type` in `/proc/self/mounts`
/// text (`device mount-point type options …` per line).
fn mount_points<'a>(mounts: &'a str, fs_type: &'a str) -> impl Iterator<Item = &'a str> {
    mounts.lines().filter_map(move |line| {
        let mut fields = line.split_whitespace().skip(1);
        let point = fields.next()?;
        (fields.next()? == fs_type).then_some(point)
    })
}

#[cfg(test)]
mod tests {
    use super::mount_points;

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
";

    #[test]
    fn finds_mount_points_by_exact_type() {
        assert_eq!(
            mount_points(HYBRID, "cgroup2").collect::<Vec<_>>(),
            ["/sys/fs/cgroup/unified"]
        );
        assert_eq!(
            mount_points(HYBRID, "bpf").collect::<Vec<_>>(),
            ["/sys/fs/bpf"]
        );
        assert_eq!(mount_points(HYBRID, "cgroup").count(), 1);
        assert_eq!(mount_points("", "bpf").count(), 0);
    }
}
