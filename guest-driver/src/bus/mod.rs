//! Bus members for guests and host processes: [`BusMember`] joins (or creates) a bus of
//! domsockd's bus service and publishes, subscribes and receives over one connected
//! seqpacket socket, speaking [wire format version 1](domsock_proto::bus).
//!
//! A guest reaches the service over AF_VSOCK `SOCK_SEQPACKET` to the host (CID 2) at port
//! [`BUS_PORT`] ([`BusMember::join_guest`]); a host process over the Unix `SOCK_SEQPACKET`
//! socket `<bus-dir>/<namespace>.sock` ([`BusMember::join_host`]). Any other connected
//! seqpacket socket works too ([`BusMember::join_over`], e.g. one end of a socketpair in a
//! test); the member redials through its [`BusDialer`] only to [`BusMember::rejoin`].
//!
//! Protocol primer (the module doc of [`domsock_proto::bus`] is the spec):
//!
//! ```text
//!   member                      bus service
//!     | JOIN name want [create]      |
//!     |----------------------------->|
//!     |   JOINED id policy token ... | (or REFUSED code text, and the service closes)
//!     |<-----------------------------|
//!     | SUBSCRIBE prefix  (topic)    |
//!     |----------------------------->|
//!     |        SUBSCRIBED prefix     | (or ERROR: the membership stays)
//!     |<-----------------------------|
//!     | PUBLISH fields payload       |  MESSAGE sender seq fields payload, LOSS n bytes
//!     |----------------------------->|<- - - - (from the other members, any time)
//!     x  connection lost (device gone): the membership stays parked, queued up to its bound
//!     | REJOIN token (new connection)|
//!     |----------------------------->|
//!     |  JOINED same id, lost=n      | then what was queued for it
//!     |<-----------------------------|
//! ```
//!
//! **Every byte from the service is validated** before the caller sees it: the frame
//! decodes ([`ServiceFrame::decode`]), fits the receive buffer (sized from the bus's
//! `max_message` in JOINED, itself bounded by [`MAX_MESSAGE_LIMIT_BYTES`]), carries the
//! fields of the bus's policy and a payload within `max_message`, a sequence number from 1,
//! a sender other than this member; JOINED and REFUSED come only as the answer to JOIN or
//! REJOIN (a REJOIN must give back the same membership); a SUBSCRIBED answers the oldest
//! subscription request still open. A violation ends the connection with
//! [`BusError::Protocol`]; nothing a service sends can panic the member or grow its
//! memory past the bounds below.
//!
//! **Non-blocking use**: the socket is non-blocking; poll [`BusMember::poll_fd`] for
//! readability and call [`BusMember::try_recv`] until it returns `None`;
//! [`BusMember::try_publish`] returns `false` instead of waiting when the socket is full;
//! [`BusMember::send_subscribe`] returns at once and the answer comes as an event. The
//! blocking calls ([`BusMember::recv`], [`BusMember::recv_timeout`],
//! [`BusMember::publish`], [`BusMember::subscribe`]) wait with `poll(2)`, bounded by the
//! member's timeout where noted.
//!
//! **Answers**: publishes are checked here against what JOINED said (publish granted,
//! payload size, the policy's fields, address and topic lengths) and refused locally with
//! the code the service would answer ([`BusError::Local`]), so a service ERROR answers a
//! subscription request; it is matched to the oldest one open.
//!
//! What this module does not do: decide delivery or permissions (the service does), keep
//! per-sender order state (the caller does; see [`pattern`] for the checked test messages),
//! or retry by itself: after [`BusError::Disconnected`] the caller calls
//! [`BusMember::rejoin`] (or [`BusMember::rejoin_within`]), which restores the membership,
//! its subscriptions and what was queued for it, and returns the messages lost meanwhile.

pub mod pattern;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use domsock_proto::bus::wire::{
    batch_entry_at, BusName, CreateParams, ErrorCode, Fields, Joined, MemberFrame, MemberId,
    Policy, RefuseCode, ServiceFrame, SlowPolicy, Token, Want, WireError,
    DEFAULT_MAX_MESSAGE_BYTES, HEADER_LEN, MAX_ADDR_BYTES, MAX_MESSAGE_LIMIT_BYTES,
    MAX_TOPIC_BYTES,
};
pub use domsock_proto::bus::BUS_PORT;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    connect, recv, sendmsg, socket, AddressFamily, MsgFlags, SockFlag, SockType as NixSockType,
    UnixAddr,
};
use thiserror::Error;

use crate::vsock::{SockType, VsockAddr, VsockSocket, VMADDR_CID_HOST};

/// Receive buffer until JOINED has told the bus's bounds: larger than the longest JOINED
/// (44 bytes) or REFUSED (262 bytes).
const JOIN_RECV_BUF_BYTES: usize = 512;
/// Frames read while a blocking [`BusMember::subscribe`] waits for its answer, kept for
/// the caller, at most (frames, bytes).
pub const MAX_STASHED_FRAMES: usize = 1024;
/// See [`MAX_STASHED_FRAMES`].
pub const MAX_STASHED_BYTES: usize = 4 << 20;
/// Subscription requests without an answer yet, at most.
pub const MAX_OPEN_SUBSCRIPTION_REQUESTS: usize = 64;
/// A member's timeout for each blocking step unless the caller sets another.
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 10_000;
/// Pause between attempts of [`BusMember::rejoin_within`].
const REJOIN_RETRY_PAUSE_MS: u64 = 20;
/// Longest single `poll(2)` wait (a longer wait polls again).
const MAX_POLL_MS: u16 = 10_000;
/// Default per-member queue of a bus this member creates.
pub const DEFAULT_QUEUE_BYTES: u32 = 1 << 20;

/// The wire number of a REFUSED code (the codec is the one table of codes).
pub fn refuse_wire_code(code: RefuseCode) -> u16 {
    let mut v = Vec::new();
    ServiceFrame::Refused { code, text: "" }.encode(&mut v);
    u16::from_le_bytes([v[4], v[5]])
}

/// The wire number of an ERROR code.
pub fn error_wire_code(code: ErrorCode) -> u16 {
    let mut v = Vec::new();
    ServiceFrame::Error { code, text: "" }.encode(&mut v);
    u16::from_le_bytes([v[4], v[5]])
}

/// A service frame the member does not accept.
#[derive(Debug, Error)]
pub enum Violation {
    /// It does not decode.
    #[error("undecodable frame")]
    Decode(#[source] WireError),
    /// Longer than any frame of this bus.
    #[error("frame of {len} bytes, longer than the {max} this bus's frames may have")]
    TooLong {
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A frame kind that does not belong here.
    #[error("{kind} {when}")]
    Unexpected {
        /// The kind.
        kind: &'static str,
        /// When it came.
        when: &'static str,
    },
    /// A JOINED whose values break the spec.
    #[error("JOINED: {0}")]
    BadJoined(String),
    /// A MESSAGE that breaks the spec or the bus's bounds.
    #[error("MESSAGE: {0}")]
    BadMessage(String),
    /// A LOSS of nothing.
    #[error("LOSS of 0 messages")]
    EmptyLoss,
    /// A SUBSCRIBED that answers no open request.
    #[error("SUBSCRIBED {subscribe} {prefix:?} answers no open request")]
    Unsolicited {
        /// Subscribe (true) or unsubscribe.
        subscribe: bool,
        /// Its prefix, lossily as text.
        prefix: String,
    },
}

/// Why a bus call failed.
#[derive(Debug, Error)]
pub enum BusError {
    /// Not a valid bus name.
    #[error("bus name {0:?} is not 1..=64 bytes of [A-Za-z0-9._-]")]
    BadName(String),
    /// Create parameters out of their bounds.
    #[error("bus parameters")]
    BadParams(#[source] WireError),
    /// The service could not be reached.
    #[error("cannot reach the bus service at {at}")]
    Connect {
        /// Where.
        at: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The service refused the JOIN or REJOIN (and closed the connection).
    #[error("refused: {code:?} (code {wire}): {text}")]
    Refused {
        /// The code.
        code: RefuseCode,
        /// Its wire number.
        wire: u16,
        /// The service's text.
        text: String,
    },
    /// The service answered a request with ERROR; the membership stays.
    #[error("request failed: {code:?} (code {wire}): {text}")]
    Request {
        /// The code.
        code: ErrorCode,
        /// Its wire number.
        wire: u16,
        /// The service's text.
        text: String,
    },
    /// Refused here before sending: the service would answer ERROR with this code.
    #[error("not sent: {code:?} (code {wire}): {text}")]
    Local {
        /// The code the service would answer.
        code: ErrorCode,
        /// Its wire number.
        wire: u16,
        /// Why.
        text: String,
    },
    /// The service broke the protocol; the connection was dropped.
    #[error("the bus service broke the protocol")]
    Protocol(#[source] Violation),
    /// The connection ended (the service closed it, or the device went away); the
    /// membership is parked on the service's side: [`BusMember::rejoin`].
    #[error("the connection to the bus service ended")]
    Disconnected(#[source] Option<io::Error>),
    /// Nothing came, or the socket stayed full, for the member's timeout.
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout {
        /// The timeout.
        ms: u128,
        /// What we waited for.
        what: &'static str,
    },
    /// More unread frames or open requests than the member keeps.
    #[error("{0}")]
    Backlog(&'static str),
    /// A member made over a given socket has no way to dial again.
    #[error("this member has no dialer to rejoin with")]
    NoDialer,
    /// Another socket error.
    #[error("bus socket")]
    Io(#[source] io::Error),
}

impl BusError {
    fn local(code: ErrorCode, text: impl Into<String>) -> BusError {
        BusError::Local {
            code,
            wire: error_wire_code(code),
            text: text.into(),
        }
    }
}

/// Opens a new connection to the bus service (for the first JOIN and each REJOIN).
pub trait BusDialer: fmt::Debug + Send {
    /// A connected seqpacket socket to the service, within `timeout`.
    fn dial(&mut self, timeout: Duration) -> io::Result<OwnedFd>;
    /// Where it dials, for messages.
    fn describe(&self) -> String;
}

/// Dials the bus service from a guest: AF_VSOCK seqpacket to the host at [`BUS_PORT`].
/// Guests only: it opens an AF_VSOCK socket.
#[derive(Debug, Clone, Copy)]
pub struct VsockBusDialer {
    /// The service's address.
    pub addr: VsockAddr,
}

impl Default for VsockBusDialer {
    fn default() -> Self {
        Self {
            addr: VsockAddr::new(VMADDR_CID_HOST, BUS_PORT.0),
        }
    }
}

impl BusDialer for VsockBusDialer {
    fn dial(&mut self, timeout: Duration) -> io::Result<OwnedFd> {
        VsockSocket::connect(SockType::SeqPacket, self.addr, timeout).map(OwnedFd::from)
    }

    fn describe(&self) -> String {
        format!("vsock {}", self.addr)
    }
}

/// Dials a host process's bus socket: Unix seqpacket to `path`
/// (`<bus-dir>/<namespace>.sock`).
#[derive(Debug, Clone)]
pub struct UnixBusDialer {
    /// The socket file.
    pub path: PathBuf,
}

impl BusDialer for UnixBusDialer {
    fn dial(&mut self, _timeout: Duration) -> io::Result<OwnedFd> {
        // A Unix connect completes or fails at once.
        let fd = socket(
            AddressFamily::Unix,
            NixSockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        connect(fd.as_raw_fd(), &UnixAddr::new(&self.path)?)?;
        Ok(fd)
    }

    fn describe(&self) -> String {
        format!("unix {}", self.path.display())
    }
}

/// How to join.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Publish and/or receive.
    pub want: Want,
    /// Create the bus with these parameters if it does not exist.
    pub create: Option<CreateParams>,
    /// Bound of each blocking step (connect, the answer to JOIN, a full socket, the
    /// answer to a subscription).
    pub timeout: Duration,
}

impl Default for JoinOptions {
    fn default() -> Self {
        Self {
            want: Want::BOTH,
            create: None,
            timeout: Duration::from_millis(DEFAULT_STEP_TIMEOUT_MS),
        }
    }
}

impl JoinOptions {
    /// Join, creating the bus with `policy` (drop slow members' messages, 64 KiB
    /// messages, 1 MiB queues) if it does not exist.
    pub fn creating(policy: Policy) -> Self {
        Self {
            create: Some(CreateParams {
                policy,
                slow: SlowPolicy::Drop,
                max_message: DEFAULT_MAX_MESSAGE_BYTES,
                queue_bytes: DEFAULT_QUEUE_BYTES,
            }),
            ..Self::default()
        }
    }
}

/// A message from another member, borrowed from the member's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusMessage<'a> {
    /// Who published it.
    pub sender: MemberId,
    /// The sender's publish count on this bus, from 1.
    pub seq: u64,
    /// Its policy fields (the topic, or the addresses).
    pub fields: Fields<'a>,
    /// The message.
    pub payload: &'a [u8],
}

/// What a member receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusEvent<'a> {
    /// A message.
    Message(BusMessage<'a>),
    /// Messages dropped for this member since the last LOSS (its queue was full).
    Loss {
        /// How many.
        messages: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// A request failed (the oldest open subscription request, see the module doc).
    Error {
        /// Why.
        code: ErrorCode,
        /// Its wire number.
        wire: u16,
        /// The service's text.
        text: &'a str,
    },
    /// A subscription change is in force.
    Subscribed {
        /// Subscribed (true) or unsubscribed.
        subscribe: bool,
        /// The prefix.
        prefix: &'a [u8],
    },
}

/// A member's counters, over all its connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberStats {
    /// Messages received.
    pub received: u64,
    /// Messages published.
    pub published: u64,
    /// Messages the service dropped for this member: LOSS frames and losses told at
    /// rejoin.
    pub lost_messages: u64,
    /// Their bytes, as LOSS frames told (a rejoin tells messages only).
    pub lost_bytes: u64,
    /// LOSS frames received.
    pub loss_reports: u64,
    /// Successful rejoins.
    pub rejoins: u64,
    /// ERROR frames received.
    pub errors: u64,
    /// BATCH frames received (their MESSAGEs count in `received`).
    pub batches: u64,
}

/// An open subscription request.
#[derive(Debug)]
struct OpenRequest {
    id: u64,
    subscribe: bool,
    prefix: Vec<u8>,
}

/// What a validated frame was, for the waits that look for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checked {
    /// The answer to subscription request `id`.
    Answer(u64),
    /// A BATCH whose MESSAGEs all passed.
    Batch,
    Other,
}

/// The membership as the service described it, and the checks it implies.
#[derive(Debug)]
struct State {
    joined: Joined,
    open: VecDeque<OpenRequest>,
    next_request: u64,
    /// SUBSCRIBED answers that may still come for requests of a connection that broke.
    stale_answers: usize,
    stats: MemberStats,
    /// The JOIN asked for BATCH frames.
    batches: bool,
}

impl State {
    /// Validates a frame received after JOINED.
    fn check(&mut self, frame: &[u8]) -> Result<Checked, Violation> {
        let j = &self.joined;
        match ServiceFrame::decode(frame).map_err(Violation::Decode)? {
            ServiceFrame::Joined(_) => Err(Violation::Unexpected {
                kind: "JOINED",
                when: "after the membership stood",
            }),
            ServiceFrame::Refused { .. } => Err(Violation::Unexpected {
                kind: "REFUSED",
                when: "after the membership stood",
            }),
            ServiceFrame::Message {
                sender,
                seq,
                fields,
                payload,
            } => {
                if !j.granted.receive {
                    return Err(Violation::BadMessage("to a member without receive".into()));
                }
                if sender == j.member {
                    return Err(Violation::BadMessage(format!(
                        "from this member ({sender})"
                    )));
                }
                if seq == 0 {
                    return Err(Violation::BadMessage("sequence number 0".into()));
                }
                if !fields.fit(j.policy) {
                    return Err(Violation::BadMessage(format!(
                        "fields {fields:?} on a {} bus",
                        j.policy
                    )));
                }
                if payload.len() > j.max_message as usize {
                    return Err(Violation::BadMessage(format!(
                        "payload of {} bytes, the bus's maximum is {}",
                        payload.len(),
                        j.max_message
                    )));
                }
                self.stats.received += 1;
                Ok(Checked::Other)
            }
            ServiceFrame::Loss { messages, bytes } => {
                if messages == 0 {
                    return Err(Violation::EmptyLoss);
                }
                self.stats.loss_reports += 1;
                self.stats.lost_messages = self.stats.lost_messages.saturating_add(messages);
                self.stats.lost_bytes = self.stats.lost_bytes.saturating_add(bytes);
                Ok(Checked::Other)
            }
            ServiceFrame::Error { .. } => {
                self.stats.errors += 1;
                Ok(match self.open.pop_front() {
                    Some(r) => Checked::Answer(r.id),
                    None => Checked::Other,
                })
            }
            ServiceFrame::Batch(b) => {
                if !self.batches {
                    return Err(Violation::Unexpected {
                        kind: "BATCH",
                        when: "to a member that did not ask for batches",
                    });
                }
                for f in b.frames() {
                    self.check(f)?;
                }
                self.stats.batches += 1;
                Ok(Checked::Batch)
            }
            ServiceFrame::Subscribed { subscribe, prefix } => {
                if j.policy != Policy::Topic {
                    return Err(Violation::Unexpected {
                        kind: "SUBSCRIBED",
                        when: "on a bus without topics",
                    });
                }
                match self.open.front() {
                    Some(r) if r.subscribe == subscribe && r.prefix == prefix => {
                        let id = r.id;
                        self.open.pop_front();
                        Ok(Checked::Answer(id))
                    }
                    _ if self.stale_answers > 0 => {
                        self.stale_answers -= 1;
                        Ok(Checked::Other)
                    }
                    _ => Err(Violation::Unsolicited {
                        subscribe,
                        prefix: String::from_utf8_lossy(prefix).into(),
                    }),
                }
            }
        }
    }
}

/// Where the frame [`BusMember::fetch`] found is.
#[derive(Debug, Clone, Copy)]
enum Loc {
    /// `buf[start..end]`.
    Buf(usize, usize),
    /// `current` (taken from the stash).
    Current,
}

/// A member of one bus (see the module doc).
#[derive(Debug)]
pub struct BusMember {
    dialer: Option<Box<dyn BusDialer>>,
    /// `None` after the connection ended, until a rejoin.
    sock: Option<OwnedFd>,
    name: BusName,
    timeout: Duration,
    state: State,
    /// Receive buffer: one byte longer than the longest frame of the bus, so a longer one
    /// shows.
    buf: Vec<u8>,
    /// Validated frames read during a blocking wait, oldest first.
    stash: VecDeque<Vec<u8>>,
    stash_bytes: usize,
    /// The stashed frame being handed out.
    current: Vec<u8>,
    /// The entries of a BATCH in `buf` not yet handed out: `buf[at..end]`.
    batch: Option<(usize, usize)>,
    /// The head of each PUBLISH (its payload goes as a second part of the same message).
    head: Vec<u8>,
    /// The connection's transport [sends fragments](sends_fragments) (AF_VSOCK).
    fragments: bool,
}

fn name_of(name: &str) -> Result<BusName, BusError> {
    BusName::new(name).ok_or_else(|| BusError::BadName(name.to_owned()))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Waits until `fd` is ready for `flags` or `deadline` passes (`None`: no deadline).
fn wait_for(fd: BorrowedFd<'_>, flags: PollFlags, deadline: Option<Instant>) -> io::Result<bool> {
    loop {
        let ms = match deadline {
            None => MAX_POLL_MS,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                u16::try_from(left.as_micros().div_ceil(1000).min(u128::from(MAX_POLL_MS)))
                    .unwrap_or(MAX_POLL_MS)
            }
        };
        let mut pfd = [PollFd::new(fd, flags)];
        match poll(&mut pfd, PollTimeout::from(ms)) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(false);
                }
            }
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Errors after which the connection is gone (the membership parks on the service).
fn is_disconnect(e: Errno) -> bool {
    matches!(
        e,
        Errno::ECONNRESET
            | Errno::EPIPE
            | Errno::ENOTCONN
            | Errno::ESHUTDOWN
            | Errno::ENODEV
            | Errno::ECONNABORTED
            | Errno::ETIMEDOUT
            | Errno::EHOSTUNREACH
            | Errno::ENETDOWN
    )
}

/// Whether `fd`'s transport may send part of a seqpacket message and then report the
/// send as failed: AF_VSOCK does. Linux (`vsock_connectible_sendmsg`, 6.1 to 6.12) sends a
/// message in fragments as the peer's credit allows; a non-blocking send that runs out of
/// credit half-way returns `EAGAIN` although the first fragments went out, and a resend
/// then arrives glued to them as one longer message (seen in the VM case
/// `bus_hub_three_guests_and_a_host`: a 260-byte PUBLISH arrived as 324 bytes).
fn sends_fragments(fd: &OwnedFd) -> bool {
    nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
        .is_ok_and(|a| nix::sys::socket::SockaddrLike::family(&a) == Some(AddressFamily::Vsock))
}

/// For a transport that [sends fragments](sends_fragments): bounds a blocking send by
/// `timeout` (`SO_SNDTIMEO`).
fn prepare_sends(fd: &OwnedFd, fragments: bool, timeout: Duration) -> io::Result<()> {
    if fragments {
        let tv = nix::sys::time::TimeVal::new(
            timeout.as_secs().try_into().unwrap_or(i64::MAX),
            timeout.subsec_micros().into(),
        );
        nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::SendTimeout, &tv)?;
    }
    Ok(())
}

/// Sends `parts` as one message; `Ok(false)` if the socket is full. Over a transport that
/// [sends fragments](sends_fragments) it blocks until the whole message went (bounded by
/// the socket's send timeout, see [`prepare_sends`]) and never returns `Ok(false)`: a send
/// that fails there may have sent part of the message, so the connection cannot carry
/// another one and the error ends it.
fn send_parts(fd: &OwnedFd, parts: &[&[u8]], fragments: bool) -> Result<bool, Errno> {
    if fragments {
        return send_whole(fd, parts).map(|()| true);
    }
    let iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    loop {
        match sendmsg::<UnixAddr>(
            fd.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(true),
            Err(Errno::EAGAIN) => return Ok(false),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// One blocking send of `parts` on a non-blocking `fd` (see [`send_parts`]): the kernel
/// then waits for credit between fragments. Any failure is reported as a broken
/// connection (`ECONNABORTED`; a timeout as `ETIMEDOUT`).
fn send_whole(fd: &OwnedFd, parts: &[&[u8]]) -> Result<(), Errno> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    let r = sendmsg::<UnixAddr>(fd.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    match r {
        Ok(_) => Ok(()),
        Err(Errno::EAGAIN) => Err(Errno::ETIMEDOUT),
        Err(e) if is_disconnect(e) => Err(e),
        Err(_) => Err(Errno::ECONNABORTED),
    }
}

/// Reads one message into `buf` without waiting: `Ok(None)` if none is there, `Ok(Some(n))`
/// with its real length (longer than `buf` if it did not fit), `Err(None)` at end of file.
fn recv_one(fd: &OwnedFd, buf: &mut [u8]) -> Result<Option<usize>, Option<Errno>> {
    loop {
        match recv(
            fd.as_raw_fd(),
            buf,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
        ) {
            Ok(0) => return Err(None),
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Some(e)),
        }
    }
}

/// What the service answered a JOIN or REJOIN with, validated.
fn await_joined(fd: &OwnedFd, timeout: Duration, what: &'static str) -> Result<Joined, BusError> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; JOIN_RECV_BUF_BYTES];
    loop {
        if !wait_for(fd.as_fd(), PollFlags::POLLIN, Some(deadline)).map_err(BusError::Io)? {
            return Err(BusError::Timeout {
                ms: timeout.as_millis(),
                what,
            });
        }
        let n = match recv_one(fd, &mut buf) {
            Ok(None) => continue,
            Ok(Some(n)) => n,
            Err(cause) => return Err(BusError::Disconnected(cause.map(io::Error::from))),
        };
        if n > buf.len() {
            return Err(BusError::Protocol(Violation::TooLong {
                len: n,
                max: buf.len(),
            }));
        }
        return match ServiceFrame::decode(&buf[..n])
            .map_err(|e| BusError::Protocol(Violation::Decode(e)))?
        {
            ServiceFrame::Joined(j) => Ok(j),
            ServiceFrame::Refused { code, text } => Err(BusError::Refused {
                code,
                wire: refuse_wire_code(code),
                text: text.to_owned(),
            }),
            ServiceFrame::Message { .. } => Err(unexpected("MESSAGE")),
            ServiceFrame::Loss { .. } => Err(unexpected("LOSS")),
            ServiceFrame::Error { .. } => Err(unexpected("ERROR")),
            ServiceFrame::Subscribed { .. } => Err(unexpected("SUBSCRIBED")),
            ServiceFrame::Batch(_) => Err(unexpected("BATCH")),
        };
    }
}

fn unexpected(kind: &'static str) -> BusError {
    BusError::Protocol(Violation::Unexpected {
        kind,
        when: "before JOINED",
    })
}

/// The checks of a first JOINED against what was asked.
fn check_first_joined(j: &Joined, opts: &JoinOptions) -> Result<(), Violation> {
    let bad = |s: String| Err(Violation::BadJoined(s));
    if (j.granted.publish && !opts.want.publish) || (j.granted.receive && !opts.want.receive) {
        return bad(format!(
            "granted {:?}, more than the {:?} asked",
            j.granted, opts.want
        ));
    }
    if !j.granted.publish && !j.granted.receive {
        return bad("granted nothing".into());
    }
    if j.max_message == 0 || j.max_message > MAX_MESSAGE_LIMIT_BYTES {
        return bad(format!("max_message {}", j.max_message));
    }
    if j.queue_bytes < j.max_message {
        return bad(format!(
            "queue_bytes {} below max_message {}",
            j.queue_bytes, j.max_message
        ));
    }
    if j.lost != 0 {
        return bad(format!("lost {} on a first join", j.lost));
    }
    if let Some(c) = &opts.create {
        if (c.policy, c.slow, c.max_message, c.queue_bytes)
            != (j.policy, j.slow, j.max_message, j.queue_bytes)
        {
            return bad(format!(
                "a {} bus with max_message {} and queue_bytes {}, not the one created",
                j.policy, j.max_message, j.queue_bytes
            ));
        }
    }
    Ok(())
}

impl BusMember {
    /// Joins `name` from a guest (AF_VSOCK to the host at [`BUS_PORT`]). Guests only.
    pub fn join_guest(name: &str, opts: &JoinOptions) -> Result<BusMember, BusError> {
        Self::join_with(Box::new(VsockBusDialer::default()), name, opts)
    }

    /// Joins `name` of `namespace` from a host process, through `<bus_dir>/<namespace>.sock`.
    pub fn join_host(
        bus_dir: &Path,
        namespace: &str,
        name: &str,
        opts: &JoinOptions,
    ) -> Result<BusMember, BusError> {
        Self::join_unix(&bus_dir.join(format!("{namespace}.sock")), name, opts)
    }

    /// Joins `name` through the Unix bus socket `path`.
    pub fn join_unix(path: &Path, name: &str, opts: &JoinOptions) -> Result<BusMember, BusError> {
        Self::join_with(
            Box::new(UnixBusDialer {
                path: path.to_owned(),
            }),
            name,
            opts,
        )
    }

    /// Joins `name` over a connection `dialer` opens (and opens again to rejoin).
    pub fn join_with(
        mut dialer: Box<dyn BusDialer>,
        name: &str,
        opts: &JoinOptions,
    ) -> Result<BusMember, BusError> {
        let name = name_of(name)?;
        let fd = dialer
            .dial(opts.timeout)
            .map_err(|source| BusError::Connect {
                at: dialer.describe(),
                source,
            })?;
        Self::join_on(fd, Some(dialer), name, opts)
    }

    /// Joins `name` over `sock`, a connected seqpacket socket to the bus service. With a
    /// `dialer` the member can [rejoin](Self::rejoin) after the connection ends.
    pub fn join_over(
        sock: OwnedFd,
        dialer: Option<Box<dyn BusDialer>>,
        name: &str,
        opts: &JoinOptions,
    ) -> Result<BusMember, BusError> {
        Self::join_on(sock, dialer, name_of(name)?, opts)
    }

    fn join_on(
        sock: OwnedFd,
        dialer: Option<Box<dyn BusDialer>>,
        name: BusName,
        opts: &JoinOptions,
    ) -> Result<BusMember, BusError> {
        if let Some(c) = &opts.create {
            c.validate().map_err(BusError::BadParams)?;
        }
        set_nonblocking(&sock).map_err(BusError::Io)?;
        let fragments = sends_fragments(&sock);
        prepare_sends(&sock, fragments, opts.timeout).map_err(BusError::Io)?;
        let mut join = Vec::new();
        MemberFrame::Join {
            name: name.clone(),
            want: opts.want,
            create: opts.create,
            batches: true,
        }
        .encode(&mut join);
        send_blocking(
            &sock,
            &[&join],
            opts.timeout,
            fragments,
            "room to send JOIN",
        )?;
        let joined = await_joined(&sock, opts.timeout, "JOINED")?;
        check_first_joined(&joined, opts).map_err(BusError::Protocol)?;
        let buf_len = domsock_proto::bus::wire::max_frame_len(joined.max_message) + 1;
        Ok(BusMember {
            dialer,
            sock: Some(sock),
            name,
            timeout: opts.timeout,
            state: State {
                joined,
                open: VecDeque::new(),
                next_request: 0,
                stale_answers: 0,
                stats: MemberStats::default(),
                batches: true,
            },
            buf: vec![0; buf_len],
            stash: VecDeque::new(),
            stash_bytes: 0,
            current: Vec::new(),
            batch: None,
            head: Vec::new(),
            fragments,
        })
    }

    /// The bus's name.
    pub fn bus(&self) -> &BusName {
        &self.name
    }

    /// This member's number on the bus.
    pub fn id(&self) -> MemberId {
        self.state.joined.member
    }

    /// What JOINED said: policy, grants, bounds, the token.
    pub fn joined(&self) -> &Joined {
        &self.state.joined
    }

    /// The token a [`rejoin`](Self::rejoin) presents.
    pub fn token(&self) -> Token {
        self.state.joined.token
    }

    /// Counters over all this member's connections.
    pub fn stats(&self) -> MemberStats {
        self.state.stats
    }

    /// The socket to poll for readability (`None` while disconnected). It changes at each
    /// rejoin.
    pub fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        self.sock.as_ref().map(AsFd::as_fd)
    }

    /// Whether the connection is up.
    pub fn is_connected(&self) -> bool {
        self.sock.is_some()
    }

    /// Sets the bound of each blocking step.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn sock(&self) -> Result<&OwnedFd, BusError> {
        self.sock.as_ref().ok_or(BusError::Disconnected(None))
    }

    /// The connection ended: drop it and say so.
    fn lost_connection(&mut self, cause: Option<Errno>) -> BusError {
        self.sock = None;
        BusError::Disconnected(cause.map(io::Error::from))
    }

    fn violation(&mut self, v: Violation) -> BusError {
        self.sock = None;
        BusError::Protocol(v)
    }

    /// Sends one frame of `parts`, waiting for room up to the timeout if `wait`;
    /// `Ok(false)` if it did not wait and the socket was full.
    fn send(&mut self, parts: &[&[u8]], wait: bool) -> Result<bool, BusError> {
        let (timeout, fragments) = (self.timeout, self.fragments);
        let sock = self.sock()?;
        let r = if wait {
            send_blocking(sock, parts, timeout, fragments, "room to send").map(|()| true)
        } else {
            match send_parts(sock, parts, fragments) {
                Ok(sent) => Ok(sent),
                Err(e) if is_disconnect(e) => Err(BusError::Disconnected(Some(e.into()))),
                Err(e) => Err(BusError::Io(e.into())),
            }
        };
        if let Err(BusError::Disconnected(_)) = r {
            self.sock = None;
        }
        r
    }

    /// Checks a publish against what JOINED said; encodes its head into `self.head`.
    fn prepare_publish(&mut self, fields: &Fields<'_>, payload: &[u8]) -> Result<(), BusError> {
        let j = &self.state.joined;
        if !j.granted.publish {
            return Err(BusError::local(
                ErrorCode::NotPermitted,
                format!("bus {} granted this member no publish", self.name),
            ));
        }
        if payload.len() > j.max_message as usize {
            return Err(BusError::local(
                ErrorCode::TooLarge,
                format!(
                    "payload of {} bytes, bus {} takes at most {}",
                    payload.len(),
                    self.name,
                    j.max_message
                ),
            ));
        }
        if !fields.fit(j.policy) {
            let need = match j.policy {
                Policy::Hub => "no fields",
                Policy::Switch => "source and destination addresses",
                Policy::Topic => "a topic",
            };
            return Err(BusError::local(
                ErrorCode::Fields,
                format!("bus {} is a {} bus: {need}", self.name, j.policy),
            ));
        }
        let bad_len = match *fields {
            Fields::Addressed { src, dst } => [("source address", src), ("destination", dst)]
                .into_iter()
                .find(|(_, a)| a.is_empty() || a.len() > MAX_ADDR_BYTES)
                .map(|(what, a)| {
                    format!("{what} of {} bytes, allowed 1..={MAX_ADDR_BYTES}", a.len())
                }),
            Fields::Topic(t) if t.is_empty() || t.len() > MAX_TOPIC_BYTES => Some(format!(
                "topic of {} bytes, allowed 1..={MAX_TOPIC_BYTES}",
                t.len()
            )),
            _ => None,
        };
        if let Some(text) = bad_len {
            return Err(BusError::local(ErrorCode::Malformed, text));
        }
        self.head.clear();
        MemberFrame::Publish {
            fields: *fields,
            payload: &[],
        }
        .encode(&mut self.head);
        Ok(())
    }

    /// Publishes `payload` with `fields` (the bus policy's), waiting for room in the socket
    /// up to the timeout. The payload goes out as the second part of one message, uncopied.
    pub fn publish_with(&mut self, fields: Fields<'_>, payload: &[u8]) -> Result<(), BusError> {
        self.prepare_publish(&fields, payload)?;
        let head = std::mem::take(&mut self.head);
        let r = self.send(&[&head, payload], true);
        self.head = head;
        r?;
        self.state.stats.published += 1;
        Ok(())
    }

    /// Like [`Self::publish_with`] without waiting: `Ok(false)` if the socket is full
    /// (nothing was sent; poll [`Self::poll_fd`] for writability). Over AF_VSOCK it waits
    /// until the whole message went, up to the member's timeout: the kernel may send part
    /// of a message and report it unsent (see `sends_fragments`), so a message is never
    /// left half sent.
    pub fn try_publish(&mut self, fields: Fields<'_>, payload: &[u8]) -> Result<bool, BusError> {
        self.prepare_publish(&fields, payload)?;
        let head = std::mem::take(&mut self.head);
        let r = self.send(&[&head, payload], false);
        self.head = head;
        let sent = r?;
        if sent {
            self.state.stats.published += 1;
        }
        Ok(sent)
    }

    /// Publishes on a hub bus.
    pub fn publish(&mut self, payload: &[u8]) -> Result<(), BusError> {
        self.publish_with(Fields::None, payload)
    }

    /// Publishes on a switch bus from address `src` to `dst` (all `0xFF`: broadcast).
    pub fn publish_to(&mut self, src: &[u8], dst: &[u8], payload: &[u8]) -> Result<(), BusError> {
        self.publish_with(Fields::Addressed { src, dst }, payload)
    }

    /// Publishes on a topic bus.
    pub fn publish_topic(&mut self, topic: &[u8], payload: &[u8]) -> Result<(), BusError> {
        self.publish_with(Fields::Topic(topic), payload)
    }

    /// Sends a SUBSCRIBE (or UNSUBSCRIBE) without waiting for its answer, which comes as
    /// a [`BusEvent::Subscribed`] or [`BusEvent::Error`]. Returns the request's number.
    pub fn send_subscribe(&mut self, subscribe: bool, prefix: &[u8]) -> Result<u64, BusError> {
        if prefix.len() > MAX_TOPIC_BYTES {
            return Err(BusError::local(
                ErrorCode::TooLarge,
                format!(
                    "prefix of {} bytes, allowed 0..={MAX_TOPIC_BYTES}",
                    prefix.len()
                ),
            ));
        }
        if self.state.open.len() >= MAX_OPEN_SUBSCRIPTION_REQUESTS {
            return Err(BusError::Backlog(
                "too many subscription requests without an answer",
            ));
        }
        let mut v = Vec::new();
        if subscribe {
            MemberFrame::Subscribe(prefix)
        } else {
            MemberFrame::Unsubscribe(prefix)
        }
        .encode(&mut v);
        self.send(&[&v], true)?;
        let id = self.state.next_request;
        self.state.next_request += 1;
        self.state.open.push_back(OpenRequest {
            id,
            subscribe,
            prefix: prefix.to_vec(),
        });
        Ok(id)
    }

    /// Subscribes to topics starting with `prefix` (empty: every topic) and waits for the
    /// service's answer, up to the timeout: after `Ok` the subscription is in force for
    /// every message published after it. Events that arrive meanwhile are kept for
    /// [`Self::recv`] (bounded: [`MAX_STASHED_FRAMES`], [`MAX_STASHED_BYTES`]).
    pub fn subscribe(&mut self, prefix: &[u8]) -> Result<(), BusError> {
        let id = self.send_subscribe(true, prefix)?;
        self.await_answer(id)
    }

    /// Removes a subscription, waiting for the answer like [`Self::subscribe`].
    pub fn unsubscribe(&mut self, prefix: &[u8]) -> Result<(), BusError> {
        let id = self.send_subscribe(false, prefix)?;
        self.await_answer(id)
    }

    fn await_answer(&mut self, id: u64) -> Result<(), BusError> {
        let deadline = Instant::now() + self.timeout;
        self.stash_batch_rest()?;
        loop {
            let Some(n) = self.read_frame(Some(deadline))? else {
                return Err(BusError::Timeout {
                    ms: self.timeout.as_millis(),
                    what: "the answer to a subscription",
                });
            };
            let frame = &self.buf[..n];
            match self.state.check(frame) {
                Err(v) => return Err(self.violation(v)),
                Ok(Checked::Answer(a)) if a == id => {
                    return match ServiceFrame::decode(frame) {
                        Ok(ServiceFrame::Error { code, text }) => Err(BusError::Request {
                            code,
                            wire: error_wire_code(code),
                            text: text.to_owned(),
                        }),
                        _ => Ok(()),
                    };
                }
                Ok(Checked::Batch) => {
                    self.batch = Some((HEADER_LEN, n));
                    self.stash_batch_rest()?;
                }
                Ok(_) => self.stash_frame(0, n)?,
            }
        }
    }

    /// Reads one frame into `buf`, waiting until `deadline` (`None`: for good):
    /// `Ok(None)` if none came.
    fn read_frame(&mut self, deadline: Option<Instant>) -> Result<Option<usize>, BusError> {
        loop {
            let sock = self.sock.as_ref().ok_or(BusError::Disconnected(None))?;
            match recv_one(sock, &mut self.buf) {
                Ok(Some(n)) if n > self.buf.len() => {
                    let max = self.buf.len() - 1;
                    return Err(self.violation(Violation::TooLong { len: n, max }));
                }
                Ok(Some(n)) if n == self.buf.len() => {
                    let max = n - 1;
                    return Err(self.violation(Violation::TooLong { len: n, max }));
                }
                Ok(Some(n)) => return Ok(Some(n)),
                Ok(None) => {}
                Err(None) => return Err(self.lost_connection(None)),
                Err(Some(e)) if is_disconnect(e) => return Err(self.lost_connection(Some(e))),
                Err(Some(e)) => return Err(BusError::Io(e.into())),
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            let ready = wait_for(self.sock()?.as_fd(), PollFlags::POLLIN, deadline)
                .map_err(BusError::Io)?;
            if !ready {
                return Ok(None);
            }
        }
    }

    /// The next validated frame, stashed ones first.
    fn fetch(&mut self, deadline: Option<Instant>) -> Result<Option<Loc>, BusError> {
        if let Some(f) = self.stash.pop_front() {
            self.stash_bytes -= f.len();
            self.current = f;
            return Ok(Some(Loc::Current));
        }
        if let Some(loc) = self.next_in_batch() {
            return Ok(Some(loc));
        }
        let Some(n) = self.read_frame(deadline)? else {
            return Ok(None);
        };
        match self.state.check(&self.buf[..n]) {
            Ok(Checked::Batch) => {
                self.batch = Some((HEADER_LEN, n));
                Ok(self.next_in_batch())
            }
            Ok(_) => Ok(Some(Loc::Buf(0, n))),
            Err(v) => Err(self.violation(v)),
        }
    }

    /// The next MESSAGE of the BATCH in `buf` (checked when it arrived), if one is left.
    fn next_in_batch(&mut self) -> Option<Loc> {
        let (at, end) = self.batch?;
        let frame = batch_entry_at(&self.buf[..end], at)?;
        self.batch = (frame.end < end).then_some((frame.end, end));
        Some(Loc::Buf(frame.start, frame.end))
    }

    /// Moves what is left of a BATCH in `buf` to the stash, before `buf` is read into
    /// again by a wait that stashes what it reads.
    fn stash_batch_rest(&mut self) -> Result<(), BusError> {
        while let Some(Loc::Buf(start, end)) = self.next_in_batch() {
            self.stash_frame(start, end)?;
        }
        Ok(())
    }

    /// Keeps `buf[start..end]` (a checked frame) for a later [`Self::fetch`].
    fn stash_frame(&mut self, start: usize, end: usize) -> Result<(), BusError> {
        let n = end - start;
        if self.stash.len() >= MAX_STASHED_FRAMES || self.stash_bytes + n > MAX_STASHED_BYTES {
            return Err(BusError::Backlog(
                "too many events arrived while waiting for a subscription's answer",
            ));
        }
        self.stash_bytes += n;
        self.stash.push_back(self.buf[start..end].to_vec());
        Ok(())
    }

    fn view(&self, loc: Loc) -> Result<BusEvent<'_>, BusError> {
        let frame = match loc {
            Loc::Buf(start, end) => &self.buf[start..end],
            Loc::Current => &self.current[..],
        };
        // Checked before: it decodes again to the same frame.
        Ok(
            match ServiceFrame::decode(frame)
                .map_err(|e| BusError::Protocol(Violation::Decode(e)))?
            {
                ServiceFrame::Message {
                    sender,
                    seq,
                    fields,
                    payload,
                } => BusEvent::Message(BusMessage {
                    sender,
                    seq,
                    fields,
                    payload,
                }),
                ServiceFrame::Loss { messages, bytes } => BusEvent::Loss { messages, bytes },
                ServiceFrame::Error { code, text } => BusEvent::Error {
                    code,
                    wire: error_wire_code(code),
                    text,
                },
                ServiceFrame::Subscribed { subscribe, prefix } => {
                    BusEvent::Subscribed { subscribe, prefix }
                }
                ServiceFrame::Joined(_) | ServiceFrame::Refused { .. } => {
                    return Err(BusError::Protocol(Violation::Unexpected {
                        kind: "JOINED or REFUSED",
                        when: "after the membership stood",
                    }))
                }
                // A BATCH's MESSAGEs are handed out one by one (`next_in_batch`).
                ServiceFrame::Batch(_) => {
                    return Err(BusError::Protocol(Violation::Unexpected {
                        kind: "BATCH",
                        when: "as one event",
                    }))
                }
            },
        )
    }

    /// The next event if one is there, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<BusEvent<'_>>, BusError> {
        self.recv_timeout(Duration::ZERO)
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` if none came.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<BusEvent<'_>>, BusError> {
        match self.fetch(Some(Instant::now() + timeout))? {
            None => Ok(None),
            Some(loc) => self.view(loc).map(Some),
        }
    }

    /// The next event, waiting for as long as it takes.
    pub fn recv(&mut self) -> Result<BusEvent<'_>, BusError> {
        let loc = loop {
            if let Some(loc) = self.fetch(None)? {
                break loc;
            }
        };
        self.view(loc)
    }

    /// After [`BusError::Disconnected`] (or to move to a new connection): dials again and
    /// presents the token; the service gives back the same membership with its
    /// subscriptions, then what was queued for it. Returns the messages lost meanwhile
    /// (also counted in [`MemberStats::lost_messages`]). A `REFUSED UnknownToken` means
    /// the membership ended (expired, or cut off as slow).
    pub fn rejoin(&mut self) -> Result<u64, BusError> {
        let timeout = self.timeout;
        let dialer = self.dialer.as_mut().ok_or(BusError::NoDialer)?;
        let fd = dialer.dial(timeout).map_err(|source| BusError::Connect {
            at: dialer.describe(),
            source,
        })?;
        self.rejoin_over(fd)
    }

    /// Like [`Self::rejoin`] over `sock`, a new connected seqpacket socket to the service.
    pub fn rejoin_over(&mut self, sock: OwnedFd) -> Result<u64, BusError> {
        self.sock = None;
        set_nonblocking(&sock).map_err(BusError::Io)?;
        let fragments = sends_fragments(&sock);
        prepare_sends(&sock, fragments, self.timeout).map_err(BusError::Io)?;
        let mut v = Vec::new();
        MemberFrame::Rejoin(self.state.joined.token).encode(&mut v);
        send_blocking(&sock, &[&v], self.timeout, fragments, "room to send REJOIN")?;
        let j = await_joined(&sock, self.timeout, "JOINED after REJOIN")?;
        let old = &self.state.joined;
        if (
            j.member,
            j.policy,
            j.slow,
            j.granted,
            j.max_message,
            j.queue_bytes,
            j.token,
        ) != (
            old.member,
            old.policy,
            old.slow,
            old.granted,
            old.max_message,
            old.queue_bytes,
            old.token,
        ) {
            return Err(BusError::Protocol(Violation::BadJoined(format!(
                "REJOIN gave {} of a {} bus, not the membership {} of the {} bus",
                j.member, j.policy, old.member, old.policy
            ))));
        }
        let st = &mut self.state;
        // Requests of the broken connection: their answers may still come, or never.
        st.stale_answers = st.stale_answers.saturating_add(st.open.len());
        st.open.clear();
        st.stats.rejoins += 1;
        st.stats.lost_messages = st.stats.lost_messages.saturating_add(j.lost);
        self.sock = Some(sock);
        self.fragments = fragments;
        Ok(j.lost)
    }

    /// [`Self::rejoin`], retried while the service cannot be reached (the device is still
    /// away) until `within` has passed. A refusal is not retried.
    pub fn rejoin_within(&mut self, within: Duration) -> Result<u64, BusError> {
        let deadline = Instant::now() + within;
        loop {
            match self.rejoin() {
                Err(
                    BusError::Connect { .. } | BusError::Disconnected(_) | BusError::Timeout { .. },
                ) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(REJOIN_RETRY_PAUSE_MS));
                }
                other => return other,
            }
        }
    }

    /// Ends the membership (LEAVE). Dropping a member without it parks the membership on
    /// the service until its park timeout, as a lost connection does.
    pub fn leave(mut self) -> Result<(), BusError> {
        let mut v = Vec::new();
        MemberFrame::Leave.encode(&mut v);
        self.send(&[&v], true).map(|_| ())
    }
}

/// Sends `parts` as one message, waiting for room up to `timeout`.
fn send_blocking(
    fd: &OwnedFd,
    parts: &[&[u8]],
    timeout: Duration,
    fragments: bool,
    what: &'static str,
) -> Result<(), BusError> {
    let deadline = Instant::now() + timeout;
    loop {
        match send_parts(fd, parts, fragments) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if is_disconnect(e) => return Err(BusError::Disconnected(Some(e.into()))),
            Err(e) => return Err(BusError::Io(e.into())),
        }
        if !wait_for(fd.as_fd(), PollFlags::POLLOUT, Some(deadline)).map_err(BusError::Io)? {
            return Err(BusError::Timeout {
                ms: timeout.as_millis(),
                what,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(policy: Policy) -> State {
        State {
            joined: Joined {
                member: MemberId(5),
                policy,
                slow: SlowPolicy::Drop,
                granted: Want::BOTH,
                max_message: 64,
                queue_bytes: 1 << 16,
                token: Token([1; 16]),
                lost: 0,
            },
            open: VecDeque::new(),
            next_request: 0,
            stale_answers: 0,
            stats: MemberStats::default(),
            batches: true,
        }
    }

    fn frame(f: &ServiceFrame<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        f.encode(&mut v);
        v
    }

    /// Valid frames of every kind, mutated at random (bytes flipped, cut, extended): the
    /// check never panics, and whatever it accepts is a frame the caller may see.
    #[test]
    fn mutated_service_frames_never_panic_and_only_valid_ones_pass() {
        let seeds = [
            frame(&ServiceFrame::Message {
                sender: MemberId(1),
                seq: 9,
                fields: Fields::Topic(b"t/1"),
                payload: b"payload",
            }),
            frame(&ServiceFrame::Message {
                sender: MemberId(2),
                seq: 1,
                fields: Fields::Addressed {
                    src: b"ab",
                    dst: b"\xff",
                },
                payload: &[0; 64],
            }),
            frame(&ServiceFrame::Message {
                sender: MemberId(3),
                seq: 2,
                fields: Fields::None,
                payload: b"",
            }),
            frame(&ServiceFrame::Loss {
                messages: 3,
                bytes: 9,
            }),
            frame(&ServiceFrame::Error {
                code: ErrorCode::TooManySubscriptions,
                text: "x",
            }),
            frame(&ServiceFrame::Subscribed {
                subscribe: true,
                prefix: b"t",
            }),
            frame(&ServiceFrame::Joined(state(Policy::Hub).joined)),
        ];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut accepted = [0u32; 3];
        for round in 0..60_000u32 {
            let mut f = seeds[round as usize % seeds.len()].clone();
            for _ in 0..(next() % 4) {
                let r = next();
                match r % 4 {
                    0 if !f.is_empty() => {
                        let i = (r >> 8) as usize % f.len();
                        f[i] ^= 1 << ((r >> 40) % 8);
                    }
                    1 => f.truncate((r >> 8) as usize % (f.len() + 1)),
                    2 => f.push((r >> 8) as u8),
                    _ => {}
                }
            }
            let policies = [Policy::Hub, Policy::Switch, Policy::Topic];
            for (k, policy) in policies.into_iter().enumerate() {
                let mut st = state(policy);
                st.open.push_back(OpenRequest {
                    id: 0,
                    subscribe: true,
                    prefix: b"t".to_vec(),
                });
                if st.check(&f).is_ok() {
                    accepted[k] += 1;
                    match ServiceFrame::decode(&f) {
                        Ok(ServiceFrame::Message {
                            sender,
                            seq,
                            fields,
                            payload,
                        }) => {
                            assert!(sender != MemberId(5) && seq > 0 && fields.fit(policy));
                            assert!(payload.len() <= 64);
                        }
                        Ok(ServiceFrame::Loss { messages, .. }) => assert!(messages > 0),
                        Ok(ServiceFrame::Subscribed { subscribe, prefix }) => {
                            assert!(policy == Policy::Topic && subscribe && prefix == b"t")
                        }
                        Ok(ServiceFrame::Error { .. }) => assert!(st.open.is_empty()),
                        other => panic!("accepted {other:?}"),
                    }
                }
            }
        }
        // Every policy saw frames it accepts (the unmutated seeds at least).
        assert!(accepted.iter().all(|&a| a > 1000), "{accepted:?}");
    }

    #[test]
    fn wire_codes_come_from_the_codec() {
        assert_eq!(refuse_wire_code(RefuseCode::NoSuchBus), 3);
        assert_eq!(refuse_wire_code(RefuseCode::Other(999)), 999);
        assert_eq!(error_wire_code(ErrorCode::NotPermitted), 1);
        assert_eq!(error_wire_code(ErrorCode::NotJoined), 6);
    }
}
