//! Tunables of a [`UserGuest`](super::UserGuest), with units in their names, and their
//! validation.

use super::error::ConfigError;
use domsock_proto::{Cid, EndpointConfig, HEADER_LEN};
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
    /// Cut every TX header into two descriptors after this many bytes (1..=43). No Linux
    /// does this, but the spec lets a driver place buffers as it likes, so a backend must
    /// cope. `None`: the header is not cut.
    pub tx_header_split_at: Option<u32>,
    /// Cut every TX packet's payload into descriptors of at most this many bytes, counted
    /// from the payload's first byte (with [`HeaderPlacement::SameDescriptor`] the first one
    /// also holds the header). Linux >= 6.12 sends large writes as 4 KiB page fragments
    /// (`Some(4096)`). `None`: one descriptor for the payload.
    pub tx_payload_segment_bytes: Option<u32>,
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
            tx_header_split_at: None,
            tx_payload_segment_bytes: None,
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
        if let Some(at) = self.tx_header_split_at {
            if !(1..HEADER_LEN as u32).contains(&at) {
                return Err(ConfigError::TxHeaderSplit(at));
            }
        }
        if self.tx_payload_segment_bytes == Some(0) {
            return Err(ConfigError::TxSegment);
        }
        let descriptors = TxShape::new(self).descriptors(self.max_tx_payload_bytes);
        if descriptors > usize::from(self.queue_size) {
            return Err(ConfigError::TxChainTooLong {
                descriptors,
                queue_size: self.queue_size,
            });
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

/// How one TX packet is laid out over descriptors. A TX slot holds the header and the
/// payload contiguously, so any cut of that byte range is a valid chain; this says where the
/// cuts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TxShape {
    header: HeaderPlacement,
    header_split_at: Option<u32>,
    payload_segment_bytes: Option<u32>,
}

impl TxShape {
    /// The shape `cfg` asks for (which must be valid).
    pub fn new(cfg: &GuestConfig) -> Self {
        Self {
            header: cfg.tx_header,
            header_split_at: cfg.tx_header_split_at,
            payload_segment_bytes: cfg.tx_payload_segment_bytes,
        }
    }

    /// Where each descriptor of a packet with `payload` bytes ends, in increasing order,
    /// as offsets from the header's first byte; the last is the packet's end.
    pub fn descriptor_ends(&self, payload: u32) -> impl Iterator<Item = u32> {
        let header = HEADER_LEN as u32;
        let end = header + payload;
        let own_header =
            (self.header == HeaderPlacement::SeparateDescriptor && payload > 0).then_some(header);
        let segment_ends = self.payload_segment_bytes.into_iter().flat_map(move |s| {
            (1..)
                .map(move |i: u32| header.saturating_add(i.saturating_mul(s)))
                .take_while(move |&at| at < end)
        });
        self.header_split_at
            .into_iter()
            .chain(own_header)
            .chain(segment_ends)
            .chain(std::iter::once(end))
    }

    /// Descriptors a packet with `payload` bytes takes.
    pub fn descriptors(&self, payload: u32) -> usize {
        self.descriptor_ends(payload).count()
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
        assert_eq!(
            bad(|c| c.tx_header_split_at = Some(0)),
            ConfigError::TxHeaderSplit(0)
        );
        assert_eq!(
            bad(|c| c.tx_header_split_at = Some(44)),
            ConfigError::TxHeaderSplit(44)
        );
        assert_eq!(
            bad(|c| c.tx_payload_segment_bytes = Some(0)),
            ConfigError::TxSegment
        );
        // 64 KiB in 1000-byte pieces is 66 descriptors, plus the header's.
        assert_eq!(
            bad(|c| {
                c.tx_payload_segment_bytes = Some(1000);
                c.queue_size = 64;
            }),
            ConfigError::TxChainTooLong {
                descriptors: 67,
                queue_size: 64
            }
        );
        let mut ok = GuestConfig {
            tx_payload_segment_bytes: Some(1000),
            tx_header_split_at: Some(1),
            ..GuestConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        ok.queue_size = 64;
        ok.max_tx_payload_bytes = 60_000;
        assert_eq!(ok.validate(), Ok(()), "60 + 2 descriptors fit 64");
    }

    fn ends(cfg: &GuestConfig, payload: u32) -> Vec<u32> {
        TxShape::new(cfg).descriptor_ends(payload).collect()
    }

    #[test]
    fn tx_shape_default_is_linux_6_1() {
        let cfg = GuestConfig::default();
        assert_eq!(ends(&cfg, 0), [44]);
        assert_eq!(ends(&cfg, 100), [44, 144]);
        assert_eq!(TxShape::new(&cfg).descriptors(65_536), 2);
        let same = GuestConfig {
            tx_header: HeaderPlacement::SameDescriptor,
            ..GuestConfig::default()
        };
        assert_eq!(ends(&same, 0), [44]);
        assert_eq!(ends(&same, 100), [144]);
    }

    #[test]
    fn tx_shape_cuts_payload_into_segments() {
        let cfg = GuestConfig {
            tx_payload_segment_bytes: Some(4096),
            ..GuestConfig::default()
        };
        // Linux 6.12: header, then page fragments.
        let e = ends(&cfg, 65_536);
        assert_eq!(e.len(), 17);
        assert_eq!(&e[..3], [44, 44 + 4096, 44 + 8192]);
        assert_eq!(e[16], 44 + 65_536);
        // A payload of exactly one segment, one byte more, and less than one.
        assert_eq!(ends(&cfg, 4096), [44, 44 + 4096]);
        assert_eq!(ends(&cfg, 4097), [44, 44 + 4096, 44 + 4097]);
        assert_eq!(ends(&cfg, 10), [44, 54]);
        assert_eq!(ends(&cfg, 0), [44]);
        // With the header in the first segment's descriptor.
        let same = GuestConfig {
            tx_header: HeaderPlacement::SameDescriptor,
            tx_payload_segment_bytes: Some(1000),
            ..GuestConfig::default()
        };
        assert_eq!(ends(&same, 2500), [1044, 2044, 2544]);
        assert_eq!(ends(&same, 1000), [1044]);
        // One-byte segments (the extreme a backend must accept).
        let tiny = GuestConfig {
            tx_payload_segment_bytes: Some(1),
            ..GuestConfig::default()
        };
        assert_eq!(ends(&tiny, 3), [44, 45, 46, 47]);
    }

    #[test]
    fn tx_shape_splits_the_header() {
        let cfg = GuestConfig {
            tx_header_split_at: Some(20),
            ..GuestConfig::default()
        };
        assert_eq!(ends(&cfg, 0), [20, 44]);
        assert_eq!(ends(&cfg, 8), [20, 44, 52]);
        let all = GuestConfig {
            tx_header: HeaderPlacement::SameDescriptor,
            tx_header_split_at: Some(43),
            tx_payload_segment_bytes: Some(3),
            ..GuestConfig::default()
        };
        // The header's last byte shares a descriptor with the first payload segment.
        assert_eq!(ends(&all, 7), [43, 47, 50, 51]);
        assert_eq!(TxShape::new(&all).descriptors(7), 4);
    }
}
