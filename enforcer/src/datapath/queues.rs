//! The NFQUEUE layout shared by both datapaths' trap rules and the trap
//! consumer: which queue numbers each kind of trapped packet goes to.
//!
//! With separation (the seed's default) each direction has four ranges —
//! SYN, ACK, SYN-ACK, service — of `queues_per_range` queues each, from
//! `first_queue` on, application ranges first, then network. Without it
//! each direction has one range that every kind shares.

use crate::policy::QueueSettings;

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

/// An inclusive range of queue numbers that one rule balances over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRange {
    pub first: u16,
    pub last: u16,
}

impl QueueRange {
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

/// The range for one kind of packet in one direction.
pub fn range(q: &QueueSettings, direction: Direction, trapped: Trapped) -> QueueRange {
    let per_direction = if q.separation { 4 } else { 1 };
    let direction_index = match direction {
        Direction::App => 0,
        Direction::Net => 1,
    };
    let kind_index = if q.separation {
        match trapped {
            Trapped::Syn => 0,
            Trapped::Ack => 1,
            Trapped::SynAck => 2,
            Trapped::Service => 3,
        }
    } else {
        0
    };
    let index = direction_index * per_direction + kind_index;
    let first = q.first_queue + index * q.queues_per_range;
    QueueRange {
        first,
        last: first + q.queues_per_range - 1,
    }
}

/// Every queue number of the layout, for the consumer to bind.
pub fn all(q: &QueueSettings) -> Vec<u16> {
    // In u32: a layout may end exactly at queue 65535.
    let first = u32::from(q.first_queue);
    (first..first + q.total_queues())
        .map(|n| n as u16)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_layout_with_separation() {
        let q = QueueSettings::default();
        assert_eq!(
            range(&q, Direction::App, Trapped::Syn),
            QueueRange { first: 0, last: 3 }
        );
        assert_eq!(
            range(&q, Direction::App, Trapped::Ack),
            QueueRange { first: 4, last: 7 }
        );
        assert_eq!(
            range(&q, Direction::App, Trapped::SynAck),
            QueueRange { first: 8, last: 11 }
        );
        assert_eq!(
            range(&q, Direction::App, Trapped::Service),
            QueueRange {
                first: 12,
                last: 15
            }
        );
        assert_eq!(
            range(&q, Direction::Net, Trapped::Syn),
            QueueRange {
                first: 16,
                last: 19
            }
        );
        assert_eq!(
            range(&q, Direction::Net, Trapped::Service),
            QueueRange {
                first: 28,
                last: 31
            }
        );
        assert_eq!(all(&q), (0..32).collect::<Vec<u16>>());
    }

    #[test]
    fn without_separation_one_range_per_direction() {
        let q = QueueSettings {
            separation: false,
            queues_per_range: 2,
            first_queue: 10,
            ..Default::default()
        };
        for t in [
            Trapped::Syn,
            Trapped::Ack,
            Trapped::SynAck,
            Trapped::Service,
        ] {
            assert_eq!(
                range(&q, Direction::App, t),
                QueueRange {
                    first: 10,
                    last: 11
                }
            );
            assert_eq!(
                range(&q, Direction::Net, t),
                QueueRange {
                    first: 12,
                    last: 13
                }
            );
        }
        assert_eq!(all(&q), vec![10, 11, 12, 13]);
    }

    #[test]
    fn target_args() {
        assert_eq!(
            QueueRange { first: 0, last: 3 }.target_args(true),
            "--queue-balance 0:3 --queue-bypass"
        );
        assert_eq!(
            QueueRange { first: 5, last: 5 }.target_args(false),
            "--queue-num 5"
        );
    }
}
