//! Which PU a trapped packet belongs to, found in constant or logarithmic
//! time from what the packet carries — never by scanning the PUs.
//!
//! The packet's queue tells the direction ([`crate::datapath::queues::locate`]);
//! then, in the SPEC's priority order (global steering: UID chain, then
//! process, host-service and host chains):
//! - a packet of the PU's own sockets (application side) carries the
//!   owning socket's uid (`NFQA_UID`) → the uid PU; its socket's cgroup id
//!   (from the socket table, when the caller has it) → the linux-process PU;
//!   its source port → the host-service PU listening there;
//! - a packet for a PU (network side) is found by its destination port in
//!   the port sets of uid, linux-process and host-service PUs;
//! - otherwise the host PU (local-server), or the one container PU of a
//!   remote-container or sidecar agent.
//!
//! The index is built from the configuration and handed to the consumer;
//! with the identity handshake configured it also carries what the
//! handshake needs of each PU ([`PuIdentity`]: labels, identity policy,
//! ACLs for peers without a token) and the cgroup ids of the
//! linux-process PUs, which a connecting socket's cgroup (from
//! `sock_diag`) is looked up in.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use crate::datapath::queues::Direction;
use crate::identity::{IdentityPolicy, Labels};
use crate::policy::{Acl, IdentitySettings, Mode, PortRange, Pu, PuId, PuKind, UserSpec};

/// What the identity handshake needs of one PU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PuIdentity {
    /// What its tokens carry.
    pub labels: Labels,
    /// Who may reach it and whom it may reach, by identity.
    pub policy: IdentityPolicy,
    /// Peers without a token are judged by these, as external peers.
    pub application_acls: Vec<Acl>,
    pub network_acls: Vec<Acl>,
}

/// What a trapped packet tells about its PU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Key {
    pub direction: Option<Direction>,
    /// TCP (6) or UDP (17); other protocols have no ports.
    pub protocol: u8,
    /// The port on this host's side: the source port of an outgoing
    /// packet, the destination port of an incoming one.
    pub local_port: Option<u16>,
    /// The owning socket's uid (outgoing packets only).
    pub uid: Option<u32>,
    /// The owning socket's cgroup v2 id, when the caller looked it up.
    pub cgroup: Option<u64>,
}

/// Port ranges → PU, for one protocol and one PU kind. Ranges of one
/// kind do not overlap (a port belongs to one PU); if a configuration
/// gives two, the later start wins for the ports they share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortMap(BTreeMap<u16, (u16, PuId)>);

impl PortMap {
    fn insert(&mut self, range: &PortRange, id: &PuId) {
        self.0.insert(range.start(), (range.end(), id.clone()));
    }

    fn get(&self, port: u16) -> Option<&PuId> {
        let (_, (end, id)) = self.0.range(..=port).next_back()?;
        (port <= *end).then_some(id)
    }
}

/// Ports of one kind, by protocol: TCP then UDP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ports([PortMap; 2]);

impl Ports {
    fn add(&mut self, pu: &Pu) {
        for r in &pu.tcp_ports {
            self.0[0].insert(r, &pu.id);
        }
        for r in &pu.udp_ports {
            self.0[1].insert(r, &pu.id);
        }
    }

    fn get(&self, protocol: u8, port: u16) -> Option<&PuId> {
        match protocol {
            6 => self.0[0].get(port),
            17 => self.0[1].get(port),
            _ => None,
        }
    }
}

/// The lookup structure, built once per configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PuIndex {
    /// The host PU (local-server) or the container PU (other modes).
    fallback: Option<PuId>,
    uids: HashMap<u32, PuId>,
    cgroups: HashMap<u64, PuId>,
    uid_ports: Ports,
    process_ports: Ports,
    service_ports: Ports,
    /// Each PU's identity, when the handshake is configured.
    identities: HashMap<PuId, Arc<PuIdentity>>,
    /// The cgroup directory of each linux-process PU, for a cgroup
    /// created below one after the index was built.
    process_dirs: Vec<(PathBuf, PuId)>,
    /// Tells indexes apart: a fresh value for each one built and each
    /// change to its cgroups (what is cached about them goes stale).
    generation: u64,
}

/// Where [`PuIndex`] generations come from.
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl PuIndex {
    /// The index of `pus` as an agent in `mode` manages them. Uid PUs
    /// named by user name are found by their ports only until the name is
    /// resolved ([`Self::add_uid`]); linux-process PUs by their ports until
    /// their cgroup ids are added ([`Self::add_cgroup`]).
    pub fn new(mode: Mode, pus: &[Pu]) -> Self {
        let mut index = Self {
            generation: next_generation(),
            ..Self::default()
        };
        for pu in pus {
            match &pu.kind {
                PuKind::Container => {
                    if mode != Mode::LocalServer {
                        index.fallback = Some(pu.id.clone());
                    }
                }
                PuKind::Host => index.fallback = Some(pu.id.clone()),
                PuKind::Uid { user } => {
                    if let UserSpec::Id(uid) = user {
                        index.uids.insert(*uid, pu.id.clone());
                    }
                    index.uid_ports.add(pu);
                }
                PuKind::LinuxProcess { .. } => index.process_ports.add(pu),
                PuKind::HostService => index.service_ports.add(pu),
            }
        }
        index
    }

    /// A uid PU's resolved uid.
    pub fn add_uid(&mut self, uid: u32, id: PuId) {
        self.uids.insert(uid, id);
    }

    /// A linux-process PU's cgroup id (the inode of its cgroup v2 directory).
    pub fn add_cgroup(&mut self, cgroup: u64, id: PuId) {
        self.cgroups.insert(cgroup, id);
    }

    /// A linux-process PU's cgroup directory (under the cgroup v2 mount):
    /// its id and every id below it now, and the directory for cgroups
    /// made below it later ([`Self::cgroup_below`]).
    pub fn add_process_dir(&mut self, dir: PathBuf, id: PuId) -> std::io::Result<()> {
        let ids = crate::datapath::sockdiag::cgroup_tree_ids(&dir)?;
        for cgroup in ids {
            self.cgroups.insert(cgroup, id.clone());
        }
        self.process_dirs.push((dir, id));
        self.generation = next_generation();
        Ok(())
    }

    /// This index's generation: two indexes with one are the same.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether linux-process PUs are found by cgroup (so an outgoing
    /// packet's PU needs its socket's cgroup).
    pub fn has_process_cgroups(&self) -> bool {
        !self.process_dirs.is_empty() || !self.cgroups.is_empty()
    }

    pub fn knows_cgroup(&self, cgroup: u64) -> bool {
        self.cgroups.contains_key(&cgroup)
    }

    pub fn knows_uid(&self, uid: u32) -> bool {
        self.uids.contains_key(&uid)
    }

    /// The linux-process PU whose cgroup tree holds `cgroup` now, found
    /// by walking the PUs' directories: for a cgroup made after the index
    /// was built (both datapaths count sub-cgroups in, so must this).
    /// Slow; only for a cgroup the index does not know.
    pub fn cgroup_below(&self, cgroup: u64) -> Option<&PuId> {
        self.process_dirs.iter().find_map(|(dir, id)| {
            crate::datapath::sockdiag::cgroup_tree_ids(dir)
                .ok()
                .filter(|ids| ids.contains(&cgroup))
                .map(|_| id)
        })
    }

    /// Records what the handshake needs of each of `pus`.
    pub fn set_identities(&mut self, pus: &[Pu], settings: &IdentitySettings) {
        self.identities = pus
            .iter()
            .map(|pu| {
                let identity = PuIdentity {
                    labels: pu.labels.clone(),
                    policy: settings.policy(&pu.id).clone(),
                    application_acls: pu.application_acls.clone(),
                    network_acls: pu.network_acls.clone(),
                };
                (pu.id.clone(), Arc::new(identity))
            })
            .collect();
    }

    /// What the handshake needs of PU `id`; `None` for a PU the index
    /// has no identity of (treated as no labels, no rules, no ACLs).
    pub fn identity(&self, id: &PuId) -> Option<&Arc<PuIdentity>> {
        self.identities.get(id)
    }

    /// The PU of a packet, in the SPEC's priority order.
    pub fn find<'a>(&'a self, key: &Key) -> Option<&'a PuId> {
        self.find_specific(key).or(self.fallback.as_ref())
    }

    /// [`Self::find`] without the host or container PU that everything
    /// else falls to.
    pub fn find_specific<'a>(&'a self, key: &Key) -> Option<&'a PuId> {
        let port =
            |ports: &'a Ports| -> Option<&'a PuId> { ports.get(key.protocol, key.local_port?) };
        match key.direction {
            Some(Direction::App) => key
                .uid
                .and_then(|uid| self.uids.get(&uid))
                .or_else(|| key.cgroup.and_then(|c| self.cgroups.get(&c)))
                .or_else(|| port(&self.service_ports)),
            Some(Direction::Net) => port(&self.uid_ports)
                .or_else(|| port(&self.process_ports))
                .or_else(|| port(&self.service_ports)),
            None => None,
        }
    }

    /// The linux-process PU of a cgroup the index knows (its own or one
    /// that was below it when the index was built).
    pub fn process_pu_of_cgroup_known(&self, cgroup: u64) -> Option<&PuId> {
        self.cgroups.get(&cgroup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::CgroupPath;

    fn pu(id: &str, kind: PuKind, tcp: &[(u16, u16)], udp: &[(u16, u16)]) -> Pu {
        let ranges = |list: &[(u16, u16)]| {
            list.iter()
                .map(|&(a, b)| PortRange::new(a, b).unwrap())
                .collect()
        };
        Pu {
            id: PuId::new(id).unwrap(),
            kind,
            labels: Default::default(),
            tcp_ports: ranges(tcp),
            udp_ports: ranges(udp),
            application_acls: vec![],
            network_acls: vec![],
            proxy_port: None,
            dns_proxy_port: None,
            dependent_services: vec![],
            exposed_services: vec![],
        }
    }

    fn key(direction: Direction, protocol: u8, port: u16) -> Key {
        Key {
            direction: Some(direction),
            protocol,
            local_port: Some(port),
            ..Key::default()
        }
    }

    fn found(index: &PuIndex, key: Key) -> Option<&str> {
        index.find(&key).map(PuId::as_str)
    }

    #[test]
    fn local_server_finds_by_uid_cgroup_and_ports_then_the_host() {
        let process = PuKind::LinuxProcess {
            cgroup: CgroupPath::new("web").unwrap(),
        };
        let uid = PuKind::Uid {
            user: UserSpec::Id(1000),
        };
        let pus = [
            pu("web", process, &[(8080, 8080)], &[(5000, 5010)]),
            pu("alice", uid, &[(9000, 9000)], &[]),
            pu("dns", PuKind::HostService, &[], &[(53, 53)]),
            pu("host", PuKind::Host, &[], &[]),
        ];
        let mut index = PuIndex::new(Mode::LocalServer, &pus);
        use Direction::{App, Net};
        assert_eq!(found(&index, key(Net, 6, 8080)), Some("web"));
        assert_eq!(found(&index, key(Net, 17, 5005)), Some("web"));
        assert_eq!(found(&index, key(Net, 17, 5011)), Some("host"));
        assert_eq!(found(&index, key(Net, 6, 5005)), Some("host"), "TCP ≠ UDP");
        assert_eq!(found(&index, key(Net, 6, 9000)), Some("alice"));
        assert_eq!(found(&index, key(Net, 17, 53)), Some("dns"));
        // Outgoing: by the socket's uid, its cgroup, a service's source port.
        let mut out = key(App, 6, 40000);
        assert_eq!(found(&index, out), Some("host"));
        out.uid = Some(1000);
        assert_eq!(found(&index, out), Some("alice"));
        out.uid = Some(0);
        out.cgroup = Some(77);
        assert_eq!(found(&index, out), Some("host"));
        index.add_cgroup(77, PuId::new("web").unwrap());
        assert_eq!(found(&index, out), Some("web"));
        assert_eq!(found(&index, key(App, 17, 53)), Some("dns"));
        // A queue outside the layout has no direction: only the fallback.
        assert_eq!(found(&index, Key::default()), Some("host"));
    }

    #[test]
    fn a_container_agent_has_one_pu_and_no_host_fallback_otherwise() {
        let pus = [pu("c1", PuKind::Container, &[(80, 80)], &[])];
        let index = PuIndex::new(Mode::RemoteContainer, &pus);
        assert_eq!(found(&index, key(Direction::App, 6, 1234)), Some("c1"));
        let empty = PuIndex::new(Mode::LocalServer, &[]);
        assert_eq!(found(&empty, key(Direction::Net, 6, 80)), None);
    }

    #[test]
    fn port_ranges_are_found_by_their_bounds() {
        let mut map = PortMap::default();
        let id = |s: &str| PuId::new(s).unwrap();
        map.insert(&PortRange::new(100, 199).unwrap(), &id("a"));
        map.insert(&PortRange::new(300, 300).unwrap(), &id("b"));
        let at = |p| map.get(p).map(PuId::as_str);
        assert_eq!(
            [at(99), at(100), at(199), at(200), at(300), at(301)],
            [None, Some("a"), Some("a"), None, Some("b"), None]
        );
    }
}
