//! The engine of one KVM guest: its virtqueues on one side, host Unix sockets (and
//! in-process services) on the other, the sans-IO [`Endpoint`] in between deciding what
//! may move, and the [`Router`] for packets to other domains.
//!
//! It runs on the vhost-user worker thread of its VM. Responsibilities, one module each:
//!
//! | module | owns |
//! |---|---|
//! | [`driver`](self) (`driver.rs`) | the wake-up loop: reads the clock, drains the nested epoll, busy-poll, arms the timerfd |
//! | `poller.rs` | the nested epoll, its tokens and every fd's interest, and the timerfd |
//! | `handshake.rs` | host-initiated connections until their `CONNECT <port>` line |
//! | `connect.rs` | guest-initiated connections: which host target (service, own socket, shared listener) answers a port |
//! | `tx.rs` | the TX queue: guest packets to host sockets (one `writev` per connection per batch) and to the router |
//! | `rx.rs` | host->guest data and control packets into RX buffers, through the guest's [`GuestPort`] |
//! | `conn.rs` | one host connection's socket state (enums) and its bounded outbox |
//! | `linger.rs` | flushing accepted guest data after the device is gone |
//! | `session.rs` | the session port: greetings, live sessions' replay, parked sessions |
//!
//! Everything below the driver takes `now` as an argument and never reads the clock, so
//! tests drive the engine with simulated time through [`DataPlane::pump_at`] (timeouts
//! fire when `now` passes them, without sleeping).
//!
//! Guest->host payload is written from the TX descriptors straight into the host socket;
//! only what the socket does not take at once is copied into a per-connection outbox,
//! bounded by the credit we advertise. Host->guest payload is read from the socket straight
//! into the RX descriptors.
//!
//! What it does not do: decide policy (the router does), touch another guest's queues
//! (the router offers to that guest's port), or write the RX ring itself (its own
//! [`GuestPort`] does, for it and for the router alike).

mod conn;
mod connect;
mod driver;
mod handshake;
mod linger;
mod poller;
mod rx;
mod session;
mod tx;

pub use driver::Wake;
pub use session::{ExportedSession, ImportError, SwapError, SwappedHost, RELAYED_TARGET};

use crate::metrics::VmStats;
use crate::router::{RelayBatch, Router};
use crate::services::ServiceTable;
use crate::virtio::chain::{Mem, Regions};
use crate::virtio::GuestPort;
use crate::vm::VmShared;
use conn::{HostConn, Interest};
use domsock_proto::hash::KeyedState;
use domsock_proto::{ConnKey, Endpoint, EndpointConfig, State, Timeout};
use handshake::Handshakes;
use poller::Poller;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::io;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};
use vm_memory::GuestMemoryAtomic;

/// The per-VM engine.
#[derive(Debug)]
pub struct DataPlane {
    shared: Arc<VmShared>,
    router: Arc<Router>,
    /// This guest's RX side: the only way onto its RX ring.
    port: Arc<GuestPort>,
    services: ServiceTable,
    /// Our RX queue is attached to the port.
    attached: bool,
    /// See [`DataPlane::end`].
    ended: bool,
    /// The router generation (policy) host connections were last checked against.
    policy_generation: u64,
    endpoint: Endpoint,
    conns: HashMap<ConnKey, HostConn, KeyedState>,
    handshakes: Handshakes,
    poller: Poller,
    /// Connections with host->guest data (or EOF) to move, in order.
    ready: VecDeque<ConnKey>,
    mem: Option<GuestMemoryAtomic<Mem>>,
    regions: Regions,
    stopped: bool,
    /// The guest driver has both data queues running; host connects are refused at once
    /// otherwise (nobody could answer them).
    guest_running: bool,
    /// Connections that got stream payload during the current TX batch; written with one
    /// `writev` each when the batch ends.
    dirty: Vec<ConnKey>,
    /// Heads of the current TX batch's chains, returned once its payload is written.
    tx_heads: Vec<u16>,
    /// What the current TX batch left for other guests (receivers to notify, credit
    /// updates held back); handed to the router when the batch ends.
    g2g: RelayBatch,
    /// RX chains of a batched read beyond the first (which is in `regions`), and their heads.
    rx_extra: Vec<Regions>,
    rx_extra_heads: Vec<u16>,
    /// Connections dialed for siblings' sessions ([`conn::Origin::Proxy`]): while there
    /// are any, packets to other CIDs are first looked up in our endpoint.
    proxied: usize,
    /// Sessions not on a live connection (parked) and the bounds of all.
    sessions: session::Sessions,
    /// Every event logged while this engine runs names the VM.
    span: tracing::Span,
}

impl DataPlane {
    /// A data plane for a VM alone (no other guests to route to), with its own nested
    /// epoll.
    pub fn new(shared: Arc<VmShared>) -> io::Result<Self> {
        let port = Arc::new(GuestPort::new(shared.clone(), Default::default()));
        let router = Arc::new(Router::solo(shared.clone(), port.clone()));
        Self::with_router(shared, router, port)
    }

    /// A data plane for `shared`, whose RX side is `port` (the port the router delivers
    /// to for this VM), that routes to other domains through `router`.
    pub fn with_router(
        shared: Arc<VmShared>,
        router: Arc<Router>,
        port: Arc<GuestPort>,
    ) -> io::Result<Self> {
        // Guests choose the ports in connection keys: key the tables' hasher with a seed
        // they cannot know. std's RandomState is seeded from OS randomness.
        let hash_seed = std::hash::RandomState::new().hash_one(0x0064_6f6d_736f_636b_u64);
        let poller = Poller::new(&shared, hash_seed)?;
        let policy_generation = router.generation();
        let services = ServiceTable::standard(router.clone());
        let g2g = router.batch();
        Ok(Self {
            span: shared.span(),
            shared,
            router,
            port,
            services,
            attached: false,
            ended: false,
            policy_generation,
            endpoint: Endpoint::new(EndpointConfig {
                hash_seed,
                ..EndpointConfig::default()
            }),
            conns: HashMap::with_hasher(KeyedState::new(hash_seed)),
            handshakes: Handshakes::default(),
            poller,
            ready: VecDeque::new(),
            mem: None,
            regions: Regions::default(),
            stopped: false,
            guest_running: false,
            dirty: Vec::new(),
            tx_heads: Vec::new(),
            g2g,
            rx_extra: Vec::new(),
            rx_extra_heads: Vec::new(),
            proxied: 0,
            sessions: session::Sessions::default(),
        })
    }

    /// The nested epoll fd to watch.
    pub fn epoll_fd(&self) -> i32 {
        self.poller.fd()
    }

    /// New guest memory map.
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<Mem>) {
        if self.ended {
            return;
        }
        self.mem = Some(mem);
        // Re-attach under the new map at the next pump; until then siblings' packets wait
        // for us instead of being refused.
        self.attached = false;
        self.port.prepare();
    }

    /// The frontend session is over for good (this device is about to be dropped): stop,
    /// and never run again, even if an event that was already pending arrives. Without
    /// this, a late event could attach the dead session's queues to the port.
    pub fn end(&mut self) {
        self.ended = true;
        self.stop();
        self.drop_all_parked();
    }

    /// The frontend (QEMU) is gone: stop as for a guest reset, and let go of its memory.
    /// Sessions stay parked; the engine waits for the next frontend (driven by
    /// [`DataPlane::pump_standby`] meanwhile), which may be the same guest migrated back
    /// or restarted on this host.
    pub fn frontend_gone(&mut self) {
        self.stop();
        self.mem = None;
        self.regions = Default::default();
        self.rx_extra.clear();
        self.rx_extra_heads.clear();
    }

    /// Runs what can make progress while no frontend is connected: host sockets (parked
    /// sessions read their host ends, host connects are refused) and timers (parked
    /// sessions expire).
    pub fn pump_standby(&mut self, now: Instant) {
        self.pump_at(&[], Wake::Sockets, now);
    }

    /// The device stopped (guest reset, reboot or QEMU gone): every connection is dead on
    /// the guest side, so close their host ends. Idempotent.
    pub fn stop(&mut self) {
        if self.stopped && self.conns.is_empty() {
            return;
        }
        let _span = self.span.clone().entered();
        self.stopped = true;
        self.port.detach();
        self.router.domain_gone(self.shared.cid);
        self.attached = false;
        VmStats::inc(&self.shared.stats.device_stops);
        // Sessions keep their host ends; everything else ends below.
        self.park_sessions();
        self.orphan_listeners();
        let n = self.conns.len();
        let mut lingering = Vec::new();
        for (_, hc) in self.conns.drain() {
            self.poller.unregister(hc.sock.raw_fd(), hc.token);
            if !hc.outbox_empty() {
                lingering.push(hc);
            }
        }
        self.dirty.clear();
        if !lingering.is_empty() {
            linger::spawn(self.shared.clone(), lingering);
        }
        for (token, fd) in self.handshakes.drain() {
            self.poller.unregister(fd, token);
        }
        self.endpoint.clear();
        self.ready.clear();
        self.proxied = 0;
        self.sessions.forget_live();
        info!(vm = %self.shared.name, closed = n, parked = self.sessions.parked(), stats = %self.shared.stats, "device stopped");
    }

    /// Connections with host state (for tests and status).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether the guest's driver runs the device (both data queues).
    pub fn guest_running(&self) -> bool {
        self.guest_running
    }

    /// Sessions on a live connection.
    pub fn live_sessions(&self) -> usize {
        self.sessions.live()
    }

    /// Sessions parked, waiting for their guest.
    pub fn parked_sessions(&self) -> usize {
        self.sessions.parked()
    }

    /// Guest ports registered as session listeners.
    pub fn session_listeners(&self) -> usize {
        self.sessions.listeners()
    }

    /// Host connections waiting for their `CONNECT` line.
    pub fn pending_handshakes(&self) -> usize {
        self.handshakes.len()
    }

    // ---- bookkeeping ----------------------------------------------------------------------

    /// The one place that reconciles a host connection with its protocol state after
    /// anything happened to either.
    fn after_change(&mut self, key: ConnKey) {
        let Some(conn) = self.endpoint.get(&key) else {
            self.close_host(key);
            return;
        };
        let guest_fwd_cnt = conn.credit().peer_fwd_cnt();
        let Some(hc) = self.conns.get_mut(&key) else {
            self.endpoint.reset(key);
            return;
        };
        if hc.session.is_some() {
            hc.session_ack(guest_fwd_cnt);
        }
        let peer = conn.peer_shutdown();
        if peer.send && !peer.rcv {
            // A graceful half-close: the guest has sent everything it will send.
            hc.mark_guest_done();
        }
        if peer.rcv && hc.is_session() && !hc.session_finished() && !hc.guest_done() {
            // The guest gave up on this connection (it shuts its read side or resets only
            // when it abandons one; it ends a session by shutting its write side): keep
            // the session for a RESUME.
            self.park_conn(key);
            self.endpoint.reset(key);
            return;
        }
        let state = conn.state();
        let can_send = conn.can_send();
        let credit = conn.credit().peer_credit();
        if peer.send && hc.outbox_empty() && !hc.applied.send {
            hc.sock.shutdown(std::net::Shutdown::Write);
            hc.applied.send = true;
        }
        if peer.rcv && !hc.applied.rcv {
            hc.sock.shutdown(std::net::Shutdown::Read);
            hc.applied.rcv = true;
        }
        let interest = if hc.outbox_holds_data() {
            Interest::ReadWrite
        } else {
            Interest::Read
        };
        if interest != hc.interest {
            // Adding OUT to a socket that is writable now reports it at once (edge included),
            // so no flush opportunity is lost between the write that left data behind and
            // this call.
            match self
                .poller
                .set_interest(hc.sock.raw_fd(), hc.token, interest)
            {
                Ok(()) => hc.interest = interest,
                Err(e) => warn!(vm = %self.shared.name, error = %e, "epoll modify"),
            }
        }
        if domsock_proto::rules::closes_with_rst(state, peer, hc.outbox_empty()) {
            // The guest closed and everything it sent reached the host: we are the last
            // to know, so we end the connection with RST.
            self.endpoint.reset(key);
            self.close_host(key);
            return;
        }
        if state == State::Established
            && can_send
            && credit > 0
            && (hc.readable() || hc.inbox_pending() > 0 || hc.has_session_replay())
            && !hc.session_waits_ack()
            && !hc.in_ready
        {
            hc.in_ready = true;
            self.ready.push_back(key);
        }
    }

    /// The guest reset or finished closing `key` (its last packet saying it consumed
    /// `guest_fwd_cnt`): a session not yet finished is parked
    /// (see `after_change`), anything else is closed.
    fn guest_closed(&mut self, key: ConnKey, guest_fwd_cnt: u32) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        // The last packet's fwd_cnt says what the guest consumed in the end.
        hc.session_ack(guest_fwd_cnt);
        if hc.is_session() && !hc.session_finished() && !hc.guest_done() {
            self.park_conn(key);
            return;
        }
        if hc.is_session() && hc.outbox_holds_data() {
            // A session whose guest half-closed and then went: it needs no resume, but what
            // it sent still goes to the host (as after a device stop).
            let hc = self.conns.remove(&key).expect("looked up above");
            self.session_closed(key, &hc);
            self.poller.unregister(hc.sock.raw_fd(), hc.token);
            linger::spawn(self.shared.clone(), vec![hc]);
            return;
        }
        self.close_host(key);
    }

    fn close_host(&mut self, key: ConnKey) {
        if let Some(hc) = self.conns.remove(&key) {
            self.session_closed(key, &hc);
            if hc.origin == conn::Origin::Proxy {
                self.proxied -= 1;
            }
            hc.span.in_scope(|| {
                tracing::debug!(outbox = hc.outbox_len(), "host connection closed");
            });
            self.poller.unregister(hc.sock.raw_fd(), hc.token);
        }
    }

    fn handle_timers(&mut self, now: Instant) {
        for t in self.endpoint.handle_timeout(now) {
            let (key, counter) = match t {
                Timeout::Connect(key) => (key, &self.shared.stats.connect_timeouts),
                Timeout::Close(key) => (key, &self.shared.stats.close_timeouts),
            };
            VmStats::inc(counter);
            self.close_host(key);
        }
        self.session_timers(now);
        for token in self.handshakes.expired(now) {
            VmStats::inc(&self.shared.stats.handshake_timeouts);
            self.drop_handshake(token, "timed out");
        }
    }

    /// The earliest deadline of any timer (endpoint or handshake).
    fn next_deadline(&self) -> Option<Instant> {
        self.handshakes
            .next_deadline()
            .into_iter()
            .chain(self.endpoint.poll_timeout())
            .chain(self.sessions.next_deadline())
            .min()
    }
}
