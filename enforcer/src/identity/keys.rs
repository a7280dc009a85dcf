//! The agent's keys: its own Ed25519 signing key and the trust store of
//! the agents' public keys whose tokens it accepts, loaded from the files
//! the config names; and `enforcer keygen`, which makes a key pair.
//!
//! Files are PEM: the private key as PKCS#8 (`BEGIN PRIVATE KEY`), a
//! public key as SubjectPublicKeyInfo (`BEGIN PUBLIC KEY`), so that
//! `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` make
//! them too. A key is named by its [`KeyId`]: the first 8 bytes of the
//! SHA-256 of its 32 public-key bytes, carried in every token so the
//! receiver picks the key without trying each.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// The short name of a public key, as tokens and logs carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    /// 16 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// This agent's signing key.
#[derive(Clone)]
pub struct AgentKey {
    signing: SigningKey,
    id: KeyId,
}

impl AgentKey {
    pub fn from_signing_key(signing: SigningKey) -> Self {
        let id = KeyId::of(&signing.verifying_key());
        Self { signing, id }
    }

    /// A new key from the operating system's random source.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(Self::from_signing_key(SigningKey::from_bytes(&seed)))
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub(crate) fn signing(&self) -> &SigningKey {
        &self.signing
    }
}

impl fmt::Debug for AgentKey {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentKey({})", self.id)
    }
}

/// The public keys of the agents whose tokens are accepted.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    keys: HashMap<KeyId, VerifyingKey>,
}

impl TrustStore {
    /// Adds a key; refuses a second key with the same id (two distinct
    /// keys colliding in 64 bits would mean a forged key file).
    pub fn add(&mut self, key: VerifyingKey) -> Result<KeyId, KeyId> {
        let id = KeyId::of(&key);
        match self.keys.get(&id) {
            Some(known) if *known != key => Err(id),
            _ => {
                self.keys.insert(id, key);
                Ok(id)
            }
        }
    }

    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The key files the config names (`[identity] key`, `trusted`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    /// This agent's private key.
    pub key: PathBuf,
    /// Public keys of the other agents. This agent's own public key is
    /// always trusted too: two PUs on one host talk through one agent.
    pub trusted: Vec<PathBuf>,
}

/// Both halves, ready for the handshake.
#[derive(Debug, Clone)]
pub struct Keys {
    pub agent: AgentKey,
    pub trust: TrustStore,
}

/// A key file that stops the start; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("identity key file {}: cannot read it: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "identity key file {}: is not an Ed25519 {expected} in PEM ({detail})",
        path.display()
    )]
    Malformed {
        path: PathBuf,
        expected: &'static str,
        detail: String,
    },
    #[error(
        "identity key file {}: a private key readable by group or others (mode {mode:o}); \
         chmod 600 it",
        path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "identity key file {}: key id {id} is already taken by another trusted key",
        path.display()
    )]
    DuplicateId { path: PathBuf, id: KeyId },
    #[error("identity key file {}: {what}", path.display())]
    Write { path: PathBuf, what: String },
}

const PRIVATE: &str = "private key (PKCS#8, BEGIN PRIVATE KEY)";
const PUBLIC: &str = "public key (SubjectPublicKeyInfo, BEGIN PUBLIC KEY)";

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Unreadable {
        path: path.to_owned(),
        source,
    })
}

/// Reads this agent's private key. A file that others can read is
/// refused, as ssh does: a token signed with a leaked key is
/// indistinguishable from this agent's.
pub fn read_private(path: &Path) -> Result<AgentKey, KeyError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|source| KeyError::Unreadable {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    let text = read(path)?;
    let signing = SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Malformed {
        path: path.to_owned(),
        expected: PRIVATE,
        detail: e.to_string(),
    })?;
    Ok(AgentKey::from_signing_key(signing))
}

/// Reads one trusted public key.
pub fn read_public(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = read(path)?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| KeyError::Malformed {
        path: path.to_owned(),
        expected: PUBLIC,
        detail: e.to_string(),
    })
}

/// Loads the agent's key and the trust store: the first bad file stops
/// the start.
pub fn load(files: &KeyFiles) -> Result<Keys, KeyError> {
    let agent = read_private(&files.key)?;
    let mut trust = TrustStore::default();
    trust
        .add(agent.public())
        .expect("an empty store has no colliding id");
    for path in &files.trusted {
        let key = read_public(path)?;
        trust.add(key).map_err(|id| KeyError::DuplicateId {
            path: path.clone(),
            id,
        })?;
    }
    Ok(Keys { agent, trust })
}

/// `enforcer keygen`: writes a new private key to `path` (mode 0600,
/// never over an existing file) and its public key to `path` + `.pub`.
pub fn generate_files(path: &Path) -> Result<(KeyId, PathBuf), KeyError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let write_err = |path: &Path, what: String| KeyError::Write {
        path: path.to_owned(),
        what,
    };
    let key = AgentKey::generate().map_err(|e| write_err(path, format!("no randomness: {e}")))?;
    let private = key
        .signing()
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| write_err(path, e.to_string()))?;
    let public = key
        .public()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| write_err(path, e.to_string()))?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    for (target, text, mode) in [(path, private.as_str(), 0o600), (&pub_path, &public, 0o644)] {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(target)
            .map_err(|e| write_err(target, format!("cannot create it: {e}")))?;
        file.write_all(text.as_bytes())
            .map_err(|e| write_err(target, format!("cannot write it: {e}")))?;
    }
    Ok((key.id(), pub_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("enforcer-keys-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn generated_files_load_back_and_trust_the_own_key() {
        let dir = scratch("gen");
        let (id_a, pub_a) = generate_files(&dir.join("a.key")).unwrap();
        let (id_b, pub_b) = generate_files(&dir.join("b.key")).unwrap();
        assert_ne!(id_a, id_b);
        let keys = load(&KeyFiles {
            key: dir.join("a.key"),
            trusted: vec![pub_b.clone()],
        })
        .unwrap();
        assert_eq!(keys.agent.id(), id_a);
        assert_eq!(keys.trust.len(), 2);
        assert!(keys.trust.get(&id_a).is_some() && keys.trust.get(&id_b).is_some());
        assert_eq!(KeyId::of(&read_public(&pub_a).unwrap()), id_a);
        // Listing the own public key again is harmless.
        let keys = load(&KeyFiles {
            key: dir.join("a.key"),
            trusted: vec![pub_a, pub_b],
        })
        .unwrap();
        assert_eq!(keys.trust.len(), 2);
        // Never overwrites.
        let err = generate_files(&dir.join("a.key")).unwrap_err();
        assert!(err.to_string().contains("a.key: cannot create it"), "{err}");
        assert_eq!(format!("{:?}", keys.agent), format!("AgentKey({id_a})"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_key_files_are_named_in_the_error() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = scratch("bad");
        let (_, public) = generate_files(&dir.join("a.key")).unwrap();
        let missing = dir.join("missing.pub");
        let files = |key: &Path, trusted: &[&Path]| KeyFiles {
            key: key.to_owned(),
            trusted: trusted.iter().map(|p| p.to_path_buf()).collect(),
        };
        let err = load(&files(&dir.join("a.key"), &[&missing])).unwrap_err();
        assert!(matches!(err, KeyError::Unreadable { .. }));
        assert!(
            err.to_string().contains("missing.pub: cannot read it"),
            "{err}"
        );
        let err = load(&files(&dir.join("nope.key"), &[])).unwrap_err();
        assert!(err.to_string().contains("nope.key"), "{err}");

        // A public key where the private one belongs, and the reverse.
        let swapped = dir.join("swapped.key");
        std::fs::copy(&public, &swapped).unwrap();
        std::fs::set_permissions(&swapped, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load(&files(&swapped, &[])).unwrap_err();
        assert!(
            err.to_string()
                .contains("swapped.key: is not an Ed25519 private key"),
            "{err}"
        );
        let err = load(&files(&dir.join("a.key"), &[&dir.join("a.key")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("a.key: is not an Ed25519 public key"),
            "{err}"
        );
        let garbage = dir.join("garbage.pub");
        std::fs::write(&garbage, "-----BEGIN PUBLIC KEY-----\nAAAA\n").unwrap();
        assert!(matches!(
            load(&files(&dir.join("a.key"), &[&garbage])),
            Err(KeyError::Malformed { .. })
        ));

        let open = dir.join("a.key");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load(&files(&open, &[])).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
