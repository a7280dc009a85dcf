//! Helpers for the policy tests (a fake host, assertions on refusals) and
//! for every test that needs a model value built in code.

use super::{
    Acl, Action, Configuration, FieldError, HostFacts, ObserveMode, PolicyError, PolicyId,
    PortRange, Problem, Protocol, QueueSettings, pu::CgroupPath,
};

/// An enforced, unlogged ACL.
pub(crate) fn acl(
    nets: &[&str],
    protocols: &[Protocol],
    ports: &[(u16, u16)],
    action: Action,
    policy_id: &str,
) -> Acl {
    Acl {
        networks: nets.iter().map(|n| n.parse().unwrap()).collect(),
        protocols: protocols.to_vec(),
        ports: ports
            .iter()
            .map(|&(a, b)| PortRange::new(a, b).unwrap())
            .collect(),
        action,
        log: false,
        observe: ObserveMode::None,
        policy_id: PolicyId::new(policy_id).unwrap(),
    }
}

/// A queue layout; the rest of the settings are the defaults.
pub(crate) fn queue_settings(separation: bool, per_range: u16, first: u16) -> QueueSettings {
    QueueSettings {
        separation,
        queues_per_range: per_range,
        first_queue: first,
        ..QueueSettings::default()
    }
}

/// A host on which exactly the listed cgroup directories exist.
pub(super) struct FakeHost(pub(super) &'static [&'static str]);

impl HostFacts for FakeHost {
    fn cgroup_dir_exists(&self, path: &CgroupPath) -> bool {
        self.0.contains(&path.as_str())
    }
}

/// A local-server config with one linux-process PU `web` in cgroup
/// `enforcer/web`, followed by `extra` (keys of that PU, or its sub-tables).
pub(super) fn with_process_pu(extra: &str) -> String {
    format!(
        "mode = \"local-server\"\n\
         [[pus]]\nid = \"web\"\nkind = \"linux-process\"\ncgroup = \"enforcer/web\"\n{extra}"
    )
}

/// The problems `from_toml_str` reports for `text`; panics if it loads.
pub(super) fn refusals(text: &str) -> Vec<FieldError> {
    match Configuration::from_toml_str(text) {
        Err(PolicyError::Invalid(errors)) => errors.into_iter().collect(),
        other => panic!("expected a validation error, got {other:?}\nfor:\n{text}"),
    }
}

/// `errors` contain exactly this problem at `path` with `value`, and its
/// message names both.
pub(super) fn assert_has(errors: &[FieldError], path: &str, value: Option<&str>, problem: Problem) {
    let expected = FieldError {
        path: path.to_owned(),
        value: value.map(str::to_owned),
        problem,
    };
    assert!(
        errors.contains(&expected),
        "missing {expected}\nin {errors:#?}"
    );
    let message = expected.to_string();
    assert!(message.starts_with(&format!("{path}: ")), "{message}");
    if let Some(value) = value {
        assert!(message.contains(&format!("{value:?}")), "{message}");
    }
}

/// `text` is refused with exactly one problem, the given one.
pub(super) fn assert_refused(text: &str, path: &str, value: Option<&str>, problem: Problem) {
    let errors = refusals(text);
    assert_has(&errors, path, value, problem);
    assert_eq!(errors.len(), 1, "expected one problem, got {errors:#?}");
}
