//! The guest end of resumable sessions ([`domsock_migration::session`]): blocking
//! connections to a target that survive losing the vsock device.
//!
//! Three ways to get one, one resume machinery under all of them:
//! - [`SessionStream::connect`] opens a byte-stream session through domsockd's session port
//!   on the host CID;
//! - [`SessionListener`] ([`listener`]) listens on a guest port and registers it with the
//!   daemon, so that host connections to it arrive as sessions ([`SessionStream`]s too);
//! - [`SessionSeqPacket`] ([`seqpacket`]) opens a seqpacket session, whose counts are
//!   messages and whose messages keep their boundaries across a resume.
//!
//! From then on a session reads and writes like a socket. When the connection under it
//! breaks (the device is unplugged for a migration, a driver reset), the read or write that
//! notices reconnects, resumes the session and carries on, so the caller sees no error
//! across the blackout, only a slower call.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant A as application
//!     participant S as SessionStream
//!     participant D as domsockd (2, 1022)
//!     A->>S: connect(cid, port)
//!     S->>D: OPEN cid, port, stream
//!     D->>S: OPENED id, secret, nonce N1, window W, park timeout T
//!     A->>S: write(b)
//!     S->>D: b (one write(2)), b copied into the replay buffer (last W bytes)
//!     Note over S,D: device gone: write fails ENOMEM / ENODEV, recv ECONNRESET, idle ENOTCONN
//!     S->>D: connect (2, 1022), retried every 10..200 ms while ENODEV, for at most T
//!     S->>D: RESUME id, nonce C, received r_g, closed, proof HMAC(secret; N1, C, r_g, closed)
//!     D->>S: RESUMED received r_d, closed, nonce N2
//!     D->>S: its bytes from r_g on (read on as usual)
//!     S->>D: the replay buffer from r_d on, then shutdown(SHUT_WR) again if we had shut
//!     S->>A: write(b) returns
//! ```
//!
//! **What counts as a break.** Any error of the connection except `EAGAIN` (a timeout the
//! caller set), `EINTR` and the errors of a wrong call (`EINVAL`, `EFAULT`, `EBADF`,
//! `EMSGSIZE`, `ENOTSOCK`, `EOPNOTSUPP`), which go to the caller. A read of 0 is a genuine
//! end of stream (the daemon shut its write side) and is returned as such; it is never a
//! reason to resume.
//!
//! **Reconnecting.** Connects to the session port are retried while they fail with
//! `ENODEV`, `ENXIO`, `ECONNRESET`, `ECONNREFUSED`, `ECONNABORTED`, `ETIMEDOUT`,
//! `ENOTCONN`, `ENETUNREACH`, `EHOSTUNREACH`, `EAGAIN`, `EINTR` or (seqpacket, no device)
//! `ESOCKTNOSUPPORT` (a device on its way back shows several of them), and a handshake whose connection breaks or times out is tried
//! again. Pauses double from [`SessionOptions::backoff_min`] to
//! [`SessionOptions::backoff_max`]; the whole resume, retransmission included, must finish
//! within the park timeout the daemon gave in OPENED, else the session fails with
//! `ETIMEDOUT`. Any other connect error ends the session with that errno. A listener's
//! registration is renewed by the same rules ([`listener`]).
//!
//! **Errors.** A failed session stays failed: every later read and write returns the same
//! errno, and [`SessionStream::failure`] says why. Refusals map to errnos like this:
//!
//! | refusal (`wire::Refusal`)        | errno                                      |
//! |----------------------------------|--------------------------------------------|
//! | `UnknownSession`, `BadProof`     | `ECONNRESET`                               |
//! | `Expired`                        | `ETIMEDOUT`                                |
//! | `TargetRefused`                  | the errno it carries (`ECONNREFUSED` if 0) |
//! | `Unsupported`                    | `EOPNOTSUPP`                               |
//! | `TooMany`                        | `EAGAIN`                                   |
//! | `OutOfRange`, `Malformed`        | `EPROTO`                                   |
//!
//! and the client's own verdicts: no resume within the park timeout `ETIMEDOUT`; an answer
//! frame that does not decode, a frame of the wrong kind, a window of 0 or above
//! [`SessionOptions::max_window_bytes`], or a daemon count outside the replay buffer
//! `EPROTO`; [`MAX_FRUITLESS_RESUMES`] resumes in a row without a byte moving for the
//! caller `ECONNRESET`; no OS randomness for the nonce `EIO`.
//!
//! **Concurrency.** `&SessionStream` reads and writes, so one thread may read while another
//! writes (the duplex pattern). Reads hold the read side's lock across their `recv`, writes
//! the write side's across their `send`: the fast path takes one uncontended lock, makes one
//! system call, and for writes copies the accepted bytes into the replay buffer. The thread
//! that notices a break resumes for both: it shuts the dead connection down (which wakes the
//! other side's blocked call), takes both sides, so that the count it sends in RESUME
//! includes every byte any reader got, and swaps the new connection in.
//!
//! **Closing.** `shutdown(Write)` half-closes as on a socket (the daemon hears
//! `SHUTDOWN(SEND)` and the host process reads EOF) and is repeated on every resumed
//! connection. `shutdown(Read)` is local: reads return 0 from then on, RESUME says so, and
//! nothing is sent (the daemon reads a `SHUTDOWN` with the receive bit as "connection
//! abandoned, park the session", which is also what aborting a dead connection sends).
//! Dropping the stream half-closes it first, so the host reads EOF at once.
//!
//! **Limits of the protocol** (v1), which callers and the daemon should know:
//! - A blackout after the caller's last call (it read EOF and shut its write side, or
//!   dropped the stream) loses what the daemon had not received yet, at most one window:
//!   nobody is left to resume, and a guest cannot see the daemon's acknowledgements from
//!   user space. A caller that must be sure waits for an answer from its peer (as `send`
//!   does by reading the reply to EOF).
//! - A RESUMED lost with its connection leaves us with a nonce the daemon has already
//!   replaced; the next attempt is refused as `BadProof` (`ECONNRESET`).
//! - While resuming, a call blocks up to the park timeout whatever its read or write
//!   timeout; `shutdown(Read)` does not wake a read blocked at that moment.
//!
//! What this module does not do: non-blocking I/O, or reading a single byte more than the
//! handshake frames (the daemon's data follows them at once). The OS part (vsock connect,
//! listen, accept) sits behind [`Dialer`], [`Transport`] and [`listener::Acceptor`] so
//! tests can run it over Unix sockets; [`VsockDialer`] and [`listener::VsockAcceptor`] must
//! only run inside a guest.
#![forbid(unsafe_code)]

pub mod listener;
pub mod seqpacket;

pub use listener::{Accepted, ListenerOptions, RawStream, SessionListener};
pub use seqpacket::SessionSeqPacket;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use domsock_migration::session::proof::ResumeClaim;
use domsock_migration::session::replay::{MessageReplay, ReplayBuffer, ReplayError};
use domsock_migration::session::wire::{
    Closed, Frame, Refusal, WireError, MAX_FRAME_LEN, PREAMBLE_LEN,
};
use domsock_migration::session::{Nonce, Secret, SessionId, SESSION_PORT};
use domsock_proto::{Cid, Port, SocketType};
use domsock_uevent::{DeviceWatch, Wake};
use thiserror::Error;

use crate::vsock::{errno_name, SockType, VsockAddr, VsockSocket, VMADDR_CID_HOST};

/// First pause between two connects to the session port during a blackout.
pub const BACKOFF_MIN_MS: u64 = 10;
/// Longest pause between two connects to the session port.
pub const BACKOFF_MAX_MS: u64 = 200;
/// How long one handshake answer (OPENED, RESUMED, REFUSED) may take by default.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// The largest replay window accepted from a daemon by default (memory per session).
pub const MAX_WINDOW_BYTES: u32 = 64 << 20;
/// Resumes in a row after which no byte moved for the caller end the session: a daemon that
/// accepts every RESUME and then drops the connection at once must not keep a call forever.
pub const MAX_FRUITLESS_RESUMES: u32 = 32;
/// The body length of a frame sits in the preamble's last two bytes (le16, see
/// [`domsock_migration::session::wire`]).
const PREAMBLE_BODY_LEN_AT: usize = 6;
/// Socket timeouts are microsecond `timeval`s in which 0 means "none": never ask for less.
const MIN_SOCKET_TIMEOUT: Duration = Duration::from_millis(1);

/// One connection to the session service, as a session needs it. `&self` methods: one
/// thread reads while another writes, as on a socket.
///
/// On a message transport (seqpacket) `write` sends one message whole and
/// [`Transport::recv_msg`] receives one.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Reads what is there (0 = the peer shut its write side).
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes some of `buf`; returns how much the kernel took.
    fn write(&self, buf: &[u8]) -> io::Result<usize>;
    /// `shutdown(2)`.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Bounds every blocking read (`None`: no bound); then `EAGAIN`.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bounds every blocking write (`None`: no bound); then `EAGAIN`.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Receives one message: its length and whether it was longer than `buf` (the rest is
    /// gone, as with `MSG_TRUNC`). `(0, false)` is the end of the stream. Byte streams do
    /// not have messages: `EOPNOTSUPP`.
    fn recv_msg(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let _ = buf;
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
}

/// Opens connections to the session service: once for OPEN (or LISTEN), again for every
/// resume. A dialer knows the socket type it dials.
pub trait Dialer: Send + fmt::Debug {
    /// One attempt, bounded by `timeout`.
    fn dial(&mut self, timeout: Duration) -> io::Result<Box<dyn Transport>>;
}

/// A read of 0 on a vsock socket is the peer's EOF, or a connection the device's removal
/// reset: Linux resets such sockets without an error on the read itself (seen on seqpacket
/// sockets of 6.1 guests), but leaves it pending in `SO_ERROR`.
fn eof_or_reset(s: &VsockSocket) -> io::Result<usize> {
    match nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::SocketError) {
        Ok(0) | Err(_) => Ok(0),
        Ok(errno) => Err(io::Error::from_raw_os_error(errno)),
    }
}

impl Transport for VsockSocket {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.recv(buf) {
            Ok(0) if !buf.is_empty() => eof_or_reset(self),
            other => other,
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        VsockSocket::shutdown(self, how)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        // A zero `SO_RCVTIMEO` means no timeout.
        VsockSocket::set_read_timeout(self, timeout.unwrap_or(Duration::ZERO))
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        VsockSocket::set_write_timeout(self, timeout.unwrap_or(Duration::ZERO))
    }

    fn recv_msg(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        match self.sock_type() {
            SockType::SeqPacket => match VsockSocket::recv_msg(self, buf) {
                Ok((0, false)) => eof_or_reset(self).map(|n| (n, false)),
                other => other,
            },
            SockType::Stream => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }
}

/// For tests and for daemons' own test clients: a session over a Unix socket.
impl Transport for UnixStream {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(&mut &*self, buf)
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        Write::write(&mut &*self, buf)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

/// The real dialer: an AF_VSOCK connection to the daemon's session port. Guests only.
#[derive(Debug, Clone, Copy)]
pub struct VsockDialer {
    addr: VsockAddr,
    ty: SockType,
}

impl VsockDialer {
    /// The session service on the host CID, over a stream (stream sessions, listener
    /// registrations).
    pub fn host() -> Self {
        Self {
            addr: VsockAddr::new(VMADDR_CID_HOST, SESSION_PORT.0),
            ty: SockType::Stream,
        }
    }

    /// The session service on the host CID, over a seqpacket connection (seqpacket
    /// sessions).
    pub fn host_seqpacket() -> Self {
        Self {
            ty: SockType::SeqPacket,
            ..Self::host()
        }
    }
}

impl Dialer for VsockDialer {
    fn dial(&mut self, timeout: Duration) -> io::Result<Box<dyn Transport>> {
        let sock = VsockSocket::connect(self.ty, self.addr, timeout)?;
        Ok(Box::new(sock))
    }
}

/// How a session behaves; [`Default`] suits a real guest.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Bounds each connect to the session port (the first and every reconnect).
    pub connect_timeout: Duration,
    /// Bounds the wait for each answer frame.
    pub handshake_timeout: Duration,
    /// Bounds the caller's blocking reads (`EAGAIN` after it); `None`: unbounded. A read
    /// that is resuming the session is bounded by the park timeout instead.
    pub read_timeout: Option<Duration>,
    /// Bounds the caller's blocking writes, like `read_timeout`.
    pub write_timeout: Option<Duration>,
    /// First pause between reconnect attempts.
    pub backoff_min: Duration,
    /// Longest pause between reconnect attempts.
    pub backoff_max: Duration,
    /// The largest window accepted in OPENED (the replay buffer's size).
    pub max_window_bytes: u32,
    /// Cut a pause short when the kernel announces a vsock device ([`domsock_uevent`]).
    pub watch_device: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
            read_timeout: None,
            write_timeout: None,
            backoff_min: Duration::from_millis(BACKOFF_MIN_MS),
            backoff_max: Duration::from_millis(BACKOFF_MAX_MS),
            max_window_bytes: MAX_WINDOW_BYTES,
            watch_device: true,
        }
    }
}

/// What the session went through, for result lines and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Successful resumes (RESUMED frames).
    pub resumes: u64,
    /// Connects to the session port made while resuming, successful or not.
    pub dials: u64,
    /// Bytes of ours sent a second time after resumes.
    pub retransmitted_bytes: u64,
    /// Messages of ours sent a second time after resumes (seqpacket sessions).
    pub retransmitted_messages: u64,
    /// From noticing each break until the retransmission after it was written, summed.
    pub blackout: Duration,
    /// Pauses between attempts cut short because the vsock device came back
    /// ([`domsock_uevent`]).
    pub device_wakes: u64,
}

/// Why a session failed; its [`SessionError::errno`] is what reads and writes return.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// The daemon answered REFUSED.
    #[error("the daemon refused the {during}: {}{}", reason.name(), errno_suffix(*errno))]
    Refused {
        /// `"open"`, `"accept"`, `"resume"` or `"listen"`.
        during: &'static str,
        /// Its reason.
        reason: Refusal,
        /// The errno it carried.
        errno: u32,
    },
    /// No resume succeeded within the park timeout.
    #[error("no resume within the park timeout of {park_timeout_ms} ms ({dials} connects)")]
    ParkTimeout {
        /// The timeout from OPENED.
        park_timeout_ms: u64,
        /// Connects tried meanwhile.
        dials: u64,
    },
    /// Reconnecting failed in a way that does not get better by waiting.
    #[error("reconnecting to the session service failed: {}", errno_name(*errno))]
    Dial {
        /// connect(2)'s errno.
        errno: i32,
    },
    /// The daemon broke the protocol.
    #[error("session protocol violation: {0}")]
    Protocol(String),
    /// Resumes kept succeeding and breaking again with nothing moving.
    #[error("{0} resumes in a row without progress")]
    Fruitless(u32),
    /// No OS randomness for a nonce.
    #[error("no randomness for the resume nonce: {0}")]
    Random(String),
}

impl SessionError {
    /// The errno the caller sees (see the table in the module doc).
    pub fn errno(&self) -> i32 {
        match self {
            Self::Refused { reason, errno, .. } => refusal_errno(*reason, *errno),
            Self::ParkTimeout { .. } => libc::ETIMEDOUT,
            Self::Dial { errno } => *errno,
            Self::Protocol(_) => libc::EPROTO,
            Self::Fruitless(_) => libc::ECONNRESET,
            Self::Random(_) => libc::EIO,
        }
    }

    fn to_io(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno())
    }
}

fn errno_suffix(errno: u32) -> String {
    match i32::try_from(errno) {
        Ok(0) => String::new(),
        Ok(e) => format!(" ({})", errno_name(e)),
        Err(_) => format!(" (errno {errno})"),
    }
}

/// The errno a refusal becomes for the caller.
pub fn refusal_errno(reason: Refusal, errno: u32) -> i32 {
    match reason {
        Refusal::UnknownSession | Refusal::BadProof => libc::ECONNRESET,
        Refusal::Expired => libc::ETIMEDOUT,
        Refusal::TargetRefused => match i32::try_from(errno) {
            Ok(e) if e > 0 => e,
            _ => libc::ECONNREFUSED,
        },
        Refusal::Unsupported => libc::EOPNOTSUPP,
        Refusal::TooMany => libc::EAGAIN,
        Refusal::OutOfRange | Refusal::Malformed => libc::EPROTO,
    }
}

/// Whether an error of an established connection means it is gone (see the module doc).
fn is_break(e: &io::Error) -> bool {
    match e.raw_os_error() {
        Some(errno) => !matches!(
            errno,
            libc::EAGAIN
                | libc::EINTR
                | libc::EINVAL
                | libc::EFAULT
                | libc::EBADF
                | libc::EMSGSIZE
                | libc::ENOTSOCK
                | libc::EOPNOTSUPP
        ),
        // Not from the kernel: a transport of our own saying something else.
        None => false,
    }
}

/// Whether a failed connect to the session port is worth trying again during a blackout.
fn is_retryable_dial(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENODEV
                | libc::ENXIO
                | libc::ECONNRESET
                | libc::ECONNREFUSED
                | libc::ECONNABORTED
                | libc::ETIMEDOUT
                | libc::ENOTCONN
                | libc::ENETUNREACH
                | libc::EHOSTUNREACH
                | libc::EAGAIN
                | libc::EINTR
                // A seqpacket socket's connect while no device is there: no transport
                // offers seqpacket.
                | libc::ESOCKTNOSUPPORT
        )
    )
}

/// The pauses between reconnect attempts: doubling from `backoff_min` to `backoff_max`.
/// Shared by resumes and listener registrations, so both follow the same rules.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(opts: &SessionOptions) -> Self {
        Self {
            next: opts.backoff_min,
            max: opts.backoff_max.max(opts.backoff_min),
        }
    }

    /// The pause before the next attempt.
    fn pause(&mut self) -> Duration {
        let p = self.next;
        self.next = (self.next * 2).min(self.max);
        p
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing a panicking holder leaves half-done makes these states unsafe to read; the
    // panic itself reaches the caller through its own thread.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn at_least_1ms(d: Duration) -> Duration {
    d.max(MIN_SOCKET_TIMEOUT)
}

/// How reading one handshake frame failed.
#[derive(Debug)]
enum FrameError {
    /// The connection failed, timed out or ended before the frame was whole.
    Io(io::Error),
    /// The bytes are not a frame.
    Bad(String),
}

impl FrameError {
    /// The errno for a caller of a first handshake (open, accept, listen): a timeout is
    /// `ETIMEDOUT`, a connection that ends inside its answer `ECONNRESET`, bad bytes
    /// `EPROTO`.
    fn into_io(self, what: &str) -> io::Error {
        match self {
            FrameError::Io(e) if e.kind() == io::ErrorKind::WouldBlock => {
                io::Error::from_raw_os_error(libc::ETIMEDOUT)
            }
            FrameError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                io::Error::from_raw_os_error(libc::ECONNRESET)
            }
            FrameError::Io(e) => e,
            FrameError::Bad(e) => SessionError::Protocol(format!("{what}: {e}")).to_io(),
        }
    }
}

fn read_exact(t: &dyn Transport, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match t.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_all(t: &dyn Transport, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match t.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends one message whole (seqpacket): a send that takes less is not a message.
fn write_message(t: &dyn Transport, msg: &[u8]) -> io::Result<()> {
    match t.write(msg)? {
        n if n == msg.len() => Ok(()),
        n => Err(io::Error::other(format!(
            "a seqpacket send took {n} of {} bytes",
            msg.len()
        ))),
    }
}

/// Reads exactly one frame: the preamble, then the body length it names (checked against
/// the kind by [`Frame::decode`] first), and not a byte more: the daemon's data follows.
fn read_frame(t: &dyn Transport) -> Result<Frame, FrameError> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    read_exact(t, &mut buf[..PREAMBLE_LEN]).map_err(FrameError::Io)?;
    finish_frame(t, &mut buf)
}

/// [`read_frame`] once `buf` holds the preamble.
fn finish_frame(t: &dyn Transport, buf: &mut [u8; MAX_FRAME_LEN]) -> Result<Frame, FrameError> {
    let bad = |e: WireError| FrameError::Bad(e.to_string());
    let body_len = match Frame::decode(&buf[..PREAMBLE_LEN]).map_err(bad)? {
        Some((frame, _)) => return Ok(frame),
        None => usize::from(u16::from_le_bytes([
            buf[PREAMBLE_BODY_LEN_AT],
            buf[PREAMBLE_BODY_LEN_AT + 1],
        ])),
    };
    // `decode` accepted the preamble, so the length is its kind's, which fits `buf`.
    let total = PREAMBLE_LEN + body_len;
    read_exact(t, &mut buf[PREAMBLE_LEN..total]).map_err(FrameError::Io)?;
    match Frame::decode(&buf[..total]).map_err(bad)? {
        Some((frame, used)) if used == total => Ok(frame),
        _ => Err(FrameError::Bad(format!(
            "a frame of {total} bytes does not decode as one"
        ))),
    }
}

/// Reads one frame that is one message (seqpacket): the message must be the frame, whole
/// and nothing else.
fn read_frame_message(t: &dyn Transport) -> Result<Frame, FrameError> {
    let mut buf = [0u8; MAX_FRAME_LEN + 1];
    let (n, truncated) = loop {
        match t.recv_msg(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other.map_err(FrameError::Io)?,
        }
    };
    if n == 0 && !truncated {
        return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if truncated || n > MAX_FRAME_LEN {
        return Err(FrameError::Bad(
            "a handshake message longer than any frame".into(),
        ));
    }
    match Frame::decode(&buf[..n]) {
        Ok(Some((frame, used))) if used == n => Ok(frame),
        Ok(Some((frame, used))) => Err(FrameError::Bad(format!(
            "a {n}-byte message holds a {used}-byte {} and more",
            frame.name()
        ))),
        Ok(None) => Err(FrameError::Bad(format!(
            "a {n}-byte message holds part of a frame (a frame is one message)"
        ))),
        Err(e) => Err(FrameError::Bad(e.to_string())),
    }
}

/// A client nonce: fresh, not secret (the proof's strength is the secret and the daemon's
/// nonce), so it comes from a source that never blocks ([`crate::vsock::nonce_bytes`]).
fn fresh_nonce() -> Result<Nonce, SessionError> {
    let mut n = [0u8; 16];
    crate::vsock::nonce_bytes(&mut n).map_err(|e| SessionError::Random(e.to_string()))?;
    Ok(Nonce(n))
}

/// One connection carrying the session.
#[derive(Debug)]
struct Conn {
    transport: Box<dyn Transport>,
    /// Counts connections of this session; the first is 0.
    generation: u64,
    /// We gave it up: a read of 0 from it is our own shutdown, not the daemon's EOF.
    aborted: AtomicBool,
}

impl Conn {
    fn new(transport: Box<dyn Transport>, generation: u64) -> Arc<Self> {
        Arc::new(Self {
            transport,
            generation,
            aborted: AtomicBool::new(false),
        })
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        // Wakes a read or write blocked on it. On a connection the kernel already reset
        // this sends nothing and may fail; there is nothing to do about either.
        let _ = self.transport.shutdown(Shutdown::Both);
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

/// The reading half; its lock is held across each `recv`.
#[derive(Debug)]
struct ReadSide {
    conn: Arc<Conn>,
    /// The daemon's data handed to the caller over the whole session: bytes, or messages
    /// on a seqpacket session.
    received: u64,
    /// The daemon shut its write side and we read up to it.
    eof: bool,
    /// The caller shut our read side.
    shut: bool,
    failed: Option<SessionError>,
}

/// What we sent and the daemon may lack.
#[derive(Debug)]
enum Replay {
    /// The last `window` bytes (stream sessions).
    Bytes(ReplayBuffer),
    /// The last messages whose bytes fit `window` (seqpacket sessions).
    Messages(MessageReplay),
}

impl Replay {
    /// Everything ever sent, in the session's unit.
    fn end(&self) -> u64 {
        match self {
            Replay::Bytes(r) => r.end(),
            Replay::Messages(r) => r.end(),
        }
    }
}

/// The writing half; its lock is held across each `send`.
#[derive(Debug)]
struct WriteSide {
    conn: Arc<Conn>,
    replay: Replay,
    /// The caller shut our write side.
    shut: bool,
    /// The daemon's RESUMED said it reads no more: writes fail with `EPIPE`.
    peer_reads_no_more: bool,
    failed: Option<SessionError>,
}

/// Who is resuming, and what came of it.
#[derive(Debug)]
struct Recovery {
    /// The generation of the connection in use.
    generation: u64,
    resuming: bool,
    failed: Option<SessionError>,
    stats: SessionStats,
    /// `(received, sent)` when the last resume finished, to tell progress.
    progress_mark: (u64, u64),
    fruitless: u32,
}

/// What only the resuming thread touches.
#[derive(Debug)]
struct Resumer {
    dialer: Box<dyn Dialer>,
    /// The daemon's nonce the next proof covers.
    next_nonce: Nonce,
}

/// What one resume attempt came to.
enum Attempt {
    /// RESUMED: the connection, the daemon's count and what it has closed.
    Resumed(Box<dyn Transport>, u64, Closed),
    /// Worth another connect (until the deadline).
    Retry(String),
    /// The session is over.
    Fatal(SessionError),
}

/// The handshake that starts a session, and so the frame that answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// We sent OPEN; OPENED answers.
    Open,
    /// We accepted a host connection; OFFERED comes first.
    Accept,
}

impl Start {
    fn name(self) -> &'static str {
        match self {
            Start::Open => "open",
            Start::Accept => "accept",
        }
    }
}

/// What OPENED (or OFFERED) gives a new session.
#[derive(Debug)]
struct Greeting {
    id: SessionId,
    secret: Secret,
    next_nonce: Nonce,
    window: u32,
    park_timeout_ms: u32,
}

impl Greeting {
    /// The greeting in `frame` if it is the one `start` expects; REFUSED and anything else
    /// as the caller's error.
    fn from_frame(frame: Frame, start: Start) -> Result<Self, SessionError> {
        match (frame, start) {
            (
                Frame::Opened {
                    id,
                    secret,
                    next_nonce,
                    window,
                    park_timeout_ms,
                },
                Start::Open,
            )
            | (
                Frame::Offered {
                    id,
                    secret,
                    next_nonce,
                    window,
                    park_timeout_ms,
                },
                Start::Accept,
            ) => Ok(Self {
                id,
                secret,
                next_nonce,
                window,
                park_timeout_ms,
            }),
            (Frame::Refused { reason, errno }, _) => Err(SessionError::Refused {
                during: start.name(),
                reason,
                errno,
            }),
            (other, _) => Err(SessionError::Protocol(format!(
                "the first frame of an {} is {}",
                start.name(),
                Frame::name(&other)
            ))),
        }
    }
}

/// Everything a session is, whatever it carries; [`SessionStream`] and
/// [`SessionSeqPacket`] are its two faces.
#[derive(Debug)]
struct Core {
    kind: SocketType,
    id: SessionId,
    secret: Secret,
    window: u32,
    park_timeout: Duration,
    opts: SessionOptions,
    read: Mutex<ReadSide>,
    write: Mutex<WriteSide>,
    recovery: Mutex<Recovery>,
    /// Signalled when a resume ends, well or not.
    recovered: Condvar,
    resumer: Mutex<Resumer>,
}

/// Sends one handshake frame: its bytes on a stream, one message on seqpacket.
fn send_frame(kind: SocketType, t: &dyn Transport, frame: &Frame) -> io::Result<()> {
    match kind {
        SocketType::Stream => write_all(t, &frame.encode()),
        SocketType::SeqPacket => write_message(t, &frame.encode()),
    }
}

/// Reads one handshake frame: exactly its bytes on a stream, one message on seqpacket.
fn read_answer(kind: SocketType, t: &dyn Transport) -> Result<Frame, FrameError> {
    match kind {
        SocketType::Stream => read_frame(t),
        SocketType::SeqPacket => read_frame_message(t),
    }
}

impl Core {
    /// Opens a session of `kind` to `(target_cid, target_port)`: OPEN, then OPENED.
    fn open(
        kind: SocketType,
        mut dialer: Box<dyn Dialer>,
        target_cid: u32,
        target_port: u32,
        opts: SessionOptions,
    ) -> io::Result<Core> {
        let transport = dialer.dial(opts.connect_timeout)?;
        transport.set_read_timeout(Some(at_least_1ms(opts.handshake_timeout)))?;
        transport.set_write_timeout(Some(at_least_1ms(opts.handshake_timeout)))?;
        let open = Frame::Open {
            cid: Cid(u64::from(target_cid)),
            port: Port(target_port),
            socket_type: kind,
        };
        send_frame(kind, &*transport, &open)?;
        let frame = read_answer(kind, &*transport).map_err(|e| e.into_io("answer to OPEN"))?;
        let greeting = Greeting::from_frame(frame, Start::Open).map_err(|e| {
            tracing::debug!(target_cid, target_port, "session open failed: {e}");
            e.to_io()
        })?;
        Core::establish(kind, transport, dialer, greeting, opts)
    }

    /// A session on `transport`, whose greeting was just read.
    fn establish(
        kind: SocketType,
        transport: Box<dyn Transport>,
        dialer: Box<dyn Dialer>,
        g: Greeting,
        opts: SessionOptions,
    ) -> io::Result<Core> {
        if g.window == 0 || g.window > opts.max_window_bytes {
            return Err(SessionError::Protocol(format!(
                "window of {} bytes (this client takes 1..={})",
                g.window, opts.max_window_bytes
            ))
            .to_io());
        }
        transport.set_read_timeout(opts.read_timeout.map(at_least_1ms))?;
        transport.set_write_timeout(opts.write_timeout.map(at_least_1ms))?;
        tracing::debug!(session = %g.id, ?kind, window = g.window,
            park_timeout_ms = g.park_timeout_ms, "session established");
        let conn = Conn::new(transport, 0);
        let replay = match kind {
            SocketType::Stream => Replay::Bytes(ReplayBuffer::new(g.window as usize)),
            SocketType::SeqPacket => Replay::Messages(MessageReplay::new(g.window as usize)),
        };
        Ok(Core {
            kind,
            id: g.id,
            secret: g.secret,
            window: g.window,
            park_timeout: Duration::from_millis(u64::from(g.park_timeout_ms)),
            opts,
            read: Mutex::new(ReadSide {
                conn: Arc::clone(&conn),
                received: 0,
                eof: false,
                shut: false,
                failed: None,
            }),
            write: Mutex::new(WriteSide {
                conn,
                replay,
                shut: false,
                peer_reads_no_more: false,
                failed: None,
            }),
            recovery: Mutex::new(Recovery {
                generation: 0,
                resuming: false,
                failed: None,
                stats: SessionStats::default(),
                progress_mark: (0, 0),
                fruitless: 0,
            }),
            recovered: Condvar::new(),
            resumer: Mutex::new(Resumer {
                dialer,
                next_nonce: g.next_nonce,
            }),
        })
    }

    fn stats(&self) -> SessionStats {
        lock(&self.recovery).stats
    }

    fn failure(&self) -> Option<SessionError> {
        lock(&self.recovery).failed.clone()
    }

    /// Reads with `op` (a `recv` or a `recv_msg`): `(n, truncated)`, `(0, false)` at the end.
    fn read_with(
        &self,
        buf: &mut [u8],
        op: impl Fn(&dyn Transport, &mut [u8]) -> io::Result<(usize, bool)>,
    ) -> io::Result<(usize, bool)> {
        loop {
            let mut rs = lock(&self.read);
            if let Some(e) = &rs.failed {
                return Err(e.to_io());
            }
            if rs.eof || rs.shut {
                return Ok((0, false));
            }
            match op(&*rs.conn.transport, buf) {
                Ok((0, false)) if !rs.conn.is_aborted() => {
                    rs.eof = true;
                    return Ok((0, false));
                }
                Ok((0, false)) => {}
                Ok((n, truncated)) => {
                    rs.received += match self.kind {
                        SocketType::Stream => n as u64,
                        SocketType::SeqPacket => 1,
                    };
                    return Ok((n, truncated));
                }
                Err(e) if !is_break(&e) => return Err(e),
                Err(e) => tracing::info!(session = %self.id, "read broke: {e}"),
            }
            let failed = Arc::clone(&rs.conn);
            drop(rs);
            self.recover(&failed)?;
        }
    }

    /// Writes `buf` (some of it on a stream, one whole message on seqpacket), recording
    /// what the kernel took for replay; returns how much that was.
    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let mut ws = lock(&self.write);
            if let Some(e) = &ws.failed {
                return Err(e.to_io());
            }
            if ws.shut || ws.peer_reads_no_more {
                return Err(io::Error::from_raw_os_error(libc::EPIPE));
            }
            let r = ws.conn.transport.write(buf);
            match (r, &mut ws.replay) {
                (Ok(n), Replay::Bytes(replay)) => {
                    replay.record_evicting(&buf[..n]);
                    return Ok(n);
                }
                (Ok(n), Replay::Messages(replay)) if n == buf.len() => {
                    replay
                        .record_evicting(buf)
                        .expect("the caller checked the message fits the window");
                    return Ok(n);
                }
                (Ok(n), Replay::Messages(_)) => {
                    // Not something a seqpacket socket does; whatever part went, the daemon
                    // drops it with the connection, and the message goes again whole.
                    tracing::debug!(session = %self.id, "a send took {n} of {} bytes", buf.len());
                }
                (Err(e), Replay::Messages(_)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The write timeout may have struck after part of the message went: the
                    // daemon would glue the next message to that part. Give the connection
                    // up, so the daemon drops the part; the next call resumes.
                    ws.conn.abort();
                    return Err(e);
                }
                (Err(e), _) if !is_break(&e) => return Err(e),
                (Err(e), _) => tracing::info!(session = %self.id, "write broke: {e}"),
            }
            let failed = Arc::clone(&ws.conn);
            drop(ws);
            self.recover(&failed)?;
        }
    }

    /// Shuts our write side (repeated after every resume), our read side (locally), or both.
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            let mut rs = lock(&self.read);
            if let Some(e) = &rs.failed {
                return Err(e.to_io());
            }
            rs.shut = true;
        }
        if matches!(how, Shutdown::Read) {
            return Ok(());
        }
        let mut ws = lock(&self.write);
        if let Some(e) = &ws.failed {
            return Err(e.to_io());
        }
        ws.shut = true;
        match ws.conn.transport.shutdown(Shutdown::Write) {
            Ok(()) => return Ok(()),
            Err(e) if !is_break(&e) => return Err(e),
            Err(e) => tracing::info!(session = %self.id, "shutdown broke: {e}"),
        }
        // The resume repeats the shutdown on the new connection.
        let failed = Arc::clone(&ws.conn);
        drop(ws);
        self.recover(&failed)
    }

    /// After `failed` broke: resumes the session, or waits for the thread already doing so.
    fn recover(&self, failed: &Arc<Conn>) -> io::Result<()> {
        let mut rec = lock(&self.recovery);
        loop {
            if let Some(e) = &rec.failed {
                return Err(e.to_io());
            }
            if rec.generation != failed.generation {
                return Ok(());
            }
            if !rec.resuming {
                break;
            }
            rec = self
                .recovered
                .wait(rec)
                .unwrap_or_else(PoisonError::into_inner);
        }
        rec.resuming = true;
        drop(rec);
        let noticed = Instant::now();
        failed.abort();
        // The other side's call on `failed` returns now and lets go of its lock.
        let mut rs = lock(&self.read);
        let mut ws = lock(&self.write);
        let progress = (rs.received, ws.replay.end());
        let mut stats = SessionStats::default();
        let outcome = self.resume(&mut rs, &mut ws, noticed, failed.generation + 1, &mut stats);
        let mut rec = lock(&self.recovery);
        rec.resuming = false;
        rec.stats.resumes += stats.resumes;
        rec.stats.dials += stats.dials;
        rec.stats.retransmitted_bytes += stats.retransmitted_bytes;
        rec.stats.retransmitted_messages += stats.retransmitted_messages;
        rec.stats.device_wakes += stats.device_wakes;
        rec.stats.blackout += noticed.elapsed();
        let outcome = outcome.and_then(|conn| {
            if progress == rec.progress_mark {
                rec.fruitless += 1;
            } else {
                rec.fruitless = 0;
            }
            rec.progress_mark = progress;
            if rec.fruitless >= MAX_FRUITLESS_RESUMES {
                Err(SessionError::Fruitless(rec.fruitless))
            } else {
                Ok(conn)
            }
        });
        let result = match outcome {
            Ok(conn) => {
                tracing::info!(session = %self.id, generation = conn.generation,
                    blackout_ms = noticed.elapsed().as_millis() as u64, "session resumed");
                rec.generation = conn.generation;
                rs.conn = Arc::clone(&conn);
                ws.conn = conn;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(session = %self.id, "session failed: {e}");
                rs.failed = Some(e.clone());
                ws.failed = Some(e.clone());
                let io = e.to_io();
                rec.failed = Some(e);
                Err(io)
            }
        };
        drop((rs, ws, rec));
        self.recovered.notify_all();
        result
    }

    /// Reconnects, resumes and retransmits, within the park timeout from `noticed`.
    fn resume(
        &self,
        rs: &mut ReadSide,
        ws: &mut WriteSide,
        noticed: Instant,
        generation: u64,
        stats: &mut SessionStats,
    ) -> Result<Arc<Conn>, SessionError> {
        let mut resumer = lock(&self.resumer);
        let deadline = noticed + self.park_timeout;
        let closed = Closed {
            send: ws.shut,
            rcv: rs.shut,
        };
        let mut backoff = Backoff::new(&self.opts);
        // Before the first attempt, so a device that comes back after it is not missed.
        let watch = match self.opts.watch_device {
            true => DeviceWatch::open(),
            false => DeviceWatch::sleep_only(),
        };
        let mut why = String::from("no attempt");
        loop {
            let now = Instant::now();
            if now >= deadline {
                tracing::debug!(session = %self.id, "giving up resuming: {why}");
                return Err(SessionError::ParkTimeout {
                    park_timeout_ms: self.park_timeout.as_millis() as u64,
                    dials: stats.dials,
                });
            }
            let left = deadline - now;
            stats.dials += 1;
            match self.try_resume(&mut resumer, rs.received, closed, left) {
                Attempt::Resumed(transport, daemon_received, daemon_closed) => {
                    stats.resumes += 1;
                    let left = deadline.saturating_duration_since(Instant::now());
                    let sent = transport
                        .set_write_timeout(Some(at_least_1ms(left)))
                        .map_err(RetransmitError::Io)
                        .and_then(|()| {
                            retransmit(&*transport, &mut ws.replay, daemon_received, stats)
                        })
                        .and_then(|()| {
                            match closed.send {
                                true => transport.shutdown(Shutdown::Write),
                                false => Ok(()),
                            }
                            .and_then(|()| transport.set_read_timeout(self.opts.read_timeout))
                            .and_then(|()| transport.set_write_timeout(self.opts.write_timeout))
                            .map_err(RetransmitError::Io)
                        });
                    match sent {
                        Ok(()) => {
                            if daemon_closed.rcv {
                                ws.peer_reads_no_more = true;
                            }
                            return Ok(Conn::new(transport, generation));
                        }
                        Err(RetransmitError::Count(e)) => return Err(replay_violation(&e)),
                        Err(RetransmitError::Io(e))
                            if is_break(&e)
                                || e.kind() == io::ErrorKind::WouldBlock
                                || e.raw_os_error().is_none() =>
                        {
                            why = format!("retransmission failed: {e}");
                            tracing::info!(session = %self.id, dials = stats.dials, "{why}");
                        }
                        Err(RetransmitError::Io(e)) => {
                            return Err(SessionError::Protocol(format!(
                                "retransmission failed: {e}"
                            )))
                        }
                    }
                }
                Attempt::Retry(reason) => {
                    // Once per kind of failure, not per attempt: a blackout is many dials.
                    if reason != why {
                        tracing::info!(session = %self.id, dials = stats.dials,
                            since_ms = noticed.elapsed().as_millis() as u64,
                            "resume attempt failed: {reason}");
                    }
                    why = reason;
                }
                Attempt::Fatal(e) => return Err(e),
            }
            let pause = backoff
                .pause()
                .min(deadline.saturating_duration_since(Instant::now()));
            if watch.wait(pause) == Wake::Device {
                // The transport is back: try at once, and soon again if that was early.
                stats.device_wakes += 1;
                tracing::info!(session = %self.id, dials = stats.dials,
                    since_ms = noticed.elapsed().as_millis() as u64,
                    "vsock device announced: resuming");
                backoff = Backoff::new(&self.opts);
            }
        }
    }

    /// One connect and handshake.
    fn try_resume(
        &self,
        resumer: &mut Resumer,
        received: u64,
        closed: Closed,
        left: Duration,
    ) -> Attempt {
        let transport = match resumer
            .dialer
            .dial(at_least_1ms(self.opts.connect_timeout.min(left)))
        {
            Ok(t) => t,
            Err(e) if is_retryable_dial(&e) => return Attempt::Retry(format!("connect: {e}")),
            Err(e) => {
                return Attempt::Fatal(match e.raw_os_error() {
                    Some(errno) => SessionError::Dial { errno },
                    None => SessionError::Protocol(format!("connect: {e}")),
                })
            }
        };
        let client_nonce = match fresh_nonce() {
            Ok(n) => n,
            Err(e) => return Attempt::Fatal(e),
        };
        let claim = ResumeClaim {
            id: self.id,
            server_nonce: resumer.next_nonce,
            client_nonce,
            received,
            closed,
        };
        let resume = Frame::Resume {
            id: self.id,
            client_nonce,
            received,
            closed,
            proof: claim.prove(&self.secret),
        };
        let bound = Some(at_least_1ms(self.opts.handshake_timeout.min(left)));
        let asked = transport
            .set_read_timeout(bound)
            .and_then(|()| transport.set_write_timeout(bound))
            .and_then(|()| send_frame(self.kind, &*transport, &resume));
        if let Err(e) = asked {
            return Attempt::Retry(format!("sending RESUME: {e}"));
        }
        match read_answer(self.kind, &*transport) {
            Ok(Frame::Resumed {
                received: daemon_received,
                closed: daemon_closed,
                next_nonce,
            }) => {
                resumer.next_nonce = next_nonce;
                Attempt::Resumed(transport, daemon_received, daemon_closed)
            }
            Ok(Frame::Refused { reason, errno }) => Attempt::Fatal(SessionError::Refused {
                during: "resume",
                reason,
                errno,
            }),
            Ok(other) => Attempt::Fatal(SessionError::Protocol(format!(
                "answer to RESUME is {}",
                Frame::name(&other)
            ))),
            // The answer may have been lost with the connection; the daemon then has a new
            // nonce we never saw, and the next attempt is refused as a bad proof.
            Err(FrameError::Io(e)) => Attempt::Retry(format!("reading the answer: {e}")),
            Err(FrameError::Bad(e)) => {
                Attempt::Fatal(SessionError::Protocol(format!("answer to RESUME: {e}")))
            }
        }
    }
}

/// How a retransmission failed.
#[derive(Debug)]
enum RetransmitError {
    /// The daemon's count is outside what we kept.
    Count(ReplayError),
    /// The new connection failed.
    Io(io::Error),
}

/// Sends what the daemon lacks from its count `daemon_received` on: the byte tail, or each
/// message whole.
fn retransmit(
    t: &dyn Transport,
    replay: &mut Replay,
    daemon_received: u64,
    stats: &mut SessionStats,
) -> Result<(), RetransmitError> {
    match replay {
        Replay::Bytes(r) => {
            let (a, b) = r
                .resume_from(daemon_received)
                .map_err(RetransmitError::Count)?;
            write_all(t, a)
                .and_then(|()| write_all(t, b))
                .map_err(RetransmitError::Io)?;
            stats.retransmitted_bytes += (a.len() + b.len()) as u64;
        }
        Replay::Messages(r) => {
            let mut joined = Vec::new();
            for (a, b) in r
                .resume_from(daemon_received)
                .map_err(RetransmitError::Count)?
            {
                let msg = if b.is_empty() {
                    a
                } else {
                    // A message the ring wrapped: one send needs it in one piece.
                    joined.clear();
                    joined.extend_from_slice(a);
                    joined.extend_from_slice(b);
                    &joined[..]
                };
                write_message(t, msg).map_err(RetransmitError::Io)?;
                stats.retransmitted_bytes += msg.len() as u64;
                stats.retransmitted_messages += 1;
            }
        }
    }
    Ok(())
}

fn replay_violation(e: &ReplayError) -> SessionError {
    SessionError::Protocol(format!("RESUMED count: {e}"))
}

impl Drop for Core {
    /// Half-closes first, so the host reads EOF now rather than when the parked session
    /// expires.
    fn drop(&mut self) {
        let ws = lock(&self.write);
        if !ws.shut && ws.failed.is_none() {
            let _ = ws.conn.transport.shutdown(Shutdown::Write);
        }
    }
}

/// A continuous, resumable byte stream to a target (see the module doc).
#[derive(Debug)]
pub struct SessionStream {
    core: Core,
}

impl SessionStream {
    /// Opens a session to `(target_cid, target_port)` through the daemon's session port on
    /// the host CID. Guests only. Fails with the errno of the connect, or of the refusal
    /// (module doc).
    pub fn connect(
        target_cid: u32,
        target_port: u32,
        opts: SessionOptions,
    ) -> io::Result<SessionStream> {
        Self::connect_with(Box::new(VsockDialer::host()), target_cid, target_port, opts)
    }

    /// Like [`Self::connect`], reaching the session service through `dialer`.
    pub fn connect_with(
        dialer: Box<dyn Dialer>,
        target_cid: u32,
        target_port: u32,
        opts: SessionOptions,
    ) -> io::Result<SessionStream> {
        Core::open(SocketType::Stream, dialer, target_cid, target_port, opts)
            .map(|core| SessionStream { core })
    }

    /// The session's id (as the daemon logs it).
    pub fn session_id(&self) -> SessionId {
        self.core.id
    }

    /// The daemon's window: the most of our data it holds unconsumed, our replay size.
    pub fn window(&self) -> u32 {
        self.core.window
    }

    /// How long the daemon keeps the session while we are away.
    pub fn park_timeout(&self) -> Duration {
        self.core.park_timeout
    }

    /// Resumes and blackouts so far.
    pub fn stats(&self) -> SessionStats {
        self.core.stats()
    }

    /// Why the session failed, once it has.
    pub fn failure(&self) -> Option<SessionError> {
        self.core.failure()
    }

    /// Reads like `recv(2)`: 0 once the daemon shut its side and everything before was read.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.core
            .read_with(buf, |t, b| t.read(b).map(|n| (n, false)))
            .map(|(n, _)| n)
    }

    /// Writes like `send(2)`: returns how much was taken, after recording it for replay.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.core.write(buf)
    }

    /// Sends all of `buf`.
    pub fn send_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.send(buf)? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }

    /// Shuts our write side (repeated after every resume), our read side (locally), or both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.core.shutdown(how)
    }
}

impl Read for &SessionStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl Write for &SessionStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for SessionStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl Write for SessionStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_the_documented_errnos() {
        let cases = [
            (Refusal::UnknownSession, 0, libc::ECONNRESET),
            (Refusal::BadProof, 0, libc::ECONNRESET),
            (Refusal::Expired, 0, libc::ETIMEDOUT),
            (Refusal::TargetRefused, 0, libc::ECONNREFUSED),
            (
                Refusal::TargetRefused,
                libc::EHOSTUNREACH as u32,
                libc::EHOSTUNREACH,
            ),
            (Refusal::TargetRefused, u32::MAX, libc::ECONNREFUSED),
            (Refusal::Unsupported, 0, libc::EOPNOTSUPP),
            (Refusal::TooMany, 0, libc::EAGAIN),
            (Refusal::OutOfRange, 0, libc::EPROTO),
            (Refusal::Malformed, 0, libc::EPROTO),
        ];
        for (reason, errno, want) in cases {
            assert_eq!(refusal_errno(reason, errno), want, "{reason:?} {errno}");
        }
    }

    #[test]
    fn breaks_are_told_from_the_callers_own_errors() {
        for errno in [
            libc::ENOMEM,
            libc::ENODEV,
            libc::ENOTCONN,
            libc::ECONNRESET,
            libc::EPIPE,
            libc::ETIMEDOUT,
        ] {
            assert!(is_break(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::EAGAIN, libc::EINTR, libc::EINVAL] {
            assert!(!is_break(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        assert!(!is_break(&io::Error::other("not from the kernel")));
        assert!(is_retryable_dial(&io::Error::from_raw_os_error(
            libc::ENODEV
        )));
        assert!(!is_retryable_dial(&io::Error::from_raw_os_error(
            libc::EACCES
        )));
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let opts = SessionOptions {
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(35),
            ..SessionOptions::default()
        };
        let mut b = Backoff::new(&opts);
        let pauses: Vec<u128> = (0..5).map(|_| b.pause().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 35, 35, 35]);
    }

    /// A frame is one message: a message holding less, or more, is the daemon's mistake.
    #[test]
    fn a_handshake_message_must_be_exactly_one_frame() {
        #[derive(Debug)]
        struct OneMessage(Mutex<Option<Vec<u8>>>);
        impl Transport for OneMessage {
            fn read(&self, _: &mut [u8]) -> io::Result<usize> {
                unreachable!("messages only")
            }
            fn write(&self, buf: &[u8]) -> io::Result<usize> {
                Ok(buf.len())
            }
            fn shutdown(&self, _: Shutdown) -> io::Result<()> {
                Ok(())
            }
            fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
                Ok(())
            }
            fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
                Ok(())
            }
            fn recv_msg(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
                let msg = lock(&self.0).take().unwrap_or_default();
                let n = msg.len().min(buf.len());
                buf[..n].copy_from_slice(&msg[..n]);
                Ok((n, msg.len() > buf.len()))
            }
        }
        let frame = Frame::Listening { port: Port(7) }.encode();
        let read = |bytes: Vec<u8>| read_frame_message(&OneMessage(Mutex::new(Some(bytes))));
        assert!(matches!(read(frame.clone()), Ok(Frame::Listening { .. })));
        assert!(matches!(read(frame[..5].to_vec()), Err(FrameError::Bad(_))));
        let mut more = frame.clone();
        more.push(0);
        assert!(matches!(read(more), Err(FrameError::Bad(_))));
        assert!(matches!(read(vec![0; 200]), Err(FrameError::Bad(_))));
        assert!(matches!(read(Vec::new()), Err(FrameError::Io(_))), "EOF");
    }
}
