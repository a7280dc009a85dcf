//! An agent instance's name and the host paths derived from it: its pin
//! directory on bpffs and its default control socket. Several instances
//! (one per test namespace, say) coexist by name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::policy::PuId;

/// A validated instance name: 1 to 64 characters from `A-Z a-z 0-9 _ . -`,
/// not starting with `.` or `-` — the rule of a PU id, because the name
/// becomes a path component (`/sys/fs/bpf/<name>`, `/run/enforcer/<name>.sock`)
/// and must not be `..` or read as an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceName(String);

impl InstanceName {
    pub const DEFAULT: &str = "enforcer";

    /// Where default control sockets live.
    pub const CONTROL_DIR: &str = "/run/enforcer";

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `/run/enforcer/<name>.sock`.
    pub fn control_socket(&self) -> PathBuf {
        Path::new(Self::CONTROL_DIR).join(format!("{}.sock", self.0))
    }

    /// `/run/enforcer/<name>.net_cls`: the cgroups this instance gave a
    /// net_cls class id ([`crate::datapath::netcls`]), for `run` and
    /// `cleanup` to reset after a crash.
    pub fn net_cls_record(&self) -> PathBuf {
        Path::new(Self::CONTROL_DIR).join(format!("{}.net_cls", self.0))
    }

    /// `<bpffs>/enforcer/<name>`: every pin of this instance, and nothing
    /// else. Under a directory of the project's own, so that no instance
    /// name can make `run` or `cleanup` remove another program's pins
    /// (iproute2 keeps its own under `<bpffs>/tc`, for one).
    pub fn pin_dir(&self, bpffs: &Path) -> PathBuf {
        bpffs.join("enforcer").join(&self.0)
    }
}

impl Default for InstanceName {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl FromStr for InstanceName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        PuId::new(text)
            .map(|_| Self(text.to_owned()))
            .map_err(|problem| format!("{text:?} {problem}"))
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_safe_path_components() {
        for good in ["enforcer", "agentdev1", "test_1.a-b", &"x".repeat(64)] {
            assert_eq!(good.parse::<InstanceName>().unwrap().as_str(), good);
        }
        for bad in [
            "",
            ".",
            "..",
            "-x",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            let err = bad.parse::<InstanceName>().unwrap_err();
            assert!(err.contains("is not a valid id"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn paths_derive_from_the_name() {
        let name: InstanceName = "t1".parse().unwrap();
        assert_eq!(
            name.control_socket(),
            PathBuf::from("/run/enforcer/t1.sock")
        );
        assert_eq!(
            name.pin_dir(Path::new("/sys/fs/bpf")),
            PathBuf::from("/sys/fs/bpf/enforcer/t1")
        );
        assert_eq!(InstanceName::default().as_str(), "enforcer");
    }
}
