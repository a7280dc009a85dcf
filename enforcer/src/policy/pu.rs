//! Processing units: what a PU is (its kind and how the kernel recognises
//! its traffic), its services and its ACLs, and the validated strings that
//! end up inside kernel objects (ids, cgroup paths, user names).
//!
//! The string types check their content on construction, so a value that
//! reaches a rule, a set name or a restore file has already been proven
//! harmless there.

use std::fmt;
use std::num::NonZeroU16;
use std::path::Path;

use ipnet::IpNet;

use super::acl::{Acl, PortRange};
use super::error::Problem;
use super::family::{HasFamily, IpFamily};
use crate::identity::Labels;

/// One processing unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pu {
    pub id: PuId,
    pub kind: PuKind,
    /// The PU's identity: what its handshake tokens carry and what the
    /// peers' identity policies match.
    pub labels: Labels,
    /// Listening TCP ports (the PU's port set). For a host-service PU they
    /// are the service itself.
    pub tcp_ports: Vec<PortRange>,
    /// Listening UDP ports, as `tcp_ports`.
    pub udp_ports: Vec<PortRange>,
    /// Matched against destinations of outgoing traffic.
    pub application_acls: Vec<Acl>,
    /// Matched against sources of incoming traffic.
    pub network_acls: Vec<Acl>,
    /// Where dependent and exposed service connections are redirected.
    pub proxy_port: Option<NonZeroU16>,
    pub dns_proxy_port: Option<NonZeroU16>,
    /// Outgoing connections to these are redirected to the proxy.
    pub dependent_services: Vec<DependentService>,
    /// Incoming connections to these ports are redirected to the proxy.
    pub exposed_services: Vec<PortRange>,
}

/// What a PU is, with what the kernel needs to recognise its traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PuKind {
    /// A container; the agent instance runs in its network namespace.
    Container,
    /// The processes of one cgroup on this host.
    LinuxProcess { cgroup: CgroupPath },
    /// Every process of one user.
    Uid { user: UserSpec },
    /// The whole host.
    Host,
    /// One network service of the host, by its ports.
    HostService,
}

impl PuKind {
    /// The spellings of every kind, in declaration order.
    pub const NAMES: &'static [&'static str] =
        &["container", "linux-process", "uid", "host", "host-service"];

    /// The config-file spelling.
    pub fn name(&self) -> &'static str {
        match self {
            PuKind::Container => "container",
            PuKind::LinuxProcess { .. } => "linux-process",
            PuKind::Uid { .. } => "uid",
            PuKind::Host => "host",
            PuKind::HostService => "host-service",
        }
    }

    /// Kinds an agent instance manages at most one of: a second host PU or
    /// a second container in the same namespace would claim the same
    /// traffic as the first and never see any.
    pub fn is_singleton(&self) -> bool {
        matches!(self, PuKind::Container | PuKind::Host)
    }
}

/// Generates a validated identifier type (`new`, `as_str`, `Display`).
macro_rules! ident_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Refuses anything but 1 to 64 characters from
            /// `A-Z a-z 0-9 _ . -`, starting with a letter, digit or `_`.
            pub fn new(text: impl Into<String>) -> Result<Self, Problem> {
                let text = text.into();
                if is_ident(&text) { Ok(Self(text)) } else { Err(Problem::InvalidId) }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

ident_type!(
    /// A PU's id. Its first characters go into chain and set names, and
    /// later into bpffs paths: hence ASCII only, and no leading `.` or `-`
    /// (no `..` path component, nothing that reads as an option).
    PuId
);

ident_type!(
    /// The id of the policy an ACL comes from; carried into flow logs and
    /// log prefixes, so it obeys the same rules as a [`PuId`].
    PolicyId
);

fn is_ident(text: &str) -> bool {
    is_word(text, 64, |b| b.is_ascii_alphanumeric() || b == b'_')
}

/// 1..=`max_len` bytes, the first passing `ok_first`, the rest from
/// `A-Z a-z 0-9 _ . -`.
fn is_word(text: &str, max_len: usize, ok_first: impl Fn(u8) -> bool) -> bool {
    let ok_rest = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
    match text.as_bytes() {
        [first, rest @ ..] => text.len() <= max_len && ok_first(*first) && rest.iter().all(ok_rest),
        [] => false,
    }
}

/// A cgroup path relative to the cgroup v2 mount, e.g. `enforcer/web`.
/// It goes into `-m cgroup --path` and is opened under the mount, so it
/// must stay inside it (not absolute, no `..`) and hold only characters
/// that survive a restore file unquoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(String);

impl CgroupPath {
    pub fn new(text: impl Into<String>) -> Result<Self, Problem> {
        let text = text.into();
        let ok_char = |b: u8| b.is_ascii_alphanumeric() || b"_.-@:+/".contains(&b);
        if text.is_empty() {
            Err(Problem::Empty)
        } else if text.starts_with('/') {
            Err(Problem::CgroupAbsolute)
        } else if !text.bytes().all(ok_char) {
            Err(Problem::CgroupBadCharacter)
        } else if text.split('/').any(|c| matches!(c, "" | "." | "..")) {
            Err(Problem::CgroupBadComponent)
        } else {
            Ok(Self(text))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The relative path, to join under the cgroup v2 mount.
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The user of a uid PU, as `-m owner --uid-owner` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UserSpec {
    /// A numeric uid (0..=4294967294; `u32::MAX` is `(uid_t)-1`, "none").
    Id(u32),
    /// A user name, resolved by the datapath.
    Name(UserName),
}

impl fmt::Display for UserSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserSpec::Id(uid) => write!(f, "{uid}"),
            UserSpec::Name(name) => f.write_str(name.as_str()),
        }
    }
}

/// A POSIX-portable user name: up to 32 characters from `A-Z a-z 0-9 _ . -`,
/// starting with a letter or `_`. The first-character rule also keeps a
/// quoted number (`"1000"`) from passing as a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserName(String);

impl UserName {
    pub fn new(text: impl Into<String>) -> Result<Self, Problem> {
        let text = text.into();
        let valid = is_word(&text, 32, |b| b.is_ascii_alphabetic() || b == b'_');
        if valid {
            Ok(Self(text))
        } else {
            Err(Problem::InvalidUserName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A service the PU depends on: outgoing TCP connections to `network` on
/// one of `ports` are redirected to the PU's proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependentService {
    /// An address (a /32 or /128) or a network.
    pub network: IpNet,
    /// Never empty.
    pub ports: Vec<PortRange>,
}

impl HasFamily for DependentService {
    fn family(&self) -> IpFamily {
        self.network.family()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_kernel_safe_alphabet_only() {
        for good in [
            "a",
            "pu1",
            "web-frontend-7d9f",
            "A_b.c-9",
            "_x",
            "9lives",
            &"x".repeat(64),
        ] {
            assert_eq!(PuId::new(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            ".",
            "..",
            "-rf",
            ".hidden",
            "a b",
            "a/b",
            "a;b",
            "é",
            "a\n",
            &"x".repeat(65),
        ] {
            assert_eq!(PuId::new(bad), Err(Problem::InvalidId), "{bad:?}");
            assert_eq!(PolicyId::new(bad), Err(Problem::InvalidId), "{bad:?}");
        }
    }

    #[test]
    fn cgroup_paths_must_stay_under_the_mount() {
        for good in [
            "enforcer/web",
            "system.slice/nginx.service",
            "a",
            "user.slice/user-1000.slice",
        ] {
            assert_eq!(CgroupPath::new(good).unwrap().as_path(), Path::new(good));
        }
        assert_eq!(
            CgroupPath::new("/sys/fs/cgroup/x"),
            Err(Problem::CgroupAbsolute)
        );
        for bad in ["a/../b", "..", "a/./b", "a//b", "a/"] {
            assert_eq!(
                CgroupPath::new(bad),
                Err(Problem::CgroupBadComponent),
                "{bad}"
            );
        }
        for bad in ["a b", "a\"b", "a\\x2db", "a\nb", "$(x)"] {
            assert_eq!(
                CgroupPath::new(bad),
                Err(Problem::CgroupBadCharacter),
                "{bad}"
            );
        }
        assert_eq!(CgroupPath::new(""), Err(Problem::Empty));
    }

    #[test]
    fn user_names_are_posix_portable() {
        for good in ["www-data", "_apt", "user.name", &"u".repeat(32)] {
            assert_eq!(UserName::new(good).unwrap().as_str(), good);
        }
        for bad in ["", "1000", "-x", "a b", "a:b", &"u".repeat(33)] {
            assert_eq!(UserName::new(bad), Err(Problem::InvalidUserName), "{bad:?}");
        }
    }

    #[test]
    fn kind_names_match_the_name_table() {
        let kinds = [
            PuKind::Container,
            PuKind::LinuxProcess {
                cgroup: CgroupPath::new("a").unwrap(),
            },
            PuKind::Uid {
                user: UserSpec::Id(0),
            },
            PuKind::Host,
            PuKind::HostService,
        ];
        let names: Vec<_> = kinds.iter().map(PuKind::name).collect();
        assert_eq!(names, PuKind::NAMES);
    }
}
