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
//!
//! Seqpacket sessions count messages, not bytes: [`MessageReplay`] is the guest side's
//! buffer for them (the last messages whose bytes fit the daemon's window, resent whole).

use std::collections::VecDeque;
use thiserror::Error;

/// A count from the peer that this buffer cannot serve (bytes, or messages for
/// [`MessageReplay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReplayError {
    /// The peer claims more than was ever sent.
    #[error("peer claims {claimed} received, only {sent} were sent")]
    Beyond {
        /// What the peer claims to have received.
        claimed: u64,
        /// What was sent.
        sent: u64,
    },
    /// The peer is missing bytes this buffer no longer holds.
    #[error("peer lacks everything from {claimed} on, the replay buffer starts at {kept_from}")]
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

    /// An empty buffer whose next byte is at `start` (a session moved from another host
    /// resumes its offsets).
    pub fn starting_at(capacity: usize, start: u64) -> Self {
        Self {
            start,
            ..Self::new(capacity)
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

    /// Makes room for `extra` more bytes, growing the bound if needed (host bytes that
    /// were in flight when a sibling pair was joined join the replay at once). The caller
    /// bounds `extra`.
    pub fn reserve(&mut self, extra: usize) {
        if self.room() >= extra {
            return;
        }
        let capacity = self.len + extra;
        let (a, b) = self.slices_from(self.start);
        let mut ring = Vec::with_capacity(capacity);
        ring.extend_from_slice(a);
        ring.extend_from_slice(b);
        ring.resize(capacity, 0);
        self.ring = ring;
        self.head = 0;
        self.capacity = capacity;
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

/// A message too large for a [`MessageReplay`]: the daemon could never hold it whole
/// (the guest kernel refuses such a send with `EMSGSIZE` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("a {len}-byte message does not fit a replay window of {capacity} bytes")]
pub struct MessageTooLarge {
    /// The message's length.
    pub len: usize,
    /// The buffer's bound.
    pub capacity: usize,
}

/// The guest side's replay buffer of a seqpacket session: the last messages sent whose
/// bytes fit in `capacity` (the daemon's window), addressed by message count (`u64`, the
/// first message is 0), resent whole.
///
/// Why the newest messages that fit are enough: the daemon counts a message once it has
/// all of it, and what it lacks (the message it was receiving and any after it) is in
/// flight or unconsumed in its buffer, within the credit it gave: at most `capacity`
/// bytes. So a message that had to be evicted to make room was complete at the daemon.
///
/// Bytes live in one ring ([`ReplayBuffer`], allocated on first use) and each message
/// adds one `u64` for its end, so recording costs a copy and no allocation; the message
/// count kept is bounded by `capacity` because no message is empty.
#[derive(Debug, Clone)]
pub struct MessageReplay {
    bytes: ReplayBuffer,
    /// Byte offset (in `bytes`) one past each message kept, oldest first.
    ends: VecDeque<u64>,
    /// The count of the oldest message kept.
    first: u64,
}

impl MessageReplay {
    /// An empty buffer for a session that has sent no message, keeping at most `capacity`
    /// bytes of messages.
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: ReplayBuffer::new(capacity),
            ends: VecDeque::new(),
            first: 0,
        }
    }

    /// Its bound in bytes.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// The count of the oldest message kept.
    pub fn start(&self) -> u64 {
        self.first
    }

    /// Messages ever recorded (one past the newest).
    pub fn end(&self) -> u64 {
        self.first + self.ends.len() as u64
    }

    /// Messages kept.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no message is kept.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Records one message of `len` bytes that `fill` writes into the two slices it is
    /// given, in order (for callers whose bytes are scattered, like an iovec), evicting
    /// the oldest messages until it fits. An empty message is not a message (a seqpacket
    /// send of 0 bytes sends nothing) and is not recorded.
    pub fn record_evicting_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8], &mut [u8]),
    ) -> Result<(), MessageTooLarge> {
        if len > self.capacity() {
            return Err(MessageTooLarge {
                len,
                capacity: self.capacity(),
            });
        }
        if len == 0 {
            return Ok(());
        }
        while self.bytes.room() < len {
            let end = self
                .ends
                .pop_front()
                .expect("bytes kept belong to messages");
            self.bytes.ack(end);
            self.first += 1;
        }
        let recorded = self.bytes.record_with(len, fill);
        debug_assert_eq!(recorded, len, "room made above");
        self.ends.push_back(self.bytes.end());
        Ok(())
    }

    /// Records `msg`, evicting the oldest messages until it fits.
    pub fn record_evicting(&mut self, msg: &[u8]) -> Result<(), MessageTooLarge> {
        self.record_evicting_with(msg.len(), |a, b| {
            a.copy_from_slice(&msg[..a.len()]);
            b.copy_from_slice(&msg[a.len()..]);
        })
    }

    /// Forgets the messages before count `upto` (the peer has them), clamped like
    /// [`ReplayBuffer::ack`].
    pub fn ack(&mut self, upto: u64) {
        let upto = upto.clamp(self.first, self.end());
        while self.first < upto {
            let end = self.ends.pop_front().expect("below end()");
            self.bytes.ack(end);
            self.first += 1;
        }
    }

    /// The peer has received `claimed` messages: forgets those and returns the others,
    /// oldest first, each whole, to be sent again.
    pub fn resume_from(&mut self, claimed: u64) -> Result<Messages<'_>, ReplayError> {
        if claimed > self.end() {
            return Err(ReplayError::Beyond {
                claimed,
                sent: self.end(),
            });
        }
        if claimed < self.first {
            return Err(ReplayError::Lost {
                claimed,
                kept_from: self.first,
            });
        }
        self.ack(claimed);
        Ok(self.iter())
    }

    /// The messages kept, oldest first.
    pub fn iter(&self) -> Messages<'_> {
        Messages {
            replay: self,
            next: 0,
            from: self.bytes.start(),
        }
    }
}

/// The messages of a [`MessageReplay`], oldest first; each is two slices of its ring (the
/// second empty unless the message wraps), which a sender copies out or writes with one
/// vectored send.
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    replay: &'a MessageReplay,
    /// Index in `ends` of the next message.
    next: usize,
    /// Byte offset where it starts.
    from: u64,
}

impl<'a> Iterator for Messages<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let end = *self.replay.ends.get(self.next)?;
        let len = (end - self.from) as usize;
        let (a, b) = self.replay.bytes.slices_from(self.from);
        let first = len.min(a.len());
        self.next += 1;
        self.from = end;
        Some((&a[..first], &b[..len - first]))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.replay.ends.len() - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Messages<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(s: (&[u8], &[u8])) -> Vec<u8> {
        [s.0, s.1].concat()
    }

    #[test]
    fn reserve_grows_a_wrapped_ring_and_keeps_its_bytes_in_order() {
        let mut r = ReplayBuffer::starting_at(8, 100);
        r.record(b"abcdef");
        r.ack(104);
        r.record(b"ghijk");
        assert_eq!(r.room(), 1);
        r.reserve(1);
        assert_eq!(r.capacity(), 8, "enough room already");
        r.reserve(10);
        assert_eq!((r.capacity(), r.room()), (17, 10));
        assert_eq!(r.record(b"0123456789"), 10);
        assert_eq!(r.copy_range(104, r.end()), b"efghijk0123456789");
        assert_eq!((r.start(), r.end()), (104, 121));
        r.ack(110);
        assert_eq!(joined(r.slices_from(110)), b"k0123456789");
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

    fn messages(r: &mut MessageReplay, claimed: u64) -> Vec<Vec<u8>> {
        r.resume_from(claimed)
            .expect("served")
            .map(|(a, b)| [a, b].concat())
            .collect()
    }

    #[test]
    fn messages_are_kept_whole_while_their_bytes_fit() {
        let mut r = MessageReplay::new(10);
        r.record_evicting(b"abc").unwrap();
        r.record_evicting(b"defg").unwrap();
        r.record_evicting(b"").unwrap();
        assert_eq!(
            (r.start(), r.end(), r.bytes()),
            (0, 2, 7),
            "empty is no message"
        );
        r.record_evicting(b"hijk").unwrap();
        assert_eq!(
            (r.start(), r.end(), r.bytes()),
            (1, 3, 8),
            "the oldest goes whole, not a byte of it is kept"
        );
        assert_eq!(messages(&mut r.clone(), 1), [&b"defg"[..], b"hijk"]);
        assert_eq!(messages(&mut r.clone(), 3), Vec::<Vec<u8>>::new());
        assert_eq!(
            r.record_evicting(&[0; 11]),
            Err(MessageTooLarge {
                len: 11,
                capacity: 10
            })
        );
        assert_eq!(r.end(), 3, "a refused message is not counted");
        r.record_evicting(&[7; 10]).unwrap();
        assert_eq!(
            (r.start(), r.end(), r.len()),
            (3, 4, 1),
            "a full-window message"
        );
        assert_eq!(messages(&mut r, 3), [vec![7u8; 10]]);
    }

    #[test]
    fn counts_outside_the_kept_messages_are_refused() {
        let mut r = MessageReplay::new(4);
        for m in [&b"ab"[..], b"cd", b"ef"] {
            r.record_evicting(m).unwrap();
        }
        assert_eq!(
            r.resume_from(0).map(|_| ()),
            Err(ReplayError::Lost {
                claimed: 0,
                kept_from: 1
            })
        );
        assert_eq!(
            r.resume_from(4).map(|_| ()),
            Err(ReplayError::Beyond {
                claimed: 4,
                sent: 3
            })
        );
        assert_eq!(messages(&mut r, 2), [b"ef"]);
        assert_eq!(r.start(), 2, "a resume forgets what the peer has");
        r.ack(1);
        assert_eq!(r.start(), 2, "acknowledging the past again is harmless");
        r.ack(9);
        assert_eq!((r.start(), r.len(), r.bytes()), (3, 0, 0));
    }

    #[test]
    fn a_message_that_wraps_the_ring_comes_back_whole() {
        let mut r = MessageReplay::new(5);
        r.record_evicting(b"ab").unwrap();
        r.record_evicting(b"cd").unwrap();
        r.record_evicting_with(2, |a, b| {
            assert_eq!((a.len(), b.len()), (1, 1), "split at the ring's end");
            a.copy_from_slice(b"e");
            b.copy_from_slice(b"f");
        })
        .unwrap();
        let pieces: Vec<(Vec<u8>, Vec<u8>)> =
            r.iter().map(|(a, b)| (a.to_vec(), b.to_vec())).collect();
        assert_eq!(
            pieces,
            [(b"cd".to_vec(), vec![]), (b"e".to_vec(), b"f".to_vec())]
        );
        assert_eq!(r.iter().len(), 2);
        assert_eq!(messages(&mut r, 2), [b"ef"], "whole, from the count on");
    }

    /// The message model of one direction: a sender within credit (a message goes whole
    /// or waits), a receiver that counts a message once it has all of it, breaks that lose
    /// what is in flight. Over many seeds every message arrives once, in order, whole.
    #[test]
    fn messages_survive_breaks_at_any_point() {
        const WINDOW: usize = 40;
        for seed in 0..300u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let input: Vec<Vec<u8>> = (0..300u32)
                .map(|i| {
                    // Mostly small, so that several are in flight; now and then a whole
                    // window's worth.
                    let len = match (i as u64 + seed) % 17 {
                        0 => WINDOW,
                        k => 1 + (i as usize * 7 + seed as usize + k as usize) % 13,
                    };
                    vec![(i ^ seed as u32) as u8; len]
                })
                .collect();
            let mut written = 0usize;
            let mut log = MessageReplay::new(WINDOW);
            let mut in_flight: VecDeque<Vec<u8>> = VecDeque::new();
            let in_flight_bytes = |q: &VecDeque<Vec<u8>>| q.iter().map(Vec::len).sum::<usize>();
            let mut unconsumed: VecDeque<Vec<u8>> = VecDeque::new();
            let mut delivered: Vec<Vec<u8>> = Vec::new();
            let mut steps = 0;
            while delivered.len() < input.len() && steps < 100_000 {
                steps += 1;
                match next() % 5 {
                    0 | 1 if written < input.len() => {
                        let credit = WINDOW.saturating_sub(
                            in_flight_bytes(&in_flight) + in_flight_bytes(&unconsumed),
                        );
                        let msg = &input[written];
                        if msg.len() <= credit {
                            log.record_evicting(msg).unwrap();
                            in_flight.push_back(msg.clone());
                            written += 1;
                        }
                    }
                    2 => {
                        if let Some(m) = in_flight.pop_front() {
                            unconsumed.push_back(m);
                        }
                    }
                    3 => {
                        if let Some(m) = unconsumed.pop_front() {
                            delivered.push(m);
                        }
                    }
                    _ => {
                        in_flight.clear();
                        let received = (delivered.len() + unconsumed.len()) as u64;
                        let again: Vec<Vec<u8>> = log
                            .resume_from(received)
                            .expect("within the window")
                            .map(|(a, b)| [a, b].concat())
                            .collect();
                        in_flight.extend(again);
                    }
                }
            }
            assert_eq!(delivered, input, "seed {seed}");
        }
    }
}
