//! The domsockd-to-domsockd tunnel protocol: many channels (sessions) of one pair of hosts
//! multiplexed over one TCP (TLS) connection, with per-channel credit flow control,
//! keepalives, and resumption across TCP reconnects with no byte lost or repeated.
//!
//! Sans-IO, in the quinn-proto style: [`endpoint::Endpoint`] takes bytes, time
//! ([`endpoint::Millis`]) and owner calls, and hands out bytes to send and events. The
//! runtime (`domsock_host::tunnel`) owns sockets, TLS, threads and clocks.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant A as host "a" (dials: name sorts lower)
//!     participant B as host "b"
//!     A->>B: TCP connect + TLS 1.3, both present certificates of the lab CA
//!     A->>B: HELLO v1 "a", incarnation Ia, resume=[]
//!     B->>A: HELLO v1 "b", incarnation Ib, resume=[]
//!     A->>B: OPEN ch=2 stream buf_alloc=1M metadata
//!     B->>A: OPENED ch=2 buf_alloc=1M
//!     A->>B: DATA ch=2 offset=0 (<= 64 KiB), DATA ch=4 ..., DATA ch=2 offset=65536 (round robin)
//!     B->>A: CREDIT ch=2 received, consumed, buf_alloc (ack: A forgets up to consumed)
//!     Note over A,B: TCP connection cut: both keep their channels, unacknowledged bytes and a timer
//!     A->>B: TCP connect + TLS
//!     A->>B: HELLO "a", Ia, resume=[ch 2: received=r_a]
//!     B->>A: HELLO "b", Ib, resume=[ch 2: received=r_b]
//!     A->>B: DATA ch=2 offset=r_b ... (exactly the missing tail)
//!     B->>A: DATA ch=2 offset=r_a ...
//!     Note over A,B: no HELLO within the resume timeout: every channel ends TimedOut
//! ```
//!
//! **Flow control** is vsock's: a receiver grants `buf_alloc` bytes per channel; a sender
//! keeps at most `buf_alloc` bytes that the receiver's owner has not consumed
//! (`sent - consumed <= buf_alloc`), so the receiver never buffers more than it granted
//! and never has to stop reading the TCP stream; a stalled channel stalls only itself.
//! CREDIT doubles as the acknowledgement: bytes are acknowledged only once the owner has
//! read them, and the sender keeps unacknowledged bytes in a
//! [`crate::session::replay::ReplayBuffer`] (its size is the credit window).
//!
//! **Window autotuning.** A channel's receive window starts at `buf_alloc_bytes` (128
//! KiB) and the receiver doubles it, up to `max_window_bytes` (4 MiB), when its owner
//! reads a whole window within two round trips (at least 1 ms, the clock's resolution):
//! then the window, not the reader, limits the channel (its throughput is at most one
//! window per credit round trip). A window grows only while the sum of all channels'
//! windows towards the peer stays within `window_budget_bytes` (64 MiB; windows at the
//! configured size are always granted). A reader that reads nothing never grows its
//! window, a slow one neither, and a grown window is never shrunk (the channel gives its
//! share back when it ends), so the receiver's bound is always the largest window it
//! advertised. The round trip is the smoothed time from PING to PONG: the endpoint sends
//! a PING at least every [`endpoint::RTT_PROBE_INTERVAL_MS`] while up. The sender learns
//! the window from every CREDIT (`buf_alloc`, a field of version 1: a version-1 peer
//! that never grows is understood, and one that ignores growth just uses less); its
//! replay ring grows with it, up to [`endpoint::MAX_WINDOW_BYTES`].
//!
//! **Resumption.** Every channel is identified by (tunnel peer, channel id) and carries
//! absolute stream offsets (DATA carries its offset), so "continue channel X at offset N"
//! is the only operation a reconnect needs (and what a later re-attach on another host
//! needs too). A HELLO with a changed incarnation means the peer restarted: its channels
//! end [`endpoint::BrokenReason::PeerRestarted`].
//!
//! **Errors the owner sees** ([`endpoint::ChannelState`]): `Refused(code)` (the peer's
//! engine said no), `Broken(PeerClosed(reason))` (the peer closed or reset it),
//! `Broken(Violation)` (this end reset it: the peer broke flow control or offsets),
//! `Broken(PeerForgot | PeerRestarted | ResumeImpossible)` (after a reconnect), and
//! `TimedOut` (no connection within the resume timeout; each end's own timer fires, so
//! both ends report it when the tunnel stays down).
//!
//! **Bounds**: frames <= [`wire::MAX_FRAME_LEN`], metadata <= [`wire::MAX_METADATA_LEN`],
//! channels <= [`wire::MAX_CHANNELS`] per tunnel, seqpacket messages in flight <=
//! [`endpoint::MAX_MESSAGES_IN_FLIGHT`], replay window <= [`endpoint::MAX_WINDOW_BYTES`],
//! control frames are per-channel flags (no unbounded queue), stateless answers bounded.
//! The wire format is in [`wire`].
//!
//! What this module does not do: sockets, TLS, certificates, choosing what a channel
//! connects to (the engine decides from the metadata), randomness (the caller brings the
//! incarnation).

pub mod endpoint;
pub mod rxbuf;
pub mod wire;

pub use endpoint::{
    BrokenReason, ChannelCounters, ChannelError, ChannelState, Endpoint, EndpointConfig,
    EndpointStats, Event, LinkError, Millis, OpenError, RxMemory, TransmitSink,
};
pub use wire::{ChannelId, ChannelKind, CloseReason, Incarnation, RefusalCode};

#[cfg(test)]
mod tests;
