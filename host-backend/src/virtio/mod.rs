//! The virtio-vsock device over vhost-user: how a KVM/QEMU guest is one domain of the
//! router.
//!
//! - [`chain`]: descriptor chains checked against guest memory once, then used as regions.
//! - [`rx`]: [`GuestPort`], the one owner of a guest's RX ring, and the virtio
//!   implementation of the router's [`crate::port::DomainPort`].
//!
//! What it does not do: connections, sockets or policy (the engine and the router), or the
//! vhost-user protocol (the server's device module does that).

pub mod chain;
pub mod rx;

pub use rx::{GuestPort, Vring};

/// Index of the RX virtqueue.
pub const RX_QUEUE: usize = 0;
/// Index of the TX virtqueue.
pub const TX_QUEUE: usize = 1;
