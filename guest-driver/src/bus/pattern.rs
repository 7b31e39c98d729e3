//! Checked, numbered bus messages for tests, and the receiver's verdict on them.
//!
//! A pattern message of `size` bytes (at least [`PATTERN_HEADER_BYTES`]) is
//!
//! ```text
//!  0            8                 16
//!  +------------+-----------------+---------------------------------------+
//!  | index u64  | XXH3-64 u64     | body: PatternStream(index), size - 16 |
//!  +------------+-----------------+---------------------------------------+
//! ```
//!
//! all little-endian, the checksum over the index bytes and the body. A publisher sends
//! indices 0, 1, 2, ...; [`OrderCheck`] keeps, per sender, the next index and the last
//! sequence number it saw, and counts what arrived, what came out of order (an index or a
//! sequence number not above the last), what was corrupt, and what is missing (index gaps,
//! and at the end the indices short of the expected count).
//!
//! What it does not do: talk to a bus (the CLI and the tests feed it events).

use std::collections::BTreeMap;

use domsock_proto::bus::wire::MemberId;
use xxhash_rust::xxh3::Xxh3;

use super::BusMessage;
use crate::pattern::PatternStream;

/// The index and checksum in front of the body.
pub const PATTERN_HEADER_BYTES: usize = 16;
/// Senders an [`OrderCheck`] tracks at most; messages of further senders count as bad.
pub const MAX_TRACKED_SENDERS: usize = 4096;

fn checksum(index: u64, body: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&index.to_le_bytes());
    h.update(body);
    h.digest()
}

/// Writes message `index` of `size` bytes (at least [`PATTERN_HEADER_BYTES`]) into `out`.
pub fn pattern_message(index: u64, size: usize, out: &mut Vec<u8>) {
    let size = size.max(PATTERN_HEADER_BYTES);
    out.clear();
    out.resize(size, 0);
    PatternStream::new(index).fill(&mut out[PATTERN_HEADER_BYTES..]);
    let sum = checksum(index, &out[PATTERN_HEADER_BYTES..]);
    out[..8].copy_from_slice(&index.to_le_bytes());
    out[8..16].copy_from_slice(&sum.to_le_bytes());
}

/// The index of a pattern message whose checksum holds.
pub fn check_pattern_message(payload: &[u8]) -> Option<u64> {
    if payload.len() < PATTERN_HEADER_BYTES {
        return None;
    }
    let index = u64::from_le_bytes(payload[..8].try_into().ok()?);
    let sum = u64::from_le_bytes(payload[8..16].try_into().ok()?);
    (checksum(index, &payload[PATTERN_HEADER_BYTES..]) == sum).then_some(index)
}

#[derive(Debug, Clone, Copy, Default)]
struct SenderTrack {
    last_seq: u64,
    next_index: u64,
}

/// Per-sender order and integrity of pattern messages (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct OrderCheck {
    senders: BTreeMap<MemberId, SenderTrack>,
    received: u64,
    out_of_order: u64,
    bad: u64,
    gaps: u64,
    loss_reported: u64,
}

/// What an [`OrderCheck`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderSummary {
    /// Messages received.
    pub received: u64,
    /// Distinct senders.
    pub senders: usize,
    /// Messages whose index or sequence number was not above the sender's last.
    pub out_of_order: u64,
    /// Messages that were not intact pattern messages.
    pub bad: u64,
    /// Indices missing: gaps, and those short of the expected count per sender.
    pub lost: u64,
    /// Messages the service reported lost (LOSS frames and rejoins).
    pub loss_reported: u64,
}

impl OrderCheck {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A received message.
    pub fn message(&mut self, m: &BusMessage<'_>) {
        self.received += 1;
        let Some(index) = check_pattern_message(m.payload) else {
            self.bad += 1;
            return;
        };
        if !self.senders.contains_key(&m.sender) && self.senders.len() >= MAX_TRACKED_SENDERS {
            self.bad += 1;
            return;
        }
        let t = self.senders.entry(m.sender).or_default();
        if m.seq <= t.last_seq || index < t.next_index {
            self.out_of_order += 1;
            return;
        }
        self.gaps += index - t.next_index;
        t.next_index = index + 1;
        t.last_seq = m.seq;
    }

    /// Messages the service said were lost.
    pub fn reported_loss(&mut self, messages: u64) {
        self.loss_reported = self.loss_reported.saturating_add(messages);
    }

    /// Whether `senders` senders have each reached index `count - 1`.
    pub fn complete(&self, count: u64, senders: usize) -> bool {
        self.senders
            .values()
            .filter(|t| t.next_index >= count)
            .count()
            >= senders
    }

    /// The counts, with the indices short of `expect_per_sender` (if given) counted lost.
    pub fn summary(&self, expect_per_sender: Option<u64>) -> OrderSummary {
        let tail: u64 = match expect_per_sender {
            None => 0,
            Some(n) => self
                .senders
                .values()
                .map(|t| n.saturating_sub(t.next_index))
                .sum(),
        };
        OrderSummary {
            received: self.received,
            senders: self.senders.len(),
            out_of_order: self.out_of_order,
            bad: self.bad,
            lost: self.gaps + tail,
            loss_reported: self.loss_reported,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domsock_proto::bus::wire::Fields;

    fn msg(sender: u32, seq: u64, payload: &[u8]) -> BusMessage<'_> {
        BusMessage {
            sender: MemberId(sender),
            seq,
            fields: Fields::None,
            payload,
        }
    }

    #[test]
    fn messages_check_and_corruption_shows() {
        let mut v = Vec::new();
        pattern_message(7, 64, &mut v);
        assert_eq!(v.len(), 64);
        assert_eq!(check_pattern_message(&v), Some(7));
        v[40] ^= 1;
        assert_eq!(check_pattern_message(&v), None);
        pattern_message(3, 0, &mut v);
        assert_eq!(v.len(), PATTERN_HEADER_BYTES);
        assert_eq!(check_pattern_message(&v), Some(3));
        assert_eq!(check_pattern_message(&v[..15]), None);
    }

    #[test]
    fn order_gaps_and_corruption_are_counted_per_sender() {
        let mut c = OrderCheck::new();
        let m = |i| {
            let mut v = Vec::new();
            pattern_message(i, 32, &mut v);
            v
        };
        let (m0, m1, m2, m4) = (m(0), m(1), m(2), m(4));
        c.message(&msg(1, 1, &m0));
        c.message(&msg(2, 1, &m0));
        c.message(&msg(1, 2, &m1));
        c.message(&msg(1, 3, &m1)); // index again
        c.message(&msg(2, 1, &m1)); // seq again
        c.message(&msg(1, 5, &m4)); // 2 and 3 missing
        c.message(&msg(2, 2, b"junk"));
        assert!(!c.complete(5, 2));
        assert!(c.complete(5, 1));
        c.reported_loss(2);
        let s = c.summary(Some(5));
        assert_eq!(
            s,
            OrderSummary {
                received: 7,
                senders: 2,
                out_of_order: 2,
                bad: 1,
                lost: 2 + 4, // sender 1's gap; sender 2 reached index 1 of 5
                loss_reported: 2,
            }
        );
        c.message(&msg(2, 3, &m2));
        assert_eq!(c.summary(None).lost, 3, "and sender 2's index 1");
    }
}
