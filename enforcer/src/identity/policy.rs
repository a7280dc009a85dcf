//! Identity policy: which verified identities may reach which ports of a
//! PU (its network policy), and which identities the PU may reach (its
//! application policy); and the decision, with its reason, that the trap
//! logs for every handshake it judges.
//!
//! Rules only allow. A connection is allowed by the first rule whose
//! selector matches the peer's labels and whose ports cover the port;
//! with no such rule it is refused (`NotAllowedByPolicy`). A PU without
//! rules therefore refuses every agent peer: nothing is waved through by
//! default.

use std::fmt;

use super::labels::{Labels, Selector};
use super::token::TokenError;
use crate::policy::{PolicyId, PortRange};

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRule {
    /// Whose labels it matches: the peer's (the source for a network
    /// rule, the destination for an application rule).
    pub selector: Selector,
    /// The PU's ports (network rule) or the peer's ports (application
    /// rule) it covers; empty covers every port.
    pub ports: Vec<PortRange>,
    /// Named in the flow log of what it allowed.
    pub policy_id: PolicyId,
}

impl IdentityRule {
    fn covers(&self, peer: &Labels, port: u16) -> bool {
        let port_ok = self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|r| (r.start()..=r.end()).contains(&port));
        port_ok && self.selector.matches(peer)
    }
}

/// A PU's identity policy, both directions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityPolicy {
    /// Who may connect to the PU.
    pub network: Vec<IdentityRule>,
    /// Whom the PU may connect to.
    pub application: Vec<IdentityRule>,
}

impl IdentityPolicy {
    /// The PU receives a connection on its `port` from a peer whose token
    /// verified with `peer` labels.
    pub fn judge_incoming(&self, peer: &Labels, port: u16) -> Decision {
        first_allowing(&self.network, peer, port)
    }

    /// The PU connects to `port` of a peer whose SYN-ACK token verified
    /// with `peer` labels.
    pub fn judge_outgoing(&self, peer: &Labels, port: u16) -> Decision {
        first_allowing(&self.application, peer, port)
    }

    pub fn is_empty(&self) -> bool {
        self.network.is_empty() && self.application.is_empty()
    }
}

fn first_allowing(rules: &[IdentityRule], peer: &Labels, port: u16) -> Decision {
    match rules.iter().find(|rule| rule.covers(peer, port)) {
        Some(rule) => Decision {
            reason: Reason::Allowed,
            policy_id: Some(rule.policy_id.clone()),
        },
        None => Decision::refuse(Reason::NotAllowedByPolicy),
    }
}

/// What the trap does with a handshake, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// The rule that allowed it, when one did.
    pub policy_id: Option<PolicyId>,
}

impl Decision {
    pub fn refuse(reason: Reason) -> Self {
        Self {
            reason,
            policy_id: None,
        }
    }

    /// Only [`Reason::Allowed`] lets a connection through.
    pub fn is_allowed(&self) -> bool {
        self.reason == Reason::Allowed
    }
}

/// Why a handshake was let through or refused. Every refusal the issue
/// asks to log has its own variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A verified identity that a rule of the policy allows.
    Allowed,
    /// A verified identity that no rule allows.
    NotAllowedByPolicy,
    /// The peer sent no token: an external peer, judged by the PU's ACLs.
    NoToken,
    /// The token is malformed or its signature does not verify.
    BadToken(TokenError),
    /// The token names a key id the trust store does not hold.
    UntrustedKey,
    /// The (key id, nonce) pair was already seen within the window.
    Replayed,
    /// The token is older than the token lifetime.
    Expired,
    /// The token is dated further ahead than the allowed clock skew.
    FromTheFuture,
    /// The token answers another handshake (SYN-ACK or ACK whose peer
    /// nonce is not the one this side sent), or is of the wrong kind.
    WrongHandshake,
    /// The replay cache is full: refused rather than forgetting a nonce
    /// that could then be replayed.
    ReplayCacheFull,
    /// The peer's agent refused this side's identity, in a signed
    /// refusal bound to the nonce sent (UDP).
    RefusedByPeer,
}

impl Reason {
    /// The reason as a flow log writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::NotAllowedByPolicy => "not-allowed-by-policy",
            Reason::NoToken => "no-token",
            Reason::BadToken(_) => "bad-token",
            Reason::UntrustedKey => "untrusted-key",
            Reason::Replayed => "replayed",
            Reason::Expired => "expired",
            Reason::FromTheFuture => "from-the-future",
            Reason::WrongHandshake => "wrong-handshake",
            Reason::ReplayCacheFull => "replay-cache-full",
            Reason::RefusedByPeer => "refused-by-peer",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::BadToken(why) => write!(f, "bad-token ({why})"),
            other => f.write_str(other.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::labels::Requirement;

    fn rule(selector: &[&str], ports: &[(u16, u16)], id: &str) -> IdentityRule {
        IdentityRule {
            selector: Selector(
                selector
                    .iter()
                    .map(|r| Requirement::parse(r).unwrap())
                    .collect(),
            ),
            ports: ports
                .iter()
                .map(|&(a, b)| PortRange::new(a, b).unwrap())
                .collect(),
            policy_id: PolicyId::new(id).unwrap(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn the_first_rule_covering_identity_and_port_allows() {
        let policy = IdentityPolicy {
            network: vec![
                rule(&["app=web", "env!=dev"], &[(443, 443)], "web-https"),
                rule(&["role in (admin, ops)"], &[], "ops-any"),
            ],
            application: vec![rule(&["app=db"], &[(5432, 5432)], "to-db")],
        };
        let web = labels(&[("app", "web"), ("env", "prod")]);
        let d = policy.judge_incoming(&web, 443);
        assert!(d.is_allowed());
        assert_eq!(d.policy_id.unwrap().as_str(), "web-https");
        // Right identity, wrong port.
        let d = policy.judge_incoming(&web, 80);
        assert_eq!(d, Decision::refuse(Reason::NotAllowedByPolicy));
        // Wrong identity, right port.
        let dev = labels(&[("app", "web"), ("env", "dev")]);
        assert!(!policy.judge_incoming(&dev, 443).is_allowed());
        let ops = labels(&[("role", "ops")]);
        assert_eq!(
            policy.judge_incoming(&ops, 22).policy_id.unwrap().as_str(),
            "ops-any"
        );
        // The application side uses its own rules.
        let db = labels(&[("app", "db")]);
        assert!(policy.judge_outgoing(&db, 5432).is_allowed());
        assert!(!policy.judge_outgoing(&db, 5433).is_allowed());
        assert!(!policy.judge_outgoing(&web, 443).is_allowed());
        assert!(!policy.judge_incoming(&db, 5432).is_allowed());
    }

    #[test]
    fn no_rules_refuse_everyone() {
        let policy = IdentityPolicy::default();
        assert!(policy.is_empty());
        let anyone = labels(&[("app", "web")]);
        assert_eq!(
            policy.judge_incoming(&anyone, 80).reason,
            Reason::NotAllowedByPolicy
        );
        assert_eq!(
            policy.judge_outgoing(&Labels::default(), 80).reason,
            Reason::NotAllowedByPolicy
        );
        assert_eq!(
            Reason::BadToken(TokenError::BadSignature).to_string(),
            "bad-token (signature does not verify)"
        );
    }
}
