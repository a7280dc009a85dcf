//! The properties the fuzz targets check (`fuzz/`, `cargo xtask fuzz`),
//! kept here so that the ordinary test run replays the committed corpus
//! through exactly the same checks.
//!
//! Both checks panic on a violation, which is what a fuzzer reports:
//! - no input makes a parser panic or read out of bounds;
//! - no input is accepted unless it is, byte for byte, the token the
//!   trusted key signs for the claims it states. Ed25519 signing is
//!   deterministic and the encoding canonical, so that token is unique:
//!   a mutated or made-up input that verified would be a forgery.
//!
//! The trusted key is a fixed test key whose secret is public (it is
//! right here): it exists only for these checks.

use ed25519_dalek::SigningKey;

use super::keys::{AgentKey, TrustStore};
use super::replay::ReplayCache;
use super::token::{self, Expect, Verifier, Window};
use super::wire;

/// The clock the checks run at (ms since the epoch), and the timestamp of
/// the genuine seed tokens.
pub const NOW_MS: u64 = 1_790_000_000_000;

/// The key the checks trust.
pub fn trusted_key() -> AgentKey {
    AgentKey::from_signing_key(SigningKey::from_bytes(&[0x42; 32]))
}

/// How far an input got; for the corpus replay's tally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Refused by the parser.
    Malformed,
    /// Parsed, then refused by verification.
    Refused,
    /// A genuine token of the trusted key, accepted.
    Genuine,
}

/// The token property: parse and verify `data` as a token, at [`NOW_MS`],
/// expecting whatever step and binding it claims (so that a refusal can
/// only come from the key, the signature, the clock or the replay
/// cache).
pub fn check_token(data: &[u8]) -> Outcome {
    let Ok(parsed) = token::parse(data) else {
        return Outcome::Malformed;
    };
    let claims = parsed.claims;
    let key = trusted_key();
    let mut trust = TrustStore::default();
    trust.add(key.public()).expect("one key, no collision");
    let mut verifier = Verifier {
        trust,
        window: Window::default(),
        replay: ReplayCache::new(4),
    };
    let expect = Expect {
        kind: claims.kind,
        answering: claims.peer_nonce,
    };
    match verifier.verify(data, expect, NOW_MS) {
        Err(_) => Outcome::Refused,
        Ok(accepted) => {
            assert_eq!(accepted, claims, "verification changed the claims");
            let genuine = accepted.sign(&key);
            assert!(
                genuine == data,
                "accepted a token the trusted key did not sign: {data:02x?}"
            );
            // And a second time it is a replay.
            assert!(verifier.verify(data, expect, NOW_MS).is_err());
            Outcome::Genuine
        }
    }
}

/// A token the packet checks attach.
const SAMPLE_TOKEN: &[u8] = b"sample token bytes";

/// The packet property: the trap's header reader never panics, and every
/// handshake function on `data` either refuses it or yields a well-formed
/// packet (valid checksums, marker gone after a strip, the token back
/// after an attach); every token the packet carries obeys
/// [`check_token`].
pub fn check_packet(data: &[u8]) -> Outcome {
    let mut outcome = Outcome::Malformed;
    let mut note = |o: Outcome| {
        if o != Outcome::Malformed && outcome != Outcome::Genuine {
            outcome = o;
        }
    };
    // The trap's header reader sees every trapped packet first.
    if let Ok(headers) = crate::trap::packet::parse(data) {
        let _ = headers.to_string();
    }
    if let Ok(Some(taken)) = wire::take_token(data) {
        assert!(
            wire::checksums_valid(&taken.stripped),
            "bad strip {data:02x?}"
        );
        assert_eq!(wire::take_token(&taken.stripped), Ok(None), "marker left");
        assert!(crate::trap::packet::parse(&taken.stripped).is_ok());
        note(Outcome::Refused);
        note(check_token(&taken.token));
    }
    if let Ok(Some(token)) = wire::udp_token(data) {
        note(Outcome::Refused);
        note(check_token(token));
    }
    if let Ok(marked) = wire::attach_token(data, SAMPLE_TOKEN) {
        assert!(wire::checksums_valid(&marked), "bad attach {data:02x?}");
        let taken = wire::take_token(&marked)
            .expect("a packet this module marked reads back")
            .expect("and carries the marker");
        assert_eq!(taken.token, SAMPLE_TOKEN);
        assert!(wire::checksums_valid(&taken.stripped));
        note(Outcome::Refused);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::identity::labels::Labels;
    use crate::identity::token::{Claims, Kind};

    fn corpus(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target)
    }

    fn replay(target: &str, check: fn(&[u8]) -> Outcome) -> [usize; 3] {
        let dir = corpus(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("the committed corpus {} is missing: {e}", dir.display()));
        let mut tally = [0; 3];
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            tally[check(&data) as usize] += 1;
        }
        tally
    }

    /// The committed corpora go through the fuzz targets' checks: every
    /// input is judged without a panic, and the corpus still reaches
    /// every outcome (so it keeps exercising the verifier, not only the
    /// parser's first byte).
    #[test]
    fn the_committed_fuzz_corpus_replays_cleanly() {
        let [malformed, refused, genuine] = replay("token", check_token);
        assert!(
            malformed > 0 && refused > 0 && genuine > 0,
            "token corpus: {malformed} malformed, {refused} refused, {genuine} genuine"
        );
        let [malformed, refused, genuine] = replay("packet", check_packet);
        assert!(
            malformed > 0 && refused > 0 && genuine > 0,
            "packet corpus: {malformed} malformed, {refused} refused, {genuine} genuine"
        );
    }

    /// The seed inputs: genuine tokens of each step, an untrusted one,
    /// and packets carrying them. `cargo test -p enforcer --lib --
    /// --ignored write_fuzz_seeds` writes them into the corpus.
    fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        let key = trusted_key();
        let stranger = AgentKey::from_signing_key(SigningKey::from_bytes(&[7; 32]));
        let claims = |key: &AgentKey, kind: Kind| Claims {
            kind,
            key_id: key.id(),
            timestamp_ms: NOW_MS,
            nonce: [kind as u8; 16],
            peer_nonce: (kind != Kind::Syn).then_some([0xaa; 16]),
            labels: Labels::new([("app", "web"), ("env", "prod"), ("k8s.io/ns", "")]).unwrap(),
        };
        let syn = claims(&key, Kind::Syn).sign(&key);
        let syn_ack = claims(&key, Kind::SynAck).sign(&key);
        let ack = claims(&key, Kind::Ack).sign(&key);
        let untrusted = claims(&stranger, Kind::Syn).sign(&stranger);
        use crate::identity::wire::tests::syn as syn_packet;
        let marked_v4 = wire::attach_token(&syn_packet(false, 0x02), &syn).unwrap();
        let marked_v6 = wire::attach_token(&syn_packet(true, 0x12), &syn_ack).unwrap();
        let udp = wire::udp_handshake(
            "10.0.0.1:4000".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap(),
            &ack,
        )
        .unwrap();
        vec![
            ("token", "syn", syn.clone()),
            ("token", "syn-ack", syn_ack),
            ("token", "ack", ack),
            ("token", "untrusted", untrusted),
            ("packet", "marked-syn-v4", marked_v4),
            ("packet", "marked-syn-ack-v6", marked_v6),
            ("packet", "udp-handshake-v4", udp),
            ("packet", "plain-syn-v6", syn_packet(true, 0x02)),
        ]
    }

    #[test]
    fn the_seeds_reach_the_outcomes_they_are_for() {
        let outcomes: Vec<_> = seeds()
            .into_iter()
            .map(|(target, name, data)| {
                let check = if target == "token" {
                    check_token
                } else {
                    check_packet
                };
                (name, check(&data))
            })
            .collect();
        for (name, outcome) in outcomes {
            let expected = match name {
                "untrusted" | "plain-syn-v6" => Outcome::Refused,
                _ => Outcome::Genuine,
            };
            assert_eq!(outcome, expected, "{name}");
        }
    }
}
