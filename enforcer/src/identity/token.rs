//! The handshake token: a versioned, compact binary record of who is
//! speaking (the agent's key id and the PU's labels), a fresh nonce and a
//! timestamp, and for answers the nonce they answer; signed with the
//! agent's Ed25519 key. docs/identity.md gives the threat model.
//!
//! Wire format, version 1 (integers big-endian):
//! ```text
//! version   1 byte   = 1
//! kind      1 byte   1 SYN, 2 SYN-ACK, 3 ACK, 4 refusal (UDP)
//! key id    8 bytes  first 8 bytes of SHA-256(signer's public key)
//! time      8 bytes  milliseconds since the Unix epoch
//! nonce    16 bytes  random, fresh for every token
//! peer     16 bytes  the nonce this token answers (SYN-ACK, ACK and
//!                    refusal only)
//! labels    1 byte count n <= 32, then n x (1 byte key length, key,
//!                    1 byte value length, value), keys strictly ascending
//! signature 64 bytes Ed25519 over "enforcer-token-v1\0" || every byte above
//! ```
//! The parser is strict: every length is bounded before it is used,
//! labels obey the same syntax as the config's and must be in canonical
//! order (so one identity has exactly one encoding), reserved values are
//! refused, and nothing may follow the signature. It never panics.

use std::fmt;

use ed25519_dalek::{Signature, Signer as _};

use super::keys::{AgentKey, KeyId, TrustStore};
use super::labels::{self, Labels, MAX_LABEL_LEN, MAX_LABELS};
use super::policy::Reason;
use super::replay::{ReplayCache, Seen};

pub const VERSION: u8 = 1;
/// The longest token: fixed fields, the largest label set, signature.
pub const MAX_TOKEN_LEN: usize = FIXED_LEN + PEER_LEN + labels::MAX_ENCODED_LABELS + SIG_LEN;
/// The shortest: a SYN token without labels.
pub const MIN_TOKEN_LEN: usize = FIXED_LEN + 1 + SIG_LEN;

const FIXED_LEN: usize = 1 + 1 + 8 + 8 + NONCE_LEN;
const NONCE_LEN: usize = 16;
const PEER_LEN: usize = NONCE_LEN;
const SIG_LEN: usize = 64;
/// Domain separation: a signature over a token can never be taken for a
/// signature over anything else the key might sign.
const CONTEXT: &[u8] = b"enforcer-token-v1\0";

/// A random per-token value; with the key id it makes a token unique.
pub type Nonce = [u8; NONCE_LEN];

/// Which handshake step a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Syn = 1,
    SynAck = 2,
    Ack = 3,
    /// A responder's signed "no" to a UDP handshake whose token verified
    /// but whose identity its policy refuses: the initiator then drops
    /// the flow rather than judging the peer as one without an agent.
    Refusal = 4,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Kind::Syn),
            2 => Some(Kind::SynAck),
            3 => Some(Kind::Ack),
            4 => Some(Kind::Refusal),
            _ => None,
        }
    }

    /// Answers carry the nonce of the token they answer.
    fn answers(self) -> bool {
        self != Kind::Syn
    }
}

/// The content of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub kind: Kind,
    pub key_id: KeyId,
    /// Milliseconds since the Unix epoch, by the signer's clock.
    pub timestamp_ms: u64,
    pub nonce: Nonce,
    /// The nonce answered: `Some` exactly for SYN-ACK, ACK and refusal.
    pub peer_nonce: Option<Nonce>,
    /// The identity of the PU the signer speaks for.
    pub labels: Labels,
}

/// Why token bytes were refused before any key was consulted (or, for
/// `BadSignature`, by the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TokenError {
    #[error("{0} bytes is outside the token size bounds")]
    BadLength(usize),
    #[error("version {0} is not supported")]
    UnknownVersion(u8),
    #[error("kind {0} is not SYN, SYN-ACK, ACK or refusal")]
    UnknownKind(u8),
    #[error("truncated")]
    Truncated,
    #[error("malformed labels")]
    BadLabels,
    #[error("bytes after the signature")]
    TrailingBytes,
    #[error("signature does not verify")]
    BadSignature,
}

impl Claims {
    /// The bytes the signature covers (everything but the signature).
    fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend(self.key_id.0);
        out.extend(self.timestamp_ms.to_be_bytes());
        out.extend(self.nonce);
        if let Some(peer) = self.peer_nonce {
            out.extend(peer);
        }
        // `Labels` guarantees the bounds, so the lengths fit a byte.
        out.push(self.labels.len() as u8);
        for (key, value) in self.labels.iter() {
            out.push(key.len() as u8);
            out.extend(key.as_bytes());
            out.push(value.len() as u8);
            out.extend(value.as_bytes());
        }
    }

    /// The signed token.
    ///
    /// # Panics
    /// If `peer_nonce` is given for a SYN or missing for an answer, or
    /// `key_id` is not `key`'s: programming errors of the caller.
    pub fn sign(&self, key: &AgentKey) -> Vec<u8> {
        assert_eq!(
            self.kind.answers(),
            self.peer_nonce.is_some(),
            "answers, and only answers, carry a peer nonce"
        );
        assert_eq!(self.key_id, key.id(), "a token names the key that signs it");
        let mut out = Vec::with_capacity(MAX_TOKEN_LEN);
        self.encode_body(&mut out);
        let signature = key.signing().sign(&signed_message(&out));
        out.extend(signature.to_bytes());
        out
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(CONTEXT.len() + body.len());
    message.extend(CONTEXT);
    message.extend(body);
    message
}

/// A token parsed but not yet verified: its claims, and what the
/// signature must cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unverified<'a> {
    pub claims: Claims,
    body: &'a [u8],
    signature: [u8; SIG_LEN],
}

/// A cursor that refuses to read past the end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if n > self.rest.len() {
            return Err(TokenError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, TokenError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn text(&mut self) -> Result<&'a str, TokenError> {
        let len = usize::from(self.byte()?);
        if len > MAX_LABEL_LEN {
            return Err(TokenError::BadLabels);
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| TokenError::BadLabels)
    }
}

/// Parses token bytes strictly (see the module doc). Checks no
/// signature: use [`Verifier::verify`] for that.
pub fn parse(bytes: &[u8]) -> Result<Unverified<'_>, TokenError> {
    if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&bytes.len()) {
        return Err(TokenError::BadLength(bytes.len()));
    }
    let mut r = Reader { rest: bytes };
    let version = r.byte()?;
    if version != VERSION {
        return Err(TokenError::UnknownVersion(version));
    }
    let kind_byte = r.byte()?;
    let kind = Kind::from_byte(kind_byte).ok_or(TokenError::UnknownKind(kind_byte))?;
    let key_id = KeyId(r.array()?);
    let timestamp_ms = u64::from_be_bytes(r.array()?);
    let nonce = r.array()?;
    let peer_nonce = if kind.answers() {
        Some(r.array()?)
    } else {
        None
    };
    let count = usize::from(r.byte()?);
    if count > MAX_LABELS {
        return Err(TokenError::BadLabels);
    }
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(count);
    for _ in 0..count {
        let key = r.text()?;
        let value = r.text()?;
        // Strictly ascending keys: canonical, and no duplicates.
        if pairs.last().is_some_and(|(last, _)| *last >= key) {
            return Err(TokenError::BadLabels);
        }
        pairs.push((key, value));
    }
    let labels = Labels::new(pairs).map_err(|_| TokenError::BadLabels)?;
    let body_len = bytes.len() - r.rest.len();
    let signature = r.array()?;
    if !r.rest.is_empty() {
        return Err(TokenError::TrailingBytes);
    }
    Ok(Unverified {
        claims: Claims {
            kind,
            key_id,
            timestamp_ms,
            nonce,
            peer_nonce,
            labels,
        },
        body: &bytes[..body_len],
        signature,
    })
}

/// Time rules for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// How long after its timestamp a token is accepted.
    pub lifetime_ms: u64,
    /// How far ahead of the local clock a timestamp may be.
    pub skew_ms: u64,
}

impl Default for Window {
    /// 30 s lifetime, 5 s skew: a SYN retransmitted for 30 s still gets
    /// through (each transmission carries a fresh token anyway), and
    /// NTP-synchronised hosts are far closer than 5 s.
    fn default() -> Self {
        Self {
            lifetime_ms: 30_000,
            skew_ms: 5_000,
        }
    }
}

/// What the handshake expects of a token it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub kind: Kind,
    /// For an answer: the nonce this side sent.
    pub answering: Option<Nonce>,
}

/// Checks tokens against the trust store, the clock and the replay cache.
#[derive(Debug)]
pub struct Verifier {
    pub trust: TrustStore,
    pub window: Window,
    pub replay: ReplayCache,
}

impl Verifier {
    /// Verifies `bytes` as a token of the expected step at `now_ms`; on
    /// success the nonce is remembered, so the same token is refused as
    /// `Replayed` next time. The refusal reasons are in the order the
    /// checks run: nothing unauthenticated reaches the replay cache.
    pub fn verify(&mut self, bytes: &[u8], expect: Expect, now_ms: u64) -> Result<Claims, Reason> {
        let token = parse(bytes).map_err(Reason::BadToken)?;
        let claims = token.claims;
        let key = self.trust.get(&claims.key_id).ok_or(Reason::UntrustedKey)?;
        let signature = Signature::from_bytes(&token.signature);
        // `verify_strict` also refuses non-canonical signatures and weak
        // keys, so a token has exactly one valid signature.
        key.verify_strict(&signed_message(token.body), &signature)
            .map_err(|_| Reason::BadToken(TokenError::BadSignature))?;
        if claims.kind != expect.kind || claims.peer_nonce != expect.answering {
            return Err(Reason::WrongHandshake);
        }
        if claims.timestamp_ms > now_ms.saturating_add(self.window.skew_ms) {
            return Err(Reason::FromTheFuture);
        }
        if now_ms.saturating_sub(claims.timestamp_ms) > self.window.lifetime_ms {
            return Err(Reason::Expired);
        }
        let forget_at = now_ms
            .saturating_add(self.window.lifetime_ms)
            .saturating_add(self.window.skew_ms);
        match self
            .replay
            .check_and_insert(claims.key_id, claims.nonce, now_ms, forget_at)
        {
            Seen::New => Ok(claims),
            Seen::Again => Err(Reason::Replayed),
            Seen::Full => Err(Reason::ReplayCacheFull),
        }
    }
}

/// A fresh random nonce.
pub fn fresh_nonce() -> Result<Nonce, getrandom::Error> {
    let mut nonce = [0; NONCE_LEN];
    getrandom::fill(&mut nonce)?;
    Ok(nonce)
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Syn => "SYN",
            Kind::SynAck => "SYN-ACK",
            Kind::Ack => "ACK",
            Kind::Refusal => "refusal",
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;

    pub(crate) const NOW: u64 = 1_790_000_000_000;

    pub(crate) fn key(seed: u8) -> AgentKey {
        AgentKey::from_signing_key(SigningKey::from_bytes(&[seed; 32]))
    }

    pub(crate) fn claims(key: &AgentKey, kind: Kind, nonce: u8) -> Claims {
        Claims {
            kind,
            key_id: key.id(),
            timestamp_ms: NOW,
            nonce: [nonce; 16],
            peer_nonce: (kind != Kind::Syn).then_some([0xaa; 16]),
            labels: Labels::new([("app", "web"), ("env", "prod")]).unwrap(),
        }
    }

    fn verifier(trusted: &[&AgentKey]) -> Verifier {
        let mut trust = TrustStore::default();
        for key in trusted {
            trust.add(key.public()).unwrap();
        }
        Verifier {
            trust,
            window: Window::default(),
            replay: ReplayCache::new(16),
        }
    }

    const SYN: Expect = Expect {
        kind: Kind::Syn,
        answering: None,
    };

    #[test]
    fn a_signed_token_parses_back_and_verifies_once() {
        let a = key(1);
        let c = claims(&a, Kind::Syn, 1);
        let bytes = c.sign(&a);
        assert_eq!(bytes.len(), FIXED_LEN + c.labels.encoded_len() + SIG_LEN);
        assert_eq!(parse(&bytes).unwrap().claims, c);
        let mut v = verifier(&[&a]);
        assert_eq!(v.verify(&bytes, SYN, NOW + 10), Ok(c));
        assert_eq!(v.verify(&bytes, SYN, NOW + 20), Err(Reason::Replayed));
        // A fresh nonce is a fresh token.
        let again = claims(&a, Kind::Syn, 2).sign(&a);
        assert!(v.verify(&again, SYN, NOW + 20).is_ok());
    }

    #[test]
    fn answers_are_bound_to_the_nonce_they_answer() {
        let (a, b) = (key(1), key(2));
        let mut v = verifier(&[&a, &b]);
        let syn_ack = claims(&b, Kind::SynAck, 3).sign(&b);
        let parsed = parse(&syn_ack).unwrap().claims;
        assert_eq!(parsed.peer_nonce, Some([0xaa; 16]));
        let wrong = Expect {
            kind: Kind::SynAck,
            answering: Some([0xbb; 16]),
        };
        assert_eq!(v.verify(&syn_ack, wrong, NOW), Err(Reason::WrongHandshake));
        assert_eq!(v.verify(&syn_ack, SYN, NOW), Err(Reason::WrongHandshake));
        let right = Expect {
            kind: Kind::SynAck,
            answering: Some([0xaa; 16]),
        };
        // Refusals before the replay cache leave the nonce usable.
        assert!(v.verify(&syn_ack, right, NOW).is_ok());
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let (a, stranger) = (key(1), key(9));
        let mut v = verifier(&[&a]);
        let good = claims(&a, Kind::Syn, 1).sign(&a);

        let untrusted = claims(&stranger, Kind::Syn, 1).sign(&stranger);
        assert_eq!(v.verify(&untrusted, SYN, NOW), Err(Reason::UntrustedKey));
        // A stranger's signature under a trusted key id.
        let mut forged = untrusted.clone();
        forged[2..10].copy_from_slice(&a.id().0);
        assert_eq!(
            v.verify(&forged, SYN, NOW),
            Err(Reason::BadToken(TokenError::BadSignature))
        );
        // Every single-bit flip is refused.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(v.verify(&bad, SYN, NOW).is_err(), "bit flip at {i}");
        }
        let mut old = claims(&a, Kind::Syn, 4);
        old.timestamp_ms = NOW - 30_001;
        assert_eq!(v.verify(&old.sign(&a), SYN, NOW), Err(Reason::Expired));
        old.timestamp_ms = NOW - 30_000;
        assert!(v.verify(&old.sign(&a), SYN, NOW).is_ok());
        let mut ahead = claims(&a, Kind::Syn, 5);
        ahead.timestamp_ms = NOW + 5_001;
        assert_eq!(
            v.verify(&ahead.sign(&a), SYN, NOW),
            Err(Reason::FromTheFuture)
        );
        ahead.timestamp_ms = NOW + 5_000;
        assert!(v.verify(&ahead.sign(&a), SYN, NOW).is_ok());
        assert!(v.verify(&good, SYN, NOW).is_ok());
    }

    #[test]
    fn the_parser_is_strict() {
        let a = key(1);
        let good = claims(&a, Kind::Syn, 1).sign(&a);
        let err = |bytes: &[u8]| parse(bytes).unwrap_err();
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(err(&trailing), TokenError::TrailingBytes);
        for len in 0..good.len() {
            assert!(parse(&good[..len]).is_err(), "prefix of {len} bytes");
        }
        let with = |at: usize, byte: u8| {
            let mut b = good.clone();
            b[at] = byte;
            b
        };
        assert_eq!(err(&with(0, 2)), TokenError::UnknownVersion(2));
        assert_eq!(err(&with(1, 0)), TokenError::UnknownKind(0));
        assert_eq!(err(&with(1, 5)), TokenError::UnknownKind(5));
        // Label count above the maximum, a key length above 63, a bad
        // character, and keys out of order.
        let labels_at = FIXED_LEN;
        assert_eq!(err(&with(labels_at, 33)), TokenError::BadLabels);
        assert_eq!(err(&with(labels_at + 1, 64)), TokenError::BadLabels);
        assert_eq!(err(&with(labels_at + 2, b' ')), TokenError::BadLabels);
        let unordered = Claims {
            labels: Labels::new([("a", "1"), ("b", "2")]).unwrap(),
            ..claims(&a, Kind::Syn, 1)
        }
        .sign(&a);
        // Swap the two one-byte keys in place: "a" <-> "b".
        let mut swapped = unordered.clone();
        let first_key = labels_at + 2;
        swapped.swap(first_key, first_key + 4);
        assert_eq!(err(&swapped), TokenError::BadLabels);
        assert_eq!(err(&[1; 10]), TokenError::BadLength(10));
        assert_eq!(
            err(&vec![1; MAX_TOKEN_LEN + 1]),
            TokenError::BadLength(MAX_TOKEN_LEN + 1)
        );
    }

    #[test]
    fn the_largest_identity_fits_the_bound() {
        let a = key(1);
        let mut pairs = Vec::new();
        let mut labels = Labels::default();
        for i in 0.. {
            pairs.push((format!("{i:0>63}"), "v".repeat(63)));
            match Labels::new(pairs.clone()) {
                Ok(l) => labels = l,
                Err(_) => break,
            }
        }
        let token = Claims {
            labels,
            ..claims(&a, Kind::SynAck, 1)
        }
        .sign(&a);
        assert!(token.len() <= MAX_TOKEN_LEN, "{}", token.len());
        assert!(parse(&token).is_ok());
    }
}
