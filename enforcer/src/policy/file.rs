//! The config file: its TOML shape as loose serde structs, the conversion
//! to the typed model, and the way back for `to_toml_string`.
//!
//! The serde structs hold strings, integers and options rather than the
//! typed values so that serde only refuses what is not the right *shape*
//! (it reports the line and column); every bad *value*, and every missing
//! required key, is reported by the conversion here with its field path.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;

use enforcer_common::marks::MAX_SHIFT;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::Keyword;
use super::acl::{Acl, ObserveMode, PortRange};
use super::error::{Errors, FieldPath, PolicyError, Problem};
use super::host::HostFacts;
use super::model::{
    CgroupSettings, CgroupVersion, Configuration, DatapathChoice, FlowLogOutput, HostSettings,
    IdentitySettings, IptablesSettings, MAX_CLOCK_SKEW_SECONDS, MAX_TOKEN_LIFETIME_SECONDS,
    MarkSettings, NetworkSettings, PortSettings, QueueSettings,
};
use super::pu::{CgroupPath, DependentService, PolicyId, Pu, PuId, PuKind, UserName, UserSpec};
use super::validate;
use crate::identity::labels::{self, Labels, Requirement, Selector};
use crate::identity::{IdentityPolicy, IdentityRule, Window};

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfiguration {
    mode: Option<String>,
    datapath: Option<String>,
    #[serde(default)]
    networks: RawNetworks,
    #[serde(default)]
    queues: RawQueues,
    #[serde(default)]
    marks: RawMarks,
    #[serde(default)]
    flow_log: RawFlowLog,
    #[serde(default)]
    iptables: RawIptables,
    #[serde(default)]
    ports: RawPorts,
    #[serde(default)]
    host: RawHost,
    #[serde(default)]
    cgroups: RawCgroups,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    pus: Vec<RawPu>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawNetworks {
    #[serde(default)]
    target_tcp: Vec<String>,
    #[serde(default)]
    target_udp: Vec<String>,
    #[serde(default)]
    excluded: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawQueues {
    separation: Option<bool>,
    queues_per_range: Option<i64>,
    first_queue: Option<i64>,
    queue_length: Option<i64>,
    fail_mode: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawMarks {
    shift: Option<i64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawFlowLog {
    output: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawIptables {
    backend: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawPorts {
    discover_interval_ms: Option<i64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    cgroup: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawCgroups {
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    net_cls_mount: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    key: Option<String>,
    #[serde(default)]
    trusted: Vec<String>,
    token_lifetime_seconds: Option<i64>,
    clock_skew_seconds: Option<i64>,
}

/// `[[pus.network_policy]]`: who may connect to which of the PU's ports.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawNetworkRule {
    from: Option<Vec<String>>,
    #[serde(default)]
    ports: Vec<RawPort>,
    policy_id: Option<String>,
}

/// `[[pus.application_policy]]`: whom, on which ports, the PU may reach.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawApplicationRule {
    to: Option<Vec<String>>,
    #[serde(default)]
    ports: Vec<RawPort>,
    policy_id: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawPu {
    id: Option<String>,
    kind: Option<String>,
    cgroup: Option<String>,
    uid: Option<RawUid>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    tcp_ports: Vec<RawPort>,
    #[serde(default)]
    udp_ports: Vec<RawPort>,
    proxy_port: Option<i64>,
    dns_proxy_port: Option<i64>,
    #[serde(default)]
    exposed_services: Vec<RawPort>,
    #[serde(default)]
    dependent_services: Vec<RawDependentService>,
    #[serde(default)]
    application_acls: Vec<RawAcl>,
    #[serde(default)]
    network_acls: Vec<RawAcl>,
    #[serde(default)]
    network_policy: Vec<RawNetworkRule>,
    #[serde(default)]
    application_policy: Vec<RawApplicationRule>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawAcl {
    #[serde(default)]
    networks: Vec<String>,
    #[serde(default)]
    protocols: Vec<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    action: Option<String>,
    #[serde(default)]
    log: bool,
    observe: Option<String>,
    policy_id: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawDependentService {
    address: Option<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
}

/// A port or range: `443`, `"443"`, `"8000:8080"`, `"8000-8080"`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

/// A uid (`1000`) or a user name (`"www-data"`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum RawUid {
    Number(i64),
    Name(String),
}

impl fmt::Display for RawPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawPort::Number(n) => write!(f, "{n}"),
            RawPort::Text(text) => f.write_str(text),
        }
    }
}

/// Loads a config: parse, convert, cross-field rules, and the host rules
/// when `host` is given. See [`Configuration::from_toml_str`].
pub(super) fn parse(
    text: &str,
    host: Option<&dyn HostFacts>,
) -> Result<Configuration, PolicyError> {
    let raw: RawConfiguration = toml::from_str(text)?;
    let mut errs = Errors::default();

    let mode_path = FieldPath::root("mode");
    let mode = required(&mut errs, &mode_path, &raw.mode)
        .and_then(|name| keyword(&mut errs, &mode_path, name));
    let datapath = raw
        .datapath
        .as_ref()
        .map_or(Some(DatapathChoice::default()), |name| {
            let path = FieldPath::root("datapath");
            keyword(&mut errs, &path, name)
        });
    let networks = convert_networks(&raw.networks, &mut errs);
    // Cross-field rules run only on parts that converted cleanly, so a bad
    // value is not reported a second time through one of its consequences.
    let (queues, queues_clean) = clean(&mut errs, |errs| convert_queues(&raw.queues, errs));
    let (marks, marks_clean) = clean(&mut errs, |errs| convert_marks(&raw.marks, errs));
    if queues_clean && marks_clean {
        validate::settings(&queues, &marks, &mut errs);
    }
    let flow_log = convert_flow_log(&raw.flow_log, &mut errs);
    let iptables = IptablesSettings {
        backend: raw
            .iptables
            .backend
            .as_ref()
            .map_or_else(Default::default, |name| {
                let path = FieldPath::root("iptables").key("backend");
                keyword(&mut errs, &path, name).unwrap_or_default()
            }),
    };
    let ports = PortSettings {
        discover_interval_ms: optional_int(
            &mut errs,
            &FieldPath::root("ports").key("discover_interval_ms"),
            raw.ports.discover_interval_ms,
            PortSettings::default().discover_interval_ms,
            0,
            // A day: anything longer is a mistake, not a setting.
            86_400_000,
        ),
    };
    let host_settings = convert_host(&raw.host, &mut errs);
    let cgroups = convert_cgroups(&raw.cgroups, &mut errs);
    let mut identity = convert_identity(&raw.identity, &mut errs);
    let mut pus = Vec::new();
    for (i, raw_pu) in raw.pus.iter().enumerate() {
        let path = FieldPath::root("pus").index(i);
        let (pu, is_clean) = clean(&mut errs, |errs| convert_pu(raw_pu, &path, errs));
        let policy = convert_identity_policy(raw_pu, &path, &mut errs);
        if let Some(pu) = pu {
            if is_clean {
                validate::pu_within(&pu, &path, &mut errs);
            }
            if !policy.is_empty() {
                identity.policies.insert(pu.id.clone(), policy);
            }
            pus.push((i, pu));
        }
    }
    validate::identity(&identity, &mut errs);

    validate::pus_across(mode, pus.iter().map(|(i, pu)| (*i, pu)), &mut errs);
    if let Some(host) = host {
        validate::host(pus.iter().map(|(i, pu)| (*i, pu)), host, &mut errs);
        validate::host_scope(&host_settings, host, &mut errs);
    }

    errs.finish()?;
    // No problem was recorded, so every required field converted.
    let (Some(mode), Some(datapath)) = (mode, datapath) else {
        unreachable!("a field that fails to convert records a problem");
    };
    Ok(Configuration {
        mode,
        datapath,
        networks,
        queues,
        marks,
        flow_log,
        iptables,
        ports,
        host: host_settings,
        cgroups,
        identity,
        pus: pus.into_iter().map(|(_, pu)| pu).collect(),
    })
}

/// Runs a conversion and tells whether it recorded no problem.
fn clean<T>(errs: &mut Errors, convert: impl FnOnce(&mut Errors) -> T) -> (T, bool) {
    let before = errs.count();
    let value = convert(errs);
    (value, errs.count() == before)
}

/// A keyword of enum `T`, or an error listing the accepted ones.
fn keyword<T: Keyword>(errs: &mut Errors, path: &FieldPath, name: &str) -> Option<T> {
    let expected = T::NAMES;
    errs.check(
        path,
        name,
        T::from_name(name).ok_or(Problem::UnknownKeyword { expected }),
    )
}

/// A required key: records `Missing` when absent.
fn required<'a, T>(errs: &mut Errors, path: &FieldPath, value: &'a Option<T>) -> Option<&'a T> {
    if value.is_none() {
        errs.field(path, Problem::Missing);
    }
    value.as_ref()
}

/// `n` if it lies in `min..=max`.
fn int<T>(errs: &mut Errors, path: &FieldPath, n: i64, min: T, max: T) -> Option<T>
where
    T: TryFrom<i64> + Into<i64>,
{
    let (min, max) = (min.into(), max.into());
    let fits = (min..=max)
        .contains(&n)
        .then(|| T::try_from(n).ok())
        .flatten();
    errs.check(path, n, fits.ok_or(Problem::OutOfRange { min, max }))
}

/// An optional integer key: `default` when absent, or (after recording
/// the problem) when out of `min..=max`.
fn optional_int<T>(
    errs: &mut Errors,
    path: &FieldPath,
    n: Option<i64>,
    default: T,
    min: T,
    max: T,
) -> T
where
    T: TryFrom<i64> + Into<i64>,
{
    n.and_then(|n| int(errs, path, n, min, max))
        .unwrap_or(default)
}

/// A CIDR or a bare address (a /32 or /128), host bits cleared.
fn parse_network(text: &str) -> Result<IpNet, Problem> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| Problem::InvalidCidr)
}

fn convert_network_list(list: &[String], path: &FieldPath, errs: &mut Errors) -> Vec<IpNet> {
    let entries = list.iter().enumerate();
    entries
        .filter_map(|(k, text)| errs.check(&path.index(k), text, parse_network(text)))
        .collect()
}

fn convert_ports(list: &[RawPort], path: &FieldPath, errs: &mut Errors) -> Vec<PortRange> {
    let entries = list.iter().enumerate();
    entries
        .filter_map(|(k, raw)| {
            let port = match raw {
                RawPort::Number(n) => PortRange::from_number(*n),
                RawPort::Text(text) => PortRange::parse(text),
            };
            errs.check(&path.index(k), raw, port)
        })
        .collect()
}

fn convert_port(n: i64, path: &FieldPath, errs: &mut Errors) -> Option<NonZeroU16> {
    let port = u16::try_from(n).ok().and_then(NonZeroU16::new);
    errs.check(path, n, port.ok_or(Problem::PortOutOfRange))
}

fn convert_networks(raw: &RawNetworks, errs: &mut Errors) -> NetworkSettings {
    let path = FieldPath::root("networks");
    NetworkSettings {
        target_tcp: convert_network_list(&raw.target_tcp, &path.key("target_tcp"), errs),
        target_udp: convert_network_list(&raw.target_udp, &path.key("target_udp"), errs),
        excluded: convert_network_list(&raw.excluded, &path.key("excluded"), errs),
    }
}

/// Absent keys take the seed's defaults.
fn convert_queues(raw: &RawQueues, errs: &mut Errors) -> QueueSettings {
    let path = FieldPath::root("queues");
    let default = QueueSettings::default();
    let queues_per_range = optional_int(
        errs,
        &path.key("queues_per_range"),
        raw.queues_per_range,
        default.queues_per_range,
        0,
        u16::MAX,
    );
    let first_queue = optional_int(
        errs,
        &path.key("first_queue"),
        raw.first_queue,
        default.first_queue,
        0,
        u16::MAX,
    );
    let queue_length = optional_int(
        errs,
        &path.key("queue_length"),
        raw.queue_length,
        default.queue_length,
        0,
        u32::MAX,
    );
    let fail_mode = raw.fail_mode.as_ref().map_or(default.fail_mode, |name| {
        keyword(errs, &path.key("fail_mode"), name).unwrap_or(default.fail_mode)
    });
    QueueSettings {
        separation: raw.separation.unwrap_or(default.separation),
        queues_per_range,
        first_queue,
        queue_length,
        fail_mode,
    }
}

/// An absent shift takes the default. The range is the one
/// `validate::settings` enforces on configurations built in code, so the
/// message is the same either way.
fn convert_marks(raw: &RawMarks, errs: &mut Errors) -> MarkSettings {
    let path = FieldPath::root("marks").key("shift");
    let default = MarkSettings::default();
    let shift = optional_int(errs, &path, raw.shift, default.shift, 0, MAX_SHIFT);
    MarkSettings { shift }
}

/// `"stdout"` or a file path (write `./stdout` for a file of that name).
fn convert_flow_log(raw: &RawFlowLog, errs: &mut Errors) -> FlowLogOutput {
    match raw.output.as_deref() {
        None | Some("stdout") => FlowLogOutput::Stdout,
        Some("") => {
            errs.field(&FieldPath::root("flow_log").key("output"), Problem::Empty);
            FlowLogOutput::Stdout
        }
        Some(path) => FlowLogOutput::File(path.into()),
    }
}

/// `[host] cgroup`: `"/"` (the default) for the cgroup v2 root, else a
/// cgroup path under the mount.
fn convert_host(raw: &RawHost, errs: &mut Errors) -> HostSettings {
    let cgroup = match raw.cgroup.as_deref() {
        None | Some("/") => None,
        Some(text) => {
            let path = FieldPath::root("host").key("cgroup");
            errs.check(&path, text, CgroupPath::new(text))
        }
    };
    HostSettings { cgroup }
}

/// `[cgroups]`: the version keyword, and a net_cls mount that is an
/// absolute path and only given where v1 can be chosen.
fn convert_cgroups(raw: &RawCgroups, errs: &mut Errors) -> CgroupSettings {
    let path = FieldPath::root("cgroups");
    let version = raw.version.as_ref().map_or_else(Default::default, |name| {
        keyword(errs, &path.key("version"), name).unwrap_or_default()
    });
    let net_cls_mount = raw.net_cls_mount.as_deref().and_then(|text| {
        let field = path.key("net_cls_mount");
        let problem = if !text.starts_with('/') {
            Some(Problem::NotAbsolute)
        } else if version == CgroupVersion::V2 {
            Some(Problem::NetClsMountWithV2)
        } else {
            None
        };
        match problem {
            Some(problem) => errs.bad(&field, text, problem),
            None => return Some(PathBuf::from(text)),
        }
        None
    });
    CgroupSettings {
        version,
        net_cls_mount,
    }
}

/// `[identity]`: key files and the token window; the PUs' policies are
/// added as the PUs convert.
fn convert_identity(raw: &RawIdentity, errs: &mut Errors) -> IdentitySettings {
    let path = FieldPath::root("identity");
    let default = IdentitySettings::default();
    let file = |text: &str, path: &FieldPath, errs: &mut Errors| {
        if text.is_empty() {
            errs.field(path, Problem::Empty);
            None
        } else {
            Some(PathBuf::from(text))
        }
    };
    let key = raw
        .key
        .as_deref()
        .and_then(|text| file(text, &path.key("key"), errs));
    let trusted_path = path.key("trusted");
    let trusted = raw
        .trusted
        .iter()
        .enumerate()
        .filter_map(|(k, text)| file(text, &trusted_path.index(k), errs))
        .collect();
    let seconds =
        |n: Option<i64>, key: &str, default_ms: u64, min: u32, max: u32, errs: &mut Errors| {
            let default = u32::try_from(default_ms / 1000).unwrap_or(u32::MAX);
            u64::from(optional_int(errs, &path.key(key), n, default, min, max)) * 1000
        };
    let window = Window {
        lifetime_ms: seconds(
            raw.token_lifetime_seconds,
            "token_lifetime_seconds",
            default.window.lifetime_ms,
            1,
            MAX_TOKEN_LIFETIME_SECONDS,
            errs,
        ),
        skew_ms: seconds(
            raw.clock_skew_seconds,
            "clock_skew_seconds",
            default.window.skew_ms,
            0,
            MAX_CLOCK_SKEW_SECONDS,
            errs,
        ),
    };
    IdentitySettings {
        key,
        trusted,
        window,
        policies: BTreeMap::new(),
    }
}

/// The PU's labels, each pair checked and named by its key.
fn convert_labels(raw: &BTreeMap<String, String>, path: &FieldPath, errs: &mut Errors) -> Labels {
    let pairs: Vec<_> = raw
        .iter()
        .filter(|(key, value)| {
            let at = path.key(key);
            let key_ok = errs.check(&at, key, labels::check_key(key)).is_some();
            key_ok && errs.check(&at, value, labels::check_value(value)).is_some()
        })
        .collect();
    match Labels::new(pairs) {
        Ok(labels) => labels,
        Err(problem) => {
            errs.field(path, problem);
            Labels::default()
        }
    }
}

/// The PU's `network_policy` and `application_policy` rules.
fn convert_identity_policy(raw: &RawPu, path: &FieldPath, errs: &mut Errors) -> IdentityPolicy {
    let network_path = path.key("network_policy");
    let network = raw
        .network_policy
        .iter()
        .enumerate()
        .filter_map(|(k, rule)| {
            let at = network_path.index(k);
            convert_identity_rule(&rule.from, "from", &rule.ports, &rule.policy_id, &at, errs)
        });
    let network = network.collect();
    let application_path = path.key("application_policy");
    let application = raw
        .application_policy
        .iter()
        .enumerate()
        .filter_map(|(k, rule)| {
            let at = application_path.index(k);
            convert_identity_rule(&rule.to, "to", &rule.ports, &rule.policy_id, &at, errs)
        });
    let application = application.collect();
    IdentityPolicy {
        network,
        application,
    }
}

/// One rule: `selector_key` (`from` or `to`) is required but may be an
/// empty list, which matches every verified identity.
fn convert_identity_rule(
    selector: &Option<Vec<String>>,
    selector_key: &str,
    ports: &[RawPort],
    policy_id: &Option<String>,
    path: &FieldPath,
    errs: &mut Errors,
) -> Option<IdentityRule> {
    let selector_path = path.key(selector_key);
    let requirements = required(errs, &selector_path, selector).map(|list| {
        list.iter()
            .enumerate()
            .filter_map(|(k, text)| {
                errs.check(&selector_path.index(k), text, Requirement::parse(text))
            })
            .collect()
    });
    let ports = convert_ports(ports, &path.key("ports"), errs);
    let policy_id = required(errs, &path.key("policy_id"), policy_id)
        .and_then(|id| errs.check(&path.key("policy_id"), id, PolicyId::new(id.as_str())));
    Some(IdentityRule {
        selector: Selector(requirements?),
        ports,
        policy_id: policy_id?,
    })
}

/// A PU, when its id and kind convert; problems in its other fields are
/// recorded and the bad entries left out.
fn convert_pu(raw: &RawPu, path: &FieldPath, errs: &mut Errors) -> Option<Pu> {
    let id = required(errs, &path.key("id"), &raw.id)
        .and_then(|id| errs.check(&path.key("id"), id, PuId::new(id.as_str())));
    let kind = convert_kind(raw, path, errs);
    let labels = convert_labels(&raw.labels, &path.key("labels"), errs);
    let proxy_port = raw
        .proxy_port
        .and_then(|n| convert_port(n, &path.key("proxy_port"), errs));
    let dns_proxy_port = raw
        .dns_proxy_port
        .and_then(|n| convert_port(n, &path.key("dns_proxy_port"), errs));
    let services = path.key("dependent_services");
    let dependent_services = raw
        .dependent_services
        .iter()
        .enumerate()
        .filter_map(|(k, service)| convert_dependent_service(service, &services.index(k), errs))
        .collect();
    let acls = |key: &str, list: &[RawAcl], errs: &mut Errors| -> Vec<Acl> {
        let path = path.key(key);
        let entries = list.iter().enumerate();
        entries
            .filter_map(|(j, acl)| convert_acl(acl, &path.index(j), errs))
            .collect()
    };
    let tcp_ports = convert_ports(&raw.tcp_ports, &path.key("tcp_ports"), errs);
    let udp_ports = convert_ports(&raw.udp_ports, &path.key("udp_ports"), errs);
    let application_acls = acls("application_acls", &raw.application_acls, errs);
    let network_acls = acls("network_acls", &raw.network_acls, errs);
    let exposed_services =
        convert_ports(&raw.exposed_services, &path.key("exposed_services"), errs);
    // Only now give up on a PU without id or kind: every field is reported.
    Some(Pu {
        id: id?,
        kind: kind?,
        labels,
        tcp_ports,
        udp_ports,
        application_acls,
        network_acls,
        proxy_port,
        dns_proxy_port,
        dependent_services,
        exposed_services,
    })
}

/// The kind with the data it needs (`cgroup` for linux-process, `uid` for
/// uid). Those keys on any other kind are refused: silently ignoring one
/// would leave the user believing a process is covered.
fn convert_kind(raw: &RawPu, path: &FieldPath, errs: &mut Errors) -> Option<PuKind> {
    let name = required(errs, &path.key("kind"), &raw.kind)?;
    let (cgroup_path, uid_path) = (path.key("cgroup"), path.key("uid"));
    let kind = match name.as_str() {
        "container" => Some(PuKind::Container),
        "linux-process" => {
            let cgroup = raw.cgroup.as_ref();
            if cgroup.is_none() {
                errs.field(
                    &cgroup_path,
                    Problem::Required {
                        kind: "linux-process",
                    },
                );
            }
            cgroup
                .and_then(|text| errs.check(&cgroup_path, text, CgroupPath::new(text.as_str())))
                .map(|cgroup| PuKind::LinuxProcess { cgroup })
        }
        "uid" => {
            if raw.uid.is_none() {
                errs.field(&uid_path, Problem::Required { kind: "uid" });
            }
            let user = raw.uid.as_ref().and_then(|uid| match uid {
                RawUid::Number(n) => int(errs, &uid_path, *n, 0, u32::MAX - 1).map(UserSpec::Id),
                RawUid::Name(name) => errs
                    .check(&uid_path, name, UserName::new(name.as_str()))
                    .map(UserSpec::Name),
            });
            user.map(|user| PuKind::Uid { user })
        }
        "host" => Some(PuKind::Host),
        "host-service" => Some(PuKind::HostService),
        other => {
            let expected = PuKind::NAMES;
            errs.bad(
                &path.key("kind"),
                other,
                Problem::UnknownKeyword { expected },
            );
            return None;
        }
    };
    // `name` is a known kind here; find its static spelling for the message.
    let kind_name = PuKind::NAMES
        .iter()
        .copied()
        .find(|&k| k == name.as_str())?;
    if raw.cgroup.is_some() && kind_name != "linux-process" {
        errs.field(&cgroup_path, Problem::NotForKind { kind: kind_name });
    }
    if raw.uid.is_some() && kind_name != "uid" {
        errs.field(&uid_path, Problem::NotForKind { kind: kind_name });
    }
    kind
}

fn convert_dependent_service(
    raw: &RawDependentService,
    path: &FieldPath,
    errs: &mut Errors,
) -> Option<DependentService> {
    let address = path.key("address");
    let network = required(errs, &address, &raw.address)
        .and_then(|text| errs.check(&address, text, parse_network(text)));
    let ports = convert_ports(&raw.ports, &path.key("ports"), errs);
    Some(DependentService {
        network: network?,
        ports,
    })
}

fn convert_acl(raw: &RawAcl, path: &FieldPath, errs: &mut Errors) -> Option<Acl> {
    let protocols_path = path.key("protocols");
    let protocols = raw
        .protocols
        .iter()
        .enumerate()
        .filter_map(|(p, name)| keyword(errs, &protocols_path.index(p), name))
        .collect();
    let action = required(errs, &path.key("action"), &raw.action)
        .and_then(|name| keyword(errs, &path.key("action"), name));
    let observe = raw
        .observe
        .as_ref()
        .map_or(Some(ObserveMode::default()), |name| {
            keyword(errs, &path.key("observe"), name)
        });
    let policy_id = required(errs, &path.key("policy_id"), &raw.policy_id)
        .and_then(|id| errs.check(&path.key("policy_id"), id, PolicyId::new(id.as_str())));
    let networks = convert_network_list(&raw.networks, &path.key("networks"), errs);
    let ports = convert_ports(&raw.ports, &path.key("ports"), errs);
    Some(Acl {
        networks,
        protocols,
        ports,
        action: action?,
        log: raw.log,
        observe: observe?,
        policy_id: policy_id?,
    })
}

/// The typed model back in the file format, every default written out.
pub(super) fn render(config: &Configuration) -> Result<String, toml::ser::Error> {
    toml::to_string(&RawConfiguration::from(config))
}

impl From<&Configuration> for RawConfiguration {
    fn from(config: &Configuration) -> Self {
        let nets = |list: &[IpNet]| list.iter().map(IpNet::to_string).collect();
        let (queues, marks) = (&config.queues, &config.marks);
        RawConfiguration {
            mode: Some(config.mode.as_str().to_owned()),
            datapath: Some(config.datapath.as_str().to_owned()),
            networks: RawNetworks {
                target_tcp: nets(&config.networks.target_tcp),
                target_udp: nets(&config.networks.target_udp),
                excluded: nets(&config.networks.excluded),
            },
            queues: RawQueues {
                separation: Some(queues.separation),
                queues_per_range: Some(queues.queues_per_range.into()),
                first_queue: Some(queues.first_queue.into()),
                queue_length: Some(queues.queue_length.into()),
                fail_mode: Some(queues.fail_mode.as_str().to_owned()),
            },
            marks: RawMarks {
                shift: Some(marks.shift.into()),
            },
            flow_log: RawFlowLog {
                output: Some(match &config.flow_log {
                    FlowLogOutput::Stdout => "stdout".to_owned(),
                    FlowLogOutput::File(path) => path.display().to_string(),
                }),
            },
            iptables: RawIptables {
                backend: Some(config.iptables.backend.as_str().to_owned()),
            },
            ports: RawPorts {
                discover_interval_ms: Some(config.ports.discover_interval_ms.into()),
            },
            host: RawHost {
                cgroup: Some(
                    config
                        .host
                        .cgroup
                        .as_ref()
                        .map_or_else(|| "/".to_owned(), ToString::to_string),
                ),
            },
            cgroups: RawCgroups {
                version: Some(config.cgroups.version.as_str().to_owned()),
                net_cls_mount: config
                    .cgroups
                    .net_cls_mount
                    .as_ref()
                    .map(|path| path.display().to_string()),
            },
            identity: RawIdentity::from(&config.identity),
            pus: config
                .pus
                .iter()
                .map(|pu| {
                    let mut raw = RawPu::from(pu);
                    if let Some(policy) = config.identity.policies.get(&pu.id) {
                        raw.network_policy =
                            policy.network.iter().map(RawNetworkRule::from).collect();
                        raw.application_policy = policy
                            .application
                            .iter()
                            .map(RawApplicationRule::from)
                            .collect();
                    }
                    raw
                })
                .collect(),
        }
    }
}

impl From<&Pu> for RawPu {
    fn from(pu: &Pu) -> Self {
        let (cgroup, uid) = match &pu.kind {
            PuKind::LinuxProcess { cgroup } => (Some(cgroup.to_string()), None),
            PuKind::Uid {
                user: UserSpec::Id(id),
            } => (None, Some(RawUid::Number((*id).into()))),
            PuKind::Uid {
                user: UserSpec::Name(name),
            } => (None, Some(RawUid::Name(name.as_str().to_owned()))),
            PuKind::Container | PuKind::Host | PuKind::HostService => (None, None),
        };
        RawPu {
            id: Some(pu.id.to_string()),
            kind: Some(pu.kind.name().to_owned()),
            cgroup,
            uid,
            labels: pu.labels.to_map(),
            tcp_ports: raw_ports(&pu.tcp_ports),
            udp_ports: raw_ports(&pu.udp_ports),
            proxy_port: pu.proxy_port.map(|p| p.get().into()),
            dns_proxy_port: pu.dns_proxy_port.map(|p| p.get().into()),
            exposed_services: raw_ports(&pu.exposed_services),
            dependent_services: pu
                .dependent_services
                .iter()
                .map(|service| RawDependentService {
                    address: Some(service.network.to_string()),
                    ports: raw_ports(&service.ports),
                })
                .collect(),
            application_acls: pu.application_acls.iter().map(RawAcl::from).collect(),
            network_acls: pu.network_acls.iter().map(RawAcl::from).collect(),
            network_policy: Vec::new(),
            application_policy: Vec::new(),
        }
    }
}

impl From<&IdentitySettings> for RawIdentity {
    fn from(identity: &IdentitySettings) -> Self {
        let path = |p: &PathBuf| p.display().to_string();
        RawIdentity {
            key: identity.key.as_ref().map(path),
            trusted: identity.trusted.iter().map(path).collect(),
            token_lifetime_seconds: Some((identity.window.lifetime_ms / 1000) as i64),
            clock_skew_seconds: Some((identity.window.skew_ms / 1000) as i64),
        }
    }
}

fn raw_selector(selector: &Selector) -> Option<Vec<String>> {
    Some(selector.0.iter().map(ToString::to_string).collect())
}

impl From<&IdentityRule> for RawNetworkRule {
    fn from(rule: &IdentityRule) -> Self {
        RawNetworkRule {
            from: raw_selector(&rule.selector),
            ports: raw_ports(&rule.ports),
            policy_id: Some(rule.policy_id.to_string()),
        }
    }
}

impl From<&IdentityRule> for RawApplicationRule {
    fn from(rule: &IdentityRule) -> Self {
        RawApplicationRule {
            to: raw_selector(&rule.selector),
            ports: raw_ports(&rule.ports),
            policy_id: Some(rule.policy_id.to_string()),
        }
    }
}

impl From<&Acl> for RawAcl {
    fn from(acl: &Acl) -> Self {
        RawAcl {
            networks: acl.networks.iter().map(IpNet::to_string).collect(),
            protocols: acl
                .protocols
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            ports: raw_ports(&acl.ports),
            action: Some(acl.action.as_str().to_owned()),
            log: acl.log,
            observe: Some(acl.observe.as_str().to_owned()),
            policy_id: Some(acl.policy_id.to_string()),
        }
    }
}

/// Single ports as integers, ranges as `"start:end"`.
fn raw_ports(ports: &[PortRange]) -> Vec<RawPort> {
    let raw = |range: &PortRange| {
        if range.is_single() {
            RawPort::Number(range.start().into())
        } else {
            RawPort::Text(range.to_string())
        }
    };
    ports.iter().map(raw).collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::FailMode;
    use crate::policy::acl::{Action, Protocol};
    use crate::policy::model::{IptablesBackendChoice, Mode};
    use crate::policy::test_support::{
        FakeHost, assert_has, assert_refused, refusals, with_process_pu,
    };

    const EXAMPLE: &str = include_str!("../../../examples/enforcer.toml");
    const EXAMPLE_CGROUPS: FakeHost = FakeHost(&["enforcer/web", "enforcer/batch"]);

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn port(start: u16, end: u16) -> PortRange {
        PortRange::new(start, end).unwrap()
    }

    #[test]
    fn the_example_loads_and_validates() {
        let config = Configuration::load(EXAMPLE, &EXAMPLE_CGROUPS).unwrap();
        config.validate(&EXAMPLE_CGROUPS).unwrap();
        assert_eq!(config.mode, Mode::LocalServer);
        assert_eq!(config.datapath, DatapathChoice::Auto);
        assert_eq!(
            config.networks.excluded,
            [
                net("127.0.0.0/8"),
                net("::1/128"),
                net("169.254.169.254/32")
            ]
        );
        assert_eq!(config.queues, QueueSettings::default());
        assert_eq!(config.marks, MarkSettings::default());
        assert_eq!(
            config.flow_log,
            FlowLogOutput::File(PathBuf::from("/var/log/enforcer/flows.log"))
        );

        let ids: Vec<_> = config.pus.iter().map(|pu| pu.id.as_str()).collect();
        assert_eq!(ids, ["web", "batch-worker", "ssh", "host"]);
        assert_eq!(config.pus[2].kind, PuKind::HostService);
        assert_eq!(config.pus[3].kind, PuKind::Host);
        assert_eq!(config.host.cgroup, None);
        let web = &config.pus[0];
        assert_eq!(
            web.kind,
            PuKind::LinuxProcess {
                cgroup: CgroupPath::new("enforcer/web").unwrap()
            }
        );
        assert_eq!(
            web.tcp_ports,
            [port(80, 80), port(443, 443), port(8000, 8080)]
        );
        assert_eq!(web.proxy_port.map(NonZeroU16::get), Some(15001));
        assert_eq!(
            web.dependent_services,
            [DependentService {
                network: net("10.20.0.15/32"),
                ports: vec![port(5432, 5432)],
            }]
        );
        assert_eq!(web.application_acls.len(), 3);
        let api = &web.application_acls[0];
        assert_eq!(api.ports, [port(443, 443), port(9000, 9100)]);
        assert_eq!(
            (api.action, api.log, api.observe),
            (Action::Accept, true, ObserveMode::None)
        );
        assert_eq!(web.application_acls[2].observe, ObserveMode::Continue);
        assert_eq!(web.network_acls[1].protocols, [Protocol::Icmp]);
        let batch = &config.pus[1];
        assert_eq!(batch.network_acls[0].observe, ObserveMode::Apply);
        assert_eq!(batch.labels.get("tier"), Some("batch"));
        assert_eq!(web.labels.to_string(), "app=shop,tier=frontend");
        let identity = &config.identity;
        assert_eq!(identity.key, Some(PathBuf::from("/etc/enforcer/agent.key")));
        assert_eq!(identity.trusted.len(), 2);
        assert_eq!(identity.window, Window::default());
        let policy = identity.policy(&web.id);
        assert_eq!(policy.network.len(), 1);
        assert_eq!(
            policy.network[0]
                .selector
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["app=shop", "tier in (api, admin)", "env!=dev"]
        );
        let api = Labels::new([("app", "shop"), ("tier", "api")]).unwrap();
        assert!(policy.judge_incoming(&api, 8080).is_allowed());
        assert!(!policy.judge_incoming(&api, 80).is_allowed());
        assert!(policy.judge_outgoing(&api, 443).is_allowed());
        assert!(identity.policy(&batch.id).is_empty());
    }

    #[test]
    fn the_example_round_trips_through_the_file_format() {
        let config = Configuration::from_toml_str(EXAMPLE).unwrap();
        let text = config.to_toml_string().unwrap();
        assert_eq!(
            Configuration::from_toml_str(&text).unwrap(),
            config,
            "rendered:\n{text}"
        );
        assert!(text.contains(r#""8000:8080""#), "{text}");
    }

    #[test]
    fn the_example_is_refused_when_a_cgroup_is_missing() {
        let only_web = FakeHost(&["enforcer/web"]);
        let Err(PolicyError::Invalid(errors)) = Configuration::load(EXAMPLE, &only_web) else {
            panic!("a missing cgroup must be refused");
        };
        assert_eq!(
            errors.to_string(),
            r#"pus[1].cgroup: "enforcer/batch" is not a directory under the cgroup mount (cgroup v2, or net_cls with [cgroups] version = "v1")"#
        );
        let config = Configuration::from_toml_str(EXAMPLE).unwrap();
        let errors = config.validate(&only_web).unwrap_err();
        assert_has(
            errors.as_slice(),
            "pus[1].cgroup",
            Some("enforcer/batch"),
            Problem::CgroupMissing,
        );
    }

    #[test]
    fn labels_are_checked_pair_by_pair() {
        let errors = refusals(&with_process_pu(
            "labels = { app = \"web\", \"bad key\" = \"x\", tier = \"a b\" }",
        ));
        assert_has(
            &errors,
            "pus[0].labels.bad key",
            Some("bad key"),
            Problem::InvalidLabelKey,
        );
        assert_has(
            &errors,
            "pus[0].labels.tier",
            Some("a b"),
            Problem::InvalidLabelValue,
        );
        assert_eq!(errors.len(), 2, "{errors:#?}");
        let many: Vec<_> = (0..33).map(|i| format!("k{i} = \"\"")).collect();
        let text = with_process_pu(&format!("labels = {{ {} }}", many.join(", ")));
        assert_refused(
            &text,
            "pus[0].labels",
            None,
            Problem::TooManyLabels {
                max_labels: 32,
                max_bytes: 1024,
            },
        );
    }

    #[test]
    fn identity_rules_and_settings_are_checked() {
        let key = "[identity]\nkey = \"/k\"\n";
        let rule = |table: &str, body: &str| {
            format!(
                "{}\n{key}",
                with_process_pu(&format!("[[pus.{table}]]\n{body}"))
            )
        };
        assert_refused(
            &rule(
                "network_policy",
                "from = [\"app=web\", \"tier in front\"]\npolicy_id = \"p\"",
            ),
            "pus[0].network_policy[0].from[1]",
            Some("tier in front"),
            Problem::InvalidSelector,
        );
        let errors = refusals(&rule("application_policy", "ports = [0]"));
        assert_has(
            &errors,
            "pus[0].application_policy[0].to",
            None,
            Problem::Missing,
        );
        assert_has(
            &errors,
            "pus[0].application_policy[0].policy_id",
            None,
            Problem::Missing,
        );
        assert_has(
            &errors,
            "pus[0].application_policy[0].ports[0]",
            Some("0"),
            Problem::PortOutOfRange,
        );
        assert_eq!(errors.len(), 3, "{errors:#?}");
        // `from` belongs to network rules only: a shape error.
        let err =
            Configuration::from_toml_str(&rule("application_policy", "from = []")).unwrap_err();
        assert!(err.to_string().contains("unknown field `from`"), "{err}");
        // A policy needs the key that signs the handshake.
        let without_key =
            with_process_pu("[[pus.network_policy]]\nfrom = []\npolicy_id = \"anyone\"");
        assert_refused(
            &without_key,
            "identity.key",
            None,
            Problem::NeedsIdentityKey,
        );
        let config = Configuration::from_toml_str(&format!("{without_key}\n{key}")).unwrap();
        assert_eq!(config.identity.policies.len(), 1);
        let mut unkeyed = config.clone();
        unkeyed.identity.key = None;
        let errors = unkeyed.validate(&FakeHost(&["enforcer/web"])).unwrap_err();
        assert_has(
            errors.as_slice(),
            "identity.key",
            None,
            Problem::NeedsIdentityKey,
        );

        for (setting, bad, min, max) in [
            ("token_lifetime_seconds", "0", 1, 3600),
            ("token_lifetime_seconds", "3601", 1, 3600),
            ("clock_skew_seconds", "-1", 0, 300),
            ("clock_skew_seconds", "301", 0, 300),
        ] {
            assert_refused(
                &format!("mode = \"sidecar\"\n[identity]\n{setting} = {bad}"),
                &format!("identity.{setting}"),
                Some(bad),
                Problem::OutOfRange { min, max },
            );
        }
        assert_refused(
            "mode = \"sidecar\"\n[identity]\nkey = \"/k\"\ntrusted = [\"/a\", \"\"]",
            "identity.trusted[1]",
            None,
            Problem::Empty,
        );
        let minimal = Configuration::from_toml_str("mode = \"sidecar\"").unwrap();
        assert_eq!(minimal.identity, IdentitySettings::default());
        assert_eq!(minimal.identity.key_files(), None);
    }

    #[test]
    fn a_minimal_config_takes_every_default() {
        let config = Configuration::from_toml_str("mode = \"sidecar\"").unwrap();
        assert_eq!(config.mode, Mode::Sidecar);
        assert_eq!(config.datapath, DatapathChoice::Auto);
        assert_eq!(config.networks, NetworkSettings::default());
        assert_eq!(
            config.queues,
            QueueSettings {
                separation: true,
                queues_per_range: 4,
                first_queue: 0,
                queue_length: 500,
                fail_mode: FailMode::Open,
            }
        );
        assert_eq!(config.marks, MarkSettings { shift: 8 });
        assert_eq!(config.marks.layout().field_mask(), 0x3f00);
        assert_eq!(config.flow_log, FlowLogOutput::Stdout);
        assert!(config.pus.is_empty());
    }

    #[test]
    fn networks_take_bare_addresses_and_lose_host_bits() {
        let text = "mode = \"local-server\"\n[networks]\n\
                    target_tcp = [\"10.1.2.3/16\", \"fd00::1\"]\nexcluded = [\"192.0.2.7\"]";
        let config = Configuration::from_toml_str(text).unwrap();
        assert_eq!(
            config.networks.target_tcp,
            [net("10.1.0.0/16"), net("fd00::1/128")]
        );
        assert_eq!(config.networks.excluded, [net("192.0.2.7/32")]);
    }

    #[test]
    fn bad_cidrs_are_named_by_path() {
        let text = with_process_pu(
            "[[pus.application_acls]]\nnetworks = [\"10.0.0.0/8\", \"fd00::/8\", \"10.0.0.0/33\"]\n\
             protocols = [\"tcp\"]\naction = \"accept\"\npolicy_id = \"p\"",
        );
        // Put the PU second, so the index in the path is checked too.
        let text = text.replacen(
            "[[pus]]",
            "[[pus]]\nid = \"db\"\nkind = \"host\"\n[[pus]]",
            1,
        );
        let errors = refusals(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(
            errors[0].to_string(),
            r#"pus[1].application_acls[0].networks[2]: "10.0.0.0/33" is not a valid CIDR"#
        );
        for (key, bad) in [
            ("target_tcp", "300.0.0.0/8"),
            ("target_udp", "fd00::/129"),
            ("excluded", "localhost"),
        ] {
            let text = format!("mode = \"local-server\"\n[networks]\n{key} = [\"{bad}\"]");
            assert_refused(
                &text,
                &format!("networks.{key}[0]"),
                Some(bad),
                Problem::InvalidCidr,
            );
        }
        let text = with_process_pu(
            "proxy_port = 15001\n[[pus.dependent_services]]\naddress = \"db.local\"\nports = [5432]",
        );
        assert_refused(
            &text,
            "pus[0].dependent_services[0].address",
            Some("db.local"),
            Problem::InvalidCidr,
        );
    }

    #[test]
    fn ports_outside_1_to_65535_are_refused() {
        let errors = refusals(&with_process_pu(
            "tcp_ports = [0, \"65536\", 70000, \"0:80\"]\nudp_ports = [-1]",
        ));
        assert_has(
            &errors,
            "pus[0].tcp_ports[0]",
            Some("0"),
            Problem::PortOutOfRange,
        );
        assert_has(
            &errors,
            "pus[0].tcp_ports[1]",
            Some("65536"),
            Problem::PortOutOfRange,
        );
        assert_has(
            &errors,
            "pus[0].tcp_ports[2]",
            Some("70000"),
            Problem::PortOutOfRange,
        );
        assert_has(
            &errors,
            "pus[0].tcp_ports[3]",
            Some("0:80"),
            Problem::PortOutOfRange,
        );
        assert_has(
            &errors,
            "pus[0].udp_ports[0]",
            Some("-1"),
            Problem::PortOutOfRange,
        );
        assert_eq!(errors.len(), 5);
        assert_refused(
            &with_process_pu("proxy_port = 0"),
            "pus[0].proxy_port",
            Some("0"),
            Problem::PortOutOfRange,
        );
        assert_refused(
            &with_process_pu("dns_proxy_port = 65536"),
            "pus[0].dns_proxy_port",
            Some("65536"),
            Problem::PortOutOfRange,
        );
        let acl = "[[pus.network_acls]]\nnetworks = [\"10.0.0.0/8\"]\nprotocols = [\"tcp\"]\n\
                   ports = [\"99999\"]\naction = \"accept\"\npolicy_id = \"p\"";
        assert_refused(
            &with_process_pu(acl),
            "pus[0].network_acls[0].ports[0]",
            Some("99999"),
            Problem::PortOutOfRange,
        );
    }

    #[test]
    fn reversed_and_malformed_port_ranges_are_refused() {
        assert_refused(
            &with_process_pu("tcp_ports = [\"9000:8000\"]"),
            "pus[0].tcp_ports[0]",
            Some("9000:8000"),
            Problem::ReversedPortRange,
        );
        assert_refused(
            &with_process_pu("proxy_port = 15001\nexposed_services = [\"https\"]"),
            "pus[0].exposed_services[0]",
            Some("https"),
            Problem::InvalidPortSyntax,
        );
    }

    #[test]
    fn unknown_keywords_are_refused_with_the_accepted_ones() {
        let acl = |field: &str| {
            let mut keys = vec![
                "networks = [\"10.0.0.0/8\"]".to_owned(),
                "protocols = [\"tcp\"]".to_owned(),
                "action = \"accept\"".to_owned(),
                "policy_id = \"p\"".to_owned(),
            ];
            let name = field.split(" = ").next().unwrap();
            keys.retain(|k| !k.starts_with(name));
            keys.push(field.to_owned());
            with_process_pu(&format!("[[pus.application_acls]]\n{}", keys.join("\n")))
        };
        let unknown = |expected| Problem::UnknownKeyword { expected };
        let acl0 = "pus[0].application_acls[0]";
        assert_refused(
            &acl("protocols = [\"tcp\", \"sctp\"]"),
            &format!("{acl0}.protocols[1]"),
            Some("sctp"),
            unknown(Protocol::NAMES),
        );
        assert_refused(
            &acl("action = \"allow\""),
            &format!("{acl0}.action"),
            Some("allow"),
            unknown(Action::NAMES),
        );
        assert_refused(
            &acl("observe = \"observe\""),
            &format!("{acl0}.observe"),
            Some("observe"),
            unknown(ObserveMode::NAMES),
        );
        let kind = with_process_pu("").replace("linux-process", "process");
        let errors = refusals(&kind);
        // The cgroup is not also blamed: the kind it would belong to is unknown.
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_has(
            &errors,
            "pus[0].kind",
            Some("process"),
            unknown(PuKind::NAMES),
        );
        assert_refused(
            "mode = \"server\"",
            "mode",
            Some("server"),
            unknown(Mode::NAMES),
        );
        assert_refused(
            "mode = \"sidecar\"\ndatapath = \"nft\"",
            "datapath",
            Some("nft"),
            unknown(DatapathChoice::NAMES),
        );
        assert_refused(
            "mode = \"sidecar\"\n[iptables]\nbackend = \"nftables\"",
            "iptables.backend",
            Some("nftables"),
            unknown(IptablesBackendChoice::NAMES),
        );
        let message = refusals("mode = \"server\"")[0].to_string();
        assert_eq!(
            message,
            r#"mode: "server" is not one of: local-server, remote-container, sidecar"#
        );
    }

    /// `[host] cgroup`: the root by default and as `"/"`, else a cgroup
    /// path that must stay under the mount and, loaded on a host, exist.
    #[test]
    fn the_host_scope_is_the_root_or_an_existing_cgroup() {
        let default = Configuration::from_toml_str("mode = \"sidecar\"").unwrap();
        assert_eq!(default.host.cgroup, None);
        let root = Configuration::from_toml_str("mode = \"sidecar\"\n[host]\ncgroup = \"/\"");
        assert_eq!(root.unwrap(), default);
        let text = "mode = \"local-server\"\n[host]\ncgroup = \"enforcer/hosts\"";
        let scoped = Configuration::from_toml_str(text).unwrap();
        let cgroup = CgroupPath::new("enforcer/hosts").unwrap();
        assert_eq!(scoped.host.cgroup.as_ref(), Some(&cgroup));
        // Both read back as written.
        for config in [&default, &scoped] {
            let back = Configuration::from_toml_str(&config.to_toml_string().unwrap());
            assert_eq!(&back.unwrap(), config);
        }
        for (bad, problem) in [
            ("/sys/fs/cgroup", Problem::CgroupAbsolute),
            ("a/../b", Problem::CgroupBadComponent),
            ("", Problem::Empty),
        ] {
            let text = format!("mode = \"local-server\"\n[host]\ncgroup = \"{bad}\"");
            assert_refused(&text, "host.cgroup", Some(bad), problem);
        }
        let Err(PolicyError::Invalid(errors)) = Configuration::load(text, &FakeHost(&[])) else {
            panic!("a missing host scope loaded");
        };
        let errors: Vec<_> = errors.into_iter().collect();
        assert_has(
            &errors,
            "host.cgroup",
            Some("enforcer/hosts"),
            Problem::CgroupMissing,
        );
        assert!(Configuration::load(text, &FakeHost(&["enforcer/hosts"])).is_ok());
    }

    #[test]
    fn the_iptables_backend_defaults_to_auto_and_takes_each_keyword() {
        let default = Configuration::from_toml_str("mode = \"sidecar\"").unwrap();
        assert_eq!(default.iptables.backend, IptablesBackendChoice::Auto);
        for choice in [
            IptablesBackendChoice::Auto,
            IptablesBackendChoice::Nft,
            IptablesBackendChoice::Legacy,
        ] {
            let text = format!("mode = \"sidecar\"\n[iptables]\nbackend = \"{choice}\"");
            let config = Configuration::from_toml_str(&text).unwrap();
            assert_eq!(config.iptables.backend, choice);
            let again = Configuration::from_toml_str(&config.to_toml_string().unwrap());
            assert_eq!(again.unwrap(), config);
        }
        let message = refusals("mode = \"sidecar\"\n[iptables]\nbackend = \"x\"")[0].to_string();
        assert_eq!(
            message,
            r#"iptables.backend: "x" is not one of: auto, nft, legacy"#
        );
    }

    #[test]
    fn cgroups_default_to_auto_and_a_net_cls_mount_is_absolute_and_not_for_v2() {
        let default = Configuration::from_toml_str("mode = \"local-server\"").unwrap();
        assert_eq!(default.cgroups, CgroupSettings::default());
        assert_eq!(default.cgroups.version, CgroupVersion::Auto);
        for (version, mount) in [
            ("auto", None),
            ("v2", None),
            ("v1", None),
            ("v1", Some("/sys/fs/cgroup/net_cls")),
            ("auto", Some("/mnt/net cls")),
        ] {
            let mount_line = mount.map_or(String::new(), |m| format!("net_cls_mount = \"{m}\""));
            let text = format!(
                "mode = \"local-server\"\n[cgroups]\nversion = \"{version}\"\n{mount_line}"
            );
            let config = Configuration::from_toml_str(&text).unwrap();
            assert_eq!(config.cgroups.version.as_str(), version);
            assert_eq!(
                config.cgroups.net_cls_mount.as_deref(),
                mount.map(std::path::Path::new)
            );
            let again = Configuration::from_toml_str(&config.to_toml_string().unwrap());
            assert_eq!(again.unwrap(), config);
        }
        assert_refused(
            "mode = \"local-server\"\n[cgroups]\nversion = \"v3\"",
            "cgroups.version",
            Some("v3"),
            Problem::UnknownKeyword {
                expected: &["auto", "v2", "v1"],
            },
        );
        assert_refused(
            "mode = \"local-server\"\n[cgroups]\nversion = \"v1\"\nnet_cls_mount = \"net_cls\"",
            "cgroups.net_cls_mount",
            Some("net_cls"),
            Problem::NotAbsolute,
        );
        let errors = refusals(
            "mode = \"local-server\"\n[cgroups]\nversion = \"v2\"\nnet_cls_mount = \"/nc\"",
        );
        assert_has(
            &errors,
            "cgroups.net_cls_mount",
            Some("/nc"),
            Problem::NetClsMountWithV2,
        );
        assert_eq!(
            errors[0].to_string(),
            r#"cgroups.net_cls_mount: "/nc" is a net_cls (cgroup v1) mount, but version = "v2" never uses one"#
        );
    }

    #[test]
    fn port_discovery_runs_every_500_ms_unless_told_otherwise() {
        let default = Configuration::from_toml_str("mode = \"sidecar\"").unwrap();
        assert_eq!(
            default.ports.discover_interval(),
            Some(std::time::Duration::from_millis(500))
        );
        for (ms, interval) in [(0, None), (50, Some(50))] {
            let text = format!("mode = \"sidecar\"\n[ports]\ndiscover_interval_ms = {ms}");
            let config = Configuration::from_toml_str(&text).unwrap();
            let expected = interval.map(std::time::Duration::from_millis);
            assert_eq!(config.ports.discover_interval(), expected);
            let again = Configuration::from_toml_str(&config.to_toml_string().unwrap());
            assert_eq!(again.unwrap(), config);
        }
        let message =
            refusals("mode = \"sidecar\"\n[ports]\ndiscover_interval_ms = -1")[0].to_string();
        assert!(
            message.starts_with(r#"ports.discover_interval_ms: "-1""#),
            "{message}"
        );
    }

    #[test]
    fn missing_required_keys_are_named() {
        assert_refused("", "mode", None, Problem::Missing);
        let errors = refusals("mode = \"local-server\"\n[[pus]]\ncgroup = \"a\"");
        assert_has(&errors, "pus[0].id", None, Problem::Missing);
        assert_has(&errors, "pus[0].kind", None, Problem::Missing);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        let errors = refusals(&with_process_pu(
            "[[pus.network_acls]]\nnetworks = [\"10.0.0.0/8\"]\nprotocols = [\"udp\"]",
        ));
        assert_has(
            &errors,
            "pus[0].network_acls[0].action",
            None,
            Problem::Missing,
        );
        assert_has(
            &errors,
            "pus[0].network_acls[0].policy_id",
            None,
            Problem::Missing,
        );
        assert_eq!(errors.len(), 2, "{errors:#?}");
    }

    #[test]
    fn ids_that_cannot_go_into_a_kernel_name_are_refused() {
        for bad in ["", "web frontend", "web/1", "..", &"x".repeat(65)] {
            let text = with_process_pu("").replace("id = \"web\"", &format!("id = {bad:?}"));
            assert_refused(&text, "pus[0].id", Some(bad), Problem::InvalidId);
        }
        let acl = "[[pus.application_acls]]\nnetworks = [\"10.0.0.0/8\"]\nprotocols = [\"tcp\"]\n\
                   action = \"accept\"\npolicy_id = \"a;b\"";
        assert_refused(
            &with_process_pu(acl),
            "pus[0].application_acls[0].policy_id",
            Some("a;b"),
            Problem::InvalidId,
        );
    }

    #[test]
    fn cgroup_paths_outside_the_mount_are_refused() {
        let with_cgroup =
            |cgroup: &str| with_process_pu("").replace("\"enforcer/web\"", &format!("{cgroup:?}"));
        let cases = [
            ("/sys/fs/cgroup/enforcer/web", Problem::CgroupAbsolute),
            ("enforcer/../../etc", Problem::CgroupBadComponent),
            ("enforcer/web app", Problem::CgroupBadCharacter),
            ("", Problem::Empty),
        ];
        for (bad, problem) in cases {
            assert_refused(&with_cgroup(bad), "pus[0].cgroup", Some(bad), problem);
        }
    }

    #[test]
    fn kind_specific_keys_are_required_and_refused_elsewhere() {
        let no_cgroup = with_process_pu("").replace("cgroup = \"enforcer/web\"\n", "");
        assert_refused(
            &no_cgroup,
            "pus[0].cgroup",
            None,
            Problem::Required {
                kind: "linux-process",
            },
        );
        let uid = |extra: &str| {
            format!("mode = \"local-server\"\n[[pus]]\nid = \"u\"\nkind = \"uid\"\n{extra}")
        };
        assert_refused(
            &uid(""),
            "pus[0].uid",
            None,
            Problem::Required { kind: "uid" },
        );
        assert_refused(
            &uid("uid = 1000\ncgroup = \"a\""),
            "pus[0].cgroup",
            None,
            Problem::NotForKind { kind: "uid" },
        );
        assert_refused(
            &with_process_pu("uid = 0"),
            "pus[0].uid",
            None,
            Problem::NotForKind {
                kind: "linux-process",
            },
        );
        let max = i64::from(u32::MAX - 1);
        assert_refused(
            &uid("uid = 4294967295"),
            "pus[0].uid",
            Some("4294967295"),
            Problem::OutOfRange { min: 0, max },
        );
        assert_refused(
            &uid("uid = \"1000\""),
            "pus[0].uid",
            Some("1000"),
            Problem::InvalidUserName,
        );
        let config = Configuration::from_toml_str(&uid("uid = \"www-data\"")).unwrap();
        let user = UserSpec::Name(UserName::new("www-data").unwrap());
        assert_eq!(config.pus[0].kind, PuKind::Uid { user });
    }

    #[test]
    fn the_fail_mode_is_one_of_two_keywords() {
        let mode = |text: &str| {
            Configuration::from_toml_str(&format!("mode = \"sidecar\"\n[queues]\n{text}"))
                .map(|c| c.queues.fail_mode)
        };
        assert_eq!(mode("").unwrap(), FailMode::Open);
        assert_eq!(mode("fail_mode = \"open\"").unwrap(), FailMode::Open);
        assert_eq!(mode("fail_mode = \"closed\"").unwrap(), FailMode::Closed);
        assert_refused(
            "mode = \"sidecar\"\n[queues]\nfail_mode = \"half\"",
            "queues.fail_mode",
            Some("half"),
            Problem::UnknownKeyword {
                expected: &["open", "closed"],
            },
        );
        // The two switches are one setting: no half-open combination.
        assert!(mode("bypass = true").is_err());
    }

    #[test]
    fn out_of_range_settings_are_refused() {
        let u16_range = Problem::OutOfRange { min: 0, max: 65535 };
        assert_refused(
            "mode = \"sidecar\"\n[queues]\nfirst_queue = -1",
            "queues.first_queue",
            Some("-1"),
            u16_range,
        );
        let shift_range = Problem::OutOfRange { min: 0, max: 26 };
        for bad in ["27", "-1", "4294967296"] {
            assert_refused(
                &format!("mode = \"sidecar\"\n[marks]\nshift = {bad}"),
                "marks.shift",
                Some(bad),
                shift_range.clone(),
            );
        }
        let config =
            Configuration::from_toml_str("mode = \"sidecar\"\n[marks]\nshift = 26").unwrap();
        assert_eq!(config.marks.layout().field_mask(), 0xfc00_0000);
        assert_refused(
            "mode = \"sidecar\"\n[flow_log]\noutput = \"\"",
            "flow_log.output",
            None,
            Problem::Empty,
        );
    }

    #[test]
    fn the_seeds_whole_mark_values_are_no_longer_accepted() {
        // A config written for the old format must not load with its marks
        // silently replaced by the layout's.
        let err = Configuration::from_toml_str("mode = \"sidecar\"\n[marks]\nhandshake = 0xEEEE")
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `handshake`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_shapes_and_unknown_keys_are_syntax_errors_with_a_location() {
        let err = Configuration::from_toml_str(&with_process_pu("protocol = \"tcp\"")).unwrap_err();
        let PolicyError::Syntax(_) = &err else {
            panic!("{err:?}")
        };
        let message = err.to_string();
        assert!(
            message.contains("unknown field `protocol`") && message.contains("line 6"),
            "{message}"
        );
        let err = Configuration::from_toml_str("mode = 1").unwrap_err();
        assert!(matches!(err, PolicyError::Syntax(_)), "{err:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once_in_file_order() {
        let text = "mode = \"local-server\"\ndatapath = \"bpf\"\n[networks]\nexcluded = [\"1.2.3.4/40\"]\n\
                    [[pus]]\nid = \"a b\"\nkind = \"host\"\ntcp_ports = [0]\n\
                    [[pus]]\nid = \"x\"\nkind = \"container\"";
        let paths: Vec<_> = refusals(text).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "datapath",
                "networks.excluded[0]",
                "pus[0].id",
                "pus[0].tcp_ports[0]",
                "pus[1].kind"
            ]
        );
    }
}
