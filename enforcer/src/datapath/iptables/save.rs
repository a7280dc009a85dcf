//! Reading `iptables-save` output: which of the agent's chains and hooks
//! exist — to remove them without knowing how they got there (a crashed
//! instance, a half-finished step) — and what the rules' counters say.
//! Pure text.

use std::collections::HashMap;

use super::rules::Table;
use crate::datapath::PacketCounts;
use crate::naming;

/// One `-A` line of a save.
struct SavedRule<'a> {
    /// Packets counted (`-c` saves only; else 0).
    packets: u64,
    chain: &'a str,
    /// Everything after `-A `: the chain and the rule spec, as saved.
    text: &'a str,
    /// The spec split as iptables-restore splits it (quotes removed).
    tokens: Vec<String>,
}

impl SavedRule<'_> {
    /// The `-j` target.
    fn target(&self) -> Option<&str> {
        let at = self.tokens.iter().position(|t| t == "-j")?;
        self.tokens.get(at + 1).map(String::as_str)
    }

    /// Whether the rule matches one of the agent's ACL sets.
    fn matches_acl_set(&self) -> bool {
        self.tokens
            .windows(2)
            .any(|w| w[0] == "--match-set" && naming::is_acl_set(&w[1]))
    }
}

fn rules(save: &str) -> impl Iterator<Item = SavedRule<'_>> {
    save.lines().filter_map(|line| {
        let (packets, rest) = match line.strip_prefix('[') {
            Some(counted) => {
                let (counters, rest) = counted.split_once("] ")?;
                (counters.split(':').next()?.parse().ok()?, rest)
            }
            None => (0, line),
        };
        let text = rest.strip_prefix("-A ")?;
        let tokens = split(text);
        let chain = text.split(' ').next()?;
        Some(SavedRule {
            packets,
            chain,
            text,
            tokens,
        })
    })
}

/// The chains a save declares (`:NAME POLICY [p:b]`).
fn chains(save: &str) -> impl Iterator<Item = &str> {
    save.lines()
        .filter_map(|line| line.strip_prefix(':')?.split(' ').next())
}

/// Restore lines that remove every chain `ours` claims, and every rule
/// of another chain that jumps to one: unhook (`-D` with the rule as
/// saved), flush all, then delete all (chains of ours may jump to each
/// other). Empty when nothing of ours is there.
pub fn teardown(save: &str, ours: impl Fn(&str) -> bool) -> Vec<String> {
    let mut lines: Vec<String> = rules(save)
        .filter(|rule| !ours(rule.chain) && rule.target().is_some_and(&ours))
        .map(|rule| format!("-D {}", rule.text))
        .collect();
    let mine: Vec<&str> = chains(save).filter(|chain| ours(chain)).collect();
    lines.extend(mine.iter().map(|chain| format!("-F {chain}")));
    lines.extend(mine.iter().map(|chain| format!("-X {chain}")));
    lines
}

/// `-D` lines for the rules of `chains` that carry the comment `comment`
/// (as saved, without quotes): a PU's rules in the global proxy chains.
pub fn tagged(save: &str, chains: &[&str], comment: &str) -> Vec<String> {
    rules(save)
        .filter(|rule| chains.contains(&rule.chain))
        .filter(|rule| {
            rule.tokens
                .windows(2)
                .any(|w| w[0] == "--comment" && w[1] == comment)
        })
        .map(|rule| format!("-D {}", rule.text))
        .collect()
}

/// One table's section of a save of every table (`*table` to `COMMIT`),
/// if the save has it.
pub fn table(save: &str, table: Table) -> Option<&str> {
    let header = format!("*{}\n", table.as_str());
    let start = if save.starts_with(&header) {
        0
    } else {
        save.find(&format!("\n{header}"))? + 1
    };
    let section = &save[start..];
    let end = section
        .find("\nCOMMIT\n")
        .map_or(section.len(), |at| at + "\nCOMMIT\n".len());
    Some(&section[..end])
}

/// The packets counted by the rules of each chain of the save, read in one
/// pass (a status at thousands of PUs looks up every PU's chains in the
/// same save): NFQUEUE rules as trapped — but for the handshake's first
/// ACK (the one trap bounded by `--connbytes`), which continues a set-up
/// already counted at its SYN, as the eBPF datapath counts a set-up once
/// — ACCEPT rules that match an ACL
/// set as accepted (not the established or ICMPv6 accepts), DROP rules as
/// dropped (ACL rejects and the final drop). Chains without such a rule
/// are absent.
pub fn counts_by_chain(save: &str) -> HashMap<&str, PacketCounts> {
    let mut by_chain: HashMap<&str, PacketCounts> = HashMap::new();
    for rule in rules(save) {
        let mut counts = PacketCounts::default();
        match rule.target() {
            Some("NFQUEUE") if rule.tokens.iter().any(|t| t == "--connbytes") => continue,
            Some("NFQUEUE") => counts.trapped = rule.packets,
            Some("ACCEPT") if rule.matches_acl_set() => counts.accepted = rule.packets,
            Some("DROP") => counts.dropped = rule.packets,
            _ => continue,
        }
        *by_chain.entry(rule.chain).or_default() += counts;
    }
    by_chain
}

/// [`counts_by_chain`] summed over `chains`.
pub fn count(by_chain: &HashMap<&str, PacketCounts>, chains: &[&str]) -> PacketCounts {
    let mut counts = PacketCounts::default();
    for chain in chains {
        if let Some(&c) = by_chain.get(chain) {
            counts += c;
        }
    }
    counts
}

/// Splits a saved rule into arguments as iptables-restore does: on
/// spaces, except inside double quotes, where `\` escapes a character.
fn split(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut token: Option<String> = None;
    let mut quoted = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                token.get_or_insert_default();
            }
            '\\' if quoted => token.get_or_insert_default().extend(chars.next()),
            ' ' if !quoted => tokens.extend(token.take()),
            c => token.get_or_insert_default().push(c),
        }
    }
    tokens.extend(token);
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured with `iptables-save -c -t mangle` (nf_tables flavour) in a
    /// test namespace after `run`, `configure` of PU `web` and an update to
    /// version 1 (a reject of port 7000, an accept of 7000 and 7001), with
    /// traffic; the lines kept are verbatim.
    const CAPTURED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 00:13:21 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:TRI-App - [0:0]
:TRI-App-webbBzx-1 - [0:0]
:TRI-Net - [0:0]
:TRI-Net-webbBzx-1 - [0:0]
:TRI-Pid-App - [0:0]
:TRI-Pid-Net - [0:0]
[30:1648] -A INPUT -m set ! --match-set TRI-v4-Excluded src -j TRI-Net
[36:1976] -A OUTPUT -m set ! --match-set TRI-v4-Excluded dst -j TRI-App
[14:748] -A TRI-App -m connmark --mark 0x200/0x700 -j ACCEPT
[0:0] -A TRI-App -p tcp -m set --match-set TRI-v4-TargetTCP dst -m tcp --tcp-flags SYN,ACK SYN,ACK -j NFQUEUE --queue-balance 8:11 --queue-bypass
[22:1228] -A TRI-App -j TRI-Pid-App
[2:120] -A TRI-App-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1a0 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 7000 -j NFLOG --nflog-prefix "webbBzx:reject:deny-7000" --nflog-group 10
[2:120] -A TRI-App-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1a0 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 7000 -j DROP
[1:60] -A TRI-App-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1a1 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 7000,7001 -j NFLOG --nflog-prefix "webbBzx:accept:allow-both" --nflog-group 10
[1:60] -A TRI-App-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1a1 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 7000,7001 -j CONNMARK --set-xmark 0x200/0x700
[1:60] -A TRI-App-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1a1 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 7000,7001 -j ACCEPT
[1:60] -A TRI-App-webbBzx-1 -p tcp -m set --match-set TRI-v4-TargetTCP dst -m tcp --tcp-flags SYN,ACK SYN -j NFQUEUE --queue-balance 0:3 --queue-bypass
[2:108] -A TRI-App-webbBzx-1 -p tcp -m set --match-set TRI-v4-TargetTCP dst -m tcp --tcp-flags FIN,SYN,RST,ACK ACK -m conntrack --ctdir ORIGINAL -m connbytes --connbytes 0:3 --connbytes-mode packets --connbytes-dir original -j NFQUEUE --queue-balance 4:7 --queue-bypass
[3:156] -A TRI-App-webbBzx-1 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
[0:0] -A TRI-App-webbBzx-1 -m conntrack --ctstate NEW -j NFLOG --nflog-prefix "webbBzx:default:" --nflog-group 10
[0:0] -A TRI-App-webbBzx-1 -j DROP
[1:60] -A TRI-Net -p tcp -m set --match-set TRI-v4-TargetTCP src -m tcp --tcp-flags SYN,ACK SYN,ACK -j NFQUEUE --queue-balance 24:27 --queue-bypass
[16:884] -A TRI-Net -j TRI-Pid-Net
[2:120] -A TRI-Net-webbBzx-1 -m conntrack --ctstate NEW -j NFLOG --nflog-prefix "webbBzx:default:" --nflog-group 11
[2:120] -A TRI-Net-webbBzx-1 -j DROP
[9:504] -A TRI-Pid-App -m cgroup --path enft21067x2 -m comment --comment "PU web" -j TRI-App-webbBzx-1
[2:120] -A TRI-Pid-Net -p tcp -m set --match-set TRI-v4-ProcPort-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-1
[0:0] -A TRI-Pid-Net -p udp -m set --match-set TRI-v4-ProcUDP-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-1
COMMIT
# Completed on Fri Nov 27 00:13:21 2026
"#;

    #[test]
    fn counts_by_target_in_the_given_chains() {
        let by_chain = counts_by_chain(CAPTURED);
        let pu = count(&by_chain, &["TRI-App-webbBzx-1", "TRI-Net-webbBzx-1"]);
        // Trapped: the SYN 1 (not the first ACK's 2). Accepted: the ACL's ACCEPT only, not
        // the established one. Dropped: the reject 2 + the net drop 2.
        assert_eq!(
            pu,
            PacketCounts {
                trapped: 1,
                accepted: 1,
                dropped: 4
            }
        );
        let global = count(&by_chain, &["TRI-App", "TRI-Net"]);
        assert_eq!(
            global,
            PacketCounts {
                trapped: 1,
                ..Default::default()
            }
        );
        assert_eq!(
            count(&counts_by_chain(""), &["TRI-App"]),
            PacketCounts::default()
        );
    }

    #[test]
    fn finds_each_table_of_a_whole_save() {
        let mangle = "*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j TRI-App\nCOMMIT\n";
        let nat = "*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        let whole =
            format!("# Generated by iptables-save\n{mangle}# Completed\n# Generated\n{nat}");
        assert_eq!(table(&whole, Table::Mangle), Some(mangle));
        assert_eq!(table(&whole, Table::Nat), Some(nat));
        assert_eq!(table(mangle, Table::Mangle), Some(mangle));
        assert_eq!(table(mangle, Table::Nat), None);
        assert_eq!(table("", Table::Nat), None);
        // A chain named like a table header is not one.
        assert_eq!(table(":*nat - [0:0]\n", Table::Nat), None);
    }

    #[test]
    fn teardown_of_everything_the_agent_made() {
        assert_eq!(
            teardown(CAPTURED, naming::is_agent_chain),
            [
                "-D INPUT -m set ! --match-set TRI-v4-Excluded src -j TRI-Net",
                "-D OUTPUT -m set ! --match-set TRI-v4-Excluded dst -j TRI-App",
                "-F TRI-App",
                "-F TRI-App-webbBzx-1",
                "-F TRI-Net",
                "-F TRI-Net-webbBzx-1",
                "-F TRI-Pid-App",
                "-F TRI-Pid-Net",
                "-X TRI-App",
                "-X TRI-App-webbBzx-1",
                "-X TRI-Net",
                "-X TRI-Net-webbBzx-1",
                "-X TRI-Pid-App",
                "-X TRI-Pid-Net",
            ]
        );
    }

    #[test]
    fn teardown_of_one_pu_keeps_the_rest() {
        let pu = ["TRI-App-webbBzx-1", "TRI-Net-webbBzx-1"];
        assert_eq!(
            teardown(CAPTURED, |chain| pu.contains(&chain)),
            [
                r#"-D TRI-Pid-App -m cgroup --path enft21067x2 -m comment --comment "PU web" -j TRI-App-webbBzx-1"#,
                r#"-D TRI-Pid-Net -p tcp -m set --match-set TRI-v4-ProcPort-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-1"#,
                r#"-D TRI-Pid-Net -p udp -m set --match-set TRI-v4-ProcUDP-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-1"#,
                "-F TRI-App-webbBzx-1",
                "-F TRI-Net-webbBzx-1",
                "-X TRI-App-webbBzx-1",
                "-X TRI-Net-webbBzx-1",
            ]
        );
        assert!(teardown(CAPTURED, |chain| chain == "TRI-Gone").is_empty());
    }

    /// Another user's chain that jumps to ours is unhooked; a comment that
    /// merely mentions one of ours is not a jump. Without `-c`, lines have
    /// no counters.
    #[test]
    fn teardown_finds_jumps_by_target_not_by_text() {
        let save = "*mangle\n\
                    :INPUT ACCEPT [0:0]\n\
                    :OTHER - [0:0]\n\
                    :TRI-Net - [0:0]\n\
                    -A INPUT -m comment --comment \"see -j TRI-Net\" -j OTHER\n\
                    -A OTHER -p tcp -j TRI-Net\n\
                    COMMIT\n";
        assert_eq!(
            teardown(save, naming::is_agent_chain),
            ["-D OTHER -p tcp -j TRI-Net", "-F TRI-Net", "-X TRI-Net"]
        );
    }

    #[test]
    fn splits_like_iptables_restore() {
        assert_eq!(
            split(r#"X -m comment --comment "a \"b\" -j c" -j ""  Y"#),
            [
                "X",
                "-m",
                "comment",
                "--comment",
                r#"a "b" -j c"#,
                "-j",
                "",
                "Y"
            ]
        );
    }
}
