//! The tunnel's frame codec (version 1): pure functions from frames to bytes and back.
//!
//! Every frame is a 12-byte header and a body:
//!
//! ```text
//! offset size field
//!      0    1 kind (1 HELLO .. 10 PONG)
//!      1    1 flags: bit0 EOR on DATA; must be 0 on every other kind
//!      2    2 reserved, must be 0
//!      4    4 channel id (le32); 0 on HELLO, PING and PONG
//!      8    4 body length (le32), at most MAX_BODY_LEN
//!     12    . body
//! ```
//!
//! Bodies (all integers little-endian; `rsv` bytes must be 0):
//!
//! ```text
//! HELLO    1  "DSTN" | version le16 = 1 | name length u8 (1..=255) | rsv u8
//!             | incarnation [16] | resume count le32 (<= MAX_CHANNELS)
//!             | host name | count x { channel le32 | flags u8 (bit0 opening) | rsv [3]
//!                                     | received le64 }
//! OPEN     2  socket kind u8 (1 stream, 2 seqpacket) | rsv [3] | buf_alloc le32
//!             | metadata (0..=MAX_METADATA_LEN bytes, opaque to the tunnel)
//! OPENED   3  buf_alloc le32 | rsv [4]
//! REFUSED  4  reason le16 | text (0..=MAX_REASON_TEXT_LEN bytes of UTF-8)
//! DATA     5  offset le64 (stream offset of the first byte) | bytes (1..=MAX_DATA_LEN)
//! CREDIT   6  received le64 | consumed le64 | buf_alloc le32 | rsv [4]
//! SHUTDOWN 7  bits u8 (bit0 the sender reads no more, bit1 it writes no more) | rsv [7]
//!             | end offset le64 (the sender's final stream offset when bit1, else 0)
//! CLOSE    8  reason le16 | rsv [2]
//! PING     9  nonce le64
//! PONG    10  nonce le64 (the PING's)
//! ```
//!
//! `buf_alloc` in OPEN, OPENED and CREDIT is the sender's receive window for the channel
//! at that moment. It may grow during the channel's life (window autotuning) and is
//! never lowered below a value already advertised: a sender uses the latest one it has,
//! and a receiver accepts up to the largest one it sent. A version-1 receiver that keeps
//! one window, and a version-1 sender that sizes its replay by the first window and uses
//! no more, are both correct peers, so the format and its version stay 1.
//!
//! Decoding is done once, at the trust boundary: [`decode`] either returns a complete,
//! validated frame and the bytes it used, says it needs more bytes (`Ok(None)`, never more
//! than [`MAX_FRAME_LEN`] in all), or names what is wrong. What this module does not do:
//! decide what a frame means for a channel ([`super::endpoint`] does).

use thiserror::Error;

/// Bytes of the frame header.
pub const HEADER_LEN: usize = 12;
/// Largest DATA payload.
pub const MAX_DATA_LEN: usize = 64 << 10;
/// Largest body of any frame (a full DATA frame).
pub const MAX_BODY_LEN: usize = MAX_DATA_LEN + 8;
/// Largest frame.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_BODY_LEN;
/// Largest OPEN metadata.
pub const MAX_METADATA_LEN: usize = 4096;
/// Largest REFUSED text.
pub const MAX_REASON_TEXT_LEN: usize = 256;
/// Most channels one tunnel carries at once (and entries in a HELLO).
pub const MAX_CHANNELS: usize = 1024;
/// HELLO magic.
pub const MAGIC: &[u8; 4] = b"DSTN";
/// Wire version.
pub const VERSION: u16 = 1;
/// Bytes of one HELLO resume entry.
pub const RESUME_ENTRY_LEN: usize = 16;
const HELLO_FIXED_LEN: usize = 4 + 2 + 1 + 1 + 16 + 4;

/// Channel id within one tunnel. The host whose name sorts lower allocates even ids, the
/// other odd ones, so both may open at once without a collision; 0 is never a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u32);

/// A random id a tunnel endpoint picks when it starts: a changed one in HELLO means the
/// peer restarted and lost its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Incarnation(pub [u8; 16]);

/// Stream (bytes) or seqpacket (whole messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// A byte stream.
    Stream,
    /// Record boundaries are kept.
    SeqPacket,
}

impl ChannelKind {
    fn to_wire(self) -> u8 {
        match self {
            ChannelKind::Stream => 1,
            ChannelKind::SeqPacket => 2,
        }
    }
}

/// Why a peer refused an OPEN (REFUSED reason codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    /// The engine's policy says no.
    Policy = 1,
    /// Nothing listens at the place the metadata names.
    NoListener = 2,
    /// The tunnel carries [`MAX_CHANNELS`] already, or the engine is at its bound.
    TooMany = 3,
    /// The metadata is not understood.
    BadMetadata = 4,
    /// The tunnel is shutting down.
    ShuttingDown = 5,
}

impl RefusalCode {
    const ALL: [RefusalCode; 5] = [
        RefusalCode::Policy,
        RefusalCode::NoListener,
        RefusalCode::TooMany,
        RefusalCode::BadMetadata,
        RefusalCode::ShuttingDown,
    ];
    fn from_wire(v: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u16 == v)
    }
}

/// Why a channel was closed (CLOSE reason codes, and what [`super::ChannelState`] reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The other end closed it.
    Normal = 1,
    /// The peer broke the channel's protocol (credit overrun, offset gap); it was reset.
    ProtocolViolation = 2,
    /// The peer does not know the channel (after a resume).
    Unknown = 3,
    /// The peer's replay data does not reach back to what this end lacks.
    ResumeImpossible = 4,
    /// The other end gave the channel up without delivering what it carries (a relayed
    /// session its home could place nowhere).
    Aborted = 5,
}

impl CloseReason {
    const ALL: [CloseReason; 5] = [
        CloseReason::Normal,
        CloseReason::ProtocolViolation,
        CloseReason::Unknown,
        CloseReason::ResumeImpossible,
        CloseReason::Aborted,
    ];
    fn from_wire(v: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u16 == v)
    }
}

/// One HELLO entry: a channel the sender knows and how far it has received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeEntry {
    /// The channel.
    pub channel: ChannelId,
    /// The sender opened it and has had neither OPENED nor REFUSED.
    pub opening: bool,
    /// Bytes the sender has received on it.
    pub received: u64,
}

/// A decoded frame; DATA and metadata borrow the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// First frame each way on every TCP connection.
    Hello {
        /// The sender's host name (checked against its certificate by the runtime).
        host: String,
        /// The sender's incarnation.
        incarnation: Incarnation,
        /// Every channel the sender knows.
        resume: Vec<ResumeEntry>,
    },
    /// Opens `channel`.
    Open {
        /// The new channel (the sender's parity).
        channel: ChannelId,
        /// Stream or seqpacket.
        kind: ChannelKind,
        /// The opener's receive window.
        buf_alloc: u32,
        /// Opaque to the tunnel (the engine's address and policy data).
        metadata: &'a [u8],
    },
    /// The OPEN was accepted.
    Opened {
        /// The channel.
        channel: ChannelId,
        /// The acceptor's receive window.
        buf_alloc: u32,
    },
    /// The OPEN was refused; the channel id is free again.
    Refused {
        /// The channel.
        channel: ChannelId,
        /// Code.
        code: RefusalCode,
        /// Human-readable detail.
        text: &'a str,
    },
    /// Payload.
    Data {
        /// The channel.
        channel: ChannelId,
        /// Stream offset of `bytes[0]`.
        offset: u64,
        /// Last fragment of a seqpacket message.
        eor: bool,
        /// Payload.
        bytes: &'a [u8],
    },
    /// Flow control and acknowledgement.
    Credit {
        /// The channel.
        channel: ChannelId,
        /// Bytes the sender of CREDIT has received.
        received: u64,
        /// Bytes its engine has taken (the peer may forget them).
        consumed: u64,
        /// Its receive window.
        buf_alloc: u32,
    },
    /// Half-close.
    Shutdown {
        /// The channel.
        channel: ChannelId,
        /// The sender reads no more.
        rd: bool,
        /// The sender writes no more; `end` is its final offset.
        wr: bool,
        /// Final offset when `wr`.
        end: u64,
    },
    /// The channel is gone at the sender.
    Close {
        /// The channel.
        channel: ChannelId,
        /// Why.
        reason: CloseReason,
    },
    /// Keepalive probe.
    Ping {
        /// Echoed in PONG.
        nonce: u64,
    },
    /// Keepalive answer.
    Pong {
        /// The PING's nonce.
        nonce: u64,
    },
}

/// Why bytes are not a valid frame. Every variant carries what was seen.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Flags or reserved bytes set where they must be 0.
    #[error("reserved bits set in a frame of kind {kind}")]
    Reserved {
        /// Frame kind.
        kind: u8,
    },
    /// Body length impossible for the kind.
    #[error("frame of kind {kind} with body length {len} (allowed {min}..={max})")]
    BadLength {
        /// Frame kind.
        kind: u8,
        /// Declared length.
        len: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// A field has a value outside its range.
    #[error("bad {field} = {value} in a frame of kind {kind}")]
    BadValue {
        /// Frame kind.
        kind: u8,
        /// Which field.
        field: &'static str,
        /// What it held.
        value: u64,
    },
}

fn len_bounds(kind: u8) -> Option<(usize, usize)> {
    Some(match kind {
        1 => (
            HELLO_FIXED_LEN + 1,
            HELLO_FIXED_LEN + 255 + MAX_CHANNELS * RESUME_ENTRY_LEN,
        ),
        2 => (8, 8 + MAX_METADATA_LEN),
        3 => (8, 8),
        4 => (2, 2 + MAX_REASON_TEXT_LEN),
        5 => (9, 8 + MAX_DATA_LEN),
        6 => (24, 24),
        7 => (16, 16),
        8 => (4, 4),
        9 | 10 => (8, 8),
        _ => return None,
    })
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Whether a host name is acceptable: 1..=255 bytes of `a-z 0-9 . -`.
pub fn valid_host_name(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// The header's kind, flags, channel and body length, validated (`buf` holds at least
/// [`HEADER_LEN`] bytes).
fn check_header(buf: &[u8]) -> Result<(u8, u8, u32, u32), FrameError> {
    let kind = buf[0];
    let Some((min, max)) = len_bounds(kind) else {
        return Err(FrameError::UnknownKind(kind));
    };
    let flags = buf[1];
    if (kind == 5 && flags & !1 != 0) || (kind != 5 && flags != 0) || le16(&buf[2..]) != 0 {
        return Err(FrameError::Reserved { kind });
    }
    let channel = le32(&buf[4..]);
    let len = le32(&buf[8..]);
    if (len as usize) < min || len as usize > max {
        return Err(FrameError::BadLength {
            kind,
            len,
            min: min as u32,
            max: max as u32,
        });
    }
    let connection_level = matches!(kind, 1 | 9 | 10);
    if connection_level != (channel == 0) {
        return Err(FrameError::BadValue {
            kind,
            field: "channel",
            value: u64::from(channel),
        });
    }
    Ok((kind, flags, channel, len))
}

/// The front of a DATA frame: header and offset, validated as [`decode`] validates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataStart {
    /// The channel.
    pub channel: ChannelId,
    /// Stream offset of the first payload byte.
    pub offset: u64,
    /// Last fragment of a seqpacket message.
    pub eor: bool,
    /// Payload bytes that follow (1..=[`MAX_DATA_LEN`]).
    pub len: usize,
}

/// Bytes of a DATA frame before its payload (header and offset).
pub const DATA_PREFIX_LEN: usize = HEADER_LEN + 8;

/// If `buf` starts with a DATA frame, its [`DataStart`] once the first
/// [`DATA_PREFIX_LEN`] bytes are there (the payload need not be), so a receiver can take
/// the payload as it arrives instead of gathering the whole frame first. `Ok(None)`: not
/// DATA, or too few bytes yet (then [`decode`] is the way on). The same errors as
/// [`decode`] for a bad header.
pub fn decode_data_start(buf: &[u8]) -> Result<Option<DataStart>, FrameError> {
    if buf.len() < DATA_PREFIX_LEN || buf[0] != 5 {
        return Ok(None);
    }
    let (_, flags, channel, len) = check_header(buf)?;
    Ok(Some(DataStart {
        channel: ChannelId(channel),
        offset: le64(&buf[HEADER_LEN..]),
        eor: flags & 1 != 0,
        len: len as usize - 8,
    }))
}

/// Decodes one frame from the front of `buf`: `Ok(Some((frame, used)))`, `Ok(None)` when
/// more bytes are needed, or the first thing wrong.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        // The kind byte alone can already be wrong.
        if let Some(&k) = buf.first() {
            if len_bounds(k).is_none() {
                return Err(FrameError::UnknownKind(k));
            }
        }
        return Ok(None);
    }
    let (kind, flags, channel, len) = check_header(buf)?;
    let used = HEADER_LEN + len as usize;
    if buf.len() < used {
        return Ok(None);
    }
    let b = &buf[HEADER_LEN..used];
    let bad = |field, value: u64| FrameError::BadValue { kind, field, value };
    let reserved = |r: &[u8]| {
        if r.iter().any(|&x| x != 0) {
            Err(FrameError::Reserved { kind })
        } else {
            Ok(())
        }
    };
    let ch = ChannelId(channel);
    let frame = match kind {
        1 => {
            if &b[..4] != MAGIC {
                return Err(bad("magic", u64::from(le32(b))));
            }
            let version = le16(&b[4..]);
            if version != VERSION {
                return Err(bad("version", u64::from(version)));
            }
            let name_len = usize::from(b[6]);
            reserved(&b[7..8])?;
            let mut inc = [0u8; 16];
            inc.copy_from_slice(&b[8..24]);
            let count = le32(&b[24..]) as usize;
            if count > MAX_CHANNELS {
                return Err(bad("resume count", count as u64));
            }
            let want = HELLO_FIXED_LEN + name_len + count * RESUME_ENTRY_LEN;
            if want != b.len() {
                return Err(FrameError::BadLength {
                    kind,
                    len,
                    min: want as u32,
                    max: want as u32,
                });
            }
            let name = &b[HELLO_FIXED_LEN..HELLO_FIXED_LEN + name_len];
            let host = match std::str::from_utf8(name) {
                Ok(s) if valid_host_name(s) => s.to_owned(),
                _ => return Err(bad("host name length", name_len as u64)),
            };
            let mut resume = Vec::with_capacity(count);
            for e in b[HELLO_FIXED_LEN + name_len..].chunks_exact(RESUME_ENTRY_LEN) {
                let id = le32(e);
                if id == 0 {
                    return Err(bad("resume channel", 0));
                }
                if e[4] & !1 != 0 {
                    return Err(FrameError::Reserved { kind });
                }
                reserved(&e[5..8])?;
                resume.push(ResumeEntry {
                    channel: ChannelId(id),
                    opening: e[4] & 1 != 0,
                    received: le64(&e[8..]),
                });
            }
            Frame::Hello {
                host,
                incarnation: Incarnation(inc),
                resume,
            }
        }
        2 => {
            let kind_byte = b[0];
            reserved(&b[1..4])?;
            let k = match kind_byte {
                1 => ChannelKind::Stream,
                2 => ChannelKind::SeqPacket,
                v => return Err(bad("socket kind", u64::from(v))),
            };
            Frame::Open {
                channel: ch,
                kind: k,
                buf_alloc: le32(&b[4..]),
                metadata: &b[8..],
            }
        }
        3 => {
            reserved(&b[4..8])?;
            Frame::Opened {
                channel: ch,
                buf_alloc: le32(b),
            }
        }
        4 => {
            let v = le16(b);
            let code = RefusalCode::from_wire(v).ok_or(bad("refusal code", u64::from(v)))?;
            let text = std::str::from_utf8(&b[2..])
                .map_err(|e| bad("refusal text (invalid UTF-8 at)", e.valid_up_to() as u64))?;
            Frame::Refused {
                channel: ch,
                code,
                text,
            }
        }
        5 => Frame::Data {
            channel: ch,
            offset: le64(b),
            eor: flags & 1 != 0,
            bytes: &b[8..],
        },
        6 => {
            reserved(&b[20..24])?;
            Frame::Credit {
                channel: ch,
                received: le64(b),
                consumed: le64(&b[8..]),
                buf_alloc: le32(&b[16..]),
            }
        }
        7 => {
            if b[0] & !3 != 0 {
                return Err(FrameError::Reserved { kind });
            }
            reserved(&b[1..8])?;
            let wr = b[0] & 2 != 0;
            let end = le64(&b[8..]);
            if !wr && end != 0 {
                return Err(bad("end offset without wr", end));
            }
            Frame::Shutdown {
                channel: ch,
                rd: b[0] & 1 != 0,
                wr,
                end,
            }
        }
        8 => {
            reserved(&b[2..4])?;
            let v = le16(b);
            Frame::Close {
                channel: ch,
                reason: CloseReason::from_wire(v).ok_or(bad("close reason", u64::from(v)))?,
            }
        }
        9 => Frame::Ping { nonce: le64(b) },
        _ => Frame::Pong { nonce: le64(b) },
    };
    Ok(Some((frame, used)))
}

fn header(out: &mut Vec<u8>, kind: u8, flags: u8, channel: ChannelId, len: usize) {
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&channel.0.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

/// Appends a DATA frame whose payload is `a` then `b` (a ring buffer's two slices), so
/// payload is copied once. `a.len() + b.len()` must be at most [`MAX_DATA_LEN`].
pub fn encode_data(
    out: &mut Vec<u8>,
    channel: ChannelId,
    offset: u64,
    eor: bool,
    a: &[u8],
    b: &[u8],
) {
    debug_assert!(a.len() + b.len() <= MAX_DATA_LEN);
    out.extend_from_slice(&data_prefix(channel, offset, eor, a.len() + b.len()));
    out.extend_from_slice(a);
    out.extend_from_slice(b);
}

/// The first [`DATA_PREFIX_LEN`] bytes of a DATA frame carrying `len` payload bytes (at
/// most [`MAX_DATA_LEN`]), for a sender that writes the payload from where it lies.
pub fn data_prefix(
    channel: ChannelId,
    offset: u64,
    eor: bool,
    len: usize,
) -> [u8; DATA_PREFIX_LEN] {
    debug_assert!(len <= MAX_DATA_LEN);
    let mut p = [0u8; DATA_PREFIX_LEN];
    p[0] = 5;
    p[1] = u8::from(eor);
    p[4..8].copy_from_slice(&channel.0.to_le_bytes());
    p[8..12].copy_from_slice(&((8 + len) as u32).to_le_bytes());
    p[12..20].copy_from_slice(&offset.to_le_bytes());
    p
}

impl Frame<'_> {
    /// Appends the encoding. Lengths beyond the limits are truncated to them (callers
    /// check first; the endpoint never builds such a frame).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello {
                host,
                incarnation,
                resume,
            } => {
                let name = &host.as_bytes()[..host.len().min(255)];
                let resume = &resume[..resume.len().min(MAX_CHANNELS)];
                let len = HELLO_FIXED_LEN + name.len() + resume.len() * RESUME_ENTRY_LEN;
                header(out, 1, 0, ChannelId(0), len);
                out.extend_from_slice(MAGIC);
                out.extend_from_slice(&VERSION.to_le_bytes());
                out.push(name.len() as u8);
                out.push(0);
                out.extend_from_slice(&incarnation.0);
                out.extend_from_slice(&(resume.len() as u32).to_le_bytes());
                out.extend_from_slice(name);
                for e in resume {
                    out.extend_from_slice(&e.channel.0.to_le_bytes());
                    out.extend_from_slice(&[u8::from(e.opening), 0, 0, 0]);
                    out.extend_from_slice(&e.received.to_le_bytes());
                }
            }
            Frame::Open {
                channel,
                kind,
                buf_alloc,
                metadata,
            } => {
                let m = &metadata[..metadata.len().min(MAX_METADATA_LEN)];
                header(out, 2, 0, *channel, 8 + m.len());
                out.extend_from_slice(&[kind.to_wire(), 0, 0, 0]);
                out.extend_from_slice(&buf_alloc.to_le_bytes());
                out.extend_from_slice(m);
            }
            Frame::Opened { channel, buf_alloc } => {
                header(out, 3, 0, *channel, 8);
                out.extend_from_slice(&buf_alloc.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
            }
            Frame::Refused {
                channel,
                code,
                text,
            } => {
                let mut n = text.len().min(MAX_REASON_TEXT_LEN);
                while !text.is_char_boundary(n) {
                    n -= 1;
                }
                header(out, 4, 0, *channel, 2 + n);
                out.extend_from_slice(&(*code as u16).to_le_bytes());
                out.extend_from_slice(&text.as_bytes()[..n]);
            }
            Frame::Data {
                channel,
                offset,
                eor,
                bytes,
            } => {
                let n = bytes.len().min(MAX_DATA_LEN);
                encode_data(out, *channel, *offset, *eor, &bytes[..n], &[]);
            }
            Frame::Credit {
                channel,
                received,
                consumed,
                buf_alloc,
            } => {
                header(out, 6, 0, *channel, 24);
                out.extend_from_slice(&received.to_le_bytes());
                out.extend_from_slice(&consumed.to_le_bytes());
                out.extend_from_slice(&buf_alloc.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
            }
            Frame::Shutdown {
                channel,
                rd,
                wr,
                end,
            } => {
                header(out, 7, 0, *channel, 16);
                out.push(u8::from(*rd) | u8::from(*wr) << 1);
                out.extend_from_slice(&[0; 7]);
                out.extend_from_slice(&(if *wr { *end } else { 0 }).to_le_bytes());
            }
            Frame::Close { channel, reason } => {
                header(out, 8, 0, *channel, 4);
                out.extend_from_slice(&(*reason as u16).to_le_bytes());
                out.extend_from_slice(&[0; 2]);
            }
            Frame::Ping { nonce } => {
                header(out, 9, 0, ChannelId(0), 8);
                out.extend_from_slice(&nonce.to_le_bytes());
            }
            Frame::Pong { nonce } => {
                header(out, 10, 0, ChannelId(0), 8);
                out.extend_from_slice(&nonce.to_le_bytes());
            }
        }
    }

    /// The encoding as a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame<'static>> {
        vec![
            Frame::Hello {
                host: "host-a.lab".into(),
                incarnation: Incarnation([7; 16]),
                resume: vec![
                    ResumeEntry {
                        channel: ChannelId(2),
                        opening: false,
                        received: u64::MAX - 1,
                    },
                    ResumeEntry {
                        channel: ChannelId(5),
                        opening: true,
                        received: 0,
                    },
                ],
            },
            Frame::Open {
                channel: ChannelId(3),
                kind: ChannelKind::SeqPacket,
                buf_alloc: 1 << 20,
                metadata: b"port=5000",
            },
            Frame::Opened {
                channel: ChannelId(3),
                buf_alloc: 4096,
            },
            Frame::Refused {
                channel: ChannelId(3),
                code: RefusalCode::Policy,
                text: "denied by policy",
            },
            Frame::Data {
                channel: ChannelId(4),
                offset: 1 << 40,
                eor: true,
                bytes: b"hello",
            },
            Frame::Credit {
                channel: ChannelId(4),
                received: 100,
                consumed: 50,
                buf_alloc: 65536,
            },
            Frame::Shutdown {
                channel: ChannelId(4),
                rd: true,
                wr: true,
                end: 77,
            },
            Frame::Close {
                channel: ChannelId(4),
                reason: CloseReason::ResumeImpossible,
            },
            Frame::Ping { nonce: 42 },
            Frame::Pong { nonce: 42 },
        ]
    }

    #[test]
    fn every_frame_roundtrips_and_every_prefix_needs_more() {
        for f in samples() {
            let b = f.to_vec();
            assert_eq!(decode(&b), Ok(Some((f.clone(), b.len()))), "{f:?}");
            for cut in 0..b.len() {
                assert_eq!(decode(&b[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
            let mut more = b.clone();
            more.extend_from_slice(&[9, 9, 9]);
            assert_eq!(decode(&more), Ok(Some((f.clone(), b.len()))));
        }
    }

    #[test]
    fn a_data_start_is_known_from_the_prefix_and_checked_like_the_frame() {
        let payload: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let f = Frame::Data {
            channel: ChannelId(3),
            offset: 0x1_0000_0002,
            eor: true,
            bytes: &payload,
        };
        let b = f.to_vec();
        let want = DataStart {
            channel: ChannelId(3),
            offset: 0x1_0000_0002,
            eor: true,
            len: 300,
        };
        for cut in 0..b.len() {
            let got = decode_data_start(&b[..cut]);
            if cut < DATA_PREFIX_LEN {
                assert_eq!(got, Ok(None), "cut at {cut}");
            } else {
                assert_eq!(got, Ok(Some(want)), "cut at {cut}");
            }
        }
        // The prefix a sender builds is the frame's own.
        let mut built = data_prefix(ChannelId(3), 0x1_0000_0002, true, 300).to_vec();
        built.extend_from_slice(&payload);
        assert_eq!(built, b);
        // Other kinds are not DATA; a bad DATA header is refused as `decode` refuses it.
        let credit = Frame::Credit {
            channel: ChannelId(3),
            received: 1,
            consumed: 1,
            buf_alloc: 1,
        };
        assert_eq!(decode_data_start(&credit.to_vec()), Ok(None));
        let mut bad = b.clone();
        bad[1] = 2;
        assert_eq!(
            decode_data_start(&bad),
            Err(FrameError::Reserved { kind: 5 })
        );
        let mut bad = b.clone();
        bad[8..12].copy_from_slice(&((MAX_BODY_LEN + 1) as u32).to_le_bytes());
        assert!(matches!(
            decode_data_start(&bad),
            Err(FrameError::BadLength { .. })
        ));
        let mut bad = b.clone();
        bad[4..8].copy_from_slice(&[0; 4]);
        assert!(matches!(
            decode_data_start(&bad),
            Err(FrameError::BadValue {
                field: "channel",
                ..
            })
        ));
    }

    /// The version-1 bytes of two frames, as the diagram lays them out.
    #[test]
    fn golden_bytes() {
        let credit = Frame::Credit {
            channel: ChannelId(4),
            received: 0x0102,
            consumed: 3,
            buf_alloc: 0x10000,
        };
        #[rustfmt::skip]
        let want = [
            6, 0, 0, 0, 4, 0, 0, 0, 24, 0, 0, 0,
            2, 1, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0,
        ];
        assert_eq!(credit.to_vec(), want);
        let data = Frame::Data {
            channel: ChannelId(1),
            offset: 5,
            eor: true,
            bytes: b"ab",
        };
        assert_eq!(
            data.to_vec(),
            [5, 1, 0, 0, 1, 0, 0, 0, 10, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']
        );
    }

    #[test]
    fn hostile_bytes_are_named() {
        assert_eq!(decode(&[0]), Err(FrameError::UnknownKind(0)));
        assert_eq!(decode(&[11; 12]), Err(FrameError::UnknownKind(11)));
        let mut b = Frame::Ping { nonce: 1 }.to_vec();
        b[1] = 1;
        assert_eq!(decode(&b), Err(FrameError::Reserved { kind: 9 }));
        let mut b = Frame::Ping { nonce: 1 }.to_vec();
        b[4] = 1;
        assert!(matches!(
            decode(&b),
            Err(FrameError::BadValue {
                field: "channel",
                ..
            })
        ));
        // A DATA frame longer than the maximum is refused from its header alone.
        let mut b = vec![5, 0, 0, 0, 1, 0, 0, 0];
        b.extend_from_slice(&((MAX_BODY_LEN + 1) as u32).to_le_bytes());
        assert!(matches!(decode(&b), Err(FrameError::BadLength { .. })));
        let mut b = Frame::Close {
            channel: ChannelId(1),
            reason: CloseReason::Normal,
        }
        .to_vec();
        b[12] = 99;
        assert!(matches!(
            decode(&b),
            Err(FrameError::BadValue {
                field: "close reason",
                value: 99,
                ..
            })
        ));
        let mut b = samples()[0].to_vec();
        b[12] = b'X';
        assert!(matches!(
            decode(&b),
            Err(FrameError::BadValue { field: "magic", .. })
        ));
        let mut b = samples()[0].to_vec();
        b[12 + HELLO_FIXED_LEN] = b'A'; // upper case is not a host name
        assert!(matches!(decode(&b), Err(FrameError::BadValue { .. })));
        let b = Frame::Data {
            channel: ChannelId(1),
            offset: 0,
            eor: false,
            bytes: b"",
        }
        .to_vec();
        assert!(decode(&b).is_err());
    }
}
