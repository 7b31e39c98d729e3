//! Fuzz body of the connection state machine: an arbitrary sequence of peer packets, local
//! calls and time steps against one [`Endpoint`], checked against a small model after
//! every step.

use super::input::{FwdCnt, Window};
use crate::addr::{Cid, ConnKey, Port, VsockAddr};
use crate::endpoint::{ConnError, DropReason, Endpoint, EndpointConfig, Incoming, State, Timeout};
use crate::packet::{Header, Op, Shutdown, SocketType, SEQ_EOM, SEQ_EOR};
use crate::test_utils::RawFields;
use arbitrary::{Arbitrary, Unstructured};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const LOCAL: Cid = Cid::HOST;
const PEER: Cid = Cid(3);
/// Largest payload the data plane lets through `Header::parse`.
const MAX_PAYLOAD: u32 = 64 * 1024;
/// Bounds on the model's key list and on queued requests.
const MAX_KEYS: usize = 16;
const MAX_PENDING_REQUESTS: usize = 8;
/// More control packets than this from one drain means `poll_transmit` does not end.
const MAX_POLLS: usize = 10_000;

/// A byte count, mostly relative to what the model says is allowed right now.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Amount {
    Zero,
    One,
    Small(u8),
    /// Exactly what is allowed.
    Allowed,
    /// One to 256 bytes more than allowed.
    Over(u8),
    /// Something below what is allowed.
    Fraction(u8),
    Raw(u32),
}

impl Amount {
    fn resolve(self, allowed: u32) -> u32 {
        match self {
            Amount::Zero => 0,
            Amount::One => 1,
            Amount::Small(n) => u32::from(n),
            Amount::Allowed => allowed,
            Amount::Over(n) => allowed.saturating_add(1 + u32::from(n)),
            Amount::Fraction(n) => (u64::from(allowed) * u64::from(n) / 256) as u32,
            Amount::Raw(n) => n,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Event {
    /// A packet from the peer; `op` and `type_` are raw wire values (invalid ones are
    /// dropped by `Header::parse`, as in the data plane).
    Packet {
        key: u8,
        op: u8,
        type_: u8,
        len: Amount,
        flags: u8,
        buf_alloc: Window,
        fwd_cnt: FwdCnt,
    },
    Connect {
        key: u8,
        seqpacket: bool,
        ephemeral: bool,
    },
    Accept(u8),
    Refuse(u8),
    Send {
        key: u8,
        len: Amount,
        eom: bool,
        eor: bool,
    },
    Consume {
        key: u8,
        n: Amount,
    },
    Shutdown {
        key: u8,
        how: u8,
    },
    Reset(u8),
    RequestCredit(u8),
    Advance(u16),
    Poll(u8),
    Clear,
}

#[derive(Debug, Arbitrary)]
struct Input {
    buf_alloc: Window,
    max_connections: u8,
    max_queued_rsts: u8,
    events: Vec<Event>,
}

/// What the model knows about one live connection.
#[derive(Debug, Clone)]
struct Model {
    socket_type: SocketType,
    state: State,
    /// Delivered to us (`Incoming::Data`) and not yet consumed.
    buffered: u32,
    /// Payload bytes we sent (wrapping).
    tx: u32,
    /// The peer's last advertised window and consumed count.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    local_shutdown: Shutdown,
    peer_shutdown: Shutdown,
    deadline: Option<Instant>,
    /// Our REQUEST went out (only a RESPONSE after that answers it).
    request_sent: bool,
    /// Seqpacket: `tx` after each non-empty packet the peer had not consumed all of when
    /// it last spoke (the packet bound of `crate::credit`).
    packet_ends: Vec<u32>,
    /// Seqpacket: a message was begun and not ended (its rest goes on bytes alone).
    message_open: bool,
}

impl Model {
    fn new(socket_type: SocketType, state: State, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Self {
        Self {
            socket_type,
            state,
            buffered: 0,
            tx: 0,
            peer_buf_alloc,
            peer_fwd_cnt,
            local_shutdown: Shutdown::default(),
            peer_shutdown: Shutdown::default(),
            deadline: None,
            request_sent: false,
            packet_ends: Vec::new(),
            message_open: false,
        }
    }

    /// Credit the peer gave us: never more than the window it advertised, and nothing
    /// for a new seqpacket message while the peer holds its buffer over 1024 packets (at
    /// least 4) unconsumed.
    fn peer_credit(&self) -> u32 {
        let most_packets = (self.peer_buf_alloc / 1024).max(4) as usize;
        if self.socket_type == SocketType::SeqPacket
            && !self.message_open
            && self.packet_ends.len() >= most_packets
        {
            return 0;
        }
        self.peer_buf_alloc
            .saturating_sub(self.tx.wrapping_sub(self.peer_fwd_cnt))
    }

    /// The peer spoke: packets it consumed all of are gone.
    fn peer_consumed(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
        let in_flight = self.tx.wrapping_sub(fwd_cnt);
        let tx = self.tx;
        self.packet_ends
            .retain(|&end| tx.wrapping_sub(end) < in_flight);
    }

    fn can_send(&self) -> bool {
        self.state == State::Established && !self.local_shutdown.send && !self.peer_shutdown.rcv
    }
}

struct Harness {
    ep: Endpoint,
    config: EndpointConfig,
    now: Instant,
    keys: Vec<ConnKey>,
    live: HashMap<ConnKey, Model>,
    pending: Vec<Header>,
}

/// Connection state machine.
///
/// Invariants checked after every event, against a model that mirrors the protocol rules
/// of `endpoint`'s primer:
/// - every `handle` result is the one the rules predict, and the endpoint holds exactly the
///   connections the model holds, in the same state, with the same shutdown flags;
/// - credit: `send_rw` succeeds exactly when the state allows sending and the length is
///   within the peer's credit; the credit we use is never "negative": after sending, bytes
///   in flight never exceed the window the peer last advertised, and `send_credit` never
///   exceeds it;
/// - no data after RST or close: once a connection was reset, refused, closed or timed
///   out, `send_rw` fails and nothing but RSTs is emitted for it until the key is opened
///   anew; no data is delivered after the peer shut its send side or we shut our receive
///   side; `poll_transmit` never emits `RW`;
/// - buffering: bytes delivered and not consumed never exceed the `buf_alloc` we advertise,
///   and every header we emit advertises exactly that `buf_alloc` with our current
///   `fwd_cnt` (RSTs carry zero credit fields);
/// - timers: a timeout fires only for a connection whose deadline passed, none is missed,
///   and `poll_timeout` is never in the past after `handle_timeout`;
/// - every emitted header survives `Header::parse`, and `poll_transmit` runs dry.
pub fn endpoint(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let config = EndpointConfig {
        buf_alloc_bytes: input.buf_alloc.resolve(),
        max_connections: usize::from(input.max_connections % 8) + 1,
        max_queued_rsts: usize::from(input.max_queued_rsts % 16),
        connect_timeout: Duration::from_millis(2000),
        close_timeout: Duration::from_millis(8000),
        ephemeral_port_start: u32::MAX - 8,
        hash_seed: 0,
    };
    let mut keys = Vec::new();
    for local in [1000, 1001, u32::MAX - 8] {
        for peer in [5000, 5001] {
            keys.push(ConnKey {
                local: VsockAddr::new(LOCAL, Port(local)),
                peer: VsockAddr::new(PEER, Port(peer)),
            });
        }
    }
    let mut h = Harness {
        ep: Endpoint::new(config.clone()),
        config,
        // The protocol code never reads the clock; this is only the origin of simulated
        // time, and `Instant` has no other constructor.
        now: Instant::now(),
        keys,
        live: HashMap::new(),
        pending: Vec::new(),
    };
    for event in input.events {
        h.step(event);
        h.check_all();
    }
    h.drain();
    h.check_all();
}

impl Harness {
    fn key(&self, i: u8) -> ConnKey {
        self.keys[usize::from(i) % self.keys.len()]
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Packet {
                key,
                op,
                type_,
                len,
                flags,
                buf_alloc,
                fwd_cnt,
            } => self.packet(self.key(key), op, type_, len, flags, buf_alloc, fwd_cnt),
            Event::Connect {
                key,
                seqpacket,
                ephemeral,
            } => self.connect(self.key(key), seqpacket, ephemeral),
            Event::Accept(i) => self.accept(i),
            Event::Refuse(i) => {
                if !self.pending.is_empty() {
                    let req = self.pending.remove(usize::from(i) % self.pending.len());
                    if !self.live.contains_key(&req.receiver_key()) {
                        self.ep.refuse(&req);
                    }
                }
            }
            Event::Send { key, len, eom, eor } => self.send(self.key(key), len, eom, eor),
            Event::Consume { key, n } => {
                let key = self.key(key);
                let buffered = self.live.get(&key).map_or(0, |m| m.buffered);
                // Consuming more than was delivered is a caller bug the endpoint asserts on.
                let n = n.resolve(buffered).min(buffered);
                self.ep.consumed(&key, n);
                if let Some(m) = self.live.get_mut(&key) {
                    m.buffered -= n;
                }
            }
            Event::Shutdown { key, how } => self.shutdown(self.key(key), how),
            Event::Reset(key) => {
                let key = self.key(key);
                self.ep.reset(key);
                self.live.remove(&key);
            }
            Event::RequestCredit(key) => self.ep.request_credit(&self.key(key)),
            Event::Advance(ms) => self.advance(ms),
            Event::Poll(n) => {
                for _ in 0..n {
                    match self.ep.poll_transmit() {
                        Some(hdr) => self.check_emitted(&hdr),
                        None => break,
                    }
                }
            }
            Event::Clear => {
                self.ep.clear();
                self.live.clear();
                self.pending.clear();
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn packet(
        &mut self,
        key: ConnKey,
        op: u8,
        type_: u8,
        len: Amount,
        flags: u8,
        buf_alloc: Window,
        fwd_cnt: FwdCnt,
    ) {
        let model = self.live.get(&key);
        let free = model.map_or(self.config.buf_alloc_bytes, |m| {
            self.config.buf_alloc_bytes - m.buffered
        });
        let raw_op = u16::from(op % 9);
        let raw = RawFields {
            src_cid: key.peer.cid.0,
            dst_cid: key.local.cid.0,
            src_port: key.peer.port.0,
            dst_port: key.local.port.0,
            len: if raw_op == Op::Rw.to_wire() {
                len.resolve(free)
            } else {
                0
            },
            type_: u16::from(type_ % 4),
            op: raw_op,
            flags: u32::from(flags),
            buf_alloc: buf_alloc.resolve(),
            fwd_cnt: fwd_cnt.resolve(model.map_or(0, |m| m.tx)),
        }
        .to_raw();
        let Ok(hdr) = Header::parse(&raw, MAX_PAYLOAD) else {
            return;
        };
        let expected = self.predict(&hdr);
        let got = self.ep.handle(&hdr);
        assert_eq!(got, expected, "handling {hdr:?}");
        if let Incoming::Request(req) = got {
            if self.pending.len() < MAX_PENDING_REQUESTS {
                self.pending.push(req);
            }
        }
    }

    /// The protocol rules, applied to the model; returns what `handle` must say.
    fn predict(&mut self, hdr: &Header) -> Incoming {
        let key = hdr.receiver_key();
        let Some(m) = self.live.get_mut(&key) else {
            return match hdr.op() {
                Op::Request if self.ep.len() >= self.config.max_connections => {
                    Incoming::Dropped(DropReason::NoAction)
                }
                Op::Request => Incoming::Request(*hdr),
                _ => Incoming::Dropped(DropReason::UnknownConnection),
            };
        };
        if hdr.socket_type() != m.socket_type {
            self.live.remove(&key);
            return Incoming::Dropped(DropReason::TypeMismatch);
        }
        m.peer_consumed(hdr.buf_alloc(), hdr.fwd_cnt());
        let violation = Incoming::Dropped(DropReason::ProtocolViolation);
        let result = match (m.state, hdr.op()) {
            (State::Closing, Op::Rst) => Incoming::Closed(key),
            (_, Op::Rst) => Incoming::Reset(key),
            (State::Connecting, Op::Response) if !m.request_sent => {
                return Incoming::Dropped(DropReason::NoAction);
            }
            (State::Connecting, Op::Response) => {
                m.state = State::Established;
                m.deadline = None;
                return Incoming::Connected(key);
            }
            (State::Established, Op::Rw) => {
                let free = self.config.buf_alloc_bytes - m.buffered;
                if m.peer_shutdown.send {
                    violation
                } else if hdr.len() > free {
                    Incoming::Dropped(DropReason::CreditViolation(
                        crate::credit::CreditViolation {
                            len: hdr.len(),
                            free,
                        },
                    ))
                } else if m.local_shutdown.rcv {
                    return Incoming::Dropped(DropReason::ReceiveShut);
                } else {
                    m.buffered += hdr.len();
                    let seq = m.socket_type == SocketType::SeqPacket;
                    return Incoming::Data {
                        key,
                        len: hdr.len(),
                        eom: seq && hdr.flags() & SEQ_EOM != 0,
                        eor: seq && hdr.flags() & SEQ_EOR != 0,
                    };
                }
            }
            (State::Established | State::Closing, Op::Shutdown) => {
                let before = m.peer_shutdown;
                m.peer_shutdown = before.union(Shutdown::from_flags(hdr.flags()));
                if m.state == State::Closing && m.peer_shutdown.is_both() {
                    Incoming::Closed(key)
                } else if m.peer_shutdown == before {
                    return Incoming::Dropped(DropReason::NoAction);
                } else {
                    return Incoming::PeerShutdown(key, m.peer_shutdown);
                }
            }
            (State::Established | State::Closing, Op::CreditUpdate | Op::CreditRequest) => {
                return Incoming::Credit(key);
            }
            (State::Closing, Op::Rw) => return Incoming::Dropped(DropReason::ReceiveShut),
            _ => violation,
        };
        // Every path that falls through here ends the connection.
        self.live.remove(&key);
        result
    }

    fn connect(&mut self, key: ConnKey, seqpacket: bool, ephemeral: bool) {
        let socket_type = if seqpacket {
            SocketType::SeqPacket
        } else {
            SocketType::Stream
        };
        let local_port = (!ephemeral).then_some(key.local.port);
        let full = self.ep.len() >= self.config.max_connections;
        match self
            .ep
            .connect(self.now, LOCAL, local_port, key.peer, socket_type)
        {
            Ok(new) => {
                assert!(!full, "connect beyond max_connections");
                assert!(!self.live.contains_key(&new), "connect reused live {new}");
                if !ephemeral {
                    assert_eq!(new, key);
                }
                let mut m = Model::new(socket_type, State::Connecting, 0, 0);
                m.deadline = Some(self.now + self.config.connect_timeout);
                self.live.insert(new, m);
                if !self.keys.contains(&new) && self.keys.len() < MAX_KEYS {
                    self.keys.push(new);
                }
            }
            Err(ConnError::TableFull { .. }) => assert!(full),
            Err(ConnError::InUse(k)) => {
                assert!(!ephemeral && k == key && self.live.contains_key(&key));
            }
            Err(ConnError::NoPort) => assert!(ephemeral),
            Err(e) => panic!("connect: unexpected {e}"),
        }
    }

    fn accept(&mut self, i: u8) {
        if self.pending.is_empty() {
            return;
        }
        let req = self.pending.remove(usize::from(i) % self.pending.len());
        let key = req.receiver_key();
        let live = self.live.contains_key(&key);
        let full = self.ep.len() >= self.config.max_connections;
        match self.ep.accept(&req) {
            Ok(k) => {
                assert!(
                    k == key && !live && !full,
                    "accepted {k}: live {live}, full {full}"
                );
                self.live.insert(
                    key,
                    Model::new(
                        req.socket_type(),
                        State::Established,
                        req.buf_alloc(),
                        req.fwd_cnt(),
                    ),
                );
            }
            Err(ConnError::InUse(k)) => assert!(k == key && live),
            Err(ConnError::TableFull { .. }) => assert!(full && !live),
            Err(e) => panic!("accept: unexpected {e}"),
        }
    }

    fn send(&mut self, key: ConnKey, len: Amount, eom: bool, eor: bool) {
        let model = self.live.get(&key).cloned();
        let credit = model.as_ref().map_or(0, Model::peer_credit);
        let len = len.resolve(credit);
        let allowed = model.as_ref().is_some_and(|m| m.can_send()) && len <= credit;
        match self.ep.send_rw(&key, len, eom, eor) {
            Ok(hdr) => {
                assert!(allowed, "send_rw({key}, {len}) allowed; model {model:?}");
                let m = self.live.get_mut(&key).expect("allowed implies live");
                m.tx = m.tx.wrapping_add(len);
                if m.socket_type == SocketType::SeqPacket {
                    if len > 0 {
                        m.packet_ends.push(m.tx);
                    }
                    m.message_open = !eom;
                }
                let in_flight = m.tx.wrapping_sub(m.peer_fwd_cnt);
                if len > 0 {
                    assert!(
                        in_flight <= m.peer_buf_alloc,
                        "credit went negative: {in_flight} in flight, window {}",
                        m.peer_buf_alloc
                    );
                }
                assert_eq!((hdr.op(), hdr.len()), (Op::Rw, len));
                assert_eq!((hdr.src(), hdr.dst()), (key.local, key.peer));
                let seq = m.socket_type == SocketType::SeqPacket;
                let want_flags = if seq {
                    (if eom { SEQ_EOM } else { 0 }) | (if eor { SEQ_EOR } else { 0 })
                } else {
                    0
                };
                assert_eq!(hdr.flags(), want_flags);
                self.check_stamp(&hdr);
            }
            Err(ConnError::NotFound(k)) => assert!(k == key && model.is_none()),
            Err(ConnError::CannotSend { .. }) => {
                assert!(
                    model.is_some() && !allowed,
                    "send_rw refused; model {model:?}"
                )
            }
            Err(e) => panic!("send_rw: unexpected {e}"),
        }
    }

    fn shutdown(&mut self, key: ConnKey, how: u8) {
        let how = Shutdown::from_flags(u32::from(how));
        self.ep.shutdown(self.now, &key, how);
        let Some(m) = self.live.get_mut(&key) else {
            return;
        };
        if m.state == State::Connecting {
            self.live.remove(&key);
            return;
        }
        let after = m.local_shutdown.union(how);
        if after == m.local_shutdown {
            return;
        }
        m.local_shutdown = after;
        if after.is_both() && m.peer_shutdown.is_both() {
            self.live.remove(&key);
        } else if after.is_both() {
            m.state = State::Closing;
            m.deadline = Some(self.now + self.config.close_timeout);
        }
    }

    fn advance(&mut self, ms: u16) {
        self.now += Duration::from_millis(u64::from(ms));
        let now = self.now;
        let fired = self.ep.handle_timeout(now);
        for t in &fired {
            let (key, state) = match *t {
                Timeout::Connect(k) => (k, State::Connecting),
                Timeout::Close(k) => (k, State::Closing),
            };
            let m = self
                .live
                .remove(&key)
                .unwrap_or_else(|| panic!("{t:?} for a connection the model does not have"));
            assert_eq!(m.state, state, "{t:?}");
            assert!(
                m.deadline.is_some_and(|d| d <= now),
                "{t:?} before its deadline"
            );
        }
        for (key, m) in &self.live {
            assert!(
                m.deadline.is_none_or(|d| d > now),
                "missed timer of {key} ({:?})",
                m.state
            );
        }
        assert!(self.ep.poll_timeout().is_none_or(|t| t > now));
    }

    fn drain(&mut self) {
        for _ in 0..MAX_POLLS {
            match self.ep.poll_transmit() {
                Some(hdr) => self.check_emitted(&hdr),
                None => {
                    assert!(!self.ep.has_transmit());
                    return;
                }
            }
        }
        panic!("poll_transmit still has packets after {MAX_POLLS}");
    }

    /// A header from `poll_transmit`.
    fn check_emitted(&mut self, hdr: &Header) {
        assert_eq!(Header::parse(&hdr.to_raw(), 0), Ok(*hdr), "emitted header");
        assert_ne!(hdr.op(), Op::Rw, "poll_transmit emitted data");
        let key = ConnKey {
            local: hdr.src(),
            peer: hdr.dst(),
        };
        if hdr.op() == Op::Rst {
            assert_eq!((hdr.buf_alloc(), hdr.fwd_cnt(), hdr.flags()), (0, 0, 0));
            return;
        }
        let m = self
            .live
            .get_mut(&key)
            .unwrap_or_else(|| panic!("{:?} emitted for {key}, which is gone", hdr.op()));
        assert_eq!(hdr.socket_type(), m.socket_type);
        match hdr.op() {
            Op::Request => {
                assert_eq!(m.state, State::Connecting);
                m.request_sent = true;
            }
            Op::Shutdown => assert_eq!(hdr.flags(), m.local_shutdown.to_flags()),
            _ => assert_ne!(
                m.state,
                State::Connecting,
                "{:?} while connecting",
                hdr.op()
            ),
        }
        self.check_stamp(hdr);
    }

    /// Credit fields of a non-RST header we emit.
    fn check_stamp(&self, hdr: &Header) {
        let key = ConnKey {
            local: hdr.src(),
            peer: hdr.dst(),
        };
        let conn = self
            .ep
            .get(&key)
            .expect("stamped header of a live connection");
        assert_eq!(hdr.buf_alloc(), self.config.buf_alloc_bytes);
        assert_eq!(hdr.fwd_cnt(), conn.credit().fwd_cnt());
    }

    fn check_all(&self) {
        assert_eq!(self.ep.len(), self.live.len(), "connection count");
        assert!(self.ep.len() <= self.config.max_connections);
        for key in self.ep.keys() {
            assert!(
                self.live.contains_key(key),
                "endpoint kept {key}, the model did not"
            );
        }
        for key in &self.keys {
            if !self.live.contains_key(key) {
                assert_eq!(self.ep.send_credit(key), 0, "credit on gone {key}");
            }
        }
        for (key, m) in &self.live {
            let conn = self.ep.get(key).expect("model connection is live");
            assert_eq!(conn.state(), m.state, "{key}");
            assert_eq!(conn.socket_type(), m.socket_type);
            assert_eq!(conn.local_shutdown(), m.local_shutdown);
            assert_eq!(conn.peer_shutdown(), m.peer_shutdown);
            let credit = conn.credit();
            assert_eq!(credit.unconsumed(), m.buffered, "{key}: buffered bytes");
            assert!(
                credit.unconsumed() <= self.config.buf_alloc_bytes,
                "{key}: {} bytes buffered, {} advertised",
                credit.unconsumed(),
                self.config.buf_alloc_bytes
            );
            assert_eq!(credit.buf_alloc(), self.config.buf_alloc_bytes);
            assert_eq!(credit.in_flight(), m.tx.wrapping_sub(m.peer_fwd_cnt));
            assert_eq!(credit.peer_credit(), m.peer_credit());
            let send_credit = self.ep.send_credit(key);
            assert!(
                send_credit <= m.peer_buf_alloc,
                "credit above the peer's window"
            );
            assert_eq!(send_credit, if m.can_send() { m.peer_credit() } else { 0 });
        }
    }
}
