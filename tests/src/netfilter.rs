//! Netfilter state inside a test namespace: rules loaded with
//! `iptables-restore --noflush`, their packet counters (found by comment),
//! and the kernel's NFQUEUE statistics.

use std::{io::Write as _, process::Stdio};

use anyhow::{Context as _, Result, bail};

use crate::netns::{Netns, output_ok};

/// IPv4 or IPv6: the crate's one family type.
pub use enforcer::policy::IpFamily as Family;

/// The family's netfilter tool: `iptables<suffix>` or `ip6tables<suffix>`.
fn tool(family: Family, suffix: &str) -> String {
    match family {
        Family::V4 => format!("iptables{suffix}"),
        Family::V6 => format!("ip6tables{suffix}"),
    }
}

/// Appends rules to a namespace with `iptables-restore --noflush`:
/// `rules` is restore-file text (`*mangle`, `-A …`, `COMMIT`).
pub fn restore(ns: &Netns, family: Family, rules: &str) -> Result<()> {
    let mut child = ns
        .command(tool(family, "-restore"))?
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning iptables-restore")?;
    child
        .stdin
        .take()
        .context("iptables-restore stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}\n--- rules ---\n{rules}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `iptables-save -c` of one table inside the namespace.
pub fn save(ns: &Netns, family: Family, table: &str) -> Result<String> {
    let out = output_ok(ns.command(tool(family, "-save"))?.args(["-c", "-t", table]))?;
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

/// One line of `/proc/net/netfilter/nfnetlink_queue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    pub queue: u16,
    /// Packets waiting for a verdict.
    pub waiting: u32,
    /// Dropped because the queue was full.
    pub queue_dropped: u32,
    /// Dropped because the listener's socket buffer was full.
    pub user_dropped: u32,
    /// Packet ids handed out: the number of packets ever queued.
    pub id_sequence: u32,
}

/// The kernel's view of every bound queue in the namespace.
pub fn queue_stats(ns: &Netns) -> Result<Vec<QueueStats>> {
    // /proc/thread-self: the namespace of the reading thread, not of the
    // process's main thread.
    let text =
        ns.run(|| std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue"))??;
    text.lines().map(parse_queue_line).collect()
}

fn parse_queue_line(line: &str) -> Result<QueueStats> {
    let f: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad nfnetlink_queue line {line:?}"))?;
    if f.len() < 8 {
        bail!("short nfnetlink_queue line {line:?}");
    }
    // queue peer_portid queue_total copy_mode copy_range queue_dropped
    // user_dropped id_sequence 1
    Ok(QueueStats {
        queue: f[0] as u16,
        waiting: f[2] as u32,
        queue_dropped: f[5] as u32,
        user_dropped: f[6] as u32,
        id_sequence: f[7] as u32,
    })
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

    #[test]
    fn parses_queue_stats() {
        let q = parse_queue_line("    3  12345     0 2 65531     0     0       17  1").unwrap();
        assert_eq!(
            q,
            QueueStats {
                queue: 3,
                waiting: 0,
                queue_dropped: 0,
                user_dropped: 0,
                id_sequence: 17
            }
        );
        assert!(parse_queue_line("1 2 3").is_err());
    }
}
