//! `libdomsock_shim.so`: preload it (`LD_PRELOAD`) into an unmodified guest program and its
//! `AF_VSOCK` stream and seqpacket connections to the host or to sibling guests, and the
//! host connections it accepts, become resumable domsock sessions
//! (`domsock_migration::session`): they survive the vsock device going away (hot-unplug,
//! the unplug/plug dance of a live migration) with every byte delivered once, and the
//! program's fd numbers stay the same.
//!
//! How, in one paragraph: `socket(AF_VSOCK, ..)` is tracked in a table indexed by fd
//! ([`table`]); `connect` to a port the shim covers ([`config`]) opens the session on
//! a private connection to the daemon's session port and `dup3`s it onto the program's fd
//! ([`handshake`], [`sock`]); `listen` registers the port and `accept` reads the daemon's
//! OFFERED off each host connection ([`listen`]); afterwards the program's reads and writes go to the kernel
//! as before, the shim counting what was read and keeping the last window of what was
//! written. When a call fails with a transport error (or `poll` sees POLLERR), the fd
//! becomes a placeholder that is never ready, a worker thread reconnects and resumes
//! (RESUME, retransmission), and the new connection is `dup3`ed back, the program's epoll
//! registrations re-added ([`poll`] keeps poll/select/epoll from reporting the swaps).
//!
//! What it does not do (README, "The AF_VSOCK shim"): statically linked programs,
//! io_uring, sendfile/splice and `sendmmsg`/`recvmmsg` on a session fd, seqpacket sessions
//! to siblings and seqpacket listeners (domsockd offers neither: plain sockets), and
//! sessions in the child of a `fork` (the child's copies are plain sockets; a pre-forked
//! child accepting on a registered listener is the exception, see [`listen`]).
//!
//! `unsafe` lives where C meets Rust: the exported wrappers ([`exports`]), the calls to
//! the next definitions ([`next`]), and the fd table's entry pointers ([`table`]).

mod config;
mod exports;
mod handshake;
mod listen;
mod log;
mod next;
mod poll;
mod sock;
mod table;

/// Runs when the library is loaded.
extern "C" fn on_load() {
    table::install_fork_handlers();
}

#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;
