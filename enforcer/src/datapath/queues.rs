//! The NFQUEUE layout shared by both datapaths' trap rules and the trap
//! consumer: which queue numbers each kind of trapped packet goes to.
//!
//! With separation (the seed's default) each direction has four ranges —
//! SYN, ACK, SYN-ACK, service — of `queues_per_range` queues each, from
//! `first_queue` on, application ranges first, then network. Without it
//! each direction has one range that every kind shares. Every NFQUEUE rule
//! balances over its range (`--queue-balance a:b`) and carries
//! `--queue-bypass` when the trap fails open ([`QueueRange::target_args`]);
//! the consumer binds every queue of every range with the configured
//! maximum length ([`all`]) and maps a queue back to its range ([`locate`]).

use crate::policy::QueueSettings;

/// The seed's rate limit of the network-side UDP trap, as an iptables
/// `limit` match takes it; both datapaths render it.
pub const NET_UDP_TRAP_LIMIT: &str = "1000/s";

/// Which side of a PU a trapped packet is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    App,
    Net,
}

/// What kind of packet is trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trapped {
    Syn,
    Ack,
    SynAck,
    /// UDP and other service traffic.
    Service,
}

/// The range names, in queue order.
const SEPARATED: [(&str, Direction, Trapped); 8] = [
    ("app-syn", Direction::App, Trapped::Syn),
    ("app-ack", Direction::App, Trapped::Ack),
    ("app-synack", Direction::App, Trapped::SynAck),
    ("app-service", Direction::App, Trapped::Service),
    ("net-syn", Direction::Net, Trapped::Syn),
    ("net-ack", Direction::Net, Trapped::Ack),
    ("net-synack", Direction::Net, Trapped::SynAck),
    ("net-service", Direction::Net, Trapped::Service),
];
const SHARED: [(&str, Direction); 2] = [("app", Direction::App), ("net", Direction::Net)];

/// An inclusive range of queue numbers that one rule balances over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRange {
    /// `app-syn`, …, `net-service`; `app` and `net` without separation.
    pub name: &'static str,
    pub first: u16,
    pub last: u16,
}

impl QueueRange {
    pub fn queues(self) -> std::ops::RangeInclusive<u16> {
        self.first..=self.last
    }

    /// The NFQUEUE target's arguments: `--queue-balance a:b` (or
    /// `--queue-num a` for a one-queue range), plus `--queue-bypass` when
    /// packets should pass while nothing listens.
    pub fn target_args(self, bypass: bool) -> String {
        let mut args = if self.first == self.last {
            format!("--queue-num {}", self.first)
        } else {
            format!("--queue-balance {}:{}", self.first, self.last)
        };
        if bypass {
            args.push_str(" --queue-bypass");
        }
        args
    }
}

/// Every range of the layout, in queue order. Validation guarantees the
/// layout ends at or below queue 65535; for one that would not, the
/// ranges stop at the last that fits (never wrapping).
pub fn ranges(q: &QueueSettings) -> Vec<QueueRange> {
    let names: Vec<&'static str> = if q.separation {
        SEPARATED.iter().map(|r| r.0).collect()
    } else {
        SHARED.iter().map(|r| r.0).collect()
    };
    let per_range = u32::from(q.queues_per_range);
    let queue = |n: u32| u16::try_from(u32::from(q.first_queue) + n).ok();
    names
        .into_iter()
        .zip(0u32..)
        .map_while(|(name, i)| {
            Some(QueueRange {
                name,
                first: queue(i * per_range)?,
                last: queue((i + 1) * per_range - 1)?,
            })
        })
        .collect()
}

/// The range for one kind of packet in one direction.
pub fn range(q: &QueueSettings, direction: Direction, trapped: Trapped) -> QueueRange {
    let index = if q.separation {
        SEPARATED
            .iter()
            .position(|&(_, d, t)| d == direction && t == trapped)
    } else {
        SHARED.iter().position(|&(_, d)| d == direction)
    };
    let index = index.expect("every direction and kind has a range");
    // Validated layouts always have every range.
    ranges(q)[index]
}

/// Where a queue sits in the layout: its range, direction and — with
/// separation — the kind of packet its rules queue. Constant time: the
/// consumer calls it for every packet.
pub fn locate(q: &QueueSettings, queue: u16) -> Option<Located> {
    let per_range = q.queues_per_range.max(1);
    let index = usize::from(queue.checked_sub(q.first_queue)? / per_range);
    let range = *ranges(q).get(index)?;
    let (direction, trapped) = if q.separation {
        let (_, direction, trapped) = SEPARATED[index];
        (direction, Some(trapped))
    } else {
        (SHARED[index].1, None)
    };
    Some(Located {
        range,
        direction,
        trapped,
    })
}

/// A queue's place in the layout ([`locate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub range: QueueRange,
    pub direction: Direction,
    /// `None` without separation: every kind shares the range.
    pub trapped: Option<Trapped>,
}

/// Every queue number of the layout, for the consumer to bind.
pub fn all(q: &QueueSettings) -> Vec<u16> {
    ranges(q).into_iter().flat_map(QueueRange::queues).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::queue_settings as settings;

    fn span(r: QueueRange) -> (&'static str, u16, u16) {
        (r.name, r.first, r.last)
    }

    #[test]
    fn seed_layout_with_separation() {
        let q = QueueSettings::default();
        assert_eq!(
            span(range(&q, Direction::App, Trapped::Syn)),
            ("app-syn", 0, 3)
        );
        assert_eq!(
            span(range(&q, Direction::App, Trapped::Ack)),
            ("app-ack", 4, 7)
        );
        assert_eq!(
            span(range(&q, Direction::App, Trapped::SynAck)),
            ("app-synack", 8, 11)
        );
        assert_eq!(
            span(range(&q, Direction::App, Trapped::Service)),
            ("app-service", 12, 15)
        );
        assert_eq!(
            span(range(&q, Direction::Net, Trapped::Syn)),
            ("net-syn", 16, 19)
        );
        assert_eq!(
            span(range(&q, Direction::Net, Trapped::Service)),
            ("net-service", 28, 31)
        );
        assert_eq!(all(&q), (0..32).collect::<Vec<u16>>());
    }

    #[test]
    fn without_separation_one_range_per_direction() {
        let q = settings(false, 2, 10);
        for t in [
            Trapped::Syn,
            Trapped::Ack,
            Trapped::SynAck,
            Trapped::Service,
        ] {
            assert_eq!(span(range(&q, Direction::App, t)), ("app", 10, 11));
            assert_eq!(span(range(&q, Direction::Net, t)), ("net", 12, 13));
        }
        assert_eq!(all(&q), vec![10, 11, 12, 13]);
    }

    #[test]
    fn the_layout_may_end_at_the_last_queue_number() {
        let numbers = all(&settings(true, 4, 65504));
        assert_eq!(numbers.len(), 32);
        assert_eq!(numbers.last(), Some(&65535));
        // An unvalidated layout past the end is cut, not wrapped.
        assert_eq!(all(&settings(true, 4, 65530)), [65530, 65531, 65532, 65533]);
    }

    #[test]
    fn every_queue_is_located_in_its_range() {
        let q = QueueSettings::default();
        let at = |n| locate(&q, n).map(|l| (l.range.name, l.direction, l.trapped));
        assert_eq!(at(0), Some(("app-syn", Direction::App, Some(Trapped::Syn))));
        assert_eq!(at(3), Some(("app-syn", Direction::App, Some(Trapped::Syn))));
        assert_eq!(at(4), Some(("app-ack", Direction::App, Some(Trapped::Ack))));
        assert_eq!(
            at(11),
            Some(("app-synack", Direction::App, Some(Trapped::SynAck)))
        );
        assert_eq!(
            at(16),
            Some(("net-syn", Direction::Net, Some(Trapped::Syn)))
        );
        assert_eq!(
            at(31),
            Some(("net-service", Direction::Net, Some(Trapped::Service)))
        );
        assert_eq!(at(32), None);
        // Every queue the consumer binds is located, in the range whose
        // rule sends to it.
        for n in all(&q) {
            let l = locate(&q, n).unwrap();
            assert!(l.range.queues().contains(&n));
            if let Some(t) = l.trapped {
                assert_eq!(range(&q, l.direction, t), l.range);
            }
        }
        let shared = settings(false, 2, 10);
        assert_eq!(locate(&shared, 9), None);
        let l = locate(&shared, 13).unwrap();
        assert_eq!(
            (l.range.name, l.direction, l.trapped),
            ("net", Direction::Net, None)
        );
        assert_eq!(locate(&shared, 14), None);
    }

    /// SPEC, "The trap": with separation each direction has four ranges
    /// (SYN, ACK, SYN-ACK, service) of N queues, N = 4 by default, from
    /// queue 0, application first, each rule balancing over its range;
    /// 500 packets per queue; fail-open by default.
    #[test]
    fn the_spec_layout_for_any_n() {
        let defaults = QueueSettings::default();
        assert_eq!(
            (
                defaults.queues_per_range,
                defaults.first_queue,
                defaults.queue_length
            ),
            (4, 0, 500)
        );
        assert!(defaults.fail_mode.bypass() && defaults.fail_mode.fail_open_when_full());
        for n in [1u16, 2, 4, 7] {
            let q = settings(true, n, 0);
            let kinds = [
                Trapped::Syn,
                Trapped::Ack,
                Trapped::SynAck,
                Trapped::Service,
            ];
            let mut next = 0;
            for direction in [Direction::App, Direction::Net] {
                for t in kinds {
                    let r = range(&q, direction, t);
                    assert_eq!(
                        (r.first, r.last),
                        (next, next + n - 1),
                        "{direction:?} {t:?}"
                    );
                    let expected = if n == 1 {
                        format!("--queue-num {next}")
                    } else {
                        format!("--queue-balance {next}:{}", next + n - 1)
                    };
                    assert_eq!(r.target_args(false), expected);
                    next += n;
                }
            }
            assert_eq!(all(&q), (0..next).collect::<Vec<u16>>());
        }
    }

    #[test]
    fn target_args() {
        let r = |first, last| QueueRange {
            name: "x",
            first,
            last,
        };
        assert_eq!(
            r(0, 3).target_args(true),
            "--queue-balance 0:3 --queue-bypass"
        );
        assert_eq!(r(5, 5).target_args(false), "--queue-num 5");
    }
}
