//! Thin, blocking AF_VSOCK socket wrappers for the guest side (SOCK_STREAM and SOCK_SEQPACKET).
//!
//! This is the only module of the crate that uses `unsafe`: each raw `libc` call is wrapped in
//! a safe method whose arguments make the call sound. It does no buffering, no retries beyond
//! `EINTR` and no protocol of its own; timeouts are the kernel's (`SO_RCVTIMEO`, `SO_SNDTIMEO`,
//! `SO_VM_SOCKETS_CONNECT_TIMEOUT`). It must only ever run inside a guest.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::mem;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// CID that addresses the host from a guest.
pub const VMADDR_CID_HOST: u32 = libc::VMADDR_CID_HOST;
/// Wildcard CID for `bind`.
pub const VMADDR_CID_ANY: u32 = libc::VMADDR_CID_ANY;

/// `<linux/vm_sockets.h>`: socket level of the vsock options (= `AF_VSOCK`).
const SOL_VSOCK: libc::c_int = libc::AF_VSOCK;
/// `<linux/vm_sockets.h>`: connect timeout, a `struct timeval` on 64-bit (`_OLD` variant).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
/// `<linux/vm_sockets.h>`: `_IO(7, 0xb9)`, on `/dev/vsock`, returns the local CID.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// A vsock address: context id and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockAddr {
    /// Context id (2 = host, 3+ = guests).
    pub cid: u32,
    /// Port.
    pub port: u32,
}

impl VsockAddr {
    /// Address from its parts.
    pub fn new(cid: u32, port: u32) -> Self {
        Self { cid, port }
    }

    fn to_raw(self) -> libc::sockaddr_vm {
        libc::sockaddr_vm {
            svm_family: libc::AF_VSOCK as libc::sa_family_t,
            svm_reserved1: 0,
            svm_port: self.port,
            svm_cid: self.cid,
            svm_zero: [0; 4],
        }
    }

    fn from_raw(raw: &libc::sockaddr_vm) -> Self {
        Self {
            cid: raw.svm_cid,
            port: raw.svm_port,
        }
    }
}

impl std::fmt::Display for VsockAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.cid, self.port)
    }
}

/// Socket type of a vsock socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockType {
    /// Connection-oriented byte stream.
    Stream,
    /// Connection-oriented, message boundaries preserved.
    SeqPacket,
}

impl SockType {
    fn to_raw(self) -> libc::c_int {
        match self {
            SockType::Stream => libc::SOCK_STREAM,
            SockType::SeqPacket => libc::SOCK_SEQPACKET,
        }
    }
}

/// Converts a libc return value into `io::Result`, capturing `errno` on `-1`.
fn cvt<T: PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`], retrying while the call was interrupted by a signal.
fn cvt_retry<T: PartialEq + From<i8>>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cvt(call()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn timeval(timeout: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    }
}

/// An AF_VSOCK socket, closed on drop.
#[derive(Debug)]
pub struct VsockSocket {
    fd: OwnedFd,
    ty: SockType,
}

impl VsockSocket {
    /// Creates an unconnected socket of the given type.
    pub fn new(ty: SockType) -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the return value is checked before use.
        let fd = cvt(unsafe { libc::socket(libc::AF_VSOCK, ty.to_raw() | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: `fd` was just returned by socket(2), is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, ty })
    }

    /// Creates a socket and connects it to `addr`, giving up after `timeout`.
    pub fn connect(ty: SockType, addr: VsockAddr, timeout: Duration) -> io::Result<Self> {
        let sock = Self::new(ty)?;
        sock.set_connect_timeout(timeout)?;
        let raw = addr.to_raw();
        // SAFETY: `raw` is a valid, initialised sockaddr_vm that outlives the call and the
        // length passed is its exact size. A blocking connect is not retried on EINTR (the
        // kernel continues it in the background), so a plain call is right.
        cvt(unsafe {
            libc::connect(
                sock.fd.as_raw_fd(),
                (&raw as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        Ok(sock)
    }

    /// Creates a socket listening on `port` of any local CID.
    pub fn listen(ty: SockType, port: u32, backlog: i32) -> io::Result<Self> {
        let sock = Self::bind(ty, port)?;
        sock.start_listening(backlog)?;
        Ok(sock)
    }

    /// Creates a socket bound to `port` of any local CID, not listening yet: the port is
    /// claimed, and connections to it are refused until [`Self::start_listening`].
    pub fn bind(ty: SockType, port: u32) -> io::Result<Self> {
        let sock = Self::new(ty)?;
        let raw = VsockAddr::new(VMADDR_CID_ANY, port).to_raw();
        // SAFETY: `raw` is a valid, initialised sockaddr_vm that outlives the call and the
        // length passed is its exact size.
        cvt(unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                (&raw as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        Ok(sock)
    }

    /// Starts listening on a bound socket, queueing up to `backlog` connections.
    pub fn start_listening(&self, backlog: i32) -> io::Result<()> {
        // SAFETY: listen(2) takes no pointers; the fd is owned by `self`.
        cvt(unsafe { libc::listen(self.fd.as_raw_fd(), backlog) })?;
        Ok(())
    }

    /// Accepts one connection. Honours the receive timeout ([`Self::set_read_timeout`]).
    pub fn accept(&self) -> io::Result<(VsockSocket, VsockAddr)> {
        // SAFETY: all-zero bytes are a valid sockaddr_vm (plain integers).
        let mut raw: libc::sockaddr_vm = unsafe { mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        let fd = cvt_retry(|| {
            // SAFETY: `raw` and `len` are valid for writes for the duration of the call and
            // `len` holds the size of `raw`, so the kernel writes at most that many bytes.
            unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    (&mut raw as *mut libc::sockaddr_vm).cast(),
                    &mut len,
                    libc::SOCK_CLOEXEC,
                )
            }
        })?;
        // SAFETY: `fd` was just returned by accept4(2), is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok((VsockSocket { fd, ty: self.ty }, VsockAddr::from_raw(&raw)))
    }

    /// Socket type.
    pub fn sock_type(&self) -> SockType {
        self.ty
    }

    /// Sends from `buf`; returns how many bytes were taken (a whole message for seqpacket).
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        let n = cvt_retry(|| {
            // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call.
            unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            }
        })?;
        Ok(n as usize)
    }

    /// Sends all of `buf` (for streams; a seqpacket send is all or nothing anyway).
    pub fn send_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.send(buf)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "send returned 0"));
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Receives into `buf`; 0 means end of stream.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let n = cvt_retry(|| {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
            unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) }
        })?;
        Ok(n as usize)
    }

    /// Receives one message (seqpacket): returns its length and whether it was truncated
    /// because `buf` was too small (`MSG_TRUNC`). A length of 0 without truncation is EOF.
    pub fn recv_msg(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let n = cvt_retry(|| {
            // SAFETY: `msg` points at one iovec describing `buf`, which is valid for writes of
            // `buf.len()` bytes; no name or control buffer is given. All outlive the call.
            unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) }
        })?;
        Ok((n as usize, msg.msg_flags & libc::MSG_TRUNC != 0))
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown(2) takes no pointers; the fd is owned by `self`.
        cvt(unsafe { libc::shutdown(self.fd.as_raw_fd(), how) })?;
        Ok(())
    }

    /// Bounds every blocking receive and accept; they then fail with `WouldBlock`.
    pub fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_timeval(libc::SOL_SOCKET, libc::SO_RCVTIMEO, timeout)
    }

    /// Bounds every blocking send; it then fails with `WouldBlock`.
    pub fn set_write_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_timeval(libc::SOL_SOCKET, libc::SO_SNDTIMEO, timeout)
    }

    /// Bounds a blocking connect (the kernel default is 2 s); it then fails with `ETIMEDOUT`.
    pub fn set_connect_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_timeval(SOL_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, timeout)
    }

    fn set_timeval(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        timeout: Duration,
    ) -> io::Result<()> {
        let tv = timeval(timeout);
        // SAFETY: `tv` is a valid timeval that outlives the call; its exact size is passed.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }
}

impl AsFd for VsockSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<VsockSocket> for OwnedFd {
    fn from(s: VsockSocket) -> OwnedFd {
        s.fd
    }
}

impl AsRawFd for VsockSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl io::Read for &VsockSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl io::Write for &VsockSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The local CID as the guest's vsock transport reports it (`/dev/vsock` ioctl), or `None`
/// while no transport is bound (the kernel answers `VMADDR_CID_ANY`).
pub fn local_cid() -> io::Result<Option<u32>> {
    let dev = File::open("/dev/vsock")?;
    let mut cid: libc::c_uint = 0;
    // SAFETY: this ioctl writes one `unsigned int` through the pointer, which points at `cid`,
    // valid for writes and alive for the call.
    cvt(unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) })?;
    Ok((cid != VMADDR_CID_ANY).then_some(cid))
}

/// Symbolic name of an errno value (`ECONNRESET`), or `E<number>` for uncommon ones.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENODEV => "ENODEV",
        libc::ENOTCONN => "ENOTCONN",
        libc::EPIPE => "EPIPE",
        libc::EAGAIN => "EAGAIN",
        libc::EINTR => "EINTR",
        libc::EINVAL => "EINVAL",
        libc::ENOMEM => "ENOMEM",
        libc::ENOBUFS => "ENOBUFS",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::ESOCKTNOSUPPORT => "ESOCKTNOSUPPORT",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EPROTO => "EPROTO",
        libc::ENXIO => "ENXIO",
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EISCONN => "EISCONN",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EALREADY => "EALREADY",
        _ => return format!("E{errno}"),
    };
    name.to_owned()
}

/// `getrandom(2)` flag: never block, even before the kernel's pool is initialised (5.6+).
const GRND_INSECURE: libc::c_uint = 0x0004;

/// Fills `buf` with bytes fit for nonces (fresh, not secret), never blocking: a small VM
/// without an entropy source may never initialise its pool, so `getrandom(2)` would block
/// for good, and a read of `/dev/urandom` before that spends up to a second gathering
/// jitter entropy (measured: the first session resume in a TCG guest took 1 s longer).
/// Kernels before 5.6 do not know `GRND_INSECURE`; they get `/dev/urandom`.
pub fn nonce_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which is valid
        // for writes of that length for the whole call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), GRND_INSECURE) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) => {
                    use std::io::Read as _;
                    return File::open("/dev/urandom")?.read_exact(rest);
                }
                _ => return Err(e),
            }
        }
        filled += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_bytes_are_filled_and_fresh() {
        // getrandom(2) only: no socket is opened.
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        nonce_bytes(&mut a).unwrap();
        nonce_bytes(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 64]);
    }
}
