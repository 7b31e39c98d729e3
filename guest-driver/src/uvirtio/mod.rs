//! A user-space virtio-vsock guest speaking vhost-user: VMM and guest driver in one object,
//! for integration tests and benchmarks of vhost-user vsock backends (domsockd,
//! vhost-device-vsock) without a VM.
//!
//! [`UserGuest::connect`] plays the VMM: it connects to the backend's vhost-user socket,
//! negotiates features ([`Negotiated`]), shares memfd-backed guest memory and hands over the
//! rx, tx and event rings with eventfds for kicks and calls ([`frontend`] has the sequence).
//! It then plays the guest: a split-ring virtio driver ([`ring`], [`driver`]) with Linux's
//! buffer layout by default ([`GuestConfig`], [`RxLayout`]), honouring
//! `VIRTIO_RING_F_EVENT_IDX` in both directions, and vsock sockets on top ([`UserGuest`])
//! whose protocol state is `domsock-proto`'s [`Endpoint`](domsock_proto::Endpoint).
//!
//! It copies payload once each way, as a kernel does: application buffer to guest memory on
//! send, guest memory to application buffer on receive. The device is not trusted: every
//! used ring entry and every received header is validated; a device that breaks the ring
//! protocol stops the guest with a [`DeviceError`], a bad packet is dropped and counted.
//!
//! What it does not do: threads (one `UserGuest` is driven by one thread; run several for
//! several guests), interrupts (the application polls), indirect descriptors, packed rings,
//! or `AF_VSOCK` (nothing here opens a vsock socket).
//!
//! No `unsafe`: guest memory is reached through vm-memory's checked accessors, the memfd
//! through nix, eventfds and epoll through vmm-sys-util.
#![forbid(unsafe_code)]

mod config;
pub mod driver;
mod error;
pub mod frontend;
mod guest;
mod memory;
pub mod ring;

pub use config::{
    GuestConfig, HeaderPlacement, RxLayout, DEFAULT_LISTEN_BACKLOG, DEFAULT_QUEUE_SIZE,
    DEFAULT_RX_PAYLOAD_BYTES, DEFAULT_RX_SPARE_BUFFERS, DEFAULT_VHOST_USER_TIMEOUT_MS,
    EVENT_QUEUE_SIZE, MAX_PACKET_PAYLOAD_BYTES,
};
pub use driver::GuestStats;
pub use error::{ConfigError, DeviceError, SetupError, SockError};
pub use frontend::Negotiated;
pub use guest::{Message, UserGuest};
pub use ring::RingStats;

pub use domsock_proto::{
    Cid, ConnKey, EndpointConfig, Header, Op, Port, Shutdown, SocketType, VsockAddr,
};
