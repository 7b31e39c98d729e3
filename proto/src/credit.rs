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
//!
//! Packets as well as bytes: a Linux guest (6.12.117 and the stable kernels with the same
//! fix, `virtio_transport_inc_rx_pkt`) also refuses a packet when its receive queue's
//! per-packet overhead would pass `buf_alloc` (`(queued + 1) * SKB_TRUESIZE(0)`), and then
//! resets the connection (`ENOBUFS` to the reader), although the bytes were within credit:
//! many small seqpacket messages that the reader has not taken yet do that (seen in the
//! VM case `bus_hub_three_guests_and_a_host`). So a seqpacket sender also keeps at most
//! [`Credit::max_packets_in_flight`] packets unacknowledged, counting a packet as gone
//! once the peer's `fwd_cnt` passed its last byte (as the kernel frees it), and asks for a
//! credit update ([`Credit::wants_credit_request`]) when that is what holds it back: a
//! peer with plenty of free bytes sends none by itself.

use std::collections::VecDeque;
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
    /// `tx_cnt` after each packet sent that the peer has not acknowledged yet, oldest
    /// first (at most [`Credit::max_packets_in_flight`]).
    sent_ends: VecDeque<Wrapping<u32>>,
    /// The peer's `fwd_cnt` when a credit request for the packet bound was last wanted.
    requested_at: Option<Wrapping<u32>>,
    /// The packet bound applies (seqpacket connections, see the module doc).
    packet_bound: bool,
    /// A seqpacket message was begun and not ended: its rest goes on bytes alone (the
    /// peer cannot consume, and so acknowledge, a message it has only part of).
    message_open: bool,
}

/// What one queued packet costs a Linux receiver beyond its payload, rounded up from
/// x86_64's `SKB_TRUESIZE(0)` (576 bytes) to leave room for other configurations.
pub const PACKET_OVERHEAD_BYTES: u32 = 1024;
/// Packets in flight a peer is always allowed, however small its buffer.
pub const MIN_PACKETS_IN_FLIGHT: usize = 4;

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
            sent_ends: VecDeque::new(),
            requested_at: None,
            packet_bound: false,
            message_open: false,
        }
    }

    /// Applies the packet bound from now on (a seqpacket connection: every message is a
    /// packet of its own in a Linux receiver's queue, and Linux acknowledges each message
    /// it hands out, so the bound never waits long).
    pub fn enable_packet_bound(&mut self) {
        self.packet_bound = true;
    }

    /// Bytes the peer's buffer has room for, whatever the packet bound says (the rest of
    /// a message already begun must go, or the peer could never complete it).
    pub fn byte_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.in_flight())
    }

    /// Whether a consumer that just emptied its queue should tell the peer: it consumed
    /// something the peer has not heard of (a sender held by the packet bound waits for
    /// exactly that; Linux sends the same update after each seqpacket message).
    pub fn wants_drained_update(&self) -> bool {
        self.unconsumed() == 0 && self.fwd_cnt != self.last_sent_fwd_cnt
    }

    /// Most packets the peer may hold unacknowledged: its buffer over
    /// [`PACKET_OVERHEAD_BYTES`], at least [`MIN_PACKETS_IN_FLIGHT`].
    pub fn max_packets_in_flight(&self) -> usize {
        ((self.peer_buf_alloc / PACKET_OVERHEAD_BYTES) as usize).max(MIN_PACKETS_IN_FLIGHT)
    }

    /// Packets sent that the peer has not acknowledged as consumed yet.
    pub fn packets_in_flight(&self) -> usize {
        self.sent_ends.len()
    }

    /// Whether the packet bound, not the bytes, stops sending, and the peer has consumed
    /// something since the last time this said yes: then a `CREDIT_REQUEST` is worth a
    /// packet (the peer would not send an update by itself while it has free bytes).
    pub fn wants_credit_request(&mut self) -> bool {
        if !self.bound_holds() || self.byte_credit() == 0 {
            return false;
        }
        if self.requested_at == Some(self.peer_fwd_cnt) {
            return false;
        }
        self.requested_at = Some(self.peer_fwd_cnt);
        true
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

    /// Bytes we may send to the peer right now (0 while the packet bound is reached).
    pub fn peer_credit(&self) -> u32 {
        if self.bound_holds() {
            return 0;
        }
        self.byte_credit()
    }

    /// The packet bound, not the bytes, is what stops a new message or packet now.
    fn bound_holds(&self) -> bool {
        self.packet_bound
            && !self.message_open
            && self.sent_ends.len() >= self.max_packets_in_flight()
    }

    /// Accounts `len` payload bytes sent as part of a seqpacket message, `eom` on its
    /// last part: until then the rest of the message goes on bytes alone.
    pub fn on_send_message_part(&mut self, len: u32, eom: bool) {
        self.on_send(len);
        self.message_open = !eom;
    }

    /// Bytes sent and not yet acknowledged as consumed by the peer.
    pub fn in_flight(&self) -> u32 {
        (self.tx_cnt - self.peer_fwd_cnt).0
    }

    /// Records the peer's credit fields from any packet of this connection.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        // A packet is gone once the peer consumed its last byte. Wrapping distances: an
        // end at most `in_flight` behind `tx_cnt` is still outstanding.
        let in_flight = self.in_flight();
        while let Some(&end) = self.sent_ends.front() {
            if (self.tx_cnt - end).0 >= in_flight {
                self.sent_ends.pop_front();
            } else {
                break;
            }
        }
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
        if len > 0 && self.packet_bound {
            self.sent_ends.push_back(self.tx_cnt);
        }
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
    fn small_packets_stop_at_the_packet_bound_until_the_peer_consumes() {
        // 64 KiB buffer: 64 packets of 100 bytes use 6,400 bytes and reach the bound.
        let mut c = Credit::new(1000, 64 * 1024, 0);
        c.on_send(100);
        c.update_peer(64 * 1024, 100);
        assert_eq!(
            c.packets_in_flight(),
            0,
            "no bound, nothing tracked, on a stream"
        );
        let mut c = Credit::new(1000, 64 * 1024, 0);
        c.enable_packet_bound();
        assert_eq!(c.max_packets_in_flight(), 64);
        for _ in 0..64 {
            assert!(c.peer_credit() >= 100);
            c.on_send(100);
        }
        assert_eq!(c.packets_in_flight(), 64);
        assert_eq!(
            c.peer_credit(),
            0,
            "packet bound reached with bytes to spare"
        );
        assert!(c.wants_credit_request());
        assert!(!c.wants_credit_request(), "once until the peer moves");
        // The peer consumed two whole packets and half of the third.
        c.update_peer(64 * 1024, 250);
        assert_eq!(c.packets_in_flight(), 62);
        assert_eq!(c.peer_credit(), 64 * 1024 - (6400 - 250));
        c.on_send(100);
        c.on_send(100);
        assert_eq!(c.peer_credit(), 0);
        assert!(
            c.wants_credit_request(),
            "the peer moved since the last request"
        );
        // Everything consumed.
        c.update_peer(64 * 1024, 6600);
        assert_eq!(c.packets_in_flight(), 0);
        assert_eq!(c.peer_credit(), 64 * 1024);
        assert!(!c.wants_credit_request());
    }

    #[test]
    fn a_message_begun_goes_on_past_the_packet_bound_to_its_end() {
        // A 4 KiB buffer: at most 4 packets unacknowledged. A message of 8 parts of 64
        // bytes (tiny RX buffers) begun below the bound goes on to its last part on bytes
        // alone: the peer cannot consume, or acknowledge, part of a message.
        let mut c = Credit::new(1000, 4096, 0);
        c.enable_packet_bound();
        assert_eq!(c.max_packets_in_flight(), 4);
        for part in 0..8 {
            assert_eq!(c.peer_credit(), 4096 - 64 * part, "part {part}");
            assert!(!c.wants_credit_request(), "nothing holds part {part}");
            c.on_send_message_part(64, part == 7);
        }
        // Ended: the next message waits for the peer.
        assert_eq!(c.packets_in_flight(), 8);
        assert_eq!(c.peer_credit(), 0);
        assert!(c.wants_credit_request());
        c.update_peer(4096, 512);
        assert_eq!(c.packets_in_flight(), 0);
        assert_eq!(c.peer_credit(), 4096);
        // Bytes still bound a message begun.
        c.on_send_message_part(4000, false);
        assert_eq!(c.peer_credit(), 96);
    }

    #[test]
    fn packet_bound_survives_counter_wrap() {
        let mut c = Credit::new(1000, 8 * 1024, u32::MAX - 150);
        c.enable_packet_bound();
        c.tx_cnt = Wrapping(u32::MAX - 150);
        for _ in 0..8 {
            c.on_send(100);
        }
        assert_eq!(c.peer_credit(), 0);
        // Acknowledged up to the end of the fourth packet, across the wrap.
        c.update_peer(8 * 1024, (Wrapping(u32::MAX - 150) + Wrapping(400)).0);
        assert_eq!(c.packets_in_flight(), 4);
        assert_eq!(c.peer_credit(), 8 * 1024 - 400);
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
