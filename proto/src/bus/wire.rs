//! The bus frames of [wire format version 1](super#wire-format-version-1): types, codec
//! and bounds.
//!
//! Decoding borrows from the received message (payloads, topics and addresses are slices
//! of it) and validates every field once: lengths against the frame and the bounds below,
//! names, flag bits, enum values, trailing bytes. Encoding appends to a caller's `Vec`;
//! [`encode_message_head`] writes a MESSAGE without its payload, so a fan-out can send the
//! head and the publisher's payload as two parts of one message and never copy the payload
//! on the heap.

use std::fmt;
use thiserror::Error;

/// The wire format's version.
pub const VERSION: u8 = 1;
/// Bytes of the common frame header (version, kind, flags).
pub const HEADER_LEN: usize = 4;
/// Longest bus name.
pub const MAX_NAME_BYTES: usize = crate::control::MAX_NAME_BYTES;
/// Longest switch address.
pub const MAX_ADDR_BYTES: usize = 16;
/// Longest topic, and longest subscription prefix.
pub const MAX_TOPIC_BYTES: usize = 255;
/// Length of a membership token.
pub const TOKEN_LEN: usize = 16;
/// Longest REFUSED or ERROR text.
pub const MAX_TEXT_BYTES: usize = 255;
/// A bus's maximum message size unless it was created with another.
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 64 << 10;
/// The largest maximum message size a bus may be created with.
pub const MAX_MESSAGE_LIMIT_BYTES: u32 = 1 << 20;
/// Bytes of a MESSAGE before its fields: header, sender, seq.
pub const MESSAGE_FIXED_LEN: usize = HEADER_LEN + 4 + 8;
/// Longest field block of a PUBLISH or MESSAGE (both addresses; a topic is shorter).
pub const MAX_FIELDS_LEN: usize = 2 * (1 + MAX_ADDR_BYTES);

/// The longest frame on a bus whose maximum message size is `max_message`: a MESSAGE with
/// the longest field block and payload. A receive buffer of this size never truncates.
pub const fn max_frame_len(max_message: u32) -> usize {
    let topic = 1 + MAX_TOPIC_BYTES;
    let fields = if topic > MAX_FIELDS_LEN {
        topic
    } else {
        MAX_FIELDS_LEN
    };
    MESSAGE_FIXED_LEN + fields + max_message as usize
}

const FLAG_CREATE: u16 = 1 << 0;
const FLAG_ADDRESSED: u16 = 1 << 1;
const FLAG_TOPIC: u16 = 1 << 2;
/// JOIN: the member takes BATCH frames.
const FLAG_BATCHES: u16 = 1 << 3;

/// Bytes of a BATCH entry's length prefix.
pub const BATCH_ENTRY_PREFIX: usize = 4;
/// Most MESSAGEs one BATCH carries.
pub const MAX_BATCH_FRAMES: usize = 256;
/// Longest BATCH a service sends (never longer than the bus's longest frame, so a member's
/// receive buffer for one MESSAGE takes any BATCH whole).
pub const MAX_BATCH_BYTES: usize = 32 << 10;

/// The longest BATCH on a bus whose maximum message size is `max_message`.
pub const fn max_batch_len(max_message: u32) -> usize {
    let frame = max_frame_len(max_message);
    if frame < MAX_BATCH_BYTES {
        frame
    } else {
        MAX_BATCH_BYTES
    }
}

/// Frame kinds.
mod kind {
    pub const JOIN: u8 = 0x01;
    pub const REJOIN: u8 = 0x02;
    pub const PUBLISH: u8 = 0x03;
    pub const SUBSCRIBE: u8 = 0x04;
    pub const UNSUBSCRIBE: u8 = 0x05;
    pub const LEAVE: u8 = 0x06;
    pub const JOINED: u8 = 0x81;
    pub const REFUSED: u8 = 0x82;
    pub const MESSAGE: u8 = 0x83;
    pub const LOSS: u8 = 0x84;
    pub const ERROR: u8 = 0x85;
    pub const SUBSCRIBED: u8 = 0x86;
    pub const BATCH: u8 = 0x87;
}

/// Who receives a bus's messages (see [the module doc](super#delivery)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Every receiving member but the sender.
    Hub,
    /// Learned unicast, flooded unknown and broadcast destinations.
    Switch,
    /// Members whose subscribed prefixes match the topic.
    Topic,
}

impl Policy {
    fn to_wire(self) -> u8 {
        match self {
            Policy::Hub => 0,
            Policy::Switch => 1,
            Policy::Topic => 2,
        }
    }

    fn from_wire(b: u8) -> Result<Self, WireError> {
        match b {
            0 => Ok(Policy::Hub),
            1 => Ok(Policy::Switch),
            2 => Ok(Policy::Topic),
            other => Err(WireError::BadValue {
                field: "policy",
                value: other.into(),
            }),
        }
    }

    /// The field flags a PUBLISH or MESSAGE on a bus of this policy carries.
    fn field_flags(self) -> u16 {
        match self {
            Policy::Hub => 0,
            Policy::Switch => FLAG_ADDRESSED,
            Policy::Topic => FLAG_TOPIC,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Hub => "hub",
            Policy::Switch => "switch",
            Policy::Topic => "topic",
        })
    }
}

/// What happens to a message that does not fit a member's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlowPolicy {
    /// Dropped for that member, counted and told by the next LOSS.
    Drop,
    /// The member's membership ends.
    Disconnect,
}

impl SlowPolicy {
    fn to_wire(self) -> u8 {
        match self {
            SlowPolicy::Drop => 0,
            SlowPolicy::Disconnect => 1,
        }
    }

    fn from_wire(b: u8) -> Result<Self, WireError> {
        match b {
            0 => Ok(SlowPolicy::Drop),
            1 => Ok(SlowPolicy::Disconnect),
            other => Err(WireError::BadValue {
                field: "slow",
                value: other.into(),
            }),
        }
    }
}

/// What a member asks for, or was granted: publishing, receiving, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Want {
    /// May send PUBLISH.
    pub publish: bool,
    /// Is sent MESSAGEs.
    pub receive: bool,
}

impl Want {
    /// Publish and receive.
    pub const BOTH: Want = Want {
        publish: true,
        receive: true,
    };

    fn to_wire(self) -> u8 {
        u8::from(self.publish) | (u8::from(self.receive) << 1)
    }

    fn from_wire(b: u8, field: &'static str) -> Result<Self, WireError> {
        if b & !0b11 != 0 {
            return Err(WireError::BadValue {
                field,
                value: b.into(),
            });
        }
        Ok(Want {
            publish: b & 1 != 0,
            receive: b & 2 != 0,
        })
    }
}

/// A bus name: 1 to [`MAX_NAME_BYTES`] bytes of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BusName(String);

impl BusName {
    /// `name` if it is a valid bus name.
    pub fn new(name: &str) -> Option<BusName> {
        crate::control::valid_name(name).then(|| BusName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BusName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A member's number on its bus, unique among the bus's members while it is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberId(pub u32);

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "member {}", self.0)
    }
}

/// The secret that lets a member REJOIN its membership (random, from the service).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; TOKEN_LEN]);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A token is a credential: never printed whole.
        write!(f, "Token({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

/// The parameters a JOIN that may create its bus gives for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateParams {
    /// Delivery policy.
    pub policy: Policy,
    /// What happens to a message that does not fit a member's queue.
    pub slow: SlowPolicy,
    /// Largest payload of one message, 1..=[`MAX_MESSAGE_LIMIT_BYTES`].
    pub max_message: u32,
    /// Bytes each member's queue holds at most; at least `max_message`.
    pub queue_bytes: u32,
}

/// The policy fields of a PUBLISH or MESSAGE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields<'a> {
    /// A hub bus: none.
    None,
    /// A switch bus: source and destination address, 1..=[`MAX_ADDR_BYTES`] each.
    Addressed {
        /// The sender's address (learned by the bus).
        src: &'a [u8],
        /// Where it goes; all `0xFF` is broadcast.
        dst: &'a [u8],
    },
    /// A topic bus: 1..=[`MAX_TOPIC_BYTES`] bytes.
    Topic(&'a [u8]),
}

impl Fields<'_> {
    fn flags(&self) -> u16 {
        match self {
            Fields::None => 0,
            Fields::Addressed { .. } => FLAG_ADDRESSED,
            Fields::Topic(_) => FLAG_TOPIC,
        }
    }

    /// Whether these are the fields a bus of `policy` carries.
    pub fn fit(&self, policy: Policy) -> bool {
        self.flags() == policy.field_flags()
    }

    fn encoded_len(&self) -> usize {
        match self {
            Fields::None => 0,
            Fields::Addressed { src, dst } => 2 + src.len() + dst.len(),
            Fields::Topic(t) => 1 + t.len(),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Fields::None => {}
            Fields::Addressed { src, dst } => {
                push_short(out, src);
                push_short(out, dst);
            }
            Fields::Topic(t) => push_short(out, t),
        }
    }

    fn decode<'a>(flags: u16, r: &mut Reader<'a>) -> Result<Fields<'a>, WireError> {
        match flags & (FLAG_ADDRESSED | FLAG_TOPIC) {
            0 => Ok(Fields::None),
            FLAG_ADDRESSED => {
                let src = r.short("source address", 1, MAX_ADDR_BYTES)?;
                let dst = r.short("destination address", 1, MAX_ADDR_BYTES)?;
                Ok(Fields::Addressed { src, dst })
            }
            FLAG_TOPIC => Ok(Fields::Topic(r.short("topic", 1, MAX_TOPIC_BYTES)?)),
            _ => Err(WireError::BadFlags {
                kind: kind::PUBLISH,
                flags,
            }),
        }
    }
}

/// Whether `dst` is the broadcast address (all `0xFF`).
pub fn is_broadcast(dst: &[u8]) -> bool {
    !dst.is_empty() && dst.iter().all(|&b| b == 0xFF)
}

/// Why a join failed (REFUSED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    /// The frame's version is not 1.
    Version,
    /// The JOIN or REJOIN did not decode.
    Malformed,
    /// No such bus in the member's namespace (and the JOIN did not create one).
    NoSuchBus,
    /// The policy does not let this domain join (or create) the bus.
    Denied,
    /// The JOIN's create parameters differ from the existing bus's.
    Mismatch,
    /// The bus has its maximum number of members.
    Full,
    /// The REJOIN's token names no parked membership.
    UnknownToken,
    /// A code this version does not know.
    Other(u16),
}

impl RefuseCode {
    fn to_wire(self) -> u16 {
        match self {
            RefuseCode::Version => 1,
            RefuseCode::Malformed => 2,
            RefuseCode::NoSuchBus => 3,
            RefuseCode::Denied => 4,
            RefuseCode::Mismatch => 5,
            RefuseCode::Full => 6,
            RefuseCode::UnknownToken => 7,
            RefuseCode::Other(c) => c,
        }
    }

    fn from_wire(c: u16) -> Self {
        match c {
            1 => RefuseCode::Version,
            2 => RefuseCode::Malformed,
            3 => RefuseCode::NoSuchBus,
            4 => RefuseCode::Denied,
            5 => RefuseCode::Mismatch,
            6 => RefuseCode::Full,
            7 => RefuseCode::UnknownToken,
            c => RefuseCode::Other(c),
        }
    }
}

/// Why one request failed (ERROR); the membership stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A PUBLISH without publish permission, or a SUBSCRIBE without receive permission.
    NotPermitted,
    /// A payload larger than the bus's maximum message size.
    TooLarge,
    /// A PUBLISH whose fields are not the bus policy's.
    Fields,
    /// A SUBSCRIBE beyond the per-member subscription bound.
    TooManySubscriptions,
    /// A request that did not decode.
    Malformed,
    /// A request other than JOIN or REJOIN before the membership stood.
    NotJoined,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    fn to_wire(self) -> u16 {
        match self {
            ErrorCode::NotPermitted => 1,
            ErrorCode::TooLarge => 2,
            ErrorCode::Fields => 3,
            ErrorCode::TooManySubscriptions => 4,
            ErrorCode::Malformed => 5,
            ErrorCode::NotJoined => 6,
            ErrorCode::Other(c) => c,
        }
    }

    fn from_wire(c: u16) -> Self {
        match c {
            1 => ErrorCode::NotPermitted,
            2 => ErrorCode::TooLarge,
            3 => ErrorCode::Fields,
            4 => ErrorCode::TooManySubscriptions,
            5 => ErrorCode::Malformed,
            6 => ErrorCode::NotJoined,
            c => ErrorCode::Other(c),
        }
    }
}

/// A frame a member sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberFrame<'a> {
    /// Join the bus `name` (creating it with `create` if it does not exist).
    Join {
        /// The bus.
        name: BusName,
        /// What the member asks to do.
        want: Want,
        /// Parameters to create the bus with, if it may be created.
        create: Option<CreateParams>,
        /// The member takes BATCH frames (the membership keeps this across REJOINs).
        batches: bool,
    },
    /// Take back a parked membership.
    Rejoin(Token),
    /// A message for the bus.
    Publish {
        /// The policy's fields.
        fields: Fields<'a>,
        /// The message.
        payload: &'a [u8],
    },
    /// Receive messages whose topic starts with this prefix.
    Subscribe(&'a [u8]),
    /// Stop receiving by this prefix.
    Unsubscribe(&'a [u8]),
    /// End the membership.
    Leave,
}

/// The JOINED answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// The member's number.
    pub member: MemberId,
    /// The bus's delivery policy.
    pub policy: Policy,
    /// The bus's slow-member policy.
    pub slow: SlowPolicy,
    /// What the member may do (at most what it asked for).
    pub granted: Want,
    /// Largest payload of one message.
    pub max_message: u32,
    /// The member's queue bound.
    pub queue_bytes: u32,
    /// The REJOIN token.
    pub token: Token,
    /// Messages dropped for the member while it was parked (0 on a first JOIN).
    pub lost: u64,
}

/// A frame the bus service sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceFrame<'a> {
    /// The membership stands.
    Joined(Joined),
    /// The join failed; the service closes.
    Refused {
        /// Why.
        code: RefuseCode,
        /// For people.
        text: &'a str,
    },
    /// A message from another member.
    Message {
        /// Who published it.
        sender: MemberId,
        /// The sender's publish count on this bus, from 1.
        seq: u64,
        /// The sender's policy fields.
        fields: Fields<'a>,
        /// The message.
        payload: &'a [u8],
    },
    /// Dropped for this member since the last LOSS.
    Loss {
        /// Messages.
        messages: u64,
        /// Their payload bytes.
        bytes: u64,
    },
    /// One request failed.
    Error {
        /// Why.
        code: ErrorCode,
        /// For people.
        text: &'a str,
    },
    /// A subscription change is in force.
    Subscribed {
        /// Subscribed (true) or unsubscribed.
        subscribe: bool,
        /// The prefix.
        prefix: &'a [u8],
    },
    /// Several MESSAGEs in one frame (to a member that asked for them at JOIN), each
    /// checked as a MESSAGE when the BATCH was decoded.
    Batch(Batch<'a>),
}

/// The MESSAGEs of a BATCH, in order: 2..=[`MAX_BATCH_FRAMES`] entries of a `u32` length
/// and a whole MESSAGE frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch<'a> {
    entries: &'a [u8],
    count: usize,
}

impl<'a> Batch<'a> {
    /// How many MESSAGEs it carries.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Never: a BATCH carries at least two.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each MESSAGE's frame bytes, in order (decode each with [`ServiceFrame::decode`]:
    /// it is a valid MESSAGE).
    pub fn frames(&self) -> BatchFrames<'a> {
        BatchFrames { rest: self.entries }
    }

    fn parse(entries: &'a [u8]) -> Result<Batch<'a>, WireError> {
        let mut count = 0;
        let mut rest = entries;
        while !rest.is_empty() {
            let mut r = Reader { buf: rest };
            let len = r.u32("batch entry length")? as usize;
            if len < MESSAGE_FIXED_LEN {
                return Err(WireError::BadLength {
                    what: "batch entry",
                    len,
                    min: MESSAGE_FIXED_LEN,
                    max: rest.len() - BATCH_ENTRY_PREFIX,
                });
            }
            let frame = r.take("batch entry", len)?;
            match ServiceFrame::decode(frame)? {
                ServiceFrame::Message { .. } => {}
                _ => return Err(WireError::BatchEntry(frame[1])),
            }
            count += 1;
            if count > MAX_BATCH_FRAMES {
                return Err(WireError::BadLength {
                    what: "batch",
                    len: count,
                    min: 2,
                    max: MAX_BATCH_FRAMES,
                });
            }
            rest = r.rest();
        }
        if count < 2 {
            return Err(WireError::BadLength {
                what: "batch",
                len: count,
                min: 2,
                max: MAX_BATCH_FRAMES,
            });
        }
        Ok(Batch { entries, count })
    }
}

/// Iterator over the MESSAGE frames of a [`Batch`].
#[derive(Debug, Clone)]
pub struct BatchFrames<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for BatchFrames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let frame = batch_entry_at(self.rest, 0)?;
        let (rest, end) = (self.rest, frame.end);
        self.rest = &rest[end..];
        Some(&rest[frame])
    }
}

/// Where the frame of the BATCH entry that starts at `at` of `entries` lies (its bytes
/// after the length prefix), or `None` past the last entry or for an entry cut short.
/// For readers that keep offsets into their own buffer rather than borrow it
/// ([`BatchFrames`] is the borrowing one); `entries` is what follows the BATCH header.
pub fn batch_entry_at(entries: &[u8], at: usize) -> Option<std::ops::Range<usize>> {
    let start = at.checked_add(BATCH_ENTRY_PREFIX)?;
    let prefix = entries.get(at..start)?;
    let len = u32::from_le_bytes(prefix.try_into().ok()?) as usize;
    let end = start.checked_add(len).filter(|&e| e <= entries.len())?;
    Some(start..end)
}

/// The header of a BATCH, to be followed by its entries ([`batch_entry_prefix`] and a
/// MESSAGE frame each): a fan-out sends the header, the prefixes and the queued frames
/// as the parts of one seqpacket message.
pub fn batch_header() -> [u8; HEADER_LEN] {
    [VERSION, kind::BATCH, 0, 0]
}

/// The length prefix of a BATCH entry for a frame of `len` bytes.
pub fn batch_entry_prefix(len: usize) -> [u8; BATCH_ENTRY_PREFIX] {
    (len as u32).to_le_bytes()
}

/// A frame that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Shorter than its fixed part or a length it announced.
    #[error("{what}: needs {need} bytes, {have} left")]
    Truncated {
        /// The part that is cut off.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes there are.
        have: usize,
    },
    /// A version other than [`VERSION`].
    #[error("bus wire version {0}, this side speaks {VERSION}")]
    Version(u8),
    /// A kind this direction does not send.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A BATCH entry that is not a MESSAGE.
    #[error("a batch carries MESSAGEs only, not kind {0:#04x}")]
    BatchEntry(u8),
    /// Flag bits the kind does not define, or a combination that makes no sense.
    #[error("flags {flags:#06x} not valid on kind {kind:#04x}")]
    BadFlags {
        /// The kind.
        kind: u8,
        /// The flags.
        flags: u16,
    },
    /// A length outside its bounds.
    #[error("{what} of {len} bytes, allowed {min}..={max}")]
    BadLength {
        /// The field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// Shortest allowed.
        min: usize,
        /// Longest allowed.
        max: usize,
    },
    /// An enum or bit field with a value this version does not define.
    #[error("{field} = {value} is not defined")]
    BadValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A bus name that is not 1..=64 bytes of `[A-Za-z0-9._-]`.
    #[error("bus name {0:?} is not a valid name")]
    BadName(String),
    /// Text that is not UTF-8.
    #[error("{0} is not UTF-8")]
    BadText(&'static str),
    /// Bytes after the end of a kind that has no payload.
    #[error("{extra} bytes after the end of frame kind {kind:#04x}")]
    Trailing {
        /// The kind.
        kind: u8,
        /// How many.
        extra: usize,
    },
}

/// Reads fields off a frame, checking each length against what is left.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                what,
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(what, 1)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(what, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(what, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let b = self.take(what, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A `len u8` and that many bytes, the length within `min..=max`.
    fn short(&mut self, what: &'static str, min: usize, max: usize) -> Result<&'a [u8], WireError> {
        let len = usize::from(self.u8(what)?);
        if len < min || len > max {
            return Err(WireError::BadLength {
                what,
                len,
                min,
                max,
            });
        }
        self.take(what, len)
    }

    fn text(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        let b = self.short(what, 0, MAX_TEXT_BYTES)?;
        std::str::from_utf8(b).map_err(|_| WireError::BadText(what))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn end(&self, kind: u8) -> Result<(), WireError> {
        match self.buf.len() {
            0 => Ok(()),
            extra => Err(WireError::Trailing { kind, extra }),
        }
    }
}

/// Splits the common header off `frame`: (kind, flags, body).
fn header(frame: &[u8]) -> Result<(u8, u16, Reader<'_>), WireError> {
    let mut r = Reader { buf: frame };
    let version = r.u8("header")?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = r.u8("header")?;
    let flags = r.u16("header")?;
    Ok((kind, flags, r))
}

fn check_flags(kind: u8, flags: u16, allowed: u16) -> Result<(), WireError> {
    match flags & !allowed {
        0 => Ok(()),
        _ => Err(WireError::BadFlags { kind, flags }),
    }
}

fn push_header(out: &mut Vec<u8>, kind: u8, flags: u16) {
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&flags.to_le_bytes());
}

/// Appends `len u8` and `b`. Callers pass fields whose bound is at most 255 bytes.
fn push_short(out: &mut Vec<u8>, b: &[u8]) {
    let len = u8::try_from(b.len()).unwrap_or(u8::MAX);
    out.push(len);
    out.extend_from_slice(&b[..usize::from(len)]);
}

fn push_text(out: &mut Vec<u8>, text: &str) {
    // Cut at a character boundary within the bound, so the text stays UTF-8.
    let mut end = text.len().min(MAX_TEXT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    push_short(out, &text.as_bytes()[..end]);
}

impl CreateParams {
    /// Checks the bounds of a bus's parameters.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.max_message == 0 || self.max_message > MAX_MESSAGE_LIMIT_BYTES {
            return Err(WireError::BadLength {
                what: "max_message",
                len: self.max_message as usize,
                min: 1,
                max: MAX_MESSAGE_LIMIT_BYTES as usize,
            });
        }
        if self.queue_bytes < self.max_message {
            return Err(WireError::BadLength {
                what: "queue_bytes",
                len: self.queue_bytes as usize,
                min: self.max_message as usize,
                max: u32::MAX as usize,
            });
        }
        Ok(())
    }
}

impl<'a> MemberFrame<'a> {
    /// Decodes one received message.
    pub fn decode(frame: &'a [u8]) -> Result<MemberFrame<'a>, WireError> {
        let (k, flags, mut r) = header(frame)?;
        let f = match k {
            kind::JOIN => {
                check_flags(k, flags, FLAG_CREATE | FLAG_BATCHES)?;
                let raw = r.short("bus name", 1, MAX_NAME_BYTES)?;
                let name = std::str::from_utf8(raw)
                    .ok()
                    .and_then(BusName::new)
                    .ok_or_else(|| WireError::BadName(String::from_utf8_lossy(raw).into()))?;
                let want = Want::from_wire(r.u8("want")?, "want")?;
                let create = match flags & FLAG_CREATE {
                    0 => None,
                    _ => {
                        let p = CreateParams {
                            policy: Policy::from_wire(r.u8("policy")?)?,
                            slow: SlowPolicy::from_wire(r.u8("slow")?)?,
                            max_message: r.u32("max_message")?,
                            queue_bytes: r.u32("queue_bytes")?,
                        };
                        p.validate()?;
                        Some(p)
                    }
                };
                r.end(k)?;
                MemberFrame::Join {
                    name,
                    want,
                    create,
                    batches: flags & FLAG_BATCHES != 0,
                }
            }
            kind::REJOIN => {
                check_flags(k, flags, 0)?;
                let mut t = [0u8; TOKEN_LEN];
                t.copy_from_slice(r.take("token", TOKEN_LEN)?);
                r.end(k)?;
                MemberFrame::Rejoin(Token(t))
            }
            kind::PUBLISH => {
                check_flags(k, flags, FLAG_ADDRESSED | FLAG_TOPIC)?;
                let fields = Fields::decode(flags, &mut r)?;
                MemberFrame::Publish {
                    fields,
                    payload: r.rest(),
                }
            }
            kind::SUBSCRIBE | kind::UNSUBSCRIBE => {
                check_flags(k, flags, 0)?;
                let prefix = r.rest();
                if prefix.len() > MAX_TOPIC_BYTES {
                    return Err(WireError::BadLength {
                        what: "prefix",
                        len: prefix.len(),
                        min: 0,
                        max: MAX_TOPIC_BYTES,
                    });
                }
                match k {
                    kind::SUBSCRIBE => MemberFrame::Subscribe(prefix),
                    _ => MemberFrame::Unsubscribe(prefix),
                }
            }
            kind::LEAVE => {
                check_flags(k, flags, 0)?;
                r.end(k)?;
                MemberFrame::Leave
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        Ok(f)
    }

    /// Appends the frame to `out`. Fields longer than their bound are cut to it (a caller
    /// that builds frames from its own validated values never hits that).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            MemberFrame::Join {
                name,
                want,
                create,
                batches,
            } => {
                let mut flags = if create.is_some() { FLAG_CREATE } else { 0 };
                if *batches {
                    flags |= FLAG_BATCHES;
                }
                push_header(out, kind::JOIN, flags);
                push_short(out, name.as_str().as_bytes());
                out.push(want.to_wire());
                if let Some(p) = create {
                    out.push(p.policy.to_wire());
                    out.push(p.slow.to_wire());
                    out.extend_from_slice(&p.max_message.to_le_bytes());
                    out.extend_from_slice(&p.queue_bytes.to_le_bytes());
                }
            }
            MemberFrame::Rejoin(t) => {
                push_header(out, kind::REJOIN, 0);
                out.extend_from_slice(&t.0);
            }
            MemberFrame::Publish { fields, payload } => {
                push_header(out, kind::PUBLISH, fields.flags());
                fields.encode(out);
                out.extend_from_slice(payload);
            }
            MemberFrame::Subscribe(p) | MemberFrame::Unsubscribe(p) => {
                let k = match self {
                    MemberFrame::Subscribe(_) => kind::SUBSCRIBE,
                    _ => kind::UNSUBSCRIBE,
                };
                push_header(out, k, 0);
                out.extend_from_slice(&p[..p.len().min(MAX_TOPIC_BYTES)]);
            }
            MemberFrame::Leave => push_header(out, kind::LEAVE, 0),
        }
    }
}

/// Appends a MESSAGE without its payload: the head a fan-out sends in front of the
/// publisher's payload (one seqpacket message of two parts).
pub fn encode_message_head(out: &mut Vec<u8>, sender: MemberId, seq: u64, fields: &Fields<'_>) {
    out.reserve(MESSAGE_FIXED_LEN + fields.encoded_len());
    push_header(out, kind::MESSAGE, fields.flags());
    out.extend_from_slice(&sender.0.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    fields.encode(out);
}

impl<'a> ServiceFrame<'a> {
    /// Decodes one received message.
    pub fn decode(frame: &'a [u8]) -> Result<ServiceFrame<'a>, WireError> {
        let (k, flags, mut r) = header(frame)?;
        let f = match k {
            kind::JOINED => {
                check_flags(k, flags, 0)?;
                let member = MemberId(r.u32("member")?);
                let policy = Policy::from_wire(r.u8("policy")?)?;
                let slow = SlowPolicy::from_wire(r.u8("slow")?)?;
                let granted = Want::from_wire(r.u8("granted")?, "granted")?;
                let reserved = r.u8("reserved")?;
                if reserved != 0 {
                    return Err(WireError::BadValue {
                        field: "reserved",
                        value: reserved.into(),
                    });
                }
                let max_message = r.u32("max_message")?;
                let queue_bytes = r.u32("queue_bytes")?;
                let mut t = [0u8; TOKEN_LEN];
                t.copy_from_slice(r.take("token", TOKEN_LEN)?);
                let lost = r.u64("lost")?;
                r.end(k)?;
                ServiceFrame::Joined(Joined {
                    member,
                    policy,
                    slow,
                    granted,
                    max_message,
                    queue_bytes,
                    token: Token(t),
                    lost,
                })
            }
            kind::REFUSED | kind::ERROR => {
                check_flags(k, flags, 0)?;
                let code = r.u16("code")?;
                let text = r.text("text")?;
                r.end(k)?;
                match k {
                    kind::REFUSED => ServiceFrame::Refused {
                        code: RefuseCode::from_wire(code),
                        text,
                    },
                    _ => ServiceFrame::Error {
                        code: ErrorCode::from_wire(code),
                        text,
                    },
                }
            }
            kind::MESSAGE => {
                check_flags(k, flags, FLAG_ADDRESSED | FLAG_TOPIC)?;
                let sender = MemberId(r.u32("sender")?);
                let seq = r.u64("seq")?;
                let fields = Fields::decode(flags, &mut r).map_err(|e| match e {
                    WireError::BadFlags { flags, .. } => WireError::BadFlags { kind: k, flags },
                    e => e,
                })?;
                ServiceFrame::Message {
                    sender,
                    seq,
                    fields,
                    payload: r.rest(),
                }
            }
            kind::LOSS => {
                check_flags(k, flags, 0)?;
                let messages = r.u64("messages")?;
                let bytes = r.u64("bytes")?;
                r.end(k)?;
                ServiceFrame::Loss { messages, bytes }
            }
            kind::SUBSCRIBED => {
                check_flags(k, flags, 0)?;
                let subscribe = match r.u8("op")? {
                    kind::SUBSCRIBE => true,
                    kind::UNSUBSCRIBE => false,
                    other => {
                        return Err(WireError::BadValue {
                            field: "op",
                            value: other.into(),
                        })
                    }
                };
                let prefix = r.rest();
                if prefix.len() > MAX_TOPIC_BYTES {
                    return Err(WireError::BadLength {
                        what: "prefix",
                        len: prefix.len(),
                        min: 0,
                        max: MAX_TOPIC_BYTES,
                    });
                }
                ServiceFrame::Subscribed { subscribe, prefix }
            }
            kind::BATCH => {
                check_flags(k, flags, 0)?;
                ServiceFrame::Batch(Batch::parse(r.rest())?)
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        Ok(f)
    }

    /// Appends the frame to `out` (texts are cut to [`MAX_TEXT_BYTES`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ServiceFrame::Joined(j) => {
                push_header(out, kind::JOINED, 0);
                out.extend_from_slice(&j.member.0.to_le_bytes());
                out.push(j.policy.to_wire());
                out.push(j.slow.to_wire());
                out.push(j.granted.to_wire());
                out.push(0);
                out.extend_from_slice(&j.max_message.to_le_bytes());
                out.extend_from_slice(&j.queue_bytes.to_le_bytes());
                out.extend_from_slice(&j.token.0);
                out.extend_from_slice(&j.lost.to_le_bytes());
            }
            ServiceFrame::Refused { code, text } => {
                push_header(out, kind::REFUSED, 0);
                out.extend_from_slice(&code.to_wire().to_le_bytes());
                push_text(out, text);
            }
            ServiceFrame::Error { code, text } => {
                push_header(out, kind::ERROR, 0);
                out.extend_from_slice(&code.to_wire().to_le_bytes());
                push_text(out, text);
            }
            ServiceFrame::Message {
                sender,
                seq,
                fields,
                payload,
            } => {
                encode_message_head(out, *sender, *seq, fields);
                out.extend_from_slice(payload);
            }
            ServiceFrame::Loss { messages, bytes } => {
                push_header(out, kind::LOSS, 0);
                out.extend_from_slice(&messages.to_le_bytes());
                out.extend_from_slice(&bytes.to_le_bytes());
            }
            ServiceFrame::Subscribed { subscribe, prefix } => {
                push_header(out, kind::SUBSCRIBED, 0);
                out.push(if *subscribe {
                    kind::SUBSCRIBE
                } else {
                    kind::UNSUBSCRIBE
                });
                out.extend_from_slice(&prefix[..prefix.len().min(MAX_TOPIC_BYTES)]);
            }
            ServiceFrame::Batch(b) => {
                out.extend_from_slice(&batch_header());
                out.extend_from_slice(b.entries);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc_member(f: &MemberFrame<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        f.encode(&mut v);
        v
    }

    fn enc_service(f: &ServiceFrame<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        f.encode(&mut v);
        v
    }

    #[test]
    fn golden_bytes_of_a_creating_join_and_a_topic_message() {
        let join = MemberFrame::Join {
            name: BusName::new("sensors").unwrap(),
            want: Want::BOTH,
            create: Some(CreateParams {
                policy: Policy::Topic,
                slow: SlowPolicy::Drop,
                max_message: 65536,
                queue_bytes: 1 << 20,
            }),
            batches: false,
        };
        let bytes = enc_member(&join);
        assert_eq!(
            bytes,
            [
                1, 0x01, 0x01, 0x00, // v1 JOIN, create
                7, b's', b'e', b'n', b's', b'o', b'r', b's', // name
                3,    // publish | receive
                2, 0, // topic, drop
                0x00, 0x00, 0x01, 0x00, // max_message 65536
                0x00, 0x00, 0x10, 0x00, // queue_bytes 1 MiB
            ]
        );
        assert_eq!(MemberFrame::decode(&bytes).unwrap(), join);

        let msg = ServiceFrame::Message {
            sender: MemberId(7),
            seq: 41,
            fields: Fields::Topic(b"temp/k2"),
            payload: b"21.5",
        };
        let bytes = enc_service(&msg);
        assert_eq!(
            bytes,
            [
                1, 0x83, 0x04, 0x00, // v1 MESSAGE, topic
                7, 0, 0, 0, // sender
                41, 0, 0, 0, 0, 0, 0, 0, // seq
                7, b't', b'e', b'm', b'p', b'/', b'k', b'2', // topic
                b'2', b'1', b'.', b'5', // payload
            ]
        );
        assert_eq!(ServiceFrame::decode(&bytes).unwrap(), msg);
    }

    /// A BATCH as a fan-out sends it (header, then a length and a MESSAGE per entry):
    /// its golden bytes, its MESSAGEs in order, and what a member refuses.
    #[test]
    fn a_batch_carries_whole_messages_in_order_and_nothing_else() {
        let m1 = enc_service(&ServiceFrame::Message {
            sender: MemberId(3),
            seq: 1,
            fields: Fields::None,
            payload: b"ab",
        });
        let m2 = enc_service(&ServiceFrame::Message {
            sender: MemberId(4),
            seq: 9,
            fields: Fields::None,
            payload: b"",
        });
        let mut bytes = batch_header().to_vec();
        for m in [&m1, &m2] {
            bytes.extend_from_slice(&batch_entry_prefix(m.len()));
            bytes.extend_from_slice(m);
        }
        assert_eq!(&bytes[..8], &[1, 0x87, 0, 0, 18, 0, 0, 0]);
        let ServiceFrame::Batch(b) = ServiceFrame::decode(&bytes).unwrap() else {
            panic!("not a batch");
        };
        assert_eq!(b.len(), 2);
        let frames: Vec<&[u8]> = b.frames().collect();
        assert_eq!(frames, [&m1[..], &m2[..]]);
        assert_eq!(enc_service(&ServiceFrame::Batch(b)), bytes);
        // The offsets form: each entry's frame, then nothing past the last or a cut one.
        let entries = &bytes[HEADER_LEN..];
        let first = batch_entry_at(entries, 0).unwrap();
        assert_eq!(&entries[first.clone()], &m1[..]);
        let second = batch_entry_at(entries, first.end).unwrap();
        assert_eq!(&entries[second.clone()], &m2[..]);
        assert_eq!(second.end, entries.len());
        assert_eq!(batch_entry_at(entries, second.end), None);
        assert_eq!(
            batch_entry_at(&entries[..entries.len() - 1], first.end),
            None
        );
        assert_eq!(batch_entry_at(entries, usize::MAX - 1), None);
        // One entry is not a batch; a LOSS inside is refused; a cut entry is truncated;
        // an entry shorter than a MESSAGE's fixed part is refused; a bad MESSAGE inside
        // is refused with its own error; flags must be 0.
        let one = [&bytes[..4], &bytes[4..4 + 4 + m1.len()]].concat();
        assert!(matches!(
            ServiceFrame::decode(&one),
            Err(WireError::BadLength { what: "batch", .. })
        ));
        let loss = enc_service(&ServiceFrame::Loss {
            messages: 1,
            bytes: 2,
        });
        let mut with_loss = bytes.clone();
        with_loss.extend_from_slice(&batch_entry_prefix(loss.len()));
        with_loss.extend_from_slice(&loss);
        assert_eq!(
            ServiceFrame::decode(&with_loss),
            Err(WireError::BatchEntry(0x84))
        );
        assert!(matches!(
            ServiceFrame::decode(&bytes[..bytes.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
        let mut short = bytes.clone();
        short.extend_from_slice(&batch_entry_prefix(3));
        short.extend_from_slice(&[1, 0x83, 0]);
        assert!(matches!(
            ServiceFrame::decode(&short),
            Err(WireError::BadLength {
                what: "batch entry",
                ..
            })
        ));
        let mut bad_inner = bytes.clone();
        bad_inner[4 + 4] = 2; // the first MESSAGE's version
        assert_eq!(ServiceFrame::decode(&bad_inner), Err(WireError::Version(2)));
        let mut flagged = bytes.clone();
        flagged[2] = 1;
        assert!(matches!(
            ServiceFrame::decode(&flagged),
            Err(WireError::BadFlags { kind: 0x87, .. })
        ));
        // Too many entries.
        let mut many = batch_header().to_vec();
        for _ in 0..=MAX_BATCH_FRAMES {
            many.extend_from_slice(&batch_entry_prefix(m2.len()));
            many.extend_from_slice(&m2);
        }
        assert!(matches!(
            ServiceFrame::decode(&many),
            Err(WireError::BadLength { what: "batch", .. })
        ));
        // JOIN's batches flag.
        let join = enc_member(&MemberFrame::Join {
            name: BusName::new("b").unwrap(),
            want: Want::BOTH,
            create: None,
            batches: true,
        });
        assert_eq!(&join[..4], &[1, 0x01, 0x08, 0x00]);
        assert!(max_batch_len(16) < MAX_BATCH_BYTES);
        assert_eq!(max_batch_len(DEFAULT_MAX_MESSAGE_BYTES), MAX_BATCH_BYTES);
    }

    #[test]
    fn every_frame_round_trips() {
        let member = [
            MemberFrame::Join {
                name: BusName::new("b-1.x_y").unwrap(),
                want: Want {
                    publish: false,
                    receive: true,
                },
                create: None,
                batches: true,
            },
            MemberFrame::Rejoin(Token([9; TOKEN_LEN])),
            MemberFrame::Publish {
                fields: Fields::None,
                payload: b"",
            },
            MemberFrame::Publish {
                fields: Fields::Addressed {
                    src: &[1, 2, 3, 4, 5, 6],
                    dst: &[0xFF; 6],
                },
                payload: &[7; 100],
            },
            MemberFrame::Subscribe(b""),
            MemberFrame::Unsubscribe(&[b'a'; MAX_TOPIC_BYTES]),
            MemberFrame::Leave,
        ];
        for f in &member {
            assert_eq!(&MemberFrame::decode(&enc_member(f)).unwrap(), f);
        }
        let service = [
            ServiceFrame::Joined(Joined {
                member: MemberId(u32::MAX),
                policy: Policy::Switch,
                slow: SlowPolicy::Disconnect,
                granted: Want {
                    publish: true,
                    receive: false,
                },
                max_message: 1,
                queue_bytes: 2,
                token: Token([0xAB; TOKEN_LEN]),
                lost: u64::MAX,
            }),
            ServiceFrame::Refused {
                code: RefuseCode::Denied,
                text: "policy: web may not join bus sensors",
            },
            ServiceFrame::Refused {
                code: RefuseCode::Other(999),
                text: "",
            },
            ServiceFrame::Error {
                code: ErrorCode::NotPermitted,
                text: "no publish permission",
            },
            ServiceFrame::Loss {
                messages: 3,
                bytes: 192,
            },
            ServiceFrame::Subscribed {
                subscribe: false,
                prefix: b"temp/",
            },
            ServiceFrame::Message {
                sender: MemberId(1),
                seq: 1,
                fields: Fields::Addressed {
                    src: &[1],
                    dst: &[2; MAX_ADDR_BYTES],
                },
                payload: &[0; 3],
            },
        ];
        for f in &service {
            assert_eq!(&ServiceFrame::decode(&enc_service(f)).unwrap(), f);
        }
    }

    #[test]
    fn the_message_head_and_payload_are_one_message() {
        let fields = Fields::Addressed {
            src: b"ab",
            dst: b"cd",
        };
        let mut head = Vec::new();
        encode_message_head(&mut head, MemberId(3), 9, &fields);
        let whole = enc_service(&ServiceFrame::Message {
            sender: MemberId(3),
            seq: 9,
            fields,
            payload: b"xyz",
        });
        assert_eq!([&head[..], b"xyz"].concat(), whole);
        assert!(whole.len() <= max_frame_len(3));
        // The bound holds for the longest field block too.
        let long = enc_service(&ServiceFrame::Message {
            sender: MemberId(3),
            seq: 9,
            fields: Fields::Topic(&[b't'; MAX_TOPIC_BYTES]),
            payload: &[0; 64],
        });
        assert_eq!(long.len(), max_frame_len(64));
    }

    #[test]
    fn hostile_frames_are_refused_with_the_reason() {
        let cases: &[(&[u8], WireError)] = &[
            (
                &[],
                WireError::Truncated {
                    what: "header",
                    need: 1,
                    have: 0,
                },
            ),
            (
                &[1, 0x06, 0],
                WireError::Truncated {
                    what: "header",
                    need: 2,
                    have: 1,
                },
            ),
            (&[2, 0x06, 0, 0], WireError::Version(2)),
            (&[1, 0x7F, 0, 0], WireError::UnknownKind(0x7F)),
            // A service kind sent by a member.
            (&[1, 0x83, 0, 0], WireError::UnknownKind(0x83)),
            (
                &[1, 0x06, 8, 0],
                WireError::BadFlags {
                    kind: 0x06,
                    flags: 8,
                },
            ),
            (
                &[1, 0x06, 0, 0, 0],
                WireError::Trailing {
                    kind: 0x06,
                    extra: 1,
                },
            ),
            // JOIN: empty name, a name that runs past the frame, a bad character.
            (
                &[1, 0x01, 0, 0, 0, 3],
                WireError::BadLength {
                    what: "bus name",
                    len: 0,
                    min: 1,
                    max: 64,
                },
            ),
            (
                &[1, 0x01, 0, 0, 5, b'a'],
                WireError::Truncated {
                    what: "bus name",
                    need: 5,
                    have: 1,
                },
            ),
            (
                &[1, 0x01, 0, 0, 2, b'a', b'/', 3],
                WireError::BadName("a/".into()),
            ),
            (
                &[1, 0x01, 0, 0, 1, b'a', 4],
                WireError::BadValue {
                    field: "want",
                    value: 4,
                },
            ),
            // JOIN create: unknown policy, max_message 0, a queue smaller than a message.
            (
                &[1, 0x01, 1, 0, 1, b'a', 3, 9, 0, 1, 0, 0, 0, 1, 0, 0, 0],
                WireError::BadValue {
                    field: "policy",
                    value: 9,
                },
            ),
            (
                &[1, 0x01, 1, 0, 1, b'a', 3, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
                WireError::BadLength {
                    what: "max_message",
                    len: 0,
                    min: 1,
                    max: 1 << 20,
                },
            ),
            (
                &[1, 0x01, 1, 0, 1, b'a', 3, 0, 0, 8, 0, 0, 0, 4, 0, 0, 0],
                WireError::BadLength {
                    what: "queue_bytes",
                    len: 4,
                    min: 8,
                    max: u32::MAX as usize,
                },
            ),
            // PUBLISH: both field kinds at once, a 17-byte address, an empty topic.
            (
                &[1, 0x03, 6, 0],
                WireError::BadFlags {
                    kind: 0x03,
                    flags: 6,
                },
            ),
            (
                &[1, 0x03, 2, 0, 17],
                WireError::BadLength {
                    what: "source address",
                    len: 17,
                    min: 1,
                    max: 16,
                },
            ),
            (
                &[1, 0x03, 4, 0, 0],
                WireError::BadLength {
                    what: "topic",
                    len: 0,
                    min: 1,
                    max: 255,
                },
            ),
            (
                &[1, 0x02, 0, 0, 1, 2],
                WireError::Truncated {
                    what: "token",
                    need: 16,
                    have: 2,
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(MemberFrame::decode(bytes).as_ref(), Err(want), "{bytes:?}");
        }
        let long_prefix = [&[1u8, 0x04, 0, 0][..], &[b'x'; 256]].concat();
        assert!(matches!(
            MemberFrame::decode(&long_prefix),
            Err(WireError::BadLength {
                what: "prefix",
                len: 256,
                ..
            })
        ));
        // Service side: non-zero reserved byte, bad text, a member kind.
        let mut joined = enc_service(&ServiceFrame::Joined(Joined {
            member: MemberId(1),
            policy: Policy::Hub,
            slow: SlowPolicy::Drop,
            granted: Want::BOTH,
            max_message: 1,
            queue_bytes: 1,
            token: Token([0; TOKEN_LEN]),
            lost: 0,
        }));
        joined[11] = 1;
        assert_eq!(
            ServiceFrame::decode(&joined),
            Err(WireError::BadValue {
                field: "reserved",
                value: 1
            })
        );
        assert_eq!(
            ServiceFrame::decode(&[1, 0x82, 0, 0, 1, 0, 1, 0xFF]),
            Err(WireError::BadText("text"))
        );
        assert_eq!(
            ServiceFrame::decode(&[1, 0x01, 0, 0]),
            Err(WireError::UnknownKind(0x01))
        );
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        let text = "é".repeat(200); // 400 bytes
        let bytes = enc_service(&ServiceFrame::Error {
            code: ErrorCode::TooLarge,
            text: &text,
        });
        match ServiceFrame::decode(&bytes).unwrap() {
            ServiceFrame::Error { text: t, .. } => {
                assert_eq!(t.len(), 254);
                assert!(text.starts_with(t));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn broadcast_is_all_ones() {
        assert!(is_broadcast(&[0xFF]));
        assert!(is_broadcast(&[0xFF; 6]));
        assert!(!is_broadcast(&[0xFF, 0xFE]));
        assert!(!is_broadcast(&[]));
    }
}
