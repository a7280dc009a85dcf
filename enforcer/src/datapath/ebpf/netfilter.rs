//! The fixed netfilter rules of the eBPF datapath: what only netfilter
//! can do — conntrack state and the NFQUEUE step — keyed on the mark bits
//! the programs write. The text is the same whatever the number of PUs,
//! ACLs and networks; it depends only on the mark layout and the queues.

use enforcer_common::marks::{Class, Kind, MarkLayout};

use crate::datapath::queues::{self, Direction, Trapped};
use crate::naming::MAIN_CHAINS;
use crate::policy::QueueSettings;

/// The seed's limit on the network-side UDP trap.
const NET_UDP_TRAP_LIMIT: &str = "1000/sec";

/// `iptables-restore --noflush` text for one family (the same for both).
/// Each direction gets one chain, jumped to first from its built-in chain
/// (so no earlier ACCEPT there lets a trapped packet bypass the queue):
/// - the consumer's verdict (kind `Authorised` in the packet mark, see
///   [`crate::datapath`]) is saved into the connection mark, and every
///   packet of an authorised connection is accepted before the trap;
/// - outgoing, a packet the agent injects (kind `Injected`) is accepted
///   before the trap;
/// - a SYN classed `TrapTcp` (by a connect hook on the socket, or by TC
///   ingress on the packet) is queued to the direction's SYN range;
/// - the first datagram of a UDP flow classed `TrapUdp` is queued to the
///   direction's service range — rate-limited on the network side, as the
///   seed does.
pub fn render(marks: MarkLayout, queues: &QueueSettings) -> String {
    let mut rules = vec!["*mangle".to_string()];
    for (direction, builtin, chain, limit) in [
        (Direction::App, "OUTPUT", MAIN_CHAINS.app, String::new()),
        (
            Direction::Net,
            "INPUT",
            MAIN_CHAINS.net,
            format!(" -m limit --limit {NET_UDP_TRAP_LIMIT}"),
        ),
    ] {
        let kind = marks.kind_mask();
        let class = marks.class_mask();
        let authorised = marks.kind(Kind::Authorised);
        let range = |t| queues::range(queues, direction, t).target_args(queues.bypass);
        let (syn, service) = (range(Trapped::Syn), range(Trapped::Service));
        let trap_tcp = marks.class(Class::TrapTcp);
        let trap_udp = marks.class(Class::TrapUdp);
        rules.extend([
            format!(":{chain} - [0:0]"),
            format!("-I {builtin} 1 -j {chain}"),
            format!(
                "-A {chain} -m mark --mark {authorised:#x}/{kind:#x} \
                 -j CONNMARK --save-mark --nfmask {kind:#x} --ctmask {kind:#x}"
            ),
            format!("-A {chain} -m connmark --mark {authorised:#x}/{kind:#x} -j ACCEPT"),
        ]);
        if direction == Direction::App {
            // What the agent injects itself is never trapped (SPEC,
            // "Global steering"), whatever class a hook gave its socket.
            let injected = marks.kind(Kind::Injected);
            rules.push(format!(
                "-A {chain} -m mark --mark {injected:#x}/{kind:#x} -j ACCEPT"
            ));
        }
        rules.extend([
            format!(
                "-A {chain} -p tcp --tcp-flags SYN,ACK,FIN,RST SYN \
                 -m mark --mark {trap_tcp:#x}/{class:#x} -j NFQUEUE {syn}"
            ),
            format!(
                "-A {chain} -p udp -m conntrack --ctstate NEW \
                 -m mark --mark {trap_udp:#x}/{class:#x}{limit} -j NFQUEUE {service}"
            ),
        ]);
    }
    rules.push("COMMIT\n".to_string());
    rules.join("\n")
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
             -A TRI-App -m mark --mark 0x400/0x700 -j ACCEPT\n\
             -A TRI-App -p tcp --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark 0x800/0x3800 -j NFQUEUE --queue-balance 0:3 --queue-bypass\n\
             -A TRI-App -p udp -m conntrack --ctstate NEW -m mark --mark 0x1000/0x3800 -j NFQUEUE --queue-balance 12:15 --queue-bypass\n\
             :TRI-Net - [0:0]\n\
             -I INPUT 1 -j TRI-Net\n\
             -A TRI-Net -m mark --mark 0x100/0x700 -j CONNMARK --save-mark --nfmask 0x700 --ctmask 0x700\n\
             -A TRI-Net -m connmark --mark 0x100/0x700 -j ACCEPT\n\
             -A TRI-Net -p tcp --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark 0x800/0x3800 -j NFQUEUE --queue-balance 16:19 --queue-bypass\n\
             -A TRI-Net -p udp -m conntrack --ctstate NEW -m mark --mark 0x1000/0x3800 -m limit --limit 1000/sec -j NFQUEUE --queue-balance 28:31 --queue-bypass\n\
             COMMIT\n"
        );
    }
}
