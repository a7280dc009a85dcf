//! The vocabulary of the restore files: the tables, what every rule
//! renderer needs besides the policy ([`Ctx`]), and the small match and
//! target fragments shared by the global and the per-PU rules. Pure text.

use enforcer_common::marks::{Class, Kind, MarkLayout};

use crate::datapath::queues::{self, Direction, Trapped};
use crate::naming::GlobalSet;
use crate::policy::{IpFamily, Mode, QueueSettings};

/// The netfilter tables the datapath writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Trapping and policy.
    Mangle,
    /// Redirection to the proxy.
    Nat,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::Mangle, Table::Nat];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
        }
    }
}

/// One table's section of a restore file: `*table`, the lines, `COMMIT`.
/// Lines are complete commands (`:CHAIN - [0:0]`, `-A …`, `-D …`, `-F …`,
/// `-X …`). `iptables-restore` commits each section on its own.
pub fn section(table: Table, lines: &[String]) -> String {
    let mut text = format!("*{}\n", table.as_str());
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    text
}

/// Declares a chain; with `--noflush` an existing chain is flushed.
pub fn declare(chain: &str) -> String {
    format!(":{chain} - [0:0]")
}

/// What every rule renderer needs besides the policy: the family whose
/// tables and sets it writes, and the agent's mark and queue layout.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub family: IpFamily,
    pub mode: Mode,
    pub marks: MarkLayout,
    pub queues: &'a QueueSettings,
}

impl Ctx<'_> {
    /// The family's instance of a global set.
    pub fn set(&self, set: GlobalSet) -> String {
        set.name(self.family)
    }

    /// `-m mark --mark <kind>/<kind mask>`: the packet's kind sub-field.
    pub fn mark_is(&self, kind: Kind) -> String {
        format!("-m mark --mark {}", self.kind(kind))
    }

    /// `-m connmark --mark <kind>/<kind mask>`: the connection's kind.
    pub fn connmark_is(&self, kind: Kind) -> String {
        format!("-m connmark --mark {}", self.kind(kind))
    }

    /// `CONNMARK --set-xmark <kind>/<kind mask>`: writes the connection's
    /// kind, every other bit kept.
    pub fn set_connmark(&self, kind: Kind) -> String {
        format!("CONNMARK --set-xmark {}", self.kind(kind))
    }

    /// `MARK --set-xmark <class>/<class mask>`: writes the packet's class,
    /// every other bit kept.
    pub fn set_class(&self, class: Class) -> String {
        let (value, mask) = (self.marks.class(class), self.marks.class_mask());
        format!("MARK --set-xmark {value:#x}/{mask:#x}")
    }

    /// `CONNMARK --save-mark` of the kind sub-field only: the trap
    /// consumer's verdict goes into the connection, foreign bits stay.
    pub fn save_kind(&self) -> String {
        let mask = self.marks.kind_mask();
        format!("CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}")
    }

    /// The NFQUEUE target for one trapped packet type and direction.
    pub fn queue(&self, direction: Direction, trapped: Trapped) -> String {
        let range = queues::range(self.queues, direction, trapped);
        format!(
            "NFQUEUE {}",
            range.target_args(self.queues.fail_mode.bypass())
        )
    }

    fn kind(&self, kind: Kind) -> String {
        format!("{:#x}/{:#x}", self.marks.kind(kind), self.marks.kind_mask())
    }
}

/// Which end of a packet is the PU's peer: the destination of what it
/// sends, the source of what it receives.
pub fn peer(direction: Direction) -> &'static str {
    match direction {
        Direction::App => "dst",
        Direction::Net => "src",
    }
}

/// The other direction.
pub fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::App => Direction::Net,
        Direction::Net => Direction::App,
    }
}

/// The NFLOG group of a direction (the seed's): 10 app, 11 net.
pub fn nflog_group(direction: Direction) -> u16 {
    match direction {
        Direction::App => 10,
        Direction::Net => 11,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::FailMode;

    /// SPEC, "The trap": each trap rule balances over its own range, with
    /// `--queue-bypass` exactly when the trap fails open.
    #[test]
    fn queue_targets_follow_the_layout_and_the_fail_mode() {
        for (fail_mode, bypass) in [(FailMode::Open, " --queue-bypass"), (FailMode::Closed, "")] {
            let queues = QueueSettings {
                fail_mode,
                ..QueueSettings::default()
            };
            let ctx = Ctx {
                family: IpFamily::V4,
                mode: Mode::LocalServer,
                marks: MarkLayout::default(),
                queues: &queues,
            };
            let cases = [
                (Direction::App, Trapped::Syn, "0:3"),
                (Direction::App, Trapped::Ack, "4:7"),
                (Direction::App, Trapped::SynAck, "8:11"),
                (Direction::App, Trapped::Service, "12:15"),
                (Direction::Net, Trapped::Syn, "16:19"),
                (Direction::Net, Trapped::Ack, "20:23"),
                (Direction::Net, Trapped::SynAck, "24:27"),
                (Direction::Net, Trapped::Service, "28:31"),
            ];
            for (direction, trapped, range) in cases {
                assert_eq!(
                    ctx.queue(direction, trapped),
                    format!("NFQUEUE --queue-balance {range}{bypass}")
                );
            }
        }
    }
}
