//! Every tunable of the daemon in one place, with units in the names.

/// Largest payload accepted in one TX packet. Linux sends at most 64 KiB; a larger claim is
/// rejected at the header.
pub const MAX_PAYLOAD_BYTES: u32 = 64 * 1024;
/// Largest payload put in one RX packet (the guest's buffers usually bound it first).
pub const MAX_RX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Host connections waiting for their `CONNECT` line, per VM.
pub const MAX_PENDING_HANDSHAKES: usize = 128;
/// How long a host connection may take to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// How long a stopped device's connections may keep flushing guest data the host had not
/// taken yet, before they are closed and the rest is counted as lost.
pub const LINGER_TIMEOUT_MS: u64 = 10_000;
/// Send buffer requested for host sockets (capped by `net.core.wmem_max`).
pub const HOST_SEND_BUFFER_BYTES: usize = 1024 * 1024;
/// A busy-poll run ends after this many windows even while work keeps arriving, so the
/// vhost-user thread never waits long for the data plane's lock.
pub const BUSY_POLL_MAX_WINDOWS: u32 = 20;
/// Payload (plus headers) a receiving guest's backlog may hold when its RX ring is full;
/// a connection whose packet would overflow it is reset.
pub const G2G_BACKLOG_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Bytes all receivers' backlogs may hold together.
pub const G2G_BACKLOG_TOTAL_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Largest receive window forwarded to a guest-to-guest sender (its peer may advertise
/// more; the sender is told less, which bounds what one connection can have in flight).
pub const MAX_RELAY_WINDOW_BYTES: u32 = 1024 * 1024;
/// Relayed (guest-to-guest) connections one VM may take part in.
pub const MAX_RELAY_CONNS_PER_DOMAIN: usize = 1024;
/// Open control-service connections per VM.
pub const MAX_CONTROL_CONNS_PER_VM: usize = 8;
/// A control-service connection idle this long is closed.
pub const CONTROL_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Warnings a guest can trigger at will (denied connections) logged per VM and second;
/// the rest are only counted.
pub const MAX_GUEST_WARNINGS_PER_SEC: u32 = 10;
/// RX buffers one `readv` from a host socket may fill (when the last read of that socket
/// filled its buffer, so more data is likely waiting).
pub const RX_BATCH_MAX_CHAINS: usize = 16;

/// Sessions (live and parked) one VM may hold.
pub const MAX_SESSIONS_PER_VM: usize = 256;
/// Replay buffer of one session's host->guest direction: what was sent to the guest and
/// not yet consumed by it, plus what a parked session read from its host socket. Equal to
/// the guest kernel's default receive buffer, so it limits nothing in the default setup.
pub const SESSION_REPLAY_BYTES: usize = 256 * 1024;
/// Expired session ids remembered per VM, so a late RESUME learns why it failed.
pub const SESSION_TOMBSTONES: usize = 256;
/// Guest ports one VM may register as session listeners.
pub const MAX_SESSION_LISTENERS_PER_VM: usize = 64;
/// Sibling sessions waiting for one VM's engine to dial its guest.
pub const MAX_PENDING_PROXY_DIALS: usize = 64;
/// A session-port connection whose first frame is not complete after this long is reset
/// (a guest must not hold connections open with half a greeting).
pub const SESSION_GREETING_TIMEOUT_MS: u64 = 5_000;
/// Session-port connections of one VM still in their greeting at once; more are refused.
pub const MAX_PENDING_SESSION_GREETINGS: usize = 64;
/// Longest configurable session park timeout (a day).
pub const MAX_SESSION_PARK_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// Longest replay tail a session may bring when it moves between hosts. Moving on to
/// another guest host, the tail is only what the session's engine held (at most its
/// replay buffer, [`SESSION_REPLAY_BYTES`]): the relays' bytes in flight follow it as
/// data on the new channel. Coming home, the home's engine takes them all in the tail:
/// with every buffer full that is, on the guest relay's side, its socket pair
/// ([`RELAY_SEND_BUFFER`], doubled by the kernel), one DATA payload queued for the pair and its channel
/// read buffer (up to one frame each), and on the home's side the channel's window
/// (up to [`RELAY_CHANNEL_MAX_WINDOW_BYTES`]) and one frame it had not written yet: with
/// 256 KiB windows that measured 1,085,120 bytes (which a 1 MiB limit refused, losing the
/// session, before re-roots sent the bytes as data). A home sending a session away again
/// puts at most 256 KiB of tail in the snapshot and the rest after it as data, so a guest
/// that reads nothing across several moves home and away no longer grows its tail
/// (measured: 896,064 bytes at every homecoming of a->b->a->b->a->b->a).
pub const RELAY_MAX_TAIL_BYTES: usize = 4 * 1024 * 1024;
/// Send buffer of a guest relay's end of its socket pair into the engine (the
/// host->guest direction), and of a placeholder's engine end; the kernel doubles it. What
/// it holds when the session is handed off travels in the snapshot's tail.
pub const RELAY_SEND_BUFFER: usize = 256 * 1024;
/// The receive window a relay channel may grow to (`ChannelEnd::set_max_window`, both
/// ends), from its opening window (the tunnel's `window-bytes`, 128 KiB by default) by
/// the tunnel's autotuning. At 256 KiB a relayed session ran at about half the rate it
/// runs at with 2 MiB on two cores (README, "Sessions across hosts"). What a home holds
/// unacknowledged for a session, and so what a move carries in its tail, must stay
/// within [`RELAY_MAX_TAIL_BYTES`] (asserted below); a handoff's `pending` does not
/// depend on it (what the guest relay read and did not write: its pair, one payload and
/// one read ahead). (A first try at 2 MiB lost sessions that moved with every buffer
/// full: not a bound, but the relay's socket read, which after a switch read into the
/// whole carry-over buffer and made DATA frames over `MAX_DATA`; fixed.)
pub const RELAY_CHANNEL_MAX_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
const _: () = assert!(
    RELAY_MAX_TAIL_BYTES
        >= SESSION_REPLAY_BYTES
            + 2 * RELAY_SEND_BUFFER
            + 3 * (domsock_migration::relay::MAX_DATA + domsock_migration::relay::FRAME_HEADER_LEN)
            + RELAY_CHANNEL_MAX_WINDOW_BYTES as usize
);
/// Most bytes one half of a sibling pair may hold while the pair is joined (what was in
/// flight towards its guest when both engines stopped feeding the relayed path), and so
/// the most an engine takes in front of its new host end. In flight per direction at the
/// swap, every buffer full: the engine's old pair end and its peer
/// ([`RELAY_SEND_BUFFER`], doubled; a Unix socket pair's default on the far side), the guest relays' queued
/// payloads and read buffers (a frame each), the two home relays' frames and the home's
/// pair, the two channel windows (up to [`RELAY_CHANNEL_MAX_WINDOW_BYTES`] each) and the placeholder the other engine
/// wrote into (its send buffer), plus the replay tail the receiving engine read before
/// it parked: measured up to 2.9 MiB with 256 KiB windows (a guest that had stopped
/// reading); windows grown to 2 MiB add up to 3.5 MiB, so the bound leaves room. Only a
/// join in progress holds it. A half that would hold more stops
/// reading its channel (the join then times out and fails, see the relay module).
pub const JOIN_MAX_HELD_BYTES: usize = 12 * 1024 * 1024;
/// How long a join may take from both JOINs to both engines swapped.
pub const JOIN_TIMEOUT_MS: u64 = 10_000;
/// Sessions carried by relays on one host at once (both kinds).
pub const MAX_RELAYED_SESSIONS: usize = 1024;
/// How long one relay step (an import answered, a handoff answered) may take.
pub const RELAY_STEP_TIMEOUT_MS: u64 = 10_000;
/// How long an `adopt` lets peers bring a domain's sessions here.
pub const ADOPTION_WINDOW_MS: u64 = 10 * 60 * 1000;
