//! The virtio-vsock device configuration space (virtio spec 1.3, section 5.10.4), the one
//! layout both ends of the device read or write outside the queues: domsockd answers
//! `GET_CONFIG` with it, the user-space guest driver reads its CID from it.
//!
//! ```text
//! struct virtio_vsock_config {
//!     le64 guest_cid;
//! };
//! ```
//!
//! What it does not do: decide which CIDs are valid (see [`Cid::is_guest`]) or serve partial
//! reads (the device does).

use crate::addr::Cid;
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The device configuration space, as on the wire.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct VsockConfig {
    guest_cid: U64,
}

impl VsockConfig {
    /// Size of the configuration space in bytes.
    pub const LEN: usize = size_of::<VsockConfig>();

    /// The configuration of a device serving the guest `cid`.
    pub fn new(cid: Cid) -> Self {
        Self {
            guest_cid: cid.0.into(),
        }
    }

    /// The configuration at the start of `bytes`; `None` if there are fewer than
    /// [`VsockConfig::LEN`].
    pub fn from_prefix(bytes: &[u8]) -> Option<Self> {
        Self::read_from_prefix(bytes).ok().map(|(cfg, _)| cfg)
    }

    /// The guest's CID (as the device says; not checked).
    pub fn guest_cid(&self) -> Cid {
        Cid(self.guest_cid.get())
    }

    /// The wire bytes.
    pub fn bytes(&self) -> &[u8; Self::LEN] {
        zerocopy::transmute_ref!(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_one_le64() {
        let cfg = VsockConfig::new(Cid(0x0102_0304_0506_0708));
        assert_eq!(cfg.bytes(), &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(VsockConfig::from_prefix(&cfg.bytes()[..]), Some(cfg));
        assert_eq!(
            VsockConfig::from_prefix(&[3, 0, 0, 0, 0, 0, 0, 0, 9]).map(|c| c.guest_cid()),
            Some(Cid(3))
        );
        assert_eq!(VsockConfig::from_prefix(&[3, 0, 0]), None);
    }
}
