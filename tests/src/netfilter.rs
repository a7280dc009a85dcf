//! Netfilter state inside a test namespace: rules loaded with
//! `iptables-restore --noflush`, their packet counters (found by comment),
//! and the kernel's NFQUEUE statistics.

use anyhow::{Context as _, Result};
use enforcer::{datapath::iptables::exec, trap::KernelQueueStats};

use crate::netns::{Netns, output_ok};

/// IPv4 or IPv6: the crate's one family type.
pub use enforcer::policy::IpFamily as Family;

/// Appends rules to a namespace with the agent's own executor
/// (`iptables-restore --noflush`): `rules` is restore-file text
/// (`*mangle`, `-A …`, `COMMIT`).
pub fn restore(ns: &Netns, family: Family, rules: &str) -> Result<()> {
    ns.run(|| exec::restore(family, rules))?
        .with_context(|| format!("loading rules:\n{rules}"))
}

/// `iptables-save -c` of one table (any table, not only the agent's)
/// inside the namespace.
pub fn save(ns: &Netns, family: Family, table: &str) -> Result<String> {
    let out = output_ok(
        ns.command(exec::TOOLS.save.get(family))?
            .args(["-c", "-t", table]),
    )?;
    Ok(String::from_utf8(out.stdout)?)
}

/// Packets counted by the one rule whose comment is `comment`.
pub fn packets(ns: &Netns, family: Family, table: &str, comment: &str) -> Result<u64> {
    let dump = save(ns, family, table)?;
    counter_of(&dump, comment)
        .with_context(|| format!("no rule with comment {comment:?} in:\n{dump}"))
}

/// Parses `[packets:bytes] -A … --comment X …` lines of `iptables-save -c`.
fn counter_of(dump: &str, comment: &str) -> Option<u64> {
    let quoted = format!("--comment {comment} ");
    let quoted2 = format!("--comment \"{comment}\" ");
    dump.lines()
        .find(|l| l.contains(&quoted) || l.contains(&quoted2))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(':').next())
        .and_then(|n| n.parse().ok())
}

/// The kernel's statistics of every queue bound in the namespace, read
/// with the agent's own reader from a thread inside it.
pub fn queue_stats(ns: &Netns) -> Result<Vec<KernelQueueStats>> {
    ns.run(enforcer::trap::read_kernel_stats)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counter_by_comment() {
        let dump = "*mangle\n:OUTPUT ACCEPT [0:0]\n\
                    [7:420] -A OUTPUT -m mark --mark 0xc0ffee -m comment --comment marked-syn -j ACCEPT\n\
                    [2:80] -A OUTPUT -m comment --comment \"other rule\" -j ACCEPT\nCOMMIT\n";
        assert_eq!(counter_of(dump, "marked-syn"), Some(7));
        assert_eq!(counter_of(dump, "other rule"), Some(2));
        assert_eq!(counter_of(dump, "absent"), None);
    }
}
