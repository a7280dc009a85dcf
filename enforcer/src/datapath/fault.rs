//! TEST-ONLY fault injection: makes the *last* kernel batch of one call of
//! `configure`, `update` or `set_target_networks` fail, so that the
//! transaction tests (`tests/tests/transactions.rs`) can show against the
//! real kernel that a failure at the worst moment leaves the previous state
//! in force (SPEC, "Bad input and faults").
//!
//! Armed only by the environment variable [`ENV`], read once when the
//! datapath is opened, and only by an exact value: `<operation>:<n>`, where
//! the operation is `configure`, `update` or `set_target_networks` and `n`
//! (1 or more) counts that operation's calls since the agent started (the
//! agent's own start-up calls `set_target_networks` and `configure` too;
//! the iptables datapath configures every start-up PU in one call, the
//! eBPF datapath one call per PU).
//! Any other value stops the agent at start, naming the variable, so a
//! typo never goes unnoticed. Never set it outside tests.
//!
//! Where the fault strikes is each datapath's business: the iptables
//! datapath appends a line that cannot apply to the last restore text (so
//! the tool really fails, after applying the lines before it where the
//! tool does that); the eBPF datapath fails its last map write or attach
//! in place of doing it.

use anyhow::{Result, bail};

/// The variable that arms a fault.
pub const ENV: &str = "ENFORCER_TEST_FAULT";

/// The operations a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Configure,
    Update,
    SetTargetNetworks,
}

impl Operation {
    const ALL: [Operation; 3] = [
        Operation::Configure,
        Operation::Update,
        Operation::SetTargetNetworks,
    ];

    fn name(self) -> &'static str {
        match self {
            Operation::Configure => "configure",
            Operation::Update => "update",
            Operation::SetTargetNetworks => "set_target_networks",
        }
    }
}

/// Which call of which operation fails, and how many calls were made.
#[derive(Debug, Default)]
pub struct Faults {
    armed: Option<(Operation, u32)>,
    calls: u32,
}

impl Faults {
    /// No fault: what every datapath has outside the transaction tests.
    pub fn none() -> Self {
        Self::default()
    }

    /// From [`ENV`]; unset (or empty) means none.
    pub fn from_env() -> Result<Self> {
        match std::env::var(ENV) {
            Ok(value) if !value.is_empty() => {
                let faults = Self::parse(&value)?;
                tracing::warn!(
                    "{ENV}={value}: TEST-ONLY fault injection is armed; \
                     that call will fail on purpose"
                );
                Ok(faults)
            }
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(Self::none()),
            Err(e) => bail!("{ENV}: {e}"),
        }
    }

    /// `<operation>:<n>`, exactly.
    pub fn parse(value: &str) -> Result<Self> {
        let parsed = value.split_once(':').and_then(|(op, n_text)| {
            let op = Operation::ALL.into_iter().find(|o| o.name() == op)?;
            let n: u32 = n_text.parse().ok().filter(|&n| n >= 1)?;
            // `parse` takes "+1" and "01"; only the plain spelling is exact.
            (n.to_string() == n_text).then_some((op, n))
        });
        match parsed {
            Some(armed) => Ok(Self {
                armed: Some(armed),
                calls: 0,
            }),
            None => bail!(
                "{ENV}={value:?} is not a fault: expected <operation>:<n> with operation \
                 configure, update or set_target_networks and n >= 1 (test-only)"
            ),
        }
    }

    /// Counts a call of `operation`; true if this call's last batch must
    /// fail.
    pub fn strikes(&mut self, operation: Operation) -> bool {
        match self.armed {
            Some((armed, n)) if armed == operation => {
                self.calls += 1;
                self.calls == n
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_spelling_arms_and_only_the_nth_call_strikes() {
        let mut f = Faults::parse("update:2").unwrap();
        assert!(!f.strikes(Operation::Configure));
        assert!(!f.strikes(Operation::Update));
        assert!(!f.strikes(Operation::SetTargetNetworks));
        assert!(f.strikes(Operation::Update));
        assert!(!f.strikes(Operation::Update));
        assert!(
            Faults::parse("set_target_networks:1")
                .unwrap()
                .strikes(Operation::SetTargetNetworks)
        );
        for bad in [
            "update",
            "update:0",
            "update:+1",
            "update:01",
            "Update:1",
            "update:1 ",
            "delete:1",
            ":1",
        ] {
            let err = Faults::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("ENFORCER_TEST_FAULT="), "{bad}: {err}");
        }
        assert!(!Faults::none().strikes(Operation::Update));
    }
}
