//! In-memory simulation of two [`Endpoint`]s, in the quinn-proto style: a "host" (CID 2) and
//! a "guest" (CID 3) exchange packets over two in-memory wires while simulated applications
//! write, read (at a controlled pace, reporting [`Endpoint::consumed`]) and close. Time is a
//! base `Instant` plus simulated `Duration`s; nothing sleeps.
//!
//! What it models:
//! - a packet is a validated [`Header`] plus its payload; payload may be real bytes or, for
//!   huge transfers, only a length (the header's `len` is always the truth);
//! - each connection's receive buffer holds what the endpoint has accounted as received but
//!   not consumed; after every step the harness checks that it matches
//!   `Credit::unconsumed()`, stays within our `buf_alloc`, and that no sender ever has more
//!   than the peer's `buf_alloc` in flight;
//! - optional chaos: packets of different connections are delayed and reordered relative to
//!   each other, while each connection's packets stay in order (vsock is in-order per
//!   connection); a link can be cut so packets are lost.
//!
//! What it does not model: header encoding (tests do that separately), virtqueue sizes.

// Shared by the integration tests of this crate; not every test uses every helper.
#![allow(dead_code)]

use domsock_proto::endpoint::EndpointStats;
use domsock_proto::{
    Cid, ConnError, ConnKey, DropReason, Endpoint, EndpointConfig, Header, Incoming, Op, Port,
    Shutdown, SocketType, Timeout, VsockAddr,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// The two sides of the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SideId {
    /// CID 2.
    Host,
    /// CID 3.
    Guest,
}

impl SideId {
    /// The other side.
    pub fn other(self) -> SideId {
        match self {
            SideId::Host => SideId::Guest,
            SideId::Guest => SideId::Host,
        }
    }

    /// Its CID.
    pub fn cid(self) -> Cid {
        match self {
            SideId::Host => Cid::HOST,
            SideId::Guest => Cid(3),
        }
    }

    fn idx(self) -> usize {
        match self {
            SideId::Host => 0,
            SideId::Guest => 1,
        }
    }
}

/// The same connection seen from the other end.
pub fn flip(key: ConnKey) -> ConnKey {
    ConnKey {
        local: key.peer,
        peer: key.local,
    }
}

pub use domsock_proto::test_utils::Rng;

/// `len` pseudo-random bytes determined by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ 0x5EED);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One packet on a wire.
#[derive(Debug, Clone)]
pub struct Packet {
    /// The header.
    pub hdr: Header,
    /// Payload bytes; empty for control packets and for length-only data.
    pub payload: Vec<u8>,
    /// Stream offset of the first payload byte, for data the harness sent (test metadata,
    /// not on the wire): the receiver checks it to prove in-order, loss-free delivery even
    /// when payload is modelled as a length only.
    pub offset: Option<u64>,
}

impl Packet {
    /// A packet with no harness metadata (for injected packets).
    pub fn new(hdr: Header, payload: Vec<u8>) -> Self {
        Self {
            hdr,
            payload,
            offset: None,
        }
    }
}

/// What a side does with a REQUEST to a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptPolicy {
    /// A listener accepts.
    Accept,
    /// No listener: answer RST.
    Refuse,
    /// Swallow the request and never answer.
    Ignore,
}

/// Something a side observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An [`Incoming`] other than `Data` and `Credit` (those are counted per [`Flow`]).
    Incoming(Incoming),
    /// A timer fired.
    Timeout(Timeout),
    /// A listener accepted a request.
    Accepted(ConnKey),
    /// `Endpoint::accept` failed; the harness refused the request.
    AcceptFailed(ConnError),
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The peer reset it (or refused our request).
    Reset,
    /// Our full close completed.
    Closed,
    /// Our request got no answer in time.
    ConnectTimeout,
    /// Our full close got no answer in time.
    CloseTimeout,
    /// We reset it (`Endpoint::reset`).
    LocalReset,
    /// We shut the last direction after the peer had shut both: the endpoint sent RST.
    LocalClose,
    /// The endpoint reset it because of a bad incoming packet.
    Violation(DropReason),
}

/// A packet as the receiving endpoint reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPacket {
    /// Payload length.
    pub len: u32,
    /// Seqpacket end of message.
    pub eom: bool,
    /// Seqpacket end of record.
    pub eor: bool,
}

/// A seqpacket message reassembled by the receiving application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its bytes (empty in length-only mode).
    pub data: Vec<u8>,
    /// Its length.
    pub len: usize,
    /// Whether its last packet carried EOR.
    pub eor: bool,
}

#[derive(Debug)]
struct Segment {
    data: Option<Vec<u8>>,
    len: usize,
    pos: usize,
    eom: bool,
    eor: bool,
}

#[derive(Debug)]
struct OutMsg {
    data: Option<Vec<u8>>,
    len: usize,
    pos: usize,
    eor: bool,
}

/// The applications at one end of one connection.
#[derive(Debug)]
pub struct Flow {
    /// The connection, from this side.
    pub key: ConnKey,
    /// Stream or seqpacket.
    pub socket_type: SocketType,
    /// The handshake completed.
    pub established: bool,
    /// How it ended, once it did.
    pub end: Option<End>,
    /// Directions the peer has shut, as last reported.
    pub peer_shutdown: Shutdown,

    /// Bytes one application read takes at most.
    pub read_size: usize,
    /// Reads per simulation step (0 pauses the reader).
    pub reads_per_step: usize,
    /// Seqpacket: consume nothing until a whole message has arrived, then all of it in one
    /// read (like a forwarder to a Unix `SOCK_SEQPACKET` socket); `read_size` is ignored.
    pub whole_messages: bool,
    rx: VecDeque<Segment>,
    /// Bytes received and not yet read (must equal `Credit::unconsumed`).
    pub unread: u64,
    /// Bytes received in total (read or not).
    pub rx_total: u64,
    /// Stream: bytes read, in order (real-payload packets only).
    pub received: Vec<u8>,
    /// Bytes read in total.
    pub read_total: u64,
    /// Seqpacket: messages reassembled so far.
    pub messages: Vec<Message>,
    partial: Vec<u8>,
    partial_len: usize,
    /// Application reads (each followed by `Endpoint::consumed`).
    pub reads: u64,
    /// Reads that ended exactly at an end of message.
    pub eom_reads: u64,
    /// Every data packet delivered to this side, in order.
    pub rx_packets: Vec<RxPacket>,
    /// `Incoming::Credit` events.
    pub credit_events: u64,

    tx: VecDeque<OutMsg>,
    /// Payload bytes handed to `send_rw`.
    pub sent_bytes: u64,
    /// Data packets sent.
    pub sent_packets: u64,
    /// Steps in which data waited with exactly zero credit and exactly the peer's
    /// `buf_alloc` in flight.
    pub zero_credit_stalls: u64,
    /// Times sending resumed after being blocked on credit.
    pub resumes: u64,
    /// Of those, resumes preceded by an `Incoming::Credit` while blocked.
    pub resumes_after_credit: u64,
    blocked: bool,
    credit_seen_while_blocked: bool,
    /// Largest in-flight byte count seen after a send.
    pub max_in_flight: u32,
}

impl Flow {
    fn new(key: ConnKey, socket_type: SocketType, read_size: usize, reads_per_step: usize) -> Self {
        Self {
            key,
            socket_type,
            established: false,
            end: None,
            peer_shutdown: Shutdown::default(),
            read_size,
            reads_per_step,
            whole_messages: false,
            rx: VecDeque::new(),
            unread: 0,
            rx_total: 0,
            received: Vec::new(),
            read_total: 0,
            messages: Vec::new(),
            partial: Vec::new(),
            partial_len: 0,
            reads: 0,
            eom_reads: 0,
            rx_packets: Vec::new(),
            credit_events: 0,
            tx: VecDeque::new(),
            sent_bytes: 0,
            sent_packets: 0,
            zero_credit_stalls: 0,
            resumes: 0,
            resumes_after_credit: 0,
            blocked: false,
            credit_seen_while_blocked: false,
            max_in_flight: 0,
        }
    }

    /// Bytes the application still wants to send.
    pub fn unsent(&self) -> u64 {
        self.tx.iter().map(|m| (m.len - m.pos) as u64).sum()
    }

    /// Whether the application still has messages queued (including zero-length ones).
    pub fn has_unsent(&self) -> bool {
        !self.tx.is_empty()
    }

    /// Whether the application would read now.
    pub fn can_read(&self) -> bool {
        if self.reads_per_step == 0 {
            return false;
        }
        if self.socket_type == SocketType::SeqPacket && self.whole_messages {
            return self.rx.iter().any(|s| s.eom);
        }
        !self.rx.is_empty()
    }

    fn end_if_gone(&mut self, ep: &Endpoint, end: End) {
        if self.end.is_none() && ep.get(&self.key).is_none() {
            self.end = Some(end);
        }
    }

    /// One application read: up to `read_size` bytes; a seqpacket read stops at the end of
    /// a message. Returns the bytes taken.
    fn read_once(&mut self) -> usize {
        let seq = self.socket_type == SocketType::SeqPacket;
        let limit = if seq && self.whole_messages {
            if !self.rx.iter().any(|s| s.eom) {
                return 0;
            }
            usize::MAX
        } else {
            self.read_size
        };
        let mut taken = 0;
        let mut eom = None;
        while taken < limit {
            let Some(seg) = self.rx.front_mut() else {
                break;
            };
            let n = (seg.len - seg.pos).min(limit - taken);
            if let Some(data) = &seg.data {
                let bytes = &data[seg.pos..seg.pos + n];
                if seq {
                    self.partial.extend_from_slice(bytes);
                } else {
                    self.received.extend_from_slice(bytes);
                }
            }
            self.partial_len += n;
            seg.pos += n;
            taken += n;
            if seg.pos < seg.len {
                break;
            }
            let seg = self.rx.pop_front().expect("front exists");
            if seq && seg.eom {
                eom = Some(seg.eor);
                break;
            }
        }
        self.reads += 1;
        self.unread -= taken as u64;
        self.read_total += taken as u64;
        if seq {
            if let Some(eor) = eom {
                self.eom_reads += 1;
                self.messages.push(Message {
                    data: std::mem::take(&mut self.partial),
                    len: self.partial_len,
                    eor,
                });
                self.partial_len = 0;
            }
        } else {
            self.partial_len = 0;
        }
        taken
    }
}

/// One endpoint and its applications.
#[derive(Debug)]
pub struct Side {
    /// Which side.
    pub id: SideId,
    /// The endpoint under test.
    pub ep: Endpoint,
    /// Applications per connection (ended ones stay until the key is reused).
    pub flows: HashMap<ConnKey, Flow>,
    /// Flows displaced by a reuse of their key.
    pub old_flows: Vec<Flow>,
    /// Everything observed, in order.
    pub events: Vec<Event>,
    /// Packets this side put on the wire, by operation.
    pub sent_ops: HashMap<Op, u64>,
    /// Policy per listening port; ports not listed refuse.
    pub listeners: HashMap<Port, AcceptPolicy>,
    /// `read_size` given to new flows.
    pub read_size: usize,
    /// `reads_per_step` given to new flows.
    pub reads_per_step: usize,
    /// Largest data packet this side sends.
    pub max_packet: u32,
    /// Close (shut both) as soon as the peer has shut both directions, like an application
    /// that closes on EOF.
    pub close_on_peer_close: bool,
}

impl Side {
    fn new(id: SideId, config: EndpointConfig) -> Self {
        Self {
            id,
            ep: Endpoint::new(config),
            flows: HashMap::new(),
            old_flows: Vec::new(),
            events: Vec::new(),
            sent_ops: HashMap::new(),
            listeners: HashMap::new(),
            read_size: usize::MAX,
            reads_per_step: 1,
            max_packet: 64 * 1024,
            close_on_peer_close: false,
        }
    }

    /// Starts listening on `port`.
    pub fn listen(&mut self, port: Port, policy: AcceptPolicy) {
        self.listeners.insert(port, policy);
    }

    /// Packets of kind `op` sent so far.
    pub fn sent(&self, op: Op) -> u64 {
        self.sent_ops.get(&op).copied().unwrap_or(0)
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> EndpointStats {
        self.ep.stats()
    }

    /// Events matching `pred`.
    pub fn count_events(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| pred(e)).count()
    }

    /// The flow of `key` (panics if unknown).
    pub fn flow(&self, key: &ConnKey) -> &Flow {
        self.flows
            .get(key)
            .unwrap_or_else(|| panic!("{:?} has no flow {key}", self.id))
    }

    fn add_flow(&mut self, key: ConnKey, socket_type: SocketType) -> &mut Flow {
        let flow = Flow::new(key, socket_type, self.read_size, self.reads_per_step);
        if let Some(old) = self.flows.insert(key, flow) {
            assert!(old.end.is_some(), "{:?}: live flow {key} replaced", self.id);
            self.old_flows.push(old);
        }
        self.flows.get_mut(&key).expect("just inserted")
    }

    fn count_sent(&mut self, op: Op) {
        *self.sent_ops.entry(op).or_default() += 1;
    }

    fn app_read(&mut self) {
        for flow in self.flows.values_mut() {
            if flow.end.is_some() {
                continue;
            }
            for _ in 0..flow.reads_per_step {
                if !flow.can_read() {
                    break;
                }
                let n = flow.read_once();
                self.ep
                    .consumed(&flow.key, u32::try_from(n).expect("read fits u32"));
            }
        }
    }

    fn app_send(&mut self, peer_buf_alloc: u32, out: &mut Vec<Packet>) {
        let mut keys: Vec<ConnKey> = self
            .flows
            .iter()
            .filter(|(_, f)| f.end.is_none() && f.has_unsent())
            .map(|(k, _)| *k)
            .collect();
        keys.sort();
        for key in keys {
            let flow = self.flows.get_mut(&key).expect("listed");
            while let Some(msg) = flow.tx.front_mut() {
                let Some(conn) = self.ep.get(&key) else {
                    break;
                };
                if !conn.can_send() {
                    break;
                }
                let remaining = msg.len - msg.pos;
                let credit = self.ep.send_credit(&key);
                if credit == 0 && remaining > 0 {
                    if conn.credit().in_flight() == peer_buf_alloc {
                        flow.zero_credit_stalls += 1;
                    }
                    if !flow.blocked {
                        flow.blocked = true;
                        flow.credit_seen_while_blocked = false;
                    }
                    break;
                }
                if flow.blocked {
                    flow.blocked = false;
                    flow.resumes += 1;
                    if flow.credit_seen_while_blocked {
                        flow.resumes_after_credit += 1;
                    }
                }
                let n = remaining.min(credit as usize).min(self.max_packet as usize);
                let last = msg.pos + n == msg.len;
                let hdr = self
                    .ep
                    .send_rw(&key, n as u32, last, last && msg.eor)
                    .unwrap_or_else(|e| panic!("send_rw within credit failed: {e}"));
                let payload = msg
                    .data
                    .as_ref()
                    .map(|d| d[msg.pos..msg.pos + n].to_vec())
                    .unwrap_or_default();
                out.push(Packet {
                    hdr,
                    payload,
                    offset: Some(flow.sent_bytes),
                });
                msg.pos += n;
                flow.sent_bytes += n as u64;
                flow.sent_packets += 1;
                let in_flight = self.ep.get(&key).expect("live").credit().in_flight();
                flow.max_in_flight = flow.max_in_flight.max(in_flight);
                *self.sent_ops.entry(Op::Rw).or_default() += 1;
                if last {
                    flow.tx.pop_front();
                }
            }
        }
    }

    fn drain(&mut self, out: &mut Vec<Packet>) {
        while let Some(hdr) = self.ep.poll_transmit() {
            self.count_sent(hdr.op());
            out.push(Packet::new(hdr, Vec::new()));
        }
    }

    fn receive(&mut self, now: Instant, pkt: Packet) {
        let hdr = pkt.hdr;
        assert_eq!(hdr.dst().cid, self.id.cid(), "misrouted packet {hdr:?}");
        let key = hdr.receiver_key();
        let incoming = self.ep.handle(&hdr);
        match incoming {
            Incoming::Request(req) => {
                self.events.push(Event::Incoming(incoming));
                let policy = self
                    .listeners
                    .get(&req.dst().port)
                    .copied()
                    .unwrap_or(AcceptPolicy::Refuse);
                match policy {
                    AcceptPolicy::Accept => match self.ep.accept(&req) {
                        Ok(k) => {
                            self.add_flow(k, req.socket_type()).established = true;
                            self.events.push(Event::Accepted(k));
                        }
                        Err(e) => {
                            self.events.push(Event::AcceptFailed(e));
                            self.ep.refuse(&req);
                        }
                    },
                    AcceptPolicy::Refuse => self.ep.refuse(&req),
                    AcceptPolicy::Ignore => {}
                }
            }
            Incoming::Connected(k) => {
                self.events.push(Event::Incoming(incoming));
                self.flows.get_mut(&k).expect("connecting flow").established = true;
            }
            Incoming::Data {
                key: k,
                len,
                eom,
                eor,
            } => {
                let flow = self.flows.get_mut(&k).expect("data for a known flow");
                if let Some(offset) = pkt.offset {
                    assert_eq!(offset, flow.rx_total, "{k}: out of order or lost data");
                }
                let data = if pkt.payload.len() == len as usize {
                    Some(pkt.payload)
                } else {
                    assert!(
                        pkt.payload.is_empty(),
                        "{k}: payload length differs from header"
                    );
                    None
                };
                flow.rx.push_back(Segment {
                    data,
                    len: len as usize,
                    pos: 0,
                    eom,
                    eor,
                });
                flow.rx_packets.push(RxPacket { len, eom, eor });
                flow.unread += u64::from(len);
                flow.rx_total += u64::from(len);
            }
            Incoming::PeerShutdown(k, how) => {
                self.events.push(Event::Incoming(incoming));
                let flow = self.flows.get_mut(&k).expect("known flow");
                flow.peer_shutdown = how;
                if how.is_both() && self.close_on_peer_close {
                    self.ep.shutdown(now, &k, Shutdown::BOTH);
                    flow.end_if_gone(&self.ep, End::LocalClose);
                }
            }
            Incoming::Credit(k) => {
                let flow = self.flows.get_mut(&k).expect("known flow");
                flow.credit_events += 1;
                if flow.blocked {
                    flow.credit_seen_while_blocked = true;
                }
            }
            Incoming::Reset(k) => {
                self.events.push(Event::Incoming(incoming));
                self.flows.get_mut(&k).expect("known flow").end = Some(End::Reset);
            }
            Incoming::Closed(k) => {
                self.events.push(Event::Incoming(incoming));
                self.flows.get_mut(&k).expect("known flow").end = Some(End::Closed);
            }
            Incoming::Dropped(reason) => {
                self.events.push(Event::Incoming(incoming));
                if let Some(flow) = self.flows.get_mut(&key) {
                    flow.end_if_gone(&self.ep, End::Violation(reason));
                }
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        for t in self.ep.handle_timeout(now) {
            self.events.push(Event::Timeout(t));
            let (key, end) = match t {
                Timeout::Connect(k) => (k, End::ConnectTimeout),
                Timeout::Close(k) => (k, End::CloseTimeout),
            };
            self.flows.get_mut(&key).expect("timed-out flow").end = Some(end);
        }
    }

    fn check(&self, peer_buf_alloc: u32) {
        let buf_alloc = self.ep.config().buf_alloc_bytes;
        for key in self.ep.keys() {
            let flow = self.flows.get(key);
            assert!(
                flow.is_some_and(|f| f.end.is_none()),
                "{:?}: endpoint has {key} but its flow ended or is missing",
                self.id
            );
        }
        for flow in self.flows.values() {
            let conn = self.ep.get(&flow.key);
            match (flow.end, conn) {
                (Some(end), Some(_)) => {
                    panic!(
                        "{:?}: flow {} ended ({end:?}) but is live",
                        self.id, flow.key
                    )
                }
                (None, None) => panic!("{:?}: flow {} vanished silently", self.id, flow.key),
                (Some(_), None) => {}
                (None, Some(conn)) => {
                    let credit = conn.credit();
                    assert_eq!(
                        u64::from(credit.unconsumed()),
                        flow.unread,
                        "{:?} {}: endpoint and application disagree on unread bytes",
                        self.id,
                        flow.key
                    );
                    assert!(
                        flow.unread <= u64::from(buf_alloc),
                        "receive buffer overrun"
                    );
                    assert!(
                        credit.in_flight() <= peer_buf_alloc,
                        "{:?} {}: {} bytes in flight > peer buf_alloc {peer_buf_alloc}",
                        self.id,
                        flow.key,
                        credit.in_flight()
                    );
                }
            }
        }
    }
}

#[derive(Debug)]
struct Chaos {
    rng: Rng,
    deliver_percent: u64,
}

/// Two endpoints, two wires, simulated time.
#[derive(Debug)]
pub struct Sim {
    base: Instant,
    elapsed: Duration,
    /// Simulated time per step.
    pub tick: Duration,
    sides: [Side; 2],
    /// Packets in flight, indexed by sender.
    wires: [VecDeque<Packet>; 2],
    link_up: [bool; 2],
    /// Packets lost on a cut link, indexed by sender.
    pub lost: [u64; 2],
    chaos: Option<Chaos>,
    /// Steps run so far.
    pub steps: u64,
}

impl Sim {
    /// A simulation with these endpoint configurations.
    pub fn new(host: EndpointConfig, guest: EndpointConfig) -> Self {
        Self {
            // The only clock read: every other instant is derived from this one.
            base: Instant::now(),
            elapsed: Duration::ZERO,
            tick: Duration::from_millis(1),
            sides: [
                Side::new(SideId::Host, host),
                Side::new(SideId::Guest, guest),
            ],
            wires: [VecDeque::new(), VecDeque::new()],
            link_up: [true, true],
            lost: [0, 0],
            chaos: None,
            steps: 0,
        }
    }

    /// Current simulated time.
    pub fn now(&self) -> Instant {
        self.base + self.elapsed
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// One side.
    pub fn side(&self, id: SideId) -> &Side {
        &self.sides[id.idx()]
    }

    /// One side, mutably.
    pub fn side_mut(&mut self, id: SideId) -> &mut Side {
        &mut self.sides[id.idx()]
    }

    /// The flow of `key` on side `id`.
    pub fn flow(&self, id: SideId, key: ConnKey) -> &Flow {
        self.side(id).flow(&key)
    }

    /// The flow of `key` on side `id`, mutably.
    pub fn flow_mut(&mut self, id: SideId, key: ConnKey) -> &mut Flow {
        self.side_mut(id)
            .flows
            .get_mut(&key)
            .unwrap_or_else(|| panic!("{id:?} has no flow {key}"))
    }

    /// Delay (each packet is delivered in a step with probability `deliver_percent`) and
    /// reorder packets across connections; per-connection order is kept.
    pub fn set_chaos(&mut self, seed: u64, deliver_percent: u64) {
        assert!(deliver_percent > 0);
        self.chaos = Some(Chaos {
            rng: Rng::new(seed),
            deliver_percent,
        });
    }

    /// Cuts (or restores) the link from `from`: packets it sends while cut are lost.
    pub fn set_link(&mut self, from: SideId, up: bool) {
        self.link_up[from.idx()] = up;
    }

    /// Packets in flight from `from`.
    pub fn in_flight(&self, from: SideId) -> usize {
        self.wires[from.idx()].len()
    }

    /// `Endpoint::connect` from side `id` to the other side's `peer_port`.
    pub fn connect(
        &mut self,
        id: SideId,
        local_port: Option<Port>,
        peer_port: Port,
        socket_type: SocketType,
    ) -> Result<ConnKey, ConnError> {
        let now = self.now();
        let peer = VsockAddr::new(id.other().cid(), peer_port);
        let side = self.side_mut(id);
        let key = side
            .ep
            .connect(now, id.cid(), local_port, peer, socket_type)?;
        side.add_flow(key, socket_type);
        Ok(key)
    }

    /// Connects and runs until the handshake completed; returns the key on both sides.
    pub fn connect_established(
        &mut self,
        id: SideId,
        peer_port: Port,
        socket_type: SocketType,
    ) -> (ConnKey, ConnKey) {
        self.side_mut(id.other())
            .listen(peer_port, AcceptPolicy::Accept);
        let key = self
            .connect(id, None, peer_port, socket_type)
            .expect("connect");
        self.run();
        assert!(self.flow(id, key).established, "{key} not established");
        assert!(self.flow(id.other(), flip(key)).established);
        (key, flip(key))
    }

    /// Queues an application message of real bytes.
    pub fn write(&mut self, id: SideId, key: ConnKey, data: Vec<u8>, eor: bool) {
        let len = data.len();
        self.flow_mut(id, key).tx.push_back(OutMsg {
            data: Some(data),
            len,
            pos: 0,
            eor,
        });
    }

    /// Queues an application message modelled as a length only.
    pub fn write_len(&mut self, id: SideId, key: ConnKey, len: usize) {
        self.flow_mut(id, key).tx.push_back(OutMsg {
            data: None,
            len,
            pos: 0,
            eor: false,
        });
    }

    /// `Endpoint::shutdown` on side `id`.
    pub fn shutdown(&mut self, id: SideId, key: ConnKey, how: Shutdown) {
        let now = self.now();
        let side = self.side_mut(id);
        side.ep.shutdown(now, &key, how);
        if let Some(flow) = side.flows.get_mut(&key) {
            flow.end_if_gone(&side.ep, End::LocalClose);
        }
    }

    /// `Endpoint::reset` on side `id`.
    pub fn reset(&mut self, id: SideId, key: ConnKey) {
        let side = self.side_mut(id);
        side.ep.reset(key);
        if let Some(flow) = side.flows.get_mut(&key) {
            flow.end_if_gone(&side.ep, End::LocalReset);
        }
    }

    /// Puts a hand-made packet on the wire as if `from` had sent it.
    pub fn inject(&mut self, from: SideId, hdr: Header, payload: Vec<u8>) {
        self.wires[from.idx()].push_back(Packet::new(hdr, payload));
    }

    fn transmit(&mut self, from: SideId, packets: Vec<Packet>) {
        let i = from.idx();
        if self.link_up[i] {
            self.wires[i].extend(packets);
        } else {
            self.lost[i] += packets.len() as u64;
        }
    }

    /// Takes the packets to deliver this step from `from`'s wire.
    fn take_batch(&mut self, from: SideId) -> Vec<Packet> {
        let wire = &mut self.wires[from.idx()];
        let Some(chaos) = &mut self.chaos else {
            return wire.drain(..).collect();
        };
        // Pick packets; a connection whose head is held back holds all its later packets.
        let mut held_flows = HashSet::new();
        let mut kept = VecDeque::new();
        let mut picked: Vec<VecDeque<Packet>> = Vec::new();
        let mut picked_idx: HashMap<(VsockAddr, VsockAddr), usize> = HashMap::new();
        for pkt in wire.drain(..) {
            let flow = (pkt.hdr.src(), pkt.hdr.dst());
            if held_flows.contains(&flow) || !chaos.rng.chance(chaos.deliver_percent) {
                held_flows.insert(flow);
                kept.push_back(pkt);
                continue;
            }
            let idx = *picked_idx.entry(flow).or_insert_with(|| {
                picked.push(VecDeque::new());
                picked.len() - 1
            });
            picked[idx].push_back(pkt);
        }
        *wire = kept;
        // Interleave connections randomly, keeping each one's order.
        let mut batch = Vec::new();
        while !picked.is_empty() {
            let i = chaos.rng.below(picked.len() as u64) as usize;
            batch.push(picked[i].pop_front().expect("non-empty"));
            if picked[i].is_empty() {
                picked.swap_remove(i);
            }
        }
        batch
    }

    /// One step: applications read and write, endpoints emit control packets, in-flight
    /// packets are delivered, time advances by `tick`, timers fire, invariants are checked.
    pub fn step(&mut self) {
        for id in [SideId::Host, SideId::Guest] {
            let peer_buf_alloc = self.side(id.other()).ep.config().buf_alloc_bytes;
            let mut out = Vec::new();
            let side = self.side_mut(id);
            side.app_read();
            side.app_send(peer_buf_alloc, &mut out);
            side.drain(&mut out);
            self.transmit(id, out);
        }
        let now = self.now();
        for from in [SideId::Host, SideId::Guest] {
            let batch = self.take_batch(from);
            let to = self.side_mut(from.other());
            for pkt in batch {
                to.receive(now, pkt);
            }
        }
        self.elapsed += self.tick;
        self.fire_timers();
        self.steps += 1;
        self.check();
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        for side in &mut self.sides {
            side.fire_timers(now);
        }
    }

    /// Checks the harness invariants (also done after every step).
    pub fn check(&self) {
        for id in [SideId::Host, SideId::Guest] {
            let peer_buf_alloc = self.side(id.other()).ep.config().buf_alloc_bytes;
            self.side(id).check(peer_buf_alloc);
        }
    }

    /// Whether another step could change anything (ignoring timers).
    pub fn is_idle(&self) -> bool {
        if self.wires.iter().any(|w| !w.is_empty()) {
            return false;
        }
        self.sides.iter().all(|side| {
            !side.ep.has_transmit()
                && side.flows.values().all(|f| {
                    f.end.is_some()
                        || (!f.can_read() && (!f.has_unsent() || side.ep.send_credit(&f.key) == 0))
                })
        })
    }

    /// Steps until idle; panics after a generous bound (a livelock).
    pub fn run(&mut self) -> u64 {
        self.run_bounded(10_000_000)
    }

    /// Steps until idle or `max_steps`, panicking if the bound is hit.
    pub fn run_bounded(&mut self, max_steps: u64) -> u64 {
        let start = self.steps;
        while !self.is_idle() {
            assert!(
                self.steps - start < max_steps,
                "not idle after {max_steps} steps"
            );
            self.step();
        }
        self.steps - start
    }

    /// Advances simulated time by `d` (no packets move) and fires due timers.
    pub fn advance(&mut self, d: Duration) {
        self.elapsed += d;
        self.fire_timers();
        self.check();
    }

    /// Jumps to the earliest timer deadline of either endpoint and fires it.
    pub fn advance_to_next_timeout(&mut self) -> Option<Instant> {
        let next = self
            .sides
            .iter()
            .filter_map(|s| s.ep.poll_timeout())
            .min()?;
        self.elapsed = self.elapsed.max(next - self.base);
        self.fire_timers();
        self.check();
        Some(next)
    }
}
