//! The host side of one guest connection: its socket, what it knows about that socket, and
//! the outbox of guest data the socket has not taken yet.
//!
//! State is held as enums, one per independent question (how far the host's sending side
//! got, whether reading may find data, which shutdowns were applied, who opened the
//! connection, what epoll is asked for), so no combination of flags can say two things
//! at once. The protocol state itself (credit, shutdown flags of the guest) lives in the
//! sans-IO [`domsock_proto::Endpoint`]; the engine's `after_change` reconciles the two.
//!
//! What it does not do: decide anything about the protocol, or touch epoll (the engine's
//! poller owns every fd's interest; this records what was asked).

use crate::host::HostSocket;
use crate::virtio::chain::{Mem, Regions};
use domsock_proto::{ConnKey, Port, Shutdown, SocketType};
use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use vm_memory::GuestAddress;

/// How far the host's sending side (our reading side) got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostSend {
    /// Open.
    Open,
    /// The host shut its write side (EPOLLRDHUP/EPOLLHUP seen): EOF follows the data, and
    /// no further edge will report it, so a short read no longer means "drained".
    Shut,
    /// EOF read: nothing more comes from the host.
    Eof,
}

/// Whether reading the host socket may find data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Drained: wait for the next edge.
    Drained,
    /// Data may be waiting.
    Ready,
    /// The last read filled all the room it had: more is likely waiting, so the next one
    /// reads into several RX buffers at once.
    Full,
}

/// Who opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The guest connected to a host port (checked against the policy on reload).
    Guest,
    /// A host process sent `CONNECT <port>`; `reply` is the port to confirm with
    /// `OK <port>` once the guest accepts (`None` once sent).
    Host {
        /// Port still to confirm.
        reply: Option<Port>,
    },
    /// A sibling's session dialed this guest (see [`crate::vm::ProxyDial`]); the host
    /// end is that session's socket pair, and the connection appears to come from the
    /// sibling (its key's local CID).
    Proxy,
}

/// The socket's epoll interest, as last set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Readable and peer hang-up (edge-triggered).
    Read,
    /// Also writable: asked only while the outbox holds data, which spares a wake-up per
    /// host read on every guest->host stream.
    ReadWrite,
}

/// Host side of one guest connection.
#[derive(Debug)]
pub struct HostConn {
    pub(super) sock: HostSocket,
    pub(super) token: u64,
    pub(super) socket_type: SocketType,
    pub(super) origin: Origin,
    pub(super) host_send: HostSend,
    /// The host closed both directions (EPOLLHUP): the guest is told `Shutdown::BOTH` at
    /// EOF rather than only `SEND`.
    pub(super) host_hup: bool,
    pub(super) readiness: Readiness,
    /// Shutdowns of the guest already applied to the host socket.
    pub(super) applied: Shutdown,
    pub(super) interest: Interest,
    /// Listed in the engine's ready queue (host->guest data or EOF to move).
    pub(super) in_ready: bool,
    /// Listed in the engine's dirty list (pending batch payload to write).
    pub(super) dirty: bool,
    /// Stream bytes accepted from the guest, not yet taken by the host socket.
    pub(super) out_stream: VecDeque<u8>,
    /// Stream payload of the current TX batch, still in the guest's buffers (whose chains
    /// are returned only after `flush_pending`), in order: written with one `writev`.
    pub(super) pending: Vec<(GuestAddress, usize)>,
    pub(super) pending_len: usize,
    /// Seqpacket messages accepted from the guest, not yet taken by the host socket.
    pub(super) out_msgs: VecDeque<Vec<u8>>,
    /// A seqpacket message from the guest still missing its EOM packet.
    pub(super) partial_msg: Vec<u8>,
    /// Host->guest bytes already read from the socket (handshake leftovers, or one
    /// seqpacket message being cut into packets).
    pub(super) inbox: Vec<u8>,
    pub(super) inbox_off: usize,
    /// Set on connections of the session port: their greeting, then their session.
    pub(super) session: Option<Box<super::session::SessionState>>,
    /// Every event logged about this connection names it (VM, ports).
    pub(super) span: tracing::Span,
    /// For a connection dialed for a sibling's session ([`Origin::Proxy`]): that session.
    pub(super) dialed_for: Option<domsock_migration::session::SessionId>,
}

pub(super) fn would_block(e: &io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

impl HostConn {
    pub(super) fn new(
        sock: HostSocket,
        token: u64,
        key: ConnKey,
        socket_type: SocketType,
        origin: Origin,
    ) -> Self {
        Self {
            span: tracing::debug_span!("conn", local = %key.local, peer = %key.peer, ty = ?socket_type),
            sock,
            token,
            socket_type,
            origin,
            host_send: HostSend::Open,
            host_hup: false,
            readiness: Readiness::Ready,
            applied: Shutdown::default(),
            interest: Interest::Read,
            in_ready: false,
            dirty: false,
            out_stream: VecDeque::new(),
            pending: Vec::new(),
            pending_len: 0,
            out_msgs: VecDeque::new(),
            partial_msg: Vec::new(),
            inbox: Vec::new(),
            inbox_off: 0,
            session: None,
            dialed_for: None,
        }
    }

    /// Reading may find data.
    pub(super) fn readable(&self) -> bool {
        self.readiness != Readiness::Drained
    }

    /// The host reached EOF.
    pub(super) fn host_eof(&self) -> bool {
        self.host_send == HostSend::Eof
    }

    /// An epoll event for the socket arrived: `input` (readable or a hang-up), `rdhup`
    /// (the host shut its write side), `hup` (the host closed both).
    pub(super) fn note_event(&mut self, input: bool, rdhup: bool, hup: bool) {
        if input && self.readiness == Readiness::Drained {
            self.readiness = Readiness::Ready;
        }
        if rdhup && self.host_send == HostSend::Open {
            self.host_send = HostSend::Shut;
        }
        if hup {
            self.host_hup = true;
        }
    }

    /// A read found EOF.
    pub(super) fn note_eof(&mut self) {
        self.host_send = HostSend::Eof;
        self.readiness = Readiness::Drained;
    }

    /// A read returned `n` of the `asked` bytes it had room for (`would_block`: none).
    /// A short read on a stream socket emptied its receive queue; data arriving later
    /// raises a new edge, which saves the EAGAIN read per wake-up. Not once the host has
    /// shut its side: no edge would report the EOF behind the data.
    pub(super) fn note_read(&mut self, n: usize, asked: usize, would_block: bool) {
        self.readiness = if would_block || (n < asked && self.host_send == HostSend::Open) {
            Readiness::Drained
        } else if n == asked {
            Readiness::Full
        } else {
            Readiness::Ready
        };
    }

    /// A read would block: wait for the next edge.
    pub(super) fn note_drained(&mut self) {
        self.readiness = Readiness::Drained;
    }

    /// A read failed: keep what readiness says, but do not batch the next one.
    pub(super) fn note_read_error(&mut self) {
        if self.readiness == Readiness::Full {
            self.readiness = Readiness::Ready;
        }
    }

    /// Nothing accepted from the guest waits for the host socket (pending batch payload
    /// included).
    pub(super) fn outbox_empty(&self) -> bool {
        self.out_stream.is_empty() && self.out_msgs.is_empty() && self.pending.is_empty()
    }

    /// Bytes wait in the outbox proper (what EPOLLOUT is needed for).
    pub(super) fn outbox_holds_data(&self) -> bool {
        !self.out_stream.is_empty() || !self.out_msgs.is_empty()
    }

    pub(super) fn outbox_len(&self) -> usize {
        self.out_stream.len() + self.out_msgs.iter().map(Vec::len).sum::<usize>()
    }

    /// Writes the outbox until the socket would block; `Ok(true)` once it is empty.
    pub(super) fn write_outbox(&mut self) -> io::Result<bool> {
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

    pub(super) fn inbox_pending(&self) -> usize {
        self.inbox.len() - self.inbox_off
    }

    /// Moves up to `max` inbox bytes into the RX payload area; `None` if guest memory
    /// could not be written.
    pub(super) fn drain_inbox(
        &mut self,
        regions: &Regions,
        mem: &Mem,
        max: usize,
    ) -> Option<usize> {
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
    pub(super) fn eof_shutdown(&self) -> Shutdown {
        if self.host_hup {
            Shutdown::BOTH
        } else {
            Shutdown::SEND
        }
    }
}
