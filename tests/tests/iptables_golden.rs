//! The fallback's rendering, loaded by the kernel (issue 4, item 6).
//!
//! For a matrix of scenarios — the global rules with the default and a
//! moved mark layout, one PU with a mix of ACLs, a PU update, and a PU
//! hooked by net_cls class id — the
//! restore text comes from the agent's own pure renderers
//! (`enforcer::datapath::iptables::{global, pu, sets, rules}`) and goes,
//! in a fresh network namespace of its own:
//! 1. sets through `ipset restore`, for real (ipset has no test mode);
//! 2. rules through `iptables-restore --test` / `ip6tables-restore --test`;
//! 3. rules through the same tool for real: with the nf_tables flavour
//!    `--test` is a parse in user space (a `-D` of a rule that does not
//!    exist, a jump to a missing chain or a cgroup that does not exist all
//!    pass it), so only a real commit lets the kernel check every match
//!    and target.
//!
//! Then the order of the rules — in the rendered text *and* in what the
//! kernel holds (`iptables-save`) — is compared with lists written by hand
//! from SPEC ("Global steering", "Order of evaluation inside a PU", "The
//! trap"), never captured from the code. Every scenario runs for IPv4 and
//! IPv6, with each netfilter flavour on the machine (nf_tables and
//! legacy; one per namespace, never mixed).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use enforcer::datapath::iptables::{
    exec, global,
    pu::PuPlan,
    rules::{Ctx, Table, section},
    sets,
};
use enforcer::datapath::netcls::ClassId;
use enforcer::datapath::queues::Direction;
use enforcer::naming::{self, NameRegistry, PortSet, ShortName};
use enforcer::policy::{Configuration, Pu};
use enforcer_tests::{
    cgroup::Cgroup,
    config::{Acl, Config, EVERY_PORT, Port, Pu as PuFile},
    netfilter::{self, Backend, Family},
    netns::Netns,
    privilege,
};

// Each scenario body once per flavour and family: `nft::v4::name`,
// `nft::v6::name`, `legacy::v4::name`, …
enforcer_tests::on_both_backends_and_families!(
    global_rules_with_the_default_mark_layout,
    global_rules_with_a_moved_mark_layout,
    pu_with_a_mix_of_acls,
    pu_update_hooks_the_new_version_and_unhooks_the_old,
    net_cls_pu_hooks_by_class_id,
    pu_with_a_proxy,
    the_loader_refuses_what_the_kernel_refuses,
);

// ------------------------------------------------------------------ lab

/// A fresh namespace, the flavour and family under test, and a cgroup for
/// the PU (`-m cgroup --path` needs it to exist).
struct Lab {
    backend: Backend,
    family: Family,
    cgroup: Cgroup,
    ns: Netns,
}

impl Lab {
    fn new(env: &privilege::Env, backend: Backend, family: Family) -> Result<Self> {
        Ok(Self {
            backend,
            family,
            cgroup: Cgroup::new(&env.cgroup2)?,
            ns: Netns::new()?,
        })
    }

    /// The PU's cgroup, relative to the cgroup v2 mount.
    fn cgroup_rel(&self) -> String {
        self.cgroup
            .path()
            .file_name()
            .expect("cgroup dir name")
            .to_string_lossy()
            .into_owned()
    }

    /// `ipset restore`, for real.
    fn ipset(&self, text: &str) -> Result<()> {
        netfilter::feed(&self.ns, "ipset", &["restore"], text).map(drop)
    }

    /// `ipset save`.
    fn ipset_save(&self) -> Result<String> {
        netfilter::feed(&self.ns, "ipset", &["save"], "")
    }

    /// `iptables-restore --test --noflush`: parsed, never committed.
    fn test(&self, text: &str) -> Result<()> {
        let tool = *exec::tools(self.backend).restore.get(self.family);
        netfilter::feed(&self.ns, tool, &["--test", "--noflush", "--wait"], text).map(drop)
    }

    /// `iptables-restore --noflush`, as the agent applies its text.
    fn load(&self, text: &str) -> Result<()> {
        let tool = *exec::tools(self.backend).restore.get(self.family);
        netfilter::feed(&self.ns, tool, &["--noflush", "--wait"], text).map(drop)
    }

    /// `--test`, then for real.
    fn test_and_load(&self, text: &str) -> Result<()> {
        self.test(text).context("iptables-restore --test")?;
        self.load(text).context("iptables-restore")
    }

    /// One table as the kernel holds it.
    fn save(&self, table: Table) -> Result<String> {
        let tool = *exec::tools(self.backend).save.get(self.family);
        netfilter::feed(&self.ns, tool, &["-t", table.as_str()], "")
    }

    /// What `run` installs: the global sets, then the global rules.
    fn install_global(&self, ctx: &Ctx) -> Result<String> {
        self.ipset(&sets::create(&global::sets(self.family)))?;
        let text = global::rules(ctx);
        self.test_and_load(&text)?;
        Ok(text)
    }
}

/// The family's tag in set names, by hand: `v4`, `v6`.
fn tag(family: Family) -> &'static str {
    match family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

fn ctx<'a>(config: &'a Configuration, family: Family) -> Ctx<'a> {
    Ctx {
        family,
        mode: config.mode,
        marks: config.marks.layout(),
        queues: &config.queues,
    }
}

fn short_name(pu: &Pu) -> Result<ShortName> {
    Ok(NameRegistry::new().assign(&pu.id)?)
}

// ------------------------------------------------------- reading rules

/// A rule's words, a double-quoted string counting as one (unquoted).
fn words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// The word after `flag`.
fn after<'w>(words: &'w [String], flag: &str) -> Option<&'w str> {
    let i = words.iter().position(|w| w == flag)?;
    words.get(i + 1).map(String::as_str)
}

/// Whether `flag` is negated (`! --flag`).
fn negated(words: &[String], flag: &str) -> bool {
    words
        .iter()
        .position(|w| w == flag)
        .is_some_and(|i| i > 0 && words[i - 1] == "!")
}

/// The rules of `chain` in restore or save text, without `-A <chain>`.
fn chain_rules(text: &str, chain: &str) -> Vec<String> {
    let head = format!("-A {chain} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&head))
        .map(str::to_owned)
        .collect()
}

/// The first rule of a built-in chain in save text.
fn first_rule(text: &str, chain: &str) -> Option<String> {
    chain_rules(text, chain).into_iter().next()
}

/// A rule's target with the arguments that tell its meaning: the NFLOG
/// group, the connection mark written or saved, the queue range.
fn target(words: &[String]) -> String {
    let Some(target) = after(words, "-j") else {
        return "(no target)".into();
    };
    let arg = |flag| after(words, flag).unwrap_or("?");
    match target {
        "NFLOG" => format!("NFLOG {}", arg("--nflog-group")),
        // The range, and whether the rule fails open when no one listens.
        "NFQUEUE" => {
            let bypass = if words.iter().any(|w| w == "--queue-bypass") {
                " bypass"
            } else {
                ""
            };
            format!("NFQUEUE {}{bypass}", arg("--queue-balance"))
        }
        "CONNMARK" if after(words, "--set-xmark").is_some() => {
            format!("CONNMARK set {}", arg("--set-xmark"))
        }
        "CONNMARK" => format!("CONNMARK save {}/{}", arg("--nfmask"), arg("--ctmask")),
        "MARK" => format!("MARK set {}", arg("--set-xmark")),
        other => other.into(),
    }
}

/// A global rule in a few words: its protocol, TCP flags and option,
/// string, mark, connection-mark, set and address-type conditions and its
/// target, e.g. `mark 0x100/0x700 -> ACCEPT`, `!TRI-v4-Excluded dst ->
/// TRI-App`, `tcp flags SYN,ACK SYN,ACK TRI-v4-TargetTCP src -> NFQUEUE
/// 24:27 bypass`.
fn global_summary(rule: &str) -> String {
    let w = words(rule);
    let mut parts = Vec::new();
    let mut module = "";
    let not = |i: usize| if i > 0 && w[i - 1] == "!" { "!" } else { "" };
    for (i, word) in w.iter().enumerate() {
        let next = w.get(i + 1).map(String::as_str).unwrap_or("?");
        match word.as_str() {
            "-m" => module = next,
            "--mark" => parts.push(format!("{module} {next}")),
            "--dst-type" => parts.push(format!("dst-type {next}")),
            "--comment" => parts.push(format!("comment {next}")),
            "-p" => parts.push(format!("{}{next}", not(i))),
            "--tcp-flags" => {
                let comparison = w.get(i + 2).map(String::as_str).unwrap_or("?");
                parts.push(format!("{}flags {next} {comparison}", not(i)));
            }
            "--tcp-option" => parts.push(format!("option {next}")),
            "--string" => parts.push(format!("string {next}")),
            "--match-set" => {
                let not = if w[i - 1] == "!" { "!" } else { "" };
                let dir = w.get(i + 2).map(String::as_str).unwrap_or("?");
                parts.push(format!("{not}{next} {dir}"));
            }
            _ => {}
        }
    }
    parts.push(format!("-> {}", target(&w)));
    parts.join(" ")
}

/// The ACL sets of a PU plan in one family, with the policy id of the
/// ACL each belongs to: the set names are derived from the declaration
/// index, so a rule's set tells which ACL it is.
fn acl_policies(
    pu: &Pu,
    short: &ShortName,
    version: u8,
    family: Family,
) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for (direction, acls) in [
        (Direction::App, &pu.application_acls),
        (Direction::Net, &pu.network_acls),
    ] {
        for (index, acl) in (0u16..).zip(acls) {
            let set = naming::acl_set(family, short, version, direction, index);
            map.insert(set, acl.policy_id.to_string());
        }
    }
    map
}

/// A PU chain's rule in a few words, e.g. `no-api-5 tcp 443 DROP` (an ACL
/// by its policy id, its protocol, its ports), `reply dns udp 53 ACCEPT`
/// (the reverse accept of a UDP ACL of the other side), `trap tcp SYN
/// 0:3 bypass` (the queue range, failing open), `default !NEW NFLOG 10`.
fn pu_summary(rule: &str, acls: &BTreeMap<String, String>) -> String {
    let w = words(rule);
    let target = target(&w);
    let proto = match after(&w, "-p") {
        None => "any",
        // iptables-save spells ICMPv6 as /etc/protocols does.
        Some("ipv6-icmp" | "icmpv6") => "icmpv6",
        Some(p) => p,
    };
    let acl = w
        .windows(2)
        .find(|p| p[0] == "--match-set" && acls.contains_key(&p[1]))
        .map(|p| &acls[&p[1]]);
    // iptables-save lists states in its own order (RELATED,ESTABLISHED).
    let ctstate = after(&w, "--ctstate").map(|states| {
        let mut states: Vec<&str> = states.split(',').collect();
        states.sort_unstable();
        states.join(",")
    });
    let ctstate = ctstate.as_deref();
    if let Some(policy) = acl {
        let ports = after(&w, "--dports")
            .or(after(&w, "--sports"))
            .unwrap_or("*");
        let reply = if ctstate == Some("ESTABLISHED") {
            "reply "
        } else {
            ""
        };
        return format!("{reply}{policy} {proto} {ports} {target}");
    }
    if target.starts_with("NFQUEUE") {
        let what = if w.iter().any(|x| x == "--connbytes") {
            " ACK"
        } else if w.iter().any(|x| x == "--tcp-flags") {
            " SYN"
        } else if w.iter().any(|x| x == "--limit") {
            " limited"
        } else {
            ""
        };
        let range = target.trim_start_matches("NFQUEUE ");
        return format!("trap {proto}{what} {range}");
    }
    match (ctstate, rule) {
        (Some("ESTABLISHED,RELATED"), _) => format!("established {target}"),
        (Some("NEW"), _) if negated(&w, "--ctstate") => format!("default !NEW {target}"),
        (Some("NEW"), _) => format!("default NEW {target}"),
        (None, "-j DROP") => "DROP".into(),
        (None, _) if proto == "icmpv6" && w.len() == 4 => format!("icmpv6 {target}"),
        _ => format!("unrecognised: {rule}"),
    }
}

/// The summaries of a PU chain's rules.
fn pu_chain(text: &str, chain: &str, acls: &BTreeMap<String, String>) -> Vec<String> {
    chain_rules(text, chain)
        .iter()
        .map(|r| pu_summary(r, acls))
        .collect()
}

/// SPEC: specific-protocol ACLs apply to peers outside the target TCP
/// set only, and TCP ones to new connections only; protocol-any ACLs to
/// everything they cover.
fn assert_acl_scopes(text: &str, chain: &str, acls: &BTreeMap<String, String>, family: Family) {
    let not_target = format!("! --match-set TRI-{}-TargetTCP ", tag(family));
    for rule in chain_rules(text, chain) {
        let w = words(&rule);
        let is_acl = w
            .windows(2)
            .any(|p| p[0] == "--match-set" && acls.contains_key(&p[1]));
        if !is_acl {
            continue;
        }
        let any = after(&w, "-p").is_none();
        assert_eq!(
            rule.contains(&not_target),
            !any,
            "only specific-protocol ACLs skip the target TCP peers: {rule}"
        );
        if after(&w, "-p") == Some("tcp") {
            assert_eq!(after(&w, "--ctstate"), Some("NEW"), "{rule}");
        }
    }
}

/// The hooks of a PU: outgoing by its cgroup, incoming by its TCP and
/// UDP port sets, each to the chain of its direction.
fn assert_hooks(
    saved: &str,
    cgroup: &str,
    short: &ShortName,
    family: Family,
    chains: (&str, &str),
) {
    let app = chain_rules(saved, "TRI-Pid-App");
    assert_eq!(app.len(), 1, "one outgoing hook: {app:#?}");
    let w = words(&app[0]);
    assert_eq!(after(&w, "--path"), Some(cgroup), "{}", app[0]);
    assert_eq!(after(&w, "-j"), Some(chains.0), "{}", app[0]);
    let net = chain_rules(saved, "TRI-Pid-Net");
    let summaries: Vec<String> = net.iter().map(|r| global_summary(r)).collect();
    let (tcp, udp) = (
        PortSet::Process.name(family, short),
        PortSet::ProcessUdp.name(family, short),
    );
    assert_eq!(
        summaries,
        [
            format!("tcp {tcp} dst comment PU web -> {}", chains.1),
            format!("udp {udp} dst comment PU web -> {}", chains.1),
        ]
    );
}

/// Whether save text declares `chain`.
fn declares(saved: &str, chain: &str) -> bool {
    saved.lines().any(|l| l.starts_with(&format!(":{chain} ")))
}

// ------------------------------------------------------- global rules

/// The mark values of a layout, written out by hand.
struct Marks {
    authorised: &'static str,
    external: &'static str,
    proxy: &'static str,
    injected: &'static str,
    /// The class "trap TCP set-up" under the class mask.
    trap_tcp: &'static str,
    /// The kind mask alone, as CONNMARK's save masks print it.
    mask: &'static str,
}

fn global_rules_with_the_default_mark_layout(backend: Backend, family: Family) -> Result<()> {
    // The default field is 0x3f00; its kind sub-field 0x700 (1 authorised,
    // 2 external, 3 proxy, 4 injected).
    let marks = Marks {
        authorised: "0x100/0x700",
        external: "0x200/0x700",
        proxy: "0x300/0x700",
        injected: "0x400/0x700",
        trap_tcp: "0x800/0x3800",
        mask: "0x700",
    };
    global_rules(backend, family, "", &marks)
}

fn global_rules_with_a_moved_mark_layout(backend: Backend, family: Family) -> Result<()> {
    // shift 16: the field is 0x3f0000, the kind sub-field 0x70000.
    let marks = Marks {
        authorised: "0x10000/0x70000",
        external: "0x20000/0x70000",
        proxy: "0x30000/0x70000",
        injected: "0x40000/0x70000",
        trap_tcp: "0x80000/0x380000",
        mask: "0x70000",
    };
    global_rules(backend, family, "[marks]\nshift = 16\n", &marks)
}

/// The global sets and rules of one family; a foreign rule already in
/// OUTPUT and INPUT (the host's own) must stay, after the agent's jumps.
fn global_rules(backend: Backend, family: Family, settings: &str, m: &Marks) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let lab = Lab::new(&env, backend, family)?;
    let config = Configuration::from_toml_str(&format!("mode = \"local-server\"\n{settings}"))?;
    let ctx = ctx(&config, family);
    lab.load(
        "*mangle\n\
         -A OUTPUT -m comment --comment host-rule -j ACCEPT\n\
         -A INPUT -m comment --comment host-rule -j ACCEPT\n\
         COMMIT\n",
    )?;
    let text = lab.install_global(&ctx)?;

    // The sets: hash:net of the family, empty.
    let inet = match family {
        Family::V4 => "inet",
        Family::V6 => "inet6",
    };
    let ipsets = lab.ipset_save()?;
    for set in ["TargetTCP", "TargetUDP", "Excluded"] {
        let create = format!("create TRI-{}-{set} hash:net family {inet} ", tag(family));
        assert!(ipsets.contains(&create), "{create:?} in:\n{ipsets}");
    }
    assert!(!ipsets.contains("\nadd "), "empty sets:\n{ipsets}");

    let excluded = format!("TRI-{}-Excluded", tag(family));
    // SPEC, "Global steering", outgoing: the consumer's verdict (kind
    // authorised in the packet mark) is saved into the connection and
    // accepted ("The trap"); then the proxy chain, injected packets,
    // connections with the external and — but for SYN-ACKs — the
    // handshake mark, the UID chain, a SYN-ACK to a target TCP network
    // classed and trapped, and the process, host-service and host chains
    // in that priority. Incoming mirrors it, without the injected mark,
    // with the UDP signature trapped before the connection accepts, and
    // a SYN-ACK and a SYN with TCP option 34 from a target TCP network
    // trapped. Default queues: app SYN-ACK 8-11; net SYN 16-19, SYN-ACK
    // 24-27, service 28-31.
    let (target_tcp, target_udp) = (
        format!("TRI-{}-TargetTCP", tag(family)),
        format!("TRI-{}-TargetUDP", tag(family)),
    );
    let synack = "tcp flags SYN,ACK SYN,ACK";
    let steering = |side: &str| -> Vec<String> {
        let mut rules = vec![
            format!(
                "mark {} -> CONNMARK save {}/{}",
                m.authorised, m.mask, m.mask
            ),
            format!("mark {} -> ACCEPT", m.authorised),
            format!("-> TRI-Prx-{side}"),
        ];
        if side == "App" {
            rules.push(format!("mark {} -> ACCEPT", m.injected));
        } else {
            rules.push(format!(
                "udp {target_udp} src string n30njxq7bmiwr6dtxq -> NFQUEUE 28:31 bypass"
            ));
        }
        rules.extend([
            format!("connmark {} -> ACCEPT", m.external),
            format!(
                "tcp !flags SYN,ACK SYN,ACK connmark {} -> ACCEPT",
                m.authorised
            ),
            format!("!tcp connmark {} -> ACCEPT", m.authorised),
            format!("-> TRI-UID-{side}"),
        ]);
        if side == "App" {
            rules.extend([
                format!("{synack} {target_tcp} dst -> MARK set {}", m.trap_tcp),
                format!("{synack} {target_tcp} dst -> NFQUEUE 8:11 bypass"),
            ]);
        } else {
            rules.extend([
                format!("{synack} {target_tcp} src -> NFQUEUE 24:27 bypass"),
                format!("tcp option 34 flags SYN,ACK SYN {target_tcp} src -> NFQUEUE 16:19 bypass"),
            ]);
        }
        rules.extend(["Pid", "Svc", "Hst"].map(|chain| format!("-> TRI-{chain}-{side}")));
        rules
    };
    let (app, net) = (steering("App"), steering("Net"));
    let proxy = [format!("mark {} -> ACCEPT", m.proxy)];
    // Steering first in the built-in chains, before the host's rule;
    // skipped for excluded peers.
    let output = [
        format!("!{excluded} dst -> TRI-App"),
        "comment host-rule -> ACCEPT".to_string(),
    ];
    let input = [
        format!("!{excluded} src -> TRI-Net"),
        "comment host-rule -> ACCEPT".to_string(),
    ];

    let mangle_saved = lab.save(Table::Mangle)?;
    let summary = |text: &str, chain: &str| -> Vec<String> {
        chain_rules(text, chain)
            .iter()
            .map(|r| global_summary(r))
            .collect()
    };
    // The rendered text appends to the agent's chains and inserts into the
    // built-in ones; the kernel holds them in the same order.
    for (what, mangle) in [("rendered", text.as_str()), ("kernel", &mangle_saved)] {
        assert_eq!(summary(mangle, "TRI-App"), app, "{what} TRI-App");
        assert_eq!(summary(mangle, "TRI-Net"), net, "{what} TRI-Net");
        assert_eq!(summary(mangle, "TRI-Prx-App"), proxy, "{what} TRI-Prx-App");
        assert_eq!(summary(mangle, "TRI-Prx-Net"), proxy, "{what} TRI-Prx-Net");
    }
    assert_eq!(summary(&mangle_saved, "OUTPUT"), output);
    assert_eq!(summary(&mangle_saved, "INPUT"), input);
    for chain in [
        "TRI-Pid-App",
        "TRI-Pid-Net",
        "TRI-Svc-App",
        "TRI-Svc-Net",
        "TRI-Hst-App",
        "TRI-Hst-Net",
        "TRI-UID-App",
        "TRI-UID-Net",
    ] {
        assert!(declares(&mangle_saved, chain), "{chain}:\n{mangle_saved}");
        assert!(
            chain_rules(&mangle_saved, chain).is_empty(),
            "{chain} empty"
        );
    }

    // nat: the redirect chains accept proxy traffic first; PREROUTING
    // (local destinations) and OUTPUT jump to them unless excluded.
    let nat_saved = lab.save(Table::Nat)?;
    assert_eq!(summary(&nat_saved, "TRI-Redir-App"), proxy);
    assert_eq!(summary(&nat_saved, "TRI-Redir-Net"), proxy);
    assert_eq!(
        first_rule(&nat_saved, "PREROUTING").map(|r| global_summary(&r)),
        Some(format!("dst-type LOCAL !{excluded} src -> TRI-Redir-Net"))
    );
    assert_eq!(
        first_rule(&nat_saved, "OUTPUT").map(|r| global_summary(&r)),
        Some(format!("!{excluded} dst -> TRI-Redir-App"))
    );
    // Nothing of the other family.
    let other_family = match family {
        Family::V4 => "v6",
        Family::V6 => "v4",
    };
    assert!(!text.contains(&format!("TRI-{other_family}-")), "{text}");
    Ok(())
}

// --------------------------------------------------------- PU with ACLs

/// The PU `web` of `cgroup` with a mix of ACLs, declared in an order
/// that is not the bucket order; `a<n>`/`n<n>` is an ACL's index among its
/// side's (the index its sets are named by).
fn acl_mix(cgroup: &Cgroup) -> PuFile {
    PuFile::process_of("web", cgroup)
        .tcp_ports([Port::from(80), Port::range(8000, 8080)])
        .udp_ports([5353])
        // a0: accept, a port and a range
        .application_acl(
            Acl::accept("allow-api", ["10.30.0.0/16", "fd00:30::/64"])
                .tcp([Port::from(443), Port::range(9000, 9100)]),
        )
        // a1: reject observe-continue, two protocols, every port
        .application_acl(
            Acl::reject("trial-deny", ["10.30.0.0/16", "fd00:30::/64"])
                .tcp(EVERY_PORT)
                .udp(EVERY_PORT)
                .observe_continue(),
        )
        // a2: UDP accept (its replies are accepted on the net side)
        .application_acl(Acl::accept("dns", ["10.0.0.53/32", "fd00::53/128"]).udp([53]))
        // a3: accept observe-apply to every address (/0: split in halves)
        .application_acl(
            Acl::accept("audit-all", ["0.0.0.0/0", "::/0"])
                .tcp([8443])
                .observe_apply(),
        )
        // a4: reject, logged, inside a0's networks
        .application_acl(
            Acl::reject("no-api-5", ["10.30.5.0/24", "fd00:30::5:0/112"])
                .tcp([443])
                .log(),
        )
        // a5: accept observe-continue
        .application_acl(
            Acl::accept("watch-api", ["10.30.0.0/16", "fd00:30::/64"])
                .tcp([443])
                .observe_continue(),
        )
        // a6: reject observe-apply, a range
        .application_acl(
            Acl::reject("quarantine", ["10.31.0.0/16", "fd00:31::/64"])
                .tcp([Port::range(1, 1023)])
                .observe_apply(),
        )
        // a7: protocol any, reject, logged
        .application_acl(
            Acl::reject("legacy", ["192.168.100.0/24", "fd00:100::/64"])
                .any()
                .log(),
        )
        // a8: protocol any, accept
        .application_acl(Acl::accept("partners", ["172.16.0.0/12", "fd00:172::/48"]).any())
        // a9: ICMP accept: IPv4 only
        .application_acl(
            Acl::accept("ping", ["10.99.0.0/24", "fd00:99::/64"]).protocol("icmp", EVERY_PORT),
        )
        // a10: ICMPv6 accept: IPv6 only
        .application_acl(
            Acl::accept("ping6", ["10.99.0.0/24", "fd00:99::/64"]).protocol("icmpv6", EVERY_PORT),
        )
        // a11: IPv4 networks only
        .application_acl(Acl::accept("v4-only", ["10.40.0.0/16"]).tcp([22]))
        // n0: accept from every address, two ports
        .network_acl(Acl::accept("public-web", ["0.0.0.0/0", "::/0"]).tcp([80, 443]))
        // n1: protocol any, reject observe-apply, logged
        .network_acl(
            Acl::reject("no-guests", ["10.66.0.0/16", "fd00:66::/64"])
                .any()
                .observe_apply()
                .log(),
        )
        // n2: UDP accept (its replies are accepted on the app side)
        .network_acl(Acl::accept("metrics", ["10.70.0.0/16", "fd00:70::/64"]).udp([9125]))
        // n3: reject, every port
        .network_acl(
            Acl::reject("block-scanners", ["10.67.0.0/16", "fd00:67::/64"]).tcp(EVERY_PORT),
        )
}

/// acl_mix()'s outgoing chain, by hand from SPEC ("Order of evaluation
/// inside a PU"): specific-protocol ACLs bucket by bucket — reject
/// observe-continue, reject, reject observe-apply, accept
/// observe-continue, accept, accept observe-apply — declaration order
/// within a bucket; observe-continue only logs, observe-apply and `log`
/// log first; an accept marks the connection external-accepted. Then the
/// replies of the other side's UDP accepts, ICMPv6 (IPv6 only), the trap
/// (app queue ranges SYN 0-3, ACK 4-7, service 12-15), established,
/// protocol-any ACLs in bucket order, log NEW and the rest (group 10),
/// drop.
fn expected_app(family: Family) -> Vec<&'static str> {
    let mut rules = vec![
        "trial-deny tcp * NFLOG 10",
        "trial-deny udp * NFLOG 10",
        "no-api-5 tcp 443 NFLOG 10",
        "no-api-5 tcp 443 DROP",
        "quarantine tcp 1:1023 NFLOG 10",
        "quarantine tcp 1:1023 DROP",
        "watch-api tcp 443 NFLOG 10",
        "allow-api tcp 443,9000:9100 CONNMARK set 0x200/0x700",
        "allow-api tcp 443,9000:9100 ACCEPT",
        "dns udp 53 CONNMARK set 0x200/0x700",
        "dns udp 53 ACCEPT",
    ];
    // The accept bucket's ACLs of one family only.
    rules.extend(match family {
        Family::V4 => &[
            "ping icmp * CONNMARK set 0x200/0x700",
            "ping icmp * ACCEPT",
            "v4-only tcp 22 CONNMARK set 0x200/0x700",
            "v4-only tcp 22 ACCEPT",
        ][..],
        Family::V6 => &[
            "ping6 icmpv6 * CONNMARK set 0x200/0x700",
            "ping6 icmpv6 * ACCEPT",
        ],
    });
    rules.extend([
        "audit-all tcp 8443 NFLOG 10",
        "audit-all tcp 8443 CONNMARK set 0x200/0x700",
        "audit-all tcp 8443 ACCEPT",
        "reply metrics udp 9125 ACCEPT",
    ]);
    if family == Family::V6 {
        rules.push("icmpv6 ACCEPT");
    }
    rules.extend([
        "trap tcp SYN 0:3 bypass",
        "trap tcp ACK 4:7 bypass",
        "trap udp 12:15 bypass",
        "established ACCEPT",
        "legacy any * NFLOG 10",
        "legacy any * DROP",
        "partners any * CONNMARK set 0x200/0x700",
        "partners any * ACCEPT",
        "default NEW NFLOG 10",
        "default !NEW NFLOG 10",
        "DROP",
    ]);
    rules
}

/// acl_mix()'s incoming chain, by hand: the mirror with sources, the net
/// queue ranges (SYN 16-19, ACK 20-23, service 28-31), the UDP trap
/// rate-limited, NFLOG group 11.
fn expected_net(family: Family) -> Vec<&'static str> {
    let mut rules = vec![
        "block-scanners tcp * DROP",
        "public-web tcp 80,443 CONNMARK set 0x200/0x700",
        "public-web tcp 80,443 ACCEPT",
        "metrics udp 9125 CONNMARK set 0x200/0x700",
        "metrics udp 9125 ACCEPT",
        "reply dns udp 53 ACCEPT",
    ];
    if family == Family::V6 {
        rules.push("icmpv6 ACCEPT");
    }
    rules.extend([
        "trap tcp SYN 16:19 bypass",
        "trap tcp ACK 20:23 bypass",
        "trap udp limited 28:31 bypass",
        "established ACCEPT",
        "no-guests any * NFLOG 11",
        "no-guests any * DROP",
        "default NEW NFLOG 11",
        "default !NEW NFLOG 11",
        "DROP",
    ]);
    rules
}

/// A `local-server` configuration of one PU, through the agent's parser.
fn pu_config(pu: PuFile) -> Result<Configuration> {
    parse(Config::local_server().pu(pu))
}

fn parse(config: Config) -> Result<Configuration> {
    Ok(Configuration::from_toml_str(&config.to_toml())?)
}

fn pu_with_a_mix_of_acls(backend: Backend, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let lab = Lab::new(&env, backend, family)?;
    let config = pu_config(acl_mix(&lab.cgroup))?;
    let ctx = ctx(&config, family);
    let pu = &config.pus[0];
    let short = short_name(pu)?;
    let plan = PuPlan::new(pu, &short, 1)?;
    let chains = plan.chains();
    let acls = acl_policies(pu, &short, 1, family);

    lab.install_global(&ctx)?;
    lab.ipset(&sets::create(&plan.sets(family)))?;
    let text = section(Table::Mangle, &plan.install(&ctx));
    lab.test_and_load(&text)?;
    let saved = lab.save(Table::Mangle)?;

    for (what, rules) in [("rendered", text.as_str()), ("kernel", &saved)] {
        assert_eq!(
            pu_chain(rules, &chains.app, &acls),
            expected_app(family),
            "{what} {}",
            chains.app
        );
        assert_eq!(
            pu_chain(rules, &chains.net, &acls),
            expected_net(family),
            "{what} {}",
            chains.net
        );
        assert_acl_scopes(rules, &chains.app, &acls, family);
        assert_acl_scopes(rules, &chains.net, &acls, family);
    }
    assert_hooks(
        &saved,
        &lab.cgroup_rel(),
        &short,
        family,
        (&chains.app, &chains.net),
    );

    // The sets in the kernel: a /0 as its two halves, the port sets, and
    // no set for an ACL with nothing in this family.
    let ipsets = lab.ipset_save()?;
    let set_of = |direction, index| naming::acl_set(family, &short, 1, direction, index);
    let halves = match family {
        Family::V4 => ["0.0.0.0/1", "128.0.0.0/1"],
        Family::V6 => ["::/1", "8000::/1"],
    };
    for set in [set_of(Direction::App, 3), set_of(Direction::Net, 0)] {
        for half in halves {
            let add = format!("add {set} {half}\n");
            assert!(ipsets.contains(&add), "{add:?} in:\n{ipsets}");
        }
    }
    let ports = PortSet::Process.name(family, &short);
    // A bitmap set lists each port of a range.
    for port in [80, 8000, 8080] {
        let add = format!("add {ports} {port}\n");
        assert!(ipsets.contains(&add), "{add:?} in:\n{ipsets}");
    }
    for port in [81, 7999, 8081] {
        assert!(
            !ipsets.contains(&format!("add {ports} {port}\n")),
            "{ipsets}"
        );
    }
    let absent = match family {
        // a10 (ICMPv6) in IPv4.
        Family::V4 => [set_of(Direction::App, 10)],
        // a9 (ICMP) and a11 (IPv4 networks) in IPv6.
        Family::V6 => [set_of(Direction::App, 11)],
    };
    for set in absent {
        assert!(!ipsets.contains(&set), "{set} in:\n{ipsets}");
    }
    if family == Family::V6 {
        assert!(!ipsets.contains(&set_of(Direction::App, 9)), "{ipsets}");
    }

    // Failing closed (SPEC, "The trap"): the same rules, the same ranges,
    // and no trap rule lets a packet pass when no one listens.
    let closed = parse(
        Config::local_server()
            .fail_closed()
            .pu(acl_mix(&lab.cgroup)),
    )?;
    let text = section(Table::Mangle, &plan.install(&self::ctx(&closed, family)));
    lab.test_and_load(&text)?;
    let saved = lab.save(Table::Mangle)?;
    let without_bypass = |rules: Vec<&str>| -> Vec<String> {
        rules.iter().map(|r| r.replace(" bypass", "")).collect()
    };
    for (what, rules) in [("rendered", text.as_str()), ("kernel", &saved)] {
        // (The global chains in the kernel are the fail-open ones
        // installed first.)
        for chain in [&chains.app, &chains.net] {
            let bypassing: Vec<String> = chain_rules(rules, chain)
                .into_iter()
                .filter(|r| r.contains("--queue-bypass"))
                .collect();
            assert!(bypassing.is_empty(), "{what}: {bypassing:#?}");
        }
        assert_eq!(
            pu_chain(rules, &chains.app, &acls),
            without_bypass(expected_app(family)),
            "{what} {} failing closed",
            chains.app
        );
        assert_eq!(
            pu_chain(rules, &chains.net, &acls),
            without_bypass(expected_net(family)),
            "{what} {} failing closed",
            chains.net
        );
    }
    Ok(())
}

// ----------------------------------------------------------- PU update

/// The PU `web` of `cgroup` before the update: one accept ACL.
fn before(cgroup: &str) -> PuFile {
    PuFile::process("web", cgroup)
        .tcp_ports([80])
        .application_acl(Acl::accept("api-v0", ["10.30.0.0/16", "fd00:30::/64"]).tcp([443]))
}

/// before()'s chains, by hand.
fn expected_before(family: Family) -> (Vec<&'static str>, Vec<&'static str>) {
    let icmpv6: &[&str] = match family {
        Family::V4 => &[],
        Family::V6 => &["icmpv6 ACCEPT"],
    };
    let app = [
        &[
            "api-v0 tcp 443 CONNMARK set 0x200/0x700",
            "api-v0 tcp 443 ACCEPT",
        ][..],
        icmpv6,
        &[
            "trap tcp SYN 0:3 bypass",
            "trap tcp ACK 4:7 bypass",
            "trap udp 12:15 bypass",
            "established ACCEPT",
            "default NEW NFLOG 10",
            "default !NEW NFLOG 10",
            "DROP",
        ],
    ]
    .concat();
    let net = [
        icmpv6,
        &[
            "trap tcp SYN 16:19 bypass",
            "trap tcp ACK 20:23 bypass",
            "trap udp limited 28:31 bypass",
            "established ACCEPT",
            "default NEW NFLOG 11",
            "default !NEW NFLOG 11",
            "DROP",
        ],
    ]
    .concat();
    (app, net)
}

/// `update` as the iptables datapath does it (SPEC): the new version's
/// sets and the port changes, then one commit installing and hooking the
/// new chains under `version` and unhooking and removing the old ones
/// under `version ^ 1`, then the old ACL sets destroyed — which the
/// kernel refuses while a rule still uses them. And back again.
fn pu_update_hooks_the_new_version_and_unhooks_the_old(
    backend: Backend,
    family: Family,
) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let lab = Lab::new(&env, backend, family)?;
    let before = pu_config(self::before(&lab.cgroup_rel()))?;
    let after = pu_config(acl_mix(&lab.cgroup))?;
    let ctx = ctx(&before, family);
    let (old_pu, new_pu) = (&before.pus[0], &after.pus[0]);
    let short = short_name(old_pu)?;
    let old = PuPlan::new(old_pu, &short, 0)?;
    let new = PuPlan::new(new_pu, &short, 1)?;

    lab.install_global(&ctx)?;
    lab.ipset(&sets::create(&old.sets(family)))?;
    lab.test_and_load(&section(Table::Mangle, &old.install(&ctx)))?;

    // Forward: version 0 to version 1.
    swap(&lab, &ctx, (&new, new_pu), (&old, old_pu))?;
    let saved = lab.save(Table::Mangle)?;
    let (new_chains, old_chains) = (new.chains(), old.chains());
    let acls = acl_policies(new_pu, &short, 1, family);
    assert_eq!(
        pu_chain(&saved, &new_chains.app, &acls),
        expected_app(family)
    );
    assert_eq!(
        pu_chain(&saved, &new_chains.net, &acls),
        expected_net(family)
    );
    for gone in [&old_chains.app, &old_chains.net] {
        assert!(!declares(&saved, gone), "{gone} removed:\n{saved}");
    }
    assert_hooks(
        &saved,
        &lab.cgroup_rel(),
        &short,
        family,
        (&new_chains.app, &new_chains.net),
    );
    let ipsets = lab.ipset_save()?;
    let ports = PortSet::Process.name(family, &short);
    assert!(ipsets.contains(&format!("add {ports} 8080\n")), "{ipsets}");

    // And back: version 1 to version 0.
    swap(&lab, &ctx, (&old, old_pu), (&new, new_pu))?;
    let saved = lab.save(Table::Mangle)?;
    let acls = acl_policies(old_pu, &short, 0, family);
    let (app, net) = expected_before(family);
    assert_eq!(pu_chain(&saved, &old_chains.app, &acls), app);
    assert_eq!(pu_chain(&saved, &old_chains.net, &acls), net);
    for gone in [&new_chains.app, &new_chains.net] {
        assert!(!declares(&saved, gone), "{gone} removed:\n{saved}");
    }
    assert_hooks(
        &saved,
        &lab.cgroup_rel(),
        &short,
        family,
        (&old_chains.app, &old_chains.net),
    );
    let ipsets = lab.ipset_save()?;
    assert!(!ipsets.contains(&format!("add {ports} 8080\n")), "{ipsets}");
    Ok(())
}

/// One update from `from` to `to`, in the datapath's order.
fn swap(lab: &Lab, ctx: &Ctx, to: (&PuPlan, &Pu), from: (&PuPlan, &Pu)) -> Result<()> {
    let family = lab.family;
    let (to, to_pu) = to;
    let (from, from_pu) = from;
    let mut set_text = sets::create(&to.acl_sets(family));
    for ((name, _), (old, new)) in from.port_sets(family).into_iter().zip([
        (&from_pu.tcp_ports, &to_pu.tcp_ports),
        (&from_pu.udp_ports, &to_pu.udp_ports),
    ]) {
        set_text += &sets::port_diff(&name, old, new);
    }
    lab.ipset(&set_text)?;
    let text = section(Table::Mangle, &[to.install(ctx), from.remove(ctx)].concat());
    lab.test_and_load(&text)?;
    let old_sets: Vec<String> = from.acl_sets(family).into_iter().map(|s| s.name).collect();
    lab.ipset(&sets::destroy(old_sets.iter().map(String::as_str)))
        .context("the old ACL sets must be unused after the swap")
}

// ------------------------------------------------------ net_cls PU

/// A PU whose cgroup is a net_cls (cgroup v1) cgroup: only its outgoing
/// hook differs from a cgroup v2 PU's — it matches the class id the agent
/// gives the PU (`--cgroup`, the first one `0x1111_0064` written in
/// decimal as `iptables-save` prints it), never a path, so no cgroup v2
/// directory need exist; its chains are the same. It loads, is held as
/// rendered, and unloads, on each flavour.
fn net_cls_pu_hooks_by_class_id(backend: Backend, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let lab = Lab::new(&env, backend, family)?;
    let config = pu_config(before("enft-no-such-cgroup-v2"))?;
    let ctx = ctx(&config, family);
    let pu = &config.pus[0];
    let short = short_name(pu)?;
    let class_id = ClassId::nth(0).context("the first class id")?;
    let plan = PuPlan::new(pu, &short, 0)?.with_class_id(Some(class_id));
    let chains = plan.chains();
    let install = plan.install(&ctx);
    let hook = format!(
        "-A TRI-Pid-App -m cgroup --cgroup 286326884 -m comment --comment \"PU web\" -j {}",
        chains.app
    );
    assert_eq!(
        install
            .iter()
            .filter(|l| l.starts_with("-A TRI-Pid-App "))
            .collect::<Vec<_>>(),
        [&hook]
    );

    lab.install_global(&ctx)?;
    lab.ipset(&sets::create(&plan.sets(family)))?;
    lab.test_and_load(&section(Table::Mangle, &install))?;
    let saved = lab.save(Table::Mangle)?;
    let app = chain_rules(&saved, "TRI-Pid-App");
    assert_eq!(app.len(), 1, "one outgoing hook: {app:#?}");
    let w = words(&app[0]);
    assert_eq!(after(&w, "--cgroup"), Some("286326884"), "{}", app[0]);
    assert_eq!(after(&w, "--path"), None, "{}", app[0]);
    assert_eq!(after(&w, "-j"), Some(chains.app.as_str()), "{}", app[0]);
    let acls = acl_policies(pu, &short, 0, family);
    let (expected_app, expected_net) = expected_before(family);
    assert_eq!(pu_chain(&saved, &chains.app, &acls), expected_app);
    assert_eq!(pu_chain(&saved, &chains.net, &acls), expected_net);

    lab.load(&section(Table::Mangle, &plan.remove(&ctx)))?;
    let saved = lab.save(Table::Mangle)?;
    assert!(chain_rules(&saved, "TRI-Pid-App").is_empty(), "{saved}");
    assert!(!declares(&saved, &chains.app), "{saved}");
    Ok(())
}

// ------------------------------------------------------ proxied PU

/// A linux-process PU with a proxy (port 15001) for a dependent service
/// (a network of each family, port 5432 and 6000-6010) and an exposed
/// port (8443), and a DNS proxy (port 15053): its proxy sets, its rules in
/// the global proxy chains (mangle) and redirect chains (nat) — by hand
/// from SPEC and the seed — load, are held in that order, and unload,
/// leaving the global chains as they were.
fn pu_with_a_proxy(backend: Backend, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let lab = Lab::new(&env, backend, family)?;
    let cgroup = lab.cgroup_rel();
    let web = PuFile::process("web", &cgroup)
        .tcp_ports([80])
        .proxy_port(15001)
        .dns_proxy_port(15053)
        .dependent_service(
            "10.50.0.0/24",
            [Port::One(5432), Port::Range("6000-6010".into())],
        )
        .dependent_service("fd00:50::/64", [5432])
        .exposed_services([8443]);
    let config = pu_config(web)?;
    let ctx = ctx(&config, family);
    let pu = &config.pus[0];
    let short = short_name(pu)?;
    let plan = PuPlan::new(pu, &short, 0)?;
    let t = tag(family);
    let (dst, srv) = (
        format!("TRI-{t}-Proxy-{short}-dst"),
        format!("TRI-{t}-Proxy-{short}-srv"),
    );
    let entries: &[&str] = match family {
        Family::V4 => &["10.50.0.0/24,tcp:5432", "10.50.0.0/24,tcp:6000-6010"],
        Family::V6 => &["fd00:50::/64,tcp:5432"],
    };
    let proxy_sets = plan.proxy_sets(family);
    assert_eq!(proxy_sets.len(), 2);
    assert_eq!(
        (&proxy_sets[0].name, &proxy_sets[0].entries),
        (&dst, &entries.iter().map(|e| e.to_string()).collect())
    );
    assert_eq!(
        (&proxy_sets[1].name, &proxy_sets[1].entries),
        (&srv, &vec!["8443".to_owned()])
    );

    let own = format!("-m cgroup --path {cgroup} -m comment --comment \"PU web\"");
    let tag_only = "-m comment --comment \"PU web\"";
    let expected_mangle = [
        format!("-A TRI-Prx-App -p tcp -m set --match-set {dst} dst,dst {own} -j ACCEPT"),
        format!("-A TRI-Prx-App -p tcp -m tcp --sport 15001 {tag_only} -j ACCEPT"),
        format!("-A TRI-Prx-App -p tcp -m set --match-set {srv} src {tag_only} -j ACCEPT"),
        format!("-A TRI-Prx-Net -p tcp -m tcp --dport 15001 {tag_only} -j ACCEPT"),
        format!("-A TRI-Prx-Net -p tcp -m set --match-set {srv} dst {tag_only} -j ACCEPT"),
        format!("-A TRI-Prx-Net -p tcp -m set --match-set {dst} src,src {tag_only} -j ACCEPT"),
        format!("-A TRI-Prx-App -p udp -m udp --dport 53 {own} -j ACCEPT"),
        format!("-A TRI-Prx-App -p udp -m udp --sport 15053 {tag_only} -j ACCEPT"),
        format!("-A TRI-Prx-Net -p udp -m udp --dport 15053 {tag_only} -j ACCEPT"),
    ];
    let expected_nat = [
        format!(
            "-A TRI-Redir-App -p tcp -m set --match-set {dst} dst,dst {own} -j REDIRECT --to-ports 15001"
        ),
        format!(
            "-A TRI-Redir-Net -p tcp -m set --match-set {srv} dst {tag_only} -j REDIRECT --to-ports 15001"
        ),
        format!("-A TRI-Redir-App -p udp -m udp --dport 53 {own} -j REDIRECT --to-ports 15053"),
    ];
    let install = plan.install(&ctx);
    let proxy_lines: Vec<&String> = install
        .iter()
        .filter(|l| l.starts_with("-A TRI-Prx-"))
        .collect();
    assert_eq!(proxy_lines, expected_mangle.iter().collect::<Vec<_>>());
    assert_eq!(plan.nat_install(&ctx), expected_nat);

    lab.install_global(&ctx)?;
    let global_mangle = chain_rules(&lab.save(Table::Mangle)?, "TRI-Prx-App");
    lab.ipset(&sets::create(&plan.sets(family)))?;
    let text = section(Table::Mangle, &install) + &section(Table::Nat, &plan.nat_install(&ctx));
    lab.test_and_load(&text)?;
    let (mangle, nat) = (lab.save(Table::Mangle)?, lab.save(Table::Nat)?);
    // Held in the rendered order, after the global proxy-mark accepts.
    for (saved, chain, expected) in [
        (&mangle, "TRI-Prx-App", &expected_mangle[..]),
        (&mangle, "TRI-Prx-Net", &expected_mangle[..]),
        (&nat, "TRI-Redir-App", &expected_nat[..]),
        (&nat, "TRI-Redir-Net", &expected_nat[..]),
    ] {
        let held = chain_rules(saved, chain);
        let first = words(&held[0]);
        assert_eq!(
            after(&first, "--mark"),
            Some("0x300/0x700"),
            "{chain}: {held:#?}"
        );
        let mine: Vec<String> = expected
            .iter()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .map(|l| proxy_summary(l))
            .collect();
        let held: Vec<String> = held[1..].iter().map(|l| proxy_summary(l)).collect();
        assert_eq!(held, mine, "{chain}");
    }
    assert!(
        chain_rules(&mangle, "TRI-Prx-App")[1].contains("--path"),
        "scoped to the PU"
    );

    let text =
        section(Table::Mangle, &plan.remove(&ctx)) + &section(Table::Nat, &plan.nat_remove(&ctx));
    lab.load(&text)?;
    assert_eq!(
        chain_rules(&lab.save(Table::Mangle)?, "TRI-Prx-App"),
        global_mangle
    );
    assert_eq!(
        chain_rules(&lab.save(Table::Nat)?, "TRI-Redir-App").len(),
        1
    );
    lab.ipset(&sets::destroy([dst.as_str(), srv.as_str()]))
        .context("the proxy sets must be unused once the PU is gone")
}

/// A proxy rule in a few words, the same for the rendered and the saved
/// spelling: protocol, sets and their directions, ports, cgroup, comment
/// and target.
fn proxy_summary(rule: &str) -> String {
    let w = words(rule);
    let mut out = Vec::new();
    for (i, word) in w.iter().enumerate() {
        let take = match word.as_str() {
            "-p" | "--sport" | "--dport" | "--path" | "--comment" | "-j" | "--to-ports" => 1,
            "--match-set" => 2,
            _ => 0,
        };
        out.extend(w[i + 1..(i + 1 + take).min(w.len())].iter().cloned());
    }
    out.join(" ")
}

// --------------------------------------------------- the loader can fail

/// The checks above can fail: the same loader refuses a rule naming a
/// set that does not exist (already at `--test`), a PU before the global
/// chains it hooks into and a PU whose cgroup does not exist (both only
/// when committed, hence the real load), and the `-D` of a hook that is
/// not there.
fn the_loader_refuses_what_the_kernel_refuses(backend: Backend, family: Family) -> Result<()> {
    let Some(env) = privilege::require() else {
        return Ok(());
    };
    let lab = Lab::new(&env, backend, family)?;
    let config = pu_config(before(&lab.cgroup_rel()))?;
    let ctx = ctx(&config, family);
    let pu = &config.pus[0];
    let short = short_name(pu)?;
    let plan = PuPlan::new(pu, &short, 0)?;
    let install = section(Table::Mangle, &plan.install(&ctx));

    // The PU's ACL set is missing.
    let acl_set = naming::acl_set(family, &short, 0, Direction::App, 0);
    expect_refusal(lab.test(&install), format!("Set {acl_set} doesn't exist"))?;
    lab.ipset(&sets::create(&global::sets(family)))?;
    lab.ipset(&sets::create(&plan.sets(family)))?;
    // The global chains are missing: refused at the outgoing hook.
    let hook = line_of(&install, "-A TRI-Pid-App ");
    expect_refusal(lab.load(&install), at_line(hook))?;
    lab.install_global(&ctx)?;
    // The cgroup is missing: the same PU elsewhere.
    let elsewhere = pu_config(before("enft-no-such-cgroup"))?;
    let ghost = PuPlan::new(&elsewhere.pus[0], &short, 0)?;
    let ghost = section(Table::Mangle, &ghost.install(&ctx));
    // `--test` does not see it; the kernel does, at the hook (nf_tables)
    // or at the commit (legacy).
    lab.test(&ghost)?;
    let at = match backend {
        Backend::Nft => hook,
        Backend::Legacy => line_of(&ghost, "COMMIT"),
    };
    expect_refusal(lab.load(&ghost), at_line(at))?;
    // Nothing of the refused loads stayed, and the PU itself loads.
    let saved = lab.save(Table::Mangle)?;
    assert!(!declares(&saved, &plan.chains().app), "{saved}");
    assert!(chain_rules(&saved, "TRI-Pid-App").is_empty(), "{saved}");
    lab.test_and_load(&install)?;
    // Unhooking works once, not twice.
    let remove = plan.remove(&ctx);
    let (unhook, delete) = remove.split_at(3);
    assert!(unhook.iter().all(|l| l.starts_with("-D ")), "{unhook:?}");
    lab.load(&section(Table::Mangle, unhook))?;
    let again = section(Table::Mangle, unhook);
    expect_refusal(lab.load(&again), at_line(line_of(&again, "-D ")))?;
    lab.load(&section(Table::Mangle, delete))?;
    assert!(!declares(&lab.save(Table::Mangle)?, &plan.chains().app));
    Ok(())
}

/// The 1-based number of the first line of `text` starting with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(prefix))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{text}"))
}

/// How both flavours name the line a refusal comes from: `line 7 failed`,
/// `line 7: RULE_APPEND failed`.
fn at_line(line: usize) -> Needles {
    Needles(vec![format!("line {line} "), format!("line {line}:")])
}

/// What a refusal's message must contain: any one of these.
struct Needles(Vec<String>);

impl From<String> for Needles {
    fn from(needle: String) -> Self {
        Needles(vec![needle])
    }
}

/// `result` is a refusal whose message contains one of `needles`.
fn expect_refusal(result: Result<()>, needles: impl Into<Needles>) -> Result<()> {
    let Needles(needles) = needles.into();
    match result {
        Ok(()) => bail!("loaded, but should have been refused"),
        Err(e) if needles.iter().any(|n| format!("{e:#}").contains(n)) => Ok(()),
        Err(e) => bail!("refused, but not for any of {needles:?}: {e:#}"),
    }
}
