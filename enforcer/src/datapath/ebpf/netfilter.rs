//! The fixed netfilter rules of the eBPF datapath: what only netfilter
//! can do — conntrack state and the NFQUEUE step — keyed on the mark bits
//! the programs write. The text is the same whatever the number of PUs,
//! ACLs and networks; it depends only on the family, the mark layout, the
//! queues and where the agent instance pins the socket filters its rules
//! run.

use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};
use enforcer_common::marks::{Class, Kind, MarkLayout};

use crate::datapath::handshake::{self, SYN_ACK, SYN_WITH_OPTION_34};
use crate::datapath::queues::{self, Direction, NET_UDP_TRAP_LIMIT, Trapped};
use crate::naming::MAIN_CHAINS;
use crate::policy::{IpFamily, QueueSettings};

/// The longest path xt_bpf takes (`XT_BPF_PATH_MAX`, with its NUL).
const XT_BPF_PATH_MAX: usize = 512;

/// Where the socket filters the rules run are pinned.
#[derive(Debug, Clone)]
pub struct Pins {
    /// `enforcer_udp_trap`: a sendmsg hook's trap decision for this
    /// datagram.
    pub udp_trap: PathBuf,
    /// `enforcer_target_src` / `enforcer_target_dst`: the packet's peer is
    /// in a target network of its protocol.
    pub target_src: PathBuf,
    pub target_dst: PathBuf,
}

/// `iptables-restore --noflush` text for one family. Each direction gets
/// one chain, jumped to first from its built-in chain (so no earlier
/// ACCEPT there lets a trapped packet bypass the queue), in SPEC's order
/// ("Global steering", then the trap rules of "Order of evaluation inside
/// a PU", which the programs' classes stand for):
/// - outgoing, an ICMP packet conntrack knows (ESTABLISHED or RELATED)
///   is classed `KnownFlow`, which the egress program lets out;
/// - the consumer's verdict (kind `Authorised` in the packet mark, see
///   [`crate::datapath`]) is saved into the connection mark and the packet
///   accepted, so a repeated packet never reaches a trap again;
/// - outgoing, a packet the agent injects (kind `Injected`) is accepted;
/// - incoming, a UDP packet from a target UDP network carrying the
///   handshake signature (anywhere) is queued to the service range —
///   before the accepts below, so a decided flow's datagram too, which
///   the consumer lets on unchanged by its connection mark;
/// - every packet of an authorised connection is accepted, but for a
///   SYN-ACK;
/// - a SYN-ACK to (outgoing: classed `TrapTcp` first, as the fallback
///   does) or from a target TCP network is queued to the direction's
///   SYN-ACK range; incoming, so is a SYN from one carrying TCP option 34,
///   to the SYN range, its class (when TC classed it for a PU) saved into
///   the connection mark first, as for any classed SYN below (whether the
///   peer is a target, and not excluded, the pinned `enforcer_target_src`
///   / `enforcer_target_dst` filters say);
/// - the first ACK ([`handshake::first_ack`]) of a connection whose SYN
///   was classed `TrapTcp` — the class the SYN rule below saves into the
///   connection mark — is queued to the direction's ACK range;
/// - a SYN classed `TrapTcp` (by a connect hook on the socket, or by TC
///   ingress on the packet) has its class saved into the connection mark
///   and is queued to the direction's SYN range;
/// - the first datagram of a UDP flow classed `TrapUdp` is queued to the
///   direction's service range — rate-limited on the network side, as the
///   seed does;
/// - on the network side, a packet TC classed `RefuseNew` (a refusal of
///   the host or container PU) is dropped unless conntrack knows its
///   flow: TC runs before conntrack, and only this chain sees the state;
/// - on the application side, so is a new UDP flow whose datagram a
///   sendmsg hook decided to trap (unconnected UDP): the pinned socket
///   filter finds the decision by the datagram's socket and destination.
///
/// The kernel opens a pinned filter by path whenever it checks its rule,
/// so the paths go into the rule text: each must be a plain path (no
/// character a restore file would split or quote). With iptables-legacy
/// that check runs again each time anyone rewrites the mangle table, so
/// the pins must outlive the rules (`cleanup` removes the rules first),
/// and a tool rewriting the table from a mount namespace without this
/// bpffs path would be refused; nf_tables checks a rule once, when it is
/// added.
pub fn render(
    marks: MarkLayout,
    queues: &QueueSettings,
    family: IpFamily,
    pins: &Pins,
) -> Result<String> {
    let udp_trap = pin_arg(&pins.udp_trap)?;
    let target_src = format!("-m bpf --object-pinned {}", pin_arg(&pins.target_src)?);
    let target_dst = format!("-m bpf --object-pinned {}", pin_arg(&pins.target_dst)?);
    let kind = marks.kind_mask();
    let class = marks.class_mask();
    let authorised = marks.kind(Kind::Authorised);
    let trap_tcp = marks.class(Class::TrapTcp);
    let trap_udp = marks.class(Class::TrapUdp);
    let known = marks.class(Class::KnownFlow);
    let icmp = match family {
        IpFamily::V4 => "icmp",
        IpFamily::V6 => "icmpv6",
    };
    let first_ack = handshake::first_ack(family);
    let syn = "-p tcp --tcp-flags SYN,ACK,FIN,RST SYN";
    let mut rules = vec!["*mangle".to_string()];
    for (direction, builtin, chain) in [
        (Direction::App, "OUTPUT", MAIN_CHAINS.app),
        (Direction::Net, "INPUT", MAIN_CHAINS.net),
    ] {
        let range = |t| {
            let range = queues::range(queues, direction, t);
            format!("NFQUEUE {}", range.target_args(queues.fail_mode.bypass()))
        };
        rules.extend([
            format!(":{chain} - [0:0]"),
            format!("-I {builtin} 1 -j {chain}"),
            handshake::new_connection_forgets_marks(marks, chain, direction == Direction::Net),
        ]);
        if direction == Direction::App {
            // The egress program runs after netfilter and cannot see
            // conntrack: it lets an ICMP packet out on this class, where
            // the fallback's chain accepts ESTABLISHED and RELATED. First,
            // so that no accept above it hides a packet from it.
            // The class is conntrack's word only: one a packet brought
            // from its socket's mark (set where the `SO_MARK` guard cannot
            // see, README) is cleared.
            rules.extend([
                format!(
                    "-A {chain} -p {icmp} -m conntrack --ctstate ESTABLISHED,RELATED \
                     -j MARK --set-xmark {known:#x}/{class:#x}"
                ),
                format!(
                    "-A {chain} -p {icmp} -m conntrack ! --ctstate ESTABLISHED,RELATED \
                     -m mark --mark {known:#x}/{class:#x} -j MARK --set-xmark 0x0/{class:#x}"
                ),
            ]);
        }
        rules.extend([
            format!(
                "-A {chain} -m mark --mark {authorised:#x}/{kind:#x} \
                 -j CONNMARK --save-mark --nfmask {kind:#x} --ctmask {kind:#x}"
            ),
            format!("-A {chain} -m mark --mark {authorised:#x}/{kind:#x} -j ACCEPT"),
        ]);
        match direction {
            Direction::App => {
                // What the agent injects itself is never trapped (SPEC,
                // "Global steering"), whatever class a hook gave its socket.
                let injected = marks.kind(Kind::Injected);
                rules.push(format!(
                    "-A {chain} -m mark --mark {injected:#x}/{kind:#x} -j ACCEPT"
                ));
            }
            Direction::Net => rules.push(format!(
                "-A {chain} -p udp {target_src} {} -j {}",
                handshake::udp_signature(),
                range(Trapped::Service)
            )),
        }
        let connection = format!("-m connmark --mark {authorised:#x}/{kind:#x}");
        rules.extend([
            format!("-A {chain} -p tcp ! --tcp-flags SYN,ACK SYN,ACK {connection} -j ACCEPT"),
            format!("-A {chain} ! -p tcp {connection} -j ACCEPT"),
        ]);
        match direction {
            Direction::App => rules.extend([
                format!(
                    "-A {chain} {SYN_ACK} {target_dst} -j MARK --set-xmark {trap_tcp:#x}/{class:#x}"
                ),
                format!(
                    "-A {chain} {SYN_ACK} {target_dst} -j {}",
                    range(Trapped::SynAck)
                ),
            ]),
            Direction::Net => rules.extend([
                format!(
                    "-A {chain} {SYN_ACK} {target_src} -j {}",
                    range(Trapped::SynAck)
                ),
                // A marked SYN to a PU (TC classed it) keeps its class in
                // the connection as an unmarked one does below: its first
                // ACK is trapped too, where the responder's handshake
                // completes.
                format!(
                    "-A {chain} {SYN_WITH_OPTION_34} {target_src} \
                     -m mark --mark {trap_tcp:#x}/{class:#x} \
                     -j CONNMARK --save-mark --nfmask {class:#x} --ctmask {class:#x}"
                ),
                format!(
                    "-A {chain} {SYN_WITH_OPTION_34} {target_src} -j {}",
                    range(Trapped::Syn)
                ),
            ]),
        }
        let classed_tcp = format!("-m mark --mark {trap_tcp:#x}/{class:#x}");
        let classed_udp = format!("-m mark --mark {trap_udp:#x}/{class:#x}");
        let new_udp = "-p udp -m conntrack --ctstate NEW";
        rules.extend([
            format!(
                "-A {chain} {first_ack} -m connmark --mark {trap_tcp:#x}/{class:#x} -j {}",
                range(Trapped::Ack)
            ),
            format!(
                "-A {chain} {syn} {classed_tcp} \
                 -j CONNMARK --save-mark --nfmask {class:#x} --ctmask {class:#x}"
            ),
            format!("-A {chain} {syn} {classed_tcp} -j {}", range(Trapped::Syn)),
        ]);
        match direction {
            Direction::App => rules.extend([
                format!("-A {chain} {new_udp} {classed_udp} -j {}", range(Trapped::Service)),
                format!(
                    "-A {chain} {new_udp} -m bpf --object-pinned {udp_trap} -j {}",
                    range(Trapped::Service)
                ),
            ]),
            Direction::Net => rules.extend([
                format!(
                    "-A {chain} {new_udp} {classed_udp} -m limit --limit {NET_UDP_TRAP_LIMIT} -j {}",
                    range(Trapped::Service)
                ),
                // Above the rate limit a datagram TC classed for the trap
                // must not fall off the chain into INPUT's accept: the
                // fallback sends it on to the PU's ACLs and final drop; TC
                // already passed the ACLs that come before the trap, so it
                // is dropped.
                format!("-A {chain} {new_udp} {classed_udp} -j DROP"),
                // What TC refused for the namespace-wide PU, unless
                // conntrack knows its flow (`Class::RefuseNew`).
                format!(
                    "-A {chain} -m mark --mark {:#x}/{class:#x} \
                     -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP",
                    marks.class(Class::RefuseNew)
                ),
            ]),
        }
    }
    rules.push("COMMIT\n".to_string());
    Ok(rules.join("\n"))
}

/// A pin path as a rule names it, refused if it cannot go into one.
fn pin_arg(pin: &Path) -> Result<&str> {
    let text = pin.to_str().unwrap_or_default();
    ensure!(
        text.starts_with('/')
            && text.len() < XT_BPF_PATH_MAX
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b)),
        "the socket filter's pin path {} cannot go into a netfilter rule \
         (an absolute path under {XT_BPF_PATH_MAX} bytes of A-Z a-z 0-9 / _ . - is needed)",
        pin.display()
    );
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins() -> Pins {
        let pin = |name: &str| PathBuf::from(format!("/sys/fs/bpf/enforcer/a/progs/{name}"));
        Pins {
            udp_trap: pin("enforcer_udp_trap"),
            target_src: pin("enforcer_target_src"),
            target_dst: pin("enforcer_target_dst"),
        }
    }

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
            let text = render(MarkLayout::default(), &queues, IpFamily::V4, &pins()).unwrap();
            let targets: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split_once(" -j NFQUEUE ").map(|(_, t)| t))
                .collect();
            let bypass = if fail_mode.bypass() {
                " --queue-bypass"
            } else {
                ""
            };
            // App: SYN-ACK, first ACK, SYN, service (UDP marked by the
            // connect hooks, then unconnected UDP found by the pinned
            // filter). Net: service (the signature), SYN-ACK, SYN (option
            // 34), first ACK, SYN, service.
            let expected: Vec<String> = [
                "44:45", "42:43", "40:41", "46:47", "46:47", "54:55", "52:53", "48:49", "50:51",
                "48:49", "54:55",
            ]
            .iter()
            .map(|r| format!("--queue-balance {r}{bypass}"))
            .collect();
            assert_eq!(targets, expected, "{fail_mode}");
        }
    }

    #[test]
    fn default_layout_and_queues() {
        let text = render(
            MarkLayout::default(),
            &QueueSettings::default(),
            IpFamily::V4,
            &pins(),
        )
        .unwrap();
        let ack = handshake::first_ack(IpFamily::V4);
        let expected = format!(
            "*mangle\n\
             :TRI-App - [0:0]\n\
             -I OUTPUT 1 -j TRI-App\n\
             -A TRI-App -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark 0x0/0x3f00\n\
             -A TRI-App -p icmp -m conntrack --ctstate ESTABLISHED,RELATED -j MARK --set-xmark 0x2800/0x3800\n\
             -A TRI-App -p icmp -m conntrack ! --ctstate ESTABLISHED,RELATED -m mark --mark 0x2800/0x3800 -j MARK --set-xmark 0x0/0x3800\n\
             -A TRI-App -m mark --mark 0x100/0x700 -j CONNMARK --save-mark --nfmask 0x700 --ctmask 0x700\n\
             -A TRI-App -m mark --mark 0x100/0x700 -j ACCEPT\n\
             -A TRI-App -m mark --mark 0x400/0x700 -j ACCEPT\n\
             -A TRI-App -p tcp ! --tcp-flags SYN,ACK SYN,ACK -m connmark --mark 0x100/0x700 -j ACCEPT\n\
             -A TRI-App ! -p tcp -m connmark --mark 0x100/0x700 -j ACCEPT\n\
             -A TRI-App -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -m bpf --object-pinned /sys/fs/bpf/enforcer/a/progs/enforcer_target_dst -j MARK --set-xmark 0x800/0x3800\n\
             -A TRI-App -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -m bpf --object-pinned /sys/fs/bpf/enforcer/a/progs/enforcer_target_dst -j NFQUEUE --queue-balance 8:11 --queue-bypass\n\
             -A TRI-App {ack} -m connmark --mark 0x800/0x3800 -j NFQUEUE --queue-balance 4:7 --queue-bypass\n\
             -A TRI-App -p tcp --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark 0x800/0x3800 -j CONNMARK --save-mark --nfmask 0x3800 --ctmask 0x3800\n\
             -A TRI-App -p tcp --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark 0x800/0x3800 -j NFQUEUE --queue-balance 0:3 --queue-bypass\n\
             -A TRI-App -p udp -m conntrack --ctstate NEW -m mark --mark 0x1000/0x3800 -j NFQUEUE --queue-balance 12:15 --queue-bypass\n\
             -A TRI-App -p udp -m conntrack --ctstate NEW -m bpf --object-pinned /sys/fs/bpf/enforcer/a/progs/enforcer_udp_trap -j NFQUEUE --queue-balance 12:15 --queue-bypass\n\
             :TRI-Net - [0:0]\n\
             -I INPUT 1 -j TRI-Net\n\
             -A TRI-Net ! -i lo -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark 0x0/0x3f00\n\
             -A TRI-Net -m mark --mark 0x100/0x700 -j CONNMARK --save-mark --nfmask 0x700 --ctmask 0x700\n\
             -A TRI-Net -m mark --mark 0x100/0x700 -j ACCEPT\n\
             -A TRI-Net -p udp -m bpf --object-pinned /sys/fs/bpf/enforcer/a/progs/enforcer_target_src -m string --string n30njxq7bmiwr6dtxq --algo bm --to 65535 -j NFQUEUE --queue-balance 28:31 --queue-bypass\n\
             -A TRI-Net -p tcp ! --tcp-flags SYN,ACK SYN,ACK -m connmark --mark 0x100/0x700 -j ACCEPT\n\
             -A TRI-Net ! -p tcp -m connmark --mark 0x100/0x700 -j ACCEPT\n\
             -A TRI-Net -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -m bpf --object-pinned /sys/fs/bpf/enforcer/a/progs/enforcer_target_src -j NFQUEUE --queue-balance 24:27 --queue-bypass\n\
             -A TRI-Net -p tcp -m tcp --tcp-option 34 --tcp-flags SYN,ACK SYN -m bpf --object-pinned /sys/fs/bpf/enforcer/a/progs/enforcer_target_src -m mark --mark 0x800/0x3800 -j CONNMARK --save-mark --nfmask 0x3800 --ctmask 0x3800\n\
             -A TRI-Net -p tcp -m tcp --tcp-option 34 --tcp-flags SYN,ACK SYN -m bpf --object-pinned /sys/fs/bpf/enforcer/a/progs/enforcer_target_src -j NFQUEUE --queue-balance 16:19 --queue-bypass\n\
             -A TRI-Net {ack} -m connmark --mark 0x800/0x3800 -j NFQUEUE --queue-balance 20:23 --queue-bypass\n\
             -A TRI-Net -p tcp --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark 0x800/0x3800 -j CONNMARK --save-mark --nfmask 0x3800 --ctmask 0x3800\n\
             -A TRI-Net -p tcp --tcp-flags SYN,ACK,FIN,RST SYN -m mark --mark 0x800/0x3800 -j NFQUEUE --queue-balance 16:19 --queue-bypass\n\
             -A TRI-Net -p udp -m conntrack --ctstate NEW -m mark --mark 0x1000/0x3800 -m limit --limit 1000/s -j NFQUEUE --queue-balance 28:31 --queue-bypass\n\
             -A TRI-Net -p udp -m conntrack --ctstate NEW -m mark --mark 0x1000/0x3800 -j DROP\n\
             -A TRI-Net -m mark --mark 0x2000/0x3800 -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP\n\
             COMMIT\n"
        );
        assert_eq!(text, expected);
        // IPv6 differs only in the first ACK's payload check and ICMP's
        // protocol name.
        let v6 = render(
            MarkLayout::default(),
            &QueueSettings::default(),
            IpFamily::V6,
            &pins(),
        )
        .unwrap();
        assert_eq!(
            v6,
            text.replace(&ack, &handshake::first_ack(IpFamily::V6))
                .replace("-p icmp ", "-p icmpv6 ")
        );
        assert_ne!(v6, text);
    }

    #[test]
    fn a_pin_path_that_would_break_the_rule_is_refused() {
        for bad in [
            "relative/pin",
            "/with space/pin",
            "/quote\"/pin",
            &format!("/{}", "x".repeat(600)),
        ] {
            for which in 0..3 {
                let mut pins = pins();
                let slot = [
                    &mut pins.udp_trap,
                    &mut pins.target_src,
                    &mut pins.target_dst,
                ];
                *slot.into_iter().nth(which).unwrap() = PathBuf::from(bad);
                let err = render(
                    MarkLayout::default(),
                    &QueueSettings::default(),
                    IpFamily::V4,
                    &pins,
                );
                assert!(err.is_err(), "{bad:?} accepted as pin {which}");
            }
        }
    }
}
