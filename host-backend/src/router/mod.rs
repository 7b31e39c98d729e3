//! The router between domains: guest-to-guest packets, the access policy, names, and the
//! all-guests host listeners.
//!
//! Every domain has a [`DomainPort`] (its receiving end: for a KVM guest the virtio
//! `GuestPort`; later a Xen ring, a parked session, a tunnel peer) and a [`VmShared`]
//! (identity, counters). A packet a domain sends to another domain is handled on the
//! *sender's* thread: the relay table ([`domsock_proto::relay`]) decides whether it may
//! pass, and the receiver's port copies the payload once from wherever the sender's
//! [`Payload`] is (a virtio guest: its TX descriptors) to wherever the receiver reads.
//! Headers pass through (with the window capped), so credit is end to end: the receiving
//! guest's kernel grants it, the sending guest's kernel obeys it.
//!
//! Credit updates are the exception to "forwarded at once": they wait for the end of the
//! sender's TX batch, and one that a later packet of the same batch, connection and
//! direction supersedes is not forwarded at all (see [`RelayBatch`]).
//!
//! A port whose domain does not take its packets answers [`Offer::Full`] once its bounded
//! queue is full; the router then resets that one connection. A stuck receiver therefore
//! costs its senders one copy and eventually their connections to it, never their other
//! traffic.
//!
//! Locks: the relay table's mutex is never held while a port is called, and a port never
//! calls back into the router, so no two locks of different owners nest here.
//!
//! Namespaces: a domain only sees domains of its own namespace. A packet to a CID of
//! another namespace is treated exactly like one to a CID that does not exist.
//!
//! What it does not do: host sockets (the engines do that), ring access (the ports) or
//! policy parsing ([`crate::policy`]).

use crate::metrics::VmStats;
use crate::policy::{DenyReason, Domain, Policy, To, Verdict};
use crate::port::{Availability, DomainPort, HeapPayload, Offer, Payload};
use crate::tunables::{MAX_RELAY_CONNS_PER_DOMAIN, MAX_RELAY_WINDOW_BYTES};
use crate::vm::VmShared;
use domsock_proto::control::Identity;
use domsock_proto::hash::KeyedState;
use domsock_proto::relay::{Refusal, RelayConfig, RelayTable, Route, Violation};
use domsock_proto::{Cid, Header, Op, Port, RawHeader, SocketType, VsockAddr};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tracing::{debug, info, warn};

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
    /// The receiver's queue is full: the connection was reset as for a violation.
    Overflow,
}

/// What one TX batch of a sending guest leaves for other guests: the receivers to notify
/// when it ends, and the credit updates held back until then.
///
/// A credit update carries nothing but its sender's receive credit (`buf_alloc`,
/// `fwd_cnt`), and every vsock header carries the same two fields, which receivers take
/// from every packet (Linux's `virtio_transport_space_update`, our `Endpoint::handle`). A
/// credit update that another packet of the same connection and direction follows in the
/// batch therefore tells the receiver nothing it does not learn from that packet: it ends
/// in the state the last packet gives either way. Forwarding it anyway costs the receiving
/// guest an RX buffer and a round of its RX work, and wakes a sender waiting for credit to
/// send a packet the size of that one increment.
///
/// That is not a corner case. Linux sends a credit update after every read that leaves
/// its receive queue empty (since 6.8; Debian's 6.1 kernels have it backported), which a
/// reader that keeps up does once per RX buffer (3732 bytes on those kernels). With data
/// flowing both ways between two 6.1 guests, 57% of the packets the relay forwarded were
/// such updates, each a 4 KiB window increment that the other guest's writer used at once
/// for a packet of that size: windows opened in RX-buffer steps, and both guests spent
/// their time on small packets and waiting for each other.
#[derive(Debug)]
pub struct RelayBatch {
    signals: Vec<Cid>,
    /// Held credit updates in arrival order; `None` once superseded.
    held: Vec<Option<HeldCredit>>,
    /// Index into `held` by (sender's address, receiver's address).
    by_flow: HashMap<(VsockAddr, VsockAddr), usize, KeyedState>,
}

#[derive(Debug)]
struct HeldCredit {
    to: Cid,
    src: VsockAddr,
    dst: VsockAddr,
    socket_type: SocketType,
    hdr: RawHeader,
}

impl RelayBatch {
    fn notify(&mut self, cid: Cid) {
        if self.signals.last() != Some(&cid) {
            self.signals.push(cid);
        }
    }

    /// Drops the credit update held for `src` -> `dst`, if any; true if there was one.
    fn supersede(&mut self, src: VsockAddr, dst: VsockAddr) -> bool {
        if self.by_flow.is_empty() {
            return false;
        }
        match self.by_flow.remove(&(src, dst)) {
            Some(i) => self.held[i].take().is_some(),
            None => false,
        }
    }

    fn hold(&mut self, credit: HeldCredit) {
        self.by_flow
            .insert((credit.src, credit.dst), self.held.len());
        self.held.push(Some(credit));
    }
}

#[derive(Debug)]
struct Slot {
    shared: Arc<VmShared>,
    /// Fixed for the daemon's lifetime (a reload may change rules and groups only).
    namespace: String,
    /// Where packets for this domain go.
    port: Arc<dyn DomainPort>,
}

/// Why a session to a sibling guest cannot be dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiblingRefusal {
    /// No such domain in the caller's namespace.
    Unreachable,
    /// The policy does not allow it.
    Denied,
    /// The sibling's device is not there.
    Away,
}

/// The two halves of one sibling socket pair whose both ends are on this host (its
/// home): the session of the guest that dialed and the session of the guest that accepted
/// through a session listener. The relay service joins them again when both guests run
/// on one other host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiblingPair {
    /// The dialing guest's session.
    pub dialer: domsock_migration::session::SessionId,
    /// The accepting guest's session.
    pub acceptor: domsock_migration::session::SessionId,
    /// The guest port the dialer reached.
    pub port: Port,
}

/// The router shared by every VM of a daemon.
#[derive(Debug)]
pub struct Router {
    slots: HashMap<Cid, Slot, KeyedState>,
    policy: RwLock<Arc<Policy>>,
    generation: AtomicU64,
    relay: Mutex<RelayTable>,
    listeners: Vec<ListenerConfig>,
    /// Seed of the tables guests choose the keys of.
    hash_seed: u64,
    /// Sibling pairs made here, by both of their session ids (bounded by the sessions
    /// of this daemon's domains: an entry goes when either half ends here).
    pairs: Mutex<HashMap<domsock_migration::session::SessionId, SiblingPair>>,
    /// Where guests' bus connections (host port 1021) go, once the bus thread runs.
    bus: std::sync::OnceLock<Arc<crate::bus::unix::GuestDoor>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these would be a bug; keep serving the other guests.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    /// A router for `domains` (each one's shared state and receiving port) under `policy`.
    pub fn new(
        domains: Vec<(Arc<VmShared>, Arc<dyn DomainPort>)>,
        policy: Policy,
        listeners: Vec<ListenerConfig>,
    ) -> Self {
        let hash_seed =
            std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0x0072_656c_6179_u64);
        let mut slots = HashMap::with_hasher(KeyedState::new(hash_seed));
        slots.extend(domains.into_iter().map(|(shared, port)| {
            let namespace = policy
                .domain(shared.cid)
                .map(|d| d.namespace.clone())
                .unwrap_or_default();
            (
                shared.cid,
                Slot {
                    shared,
                    namespace,
                    port,
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
            hash_seed,
            pairs: Mutex::new(HashMap::new()),
            bus: std::sync::OnceLock::new(),
        }
    }

    /// Sets the bus thread's door: engines created from now on answer guests' bus
    /// connections through it (once; a second call is ignored).
    pub fn set_bus_door(&self, door: Arc<crate::bus::unix::GuestDoor>) {
        let _ = self.bus.set(door);
    }

    /// The bus thread's door, if it runs.
    pub fn bus_door(&self) -> Option<Arc<crate::bus::unix::GuestDoor>> {
        self.bus.get().cloned()
    }

    /// Records that `pair`'s two sessions share one socket pair on this host.
    pub fn note_pair(&self, pair: SiblingPair) {
        let mut p = lock(&self.pairs);
        p.insert(pair.dialer, pair);
        p.insert(pair.acceptor, pair);
    }

    /// The sibling pair session `id` is a half of, if its pair lives here.
    pub fn pair_of(&self, id: domsock_migration::session::SessionId) -> Option<SiblingPair> {
        lock(&self.pairs).get(&id).copied()
    }

    /// Session `id` ended here (or its pair moved away): forget its pair.
    pub fn forget_pair(&self, id: domsock_migration::session::SessionId) {
        let mut p = lock(&self.pairs);
        if let Some(pair) = p.remove(&id) {
            p.remove(&pair.dialer);
            p.remove(&pair.acceptor);
        }
    }

    /// An empty [`RelayBatch`] for one sender's engine (kept and reused across its TX
    /// batches).
    pub fn batch(&self) -> RelayBatch {
        RelayBatch {
            signals: Vec::new(),
            held: Vec::new(),
            by_flow: HashMap::with_hasher(KeyedState::new(self.hash_seed ^ 0x0062_6174_6368)),
        }
    }

    /// A router for one domain alone, with the default (deny-between-domains) policy.
    pub fn solo(shared: Arc<VmShared>, port: Arc<dyn DomainPort>) -> Self {
        let domain = Domain {
            cid: shared.cid,
            name: shared.name.clone(),
            namespace: crate::policy::DEFAULT_NAMESPACE.to_string(),
            groups: Vec::new(),
        };
        let policy = Policy::compile(&Default::default(), &[domain]).expect("one domain compiles");
        Self::new(vec![(shared, port)], policy, Vec::new())
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

    /// The transport of `cid` went away: its relayed connections end (the other ends get
    /// an RST). The caller detaches the domain's port first, so nothing more reaches it.
    pub fn domain_gone(&self, cid: Cid) {
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
        if !gone.is_empty() {
            if let Some(slot) = self.slots.get(&cid) {
                debug!(vm = %slot.shared.name, reset = gone.len(), "relayed connections ended with the device");
            }
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

    /// Checks a guest's session to a sibling `to`, port `port`: the same namespace and
    /// policy rules as a relayed connection, and the sibling's device must be there.
    /// Gives the sibling's shared state, through which its engine is asked to dial.
    pub fn check_guest(
        &self,
        from: &VmShared,
        to: Cid,
        port: Port,
        ty: SocketType,
    ) -> Result<Arc<VmShared>, SiblingRefusal> {
        let (Some(me), Some(target)) = (self.slots.get(&from.cid), self.slots.get(&to)) else {
            return Err(SiblingRefusal::Unreachable);
        };
        if me.namespace != target.namespace || to == from.cid {
            return Err(SiblingRefusal::Unreachable);
        }
        if let Verdict::Deny(reason) = self.policy().check(from.cid, To::Domain(to), port, ty) {
            if reason == DenyReason::NoRule {
                from.note_denied(&target.shared.name, port, ty, reason);
            }
            return Err(SiblingRefusal::Denied);
        }
        if target.port.availability() == Availability::Away {
            return Err(SiblingRefusal::Away);
        }
        Ok(target.shared.clone())
    }

    /// Checks a proxied connection's right to exist after a policy reload.
    pub fn check_between(&self, from: Cid, to: Cid, port: Port, ty: SocketType) -> Verdict {
        self.policy().check(from, To::Domain(to), port, ty)
    }

    /// Checks a guest's connection to a host port.
    pub fn check_host(&self, from: Cid, port: Port, ty: SocketType) -> Verdict {
        self.policy().check(from, To::Host, port, ty)
    }

    /// Routes a packet `from`'s guest sent to another guest, with its payload. What must
    /// wait for the end of the TX batch goes into `batch`; pass it to
    /// [`Router::end_batch`] then.
    pub fn route(
        &self,
        from: &VmShared,
        hdr: &Header,
        raw: &RawHeader,
        payload: &dyn Payload,
        batch: &mut RelayBatch,
    ) -> Routed {
        let (src, dst, socket_type) = (hdr.src(), hdr.dst(), hdr.socket_type());
        // A guest reaches its own CID through its kernel's loopback, never the device.
        let (Some(me), Some(to)) = (self.slots.get(&from.cid), self.slots.get(&dst.cid)) else {
            return Routed::Unroutable;
        };
        if me.namespace != to.namespace || dst.cid == from.cid {
            return Routed::Unroutable;
        }
        let route = lock(&self.relay).handle(hdr, || {
            match self
                .policy()
                .check(from.cid, To::Domain(dst.cid), dst.port, socket_type)
            {
                Verdict::Allow => {}
                Verdict::Deny(reason) => {
                    if reason == DenyReason::NoRule {
                        from.note_denied(&to.shared.name, dst.port, socket_type, reason);
                    }
                    return Err(Refusal::Denied);
                }
            }
            if to.port.availability() == Availability::Away {
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
                    debug!(from = %from.name, to = %to.shared.name, src = %src, dst = %dst, "relayed connection");
                }
                let mut fwd = *raw;
                fwd.set_buf_alloc(buf_alloc);
                VmStats::inc(&from.stats.g2g_packets);
                VmStats::add(&from.stats.g2g_bytes, u64::from(hdr.len()));
                if batch.supersede(src, dst) {
                    VmStats::inc(&from.stats.g2g_credit_updates_merged);
                }
                batch.notify(to.shared.cid);
                if hdr.op() == Op::CreditUpdate {
                    batch.hold(HeldCredit {
                        to: to.shared.cid,
                        src,
                        dst,
                        socket_type,
                        hdr: fwd,
                    });
                    return Routed::Forwarded;
                }
                match to.port.offer(fwd, payload) {
                    Offer::Accepted | Offer::Gone => Routed::Forwarded,
                    Offer::Full => {
                        self.overflowed(from, to, src, dst, socket_type);
                        Routed::Overflow
                    }
                }
            }
            Route::Refuse(r) => Routed::Refused(r),
            Route::Drop => Routed::Dropped,
            Route::ResetBoth(v) => {
                // The connection is gone: a credit update held for it has nobody to tell.
                batch.supersede(src, dst);
                VmStats::inc(&from.stats.protocol_resets);
                debug!(from = %from.name, to = %to.shared.name, violation = ?v, "relayed connection reset");
                self.send_rst(src, dst, socket_type);
                Routed::Violation(v)
            }
        }
    }

    /// Ends a TX batch of `from`'s guest: forwards the credit updates no later packet
    /// superseded (see [`RelayBatch`]), then notifies every receiver the batch put packets
    /// on, once each (so a receiver wakes once per batch rather than per packet). Leaves
    /// `batch` empty for the next one.
    pub fn end_batch(&self, from: &VmShared, batch: &mut RelayBatch) {
        if batch.signals.is_empty() {
            return; // nothing went to another guest (so nothing is held either)
        }
        batch.by_flow.clear();
        for credit in batch.held.drain(..).flatten() {
            let Some(to) = self.slots.get(&credit.to) else {
                continue;
            };
            if to.port.offer(credit.hdr, &HeapPayload(&[])) == Offer::Full {
                self.overflowed(from, to, credit.src, credit.dst, credit.socket_type);
            }
        }
        let cids = &mut batch.signals;
        cids.sort_unstable();
        cids.dedup();
        for cid in cids.drain(..) {
            if let Some(slot) = self.slots.get(&cid) {
                slot.port.signal();
            }
        }
    }

    /// `to`'s queue is full (it does not take its packets): the connection `src` -> `dst`
    /// is forgotten and `src` gets an RST.
    fn overflowed(
        &self,
        from: &VmShared,
        to: &Slot,
        src: VsockAddr,
        dst: VsockAddr,
        ty: SocketType,
    ) {
        if to.shared.may_warn() {
            warn!(from = %from.name, to = %to.shared.name, "receiver backlog full; connection reset");
        }
        lock(&self.relay).forget(src, dst);
        self.send_rst(src, dst, ty);
    }

    /// An RST from `src` to the domain of `dst`, on behalf of a relayed connection's
    /// other end (the one way the router speaks to a domain itself).
    fn send_rst(&self, src: VsockAddr, dst: VsockAddr, ty: SocketType) {
        let Some(slot) = self.slots.get(&dst.cid) else {
            return;
        };
        let rst = Header::rst(src, dst, ty).to_raw();
        let _ = slot.port.offer(rst, &HeapPayload(&[]));
        slot.port.signal();
    }
}

/// Logs a summary line of the routing state (SIGUSR1).
pub fn log_summary(router: &Router) {
    let relayed = lock(&router.relay).len();
    info!(relayed, generation = router.generation(), "router");
}
