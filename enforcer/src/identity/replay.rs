//! The replay cache: which (key id, nonce) pairs were accepted within the
//! token window, in bounded memory.
//!
//! Entries are forgotten once no token carrying them could still be
//! accepted (insertion time + lifetime + skew). The forget times are
//! pushed in insertion order from a clock that moves forward, so expiry
//! pops from the front of a queue. When the cache is full it refuses new
//! tokens instead of evicting a live entry: evicting would let that token
//! be replayed. Only tokens whose signature verified get here, so only a
//! trusted agent can fill it.

use std::collections::{HashSet, VecDeque};

use super::keys::KeyId;
use super::token::Nonce;

/// Entries by default: about 7,000 handshakes a second over a 35-second
/// window, in roughly 20 MiB.
pub const DEFAULT_CAPACITY: usize = 1 << 18;

/// Whether a nonce was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Again,
    Full,
}

#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    seen: HashSet<(KeyId, Nonce)>,
    expiry: VecDeque<(u64, (KeyId, Nonce))>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seen: HashSet::new(),
            expiry: VecDeque::new(),
        }
    }

    /// Forgets what expired by `now_ms`, then records the pair unless it
    /// is known or the cache is full.
    pub fn check_and_insert(
        &mut self,
        key: KeyId,
        nonce: Nonce,
        now_ms: u64,
        forget_at_ms: u64,
    ) -> Seen {
        while let Some(&(at, entry)) = self.expiry.front() {
            if at > now_ms {
                break;
            }
            self.expiry.pop_front();
            self.seen.remove(&entry);
        }
        let entry = (key, nonce);
        if self.seen.contains(&entry) {
            return Seen::Again;
        }
        if self.seen.len() >= self.capacity {
            return Seen::Full;
        }
        self.seen.insert(entry);
        self.expiry.push_back((forget_at_ms, entry));
        Seen::New
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: KeyId = KeyId([1; 8]);
    const B: KeyId = KeyId([2; 8]);

    #[test]
    fn a_pair_is_refused_until_it_expires() {
        let mut cache = ReplayCache::new(8);
        assert_eq!(cache.check_and_insert(A, [1; 16], 0, 100), Seen::New);
        assert_eq!(cache.check_and_insert(A, [1; 16], 99, 199), Seen::Again);
        // The same nonce from another key is another token.
        assert_eq!(cache.check_and_insert(B, [1; 16], 99, 199), Seen::New);
        assert_eq!(cache.check_and_insert(A, [1; 16], 100, 200), Seen::New);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn memory_is_bounded_and_a_full_cache_refuses() {
        let mut cache = ReplayCache::new(3);
        for n in 0..3u8 {
            assert_eq!(cache.check_and_insert(A, [n; 16], 10, 100), Seen::New);
        }
        assert_eq!(cache.check_and_insert(A, [9; 16], 50, 150), Seen::Full);
        // Still remembered while full: no live entry was evicted.
        assert_eq!(cache.check_and_insert(A, [0; 16], 50, 150), Seen::Again);
        assert_eq!(cache.len(), 3);
        // Expiry makes room again.
        assert_eq!(cache.check_and_insert(A, [9; 16], 100, 200), Seen::New);
        assert_eq!(cache.len(), 1);
        // A long run stays within the bound.
        for i in 0..10_000u64 {
            let mut nonce = [0; 16];
            nonce[..8].copy_from_slice(&i.to_be_bytes());
            let seen = cache.check_and_insert(B, nonce, 200 + i, 210 + i);
            assert_ne!(seen, Seen::Again);
            assert!(cache.len() <= 3);
        }
    }
}
