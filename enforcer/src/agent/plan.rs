//! What a reload changes: the difference between the configuration in
//! force and a new one, as datapath operations ([`Step`]s). Pure: no I/O,
//! no datapath.

use std::collections::HashMap;
use std::fmt;
use std::mem::discriminant;

use crate::policy::{Configuration, NetworkSettings, Pu, PuId};

/// One datapath operation of a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a reload has a handful of steps; boxing the PUs would buy nothing"
)]
pub enum Step {
    /// `set_target_networks`: the target or excluded networks changed.
    SetTargetNetworks(NetworkSettings),
    /// `delete`: the PU is gone (or changed kind; see [`plan`]).
    Delete(Pu),
    /// `update`: the PU's policy changed; `new` replaces `old` with no gap.
    Update { new: Pu, old: Pu },
    /// `configure`: a new PU (or one that changed kind).
    Configure(Pu),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::SetTargetNetworks(_) => f.write_str("set target networks"),
            Step::Delete(pu) => write!(f, "delete {}", pu.id),
            Step::Update { new, .. } => write!(f, "update {}", new.id),
            Step::Configure(pu) => write!(f, "configure {}", pu.id),
        }
    }
}

/// The steps that take the datapath from `old` to `new`, in this order:
/// the networks, then every removed PU, then every changed PU, then every
/// new PU, each in file order. Removals come first so that a cgroup or
/// user a removed PU claimed is free before a new PU claims it.
///
/// A PU whose kind changed (say from `uid` to `linux-process`) is deleted
/// and configured again rather than updated: it is hooked in another
/// place, and `update` replaces a policy, not what the unit is.
///
/// Settings that need a restart are not compared here; see
/// [`needs_restart`].
pub fn plan(old: &Configuration, new: &Configuration) -> Vec<Step> {
    let mut steps = Vec::new();
    if old.networks != new.networks {
        steps.push(Step::SetTargetNetworks(new.networks.clone()));
    }
    let old_by_id: HashMap<&PuId, &Pu> = old.pus.iter().map(|pu| (&pu.id, pu)).collect();
    let new_by_id: HashMap<&PuId, &Pu> = new.pus.iter().map(|pu| (&pu.id, pu)).collect();
    let same_kind = |a: &Pu, b: &Pu| discriminant(&a.kind) == discriminant(&b.kind);

    for pu in &old.pus {
        match new_by_id.get(&pu.id) {
            None => steps.push(Step::Delete(pu.clone())),
            Some(&now) if !same_kind(pu, now) => steps.push(Step::Delete(pu.clone())),
            Some(_) => {}
        }
    }
    for pu in &new.pus {
        if let Some(&was) = old_by_id.get(&pu.id)
            && was != pu
            && same_kind(was, pu)
        {
            steps.push(Step::Update {
                new: pu.clone(),
                old: was.clone(),
            });
        }
    }
    for pu in &new.pus {
        match old_by_id.get(&pu.id) {
            None => steps.push(Step::Configure(pu.clone())),
            Some(&was) if !same_kind(was, pu) => steps.push(Step::Configure(pu.clone())),
            Some(_) => {}
        }
    }
    steps
}

/// The settings (config keys) that differ between `old` and `new` and
/// cannot change while the agent runs: the datapath is built for them.
/// A reload that changes any of them is refused.
pub fn needs_restart(old: &Configuration, new: &Configuration) -> Vec<&'static str> {
    [
        ("mode", old.mode == new.mode),
        ("datapath", old.datapath == new.datapath),
        ("queues", old.queues == new.queues),
        ("marks", old.marks == new.marks),
        ("iptables", old.iptables == new.iptables),
        // The discovery loop is started with its interval.
        ("ports", old.ports == new.ports),
        ("host", old.host == new.host),
        // The datapath is opened for one cgroup flavour and mount.
        ("cgroups", old.cgroups == new.cgroups),
        // Nothing reopens the flow log yet; accepting a change would
        // pretend it took effect.
        ("flow_log", old.flow_log == new.flow_log),
        // The handshake's queues copy whole packets, set when they are
        // bound: turning it on or off rebinds them. Keys and policies
        // reload.
        (
            "identity.key (turning the handshake on or off)",
            old.identity.key.is_some() == new.identity.key.is_some(),
        ),
    ]
    .into_iter()
    .filter(|&(_, same)| !same)
    .map(|(key, _)| key)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{DatapathChoice, PortRange, PuKind};

    const BASE: &str = r#"
        mode = "local-server"
        [networks]
        target_tcp = ["10.0.0.0/8"]
        [[pus]]
        id = "a"
        kind = "uid"
        uid = 1000
        tcp_ports = [80]
        [[pus]]
        id = "b"
        kind = "uid"
        uid = 1001
        [[pus]]
        id = "c"
        kind = "host-service"
        tcp_ports = [22]
    "#;

    fn config(text: &str) -> Configuration {
        Configuration::from_toml_str(text).unwrap()
    }

    fn names(steps: &[Step]) -> Vec<String> {
        steps.iter().map(Step::to_string).collect()
    }

    #[test]
    fn the_same_configuration_needs_nothing() {
        let c = config(BASE);
        assert!(plan(&c, &c).is_empty());
        assert!(needs_restart(&c, &c).is_empty());
    }

    #[test]
    fn only_the_differences_are_applied() {
        let old = config(BASE);
        let mut new = old.clone();
        // a changes ports, b is replaced by d, c stays.
        new.pus[0].tcp_ports.push(PortRange::new(443, 443).unwrap());
        new.pus[1].id = PuId::new("d").unwrap();
        let steps = plan(&old, &new);
        assert_eq!(names(&steps), ["delete b", "update a", "configure d"]);
        assert_eq!(steps[0], Step::Delete(old.pus[1].clone()));
        assert_eq!(
            steps[1],
            Step::Update {
                new: new.pus[0].clone(),
                old: old.pus[0].clone()
            }
        );
        assert_eq!(steps[2], Step::Configure(new.pus[1].clone()));
    }

    #[test]
    fn network_changes_come_first() {
        let old = config(BASE);
        let mut new = old.clone();
        new.networks.excluded = vec!["127.0.0.0/8".parse().unwrap()];
        new.pus.remove(2);
        let steps = plan(&old, &new);
        assert_eq!(names(&steps), ["set target networks", "delete c"]);
        assert_eq!(steps[0], Step::SetTargetNetworks(new.networks.clone()));
    }

    #[test]
    fn a_kind_change_is_a_delete_and_a_configure() {
        let old = config(BASE);
        let mut new = old.clone();
        new.pus[0].kind = PuKind::Host;
        assert_eq!(names(&plan(&old, &new)), ["delete a", "configure a"]);
        // A different user of the same kind is an update.
        let mut new = old.clone();
        new.pus[0].kind = old.pus[1].kind.clone();
        new.pus.remove(1);
        assert_eq!(names(&plan(&old, &new)), ["delete b", "update a"]);
    }

    #[test]
    fn from_nothing_everything_is_configured() {
        let new = config(BASE);
        let mut empty = new.clone();
        empty.pus.clear();
        assert_eq!(
            names(&plan(&empty, &new)),
            ["configure a", "configure b", "configure c"]
        );
        assert_eq!(
            names(&plan(&new, &empty)),
            ["delete a", "delete b", "delete c"]
        );
    }

    #[test]
    fn settings_the_datapath_is_built_for_need_a_restart() {
        let old = config(BASE);
        let mut new = old.clone();
        new.datapath = DatapathChoice::Iptables;
        new.queues.queues_per_range = 2;
        new.marks.shift = 16;
        assert_eq!(needs_restart(&old, &new), ["datapath", "queues", "marks"]);
        let sidecar = config("mode = \"sidecar\"");
        let local = config("mode = \"local-server\"");
        assert_eq!(needs_restart(&sidecar, &local), ["mode"]);
    }
}
