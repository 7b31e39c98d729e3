//! Listening sockets whose host connections become sessions: the shim's side of the
//! daemon's LISTEN / OFFERED (the library's `domsock_guest::session::listener`, for a
//! program that calls `bind`, `listen` and `accept` itself).
//!
//! ```mermaid
//! sequenceDiagram
//!     participant P as program
//!     participant S as shim
//!     participant D as domsockd (2, 1022)
//!     participant H as host process
//!     P->>S: bind(port)
//!     Note over S: bind(2); the socket is Bound
//!     P->>S: listen(fd)
//!     S->>D: connect (2, 1022), LISTEN port, stream
//!     D->>S: LISTENING port (this connection is the keepalive)
//!     Note over S: listen(2): no host connection reached the port before the daemon knew
//!     H->>D: CONNECT port
//!     D->>S: (vsock) connection to port, OFFERED id, secret, nonce, window, park timeout
//!     P->>S: accept(fd)
//!     Note over S: accept(2), OFFERED read exactly: the new fd is a Live session
//!     Note over S,D: device gone: the keepalive breaks
//!     S->>D: connect (2, 1022) again, LISTEN port (backoff 10..200 ms or the bind uevent, no deadline)
//! ```
//!
//! **Registering** happens in the program's `listen`, before `listen(2)`, on a private
//! stream connection to the session port. A daemon without the session service (the port
//! refuses) or one that refuses the LISTEN leaves an ordinary listener. A device that is
//! away at that moment does not: the socket listens at once and the keepalive thread
//! registers as soon as it can. The keepalive thread looks at the registration's
//! connection every [`KEEPALIVE_CHECK_MS`] (a vsock connection idle across an unplug only
//! fails on its next call) and, when it broke, registers again on a new connection before
//! closing the old one, so the daemon never forgets the port in between. It stops when the
//! program closes the listening socket's last fd, which closes the registration.
//!
//! **Accepting.** `accept`/`accept4` take the kernel's next connection as usual (with the
//! program's flags), then, for a connection from the host, look at its first bytes without
//! consuming them (`MSG_PEEK`, for at most [`OFFER_TIMEOUT_MS`]): OFFERED is read exactly
//! and the fd becomes a session (its later resumes are like any other); anything else, no
//! bytes within the timeout, or a connection from a sibling guest (the daemon offers only
//! host connections) stays a plain connection with every byte still unread. The listening
//! fd itself is the kernel's (it survives a blackout): `poll`/`epoll` readiness on it is
//! the kernel's.
//!
//! **After `fork`** the child's table is empty (see [`crate::table`]), but a child that
//! accepts on the listening socket it inherited (a pre-forked server) still gets OFFERED
//! first from the daemon: so every fd number of a registered listener is also marked in a
//! lock-free bitmap ([`mark`]) that survives the fork, and an accept on a marked fd reads
//! OFFERED like the parent would (the keepalive stays the parent's).
//!
//! What it does not do: seqpacket listeners (domsockd offers only stream connections), and
//! a non-blocking `accept` may wait up to the offer timeout for a host connection's first
//! bytes (domsockd sends OFFERED with the connection, so in practice it does not).

use crate::handshake::{
    self, connect_private, read_frame, set_nonblocking, wait_ready, write_all, Failure, HOST_CID,
};
use crate::log::debug;
use crate::next::{self, cvt};
use crate::sock::{errno_name, refusal_errno, Creds, Sock};
use crate::table::{self, Entry};
use domsock_migration::session::wire::{Frame, WireError, PREAMBLE_LEN};
use domsock_proto::{Port, SocketType};
use domsock_uevent::{DeviceWatch, Wake};
use libc::{c_int, sockaddr, sockaddr_vm, socklen_t};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often the keepalive thread looks at the registration's connection.
const KEEPALIVE_CHECK_MS: u64 = 200;
/// How long an accepted host connection may take to show its first bytes.
const OFFER_TIMEOUT_MS: u64 = 2_000;
/// How long a LISTEN or an OFFERED may take once begun.
const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// First and largest pause between two registration attempts.
const RETRY_FIRST_MS: u64 = 10;
const RETRY_MAX_MS: u64 = 200;
/// The longest slice of a pause spent watching for the device before looking at whether
/// the registration is being dropped.
const STOP_CHECK_MS: u64 = 25;

/// Fd numbers of registered listening sockets (module doc), kept across `fork`.
static REGISTERED_FDS: [AtomicBool; table::MAX_FDS] =
    [const { AtomicBool::new(false) }; table::MAX_FDS];

fn registered_slot(fd: c_int) -> Option<&'static AtomicBool> {
    usize::try_from(fd).ok().and_then(|i| REGISTERED_FDS.get(i))
}

/// Marks (or unmarks) `fd` as a number of a registered listening socket.
pub(crate) fn mark(fd: c_int, on: bool) {
    if let Some(b) = registered_slot(fd) {
        b.store(on, Ordering::Release);
    }
}

/// Whether `fd` is marked as a registered listener's (also in a `fork` child).
#[inline]
pub(crate) fn is_marked(fd: c_int) -> bool {
    registered_slot(fd).is_some_and(|b| b.load(Ordering::Acquire))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A listening socket's registration, shared with its keepalive thread.
#[derive(Debug)]
pub(crate) struct Registration {
    port: u32,
    state: Mutex<KeepState>,
    wake: Condvar,
    /// The daemon refused for good: accepts are plain from then on.
    failed: AtomicBool,
}

#[derive(Debug, Default)]
struct KeepState {
    /// The connection that keeps the registration (none until the first one stands).
    conn: Option<OwnedFd>,
    stopping: bool,
}

impl Registration {
    /// Whether accepted connections may carry an OFFERED: false once the daemon refused
    /// for good (an atomic, not under `state`: a `fork` child may ask).
    fn offers(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    /// The listening socket is gone: close the registration (the daemon forgets the port)
    /// and end the thread.
    pub(crate) fn stop(&self) {
        let mut st = lock(&self.state);
        st.stopping = true;
        if let Some(c) = &st.conn {
            // SAFETY: shutdown(2) on our own connection. It is closed by the keepalive
            // thread alone, which may be polling it: closing it here could let the
            // program's next fd take its number under that thread.
            unsafe { next::shutdown(c.as_raw_fd(), libc::SHUT_RDWR) };
        }
        drop(st);
        self.wake.notify_all();
    }
}

/// LISTEN `port` on a new private connection; the connection once LISTENING came.
fn register(port: u32) -> Result<OwnedFd, Failure> {
    let fd = connect_private(HOST_CID, handshake::session_port(), libc::SOCK_STREAM, &[])?;
    let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let listen = Frame::Listen {
        port: Port(port),
        socket_type: SocketType::Stream,
    };
    write_all(fd.as_raw_fd(), &listen.encode(), deadline)?;
    match read_frame(fd.as_raw_fd(), deadline)? {
        Frame::Listening { port: p } if p.0 == port => Ok(fd),
        Frame::Refused { reason, errno } => {
            debug!("LISTEN {port} refused: {reason:?}");
            Err(Failure::Final(refusal_errno(reason, errno)))
        }
        _ => Err(Failure::Final(libc::EPROTO)),
    }
}

/// Registers `port` for the program's `listen`: `Err` (the errno, for the log) means an
/// ordinary listener (no session service, or the daemon refused). A device that is away
/// gives a registration that the keepalive thread completes later.
pub(crate) fn start(port: u32) -> Result<Arc<Registration>, c_int> {
    let conn = match register(port) {
        Ok(fd) => Some(fd),
        Err(Failure::Transport(e @ (libc::ECONNRESET | libc::ECONNREFUSED))) => return Err(e),
        Err(Failure::Final(e)) => return Err(e),
        Err(Failure::Transport(e)) => {
            debug!("LISTEN {port}: {}; registering later", errno_name(e));
            None
        }
    };
    let reg = Arc::new(Registration {
        port,
        state: Mutex::new(KeepState {
            conn,
            ..KeepState::default()
        }),
        wake: Condvar::new(),
        failed: AtomicBool::new(false),
    });
    let keeper = Arc::clone(&reg);
    std::thread::Builder::new()
        .name(format!("domsock-listen-{port}"))
        .spawn(move || keep(&keeper))
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EAGAIN))?;
    Ok(reg)
}

/// Whether the registration's connection `fd` still stands (nothing to read, no error).
fn still_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; waits at most one check interval.
    unsafe { next::poll(&mut p, 1, KEEPALIVE_CHECK_MS as c_int) };
    let mut b = [0u8; 16];
    // SAFETY: a valid buffer; never blocks.
    let r = cvt(unsafe { next::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) });
    matches!(r, Err(libc::EAGAIN | libc::EINTR))
}

/// The keepalive thread (module doc); closes the registration's connection when it ends.
fn keep(reg: &Registration) {
    keep_until_stopped(reg);
    let conn = lock(&reg.state).conn.take();
    drop(conn);
}

fn keep_until_stopped(reg: &Registration) {
    let port = reg.port;
    let mut pause = Duration::from_millis(RETRY_FIRST_MS);
    // Before the first attempt, so a device that comes back after it is not missed.
    let watch = DeviceWatch::open();
    loop {
        let fd = {
            let st = lock(&reg.state);
            if st.stopping {
                return;
            }
            st.conn.as_ref().map(|c| c.as_raw_fd())
        };
        if let Some(fd) = fd {
            // `fd` stays open: only this thread replaces or (after `stopping`) drops it.
            if still_up(fd) {
                pause = Duration::from_millis(RETRY_FIRST_MS);
                continue;
            }
            debug!("listener registration of port {} broke", port);
        }
        let outcome = register(port);
        let mut st = lock(&reg.state);
        if st.stopping {
            return;
        }
        match outcome {
            Ok(conn) => {
                debug!("port {} registered again", port);
                // The old connection closes after the new registration stands.
                let old = st.conn.replace(conn);
                drop(st);
                drop(old);
            }
            Err(Failure::Final(e)) => {
                debug!(
                    "port {} no longer registered: {}; accepts are plain",
                    port,
                    errno_name(e)
                );
                reg.failed.store(true, Ordering::Release);
                st.conn = None;
                return;
            }
            Err(Failure::Transport(_)) => {
                if !watch.watching() {
                    let _ = reg
                        .wake
                        .wait_timeout_while(st, pause, |s| !s.stopping)
                        .unwrap_or_else(|e| e.into_inner());
                    pause = (pause * 2).min(Duration::from_millis(RETRY_MAX_MS));
                    continue;
                }
                drop(st);
                // The device's uevent ends the pause; `stopping` is looked at between
                // slices of at most STOP_CHECK_MS.
                let until = Instant::now() + pause;
                pause = (pause * 2).min(Duration::from_millis(RETRY_MAX_MS));
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() || lock(&reg.state).stopping {
                        break;
                    }
                    let slice = left.min(Duration::from_millis(STOP_CHECK_MS));
                    if watch.wait(slice) == Wake::Device {
                        pause = Duration::from_millis(RETRY_FIRST_MS);
                        break;
                    }
                }
            }
        }
    }
}

/// What the first bytes of an accepted connection say.
enum First {
    /// OFFERED is there (its preamble at least): read it.
    Offer,
    /// Not a session: leave every byte to the program.
    Plain,
    /// The connection failed before saying anything.
    Failed(c_int),
}

/// Looks at the first bytes of the non-blocking `fd` without consuming them, waiting up to
/// `timeout` for them.
fn first_bytes(fd: RawFd, timeout: Duration) -> First {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; PREAMBLE_LEN];
    loop {
        // SAFETY: a valid buffer of PREAMBLE_LEN bytes; MSG_PEEK consumes nothing.
        let r = cvt(unsafe {
            next::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        });
        match r {
            Ok(0) => return First::Plain,
            Ok(n) => match Frame::decode(&buf[..n]) {
                Err(WireError::BadMagic(_)) => return First::Plain,
                Err(_) => return First::Offer, // read_frame reports what is wrong
                Ok(_) if n == PREAMBLE_LEN => return First::Offer,
                Ok(_) => {
                    // A prefix of a frame: the rest comes in a moment (peek sees no more
                    // readiness, so look again shortly).
                    if Instant::now() >= deadline {
                        return First::Plain;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            },
            Err(libc::EAGAIN) => {
                if wait_ready(fd, libc::POLLIN, deadline).is_err() {
                    return First::Plain;
                }
            }
            Err(libc::EINTR) => {}
            Err(e) => return First::Failed(e),
        }
    }
}

fn local_port(fd: RawFd) -> u32 {
    let mut a = handshake::vsock_addr(0, 0);
    let mut len = size_of::<sockaddr_vm>() as socklen_t;
    // SAFETY: getsockname(2) into a sockaddr_vm of the length given.
    unsafe { next::getsockname(fd, (&raw mut a).cast(), &mut len) };
    a.svm_port
}

fn peer_addr(fd: RawFd) -> Option<sockaddr_vm> {
    let mut a = handshake::vsock_addr(0, 0);
    let mut len = size_of::<sockaddr_vm>() as socklen_t;
    // SAFETY: getpeername(2) into a sockaddr_vm of the length given.
    let r = unsafe { next::getpeername(fd, (&raw mut a).cast(), &mut len) };
    (r == 0).then_some(a)
}

/// The program's `accept4` on a listening socket registered as `reg` (`None`: a marked
/// fd in a `fork` child) with the program's `flags`. Returns like accept4(2).
///
/// # Safety
/// `addr`/`len` are as for accept4(2).
pub(crate) unsafe fn accept(
    reg: Option<&Registration>,
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: the program's call.
    let nfd = unsafe { next::accept4(fd, addr, len, flags) };
    if nfd < 0 {
        return nfd;
    }
    if table::is_ours(nfd) {
        drop(table::remove(nfd));
    }
    let Some(peer) = peer_addr(nfd) else {
        return nfd;
    };
    if peer.svm_cid != HOST_CID || !reg.is_none_or(Registration::offers) {
        return nfd;
    }
    let port = local_port(fd);
    let nonblocking = flags & libc::SOCK_NONBLOCK != 0;
    set_nonblocking(nfd, true);
    let outcome = match first_bytes(nfd, Duration::from_millis(OFFER_TIMEOUT_MS)) {
        First::Plain => Ok(None),
        First::Failed(e) => Err(e),
        First::Offer => {
            let deadline = Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
            match read_frame(nfd, deadline) {
                Ok(Frame::Offered {
                    id,
                    secret,
                    next_nonce,
                    window,
                    park_timeout_ms,
                }) if window > 0 => Ok(Some((
                    Creds {
                        id,
                        secret,
                        nonce: next_nonce,
                        park_timeout_ms,
                    },
                    window,
                ))),
                Ok(_) => Err(libc::EPROTO),
                Err(Failure::Transport(e) | Failure::Final(e)) => Err(e),
            }
        }
    };
    set_nonblocking(nfd, nonblocking);
    match outcome {
        Ok(None) => {
            debug!("accepted on port {} without OFFERED: plain", port);
            nfd
        }
        Ok(Some((creds, window))) => {
            debug!(
                "session {} accepted on port {} (window {window})",
                creds.id, port
            );
            let s = Sock::accepted(nfd, nonblocking, creds, window, peer);
            match table::insert(nfd, Entry::Sock(s)) {
                Ok(old) => drop(old),
                // Beyond the table: a session nobody follows would lose bytes on a break;
                // the program gets the connection as it is (documented limit).
                Err(_) => debug!("fd {nfd} beyond the shim's table: not followed"),
            }
            nfd
        }
        Err(e) => {
            debug!(
                "accepted connection failed before its OFFERED: {}",
                errno_name(e)
            );
            // SAFETY: the connection is ours to close: the program never saw the fd.
            drop(unsafe { OwnedFd::from_raw_fd(nfd) });
            next::set_errno(libc::ECONNABORTED);
            -1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domsock_migration::session::{Nonce, Secret, SessionId};

    /// A connected pair of non-blocking Unix stream sockets (stand-ins for vsock ones:
    /// the peeking is the same).
    fn pair() -> (OwnedFd, OwnedFd) {
        let mut p = [0 as c_int; 2];
        // SAFETY: `p` has room for the two fds.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                p.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    }

    fn put(fd: &OwnedFd, bytes: &[u8]) {
        // SAFETY: a valid buffer.
        let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        assert_eq!(n, bytes.len() as isize);
    }

    fn offered() -> Frame {
        Frame::Offered {
            id: SessionId([7; 16]),
            secret: Secret([9; 32]),
            next_nonce: Nonce([3; 16]),
            window: 65536,
            park_timeout_ms: 30_000,
        }
    }

    const SHORT: Duration = Duration::from_millis(50);

    #[test]
    fn an_offer_is_told_from_its_preamble_and_left_unread() {
        let (a, b) = pair();
        let mut bytes = offered().encode();
        bytes.extend_from_slice(b"host data");
        put(&a, &bytes);
        assert!(matches!(first_bytes(b.as_raw_fd(), SHORT), First::Offer));
        let frame = read_frame(b.as_raw_fd(), Instant::now() + SHORT).expect("OFFERED");
        assert_eq!(frame, offered());
        let mut rest = [0u8; 32];
        // SAFETY: a valid buffer.
        let n = unsafe { libc::recv(b.as_raw_fd(), rest.as_mut_ptr().cast(), 32, 0) };
        assert_eq!(
            &rest[..n as usize],
            b"host data",
            "not a byte more than the frame"
        );
    }

    #[test]
    fn other_bytes_silence_and_eof_stay_plain_with_nothing_consumed() {
        let (a, b) = pair();
        put(&a, b"GET / HTTP/1.0");
        assert!(matches!(first_bytes(b.as_raw_fd(), SHORT), First::Plain));
        let mut got = [0u8; 14];
        // SAFETY: a valid buffer.
        let n = unsafe { libc::recv(b.as_raw_fd(), got.as_mut_ptr().cast(), 14, 0) };
        assert_eq!(
            &got[..n as usize],
            b"GET / HTTP/1.0",
            "every byte left to the program"
        );

        let (a, b) = pair();
        let started = Instant::now();
        assert!(matches!(first_bytes(b.as_raw_fd(), SHORT), First::Plain));
        assert!(started.elapsed() >= SHORT, "waited for the offer timeout");
        drop(a);
        let (a, b) = pair();
        drop(a);
        assert!(
            matches!(first_bytes(b.as_raw_fd(), SHORT), First::Plain),
            "EOF"
        );
    }

    #[test]
    fn a_preamble_arriving_in_pieces_is_waited_for() {
        let (a, b) = pair();
        let bytes = offered().encode();
        put(&a, &bytes[..3]);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            put(&a, &bytes[3..]);
            a
        });
        assert!(matches!(
            first_bytes(b.as_raw_fd(), Duration::from_secs(2)),
            First::Offer
        ));
        drop(writer.join());
    }

    #[test]
    fn marks_follow_fd_numbers() {
        let fd = 4321;
        assert!(!is_marked(fd));
        mark(fd, true);
        assert!(is_marked(fd));
        mark(fd, false);
        assert!(!is_marked(fd));
        mark(-1, true);
        mark(c_int::MAX, true);
        assert!(
            !is_marked(-1) && !is_marked(c_int::MAX),
            "out of range: never marked"
        );
    }
}
