//! A PU's identity as `key=value` labels, and the label selectors that
//! identity policies match them with (`app=web`, `env!=dev`,
//! `tier in (front, api)`, `team`).
//!
//! Labels travel inside the handshake token, so their syntax and size
//! are bounded here, once: a [`Labels`] value always fits a token, and
//! the token parser applies the same rules to what it reads.

use std::collections::BTreeMap;
use std::fmt;

use crate::policy::Problem;

/// Longest key or value, in bytes (Kubernetes' name-segment limit).
pub const MAX_LABEL_LEN: usize = 63;
/// Most labels one identity carries.
pub const MAX_LABELS: usize = 32;
/// Most bytes the labels take in a token (a count byte, then a length
/// byte and the bytes of each key and value): keeps a SYN carrying a
/// token well under a 1500-byte MTU.
pub const MAX_ENCODED_LABELS: usize = 1024;

/// A label key: 1 to 63 bytes from `A-Z a-z 0-9 . _ - /`, starting with
/// a letter or digit.
pub fn check_key(key: &str) -> Result<(), Problem> {
    let ok_rest = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/');
    match key.as_bytes() {
        [first, rest @ ..]
            if key.len() <= MAX_LABEL_LEN
                && first.is_ascii_alphanumeric()
                && rest.iter().all(ok_rest) =>
        {
            Ok(())
        }
        _ => Err(Problem::InvalidLabelKey),
    }
}

/// A label value: 0 to 63 bytes from `A-Z a-z 0-9 . _ -`.
pub fn check_value(value: &str) -> Result<(), Problem> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if value.len() <= MAX_LABEL_LEN && value.bytes().all(ok) {
        Ok(())
    } else {
        Err(Problem::InvalidLabelValue)
    }
}

/// A validated set of labels: each key once, keys in byte order (which
/// is also the order they are encoded in a token), within the bounds
/// above.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// Checks every pair and the bounds on the whole set. The first
    /// problem is returned; the config conversion checks pair by pair
    /// itself to name each bad one.
    pub fn new<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self, Problem>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let mut labels = Labels::default();
        for (key, value) in pairs {
            let (key, value) = (key.into(), value.into());
            check_key(&key)?;
            check_value(&value)?;
            labels.0.insert(key, value);
        }
        labels.check_size()?;
        Ok(labels)
    }

    /// Refuses a set too large for a token.
    pub fn check_size(&self) -> Result<(), Problem> {
        if self.0.len() > MAX_LABELS || self.encoded_len() > MAX_ENCODED_LABELS {
            Err(Problem::TooManyLabels {
                max_labels: MAX_LABELS,
                max_bytes: MAX_ENCODED_LABELS,
            })
        } else {
            Ok(())
        }
    }

    /// The bytes the set takes in a token.
    pub fn encoded_len(&self) -> usize {
        1 + self
            .0
            .iter()
            .map(|(k, v)| 2 + k.len() + v.len())
            .sum::<usize>()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The plain map, for the config file's rendering.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.clone()
    }
}

impl fmt::Display for Labels {
    /// `app=web,tier=front`; `-` for none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (k, v) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// One requirement on a label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value`: the label is present with this value.
    Equals { key: String, value: String },
    /// `key!=value`: the label is absent or has another value (as in
    /// Kubernetes).
    NotEquals { key: String, value: String },
    /// `key in (a, b)`: the label is present with one of the values.
    In { key: String, values: Vec<String> },
    /// `key`: the label is present, whatever its value.
    Exists { key: String },
}

impl Requirement {
    /// Parses one requirement; surrounding spaces are ignored.
    pub fn parse(text: &str) -> Result<Self, Problem> {
        let text = text.trim();
        let bad = || Problem::InvalidSelector;
        let pair = |key: &str, value: &str| -> Result<(String, String), Problem> {
            let (key, value) = (key.trim(), value.trim());
            check_key(key).map_err(|_| bad())?;
            check_value(value).map_err(|_| bad())?;
            Ok((key.to_owned(), value.to_owned()))
        };
        if let Some((key, value)) = text.split_once("!=") {
            let (key, value) = pair(key, value)?;
            return Ok(Requirement::NotEquals { key, value });
        }
        if let Some((key, value)) = text.split_once('=') {
            let (key, value) = pair(key, value)?;
            return Ok(Requirement::Equals { key, value });
        }
        if let Some((key, rest)) = text.split_once(char::is_whitespace) {
            let list = rest
                .trim_start()
                .strip_prefix("in")
                .map(str::trim_start)
                .and_then(|r| r.strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(bad)?;
            check_key(key).map_err(|_| bad())?;
            if list.trim().is_empty() {
                return Err(bad());
            }
            let values = list
                .split(',')
                .map(|v| {
                    let v = v.trim();
                    check_value(v).map_err(|_| bad())?;
                    Ok(v.to_owned())
                })
                .collect::<Result<Vec<_>, Problem>>()?;
            return Ok(Requirement::In {
                key: key.to_owned(),
                values,
            });
        }
        check_key(text).map_err(|_| bad())?;
        Ok(Requirement::Exists {
            key: text.to_owned(),
        })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::Equals { key, value } => labels.get(key) == Some(value),
            Requirement::NotEquals { key, value } => labels.get(key) != Some(value),
            Requirement::In { key, values } => labels
                .get(key)
                .is_some_and(|v| values.iter().any(|x| x == v)),
            Requirement::Exists { key } => labels.get(key).is_some(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Equals { key, value } => write!(f, "{key}={value}"),
            Requirement::NotEquals { key, value } => write!(f, "{key}!={value}"),
            Requirement::In { key, values } => write!(f, "{key} in ({})", values.join(", ")),
            Requirement::Exists { key } => f.write_str(key),
        }
    }
}

/// Requirements that must all hold. No requirement matches every
/// identity (every peer whose token verified).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(pub Vec<Requirement>);

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn keys_and_values_are_checked() {
        for good in ["app", "a", "k8s.io/name", "A_b-c.d", &"k".repeat(63)] {
            assert_eq!(check_key(good), Ok(()), "{good:?}");
        }
        for bad in ["", "-a", "/a", "a b", "a=b", "é", "a,b", &"k".repeat(64)] {
            assert_eq!(check_key(bad), Err(Problem::InvalidLabelKey), "{bad:?}");
        }
        for good in ["", "web", "v1.2_3-x", &"v".repeat(63)] {
            assert_eq!(check_value(good), Ok(()), "{good:?}");
        }
        for bad in ["a b", "a/b", "a)", "\n", &"v".repeat(64)] {
            assert_eq!(check_value(bad), Err(Problem::InvalidLabelValue), "{bad:?}");
        }
    }

    #[test]
    fn a_set_too_large_for_a_token_is_refused() {
        let many = (0..=MAX_LABELS).map(|i| (format!("k{i}"), String::new()));
        assert!(matches!(
            Labels::new(many),
            Err(Problem::TooManyLabels { .. })
        ));
        // 16 labels of 63+63 bytes: 2049 bytes encoded.
        let big = (0..16).map(|i| (format!("{i:0>63}"), "v".repeat(63)));
        assert!(matches!(
            Labels::new(big),
            Err(Problem::TooManyLabels { .. })
        ));
        let ok = labels(&[("app", "web"), ("env", "prod")]);
        assert_eq!(ok.encoded_len(), 1 + 2 + 6 + 2 + 7);
        assert_eq!(ok.to_string(), "app=web,env=prod");
        assert_eq!(Labels::default().to_string(), "-");
    }

    #[test]
    fn requirements_parse_and_print_back() {
        for (text, printed) in [
            ("app=web", "app=web"),
            (" app = web ", "app=web"),
            ("env!=dev", "env!=dev"),
            ("tier in (front, api)", "tier in (front, api)"),
            ("tier in(front,api)", "tier in (front, api)"),
            ("team", "team"),
            ("app=", "app="),
        ] {
            assert_eq!(
                Requirement::parse(text).unwrap().to_string(),
                printed,
                "{text:?}"
            );
        }
        for bad in [
            "",
            "=web",
            "a b",
            "tier in front",
            "tier in ()",
            "tier in (a b)",
            "a=b=c",
            "tier notin (a)",
            "a!=b c",
            "-x",
        ] {
            assert_eq!(
                Requirement::parse(bad),
                Err(Problem::InvalidSelector),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn selectors_need_every_requirement() {
        let web = labels(&[("app", "web"), ("env", "prod"), ("tier", "front")]);
        let sel = |list: &[&str]| {
            Selector(
                list.iter()
                    .map(|r| Requirement::parse(r).unwrap())
                    .collect(),
            )
        };
        assert!(sel(&[]).matches(&web));
        assert!(sel(&["app=web", "env!=dev", "tier in (front, api)", "env"]).matches(&web));
        assert!(!sel(&["app=web", "env=dev"]).matches(&web));
        assert!(!sel(&["app=db"]).matches(&web));
        assert!(!sel(&["tier in (api, db)"]).matches(&web));
        assert!(!sel(&["team"]).matches(&web));
        // `!=` also holds when the label is absent.
        assert!(sel(&["team!=red"]).matches(&web));
        assert!(!sel(&["env!=prod"]).matches(&web));
    }
}
