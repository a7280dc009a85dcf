//! Port discovery: the listening ports of each linux-process and uid PU,
//! found in the socket table while it runs and kept in its port set (SPEC,
//! "port set add/remove"), so that incoming traffic to a port the PU starts
//! listening on meets the PU's network policy.
//!
//! Every `[ports] discover_interval_ms` the daemon has the owner thread run
//! one round ([`Discovery::round`]): one `sock_diag` dump of the agent's
//! namespace — listening TCP sockets and bound, unconnected UDP sockets
//! ([`sockdiag::listening`]) — each socket given to the uid PU of its
//! owner if there is one, else to the linux-process PU whose cgroup tree
//! created it (SPEC's priority: the UID chain before the process chains,
//! as both datapaths judge a process), then the difference with the PUs'
//! run-time ports
//! applied through [`Datapath::remove_port`] (every PU's first: a port
//! that moved from one PU to another is free before it is taken) and
//! [`Datapath::add_port`]. The config's ports always stay; a listening
//! port the config lists is recorded as well, so a reload that drops it
//! from the config keeps it in the set while the PU listens there.
//!
//! A bound UDP socket counts unless its port is in the kernel's ephemeral
//! range (`net.ipv4.ip_local_port_range`): a client's unconnected socket
//! gets such a port by itself on its first `sendto`, and made a PU port,
//! the replies it waits for would be judged as incoming set-ups (the eBPF
//! ingress judges every UDP datagram to a PU port). A UDP server bound
//! inside that range is not found; list its port in the config.
//!
//! Sockets name their cgroup by id; the PUs' cgroup trees are walked only
//! when a socket names a cgroup not seen before or the PUs changed, not in
//! every round. A uid PU given by user name is resolved as the eBPF
//! datapath resolves it ([`resolve_user`]), when the uid PUs change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::num::NonZeroU16;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tracing::{debug, error, info};

use crate::datapath::ebpf::resolve_user;
use crate::datapath::ports::{self, ListenPort, RuntimePorts};
use crate::datapath::revoke::{TCP, UDP};
use crate::datapath::{Datapath, sockdiag};
use crate::policy::{CgroupPath, Pu, PuId, PuKind, UserSpec};

/// The kernel's default ephemeral range, for when the sysctl cannot be
/// read.
const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

/// Above this many remembered cgroups (mostly of no PU), the record is
/// rebuilt from scratch: cgroups come and go on a busy host.
const MAX_REMEMBERED_CGROUPS: usize = 65_536;

/// How the daemon runs discovery: every `interval`, with PU cgroup paths
/// relative to `cgroup2`.
#[derive(Debug, Clone)]
pub struct PortDiscovery {
    pub interval: Duration,
    pub cgroup2: PathBuf,
}

/// A listening socket as discovery sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    pub port: u16,
    /// The cgroup v2 id of the socket's creator.
    pub cgroup: Option<u64>,
    /// The socket's owner.
    pub uid: u32,
}

impl From<&sockdiag::Socket> for Listener {
    fn from(socket: &sockdiag::Socket) -> Self {
        Self {
            protocol: socket.protocol,
            port: socket.local.port(),
            cgroup: socket.cgroup,
            uid: socket.uid,
        }
    }
}

/// What one round changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<(PuId, ListenPort)>,
    pub removed: Vec<(PuId, ListenPort)>,
}

/// Discovery's memory between rounds.
#[derive(Debug)]
pub struct Discovery {
    cgroup2: PathBuf,
    /// Cgroup id → the PU whose cgroup tree holds it (`None`: no PU's).
    owners: HashMap<u64, Option<PuId>>,
    /// The linux-process PUs `owners` was built for.
    built_for: Vec<(PuId, CgroupPath)>,
    /// Uid → its uid PU.
    uids: HashMap<u32, PuId>,
    /// The uid PUs `uids` was resolved for.
    uids_for: Vec<(PuId, UserSpec)>,
    /// The datapath's last refusal for a PU's port, logged once (a port
    /// another PU holds is refused in every round until one lets go).
    complaints: BTreeMap<(PuId, ListenPort), String>,
}

impl Discovery {
    pub fn new(cgroup2: PathBuf) -> Self {
        Self {
            cgroup2,
            owners: HashMap::new(),
            built_for: Vec::new(),
            uids: HashMap::new(),
            uids_for: Vec::new(),
            complaints: BTreeMap::new(),
        }
    }

    /// One round against the kernel: lists the listening sockets (in the
    /// calling thread's network namespace, the agent's), then applies the
    /// difference for `pus` (the PUs in force) to `datapath`.
    pub fn round(&mut self, datapath: &mut dyn Datapath, pus: &[Pu]) -> Result<Changes> {
        if !pus.iter().any(discoverable) {
            return Ok(Changes::default());
        }
        let listeners: Vec<Listener> = sockdiag::listening()
            .context("listing the listening sockets (sock_diag)")?
            .iter()
            .map(Listener::from)
            .collect();
        let found = self.found(
            pus,
            &listeners,
            ephemeral_range(),
            sockdiag::cgroup_tree_ids,
            resolve_user,
        );
        Ok(self.apply(datapath, pus, &found))
    }

    /// Maps the uids of the uid PUs of `pus` to them, if those changed;
    /// `resolve` gives a user's uid. A user that does not resolve (gone
    /// since the datapath resolved it) is logged, and its PU finds no
    /// ports until the PUs change.
    fn resolve_uids(&mut self, pus: &[Pu], resolve: impl Fn(&UserSpec) -> Result<u32>) {
        let uid_pus: Vec<(PuId, UserSpec)> = pus
            .iter()
            .filter_map(|pu| match &pu.kind {
                PuKind::Uid { user } => Some((pu.id.clone(), user.clone())),
                _ => None,
            })
            .collect();
        if uid_pus == self.uids_for {
            return;
        }
        self.uids.clear();
        for (id, user) in &uid_pus {
            match resolve(user) {
                Ok(uid) => {
                    self.uids.insert(uid, id.clone());
                }
                Err(e) => error!(pu = %id, "no port discovery for the uid PU: {e:#}"),
            }
        }
        self.uids_for = uid_pus;
    }

    /// The listening ports of each discoverable PU of `pus`, from
    /// `listeners`: a listener is its owner's uid PU's, else its cgroup's
    /// PU's. `tree` lists the cgroup ids of a cgroup directory and every
    /// one below it; `resolve` gives a user's uid.
    fn found(
        &mut self,
        pus: &[Pu],
        listeners: &[Listener],
        ephemeral: RangeInclusive<u16>,
        tree: impl Fn(&Path) -> io::Result<BTreeSet<u64>>,
        resolve: impl Fn(&UserSpec) -> Result<u32>,
    ) -> BTreeMap<PuId, RuntimePorts> {
        self.resolve_uids(pus, resolve);
        let targets: Vec<(PuId, CgroupPath)> = pus
            .iter()
            .filter_map(|pu| match &pu.kind {
                PuKind::LinuxProcess { cgroup } => Some((pu.id.clone(), cgroup.clone())),
                _ => None,
            })
            .collect();
        let unknown = |owners: &HashMap<u64, Option<PuId>>| {
            listeners
                .iter()
                .filter_map(|l| l.cgroup)
                .any(|id| !owners.contains_key(&id))
        };
        if targets != self.built_for
            || self.owners.len() > MAX_REMEMBERED_CGROUPS
            || unknown(&self.owners)
        {
            self.owners.clear();
            for (id, cgroup) in &targets {
                match tree(&self.cgroup2.join(cgroup.as_path())) {
                    Ok(ids) => {
                        for cgroup_id in ids {
                            self.owners.insert(cgroup_id, Some(id.clone()));
                        }
                    }
                    // Gone, say, before the config says so: it has no
                    // sockets either.
                    Err(e) => debug!(pu = %id, "listing the PU's cgroups failed: {e}"),
                }
            }
            for cgroup_id in listeners.iter().filter_map(|l| l.cgroup) {
                self.owners.entry(cgroup_id).or_insert(None);
            }
            self.built_for = targets;
        }
        let mut found: BTreeMap<PuId, RuntimePorts> = BTreeMap::new();
        for listener in listeners {
            let owner = self.uids.get(&listener.uid).or_else(|| {
                listener
                    .cgroup
                    .and_then(|id| self.owners.get(&id))
                    .and_then(Option::as_ref)
            });
            if let (Some(owner), Some(port)) = (owner, listen_port(listener, &ephemeral)) {
                found.entry(owner.clone()).or_default().insert(port);
            }
        }
        found
    }

    /// Makes each discoverable PU's run-time ports what `found` says.
    fn apply(
        &mut self,
        datapath: &mut dyn Datapath,
        pus: &[Pu],
        found: &BTreeMap<PuId, RuntimePorts>,
    ) -> Changes {
        let none = RuntimePorts::new();
        let wanted = |pu: &Pu| found.get(&pu.id).unwrap_or(&none);
        let mut changes = Changes::default();
        let pus: Vec<&Pu> = pus.iter().filter(|pu| discoverable(pu)).collect();
        for pu in &pus {
            let now = datapath.runtime_ports(&pu.id);
            for &port in now.difference(wanted(pu)) {
                match datapath.remove_port(&pu.id, port) {
                    Ok(()) => {
                        self.complaints.remove(&(pu.id.clone(), port));
                        match ports::configured(pu, port) {
                            true => {
                                debug!(pu = %pu.id, %port, "configured port no longer listened on")
                            }
                            false => {
                                info!(pu = %pu.id, %port, "port no longer listened on: out of the PU's port set")
                            }
                        }
                        changes.removed.push((pu.id.clone(), port));
                    }
                    Err(e) => self.complain(&pu.id, port, "removing", &e),
                }
            }
        }
        for pu in &pus {
            let now = datapath.runtime_ports(&pu.id);
            for &port in wanted(pu).difference(&now) {
                match datapath.add_port(&pu.id, port) {
                    Ok(()) => {
                        self.complaints.remove(&(pu.id.clone(), port));
                        match ports::configured(pu, port) {
                            true => debug!(pu = %pu.id, %port, "configured port listened on"),
                            false => {
                                info!(pu = %pu.id, %port, "port listened on: in the PU's port set")
                            }
                        }
                        changes.added.push((pu.id.clone(), port));
                    }
                    Err(e) => self.complain(&pu.id, port, "adding", &e),
                }
            }
        }
        // A complaint about a port neither listened on nor held is over.
        self.complaints.retain(|(id, port), _| {
            found.get(id).is_some_and(|f| f.contains(port))
                || datapath.runtime_ports(id).contains(port)
        });
        changes
    }

    /// Logs a refusal, unless the same one was logged before.
    fn complain(&mut self, id: &PuId, port: ListenPort, doing: &str, e: &dyn std::fmt::Display) {
        let message = format!("{doing} the listening port failed: {e}");
        let key = (id.clone(), port);
        if self.complaints.get(&key) != Some(&message) {
            error!(pu = %id, %port, "{message}");
            self.complaints.insert(key, message);
        }
    }
}

/// The PUs whose ports discovery finds: linux-process PUs, by cgroup, and
/// uid PUs, by owner.
fn discoverable(pu: &Pu) -> bool {
    matches!(pu.kind, PuKind::LinuxProcess { .. } | PuKind::Uid { .. })
}

/// The port a listener makes a PU port, if any (see the module docs for
/// UDP).
fn listen_port(listener: &Listener, ephemeral: &RangeInclusive<u16>) -> Option<ListenPort> {
    let port = NonZeroU16::new(listener.port)?;
    match listener.protocol {
        TCP => Some(ListenPort::tcp(port)),
        UDP if !ephemeral.contains(&port.get()) => Some(ListenPort::udp(port)),
        _ => None,
    }
}

/// `net.ipv4.ip_local_port_range` of the calling thread's network
/// namespace (IPv6 uses it too).
fn ephemeral_range() -> RangeInclusive<u16> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let parsed = std::fs::read_to_string(path).ok().and_then(|text| {
        let mut bounds = text.split_whitespace().map(str::parse::<u16>);
        match (bounds.next(), bounds.next()) {
            (Some(Ok(low)), Some(Ok(high))) if low <= high => Some(low..=high),
            _ => None,
        }
    });
    parsed.unwrap_or_else(|| {
        debug!("{path} unreadable: taking the kernel's default ephemeral ports");
        DEFAULT_EPHEMERAL
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::enforcement::fake::FakeDatapath;
    use crate::policy::Configuration;

    const PUS: &str = r#"
        mode = "local-server"
        [[pus]]
        id = "web"
        kind = "linux-process"
        cgroup = "web"
        tcp_ports = [80]
        [[pus]]
        id = "db"
        kind = "linux-process"
        cgroup = "db"
        [[pus]]
        id = "u"
        kind = "uid"
        uid = 1000
        [[pus]]
        id = "named"
        kind = "uid"
        uid = "www-data"
        [[pus]]
        id = "nobody-here"
        kind = "uid"
        uid = "gone"
    "#;

    fn pus() -> Vec<Pu> {
        Configuration::from_toml_str(PUS).unwrap().pus
    }

    fn port(p: u16) -> NonZeroU16 {
        NonZeroU16::new(p).unwrap()
    }

    /// A TCP listener of root (no uid PU's) in `cgroup`.
    fn tcp(p: u16, cgroup: u64) -> Listener {
        Listener {
            protocol: TCP,
            port: p,
            cgroup: Some(cgroup),
            uid: 0,
        }
    }

    fn udp(p: u16, cgroup: u64) -> Listener {
        Listener {
            protocol: UDP,
            ..tcp(p, cgroup)
        }
    }

    /// The user database: `www-data` is 33; no other name resolves.
    fn users(user: &UserSpec) -> Result<u32> {
        match user {
            UserSpec::Id(uid) => Ok(*uid),
            UserSpec::Name(name) if name.as_str() == "www-data" => Ok(33),
            UserSpec::Name(name) => anyhow::bail!("no user {}", name.as_str()),
        }
    }

    /// Cgroups `web` (1, with 11 below it) and `db` (2); every other
    /// directory is missing.
    fn tree(dir: &Path) -> io::Result<BTreeSet<u64>> {
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("web") => Ok([1, 11].into()),
            Some("db") => Ok([2].into()),
            _ => Err(io::ErrorKind::NotFound.into()),
        }
    }

    #[test]
    fn listeners_go_to_the_pu_of_their_cgroup_tree() {
        let mut d = Discovery::new("/cg".into());
        let listeners = [
            tcp(8080, 11),
            udp(5353, 1),
            // Ephemeral: a client's socket.
            udp(40000, 1),
            tcp(5432, 2),
            // No PU's cgroup, or none known.
            tcp(22, 99),
            Listener {
                cgroup: None,
                ..tcp(23, 0)
            },
        ];
        let found = d.found(&pus(), &listeners, DEFAULT_EPHEMERAL, tree, users);
        let web: RuntimePorts = [ListenPort::tcp(port(8080)), ListenPort::udp(port(5353))].into();
        let db: RuntimePorts = [ListenPort::tcp(port(5432))].into();
        let expected: BTreeMap<PuId, RuntimePorts> = [
            (PuId::new("web").unwrap(), web),
            (PuId::new("db").unwrap(), db),
        ]
        .into();
        assert_eq!(found, expected);
        assert_eq!(d.owners.get(&99), Some(&None), "remembered as no PU's");
    }

    #[test]
    fn a_listener_of_a_uid_pus_user_is_that_pus_before_its_cgroups() {
        let mut d = Discovery::new("/cg".into());
        let as_user = |listener: Listener, uid| Listener { uid, ..listener };
        let listeners = [
            // In no PU's cgroup, or in none known.
            as_user(tcp(8080, 99), 1000),
            Listener {
                cgroup: None,
                ..as_user(tcp(8081, 0), 1000)
            },
            // In web's cgroup tree: the uid PU first (SPEC's priority).
            as_user(udp(5353, 11), 1000),
            // By user name.
            as_user(tcp(8443, 2), 33),
            // A user of no PU: its cgroup's.
            as_user(tcp(5432, 2), 34),
            // Root in web's cgroup.
            tcp(80, 1),
        ];
        let found = d.found(&pus(), &listeners, DEFAULT_EPHEMERAL, tree, users);
        let id = |id: &str| PuId::new(id).unwrap();
        let expected: BTreeMap<PuId, RuntimePorts> = [
            (
                id("u"),
                [
                    ListenPort::tcp(port(8080)),
                    ListenPort::tcp(port(8081)),
                    ListenPort::udp(port(5353)),
                ]
                .into(),
            ),
            (id("named"), [ListenPort::tcp(port(8443))].into()),
            (id("db"), [ListenPort::tcp(port(5432))].into()),
            (id("web"), [ListenPort::tcp(port(80))].into()),
        ]
        .into();
        assert_eq!(found, expected);
        // A user that does not resolve leaves its PU without ports, and
        // is looked up again only when the uid PUs change.
        assert_eq!(d.uids.len(), 2);
        let lookups = std::cell::Cell::new(0);
        let counting = |user: &UserSpec| {
            lookups.set(lookups.get() + 1);
            users(user)
        };
        d.found(&pus(), &listeners, DEFAULT_EPHEMERAL, tree, counting);
        assert_eq!(lookups.get(), 0, "the same uid PUs");
        d.found(&pus()[..3], &listeners, DEFAULT_EPHEMERAL, tree, counting);
        assert_eq!(lookups.get(), 1, "the uid PUs changed");
        let found = d.found(&pus()[..3], &listeners, DEFAULT_EPHEMERAL, tree, counting);
        assert_eq!(found[&id("u")].len(), 3);
        assert!(!found.contains_key(&id("named")), "no longer a PU");
        assert_eq!(found[&id("db")].len(), 2, "8443 is its cgroup's again");
    }

    #[test]
    fn cgroup_trees_are_walked_again_only_for_news() {
        let mut d = Discovery::new("/cg".into());
        let walks = std::cell::Cell::new(0);
        let counting = |dir: &Path| {
            walks.set(walks.get() + 1);
            tree(dir)
        };
        let listeners = [tcp(8080, 1), tcp(22, 99)];
        d.found(&pus(), &listeners, DEFAULT_EPHEMERAL, counting, users);
        assert_eq!(walks.get(), 2, "web and db");
        d.found(&pus(), &listeners, DEFAULT_EPHEMERAL, counting, users);
        assert_eq!(walks.get(), 2, "nothing new");
        d.found(&pus(), &[tcp(8081, 12)], DEFAULT_EPHEMERAL, counting, users);
        assert_eq!(walks.get(), 4, "a cgroup not seen before");
        d.found(
            &pus()[..1],
            &[tcp(8081, 12)],
            DEFAULT_EPHEMERAL,
            counting,
            users,
        );
        assert_eq!(walks.get(), 5, "the PUs changed");
    }

    #[test]
    fn the_difference_is_applied_removals_first_and_refusals_logged_once() {
        let pus = pus();
        let fake = FakeDatapath::default();
        let mut dp = fake.clone();
        let mut d = Discovery::new("/cg".into());
        let (web, db) = (pus[0].id.clone(), pus[1].id.clone());
        let set = |ports: &[ListenPort]| -> RuntimePorts { ports.iter().copied().collect() };
        let (p80, p8080, p9090) = (
            ListenPort::tcp(port(80)),
            ListenPort::tcp(port(8080)),
            ListenPort::tcp(port(9090)),
        );
        let found = [(web.clone(), set(&[p80, p8080]))].into();
        let changes = d.apply(&mut dp, &pus, &found);
        assert_eq!(changes.added, [(web.clone(), p80), (web.clone(), p8080)]);
        assert_eq!(
            fake.calls(),
            ["add-port web 80/tcp", "add-port web 8080/tcp"]
        );

        // 8080 moves from web to db; db's 9090 is refused.
        fake.log.lock().unwrap().clear();
        fake.fail_on("add-port db 9090");
        let found = [
            (web.clone(), set(&[p80])),
            (db.clone(), set(&[p8080, p9090])),
        ]
        .into();
        let changes = d.apply(&mut dp, &pus, &found);
        assert_eq!(changes.removed, [(web.clone(), p8080)]);
        assert_eq!(changes.added, [(db.clone(), p8080)]);
        assert_eq!(
            fake.calls(),
            [
                "remove-port web 8080/tcp",
                "add-port db 8080/tcp",
                "add-port db 9090/tcp"
            ]
        );
        assert!(d.complaints.contains_key(&(db.clone(), p9090)));
        // The next round tries again (and would not log again).
        let again = d.apply(&mut dp, &pus, &found);
        assert_eq!(again, Changes::default());
        assert_eq!(d.complaints.len(), 1);
        // Once the port is gone, so is the complaint.
        let found = [(web.clone(), set(&[p80])), (db.clone(), set(&[p8080]))].into();
        d.apply(&mut dp, &pus, &found);
        assert!(d.complaints.is_empty());
        assert_eq!(dp.runtime_ports(&web), set(&[p80]));
        assert_eq!(dp.runtime_ports(&db), set(&[p8080]));
    }

    #[test]
    fn udp_ports_in_the_ephemeral_range_are_clients() {
        let range = 32768..=60999;
        assert_eq!(
            listen_port(&udp(32767, 1), &range),
            Some(ListenPort::udp(port(32767)))
        );
        assert_eq!(listen_port(&udp(32768, 1), &range), None);
        assert_eq!(
            listen_port(&tcp(40000, 1), &range),
            Some(ListenPort::tcp(port(40000)))
        );
        assert_eq!(listen_port(&tcp(0, 1), &range), None);
        let range = ephemeral_range();
        assert!(range.start() <= range.end());
    }
}
