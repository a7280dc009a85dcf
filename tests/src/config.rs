//! Agent configs for kernel tests, built as values and written out as the
//! TOML the agent reads (the config file's shape: `enforcer::policy`'s
//! file module), so a test states only what it cares about and never
//! splices strings into TOML by hand.
//!
//! ```
//! use enforcer_tests::config::{Acl, Config, Pu};
//! let text = Config::local_server()
//!     .target_tcp(["10.1.0.0/24"])
//!     .pu(Pu::process("web", "enft1x1")
//!         .application_acl(Acl::accept("allow-peer", ["10.2.0.0/16"]).tcp([7000]).log()))
//!     .to_toml();
//! assert!(text.contains("policy_id = \"allow-peer\""));
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::cgroup::Cgroup;

/// A whole config file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    queues: Option<Queues>,
    #[serde(skip_serializing_if = "Option::is_none")]
    marks: Option<Marks>,
    networks: Networks,
    #[serde(skip_serializing_if = "Option::is_none")]
    flow_log: Option<FlowLog>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<Host>,
    cgroups: Option<Cgroups>,
    pus: Vec<Pu>,
}

/// `[identity]`: the agent's key and the public keys it trusts.
#[derive(Debug, Clone, Default, Serialize)]
struct Identity {
    key: String,
    trusted: Vec<String>,
}

/// One identity policy rule (`[[pus.network_policy]]` with `from`,
/// `[[pus.application_policy]]` with `to`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdentityRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<Port>,
    policy_id: String,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Host {
    cgroup: String,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Networks {
    target_tcp: Vec<String>,
    target_udp: Vec<String>,
    excluded: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Queues {
    fail_mode: String,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Marks {
    shift: u32,
}

#[derive(Debug, Clone, Default, Serialize)]
struct FlowLog {
    output: String,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Cgroups {
    version: String,
    net_cls_mount: String,
}

/// One PU.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pu {
    id: String,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tcp_ports: Vec<Port>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    udp_ports: Vec<Port>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    application_acls: Vec<Acl>,
    network_acls: Vec<Acl>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    network_policy: Vec<IdentityRule>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    application_policy: Vec<IdentityRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns_proxy_port: Option<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    exposed_services: Vec<Port>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    dependent_services: Vec<DependentService>,
}

/// A service a PU depends on: its connections there go to its proxy.
#[derive(Debug, Clone, Default, Serialize)]
struct DependentService {
    address: String,
    ports: Vec<Port>,
}

/// One ACL.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Acl {
    networks: Vec<String>,
    protocols: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<Port>,
    action: String,
    log: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    observe: Option<String>,
    policy_id: String,
}

/// A port or an inclusive range of ports, as the file writes them: `443`,
/// `"9000:9100"`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum Port {
    One(u16),
    Range(String),
}

impl From<u16> for Port {
    fn from(port: u16) -> Self {
        Port::One(port)
    }
}

impl Port {
    /// `first` to `last`, both included.
    pub fn range(first: u16, last: u16) -> Self {
        Port::Range(format!("{first}:{last}"))
    }
}

/// No ports given: an ACL of every port.
pub const EVERY_PORT: [u16; 0] = [];

/// A test cgroup's path relative to its cgroup mount (v2, or a test's net_cls), as a config
/// names it. Test cgroups are made under the mount ([`Cgroup::new`]) or
/// below one another ([`Cgroup::child`]), each named with the harness's
/// [`NAME_PREFIX`](crate::NAME_PREFIX): the path below the mount is the
/// run of such names at the end of the cgroup's path.
fn relative_cgroup(cgroup: &Cgroup) -> String {
    let path = cgroup.path();
    let prefix = crate::NAME_PREFIX;
    let below: Vec<String> = path
        .ancestors()
        .map_while(|dir| {
            let name = dir.file_name()?.to_string_lossy();
            // A test's cgroups, up to the mount's root (whose parent is
            // no cgroup: a test-made net_cls mount carries the prefix too).
            let in_mount = dir.parent()?.join("cgroup.procs").exists();
            (name.starts_with(prefix) && in_mount).then(|| name.into_owned())
        })
        .collect();
    below.into_iter().rev().collect::<Vec<_>>().join("/")
}

fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Vec<String> {
    items.into_iter().map(Into::into).collect()
}

impl Config {
    /// `mode = "local-server"`, no networks, no PUs.
    pub fn local_server() -> Self {
        Self::in_mode("local-server")
    }

    /// `mode = "remote-container"`: the agent runs inside the container's
    /// network namespace, for its one container PU.
    pub fn remote_container() -> Self {
        Self::in_mode("remote-container")
    }

    /// `mode = "sidecar"`: as remote-container, and DNS is let through.
    pub fn sidecar() -> Self {
        Self::in_mode("sidecar")
    }

    fn in_mode(mode: &str) -> Self {
        Self {
            mode: mode.into(),
            ..Self::default()
        }
    }

    /// `[host] cgroup`: the eBPF datapath's host scope, a test's own
    /// cgroup (relative to the cgroup v2 mount) so that its programs never
    /// sit on the machine's root cgroup.
    pub fn host_scope(self, cgroup: &Cgroup) -> Self {
        self.host_scope_at(&relative_cgroup(cgroup))
    }

    /// `[host] cgroup` at `cgroup`, relative to the cgroup v2 mount (a
    /// cgroup not named by the harness: the benchmark's).
    pub fn host_scope_at(mut self, cgroup: &str) -> Self {
        self.host = Some(Host {
            cgroup: cgroup.into(),
        });
        self
    }

    pub fn target_tcp<S: Into<String>>(mut self, nets: impl IntoIterator<Item = S>) -> Self {
        self.networks.target_tcp.extend(strings(nets));
        self
    }

    pub fn target_udp<S: Into<String>>(mut self, nets: impl IntoIterator<Item = S>) -> Self {
        self.networks.target_udp.extend(strings(nets));
        self
    }

    pub fn excluded<S: Into<String>>(mut self, nets: impl IntoIterator<Item = S>) -> Self {
        self.networks.excluded.extend(strings(nets));
        self
    }

    /// `[marks] shift`: where the agent's mark field starts (absent: the
    /// default).
    pub fn mark_shift(mut self, shift: u32) -> Self {
        self.marks = Some(Marks { shift });
        self
    }

    /// `[queues] fail_mode = "closed"`: no trap lets a packet pass when
    /// no one listens.
    pub fn fail_closed(mut self) -> Self {
        self.queues = Some(Queues {
            fail_mode: "closed".into(),
        });
        self
    }

    /// Flow log lines appended to `path`.
    pub fn flow_log_file(mut self, path: &Path) -> Self {
        self.flow_log = Some(FlowLog {
            output: path.display().to_string(),
        });
        self
    }

    /// `[cgroups] version = "v1"` with the net_cls hierarchy at `mount`:
    /// PU cgroups are net_cls cgroups relative to it.
    pub fn net_cls(mut self, mount: &Path) -> Self {
        self.cgroups = Some(Cgroups {
            version: "v1".into(),
            net_cls_mount: mount.display().to_string(),
        });
        self
    }

    pub fn pu(mut self, pu: Pu) -> Self {
        self.pus.push(pu);
        self
    }

    /// `[identity]`: the handshake runs, signing with the private key at
    /// `key` and trusting the public keys at `trusted`.
    pub fn identity<P: AsRef<Path>>(
        mut self,
        key: &Path,
        trusted: impl IntoIterator<Item = P>,
    ) -> Self {
        self.identity = Some(Identity {
            key: key.display().to_string(),
            trusted: trusted
                .into_iter()
                .map(|p| p.as_ref().display().to_string())
                .collect(),
        });
        self
    }

    /// The config file's text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a test config always serializes")
    }
}

impl Pu {
    /// A `linux-process` PU of the cgroup at `cgroup` (relative to the
    /// cgroup v2 mount).
    pub fn process(id: &str, cgroup: &str) -> Self {
        Self {
            cgroup: Some(cgroup.into()),
            ..Self::of_kind(id, "linux-process")
        }
    }

    /// A `linux-process` PU of a test's [`Cgroup`] (made under the cgroup
    /// mount — v2, or net_cls v1 — or below another test cgroup).
    pub fn process_of(id: &str, cgroup: &Cgroup) -> Self {
        Self::process(id, &relative_cgroup(cgroup))
    }

    /// A `uid` PU: every process of the user `uid`.
    pub fn uid(id: &str, uid: u32) -> Self {
        Self {
            uid: Some(uid),
            ..Self::of_kind(id, "uid")
        }
    }

    /// A `host-service` PU: give it its ports next.
    pub fn host_service(id: &str) -> Self {
        Self::of_kind(id, "host-service")
    }

    /// The `host` PU: the whole host.
    pub fn host(id: &str) -> Self {
        Self::of_kind(id, "host")
    }

    /// The `container` PU of a remote-container or sidecar agent.
    pub fn container(id: &str) -> Self {
        Self::of_kind(id, "container")
    }

    fn of_kind(id: &str, kind: &str) -> Self {
        Self {
            id: id.into(),
            kind: kind.into(),
            ..Self::default()
        }
    }

    /// The port of the PU's proxy (its dependent and exposed services go
    /// there).
    pub fn proxy_port(mut self, port: u16) -> Self {
        self.proxy_port = Some(port);
        self
    }

    /// The port of the PU's DNS proxy: its DNS queries go there.
    pub fn dns_proxy_port(mut self, port: u16) -> Self {
        self.dns_proxy_port = Some(port);
        self
    }

    /// Outgoing TCP connections to `address` (an address or network) on
    /// `ports` go to the proxy.
    pub fn dependent_service<P: Into<Port>>(
        mut self,
        address: &str,
        ports: impl IntoIterator<Item = P>,
    ) -> Self {
        self.dependent_services.push(DependentService {
            address: address.into(),
            ports: ports.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// Incoming TCP connections to these ports go to the proxy.
    pub fn exposed_services<P: Into<Port>>(mut self, ports: impl IntoIterator<Item = P>) -> Self {
        self.exposed_services
            .extend(ports.into_iter().map(Into::into));
        self
    }

    /// Ports the PU listens on: incoming connections to them are the PU's.
    pub fn tcp_ports<P: Into<Port>>(mut self, ports: impl IntoIterator<Item = P>) -> Self {
        self.tcp_ports.extend(ports.into_iter().map(Into::into));
        self
    }

    pub fn udp_ports<P: Into<Port>>(mut self, ports: impl IntoIterator<Item = P>) -> Self {
        self.udp_ports.extend(ports.into_iter().map(Into::into));
        self
    }

    /// An ACL on the PU's outgoing traffic (by destination).
    pub fn application_acl(mut self, acl: Acl) -> Self {
        self.application_acls.push(acl);
        self
    }

    /// One application ACL per network, each accepting TCP to `port`,
    /// with the policy id `acl-<n>` of its place among the PU's
    /// application ACLs.
    pub fn accepting_tcp_to<S: AsRef<str>>(
        mut self,
        networks: impl IntoIterator<Item = S>,
        port: u16,
    ) -> Self {
        for net in networks {
            let policy_id = format!("acl-{}", self.application_acls.len());
            self = self.application_acl(Acl::accept(&policy_id, [net.as_ref()]).tcp([port]));
        }
        self
    }

    /// An ACL on the PU's incoming traffic (by source).
    pub fn network_acl(mut self, acl: Acl) -> Self {
        self.network_acls.push(acl);
        self
    }

    /// A label of the PU's identity.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Peers whose identity matches every requirement of `from` (`app=web`,
    /// …) may connect to these ports (none: every port).
    pub fn network_policy<P: Into<Port>>(
        mut self,
        policy_id: &str,
        from: &[&str],
        ports: impl IntoIterator<Item = P>,
    ) -> Self {
        self.network_policy.push(IdentityRule {
            from: Some(strings(from.iter().copied())),
            ports: ports.into_iter().map(Into::into).collect(),
            policy_id: policy_id.into(),
            ..IdentityRule::default()
        });
        self
    }

    /// The PU may connect to these ports (none: every port) of peers whose
    /// identity matches every requirement of `to`.
    pub fn application_policy<P: Into<Port>>(
        mut self,
        policy_id: &str,
        to: &[&str],
        ports: impl IntoIterator<Item = P>,
    ) -> Self {
        self.application_policy.push(IdentityRule {
            to: Some(strings(to.iter().copied())),
            ports: ports.into_iter().map(Into::into).collect(),
            policy_id: policy_id.into(),
            ..IdentityRule::default()
        });
        self
    }
}

impl Acl {
    fn new<S: Into<String>>(
        action: &str,
        policy_id: &str,
        nets: impl IntoIterator<Item = S>,
    ) -> Self {
        Self {
            networks: strings(nets),
            action: action.into(),
            policy_id: policy_id.into(),
            ..Self::default()
        }
    }

    /// An accept ACL for `nets`; give it protocols next.
    pub fn accept<S: Into<String>>(policy_id: &str, nets: impl IntoIterator<Item = S>) -> Self {
        Self::new("accept", policy_id, nets)
    }

    /// A reject ACL for `nets`; give it protocols next.
    pub fn reject<S: Into<String>>(policy_id: &str, nets: impl IntoIterator<Item = S>) -> Self {
        Self::new("reject", policy_id, nets)
    }

    /// TCP to (app side) or from (net side) these ports (none: every
    /// port).
    pub fn tcp<P: Into<Port>>(self, ports: impl IntoIterator<Item = P>) -> Self {
        self.protocol("tcp", ports)
    }

    /// UDP on these ports (none: every port).
    pub fn udp<P: Into<Port>>(self, ports: impl IntoIterator<Item = P>) -> Self {
        self.protocol("udp", ports)
    }

    /// ICMP and ICMPv6 (each family's own), no ports.
    pub fn icmp(mut self) -> Self {
        self.protocols.extend(["icmp".into(), "icmpv6".into()]);
        self
    }

    /// Any protocol, any port.
    pub fn any(mut self) -> Self {
        self.protocols.push("any".into());
        self
    }

    /// The protocol `name` as the file writes it (`"icmp"`, say), on
    /// these ports (none: every port).
    pub fn protocol<P: Into<Port>>(
        mut self,
        name: &str,
        ports: impl IntoIterator<Item = P>,
    ) -> Self {
        self.protocols.push(name.into());
        self.ports.extend(ports.into_iter().map(Into::into));
        self.ports.sort_unstable();
        self.ports.dedup();
        self
    }

    /// `log = true`.
    pub fn log(mut self) -> Self {
        self.log = true;
        self
    }

    /// `observe = "observe-continue"`: logged, evaluation goes on.
    pub fn observe_continue(mut self) -> Self {
        self.observe = Some("observe-continue".into());
        self
    }

    /// `observe = "observe-apply"`: logged and applied.
    pub fn observe_apply(mut self) -> Self {
        self.observe = Some("observe-apply".into());
        self
    }
}
