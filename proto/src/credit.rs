//! Credit-based flow control (virtio spec 1.3, 5.10.6.3).
//!
//! Each side advertises `buf_alloc` (its receive buffer size) and `fwd_cnt` (bytes it has
//! consumed from that buffer) in every packet. A sender may have at most
//! `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight. All counters are free-running
//! `u32`s compared with wrapping arithmetic, so a connection may carry more than 4 GiB.
//!
//! Credit-update elision: a `CREDIT_UPDATE` is only worth a packet when the peer's view of
//! our free space has dropped below half the buffer; otherwise the `fwd_cnt` piggybacked on
//! the next data or control packet is enough. Two rules build on that:
//!
//! - [`Credit::wants_update`] also waits until the update would lift the peer's view back to
//!   at least half the buffer. This avoids silly-window syndrome: with a full buffer and a
//!   reader taking small pieces, every read would otherwise send an update granting a few
//!   bytes, and the sender would answer each with a packet just as small. It is safe for a
//!   consumer that never holds received bytes back while waiting for more (a stream
//!   forwarder): such a consumer stops only when its own output is blocked, and once it has
//!   taken everything the whole buffer is free.
//! - [`Credit::wants_eager_update`] tells the peer about any consumption as soon as its view
//!   is low. A consumer that holds a partial unit (a seqpacket message) until the rest arrives
//!   needs this, checked both when it consumes and when data arrives; batching, or checking
//!   only on consumption, could leave both sides waiting for each other.

use std::num::Wrapping;
use thiserror::Error;

/// The peer sent more than the credit we gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("peer sent {len} bytes with only {free} bytes of credit")]
pub struct CreditViolation {
    /// Payload length of the offending packet.
    pub len: u32,
    /// Credit the peer had.
    pub free: u32,
}

/// Both directions of credit state for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    buf_alloc: u32,
    fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    last_sent_fwd_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
}

impl Credit {
    /// New state with our buffer size and the peer's initial advertisement.
    pub fn new(buf_alloc: u32, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Self {
        Self {
            buf_alloc,
            fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            last_sent_fwd_cnt: Wrapping(0),
            peer_buf_alloc,
            peer_fwd_cnt: Wrapping(peer_fwd_cnt),
            tx_cnt: Wrapping(0),
        }
    }

    /// Our advertised receive buffer size.
    pub fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    /// Bytes we have consumed so far (wrapping).
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    /// What the peer said it has consumed of our bytes (wrapping).
    pub fn peer_fwd_cnt(&self) -> u32 {
        self.peer_fwd_cnt.0
    }

    /// Changes the receive buffer we advertise (from the next header on).
    pub fn set_buf_alloc(&mut self, bytes: u32) {
        self.buf_alloc = bytes;
    }

    /// Bytes received but not yet consumed by our side.
    pub fn unconsumed(&self) -> u32 {
        (self.rx_cnt - self.fwd_cnt).0
    }

    /// Bytes we may send to the peer right now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes sent and not yet acknowledged as consumed by the peer.
    pub fn in_flight(&self) -> u32 {
        (self.tx_cnt - self.peer_fwd_cnt).0
    }

    /// Records the peer's credit fields from any packet of this connection.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Accounts `len` received payload bytes, rejecting credit violations.
    pub fn on_receive(&mut self, len: u32) -> Result<(), CreditViolation> {
        let free = self.buf_alloc.saturating_sub(self.unconsumed());
        if len > free {
            return Err(CreditViolation { len, free });
        }
        self.rx_cnt += Wrapping(len);
        Ok(())
    }

    /// Accounts `n` bytes handed on to our consumer. Panics in debug builds if `n` exceeds
    /// what was received; release builds clamp.
    pub fn consume(&mut self, n: u32) {
        debug_assert!(
            n <= self.unconsumed(),
            "consumed {n} > unconsumed {}",
            self.unconsumed()
        );
        self.fwd_cnt += Wrapping(n.min(self.unconsumed()));
    }

    /// Accounts `len` payload bytes sent to the peer.
    pub fn on_send(&mut self, len: u32) {
        debug_assert!(len <= self.peer_credit());
        self.tx_cnt += Wrapping(len);
    }

    /// Values to put in an outgoing header; records that the peer now knows them.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.last_sent_fwd_cnt = self.fwd_cnt;
        (self.buf_alloc, self.fwd_cnt.0)
    }

    /// Whether a `CREDIT_UPDATE` should be sent now, batching small consumptions (see the
    /// module doc).
    pub fn wants_update(&self) -> bool {
        let free_now = self.buf_alloc.saturating_sub(self.unconsumed());
        self.wants_eager_update() && free_now >= self.half_buffer()
    }

    /// Whether a `CREDIT_UPDATE` should be sent now for a consumer that may hold bytes back
    /// while waiting for more (see the module doc).
    pub fn wants_eager_update(&self) -> bool {
        if self.fwd_cnt == self.last_sent_fwd_cnt {
            return false;
        }
        let peer_view_used = (self.rx_cnt - self.last_sent_fwd_cnt).0;
        let peer_view_free = self.buf_alloc.saturating_sub(peer_view_used);
        peer_view_free < self.half_buffer()
    }

    /// Half the buffer, rounded up so that a one-byte buffer still gets updates.
    fn half_buffer(&self) -> u32 {
        self.buf_alloc.div_ceil(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_wraps() {
        let mut c = Credit::new(1000, 500, u32::MAX - 10);
        // Peer's fwd_cnt starts near the wrap point; our tx_cnt starts at 0, so pretend we
        // already sent to that point by syncing.
        c.tx_cnt = Wrapping(u32::MAX - 10);
        assert_eq!(c.peer_credit(), 500);
        c.on_send(300);
        assert_eq!(c.peer_credit(), 200);
        c.update_peer(500, (Wrapping(u32::MAX - 10) + Wrapping(300)).0);
        assert_eq!(c.peer_credit(), 500);
    }

    #[test]
    fn receive_violation() {
        let mut c = Credit::new(100, 0, 0);
        c.on_receive(60).unwrap();
        assert_eq!(c.on_receive(41), Err(CreditViolation { len: 41, free: 40 }));
        c.consume(60);
        c.on_receive(100).unwrap();
        assert_eq!(c.unconsumed(), 100);
    }

    #[test]
    fn update_elision() {
        let mut c = Credit::new(1000, 0, 0);
        c.on_receive(400).unwrap();
        c.consume(400);
        // Peer thinks 600 free: no update needed yet.
        assert!(!c.wants_update());
        c.on_receive(300).unwrap();
        c.consume(300);
        // Peer thinks 300 free (< 500): update.
        assert!(c.wants_update());
        c.stamp();
        assert!(!c.wants_update());
    }

    #[test]
    fn no_batched_update_for_a_few_bytes_of_a_full_buffer() {
        let mut c = Credit::new(1000, 0, 0);
        c.on_receive(1000).unwrap();
        // Reading a little of a full buffer would grant the peer a few bytes only.
        for _ in 0..4 {
            c.consume(100);
            assert!(!c.wants_update());
            assert!(c.wants_eager_update());
        }
        // Once half the buffer is free again, the update is worth a packet.
        c.consume(100);
        assert!(c.wants_update());
        c.stamp();
        c.consume(100);
        assert!(!c.wants_update());
        assert!(!c.wants_eager_update(), "peer sees 500 free: not low");
    }

    #[test]
    fn eager_update_when_arrivals_lower_the_peer_view() {
        let mut c = Credit::new(1000, 0, 0);
        c.on_receive(400).unwrap();
        c.consume(300);
        assert!(!c.wants_eager_update(), "peer sees 600 free");
        // More data arrives while the consumer waits for the rest of a message.
        c.on_receive(600).unwrap();
        assert!(c.wants_eager_update());
        assert!(!c.wants_update(), "only 300 free: batching would wait");
    }

    #[test]
    fn one_byte_buffer_gets_updates() {
        let mut c = Credit::new(1, 0, 0);
        c.on_receive(1).unwrap();
        c.consume(1);
        assert!(c.wants_update());
        assert!(c.wants_eager_update());
    }

    #[test]
    fn counters_survive_four_gib() {
        let mut c = Credit::new(1 << 20, 0, 0);
        for _ in 0..5000 {
            c.on_receive(1 << 20).unwrap();
            c.consume(1 << 20);
        }
        assert_eq!(c.unconsumed(), 0);
    }
}
