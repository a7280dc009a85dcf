//! What the kernel holds for a datapath inside the host namespace: the
//! memory of its ipsets and the number of netfilter rules. (The agent's
//! own memory and its BPF maps are read from its process:
//! [`super::agent::Agent::rss_bytes`], [`super::agent::Agent::map_memlock`].)

use anyhow::{Context as _, Result};
use enforcer::sandbox::netns::{Netns, output_ok};

/// The sum of ipset's "Size in memory" over every set in `ns`.
pub fn ipset_memory(ns: &Netns) -> Result<u64> {
    let mut cmd = ns.command("ipset")?;
    cmd.args(["list", "-t"]);
    let out = output_ok(&mut cmd)?;
    sum_set_sizes(&String::from_utf8_lossy(&out.stdout))
}

fn sum_set_sizes(listing: &str) -> Result<u64> {
    listing
        .lines()
        .filter_map(|l| l.strip_prefix("Size in memory:"))
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .with_context(|| format!("ipset printed a size of {v:?}"))
        })
        .sum()
}

/// Rules (`-A` lines) in every table of both families in `ns`.
pub fn rule_count(ns: &Netns) -> Result<u64> {
    let mut total = 0;
    for tool in ["iptables-save", "ip6tables-save"] {
        let mut cmd = ns.command(tool)?;
        let out = output_ok(&mut cmd)?;
        total += String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count() as u64;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_sizes_are_summed() {
        let listing = "Name: a\nType: hash:net\nSize in memory: 456\nReferences: 1\n\
                       Name: b\nType: bitmap:port\nSize in memory: 8360\n";
        assert_eq!(sum_set_sizes(listing).unwrap(), 8816);
        assert_eq!(sum_set_sizes("").unwrap(), 0);
        assert!(sum_set_sizes("Size in memory: lots\n").is_err());
    }
}
