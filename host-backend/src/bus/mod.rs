//! The bus service: buses of every namespace, their members' queues and the fan-out.
//!
//! [`BusHub`] holds the buses, each a [`domsock_proto::bus::fanout::Bus`] (who receives
//! what, grants, sequence numbers, queue accounting) plus, per member, its **sink**: where
//! its messages go and the frames waiting for it. A publish is fanned out in the thread
//! that received it: for each receiver the MESSAGE head is written in front of the
//! publisher's payload as one seqpacket message (`sendmsg` of two parts, no heap copy);
//! only when the receiver's socket is full are the bytes copied into its queue, which the
//! fan-out never lets grow past the bus's `queue_bytes` (the message is dropped and
//! counted, or the member disconnected, as the bus says). A publisher never waits.
//!
//! Members today are host processes on a Unix `SOCK_SEQPACKET` socket per namespace
//! ([`unix`]); the socket file's permissions are who may reach that namespace's buses, as
//! for a file. Guest members (vsock seqpacket to port
//! [`BUS_PORT`](domsock_proto::bus::BUS_PORT)) are still to come: their sink will be the
//! guest's receive path instead of a socket.
//!
//! What it does not do: parse frames (that is [`domsock_proto::bus::wire`]) or decide who
//! receives a message (that is the [`Bus`]).

pub mod unix;

use domsock_proto::bus::fanout::{Bus, BusConfig, Grant, JoinError, Loss, Offer};
use domsock_proto::bus::wire::{
    encode_message_head, BusName, CreateParams, ErrorCode, Fields, Joined, MemberId, RefuseCode,
    ServiceFrame, Token,
};
use nix::sys::socket::{sendmsg, MsgFlags, UnixAddr};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tracing::{debug, info};

/// Answers (SUBSCRIBED, ERROR) that may wait in one member's queue before it is cut off.
pub const MAX_QUEUED_ANSWERS: usize = 256;

/// Locks `m`, taking the data of a poisoned lock (a panicked fan-out left nothing half
/// done that the next one would trip over: every step is a complete queue operation).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where one member's messages go.
#[derive(Debug)]
struct Sink {
    /// The member's connection; `None` while it is parked.
    sock: Option<Arc<OwnedFd>>,
    /// Whole frames waiting for the socket, oldest first.
    queue: VecDeque<Queued>,
    /// The socket was full at the last send: nothing is tried again until it is writable
    /// (one failed `sendmsg` per stall, not one per message published meanwhile).
    blocked: bool,
}

/// A frame waiting for a member's socket.
#[derive(Debug)]
struct Queued {
    bytes: Vec<u8>,
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
}

/// A bus is named by its namespace and its name.
type BusKey = (String, BusName);
/// One bus, shared by the threads that fan out to it.
type SharedBus = Arc<Mutex<BusState>>;

/// Every bus of this domsockd.
#[derive(Debug, Default)]
pub struct BusHub {
    buses: Mutex<HashMap<BusKey, SharedBus>>,
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

impl BusState {
    /// Delivers to `to` a frame made of `parts` (counted as `len` bytes by the bus),
    /// after any LOSS it is owed: straight to its socket when nothing waits before it,
    /// else into its queue.
    fn deliver(&mut self, to: MemberId, parts: &[&[u8]], len: usize, wants: &mut Wants) {
        let loss = self.bus.take_loss(to);
        let Some(sink) = self.sinks.get_mut(&to) else {
            return;
        };
        if let Some(Loss { messages, bytes }) = loss {
            sink.queue.push_back(Queued {
                bytes: frame(&ServiceFrame::Loss { messages, bytes }),
                counted: false,
            });
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
            bytes: parts.concat(),
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
            bytes,
            counted: false,
        });
        self.flush_member(id, wants);
    }

    /// Writes `id`'s queue until its socket is full.
    fn flush_member(&mut self, id: MemberId, wants: &mut Wants) {
        let Some(sink) = self.sinks.get_mut(&id) else {
            return;
        };
        let Some(sock) = sink.sock.clone() else {
            return;
        };
        if sink.blocked {
            return;
        }
        while let Some(front) = sink.queue.front() {
            match send_parts(&sock, &[&front.bytes]) {
                Ok(true) => {
                    if front.counted {
                        self.bus.sent(id, front.bytes.len());
                    }
                    sink.queue.pop_front();
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
        for &to in &receivers {
            match self.bus.offer(to, len) {
                Offer::Queue => self.deliver(to, &[&head, payload], len, wants),
                Offer::Dropped => {}
                Offer::Disconnect => {
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
        let bus = self.bus(namespace, name, create)?;
        let mut st = lock(&bus);
        let id = st
            .bus
            .join(grant, token)
            .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        st.sinks.insert(
            id,
            Sink {
                sock: Some(sock),
                queue: VecDeque::new(),
                blocked: false,
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
        let buses: Vec<Arc<Mutex<BusState>>> = lock(&self.buses)
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, b)| b.clone())
            .collect();
        for bus in buses {
            let mut st = lock(&bus);
            let (id, lost) = match st.bus.rejoin(token) {
                Ok(r) => r,
                Err(JoinError::UnknownToken) => continue,
                Err(e) => return Err(Refusal::new(e.code(), e.to_string())),
            };
            let grant = st.bus.grant(id).unwrap_or_default();
            let joined = joined_frame(&st, id, grant, *token, lost.messages);
            let sink = st.sinks.entry(id).or_insert(Sink {
                sock: None,
                queue: VecDeque::new(),
                blocked: false,
            });
            sink.sock = Some(sock);
            sink.blocked = false;
            // JOINED goes before everything that waited for the member.
            sink.queue.push_front(Queued {
                bytes: joined,
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
            F::Publish { fields, payload } => st.publish(m.id, &fields, payload, wants),
            F::Subscribe(p) | F::Unsubscribe(p) => {
                let sub = matches!(req, F::Subscribe(_));
                let r = if sub {
                    st.bus.subscribe(m.id, p)
                } else {
                    st.bus.unsubscribe(m.id, p)
                };
                Some(match r {
                    Ok(_) => frame_subscribed(sub, p),
                    Err(e) => frame(&ServiceFrame::Error {
                        code: e.code(),
                        text: &e.to_string(),
                    }),
                })
            }
            F::Leave => {
                st.bus.leave(m.id);
                st.sinks.remove(&m.id);
                None
            }
            F::Join { .. } | F::Rejoin(_) => Some(frame(&ServiceFrame::Error {
                code: ErrorCode::Malformed,
                text: "already a member on this connection",
            })),
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
