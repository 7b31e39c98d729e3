//! domsock guest side.
//!
//! What the end-to-end tests need inside a QEMU guest: blocking AF_VSOCK socket wrappers
//! ([`vsock`], the only module with `unsafe`) and the deterministic test byte stream with its
//! checksum ([`pattern`]), which host-side tests use too so both ends agree on every byte.
//! [`control`] is the client of domsockd's control service (name resolution over AF_VSOCK);
//! [`session`] opens resumable sessions through its session port, connections that survive
//! the vsock device being unplugged and plugged back: byte streams the guest opens or
//! accepts (a registered listener), and seqpacket sessions.
//! [`bus`] makes the guest (or a host process) a member of a bus of domsockd's bus service.
//! The `domsock` binary (src/main.rs) is the guest test program built on them.
//!
//! And a guest without a VM: [`uvirtio`] is a user-space virtio-vsock driver that speaks
//! vhost-user to a backend directly, for hermetic integration tests and benchmarks.
#![deny(unsafe_code)]

pub mod bus;
pub mod control;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod pattern;
pub mod session;
pub mod uvirtio;
pub mod vsock;
