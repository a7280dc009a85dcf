//! The handshake's steps as the trap consumer takes them, each a pure
//! function of the token bytes, the PU's labels and policy, and the
//! clock: mint the SYN token, judge a SYN and answer it, judge the
//! SYN-ACK, and (UDP) the closing ACK and the responder's signed
//! refusal. The consumer keeps the per-
//! connection state (the nonce it sent) and does the packet I/O with
//! [`super::wire`].

use super::keys::{AgentKey, Keys};
use super::labels::Labels;
use super::policy::{Decision, IdentityPolicy, Reason};
use super::replay::ReplayCache;
use super::token::{Claims, Expect, Kind, Nonce, Verifier, Window, fresh_nonce};

/// One agent's side of every handshake.
#[derive(Debug)]
pub struct Handshaker {
    key: AgentKey,
    verifier: Verifier,
}

/// What a step decided: the decision to log and apply, the peer's
/// verified claims when its token verified, and the token to send back
/// when the step answers and the decision allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub decision: Decision,
    pub peer: Option<Claims>,
    pub reply: Option<Sent>,
}

/// A token this agent made, and its nonce (which the answer must bind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub token: Vec<u8>,
    pub nonce: Nonce,
}

/// The operating system's random source failed: no nonce, no token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no randomness for a nonce: {0}")]
pub struct NoRandomness(pub getrandom::Error);

impl Handshaker {
    pub fn new(keys: Keys, window: Window) -> Self {
        Self {
            key: keys.agent,
            verifier: Verifier {
                trust: keys.trust,
                window,
                replay: ReplayCache::default(),
            },
        }
    }

    fn mint(
        &self,
        kind: Kind,
        labels: &Labels,
        answering: Option<Nonce>,
        now_ms: u64,
    ) -> Result<Sent, NoRandomness> {
        let nonce = fresh_nonce().map_err(NoRandomness)?;
        let claims = Claims {
            kind,
            key_id: self.key.id(),
            timestamp_ms: now_ms,
            nonce,
            peer_nonce: answering,
            labels: labels.clone(),
        };
        Ok(Sent {
            token: claims.sign(&self.key),
            nonce,
        })
    }

    /// Initiator: the token for a SYN of the PU with `labels` (fresh for
    /// every transmission).
    pub fn syn(&self, labels: &Labels, now_ms: u64) -> Result<Sent, NoRandomness> {
        self.mint(Kind::Syn, labels, None, now_ms)
    }

    /// Responder: judges a SYN's token (`None`: the SYN had no marker)
    /// for a connection to `port` of the PU with `labels` and `policy`;
    /// when allowed, `reply` is the SYN-ACK token.
    pub fn on_syn(
        &mut self,
        token: Option<&[u8]>,
        labels: &Labels,
        policy: &IdentityPolicy,
        port: u16,
        now_ms: u64,
    ) -> Result<Step, NoRandomness> {
        let expect = Expect {
            kind: Kind::Syn,
            answering: None,
        };
        let step = self.judge(token, expect, now_ms, |peer| {
            policy.judge_incoming(&peer.labels, port)
        });
        self.answer(step, Kind::SynAck, labels, now_ms)
    }

    /// Initiator: judges the SYN-ACK's token against the nonce of the SYN
    /// it sent and the PU's application `policy` for `port` of the peer.
    pub fn on_syn_ack(
        &mut self,
        token: Option<&[u8]>,
        sent: &Nonce,
        policy: &IdentityPolicy,
        port: u16,
        now_ms: u64,
    ) -> Step {
        let expect = Expect {
            kind: Kind::SynAck,
            answering: Some(*sent),
        };
        self.judge(token, expect, now_ms, |peer| {
            policy.judge_outgoing(&peer.labels, port)
        })
    }

    /// Responder: a SYN-ACK token answering `syn` (the nonce of a SYN
    /// that [`Self::on_syn`] allowed), fresh for every transmission: a
    /// retransmitted SYN-ACK carrying the previous token would be refused
    /// as a replay.
    pub fn syn_ack(&self, labels: &Labels, syn: &Nonce, now_ms: u64) -> Result<Sent, NoRandomness> {
        self.mint(Kind::SynAck, labels, Some(*syn), now_ms)
    }

    /// Replaces the agent key and the trust store (a reload: a key
    /// rotated, a peer's key added or revoked) and keeps the replay
    /// cache, so a token accepted before is still refused as a replay.
    pub fn set_keys(&mut self, keys: Keys, window: Window) {
        self.key = keys.agent;
        self.verifier.trust = keys.trust;
        self.verifier.window = window;
    }

    /// The id of the key this agent signs with.
    pub fn key_id(&self) -> super::keys::KeyId {
        self.key.id()
    }

    /// Responder (UDP): a signed refusal of the SYN whose nonce is `syn`,
    /// sent when the SYN's token verified but the policy refuses the
    /// identity — so the initiator knows the peer has an agent that said
    /// no, and does not fall back to judging it as one without.
    pub fn refusal(&self, labels: &Labels, syn: &Nonce, now_ms: u64) -> Result<Sent, NoRandomness> {
        self.mint(Kind::Refusal, labels, Some(*syn), now_ms)
    }

    /// Initiator (UDP): judges a refusal's token against the nonce of the
    /// SYN it sent. A refusal that verifies is the decision
    /// [`Reason::RefusedByPeer`] (with the peer's claims); one that does
    /// not is refused with its own reason, as any token.
    pub fn on_refusal(&mut self, token: Option<&[u8]>, sent: &Nonce, now_ms: u64) -> Step {
        let expect = Expect {
            kind: Kind::Refusal,
            answering: Some(*sent),
        };
        self.judge(token, expect, now_ms, |_| {
            Decision::refuse(Reason::RefusedByPeer)
        })
    }

    /// Initiator (UDP): the closing ACK, answering the SYN-ACK's nonce.
    pub fn ack(&self, labels: &Labels, syn_ack: &Nonce, now_ms: u64) -> Result<Sent, NoRandomness> {
        self.mint(Kind::Ack, labels, Some(*syn_ack), now_ms)
    }

    /// Responder (UDP): judges the closing ACK against the nonce of its
    /// SYN-ACK; the identity was judged at the SYN, so a verified ACK
    /// from the same key completes the handshake.
    pub fn on_ack(
        &mut self,
        token: Option<&[u8]>,
        sent: &Nonce,
        initiator: &Claims,
        now_ms: u64,
    ) -> Step {
        let expect = Expect {
            kind: Kind::Ack,
            answering: Some(*sent),
        };
        self.judge(token, expect, now_ms, |peer| {
            if peer.key_id == initiator.key_id && peer.labels == initiator.labels {
                Decision {
                    reason: Reason::Allowed,
                    policy_id: None,
                }
            } else {
                Decision::refuse(Reason::WrongHandshake)
            }
        })
    }

    fn judge(
        &mut self,
        token: Option<&[u8]>,
        expect: Expect,
        now_ms: u64,
        policy: impl FnOnce(&Claims) -> Decision,
    ) -> Step {
        let refused = |reason| Step {
            decision: Decision::refuse(reason),
            peer: None,
            reply: None,
        };
        let Some(token) = token else {
            return refused(Reason::NoToken);
        };
        match self.verifier.verify(token, expect, now_ms) {
            Err(reason) => refused(reason),
            Ok(peer) => Step {
                decision: policy(&peer),
                peer: Some(peer),
                reply: None,
            },
        }
    }

    fn answer(
        &self,
        mut step: Step,
        kind: Kind,
        labels: &Labels,
        now_ms: u64,
    ) -> Result<Step, NoRandomness> {
        if let (true, Some(peer)) = (step.decision.is_allowed(), &step.peer) {
            step.reply = Some(self.mint(kind, labels, Some(peer.nonce), now_ms)?);
        }
        Ok(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::keys::TrustStore;
    use crate::identity::labels::{Requirement, Selector};
    use crate::identity::policy::IdentityRule;
    use crate::identity::token::tests::{NOW, key};
    use crate::identity::wire;
    use crate::policy::PolicyId;

    fn agent(own: u8, trusted: &[u8]) -> Handshaker {
        let agent = key(own);
        let mut trust = TrustStore::default();
        trust.add(agent.public()).unwrap();
        for &seed in trusted {
            trust.add(key(seed).public()).unwrap();
        }
        Handshaker::new(Keys { agent, trust }, Window::default())
    }

    fn allow(selector: &str, id: &str) -> IdentityRule {
        IdentityRule {
            selector: Selector(vec![Requirement::parse(selector).unwrap()]),
            ports: Vec::new(),
            policy_id: PolicyId::new(id).unwrap(),
        }
    }

    fn labels(app: &str) -> Labels {
        Labels::new([("app", app)]).unwrap()
    }

    /// A SYN from PU web (agent A) to PU db (agent B) and back, through
    /// the packet changes, in both families.
    #[test]
    fn a_tcp_handshake_between_two_agents() {
        let (mut a, mut b) = (agent(1, &[2]), agent(2, &[1]));
        let web_policy = IdentityPolicy {
            network: Vec::new(),
            application: vec![allow("app=db", "web-to-db")],
        };
        let db_policy = IdentityPolicy {
            network: vec![allow("app=web", "web-in")],
            application: Vec::new(),
        };
        for v6 in [false, true] {
            let syn = wire::tests::syn(v6, 0x02);
            let sent = a.syn(&labels("web"), NOW).unwrap();
            let on_wire = wire::attach_token(&syn, &sent.token).unwrap();

            let taken = wire::take_token(&on_wire).unwrap().unwrap();
            assert_eq!(taken.stripped, syn, "B's application sees A's SYN");
            let step = b
                .on_syn(Some(&taken.token), &labels("db"), &db_policy, 443, NOW + 3)
                .unwrap();
            assert_eq!(step.decision.policy_id.unwrap().as_str(), "web-in");
            assert_eq!(step.peer.unwrap().labels, labels("web"));
            let reply = step.reply.unwrap();

            let syn_ack = wire::attach_token(&wire::tests::syn(v6, 0x12), &reply.token).unwrap();
            let taken = wire::take_token(&syn_ack).unwrap().unwrap();
            let step = a.on_syn_ack(Some(&taken.token), &sent.nonce, &web_policy, 443, NOW + 5);
            assert!(step.decision.is_allowed(), "{:?}", step.decision);
            assert_eq!(step.peer.unwrap().labels, labels("db"));

            // The same SYN again is a replay; a SYN-ACK for another SYN
            // is refused.
            let again = b
                .on_syn(Some(&sent.token), &labels("db"), &db_policy, 443, NOW + 6)
                .unwrap();
            assert_eq!(again.decision.reason, Reason::Replayed);
            assert_eq!(again.reply, None);
            let other = a.on_syn_ack(Some(&reply.token), &[0; 16], &web_policy, 443, NOW + 6);
            assert_eq!(other.decision.reason, Reason::WrongHandshake);
        }
    }

    #[test]
    fn refusals_send_no_answer() {
        let (a, mut b, stranger) = (agent(1, &[2]), agent(2, &[1]), agent(9, &[]));
        let db_policy = IdentityPolicy {
            network: vec![allow("app=web", "web-in")],
            application: Vec::new(),
        };
        let db = labels("db");
        let cases = [
            (None, Reason::NoToken),
            (
                Some(stranger.syn(&labels("web"), NOW).unwrap().token),
                Reason::UntrustedKey,
            ),
            (
                Some(a.syn(&labels("batch"), NOW).unwrap().token),
                Reason::NotAllowedByPolicy,
            ),
            (
                Some(a.syn(&labels("web"), NOW - 60_000).unwrap().token),
                Reason::Expired,
            ),
            (
                Some(b"garbage".to_vec()),
                Reason::BadToken(crate::identity::TokenError::BadLength(7)),
            ),
        ];
        for (token, reason) in cases {
            let step = b
                .on_syn(token.as_deref(), &db, &db_policy, 443, NOW)
                .unwrap();
            assert_eq!(step.decision.reason, reason);
            assert_eq!(step.reply, None, "{reason}");
        }
    }

    #[test]
    fn a_udp_refusal_is_bound_to_the_syn_it_refuses() {
        let (mut a, b) = (agent(1, &[2]), agent(2, &[1]));
        let anyone = IdentityPolicy {
            network: vec![allow("app", "any-app")],
            application: vec![allow("app", "any-app")],
        };
        let syn = a.syn(&labels("batch"), NOW).unwrap();
        // Not for another SYN, and neither a SYN-ACK for a refusal nor a
        // refusal for a SYN-ACK.
        let refusal = b.refusal(&labels("dns"), &syn.nonce, NOW).unwrap();
        let other = a.on_refusal(Some(&refusal.token), &[0; 16], NOW);
        assert_eq!(other.decision.reason, Reason::WrongHandshake);
        assert_eq!(other.peer, None);
        let syn_ack = b.syn_ack(&labels("dns"), &syn.nonce, NOW).unwrap();
        let step = a.on_refusal(Some(&syn_ack.token), &syn.nonce, NOW);
        assert_eq!(step.decision.reason, Reason::WrongHandshake);
        let step = a.on_syn_ack(Some(&refusal.token), &syn.nonce, &anyone, 53, NOW);
        assert_eq!(step.decision.reason, Reason::WrongHandshake);
        // The right one verifies, refuses, and names the refusing PU.
        let step = a.on_refusal(Some(&refusal.token), &syn.nonce, NOW + 1);
        assert_eq!(step.decision.reason, Reason::RefusedByPeer);
        assert!(!step.decision.is_allowed());
        assert_eq!(step.peer.unwrap().labels, labels("dns"));
        // Once.
        let again = a.on_refusal(Some(&refusal.token), &syn.nonce, NOW + 2);
        assert_eq!(again.decision.reason, Reason::Replayed);
    }

    #[test]
    fn a_udp_handshake_closes_with_a_bound_ack() {
        let (mut a, mut b) = (agent(1, &[2]), agent(2, &[1]));
        let anyone = IdentityPolicy {
            network: vec![allow("app", "any-app")],
            application: vec![allow("app", "any-app")],
        };
        let (src, dst) = (
            "10.0.0.1:4000".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap(),
        );
        let syn = a.syn(&labels("web"), NOW).unwrap();
        let packet = wire::udp_handshake(src, dst, &syn.token).unwrap();
        let token = wire::udp_token(&packet).unwrap().unwrap();
        let step = b
            .on_syn(Some(token), &labels("dns"), &anyone, 53, NOW)
            .unwrap();
        let initiator = step.peer.unwrap();
        let syn_ack = step.reply.unwrap();
        let step = a.on_syn_ack(Some(&syn_ack.token), &syn.nonce, &anyone, 53, NOW);
        assert!(step.decision.is_allowed());
        let ack = a.ack(&labels("web"), &syn_ack.nonce, NOW).unwrap();
        let done = b.on_ack(Some(&ack.token), &syn_ack.nonce, &initiator, NOW + 1);
        assert!(done.decision.is_allowed());
        // An ACK from the same agent for another PU does not complete it.
        let other = a.ack(&labels("batch"), &syn_ack.nonce, NOW).unwrap();
        let step = b.on_ack(Some(&other.token), &syn_ack.nonce, &initiator, NOW + 1);
        assert_eq!(step.decision.reason, Reason::WrongHandshake);
    }
}
