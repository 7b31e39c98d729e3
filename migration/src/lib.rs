//! Endpoint snapshots for moving domsock connections between hosts.
//!
//! This crate starts with the part every later piece (session resume, the TCP/TLS tunnel)
//! stands on: a versioned wire format for the state of one connection, restored only through
//! validation because it crosses hosts and is therefore untrusted.
//!
//! ```text
//! offset size field
//!      0    4 magic "DSCS"
//!      4    2 version (le16) = 1
//!      6    2 body length (le16) = 52 for version 1
//!      8    8 local cid      16  4 local port
//!     20    8 peer cid       28  4 peer port
//!     32    1 socket type (1 stream, 2 seqpacket)
//!     33    1 local shutdown flags (bit0 rcv, bit1 send)
//!     34    1 peer shutdown flags
//!     35    1 reserved, must be 0
//!     36    4 buf_alloc      40  4 fwd_cnt      44  4 rx_cnt
//!     48    4 peer_buf_alloc 52  4 peer_fwd_cnt 56  4 tx_cnt
//! ```
//! All integers are little-endian. What this crate does not do yet: carry buffered payload
//! bytes, the resume handshake, or any transport.

#![forbid(unsafe_code)]

use domsock_proto::{Cid, ConnKey, Port, Shutdown, SocketType, VsockAddr};
use thiserror::Error;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

const MAGIC: &[u8; 4] = b"DSCS";
/// Current format version.
pub const VERSION: u16 = 1;
const BODY_LEN_V1: usize = 52;
/// Encoded size of a version-1 snapshot.
pub const ENCODED_LEN: usize = 8 + BODY_LEN_V1;

/// The state of one connection at a quiescent point (no packet in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSnapshot {
    /// Addresses.
    pub key: ConnKey,
    /// Stream or seqpacket.
    pub socket_type: SocketType,
    /// Directions we shut.
    pub local_shutdown: Shutdown,
    /// Directions the peer shut.
    pub peer_shutdown: Shutdown,
    /// Our receive buffer size.
    pub buf_alloc: u32,
    /// Bytes we consumed.
    pub fwd_cnt: u32,
    /// Bytes we received.
    pub rx_cnt: u32,
    /// Peer's receive buffer size.
    pub peer_buf_alloc: u32,
    /// Bytes the peer consumed.
    pub peer_fwd_cnt: u32,
    /// Bytes we sent.
    pub tx_cnt: u32,
}

/// Why bytes are not a valid snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SnapshotError {
    /// Fewer bytes than the header or the declared body.
    #[error("snapshot truncated: {have} bytes, need {need}")]
    Truncated {
        /// Bytes given.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Not a domsock connection snapshot.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A version this build cannot read.
    #[error("unsupported snapshot version {0} (this build reads {VERSION})")]
    UnsupportedVersion(u16),
    /// The body length does not match the version.
    #[error("body length {got} does not match version 1 ({BODY_LEN_V1})")]
    BadLength {
        /// Declared length.
        got: u16,
    },
    /// Unknown socket type.
    #[error("unknown socket type {0}")]
    BadSocketType(u8),
    /// Unknown shutdown bits or a non-zero reserved byte.
    #[error("reserved bits set")]
    ReservedBits,
    /// Received more than was consumed plus the buffer holds, or similar.
    #[error("inconsistent counters: {0}")]
    Inconsistent(&'static str),
    /// Trailing bytes after the snapshot.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

impl ConnSnapshot {
    /// Encodes to the version-1 wire format.
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut b = [0u8; ENCODED_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(BODY_LEN_V1 as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.key.local.cid.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.key.local.port.0.to_le_bytes());
        b[20..28].copy_from_slice(&self.key.peer.cid.0.to_le_bytes());
        b[28..32].copy_from_slice(&self.key.peer.port.0.to_le_bytes());
        b[32] = self.socket_type.to_wire() as u8;
        b[33] = self.local_shutdown.to_flags() as u8;
        b[34] = self.peer_shutdown.to_flags() as u8;
        let words = [
            self.buf_alloc,
            self.fwd_cnt,
            self.rx_cnt,
            self.peer_buf_alloc,
            self.peer_fwd_cnt,
            self.tx_cnt,
        ];
        for (i, w) in words.iter().enumerate() {
            b[36 + 4 * i..40 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Decodes and validates untrusted bytes.
    pub fn decode(b: &[u8]) -> Result<ConnSnapshot, SnapshotError> {
        if b.len() < 8 {
            return Err(SnapshotError::Truncated {
                have: b.len(),
                need: 8,
            });
        }
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if &magic != MAGIC {
            return Err(SnapshotError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        let body = u16::from_le_bytes([b[6], b[7]]);
        if usize::from(body) != BODY_LEN_V1 {
            return Err(SnapshotError::BadLength { got: body });
        }
        if b.len() < ENCODED_LEN {
            return Err(SnapshotError::Truncated {
                have: b.len(),
                need: ENCODED_LEN,
            });
        }
        if b.len() > ENCODED_LEN {
            return Err(SnapshotError::Trailing(b.len() - ENCODED_LEN));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let socket_type = match b[32] {
            1 => SocketType::Stream,
            2 => SocketType::SeqPacket,
            t => return Err(SnapshotError::BadSocketType(t)),
        };
        if b[33] & !3 != 0 || b[34] & !3 != 0 || b[35] != 0 {
            return Err(SnapshotError::ReservedBits);
        }
        let snap = ConnSnapshot {
            key: ConnKey {
                local: VsockAddr::new(Cid(u64_at(8)), Port(u32_at(16))),
                peer: VsockAddr::new(Cid(u64_at(20)), Port(u32_at(28))),
            },
            socket_type,
            local_shutdown: Shutdown::from_flags(u32::from(b[33])),
            peer_shutdown: Shutdown::from_flags(u32::from(b[34])),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
            rx_cnt: u32_at(44),
            peer_buf_alloc: u32_at(48),
            peer_fwd_cnt: u32_at(52),
            tx_cnt: u32_at(56),
        };
        snap.validate()?;
        Ok(snap)
    }

    fn validate(&self) -> Result<(), SnapshotError> {
        let unconsumed = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        if unconsumed > self.buf_alloc {
            return Err(SnapshotError::Inconsistent(
                "more unconsumed bytes than the receive buffer holds",
            ));
        }
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        if in_flight > self.peer_buf_alloc {
            return Err(SnapshotError::Inconsistent(
                "more bytes in flight than the peer's buffer holds",
            ));
        }
        if self.key.local.cid == self.key.peer.cid {
            return Err(SnapshotError::Inconsistent("both ends have the same CID"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConnSnapshot {
        ConnSnapshot {
            key: ConnKey {
                local: VsockAddr::new(Cid::HOST, Port(49152)),
                peer: VsockAddr::new(Cid(3), Port(5000)),
            },
            socket_type: SocketType::SeqPacket,
            local_shutdown: Shutdown::SEND,
            peer_shutdown: Shutdown::default(),
            buf_alloc: 262_144,
            fwd_cnt: u32::MAX - 5,
            rx_cnt: 100,
            peer_buf_alloc: 65_536,
            peer_fwd_cnt: 7,
            tx_cnt: 1_007,
        }
    }

    #[test]
    fn roundtrip_with_wrapped_counters() {
        let s = sample();
        let b = s.encode();
        assert_eq!(&b[0..4], b"DSCS");
        assert_eq!(ConnSnapshot::decode(&b), Ok(s));
    }

    #[test]
    fn rejects_hostile_bytes() {
        let good = sample().encode();
        assert!(matches!(
            ConnSnapshot::decode(&good[..5]),
            Err(SnapshotError::Truncated { .. })
        ));
        assert!(matches!(
            ConnSnapshot::decode(&good[..30]),
            Err(SnapshotError::Truncated { .. })
        ));
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            ConnSnapshot::decode(&b),
            Err(SnapshotError::BadMagic(_))
        ));
        let mut b = good;
        b[4] = 2;
        assert_eq!(
            ConnSnapshot::decode(&b),
            Err(SnapshotError::UnsupportedVersion(2))
        );
        let mut b = good;
        b[6] = 53;
        assert_eq!(
            ConnSnapshot::decode(&b),
            Err(SnapshotError::BadLength { got: 53 })
        );
        let mut b = good;
        b[32] = 9;
        assert_eq!(
            ConnSnapshot::decode(&b),
            Err(SnapshotError::BadSocketType(9))
        );
        let mut b = good;
        b[35] = 1;
        assert_eq!(ConnSnapshot::decode(&b), Err(SnapshotError::ReservedBits));
        let mut v = good.to_vec();
        v.push(0);
        assert_eq!(ConnSnapshot::decode(&v), Err(SnapshotError::Trailing(1)));
        let mut s = sample();
        s.tx_cnt = s.peer_fwd_cnt.wrapping_add(s.peer_buf_alloc + 1);
        assert!(matches!(
            ConnSnapshot::decode(&s.encode()),
            Err(SnapshotError::Inconsistent(_))
        ));
        let mut s = sample();
        s.rx_cnt = s.fwd_cnt.wrapping_add(s.buf_alloc + 1);
        assert!(matches!(
            ConnSnapshot::decode(&s.encode()),
            Err(SnapshotError::Inconsistent(_))
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let good = sample().encode();
        for n in 0..good.len() {
            assert!(ConnSnapshot::decode(&good[..n]).is_err(), "length {n}");
        }
    }
}
