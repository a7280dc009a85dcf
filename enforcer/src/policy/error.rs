//! Errors of the policy model: each one names the field path and the value
//! it refuses, so a user can find the line to fix without reading code.
//!
//! Checks *collect* problems instead of stopping at the first: a config
//! with three mistakes is reported with three lines, in file order (the
//! rules across PUs, such as duplicate ids, come after the PUs). Checks
//! that depend on a value which itself failed to parse are skipped for it
//! (a PU whose `kind` is unknown is not also checked against the mode, an
//! ACL whose only network is malformed is not also called empty).

use std::fmt;

use super::model::Mode;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not TOML, or a value of the wrong TOML type or an unknown key; the
    /// message carries the line and column.
    #[error("the config is not valid TOML or does not have the expected shape: {0}")]
    Syntax(#[from] toml::de::Error),
    /// Well-formed TOML whose values break the rules.
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
}

/// Every problem found in one configuration (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(Vec<FieldError>);

impl ValidationErrors {
    /// The problems, in the order they were found.
    pub fn as_slice(&self) -> &[FieldError] {
        &self.0
    }
}

impl IntoIterator for ValidationErrors {
    type Item = FieldError;
    type IntoIter = std::vec::IntoIter<FieldError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} problems in the configuration:", all.len())?;
                all.iter().try_for_each(|e| write!(f, "\n  {e}"))
            }
        }
    }
}

/// One refused field: `pus[1].application_acls[0].networks[2]: "10.0.0.0/33"
/// is not a valid CIDR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// Where, in the file's own key names: `pus[1].application_acls[0].ports[3]`.
    pub path: String,
    /// The offending value as written; `None` when the problem is an absent
    /// or empty field.
    pub value: Option<String>,
    /// What is wrong with it.
    pub problem: Problem,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            // Debug formatting quotes the value and escapes control
            // characters, so an invisible character in an id still shows.
            Some(value) => write!(f, "{}: {value:?} {}", self.path, self.problem),
            None => write!(f, "{}: {}", self.path, self.problem),
        }
    }
}

/// What is wrong with a field. The message reads after the quoted value
/// (`"0" is not a port number (1..=65535)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("is not a valid CIDR")]
    InvalidCidr,
    #[error(r#"is not a port or port range (write 80, "80", "8000:8080" or "8000-8080")"#)]
    InvalidPortSyntax,
    #[error("is not a port number (1..=65535)")]
    PortOutOfRange,
    #[error("is a port range whose start is above its end")]
    ReversedPortRange,
    #[error("is outside {min}..={max}")]
    OutOfRange { min: i64, max: i64 },
    #[error("is not one of: {}", .expected.join(", "))]
    UnknownKeyword { expected: &'static [&'static str] },
    #[error("is not a valid id (1 to 64 characters from A-Z a-z 0-9 _ . -)")]
    InvalidId,
    #[error(
        "is not a valid user name (up to 32 characters from A-Z a-z 0-9 _ . -, \
         starting with a letter or _; write a numeric uid as a number)"
    )]
    InvalidUserName,
    #[error(
        "is absolute; give the path relative to the cgroup mount (cgroup v2, or \
         net_cls with [cgroups] version = \"v1\")"
    )]
    CgroupAbsolute,
    #[error(r#"has an empty, "." or ".." component"#)]
    CgroupBadComponent,
    #[error("contains a character that cannot go into a rule (allowed: A-Z a-z 0-9 _ . - @ : + /)")]
    CgroupBadCharacter,
    #[error(
        "is not a directory under the cgroup mount (cgroup v2, or net_cls with \
         [cgroups] version = \"v1\")"
    )]
    CgroupMissing,
    #[error("is not an absolute path")]
    NotAbsolute,
    #[error(r#"is a net_cls (cgroup v1) mount, but version = "v2" never uses one"#)]
    NetClsMountWithV2,
    #[error(
        "has more than {max} components; the eBPF hooks look for a PU's cgroup \
         at most {max} levels below the cgroup v2 root"
    )]
    CgroupTooDeep { max: u32 },
    #[error(
        "is inside {other} {other_cgroup:?}; PU cgroups must not be nested \
         (a process below both would belong to two PUs)"
    )]
    CgroupInside { other: String, other_cgroup: String },
    #[error(
        "contains {other} {other_cgroup:?}; PU cgroups must not be nested \
         (a process below both would belong to two PUs)"
    )]
    CgroupContains { other: String, other_cgroup: String },
    #[error("is also used by {first}")]
    Duplicate { first: String },
    #[error(
        "overlaps {other} ({other_ports}); a listening port belongs to one PU \
         (incoming traffic finds its PU by the port)"
    )]
    PortsOverlap { other: String, other_ports: String },
    #[error("is a PU kind that mode {mode} does not accept (it accepts: {})", .mode.accepted_kinds().join(", "))]
    KindNotAccepted { mode: Mode },
    #[error("is a second {kind} PU; an agent instance manages at most one (the first is {first})")]
    SecondSingleton { kind: &'static str, first: String },
    #[error("is required")]
    Missing,
    #[error("is required for {kind} PUs")]
    Required { kind: &'static str },
    #[error("is not used by {kind} PUs; remove it")]
    NotForKind { kind: &'static str },
    #[error("must not be empty")]
    Empty,
    #[error("has no ports, but the ACL lists ports")]
    NoPortsForProtocol,
    #[error("cannot be combined with other protocols")]
    AnyWithOthers,
    #[error("needs tcp_ports or udp_ports: a host-service PU is identified by its ports")]
    NoServicePorts,
    #[error("needs proxy_port to be set")]
    NeedsProxyPort,
    #[error(
        "is not a valid label key (1 to 63 characters from A-Z a-z 0-9 . _ - /, starting with a letter or digit)"
    )]
    InvalidLabelKey,
    #[error("is not a valid label value (up to 63 characters from A-Z a-z 0-9 . _ -)")]
    InvalidLabelValue,
    #[error(
        "are too many labels for a handshake token (at most {max_labels}, {max_bytes} bytes encoded)"
    )]
    TooManyLabels { max_labels: usize, max_bytes: usize },
    #[error(
        r#"is not a label requirement (write "key=value", "key!=value", "key in (a, b)" or "key")"#
    )]
    InvalidSelector,
    #[error("is required when a PU has an identity policy: the handshake signs with it")]
    NeedsIdentityKey,
}

/// A field path under construction, e.g. `pus[1].application_acls[0]`.
#[derive(Debug, Clone)]
pub(crate) struct FieldPath(String);

impl FieldPath {
    /// A top-level key.
    pub(crate) fn root(key: &str) -> Self {
        Self(key.to_owned())
    }

    /// A key inside this table.
    pub(crate) fn key(&self, key: &str) -> Self {
        Self(format!("{}.{key}", self.0))
    }

    /// An element of this array.
    pub(crate) fn index(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Collects problems while a check walks the config.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    /// `path` holds `value`, which is wrong because of `problem`.
    pub(crate) fn bad(&mut self, path: &FieldPath, value: impl ToString, problem: Problem) {
        self.0.push(FieldError {
            path: path.to_string(),
            value: Some(value.to_string()),
            problem,
        });
    }

    /// `path` is wrong as a whole (absent, empty, or missing a partner).
    pub(crate) fn field(&mut self, path: &FieldPath, problem: Problem) {
        self.0.push(FieldError {
            path: path.to_string(),
            value: None,
            problem,
        });
    }

    /// Records the problem of a fallible conversion and passes its value on.
    pub(crate) fn check<T>(
        &mut self,
        path: &FieldPath,
        value: impl ToString,
        result: Result<T, Problem>,
    ) -> Option<T> {
        result
            .map_err(|problem| self.bad(path, value, problem))
            .ok()
    }

    /// How many problems are recorded so far.
    pub(crate) fn count(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Keyword;

    #[test]
    fn one_error_displays_as_one_line_with_path_and_quoted_value() {
        let mut errs = Errors::default();
        let path = FieldPath::root("pus")
            .index(1)
            .key("application_acls")
            .index(0)
            .key("networks")
            .index(2);
        errs.bad(&path, "10.0.0.0/33", Problem::InvalidCidr);
        let err = errs.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"pus[1].application_acls[0].networks[2]: "10.0.0.0/33" is not a valid CIDR"#
        );
    }

    #[test]
    fn several_errors_are_counted_and_listed_in_order() {
        let mut errs = Errors::default();
        errs.field(
            &FieldPath::root("pus").index(0).key("cgroup"),
            Problem::Required {
                kind: "linux-process",
            },
        );
        errs.bad(
            &FieldPath::root("mode"),
            "server",
            Problem::UnknownKeyword {
                expected: Mode::NAMES,
            },
        );
        let text = errs.finish().unwrap_err().to_string();
        assert_eq!(
            text,
            "2 problems in the configuration:\n  \
             pus[0].cgroup: is required for linux-process PUs\n  \
             mode: \"server\" is not one of: local-server, remote-container, sidecar"
        );
    }

    #[test]
    fn control_characters_in_values_are_escaped() {
        let mut errs = Errors::default();
        errs.bad(&FieldPath::root("id"), "a\nb", Problem::InvalidId);
        assert!(
            errs.finish()
                .unwrap_err()
                .to_string()
                .starts_with(r#"id: "a\nb" is"#)
        );
    }

    #[test]
    fn no_errors_is_ok() {
        assert!(Errors::default().finish().is_ok());
    }
}
