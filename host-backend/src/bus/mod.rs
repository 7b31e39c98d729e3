//! The bus service: buses of every namespace, their members' queues and the fan-out.
//!
//! [`BusHub`] holds the buses, each a [`domsock_proto::bus::fanout::Bus`] (who receives
//! what, grants, sequence numbers, queue accounting) plus, per member, its **sink**: where
//! its messages go and the frames waiting for it. A publish is fanned out in the thread
//! that received it. To a member that takes BATCH frames, the bus thread defers it to the
//! end of its round ([`Wants::defer`]): the MESSAGE (head and payload, copied once and
//! shared by all its receivers) waits in the member's queue, and when the round ends each
//! member's run goes out as one BATCH, so a receiver costs one `sendmsg` (and one RX
//! packet in a guest's engine) per round instead of one per message; a run that would
//! fill a batch or half the member's queue bound goes at once. To any other member the
//! MESSAGE head is written in front of the publisher's payload as one seqpacket message
//! (`sendmsg` of two parts, no heap copy), and only when its socket is full are the bytes
//! queued. The fan-out never lets a queue grow past the bus's `queue_bytes` (the message
//! is dropped and counted, or the member disconnected, as the bus says). A publisher
//! never waits.
//!
//! Members are host processes on a Unix `SOCK_SEQPACKET` socket per namespace
//! ([`unix`]; the socket file's permissions are who may reach that namespace's buses, as
//! for a file) and guests: a guest's vsock seqpacket connection to host port
//! [`BUS_PORT`](domsock_proto::bus::BUS_PORT) is answered by the bus service of the
//! engine's service table (its `bus` entry), which hands the bus thread the other
//! end of a Unix socket pair; the engine carries that pair like any host connection (guest
//! credit, RX buffers), so a guest that does not read fills its pair and is a full socket
//! here. A guest's namespace is its VM's; what it may do on a bus is the policy's
//! [`BusPermit`](crate::policy::BusPermit) (`[[bus]]` declarations and
//! `[[policy.bus-create]]`, default deny), checked at JOIN and REJOIN and again at every
//! reload ([`BusHub::reload`] removes members that lost their permission, telling them
//! REFUSED `Denied`).
//!
//! What it does not do: parse frames (that is [`domsock_proto::bus::wire`]) or decide who
//! receives a message (that is the [`Bus`]).

pub mod unix;

use crate::policy::{BusPermit, Policy};
use domsock_proto::bus::fanout::{Bus, BusConfig, Grant, JoinError, Loss, Offer};
use domsock_proto::bus::wire::{
    batch_entry_prefix, batch_header, encode_message_head, max_batch_len, BusName, CreateParams,
    ErrorCode, Fields, Joined, MemberId, RefuseCode, ServiceFrame, Token, BATCH_ENTRY_PREFIX,
    HEADER_LEN, MAX_BATCH_FRAMES,
};
use domsock_proto::Cid;
use nix::sys::socket::{sendmsg, MsgFlags, UnixAddr};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tracing::{debug, info, warn};

/// Answers (SUBSCRIBED, ERROR) that may wait in one member's queue before it is cut off.
pub const MAX_QUEUED_ANSWERS: usize = 256;

/// Locks `m`, taking the data of a poisoned lock (a panicked fan-out left nothing half
/// done that the next one would trip over: every step is a complete queue operation).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Who a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A host process (through a namespace's socket file).
    Host,
    /// The guest with this CID (through the engine).
    Guest(Cid),
}

/// The bus service's counters (every refusal and error by kind), for the counters log
/// line and the admin status.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Memberships that stood (JOIN), host processes and guests.
    pub joins: AtomicU64,
    /// Memberships taken back (REJOIN).
    pub rejoins: AtomicU64,
    /// Guest JOIN/REJOIN refused by the policy (REFUSED `Denied`).
    pub refused_denied: AtomicU64,
    /// JOIN/REJOIN refused for another reason (no such bus, mismatch, full, token, malformed).
    pub refused_other: AtomicU64,
    /// Requests answered with ERROR (not permitted, too large, fields, malformed, ...).
    pub request_errors: AtomicU64,
    /// Guest members removed because a reload took their permission.
    pub removed_by_reload: AtomicU64,
    /// Members disconnected as slow.
    pub slow_disconnects: AtomicU64,
    /// Guest bus connections refused because their VM had too many.
    pub too_many_conns: AtomicU64,
}

impl BusStats {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// `name=value` pairs, as the counters log line prints them.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("joins", g(&self.joins)),
            ("rejoins", g(&self.rejoins)),
            ("refused_denied", g(&self.refused_denied)),
            ("refused_other", g(&self.refused_other)),
            ("request_errors", g(&self.request_errors)),
            ("removed_by_reload", g(&self.removed_by_reload)),
            ("slow_disconnects", g(&self.slow_disconnects)),
            ("too_many_conns", g(&self.too_many_conns)),
        ]
    }
}

impl std::fmt::Display for BusStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, v)) in self.pairs().into_iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Where one member's messages go.
#[derive(Debug)]
struct Sink {
    origin: Origin,
    /// The member's connection; `None` while it is parked.
    sock: Option<Arc<OwnedFd>>,
    /// Whole frames waiting for the socket, oldest first.
    queue: VecDeque<Queued>,
    /// The socket was full at the last send: nothing is tried again until it is writable
    /// (one failed `sendmsg` per stall, not one per message published meanwhile).
    blocked: bool,
    /// The member takes BATCH frames (its JOIN said so): queued MESSAGEs go out as few
    /// seqpacket messages as fit.
    batches: bool,
    /// Deferred MESSAGEs wait in the queue for the end of the bus thread's round
    /// ([`BusHub::flush_deferred`]); the member is in its bus's `deferred` list.
    deferred: bool,
    /// The BATCH the deferred MESSAGEs would make, in bytes.
    deferred_len: usize,
}

/// A frame waiting for a member's socket. A deferred MESSAGE's bytes are shared by every
/// receiver it waits for (one copy per message, not per receiver).
#[derive(Debug)]
struct Queued {
    bytes: Arc<[u8]>,
    /// A MESSAGE, counted by the bus against the member's bound; LOSS and JOINED are not.
    counted: bool,
}

/// One bus: its decisions and its members' sinks.
#[derive(Debug)]
pub struct BusState {
    namespace: String,
    name: BusName,
    bus: Bus,
    sinks: HashMap<MemberId, Sink>,
    /// Reused for every MESSAGE head.
    head: Vec<u8>,
    receivers: Vec<MemberId>,
    /// Members disconnected as slow, not yet added to the hub's counters.
    slow_disconnects: u64,
    /// Members with deferred MESSAGEs (see [`Wants::defer`]).
    deferred: Vec<MemberId>,
}

/// One bus, as the admin status lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusSummary {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its delivery policy.
    pub policy: String,
    /// Members, parked ones included.
    pub members: usize,
    /// Of which parked.
    pub parked: usize,
}

/// Why a JOIN could not stand.
#[derive(Debug)]
pub struct Refusal {
    /// The code the member is told.
    pub code: RefuseCode,
    /// And the text.
    pub text: String,
}

impl Refusal {
    fn new(code: RefuseCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }
}

/// A member's handle on its bus.
#[derive(Debug, Clone)]
pub struct Membership {
    /// Its bus.
    pub bus: Arc<Mutex<BusState>>,
    /// Its number there.
    pub id: MemberId,
}

/// What a fan-out or a flush asks of the connection's owner afterwards.
#[derive(Debug, Default)]
pub struct Wants {
    /// Members whose socket is full: watch it for writability and call [`BusHub::flush`].
    pub writable: Vec<Arc<OwnedFd>>,
    /// Members disconnected as slow: close these connections.
    pub closed: Vec<Arc<OwnedFd>>,
    /// Set by the caller: MESSAGEs to members that take batches may wait until the
    /// caller's round ends, when [`BusHub::flush_deferred`] sends what waited for each
    /// member as one BATCH (one `sendmsg` and, in a guest's engine, one RX packet for the
    /// run instead of one per message). A run goes at once when it would fill a batch or
    /// half the member's queue bound, so deferring never drops what a direct send would
    /// have delivered.
    pub defer: bool,
    /// Buses with deferred MESSAGEs (for [`BusHub::flush_deferred`]).
    deferred: Vec<SharedBus>,
}

/// A bus is named by its namespace and its name.
type BusKey = (String, BusName);
/// One bus, shared by the threads that fan out to it.
type SharedBus = Arc<Mutex<BusState>>;

/// Every bus of this domsockd.
#[derive(Debug, Default)]
pub struct BusHub {
    buses: Mutex<HashMap<BusKey, SharedBus>>,
    /// What guests may do; without one (host-only tests) every guest is denied.
    policy: RwLock<Option<Arc<Policy>>>,
    /// Counters.
    pub stats: BusStats,
}

/// Sends `parts` as one seqpacket message, without waiting: `Ok(false)` if the socket
/// is full.
fn send_parts(fd: &OwnedFd, parts: &[&[u8]]) -> io::Result<bool> {
    let iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    match sendmsg::<UnixAddr>(
        fd.as_raw_fd(),
        &iov,
        &[],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn frame(f: &ServiceFrame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

/// How many MESSAGEs from the front of `queue` one BATCH of at most `max_batch` bytes
/// takes (0 or 1: no batch; the front goes alone).
fn batch_run(queue: &VecDeque<Queued>, max_batch: usize) -> usize {
    let mut len = HEADER_LEN;
    let mut n = 0;
    for q in queue.iter().take(MAX_BATCH_FRAMES) {
        len += BATCH_ENTRY_PREFIX + q.bytes.len();
        if !q.counted || len > max_batch {
            break;
        }
        n += 1;
    }
    n
}

impl BusState {
    /// Delivers to `to` a frame made of `parts` (counted as `len` bytes by the bus),
    /// after any LOSS it is owed: straight to its socket when nothing waits before it,
    /// else into its queue (the bytes shared with the message's other receivers through
    /// `shared`). With [`Wants::defer`], a member that takes batches gets it queued for
    /// the end of the round instead.
    fn deliver(
        &mut self,
        to: MemberId,
        parts: &[&[u8]],
        len: usize,
        shared: &mut Option<Arc<[u8]>>,
        wants: &mut Wants,
    ) {
        let loss = self.bus.take_loss(to);
        let Some(sink) = self.sinks.get_mut(&to) else {
            return;
        };
        if let Some(Loss { messages, bytes }) = loss {
            sink.queue.push_back(Queued {
                bytes: frame(&ServiceFrame::Loss { messages, bytes }).into(),
                counted: false,
            });
        }
        if wants.defer && sink.batches && sink.sock.is_some() && !sink.blocked {
            sink.queue.push_back(Queued {
                bytes: shared.get_or_insert_with(|| parts.concat().into()).clone(),
                counted: true,
            });
            if sink.deferred_len == 0 {
                sink.deferred_len = HEADER_LEN;
            }
            sink.deferred_len += BATCH_ENTRY_PREFIX + len;
            let cfg = self.bus.config();
            // `queued_bytes` counts this message already (the offer did).
            let full_run = sink.queue.len() >= MAX_BATCH_FRAMES
                || sink.deferred_len >= max_batch_len(cfg.max_message)
                || self.bus.queued_bytes(to).saturating_mul(2) >= u64::from(cfg.queue_bytes);
            if full_run {
                self.flush_member(to, wants);
            } else if !sink.deferred {
                sink.deferred = true;
                self.deferred.push(to);
            }
            return;
        }
        let direct = match (&sink.sock, sink.queue.is_empty() && !sink.blocked) {
            (Some(sock), true) => match send_parts(sock, parts) {
                Ok(true) => true,
                Ok(false) => {
                    sink.blocked = true;
                    wants.writable.push(sock.clone());
                    false
                }
                Err(e) => {
                    debug!(member = to.0, "bus member socket: {e}");
                    true // The connection's owner sees the error and parks it.
                }
            },
            _ => false,
        };
        if direct {
            self.bus.sent(to, len);
            return;
        }
        sink.queue.push_back(Queued {
            bytes: shared.get_or_insert_with(|| parts.concat().into()).clone(),
            counted: true,
        });
        // A LOSS or answers in front may go now, and what follows them.
        self.flush_member(to, wants);
    }

    /// Queues a frame the bus does not count (an answer) for `id` and writes its queue. A
    /// member that keeps asking without reading its answers is cut off at
    /// [`MAX_QUEUED_ANSWERS`].
    fn control(&mut self, id: MemberId, bytes: Vec<u8>, wants: &mut Wants) {
        let Some(sink) = self.sinks.get_mut(&id) else {
            return;
        };
        if sink.queue.iter().filter(|q| !q.counted).count() >= MAX_QUEUED_ANSWERS {
            info!(bus = %self.name, namespace = %self.namespace, member = id.0, "bus member reads none of its answers; parked");
            if let Some(sock) = sink.sock.take() {
                wants.closed.push(sock);
            }
            return;
        }
        sink.queue.push_back(Queued {
            bytes: bytes.into(),
            counted: false,
        });
        self.flush_member(id, wants);
    }

    /// Writes `id`'s queue until its socket is full. A member that takes batches gets
    /// each run of queued MESSAGEs as BATCH frames (up to [`max_batch_len`] bytes and
    /// [`MAX_BATCH_FRAMES`] each), sent from the queue's own buffers as the parts of one
    /// `sendmsg`: no copy, one message for the whole run.
    fn flush_member(&mut self, id: MemberId, wants: &mut Wants) {
        let max_batch = max_batch_len(self.bus.config().max_message);
        let Some(sink) = self.sinks.get_mut(&id) else {
            return;
        };
        let Some(sock) = sink.sock.clone() else {
            return;
        };
        sink.deferred_len = 0;
        if sink.blocked {
            return;
        }
        let header = batch_header();
        let mut prefixes: Vec<[u8; BATCH_ENTRY_PREFIX]> = Vec::new();
        while !sink.queue.is_empty() {
            let run = if sink.batches {
                batch_run(&sink.queue, max_batch)
            } else {
                0
            };
            let (sent, taken) = if run >= 2 {
                prefixes.clear();
                prefixes.extend(
                    sink.queue
                        .iter()
                        .take(run)
                        .map(|q| batch_entry_prefix(q.bytes.len())),
                );
                let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + 2 * run);
                parts.push(&header);
                for (p, q) in prefixes.iter().zip(sink.queue.iter()) {
                    parts.push(p);
                    parts.push(&q.bytes);
                }
                (send_parts(&sock, &parts), run)
            } else {
                let front = sink.queue.front().expect("not empty");
                (send_parts(&sock, &[&front.bytes]), 1)
            };
            match sent {
                Ok(true) => {
                    for q in sink.queue.drain(..taken) {
                        if q.counted {
                            self.bus.sent(id, q.bytes.len());
                        }
                    }
                }
                Ok(false) => {
                    sink.blocked = true;
                    wants.writable.push(sock);
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// A PUBLISH from `from`: fans it out, or tells `from` why not (an ERROR frame).
    fn publish(
        &mut self,
        from: MemberId,
        fields: &Fields<'_>,
        payload: &[u8],
        wants: &mut Wants,
    ) -> Option<Vec<u8>> {
        let mut receivers = std::mem::take(&mut self.receivers);
        let seq = match self
            .bus
            .publish(from, fields, payload.len(), &mut receivers)
        {
            Ok(seq) => seq,
            Err(e) => {
                self.receivers = receivers;
                return Some(frame(&ServiceFrame::Error {
                    code: e.code(),
                    text: &e.to_string(),
                }));
            }
        };
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        encode_message_head(&mut head, from, seq, fields);
        let len = head.len() + payload.len();
        let mut shared = None;
        for &to in &receivers {
            match self.bus.offer(to, len) {
                Offer::Queue => self.deliver(to, &[&head, payload], len, &mut shared, wants),
                Offer::Dropped => {}
                Offer::Disconnect => {
                    self.slow_disconnects += 1;
                    info!(bus = %self.name, namespace = %self.namespace, member = to.0, "slow bus member disconnected");
                    if let Some(sock) = self.sinks.remove(&to).and_then(|s| s.sock) {
                        wants.closed.push(sock);
                    }
                }
            }
        }
        self.head = head;
        self.receivers = receivers;
        None
    }
}

impl BusHub {
    /// An empty hub.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The bus `name` of `namespace`, created with `create` if it does not exist.
    fn bus(
        &self,
        namespace: &str,
        name: &BusName,
        create: Option<CreateParams>,
    ) -> Result<Arc<Mutex<BusState>>, Refusal> {
        let mut buses = lock(&self.buses);
        let key = (namespace.to_owned(), name.clone());
        if let Some(b) = buses.get(&key) {
            if let Some(p) = create {
                let cfg = lock(b).bus.config().clone();
                if (cfg.policy, cfg.slow, cfg.max_message, cfg.queue_bytes)
                    != (p.policy, p.slow, p.max_message, p.queue_bytes)
                {
                    return Err(Refusal::new(
                        RefuseCode::Mismatch,
                        format!(
                            "bus {name} exists as {} with max_message {} and queue_bytes {}",
                            cfg.policy, cfg.max_message, cfg.queue_bytes
                        ),
                    ));
                }
            }
            return Ok(b.clone());
        }
        let Some(p) = create else {
            return Err(Refusal::new(
                RefuseCode::NoSuchBus,
                format!("no bus {name} in namespace {namespace}"),
            ));
        };
        let cfg = BusConfig {
            slow: p.slow,
            max_message: p.max_message,
            queue_bytes: p.queue_bytes,
            ..BusConfig::new(p.policy)
        };
        info!(bus = %name, namespace, policy = %p.policy, "bus created");
        let b = Arc::new(Mutex::new(BusState {
            namespace: namespace.to_owned(),
            name: name.clone(),
            bus: Bus::new(cfg),
            sinks: HashMap::new(),
            head: Vec::new(),
            receivers: Vec::new(),
            slow_disconnects: 0,
            deferred: Vec::new(),
        }));
        buses.insert(key, b.clone());
        Ok(b)
    }

    /// A JOIN on `sock`: the membership and the JOINED frame to answer with.
    pub fn join(
        &self,
        namespace: &str,
        name: &BusName,
        grant: Grant,
        create: Option<CreateParams>,
        token: Token,
        sock: Arc<OwnedFd>,
    ) -> Result<(Membership, Vec<u8>), Refusal> {
        self.join_as(Origin::Host, namespace, name, grant, create, token, sock)
    }

    /// The policy guests are judged by from now on (at start and at every reload):
    /// declared buses that do not exist yet are created, and guest members whose grant
    /// the policy no longer allows are told REFUSED `Denied` and removed. Returns how many
    /// were removed.
    pub fn reload(&self, policy: Arc<Policy>) -> usize {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Some(policy.clone());
        for d in policy.declared_buses() {
            match self.bus(&d.namespace, &d.name, Some(d.params)) {
                Ok(_) => {}
                Err(r) => {
                    warn!(bus = %d.name, namespace = %d.namespace, "declared bus keeps its running parameters: {}", r.text)
                }
            }
        }
        let buses: Vec<SharedBus> = lock(&self.buses).values().cloned().collect();
        let mut removed = 0;
        for b in buses {
            let mut st = lock(&b);
            let name = st.name.clone();
            let gone: Vec<(MemberId, Cid)> = st
                .sinks
                .iter()
                .filter_map(|(&id, s)| match s.origin {
                    Origin::Guest(cid) => Some((id, cid)),
                    Origin::Host => None,
                })
                .filter(|&(id, cid)| {
                    let grant = st.bus.grant(id).unwrap_or_default();
                    !policy.bus_permit(cid, &name).allows(grant)
                })
                .collect();
            for (id, cid) in gone {
                info!(bus = %name, namespace = %st.namespace, member = id.0, %cid, "bus member removed: the reloaded policy no longer permits it");
                st.bus.leave(id);
                if let Some(sock) = st.sinks.remove(&id).and_then(|s| s.sock) {
                    let mut v = Vec::new();
                    ServiceFrame::Refused {
                        code: RefuseCode::Denied,
                        text: "permission withdrawn by a policy reload",
                    }
                    .encode(&mut v);
                    let _ = send_parts(&sock, &[&v]);
                    // The bus thread sees the end and forgets the connection.
                    let _ = nix::sys::socket::shutdown(
                        sock.as_raw_fd(),
                        nix::sys::socket::Shutdown::Both,
                    );
                }
                removed += 1;
                BusStats::inc(&self.stats.removed_by_reload);
            }
        }
        removed
    }

    /// What guest `cid` may do on `name`, and its namespace; `None` for a CID that is not
    /// a domain (or without a policy).
    fn permit(&self, cid: Cid, name: &BusName) -> Option<(String, BusPermit)> {
        let guard = self.policy.read().unwrap_or_else(|p| p.into_inner());
        let policy = guard.as_ref()?;
        let ns = policy.domain(cid)?.namespace.clone();
        Some((ns, policy.bus_permit(cid, name)))
    }

    /// A guest's JOIN: allowed by its [`BusPermit`] on the bus of its namespace, with
    /// `want` whole (as opening a read-only file for writing fails, a listener asking to
    /// publish is refused, not quietly granted less).
    pub fn join_guest(
        &self,
        cid: Cid,
        name: &BusName,
        want: Grant,
        create: Option<CreateParams>,
        token: Token,
        sock: Arc<OwnedFd>,
    ) -> Result<(Membership, Vec<u8>), Refusal> {
        let denied = |text: String| {
            BusStats::inc(&self.stats.refused_denied);
            Refusal::new(RefuseCode::Denied, text)
        };
        let Some((ns, permit)) = self.permit(cid, name) else {
            return Err(denied(format!("cid {cid} is not a domain of this host")));
        };
        if !permit.listen && !permit.publish {
            return Err(denied(format!(
                "cid {cid} may not join bus {name} of namespace {ns}"
            )));
        }
        if !permit.allows(want) {
            return Err(denied(format!(
                "cid {cid} may only {} on bus {name}",
                if permit.listen { "listen" } else { "publish" }
            )));
        }
        let create = if permit.create { create } else { None };
        self.join_as(Origin::Guest(cid), &ns, name, want, create, token, sock)
    }

    /// A guest's REJOIN: its namespace's parked membership of `token`, if it is that
    /// guest's and the policy still allows it.
    pub fn rejoin_guest(
        &self,
        cid: Cid,
        token: &Token,
        sock: Arc<OwnedFd>,
        wants: &mut Wants,
    ) -> Result<Membership, Refusal> {
        let ns = {
            let guard = self.policy.read().unwrap_or_else(|p| p.into_inner());
            guard
                .as_ref()
                .and_then(|p| p.domain(cid))
                .map(|d| d.namespace.clone())
        };
        let Some(ns) = ns else {
            BusStats::inc(&self.stats.refused_denied);
            return Err(Refusal::new(
                RefuseCode::Denied,
                "not a domain of this host",
            ));
        };
        self.rejoin_as(Origin::Guest(cid), &ns, token, sock, wants)
    }

    #[allow(clippy::too_many_arguments)]
    fn join_as(
        &self,
        origin: Origin,
        namespace: &str,
        name: &BusName,
        grant: Grant,
        create: Option<CreateParams>,
        token: Token,
        sock: Arc<OwnedFd>,
    ) -> Result<(Membership, Vec<u8>), Refusal> {
        let r = self.join_inner(origin, namespace, name, grant, create, token, sock);
        match &r {
            Ok(_) => BusStats::inc(&self.stats.joins),
            Err(_) => BusStats::inc(&self.stats.refused_other),
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn join_inner(
        &self,
        origin: Origin,
        namespace: &str,
        name: &BusName,
        grant: Grant,
        create: Option<CreateParams>,
        token: Token,
        sock: Arc<OwnedFd>,
    ) -> Result<(Membership, Vec<u8>), Refusal> {
        let bus = self.bus(namespace, name, create)?;
        let mut st = lock(&bus);
        let id = st
            .bus
            .join(grant, token)
            .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        st.sinks.insert(
            id,
            Sink {
                origin,
                sock: Some(sock),
                queue: VecDeque::new(),
                blocked: false,
                batches: false,
                deferred: false,
                deferred_len: 0,
            },
        );
        let joined = joined_frame(&st, id, grant, token, 0);
        drop(st);
        Ok((Membership { bus, id }, joined))
    }

    /// A REJOIN on `sock`: the parked membership of `token` in `namespace`, with what
    /// waited for it flushed behind the JOINED frame.
    pub fn rejoin(
        &self,
        namespace: &str,
        token: &Token,
        sock: Arc<OwnedFd>,
        wants: &mut Wants,
    ) -> Result<Membership, Refusal> {
        self.rejoin_as(Origin::Host, namespace, token, sock, wants)
    }

    fn rejoin_as(
        &self,
        origin: Origin,
        namespace: &str,
        token: &Token,
        sock: Arc<OwnedFd>,
        wants: &mut Wants,
    ) -> Result<Membership, Refusal> {
        let r = self.rejoin_inner(origin, namespace, token, sock, wants);
        match &r {
            Ok(_) => BusStats::inc(&self.stats.rejoins),
            Err(e) if e.code == RefuseCode::Denied => BusStats::inc(&self.stats.refused_denied),
            Err(_) => BusStats::inc(&self.stats.refused_other),
        }
        r
    }

    fn rejoin_inner(
        &self,
        origin: Origin,
        namespace: &str,
        token: &Token,
        sock: Arc<OwnedFd>,
        wants: &mut Wants,
    ) -> Result<Membership, Refusal> {
        let buses: Vec<Arc<Mutex<BusState>>> = lock(&self.buses)
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, b)| b.clone())
            .collect();
        for bus in buses {
            let mut st = lock(&bus);
            // A token is only good for the one who was given it: a host process cannot
            // take a guest's membership, nor a guest another's.
            let Some(id) = st.bus.member_of(token) else {
                continue;
            };
            if st.sinks.get(&id).is_some_and(|s| s.origin != origin) {
                continue;
            }
            if let Origin::Guest(cid) = origin {
                let grant = st.bus.grant(id).unwrap_or_default();
                let allowed = self
                    .permit(cid, &st.name)
                    .is_some_and(|(_, p)| p.allows(grant));
                if !allowed {
                    return Err(Refusal::new(
                        RefuseCode::Denied,
                        format!("cid {cid} may no longer be a member of bus {}", st.name),
                    ));
                }
            }
            let (id, lost) = match st.bus.rejoin(token) {
                Ok(r) => r,
                Err(JoinError::UnknownToken) => continue,
                Err(e) => return Err(Refusal::new(e.code(), e.to_string())),
            };
            let grant = st.bus.grant(id).unwrap_or_default();
            let joined = joined_frame(&st, id, grant, *token, lost.messages);
            let sink = st.sinks.entry(id).or_insert(Sink {
                origin,
                sock: None,
                queue: VecDeque::new(),
                blocked: false,
                batches: false,
                deferred: false,
                deferred_len: 0,
            });
            sink.sock = Some(sock);
            sink.blocked = false;
            // JOINED goes before everything that waited for the member.
            sink.queue.push_front(Queued {
                bytes: joined.into(),
                counted: false,
            });
            st.flush_member(id, wants);
            drop(st);
            return Ok(Membership { bus, id });
        }
        Err(Refusal::new(
            RefuseCode::UnknownToken,
            "no parked membership has this token",
        ))
    }

    /// A frame from a member, other than JOIN/REJOIN: an answer to send back to it, if any.
    pub fn request(
        &self,
        m: &Membership,
        req: domsock_proto::bus::wire::MemberFrame<'_>,
        wants: &mut Wants,
    ) -> Option<Vec<u8>> {
        use domsock_proto::bus::wire::MemberFrame as F;
        let mut st = lock(&m.bus);
        match req {
            F::Publish { fields, payload } => {
                let a = st.publish(m.id, &fields, payload, wants);
                if !st.deferred.is_empty() && !wants.deferred.iter().any(|b| Arc::ptr_eq(b, &m.bus))
                {
                    wants.deferred.push(m.bus.clone());
                }
                let slow = std::mem::take(&mut st.slow_disconnects);
                self.stats
                    .slow_disconnects
                    .fetch_add(slow, Ordering::Relaxed);
                if a.is_some() {
                    BusStats::inc(&self.stats.request_errors);
                }
                a
            }
            F::Subscribe(p) | F::Unsubscribe(p) => {
                let sub = matches!(req, F::Subscribe(_));
                let r = if sub {
                    st.bus.subscribe(m.id, p)
                } else {
                    st.bus.unsubscribe(m.id, p)
                };
                Some(match r {
                    Ok(_) => frame_subscribed(sub, p),
                    Err(e) => {
                        BusStats::inc(&self.stats.request_errors);
                        frame(&ServiceFrame::Error {
                            code: e.code(),
                            text: &e.to_string(),
                        })
                    }
                })
            }
            F::Leave => {
                st.bus.leave(m.id);
                st.sinks.remove(&m.id);
                None
            }
            F::Join { .. } | F::Rejoin(_) => {
                BusStats::inc(&self.stats.request_errors);
                Some(frame(&ServiceFrame::Error {
                    code: ErrorCode::Malformed,
                    text: "already a member on this connection",
                }))
            }
        }
    }

    /// Whether `m`'s queued MESSAGEs may go out as BATCH frames (its JOIN's *batches*
    /// flag; the membership keeps it across REJOINs).
    pub fn set_batches(&self, m: &Membership, batches: bool) {
        if let Some(sink) = lock(&m.bus).sinks.get_mut(&m.id) {
            sink.batches = batches;
        }
    }

    /// Sends what waited for the end of the round ([`Wants::defer`]): each member's
    /// deferred MESSAGEs as BATCH frames. The caller calls it before it sleeps.
    pub fn flush_deferred(&self, wants: &mut Wants) {
        for bus in std::mem::take(&mut wants.deferred) {
            let mut st = lock(&bus);
            for id in std::mem::take(&mut st.deferred) {
                if let Some(s) = st.sinks.get_mut(&id) {
                    s.deferred = false;
                }
                st.flush_member(id, wants);
            }
        }
    }

    /// `m`'s socket can take more: writes its queue; whether it is empty now.
    pub fn flush(&self, m: &Membership, wants: &mut Wants) -> bool {
        let mut st = lock(&m.bus);
        if let Some(s) = st.sinks.get_mut(&m.id) {
            s.blocked = false;
        }
        st.flush_member(m.id, wants);
        st.sinks.get(&m.id).is_none_or(|s| s.queue.is_empty())
    }

    /// An answer to `m` (SUBSCRIBED, ERROR): behind what already waits for it.
    pub fn answer(&self, m: &Membership, bytes: Vec<u8>, wants: &mut Wants) {
        lock(&m.bus).control(m.id, bytes, wants);
    }

    /// `m`'s connection `sock` is gone without a LEAVE: it stays a member, parked. Nothing
    /// happens if the membership has moved to another connection meanwhile (a REJOIN that
    /// came first).
    pub fn park(&self, m: &Membership, sock: &Arc<OwnedFd>, now: Instant) {
        let mut st = lock(&m.bus);
        let Some(s) = st.sinks.get_mut(&m.id) else {
            return;
        };
        if !s.sock.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, sock)) {
            return;
        }
        s.sock = None;
        s.blocked = false;
        st.bus.park(m.id, now);
        info!(bus = %st.name, namespace = %st.namespace, member = m.id.0, "bus member parked");
    }

    /// Every bus, sorted by namespace and name, for the admin status.
    pub fn buses(&self) -> Vec<BusSummary> {
        let buses: Vec<SharedBus> = lock(&self.buses).values().cloned().collect();
        let mut list: Vec<BusSummary> = buses
            .iter()
            .map(|b| {
                let st = lock(b);
                let parked = st.sinks.values().filter(|s| s.sock.is_none()).count();
                BusSummary {
                    namespace: st.namespace.clone(),
                    name: st.name.to_string(),
                    policy: st.bus.config().policy.to_string(),
                    members: st.bus.len(),
                    parked,
                }
            })
            .collect();
        list.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        list
    }

    /// Ends parked memberships past their timeout, on every bus.
    pub fn expire(&self, now: Instant) {
        let buses: Vec<_> = lock(&self.buses).values().cloned().collect();
        for b in buses {
            let mut st = lock(&b);
            for id in st.bus.expire(now) {
                st.sinks.remove(&id);
                info!(bus = %st.name, namespace = %st.namespace, member = id.0, "parked bus member expired");
            }
        }
    }
}

fn frame_subscribed(subscribe: bool, prefix: &[u8]) -> Vec<u8> {
    frame(&ServiceFrame::Subscribed { subscribe, prefix })
}

fn joined_frame(st: &BusState, id: MemberId, granted: Grant, token: Token, lost: u64) -> Vec<u8> {
    let cfg = st.bus.config();
    frame(&ServiceFrame::Joined(Joined {
        member: id,
        policy: cfg.policy,
        slow: cfg.slow,
        granted,
        max_message: cfg.max_message,
        queue_bytes: cfg.queue_bytes,
        token,
        lost,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use domsock_proto::bus::wire::{MemberFrame, Policy as BusPolicy, SlowPolicy, Want};
    use nix::sys::socket::{recv, socketpair, AddressFamily, SockFlag, SockType};

    /// A member's two ends: the service's (`Arc`, as the bus thread holds it) and the
    /// member's.
    fn pair() -> (Arc<OwnedFd>, OwnedFd) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (Arc::new(a), b)
    }

    /// Every frame waiting on `fd`, decoded: BATCH entries as their count and the
    /// messages' payloads, in order.
    fn frames(fd: &OwnedFd) -> Vec<(usize, Vec<Vec<u8>>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 17];
        while let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            let payload = |f: &[u8]| match ServiceFrame::decode(f).unwrap() {
                ServiceFrame::Message { payload, .. } => payload.to_vec(),
                other => panic!("not a MESSAGE: {other:?}"),
            };
            out.push(match ServiceFrame::decode(&buf[..n]).unwrap() {
                ServiceFrame::Batch(b) => (b.len(), b.frames().map(payload).collect()),
                _ => (1, vec![payload(&buf[..n])]),
            });
        }
        out
    }

    struct Rig {
        hub: Arc<BusHub>,
        publisher: Membership,
        _publisher_end: OwnedFd,
        batched: OwnedFd,
        single: OwnedFd,
    }

    /// A hub bus with a publisher, a receiver that takes batches and one that does not.
    fn rig(queue_bytes: u32) -> Rig {
        let hub = BusHub::new();
        let name = BusName::new("feed").unwrap();
        let create = Some(CreateParams {
            policy: BusPolicy::Hub,
            slow: SlowPolicy::Drop,
            max_message: 1024,
            queue_bytes,
        });
        let join = |want, batches: bool| {
            let (svc, member) = pair();
            let (m, _joined) = hub
                .join(
                    "red",
                    &name,
                    want,
                    create,
                    Token([batches as u8 + 7; 16]),
                    svc,
                )
                .unwrap();
            hub.set_batches(&m, batches);
            (m, member)
        };
        let publisher = {
            let (svc, member) = pair();
            let want = Want {
                publish: true,
                receive: false,
            };
            let (m, _) = hub
                .join("red", &name, want, create, Token([1; 16]), svc)
                .unwrap();
            (m, member)
        };
        let recv_only = Want {
            publish: false,
            receive: true,
        };
        let (_, batched) = join(recv_only, true);
        let (_, single) = join(recv_only, false);
        Rig {
            hub,
            publisher: publisher.0,
            _publisher_end: publisher.1,
            batched,
            single,
        }
    }

    fn publish(r: &Rig, payload: &[u8], wants: &mut Wants) {
        let f = MemberFrame::Publish {
            fields: Fields::None,
            payload,
        };
        assert!(r.hub.request(&r.publisher, f, wants).is_none());
    }

    #[test]
    fn deferred_messages_go_out_as_one_batch_at_the_end_of_the_round() {
        let r = rig(1 << 20);
        let mut wants = Wants {
            defer: true,
            ..Wants::default()
        };
        let sent: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        for p in &sent {
            publish(&r, p, &mut wants);
        }
        // A member without batches got each at once; the other nothing yet.
        assert_eq!(
            frames(&r.single),
            sent.iter()
                .map(|p| (1, vec![p.clone()]))
                .collect::<Vec<_>>()
        );
        assert!(
            frames(&r.batched).is_empty(),
            "deferred until the round ends"
        );
        r.hub.flush_deferred(&mut wants);
        assert_eq!(
            frames(&r.batched),
            vec![(5, sent.clone())],
            "one BATCH, in order"
        );
        assert!(wants.writable.is_empty() && wants.closed.is_empty());
        // Without `defer` (another caller) nothing waits.
        let mut direct = Wants::default();
        publish(&r, b"now", &mut direct);
        assert_eq!(frames(&r.batched), vec![(1, vec![b"now".to_vec()])]);
        assert!(direct.deferred.is_empty());
    }

    #[test]
    fn a_deferred_run_goes_at_once_before_it_could_cost_a_message() {
        // Queue bound 1 KiB (the bus's max message), messages of ~300 bytes: a run goes
        // out once it holds half the bound, so none is dropped although the round defers
        // 20 of them (a run of a whole batch, ~1.2 KiB, would drop every fourth).
        let r = rig(1024);
        let mut wants = Wants {
            defer: true,
            ..Wants::default()
        };
        let sent: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 300]).collect();
        for p in &sent {
            publish(&r, p, &mut wants);
        }
        let before_flush: usize = frames(&r.batched).iter().map(|(n, _)| n).sum::<usize>();
        assert!(before_flush > 0, "runs went out during the round");
        r.hub.flush_deferred(&mut wants);
        let after: usize = frames(&r.batched).iter().map(|(n, _)| n).sum::<usize>();
        assert_eq!(
            before_flush + after,
            20,
            "every message delivered, none dropped"
        );
        assert_eq!(lock(&r.publisher.bus).bus.counters().dropped, 0);
    }
}
