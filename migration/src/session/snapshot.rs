//! A parked session as bytes: what one domsockd hands another when the session's guest
//! moved there (live migration), so that the guest's RESUME is answered at its new host.
//!
//! A snapshot carries the session's identity and secret, the nonce the next RESUME must
//! prove, the counts both sides agree on, and the host->guest bytes the guest may not have
//! consumed yet (its replay tail), so the new host can replay them. Guest->host bytes the
//! old host accepted stay with the session's host end (they are already counted in
//! `received`); they are not part of the snapshot.
//!
//! ```text
//! offset size field (all integers little-endian)
//!      0    4 magic "DSSP"
//!      4    1 version (1)
//!      5    1 socket type (1 stream, 2 seqpacket)
//!      6    1 flags: bit0 guest done (half-closed), bit1 host done (EOF after the tail),
//!                    bit2 previous nonce present; other bits 0
//!      7    1 reserved (0)
//!      8   16 session id
//!     24   32 secret
//!     56   16 nonce (the next RESUME's proof covers it)
//!     72   16 previous nonce (zero unless flag bit2)
//!     88    8 received: guest data the session has accepted (bytes, or messages)
//!     96    8 tail start: session offset of the first host->guest byte below
//!    104    4 tail length (bytes)
//!    108    4 message count (seqpacket: boundaries below; stream: 0)
//!    112    8 messages acknowledged before the tail start (seqpacket; stream: 0)
//!    120  ... tail bytes, then message count x le64 end offsets (strictly increasing,
//!             each in (tail start, tail start + tail length], the last at the tail's end)
//! ```
//!
//! The bytes cross hosts, so [`SessionSnapshot::decode`] trusts nothing: every field is
//! checked, the tail is bounded by the caller's limit, and the length must be exact.

use domsock_proto::SocketType;
use thiserror::Error;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{Nonce, Secret, SessionId};

const MAGIC: &[u8; 4] = b"DSSP";
/// Version of the snapshot format this build writes and reads.
pub const SNAPSHOT_VERSION: u8 = 1;
/// Size of the fixed part.
pub const SNAPSHOT_HEADER_LEN: usize = size_of::<Header>();

const FLAG_GUEST_DONE: u8 = 1;
const FLAG_HOST_DONE: u8 = 2;
const FLAG_PREV_NONCE: u8 = 4;

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Header {
    magic: [u8; 4],
    version: u8,
    socket_type: u8,
    flags: u8,
    reserved: u8,
    id: [u8; 16],
    secret: [u8; 32],
    nonce: [u8; 16],
    prev_nonce: [u8; 16],
    received: U64,
    tail_start: U64,
    tail_len: U32,
    messages: U32,
    messages_acked: U64,
}

/// One parked session, ready to move.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSnapshot {
    /// The session's id.
    pub id: SessionId,
    /// Its secret (the snapshot travels only inside the authenticated tunnel).
    pub secret: Secret,
    /// The nonce the next RESUME's proof must cover.
    pub nonce: Nonce,
    /// The nonce before it, still accepted while the guest may not have read the answer
    /// that replaced it.
    pub prev_nonce: Option<Nonce>,
    /// Stream (bytes) or seqpacket (messages).
    pub socket_type: SocketType,
    /// Guest data the session has accepted: bytes, or messages on seqpacket.
    pub received: u64,
    /// The guest half-closed gracefully: a later reset ends the session.
    pub guest_done: bool,
    /// The host end sent EOF right after the tail: nothing more comes from it.
    pub host_done: bool,
    /// Session offset of `tail[0]`.
    pub tail_start: u64,
    /// Host->guest bytes the guest may not have consumed.
    pub tail: Vec<u8>,
    /// Seqpacket: where each message in the tail ends (session offsets).
    pub message_ends: Vec<u64>,
    /// Seqpacket: messages the guest consumed before `tail_start`.
    pub messages_acked: u64,
}

impl std::fmt::Debug for SessionSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("SessionSnapshot")
            .field("id", &self.id)
            .field("socket_type", &self.socket_type)
            .field("received", &self.received)
            .field("guest_done", &self.guest_done)
            .field("host_done", &self.host_done)
            .field("tail_start", &self.tail_start)
            .field("tail_len", &self.tail.len())
            .field("messages", &self.message_ends.len())
            .field("messages_acked", &self.messages_acked)
            .finish_non_exhaustive()
    }
}

/// Why bytes are not a valid snapshot.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// Fewer bytes than the header or the lengths it names.
    #[error("snapshot truncated: {have} bytes, need {need}")]
    Truncated {
        /// Bytes given.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Not a session snapshot.
    #[error("not a session snapshot (bad magic)")]
    BadMagic,
    /// Written by another format version.
    #[error("unsupported snapshot version {0} (this build reads {SNAPSHOT_VERSION})")]
    Version(u8),
    /// A field holds a value no valid snapshot has.
    #[error("invalid snapshot field {0}")]
    Invalid(&'static str),
    /// The tail is longer than the receiver keeps for a session.
    #[error("snapshot tail of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Tail length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Bytes after the end.
    #[error("{0} trailing bytes after the snapshot")]
    Trailing(usize),
}

fn socket_type_code(t: SocketType) -> u8 {
    match t {
        SocketType::Stream => 1,
        SocketType::SeqPacket => 2,
    }
}

impl SessionSnapshot {
    /// The snapshot's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let flags = if self.guest_done { FLAG_GUEST_DONE } else { 0 }
            | if self.host_done { FLAG_HOST_DONE } else { 0 }
            | if self.prev_nonce.is_some() {
                FLAG_PREV_NONCE
            } else {
                0
            };
        let header = Header {
            magic: *MAGIC,
            version: SNAPSHOT_VERSION,
            socket_type: socket_type_code(self.socket_type),
            flags,
            reserved: 0,
            id: self.id.0,
            secret: self.secret.0,
            nonce: self.nonce.0,
            prev_nonce: self.prev_nonce.map_or([0; 16], |n| n.0),
            received: U64::new(self.received),
            tail_start: U64::new(self.tail_start),
            tail_len: U32::new(self.tail.len() as u32),
            messages: U32::new(self.message_ends.len() as u32),
            messages_acked: U64::new(self.messages_acked),
        };
        let mut out =
            Vec::with_capacity(SNAPSHOT_HEADER_LEN + self.tail.len() + 8 * self.message_ends.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.tail);
        for e in &self.message_ends {
            out.extend_from_slice(&e.to_le_bytes());
        }
        out
    }

    /// Parses and validates `buf`, which must be exactly one snapshot whose tail is at
    /// most `max_tail` bytes.
    pub fn decode(buf: &[u8], max_tail: usize) -> Result<Self, SnapshotError> {
        let (h, rest) = Header::read_from_prefix(buf).map_err(|_| SnapshotError::Truncated {
            have: buf.len(),
            need: SNAPSHOT_HEADER_LEN,
        })?;
        if &h.magic != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if h.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(h.version));
        }
        let socket_type = match h.socket_type {
            1 => SocketType::Stream,
            2 => SocketType::SeqPacket,
            _ => return Err(SnapshotError::Invalid("socket type")),
        };
        if h.flags & !(FLAG_GUEST_DONE | FLAG_HOST_DONE | FLAG_PREV_NONCE) != 0 {
            return Err(SnapshotError::Invalid("flags"));
        }
        if h.reserved != 0 {
            return Err(SnapshotError::Invalid("reserved"));
        }
        let has_prev = h.flags & FLAG_PREV_NONCE != 0;
        if !has_prev && h.prev_nonce != [0; 16] {
            return Err(SnapshotError::Invalid("previous nonce"));
        }
        let tail_len = h.tail_len.get() as usize;
        if tail_len > max_tail {
            return Err(SnapshotError::TooLarge {
                len: tail_len,
                limit: max_tail,
            });
        }
        let tail_start = h.tail_start.get();
        let tail_end = tail_start
            .checked_add(tail_len as u64)
            .ok_or(SnapshotError::Invalid("tail start"))?;
        let count = h.messages.get() as usize;
        let messages_acked = h.messages_acked.get();
        match socket_type {
            SocketType::Stream if count != 0 || messages_acked != 0 => {
                return Err(SnapshotError::Invalid("message counts of a stream session"));
            }
            // Every message holds at least one byte... except empty ones, which seqpacket
            // allows; the ends being strictly increasing bounds the count by the tail.
            _ => {}
        }
        let need = count
            .checked_mul(8)
            .and_then(|n| n.checked_add(tail_len))
            .ok_or(SnapshotError::Invalid("message count"))?;
        if rest.len() < need {
            return Err(SnapshotError::Truncated {
                have: buf.len(),
                need: SNAPSHOT_HEADER_LEN + need,
            });
        }
        if rest.len() > need {
            return Err(SnapshotError::Trailing(rest.len() - need));
        }
        let (tail, ends) = rest.split_at(tail_len);
        let mut message_ends = Vec::with_capacity(count);
        let mut last = tail_start;
        for chunk in ends.chunks_exact(8) {
            let e = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
            // Strictly increasing, except that a first empty message may end at the start.
            let ok = if message_ends.is_empty() {
                e >= tail_start
            } else {
                e > last
            };
            if !ok || e > tail_end {
                return Err(SnapshotError::Invalid("message end"));
            }
            last = e;
            message_ends.push(e);
        }
        if socket_type == SocketType::SeqPacket && tail_len > 0 && last != tail_end {
            return Err(SnapshotError::Invalid("tail ends inside a message"));
        }
        Ok(Self {
            id: SessionId(h.id),
            secret: Secret(h.secret),
            nonce: Nonce(h.nonce),
            prev_nonce: has_prev.then_some(Nonce(h.prev_nonce)),
            socket_type,
            received: h.received.get(),
            guest_done: h.flags & FLAG_GUEST_DONE != 0,
            host_done: h.flags & FLAG_HOST_DONE != 0,
            tail_start,
            tail: tail.to_vec(),
            message_ends,
            messages_acked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(socket_type: SocketType) -> SessionSnapshot {
        let seq = socket_type == SocketType::SeqPacket;
        SessionSnapshot {
            id: SessionId([1; 16]),
            secret: Secret([2; 32]),
            nonce: Nonce([3; 16]),
            prev_nonce: Some(Nonce([4; 16])),
            socket_type,
            received: 123_456,
            guest_done: false,
            host_done: true,
            tail_start: 1000,
            tail: (0..100u8).collect(),
            message_ends: if seq { vec![1000, 1040, 1100] } else { vec![] },
            messages_acked: if seq { 7 } else { 0 },
        }
    }

    #[test]
    fn round_trips_both_kinds() {
        for t in [SocketType::Stream, SocketType::SeqPacket] {
            let s = sample(t);
            let bytes = s.encode();
            assert_eq!(SessionSnapshot::decode(&bytes, 100).unwrap(), s);
            assert_eq!(
                SessionSnapshot::decode(&bytes, 99),
                Err(SnapshotError::TooLarge {
                    len: 100,
                    limit: 99
                })
            );
        }
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let bytes = sample(SocketType::Stream).encode();
        assert_eq!(SNAPSHOT_HEADER_LEN, 120);
        assert_eq!(&bytes[0..4], b"DSSP");
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes[5], 1);
        assert_eq!(bytes[6], FLAG_HOST_DONE | FLAG_PREV_NONCE);
        assert_eq!(&bytes[8..24], &[1; 16]);
        assert_eq!(&bytes[24..56], &[2; 32]);
        assert_eq!(&bytes[56..72], &[3; 16]);
        assert_eq!(&bytes[72..88], &[4; 16]);
        assert_eq!(
            u64::from_le_bytes(bytes[88..96].try_into().unwrap()),
            123_456
        );
        assert_eq!(u64::from_le_bytes(bytes[96..104].try_into().unwrap()), 1000);
        assert_eq!(u32::from_le_bytes(bytes[104..108].try_into().unwrap()), 100);
        assert_eq!(bytes.len(), 220);
    }

    #[test]
    fn every_kind_of_bad_input_is_refused() {
        let good = sample(SocketType::SeqPacket).encode();
        let mut cases: Vec<(Vec<u8>, SnapshotError)> = Vec::new();
        let mut b = good.clone();
        b[0] = b'X';
        cases.push((b, SnapshotError::BadMagic));
        let mut b = good.clone();
        b[4] = 2;
        cases.push((b, SnapshotError::Version(2)));
        let mut b = good.clone();
        b[5] = 3;
        cases.push((b, SnapshotError::Invalid("socket type")));
        let mut b = good.clone();
        b[6] |= 8;
        cases.push((b, SnapshotError::Invalid("flags")));
        let mut b = good.clone();
        b[7] = 1;
        cases.push((b, SnapshotError::Invalid("reserved")));
        let mut b = good.clone();
        b[6] &= !FLAG_PREV_NONCE;
        cases.push((b, SnapshotError::Invalid("previous nonce")));
        let mut b = good.clone();
        b.push(0);
        cases.push((b, SnapshotError::Trailing(1)));
        let b = good[..good.len() - 1].to_vec();
        cases.push((
            b,
            SnapshotError::Truncated {
                have: good.len() - 1,
                need: good.len(),
            },
        ));
        // Message ends out of order, beyond the tail, or short of its end.
        let ends_at = SNAPSHOT_HEADER_LEN + 100;
        for (i, v) in [(1usize, 1000u64), (2, 1101), (2, 1090)] {
            let mut b = good.clone();
            b[ends_at + 8 * i..ends_at + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
            let want = if i == 2 && v == 1090 {
                SnapshotError::Invalid("tail ends inside a message")
            } else {
                SnapshotError::Invalid("message end")
            };
            cases.push((b, want));
        }
        // A tail start so large its end overflows.
        let mut b = good.clone();
        b[96..104].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
        cases.push((b, SnapshotError::Invalid("tail start")));
        // A stream session with message counts.
        let mut b = sample(SocketType::Stream).encode();
        b[112..120].copy_from_slice(&1u64.to_le_bytes());
        cases.push((
            b,
            SnapshotError::Invalid("message counts of a stream session"),
        ));
        for (bytes, want) in cases {
            assert_eq!(
                SessionSnapshot::decode(&bytes, 1 << 20),
                Err(want.clone()),
                "{want}"
            );
        }
        for n in 0..SNAPSHOT_HEADER_LEN {
            assert!(SessionSnapshot::decode(&good[..n], 1 << 20).is_err());
        }
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let s = format!("{:?}", sample(SocketType::Stream));
        assert!(!s.contains("secret"), "{s}");
    }
}
