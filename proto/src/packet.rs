//! The virtio-vsock packet header (virtio spec 1.3, section 5.10.6).
//!
//! ```text
//! struct virtio_vsock_hdr {          // all fields little-endian, 44 bytes
//!     le64 src_cid;  le64 dst_cid;
//!     le32 src_port; le32 dst_port;
//!     le32 len;      le16 type;  le16 op;
//!     le32 flags;    le32 buf_alloc; le32 fwd_cnt;
//! };
//! ```
//!
//! [`RawHeader`] is the bytes-exact wire form: decoding it never fails. [`Header`] is the
//! validated form the rest of domsock works with; [`Header::parse`] is the one place where
//! untrusted header bytes become typed values. This module does not touch payloads.
//!
//! # Why `RawHeader` is the wire struct itself
//! `RawHeader` is the struct above, field for field, with `zerocopy`'s little-endian
//! integer types (`#[repr(C)]`, alignment 1, so no padding and no `packed` references to
//! worry about; the derives check the layout at compile time and need no `unsafe` here).
//! Decoding and encoding are therefore plain 44-byte copies, and the I/O layers read a
//! header from guest memory straight into [`RawHeader::bytes_mut`].
//!
//! Its fields are private; the few the I/O layers touch without parsing (`len` and `flags`
//! of a relayed packet cut to fit RX buffers, the `buf_alloc` the router caps, the
//! addresses of a header that failed to parse) have getters and setters that convert byte
//! order. We chose this over a second, native-endian copy of the header: one type means
//! one conversion site per field and no "decoded or not?" question. On little-endian hosts
//! each accessor is one unaligned load or store, the same machine code the old hand-written
//! offsets gave (a big-endian host adds the byte swap any decoder needs). [`Header::parse`] reads each field once,
//! so the data path costs what it did: a 44-byte copy, then the validated copy.

use crate::addr::{Cid, ConnKey, Port, VsockAddr};
use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the header on the wire.
pub const HEADER_LEN: usize = 44;

/// `VIRTIO_VSOCK_F_STREAM` feature bit.
pub const VIRTIO_VSOCK_F_STREAM: u64 = 0;
/// `VIRTIO_VSOCK_F_SEQPACKET` feature bit.
pub const VIRTIO_VSOCK_F_SEQPACKET: u64 = 1;

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`.
pub const SHUTDOWN_F_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`.
pub const SHUTDOWN_F_SEND: u32 = 2;
/// `VIRTIO_VSOCK_SEQ_EOM`: last packet of a seqpacket message.
pub const SEQ_EOM: u32 = 1;
/// `VIRTIO_VSOCK_SEQ_EOR`: last packet of a record (`MSG_EOR`).
pub const SEQ_EOR: u32 = 2;

/// Socket type carried in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketType {
    /// `VIRTIO_VSOCK_TYPE_STREAM` (1).
    Stream,
    /// `VIRTIO_VSOCK_TYPE_SEQPACKET` (2).
    SeqPacket,
}

impl SocketType {
    /// Wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            SocketType::Stream => 1,
            SocketType::SeqPacket => 2,
        }
    }
}

/// Operation carried in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Connection request.
    Request,
    /// Connection accepted.
    Response,
    /// Connection reset (or refused).
    Rst,
    /// Half or full close; see [`Shutdown`].
    Shutdown,
    /// Data.
    Rw,
    /// Unsolicited credit information.
    CreditUpdate,
    /// Ask the peer for a credit update.
    CreditRequest,
}

impl Op {
    /// Wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }

    fn from_wire(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// Shutdown direction flags, as in a `SHUTDOWN` packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Shutdown {
    /// The sender will receive no more data.
    pub rcv: bool,
    /// The sender will send no more data.
    pub send: bool,
}

impl Shutdown {
    /// Both directions.
    pub const BOTH: Shutdown = Shutdown {
        rcv: true,
        send: true,
    };
    /// Only the send direction.
    pub const SEND: Shutdown = Shutdown {
        rcv: false,
        send: true,
    };
    /// Only the receive direction.
    pub const RCV: Shutdown = Shutdown {
        rcv: true,
        send: false,
    };

    /// Decodes the low two flag bits.
    pub fn from_flags(flags: u32) -> Self {
        Self {
            rcv: flags & SHUTDOWN_F_RCV != 0,
            send: flags & SHUTDOWN_F_SEND != 0,
        }
    }

    /// Encodes into flag bits.
    pub fn to_flags(self) -> u32 {
        (if self.rcv { SHUTDOWN_F_RCV } else { 0 }) | (if self.send { SHUTDOWN_F_SEND } else { 0 })
    }

    /// Union of two sets of flags.
    pub fn union(self, other: Shutdown) -> Shutdown {
        Shutdown {
            rcv: self.rcv || other.rcv,
            send: self.send || other.send,
        }
    }

    /// Both directions are shut.
    pub fn is_both(self) -> bool {
        self.rcv && self.send
    }

    /// No direction is shut.
    pub fn is_none(self) -> bool {
        !self.rcv && !self.send
    }
}

/// The header exactly as on the wire: 44 bytes of little-endian fields, alignment 1, no
/// padding (checked at compile time). Every bit pattern is a `RawHeader`, so decoding it
/// never fails.
///
/// Fields are read and changed only through accessors that convert from and to
/// little-endian, so no caller can forget the byte order; on a little-endian host they
/// compile to plain (unaligned) loads and stores, the same code hand-written offsets gave.
/// The I/O layers keep a `RawHeader` where they forward or patch headers without
/// interpreting them (relayed packets, a packet cut to fit RX buffers): reading one from
/// guest memory fills [`RawHeader::bytes_mut`] in place, writing one copies
/// [`RawHeader::bytes`]. Anything that acts on a header parses it into a [`Header`] first.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct RawHeader {
    src_cid: U64,
    dst_cid: U64,
    src_port: U32,
    dst_port: U32,
    len: U32,
    type_: U16,
    op: U16,
    flags: U32,
    buf_alloc: U32,
    fwd_cnt: U32,
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);

#[allow(
    clippy::len_without_is_empty,
    reason = "`len` is the header's payload-length field, not a container's size"
)]
impl RawHeader {
    /// Decodes 44 bytes; never fails.
    #[inline]
    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        zerocopy::transmute!(*b)
    }

    /// Encodes into 44 bytes.
    #[inline]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        zerocopy::transmute!(*self)
    }

    /// The wire bytes, borrowed.
    #[inline]
    pub fn bytes(&self) -> &[u8; HEADER_LEN] {
        zerocopy::transmute_ref!(self)
    }

    /// The wire bytes, to fill in place (e.g. straight from guest memory).
    #[inline]
    pub fn bytes_mut(&mut self) -> &mut [u8; HEADER_LEN] {
        zerocopy::transmute_mut!(self)
    }

    /// Source address.
    #[inline]
    pub fn src(&self) -> VsockAddr {
        VsockAddr::new(Cid(self.src_cid.get()), Port(self.src_port.get()))
    }

    /// Destination address.
    #[inline]
    pub fn dst(&self) -> VsockAddr {
        VsockAddr::new(Cid(self.dst_cid.get()), Port(self.dst_port.get()))
    }

    /// The connection this packet claims to belong to, seen from its receiver (the
    /// addresses decode whatever the other fields hold).
    #[inline]
    pub fn receiver_key(&self) -> ConnKey {
        ConnKey {
            local: self.dst(),
            peer: self.src(),
        }
    }

    /// Payload length as claimed.
    #[inline]
    pub fn len(&self) -> u32 {
        self.len.get()
    }

    /// Sets the payload length (a packet cut to fit, the tail of one).
    #[inline]
    pub fn set_len(&mut self, len: u32) {
        self.len.set(len);
    }

    /// Socket type, wire value (not checked).
    #[inline]
    pub fn type_(&self) -> u16 {
        self.type_.get()
    }

    /// Operation, wire value (not checked).
    #[inline]
    pub fn op(&self) -> u16 {
        self.op.get()
    }

    /// Op-specific flags.
    #[inline]
    pub fn flags(&self) -> u32 {
        self.flags.get()
    }

    /// Sets the op-specific flags.
    #[inline]
    pub fn set_flags(&mut self, flags: u32) {
        self.flags.set(flags);
    }

    /// Sender's receive buffer size.
    #[inline]
    pub fn buf_alloc(&self) -> u32 {
        self.buf_alloc.get()
    }

    /// Sets the advertised receive buffer size (a relay capping the window it forwards).
    #[inline]
    pub fn set_buf_alloc(&mut self, buf_alloc: u32) {
        self.buf_alloc.set(buf_alloc);
    }

    /// Bytes the sender has consumed from its receive buffer.
    #[inline]
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.get()
    }
}

impl std::fmt::Debug for RawHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawHeader")
            .field("src", &format_args!("{}", self.src()))
            .field("dst", &format_args!("{}", self.dst()))
            .field("len", &self.len())
            .field("type", &self.type_())
            .field("op", &self.op())
            .field("flags", &self.flags())
            .field("buf_alloc", &self.buf_alloc())
            .field("fwd_cnt", &self.fwd_cnt())
            .finish()
    }
}

/// Why a header was rejected at the boundary.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// Unknown socket type.
    #[error("unknown socket type {0}")]
    BadType(u16),
    /// Unknown (or `INVALID`) operation.
    #[error("unknown operation {0}")]
    BadOp(u16),
    /// A non-`RW` packet carried a payload.
    #[error("{op:?} packet carries {len} payload bytes")]
    UnexpectedPayload {
        /// The operation.
        op: Op,
        /// Its claimed payload length.
        len: u32,
    },
    /// Payload longer than this endpoint accepts in one packet.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLong {
        /// Claimed length.
        len: u32,
        /// Limit.
        max: u32,
    },
}

/// A validated header.
///
/// Built only by [`Header::parse`] (from the wire) and by the constructors below, so every
/// `Header` keeps the invariant the parser checks: the socket type and operation are known,
/// and only `RW` packets carry payload. Fields are read through accessors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    src: VsockAddr,
    dst: VsockAddr,
    /// Non-zero only for `RW`.
    len: u32,
    socket_type: SocketType,
    op: Op,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

#[allow(
    clippy::len_without_is_empty,
    reason = "`len` is the header's payload-length field, not a container's size"
)]
impl Header {
    /// Validates a raw header; `max_payload` bounds `len` for `RW` packets.
    pub fn parse(raw: &RawHeader, max_payload: u32) -> Result<Header, HeaderError> {
        let socket_type = match raw.type_() {
            1 => SocketType::Stream,
            2 => SocketType::SeqPacket,
            t => return Err(HeaderError::BadType(t)),
        };
        let op = Op::from_wire(raw.op()).ok_or(HeaderError::BadOp(raw.op()))?;
        let len = raw.len();
        if op == Op::Rw {
            if len > max_payload {
                return Err(HeaderError::PayloadTooLong {
                    len,
                    max: max_payload,
                });
            }
        } else if len != 0 {
            return Err(HeaderError::UnexpectedPayload { op, len });
        }
        Ok(Header {
            src: raw.src(),
            dst: raw.dst(),
            len,
            socket_type,
            op,
            flags: raw.flags(),
            buf_alloc: raw.buf_alloc(),
            fwd_cnt: raw.fwd_cnt(),
        })
    }

    /// Builds a header with no payload and zero credit fields (see
    /// [`Header::with_credit`]).
    pub fn control(key: ConnKey, socket_type: SocketType, op: Op, flags: u32) -> Header {
        Header {
            src: key.local,
            dst: key.peer,
            len: 0,
            socket_type,
            op,
            flags,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// An `RW` packet of `len` payload bytes on `key`, with its flags (seqpacket EOM/EOR)
    /// and the sender's credit fields.
    pub fn rw(
        key: ConnKey,
        socket_type: SocketType,
        len: u32,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> Header {
        Header {
            len,
            ..Header::control(key, socket_type, Op::Rw, flags).with_credit(buf_alloc, fwd_cnt)
        }
    }

    /// The same header carrying the sender's credit fields.
    #[must_use]
    pub fn with_credit(self, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..self
        }
    }

    /// An RST from `src` to `dst`.
    pub fn rst(src: VsockAddr, dst: VsockAddr, socket_type: SocketType) -> Header {
        Header::control(
            ConnKey {
                local: src,
                peer: dst,
            },
            socket_type,
            Op::Rst,
            0,
        )
    }

    /// An RST answering `self` (addresses swapped), as sent for unknown connections.
    pub fn rst_reply(&self) -> Header {
        Header::rst(self.dst, self.src, self.socket_type)
    }

    /// Source address.
    #[inline]
    pub fn src(&self) -> VsockAddr {
        self.src
    }

    /// Destination address.
    #[inline]
    pub fn dst(&self) -> VsockAddr {
        self.dst
    }

    /// Payload length (non-zero only for `RW`).
    #[inline]
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Socket type.
    #[inline]
    pub fn socket_type(&self) -> SocketType {
        self.socket_type
    }

    /// Operation.
    #[inline]
    pub fn op(&self) -> Op {
        self.op
    }

    /// Op-specific flags (shutdown direction or seqpacket EOM/EOR).
    #[inline]
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Sender's receive buffer size.
    #[inline]
    pub fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    /// Sender's forwarded-bytes counter.
    #[inline]
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }

    /// The connection this packet belongs to, seen from its receiver.
    #[inline]
    pub fn receiver_key(&self) -> ConnKey {
        ConnKey {
            local: self.dst,
            peer: self.src,
        }
    }

    /// The wire form.
    pub fn to_raw(&self) -> RawHeader {
        RawHeader {
            src_cid: self.src.cid.0.into(),
            dst_cid: self.dst.cid.0.into(),
            src_port: self.src.port.0.into(),
            dst_port: self.dst.port.0.into(),
            len: self.len.into(),
            type_: self.socket_type.to_wire().into(),
            op: self.op.to_wire().into(),
            flags: self.flags.into(),
            buf_alloc: self.buf_alloc.into(),
            fwd_cnt: self.fwd_cnt.into(),
        }
    }

    /// Encodes to wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        self.to_raw().encode()
    }
}

/// Builds headers field by field, for tests that play a peer (honest or not) without going
/// through an endpoint. Only valid headers can be built: [`HeaderBuilder::build`] panics on
/// payload in a non-`RW` packet; a test that needs bytes the parser rejects writes bytes.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug, Clone, Copy)]
pub struct HeaderBuilder(Header);

#[cfg(any(test, feature = "test-utils"))]
impl HeaderBuilder {
    /// A stream packet `op` from `src` to `dst`: no payload, flags or credit yet.
    pub fn new(src: VsockAddr, dst: VsockAddr, op: Op) -> Self {
        let key = ConnKey {
            local: src,
            peer: dst,
        };
        Self(Header::control(key, SocketType::Stream, op, 0))
    }

    /// Sets the socket type.
    pub fn socket_type(mut self, socket_type: SocketType) -> Self {
        self.0.socket_type = socket_type;
        self
    }

    /// Sets the payload length.
    pub fn len(mut self, len: u32) -> Self {
        self.0.len = len;
        self
    }

    /// Sets the flags.
    pub fn flags(mut self, flags: u32) -> Self {
        self.0.flags = flags;
        self
    }

    /// Sets the credit fields.
    pub fn credit(mut self, buf_alloc: u32, fwd_cnt: u32) -> Self {
        self.0 = self.0.with_credit(buf_alloc, fwd_cnt);
        self
    }

    /// The header.
    ///
    /// # Panics
    /// If a non-`RW` packet was given a payload length.
    pub fn build(self) -> Header {
        let h = self.0;
        assert!(
            h.op == Op::Rw || h.len == 0,
            "{:?} packet with {} payload bytes",
            h.op,
            h.len
        );
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RawHeader {
        RawHeader {
            src_cid: 3.into(),
            dst_cid: 2.into(),
            src_port: 1234.into(),
            dst_port: 5678.into(),
            len: 100.into(),
            type_: 1.into(),
            op: 5.into(),
            flags: 0.into(),
            buf_alloc: 262_144.into(),
            fwd_cnt: 77.into(),
        }
    }

    /// The sample's bytes as the virtio spec lays them out, written down independently of
    /// the struct.
    fn sample_bytes() -> [u8; HEADER_LEN] {
        let mut b = Vec::new();
        b.extend(3u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(1234u32.to_le_bytes());
        b.extend(5678u32.to_le_bytes());
        b.extend(100u32.to_le_bytes());
        b.extend(1u16.to_le_bytes());
        b.extend(5u16.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(262_144u32.to_le_bytes());
        b.extend(77u32.to_le_bytes());
        b.try_into().unwrap()
    }

    #[test]
    fn raw_roundtrip_is_little_endian() {
        let raw = sample();
        let b = raw.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &100u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(b, sample_bytes());
        assert_eq!(raw.bytes(), &b);
        assert_eq!(RawHeader::decode(&b), raw);
        let mut filled = RawHeader::default();
        filled.bytes_mut().copy_from_slice(&b);
        assert_eq!(filled, raw);
    }

    #[test]
    fn raw_accessors() {
        let mut raw = sample();
        assert_eq!(raw.src(), VsockAddr::new(Cid(3), Port(1234)));
        assert_eq!(raw.dst(), VsockAddr::new(Cid(2), Port(5678)));
        assert_eq!(raw.receiver_key().local, raw.dst());
        assert_eq!((raw.len(), raw.type_(), raw.op()), (100, 1, 5));
        assert_eq!((raw.buf_alloc(), raw.fwd_cnt()), (262_144, 77));
        raw.set_len(7);
        raw.set_flags(SEQ_EOM);
        raw.set_buf_alloc(4096);
        let b = raw.encode();
        assert_eq!(&b[24..28], &7u32.to_le_bytes());
        assert_eq!(&b[32..36], &SEQ_EOM.to_le_bytes());
        assert_eq!(&b[36..40], &4096u32.to_le_bytes());
        assert_eq!(raw.flags(), SEQ_EOM);
    }

    #[test]
    fn parse_validates() {
        let h = Header::parse(&sample(), 65536).unwrap();
        assert_eq!(h.op(), Op::Rw);
        assert_eq!(h.src(), VsockAddr::new(Cid(3), Port(1234)));
        assert_eq!(h.to_raw(), sample());
        assert_eq!(h.encode(), sample_bytes());

        let mut r = sample();
        r.type_ = 9.into();
        assert_eq!(Header::parse(&r, 65536), Err(HeaderError::BadType(9)));
        let mut r = sample();
        r.op = 0.into();
        assert_eq!(Header::parse(&r, 65536), Err(HeaderError::BadOp(0)));
        let mut r = sample();
        r.op = Op::Request.to_wire().into();
        assert!(matches!(
            Header::parse(&r, 65536),
            Err(HeaderError::UnexpectedPayload {
                op: Op::Request,
                len: 100
            })
        ));
        let mut r = sample();
        r.len = 70_000.into();
        assert_eq!(
            Header::parse(&r, 65536),
            Err(HeaderError::PayloadTooLong {
                len: 70_000,
                max: 65536
            })
        );
    }

    #[test]
    fn constructors_keep_the_invariant() {
        let key = ConnKey {
            local: VsockAddr::new(Cid(3), Port(1234)),
            peer: VsockAddr::new(Cid(2), Port(5678)),
        };
        let rw = Header::rw(key, SocketType::Stream, 100, 0, 262_144, 77);
        assert_eq!(rw.to_raw(), sample());
        let ctl = Header::control(key, SocketType::SeqPacket, Op::Shutdown, 3).with_credit(9, 8);
        assert_eq!(
            (ctl.len(), ctl.flags(), ctl.buf_alloc(), ctl.fwd_cnt()),
            (0, 3, 9, 8)
        );
        let rst = rw.rst_reply();
        assert_eq!((rst.src(), rst.dst()), (rw.dst(), rw.src()));
        assert_eq!((rst.op(), rst.len(), rst.flags()), (Op::Rst, 0, 0));
        assert_eq!(rst.receiver_key(), key);
        for h in [rw, ctl, rst] {
            assert_eq!(Header::parse(&h.to_raw(), 65536), Ok(h));
        }
    }

    #[test]
    #[should_panic(expected = "payload bytes")]
    fn builder_refuses_payload_in_control_packets() {
        let a = VsockAddr::new(Cid(3), Port(1));
        let _ = HeaderBuilder::new(a, a, Op::Request).len(1).build();
    }

    #[test]
    fn shutdown_flags() {
        assert_eq!(Shutdown::from_flags(3), Shutdown::BOTH);
        assert_eq!(Shutdown::SEND.to_flags(), SHUTDOWN_F_SEND);
        assert!(Shutdown::RCV.union(Shutdown::SEND).is_both());
        assert!(Shutdown::default().is_none());
    }
}
