//! The kernel's own statistics of the NFQUEUE queues bound in the calling
//! thread's network namespace (`/proc/thread-self/net/netfilter/nfnetlink_queue`).
//!
//! `/proc/thread-self` rather than `/proc/self`: the file shows the
//! namespace of the reading thread, and only a thread of the agent is
//! sure to be in the agent's namespace.

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

const PATH: &str = "/proc/thread-self/net/netfilter/nfnetlink_queue";

/// One bound queue, as the kernel counts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelQueueStats {
    pub queue: u16,
    /// Netlink port id of the bound listener.
    pub peer_portid: u32,
    /// Packets waiting for a verdict.
    pub waiting: u32,
    /// 0 none, 1 metadata only, 2 packet.
    pub copy_mode: u8,
    pub copy_range: u32,
    /// Dropped (or, fail-open, accepted) because the queue was full.
    pub queue_dropped: u32,
    /// Dropped because the listener's socket buffer was full.
    pub user_dropped: u32,
    /// Packet ids handed out: the number of packets ever queued.
    pub id_sequence: u32,
}

/// Every queue bound in this thread's namespace; none when the
/// nfnetlink_queue module is not loaded (the file is then absent).
pub fn read() -> Result<Vec<KernelQueueStats>> {
    match std::fs::read_to_string(PATH) {
        Ok(text) => parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {PATH}")),
    }
}

fn parse(text: &str) -> Result<Vec<KernelQueueStats>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(parse_line)
        .collect()
}

/// `queue peer_portid waiting copy_mode copy_range queue_dropped
/// user_dropped id_sequence 1` (net/netfilter/nfnetlink_queue.c, seq_show).
fn parse_line(line: &str) -> Result<KernelQueueStats> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        bail!("short line in {PATH}: {line:?}");
    }
    let field = |i: usize| -> Result<u32> {
        fields[i]
            .parse()
            .with_context(|| format!("field {} of {line:?} in {PATH}", i + 1))
    };
    let narrow = |i: usize| -> Result<u16> {
        u16::try_from(field(i)?).with_context(|| format!("field {} of {line:?}", i + 1))
    };
    Ok(KernelQueueStats {
        queue: narrow(0)?,
        peer_portid: field(1)?,
        waiting: field(2)?,
        copy_mode: u8::try_from(narrow(3)?).context("copy mode")?,
        copy_range: field(4)?,
        queue_dropped: field(5)?,
        user_dropped: field(6)?,
        id_sequence: field(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        let text = "    0 3891231234     0 2   128     0     0        5  1\n\
                    31 3891231234     2 2   128     1     3       17  1\n";
        let stats = parse(text).unwrap();
        assert_eq!(stats.len(), 2);
        assert_eq!(
            stats[1],
            KernelQueueStats {
                queue: 31,
                peer_portid: 3_891_231_234,
                waiting: 2,
                copy_mode: 2,
                copy_range: 128,
                queue_dropped: 1,
                user_dropped: 3,
                id_sequence: 17,
            }
        );
        assert!(parse("").unwrap().is_empty());
        assert!(parse("1 2 3").is_err());
        assert!(parse("70000 1 0 2 128 0 0 0 1").is_err());
    }
}
