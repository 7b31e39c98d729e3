//! Tunables of a [`UserGuest`](super::UserGuest), with units in their names, and their
//! validation.

use super::error::ConfigError;
use domsock_proto::{Cid, EndpointConfig};
use std::time::Duration;

/// Default entries of the rx and tx rings.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Entries of the event ring (the device only ever uses a few).
pub const EVENT_QUEUE_SIZE: u16 = 8;
/// Default RX payload buffer: Linux's `VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE`.
pub const DEFAULT_RX_PAYLOAD_BYTES: u32 = 4096;
/// Largest packet payload either direction: Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`.
pub const MAX_PACKET_PAYLOAD_BYTES: u32 = 64 * 1024;
/// Default number of RX buffers beyond those posted, which connections may hold on to until
/// the application reads them (see [`GuestConfig::rx_spare_buffers`]).
pub const DEFAULT_RX_SPARE_BUFFERS: u32 = 1024;
/// Default pending connections per listener.
pub const DEFAULT_LISTEN_BACKLOG: usize = 128;
/// Default bound on one vhost-user request/reply exchange.
pub const DEFAULT_VHOST_USER_TIMEOUT_MS: u64 = 5_000;

/// How a packet's 44-byte header and its payload share descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderPlacement {
    /// Header and payload in one descriptor (Linux >= 6.2 RX buffers).
    SameDescriptor,
    /// Header in a descriptor of its own, payload in the next (Linux TX, Linux <= 6.1 RX).
    SeparateDescriptor,
}

/// The RX buffers posted to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxLayout {
    /// Payload bytes per buffer (after the header).
    pub payload_bytes: u32,
    /// Header placement.
    pub header: HeaderPlacement,
}

impl RxLayout {
    /// What Linux >= 6.2 posts: one descriptor of header + 4 KiB.
    pub const LINUX: RxLayout = RxLayout {
        payload_bytes: DEFAULT_RX_PAYLOAD_BYTES,
        header: HeaderPlacement::SameDescriptor,
    };
    /// What Linux <= 6.1 posts: a header descriptor and a 4 KiB payload descriptor.
    pub const LINUX_6_1: RxLayout = RxLayout {
        payload_bytes: DEFAULT_RX_PAYLOAD_BYTES,
        header: HeaderPlacement::SeparateDescriptor,
    };
}

impl Default for RxLayout {
    fn default() -> Self {
        Self::LINUX
    }
}

/// How a [`UserGuest`](super::UserGuest) sets up its device and sockets.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The guest CID. Used when the device has no config space; when it has one, the CID
    /// it reports must equal this (if set).
    pub cid: Option<Cid>,
    /// Entries of the rx and tx rings (power of two; the backend bounds it too, both
    /// domsockd and vhost-device-vsock allow 1024 by default).
    pub queue_size: u16,
    /// RX buffers.
    pub rx_layout: RxLayout,
    /// RX buffers kept beyond the posted ones. A received packet stays in its buffer until
    /// the application reads it (no copy in between) as long as a spare buffer can take its
    /// place in the ring; when none is left, its payload is copied out to the heap and the
    /// buffer goes straight back to the ring, so the ring never starves.
    pub rx_spare_buffers: u32,
    /// TX descriptors: Linux puts the header in a descriptor of its own.
    pub tx_header: HeaderPlacement,
    /// Largest payload of one TX packet; larger writes are cut into several packets.
    pub max_tx_payload_bytes: u32,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if the device offers it.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_VSOCK_F_SEQPACKET` if the device offers it.
    pub seqpacket: bool,
    /// The protocol core's tunables (`buf_alloc_bytes` is each connection's receive buffer).
    pub endpoint: EndpointConfig,
    /// Pending connections per listener; more are refused.
    pub listen_backlog: usize,
    /// Bound on each vhost-user request/reply exchange.
    pub vhost_user_timeout: Duration,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            cid: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            rx_layout: RxLayout::default(),
            rx_spare_buffers: DEFAULT_RX_SPARE_BUFFERS,
            tx_header: HeaderPlacement::SeparateDescriptor,
            max_tx_payload_bytes: MAX_PACKET_PAYLOAD_BYTES,
            event_idx: true,
            seqpacket: true,
            endpoint: EndpointConfig::default(),
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            vhost_user_timeout: Duration::from_millis(DEFAULT_VHOST_USER_TIMEOUT_MS),
        }
    }
}

impl GuestConfig {
    /// The default configuration with an explicit CID.
    pub fn with_cid(cid: Cid) -> Self {
        Self {
            cid: Some(cid),
            ..Self::default()
        }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.queue_size.is_power_of_two() || !(4..=32768).contains(&self.queue_size) {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        if !(1..=MAX_PACKET_PAYLOAD_BYTES).contains(&self.rx_layout.payload_bytes) {
            return Err(ConfigError::RxPayload(self.rx_layout.payload_bytes));
        }
        if !(1..=MAX_PACKET_PAYLOAD_BYTES).contains(&self.max_tx_payload_bytes) {
            return Err(ConfigError::TxPayload(self.max_tx_payload_bytes));
        }
        if self.endpoint.buf_alloc_bytes == 0 {
            return Err(ConfigError::BufAlloc);
        }
        if self.listen_backlog == 0 {
            return Err(ConfigError::Backlog);
        }
        if let Some(cid) = self.cid {
            if !cid.is_guest() {
                return Err(ConfigError::Cid(cid.0));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert_eq!(GuestConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut GuestConfig)| {
            let mut c = GuestConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.queue_size = 100), ConfigError::QueueSize(100));
        assert_eq!(bad(|c| c.queue_size = 2), ConfigError::QueueSize(2));
        assert_eq!(
            bad(|c| c.rx_layout.payload_bytes = 0),
            ConfigError::RxPayload(0)
        );
        assert_eq!(
            bad(|c| c.max_tx_payload_bytes = 70_000),
            ConfigError::TxPayload(70_000)
        );
        assert_eq!(
            bad(|c| c.endpoint.buf_alloc_bytes = 0),
            ConfigError::BufAlloc
        );
        assert_eq!(bad(|c| c.cid = Some(Cid::HOST)), ConfigError::Cid(2));
    }
}
