//! The agent's whole configuration and its settings: mode, datapath
//! choice, target and excluded networks, NFQUEUE layout, marks, flow-log
//! output, identity (keys, token window, the PUs' identity policies), and
//! the PUs. The public entry points for loading and checking
//! a configuration are the methods of [`Configuration`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use enforcer_common::marks::{self, MarkLayout};
use ipnet::IpNet;

use super::error::{Errors, FieldPath, PolicyError, ValidationErrors};
use super::family::{IpFamily, split_zero_prefix};
use super::host::HostFacts;
use super::pu::{CgroupPath, Pu, PuId, PuKind};
use super::{file, validate};
use crate::identity::{IdentityPolicy, KeyFiles, Window};

/// Everything the agent is told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration {
    pub mode: Mode,
    pub datapath: DatapathChoice,
    pub networks: NetworkSettings,
    pub queues: QueueSettings,
    pub marks: MarkSettings,
    pub flow_log: FlowLogOutput,
    /// `[iptables]`: which iptables flavour to use.
    pub iptables: IptablesSettings,
    /// `[ports]`: how the PUs' listening ports are discovered.
    pub ports: PortSettings,
    /// `[host]`: where the eBPF datapath finds the tasks of the PUs that
    /// are no cgroup's.
    pub host: HostSettings,
    /// `[cgroups]`: which cgroup hierarchy linux-process PUs live in.
    pub cgroups: CgroupSettings,
    pub identity: IdentitySettings,
    pub pus: Vec<Pu>,
}

impl Configuration {
    /// Parses a TOML config and checks everything that needs no host:
    /// every field's syntax and range, and the cross-field rules
    /// (duplicate ids, kinds the mode refuses, kind-specific fields, mark
    /// and queue layout). Every problem found is returned at once, in file
    /// order. Call [`Configuration::validate`] (or use
    /// [`Configuration::load`]) before applying it.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        file::parse(text, None)
    }

    /// [`Configuration::from_toml_str`] plus the host checks of
    /// [`Configuration::validate`], all problems reported together: what
    /// the agent calls on start-up.
    pub fn load(text: &str, host: &dyn HostFacts) -> Result<Self, PolicyError> {
        file::parse(text, Some(host))
    }

    /// Checks the cross-field rules and, through `host`, that every
    /// linux-process PU's cgroup directory exists. Field syntax is already
    /// guaranteed by the types, so this is the whole check for a
    /// configuration built in code (e.g. from a control request); for a
    /// parsed one it re-runs the cheap structural rules and adds the host
    /// checks. Collects every problem.
    pub fn validate(&self, host: &dyn HostFacts) -> Result<(), ValidationErrors> {
        let mut errs = Errors::default();
        validate::settings(&self.queues, &self.marks, &mut errs);
        validate::identity(&self.identity, &mut errs);
        validate::pus_across(Some(self.mode), self.pus.iter().enumerate(), &mut errs);
        let list = FieldPath::root("pus");
        for (i, pu) in self.pus.iter().enumerate() {
            validate::pu_within(pu, &list.index(i), &mut errs);
        }
        validate::host(self.pus.iter().enumerate(), host, &mut errs);
        validate::host_scope(&self.host, host, &mut errs);
        errs.finish()
    }

    /// The configuration in the file format, every default written out;
    /// [`Configuration::from_toml_str`] reads it back to an equal value.
    pub fn to_toml_string(&self) -> Result<String, toml::ser::Error> {
        file::render(self)
    }
}

/// How the agent is deployed, which decides the PU kinds it manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// In the host's namespace, for linux-process, uid, host and
    /// host-service PUs.
    LocalServer,
    /// Inside one container's network namespace, for that container.
    RemoteContainer,
    /// As `RemoteContainer`, beside a proxy sharing the namespace; DNS is
    /// let through.
    Sidecar,
}

keywords!(Mode {
    LocalServer = "local-server",
    RemoteContainer = "remote-container",
    Sidecar = "sidecar",
});

impl Mode {
    /// The PU kinds (their config spellings) this mode manages.
    pub fn accepted_kinds(self) -> &'static [&'static str] {
        match self {
            Mode::LocalServer => &["linux-process", "uid", "host", "host-service"],
            Mode::RemoteContainer | Mode::Sidecar => &["container"],
        }
    }

    pub fn accepts(self, kind: &PuKind) -> bool {
        self.accepted_kinds().contains(&kind.name())
    }
}

/// Which datapath to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DatapathChoice {
    /// eBPF when the kernel has every feature needed, else iptables.
    #[default]
    Auto,
    /// eBPF, or a clear error naming the missing kernel feature.
    Ebpf,
    /// iptables + ipset, the seed's datapath.
    Iptables,
}

keywords!(DatapathChoice {
    Auto = "auto",
    Ebpf = "ebpf",
    Iptables = "iptables",
});

/// `[iptables]`: the netfilter tools both datapaths run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IptablesSettings {
    pub backend: IptablesBackendChoice,
}

/// `[ports]`: the agent's discovery of listening ports. Every
/// `discover_interval_ms` it lists the listening sockets of each uid PU's
/// user and each linux-process PU's cgroup (the uid PU first) and adds
/// their ports to the PU's port set (and
/// takes out the ones no longer listened on; the config's ports always
/// stay). 0 turns discovery off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSettings {
    pub discover_interval_ms: u32,
}

impl PortSettings {
    /// How often discovery runs; `None` when it is off.
    pub fn discover_interval(self) -> Option<std::time::Duration> {
        (self.discover_interval_ms > 0)
            .then(|| std::time::Duration::from_millis(self.discover_interval_ms.into()))
    }
}

impl Default for PortSettings {
    fn default() -> Self {
        Self {
            discover_interval_ms: 500,
        }
    }
}

/// `[cgroups]`: which hierarchy a linux-process PU's `cgroup` names, and
/// so how the kernel recognises its outgoing traffic: a cgroup v2 path
/// (`-m cgroup --path`, or the eBPF hooks on that cgroup), or a net_cls
/// cgroup v1 whose class id the agent sets (`-m cgroup --cgroup`, iptables
/// only). Which one `auto` picks, and why, is in the log and `status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupSettings {
    pub version: CgroupVersion,
    /// Where the net_cls v1 hierarchy is mounted; `None`: the first cgroup
    /// v1 mount with the net_cls controller in `/proc/self/mounts`.
    pub net_cls_mount: Option<PathBuf>,
}

/// `[cgroups] version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CgroupVersion {
    /// cgroup v2 when it is mounted, else net_cls v1 when that is.
    #[default]
    Auto,
    /// cgroup v2: PU cgroups are paths under its mount.
    V2,
    /// net_cls v1: PU cgroups are paths under the net_cls mount.
    V1,
}

keywords!(CgroupVersion {
    Auto = "auto",
    V2 = "v2",
    V1 = "v1",
});

/// Which iptables flavour (xtables-legacy or xtables-nft) runs every
/// restore and save; the other is never used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IptablesBackendChoice {
    /// The one the host already uses, detected the way kube-proxy's
    /// iptables-wrapper does it.
    #[default]
    Auto,
    /// `iptables-nft-restore` and friends (nf_tables).
    Nft,
    /// `iptables-legacy-restore` and friends (x_tables).
    Legacy,
}

keywords!(IptablesBackendChoice {
    Auto = "auto",
    Nft = "nft",
    Legacy = "legacy",
});

/// `[host]`: the *host scope* of the eBPF datapath. cgroup programs act on
/// the tasks of the cgroup they are attached to and of every cgroup below
/// it, whatever their network namespace; the programs that judge uid,
/// host-service, host and container PUs are attached to this one cgroup
/// (and filter by the agent's network namespace), so a task outside it is
/// none of those PUs'. The iptables datapath sees every task of the
/// namespace and needs no scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    /// The cgroup, relative to the cgroup v2 mount; `None` (written `"/"`,
    /// the default) is the root, which holds every task of the machine.
    pub cgroup: Option<CgroupPath>,
}

/// Target and excluded networks as configured: IPv4 and IPv6 mixed, host
/// bits cleared, possibly empty. Datapaths take [`NetworkSettings::for_family`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkSettings {
    /// Peers whose TCP connections take part in the identity handshake.
    pub target_tcp: Vec<IpNet>,
    /// Peers whose UDP flows take part in the identity handshake.
    pub target_udp: Vec<IpNet>,
    /// Never touched: no trap, no policy, no log.
    pub excluded: Vec<IpNet>,
}

/// One family's share of the [`NetworkSettings`], ready for the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyNetworks {
    pub target_tcp: Vec<IpNet>,
    pub target_udp: Vec<IpNet>,
    pub excluded: Vec<IpNet>,
}

impl NetworkSettings {
    /// The entries of `family`, as `set_target_networks` applies them:
    /// an empty target list means everything (for TCP and, as the seed's
    /// fork added, UDP), and a /0 becomes its two /1 halves because ipset
    /// refuses /0. As in the seed, "empty" is judged before the family
    /// split: a target list naming only IPv4 networks traps no IPv6.
    pub fn for_family(&self, family: IpFamily) -> FamilyNetworks {
        let entries = |list: &[IpNet]| -> Vec<IpNet> {
            family
                .select(list)
                .copied()
                .flat_map(split_zero_prefix)
                .collect()
        };
        let targets = |list: &[IpNet]| {
            if list.is_empty() {
                family.everything().to_vec()
            } else {
                entries(list)
            }
        };
        FamilyNetworks {
            target_tcp: targets(&self.target_tcp),
            target_udp: targets(&self.target_udp),
            excluded: entries(&self.excluded),
        }
    }
}

/// The NFQUEUE layout of the trap (the seed's `fqconfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// One range of queues per trapped packet type (SYN, ACK, SYN-ACK,
    /// service) and direction; when off, one range per direction.
    pub separation: bool,
    /// Queues in each range; rules balance over a range.
    pub queues_per_range: u16,
    /// The first queue number; application ranges come first, then network.
    pub first_queue: u16,
    /// Packets each queue holds.
    pub queue_length: u32,
    /// What happens to a trapped packet when the agent cannot take it.
    pub fail_mode: FailMode,
}

/// What the trap does with a packet that no agent can take (SPEC, "The
/// trap"). Two kernel switches cover the two ways of failing, and a mode
/// sets both, on both datapaths, so that there is no half-open state:
/// - "no listener" (the agent is stopped or killed, the rules stay):
///   `--queue-bypass` on every NFQUEUE rule;
/// - "queue full" (the agent is alive but behind, or frozen):
///   `NFQA_CFG_F_FAIL_OPEN` on every bound queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FailMode {
    /// Both switches on: the packet is accepted without a verdict. The
    /// seed's choice (its NFQUEUE rules carry `--queue-bypass`): a dead
    /// agent never cuts the host off.
    #[default]
    Open,
    /// Both off: the packet is dropped. No connection set-up escapes the
    /// handshake, at the price of an outage while the agent is away.
    Closed,
}

keywords!(FailMode {
    Open = "open",
    Closed = "closed",
});

impl FailMode {
    /// `--queue-bypass` on the NFQUEUE rules.
    pub fn bypass(self) -> bool {
        self == FailMode::Open
    }

    /// `NFQA_CFG_F_FAIL_OPEN` on the bound queues.
    pub fn fail_open_when_full(self) -> bool {
        self == FailMode::Open
    }
}

impl Default for QueueSettings {
    /// The seed's defaults: separated, 4 queues per range from queue 0,
    /// 500 packets each, failing open.
    fn default() -> Self {
        Self {
            separation: true,
            queues_per_range: 4,
            first_queue: 0,
            queue_length: 500,
            fail_mode: FailMode::Open,
        }
    }
}

impl QueueSettings {
    /// How many ranges the layout has: four packet types per direction
    /// with separation, else one per direction.
    pub fn range_count(&self) -> u32 {
        if self.separation { 8 } else { 2 }
    }

    /// How many queues the layout uses, from `first_queue` on.
    pub fn total_queues(&self) -> u32 {
        self.range_count() * u32::from(self.queues_per_range)
    }
}

/// Where the enforcer's mark field sits in the 32-bit packet and
/// connection marks. The field's layout (kind and class sub-fields, their
/// values) is fixed in [`enforcer_common::marks`]; only its position is
/// configurable, to move it out of the way of another system's bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkSettings {
    /// The field occupies bits `shift ..= shift + 5`; at most
    /// [`marks::MAX_SHIFT`].
    pub shift: u32,
}

impl Default for MarkSettings {
    /// Bits 8–13 (mask 0x3f00): clear of kube-proxy (0x4000, 0x8000) and
    /// Calico (0xffff0000).
    fn default() -> Self {
        Self {
            shift: marks::DEFAULT_SHIFT,
        }
    }
}

impl MarkSettings {
    /// The layout every datapath and the trap derive their values from.
    ///
    /// # Panics
    /// If `shift` exceeds [`marks::MAX_SHIFT`]; validation refuses such a
    /// configuration, so a loaded or validated one never panics.
    pub fn layout(&self) -> MarkLayout {
        MarkLayout::new(self.shift).expect("marks.shift is validated to fit the 32-bit mark")
    }
}

/// Where flow-log lines go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FlowLogOutput {
    #[default]
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

/// Longest `token_lifetime_seconds` accepted: the replay cache holds
/// every nonce for that long.
pub const MAX_TOKEN_LIFETIME_SECONDS: u32 = 3600;
/// Largest `clock_skew_seconds` accepted.
pub const MAX_CLOCK_SKEW_SECONDS: u32 = 300;

/// The identity handshake's settings (`[identity]`) and every PU's
/// identity policy (`[[pus.network_policy]]`, `[[pus.application_policy]]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentitySettings {
    /// This agent's private key; required once any PU has an identity
    /// policy. Loaded at start (see [`crate::identity::keys::load`]).
    pub key: Option<PathBuf>,
    /// Public keys of the agents whose tokens are accepted.
    pub trusted: Vec<PathBuf>,
    /// Token lifetime and allowed clock skew.
    pub window: Window,
    /// The identity policy of each PU that has one, by PU id; a PU not
    /// here refuses every agent peer and may reach none.
    pub policies: BTreeMap<PuId, IdentityPolicy>,
}

impl IdentitySettings {
    /// The key files to load, when the handshake is configured.
    pub fn key_files(&self) -> Option<KeyFiles> {
        self.key.as_ref().map(|key| KeyFiles {
            key: key.clone(),
            trusted: self.trusted.clone(),
        })
    }

    /// The identity policy of PU `id` (empty when it has none).
    pub fn policy(&self, id: &PuId) -> &IdentityPolicy {
        static NONE: IdentityPolicy = IdentityPolicy {
            network: Vec::new(),
            application: Vec::new(),
        };
        self.policies.get(id).unwrap_or(&NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn empty_targets_mean_everything_in_both_families() {
        let settings = NetworkSettings::default();
        for family in IpFamily::ALL {
            let per = settings.for_family(family);
            assert_eq!(per.target_tcp, family.everything().to_vec());
            assert_eq!(per.target_udp, family.everything().to_vec());
            assert!(per.excluded.is_empty());
        }
    }

    #[test]
    fn targets_are_split_by_family_and_zero_prefixes_halved() {
        let settings = NetworkSettings {
            target_tcp: nets(&["10.0.0.0/8", "fd00::/8"]),
            target_udp: nets(&["0.0.0.0/0"]),
            excluded: nets(&["127.0.0.0/8", "::1/128", "::/0"]),
        };
        let v4 = settings.for_family(IpFamily::V4);
        assert_eq!(v4.target_tcp, nets(&["10.0.0.0/8"]));
        assert_eq!(v4.target_udp, nets(&["0.0.0.0/1", "128.0.0.0/1"]));
        assert_eq!(v4.excluded, nets(&["127.0.0.0/8"]));
        let v6 = settings.for_family(IpFamily::V6);
        assert_eq!(v6.target_tcp, nets(&["fd00::/8"]));
        // Only IPv4 UDP targets were given: the seed traps no IPv6 UDP then.
        assert_eq!(v6.target_udp, Vec::<IpNet>::new());
        assert_eq!(v6.excluded, nets(&["::1/128", "::/1", "8000::/1"]));
    }

    #[test]
    fn queue_layout_counts_ranges_as_the_seed() {
        let separated = QueueSettings::default();
        assert_eq!(separated.total_queues(), 32);
        let shared = QueueSettings {
            separation: false,
            ..QueueSettings::default()
        };
        assert_eq!(shared.total_queues(), 8);
    }

    #[test]
    fn modes_accept_their_kinds_only() {
        assert!(Mode::LocalServer.accepts(&PuKind::Host));
        assert!(!Mode::LocalServer.accepts(&PuKind::Container));
        assert!(Mode::Sidecar.accepts(&PuKind::Container));
        assert!(!Mode::RemoteContainer.accepts(&PuKind::HostService));
    }
}
