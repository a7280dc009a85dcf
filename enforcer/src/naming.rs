//! Every kernel object name the agent uses: iptables chains, ipsets, and
//! the short per-PU form they embed. Nothing else in the crate spells a
//! `TRI-` name, so cleanup by prefix finds everything the agent made.
//!
//! Per-PU names follow the seed (`puPortSetName`): the first four
//! characters of the PU id, then the first four characters of the URL-safe
//! base64 of the id's 64-bit murmur3 hash. Four base64 characters are only
//! 24 bits, so two ids with the same first four characters collide about
//! 2–3 times in 10,000 PUs; [`NameRegistry`] hands out the short forms and
//! resolves collisions instead of letting two PUs share a chain or set.
//!
//! NFLOG prefixes ([`nflog_prefix`]) are built here too: they carry the
//! same short names into the kernel, under a length limit of their own.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;

use crate::datapath::queues::Direction;
use crate::policy::{Bucket, IpFamily, PolicyId, PuId};

/// Longest iptables chain name: `XT_EXTENSION_MAXNAMELEN` (29) less the NUL.
pub const MAX_CHAIN_NAME_LEN: usize = 28;

/// Longest ipset name: `IPSET_MAXNAMELEN` (32) less the NUL.
pub const MAX_SET_NAME_LEN: usize = 31;

/// Longest NFLOG prefix: `NF_LOG_PREFIXLEN` (64) less the NUL.
pub const MAX_NFLOG_PREFIX_LEN: usize = 63;

/// Every chain the agent creates starts with this.
pub const CHAIN_PREFIX: &str = "TRI-";

/// Whether `chain` is one the agent made (cleanup removes exactly these).
pub fn is_agent_chain(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// Whether `set` is one the agent made: every set name starts with its
/// family's [`IpFamily::set_prefix`].
pub fn is_agent_set(set: &str) -> bool {
    IpFamily::ALL
        .iter()
        .any(|family| set.starts_with(family.set_prefix()))
}

/// A chain for each direction: `app` for traffic a PU sends, `net` for
/// traffic it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainPair<S = &'static str> {
    pub app: S,
    pub net: S,
}

impl<S> ChainPair<S> {
    pub const fn new(app: S, net: S) -> Self {
        Self { app, net }
    }

    /// The chain of `direction`.
    pub fn get(&self, direction: Direction) -> &S {
        match direction {
            Direction::App => &self.app,
            Direction::Net => &self.net,
        }
    }
}

/// The main chains, entered from mangle OUTPUT / INPUT.
pub const MAIN_CHAINS: ChainPair = ChainPair::new("TRI-App", "TRI-Net");
/// linux-process PUs (cgroup match).
pub const PROCESS_CHAINS: ChainPair = ChainPair::new("TRI-Pid-App", "TRI-Pid-Net");
/// host-service PUs.
pub const HOST_SERVICE_CHAINS: ChainPair = ChainPair::new("TRI-Svc-App", "TRI-Svc-Net");
/// The host PU.
pub const HOST_CHAINS: ChainPair = ChainPair::new("TRI-Hst-App", "TRI-Hst-Net");
/// uid PUs (owner match).
pub const UID_CHAINS: ChainPair = ChainPair::new("TRI-UID-App", "TRI-UID-Net");
/// Proxy traffic, first in the main chains (mangle).
pub const PROXY_CHAINS: ChainPair = ChainPair::new("TRI-Prx-App", "TRI-Prx-Net");
/// Redirection to the proxy (nat OUTPUT / PREROUTING).
pub const REDIRECT_CHAINS: ChainPair = ChainPair::new("TRI-Redir-App", "TRI-Redir-Net");

/// Every global chain pair, for `run` and `cleanup`.
pub const GLOBAL_CHAINS: [ChainPair; 7] = [
    MAIN_CHAINS,
    PROCESS_CHAINS,
    HOST_SERVICE_CHAINS,
    HOST_CHAINS,
    UID_CHAINS,
    PROXY_CHAINS,
    REDIRECT_CHAINS,
];

/// A PU's own chains under policy `version`: `TRI-App-<short>-<version>`
/// and `TRI-Net-<short>-<version>`. An update installs `version` beside
/// `version ^ 1`, so the two generations never share a name.
pub fn pu_chains(short: &ShortName, version: u32) -> ChainPair<String> {
    ChainPair {
        app: format!("{}-{short}-{version}", MAIN_CHAINS.app),
        net: format!("{}-{short}-{version}", MAIN_CHAINS.net),
    }
}

// Naming owns kernel names, so the family's set prefix is defined here
// rather than in `policy`, which owns the type.
impl IpFamily {
    /// Every set of this family starts with it; `cleanup` destroys by it.
    pub const fn set_prefix(self) -> &'static str {
        match self {
            IpFamily::V4 => "TRI-v4-",
            IpFamily::V6 => "TRI-v6-",
        }
    }
}

/// The sets that exist once per family, whatever the PUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GlobalSet {
    TargetTcp,
    TargetUdp,
    Excluded,
}

impl GlobalSet {
    pub const ALL: [GlobalSet; 3] = [
        GlobalSet::TargetTcp,
        GlobalSet::TargetUdp,
        GlobalSet::Excluded,
    ];

    /// `TRI-v4-TargetTCP`, `TRI-v6-Excluded`, …
    pub fn name(self, family: IpFamily) -> String {
        let suffix = match self {
            GlobalSet::TargetTcp => "TargetTCP",
            GlobalSet::TargetUdp => "TargetUDP",
            GlobalSet::Excluded => "Excluded",
        };
        format!("{}{suffix}", family.set_prefix())
    }
}

/// A PU's port set: the listening ports that identify its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortSet {
    /// The TCP ports of a uid PU (the seed's set).
    Uid,
    /// The UDP ports of a uid PU. The seed hooked only TCP to a uid PU's
    /// chain; its UDP services are the PU's as much.
    UidUdp,
    /// The TCP ports of a linux-process PU (the seed's set).
    Process,
    /// The UDP ports of a linux-process PU. The seed matched them with
    /// `multiport` in the hook rule; a set of their own lets them change at
    /// run time like the TCP ones, without touching a rule.
    ProcessUdp,
    /// The TCP ports of a host-service PU: the service itself. The seed
    /// matched them with `multiport`; a set keeps the rule one line
    /// whatever the number of ports.
    Service,
    /// The UDP ports of a host-service PU.
    ServiceUdp,
}

impl PortSet {
    /// Every kind of port set.
    pub const ALL: [PortSet; 6] = [
        PortSet::Uid,
        PortSet::UidUdp,
        PortSet::Process,
        PortSet::ProcessUdp,
        PortSet::Service,
        PortSet::ServiceUdp,
    ];

    /// `TRI-v4-UID-Port-<short>`, `TRI-v4-UID-UDP-<short>`,
    /// `TRI-v4-ProcPort-<short>`, `TRI-v4-ProcUDP-<short>`,
    /// `TRI-v4-SvcPort-<short>` or `TRI-v4-SvcUDP-<short>`.
    pub fn name(self, family: IpFamily, short: &ShortName) -> String {
        set_name(family, self.kind(), short)
    }

    fn kind(self) -> &'static str {
        match self {
            PortSet::Uid => "UID-Port-",
            PortSet::UidUdp => "UID-UDP-",
            PortSet::Process => "ProcPort-",
            PortSet::ProcessUdp => "ProcUDP-",
            PortSet::Service => "SvcPort-",
            PortSet::ServiceUdp => "SvcUDP-",
        }
    }
}

const ACL_SET_KIND: &str = "Acl-";

/// The set of one ACL's networks in one family:
/// `TRI-v4-Acl-<short>-<version><a|n><index>`, e.g. `TRI-v4-Acl-pu19gtV-1a0`
/// for the first application ACL (in declaration order) under version 1.
/// The version keeps an update's new sets apart from the old ones it
/// replaces. The longest (version 255, index 65535) has 29 characters.
pub fn acl_set(
    family: IpFamily,
    short: &ShortName,
    version: u8,
    direction: Direction,
    index: u16,
) -> String {
    let side = match direction {
        Direction::App => 'a',
        Direction::Net => 'n',
    };
    format!(
        "{}-{version}{side}{index}",
        set_name(family, ACL_SET_KIND, short)
    )
}

/// Whether `set` is an ACL set ([`acl_set`]) of either family.
pub fn is_acl_set(set: &str) -> bool {
    IpFamily::ALL.iter().any(|family| {
        set.strip_prefix(family.set_prefix())
            .is_some_and(|rest| rest.starts_with(ACL_SET_KIND))
    })
}

const PROXY_SET_PREFIX: &str = "Proxy-";

/// A PU's two proxy sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySets {
    /// `hash:net,port`: dependent services, redirected on the way out.
    pub destinations: String,
    /// The PU's exposed service ports, redirected on the way in.
    pub server_ports: String,
}

/// `TRI-v4-Proxy-<short>-dst` and `…-srv`. The seed put `dst-`/`srv-` in
/// front, outside the family prefix; as suffixes they stay under it, so
/// cleanup by prefix removes them too.
pub fn proxy_sets(family: IpFamily, short: &ShortName) -> ProxySets {
    let base = set_name(family, PROXY_SET_PREFIX, short);
    ProxySets {
        destinations: format!("{base}-dst"),
        server_ports: format!("{base}-srv"),
    }
}

/// The seed's `puPortSetName` with the family prefix in front. The seed cut
/// the prefix to 16 characters; every prefix here is at most 16 (tested),
/// so nothing is cut.
fn set_name(family: IpFamily, kind: &str, short: &ShortName) -> String {
    format!("{}{kind}{short}", family.set_prefix())
}

/// The per-PU part of chain and set names: at most 8 characters from
/// `A-Z a-z 0-9 _ . -`, handed out by a [`NameRegistry`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShortName(String);

impl ShortName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The short form of `id` with collision `salt`: the id's first four
/// characters and four characters of its hash. Salt 0 hashes the id
/// itself, exactly as the seed; salt `k` hashes `<id>#<k>` (`#` cannot
/// occur in an id).
fn short_form(id: &PuId, salt: u32) -> ShortName {
    let input: Cow<'_, str> = match salt {
        0 => id.as_str().into(),
        k => format!("{id}#{k}").into(),
    };
    // PuId is ASCII, so cutting at byte 4 cuts at a character.
    let head = &id.as_str()[..id.as_str().len().min(4)];
    ShortName(format!("{head}{}", hash_tag(&input)))
}

/// The seed's 24-bit tag of `text`: the first four characters of the
/// URL-safe base64 of its 64-bit murmur3 hash (`A-Z a-z 0-9 - _`).
fn hash_tag(text: &str) -> String {
    let hash = murmur3::murmur3_x64_128(&mut text.as_bytes(), 0)
        .expect("reading from a byte slice cannot fail");
    // Go's murmur3.New64().Sum(nil) is h1 written big-endian; this crate
    // returns h2 << 64 | h1, so h1 is the low half.
    let h1 = hash as u64;
    let mut encoded = URL_SAFE.encode(h1.to_be_bytes());
    encoded.truncate(4);
    encoded
}

/// What an NFLOG line records: the middle field of [`nflog_prefix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogTag {
    /// An ACL's decision, by its bucket.
    Acl(Bucket),
    /// The PU's final drop of a new connection that no rule accepted.
    DefaultNew,
    /// The PU's final drop of any other packet.
    DefaultOther,
}

impl LogTag {
    /// `accept`, `reject`, with `-oc` (observe-continue: logged as if it
    /// applied, not applied) or `-oa` (observe-apply: logged and applied);
    /// `default` and `default-other` for the final drop.
    pub fn as_str(self) -> &'static str {
        match self {
            LogTag::Acl(Bucket::RejectObserveContinue) => "reject-oc",
            LogTag::Acl(Bucket::Reject) => "reject",
            LogTag::Acl(Bucket::RejectObserveApply) => "reject-oa",
            LogTag::Acl(Bucket::AcceptObserveContinue) => "accept-oc",
            LogTag::Acl(Bucket::Accept) => "accept",
            LogTag::Acl(Bucket::AcceptObserveApply) => "accept-oa",
            LogTag::DefaultNew => "default",
            LogTag::DefaultOther => "default-other",
        }
    }
}

/// The NFLOG prefix of a PU's log rule: `<short>:<tag>:<policy id>`, e.g.
/// `pu19gtV:accept:web-to-api`; the policy is empty for the final drop.
/// Every part is a validated token (`A-Z a-z 0-9 _ . -` and the `:`
/// separators), so the prefix needs no quoting in a restore file. The
/// whole must fit [`MAX_NFLOG_PREFIX_LEN`]: a policy id too long for the
/// room left is cut, and `~` (which no id contains) plus the id's 24-bit
/// [hash tag](hash_tag) mark the cut, so two long ids with the same
/// beginning still log apart.
pub fn nflog_prefix(short: &ShortName, tag: LogTag, policy: Option<&PolicyId>) -> String {
    let head = format!("{short}:{}:", tag.as_str());
    let policy = policy.map_or("", PolicyId::as_str);
    let room = MAX_NFLOG_PREFIX_LEN - head.len();
    if policy.len() <= room {
        format!("{head}{policy}")
    } else {
        // PolicyId is ASCII, so any byte index is a character boundary.
        let kept = &policy[..room - 5];
        format!("{head}{kept}~{}", hash_tag(policy))
    }
}

/// How many salts [`NameRegistry::assign`] tries before giving up. Each
/// try fails only if its name is taken, with odds of (PUs sharing the
/// first four id characters) / 2^24, so this bound is never reached in
/// practice; it exists so that the loop provably ends.
const MAX_SALT: u32 = 1023;

/// Why no name could be handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamingError {
    #[error("no free short name for PU {id:?} after {} attempts", MAX_SALT + 1)]
    Exhausted { id: PuId },
}

/// Hands out the [`ShortName`] of each live PU and keeps them unique.
///
/// The rule: an id gets the seed's short form (salt 0) unless another live
/// id holds it; then it takes the first free salted form, salt 1, 2, ….
/// So the first of two colliding ids keeps the seed's name, the later one
/// gets a different name, an id asks again and gets back the name it
/// holds, and [`release`](Self::release) frees a name for reuse. Names
/// depend on the order ids arrive; that is safe while `run` removes every
/// leftover object at start-up, and has to be revisited with
/// adopt-and-reconcile.
#[derive(Debug, Default)]
pub struct NameRegistry {
    by_id: HashMap<PuId, ShortName>,
    by_name: HashMap<ShortName, PuId>,
}

impl NameRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The name `id` holds, or a new unique one.
    pub fn assign(&mut self, id: &PuId) -> Result<ShortName, NamingError> {
        if let Some(name) = self.by_id.get(id) {
            return Ok(name.clone());
        }
        let name = (0..=MAX_SALT)
            .map(|salt| short_form(id, salt))
            .find(|name| !self.by_name.contains_key(name))
            .ok_or_else(|| NamingError::Exhausted { id: id.clone() })?;
        self.by_id.insert(id.clone(), name.clone());
        self.by_name.insert(name.clone(), id.clone());
        Ok(name)
    }

    /// The name `id` holds, if any.
    pub fn get(&self, id: &PuId) -> Option<&ShortName> {
        self.by_id.get(id)
    }

    /// Frees the name of `id` (after its objects are gone); returns it.
    pub fn release(&mut self, id: &PuId) -> Option<ShortName> {
        let name = self.by_id.remove(id)?;
        self.by_name.remove(&name);
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> PuId {
        PuId::new(text).unwrap()
    }

    #[test]
    fn seed_vectors() {
        let pu1 = short_form(&id("pu1"), 0);
        assert_eq!(
            set_name(IpFamily::V4, "ProcPort-", &pu1),
            "TRI-v4-ProcPort-pu19gtV"
        );
        assert_eq!(
            PortSet::Process.name(IpFamily::V4, &pu1),
            "TRI-v4-ProcPort-pu19gtV"
        );
        let web = short_form(&id("web-frontend-7d9f"), 0);
        assert_eq!(
            set_name(IpFamily::V6, PROXY_SET_PREFIX, &web),
            "TRI-v6-Proxy-web-D_vK"
        );
        assert_eq!(
            proxy_sets(IpFamily::V6, &web),
            ProxySets {
                destinations: "TRI-v6-Proxy-web-D_vK-dst".into(),
                server_ports: "TRI-v6-Proxy-web-D_vK-srv".into(),
            }
        );
    }

    #[test]
    fn a_fresh_registry_hands_out_the_seed_form() {
        let mut registry = NameRegistry::new();
        let name = registry.assign(&id("pu1")).unwrap();
        assert_eq!(name.as_str(), "pu19gtV");
        assert_eq!(
            pu_chains(&name, 1),
            ChainPair {
                app: "TRI-App-pu19gtV-1".to_owned(),
                net: "TRI-Net-pu19gtV-1".to_owned(),
            }
        );
    }

    #[test]
    fn global_names_are_the_seeds_and_within_limits() {
        let mut seen = std::collections::HashSet::new();
        for pair in GLOBAL_CHAINS {
            for chain in [pair.app, pair.net] {
                assert!(chain.starts_with(CHAIN_PREFIX) && chain.len() <= MAX_CHAIN_NAME_LEN);
                assert!(seen.insert(chain), "{chain} twice");
            }
        }
        assert_eq!(seen.len(), 14);
        let sets: Vec<_> = GlobalSet::ALL
            .iter()
            .map(|s| s.name(IpFamily::V6))
            .collect();
        assert_eq!(
            sets,
            ["TRI-v6-TargetTCP", "TRI-v6-TargetUDP", "TRI-v6-Excluded"]
        );
        assert_eq!(GlobalSet::Excluded.name(IpFamily::V4), "TRI-v4-Excluded");
    }

    #[test]
    fn longest_names_fit_the_kernel_limits() {
        let short = short_form(&id("abcdefgh"), 0);
        assert_eq!(short.as_str().len(), 8);
        let chains = pu_chains(&short, u32::MAX);
        assert!(chains.app.len() <= MAX_CHAIN_NAME_LEN, "{}", chains.app);
        assert!(chains.net.len() <= MAX_CHAIN_NAME_LEN, "{}", chains.net);
        for family in IpFamily::ALL {
            // The seed cut prefixes to 16 characters; ours never need it.
            let kinds = PortSet::ALL.map(PortSet::kind);
            for kind in kinds.into_iter().chain([PROXY_SET_PREFIX]) {
                assert!(family.set_prefix().len() + kind.len() <= 16, "{kind}");
            }
            let proxy = proxy_sets(family, &short);
            let mut names = vec![proxy.destinations, proxy.server_ports];
            names.extend(PortSet::ALL.map(|s| s.name(family, &short)));
            names.extend(GlobalSet::ALL.map(|s| s.name(family)));
            names.push(acl_set(family, &short, u8::MAX, Direction::Net, u16::MAX));
            for name in names {
                assert!(name.starts_with(family.set_prefix()), "{name}");
                assert!(name.len() <= MAX_SET_NAME_LEN, "{name}");
            }
        }
    }

    #[test]
    fn acl_sets_name_family_pu_version_side_and_index() {
        let pu1 = short_form(&id("pu1"), 0);
        assert_eq!(
            acl_set(IpFamily::V4, &pu1, 1, Direction::App, 0),
            "TRI-v4-Acl-pu19gtV-1a0"
        );
        let longest = acl_set(IpFamily::V6, &pu1, 255, Direction::Net, 65535);
        assert_eq!(longest, "TRI-v6-Acl-pu19gtV-255n65535");
        assert!(is_acl_set(&longest) && is_agent_set(&longest));
        assert!(!is_acl_set(&PortSet::Process.name(IpFamily::V4, &pu1)));
        assert!(!is_acl_set("Acl-x") && !is_agent_set("TRI-v5-Acl-x"));
        assert!(is_agent_chain(MAIN_CHAINS.app) && !is_agent_chain("OUTPUT"));
    }

    #[test]
    fn nflog_prefixes_fit_and_keep_long_policy_ids_apart() {
        let pu1 = short_form(&id("pu1"), 0);
        let policy = PolicyId::new("web-to-api").unwrap();
        assert_eq!(
            nflog_prefix(&pu1, LogTag::Acl(Bucket::Accept), Some(&policy)),
            "pu19gtV:accept:web-to-api"
        );
        assert_eq!(
            nflog_prefix(&pu1, LogTag::DefaultNew, None),
            "pu19gtV:default:"
        );
        // The longest short name and tag leave 40 characters for the id.
        let long = short_form(&id("abcdefgh"), 0);
        let tag = LogTag::DefaultOther;
        let fits = PolicyId::new("p".repeat(40)).unwrap();
        assert_eq!(
            nflog_prefix(&long, tag, Some(&fits)).len(),
            MAX_NFLOG_PREFIX_LEN
        );
        let a = PolicyId::new(format!("{}a", "p".repeat(63))).unwrap();
        let b = PolicyId::new(format!("{}b", "p".repeat(63))).unwrap();
        let (pa, pb) = (
            nflog_prefix(&long, tag, Some(&a)),
            nflog_prefix(&long, tag, Some(&b)),
        );
        assert_eq!(pa.len(), MAX_NFLOG_PREFIX_LEN);
        assert_eq!(pb.len(), MAX_NFLOG_PREFIX_LEN);
        assert_ne!(pa, pb);
        assert!(pa.starts_with(&format!("{long}:default-other:pppp")));
        assert!(pa.contains('~'));
    }

    #[test]
    fn short_ids_are_kept_whole() {
        let short = short_form(&id("ab"), 0);
        assert!(short.as_str().starts_with("ab"));
        assert_eq!(short.as_str().len(), 6);
    }

    /// Two different ids with the same seed short form. The ids share
    /// their first four characters, so only the 24 hash bits differ: by
    /// the birthday bound a pair turns up within a few thousand ids.
    fn colliding_ids() -> (PuId, PuId) {
        let mut seen = HashMap::new();
        (0u32..100_000)
            .find_map(|n| {
                let later = id(&format!("web-{n}"));
                seen.insert(short_form(&later, 0), later.clone())
                    .map(|first| (first, later))
            })
            .expect("24-bit hashes collide long before 100,000 ids")
    }

    #[test]
    fn colliding_ids_get_different_stable_names() {
        let (first, later) = colliding_ids();
        assert_ne!(first, later);
        assert_eq!(short_form(&first, 0), short_form(&later, 0));

        let mut registry = NameRegistry::new();
        let first_name = registry.assign(&first).unwrap();
        let later_name = registry.assign(&later).unwrap();
        assert_eq!(
            first_name,
            short_form(&first, 0),
            "the first keeps the seed's form"
        );
        assert_ne!(later_name, first_name);
        assert!(later_name.as_str().starts_with("web-"));
        assert_eq!(later_name.as_str().len(), 8);
        assert!(pu_chains(&later_name, 1).app.len() <= MAX_CHAIN_NAME_LEN);
        assert!(PortSet::Uid.name(IpFamily::V6, &later_name).len() <= MAX_SET_NAME_LEN);

        // Asking again gives the same answers, in any order.
        assert_eq!(registry.assign(&later).unwrap(), later_name);
        assert_eq!(registry.assign(&first).unwrap(), first_name);
        assert_eq!(registry.get(&later), Some(&later_name));

        // Releasing the first frees its name; the later one keeps its own.
        assert_eq!(registry.release(&first), Some(first_name.clone()));
        assert_eq!(registry.get(&first), None);
        assert_eq!(registry.assign(&later).unwrap(), later_name);
        assert_eq!(registry.release(&first), None);

        // In a registry where the later id comes first, it gets the seed's form.
        let mut other = NameRegistry::new();
        assert_eq!(other.assign(&later).unwrap(), first_name);
        assert_ne!(other.assign(&first).unwrap(), first_name);
    }
}
