//! Connection table and per-connection state machine for vsock `SOCK_STREAM` and
//! `SOCK_SEQPACKET`.
//!
//! # Protocol primer
//! ```text
//!  initiator                         responder
//!     |-- REQUEST ------------------->|   responder has a listener: RESPONSE, else RST
//!     |<------------------- RESPONSE --|
//!     |-- RW (len, EOM/EOR) --------->|   every packet carries buf_alloc/fwd_cnt (credit)
//!     |<-------------- CREDIT_UPDATE --|   when the sender's view of our space runs low
//!     |-- SHUTDOWN(SEND) ------------>|   half close: no more data from initiator
//!     |-- SHUTDOWN(RCV|SEND) -------->|   full close; the side that sees both directions
//!     |<------------------------- RST --|   shut sends RST, the closer waits for it
//! ```
//! A packet for an unknown connection is answered with RST (unless it is itself an RST).
//!
//! # Sans-IO
//! [`Endpoint`] is fed validated headers with [`Endpoint::handle`] and local decisions with
//! [`Endpoint::connect`], [`Endpoint::accept`], [`Endpoint::consumed`],
//! [`Endpoint::shutdown`] and [`Endpoint::reset`]. It produces control packets through
//! [`Endpoint::poll_transmit`] and data headers through [`Endpoint::send_rw`]. It never sees
//! payload bytes: an [`Incoming::Data`] tells the caller how many payload bytes it must take,
//! and the caller reports bytes handed on with [`Endpoint::consumed`]. Time is passed in.

use crate::addr::{Cid, ConnKey, Port, VsockAddr};
use crate::credit::{Credit, CreditViolation};
use crate::hash::KeyedState;
use crate::packet::{Header, Op, Shutdown, SocketType, SEQ_EOM, SEQ_EOR};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Tunables of an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Receive buffer we advertise per connection.
    pub buf_alloc_bytes: u32,
    /// Connections this endpoint tracks at most.
    pub max_connections: usize,
    /// RSTs for unknown connections queued at most (more are dropped and counted).
    pub max_queued_rsts: usize,
    /// How long a REQUEST may wait for its RESPONSE.
    pub connect_timeout: Duration,
    /// How long a full close waits for the peer's RST.
    pub close_timeout: Duration,
    /// First local port handed out by [`Endpoint::connect`] without an explicit port.
    pub ephemeral_port_start: u32,
    /// Seed of the connection table's hasher ([`KeyedState`]); callers whose peers are
    /// untrusted should draw it at random.
    pub hash_seed: u64,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            buf_alloc_bytes: 256 * 1024,
            max_connections: 4096,
            max_queued_rsts: 1024,
            connect_timeout: Duration::from_secs(2),
            close_timeout: Duration::from_secs(8),
            ephemeral_port_start: 49152,
            hash_seed: 0,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// We sent REQUEST and wait for RESPONSE.
    Connecting,
    /// Data may flow (subject to shutdown flags).
    Established,
    /// We shut both directions and wait for the peer's RST.
    Closing,
}

/// Control packets a connection still owes its peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Pending {
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
    shutdown: bool,
}

impl Pending {
    fn any(&self) -> bool {
        self.request || self.response || self.credit_update || self.credit_request || self.shutdown
    }
}

/// One connection.
#[derive(Debug, Clone)]
pub struct Connection {
    key: ConnKey,
    socket_type: SocketType,
    state: State,
    credit: Credit,
    local_shutdown: Shutdown,
    peer_shutdown: Shutdown,
    pending: Pending,
    in_ctl_queue: bool,
    deadline: Option<Instant>,
}

impl Connection {
    /// Its key.
    pub fn key(&self) -> ConnKey {
        self.key
    }
    /// Stream or seqpacket.
    pub fn socket_type(&self) -> SocketType {
        self.socket_type
    }
    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }
    /// Credit state.
    pub fn credit(&self) -> &Credit {
        &self.credit
    }
    /// Directions we have shut.
    pub fn local_shutdown(&self) -> Shutdown {
        self.local_shutdown
    }
    /// Directions the peer has shut.
    pub fn peer_shutdown(&self) -> Shutdown {
        self.peer_shutdown
    }
    /// Whether we may send data now: established, our send side open, the peer's receive
    /// side open. Says nothing about credit.
    pub fn can_send(&self) -> bool {
        self.state == State::Established && !self.local_shutdown.send && !self.peer_shutdown.rcv
    }
}

/// What an incoming packet meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// A connection request for a new key. Call [`Endpoint::accept`] or
    /// [`Endpoint::refuse`].
    Request(Header),
    /// Our request was accepted.
    Connected(ConnKey),
    /// The caller must take the packet's `len` payload bytes for this connection.
    Data {
        /// Connection.
        key: ConnKey,
        /// Payload bytes.
        len: u32,
        /// Seqpacket end of message.
        eom: bool,
        /// Seqpacket end of record.
        eor: bool,
    },
    /// The peer shut more directions; the value is the accumulated set.
    PeerShutdown(ConnKey, Shutdown),
    /// The peer's credit may have grown.
    Credit(ConnKey),
    /// The connection was reset by the peer (or refused, if it was connecting). It is gone.
    Reset(ConnKey),
    /// Our full close completed (peer acknowledged with RST). It is gone.
    Closed(ConnKey),
    /// Nothing for the caller; the packet's payload (if any) must be skipped.
    Dropped(DropReason),
}

/// Why a packet was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No such connection; an RST was queued unless the packet was an RST.
    UnknownConnection,
    /// The packet's socket type differs from the connection's; the connection was reset.
    TypeMismatch,
    /// Payload beyond the credit we gave; the connection was reset.
    CreditViolation(CreditViolation),
    /// Data after the peer shut its send side, or a packet the state does not allow; the
    /// connection was reset.
    ProtocolViolation,
    /// Data after we shut our receive side; accounted and discarded.
    ReceiveShut,
    /// A packet that needs no action (e.g. a duplicate RESPONSE-less CREDIT_UPDATE).
    NoAction,
}

/// Something that happened on a timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// A REQUEST got no answer; the connection is gone.
    Connect(ConnKey),
    /// A full close got no RST; we sent RST and the connection is gone.
    Close(ConnKey),
}

/// Local operations that can fail.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnError {
    /// The table is full.
    #[error("connection table full ({max} connections)")]
    TableFull {
        /// The bound.
        max: usize,
    },
    /// The key is in use.
    #[error("connection {0} already exists")]
    InUse(ConnKey),
    /// No free local port.
    #[error("no free local port")]
    NoPort,
    /// No such connection.
    #[error("no connection {0}")]
    NotFound(ConnKey),
    /// Sending is not allowed in this state or exceeds the credit.
    #[error("cannot send {len} bytes on {key}: credit {credit}, can_send {can_send}")]
    CannotSend {
        /// Connection.
        key: ConnKey,
        /// Requested length.
        len: u32,
        /// Available credit.
        credit: u32,
        /// Whether the state allows sending at all.
        can_send: bool,
    },
}

/// Counters of unusual events, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// RSTs sent for packets on unknown connections.
    pub unknown_connection: u64,
    /// RSTs for unknown connections dropped because the queue was full.
    pub rst_queue_overflow: u64,
    /// Connections reset for credit violations.
    pub credit_violations: u64,
    /// Connections reset for protocol violations (bad state, type mismatch).
    pub protocol_violations: u64,
    /// Connect timeouts.
    pub connect_timeouts: u64,
    /// Close timeouts.
    pub close_timeouts: u64,
}

/// A set of connections sharing one local CID: the sans-IO vsock endpoint.
#[derive(Debug)]
pub struct Endpoint {
    config: EndpointConfig,
    conns: HashMap<ConnKey, Connection, KeyedState>,
    ctl_queue: VecDeque<ConnKey>,
    rst_queue: VecDeque<Header>,
    timers: BTreeSet<(Instant, ConnKey)>,
    next_port: u32,
    stats: EndpointStats,
}

impl Endpoint {
    /// An empty endpoint.
    pub fn new(config: EndpointConfig) -> Self {
        let next_port = config.ephemeral_port_start;
        Self {
            conns: HashMap::with_hasher(KeyedState::new(config.hash_seed)),
            config,
            ctl_queue: VecDeque::new(),
            rst_queue: VecDeque::new(),
            timers: BTreeSet::new(),
            next_port,
            stats: EndpointStats::default(),
        }
    }

    /// Tunables.
    pub fn config(&self) -> &EndpointConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Looks a connection up.
    pub fn get(&self, key: &ConnKey) -> Option<&Connection> {
        self.conns.get(key)
    }

    /// Keys of all connections.
    pub fn keys(&self) -> impl Iterator<Item = &ConnKey> {
        self.conns.keys()
    }

    /// Drops every connection without telling the peer (its transport was reset).
    pub fn clear(&mut self) {
        self.conns.clear();
        self.ctl_queue.clear();
        self.rst_queue.clear();
        self.timers.clear();
    }

    /// Handles one validated incoming header (already routed to this endpoint).
    pub fn handle(&mut self, hdr: &Header) -> Incoming {
        let key = hdr.receiver_key();
        let Some(conn) = self.conns.get_mut(&key) else {
            return match hdr.op() {
                Op::Request => {
                    if self.conns.len() >= self.config.max_connections {
                        self.queue_rst_reply(hdr);
                        Incoming::Dropped(DropReason::NoAction)
                    } else {
                        Incoming::Request(*hdr)
                    }
                }
                Op::Rst => Incoming::Dropped(DropReason::UnknownConnection),
                _ => {
                    self.stats.unknown_connection += 1;
                    self.queue_rst_reply(hdr);
                    Incoming::Dropped(DropReason::UnknownConnection)
                }
            };
        };
        if hdr.socket_type() != conn.socket_type {
            self.stats.protocol_violations += 1;
            self.reset(key);
            return Incoming::Dropped(DropReason::TypeMismatch);
        }
        conn.credit.update_peer(hdr.buf_alloc(), hdr.fwd_cnt());
        match (conn.state, hdr.op()) {
            (_, Op::Rst) => {
                let closing = conn.state == State::Closing;
                self.remove(&key);
                if closing {
                    Incoming::Closed(key)
                } else {
                    Incoming::Reset(key)
                }
            }
            (State::Connecting, Op::Response) if conn.pending.request => {
                // Our REQUEST has not gone out yet, so this cannot answer it (a stale
                // RESPONSE for an earlier connection with this key, or a forged one).
                // Keep waiting for the real one.
                Incoming::Dropped(DropReason::NoAction)
            }
            (State::Connecting, Op::Response) => {
                conn.state = State::Established;
                self.set_deadline(key, None);
                Incoming::Connected(key)
            }
            (State::Established, Op::Rw) => {
                if conn.peer_shutdown.send {
                    self.stats.protocol_violations += 1;
                    self.reset(key);
                    return Incoming::Dropped(DropReason::ProtocolViolation);
                }
                if let Err(v) = conn.credit.on_receive(hdr.len()) {
                    self.stats.credit_violations += 1;
                    self.reset(key);
                    return Incoming::Dropped(DropReason::CreditViolation(v));
                }
                if conn.local_shutdown.rcv {
                    conn.credit.consume(hdr.len());
                    return Incoming::Dropped(DropReason::ReceiveShut);
                }
                let seq = conn.socket_type == SocketType::SeqPacket;
                // A seqpacket consumer may be holding a partial message and waiting for this
                // data; if the data leaves the peer short of credit, tell it what was consumed
                // (see `credit`).
                if seq && conn.credit.wants_eager_update() {
                    conn.pending.credit_update = true;
                    self.enqueue_ctl(key);
                }
                Incoming::Data {
                    key,
                    len: hdr.len(),
                    eom: seq && hdr.flags() & SEQ_EOM != 0,
                    eor: seq && hdr.flags() & SEQ_EOR != 0,
                }
            }
            (State::Established | State::Closing, Op::Shutdown) => {
                let before = conn.peer_shutdown;
                conn.peer_shutdown = before.union(Shutdown::from_flags(hdr.flags()));
                let after = conn.peer_shutdown;
                if conn.state == State::Closing && after.is_both() {
                    // Both sides have shut everything: we are the last to know, so we
                    // acknowledge with RST.
                    self.reset(key);
                    return Incoming::Closed(key);
                }
                if after == before {
                    Incoming::Dropped(DropReason::NoAction)
                } else {
                    Incoming::PeerShutdown(key, after)
                }
            }
            (State::Established | State::Closing, Op::CreditUpdate) => Incoming::Credit(key),
            (State::Established | State::Closing, Op::CreditRequest) => {
                conn.pending.credit_update = true;
                self.enqueue_ctl(key);
                Incoming::Credit(key)
            }
            (State::Closing, Op::Rw) => {
                // We no longer read; account and drop so the peer is not stuck on credit.
                if conn.credit.on_receive(hdr.len()).is_ok() {
                    conn.credit.consume(hdr.len());
                }
                Incoming::Dropped(DropReason::ReceiveShut)
            }
            _ => {
                // REQUEST on a live key, RESPONSE when not connecting, data while connecting.
                self.stats.protocol_violations += 1;
                self.reset(key);
                Incoming::Dropped(DropReason::ProtocolViolation)
            }
        }
    }

    /// Accepts a connection request returned as [`Incoming::Request`].
    pub fn accept(&mut self, req: &Header) -> Result<ConnKey, ConnError> {
        let key = req.receiver_key();
        self.insert(
            key,
            req.socket_type(),
            State::Established,
            req.buf_alloc(),
            req.fwd_cnt(),
        )?;
        let conn = self.conns.get_mut(&key).expect("just inserted");
        conn.pending.response = true;
        self.enqueue_ctl(key);
        Ok(key)
    }

    /// Refuses a connection request: queues an RST.
    pub fn refuse(&mut self, req: &Header) {
        self.queue_rst_reply(req);
    }

    /// Starts a connection from `local_port` (or an ephemeral port) to `peer`.
    pub fn connect(
        &mut self,
        now: Instant,
        local_cid: Cid,
        local_port: Option<Port>,
        peer: VsockAddr,
        socket_type: SocketType,
    ) -> Result<ConnKey, ConnError> {
        let port = match local_port {
            Some(p) => p,
            None => self.ephemeral_port(local_cid, peer)?,
        };
        let key = ConnKey {
            local: VsockAddr::new(local_cid, port),
            peer,
        };
        self.insert(key, socket_type, State::Connecting, 0, 0)?;
        let conn = self.conns.get_mut(&key).expect("just inserted");
        conn.pending.request = true;
        self.enqueue_ctl(key);
        self.set_deadline(key, Some(now + self.config.connect_timeout));
        Ok(key)
    }

    /// Bytes we may send on `key` now (0 if the state forbids sending).
    pub fn send_credit(&self, key: &ConnKey) -> u32 {
        match self.conns.get(key) {
            Some(c) if c.can_send() => c.credit.peer_credit(),
            _ => 0,
        }
    }

    /// Builds the header of an `RW` packet carrying `len` bytes and accounts them.
    /// `eom`/`eor` are only meaningful for seqpacket.
    pub fn send_rw(
        &mut self,
        key: &ConnKey,
        len: u32,
        eom: bool,
        eor: bool,
    ) -> Result<Header, ConnError> {
        let conn = self.conns.get_mut(key).ok_or(ConnError::NotFound(*key))?;
        let credit = conn.credit.peer_credit();
        if !conn.can_send() || len > credit {
            return Err(ConnError::CannotSend {
                key: *key,
                len,
                credit,
                can_send: conn.can_send(),
            });
        }
        let mut flags = 0;
        if conn.socket_type != SocketType::SeqPacket {
            conn.credit.on_send(len);
        } else {
            conn.credit.on_send_message_part(len, eom);
            if eom {
                flags |= SEQ_EOM;
            }
            if eor {
                flags |= SEQ_EOR;
            }
        }
        let (buf_alloc, fwd_cnt) = conn.credit.stamp();
        let hdr = Header::rw(*key, conn.socket_type, len, flags, buf_alloc, fwd_cnt);
        conn.pending.credit_update = false;
        Ok(hdr)
    }

    /// Asks the peer for a credit update (e.g. after finding the credit exhausted). Does
    /// nothing while the connection is still connecting: the peer has no connection to
    /// answer for yet, and its `RESPONSE` brings the credit.
    pub fn request_credit(&mut self, key: &ConnKey) {
        if let Some(conn) = self.conns.get_mut(key) {
            if conn.state == State::Connecting {
                return;
            }
            conn.pending.credit_request = true;
            self.enqueue_ctl(*key);
        }
    }

    /// Asks the peer for a credit update when the packet bound, not its free bytes, stops
    /// sending on `key` (see [`crate::credit`]); at most once per movement of the peer's
    /// `fwd_cnt`. Whether it asked.
    pub fn request_credit_if_packet_bound(&mut self, key: &ConnKey) -> bool {
        let wants = self
            .conns
            .get_mut(key)
            .is_some_and(|c| c.can_send() && c.credit.wants_credit_request());
        if wants {
            self.request_credit(key);
        }
        wants
    }

    /// Reports that the caller handed `n` received bytes on to its consumer.
    ///
    /// On a stream, `CREDIT_UPDATE`s are batched until half the receive buffer is free, which
    /// assumes the caller never holds received bytes back while waiting for more (it stops
    /// consuming only while its own output is blocked). On a seqpacket connection the caller
    /// may hold a partial message until the rest arrives; updates are then sent eagerly.
    pub fn consumed(&mut self, key: &ConnKey, n: u32) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.credit.consume(n);
            let wants_update = match conn.socket_type {
                SocketType::Stream => conn.credit.wants_update(),
                SocketType::SeqPacket => {
                    conn.credit.wants_eager_update() || conn.credit.wants_drained_update()
                }
            };
            if wants_update {
                conn.pending.credit_update = true;
                self.enqueue_ctl(*key);
            }
        }
    }

    /// Changes the receive buffer advertised on `key` and tells the peer at once. The
    /// session service shrinks it while bytes of an earlier connection still wait for the
    /// host, so that what it holds never exceeds the window it promised.
    pub fn set_buf_alloc(&mut self, key: &ConnKey, bytes: u32) {
        if let Some(conn) = self.conns.get_mut(key) {
            if conn.credit.buf_alloc() != bytes {
                conn.credit.set_buf_alloc(bytes);
                if conn.state != State::Connecting {
                    conn.pending.credit_update = true;
                    self.enqueue_ctl(*key);
                }
            }
        }
    }

    /// Our side shut `how`. Shutting both directions starts the close handshake, unless the
    /// peer already shut both, in which case the connection ends with an RST at once.
    pub fn shutdown(&mut self, now: Instant, key: &ConnKey, how: Shutdown) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state == State::Connecting {
            self.reset(*key);
            return;
        }
        let after = conn.local_shutdown.union(how);
        if after == conn.local_shutdown {
            return;
        }
        conn.local_shutdown = after;
        if after.is_both() && conn.peer_shutdown.is_both() {
            self.reset(*key);
            return;
        }
        conn.pending.shutdown = true;
        if after.is_both() {
            conn.state = State::Closing;
            self.set_deadline(*key, Some(now + self.config.close_timeout));
        }
        self.enqueue_ctl(*key);
    }

    /// Ends a connection at once: queues an RST and forgets it.
    pub fn reset(&mut self, key: ConnKey) {
        if let Some(conn) = self.remove(&key) {
            let hdr = Header::control(key, conn.socket_type, Op::Rst, 0);
            self.push_rst(hdr);
        }
    }

    /// The next control packet to send, if any.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Header> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some(h);
        }
        while let Some(key) = self.ctl_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let op = if conn.pending.request {
                conn.pending.request = false;
                Op::Request
            } else if conn.pending.response {
                conn.pending.response = false;
                Op::Response
            } else if conn.pending.shutdown {
                conn.pending.shutdown = false;
                Op::Shutdown
            } else if conn.pending.credit_update {
                conn.pending.credit_update = false;
                Op::CreditUpdate
            } else if conn.pending.credit_request {
                conn.pending.credit_request = false;
                Op::CreditRequest
            } else {
                conn.in_ctl_queue = false;
                continue;
            };
            let flags = if op == Op::Shutdown {
                conn.local_shutdown.to_flags()
            } else {
                0
            };
            let (buf_alloc, fwd_cnt) = conn.credit.stamp();
            let hdr =
                Header::control(key, conn.socket_type, op, flags).with_credit(buf_alloc, fwd_cnt);
            if op != Op::CreditUpdate {
                // Any packet carries fwd_cnt, so a pending update is now redundant unless
                // the peer asked for one explicitly.
                conn.pending.credit_update &= conn.credit.wants_update();
            }
            if conn.pending.any() {
                self.ctl_queue.push_back(key);
            } else {
                conn.in_ctl_queue = false;
            }
            return Some(hdr);
        }
        None
    }

    /// Whether [`Endpoint::poll_transmit`] would return something.
    pub fn has_transmit(&self) -> bool {
        !self.rst_queue.is_empty() || !self.ctl_queue.is_empty()
    }

    /// The earliest timer deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Timeout> {
        let mut fired = Vec::new();
        while let Some(&(t, key)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let Some(conn) = self.conns.get(&key) else {
                continue;
            };
            match conn.state {
                State::Connecting => {
                    self.stats.connect_timeouts += 1;
                    self.reset(key);
                    fired.push(Timeout::Connect(key));
                }
                State::Closing => {
                    self.stats.close_timeouts += 1;
                    self.reset(key);
                    fired.push(Timeout::Close(key));
                }
                State::Established => {}
            }
        }
        fired
    }

    fn insert(
        &mut self,
        key: ConnKey,
        socket_type: SocketType,
        state: State,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Result<(), ConnError> {
        if self.conns.contains_key(&key) {
            return Err(ConnError::InUse(key));
        }
        if self.conns.len() >= self.config.max_connections {
            return Err(ConnError::TableFull {
                max: self.config.max_connections,
            });
        }
        self.conns.insert(
            key,
            Connection {
                key,
                socket_type,
                state,
                credit: {
                    let mut c =
                        Credit::new(self.config.buf_alloc_bytes, peer_buf_alloc, peer_fwd_cnt);
                    if socket_type == SocketType::SeqPacket {
                        c.enable_packet_bound();
                    }
                    c
                },
                local_shutdown: Shutdown::default(),
                peer_shutdown: Shutdown::default(),
                pending: Pending::default(),
                in_ctl_queue: false,
                deadline: None,
            },
        );
        Ok(())
    }

    fn remove(&mut self, key: &ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(key)?;
        if let Some(d) = conn.deadline {
            self.timers.remove(&(d, *key));
        }
        // Stale ctl_queue entries are skipped by poll_transmit.
        Some(conn)
    }

    fn set_deadline(&mut self, key: ConnKey, deadline: Option<Instant>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(old) = conn.deadline.take() {
            self.timers.remove(&(old, key));
        }
        if let Some(d) = deadline {
            conn.deadline = Some(d);
            self.timers.insert((d, key));
        }
    }

    fn enqueue_ctl(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_ctl_queue {
                conn.in_ctl_queue = true;
                self.ctl_queue.push_back(key);
            }
        }
    }

    fn queue_rst_reply(&mut self, hdr: &Header) {
        if hdr.op() != Op::Rst {
            self.push_rst(hdr.rst_reply());
        }
    }

    fn push_rst(&mut self, hdr: Header) {
        if self.rst_queue.len() >= self.config.max_queued_rsts {
            self.stats.rst_queue_overflow += 1;
            return;
        }
        self.rst_queue.push_back(hdr);
    }

    fn ephemeral_port(&mut self, local_cid: Cid, peer: VsockAddr) -> Result<Port, ConnError> {
        // Bounded search: at most max_connections + 1 candidates can be in use.
        for _ in 0..=self.config.max_connections {
            let port = Port(self.next_port);
            self.next_port = match self.next_port.checked_add(1) {
                Some(p) if p < u32::MAX => p,
                _ => self.config.ephemeral_port_start,
            };
            let key = ConnKey {
                local: VsockAddr::new(local_cid, port),
                peer,
            };
            if !self.conns.contains_key(&key) {
                return Ok(port);
            }
        }
        Err(ConnError::NoPort)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(cid: u64, port: u32) -> VsockAddr {
        VsockAddr::new(Cid(cid), Port(port))
    }

    /// The peer's RESPONSE (window 4096) to our REQUEST on `key`.
    fn response_to(key: ConnKey) -> Header {
        Header::control(
            ConnKey {
                local: key.peer,
                peer: key.local,
            },
            SocketType::Stream,
            Op::Response,
            0,
        )
        .with_credit(4096, 0)
    }

    /// Fuzz finding `fuzz/regressions/endpoint/credit-request-while-connecting`: a credit
    /// request on a connection still waiting for its RESPONSE went out before the
    /// handshake finished.
    #[test]
    fn no_credit_request_while_connecting() {
        let mut ep = Endpoint::new(EndpointConfig::default());
        let now = Instant::now();
        let key = ep
            .connect(now, Cid::HOST, None, addr(3, 5000), SocketType::Stream)
            .unwrap();
        ep.request_credit(&key);
        assert_eq!(ep.poll_transmit().map(|h| h.op()), Some(Op::Request));
        assert_eq!(ep.poll_transmit(), None);

        let response = response_to(key);
        assert_eq!(ep.handle(&response), Incoming::Connected(key));
        ep.request_credit(&key);
        assert_eq!(ep.poll_transmit().map(|h| h.op()), Some(Op::CreditRequest));
    }

    /// Fuzz finding `fuzz/regressions/endpoint/response-before-request-sent`: a RESPONSE
    /// that arrived before our REQUEST was sent established the connection, and the REQUEST
    /// then went out on an established connection.
    #[test]
    fn response_before_our_request_is_not_an_answer() {
        let mut ep = Endpoint::new(EndpointConfig::default());
        let now = Instant::now();
        let key = ep
            .connect(now, Cid::HOST, None, addr(3, 5000), SocketType::Stream)
            .unwrap();
        let response = response_to(key);
        assert_eq!(
            ep.handle(&response),
            Incoming::Dropped(DropReason::NoAction)
        );
        assert_eq!(ep.get(&key).unwrap().state(), State::Connecting);
        assert_eq!(ep.poll_transmit().map(|h| h.op()), Some(Op::Request));
        assert_eq!(ep.handle(&response), Incoming::Connected(key));
    }
}
