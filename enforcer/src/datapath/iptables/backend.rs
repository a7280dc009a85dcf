//! Which iptables flavour — xtables-nft (nf_tables) or xtables-legacy
//! (x_tables) — every restore and save of both datapaths goes through.
//! Both flavours are usually installed, and rules loaded by one are
//! invisible to the other's save; mixing them would leave half the policy
//! where the host's other tools (and our own teardown) never look.
//!
//! `auto` uses the flavour the host already uses, decided as kube-proxy's
//! iptables-wrapper decides it, from the saves of both flavours in the
//! calling thread's network namespace:
//! 1. a kubelet hint chain (`KUBE-IPTABLES-HINT`, `KUBE-KUBELET-CANARY`) in
//!    the nft saves means nft, else one in the legacy saves means legacy;
//! 2. otherwise the flavour whose saves hold more rules (`-A` lines, IPv4
//!    and IPv6 together) wins, and a tie — nothing anywhere, say — is nft.
//!
//! A flavour whose save fails (not installed, module missing) counts as
//! empty, as in the wrapper. Every save is of all tables without `-t`:
//! `iptables-legacy-save -t mangle` would create that table, while a
//! plain save lists only the tables that exist. The decision itself
//! ([`decide`]) is pure.

use serde::{Deserialize, Serialize};

use super::exec;
use crate::policy::{IpFamily, IptablesBackendChoice};

/// The iptables flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// xtables-nft: rules live in nf_tables.
    Nft,
    /// xtables-legacy: rules live in the x_tables blobs.
    Legacy,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Nft, Backend::Legacy];

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The flavour in use and a sentence saying why, for the log and
/// `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendChoice {
    pub backend: Backend,
    pub reason: String,
}

/// What one flavour's saves (both families) show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evidence {
    /// A kubelet hint chain is declared.
    pub kubelet_hint: bool,
    /// Rules (`-A` lines).
    pub rules: usize,
}

/// The chains kubelet (1.17 and later) creates in the flavour it uses.
const KUBELET_HINTS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

impl Evidence {
    /// Reads saves of one flavour (any tables, any family).
    pub fn from_saves<'a>(saves: impl IntoIterator<Item = &'a str>) -> Self {
        let mut evidence = Evidence::default();
        for line in saves.into_iter().flat_map(str::lines) {
            if let Some(declared) = line.strip_prefix(':') {
                let chain = declared.split(' ').next().unwrap_or_default();
                evidence.kubelet_hint |= KUBELET_HINTS.contains(&chain);
            } else if line.starts_with('-') {
                evidence.rules += 1;
            }
        }
        evidence
    }
}

/// The auto decision from both flavours' evidence; see the module docs.
pub fn decide(nft: Evidence, legacy: Evidence) -> BackendChoice {
    let (backend, reason) = if nft.kubelet_hint {
        (
            Backend::Nft,
            "auto: kubelet's hint chain is in nf_tables".to_owned(),
        )
    } else if legacy.kubelet_hint {
        (
            Backend::Legacy,
            "auto: kubelet's hint chain is in legacy iptables".to_owned(),
        )
    } else {
        let backend = match legacy.rules > nft.rules {
            true => Backend::Legacy,
            false => Backend::Nft,
        };
        let counts = format!(
            "auto: {} legacy rules, {} nft rules",
            legacy.rules, nft.rules
        );
        (backend, counts)
    };
    BackendChoice { backend, reason }
}

/// Resolves the configured choice; `auto` reads both flavours' saves in
/// the calling thread's network namespace. `forced_by` says where a fixed
/// choice came from (the config key or the command-line flag).
pub fn choose(choice: IptablesBackendChoice, forced_by: &str) -> BackendChoice {
    let fixed = |backend: Backend| BackendChoice {
        backend,
        reason: format!("{backend} was asked for ({forced_by})"),
    };
    match choice {
        IptablesBackendChoice::Nft => fixed(Backend::Nft),
        IptablesBackendChoice::Legacy => fixed(Backend::Legacy),
        IptablesBackendChoice::Auto => {
            let evidence = |backend: Backend| {
                let saves: Vec<String> = IpFamily::ALL
                    .into_iter()
                    .filter_map(|family| exec::save_all(backend, family).ok())
                    .collect();
                Evidence::from_saves(saves.iter().map(String::as_str))
            };
            decide(evidence(Backend::Nft), evidence(Backend::Legacy))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBELET_NFT: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables)\n\
        *mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n\
        COMMIT\n";

    const DOCKER_FILTER: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n\
        :DOCKER - [0:0]\n-A FORWARD -j DOCKER-USER\n-A FORWARD -o docker0 -j DOCKER\n\
        -A DOCKER-USER -j RETURN\nCOMMIT\n";

    fn rules(n: usize) -> Evidence {
        Evidence {
            kubelet_hint: false,
            rules: n,
        }
    }

    #[test]
    fn evidence_counts_rules_and_finds_the_hint_chains() {
        assert_eq!(Evidence::from_saves([DOCKER_FILTER]), rules(3));
        let both = Evidence::from_saves([KUBELET_NFT, DOCKER_FILTER]);
        assert_eq!(
            both,
            Evidence {
                kubelet_hint: true,
                rules: 3
            }
        );
        // A rule that merely mentions the chain is no declaration; comment
        // and table lines are no rules.
        let mention = "*mangle\n-A OUTPUT -m comment --comment \":KUBE-IPTABLES-HINT\" -j ACCEPT\n";
        assert_eq!(Evidence::from_saves([mention]), rules(1));
        assert_eq!(Evidence::from_saves([]), rules(0));
    }

    #[test]
    fn kubelet_hints_win_nft_first() {
        let hint = |rules| Evidence {
            kubelet_hint: true,
            rules,
        };
        let nft = decide(hint(0), rules(500));
        assert_eq!(nft.backend, Backend::Nft);
        assert_eq!(nft.reason, "auto: kubelet's hint chain is in nf_tables");
        let legacy = decide(rules(500), hint(0));
        assert_eq!(legacy.backend, Backend::Legacy);
        assert_eq!(
            legacy.reason,
            "auto: kubelet's hint chain is in legacy iptables"
        );
        // Both (a node half-migrated): nft, as the wrapper checks it first.
        assert_eq!(decide(hint(1), hint(900)).backend, Backend::Nft);
    }

    #[test]
    fn otherwise_more_rules_win_and_a_tie_is_nft() {
        let legacy = decide(rules(0), rules(3));
        assert_eq!(legacy.backend, Backend::Legacy);
        assert_eq!(legacy.reason, "auto: 3 legacy rules, 0 nft rules");
        let nft = decide(rules(12), rules(0));
        assert_eq!(
            (nft.backend, nft.reason.as_str()),
            (Backend::Nft, "auto: 0 legacy rules, 12 nft rules")
        );
        assert_eq!(decide(rules(0), rules(0)).backend, Backend::Nft);
        assert_eq!(decide(rules(7), rules(7)).backend, Backend::Nft);
    }

    #[test]
    fn a_fixed_choice_runs_no_tool_and_says_where_it_came_from() {
        let legacy = choose(IptablesBackendChoice::Legacy, "iptables.backend");
        assert_eq!(legacy.backend, Backend::Legacy);
        assert_eq!(legacy.reason, "legacy was asked for (iptables.backend)");
        let nft = choose(IptablesBackendChoice::Nft, "--iptables-backend");
        assert_eq!(nft.reason, "nft was asked for (--iptables-backend)");
    }
}
