//! The domsockd-to-domsockd tunnel runtime: one TLS-over-TCP connection per pair of hosts
//! carrying many channels, driven by the sans-IO protocol in
//! [`domsock_migration::tunnel`].
//!
//! ```text
//!   engine ──open(peer, metadata, kind)──► TunnelService ──► ChannelEnd (read/write/..., eventfd)
//!   engine ◄──Acceptor::on_open / accepted(ChannelEnd)──┘
//!                        │ one thread per peer: Endpoint (Mutex) + TcpStream + rustls,
//!                        │ poll(wake eventfd, socket), timers from Endpoint::poll_timeout
//!                        │ one listener thread: accept, TLS handshake, peer from the cert SAN
//! ```
//!
//! - **Who dials.** Of two hosts, the one whose name sorts lower dials and the other only
//!   accepts, so they never dial each other at once; a new accepted connection from a peer
//!   replaces its old one. The dialer reconnects with backoff (50 ms doubling to 2 s).
//! - **Authentication.** Both sides present certificates of the configured CA; the
//!   dialer checks the server's SAN against the peer's configured name, the listener maps
//!   the client's SAN to a configured peer ([`tls::peer_of`]). A connection whose TLS
//!   handshake fails or whose certificate names no configured peer is dropped and counted
//!   in [`TunnelService::refused_peers`]. The HELLO host name must match as well.
//! - **Channels.** [`ChannelEnd`] is the engine's handle: nonblocking stream or seqpacket
//!   calls, `shutdown`, `close` (or drop), [`ChannelEnd::state`], counters, and one
//!   eventfd ([`AsRawFd`]) that becomes readable when data, room or state changed. Bytes
//!   are acknowledged to the peer only when `read` returned them, so the peer keeps
//!   everything this end's engine has not taken; nothing is buffered beyond the credit
//!   window, and a channel whose engine does not read stalls only itself.
//! - **Errors** map onto `io::ErrorKind`: `WouldBlock` (no data / no credit), `TimedOut`
//!   (the tunnel stayed down past `resume_timeout`: [`ChannelState::TimedOut`]),
//!   `ConnectionRefused` (the peer's engine refused the OPEN), `ConnectionReset` (the peer
//!   reset or lost the channel), `BrokenPipe` (write after a shutdown), `InvalidInput`
//!   (wrong call for the kind, message too large). The error's inner value is a
//!   [`ChannelIoError`] with the precise [`ChannelState`].
//!
//! What this module does not do: decide what a channel connects to or whether it is
//! allowed (the engine's [`Acceptor`] does), survive a domsockd restart (the peer sees
//! [`domsock_migration::tunnel::BrokenReason::PeerRestarted`]), or read the daemon's
//! config file (the lead wires [`TunnelConfig`] in).

pub mod certs;
mod peer;
mod record;
pub mod tls;
pub mod unix;

pub use domsock_migration::tunnel::{
    BrokenReason, ChannelCounters, ChannelId, ChannelKind, ChannelState, RefusalCode,
};
use domsock_migration::tunnel::{
    ChannelError, Endpoint, EndpointConfig, Incarnation, Millis, OpenError,
};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Everything the tunnel needs; a plain struct the daemon's config fills.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// This host's name (must be the DNS SAN of `cert`).
    pub host_name: String,
    /// Where to accept peers' connections (port 0: any; see
    /// [`TunnelService::local_addr`]).
    pub listen: SocketAddr,
    /// PEM certificate chain of this host.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// Peer host names and, for peers this host dials (names sorting after its own), their
    /// address.
    pub peers: BTreeMap<String, Option<SocketAddr>>,
    /// Channels end [`ChannelState::TimedOut`] when no connection is re-established
    /// within this.
    pub resume_timeout: Duration,
    /// PING after this long without sending.
    pub keepalive_idle: Duration,
    /// Drop the connection after this long without receiving.
    pub keepalive_dead: Duration,
    /// Receive window per channel when it opens.
    pub buf_alloc_bytes: u32,
    /// Largest receive window a channel's grows to when its reader keeps up
    /// (autotuning; `buf_alloc_bytes` turns it off).
    pub max_window_bytes: u32,
    /// Per peer: windows grow only while the sum of all channels' receive windows stays
    /// within this.
    pub window_budget_bytes: u64,
}

impl TunnelConfig {
    /// Defaults for everything but names, addresses and files.
    pub fn new(
        host_name: &str,
        listen: SocketAddr,
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    ) -> Self {
        let d = EndpointConfig::default();
        Self {
            host_name: host_name.to_owned(),
            listen,
            cert,
            key,
            ca,
            peers: BTreeMap::new(),
            resume_timeout: Duration::from_millis(d.resume_timeout_ms),
            keepalive_idle: Duration::from_millis(d.keepalive_idle_ms),
            keepalive_dead: Duration::from_millis(d.keepalive_dead_ms),
            buf_alloc_bytes: d.buf_alloc_bytes,
            max_window_bytes: d.max_window_bytes,
            window_budget_bytes: d.window_budget_bytes,
        }
    }

    fn endpoint_config(&self) -> EndpointConfig {
        EndpointConfig {
            buf_alloc_bytes: self.buf_alloc_bytes,
            max_window_bytes: self.max_window_bytes,
            window_budget_bytes: self.window_budget_bytes,
            keepalive_idle_ms: self.keepalive_idle.as_millis() as u64,
            keepalive_dead_ms: self.keepalive_dead.as_millis() as u64,
            resume_timeout_ms: self.resume_timeout.as_millis() as u64,
            ..EndpointConfig::default()
        }
    }
}

/// Why the tunnel could not start or open.
#[derive(Debug, Error)]
pub enum TunnelError {
    /// Bad host name in the config.
    #[error("{0:?} is not a valid host name")]
    BadHostName(String),
    /// TLS material.
    #[error("TLS setup")]
    Tls(#[from] tls::TlsSetupError),
    /// Binding the listener or spawning threads.
    #[error("tunnel I/O")]
    Io(#[from] io::Error),
    /// No such configured peer.
    #[error("no tunnel peer {0:?}")]
    UnknownPeer(String),
    /// The endpoint refused to open.
    #[error("opening a channel")]
    Open(#[from] OpenError),
}

/// The engine's answer to an incoming OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Sent to the peer.
    pub code: RefusalCode,
    /// Sent to the peer (at most 256 bytes are).
    pub text: String,
}

/// The engine's side of incoming channels. Called on the peer's tunnel thread: must not
/// block (queue the end and wake the engine).
pub trait Acceptor: Send + Sync {
    /// Whether to accept a channel the peer opens (policy lives here).
    fn on_open(&self, peer: &str, metadata: &[u8], kind: ChannelKind) -> Result<(), Refusal>;
    /// An accepted channel (after `on_open` said yes), with the metadata it was opened
    /// with.
    fn accepted(&self, end: ChannelEnd, metadata: Vec<u8>);
}

/// Per-peer counters (read by the metrics module).
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// TLS bytes written to TCP.
    pub bytes_sent: AtomicU64,
    /// TLS bytes read from TCP.
    pub bytes_received: AtomicU64,
    /// Tunnel frames sent.
    pub frames_sent: AtomicU64,
    /// Tunnel frames received.
    pub frames_received: AtomicU64,
    /// TLS connections established (dialed or accepted).
    pub connections: AtomicU64,
    /// Connections after the first one.
    pub reconnects: AtomicU64,
    /// Connections dropped for a protocol error, keepalive or I/O error.
    pub link_errors: AtomicU64,
    /// Channels held now.
    pub channels_open: AtomicU64,
    /// Channels reset because the peer broke their protocol.
    pub channel_violations: AtomicU64,
    /// Channels that timed out.
    pub channels_timed_out: AtomicU64,
    /// Times a channel's receive window grew (autotuning).
    pub window_growths: AtomicU64,
    /// Times a window would have grown but the per-peer budget had no room.
    pub window_growths_denied: AtomicU64,
}

/// A snapshot of [`PeerCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerCountersSnapshot {
    /// See [`PeerCounters`].
    pub bytes_sent: u64,
    /// See [`PeerCounters`].
    pub bytes_received: u64,
    /// See [`PeerCounters`].
    pub frames_sent: u64,
    /// See [`PeerCounters`].
    pub frames_received: u64,
    /// See [`PeerCounters`].
    pub connections: u64,
    /// See [`PeerCounters`].
    pub reconnects: u64,
    /// See [`PeerCounters`].
    pub link_errors: u64,
    /// See [`PeerCounters`].
    pub channels_open: u64,
    /// See [`PeerCounters`].
    pub channel_violations: u64,
    /// See [`PeerCounters`].
    pub channels_timed_out: u64,
    /// See [`PeerCounters`].
    pub window_growths: u64,
    /// See [`PeerCounters`].
    pub window_growths_denied: u64,
}

impl PeerCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> PeerCountersSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PeerCountersSnapshot {
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            frames_sent: g(&self.frames_sent),
            frames_received: g(&self.frames_received),
            connections: g(&self.connections),
            reconnects: g(&self.reconnects),
            link_errors: g(&self.link_errors),
            channels_open: g(&self.channels_open),
            channel_violations: g(&self.channel_violations),
            channels_timed_out: g(&self.channels_timed_out),
            window_growths: g(&self.window_growths),
            window_growths_denied: g(&self.window_growths_denied),
        }
    }
}

/// How the driver tells a channel end's owner that the channel changed.
#[derive(Debug, Clone)]
pub(crate) enum Notifier {
    /// The end's own eventfd.
    Own(Arc<EventFd>),
    /// A [`ReadyGroup`] the end joined, with the end's key in it.
    Group(Arc<ReadyGroup>, u64),
}

impl Notifier {
    /// Tells the owner: writes an own eventfd; marks a group and returns it when its
    /// eventfd must be written (the caller writes it after marking the whole batch, so
    /// the consumer wakes once for all of it).
    fn notify(&self) -> Option<&Arc<ReadyGroup>> {
        match self {
            Notifier::Own(fd) => {
                let _ = fd.write(1);
                None
            }
            Notifier::Group(g, key) => g.mark(*key).then_some(g),
        }
    }
}

/// One wakeup for many channel ends: a consumer that serves many channels on one thread
/// (an event loop) lets them join one group ([`ChannelEnd::join_group`]) and waits on the
/// group's eventfd alone. The driver marks each changed member in the group's ready list
/// and writes the eventfd only when the list was empty, so a round of frames for many
/// channels costs one eventfd write and one wakeup of the consumer, not one per channel
/// (on a busy core each write woke the consumer, which preempted the driver, read one
/// channel and slept again: twice the context switches per byte at 64 channels).
///
/// The consumer waits on the eventfd ([`AsFd`]; edge-triggered epoll needs no reset,
/// level-triggered polling calls [`ReadyGroup::clear_wakeup`] first) and then takes the
/// ready keys with [`ReadyGroup::take_ready`], every time it wakes: a key marked after
/// the take writes the eventfd again. Each key is listed once until taken, so the list is
/// bounded by the group's members.
#[derive(Debug)]
pub struct ReadyGroup {
    fd: EventFd,
    ready: Mutex<ReadyList>,
}

#[derive(Debug, Default)]
struct ReadyList {
    keys: Vec<u64>,
    listed: std::collections::HashSet<u64>,
}

impl ReadyGroup {
    /// An empty group.
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            fd: EventFd::new(EFD_NONBLOCK)?,
            ready: Mutex::new(ReadyList::default()),
        }))
    }

    fn list(&self) -> MutexGuard<'_, ReadyList> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists `key`; returns whether the list was empty (the eventfd must be written).
    fn mark(&self, key: u64) -> bool {
        let mut l = self.list();
        if !l.listed.insert(key) {
            return false;
        }
        l.keys.push(key);
        l.keys.len() == 1
    }

    pub(crate) fn wake(&self) {
        let _ = self.fd.write(1);
    }

    /// Moves the keys of the members that changed since the last take into `out` (each
    /// once, in the order they changed).
    pub fn take_ready(&self, out: &mut Vec<u64>) {
        let mut l = self.list();
        l.listed.clear();
        out.append(&mut l.keys);
    }

    /// Resets the eventfd (for level-triggered waits; call before [`ReadyGroup::take_ready`]).
    pub fn clear_wakeup(&self) {
        let _ = self.fd.read();
    }
}

impl AsFd for ReadyGroup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd is owned by `self.fd`, which lives as long as `self`.
        #[allow(unsafe_code)]
        unsafe {
            BorrowedFd::borrow_raw(self.fd.as_raw_fd())
        }
    }
}

struct PeerInner {
    ep: Endpoint,
    ends: HashMap<ChannelId, Notifier>,
    /// A connection the listener accepted and authenticated, for the peer thread.
    incoming: Option<peer::Conn>,
}

pub(crate) struct PeerShared {
    name: String,
    addr: Option<SocketAddr>,
    inner: Mutex<PeerInner>,
    wake: EventFd,
    /// Whether a channel end that queued frames must write `wake`.
    transmit_wake: TransmitWake,
    counters: PeerCounters,
    clock: Instant,
}

impl std::fmt::Debug for PeerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerShared")
            .field("name", &self.name)
            .finish()
    }
}

impl PeerShared {
    fn lock(&self) -> MutexGuard<'_, PeerInner> {
        // A panic on another thread holding the lock leaves the endpoint as it was at a
        // call boundary (its methods do not unwind mid-update in release builds).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Millis {
        Millis(self.clock.elapsed().as_millis() as u64)
    }

    fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Wakes the driver to send what a channel end just queued, unless it will anyway.
    fn wake_to_transmit(&self) {
        if self.transmit_wake.queued() {
            self.wake();
        }
    }
}

/// Spares channel ends the eventfd write (a syscall, and a wakeup of a driver that is
/// already awake) for every write. The flag is set while the driver is sure to look for
/// frames to send before it sleeps: it is running, or waits for the socket to take more.
///
/// A channel end queues frames under the endpoint's lock, then calls
/// [`TransmitWake::queued`]. The driver, about to sleep, calls [`TransmitWake::idle`]: it
/// clears the flag and then looks at the endpoint under the lock. An end that queued
/// before that look is seen by it; one that queued after finds the flag clear and writes
/// the eventfd. Either way nothing waits for a timer.
#[derive(Debug, Default)]
struct TransmitWake {
    driver_will_look: AtomicBool,
}

impl TransmitWake {
    /// A channel end queued frames: whether it must wake the driver.
    fn queued(&self) -> bool {
        !self.driver_will_look.swap(true, Ordering::SeqCst)
    }

    /// The driver woke up (it looks at the endpoint before it sleeps again).
    fn awake(&self) {
        self.driver_will_look.store(true, Ordering::SeqCst);
    }

    /// The driver has sent everything and would sleep: `wants_transmit` looks at the
    /// endpoint (under its lock). Returns whether to go round again instead.
    fn idle(&self, wants_transmit: impl FnOnce() -> bool) -> bool {
        self.driver_will_look.store(false, Ordering::SeqCst);
        if wants_transmit() {
            self.awake();
            return true;
        }
        false
    }
}

pub(crate) struct ServiceShared {
    cfg: TunnelConfig,
    tls: tls::TlsMaterial,
    peers: BTreeMap<String, Arc<PeerShared>>,
    stop: AtomicBool,
    refused_peers: AtomicU64,
    acceptor: Arc<dyn Acceptor>,
}

/// The running tunnel service of one host: a listener thread and one thread per peer.
/// Dropping it stops them (channels' ends stay readable for what they buffered).
pub struct TunnelService {
    shared: Arc<ServiceShared>,
    local_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TunnelService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelService")
            .field("host", &self.shared.cfg.host_name)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

fn random_incarnation() -> Incarnation {
    let mut b = [0u8; 16];
    // A failing OS RNG leaves zeros: the peer then cannot tell a restart from a resume
    // only if this host restarts with the same failure, which is logged.
    if let Err(e) = getrandom::fill(&mut b) {
        tracing::error!("no randomness for the tunnel incarnation: {e}");
    }
    Incarnation(b)
}

impl TunnelService {
    /// Loads the TLS material, binds the listener and starts the threads.
    pub fn start(cfg: TunnelConfig, acceptor: Arc<dyn Acceptor>) -> Result<Self, TunnelError> {
        use domsock_migration::tunnel::wire::valid_host_name;
        for name in std::iter::once(&cfg.host_name).chain(cfg.peers.keys()) {
            if !valid_host_name(name) {
                return Err(TunnelError::BadHostName(name.clone()));
            }
        }
        if cfg.peers.contains_key(&cfg.host_name) {
            return Err(TunnelError::BadHostName(cfg.host_name.clone()));
        }
        let tls = tls::TlsMaterial::load(&cfg.cert, &cfg.key, &cfg.ca)?;
        let listener = TcpListener::bind(cfg.listen)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let clock = Instant::now();
        let incarnation = random_incarnation();
        let ep_cfg = cfg.endpoint_config();
        let mut peers = BTreeMap::new();
        for (name, addr) in &cfg.peers {
            let ep = Endpoint::new(ep_cfg.clone(), &cfg.host_name, name, incarnation, Millis(0));
            peers.insert(
                name.clone(),
                Arc::new(PeerShared {
                    name: name.clone(),
                    addr: *addr,
                    inner: Mutex::new(PeerInner {
                        ep,
                        ends: HashMap::new(),
                        incoming: None,
                    }),
                    wake: EventFd::new(EFD_NONBLOCK)?,
                    transmit_wake: TransmitWake::default(),
                    counters: PeerCounters::default(),
                    clock,
                }),
            );
        }
        let shared = Arc::new(ServiceShared {
            cfg,
            tls,
            peers,
            stop: AtomicBool::new(false),
            refused_peers: AtomicU64::new(0),
            acceptor,
        });
        let mut threads = Vec::new();
        {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("tunnel-listen".into())
                    .spawn(move || peer::listen(s, listener))?,
            );
        }
        for p in shared.peers.values() {
            let (s, p) = (shared.clone(), p.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tunnel-{}", p.name))
                    .spawn(move || peer::run(s, p))?,
            );
        }
        Ok(Self {
            shared,
            local_addr,
            threads,
        })
    }

    /// The listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Opens a channel to `peer`. The end is [`ChannelState::Opening`] until the peer
    /// answers; it waits (bounded by the resume timeout) while the tunnel is down.
    pub fn open(
        &self,
        peer: &str,
        metadata: &[u8],
        kind: ChannelKind,
    ) -> Result<ChannelEnd, TunnelError> {
        let p = self
            .shared
            .peers
            .get(peer)
            .ok_or_else(|| TunnelError::UnknownPeer(peer.to_owned()))?;
        let notify = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let id = {
            let mut g = p.lock();
            let now = p.now();
            let id = g.ep.open(kind, metadata, now)?;
            g.ends.insert(id, Notifier::Own(notify.clone()));
            id
        };
        p.wake();
        Ok(ChannelEnd {
            peer: p.clone(),
            id,
            kind,
            notify,
        })
    }

    /// Connections refused: TLS handshake failures (no or a foreign certificate) and
    /// certificates naming no configured peer, inbound and outbound.
    pub fn refused_peers(&self) -> u64 {
        self.shared.refused_peers.load(Ordering::Relaxed)
    }

    /// Counters of one peer.
    pub fn counters(&self, peer: &str) -> Option<PeerCountersSnapshot> {
        self.shared.peers.get(peer).map(|p| p.counters.snapshot())
    }

    /// Whether the tunnel to `peer` is up (HELLO exchanged).
    pub fn is_up(&self, peer: &str) -> bool {
        self.shared
            .peers
            .get(peer)
            .is_some_and(|p| p.lock().ep.is_up())
    }
}

impl Drop for TunnelService {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for p in self.shared.peers.values() {
            p.wake();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod ready_group_tests {
    use super::ReadyGroup;

    #[test]
    fn only_the_first_mark_after_a_take_wakes_and_keys_are_listed_once() {
        let g = ReadyGroup::new().unwrap();
        assert!(g.mark(3), "empty list: wake");
        assert!(!g.mark(5), "already woken");
        assert!(!g.mark(3), "listed once");
        let mut out = vec![9];
        g.take_ready(&mut out);
        assert_eq!(out, [9, 3, 5], "appended in order of change");
        out.clear();
        g.take_ready(&mut out);
        assert!(out.is_empty());
        assert!(g.mark(3), "a mark after the take wakes again");
        g.take_ready(&mut out);
        assert_eq!(out, [3]);
    }
}

#[cfg(test)]
mod transmit_wake_tests {
    use super::TransmitWake;

    #[test]
    fn a_write_while_the_driver_runs_is_seen_before_it_sleeps() {
        let w = TransmitWake::default();
        // Asleep: the first write wakes it, the next ones need not.
        assert!(w.queued());
        assert!(!w.queued());
        w.awake();
        assert!(!w.queued(), "running: no eventfd");
        // That write is still queued when the driver would sleep: it goes round again.
        assert!(w.idle(|| true));
        assert!(!w.queued());
        // Nothing queued: it sleeps, and the next write wakes it.
        assert!(!w.idle(|| false));
        assert!(w.queued());
    }
}

/// The precise reason behind a channel's `io::Error` (its inner error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("tunnel channel is {0:?}")]
pub struct ChannelIoError(pub ChannelState);

fn io_error(e: ChannelError, writing: bool) -> io::Error {
    use io::ErrorKind as K;
    match e {
        ChannelError::WouldBlock => K::WouldBlock.into(),
        ChannelError::Unknown(_) => K::NotConnected.into(),
        ChannelError::BrokenPipe => K::BrokenPipe.into(),
        ChannelError::WrongKind(_) | ChannelError::MessageSize { .. } => {
            io::Error::new(K::InvalidInput, e)
        }
        ChannelError::NotOpen(s) => {
            let kind = match s {
                ChannelState::TimedOut => K::TimedOut,
                ChannelState::Refused(_) => K::ConnectionRefused,
                ChannelState::Broken(BrokenReason::PeerClosed(
                    domsock_migration::tunnel::CloseReason::Normal,
                )) if writing => K::BrokenPipe,
                _ => K::ConnectionReset,
            };
            io::Error::new(kind, ChannelIoError(s))
        }
    }
}

/// The engine's handle on one tunnel channel. All calls are nonblocking. Its fd
/// ([`AsRawFd`]) is an eventfd that becomes readable when data, room or state changed;
/// [`ChannelEnd::clear_wakeup`] resets it. An end that joined a [`ReadyGroup`] is
/// reported there instead. Dropping the end closes the channel.
pub struct ChannelEnd {
    peer: Arc<PeerShared>,
    id: ChannelId,
    kind: ChannelKind,
    notify: Arc<EventFd>,
}

impl std::fmt::Debug for ChannelEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelEnd")
            .field("peer", &self.peer.name)
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish()
    }
}

impl ChannelEnd {
    /// The peer host; with [`ChannelEnd::id`] the channel's identity.
    pub fn peer(&self) -> &str {
        &self.peer.name
    }

    /// The channel id within the tunnel.
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// Stream or seqpacket.
    pub fn kind(&self) -> ChannelKind {
        self.kind
    }

    fn with<T>(
        &self,
        writing: bool,
        f: impl FnOnce(&mut Endpoint) -> Result<T, ChannelError>,
    ) -> io::Result<T> {
        let (r, wake) = {
            let mut g = self.peer.lock();
            let r = f(&mut g.ep);
            (r, g.ep.wants_transmit())
        };
        if wake {
            self.peer.wake_to_transmit();
        }
        r.map_err(|e| io_error(e, writing))
    }

    /// Reads bytes (stream): `Ok(0)` at the end of the stream.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.with(false, |ep| ep.read(self.id, buf))
    }

    /// Writes what the peer's window allows (stream).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.with(true, |ep| ep.write(self.id, buf))
    }

    /// Receives one message (seqpacket): its full length (truncated to `buf`), `None` at
    /// the end.
    pub fn recv_msg(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.with(false, |ep| ep.recv_msg(self.id, buf))
    }

    /// Sends one whole message (seqpacket), or `WouldBlock`.
    pub fn send_msg(&self, msg: &[u8]) -> io::Result<()> {
        self.with(true, |ep| ep.send_msg(self.id, msg))
    }

    /// Half-closes.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        use std::net::Shutdown as S;
        let (rd, wr) = match how {
            S::Read => (true, false),
            S::Write => (false, true),
            S::Both => (true, true),
        };
        self.with(true, |ep| ep.shutdown(self.id, rd, wr))
    }

    /// Current state.
    pub fn state(&self) -> ChannelState {
        self.peer
            .lock()
            .ep
            .state(self.id)
            .unwrap_or(ChannelState::Broken(BrokenReason::PeerForgot))
    }

    /// Sent / acknowledged / received / consumed counts (stream offsets).
    pub fn counters(&self) -> ChannelCounters {
        self.peer.lock().ep.counters(self.id).unwrap_or_default()
    }

    /// Stream bytes written from offset `from` on that the peer has not read yet; see
    /// [`Endpoint::unacked_from`].
    pub fn unacked_from(&self, from: u64) -> Option<Vec<u8>> {
        self.peer.lock().ep.unacked_from(self.id, from)
    }

    /// Caps how far autotuning grows this channel's receive window; see
    /// [`Endpoint::set_max_window`].
    pub fn set_max_window(&self, bytes: u32) {
        let _ = self.peer.lock().ep.set_max_window(self.id, bytes);
    }

    /// Resets the eventfd (call before draining the channel). Not needed under
    /// edge-triggered epoll (`EPOLLET`): there every notification is a new event whether
    /// or not the eventfd was reset, which saves a syscall per wakeup.
    pub fn clear_wakeup(&self) {
        let _ = self.notify.read();
    }

    /// From now on the driver tells `group` (as `key`) instead of this end's own eventfd
    /// when the channel changes; the key is listed at once, so nothing that changed
    /// before the join is missed. Joining another group moves the end there.
    pub fn join_group(&self, group: &Arc<ReadyGroup>, key: u64) {
        // Into the map first: a change after this is marked by the driver, one before it
        // is covered by this mark (the consumer reads the channel after taking the key).
        self.peer
            .lock()
            .ends
            .insert(self.id, Notifier::Group(group.clone(), key));
        if group.mark(key) {
            group.wake();
        }
    }

    /// Closes the channel (same as dropping the end).
    pub fn close(self) {}

    /// Closes the channel telling the peer that what it carried was given up
    /// ([`domsock_migration::tunnel::CloseReason::Aborted`]).
    pub fn abort(self) {
        self.peer
            .lock()
            .ep
            .close_with(self.id, domsock_migration::tunnel::CloseReason::Aborted);
    }
}

impl Drop for ChannelEnd {
    fn drop(&mut self) {
        {
            let mut g = self.peer.lock();
            g.ep.close(self.id);
            g.ends.remove(&self.id);
        }
        self.peer.wake();
    }
}

impl AsRawFd for ChannelEnd {
    fn as_raw_fd(&self) -> RawFd {
        self.notify.as_raw_fd()
    }
}

impl AsFd for ChannelEnd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd is owned by `self.notify`, which lives as long as `self`, so
        // the fd stays open for the borrow's lifetime.
        #[allow(unsafe_code)]
        unsafe {
            BorrowedFd::borrow_raw(self.notify.as_raw_fd())
        }
    }
}
