//! Host-side Unix sockets of guest connections: stream sockets for `SOCK_STREAM`,
//! `SOCK_SEQPACKET` sockets for seqpacket, all non-blocking.
//!
//! Host->guest payload is read straight into guest memory through vm-memory's volatile I/O
//! traits; guest->host stream payload is written by [`crate::iov`] with `writev`. No
//! intermediate buffer on the fast path and no `unsafe` here.

use crate::tunables::HOST_SEND_BUFFER_BYTES;
use domsock_proto::SocketType;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

/// A connected host socket.
#[derive(Debug)]
pub enum HostSocket {
    /// Byte stream.
    Stream(UnixStream),
    /// Message-preserving socket; one `write` is one message.
    SeqPacket(OwnedFd),
}

fn volatile_err(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

/// Asks for a send buffer of [`HOST_SEND_BUFFER_BYTES`] (the kernel caps it at
/// `net.core.wmem_max`). The default (~208 KiB) is below the credit domsockd gives a guest,
/// so a full window would otherwise overflow into the outbox: one more copy and one more
/// wake-up per window.
fn set_send_buffer(fd: &impl AsFd) {
    let _ = socket::setsockopt(fd, socket::sockopt::SndBuf, &HOST_SEND_BUFFER_BYTES);
}

impl HostSocket {
    /// Connects to `path` without blocking. A missing or non-listening socket fails at once.
    pub fn connect(path: &Path, socket_type: SocketType) -> io::Result<HostSocket> {
        let ty = match socket_type {
            SocketType::Stream => SockType::Stream,
            SocketType::SeqPacket => SockType::SeqPacket,
        };
        let fd = socket::socket(
            AddressFamily::Unix,
            ty,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new(path)?;
        socket::connect(fd.as_raw_fd(), &addr)?;
        set_send_buffer(&fd);
        Ok(match socket_type {
            SocketType::Stream => HostSocket::Stream(UnixStream::from(fd)),
            SocketType::SeqPacket => HostSocket::SeqPacket(fd),
        })
    }

    /// Wraps an accepted stream.
    /// A connected pair of `socket_type`: ours (non-blocking) and the other end.
    pub fn pair(socket_type: SocketType) -> io::Result<(HostSocket, OwnedFd)> {
        let ty = match socket_type {
            SocketType::Stream => SockType::Stream,
            SocketType::SeqPacket => SockType::SeqPacket,
        };
        let (ours, theirs) = socket::socketpair(
            AddressFamily::Unix,
            ty,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )?;
        let ours = match socket_type {
            SocketType::Stream => HostSocket::Stream(UnixStream::from(ours)),
            SocketType::SeqPacket => HostSocket::SeqPacket(ours),
        };
        Ok((ours, theirs))
    }

    pub fn from_stream(s: UnixStream) -> io::Result<HostSocket> {
        s.set_nonblocking(true)?;
        set_send_buffer(&s);
        Ok(HostSocket::Stream(s))
    }

    /// The raw fd, for epoll registration.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            HostSocket::Stream(s) => s.as_raw_fd(),
            HostSocket::SeqPacket(fd) => fd.as_raw_fd(),
        }
    }

    /// The fd, borrowed (for poll).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            HostSocket::Stream(s) => s.as_fd(),
            HostSocket::SeqPacket(fd) => fd.as_fd(),
        }
    }

    /// Reads into guest memory.
    pub fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> io::Result<usize> {
        match self {
            HostSocket::Stream(s) => s.read_volatile(buf),
            HostSocket::SeqPacket(fd) => fd.read_volatile(buf),
        }
        .map_err(volatile_err)
    }

    /// Writes from a heap buffer (for seqpacket this sends one message).
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HostSocket::Stream(s) => s.write(buf),
            HostSocket::SeqPacket(fd) => {
                Ok(socket::send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL)?)
            }
        }
    }

    /// Reads into a heap buffer (for seqpacket: one message, truncated to `buf`).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            HostSocket::Stream(s) => s.read(buf),
            HostSocket::SeqPacket(fd) => Ok(socket::recv(fd.as_raw_fd(), buf, MsgFlags::empty())?),
        }
    }

    /// Size of the next pending seqpacket message without consuming it; `Ok(0)` may be
    /// end-of-file or an empty message.
    pub fn peek_message_len(&self) -> io::Result<usize> {
        match self {
            HostSocket::Stream(_) => Err(io::Error::from(io::ErrorKind::Unsupported)),
            HostSocket::SeqPacket(fd) => {
                let mut one = [0u8; 1];
                Ok(socket::recv(
                    fd.as_fd().as_raw_fd(),
                    &mut one,
                    MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
                )?)
            }
        }
    }

    /// Shuts one or both directions.
    pub fn shutdown(&self, how: std::net::Shutdown) {
        let how = match how {
            std::net::Shutdown::Read => socket::Shutdown::Read,
            std::net::Shutdown::Write => socket::Shutdown::Write,
            std::net::Shutdown::Both => socket::Shutdown::Both,
        };
        // ENOTCONN after the peer vanished is fine: the direction is closed either way.
        let _ = socket::shutdown(self.raw_fd(), how);
    }
}
