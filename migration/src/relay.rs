//! The session relay protocol: what one tunnel channel carries when a session's guest runs
//! on another host than the session's **home** (the host where its host end lives: a host
//! process's socket, or the socket pair into a sibling guest's engine).
//!
//! ```text
//!  home host                                      guest's host
//!  host end <-> home relay ==== channel ==== guest relay <-> socket pair <-> engine (session)
//!               OPEN(RelayOpen) ---------------------->   (acceptor: domain adopted here?)
//!               SNAPSHOT --------------------------------> import_parked
//!               <-------------------------------- IMPORTED (the guest may resume)
//!               DATA (host -> guest) ------------------->
//!               <----------------------- DATA (guest -> host)
//!   the guest moves on (its host exports):
//!               <------------- DATA (last guest bytes) ... HANDOFF{to, taken, pending, snapshot}
//!   home: to == itself  -> import with the host end back (the route is local again)
//!         to == another -> OPEN a channel to it with the snapshot (a direct route),
//!                          wait for its IMPORTED
//!         either failed  -> OPEN a channel back to the sender with the snapshot
//!               CLOSE (channel) ----------------------->   (the old channel ends)
//! ```
//!
//! **Joining a sibling pair.** A session between two guests X and Y of one host is a
//! socket pair there (its home): X's session Sx holds one end, Y's session Sy (Y accepted
//! through a session listener) the other. When both guests run on another host B, the
//! home has two home relays to B and asks B to join them (a channel of its own whose OPEN
//! metadata is a [`JoinOpen`]: out of band, because a JOIN behind data a parked guest
//! does not take would never be read); B swaps both engines' host ends to placeholders at
//! once, drains both old paths through the home, and gives each engine a fresh local pair
//! (the bytes that were in flight go to the guests first):
//!
//! ```text
//!  home A (px <-> py pair)                    host B (X and Y run here)
//!  -- channel OPEN(JoinOpen{Sx, Sy, port}) ---->  both guest relays from A here? policy
//!                                                 X->Y at B? both engines -> placeholders q
//!  <-------------------------- 1 (0: stays relayed) -- ; A closes the request channel
//!     <-- DATA (what X's engine wrote) ... END -- gx   (old pair end read to EOF)
//!  hx: write to px, shut px; hy: px's bytes to cy, then END (py read to EOF)
//!  hy -- DATA (X's bytes via px/py) ... END ---> gy   (held: they go to Y first)
//!     (and the same Y -> X)
//!                                              B: both held to END: a fresh pair (nx, ny),
//!                                              engines swap q -> n with the held bytes (and
//!                                              what they wrote into q meanwhile) in front
//!  both channels close; A's home relays end; the pair's home is B now
//! ```
//!
//! The session state travels with the guest; the host end never moves, so a route is
//! always one channel long however often the guest moves.
//!
//! **Exactness.** The home relay keeps every host->guest byte the guest side has not
//! read: tunnel channels acknowledge a byte only when the reader took it
//! ([`crate::tunnel`]), so the bytes of DATA frames the guest side had not read when it
//! handed off are still in the home's channel. HANDOFF says how far the guest side read
//! the channel (`taken`); its snapshot holds what the session's engine took (its replay
//! tail), and `pending` the host bytes the guest side held beyond its engine, as DATA
//! frames (its socket pair, its queue, whole frames read), then the bytes of a frame read
//! only in part. The home sends `pending` and its channel's unread tail on as DATA after
//! the snapshot on the next channel (into the tail only when the session comes home), so
//! a snapshot's tail is never more than its engine's replay. After a HANDOFF the guest
//! side reads nothing more from the channel, so the home finds everything from `taken` on
//! in its channel's replay. The guest side sends all guest bytes it accepted as DATA
//! before the HANDOFF, so the home has them all when it acts on it. The home answers by
//! closing the channel once the session lives on elsewhere (on a failure it first sends
//! the session back to the sender on a new channel, so the sender can tell the two
//! apart).
//!
//! Wire format, all integers little-endian:
//! - Channel OPEN metadata ([`RelayOpen`]): `"DSRL"`, version u8 (2 or 3), socket type u8
//!   (1 stream, 2 seqpacket), session id (16), domain length u8 + domain, namespace
//!   length u8 + namespace (names: 1..=64 bytes of `[A-Za-z0-9._-]`); version 3 then adds
//!   the session's **target by name** ([`RelayTarget`], what the home's policy matches
//!   on, so a host whose CIDs differ can still name it): kind u8, then
//!   - 1 (a host port): port u32;
//!   - 2 (a sibling the session's guest dialed) or 3 (a sibling whose dial this guest
//!     accepted through a session listener): sibling domain length u8 + name, guest
//!     port u32 (the sibling is in the session's namespace).
//!
//!   A sender writes version 3 when it knows the target and version 2 (no target) else;
//!   a receiver takes both (a version-2 session is one whose target only its home
//!   knows, as before). A version-2 receiver refuses version 3 (`Version`), so an export
//!   to an older host fails cleanly.
//! - Frames on the (stream) channel: an 8-byte header (kind u8, flags u8, reserved u16 = 0,
//!   payload length u32), then the payload:
//!
//! | kind | name | direction | payload |
//! |---|---|---|---|
//! | 1 | SNAPSHOT | home -> guest side | a [`SessionSnapshot`] |
//! | 2 | DATA | both | bytes (stream) or one whole message (seqpacket), 1..=[`MAX_DATA`] |
//! | 3 | IMPORTED | guest side -> home | empty |
//! | 4 | HANDOFF | guest side -> home | `taken` u64, host-name length u8 + name, `pending` length u32 + bytes (<= [`MAX_PENDING`]), snapshot |
//! | 6 | FAILED | guest side -> home | a UTF-8 sentence (<= 256 bytes): the import was refused |
//! | 8 | END | both | empty: no more DATA from this side for the join (the stream itself goes on) |
//!
//! - A join request is a channel of its own whose OPEN metadata ([`JoinOpen`]) is
//!   `"DSJN"`, version u8, dialer session id (16), acceptor session id (16), guest port
//!   u32. The receiver refuses the OPEN (not a pair relayed here from the sender) or
//!   answers one byte (1: the join runs, 0: the pair stays relayed, e.g. its policy says
//!   no); the sender then closes the channel.
//!
//! Version 2 added END and the join request; a version-1 peer refuses the channel's OPEN,
//! so an export to it fails cleanly instead of an END breaking a running session.
//! Flags must be zero. Anything else is an error for that channel only.
//!
//! What it does not do: decide whether a domain may receive the session (the acceptor
//! checks the adoption, the domain's name and namespace), or move bytes.

use crate::session::snapshot::{SessionSnapshot, SnapshotError, SNAPSHOT_HEADER_LEN};
use crate::session::SessionId;
use domsock_proto::SocketType;
use thiserror::Error;

/// Protocol version (frames, join requests, and relay metadata without a target).
pub const RELAY_VERSION: u8 = 2;
/// Relay metadata version with the session's target ([`RelayOpen::target`]).
pub const RELAY_OPEN_TARGET_VERSION: u8 = 3;
/// Frame header length.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest DATA payload (the largest seqpacket message a session carries fits).
pub const MAX_DATA: usize = 256 * 1024;
/// Largest FAILED text.
pub const MAX_REASON: usize = 256;
/// Longest domain, namespace or host name.
pub const MAX_NAME: usize = 64;
/// Most host bytes (framed) a guest side may hand back beyond its engine's replay: its
/// socket pair, one queued payload and its read buffer are far below this.
pub const MAX_PENDING: usize = 2 * 1024 * 1024;

const MAGIC: &[u8; 4] = b"DSRL";

const KIND_SNAPSHOT: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_IMPORTED: u8 = 3;
const KIND_HANDOFF: u8 = 4;
const KIND_FAILED: u8 = 6;
const KIND_END: u8 = 8;
const JOIN_MAGIC: &[u8; 4] = b"DSJN";

/// Why bytes are not valid relay metadata or a valid frame.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RelayError {
    /// Not relay metadata.
    #[error("not session relay metadata (bad magic)")]
    BadMagic,
    /// Another protocol version.
    #[error("unsupported relay version {0} (this build speaks {RELAY_VERSION} and {RELAY_OPEN_TARGET_VERSION} metadata)")]
    Version(u8),
    /// Shorter than its own lengths say.
    #[error("relay metadata truncated")]
    Truncated,
    /// A field holds a value no valid sender writes.
    #[error("invalid relay field {0}")]
    Invalid(&'static str),
    /// A frame kind this build does not know.
    #[error("unknown relay frame kind {0}")]
    UnknownKind(u8),
    /// A frame longer than its kind allows.
    #[error("relay frame of kind {kind} with {len} bytes exceeds {limit}")]
    TooLong {
        /// Frame kind.
        kind: u8,
        /// Its payload length.
        len: usize,
        /// The limit for the kind.
        limit: usize,
    },
    /// The snapshot inside is invalid.
    #[error("relayed snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
}

/// Whether `s` is a valid domain, namespace or host name on the relay wire.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn socket_type_code(t: SocketType) -> u8 {
    match t {
        SocketType::Stream => 1,
        SocketType::SeqPacket => 2,
    }
}

fn socket_type_of(code: u8) -> Option<SocketType> {
    match code {
        1 => Some(SocketType::Stream),
        2 => Some(SocketType::SeqPacket),
        _ => None,
    }
}

/// The OPEN metadata of a relay channel: which session of which domain it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayOpen {
    /// The session.
    pub session: SessionId,
    /// Stream or seqpacket.
    pub socket_type: SocketType,
    /// The domain's name (the same on every host).
    pub domain: String,
    /// The domain's namespace, as its home host has it; the receiving host refuses a
    /// session whose domain is in another namespace there.
    pub namespace: String,
    /// What the session reaches, by name (`None`: metadata version 2, known only at its
    /// home).
    pub target: Option<RelayTarget>,
}

/// What a relayed session reaches, by the names the policy matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayTarget {
    /// A host port (on the session's home host).
    HostPort(u32),
    /// Sibling domain `domain` (same namespace), guest port `port`, which this
    /// session's guest dialed.
    Dialed {
        /// The sibling's domain name.
        domain: String,
        /// Its guest port.
        port: u32,
    },
    /// Sibling domain `domain` dialed this session's guest on its guest port `port`
    /// (a session listener accepted it): the policy to check is `domain` -> this guest.
    Accepted {
        /// The sibling's domain name.
        domain: String,
        /// This guest's port it dialed.
        port: u32,
    },
}

const TARGET_HOST: u8 = 1;
const TARGET_DIALED: u8 = 2;
const TARGET_ACCEPTED: u8 = 3;

impl RelayTarget {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            RelayTarget::HostPort(p) => {
                out.push(TARGET_HOST);
                out.extend_from_slice(&p.to_le_bytes());
            }
            RelayTarget::Dialed { domain, port } | RelayTarget::Accepted { domain, port } => {
                out.push(if matches!(self, RelayTarget::Dialed { .. }) {
                    TARGET_DIALED
                } else {
                    TARGET_ACCEPTED
                });
                put_name(out, domain);
                out.extend_from_slice(&port.to_le_bytes());
            }
        }
    }

    fn decode(buf: &mut &[u8]) -> Result<Self, RelayError> {
        let kind = take(buf, 1)?[0];
        let port = |buf: &mut &[u8]| -> Result<u32, RelayError> {
            Ok(u32::from_le_bytes(
                take(buf, 4)?.try_into().expect("4 bytes"),
            ))
        };
        Ok(match kind {
            TARGET_HOST => RelayTarget::HostPort(port(buf)?),
            TARGET_DIALED | TARGET_ACCEPTED => {
                let domain = take_name(buf, "target domain")?;
                let port = port(buf)?;
                if kind == TARGET_DIALED {
                    RelayTarget::Dialed { domain, port }
                } else {
                    RelayTarget::Accepted { domain, port }
                }
            }
            _ => return Err(RelayError::Invalid("target kind")),
        })
    }
}

impl std::fmt::Display for RelayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayTarget::HostPort(p) => write!(f, "host:{p}"),
            RelayTarget::Dialed { domain, port } => write!(f, "{domain}:{port}"),
            RelayTarget::Accepted { domain, port } => write!(f, "from {domain} on :{port}"),
        }
    }
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], RelayError> {
    if buf.len() < n {
        return Err(RelayError::Truncated);
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Ok(a)
}

fn take_name(buf: &mut &[u8], what: &'static str) -> Result<String, RelayError> {
    let len = take(buf, 1)?[0] as usize;
    let bytes = take(buf, len)?;
    let s = std::str::from_utf8(bytes).map_err(|_| RelayError::Invalid(what))?;
    if !valid_name(s) {
        return Err(RelayError::Invalid(what));
    }
    Ok(s.to_owned())
}

fn put_name(out: &mut Vec<u8>, s: &str) {
    // Callers pass valid names (<= 64 bytes); a longer one is cut, and then refused by
    // the receiver.
    let b = &s.as_bytes()[..s.len().min(MAX_NAME)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

impl RelayOpen {
    /// The metadata bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.domain.len() + self.namespace.len());
        out.extend_from_slice(MAGIC);
        out.push(if self.target.is_some() {
            RELAY_OPEN_TARGET_VERSION
        } else {
            RELAY_VERSION
        });
        out.push(socket_type_code(self.socket_type));
        out.extend_from_slice(&self.session.0);
        put_name(&mut out, &self.domain);
        put_name(&mut out, &self.namespace);
        if let Some(t) = &self.target {
            t.encode(&mut out);
        }
        out
    }

    /// Parses and validates metadata from a peer.
    pub fn decode(mut buf: &[u8]) -> Result<Self, RelayError> {
        let magic = take(&mut buf, 4).map_err(|_| RelayError::BadMagic)?;
        if magic != MAGIC {
            return Err(RelayError::BadMagic);
        }
        let version = take(&mut buf, 1)?[0];
        if version != RELAY_VERSION && version != RELAY_OPEN_TARGET_VERSION {
            return Err(RelayError::Version(version));
        }
        let socket_type =
            socket_type_of(take(&mut buf, 1)?[0]).ok_or(RelayError::Invalid("socket type"))?;
        let session = SessionId(take(&mut buf, 16)?.try_into().expect("16 bytes"));
        let domain = take_name(&mut buf, "domain")?;
        let namespace = take_name(&mut buf, "namespace")?;
        let target = (version == RELAY_OPEN_TARGET_VERSION)
            .then(|| RelayTarget::decode(&mut buf))
            .transpose()?;
        if !buf.is_empty() {
            return Err(RelayError::Invalid("trailing bytes"));
        }
        Ok(Self {
            session,
            socket_type,
            domain,
            namespace,
            target,
        })
    }
}

/// A frame's header, parsed and bounded before its payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Kind code.
    pub kind: u8,
    /// Payload length.
    pub len: usize,
}

impl FrameHeader {
    /// Whole frame length.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.len
    }
}

/// The longest payload a frame of `kind` may have, with snapshots bounded by a tail of
/// `max_tail` bytes; `None` for an unknown kind.
fn limit(kind: u8, max_tail: usize) -> Option<usize> {
    // A tail and, on seqpacket, the end of every message in it (at most one per byte,
    // plus a first empty one).
    let snapshot = SNAPSHOT_HEADER_LEN + max_tail + 8 * (max_tail + 1);
    Some(match kind {
        KIND_SNAPSHOT => snapshot,
        KIND_DATA => MAX_DATA,
        KIND_IMPORTED => 0,
        KIND_HANDOFF => 8 + 1 + MAX_NAME + 4 + MAX_PENDING + snapshot,
        KIND_FAILED => MAX_REASON,
        KIND_END => 0,
        _ => return None,
    })
}

/// Parses the header at the start of `buf`: `Ok(None)` if fewer than
/// [`FRAME_HEADER_LEN`] bytes are there. `max_tail` bounds a snapshot's replay tail.
pub fn parse_header(buf: &[u8], max_tail: usize) -> Result<Option<FrameHeader>, RelayError> {
    let Some(h) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let (kind, flags) = (h[0], h[1]);
    let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
    let lim = limit(kind, max_tail).ok_or(RelayError::UnknownKind(kind))?;
    if flags != 0 || h[2..4] != [0, 0] {
        return Err(RelayError::Invalid("flags"));
    }
    if len > lim {
        return Err(RelayError::TooLong {
            kind,
            len,
            limit: lim,
        });
    }
    if kind == KIND_DATA && len == 0 {
        return Err(RelayError::Invalid("empty DATA"));
    }
    Ok(Some(FrameHeader { kind, len }))
}

/// One relay frame (DATA borrows its payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The session as it stands, for the guest side to import.
    Snapshot(SessionSnapshot),
    /// Session payload: bytes, or one whole seqpacket message.
    Data(&'a [u8]),
    /// The guest side imported the session: its guest may resume.
    Imported,
    /// The guest moved on: the guest side read the home->guest stream up to channel
    /// offset `taken`; what its engine took is in `snapshot`, what it held beyond that is
    /// `pending` (DATA frames, then the start of a frame read only in part). The session
    /// continues at host `to`.
    Handoff {
        /// Where the guest went (may be the home itself).
        to: String,
        /// Channel offset (home->guest direction) read by the guest side.
        taken: u64,
        /// Host bytes held beyond the engine, framed, ending with a frame read in part.
        pending: Vec<u8>,
        /// The session as the guest side left it.
        snapshot: SessionSnapshot,
    },
    /// The import the SNAPSHOT asked for was refused.
    Failed(String),
    /// No more DATA follows from this side for a join.
    End,
}

/// The OPEN metadata of a join request: both halves of one sibling pair whose home is
/// the sender run on the receiver, which joins them (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinOpen {
    /// The session of the guest that dialed.
    pub dialer: SessionId,
    /// The session of the guest that accepted.
    pub acceptor: SessionId,
    /// The guest port the dialer reached.
    pub port: u32,
}

impl JoinOpen {
    /// The metadata bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(41);
        out.extend_from_slice(JOIN_MAGIC);
        out.push(RELAY_VERSION);
        out.extend_from_slice(&self.dialer.0);
        out.extend_from_slice(&self.acceptor.0);
        out.extend_from_slice(&self.port.to_le_bytes());
        out
    }

    /// Parses and validates metadata from a peer (`BadMagic` if it is not a join request).
    pub fn decode(mut buf: &[u8]) -> Result<Self, RelayError> {
        let magic = take(&mut buf, 4).map_err(|_| RelayError::BadMagic)?;
        if magic != JOIN_MAGIC {
            return Err(RelayError::BadMagic);
        }
        let version = take(&mut buf, 1)?[0];
        if version != RELAY_VERSION {
            return Err(RelayError::Version(version));
        }
        let dialer = SessionId(take(&mut buf, 16)?.try_into().expect("16 bytes"));
        let acceptor = SessionId(take(&mut buf, 16)?.try_into().expect("16 bytes"));
        let port = u32::from_le_bytes(take(&mut buf, 4)?.try_into().expect("4 bytes"));
        if !buf.is_empty() {
            return Err(RelayError::Invalid("trailing bytes"));
        }
        if dialer == acceptor {
            return Err(RelayError::Invalid("one session as both halves"));
        }
        Ok(Self {
            dialer,
            acceptor,
            port,
        })
    }
}

/// Which half of a sibling pair a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PairRole {
    /// The session of the guest that opened it (OPEN naming the sibling).
    Dialer,
    /// The session of the guest that accepted it (through a session listener).
    Acceptor,
}

fn header(kind: u8, len: usize, out: &mut Vec<u8>) {
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

impl Frame<'_> {
    /// Appends the frame's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Snapshot(s) => {
                let b = s.encode();
                header(KIND_SNAPSHOT, b.len(), out);
                out.extend_from_slice(&b);
            }
            Frame::Data(d) => {
                header(KIND_DATA, d.len(), out);
                out.extend_from_slice(d);
            }
            Frame::Imported => header(KIND_IMPORTED, 0, out),
            Frame::Handoff {
                to,
                taken,
                pending,
                snapshot,
            } => {
                let b = snapshot.encode();
                let name = &to.as_bytes()[..to.len().min(MAX_NAME)];
                header(
                    KIND_HANDOFF,
                    8 + 1 + name.len() + 4 + pending.len() + b.len(),
                    out,
                );
                out.extend_from_slice(&taken.to_le_bytes());
                out.push(name.len() as u8);
                out.extend_from_slice(name);
                out.extend_from_slice(&(pending.len() as u32).to_le_bytes());
                out.extend_from_slice(pending);
                out.extend_from_slice(&b);
            }
            Frame::End => header(KIND_END, 0, out),
            Frame::Failed(why) => {
                let mut n = why.len().min(MAX_REASON);
                while !why.is_char_boundary(n) {
                    n -= 1;
                }
                header(KIND_FAILED, n, out);
                out.extend_from_slice(&why.as_bytes()[..n]);
            }
        }
    }

    /// The DATA header for a payload of `len` bytes (the payload follows without a copy).
    pub fn data_header(len: usize) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0] = KIND_DATA;
        h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        h
    }
}

/// Decodes the frame of header `h` from its `payload` (exactly `h.len` bytes).
pub fn decode<'a>(
    h: FrameHeader,
    payload: &'a [u8],
    max_tail: usize,
) -> Result<Frame<'a>, RelayError> {
    debug_assert_eq!(payload.len(), h.len);
    Ok(match h.kind {
        KIND_SNAPSHOT => Frame::Snapshot(SessionSnapshot::decode(payload, max_tail)?),
        KIND_DATA => Frame::Data(payload),
        KIND_IMPORTED => Frame::Imported,
        KIND_HANDOFF => {
            let mut buf = payload;
            let taken = u64::from_le_bytes(take(&mut buf, 8)?.try_into().expect("8 bytes"));
            let to = take_name(&mut buf, "host name")?;
            let n = u32::from_le_bytes(take(&mut buf, 4)?.try_into().expect("4 bytes")) as usize;
            if n > MAX_PENDING {
                return Err(RelayError::Invalid("pending bytes"));
            }
            let pending = take(&mut buf, n)?.to_vec();
            Frame::Handoff {
                to,
                taken,
                pending,
                snapshot: SessionSnapshot::decode(buf, max_tail)?,
            }
        }
        KIND_FAILED => Frame::Failed(String::from_utf8_lossy(payload).into_owned()),
        KIND_END => Frame::End,
        other => return Err(RelayError::UnknownKind(other)),
    })
}

/// Splits DATA frames out of `bytes` (frames this side encoded, resent after a handoff):
/// their payloads in order; other whole frames among them (a JOIN queued for the old
/// channel) are skipped. Stops at the first incomplete or invalid frame.
pub fn data_payloads(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Ok(Some(h)) = parse_header(bytes, 0) {
        if bytes.len() < h.frame_len() {
            break;
        }
        if h.kind == KIND_DATA {
            out.push(&bytes[FRAME_HEADER_LEN..h.frame_len()]);
        }
        bytes = &bytes[h.frame_len()..];
    }
    out
}

/// Appends host->guest payload that never reached the guest to a snapshot's tail: bytes
/// (stream) or one whole message (seqpacket).
pub fn extend_tail(snapshot: &mut SessionSnapshot, payload: &[u8]) {
    snapshot.tail.extend_from_slice(payload);
    if snapshot.socket_type == SocketType::SeqPacket {
        snapshot
            .message_ends
            .push(snapshot.tail_start + snapshot.tail.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Nonce, Secret};

    fn snap(ty: SocketType) -> SessionSnapshot {
        SessionSnapshot {
            id: SessionId([7; 16]),
            secret: Secret([1; 32]),
            nonce: Nonce([2; 16]),
            prev_nonce: None,
            socket_type: ty,
            received: 10,
            guest_done: false,
            host_done: false,
            tail_start: 100,
            tail: b"hello".to_vec(),
            message_ends: if ty == SocketType::SeqPacket {
                vec![105]
            } else {
                vec![]
            },
            messages_acked: if ty == SocketType::SeqPacket { 3 } else { 0 },
        }
    }

    fn roundtrip(f: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        f.encode(&mut out);
        let h = parse_header(&out, 1024).unwrap().unwrap();
        assert_eq!(h.frame_len(), out.len());
        let back = decode(h, &out[FRAME_HEADER_LEN..], 1024).unwrap();
        assert_eq!(&back, f);
        out
    }

    #[test]
    fn metadata_round_trips_and_rejects_bad_names() {
        let m = RelayOpen {
            session: SessionId([9; 16]),
            socket_type: SocketType::SeqPacket,
            domain: "guest-a".into(),
            namespace: "tenant.1".into(),
            target: None,
        };
        let b = m.encode();
        assert_eq!(&b[..4], b"DSRL");
        assert_eq!(RelayOpen::decode(&b).unwrap(), m);
        let mut bad = b.clone();
        bad[4] = 1;
        assert_eq!(RelayOpen::decode(&bad), Err(RelayError::Version(1)));
        let mut bad = b.clone();
        bad[5] = 3;
        assert_eq!(
            RelayOpen::decode(&bad),
            Err(RelayError::Invalid("socket type"))
        );
        let mut bad = b.clone();
        bad[23] = b'/';
        assert_eq!(RelayOpen::decode(&bad), Err(RelayError::Invalid("domain")));
        for n in 0..b.len() {
            assert!(RelayOpen::decode(&b[..n]).is_err(), "prefix {n}");
        }
        let mut long = b;
        long.push(0);
        assert!(RelayOpen::decode(&long).is_err());
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(65)));
    }

    #[test]
    fn metadata_with_a_target_round_trips_and_version_2_still_decodes() {
        let mut m = RelayOpen {
            session: SessionId([9; 16]),
            socket_type: SocketType::Stream,
            domain: "x".into(),
            namespace: "default".into(),
            target: None,
        };
        let v2 = m.encode();
        assert_eq!(v2[4], RELAY_VERSION);
        for t in [
            RelayTarget::HostPort(5800),
            RelayTarget::Dialed {
                domain: "y".into(),
                port: 6101,
            },
            RelayTarget::Accepted {
                domain: "x-1".into(),
                port: 7,
            },
        ] {
            m.target = Some(t);
            let b = m.encode();
            assert_eq!(b[4], RELAY_OPEN_TARGET_VERSION);
            assert_eq!(
                &b[..v2.len()][5..],
                &v2[5..],
                "version 2's fields come first"
            );
            assert_eq!(RelayOpen::decode(&b).unwrap(), m);
            for n in 0..b.len() {
                assert!(RelayOpen::decode(&b[..n]).is_err(), "prefix {n}");
            }
            let mut long = b.clone();
            long.push(0);
            assert!(RelayOpen::decode(&long).is_err());
        }
        let mut bad = m.encode();
        bad[v2.len()] = 9;
        assert_eq!(
            RelayOpen::decode(&bad),
            Err(RelayError::Invalid("target kind"))
        );
        let mut bad = m.encode();
        bad[v2.len() + 2] = b'/';
        assert_eq!(
            RelayOpen::decode(&bad),
            Err(RelayError::Invalid("target domain"))
        );
        // A version-2 header with a target after it is trailing bytes.
        let mut bad = m.encode();
        bad[4] = RELAY_VERSION;
        assert_eq!(
            RelayOpen::decode(&bad),
            Err(RelayError::Invalid("trailing bytes"))
        );
        assert_eq!(m.target.as_ref().unwrap().to_string(), "from x-1 on :7");
    }

    #[test]
    fn join_requests_round_trip_and_are_not_relay_metadata() {
        let j = JoinOpen {
            dialer: SessionId([1; 16]),
            acceptor: SessionId([2; 16]),
            port: 6100,
        };
        let b = j.encode();
        assert_eq!(b.len(), 41);
        assert_eq!(JoinOpen::decode(&b), Ok(j));
        assert_eq!(RelayOpen::decode(&b), Err(RelayError::BadMagic));
        let open = RelayOpen {
            session: SessionId([9; 16]),
            socket_type: SocketType::Stream,
            domain: "x".into(),
            namespace: "default".into(),
            target: None,
        };
        assert_eq!(JoinOpen::decode(&open.encode()), Err(RelayError::BadMagic));
        for n in 0..b.len() {
            assert!(JoinOpen::decode(&b[..n]).is_err(), "prefix {n}");
        }
        let mut bad = b.clone();
        bad[4] = 1;
        assert_eq!(JoinOpen::decode(&bad), Err(RelayError::Version(1)));
        let mut same = b.clone();
        same[21..37].copy_from_slice(&[1; 16]);
        assert_eq!(
            JoinOpen::decode(&same),
            Err(RelayError::Invalid("one session as both halves"))
        );
        let mut long = b;
        long.push(0);
        assert!(JoinOpen::decode(&long).is_err());
    }

    #[test]
    fn frames_round_trip() {
        roundtrip(&Frame::Snapshot(snap(SocketType::Stream)));
        let d = roundtrip(&Frame::Data(b"abc"));
        assert_eq!(d[..FRAME_HEADER_LEN], Frame::data_header(3));
        roundtrip(&Frame::Imported);
        roundtrip(&Frame::Failed("domain not expected here".into()));
        roundtrip(&Frame::End);
        let mut end = Vec::new();
        Frame::End.encode(&mut end);
        end[4] = 1;
        assert!(parse_header(&end, 0).is_err());
        end[4] = 0;
        end[0] = 7;
        assert_eq!(parse_header(&end, 0), Err(RelayError::UnknownKind(7)));
        roundtrip(&Frame::Handoff {
            to: "host-c".into(),
            taken: 12345,
            pending: vec![2, 0, 0, 0, 9],
            snapshot: snap(SocketType::SeqPacket),
        });
    }

    #[test]
    fn hostile_headers_are_refused_before_the_payload() {
        let mut f = Vec::new();
        Frame::Data(b"x").encode(&mut f);
        let mut bad = f.clone();
        bad[0] = 9;
        assert_eq!(parse_header(&bad, 0), Err(RelayError::UnknownKind(9)));
        let mut bad = f.clone();
        bad[1] = 1;
        assert_eq!(parse_header(&bad, 0), Err(RelayError::Invalid("flags")));
        let mut bad = f.clone();
        bad[4..8].copy_from_slice(&(MAX_DATA as u32 + 1).to_le_bytes());
        assert!(matches!(
            parse_header(&bad, 0),
            Err(RelayError::TooLong { .. })
        ));
        let mut bad = f.clone();
        bad[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            parse_header(&bad, 0),
            Err(RelayError::Invalid("empty DATA"))
        );
        let mut bad = Vec::new();
        Frame::Imported.encode(&mut bad);
        bad[4] = 1;
        assert!(parse_header(&bad, 0).is_err());
        // A snapshot whose tail exceeds the receiver's bound is refused by its length.
        let mut big = snap(SocketType::Stream);
        big.tail = vec![0; 16 * 1024];
        let mut out = Vec::new();
        Frame::Snapshot(big).encode(&mut out);
        assert!(matches!(
            parse_header(&out, 1024),
            Err(RelayError::TooLong { .. })
        ));
        assert_eq!(parse_header(&f[..7], 0), Ok(None));
    }

    #[test]
    fn resent_data_frames_split_back_into_payloads() {
        let mut out = Vec::new();
        Frame::Data(b"one").encode(&mut out);
        Frame::Data(b"two!").encode(&mut out);
        Frame::End.encode(&mut out);
        Frame::Data(b"after").encode(&mut out);
        let mut partial = out.clone();
        Frame::Data(b"three").encode(&mut partial);
        partial.truncate(partial.len() - 2);
        assert_eq!(
            data_payloads(&partial),
            vec![&b"one"[..], &b"two!"[..], &b"after"[..]]
        );
    }

    #[test]
    fn the_tail_grows_by_messages_on_seqpacket() {
        let mut s = snap(SocketType::SeqPacket);
        extend_tail(&mut s, b"more");
        assert_eq!(s.tail, b"hellomore");
        assert_eq!(s.message_ends, vec![105, 109]);
        let mut s = snap(SocketType::Stream);
        extend_tail(&mut s, b"more");
        assert!(s.message_ends.is_empty());
    }
}
