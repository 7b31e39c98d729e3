//! The session library ([`SessionStream`], [`SessionListener`], [`SessionSeqPacket`])
//! against a fake session service over Unix sockets: no vsock, no daemon process, no VM.
//!
//! The fake speaks the real frames (`session::wire`), checks resume proofs for real
//! (`session::proof`) and keeps everything it sent (a real daemon acknowledges by the
//! guest's `fwd_cnt`, which a Unix socket cannot show). The client end of each connection
//! is a [`FakeTransport`] that behaves like a guest vsock socket where it matters:
//! - **credit**: a write takes at most `window - (sent - read by the daemon)` bytes on this
//!   connection, as the guest kernel obeys the daemon's credit; so whatever a break loses
//!   in flight fits the replay window, exactly as on vsock. On a message connection a
//!   message goes whole once the credit covers it, and one larger than the window is
//!   `EMSGSIZE`, as the guest kernel does;
//! - **breaks are errors**: once the daemon (or a client-side fault) breaks the connection,
//!   every call fails with the break's errno (ENOMEM, ENODEV, ECONNRESET, ENOTCONN, EPIPE,
//!   ETIMEDOUT), and bytes still queued either way are lost, as on a reset vsock socket;
//! - **shutdown bits** reach the daemon: a read of 0 there is the guest's EOF only if the
//!   guest shut its write side and not its read side (an abandoned connection otherwise),
//!   which is the rule the real daemon applies to vsock SHUTDOWN flags.
//!
//! The dialer models the device being away: after a break, the next few connects fail with
//! ENODEV, ECONNRESET, ETIMEDOUT, ENOTCONN, ECONNREFUSED or ENXIO.
//!
//! Three modes, as the real daemon has them:
//! - **OPEN** sessions over stream pairs (`SessionStream::connect_with`);
//! - **seqpacket** sessions over `SOCK_SEQPACKET` pairs, where every frame and every data
//!   message is one socket message; the fake asserts a handshake message is exactly one
//!   frame and counts messages;
//! - **listeners**: a `LISTEN` connection is answered `LISTENING` and kept as the
//!   registration's keepalive (a break orphans it, the client closing it forgets it); the
//!   test plays the host through [`Host`]: a host connection to a registered port starts
//!   with `OFFERED` and becomes a session like an opened one, to an unregistered port it is
//!   raw. [`Host::blackout`] breaks every connection at once and keeps connects failing,
//!   as an unplug does; [`Host::forget`] drops the registration, as the daemon does when a
//!   blackout outlasts the park timeout (the fake lets the host connect meanwhile, to
//!   stand for the first connections after the device is back).
//!
//! Two limits of the fake, both real properties of the protocol and documented in the
//! session module: the daemon never breaks a connection before the client has read the
//! daemon's answer frame whole (a RESUMED lost in flight leaves the client with a stale
//! nonce), nor after the client's last call (it read EOF, on any connection of the
//! session, and shut its write side): nobody would notice, and what was in flight would
//! be lost.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{self, IoSliceMut, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use domsock_guest::pattern::{Checksum, PatternStream};
use domsock_guest::session::listener::Acceptor;
use domsock_guest::session::{
    Accepted, Dialer, ListenerOptions, SessionError, SessionListener, SessionOptions,
    SessionSeqPacket, SessionStats, SessionStream, Transport,
};
use domsock_guest::vsock::VsockAddr;
use domsock_migration::session::proof::ResumeClaim;
use domsock_migration::session::wire::{Closed, Frame, Refusal, MAX_FRAME_LEN, PREAMBLE_LEN};
use domsock_migration::session::{Nonce, Secret, SessionId};
use domsock_proto::{Port, SocketType};

/// Bound on every blocking step; a test that needs longer is broken.
const STEP: Duration = Duration::from_secs(20);
/// The daemon's answer frames are at most this long (OPENED); client-side read faults
/// strike only after it.
const LONGEST_ANSWER: u64 = 80;
/// The guest port the listener tests register.
const LISTEN_PORT: u32 = 6000;
const BREAK_ERRNOS: [i32; 6] = [
    libc::ENOMEM,
    libc::ENODEV,
    libc::ECONNRESET,
    libc::ENOTCONN,
    libc::EPIPE,
    libc::ETIMEDOUT,
];
const ABSENT_ERRNOS: [i32; 6] = [
    libc::ENODEV,
    libc::ECONNRESET,
    libc::ETIMEDOUT,
    libc::ENOTCONN,
    libc::ECONNREFUSED,
    libc::ENXIO,
];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Keep the first panic as the test's message instead of a cascade of poison errors.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn os(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// Aborts the test binary if a test hangs instead of finishing.
fn watchdog() {
    thread::spawn(|| {
        thread::sleep(Duration::from_secs(240));
        eprintln!("session tests: watchdog expired, aborting");
        std::process::abort();
    });
}

/// Waits until `cond` holds, for at most [`STEP`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !cond() {
        assert!(Instant::now() < deadline, "waited {STEP:?} for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// xorshift64: deterministic per seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

/// Messages of random sizes in `1..=max` (now and then exactly `max`): their bytes, one
/// after the other, and where each ends.
fn message_stream(seed: u64, count: usize, max: usize) -> (Vec<u8>, Vec<usize>) {
    let mut rng = Rng::new(seed ^ 0x5e9);
    let mut ends = Vec::with_capacity(count);
    let mut at = 0;
    for _ in 0..count {
        at += if rng.chance(5) {
            max
        } else {
            1 + rng.below(max.min(2_000) as u64) as usize
        };
        ends.push(at);
    }
    (PatternStream::new(seed).take(at), ends)
}

/// `bytes` cut at `ends`.
fn split_messages(bytes: &[u8], ends: &[usize]) -> Vec<Vec<u8>> {
    let mut from = 0;
    ends.iter()
        .map(|&end| {
            let m = bytes[from..end].to_vec();
            from = end;
            m
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The client's end of one connection.

/// A client-side failure the daemon does not know about: one call fails (a transient
/// ENOMEM, say) while the connection itself stays up, so the client must abandon it, and
/// its other side's blocked call then returns 0 from the client's own shutdown.
#[derive(Debug, Clone, Copy)]
struct Fault {
    on_write: bool,
    /// Bytes this connection moves in that direction before it fails.
    after: u64,
    errno: i32,
}

#[derive(Debug, Default)]
struct LinkState {
    /// The errno every later client call fails with.
    broken: Option<i32>,
    /// Bytes the client's "kernel" accepted on this connection.
    client_sent: u64,
    /// Bytes the daemon read from it (its credit comes back with them).
    daemon_read: u64,
    /// Bytes handed to the client by reads.
    client_received: u64,
    client_shut_read: bool,
    client_shut_write: bool,
    /// Length of the daemon's answer frame, once written.
    answer_len: u64,
    fault: Option<Fault>,
}

#[derive(Debug)]
struct Link {
    st: Mutex<LinkState>,
    credit_back: Condvar,
    window: u64,
    /// A message connection (seqpacket).
    messages: bool,
    /// Set once the connection carries a session: that session's "the client read the
    /// daemon's EOF" flag, which a read of 0 on any of its connections raises. Once the
    /// client has also shut its write side it makes no more calls.
    session_eof: OnceLock<Arc<AtomicBool>>,
}

impl Link {
    fn new(window: u64, messages: bool, fault: Option<Fault>) -> Arc<Self> {
        Arc::new(Self {
            st: Mutex::new(LinkState {
                fault,
                ..LinkState::default()
            }),
            credit_back: Condvar::new(),
            window,
            messages,
            session_eof: OnceLock::new(),
        })
    }

    fn join_session(&self, eof: &Arc<AtomicBool>) {
        let _ = self.session_eof.set(Arc::clone(eof));
    }

    fn daemon_read(&self, n: usize) {
        lock(&self.st).daemon_read += n as u64;
        self.credit_back.notify_all();
    }

    /// The daemon breaks the connection; false if the client would never notice (it made
    /// its last call) or has not read the answer frame yet.
    fn break_with(&self, errno: i32) -> bool {
        let mut st = lock(&self.st);
        let client_done = self
            .session_eof
            .get()
            .is_some_and(|eof| eof.load(Ordering::SeqCst))
            && st.client_shut_write;
        if st.broken.is_some() || client_done || st.client_received < st.answer_len {
            return false;
        }
        st.broken = Some(errno);
        drop(st);
        self.credit_back.notify_all();
        true
    }
}

#[derive(Debug)]
struct FakeTransport {
    sock: UnixStream,
    link: Arc<Link>,
}

impl FakeTransport {
    /// What a read that returned `r` into a buffer of `want` bytes means for the client.
    fn after_read(&self, r: io::Result<(usize, bool)>, want: usize) -> io::Result<(usize, bool)> {
        let mut st = lock(&self.link.st);
        if let Some(e) = st.broken {
            // Whatever the read got is lost with the connection.
            return Err(os(e));
        }
        match r {
            Ok((0, false)) => {
                if want > 0 || self.link.messages {
                    if let Some(eof) = self.link.session_eof.get() {
                        eof.store(true, Ordering::SeqCst);
                    }
                }
                Ok((0, false))
            }
            Ok((n, truncated)) => {
                if let Some(f) = st.fault.filter(|f| !f.on_write) {
                    if st.client_received + n as u64 >= f.after {
                        // What this call read is lost; the socket itself stays up.
                        st.fault = None;
                        return Err(os(f.errno));
                    }
                }
                st.client_received += n as u64;
                Ok((n, truncated))
            }
            Err(e) => Err(e),
        }
    }
}

impl Transport for FakeTransport {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = lock(&self.link.st).broken {
            return Err(os(e));
        }
        let r = Transport::read(&self.sock, buf).map(|n| (n, false));
        self.after_read(r, buf.len()).map(|(n, _)| n)
    }

    fn recv_msg(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        assert!(self.link.messages, "recv_msg on a stream connection");
        if let Some(e) = lock(&self.link.st).broken {
            return Err(os(e));
        }
        let want = buf.len();
        let r = nix::sys::socket::recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut [IoSliceMut::new(buf)],
            None,
            nix::sys::socket::MsgFlags::empty(),
        )
        .map(|m| {
            (
                m.bytes,
                m.flags.contains(nix::sys::socket::MsgFlags::MSG_TRUNC),
            )
        })
        .map_err(io::Error::from);
        self.after_read(r, want)
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let deadline = Instant::now() + STEP;
        let mut st = lock(&self.link.st);
        let credit = loop {
            if let Some(e) = st.broken {
                return Err(os(e));
            }
            if st.client_shut_write {
                return Err(os(libc::EPIPE));
            }
            if let Some(f) = st.fault.filter(|f| f.on_write) {
                if st.client_sent >= f.after {
                    st.fault = None;
                    return Err(os(f.errno));
                }
            }
            if self.link.messages && buf.len() as u64 > self.link.window {
                return Err(os(libc::EMSGSIZE));
            }
            let credit = self.link.window - (st.client_sent - st.daemon_read);
            let enough = match self.link.messages {
                true => credit >= buf.len() as u64,
                false => credit > 0,
            };
            if enough {
                break credit;
            }
            assert!(Instant::now() < deadline, "no credit for {STEP:?}");
            st = self
                .link
                .credit_back
                .wait_timeout(st, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        let n = buf.len().min(credit as usize);
        // Reserved before the write: the daemon may read the bytes before we relock.
        st.client_sent += n as u64;
        drop(st);
        let r = Transport::write(&self.sock, &buf[..n]);
        let mut st = lock(&self.link.st);
        match r {
            Ok(k) => {
                st.client_sent -= (n - k) as u64;
                Ok(k)
            }
            Err(e) => Err(st.broken.map_or(e, os)),
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut st = lock(&self.link.st);
        match how {
            Shutdown::Read => st.client_shut_read = true,
            Shutdown::Write => st.client_shut_write = true,
            Shutdown::Both => {
                st.client_shut_read = true;
                st.client_shut_write = true;
            }
        }
        let broken = st.broken;
        drop(st);
        self.link.credit_back.notify_all();
        let r = self.sock.shutdown(how);
        match broken {
            Some(e) => Err(os(e)),
            None => r,
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_write_timeout(timeout)
    }
}

/// A connected pair of Unix sockets: stream, or seqpacket (each write one message).
fn socket_pair(messages: bool) -> io::Result<(UnixStream, UnixStream)> {
    if !messages {
        return UnixStream::pair();
    }
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    // std's UnixStream on a seqpacket fd: read(2) and write(2) move one message each.
    Ok((UnixStream::from(a), UnixStream::from(b)))
}

// ---------------------------------------------------------------------------------------
// The dialer: a socket pair per connect, handed to the daemon like an accepted connection.

/// What connects meet; shared by the dialer and the daemon.
#[derive(Debug)]
struct Plan {
    /// Connects still to fail (the device is away).
    absent_for: u64,
    /// After the first break, every connect fails with this.
    permanent_after_break: Option<i32>,
    broke_once: bool,
    faults_left: u32,
    /// Typical bytes before a client-side fault.
    fault_every: u64,
    rng: Rng,
    dials: u64,
    faults: u32,
}

/// What reaches the fake daemon.
#[derive(Debug)]
enum Incoming {
    /// A client connect (the daemon's end and its link).
    Dial(UnixStream, Arc<Link>),
    /// The host connects to the guest's port; the answer is the connection's index once it
    /// is queued for accept, or the errno of a refusal.
    HostConnect {
        out: Arc<Vec<u8>>,
        /// A raw host waits this long before its first byte.
        silent_for: Duration,
        reply: Sender<io::Result<usize>>,
    },
    /// Every connection breaks and the next `absent_for` connects fail; the answer is how
    /// many registration connections broke.
    Blackout { absent_for: u64, reply: Sender<u32> },
    /// Connects work again.
    DeviceBack,
    /// The registration is forgotten (it outlived the park timeout).
    Forget,
}

#[derive(Debug, Clone)]
struct FakeDialer {
    to_daemon: Sender<Incoming>,
    plan: Arc<Mutex<Plan>>,
    window: u64,
    messages: bool,
}

impl Dialer for FakeDialer {
    fn dial(&mut self, _timeout: Duration) -> io::Result<Box<dyn Transport>> {
        let mut plan = lock(&self.plan);
        plan.dials += 1;
        if let Some(e) = plan.permanent_after_break.filter(|_| plan.broke_once) {
            return Err(os(e));
        }
        if plan.absent_for > 0 {
            plan.absent_for -= 1;
            return Err(os(plan.rng.pick(&ABSENT_ERRNOS)));
        }
        let fault = if plan.faults_left > 0 && plan.rng.chance(30) {
            plan.faults_left -= 1;
            plan.faults += 1;
            let on_write = plan.rng.chance(50);
            let every = plan.fault_every;
            Some(Fault {
                on_write,
                after: LONGEST_ANSWER + 1 + plan.rng.below(2 * every),
                errno: plan.rng.pick(&BREAK_ERRNOS),
            })
        } else {
            None
        };
        drop(plan);
        let (client, daemon) = socket_pair(self.messages)?;
        let link = Link::new(self.window, self.messages, fault);
        self.to_daemon
            .send(Incoming::Dial(daemon, Arc::clone(&link)))
            .map_err(|_| os(libc::ECONNREFUSED))?;
        Ok(Box::new(FakeTransport { sock: client, link }))
    }
}

/// The guest's listening socket: connections the host made, once it listens.
#[derive(Debug)]
struct FakeAcceptor {
    listening: Arc<AtomicBool>,
    queue: Mutex<Receiver<Box<dyn Transport>>>,
}

impl Acceptor for FakeAcceptor {
    fn listen(&self) -> io::Result<()> {
        self.listening.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn accept(&self, timeout: Option<Duration>) -> io::Result<(Box<dyn Transport>, VsockAddr)> {
        match lock(&self.queue).recv_timeout(timeout.unwrap_or(STEP)) {
            Ok(t) => Ok((t, VsockAddr::new(2, 49_152))),
            Err(RecvTimeoutError::Timeout) => Err(os(libc::EAGAIN)),
            Err(RecvTimeoutError::Disconnected) => Err(os(libc::ECONNABORTED)),
        }
    }
}

/// The test playing the host and the device.
#[derive(Debug)]
struct Host {
    to_daemon: Sender<Incoming>,
}

impl Host {
    /// Connects to the guest's port; the host process then writes `out` and reads what the
    /// guest sends.
    fn connect(&self, out: Arc<Vec<u8>>) -> io::Result<usize> {
        self.connect_after(out, Duration::ZERO)
    }

    /// Like [`Self::connect`]; a raw host stays silent for `silent_for` first.
    fn connect_after(&self, out: Arc<Vec<u8>>, silent_for: Duration) -> io::Result<usize> {
        let (reply, answer) = mpsc::channel();
        self.to_daemon
            .send(Incoming::HostConnect {
                out,
                silent_for,
                reply,
            })
            .expect("daemon");
        answer.recv_timeout(STEP).expect("daemon answers")
    }

    /// Unplugs the device: every connection breaks, the next `absent_for` connects fail.
    /// Returns how many registration connections broke.
    fn blackout(&self, absent_for: u64) -> u32 {
        let (reply, answer) = mpsc::channel();
        self.to_daemon
            .send(Incoming::Blackout { absent_for, reply })
            .expect("daemon");
        answer.recv_timeout(STEP).expect("daemon answers")
    }

    fn device_back(&self) {
        self.to_daemon.send(Incoming::DeviceBack).expect("daemon");
    }

    fn forget(&self) {
        self.to_daemon.send(Incoming::Forget).expect("daemon");
    }
}

// ---------------------------------------------------------------------------------------
// The fake session service.

/// How the fake answers a RESUME.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ResumeAnswer {
    Honest,
    Refuse(Refusal, u32),
    /// Rotates its nonce without telling the client: the client's proof must fail.
    ForgetNonce,
    /// Claims to have received this many bytes (messages) more than it did.
    CountOffBy(u64),
    /// Says its side reads no more (`closed.rcv`).
    PeerReadsNoMore,
}

/// How the fake answers a LISTEN.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ListenAnswer {
    Honest,
    Refuse(Refusal, u32),
    /// LISTENING for another port.
    WrongPort,
}

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    window: u32,
    park_timeout_ms: u32,
    /// The daemon's stream to the guest (the host process's bytes) of an opened session.
    out: Arc<Vec<u8>>,
    /// Seqpacket: where each of `out`'s messages ends.
    out_ends: Arc<Vec<usize>>,
    /// Sessions are seqpacket (connections carry messages).
    seqpacket: bool,
    max_breaks: u32,
    max_faults: u32,
    /// Typical bytes a connection moves before a break.
    break_every: u64,
    open: Option<(Refusal, u32)>,
    resume: ResumeAnswer,
    listen: ListenAnswer,
    /// Percent of answers written in one write with the first data bytes (streams only).
    coalesce_pct: u64,
    /// Percent of answers written a byte at a time (streams only).
    dribble_pct: u64,
    /// The first connection reads only once the guest shut its write side, then breaks
    /// after this many bytes.
    gen0_break_after_guest_shut: Option<u64>,
    /// The first connection breaks after writing this many bytes.
    gen0_write_break: Option<u64>,
    /// After the first break, connects fail for good with this errno.
    permanent_after_break: Option<i32>,
    /// After each break, up to this many connects fail (device away).
    absent_max: u64,
    /// The client kernel's credit is this much larger than the window OPENED announces
    /// (a daemon whose buffer is larger than it says).
    kernel_window_extra: u32,
    /// The window OFFERED announces, if not `window`.
    offer_window: Option<u32>,
}

impl Scenario {
    fn new(seed: u64, out_len: usize) -> Self {
        Self {
            seed,
            window: 3001,
            park_timeout_ms: 10_000,
            out: Arc::new(PatternStream::new(seed.wrapping_mul(2) + 2).take(out_len)),
            out_ends: Arc::new(Vec::new()),
            seqpacket: false,
            max_breaks: 0,
            max_faults: 0,
            break_every: 20_000,
            open: None,
            resume: ResumeAnswer::Honest,
            listen: ListenAnswer::Honest,
            coalesce_pct: 30,
            dribble_pct: 10,
            gen0_break_after_guest_shut: None,
            gen0_write_break: None,
            permanent_after_break: None,
            absent_max: 4,
            kernel_window_extra: 0,
            offer_window: None,
        }
    }

    /// A seqpacket scenario whose daemon sends `count` messages of up to `max` bytes.
    fn seqpacket(seed: u64, count: usize, max: usize) -> Self {
        let (out, ends) = message_stream(seed.wrapping_mul(2) + 2, count, max);
        Self {
            out: Arc::new(out),
            out_ends: Arc::new(ends),
            seqpacket: true,
            ..Self::new(seed, 0)
        }
    }
}

/// What the daemon saw of one session.
#[derive(Debug, Clone, Default)]
struct SessReport {
    /// The guest's bytes, in the order the daemon accepted them.
    sink: Vec<u8>,
    /// Seqpacket: where each guest message ends in `sink`.
    sink_ends: Vec<usize>,
    /// The connection (generation) on which the guest's EOF arrived.
    guest_eof_on: Option<u64>,
    resumes: u64,
    breaks: u32,
}

/// What the daemon saw, for the test to check. The flat fields are the first session's.
#[derive(Debug)]
struct Report {
    sink: Vec<u8>,
    guest_eof_on: Option<u64>,
    resumes: u64,
    breaks: u32,
    dials: u64,
    faults: u32,
    /// Every session, in the order they began (opened or offered).
    sessions: Vec<SessReport>,
    /// What the guest sent on each raw host connection.
    raw: Vec<Vec<u8>>,
    /// LISTEN frames answered LISTENING.
    listens: u64,
    /// Registration connections the client closed.
    keepalive_closes: u64,
    /// Whether a registration was still known when the daemon ended.
    registered_at_end: bool,
}

#[derive(Debug)]
struct Sess {
    id: SessionId,
    secret: Secret,
    nonce: Nonce,
    /// Guest bytes (messages) accepted.
    received: u64,
    sink: Vec<u8>,
    sink_ends: Vec<usize>,
    /// The furthest offset (message) of `out` ever written to a connection.
    sent_max: u64,
    /// `out` was written whole and the write side shut.
    daemon_done: bool,
    guest_eof_on: Option<u64>,
    breaks: u32,
    resumes: u64,
    rng: Rng,
}

/// One session of the fake daemon.
#[derive(Debug)]
struct Shared {
    sc: Scenario,
    /// The host's data for this session.
    out: Arc<Vec<u8>>,
    sess: Mutex<Sess>,
    plan: Arc<Mutex<Plan>>,
    /// Raised when the client reads the daemon's EOF on any connection of the session.
    client_saw_eof: Arc<AtomicBool>,
}

impl Shared {
    /// How many units (bytes, or messages) of `out` there are.
    fn out_units(&self) -> usize {
        match self.sc.seqpacket {
            true => self.sc.out_ends.len(),
            false => self.out.len(),
        }
    }

    /// Offset in `out` where unit `pos` starts.
    fn out_offset(&self, pos: usize) -> usize {
        match (self.sc.seqpacket, pos) {
            (false, _) => pos,
            (true, 0) => 0,
            (true, p) => self.sc.out_ends[p - 1],
        }
    }
}

#[derive(Debug)]
struct ConnCtl {
    generation: u64,
    sock: UnixStream,
    link: Arc<Link>,
    /// No longer the session's connection: its threads stop and count nothing more.
    detached: AtomicBool,
    read_break_at: Option<u64>,
    write_break_at: Option<u64>,
    hold_reads_until_guest_shut: bool,
    /// Writes nothing: the connection is only there to break (see `hold_reads_...`).
    write_nothing: bool,
    /// The first write waits until the client has read the answer frame, so that a fixed
    /// write trigger can break the connection (see [`Link::break_with`]).
    first_write_after_answer: bool,
}

impl ConnCtl {
    fn is_detached(&self) -> bool {
        self.detached.load(Ordering::SeqCst)
    }

    /// Called with the session locked, so no thread counts a byte after it.
    fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

/// A daemon-initiated break of `ctl`, if the scenario allows one more (`blackout`: it
/// does, the device is gone).
fn try_break(ctl: &ConnCtl, sess: &mut Sess, shared: &Shared, blackout: bool) -> bool {
    if ctl.is_detached() || (!blackout && sess.breaks >= shared.sc.max_breaks) {
        return false;
    }
    let errno = sess.rng.pick(&BREAK_ERRNOS);
    if !ctl.link.break_with(errno) {
        return false;
    }
    sess.breaks += 1;
    let mut plan = lock(&shared.plan);
    plan.broke_once = true;
    if !blackout {
        plan.absent_for = sess.rng.below(shared.sc.absent_max + 1);
    }
    drop(plan);
    ctl.detach();
    true
}

fn reader(ctl: Arc<ConnCtl>, shared: Arc<Shared>) {
    let mut rng = Rng::new(shared.sc.seed ^ (ctl.generation << 40) ^ 0x5ead);
    let messages = shared.sc.seqpacket;
    let largest = shared.sc.window + shared.sc.kernel_window_extra;
    let mut buf = vec![0u8; 8192.max(largest as usize + 1)];
    let mut on_conn = 0u64;
    if ctl.hold_reads_until_guest_shut {
        wait_until("the guest shutting its write side", || {
            lock(&ctl.link.st).client_shut_write
        });
    }
    loop {
        // One message per read on seqpacket: the buffer holds the largest.
        let want = match messages {
            true => buf.len(),
            false => 1 + rng.below(8192) as usize,
        };
        let r = Transport::read(&ctl.sock, &mut buf[..want]);
        let mut sess = lock(&shared.sess);
        if ctl.is_detached() {
            return;
        }
        let n = match r {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            let link = lock(&ctl.link.st);
            // SHUTDOWN(SEND) alone is the guest's EOF; with RCV it abandoned the connection.
            if link.client_shut_write && !link.client_shut_read {
                sess.guest_eof_on = Some(ctl.generation);
            }
            return;
        }
        assert!(
            !messages || n <= shared.sc.window as usize,
            "a message beyond the window"
        );
        sess.sink.extend_from_slice(&buf[..n]);
        if messages {
            let end = sess.sink.len();
            sess.sink_ends.push(end);
            sess.received += 1;
        } else {
            sess.received += n as u64;
        }
        ctl.link.daemon_read(n);
        on_conn += n as u64;
        if ctl.read_break_at.is_some_and(|at| on_conn >= at)
            && try_break(&ctl, &mut sess, &shared, false)
        {
            return;
        }
    }
}

fn writer(ctl: Arc<ConnCtl>, shared: Arc<Shared>, mut pos: usize) {
    let mut rng = Rng::new(shared.sc.seed ^ (ctl.generation << 40) ^ 0x3417e);
    let out = Arc::clone(&shared.out);
    let mut on_conn = 0u64;
    if ctl.write_nothing {
        return;
    }
    if ctl.first_write_after_answer {
        wait_until("the client reading the answer", || {
            let link = lock(&ctl.link.st);
            link.client_received >= link.answer_len
        });
    }
    loop {
        if pos == shared.out_units() {
            let mut sess = lock(&shared.sess);
            if !ctl.is_detached() {
                let _ = ctl.sock.shutdown(Shutdown::Write);
                sess.daemon_done = true;
            }
            return;
        }
        let (from, to) = match shared.sc.seqpacket {
            true => (shared.out_offset(pos), shared.out_offset(pos + 1)),
            false => (pos, (pos + 1 + rng.below(16384) as usize).min(out.len())),
        };
        let r = Transport::write(&ctl.sock, &out[from..to]);
        let mut sess = lock(&shared.sess);
        let Ok(n) = r else { return };
        if shared.sc.seqpacket {
            assert_eq!(n, to - from, "a message goes whole");
            pos += 1;
        } else {
            pos += n;
        }
        // Written is written, detached or not: the client may have read it.
        sess.sent_max = sess.sent_max.max(pos as u64);
        if ctl.is_detached() {
            return;
        }
        on_conn += n as u64;
        if ctl.write_break_at.is_some_and(|at| on_conn >= at)
            && try_break(&ctl, &mut sess, &shared, false)
        {
            return;
        }
    }
}

/// Reads one frame exactly (the daemon's side of the framing rule), counting its bytes
/// as read for the link's credit. On a message connection the frame is one message,
/// exactly.
fn read_frame(sock: &UnixStream, messages: bool) -> io::Result<Frame> {
    let mut buf = [0u8; MAX_FRAME_LEN + 1];
    if messages {
        let n = Transport::read(sock, &mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        assert!(
            n <= MAX_FRAME_LEN,
            "a handshake message longer than any frame"
        );
        return match Frame::decode(&buf[..n]) {
            Ok(Some((frame, used))) => {
                assert_eq!(used, n, "a handshake message holds one frame, exactly");
                Ok(frame)
            }
            Ok(None) => panic!("a {n}-byte handshake message holds part of a frame"),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        };
    }
    let mut have = 0;
    loop {
        match Frame::decode(&buf[..have]) {
            Ok(Some((frame, used))) => {
                assert_eq!(used, have, "read past a frame");
                return Ok(frame);
            }
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        // One byte at a time is slow but cannot read past the frame.
        let want = if have < PREAMBLE_LEN {
            PREAMBLE_LEN
        } else {
            have + 1
        };
        let n = Transport::read(sock, &mut buf[have..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
}

/// Writes the answer frame, with the first data bytes in the same write or a byte at a time
/// (streams; on seqpacket the frame is a message of its own). Returns how many bytes of
/// `data` went with it.
fn write_answer(
    sock: &UnixStream,
    link: &Link,
    frame: &[u8],
    data: &[u8],
    rng: &mut Rng,
    sc: &Scenario,
) -> usize {
    lock(&link.st).answer_len = frame.len() as u64;
    let mut w = sock;
    if link.messages {
        w.write_all(frame).expect("answer");
        0
    } else if rng.chance(sc.coalesce_pct) {
        let k = data.len().min(1 + rng.below(4000) as usize);
        let mut both = frame.to_vec();
        both.extend_from_slice(&data[..k]);
        w.write_all(&both).expect("answer + data");
        k
    } else if rng.chance(sc.dribble_pct) {
        for b in frame {
            w.write_all(std::slice::from_ref(b)).expect("answer byte");
            if rng.chance(20) {
                thread::sleep(Duration::from_micros(300));
            }
        }
        0
    } else {
        w.write_all(frame).expect("answer");
        0
    }
}

type Running = (Arc<ConnCtl>, Vec<JoinHandle<()>>);

fn start_conn(
    shared: &Arc<Shared>,
    sock: UnixStream,
    link: Arc<Link>,
    generation: u64,
    pos: usize,
    rng: &mut Rng,
) -> Running {
    let sc = &shared.sc;
    let mut trigger = |fixed: Option<u64>| {
        fixed.or_else(|| rng.chance(60).then(|| rng.below(2 * sc.break_every)))
    };
    let first = generation == 0;
    let ctl = Arc::new(ConnCtl {
        generation,
        sock,
        link,
        detached: AtomicBool::new(false),
        read_break_at: trigger(sc.gen0_break_after_guest_shut.filter(|_| first)),
        write_break_at: trigger(sc.gen0_write_break.filter(|_| first)),
        hold_reads_until_guest_shut: first && sc.gen0_break_after_guest_shut.is_some(),
        write_nothing: first && sc.gen0_break_after_guest_shut.is_some(),
        first_write_after_answer: first && sc.gen0_write_break.is_some(),
    });
    let r = {
        let (c, s) = (Arc::clone(&ctl), Arc::clone(shared));
        thread::spawn(move || reader(c, s))
    };
    let w = {
        let (c, s) = (Arc::clone(&ctl), Arc::clone(shared));
        thread::spawn(move || writer(c, s, pos))
    };
    (ctl, vec![r, w])
}

fn stop(running: Option<Running>, shared: &Shared) {
    if let Some((ctl, threads)) = running {
        {
            let _sess = lock(&shared.sess);
            ctl.detach();
        }
        for t in threads {
            t.join().expect("connection thread");
        }
    }
}

fn refused(reason: Refusal, errno: u32) -> Vec<u8> {
    Frame::Refused { reason, errno }.encode()
}

/// One session the daemon serves, and its connection of the moment.
#[derive(Debug)]
struct SessSrv {
    shared: Arc<Shared>,
    running: Option<Running>,
    generation: u64,
}

/// The registered guest port and the connection keeping it.
#[derive(Debug)]
struct Registration {
    port: u32,
    /// `None` once its connection broke (orphaned: kept until the guest registers again).
    keepalive: Option<(Arc<Link>, UnixStream)>,
}

/// What the daemon and its keepalive watchers share.
#[derive(Debug, Default)]
struct Registry {
    reg: Mutex<Option<Registration>>,
    /// Registration connections the client closed.
    client_closes: AtomicU64,
}

/// Watches a registration's connection until it ends: a break by the daemon orphans the
/// registration, the client closing it makes the daemon forget it (if it is still the one
/// keeping it).
fn watch_keepalive(sock: UnixStream, link: Arc<Link>, registry: Arc<Registry>) {
    let _ = sock.set_read_timeout(None);
    let mut buf = [0u8; 64];
    if let Ok(n @ 1..) = Transport::read(&sock, &mut buf) {
        panic!("the guest sent {n} bytes on a registration");
    }
    let by_daemon = lock(&link.st).broken.is_some();
    if !by_daemon {
        registry.client_closes.fetch_add(1, Ordering::SeqCst);
    }
    let mut reg = lock(&registry.reg);
    let current = reg
        .as_ref()
        .and_then(|r| r.keepalive.as_ref())
        .is_some_and(|(l, _)| Arc::ptr_eq(l, &link));
    if current && by_daemon {
        reg.as_mut().expect("current").keepalive = None;
    } else if current {
        *reg = None;
    }
}

/// The fake daemon's state.
struct Daemon {
    sc: Scenario,
    rng: Rng,
    /// Session ids, secrets and nonces.
    id_rng: Rng,
    plan: Arc<Mutex<Plan>>,
    sessions: HashMap<SessionId, SessSrv>,
    order: Vec<SessionId>,
    registry: Arc<Registry>,
    listens: u64,
    listening: Arc<AtomicBool>,
    to_acceptor: Sender<Box<dyn Transport>>,
    host_conns: usize,
    raw: Vec<JoinHandle<Vec<u8>>>,
    watchers: Vec<JoinHandle<()>>,
}

impl Daemon {
    /// A fresh session whose host data is `out`.
    fn new_session(&mut self, out: Arc<Vec<u8>>) -> Arc<Shared> {
        let mut id = [0u8; 16];
        let mut secret = [0u8; 32];
        let mut nonce = [0u8; 16];
        for b in id.iter_mut().chain(&mut secret).chain(&mut nonce) {
            *b = self.id_rng.next() as u8;
        }
        let index = self.order.len() as u64;
        let shared = Arc::new(Shared {
            sc: Scenario {
                seed: self.sc.seed ^ (index << 32),
                ..self.sc.clone()
            },
            out,
            sess: Mutex::new(Sess {
                id: SessionId(id),
                secret: Secret(secret),
                nonce: Nonce(nonce),
                received: 0,
                sink: Vec::new(),
                sink_ends: Vec::new(),
                sent_max: 0,
                daemon_done: false,
                guest_eof_on: None,
                breaks: 0,
                resumes: 0,
                rng: Rng::new(self.sc.seed ^ 0xb4ea ^ (index << 32)),
            }),
            plan: Arc::clone(&self.plan),
            client_saw_eof: Arc::new(AtomicBool::new(false)),
        });
        self.order.push(SessionId(id));
        self.sessions.insert(
            SessionId(id),
            SessSrv {
                shared: Arc::clone(&shared),
                running: None,
                generation: 0,
            },
        );
        shared
    }

    fn dialed(&mut self, sock: UnixStream, link: Arc<Link>) {
        let sc = self.sc.clone();
        sock.set_read_timeout(Some(STEP)).expect("timeout");
        let frame = match read_frame(&sock, link.messages) {
            Ok(f) => f,
            // The client gave up on this connection (a fault during its RESUME).
            Err(_) => return,
        };
        let mut w = &sock;
        link.daemon_read(frame.encode().len());
        match frame {
            Frame::Open { socket_type, .. } => {
                let want = match sc.seqpacket {
                    true => SocketType::SeqPacket,
                    false => SocketType::Stream,
                };
                assert_eq!(socket_type, want, "OPEN names the connection's type");
                if let Some((reason, errno)) = sc.open {
                    w.write_all(&refused(reason, errno)).expect("refused");
                    return;
                }
                let shared = self.new_session(Arc::clone(&sc.out));
                link.join_session(&shared.client_saw_eof);
                let (id, secret, next_nonce) = {
                    let s = lock(&shared.sess);
                    (s.id, s.secret.clone(), s.nonce)
                };
                let answer = Frame::Opened {
                    id,
                    secret,
                    next_nonce,
                    window: sc.window,
                    park_timeout_ms: sc.park_timeout_ms,
                }
                .encode();
                let pos = write_answer(&sock, &link, &answer, &sc.out, &mut self.rng, &sc);
                lock(&shared.sess).sent_max = pos as u64;
                let running = start_conn(&shared, sock, link, 0, pos, &mut self.rng);
                self.sessions.get_mut(&id).expect("new").running = Some(running);
            }
            Frame::Resume {
                id,
                client_nonce,
                received,
                closed,
                proof,
            } => self.resume(sock, link, id, client_nonce, received, closed, proof),
            Frame::Listen { port, socket_type } => {
                assert_eq!(socket_type, SocketType::Stream);
                if self.listens == 0 {
                    assert!(
                        !self.listening.load(Ordering::SeqCst),
                        "the guest listened before its port was registered"
                    );
                }
                let answer = match sc.listen {
                    ListenAnswer::Refuse(reason, errno) => {
                        w.write_all(&refused(reason, errno)).expect("refused");
                        return;
                    }
                    ListenAnswer::WrongPort => Frame::Listening {
                        port: Port(port.0 + 1),
                    },
                    ListenAnswer::Honest => Frame::Listening { port },
                };
                if sc.listen != ListenAnswer::Honest {
                    write_answer(&sock, &link, &answer.encode(), &[], &mut self.rng, &sc);
                    return;
                }
                // Registered before LISTENING goes out, as domsockd does: a guest that has
                // read it may be offered connections at once.
                self.listens += 1;
                let watcher_end = sock.try_clone().expect("clone");
                let answer_end = sock.try_clone().expect("clone");
                *lock(&self.registry.reg) = Some(Registration {
                    port: port.0,
                    keepalive: Some((Arc::clone(&link), sock)),
                });
                write_answer(
                    &answer_end,
                    &link,
                    &answer.encode(),
                    &[],
                    &mut self.rng,
                    &sc,
                );
                let registry = Arc::clone(&self.registry);
                self.watchers.push(thread::spawn(move || {
                    watch_keepalive(watcher_end, link, registry)
                }));
            }
            other => panic!("fake daemon: unexpected {other:?}"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn resume(
        &mut self,
        sock: UnixStream,
        link: Arc<Link>,
        id: SessionId,
        client_nonce: Nonce,
        received: u64,
        closed: Closed,
        proof: domsock_migration::session::Tag,
    ) {
        let sc = self.sc.clone();
        let mut w = &sock;
        let Some(srv) = self.sessions.get_mut(&id) else {
            w.write_all(&refused(Refusal::UnknownSession, 0))
                .expect("refused");
            return;
        };
        let shared = Arc::clone(&srv.shared);
        let mut sess = lock(&shared.sess);
        if sc.resume == ResumeAnswer::ForgetNonce {
            sess.nonce = Nonce([0xee; 16]);
        }
        let claim = ResumeClaim {
            id,
            server_nonce: sess.nonce,
            client_nonce,
            received,
            closed,
        };
        let refusal = if !claim.verify(&sess.secret, &proof) {
            Some((Refusal::BadProof, 0))
        } else if let ResumeAnswer::Refuse(reason, errno) = sc.resume {
            Some((reason, errno))
        } else {
            None
        };
        if let Some((reason, errno)) = refusal {
            drop(sess);
            w.write_all(&refused(reason, errno)).expect("refused");
            return;
        }
        // A proven RESUME takes the session over: detach the old connection and let
        // its threads finish counting before answering with the count.
        drop(sess);
        stop(srv.running.take(), &shared);
        link.join_session(&shared.client_saw_eof);
        let mut sess = lock(&shared.sess);
        assert!(
            received <= sess.sent_max,
            "the guest claims {received}, only {} were sent",
            sess.sent_max
        );
        srv.generation += 1;
        sess.resumes += 1;
        sess.nonce = Nonce(
            self.rng
                .next()
                .to_le_bytes()
                .repeat(2)
                .try_into()
                .expect("16"),
        );
        let daemon_received = match sc.resume {
            ResumeAnswer::CountOffBy(d) => sess.received + d,
            _ => sess.received,
        };
        let answer = Frame::Resumed {
            received: daemon_received,
            closed: Closed {
                send: sess.daemon_done,
                rcv: sc.resume == ResumeAnswer::PeerReadsNoMore,
            },
            next_nonce: sess.nonce,
        }
        .encode();
        drop(sess);
        let start = received as usize;
        let data = match sc.seqpacket {
            true => &[][..],
            false => &shared.out[start..],
        };
        let k = write_answer(&sock, &link, &answer, data, &mut self.rng, &sc);
        let mut sess = lock(&shared.sess);
        sess.sent_max = sess.sent_max.max((start + k) as u64);
        drop(sess);
        let generation = srv.generation;
        srv.running = Some(start_conn(
            &shared,
            sock,
            link,
            generation,
            start + k,
            &mut self.rng,
        ));
    }

    fn host_connect(&mut self, out: Arc<Vec<u8>>, silent_for: Duration) -> io::Result<usize> {
        if !self.listening.load(Ordering::SeqCst) {
            return Err(os(libc::ECONNREFUSED));
        }
        let sc = self.sc.clone();
        let (client, sock) = UnixStream::pair()?;
        let link = Link::new(u64::from(sc.window), false, None);
        let index = self.host_conns;
        self.host_conns += 1;
        let transport = Box::new(FakeTransport {
            sock: client,
            link: Arc::clone(&link),
        });
        self.to_acceptor.send(transport).expect("acceptor");
        let registered = lock(&self.registry.reg)
            .as_ref()
            .is_some_and(|r| r.port == LISTEN_PORT);
        if !registered {
            self.raw
                .push(thread::spawn(move || raw_host(sock, &out, silent_for)));
            return Ok(index);
        }
        let shared = self.new_session(Arc::clone(&out));
        link.join_session(&shared.client_saw_eof);
        let (id, secret, next_nonce) = {
            let s = lock(&shared.sess);
            (s.id, s.secret.clone(), s.nonce)
        };
        let answer = Frame::Offered {
            id,
            secret,
            next_nonce,
            window: sc.offer_window.unwrap_or(sc.window),
            park_timeout_ms: sc.park_timeout_ms,
        }
        .encode();
        let pos = write_answer(&sock, &link, &answer, &out, &mut self.rng, &sc);
        lock(&shared.sess).sent_max = pos as u64;
        let running = start_conn(&shared, sock, link, 0, pos, &mut self.rng);
        self.sessions.get_mut(&id).expect("new").running = Some(running);
        Ok(index)
    }

    fn blackout(&mut self, absent_for: u64) -> u32 {
        // The device is gone before anything breaks: a client that notices a break and
        // dials at once must find it gone (set after the breaks, a listener's
        // re-registration could slip in before it and be counted, and a `forget` that
        // follows then dropped the registration the client relied on: 1 in 20 runs).
        {
            let mut plan = lock(&self.plan);
            plan.absent_for = absent_for;
            plan.broke_once = true;
        }
        let mut keepalives = 0;
        if let Some(reg) = lock(&self.registry.reg).as_mut() {
            if let Some((link, sock)) = reg.keepalive.take() {
                if link.break_with(libc::ENOTCONN) {
                    let _ = sock.shutdown(Shutdown::Both);
                    keepalives += 1;
                } else {
                    // The client has not read LISTENING yet: leave this one standing, so
                    // that every registration the daemon answered is one the client counts.
                    reg.keepalive = Some((link, sock));
                }
            }
        }
        for srv in self.sessions.values() {
            if let Some((ctl, _)) = &srv.running {
                let mut sess = lock(&srv.shared.sess);
                try_break(ctl, &mut sess, &srv.shared, true);
            }
        }
        keepalives
    }

    fn report(mut self) -> Report {
        // The clients are gone (their sessions owned the dialers) and their sockets closed:
        // the last connections' threads read what is left and end by themselves.
        let mut sessions = Vec::new();
        for id in &self.order {
            let srv = self.sessions.remove(id).expect("listed");
            if let Some((_, threads)) = srv.running {
                for t in threads {
                    t.join().expect("connection thread");
                }
            }
            let s = lock(&srv.shared.sess);
            sessions.push(SessReport {
                sink: s.sink.clone(),
                sink_ends: s.sink_ends.clone(),
                guest_eof_on: s.guest_eof_on,
                resumes: s.resumes,
                breaks: s.breaks,
            });
        }
        let raw = self
            .raw
            .into_iter()
            .map(|t| t.join().expect("raw host"))
            .collect();
        for t in self.watchers {
            t.join().expect("keepalive watcher");
        }
        let plan = lock(&self.plan);
        let first = sessions.first().cloned().unwrap_or_default();
        Report {
            sink: first.sink,
            guest_eof_on: first.guest_eof_on,
            resumes: first.resumes,
            breaks: first.breaks,
            dials: plan.dials,
            faults: plan.faults,
            sessions,
            raw,
            listens: self.listens,
            keepalive_closes: self.registry.client_closes.load(Ordering::SeqCst),
            registered_at_end: lock(&self.registry.reg).is_some(),
        }
    }
}

/// A host process on a connection to an unregistered port: after `silent_for` it writes
/// `out` and half-closes, and returns what the guest sent until its EOF.
fn raw_host(sock: UnixStream, out: &[u8], silent_for: Duration) -> Vec<u8> {
    thread::sleep(silent_for);
    (&sock).write_all(out).expect("raw host write");
    sock.shutdown(Shutdown::Write).expect("raw host shutdown");
    sock.set_read_timeout(Some(STEP)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match Transport::read(&sock, &mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("raw host read: {e}"),
        }
    }
}

/// Serves until every client (dialers, the host) is gone.
fn serve(mut daemon: Daemon, incoming: Receiver<Incoming>) -> Report {
    loop {
        let msg = match incoming.recv_timeout(STEP) {
            Ok(m) => m,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("fake daemon: nothing for {STEP:?}"),
        };
        match msg {
            Incoming::Dial(sock, link) => daemon.dialed(sock, link),
            Incoming::HostConnect {
                out,
                silent_for,
                reply,
            } => {
                let r = daemon.host_connect(out, silent_for);
                let _ = reply.send(r);
            }
            Incoming::Blackout { absent_for, reply } => {
                let n = daemon.blackout(absent_for);
                let _ = reply.send(n);
            }
            Incoming::DeviceBack => lock(&daemon.plan).absent_for = 0,
            Incoming::Forget => *lock(&daemon.registry.reg) = None,
        }
    }
    daemon.report()
}

/// A fake daemon, its dialer, the host, and the guest's listening socket.
struct Fake {
    dialer: FakeDialer,
    host: Host,
    acceptor: FakeAcceptor,
    daemon: JoinHandle<Report>,
}

fn start_fake(sc: Scenario) -> Fake {
    let plan = Arc::new(Mutex::new(Plan {
        absent_for: 0,
        permanent_after_break: sc.permanent_after_break,
        broke_once: false,
        faults_left: sc.max_faults,
        fault_every: sc.break_every,
        rng: Rng::new(sc.seed ^ 0xd1a1),
        dials: 0,
        faults: 0,
    }));
    let (tx, rx) = mpsc::channel();
    let (to_acceptor, queue) = mpsc::channel();
    let listening = Arc::new(AtomicBool::new(false));
    let daemon = Daemon {
        sc: sc.clone(),
        rng: Rng::new(sc.seed ^ 0xdae),
        id_rng: Rng::new(sc.seed ^ 0x1d),
        plan: Arc::clone(&plan),
        sessions: HashMap::new(),
        order: Vec::new(),
        registry: Arc::default(),
        listens: 0,
        listening: Arc::clone(&listening),
        to_acceptor,
        host_conns: 0,
        raw: Vec::new(),
        watchers: Vec::new(),
    };
    let daemon = thread::spawn(move || serve(daemon, rx));
    Fake {
        dialer: FakeDialer {
            to_daemon: tx.clone(),
            plan,
            window: u64::from(sc.window) + u64::from(sc.kernel_window_extra),
            messages: sc.seqpacket,
        },
        host: Host { to_daemon: tx },
        acceptor: FakeAcceptor {
            listening,
            queue: Mutex::new(queue),
        },
        daemon,
    }
}

/// A fake daemon for `sc` and the dialer that reaches it.
fn start(sc: Scenario) -> (Box<FakeDialer>, JoinHandle<Report>) {
    let fake = start_fake(sc);
    (Box::new(fake.dialer), fake.daemon)
}

fn opts() -> SessionOptions {
    SessionOptions {
        connect_timeout: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(5),
        read_timeout: Some(STEP),
        write_timeout: Some(STEP),
        backoff_min: Duration::from_millis(1),
        backoff_max: Duration::from_millis(4),
        ..SessionOptions::default()
    }
}

fn listener_opts() -> ListenerOptions {
    ListenerOptions {
        session: opts(),
        accept_timeout: Some(STEP),
        offer_timeout: Duration::from_secs(2),
        keepalive_check: Duration::from_millis(5),
        ..ListenerOptions::default()
    }
}

fn connect(sc: &Scenario) -> (io::Result<SessionStream>, JoinHandle<Report>) {
    let (dialer, daemon) = start(sc.clone());
    (SessionStream::connect_with(dialer, 2, 5000, opts()), daemon)
}

fn connect_seqpacket(sc: &Scenario) -> (io::Result<SessionSeqPacket>, JoinHandle<Report>) {
    let (dialer, daemon) = start(sc.clone());
    (
        SessionSeqPacket::connect_with(dialer, 2, 5000, opts()),
        daemon,
    )
}

/// Writes `data` in random chunk sizes, then shuts the write side.
fn send_all_then_shut(s: &SessionStream, data: &[u8], rng: &mut Rng) {
    let mut at = 0;
    while at < data.len() {
        let end = (at + 1 + rng.below(12_000) as usize).min(data.len());
        s.send_all(&data[at..end])
            .unwrap_or_else(|e| panic!("send at {at}: {e} ({:?})", s.failure()));
        at = end;
    }
    s.shutdown(Shutdown::Write).expect("shutdown(Write)");
}

/// Reads to EOF in random sizes.
fn read_to_eof(s: &SessionStream, rng: &mut Rng) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 20_000];
    loop {
        let want = 1 + rng.below(buf.len() as u64) as usize;
        match s.recv(&mut buf[..want]) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("recv after {} bytes: {e} ({:?})", got.len(), s.failure()),
        }
    }
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        let sum = |b: &[u8]| {
            let mut c = Checksum::new();
            c.update(b);
            c.hex()
        };
        panic!(
            "{what}: got {} bytes (xxh3 {}), want {} (xxh3 {}), first difference at {at:?}",
            got.len(),
            sum(got),
            want.len(),
            sum(want)
        );
    }
}

/// One transfer both ways under `sc`; returns what the client read, its stats and the
/// daemon's report.
fn transfer(sc: &Scenario, guest: &[u8], duplex: bool) -> (Vec<u8>, SessionStats, Report) {
    let (stream, daemon) = connect(sc);
    let stream = stream.expect("open");
    let mut rng = Rng::new(sc.seed ^ 0xc11e);
    let got = if duplex {
        let mut wrng = rng.clone();
        rng.next();
        thread::scope(|s| {
            let writer = s.spawn(|| send_all_then_shut(&stream, guest, &mut wrng));
            let got = read_to_eof(&stream, &mut rng);
            writer.join().expect("writer");
            got
        })
    } else {
        send_all_then_shut(&stream, guest, &mut rng);
        read_to_eof(&stream, &mut rng)
    };
    let stats = stream.stats();
    assert_eq!(stream.failure(), None);
    drop(stream);
    let report = daemon.join().expect("daemon");
    (got, stats, report)
}

fn check_transfer(sc: &Scenario, guest: &[u8], duplex: bool) -> (u64, u32) {
    let (got, stats, report) = transfer(sc, guest, duplex);
    let ctx = format!(
        "seed {} window {} duplex {duplex}: {stats:?}, daemon {} resumes {} breaks {} faults {} dials",
        sc.seed, sc.window, report.resumes, report.breaks, report.faults, report.dials
    );
    assert_same(&format!("daemon -> guest, {ctx}"), &got, &sc.out);
    assert_same(&format!("guest -> daemon, {ctx}"), &report.sink, guest);
    assert!(report.guest_eof_on.is_some(), "no guest EOF, {ctx}");
    assert_eq!(stats.resumes, report.resumes, "{ctx}");
    assert!(
        stats.retransmitted_bytes <= stats.resumes * u64::from(sc.window),
        "retransmission beyond the window, {ctx}"
    );
    if stats.resumes > 0 {
        assert!(stats.blackout > Duration::ZERO, "{ctx}");
        assert!(stats.dials >= stats.resumes, "{ctx}");
    }
    (stats.resumes, report.breaks + report.faults)
}

// ---------------------------------------------------------------------------------------

#[test]
fn a_duplex_stream_survives_breaks_anywhere() {
    watchdog();
    let mut resumes = 0;
    let mut breaks = 0;
    for seed in 0..24u64 {
        let mut rng = Rng::new(seed);
        let mut sc = Scenario::new(seed, 60_000 + rng.below(100_000) as usize);
        sc.window = rng.pick(&[700, 3001, 16_384]);
        sc.max_breaks = 1 + rng.below(8) as u32;
        sc.max_faults = rng.below(4) as u32;
        sc.break_every = 4_000 + rng.below(30_000);
        let guest = PatternStream::new(seed * 2 + 1).take(50_000 + rng.below(150_000) as usize);
        let (r, b) = check_transfer(&sc, &guest, true);
        resumes += r;
        breaks += u64::from(b);
    }
    eprintln!("duplex: {resumes} resumes after {breaks} breaks and faults");
    // The test proves nothing unless the connections really broke, and often.
    assert!(resumes >= 30, "only {resumes} resumes over all seeds");
    assert!(breaks >= 30, "only {breaks} breaks over all seeds");
}

#[test]
fn send_then_receive_on_one_thread_survives_breaks() {
    watchdog();
    let mut resumes = 0;
    for seed in 100..116u64 {
        let mut rng = Rng::new(seed);
        let mut sc = Scenario::new(seed, 20_000 + rng.below(80_000) as usize);
        sc.window = rng.pick(&[512, 4096, 65_536]);
        sc.max_breaks = 1 + rng.below(6) as u32;
        sc.max_faults = rng.below(3) as u32;
        sc.break_every = 2_000 + rng.below(20_000);
        let guest = PatternStream::new(seed * 2 + 1).take(30_000 + rng.below(100_000) as usize);
        resumes += check_transfer(&sc, &guest, false).0;
    }
    eprintln!("one thread: {resumes} resumes");
    assert!(resumes >= 12, "only {resumes} resumes over all seeds");
}

#[test]
fn answers_coalesced_with_data_or_dribbled_are_read_exactly() {
    watchdog();
    for (seed, coalesce, dribble) in [(7, 100, 0), (8, 0, 100), (9, 50, 100)] {
        let mut sc = Scenario::new(seed, 50_000);
        sc.coalesce_pct = coalesce;
        sc.dribble_pct = dribble;
        sc.max_breaks = 4;
        sc.break_every = 8_000;
        let guest = PatternStream::new(seed).take(40_000);
        check_transfer(&sc, &guest, true);
    }
}

#[test]
fn a_genuine_eof_is_an_eof_not_a_resume() {
    watchdog();
    let sc = Scenario::new(3, 5_000);
    let (stream, daemon) = connect(&sc);
    let stream = stream.expect("open");
    let got = read_to_eof(&stream, &mut Rng::new(1));
    assert_same("daemon -> guest", &got, &sc.out);
    let mut buf = [0u8; 16];
    assert_eq!(
        stream.recv(&mut buf).expect("EOF again"),
        0,
        "EOF stays EOF"
    );
    // The other direction still works after the daemon's EOF.
    let guest = PatternStream::new(4).take(3_000);
    stream.send_all(&guest).expect("send after the peer's EOF");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(stream.stats().resumes, 0);
    assert_eq!(stream.stats().dials, 0);
    drop(stream);
    let report = daemon.join().expect("daemon");
    assert_eq!(report.resumes, 0);
    assert_eq!(report.dials, 1, "only the OPEN connect");
    assert_same("guest -> daemon", &report.sink, &guest);
    assert_eq!(report.guest_eof_on, Some(0));
}

#[test]
fn a_shutdown_before_the_break_is_repeated_after_it() {
    watchdog();
    let mut sc = Scenario::new(5, 300_000);
    sc.window = 20_000;
    sc.max_breaks = 1;
    sc.coalesce_pct = 0;
    sc.gen0_break_after_guest_shut = Some(1);
    let guest = PatternStream::new(6).take(15_000);
    let (stream, daemon) = connect(&sc);
    let stream = stream.expect("open");
    stream.send_all(&guest).expect("send");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    let got = read_to_eof(&stream, &mut Rng::new(2));
    assert_same("daemon -> guest", &got, &sc.out);
    let stats = stream.stats();
    drop(stream);
    let report = daemon.join().expect("daemon");
    assert_eq!((stats.resumes, report.breaks), (1, 1));
    assert!(stats.retransmitted_bytes > 0, "{stats:?}");
    assert_same("guest -> daemon", &report.sink, &guest);
    assert_eq!(
        report.guest_eof_on,
        Some(1),
        "the EOF arrives on the resumed connection"
    );
}

#[test]
fn an_open_refusal_is_the_mapped_errno() {
    watchdog();
    let cases = [
        (Refusal::TargetRefused, 0, libc::ECONNREFUSED),
        (
            Refusal::TargetRefused,
            libc::ENETUNREACH as u32,
            libc::ENETUNREACH,
        ),
        (Refusal::Unsupported, 0, libc::EOPNOTSUPP),
        (Refusal::TooMany, 0, libc::EAGAIN),
        (Refusal::Malformed, 0, libc::EPROTO),
    ];
    for (reason, errno, want) in cases {
        let mut sc = Scenario::new(11, 10);
        sc.open = Some((reason, errno));
        let (stream, daemon) = connect(&sc);
        let err = stream.expect_err("refused");
        assert_eq!(err.raw_os_error(), Some(want), "{reason:?}: {err}");
        daemon.join().expect("daemon");
    }
}

/// Opens, lets the first connection break after the daemon wrote a little, and returns
/// the error the client's read gets once it noticed (from the failed resume).
fn read_error_after_one_break(mut sc: Scenario) -> (io::Error, SessionStream, JoinHandle<Report>) {
    sc.max_breaks = 1;
    sc.coalesce_pct = 0;
    sc.gen0_write_break = Some(1);
    let (stream, daemon) = connect(&sc);
    let stream = stream.expect("open");
    let mut buf = vec![0u8; 4096];
    let err = loop {
        match stream.recv(&mut buf) {
            Ok(0) => panic!("EOF instead of a failed resume"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    (err, stream, daemon)
}

#[test]
fn a_resume_refusal_fails_the_session_with_the_mapped_errno() {
    watchdog();
    let cases = [
        (Refusal::Expired, 0, libc::ETIMEDOUT),
        (Refusal::UnknownSession, 0, libc::ECONNRESET),
        (Refusal::BadProof, 0, libc::ECONNRESET),
        (Refusal::OutOfRange, 0, libc::EPROTO),
        (Refusal::TooMany, 0, libc::EAGAIN),
    ];
    for (reason, errno, want) in cases {
        let mut sc = Scenario::new(12, 50_000);
        sc.resume = ResumeAnswer::Refuse(reason, errno);
        let (err, stream, daemon) = read_error_after_one_break(sc);
        assert_eq!(err.raw_os_error(), Some(want), "{reason:?}: {err}");
        // A failed session stays failed, both ways, with the same errno.
        let again = stream.recv(&mut [0u8; 8]).expect_err("still failed");
        assert_eq!(again.raw_os_error(), Some(want));
        let write = stream.send(b"x").expect_err("writes fail too");
        assert_eq!(write.raw_os_error(), Some(want));
        assert!(
            matches!(stream.failure(), Some(SessionError::Refused { reason: r, .. }) if r == reason),
            "{:?}",
            stream.failure()
        );
        assert_eq!(stream.stats().resumes, 0);
        drop(stream);
        let report = daemon.join().expect("daemon");
        assert_eq!((report.breaks, report.resumes), (1, 0));
    }
}

#[test]
fn a_proof_over_a_stale_nonce_is_refused_as_bad_proof() {
    watchdog();
    let mut sc = Scenario::new(13, 50_000);
    sc.resume = ResumeAnswer::ForgetNonce;
    let (err, stream, daemon) = read_error_after_one_break(sc);
    assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "{err}");
    assert!(
        matches!(
            stream.failure(),
            Some(SessionError::Refused {
                reason: Refusal::BadProof,
                ..
            })
        ),
        "{:?}",
        stream.failure()
    );
    drop(stream);
    daemon.join().expect("daemon");
}

/// The fake's proof check is real: a RESUME with the right nonce but a wrong secret, or
/// a right proof replayed after the nonce moved on, is refused.
#[test]
fn the_fake_daemon_really_checks_proofs() {
    watchdog();
    let sc = Scenario::new(14, 0);
    let (mut dialer, daemon) = start(sc);
    let ask = |dialer: &mut FakeDialer, frame: Frame| -> Frame {
        let t = dialer.dial(STEP).expect("dial");
        let mut buf = frame.encode();
        let mut at = 0;
        while at < buf.len() {
            at += t.write(&buf[at..]).expect("write");
        }
        buf.clear();
        let mut byte = [0u8; 1];
        loop {
            if let Some((f, _)) = Frame::decode(&buf).expect("frame") {
                return f;
            }
            assert_eq!(t.read(&mut byte).expect("read"), 1, "EOF inside a frame");
            buf.push(byte[0]);
        }
    };
    let open = Frame::Open {
        cid: domsock_proto::Cid(2),
        port: Port(5000),
        socket_type: SocketType::Stream,
    };
    let Frame::Opened {
        id,
        secret,
        next_nonce,
        ..
    } = ask(&mut dialer, open)
    else {
        panic!("not OPENED")
    };
    let resume = |secret: &Secret, server_nonce: Nonce| {
        let claim = ResumeClaim {
            id,
            server_nonce,
            client_nonce: Nonce([9; 16]),
            received: 0,
            closed: Closed::default(),
        };
        Frame::Resume {
            id,
            client_nonce: claim.client_nonce,
            received: 0,
            closed: Closed::default(),
            proof: claim.prove(secret),
        }
    };
    let bad_proof = Frame::Refused {
        reason: Refusal::BadProof,
        errno: 0,
    };
    assert_eq!(
        ask(&mut dialer, resume(&Secret([0; 32]), next_nonce)),
        bad_proof
    );
    let good = resume(&secret, next_nonce);
    assert!(matches!(
        ask(&mut dialer, good.clone()),
        Frame::Resumed { .. }
    ));
    assert_eq!(ask(&mut dialer, good), bad_proof, "a replayed RESUME");
    drop(dialer);
    daemon.join().expect("daemon");
}

#[test]
fn a_daemon_count_beyond_what_was_sent_is_a_protocol_error() {
    watchdog();
    let mut sc = Scenario::new(15, 50_000);
    sc.resume = ResumeAnswer::CountOffBy(1);
    let (err, stream, daemon) = read_error_after_one_break(sc);
    assert_eq!(err.raw_os_error(), Some(libc::EPROTO), "{err}");
    assert!(
        matches!(stream.failure(), Some(SessionError::Protocol(_))),
        "{:?}",
        stream.failure()
    );
    drop(stream);
    daemon.join().expect("daemon");
}

#[test]
fn a_blackout_longer_than_the_park_timeout_is_etimedout() {
    watchdog();
    let mut sc = Scenario::new(16, 50_000);
    sc.park_timeout_ms = 150;
    // After the break the device stays away (a draw below 2^63 connects).
    sc.absent_max = u64::MAX / 2;
    let (err, stream, daemon) = read_error_after_one_break(sc);
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    assert!(
        matches!(stream.failure(), Some(SessionError::ParkTimeout { .. })),
        "{:?}",
        stream.failure()
    );
    let stats = stream.stats();
    assert_eq!(stats.resumes, 0);
    assert!(stats.dials >= 5, "retried with backoff: {stats:?}");
    assert!(stats.blackout >= Duration::from_millis(150), "{stats:?}");
    assert!(stats.blackout < Duration::from_secs(3), "{stats:?}");
    drop(stream);
    daemon.join().expect("daemon");
}

#[test]
fn a_permanent_connect_error_ends_the_session_with_its_errno() {
    watchdog();
    let mut sc = Scenario::new(17, 50_000);
    sc.permanent_after_break = Some(libc::EACCES);
    let (err, stream, daemon) = read_error_after_one_break(sc);
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    assert_eq!(stream.stats().dials, 1, "not retried: {:?}", stream.stats());
    drop(stream);
    daemon.join().expect("daemon");
}

#[test]
fn a_daemon_that_reads_no_more_gives_epipe_after_the_resume() {
    watchdog();
    let mut sc = Scenario::new(18, 10_000);
    sc.max_breaks = 1;
    sc.coalesce_pct = 0;
    sc.gen0_write_break = Some(1);
    sc.resume = ResumeAnswer::PeerReadsNoMore;
    let (stream, daemon) = connect(&sc);
    let stream = stream.expect("open");
    let got = read_to_eof(&stream, &mut Rng::new(3));
    assert_same("daemon -> guest", &got, &sc.out);
    assert_eq!(stream.stats().resumes, 1);
    let err = stream.send(b"more").expect_err("the peer reads no more");
    assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    assert_eq!(stream.stats().resumes, 1, "EPIPE without another resume");
    drop(stream);
    daemon.join().expect("daemon");
}

// ---------------------------------------------------------------------------------------
// Sessions the guest accepts (SessionListener).

fn bind(fake_acceptor: FakeAcceptor, dialer: &FakeDialer) -> io::Result<SessionListener> {
    bind_with_opts(fake_acceptor, dialer, listener_opts())
}

fn bind_with_opts(
    fake_acceptor: FakeAcceptor,
    dialer: &FakeDialer,
    lopts: ListenerOptions,
) -> io::Result<SessionListener> {
    SessionListener::bind_with(Box::new(fake_acceptor), dialer.clone(), LISTEN_PORT, lopts)
}

/// Everything `raw` returns until EOF.
fn read_raw_to_eof(raw: &Accepted) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 3];
    loop {
        match raw.recv(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("raw recv after {} bytes: {e}", got.len()),
        }
    }
}

/// The daemon's report once the test let go of everything that reaches it.
fn finish(dialer: FakeDialer, host: Host, daemon: JoinHandle<Report>) -> Report {
    drop((dialer, host));
    daemon.join().expect("daemon")
}

#[test]
fn sessions_the_guest_accepts_survive_breaks_and_blackouts() {
    watchdog();
    let mut resumes = 0;
    let mut reregistrations = 0;
    for seed in 200..210u64 {
        let mut rng = Rng::new(seed);
        let mut sc = Scenario::new(seed, 0);
        sc.window = rng.pick(&[700, 3001, 16_384]);
        sc.max_breaks = rng.below(5) as u32;
        sc.max_faults = rng.below(3) as u32;
        sc.break_every = 3_000 + rng.below(20_000);
        let Fake {
            dialer,
            host,
            acceptor,
            daemon,
        } = start_fake(sc.clone());
        let listener = bind(acceptor, &dialer).expect("bind");
        assert_eq!(listener.registrations(), 1);
        let mut keepalive_breaks = 0u32;
        let mut sent = Vec::new();
        let mut stats = Vec::new();
        for k in 0..3u64 {
            let out = Arc::new(
                PatternStream::new(seed * 16 + k).take(20_000 + rng.below(60_000) as usize),
            );
            let guest =
                PatternStream::new(seed * 16 + 8 + k).take(20_000 + rng.below(60_000) as usize);
            host.connect(Arc::clone(&out)).expect("host connect");
            let (accepted, _) = listener.accept().expect("accept");
            let Accepted::Session(s) = accepted else {
                panic!("seed {seed} session {k}: accepted raw, not as a session");
            };
            let blackout_after = rng
                .chance(60)
                .then(|| Duration::from_micros(rng.below(3_000)));
            let absent = rng.below(6);
            let mut wrng = Rng::new(seed ^ (k << 8) ^ 0x77);
            let mut rrng = Rng::new(seed ^ (k << 8) ^ 0x78);
            let got = thread::scope(|scope| {
                let writer = scope.spawn(|| send_all_then_shut(&s, &guest, &mut wrng));
                if let Some(after) = blackout_after {
                    thread::sleep(after);
                    keepalive_breaks += host.blackout(absent);
                }
                let got = read_to_eof(&s, &mut rrng);
                writer.join().expect("writer");
                got
            });
            assert_same(
                &format!("host -> guest, seed {seed} session {k}"),
                &got,
                &out,
            );
            assert_eq!(s.failure(), None);
            stats.push(s.stats());
            sent.push(guest);
        }
        wait_until("the listener registering again", || {
            listener.registrations() == 1 + u64::from(keepalive_breaks)
        });
        assert_eq!(listener.registration_failure(), None);
        reregistrations += u64::from(keepalive_breaks);
        drop(listener);
        let report = finish(dialer, host, daemon);
        assert_eq!(
            report.sessions.len(),
            3,
            "seed {seed}: one session per host connection"
        );
        for (k, ((sess, guest), st)) in report.sessions.iter().zip(&sent).zip(&stats).enumerate() {
            let ctx = format!(
                "seed {seed} session {k}: {st:?}, daemon {} resumes",
                sess.resumes
            );
            assert_same(&format!("guest -> host, {ctx}"), &sess.sink, guest);
            assert!(sess.guest_eof_on.is_some(), "no guest EOF, {ctx}");
            assert_eq!(st.resumes, sess.resumes, "{ctx}");
            resumes += st.resumes;
        }
        assert_eq!(
            report.listens,
            1 + u64::from(keepalive_breaks),
            "seed {seed}: a registration per break"
        );
        assert_eq!(
            report.keepalive_closes, 1,
            "seed {seed}: the drop closed it"
        );
        assert!(
            !report.registered_at_end,
            "seed {seed}: and the daemon forgot it"
        );
    }
    eprintln!("accepted sessions: {resumes} resumes, {reregistrations} registrations renewed");
    assert!(resumes >= 15, "only {resumes} resumes over all seeds");
    assert!(
        reregistrations >= 5,
        "only {reregistrations} renewals over all seeds"
    );
}

#[test]
fn an_offer_coalesced_with_data_or_dribbled_is_read_exactly() {
    watchdog();
    for (seed, coalesce, dribble) in [(51, 100, 0), (52, 0, 100)] {
        let mut sc = Scenario::new(seed, 0);
        sc.coalesce_pct = coalesce;
        sc.dribble_pct = dribble;
        let Fake {
            dialer,
            host,
            acceptor,
            daemon,
        } = start_fake(sc);
        let listener = bind(acceptor, &dialer).expect("bind");
        let out = Arc::new(PatternStream::new(seed).take(30_000));
        host.connect(Arc::clone(&out)).expect("host connect");
        let (accepted, peer) = listener.accept().expect("accept");
        assert_eq!(peer, VsockAddr::new(2, 49_152));
        let Accepted::Session(s) = accepted else {
            panic!("raw")
        };
        let guest = PatternStream::new(seed + 1).take(5_000);
        send_all_then_shut(&s, &guest, &mut Rng::new(seed));
        let got = read_to_eof(&s, &mut Rng::new(seed + 2));
        assert_same("host -> guest", &got, &out);
        drop((s, listener));
        let report = finish(dialer, host, daemon);
        assert_same("guest -> host", &report.sink, &guest);
    }
}

#[test]
fn a_connection_without_offered_is_raw_and_keeps_its_first_bytes() {
    watchdog();
    let Fake {
        dialer,
        host,
        acceptor,
        daemon,
    } = start_fake(Scenario::new(53, 0));
    let offer_timeout = Duration::from_millis(100);
    let listener = bind_with_opts(
        acceptor,
        &dialer,
        ListenerOptions {
            offer_timeout,
            ..listener_opts()
        },
    )
    .expect("bind");
    // The registration breaks and the daemon forgets it while the guest cannot connect.
    assert_eq!(host.blackout(u64::MAX / 2), 1);
    host.forget();

    // Bytes that start like the magic and are not a frame: all of them, in order.
    let first = b"DSS! a raw host".to_vec();
    host.connect(Arc::new(first.clone())).expect("host connect");
    let (raw, _) = listener.accept().expect("accept");
    assert!(raw.session().is_none(), "no OFFERED: raw");
    assert_eq!(read_raw_to_eof(&raw), first);
    raw.send_all(b"reply one").expect("raw send");
    raw.shutdown(Shutdown::Write).expect("raw shutdown");
    drop(raw);

    // A host that waits for the guest: raw after the offer timeout, nothing lost.
    let started = Instant::now();
    host.connect_after(Arc::new(b"late".to_vec()), Duration::from_millis(600))
        .expect("host connect");
    let (raw, _) = listener.accept().expect("accept");
    let waited = started.elapsed();
    assert!(raw.session().is_none());
    assert!(
        waited >= offer_timeout && waited < Duration::from_millis(600),
        "accept took {waited:?}"
    );
    assert_eq!(read_raw_to_eof(&raw), b"late");
    drop(raw);

    // A session frame other than OFFERED: EPROTO, and the listener carries on.
    let opened = Frame::Opened {
        id: SessionId([1; 16]),
        secret: Secret([2; 32]),
        next_nonce: Nonce([3; 16]),
        window: 4096,
        park_timeout_ms: 1000,
    };
    host.connect(Arc::new(opened.encode()))
        .expect("host connect");
    let err = listener.accept().expect_err("not an offer");
    assert_eq!(err.raw_os_error(), Some(libc::EPROTO), "{err}");

    // The device is back: the listener registers again, and connections are sessions.
    host.device_back();
    wait_until("the listener registering again", || {
        listener.registrations() == 2
    });
    let out = Arc::new(PatternStream::new(54).take(10_000));
    host.connect(Arc::clone(&out)).expect("host connect");
    let (accepted, _) = listener.accept().expect("accept");
    let s = accepted.session().expect("a session again");
    s.send_all(b"session reply").expect("send");
    s.shutdown(Shutdown::Write).expect("shutdown");
    assert_same("host -> guest", &read_to_eof(s, &mut Rng::new(5)), &out);
    drop((accepted, listener));
    let report = finish(dialer, host, daemon);
    assert_eq!(report.raw.len(), 3);
    assert_eq!(report.raw[0], b"reply one");
    assert_eq!(
        report.raw[1], b"",
        "the silent host's connection, closed unanswered"
    );
    assert_eq!(report.raw[2], b"", "the bad frame's connection, dropped");
    assert_eq!(report.sessions.len(), 1);
    assert_eq!(report.sink, b"session reply");
}

#[test]
fn a_refused_registration_fails_bind_with_the_mapped_errno() {
    watchdog();
    let cases = [
        (
            ListenAnswer::Refuse(Refusal::Unsupported, 0),
            libc::EOPNOTSUPP,
        ),
        (ListenAnswer::Refuse(Refusal::TooMany, 0), libc::EAGAIN),
        (ListenAnswer::Refuse(Refusal::Malformed, 0), libc::EPROTO),
        (ListenAnswer::WrongPort, libc::EPROTO),
    ];
    for (answer, want) in cases {
        let mut sc = Scenario::new(55, 0);
        sc.listen = answer;
        let Fake {
            dialer,
            host,
            acceptor,
            daemon,
        } = start_fake(sc);
        let listening = Arc::clone(&acceptor.listening);
        let err = bind(acceptor, &dialer).expect_err("refused");
        assert_eq!(err.raw_os_error(), Some(want), "{answer:?}: {err}");
        assert!(
            !listening.load(Ordering::SeqCst),
            "{answer:?}: a port that is not registered is not listened on"
        );
        let report = finish(dialer, host, daemon);
        assert_eq!(report.listens, 0);
    }
}

/// Also proves the order of `bind`: the fake daemon fails the test if the guest listened
/// before registering.
#[test]
fn dropping_the_listener_closes_its_registration() {
    watchdog();
    let Fake {
        dialer,
        host,
        acceptor,
        daemon,
    } = start_fake(Scenario::new(56, 0));
    let listener = bind(acceptor, &dialer).expect("bind");
    assert_eq!(listener.port(), LISTEN_PORT);
    assert_eq!(
        (listener.registrations(), listener.registration_dials()),
        (1, 1)
    );
    drop(listener);
    let report = finish(dialer, host, daemon);
    assert_eq!(report.listens, 1);
    assert_eq!(report.keepalive_closes, 1);
    assert!(!report.registered_at_end, "the daemon forgot the port");
}

#[test]
fn an_offer_with_an_impossible_window_is_eproto() {
    watchdog();
    let mut sc = Scenario::new(57, 0);
    sc.offer_window = Some(0);
    let Fake {
        dialer,
        host,
        acceptor,
        daemon,
    } = start_fake(sc);
    let listener = bind(acceptor, &dialer).expect("bind");
    host.connect(Arc::new(Vec::new())).expect("host connect");
    let err = listener.accept().expect_err("window 0");
    assert_eq!(err.raw_os_error(), Some(libc::EPROTO), "{err}");
    drop(listener);
    finish(dialer, host, daemon);
}

// ---------------------------------------------------------------------------------------
// Seqpacket sessions.

/// Sends `msgs` in order, then shuts the write side.
fn send_msgs_then_shut(s: &SessionSeqPacket, msgs: &[Vec<u8>]) {
    for (i, m) in msgs.iter().enumerate() {
        let n = s
            .send_msg(m)
            .unwrap_or_else(|e| panic!("send_msg {i}: {e} ({:?})", s.failure()));
        assert_eq!(n, m.len(), "message {i} went whole");
    }
    s.shutdown(Shutdown::Write).expect("shutdown(Write)");
}

/// Receives messages into a `buf_len`-byte buffer until EOF: each as received, and
/// whether it was truncated.
fn recv_msgs_to_eof(s: &SessionSeqPacket, buf_len: usize) -> Vec<(Vec<u8>, bool)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; buf_len];
    loop {
        match s.recv_msg(&mut buf) {
            Ok((0, false)) => return got,
            Ok((n, truncated)) => got.push((buf[..n].to_vec(), truncated)),
            Err(e) => panic!(
                "recv_msg after {} messages: {e} ({:?})",
                got.len(),
                s.failure()
            ),
        }
    }
}

fn assert_same_messages(what: &str, got: &[Vec<u8>], want: &[Vec<u8>]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        let len = |m: Option<&Vec<u8>>| m.map(Vec::len);
        panic!(
            "{what}: got {} messages, want {}; first difference at {at:?} ({:?} vs {:?} bytes)",
            got.len(),
            want.len(),
            len(at.and_then(|i| got.get(i))),
            len(at.and_then(|i| want.get(i))),
        );
    }
}

/// One message exchange both ways under `sc`: every message once, in order, whole.
fn check_seqpacket(sc: &Scenario, guest: &[Vec<u8>], duplex: bool) -> (u64, u32) {
    let (s, daemon) = connect_seqpacket(sc);
    let s = s.expect("open");
    let largest = sc.out_ends.iter().scan(0, |from, &end| {
        let len = end - *from;
        *from = end;
        Some(len)
    });
    let buf_len = largest.max().unwrap_or(0) + 1;
    let got = if duplex {
        thread::scope(|scope| {
            let writer = scope.spawn(|| send_msgs_then_shut(&s, guest));
            let got = recv_msgs_to_eof(&s, buf_len);
            writer.join().expect("writer");
            got
        })
    } else {
        send_msgs_then_shut(&s, guest);
        recv_msgs_to_eof(&s, buf_len)
    };
    let stats = s.stats();
    assert_eq!(s.failure(), None);
    drop(s);
    let report = daemon.join().expect("daemon");
    let ctx = format!(
        "seed {} window {} duplex {duplex}: {stats:?}, daemon {} resumes {} breaks {} faults",
        sc.seed, sc.window, report.resumes, report.breaks, report.faults
    );
    assert!(got.iter().all(|(_, t)| !t), "truncated, {ctx}");
    let got: Vec<Vec<u8>> = got.into_iter().map(|(m, _)| m).collect();
    assert_same_messages(
        &format!("daemon -> guest, {ctx}"),
        &got,
        &split_messages(&sc.out, &sc.out_ends),
    );
    let sink = split_messages(&report.sink, &report.sessions[0].sink_ends);
    assert_same_messages(&format!("guest -> daemon, {ctx}"), &sink, guest);
    assert!(report.guest_eof_on.is_some(), "no guest EOF, {ctx}");
    assert_eq!(stats.resumes, report.resumes, "{ctx}");
    assert!(
        stats.retransmitted_bytes <= stats.resumes * u64::from(sc.window),
        "retransmission beyond the window, {ctx}"
    );
    assert!(stats.retransmitted_messages <= stats.retransmitted_bytes);
    (stats.resumes, report.breaks + report.faults)
}

fn guest_messages(seed: u64, count: usize, max: usize) -> Vec<Vec<u8>> {
    let (bytes, ends) = message_stream(seed, count, max);
    split_messages(&bytes, &ends)
}

#[test]
fn a_seqpacket_session_survives_breaks_anywhere() {
    watchdog();
    let mut resumes = 0;
    let mut breaks = 0;
    for seed in 300..320u64 {
        let mut rng = Rng::new(seed);
        let window = rng.pick(&[700usize, 3001, 16_384]);
        let mut sc = Scenario::seqpacket(seed, 100 + rng.below(300) as usize, 4_000);
        sc.window = window as u32;
        sc.max_breaks = 1 + rng.below(8) as u32;
        sc.max_faults = rng.below(4) as u32;
        sc.break_every = 4_000 + rng.below(30_000);
        let guest = guest_messages(seed * 2 + 1, 100 + rng.below(300) as usize, window);
        let (r, b) = check_seqpacket(&sc, &guest, seed % 4 != 0);
        resumes += r;
        breaks += u64::from(b);
    }
    eprintln!("seqpacket: {resumes} resumes after {breaks} breaks and faults");
    assert!(resumes >= 30, "only {resumes} resumes over all seeds");
    assert!(breaks >= 30, "only {breaks} breaks over all seeds");
}

#[test]
fn a_truncated_message_counts_once_and_is_not_sent_again() {
    watchdog();
    let mut resumes = 0;
    for seed in 330..336u64 {
        let mut sc = Scenario::seqpacket(seed, 80, 3_000);
        sc.max_breaks = 4;
        sc.break_every = 4_000;
        sc.gen0_write_break = Some(1);
        let (s, daemon) = connect_seqpacket(&sc);
        let s = s.expect("open");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let got = recv_msgs_to_eof(&s, 100);
        let want: Vec<(Vec<u8>, bool)> = split_messages(&sc.out, &sc.out_ends)
            .into_iter()
            .map(|m| (m[..m.len().min(100)].to_vec(), m.len() > 100))
            .collect();
        assert_eq!(got.len(), want.len(), "seed {seed}: {:?}", s.stats());
        assert!(got == want, "seed {seed}: messages differ");
        resumes += s.stats().resumes;
        drop(s);
        daemon.join().expect("daemon");
    }
    assert!(resumes >= 6, "only {resumes} resumes");
}

#[test]
fn a_message_larger_than_the_window_is_emsgsize_and_an_empty_one_sends_nothing() {
    watchdog();
    let mut sc = Scenario::seqpacket(340, 3, 10);
    // Even where the kernel would take it: the daemon could not hold it whole.
    sc.kernel_window_extra = 100;
    let (s, daemon) = connect_seqpacket(&sc);
    let s = s.expect("open");
    let window = s.window() as usize;
    assert_eq!(window, 3001);
    let err = s.send_msg(&vec![1; window + 1]).expect_err("too large");
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE));
    assert_eq!(s.send_msg(&[]).expect("empty"), 0);
    assert_eq!(s.send_msg(&vec![2; window]).expect("a full window"), window);
    assert_eq!(s.send_msg(b"x").expect("small"), 1);
    s.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(recv_msgs_to_eof(&s, 64).len(), 3);
    assert_eq!(
        s.failure(),
        None,
        "EMSGSIZE is the caller's error, not a break"
    );
    assert_eq!(s.stats().resumes, 0);
    drop(s);
    let report = daemon.join().expect("daemon");
    assert_same_messages(
        "guest -> daemon",
        &split_messages(&report.sink, &report.sessions[0].sink_ends),
        &[vec![2; window], b"x".to_vec()],
    );
    assert_eq!(report.guest_eof_on, Some(0));
}

#[test]
fn seqpacket_refusals_and_bad_counts_map_like_streams() {
    watchdog();
    for (reason, errno, want) in [
        (
            Refusal::TargetRefused,
            libc::ECONNREFUSED as u32,
            libc::ECONNREFUSED,
        ),
        (Refusal::Unsupported, 0, libc::EOPNOTSUPP),
    ] {
        let mut sc = Scenario::seqpacket(350, 1, 10);
        sc.open = Some((reason, errno));
        let (s, daemon) = connect_seqpacket(&sc);
        let err = s.expect_err("refused");
        assert_eq!(err.raw_os_error(), Some(want), "{reason:?}: {err}");
        daemon.join().expect("daemon");
    }
    for (resume, want) in [
        (ResumeAnswer::Refuse(Refusal::Expired, 0), libc::ETIMEDOUT),
        (ResumeAnswer::Refuse(Refusal::BadProof, 0), libc::ECONNRESET),
        (ResumeAnswer::CountOffBy(1), libc::EPROTO),
    ] {
        let mut sc = Scenario::seqpacket(351, 50, 500);
        sc.resume = resume;
        sc.max_breaks = 1;
        sc.gen0_write_break = Some(1);
        let (s, daemon) = connect_seqpacket(&sc);
        let s = s.expect("open");
        let mut buf = vec![0u8; 600];
        let err = loop {
            match s.recv_msg(&mut buf) {
                Ok((0, false)) => panic!("EOF instead of a failed resume"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(err.raw_os_error(), Some(want), "{resume:?}: {err}");
        let again = s.send_msg(b"x").expect_err("still failed");
        assert_eq!(again.raw_os_error(), Some(want));
        drop(s);
        daemon.join().expect("daemon");
    }
}
