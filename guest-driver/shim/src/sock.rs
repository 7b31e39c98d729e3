//! One vsock socket the program created, and the session it may carry.
//!
//! The program's fd number(s) always name whatever this socket currently is:
//!
//! | phase      | the program's fd is                    | its calls                         |
//! |------------|----------------------------------------|-----------------------------------|
//! | `Fresh`    | the socket it created (not connected)  | pass through                      |
//! | `Bound`    | its socket, bound (a listener to be)   | pass through                      |
//! | `Listening`| its listening socket, port registered  | pass through; `accept` looks      |
//! | `Raw`      | a plain connection (no session)        | pass through                      |
//! | `Opening`  | its socket, or a placeholder (below)   | wait / `EAGAIN`                   |
//! | `Live`     | the session's vsock connection         | pass through, bytes counted       |
//! | `Breaking` | the dead connection, for an instant    | wait / `EAGAIN`                   |
//! | `Outage`   | the outage placeholder                 | wait / `EAGAIN`                   |
//! | `Failed`   | the failed placeholder                 | the session's errno               |
//!
//! The **outage placeholder** is the read end of a pipe whose write end the shim holds: it
//! is never readable, never writable and never hangs up, so `poll`/`epoll` report the fd
//! not ready for as long as the device is away. Closing the write end when the session is
//! back makes pollers that were sleeping on it wake (POLLHUP), and the shim's `poll`
//! wrappers, seeing the generation moved, poll again on the new connection. The **failed
//! placeholder** is the write end of a pipe whose read end is closed: always
//! `POLLOUT|POLLERR`, like a socket whose connect failed.
//!
//! Every change of what the fd is ([`Sock::swap_in`]) `dup3`s the new file onto each of
//! the program's fd numbers, after removing and before re-adding the program's epoll
//! registrations of them (they die with the old file otherwise), and bumps `gen`. A call
//! that fails after the generation moved is retried instead of reported.
//!
//! A seqpacket session counts messages instead of bytes and replays whole messages
//! ([`Replay::Messages`]); a listening socket whose port the daemon was told about
//! ([`crate::listen`]) hands out sessions from `accept`, which are `Live` sockets like the
//! ones the program connected.
//!
//! Locks, always in this order: `tx` (held across a send and its recording in the replay
//! buffer), `rx` (across a receive and its counting), `st`. The resume and the swaps take
//! all three; program calls never hold `tx` or `rx` while waiting for a resume.

use crate::config;
use crate::handshake::{
    self, connect_private, read_answer, send_frame, send_message, vsock_addr, write_all, Failure,
    HOST_CID,
};
use crate::listen::Registration;
use crate::log::debug;
use crate::next::{self, cvt};
use crate::table::{self, Entry};
use domsock_migration::session::proof::ResumeClaim;
use domsock_migration::session::replay::{MessageReplay, ReplayBuffer};
use domsock_migration::session::wire::{Closed, Frame, Refusal};
use domsock_migration::session::{Nonce, Secret, SessionId};
use domsock_proto::{Cid, Port, SocketType};
use domsock_uevent::{DeviceWatch, Wake};
use libc::{c_int, epoll_event, sockaddr_vm};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

/// How long an OPEN or RESUME may wait for the daemon's answer on one connection.
const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// First and largest pause between two resume attempts.
const RETRY_FIRST_MS: u64 = 10;
const RETRY_MAX_MS: u64 = 200;

/// What a send's `record` is: given how many bytes the kernel took, it hands them to the
/// sink, in order, in pieces.
pub(crate) type Record<'a> = &'a mut dyn FnMut(usize, &mut dyn FnMut(&[u8]));

/// A socket option the program set, applied again to every new connection.
#[derive(Debug, Clone)]
pub(crate) struct SockOpt {
    pub(crate) level: c_int,
    pub(crate) name: c_int,
    pub(crate) value: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Fresh,
    Bound,
    Listening,
    Raw,
    Opening,
    Live,
    Breaking,
    Outage,
    Failed(c_int),
}

/// What the `poll` wrappers need to know about a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PollView {
    /// A session connection: its POLLERR means the transport broke.
    Live,
    /// Waiting for a session (open or resume): whatever the fd reports is not the program's.
    Transient,
    /// Anything else: report what the kernel says.
    Plain,
}

/// What OPENED or OFFERED gave a session.
#[derive(Debug)]
pub(crate) struct Creds {
    pub(crate) id: SessionId,
    pub(crate) secret: Secret,
    pub(crate) nonce: Nonce,
    pub(crate) park_timeout_ms: u32,
}

/// What we sent and the daemon may lack.
#[derive(Debug)]
pub(crate) enum Replay {
    /// The last window of bytes (stream sessions).
    Bytes(ReplayBuffer),
    /// The last messages whose bytes fit the window (seqpacket sessions).
    Messages(MessageReplay),
}

#[derive(Debug)]
struct Tx {
    replay: Replay,
    /// The daemon's window: on seqpacket also the largest message.
    window: usize,
    /// RESUMED said the host end reads no more: later sends fail with EPIPE, as they
    /// would on a connection whose peer closed.
    peer_gone: bool,
}

#[derive(Debug)]
struct Rx {
    /// Bytes (stream) or messages (seqpacket) handed to the program.
    received: u64,
}

#[derive(Debug, Clone, Copy)]
struct EpollReg {
    epfd: c_int,
    fd: c_int,
    ev: epoll_event,
}

#[derive(Debug)]
struct St {
    phase: Phase,
    gen: u64,
    /// The program's fd numbers for this socket.
    fds: Vec<c_int>,
    epoll: Vec<EpollReg>,
    opts: Vec<SockOpt>,
    /// Reported once by `getsockopt(SO_ERROR)` (a failed non-blocking connect).
    so_error: c_int,
    /// The session's target, as the program connected it.
    peer: Option<sockaddr_vm>,
    /// The session connection's local address, for `getsockname` during an outage.
    local: Option<sockaddr_vm>,
    /// The outage placeholder's write end.
    placeholder: Option<OwnedFd>,
    creds: Option<Creds>,
    rcv_timeout: Option<Duration>,
    snd_timeout: Option<Duration>,
    /// The program shut its write / read side. Kept here, not under `tx`/`rx`, so that a
    /// shutdown never waits for a send or receive blocked in the kernel (a writer thread
    /// shutting while the reader thread waits for the answer must not deadlock).
    shut_wr: bool,
    shut_rd: bool,
    /// A listening socket's registration with the daemon (phase `Listening`).
    listener: Option<Arc<Registration>>,
}

/// A socket the shim follows.
#[derive(Debug)]
pub(crate) struct Sock {
    stream: bool,
    nonblocking: AtomicBool,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    st: Mutex<St>,
    changed: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A program thread that panicked inside the shim aborts (extern "C"), so poisoning only
    // says a guard was dropped during an abort: the data is still consistent enough.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Usable {
    Pass,
    Live,
}

/// Errors of a send or receive on a session connection that mean the transport broke.
fn is_break(e: c_int) -> bool {
    matches!(
        e,
        libc::ENODEV
            | libc::ENOMEM
            | libc::ECONNRESET
            | libc::ENOTCONN
            | libc::EPIPE
            | libc::ESHUTDOWN
            | libc::ECONNABORTED
            | libc::ETIMEDOUT
    )
}

/// The errno a refusal means to the program (the same mapping as `domsock_guest::session`).
pub(crate) fn refusal_errno(reason: Refusal, errno: u32) -> c_int {
    match reason {
        Refusal::UnknownSession | Refusal::BadProof => libc::ECONNRESET,
        Refusal::Expired => libc::ETIMEDOUT,
        Refusal::TargetRefused => match c_int::try_from(errno) {
            Ok(e) if e > 0 => e,
            _ => libc::ECONNREFUSED,
        },
        Refusal::Unsupported => libc::EOPNOTSUPP,
        Refusal::TooMany => libc::EAGAIN,
        Refusal::OutOfRange | Refusal::Malformed => libc::EPROTO,
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), c_int> {
    let mut p = [0 as c_int; 2];
    // SAFETY: `p` has room for the two fds pipe2 returns.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(next::errno());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

enum Established {
    Session(OwnedFd, Creds, u32),
    Raw(OwnedFd),
}

impl Sock {
    /// A socket just created by the program (`ty` without the flag bits).
    pub(crate) fn new(ty: c_int, nonblocking: bool) -> Arc<Sock> {
        Arc::new(Sock {
            stream: ty == libc::SOCK_STREAM,
            nonblocking: AtomicBool::new(nonblocking),
            tx: Mutex::new(Tx {
                replay: Replay::Bytes(ReplayBuffer::new(0)),
                window: 0,
                peer_gone: false,
            }),
            rx: Mutex::new(Rx { received: 0 }),
            st: Mutex::new(St {
                phase: Phase::Fresh,
                gen: 0,
                fds: Vec::new(),
                epoll: Vec::new(),
                opts: Vec::new(),
                so_error: 0,
                peer: None,
                local: None,
                placeholder: None,
                creds: None,
                rcv_timeout: None,
                snd_timeout: None,
                shut_wr: false,
                shut_rd: false,
                listener: None,
            }),
            changed: Condvar::new(),
        })
    }

    /// A session the program accepted on `fd` (OFFERED read): `Live` from the start.
    pub(crate) fn accepted(
        fd: c_int,
        nonblocking: bool,
        creds: Creds,
        window: u32,
        peer: sockaddr_vm,
    ) -> Arc<Sock> {
        let s = Sock::new(libc::SOCK_STREAM, nonblocking);
        {
            let mut tx = lock(&s.tx);
            tx.replay = Replay::Bytes(ReplayBuffer::new(window as usize));
            tx.window = window as usize;
            let mut st = lock(&s.st);
            st.phase = Phase::Live;
            st.fds.push(fd);
            st.creds = Some(creds);
            st.peer = Some(peer);
            st.local = local_addr(fd);
        }
        s
    }

    /// The socket type for new connections of this socket's.
    fn sock_type(&self) -> c_int {
        if self.stream {
            libc::SOCK_STREAM
        } else {
            libc::SOCK_SEQPACKET
        }
    }

    /// The program bound this (fresh, stream) socket: it may become a listener.
    pub(crate) fn set_bound(&self) {
        let mut st = lock(&self.st);
        if st.phase == Phase::Fresh {
            st.phase = Phase::Bound;
        }
    }

    /// Whether the program bound it and has not listened yet.
    pub(crate) fn is_bound(&self) -> bool {
        lock(&self.st).phase == Phase::Bound
    }

    /// The program's `listen` succeeded with its port registered as `reg`.
    pub(crate) fn set_listening(&self, reg: Arc<Registration>) {
        let mut st = lock(&self.st);
        st.phase = Phase::Listening;
        st.listener = Some(reg);
        for &fd in &st.fds {
            crate::listen::mark(fd, true);
        }
    }

    /// The registration, if this is a listening socket whose accepts may be sessions.
    pub(crate) fn registration(&self) -> Option<Arc<Registration>> {
        let st = lock(&self.st);
        match st.phase {
            Phase::Listening => st.listener.clone(),
            _ => None,
        }
    }

    /// Whether it is a stream socket.
    pub(crate) fn is_stream(&self) -> bool {
        self.stream
    }

    /// Whether a connect may still decide what this socket becomes.
    pub(crate) fn is_fresh(&self) -> bool {
        lock(&self.st).phase == Phase::Fresh
    }

    /// Whether calls on it pass straight through.
    pub(crate) fn is_raw(&self) -> bool {
        matches!(
            lock(&self.st).phase,
            Phase::Fresh | Phase::Bound | Phase::Listening | Phase::Raw
        )
    }

    /// The program changed `O_NONBLOCK` (fcntl, ioctl).
    pub(crate) fn set_nonblocking(&self, on: bool) {
        self.nonblocking.store(on, Ordering::Relaxed);
    }

    fn live_gen(&self) -> Option<u64> {
        let st = lock(&self.st);
        (st.phase == Phase::Live).then_some(st.gen)
    }

    /// The generation and what the poll wrappers should make of this socket's events.
    pub(crate) fn poll_view(&self) -> (u64, PollView) {
        let st = lock(&self.st);
        let view = match st.phase {
            Phase::Live => PollView::Live,
            Phase::Opening | Phase::Breaking | Phase::Outage => PollView::Transient,
            Phase::Fresh | Phase::Bound | Phase::Listening | Phase::Raw | Phase::Failed(_) => {
                PollView::Plain
            }
        };
        (st.gen, view)
    }

    /// Records that `fd` names this socket (after socket/dup); the table entry is the
    /// caller's.
    pub(crate) fn add_fd(&self, fd: c_int) {
        lock(&self.st).fds.push(fd);
    }

    /// `fd` is being closed or replaced. Returns whether it was the last one.
    pub(crate) fn drop_fd(&self, fd: c_int) -> bool {
        let mut st = lock(&self.st);
        st.fds.retain(|&f| f != fd);
        st.epoll.retain(|r| r.fd != fd);
        crate::listen::mark(fd, false);
        if st.fds.is_empty() && matches!(st.phase, Phase::Breaking | Phase::Outage) {
            debug!("last fd closed during an outage: the resume goes on to deliver the tail");
        }
        let last = st.fds.is_empty();
        let reg = if last { st.listener.take() } else { None };
        drop(st);
        if let Some(reg) = reg {
            // The listening socket is gone: the daemon forgets the port.
            reg.stop();
        }
        last
    }

    /// Stops following this socket (it became an ordinary one): unlinks all its fds.
    pub(crate) fn forget(&self) {
        let (fds, reg) = {
            let mut st = lock(&self.st);
            (std::mem::take(&mut st.fds), st.listener.take())
        };
        if let Some(reg) = reg {
            reg.stop();
        }
        for fd in fds {
            crate::listen::mark(fd, false);
            drop(table::remove(fd));
        }
    }

    /// Duplicates `old` with `dup_call` and tracks the new fd.
    pub(crate) fn dup_with(
        self: &Arc<Self>,
        dup_call: impl FnOnce() -> c_int,
    ) -> Result<c_int, c_int> {
        let mut st = lock(&self.st);
        let new = dup_call();
        if new < 0 {
            return Err(next::errno());
        }
        st.fds.push(new);
        crate::listen::mark(new, st.phase == Phase::Listening);
        drop(st);
        match table::insert(new, Entry::Sock(Arc::clone(self))) {
            Ok(old) => drop(old),
            // Beyond the table: that copy is not followed (documented).
            Err(_) => self.drop_fd_quiet(new),
        }
        Ok(new)
    }

    fn drop_fd_quiet(&self, fd: c_int) {
        lock(&self.st).fds.retain(|&f| f != fd);
    }

    fn wait_usable(&self, nonblocking: bool, timeout: Option<Duration>) -> Result<Usable, c_int> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.st);
        loop {
            match st.phase {
                Phase::Fresh | Phase::Bound | Phase::Listening | Phase::Raw => {
                    return Ok(Usable::Pass)
                }
                Phase::Live => return Ok(Usable::Live),
                Phase::Failed(e) => return Err(e),
                Phase::Opening | Phase::Breaking | Phase::Outage => {}
            }
            if nonblocking {
                return Err(libc::EAGAIN);
            }
            st = match deadline {
                None => self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(libc::EAGAIN);
                    }
                    self.changed
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn lock_io<'a, T>(
        &self,
        m: &'a Mutex<T>,
        nonblocking: bool,
    ) -> Result<MutexGuard<'a, T>, c_int> {
        match m.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            // Held: by another program thread (wait for it, as the kernel's socket lock
            // would) or by a resume (then a non-blocking call must not wait).
            Err(TryLockError::WouldBlock) => {
                if nonblocking && self.live_gen().is_none() {
                    Err(libc::EAGAIN)
                } else {
                    Ok(lock(m))
                }
            }
        }
    }

    /// A send of the program's of `len` bytes: `call` does the real send on the program's
    /// fd and `record(n, sink)` hands the first `n` bytes it accepted to `sink`, in order, in
    /// pieces (they go into the replay buffer; on seqpacket as one message).
    pub(crate) fn send(
        self: &Arc<Self>,
        dontwait: bool,
        len: usize,
        call: &mut dyn FnMut() -> Result<usize, c_int>,
        record: Record<'_>,
    ) -> Result<usize, c_int> {
        loop {
            let nonblocking = dontwait || self.nonblocking.load(Ordering::Relaxed);
            let timeout = lock(&self.st).snd_timeout;
            if let Usable::Pass = self.wait_usable(nonblocking, timeout)? {
                return call();
            }
            let mut tx = self.lock_io(&self.tx, nonblocking)?;
            let Some(gen) = self.live_gen() else { continue };
            if tx.peer_gone {
                return Err(libc::EPIPE);
            }
            if !self.stream && len > tx.window {
                // What the kernel says of a message larger than the peer's buffer (the
                // daemon's, whose window it is); the replay could not keep it either.
                return Err(libc::EMSGSIZE);
            }
            match call() {
                Ok(n) => {
                    match &mut tx.replay {
                        Replay::Bytes(rb) => record(n, &mut |piece| rb.record_evicting(piece)),
                        Replay::Messages(mr) if n == len => {
                            let mut msg = Vec::with_capacity(n);
                            record(n, &mut |piece| msg.extend_from_slice(piece));
                            // Fits: checked against the window above.
                            let _ = mr.record_evicting(&msg);
                        }
                        Replay::Messages(_) => {
                            // Part of a message is not a message: give this connection up
                            // (the daemon drops the part) and send it again whole.
                            drop(tx);
                            debug!("a seqpacket send took {n} of {len} bytes");
                            self.begin_outage(gen, libc::EPROTO);
                            continue;
                        }
                    }
                    return Ok(n);
                }
                Err(libc::EAGAIN) if !self.stream => {
                    // The kernel may have sent part of the message before it would block
                    // (and says only EAGAIN): the daemon would glue the next message to
                    // it. Give the connection up so the daemon drops the part; the resume
                    // runs meanwhile and the program's retry sends the message whole.
                    drop(tx);
                    self.begin_outage(gen, libc::EAGAIN);
                    return Err(libc::EAGAIN);
                }
                Err(e) => {
                    drop(tx);
                    if self.live_gen() != Some(gen) {
                        continue;
                    }
                    let shut = lock(&self.st).shut_wr;
                    if is_break(e) && !(e == libc::EPIPE && shut) {
                        self.begin_outage(gen, e);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// A receive of the program's into `want` bytes of buffer (`peek`: not consumed).
    pub(crate) fn recv(
        self: &Arc<Self>,
        fd: RawFd,
        dontwait: bool,
        peek: bool,
        want: usize,
        call: &mut dyn FnMut() -> Result<usize, c_int>,
    ) -> Result<usize, c_int> {
        loop {
            let nonblocking = dontwait || self.nonblocking.load(Ordering::Relaxed);
            let timeout = lock(&self.st).rcv_timeout;
            if let Usable::Pass = self.wait_usable(nonblocking, timeout)? {
                return call();
            }
            let mut rx = self.lock_io(&self.rx, nonblocking)?;
            let Some(gen) = self.live_gen() else { continue };
            match call() {
                Ok(0) if want > 0 && !lock(&self.st).shut_rd => {
                    drop(rx);
                    if self.live_gen() != Some(gen) {
                        continue;
                    }
                    // A reset connection may read as EOF; a genuine EOF has no error.
                    if let Some(e) = pending_error(fd) {
                        self.begin_outage(gen, e);
                        continue;
                    }
                    return Ok(0);
                }
                Ok(n) => {
                    if !peek && n > 0 {
                        // A seqpacket receive takes one message, whole or truncated.
                        rx.received += if self.stream { n as u64 } else { 1 };
                    }
                    return Ok(n);
                }
                Err(e) => {
                    drop(rx);
                    if self.live_gen() != Some(gen) {
                        continue;
                    }
                    if is_break(e) {
                        self.begin_outage(gen, e);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// The transport under generation `gen` broke (`why`): put the outage placeholder in
    /// and start resuming. Idempotent: only the first caller for a generation acts.
    pub(crate) fn begin_outage(self: &Arc<Self>, gen: u64, why: c_int) {
        {
            let mut st = lock(&self.st);
            if st.phase != Phase::Live || st.gen != gen {
                return;
            }
            st.phase = Phase::Breaking;
            // Wake any thread still blocked in the kernel on the dead connection, so that
            // the locks below are released.
            if let Some(&fd) = st.fds.first() {
                // SAFETY: shutdown(2) on the program's fd, which is the dead connection.
                unsafe { next::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        debug!("transport broke ({}): resuming", errno_name(why));
        let tx = lock(&self.tx);
        let rx = lock(&self.rx);
        let mut st = lock(&self.st);
        match pipe() {
            Ok((r, w)) => {
                set_fd_nonblocking(r.as_raw_fd(), self.nonblocking.load(Ordering::Relaxed));
                self.swap_in(&mut st, r.as_raw_fd());
                st.placeholder = Some(w);
                st.phase = Phase::Outage;
            }
            Err(e) => {
                drop((st, rx, tx));
                self.fail(e);
                return;
            }
        }
        drop((st, rx, tx));
        self.changed.notify_all();
        let me = Arc::clone(self);
        if let Err(e) = std::thread::Builder::new()
            .name("domsock-resume".into())
            .spawn(move || me.resume())
        {
            self.fail(e.raw_os_error().unwrap_or(libc::EAGAIN));
        }
    }

    /// Makes `newfd`'s file what every program fd of this socket names (see the module
    /// doc), re-adding the program's epoll registrations. `newfd` stays the caller's.
    fn swap_in(&self, st: &mut St, newfd: RawFd) {
        for r in &st.epoll {
            // SAFETY: epoll_ctl(2) DEL with the program's epfd and fd; errors are harmless.
            unsafe { next::epoll_ctl(r.epfd, libc::EPOLL_CTL_DEL, r.fd, std::ptr::null_mut()) };
        }
        for &fd in &st.fds {
            // SAFETY: F_GETFD and dup3(2) on fds the program owns and the shim tracks;
            // replacing their file is the point.
            unsafe {
                let fdflags = next::fcntl(fd, libc::F_GETFD, 0);
                let flags = if fdflags >= 0 && fdflags & libc::FD_CLOEXEC != 0 {
                    libc::O_CLOEXEC
                } else {
                    0
                };
                let mut rc = -1;
                for _ in 0..100 {
                    rc = next::dup3(newfd, fd, flags);
                    if rc >= 0 || next::errno() != libc::EBUSY {
                        break;
                    }
                }
                if rc < 0 {
                    debug!("dup3 onto fd {fd} failed: {}", errno_name(next::errno()));
                }
            }
        }
        for r in &st.epoll {
            let mut ev = r.ev;
            // SAFETY: epoll_ctl(2) ADD with a valid event.
            unsafe { next::epoll_ctl(r.epfd, libc::EPOLL_CTL_ADD, r.fd, &mut ev) };
        }
        st.gen += 1;
        debug!("fds {:?} are generation {} now", st.fds, st.gen);
    }

    /// Ends the session with `e`: the program's fds become the failed placeholder.
    fn fail(&self, e: c_int) {
        debug!("session failed: {}", errno_name(e));
        let _tx = lock(&self.tx);
        let _rx = lock(&self.rx);
        let mut st = lock(&self.st);
        if !st.fds.is_empty() {
            if let Ok((r, w)) = pipe() {
                drop(r);
                self.swap_in(&mut st, w.as_raw_fd());
            }
        }
        st.placeholder = None;
        st.phase = Phase::Failed(e);
        st.so_error = e;
        drop(st);
        self.changed.notify_all();
    }

    /// The program connects this stream socket to host port `port` (policy checked by
    /// the caller): opens a session, or a plain connection if the daemon has none.
    pub(crate) fn open(self: &Arc<Self>, addr: sockaddr_vm) -> Result<(), c_int> {
        let nonblocking = self.nonblocking.load(Ordering::Relaxed);
        let opts;
        {
            let mut st = lock(&self.st);
            match st.phase {
                Phase::Fresh => {}
                Phase::Opening => return Err(libc::EALREADY),
                Phase::Failed(e) => return Err(e),
                _ => return Err(libc::EISCONN),
            }
            st.phase = Phase::Opening;
            st.peer = Some(addr);
            opts = st.opts.clone();
            if nonblocking {
                let (r, w) = pipe()?;
                set_fd_nonblocking(r.as_raw_fd(), true);
                self.swap_in(&mut st, r.as_raw_fd());
                st.placeholder = Some(w);
            }
        }
        let (cid, port, ty) = (addr.svm_cid, addr.svm_port, self.sock_type());
        if nonblocking {
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("domsock-open".into())
                .spawn(move || match establish(cid, port, ty, &opts) {
                    Ok(est) => me.install(est),
                    Err(e) => me.fail(e),
                });
            match spawned {
                Ok(_) => Err(libc::EINPROGRESS),
                Err(e) => {
                    let e = e.raw_os_error().unwrap_or(libc::EAGAIN);
                    self.fail(e);
                    Err(e)
                }
            }
        } else {
            match establish(cid, port, ty, &opts) {
                Ok(est) => {
                    self.install(est);
                    Ok(())
                }
                Err(e) => {
                    lock(&self.st).phase = Phase::Fresh;
                    self.changed.notify_all();
                    Err(e)
                }
            }
        }
    }

    /// A connection is ready: make it the program's.
    fn install(&self, est: Established) {
        let mut tx = lock(&self.tx);
        let _rx = lock(&self.rx);
        let mut st = lock(&self.st);
        let (fd, phase) = match est {
            Established::Session(fd, creds, window) => {
                debug!(
                    "session {} opened to {}:{} (window {window})",
                    creds.id,
                    st.peer.map_or(0, |p| p.svm_cid),
                    st.peer.map_or(0, |p| p.svm_port)
                );
                tx.replay = if self.stream {
                    Replay::Bytes(ReplayBuffer::new(window as usize))
                } else {
                    Replay::Messages(MessageReplay::new(window as usize))
                };
                tx.window = window as usize;
                st.creds = Some(creds);
                st.local = local_addr(fd.as_raw_fd());
                (fd, Phase::Live)
            }
            Established::Raw(fd) => {
                debug!("no session service: plain connection");
                (fd, Phase::Raw)
            }
        };
        set_fd_nonblocking(fd.as_raw_fd(), self.nonblocking.load(Ordering::Relaxed));
        apply_shutdowns(&st, fd.as_raw_fd());
        self.swap_in(&mut st, fd.as_raw_fd());
        drop(fd);
        // Closing the placeholder's write end wakes pollers sleeping on it.
        st.placeholder = None;
        st.phase = phase;
        drop(st);
        self.changed.notify_all();
    }

    /// The resume worker: reconnects with bounded backoff until resumed, refused, or the
    /// park timeout has passed.
    fn resume(self: Arc<Self>) {
        let started = Instant::now();
        let park_ms = lock(&self.st)
            .creds
            .as_ref()
            .map_or(0, |c| u64::from(c.park_timeout_ms));
        let deadline = started + Duration::from_millis(park_ms);
        let mut pause = Duration::from_millis(RETRY_FIRST_MS);
        let mut attempts = 0u32;
        // Before the first attempt, so a device that comes back after it is not missed.
        let watch = DeviceWatch::open();
        let outcome = loop {
            attempts += 1;
            match self.try_resume(deadline) {
                Ok(fd) => break Ok(fd),
                Err(Failure::Final(e)) => break Err(e),
                Err(Failure::Transport(_)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break Err(libc::ETIMEDOUT);
                    }
                    pause = match watch.wait(pause.min(left)) {
                        // The transport is back: try at once, and soon again if early.
                        Wake::Device => Duration::from_millis(RETRY_FIRST_MS),
                        Wake::Timeout => (pause * 2).min(Duration::from_millis(RETRY_MAX_MS)),
                    };
                }
            }
        };
        match outcome {
            Ok(fd) => {
                debug!(
                    "resumed after {} ms, {attempts} attempt(s)",
                    started.elapsed().as_millis()
                );
                let _tx = lock(&self.tx);
                let _rx = lock(&self.rx);
                let mut st = lock(&self.st);
                if st.fds.is_empty() {
                    // Closed by the program meanwhile: the tail is delivered, now close.
                    drop(fd);
                    st.placeholder = None;
                    st.phase = Phase::Failed(libc::EBADF);
                    return;
                }
                set_fd_nonblocking(fd.as_raw_fd(), self.nonblocking.load(Ordering::Relaxed));
                // A shutdown the program made after the RESUME went out.
                apply_shutdowns(&st, fd.as_raw_fd());
                self.swap_in(&mut st, fd.as_raw_fd());
                drop(fd);
                st.placeholder = None;
                st.phase = Phase::Live;
                drop(st);
                self.changed.notify_all();
            }
            Err(e) => self.fail(e),
        }
    }

    /// One RESUME on a new connection; on success the daemon has our missing tail.
    fn try_resume(&self, deadline: Instant) -> Result<OwnedFd, Failure> {
        let opts = lock(&self.st).opts.clone();
        let ty = self.sock_type();
        let fd = connect_private(HOST_CID, handshake::session_port(), ty, &opts)?;
        let hs_deadline =
            deadline.min(Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS));
        let received = lock(&self.rx).received;
        let closed = {
            let st = lock(&self.st);
            Closed {
                send: st.shut_wr,
                rcv: st.shut_rd,
            }
        };
        let client_nonce = Nonce(handshake::random());
        let frame = {
            let st = lock(&self.st);
            let c = st.creds.as_ref().ok_or(Failure::Final(libc::EPROTO))?;
            let proof = ResumeClaim {
                id: c.id,
                server_nonce: c.nonce,
                client_nonce,
                received,
                closed,
            }
            .prove(&c.secret);
            Frame::Resume {
                id: c.id,
                client_nonce,
                received,
                closed,
                proof,
            }
        };
        send_frame(fd.as_raw_fd(), ty, &frame, hs_deadline)?;
        match read_answer(fd.as_raw_fd(), ty, hs_deadline)? {
            Frame::Resumed {
                received: theirs,
                closed: theirs_closed,
                next_nonce,
            } => {
                if let Some(c) = lock(&self.st).creds.as_mut() {
                    c.nonce = next_nonce;
                }
                let shut = closed.send;
                let mut tx = lock(&self.tx);
                tx.peer_gone |= theirs_closed.rcv;
                match &mut tx.replay {
                    Replay::Bytes(rb) => {
                        let (a, b) = rb
                            .resume_from(theirs)
                            .map_err(|_| Failure::Final(libc::EPROTO))?;
                        debug!(
                            "RESUMED: daemon has {theirs} bytes, resending {}",
                            a.len() + b.len()
                        );
                        write_all(fd.as_raw_fd(), a, hs_deadline)?;
                        write_all(fd.as_raw_fd(), b, hs_deadline)?;
                    }
                    Replay::Messages(mr) => {
                        let msgs = mr
                            .resume_from(theirs)
                            .map_err(|_| Failure::Final(libc::EPROTO))?;
                        debug!(
                            "RESUMED: daemon has {theirs} messages, resending {}",
                            msgs.len()
                        );
                        let mut whole = Vec::new();
                        for (a, b) in msgs {
                            whole.clear();
                            whole.extend_from_slice(a);
                            whole.extend_from_slice(b);
                            send_message(fd.as_raw_fd(), &whole, hs_deadline)?;
                        }
                    }
                }
                if shut {
                    // SAFETY: shutdown(2) on our private connection.
                    unsafe { next::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
                }
                Ok(fd)
            }
            Frame::Refused { reason, errno } => {
                debug!("RESUME refused: {reason:?}");
                Err(Failure::Final(refusal_errno(reason, errno)))
            }
            _ => Err(Failure::Final(libc::EPROTO)),
        }
    }

    /// The program shuts down a direction. During an outage it is remembered and applied
    /// after the retransmission (the daemon is told in RESUME). Takes only `st`: see
    /// `St::shut_wr`.
    pub(crate) fn shutdown(&self, fd: RawFd, how: c_int) -> Result<(), c_int> {
        let mut st = lock(&self.st);
        let record = |st: &mut St| {
            if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
                st.shut_wr = true;
            }
            if how == libc::SHUT_RD || how == libc::SHUT_RDWR {
                st.shut_rd = true;
            }
        };
        match st.phase {
            Phase::Fresh | Phase::Bound | Phase::Listening | Phase::Raw | Phase::Live => {}
            Phase::Failed(_) => return Err(libc::ENOTCONN),
            Phase::Opening | Phase::Breaking | Phase::Outage => {
                record(&mut st);
                return Ok(());
            }
        }
        // SAFETY: shutdown(2) on the program's fd, which is the connection (st held, so no
        // swap can happen meanwhile).
        cvt(unsafe { next::shutdown(fd, how) } as isize)?;
        if st.phase == Phase::Live {
            record(&mut st);
        }
        Ok(())
    }

    /// The program's `epoll_ctl` on one of this socket's fds: done, and remembered.
    pub(crate) fn epoll_ctl(
        &self,
        epfd: c_int,
        op: c_int,
        fd: c_int,
        ev: *mut epoll_event,
    ) -> c_int {
        let mut st = lock(&self.st);
        // SAFETY: the program's own arguments, passed on unchanged.
        let r = unsafe { next::epoll_ctl(epfd, op, fd, ev) };
        if r < 0 {
            return r;
        }
        st.epoll.retain(|x| !(x.epfd == epfd && x.fd == fd));
        if op != libc::EPOLL_CTL_DEL && !ev.is_null() {
            // SAFETY: the kernel accepted `ev`, so it points to a readable epoll_event.
            let ev = unsafe { *ev };
            st.epoll.push(EpollReg { epfd, fd, ev });
        }
        r
    }

    /// The epoll instance `epfd` was closed: forget its registrations.
    pub(crate) fn forget_epoll(&self, epfd: c_int) {
        lock(&self.st).epoll.retain(|r| r.epfd != epfd);
    }

    /// This socket's fds registered in `epfd` with user data `data`.
    pub(crate) fn registered(&self, epfd: c_int, data: u64) -> Vec<c_int> {
        lock(&self.st)
            .epoll
            .iter()
            .filter(|r| r.epfd == epfd && { r.ev.u64 } == data)
            .map(|r| r.fd)
            .collect()
    }

    /// `getsockopt` answered by the shim, when it must be: `SO_ERROR` of a failed
    /// non-blocking connect, and anything asked while the fd is a placeholder.
    pub(crate) fn getsockopt(&self, level: c_int, name: c_int) -> Option<Result<Vec<u8>, c_int>> {
        let mut st = lock(&self.st);
        let placeholder = matches!(
            st.phase,
            Phase::Opening | Phase::Breaking | Phase::Outage | Phase::Failed(_)
        );
        if level == libc::SOL_SOCKET && name == libc::SO_ERROR && (st.so_error != 0 || placeholder)
        {
            let e = std::mem::take(&mut st.so_error);
            return Some(Ok(e.to_ne_bytes().to_vec()));
        }
        if !placeholder {
            return None;
        }
        let int = |v: c_int| Some(Ok(v.to_ne_bytes().to_vec()));
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_TYPE) => int(if self.stream {
                libc::SOCK_STREAM
            } else {
                libc::SOCK_SEQPACKET
            }),
            (libc::SOL_SOCKET, libc::SO_DOMAIN) => int(libc::AF_VSOCK),
            (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => int(0),
            _ => Some(
                st.opts
                    .iter()
                    .find(|o| o.level == level && o.name == name)
                    .map(|o| o.value.clone())
                    .ok_or(libc::ENOPROTOOPT),
            ),
        }
    }

    /// Remembers an option the program set; returns whether the call should also go to
    /// the fd (false while it is a placeholder).
    pub(crate) fn setsockopt(&self, level: c_int, name: c_int, value: &[u8]) -> bool {
        let mut st = lock(&self.st);
        st.opts.retain(|o| !(o.level == level && o.name == name));
        st.opts.push(SockOpt {
            level,
            name,
            value: value.to_vec(),
        });
        if level == libc::SOL_SOCKET && (name == libc::SO_RCVTIMEO || name == libc::SO_SNDTIMEO) {
            let t = timeval_of(value);
            if name == libc::SO_RCVTIMEO {
                st.rcv_timeout = t;
            } else {
                st.snd_timeout = t;
            }
        }
        matches!(
            st.phase,
            Phase::Fresh | Phase::Bound | Phase::Listening | Phase::Raw | Phase::Live
        )
    }

    /// The address `getpeername` reports for a session (its target, not the session port).
    pub(crate) fn peer(&self) -> Option<Result<sockaddr_vm, c_int>> {
        let st = lock(&self.st);
        match st.phase {
            Phase::Opening | Phase::Live | Phase::Breaking | Phase::Outage => {
                Some(st.peer.ok_or(libc::ENOTCONN))
            }
            Phase::Failed(_) => Some(Err(libc::ENOTCONN)),
            Phase::Fresh | Phase::Bound | Phase::Listening | Phase::Raw => None,
        }
    }

    /// The address `getsockname` reports while the fd is a placeholder.
    pub(crate) fn local(&self) -> Option<Result<sockaddr_vm, c_int>> {
        let st = lock(&self.st);
        match st.phase {
            Phase::Opening | Phase::Breaking | Phase::Outage | Phase::Failed(_) => {
                Some(st.local.ok_or(libc::ENOTCONN))
            }
            _ => None,
        }
    }

    /// `F_GETFL` while the fd is a placeholder (the pipe's own flags would show).
    pub(crate) fn status_flags(&self) -> Option<c_int> {
        let st = lock(&self.st);
        match st.phase {
            Phase::Opening | Phase::Breaking | Phase::Outage | Phase::Failed(_) => Some(
                libc::O_RDWR
                    | if self.nonblocking.load(Ordering::Relaxed) {
                        libc::O_NONBLOCK
                    } else {
                        0
                    },
            ),
            _ => None,
        }
    }
}

/// Connects to the session port and opens a session of type `ty` to `(cid, port)` (the
/// host or a sibling guest: OPEN names the target); a daemon without the session service
/// (the port refuses, or the OPEN is `Unsupported`, as domsockd answers a seqpacket
/// session to a sibling) gets a plain connection to the target instead.
fn establish(cid: u32, port: u32, ty: c_int, opts: &[SockOpt]) -> Result<Established, c_int> {
    let raw = || match connect_private(cid, port, ty, opts) {
        Ok(fd) => Ok(Established::Raw(fd)),
        Err(Failure::Transport(e) | Failure::Final(e)) => Err(e),
    };
    let fd = match connect_private(HOST_CID, handshake::session_port(), ty, opts) {
        Ok(fd) => fd,
        Err(Failure::Transport(libc::ECONNRESET | libc::ECONNREFUSED)) => return raw(),
        Err(Failure::Transport(e) | Failure::Final(e)) => return Err(e),
    };
    let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let open = Frame::Open {
        cid: Cid(u64::from(cid)),
        port: Port(port),
        socket_type: if ty == libc::SOCK_SEQPACKET {
            SocketType::SeqPacket
        } else {
            SocketType::Stream
        },
    };
    let answer = send_frame(fd.as_raw_fd(), ty, &open, deadline)
        .and_then(|()| read_answer(fd.as_raw_fd(), ty, deadline));
    match answer {
        Ok(Frame::Opened {
            id,
            secret,
            next_nonce,
            window,
            park_timeout_ms,
        }) => Ok(Established::Session(
            fd,
            Creds {
                id,
                secret,
                nonce: next_nonce,
                park_timeout_ms,
            },
            window,
        )),
        Ok(Frame::Refused {
            reason: Refusal::Unsupported,
            ..
        }) => {
            drop(fd);
            raw()
        }
        Ok(Frame::Refused { reason, errno }) => Err(refusal_errno(reason, errno)),
        Ok(_) => Err(libc::EPROTO),
        Err(Failure::Transport(e) | Failure::Final(e)) => Err(e),
    }
}

/// Applies the program's shutdowns to a new connection (again, if it was already told).
fn apply_shutdowns(st: &St, fd: RawFd) {
    let how = match (st.shut_wr, st.shut_rd) {
        (true, true) => libc::SHUT_RDWR,
        (true, false) => libc::SHUT_WR,
        (false, true) => libc::SHUT_RD,
        (false, false) => return,
    };
    // SAFETY: shutdown(2) on the shim's own new connection.
    unsafe { next::shutdown(fd, how) };
}

fn set_fd_nonblocking(fd: RawFd, on: bool) {
    handshake::set_nonblocking(fd, on);
}

fn pending_error(fd: RawFd) -> Option<c_int> {
    let mut e: c_int = 0;
    let mut len = size_of::<c_int>() as libc::socklen_t;
    // SAFETY: SO_ERROR into a c_int of the length given.
    let r = unsafe {
        next::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut e).cast(),
            &mut len,
        )
    };
    (r == 0 && e != 0).then_some(e)
}

fn local_addr(fd: RawFd) -> Option<sockaddr_vm> {
    let mut a = vsock_addr(0, 0);
    let mut len = size_of::<sockaddr_vm>() as libc::socklen_t;
    // SAFETY: getsockname(2) into a sockaddr_vm of the length given.
    let r = unsafe { next::getsockname(fd, (&raw mut a).cast(), &mut len) };
    (r == 0).then_some(a)
}

fn timeval_of(value: &[u8]) -> Option<Duration> {
    if value.len() < size_of::<libc::timeval>() {
        return None;
    }
    // SAFETY: `value` holds at least one timeval's bytes; read unaligned.
    let tv: libc::timeval = unsafe { std::ptr::read_unaligned(value.as_ptr().cast()) };
    let d = Duration::from_secs(tv.tv_sec.max(0) as u64)
        + Duration::from_micros(tv.tv_usec.max(0) as u64);
    (!d.is_zero()).then_some(d)
}

/// The symbolic name of an errno, for the log.
pub(crate) fn errno_name(e: c_int) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// Whether a connection to `cid` can be a session: the host, or a sibling guest (any CID
/// above the host's but `VMADDR_CID_ANY`). Not the hypervisor (0) or local loopback (1).
fn session_cid(cid: u32) -> bool {
    cid >= HOST_CID && cid != libc::VMADDR_CID_ANY
}

/// Whether the program connecting a (stream or seqpacket) socket to `(cid, port)` gets a
/// session.
pub(crate) fn wants_session(cid: u32, port: u32) -> bool {
    session_cid(cid)
        && !(cid == HOST_CID && port == handshake::session_port())
        && config::get().policy.covers(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_the_librarys_errnos() {
        // The README's table (shared with domsock_guest::session).
        let cases = [
            (Refusal::UnknownSession, 0, libc::ECONNRESET),
            (Refusal::BadProof, 0, libc::ECONNRESET),
            (Refusal::Expired, 0, libc::ETIMEDOUT),
            (Refusal::TargetRefused, 0, libc::ECONNREFUSED),
            (Refusal::TargetRefused, libc::EACCES as u32, libc::EACCES),
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
    fn only_transport_errors_start_a_resume() {
        for e in [
            libc::ENOMEM,
            libc::ENODEV,
            libc::ECONNRESET,
            libc::ENOTCONN,
            libc::EPIPE,
        ] {
            assert!(is_break(e), "{e}");
        }
        for e in [
            libc::EAGAIN,
            libc::EINTR,
            libc::EFAULT,
            libc::EINVAL,
            libc::EBADF,
        ] {
            assert!(!is_break(e), "{e}");
        }
    }

    #[test]
    fn the_host_and_siblings_get_sessions_the_rest_stays_plain() {
        assert!(session_cid(HOST_CID));
        assert!(session_cid(4));
        assert!(session_cid(u32::MAX - 1));
        assert!(!session_cid(0), "hypervisor");
        assert!(!session_cid(1), "local loopback");
        assert!(!session_cid(libc::VMADDR_CID_ANY));
    }

    /// A live seqpacket session on one end of a Unix seqpacket pair (no resume is ever
    /// started: nothing here breaks).
    fn live_seqpacket(window: usize) -> (Arc<Sock>, OwnedFd, OwnedFd) {
        let mut p = [0 as c_int; 2];
        // SAFETY: `p` has room for the two fds.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, p.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (ours, peer) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        let s = Sock::new(libc::SOCK_SEQPACKET, false);
        {
            let mut tx = lock(&s.tx);
            tx.replay = Replay::Messages(MessageReplay::new(window));
            tx.window = window;
            let mut st = lock(&s.st);
            st.phase = Phase::Live;
            st.fds.push(ours.as_raw_fd());
        }
        (s, ours, peer)
    }

    fn send_parts(s: &Arc<Sock>, fd: RawFd, parts: &[&[u8]]) -> Result<usize, c_int> {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut _,
                iov_len: p.len(),
            })
            .collect();
        let len = parts.iter().map(|p| p.len()).sum();
        s.send(
            false,
            len,
            // SAFETY: writev(2) of valid iovecs.
            &mut || cvt(unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as c_int) }),
            &mut |mut n, sink| {
                for p in parts {
                    let take = n.min(p.len());
                    sink(&p[..take]);
                    n -= take;
                }
            },
        )
    }

    #[test]
    fn seqpacket_sends_are_kept_as_whole_messages_and_receives_count_messages() {
        let (s, ours, peer) = live_seqpacket(16);
        let fd = ours.as_raw_fd();
        assert_eq!(send_parts(&s, fd, &[b"ab", b"cde"]), Ok(5));
        assert_eq!(send_parts(&s, fd, &[b"0123456789"]), Ok(10));
        assert_eq!(
            send_parts(&s, fd, &[b"0123456789", b"0123456"]),
            Err(libc::EMSGSIZE),
            "larger than the window: refused, nothing sent"
        );
        {
            let tx = lock(&s.tx);
            let Replay::Messages(mr) = &tx.replay else {
                panic!("a seqpacket session keeps messages")
            };
            let kept: Vec<Vec<u8>> = mr.iter().map(|(a, b)| [a, b].concat()).collect();
            assert_eq!(kept, vec![b"abcde".to_vec(), b"0123456789".to_vec()]);
            assert_eq!(mr.end(), 2, "two messages sent");
        }
        for m in [&b"xyz"[..], b"0123456789abcdef"] {
            // SAFETY: a valid buffer.
            let n = unsafe { libc::send(peer.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
            assert_eq!(n, m.len() as isize);
        }
        let mut buf = [0u8; 4];
        let recv = |buf: &mut [u8]| {
            let (p, n) = (buf.as_mut_ptr(), buf.len());
            s.recv(fd, false, false, n, &mut || {
                // SAFETY: recv(2) into a valid buffer of `n` bytes.
                cvt(unsafe { libc::recv(fd, p.cast(), n, 0) })
            })
        };
        assert_eq!(recv(&mut buf), Ok(3));
        assert_eq!(
            recv(&mut buf),
            Ok(4),
            "truncated: the rest of the message is gone"
        );
        assert_eq!(lock(&s.rx).received, 2, "messages, not bytes");
    }

    #[test]
    fn socket_timeouts_are_read_from_a_timeval() {
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 500_000,
        };
        // SAFETY: a timeval's bytes, for the parser that reads them back.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const tv).cast::<u8>(), size_of::<libc::timeval>())
        };
        assert_eq!(timeval_of(bytes), Some(Duration::from_millis(2500)));
        assert_eq!(timeval_of(&bytes[..4]), None);
        let zero = [0u8; size_of::<libc::timeval>()];
        assert_eq!(timeval_of(&zero), None, "0 means no timeout");
    }
}
