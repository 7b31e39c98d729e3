//! domsockd: a vhost-user vsock device backend serving many VMs in one process.
//!
//! ```text
//!            server (one thread per VM: accepts its QEMU)
//!                 |
//!   server::device (vhost-user backend) --events--> engine::DataPlane (one per VM, its worker thread)
//!                                                     |  driver: clock, epoll, timers, busy-poll
//!                                                     |  tx / rx / connect / handshake / conn / linger
//!        host Unix sockets, services <----------------+
//!                                                     |  route(hdr, payload)
//!                                                  router (policy, relay table, names)
//!                                                     |  offer(hdr, payload) / signal
//!                                           dyn DomainPort: virtio::GuestPort (RX ring owner)
//!                                           (later: Xen ring, parked session, tunnel peer)
//! ```
//!
//! Module dependencies point one way: [`vm`] (per-VM shared state) and [`port`] (the
//! domain endpoint trait) are leaves; [`virtio`] implements the port for KVM guests;
//! [`router`] decides, knowing ports only by the trait; [`services`] answer in-process;
//! [`engine`] drives one guest and uses all of them; [`server`] runs the vhost-user side
//! and the engine. No module imports one that imports it back (`tests/layering.rs` checks
//! this).
//!
//! Hybrid addressing as Firecracker and vhost-device-vsock do it (`<uds>_<port>` for
//! guest-initiated, `CONNECT <port>` on `<uds>` for host-initiated). Protocol decisions live
//! in `domsock-proto`; this crate does the I/O.
//!
//! `unsafe` is denied everywhere but [`iov`], which builds `iovec`s for `writev` from guest
//! memory slices vm-memory has bounds-checked; all other guest memory access goes through
//! vm-memory's checked accessors and sockets through std/nix.

#![deny(unsafe_code)]

pub mod admin;
pub mod bus;
pub mod config;
pub mod engine;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod iov;
pub mod metrics;
pub mod policy;
pub mod port;
pub mod relay;
pub mod router;
pub mod server;
pub mod services;
#[cfg(feature = "test-utils")]
pub mod test_utils;
pub mod tunables;
pub mod tunnel;
pub mod virtio;
pub mod vm;

/// Descriptor chains (kept at its old path for callers outside the crate).
pub use virtio::chain;
