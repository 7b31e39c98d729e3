//! The virtio-vsock device over vhost-user: how a KVM/QEMU guest is one domain of the
//! router.
//!
//! - [`device`]: the vhost-user backend of one frontend connection (features, config
//!   space, events into the engine's driver).
//! - [`chain`]: descriptor chains checked against guest memory once, then used as regions.
//! - [`rx`]: [`GuestPort`], the one owner of a guest's RX ring, and the virtio
//!   implementation of the router's [`crate::router::port::DomainPort`].
//!
//! What it does not do: connections, sockets or policy (the engine and the router).

pub mod chain;
pub mod device;
pub mod rx;

pub use rx::{GuestPort, Vring};

/// Index of the RX virtqueue.
pub const RX_QUEUE: usize = 0;
/// Index of the TX virtqueue.
pub const TX_QUEUE: usize = 1;
