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
//! All integers are little-endian. The layout is the `#[repr(C)]` structs `Preamble` and
//! `BodyV1` of `zerocopy` little-endian fields (alignment 1, so offsets are exactly the
//! diagram's; the derives check there is no padding): encoding builds the struct and copies
//! it out, decoding views the bytes as it, and no offset is written by hand.
//! What this crate does not do yet: carry buffered payload
//! bytes, the resume handshake, or any transport.
//!
//! Besides the wire formats it holds the host-side tooling of a live migration: a QMP client
//! ([`qmp`]), the domsockd admin protocol ([`admin`]) and the orchestrator behind
//! `domsock migrate` ([`orchestrate`]). Those do I/O (Unix sockets, sleeps); the formats do
//! not.

#![forbid(unsafe_code)]

use domsock_proto::{Cid, ConnKey, Port, Shutdown, SocketType, VsockAddr};
use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub mod admin;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod orchestrate;
pub mod qmp;
pub mod relay;
pub mod session;
#[cfg(test)]
mod test_dir;
pub mod tunnel;

const MAGIC: &[u8; 4] = b"DSCS";
/// Current format version.
pub const VERSION: u16 = 1;
const BODY_LEN_V1: usize = size_of::<BodyV1>();
/// Encoded size of a version-1 snapshot.
pub const ENCODED_LEN: usize = size_of::<SnapshotV1>();

/// Bytes 0..8 of every version: enough to tell which layout follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Preamble {
    magic: [u8; 4],
    version: U16,
    body_len: U16,
}

/// The version-1 body (bytes 8..60 of the diagram). Alignment 1: the cids at offsets 8 and
/// 20 are unaligned on the wire.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct BodyV1 {
    local_cid: U64,
    local_port: U32,
    peer_cid: U64,
    peer_port: U32,
    socket_type: u8,
    local_shutdown: u8,
    peer_shutdown: u8,
    reserved: u8,
    buf_alloc: U32,
    fwd_cnt: U32,
    rx_cnt: U32,
    peer_buf_alloc: U32,
    peer_fwd_cnt: U32,
    tx_cnt: U32,
}

/// A whole version-1 snapshot.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct SnapshotV1 {
    preamble: Preamble,
    body: BodyV1,
}

const _: () = assert!(size_of::<Preamble>() == 8 && BODY_LEN_V1 == 52 && ENCODED_LEN == 60);

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
        let wire = SnapshotV1 {
            preamble: Preamble {
                magic: *MAGIC,
                version: VERSION.into(),
                body_len: (BODY_LEN_V1 as u16).into(),
            },
            body: BodyV1 {
                local_cid: self.key.local.cid.0.into(),
                local_port: self.key.local.port.0.into(),
                peer_cid: self.key.peer.cid.0.into(),
                peer_port: self.key.peer.port.0.into(),
                socket_type: self.socket_type.to_wire() as u8,
                local_shutdown: self.local_shutdown.to_flags() as u8,
                peer_shutdown: self.peer_shutdown.to_flags() as u8,
                reserved: 0,
                buf_alloc: self.buf_alloc.into(),
                fwd_cnt: self.fwd_cnt.into(),
                rx_cnt: self.rx_cnt.into(),
                peer_buf_alloc: self.peer_buf_alloc.into(),
                peer_fwd_cnt: self.peer_fwd_cnt.into(),
                tx_cnt: self.tx_cnt.into(),
            },
        };
        zerocopy::transmute!(wire)
    }

    /// Decodes and validates untrusted bytes.
    pub fn decode(b: &[u8]) -> Result<ConnSnapshot, SnapshotError> {
        let Ok((pre, _)) = Preamble::ref_from_prefix(b) else {
            return Err(SnapshotError::Truncated {
                have: b.len(),
                need: size_of::<Preamble>(),
            });
        };
        if &pre.magic != MAGIC {
            return Err(SnapshotError::BadMagic(pre.magic));
        }
        if pre.version.get() != VERSION {
            return Err(SnapshotError::UnsupportedVersion(pre.version.get()));
        }
        let body = pre.body_len.get();
        if usize::from(body) != BODY_LEN_V1 {
            return Err(SnapshotError::BadLength { got: body });
        }
        let wire = match SnapshotV1::ref_from_prefix(b) {
            Ok((_, rest)) if !rest.is_empty() => {
                return Err(SnapshotError::Trailing(rest.len()));
            }
            Ok((wire, _)) => wire,
            Err(_) => {
                return Err(SnapshotError::Truncated {
                    have: b.len(),
                    need: ENCODED_LEN,
                })
            }
        };
        let w = &wire.body;
        let socket_type = match w.socket_type {
            1 => SocketType::Stream,
            2 => SocketType::SeqPacket,
            t => return Err(SnapshotError::BadSocketType(t)),
        };
        if w.local_shutdown & !3 != 0 || w.peer_shutdown & !3 != 0 || w.reserved != 0 {
            return Err(SnapshotError::ReservedBits);
        }
        let snap = ConnSnapshot {
            key: ConnKey {
                local: VsockAddr::new(Cid(w.local_cid.get()), Port(w.local_port.get())),
                peer: VsockAddr::new(Cid(w.peer_cid.get()), Port(w.peer_port.get())),
            },
            socket_type,
            local_shutdown: Shutdown::from_flags(u32::from(w.local_shutdown)),
            peer_shutdown: Shutdown::from_flags(u32::from(w.peer_shutdown)),
            buf_alloc: w.buf_alloc.get(),
            fwd_cnt: w.fwd_cnt.get(),
            rx_cnt: w.rx_cnt.get(),
            peer_buf_alloc: w.peer_buf_alloc.get(),
            peer_fwd_cnt: w.peer_fwd_cnt.get(),
            tx_cnt: w.tx_cnt.get(),
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

    /// The version-1 bytes of `sample()`, as the format diagram lays them out; a change
    /// here breaks snapshots taken by earlier builds.
    #[test]
    fn golden_bytes_v1() {
        #[rustfmt::skip]
        const GOLDEN: [u8; ENCODED_LEN] = [
            0x44, 0x53, 0x43, 0x53, 0x01, 0x00, 0x34, 0x00, 0x02, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x88, 0x13, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00,
            0x00, 0x00, 0x04, 0x00, 0xfa, 0xff, 0xff, 0xff, 0x64, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x01, 0x00, 0x07, 0x00, 0x00, 0x00, 0xef, 0x03, 0x00, 0x00,
        ];
        assert_eq!(sample().encode(), GOLDEN);
        assert_eq!(ConnSnapshot::decode(&GOLDEN), Ok(sample()));
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
