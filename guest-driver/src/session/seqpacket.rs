//! Seqpacket sessions: a resumable `SOCK_SEQPACKET` connection to a target, whose messages
//! keep their boundaries across a blackout.
//!
//! Opened like a stream session, over an AF_VSOCK seqpacket connection to the session port
//! with OPEN naming `seqpacket`; every handshake frame (OPEN, OPENED, RESUME, RESUMED,
//! REFUSED) is one message, exactly the frame. Everything else is as for
//! [`super::SessionStream`] (breaks, retries, errnos, concurrency, closing), except that
//! counts are messages:
//! - RESUME's `received` is the messages we read (a message read truncated counts: its rest
//!   is gone, as on a socket);
//! - RESUMED's `received` is the messages the daemon took whole; a message the blackout
//!   cut is not counted, and we send it again;
//! - we keep the last messages whose bytes fit the daemon's window
//!   ([`MessageReplay`](domsock_migration::session::replay::MessageReplay): what the daemon
//!   lacks is within the credit it gave, at most one window) and resend each whole, from
//!   the daemon's count on, after RESUMED;
//! - after RESUMED (a message of its own) the daemon resends the messages we lack, each
//!   whole, and its data follows.
//!
//! Two rules of the kernel's seqpacket send the session follows: a message larger than
//! the window fails with `EMSGSIZE` (the guest kernel refuses a message larger than the
//! peer's buffer; we check against the window before sending), and an empty message
//! sends nothing. One it adds: a send that times out (`EAGAIN`, the caller's write timeout)
//! may have sent part of its message, which the daemon would glue to the next one; so the
//! connection is given up (the daemon drops the part) and the next call resumes.
//!
//! What this module does not do: seqpacket sessions the guest accepts (domsockd offers
//! only stream connections; see [`super::listener`]).

use std::io;
use std::net::Shutdown;
use std::time::Duration;

use domsock_migration::session::SessionId;
use domsock_proto::SocketType;

use super::{Core, Dialer, SessionError, SessionOptions, SessionStats, VsockDialer};

/// A resumable message connection to a target (see the module doc).
#[derive(Debug)]
pub struct SessionSeqPacket {
    core: Core,
}

impl SessionSeqPacket {
    /// Opens a seqpacket session to `(target_cid, target_port)` through the daemon's session
    /// port on the host CID. Guests only. Fails like [`super::SessionStream::connect`].
    pub fn connect(
        target_cid: u32,
        target_port: u32,
        opts: SessionOptions,
    ) -> io::Result<SessionSeqPacket> {
        Self::connect_with(
            Box::new(VsockDialer::host_seqpacket()),
            target_cid,
            target_port,
            opts,
        )
    }

    /// Like [`Self::connect`], reaching the session service through `dialer`, which must
    /// dial message (seqpacket) connections.
    pub fn connect_with(
        dialer: Box<dyn Dialer>,
        target_cid: u32,
        target_port: u32,
        opts: SessionOptions,
    ) -> io::Result<SessionSeqPacket> {
        Core::open(SocketType::SeqPacket, dialer, target_cid, target_port, opts)
            .map(|core| SessionSeqPacket { core })
    }

    /// The session's id (as the daemon logs it).
    pub fn session_id(&self) -> SessionId {
        self.core.id
    }

    /// The daemon's window: the largest message, and the bytes of messages we keep.
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

    /// Sends `msg` as one message, like `send(2)` on a seqpacket socket: its length once
    /// the kernel took it whole (and it is kept for replay). `EMSGSIZE` if it is larger
    /// than the window; an empty message sends nothing.
    pub fn send_msg(&self, msg: &[u8]) -> io::Result<usize> {
        if msg.len() > self.core.window as usize {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        if msg.is_empty() {
            return Ok(0);
        }
        self.core.write(msg)
    }

    /// Receives one message into `buf`: its length and whether it was longer than `buf`
    /// (the rest is gone, as with `MSG_TRUNC`); `(0, false)` once the daemon shut its side
    /// and every message before was read.
    pub fn recv_msg(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        self.core.read_with(buf, |t, b| t.recv_msg(b))
    }

    /// Shuts our write side (repeated after every resume), our read side (locally), or both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.core.shutdown(how)
    }
}
