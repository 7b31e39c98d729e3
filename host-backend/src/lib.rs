//! domsockd: a vhost-user vsock device backend serving many VMs in one process.
//!
//! Each VM gets a thread that accepts its QEMU on a vhost-user socket; the vhost-user
//! worker thread of that VM runs its [`dataplane::DataPlane`], which connects guest vsock
//! connections to host Unix sockets using the hybrid convention of Firecracker and
//! vhost-device-vsock (`<uds>_<port>` for guest-initiated, `CONNECT <port>` on `<uds>` for
//! host-initiated). Protocol decisions live in `domsock-proto`; this crate does the I/O.
//!
//! `unsafe` is denied everywhere but [`iov`], which builds `iovec`s for `writev` from guest
//! memory slices vm-memory has bounds-checked; all other guest memory access goes through
//! vm-memory's checked accessors and sockets through std/nix.

#![deny(unsafe_code)]

pub mod chain;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod device;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod iov;
pub mod metrics;
pub mod policy;
pub mod router;
pub mod server;
pub mod tunables;
