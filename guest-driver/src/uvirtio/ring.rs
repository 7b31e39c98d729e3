//! The driver side of one split virtqueue (virtio 1.x, section 2.7) living in guest memory.
//!
//! ```text
//! desc  [size] { le64 addr; le32 len; le16 flags; le16 next; }      written by us
//! avail        { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }   written by us
//! used         { le16 flags; le16 idx; {le32 id; le32 len} ring[size]; le16 avail_event; }
//!                                                                   written by the device
//! ```
//!
//! [`SplitRing`] hands out descriptors from a free list, publishes chains in the avail ring
//! and takes them back from the used ring. The device is untrusted: the descriptor chain of
//! every outstanding head is remembered here (the table in shared memory is never read back),
//! and every used element is checked against it (known head, written length within the
//! chain's writable bytes, `used.idx` not running ahead of what is outstanding). A violation
//! is a [`DeviceError`]; the caller treats the device as broken.
//!
//! Notification suppression, both directions:
//! - kicks (driver -> device): [`SplitRing::kick_needed`] decides once per batch of published
//!   chains, from the device's `avail_event` with `VIRTIO_RING_F_EVENT_IDX`, else from
//!   `VRING_USED_F_NO_NOTIFY`;
//! - calls (device -> driver): the ring starts with calls suppressed; [`SplitRing::arm`] asks
//!   for one (`used_event`, or clearing `VRING_AVAIL_F_NO_INTERRUPT`) just before the driver
//!   blocks, and [`SplitRing::disarm`] suppresses them again once it runs.
//!
//! The fixed layouts ([`Desc`], [`UsedElem`], the `flags`/`idx` [`RingHeader`] both rings
//! start with) are `#[repr(C)]` structs of `zerocopy` little-endian fields; every offset
//! below derives from them. The two indices and the event words are read and written as
//! single atomic `u16`s (converted with `to_le`/`from_le`), as the ordering rules need.
//! The tests' fake device reads the rings with offsets of its own, so a layout mistake here
//! cannot hide behind the same mistake there.
//!
//! What it does not do: indirect descriptors, packed rings, or anything vsock-specific.

use super::error::DeviceError;
use std::mem::{offset_of, size_of};
use std::sync::atomic::{fence, Ordering};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

type Mem = GuestMemoryMmap<()>;

/// `VRING_DESC_F_NEXT`.
const DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
const DESC_F_WRITE: u16 = 2;
/// `VRING_AVAIL_F_NO_INTERRUPT`.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VRING_USED_F_NO_NOTIFY`.
const USED_F_NO_NOTIFY: u16 = 1;

/// One entry of the descriptor table (`struct virtq_desc`).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Desc {
    addr: U64,
    len: U32,
    flags: U16,
    next: U16,
}

/// One entry of the used ring (`struct virtq_used_elem`).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct UsedElem {
    id: U32,
    len: U32,
}

/// What the avail and used rings start with; their entries follow, then one `le16` event
/// word (`used_event` after avail entries, `avail_event` after used ones).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RingHeader {
    flags: U16,
    idx: U16,
}

const DESC_BYTES: u64 = size_of::<Desc>() as u64;
const USED_ELEM_BYTES: u64 = size_of::<UsedElem>() as u64;
/// An avail ring entry: a `le16` head index.
const AVAIL_ELEM_BYTES: u64 = size_of::<U16>() as u64;
const RING_HEADER_BYTES: u64 = size_of::<RingHeader>() as u64;
const RING_IDX_OFFSET: u64 = offset_of!(RingHeader, idx) as u64;
/// The `le16` event word after a ring's entries.
const EVENT_BYTES: u64 = size_of::<U16>() as u64;

const _: () = assert!(DESC_BYTES == 16 && USED_ELEM_BYTES == 8 && RING_HEADER_BYTES == 4);

/// Where one split ring lives in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingAddrs {
    /// Descriptor table (16-byte aligned).
    pub desc: GuestAddress,
    /// Available ring (2-byte aligned).
    pub avail: GuestAddress,
    /// Used ring (4-byte aligned).
    pub used: GuestAddress,
    /// Entries.
    pub size: u16,
}

impl RingAddrs {
    /// Bytes the three parts take, laid out from `base` as [`RingAddrs::at`] does.
    pub fn footprint(size: u16) -> u64 {
        let n = u64::from(size);
        let avail_end = DESC_BYTES * n + RING_HEADER_BYTES + AVAIL_ELEM_BYTES * n + EVENT_BYTES;
        avail_end.next_multiple_of(4) + RING_HEADER_BYTES + USED_ELEM_BYTES * n + EVENT_BYTES
    }

    /// The parts packed from `base`, which must be 16-byte aligned.
    pub fn at(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + DESC_BYTES * n;
        let used =
            (avail + RING_HEADER_BYTES + AVAIL_ELEM_BYTES * n + EVENT_BYTES).next_multiple_of(4);
        Self {
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            size,
        }
    }
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seg {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A chain the device handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UsedChain {
    /// The token given to [`SplitRing::add`].
    pub token: u32,
    /// Bytes the device says it wrote (checked against the chain's writable bytes).
    pub len: u32,
}

/// What we remember about a chain the device owns.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    descs: u16,
    token: u32,
    writable_bytes: u64,
}

/// Notification counters of one ring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Chains published.
    pub chains: u64,
    /// Kicks sent to the device.
    pub kicks: u64,
    /// Batches of published chains for which the device asked not to be kicked.
    pub kicks_suppressed: u64,
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub(crate) struct SplitRing {
    name: &'static str,
    addrs: RingAddrs,
    event_idx: bool,
    free: Vec<u16>,
    /// Our copy of every descriptor's `next`, so freeing never trusts shared memory.
    next: Vec<u16>,
    chains: Vec<Option<Outstanding>>,
    outstanding: u16,
    next_avail: u16,
    /// `next_avail` when the last kick decision was made.
    kick_checked_at: u16,
    last_used: u16,
    stats: RingStats,
}

/// `vring_need_event()` of the virtio spec: whether moving an index from `old` to `new`
/// crosses the other side's `event` index.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl SplitRing {
    /// A ring at `addrs`, whose memory must be zeroed. Calls start suppressed.
    pub fn new(
        name: &'static str,
        addrs: RingAddrs,
        event_idx: bool,
        mem: &Mem,
    ) -> Result<Self, DeviceError> {
        let size = addrs.size;
        let ring = Self {
            name,
            addrs,
            event_idx,
            free: (0..size).rev().collect(),
            next: vec![0; usize::from(size)],
            chains: vec![None; usize::from(size)],
            outstanding: 0,
            next_avail: 0,
            kick_checked_at: 0,
            last_used: 0,
            stats: RingStats::default(),
        };
        ring.disarm(mem)?;
        Ok(ring)
    }

    /// Name for errors and logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where the ring lives.
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains the device owns.
    pub fn outstanding(&self) -> u16 {
        self.outstanding
    }

    /// Counters.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// Writes a chain and publishes it. The caller checked [`SplitRing::free_descriptors`];
    /// `segs` must not be empty.
    pub fn add(&mut self, mem: &Mem, segs: &[Seg], token: u32) -> Result<(), DeviceError> {
        assert!(
            !segs.is_empty() && segs.len() <= self.free.len(),
            "{} ring: chain of {} descriptors with {} free",
            self.name,
            segs.len(),
            self.free.len()
        );
        let count = segs.len();
        // Indices first, so each descriptor can name its successor.
        let first = self.free.len() - count;
        // No allocation per chain for the usual short ones.
        let mut small = [0u16; 8];
        let mut large = Vec::new();
        let indices: &mut [u16] = if count <= small.len() {
            &mut small[..count]
        } else {
            large.resize(count, 0);
            &mut large
        };
        for (slot, idx) in indices.iter_mut().zip(self.free.drain(first..).rev()) {
            *slot = idx;
        }
        let indices: &[u16] = indices;
        let mut writable_bytes = 0u64;
        for (i, seg) in segs.iter().enumerate() {
            let mut flags = if seg.writable { DESC_F_WRITE } else { 0 };
            let next = match indices.get(i + 1) {
                Some(&n) => {
                    flags |= DESC_F_NEXT;
                    n
                }
                None => 0,
            };
            if seg.writable {
                writable_bytes += u64::from(seg.len);
            }
            self.next[usize::from(indices[i])] = next;
            let d = Desc {
                addr: seg.addr.0.into(),
                len: seg.len.into(),
                flags: flags.into(),
                next: next.into(),
            };
            let at = self.desc_addr(indices[i]);
            mem.write_slice(d.as_bytes(), at)
                .map_err(|e| DeviceError::memory(at, e))?;
        }
        let head = indices[0];
        self.chains[usize::from(head)] = Some(Outstanding {
            descs: count as u16,
            token,
            writable_bytes,
        });
        self.outstanding += 1;
        let slot = u64::from(self.next_avail % self.addrs.size);
        let entry = GuestAddress(self.addrs.avail.0 + RING_HEADER_BYTES + AVAIL_ELEM_BYTES * slot);
        mem.write_obj(head.to_le(), entry)
            .map_err(|e| DeviceError::memory(entry, e))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before the new index.
        let idx = GuestAddress(self.addrs.avail.0 + RING_IDX_OFFSET);
        mem.store(self.next_avail.to_le(), idx, Ordering::Release)
            .map_err(|e| DeviceError::memory(idx, e))?;
        self.stats.chains += 1;
        Ok(())
    }

    /// Whether the chains published since the last call need a kick; records the decision.
    pub fn kick_needed(&mut self, mem: &Mem) -> Result<bool, DeviceError> {
        if self.next_avail == self.kick_checked_at {
            return Ok(false);
        }
        // The device reads avail.idx before it publishes avail_event / flags; our store of
        // avail.idx must be ordered before this load (virtio_mb in Linux).
        fence(Ordering::SeqCst);
        let need = if self.event_idx {
            let at = self.avail_event_addr();
            let event = u16::from_le(
                mem.load::<u16>(at, Ordering::Acquire)
                    .map_err(|e| DeviceError::memory(at, e))?,
            );
            need_event(event, self.next_avail, self.kick_checked_at)
        } else {
            let at = self.addrs.used;
            let flags = u16::from_le(
                mem.load::<u16>(at, Ordering::Acquire)
                    .map_err(|e| DeviceError::memory(at, e))?,
            );
            flags & USED_F_NO_NOTIFY == 0
        };
        self.kick_checked_at = self.next_avail;
        if need {
            self.stats.kicks += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(need)
    }

    /// Whether the device has returned chains we have not taken yet.
    pub fn has_used(&self, mem: &Mem) -> Result<bool, DeviceError> {
        Ok(self.used_idx(mem)? != self.last_used)
    }

    /// The next chain the device returned, validated.
    pub fn pop_used(&mut self, mem: &Mem) -> Result<Option<UsedChain>, DeviceError> {
        let idx = self.used_idx(mem)?;
        if idx == self.last_used {
            return Ok(None);
        }
        let ahead = idx.wrapping_sub(self.last_used);
        if ahead > self.outstanding {
            return Err(DeviceError::UsedIdxJump {
                queue: self.name,
                last: self.last_used,
                idx,
                outstanding: self.outstanding,
            });
        }
        let slot = u64::from(self.last_used % self.addrs.size);
        let at = GuestAddress(self.addrs.used.0 + RING_HEADER_BYTES + USED_ELEM_BYTES * slot);
        let mut elem = UsedElem::new_zeroed();
        mem.read_slice(elem.as_mut_bytes(), at)
            .map_err(|e| DeviceError::memory(at, e))?;
        let (id, len) = (elem.id.get(), elem.len.get());
        let chain = usize::try_from(id)
            .ok()
            .and_then(|i| self.chains.get(i).copied().flatten())
            .ok_or(DeviceError::UnknownUsedId {
                queue: self.name,
                id,
            })?;
        if u64::from(len) > chain.writable_bytes {
            return Err(DeviceError::UsedLenTooLong {
                queue: self.name,
                id,
                len,
                capacity: chain.writable_bytes,
            });
        }
        // `id` indexes `chains`, so it fits in u16.
        let head = id as u16;
        self.chains[usize::from(head)] = None;
        let mut i = head;
        for _ in 0..chain.descs {
            self.free.push(i);
            i = self.next[usize::from(i)];
        }
        self.outstanding -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(UsedChain {
            token: chain.token,
            len,
        }))
    }

    /// Asks for a call once the device has used `delay + 1` more chains (`delay` only
    /// matters with EVENT_IDX; without it any used chain calls). Returns whether chains were
    /// already used, in which case the caller must not block.
    pub fn arm(&mut self, mem: &Mem, delay: u16) -> Result<bool, DeviceError> {
        if self.event_idx {
            let at = self.used_event_addr();
            let event = self.last_used.wrapping_add(delay);
            mem.store(event.to_le(), at, Ordering::Release)
                .map_err(|e| DeviceError::memory(at, e))?;
        } else {
            let at = self.addrs.avail;
            mem.store(0u16, at, Ordering::Release)
                .map_err(|e| DeviceError::memory(at, e))?;
        }
        // Our store must be visible before we re-read used.idx: a device that used a chain
        // before seeing it would not call, and we would sleep on a chain already there.
        fence(Ordering::SeqCst);
        self.has_used(mem)
    }

    /// Suppresses calls again (without EVENT_IDX; with it, `used_event` now lies behind
    /// `used.idx` and will not be crossed until the index wraps around).
    pub fn disarm(&self, mem: &Mem) -> Result<(), DeviceError> {
        if !self.event_idx {
            let at = self.addrs.avail;
            mem.store(AVAIL_F_NO_INTERRUPT.to_le(), at, Ordering::Release)
                .map_err(|e| DeviceError::memory(at, e))?;
        }
        Ok(())
    }

    fn used_idx(&self, mem: &Mem) -> Result<u16, DeviceError> {
        let at = GuestAddress(self.addrs.used.0 + RING_IDX_OFFSET);
        // Acquire: the used elements are read after the index that published them.
        Ok(u16::from_le(
            mem.load::<u16>(at, Ordering::Acquire)
                .map_err(|e| DeviceError::memory(at, e))?,
        ))
    }

    fn desc_addr(&self, index: u16) -> GuestAddress {
        GuestAddress(self.addrs.desc.0 + DESC_BYTES * u64::from(index))
    }

    fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(
            self.addrs.avail.0 + RING_HEADER_BYTES + AVAIL_ELEM_BYTES * u64::from(self.addrs.size),
        )
    }

    fn avail_event_addr(&self) -> GuestAddress {
        GuestAddress(
            self.addrs.used.0 + RING_HEADER_BYTES + USED_ELEM_BYTES * u64::from(self.addrs.size),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 8;

    /// A descriptor as the device reads it: address, length, flags.
    type RawDesc = (u64, u32, u16);

    /// A device that reads the avail ring and writes the used ring the way a backend would,
    /// including ways a hostile one might.
    struct FakeDevice {
        addrs: RingAddrs,
        next_avail: u16,
        used_idx: u16,
    }

    impl FakeDevice {
        fn new(addrs: RingAddrs) -> Self {
            Self {
                addrs,
                next_avail: 0,
                used_idx: 0,
            }
        }

        fn avail_idx(&self, mem: &Mem) -> u16 {
            mem.read_obj(GuestAddress(self.addrs.avail.0 + 2)).unwrap()
        }

        /// Pops the next available head and its descriptors (addr, len, flags).
        fn pop(&mut self, mem: &Mem) -> Option<(u16, Vec<RawDesc>)> {
            if self.avail_idx(mem) == self.next_avail {
                return None;
            }
            let slot = u64::from(self.next_avail % self.addrs.size);
            let head: u16 = mem
                .read_obj(GuestAddress(self.addrs.avail.0 + 4 + 2 * slot))
                .unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
            let mut descs = Vec::new();
            let mut i = head;
            loop {
                let at = self.addrs.desc.0 + 16 * u64::from(i);
                let addr: u64 = mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(at + 8)).unwrap();
                let flags: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
                let next: u16 = mem.read_obj(GuestAddress(at + 14)).unwrap();
                descs.push((addr, len, flags));
                if flags & DESC_F_NEXT == 0 {
                    break;
                }
                i = next;
            }
            Some((head, descs))
        }

        fn push_used(&mut self, mem: &Mem, id: u32, len: u32) {
            let slot = u64::from(self.used_idx % self.addrs.size);
            let at = self.addrs.used.0 + 4 + 8 * slot;
            mem.write_obj(id, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 4)).unwrap();
            self.used_idx = self.used_idx.wrapping_add(1);
            mem.write_obj(self.used_idx, GuestAddress(self.addrs.used.0 + 2))
                .unwrap();
        }

        fn set_avail_event(&self, mem: &Mem, v: u16) {
            let at = self.addrs.used.0 + 4 + 8 * u64::from(self.addrs.size);
            mem.write_obj(v, GuestAddress(at)).unwrap();
        }

        fn used_event(&self, mem: &Mem) -> u16 {
            let at = self.addrs.avail.0 + 4 + 2 * u64::from(self.addrs.size);
            mem.read_obj(GuestAddress(at)).unwrap()
        }
    }

    fn setup(event_idx: bool) -> (Mem, SplitRing, FakeDevice) {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let addrs = RingAddrs::at(0x1000, SIZE);
        let ring = SplitRing::new("test", addrs, event_idx, &mem).unwrap();
        (mem, ring, FakeDevice::new(addrs))
    }

    fn read_seg(addr: u64, len: u32) -> Seg {
        Seg {
            addr: GuestAddress(addr),
            len,
            writable: false,
        }
    }

    fn write_seg(addr: u64, len: u32) -> Seg {
        Seg {
            addr: GuestAddress(addr),
            len,
            writable: true,
        }
    }

    #[test]
    fn footprint_covers_layout() {
        let a = RingAddrs::at(0, 256);
        assert_eq!(a.avail.0, 4096);
        assert_eq!(a.used.0 % 4, 0);
        assert_eq!(a.used.0 + 6 + 8 * 256, RingAddrs::footprint(256));
    }

    #[test]
    fn chains_round_trip_and_descriptors_are_recycled() {
        let (mem, mut ring, mut dev) = setup(false);
        for round in 0..5u32 {
            ring.add(&mem, &[read_seg(0x8000, 44), read_seg(0x8100, 10)], round)
                .unwrap();
            ring.add(&mem, &[write_seg(0x9000, 100)], 100 + round)
                .unwrap();
            let (h1, d1) = dev.pop(&mem).unwrap();
            assert_eq!(d1, vec![(0x8000, 44, DESC_F_NEXT), (0x8100, 10, 0)]);
            let (h2, d2) = dev.pop(&mem).unwrap();
            assert_eq!(d2, vec![(0x9000, 100, DESC_F_WRITE)]);
            dev.push_used(&mem, u32::from(h2), 60);
            dev.push_used(&mem, u32::from(h1), 0);
            assert_eq!(
                ring.pop_used(&mem).unwrap(),
                Some(UsedChain {
                    token: 100 + round,
                    len: 60
                })
            );
            assert_eq!(
                ring.pop_used(&mem).unwrap(),
                Some(UsedChain {
                    token: round,
                    len: 0
                })
            );
            assert_eq!(ring.pop_used(&mem).unwrap(), None);
            assert_eq!(ring.free_descriptors(), usize::from(SIZE));
        }
    }

    #[test]
    fn hostile_used_entries_are_errors() {
        let (mem, mut ring, mut dev) = setup(false);
        ring.add(&mem, &[write_seg(0x9000, 100)], 7).unwrap();
        let (head, _) = dev.pop(&mem).unwrap();

        // Written length beyond the chain.
        dev.push_used(&mem, u32::from(head), 101);
        assert!(matches!(
            ring.pop_used(&mem),
            Err(DeviceError::UsedLenTooLong { len: 101, .. })
        ));

        // A head that is not outstanding, and one outside the table.
        let (mem, mut ring, mut dev) = setup(false);
        ring.add(&mem, &[write_seg(0x9000, 100)], 7).unwrap();
        dev.pop(&mem).unwrap();
        dev.push_used(&mem, 5, 0);
        assert!(matches!(
            ring.pop_used(&mem),
            Err(DeviceError::UnknownUsedId { id: 5, .. })
        ));
        let (mem, mut ring, mut dev) = setup(false);
        ring.add(&mem, &[write_seg(0x9000, 100)], 7).unwrap();
        dev.push_used(&mem, 70_000, 0);
        assert!(matches!(
            ring.pop_used(&mem),
            Err(DeviceError::UnknownUsedId { id: 70_000, .. })
        ));

        // used.idx running ahead of what is outstanding.
        let (mem, mut ring, _) = setup(false);
        ring.add(&mem, &[write_seg(0x9000, 100)], 7).unwrap();
        mem.write_obj(3u16, GuestAddress(ring.addrs().used.0 + 2))
            .unwrap();
        assert!(matches!(
            ring.pop_used(&mem),
            Err(DeviceError::UsedIdxJump { idx: 3, .. })
        ));

        // The same head returned twice.
        let (mem, mut ring, mut dev) = setup(false);
        ring.add(&mem, &[write_seg(0x9000, 100)], 7).unwrap();
        ring.add(&mem, &[write_seg(0xa000, 100)], 8).unwrap();
        let (head, _) = dev.pop(&mem).unwrap();
        dev.push_used(&mem, u32::from(head), 0);
        dev.push_used(&mem, u32::from(head), 0);
        assert!(ring.pop_used(&mem).unwrap().is_some());
        assert!(matches!(
            ring.pop_used(&mem),
            Err(DeviceError::UnknownUsedId { .. })
        ));
    }

    #[test]
    fn kicks_follow_avail_event() {
        let (mem, mut ring, mut dev) = setup(true);
        // Device wants a kick when avail.idx passes 0 (avail_event = 0).
        ring.add(&mem, &[read_seg(0x8000, 44)], 0).unwrap();
        assert!(ring.kick_needed(&mem).unwrap());
        assert!(!ring.kick_needed(&mem).unwrap(), "nothing new published");
        // The device is busy and has not re-armed: avail_event still 0.
        ring.add(&mem, &[read_seg(0x8000, 44)], 1).unwrap();
        ring.add(&mem, &[read_seg(0x8000, 44)], 2).unwrap();
        assert!(!ring.kick_needed(&mem).unwrap());
        // The device drained the ring and re-armed at its next avail index (3).
        while dev.pop(&mem).is_some() {}
        dev.set_avail_event(&mem, 3);
        ring.add(&mem, &[read_seg(0x8000, 44)], 3).unwrap();
        ring.add(&mem, &[read_seg(0x8000, 44)], 4).unwrap();
        assert!(ring.kick_needed(&mem).unwrap());
        let s = ring.stats();
        assert_eq!((s.kicks, s.kicks_suppressed, s.chains), (2, 1, 5));
    }

    #[test]
    fn kicks_follow_no_notify_flag_without_event_idx() {
        let (mem, mut ring, _) = setup(false);
        ring.add(&mem, &[read_seg(0x8000, 44)], 0).unwrap();
        assert!(ring.kick_needed(&mem).unwrap());
        mem.write_obj(USED_F_NO_NOTIFY, ring.addrs().used).unwrap();
        ring.add(&mem, &[read_seg(0x8000, 44)], 1).unwrap();
        assert!(!ring.kick_needed(&mem).unwrap());
    }

    #[test]
    fn arming_sets_used_event_or_clears_the_flag() {
        let (mem, mut ring, mut dev) = setup(true);
        for t in 0..4 {
            ring.add(&mem, &[write_seg(0x9000, 64)], t).unwrap();
        }
        let (h, _) = dev.pop(&mem).unwrap();
        dev.push_used(&mem, u32::from(h), 0);
        assert!(ring.arm(&mem, 0).unwrap(), "a used chain is waiting");
        ring.pop_used(&mem).unwrap().unwrap();
        assert!(!ring.arm(&mem, 2).unwrap());
        assert_eq!(dev.used_event(&mem), 3, "call after three more chains");

        let (mem, mut ring, _) = setup(false);
        let flags_at = ring.addrs().avail;
        assert_eq!(mem.read_obj::<u16>(flags_at).unwrap(), AVAIL_F_NO_INTERRUPT);
        assert!(!ring.arm(&mem, 0).unwrap());
        assert_eq!(mem.read_obj::<u16>(flags_at).unwrap(), 0);
        ring.disarm(&mem).unwrap();
        assert_eq!(mem.read_obj::<u16>(flags_at).unwrap(), AVAIL_F_NO_INTERRUPT);
    }

    #[test]
    fn need_event_wraps() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 3, 0));
        assert!(need_event(u16::MAX, 1, u16::MAX - 1));
        assert!(!need_event(10, 10, 10));
    }
}
