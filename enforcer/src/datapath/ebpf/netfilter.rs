//! The fixed netfilter rules of the eBPF datapath: what only netfilter
//! can do — conntrack state and the NFQUEUE step — keyed on the mark bits
//! the programs write. The text is the same whatever the number of PUs,
//! ACLs and networks; it depends only on the mark layout and the queues.

use enforcer_common::marks::{Class, Kind, MarkLayout};

use crate::datapath::queues::{self, Direction, Trapped};
use crate::naming::MAIN_CHAINS;
use crate::policy::QueueSettings;

/// `iptables-restore --noflush` text for one family (the same for both).
///
/// - the jump is inserted first in OUTPUT, so that no earlier ACCEPT there
///   lets a trapped SYN bypass the queue;
/// - the consumer's verdict (kind `Authorised` in the packet mark, see
///   [`crate::datapath`]) is saved into the connection mark, and every
///   packet of an authorised connection is accepted before the trap;
/// - a SYN whose socket the connect hook classed `TrapTcp` is queued to
///   the application SYN range;
/// - the first datagram of a UDP flow classed `TrapUdp` is queued to the
///   application service range.
pub fn render(marks: MarkLayout, queues: &QueueSettings) -> String {
    let app = MAIN_CHAINS.app;
    let kind = marks.kind_mask();
    let class = marks.class_mask();
    let authorised = marks.kind(Kind::Authorised);
    let syn = queues::range(queues, Direction::App, Trapped::Syn).target_args(queues.bypass);
    let service =
        queues::range(queues, Direction::App, Trapped::Service).target_args(queues.bypass);
    let trap_tcp = marks.class(Class::TrapTcp);
    let trap_udp = marks.class(Class::TrapUdp);
    format!(
        "*mangle\n\
         :{app} - [0:0]\n\
         -I OUTPUT 1 -j {app}\n\
         -A {app} -m mark --mark {authorised:#x}/{kind:#x} -j CONNMARK --save-mark --nfmask {kind:#x} --ctmask {kind:#x}\n\
         -A {app} -m connmark --mark {authorised:#x}/{kind:#x} -j ACCEPT\n\
         -A {app} -p tcp --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark {trap_tcp:#x}/{class:#x} -j NFQUEUE {syn}\n\
         -A {app} -p udp -m conntrack --ctstate NEW -m mark --mark {trap_udp:#x}/{class:#x} -j NFQUEUE {service}\n\
         COMMIT\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_and_queues() {
        let text = render(MarkLayout::default(), &QueueSettings::default());
        assert_eq!(
            text,
            "*mangle\n\
             :TRI-App - [0:0]\n\
             -I OUTPUT 1 -j TRI-App\n\
             -A TRI-App -m mark --mark 0x100/0x700 -j CONNMARK --save-mark --nfmask 0x700 --ctmask 0x700\n\
             -A TRI-App -m connmark --mark 0x100/0x700 -j ACCEPT\n\
             -A TRI-App -p tcp --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark 0x800/0x3800 -j NFQUEUE --queue-balance 0:3 --queue-bypass\n\
             -A TRI-App -p udp -m conntrack --ctstate NEW -m mark --mark 0x1000/0x3800 -j NFQUEUE --queue-balance 12:15 --queue-bypass\n\
             COMMIT\n"
        );
    }
}
