//! A fast, keyed hasher for connection tables.
//!
//! Every packet costs several table lookups keyed by [`ConnKey`](crate::ConnKey)s that a
//! guest chooses; std's SipHash-1-3 showed up at ~10% of the data plane's CPU time with
//! small packets. This hasher folds each 64-bit word into the state with a full 64x64->128
//! multiply (the construction of foldhash and ahash's fallback) and finishes with
//! MurmurHash3's avalanche. It is keyed: without the seed, a guest cannot compute which
//! keys collide. The seed comes from the caller (this crate takes no OS randomness);
//! `domsockd` draws it from std's randomly keyed `RandomState`. Not a cryptographic MAC.

use std::hash::{BuildHasher, Hasher};

const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED_MIX: u64 = 0x243f_6a88_85a3_08d3;

/// Builds [`KeyedHasher`]s for one seed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyedState {
    seed: u64,
}

impl KeyedState {
    /// A state with this seed (use a random one wherever keys come from a guest).
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }
}

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            state: self.seed ^ SEED_MIX,
        }
    }
}

/// The hasher; see the module doc.
#[derive(Debug, Clone)]
pub struct KeyedHasher {
    state: u64,
}

impl KeyedHasher {
    #[inline]
    fn fold(&mut self, word: u64) {
        let m = u128::from(self.state ^ word) * u128::from(MULTIPLIER);
        self.state = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl Hasher for KeyedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.fold(u64::from_le_bytes(word));
        }
        self.fold(bytes.len() as u64);
    }

    fn write_u8(&mut self, v: u8) {
        self.fold(u64::from(v));
    }

    fn write_u16(&mut self, v: u16) {
        self.fold(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.fold(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.fold(v);
    }

    fn write_usize(&mut self, v: usize) {
        self.fold(v as u64);
    }

    fn finish(&self) -> u64 {
        // MurmurHash3 fmix64.
        let mut h = self.state;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cid, ConnKey, Port, VsockAddr};
    use std::collections::HashSet;

    fn key(port: u32) -> ConnKey {
        ConnKey {
            local: VsockAddr::new(Cid::HOST, Port(5000)),
            peer: VsockAddr::new(Cid(3), Port(port)),
        }
    }

    #[test]
    fn seed_changes_hashes_and_sequential_ports_spread() {
        let a = KeyedState::new(1);
        let b = KeyedState::new(2);
        assert_ne!(a.hash_one(key(7)), b.hash_one(key(7)));
        assert_eq!(a.hash_one(key(7)), a.hash_one(key(7)));
        // 4096 sequential ports: the low 12 bits (a 4096-bucket table) should nearly
        // never collide.
        let buckets: HashSet<u64> = (0..4096).map(|p| a.hash_one(key(p)) & 0xfff).collect();
        assert!(
            buckets.len() > 2400,
            "only {} distinct buckets",
            buckets.len()
        );
    }

    #[test]
    fn byte_writes_depend_on_length() {
        let s = KeyedState::new(9);
        assert_ne!(
            s.hash_one([0u8; 3].as_slice()),
            s.hash_one([0u8; 4].as_slice())
        );
    }
}
