//! The iptables + ipset fallback datapath: the seed's `TRI-` chains and
//! sets, applied in batches with `iptables-restore --noflush` and
//! `ipset restore` in the agent's network namespace.
//!
//! Rendering is pure and lives beside the executor, not in it:
//! - [`rules`]: the restore-file vocabulary (tables, mark and queue
//!   fragments) shared by
//! - [`global`]: the target/excluded sets, the `TRI-` chains and the
//!   steering rules that `run` installs, and
//! - [`pu`]: one linux-process PU's sets, chains and hooks;
//! - [`sets`]: `ipset restore` text; [`save`]: reading `iptables-save`;
//! - [`exec`]: running the tools (the only I/O), always with the flavour
//!   [`backend`] chose (nf_tables or legacy, never both).
//!
//! IPv4 and IPv6 are one implementation: every renderer takes the family
//! as a parameter ([`rules::Ctx`]), and each operation loops over
//! [`IpFamily::ALL`].
//!
//! This module keeps what the kernel holds — each PU's policy, short name
//! and version (every chain and set name derives from those three), and
//! the target networks per family — and makes every change all or
//! nothing: sets first (nothing else happens if that fails), then one
//! `iptables-restore` per family; a later failure undoes the earlier
//! steps. Start-up configures every PU in one such operation (one
//! `ipset restore`, one restore per family): each restore costs in
//! proportion to the rules already there, so one per PU would make a
//! start-up quadratic in the number of PUs. Every mode and PU kind SPEC
//! allows is handled ([`pu::Hook`]); a PU kind the mode does not accept,
//! or a policy feature not enforced yet, is refused before any change.
//!
//! After an update's commit, the connections only the old policy allowed
//! are cut, outgoing and incoming ([`IptablesDatapath::cut_revoked`]): an
//! ACL's accept marks the connection, and the main chains accept every
//! later packet of a marked connection without asking the PU's chain
//! again.

pub mod backend;
pub mod exec;
pub mod global;
pub mod nflog;
pub mod proxy;
pub mod pu;
pub mod rules;
pub mod save;
pub mod sets;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, anyhow};
use enforcer_common::marks::Kind;
use ipnet::IpNet;
use tracing::{info, warn};

use self::exec::{Netfilter, System};
use self::pu::PuPlan;
use self::rules::{Ctx, Table, section};
use super::fault::{Faults, Operation};
use super::netcls::{ClassId, ClassIds};
use super::owner::{Owner, PuSockets};
use super::ports::{self, ListenPort, RuntimePorts, Transport};
use super::queues::Direction;
use super::revoke::{self, Setup};
use super::{Counters, Datapath, DatapathError, DatapathKind, DatapathSettings, Result};
use crate::flowlog::{FlowAction, FlowObserve};
use crate::naming::{
    GlobalSet, LogTag, NameRegistry, PROXY_CHAINS, REDIRECT_CHAINS, ShortName, nflog_prefix,
};
use crate::policy::{Action, ObserveMode};
use crate::policy::{
    FamilyNetworks, IpFamily, NetworkSettings, PerFamily, PortRange, Pu, PuId, PuKind,
};

/// PUs per batch of a [`IptablesDatapath::configure_all`]. One restore per
/// PU costs a full re-read of the rule set each (start-up grows with the
/// square of the PUs), while `iptables-nft-restore` slows down more than
/// linearly with the size of one input; batches of this size keep both
/// small.
const BATCH_PUS: usize = 250;

/// Test-only ([`fault`]): a rule whose chain never exists, so that the
/// `iptables-restore` it ends fails as a whole, as a real failure would.
const FAULT_RULE: &str = "-A enforcer-test-fault -j ACCEPT";

/// Rule lines of one family: mangle, then nat (a PU's proxy redirection).
type Tables = (Vec<String>, Vec<String>);

/// The restore text of `mangle` and `nat` lines; without nat lines, the
/// mangle section alone (a PU without a proxy touches nothing else).
fn tables_text(mangle: &[String], nat: &[String]) -> String {
    let text = section(Table::Mangle, mangle);
    match nat.is_empty() {
        true => text,
        false => text + &section(Table::Nat, nat),
    }
}
/// Test-only ([`fault`]): a line naming a set that never exists;
/// `ipset restore` applies the lines before it, then fails, as it does on
/// a real failure.
const FAULT_SET_LINE: &str = "add enforcer-test-fault 0.0.0.0\n";

/// A PU as installed.
#[derive(Debug)]
struct Installed {
    pu: Pu,
    short: ShortName,
    version: u8,
    /// Its run-time ports ([`ports`]), in its port sets beside `pu`'s.
    runtime: RuntimePorts,
    /// Its net_cls class id, when its cgroup is cgroup v1 ([`netcls`]).
    class_id: Option<ClassId>,
}

impl Installed {
    fn plan(&self) -> Result<PuPlan<'_>> {
        Ok(PuPlan::new(&self.pu, &self.short, self.version)?.with_class_id(self.class_id))
    }

    /// `ipset restore` text adding (`add`) or deleting `port` in the
    /// PU's port set of its transport, in both families.
    fn port_change(&self, port: ListenPort, add: bool) -> Result<String> {
        let plan = self.plan()?;
        let one = [port.range()];
        let (from, to): (&[PortRange], &[PortRange]) = match add {
            true => (&[], &one),
            false => (&one, &[]),
        };
        let index = match port.transport {
            Transport::Tcp => 0,
            Transport::Udp => 1,
        };
        IpFamily::ALL
            .into_iter()
            .map(|family| {
                // A host or container PU has every port no other PU holds,
                // and no port set to put one in.
                let sets = plan.port_sets(family);
                let (name, _) = sets.get(index).ok_or_else(|| {
                    DatapathError::Unsupported(
                        format!("PU {}: a run-time port (it has no port set)", self.pu.id),
                        DatapathKind::Iptables,
                    )
                })?;
                Ok(sets::port_diff(name, from, to))
            })
            .collect()
    }
}

pub struct IptablesDatapath {
    settings: DatapathSettings,
    nf: Box<dyn Netfilter>,
    names: NameRegistry,
    pus: BTreeMap<PuId, Installed>,
    /// The class ids of net_cls (cgroup v1) PUs.
    class_ids: ClassIds,
    /// What the global sets hold; `None` until `run` has created them.
    targets: Option<PerFamily<FamilyNetworks>>,
    /// Test-only fault injection ([`fault`]).
    faults: Faults,
    /// Where flow records go, if the agent wants them.
    flow_log: Option<crate::flowlog::FlowSender>,
    /// The installed PUs' ACL log prefixes, for the NFLOG reader.
    flow_prefixes: Arc<Mutex<nflog::Prefixes>>,
    /// Reads the NFLOG groups, between `run` and `cleanup`.
    flow_reader: Option<nflog::NflogReader>,
}

/// The log prefixes of one PU that make flow records: its ACL rules'
/// [`nflog_prefix`]es and its final drop of new connections.
fn acl_prefixes(pu: &Pu, short: &ShortName) -> Vec<(String, nflog::LoggedAcl)> {
    let final_drop = (
        nflog_prefix(short, LogTag::DefaultNew, None),
        nflog::LoggedAcl {
            pu: pu.id.to_string(),
            policy_id: crate::flowlog::DEFAULT_POLICY_ID.to_string(),
            action: FlowAction::Reject,
            observe: FlowObserve::None,
        },
    );
    pu.application_acls
        .iter()
        .chain(&pu.network_acls)
        .map(|acl| {
            let prefix = nflog_prefix(short, LogTag::Acl(acl.bucket()), Some(&acl.policy_id));
            let logged = nflog::LoggedAcl {
                pu: pu.id.to_string(),
                policy_id: acl.policy_id.to_string(),
                action: match acl.action {
                    Action::Accept => FlowAction::Accept,
                    Action::Reject => FlowAction::Reject,
                },
                observe: match acl.observe {
                    ObserveMode::None => FlowObserve::None,
                    ObserveMode::Continue => FlowObserve::ObserveContinue,
                    ObserveMode::Apply => FlowObserve::ObserveApply,
                },
            };
            (prefix, logged)
        })
        .chain([final_drop])
        .collect()
}

impl IptablesDatapath {
    /// Makes `pu`'s log prefixes known before its rules can log.
    fn add_prefixes(&self, pu: &Pu, short: &ShortName) {
        let mut prefixes = self.flow_prefixes.lock().expect("flow prefixes lock");
        prefixes.extend(acl_prefixes(pu, short));
    }

    /// The log prefixes of the installed PUs, and no others.
    fn sync_prefixes(&self) {
        let all = self
            .pus
            .values()
            .flat_map(|i| acl_prefixes(&i.pu, &i.short))
            .collect();
        *self.flow_prefixes.lock().expect("flow prefixes lock") = all;
    }

    pub fn new(settings: DatapathSettings) -> Result<Self> {
        let system = System::new(settings.iptables_backend);
        let mut datapath = Self::with_netfilter(settings, Box::new(system));
        datapath.faults = Faults::from_env()?;
        Ok(datapath)
    }

    fn with_netfilter(settings: DatapathSettings, nf: Box<dyn Netfilter>) -> Self {
        let class_ids = ClassIds::new(
            settings.net_cls_mount.clone(),
            settings.net_cls_record.clone(),
        );
        Self {
            settings,
            nf,
            names: NameRegistry::new(),
            pus: BTreeMap::new(),
            class_ids,
            targets: None,
            faults: Faults::none(),
            flow_log: None,
            flow_prefixes: Arc::default(),
            flow_reader: None,
        }
    }

    fn ctx(&self, family: IpFamily) -> Ctx<'_> {
        Ctx {
            family,
            mode: self.settings.mode,
            marks: self.settings.marks,
            queues: &self.settings.queues,
        }
    }

    /// Refuses what this datapath cannot install, before anything changes.
    fn check_supported(&self, pu: &Pu) -> Result<()> {
        let mode = self.settings.mode;
        if !mode.accepts(&pu.kind) {
            // Validation refuses the pairing; this guards a caller that
            // skipped it.
            let what = format!("a {} PU ({}) in mode {mode}", pu.kind.name(), pu.id);
            return Err(DatapathError::Unsupported(what, DatapathKind::Iptables));
        }
        if self.targets.is_none() {
            return Err(not_running());
        }
        pu::check(pu).map(drop)
    }

    /// Applies `rendered(family)` — mangle lines, then nat lines (a PU's
    /// proxy redirection; most PUs have none) — to each family in turn, in
    /// one restore per family; if one fails, applies `undo(family)` to
    /// those already done. Returns the failure, with the undo's own
    /// failures attached. With `fault` (test-only), the last family's
    /// restore is made to fail.
    fn apply_per_family(
        &self,
        rendered: impl Fn(&Ctx) -> Tables,
        undo: impl Fn(&Ctx) -> Tables,
        fault: bool,
    ) -> anyhow::Result<()> {
        for (done, family) in IpFamily::ALL.into_iter().enumerate() {
            let (mut lines, nat) = rendered(&self.ctx(family));
            if fault && done + 1 == IpFamily::ALL.len() {
                lines.push(FAULT_RULE.to_owned());
            }
            let text = tables_text(&lines, &nat);
            if let Err(e) = self.nf.restore(family, &text) {
                let mut e = e.context(format!("applying the {family} rules"));
                for earlier in &IpFamily::ALL[..done] {
                    let (mangle, nat) = undo(&self.ctx(*earlier));
                    if let Err(undo) = self.nf.restore(*earlier, &tables_text(&mangle, &nat)) {
                        e = e.context(format!(
                            "undoing the {earlier} rules also failed, they stay: {undo:#}"
                        ));
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Destroys those of `names` that exist, each once. For undoing a step
    /// and for `delete`: a set that is already gone is not an error.
    fn destroy_sets(&self, names: &[String]) -> anyhow::Result<()> {
        let existing = self.nf.ipset_names()?;
        let doomed: BTreeSet<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|name| existing.iter().any(|e| e == name))
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        self.nf.ipset_restore(&sets::destroy(doomed))
    }

    /// Undoes a set step after a later failure; the failure `e` stays the
    /// error, with the undo's failure attached.
    fn undo_sets(&self, e: anyhow::Error, undo: anyhow::Result<()>) -> DatapathError {
        match undo {
            Ok(()) => e.into(),
            Err(undo) => e
                .context(format!("undoing the set changes also failed: {undo:#}"))
                .into(),
        }
    }

    /// configure's steps once the names are assigned, for one PU or many
    /// at once, in batches of [`BATCH_PUS`]: per batch one `ipset restore`
    /// with its sets, then one restore per family with its chains and
    /// hooks. A failure undoes the batches done (their chains, then every
    /// set). With `fault` (test-only), the last restore fails.
    fn install(&self, plans: &[PuPlan], fault: bool) -> Result<()> {
        let sets_of = |plans: &[PuPlan]| -> Vec<sets::SetSpec> {
            plans
                .iter()
                .flat_map(|plan| IpFamily::ALL.iter().flat_map(|&f| plan.sets(f)))
                .collect()
        };
        let names: Vec<String> = sets_of(plans).into_iter().map(|s| s.name).collect();
        let mut done = 0;
        for batch in plans.chunks(BATCH_PUS) {
            let last = done + batch.len() == plans.len();
            let installed = &plans[..done];
            let undo = |e: anyhow::Error| -> DatapathError {
                let e = match self.remove_chains(installed) {
                    Ok(()) => e,
                    Err(undo) => e.context(format!(
                        "undoing the PUs configured before also failed, they stay: {undo:#}"
                    )),
                };
                self.undo_sets(e, self.destroy_sets(&names))
            };
            if let Err(e) = self.nf.ipset_restore(&sets::create(&sets_of(batch))) {
                // ipset restore stops at the failing line: some sets exist.
                return Err(undo(e.context("creating the PU's sets")));
            }
            let install = |ctx: &Ctx| -> Tables {
                let mangle = batch.iter().flat_map(|plan| plan.install(ctx)).collect();
                let nat = batch
                    .iter()
                    .flat_map(|plan| plan.nat_install(ctx))
                    .collect();
                (mangle, nat)
            };
            let remove = |ctx: &Ctx| -> Tables {
                let mangle = batch.iter().flat_map(|plan| plan.remove(ctx)).collect();
                let nat = batch.iter().flat_map(|plan| plan.nat_remove(ctx)).collect();
                (mangle, nat)
            };
            if let Err(e) = self.apply_per_family(install, remove, fault && last) {
                return Err(undo(e));
            }
            done += batch.len();
        }
        Ok(())
    }

    /// Unhooks and removes the chains of `plans`, in both families.
    fn remove_chains(&self, plans: &[PuPlan]) -> anyhow::Result<()> {
        if plans.is_empty() {
            return Ok(());
        }
        for family in IpFamily::ALL {
            let ctx = self.ctx(family);
            let lines: Vec<String> = plans.iter().flat_map(|plan| plan.remove(&ctx)).collect();
            let nat: Vec<String> = plans
                .iter()
                .flat_map(|plan| plan.nat_remove(&ctx))
                .collect();
            self.nf
                .restore(family, &tables_text(&lines, &nat))
                .with_context(|| format!("removing the {family} chains"))?;
        }
        Ok(())
    }

    /// update's steps: new ACL sets and port changes, then per family one
    /// commit that installs the new version and removes the old; with
    /// `fault` (test-only), the last commit fails.
    fn replace(&self, new: &PuPlan, old: &PuPlan, fault: bool) -> Result<()> {
        let new_sets: Vec<sets::SetSpec> = IpFamily::ALL
            .iter()
            .flat_map(|&f| new.acl_sets(f))
            .collect();
        let new_names: Vec<String> = new_sets.iter().map(|s| s.name.clone()).collect();
        let port_changes = |from: &PuPlan, to: &PuPlan| -> String {
            let mut text = String::new();
            for family in IpFamily::ALL {
                for ((name, old), (_, new)) in
                    from.port_sets(family).into_iter().zip(to.port_sets(family))
                {
                    text += &sets::port_diff(&name, old, new);
                }
            }
            text
        };
        // The proxy sets are not versioned either: those both policies
        // have change in place, the others come and go.
        let proxy_of = |plan: &PuPlan| -> Vec<sets::SetSpec> {
            IpFamily::ALL
                .iter()
                .flat_map(|&f| plan.proxy_sets(f))
                .collect()
        };
        let (old_proxy, new_proxy) = (proxy_of(old), proxy_of(new));
        let proxy_changes = |from: &[sets::SetSpec], to: &[sets::SetSpec]| -> String {
            let mut text = String::new();
            for spec in to {
                if let Some(was) = from.iter().find(|s| s.name == spec.name) {
                    text += &sets::entry_diff(&spec.name, &was.entries, &spec.entries);
                }
            }
            text
        };
        let fresh = |of: &[sets::SetSpec], besides: &[sets::SetSpec]| -> Vec<sets::SetSpec> {
            of.iter()
                .filter(|spec| besides.iter().all(|b| b.name != spec.name))
                .cloned()
                .collect()
        };
        let created_proxy = fresh(&new_proxy, &old_proxy);
        let new_names: Vec<String> = new_names
            .into_iter()
            .chain(created_proxy.iter().map(|s| s.name.clone()))
            .collect();
        let forward = sets::create(&new_sets)
            + &sets::create(&created_proxy)
            + &port_changes(old, new)
            + &proxy_changes(&old_proxy, &new_proxy);
        let revert_sets = || -> anyhow::Result<()> {
            // A difference with -exist applies cleanly over a partial one.
            let back = port_changes(new, old) + &proxy_changes(&new_proxy, &old_proxy);
            if !back.is_empty() {
                self.nf.ipset_restore(&back)?;
            }
            self.destroy_sets(&new_names)
        };
        if let Err(e) = self.nf.ipset_restore(&forward) {
            let e = e.context("creating the new sets");
            return Err(self.undo_sets(e, revert_sets()));
        }
        let swap = |to: &PuPlan, from: &PuPlan, ctx: &Ctx| -> Tables {
            (
                [to.install(ctx), from.remove(ctx)].concat(),
                [to.nat_install(ctx), from.nat_remove(ctx)].concat(),
            )
        };
        if let Err(e) =
            self.apply_per_family(|ctx| swap(new, old, ctx), |ctx| swap(old, new, ctx), fault)
        {
            return Err(self.undo_sets(e, revert_sets()));
        }
        let old_names: Vec<String> = IpFamily::ALL
            .iter()
            .flat_map(|&f| old.acl_sets(f))
            .chain(fresh(&old_proxy, &new_proxy))
            .map(|s| s.name)
            .collect();
        if let Err(e) = self.destroy_sets(&old_names) {
            // The new policy is in force; the old sets are only litter,
            // which the next `run` or `cleanup` removes.
            warn!("the old ACL sets stay after the update: {e:#}");
        }
        Ok(())
    }

    /// delete's kernel part, every piece best effort: per family, the
    /// PU's chains of both versions found in the save and whatever jumps
    /// to them, then the PU's sets that exist.
    fn uninstall(&self, plans: &[PuPlan]) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        let chains: Vec<String> = plans
            .iter()
            .flat_map(|plan| {
                let pair = plan.chains();
                [pair.app, pair.net]
            })
            .collect();
        let comments: BTreeSet<String> = plans.iter().map(|plan| plan.proxy_comment()).collect();
        let proxied = plans.iter().any(|plan| plan.is_proxied());
        for family in IpFamily::ALL {
            let attempt = || -> anyhow::Result<()> {
                let saved = self.nf.save(family, Table::Mangle, false)?;
                // The PU's rules in the global proxy chains first (they
                // name its sets), then its own chains.
                let proxy_chains = [PROXY_CHAINS.app, PROXY_CHAINS.net];
                let mut lines: Vec<String> = comments
                    .iter()
                    .flat_map(|c| save::tagged(&saved, &proxy_chains, c))
                    .collect();
                lines.extend(save::teardown(&saved, |chain| {
                    chains.iter().any(|c| c == chain)
                }));
                if !lines.is_empty() {
                    self.nf.restore(family, &section(Table::Mangle, &lines))?;
                }
                if proxied {
                    let saved = self.nf.save(family, Table::Nat, false)?;
                    let redirect_chains = [REDIRECT_CHAINS.app, REDIRECT_CHAINS.net];
                    let lines: Vec<String> = comments
                        .iter()
                        .flat_map(|c| save::tagged(&saved, &redirect_chains, c))
                        .collect();
                    if !lines.is_empty() {
                        self.nf.restore(family, &section(Table::Nat, &lines))?;
                    }
                }
                Ok(())
            };
            if let Err(e) = attempt() {
                failures.push(format!("removing the {family} chains: {e:#}"));
            }
        }
        let names: Vec<String> = plans
            .iter()
            .flat_map(|plan| IpFamily::ALL.iter().flat_map(|&f| plan.sets(f)))
            .map(|s| s.name)
            .collect();
        if let Err(e) = self.destroy_sets(&names) {
            failures.push(format!("destroying the sets: {e:#}"));
        }
        match failures.is_empty() {
            true => Ok(()),
            false => Err(anyhow!(failures.join("; "))),
        }
    }

    /// After an update from `old` to `new`: cuts the connections the old
    /// policy's ACLs accepted and the new one refuses ([`revoke::revoked`]),
    /// on either side — the PU's outgoing connections by its application
    /// ACLs, the connections peers made to it (to its listening ports, or,
    /// for the host or container PU, where a socket of the namespace
    /// listens: [`revoke::side`]) by its network ACLs.
    ///
    /// An ACL's accept marks the connection (kind `ExternalAccepted`), and
    /// the main chains accept every later packet of a marked connection,
    /// in both directions, so the new chains never see them. Such flows are
    /// found in conntrack by that mark and judged on each side, by the
    /// original direction's destination port and, outgoing, its
    /// destination, incoming, its source ([`Flow::ends`]). Conntrack does
    /// not know the PU: a flow counts as the PU's on a side when one of
    /// the PU's sockets carries it there — found by its cgroup, user or
    /// ports, or as what no other PU has, whatever its kind ([`super::owner`]; an
    /// accepted connection is its listener's). Another PU's marked flow to
    /// the same peer is left alone.
    ///
    /// First the PU's own sockets of those flows are aborted: the
    /// application sees ECONNABORTED, and the RST leaves through the entry
    /// still marked, so the peer sees it too. Forgetting the entry alone
    /// would not do for them: if the packet that came first after the
    /// deletion went the reply way, conntrack would pick the flow up with
    /// its ends swapped, and a chain accepts what it takes for replies of
    /// an ESTABLISHED flow. Then the entries are deleted, which covers
    /// unconnected UDP (no socket names the peer; a server's socket serves
    /// every peer and stays): the next datagram is NEW and meets the new
    /// chain, which refuses it.
    fn cut_revoked(&self, old: &Pu, new: &Pu) -> anyhow::Result<()> {
        let targets = self.targets.as_ref().ok_or_else(not_running)?;
        let networks = FamilyNetworks {
            target_tcp: [&targets.v4.target_tcp[..], &targets.v6.target_tcp].concat(),
            target_udp: [&targets.v4.target_udp[..], &targets.v6.target_udp].concat(),
            excluded: [&targets.v4.excluded[..], &targets.v6.excluded].concat(),
        };
        let marks = self.settings.marks;
        let (value, mask) = (marks.kind(Kind::ExternalAccepted), marks.kind_mask());
        let listeners = self.nf.listeners(old)?;
        let mut revoked = Vec::new();
        for family in IpFamily::ALL {
            let flows = self
                .nf
                .conntrack_flows(family, value, mask)
                .with_context(|| format!("listing the accepted {family} flows"))?;
            for flow in flows {
                for side in [Direction::App, Direction::Net] {
                    let (local, peer) = flow.ends(side);
                    // The original direction says who sent first; a flow a
                    // peer set up is the network side's only where peers
                    // connect to the PU, as the eBPF cut decides per socket.
                    if side == Direction::Net
                        && revoke::side(old, &listeners, flow.protocol, local) != side
                    {
                        continue;
                    }
                    let setup = Setup::between(side, flow.protocol, local, peer);
                    if revoke::revoked(old, new, &networks, side, setup) {
                        revoked.push((side, flow));
                    }
                }
            }
        }
        if revoked.is_empty() {
            return Ok(());
        }
        let sockets = self.pu_sockets(old);
        let revoked = self
            .nf
            .own_flows(&sockets, revoked)
            .context("finding the PU's own flows")?;
        if revoked.is_empty() {
            return Ok(());
        }
        let aborted = self.nf.abort_flow_sockets(&sockets, &revoked);
        let mut forgotten = 0;
        for (_, flow) in &revoked {
            forgotten += usize::from(self.nf.conntrack_delete(flow, value, mask)?);
        }
        info!(
            pu = %new.id,
            flows = revoked.len(),
            forgotten,
            "connections only the old policy allowed are cut"
        );
        let aborted = aborted.context("aborting the PU's sockets of those flows")?;
        tracing::debug!(pu = %new.id, sockets = aborted, "sockets aborted");
        Ok(())
    }

    /// The sockets of `pu` (as the policy in force before an update had
    /// it, run-time ports included) among the other PUs' ([`super::owner`]).
    fn pu_sockets(&self, pu: &Pu) -> PuSockets {
        let cgroup2 = &self.settings.cgroup2;
        let net_cls = |id: &PuId| self.pus.get(id).is_some_and(|i| i.class_id.is_some());
        let own = Owner::of(pu, &RuntimePorts::new(), cgroup2, net_cls(&pu.id));
        let others = self
            .pus
            .values()
            .filter(|i| i.pu.id != pu.id)
            .map(|i| Owner::of(&i.pu, &i.runtime, cgroup2, i.class_id.is_some()));
        PuSockets::new(own, others)
    }

    fn forget_everything(&mut self) {
        self.flow_reader = None;
        self.pus.clear();
        self.sync_prefixes();
        self.names = NameRegistry::new();
        self.targets = None;
    }
}

fn not_running() -> DatapathError {
    anyhow!("the iptables datapath is not running (call run first)").into()
}

fn no_networks() -> FamilyNetworks {
    FamilyNetworks {
        target_tcp: Vec::new(),
        target_udp: Vec::new(),
        excluded: Vec::new(),
    }
}

/// The global sets with what each holds.
fn global_lists(networks: &FamilyNetworks) -> [(GlobalSet, &[IpNet]); 3] {
    [
        (GlobalSet::TargetTcp, &networks.target_tcp),
        (GlobalSet::TargetUdp, &networks.target_udp),
        (GlobalSet::Excluded, &networks.excluded),
    ]
}

/// `ipset restore` text turning the global sets from `from` into `to`.
fn network_changes(from: &PerFamily<FamilyNetworks>, to: &PerFamily<FamilyNetworks>) -> String {
    let mut text = String::new();
    for family in IpFamily::ALL {
        let pairs = global_lists(from.get(family))
            .into_iter()
            .zip(global_lists(to.get(family)));
        for ((set, old), (_, new)) in pairs {
            text += &sets::network_diff(&set.name(family), old, new);
        }
    }
    text
}

impl Datapath for IptablesDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Iptables
    }

    fn set_flow_log(&mut self, sender: crate::flowlog::FlowSender) {
        self.flow_log = Some(sender);
    }

    fn run(&mut self) -> Result<()> {
        self.forget_everything();
        exec::remove_everything(self.nf.as_ref())
            .context("removing what a previous instance left")?;
        self.class_ids.reset_all();
        let install = || -> anyhow::Result<()> {
            let specs: Vec<sets::SetSpec> =
                IpFamily::ALL.into_iter().flat_map(global::sets).collect();
            self.nf
                .ipset_restore(&sets::create(&specs))
                .context("creating the global sets")?;
            for family in IpFamily::ALL {
                self.nf
                    .restore(family, &global::rules(&self.ctx(family)))
                    .with_context(|| format!("installing the global {family} rules"))?;
            }
            Ok(())
        };
        if let Err(e) = install() {
            // Leave nothing half-installed behind.
            if let Err(undo) = exec::remove_everything(self.nf.as_ref()) {
                return Err(e
                    .context(format!("and removing it again failed: {undo:#}"))
                    .into());
            }
            return Err(e.into());
        }
        self.targets = Some(PerFamily {
            v4: no_networks(),
            v6: no_networks(),
        });
        if let Some(sender) = &self.flow_log {
            self.flow_reader = Some(nflog::NflogReader::start(
                self.flow_prefixes.clone(),
                sender.clone(),
            )?);
        }
        Ok(())
    }

    fn set_target_networks(&mut self, networks: &NetworkSettings) -> Result<()> {
        let current = self.targets.as_ref().ok_or_else(not_running)?;
        let wanted = PerFamily {
            v4: networks.for_family(IpFamily::V4),
            v6: networks.for_family(IpFamily::V6),
        };
        let mut forward = network_changes(current, &wanted);
        if forward.is_empty() {
            return Ok(());
        }
        if self.faults.strikes(Operation::SetTargetNetworks) {
            forward += FAULT_SET_LINE;
        }
        let current = self.targets.as_ref().ok_or_else(not_running)?;
        if let Err(e) = self.nf.ipset_restore(&forward) {
            let e = e.context("changing the target and excluded networks");
            // Every line carries -exist: the reverse difference restores
            // the previous content however far the failed one got.
            let undo = self.nf.ipset_restore(&network_changes(&wanted, current));
            return Err(self.undo_sets(e, undo));
        }
        let udp = |nets: &PerFamily<FamilyNetworks>| -> Vec<IpNet> {
            [&nets.v4.target_udp[..], &nets.v6.target_udp].concat()
        };
        let (old_udp, new_udp) = (udp(current), udp(&wanted));
        self.targets = Some(wanted);
        // The sets are in force: a failure to forget the stale entries
        // cannot undo them, so it is logged, not returned.
        match exec::forget_udp_flows(self.nf.as_ref(), &old_udp, &new_udp) {
            Ok(0) => {}
            Ok(n) => info!(flows = n, "UDP flows of removed target networks forgotten"),
            Err(e) => tracing::error!(
                "the new target networks are in force, but forgetting the UDP flows of \
                 removed ones failed: {e:#}"
            ),
        }
        Ok(())
    }

    fn configure(&mut self, version: u8, pu: &Pu) -> Result<()> {
        self.configure_all(version, std::slice::from_ref(pu))
    }

    /// Every PU in one [`Self::install`]: all installed, or none (and no
    /// name kept). Refusals come first, before any change.
    fn configure_all(&mut self, version: u8, pus: &[Pu]) -> Result<()> {
        let mut seen = BTreeSet::new();
        for pu in pus {
            self.check_supported(pu)?;
            if self.pus.contains_key(&pu.id) || !seen.insert(&pu.id) {
                let message = format!("PU {} is already configured (update it instead)", pu.id);
                return Err(anyhow!(message).into());
            }
        }
        if pus.is_empty() {
            return Ok(());
        }
        let mut shorts = Vec::with_capacity(pus.len());
        for pu in pus {
            match self.names.assign(&pu.id) {
                Ok(short) => shorts.push(short),
                Err(e) => {
                    for done in &pus[..shorts.len()] {
                        self.names.release(&done.id);
                    }
                    return Err(anyhow::Error::from(e).into());
                }
            }
        }
        let fault = self.faults.strikes(Operation::Configure);
        let net_cls: Vec<_> = pus
            .iter()
            .filter_map(|pu| match &pu.kind {
                PuKind::LinuxProcess { cgroup } => Some((&pu.id, cgroup)),
                _ => None,
            })
            .collect();
        let result = self.class_ids.assign(&net_cls).and_then(|()| {
            let plans = pus
                .iter()
                .zip(&shorts)
                .map(|(pu, short)| {
                    self.add_prefixes(pu, short);
                    let class_id = self.class_ids.get(&pu.id);
                    Ok(PuPlan::new(pu, short, version)?.with_class_id(class_id))
                })
                .collect::<Result<Vec<_>>>()?;
            self.install(&plans, fault)
        });
        if let Err(e) = result {
            for pu in pus {
                self.names.release(&pu.id);
                self.class_ids.release(&pu.id);
            }
            self.sync_prefixes();
            return Err(e);
        }
        for (pu, short) in pus.iter().zip(shorts) {
            let installed = Installed {
                pu: pu.clone(),
                short,
                version,
                runtime: RuntimePorts::new(),
                class_id: self.class_ids.get(&pu.id),
            };
            self.pus.insert(pu.id.clone(), installed);
        }
        Ok(())
    }

    /// `old` names the PU; what it replaces is what was installed, which
    /// the datapath knows better than the caller.
    fn update(&mut self, version: u8, new: &Pu, old: &Pu) -> Result<()> {
        self.check_supported(new)?;
        if new.id != old.id {
            let message = format!(
                "an update cannot change a PU's id ({} to {})",
                old.id, new.id
            );
            return Err(anyhow!(message).into());
        }
        let installed = self
            .pus
            .get(&new.id)
            .ok_or_else(|| DatapathError::UnknownPu(new.id.clone()))?;
        if installed.version == version {
            let message = format!(
                "PU {} is already installed under version {version}; an update needs the other one",
                new.id
            );
            return Err(anyhow!(message).into());
        }
        // The port sets hold the run-time ports too, before and after: a
        // port the new config drops stays while the PU listens there.
        let runtime = installed.runtime.clone();
        let (old_sets, new_sets) = (
            ports::with_runtime(&installed.pu, &runtime),
            ports::with_runtime(new, &runtime),
        );
        let class_id = installed.class_id;
        let old_plan =
            PuPlan::new(&old_sets, &installed.short, installed.version)?.with_class_id(class_id);
        let new_plan = PuPlan::new(&new_sets, &installed.short, version)?.with_class_id(class_id);
        // A net_cls PU keeps its class id, so its hook stays the same; a
        // new cgroup gets the id before the swap and the old one loses it
        // after.
        let moving = match &new.kind {
            PuKind::LinuxProcess { cgroup } => self.class_ids.start_move(&new.id, cgroup)?,
            _ => None,
        };
        let fault = self.faults.strikes(Operation::Update);
        self.add_prefixes(new, &installed.short);
        if let Err(e) = self.replace(&new_plan, &old_plan, fault) {
            if let Some(to) = moving {
                self.class_ids.undo_move(&new.id, to);
            }
            self.sync_prefixes();
            return Err(e);
        }
        if let Some(to) = moving {
            self.class_ids.finish_move(&new.id, to);
        }
        let short = installed.short.clone();
        self.pus.insert(
            new.id.clone(),
            Installed {
                pu: new.clone(),
                short,
                version,
                runtime,
                class_id,
            },
        );
        self.sync_prefixes();
        // The new policy is in force: cutting what it no longer allows
        // cannot undo it, so a failure there is logged, not returned (the
        // record of what is in force must stay true). Both policies are
        // judged with the run-time ports: they are the PU's listening ports
        // as much as its configured ones.
        if let Err(e) = self.cut_revoked(&old_sets, &new_sets) {
            tracing::error!(
                pu = %new.id,
                "the new policy is in force, but cutting the connections only the old one \
                 allowed failed: {e:#}"
            );
        }
        Ok(())
    }

    fn delete(&mut self, version: u8, pu: &Pu) -> Result<()> {
        let Some(installed) = self.pus.get(&pu.id) else {
            // Nothing of an unknown PU exists: `run` removed every
            // leftover, and a failed configure undid itself.
            return Ok(());
        };
        let mut plans = vec![installed.plan()?];
        if version != installed.version {
            // Also whatever the caller believes is installed, if it can
            // name it: a failed undo may have left that version behind.
            let class_id = installed.class_id;
            plans.extend(
                PuPlan::new(pu, &installed.short, version)
                    .ok()
                    .map(|plan| plan.with_class_id(class_id)),
            );
        }
        self.uninstall(&plans)
            .with_context(|| format!("deleting PU {}", pu.id))?;
        self.pus.remove(&pu.id);
        self.names.release(&pu.id);
        // Unhooked first: its traffic never meets a hook without its id.
        self.class_ids.release(&pu.id);
        self.sync_prefixes();
        Ok(())
    }

    fn cleanup(&mut self) -> Result<()> {
        self.forget_everything();
        let removed = exec::remove_everything(self.nf.as_ref());
        // Also when the rules could not all be removed: a class id left
        // behind outlives the agent.
        self.class_ids.reset_all();
        removed?;
        Ok(())
    }

    /// One `ipset restore` for both families' sets; if it fails part-way,
    /// the reverse change (every line `-exist`) undoes what it did.
    fn add_port(&mut self, id: &PuId, port: ListenPort) -> Result<()> {
        let installed = self
            .pus
            .get(id)
            .ok_or_else(|| DatapathError::UnknownPu(id.clone()))?;
        if installed.runtime.contains(&port) {
            return Ok(());
        }
        let others = self.pus.values().map(|i| (&i.pu, &i.runtime));
        ports::check_free(id, port, others)?;
        if !ports::configured(&installed.pu, port) {
            let forward = installed.port_change(port, true)?;
            if let Err(e) = self.nf.ipset_restore(&forward) {
                let e = e.context(format!("adding port {port} to PU {id}'s port set"));
                let undo = installed
                    .port_change(port, false)
                    .map_err(anyhow::Error::from)
                    .and_then(|back| self.nf.ipset_restore(&back));
                return Err(self.undo_sets(e, undo));
            }
        }
        let installed = self.pus.get_mut(id).expect("checked above");
        installed.runtime.insert(port);
        Ok(())
    }

    fn remove_port(&mut self, id: &PuId, port: ListenPort) -> Result<()> {
        let Some(installed) = self.pus.get(id) else {
            return Ok(());
        };
        if !installed.runtime.contains(&port) {
            return Ok(());
        }
        if !ports::configured(&installed.pu, port) {
            // On failure the port stays recorded: a retry (every line
            // `-exist`) finishes what this one began.
            let text = installed.port_change(port, false)?;
            self.nf
                .ipset_restore(&text)
                .with_context(|| format!("removing port {port} from PU {id}'s port set"))?;
        }
        let installed = self.pus.get_mut(id).expect("checked above");
        installed.runtime.remove(&port);
        Ok(())
    }

    fn runtime_ports(&self, id: &PuId) -> RuntimePorts {
        self.pus
            .get(id)
            .map(|i| i.runtime.clone())
            .unwrap_or_default()
    }

    fn counters(&self) -> Result<Counters> {
        let mut counters = Counters::default();
        for family in IpFamily::ALL {
            let saved = self.nf.save(family, Table::Mangle, true)?;
            // The total is the PUs' sum, as on eBPF: the main chains'
            // only counted rules are the handshake's global traps, which
            // continue a set-up a PU's chain counted (a SYN-ACK) or
            // belong to no PU.
            let by_chain = save::counts_by_chain(&saved);
            for (id, installed) in &self.pus {
                let chains = installed.plan()?.chains();
                let counts = save::count(&by_chain, &[&chains.app, &chains.net]);
                counters.total += counts;
                *counters.per_pu.entry(id.to_string()).or_default() += counts;
            }
        }
        Ok(counters)
    }
}

#[cfg(test)]
mod tests {
    //! The operations' order and their undo, against a fake that records
    //! every tool call, keeps track of which sets exist, and fails the
    //! calls a test picks (an `ipset restore` fails half-way, as the tool
    //! stops at its first bad line).

    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use enforcer_common::marks::MarkLayout;

    use super::*;
    use crate::datapath::conntrack::Flow;
    use crate::policy::{
        Acl, Action, CgroupPath, Mode, ObserveMode, PolicyId, PortRange, Protocol, QueueSettings,
        UserSpec,
    };

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Restore(IpFamily, String),
        Save(IpFamily),
        Ipset(String),
        ConntrackList(IpFamily),
        ConntrackDelete(Flow),
        AbortSockets(PuSockets, Vec<exec::SidedFlow>),
    }

    type Failure = fn(&Call) -> bool;

    #[derive(Default)]
    struct State {
        calls: Vec<Call>,
        sets: BTreeSet<String>,
        fail: Option<Failure>,
        /// What conntrack lists (its mark filter is not modelled).
        flows: Vec<Flow>,
        /// Where sockets listen, for a namespace-wide PU.
        listeners: revoke::Listeners,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<State>>);

    impl Fake {
        fn call(&self, call: Call) -> anyhow::Result<()> {
            let mut state = self.0.lock().unwrap();
            let mut failing = state.fail.is_some_and(|fail| fail(&call));
            if let Call::Ipset(text) = &call {
                let lines: Vec<&str> = text.lines().collect();
                let applied = if failing {
                    &lines[..lines.len() / 2]
                } else {
                    &lines[..]
                };
                for line in applied {
                    match line.split(' ').collect::<Vec<_>>()[..] {
                        ["create", name, ..] => drop(state.sets.insert(name.to_owned())),
                        // As ipset: destroying a missing set fails there.
                        ["destroy", name] if !state.sets.remove(name) => {
                            failing = true;
                            break;
                        }
                        _ => {}
                    }
                }
            }
            state.calls.push(call);
            if failing {
                Err(anyhow!("injected failure"))
            } else {
                Ok(())
            }
        }

        fn fail_when(&self, fail: Failure) {
            self.0.lock().unwrap().fail = Some(fail);
        }

        /// The calls so far, forgetting them.
        fn take(&self) -> Vec<Call> {
            std::mem::take(&mut self.0.lock().unwrap().calls)
        }

        fn sets(&self) -> BTreeSet<String> {
            self.0.lock().unwrap().sets.clone()
        }
    }

    impl Netfilter for Fake {
        fn restore(&self, family: IpFamily, text: &str) -> anyhow::Result<()> {
            self.call(Call::Restore(family, text.to_owned()))
        }
        fn save(&self, family: IpFamily, _: Table, _: bool) -> anyhow::Result<String> {
            self.call(Call::Save(family))
                .map(|()| "*mangle\nCOMMIT\n".to_owned())
        }
        fn save_all(&self, family: IpFamily) -> anyhow::Result<String> {
            self.call(Call::Save(family))
                .map(|()| "*mangle\nCOMMIT\n*nat\nCOMMIT\n".to_owned())
        }
        fn ipset_restore(&self, text: &str) -> anyhow::Result<()> {
            self.call(Call::Ipset(text.to_owned()))
        }
        fn ipset_names(&self) -> anyhow::Result<Vec<String>> {
            Ok(self.sets().into_iter().collect())
        }
        fn conntrack_flows(&self, family: IpFamily, _: u32, _: u32) -> anyhow::Result<Vec<Flow>> {
            self.call(Call::ConntrackList(family))?;
            let flows = self.0.lock().unwrap().flows.clone();
            Ok(flows
                .into_iter()
                .filter(|f| family.select(&[f.dst]).count() == 1)
                .collect())
        }
        fn conntrack_delete(&self, flow: &Flow, _: u32, _: u32) -> anyhow::Result<bool> {
            self.call(Call::ConntrackDelete(*flow)).map(|()| true)
        }
        fn abort_flow_sockets(
            &self,
            pu: &PuSockets,
            flows: &[exec::SidedFlow],
        ) -> anyhow::Result<usize> {
            self.call(Call::AbortSockets(pu.clone(), flows.to_vec()))
                .map(|()| flows.len())
        }

        fn own_flows(
            &self,
            _pu: &PuSockets,
            flows: Vec<exec::SidedFlow>,
        ) -> anyhow::Result<Vec<exec::SidedFlow>> {
            Ok(flows)
        }
        fn listeners(&self, pu: &Pu) -> anyhow::Result<revoke::Listeners> {
            Ok(match revoke::namespace_wide(pu) {
                true => self.0.lock().unwrap().listeners.clone(),
                false => revoke::Listeners::default(),
            })
        }
    }

    fn settings(mode: Mode) -> DatapathSettings {
        DatapathSettings {
            mode,
            queues: QueueSettings::default(),
            marks: MarkLayout::default(),
            cgroup2: PathBuf::from("/sys/fs/cgroup"),
            host_scope: PathBuf::from("/sys/fs/cgroup"),
            net_cls_mount: None,
            // Never written: no PU here has a class id.
            net_cls_record: PathBuf::from("/nonexistent/enforcer-test.net_cls"),
            pin_dir: PathBuf::from("/sys/fs/bpf/enforcer-test"),
            iptables_backend: backend::Backend::Nft,
        }
    }

    /// A datapath after `run`, and its fake with the calls of `run` taken.
    fn running() -> (IptablesDatapath, Fake) {
        let fake = Fake::default();
        let mut dp =
            IptablesDatapath::with_netfilter(settings(Mode::LocalServer), Box::new(fake.clone()));
        dp.run().unwrap();
        fake.take();
        (dp, fake)
    }

    fn web(tcp_port: u16, acl_net: &str) -> Pu {
        Pu {
            id: PuId::new("web").unwrap(),
            kind: PuKind::LinuxProcess {
                cgroup: CgroupPath::new("enforcer/web").unwrap(),
            },
            labels: Default::default(),
            tcp_ports: vec![PortRange::new(tcp_port, tcp_port).unwrap()],
            udp_ports: vec![],
            application_acls: vec![Acl {
                networks: vec![acl_net.parse().unwrap()],
                protocols: vec![Protocol::Tcp],
                ports: vec![],
                action: Action::Accept,
                log: false,
                observe: ObserveMode::None,
                policy_id: PolicyId::new("p").unwrap(),
            }],
            network_acls: vec![],
            proxy_port: None,
            dns_proxy_port: None,
            dependent_services: vec![],
            exposed_services: vec![],
        }
    }

    fn global_sets() -> BTreeSet<String> {
        IpFamily::ALL
            .into_iter()
            .flat_map(|f| GlobalSet::ALL.map(|s| s.name(f)))
            .collect()
    }

    fn is_v6_restore(call: &Call) -> bool {
        matches!(call, Call::Restore(IpFamily::V6, _))
    }

    #[test]
    fn run_removes_leftovers_then_installs_sets_and_both_families() {
        let fake = Fake::default();
        let mut dp =
            IptablesDatapath::with_netfilter(settings(Mode::LocalServer), Box::new(fake.clone()));
        dp.run().unwrap();
        let calls = fake.take();
        // Leftovers: one save of every table of each family (nothing found).
        assert_eq!(
            calls[..2],
            [Call::Save(IpFamily::V4), Call::Save(IpFamily::V6)]
        );
        assert!(
            matches!(&calls[2], Call::Ipset(text) if text.starts_with("create TRI-v4-TargetTCP"))
        );
        assert!(
            matches!(&calls[3], Call::Restore(IpFamily::V4, text) if text.contains("-j TRI-App"))
        );
        assert!(
            matches!(&calls[4], Call::Restore(IpFamily::V6, text) if text.contains("TRI-v6-Excluded"))
        );
        assert_eq!(calls.len(), 5);
        assert_eq!(fake.sets(), global_sets());
    }

    #[test]
    fn refusals_come_before_any_change() {
        let (mut dp, fake) = running();
        let container = Pu {
            kind: PuKind::Container,
            ..web(80, "10.0.0.0/8")
        };
        assert!(matches!(
            dp.configure(0, &container),
            Err(DatapathError::Unsupported(..))
        ));
        let mut sidecar =
            IptablesDatapath::with_netfilter(settings(Mode::Sidecar), Box::new(fake.clone()));
        sidecar.run().unwrap();
        fake.take();
        let err = sidecar.configure(0, &web(80, "10.0.0.0/8")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a linux-process PU (web) in mode sidecar is not supported by the iptables datapath"
        );
        let stopped =
            IptablesDatapath::with_netfilter(settings(Mode::LocalServer), Box::new(fake.clone()));
        assert!(stopped.check_supported(&web(80, "10.0.0.0/8")).is_err());
        assert_eq!(fake.take(), []);
    }

    #[test]
    fn configure_stops_at_a_set_failure_and_removes_the_sets_it_made() {
        let (mut dp, fake) = running();
        fake.fail_when(
            |call| matches!(call, Call::Ipset(text) if text.starts_with("create TRI-v4-ProcPort")),
        );
        assert!(dp.configure(0, &web(80, "10.0.0.0/8")).is_err());
        let calls = fake.take();
        assert!(
            calls.iter().all(|c| !matches!(c, Call::Restore(..))),
            "{calls:#?}"
        );
        assert!(matches!(calls.last(), Some(Call::Ipset(text)) if text.starts_with("destroy ")));
        assert_eq!(fake.sets(), global_sets());
    }

    /// A net_cls PU: its class id is written to its cgroup tree, and its
    /// outgoing hook matches the id; an update keeps the id (a new cgroup
    /// gets it, the old one is reset); delete resets it and the record
    /// goes.
    #[test]
    fn a_net_cls_pu_is_hooked_by_the_class_id_of_its_cgroup() {
        use crate::datapath::netcls::test_support::Hierarchy;
        let h = Hierarchy::new(&["enforcer/web", "enforcer/web/worker", "enforcer/api"]);
        let fake = Fake::default();
        let settings = DatapathSettings {
            net_cls_mount: Some(h.0.clone()),
            net_cls_record: h.0.join("record"),
            ..settings(Mode::LocalServer)
        };
        let mut dp = IptablesDatapath::with_netfilter(settings, Box::new(fake.clone()));
        dp.run().unwrap();
        fake.take();
        let old = web(80, "10.0.0.0/8");
        dp.configure(0, &old).unwrap();
        let id = ClassId::nth(0).unwrap().value();
        assert_eq!(
            [h.classid("enforcer/web"), h.classid("enforcer/web/worker")],
            [id, id]
        );
        assert!(h.0.join("record").exists());
        let hook = "-A TRI-Pid-App -m cgroup --cgroup 286326884 -m comment --comment \"PU web\"";
        let hooked = |calls: &[Call], family| {
            calls
                .iter()
                .any(|c| matches!(c, Call::Restore(f, text) if *f == family && text.contains(hook)))
        };
        let calls = fake.take();
        assert!(
            IpFamily::ALL.into_iter().all(|f| hooked(&calls, f)),
            "{calls:#?}"
        );
        assert!(calls.iter().all(|c| !format!("{c:?}").contains("--path")));

        let moved = Pu {
            kind: PuKind::LinuxProcess {
                cgroup: CgroupPath::new("enforcer/api").unwrap(),
            },
            ..web(81, "10.0.0.0/8")
        };
        dp.update(1, &moved, &old).unwrap();
        assert!(hooked(&fake.take(), IpFamily::V4));
        assert_eq!(
            [h.classid("enforcer/web"), h.classid("enforcer/api")],
            [0, id]
        );

        dp.delete(1, &moved).unwrap();
        assert_eq!(h.classid("enforcer/api"), 0);
        assert!(!h.0.join("record").exists());
    }

    /// A configure that fails in the kernel leaves no class id behind.
    #[test]
    fn a_failed_net_cls_configure_resets_the_class_id() {
        use crate::datapath::netcls::test_support::Hierarchy;
        let h = Hierarchy::new(&["enforcer/web"]);
        let fake = Fake::default();
        let settings = DatapathSettings {
            net_cls_mount: Some(h.0.clone()),
            net_cls_record: h.0.join("record"),
            ..settings(Mode::LocalServer)
        };
        let mut dp = IptablesDatapath::with_netfilter(settings, Box::new(fake.clone()));
        dp.run().unwrap();
        fake.fail_when(is_v6_restore);
        assert!(dp.configure(0, &web(80, "10.0.0.0/8")).is_err());
        assert_eq!(h.classid("enforcer/web"), 0);
        assert_eq!(dp.class_ids.get(&PuId::new("web").unwrap()), None);
        assert!(!h.0.join("record").exists());
    }

    /// `web` under another id and cgroup.
    fn named(id: &str) -> Pu {
        Pu {
            id: PuId::new(id).unwrap(),
            kind: PuKind::LinuxProcess {
                cgroup: CgroupPath::new(format!("enforcer/{id}")).unwrap(),
            },
            ..web(80, "10.0.0.0/8")
        }
    }

    #[test]
    fn configure_all_is_one_set_batch_and_one_restore_per_family() {
        let (mut dp, fake) = running();
        let pus: Vec<Pu> = (0..50).map(|i| named(&format!("pu{i}"))).collect();
        dp.configure_all(0, &pus).unwrap();
        let calls = fake.take();
        assert_eq!(calls.len(), 3, "{calls:#?}");
        let Call::Ipset(sets) = &calls[0] else {
            panic!("{calls:#?}")
        };
        // Two port sets per family and the IPv4 ACL set.
        assert_eq!(sets.matches("create ").count(), 50 * 5);
        for (call, family) in calls[1..].iter().zip(IpFamily::ALL) {
            let Call::Restore(f, text) = call else {
                panic!("{call:?}")
            };
            assert_eq!(*f, family);
            assert_eq!(text.matches("-m cgroup --path").count(), 50);
            assert_eq!(text.matches("COMMIT").count(), 1);
        }
        assert_eq!(dp.pus.len(), 50);
        // Each is a PU like any other: updated and deleted on its own.
        dp.update(1, &pus[7], &pus[7]).unwrap();
        dp.delete(0, &pus[3]).unwrap();
        assert_eq!(dp.pus.len(), 49);
        assert!(dp.configure_all(0, &[]).is_ok());
    }

    #[test]
    fn configure_all_is_all_or_nothing() {
        let (mut dp, fake) = running();
        let pus: Vec<Pu> = (0..3).map(|i| named(&format!("pu{i}"))).collect();
        fake.fail_when(is_v6_restore);
        assert!(dp.configure_all(0, &pus).is_err());
        let calls = fake.take();
        let Call::Restore(IpFamily::V4, undo) = &calls[3] else {
            panic!("{calls:#?}")
        };
        assert_eq!(undo.matches("-X TRI-App-").count(), 3, "{undo}");
        assert_eq!(fake.sets(), global_sets());
        assert!(dp.pus.is_empty());
        assert!(pus.iter().all(|pu| dp.names.get(&pu.id).is_none()));
        // Refusals come before any change: one unsupported PU, or one
        // already there, and nothing is done for the others either.
        fake.0.lock().unwrap().fail = None;
        dp.configure(0, &pus[1]).unwrap();
        fake.take();
        assert!(dp.configure_all(0, &pus).is_err());
        let container = Pu {
            kind: PuKind::Container,
            ..named("h")
        };
        assert!(dp.configure_all(0, &[pus[0].clone(), container]).is_err());
        let twice = [pus[0].clone(), pus[0].clone()];
        assert!(dp.configure_all(0, &twice).is_err());
        assert_eq!(fake.take(), []);
        // The injected fault strikes the batch's last restore, as any
        // configure's.
        fake.fail_when(
            |call| matches!(call, Call::Restore(_, t) if t.contains("enforcer-test-fault")),
        );
        dp.faults = Faults::parse("configure:1").unwrap();
        let rest = [pus[0].clone(), pus[2].clone()];
        assert!(dp.configure_all(0, &rest).is_err());
        assert_eq!(dp.pus.len(), 1);
        dp.configure_all(0, &rest).unwrap();
        assert_eq!(dp.pus.len(), 3);
    }

    #[test]
    fn a_failure_in_the_last_batch_undoes_the_batches_before() {
        let (mut dp, fake) = running();
        let n = 2 * BATCH_PUS + 1;
        let pus: Vec<Pu> = (0..n).map(|i| named(&format!("pu{i}"))).collect();
        fake.fail_when(|call| matches!(call, Call::Restore(IpFamily::V6, t) if t.contains("--path enforcer/pu500 ")));
        assert!(dp.configure_all(0, &pus).is_err());
        let calls = fake.take();
        // 3 batches of sets and rules, the last failing at IPv6; its IPv4
        // half undone; then the first two batches' chains, per family.
        let restores: Vec<(IpFamily, usize)> = calls
            .iter()
            .filter_map(|c| match c {
                Call::Restore(f, t) => Some((*f, t.matches("-X TRI-App-").count())),
                _ => None,
            })
            .collect();
        use IpFamily::{V4, V6};
        assert_eq!(
            restores,
            [
                (V4, 0),
                (V6, 0),
                (V4, 0),
                (V6, 0),
                (V4, 0),
                (V6, 0),
                (V4, 1),
                (V4, 500),
                (V6, 500)
            ]
        );
        assert_eq!(fake.sets(), global_sets());
        assert!(dp.pus.is_empty() && dp.names.get(&pus[0].id).is_none());
        fake.0.lock().unwrap().fail = None;
        dp.configure_all(0, &pus).unwrap();
        assert_eq!(dp.pus.len(), n);
    }

    #[test]
    fn counters_read_one_save_per_family_whatever_the_number_of_pus() {
        let (mut dp, fake) = running();
        let pus: Vec<Pu> = (0..20).map(|i| named(&format!("pu{i}"))).collect();
        dp.configure_all(0, &pus).unwrap();
        fake.take();
        let counters = dp.counters().unwrap();
        assert_eq!(counters.per_pu.len(), 20);
        assert_eq!(
            fake.take(),
            [Call::Save(IpFamily::V4), Call::Save(IpFamily::V6)]
        );
    }

    #[test]
    fn configure_undoes_ipv4_when_ipv6_fails() {
        let (mut dp, fake) = running();
        fake.fail_when(is_v6_restore);
        let pu = web(80, "10.0.0.0/8");
        let err = dp.configure(0, &pu).unwrap_err();
        assert_eq!(format!("{err}"), "applying the IPv6 rules");
        let calls = fake.take();
        let short = NameRegistry::new().assign(&pu.id).unwrap();
        let plan = PuPlan::new(&pu, &short, 0).unwrap();
        let ctx = dp.ctx(IpFamily::V4);
        assert_eq!(
            calls[1],
            Call::Restore(IpFamily::V4, section(Table::Mangle, &plan.install(&ctx)))
        );
        assert_eq!(
            calls[3],
            Call::Restore(IpFamily::V4, section(Table::Mangle, &plan.remove(&ctx)))
        );
        assert_eq!(fake.sets(), global_sets());
        // Nothing was recorded: configuring again works, under the same name.
        fake.0.lock().unwrap().fail = None;
        dp.configure(0, &pu).unwrap();
        assert_eq!(dp.pus[&pu.id].short, short);
    }

    #[test]
    fn update_replaces_in_one_commit_per_family_then_drops_old_sets() {
        let (mut dp, fake) = running();
        let (old, new) = (web(80, "10.0.0.0/8"), web(443, "192.168.0.0/16"));
        dp.configure(0, &old).unwrap();
        let before = fake.sets();
        fake.take();
        dp.update(1, &new, &old).unwrap();
        let calls = fake.take();
        let Call::Ipset(forward) = &calls[0] else {
            panic!("{calls:#?}")
        };
        assert!(
            forward.contains("create TRI-v4-Acl-webbBzx-1a0 hash:net family inet -exist\n"),
            "{forward}"
        );
        assert!(
            forward.ends_with(
                "add TRI-v4-ProcPort-webbBzx 443 -exist\n\
             del TRI-v4-ProcPort-webbBzx 80 -exist\n\
             add TRI-v6-ProcPort-webbBzx 443 -exist\n\
             del TRI-v6-ProcPort-webbBzx 80 -exist\n"
            ),
            "{forward}"
        );
        for (call, family) in calls[1..3].iter().zip(IpFamily::ALL) {
            let Call::Restore(f, text) = call else {
                panic!("{call:?}")
            };
            assert_eq!(*f, family);
            assert!(
                text.contains(":TRI-App-webbBzx-1 ") && text.contains("-X TRI-App-webbBzx-0\n")
            );
        }
        assert!(
            matches!(&calls[3], Call::Ipset(text) if text == "destroy TRI-v4-Acl-webbBzx-0a0\n")
        );
        let after = fake.sets();
        assert!(
            after.contains("TRI-v4-Acl-webbBzx-1a0") && !after.contains("TRI-v4-Acl-webbBzx-0a0")
        );
        assert_eq!(after.len(), before.len());
        assert_eq!(dp.pus[&new.id].version, 1);
    }

    /// A proxied PU: configure creates its proxy sets and writes its nat
    /// rules in the same restore as its mangle chains; an update changes
    /// the dependent services in place (no gap), and dropping the proxy
    /// destroys the sets after the swap; delete finds nothing left.
    #[test]
    fn proxy_sets_and_nat_rules_follow_the_pu() {
        use crate::policy::DependentService;
        let (mut dp, fake) = running();
        let service = |net: &str| DependentService {
            network: net.parse().unwrap(),
            ports: vec![PortRange::new(5432, 5432).unwrap()],
        };
        let proxied = |net: &str| Pu {
            proxy_port: std::num::NonZeroU16::new(15001),
            dependent_services: vec![service(net)],
            ..web(80, "10.0.0.0/8")
        };
        let (dst, srv) = ("TRI-v4-Proxy-webbBzx-dst", "TRI-v4-Proxy-webbBzx-srv");
        let old = proxied("10.50.0.0/24");
        dp.configure(0, &old).unwrap();
        let calls = fake.take();
        let Call::Ipset(created) = &calls[0] else {
            panic!("{calls:#?}")
        };
        assert!(created.contains(&format!("create {dst} hash:net,port family inet -exist\n")));
        assert!(created.contains(&format!("add {dst} 10.50.0.0/24,tcp:5432 -exist\n")));
        assert!(created.contains(&format!("create {srv} bitmap:port range 0-65535 -exist\n")));
        let Call::Restore(IpFamily::V4, text) = &calls[1] else {
            panic!("{calls:#?}")
        };
        let nat = text.split("*nat\n").nth(1).expect("a nat section");
        assert!(nat.contains(
            "-A TRI-Redir-App -p tcp -m set --match-set TRI-v4-Proxy-webbBzx-dst dst,dst"
        ));

        let new = proxied("10.60.0.0/24");
        dp.update(1, &new, &old).unwrap();
        let calls = fake.take();
        let Call::Ipset(forward) = &calls[0] else {
            panic!("{calls:#?}")
        };
        assert!(
            forward.contains(&format!(
                "add {dst} 10.60.0.0/24,tcp:5432 -exist\ndel {dst} 10.50.0.0/24,tcp:5432 -exist\n"
            )),
            "{forward}"
        );
        assert!(
            !forward.contains(&format!("flush {dst}")),
            "no gap: {forward}"
        );
        assert!(fake.sets().contains(dst));

        let plain = web(80, "10.0.0.0/8");
        dp.update(0, &plain, &new).unwrap();
        assert!(!fake.sets().contains(dst) && !fake.sets().contains(srv));
        dp.update(1, &new, &plain).unwrap();
        assert!(fake.sets().contains(dst));
        dp.delete(1, &new).unwrap();
        assert_eq!(fake.sets(), global_sets());
    }

    #[test]
    fn runtime_ports_go_in_and_out_of_the_port_sets_and_outlive_updates() {
        let (mut dp, fake) = running();
        let (old, mut other) = (web(80, "10.0.0.0/8"), web(5432, "10.0.0.0/8"));
        other.id = PuId::new("db").unwrap();
        dp.configure(0, &old).unwrap();
        dp.configure(0, &other).unwrap();
        fake.take();
        let port = |p| ListenPort::tcp(std::num::NonZeroU16::new(p).unwrap());
        let ipset = |text: &str| vec![Call::Ipset(text.to_owned())];

        dp.add_port(&old.id, port(8081)).unwrap();
        assert_eq!(
            fake.take(),
            ipset(
                "add TRI-v4-ProcPort-webbBzx 8081 -exist\n\
                 add TRI-v6-ProcPort-webbBzx 8081 -exist\n"
            )
        );
        // Idempotent; a configured port is recorded with no kernel change.
        dp.add_port(&old.id, port(8081)).unwrap();
        dp.add_port(&old.id, port(80)).unwrap();
        assert_eq!(fake.take(), []);
        // Another PU's port, by config or at run time, is refused.
        let err = dp.add_port(&old.id, port(5432)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "port 5432/tcp of PU web is PU db's already"
        );
        assert!(dp.add_port(&other.id, port(8081)).is_err());
        assert!(matches!(
            dp.add_port(&PuId::new("nobody").unwrap(), port(1)),
            Err(DatapathError::UnknownPu(_))
        ));
        assert_eq!(fake.take(), []);

        // An update that drops 80 from the config keeps it (listened on),
        // and the run-time 8081 stays.
        let new = web(443, "10.0.0.0/8");
        dp.update(1, &new, &old).unwrap();
        let calls = fake.take();
        let Call::Ipset(forward) = &calls[0] else {
            panic!("{calls:#?}")
        };
        assert!(
            forward.ends_with(
                "-exist\nadd TRI-v4-ProcPort-webbBzx 443 -exist\n\
                 add TRI-v6-ProcPort-webbBzx 443 -exist\n"
            ),
            "only 443 is added, nothing deleted: {forward}"
        );
        assert_eq!(dp.runtime_ports(&new.id), [port(80), port(8081)].into());

        // Removing: 80 goes now that the config no longer lists it.
        dp.remove_port(&new.id, port(80)).unwrap();
        dp.remove_port(&new.id, port(80)).unwrap();
        assert_eq!(
            fake.take(),
            ipset(
                "del TRI-v4-ProcPort-webbBzx 80 -exist\n\
                 del TRI-v6-ProcPort-webbBzx 80 -exist\n"
            )
        );
        // A failed add leaves nothing recorded, and undoes itself.
        fake.fail_when(|call| matches!(call, Call::Ipset(t) if t.starts_with("add")));
        assert!(dp.add_port(&new.id, port(9090)).is_err());
        assert!(!dp.runtime_ports(&new.id).contains(&port(9090)));
        let calls = fake.take();
        assert!(
            matches!(&calls[1], Call::Ipset(t) if t.starts_with("del TRI-v4-ProcPort-webbBzx 9090"))
        );
    }

    #[test]
    fn runtime_ports_of_a_uid_pu_go_into_its_uid_sets_and_a_host_pu_has_none() {
        let (mut dp, fake) = running();
        let mut user = web(80, "10.0.0.0/8");
        user.kind = PuKind::Uid {
            user: crate::policy::UserSpec::Id(4_042_424),
        };
        dp.configure(0, &user).unwrap();
        fake.take();
        let port = |p| std::num::NonZeroU16::new(p).unwrap();
        dp.add_port(&user.id, ListenPort::tcp(port(8081))).unwrap();
        dp.add_port(&user.id, ListenPort::udp(port(5353))).unwrap();
        dp.remove_port(&user.id, ListenPort::tcp(port(8081)))
            .unwrap();
        let ipset = |text: &str| Call::Ipset(text.to_owned());
        assert_eq!(
            fake.take(),
            [
                ipset(
                    "add TRI-v4-UID-Port-webbBzx 8081 -exist\n\
                     add TRI-v6-UID-Port-webbBzx 8081 -exist\n"
                ),
                ipset(
                    "add TRI-v4-UID-UDP-webbBzx 5353 -exist\n\
                     add TRI-v6-UID-UDP-webbBzx 5353 -exist\n"
                ),
                ipset(
                    "del TRI-v4-UID-Port-webbBzx 8081 -exist\n\
                     del TRI-v6-UID-Port-webbBzx 8081 -exist\n"
                ),
            ]
        );

        let mut host = web(80, "10.0.0.0/8");
        (host.id, host.kind, host.tcp_ports) = (PuId::new("host").unwrap(), PuKind::Host, vec![]);
        dp.configure(0, &host).unwrap();
        fake.take();
        let err = dp
            .add_port(&host.id, ListenPort::tcp(port(8082)))
            .unwrap_err();
        assert!(
            matches!(err, DatapathError::Unsupported(..)),
            "refused, not a panic: {err}"
        );
        assert!(dp.runtime_ports(&host.id).is_empty());
        assert_eq!(fake.take(), []);
    }

    #[test]
    fn update_failure_restores_the_old_policy_and_ports() {
        let (mut dp, fake) = running();
        let (old, new) = (web(80, "10.0.0.0/8"), web(443, "192.168.0.0/16"));
        dp.configure(0, &old).unwrap();
        let before = fake.sets();
        fake.take();
        fake.fail_when(is_v6_restore);
        assert!(dp.update(1, &new, &old).is_err());
        let calls = fake.take();
        let Call::Restore(IpFamily::V4, undo) = &calls[3] else {
            panic!("{calls:#?}")
        };
        assert!(
            undo.contains(":TRI-App-webbBzx-0 ") && undo.contains("-X TRI-App-webbBzx-1\n"),
            "{undo}"
        );
        let Call::Ipset(ports_back) = &calls[4] else {
            panic!("{calls:#?}")
        };
        assert!(ports_back.starts_with(
            "add TRI-v4-ProcPort-webbBzx 80 -exist\ndel TRI-v4-ProcPort-webbBzx 443 -exist\n"
        ));
        assert_eq!(fake.sets(), before);
        assert_eq!(dp.pus[&old.id].version, 0);
        assert_eq!(dp.pus[&old.id].pu, old);
    }

    #[test]
    fn target_networks_change_only_what_differs_and_undo_a_failure() {
        let (mut dp, fake) = running();
        let nets = |tcp: &[&str]| NetworkSettings {
            target_tcp: tcp.iter().map(|n| n.parse().unwrap()).collect(),
            target_udp: vec!["10.0.0.0/8".parse().unwrap()],
            excluded: vec![],
        };
        dp.set_target_networks(&nets(&[])).unwrap();
        dp.set_target_networks(&nets(&["10.0.0.0/8"])).unwrap();
        let calls = fake.take();
        assert_eq!(
            calls[1],
            Call::Ipset(
                "add TRI-v4-TargetTCP 10.0.0.0/8 -exist\n\
                 del TRI-v4-TargetTCP 0.0.0.0/1 -exist\n\
                 del TRI-v4-TargetTCP 128.0.0.0/1 -exist\n\
                 del TRI-v6-TargetTCP ::/1 -exist\n\
                 del TRI-v6-TargetTCP 8000::/1 -exist\n"
                    .into()
            )
        );
        dp.set_target_networks(&nets(&["10.0.0.0/8"])).unwrap();
        assert_eq!(fake.take(), [], "no change, no call");
        fake.fail_when(|call| matches!(call, Call::Ipset(text) if text.contains("172.16.0.0/12")));
        assert!(dp.set_target_networks(&nets(&["172.16.0.0/12"])).is_err());
        assert_eq!(
            fake.take()[1],
            Call::Ipset("add TRI-v4-TargetTCP 10.0.0.0/8 -exist\ndel TRI-v4-TargetTCP 172.16.0.0/12 -exist\n".into())
        );
        assert_eq!(
            dp.targets.as_ref().unwrap().v4.target_tcp,
            nets(&["10.0.0.0/8"]).target_tcp
        );
    }

    #[test]
    fn removing_a_udp_target_forgets_its_udp_flows_only() {
        let (mut dp, fake) = running();
        let nets = |udp: &[&str]| NetworkSettings {
            target_tcp: vec!["10.5.0.0/16".parse().unwrap()],
            target_udp: udp.iter().map(|n| n.parse().unwrap()).collect(),
            excluded: vec![],
        };
        dp.set_target_networks(&nets(&["10.5.0.0/16", "10.6.0.0/16"]))
            .unwrap();
        let udp = |dst: &str| Flow {
            protocol: revoke::UDP,
            ..flow(dst, 53)
        };
        let (to_removed, to_kept) = (udp("10.5.0.2"), udp("10.6.0.2"));
        fake.0.lock().unwrap().flows = vec![to_removed, to_kept, flow("10.5.0.2", 53)];
        fake.take();
        dp.set_target_networks(&nets(&["10.6.0.0/16"])).unwrap();
        let deleted: Vec<Call> = fake
            .take()
            .into_iter()
            .filter(|c| matches!(c, Call::ConntrackDelete(_)))
            .collect();
        assert_eq!(deleted, [Call::ConntrackDelete(to_removed)]);
        // Adding a target forgets nothing, and lists nothing.
        dp.set_target_networks(&nets(&["10.6.0.0/16", "10.7.0.0/16"]))
            .unwrap();
        let calls = fake.take();
        assert!(
            calls
                .iter()
                .all(|c| !matches!(c, Call::ConntrackList(_) | Call::ConntrackDelete(_))),
            "{calls:#?}"
        );
    }

    #[test]
    fn delete_is_idempotent_and_frees_the_name() {
        let (mut dp, fake) = running();
        let pu = web(80, "10.0.0.0/8");
        dp.configure(0, &pu).unwrap();
        dp.delete(0, &pu).unwrap();
        assert_eq!(fake.sets(), global_sets());
        assert!(dp.pus.is_empty() && dp.names.get(&pu.id).is_none());
        fake.take();
        dp.delete(0, &pu).unwrap();
        assert_eq!(fake.take(), []);
        // A caller that believes another version is installed: the names
        // of both plans overlap (the port sets), each set goes once.
        dp.configure(0, &pu).unwrap();
        dp.delete(1, &pu).unwrap();
        assert_eq!(fake.sets(), global_sets());
    }

    /// The sockets of [`web`], the only PU.
    fn web_sockets() -> PuSockets {
        PuSockets::new(Owner::Cgroup("/sys/fs/cgroup/enforcer/web".into()), [])
    }

    /// Every kind's cut finds the PU's sockets, among the other PUs': a
    /// uid PU's by its user, the host PU's as what no other PU has.
    #[test]
    fn update_cuts_the_flows_of_every_kind_by_its_sockets() {
        let (mut dp, fake) = running();
        let of_kind = |id: &str, kind: PuKind, net: &str| Pu {
            id: PuId::new(id).unwrap(),
            kind,
            tcp_ports: vec![],
            ..web(80, net)
        };
        let uid = |net| {
            of_kind(
                "user",
                PuKind::Uid {
                    user: UserSpec::Id(1000),
                },
                net,
            )
        };
        let host = |net| of_kind("host", PuKind::Host, net);
        for pu in [web(80, "10.0.0.0/8"), uid("10.0.0.0/8"), host("10.0.0.0/8")] {
            dp.configure(0, &pu).unwrap();
        }
        let only_old = flow("10.4.0.2", 7000);
        fake.0.lock().unwrap().flows = vec![flow("10.2.0.2", 7000), only_old];
        let web_cgroup = Owner::Cgroup("/sys/fs/cgroup/enforcer/web".into());
        let uid_owner = Owner::Uid(UserSpec::Id(1000));
        for (old, new, sockets) in [
            (
                uid("10.0.0.0/8"),
                uid("10.2.0.0/16"),
                PuSockets::new(uid_owner.clone(), [Owner::Namespace, web_cgroup.clone()]),
            ),
            (
                host("10.0.0.0/8"),
                host("10.2.0.0/16"),
                PuSockets::new(Owner::Namespace, [uid_owner.clone(), web_cgroup.clone()]),
            ),
        ] {
            fake.take();
            dp.update(1, &new, &old).unwrap();
            let cuts: Vec<Call> = fake
                .take()
                .into_iter()
                .filter(|c| matches!(c, Call::ConntrackDelete(_) | Call::AbortSockets(..)))
                .collect();
            assert_eq!(
                cuts,
                [
                    Call::AbortSockets(sockets, vec![(Direction::App, only_old)]),
                    Call::ConntrackDelete(only_old),
                ],
                "{}",
                new.id
            );
        }
    }

    fn flow(dst: &str, dport: u16) -> Flow {
        Flow {
            protocol: revoke::TCP,
            src: if dst.contains(':') {
                "fd00::1"
            } else {
                "10.0.0.1"
            }
            .parse()
            .unwrap(),
            dst: dst.parse().unwrap(),
            sport: 40000,
            dport,
        }
    }

    #[test]
    fn update_cuts_exactly_the_flows_only_the_old_policy_accepted() {
        let (mut dp, fake) = running();
        let (old, new) = (web(80, "10.0.0.0/8"), web(80, "10.2.0.0/16"));
        dp.configure(0, &old).unwrap();
        let only_old = flow("10.4.0.2", 7000);
        fake.0.lock().unwrap().flows =
            vec![flow("10.2.0.2", 7000), only_old, flow("fd00::2", 7000)];
        fake.take();
        dp.update(1, &new, &old).unwrap();
        let cuts: Vec<Call> = fake
            .take()
            .into_iter()
            .filter(|c| matches!(c, Call::ConntrackDelete(_) | Call::AbortSockets(..)))
            .collect();
        assert_eq!(
            cuts,
            [
                Call::AbortSockets(web_sockets(), vec![(Direction::App, only_old)]),
                Call::ConntrackDelete(only_old),
            ],
            "sockets first (their RST leaves through the marked entry), then the entries"
        );
        // Back to the wider policy: nothing it allows is cut.
        dp.update(0, &old, &new).unwrap();
        let calls = fake.take();
        assert!(
            calls
                .iter()
                .all(|c| !matches!(c, Call::ConntrackDelete(_) | Call::AbortSockets(..))),
            "{calls:#?}"
        );
    }

    /// The network side: a peer's connection to the PU's listening port
    /// that only the old network ACLs accepted is cut; one both accept,
    /// one to another port and an outgoing one stay.
    #[test]
    fn update_cuts_incoming_flows_only_the_old_network_acls_accepted() {
        let (mut dp, fake) = running();
        let listening = |nets: &[&str]| Pu {
            network_acls: vec![Acl {
                networks: nets.iter().map(|n| n.parse().unwrap()).collect(),
                ports: vec![PortRange::new(8080, 8080).unwrap()],
                ..web(8080, "10.0.0.0/8").application_acls[0].clone()
            }],
            ..web(8080, "10.0.0.0/8")
        };
        let old = listening(&["10.2.0.0/16", "10.4.0.0/16", "fd04::/64"]);
        let new = listening(&["10.2.0.0/16"]);
        dp.configure(0, &old).unwrap();
        let incoming = |src: &str, dport: u16| Flow {
            protocol: revoke::TCP,
            src: src.parse().unwrap(),
            dst: if src.contains(':') {
                "fd00::1"
            } else {
                "10.0.0.1"
            }
            .parse()
            .unwrap(),
            sport: 40000,
            dport,
        };
        let (v4, v6) = (incoming("10.4.0.2", 8080), incoming("fd04::2", 8080));
        fake.0.lock().unwrap().flows = vec![
            incoming("10.2.0.2", 8080),
            v4,
            incoming("10.4.0.2", 9090),
            flow("10.4.0.2", 7000),
            v6,
        ];
        fake.take();
        dp.update(1, &new, &old).unwrap();
        let cuts: Vec<Call> = fake
            .take()
            .into_iter()
            .filter(|c| matches!(c, Call::ConntrackDelete(_) | Call::AbortSockets(..)))
            .collect();
        assert_eq!(
            cuts,
            [
                Call::AbortSockets(
                    web_sockets(),
                    vec![(Direction::Net, v4), (Direction::Net, v6)]
                ),
                Call::ConntrackDelete(v4),
                Call::ConntrackDelete(v6),
            ]
        );
    }

    /// The host PU has no port set: a flow a peer set up is its network
    /// side's where a socket of the namespace listens (here TCP 22 on the
    /// IPv6 wildcard, UDP 53 on one address) — cut when only the old
    /// network ACLs accepted its source. A flow to a port nothing listens
    /// at is not taken for an incoming one.
    #[test]
    fn update_cuts_incoming_flows_of_the_host_pu_where_sockets_listen() {
        let (mut dp, fake) = running();
        let host = |nets: &[&str]| Pu {
            id: PuId::new("host").unwrap(),
            kind: PuKind::Host,
            tcp_ports: vec![],
            application_acls: vec![],
            network_acls: vec![Acl {
                networks: nets.iter().map(|n| n.parse().unwrap()).collect(),
                protocols: vec![Protocol::Tcp, Protocol::Udp],
                ports: vec![],
                ..web(80, "10.0.0.0/8").application_acls[0].clone()
            }],
            ..web(80, "10.0.0.0/8")
        };
        let (old, new) = (
            host(&["10.2.0.0/16", "10.4.0.0/16"]),
            host(&["10.2.0.0/16"]),
        );
        dp.configure(0, &old).unwrap();
        let incoming = |protocol, src: &str, dst: &str, dport| Flow {
            protocol,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: 40000,
            dport,
        };
        let tcp = incoming(revoke::TCP, "10.4.0.2", "10.0.0.1", 22);
        let udp = incoming(revoke::UDP, "10.4.0.2", "10.0.0.1", 53);
        fake.0.lock().unwrap().flows = vec![
            tcp,
            udp,
            incoming(revoke::TCP, "10.2.0.2", "10.0.0.1", 22),
            incoming(revoke::TCP, "10.4.0.2", "10.0.0.1", 2222),
            incoming(revoke::UDP, "10.4.0.2", "10.0.0.7", 53),
        ];
        fake.0.lock().unwrap().listeners = revoke::Listeners::new([
            (revoke::TCP, "[::]:22".parse().unwrap()),
            (revoke::UDP, "10.0.0.1:53".parse().unwrap()),
        ]);
        fake.take();
        dp.update(1, &new, &old).unwrap();
        let cuts: Vec<Call> = fake
            .take()
            .into_iter()
            .filter(|c| matches!(c, Call::ConntrackDelete(_) | Call::AbortSockets(..)))
            .collect();
        assert_eq!(
            cuts,
            [
                Call::AbortSockets(
                    PuSockets::new(Owner::Namespace, []),
                    vec![(Direction::Net, tcp), (Direction::Net, udp)]
                ),
                Call::ConntrackDelete(tcp),
                Call::ConntrackDelete(udp),
            ]
        );
    }

    #[test]
    fn a_failed_cut_leaves_the_update_in_force() {
        let (mut dp, fake) = running();
        let (old, new) = (web(80, "10.0.0.0/8"), web(80, "10.2.0.0/16"));
        dp.configure(0, &old).unwrap();
        fake.fail_when(|call| matches!(call, Call::ConntrackList(_)));
        dp.update(1, &new, &old).unwrap();
        assert_eq!(dp.pus[&new.id].version, 1);
        assert_eq!(dp.pus[&new.id].pu, new);
    }

    /// The test-only fault ends the operation's last batch with a line
    /// that cannot apply; the operation undoes itself as after any failure.
    #[test]
    fn an_injected_fault_fails_the_last_batch_and_is_undone() {
        let (mut dp, fake) = running();
        fake.fail_when(|call| match call {
            Call::Restore(_, text) | Call::Ipset(text) => text.contains("enforcer-test-fault"),
            _ => false,
        });
        let pu = web(80, "10.0.0.0/8");
        dp.faults = Faults::parse("configure:2").unwrap();
        dp.configure(0, &pu).unwrap();
        dp.delete(0, &pu).unwrap();
        fake.take();
        assert!(dp.configure(0, &pu).is_err());
        let calls = fake.take();
        let Call::Restore(IpFamily::V6, last) = &calls[2] else {
            panic!("{calls:#?}")
        };
        assert!(
            last.ends_with("-A enforcer-test-fault -j ACCEPT\nCOMMIT\n"),
            "{last}"
        );
        assert_eq!(fake.sets(), global_sets());

        dp.faults = Faults::parse("set_target_networks:1").unwrap();
        let nets = NetworkSettings {
            target_tcp: vec!["10.0.0.0/8".parse().unwrap()],
            ..NetworkSettings::default()
        };
        assert!(dp.set_target_networks(&nets).is_err());
        let calls = fake.take();
        assert!(
            matches!(&calls[0], Call::Ipset(text) if text.ends_with("add enforcer-test-fault 0.0.0.0\n"))
        );
        assert!(
            matches!(&calls[1], Call::Ipset(text) if text.starts_with("del TRI-v4-TargetTCP 10.0.0.0/8 -exist\n")),
            "the reverse difference undoes what the failed batch applied: {calls:#?}"
        );
        dp.set_target_networks(&nets).unwrap();
    }
}
