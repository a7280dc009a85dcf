//! Identity: who a PU is and who may talk to whom, by identity rather
//! than by address. Pure logic, no kernel: the trap consumer calls it.
//!
//! - [`labels`]: a PU's identity (`key=value` labels) and the selectors
//!   that match it;
//! - [`policy`]: a PU's network and application identity policies and the
//!   [`Decision`] (with its [`Reason`]) for a handshake;
//! - [`token`]: the signed handshake token, its strict parser and the
//!   [`Verifier`] (trust store, clock window, replay cache in [`replay`]);
//! - [`keys`]: the agent's Ed25519 key and the trust store, from the
//!   files the config names;
//! - [`wire`]: attaching the token to a SYN / SYN-ACK and stripping it,
//!   and the UDP handshake datagram;
//! - [`handshake`]: the steps (mint, judge, answer) as the trap consumer
//!   takes them;
//! - [`fuzz_check`]: the properties the fuzz targets check.
//!
//! docs/identity.md describes the handshake, the token format, the choice
//! of Ed25519 and the threat model.

pub mod fuzz_check;
pub mod handshake;
pub mod keys;
pub mod labels;
pub mod policy;
pub mod replay;
pub mod token;
pub mod wire;

pub use handshake::{Handshaker, NoRandomness, Sent, Step};
pub use keys::{AgentKey, KeyError, KeyFiles, KeyId, Keys, TrustStore};
pub use labels::{Labels, Requirement, Selector};
pub use policy::{Decision, IdentityPolicy, IdentityRule, Reason};
pub use token::{Claims, Expect, Kind, TokenError, Verifier, Window};
