//! The fixed netfilter rules of the eBPF datapath: what only netfilter
//! can do — conntrack state and the NFQUEUE step — keyed on the mark bits
//! the programs write. The text is the same whatever the number of PUs,
//! ACLs and networks; it depends only on the mark layout, the queues and
//! where the agent instance pins its UDP trap filter.

use std::path::Path;

use anyhow::{Result, ensure};
use enforcer_common::marks::{Class, Kind, MarkLayout};

use crate::datapath::queues::{self, Direction, Trapped};
use crate::naming::MAIN_CHAINS;
use crate::policy::QueueSettings;

/// The seed's limit on the network-side UDP trap.
const NET_UDP_TRAP_LIMIT: &str = "1000/sec";

/// The longest path xt_bpf takes (`XT_BPF_PATH_MAX`, with its NUL).
const XT_BPF_PATH_MAX: usize = 512;

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
///   seed does;
/// - on the network side, a packet TC classed `RefuseNew` (a refusal of
///   the host or container PU) is dropped unless conntrack knows its
///   flow: TC runs before conntrack, and only this chain sees the state;
/// - on the application side, so is a new UDP flow whose datagram a
///   sendmsg hook decided to trap (unconnected UDP): the pinned socket
///   filter at `udp_trap_pin` finds the decision by the datagram's socket
///   and destination. The kernel opens the pin by path whenever it checks
///   the rule, so the path goes into the rule text: it must be a plain
///   path (no character a restore file would split or quote). With
///   iptables-legacy that check runs again each time anyone rewrites the
///   mangle table, so the pin must outlive the rule (`cleanup` removes the
///   rules first), and a tool rewriting the table from a mount namespace
///   without this bpffs path would be refused; nf_tables checks a rule
///   once, when it is added.
pub fn render(marks: MarkLayout, queues: &QueueSettings, udp_trap_pin: &Path) -> Result<String> {
    let pin = udp_trap_pin.to_str().unwrap_or_default();
    ensure!(
        pin.starts_with('/')
            && pin.len() < XT_BPF_PATH_MAX
            && pin
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b)),
        "the UDP trap filter's pin path {} cannot go into a netfilter rule \
         (an absolute path under {XT_BPF_PATH_MAX} bytes of A-Z a-z 0-9 / _ . - is needed)",
        udp_trap_pin.display()
    );
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
        let range = |t| queues::range(queues, direction, t).target_args(queues.fail_mode.bypass());
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
        if direction == Direction::App {
            rules.push(format!(
                "-A {chain} -p udp -m conntrack --ctstate NEW \
                 -m bpf --object-pinned {pin} -j NFQUEUE {service}"
            ));
        } else {
            // Above the rate limit a datagram TC classed for the trap must
            // not fall off the chain into INPUT's accept: the fallback
            // sends it on to the PU's ACLs and final drop; TC already
            // passed the ACLs that come before the trap, so it is dropped.
            rules.push(format!(
                "-A {chain} -p udp -m conntrack --ctstate NEW \
                 -m mark --mark {trap_udp:#x}/{class:#x} -j DROP"
            ));
            // What TC refused for the namespace-wide PU, unless conntrack
            // knows its flow (`Class::RefuseNew`).
            let refuse = marks.class(Class::RefuseNew);
            rules.push(format!(
                "-A {chain} -m mark --mark {refuse:#x}/{class:#x} \
                 -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP"
            ));
        }
    }
    rules.push("COMMIT\n".to_string());
    Ok(rules.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC, "The trap": the same layout and fail mode as the fallback —
    /// every NFQUEUE rule balances over its range, with `--queue-bypass`
    /// exactly when failing open.
    #[test]
    fn every_nfqueue_rule_follows_the_layout_and_the_fail_mode() {
        use crate::policy::FailMode;
        for fail_mode in [FailMode::Open, FailMode::Closed] {
            let queues = QueueSettings {
                queues_per_range: 2,
                first_queue: 40,
                fail_mode,
                ..QueueSettings::default()
            };
            let pin = Path::new("/sys/fs/bpf/enforcer/a/progs/enforcer_udp_trap");
            let text = render(MarkLayout::default(), &queues, pin).unwrap();
            let targets: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split_once(" -j NFQUEUE ").map(|(_, t)| t))
                .collect();
            let bypass = if fail_mode.bypass() {
                " --queue-bypass"
            } else {
                ""
            };
            // App SYN, app service (UDP marked by the connect hooks, then
            // unconnected UDP found by the pinned filter), net SYN, net
            // service.
            let expected: Vec<String> = ["40:41", "46:47", "46:47", "48:49", "54:55"]
                .iter()
                .map(|r| format!("--queue-balance {r}{bypass}"))
                .collect();
            assert_eq!(targets, expected, "{fail_mode}");
        }
    }

    #[test]
    fn default_layout_and_queues() {
        let pin = Path::new("/sys/fs/bpf/enforcer/a/progs/enforcer_udp_trap");
        let text = render(MarkLayout::default(), &QueueSettings::default(), pin).unwrap();
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
             -A TRI-App -p udp -m conntrack --ctstate NEW -m bpf --object-pinned /sys/fs/bpf/enforcer/a/progs/enforcer_udp_trap -j NFQUEUE --queue-balance 12:15 --queue-bypass\n\
             :TRI-Net - [0:0]\n\
             -I INPUT 1 -j TRI-Net\n\
             -A TRI-Net -m mark --mark 0x100/0x700 -j CONNMARK --save-mark --nfmask 0x700 --ctmask 0x700\n\
             -A TRI-Net -m connmark --mark 0x100/0x700 -j ACCEPT\n\
             -A TRI-Net -p tcp --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark 0x800/0x3800 -j NFQUEUE --queue-balance 16:19 --queue-bypass\n\
             -A TRI-Net -p udp -m conntrack --ctstate NEW -m mark --mark 0x1000/0x3800 -m limit --limit 1000/sec -j NFQUEUE --queue-balance 28:31 --queue-bypass\n\
             -A TRI-Net -p udp -m conntrack --ctstate NEW -m mark --mark 0x1000/0x3800 -j DROP\n\
             -A TRI-Net -m mark --mark 0x2000/0x3800 -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP\n\
             COMMIT\n"
        );
    }

    #[test]
    fn a_pin_path_that_would_break_the_rule_is_refused() {
        for bad in [
            "relative/pin",
            "/with space/pin",
            "/quote\"/pin",
            &format!("/{}", "x".repeat(600)),
        ] {
            let err = render(
                MarkLayout::default(),
                &QueueSettings::default(),
                Path::new(bad),
            );
            assert!(err.is_err(), "{bad:?} accepted");
        }
    }
}
