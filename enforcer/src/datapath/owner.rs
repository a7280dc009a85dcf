//! Which of the agent's namespace's sockets are one PU's: what an `update`
//! cuts ([`super::sockdiag::abort_sockets`]) and what tells a PU's flows
//! from another's (the iptables datapath's conntrack cut), one selector
//! for both datapaths and every PU kind.
//!
//! A socket is the PU's that judges it, in SPEC's priority — uid, process,
//! host-service, host — as both datapaths hand traffic to PUs (the
//! iptables global chains in that order, the eBPF `judging_pu`):
//! - uid: the socket's owner is the PU's user;
//! - linux-process: the socket was created in the PU's cgroup tree — the
//!   nearest PU cgroup above it, when PU cgroups nest (the eBPF hooks look
//!   up the nearest ancestor);
//! - host-service: the socket's local port is in the PU's port set (what
//!   it sends from there, and the connections peers make to it);
//! - host and container: every socket of the namespace no other PU takes.
//!
//! [`PuSockets`] is the selector as configured (pure, comparable: the
//! datapaths' tests see what they asked for); [`PuSockets::resolve`] reads
//! the host — the cgroup trees, the user database — once per cut, and
//! keeps only the other PUs that could take a socket from this one.
//!
//! A net_cls (cgroup v1) PU's sockets cannot be found: sock_diag names a
//! socket's cgroup v2 id only. Cutting for such a PU is refused, and so is
//! cutting for a PU below it in priority, which could otherwise take its
//! sockets for its own.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context as _, bail};

use super::ports::{self, RuntimePorts};
use super::revoke::{TCP, UDP};
use super::sockdiag::{Socket, cgroup_tree_ids};
use crate::policy::{PortRange, Pu, PuKind, UserSpec};

/// What finds one PU's sockets, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A uid PU: its user.
    Uid(UserSpec),
    /// A linux-process PU on cgroup v2: its cgroup's directory.
    Cgroup(PathBuf),
    /// A linux-process PU on cgroup v1 (net_cls): not found by cgroup.
    NetCls,
    /// A host-service PU: its TCP and UDP port sets.
    Ports {
        tcp: Vec<PortRange>,
        udp: Vec<PortRange>,
    },
    /// The host or container PU.
    Namespace,
}

impl Owner {
    /// The owner of `pu`'s sockets: with its run-time ports (a service's
    /// port set is both), its cgroup under the cgroup v2 mount `cgroup2`,
    /// or `net_cls` if that PU's cgroup is cgroup v1.
    pub fn of(pu: &Pu, runtime: &RuntimePorts, cgroup2: &std::path::Path, net_cls: bool) -> Self {
        match &pu.kind {
            PuKind::Uid { user } => Owner::Uid(user.clone()),
            PuKind::LinuxProcess { .. } if net_cls => Owner::NetCls,
            PuKind::LinuxProcess { cgroup } => Owner::Cgroup(cgroup2.join(cgroup.as_path())),
            PuKind::HostService => {
                let all = ports::with_runtime(pu, runtime);
                Owner::Ports {
                    tcp: all.tcp_ports,
                    udp: all.udp_ports,
                }
            }
            PuKind::Host | PuKind::Container => Owner::Namespace,
        }
    }

    /// SPEC's priority: lower is judged first.
    fn priority(&self) -> u8 {
        match self {
            Owner::Uid(_) => 0,
            Owner::Cgroup(_) | Owner::NetCls => 1,
            Owner::Ports { .. } => 2,
            Owner::Namespace => 3,
        }
    }
}

/// One PU's sockets among the other PUs', as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PuSockets {
    own: Owner,
    others: Vec<Owner>,
}

impl PuSockets {
    /// The sockets `own` finds that none of `others` (every other PU of
    /// the datapath) takes first.
    pub fn new(own: Owner, others: impl IntoIterator<Item = Owner>) -> Self {
        Self {
            own,
            others: others.into_iter().collect(),
        }
    }

    /// Reads the host: the claims that decide, per socket, whether it is
    /// this PU's. A user no longer known, a cgroup gone, have no sockets
    /// (for another PU: none to take); a net_cls PU that decides is an
    /// error.
    pub fn resolve(&self) -> anyhow::Result<Selector> {
        let own = match Claim::of(&self.own)? {
            Some(own) => own,
            None => return Ok(Selector::nothing()),
        };
        let mut others = Vec::new();
        for other in &self.others {
            let first = other.priority() < self.own.priority();
            // A PU cgroup nested in this one takes its subtree.
            let nested = matches!((&self.own, other), (Owner::Cgroup(own), Owner::Cgroup(dir))
                if dir != own && dir.starts_with(own));
            if !(first || nested) {
                continue;
            }
            match (other, Claim::of(other)?) {
                (Owner::NetCls, _) => bail!(
                    "a net_cls (cgroup v1) PU comes first in priority, and its sockets cannot \
                     be told apart (sock_diag names cgroup v2 ids only)"
                ),
                (_, Some(claim)) => others.push(claim),
                (_, None) => {}
            }
        }
        Ok(Selector {
            own: Some(own),
            others,
        })
    }
}

/// A resolved [`Owner`]: what a dumped socket is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Uid(u32),
    /// The ids of a cgroup and of every cgroup below it.
    Cgroup(BTreeSet<u64>),
    Ports {
        tcp: Vec<PortRange>,
        udp: Vec<PortRange>,
    },
    Namespace,
}

impl Claim {
    /// `None`: the owner has no sockets now (its user unknown, its cgroup
    /// gone). A net_cls owner is an error when it is this PU's own; the
    /// caller words it for another's.
    fn of(owner: &Owner) -> anyhow::Result<Option<Self>> {
        Ok(Some(match owner {
            Owner::Uid(user) => match super::ebpf::resolve_user(user) {
                Ok(uid) => Claim::Uid(uid),
                Err(e) => {
                    tracing::debug!("no sockets of user {user:?}: {e:#}");
                    return Ok(None);
                }
            },
            Owner::Cgroup(dir) if !dir.exists() => return Ok(None),
            Owner::Cgroup(dir) => Claim::Cgroup(
                cgroup_tree_ids(dir)
                    .with_context(|| format!("listing the cgroups under {}", dir.display()))?,
            ),
            Owner::NetCls => bail!(
                "a net_cls (cgroup v1) PU's sockets cannot be found (sock_diag names cgroup \
                 v2 ids only)"
            ),
            Owner::Ports { tcp, udp } => Claim::Ports {
                tcp: tcp.clone(),
                udp: udp.clone(),
            },
            Owner::Namespace => Claim::Namespace,
        }))
    }

    /// Does the claim cover `socket`?
    fn covers(&self, socket: &Socket) -> bool {
        match self {
            Claim::Uid(uid) => socket.uid == *uid,
            Claim::Cgroup(ids) => socket.cgroup.is_some_and(|id| ids.contains(&id)),
            Claim::Ports { tcp, udp } => {
                let ranges = match socket.protocol {
                    TCP => tcp,
                    UDP => udp,
                    _ => return false,
                };
                let port = socket.local.port();
                ranges.iter().any(|r| (r.start()..=r.end()).contains(&port))
            }
            Claim::Namespace => true,
        }
    }
}

/// Decides per socket whether it is the PU's ([`PuSockets::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// `None`: the PU has no sockets.
    own: Option<Claim>,
    /// The claims that come first: a socket one of them covers is not the
    /// PU's.
    others: Vec<Claim>,
}

impl Selector {
    /// The PU's own claim, and the claims that take sockets from it.
    pub fn new(own: Claim, first: Vec<Claim>) -> Self {
        Self {
            own: Some(own),
            others: first,
        }
    }

    /// No socket.
    fn nothing() -> Self {
        Self {
            own: None,
            others: Vec::new(),
        }
    }

    /// Is `socket` the PU's?
    pub fn owns(&self, socket: &Socket) -> bool {
        self.own.as_ref().is_some_and(|own| own.covers(socket))
            && !self.others.iter().any(|other| other.covers(socket))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;
    use crate::policy::{CgroupPath, PuId, UserName};

    fn range(port: u16) -> PortRange {
        PortRange::new(port, port).unwrap()
    }

    fn socket(protocol: u8, local_port: u16, uid: u32, cgroup: Option<u64>) -> Socket {
        Socket::fake(
            protocol,
            format!("10.0.0.1:{local_port}").parse().unwrap(),
            "10.2.0.2:7000".parse().unwrap(),
            uid,
            cgroup,
        )
    }

    /// A dumped socket of each kind a test here has: a uid PU's user's
    /// (1000), a process PU's cgroup (7, and 8 below it), a service port
    /// (8080/tcp), and one of nobody (root, cgroup 1, port 40000).
    fn sockets() -> [Socket; 5] {
        [
            socket(TCP, 40000, 1000, Some(1)),
            socket(TCP, 40000, 0, Some(7)),
            socket(TCP, 40000, 0, Some(8)),
            socket(TCP, 8080, 0, Some(1)),
            socket(TCP, 40000, 0, Some(1)),
        ]
    }

    fn owned(selector: &Selector) -> Vec<usize> {
        let all = sockets();
        (0..all.len()).filter(|&i| selector.owns(&all[i])).collect()
    }

    fn service() -> Claim {
        Claim::Ports {
            tcp: vec![range(8080)],
            udp: vec![],
        }
    }

    #[test]
    fn each_kind_finds_its_sockets() {
        assert_eq!(owned(&Selector::new(Claim::Uid(1000), vec![])), [0]);
        let cgroup = Claim::Cgroup([7, 8].into());
        assert_eq!(owned(&Selector::new(cgroup, vec![])), [1, 2]);
        assert_eq!(owned(&Selector::new(service(), vec![])), [3]);
        assert_eq!(
            owned(&Selector::new(Claim::Namespace, vec![])),
            [0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn the_host_pu_has_what_no_other_pu_takes() {
        let others = vec![Claim::Uid(1000), Claim::Cgroup([7, 8].into()), service()];
        assert_eq!(owned(&Selector::new(Claim::Namespace, others)), [4]);
    }

    #[test]
    fn a_uid_pu_comes_before_a_process_and_a_service() {
        let uid_in_cgroup = socket(TCP, 8080, 1000, Some(7));
        let process = Selector::new(Claim::Cgroup([7].into()), vec![Claim::Uid(1000)]);
        let on_port = Selector::new(service(), vec![Claim::Uid(1000)]);
        assert!(!process.owns(&uid_in_cgroup) && !on_port.owns(&uid_in_cgroup));
        assert!(Selector::new(Claim::Uid(1000), vec![]).owns(&uid_in_cgroup));
        // The port's protocol counts: a UDP socket on 8080 is not the
        // TCP service's.
        assert!(!Selector::new(service(), vec![]).owns(&socket(UDP, 8080, 0, None)));
    }

    fn pu(id: &str, kind: PuKind) -> Pu {
        Pu {
            id: PuId::new(id).unwrap(),
            kind,
            labels: Default::default(),
            tcp_ports: vec![range(8080)],
            udp_ports: vec![],
            application_acls: vec![],
            network_acls: vec![],
            proxy_port: None,
            dns_proxy_port: None,
            dependent_services: vec![],
            exposed_services: vec![],
        }
    }

    #[test]
    fn owners_are_read_from_the_pu_with_its_runtime_ports() {
        let root = std::path::Path::new("/cg");
        let none = RuntimePorts::new();
        let web = pu(
            "web",
            PuKind::LinuxProcess {
                cgroup: CgroupPath::new("a/web").unwrap(),
            },
        );
        assert_eq!(
            Owner::of(&web, &none, root, false),
            Owner::Cgroup("/cg/a/web".into())
        );
        assert_eq!(Owner::of(&web, &none, root, true), Owner::NetCls);
        let user = UserSpec::Name(UserName::new("alice").unwrap());
        let uid = pu("u", PuKind::Uid { user: user.clone() });
        assert_eq!(Owner::of(&uid, &none, root, false), Owner::Uid(user));
        let runtime: RuntimePorts = [ports::ListenPort::udp(53.try_into().unwrap())].into();
        assert_eq!(
            Owner::of(&pu("svc", PuKind::HostService), &runtime, root, false),
            Owner::Ports {
                tcp: vec![range(8080)],
                udp: vec![range(53)],
            }
        );
        for kind in [PuKind::Host, PuKind::Container] {
            assert_eq!(
                Owner::of(&pu("h", kind), &none, root, false),
                Owner::Namespace
            );
        }
    }

    #[test]
    fn only_the_pus_that_come_first_are_resolved() {
        // Nothing is read for these: no other PU decides for a uid PU, and
        // a process PU beside (not below) this one is never asked.
        let uid = PuSockets::new(
            Owner::Uid(UserSpec::Id(1000)),
            [Owner::NetCls, Owner::Cgroup("/nonexistent/x".into())],
        );
        assert_eq!(
            uid.resolve().unwrap(),
            Selector::new(Claim::Uid(1000), vec![])
        );
        let host = PuSockets::new(
            Owner::Namespace,
            [
                Owner::Uid(UserSpec::Id(1000)),
                Owner::Cgroup("/nonexistent/x".into()),
            ],
        );
        assert_eq!(
            host.resolve().unwrap(),
            Selector::new(Claim::Namespace, vec![Claim::Uid(1000)]),
            "a cgroup that is gone has no sockets to take"
        );
        // A net_cls PU that comes first could hold any socket: refused.
        let service = PuSockets::new(
            Owner::Ports {
                tcp: vec![],
                udp: vec![],
            },
            [Owner::NetCls],
        );
        assert!(service.resolve().is_err());
        assert!(PuSockets::new(Owner::NetCls, []).resolve().is_err());
    }

    #[test]
    fn a_nested_pu_cgroup_takes_its_subtree() {
        let dir = std::env::temp_dir().join(format!("enforcer-owner-{}", std::process::id()));
        let inner = dir.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
        let (outer_id, inner_id) = (ino(&dir), ino(&inner));
        let outer = PuSockets::new(
            Owner::Cgroup(dir.clone()),
            [
                Owner::Cgroup(inner.clone()),
                Owner::Cgroup("/elsewhere".into()),
            ],
        )
        .resolve()
        .unwrap();
        let inner_pu = PuSockets::new(Owner::Cgroup(inner.clone()), [Owner::Cgroup(dir.clone())])
            .resolve()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let in_outer = socket(TCP, 1, 0, Some(outer_id));
        let in_inner = socket(TCP, 1, 0, Some(inner_id));
        assert!(outer.owns(&in_outer) && !outer.owns(&in_inner));
        assert!(inner_pu.owns(&in_inner) && !inner_pu.owns(&in_outer));
    }

    #[test]
    fn a_pu_without_sockets_owns_none() {
        let gone = PuSockets::new(Owner::Cgroup("/nonexistent/web".into()), []);
        let selector = gone.resolve().unwrap();
        assert!(sockets().iter().all(|s| !selector.owns(s)));
    }
}
