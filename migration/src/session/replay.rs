//! The bounded replay buffer of one direction of a session: what the sender has sent but
//! the receiver may not have yet, addressed by absolute stream offset (`u64`, never wraps).
//!
//! Two ways to bound it, one per side:
//! - the **daemon** acknowledges what the guest consumed (its vsock `fwd_cnt`) with
//!   [`ReplayBuffer::ack`] and never records more than [`ReplayBuffer::room`];
//! - the **guest** cannot see acknowledgements from user space, but the vsock credit it
//!   obeys bounds what the daemon may not have received by the daemon's advertised window,
//!   so it records with [`ReplayBuffer::record_evicting`], keeping the last `window` bytes.
//!
//! On resume, [`ReplayBuffer::resume_from`] names exactly the tail to send again, or says
//! why the peer's count is impossible.

use thiserror::Error;

/// A count from the peer that this buffer cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReplayError {
    /// The peer claims more than was ever sent.
    #[error("peer claims {claimed} bytes, only {sent} were sent")]
    Beyond {
        /// What the peer claims to have received.
        claimed: u64,
        /// What was sent.
        sent: u64,
    },
    /// The peer is missing bytes this buffer no longer holds.
    #[error("peer needs bytes from {claimed}, the replay buffer starts at {kept_from}")]
    Lost {
        /// What the peer claims to have received.
        claimed: u64,
        /// The oldest offset still kept.
        kept_from: u64,
    },
}

/// Sent bytes kept for retransmission: a ring of `capacity` bytes, allocated on first use.
#[derive(Debug, Clone)]
pub struct ReplayBuffer {
    ring: Vec<u8>,
    /// Index in `ring` of the oldest byte kept.
    head: usize,
    len: usize,
    /// Absolute offset of the oldest byte kept.
    start: u64,
    capacity: usize,
}

impl ReplayBuffer {
    /// An empty buffer for a stream at offset 0 that holds at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Vec::new(),
            head: 0,
            len: 0,
            start: 0,
            capacity,
        }
    }

    /// Its bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes kept.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that may still be recorded without evicting.
    pub fn room(&self) -> usize {
        self.capacity - self.len
    }

    /// Offset of the oldest byte kept.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Offset one past the newest byte recorded (everything ever recorded).
    pub fn end(&self) -> u64 {
        self.start + self.len as u64
    }

    /// The free space after the newest byte, as (up to) two slices totalling `n`.
    fn tail_mut(&mut self, n: usize) -> (&mut [u8], &mut [u8]) {
        debug_assert!(n <= self.room());
        if self.ring.len() < self.capacity {
            // Allocated once, on first use: most sessions never carry a byte.
            self.ring.resize(self.capacity, 0);
        }
        let cap = self.capacity;
        let at = (self.head + self.len) % cap.max(1);
        let first = n.min(cap - at);
        let (before, after) = self.ring.split_at_mut(at);
        (&mut after[..first], &mut before[..n - first])
    }

    /// Records `n` bytes (at most [`Self::room`]) that `fill` writes into the two slices
    /// it is given, in order. For callers whose bytes are not in one slice (guest memory).
    pub fn record_with(&mut self, n: usize, fill: impl FnOnce(&mut [u8], &mut [u8])) -> usize {
        let n = n.min(self.room());
        if n == 0 {
            return 0;
        }
        let (a, b) = self.tail_mut(n);
        fill(a, b);
        self.len += n;
        n
    }

    /// Records bytes the caller checked fit ([`Self::room`]); returns how many were
    /// recorded (all of `data` when it fits).
    pub fn record(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room());
        self.record_with(n, |a, b| {
            a.copy_from_slice(&data[..a.len()]);
            b.copy_from_slice(&data[a.len()..n]);
        })
    }

    /// Records `data`, evicting the oldest bytes beyond the capacity.
    pub fn record_evicting(&mut self, data: &[u8]) {
        let data = if data.len() > self.capacity {
            let skip = data.len() - self.capacity;
            self.ack(self.end());
            self.start += skip as u64;
            &data[skip..]
        } else {
            data
        };
        let overflow = (self.len + data.len()).saturating_sub(self.capacity);
        self.ack(self.start + overflow as u64);
        self.record(data);
    }

    /// Forgets everything before `upto` (the peer has it). An `upto` outside the kept
    /// range is clamped: acknowledging the past again is harmless, and the future cannot
    /// be acknowledged.
    pub fn ack(&mut self, upto: u64) {
        let upto = upto.clamp(self.start, self.end());
        let n = (upto - self.start) as usize;
        if n == 0 {
            return;
        }
        self.head = (self.head + n) % self.capacity;
        self.len -= n;
        self.start = upto;
        if self.len == 0 {
            self.head = 0;
        }
    }

    /// The peer has received `claimed` bytes: forgets what it has and returns the tail it
    /// lacks, as the ring's two slices.
    pub fn resume_from(&mut self, claimed: u64) -> Result<(&[u8], &[u8]), ReplayError> {
        if claimed > self.end() {
            return Err(ReplayError::Beyond {
                claimed,
                sent: self.end(),
            });
        }
        if claimed < self.start {
            return Err(ReplayError::Lost {
                claimed,
                kept_from: self.start,
            });
        }
        self.ack(claimed);
        Ok(self.slices_from(claimed))
    }

    /// A copy of the kept bytes `[from, to)` (clamped to what is kept).
    pub fn copy_range(&self, from: u64, to: u64) -> Vec<u8> {
        let (a, b) = self.slices_from(from);
        let n = (to
            .clamp(self.start, self.end())
            .saturating_sub(from.max(self.start))) as usize;
        let mut out = Vec::with_capacity(n);
        out.extend_from_slice(&a[..n.min(a.len())]);
        out.extend_from_slice(&b[..n - n.min(a.len())]);
        out
    }

    /// The kept bytes from `from` on (clamped to what is kept), as two slices.
    pub fn slices_from(&self, from: u64) -> (&[u8], &[u8]) {
        let skip = (from.clamp(self.start, self.end()) - self.start) as usize;
        let n = self.len - skip;
        if n == 0 {
            return (&[], &[]);
        }
        let cap = self.capacity;
        let at = (self.head + skip) % cap;
        let first = n.min(cap - at);
        (&self.ring[at..at + first], &self.ring[..n - first])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(s: (&[u8], &[u8])) -> Vec<u8> {
        [s.0, s.1].concat()
    }

    #[test]
    fn the_daemon_side_acks_and_resends_the_exact_tail() {
        let mut r = ReplayBuffer::new(8);
        assert_eq!(r.record(b"abcdef"), 6);
        assert_eq!(r.record(b"ghijk"), 2, "bounded by room");
        assert_eq!(r.end(), 8);
        r.ack(3);
        assert_eq!(r.start(), 3);
        assert_eq!(joined(r.slices_from(5)), b"fgh");
        assert_eq!(joined(r.resume_from(4).unwrap()), b"efgh");
        assert_eq!(
            r.resume_from(2),
            Err(ReplayError::Lost {
                claimed: 2,
                kept_from: 4
            })
        );
        assert_eq!(
            r.resume_from(9),
            Err(ReplayError::Beyond {
                claimed: 9,
                sent: 8
            })
        );
        r.ack(100);
        assert_eq!((r.start(), r.len()), (8, 0), "ack clamps to what was sent");
    }

    #[test]
    fn the_guest_side_keeps_the_last_window() {
        let mut r = ReplayBuffer::new(4);
        r.record_evicting(b"ab");
        r.record_evicting(b"cde");
        assert_eq!((r.start(), r.end()), (1, 5));
        assert_eq!(joined(r.slices_from(0)), b"bcde");
        r.record_evicting(b"0123456789");
        assert_eq!((r.start(), r.end()), (11, 15));
        assert_eq!(joined(r.resume_from(12).unwrap()), b"789");
    }

    #[test]
    fn the_ring_wraps_and_records_in_two_pieces() {
        let mut r = ReplayBuffer::new(5);
        r.record(b"abc");
        r.ack(2);
        assert_eq!(
            r.record_with(4, |a, b| {
                assert_eq!((a.len(), b.len()), (2, 2), "split at the ring's end");
                a.copy_from_slice(b"de");
                b.copy_from_slice(b"fg");
            }),
            4
        );
        assert_eq!(joined(r.slices_from(0)), b"cdefg");
        assert_eq!(joined(r.slices_from(5)), b"fg");
        assert_eq!(r.copy_range(3, 6), b"def");
        assert_eq!(r.copy_range(0, 3), b"c", "clamped to what is kept");
        assert_eq!(r.room(), 0);
        r.ack(7);
        assert!(r.is_empty());
        assert_eq!(r.record(b"hijkl"), 5);
        assert_eq!(joined(r.slices_from(7)), b"hijkl");
    }
}
