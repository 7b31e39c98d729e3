//! The data plane of one VM: virtqueues on one side, host Unix sockets on the other, the
//! sans-IO [`Endpoint`] in between deciding what may move.
//!
//! It runs on the vhost-user worker thread of its VM. One call to [`DataPlane::pump`] drains
//! host socket events, the TX queue, timers, and then fills the RX queue. Host sockets are
//! registered edge-triggered in a nested epoll whose fd the worker thread watches; a
//! per-connection `readable` flag remembers readiness that could not be used yet (no RX
//! buffers or no credit).
//!
//! Guest->host payload is written from the TX descriptors straight into the host socket;
//! only what the socket does not take at once is copied into a per-connection outbox,
//! bounded by the credit we advertise. Host->guest payload is read from the socket straight
//! into the RX descriptors.
//!
//! Packets to other guests go to the [`Router`], which relays them on this thread; the
//! router also holds the access policy this data plane asks before connecting a guest to a
//! host port, and the all-guests listeners.
//!
//! What it does not do: decide policy, or touch another guest's queues (the router does).

use crate::chain::{Mem, Regions};
use crate::control::CONTROL_PORT;
use crate::host::HostSocket;
use crate::iov;
use crate::metrics::VmStats;
use crate::policy::{DenyReason, Verdict};
use crate::router::{Routed, Router};
use crate::tunables::{
    BUSY_POLL_MAX_WINDOWS, HANDSHAKE_TIMEOUT_MS, LINGER_TIMEOUT_MS, MAX_GUEST_WARNINGS_PER_SEC,
    MAX_PAYLOAD_BYTES, MAX_PENDING_HANDSHAKES, MAX_RX_PAYLOAD_BYTES, RX_BATCH_MAX_CHAINS,
};
use domsock_proto::control::PeerPreamble;
use domsock_proto::hash::KeyedState;
use domsock_proto::hybrid::{ok_line, parse_connect_line};
use domsock_proto::{
    Cid, ConnKey, DropReason, Endpoint, EndpointConfig, Header, Incoming, Op, Port, RawHeader,
    Shutdown, SocketType, State, Timeout, VsockAddr,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::io::{self, ErrorKind, Read, Write};
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, VolatileSlice};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

/// Index of the RX virtqueue.
pub const RX_QUEUE: usize = 0;
/// Index of the TX virtqueue.
pub const TX_QUEUE: usize = 1;

const TOKEN_LISTENER: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const TOKEN_WAKE: u64 = 3;
const FIRST_DYNAMIC_TOKEN: u64 = 16;

/// Why the worker thread runs the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The guest added RX buffers.
    RxKick,
    /// The guest added TX packets.
    TxKick,
    /// A host socket, the host listener or the timer is ready.
    Sockets,
    /// Everything (tests, and any caller that does not know why).
    All,
}

/// What a VM is, shared by every device instance the VM's QEMU connects.
#[derive(Debug)]
pub struct VmShared {
    /// The guest's CID.
    pub cid: Cid,
    /// Name for logs.
    pub name: String,
    /// Host-side Unix socket prefix.
    pub uds_path: PathBuf,
    /// The `<uds>` listener for host-initiated connections.
    pub listener: UnixListener,
    /// Counters.
    pub stats: VmStats,
    /// After handling an event, keep polling the TX ring and host sockets this long
    /// before sleeping (0: never). Trades CPU for latency: a reply that arrives within
    /// the window costs no wake-up.
    pub busy_poll: Duration,
    /// Wakes the VM's data plane from other threads (policy reload).
    pub wake: EventFd,
    /// Open control-service connections.
    pub control_conns: AtomicUsize,
    /// Rate limit of this VM's warnings (see [`VmShared::may_warn`]).
    warn_budget: std::sync::Mutex<(Instant, u32)>,
}

impl VmShared {
    /// Binds `<uds>` (replacing a stale socket file) and builds the shared state.
    pub fn bind(cid: Cid, name: String, uds_path: PathBuf) -> io::Result<Arc<VmShared>> {
        Self::bind_with(cid, name, uds_path, Duration::ZERO)
    }

    /// Like [`VmShared::bind`], with a busy-poll window (see [`VmShared::busy_poll`]).
    pub fn bind_with(
        cid: Cid,
        name: String,
        uds_path: PathBuf,
        busy_poll: Duration,
    ) -> io::Result<Arc<VmShared>> {
        match std::fs::remove_file(&uds_path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&uds_path)?;
        listener.set_nonblocking(true)?;
        Ok(Arc::new(VmShared {
            cid,
            name,
            uds_path,
            listener,
            stats: VmStats::default(),
            busy_poll,
            wake: EventFd::new(EFD_NONBLOCK)?,
            control_conns: AtomicUsize::new(0),
            warn_budget: std::sync::Mutex::new((Instant::now(), 0)),
        }))
    }

    /// Whether a warning a guest can trigger at will (a denied connection, say) may be
    /// logged now: at most [`MAX_GUEST_WARNINGS_PER_SEC`] per VM, so a guest cannot flood
    /// the log. The counters still count every event.
    pub fn may_warn(&self) -> bool {
        let mut b = self.warn_budget.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(b.0) >= Duration::from_secs(1) {
            *b = (now, 0);
        }
        b.1 += 1;
        b.1 <= MAX_GUEST_WARNINGS_PER_SEC
    }

    /// Counts a connection of this VM's guest that the policy denied and warns about it
    /// (rate-limited, see [`VmShared::may_warn`]), naming both ends.
    pub fn note_denied(&self, to: &str, port: Port, ty: SocketType, why: DenyReason) {
        VmStats::inc(&self.stats.denied_connections);
        if self.may_warn() {
            warn!(from = %self.name, to = %to, port = port.0, socket_type = ?ty, %why, "connection denied by policy");
        }
    }

    fn port_path(&self, port: Port) -> PathBuf {
        let mut p = self.uds_path.clone().into_os_string();
        p.push(format!("_{}", port.0));
        PathBuf::from(p)
    }
}

/// A host connection waiting for its `CONNECT <port>` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Conn(ConnKey),
    Handshake,
}

/// Host side of one guest connection.
#[derive(Debug)]
struct HostConn {
    sock: HostSocket,
    token: u64,
    socket_type: SocketType,
    /// Stream bytes accepted from the guest, not yet taken by the host socket.
    out_stream: VecDeque<u8>,
    /// Stream payload of the current TX batch, still in the guest's buffers (whose chains
    /// are returned only after `flush_pending`), in order: written with one `writev`.
    pending: Vec<(GuestAddress, usize)>,
    pending_len: usize,
    /// Seqpacket messages accepted from the guest, not yet taken by the host socket.
    out_msgs: VecDeque<Vec<u8>>,
    /// A seqpacket message from the guest still missing its EOM packet.
    partial_msg: Vec<u8>,
    /// Host->guest bytes already read from the socket (handshake leftovers, or one
    /// seqpacket message being cut into packets).
    inbox: Vec<u8>,
    inbox_off: usize,
    readable: bool,
    /// The host shut its write side (EPOLLRDHUP/EPOLLHUP seen): EOF follows the data.
    peer_closed_write: bool,
    host_eof: bool,
    host_hup: bool,
    shut_write_applied: bool,
    shut_read_applied: bool,
    in_ready: bool,
    /// Listed in [`DataPlane::dirty`].
    dirty: bool,
    /// EPOLLOUT is part of this socket's epoll interest.
    want_out: bool,
    /// Host-initiated: the port to confirm with `OK <port>` once the guest accepts.
    reply_ok: Option<Port>,
    /// The guest connected to a host port (checked against the policy on reload).
    guest_initiated: bool,
    /// The last read from the socket filled all the room it had: more is likely waiting,
    /// so the next one reads into several RX buffers at once.
    read_full: bool,
}

impl HostConn {
    fn new(sock: HostSocket, token: u64, socket_type: SocketType) -> Self {
        Self::with_origin(sock, token, socket_type, false)
    }

    fn with_origin(
        sock: HostSocket,
        token: u64,
        socket_type: SocketType,
        guest_initiated: bool,
    ) -> Self {
        Self {
            sock,
            token,
            socket_type,
            out_stream: VecDeque::new(),
            pending: Vec::new(),
            pending_len: 0,
            out_msgs: VecDeque::new(),
            partial_msg: Vec::new(),
            inbox: Vec::new(),
            inbox_off: 0,
            readable: true,
            peer_closed_write: false,
            host_eof: false,
            host_hup: false,
            shut_write_applied: false,
            shut_read_applied: false,
            in_ready: false,
            dirty: false,
            want_out: false,
            reply_ok: None,
            guest_initiated,
            read_full: false,
        }
    }

    /// Nothing accepted from the guest waits for the host socket (pending batch payload
    /// included).
    fn outbox_empty(&self) -> bool {
        self.out_stream.is_empty() && self.out_msgs.is_empty() && self.pending.is_empty()
    }

    /// Bytes wait in the outbox proper (what EPOLLOUT is needed for).
    fn outbox_holds_data(&self) -> bool {
        !self.out_stream.is_empty() || !self.out_msgs.is_empty()
    }

    fn outbox_len(&self) -> usize {
        self.out_stream.len() + self.out_msgs.iter().map(Vec::len).sum::<usize>()
    }

    /// Writes the outbox until the socket would block; `Ok(true)` once it is empty.
    fn write_outbox(&mut self) -> io::Result<bool> {
        while !self.out_stream.is_empty() {
            let (a, _) = self.out_stream.as_slices();
            match self.sock.write(a) {
                Ok(n) => {
                    self.out_stream.drain(..n);
                }
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while let Some(msg) = self.out_msgs.front() {
            match self.sock.write(msg) {
                Ok(_) => {
                    self.out_msgs.pop_front();
                }
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn inbox_pending(&self) -> usize {
        self.inbox.len() - self.inbox_off
    }

    /// Moves up to `max` inbox bytes into the RX payload area; `None` if guest memory
    /// could not be written.
    fn drain_inbox(&mut self, regions: &Regions, mem: &Mem, max: usize) -> Option<usize> {
        let take = self.inbox_pending().min(max);
        let start = self.inbox_off;
        regions
            .write_payload(mem, 0, &self.inbox[start..start + take])
            .ok()?;
        self.inbox_off += take;
        if self.inbox_pending() == 0 {
            self.inbox.clear();
            self.inbox_off = 0;
        }
        Some(take)
    }

    /// What to tell the guest once the host socket reached EOF: a hang-up means the host
    /// closed both directions.
    fn eof_shutdown(&self) -> Shutdown {
        if self.host_hup {
            Shutdown::BOTH
        } else {
            Shutdown::SEND
        }
    }
}

/// Result of trying to fill one RX buffer from one connection.
enum Fill {
    /// `n` payload bytes written after the header.
    Data(u32),
    /// Nothing to send on this connection now.
    Nothing,
}

/// The per-VM data plane.
#[derive(Debug)]
pub struct DataPlane {
    shared: Arc<VmShared>,
    router: Arc<Router>,
    /// Our RX queue is registered with the router.
    attached: bool,
    /// See [`DataPlane::end`].
    ended: bool,
    /// The router generation (policy) host connections were last checked against.
    policy_generation: u64,
    endpoint: Endpoint,
    conns: HashMap<ConnKey, HostConn, KeyedState>,
    targets: HashMap<u64, Target, KeyedState>,
    handshakes: HashMap<u64, Handshake>,
    next_token: u64,
    ready: VecDeque<ConnKey>,
    epoll: Epoll,
    timer: TimerFd,
    mem: Option<GuestMemoryAtomic<Mem>>,
    regions: Regions,
    events: Vec<EpollEvent>,
    stopped: bool,
    /// The guest driver has both data queues running; host connects are refused at once
    /// otherwise (nobody could answer them).
    guest_running: bool,
    /// Connections that got stream payload during the current TX batch; written with one
    /// `writev` each when the batch ends.
    dirty: Vec<ConnKey>,
    /// Heads of the current TX batch's chains, returned once its payload is written.
    tx_heads: Vec<u16>,
    /// The deadline the timerfd is armed for.
    timer_armed: Option<Instant>,
    /// Guests the current TX batch put packets on; notified when it ends.
    g2g_signals: Vec<Cid>,
    /// RX chains of a batched read beyond the first (which is in `regions`), and their heads.
    rx_extra: Vec<Regions>,
    rx_extra_heads: Vec<u16>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

impl DataPlane {
    /// A data plane for a VM alone (no other guests to route to), with its own nested
    /// epoll.
    pub fn new(shared: Arc<VmShared>) -> io::Result<Self> {
        let router = Arc::new(Router::solo(shared.clone()));
        Self::with_router(shared, router)
    }

    /// A data plane for `shared` that routes to other guests through `router`.
    pub fn with_router(shared: Arc<VmShared>, router: Arc<Router>) -> io::Result<Self> {
        // Guests choose the ports in connection keys: key the tables' hasher with a seed
        // they cannot know. std's RandomState is seeded from OS randomness.
        let hash_seed = std::hash::RandomState::new().hash_one(0x0064_6f6d_736f_636b_u64);
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            shared.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TIMER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            shared.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_WAKE),
        )?;
        let policy_generation = router.generation();
        Ok(Self {
            shared,
            router,
            attached: false,
            ended: false,
            policy_generation,
            endpoint: Endpoint::new(EndpointConfig {
                hash_seed,
                ..EndpointConfig::default()
            }),
            conns: HashMap::with_hasher(KeyedState::new(hash_seed)),
            targets: HashMap::with_hasher(KeyedState::new(hash_seed)),
            handshakes: HashMap::new(),
            next_token: FIRST_DYNAMIC_TOKEN,
            ready: VecDeque::new(),
            epoll,
            timer,
            mem: None,
            regions: Regions::default(),
            events: vec![EpollEvent::default(); 64],
            stopped: false,
            guest_running: false,
            dirty: Vec::new(),
            tx_heads: Vec::new(),
            timer_armed: None,
            g2g_signals: Vec::new(),
            rx_extra: Vec::new(),
            rx_extra_heads: Vec::new(),
        })
    }

    /// The nested epoll fd to watch.
    pub fn epoll_fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    /// New guest memory map.
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic<Mem>) {
        if self.ended {
            return;
        }
        self.mem = Some(mem);
        // Re-register with the router under the new map at the next pump; until then
        // siblings' packets wait for us instead of being refused.
        self.attached = false;
        self.router.prepare(self.shared.cid);
    }

    /// The frontend session is over for good (this device is about to be dropped): stop,
    /// and never run again, even if an event that was already pending arrives. Without
    /// this, a late event could register the dead session's queues with the router.
    pub fn end(&mut self) {
        self.ended = true;
        self.stop();
    }

    /// The device stopped (guest reset, reboot or QEMU gone): every connection is dead on
    /// the guest side, so close their host ends. Idempotent.
    pub fn stop(&mut self) {
        if self.stopped && self.conns.is_empty() {
            return;
        }
        self.stopped = true;
        self.router.detach(self.shared.cid);
        self.attached = false;
        VmStats::inc(&self.shared.stats.device_stops);
        let n = self.conns.len();
        let mut lingering = Vec::new();
        for (_, hc) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                hc.sock.raw_fd(),
                EpollEvent::default(),
            );
            self.targets.remove(&hc.token);
            if !hc.outbox_empty() {
                lingering.push(hc);
            }
        }
        self.dirty.clear();
        if !lingering.is_empty() {
            linger(self.shared.clone(), lingering);
        }
        for (token, hs) in self.handshakes.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                hs.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.targets.remove(&token);
        }
        self.endpoint.clear();
        self.ready.clear();
        info!(vm = %self.shared.name, closed = n, stats = %self.shared.stats, "device stopped");
    }

    /// Runs everything that can make progress now.
    pub fn pump(&mut self, vrings: &[VringRwLock<GuestMemoryAtomic<Mem>>]) {
        self.pump_for(vrings, Wake::All);
    }

    /// Runs what `wake` can have made possible. Host socket events stay pending in the
    /// nested epoll (whose fd the worker watches level-triggered) until a [`Wake::Sockets`]
    /// pump, and TX chains stay in their ring until a [`Wake::TxKick`] pump, so skipping
    /// either here loses nothing; it saves a syscall or a ring walk on every wake-up.
    pub fn pump_for(&mut self, vrings: &[VringRwLock<GuestMemoryAtomic<Mem>>], wake: Wake) {
        if self.ended {
            return;
        }
        let now = Instant::now();
        self.guest_running = self.mem.is_some()
            && vrings.get(RX_QUEUE).is_some_and(queue_running)
            && vrings.get(TX_QUEUE).is_some_and(queue_running);
        if self.guest_running {
            self.stopped = false;
            if !self.attached {
                if let Some(mem) = self.mem.clone() {
                    self.router
                        .attach(self.shared.cid, vrings[RX_QUEUE].clone(), mem);
                    self.attached = true;
                }
            }
        }
        if matches!(wake, Wake::Sockets | Wake::All) {
            let _ = self.drain_socket_events(now);
        }
        if let (Some(atomic), true) = (self.mem.clone(), self.guest_running) {
            if matches!(wake, Wake::TxKick | Wake::All) {
                self.process_tx(&vrings[TX_QUEUE], &atomic, now);
            }
            self.handle_timers(now);
            self.fill_rx(&vrings[RX_QUEUE], &atomic, now);
        } else {
            self.handle_timers(now);
        }
        self.arm_timer(now);
        if !self.shared.busy_poll.is_zero() && self.guest_running && wake != Wake::All {
            self.busy_poll(vrings);
        }
    }

    /// Polls the TX ring and the host sockets for [`VmShared::busy_poll`] after the last
    /// activity, handling what comes without going back to sleep. Bounded overall so the
    /// vhost-user thread (which takes this data plane's lock to stop a device) never waits
    /// long.
    fn busy_poll(&mut self, vrings: &[VringRwLock<GuestMemoryAtomic<Mem>>]) {
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let window = self.shared.busy_poll;
        let start = Instant::now();
        let hard_stop = start + window * BUSY_POLL_MAX_WINDOWS;
        let mut deadline = start + window;
        loop {
            let now = Instant::now();
            if now >= deadline || now >= hard_stop {
                return;
            }
            let tx = &vrings[TX_QUEUE];
            let tx_pending = {
                let state = tx.get_ref();
                let q = state.get_queue();
                let mem = atomic.memory();
                q.ready()
                    && state.is_enabled()
                    && q.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                        .is_ok_and(|idx| idx.0 != q.next_avail())
            };
            let mut busy = self.drain_socket_events(now);
            if tx_pending {
                self.process_tx(tx, &atomic, now);
                busy = true;
            }
            if busy {
                self.fill_rx(&vrings[RX_QUEUE], &atomic, now);
                self.arm_timer(now);
                deadline = Instant::now() + window;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    // ---- host socket events -------------------------------------------------------------

    fn drain_socket_events(&mut self, now: Instant) -> bool {
        let mut any = false;
        loop {
            let n = match self.epoll.wait(0, &mut self.events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(vm = %self.shared.name, error = %e, "nested epoll wait failed");
                    return any;
                }
            };
            any |= n > 0;
            for i in 0..n {
                let ev = self.events[i];
                self.socket_event(now, ev.data(), ev.event_set());
            }
            if n < self.events.len() {
                return any;
            }
        }
    }

    fn socket_event(&mut self, now: Instant, token: u64, set: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept_host_connections(now),
            TOKEN_TIMER => {
                // Expiry count is irrelevant; timers are re-derived from the endpoint.
                let _ = self.timer.clear();
                self.timer_armed = None;
            }
            TOKEN_WAKE => {
                let _ = self.shared.wake.read();
                self.recheck_policy(now);
            }
            _ => match self.targets.get(&token).copied() {
                Some(Target::Handshake) => self.read_handshake(now, token),
                Some(Target::Conn(key)) => {
                    let Some(hc) = self.conns.get_mut(&key) else {
                        return;
                    };
                    if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                        hc.readable = true;
                    }
                    if set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                        hc.peer_closed_write = true;
                    }
                    if set.contains(EventSet::HANG_UP) {
                        hc.host_hup = true;
                    }
                    if set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                        self.flush_outbox(now, key);
                    }
                    self.after_change(now, key);
                }
                None => {}
            },
        }
    }

    fn register(&mut self, fd: i32, target: Target) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token += 1;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(read_interest(), token),
        )?;
        self.targets.insert(token, target);
        Ok(token)
    }

    fn unregister(&mut self, fd: i32, token: u64) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.targets.remove(&token);
    }

    fn accept_host_connections(&mut self, now: Instant) {
        loop {
            let stream = match self.shared.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(vm = %self.shared.name, error = %e, "accept on host listener failed");
                    return;
                }
            };
            if self.handshakes.len() >= MAX_PENDING_HANDSHAKES {
                VmStats::inc(&self.shared.stats.bad_handshakes);
                warn!(vm = %self.shared.name, "too many pending host handshakes; closing one");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(token) = self.register(stream.as_raw_fd(), Target::Handshake) else {
                continue;
            };
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    buf: Vec::new(),
                    deadline: now + Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
                },
            );
            self.read_handshake(now, token);
        }
    }

    fn read_handshake(&mut self, now: Instant, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut chunk = [0u8; domsock_proto::hybrid::MAX_CONNECT_LINE_BYTES];
        loop {
            match hs.stream.read(&mut chunk) {
                Ok(0) => {
                    self.drop_handshake(token, "closed before CONNECT");
                    return;
                }
                Ok(n) => {
                    hs.buf.extend_from_slice(&chunk[..n]);
                    match parse_connect_line(&hs.buf) {
                        Ok(None) => continue,
                        Ok(Some((port, used))) => {
                            let hs = self.handshakes.remove(&token).expect("present");
                            self.start_host_connection(now, token, hs, port, used);
                            return;
                        }
                        Err(e) => {
                            let mut s = &hs.stream;
                            let _ = s.write_all(format!("ERROR {e}\n").as_bytes());
                            self.drop_handshake(token, "malformed CONNECT line");
                            return;
                        }
                    }
                }
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_handshake(token, "read error");
                    return;
                }
            }
        }
    }

    fn drop_handshake(&mut self, token: u64, why: &str) {
        if let Some(hs) = self.handshakes.remove(&token) {
            VmStats::inc(&self.shared.stats.bad_handshakes);
            debug!(vm = %self.shared.name, why, "host handshake dropped");
            self.unregister(hs.stream.as_raw_fd(), token);
        }
    }

    fn start_host_connection(
        &mut self,
        now: Instant,
        token: u64,
        hs: Handshake,
        port: Port,
        used: usize,
    ) {
        if !self.guest_running {
            VmStats::inc(&self.shared.stats.bad_handshakes);
            let mut s = &hs.stream;
            let _ = s.write_all(b"ERROR guest vsock driver not running\n");
            self.unregister(hs.stream.as_raw_fd(), token);
            return;
        }
        let peer = VsockAddr::new(self.shared.cid, port);
        let key = match self
            .endpoint
            .connect(now, Cid::HOST, None, peer, SocketType::Stream)
        {
            Ok(k) => k,
            Err(e) => {
                let mut s = &hs.stream;
                let _ = s.write_all(format!("ERROR {e}\n").as_bytes());
                self.unregister(hs.stream.as_raw_fd(), token);
                return;
            }
        };
        VmStats::inc(&self.shared.stats.host_connects);
        let Ok(sock) = HostSocket::from_stream(hs.stream) else {
            self.endpoint.reset(key);
            return;
        };
        let mut hc = HostConn::new(sock, token, SocketType::Stream);
        hc.inbox = hs.buf[used..].to_vec();
        hc.reply_ok = Some(port);
        self.targets.insert(token, Target::Conn(key));
        self.conns.insert(key, hc);
        debug!(vm = %self.shared.name, %key, "host connect");
        let _ = now;
    }

    // ---- TX: guest -> host ----------------------------------------------------------------

    fn process_tx(
        &mut self,
        vring: &VringRwLock<GuestMemoryAtomic<Mem>>,
        atomic: &GuestMemoryAtomic<Mem>,
        now: Instant,
    ) {
        // Chains go back to the guest only after the batch's stream payload has been
        // written from (or copied out of) their buffers: see `flush_dirty`. The batch is
        // bounded by the ring: the guest cannot add chains it has not got back.
        let mut heads = std::mem::take(&mut self.tx_heads);
        loop {
            let mem = atomic.memory();
            let mut guard = vring.get_mut();
            let queue = guard.get_queue_mut();
            if queue.disable_notification(&*mem).is_err() {
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(atomic.memory()) {
                heads.push(chain.head_index());
                self.handle_tx_chain(now, chain, &mem);
            }
            match queue.enable_notification(&*mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        let mem = atomic.memory();
        self.flush_dirty(now, &mem);
        if !self.g2g_signals.is_empty() {
            self.router.signal(&mut self.g2g_signals);
        }
        if !heads.is_empty() {
            {
                let mut guard = vring.get_mut();
                let queue = guard.get_queue_mut();
                for head in heads.drain(..) {
                    if queue.add_used(&*mem, head, 0).is_err() {
                        warn!(vm = %self.shared.name, "add_used failed on TX");
                    }
                }
            }
            signal_if_needed(vring, atomic);
        }
        self.tx_heads = heads;
    }

    /// Ends a TX batch: per connection, what waited in the outbox first, then one `writev`
    /// of the batch's payload straight from guest memory.
    fn flush_dirty(&mut self, now: Instant, mem: &Mem) {
        for key in std::mem::take(&mut self.dirty) {
            if let Some(hc) = self.conns.get_mut(&key) {
                hc.dirty = false;
            }
            self.flush_outbox(now, key);
            self.flush_pending(key, mem);
            self.after_change(now, key);
        }
    }

    /// Writes a connection's pending batch payload with `writev`; what the socket does not
    /// take (or everything, if older bytes still wait in the outbox) is copied into the
    /// outbox, since the guest gets its buffers back right after.
    fn flush_pending(&mut self, key: ConnKey, mem: &Mem) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        if hc.pending.is_empty() {
            return;
        }
        let ranges = std::mem::take(&mut hc.pending);
        let total = std::mem::take(&mut hc.pending_len);
        let mut slices = Vec::with_capacity(ranges.len());
        for &(addr, len) in &ranges {
            let r = crate::chain::for_each_slice(mem, addr, len, |s| {
                slices.push(s);
                ControlFlow::<()>::Continue(())
            });
            if r.is_err() {
                // Checked when the chain was loaded; the memory map cannot change while
                // the worker holds this lock.
                VmStats::inc(&self.shared.stats.malformed_chains);
                self.endpoint.reset(key);
                return;
            }
        }
        let mut written = 0usize;
        let mut next = 0usize;
        let mut failed = false;
        while next < slices.len() && hc.out_stream.is_empty() {
            let asked: usize = slices[next..]
                .iter()
                .take(iov::MAX_IOVECS)
                .map(VolatileSlice::len)
                .sum();
            match iov::writev_slices(hc.sock.as_fd(), &slices[next..]) {
                Ok(n) => {
                    written += n;
                    let mut left = n;
                    while left > 0 {
                        let len = slices[next].len();
                        if left >= len {
                            left -= len;
                            next += 1;
                        } else {
                            slices[next] = slices[next].offset(left).expect("within the slice");
                            left = 0;
                        }
                    }
                    if n < asked {
                        break; // the socket is full
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if !failed && written < total {
            let mut rest = Vec::with_capacity(total - written);
            for s in &slices[next..] {
                let at = rest.len();
                rest.resize(at + s.len(), 0);
                s.copy_to(&mut rest[at..]);
            }
            hc.out_stream.extend(rest);
        }
        if written > 0 {
            self.endpoint.consumed(&key, written as u32);
        }
        if failed {
            VmStats::inc(&self.shared.stats.host_errors);
            self.endpoint.reset(key);
        }
    }

    fn handle_tx_chain<M>(
        &mut self,
        now: Instant,
        chain: virtio_queue::DescriptorChain<M>,
        mem: &Mem,
    ) where
        M: std::ops::Deref<Target = Mem>,
    {
        let stats = &self.shared.stats;
        if let Err(e) = self.regions.load(chain, mem, false) {
            VmStats::inc(&stats.malformed_chains);
            debug!(vm = %self.shared.name, error = %e, "malformed TX chain");
            return;
        }
        let raw = match self.regions.read_header(mem) {
            Ok(r) => r,
            Err(e) => {
                VmStats::inc(&stats.malformed_chains);
                debug!(vm = %self.shared.name, error = %e, "malformed TX chain");
                return;
            }
        };
        let hdr = match Header::parse(&raw, MAX_PAYLOAD_BYTES) {
            Ok(h) => h,
            Err(e) => {
                VmStats::inc(&stats.bad_headers);
                debug!(vm = %self.shared.name, error = %e, "bad TX header");
                self.reset_raw(now, &raw);
                return;
            }
        };
        if hdr.src.cid != self.shared.cid {
            VmStats::inc(&stats.spoofed_packets);
            debug!(vm = %self.shared.name, src = %hdr.src, "spoofed source CID");
            return;
        }
        if self.regions.payload_capacity() < hdr.len as usize {
            VmStats::inc(&stats.malformed_chains);
            debug!(vm = %self.shared.name, claimed = hdr.len, have = self.regions.payload_capacity(), "payload truncated");
            self.reset_key(now, hdr.receiver_key());
            return;
        }
        VmStats::inc(&stats.tx_packets);
        VmStats::add(&stats.tx_bytes, u64::from(hdr.len));
        if hdr.dst.cid != Cid::HOST {
            self.route_to_guest(&hdr, &raw, mem);
            return;
        }
        tracing::trace!(vm = %self.shared.name, op = ?hdr.op, len = hdr.len, buf_alloc = hdr.buf_alloc, fwd_cnt = hdr.fwd_cnt, key = %hdr.receiver_key(), "tx packet");
        let incoming = self.endpoint.handle(&hdr);
        match incoming {
            Incoming::Request(req) => self.guest_connect(now, &req),
            Incoming::Connected(key) => self.host_connected(now, key),
            Incoming::Data { key, len, eom, .. } => {
                self.deliver(now, key, len, eom, mem);
                self.after_change(now, key);
            }
            Incoming::PeerShutdown(key, _) | Incoming::Credit(key) => self.after_change(now, key),
            Incoming::Reset(key) | Incoming::Closed(key) => self.close_host(key),
            Incoming::Dropped(reason) => {
                match reason {
                    // An RST for an unknown connection is not answered, so not counted.
                    DropReason::UnknownConnection if hdr.op != Op::Rst => {
                        VmStats::inc(&stats.unknown_connection_rsts)
                    }
                    DropReason::UnknownConnection => {}
                    DropReason::CreditViolation(_)
                    | DropReason::ProtocolViolation
                    | DropReason::TypeMismatch => {
                        VmStats::inc(&stats.protocol_resets);
                        debug!(vm = %self.shared.name, ?reason, key = %hdr.receiver_key(), "connection reset");
                    }
                    DropReason::ReceiveShut | DropReason::NoAction => {}
                }
                self.after_change(now, hdr.receiver_key());
            }
        }
    }

    /// A packet for another guest: the router relays it (on this thread) or says why not.
    fn route_to_guest(&mut self, hdr: &Header, raw: &RawHeader, mem: &Mem) {
        let stats = &self.shared.stats;
        match self.router.route(
            &self.shared,
            hdr,
            raw,
            &self.regions,
            mem,
            &mut self.g2g_signals,
        ) {
            Routed::Forwarded | Routed::Dropped => {}
            Routed::Unroutable => {
                VmStats::inc(&stats.unroutable_packets);
                debug!(vm = %self.shared.name, dst = %hdr.dst, "unroutable destination");
                self.endpoint.refuse(hdr);
            }
            Routed::Refused(why) => {
                use domsock_proto::relay::Refusal;
                match why {
                    Refusal::UnknownConnection => VmStats::inc(&stats.unknown_connection_rsts),
                    Refusal::Unavailable | Refusal::TooManyConnections => {
                        VmStats::inc(&stats.refused_connections)
                    }
                    Refusal::Denied => {} // counted by the router, which logs it
                }
                debug!(vm = %self.shared.name, dst = %hdr.dst, ?why, "guest-to-guest packet refused");
                self.endpoint.refuse(hdr);
            }
            Routed::Violation(_) | Routed::Overflow => self.endpoint.refuse(hdr),
        }
    }

    /// The policy changed: reset guest connections to host ports it no longer allows.
    fn recheck_policy(&mut self, now: Instant) {
        let generation = self.router.generation();
        if generation == self.policy_generation {
            return;
        }
        self.policy_generation = generation;
        let denied: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(key, hc)| {
                hc.guest_initiated
                    && !self
                        .router
                        .check_host(key.peer.cid, key.local.port, hc.socket_type)
                        .is_allowed()
            })
            .map(|(k, _)| *k)
            .collect();
        for key in denied {
            warn!(vm = %self.shared.name, %key, "host connection reset: no longer allowed by the reloaded policy");
            self.endpoint.reset(key);
            self.after_change(now, key);
        }
    }

    fn reset_raw(&mut self, now: Instant, raw: &RawHeader) {
        let key = ConnKey {
            local: VsockAddr::new(Cid(raw.dst_cid), Port(raw.dst_port)),
            peer: VsockAddr::new(Cid(raw.src_cid), Port(raw.src_port)),
        };
        if key.peer.cid == self.shared.cid {
            self.reset_key(now, key);
        }
    }

    fn reset_key(&mut self, now: Instant, key: ConnKey) {
        if self.endpoint.get(&key).is_some() {
            self.endpoint.reset(key);
        }
        self.after_change(now, key);
    }

    fn guest_connect(&mut self, now: Instant, req: &Header) {
        let stats = &self.shared.stats;
        let port = req.dst.port;
        let (sock, preamble) = if port == CONTROL_PORT && req.socket_type == SocketType::Stream {
            match self.control_socket() {
                Ok(s) => (s, None),
                Err(e) => {
                    VmStats::inc(&stats.refused_connections);
                    debug!(vm = %self.shared.name, error = %e, "control connection refused");
                    self.endpoint.refuse(req);
                    return;
                }
            }
        } else {
            if let Verdict::Deny(why) =
                self.router
                    .check_host(self.shared.cid, port, req.socket_type)
            {
                self.shared.note_denied("host", port, req.socket_type, why);
                self.endpoint.refuse(req);
                return;
            }
            match self.connect_host_port(req) {
                Ok(found) => found,
                Err(e) => {
                    VmStats::inc(&stats.refused_connections);
                    debug!(vm = %self.shared.name, port = port.0, error = %e, "guest connect refused");
                    self.endpoint.refuse(req);
                    return;
                }
            }
        };
        let key = match self.endpoint.accept(req) {
            Ok(k) => k,
            Err(e) => {
                debug!(vm = %self.shared.name, error = %e, "cannot accept");
                self.endpoint.refuse(req);
                return;
            }
        };
        let mut sock = sock;
        if let Some(line) = preamble {
            // A fresh socket's send buffer is empty, so the short line goes out whole, as
            // one message on a seqpacket socket.
            if !matches!(sock.write(line.as_bytes()), Ok(n) if n == line.len()) {
                VmStats::inc(&self.shared.stats.host_errors);
                self.endpoint.reset(key);
                return;
            }
        }
        let token = match self.register(sock.raw_fd(), Target::Conn(key)) {
            Ok(t) => t,
            Err(e) => {
                warn!(vm = %self.shared.name, error = %e, "epoll registration failed");
                self.endpoint.reset(key);
                return;
            }
        };
        VmStats::inc(&self.shared.stats.accepted_connections);
        debug!(vm = %self.shared.name, %key, "guest connect accepted");
        self.conns.insert(
            key,
            HostConn::with_origin(sock, token, req.socket_type, true),
        );
        self.after_change(now, key);
    }

    /// The host socket for a guest connecting to host port `req.dst.port`: the VM's own
    /// `<uds>_<port>`, or else the all-guests listener of the port, which first gets the
    /// peer preamble (returned with it).
    fn connect_host_port(&self, req: &Header) -> io::Result<(HostSocket, Option<String>)> {
        let path = self.shared.port_path(req.dst.port);
        let own = HostSocket::connect(&path, req.socket_type);
        let Err(own_err) = own else {
            return own.map(|s| (s, None));
        };
        let Some(shared_path) = self.router.listener_for(self.shared.cid, req.dst.port) else {
            return Err(own_err);
        };
        let sock = HostSocket::connect(shared_path, req.socket_type)?;
        let identity = self
            .router
            .identity(self.shared.cid)
            .ok_or_else(|| io::Error::new(ErrorKind::NotFound, "no identity"))?;
        VmStats::inc(&self.shared.stats.listener_connections);
        let line = PeerPreamble {
            identity,
            port: req.src.port,
        }
        .encode();
        Ok((sock, Some(line)))
    }

    /// One end of a socket pair whose other end the control service answers.
    fn control_socket(&self) -> io::Result<HostSocket> {
        let (ours, theirs) = UnixStream::pair()?;
        crate::control::spawn(self.router.clone(), self.shared.clone(), theirs)?;
        HostSocket::from_stream(ours)
    }

    fn host_connected(&mut self, now: Instant, key: ConnKey) {
        let Some(hc) = self.conns.get_mut(&key) else {
            self.endpoint.reset(key);
            return;
        };
        if let Some(port) = hc.reply_ok.take() {
            // A fresh socket's send buffer is empty, so this short line goes out whole.
            let line = ok_line(port);
            if !matches!(hc.sock.write(line.as_bytes()), Ok(n) if n == line.len()) {
                VmStats::inc(&self.shared.stats.host_errors);
                self.endpoint.reset(key);
            }
        }
        self.after_change(now, key);
    }

    /// Hands `len` payload bytes of the current TX chain to the host socket (or outbox).
    fn deliver(&mut self, now: Instant, key: ConnKey, len: u32, eom: bool, mem: &Mem) {
        let Some(hc) = self.conns.get_mut(&key) else {
            self.endpoint.reset(key);
            return;
        };
        let len = len as usize;
        if hc.socket_type == SocketType::Stream {
            // Written at the end of the TX batch, with one writev per connection straight
            // from the guest's buffers (see `flush_dirty`), whose chains wait until then.
            self.regions.payload_ranges(len, &mut hc.pending);
            hc.pending_len += len;
            if !hc.dirty {
                hc.dirty = true;
                self.dirty.push(key);
            }
            return;
        }
        // Seqpacket: a message goes out whole, with one write.
        let regions = &self.regions;
        let mut failed = false;
        let mut consumed = 0usize;
        if hc.partial_msg.is_empty() && eom && hc.out_msgs.is_empty() {
            // Whole message in one packet: send it at once. It is copied out first because
            // a seqpacket message must leave in one write even when it spans descriptors.
            let mut msg = Vec::new();
            if regions.copy_payload(mem, 0, len, &mut msg).is_err() {
                failed = true;
            } else {
                match hc.sock.write(&msg) {
                    Ok(_) => consumed = len,
                    Err(e) if would_block(&e) => hc.out_msgs.push_back(msg),
                    Err(_) => failed = true,
                }
            }
        } else if regions
            .copy_payload(mem, 0, len, &mut hc.partial_msg)
            .is_err()
        {
            failed = true;
        } else if eom {
            let msg = std::mem::take(&mut hc.partial_msg);
            hc.out_msgs.push_back(msg);
        } else {
            let unconsumed = self
                .endpoint
                .get(&key)
                .map_or(0, |c| c.credit().unconsumed());
            if unconsumed >= self.endpoint.config().buf_alloc_bytes {
                // The message can never complete within our buffer: the guest
                // ignored our buf_alloc. Reset rather than stall.
                VmStats::inc(&self.shared.stats.protocol_resets);
                failed = true;
            }
        }
        if consumed > 0 {
            self.endpoint.consumed(&key, consumed as u32);
        }
        if failed {
            VmStats::inc(&self.shared.stats.host_errors);
            self.endpoint.reset(key);
            return;
        }
        self.flush_outbox(now, key);
    }

    fn flush_outbox(&mut self, _now: Instant, key: ConnKey) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        let before = hc.outbox_len();
        let result = hc.write_outbox();
        let consumed = before - hc.outbox_len();
        if consumed > 0 {
            self.endpoint.consumed(&key, consumed as u32);
        }
        if result.is_err() {
            VmStats::inc(&self.shared.stats.host_errors);
            self.endpoint.reset(key);
        }
    }

    // ---- bookkeeping ----------------------------------------------------------------------

    /// The one place that reconciles a host connection with its protocol state after
    /// anything happened to either.
    fn after_change(&mut self, now: Instant, key: ConnKey) {
        let Some(conn) = self.endpoint.get(&key) else {
            self.close_host(key);
            return;
        };
        let Some(hc) = self.conns.get_mut(&key) else {
            self.endpoint.reset(key);
            return;
        };
        let peer = conn.peer_shutdown();
        let state = conn.state();
        let can_send = conn.can_send();
        let credit = conn.credit().peer_credit();
        if peer.send && hc.outbox_empty() && !hc.shut_write_applied {
            hc.sock.shutdown(std::net::Shutdown::Write);
            hc.shut_write_applied = true;
        }
        if peer.rcv && !hc.shut_read_applied {
            hc.sock.shutdown(std::net::Shutdown::Read);
            hc.shut_read_applied = true;
        }
        let want_out = hc.outbox_holds_data();
        if want_out != hc.want_out {
            // Adding OUT to a socket that is writable now reports it at once (edge included),
            // so no flush opportunity is lost between the write that left data behind and
            // this call.
            let interest = if want_out {
                write_interest()
            } else {
                read_interest()
            };
            match self.epoll.ctl(
                ControlOperation::Modify,
                hc.sock.raw_fd(),
                EpollEvent::new(interest, hc.token),
            ) {
                Ok(()) => hc.want_out = want_out,
                Err(e) => warn!(vm = %self.shared.name, error = %e, "epoll modify"),
            }
        }
        if peer.is_both() && hc.outbox_empty() && state == State::Established {
            // The guest closed and everything it sent reached the host: we are the last
            // to know, so we end the connection with RST.
            self.endpoint.reset(key);
            self.close_host(key);
            return;
        }
        if state == State::Established
            && can_send
            && credit > 0
            && (hc.readable || hc.inbox_pending() > 0)
            && !hc.in_ready
        {
            hc.in_ready = true;
            self.ready.push_back(key);
        }
        let _ = now;
    }

    fn close_host(&mut self, key: ConnKey) {
        if let Some(hc) = self.conns.remove(&key) {
            self.unregister(hc.sock.raw_fd(), hc.token);
        }
    }

    fn handle_timers(&mut self, now: Instant) {
        for t in self.endpoint.handle_timeout(now) {
            match t {
                Timeout::Connect(key) | Timeout::Close(key) => self.close_host(key),
            }
        }
        let expired: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            self.drop_handshake(t, "timed out");
        }
    }

    fn arm_timer(&mut self, now: Instant) {
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.endpoint.poll_timeout())
            .min();
        // A timerfd_settime per pump would be a syscall per packet batch for nothing: the
        // deadline rarely changes. An expired timer clears `timer_armed` (TOKEN_TIMER).
        if next == self.timer_armed {
            return;
        }
        let r = match next {
            Some(t) => self.timer.reset(
                t.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        match r {
            Ok(()) => self.timer_armed = next,
            Err(e) => warn!(vm = %self.shared.name, error = %e, "timerfd"),
        }
    }

    // ---- RX: host -> guest ----------------------------------------------------------------

    fn fill_rx(
        &mut self,
        vring: &VringRwLock<GuestMemoryAtomic<Mem>>,
        atomic: &GuestMemoryAtomic<Mem>,
        now: Instant,
    ) {
        // Guest-to-guest packets that waited for RX buffers go first.
        self.router.drain(self.shared.cid);
        let mut used_any = false;
        'outer: loop {
            if !self.endpoint.has_transmit() && self.ready.is_empty() {
                break;
            }
            // RX notifications stay enabled: we only need a kick when we are waiting for
            // buffers, which `enable_notification` below arms (with EVENT_IDX it moves
            // avail_event; without it, the flag is never cleared).
            let mem = atomic.memory();
            let mut guard = vring.get_mut();
            let queue = guard.get_queue_mut();
            loop {
                if !self.endpoint.has_transmit() && self.ready.is_empty() {
                    break 'outer;
                }
                let Some(chain) = queue.pop_descriptor_chain(atomic.memory()) else {
                    break;
                };
                let head = chain.head_index();
                if let Err(e) = self.regions.load(chain, &mem, true) {
                    VmStats::inc(&self.shared.stats.malformed_chains);
                    debug!(vm = %self.shared.name, error = %e, "malformed RX chain");
                    let _ = queue.add_used(&*mem, head, 0);
                    used_any = true;
                    continue;
                }
                if self.regions.total() < domsock_proto::HEADER_LEN {
                    VmStats::inc(&self.shared.stats.malformed_chains);
                    let _ = queue.add_used(&*mem, head, 0);
                    used_any = true;
                    continue;
                }
                if self.fill_batch(now, &mem, queue, head) {
                    used_any = true;
                    continue;
                }
                match self.fill_one(now, &mem) {
                    Some(written) => {
                        if queue.add_used(&*mem, head, written).is_err() {
                            warn!(vm = %self.shared.name, "add_used failed on RX");
                        }
                        used_any = true;
                    }
                    None => {
                        queue.go_to_previous_position();
                        break 'outer;
                    }
                }
            }
            // Out of RX buffers with work left: re-enable notifications and look again,
            // closing the race with a guest that just added buffers.
            match queue.enable_notification(&*mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if used_any {
            signal_if_needed(vring, atomic);
        }
    }

    /// Host->guest stream data in bulk: when the next connection to serve is a stream whose
    /// last read filled its buffer, pops more RX chains (up to [`RX_BATCH_MAX_CHAINS`], as
    /// far as credit goes) behind the one in `self.regions` (head `head`) and fills them all
    /// with one `readv`, one packet per chain, in ring order. Chains it did not need go back
    /// to the ring. Returns `false` (nothing consumed, `self.regions` untouched) when the
    /// case does not apply or nothing could be read; the caller goes on as usual then.
    fn fill_batch(
        &mut self,
        now: Instant,
        mem: &Mem,
        queue: &mut virtio_queue::Queue,
        head: u16,
    ) -> bool {
        let Some(&key) = self.ready.front() else {
            return false;
        };
        if self.endpoint.has_transmit() {
            return false; // control packets go first, one chain each
        }
        let credit = self.endpoint.send_credit(&key) as usize;
        let first_room = self.regions.payload_capacity().min(MAX_RX_PAYLOAD_BYTES);
        match self.conns.get(&key) {
            Some(hc)
                if hc.socket_type == SocketType::Stream
                    && hc.read_full
                    && hc.readable
                    && !hc.host_eof
                    && hc.inbox_pending() == 0
                    && first_room > 0
                    && credit > first_room => {}
            _ => return false,
        }
        // Speculatively take more chains; a malformed one goes back and ends the batch (the
        // normal path consumes and counts it next).
        let mut rooms = vec![first_room];
        let mut planned = first_room;
        let mut extra = 0usize;
        while planned < credit && extra + 1 < RX_BATCH_MAX_CHAINS {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            if self.rx_extra.len() <= extra {
                self.rx_extra.push(Regions::default());
                self.rx_extra_heads.push(0);
            }
            let h = chain.head_index();
            let r = &mut self.rx_extra[extra];
            if r.load(chain, mem, true).is_err()
                || r.total() < domsock_proto::HEADER_LEN
                || r.payload_capacity() == 0
            {
                queue.go_to_previous_position();
                break;
            }
            let room = r
                .payload_capacity()
                .min(MAX_RX_PAYLOAD_BYTES)
                .min(credit - planned);
            self.rx_extra_heads[extra] = h;
            rooms.push(room);
            planned += room;
            extra += 1;
        }
        if extra == 0 {
            return false;
        }
        let mut slices = Vec::with_capacity(rooms.len() * 2);
        let mut ok = self
            .regions
            .for_each_payload_slice(mem, 0, rooms[0], |s| {
                slices.push(s);
                ControlFlow::<()>::Continue(())
            })
            .is_ok();
        for (r, &room) in self.rx_extra[..extra].iter().zip(&rooms[1..]) {
            ok &= r
                .for_each_payload_slice(mem, 0, room, |s| {
                    slices.push(s);
                    ControlFlow::<()>::Continue(())
                })
                .is_ok();
        }
        let hc = self.conns.get_mut(&key).expect("checked above");
        let result = if ok {
            iov::readv_slices(hc.sock.as_fd(), &slices)
        } else {
            Err(io::Error::from(ErrorKind::InvalidData))
        };
        drop(slices);
        let n = match result {
            Ok(n) if n > 0 => n,
            other => {
                for _ in 0..extra {
                    queue.go_to_previous_position();
                }
                match other {
                    Ok(_) => {} // EOF: the normal path reads it again and ends the stream
                    Err(e) if would_block(&e) => {
                        hc.readable = false;
                        hc.read_full = false;
                    }
                    Err(_) => hc.read_full = false, // the normal path reports the error
                }
                return false;
            }
        };
        hc.read_full = n == planned;
        if n < planned && !hc.peer_closed_write {
            hc.readable = false; // a short read drained the socket (see `fill_from_conn`)
        }
        self.ready.pop_front();
        hc.in_ready = false;
        let mut left = n;
        let mut used = 0usize;
        for (i, &room) in rooms.iter().enumerate() {
            let take = left.min(room);
            if take == 0 {
                break;
            }
            left -= take;
            let Some(hdr) = rw_header(&mut self.endpoint, &self.shared, key, take, false) else {
                break;
            };
            used = i + 1;
            let (regions, head) = if i == 0 {
                (&self.regions, head)
            } else {
                (&self.rx_extra[i - 1], self.rx_extra_heads[i - 1])
            };
            if regions.write_header(mem, &hdr).is_err() {
                VmStats::inc(&self.shared.stats.malformed_chains);
            }
            if queue
                .add_used(mem, head, (domsock_proto::HEADER_LEN + take) as u32)
                .is_err()
            {
                warn!(vm = %self.shared.name, "add_used failed on RX");
            }
            VmStats::inc(&self.shared.stats.rx_packets);
            VmStats::add(&self.shared.stats.rx_bytes, take as u64);
        }
        for _ in used.max(1)..rooms.len() {
            queue.go_to_previous_position();
        }
        if used == 0 {
            // send_rw failed on the first chain: hand it back empty rather than lose it.
            let _ = queue.add_used(mem, head, 0);
        }
        self.after_change(now, key);
        true
    }

    /// Fills the RX chain in `self.regions`; returns bytes written or `None` if there was
    /// nothing to send after all.
    fn fill_one(&mut self, now: Instant, mem: &Mem) -> Option<u32> {
        loop {
            if let Some(hdr) = self.endpoint.poll_transmit() {
                if self.regions.write_header(mem, &hdr.to_raw()).is_err() {
                    VmStats::inc(&self.shared.stats.malformed_chains);
                }
                VmStats::inc(&self.shared.stats.rx_packets);
                return Some(domsock_proto::HEADER_LEN as u32);
            }
            if self.ready.is_empty() {
                return None;
            }
            if self.regions.payload_capacity() == 0 {
                // A header-only chain carries no data: every ready connection would refuse
                // it and be re-queued by `after_change`, spinning here. Hand it back empty.
                VmStats::inc(&self.shared.stats.malformed_chains);
                return Some(0);
            }
            let key = self.ready.pop_front()?;
            if let Some(hc) = self.conns.get_mut(&key) {
                hc.in_ready = false;
            }
            if let Fill::Data(n) = self.fill_from_conn(now, key, mem) {
                VmStats::inc(&self.shared.stats.rx_packets);
                VmStats::add(&self.shared.stats.rx_bytes, u64::from(n));
                self.after_change(now, key);
                return Some(domsock_proto::HEADER_LEN as u32 + n);
            }
            self.after_change(now, key);
        }
    }

    fn fill_from_conn(&mut self, now: Instant, key: ConnKey, mem: &Mem) -> Fill {
        let credit = self.endpoint.send_credit(&key) as usize;
        let Some(hc) = self.conns.get_mut(&key) else {
            return Fill::Nothing;
        };
        let room = self.regions.payload_capacity().min(MAX_RX_PAYLOAD_BYTES);
        if credit == 0 || room == 0 {
            return Fill::Nothing;
        }
        let max = credit.min(room);
        match hc.socket_type {
            SocketType::Stream => {
                let mut n = 0usize;
                // Handshake leftovers go first.
                if hc.inbox_pending() > 0 {
                    let Some(take) = hc.drain_inbox(&self.regions, mem, max) else {
                        return Fill::Nothing;
                    };
                    n = take;
                } else if hc.readable && !hc.host_eof {
                    let peer_closed_write = hc.peer_closed_write;
                    let sock = &mut hc.sock;
                    let mut eof = false;
                    let mut err = false;
                    let mut drained = false;
                    let mut read_full = false;
                    let _ = self.regions.for_each_payload_slice(mem, 0, max, |mut s| {
                        match sock.read_volatile(&mut s) {
                            Ok(0) => {
                                eof = true;
                                ControlFlow::Break(())
                            }
                            Ok(k) => {
                                n += k;
                                read_full = n == max;
                                if k < s.len() {
                                    // A short read on a stream socket emptied its receive
                                    // queue; data arriving later raises a new edge. Saves
                                    // the EAGAIN read per wake-up. Not once the host has
                                    // closed: no edge would report the EOF behind the data.
                                    drained = !peer_closed_write;
                                    ControlFlow::Break(())
                                } else {
                                    ControlFlow::Continue(())
                                }
                            }
                            Err(e) if would_block(&e) => {
                                drained = true;
                                ControlFlow::Break(())
                            }
                            Err(_) => {
                                err = true;
                                ControlFlow::Break(())
                            }
                        }
                    });
                    hc.read_full = read_full;
                    if drained {
                        hc.readable = false;
                    }
                    if eof {
                        hc.host_eof = true;
                        hc.readable = false;
                    }
                    if err && n == 0 {
                        VmStats::inc(&self.shared.stats.host_errors);
                        self.endpoint.reset(key);
                        return Fill::Nothing;
                    }
                }
                if n > 0 {
                    return self.emit_rw(key, n, false, mem);
                }
                let hc = self.conns.get(&key).expect("present");
                if hc.host_eof && hc.inbox_pending() == 0 {
                    let how = hc.eof_shutdown();
                    self.endpoint.shutdown(now, &key, how);
                }
                Fill::Nothing
            }
            SocketType::SeqPacket => {
                if hc.inbox_pending() == 0 {
                    if !hc.readable || hc.host_eof {
                        return Fill::Nothing;
                    }
                    match hc.sock.peek_message_len() {
                        Ok(0) => {
                            hc.host_eof = true;
                            hc.readable = false;
                            let how = hc.eof_shutdown();
                            self.endpoint.shutdown(now, &key, how);
                            return Fill::Nothing;
                        }
                        Ok(len) => {
                            let peer_buf = self
                                .endpoint
                                .get(&key)
                                .map_or(0, |c| c.credit().peer_credit() + c.credit().in_flight());
                            hc.inbox.resize(len, 0);
                            hc.inbox_off = 0;
                            if !matches!(hc.sock.read(&mut hc.inbox), Ok(n) if n == len) {
                                VmStats::inc(&self.shared.stats.host_errors);
                                self.endpoint.reset(key);
                                return Fill::Nothing;
                            }
                            if len as u64 > u64::from(peer_buf) {
                                // The guest could never take this message whole.
                                warn!(vm = %self.shared.name, %key, len, peer_buf, "seqpacket message larger than the guest's buffer");
                                VmStats::inc(&self.shared.stats.host_errors);
                                self.endpoint.reset(key);
                                return Fill::Nothing;
                            }
                        }
                        Err(e) if would_block(&e) => {
                            hc.readable = false;
                            return Fill::Nothing;
                        }
                        Err(_) => {
                            VmStats::inc(&self.shared.stats.host_errors);
                            self.endpoint.reset(key);
                            return Fill::Nothing;
                        }
                    }
                }
                let hc = self.conns.get_mut(&key).expect("present");
                let Some(take) = hc.drain_inbox(&self.regions, mem, max) else {
                    return Fill::Nothing;
                };
                let eom = hc.inbox_pending() == 0;
                self.emit_rw(key, take, eom, mem)
            }
        }
    }

    fn emit_rw(&mut self, key: ConnKey, n: usize, eom: bool, mem: &Mem) -> Fill {
        let Some(hdr) = rw_header(&mut self.endpoint, &self.shared, key, n, eom) else {
            return Fill::Nothing;
        };
        if self.regions.write_header(mem, &hdr).is_err() {
            VmStats::inc(&self.shared.stats.malformed_chains);
        }
        Fill::Data(n as u32)
    }
}

/// The header of an `RW` packet of `n` bytes on `key`, with the credit accounted for;
/// `None` (and the connection reset) if the endpoint refuses, which cannot happen when
/// `n` is within the credit the caller asked for: losing data silently would be worse
/// than a reset.
fn rw_header(
    endpoint: &mut Endpoint,
    shared: &VmShared,
    key: ConnKey,
    n: usize,
    eom: bool,
) -> Option<RawHeader> {
    match endpoint.send_rw(&key, n as u32, eom, false) {
        Ok(hdr) => {
            if tracing::enabled!(tracing::Level::TRACE) {
                if let Some(c) = endpoint.get(&key) {
                    tracing::trace!(%key, len = n, credit_after = c.credit().peer_credit(), in_flight = c.credit().in_flight(), "rx data");
                }
            }
            Some(hdr.to_raw())
        }
        Err(e) => {
            warn!(vm = %shared.name, error = %e, "send_rw refused");
            endpoint.reset(key);
            None
        }
    }
}

/// Hands connections of a stopped device that still hold guest data the host has not taken
/// yet to a thread that flushes them for at most [`LINGER_TIMEOUT_MS`], then closes them.
/// The guest already had these bytes acknowledged (credit), so dropping them with the
/// device would lose accepted data. Nothing new is read from these sockets.
fn linger(shared: Arc<VmShared>, mut conns: Vec<HostConn>) {
    VmStats::add(&shared.stats.lingered_connections, conns.len() as u64);
    let spawned = std::thread::Builder::new()
        .name(format!("linger-{}", shared.name))
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_millis(LINGER_TIMEOUT_MS);
            while !conns.is_empty() && Instant::now() < deadline {
                let wait = deadline.saturating_duration_since(Instant::now());
                {
                    let mut fds: Vec<PollFd<'_>> = conns
                        .iter()
                        .map(|c| PollFd::new(c.sock.as_fd(), PollFlags::POLLOUT))
                        .collect();
                    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
                    if poll(&mut fds, PollTimeout::from(ms)).is_err() {
                        break;
                    }
                }
                conns.retain_mut(|c| match c.write_outbox() {
                    Ok(true) => {
                        c.sock.shutdown(std::net::Shutdown::Write);
                        false
                    }
                    Ok(false) => true,
                    Err(_) => {
                        VmStats::add(&shared.stats.lingered_bytes_lost, c.outbox_len() as u64);
                        false
                    }
                });
            }
            for c in &conns {
                VmStats::add(&shared.stats.lingered_bytes_lost, c.outbox_len() as u64);
            }
        });
    if spawned.is_err() {
        warn!("cannot start a linger thread; host sockets with unsent guest data are closed");
    }
}

/// Epoll interest of every host socket: readable and peer hang-up, edge-triggered.
fn read_interest() -> EventSet {
    EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// Interest while a socket's outbox holds data. Asking for EPOLLOUT only then spares a
/// wake-up per host read on every guest->host stream.
fn write_interest() -> EventSet {
    read_interest() | EventSet::OUT
}

fn queue_running(vring: &VringRwLock<GuestMemoryAtomic<Mem>>) -> bool {
    let state = vring.get_ref();
    state.get_queue().ready() && state.is_enabled()
}

/// Notifies the guest of used chains on `vring`, if it asked to be (EVENT_IDX or flags).
pub(crate) fn signal_if_needed(
    vring: &VringRwLock<GuestMemoryAtomic<Mem>>,
    atomic: &GuestMemoryAtomic<Mem>,
) {
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
