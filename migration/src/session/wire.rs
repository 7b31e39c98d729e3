//! The session handshake frames, as a pure codec.
//!
//! Every frame is an 8-byte preamble and a fixed-size body, all integers little-endian:
//!
//! ```text
//! preamble  0  4 magic "DSSN"   4  1 version (1)   5  1 kind   6  2 body length (le16)
//!
//! kind 1 OPEN     (16)  target cid le64 | target port le32 | socket type u8 (1 stream,
//!                        2 seqpacket) | flags u8 (0) | reserved le16 (0)
//! kind 2 OPENED   (72)  session id [16] | secret [32] | next nonce [16] |
//!                        window le32 | park timeout ms le32
//! kind 3 RESUME   (80)  session id [16] | client nonce [16] | received le64 |
//!                        shutdown u8 | reserved [7] (0) | proof [32]
//! kind 4 RESUMED  (32)  received le64 | shutdown u8 | reserved [7] (0) | next nonce [16]
//! kind 5 REFUSED   (8)  reason le16 | reserved le16 (0) | errno le32
//! kind 6 LISTEN     (8)  port le32 | socket type u8 | reserved [3] (0)
//! kind 7 LISTENING  (8)  port le32 | reserved le32 (0)
//! kind 8 OFFERED   (72)  same body as OPENED
//! ```
//!
//! LISTEN registers a guest port whose listener takes sessions: the daemon answers
//! LISTENING and keeps the registration while that connection stays open (and across a
//! device blackout, until the guest registers again or the park timeout passes). A
//! host-initiated connection to a registered port then starts with OFFERED, the accepted
//! side's OPENED.
//!
//! `received` counts what the sender of the frame has received of the other side's data
//! over the whole session: bytes for stream sessions, messages for seqpacket ones.
//! `shutdown` bit 0 says the frame's sender will send no more data after what it still
//! has to retransmit (a shut write side), bit 1 that it will read no more; other bits are 0.
//! `window` is the most the daemon ever holds unconsumed of the guest's data, so the guest's
//! replay buffer needs exactly that much.
//!
//! Decoding checks everything a frame can get wrong on its own (magic, version, kind,
//! length, reserved bits, enum values); "not enough bytes yet" is `Ok(None)`, not an error.
//! What this module does not do: decide whether a frame is acceptable now (the session
//! service does), or compute proofs ([`super::proof`]).

use domsock_proto::{Cid, Port, SocketType};
use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{Nonce, Secret, SessionId, Tag};

const MAGIC: &[u8; 4] = b"DSSN";
/// Wire version of the session handshake.
pub const WIRE_VERSION: u8 = 1;
/// Size of the frame preamble.
pub const PREAMBLE_LEN: usize = size_of::<Preamble>();
/// Size of the largest frame; a reader never needs more bytes than this to decide.
pub const MAX_FRAME_LEN: usize = PREAMBLE_LEN + size_of::<ResumeBody>();

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Preamble {
    magic: [u8; 4],
    version: u8,
    kind: u8,
    body_len: U16,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OpenBody {
    cid: U64,
    port: U32,
    socket_type: u8,
    flags: u8,
    reserved: U16,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct OpenedBody {
    id: [u8; 16],
    secret: [u8; 32],
    next_nonce: [u8; 16],
    window: U32,
    park_timeout_ms: U32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ResumeBody {
    id: [u8; 16],
    client_nonce: [u8; 16],
    received: U64,
    shutdown: u8,
    reserved: [u8; 7],
    proof: [u8; 32],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ResumedBody {
    received: U64,
    shutdown: u8,
    reserved: [u8; 7],
    next_nonce: [u8; 16],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ListenBody {
    port: U32,
    socket_type: u8,
    reserved: [u8; 3],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ListeningBody {
    port: U32,
    reserved: U32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RefusedBody {
    reason: U16,
    reserved: U16,
    errno: U32,
}

/// What one side will no longer do, as carried in RESUME and RESUMED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Closed {
    /// It sends no more data after its retransmission.
    pub send: bool,
    /// It reads no more data.
    pub rcv: bool,
}

impl Closed {
    fn to_bits(self) -> u8 {
        u8::from(self.send) | (u8::from(self.rcv) << 1)
    }

    fn from_bits(b: u8) -> Result<Self, WireError> {
        if b & !0b11 != 0 {
            return Err(WireError::Reserved);
        }
        Ok(Self {
            send: b & 1 != 0,
            rcv: b & 2 != 0,
        })
    }
}

/// Why the daemon refused an OPEN or a RESUME. The guest library maps each to an errno
/// for its caller (documented in the README's session section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such session for this domain (never existed, ended, or another domain's).
    UnknownSession,
    /// The proof does not match (wrong secret or a replayed handshake).
    BadProof,
    /// The session was parked longer than its timeout and has been closed.
    Expired,
    /// The counts in the RESUME are outside what the daemon sent or keeps.
    OutOfRange,
    /// The OPEN's target refused the connection; `errno` says how.
    TargetRefused,
    /// Not supported by this daemon (target or socket type).
    Unsupported,
    /// Too many sessions for this domain.
    TooMany,
    /// The frame was malformed or not expected here.
    Malformed,
}

impl Refusal {
    fn code(self) -> u16 {
        match self {
            Self::UnknownSession => 1,
            Self::BadProof => 2,
            Self::Expired => 3,
            Self::OutOfRange => 4,
            Self::TargetRefused => 5,
            Self::Unsupported => 6,
            Self::TooMany => 7,
            Self::Malformed => 8,
        }
    }

    fn from_code(c: u16) -> Option<Self> {
        Some(match c {
            1 => Self::UnknownSession,
            2 => Self::BadProof,
            3 => Self::Expired,
            4 => Self::OutOfRange,
            5 => Self::TargetRefused,
            6 => Self::Unsupported,
            7 => Self::TooMany,
            8 => Self::Malformed,
            _ => return None,
        })
    }

    /// A short name for logs and counters.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownSession => "unknown-session",
            Self::BadProof => "bad-proof",
            Self::Expired => "expired",
            Self::OutOfRange => "out-of-range",
            Self::TargetRefused => "target-refused",
            Self::Unsupported => "unsupported",
            Self::TooMany => "too-many",
            Self::Malformed => "malformed",
        }
    }
}

/// One handshake frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Guest -> daemon: open a session to `target`.
    Open {
        /// Domain to connect to (the host, [`Cid::HOST`], or a sibling).
        cid: Cid,
        /// Port on it.
        port: Port,
        /// Stream or seqpacket.
        socket_type: SocketType,
    },
    /// Daemon -> guest: the session exists; data follows.
    Opened {
        /// Names the session in a later RESUME.
        id: SessionId,
        /// Proves the resumer is the owner; never sent again.
        secret: Secret,
        /// The nonce the next RESUME's proof must cover.
        next_nonce: Nonce,
        /// The most guest data the daemon holds unconsumed (the guest's replay size).
        window: u32,
        /// How long the daemon keeps the session parked.
        park_timeout_ms: u32,
    },
    /// Guest -> daemon: continue session `id` on this connection.
    Resume {
        /// The session.
        id: SessionId,
        /// The guest's fresh nonce, covered by the proof.
        client_nonce: Nonce,
        /// What the guest has received of the daemon's data.
        received: u64,
        /// What the guest has closed.
        closed: Closed,
        /// HMAC over the above and the daemon's nonce ([`super::proof`]).
        proof: Tag,
    },
    /// Daemon -> guest: resumed; retransmission then data follow.
    Resumed {
        /// What the daemon has received of the guest's data.
        received: u64,
        /// What the daemon's side has closed.
        closed: Closed,
        /// The nonce the next RESUME's proof must cover.
        next_nonce: Nonce,
    },
    /// Guest -> daemon: connections to this guest port may be sessions.
    Listen {
        /// The guest's listening port.
        port: Port,
        /// Stream or seqpacket.
        socket_type: SocketType,
    },
    /// Daemon -> guest: registered; keep this connection open to keep the registration.
    Listening {
        /// The port registered.
        port: Port,
    },
    /// Daemon -> guest, first on a host-initiated connection to a registered port: this
    /// connection is a session (fields as in [`Frame::Opened`]).
    Offered {
        /// Names the session in a later RESUME.
        id: SessionId,
        /// Proves the resumer is the owner.
        secret: Secret,
        /// The nonce the next RESUME's proof must cover.
        next_nonce: Nonce,
        /// The most guest data the daemon holds unconsumed.
        window: u32,
        /// How long the daemon keeps the session parked.
        park_timeout_ms: u32,
    },
    /// Daemon -> guest: no; the connection ends after this frame.
    Refused {
        /// Why.
        reason: Refusal,
        /// For [`Refusal::TargetRefused`], the errno of the target's failure (0 otherwise).
        errno: u32,
    },
}

/// A frame that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Not a session frame.
    #[error("not a session frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A version this code does not speak.
    #[error("unsupported session wire version {0}")]
    UnsupportedVersion(u8),
    /// An unknown frame kind.
    #[error("unknown session frame kind {0}")]
    UnknownKind(u8),
    /// The body length is not the kind's.
    #[error("session frame kind {kind} has body length {len}, expected {expected}")]
    BadLength {
        /// Frame kind.
        kind: u8,
        /// Length on the wire.
        len: u16,
        /// Length of that kind.
        expected: u16,
    },
    /// A reserved field or bit is not zero.
    #[error("reserved bits set in a session frame")]
    Reserved,
    /// A field holds a value outside its enum.
    #[error("invalid {field} {value} in a session frame")]
    BadValue {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u32,
    },
}

const KIND_OPEN: u8 = 1;
const KIND_OPENED: u8 = 2;
const KIND_RESUME: u8 = 3;
const KIND_RESUMED: u8 = 4;
const KIND_REFUSED: u8 = 5;
const KIND_LISTEN: u8 = 6;
const KIND_LISTENING: u8 = 7;
const KIND_OFFERED: u8 = 8;

fn body_len(kind: u8) -> Option<usize> {
    Some(match kind {
        KIND_OPEN => size_of::<OpenBody>(),
        KIND_OPENED => size_of::<OpenedBody>(),
        KIND_RESUME => size_of::<ResumeBody>(),
        KIND_RESUMED => size_of::<ResumedBody>(),
        KIND_REFUSED => size_of::<RefusedBody>(),
        KIND_LISTEN => size_of::<ListenBody>(),
        KIND_LISTENING => size_of::<ListeningBody>(),
        KIND_OFFERED => size_of::<OpenedBody>(),
        _ => return None,
    })
}

fn socket_type_code(t: SocketType) -> u8 {
    match t {
        SocketType::Stream => 1,
        SocketType::SeqPacket => 2,
    }
}

fn socket_type_of(code: u8) -> Result<SocketType, WireError> {
    match code {
        1 => Ok(SocketType::Stream),
        2 => Ok(SocketType::SeqPacket),
        v => Err(WireError::BadValue {
            field: "socket type",
            value: u32::from(v),
        }),
    }
}

impl Frame {
    /// The frame kind's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Open { .. } => "OPEN",
            Self::Opened { .. } => "OPENED",
            Self::Resume { .. } => "RESUME",
            Self::Resumed { .. } => "RESUMED",
            Self::Refused { .. } => "REFUSED",
            Self::Listen { .. } => "LISTEN",
            Self::Listening { .. } => "LISTENING",
            Self::Offered { .. } => "OFFERED",
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Self::Open { .. } => KIND_OPEN,
            Self::Opened { .. } => KIND_OPENED,
            Self::Resume { .. } => KIND_RESUME,
            Self::Resumed { .. } => KIND_RESUMED,
            Self::Refused { .. } => KIND_REFUSED,
            Self::Listen { .. } => KIND_LISTEN,
            Self::Listening { .. } => KIND_LISTENING,
            Self::Offered { .. } => KIND_OFFERED,
        }
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let kind = self.kind();
        let len = body_len(kind).expect("every kind has a length");
        let mut out = Vec::with_capacity(PREAMBLE_LEN + len);
        let pre = Preamble {
            magic: *MAGIC,
            version: WIRE_VERSION,
            kind,
            body_len: U16::new(len as u16),
        };
        out.extend_from_slice(pre.as_bytes());
        match *self {
            Self::Open {
                cid,
                port,
                socket_type,
            } => out.extend_from_slice(
                OpenBody {
                    cid: U64::new(cid.0),
                    port: U32::new(port.0),
                    socket_type: socket_type_code(socket_type),
                    flags: 0,
                    reserved: U16::ZERO,
                }
                .as_bytes(),
            ),
            Self::Opened {
                id,
                ref secret,
                next_nonce,
                window,
                park_timeout_ms,
            }
            | Self::Offered {
                id,
                ref secret,
                next_nonce,
                window,
                park_timeout_ms,
            } => out.extend_from_slice(
                OpenedBody {
                    id: id.0,
                    secret: secret.0,
                    next_nonce: next_nonce.0,
                    window: U32::new(window),
                    park_timeout_ms: U32::new(park_timeout_ms),
                }
                .as_bytes(),
            ),
            Self::Resume {
                id,
                client_nonce,
                received,
                closed,
                proof,
            } => out.extend_from_slice(
                ResumeBody {
                    id: id.0,
                    client_nonce: client_nonce.0,
                    received: U64::new(received),
                    shutdown: closed.to_bits(),
                    reserved: [0; 7],
                    proof: proof.0,
                }
                .as_bytes(),
            ),
            Self::Resumed {
                received,
                closed,
                next_nonce,
            } => out.extend_from_slice(
                ResumedBody {
                    received: U64::new(received),
                    shutdown: closed.to_bits(),
                    reserved: [0; 7],
                    next_nonce: next_nonce.0,
                }
                .as_bytes(),
            ),
            Self::Listen { port, socket_type } => out.extend_from_slice(
                ListenBody {
                    port: U32::new(port.0),
                    socket_type: socket_type_code(socket_type),
                    reserved: [0; 3],
                }
                .as_bytes(),
            ),
            Self::Listening { port } => out.extend_from_slice(
                ListeningBody {
                    port: U32::new(port.0),
                    reserved: U32::ZERO,
                }
                .as_bytes(),
            ),
            Self::Refused { reason, errno } => out.extend_from_slice(
                RefusedBody {
                    reason: U16::new(reason.code()),
                    reserved: U16::ZERO,
                    errno: U32::new(errno),
                }
                .as_bytes(),
            ),
        }
        out
    }

    /// Decodes the frame at the start of `buf`: `Ok(None)` until all its bytes are there;
    /// then the frame and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
        // The magic is checked as soon as it is there, so a raw stream is told at once.
        let have = buf.len().min(MAGIC.len());
        if buf[..have] != MAGIC[..have] {
            let mut m = [0u8; 4];
            m[..have].copy_from_slice(&buf[..have]);
            return Err(WireError::BadMagic(m));
        }
        let Ok((pre, rest)) = Preamble::ref_from_prefix(buf) else {
            return Ok(None);
        };
        if pre.version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion(pre.version));
        }
        let expected = body_len(pre.kind).ok_or(WireError::UnknownKind(pre.kind))?;
        if usize::from(pre.body_len.get()) != expected {
            return Err(WireError::BadLength {
                kind: pre.kind,
                len: pre.body_len.get(),
                expected: expected as u16,
            });
        }
        if rest.len() < expected {
            return Ok(None);
        }
        let body = &rest[..expected];
        let frame = match pre.kind {
            KIND_OPEN => {
                let b = OpenBody::ref_from_bytes(body).expect("length checked");
                if b.flags != 0 || b.reserved.get() != 0 {
                    return Err(WireError::Reserved);
                }
                let socket_type = socket_type_of(b.socket_type)?;
                Frame::Open {
                    cid: Cid(b.cid.get()),
                    port: Port(b.port.get()),
                    socket_type,
                }
            }
            KIND_OPENED => {
                let b = OpenedBody::ref_from_bytes(body).expect("length checked");
                Frame::Opened {
                    id: SessionId(b.id),
                    secret: Secret(b.secret),
                    next_nonce: Nonce(b.next_nonce),
                    window: b.window.get(),
                    park_timeout_ms: b.park_timeout_ms.get(),
                }
            }
            KIND_OFFERED => {
                let b = OpenedBody::ref_from_bytes(body).expect("length checked");
                Frame::Offered {
                    id: SessionId(b.id),
                    secret: Secret(b.secret),
                    next_nonce: Nonce(b.next_nonce),
                    window: b.window.get(),
                    park_timeout_ms: b.park_timeout_ms.get(),
                }
            }
            KIND_LISTEN => {
                let b = ListenBody::ref_from_bytes(body).expect("length checked");
                if b.reserved != [0; 3] {
                    return Err(WireError::Reserved);
                }
                Frame::Listen {
                    port: Port(b.port.get()),
                    socket_type: socket_type_of(b.socket_type)?,
                }
            }
            KIND_LISTENING => {
                let b = ListeningBody::ref_from_bytes(body).expect("length checked");
                if b.reserved.get() != 0 {
                    return Err(WireError::Reserved);
                }
                Frame::Listening {
                    port: Port(b.port.get()),
                }
            }
            KIND_RESUME => {
                let b = ResumeBody::ref_from_bytes(body).expect("length checked");
                if b.reserved != [0; 7] {
                    return Err(WireError::Reserved);
                }
                Frame::Resume {
                    id: SessionId(b.id),
                    client_nonce: Nonce(b.client_nonce),
                    received: b.received.get(),
                    closed: Closed::from_bits(b.shutdown)?,
                    proof: Tag(b.proof),
                }
            }
            KIND_RESUMED => {
                let b = ResumedBody::ref_from_bytes(body).expect("length checked");
                if b.reserved != [0; 7] {
                    return Err(WireError::Reserved);
                }
                Frame::Resumed {
                    received: b.received.get(),
                    closed: Closed::from_bits(b.shutdown)?,
                    next_nonce: Nonce(b.next_nonce),
                }
            }
            KIND_REFUSED => {
                let b = RefusedBody::ref_from_bytes(body).expect("length checked");
                if b.reserved.get() != 0 {
                    return Err(WireError::Reserved);
                }
                let reason = Refusal::from_code(b.reason.get()).ok_or(WireError::BadValue {
                    field: "refusal reason",
                    value: u32::from(b.reason.get()),
                })?;
                Frame::Refused {
                    reason,
                    errno: b.errno.get(),
                }
            }
            _ => unreachable!("kind checked by body_len"),
        };
        Ok(Some((frame, PREAMBLE_LEN + expected)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Open {
                cid: Cid::HOST,
                port: Port(5000),
                socket_type: SocketType::Stream,
            },
            Frame::Open {
                cid: Cid(7),
                port: Port(u32::MAX),
                socket_type: SocketType::SeqPacket,
            },
            Frame::Opened {
                id: SessionId([1; 16]),
                secret: Secret([2; 32]),
                next_nonce: Nonce([3; 16]),
                window: 256 * 1024,
                park_timeout_ms: 60_000,
            },
            Frame::Resume {
                id: SessionId([4; 16]),
                client_nonce: Nonce([5; 16]),
                received: u64::MAX - 1,
                closed: Closed {
                    send: true,
                    rcv: false,
                },
                proof: Tag([6; 32]),
            },
            Frame::Resumed {
                received: 12345,
                closed: Closed {
                    send: false,
                    rcv: true,
                },
                next_nonce: Nonce([7; 16]),
            },
            Frame::Refused {
                reason: Refusal::TargetRefused,
                errno: 111,
            },
            Frame::Listen {
                port: Port(6000),
                socket_type: SocketType::SeqPacket,
            },
            Frame::Listening { port: Port(6000) },
            Frame::Offered {
                id: SessionId([8; 16]),
                secret: Secret([9; 32]),
                next_nonce: Nonce([10; 16]),
                window: 1,
                park_timeout_ms: 2,
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_and_needs_all_its_bytes() {
        for f in samples() {
            let bytes = f.encode();
            assert!(bytes.len() <= MAX_FRAME_LEN);
            for cut in 0..bytes.len() {
                assert_eq!(Frame::decode(&bytes[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.extend_from_slice(b"data after the frame");
            assert_eq!(Frame::decode(&longer), Ok(Some((f.clone(), bytes.len()))));
        }
    }

    #[test]
    fn a_raw_stream_is_told_from_the_first_byte() {
        assert_eq!(
            Frame::decode(b"G"),
            Err(WireError::BadMagic([b'G', 0, 0, 0]))
        );
        assert_eq!(
            Frame::decode(b"GET / HTTP/1.1\r\n"),
            Err(WireError::BadMagic(*b"GET "))
        );
    }

    #[test]
    fn malformed_frames_are_refused_with_their_numbers() {
        let mut open = samples()[0].encode();
        open[4] = 9;
        assert_eq!(Frame::decode(&open), Err(WireError::UnsupportedVersion(9)));
        let mut open = samples()[0].encode();
        open[5] = 42;
        assert_eq!(Frame::decode(&open), Err(WireError::UnknownKind(42)));
        let mut open = samples()[0].encode();
        open[6] = 17;
        assert_eq!(
            Frame::decode(&open),
            Err(WireError::BadLength {
                kind: 1,
                len: 17,
                expected: 16
            })
        );
        let mut open = samples()[0].encode();
        open[PREAMBLE_LEN + 12] = 3;
        assert_eq!(
            Frame::decode(&open),
            Err(WireError::BadValue {
                field: "socket type",
                value: 3
            })
        );
        let mut resume = samples()[3].encode();
        resume[PREAMBLE_LEN + 40] = 0b100;
        assert_eq!(Frame::decode(&resume), Err(WireError::Reserved));
        let mut refused = samples()[5].encode();
        refused[PREAMBLE_LEN] = 99;
        assert!(matches!(
            Frame::decode(&refused),
            Err(WireError::BadValue {
                field: "refusal reason",
                value: 99
            })
        ));
    }
}
