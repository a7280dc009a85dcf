//! The eBPF datapath: programs classify, a fixed handful of netfilter
//! rules applies conntrack state and queues (ARCHITECTURE.md).
//!
//! - One object (`enforcer-ebpf/src/main.rs`) loaded once by `run`, with
//!   the mark layout patched in; its maps pinned under
//!   `<pin_dir>/maps/`.
//! - Each PU gets a *slot*, and its ACLs are written as LPM entries under
//!   the scope of (slot, generation). How its tasks are found is its
//!   [`claim::Claim`]: a linux-process PU's cgroup id maps to the slot in
//!   `PU_BY_CGROUP`, and the connect and sendmsg hooks and the cgroup_skb
//!   egress program (ICMP and the other protocols without a socket hook)
//!   are attached to its cgroup; uid, host-service, host and container
//!   PUs are found by uid, port or as the namespace's fallback, by the
//!   same programs attached once to the host scope (`[host] cgroup`) — see
//!   [`claim`] for how each task is judged by exactly one PU. Links are
//!   pinned under `<pin_dir>/links/`, so enforcement outlives a crashed
//!   agent.
//! - `update` writes the new policy under the other generation, flips the
//!   slot's generation with one map write, waits for an RCU grace period
//!   ([`grace`]: until no hook that read the old generation still runs),
//!   then removes the old entries: every connection is judged wholly by
//!   the old or wholly by the new policy, and none misses its entry. Then
//!   it aborts the PU's sockets whose connection an ACL accepted and the
//!   new policy refuses ([`super::sockdiag`]), outgoing (accepted at
//!   `connect()`) and incoming (accepted by TC ingress at the SYN):
//!   nothing re-judges an established connection per packet.
//! - The network side: a TC ingress program on every interface of the
//!   agent's namespace (kept there by [`links::Watcher`], `lo` and new
//!   interfaces included) finds the PU by its listening port
//!   (`PU_PORTS`), else gives the packet to the namespace-wide PU (host or
//!   container) if there is one, and judges set-up by the PU's network
//!   ACLs, written beside its application ACLs under the same generation.
//!   A refusal of the namespace-wide PU is carried out by a fixed rule in
//!   INPUT, which knows the conntrack state TC cannot see (an answer to
//!   what the PU sent passes). TC ingress also hands connections to a
//!   PU's exposed ports to its proxy ([`exposed`]), with an sk_lookup
//!   program on the namespace for a reused TIME_WAIT tuple.
//! - `delete` unmaps the claim (the host scope judges the PU's tasks from
//!   then on, if it is attached), detaches the hooks, waits for a grace
//!   period, then removes the entries and frees the slot for reuse.
//! - The netfilter rules ([`netfilter::render`]) do not depend on PUs,
//!   ACLs or networks. One of them runs the pinned socket filter
//!   `enforcer_udp_trap` to find the unconnected UDP datagrams a sendmsg
//!   hook decided to trap; the handshake's global traps run
//!   `enforcer_target_src` / `enforcer_target_dst` to ask whether a
//!   packet's peer is in a target network.

mod claim;
mod entries;
mod exposed;
mod flowlog;
pub mod grace;
mod links;
mod netfilter;
mod proxy;
mod sockopt_link;

/// How a uid PU's user name becomes its uid, for whoever else needs it
/// (port discovery): one resolver for the whole agent.
pub(crate) use claim::resolve as resolve_user;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, CgroupSockopt,
        SchedClassifier, SockOps, SocketFilter, links::FdLink,
    },
};
use enforcer_common::maps::{
    AclEntry, HOST_PROGRAMS, MAP_ACLS, MAP_EXPOSED, MAP_FALLBACK_PU, MAP_FLOW_EVENTS, MAP_NETS,
    MAP_PU_BY_CGROUP, MAP_PU_BY_UID, MAP_PU_COUNTS, MAP_PU_GENERATION, MAP_PU_PORTS,
    MAX_ACL_PREFIXES, MAX_NETS, MAX_PUS, NetKey, PROG_EGRESS, PROG_HOST_EGRESS,
    PROG_HOST_MARK_GUARD, PROG_INGRESS, PROG_MARK_GUARD, PROG_TARGET_DST, PROG_TARGET_SRC,
    PROG_UDP_TRAP, PU_PROGRAMS, PortKey, PuCounts, RULE_FILTERS, SCOPE_EXCLUDED, SCOPE_TARGET_TCP,
    SCOPE_TARGET_UDP,
};
use enforcer_common::marks::Class;
use enforcer_common::proxy::{
    MAP_PROXY_PORTS, MAP_PROXY_SERVICES, PROG_PROXY_ORIGINAL_DST, PROG_PROXY_SOCKOPS,
    PROXY_SOCK_PROGRAMS, ProxyPorts, ServiceEntry,
};
use ipnet::IpNet;
use tracing::{debug, info, warn};

/// `BPF_NOEXIST` (uapi/linux/bpf.h): create an entry, never replace one.
const BPF_NOEXIST: u64 = 1;

use self::claim::Claim;
use self::entries::{AclPrefix, Side};
use self::grace::GracePeriod;
use super::fault::{self, Faults, Operation};
use super::owner::{Owner, PuSockets};
use super::ports::{self, ListenPort, RuntimePorts};
use super::queues::Direction;
use super::revoke::{self, Setup};
use super::{
    Counters, Datapath, DatapathError, DatapathKind, DatapathSettings, PacketCounts, Result,
    iptables::exec as nf, sockdiag,
};
use crate::policy::{FamilyNetworks, IpFamily, Mode, NetworkSettings, Pu, PuId, PuKind};

/// The loaded object and its maps, present between `run` and `cleanup`.
struct Loaded {
    bpf: Ebpf,
    nets: LpmTrie<MapData, NetKey, u8>,
    acls: LpmTrie<MapData, NetKey, AclEntry>,
    pu_by_cgroup: HashMap<MapData, u64, u32>,
    pu_by_uid: HashMap<MapData, u32, u32>,
    fallback: Array<MapData, u32>,
    generation: Array<MapData, u32>,
    counts: PerCpuArray<MapData, PuCounts>,
    ports: HashMap<MapData, PortKey, u32>,
    /// Dependent services and proxy ports ([`proxy`]).
    proxy_services: LpmTrie<MapData, NetKey, ServiceEntry>,
    proxy_ports: Array<MapData, ProxyPorts>,
    exposed: exposed::Exposed,
    /// The flow-log ring, until a reader takes it.
    flow_events: Option<RingBuf<MapData>>,
    grace: GracePeriod,
}

/// What the datapath holds for one configured PU.
struct PuState {
    slot: u32,
    generation: u32,
    /// How its tasks are found.
    claim: Claim,
    /// Prefixes written under (slot, generation), per side.
    prefixes: BTreeSet<AclPrefix>,
    /// Prefixes still written under the other generation: an update whose
    /// grace period could not be waited for leaves them (deleting them
    /// could make a running hook miss); the next update removes them
    /// first.
    retired: BTreeSet<AclPrefix>,
    /// Its listening ports in `PU_PORTS`: configured and run-time.
    ports: BTreeSet<PortKey>,
    /// Its run-time ports ([`ports`]).
    runtime: RuntimePorts,
    /// The policy in force (what a change of the target networks judges
    /// its sockets by).
    policy: Pu,
    /// Pins of its hooks' links (a linux-process PU's; the others share
    /// the host scope's). Only the pins hold the links: keeping a
    /// descriptor per link would run out of descriptors at a few thousand
    /// PUs (five links each).
    links: Vec<PathBuf>,
    /// Its proxy entries and programs ([`proxy`]).
    proxy: proxy::PuProxy,
}

pub struct EbpfDatapath {
    settings: DatapathSettings,
    loaded: Option<Loaded>,
    /// Entries of each global set, as written.
    sets: BTreeMap<u32, BTreeSet<IpNet>>,
    pus: BTreeMap<PuId, PuState>,
    free_slots: Vec<u32>,
    next_slot: u32,
    /// Policy ids get small numbers carried in the rules, for logs.
    policy_ids: BTreeMap<String, u32>,
    acl_prefixes: usize,
    /// Test-only fault injection ([`fault`]).
    faults: Faults,
    /// Keeps TC ingress on every interface, between `run` and `cleanup`.
    watcher: Option<links::Watcher>,
    /// Pins of the host scope's links, while a PU needs them
    /// ([`Claim::in_host_scope`]).
    host_links: Vec<PathBuf>,
    /// Configured PUs that need the host scope. A count, not a look at
    /// `pus`: `configure_replacing` takes a PU out of `pus` for a moment.
    host_users: usize,
    /// Pins of the host scope's proxy programs' links, while a PU has a
    /// proxy configuration ([`proxy`]); how many do.
    host_proxy_links: Vec<PathBuf>,
    proxy_users: usize,
    /// Where flow records go, if the agent wants them.
    flow_log: Option<crate::flowlog::FlowSender>,
    /// Slot and policy names for the flow-log reader.
    flow_names: Arc<Mutex<flowlog::FlowNames>>,
    /// Reads the flow-log ring, between `run` and `cleanup`.
    flow_reader: Option<flowlog::FlowReader>,
}

impl EbpfDatapath {
    pub fn new(settings: DatapathSettings) -> Result<Self> {
        Ok(Self {
            settings,
            loaded: None,
            sets: BTreeMap::new(),
            pus: BTreeMap::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            policy_ids: BTreeMap::new(),
            acl_prefixes: 0,
            faults: Faults::from_env()?,
            watcher: None,
            host_links: Vec::new(),
            host_users: 0,
            host_proxy_links: Vec::new(),
            proxy_users: 0,
            flow_log: None,
            flow_names: Arc::default(),
            flow_reader: None,
        })
    }

    fn loaded(&mut self) -> Result<&mut Loaded> {
        self.loaded
            .as_mut()
            .ok_or_else(|| anyhow!("the eBPF datapath is not running (call run first)").into())
    }

    fn maps_dir(&self) -> PathBuf {
        self.settings.pin_dir.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.settings.pin_dir.join("links")
    }

    /// Where the TC ingress program is pinned, for the interface watcher.
    fn ingress_pin(&self) -> PathBuf {
        self.settings.pin_dir.join("progs").join(PROG_INGRESS)
    }

    /// Where a socket filter of [`RULE_FILTERS`] is pinned: the fixed
    /// netfilter rules name it (`-m bpf --object-pinned`).
    fn filter_pin(&self, name: &str) -> PathBuf {
        self.settings.pin_dir.join("progs").join(name)
    }

    /// Loads the object with the mark layout patched in, pins its maps.
    fn load(&self) -> anyhow::Result<Loaded> {
        let object = crate::bpf::datapath_object()?;
        let shift = self.settings.marks.shift();
        let cookie = netns_cookie()?;
        let allow_dns = u32::from(self.settings.mode == Mode::Sidecar);
        // The guard compares it with the kernel's tgid, which is in the
        // initial pid namespace: an agent in another one is not told
        // apart, and its own `SO_MARK` is refused if a namespace-wide PU
        // claims it (it sets none today).
        let agent_tgid = std::process::id();
        let mut bpf = EbpfLoader::new()
            .override_global(enforcer_common::maps::GLOBAL_MARK_SHIFT, &shift, true)
            .override_global(enforcer_common::maps::GLOBAL_NETNS_COOKIE, &cookie, true)
            .override_global(enforcer_common::maps::GLOBAL_ALLOW_DNS, &allow_dns, true)
            .override_global(enforcer_common::maps::GLOBAL_AGENT_TGID, &agent_tgid, true)
            .load(object)
            .context("loading the eBPF datapath object")?;
        for name in PU_PROGRAMS
            .into_iter()
            .chain(HOST_PROGRAMS)
            .chain(PROXY_SOCK_PROGRAMS)
        {
            let prog: &mut CgroupSockAddr = bpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading program {name}"))?;
        }
        let ingress_pin = self.ingress_pin();
        if let Some(dir) = ingress_pin.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let ingress: &mut SchedClassifier = bpf
            .program_mut(PROG_INGRESS)
            .with_context(|| format!("program {PROG_INGRESS} missing from the object"))?
            .try_into()?;
        ingress
            .load()
            .with_context(|| format!("loading program {PROG_INGRESS}"))?;
        ingress
            .pin(&ingress_pin)
            .with_context(|| format!("pinning {}", ingress_pin.display()))?;
        exposed::load_lookup(&mut bpf)?;
        for name in RULE_FILTERS {
            let pin = self.filter_pin(name);
            let filter: &mut SocketFilter = bpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            filter
                .load()
                .with_context(|| format!("loading program {name}"))?;
            filter
                .pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
        }
        let sockops: &mut SockOps = bpf
            .program_mut(PROG_PROXY_SOCKOPS)
            .with_context(|| format!("program {PROG_PROXY_SOCKOPS} missing from the object"))?
            .try_into()?;
        sockops
            .load()
            .with_context(|| format!("loading program {PROG_PROXY_SOCKOPS}"))?;
        for name in [
            PROG_MARK_GUARD,
            PROG_HOST_MARK_GUARD,
            PROG_PROXY_ORIGINAL_DST,
        ] {
            let guard: &mut CgroupSockopt = bpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            guard
                .load()
                .with_context(|| format!("loading program {name}"))?;
        }
        for name in [PROG_EGRESS, PROG_HOST_EGRESS] {
            let egress: &mut CgroupSkb = bpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            egress
                .load()
                .with_context(|| format!("loading program {name}"))?;
        }
        let maps_dir = self.maps_dir();
        std::fs::create_dir_all(&maps_dir)
            .with_context(|| format!("creating {}", maps_dir.display()))?;
        std::fs::create_dir_all(self.links_dir())
            .with_context(|| format!("creating {}", self.links_dir().display()))?;
        let mut take = |name: &str| -> anyhow::Result<aya::maps::Map> {
            let map = bpf
                .take_map(name)
                .with_context(|| format!("map {name} missing"))?;
            map.pin(maps_dir.join(name))
                .with_context(|| format!("pinning map {name}"))?;
            Ok(map)
        };
        Ok(Loaded {
            nets: take(MAP_NETS)?.try_into()?,
            acls: take(MAP_ACLS)?.try_into()?,
            pu_by_cgroup: take(MAP_PU_BY_CGROUP)?.try_into()?,
            pu_by_uid: take(MAP_PU_BY_UID)?.try_into()?,
            fallback: take(MAP_FALLBACK_PU)?.try_into()?,
            generation: take(MAP_PU_GENERATION)?.try_into()?,
            counts: take(MAP_PU_COUNTS)?.try_into()?,
            ports: take(MAP_PU_PORTS)?.try_into()?,
            proxy_services: take(MAP_PROXY_SERVICES)?.try_into()?,
            proxy_ports: take(MAP_PROXY_PORTS)?.try_into()?,
            exposed: exposed::Exposed::new(take(MAP_EXPOSED)?.try_into()?),
            flow_events: Some(take(MAP_FLOW_EVENTS)?.try_into()?),
            grace: GracePeriod::new()?,
            bpf,
        })
    }

    fn policy_index(&mut self, id: &str) -> u32 {
        let next = self.policy_ids.len() as u32;
        let index = *self.policy_ids.entry(id.to_string()).or_insert(next);
        self.flow_names
            .lock()
            .expect("flow names lock")
            .policies
            .insert(index, id.to_string());
        index
    }

    /// Builds a PU's ACL entries, both sides.
    fn entries_for(&mut self, pu: &Pu) -> Result<BTreeMap<AclPrefix, AclEntry>> {
        let mut all = BTreeMap::new();
        for (side, acls) in [
            (Side::App, &pu.application_acls),
            (Side::Net, &pu.network_acls),
        ] {
            let indexes: BTreeMap<String, u32> = acls
                .iter()
                .map(|a| a.policy_id.as_str().to_string())
                .map(|id| {
                    let index = self.policy_index(&id);
                    (id, index)
                })
                .collect();
            let side_entries = entries::acl_entries(acls, |acl| indexes[acl.policy_id.as_str()])?;
            all.extend(side_entries.into_iter().map(|(net, e)| ((side, net), e)));
        }
        Ok(all)
    }

    /// Refuses what this datapath cannot enforce yet, before any change:
    /// a feature silently ignored would be a hole.
    fn check_supported(&self, pu: &Pu) -> Result<()> {
        let unsupported = |what: &str| {
            Err(DatapathError::Unsupported(
                what.to_string(),
                DatapathKind::Ebpf,
            ))
        };
        let mode = self.settings.mode;
        if !mode.accepts(&pu.kind) {
            // Validation refuses the pairing; this guards a caller that
            // skipped it.
            let kind = pu.kind.name();
            return unsupported(&format!("a {kind} PU ({}) in mode {mode}", pu.id));
        }
        if self.settings.net_cls_mount.is_some() && matches!(pu.kind, PuKind::LinuxProcess { .. }) {
            // The cgroup hooks attach to cgroup v2 only; a net_cls class
            // id is matched by iptables alone.
            return unsupported(&format!(
                "PU {}: a net_cls (cgroup v1) cgroup ([cgroups] version = \"v1\")",
                pu.id
            ));
        }
        if proxy::redirects(pu)
            && matches!(
                pu.kind,
                PuKind::Container | PuKind::Host | PuKind::HostService
            )
        {
            // Their proxy would be one of their own tasks (the namespace's
            // or the host's rest), which the mark guard refuses the proxy
            // mark: its onward connections would be redirected again.
            let kind = pu.kind.name();
            return unsupported(&format!("PU {}: proxy redirection for a {kind} PU", pu.id));
        }
        Ok(())
    }

    /// Writes a PU slot's ACL entries under a generation; on failure
    /// removes what it wrote.
    fn write_acls(
        &mut self,
        slot: u32,
        generation: u32,
        entries: &BTreeMap<AclPrefix, AclEntry>,
    ) -> Result<()> {
        if self.acl_prefixes + entries.len() > MAX_ACL_PREFIXES as usize {
            return Err(DatapathError::Full {
                what: "the ACL map".into(),
                capacity: MAX_ACL_PREFIXES as usize,
            });
        }
        let loaded = self.loaded()?;
        let mut written = Vec::new();
        for (&(side, net), entry) in entries {
            let (bits, data) = entries::net_key(side.scope(slot, generation), net);
            let key = Key::new(bits, data);
            if let Err(e) = loaded.acls.insert(&key, entry, 0) {
                for key in &written {
                    let _ = loaded.acls.remove(key);
                }
                return Err(anyhow!(e)
                    .context(format!("writing the ACL entry for {net}"))
                    .into());
            }
            written.push(key);
        }
        self.acl_prefixes += entries.len();
        Ok(())
    }

    fn remove_acls(&mut self, slot: u32, generation: u32, prefixes: &BTreeSet<AclPrefix>) {
        let Ok(loaded) = self.loaded() else { return };
        for &(side, net) in prefixes {
            let (bits, data) = entries::net_key(side.scope(slot, generation), net);
            if let Err(e) = loaded.acls.remove(&Key::new(bits, data)) {
                debug!("removing ACL entry {net}: {e}");
            }
        }
        self.acl_prefixes = self.acl_prefixes.saturating_sub(prefixes.len());
    }

    /// Attaches the sock_addr `programs`, the cgroup_skb `egress` and the
    /// setsockopt `guard` to a cgroup and pins the links as
    /// `<pin>-<program>`: a linux-process PU's programs to its cgroup, or
    /// the host scope's to it. With `fault` (test-only), the last sock_addr
    /// attach fails in place of being done.
    fn attach(
        &mut self,
        programs: [&str; 4],
        egress: &str,
        guard: &str,
        cgroup: &Path,
        pin: &str,
        fault: bool,
    ) -> Result<Vec<PathBuf>> {
        let links_dir = self.links_dir();
        let loaded = self.loaded()?;
        let dir =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mut pinned = Vec::new();
        for (i, name) in programs.into_iter().enumerate() {
            if fault && i + 1 == programs.len() {
                detach(pinned);
                return Err(injected(&format!("attaching {name}")));
            }
            let path = links_dir.join(format!("{pin}-{name}"));
            let linked = link_sock_addr(&mut loaded.bpf, name, &dir, &path)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()));
            match linked {
                Ok(()) => pinned.push(path),
                Err(e) => {
                    detach(pinned);
                    return Err(e.into());
                }
            }
        }
        let egress_prog = loaded
            .bpf
            .program_mut(egress)
            .context(egress.to_owned())
            .and_then(|p| Ok(<&mut CgroupSkb>::try_from(p)?));
        let path = links_dir.join(format!("{pin}-{egress}"));
        let linked = egress_prog.and_then(|prog| {
            let id = prog
                .attach(&dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {egress} to {}", cgroup.display()))?;
            let link = FdLink::try_from(prog.take_link(id)?)?;
            link.pin(&path)?;
            Ok(())
        });
        match linked {
            Ok(()) => pinned.push(path),
            Err(e) => {
                detach(pinned);
                return Err(e.into());
            }
        }
        let path = links_dir.join(format!("{pin}-{guard}"));
        let linked = loaded
            .bpf
            .program(guard)
            .context(guard.to_owned())
            .and_then(|p| Ok(<&CgroupSockopt>::try_from(p)?))
            .and_then(|prog| {
                sockopt_link::attach_pinned(prog, &dir, &path, sockopt_link::Hook::Set)
            })
            .with_context(|| format!("attaching {guard} to {}", cgroup.display()));
        match linked {
            Ok(()) => pinned.push(path),
            Err(e) => {
                detach(pinned);
                return Err(e.into());
            }
        }
        Ok(pinned)
    }

    fn take_slot(&mut self) -> Result<u32> {
        if let Some(slot) = self.free_slots.pop() {
            return Ok(slot);
        }
        if self.next_slot >= MAX_PUS {
            return Err(DatapathError::Full {
                what: "the PU table".into(),
                capacity: MAX_PUS as usize,
            });
        }
        self.next_slot += 1;
        Ok(self.next_slot - 1)
    }

    /// Zeroes a slot's counters so a reused slot starts from nothing.
    fn reset_counts(&mut self, slot: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let zeros =
            PerCpuValues::try_from(vec![PuCounts::default(); cpus]).map_err(anyhow::Error::from)?;
        self.loaded()?
            .counts
            .set(slot, zeros, 0)
            .context("resetting PU counters")?;
        Ok(())
    }

    /// Makes the global sets `wanted`, touching only the entries that
    /// change, all or nothing: every addition (across all sets) first, then
    /// every removal, so a network moving from one set to another is never
    /// in neither; on a failure the entries already changed are put back.
    /// With `fault` (test-only), the last write fails in place of being
    /// done.
    fn write_sets(&mut self, wanted: BTreeMap<u32, BTreeSet<IpNet>>, fault: bool) -> Result<()> {
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for scope in [SCOPE_TARGET_TCP, SCOPE_TARGET_UDP, SCOPE_EXCLUDED] {
            let (current, next) = (
                self.sets.get(&scope).cloned().unwrap_or_default(),
                wanted.get(&scope).cloned().unwrap_or_default(),
            );
            added.extend(
                next.difference(&current)
                    .map(|net| entries::net_key(scope, *net)),
            );
            removed.extend(
                current
                    .difference(&next)
                    .map(|net| entries::net_key(scope, *net)),
            );
        }
        let total: usize = self.sets.values().map(BTreeSet::len).sum();
        if total + added.len() > MAX_NETS as usize + removed.len() {
            return Err(DatapathError::Full {
                what: "the network sets map".into(),
                capacity: MAX_NETS as usize,
            });
        }
        let nets = &mut self.loaded()?.nets;
        let key = |&(bits, data): &(u32, NetKey)| Key::new(bits, data);
        let writes = added.len() + removed.len();
        let strikes = |n: usize| fault && n + 1 == writes;
        for (i, k) in added.iter().enumerate() {
            let written = match strikes(i) {
                true => Err(injected("adding to the network sets")),
                false => nets
                    .insert(&key(k), 1, 0)
                    .map_err(|e| anyhow!(e).context("adding to the network sets").into()),
            };
            if let Err(e) = written {
                for k in &added[..i] {
                    let _ = nets.remove(&key(k));
                }
                return Err(e);
            }
        }
        for (i, k) in removed.iter().enumerate() {
            let written = match strikes(added.len() + i) {
                true => Err(injected("removing from the network sets")),
                false => nets
                    .remove(&key(k))
                    .map_err(|e| anyhow!(e).context("removing from the network sets").into()),
            };
            if let Err(e) = written {
                for k in &removed[..i] {
                    let _ = nets.insert(&key(k), 1, 0);
                }
                for k in &added {
                    let _ = nets.remove(&key(k));
                }
                return Err(e);
            }
        }
        self.sets = wanted;
        Ok(())
    }

    /// Maps `ports` to `owner` (a slot, [`Claim::port_owner`]; BPF_NOEXIST:
    /// a port another PU holds is an error, never taken over); on failure
    /// removes what it wrote.
    fn add_ports(&mut self, owner: u32, ports: &BTreeSet<PortKey>) -> Result<()> {
        self.take_ports(owner, ports, None)
    }

    /// [`Self::add_ports`], except that a port `from` holds is taken over
    /// in place (one map write: the port is never unmapped in between).
    /// On failure, what it wrote is removed, the taken ones included
    /// (`configure_replacing` gives those back).
    fn take_ports(
        &mut self,
        owner: u32,
        ports: &BTreeSet<PortKey>,
        from: Option<u32>,
    ) -> Result<()> {
        let map = &mut self.loaded()?.ports;
        let mut written = Vec::new();
        for key in ports {
            let taken = from.is_some() && map.get(key, 0).ok() == from;
            let flags = if taken { 0 } else { BPF_NOEXIST };
            if let Err(e) = map.insert(key, owner, flags) {
                for key in &written {
                    let _ = map.remove(key);
                }
                return Err(anyhow!(e)
                    .context(format!(
                        "mapping port {}/{} (is it another PU's?)",
                        key.port,
                        if key.proto == enforcer_common::maps::PROTO_TCP {
                            "tcp"
                        } else {
                            "udp"
                        }
                    ))
                    .into());
            }
            written.push(*key);
        }
        Ok(())
    }

    /// Unmaps `ports`, each only while it is still `owner`'s.
    fn remove_ports(&mut self, owner: u32, ports: &BTreeSet<PortKey>) {
        let Ok(loaded) = self.loaded() else { return };
        for key in ports {
            if loaded.ports.get(key, 0).ok() == Some(owner)
                && let Err(e) = loaded.ports.remove(key)
            {
                debug!("removing port {key:?}: {e}");
            }
        }
    }

    fn slot_counts(&self, slot: u32) -> Result<PacketCounts> {
        let loaded = self.loaded.as_ref().ok_or_else(|| anyhow!("not running"))?;
        let values = loaded.counts.get(&slot, 0).context("reading PU counters")?;
        let mut sum = PacketCounts::default();
        for c in values.iter() {
            sum += PacketCounts {
                trapped: c.trapped,
                accepted: c.accepted,
                dropped: c.dropped,
            };
        }
        Ok(sum)
    }
}

/// The cookie of the calling thread's network namespace (the agent's):
/// `SO_NETNS_COOKIE` of a socket made for the purpose.
fn netns_cookie() -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .context("opening a socket to learn the network namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own into a live u64 of the given size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// Links the loaded sock_addr program `name` to the cgroup `dir` and pins
/// the link at `path`.
fn link_sock_addr(bpf: &mut Ebpf, name: &str, dir: &File, path: &Path) -> anyhow::Result<()> {
    let prog: &mut CgroupSockAddr = bpf
        .program_mut(name)
        .with_context(|| format!("program {name}"))?
        .try_into()?;
    // A bpf_link takes no attach flags (the kernel refuses ALLOW_MULTI
    // with EINVAL); links on one cgroup coexist anyway.
    let id = prog.attach(dir, CgroupAttachMode::Single)?;
    let link = FdLink::try_from(prog.take_link(id)?)?;
    // The pinned link's descriptor closes here; the pin keeps it.
    link.pin(path)?;
    Ok(())
}

/// Detaches the pinned links at once ([`sockopt_link::detach_now`]), then
/// removes their pins (the pin's release alone detaches only when the
/// kernel gets round to freeing the link).
fn detach(links: Vec<PathBuf>) {
    for pin in links {
        if let Err(e) = sockopt_link::detach_now(&pin) {
            warn!("detaching the link pinned at {}: {e:#}", pin.display());
        }
        if let Err(e) = std::fs::remove_file(&pin) {
            warn!("removing the link pin {}: {e}", pin.display());
        }
    }
}

impl Datapath for EbpfDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Ebpf
    }

    fn set_flow_log(&mut self, sender: crate::flowlog::FlowSender) {
        self.flow_log = Some(sender);
    }

    fn run(&mut self) -> Result<()> {
        self.cleanup()?;
        let mut loaded = self.load()?;
        if let Some(sender) = &self.flow_log
            && let Some(ring) = loaded.flow_events.take()
        {
            self.flow_reader = Some(flowlog::FlowReader::start(
                ring,
                self.flow_names.clone(),
                sender.clone(),
            )?);
        }
        exposed::attach_lookup(&mut loaded.bpf, &self.links_dir())?;
        self.loaded = Some(loaded);
        let pins = netfilter::Pins {
            udp_trap: self.filter_pin(PROG_UDP_TRAP),
            target_src: self.filter_pin(PROG_TARGET_SRC),
            target_dst: self.filter_pin(PROG_TARGET_DST),
        };
        for family in IpFamily::ALL {
            let rules =
                netfilter::render(self.settings.marks, &self.settings.queues, family, &pins)?;
            nf::restore(self.settings.iptables_backend, family, &rules)
                .with_context(|| format!("installing the fixed {family} rules"))?;
        }
        self.watcher = Some(links::Watcher::start(self.ingress_pin(), self.links_dir())?);
        info!(pin_dir = %self.settings.pin_dir.display(), "eBPF datapath loaded");
        Ok(())
    }

    fn set_target_networks(&mut self, networks: &NetworkSettings) -> Result<()> {
        let mut wanted: BTreeMap<u32, BTreeSet<IpNet>> = BTreeMap::new();
        for family in IpFamily::ALL {
            let nets = networks.for_family(family);
            for (scope, list) in [
                (SCOPE_TARGET_TCP, nets.target_tcp),
                (SCOPE_TARGET_UDP, nets.target_udp),
                (SCOPE_EXCLUDED, nets.excluded),
            ] {
                wanted.entry(scope).or_default().extend(list);
            }
        }
        let fault = self.faults.strikes(Operation::SetTargetNetworks);
        let old_udp = self.networks().target_udp;
        self.write_sets(wanted, fault)?;
        self.forget_removed_udp_targets(&old_udp);
        Ok(())
    }

    fn configure(&mut self, version: u8, pu: &Pu) -> Result<()> {
        self.configure_taking_ports(version, pu, None)
    }

    fn update(&mut self, version: u8, new: &Pu, old: &Pu) -> Result<()> {
        self.check_supported(new)?;
        let state = self
            .pus
            .get(&old.id)
            .ok_or_else(|| DatapathError::UnknownPu(old.id.clone()))?;
        if Claim::of(new, &self.settings.cgroup2)? != state.claim {
            // Another cgroup or user is a different attachment: replace
            // the PU.
            self.configure_replacing(version, new, old)?;
            return Ok(());
        }
        let (slot, old_generation) = (state.slot, state.generation);
        let owner = state.claim.port_owner(slot);
        let old_prefixes = state.prefixes.clone();
        let generation = u32::from(version & 1);
        if generation == old_generation {
            return Err(anyhow!(
                "update of PU {} to version {version}: that generation is in force",
                new.id
            )
            .into());
        }
        self.clear_retired(&old.id)?;
        let entries = self.entries_for(new)?;
        let fault = self.faults.strikes(Operation::Update);
        self.write_acls(slot, generation, &entries)?;
        let prefixes: BTreeSet<AclPrefix> = entries.keys().copied().collect();
        // New ports are mapped before the switch, old-only ones unmapped
        // after it: a port in both policies is never unmapped. The
        // run-time ports stay, whatever the new config lists.
        let old_ports = self.pus[&old.id].ports.clone();
        let ports = self.pus[&old.id]
            .claim
            .ports(&ports::with_runtime(new, &self.pus[&old.id].runtime));
        let added_ports: BTreeSet<PortKey> = ports.difference(&old_ports).copied().collect();
        if let Err(e) = self.add_ports(owner, &added_ports) {
            self.remove_acls(slot, generation, &prefixes);
            return Err(e);
        }
        // Exposed ports are rewritten in place before the switch (they
        // are no generation's): on a failure the old ones are put back.
        let others = self.pus.values().map(|s| &s.policy);
        let exposing = exposed::check_free(new, others).and_then(|()| {
            let entries = exposed::entries(new, slot);
            self.loaded()?.exposed.write(slot, entries)
        });
        if let Err(e) = exposing {
            self.remove_acls(slot, generation, &prefixes);
            self.remove_ports(owner, &added_ports);
            return Err(e.into());
        }
        // The proxy configuration changes in place, before the switch, as
        // the fallback's proxy sets do ([`proxy`]).
        let state = self.pus.get_mut(&old.id).expect("checked above");
        let (cgroup, mut proxy) = (
            state.claim.cgroup().map(Path::to_path_buf),
            std::mem::take(&mut state.proxy),
        );
        let set = self.set_proxy(slot, cgroup.as_deref(), new, &mut proxy);
        self.pus.get_mut(&old.id).expect("checked above").proxy = proxy;
        if let Err(e) = set {
            self.remove_acls(slot, generation, &prefixes);
            self.remove_ports(owner, &added_ports);
            // Put the old exposed ports back.
            let _ = self
                .loaded()
                .and_then(|l| Ok(l.exposed.write(slot, exposed::entries(old, slot))?));
            return Err(e);
        }
        // The switch: one map write (with `fault`, test-only, it fails in
        // place of being done: the last write of an update).
        let flipped = match fault {
            true => Err(injected("flipping the PU generation")),
            false => self.loaded().and_then(|l| {
                Ok(l.generation
                    .set(slot, generation, 0)
                    .context("flipping the PU generation")?)
            }),
        };
        if let Err(e) = flipped {
            // No hook can have read the new generation: its entries go now.
            self.remove_acls(slot, generation, &prefixes);
            self.remove_ports(owner, &added_ports);
            let entries = exposed::entries(old, slot);
            if let Err(e) = self
                .loaded()
                .and_then(|l| Ok(l.exposed.write(slot, entries)?))
            {
                warn!(pu = %old.id, "putting the old exposed services back: {e:#}");
            }
            return Err(e);
        }
        let removed_ports: BTreeSet<PortKey> = old_ports.difference(&ports).copied().collect();
        self.remove_ports(owner, &removed_ports);
        let state = self.pus.get_mut(&old.id).expect("checked above");
        state.generation = generation;
        state.prefixes = prefixes;
        state.retired = old_prefixes;
        state.ports = ports;
        state.policy = new.clone();
        // The new policy is in force from here on: what follows cannot
        // undo it, so its failures are logged, not returned (the record of
        // what is in force must stay true).
        if let Err(e) = self.clear_retired(&old.id) {
            warn!(pu = %new.id, "the old policy's entries stay until the next update: {e:#}");
        }
        // Judged with the run-time ports, which are the PU's listening
        // ports as much as its configured ones, under both policies.
        let runtime = &self.pus[&old.id].runtime;
        let (old, new) = (
            ports::with_runtime(old, runtime),
            ports::with_runtime(new, runtime),
        );
        self.cut_refused(&old, &new, &self.pu_sockets(&old));
        info!(pu = %new.id, slot, generation, "PU updated");
        Ok(())
    }

    fn delete(&mut self, _version: u8, pu: &Pu) -> Result<()> {
        let Some(state) = self.pus.remove(&pu.id) else {
            return Ok(());
        };
        // Unmapped before the detach: from here the host scope judges the
        // PU's tasks, if it is attached ([`claim`]).
        if let Ok(l) = self.loaded() {
            state.claim.unregister(l, state.slot);
        }
        detach(state.links);
        self.drop_proxy(state.slot, state.proxy);
        if state.claim.in_host_scope() {
            self.host_users -= 1;
            self.release_host_scope();
        }
        self.remove_ports(state.claim.port_owner(state.slot), &state.ports);
        if let Ok(l) = self.loaded() {
            l.exposed.clear(state.slot);
        }
        let mut waited = Err(anyhow!("the datapath is not running"));
        if let Ok(l) = self.loaded() {
            // A hook that found the slot before the detach may still be
            // looking up its entries; and the slot must not be reused
            // under a hook that still holds it.
            waited = l.grace.wait();
        }
        match waited {
            Ok(_) => {
                self.remove_acls(state.slot, state.generation, &state.prefixes);
                self.remove_acls(state.slot, state.generation ^ 1, &state.retired);
                self.free_slots.push(state.slot);
            }
            Err(e) => warn!(
                pu = %pu.id,
                slot = state.slot,
                "no grace period ({e:#}): the PU's entries and slot stay unused until the next run"
            ),
        }
        info!(pu = %pu.id, "PU deleted");
        Ok(())
    }

    fn cleanup(&mut self) -> Result<()> {
        // Stop attaching to new interfaces before the pins go.
        self.watcher = None;
        self.flow_reader = None;
        for (_, state) in std::mem::take(&mut self.pus) {
            detach(state.links);
            detach(state.proxy.into_links());
        }
        detach(std::mem::take(&mut self.host_links));
        self.host_users = 0;
        detach(std::mem::take(&mut self.host_proxy_links));
        self.proxy_users = 0;
        self.loaded = None;
        self.sets.clear();
        self.free_slots.clear();
        self.next_slot = 0;
        self.acl_prefixes = 0;
        // The rules go before the pins: iptables-legacy re-checks every
        // rule of a table it rewrites, and the UDP trap rule's check opens
        // its pinned program by path. If a rule is left, so are the pins:
        // without its program that rule would make legacy refuse every
        // later rewrite of mangle, and the programs still attached keep
        // enforcing until a later `cleanup` or `run` retries both.
        nf::cleanup_all(self.settings.iptables_backend).context(
            "removing netfilter rules (pins kept, so the rules left still work; retry cleanup)",
        )?;
        // Pinned maps and links of this or an earlier (crashed) instance:
        // removing the pins releases them and detaches the programs.
        match std::fs::remove_dir_all(&self.settings.pin_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow!(e)
                    .context(format!("removing {}", self.settings.pin_dir.display()))
                    .into());
            }
        }
        // The parent is shared by every instance: removed once it is empty
        // (the last one out), left alone while another instance has pins.
        if let Some(parent) = self.settings.pin_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        Ok(())
    }

    /// One `PU_PORTS` entry, created with BPF_NOEXIST: the kernel too
    /// refuses a port another PU holds.
    fn add_port(&mut self, id: &PuId, port: ListenPort) -> Result<()> {
        let state = self
            .pus
            .get(id)
            .ok_or_else(|| DatapathError::UnknownPu(id.clone()))?;
        if state.runtime.contains(&port) {
            return Ok(());
        }
        let others = self.pus.values().map(|s| (&s.policy, &s.runtime));
        ports::check_free(id, port, others)?;
        if state.claim == Claim::Fallback {
            // As in the fallback: the namespace-wide PU has every port no
            // other PU holds, and no port set to put one in.
            let what = format!("PU {id}: a run-time port (it has no port set)");
            return Err(DatapathError::Unsupported(what, DatapathKind::Ebpf));
        }
        // The owner value configure gives the PU's ports (a host
        // service's carries its flag), so that its programs see the same.
        let (owner, key) = (state.claim.port_owner(state.slot), entries::port_key(port));
        if !state.ports.contains(&key) {
            self.add_ports(owner, &BTreeSet::from([key]))?;
        }
        let state = self.pus.get_mut(id).expect("checked above");
        state.ports.insert(key);
        state.runtime.insert(port);
        Ok(())
    }

    fn remove_port(&mut self, id: &PuId, port: ListenPort) -> Result<()> {
        let Some(state) = self.pus.get(id) else {
            return Ok(());
        };
        if !state.runtime.contains(&port) {
            return Ok(());
        }
        let (owner, key) = (state.claim.port_owner(state.slot), entries::port_key(port));
        let configured = ports::configured(&state.policy, port);
        if !configured {
            // Only while the entry is still this PU's (as `remove_ports`),
            // but a failure is returned: the port stays recorded, and the
            // next removal tries again.
            let map = &mut self.loaded()?.ports;
            if map.get(&key, 0).ok() == Some(owner) {
                map.remove(&key)
                    .with_context(|| format!("unmapping port {port} of PU {id}"))?;
            }
        }
        let state = self.pus.get_mut(id).expect("checked above");
        if !configured {
            state.ports.remove(&key);
        }
        state.runtime.remove(&port);
        Ok(())
    }

    fn runtime_ports(&self, id: &PuId) -> RuntimePorts {
        self.pus
            .get(id)
            .map(|s| s.runtime.clone())
            .unwrap_or_default()
    }

    fn counters(&self) -> Result<Counters> {
        let mut counters = Counters::default();
        for (id, state) in &self.pus {
            let counts = self.slot_counts(state.slot)?;
            counters.total += counts;
            counters.per_pu.insert(id.to_string(), counts);
        }
        Ok(counters)
    }
}

impl EbpfDatapath {
    /// In order, each step undone on a later failure: the slot and its
    /// counters, the ACL entries and generation, the ports, the programs
    /// (the PU cgroup's own, or the host scope's if not attached yet),
    /// then the claim is mapped — last, so that a task is never left to a
    /// program that is not there ([`claim`]). The ports `ports_from` (a
    /// `PU_PORTS` owner) holds are taken over in place.
    fn configure_taking_ports(
        &mut self,
        version: u8,
        pu: &Pu,
        ports_from: Option<u32>,
    ) -> Result<()> {
        self.check_supported(pu)?;
        if self.pus.contains_key(&pu.id) {
            return Err(anyhow!("PU {} is already configured", pu.id).into());
        }
        let claim = Claim::of(pu, &self.settings.cgroup2)?;
        exposed::check_free(pu, self.pus.values().map(|s| &s.policy))?;
        let entries = self.entries_for(pu)?;
        let generation = u32::from(version & 1);
        let fault = self.faults.strikes(Operation::Configure);
        let slot = self.take_slot()?;
        type Undo = Box<dyn FnOnce(&mut EbpfDatapath)>;
        let mut undo: Vec<Undo> = vec![Box::new(move |this| this.free_slots.push(slot))];
        let rollback = |this: &mut Self, undo: Vec<Undo>, e: DatapathError| {
            for step in undo.into_iter().rev() {
                step(this);
            }
            Err(e)
        };
        if let Err(e) = self.reset_counts(slot) {
            return rollback(self, undo, e);
        }
        if let Err(e) = self.write_acls(slot, generation, &entries) {
            return rollback(self, undo, e);
        }
        let prefixes: BTreeSet<AclPrefix> = entries.keys().copied().collect();
        let written = prefixes.clone();
        undo.push(Box::new(move |this| {
            this.remove_acls(slot, generation, &written)
        }));
        let set_generation = self.loaded().and_then(|l| {
            Ok(l.generation
                .set(slot, generation, 0)
                .context("setting the PU generation")?)
        });
        if let Err(e) = set_generation {
            return rollback(self, undo, e);
        }
        let ports = claim.ports(pu);
        let owner = claim.port_owner(slot);
        if let Err(e) = self.take_ports(owner, &ports, ports_from) {
            return rollback(self, undo, e);
        }
        let added = ports.clone();
        undo.push(Box::new(move |this| this.remove_ports(owner, &added)));
        let exposing = exposed::entries(pu, slot);
        if let Err(e) = self
            .loaded()
            .and_then(|l| Ok(l.exposed.write(slot, exposing)?))
        {
            return rollback(self, undo, e);
        }
        undo.push(Box::new(move |this| {
            if let Ok(l) = this.loaded() {
                l.exposed.clear(slot);
            }
        }));
        let links = match claim.cgroup() {
            Some(cgroup) => {
                let pin = format!("pu{slot}");
                self.attach(
                    PU_PROGRAMS,
                    PROG_EGRESS,
                    PROG_MARK_GUARD,
                    cgroup,
                    &pin,
                    fault,
                )
            }
            None => self.attach_host_scope().map(|()| Vec::new()),
        };
        let links = match links {
            Ok(links) => links,
            Err(e) => return rollback(self, undo, e),
        };
        let pinned = links.clone();
        undo.push(Box::new(move |this| {
            detach(pinned);
            this.release_host_scope();
        }));
        let mut proxy = proxy::PuProxy::default();
        if let Err(e) = self.set_proxy(slot, claim.cgroup(), pu, &mut proxy) {
            self.drop_proxy(slot, proxy);
            return rollback(self, undo, e);
        }
        // With `fault` (test-only) a PU of the host scope fails here, its
        // last step; a linux-process PU's last attach failed above.
        let registered = match fault && claim.in_host_scope() {
            true => Err(injected("mapping the PU's claim")),
            false => self.loaded().and_then(|l| Ok(claim.register(l, slot)?)),
        };
        if let Err(e) = registered {
            self.drop_proxy(slot, proxy);
            return rollback(self, undo, e);
        }
        info!(pu = %pu.id, slot, claim = ?claim, "PU configured");
        if claim.in_host_scope() {
            self.host_users += 1;
        }
        self.pus.insert(
            pu.id.clone(),
            PuState {
                slot,
                generation,
                claim,
                prefixes,
                retired: BTreeSet::new(),
                ports,
                runtime: RuntimePorts::new(),
                policy: pu.clone(),
                links,
                proxy,
            },
        );
        self.flow_names
            .lock()
            .expect("flow names lock")
            .slots
            .insert(slot, pu.id.to_string());
        Ok(())
    }

    /// Attaches the host scope's programs ([`claim`]) unless they are.
    fn attach_host_scope(&mut self) -> Result<()> {
        if !self.host_links.is_empty() {
            return Ok(());
        }
        let scope = self.settings.host_scope.clone();
        self.host_links = self.attach(
            HOST_PROGRAMS,
            PROG_HOST_EGRESS,
            PROG_HOST_MARK_GUARD,
            &scope,
            "host",
            false,
        )?;
        info!(scope = %scope.display(), "host scope attached");
        Ok(())
    }

    /// Detaches the host scope's programs once no configured PU needs
    /// them: with only linux-process PUs, nothing is attached beyond their
    /// own cgroups.
    fn release_host_scope(&mut self) {
        if self.host_users == 0 && !self.host_links.is_empty() {
            detach(std::mem::take(&mut self.host_links));
            info!("host scope detached");
        }
    }

    /// Removes the entries a PU's inactive generation still holds, once a
    /// grace period has passed (no hook can be using them any more). On
    /// failure nothing is removed.
    fn clear_retired(&mut self, id: &PuId) -> Result<()> {
        let state = self
            .pus
            .get(id)
            .ok_or_else(|| DatapathError::UnknownPu(id.clone()))?;
        if state.retired.is_empty() {
            return Ok(());
        }
        let (slot, generation, retired) = (state.slot, state.generation ^ 1, state.retired.clone());
        let waited = self
            .loaded()?
            .grace
            .wait()
            .context("waiting for the hooks to let go of the old policy (RCU grace period)")?;
        debug!(pu = %id, ?waited, "grace period over");
        self.remove_acls(slot, generation, &retired);
        self.pus.get_mut(id).expect("checked above").retired.clear();
        Ok(())
    }

    /// Aborts the PU's sockets (`sockets`: found by its cgroup, user or
    /// ports, or as what no other PU has, [`super::owner`]) whose connection an ACL
    /// accepted and that `new`, now in force, refuses; `old` was in force
    /// before it. Nothing judges an established connection again per
    /// packet: a socket keeps what its `connect()` decided, and TC ingress
    /// judges a TCP connection by its SYN only.
    /// - A connection a peer set up — to one of the PU's (old) listening
    ///   ports, or for the host or container PU to an endpoint a socket
    ///   of the namespace listens at ([`revoke::side`]) — was judged by
    ///   the old network ACLs at TC ingress; no class on the socket says
    ///   so (an accepted socket takes its listener's mark, or with
    ///   `tcp_fwmark_accept` its SYN's), so the old policy's verdict
    ///   stands for it ([`revoke::revoked`]). A trapped one is never cut.
    /// - Any other connection is the PU's own: its mark carries the class
    ///   its connect hook gave it, `AclAccept` for one an ACL accepted
    ///   ([`revoke::refused_now`]).
    ///
    /// An aborted TCP socket sends the peer a RST; the peer's later
    /// packets find no socket and are answered by RSTs, and a new SYN
    /// meets the new policy at TC ingress. Incoming UDP to a port PU needs
    /// no more: TC ingress judges every datagram, so a refused peer's next
    /// one is dropped. The host or container PU's refusal is the fixed
    /// INPUT rule's, which lets a flow conntrack knows through: so the
    /// entries of the UDP flows it no longer accepts are forgotten too
    /// ([`Self::forget_refused_udp`]); its TCP ones end with their
    /// sockets. No conntrack state holds an accepted connection otherwise
    /// (the fixed rules accept by connection mark only what the trap
    /// authorised). Best effort: the policy is in force whatever happens
    /// here, so a failure is logged loudly.
    fn cut_refused(&self, old: &Pu, new: &Pu, sockets: &PuSockets) {
        let networks = self.networks();
        let marks = self.settings.marks;
        let accepted = |mark: u32| mark & marks.class_mask() == marks.class(Class::AclAccept);
        let listeners = sockdiag::listeners(old).unwrap_or_else(|e| {
            tracing::error!(
                pu = %new.id,
                "listing the listening sockets failed; the PU's incoming connections are \
                 judged as its own: {e}"
            );
            revoke::Listeners::default()
        });
        let cut = |socket: &sockdiag::Socket| {
            let setup = |side| Setup::between(side, socket.protocol, socket.local, socket.remote);
            match revoke::side(old, &listeners, socket.protocol, socket.local) {
                side @ Direction::Net => revoke::revoked(old, new, &networks, side, setup(side)),
                side @ Direction::App => {
                    socket.mark.is_some_and(accepted)
                        && revoke::refused_now(new, &networks, side, setup(side))
                }
            }
        };
        if revoke::namespace_wide(old) {
            self.forget_refused_udp(old, new, &listeners, sockets);
        }
        match sockdiag::abort_sockets(sockets, cut) {
            Ok(cut) if cut.is_empty() => {}
            Ok(cut) => {
                info!(pu = %new.id, sockets = cut.len(), "connections the new policy refuses cut")
            }
            Err(e) => tracing::error!(
                pu = %new.id,
                "the new policy is in force, but cutting the connections it refuses failed: {e:#}"
            ),
        }
    }

    /// The conntrack entries of the UDP flows peers set up to the host or
    /// container PU ([`revoke::side`] with `listeners`, on the flow's
    /// receiving end) that its old network ACLs accepted and the new ones
    /// refuse, among those the PU's sockets carry ([`nf::own_flows`]):
    /// forgotten, so the refused peer's next datagram is NEW and the fixed
    /// INPUT rule drops it. A server's unconnected socket serves every
    /// peer and stays. Best effort, as [`Self::cut_refused`].
    fn forget_refused_udp(
        &self,
        old: &Pu,
        new: &Pu,
        listeners: &revoke::Listeners,
        sockets: &PuSockets,
    ) {
        use nf::Netfilter as _;
        let networks = self.networks();
        let nf = nf::System::new(self.settings.iptables_backend);
        let side = Direction::Net;
        let forget = || -> anyhow::Result<usize> {
            let mut refused = Vec::new();
            for family in IpFamily::ALL {
                let flows = nf
                    .conntrack_flows(family, 0, 0)
                    .with_context(|| format!("listing the {family} conntrack entries"))?;
                refused.extend(
                    flows
                        .into_iter()
                        .filter(|flow| {
                            let (local, peer) = flow.ends(side);
                            flow.protocol == revoke::UDP
                                && revoke::side(old, listeners, flow.protocol, local) == side
                                && revoke::revoked(
                                    old,
                                    new,
                                    &networks,
                                    side,
                                    Setup::between(side, flow.protocol, local, peer),
                                )
                        })
                        .map(|flow| (side, flow)),
                );
            }
            if refused.is_empty() {
                return Ok(0);
            }
            let mut forgotten = 0;
            for (_, flow) in nf.own_flows(sockets, refused)? {
                forgotten += usize::from(nf.conntrack_delete(&flow, 0, 0)?);
            }
            Ok(forgotten)
        };
        match forget() {
            Ok(0) => {}
            Ok(n) => info!(pu = %new.id, flows = n, "UDP flows the new policy refuses forgotten"),
            Err(e) => tracing::error!(
                pu = %new.id,
                "the new policy is in force, but forgetting the UDP flows it refuses failed: {e:#}"
            ),
        }
    }

    /// After the target UDP networks lost some of `old_udp`: the UDP flows
    /// trapped because of them are judged again (SPEC,
    /// `set_target_networks`). Their conntrack entries, which carry the
    /// trap's verdict, are forgotten; and a PU's connected UDP socket to
    /// such a peer keeps the trap class its `connect()` gave it, so it is
    /// aborted when the PU's policy now refuses the peer (as an update
    /// cuts, [`Self::cut_refused`]): its next send fails, and a new
    /// connect or `sendto` meets the PU's ACLs. One its ACLs accept keeps
    /// going (its next datagram is trapped once more, and accepted).
    /// Best effort: the sets are in force whatever happens here.
    fn forget_removed_udp_targets(&self, old_udp: &[IpNet]) {
        let networks = self.networks();
        match nf::forget_udp_flows(
            &nf::System::new(self.settings.iptables_backend),
            old_udp,
            &networks.target_udp,
        ) {
            Ok(0) => {}
            Ok(n) => info!(flows = n, "UDP flows of removed target networks forgotten"),
            Err(e) => tracing::error!(
                "the new target networks are in force, but forgetting the UDP flows of \
                 removed ones failed: {e:#}"
            ),
        }
        let marks = self.settings.marks;
        let trapped = |mark: u32| mark & marks.class_mask() == marks.class(Class::TrapUdp);
        let stale = |peer: &std::net::IpAddr| {
            old_udp.iter().any(|n| n.contains(peer))
                && !networks.target_udp.iter().any(|n| n.contains(peer))
        };
        let candidate = |socket: &sockdiag::Socket| {
            socket.protocol == revoke::UDP
                && socket.mark.is_some_and(trapped)
                && stale(&socket.remote.ip().to_canonical())
        };
        // One dump first: per PU, a cut walks its cgroup tree and dumps
        // again, which only the PUs of a host that has such sockets pay.
        match sockdiag::sockets() {
            Ok(sockets) if !sockets.iter().any(candidate) => return,
            Ok(_) => {}
            Err(e) => debug!("listing sockets before the cut failed, cutting anyway: {e}"),
        }
        for (id, state) in &self.pus {
            let cut = |socket: &sockdiag::Socket| {
                let side = Direction::App;
                let setup = Setup::between(side, socket.protocol, socket.local, socket.remote);
                candidate(socket) && revoke::refused_now(&state.policy, &networks, side, setup)
            };
            let sockets = self.pu_sockets(&ports::with_runtime(&state.policy, &state.runtime));
            match sockdiag::abort_sockets(&sockets, cut) {
                Ok(cut) if cut.is_empty() => {}
                Ok(cut) => {
                    info!(pu = %id, sockets = cut.len(), "UDP sockets to removed targets cut")
                }
                Err(e) => tracing::error!(
                    pu = %id,
                    "cutting the PU's UDP sockets to removed target networks failed: {e:#}"
                ),
            }
        }
    }

    /// The sockets of `pu` (its run-time ports included) among the other
    /// PUs' ([`super::owner`]).
    fn pu_sockets(&self, pu: &Pu) -> PuSockets {
        let cgroup2 = &self.settings.cgroup2;
        let own = Owner::of(pu, &RuntimePorts::new(), cgroup2, false);
        let others = self
            .pus
            .iter()
            .filter(|(id, _)| **id != pu.id)
            .map(|(_, s)| Owner::of(&s.policy, &s.runtime, cgroup2, false));
        PuSockets::new(own, others)
    }

    /// The global sets as a policy sees them, both families together.
    fn networks(&self) -> FamilyNetworks {
        let set = |scope| {
            self.sets
                .get(&scope)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default()
        };
        FamilyNetworks {
            target_tcp: set(SCOPE_TARGET_TCP),
            target_udp: set(SCOPE_TARGET_UDP),
            excluded: set(SCOPE_EXCLUDED),
        }
    }

    /// `update` across cgroups: configure the new attachment, then delete
    /// the old, so the PU is never without a policy.
    fn configure_replacing(&mut self, version: u8, new: &Pu, old: &Pu) -> Result<()> {
        let state = self
            .pus
            .remove(&old.id)
            .ok_or_else(|| DatapathError::UnknownPu(old.id.clone()))?;
        // Ports in both policies pass from the old slot to the new one in
        // place; the old PU's delete then leaves them alone.
        let old_owner = state.claim.port_owner(state.slot);
        match self.configure_taking_ports(version, new, Some(old_owner)) {
            Ok(()) => {
                let new_state = self.pus.remove(&new.id).expect("just configured");
                self.pus.insert(old.id.clone(), state);
                self.delete(version ^ 1, old)?;
                self.pus.insert(new.id.clone(), new_state);
                Ok(())
            }
            Err(e) => {
                // What the failed configure took, and then removed, is the
                // old PU's again (a port it still has is left as it is).
                if let Ok(l) = self.loaded() {
                    for key in &state.ports {
                        let _ = l.ports.insert(key, old_owner, BPF_NOEXIST);
                    }
                    l.exposed.restore(state.slot);
                }
                self.pus.insert(old.id.clone(), state);
                Err(e)
            }
        }
    }
}

/// The error of a test-only injected fault ([`fault`]), naming the step it
/// stands for.
fn injected(step: &str) -> DatapathError {
    anyhow!(
        "{step}: fault injected on purpose ({}, test-only)",
        fault::ENV
    )
    .into()
}
