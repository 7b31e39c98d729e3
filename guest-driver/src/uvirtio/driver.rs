//! The virtio-vsock driver: the three rings, the TX slots and RX buffers in guest memory,
//! kicks and calls. It moves packets; what they mean is the socket layer's business.
//!
//! - TX: one slot per ring entry. A packet's header and payload are written into a free
//!   slot (the payload straight from the caller's buffer: the only copy) and published as a
//!   chain of descriptors over it: by default one or two ([`HeaderPlacement`]); optionally
//!   with the header cut in two and the payload cut into segments
//!   ([`GuestConfig::tx_header_split_at`], [`GuestConfig::tx_payload_segment_bytes`]). Slots
//!   come back when the device returns the chain.
//! - RX: a pool of `posted + spare` buffers. [`Driver::refill_rx`] keeps `posted` of them in
//!   the ring. A used buffer is handed to the caller, who either keeps it until the
//!   application has read its payload ([`Driver::may_hold_rx`] says whether a spare can take
//!   its place in the ring) or releases it at once.
//! - event: a few 4-byte buffers for `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
//! - Waiting: [`Driver::wait`] arms calls on the rings (RX and event at once; TX only after
//!   three quarters of the outstanding chains, as Linux's `virtqueue_enable_cb_delayed`),
//!   re-checks the used rings, and sleeps in epoll on the call eventfds.

use super::config::{GuestConfig, HeaderPlacement, TxShape};
use super::error::{DeviceError, SetupError};
use super::memory::{Layout, Mem, EVENT_BUFFER_BYTES};
use super::ring::{RingStats, Seg, SplitRing};
use domsock_proto::{Header, HEADER_LEN};
use std::io;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Ring indices of a vsock device.
pub(crate) const RX_QUEUE: usize = 0;
pub(crate) const TX_QUEUE: usize = 1;
pub(crate) const EVENT_QUEUE: usize = 2;
const QUEUE_NAMES: [&str; 3] = ["rx", "tx", "event"];

/// Counters of one [`UserGuest`](super::UserGuest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// RX ring.
    pub rx_ring: RingStats,
    /// TX ring.
    pub tx_ring: RingStats,
    /// Event ring.
    pub event_ring: RingStats,
    /// Times the guest slept on the call eventfds.
    pub waits: u64,
    /// Call eventfds found signalled after a wait.
    pub calls: u64,
    /// Packets received (valid headers).
    pub rx_packets: u64,
    /// Payload bytes received.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Received packets copied out to the heap because no spare RX buffer was left.
    pub rx_copied: u64,
    /// RX buffers returned shorter than a header.
    pub rx_short: u64,
    /// RX packets with an invalid header.
    pub rx_bad_header: u64,
    /// RX packets whose header claims more payload than the device wrote.
    pub rx_truncated: u64,
    /// RX packets for another CID.
    pub rx_misaddressed: u64,
    /// Connection requests refused (no listener, backlog full, wrong type).
    pub refused_requests: u64,
    /// Connections reset because the peer broke the protocol.
    pub protocol_resets: u64,
    /// Transport reset events from the device.
    pub transport_resets: u64,
}

/// Rings, buffers and notifications of one device.
#[derive(Debug)]
pub(crate) struct Driver {
    mem: Mem,
    layout: Layout,
    rings: Vec<SplitRing>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    epoll: Epoll,
    epoll_events: Vec<EpollEvent>,
    tx_free: Vec<u32>,
    tx_shape: TxShape,
    /// The chain being built by [`Driver::send`], kept to reuse its allocation.
    tx_segs: Vec<Seg>,
    max_tx_payload_bytes: u32,
    rx_free: Vec<u32>,
    rx_in_ring: u32,
    rx_header: HeaderPlacement,
    rx_payload_bytes: u32,
    events_posted: bool,
    pub stats: GuestStats,
}

impl Driver {
    /// Rings in zeroed `mem` laid out by `layout`, with `queues` rings (2 or 3).
    pub fn new(
        cfg: &GuestConfig,
        layout: Layout,
        mem: Mem,
        event_idx: bool,
        queues: usize,
    ) -> Result<Self, SetupError> {
        let notify =
            |what: &'static str| move |source: io::Error| SetupError::Notify { what, source };
        let mut rings = Vec::new();
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        let epoll = Epoll::new().map_err(notify("epoll"))?;
        for (q, name) in QUEUE_NAMES.iter().enumerate().take(queues) {
            rings.push(
                SplitRing::new(name, layout.rings[q], event_idx, &mem)
                    .map_err(SetupError::Device)?,
            );
            kicks.push(EventFd::new(EFD_NONBLOCK).map_err(notify("kick eventfd"))?);
            let call = EventFd::new(EFD_NONBLOCK).map_err(notify("call eventfd"))?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(&call),
                    EpollEvent::new(EventSet::IN, q as u64),
                )
                .map_err(notify("epoll registration"))?;
            calls.push(call);
        }
        Ok(Self {
            mem,
            tx_free: (0..layout.tx.count).rev().collect(),
            rx_free: (0..layout.rx.count).rev().collect(),
            layout,
            rings,
            kicks,
            calls,
            epoll,
            epoll_events: vec![EpollEvent::default(); 4],
            tx_shape: TxShape::new(cfg),
            tx_segs: Vec::new(),
            max_tx_payload_bytes: cfg.max_tx_payload_bytes,
            rx_in_ring: 0,
            rx_header: cfg.rx_layout.header,
            rx_payload_bytes: cfg.rx_layout.payload_bytes,
            events_posted: false,
            stats: GuestStats::default(),
        })
    }

    /// Guest memory.
    pub fn mem(&self) -> &Mem {
        &self.mem
    }

    /// Ring `q`'s addresses, kick and call eventfds (for the vhost-user setup).
    pub fn queue(&self, q: usize) -> (super::ring::RingAddrs, &EventFd, &EventFd) {
        (self.rings[q].addrs(), &self.kicks[q], &self.calls[q])
    }

    /// Rings set up.
    pub fn queues(&self) -> usize {
        self.rings.len()
    }

    /// Counters, with the rings' own.
    pub fn stats(&self) -> GuestStats {
        let mut s = self.stats;
        s.rx_ring = self.rings[RX_QUEUE].stats();
        s.tx_ring = self.rings[TX_QUEUE].stats();
        if let Some(r) = self.rings.get(EVENT_QUEUE) {
            s.event_ring = r.stats();
        }
        s
    }

    // ---- TX -----------------------------------------------------------------------------

    /// Packets and descriptors that packets with these payload lengths (0: header only)
    /// take.
    pub fn tx_footprint(&self, payloads: impl IntoIterator<Item = usize>) -> (usize, usize) {
        let (mut packets, mut descs) = (0, 0);
        for len in payloads {
            packets += 1;
            descs += self
                .tx_shape
                .descriptors(u32::try_from(len).unwrap_or(u32::MAX));
        }
        (packets, descs)
    }

    /// Whether packets with these payload lengths (0: header only) fit in the TX ring now.
    pub fn tx_room(&self, payloads: impl IntoIterator<Item = usize>) -> bool {
        let (packets, descs) = self.tx_footprint(payloads);
        self.tx_free.len() >= packets && self.rings[TX_QUEUE].free_descriptors() >= descs
    }

    /// Entries of the TX ring (descriptors, and TX slots).
    pub fn tx_ring_size(&self) -> usize {
        usize::from(self.rings[TX_QUEUE].addrs().size)
    }

    /// Largest payload of one TX packet (what a TX slot holds after its header).
    pub fn max_tx_payload(&self) -> usize {
        self.max_tx_payload_bytes as usize
    }

    /// Publishes one packet. The caller checked [`Driver::tx_room`] and that `payload` fits
    /// [`Driver::max_tx_payload`]; `hdr.len()` must equal `payload.len()`.
    pub fn send(&mut self, hdr: &Header, payload: &[u8]) -> Result<(), DeviceError> {
        debug_assert_eq!(hdr.len() as usize, payload.len());
        let slot = self.tx_free.pop().expect("tx_room checked by the caller");
        let h = self.layout.tx.header(slot);
        let p = self.layout.tx.payload(slot);
        self.mem
            .write_slice(&hdr.encode(), h)
            .map_err(|e| DeviceError::memory(h, e))?;
        if !payload.is_empty() {
            self.mem
                .write_slice(payload, p)
                .map_err(|e| DeviceError::memory(p, e))?;
        }
        // The slot holds header and payload contiguously (`p` is where the header ends), so
        // the chain is a series of cuts of that one range.
        debug_assert_eq!(h.0 + HEADER_LEN as u64, p.0);
        self.tx_segs.clear();
        let mut start = 0;
        for end in self.tx_shape.descriptor_ends(payload.len() as u32) {
            self.tx_segs.push(Seg {
                addr: GuestAddress(h.0 + u64::from(start)),
                len: end - start,
                writable: false,
            });
            start = end;
        }
        self.rings[TX_QUEUE].add(&self.mem, &self.tx_segs, slot)?;
        self.stats.tx_packets += 1;
        self.stats.tx_bytes += payload.len() as u64;
        Ok(())
    }

    /// Takes back the TX chains the device is done with; returns how many.
    pub fn reclaim_tx(&mut self) -> Result<usize, DeviceError> {
        let mut n = 0;
        while let Some(used) = self.rings[TX_QUEUE].pop_used(&self.mem)? {
            self.tx_free.push(used.token);
            n += 1;
        }
        Ok(n)
    }

    /// TX chains the device still owns.
    pub fn tx_outstanding(&self) -> u16 {
        self.rings[TX_QUEUE].outstanding()
    }

    // ---- RX -----------------------------------------------------------------------------

    /// Entries of the RX ring.
    pub fn rx_ring_size(&self) -> usize {
        usize::from(self.rings[RX_QUEUE].addrs().size)
    }

    /// Payload bytes one RX buffer holds.
    pub fn rx_payload_capacity(&self) -> u32 {
        self.rx_payload_bytes
    }

    /// The next RX buffer the device filled: its id and the bytes it wrote (at most a header
    /// plus [`Driver::rx_payload_capacity`], checked by the ring).
    pub fn pop_rx(&mut self) -> Result<Option<(u32, u32)>, DeviceError> {
        let Some(used) = self.rings[RX_QUEUE].pop_used(&self.mem)? else {
            return Ok(None);
        };
        self.rx_in_ring -= 1;
        Ok(Some((used.token, used.len)))
    }

    /// The header bytes of RX buffer `buf`.
    pub fn rx_header(&self, buf: u32) -> Result<[u8; HEADER_LEN], DeviceError> {
        let mut b = [0u8; HEADER_LEN];
        let at = self.layout.rx.header(buf);
        self.mem
            .read_slice(&mut b, at)
            .map_err(|e| DeviceError::memory(at, e))?;
        Ok(b)
    }

    /// Copies payload bytes of RX buffer `buf` from `offset` into `dst` (the caller bounds
    /// `offset + dst.len()` by the packet's length).
    pub fn read_rx(&self, buf: u32, offset: u32, dst: &mut [u8]) -> Result<(), DeviceError> {
        let at = GuestAddress(self.layout.rx.payload(buf).0 + u64::from(offset));
        self.mem
            .read_slice(dst, at)
            .map_err(|e| DeviceError::memory(at, e))
    }

    /// Whether the caller may keep a buffer it just took: enough free buffers remain to fill
    /// the ring again.
    pub fn may_hold_rx(&self) -> bool {
        self.rx_free.len() as u32 >= self.layout.rx_posted - self.rx_in_ring
    }

    /// Returns an RX buffer to the pool.
    pub fn release_rx(&mut self, buf: u32) {
        debug_assert!(buf < self.layout.rx.count);
        self.rx_free.push(buf);
    }

    /// Posts free RX buffers until the ring holds its share.
    pub fn refill_rx(&mut self) -> Result<(), DeviceError> {
        let descs = match self.rx_header {
            HeaderPlacement::SameDescriptor => 1,
            HeaderPlacement::SeparateDescriptor => 2,
        };
        while self.rx_in_ring < self.layout.rx_posted
            && self.rings[RX_QUEUE].free_descriptors() >= descs
        {
            let Some(buf) = self.rx_free.pop() else {
                break;
            };
            let h = self.layout.rx.header(buf);
            let p = self.layout.rx.payload(buf);
            let seg = |addr, len| Seg {
                addr,
                len,
                writable: true,
            };
            let payload = self.rx_payload_bytes;
            let separate = [seg(h, HEADER_LEN as u32), seg(p, payload)];
            let same = [seg(h, HEADER_LEN as u32 + payload)];
            let segs: &[Seg] = match self.rx_header {
                HeaderPlacement::SeparateDescriptor => &separate,
                HeaderPlacement::SameDescriptor => &same,
            };
            self.rings[RX_QUEUE].add(&self.mem, segs, buf)?;
            self.rx_in_ring += 1;
        }
        Ok(())
    }

    // ---- event queue --------------------------------------------------------------------

    /// Posts every event buffer (once, at start).
    pub fn post_events(&mut self) -> Result<(), DeviceError> {
        if self.events_posted || self.rings.len() <= EVENT_QUEUE {
            return Ok(());
        }
        for i in 0..self.layout.event.count {
            self.post_event(i)?;
        }
        self.events_posted = true;
        Ok(())
    }

    fn post_event(&mut self, i: u32) -> Result<(), DeviceError> {
        let seg = Seg {
            addr: self.layout.event.start(i),
            len: EVENT_BUFFER_BYTES,
            writable: true,
        };
        self.rings[EVENT_QUEUE].add(&self.mem, &[seg], i)
    }

    /// The next event id the device sent (`le32 id`); the buffer is posted again. Buffers
    /// returned with fewer than 4 bytes are reposted and skipped.
    pub fn pop_event(&mut self) -> Result<Option<u32>, DeviceError> {
        if self.rings.len() <= EVENT_QUEUE {
            return Ok(None);
        }
        while let Some(used) = self.rings[EVENT_QUEUE].pop_used(&self.mem)? {
            let at = self.layout.event.start(used.token);
            let id = if used.len >= 4 {
                Some(u32::from_le(
                    self.mem
                        .read_obj::<u32>(at)
                        .map_err(|e| DeviceError::memory(at, e))?,
                ))
            } else {
                None
            };
            self.post_event(used.token)?;
            if id.is_some() {
                return Ok(id);
            }
        }
        Ok(None)
    }

    // ---- notifications ------------------------------------------------------------------

    /// Kicks every ring that has new chains and whose device side asked for a kick.
    pub fn kick(&mut self) -> Result<(), DeviceError> {
        for q in 0..self.rings.len() {
            if self.rings[q].kick_needed(&self.mem)? {
                self.kicks[q].write(1).map_err(|source| DeviceError::Kick {
                    queue: self.rings[q].name(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Kicks every ring, whatever the device asked (once, when the rings start).
    pub fn kick_all(&mut self) -> Result<(), DeviceError> {
        for q in 0..self.rings.len() {
            self.rings[q].kick_needed(&self.mem)?;
            self.kicks[q].write(1).map_err(|source| DeviceError::Kick {
                queue: self.rings[q].name(),
                source,
            })?;
        }
        Ok(())
    }

    /// Sleeps until the device calls or `timeout` passes (`None`: no limit). Returns at once
    /// if a used ring already has chains.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<(), DeviceError> {
        let mut ready = false;
        for q in 0..self.rings.len() {
            let ring = &mut self.rings[q];
            let delay = if q == TX_QUEUE {
                if ring.outstanding() == 0 {
                    continue;
                }
                (ring.outstanding() - 1) * 3 / 4
            } else {
                0
            };
            ready |= ring.arm(&self.mem, delay)?;
        }
        if !ready {
            self.stats.waits += 1;
            let ms = match timeout {
                None => -1,
                Some(d) => i32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
            };
            let n = match self.epoll.wait(ms, &mut self.epoll_events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(DeviceError::Wait(e)),
            };
            for ev in &self.epoll_events[..n] {
                let Some(call) = usize::try_from(ev.data())
                    .ok()
                    .and_then(|q| self.calls.get(q))
                else {
                    continue;
                };
                match call.read() {
                    Ok(_) => self.stats.calls += 1,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(DeviceError::Wait(e)),
                }
            }
        }
        for r in &self.rings {
            r.disarm(&self.mem)?;
        }
        Ok(())
    }
}
