//! The global part of the datapath, installed by `run` before any PU: the
//! target and excluded sets, the `TRI-` chains, and the rules that steer
//! traffic into them (SPEC, "Global steering" and "The trap"). Pure text.
//!
//! The global traps of the identity handshake ([`crate::datapath::handshake`])
//! are here: a SYN-ACK to or from a target TCP network, a SYN from one
//! carrying TCP option 34, a UDP packet from a target UDP network carrying
//! the handshake signature (anywhere). A connection the consumer
//! authorised (at its first ACK) is accepted whole — but for a SYN-ACK,
//! which is trapped again should it come (a retransmission after a lost
//! ACK). The UDP signature rule comes before those accepts (SPEC's
//! order): a decided flow's datagram carrying it is trapped, and the
//! consumer accepts it unchanged by its connection mark ([`crate::trap`]).

use enforcer_common::marks::{Class, Kind};

use super::rules::{Ctx, Table, declare, section};
use super::sets::SetSpec;
use crate::datapath::handshake::{
    SYN_ACK, SYN_WITH_OPTION_34, new_connection_forgets_marks, udp_signature,
};
use crate::datapath::queues::{Direction, Trapped};
use crate::naming::{
    GlobalSet, HOST_CHAINS, HOST_SERVICE_CHAINS, MAIN_CHAINS, PROCESS_CHAINS, PROXY_CHAINS,
    REDIRECT_CHAINS, UID_CHAINS,
};
use crate::policy::{IpFamily, Mode};

/// The family's target TCP, target UDP and excluded sets, empty
/// (`set_target_networks` fills them).
pub fn sets(family: IpFamily) -> Vec<SetSpec> {
    GlobalSet::ALL
        .iter()
        .map(|set| SetSpec::networks(set.name(family), family, &[]))
        .collect()
}

/// The global chains and rules of one family, mangle then nat.
pub fn rules(ctx: &Ctx) -> String {
    section(Table::Mangle, &mangle(ctx)) + &section(Table::Nat, &nat(ctx))
}

fn mangle(ctx: &Ctx) -> Vec<String> {
    let local_server = ctx.mode == Mode::LocalServer;
    let mut pairs = vec![MAIN_CHAINS];
    if local_server {
        pairs.extend([PROCESS_CHAINS, HOST_SERVICE_CHAINS, HOST_CHAINS, UID_CHAINS]);
    }
    pairs.push(PROXY_CHAINS);
    let mut lines: Vec<String> = pairs
        .iter()
        .flat_map(|pair| [declare(pair.app), declare(pair.net)])
        .collect();

    let excluded = ctx.set(GlobalSet::Excluded);
    let proxy = ctx.mark_is(Kind::Proxy);
    let (app, net) = (MAIN_CHAINS.app, MAIN_CHAINS.net);

    lines.push(format!("-A {} {proxy} -j ACCEPT", PROXY_CHAINS.app));
    lines.push(format!("-A {} {proxy} -j ACCEPT", PROXY_CHAINS.net));

    // Outgoing.
    let target_tcp = ctx.set(GlobalSet::TargetTcp);
    let target_udp = ctx.set(GlobalSet::TargetUdp);
    lines.push(new_connection_forgets_marks(ctx.marks, app, false));
    lines.extend(verdict_rules(ctx, app));
    lines.push(format!("-A {app} -j {}", PROXY_CHAINS.app));
    lines.push(format!(
        "-A {app} {} -j ACCEPT",
        ctx.mark_is(Kind::Injected)
    ));
    lines.extend(connection_accepts(ctx, app));
    if local_server {
        lines.push(format!("-A {app} -j {}", UID_CHAINS.app));
    }
    // A SYN-ACK to a target TCP network is classed for the trap (the
    // consumer sees the same class as on the eBPF datapath) and queued.
    let synack_to_target = format!("{SYN_ACK} -m set --match-set {target_tcp} dst");
    lines.push(format!(
        "-A {app} {synack_to_target} -j {}",
        ctx.set_class(Class::TrapTcp)
    ));
    lines.push(format!(
        "-A {app} {synack_to_target} -j {}",
        ctx.queue(Direction::App, Trapped::SynAck)
    ));
    if local_server {
        for pair in [PROCESS_CHAINS, HOST_SERVICE_CHAINS, HOST_CHAINS] {
            lines.push(format!("-A {app} -j {}", pair.app));
        }
    }

    // Incoming.
    lines.push(new_connection_forgets_marks(ctx.marks, net, true));
    lines.extend(verdict_rules(ctx, net));
    lines.push(format!("-A {net} -j {}", PROXY_CHAINS.net));
    lines.push(format!(
        "-A {net} -p udp -m set --match-set {target_udp} src {} -j {}",
        udp_signature(),
        ctx.queue(Direction::Net, Trapped::Service)
    ));
    lines.extend(connection_accepts(ctx, net));
    if local_server {
        lines.push(format!("-A {net} -j {}", UID_CHAINS.net));
    }
    lines.push(format!(
        "-A {net} {SYN_ACK} -m set --match-set {target_tcp} src -j {}",
        ctx.queue(Direction::Net, Trapped::SynAck)
    ));
    lines.push(format!(
        "-A {net} {SYN_WITH_OPTION_34} -m set --match-set {target_tcp} src -j {}",
        ctx.queue(Direction::Net, Trapped::Syn)
    ));
    if local_server {
        for pair in [PROCESS_CHAINS, HOST_SERVICE_CHAINS, HOST_CHAINS] {
            lines.push(format!("-A {net} -j {}", pair.net));
        }
    }

    // Steering last: inserted first in the built-in chains, so that no
    // earlier ACCEPT there lets traffic bypass the agent.
    lines.push(format!(
        "-I OUTPUT 1 -m set ! --match-set {excluded} dst -j {app}"
    ));
    lines.push(format!(
        "-I INPUT 1 -m set ! --match-set {excluded} src -j {net}"
    ));
    lines
}

/// The first two rules of a main chain, the datapath's half of the trap
/// verdict contract (`crate::datapath`): a packet the consumer accepted
/// (kind `Authorised` written into its mark, NF_REPEAT) has that kind
/// saved into its connection, and is itself accepted — by its own mark,
/// so that a repeated packet can never be queued again whatever rules
/// come later.
fn verdict_rules(ctx: &Ctx, chain: &str) -> [String; 2] {
    let decided = ctx.mark_is(Kind::Authorised);
    [
        format!("-A {chain} {decided} -j {}", ctx.save_kind()),
        format!("-A {chain} {decided} -j ACCEPT"),
    ]
}

/// Connections an ACL accepted, then connections the consumer authorised
/// — but for their SYN-ACKs (SPEC): the two rules accept every other TCP
/// packet and every packet of another protocol.
fn connection_accepts(ctx: &Ctx, chain: &str) -> [String; 3] {
    let authorised = ctx.connmark_is(Kind::Authorised);
    [
        format!(
            "-A {chain} {} -j ACCEPT",
            ctx.connmark_is(Kind::ExternalAccepted)
        ),
        format!("-A {chain} -p tcp ! --tcp-flags SYN,ACK SYN,ACK {authorised} -j ACCEPT"),
        format!("-A {chain} ! -p tcp {authorised} -j ACCEPT"),
    ]
}

fn nat(ctx: &Ctx) -> Vec<String> {
    let excluded = ctx.set(GlobalSet::Excluded);
    let proxy = ctx.mark_is(Kind::Proxy);
    let (app, net) = (REDIRECT_CHAINS.app, REDIRECT_CHAINS.net);
    vec![
        declare(app),
        declare(net),
        format!("-A {app} {proxy} -j ACCEPT"),
        format!("-A {net} {proxy} -j ACCEPT"),
        format!(
            "-I PREROUTING 1 -m addrtype --dst-type LOCAL \
             -m set ! --match-set {excluded} src -j {net}"
        ),
        format!("-I OUTPUT 1 -m set ! --match-set {excluded} dst -j {app}"),
    ]
}

#[cfg(test)]
mod tests {
    use enforcer_common::marks::MarkLayout;

    use super::*;
    use crate::datapath::iptables::sets;
    use crate::policy::{FailMode, QueueSettings};

    fn ctx(family: IpFamily, queues: &QueueSettings) -> Ctx<'_> {
        Ctx {
            family,
            mode: Mode::LocalServer,
            marks: MarkLayout::default(),
            queues,
        }
    }

    /// Default marks (kind mask 0x700: authorised 0x100, external 0x200,
    /// proxy 0x300, injected 0x400) and queues (4 per range from 0: app
    /// SYN 0-3, ACK 4-7, SYN-ACK 8-11, service 12-15, net 16-31).
    #[test]
    fn global_rules_v4() {
        let queues = QueueSettings::default();
        let expected = r#"
*mangle
:TRI-App - [0:0]
:TRI-Net - [0:0]
:TRI-Pid-App - [0:0]
:TRI-Pid-Net - [0:0]
:TRI-Svc-App - [0:0]
:TRI-Svc-Net - [0:0]
:TRI-Hst-App - [0:0]
:TRI-Hst-Net - [0:0]
:TRI-UID-App - [0:0]
:TRI-UID-Net - [0:0]
:TRI-Prx-App - [0:0]
:TRI-Prx-Net - [0:0]
-A TRI-Prx-App -m mark --mark 0x300/0x700 -j ACCEPT
-A TRI-Prx-Net -m mark --mark 0x300/0x700 -j ACCEPT
-A TRI-App -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark 0x0/0x3f00
-A TRI-App -m mark --mark 0x100/0x700 -j CONNMARK --save-mark --nfmask 0x700 --ctmask 0x700
-A TRI-App -m mark --mark 0x100/0x700 -j ACCEPT
-A TRI-App -j TRI-Prx-App
-A TRI-App -m mark --mark 0x400/0x700 -j ACCEPT
-A TRI-App -m connmark --mark 0x200/0x700 -j ACCEPT
-A TRI-App -p tcp ! --tcp-flags SYN,ACK SYN,ACK -m connmark --mark 0x100/0x700 -j ACCEPT
-A TRI-App ! -p tcp -m connmark --mark 0x100/0x700 -j ACCEPT
-A TRI-App -j TRI-UID-App
-A TRI-App -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -m set --match-set TRI-v4-TargetTCP dst -j MARK --set-xmark 0x800/0x3800
-A TRI-App -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -m set --match-set TRI-v4-TargetTCP dst -j NFQUEUE --queue-balance 8:11 --queue-bypass
-A TRI-App -j TRI-Pid-App
-A TRI-App -j TRI-Svc-App
-A TRI-App -j TRI-Hst-App
-A TRI-Net ! -i lo -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark 0x0/0x3f00
-A TRI-Net -m mark --mark 0x100/0x700 -j CONNMARK --save-mark --nfmask 0x700 --ctmask 0x700
-A TRI-Net -m mark --mark 0x100/0x700 -j ACCEPT
-A TRI-Net -j TRI-Prx-Net
-A TRI-Net -p udp -m set --match-set TRI-v4-TargetUDP src -m string --string n30njxq7bmiwr6dtxq --algo bm --to 65535 -j NFQUEUE --queue-balance 28:31 --queue-bypass
-A TRI-Net -m connmark --mark 0x200/0x700 -j ACCEPT
-A TRI-Net -p tcp ! --tcp-flags SYN,ACK SYN,ACK -m connmark --mark 0x100/0x700 -j ACCEPT
-A TRI-Net ! -p tcp -m connmark --mark 0x100/0x700 -j ACCEPT
-A TRI-Net -j TRI-UID-Net
-A TRI-Net -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -m set --match-set TRI-v4-TargetTCP src -j NFQUEUE --queue-balance 24:27 --queue-bypass
-A TRI-Net -p tcp -m tcp --tcp-option 34 --tcp-flags SYN,ACK SYN -m set --match-set TRI-v4-TargetTCP src -j NFQUEUE --queue-balance 16:19 --queue-bypass
-A TRI-Net -j TRI-Pid-Net
-A TRI-Net -j TRI-Svc-Net
-A TRI-Net -j TRI-Hst-Net
-I OUTPUT 1 -m set ! --match-set TRI-v4-Excluded dst -j TRI-App
-I INPUT 1 -m set ! --match-set TRI-v4-Excluded src -j TRI-Net
COMMIT
*nat
:TRI-Redir-App - [0:0]
:TRI-Redir-Net - [0:0]
-A TRI-Redir-App -m mark --mark 0x300/0x700 -j ACCEPT
-A TRI-Redir-Net -m mark --mark 0x300/0x700 -j ACCEPT
-I PREROUTING 1 -m addrtype --dst-type LOCAL -m set ! --match-set TRI-v4-Excluded src -j TRI-Redir-Net
-I OUTPUT 1 -m set ! --match-set TRI-v4-Excluded dst -j TRI-Redir-App
COMMIT
"#;
        assert_eq!(rules(&ctx(IpFamily::V4, &queues)), expected[1..]);
        assert_eq!(
            sets::create(&sets(IpFamily::V4)),
            "create TRI-v4-TargetTCP hash:net family inet -exist\n\
             flush TRI-v4-TargetTCP\n\
             create TRI-v4-TargetUDP hash:net family inet -exist\n\
             flush TRI-v4-TargetUDP\n\
             create TRI-v4-Excluded hash:net family inet -exist\n\
             flush TRI-v4-Excluded\n"
        );
    }

    /// IPv6 with a moved mark field (shift 16: kind mask 0x70000, class
    /// mask 0x380000), one queue per range from 100, failing closed. Only
    /// the set names, marks and queues differ from IPv4.
    #[test]
    fn global_rules_v6() {
        let queues = QueueSettings {
            queues_per_range: 1,
            first_queue: 100,
            fail_mode: FailMode::Closed,
            ..QueueSettings::default()
        };
        let ctx = Ctx {
            marks: MarkLayout::new(16).unwrap(),
            ..ctx(IpFamily::V6, &queues)
        };
        let text = rules(&ctx);
        let lines: Vec<&str> = text.lines().collect();
        let with = |needle: &str| -> Vec<&str> {
            lines
                .iter()
                .copied()
                .filter(|l| l.contains(needle))
                .collect()
        };
        assert_eq!(
            with("NFQUEUE"),
            [
                "-A TRI-App -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -m set --match-set TRI-v6-TargetTCP dst -j NFQUEUE --queue-num 102",
                "-A TRI-Net -p udp -m set --match-set TRI-v6-TargetUDP src -m string --string n30njxq7bmiwr6dtxq --algo bm --to 65535 -j NFQUEUE --queue-num 107",
                "-A TRI-Net -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -m set --match-set TRI-v6-TargetTCP src -j NFQUEUE --queue-num 106",
                "-A TRI-Net -p tcp -m tcp --tcp-option 34 --tcp-flags SYN,ACK SYN -m set --match-set TRI-v6-TargetTCP src -j NFQUEUE --queue-num 104",
            ],
            "{text}"
        );
        assert_eq!(
            with("-j MARK"),
            [
                "-A TRI-App -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -m set --match-set TRI-v6-TargetTCP dst -j MARK --set-xmark 0x80000/0x380000"
            ]
        );
        assert_eq!(
            with("-I "),
            [
                "-I OUTPUT 1 -m set ! --match-set TRI-v6-Excluded dst -j TRI-App",
                "-I INPUT 1 -m set ! --match-set TRI-v6-Excluded src -j TRI-Net",
                "-I PREROUTING 1 -m addrtype --dst-type LOCAL -m set ! --match-set TRI-v6-Excluded src -j TRI-Redir-Net",
                "-I OUTPUT 1 -m set ! --match-set TRI-v6-Excluded dst -j TRI-Redir-App",
            ]
        );
        assert_eq!(
            with("--save-mark")[0],
            "-A TRI-App -m mark --mark 0x10000/0x70000 -j CONNMARK --save-mark --nfmask 0x70000 --ctmask 0x70000"
        );
        // Apart from those, the text is IPv4's with v6 set names.
        let v4_queues = QueueSettings::default();
        let v4 = rules(&super::tests::ctx(IpFamily::V4, &v4_queues));
        assert_eq!(lines.len(), v4.lines().count());
        assert!(!text.contains("v4"));
        let kinds: Vec<&str> = with("--mark ")
            .into_iter()
            .filter(|l| !l.contains("-j MARK"))
            .collect();
        assert_eq!(kinds.len(), 15);
        assert!(kinds.iter().all(|l| l.contains("/0x70000 ")), "{kinds:#?}");
    }

    #[test]
    fn other_modes_have_no_local_server_chains() {
        let queues = QueueSettings::default();
        let ctx = Ctx {
            mode: Mode::RemoteContainer,
            ..ctx(IpFamily::V4, &queues)
        };
        let text = rules(&ctx);
        for chain in ["TRI-Pid-", "TRI-UID-", "TRI-Svc-", "TRI-Hst-"] {
            assert!(!text.contains(chain), "{chain} in\n{text}");
        }
        assert!(text.contains("-A TRI-App -j TRI-Prx-App"));
    }
}
