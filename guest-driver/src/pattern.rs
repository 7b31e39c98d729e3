//! The deterministic test byte stream shared by the guest program and the host-side tests, and
//! the checksum both sides report.
//!
//! # The stream
//! For a 64-bit `seed`, the initial state is `splitmix64(seed)` (the first output of
//! SplitMix64 with state `seed`), replaced by `0x9E37_79B9_7F4A_7C15` if that is zero. Each step
//! runs Marsaglia's xorshift64 with shifts (13, 7, 17) and emits the new state as 8 bytes,
//! little-endian:
//!
//! ```text
//! x ^= x << 13; x ^= x >> 7; x ^= x << 17; out(x.to_le_bytes())
//! ```
//!
//! The stream is a plain byte sequence: how it is cut into writes does not change it, so
//! `PatternStream::new(s)` filled in any chunk sizes yields the same bytes.
//!
//! # The checksum
//! XXH3-64 with the default secret and seed 0 over all bytes of a transfer, printed as 16
//! lower-case hex digits (`xxh3=0123456789abcdef`).
//!
//! Not cryptographic and not meant to be: it only has to make lost, duplicated, reordered or
//! corrupted bytes visible.

use xxhash_rust::xxh3::Xxh3;

/// Generator of the test byte stream (see the module docs for the exact definition).
#[derive(Debug, Clone)]
pub struct PatternStream {
    state: u64,
    /// Current word's bytes not handed out yet are `word[used..]`.
    word: [u8; 8],
    used: usize,
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl PatternStream {
    /// Stream for `seed`, positioned at its first byte.
    pub fn new(seed: u64) -> Self {
        let state = match splitmix64(seed) {
            0 => 0x9E37_79B9_7F4A_7C15,
            s => s,
        };
        Self {
            state,
            word: [0; 8],
            used: 8,
        }
    }

    #[inline]
    fn next_word(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        // Finish a word left partly used by the previous call.
        let head = (8 - self.used).min(buf.len());
        buf[..head].copy_from_slice(&self.word[self.used..self.used + head]);
        self.used += head;
        let rest = &mut buf[head..];

        let mut words = rest.chunks_exact_mut(8);
        for out in &mut words {
            out.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word().to_le_bytes();
            tail.copy_from_slice(&self.word[..tail.len()]);
            self.used = tail.len();
        }
    }

    /// Returns the next `len` bytes of the stream.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

/// Streaming XXH3-64 with a byte count: the checksum every DS-RESULT line reports.
#[derive(Clone)]
pub struct Checksum {
    hasher: Xxh3,
    bytes: u64,
}

impl std::fmt::Debug for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checksum")
            .field("bytes", &self.bytes)
            .field("xxh3", &self.hex())
            .finish()
    }
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// Empty checksum.
    pub fn new() -> Self {
        Self {
            hasher: Xxh3::new(),
            bytes: 0,
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
    }

    /// Bytes added so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// XXH3-64 of the bytes added so far.
    pub fn digest(&self) -> u64 {
        self.hasher.digest()
    }

    /// [`Self::digest`] as printed in result lines: 16 lower-case hex digits.
    pub fn hex(&self) -> String {
        format_xxh3(self.digest())
    }
}

/// Formats an XXH3-64 value as result lines print it.
pub fn format_xxh3(digest: u64) -> String {
    format!("{digest:016x}")
}

/// Length and XXH3-64 of the first `len` bytes of the stream for `seed`, without keeping them.
pub fn pattern_checksum(seed: u64, len: u64) -> Checksum {
    let mut gen = PatternStream::new(seed);
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        gen.fill(&mut buf[..n]);
        sum.update(&buf[..n]);
        left -= n as u64;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let whole = PatternStream::new(7).take(1000);
        let mut gen = PatternStream::new(7);
        let mut pieces = Vec::new();
        for n in [1, 2, 3, 5, 8, 13, 64, 1, 7, 896] {
            pieces.extend(gen.take(n));
        }
        assert_eq!(whole, pieces);
    }

    #[test]
    fn first_word_is_documented_recipe() {
        let mut x = splitmix64(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        assert_eq!(PatternStream::new(1).take(8), x.to_le_bytes());
    }

    #[test]
    fn seeds_differ_and_checksum_matches_one_shot() {
        assert_ne!(
            PatternStream::new(1).take(64),
            PatternStream::new(2).take(64)
        );
        let data = PatternStream::new(3).take(200_000);
        let sum = pattern_checksum(3, 200_000);
        assert_eq!(sum.bytes(), 200_000);
        assert_eq!(sum.digest(), xxhash_rust::xxh3::xxh3_64(&data));
    }

    #[test]
    fn zero_state_is_avoided() {
        // Whatever the seed, the generator must never get stuck at zero.
        for seed in 0..1000 {
            assert!(PatternStream::new(seed).take(64).iter().any(|&b| b != 0));
        }
    }
}
