//! Errors of the user-space driver, one enum per layer:
//!
//! - [`SetupError`]: building a [`UserGuest`](super::UserGuest) (configuration, vhost-user
//!   handshake, guest memory, eventfds);
//! - [`DeviceError`]: the device broke the virtqueue protocol, or guest memory or an eventfd
//!   failed. The guest is unusable afterwards; every later call returns it again;
//! - [`SockError`]: one socket operation. Connection failures (refused, reset, connect timeout)
//!   are variants of their own; [`SockError::WouldBlock`] is the expected outcome of a
//!   non-blocking call that cannot make progress now.

use domsock_proto::{ConnError, ConnKey, Port, SocketType};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use vm_memory::GuestAddress;

/// A [`GuestConfig`](super::GuestConfig) that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// Split rings need a power-of-two size.
    #[error("queue size {0} must be a power of two between 4 and 32768")]
    QueueSize(u16),
    /// RX buffers must hold some payload and at most 64 KiB.
    #[error("RX payload buffer of {0} bytes must be between 1 and 65536")]
    RxPayload(u32),
    /// TX packets must carry some payload and at most 64 KiB.
    #[error("TX payload limit of {0} bytes must be between 1 and 65536")]
    TxPayload(u32),
    /// A TX header can only be cut inside itself.
    #[error("TX header split at byte {0}: must be between 1 and 43")]
    TxHeaderSplit(u32),
    /// TX payload segments must hold at least one byte.
    #[error("TX payload segments of 0 bytes")]
    TxSegment,
    /// The largest TX packet would need more descriptors than the ring has.
    #[error("the largest TX packet needs {descriptors} descriptors; the ring has {queue_size}")]
    TxChainTooLong {
        /// Descriptors of a packet of `max_tx_payload_bytes`.
        descriptors: usize,
        /// Ring entries.
        queue_size: u16,
    },
    /// The receive buffer advertised per connection must not be empty.
    #[error("per-connection receive buffer (buf_alloc) must not be 0")]
    BufAlloc,
    /// A listener needs room for at least one pending connection.
    #[error("listen backlog must not be 0")]
    Backlog,
    /// The explicit CID is not a guest CID.
    #[error("{0} is not a guest CID")]
    Cid(u64),
}

/// Building a [`UserGuest`](super::UserGuest) failed.
#[derive(Debug, Error)]
pub enum SetupError {
    /// The configuration is invalid.
    #[error("invalid guest configuration")]
    Config(#[from] ConfigError),
    /// The vhost-user socket could not be reached.
    #[error("cannot connect to vhost-user socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A vhost-user request failed (including a backend that closed the socket or did not
    /// answer in time).
    #[error("vhost-user {step} failed")]
    Vhost {
        /// The request.
        step: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// The device is not a virtio 1.x device.
    #[error("device does not offer VIRTIO_F_VERSION_1 (features {offered:#x})")]
    NoVersion1 {
        /// What it offered.
        offered: u64,
    },
    /// A vsock device needs rx and tx queues.
    #[error("device has {queues} virtqueues; a vsock device needs at least 2")]
    TooFewQueues {
        /// Queues reported by `GET_QUEUE_NUM`.
        queues: u64,
    },
    /// The device's config space holds a CID no guest may have.
    #[error("device config reports guest CID {0}, which is not a guest CID")]
    BadCid(u64),
    /// The device's CID differs from the one the caller expected.
    #[error("device config reports guest CID {device}, the configuration expects {expected}")]
    CidMismatch {
        /// From `GET_CONFIG`.
        device: u64,
        /// From [`GuestConfig::cid`](super::GuestConfig::cid).
        expected: u64,
    },
    /// Neither the device (no `VHOST_USER_PROTOCOL_F_CONFIG`) nor the caller gave a CID.
    #[error("device has no config space and no CID was configured")]
    NoCid,
    /// Creating the memfd backing guest memory failed.
    #[error("cannot create {bytes} bytes of memfd guest memory")]
    Memory {
        /// Size asked for.
        bytes: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Mapping guest memory failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// Creating eventfds or the epoll set failed.
    #[error("cannot create {what}")]
    Notify {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the initial rings failed.
    #[error("initialising the virtqueues failed")]
    Device(#[source] DeviceError),
}

impl SetupError {
    pub(crate) fn vhost(step: &'static str) -> impl FnOnce(vhost::Error) -> SetupError {
        move |source| SetupError::Vhost { step, source }
    }
}

/// The device broke the virtqueue protocol, or the machinery under the rings failed.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// `used.idx` moved further than the number of chains the device owned.
    #[error("{queue} queue: device moved used.idx from {last} to {idx} with only {outstanding} chains outstanding")]
    UsedIdxJump {
        /// Queue.
        queue: &'static str,
        /// Index we had consumed to.
        last: u16,
        /// Index the device published.
        idx: u16,
        /// Chains it owned.
        outstanding: u16,
    },
    /// A used element names a descriptor that is not the head of a chain the device owns.
    #[error(
        "{queue} queue: device returned id {id}, which is not the head of an outstanding chain"
    )]
    UnknownUsedId {
        /// Queue.
        queue: &'static str,
        /// The id.
        id: u32,
    },
    /// A used element claims more bytes written than the chain can take.
    #[error("{queue} queue: device claims {len} bytes written into chain {id} of {capacity} writable bytes")]
    UsedLenTooLong {
        /// Queue.
        queue: &'static str,
        /// Chain head.
        id: u32,
        /// Claimed length.
        len: u32,
        /// Writable bytes of the chain.
        capacity: u64,
    },
    /// Guest memory could not be accessed (a bug in the layout, not the device's doing).
    #[error("guest memory access at {addr:#x} failed")]
    Memory {
        /// Guest address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Kicking the device failed.
    #[error("kicking the {queue} queue failed")]
    Kick {
        /// Queue.
        queue: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Waiting for calls failed.
    #[error("waiting for device notifications failed")]
    Wait(#[source] io::Error),
}

impl DeviceError {
    pub(crate) fn memory(addr: GuestAddress, source: vm_memory::GuestMemoryError) -> Self {
        DeviceError::Memory {
            addr: addr.0,
            source,
        }
    }
}

/// A socket operation failed.
#[derive(Debug, Clone, Error)]
pub enum SockError {
    /// Nothing can move now (no data, no credit or no ring space); poll and retry.
    #[error("operation would block")]
    WouldBlock,
    /// A blocking call ran out of time.
    #[error("{op} timed out after {after:?}")]
    TimedOut {
        /// The call.
        op: &'static str,
        /// Its timeout.
        after: Duration,
    },
    /// The peer answered our connection request with RST (nobody listens there).
    #[error("connection {0} refused by the peer")]
    Refused(ConnKey),
    /// The peer did not answer our connection request in time.
    #[error("connection {0}: no answer to the connection request")]
    ConnectTimedOut(ConnKey),
    /// The peer reset the established connection.
    #[error("connection {0} reset by the peer")]
    Reset(ConnKey),
    /// The connection was reset because the peer broke the protocol (credit overrun, data
    /// after its shutdown, wrong socket type).
    #[error("connection {key} reset: peer violated the protocol ({why})")]
    ProtocolViolation {
        /// Connection.
        key: ConnKey,
        /// What it did.
        why: &'static str,
    },
    /// The device signalled a transport reset; every connection was dropped.
    #[error("connection {0} dropped by a transport reset")]
    TransportReset(ConnKey),
    /// The device was unplugged ([`UserGuest::replug`](super::UserGuest::replug)); every
    /// connection was dropped.
    #[error("connection {0} dropped: the device was unplugged")]
    DeviceGone(ConnKey),
    /// Sending after our or the peer's shutdown of that direction.
    #[error("connection {0}: sending is shut down")]
    BrokenPipe(ConnKey),
    /// The stream ended before a read got all the bytes it needed.
    #[error("end of stream after {got} of {wanted} bytes")]
    UnexpectedEof {
        /// Bytes read.
        got: usize,
        /// Bytes wanted.
        wanted: usize,
    },
    /// No such connection (never existed, or closed by us).
    #[error("no connection {0}")]
    UnknownConnection(ConnKey),
    /// A listener already uses the port.
    #[error("port {0} already has a listener")]
    PortInUse(Port),
    /// No listener on the port.
    #[error("no listener on port {0}")]
    NotListening(Port),
    /// The device did not negotiate `VIRTIO_VSOCK_F_SEQPACKET`.
    #[error("the device does not support SOCK_SEQPACKET")]
    SeqpacketUnsupported,
    /// A message call on a stream, or the other way round.
    #[error("connection {key} is {actual:?}, the call needs {expected:?}")]
    WrongSocketType {
        /// Connection.
        key: ConnKey,
        /// Needed.
        expected: SocketType,
        /// Actual.
        actual: SocketType,
    },
    /// A seqpacket message larger than the peer's whole receive buffer can never be sent.
    #[error("message of {len} bytes exceeds the peer's receive buffer of {max} bytes")]
    MessageTooLong {
        /// Message length.
        len: usize,
        /// Peer's buf_alloc.
        max: u32,
    },
    /// A seqpacket message needs more TX descriptors than the ring has (a message's packets
    /// are published together), e.g. with small payload segments.
    #[error("message of {len} bytes needs {descriptors} TX descriptors; the ring has {ring}")]
    MessageExceedsRing {
        /// Message length.
        len: usize,
        /// Descriptors its packets take.
        descriptors: usize,
        /// Entries of the TX ring.
        ring: usize,
    },
    /// The protocol core refused the operation.
    #[error("connection table")]
    Endpoint(#[from] ConnError),
    /// The device is broken; the guest is unusable.
    #[error("virtio device failure")]
    Device(#[source] Arc<DeviceError>),
}

impl SockError {
    /// Whether this is [`SockError::WouldBlock`].
    pub fn is_would_block(&self) -> bool {
        matches!(self, SockError::WouldBlock)
    }
}
