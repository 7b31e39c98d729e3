//! The one owner of a guest's RX ring: [`GuestPort`].
//!
//! Two kinds of code put packets on a guest's RX queue: the guest's own data plane (its
//! host connections' data and control packets, on its worker thread) and the router
//! (packets of other guests, on the *sender's* worker thread). Both go through the port:
//! the engine with [`GuestPort::with_writer`], the router through [`DomainPort::offer`].
//! Every ring step lives here and only here: popping a chain, loading and checking it
//! (too short or malformed chains go back to the guest empty, counted as
//! `malformed_chains`), writing the header, `add_used`, the packet counters, re-arming
//! notifications when the ring runs dry, and deciding when to interrupt the guest.
//!
//! ```text
//!   engine (own worker) --with_writer(|w| ...)--\
//!                                                +--> GuestPort: Mutex<RxState> --> RX vring
//!   router (sender's worker) --offer(hdr, p)----/        backlog (bounded) if the ring is full
//! ```
//!
//! The port's mutex is the only lock around the ring: whoever holds it may take the
//! vring's own lock, nobody takes the vring's lock without it. When the ring is full, what
//! the router offers waits in a bounded backlog ([`G2G_BACKLOG_MAX_BYTES`] per port, a
//! shared [`G2G_BACKLOG_TOTAL_MAX_BYTES`] over all ports) and goes first the next time
//! anyone writes; RX notifications are armed so the guest kicks its own data plane when it
//! adds buffers, which drains the backlog.
//!
//! What it does not do: decide what to send (the engine's endpoint and the router do) or
//! read host sockets (the engine fills payload slices the writer hands it).

use super::chain::{Mem, Regions};
use crate::metrics::VmStats;
use crate::port::{Availability, DomainPort, HeapPayload, Offer, Payload};
use crate::tunables::{G2G_BACKLOG_MAX_BYTES, G2G_BACKLOG_TOTAL_MAX_BYTES, MAX_RX_PAYLOAD_BYTES};
use crate::vm::VmShared;
use domsock_proto::packet::{SEQ_EOM, SEQ_EOR};
use domsock_proto::{RawHeader, HEADER_LEN};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::debug;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

/// A guest's vring handle as vhost-user-backend gives it.
pub type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

/// The running device's RX queue.
struct RxQueue {
    vring: Vring,
    mem: GuestMemoryAtomic<Mem>,
}

impl RxQueue {
    /// Runs `f` with a writer on the ring (holding the vring's lock); its result and
    /// whether chains were used. `None` if the queue is not ready.
    fn write_with<R>(
        &self,
        stats: &VmStats,
        f: impl FnOnce(&mut RxWriter<'_>) -> R,
    ) -> Option<(R, bool)> {
        let mem = self.mem.memory();
        let mut guard = self.vring.get_mut();
        if !guard.get_queue().ready() {
            return None;
        }
        let mut w = RxWriter {
            queue: guard.get_queue_mut(),
            mem: &mem,
            stats,
            used: false,
        };
        let r = f(&mut w);
        Some((r, w.used))
    }
}

/// A packet (or the tail of one) waiting for RX buffers.
#[derive(Debug)]
struct Queued {
    hdr: RawHeader,
    payload: Vec<u8>,
    delivered: usize,
    header_sent: bool,
}

#[derive(Default)]
struct RxState {
    ring: Option<RxQueue>,
    backlog: VecDeque<Queued>,
    backlog_bytes: usize,
    scratch: Regions,
    /// Chains were used since the guest was last considered for a notification.
    unsignalled: bool,
}

/// One guest's RX side: the only way onto its RX ring.
pub struct GuestPort {
    shared: Arc<VmShared>,
    state: Mutex<RxState>,
    running: AtomicBool,
    /// A frontend set up the device's memory: its queues start soon, so offered packets
    /// wait in the backlog instead of being refused.
    starting: AtomicBool,
    has_backlog: AtomicBool,
    /// Bytes in every port's backlog together (bounded by
    /// [`G2G_BACKLOG_TOTAL_MAX_BYTES`], so many stuck receivers cannot add up).
    backlog_total: Arc<AtomicUsize>,
}

impl std::fmt::Debug for GuestPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestPort")
            .field("vm", &self.shared.name)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it would be a bug; keep serving the other guests.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GuestPort {
    /// The port of `shared`'s guest; `backlog_total` is shared by all ports of a daemon.
    pub fn new(shared: Arc<VmShared>, backlog_total: Arc<AtomicUsize>) -> Self {
        Self {
            shared,
            state: Mutex::new(RxState::default()),
            running: AtomicBool::new(false),
            starting: AtomicBool::new(false),
            has_backlog: AtomicBool::new(false),
            backlog_total,
        }
    }

    /// A frontend gave the device its memory: the guest driver is starting. Until
    /// [`GuestPort::attach`], offered packets wait in the backlog (bounded).
    pub fn prepare(&self) {
        self.starting.store(true, Ordering::Release);
    }

    /// The device runs: packets may be put on `vring`. What waited since
    /// [`GuestPort::prepare`] goes first.
    pub fn attach(&self, vring: Vring, mem: GuestMemoryAtomic<Mem>) {
        let mut st = lock(&self.state);
        st.ring = Some(RxQueue { vring, mem });
        self.running.store(true, Ordering::Release);
        self.starting.store(false, Ordering::Release);
        self.drain_locked(&mut st);
        Self::flush_signal(&mut st);
    }

    /// The device stopped: nothing more goes on its ring, and what waited is dropped (its
    /// connections are being reset).
    pub fn detach(&self) {
        self.running.store(false, Ordering::Release);
        self.starting.store(false, Ordering::Release);
        let mut st = lock(&self.state);
        st.ring = None;
        st.backlog.clear();
        self.backlog_total
            .fetch_sub(std::mem::take(&mut st.backlog_bytes), Ordering::AcqRel);
        self.has_backlog.store(false, Ordering::Release);
    }

    /// Puts what waits in the backlog on the ring, if anything does (cheap otherwise).
    pub fn drain(&self) {
        if !self.has_backlog.load(Ordering::Acquire) {
            return;
        }
        let mut st = lock(&self.state);
        self.drain_locked(&mut st);
        Self::flush_signal(&mut st);
    }

    /// Runs `f` with a writer on the RX ring, after the backlog went first, then
    /// interrupts the guest if chains were used and it asked to be told. `None` when the
    /// ring is not attached or not ready (`f` is not called then).
    pub fn with_writer<R>(&self, f: impl FnOnce(&mut RxWriter<'_>) -> R) -> Option<R> {
        let mut st = lock(&self.state);
        if self.has_backlog.load(Ordering::Acquire) {
            self.drain_locked(&mut st);
        }
        let st = &mut *st;
        let ring = st.ring.as_ref()?;
        let (result, used) = ring.write_with(&self.shared.stats, f)?;
        if used || std::mem::take(&mut st.unsignalled) {
            signal_if_needed(&ring.vring, &ring.mem);
        }
        Some(result)
    }

    fn flush_signal(st: &mut RxState) {
        if std::mem::take(&mut st.unsignalled) {
            if let Some(ring) = &st.ring {
                signal_if_needed(&ring.vring, &ring.mem);
            }
        }
    }

    /// Writes the packet straight into RX chains from `payload[skip..]`; returns payload
    /// bytes written and whether its header went out.
    fn write(st: &mut RxState, stats: &VmStats, q: &PacketOut<'_>) -> (usize, bool) {
        let Some(ring) = st.ring.as_ref() else {
            return (0, false);
        };
        let scratch = &mut st.scratch;
        let Some((r, used)) = ring.write_with(stats, |w| w.put(scratch, q)) else {
            return (0, false);
        };
        st.unsignalled |= used;
        r
    }

    fn drain_locked(&self, st: &mut RxState) {
        let stats = &self.shared.stats;
        while let Some(mut q) = st.backlog.pop_front() {
            let (n, sent) = Self::write(
                st,
                stats,
                &PacketOut {
                    hdr: &q.hdr,
                    payload: &HeapPayload(&q.payload),
                    skip: q.delivered,
                    header_sent: q.header_sent,
                },
            );
            q.delivered += n;
            q.header_sent |= sent;
            if q.header_sent && q.delivered == q.payload.len() {
                let freed = q.payload.len() + HEADER_LEN;
                st.backlog_bytes -= freed;
                self.backlog_total.fetch_sub(freed, Ordering::AcqRel);
            } else {
                st.backlog.push_front(q);
                break;
            }
        }
        self.has_backlog
            .store(!st.backlog.is_empty(), Ordering::Release);
    }
}

/// One packet being written: what [`RxWriter::put`] needs.
struct PacketOut<'a> {
    hdr: &'a RawHeader,
    payload: &'a dyn Payload,
    /// Payload bytes already delivered.
    skip: usize,
    /// The header already went out with an earlier piece.
    header_sent: bool,
}

impl DomainPort for GuestPort {
    fn offer(&self, hdr: RawHeader, payload: &dyn Payload) -> Offer {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let stats = &self.shared.stats;
        let mut delivered = 0usize;
        if st.ring.is_some() && st.backlog.is_empty() {
            let (n, header_sent) = Self::write(
                st,
                stats,
                &PacketOut {
                    hdr: &hdr,
                    payload,
                    skip: 0,
                    header_sent: false,
                },
            );
            if header_sent && n == hdr.len() as usize {
                return Offer::Accepted;
            }
            // The ring ran dry: let the guest see what it got at once, so it refills.
            Self::flush_signal(st);
            delivered = n;
        }
        if st.ring.is_none() && !self.starting.load(Ordering::Acquire) {
            return Offer::Gone;
        }
        let rest = hdr.len() as usize - delivered;
        // Control packets may exceed the byte budget a little: an RST must get through.
        let budget = if hdr.len() == 0 {
            G2G_BACKLOG_MAX_BYTES + (G2G_BACKLOG_MAX_BYTES >> 4)
        } else {
            G2G_BACKLOG_MAX_BYTES
        };
        let total = self.backlog_total.load(Ordering::Acquire);
        if st.backlog_bytes + rest + HEADER_LEN > budget
            || (hdr.len() > 0 && total + rest + HEADER_LEN > G2G_BACKLOG_TOTAL_MAX_BYTES)
        {
            return Offer::Full;
        }
        let mut copy = Vec::with_capacity(rest);
        if !payload.append_to(delivered, rest, &mut copy) {
            // The sender's buffer cannot be read (checked when its chain was loaded);
            // nothing sensible can be queued.
            VmStats::inc(&stats.malformed_chains);
            return Offer::Accepted;
        }
        VmStats::add(&stats.g2g_fallback_bytes, rest as u64);
        let mut tail = hdr;
        tail.set_len(rest as u32);
        st.backlog_bytes += rest + HEADER_LEN;
        self.backlog_total
            .fetch_add(rest + HEADER_LEN, Ordering::AcqRel);
        st.backlog.push_back(Queued {
            hdr: tail,
            payload: copy,
            delivered: 0,
            header_sent: false,
        });
        self.has_backlog.store(true, Ordering::Release);
        self.drain_locked(st);
        Offer::Accepted
    }

    fn signal(&self) {
        Self::flush_signal(&mut lock(&self.state));
    }

    fn availability(&self) -> Availability {
        if self.running.load(Ordering::Acquire) {
            Availability::Running
        } else if self.starting.load(Ordering::Acquire) {
            Availability::Starting
        } else {
            Availability::Away
        }
    }
}

/// Access to the RX ring for one batch of writes, handed out by [`GuestPort::with_writer`]
/// (and used inside the port for offered packets).
pub struct RxWriter<'a> {
    queue: &'a mut Queue,
    mem: &'a Mem,
    stats: &'a VmStats,
    used: bool,
}

impl std::fmt::Debug for RxWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxWriter")
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

impl<'a> RxWriter<'a> {
    /// Guest memory, for filling payload slices of a popped chain.
    pub fn mem(&self) -> &'a Mem {
        self.mem
    }

    /// Takes the next RX chain into `regions` and returns its head. Chains that fail to
    /// load or cannot hold a header go back to the guest empty (counted); `None` when the
    /// ring has no more chains.
    pub fn pop(&mut self, regions: &mut Regions) -> Option<u16> {
        loop {
            let chain = self.queue.pop_descriptor_chain(self.mem)?;
            let head = chain.head_index();
            match regions.load(chain, self.mem, true) {
                Ok(()) if regions.total() >= HEADER_LEN => return Some(head),
                Ok(()) => {}
                Err(e) => debug!(error = %e, "malformed RX chain"),
            }
            self.return_malformed(head);
        }
    }

    /// Takes the next chain only if it can carry payload; otherwise leaves the ring as it
    /// was (the chain is dealt with by the next [`RxWriter::pop`]).
    pub fn pop_for_payload(&mut self, regions: &mut Regions) -> Option<u16> {
        let chain = self.queue.pop_descriptor_chain(self.mem)?;
        let head = chain.head_index();
        if regions.load(chain, self.mem, true).is_err() || regions.payload_capacity() == 0 {
            self.queue.go_to_previous_position();
            return None;
        }
        Some(head)
    }

    /// Puts the last popped chain back (it was not needed after all).
    pub fn unpop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Hands a chain back to the guest unused, counting it as malformed (a chain that
    /// cannot carry what it must, e.g. a header-only buffer for data).
    pub fn return_malformed(&mut self, head: u16) {
        VmStats::inc(&self.stats.malformed_chains);
        self.return_empty(head);
    }

    /// Hands a chain back to the guest with nothing in it.
    pub fn return_empty(&mut self, head: u16) {
        let _ = self.queue.add_used(self.mem, head, 0);
        self.used = true;
    }

    /// Completes a packet: writes `hdr` at the start of `regions` (whose first
    /// `hdr.len()` payload bytes the caller filled) and gives the chain to the guest.
    pub fn complete(&mut self, head: u16, regions: &Regions, hdr: &RawHeader) {
        if regions.write_header(self.mem, hdr).is_err() {
            VmStats::inc(&self.stats.malformed_chains);
        }
        if self
            .queue
            .add_used(self.mem, head, (HEADER_LEN + hdr.len() as usize) as u32)
            .is_err()
        {
            debug!("add_used failed on RX");
        }
        self.used = true;
        VmStats::inc(&self.stats.rx_packets);
        VmStats::add(&self.stats.rx_bytes, u64::from(hdr.len()));
    }

    /// The ring ran dry: asks the guest for a kick when it adds buffers. `true` if
    /// buffers arrived meanwhile (pop again).
    pub fn rearm(&mut self) -> bool {
        matches!(self.queue.enable_notification(self.mem), Ok(true))
    }

    /// Writes `q`'s payload from `skip` into RX chains, one packet per chain, cut to fit,
    /// until it is all out or the ring is empty (notifications are armed then). For
    /// seqpacket, EOM/EOR go only on the last piece. Returns payload bytes written and
    /// whether a header went out (a payload-less packet needs one chain).
    fn put(&mut self, scratch: &mut Regions, q: &PacketOut<'_>) -> (usize, bool) {
        let total = q.hdr.len() as usize;
        let mut off = q.skip;
        let mut sent = q.header_sent;
        loop {
            if sent && off >= total {
                break;
            }
            let Some(head) = self.pop(scratch) else {
                if self.rearm() {
                    continue;
                }
                break;
            };
            let room = scratch.payload_capacity().min(MAX_RX_PAYLOAD_BYTES);
            if total > off && room == 0 {
                // A header-only chain cannot carry data; hand it back empty.
                self.return_malformed(head);
                continue;
            }
            let n = (total - off).min(room);
            let mut piece = *q.hdr;
            piece.set_len(n as u32);
            if off + n < total {
                piece.set_flags(piece.flags() & !(SEQ_EOM | SEQ_EOR));
            }
            if n > 0 {
                let mut pos = off;
                let copied = scratch
                    .for_each_payload_slice(self.mem, 0, n, |d| {
                        if !q.payload.copy_into(pos, &d) {
                            return ControlFlow::Break(());
                        }
                        pos += d.len();
                        ControlFlow::Continue(())
                    })
                    .is_ok_and(|r| r.is_none());
                if !copied {
                    VmStats::inc(&self.stats.malformed_chains);
                }
            }
            self.complete(head, scratch, &piece);
            off += n;
            sent = true;
        }
        (off - q.skip, sent && !q.header_sent)
    }
}

/// Notifies the guest of used chains on `vring`, if it asked to be (EVENT_IDX or flags).
pub fn signal_if_needed(vring: &Vring, atomic: &GuestMemoryAtomic<Mem>) {
    let mem = atomic.memory();
    let needs = vring
        .get_mut()
        .get_queue_mut()
        .needs_notification(&*mem)
        .unwrap_or(true);
    if needs {
        if let Err(e) = vring.signal_used_queue() {
            debug!(error = %e, "signal_used_queue failed");
        }
    }
}
