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

use crate::addr::{Cid, ConnKey, Port, VsockAddr};
use thiserror::Error;

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

/// The header exactly as on the wire, fields already converted from little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl RawHeader {
    /// Decodes 44 bytes; never fails.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes into 44 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Source address.
    pub src: VsockAddr,
    /// Destination address.
    pub dst: VsockAddr,
    /// Payload length (non-zero only for `RW`).
    pub len: u32,
    /// Socket type.
    pub socket_type: SocketType,
    /// Operation.
    pub op: Op,
    /// Op-specific flags (shutdown direction or seqpacket EOM/EOR).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Sender's forwarded-bytes counter.
    pub fwd_cnt: u32,
}

impl Header {
    /// Validates a raw header; `max_payload` bounds `len` for `RW` packets.
    pub fn parse(raw: &RawHeader, max_payload: u32) -> Result<Header, HeaderError> {
        let socket_type = match raw.type_ {
            1 => SocketType::Stream,
            2 => SocketType::SeqPacket,
            t => return Err(HeaderError::BadType(t)),
        };
        let op = Op::from_wire(raw.op).ok_or(HeaderError::BadOp(raw.op))?;
        if op == Op::Rw {
            if raw.len > max_payload {
                return Err(HeaderError::PayloadTooLong {
                    len: raw.len,
                    max: max_payload,
                });
            }
        } else if raw.len != 0 {
            return Err(HeaderError::UnexpectedPayload { op, len: raw.len });
        }
        Ok(Header {
            src: VsockAddr::new(Cid(raw.src_cid), Port(raw.src_port)),
            dst: VsockAddr::new(Cid(raw.dst_cid), Port(raw.dst_port)),
            len: raw.len,
            socket_type,
            op,
            flags: raw.flags,
            buf_alloc: raw.buf_alloc,
            fwd_cnt: raw.fwd_cnt,
        })
    }

    /// Builds a header with no payload and zero credit fields.
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
        Header {
            src: self.dst,
            dst: self.src,
            len: 0,
            socket_type: self.socket_type,
            op: Op::Rst,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// The connection this packet belongs to, seen from its receiver.
    pub fn receiver_key(&self) -> ConnKey {
        ConnKey {
            local: self.dst,
            peer: self.src,
        }
    }

    /// The wire form.
    pub fn to_raw(&self) -> RawHeader {
        RawHeader {
            src_cid: self.src.cid.0,
            dst_cid: self.dst.cid.0,
            src_port: self.src.port.0,
            dst_port: self.dst.port.0,
            len: self.len,
            type_: self.socket_type.to_wire(),
            op: self.op.to_wire(),
            flags: self.flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Encodes to wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        self.to_raw().encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RawHeader {
        RawHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5678,
            len: 100,
            type_: 1,
            op: 5,
            flags: 0,
            buf_alloc: 262_144,
            fwd_cnt: 77,
        }
    }

    #[test]
    fn raw_roundtrip_is_little_endian() {
        let raw = sample();
        let b = raw.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &100u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(RawHeader::decode(&b), raw);
    }

    #[test]
    fn parse_validates() {
        let h = Header::parse(&sample(), 65536).unwrap();
        assert_eq!(h.op, Op::Rw);
        assert_eq!(h.src, VsockAddr::new(Cid(3), Port(1234)));
        assert_eq!(h.to_raw(), sample());

        let mut r = sample();
        r.type_ = 9;
        assert_eq!(Header::parse(&r, 65536), Err(HeaderError::BadType(9)));
        let mut r = sample();
        r.op = 0;
        assert_eq!(Header::parse(&r, 65536), Err(HeaderError::BadOp(0)));
        let mut r = sample();
        r.op = Op::Request.to_wire();
        assert!(matches!(
            Header::parse(&r, 65536),
            Err(HeaderError::UnexpectedPayload {
                op: Op::Request,
                len: 100
            })
        ));
        let mut r = sample();
        r.len = 70_000;
        assert_eq!(
            Header::parse(&r, 65536),
            Err(HeaderError::PayloadTooLong {
                len: 70_000,
                max: 65536
            })
        );
    }

    #[test]
    fn shutdown_flags() {
        assert_eq!(Shutdown::from_flags(3), Shutdown::BOTH);
        assert_eq!(Shutdown::SEND.to_flags(), SHUTDOWN_F_SEND);
        assert!(Shutdown::RCV.union(Shutdown::SEND).is_both());
        assert!(Shutdown::default().is_none());
    }
}
