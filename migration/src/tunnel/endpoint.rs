//! One end of a tunnel to one peer host: the channels, their flow control and replay
//! buffers, the HELLO/resume exchange and the keepalive timers. Sans-IO: the caller feeds
//! received bytes ([`Endpoint::handle_bytes`]), asks for bytes to send
//! ([`Endpoint::poll_transmit`]), passes the time in ([`Millis`]) and tells the endpoint
//! when a transport came up or went down. Nothing here blocks, reads a clock or owns a
//! socket, so two endpoints run in memory under simulated time in the tests.

use super::rxbuf::{RxPool, RxQueue};
use super::wire::{
    self, ChannelId, ChannelKind, CloseReason, Frame, FrameError, Incarnation, RefusalCode,
    ResumeEntry, MAX_CHANNELS, MAX_DATA_LEN, MAX_METADATA_LEN,
};
use crate::session::replay::ReplayBuffer;
use std::collections::{BTreeMap, VecDeque};
use thiserror::Error;

/// Where [`Endpoint::poll_transmit_into`] puts the frames it sends: a `Vec<u8>`, or a
/// writer (the runtime's TLS connection) that takes each DATA payload from where it lies.
pub trait TransmitSink {
    /// Bytes taken so far (what the budget counts).
    fn taken(&self) -> usize;
    /// Takes the concatenation of `parts` (whole frames; a part may be empty), all of it.
    fn put(&mut self, parts: &[&[u8]]);
}

impl TransmitSink for Vec<u8> {
    fn taken(&self) -> usize {
        self.len()
    }

    fn put(&mut self, parts: &[&[u8]]) {
        for p in parts {
            self.extend_from_slice(p);
        }
    }
}

/// Milliseconds on the caller's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// Largest send window one channel keeps (whatever the peer grants), bounding its replay
/// buffer.
pub const MAX_WINDOW_BYTES: u32 = 16 << 20;
/// Most seqpacket messages sent and not yet consumed by the peer on one channel (an empty
/// message costs no credit, so messages need their own bound).
pub const MAX_MESSAGES_IN_FLIGHT: usize = 4096;
/// Most stateless answers (REFUSED, CLOSE for unknown channels) waiting to be sent; a peer
/// that provokes more is cut off.
const MAX_ORPHAN_FRAMES: usize = MAX_CHANNELS;
/// How often the endpoint measures the round trip (a PING while up, answered by PONG).
pub const RTT_PROBE_INTERVAL_MS: u64 = 1_000;
/// A window grows when its reader took a whole window within two round trips, and at
/// least within this: the clock's resolution ([`Millis`]), so that a link whose round
/// trip reads as 0 ms still counts a window taken between two ticks as fast.
pub const MIN_GROW_WITHIN_MS: u64 = 1;

/// Tunables of one endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Receive window granted to the peer on every channel when it opens (default 128
    /// KiB). Autotuning grows the window of a channel whose reader keeps up; a window its
    /// reader paces stays at this, and that is what many busy channels buffer: 64 channels
    /// at 256 KiB kept 16 MiB in their receive buffers, half this machine's L3 cache, and
    /// ran at 0.82-0.85x of one channel's aggregate against 0.91-0.96x at 128 KiB (two
    /// alternating runs each, `domsock-bench --tunnel-only`).
    pub buf_alloc_bytes: u32,
    /// Largest receive window autotuning grows a channel's to (clamped to
    /// `buf_alloc_bytes..=`[`MAX_WINDOW_BYTES`]; `buf_alloc_bytes` turns autotuning off).
    pub max_window_bytes: u32,
    /// A window grows only while the sum of all channels' receive windows towards this
    /// peer stays within this (windows at `buf_alloc_bytes` are always granted).
    pub window_budget_bytes: u64,
    /// Send a PING after this long without sending anything.
    pub keepalive_idle_ms: u64,
    /// Declare the connection dead after this long without receiving anything.
    pub keepalive_dead_ms: u64,
    /// Close all channels with [`ChannelState::TimedOut`] when no connection has been
    /// re-established for this long.
    pub resume_timeout_ms: u64,
    /// Channels at once (at most [`MAX_CHANNELS`]).
    pub max_channels: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            buf_alloc_bytes: 128 << 10,
            max_window_bytes: 4 << 20,
            window_budget_bytes: 64 << 20,
            keepalive_idle_ms: 1_000,
            keepalive_dead_ms: 5_000,
            resume_timeout_ms: 30_000,
            max_channels: MAX_CHANNELS,
        }
    }
}

/// Why a channel stopped working (in [`ChannelState::Broken`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BrokenReason {
    /// The peer sent CLOSE with this reason (`Normal`: it closed its end).
    PeerClosed(CloseReason),
    /// This end reset the channel because the peer broke its protocol.
    Violation,
    /// The peer host restarted (new incarnation) and lost the channel.
    PeerRestarted,
    /// After a reconnect the peer no longer knew the channel.
    PeerForgot,
    /// After a reconnect the peer lacked bytes this end no longer keeps, or claimed
    /// bytes never sent.
    ResumeImpossible,
}

/// What the owner of a channel sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelState {
    /// OPEN sent, no answer yet (writes wait).
    Opening,
    /// Both ways open.
    Open,
    /// Open, but the peer shut one or both directions.
    PeerShutdown {
        /// The peer reads no more (writes fail).
        rd: bool,
        /// The peer writes no more (reads return EOF once drained).
        wr: bool,
    },
    /// The channel is gone; buffered received bytes may still be read.
    Broken(BrokenReason),
    /// The tunnel stayed down longer than the resume timeout.
    TimedOut,
    /// The peer refused the OPEN.
    Refused(RefusalCode),
}

/// A channel operation that did not happen.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChannelError {
    /// No such channel (never opened, or already released).
    #[error("no channel {0:?}")]
    Unknown(ChannelId),
    /// Nothing to read, or no credit to write, right now.
    #[error("would block")]
    WouldBlock,
    /// The channel is not open any more.
    #[error("channel is {0:?}")]
    NotOpen(ChannelState),
    /// The peer reads no more, or this end shut its write side.
    #[error("broken pipe")]
    BrokenPipe,
    /// A stream call on a seqpacket channel or the other way round.
    #[error("wrong call for a {0:?} channel")]
    WrongKind(ChannelKind),
    /// A seqpacket message larger than the peer's window, or empty.
    #[error("message of {len} bytes does not fit the window of {window}")]
    MessageSize {
        /// Message length.
        len: usize,
        /// The peer's window.
        window: u32,
    },
}

/// Why [`Endpoint::open`] refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpenError {
    /// Metadata over [`MAX_METADATA_LEN`].
    #[error("metadata of {0} bytes (at most {MAX_METADATA_LEN})")]
    MetadataTooLong(usize),
    /// At the channel bound.
    #[error("tunnel carries {0} channels already")]
    TooMany(usize),
}

/// The connection must be dropped (the endpoint already treats it as gone).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LinkError {
    /// Undecodable bytes.
    #[error("bad frame")]
    Frame(#[from] FrameError),
    /// The first frame was not HELLO, or a second HELLO came.
    #[error("frame out of order: {0}")]
    OutOfOrder(&'static str),
    /// HELLO named another host than the configured peer.
    #[error("peer says it is {got:?}, expected {expected:?}")]
    WrongHost {
        /// Name in HELLO.
        got: String,
        /// Configured name.
        expected: String,
    },
    /// The peer used an id of this end's parity for an OPEN.
    #[error("peer opened channel {0:?} with this end's parity")]
    WrongParity(ChannelId),
    /// The peer provoked more stateless answers than are kept.
    #[error("too many frames for unknown channels")]
    Flood,
}

/// Something the owner should act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// HELLO exchanged: channels resumed (or, `fresh`, there were none to resume).
    Up {
        /// The peer had a new incarnation (or this is the first connection).
        fresh: bool,
    },
    /// The connection is dead (keepalive): drop the transport.
    LinkDead,
    /// The peer opens a channel: answer with [`Endpoint::accept`] or [`Endpoint::refuse`].
    IncomingOpen {
        /// The channel.
        channel: ChannelId,
        /// Stream or seqpacket.
        kind: ChannelKind,
        /// The opener's metadata.
        metadata: Vec<u8>,
    },
    /// Data, room or state of the channel changed.
    Changed(ChannelId),
}

/// Counters of one channel, in stream offsets (bytes since the channel opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChannelCounters {
    /// Bytes the owner wrote (accepted into the replay buffer).
    pub sent: u64,
    /// Bytes the peer's owner has taken (acknowledged; forgotten here).
    pub acked: u64,
    /// Bytes put on the current connection (retransmission restarts from the peer's count).
    pub transmitted: u64,
    /// Bytes received from the peer.
    pub received: u64,
    /// Bytes the owner has read.
    pub consumed: u64,
    /// The peer's receive window (the latest it advertised).
    pub peer_buf_alloc: u32,
    /// This end's receive window (grown by autotuning from the configured one).
    pub buf_alloc: u32,
}

/// Endpoint-wide counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointStats {
    /// Frames emitted.
    pub frames_sent: u64,
    /// Frames decoded.
    pub frames_received: u64,
    /// HELLO exchanges that resumed an existing incarnation.
    pub resumes: u64,
    /// Channels reset because the peer broke their protocol.
    pub violations: u64,
    /// Channels closed by the resume timeout.
    pub timed_out_channels: u64,
    /// Retransmitted bytes after reconnects.
    pub retransmitted_bytes: u64,
    /// Times a channel's receive window grew (autotuning).
    pub window_growths: u64,
    /// Times a channel would have grown but the budget had no room.
    pub window_growths_denied: u64,
    /// The smoothed round trip (PING to PONG), in ms; 0 before the first sample.
    pub srtt_ms: u64,
}

/// What [`Endpoint::rx_memory`] reports, in chunks of [`super::rxbuf::CHUNK_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxMemory {
    /// Held by channels' receive buffers (at most one more per channel than their
    /// buffered bytes fill).
    pub held_chunks: usize,
    /// Free in the pool (at most [`super::rxbuf::POOL_MAX_FREE_CHUNKS`]).
    pub free_chunks: usize,
    /// Allocated since the endpoint was made (the pool had none free).
    pub allocated_chunks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Ours, OPEN queued or sent.
    Opening,
    /// Theirs, waiting for the owner's decision.
    AwaitingAccept,
    Open,
    /// The owner closed it; CLOSE sent, waiting for the peer's CLOSE (or its absence from a
    /// HELLO). The owner no longer holds it.
    Closing,
    /// Terminal; kept until the owner releases it.
    Dead(ChannelState),
}

#[derive(Debug, Default, Clone, Copy)]
struct Ctrl {
    open: bool,
    opened: bool,
    credit: bool,
    shutdown: bool,
    close: Option<CloseReason>,
}

#[derive(Debug)]
struct Channel {
    kind: ChannelKind,
    ours: bool,
    phase: Phase,
    created: Millis,
    metadata: Vec<u8>,
    // Sending.
    tx: ReplayBuffer,
    tx_next: u64,
    tx_msg_ends: VecDeque<u64>,
    peer_buf_alloc: u32,
    peer_consumed: u64,
    peer_shut_rd: bool,
    // Receiving.
    /// Unread bytes, in chunks of the endpoint's [`RxPool`].
    rx: RxQueue,
    rx_msg_ends: VecDeque<u64>,
    received: u64,
    consumed: u64,
    advertised_consumed: u64,
    peer_shut_wr: Option<u64>,
    /// The receive window granted to the peer: it only grows (autotuning), so a sender
    /// never holds more than the receiver accepts.
    rx_window: u32,
    /// How far autotuning may grow `rx_window` (the endpoint's `max_window_bytes`, or
    /// less for this channel: [`Endpoint::set_max_window`]).
    max_window: u32,
    /// Since when, and from which consumed count, the reader is timed for taking a whole
    /// window (set at the first CREDIT, restarted after each whole window).
    grow_epoch: Option<(Millis, u64)>,
    // Local half-closes.
    shut_rd: bool,
    shut_wr: Option<u64>,
    ctrl: Ctrl,
    in_ctrl_queue: bool,
    in_data_queue: bool,
    in_events: bool,
}

impl Channel {
    fn new(
        kind: ChannelKind,
        ours: bool,
        phase: Phase,
        now: Millis,
        metadata: Vec<u8>,
        rx_window: u32,
        max_window: u32,
    ) -> Self {
        Self {
            kind,
            ours,
            phase,
            created: now,
            metadata,
            tx: ReplayBuffer::new(0),
            tx_next: 0,
            tx_msg_ends: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_consumed: 0,
            peer_shut_rd: false,
            rx: RxQueue::default(),
            rx_msg_ends: VecDeque::new(),
            received: 0,
            consumed: 0,
            advertised_consumed: 0,
            peer_shut_wr: None,
            rx_window,
            max_window,
            grow_epoch: None,
            shut_rd: false,
            shut_wr: None,
            ctrl: Ctrl::default(),
            in_ctrl_queue: false,
            in_data_queue: false,
            in_events: false,
        }
    }

    /// Records the peer's window (the latest it advertised). The replay ring follows it up
    /// to [`MAX_WINDOW_BYTES`]: it grows with the window (its bytes move once into the
    /// larger ring) and never shrinks, so a smaller grant is used up to the grant.
    fn set_peer_window(&mut self, buf_alloc: u32) {
        self.peer_buf_alloc = buf_alloc;
        let want = buf_alloc.min(MAX_WINDOW_BYTES) as usize;
        if want <= self.tx.capacity() {
            return;
        }
        let mut grown = ReplayBuffer::starting_at(want, self.tx.start());
        let (a, b) = self.tx.slices_from(self.tx.start());
        grown.record(a);
        grown.record(b);
        self.tx = grown;
    }

    fn window(&self) -> u64 {
        u64::from(self.peer_buf_alloc).min(self.tx.capacity() as u64)
    }

    fn credit(&self) -> u64 {
        self.window()
            .saturating_sub(self.tx.end() - self.peer_consumed)
    }

    fn has_tx(&self) -> bool {
        self.phase == Phase::Open && self.tx_next < self.tx.end()
    }

    fn state(&self) -> ChannelState {
        match self.phase {
            Phase::Opening => ChannelState::Opening,
            Phase::AwaitingAccept | Phase::Closing => ChannelState::Open,
            Phase::Dead(s) => s,
            Phase::Open => {
                let wr = self.peer_shut_wr.is_some();
                if self.peer_shut_rd || wr {
                    ChannelState::PeerShutdown {
                        rd: self.peer_shut_rd,
                        wr,
                    }
                } else {
                    ChannelState::Open
                }
            }
        }
    }

    /// Whether reading has reached the peer's end of stream.
    fn at_eof(&self) -> bool {
        self.rx.is_empty()
            && (self.peer_shut_wr == Some(self.received)
                || self.shut_rd
                || matches!(
                    self.phase,
                    Phase::Dead(ChannelState::Broken(BrokenReason::PeerClosed(
                        CloseReason::Normal
                    )))
                ))
    }
}

#[derive(Debug)]
struct Link {
    started: Millis,
    hello_sent: bool,
    hello_received: bool,
    last_rx: Millis,
    last_tx: Millis,
    ping_due: bool,
    ping_outstanding: bool,
    pong_due: Option<u64>,
    /// The PING timing the round trip: its nonce and when it went out.
    probe: Option<(u64, Millis)>,
    /// When the next round-trip probe is due.
    next_probe: Millis,
    partial: Vec<u8>,
    /// A DATA frame whose payload is still arriving.
    rx_data: Option<RxData>,
}

/// A DATA frame whose header was checked and whose payload goes to its channel as it
/// arrives (not gathered into [`Link::partial`] first).
#[derive(Debug, Clone, Copy)]
struct RxData {
    channel: ChannelId,
    eor: bool,
    remaining: usize,
    /// False when the frame is dropped (unknown or closing channel, or a violation).
    deliver: bool,
    /// The channel's read position when the frame began (see [`Endpoint::data_end`]).
    start: RxStart,
}

/// What [`Endpoint::data_end`] needs of the moment a DATA frame began.
#[derive(Debug, Clone, Copy, Default)]
struct RxStart {
    rx_empty: bool,
    consumed: u64,
}

#[derive(Debug, Clone)]
enum Orphan {
    Refused(ChannelId, RefusalCode, String),
    Close(ChannelId, CloseReason),
}

/// One end of the tunnel to one peer host.
#[derive(Debug)]
pub struct Endpoint {
    cfg: EndpointConfig,
    local_host: String,
    peer_host: String,
    incarnation: Incarnation,
    peer_incarnation: Option<Incarnation>,
    link: Option<Link>,
    /// Since when no HELLO exchange has completed (None while up).
    down_since: Option<Millis>,
    channels: BTreeMap<ChannelId, Channel>,
    next_id: u32,
    ctrl_queue: VecDeque<ChannelId>,
    data_queue: VecDeque<ChannelId>,
    orphans: VecDeque<Orphan>,
    events: VecDeque<Event>,
    ping_nonce: u64,
    /// Smoothed round trip of the PING probes (kept across connections).
    srtt_ms: Option<u64>,
    stats: EndpointStats,
    /// Control frames of one [`Endpoint::poll_transmit_into`] call before they go to the
    /// sink (kept for its allocation).
    tx_scratch: Vec<u8>,
    /// Chunks of every channel's receive buffer (reused warm, see [`super::rxbuf`]).
    rx_pool: RxPool,
}

impl Endpoint {
    /// A new endpoint for the tunnel from `local_host` to `peer_host` (distinct, valid host
    /// names), with a random `incarnation` the caller drew.
    pub fn new(
        mut cfg: EndpointConfig,
        local_host: &str,
        peer_host: &str,
        incarnation: Incarnation,
        now: Millis,
    ) -> Self {
        cfg.max_channels = cfg.max_channels.clamp(1, MAX_CHANNELS);
        cfg.max_window_bytes = cfg
            .max_window_bytes
            .clamp(cfg.buf_alloc_bytes.min(MAX_WINDOW_BYTES), MAX_WINDOW_BYTES);
        Self {
            next_id: if local_host < peer_host { 2 } else { 1 },
            cfg,
            local_host: local_host.to_owned(),
            peer_host: peer_host.to_owned(),
            incarnation,
            peer_incarnation: None,
            link: None,
            down_since: Some(now),
            channels: BTreeMap::new(),
            ctrl_queue: VecDeque::new(),
            data_queue: VecDeque::new(),
            orphans: VecDeque::new(),
            events: VecDeque::new(),
            ping_nonce: 0,
            srtt_ms: None,
            stats: EndpointStats::default(),
            tx_scratch: Vec::new(),
            rx_pool: RxPool::default(),
        }
    }

    /// The configured peer.
    pub fn peer_host(&self) -> &str {
        &self.peer_host
    }

    /// Whether this end dials (its name sorts lower), so that two hosts never dial each
    /// other at once.
    pub fn dials(&self) -> bool {
        self.local_host < self.peer_host
    }

    /// Whether HELLO has been exchanged on the current connection.
    pub fn is_up(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.hello_received)
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        EndpointStats {
            srtt_ms: self.srtt_ms.unwrap_or(0),
            ..self.stats
        }
    }

    /// The sum of all channels' receive windows (what the budget bounds).
    pub fn window_total(&self) -> u64 {
        self.channels.values().map(|c| u64::from(c.rx_window)).sum()
    }

    /// The chunks of the channels' receive buffers: held by channels, free in the pool,
    /// and allocated so far (see [`super::rxbuf`]).
    pub fn rx_memory(&self) -> RxMemory {
        RxMemory {
            held_chunks: self.channels.values().map(|c| c.rx.chunks()).sum(),
            free_chunks: self.rx_pool.free_chunks(),
            allocated_chunks: self.rx_pool.allocated_chunks(),
        }
    }

    /// Channels held (including those still closing).
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// A new transport is up (after TLS): the old one, if any, is gone.
    pub fn connected(&mut self, now: Millis) {
        self.disconnected(now);
        self.link = Some(Link {
            started: now,
            hello_sent: false,
            hello_received: false,
            last_rx: now,
            last_tx: now,
            ping_due: false,
            ping_outstanding: false,
            pong_due: None,
            probe: None,
            next_probe: now,
            partial: Vec::new(),
            rx_data: None,
        });
    }

    /// The transport is gone. Bytes not acknowledged stay for retransmission.
    pub fn disconnected(&mut self, now: Millis) {
        if self.link.take().is_some() && self.down_since.is_none() {
            self.down_since = Some(now);
        }
        self.down_since.get_or_insert(now);
        self.data_queue.clear();
        for c in self.channels.values_mut() {
            c.in_data_queue = false;
        }
    }

    fn mark_changed(&mut self, id: ChannelId) {
        if let Some(c) = self.channels.get_mut(&id) {
            if !c.in_events {
                c.in_events = true;
                self.events.push_back(Event::Changed(id));
            }
        }
    }

    fn queue_ctrl(&mut self, id: ChannelId, f: impl FnOnce(&mut Ctrl)) {
        if let Some(c) = self.channels.get_mut(&id) {
            f(&mut c.ctrl);
            if !c.in_ctrl_queue {
                c.in_ctrl_queue = true;
                self.ctrl_queue.push_back(id);
            }
        }
    }

    fn queue_data(&mut self, id: ChannelId) {
        if !self.is_up() {
            return;
        }
        if let Some(c) = self.channels.get_mut(&id) {
            if c.has_tx() && !c.in_data_queue {
                c.in_data_queue = true;
                self.data_queue.push_back(id);
            }
        }
    }

    fn orphan(&mut self, o: Orphan) -> Result<(), LinkError> {
        if self.orphans.len() >= MAX_ORPHAN_FRAMES {
            return Err(LinkError::Flood);
        }
        self.orphans.push_back(o);
        Ok(())
    }

    /// Ends the channel with `state`: stops its traffic and tells the owner.
    fn kill(&mut self, id: ChannelId, state: ChannelState, send_close: Option<CloseReason>) {
        let Some(c) = self.channels.get_mut(&id) else {
            return;
        };
        if c.phase == Phase::Closing {
            // The owner already let go: nobody to tell.
            self.channels.remove(&id);
            return;
        }
        c.phase = Phase::Dead(state);
        c.tx = ReplayBuffer::new(0);
        c.tx_msg_ends.clear();
        c.ctrl = Ctrl::default();
        if let Some(r) = send_close {
            c.ctrl.close = Some(r);
            if !c.in_ctrl_queue {
                c.in_ctrl_queue = true;
                self.ctrl_queue.push_back(id);
            }
        }
        self.mark_changed(id);
    }

    /// Receive-window autotuning, run when a CREDIT is about to go out. The reader is
    /// timed over each whole window it takes; a window taken within two round trips (at
    /// least [`MIN_GROW_WITHIN_MS`]) means the window, not the reader, limits the
    /// channel, so it doubles, up to `max_window_bytes` and as far as the budget allows.
    /// A reader that takes nothing, or takes a window slower than that, never grows its
    /// window; a grown window stays until the channel ends (it is never shrunk, so the
    /// sender never holds more than this end accepts).
    fn autotune(&mut self, id: ChannelId, now: Millis) {
        let within = self
            .srtt_ms
            .unwrap_or(0)
            .saturating_mul(2)
            .max(MIN_GROW_WITHIN_MS);
        let Some(c) = self.channels.get_mut(&id) else {
            return;
        };
        let max = c.max_window;
        if c.phase != Phase::Open || c.shut_rd {
            return;
        }
        let Some((since, from)) = c.grow_epoch else {
            c.grow_epoch = Some((now, c.consumed));
            return;
        };
        if c.consumed - from < u64::from(c.rx_window) {
            return;
        }
        c.grow_epoch = Some((now, c.consumed));
        let old = c.rx_window;
        if now.0.saturating_sub(since.0) > within || old >= max {
            return;
        }
        let others = self.window_total() - u64::from(old);
        let room = self.cfg.window_budget_bytes.saturating_sub(others);
        let new = u64::from(old.saturating_mul(2).min(max)).min(room) as u32;
        if new <= old {
            self.stats.window_growths_denied += 1;
            return;
        }
        self.stats.window_growths += 1;
        if let Some(c) = self.channels.get_mut(&id) {
            c.rx_window = new;
        }
    }

    fn violation(&mut self, id: ChannelId) {
        self.stats.violations += 1;
        self.kill(
            id,
            ChannelState::Broken(BrokenReason::Violation),
            Some(CloseReason::ProtocolViolation),
        );
    }

    // ---- owner operations -------------------------------------------------------------

    /// Opens a channel to the peer; it is [`ChannelState::Opening`] until the peer answers
    /// (also while the tunnel is down: the OPEN waits, bounded by the resume timeout).
    pub fn open(
        &mut self,
        kind: ChannelKind,
        metadata: &[u8],
        now: Millis,
    ) -> Result<ChannelId, OpenError> {
        if metadata.len() > MAX_METADATA_LEN {
            return Err(OpenError::MetadataTooLong(metadata.len()));
        }
        if self.channels.len() >= self.cfg.max_channels {
            return Err(OpenError::TooMany(self.channels.len()));
        }
        let mut id = self.next_id;
        while self.channels.contains_key(&ChannelId(id)) {
            id = id.wrapping_add(2);
            if id < 3 {
                id = if self.dials() { 2 } else { 1 };
            }
        }
        self.next_id = id.wrapping_add(2).max(if self.dials() { 2 } else { 1 });
        let id = ChannelId(id);
        self.channels.insert(
            id,
            Channel::new(
                kind,
                true,
                Phase::Opening,
                now,
                metadata.to_vec(),
                self.cfg.buf_alloc_bytes,
                self.cfg.max_window_bytes,
            ),
        );
        self.queue_ctrl(id, |c| c.open = true);
        Ok(id)
    }

    /// Accepts a channel announced by [`Event::IncomingOpen`].
    pub fn accept(&mut self, id: ChannelId) -> Result<(), ChannelError> {
        let c = self
            .channels
            .get_mut(&id)
            .ok_or(ChannelError::Unknown(id))?;
        if c.phase != Phase::AwaitingAccept {
            return Err(ChannelError::NotOpen(c.state()));
        }
        c.phase = Phase::Open;
        c.metadata = Vec::new();
        self.queue_ctrl(id, |c| c.opened = true);
        self.mark_changed(id);
        Ok(())
    }

    /// Refuses a channel announced by [`Event::IncomingOpen`]; its id is forgotten.
    pub fn refuse(&mut self, id: ChannelId, code: RefusalCode, text: &str) {
        if self
            .channels
            .get(&id)
            .is_some_and(|c| c.phase == Phase::AwaitingAccept)
        {
            self.remove(id);
            let _ = self.orphan(Orphan::Refused(id, code, text.to_owned()));
        }
    }

    fn remove(&mut self, id: ChannelId) {
        // Queues hold stale ids harmlessly: they are skipped when popped.
        let Some(c) = self.channels.remove(&id) else {
            return;
        };
        // A CLOSE still queued for it goes out without it: the peer may be waiting for it
        // to let go of its end (it closed first, and this end's owner released the dead
        // channel before the answer went out). Without this the peer's channel stayed
        // `Closing`, and counted, for the rest of the tunnel's life. The peer ignores a
        // CLOSE for a channel it no longer has, so this never echoes.
        if let Some(reason) = c.ctrl.close {
            if self.orphans.len() < MAX_ORPHAN_FRAMES {
                self.orphans.push_back(Orphan::Close(id, reason));
            }
        }
    }

    fn get(&self, id: ChannelId) -> Result<&Channel, ChannelError> {
        match self.channels.get(&id) {
            Some(c) if c.phase != Phase::Closing => Ok(c),
            _ => Err(ChannelError::Unknown(id)),
        }
    }

    fn get_mut(&mut self, id: ChannelId) -> Result<&mut Channel, ChannelError> {
        Self::owned(&mut self.channels, id)
    }

    /// [`Endpoint::get_mut`] borrowing only the channels (so the receive pool can be
    /// borrowed beside it).
    fn owned(
        channels: &mut BTreeMap<ChannelId, Channel>,
        id: ChannelId,
    ) -> Result<&mut Channel, ChannelError> {
        match channels.get_mut(&id) {
            Some(c) if c.phase != Phase::Closing => Ok(c),
            _ => Err(ChannelError::Unknown(id)),
        }
    }

    /// What the owner sees.
    pub fn state(&self, id: ChannelId) -> Result<ChannelState, ChannelError> {
        Ok(self.get(id)?.state())
    }

    /// Counters of a channel.
    pub fn counters(&self, id: ChannelId) -> Result<ChannelCounters, ChannelError> {
        let c = self.get(id)?;
        Ok(ChannelCounters {
            sent: c.tx.end().max(c.peer_consumed),
            acked: c.peer_consumed,
            transmitted: c.tx_next,
            received: c.received,
            consumed: c.consumed,
            peer_buf_alloc: c.peer_buf_alloc,
            buf_alloc: c.rx_window,
        })
    }

    /// The stream bytes written from offset `from` on that the peer's engine has not read
    /// (they are still in this end's replay buffer): what a channel's new owner must send
    /// again when the old reader reports having taken the stream up to `from`. `None` if
    /// `from` lies outside what is kept (below the peer's acknowledgement or beyond what
    /// was written).
    pub fn unacked_from(&self, id: ChannelId, from: u64) -> Option<Vec<u8>> {
        let c = self.get(id).ok()?;
        if from < c.peer_consumed.max(c.tx.start()) || from > c.tx.end() {
            return None;
        }
        Some(c.tx.copy_range(from, c.tx.end()))
    }

    fn writable(c: &Channel) -> Result<(), ChannelError> {
        match c.phase {
            Phase::Open => {}
            Phase::Opening | Phase::AwaitingAccept => return Err(ChannelError::WouldBlock),
            _ => return Err(ChannelError::NotOpen(c.state())),
        }
        if c.peer_shut_rd || c.shut_wr.is_some() {
            return Err(ChannelError::BrokenPipe);
        }
        Ok(())
    }

    /// Caps how far autotuning grows this channel's receive window (for an owner that
    /// must bound what the peer keeps in flight towards it, e.g. a relay whose handoff
    /// carries those bytes). A window already larger stays as it is (windows never
    /// shrink); `bytes` at or below the configured window turns autotuning off for the
    /// channel.
    pub fn set_max_window(&mut self, id: ChannelId, bytes: u32) -> Result<(), ChannelError> {
        let c = self.get_mut(id)?;
        c.max_window = bytes.clamp(c.rx_window, MAX_WINDOW_BYTES);
        Ok(())
    }

    /// Bytes that may be written now.
    pub fn write_room(&self, id: ChannelId) -> usize {
        match self.get(id) {
            Ok(c) if Self::writable(c).is_ok() => c.credit() as usize,
            _ => 0,
        }
    }

    /// Writes up to the credit the peer granted; `Err(WouldBlock)` when there is none.
    pub fn write(&mut self, id: ChannelId, data: &[u8]) -> Result<usize, ChannelError> {
        let c = self.get_mut(id)?;
        if c.kind != ChannelKind::Stream {
            return Err(ChannelError::WrongKind(c.kind));
        }
        Self::writable(c)?;
        let n = (c.credit() as usize).min(data.len());
        if n == 0 && !data.is_empty() {
            return Err(ChannelError::WouldBlock);
        }
        c.tx.record(&data[..n]);
        self.queue_data(id);
        Ok(n)
    }

    /// Sends one whole message, or `Err(WouldBlock)` until the credit holds all of it.
    pub fn send_msg(&mut self, id: ChannelId, msg: &[u8]) -> Result<(), ChannelError> {
        let c = self.get_mut(id)?;
        if c.kind != ChannelKind::SeqPacket {
            return Err(ChannelError::WrongKind(c.kind));
        }
        Self::writable(c)?;
        if msg.is_empty() || msg.len() as u64 > c.window() {
            return Err(ChannelError::MessageSize {
                len: msg.len(),
                window: c.window() as u32,
            });
        }
        if (msg.len() as u64) > c.credit() || c.tx_msg_ends.len() >= MAX_MESSAGES_IN_FLIGHT {
            return Err(ChannelError::WouldBlock);
        }
        c.tx.record(msg);
        c.tx_msg_ends.push_back(c.tx.end());
        self.queue_data(id);
        Ok(())
    }

    fn readable(c: &Channel) -> Result<(), ChannelError> {
        if !c.rx.is_empty() {
            return Ok(());
        }
        match c.phase {
            Phase::Dead(s) if !c.at_eof() => Err(ChannelError::NotOpen(s)),
            _ if c.at_eof() => Ok(()),
            _ => Err(ChannelError::WouldBlock),
        }
    }

    fn consumed(&mut self, id: ChannelId, n: usize) {
        let Some(c) = self.channels.get_mut(&id) else {
            return;
        };
        let buf_alloc = u64::from(c.rx_window);
        c.consumed += n as u64;
        let unadvertised = c.consumed - c.advertised_consumed;
        if unadvertised > 0
            && matches!(c.phase, Phase::Open)
            && (c.rx.is_empty() || unadvertised >= buf_alloc / 4)
        {
            self.queue_ctrl(id, |c| c.credit = true);
        }
    }

    /// Reads buffered bytes: `Ok(0)` is the end of the stream (peer shut its write side or
    /// closed normally), `Err(WouldBlock)` means nothing yet. The bytes read are
    /// acknowledged to the peer, which forgets them.
    pub fn read(&mut self, id: ChannelId, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let c = Self::owned(&mut self.channels, id)?;
        if c.kind != ChannelKind::Stream {
            return Err(ChannelError::WrongKind(c.kind));
        }
        Self::readable(c)?;
        let n = c.rx.read(&mut self.rx_pool, buf);
        self.consumed(id, n);
        Ok(n)
    }

    /// Receives one whole message into `buf`: `Ok(Some(len))` with the message's full
    /// length (bytes beyond `buf` are discarded, as on a seqpacket socket), `Ok(None)` at
    /// the end, `Err(WouldBlock)` when no whole message is there yet.
    pub fn recv_msg(
        &mut self,
        id: ChannelId,
        buf: &mut [u8],
    ) -> Result<Option<usize>, ChannelError> {
        let c = Self::owned(&mut self.channels, id)?;
        if c.kind != ChannelKind::SeqPacket {
            return Err(ChannelError::WrongKind(c.kind));
        }
        let Some(&end) = c.rx_msg_ends.front() else {
            return match c.phase {
                _ if c.at_eof() || (c.rx.is_empty() && c.peer_shut_wr.is_some()) => Ok(None),
                Phase::Dead(s) => Err(ChannelError::NotOpen(s)),
                _ => Err(ChannelError::WouldBlock),
            };
        };
        let len = (end - c.consumed) as usize;
        let n = len.min(buf.len());
        c.rx.peek(&mut buf[..n]);
        c.rx.discard(&mut self.rx_pool, len);
        c.rx_msg_ends.pop_front();
        self.consumed(id, len);
        Ok(Some(len))
    }

    /// Half-closes: `rd` stops reading (buffered bytes are dropped and acknowledged),
    /// `wr` sends the end of the stream after the bytes already written.
    pub fn shutdown(&mut self, id: ChannelId, rd: bool, wr: bool) -> Result<(), ChannelError> {
        let c = Self::owned(&mut self.channels, id)?;
        if !matches!(
            c.phase,
            Phase::Open | Phase::Opening | Phase::AwaitingAccept
        ) {
            return Err(ChannelError::NotOpen(c.state()));
        }
        let mut changed = false;
        if rd && !c.shut_rd {
            c.shut_rd = true;
            changed = true;
        }
        if wr && c.shut_wr.is_none() {
            c.shut_wr = Some(c.tx.end());
            changed = true;
        }
        if changed {
            let dropped = c.rx.len();
            if rd {
                c.rx.clear(&mut self.rx_pool);
                c.rx_msg_ends.clear();
            }
            self.queue_ctrl(id, |c| c.shutdown = true);
            if rd {
                self.consumed(id, dropped);
            }
        }
        Ok(())
    }

    /// The owner lets go of the channel: unsent and unread bytes are dropped, the peer gets
    /// CLOSE (its reads end after what it already has). Releasing a dead channel only
    /// forgets it.
    pub fn close(&mut self, id: ChannelId) {
        self.close_with(id, CloseReason::Normal);
    }

    /// [`Endpoint::close`] telling the peer `reason` (its state becomes
    /// `Broken(PeerClosed(reason))`).
    pub fn close_with(&mut self, id: ChannelId, reason: CloseReason) {
        let Some(c) = self.channels.get_mut(&id) else {
            return;
        };
        match c.phase {
            Phase::Dead(_) => self.remove(id),
            Phase::Closing => {}
            Phase::Opening if c.ctrl.open => self.remove(id),
            _ => {
                c.phase = Phase::Closing;
                c.tx = ReplayBuffer::new(0);
                c.tx_msg_ends.clear();
                c.rx.clear(&mut self.rx_pool);
                c.rx_msg_ends.clear();
                c.ctrl = Ctrl::default();
                self.queue_ctrl(id, |c| c.close = Some(reason));
            }
        }
    }

    /// The next thing to act on.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.events.pop_front()?;
        if let Event::Changed(id) = e {
            if let Some(c) = self.channels.get_mut(&id) {
                c.in_events = false;
            }
        }
        Some(e)
    }

    // ---- time -------------------------------------------------------------------------

    /// The next instant [`Endpoint::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let mut t: Option<Millis> = None;
        let mut min = |m: Millis| t = Some(t.map_or(m, |x| x.min(m)));
        if let Some(l) = &self.link {
            min(l.last_rx.plus(self.cfg.keepalive_dead_ms));
            if l.hello_received && !l.ping_outstanding {
                min(l.last_tx.plus(self.cfg.keepalive_idle_ms));
            }
            if l.hello_received && l.probe.is_none() && !l.ping_due {
                min(l.next_probe);
            }
            if !l.hello_received {
                min(l.started.plus(self.cfg.keepalive_dead_ms));
            }
        }
        if let Some(since) = self.down_since {
            let waiting = self
                .channels
                .values()
                .filter(|c| !matches!(c.phase, Phase::Dead(_)));
            if let Some(c) = waiting.map(|c| c.created.max(since)).min() {
                min(c.plus(self.cfg.resume_timeout_ms));
            }
        }
        t
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Millis) {
        let dead_ms = self.cfg.keepalive_dead_ms;
        let idle_ms = self.cfg.keepalive_idle_ms;
        if let Some(l) = &mut self.link {
            let dead = now >= l.last_rx.plus(dead_ms)
                || (!l.hello_received && now >= l.started.plus(dead_ms));
            if !dead && l.hello_received && !l.ping_outstanding && now >= l.last_tx.plus(idle_ms) {
                l.ping_due = true;
            }
            if !dead && l.hello_received && l.probe.is_none() && now >= l.next_probe {
                l.ping_due = true;
            }
            if dead {
                self.disconnected(now);
                self.events.push_back(Event::LinkDead);
            }
        }
        if let Some(since) = self.down_since {
            let due: Vec<ChannelId> = self
                .channels
                .iter()
                .filter(|(_, c)| {
                    !matches!(c.phase, Phase::Dead(_))
                        && now >= c.created.max(since).plus(self.cfg.resume_timeout_ms)
                })
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                self.stats.timed_out_channels += 1;
                self.kill(id, ChannelState::TimedOut, None);
            }
            if self
                .channels
                .values()
                .all(|c| matches!(c.phase, Phase::Dead(_)))
            {
                // Nothing of this incarnation pair is left to resume.
                self.peer_incarnation = None;
            }
        }
    }

    // ---- receiving --------------------------------------------------------------------

    /// Bytes from the transport. On `Err` the endpoint has already dropped the connection
    /// (the caller closes the transport and may reconnect).
    pub fn handle_bytes(&mut self, now: Millis, mut input: &[u8]) -> Result<(), LinkError> {
        let Some(link) = &mut self.link else {
            return Ok(());
        };
        if !input.is_empty() {
            link.last_rx = now;
            link.ping_outstanding = false;
        }
        let r = (|| {
            let link = self.link.as_mut().expect("link");
            let mut partial = std::mem::take(&mut link.partial);
            let mut rx_data = link.rx_data.take();
            while !input.is_empty() {
                if let Some(d) = &mut rx_data {
                    let n = d.remaining.min(input.len());
                    let (chunk, rest) = input.split_at(n);
                    input = rest;
                    d.remaining -= n;
                    if d.deliver {
                        self.data_payload(d.channel, chunk);
                    }
                    if d.remaining == 0 {
                        if d.deliver {
                            self.data_end(d.channel, d.eor, d.start);
                        }
                        rx_data = None;
                    }
                } else if partial.is_empty() {
                    if let Some((f, used)) = wire::decode(input)? {
                        self.handle_frame(now, f)?;
                        input = &input[used..];
                    } else if let Some(ds) = wire::decode_data_start(input)? {
                        rx_data = Some(self.data_start(ds)?);
                        input = &input[wire::DATA_PREFIX_LEN..];
                    } else {
                        partial.extend_from_slice(input);
                        input = &[];
                    }
                } else {
                    // Complete the header, then a DATA frame's prefix or the whole frame
                    // (`decode` checked the length before it is used here).
                    let need = if partial.len() < wire::HEADER_LEN {
                        wire::HEADER_LEN - partial.len()
                    } else {
                        let len =
                            u32::from_le_bytes([partial[8], partial[9], partial[10], partial[11]]);
                        let total = wire::HEADER_LEN + len as usize;
                        if partial[0] == 5 {
                            total.min(wire::DATA_PREFIX_LEN) - partial.len()
                        } else {
                            total - partial.len()
                        }
                    };
                    let take = need.min(input.len());
                    partial.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if let Some((f, _)) = wire::decode(&partial)? {
                        self.handle_frame(now, f)?;
                        partial.clear();
                    } else if let Some(ds) = wire::decode_data_start(&partial)? {
                        rx_data = Some(self.data_start(ds)?);
                        partial.clear();
                    }
                }
            }
            if let Some(l) = &mut self.link {
                l.partial = partial;
                l.rx_data = rx_data;
            }
            Ok(())
        })();
        if r.is_err() {
            self.disconnected(now);
        }
        r
    }

    fn handle_frame(&mut self, now: Millis, f: Frame<'_>) -> Result<(), LinkError> {
        self.stats.frames_received += 1;
        let link = self.link.as_mut().expect("frames only arrive on a link");
        if let Frame::Hello {
            host,
            incarnation,
            resume,
        } = f
        {
            if link.hello_received {
                return Err(LinkError::OutOfOrder("second HELLO"));
            }
            if host != self.peer_host {
                return Err(LinkError::WrongHost {
                    got: host,
                    expected: self.peer_host.clone(),
                });
            }
            link.hello_received = true;
            return self.handle_hello(now, incarnation, &resume);
        }
        if !link.hello_received {
            return Err(LinkError::OutOfOrder("frame before HELLO"));
        }
        match f {
            Frame::Hello { .. } => unreachable!("handled above"),
            Frame::Ping { nonce } => link.pong_due = Some(nonce),
            Frame::Pong { nonce } => {
                link.ping_outstanding = false;
                if let Some((probe, sent)) = link.probe {
                    if probe == nonce {
                        link.probe = None;
                        let sample = now.0.saturating_sub(sent.0);
                        self.srtt_ms = Some(match self.srtt_ms {
                            None => sample,
                            Some(s) => (7 * s + sample).div_ceil(8),
                        });
                    }
                }
            }
            Frame::Open {
                channel,
                kind,
                buf_alloc,
                metadata,
            } => {
                if (channel.0 % 2 == 0) == self.dials() {
                    return Err(LinkError::WrongParity(channel));
                }
                match self.channels.get(&channel).map(|c| c.phase) {
                    Some(Phase::Open) => self.queue_ctrl(channel, |c| c.opened = true),
                    Some(_) => {}
                    None if self.channels.len() >= self.cfg.max_channels => {
                        self.orphan(Orphan::Refused(
                            channel,
                            RefusalCode::TooMany,
                            format!("{} channels", self.channels.len()),
                        ))?;
                    }
                    None => {
                        let mut c = Channel::new(
                            kind,
                            false,
                            Phase::AwaitingAccept,
                            now,
                            Vec::new(),
                            self.cfg.buf_alloc_bytes,
                            self.cfg.max_window_bytes,
                        );
                        c.set_peer_window(buf_alloc);
                        self.channels.insert(channel, c);
                        self.events.push_back(Event::IncomingOpen {
                            channel,
                            kind,
                            metadata: metadata.to_vec(),
                        });
                    }
                }
            }
            Frame::Opened { channel, buf_alloc } => {
                if let Some(c) = self.channels.get_mut(&channel) {
                    if c.ours && c.phase == Phase::Opening {
                        c.phase = Phase::Open;
                        c.metadata = Vec::new();
                        c.set_peer_window(buf_alloc);
                        if c.shut_wr.is_some() || c.shut_rd {
                            self.queue_ctrl(channel, |c| c.shutdown = true);
                        }
                        self.queue_data(channel);
                        self.mark_changed(channel);
                    }
                }
            }
            Frame::Refused { channel, code, .. } => {
                if let Some(c) = self.channels.get(&channel) {
                    if c.ours && c.phase == Phase::Opening {
                        self.kill(channel, ChannelState::Refused(code), None);
                    } else if c.ours && c.phase == Phase::Closing {
                        self.remove(channel);
                    }
                }
            }
            Frame::Data {
                channel,
                offset,
                eor,
                bytes,
            } => self.handle_data(channel, offset, eor, bytes),
            Frame::Credit {
                channel,
                received,
                consumed,
                buf_alloc,
            } => {
                let Some(c) = self.channels.get_mut(&channel) else {
                    return Ok(());
                };
                if c.phase != Phase::Open {
                    return Ok(());
                }
                if consumed > received
                    || received > c.tx.end().max(c.peer_consumed)
                    || consumed < c.peer_consumed
                {
                    self.violation(channel);
                    return Ok(());
                }
                let had_room = c.credit() > 0;
                c.peer_consumed = consumed;
                c.tx.ack(consumed);
                while c.tx_msg_ends.front().is_some_and(|&e| e <= consumed) {
                    c.tx_msg_ends.pop_front();
                }
                c.set_peer_window(buf_alloc);
                if (c.credit() > 0 && !had_room) || c.tx.is_empty() {
                    self.mark_changed(channel);
                }
            }
            Frame::Shutdown {
                channel,
                rd,
                wr,
                end,
            } => {
                let Some(c) = self.channels.get_mut(&channel) else {
                    return Ok(());
                };
                if c.phase != Phase::Open {
                    return Ok(());
                }
                if wr && (end < c.received || c.peer_shut_wr.is_some_and(|e| e != end)) {
                    self.violation(channel);
                    return Ok(());
                }
                let before = (c.peer_shut_rd, c.peer_shut_wr);
                c.peer_shut_rd |= rd;
                if wr {
                    c.peer_shut_wr = Some(end);
                }
                if before != (c.peer_shut_rd, c.peer_shut_wr) {
                    self.mark_changed(channel);
                }
            }
            Frame::Close { channel, reason } => {
                match self.channels.get(&channel).map(|c| c.phase) {
                    Some(Phase::Closing) => self.remove(channel),
                    Some(Phase::Dead(_)) | None => {}
                    Some(_) => self.kill(
                        channel,
                        ChannelState::Broken(BrokenReason::PeerClosed(reason)),
                        Some(CloseReason::Normal),
                    ),
                }
            }
        }
        Ok(())
    }

    fn handle_data(&mut self, id: ChannelId, offset: u64, eor: bool, bytes: &[u8]) {
        if self.data_accepted(id, offset, eor, bytes.len()) {
            let start = self.rx_start(id);
            self.data_payload(id, bytes);
            self.data_end(id, eor, start);
        }
    }

    fn rx_start(&self, id: ChannelId) -> RxStart {
        self.channels
            .get(&id)
            .map_or(RxStart::default(), |c| RxStart {
                rx_empty: c.rx.is_empty(),
                consumed: c.consumed,
            })
    }

    /// A DATA frame's header arrived before all of its payload.
    fn data_start(&mut self, ds: wire::DataStart) -> Result<RxData, LinkError> {
        self.stats.frames_received += 1;
        if !self.link.as_ref().is_some_and(|l| l.hello_received) {
            return Err(LinkError::OutOfOrder("frame before HELLO"));
        }
        let deliver = self.data_accepted(ds.channel, ds.offset, ds.eor, ds.len);
        Ok(RxData {
            channel: ds.channel,
            eor: ds.eor,
            remaining: ds.len,
            deliver,
            start: self.rx_start(ds.channel),
        })
    }

    /// Whether a DATA frame of `len` payload bytes at `offset` is taken; a frame that
    /// breaks the channel's protocol resets the channel.
    fn data_accepted(&mut self, id: ChannelId, offset: u64, eor: bool, len: usize) -> bool {
        let Some(c) = self.channels.get_mut(&id) else {
            return false;
        };
        match c.phase {
            Phase::Open => {}
            Phase::Closing | Phase::Dead(_) => return false,
            Phase::Opening | Phase::AwaitingAccept => {
                self.violation(id);
                return false;
            }
        }
        let len = len as u64;
        let over = c.received - c.consumed + len > u64::from(c.rx_window);
        let past_end = c.peer_shut_wr.is_some_and(|e| c.received + len > e);
        let too_many = eor && c.rx_msg_ends.len() >= MAX_MESSAGES_IN_FLIGHT;
        if offset != c.received || over || past_end || too_many {
            self.violation(id);
            return false;
        }
        true
    }

    /// Payload of an accepted DATA frame (all of it, or the next part).
    fn data_payload(&mut self, id: ChannelId, bytes: &[u8]) {
        let Some(c) = self.channels.get_mut(&id) else {
            return;
        };
        // Closed or reset by the owner since the frame began: the rest is dropped.
        if c.phase != Phase::Open {
            return;
        }
        c.received += bytes.len() as u64;
        if c.shut_rd {
            // Read side shut: take and acknowledge, as a socket discards.
            self.consumed(id, bytes.len());
            return;
        }
        c.rx.push(&mut self.rx_pool, bytes);
    }

    /// The last payload byte of an accepted DATA frame arrived. The owner hears of a
    /// frame's bytes once, here (they could be read as they came): a reader woken per
    /// TLS record would read, and return credit, a quarter frame at a time. It hears
    /// when it may be waiting: the buffer was empty when the frame began, or it has read
    /// since.
    fn data_end(&mut self, id: ChannelId, eor: bool, start: RxStart) {
        let Some(c) = self.channels.get_mut(&id) else {
            return;
        };
        if c.phase != Phase::Open || c.shut_rd {
            return;
        }
        match c.kind {
            ChannelKind::Stream => {
                let waiting = start.rx_empty || c.consumed != start.consumed;
                if waiting && !c.rx.is_empty() {
                    self.mark_changed(id);
                }
            }
            ChannelKind::SeqPacket if eor => {
                c.rx_msg_ends.push_back(c.received);
                self.mark_changed(id);
            }
            ChannelKind::SeqPacket => {}
        }
    }

    fn handle_hello(
        &mut self,
        now: Millis,
        incarnation: Incarnation,
        resume: &[ResumeEntry],
    ) -> Result<(), LinkError> {
        let fresh = self.peer_incarnation != Some(incarnation);
        if fresh && self.peer_incarnation.is_some() {
            let ids: Vec<ChannelId> = self.channels.keys().copied().collect();
            for id in ids {
                match self.channels[&id].phase {
                    Phase::Dead(_) => {}
                    // Never reached the old peer as far as we know: offer it to the new one.
                    Phase::Opening => {}
                    _ => self.kill(id, ChannelState::Broken(BrokenReason::PeerRestarted), None),
                }
            }
        } else if !fresh {
            self.stats.resumes += 1;
        }
        self.peer_incarnation = Some(incarnation);
        self.down_since = None;
        let theirs: BTreeMap<ChannelId, ResumeEntry> =
            resume.iter().map(|e| (e.channel, *e)).collect();
        let ids: Vec<ChannelId> = self.channels.keys().copied().collect();
        for id in ids {
            let entry = theirs.get(&id).copied();
            let c = self.channels.get_mut(&id).expect("listed");
            match (c.phase, entry) {
                (Phase::Dead(_), _) => {}
                (Phase::Opening, None) => self.queue_ctrl(id, |c| c.open = true),
                (Phase::Opening, Some(_)) => {}
                (Phase::Closing, None) => self.remove(id),
                (Phase::Closing, Some(_)) => {
                    self.queue_ctrl(id, |c| c.close = Some(CloseReason::Normal))
                }
                (Phase::AwaitingAccept | Phase::Open, None) => {
                    self.kill(id, ChannelState::Broken(BrokenReason::PeerForgot), None)
                }
                (Phase::AwaitingAccept, Some(_)) => {}
                (Phase::Open, Some(e)) => {
                    if e.received < c.peer_consumed || e.received > c.tx.end().max(c.peer_consumed)
                    {
                        self.kill(
                            id,
                            ChannelState::Broken(BrokenReason::ResumeImpossible),
                            Some(CloseReason::ResumeImpossible),
                        );
                        continue;
                    }
                    if c.tx_next > e.received {
                        self.stats.retransmitted_bytes += c.tx_next - e.received;
                    }
                    c.tx_next = e.received;
                    let shut = c.shut_rd || c.shut_wr.is_some();
                    let reopen = e.opening && !c.ours;
                    self.queue_ctrl(id, |ctl| {
                        ctl.credit = true;
                        ctl.shutdown |= shut;
                        ctl.opened |= reopen;
                    });
                    self.queue_data(id);
                }
            }
        }
        for e in resume {
            let known = self
                .channels
                .get(&e.channel)
                .is_some_and(|c| !matches!(c.phase, Phase::Dead(_)));
            if !known && !e.opening {
                self.orphan(Orphan::Close(e.channel, CloseReason::Unknown))?;
            }
        }
        let _ = now;
        self.events.push_back(Event::Up { fresh });
        Ok(())
    }

    // ---- sending ----------------------------------------------------------------------

    /// Appends frames to `out` until it holds at least `budget` bytes or nothing is left:
    /// control frames first, then DATA from the channels in round-robin order, one frame
    /// (at most [`MAX_DATA_LEN`]) per channel per turn.
    pub fn poll_transmit(&mut self, now: Millis, out: &mut Vec<u8>, budget: usize) {
        self.poll_transmit_into(now, out, budget);
    }

    /// [`Endpoint::poll_transmit`] into any [`TransmitSink`], until it has taken at least
    /// `budget` bytes or nothing is left. DATA payloads go to the sink as slices of the
    /// replay buffer, so a sink that encrypts (TLS) reads them from there and they are
    /// not copied into a frame buffer first.
    pub fn poll_transmit_into(&mut self, now: Millis, sink: &mut impl TransmitSink, budget: usize) {
        let mut ctl = std::mem::take(&mut self.tx_scratch);
        ctl.clear();
        self.transmit_frames(now, sink, &mut ctl, budget);
        if !ctl.is_empty() {
            sink.put(&[&ctl]);
            ctl.clear();
        }
        self.tx_scratch = ctl;
    }

    /// Encodes control frames into `ctl` and hands them to `sink` ahead of each DATA
    /// frame (the caller flushes what is left in `ctl`).
    fn transmit_frames(
        &mut self,
        now: Millis,
        sink: &mut impl TransmitSink,
        ctl: &mut Vec<u8>,
        budget: usize,
    ) {
        let out = ctl;
        let frames_before = self.stats.frames_sent;
        let Some(link) = &mut self.link else {
            return;
        };
        if !link.hello_sent {
            link.hello_sent = true;
            let resume = self
                .channels
                .iter()
                .filter_map(|(id, c)| match c.phase {
                    Phase::Dead(_) => None,
                    Phase::Opening if c.ctrl.open => None,
                    p => Some(ResumeEntry {
                        channel: *id,
                        opening: p == Phase::Opening,
                        received: c.received,
                    }),
                })
                .collect();
            Frame::Hello {
                host: self.local_host.clone(),
                incarnation: self.incarnation,
                resume,
            }
            .encode(out);
            self.stats.frames_sent += 1;
        }
        let link = self.link.as_mut().expect("checked");
        if !link.hello_received {
            if self.stats.frames_sent != frames_before {
                link.last_tx = now;
            }
            return;
        }
        if let Some(nonce) = link.pong_due.take() {
            Frame::Pong { nonce }.encode(out);
            self.stats.frames_sent += 1;
        }
        if link.ping_due {
            link.ping_due = false;
            link.ping_outstanding = true;
            self.ping_nonce += 1;
            if link.probe.is_none() {
                link.probe = Some((self.ping_nonce, now));
                link.next_probe = now.plus(RTT_PROBE_INTERVAL_MS);
            }
            Frame::Ping {
                nonce: self.ping_nonce,
            }
            .encode(out);
            self.stats.frames_sent += 1;
        }
        while sink.taken() + out.len() < budget {
            let Some(o) = self.orphans.pop_front() else {
                break;
            };
            match o {
                Orphan::Refused(channel, code, text) => Frame::Refused {
                    channel,
                    code,
                    text: &text,
                }
                .encode(out),
                Orphan::Close(channel, reason) => Frame::Close { channel, reason }.encode(out),
            }
            self.stats.frames_sent += 1;
        }
        while sink.taken() + out.len() < budget {
            let Some(id) = self.ctrl_queue.pop_front() else {
                break;
            };
            let open_window = self.cfg.buf_alloc_bytes;
            if self.channels.get(&id).is_some_and(|c| c.ctrl.credit) {
                self.autotune(id, now);
            }
            let Some(c) = self.channels.get_mut(&id) else {
                continue;
            };
            c.in_ctrl_queue = false;
            let ctl = std::mem::take(&mut c.ctrl);
            let mut n = 0;
            if ctl.open && c.phase == Phase::Opening {
                Frame::Open {
                    channel: id,
                    kind: c.kind,
                    buf_alloc: open_window,
                    metadata: &c.metadata,
                }
                .encode(out);
                n += 1;
            }
            if ctl.opened && c.phase == Phase::Open {
                Frame::Opened {
                    channel: id,
                    buf_alloc: c.rx_window,
                }
                .encode(out);
                n += 1;
            }
            if ctl.credit && c.phase == Phase::Open {
                c.advertised_consumed = c.consumed;
                Frame::Credit {
                    channel: id,
                    received: c.received,
                    consumed: c.consumed,
                    buf_alloc: c.rx_window,
                }
                .encode(out);
                n += 1;
            }
            if ctl.shutdown && c.phase == Phase::Open {
                Frame::Shutdown {
                    channel: id,
                    rd: c.shut_rd,
                    wr: c.shut_wr.is_some(),
                    end: c.shut_wr.unwrap_or(0),
                }
                .encode(out);
                n += 1;
            }
            if let Some(reason) = ctl.close {
                Frame::Close {
                    channel: id,
                    reason,
                }
                .encode(out);
                n += 1;
            }
            self.stats.frames_sent += n;
        }
        while sink.taken() + out.len() < budget {
            let Some(id) = self.data_queue.pop_front() else {
                break;
            };
            let Some(c) = self.channels.get_mut(&id) else {
                continue;
            };
            c.in_data_queue = false;
            if !c.has_tx() {
                continue;
            }
            let from = c.tx_next;
            let mut to = c.tx.end().min(from + MAX_DATA_LEN as u64);
            let mut eor = false;
            if c.kind == ChannelKind::SeqPacket {
                let i = c.tx_msg_ends.partition_point(|&e| e <= from);
                if let Some(&e) = c.tx_msg_ends.get(i) {
                    if e <= to {
                        to = e;
                        eor = true;
                    }
                }
            }
            let (a, b) = c.tx.slices_from(from);
            // `from` is never below the ring's start (resume checks the peer's count);
            // clamping keeps a broken invariant from becoming an out-of-bounds slice.
            let n = ((to - from) as usize).min(a.len() + b.len());
            if n == 0 {
                continue;
            }
            let na = n.min(a.len());
            let prefix = wire::data_prefix(id, from, eor, n);
            sink.put(&[out, &prefix, &a[..na], &b[..n - na]]);
            out.clear();
            self.stats.frames_sent += 1;
            c.tx_next = to;
            if c.has_tx() {
                c.in_data_queue = true;
                self.data_queue.push_back(id);
            }
        }
        if self.stats.frames_sent != frames_before {
            if let Some(l) = &mut self.link {
                l.last_tx = now;
            }
        }
    }

    /// Whether [`Endpoint::poll_transmit`] has anything to send.
    pub fn wants_transmit(&self) -> bool {
        match &self.link {
            None => false,
            Some(l) if !l.hello_sent => true,
            Some(l) if !l.hello_received => false,
            Some(l) => {
                l.pong_due.is_some()
                    || l.ping_due
                    || !self.orphans.is_empty()
                    || !self.ctrl_queue.is_empty()
                    || !self.data_queue.is_empty()
            }
        }
    }
}
