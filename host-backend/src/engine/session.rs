//! The session service: guest connections to the session port
//! ([`SESSION_PORT`]) that outlive their vsock transport. Protocol and wire format in
//! [`domsock_migration::session`].
//!
//! A connection to the session port starts in its **greeting**: its host end is a
//! placeholder (one end of a Unix socket pair that never has data) until the guest's
//! first frame arrives.
//! - `OPEN` connects the named host target (the same table and policy as a direct
//!   connection to that port), swaps the real socket in, and answers `OPENED` through
//!   the connection's inbox (the bytes the guest gets before any host data).
//! - `RESUME` checks the proof against the session of *this* VM's data plane (another
//!   domain's sessions are not even visible here), moves the parked host end onto the new
//!   connection and answers `RESUMED` followed by the replay tail.
//! - Anything else is answered `REFUSED` and the connection ends.
//!
//! A **live** session differs from a raw connection in three places only: bytes read from
//! the host socket are also recorded in its bounded replay buffer (acknowledged by the
//! guest's `fwd_cnt`, which every guest packet carries); guest bytes accepted are
//! counted; and bytes of an earlier connection still in the outbox shrink the advertised
//! buffer until they reach the host, so the guest's replay window always covers what is
//! missing.
//!
//! When the device stops, live sessions are **parked** instead of closed: the host socket
//! stays open and registered, the outbox keeps flushing to it, and host data is read into
//! the replay buffer until it is full (then the host writer blocks: nothing is dropped).
//! A parked session waits for its guest for the VM's park timeout; then its host end is
//! closed (the host process reads EOF), it is counted as expired, and its id is
//! remembered so that a late RESUME is told why.
//!
//! A guest listener registered with `LISTEN` makes host-initiated connections to its port
//! sessions too: once the guest accepts, the daemon sends OFFERED ahead of the host's
//! bytes. The registration lives while its session-port connection does, and survives a
//! device stop for the park timeout so the guest can register again.
//!
//! A session to a **sibling guest** (OPEN naming its CID) is carried by a socket pair:
//! our end is the session's host end, the other is handed to the sibling's engine
//! ([`ProxyDial`]), which opens an ordinary connection to its guest that appears to come
//! from us. The sibling's guest sees an ordinary connection, and only a pause (credit
//! stops) while we are parked; unless it accepts on a session listener: then its end is a
//! session too (OFFERED), and the router records the two sessions as one sibling pair
//! (their relays join them again when both guests run on one other host).
//!
//! [`DataPlane::swap_session_host`] gives a live or parked session a new host end, with
//! host bytes that were in flight put in front (the sibling pair join uses it).
//!
//! Parked sessions outlive the frontend connection too (the engine is the VM's, not the
//! device's): a guest's source QEMU quits after a live migration. A parked session can
//! also leave this engine whole ([`DataPlane::export_parked`]: a
//! [`SessionSnapshot`] and its host end) and join the engine of the same domain on the
//! host its guest moved to ([`DataPlane::import_parked`]), where the guest's RESUME finds
//! it.
//!
//! What it does not do: seqpacket sessions to siblings (refused as unsupported), or carry
//! a host end across hosts (the tunnel does; an imported session's host end is whatever
//! socket the importer is given).

use super::conn::{HostConn, Interest, Readiness};
use super::connect::{Refusal as TargetRefusal, TargetRequest};
use super::poller::Target;
use super::DataPlane;
use crate::host::HostSocket;
use crate::metrics::VmStats;
use crate::router::SiblingRefusal;
use crate::tunables::{
    MAX_PENDING_SESSION_GREETINGS, MAX_SESSIONS_PER_VM, MAX_SESSION_LISTENERS_PER_VM,
    RELAY_MAX_TAIL_BYTES, SESSION_GREETING_TIMEOUT_MS, SESSION_REPLAY_BYTES, SESSION_TOMBSTONES,
};
use crate::vm::ProxyDial;
use domsock_migration::session::proof::ResumeClaim;
use domsock_migration::session::replay::ReplayBuffer;
use domsock_migration::session::snapshot::SessionSnapshot;
use domsock_migration::session::wire::{Closed, Frame, Refusal, MAX_FRAME_LEN};
use domsock_migration::session::{CounterExtender, Nonce, Secret, SessionId, Tag};
use domsock_proto::{Cid, ConnKey, Header, Port, SocketType};
use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use vm_memory::{GuestAddressSpace, VolatileSlice};
use vmm_sys_util::epoll::EventSet;

/// A session-port connection's session side.
#[derive(Debug)]
pub(crate) enum SessionState {
    /// Waiting for the guest's first frame; `peer` keeps the placeholder socket from
    /// reading EOF (dropped once the connection is refused, so it ends after the answer).
    Greeting { buf: Vec<u8>, peer: Option<OwnedFd> },
    /// Keeps the registration of a session listener (`LISTEN`) alive; carries no data.
    Listening { port: Port, _peer: OwnedFd },
    /// A session to a sibling guest whose connection that guest has not accepted yet;
    /// the greeting (OPENED) goes out once it has.
    Dialing {
        link: SessionLink,
        greeting: Vec<u8>,
    },
    /// Carrying a session.
    Live(SessionLink),
}

/// A guest port whose listener takes sessions.
#[derive(Debug)]
struct Registration {
    /// The session-port connection that keeps it; `None` after a device stop, until the
    /// guest registers again.
    keepalive: Option<ConnKey>,
    /// When an orphaned registration is forgotten (set by the timer pass).
    deadline: Option<Instant>,
}

/// What a session keeps across its connections.
#[derive(Debug)]
pub(crate) struct SessionLink {
    id: SessionId,
    secret: Secret,
    /// The nonce the next RESUME must prove.
    nonce: Nonce,
    /// The nonce before the last resume, accepted until the guest has read the RESUMED
    /// that replaced it (it may never have arrived).
    prev_nonce: Option<Nonce>,
    /// The domain and port the session reaches (for policy rechecks).
    target: (Cid, Port),
    /// Host->guest bytes not yet acknowledged by the guest (and, while parked, read but
    /// not yet sent).
    to_guest: ReplayBuffer,
    /// The guest's `fwd_cnt` on the current connection, as a session offset.
    acked: CounterExtender,
    /// Handshake bytes sent on the current connection, before any data.
    greeting_len: u32,
    /// Guest bytes accepted over the session's life.
    received: u64,
    /// Outbox bytes accepted on an earlier connection, still waiting for the host.
    carried: usize,
    /// The guest half-closed (a SHUTDOWN with only the send bit): a later reset or close
    /// of its connection ends the session instead of parking it.
    guest_done: bool,
    /// Seqpacket sessions count messages: where each message recorded in `to_guest` ends,
    /// and how many messages before `to_guest.start()` the guest has consumed.
    messages: Option<MessageLog>,
    /// A credit update was asked of the guest because the replay buffer is full; cleared
    /// when its acknowledgement moves.
    ack_requested: bool,
    /// The guest accepted this session from the sibling `target` names (a sibling pair's
    /// acceptor half): the policy to recheck is target -> this guest.
    accepted: bool,
}

/// Message boundaries of a seqpacket session's replay buffer, and its replay queue.
#[derive(Debug, Default)]
struct MessageLog {
    ends: VecDeque<u64>,
    acked: u64,
    /// Messages to send again (after a resume) before reading the host socket.
    replay: VecDeque<Vec<u8>>,
}

/// A session whose guest transport is gone.
#[derive(Debug)]
pub(super) struct Parked {
    hc: HostConn,
    /// Set by the first timer pass after parking (the engine never reads the clock).
    deadline: Option<Instant>,
}

/// Every session of one VM that is not on a live connection, and the counts that bound
/// them.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    parked: HashMap<SessionId, Parked>,
    expired: VecDeque<SessionId>,
    listeners: HashMap<Port, Registration>,
    live: usize,
    scratch: Vec<u8>,
    /// Session-port connections in their greeting, oldest first, with their deadlines
    /// (set by the first timer pass after they connected).
    greetings: VecDeque<(ConnKey, Option<Instant>)>,
}

impl Sessions {
    /// Parked sessions.
    pub(super) fn parked(&self) -> usize {
        self.parked.len()
    }

    /// The earliest deadline of a parked session or an orphaned registration.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.parked
            .values()
            .filter_map(|p| p.deadline)
            .chain(self.listeners.values().filter_map(|r| r.deadline))
            .chain(self.greetings.front().and_then(|g| g.1))
            .min()
    }

    /// The device stopped: live sessions were parked, the rest (greetings too) are being
    /// closed.
    pub(super) fn forget_live(&mut self) {
        self.live = 0;
        self.greetings.clear();
    }

    /// Sessions on a live connection.
    pub(super) fn live(&self) -> usize {
        self.live
    }

    /// Guest ports registered as session listeners.
    pub(super) fn listeners(&self) -> usize {
        self.listeners.len()
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS random source failing is not something a daemon can carry on from safely.
    getrandom::fill(&mut b).expect("OS randomness");
    b
}

fn link_of(hc: &mut HostConn) -> Option<&mut SessionLink> {
    match hc.session.as_deref_mut() {
        Some(SessionState::Live(link)) => Some(link),
        _ => None,
    }
}

impl SessionLink {
    /// Brings the replay buffer up to what the guest's `fwd_cnt` says it consumed (whole
    /// messages only, on a seqpacket session).
    fn ack(&mut self, guest_fwd_cnt: u32) {
        let before = self.acked.offset();
        let now = self.acked.advance(guest_fwd_cnt);
        if now != before {
            self.ack_requested = false;
        }
        if now != before || guest_fwd_cnt >= self.greeting_len {
            // The guest has read our greeting (OPENED/RESUMED): the old nonce is void.
            self.prev_nonce = None;
        }
        match &mut self.messages {
            None => self.to_guest.ack(now),
            Some(log) => {
                while log.ends.front().is_some_and(|&e| e <= now) {
                    let end = log.ends.pop_front().expect("checked");
                    log.acked += 1;
                    self.to_guest.ack(end);
                }
            }
        }
    }

    /// The guest has received `claimed` (bytes, or messages on seqpacket): the session
    /// offset it stands for, if the replay buffer still holds everything after it.
    fn resume_offset(&self, claimed: u64) -> Option<u64> {
        match &self.messages {
            None => (claimed >= self.to_guest.start() && claimed <= self.to_guest.end())
                .then_some(claimed),
            Some(log) => {
                let since = claimed.checked_sub(log.acked)?;
                match since {
                    0 => Some(self.to_guest.start()),
                    n => log.ends.get(n as usize - 1).copied(),
                }
            }
        }
    }
}

impl HostConn {
    /// For a live session: bytes that may be read from the host now (the replay buffer's
    /// room); `usize::MAX` for any other connection.
    pub(super) fn session_room(&self) -> usize {
        match self.session.as_deref() {
            // A session that arrived with a larger tail (host bytes that were in flight in
            // a relay) reads nothing new until it is back within the usual bound, so
            // tails do not grow from move to move.
            Some(SessionState::Live(link)) => link
                .to_guest
                .room()
                .min(SESSION_REPLAY_BYTES.saturating_sub(link.to_guest.len())),
            _ => usize::MAX,
        }
    }

    /// For a live session: its replay buffer's bound; `usize::MAX` otherwise.
    pub(super) fn session_capacity(&self) -> usize {
        match self.session.as_deref() {
            Some(SessionState::Live(link)) => link.to_guest.capacity(),
            _ => usize::MAX,
        }
    }

    /// Whether a live session has nothing left to carry either way: the guest shut its
    /// write side and all it sent reached the host, and the host's EOF and everything
    /// before it reached the guest. Only then does a guest reset end it.
    pub(super) fn session_finished(&self) -> bool {
        let Some(SessionState::Live(link)) = self.session.as_deref() else {
            return true;
        };
        self.applied.send
            && self.outbox_empty()
            && self.host_eof()
            && self.inbox_pending() == 0
            && link.messages.as_ref().is_none_or(|m| m.replay.is_empty())
            && link.to_guest.is_empty()
    }

    /// A live session's replay buffer is too full to read the host: the connection
    /// waits for the guest's acknowledgement (it is not served again until that moves),
    /// and the result says whether to ask the guest for a credit update now (once per
    /// acknowledgement; `false` for any other connection).
    pub(super) fn session_needs_ack(&mut self) -> bool {
        match link_of(self) {
            Some(link) if !link.ack_requested && !link.to_guest.is_empty() => {
                link.ack_requested = true;
                true
            }
            _ => false,
        }
    }

    /// Whether a live session has nothing to send but host data its replay buffer has no
    /// room for: serving it again before the guest acknowledges more would find the same.
    pub(super) fn session_waits_ack(&self) -> bool {
        match self.session.as_deref() {
            Some(SessionState::Live(link)) => {
                link.ack_requested
                    && self.inbox_pending() == 0
                    && link.messages.as_ref().is_none_or(|m| m.replay.is_empty())
            }
            _ => false,
        }
    }

    /// Records that the guest half-closed its session gracefully.
    pub(super) fn mark_guest_done(&mut self) {
        if let Some(link) = link_of(self) {
            link.guest_done = true;
        }
    }

    /// Whether the guest half-closed its session before (see [`SessionLink::guest_done`]).
    pub(super) fn guest_done(&self) -> bool {
        matches!(self.session.as_deref(), Some(SessionState::Live(l)) if l.guest_done)
    }

    /// Whether this session-port connection still waits for the guest's first frame
    /// (not yet answered).
    pub(super) fn awaits_greeting(&self) -> bool {
        matches!(
            self.session.as_deref(),
            Some(SessionState::Greeting { peer: Some(_), .. })
        )
    }

    /// Whether this session was accepted from a sibling (see [`SessionLink::accepted`]).
    pub(super) fn accepted(&self) -> bool {
        matches!(self.session.as_deref(), Some(SessionState::Live(l)) if l.accepted)
    }

    /// Whether this connection carries a live session.
    pub(super) fn is_session(&self) -> bool {
        matches!(self.session.as_deref(), Some(SessionState::Live(_)))
    }

    /// Whether this connection is a session-port connection that carries no data: still
    /// in its greeting, refused, or keeping a listener registration.
    pub(super) fn in_greeting(&self) -> bool {
        matches!(
            self.session.as_deref(),
            Some(SessionState::Greeting { .. } | SessionState::Listening { .. })
        )
    }

    /// The domain and port a session reaches.
    pub(super) fn session_target(&self) -> Option<(Cid, Port)> {
        match self.session.as_deref() {
            Some(SessionState::Live(link) | SessionState::Dialing { link, .. }) => {
                Some(link.target)
            }
            _ => None,
        }
    }

    /// Whether this session waits for a sibling to accept its connection.
    pub(super) fn dialing(&self) -> bool {
        matches!(self.session.as_deref(), Some(SessionState::Dialing { .. }))
    }

    /// Records the first `n` host bytes just put in the guest's RX buffers, copied
    /// straight from guest memory into the replay ring: `visit` hands each buffer slice,
    /// in order, to the copier it is given. A guest that rewrites its own buffers in
    /// between only garbles its own replay.
    pub(super) fn record_sent<'m>(
        &mut self,
        n: usize,
        visit: impl FnOnce(&mut dyn FnMut(VolatileSlice<'m, ()>)),
    ) {
        let Some(link) = link_of(self) else {
            return;
        };
        let recorded = link.to_guest.record_with(n, |a, b| {
            let dst: [&mut [u8]; 2] = [a, b];
            let (mut d, mut at, mut left) = (0usize, 0usize, n);
            let mut copy = |s: VolatileSlice<'m, ()>| {
                let mut off = 0usize;
                while off < s.len() && left > 0 {
                    while d < 2 && at == dst[d].len() {
                        d += 1;
                        at = 0;
                    }
                    if d == 2 {
                        return;
                    }
                    let take = (s.len() - off).min(dst[d].len() - at).min(left);
                    if let Ok(piece) = s.subslice(off, take) {
                        piece.copy_to(&mut dst[d][at..at + take]);
                    }
                    off += take;
                    at += take;
                    left -= take;
                }
            };
            visit(&mut copy);
        });
        debug_assert_eq!(recorded, n, "reads are bounded by session_room");
    }

    /// Counts `n` guest bytes accepted (a message, when `eom` ends one on seqpacket).
    pub(super) fn note_received(&mut self, n: usize, eom: bool) {
        if let Some(link) = link_of(self) {
            if link.messages.is_some() {
                link.received += u64::from(eom);
            } else {
                link.received += n as u64;
            }
        }
    }

    /// Whether a seqpacket session still has messages to send again.
    pub(super) fn has_session_replay(&self) -> bool {
        match self.session.as_deref() {
            Some(SessionState::Live(link)) => {
                link.messages.as_ref().is_some_and(|m| !m.replay.is_empty())
            }
            _ => false,
        }
    }

    /// A seqpacket session's next message to send again after a resume.
    pub(super) fn session_replay_message(&mut self) -> Option<Vec<u8>> {
        link_of(self)?.messages.as_mut()?.replay.pop_front()
    }

    /// Records the message just read from the host into the inbox (seqpacket sessions).
    pub(super) fn record_inbox_message(&mut self) {
        let Some(SessionState::Live(link)) = self.session.as_deref_mut() else {
            return;
        };
        let n = link.to_guest.record(&self.inbox);
        debug_assert_eq!(n, self.inbox.len(), "reads are bounded by session_room");
        if let Some(log) = &mut link.messages {
            log.ends.push_back(link.to_guest.end());
        }
    }

    /// Of `n` outbox bytes just written to the host, how many belonged to the current
    /// connection (the rest were carried over from an earlier one); `None` unless some
    /// carried bytes went, in which case the second value is what is still carried.
    pub(super) fn split_flushed(&mut self, n: usize) -> (usize, Option<usize>) {
        match link_of(self) {
            Some(link) if link.carried > 0 => {
                let old = n.min(link.carried);
                link.carried -= old;
                (n - old, Some(link.carried))
            }
            _ => (n, None),
        }
    }

    /// Acknowledges the replay buffer from the guest's latest `fwd_cnt`.
    pub(super) fn session_ack(&mut self, guest_fwd_cnt: u32) {
        if let Some(link) = link_of(self) {
            link.ack(guest_fwd_cnt);
        }
    }
}

impl DataPlane {
    /// A guest connects to the session port: accept it with a placeholder host end and
    /// wait for its first frame.
    pub(super) fn session_connect(&mut self, req: &Header) {
        // Entries of connections that left their greeting go first; what remains bounds
        // the connections a guest can hold open without saying anything.
        while let Some(&(old, _)) = self.sessions.greetings.front() {
            if self.conns.get(&old).is_some_and(|hc| hc.awaits_greeting()) {
                break;
            }
            self.sessions.greetings.pop_front();
        }
        if self.sessions.greetings.len() >= MAX_PENDING_SESSION_GREETINGS {
            debug!("too many session-port connections in their greeting");
            self.endpoint.refuse(req);
            return;
        }
        let (placeholder, peer) = match HostSocket::pair(req.socket_type()) {
            Ok(p) => p,
            Err(e) => {
                warn!(vm = %self.shared.name, error = %e, "session placeholder");
                self.endpoint.refuse(req);
                return;
            }
        };
        let key = match self.endpoint.accept(req) {
            Ok(k) => k,
            Err(e) => {
                debug!(error = %e, "cannot accept");
                self.endpoint.refuse(req);
                return;
            }
        };
        let token = match self
            .poller
            .register(placeholder.raw_fd(), Target::Conn(key))
        {
            Ok(t) => t,
            Err(e) => {
                warn!(vm = %self.shared.name, error = %e, "epoll registration failed");
                self.endpoint.reset(key);
                return;
            }
        };
        let mut hc = HostConn::new(
            placeholder,
            token,
            key,
            req.socket_type(),
            super::conn::Origin::Guest,
        );
        hc.readiness = Readiness::Drained;
        hc.session = Some(Box::new(SessionState::Greeting {
            buf: Vec::new(),
            peer: Some(peer),
        }));
        self.conns.insert(key, hc);
        self.sessions.greetings.push_back((key, None));
        // Its deadline is set by the next timer pass.
        let _ = self.shared.wake.write(1);
        self.after_change(key);
    }

    /// Resets session-port connections whose first frame is overdue.
    fn greeting_timers(&mut self, now: Instant) {
        let timeout = Duration::from_millis(SESSION_GREETING_TIMEOUT_MS);
        for g in self.sessions.greetings.iter_mut().rev() {
            if g.1.is_some() {
                break;
            }
            g.1 = Some(now + timeout);
        }
        while let Some(&(key, Some(deadline))) = self.sessions.greetings.front() {
            if deadline > now {
                break;
            }
            self.sessions.greetings.pop_front();
            if self.conns.get(&key).is_some_and(|hc| hc.awaits_greeting()) {
                VmStats::inc(&self.shared.stats.session_greeting_timeouts);
                debug!(%key, "session greeting timed out");
                self.endpoint.reset(key);
                self.close_host(key);
            }
        }
    }

    /// Greeting bytes from the guest (already accepted and consumed by the caller).
    pub(super) fn session_greeting(&mut self, key: ConnKey, bytes: &[u8]) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(SessionState::Greeting { buf, peer: Some(_) }) = hc.session.as_deref_mut() else {
            // Already refused: the guest keeps talking; its bytes go nowhere.
            return;
        };
        buf.extend_from_slice(bytes);
        match Frame::decode(buf) {
            Ok(None) if buf.len() < MAX_FRAME_LEN => {}
            Ok(Some((frame, used))) if used == buf.len() => self.session_frame(key, frame),
            Ok(_) => {
                debug!(%key, "session greeting followed by data before the answer");
                self.refuse_session(key, Refusal::Malformed, 0);
            }
            Err(e) => {
                debug!(%key, error = %e, "malformed session greeting");
                self.refuse_session(key, Refusal::Malformed, 0);
            }
        }
    }

    fn session_frame(&mut self, key: ConnKey, frame: Frame) {
        match frame {
            Frame::Open {
                cid,
                port,
                socket_type,
            } => self.open_session(key, cid, port, socket_type),
            Frame::Resume {
                id,
                client_nonce,
                received,
                closed,
                proof,
            } => self.resume_session(
                key,
                ResumeClaim {
                    id,
                    server_nonce: Nonce([0; 16]), // filled in from the session
                    client_nonce,
                    received,
                    closed,
                },
                proof,
            ),
            Frame::Listen { port, socket_type } => self.register_listener(key, port, socket_type),
            _ => self.refuse_session(key, Refusal::Malformed, 0),
        }
    }

    fn register_listener(&mut self, key: ConnKey, port: Port, socket_type: SocketType) {
        if socket_type != SocketType::Stream {
            self.refuse_session(key, Refusal::Unsupported, 0);
            return;
        }
        if !self.sessions.listeners.contains_key(&port)
            && self.sessions.listeners.len() >= MAX_SESSION_LISTENERS_PER_VM
        {
            self.refuse_session(key, Refusal::TooMany, 0);
            return;
        }
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(SessionState::Greeting { peer, .. }) = hc.session.as_deref_mut() else {
            return;
        };
        let Some(peer) = peer.take() else {
            return;
        };
        hc.session = Some(Box::new(SessionState::Listening { port, _peer: peer }));
        hc.inbox = Frame::Listening { port }.encode();
        hc.inbox_off = 0;
        // A newer registration of the same port replaces an older one; the older
        // connection then keeps nothing.
        self.sessions.listeners.insert(
            port,
            Registration {
                keepalive: Some(key),
                deadline: None,
            },
        );
        hc.span
            .in_scope(|| debug!(port = port.0, "session listener registered"));
        self.after_change(key);
    }

    /// A host-initiated connection (or one dialed for a sibling's session) was accepted
    /// by the guest: if its port is a session listener, the connection becomes a session,
    /// announced by OFFERED ahead of any host bytes (which are recorded for replay like
    /// all others). One dialed for a sibling's session makes the two a sibling pair.
    pub(super) fn offer_session(&mut self, key: ConnKey) {
        if !self.sessions.listeners.contains_key(&key.peer.port)
            || self.sessions.live + self.sessions.parked.len() >= MAX_SESSIONS_PER_VM
        {
            return;
        }
        let (proxied, dialer) = match self.conns.get(&key) {
            Some(hc) => (hc.origin == super::conn::Origin::Proxy, hc.dialed_for),
            None => return,
        };
        let target = if proxied { key.local.cid } else { Cid::HOST };
        let (mut link, greeting) = self.new_link((target, key.peer.port), true);
        link.accepted = proxied;
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        if hc.socket_type != SocketType::Stream || hc.session.is_some() {
            return;
        }
        if let Some(dialer) = dialer {
            self.router.note_pair(crate::router::SiblingPair {
                dialer,
                acceptor: link.id,
                port: key.peer.port,
            });
        }
        let early = hc.inbox.split_off(hc.inbox_off);
        // Handshake leftovers are a few hundred bytes at most: they always fit.
        let kept = link.to_guest.record(&early);
        debug_assert_eq!(kept, early.len());
        let mut inbox = greeting;
        inbox.extend_from_slice(&early[..kept]);
        hc.inbox = inbox;
        hc.inbox_off = 0;
        let id = link.id;
        hc.session = Some(Box::new(SessionState::Live(link)));
        hc.span
            .in_scope(|| debug!(session = %id, "session offered"));
        self.sessions.live += 1;
        VmStats::inc(&self.shared.stats.sessions_opened);
    }

    /// A fresh session reaching `target`, and its greeting (OPENED, or OFFERED for one the
    /// guest accepted).
    fn new_link(&self, target: (Cid, Port), offered: bool) -> (SessionLink, Vec<u8>) {
        let id = SessionId(random());
        let secret = Secret(random());
        let nonce = Nonce(random());
        let park_timeout_ms = self
            .shared
            .park_timeout_ms
            .load(Ordering::Relaxed)
            .min(u64::from(u32::MAX)) as u32;
        let window = self.endpoint.config().buf_alloc_bytes;
        let greeting = if offered {
            Frame::Offered {
                id,
                secret: secret.clone(),
                next_nonce: nonce,
                window,
                park_timeout_ms,
            }
        } else {
            Frame::Opened {
                id,
                secret: secret.clone(),
                next_nonce: nonce,
                window,
                park_timeout_ms,
            }
        }
        .encode();
        let greeting_len = greeting.len() as u32;
        let link = SessionLink {
            id,
            secret,
            nonce,
            prev_nonce: None,
            target,
            to_guest: ReplayBuffer::new(SESSION_REPLAY_BYTES),
            acked: CounterExtender::new(0, greeting_len),
            greeting_len,
            received: 0,
            carried: 0,
            guest_done: false,
            messages: None,
            ack_requested: false,
            accepted: false,
        };
        (link, greeting)
    }

    fn open_session(&mut self, key: ConnKey, cid: Cid, port: Port, socket_type: SocketType) {
        let conn_type = self.conns.get(&key).map(|hc| hc.socket_type);
        if conn_type != Some(socket_type) {
            // A seqpacket session is opened over a seqpacket connection, and so on.
            self.refuse_session(key, Refusal::Malformed, 0);
            return;
        }
        if cid != Cid::HOST && socket_type != SocketType::Stream {
            self.refuse_session(key, Refusal::Unsupported, 0);
            return;
        }
        if self.sessions.live + self.sessions.parked.len() >= MAX_SESSIONS_PER_VM {
            self.refuse_session(key, Refusal::TooMany, 0);
            return;
        }
        if cid != Cid::HOST {
            self.open_sibling_session(key, cid, port, socket_type);
            return;
        }
        let req = TargetRequest {
            port,
            socket_type,
            src_port: key.peer.port,
        };
        let (mut sock, preamble) = match self.open_host_target(&req) {
            Ok(found) => found,
            Err(TargetRefusal::Denied(why)) => {
                self.shared.note_denied("host", port, socket_type, why);
                self.refuse_session(key, Refusal::TargetRefused, libc::EACCES as u32);
                return;
            }
            Err(TargetRefusal::Failed(e)) => {
                VmStats::inc(&self.shared.stats.refused_connections);
                let errno = e.raw_os_error().unwrap_or(libc::ECONNREFUSED) as u32;
                self.refuse_session(key, Refusal::TargetRefused, errno);
                return;
            }
        };
        if let Some(line) = preamble {
            if !matches!(sock.write(line.as_bytes()), Ok(n) if n == line.len()) {
                VmStats::inc(&self.shared.stats.host_errors);
                self.refuse_session(key, Refusal::TargetRefused, libc::EPIPE as u32);
                return;
            }
        }
        let hc = self.conns.get_mut(&key).expect("caller checked");
        let token = match self.poller.register(sock.raw_fd(), Target::Conn(key)) {
            Ok(t) => t,
            Err(e) => {
                warn!(vm = %self.shared.name, error = %e, "epoll registration failed");
                self.endpoint.reset(key);
                self.after_change(key);
                return;
            }
        };
        self.poller.unregister(hc.sock.raw_fd(), hc.token);
        hc.sock = sock;
        hc.token = token;
        hc.interest = Interest::Read;
        hc.readiness = Readiness::Ready;
        let (mut link, greeting) = self.new_link((Cid::HOST, port), false);
        if socket_type == SocketType::SeqPacket {
            link.messages = Some(MessageLog::default());
        }
        let id = link.id;
        let hc = self.conns.get_mut(&key).expect("caller checked");
        hc.inbox = greeting;
        hc.inbox_off = 0;
        hc.session = Some(Box::new(SessionState::Live(link)));
        hc.span
            .in_scope(|| debug!(session = %id, target = port.0, "session opened"));
        self.sessions.live += 1;
        VmStats::inc(&self.shared.stats.sessions_opened);
        VmStats::inc(&self.shared.stats.accepted_connections);
        self.after_change(key);
    }

    /// A session to sibling `cid`: ask its engine to dial its guest over a socket pair
    /// whose other end becomes this session's host end; OPENED follows when the sibling
    /// accepts ([`DataPlane::dial_progress`]).
    fn open_sibling_session(&mut self, key: ConnKey, cid: Cid, port: Port, ty: SocketType) {
        let target = match self.router.check_guest(&self.shared, cid, port, ty) {
            Ok(t) => t,
            Err(why) => {
                let errno = match why {
                    SiblingRefusal::Denied => libc::EACCES,
                    SiblingRefusal::Unreachable => libc::EHOSTUNREACH,
                    SiblingRefusal::Away => libc::ECONNREFUSED,
                };
                self.refuse_session(key, Refusal::TargetRefused, errno as u32);
                return;
            }
        };
        let pair = UnixStream::pair().and_then(|(ours, theirs)| {
            ours.set_nonblocking(true)?;
            theirs.set_nonblocking(true)?;
            Ok((HostSocket::from_stream(ours)?, theirs))
        });
        let (ours, theirs) = match pair {
            Ok(p) => p,
            Err(e) => {
                warn!(vm = %self.shared.name, error = %e, "sibling session socket pair");
                self.refuse_session(key, Refusal::TooMany, 0);
                return;
            }
        };
        let token = match self.poller.register(ours.raw_fd(), Target::Conn(key)) {
            Ok(t) => t,
            Err(e) => {
                warn!(vm = %self.shared.name, error = %e, "epoll registration failed");
                self.refuse_session(key, Refusal::TooMany, 0);
                return;
            }
        };
        let (link, greeting) = self.new_link((cid, port), false);
        let dial = ProxyDial {
            from: self.shared.cid,
            port,
            sock: theirs,
            session: Some(link.id),
        };
        if target.request_dial(dial).is_err() {
            self.poller.unregister(ours.raw_fd(), token);
            self.refuse_session(key, Refusal::TooMany, 0);
            return;
        }
        let hc = self.conns.get_mut(&key).expect("caller checked");
        self.poller.unregister(hc.sock.raw_fd(), hc.token);
        hc.sock = ours;
        hc.token = token;
        hc.interest = Interest::Read;
        hc.readiness = Readiness::Drained;
        hc.span.in_scope(
            || debug!(session = %link.id, to = cid.0, port = port.0, "sibling session dialing"),
        );
        hc.session = Some(Box::new(SessionState::Dialing { link, greeting }));
        self.sessions.live += 1;
    }

    /// The sibling's engine answered a dial: one status byte (0: the sibling accepted),
    /// or EOF (refused, timed out, or its device went).
    pub(super) fn dial_progress(&mut self, key: ConnKey) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        let mut status = [0u8; 1];
        let accepted = match hc.sock.read(&mut status) {
            Ok(1) => status[0] == 0,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            _ => false,
        };
        let Some(SessionState::Dialing { link, greeting }) = hc.session.take().map(|b| *b) else {
            return;
        };
        self.sessions.live -= 1;
        if !accepted {
            hc.session = Some(Box::new(SessionState::Greeting {
                buf: Vec::new(),
                peer: None,
            }));
            self.refuse_session(key, Refusal::TargetRefused, libc::ECONNREFUSED as u32);
            return;
        }
        let id = link.id;
        hc.inbox = greeting;
        hc.inbox_off = 0;
        hc.readiness = Readiness::Ready;
        hc.session = Some(Box::new(SessionState::Live(link)));
        hc.span
            .in_scope(|| debug!(session = %id, "sibling session opened"));
        self.sessions.live += 1;
        VmStats::inc(&self.shared.stats.sessions_opened);
        VmStats::inc(&self.shared.stats.accepted_connections);
        self.after_change(key);
    }

    /// Dials this guest for siblings' sessions (queued on our [`VmShared`]).
    pub(super) fn start_proxy_dials(&mut self, now: Instant) {
        for dial in self.shared.take_dials() {
            // Dropping `dial.sock` without a status byte refuses it.
            if !self.guest_running {
                continue;
            }
            let peer = domsock_proto::VsockAddr::new(self.shared.cid, dial.port);
            let key = match self
                .endpoint
                .connect(now, dial.from, None, peer, SocketType::Stream)
            {
                Ok(k) => k,
                Err(e) => {
                    debug!(error = %e, "proxy dial refused");
                    continue;
                }
            };
            let Ok(sock) = HostSocket::from_stream(dial.sock) else {
                self.endpoint.reset(key);
                continue;
            };
            let token = match self.poller.register(sock.raw_fd(), Target::Conn(key)) {
                Ok(t) => t,
                Err(_) => {
                    self.endpoint.reset(key);
                    continue;
                }
            };
            let mut hc = HostConn::new(
                sock,
                token,
                key,
                SocketType::Stream,
                super::conn::Origin::Proxy,
            );
            hc.dialed_for = dial.session;
            hc.span
                .in_scope(|| debug!(from = dial.from.0, "sibling session dials this guest"));
            self.conns.insert(key, hc);
            self.proxied += 1;
        }
    }

    /// Where this VM's session `id` is: parked (`Some(None)`), or still live on another
    /// connection (`Some(Some(key))`: the guest saw its transport break before we did).
    /// Another domain's sessions are not in this data plane at all.
    fn locate_session(&self, id: SessionId) -> Option<Option<ConnKey>> {
        if self.sessions.parked.contains_key(&id) {
            return Some(None);
        }
        self.conns
            .iter()
            .find_map(|(k, hc)| match hc.session.as_deref() {
                Some(SessionState::Live(link)) if link.id == id => Some(Some(*k)),
                _ => None,
            })
    }

    fn resume_session(&mut self, key: ConnKey, mut claim: ResumeClaim, proof: Tag) {
        let id = claim.id;
        let Some(live) = self.locate_session(id) else {
            let reason = if self.sessions.expired.contains(&id) {
                Refusal::Expired
            } else {
                Refusal::UnknownSession
            };
            self.refuse_session(key, reason, 0);
            return;
        };
        // Everything is checked before the session is touched: a refused RESUME leaves a
        // live session's connection alone.
        let hc = match live {
            Some(old) => self.conns.get_mut(&old).expect("located"),
            None => &mut self.sessions.parked.get_mut(&id).expect("located").hc,
        };
        let Some(SessionState::Live(link)) = hc.session.as_deref_mut() else {
            unreachable!("located sessions are live");
        };
        let verifies = |nonce: Nonce, claim: &mut ResumeClaim| {
            claim.server_nonce = nonce;
            claim.verify(&link.secret, &proof)
        };
        let ok = verifies(link.nonce, &mut claim)
            || link.prev_nonce.is_some_and(|n| verifies(n, &mut claim));
        if !ok {
            VmStats::inc(&self.shared.stats.session_bad_proofs);
            self.refuse_session(key, Refusal::BadProof, 0);
            return;
        }
        if link.resume_offset(claim.received).is_none() {
            debug!(session = %id, received = claim.received, kept_from = link.to_guest.start(), end = link.to_guest.end(), "resume count out of range");
            self.refuse_session(key, Refusal::OutOfRange, 0);
            return;
        }
        if let Some(old) = live {
            self.park_conn(old);
            self.endpoint.reset(old);
        }
        let parked = self.sessions.parked.get(&id).expect("parked above");
        let Some(SessionState::Live(link)) = parked.hc.session.as_deref() else {
            unreachable!("parked sessions are live");
        };
        // Parking acknowledged what the old connection's guest consumed, never more than
        // the guest says it received: the offset still exists.
        let Some(from) = link.resume_offset(claim.received) else {
            self.refuse_session(key, Refusal::OutOfRange, 0);
            return;
        };
        let parked = self.sessions.parked.remove(&id).expect("found above");
        let mut hc = parked.hc;
        let Some(placeholder) = self.conns.remove(&key) else {
            return;
        };
        self.poller
            .unregister(placeholder.sock.raw_fd(), placeholder.token);
        drop(placeholder);
        self.poller.retarget(hc.token, Target::Conn(key));
        let carried = hc.outbox_len();
        let host_closed = hc.host_eof();
        let host_gone = hc.host_hup;
        let link = link_of(&mut hc).expect("live");
        // The nonce the guest proved stays valid until it has read this RESUMED (which may
        // be lost with its connection, even several times in a row).
        link.prev_nonce = Some(claim.server_nonce);
        link.nonce = Nonce(random());
        link.carried = carried;
        let resumed = Frame::Resumed {
            received: link.received,
            closed: Closed {
                send: host_closed,
                rcv: host_gone,
            },
            next_nonce: link.nonce,
        }
        .encode();
        link.greeting_len = resumed.len() as u32;
        link.acked = CounterExtender::new(from, link.greeting_len);
        let inbox = match &mut link.messages {
            None => {
                let (a, b) = link
                    .to_guest
                    .resume_from(from)
                    .expect("range checked above");
                let mut inbox = Vec::with_capacity(resumed.len() + a.len() + b.len());
                inbox.extend_from_slice(&resumed);
                inbox.extend_from_slice(a);
                inbox.extend_from_slice(b);
                inbox
            }
            Some(log) => {
                // The guest has the messages before `claim.received`: forget them, and
                // queue the others, each whole, after RESUMED (a message of its own).
                let consumed = (claim.received - log.acked) as usize;
                log.ends.drain(..consumed);
                log.acked = claim.received;
                link.to_guest.ack(from);
                let mut start = from;
                log.replay = log
                    .ends
                    .iter()
                    .map(|&end| {
                        let msg = link.to_guest.copy_range(start, end);
                        start = end;
                        msg
                    })
                    .collect();
                resumed
            }
        };
        let replay = link.to_guest.len();
        hc.inbox = inbox;
        hc.inbox_off = 0;
        hc.in_ready = false;
        hc.span = tracing::debug_span!("conn", local = %key.local, peer = %key.peer, ty = ?hc.socket_type);
        info!(vm = %self.shared.name, session = %id, replay, carried, guest_received = claim.received, "session resumed");
        VmStats::inc(&self.shared.stats.sessions_resumed);
        VmStats::add(&self.shared.stats.session_replayed_bytes, replay as u64);
        // While bytes of the old connection still wait for the host, a stream session
        // advertises less, so what domsockd holds stays within the window. A seqpacket
        // session cannot: a guest refuses to send a message larger than the advertised
        // buffer (EMSGSIZE), so there the carried messages are held on top of the window
        // (one window more per blackout in which the host reads nothing).
        if carried > 0 && hc.socket_type == SocketType::Stream {
            let window = self.endpoint.config().buf_alloc_bytes;
            self.endpoint
                .set_buf_alloc(&key, window.saturating_sub(carried as u32));
        }
        self.conns.insert(key, hc);
        self.sessions.live += 1;
        self.after_change(key);
    }

    /// Answers `reason` and lets the connection end after the answer.
    fn refuse_session(&mut self, key: ConnKey, reason: Refusal, errno: u32) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        VmStats::inc(&self.shared.stats.session_refusals);
        debug!(%key, reason = reason.name(), errno, "session refused");
        hc.inbox = Frame::Refused { reason, errno }.encode();
        hc.inbox_off = 0;
        hc.session = Some(Box::new(SessionState::Greeting {
            buf: Vec::new(),
            peer: None,
        }));
        // The placeholder's peer is gone: after the answer it reads EOF, and the
        // connection shuts down like any whose host end closed.
        hc.readiness = Readiness::Ready;
        self.after_change(key);
    }

    /// A live session's connection is gone on the guest side: keep its host end.
    pub(super) fn park_conn(&mut self, key: ConnKey) {
        let Some(mut hc) = self.conns.remove(&key) else {
            return;
        };
        if let Some(c) = self.endpoint.get(&key) {
            hc.session_ack(c.credit().peer_fwd_cnt());
        }
        let Some(id) = link_of(&mut hc).map(|l| l.id) else {
            self.poller.unregister(hc.sock.raw_fd(), hc.token);
            return;
        };
        if hc.origin == super::conn::Origin::Proxy {
            // A session accepted from a sibling resumes on a session-port connection: it
            // is no longer the dialed connection (its policy check follows its link).
            hc.origin = super::conn::Origin::Guest;
            self.proxied -= 1;
        }
        // The inbox holds the greeting and replay of the last resume, if not yet sent:
        // both are rebuilt at the next resume (the replay bytes are still in the buffer).
        hc.inbox.clear();
        hc.inbox_off = 0;
        hc.in_ready = false;
        hc.dirty = false;
        if !hc.pending.is_empty() {
            // Payload of the current TX batch, still in the guest's buffers: it was
            // accepted (and counted), so it joins the outbox instead of being dropped.
            if let Some(mem) = self.mem.as_ref().map(|m| m.memory()) {
                for &(addr, len) in &hc.pending {
                    let _ = crate::virtio::chain::for_each_slice(&mem, addr, len, |s| {
                        let mut bytes = vec![0u8; s.len()];
                        s.copy_to(&mut bytes[..]);
                        hc.out_stream.extend(bytes);
                        std::ops::ControlFlow::<()>::Continue(())
                    });
                }
            }
        }
        hc.pending.clear();
        hc.pending_len = 0;
        // A guest message cut by the blackout is sent again whole (it is not counted).
        hc.partial_msg.clear();
        self.poller.retarget(hc.token, Target::Parked(id));
        let interest = if hc.outbox_holds_data() {
            Interest::ReadWrite
        } else {
            Interest::Read
        };
        if self
            .poller
            .set_interest(hc.sock.raw_fd(), hc.token, interest)
            .is_ok()
        {
            hc.interest = interest;
        }
        self.sessions.live -= 1;
        VmStats::inc(&self.shared.stats.sessions_parked);
        hc.span
            .in_scope(|| debug!(session = %id, outbox = hc.outbox_len(), "session parked"));
        let mut parked = Parked { hc, deadline: None };
        self.serve_parked(&mut parked);
        self.sessions.parked.insert(id, parked);
    }

    /// Parks every live session (the device stopped). The caller closes the rest.
    pub(super) fn park_sessions(&mut self) {
        let live: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, hc)| hc.is_session())
            .map(|(k, _)| *k)
            .collect();
        for key in live {
            self.park_conn(key);
        }
        if !self.sessions.parked.is_empty() {
            // Deadlines are set by the next timer pass: make sure there is one soon.
            let _ = self.shared.wake.write(1);
        }
    }

    /// A session-port connection closes for good (the guest closed it, or it failed):
    /// a live session ends, a listener registration it kept is forgotten.
    pub(super) fn session_closed(&mut self, key: ConnKey, hc: &HostConn) {
        match hc.session.as_deref() {
            Some(SessionState::Live(link)) => {
                self.sessions.live -= 1;
                self.router.forget_pair(link.id);
            }
            Some(SessionState::Dialing { .. }) => self.sessions.live -= 1,
            Some(SessionState::Listening { port, .. })
                if self
                    .sessions
                    .listeners
                    .get(port)
                    .is_some_and(|r| r.keepalive == Some(key)) =>
            {
                self.sessions.listeners.remove(port);
            }
            _ => {}
        }
    }

    /// The device stopped: registrations outlive their connections (the guest's listening
    /// sockets survive a blackout) until the guest registers again or the park timeout.
    pub(super) fn orphan_listeners(&mut self) {
        for r in self.sessions.listeners.values_mut() {
            r.keepalive = None;
        }
    }

    /// Flushes a parked session's outbox and reads host data into its replay buffer up to
    /// the bound. `false` if its host end failed.
    fn serve_parked(&mut self, parked: &mut Parked) -> bool {
        let hc = &mut parked.hc;
        if hc.write_outbox().is_err() {
            return false;
        }
        let interest = if hc.outbox_holds_data() {
            Interest::ReadWrite
        } else {
            Interest::Read
        };
        if interest != hc.interest
            && self
                .poller
                .set_interest(hc.sock.raw_fd(), hc.token, interest)
                .is_ok()
        {
            hc.interest = interest;
        }
        let scratch = &mut self.sessions.scratch;
        if hc.socket_type == SocketType::SeqPacket {
            while hc.readable() && !hc.host_eof() {
                match hc.sock.peek_message_len() {
                    Ok(0) => hc.note_eof(),
                    Ok(len) if len <= hc.session_room() => {
                        hc.inbox.resize(len, 0);
                        if !matches!(hc.sock.read(&mut hc.inbox), Ok(n) if n == len) {
                            return false;
                        }
                        hc.record_inbox_message();
                        hc.inbox.clear();
                    }
                    Ok(_) => break,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => hc.note_drained(),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
            return true;
        }
        while hc.readable() && !hc.host_eof() {
            let room = hc.session_room().min(64 * 1024);
            if room == 0 {
                break;
            }
            scratch.resize(room, 0);
            match hc.sock.read(&mut scratch[..room]) {
                Ok(0) => hc.note_eof(),
                Ok(n) => {
                    hc.note_read(n, room, false);
                    if let Some(link) = link_of(hc) {
                        link.to_guest.record(&scratch[..n]);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => hc.note_drained(),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// An event on a parked session's host socket.
    pub(super) fn parked_event(&mut self, id: SessionId, set: EventSet) {
        let Some(mut parked) = self.sessions.parked.remove(&id) else {
            return;
        };
        parked.hc.note_event(
            set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP),
            set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP),
            set.contains(EventSet::HANG_UP),
        );
        if self.serve_parked(&mut parked) {
            self.sessions.parked.insert(id, parked);
        } else {
            VmStats::inc(&self.shared.stats.host_errors);
            warn!(vm = %self.shared.name, session = %id, "parked session's host end failed; session closed");
            self.drop_parked(id, parked, false);
        }
    }

    /// Closes a parked session's host end; `expired` remembers its id so that a late
    /// RESUME is answered [`Refusal::Expired`] (otherwise it is an unknown session, which
    /// the guest reports like a reset connection).
    fn drop_parked(&mut self, id: SessionId, parked: Parked, expired: bool) {
        self.poller
            .unregister(parked.hc.sock.raw_fd(), parked.hc.token);
        self.router.forget_pair(id);
        if expired {
            if self.sessions.expired.len() >= SESSION_TOMBSTONES {
                self.sessions.expired.pop_front();
            }
            self.sessions.expired.push_back(id);
        }
    }

    /// Sets the deadlines of newly parked sessions and closes those past theirs.
    pub(super) fn session_timers(&mut self, now: Instant) {
        if !self.sessions.greetings.is_empty() {
            self.greeting_timers(now);
        }
        let timeout = Duration::from_millis(self.shared.park_timeout_ms.load(Ordering::Relaxed));
        let mut expired = Vec::new();
        for (id, p) in &mut self.sessions.parked {
            match p.deadline {
                None => p.deadline = Some(now + timeout),
                Some(d) if d <= now => expired.push(*id),
                Some(_) => {}
            }
        }
        self.sessions.listeners.retain(|port, r| {
            if r.keepalive.is_some() {
                r.deadline = None;
                return true;
            }
            match r.deadline {
                None => {
                    r.deadline = Some(now + timeout);
                    true
                }
                Some(d) if d <= now => {
                    debug!(port = port.0, "orphaned session listener forgotten");
                    false
                }
                Some(_) => true,
            }
        });
        for id in expired {
            let parked = self.sessions.parked.remove(&id).expect("listed above");
            info!(vm = %self.shared.name, session = %id, timeout_ms = timeout.as_millis() as u64, "parked session expired; host end closed");
            VmStats::inc(&self.shared.stats.sessions_expired);
            self.drop_parked(id, parked, true);
        }
    }

    /// Closes every parked session (the frontend is gone for good).
    pub(super) fn drop_all_parked(&mut self) {
        let ids: Vec<SessionId> = self.sessions.parked.keys().copied().collect();
        for id in ids {
            let parked = self.sessions.parked.remove(&id).expect("listed");
            self.drop_parked(id, parked, false);
        }
    }
}

/// A parked session taken out of its engine ([`DataPlane::export_parked`]) to be put
/// into another ([`DataPlane::import_parked`]): the engine of the same domain on the
/// host its guest moved to.
#[derive(Debug)]
pub struct ExportedSession {
    /// What the guest's new host needs to answer its RESUME.
    pub snapshot: SessionSnapshot,
    /// The domain and port the session reaches, as seen from the exporting host.
    pub target: (Cid, Port),
    /// The session's host end.
    pub host: HostSocket,
    /// Guest stream bytes accepted but not yet taken by the host end (counted in the
    /// snapshot's `received`: they must reach the host end before anything newer).
    pub out_stream: Vec<u8>,
    /// Guest seqpacket messages accepted but not yet taken by the host end.
    pub out_msgs: Vec<Vec<u8>>,
    /// The guest accepted this session from the sibling `target` names (the acceptor
    /// half of a sibling pair): policy reloads check the pair from that sibling to this
    /// guest, not the other way. Kept across moves, so a half that comes home is checked
    /// as it was made.
    pub accepted: bool,
}

/// What [`DataPlane::swap_session_host`] gives back: the session's previous host end.
#[derive(Debug)]
pub struct SwappedHost {
    /// The previous host end (what it holds unread is the caller's).
    pub old: HostSocket,
    /// The guest had half-closed and the engine shut the old end's write side (so its
    /// peer reads a real EOF); the new end was shut the same way.
    pub write_shut: bool,
}

/// Why a session's host end cannot be swapped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwapError {
    /// No live or parked session with that id here.
    #[error("no session {0} here")]
    NotFound(SessionId),
    /// Only stream sessions carry sibling pairs.
    #[error("session {0} is not a stream session")]
    NotStream(SessionId),
    /// More bytes to put in front than a join may hold.
    #[error("{0} bytes in front of the new host end exceed the join bound")]
    TooLarge(usize),
    /// Registering the new end failed.
    #[error("cannot watch the new host end: {0}")]
    Register(String),
}

/// The target a session imported from another host's relay carries here: its real target
/// lives at its home, whose policy admitted it and answers for it (this host's CIDs and
/// rules may name other domains). No host port is 0 to domsockd, so no other session has
/// it; a policy reload here leaves such sessions alone.
pub const RELAYED_TARGET: (Cid, Port) = (Cid::HOST, Port(0));

/// Why a session cannot be imported.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportError {
    /// This engine already knows a session with that id.
    #[error("session {0} already exists here")]
    Exists(SessionId),
    /// The domain has as many sessions as it may.
    #[error("too many sessions")]
    TooMany,
    /// The snapshot's tail is larger than this host's replay buffers.
    #[error("the replay tail of {0} bytes does not fit")]
    TooLarge(usize),
    /// The host end's type is not the session's.
    #[error("the host end is not a {0:?} socket")]
    WrongSocket(SocketType),
    /// Registering the host end failed.
    #[error("cannot watch the host end: {0}")]
    Register(String),
}

impl DataPlane {
    /// Ids of the sessions parked here.
    pub fn parked_session_ids(&self) -> Vec<SessionId> {
        let mut ids: Vec<SessionId> = self.sessions.parked.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Ends session `id` because its host end can no longer be reached (the tunnel to
    /// the host where it lives stayed down past its resume timeout): a parked session is
    /// closed, a live one's connection reset, and its id remembered as expired, so that
    /// the guest's next RESUME is answered [`Refusal::Expired`]. `false` if there is no
    /// such session here.
    pub fn expire_session(&mut self, id: SessionId) -> bool {
        let found = match self.locate_session(id) {
            None => return false,
            Some(None) => {
                let parked = self.sessions.parked.remove(&id).expect("located");
                self.drop_parked(id, parked, true);
                true
            }
            Some(Some(key)) => {
                if self.sessions.expired.len() >= SESSION_TOMBSTONES {
                    self.sessions.expired.pop_front();
                }
                self.sessions.expired.push_back(id);
                if self.endpoint.get(&key).is_some() {
                    self.endpoint.reset(key);
                }
                self.after_change(key);
                true
            }
        };
        VmStats::inc(&self.shared.stats.sessions_expired);
        warn!(vm = %self.shared.name, session = %id, "session ended: its host end is unreachable");
        let _ = self.shared.wake.write(1);
        found
    }

    /// Gives session `id` (live or parked) the host end `new` in place of its current one,
    /// which is returned: the engine reads nothing more from the old end and writes what
    /// its outbox holds to the new one. `prefix` (host bytes that were in flight towards
    /// the guest) goes to the guest before anything read from `new`, and into the replay
    /// buffer like all host bytes (the buffer grows for it; nothing new is read from the
    /// host until it is back within its usual bound). Used to join a sibling pair: first
    /// with a placeholder and no prefix, then with the fresh local pair.
    pub fn swap_session_host(
        &mut self,
        id: SessionId,
        new: HostSocket,
        prefix: &[u8],
    ) -> Result<SwappedHost, SwapError> {
        use crate::tunables::JOIN_MAX_HELD_BYTES;
        if prefix.len() > 2 * JOIN_MAX_HELD_BYTES {
            return Err(SwapError::TooLarge(prefix.len()));
        }
        let Some(loc) = self.locate_session(id) else {
            return Err(SwapError::NotFound(id));
        };
        let hc = match loc {
            None => &mut self.sessions.parked.get_mut(&id).expect("located").hc,
            Some(key) => self.conns.get_mut(&key).expect("located"),
        };
        if hc.socket_type != SocketType::Stream || !matches!(new, HostSocket::Stream(_)) {
            return Err(SwapError::NotStream(id));
        }
        let target = match loc {
            None => Target::Parked(id),
            Some(key) => Target::Conn(key),
        };
        let token = self
            .poller
            .register(new.raw_fd(), target)
            .map_err(|e| SwapError::Register(e.to_string()))?;
        self.poller.unregister(hc.sock.raw_fd(), hc.token);
        let old = std::mem::replace(&mut hc.sock, new);
        hc.token = token;
        hc.interest = Interest::Read;
        let write_shut = hc.applied.send;
        if write_shut {
            hc.sock.shutdown(std::net::Shutdown::Write);
        }
        if hc.applied.rcv {
            hc.sock.shutdown(std::net::Shutdown::Read);
        }
        if !hc.host_eof() {
            // Whatever the old end said about its EOF, the new end says again.
            hc.host_send = super::conn::HostSend::Open;
            hc.host_hup = false;
            hc.readiness = Readiness::Ready;
        }
        let link = link_of(hc).expect("located sessions are live");
        link.to_guest.reserve(prefix.len());
        let kept = link.to_guest.record(prefix);
        debug_assert_eq!(kept, prefix.len());
        if loc.is_some() && !prefix.is_empty() {
            // Only bytes already recorded follow the greeting in a live inbox: the prefix
            // goes after them, before anything read from the new end.
            hc.inbox.drain(..hc.inbox_off);
            hc.inbox_off = 0;
            hc.inbox.extend_from_slice(prefix);
        }
        if hc.outbox_holds_data()
            && self
                .poller
                .set_interest(hc.sock.raw_fd(), hc.token, Interest::ReadWrite)
                .is_ok()
        {
            hc.interest = Interest::ReadWrite;
        }
        match loc {
            Some(key) => self.after_change(key),
            None => {
                let mut parked = self.sessions.parked.remove(&id).expect("located");
                if self.serve_parked(&mut parked) {
                    self.sessions.parked.insert(id, parked);
                } else {
                    VmStats::inc(&self.shared.stats.host_errors);
                    warn!(vm = %self.shared.name, session = %id, "parked session's new host end failed; session closed");
                    self.drop_parked(id, parked, false);
                }
            }
        }
        let _ = self.shared.wake.write(1);
        Ok(SwappedHost { old, write_shut })
    }

    /// Session `id` (live or parked) reaches `target` from now on (a sibling pair joined
    /// here: each half's target is the other's domain, `accepted` for the half that
    /// accepted), so policy reloads here check it like a session made here. Whether the
    /// session was found.
    pub fn set_session_target(
        &mut self,
        id: SessionId,
        target: (Cid, Port),
        accepted: bool,
    ) -> bool {
        let Some(loc) = self.locate_session(id) else {
            return false;
        };
        let hc = match loc {
            None => &mut self.sessions.parked.get_mut(&id).expect("located").hc,
            Some(key) => self.conns.get_mut(&key).expect("located"),
        };
        match link_of(hc) {
            Some(link) => {
                link.target = target;
                link.accepted = accepted;
                true
            }
            None => false,
        }
    }

    /// Whether this domain may open a session to sibling `to` on `port` here (same
    /// namespace, allowed by the policy), checked again before a sibling pair is joined.
    pub fn may_reach_sibling(&self, to: Cid, port: Port) -> bool {
        self.router
            .check_between(self.shared.cid, to, port, SocketType::Stream)
            .is_allowed()
    }

    /// The router of this engine's daemon (its sibling pair registry).
    pub fn router(&self) -> std::sync::Arc<crate::router::Router> {
        self.router.clone()
    }

    /// Takes the parked session `id` out of this engine, with its host end: nothing of it
    /// stays here (not even a tombstone; the session lives on elsewhere).
    pub fn export_parked(&mut self, id: SessionId) -> Option<ExportedSession> {
        let parked = self.sessions.parked.remove(&id)?;
        let mut hc = parked.hc;
        self.poller.unregister(hc.sock.raw_fd(), hc.token);
        let host_done = hc.host_eof();
        let out_stream: Vec<u8> = std::mem::take(&mut hc.out_stream).into();
        let out_msgs: Vec<Vec<u8>> = std::mem::take(&mut hc.out_msgs).into();
        let socket_type = hc.socket_type;
        let Some(SessionState::Live(link)) = hc.session.take().map(|b| *b) else {
            unreachable!("parked sessions are live");
        };
        let (message_ends, messages_acked) = match &link.messages {
            None => (Vec::new(), 0),
            Some(log) => (log.ends.iter().copied().collect(), log.acked),
        };
        let tail_start = link.to_guest.start();
        let snapshot = SessionSnapshot {
            id,
            secret: link.secret,
            nonce: link.nonce,
            prev_nonce: link.prev_nonce,
            socket_type,
            received: link.received,
            guest_done: link.guest_done,
            host_done,
            tail_start,
            tail: link.to_guest.copy_range(tail_start, link.to_guest.end()),
            message_ends,
            messages_acked,
        };
        VmStats::inc(&self.shared.stats.sessions_exported);
        info!(vm = %self.shared.name, session = %id, tail = snapshot.tail.len(), outbox = out_stream.len() + out_msgs.len(), "parked session exported");
        Some(ExportedSession {
            snapshot,
            target: link.target,
            host: hc.sock,
            out_stream,
            out_msgs,
            accepted: link.accepted,
        })
    }

    /// Puts a session exported by another engine (of this domain, on another host or
    /// before a restart of its QEMU) in as parked: the guest's next RESUME finds it here.
    pub fn import_parked(&mut self, s: ExportedSession) -> Result<(), ImportError> {
        self.try_import_parked(s).map_err(|(e, _)| e)
    }

    /// [`DataPlane::import_parked`], giving the session back whole when it cannot be
    /// imported (its host end stays open for the caller).
    pub fn try_import_parked(
        &mut self,
        s: ExportedSession,
    ) -> Result<(), (ImportError, Box<ExportedSession>)> {
        let id = s.snapshot.id;
        let refused = |e, s| Err((e, Box::new(s)));
        if self.locate_session(id).is_some() {
            return refused(ImportError::Exists(id), s);
        }
        if self.sessions.live + self.sessions.parked.len() >= MAX_SESSIONS_PER_VM {
            return refused(ImportError::TooMany, s);
        }
        if s.snapshot.tail.len() > RELAY_MAX_TAIL_BYTES {
            return refused(ImportError::TooLarge(s.snapshot.tail.len()), s);
        }
        let type_ok = matches!(
            (&s.host, s.snapshot.socket_type),
            (HostSocket::Stream(_), SocketType::Stream)
                | (HostSocket::SeqPacket(_), SocketType::SeqPacket)
        );
        if !type_ok {
            return refused(ImportError::WrongSocket(s.snapshot.socket_type), s);
        }
        let token = match self.poller.register(s.host.raw_fd(), Target::Parked(id)) {
            Ok(t) => t,
            Err(e) => return refused(ImportError::Register(e.to_string()), s),
        };
        let snap = s.snapshot;
        // A session that moved through a relay may bring host bytes that were in flight
        // beyond its replay buffer: its ring holds them all (bounded above).
        let capacity = SESSION_REPLAY_BYTES.max(snap.tail.len());
        let mut to_guest = ReplayBuffer::starting_at(capacity, snap.tail_start);
        to_guest.record(&snap.tail);
        let messages = (snap.socket_type == SocketType::SeqPacket).then(|| MessageLog {
            ends: snap.message_ends.iter().copied().collect(),
            acked: snap.messages_acked,
            replay: VecDeque::new(),
        });
        let link = SessionLink {
            id,
            secret: snap.secret,
            nonce: snap.nonce,
            prev_nonce: snap.prev_nonce,
            target: s.target,
            to_guest,
            acked: CounterExtender::new(snap.tail_start, 0),
            greeting_len: 0,
            received: snap.received,
            carried: 0,
            guest_done: snap.guest_done,
            messages,
            ack_requested: false,
            accepted: s.accepted,
        };
        // The key only names the connection in logs until a RESUME gives it a real one.
        let key = ConnKey {
            local: domsock_proto::VsockAddr::new(
                Cid::HOST,
                domsock_migration::session::SESSION_PORT,
            ),
            peer: domsock_proto::VsockAddr::new(self.shared.cid, Port(0)),
        };
        let mut hc = HostConn::new(
            s.host,
            token,
            key,
            snap.socket_type,
            super::conn::Origin::Guest,
        );
        hc.out_stream = s.out_stream.into();
        hc.out_msgs = s.out_msgs.into();
        if snap.host_done {
            hc.note_eof();
        }
        hc.session = Some(Box::new(SessionState::Live(link)));
        VmStats::inc(&self.shared.stats.sessions_imported);
        info!(vm = %self.shared.name, session = %id, tail = snap.tail.len(), "session imported, parked until its guest resumes");
        let mut parked = Parked { hc, deadline: None };
        if !self.serve_parked(&mut parked) {
            self.drop_parked(id, parked, false);
            return Ok(());
        }
        self.sessions.parked.insert(id, parked);
        // Its deadline is set by the next timer pass.
        let _ = self.shared.wake.write(1);
        Ok(())
    }
}
