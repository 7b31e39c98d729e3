//! [`SessionStream`] against a fake session service over Unix sockets: no vsock, no daemon
//! process, no VM.
//!
//! The fake speaks the real frames (`session::wire`), checks resume proofs for real
//! (`session::proof`) and
//! keeps everything it sent (a real daemon acknowledges by the guest's `fwd_cnt`, which a
//! Unix socket cannot show). The client end of each connection is a [`FakeTransport`] that
//! behaves like a guest vsock socket where it matters:
//! - **credit**: a write takes at most `window - (sent - read by the daemon)` bytes on this
//!   connection, as the guest kernel obeys the daemon's credit; so whatever a break loses
//!   in flight fits the replay window, exactly as on vsock;
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
//! Two limits of the fake, both real properties of the protocol and documented in the
//! session module: the daemon never breaks a connection before the client has read the
//! daemon's answer frame whole (a RESUMED lost in flight leaves the client with a stale
//! nonce), nor after the client's last call (it read EOF, on any connection, and shut its
//! write side): nobody would notice, and what was in flight would be lost.
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use domsock_guest::pattern::{Checksum, PatternStream};
use domsock_guest::session::{
    Dialer, SessionError, SessionOptions, SessionStats, SessionStream, Transport,
};
use domsock_migration::session::proof::ResumeClaim;
use domsock_migration::session::wire::{Closed, Frame, Refusal, MAX_FRAME_LEN, PREAMBLE_LEN};
use domsock_migration::session::{Nonce, Secret, SessionId};

/// Bound on every blocking step; a test that needs longer is broken.
const STEP: Duration = Duration::from_secs(20);
/// The daemon's answer frames are at most this long (OPENED); client-side read faults
/// strike only after it.
const LONGEST_ANSWER: u64 = 80;
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
    /// The client read the daemon's EOF, on this connection or an earlier one: once it has
    /// shut its write side too it makes no more calls.
    client_saw_eof: Arc<AtomicBool>,
}

impl Link {
    fn new(window: u64, fault: Option<Fault>, client_saw_eof: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Self {
            st: Mutex::new(LinkState {
                fault,
                ..LinkState::default()
            }),
            credit_back: Condvar::new(),
            window,
            client_saw_eof,
        })
    }

    fn daemon_read(&self, n: usize) {
        lock(&self.st).daemon_read += n as u64;
        self.credit_back.notify_all();
    }

    /// The daemon breaks the connection; false if the client would never notice (it made
    /// its last call) or has not read the answer frame yet.
    fn break_with(&self, errno: i32) -> bool {
        let mut st = lock(&self.st);
        if st.broken.is_some()
            || (self.client_saw_eof.load(Ordering::SeqCst) && st.client_shut_write)
            || st.client_received < st.answer_len
        {
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

impl Transport for FakeTransport {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = lock(&self.link.st).broken {
            return Err(os(e));
        }
        let r = Transport::read(&self.sock, buf);
        let mut st = lock(&self.link.st);
        if let Some(e) = st.broken {
            // Whatever the read got is lost with the connection.
            return Err(os(e));
        }
        match r {
            Ok(0) => {
                if !buf.is_empty() {
                    self.link.client_saw_eof.store(true, Ordering::SeqCst);
                }
                Ok(0)
            }
            Ok(n) => {
                if let Some(f) = st.fault.filter(|f| !f.on_write) {
                    if st.client_received + n as u64 >= f.after {
                        // What this call read is lost; the socket itself stays up.
                        st.fault = None;
                        return Err(os(f.errno));
                    }
                }
                st.client_received += n as u64;
                Ok(n)
            }
            Err(e) => Err(e),
        }
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
            let credit = self.link.window - (st.client_sent - st.daemon_read);
            if credit > 0 {
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

#[derive(Debug)]
struct FakeDialer {
    to_daemon: Sender<(UnixStream, Arc<Link>)>,
    plan: Arc<Mutex<Plan>>,
    window: u64,
    client_saw_eof: Arc<AtomicBool>,
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
        let (client, daemon) = UnixStream::pair()?;
        let link = Link::new(self.window, fault, Arc::clone(&self.client_saw_eof));
        self.to_daemon
            .send((daemon, Arc::clone(&link)))
            .map_err(|_| os(libc::ECONNREFUSED))?;
        Ok(Box::new(FakeTransport { sock: client, link }))
    }
}

// ---------------------------------------------------------------------------------------
// The fake session service (one session).

/// How the fake answers a RESUME.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ResumeAnswer {
    Honest,
    Refuse(Refusal, u32),
    /// Rotates its nonce without telling the client: the client's proof must fail.
    ForgetNonce,
    /// Claims to have received this many bytes more than it did.
    CountOffBy(u64),
    /// Says its side reads no more (`closed.rcv`).
    PeerReadsNoMore,
}

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    window: u32,
    park_timeout_ms: u32,
    /// The daemon's stream to the guest (the host process's bytes).
    out: Arc<Vec<u8>>,
    max_breaks: u32,
    max_faults: u32,
    /// Typical bytes a connection moves before a break.
    break_every: u64,
    open: Option<(Refusal, u32)>,
    resume: ResumeAnswer,
    /// Percent of answers written in one write with the first data bytes.
    coalesce_pct: u64,
    /// Percent of answers written a byte at a time.
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
}

impl Scenario {
    fn new(seed: u64, out_len: usize) -> Self {
        Self {
            seed,
            window: 3001,
            park_timeout_ms: 10_000,
            out: Arc::new(PatternStream::new(seed.wrapping_mul(2) + 2).take(out_len)),
            max_breaks: 0,
            max_faults: 0,
            break_every: 20_000,
            open: None,
            resume: ResumeAnswer::Honest,
            coalesce_pct: 30,
            dribble_pct: 10,
            gen0_break_after_guest_shut: None,
            gen0_write_break: None,
            permanent_after_break: None,
            absent_max: 4,
        }
    }
}

/// What the daemon saw, for the test to check.
#[derive(Debug)]
struct Report {
    /// The guest's bytes, in the order the daemon accepted them.
    sink: Vec<u8>,
    /// The connection (generation) on which the guest's EOF arrived.
    guest_eof_on: Option<u64>,
    resumes: u64,
    breaks: u32,
    dials: u64,
    faults: u32,
}

#[derive(Debug)]
struct Sess {
    id: SessionId,
    secret: Secret,
    nonce: Nonce,
    /// Guest bytes accepted.
    received: u64,
    sink: Vec<u8>,
    /// The furthest offset of `out` ever written to a connection.
    sent_max: u64,
    /// `out` was written whole and the write side shut.
    daemon_done: bool,
    guest_eof_on: Option<u64>,
    breaks: u32,
    resumes: u64,
    rng: Rng,
}

#[derive(Debug)]
struct Shared {
    sc: Scenario,
    sess: Mutex<Sess>,
    plan: Arc<Mutex<Plan>>,
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

/// A daemon-initiated break of `ctl`, if the scenario allows one more.
fn try_break(ctl: &ConnCtl, sess: &mut Sess, shared: &Shared) -> bool {
    if ctl.is_detached() || sess.breaks >= shared.sc.max_breaks {
        return false;
    }
    let errno = sess.rng.pick(&BREAK_ERRNOS);
    if !ctl.link.break_with(errno) {
        return false;
    }
    sess.breaks += 1;
    let mut plan = lock(&shared.plan);
    plan.broke_once = true;
    plan.absent_for = sess.rng.below(shared.sc.absent_max + 1);
    drop(plan);
    ctl.detach();
    true
}

fn reader(ctl: Arc<ConnCtl>, shared: Arc<Shared>) {
    let mut rng = Rng::new(shared.sc.seed ^ (ctl.generation << 40) ^ 0x5ead);
    let mut buf = vec![0u8; 8192];
    let mut on_conn = 0u64;
    if ctl.hold_reads_until_guest_shut {
        let deadline = Instant::now() + STEP;
        while !lock(&ctl.link.st).client_shut_write {
            assert!(
                Instant::now() < deadline,
                "the guest never shut its write side"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
    loop {
        let want = 1 + rng.below(buf.len() as u64) as usize;
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
        sess.sink.extend_from_slice(&buf[..n]);
        sess.received += n as u64;
        ctl.link.daemon_read(n);
        on_conn += n as u64;
        if ctl.read_break_at.is_some_and(|at| on_conn >= at) && try_break(&ctl, &mut sess, &shared)
        {
            return;
        }
    }
}

fn writer(ctl: Arc<ConnCtl>, shared: Arc<Shared>, mut pos: usize) {
    let mut rng = Rng::new(shared.sc.seed ^ (ctl.generation << 40) ^ 0x3417e);
    let out = Arc::clone(&shared.sc.out);
    let mut on_conn = 0u64;
    if ctl.write_nothing {
        return;
    }
    if ctl.first_write_after_answer {
        let deadline = Instant::now() + STEP;
        loop {
            let link = lock(&ctl.link.st);
            if link.client_received >= link.answer_len {
                break;
            }
            drop(link);
            assert!(
                Instant::now() < deadline,
                "the client never read the answer"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
    loop {
        if pos == out.len() {
            let mut sess = lock(&shared.sess);
            if !ctl.is_detached() {
                let _ = ctl.sock.shutdown(Shutdown::Write);
                sess.daemon_done = true;
            }
            return;
        }
        let end = (pos + 1 + rng.below(16384) as usize).min(out.len());
        let r = Transport::write(&ctl.sock, &out[pos..end]);
        let mut sess = lock(&shared.sess);
        let Ok(n) = r else { return };
        pos += n;
        // Written is written, detached or not: the client may have read it.
        sess.sent_max = sess.sent_max.max(pos as u64);
        if ctl.is_detached() {
            return;
        }
        on_conn += n as u64;
        if ctl.write_break_at.is_some_and(|at| on_conn >= at) && try_break(&ctl, &mut sess, &shared)
        {
            return;
        }
    }
}

/// Reads one frame exactly (the daemon's side of the framing rule), counting its bytes
/// as read for the link's credit.
fn read_frame(sock: &UnixStream) -> io::Result<Frame> {
    let mut buf = [0u8; MAX_FRAME_LEN];
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

/// Writes the answer frame, with the first data bytes in the same write or a byte at a time.
/// Returns how many bytes of `data` went with it.
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
    if rng.chance(sc.coalesce_pct) {
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

/// Serves one session until the client's dialer is gone.
fn serve(shared: Arc<Shared>, conns: Receiver<(UnixStream, Arc<Link>)>) -> Report {
    let sc = shared.sc.clone();
    let mut rng = Rng::new(sc.seed ^ 0xdae);
    let mut running: Option<Running> = None;
    let mut generation = 0u64;
    let mut opened = false;
    loop {
        let (sock, link) = match conns.recv_timeout(STEP) {
            Ok(c) => c,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("fake daemon: no connection for {STEP:?}"),
        };
        sock.set_read_timeout(Some(STEP)).expect("timeout");
        let frame = match read_frame(&sock) {
            Ok(f) => f,
            // The client gave up on this connection (a fault during its RESUME).
            Err(_) => continue,
        };
        let mut w = &sock;
        link.daemon_read(frame.encode().len());
        match frame {
            Frame::Open { .. } => {
                assert!(!opened, "a second OPEN");
                if let Some((reason, errno)) = sc.open {
                    w.write_all(&refused(reason, errno)).expect("refused");
                    continue;
                }
                opened = true;
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
                let pos = write_answer(&sock, &link, &answer, &sc.out, &mut rng, &sc);
                lock(&shared.sess).sent_max = pos as u64;
                running = Some(start_conn(&shared, sock, link, 0, pos, &mut rng));
            }
            Frame::Resume {
                id,
                client_nonce,
                received,
                closed,
                proof,
            } => {
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
                let refusal = if id != sess.id {
                    Some((Refusal::UnknownSession, 0))
                } else if !claim.verify(&sess.secret, &proof) {
                    Some((Refusal::BadProof, 0))
                } else if let ResumeAnswer::Refuse(reason, errno) = sc.resume {
                    Some((reason, errno))
                } else {
                    None
                };
                if let Some((reason, errno)) = refusal {
                    drop(sess);
                    w.write_all(&refused(reason, errno)).expect("refused");
                    continue;
                }
                // A proven RESUME takes the session over: detach the old connection and let
                // its threads finish counting before answering with the count.
                drop(sess);
                stop(running.take(), &shared);
                let mut sess = lock(&shared.sess);
                assert!(
                    received <= sess.sent_max,
                    "the guest claims {received} bytes, only {} were sent",
                    sess.sent_max
                );
                generation += 1;
                sess.resumes += 1;
                sess.nonce = Nonce(rng.next().to_le_bytes().repeat(2).try_into().expect("16"));
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
                let k = write_answer(&sock, &link, &answer, &sc.out[start..], &mut rng, &sc);
                let mut sess = lock(&shared.sess);
                sess.sent_max = sess.sent_max.max((start + k) as u64);
                drop(sess);
                running = Some(start_conn(
                    &shared,
                    sock,
                    link,
                    generation,
                    start + k,
                    &mut rng,
                ));
            }
            other => panic!("fake daemon: unexpected {other:?}"),
        }
    }
    // The client is gone (its stream owned the dialer) and its socket closed: the last
    // connection's threads read what is left and end by themselves.
    if let Some((_, threads)) = running {
        for t in threads {
            t.join().expect("connection thread");
        }
    }
    let sess = lock(&shared.sess);
    let plan = lock(&shared.plan);
    Report {
        sink: sess.sink.clone(),
        guest_eof_on: sess.guest_eof_on,
        resumes: sess.resumes,
        breaks: sess.breaks,
        dials: plan.dials,
        faults: plan.faults,
    }
}

/// A fake daemon for `sc` and the dialer that reaches it.
fn start(sc: Scenario) -> (Box<FakeDialer>, JoinHandle<Report>) {
    let mut rng = Rng::new(sc.seed ^ 0x1d);
    let mut id = [0u8; 16];
    let mut secret = [0u8; 32];
    let mut nonce = [0u8; 16];
    for b in id.iter_mut().chain(&mut secret).chain(&mut nonce) {
        *b = rng.next() as u8;
    }
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
    let shared = Arc::new(Shared {
        sess: Mutex::new(Sess {
            id: SessionId(id),
            secret: Secret(secret),
            nonce: Nonce(nonce),
            received: 0,
            sink: Vec::new(),
            sent_max: 0,
            daemon_done: false,
            guest_eof_on: None,
            breaks: 0,
            resumes: 0,
            rng: Rng::new(sc.seed ^ 0xb4ea),
        }),
        plan: Arc::clone(&plan),
        sc: sc.clone(),
    });
    let (tx, rx) = mpsc::channel();
    let daemon = thread::spawn(move || serve(shared, rx));
    let dialer = Box::new(FakeDialer {
        to_daemon: tx,
        plan,
        window: u64::from(sc.window),
        client_saw_eof: Arc::new(AtomicBool::new(false)),
    });
    (dialer, daemon)
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

fn connect(sc: &Scenario) -> (io::Result<SessionStream>, JoinHandle<Report>) {
    let (dialer, daemon) = start(sc.clone());
    (SessionStream::connect_with(dialer, 2, 5000, opts()), daemon)
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
        port: domsock_proto::Port(5000),
        socket_type: domsock_proto::SocketType::Stream,
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
