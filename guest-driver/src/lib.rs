//! domsock guest side.
//!
//! For now this holds what the end-to-end tests need inside a QEMU guest: blocking AF_VSOCK
//! socket wrappers ([`vsock`], the only module with `unsafe`) and the deterministic test byte
//! stream with its checksum ([`pattern`]), which host-side tests use too so both ends agree
//! on every byte. The `domsock` binary (src/main.rs) is the guest test program built on them.
#![deny(unsafe_code)]

pub mod pattern;
pub mod vsock;
