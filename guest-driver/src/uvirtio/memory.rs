//! Guest memory: one memfd mapped shared at guest physical address 0, so the backend can map
//! the same pages from the fd it receives with `SET_MEM_TABLE`; and where everything lives
//! in it.
//!
//! ```text
//! 0x0000  unused (virtio-queue treats rings at address 0 as unset)
//! 0x1000  rx ring | tx ring | event ring            each page aligned
//!         tx slots:  queue_size x [20 pad | 44 header | payload ...]   64-byte aligned
//!         rx buffers: (posted + spare) x [20 pad | 44 header | payload ...]
//!         event buffers: EVENT_QUEUE_SIZE x 8 bytes
//! ```
//! A slot's header ends where its payload starts (offset 64), so the same slot serves a
//! chain with the header in its own descriptor, one with header and payload in a single
//! descriptor, and any other cut of the slot into descriptors.

use super::config::{GuestConfig, HeaderPlacement, EVENT_QUEUE_SIZE};
use super::error::SetupError;
use super::ring::RingAddrs;
use domsock_proto::HEADER_LEN;
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::fs::File;
use std::io;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Guest memory as the driver uses it.
pub(crate) type Mem = GuestMemoryMmap<()>;

const PAGE_BYTES: u64 = 4096;
/// Offset of the header in a TX slot or RX buffer; the payload follows at 64.
const SLOT_HEADER_OFFSET: u64 = 64 - HEADER_LEN as u64;
const SLOT_PAYLOAD_OFFSET: u64 = 64;
/// Room per event buffer (`struct virtio_vsock_event { le32 id; }`, padded).
pub(crate) const EVENT_BUFFER_BYTES: u32 = 8;

/// An array of equally sized slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotArray {
    base: u64,
    stride: u64,
    /// Number of slots.
    pub count: u32,
}

impl SlotArray {
    fn slot(&self, i: u32) -> u64 {
        debug_assert!(i < self.count);
        self.base + self.stride * u64::from(i)
    }

    /// Where slot `i` starts (for slots without a header, such as event buffers).
    pub fn start(&self, i: u32) -> GuestAddress {
        GuestAddress(self.slot(i))
    }

    /// Where slot `i`'s 44-byte header goes.
    pub fn header(&self, i: u32) -> GuestAddress {
        GuestAddress(self.slot(i) + SLOT_HEADER_OFFSET)
    }

    /// Where slot `i`'s payload goes (right after the header).
    pub fn payload(&self, i: u32) -> GuestAddress {
        GuestAddress(self.slot(i) + SLOT_PAYLOAD_OFFSET)
    }

    fn end(&self) -> u64 {
        self.base + self.stride * u64::from(self.count)
    }
}

/// Where everything lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// rx, tx, event rings.
    pub rings: [RingAddrs; 3],
    /// One TX slot per ring entry.
    pub tx: SlotArray,
    /// RX buffers: posted plus spare.
    pub rx: SlotArray,
    /// RX buffers kept posted.
    pub rx_posted: u32,
    /// Event buffers.
    pub event: SlotArray,
    /// Total bytes of guest memory.
    pub bytes: u64,
}

impl Layout {
    /// Lays out memory for `cfg` (which must be valid).
    pub fn new(cfg: &GuestConfig) -> Self {
        let mut at = PAGE_BYTES;
        let mut ring = |size: u16| {
            let r = RingAddrs::at(at, size);
            at = (at + RingAddrs::footprint(size)).next_multiple_of(PAGE_BYTES);
            r
        };
        let rings = [
            ring(cfg.queue_size),
            ring(cfg.queue_size),
            ring(EVENT_QUEUE_SIZE),
        ];
        let tx = SlotArray {
            base: at,
            stride: (SLOT_PAYLOAD_OFFSET + u64::from(cfg.max_tx_payload_bytes))
                .next_multiple_of(64),
            count: u32::from(cfg.queue_size),
        };
        let descs_per_rx = match cfg.rx_layout.header {
            HeaderPlacement::SameDescriptor => 1,
            HeaderPlacement::SeparateDescriptor => 2,
        };
        let rx_posted = u32::from(cfg.queue_size) / descs_per_rx;
        let rx = SlotArray {
            base: tx.end().next_multiple_of(PAGE_BYTES),
            stride: (SLOT_PAYLOAD_OFFSET + u64::from(cfg.rx_layout.payload_bytes))
                .next_multiple_of(64),
            count: rx_posted + cfg.rx_spare_buffers,
        };
        let event = SlotArray {
            base: rx.end().next_multiple_of(PAGE_BYTES),
            stride: u64::from(EVENT_BUFFER_BYTES),
            count: u32::from(EVENT_QUEUE_SIZE),
        };
        Self {
            rings,
            tx,
            rx,
            rx_posted,
            event,
            bytes: event.end().next_multiple_of(PAGE_BYTES),
        }
    }
}

/// Creates zeroed, memfd-backed guest memory of `bytes` at guest address 0.
pub(crate) fn create(bytes: u64) -> Result<Mem, SetupError> {
    let memory_err = |source: io::Error| SetupError::Memory { bytes, source };
    let fd = memfd_create("domsock-guest", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| memory_err(io::Error::from(e)))?;
    let file = File::from(fd);
    file.set_len(bytes).map_err(memory_err)?;
    let len = usize::try_from(bytes).map_err(|_| memory_err(io::ErrorKind::InvalidInput.into()))?;
    Mem::from_ranges_with_files(&[(GuestAddress(0), len, Some(FileOffset::new(file, 0)))])
        .map_err(SetupError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uvirtio::config::RxLayout;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn layout_does_not_overlap_and_fits() {
        for header in [
            HeaderPlacement::SameDescriptor,
            HeaderPlacement::SeparateDescriptor,
        ] {
            let cfg = GuestConfig {
                rx_layout: RxLayout {
                    payload_bytes: 4096,
                    header,
                },
                ..GuestConfig::default()
            };
            let l = Layout::new(&cfg);
            let ring_ends: Vec<u64> = l
                .rings
                .iter()
                .map(|r| r.desc.0 + RingAddrs::footprint(r.size))
                .collect();
            assert!(ring_ends[0] <= l.rings[1].desc.0);
            assert!(ring_ends[1] <= l.rings[2].desc.0);
            assert!(ring_ends[2] <= l.tx.base);
            assert!(l.tx.end() <= l.rx.base);
            assert!(l.rx.end() <= l.event.base);
            assert!(l.event.end() <= l.bytes);
            assert_eq!(l.tx.payload(0).0 % 64, 0);
            assert_eq!(l.rx.header(1).0 + HEADER_LEN as u64, l.rx.payload(1).0);
            let posted = match header {
                HeaderPlacement::SameDescriptor => 256,
                HeaderPlacement::SeparateDescriptor => 128,
            };
            assert_eq!(l.rx_posted, posted);
        }
    }

    #[test]
    fn memory_is_a_shared_memfd_mapping() {
        let mem = create(1 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(region.file_offset().is_some());
        mem.write_obj(0xabcdu16, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x1000)).unwrap(), 0xabcd);
    }
}
