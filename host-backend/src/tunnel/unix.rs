//! A small adapter that joins a stream [`ChannelEnd`] to a Unix stream socket, for tests
//! and simple users that want a socket instead of the nonblocking API: bytes flow both
//! ways, EOF on one side becomes a write shutdown on the other, and the thread ends when
//! both directions are finished or the channel breaks.

use super::{ChannelEnd, ChannelKind};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

/// Bytes moved by [`pump`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpStats {
    /// Channel to socket.
    pub to_socket: u64,
    /// Socket to channel.
    pub to_channel: u64,
}

/// Copies between `end` (stream channel) and `sock` on a new thread until both directions
/// ended; returns the byte counts, or the error that stopped it (the channel's state as
/// in [`ChannelEnd::read`]).
pub fn pump(end: ChannelEnd, sock: UnixStream) -> io::Result<JoinHandle<io::Result<PumpStats>>> {
    if end.kind() != ChannelKind::Stream {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "seqpacket channel",
        ));
    }
    sock.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name(format!("tunnel-pump-{}", end.id().0))
        .spawn(move || run(end, sock))
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn run(end: ChannelEnd, mut sock: UnixStream) -> io::Result<PumpStats> {
    let mut stats = PumpStats::default();
    // The channel's bytes are read straight into what goes to the socket (one copy).
    let mut to_sock = vec![0u8; 64 << 10];
    let (mut to_sock_len, mut to_sock_pos) = (0, 0);
    let mut to_chan = vec![0u8; 64 << 10];
    let (mut to_chan_len, mut to_chan_pos) = (0, 0);
    let (mut chan_eof, mut sock_eof) = (false, false);
    loop {
        end.clear_wakeup();
        let mut progress = false;
        // Channel -> socket.
        if !chan_eof && to_sock_pos == to_sock_len {
            match end.read(&mut to_sock) {
                Ok(0) => {
                    chan_eof = true;
                    let _ = sock.shutdown(std::net::Shutdown::Write);
                    progress = true;
                }
                Ok(n) => {
                    (to_sock_len, to_sock_pos) = (n, 0);
                    progress = true;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        while to_sock_pos < to_sock_len {
            match sock.write(&to_sock[to_sock_pos..to_sock_len]) {
                Ok(n) => {
                    to_sock_pos += n;
                    stats.to_socket += n as u64;
                    progress = true;
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        // Socket -> channel.
        if !sock_eof && to_chan_pos == to_chan_len {
            match sock.read(&mut to_chan) {
                Ok(0) => {
                    sock_eof = true;
                    end.shutdown(std::net::Shutdown::Write)?;
                    progress = true;
                }
                Ok(n) => {
                    (to_chan_len, to_chan_pos) = (n, 0);
                    progress = true;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        while to_chan_pos < to_chan_len {
            match end.write(&to_chan[to_chan_pos..to_chan_len]) {
                Ok(n) => {
                    to_chan_pos += n;
                    stats.to_channel += n as u64;
                    progress = true;
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        let drained = to_sock_pos == to_sock_len;
        if chan_eof && sock_eof && drained {
            return Ok(stats);
        }
        if !progress {
            let mut sock_ev = PollFlags::empty();
            if !sock_eof && to_chan_pos == to_chan_len {
                sock_ev |= PollFlags::POLLIN;
            }
            if !drained {
                sock_ev |= PollFlags::POLLOUT;
            }
            let mut fds = [
                PollFd::new(end.as_fd(), PollFlags::POLLIN),
                PollFd::new(sock.as_fd(), sock_ev),
            ];
            let _ = poll(&mut fds, PollTimeout::from(100u16));
        }
    }
}
