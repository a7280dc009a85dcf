//! One PU in one family under one policy version: its sets, its two chains
//! with the ACLs and trap rules in SPEC's order ("Order of evaluation
//! inside a PU"), and the hooks that send its traffic there. Pure text;
//! [`PuPlan::install`] and [`PuPlan::remove`] are the halves that
//! `configure`, `update`, `delete` and their roll-backs combine.
//!
//! The chains are the same for every kind; what differs is the hook
//! ([`Hook`]): which global chain the PU's traffic comes from and what
//! picks it there — the global chains are entered in SPEC's priority
//! (uid, then process, host-service, host; see `global`), and a PU chain
//! ends every packet's way (accept, drop or queue), so a packet the uid
//! chain hands to a PU never meets a process or host PU.

use std::collections::HashMap;

use anyhow::anyhow;
use enforcer_common::marks::Kind;
use ipnet::IpNet;

use super::proxy;
use super::rules::{Ctx, declare, nflog_group, opposite, peer};
use super::sets::SetSpec;
use crate::datapath::handshake;
use crate::datapath::netcls::ClassId;
use crate::datapath::queues::{Direction, NET_UDP_TRAP_LIMIT, Trapped};
use crate::datapath::{DatapathError, DatapathKind};
use crate::naming::{
    self, ChainPair, GlobalSet, HOST_CHAINS, HOST_SERVICE_CHAINS, LogTag, MAIN_CHAINS,
    PROCESS_CHAINS, PortSet, ShortName, UID_CHAINS, nflog_prefix,
};
use crate::policy::{
    Acl, Action, CgroupPath, IpFamily, Mode, ObserveMode, PortRange, Protocol, Pu, PuKind,
    UserSpec, in_bucket_order, split_zero_prefix,
};

/// ACL sets are numbered with a `u16` (it keeps their names within
/// ipset's 31 characters): at most this many ACLs per direction.
const MAX_ACLS: usize = u16::MAX as usize + 1;

/// Ports one `multiport` match takes; a range takes two.
const MULTIPORT_SLOTS: usize = 15;

/// What a PU is made of in the kernel under one version.
#[derive(Debug, Clone, Copy)]
pub struct PuPlan<'a> {
    pu: &'a Pu,
    hook: Hook<'a>,
    short: &'a ShortName,
    version: u8,
    /// The net_cls class id of a PU whose cgroup is cgroup v1: its
    /// outgoing traffic is matched by it rather than by cgroup path.
    class_id: Option<ClassId>,
}

/// Where a PU's traffic enters its chains, and what picks it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook<'a> {
    /// linux-process: outgoing by cgroup (`TRI-Pid-App`), incoming by its
    /// port sets (`TRI-Pid-Net`).
    Process(&'a CgroupPath),
    /// uid: outgoing by the socket's owner (`TRI-UID-App`, the seed's
    /// `-m owner`), incoming by its port sets (`TRI-UID-Net`).
    Uid(&'a UserSpec),
    /// host-service: by its port sets both ways — the source port of what
    /// it sends (`TRI-Svc-App`), the destination port of what it receives
    /// (`TRI-Svc-Net`). The seed found a service's outgoing traffic by its
    /// net_cls cgroup; a service here is its ports and nothing else.
    Service,
    /// host: everything that reaches `TRI-Hst-App` / `TRI-Hst-Net`, that
    /// is, every packet no other kind's PU took.
    Host,
    /// container (remote-container, sidecar): the whole namespace, from
    /// the main chains after the global rules.
    Container,
}

impl Hook<'_> {
    /// The global chains the hooks go into.
    fn chains(self) -> ChainPair {
        match self {
            Hook::Process(_) => PROCESS_CHAINS,
            Hook::Uid(_) => UID_CHAINS,
            Hook::Service => HOST_SERVICE_CHAINS,
            Hook::Host => HOST_CHAINS,
            Hook::Container => MAIN_CHAINS,
        }
    }

    /// The TCP and UDP port sets of a kind that has them.
    fn port_sets(self) -> Option<[PortSet; 2]> {
        match self {
            Hook::Process(_) => Some([PortSet::Process, PortSet::ProcessUdp]),
            Hook::Uid(_) => Some([PortSet::Uid, PortSet::UidUdp]),
            Hook::Service => Some([PortSet::Service, PortSet::ServiceUdp]),
            Hook::Host | Hook::Container => None,
        }
    }
}

/// One ACL as installed in one family: its set, holding its networks of
/// that family.
struct AclRef<'a> {
    acl: &'a Acl,
    set: String,
    nets: Vec<IpNet>,
}

/// Refuses a PU this datapath cannot install yet: a host or host-service
/// PU that asks for proxy redirection, or more ACLs per direction than set
/// names allow. A feature it
/// would otherwise ignore is refused, never silently dropped (SPEC, "Bad
/// input and faults"). Returns how its traffic is found.
pub fn check(pu: &Pu) -> Result<Hook<'_>, DatapathError> {
    let hook = match &pu.kind {
        PuKind::LinuxProcess { cgroup } => Hook::Process(cgroup),
        PuKind::Uid { user } => Hook::Uid(user),
        PuKind::HostService => Hook::Service,
        PuKind::Host => Hook::Host,
        PuKind::Container => Hook::Container,
    };
    let proxied = pu.proxy_port.is_some() || pu.dns_proxy_port.is_some();
    if proxied && matches!(hook, Hook::Host | Hook::Service) {
        // Their outgoing traffic has no match of its own to scope the
        // redirection by (the host PU is the rest of the host, a host
        // service only its listening ports).
        let what = format!(
            "PU {}: proxy redirection for a {} PU",
            pu.id,
            pu.kind.name()
        );
        return Err(DatapathError::Unsupported(what, DatapathKind::Iptables));
    }
    for (what, acls) in [
        ("application", &pu.application_acls),
        ("network", &pu.network_acls),
    ] {
        if acls.len() > MAX_ACLS {
            let n = acls.len();
            let message = format!("PU {} has {n} {what} ACLs; at most {MAX_ACLS}", pu.id);
            return Err(anyhow!(message).into());
        }
    }
    Ok(hook)
}

impl<'a> PuPlan<'a> {
    /// The plan of `pu` under `short` and `version`; fails as [`check`].
    pub fn new(pu: &'a Pu, short: &'a ShortName, version: u8) -> Result<Self, DatapathError> {
        Ok(Self {
            pu,
            hook: check(pu)?,
            short,
            version,
            class_id: None,
        })
    }

    /// The same plan for a net_cls (cgroup v1) PU with `class_id` (none:
    /// a cgroup v2 PU). Only the outgoing hook's match differs.
    pub fn with_class_id(self, class_id: Option<ClassId>) -> Self {
        Self { class_id, ..self }
    }

    /// What recognises the PU's outgoing traffic: its cgroup v2 path, or
    /// the class id its net_cls cgroup stamps on its sockets.
    fn process_match(&self, cgroup: &CgroupPath) -> String {
        match self.class_id {
            Some(class_id) => format!("-m cgroup --cgroup {class_id}"),
            None => format!("-m cgroup --path {cgroup}"),
        }
    }

    /// `TRI-App-<short>-<version>` and `TRI-Net-<short>-<version>`.
    pub fn chains(&self) -> ChainPair<String> {
        naming::pu_chains(self.short, self.version.into())
    }

    /// The TCP and UDP port sets with the ports they hold, for a kind
    /// found by its ports (none for a host or container PU). They do not
    /// depend on the version: an update changes their content in place.
    pub fn port_sets(&self, family: IpFamily) -> Vec<(String, &'a [PortRange])> {
        let Some([tcp, udp]) = self.hook.port_sets() else {
            return Vec::new();
        };
        vec![
            (tcp.name(family, self.short), &self.pu.tcp_ports),
            (udp.name(family, self.short), &self.pu.udp_ports),
        ]
    }

    /// One set per ACL with networks in `family`, application then network.
    pub fn acl_sets(&self, family: IpFamily) -> Vec<SetSpec> {
        [Direction::App, Direction::Net]
            .into_iter()
            .flat_map(|direction| self.acls(family, direction))
            .map(|r| SetSpec::networks(r.set, family, &r.nets))
            .collect()
    }

    /// Every set of the PU in `family`: port sets, ACL sets, proxy sets.
    pub fn sets(&self, family: IpFamily) -> Vec<SetSpec> {
        let ports = self
            .port_sets(family)
            .into_iter()
            .map(|(name, ports)| SetSpec::ports(name, ports));
        ports
            .chain(self.acl_sets(family))
            .chain(self.proxy_sets(family))
            .collect()
    }

    /// The proxy sets ([`proxy::sets`]): none without a proxy port.
    pub fn proxy_sets(&self, family: IpFamily) -> Vec<SetSpec> {
        proxy::sets(self.pu, family, self.short)
    }

    /// The PU's rules in the global proxy chains, mangle and nat
    /// ([`proxy::rules`]), picked on the way out as its hook picks them.
    fn proxy_rules(&self, ctx: &Ctx) -> (Vec<String>, Vec<String>) {
        let app_match = match self.hook {
            Hook::Process(cgroup) => self.process_match(cgroup),
            Hook::Uid(user) => format!("-m owner --uid-owner {user}"),
            Hook::Container | Hook::Host | Hook::Service => String::new(),
        };
        proxy::rules(ctx, self.pu, self.short, &app_match)
    }

    /// Whether the PU has proxy rules ([`proxy::rules`]).
    pub fn is_proxied(&self) -> bool {
        self.pu.proxy_port.is_some() || self.pu.dns_proxy_port.is_some()
    }

    /// The comment its proxy rules carry, as a save shows it.
    pub fn proxy_comment(&self) -> String {
        proxy::comment_text(self.pu)
    }

    /// The PU's nat rules ([`proxy::rules`]), appended.
    pub fn nat_install(&self, ctx: &Ctx) -> Vec<String> {
        let (_, nat) = self.proxy_rules(ctx);
        nat.into_iter().map(|rule| format!("-A {rule}")).collect()
    }

    /// Deletes the PU's nat rules (each must exist).
    pub fn nat_remove(&self, ctx: &Ctx) -> Vec<String> {
        let (_, nat) = self.proxy_rules(ctx);
        nat.into_iter().map(|rule| format!("-D {rule}")).collect()
    }

    /// The PU's chains with their rules, then the hooks into them and its
    /// accepts in the proxy chains (appended: with an update's `remove` of
    /// the old version in the same commit, the new hooks take over from
    /// the old ones atomically). mangle only; its nat rules are
    /// [`Self::nat_install`]'s.
    pub fn install(&self, ctx: &Ctx) -> Vec<String> {
        let chains = self.chains();
        let mut lines = vec![declare(&chains.app), declare(&chains.net)];
        lines.extend(self.chain_rules(ctx, Direction::App));
        lines.extend(self.chain_rules(ctx, Direction::Net));
        lines.extend(self.hooks(ctx.family).map(|hook| format!("-A {hook}")));
        let (proxy, _) = self.proxy_rules(ctx);
        lines.extend(proxy.into_iter().map(|rule| format!("-A {rule}")));
        lines
    }

    /// Unhooks the chains and removes the PU's proxy-chain accepts, then
    /// flushes and deletes the chains. Every piece must exist (a restore
    /// file fails as a whole otherwise). The same rule text twice (an
    /// update that keeps the proxy) is held twice, and `-D` removes the
    /// first, the old one.
    pub fn remove(&self, ctx: &Ctx) -> Vec<String> {
        let chains = self.chains();
        let (proxy, _) = self.proxy_rules(ctx);
        let mut lines: Vec<String> = self
            .hooks(ctx.family)
            .chain(proxy)
            .map(|rule| format!("-D {rule}"))
            .collect();
        for op in ["-F", "-X"] {
            lines.push(format!("{op} {}", chains.app));
            lines.push(format!("{op} {}", chains.net));
        }
        lines
    }

    /// The rules sending the PU's traffic to its chains, without `-A`/`-D`
    /// ([`Hook`]; a linux-process PU by
    /// cgroup path or class id). Both port hooks of a kind found by its ports are always
    /// there (an empty set matches nothing), so ports can change without a
    /// rule change.
    fn hooks(&self, family: IpFamily) -> impl Iterator<Item = String> + use<> {
        let chains = self.chains();
        let from = self.hook.chains();
        let comment = format!("-m comment --comment \"PU {}\"", self.pu.id);
        let ports = |side: &str, chain: &str, to: &str| -> Vec<String> {
            self.port_sets(family)
                .into_iter()
                .zip(["tcp", "udp"])
                .map(|((set, _), protocol)| {
                    format!(
                        "{chain} -p {protocol} -m set --match-set {set} {side} {comment} -j {to}"
                    )
                })
                .collect()
        };
        let app = match self.hook {
            Hook::Process(cgroup) => vec![format!(
                "{} {} {comment} -j {}",
                from.app,
                self.process_match(cgroup),
                chains.app
            )],
            Hook::Uid(user) => vec![format!(
                "{} -m owner --uid-owner {user} {comment} -j {}",
                from.app, chains.app
            )],
            Hook::Service => ports("src", from.app, &chains.app),
            Hook::Host | Hook::Container => {
                vec![format!("{} {comment} -j {}", from.app, chains.app)]
            }
        };
        let net = match self.hook {
            Hook::Host | Hook::Container => {
                vec![format!("{} {comment} -j {}", from.net, chains.net)]
            }
            _ => ports("dst", from.net, &chains.net),
        };
        app.into_iter().chain(net)
    }

    /// The ACLs of `direction` that apply in `family` (networks and a
    /// protocol of the family), in declaration order, which numbers their
    /// sets.
    fn acls(&self, family: IpFamily, direction: Direction) -> Vec<AclRef<'a>> {
        let list = match direction {
            Direction::App => &self.pu.application_acls,
            Direction::Net => &self.pu.network_acls,
        };
        (0..=u16::MAX)
            .zip(list)
            .filter_map(|(index, acl)| {
                let nets: Vec<IpNet> = family
                    .select(&acl.networks)
                    .copied()
                    .flat_map(split_zero_prefix)
                    .collect();
                let matchable = acl
                    .protocols
                    .iter()
                    .any(|&p| protocol_match(p, family).is_some());
                let set = naming::acl_set(family, self.short, self.version, direction, index);
                (matchable && !nets.is_empty()).then_some(AclRef { acl, set, nets })
            })
            .collect()
    }

    /// One chain, in SPEC's order.
    fn chain_rules(&self, ctx: &Ctx, direction: Direction) -> Vec<String> {
        let chains = self.chains();
        let chain = chains.get(direction);
        let own = self.acls(ctx.family, direction);
        let (any, specific): (Vec<&AclRef>, Vec<&AclRef>) = bucket_order(&own)
            .into_iter()
            .partition(|r| r.acl.is_protocol_any());

        let mut lines = Vec::new();
        for r in specific {
            lines.extend(self.acl_rules(ctx, direction, chain, r));
        }
        // The replies of the other side's UDP accepts, after this side's
        // own ACLs as in the seed.
        let other = self.acls(ctx.family, opposite(direction));
        for r in bucket_order(&other) {
            lines.extend(reverse_udp_accepts(ctx, direction, chain, r));
        }
        if ctx.family == IpFamily::V6 {
            // Neighbour discovery and path MTU must work whatever the ACLs.
            lines.push(format!("-A {chain} -p icmpv6 -j ACCEPT"));
        }
        if ctx.mode == Mode::Sidecar {
            // A sidecar lets DNS through, as the seed does: questions out,
            // answers in.
            let port = match direction {
                Direction::App => "--dport",
                Direction::Net => "--sport",
            };
            lines.push(format!("-A {chain} -p udp -m udp {port} 53 -j ACCEPT"));
        }
        lines.extend(trap_rules(ctx, direction, chain));
        lines.push(format!(
            "-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        ));
        for r in any {
            lines.extend(self.acl_rules(ctx, direction, chain, r));
        }
        let group = nflog_group(direction);
        let log = |tag| {
            let prefix = nflog_prefix(self.short, tag, None);
            format!("NFLOG --nflog-group {group} --nflog-prefix {prefix}")
        };
        lines.push(format!(
            "-A {chain} -m conntrack --ctstate NEW -j {}",
            log(LogTag::DefaultNew)
        ));
        lines.push(format!(
            "-A {chain} -m conntrack ! --ctstate NEW -j {}",
            log(LogTag::DefaultOther)
        ));
        lines.push(format!("-A {chain} -j DROP"));
        lines
    }

    /// An ACL's rules: for each of its protocols (of this family) and each
    /// group of at most 15 ports, its targets. Specific protocols apply
    /// only to peers outside the target TCP networks (those go through the
    /// handshake), and TCP only to new connections.
    fn acl_rules(&self, ctx: &Ctx, direction: Direction, chain: &str, r: &AclRef) -> Vec<String> {
        let peer = peer(direction);
        let in_acl = format!("-m set --match-set {} {peer}", r.set);
        let not_target = match r.acl.is_protocol_any() {
            true => String::new(),
            false => format!(
                "-m set ! --match-set {} {peer}",
                ctx.set(GlobalSet::TargetTcp)
            ),
        };
        let targets = self.acl_targets(ctx, direction, r.acl);
        let mut lines = Vec::new();
        for protocol in r
            .acl
            .protocols
            .iter()
            .filter_map(|&p| protocol_match(p, ctx.family))
        {
            for ports in multiport("--dports", &r.acl.ports) {
                let spec = join(&[protocol, &in_acl, &not_target, &ports]);
                lines.extend(targets.iter().map(|t| format!("-A {chain} {spec} -j {t}")));
            }
        }
        lines
    }

    /// What an ACL does with a match: its action, preceded by a log when
    /// asked for or observed; observe-continue only logs, and evaluation
    /// goes on. An accept marks the connection so that the main chains
    /// accept its later packets in both directions.
    fn acl_targets(&self, ctx: &Ctx, direction: Direction, acl: &Acl) -> Vec<String> {
        let prefix = nflog_prefix(self.short, LogTag::Acl(acl.bucket()), Some(&acl.policy_id));
        let log = format!(
            "NFLOG --nflog-group {} --nflog-prefix {prefix}",
            nflog_group(direction)
        );
        let action = match acl.action {
            Action::Accept => vec![ctx.set_connmark(Kind::ExternalAccepted), "ACCEPT".into()],
            Action::Reject => vec!["DROP".into()],
        };
        match acl.observe {
            ObserveMode::None if acl.log => [vec![log], action].concat(),
            ObserveMode::None => action,
            ObserveMode::Continue => vec![log],
            ObserveMode::Apply => [vec![log], action].concat(),
        }
    }
}

/// `acls` in SPEC's bucket order, as [`in_bucket_order`] decides it.
fn bucket_order<'r, 'a>(acls: &'r [AclRef<'a>]) -> Vec<&'r AclRef<'a>> {
    let position: HashMap<*const Acl, usize> = acls
        .iter()
        .enumerate()
        .map(|(i, r)| (std::ptr::from_ref(r.acl), i))
        .collect();
    in_bucket_order(acls.iter().map(|r| r.acl))
        .into_iter()
        .map(|acl| &acls[position[&std::ptr::from_ref(acl)]])
        .collect()
}

/// For a UDP accept of the other direction, accepts its replies in this
/// chain: the peer at the other end of the packet, the ACL's ports as
/// source ports, established flows only.
fn reverse_udp_accepts(ctx: &Ctx, direction: Direction, chain: &str, r: &AclRef) -> Vec<String> {
    let accepts = r.acl.action == Action::Accept && r.acl.observe != ObserveMode::Continue;
    if !accepts || !r.acl.protocols.contains(&Protocol::Udp) {
        return Vec::new();
    }
    let peer = peer(direction);
    let head = format!(
        "-p udp -m conntrack --ctstate ESTABLISHED -m set --match-set {} {peer} \
         -m set ! --match-set {} {peer}",
        r.set,
        ctx.set(GlobalSet::TargetTcp)
    );
    multiport("--sports", &r.acl.ports)
        .into_iter()
        .map(|ports| format!("-A {chain} {} -j ACCEPT", join(&[&head, &ports])))
        .collect()
}

/// The trap: TCP set-up with target TCP networks — the SYN here, the
/// first ACK ([`handshake::first_ack`]; the SYN-ACK is the global
/// chains') — and UDP with target UDP networks go to user space; incoming
/// UDP at a bounded rate.
fn trap_rules(ctx: &Ctx, direction: Direction, chain: &str) -> [String; 3] {
    let peer = peer(direction);
    let tcp = format!(
        "-p tcp -m set --match-set {} {peer}",
        ctx.set(GlobalSet::TargetTcp)
    );
    let udp = format!(
        "-p udp -m set --match-set {} {peer}",
        ctx.set(GlobalSet::TargetUdp)
    );
    let limit = match direction {
        Direction::App => String::new(),
        Direction::Net => format!("-m limit --limit {NET_UDP_TRAP_LIMIT}"),
    };
    let queue = |trapped| ctx.queue(direction, trapped);
    [
        format!(
            "-A {chain} {tcp} -m tcp --tcp-flags SYN,ACK SYN -j {}",
            queue(Trapped::Syn)
        ),
        format!(
            "-A {chain} {} -m set --match-set {} {peer} -j {}",
            handshake::first_ack(ctx.family),
            ctx.set(GlobalSet::TargetTcp),
            queue(Trapped::Ack)
        ),
        format!(
            "-A {chain} {} -j {}",
            join(&[&udp, &limit]),
            queue(Trapped::Service)
        ),
    ]
}

/// The protocol match of an ACL protocol in `family`: `None` for the other
/// family's ICMP, which never occurs there. TCP ACLs judge new
/// connections only (SPEC); the connection mark carries the verdict on.
fn protocol_match(protocol: Protocol, family: IpFamily) -> Option<&'static str> {
    match (protocol, family) {
        (Protocol::Tcp, _) => Some("-p tcp -m conntrack --ctstate NEW"),
        (Protocol::Udp, _) => Some("-p udp"),
        (Protocol::Icmp, IpFamily::V4) => Some("-p icmp"),
        (Protocol::Icmpv6, IpFamily::V6) => Some("-p icmpv6"),
        (Protocol::Icmp, IpFamily::V6) | (Protocol::Icmpv6, IpFamily::V4) => None,
        (Protocol::Any, _) => Some(""),
    }
}

/// `-m multiport <flag> …` matches covering `ports`, at most 15 slots
/// each (the kernel's limit, a range counting two); one empty match when
/// there are no ports (every port).
fn multiport(flag: &str, ports: &[PortRange]) -> Vec<String> {
    let mut groups: Vec<(usize, Vec<String>)> = Vec::new();
    for range in ports {
        let slots = if range.is_single() { 1 } else { 2 };
        match groups.last_mut() {
            Some((used, group)) if *used + slots <= MULTIPORT_SLOTS => {
                *used += slots;
                group.push(range.to_string());
            }
            _ => groups.push((slots, vec![range.to_string()])),
        }
    }
    if groups.is_empty() {
        return vec![String::new()];
    }
    groups
        .into_iter()
        .map(|(_, group)| format!("-m multiport {flag} {}", group.join(",")))
        .collect()
}

/// The non-empty parts, separated by spaces.
fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use enforcer_common::marks::MarkLayout;

    use super::*;
    use crate::datapath::iptables::rules::{Table, section};
    use crate::datapath::iptables::sets;
    use crate::naming::NameRegistry;
    use crate::policy::test_support::acl;
    use crate::policy::{Mode, PolicyId, PuId, QueueSettings};

    fn with(acl: Acl, policy: &str, log: bool, observe: ObserveMode) -> Acl {
        Acl {
            policy_id: PolicyId::new(policy).unwrap(),
            log,
            observe,
            ..acl
        }
    }

    /// A linux-process PU `web` in cgroup `enforcer/web`, no ACLs.
    fn web() -> Pu {
        Pu {
            id: PuId::new("web").unwrap(),
            kind: PuKind::LinuxProcess {
                cgroup: CgroupPath::new("enforcer/web").unwrap(),
            },
            labels: Default::default(),
            tcp_ports: vec![PortRange::new(80, 80).unwrap()],
            udp_ports: vec![],
            application_acls: vec![],
            network_acls: vec![],
            proxy_port: None,
            dns_proxy_port: None,
            dependent_services: vec![],
            exposed_services: vec![],
        }
    }

    /// The ACL mix of the golden tests, written in an order that is *not*
    /// the bucket order.
    fn web_with_acls() -> Pu {
        use Protocol::*;
        let app = vec![
            // 0: accept, logged; ranges and single ports.
            with(
                acl(
                    &["10.30.0.0/16", "fd00:30::/64"],
                    &[Tcp],
                    &[(443, 443), (9000, 9100)],
                    Action::Accept,
                    "p",
                ),
                "web-to-api",
                true,
                ObserveMode::None,
            ),
            // 1: protocol any, only observed: after the trap, logs only.
            with(
                acl(&["192.168.100.0/24"], &[Any], &[], Action::Reject, "p"),
                "legacy-trial",
                false,
                ObserveMode::Continue,
            ),
            // 2: UDP accept: a reverse rule on the net side.
            with(
                acl(&["10.0.0.53/32"], &[Udp], &[(53, 53)], Action::Accept, "p"),
                "dns",
                false,
                ObserveMode::None,
            ),
            // 3: a reject inside ACL 0's networks: evaluated first.
            with(
                acl(
                    &["10.30.5.0/24"],
                    &[Tcp],
                    &[(443, 443)],
                    Action::Reject,
                    "p",
                ),
                "no-api-5",
                false,
                ObserveMode::None,
            ),
            // 4: ICMP accept, observe-apply; IPv4 only by protocol.
            with(
                acl(
                    &["10.99.0.0/24", "fd00:99::/64"],
                    &[Icmp],
                    &[],
                    Action::Accept,
                    "p",
                ),
                "ping",
                false,
                ObserveMode::Apply,
            ),
        ];
        let net = vec![
            // 0: every source (a /0, split for ipset), two TCP ports.
            with(
                acl(
                    &["0.0.0.0/0"],
                    &[Tcp],
                    &[(80, 80), (443, 443)],
                    Action::Accept,
                    "p",
                ),
                "public",
                false,
                ObserveMode::None,
            ),
            // 1: any protocol from guests, logged and applied.
            with(
                acl(&["10.66.0.0/16"], &[Any], &[], Action::Reject, "p"),
                "no-guests",
                true,
                ObserveMode::Apply,
            ),
        ];
        Pu {
            tcp_ports: vec![
                PortRange::new(80, 80).unwrap(),
                PortRange::new(8000, 8080).unwrap(),
            ],
            application_acls: app,
            network_acls: net,
            ..web()
        }
    }

    fn ctx(family: IpFamily, queues: &QueueSettings) -> Ctx<'_> {
        Ctx {
            family,
            mode: Mode::LocalServer,
            marks: MarkLayout::default(),
            queues,
        }
    }

    fn short(id: &str) -> ShortName {
        NameRegistry::new().assign(&PuId::new(id).unwrap()).unwrap()
    }

    /// Default marks (kind mask 0x700: external 0x200) and queues (app SYN
    /// 0-3, ACK 4-7, service 12-15; net SYN 16-19, ACK 20-23, service
    /// 28-31). `web`'s short name is `webbBzx`.
    #[test]
    fn pu_with_acls_v4() {
        let pu = web_with_acls();
        let short = short("web");
        assert_eq!(short.as_str(), "webbBzx");
        let plan = PuPlan::new(&pu, &short, 1).unwrap();
        let queues = QueueSettings::default();
        let text = section(Table::Mangle, &plan.install(&ctx(IpFamily::V4, &queues)));
        let expected = r#"
*mangle
:TRI-App-webbBzx-1 - [0:0]
:TRI-Net-webbBzx-1 - [0:0]
-A TRI-App-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1a3 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 443 -j DROP
-A TRI-App-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1a0 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 443,9000:9100 -j NFLOG --nflog-group 10 --nflog-prefix webbBzx:accept:web-to-api
-A TRI-App-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1a0 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 443,9000:9100 -j CONNMARK --set-xmark 0x200/0x700
-A TRI-App-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1a0 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 443,9000:9100 -j ACCEPT
-A TRI-App-webbBzx-1 -p udp -m set --match-set TRI-v4-Acl-webbBzx-1a2 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 53 -j CONNMARK --set-xmark 0x200/0x700
-A TRI-App-webbBzx-1 -p udp -m set --match-set TRI-v4-Acl-webbBzx-1a2 dst -m set ! --match-set TRI-v4-TargetTCP dst -m multiport --dports 53 -j ACCEPT
-A TRI-App-webbBzx-1 -p icmp -m set --match-set TRI-v4-Acl-webbBzx-1a4 dst -m set ! --match-set TRI-v4-TargetTCP dst -j NFLOG --nflog-group 10 --nflog-prefix webbBzx:accept-oa:ping
-A TRI-App-webbBzx-1 -p icmp -m set --match-set TRI-v4-Acl-webbBzx-1a4 dst -m set ! --match-set TRI-v4-TargetTCP dst -j CONNMARK --set-xmark 0x200/0x700
-A TRI-App-webbBzx-1 -p icmp -m set --match-set TRI-v4-Acl-webbBzx-1a4 dst -m set ! --match-set TRI-v4-TargetTCP dst -j ACCEPT
-A TRI-App-webbBzx-1 -p tcp -m set --match-set TRI-v4-TargetTCP dst -m tcp --tcp-flags SYN,ACK SYN -j NFQUEUE --queue-balance 0:3 --queue-bypass
-A TRI-App-webbBzx-1 -p tcp -m tcp --tcp-flags SYN,ACK,FIN,RST ACK -m conntrack --ctdir ORIGINAL -m connbytes --connbytes 0:3 --connbytes-dir original --connbytes-mode packets -m bpf --bytecode "12,40 0 0 2,2 0 0 0,177 0 0 0,80 0 0 12,116 0 0 2,84 0 0 60,12 0 0 0,7 0 0 0,96 0 0 0,29 0 1 0,6 0 0 1,6 0 0 0" -m set --match-set TRI-v4-TargetTCP dst -j NFQUEUE --queue-balance 4:7 --queue-bypass
-A TRI-App-webbBzx-1 -p udp -m set --match-set TRI-v4-TargetUDP dst -j NFQUEUE --queue-balance 12:15 --queue-bypass
-A TRI-App-webbBzx-1 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A TRI-App-webbBzx-1 -m set --match-set TRI-v4-Acl-webbBzx-1a1 dst -j NFLOG --nflog-group 10 --nflog-prefix webbBzx:reject-oc:legacy-trial
-A TRI-App-webbBzx-1 -m conntrack --ctstate NEW -j NFLOG --nflog-group 10 --nflog-prefix webbBzx:default:
-A TRI-App-webbBzx-1 -m conntrack ! --ctstate NEW -j NFLOG --nflog-group 10 --nflog-prefix webbBzx:default-other:
-A TRI-App-webbBzx-1 -j DROP
-A TRI-Net-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1n0 src -m set ! --match-set TRI-v4-TargetTCP src -m multiport --dports 80,443 -j CONNMARK --set-xmark 0x200/0x700
-A TRI-Net-webbBzx-1 -p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v4-Acl-webbBzx-1n0 src -m set ! --match-set TRI-v4-TargetTCP src -m multiport --dports 80,443 -j ACCEPT
-A TRI-Net-webbBzx-1 -p udp -m conntrack --ctstate ESTABLISHED -m set --match-set TRI-v4-Acl-webbBzx-1a2 src -m set ! --match-set TRI-v4-TargetTCP src -m multiport --sports 53 -j ACCEPT
-A TRI-Net-webbBzx-1 -p tcp -m set --match-set TRI-v4-TargetTCP src -m tcp --tcp-flags SYN,ACK SYN -j NFQUEUE --queue-balance 16:19 --queue-bypass
-A TRI-Net-webbBzx-1 -p tcp -m tcp --tcp-flags SYN,ACK,FIN,RST ACK -m conntrack --ctdir ORIGINAL -m connbytes --connbytes 0:3 --connbytes-dir original --connbytes-mode packets -m bpf --bytecode "12,40 0 0 2,2 0 0 0,177 0 0 0,80 0 0 12,116 0 0 2,84 0 0 60,12 0 0 0,7 0 0 0,96 0 0 0,29 0 1 0,6 0 0 1,6 0 0 0" -m set --match-set TRI-v4-TargetTCP src -j NFQUEUE --queue-balance 20:23 --queue-bypass
-A TRI-Net-webbBzx-1 -p udp -m set --match-set TRI-v4-TargetUDP src -m limit --limit 1000/s -j NFQUEUE --queue-balance 28:31 --queue-bypass
-A TRI-Net-webbBzx-1 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A TRI-Net-webbBzx-1 -m set --match-set TRI-v4-Acl-webbBzx-1n1 src -j NFLOG --nflog-group 11 --nflog-prefix webbBzx:reject-oa:no-guests
-A TRI-Net-webbBzx-1 -m set --match-set TRI-v4-Acl-webbBzx-1n1 src -j DROP
-A TRI-Net-webbBzx-1 -m conntrack --ctstate NEW -j NFLOG --nflog-group 11 --nflog-prefix webbBzx:default:
-A TRI-Net-webbBzx-1 -m conntrack ! --ctstate NEW -j NFLOG --nflog-group 11 --nflog-prefix webbBzx:default-other:
-A TRI-Net-webbBzx-1 -j DROP
-A TRI-Pid-App -m cgroup --path enforcer/web -m comment --comment "PU web" -j TRI-App-webbBzx-1
-A TRI-Pid-Net -p tcp -m set --match-set TRI-v4-ProcPort-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-1
-A TRI-Pid-Net -p udp -m set --match-set TRI-v4-ProcUDP-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-1
COMMIT
"#;
        assert_eq!(text, expected[1..]);

        assert_eq!(
            sets::create(&plan.sets(IpFamily::V4)),
            "create TRI-v4-ProcPort-webbBzx bitmap:port range 0-65535 -exist\n\
             flush TRI-v4-ProcPort-webbBzx\n\
             add TRI-v4-ProcPort-webbBzx 80 -exist\n\
             add TRI-v4-ProcPort-webbBzx 8000-8080 -exist\n\
             create TRI-v4-ProcUDP-webbBzx bitmap:port range 0-65535 -exist\n\
             flush TRI-v4-ProcUDP-webbBzx\n\
             create TRI-v4-Acl-webbBzx-1a0 hash:net family inet -exist\n\
             flush TRI-v4-Acl-webbBzx-1a0\n\
             add TRI-v4-Acl-webbBzx-1a0 10.30.0.0/16 -exist\n\
             create TRI-v4-Acl-webbBzx-1a1 hash:net family inet -exist\n\
             flush TRI-v4-Acl-webbBzx-1a1\n\
             add TRI-v4-Acl-webbBzx-1a1 192.168.100.0/24 -exist\n\
             create TRI-v4-Acl-webbBzx-1a2 hash:net family inet -exist\n\
             flush TRI-v4-Acl-webbBzx-1a2\n\
             add TRI-v4-Acl-webbBzx-1a2 10.0.0.53/32 -exist\n\
             create TRI-v4-Acl-webbBzx-1a3 hash:net family inet -exist\n\
             flush TRI-v4-Acl-webbBzx-1a3\n\
             add TRI-v4-Acl-webbBzx-1a3 10.30.5.0/24 -exist\n\
             create TRI-v4-Acl-webbBzx-1a4 hash:net family inet -exist\n\
             flush TRI-v4-Acl-webbBzx-1a4\n\
             add TRI-v4-Acl-webbBzx-1a4 10.99.0.0/24 -exist\n\
             create TRI-v4-Acl-webbBzx-1n0 hash:net family inet -exist\n\
             flush TRI-v4-Acl-webbBzx-1n0\n\
             add TRI-v4-Acl-webbBzx-1n0 0.0.0.0/1 -exist\n\
             add TRI-v4-Acl-webbBzx-1n0 128.0.0.0/1 -exist\n\
             create TRI-v4-Acl-webbBzx-1n1 hash:net family inet -exist\n\
             flush TRI-v4-Acl-webbBzx-1n1\n\
             add TRI-v4-Acl-webbBzx-1n1 10.66.0.0/16 -exist\n"
        );
    }

    /// The same PU in IPv6: only ACL 0 applies (4 has IPv6 networks but
    /// IPv4's ICMP, so it gets neither a set nor a rule); ICMPv6 accepted
    /// before the trap.
    #[test]
    fn pu_with_acls_v6() {
        let pu = web_with_acls();
        let short = short("web");
        let plan = PuPlan::new(&pu, &short, 0).unwrap();
        let queues = QueueSettings::default();
        let lines = plan.install(&ctx(IpFamily::V6, &queues));
        let app: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("-A TRI-App-webbBzx-0 "))
            .collect();
        assert_eq!(
            app[..4],
            [
                "-p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v6-Acl-webbBzx-0a0 dst -m set ! --match-set TRI-v6-TargetTCP dst -m multiport --dports 443,9000:9100 -j NFLOG --nflog-group 10 --nflog-prefix webbBzx:accept:web-to-api",
                "-p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v6-Acl-webbBzx-0a0 dst -m set ! --match-set TRI-v6-TargetTCP dst -m multiport --dports 443,9000:9100 -j CONNMARK --set-xmark 0x200/0x700",
                "-p tcp -m conntrack --ctstate NEW -m set --match-set TRI-v6-Acl-webbBzx-0a0 dst -m set ! --match-set TRI-v6-TargetTCP dst -m multiport --dports 443,9000:9100 -j ACCEPT",
                "-p icmpv6 -j ACCEPT",
            ]
        );
        assert_eq!(app.len(), 4 + 3 + 1 + 3);
        assert!(lines.iter().all(|l| !l.contains("v4")), "{lines:#?}");
        let sets: Vec<String> = plan
            .acl_sets(IpFamily::V6)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(sets, ["TRI-v6-Acl-webbBzx-0a0"]);
    }

    /// An update is one commit: the new chains and hooks, then the old
    /// hooks and chains removed.
    #[test]
    fn update_hooks_new_then_removes_old() {
        let (old, new) = (web(), web_with_acls());
        let short = short("web");
        let queues = QueueSettings::default();
        let ctx = ctx(IpFamily::V4, &queues);
        let new_plan = PuPlan::new(&new, &short, 1).unwrap();
        let old_plan = PuPlan::new(&old, &short, 0).unwrap();
        let lines = [new_plan.install(&ctx), old_plan.remove(&ctx)].concat();
        let outside: Vec<&String> = lines
            .iter()
            .filter(|l| {
                !l.contains("-A TRI-App-webbBzx-1 ") && !l.contains("-A TRI-Net-webbBzx-1 ")
            })
            .collect();
        assert_eq!(
            outside,
            [
                ":TRI-App-webbBzx-1 - [0:0]",
                ":TRI-Net-webbBzx-1 - [0:0]",
                r#"-A TRI-Pid-App -m cgroup --path enforcer/web -m comment --comment "PU web" -j TRI-App-webbBzx-1"#,
                r#"-A TRI-Pid-Net -p tcp -m set --match-set TRI-v4-ProcPort-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-1"#,
                r#"-A TRI-Pid-Net -p udp -m set --match-set TRI-v4-ProcUDP-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-1"#,
                r#"-D TRI-Pid-App -m cgroup --path enforcer/web -m comment --comment "PU web" -j TRI-App-webbBzx-0"#,
                r#"-D TRI-Pid-Net -p tcp -m set --match-set TRI-v4-ProcPort-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-0"#,
                r#"-D TRI-Pid-Net -p udp -m set --match-set TRI-v4-ProcUDP-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-0"#,
                "-F TRI-App-webbBzx-0",
                "-F TRI-Net-webbBzx-0",
                "-X TRI-App-webbBzx-0",
                "-X TRI-Net-webbBzx-0",
            ]
        );
    }

    /// A PU without ACLs: the trap and the default drop only; its port
    /// sets exist but its ACL sets do not.
    #[test]
    fn pu_without_acls_and_delete() {
        let pu = web();
        let short = short("web");
        let plan = PuPlan::new(&pu, &short, 0).unwrap();
        let queues = QueueSettings::default();
        let ctx = ctx(IpFamily::V4, &queues);
        let net: Vec<String> = plan
            .install(&ctx)
            .into_iter()
            .filter_map(|l| l.strip_prefix("-A TRI-Net-webbBzx-0 ").map(str::to_owned))
            .collect();
        assert_eq!(
            net,
            [
                "-p tcp -m set --match-set TRI-v4-TargetTCP src -m tcp --tcp-flags SYN,ACK SYN -j NFQUEUE --queue-balance 16:19 --queue-bypass",
                "-p tcp -m tcp --tcp-flags SYN,ACK,FIN,RST ACK -m conntrack --ctdir ORIGINAL -m connbytes --connbytes 0:3 --connbytes-dir original --connbytes-mode packets -m bpf --bytecode \"12,40 0 0 2,2 0 0 0,177 0 0 0,80 0 0 12,116 0 0 2,84 0 0 60,12 0 0 0,7 0 0 0,96 0 0 0,29 0 1 0,6 0 0 1,6 0 0 0\" -m set --match-set TRI-v4-TargetTCP src -j NFQUEUE --queue-balance 20:23 --queue-bypass",
                "-p udp -m set --match-set TRI-v4-TargetUDP src -m limit --limit 1000/s -j NFQUEUE --queue-balance 28:31 --queue-bypass",
                "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "-m conntrack --ctstate NEW -j NFLOG --nflog-group 11 --nflog-prefix webbBzx:default:",
                "-m conntrack ! --ctstate NEW -j NFLOG --nflog-group 11 --nflog-prefix webbBzx:default-other:",
                "-j DROP",
            ]
        );
        assert!(plan.acl_sets(IpFamily::V4).is_empty());
        assert_eq!(
            section(Table::Mangle, &plan.remove(&ctx)),
            r#"*mangle
-D TRI-Pid-App -m cgroup --path enforcer/web -m comment --comment "PU web" -j TRI-App-webbBzx-0
-D TRI-Pid-Net -p tcp -m set --match-set TRI-v4-ProcPort-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-0
-D TRI-Pid-Net -p udp -m set --match-set TRI-v4-ProcUDP-webbBzx dst -m comment --comment "PU web" -j TRI-Net-webbBzx-0
-F TRI-App-webbBzx-0
-F TRI-Net-webbBzx-0
-X TRI-App-webbBzx-0
-X TRI-Net-webbBzx-0
COMMIT
"#
        );
    }

    #[test]
    fn multiport_takes_15_slots_a_range_two() {
        let singles: Vec<PortRange> = (1..=16).map(|p| PortRange::new(p, p).unwrap()).collect();
        let m = multiport("--dports", &singles);
        assert_eq!(m.len(), 2);
        assert!(m[0].ends_with(",15") && m[1] == "-m multiport --dports 16");
        let ranges: Vec<PortRange> = (0..8)
            .map(|i| PortRange::new(100 * i + 1, 100 * i + 2).unwrap())
            .collect();
        let m = multiport("--sports", &ranges);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[1], "-m multiport --sports 701:702");
        assert_eq!(multiport("--dports", &[]), [""]);
    }

    /// The lines of `pu`'s install outside its own chains' rules: the
    /// chain declarations and the hooks (SPEC, "Global steering": each
    /// kind from its own global chain), and its port sets.
    fn hooks_and_sets(pu: &Pu, mode: Mode) -> (Vec<String>, Vec<String>) {
        let short = short("web");
        let plan = PuPlan::new(pu, &short, 0).unwrap();
        let queues = QueueSettings::default();
        let ctx = Ctx {
            mode,
            ..ctx(IpFamily::V4, &queues)
        };
        let hooks = plan
            .install(&ctx)
            .into_iter()
            .filter(|l| {
                !l.starts_with("-A TRI-App-webbBzx-0 ") && !l.starts_with("-A TRI-Net-webbBzx-0 ")
            })
            .filter(|l| !l.starts_with(':'))
            .collect();
        let sets = plan
            .sets(IpFamily::V4)
            .into_iter()
            .map(|s| s.name)
            .collect();
        (hooks, sets)
    }

    /// A net_cls (cgroup v1) PU: the outgoing hook matches its class id
    /// (decimal, as `iptables-save` prints it) instead of a path; its
    /// chains and incoming hooks are the cgroup v2 PU's, line for line.
    #[test]
    fn a_net_cls_pu_is_hooked_by_class_id() {
        let pu = web_with_acls();
        let short = short("web");
        let queues = QueueSettings::default();
        let class_id = ClassId::nth(0);
        for family in IpFamily::ALL {
            let ctx = ctx(family, &queues);
            let by_path = PuPlan::new(&pu, &short, 1).unwrap();
            let by_id = by_path.with_class_id(class_id);
            let (v2, v1) = (by_path.install(&ctx), by_id.install(&ctx));
            let hook = r#"-A TRI-Pid-App -m cgroup --cgroup 286326884 -m comment --comment "PU web" -j TRI-App-webbBzx-1"#;
            let differ: Vec<(&String, &String)> =
                v2.iter().zip(&v1).filter(|(a, b)| a != b).collect();
            assert_eq!(v2.len(), v1.len());
            assert_eq!(
                differ,
                [(
                    &r#"-A TRI-Pid-App -m cgroup --path enforcer/web -m comment --comment "PU web" -j TRI-App-webbBzx-1"#.to_owned(),
                    &hook.to_owned()
                )]
            );
            let removed = by_id.remove(&ctx);
            assert_eq!(removed[0], hook.replacen("-A", "-D", 1));
            assert!(
                removed.iter().all(|l| !l.contains("--path")),
                "{removed:#?}"
            );
        }
    }

    #[test]
    fn each_kind_is_hooked_from_its_own_chain() {
        let comment = r#"-m comment --comment "PU web""#;
        let of = |kind: PuKind| Pu { kind, ..web() };
        let uid = |user| of(PuKind::Uid { user });
        let cases = [
            (
                uid(UserSpec::Id(65534)),
                Mode::LocalServer,
                vec![
                    format!(
                        "-A TRI-UID-App -m owner --uid-owner 65534 {comment} -j TRI-App-webbBzx-0"
                    ),
                    format!(
                        "-A TRI-UID-Net -p tcp -m set --match-set TRI-v4-UID-Port-webbBzx dst {comment} -j TRI-Net-webbBzx-0"
                    ),
                    format!(
                        "-A TRI-UID-Net -p udp -m set --match-set TRI-v4-UID-UDP-webbBzx dst {comment} -j TRI-Net-webbBzx-0"
                    ),
                ],
                vec!["TRI-v4-UID-Port-webbBzx", "TRI-v4-UID-UDP-webbBzx"],
            ),
            (
                uid(UserSpec::Name(
                    crate::policy::UserName::new("www-data").unwrap(),
                )),
                Mode::LocalServer,
                vec![
                    format!(
                        "-A TRI-UID-App -m owner --uid-owner www-data {comment} -j TRI-App-webbBzx-0"
                    ),
                    format!(
                        "-A TRI-UID-Net -p tcp -m set --match-set TRI-v4-UID-Port-webbBzx dst {comment} -j TRI-Net-webbBzx-0"
                    ),
                    format!(
                        "-A TRI-UID-Net -p udp -m set --match-set TRI-v4-UID-UDP-webbBzx dst {comment} -j TRI-Net-webbBzx-0"
                    ),
                ],
                vec!["TRI-v4-UID-Port-webbBzx", "TRI-v4-UID-UDP-webbBzx"],
            ),
            (
                of(PuKind::HostService),
                Mode::LocalServer,
                vec![
                    format!(
                        "-A TRI-Svc-App -p tcp -m set --match-set TRI-v4-SvcPort-webbBzx src {comment} -j TRI-App-webbBzx-0"
                    ),
                    format!(
                        "-A TRI-Svc-App -p udp -m set --match-set TRI-v4-SvcUDP-webbBzx src {comment} -j TRI-App-webbBzx-0"
                    ),
                    format!(
                        "-A TRI-Svc-Net -p tcp -m set --match-set TRI-v4-SvcPort-webbBzx dst {comment} -j TRI-Net-webbBzx-0"
                    ),
                    format!(
                        "-A TRI-Svc-Net -p udp -m set --match-set TRI-v4-SvcUDP-webbBzx dst {comment} -j TRI-Net-webbBzx-0"
                    ),
                ],
                vec!["TRI-v4-SvcPort-webbBzx", "TRI-v4-SvcUDP-webbBzx"],
            ),
            (
                of(PuKind::Host),
                Mode::LocalServer,
                vec![
                    format!("-A TRI-Hst-App {comment} -j TRI-App-webbBzx-0"),
                    format!("-A TRI-Hst-Net {comment} -j TRI-Net-webbBzx-0"),
                ],
                vec![],
            ),
            (
                of(PuKind::Container),
                Mode::RemoteContainer,
                vec![
                    format!("-A TRI-App {comment} -j TRI-App-webbBzx-0"),
                    format!("-A TRI-Net {comment} -j TRI-Net-webbBzx-0"),
                ],
                vec![],
            ),
        ];
        for (pu, mode, hooks, sets) in cases {
            let (got_hooks, got_sets) = hooks_and_sets(&pu, mode);
            assert_eq!(got_hooks, hooks, "{:?}", pu.kind);
            assert_eq!(got_sets, sets, "{:?}", pu.kind);
        }
    }

    /// A sidecar lets DNS through after the specific ACLs, before the
    /// trap (the seed's `needDnsRules`); no other mode does.
    #[test]
    fn a_sidecar_lets_dns_through() {
        let pu = Pu {
            kind: PuKind::Container,
            ..web()
        };
        let short = short("web");
        let plan = PuPlan::new(&pu, &short, 0).unwrap();
        let queues = QueueSettings::default();
        for (mode, expected) in [
            (
                Mode::Sidecar,
                vec![
                    "-A TRI-App-webbBzx-0 -p udp -m udp --dport 53 -j ACCEPT",
                    "-A TRI-Net-webbBzx-0 -p udp -m udp --sport 53 -j ACCEPT",
                ],
            ),
            (Mode::RemoteContainer, vec![]),
        ] {
            let ctx = Ctx {
                mode,
                ..ctx(IpFamily::V4, &queues)
            };
            let lines = plan.install(&ctx);
            let dns: Vec<&str> = lines
                .iter()
                .map(String::as_str)
                .filter(|l| l.contains(" 53 "))
                .collect();
            assert_eq!(dns, expected, "{mode}");
            if mode == Mode::Sidecar {
                // Before the trap.
                let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap();
                assert!(at("--dport 53") < at("NFQUEUE"));
            }
        }
    }

    /// Proxy redirection is installed for the kinds whose outgoing
    /// traffic has a match of its own, refused naming the kind for the
    /// host and host-service PUs.
    #[test]
    fn proxy_redirection_is_refused_for_host_kinds_only() {
        let port = std::num::NonZeroU16::new(15001);
        let proxied = |kind: PuKind| Pu {
            kind,
            proxy_port: port,
            ..web()
        };
        let short = short("web");
        for kind in [
            web().kind,
            PuKind::Uid {
                user: UserSpec::Id(1000),
            },
            PuKind::Container,
        ] {
            let pu = proxied(kind);
            let plan = PuPlan::new(&pu, &short, 0).unwrap();
            assert!(plan.is_proxied());
            assert_eq!(plan.proxy_sets(IpFamily::V4).len(), 2);
        }
        for (kind, name) in [
            (PuKind::Host, "host"),
            (PuKind::HostService, "host-service"),
        ] {
            let pu = Pu {
                dns_proxy_port: port,
                ..proxied(kind)
            };
            let err = PuPlan::new(&pu, &short, 0).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "PU web: proxy redirection for a {name} PU is not supported by the iptables datapath"
                )
            );
        }
        // Without a proxy port there are no proxy sets (a DNS proxy alone
        // needs none).
        let dns_only = Pu {
            dns_proxy_port: port,
            ..web()
        };
        let plan = PuPlan::new(&dns_only, &short, 0).unwrap();
        assert!(plan.proxy_sets(IpFamily::V4).is_empty());
    }

    #[test]
    fn logged_and_observed_acls_are_accepted() {
        let pu = web_with_acls();
        assert!(pu.application_acls.iter().any(|a| a.log));
        for observe in [ObserveMode::Continue, ObserveMode::Apply] {
            assert!(pu.application_acls.iter().any(|a| a.observe == observe));
        }
        assert!(check(&pu).is_ok());
    }
}
