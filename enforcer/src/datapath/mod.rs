//! The datapath: where policy becomes kernel state.
//!
//! [`Datapath`] carries the seed's operations; two implementations give
//! the same observable behaviour (SPEC, "The two datapaths"):
//! - `iptables`: the fallback — ipsets and `TRI-` chains applied with
//!   `iptables-restore --noflush` / `ipset restore`, one commit per change;
//! - `ebpf`: cgroup and TC programs that classify into mark bits
//!   ([`enforcer_common::marks`]) and look up LPM tries and hash maps, plus
//!   a fixed handful of netfilter rules for conntrack state and NFQUEUE.
//!
//! Both trap the same packets ([`handshake`]: a TCP connection's SYN,
//! SYN-ACK and first ACK with a target network, a UDP flow's first
//! datagram, and the global traps) to the same NFQUEUE numbers
//! ([`queues`]), and honour the same verdict contract (see
//! [`crate::trap`]): the consumer decides a connection by setting the kind
//! [`Kind::Authorised`] in a packet's mark and returning NF_REPEAT; the
//! first rule each datapath puts on the path saves that kind into the
//! connection mark and accepts the packet, and a later one accepts every
//! packet of a connection whose mark carries it — but for a SYN-ACK — so
//! no later packet of the connection is queued. A packet the consumer lets
//! through undecided (a SYN, a SYN-ACK) gets NF_ACCEPT.
//!
//! An `update` also cuts the PU's connections that only the old policy
//! allowed, outgoing and incoming ([`revoke`] decides which; [`sockdiag`]
//! aborts sockets,
//! [`conntrack`] names the flows the iptables datapath forgets). Removing
//! a UDP target network makes both datapaths forget its UDP flows
//! ([`conntrack::no_longer_udp_target`]), so they are judged again.
//! A PU's listening ports may change while it runs ([`ports`]:
//! [`Datapath::add_port`] and [`Datapath::remove_port`]).
//! A linux-process PU in a net_cls (cgroup v1) cgroup is recognised by
//! the class id the iptables datapath gives it ([`netcls`]).
//! [`fault`] is the test-only hook that makes an operation's last kernel
//! batch fail.
//!
//! [`Kind::Authorised`]: enforcer_common::marks::Kind::Authorised

use std::{collections::BTreeMap, path::PathBuf};

use enforcer_common::marks::MarkLayout;
use serde::{Deserialize, Serialize};

use crate::policy::{Mode, NetworkSettings, Pu, PuId, QueueSettings};

/// Which datapath runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    Ebpf,
    Iptables,
}

impl std::fmt::Display for DatapathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatapathKind::Ebpf => "ebpf",
            DatapathKind::Iptables => "iptables",
        })
    }
}

/// What every datapath needs to know beyond the policy itself.
#[derive(Debug, Clone)]
pub struct DatapathSettings {
    pub mode: Mode,
    pub queues: QueueSettings,
    pub marks: MarkLayout,
    /// Where cgroup v2 is mounted; PU cgroup paths are relative to it
    /// unless `net_cls_mount` is set.
    pub cgroup2: PathBuf,
    /// The host scope (`[host] cgroup`, absolute): where the eBPF
    /// datapath attaches the programs of the PUs that are no cgroup's.
    pub host_scope: PathBuf,
    /// With `[cgroups]` resolved to v1: the net_cls mount PU cgroup paths
    /// are relative to, their traffic matched by class id ([`netcls`];
    /// iptables only, the eBPF datapath refuses such PUs).
    pub net_cls_mount: Option<PathBuf>,
    /// Where this instance records the cgroups it gave a class id, so
    /// that `run` and `cleanup` reset them after a crash ([`netcls`]).
    pub net_cls_record: PathBuf,
    /// This agent instance's own directory on bpffs (pins live there and
    /// nowhere else; `run` and `cleanup` remove it whole).
    pub pin_dir: PathBuf,
    /// The iptables flavour every restore and save goes through, on both
    /// datapaths ([`iptables::backend`]).
    pub iptables_backend: iptables::backend::Backend,
}

/// Packets a datapath counted, as the kernel counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketCounts {
    /// Sent to user space over NFQUEUE.
    pub trapped: u64,
    /// Accepted by an ACL.
    pub accepted: u64,
    /// Dropped or refused by an ACL or the final drop.
    pub dropped: u64,
}

impl std::ops::AddAssign for PacketCounts {
    fn add_assign(&mut self, other: Self) {
        self.trapped += other.trapped;
        self.accepted += other.accepted;
        self.dropped += other.dropped;
    }
}

/// Counters of the whole datapath and of each configured PU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub total: PacketCounts,
    pub per_pu: BTreeMap<String, PacketCounts>,
}

/// Errors of datapath operations. Each says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A map or set has no room: never a silent drop of entries.
    #[error("{what} is full ({capacity} entries)")]
    Full { what: String, capacity: usize },
    /// The operation names a PU the datapath does not have.
    #[error("no PU {0} is configured")]
    UnknownPu(PuId),
    /// A run-time port another PU holds already ([`ports::check_free`]):
    /// never taken over.
    #[error("port {port} of PU {pu} is PU {owner}'s already")]
    PortTaken {
        port: ports::ListenPort,
        pu: PuId,
        owner: PuId,
    },
    /// The PU kind or a policy feature is not supported by this datapath
    /// yet; refused before anything changed.
    #[error("{0} is not supported by the {1} datapath")]
    Unsupported(String, DatapathKind),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// The seed's operations (SPEC, "Operations"). Every mutating operation is
/// all or nothing: on error the previous state stays in force.
pub trait Datapath: Send {
    fn kind(&self) -> DatapathKind;

    /// Where to send flow records ([`crate::flowlog`]) of logged
    /// decisions, from the next `run` on. A datapath that cannot log
    /// ignores it.
    fn set_flow_log(&mut self, _sender: crate::flowlog::FlowSender) {}

    /// Removes whatever a previous instance left (it may have crashed),
    /// then creates the global sets/maps, chains/programs and the rules
    /// that steer traffic into them. Idempotent.
    fn run(&mut self) -> Result<()>;

    /// Applies the difference to the target TCP, target UDP and excluded
    /// networks; an empty target list means everything.
    fn set_target_networks(&mut self, networks: &NetworkSettings) -> Result<()>;

    /// Installs a new PU's policy under `version` and hooks it.
    fn configure(&mut self, version: u8, pu: &Pu) -> Result<()>;

    /// Installs several new PUs under `version` as one operation: every
    /// one, or (on error) none. What start-up uses; a datapath whose
    /// per-PU cost grows with what is installed does them in one batch.
    /// This default configures them in turn and deletes the ones done
    /// after a failure.
    fn configure_all(&mut self, version: u8, pus: &[Pu]) -> Result<()> {
        for (done, pu) in pus.iter().enumerate() {
            if let Err(e) = self.configure(version, pu) {
                for earlier in &pus[..done] {
                    if let Err(undo) = self.delete(version, earlier) {
                        tracing::error!(pu = %earlier.id, "undoing its configure failed: {undo}");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Replaces a PU's policy with no gap: `new` under `version`, then the
    /// old one (under `version ^ 1`) removed, in one commit. Then cuts the
    /// PU's connections that an ACL of the old policy accepted and the new
    /// policy refuses, its own and peers' to its listening ports
    /// ([`revoke`]); the new policy is in force by then, so
    /// a failure to cut is logged as an error, not returned.
    fn update(&mut self, version: u8, new: &Pu, old: &Pu) -> Result<()>;

    /// Best-effort, idempotent removal of whatever of the PU exists.
    fn delete(&mut self, version: u8, pu: &Pu) -> Result<()>;

    /// Removes every chain, rule, set, program, map and pin this datapath
    /// made, and nothing else.
    fn cleanup(&mut self) -> Result<()>;

    /// Adds `port` to PU `id`'s port set while it runs (SPEC, "port set
    /// add/remove"): incoming traffic to it is the PU's from now on, until
    /// [`Self::remove_port`]. The run-time ports outlive updates of the
    /// PU's policy ([`ports`] has the rules both datapaths share).
    /// Idempotent; a port another PU holds is refused
    /// ([`DatapathError::PortTaken`]), and so is any port of a host or
    /// container PU, which has no port set ([`DatapathError::Unsupported`]).
    fn add_port(&mut self, id: &PuId, port: ports::ListenPort) -> Result<()>;

    /// Takes a run-time `port` out of PU `id`'s port set, unless its
    /// config lists it. Idempotent.
    fn remove_port(&mut self, id: &PuId, port: ports::ListenPort) -> Result<()>;

    /// PU `id`'s run-time ports; none for an unknown PU.
    fn runtime_ports(&self, id: &PuId) -> ports::RuntimePorts;

    /// The kernel's counters, total and per PU.
    fn counters(&self) -> Result<Counters>;
}

pub mod conntrack;
pub mod ebpf;
pub mod fault;
pub mod handshake;
pub mod iptables;
pub mod netcls;
pub mod ports;
pub mod probe;
pub mod queues;
pub mod revoke;
pub mod sockdiag;

/// Opens the datapath of `kind`; nothing in the kernel changes before
/// [`Datapath::run`].
pub fn open(kind: DatapathKind, settings: DatapathSettings) -> Result<Box<dyn Datapath>> {
    Ok(match kind {
        DatapathKind::Ebpf => Box::new(ebpf::EbpfDatapath::new(settings)?),
        DatapathKind::Iptables => Box::new(iptables::IptablesDatapath::new(settings)?),
    })
}
