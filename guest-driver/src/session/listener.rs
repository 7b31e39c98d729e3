//! Sessions the guest accepts: a vsock listener whose port is registered with domsockd's
//! session service, so that host connections to it arrive as resumable sessions.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant A as application
//!     participant L as SessionListener
//!     participant D as domsockd (2, 1022)
//!     participant H as host process
//!     A->>L: bind(port)
//!     Note over L: bind(2) the port: claimed, connections refused until listen(2)
//!     L->>D: connect (2, 1022), LISTEN port, stream
//!     D->>L: LISTENING port (this connection is the registration's keepalive)
//!     Note over L: listen(2)
//!     H->>D: connect to the guest's port
//!     D->>L: (vsock) connection to port
//!     A->>L: accept()
//!     D->>L: OFFERED id, secret, nonce N1, window W, park timeout T, then H's bytes
//!     L->>A: Accepted::Session (a SessionStream: it resumes with RESUME like any other)
//!     Note over L,D: device gone: the keepalive breaks
//!     L->>D: connect (2, 1022) again, LISTEN port (same retries and backoff as a resume)
//!     D->>L: LISTENING port
//! ```
//!
//! **Registering.** [`SessionListener::bind`] claims the port first (`bind(2)`: host
//! connections are refused until `listen(2)`), registers it (LISTEN, answered LISTENING),
//! and only then listens: no host connection can reach the port before the daemon knows
//! to offer it as a session. The registration's connection (the *keepalive*) carries
//! nothing after LISTENING; a thread holds it for the listener's life and reads it every
//! [`ListenerOptions::keepalive_check`], which is how it notices a break (a vsock
//! connection idle across an unplug fails with `ENOTCONN` on its next call). The daemon
//! keeps a registration whose connection broke for its park timeout, so the thread
//! registers again on a new connection, by the rules of a resume (the errnos retried and
//! the pauses, doubling from [`SessionOptions::backoff_min`] to
//! [`SessionOptions::backoff_max`], cut short by the vsock driver's `bind` uevent), but
//! without a deadline: the listening socket survives
//! any blackout, so giving up would gain nothing. The new registration stands before the
//! old connection is closed, so the daemon never forgets the port in between. A refusal,
//! or a connect error that waiting does not cure, ends the keeping:
//! [`SessionListener::registration_failure`] says why, and host connections arrive raw
//! from then on (below).
//!
//! **Accepting.** [`SessionListener::accept`] takes the next vsock connection and waits up
//! to [`ListenerOptions::offer_timeout`] for its first bytes:
//! - OFFERED, read exactly (the host's bytes may follow in the same packet and stay
//!   unread): [`Accepted::Session`], a [`SessionStream`] like one the guest opened.
//! - Bytes that are not a session frame (they do not start like the magic `DSSN`):
//!   [`Accepted::Raw`]. The daemon sends OFFERED to every host connection to a registered
//!   port, so this one came while the daemon did not know the port (its registration
//!   expired in a blackout longer than the park timeout and the thread has not registered
//!   again yet, or it was refused). The bytes read are the first its reads return.
//! - Nothing within the offer timeout, or EOF: [`Accepted::Raw`] too (a host that waits for
//!   the guest to speak first); such a connection delays `accept` by the offer timeout.
//! - A session frame other than OFFERED, or a malformed one: `EPROTO`, and the connection
//!   is closed; the listener is unaffected. A connection failing before its OFFERED is
//!   whole: that errno (the daemon parks the session it offered and lets it expire).
//!
//! **Closing.** Dropping the listener closes the keepalive (the daemon then forgets the
//! registration) and the listening socket. Sessions it accepted live on: each has its own
//! dialer for its resumes.
//!
//! What this module does not do: seqpacket listeners (domsockd refuses a seqpacket LISTEN
//! as `Unsupported`, and offers only stream connections), or non-blocking accepts.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use domsock_migration::session::wire::{Frame, WireError, MAX_FRAME_LEN, PREAMBLE_LEN};
use domsock_proto::{Port, SocketType};
use domsock_uevent::{DeviceWatch, Wake};

use super::{
    at_least_1ms, finish_frame, is_retryable_dial, lock, read_frame, write_all, Backoff, Core,
    Dialer, FrameError, Greeting, SessionError, SessionOptions, SessionStream, Start, Transport,
    VsockDialer,
};
use crate::vsock::{SockType, VsockAddr, VsockSocket};

/// How long an accepted connection may take to show its first bytes by default.
pub const OFFER_TIMEOUT_MS: u64 = 2_000;
/// How often the registration's connection is checked by default.
pub const KEEPALIVE_CHECK_MS: u64 = 200;
/// Pending connections the listening socket queues by default.
pub const LISTEN_BACKLOG: i32 = 16;
/// The session frames' magic ("DSSN") is their first bytes ([`Frame::decode`] checks it).
const MAGIC_LEN: usize = 4;

/// The longest slice of a registration pause spent watching for the device before
/// looking at whether the listener is being dropped.
const STOP_CHECK: Duration = Duration::from_millis(25);

/// The listening socket, as a listener needs it.
pub trait Acceptor: Send + Sync + fmt::Debug {
    /// Starts taking connections (`listen(2)`); the port was claimed before.
    fn listen(&self) -> io::Result<()>;
    /// The next connection and its peer, waiting up to `timeout` (`None`: no bound; then
    /// `EAGAIN`).
    fn accept(&self, timeout: Option<Duration>) -> io::Result<(Box<dyn Transport>, VsockAddr)>;
}

/// The real acceptor: an AF_VSOCK stream socket bound to a guest port. Guests only.
#[derive(Debug)]
pub struct VsockAcceptor {
    sock: VsockSocket,
    backlog: i32,
}

impl VsockAcceptor {
    /// Claims `port` on every local CID (`bind(2)`), not listening yet.
    pub fn bind(port: u32, backlog: i32) -> io::Result<Self> {
        Ok(Self {
            sock: VsockSocket::bind(SockType::Stream, port)?,
            backlog,
        })
    }
}

impl Acceptor for VsockAcceptor {
    fn listen(&self) -> io::Result<()> {
        self.sock.start_listening(self.backlog)
    }

    fn accept(&self, timeout: Option<Duration>) -> io::Result<(Box<dyn Transport>, VsockAddr)> {
        // `SO_RCVTIMEO` bounds accept(2); zero means no bound.
        self.sock
            .set_read_timeout(timeout.map_or(Duration::ZERO, at_least_1ms))?;
        let (sock, peer) = self.sock.accept()?;
        Ok((Box::new(sock), peer))
    }
}

/// How a listener behaves; [`Default`] suits a real guest.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// For the sessions it accepts, and for its registrations' connects and handshakes.
    pub session: SessionOptions,
    /// Bounds each accept (`EAGAIN` after it); `None`: unbounded.
    pub accept_timeout: Option<Duration>,
    /// How long an accepted connection may take to show its first bytes before it is taken
    /// for a raw one (module doc).
    pub offer_timeout: Duration,
    /// How often the registration's connection is checked for a break.
    pub keepalive_check: Duration,
    /// Pending connections the listening socket queues.
    pub backlog: i32,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        Self {
            session: SessionOptions::default(),
            accept_timeout: None,
            offer_timeout: Duration::from_millis(OFFER_TIMEOUT_MS),
            keepalive_check: Duration::from_millis(KEEPALIVE_CHECK_MS),
            backlog: LISTEN_BACKLOG,
        }
    }
}

/// A connection the listener accepted.
#[derive(Debug)]
pub enum Accepted {
    /// It came with OFFERED: a session (boxed: it is large next to a raw stream).
    Session(Box<SessionStream>),
    /// It came without (module doc): a plain connection.
    Raw(RawStream),
}

impl Accepted {
    /// The session, if it is one.
    pub fn session(&self) -> Option<&SessionStream> {
        match self {
            Accepted::Session(s) => Some(s),
            Accepted::Raw(_) => None,
        }
    }

    /// Reads like `recv(2)`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Accepted::Session(s) => s.recv(buf),
            Accepted::Raw(r) => r.recv(buf),
        }
    }

    /// Writes like `send(2)`.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Accepted::Session(s) => s.send(buf),
            Accepted::Raw(r) => r.send(buf),
        }
    }

    /// Sends all of `buf`.
    pub fn send_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Accepted::Session(s) => s.send_all(buf),
            Accepted::Raw(r) => r.send_all(buf),
        }
    }

    /// `shutdown(2)`, as the session or the socket does it.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Accepted::Session(s) => s.shutdown(how),
            Accepted::Raw(r) => r.shutdown(how),
        }
    }
}

/// An accepted connection that is not a session: the transport, and the bytes read while
/// telling it from one, which its reads return first.
#[derive(Debug)]
pub struct RawStream {
    transport: Box<dyn Transport>,
    prefix: Mutex<Vec<u8>>,
}

impl RawStream {
    fn new(
        transport: Box<dyn Transport>,
        prefix: &[u8],
        opts: &SessionOptions,
    ) -> io::Result<Self> {
        transport.set_read_timeout(opts.read_timeout.map(at_least_1ms))?;
        transport.set_write_timeout(opts.write_timeout.map(at_least_1ms))?;
        Ok(Self {
            transport,
            prefix: Mutex::new(prefix.to_vec()),
        })
    }

    /// Reads like `recv(2)`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        {
            let mut prefix = lock(&self.prefix);
            if !prefix.is_empty() {
                let n = prefix.len().min(buf.len());
                buf[..n].copy_from_slice(&prefix[..n]);
                prefix.drain(..n);
                return Ok(n);
            }
        }
        self.transport.read(buf)
    }

    /// Writes like `send(2)`.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.transport.write(buf)
    }

    /// Sends all of `buf`.
    pub fn send_all(&self, buf: &[u8]) -> io::Result<()> {
        write_all(&*self.transport, buf)
    }

    /// `shutdown(2)`.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.transport.shutdown(how)
    }
}

impl Read for &RawStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl Write for &RawStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The registration, shared by the listener and its keepalive thread.
#[derive(Debug, Default)]
struct Keeper {
    state: Mutex<KeepState>,
    /// Signalled when the listener is dropped (ends a pause between attempts).
    wake: Condvar,
}

#[derive(Debug, Default)]
struct KeepState {
    /// The connection that keeps the registration.
    conn: Option<Arc<dyn Transport>>,
    /// A connection being registered: the listener's drop shuts it to end the handshake.
    pending: Option<Arc<dyn Transport>>,
    stopping: bool,
    /// Successful registrations (LISTENING frames).
    registrations: u64,
    /// Connects to the session port made to register, successful or not.
    dials: u64,
    /// Why the thread stopped keeping the registration.
    failed: Option<SessionError>,
}

/// How one registration attempt failed.
#[derive(Debug)]
enum RegisterError {
    /// Worth another attempt: the connect or the handshake's connection failed.
    Retry(io::Error),
    /// Waiting does not help.
    Fatal(SessionError),
}

impl RegisterError {
    fn into_io(self) -> io::Error {
        match self {
            RegisterError::Retry(e) => FrameError::Io(e).into_io("answer to LISTEN"),
            RegisterError::Fatal(e) => e.to_io(),
        }
    }
}

/// Dials the session service and registers `port`: the keepalive connection, its reads
/// bounded by `check`. `dialed` sees the connection before its handshake.
fn register(
    dialer: &mut dyn Dialer,
    port: u32,
    opts: &SessionOptions,
    check: Duration,
    dialed: &dyn Fn(&Arc<dyn Transport>),
) -> Result<Arc<dyn Transport>, RegisterError> {
    let t: Arc<dyn Transport> = match dialer.dial(at_least_1ms(opts.connect_timeout)) {
        Ok(t) => Arc::from(t),
        Err(e) if is_retryable_dial(&e) => return Err(RegisterError::Retry(e)),
        Err(e) => {
            return Err(RegisterError::Fatal(match e.raw_os_error() {
                Some(errno) => SessionError::Dial { errno },
                None => SessionError::Protocol(format!("connect: {e}")),
            }))
        }
    };
    dialed(&t);
    let bound = Some(at_least_1ms(opts.handshake_timeout));
    let listen = Frame::Listen {
        port: Port(port),
        socket_type: SocketType::Stream,
    };
    t.set_read_timeout(bound)
        .and_then(|()| t.set_write_timeout(bound))
        .and_then(|()| write_all(&*t, &listen.encode()))
        .map_err(RegisterError::Retry)?;
    match read_frame(&*t) {
        Ok(Frame::Listening { port: p }) if p.0 == port => {
            t.set_read_timeout(Some(at_least_1ms(check)))
                .map_err(RegisterError::Retry)?;
            Ok(t)
        }
        Ok(Frame::Listening { port: p }) => Err(RegisterError::Fatal(SessionError::Protocol(
            format!("LISTENING names port {} for a LISTEN of port {port}", p.0),
        ))),
        Ok(Frame::Refused { reason, errno }) => Err(RegisterError::Fatal(SessionError::Refused {
            during: "listen",
            reason,
            errno,
        })),
        Ok(other) => Err(RegisterError::Fatal(SessionError::Protocol(format!(
            "answer to LISTEN is {}",
            other.name()
        )))),
        Err(FrameError::Io(e)) => Err(RegisterError::Retry(e)),
        Err(FrameError::Bad(e)) => Err(RegisterError::Fatal(SessionError::Protocol(format!(
            "answer to LISTEN: {e}"
        )))),
    }
}

/// The keepalive thread: reads the registration's connection until it breaks, then
/// registers again; ends when the listener is dropped or registering fails for good.
fn keep_registered(keeper: &Keeper, dialer: &mut dyn Dialer, port: u32, opts: &ListenerOptions) {
    let mut buf = [0u8; 64];
    loop {
        let conn = {
            let st = lock(&keeper.state);
            match (&st.conn, st.stopping) {
                (Some(conn), false) => Arc::clone(conn),
                _ => return,
            }
        };
        let r = conn.read(&mut buf);
        if lock(&keeper.state).stopping {
            return;
        }
        match r {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Ok(0) => tracing::debug!(port, "the daemon closed the listener registration"),
            Ok(n) => tracing::warn!(
                port,
                n,
                "bytes on a listener registration; registering again"
            ),
            Err(e) => tracing::debug!(port, "listener registration broke: {e}"),
        }
        if !register_again(keeper, dialer, port, opts) {
            return;
        }
    }
}

/// Registers on a new connection, retrying with backoff; false when the thread is done.
fn register_again(
    keeper: &Keeper,
    dialer: &mut dyn Dialer,
    port: u32,
    opts: &ListenerOptions,
) -> bool {
    let started = Instant::now();
    let mut backoff = Backoff::new(&opts.session);
    // Before the first attempt, so a device that comes back after it is not missed.
    let watch = match opts.session.watch_device {
        true => DeviceWatch::open(),
        false => DeviceWatch::sleep_only(),
    };
    loop {
        if lock(&keeper.state).stopping {
            return false;
        }
        let stash = |t: &Arc<dyn Transport>| lock(&keeper.state).pending = Some(Arc::clone(t));
        let outcome = register(dialer, port, &opts.session, opts.keepalive_check, &stash);
        let mut st = lock(&keeper.state);
        st.pending = None;
        st.dials += 1;
        if st.stopping {
            // A registration that just succeeded closes with `outcome` here.
            return false;
        }
        match outcome {
            Ok(conn) => {
                // The old connection closes after the new registration stands: the daemon
                // keeps the newer one and forgets nothing in between.
                let old = st.conn.replace(conn);
                st.registrations += 1;
                drop(st);
                drop(old);
                tracing::info!(
                    port,
                    ms = started.elapsed().as_millis() as u64,
                    "session listener registered again"
                );
                return true;
            }
            Err(RegisterError::Fatal(e)) => {
                tracing::warn!(port, "session listener no longer registered: {e}");
                st.failed = Some(e);
                st.conn = None;
                return false;
            }
            Err(RegisterError::Retry(e)) => {
                tracing::debug!(port, "registering again: {e}");
                let pause = backoff.pause();
                if !watch.watching() {
                    let _ = keeper
                        .wake
                        .wait_timeout_while(st, pause, |s| !s.stopping)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    continue;
                }
                drop(st);
                // The device's uevent ends the pause; `stopping` is looked at between
                // slices, so dropping the listener waits at most one slice for this thread.
                let until = Instant::now() + pause;
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() || lock(&keeper.state).stopping {
                        break;
                    }
                    if watch.wait(left.min(STOP_CHECK)) == Wake::Device {
                        backoff = Backoff::new(&opts.session);
                        break;
                    }
                }
            }
        }
    }
}

/// A guest port whose host connections are sessions (see the module doc).
pub struct SessionListener {
    port: u32,
    acceptor: Box<dyn Acceptor>,
    opts: ListenerOptions,
    /// Makes the dialer of each accepted session.
    new_dialer: Box<dyn Fn() -> Box<dyn Dialer> + Send + Sync>,
    keeper: Arc<Keeper>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for SessionListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionListener")
            .field("port", &self.port)
            .field("acceptor", &self.acceptor)
            .field("keeper", &self.keeper)
            .finish_non_exhaustive()
    }
}

impl SessionListener {
    /// Binds AF_VSOCK stream port `port`, registers it with the daemon on the host CID and
    /// listens. Guests only. Fails with the errno of the bind, the connect, or the refusal
    /// (`Unsupported` `EOPNOTSUPP`, `TooMany` `EAGAIN`, `Malformed` `EPROTO`); a LISTENING
    /// for another port is `EPROTO`, no answer within the handshake timeout `ETIMEDOUT`.
    pub fn bind(port: u32, opts: ListenerOptions) -> io::Result<SessionListener> {
        let acceptor = VsockAcceptor::bind(port, opts.backlog)?;
        Self::bind_with(Box::new(acceptor), VsockDialer::host(), port, opts)
    }

    /// Like [`Self::bind`] with `acceptor` (bound, not listening) and `dialer`, which is
    /// cloned for the registrations and for every session accepted.
    pub fn bind_with<D: Dialer + Clone + Sync + 'static>(
        acceptor: Box<dyn Acceptor>,
        dialer: D,
        port: u32,
        opts: ListenerOptions,
    ) -> io::Result<SessionListener> {
        let new_dialer = move || Box::new(dialer.clone()) as Box<dyn Dialer>;
        let mut keepalive_dialer = new_dialer();
        let conn = register(
            &mut *keepalive_dialer,
            port,
            &opts.session,
            opts.keepalive_check,
            &|_| {},
        )
        .map_err(RegisterError::into_io)?;
        // On failure `conn` closes and the daemon forgets the port again.
        acceptor.listen()?;
        tracing::debug!(port, "session listener registered and listening");
        let keeper = Arc::new(Keeper {
            state: Mutex::new(KeepState {
                conn: Some(conn),
                registrations: 1,
                dials: 1,
                ..KeepState::default()
            }),
            wake: Condvar::new(),
        });
        let thread = {
            let keeper = Arc::clone(&keeper);
            let opts = opts.clone();
            thread::Builder::new()
                .name(format!("session-listen-{port}"))
                .spawn(move || keep_registered(&keeper, &mut *keepalive_dialer, port, &opts))?
        };
        Ok(SessionListener {
            port,
            acceptor,
            opts,
            new_dialer: Box::new(new_dialer),
            keeper,
            thread: Some(thread),
        })
    }

    /// The guest port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Successful registrations so far (1 after `bind`, one more after each renewal).
    pub fn registrations(&self) -> u64 {
        lock(&self.keeper.state).registrations
    }

    /// Connects to the session port made to register, successful or not.
    pub fn registration_dials(&self) -> u64 {
        lock(&self.keeper.state).dials
    }

    /// Why the listener stopped keeping its registration, if it did.
    pub fn registration_failure(&self) -> Option<SessionError> {
        lock(&self.keeper.state).failed.clone()
    }

    /// The next connection: a session if it came with OFFERED, else raw (module doc).
    pub fn accept(&self) -> io::Result<(Accepted, VsockAddr)> {
        let (t, peer) = self.acceptor.accept(self.opts.accept_timeout)?;
        let accepted = self.first_bytes(t)?;
        if let Accepted::Session(s) = &accepted {
            tracing::debug!(port = self.port, %peer, session = %s.session_id(), "session accepted");
        } else {
            tracing::info!(port = self.port, %peer, "connection accepted without OFFERED: raw");
        }
        Ok((accepted, peer))
    }

    /// Tells a session from a raw connection by its first bytes.
    fn first_bytes(&self, t: Box<dyn Transport>) -> io::Result<Accepted> {
        let opts = &self.opts.session;
        t.set_read_timeout(Some(at_least_1ms(self.opts.offer_timeout)))?;
        let mut buf = [0u8; MAX_FRAME_LEN];
        let mut have = 0;
        let mut framed = false;
        while have < PREAMBLE_LEN {
            match t.read(&mut buf[have..PREAMBLE_LEN]) {
                Ok(0) => return RawStream::new(t, &buf[..have], opts).map(Accepted::Raw),
                Ok(n) => have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && have < MAGIC_LEN => {
                    return RawStream::new(t, &buf[..have], opts).map(Accepted::Raw)
                }
                Err(e) => return Err(FrameError::Io(e).into_io("OFFERED")),
            }
            match Frame::decode(&buf[..have]) {
                Err(WireError::BadMagic(_)) => {
                    return RawStream::new(t, &buf[..have], opts).map(Accepted::Raw)
                }
                Err(e) => return Err(SessionError::Protocol(format!("first frame: {e}")).to_io()),
                Ok(_) if have >= MAGIC_LEN && !framed => {
                    // A frame: the rest of it comes within the handshake timeout.
                    framed = true;
                    t.set_read_timeout(Some(at_least_1ms(opts.handshake_timeout)))?;
                }
                Ok(_) => {}
            }
        }
        let frame = finish_frame(&*t, &mut buf).map_err(|e| e.into_io("OFFERED"))?;
        let greeting = Greeting::from_frame(frame, Start::Accept).map_err(|e| e.to_io())?;
        let core = Core::establish(
            SocketType::Stream,
            t,
            (self.new_dialer)(),
            greeting,
            opts.clone(),
        )?;
        Ok(Accepted::Session(Box::new(SessionStream { core })))
    }
}

impl Drop for SessionListener {
    /// Stops the keepalive thread and closes the registration: the daemon forgets the port.
    fn drop(&mut self) {
        let shut: Vec<Arc<dyn Transport>> = {
            let mut st = lock(&self.keeper.state);
            st.stopping = true;
            st.conn.iter().chain(&st.pending).cloned().collect()
        };
        self.keeper.wake.notify_all();
        for t in shut {
            // Wakes the thread's read or handshake.
            let _ = t.shutdown(Shutdown::Both);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        lock(&self.keeper.state).conn = None;
    }
}
