//! The shim's own sockets: a private `AF_VSOCK` socket to the daemon's session port, the
//! OPEN and RESUME handshakes on it, and the retransmission after a RESUMED, all with a
//! deadline. Everything here uses the next (libc) functions directly and runs while the
//! program's fd is not yet (or no longer) this socket.
//!
//! On a stream, frames are read exactly: the 8-byte preamble, then the body length it names,
//! never a byte more (the daemon's data may follow in the same segment). On seqpacket, every
//! handshake frame is one message, exactly the frame.

use crate::next::{self, cvt};
use crate::sock::SockOpt;
use domsock_migration::session::wire::{Frame, MAX_FRAME_LEN, PREAMBLE_LEN};
use domsock_migration::session::SESSION_PORT;
use libc::{c_int, sockaddr, sockaddr_vm, socklen_t};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// The host's CID (`VMADDR_CID_HOST`).
pub(crate) const HOST_CID: u32 = 2;

/// How a step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The transport is (still) away or broke: try again on a new connection.
    Transport(c_int),
    /// Final: report this errno to the program.
    Final(c_int),
}

/// Errors a connect or transfer returns while the device is away or was just reset.
pub(crate) fn is_transport_errno(e: c_int) -> bool {
    matches!(
        e,
        libc::ENODEV
            | libc::ENOMEM
            | libc::ECONNRESET
            | libc::ENOTCONN
            | libc::EPIPE
            | libc::ETIMEDOUT
            | libc::ECONNREFUSED
            | libc::ECONNABORTED
            | libc::ESHUTDOWN
            | libc::EINTR
            | libc::ENXIO
            | libc::ENETUNREACH
            | libc::EHOSTUNREACH
            // A seqpacket connect while no device is there: no transport offers seqpacket
            // (the library learned this in its replug VM test).
            | libc::ESOCKTNOSUPPORT
    )
}

fn classify(e: c_int) -> Failure {
    if is_transport_errno(e) || e == libc::EAGAIN {
        Failure::Transport(e)
    } else {
        Failure::Final(e)
    }
}

/// A vsock address.
pub(crate) fn vsock_addr(cid: u32, port: u32) -> sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

/// A new private socket of type `ty` (stream or seqpacket) with the program's recorded
/// options, connected (blocking, bounded by the kernel's vsock connect timeout) to
/// `(cid, port)`, then made non-blocking.
pub(crate) fn connect_private(
    cid: u32,
    port: u32,
    ty: c_int,
    opts: &[SockOpt],
) -> Result<OwnedFd, Failure> {
    // SAFETY: plain socket(2).
    let fd = unsafe { next::socket(libc::AF_VSOCK, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Failure::Final(next::errno()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for o in opts {
        // SAFETY: `o.value` holds `o.value.len()` bytes, as recorded from the program's call.
        unsafe {
            next::setsockopt(
                fd.as_raw_fd(),
                o.level,
                o.name,
                o.value.as_ptr().cast(),
                o.value.len() as socklen_t,
            );
        }
    }
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the length given.
    let r = unsafe {
        next::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<sockaddr>(),
            size_of::<sockaddr_vm>() as socklen_t,
        )
    };
    if r < 0 {
        return Err(classify(next::errno()));
    }
    set_nonblocking(fd.as_raw_fd(), true);
    Ok(fd)
}

/// Sets or clears `O_NONBLOCK` on `fd`.
pub(crate) fn set_nonblocking(fd: RawFd, on: bool) {
    // SAFETY: F_GETFL/F_SETFL on an fd the caller owns.
    unsafe {
        let fl = next::fcntl(fd, libc::F_GETFL, 0);
        if fl >= 0 {
            let fl = if on {
                fl | libc::O_NONBLOCK
            } else {
                fl & !libc::O_NONBLOCK
            };
            next::fcntl(fd, libc::F_SETFL, fl as _);
        }
    }
}

/// Waits until `fd` is ready for `events` or the deadline passes.
pub(crate) fn wait_ready(fd: RawFd, events: i16, deadline: Instant) -> Result<(), Failure> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Transport(libc::ETIMEDOUT));
        }
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as c_int;
        // SAFETY: one valid pollfd.
        match unsafe { next::poll(&mut p, 1, ms) } {
            r if r > 0 => return Ok(()),
            0 => {}
            _ if next::errno() == libc::EINTR => {}
            _ => return Err(Failure::Final(next::errno())),
        }
    }
}

/// Writes all of `bytes` to the non-blocking `fd` by the deadline.
pub(crate) fn write_all(fd: RawFd, mut bytes: &[u8], deadline: Instant) -> Result<(), Failure> {
    while !bytes.is_empty() {
        // SAFETY: a valid buffer of `bytes.len()` bytes.
        let r =
            cvt(unsafe { next::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) });
        match r {
            Ok(n) => bytes = &bytes[n..],
            Err(libc::EAGAIN) => wait_ready(fd, libc::POLLOUT, deadline)?,
            Err(libc::EINTR) => {}
            Err(e) => return Err(classify(e)),
        }
    }
    Ok(())
}

fn read_exact(fd: RawFd, mut buf: &mut [u8], deadline: Instant) -> Result<(), Failure> {
    while !buf.is_empty() {
        // SAFETY: a valid writable buffer of `buf.len()` bytes.
        let r = cvt(unsafe { next::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) });
        match r {
            Ok(0) => return Err(Failure::Transport(libc::ECONNRESET)),
            Ok(n) => buf = &mut buf[n..],
            Err(libc::EAGAIN) => wait_ready(fd, libc::POLLIN, deadline)?,
            Err(libc::EINTR) => {}
            Err(e) => return Err(classify(e)),
        }
    }
    Ok(())
}

/// Sends `msg` as one message on the non-blocking seqpacket `fd` by the deadline.
pub(crate) fn send_message(fd: RawFd, msg: &[u8], deadline: Instant) -> Result<(), Failure> {
    loop {
        // SAFETY: a valid buffer of `msg.len()` bytes.
        let r = cvt(unsafe { next::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) });
        match r {
            Ok(n) if n == msg.len() => return Ok(()),
            // Not something a seqpacket socket does; the daemon drops a part with the
            // connection.
            Ok(_) => return Err(Failure::Transport(libc::EPROTO)),
            Err(libc::EAGAIN) => wait_ready(fd, libc::POLLOUT, deadline)?,
            Err(libc::EINTR) => {}
            Err(e) => return Err(classify(e)),
        }
    }
}

/// Sends one handshake frame: its bytes on a stream, one message on seqpacket.
pub(crate) fn send_frame(
    fd: RawFd,
    ty: c_int,
    frame: &Frame,
    deadline: Instant,
) -> Result<(), Failure> {
    if ty == libc::SOCK_SEQPACKET {
        send_message(fd, &frame.encode(), deadline)
    } else {
        write_all(fd, &frame.encode(), deadline)
    }
}

/// Reads one handshake frame: exactly its bytes on a stream, one whole message on seqpacket.
pub(crate) fn read_answer(fd: RawFd, ty: c_int, deadline: Instant) -> Result<Frame, Failure> {
    if ty != libc::SOCK_SEQPACKET {
        return read_frame(fd, deadline);
    }
    let mut buf = [0u8; MAX_FRAME_LEN + 1];
    let n = loop {
        // SAFETY: a valid writable buffer of `buf.len()` bytes.
        let r = cvt(unsafe { next::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) });
        match r {
            // EOF, or a connection the device's removal reset (its error left in SO_ERROR).
            Ok(0) => return Err(Failure::Transport(libc::ECONNRESET)),
            Ok(n) => break n,
            Err(libc::EAGAIN) => wait_ready(fd, libc::POLLIN, deadline)?,
            Err(libc::EINTR) => {}
            Err(e) => return Err(classify(e)),
        }
    };
    if n > MAX_FRAME_LEN {
        return Err(Failure::Final(libc::EPROTO));
    }
    match Frame::decode(&buf[..n]) {
        Ok(Some((frame, used))) if used == n => Ok(frame),
        _ => Err(Failure::Final(libc::EPROTO)),
    }
}

/// Reads exactly one frame.
pub(crate) fn read_frame(fd: RawFd, deadline: Instant) -> Result<Frame, Failure> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    read_exact(fd, &mut buf[..PREAMBLE_LEN], deadline)?;
    let body = usize::from(u16::from_le_bytes([buf[6], buf[7]]));
    let total = PREAMBLE_LEN + body;
    if total > MAX_FRAME_LEN {
        return Err(Failure::Final(libc::EPROTO));
    }
    // A bad magic or kind is told from the preamble alone; don't read a body then.
    if Frame::decode(&buf[..PREAMBLE_LEN]).is_err() {
        return Err(Failure::Final(libc::EPROTO));
    }
    read_exact(fd, &mut buf[PREAMBLE_LEN..total], deadline)?;
    match Frame::decode(&buf[..total]) {
        Ok(Some((frame, used))) if used == total => Ok(frame),
        _ => Err(Failure::Final(libc::EPROTO)),
    }
}

/// The daemon's session port.
pub(crate) fn session_port() -> u32 {
    SESSION_PORT.0
}

/// Fresh random bytes for a client nonce.
///
/// `getrandom(2)` without flags blocks until the kernel's pool is initialised, which in a
/// small TCG guest without an entropy source can be never (the session library found that
/// in the replug VM test). So: the initialised pool if it is ready, else the same
/// unblocking source `/dev/urandom` reads (`GRND_INSECURE`, Linux 5.6+), without opening a
/// file in the program's process. The nonce only has to be one the program never used
/// before and an observer did not choose; the proof's secret comes from the daemon.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut got = 0;
    let mut flags = libc::GRND_NONBLOCK;
    while got < N {
        // SAFETY: writes at most `N - got` bytes into `b[got..]`.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), N - got, flags) };
        if r > 0 {
            got += r as usize;
            continue;
        }
        match next::errno() {
            libc::EINTR => {}
            libc::EAGAIN if flags == libc::GRND_NONBLOCK => flags = libc::GRND_INSECURE,
            // A kernel before 5.6: no GRND_INSECURE; wait for the pool after all.
            libc::EINVAL if flags == libc::GRND_INSECURE => flags = 0,
            // No randomness, no unguessable nonce: never send a predictable one.
            // SAFETY: ends the process.
            _ => unsafe { libc::abort() },
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_fresh() {
        let a: [u8; 16] = random();
        let b: [u8; 16] = random();
        assert_ne!(a, b);
        assert_ne!(a, [0; 16]);
    }

    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        let mut p = [0 as c_int; 2];
        // SAFETY: `p` has room for the two fds.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                p.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    }

    #[test]
    fn seqpacket_frames_are_one_message_each() {
        use domsock_migration::session::wire::Frame;
        use domsock_proto::Port;
        let soon = || Instant::now() + std::time::Duration::from_millis(100);
        let (a, b) = seqpacket_pair();
        let f = Frame::Listening { port: Port(5610) };
        send_frame(a.as_raw_fd(), libc::SOCK_SEQPACKET, &f, soon()).unwrap();
        // The next message is the daemon's data, never part of the frame.
        send_message(a.as_raw_fd(), b"data", soon()).unwrap();
        assert_eq!(
            read_answer(b.as_raw_fd(), libc::SOCK_SEQPACKET, soon()),
            Ok(f.clone())
        );
        let mut buf = [0u8; 8];
        // SAFETY: a valid buffer.
        let n = unsafe { libc::recv(b.as_raw_fd(), buf.as_mut_ptr().cast(), 8, 0) };
        assert_eq!(&buf[..n as usize], b"data");

        // A message holding a frame and more, or part of one, is not a frame.
        let mut long = f.encode();
        long.push(0);
        send_message(a.as_raw_fd(), &long, soon()).unwrap();
        let e = read_answer(b.as_raw_fd(), libc::SOCK_SEQPACKET, soon());
        assert_eq!(e, Err(Failure::Final(libc::EPROTO)));
        let short = f.encode();
        send_message(a.as_raw_fd(), &short[..short.len() - 1], soon()).unwrap();
        let e = read_answer(b.as_raw_fd(), libc::SOCK_SEQPACKET, soon());
        assert_eq!(e, Err(Failure::Final(libc::EPROTO)));
        // No answer in time, then the end of the connection: try again elsewhere.
        let e = read_answer(b.as_raw_fd(), libc::SOCK_SEQPACKET, soon());
        assert_eq!(e, Err(Failure::Transport(libc::ETIMEDOUT)));
        drop(a);
        let e = read_answer(b.as_raw_fd(), libc::SOCK_SEQPACKET, soon());
        assert_eq!(e, Err(Failure::Transport(libc::ECONNRESET)));
    }

    #[test]
    fn transport_errors_are_retried_others_are_final() {
        assert_eq!(classify(libc::ENODEV), Failure::Transport(libc::ENODEV));
        assert_eq!(
            classify(libc::ECONNREFUSED),
            Failure::Transport(libc::ECONNREFUSED)
        );
        assert_eq!(classify(libc::EAGAIN), Failure::Transport(libc::EAGAIN));
        assert_eq!(
            classify(libc::ESOCKTNOSUPPORT),
            Failure::Transport(libc::ESOCKTNOSUPPORT),
            "a seqpacket connect while the device is away"
        );
        assert_eq!(classify(libc::EACCES), Failure::Final(libc::EACCES));
        assert_eq!(classify(libc::EPROTO), Failure::Final(libc::EPROTO));
    }
}
