//! The rules that span fields or PUs, run on the typed model: whatever a
//! single field's type cannot guarantee on its own. Field syntax (CIDRs,
//! ports, keywords, ids) is checked where the file is converted; these run
//! for parsed and hand-built configurations alike.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;

use enforcer_common::maps::MAX_CGROUP_DEPTH;
use enforcer_common::marks::{MAX_SHIFT, MarkLayout};

use super::acl::{Acl, PortRange, Protocol};
use super::error::{Errors, FieldPath, Problem};
use super::host::HostFacts;
use super::model::{
    HostSettings, IdentitySettings, MAX_CLOCK_SKEW_SECONDS, MAX_TOKEN_LIFETIME_SECONDS,
    MarkSettings, Mode, QueueSettings,
};
use super::pu::{Pu, PuKind};

/// Queue layout and marks.
pub(super) fn settings(queues: &QueueSettings, marks: &MarkSettings, errs: &mut Errors) {
    let path = FieldPath::root("queues");
    // Queue numbers are u16: the whole layout must fit below 65536.
    let max_per_range = 65536 / queues.range_count();
    if !(1..=max_per_range).contains(&u32::from(queues.queues_per_range)) {
        let problem = Problem::OutOfRange {
            min: 1,
            max: max_per_range.into(),
        };
        errs.bad(
            &path.key("queues_per_range"),
            queues.queues_per_range,
            problem,
        );
    } else if u32::from(queues.first_queue) + queues.total_queues() > 65536 {
        let problem = Problem::OutOfRange {
            min: 0,
            max: i64::from(65536 - queues.total_queues()),
        };
        errs.bad(&path.key("first_queue"), queues.first_queue, problem);
    }
    if queues.queue_length == 0 {
        let problem = Problem::OutOfRange {
            min: 1,
            max: u32::MAX.into(),
        };
        errs.bad(&path.key("queue_length"), 0, problem);
    }

    // The conversion of a parsed file already refuses a bad shift with the
    // same problem; this covers configurations built in code.
    if MarkLayout::new(marks.shift).is_none() {
        let problem = Problem::OutOfRange {
            min: 0,
            max: MAX_SHIFT.into(),
        };
        errs.bad(&FieldPath::root("marks").key("shift"), marks.shift, problem);
    }
}

/// Rules across PUs and between a PU and the mode: `pus` yields each PU
/// with its index in the file (a parsed config passes every PU whose id
/// and kind converted). `mode` is `None` when it failed to parse; the
/// pairing is then skipped.
/// The handshake needs this agent's key as soon as a PU has an identity
/// policy; the token window stays within what the replay cache is sized
/// for.
pub(super) fn identity(identity: &IdentitySettings, errs: &mut Errors) {
    let path = FieldPath::root("identity");
    if identity.key.is_none() && !identity.policies.is_empty() {
        errs.field(&path.key("key"), Problem::NeedsIdentityKey);
    }
    let seconds = |ms: u64| i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    let checks = [
        (
            "token_lifetime_seconds",
            identity.window.lifetime_ms,
            1,
            MAX_TOKEN_LIFETIME_SECONDS,
        ),
        (
            "clock_skew_seconds",
            identity.window.skew_ms,
            0,
            MAX_CLOCK_SKEW_SECONDS,
        ),
    ];
    for (key, ms, min, max) in checks {
        let (min, max) = (i64::from(min), i64::from(max));
        if !(min..=max).contains(&seconds(ms)) || !ms.is_multiple_of(1000) {
            errs.bad(
                &path.key(key),
                ms as f64 / 1000.0,
                Problem::OutOfRange { min, max },
            );
        }
    }
}

pub(super) fn pus_across<'a>(
    mode: Option<Mode>,
    pus: impl IntoIterator<Item = (usize, &'a Pu)>,
    errs: &mut Errors,
) {
    let mut ids = HashMap::new();
    let mut cgroups = HashMap::new();
    // Each distinct cgroup once, at its first PU, for the nesting check.
    let mut distinct_cgroups = Vec::new();
    let mut users = HashMap::new();
    let mut singletons = HashMap::new();
    let mut listening = Vec::new();
    let list = FieldPath::root("pus");

    for (i, pu) in pus {
        let path = list.index(i);
        if let Some(first) = first_seen(&mut ids, &pu.id, i) {
            errs.bad(&path.key("id"), &pu.id, duplicate_of(&list, first));
        }

        let kind = pu.kind.name();
        match mode {
            Some(mode) if !mode.accepts(&pu.kind) => {
                errs.bad(&path.key("kind"), kind, Problem::KindNotAccepted { mode });
            }
            _ if pu.kind.is_singleton() => {
                if let Some(first) = first_seen(&mut singletons, kind, i) {
                    let first = list.index(first).to_string();
                    errs.bad(
                        &path.key("kind"),
                        kind,
                        Problem::SecondSingleton { kind, first },
                    );
                }
            }
            _ => {}
        }
        match &pu.kind {
            PuKind::LinuxProcess { cgroup } => {
                if let Some(first) = first_seen(&mut cgroups, cgroup.as_str(), i) {
                    errs.bad(&path.key("cgroup"), cgroup, duplicate_of(&list, first));
                } else {
                    distinct_cgroups.push((i, cgroup.as_str()));
                }
            }
            PuKind::Uid { user } => {
                if let Some(first) = first_seen(&mut users, user, i) {
                    errs.bad(&path.key("uid"), user, duplicate_of(&list, first));
                }
            }
            PuKind::Container | PuKind::Host | PuKind::HostService => {}
        }
        for (key, ports) in [("tcp_ports", &pu.tcp_ports), ("udp_ports", &pu.udp_ports)] {
            for (j, &range) in ports.iter().enumerate() {
                listening.push((key, range, i, j));
            }
        }
    }
    nested_cgroups(&cgroups, &distinct_cgroups, errs);
    ports_have_one_owner(listening, errs);
}

/// Refuses a listening port (TCP or UDP) that two PUs claim: an incoming
/// packet is a PU's by its destination port, so a shared one would be
/// judged by whichever PU a datapath happened to find. Ranges are sorted
/// by protocol and start, so each is compared with the furthest-reaching
/// one before it; a range is blamed on the later PU in the file, naming
/// the earlier. Ports repeated within one PU are harmless.
fn ports_have_one_owner(
    mut listening: Vec<(&'static str, PortRange, usize, usize)>,
    errs: &mut Errors,
) {
    let list = FieldPath::root("pus");
    listening.sort_by_key(|&(key, range, pu, j)| (key, range.start(), pu, j));
    let mut found = Vec::new();
    // The range reaching furthest so far in this protocol: (key, range, pu, j).
    let mut reach: Option<(&str, PortRange, usize, usize)> = None;
    for (key, range, pu, j) in listening {
        match reach {
            Some((k, r, owner, oj)) if k == key && range.start() <= r.end() => {
                if owner != pu {
                    let (blamed, bj, br, other, ok, or) = if pu > owner {
                        (pu, j, range, owner, oj, r)
                    } else {
                        (owner, oj, r, pu, j, range)
                    };
                    let problem = Problem::PortsOverlap {
                        other: list.index(other).key(key).index(ok).to_string(),
                        other_ports: or.to_string(),
                    };
                    found.push((blamed, list.index(blamed).key(key).index(bj), br, problem));
                }
                if range.end() > r.end() {
                    reach = Some((key, range, pu, j));
                }
            }
            _ => reach = Some((key, range, pu, j)),
        }
    }
    found.sort_by_key(|(blamed, ..)| *blamed);
    for (_, path, value, problem) in found {
        errs.bad(&path, value, problem);
    }
}

/// Refuses PU cgroups nested in one another (`a` and `a/b`): a process in
/// `a/b` would belong to both PUs, and which policy applied would depend
/// on the datapath. Each cgroup is paired with its nearest PU ancestor
/// (by components, so `a` is no ancestor of `ab`), and the pair is blamed
/// on whichever of the two comes later in the file, naming the other.
/// `first` maps each cgroup to the first PU that uses it; `distinct`
/// lists each cgroup once with that PU. Looks up each cgroup's ancestors
/// (at most its depth) instead of comparing every pair of PUs.
fn nested_cgroups(first: &HashMap<&str, usize>, distinct: &[(usize, &str)], errs: &mut Errors) {
    let list = FieldPath::root("pus");
    let mut found = Vec::new();
    for &(inner, cgroup) in distinct {
        let nearest = cgroup
            .rmatch_indices('/')
            .find_map(|(end, _)| first.get_key_value(&cgroup[..end]));
        let Some((&outer_cgroup, &outer)) = nearest else {
            continue;
        };
        let field = |i: usize| list.index(i).key("cgroup");
        let (blamed, value, problem) = if inner > outer {
            let problem = Problem::CgroupInside {
                other: field(outer).to_string(),
                other_cgroup: outer_cgroup.to_owned(),
            };
            (inner, cgroup, problem)
        } else {
            let problem = Problem::CgroupContains {
                other: field(inner).to_string(),
                other_cgroup: cgroup.to_owned(),
            };
            (outer, outer_cgroup, problem)
        };
        found.push((blamed, field(blamed), value, problem));
    }
    // In file order, as every other problem.
    found.sort_by_key(|(blamed, ..)| *blamed);
    for (_, path, value, problem) in found {
        errs.bad(&path, value, problem);
    }
}

/// Rules within one PU at `path`.
pub(super) fn pu_within(pu: &Pu, path: &FieldPath, errs: &mut Errors) {
    // The eBPF hooks find a task's PU by walking up from its cgroup at
    // most MAX_CGROUP_DEPTH levels below the root; a deeper PU cgroup
    // would be enforced for some of its processes and not for others.
    // The path is relative to the cgroup v2 mount, so its components are
    // its level below the root (inside a cgroup namespace the kernel's
    // level is higher still, which only the datapath can see).
    if let PuKind::LinuxProcess { cgroup } = &pu.kind
        && cgroup.as_str().split('/').count() > MAX_CGROUP_DEPTH as usize
    {
        let problem = Problem::CgroupTooDeep {
            max: MAX_CGROUP_DEPTH,
        };
        errs.bad(&path.key("cgroup"), cgroup, problem);
    }
    if pu.kind == PuKind::HostService && pu.tcp_ports.is_empty() && pu.udp_ports.is_empty() {
        errs.field(path, Problem::NoServicePorts);
    }
    if pu.proxy_port.is_none() {
        for (key, used) in [
            ("dependent_services", !pu.dependent_services.is_empty()),
            ("exposed_services", !pu.exposed_services.is_empty()),
        ] {
            if used {
                errs.field(&path.key(key), Problem::NeedsProxyPort);
            }
        }
    }
    for (k, service) in pu.dependent_services.iter().enumerate() {
        if service.ports.is_empty() {
            let path = path.key("dependent_services").index(k).key("ports");
            errs.field(&path, Problem::Empty);
        }
    }
    for (key, acls) in [
        ("application_acls", &pu.application_acls),
        ("network_acls", &pu.network_acls),
    ] {
        for (j, acl) in acls.iter().enumerate() {
            acl_rules(acl, &path.key(key).index(j), errs);
        }
    }
}

/// An ACL matches something, and only asks for ports where there are ports.
fn acl_rules(acl: &Acl, path: &FieldPath, errs: &mut Errors) {
    if acl.networks.is_empty() {
        errs.field(&path.key("networks"), Problem::Empty);
    }
    if acl.protocols.is_empty() {
        errs.field(&path.key("protocols"), Problem::Empty);
    }
    let protocols = path.key("protocols");
    for (p, &protocol) in acl.protocols.iter().enumerate() {
        if protocol == Protocol::Any && acl.protocols.len() > 1 {
            // `any` is evaluated after every specific-protocol ACL; mixed
            // with others it would have to sit in two places at once.
            errs.bad(&protocols.index(p), protocol, Problem::AnyWithOthers);
        } else if !protocol.has_ports() && !acl.ports.is_empty() {
            errs.bad(&protocols.index(p), protocol, Problem::NoPortsForProtocol);
        }
    }
}

/// Host facts: every linux-process PU's cgroup directory exists.
pub(super) fn host<'a>(
    pus: impl IntoIterator<Item = (usize, &'a Pu)>,
    host: &dyn HostFacts,
    errs: &mut Errors,
) {
    for (i, pu) in pus {
        if let PuKind::LinuxProcess { cgroup } = &pu.kind
            && !host.cgroup_dir_exists(cgroup)
        {
            let path = FieldPath::root("pus").index(i).key("cgroup");
            errs.bad(&path, cgroup, Problem::CgroupMissing);
        }
    }
}

/// Host facts: the host scope's cgroup directory exists.
pub(super) fn host_scope(settings: &HostSettings, host: &dyn HostFacts, errs: &mut Errors) {
    if let Some(cgroup) = &settings.cgroup
        && !host.cgroup_dir_exists(cgroup)
    {
        let path = FieldPath::root("host").key("cgroup");
        errs.bad(&path, cgroup, Problem::CgroupMissing);
    }
}

/// Remembers where `key` was first seen; returns that index on a repeat.
fn first_seen<K: Eq + Hash>(seen: &mut HashMap<K, usize>, key: K, i: usize) -> Option<usize> {
    match seen.entry(key) {
        Entry::Occupied(first) => Some(*first.get()),
        Entry::Vacant(slot) => {
            slot.insert(i);
            None
        }
    }
}

fn duplicate_of(list: &FieldPath, first: usize) -> Problem {
    Problem::Duplicate {
        first: list.index(first).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::{
        FakeHost, assert_has, assert_refused, refusals, with_process_pu,
    };
    use crate::policy::{Configuration, PuId};

    fn acl(keys: &str) -> String {
        with_process_pu(&format!(
            "[[pus.application_acls]]\naction = \"accept\"\npolicy_id = \"p\"\n{keys}"
        ))
    }

    #[test]
    fn duplicate_ids_cgroups_and_users_are_refused() {
        let text = format!(
            "{}\n[[pus]]\nid = \"web\"\nkind = \"linux-process\"\ncgroup = \"enforcer/web\"",
            with_process_pu("")
        );
        let errors = refusals(&text);
        let first = "pus[0]".to_owned();
        assert_has(
            &errors,
            "pus[1].id",
            Some("web"),
            Problem::Duplicate {
                first: first.clone(),
            },
        );
        assert_has(
            &errors,
            "pus[1].cgroup",
            Some("enforcer/web"),
            Problem::Duplicate {
                first: first.clone(),
            },
        );
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_eq!(
            errors[0].to_string(),
            r#"pus[1].id: "web" is also used by pus[0]"#
        );

        let uid =
            |id: &str| format!("[[pus]]\nid = \"{id}\"\nkind = \"uid\"\nuid = \"www-data\"\n");
        let text = format!("mode = \"local-server\"\n{}{}", uid("a"), uid("b"));
        assert_refused(
            &text,
            "pus[1].uid",
            Some("www-data"),
            Problem::Duplicate { first },
        );
    }

    /// A local-server config with one linux-process PU per `(id, cgroup)`.
    fn process_pus(pus: &[(&str, &str)]) -> String {
        let mut text = "mode = \"local-server\"\n".to_owned();
        for (id, cgroup) in pus {
            text += &format!(
                "[[pus]]\nid = \"{id}\"\nkind = \"linux-process\"\ncgroup = \"{cgroup}\"\n"
            );
        }
        text
    }

    fn inside(other: usize, other_cgroup: &str) -> Problem {
        Problem::CgroupInside {
            other: format!("pus[{other}].cgroup"),
            other_cgroup: other_cgroup.into(),
        }
    }

    fn contains(other: usize, other_cgroup: &str) -> Problem {
        Problem::CgroupContains {
            other: format!("pus[{other}].cgroup"),
            other_cgroup: other_cgroup.into(),
        }
    }

    #[test]
    fn nested_cgroups_are_refused_naming_both_pus() {
        // The later PU is blamed, whichever of the two is the inner one.
        let text = process_pus(&[("web", "enforcer/web"), ("worker", "enforcer/web/worker")]);
        assert_refused(
            &text,
            "pus[1].cgroup",
            Some("enforcer/web/worker"),
            inside(0, "enforcer/web"),
        );
        assert_eq!(
            refusals(&text)[0].to_string(),
            r#"pus[1].cgroup: "enforcer/web/worker" is inside pus[0].cgroup "enforcer/web"; PU cgroups must not be nested (a process below both would belong to two PUs)"#
        );
        let text = process_pus(&[("worker", "enforcer/web/worker"), ("web", "enforcer/web")]);
        assert_refused(
            &text,
            "pus[1].cgroup",
            Some("enforcer/web"),
            contains(0, "enforcer/web/worker"),
        );
        assert_eq!(
            refusals(&text)[0].to_string(),
            r#"pus[1].cgroup: "enforcer/web" contains pus[0].cgroup "enforcer/web/worker"; PU cgroups must not be nested (a process below both would belong to two PUs)"#
        );

        // Nesting is by components: a shared prefix of characters is not.
        let siblings = process_pus(&[
            ("a", "enforcer/web"),
            ("b", "enforcer/web2"),
            ("c", "enforcer/we"),
        ]);
        assert!(Configuration::from_toml_str(&siblings).is_ok());

        // Each cgroup is paired with its nearest PU ancestor only.
        let chain = process_pus(&[("a", "a"), ("c", "a/b/c"), ("b", "a/b"), ("d", "a/b/c/d")]);
        let errors = refusals(&chain);
        assert_has(&errors, "pus[2].cgroup", Some("a/b"), contains(1, "a/b/c"));
        assert_has(&errors, "pus[2].cgroup", Some("a/b"), inside(0, "a"));
        assert_has(
            &errors,
            "pus[3].cgroup",
            Some("a/b/c/d"),
            inside(1, "a/b/c"),
        );
        assert_eq!(errors.len(), 3, "{errors:#?}");

        // A duplicate is reported as one, not also as nested.
        let twice = process_pus(&[("a", "a"), ("b", "a/b"), ("c", "a/b")]);
        let errors = refusals(&twice);
        assert_has(&errors, "pus[1].cgroup", Some("a/b"), inside(0, "a"));
        let first = "pus[1]".into();
        assert_has(
            &errors,
            "pus[2].cgroup",
            Some("a/b"),
            Problem::Duplicate { first },
        );
        assert_eq!(errors.len(), 2, "{errors:#?}");
    }

    #[test]
    fn cgroups_deeper_than_the_ebpf_hooks_search_are_refused() {
        let depth = |n: u32| {
            (1..=n)
                .map(|level| format!("l{level}"))
                .collect::<Vec<_>>()
                .join("/")
        };
        let deepest = depth(MAX_CGROUP_DEPTH);
        assert!(Configuration::from_toml_str(&process_pus(&[("web", &deepest)])).is_ok());

        let too_deep = depth(MAX_CGROUP_DEPTH + 1);
        let text = process_pus(&[("web", &too_deep)]);
        let problem = Problem::CgroupTooDeep {
            max: MAX_CGROUP_DEPTH,
        };
        assert_refused(&text, "pus[0].cgroup", Some(&too_deep), problem.clone());
        assert_eq!(
            refusals(&text)[0].to_string(),
            format!(
                "pus[0].cgroup: {too_deep:?} has more than 16 components; the eBPF hooks \
                 look for a PU's cgroup at most 16 levels below the cgroup v2 root"
            )
        );

        // A configuration built in code is checked the same way.
        let mut config = Configuration::from_toml_str(&with_process_pu("")).unwrap();
        config.pus[0].kind = PuKind::LinuxProcess {
            cgroup: crate::policy::CgroupPath::new(too_deep.clone()).unwrap(),
        };
        let errors = config.validate(&FakeHost(&[])).unwrap_err();
        assert_has(errors.as_slice(), "pus[0].cgroup", Some(&too_deep), problem);
    }

    #[test]
    fn kinds_the_mode_does_not_manage_are_refused() {
        let text = "mode = \"local-server\"\n[[pus]]\nid = \"c\"\nkind = \"container\"";
        assert_refused(
            text,
            "pus[0].kind",
            Some("container"),
            Problem::KindNotAccepted {
                mode: Mode::LocalServer,
            },
        );
        assert_eq!(
            refusals(text)[0].to_string(),
            "pus[0].kind: \"container\" is a PU kind that mode local-server does not accept \
             (it accepts: linux-process, uid, host, host-service)"
        );
        let sidecar = with_process_pu("").replace("local-server", "sidecar");
        assert_refused(
            &sidecar,
            "pus[0].kind",
            Some("linux-process"),
            Problem::KindNotAccepted {
                mode: Mode::Sidecar,
            },
        );
        for kind in ["host", "host-service", "uid"] {
            let text = format!(
                "mode = \"remote-container\"\n[[pus]]\nid = \"h\"\nkind = \"{kind}\"\ntcp_ports = [22]"
            );
            let text = if kind == "uid" {
                format!("{text}\nuid = 0")
            } else {
                text
            };
            let mode = Mode::RemoteContainer;
            assert_refused(
                &text,
                "pus[0].kind",
                Some(kind),
                Problem::KindNotAccepted { mode },
            );
        }
    }

    /// SPEC, "Mode": local-server manages linux-process, uid, host and
    /// host-service PUs, remote-container and sidecar their container;
    /// every other pairing is refused, naming the kind and the mode. The
    /// whole table, written out here rather than derived from
    /// `Mode::accepted_kinds`, so that a change there fails here.
    #[test]
    fn every_pairing_spec_forbids_is_refused_and_every_other_accepted() {
        let allowed = [
            (Mode::LocalServer, "linux-process"),
            (Mode::LocalServer, "uid"),
            (Mode::LocalServer, "host"),
            (Mode::LocalServer, "host-service"),
            (Mode::RemoteContainer, "container"),
            (Mode::Sidecar, "container"),
        ];
        let kind_fields = |kind: &str| match kind {
            "linux-process" => "cgroup = \"enforcer/web\"",
            "uid" => "uid = 1000",
            "host-service" => "tcp_ports = [22]",
            _ => "",
        };
        for mode in [Mode::LocalServer, Mode::RemoteContainer, Mode::Sidecar] {
            for &kind in PuKind::NAMES {
                let text = format!(
                    "mode = \"{mode}\"\n[[pus]]\nid = \"p\"\nkind = \"{kind}\"\n{}",
                    kind_fields(kind)
                );
                if allowed.contains(&(mode, kind)) {
                    let loaded = Configuration::from_toml_str(&text);
                    assert!(loaded.is_ok(), "{mode} with {kind}: {loaded:?}");
                } else {
                    let problem = Problem::KindNotAccepted { mode };
                    assert_refused(&text, "pus[0].kind", Some(kind), problem);
                }
            }
        }
    }

    #[test]
    fn a_second_container_or_host_pu_is_refused() {
        let text = "mode = \"remote-container\"\n[[pus]]\nid = \"a\"\nkind = \"container\"\n\
                    [[pus]]\nid = \"b\"\nkind = \"container\"";
        let problem = Problem::SecondSingleton {
            kind: "container",
            first: "pus[0]".into(),
        };
        assert_refused(text, "pus[1].kind", Some("container"), problem);
        let text = "mode = \"local-server\"\n[[pus]]\nid = \"a\"\nkind = \"host\"\n\
                    [[pus]]\nid = \"b\"\nkind = \"host-service\"\ntcp_ports = [22]\n\
                    [[pus]]\nid = \"c\"\nkind = \"host\"";
        let problem = Problem::SecondSingleton {
            kind: "host",
            first: "pus[0]".into(),
        };
        assert_refused(text, "pus[2].kind", Some("host"), problem);
    }

    #[test]
    fn a_listening_port_belongs_to_one_pu() {
        let pu = |id: &str, cgroup: &str, ports: &str| {
            format!(
                "[[pus]]\nid = \"{id}\"\nkind = \"linux-process\"\ncgroup = \"{cgroup}\"\n{ports}\n"
            )
        };
        let text = format!(
            "mode = \"local-server\"\n{}{}{}",
            pu(
                "a",
                "x/a",
                "tcp_ports = [80, \"8000:8080\"]\nudp_ports = [53]"
            ),
            pu(
                "b",
                "x/b",
                "tcp_ports = [443, \"8080:8090\"]\nudp_ports = [80]"
            ),
            pu("c", "x/c", "udp_ports = [53, 53]"),
        );
        let errors = refusals(&text);
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        // c's two 53s are each blamed; its repeat within c is not.
        assert_eq!(shown.len(), 3, "{shown:#?}");
        assert!(
            shown[0].starts_with(
                "pus[1].tcp_ports[1]: \"8080:8090\" overlaps pus[0].tcp_ports[1] (8000:8080)"
            ),
            "{shown:#?}"
        );
        assert!(
            shown[1].starts_with("pus[2].udp_ports[0]: \"53\" overlaps pus[0].udp_ports[0] (53)"),
            "{shown:#?}"
        );
        assert!(
            shown[2].starts_with("pus[2].udp_ports[1]: \"53\""),
            "{shown:#?}"
        );
    }

    #[test]
    fn a_host_service_needs_ports() {
        let text = "mode = \"local-server\"\n[[pus]]\nid = \"ssh\"\nkind = \"host-service\"";
        assert_refused(text, "pus[0]", None, Problem::NoServicePorts);
        let udp_only = format!("{text}\nudp_ports = [53]");
        assert!(Configuration::from_toml_str(&udp_only).is_ok());
    }

    #[test]
    fn services_need_a_proxy_port_and_dependent_services_need_ports() {
        let service = "[[pus.dependent_services]]\naddress = \"10.0.0.0/24\"";
        let errors = refusals(&with_process_pu(&format!(
            "exposed_services = [8443]\n{service}"
        )));
        assert_has(
            &errors,
            "pus[0].dependent_services",
            None,
            Problem::NeedsProxyPort,
        );
        assert_has(
            &errors,
            "pus[0].exposed_services",
            None,
            Problem::NeedsProxyPort,
        );
        assert_has(
            &errors,
            "pus[0].dependent_services[0].ports",
            None,
            Problem::Empty,
        );
        assert_eq!(errors.len(), 3, "{errors:#?}");
    }

    #[test]
    fn acls_must_match_something() {
        let errors = refusals(&acl(""));
        assert_has(
            &errors,
            "pus[0].application_acls[0].networks",
            None,
            Problem::Empty,
        );
        assert_has(
            &errors,
            "pus[0].application_acls[0].protocols",
            None,
            Problem::Empty,
        );
        assert_eq!(errors.len(), 2, "{errors:#?}");
    }

    #[test]
    fn a_bad_value_is_not_blamed_again_through_its_consequences() {
        // The only network is bad: "networks must not be empty" would be noise.
        let text = acl("networks = [\"10.0.0.0/33\"]\nprotocols = [\"tcp\"]");
        assert_refused(
            &text,
            "pus[0].application_acls[0].networks[0]",
            Some("10.0.0.0/33"),
            Problem::InvalidCidr,
        );
    }

    #[test]
    fn ports_only_go_with_tcp_and_udp() {
        let path = "pus[0].application_acls[0].protocols";
        for protocol in ["icmp", "icmpv6", "any"] {
            let text = acl(&format!(
                "networks = [\"10.0.0.0/8\"]\nprotocols = [\"{protocol}\"]\nports = [80]"
            ));
            assert_refused(
                &text,
                &format!("{path}[0]"),
                Some(protocol),
                Problem::NoPortsForProtocol,
            );
        }
        let text = acl(
            "networks = [\"10.0.0.0/8\"]\nprotocols = [\"tcp\", \"icmp\"]\nports = [\"1:1024\"]",
        );
        assert_refused(
            &text,
            &format!("{path}[1]"),
            Some("icmp"),
            Problem::NoPortsForProtocol,
        );
        let text = acl("networks = [\"10.0.0.0/8\"]\nprotocols = [\"udp\", \"any\"]");
        assert_refused(
            &text,
            &format!("{path}[1]"),
            Some("any"),
            Problem::AnyWithOthers,
        );
        let fine = acl("networks = [\"10.0.0.0/8\"]\nprotocols = [\"icmp\", \"icmpv6\"]");
        assert!(Configuration::from_toml_str(&fine).is_ok());
    }

    #[test]
    fn queue_layouts_must_fit_the_queue_numbers() {
        let queues = |keys: &str| format!("mode = \"sidecar\"\n[queues]\n{keys}");
        assert_refused(
            &queues("queues_per_range = 0"),
            "queues.queues_per_range",
            Some("0"),
            Problem::OutOfRange { min: 1, max: 8192 },
        );
        // 8 ranges of 4 queues from 65505 would end at queue 65536.
        assert_refused(
            &queues("first_queue = 65505"),
            "queues.first_queue",
            Some("65505"),
            Problem::OutOfRange { min: 0, max: 65504 },
        );
        assert!(Configuration::from_toml_str(&queues("first_queue = 65504")).is_ok());
        assert!(
            Configuration::from_toml_str(&queues("first_queue = 65505\nseparation = false"))
                .is_ok()
        );
        assert_refused(
            &queues("queue_length = 0"),
            "queues.queue_length",
            Some("0"),
            Problem::OutOfRange {
                min: 1,
                max: u32::MAX.into(),
            },
        );
    }

    #[test]
    fn validate_checks_a_configuration_built_in_code() {
        let mut config = Configuration::from_toml_str(&with_process_pu("")).unwrap();
        let host = FakeHost(&["enforcer/web"]);
        assert_eq!(config.validate(&host), Ok(()));

        let mut twin = config.pus[0].clone();
        twin.kind = PuKind::Container;
        config.pus.push(twin);
        let mut other = config.pus[0].clone();
        other.id = PuId::new("other").unwrap();
        other.kind = PuKind::LinuxProcess {
            cgroup: crate::policy::CgroupPath::new("enforcer/gone").unwrap(),
        };
        config.pus.push(other);
        config.queues.queues_per_range = 0;
        config.marks.shift = 27;

        let errors = config.validate(&host).unwrap_err();
        let errors = errors.as_slice();
        assert_has(
            errors,
            "queues.queues_per_range",
            Some("0"),
            Problem::OutOfRange { min: 1, max: 8192 },
        );
        assert_has(
            errors,
            "marks.shift",
            Some("27"),
            Problem::OutOfRange { min: 0, max: 26 },
        );
        assert_has(
            errors,
            "pus[1].id",
            Some("web"),
            Problem::Duplicate {
                first: "pus[0]".into(),
            },
        );
        let mode = Mode::LocalServer;
        assert_has(
            errors,
            "pus[1].kind",
            Some("container"),
            Problem::KindNotAccepted { mode },
        );
        assert_has(
            errors,
            "pus[2].cgroup",
            Some("enforcer/gone"),
            Problem::CgroupMissing,
        );
        assert_eq!(errors.len(), 5, "{errors:#?}");
    }
}
