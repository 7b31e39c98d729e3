//! Resumable sessions: connections that survive losing the vsock device.
//!
//! A guest that wants its connection to outlive a device blackout (hot-unplug, driver
//! reset, the unplug/plug dance of a live migration) opens it through the daemon's
//! **session port** ([`SESSION_PORT`] on the host CID) instead of connecting to the
//! target directly. The first bytes each way are one handshake frame ([`wire`]); after
//! them the connection carries the application's bytes unframed, exactly like a raw one,
//! so the steady-state data path costs nothing but a copy into a replay buffer.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant G as guest (library / shim)
//!     participant D as domsockd
//!     participant H as host process
//!     G->>D: vsock connect (2, SESSION_PORT)
//!     G->>D: OPEN target=(2, 5000) stream
//!     D->>H: connect <uds>_5000
//!     D->>G: OPENED id, secret, nonce N1, window W
//!     G-->>H: data (unframed), both ways
//!     Note over G,D: device unplugged: the vsock connection is gone,<br/>D parks H's end (keeps its socket, its unsent data, a timer)
//!     G->>D: vsock connect (2, SESSION_PORT)  [retried while ENODEV]
//!     G->>D: RESUME id, nonce C, received=r_g, proof=HMAC(secret, id N1 C r_g ..)
//!     D->>G: RESUMED received=r_d, nonce N2
//!     D->>G: D's bytes from r_g on (its replay buffer)
//!     G->>D: G's bytes from r_d on (its replay buffer)
//!     G-->>H: data continues
//! ```
//!
//! **Why no per-byte framing is needed.** Each side must know what the other has, to keep
//! only that in its replay buffer:
//! - guest -> daemon: the guest kernel sends only within the credit the daemon advertises,
//!   so at any moment the daemon lacks at most its window `W` of what the guest wrote; the
//!   guest keeps the last `W` bytes it wrote ([`replay::ReplayBuffer::record_evicting`];
//!   on seqpacket the last messages whose bytes fit `W`, [`replay::MessageReplay`]).
//!   The daemon holds its window to `W` for the session's whole life, including bytes of
//!   an earlier connection still waiting for the host process.
//! - daemon -> guest: every guest packet carries the guest's `fwd_cnt`, the bytes the
//!   guest application (the library) has consumed; the daemon acknowledges its replay
//!   buffer with it ([`replay::ReplayBuffer::ack`]) and never has more than its bound
//!   unacknowledged.
//! - at resume the guest says what it has read in all (`received` in RESUME), the daemon
//!   says what it accepted (`received` in RESUMED), and each sends exactly the missing tail.
//!
//! Counts are bytes for stream sessions and messages for seqpacket sessions. Shutdown
//! state crosses with the counts: a side that had shut its write side shuts it again
//! after its retransmission.
//!
//! **Security.** Session ids and secrets are 128 and 256 random bits from the daemon; a
//! session can be resumed only by the domain that opened it (the daemon checks the
//! resumer's CID before anything else and answers "unknown session" to every other
//! domain), and only with a proof ([`proof`]) over a nonce that changes with every
//! successful resume. A refused RESUME leaves the session untouched.
//!
//! **Timeout.** A parked session waits [`DEFAULT_PARK_TIMEOUT_MS`] (configurable) for
//! its guest; then the daemon closes the host end (the host process reads EOF) and
//! remembers the id for a while so that a late RESUME is answered
//! [`wire::Refusal::Expired`] (the library returns `ETIMEDOUT`).
//!
//! What this module does not do: any I/O, choose ids or secrets (the caller brings the
//! randomness), or decide where a session's other end lives (the daemon does).

pub mod proof;
pub mod replay;
pub mod snapshot;
pub mod wire;

use domsock_proto::Port;
use std::fmt;

/// The daemon's session service on the host CID.
pub const SESSION_PORT: Port = Port(1022);
/// How long a parked session waits for its guest, unless configured otherwise.
pub const DEFAULT_PARK_TIMEOUT_MS: u32 = 60_000;

/// Names a session (random, chosen by the daemon).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 8 bytes are plenty to tell sessions apart in logs.
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl SessionId {
    /// All 16 bytes in lowercase hex (32 characters), as a guest program prints it for
    /// another to name the session; [`SessionId::from_hex`] reads it back.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 32 hex digits (either case); `None` for anything else.
    pub fn from_hex(s: &str) -> Option<SessionId> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return None;
        }
        let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
        }
        Some(SessionId(id))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// A session's secret: only its owner and the daemon know it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A number used once in a resume proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonce(pub [u8; 16]);

/// An HMAC-SHA256 proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag(pub [u8; 32]);

/// Extends a wrapping 32-bit vsock counter (`fwd_cnt`, `rx_cnt`) of one connection to the
/// 64-bit offset of the session it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterExtender {
    /// Session offset at which this connection's counter was `at_zero`.
    base: u64,
    last: u32,
}

impl CounterExtender {
    /// A connection that starts carrying the session at offset `base`, its counter then
    /// reading `counter`.
    pub fn new(base: u64, counter: u32) -> Self {
        Self {
            base,
            last: counter,
        }
    }

    /// The session offset the counter now stands for. Counters only move forward, by less
    /// than 2^31 between two calls (a connection never has more than its 32-bit window in
    /// flight); a counter that appears to go back is treated as not having moved.
    pub fn advance(&mut self, counter: u32) -> u64 {
        let delta = counter.wrapping_sub(self.last);
        if delta < 1 << 31 {
            self.base += u64::from(delta);
            self.last = counter;
        }
        self.base
    }

    /// The offset at the last advance.
    pub fn offset(&self) -> u64 {
        self.base
    }
}

#[cfg(test)]
mod tests {
    use super::replay::ReplayBuffer;
    use super::*;

    #[test]
    fn session_ids_round_trip_through_hex() {
        let id = SessionId([0xa5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0xff]);
        assert_eq!(id.hex(), "a5000102030405060708090a0b0c0dff");
        assert_eq!(SessionId::from_hex(&id.hex()), Some(id));
        assert_eq!(
            SessionId::from_hex("A5000102030405060708090A0B0C0DFF"),
            Some(id)
        );
        assert_eq!(
            id.to_string(),
            "a500010203040506",
            "logs show the first 8 bytes"
        );
        for bad in [
            "",
            "a5",
            &id.hex()[1..],
            &format!("{}0", id.hex()),
            &"g".repeat(32),
        ] {
            assert_eq!(SessionId::from_hex(bad), None, "{bad:?}");
        }
        assert_eq!(
            SessionId::from_hex("+5000102030405060708090a0b0c0dff"),
            None
        );
    }

    #[test]
    fn counters_extend_across_the_32_bit_wrap() {
        let mut c = CounterExtender::new(10, u32::MAX - 5);
        assert_eq!(c.advance(u32::MAX), 15);
        assert_eq!(c.advance(4), 20);
        assert_eq!(
            c.advance(3),
            20,
            "a stale (reordered) counter does not move back"
        );
        assert_eq!(c.offset(), 20);
    }

    /// A small deterministic model of one direction: a writer limited by credit, a
    /// transport that breaks at arbitrary points losing what is in flight, and the resume
    /// rule. Over many seeds the reader gets every byte once, in order.
    #[test]
    fn one_direction_survives_breaks_at_any_point() {
        const WINDOW: usize = 64;
        for seed in 0..300u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let input: Vec<u8> = (0..2000u32).map(|i| (i * 31 + seed as u32) as u8).collect();
            let mut written = 0usize; // what the app handed to the (guest) writer
            let mut log = ReplayBuffer::new(WINDOW);
            let mut in_flight: Vec<u8> = Vec::new(); // kernel queues + rings
            let mut receiver_buf: Vec<u8> = Vec::new(); // accepted by the daemon, unconsumed
            let mut delivered: Vec<u8> = Vec::new(); // consumed by the daemon's host side
            let mut steps = 0;
            while delivered.len() < input.len() && steps < 100_000 {
                steps += 1;
                match next() % 5 {
                    0 | 1 => {
                        // App writes, within credit: in flight + unconsumed <= WINDOW.
                        let credit = WINDOW.saturating_sub(in_flight.len() + receiver_buf.len());
                        let n = (next() as usize % 17)
                            .min(credit)
                            .min(input.len() - written);
                        let chunk = &input[written..written + n];
                        log.record_evicting(chunk);
                        in_flight.extend_from_slice(chunk);
                        written += n;
                    }
                    2 => {
                        let n = next() as usize % (in_flight.len() + 1);
                        receiver_buf.extend(in_flight.drain(..n));
                    }
                    3 => {
                        let n = next() as usize % (receiver_buf.len() + 1);
                        delivered.extend(receiver_buf.drain(..n));
                    }
                    _ => {
                        // Break: in-flight bytes are gone; the daemon kept what it accepted.
                        in_flight.clear();
                        let received = (delivered.len() + receiver_buf.len()) as u64;
                        let (a, b) = log.resume_from(received).expect("within the window");
                        assert!(a.len() + b.len() <= WINDOW, "replay never beyond its bound");
                        in_flight.extend_from_slice(a);
                        in_flight.extend_from_slice(b);
                    }
                }
            }
            assert_eq!(delivered, input, "seed {seed}");
        }
    }
}
