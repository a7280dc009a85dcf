//! The policy model: what the agent is told to enforce, and the config file
//! it is read from.
//!
//! This module owns the typed [`Configuration`] (agent settings plus the
//! list of [`Pu`]s with their ACLs and services), its TOML file format, and
//! every check that refuses bad input *before* anything is applied. It does
//! no I/O beyond reading a string: the one fact it needs from the host
//! (does a cgroup directory exist?) comes through the [`HostFacts`] trait,
//! and [`CgroupV2Host`] is the small real implementation the agent passes.
//!
//! Loading goes raw → typed → checked:
//! 1. `file` deserializes the TOML into loose serde structs (strings and
//!    integers), so that a bad value is reported by *our* conversion with
//!    its field path rather than by serde;
//! 2. the conversion builds the typed model (`IpNet`, [`PortRange`], enums,
//!    validated ids, the kind with its cgroup or uid) and records every
//!    field that does not convert;
//! 3. `validate` runs the rules across fields and PUs (duplicates, mode and
//!    kind pairing, one host or container PU, services needing a proxy
//!    port, ports only with TCP/UDP, mark and queue layout) and, when
//!    given [`HostFacts`], the host checks.
//!
//! Every problem found is collected and returned together as
//! [`ValidationErrors`]; see [`Configuration::from_toml_str`].

/// A fieldless enum spelled by keyword in the config file (`"tcp"`,
/// `"local-server"`, …). The CLI can parse the same spellings through it.
pub trait Keyword: Sized + Copy + 'static {
    /// Every accepted spelling, in declaration order (listed in errors).
    const NAMES: &'static [&'static str];

    /// The spelling of `self`.
    fn as_str(self) -> &'static str;

    /// Parses a spelling (exact, case-sensitive).
    fn from_name(name: &str) -> Option<Self>;
}

/// Implements [`Keyword`] and `Display` for a fieldless enum from one
/// table, so the spelling, the parser and the messages cannot drift apart.
macro_rules! keywords {
    ($ty:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        impl $crate::policy::Keyword for $ty {
            const NAMES: &'static [&'static str] = &[$($text),+];

            fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }

            fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($crate::policy::Keyword::as_str(*self))
            }
        }
    };
}

mod acl;
mod error;
mod family;
mod file;
mod host;
mod model;
mod pu;
#[cfg(test)]
pub(crate) mod test_support;
mod validate;

pub use acl::{Acl, Action, Bucket, ObserveMode, PortRange, Protocol, deciding, in_bucket_order};
pub use error::{FieldError, PolicyError, Problem, ValidationErrors};
pub use family::{HasFamily, IpFamily, PerFamily, split_by_family, split_zero_prefix};
pub use host::{CgroupV2Host, HostFacts};
pub use model::{
    CgroupSettings, CgroupVersion, Configuration, DatapathChoice, FailMode, FamilyNetworks,
    FlowLogOutput, HostSettings, IdentitySettings, IptablesBackendChoice, IptablesSettings,
    MarkSettings, Mode, NetworkSettings, PortSettings, QueueSettings,
};
pub use pu::{CgroupPath, DependentService, PolicyId, Pu, PuId, PuKind, UserName, UserSpec};
