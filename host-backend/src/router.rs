//! The router between domains: guest-to-guest packets, the access policy, names, and the
//! all-guests host listeners.
//!
//! Every VM's data plane runs on its own vhost-user worker thread. A packet a guest sends
//! to another guest is handled on the *sender's* thread: the relay table
//! ([`domsock_proto::relay`]) decides whether it may pass, and the payload is copied once,
//! from the sender's TX descriptors straight into the receiver's RX descriptors, split to
//! fit them. Headers pass through (with the window capped), so credit is end to end: the
//! receiving guest's kernel grants it, the sending guest's kernel obeys it.
//!
//! When the receiver's RX ring is full, what did not fit is copied into that receiver's
//! backlog (bounded by [`G2G_BACKLOG_MAX_BYTES`]; overflowing resets the connection), and
//! RX notifications are enabled so the receiver's guest kicks its own data plane when it
//! adds buffers, which drains the backlog first. A stuck receiver therefore costs its
//! senders one copy and eventually their connections to it, never their other traffic.
//!
//! Locks, always taken in this order: a data plane (its device's mutex), the relay table,
//! one receiver's `RxSide`, that receiver's RX vring. Nothing takes an earlier one while
//! holding a later one, so two guests sending to each other cannot deadlock.
//!
//! Namespaces: a domain only sees domains of its own namespace. A packet to a CID of
//! another namespace is treated exactly like one to a CID that does not exist.
//!
//! What it does not do: host sockets (the data planes do that) or policy parsing
//! ([`crate::policy`]).

use crate::chain::{Mem, Regions};
use crate::dataplane::{signal_if_needed, VmShared};
use crate::metrics::VmStats;
use crate::policy::{DenyReason, Domain, Policy, To, Verdict};
use crate::tunables::{
    G2G_BACKLOG_MAX_BYTES, G2G_BACKLOG_TOTAL_MAX_BYTES, MAX_RELAY_CONNS_PER_DOMAIN,
    MAX_RELAY_WINDOW_BYTES, MAX_RX_PAYLOAD_BYTES,
};
use domsock_proto::control::Identity;
use domsock_proto::hash::KeyedState;
use domsock_proto::packet::{SEQ_EOM, SEQ_EOR};
use domsock_proto::relay::{Refusal, RelayConfig, RelayTable, Route, Violation};
use domsock_proto::{Cid, Header, Op, Port, RawHeader, SocketType, VsockAddr, HEADER_LEN};
use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tracing::{debug, info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, VolatileSlice};

/// An all-guests host listener: guest connections to host port `port` go to `path` (with
/// the peer preamble) when the guest's VM has no `<uds>_<port>` of its own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ListenerConfig {
    /// Host port the guests connect to.
    pub port: u32,
    /// Unix socket of the host process.
    pub path: PathBuf,
    /// Only guests of this namespace (every namespace if absent).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// What happened to a guest-to-guest packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Delivered (or queued for the receiver).
    Forwarded,
    /// The sender must get an RST (the caller sends it; never for an RST).
    Refused(Refusal),
    /// The destination does not exist for the sender (or is in another namespace): RST
    /// and count as unroutable.
    Unroutable,
    /// Dropped without answer.
    Dropped,
    /// The connection broke a rule; the receiver was sent an RST, the sender needs one.
    Violation(Violation),
    /// The receiver's backlog is full: the connection was reset as for a violation.
    Overflow,
}

/// Where the payload of a packet comes from.
enum Source<'a> {
    /// The sender's TX chain.
    Guest { regions: &'a Regions, mem: &'a Mem },
    /// A backlog copy.
    Heap(&'a [u8]),
}

impl Source<'_> {
    /// Copies `dst.len()` bytes starting at payload offset `off` into `dst`.
    fn copy_into(&self, off: usize, dst: &VolatileSlice<'_, ()>) -> bool {
        match self {
            Source::Heap(buf) => {
                dst.copy_from(&buf[off..off + dst.len()]);
                true
            }
            Source::Guest { regions, mem } => {
                let mut pos = 0usize;
                regions
                    .for_each_payload_slice(mem, off, dst.len(), |s| {
                        match dst.offset(pos) {
                            Ok(d) => s.copy_to_volatile_slice(d),
                            Err(_) => return ControlFlow::Break(()),
                        }
                        pos += s.len();
                        ControlFlow::Continue(())
                    })
                    .is_ok()
                    && pos == dst.len()
            }
        }
    }

    fn to_vec(&self, off: usize, len: usize) -> Option<Vec<u8>> {
        match self {
            Source::Heap(buf) => Some(buf[off..off + len].to_vec()),
            Source::Guest { regions, mem } => {
                let mut v = Vec::with_capacity(len);
                regions.copy_payload(mem, off, len, &mut v).ok()?;
                Some(v)
            }
        }
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

/// The running device's RX queue.
struct RxPort {
    vring: VringRwLock<GuestMemoryAtomic<Mem>>,
    mem: GuestMemoryAtomic<Mem>,
}

impl std::fmt::Debug for RxPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxPort").finish_non_exhaustive()
    }
}

/// One receiver's side, shared by every sender.
#[derive(Debug, Default)]
struct RxSide {
    port: Option<RxPort>,
    backlog: VecDeque<Queued>,
    backlog_bytes: usize,
    scratch: Regions,
    /// Chains were used since the guest was last considered for a notification.
    unsignalled: bool,
}

impl RxSide {
    /// Notifies the guest of used RX chains, if it asked for notifications.
    fn flush_signal(&mut self) {
        if std::mem::take(&mut self.unsignalled) {
            if let Some(port) = &self.port {
                signal_if_needed(&port.vring, &port.mem);
            }
        }
    }
}

#[derive(Debug)]
struct Slot {
    shared: Arc<VmShared>,
    /// Fixed for the daemon's lifetime (a reload may change rules and groups only).
    namespace: String,
    rx: Mutex<RxSide>,
    running: AtomicBool,
    /// A frontend set up the device's memory: its queues start soon, so packets for it
    /// wait in the backlog instead of being refused.
    starting: AtomicBool,
    has_backlog: AtomicBool,
}

/// The router shared by every VM of a daemon.
#[derive(Debug)]
pub struct Router {
    slots: HashMap<Cid, Slot, KeyedState>,
    policy: RwLock<Arc<Policy>>,
    generation: AtomicU64,
    relay: Mutex<RelayTable>,
    listeners: Vec<ListenerConfig>,
    /// Bytes in every receiver's backlog together (bounded by
    /// [`G2G_BACKLOG_TOTAL_MAX_BYTES`], so many stuck receivers cannot add up).
    backlog_total: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these would be a bug; keep serving the other guests.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    /// A router for `vms` (each VM's shared state and policy identity) under `policy`.
    pub fn new(vms: Vec<Arc<VmShared>>, policy: Policy, listeners: Vec<ListenerConfig>) -> Self {
        let hash_seed =
            std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0x0072_656c_6179_u64);
        let mut slots = HashMap::with_hasher(KeyedState::new(hash_seed));
        slots.extend(vms.into_iter().map(|shared| {
            let namespace = policy
                .domain(shared.cid)
                .map(|d| d.namespace.clone())
                .unwrap_or_default();
            (
                shared.cid,
                Slot {
                    shared,
                    namespace,
                    rx: Mutex::new(RxSide::default()),
                    running: AtomicBool::new(false),
                    starting: AtomicBool::new(false),
                    has_backlog: AtomicBool::new(false),
                },
            )
        }));
        Self {
            slots,
            policy: RwLock::new(Arc::new(policy)),
            generation: AtomicU64::new(0),
            relay: Mutex::new(RelayTable::new(RelayConfig {
                max_window_bytes: MAX_RELAY_WINDOW_BYTES,
                max_conns_per_domain: MAX_RELAY_CONNS_PER_DOMAIN,
                hash_seed,
            })),
            listeners,
            backlog_total: AtomicUsize::new(0),
        }
    }

    /// A router for one VM alone, with the default (deny-between-domains) policy.
    pub fn solo(shared: Arc<VmShared>) -> Self {
        let domain = Domain {
            cid: shared.cid,
            name: shared.name.clone(),
            namespace: crate::policy::DEFAULT_NAMESPACE.to_string(),
            groups: Vec::new(),
        };
        let policy = Policy::compile(&Default::default(), &[domain]).expect("one domain compiles");
        Self::new(vec![shared], policy, Vec::new())
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bumped by every [`Router::reload`]; data planes re-check their host connections
    /// when it changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every VM's shared state.
    pub fn vms(&self) -> impl Iterator<Item = &Arc<VmShared>> {
        self.slots.values().map(|s| &s.shared)
    }

    /// The identity `cid` has, if it is ours.
    pub fn identity(&self, cid: Cid) -> Option<Identity> {
        let p = self.policy();
        let d = p.domain(cid)?;
        Some(Identity {
            name: d.name.clone(),
            namespace: d.namespace.clone(),
            cid,
        })
    }

    /// The all-guests listener a guest of `from` reaches at host port `port`: the one of
    /// its namespace first, then one for every namespace.
    pub fn listener_for(&self, from: Cid, port: Port) -> Option<&Path> {
        let p = self.policy();
        let ns = &p.domain(from)?.namespace;
        let for_port = || self.listeners.iter().filter(|l| l.port == port.0);
        for_port()
            .find(|l| l.namespace.as_deref() == Some(ns.as_str()))
            .or_else(|| for_port().find(|l| l.namespace.is_none()))
            .map(|l| l.path.as_path())
    }

    /// A frontend gave the device of `cid` its memory: the guest driver is starting.
    /// Until [`Router::attach`], packets for it wait in its backlog (bounded) rather than
    /// being refused, so a sibling connecting right after the guest came up is not turned
    /// away by the gap between queue setup and the device's first event.
    pub fn prepare(&self, cid: Cid) {
        if let Some(slot) = self.slots.get(&cid) {
            slot.starting.store(true, Ordering::Release);
        }
    }

    /// The device of `cid` runs: guest-to-guest packets may be put on its RX queue. What
    /// waited for it since [`Router::prepare`] goes first.
    pub fn attach(
        &self,
        cid: Cid,
        vring: VringRwLock<GuestMemoryAtomic<Mem>>,
        mem: GuestMemoryAtomic<Mem>,
    ) {
        let Some(slot) = self.slots.get(&cid) else {
            return;
        };
        let mut rx = lock(&slot.rx);
        rx.port = Some(RxPort { vring, mem });
        slot.running.store(true, Ordering::Release);
        slot.starting.store(false, Ordering::Release);
        drain_backlog(&mut rx, &slot.shared.stats, &self.backlog_total);
        rx.flush_signal();
        slot.has_backlog
            .store(!rx.backlog.is_empty(), Ordering::Release);
    }

    /// The device of `cid` stopped: its relayed connections end (the other ends get an
    /// RST) and nothing more is put on its queue.
    pub fn detach(&self, cid: Cid) {
        let Some(slot) = self.slots.get(&cid) else {
            return;
        };
        slot.running.store(false, Ordering::Release);
        slot.starting.store(false, Ordering::Release);
        let gone = lock(&self.relay).remove_domain(cid);
        for r in &gone {
            let (this, other) = if r.client.cid == cid {
                (r.client, r.server)
            } else {
                (r.server, r.client)
            };
            if other.cid != cid {
                self.send_rst(this, other, r.socket_type);
            }
        }
        let mut rx = lock(&slot.rx);
        rx.port = None;
        rx.backlog.clear();
        self.backlog_total
            .fetch_sub(std::mem::take(&mut rx.backlog_bytes), Ordering::AcqRel);
        slot.has_backlog.store(false, Ordering::Release);
        if !gone.is_empty() {
            debug!(vm = %slot.shared.name, reset = gone.len(), "relayed connections ended with the device");
        }
    }

    /// Replaces the policy: relayed connections it no longer allows are reset at both
    /// ends, every data plane is woken to re-check its host connections. Returns how many
    /// relayed connections were reset.
    pub fn reload(&self, policy: Policy) -> usize {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        self.generation.fetch_add(1, Ordering::AcqRel);
        let p = self.policy();
        let gone = lock(&self.relay).remove_where(|r| {
            !p.check(
                r.client.cid,
                To::Domain(r.server.cid),
                r.server.port,
                r.socket_type,
            )
            .is_allowed()
        });
        for r in &gone {
            self.send_rst(r.client, r.server, r.socket_type);
            self.send_rst(r.server, r.client, r.socket_type);
            warn!(client = %r.client, server = %r.server, "relayed connection reset: no longer allowed by the reloaded policy");
        }
        for slot in self.slots.values() {
            let _ = slot.shared.wake.write(1);
        }
        gone.len()
    }

    /// Checks a guest's connection to a host port.
    pub fn check_host(&self, from: Cid, port: Port, ty: SocketType) -> Verdict {
        self.policy().check(from, To::Host, port, ty)
    }

    /// Routes a packet `from`'s guest sent to another guest. `regions` hold the sender's
    /// TX chain (header and `hdr.len` payload bytes, checked). The receiver's CID is added
    /// to `signals`; pass them to [`Router::signal`] when the TX batch ends.
    pub fn route(
        &self,
        from: &VmShared,
        hdr: &Header,
        raw: &RawHeader,
        regions: &Regions,
        mem: &Mem,
        signals: &mut Vec<Cid>,
    ) -> Routed {
        // A guest reaches its own CID through its kernel's loopback, never the device.
        let (Some(me), Some(to)) = (self.slots.get(&from.cid), self.slots.get(&hdr.dst.cid)) else {
            return Routed::Unroutable;
        };
        if me.namespace != to.namespace || hdr.dst.cid == from.cid {
            return Routed::Unroutable;
        }
        let route = lock(&self.relay).handle(hdr, || {
            match self.policy().check(
                from.cid,
                To::Domain(hdr.dst.cid),
                hdr.dst.port,
                hdr.socket_type,
            ) {
                Verdict::Allow => {}
                Verdict::Deny(reason) => {
                    if reason == DenyReason::NoRule {
                        from.note_denied(&to.shared.name, hdr.dst.port, hdr.socket_type, reason);
                    }
                    return Err(Refusal::Denied);
                }
            }
            if !to.running.load(Ordering::Acquire) && !to.starting.load(Ordering::Acquire) {
                return Err(Refusal::Unavailable);
            }
            Ok(())
        });
        match route {
            Route::Forward {
                buf_alloc,
                last: _,
                admitted,
            } => {
                if admitted {
                    VmStats::inc(&from.stats.g2g_connects);
                    debug!(from = %from.name, to = %to.shared.name, src = %hdr.src, dst = %hdr.dst, "relayed connection");
                }
                let mut fwd = *raw;
                fwd.buf_alloc = buf_alloc;
                VmStats::inc(&from.stats.g2g_packets);
                VmStats::add(&from.stats.g2g_bytes, u64::from(hdr.len));
                let ok = self.deliver(to, fwd, &Source::Guest { regions, mem });
                if signals.last() != Some(&to.shared.cid) {
                    signals.push(to.shared.cid);
                }
                if ok {
                    Routed::Forwarded
                } else {
                    // The receiver's backlog is full: it does not take its packets.
                    if to.shared.may_warn() {
                        warn!(from = %from.name, to = %to.shared.name, "receiver backlog full; connection reset");
                    }
                    lock(&self.relay).forget(hdr.src, hdr.dst);
                    self.send_rst(hdr.src, hdr.dst, hdr.socket_type);
                    Routed::Overflow
                }
            }
            Route::Refuse(r) => Routed::Refused(r),
            Route::Drop => Routed::Dropped,
            Route::ResetBoth(v) => {
                VmStats::inc(&from.stats.protocol_resets);
                debug!(from = %from.name, to = %to.shared.name, violation = ?v, "relayed connection reset");
                self.send_rst(hdr.src, hdr.dst, hdr.socket_type);
                Routed::Violation(v)
            }
        }
    }

    /// Puts what waits for `cid` on its RX queue (call from its own data plane, holding no
    /// vring lock).
    pub fn drain(&self, cid: Cid) {
        let Some(slot) = self.slots.get(&cid) else {
            return;
        };
        if !slot.has_backlog.load(Ordering::Acquire) {
            return;
        }
        let mut rx = lock(&slot.rx);
        drain_backlog(&mut rx, &slot.shared.stats, &self.backlog_total);
        rx.flush_signal();
        slot.has_backlog
            .store(!rx.backlog.is_empty(), Ordering::Release);
    }

    /// Notifies the receivers a TX batch delivered to (deferred to the batch's end, so a
    /// receiver wakes once per batch rather than per packet). Empties `cids`.
    pub fn signal(&self, cids: &mut Vec<Cid>) {
        cids.sort_unstable();
        cids.dedup();
        for cid in cids.drain(..) {
            if let Some(slot) = self.slots.get(&cid) {
                lock(&slot.rx).flush_signal();
            }
        }
    }

    /// An RST from `src` to the guest of `dst`.
    fn send_rst(&self, src: VsockAddr, dst: VsockAddr, ty: SocketType) {
        let Some(slot) = self.slots.get(&dst.cid) else {
            return;
        };
        let rst = Header {
            src,
            dst,
            len: 0,
            socket_type: ty,
            op: Op::Rst,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
        .to_raw();
        let _ = self.deliver(slot, rst, &Source::Heap(&[]));
        lock(&slot.rx).flush_signal();
    }

    /// Puts one packet on `to`'s RX queue, or in its backlog for what does not fit.
    /// `false` if the backlog is full (nothing of the packet was queued then).
    fn deliver(&self, to: &Slot, hdr: RawHeader, src: &Source<'_>) -> bool {
        let mut guard = lock(&to.rx);
        let rx = &mut *guard;
        let stats = &to.shared.stats;
        let mut delivered = 0usize;
        if let Some(port) = rx.port.as_ref().filter(|_| rx.backlog.is_empty()) {
            let (n, header_sent, used) =
                write_pieces(port, &mut rx.scratch, &hdr, src, 0, false, stats);
            rx.unsignalled |= used;
            if header_sent && n == hdr.len as usize {
                return true;
            }
            // The ring ran dry: let the guest see what it got at once, so it refills.
            rx.flush_signal();
            delivered = n;
        }
        if rx.port.is_none() && !to.starting.load(Ordering::Acquire) {
            return true; // the device is gone; its connections are being reset
        }
        let rest = hdr.len as usize - delivered;
        // Control packets may exceed the byte budget a little: an RST must get through.
        let budget = if hdr.len == 0 {
            G2G_BACKLOG_MAX_BYTES + (G2G_BACKLOG_MAX_BYTES >> 4)
        } else {
            G2G_BACKLOG_MAX_BYTES
        };
        let total = self.backlog_total.load(Ordering::Acquire);
        if rx.backlog_bytes + rest + HEADER_LEN > budget
            || (hdr.len > 0 && total + rest + HEADER_LEN > G2G_BACKLOG_TOTAL_MAX_BYTES)
        {
            return false;
        }
        let Some(payload) = src.to_vec(delivered, rest) else {
            return true;
        };
        VmStats::add(&stats.g2g_fallback_bytes, rest as u64);
        let mut tail = hdr;
        tail.len = rest as u32;
        rx.backlog_bytes += rest + HEADER_LEN;
        self.backlog_total
            .fetch_add(rest + HEADER_LEN, Ordering::AcqRel);
        rx.backlog.push_back(Queued {
            hdr: tail,
            payload,
            delivered: 0,
            header_sent: false,
        });
        to.has_backlog.store(true, Ordering::Release);
        drain_backlog(rx, stats, &self.backlog_total);
        to.has_backlog
            .store(!rx.backlog.is_empty(), Ordering::Release);
        true
    }
}

fn drain_backlog(rx: &mut RxSide, stats: &VmStats, total: &AtomicUsize) {
    let Some(port) = rx.port.as_ref() else {
        return;
    };
    while let Some(q) = rx.backlog.front_mut() {
        let (n, sent, used) = write_pieces(
            port,
            &mut rx.scratch,
            &q.hdr,
            &Source::Heap(&q.payload),
            q.delivered,
            q.header_sent,
            stats,
        );
        q.delivered += n;
        q.header_sent |= sent;
        rx.unsignalled |= used;
        if q.header_sent && q.delivered == q.payload.len() {
            let freed = q.payload.len() + HEADER_LEN;
            rx.backlog_bytes -= freed;
            total.fetch_sub(freed, Ordering::AcqRel);
            rx.backlog.pop_front();
        } else {
            return;
        }
    }
}

/// Writes `hdr`'s payload from `src[skip..]` into RX chains, one packet per chain, until
/// it is all out or the ring is empty (then RX notifications are on). Returns the payload
/// bytes written, whether a header went out (a payload-less packet needs one chain), and
/// whether any chain was used (the guest may need a notification).
fn write_pieces(
    port: &RxPort,
    scratch: &mut Regions,
    hdr: &RawHeader,
    src: &Source<'_>,
    skip: usize,
    header_sent: bool,
    stats: &VmStats,
) -> (usize, bool, bool) {
    let total = hdr.len as usize;
    let mut off = skip;
    let mut sent = header_sent;
    let mut used_any = false;
    {
        let mem = port.mem.memory();
        let mut guard = port.vring.get_mut();
        if !guard.get_queue().ready() {
            return (0, false, false);
        }
        let queue = guard.get_queue_mut();
        loop {
            if sent && off >= total {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(port.mem.memory()) else {
                match queue.enable_notification(&*mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let room = match scratch.load(chain, &mem, true) {
                Ok(()) if scratch.total() >= HEADER_LEN => {
                    scratch.payload_capacity().min(MAX_RX_PAYLOAD_BYTES)
                }
                _ => {
                    VmStats::inc(&stats.malformed_chains);
                    let _ = queue.add_used(&*mem, head, 0);
                    used_any = true;
                    continue;
                }
            };
            if total > off && room == 0 {
                // A header-only chain cannot carry data; hand it back empty.
                VmStats::inc(&stats.malformed_chains);
                let _ = queue.add_used(&*mem, head, 0);
                used_any = true;
                continue;
            }
            let n = (total - off).min(room);
            let mut piece = *hdr;
            piece.len = n as u32;
            if off + n < total {
                piece.flags &= !(SEQ_EOM | SEQ_EOR);
            }
            let mut ok = scratch.write_header(&mem, &piece).is_ok();
            if ok && n > 0 {
                let mut pos = off;
                ok = scratch
                    .for_each_payload_slice(&mem, 0, n, |d| {
                        if !src.copy_into(pos, &d) {
                            return ControlFlow::Break(());
                        }
                        pos += d.len();
                        ControlFlow::Continue(())
                    })
                    .is_ok_and(|r| r.is_none());
            }
            if !ok {
                VmStats::inc(&stats.malformed_chains);
            }
            let _ = queue.add_used(&*mem, head, (HEADER_LEN + n) as u32);
            used_any = true;
            VmStats::inc(&stats.rx_packets);
            VmStats::add(&stats.rx_bytes, n as u64);
            off += n;
            sent = true;
        }
    }
    (off - skip, sent && !header_sent, used_any)
}

/// Logs a summary line of the routing state (SIGUSR1).
pub fn log_summary(router: &Router) {
    let relayed = lock(&router.relay).len();
    info!(relayed, generation = router.generation(), "router");
}
