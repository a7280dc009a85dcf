//! What the demo prints: the live table of its traffic and the agent's
//! counters, and the summary that checks them against each other.
//!
//! Pure functions of a [`Tally`] and an [`AgentView`], so they are tested
//! without a kernel.

use std::fmt::Write as _;

use super::traffic::Tally;
use super::world::{Kind, PU};
use crate::control::StatusReport;
use crate::datapath::PacketCounts;

/// The part of the agent's `status` the demo shows and checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentView {
    /// The demo PU's counters; `None` when the agent could not read them.
    pub pu: Option<PacketCounts>,
    /// The whole datapath's counters.
    pub total: Option<PacketCounts>,
    /// Packets the kernel ever queued to the agent: the sum of
    /// `id_sequence` over the bound queues.
    pub kernel_queued: u64,
    /// What the agent could not gather.
    pub problems: Vec<String>,
}

impl AgentView {
    pub fn new(report: &StatusReport) -> Self {
        Self {
            pu: report
                .counters
                .as_ref()
                .and_then(|c| c.per_pu.get(PU).copied()),
            total: report.counters.as_ref().map(|c| c.total),
            kernel_queued: report
                .kernel_queues
                .iter()
                .map(|q| u64::from(q.id_sequence))
                .sum(),
            problems: report.problems.clone(),
        }
    }
}

/// The live table: one row per kind, then the agent's counters (or why
/// they are missing).
pub fn table(
    elapsed: u64,
    datapath: &str,
    tally: &Tally,
    agent: Result<&AgentView, &str>,
) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "enforcer demo on {datapath}: {elapsed}s (Ctrl-C stops it)"
    );
    let _ = writeln!(
        w,
        "{:<12} {:<8} {:<14} {:<20} {:>6} {:>10} {:>8} {:>7}",
        "KIND", "FROM", "TO", "EXPECTED", "SENT", "CONNECTED", "BLOCKED", "FAILED"
    );
    for kind in Kind::ALL {
        let t = tally.of(kind);
        let from = if kind.in_pu() { "PU" } else { "outside" };
        let _ = writeln!(
            w,
            "{:<12} {:<8} {:<14} {:<20} {:>6} {:>10} {:>8} {:>7}",
            kind.name(),
            from,
            kind.peer().to_string(),
            kind.expected(),
            t.sent,
            t.connected,
            t.blocked,
            t.failed
        );
    }
    let _ = writeln!(w, "agent: {}", agent_counts(agent));
    out
}

/// The live table in one line, for a log rather than a terminal:
/// `sent/connected/blocked` per kind.
pub fn line(
    elapsed: u64,
    datapath: &str,
    tally: &Tally,
    agent: Result<&AgentView, &str>,
) -> String {
    let kinds: Vec<String> = Kind::ALL
        .iter()
        .map(|&kind| {
            let t = tally.of(kind);
            let failed = if t.failed > 0 {
                format!(" ({} failed)", t.failed)
            } else {
                String::new()
            };
            format!(
                "{} {}/{}/{}{failed}",
                kind.name(),
                t.sent,
                t.connected,
                t.blocked
            )
        })
        .collect();
    format!(
        "[{elapsed:>4}s] {datapath} | {} | {}",
        kinds.join(", "),
        agent_counts(agent)
    )
}

fn agent_counts(agent: Result<&AgentView, &str>) -> String {
    let view = match agent {
        Ok(view) => view,
        Err(why) => return format!("status unavailable: {why}"),
    };
    let pu = match view.pu {
        Some(c) => format!(
            "PU {PU} trapped {} accepted {} dropped {}",
            c.trapped, c.accepted, c.dropped
        ),
        None => format!(
            "PU {PU} counters unavailable ({})",
            view.problems.join("; ")
        ),
    };
    format!("{pu} | kernel queued {}", view.kernel_queued)
}

/// One thing the summary checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckItem {
    pub ok: bool,
    pub what: String,
}

/// Checks every kind's outcomes against the policy, and the agent's and
/// the kernel's trap counts against the connections made: trapped by the
/// agent for the PU = target connections, and nothing more trapped in
/// total (so 0 for the excluded and outside-PU connections); queued by
/// the kernel = what each connection's kind queues ([`Kind::queued`]).
pub fn check(tally: &Tally, agent: &AgentView) -> Vec<CheckItem> {
    let mut items = Vec::new();
    for kind in Kind::ALL {
        let t = tally.of(kind);
        let (n, verb) = if kind.connects() {
            (t.connected, "connected")
        } else {
            (t.blocked, "blocked")
        };
        let mut what = format!("{}: {n} of {} {verb}", kind.name(), t.sent);
        if let Some(why) = &t.last_failure {
            let _ = write!(what, "; {} failed, the last with: {why}", t.failed);
        }
        items.push(CheckItem {
            ok: t.sent > 0 && n == t.sent,
            what,
        });
    }
    let targets: u64 = Kind::ALL
        .iter()
        .filter(|kind| kind.trapped())
        .map(|&kind| tally.of(kind).sent)
        .sum();
    let mut equal = |label: &str, value: Option<u64>, note: &str| {
        let (ok, shown) = match value {
            Some(v) => (v == targets, v.to_string()),
            None => (false, format!("unknown ({})", agent.problems.join("; "))),
        };
        items.push(CheckItem {
            ok,
            what: format!("{label}: {shown}, target connections: {targets}{note}"),
        });
    };
    equal(
        &format!("trapped by the agent for PU {PU}"),
        agent.pu.map(|c| c.trapped),
        "",
    );
    equal(
        "trapped by the agent in total",
        agent.total.map(|c| c.trapped),
        " (so 0 for excluded and outside-PU connections)",
    );
    let queued: u64 = Kind::ALL
        .iter()
        .map(|&kind| tally.of(kind).sent * kind.queued())
        .sum();
    items.push(CheckItem {
        ok: agent.kernel_queued == queued,
        what: format!(
            "queued by the kernel (sum of id_sequence): {}, expected {queued} \
             (3 per target connection, 1 per outside-PU one)",
            agent.kernel_queued
        ),
    });
    items
}

/// The summary: the checks, one per line, and the verdict.
pub fn summary(elapsed: u64, datapath: &str, items: &[CheckItem]) -> String {
    let mut out = format!("summary after {elapsed}s on the {datapath} datapath:\n");
    for item in items {
        let mark = if item.ok { "ok" } else { "FAILED" };
        let _ = writeln!(out, "  {mark:<6} {}", item.what);
    }
    let failed = items.iter().filter(|i| !i.ok).count();
    if failed == 0 {
        out.push_str("check passed\n");
    } else {
        let _ = writeln!(out, "check FAILED: {failed} of {} items", items.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::traffic::KindTally;

    /// `rounds` rounds in which every kind behaved as the policy says.
    fn as_expected(rounds: u64) -> Tally {
        let mut tally = Tally::default();
        for (i, kind) in Kind::ALL.iter().enumerate() {
            tally.0[i] = KindTally {
                sent: rounds,
                connected: if kind.connects() { rounds } else { 0 },
                blocked: if kind.connects() { 0 } else { rounds },
                ..KindTally::default()
            };
        }
        tally
    }

    fn agent(trapped: u64, queued: u64, total: u64) -> AgentView {
        let counts = |trapped| PacketCounts {
            trapped,
            accepted: 3,
            dropped: 3,
        };
        AgentView {
            pu: Some(counts(trapped)),
            total: Some(counts(total)),
            kernel_queued: queued,
            problems: vec![],
        }
    }

    #[test]
    fn a_run_as_the_policy_says_passes() {
        let items = check(&as_expected(3), &agent(3, 12, 3));
        assert!(items.iter().all(|i| i.ok), "{items:#?}");
        let text = summary(3, "ebpf", &items);
        assert!(
            text.starts_with("summary after 3s on the ebpf datapath:\n"),
            "{text}"
        );
        assert!(text.contains("ok     no-acl: 3 of 3 blocked\n"), "{text}");
        assert!(
            text.contains("ok     trapped by the agent for PU demo: 3, target connections: 3\n"),
            "{text}"
        );
        assert!(text.ends_with("check passed\n"), "{text}");
    }

    #[test]
    fn each_mismatch_fails_the_check_and_says_which() {
        let failed = |tally: &Tally, agent: &AgentView| -> Vec<String> {
            check(tally, agent)
                .into_iter()
                .filter(|i| !i.ok)
                .map(|i| i.what)
                .collect()
        };
        assert_eq!(
            failed(&as_expected(3), &agent(2, 12, 3)),
            ["trapped by the agent for PU demo: 2, target connections: 3"]
        );
        assert_eq!(
            failed(&as_expected(3), &agent(3, 10, 3)),
            [
                "queued by the kernel (sum of id_sequence): 10, expected 12 \
                 (3 per target connection, 1 per outside-PU one)"
            ]
        );
        // Something outside the PU was trapped.
        assert_eq!(failed(&as_expected(3), &agent(3, 12, 4)).len(), 1);

        let mut leaky = as_expected(3);
        leaky.0[2].blocked = 2;
        leaky.0[2].failed = 1;
        leaky.0[2].last_failure = Some("connection reset".into());
        assert_eq!(
            failed(&leaky, &agent(3, 12, 3)),
            ["no-acl: 2 of 3 blocked; 1 failed, the last with: connection reset"]
        );

        let unknown = AgentView {
            problems: vec!["datapath counters: not ready".into()],
            ..AgentView::default()
        };
        let failures = failed(&as_expected(0), &unknown);
        // Nothing sent fails every kind; missing counters fail two items
        // (nothing queued is as expected).
        assert_eq!(failures.len(), Kind::ALL.len() + 2, "{failures:#?}");
        assert!(failures[Kind::ALL.len()].contains("unknown (datapath counters: not ready)"));
        assert!(summary(0, "iptables", &check(&as_expected(0), &unknown)).contains("check FAILED"));
    }

    #[test]
    fn the_table_shows_every_kind_and_the_agent() {
        let text = table(7, "ebpf", &as_expected(7), Ok(&agent(7, 7, 7)));
        let target = text.lines().find(|l| l.starts_with("target ")).unwrap();
        assert_eq!(
            target.split_whitespace().collect::<Vec<_>>(),
            [
                "target",
                "PU",
                "10.1.0.2:7000",
                "connects,",
                "trapped",
                "7",
                "7",
                "0",
                "0"
            ]
        );
        assert!(
            text.lines().any(|l| l.starts_with("outside-pu   outside ")),
            "{text}"
        );
        assert!(
            text.ends_with("agent: PU demo trapped 7 accepted 3 dropped 3 | kernel queued 7\n"),
            "{text}"
        );
        let one = line(7, "iptables", &as_expected(7), Err("no agent answers"));
        assert_eq!(
            one,
            "[   7s] iptables | target 7/7/0, acl-allowed 7/7/0, no-acl 7/0/7, excluded 7/7/0, \
             outside-pu 7/7/0 | status unavailable: no agent answers"
        );
    }
}
