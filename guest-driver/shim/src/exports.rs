//! The wrapped libc functions. Each has the C contract of its libc namesake (that is the
//! `# Safety` of every function here), starts with the table's one-load check, and for any
//! fd that is not the shim's calls the next definition at once.
#![allow(clippy::missing_safety_doc)]

use crate::config;
use crate::next::{self, cvt, set_errno};
use crate::poll::{self, ms_timeout, to_ms, to_timespec};
use crate::sock::{wants_session, Record, Sock};
use crate::table::{self, Entry};
use libc::{
    c_int, c_void, epoll_event, fd_set, iovec, msghdr, nfds_t, pollfd, sigset_t, size_t, sockaddr,
    sockaddr_vm, socklen_t, ssize_t, timespec, timeval,
};
use std::ffi::c_ulong;
use std::sync::Arc;

fn ret(r: Result<usize, c_int>) -> ssize_t {
    match r {
        Ok(n) => n as ssize_t,
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

fn ret_int(r: Result<(), c_int>) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

/// The program's buffer as a slice.
///
/// # Safety
/// `p` is valid for reads of `n` bytes (or `n` is 0).
unsafe fn bytes<'a>(p: *const c_void, n: usize) -> &'a [u8] {
    if n == 0 || p.is_null() {
        &[]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(p.cast(), n) }
    }
}

/// The program's iovec array as a slice.
///
/// # Safety
/// `iov` is valid for `cnt` entries (or `cnt` <= 0).
unsafe fn iovecs<'a>(iov: *const iovec, cnt: c_int) -> &'a [iovec] {
    if cnt <= 0 || iov.is_null() {
        &[]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(iov, cnt as usize) }
    }
}

/// Hands the first `n` bytes of `iov` (which the kernel just accepted from them) to `sink`.
///
/// # Safety
/// Every iovec describes readable memory.
unsafe fn record_iov(sink: &mut dyn FnMut(&[u8]), iov: &[iovec], mut n: usize) {
    for v in iov {
        if n == 0 {
            break;
        }
        let take = n.min(v.iov_len);
        // SAFETY: per the contract.
        sink(unsafe { bytes(v.iov_base, take) });
        n -= take;
    }
}

fn iov_len(iov: &[iovec]) -> usize {
    iov.iter().map(|v| v.iov_len).sum()
}

/// Writes a vsock address into the program's `addr`/`len`, truncated as the kernel does.
///
/// # Safety
/// `addr`/`len` are null or valid as for getpeername(2).
unsafe fn put_addr(addr: *mut sockaddr, len: *mut socklen_t, a: &sockaddr_vm) -> c_int {
    if addr.is_null() || len.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    let size = size_of::<sockaddr_vm>();
    // SAFETY: `len` is valid; we copy at most the program's length into `addr`.
    unsafe {
        let room = (*len as usize).min(size);
        std::ptr::copy_nonoverlapping(
            (a as *const sockaddr_vm).cast::<u8>(),
            addr.cast::<u8>(),
            room,
        );
        *len = size as socklen_t;
    }
    0
}

// ----- creation and connection --------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    // SAFETY: the program's call.
    let fd = unsafe { next::socket(domain, ty, protocol) };
    if fd < 0 {
        return fd;
    }
    if table::is_ours(fd) {
        // A stale entry (the fd was closed behind the shim's back, e.g. by fclose).
        drop(table::remove(fd));
    }
    crate::listen::mark(fd, false);
    if domain == libc::AF_VSOCK && config::get().policy != config::Policy::Off {
        let base = ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
        if base == libc::SOCK_STREAM || base == libc::SOCK_SEQPACKET {
            let s = Sock::new(base, ty & libc::SOCK_NONBLOCK != 0);
            s.add_fd(fd);
            if let Ok(old) = table::insert(fd, Entry::Sock(s)) {
                drop(old);
            }
        }
    }
    fd
}

#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(s) = table::sock(fd) else {
        // SAFETY: the program's call.
        return unsafe { next::connect(fd, addr, len) };
    };
    let pass = |s: &Sock| {
        if s.is_fresh() {
            s.forget();
        }
        // SAFETY: the program's call.
        unsafe { next::connect(fd, addr, len) }
    };
    if s.is_bound() {
        // Bound before connecting (a chosen local port): an ordinary socket from now on.
        s.forget();
        // SAFETY: the program's call.
        return unsafe { next::connect(fd, addr, len) };
    }
    if s.is_raw() && !s.is_fresh() {
        // SAFETY: the program's call.
        return unsafe { next::connect(fd, addr, len) };
    }
    if addr.is_null() || (len as usize) < size_of::<sockaddr_vm>() {
        return pass(&s);
    }
    // SAFETY: `addr` holds at least a sockaddr_vm's bytes (checked); read unaligned.
    let a: sockaddr_vm = unsafe { std::ptr::read_unaligned(addr.cast()) };
    if i32::from(a.svm_family) != libc::AF_VSOCK || !wants_session(a.svm_cid, a.svm_port) {
        return pass(&s);
    }
    ret_int(s.open(a))
}

/// A fresh stream socket the program binds may become a session listener ([`listen`]);
/// anything else bound is an ordinary socket the shim lets go.
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(s) = table::sock(fd) else {
        // SAFETY: the program's call.
        return unsafe { next::bind(fd, addr, len) };
    };
    if !s.is_fresh() {
        // SAFETY: the program's call.
        return unsafe { next::bind(fd, addr, len) };
    }
    if !s.is_stream() {
        s.forget();
        // SAFETY: the program's call.
        return unsafe { next::bind(fd, addr, len) };
    }
    // SAFETY: the program's call.
    let r = unsafe { next::bind(fd, addr, len) };
    if r == 0 {
        s.set_bound();
    }
    r
}

/// The bound port of `fd`, as the kernel assigned it (`VMADDR_PORT_ANY` resolved).
fn bound_port(fd: c_int) -> Option<u32> {
    // SAFETY: sockaddr_vm is plain old data.
    let mut a: sockaddr_vm = unsafe { std::mem::zeroed() };
    let mut len = size_of::<sockaddr_vm>() as socklen_t;
    // SAFETY: getsockname(2) into a sockaddr_vm of the length given.
    let r = unsafe { next::getsockname(fd, (&raw mut a).cast(), &mut len) };
    (r == 0).then_some(a.svm_port)
}

/// A bound stream socket on a port the policy covers registers the port with the daemon
/// before it listens (`crate::listen`); any other listener is an ordinary socket.
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let Some(s) = table::sock(fd) else {
        // SAFETY: the program's call.
        return unsafe { next::listen(fd, backlog) };
    };
    if !s.is_bound() {
        if s.is_fresh() {
            s.forget();
        }
        // SAFETY: the program's call.
        return unsafe { next::listen(fd, backlog) };
    }
    let port = bound_port(fd)
        .filter(|&p| p != crate::handshake::session_port() && config::get().policy.covers(p));
    let reg = port.and_then(|p| match crate::listen::start(p) {
        Ok(reg) => Some(reg),
        Err(e) => {
            crate::log::debug!(
                "port {p}: no session listener ({}); plain",
                crate::sock::errno_name(e)
            );
            None
        }
    });
    let Some(reg) = reg else {
        s.forget();
        // SAFETY: the program's call.
        return unsafe { next::listen(fd, backlog) };
    };
    // SAFETY: the program's call.
    let r = unsafe { next::listen(fd, backlog) };
    if r == 0 {
        s.set_listening(reg);
    } else {
        reg.stop();
    }
    r
}

fn accepted(fd: c_int) -> c_int {
    if fd >= 0 && table::is_ours(fd) {
        drop(table::remove(fd));
    }
    crate::listen::mark(fd, false);
    fd
}

#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the program's call.
    unsafe { accept4(fd, addr, len, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    if let Some(reg) = table::sock(fd).and_then(|s| s.registration()) {
        // SAFETY: the program's call.
        return unsafe { crate::listen::accept(Some(&reg), fd, addr, len, flags) };
    }
    if !table::is_ours(fd) && crate::listen::is_marked(fd) {
        // A registered listener inherited across `fork` (crate::listen).
        // SAFETY: the program's call.
        return unsafe { crate::listen::accept(None, fd, addr, len, flags) };
    }
    // SAFETY: the program's call.
    accepted(unsafe { next::accept4(fd, addr, len, flags) })
}

// ----- data ------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::read(fd, buf, n) },
        Some(s) => ret(s.recv(fd, false, false, n, &mut || {
            // SAFETY: the program's call.
            cvt(unsafe { next::read(fd, buf, n) })
        })),
    }
}

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::write(fd, buf, n) },
        Some(s) => ret(s.send(
            false,
            n,
            // SAFETY: the program's call.
            &mut || cvt(unsafe { next::write(fd, buf, n) }),
            // SAFETY: the kernel read these bytes from the program's buffer.
            &mut |k, sink| sink(unsafe { bytes(buf, k) }),
        )),
    }
}

#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::readv(fd, iov, cnt) },
        Some(s) => {
            // SAFETY: the program's iovec array.
            let want = iov_len(unsafe { iovecs(iov, cnt) });
            ret(s.recv(fd, false, false, want, &mut || {
                // SAFETY: the program's call.
                cvt(unsafe { next::readv(fd, iov, cnt) })
            }))
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::writev(fd, iov, cnt) },
        Some(s) => ret(s.send(
            false,
            // SAFETY: the program's iovec array.
            iov_len(unsafe { iovecs(iov, cnt) }),
            // SAFETY: the program's call.
            &mut || cvt(unsafe { next::writev(fd, iov, cnt) }),
            // SAFETY: the program's iovecs, which the kernel just read.
            &mut |k, sink| unsafe { record_iov(sink, iovecs(iov, cnt), k) },
        )),
    }
}

fn send_ours(
    s: &Arc<Sock>,
    flags: c_int,
    len: usize,
    call: &mut dyn FnMut() -> Result<usize, c_int>,
    record: Record<'_>,
) -> ssize_t {
    ret(s.send(flags & libc::MSG_DONTWAIT != 0, len, call, record))
}

#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::send(fd, buf, n, flags) },
        Some(s) => send_ours(
            &s,
            flags,
            n,
            // SAFETY: the program's call.
            &mut || cvt(unsafe { next::send(fd, buf, n, flags) }),
            // SAFETY: the kernel read these bytes from the program's buffer.
            &mut |k, sink| sink(unsafe { bytes(buf, k) }),
        ),
    }
}

#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::sendto(fd, buf, n, flags, addr, len) },
        Some(s) => send_ours(
            &s,
            flags,
            n,
            // SAFETY: the program's call.
            &mut || cvt(unsafe { next::sendto(fd, buf, n, flags, addr, len) }),
            // SAFETY: the kernel read these bytes from the program's buffer.
            &mut |k, sink| sink(unsafe { bytes(buf, k) }),
        ),
    }
}

#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::sendmsg(fd, msg, flags) },
        Some(s) => send_ours(
            &s,
            flags,
            if msg.is_null() {
                0
            } else {
                // SAFETY: the program's msghdr and its iovecs.
                iov_len(unsafe { iovecs((*msg).msg_iov, (*msg).msg_iovlen as c_int) })
            },
            // SAFETY: the program's call.
            &mut || cvt(unsafe { next::sendmsg(fd, msg, flags) }),
            // SAFETY: the kernel accepted `msg`, so it and its iovecs are readable.
            &mut |k, sink| unsafe {
                record_iov(sink, iovecs((*msg).msg_iov, (*msg).msg_iovlen as c_int), k)
            },
        ),
    }
}

fn recv_ours(
    s: &Arc<Sock>,
    fd: c_int,
    flags: c_int,
    want: usize,
    call: &mut dyn FnMut() -> Result<usize, c_int>,
) -> ssize_t {
    ret(s.recv(
        fd,
        flags & libc::MSG_DONTWAIT != 0,
        flags & libc::MSG_PEEK != 0,
        want,
        call,
    ))
}

#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::recv(fd, buf, n, flags) },
        Some(s) => recv_ours(&s, fd, flags, n, &mut || {
            // SAFETY: the program's call.
            cvt(unsafe { next::recv(fd, buf, n, flags) })
        }),
    }
}

#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::recvfrom(fd, buf, n, flags, addr, len) },
        Some(s) => recv_ours(&s, fd, flags, n, &mut || {
            // SAFETY: the program's call.
            cvt(unsafe { next::recvfrom(fd, buf, n, flags, addr, len) })
        }),
    }
}

#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::recvmsg(fd, msg, flags) },
        Some(s) => {
            let want = if msg.is_null() {
                0
            } else {
                // SAFETY: the program's msghdr and its iovecs.
                iov_len(unsafe { iovecs((*msg).msg_iov, (*msg).msg_iovlen as c_int) })
            };
            recv_ours(&s, fd, flags, want, &mut || {
                // SAFETY: the program's call.
                cvt(unsafe { next::recvmsg(fd, msg, flags) })
            })
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => unsafe { next::shutdown(fd, how) },
        Some(s) => ret_int(s.shutdown(fd, how)),
    }
}

// ----- fds -------------------------------------------------------------------------------------

/// `fd` is going away (close, or replaced by dup2/dup3): unlink it.
fn unlink(fd: c_int) {
    if let Some(entry) = table::remove(fd) {
        match &*entry {
            Entry::Sock(s) => {
                s.drop_fd(fd);
            }
            Entry::Epoll => {
                for s in table::all_socks() {
                    s.forget_epoll(fd);
                }
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if table::is_ours(fd) {
        unlink(fd);
    }
    if crate::listen::is_marked(fd) {
        crate::listen::mark(fd, false);
    }
    // SAFETY: the program's call.
    unsafe { next::close(fd) }
}

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    match table::sock(fd) {
        // SAFETY: the program's call.
        None => dup_marked(fd, accepted(unsafe { next::dup(fd) })),
        // SAFETY: the program's call.
        Some(s) => match s.dup_with(|| unsafe { next::dup(fd) }) {
            Ok(n) => n,
            Err(e) => {
                set_errno(e);
                -1
            }
        },
    }
}

/// A copy `new` of the untracked `old` is a registered listener's if `old` is (a `fork`
/// child's; see `crate::listen`).
fn dup_marked(old: c_int, new: c_int) -> c_int {
    if new >= 0 && crate::listen::is_marked(old) {
        crate::listen::mark(new, true);
    }
    new
}

fn dup_onto(old: c_int, new: c_int, call: &mut dyn FnMut() -> c_int) -> c_int {
    if old != new && table::is_ours(new) {
        unlink(new);
    }
    match table::sock(old) {
        Some(s) if old != new => match s.dup_with(call) {
            Ok(n) => n,
            Err(e) => {
                set_errno(e);
                -1
            }
        },
        _ => call(),
    }
}

#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    if !table::is_ours(old) && !table::is_ours(new) {
        crate::listen::mark(new, false);
        // SAFETY: the program's call.
        return dup_marked(old, unsafe { next::dup2(old, new) });
    }
    // SAFETY: the program's call.
    dup_onto(old, new, &mut || unsafe { next::dup2(old, new) })
}

#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    if !table::is_ours(old) && !table::is_ours(new) {
        crate::listen::mark(new, false);
        // SAFETY: the program's call.
        return dup_marked(old, unsafe { next::dup3(old, new, flags) });
    }
    // SAFETY: the program's call.
    dup_onto(old, new, &mut || unsafe { next::dup3(old, new, flags) })
}

fn fcntl_ours(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let Some(s) = table::sock(fd) else {
        // SAFETY: the program's call.
        return unsafe { next::fcntl(fd, cmd, arg) };
    };
    match cmd {
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
            // SAFETY: the program's call.
            let dup = || unsafe { next::fcntl(fd, cmd, arg) };
            match s.dup_with(dup) {
                Ok(n) => n,
                Err(e) => {
                    set_errno(e);
                    -1
                }
            }
        }
        libc::F_SETFL => {
            // SAFETY: the program's call.
            let r = unsafe { next::fcntl(fd, cmd, arg) };
            if r >= 0 {
                s.set_nonblocking(arg as c_int & libc::O_NONBLOCK != 0);
            }
            r
        }
        // SAFETY: the program's call.
        libc::F_GETFL => s
            .status_flags()
            .unwrap_or_else(|| unsafe { next::fcntl(fd, cmd, arg) }),
        // SAFETY: the program's call.
        _ => unsafe { next::fcntl(fd, cmd, arg) },
    }
}

#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    if !table::is_ours(fd) {
        // SAFETY: the program's call.
        return unsafe { next::fcntl(fd, cmd, arg) };
    }
    fcntl_ours(fd, cmd, arg)
}

#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: glibc's fcntl64 is fcntl on x86_64.
    unsafe { fcntl(fd, cmd, arg) }
}

#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    // SAFETY: the program's call.
    let r = unsafe { next::ioctl(fd, req, arg) };
    if r == 0 && req == libc::FIONBIO && !arg.is_null() && table::is_ours(fd) {
        if let Some(s) = table::sock(fd) {
            // SAFETY: FIONBIO succeeded, so `arg` points to a readable int.
            s.set_nonblocking(unsafe { *arg.cast::<c_int>() } != 0);
        }
    }
    r
}

// ----- options and addresses -----------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    let answer = table::sock(fd).and_then(|s| s.getsockopt(level, name));
    match answer {
        // SAFETY: the program's call.
        None => unsafe { next::getsockopt(fd, level, name, val, len) },
        Some(Err(e)) => {
            set_errno(e);
            -1
        }
        Some(Ok(bytes)) => {
            if val.is_null() || len.is_null() {
                set_errno(libc::EFAULT);
                return -1;
            }
            // SAFETY: the program's buffer of `*len` bytes.
            unsafe {
                let n = (*len as usize).min(bytes.len());
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), val.cast::<u8>(), n);
                *len = n as socklen_t;
            }
            0
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    if let Some(s) = table::sock(fd) {
        // SAFETY: the program's option value of `len` bytes.
        if !s.setsockopt(level, name, unsafe { bytes(val, len as usize) }) {
            return 0;
        }
    }
    // SAFETY: the program's call.
    unsafe { next::setsockopt(fd, level, name, val, len) }
}

#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match table::sock(fd).and_then(|s| s.peer()) {
        // SAFETY: the program's call.
        None => unsafe { next::getpeername(fd, addr, len) },
        // SAFETY: the program's address buffer.
        Some(Ok(a)) => unsafe { put_addr(addr, len, &a) },
        Some(Err(e)) => {
            set_errno(e);
            -1
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match table::sock(fd).and_then(|s| s.local()) {
        // SAFETY: the program's call.
        None => unsafe { next::getsockname(fd, addr, len) },
        // SAFETY: the program's address buffer.
        Some(Ok(a)) => unsafe { put_addr(addr, len, &a) },
        Some(Err(e)) => {
            set_errno(e);
            -1
        }
    }
}

// ----- readiness -------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int {
    if fds.is_null() || n == 0 {
        // SAFETY: the program's call.
        return unsafe { next::poll(fds, n, timeout) };
    }
    // SAFETY: the program's array of `n` pollfds.
    let set = unsafe { std::slice::from_raw_parts_mut(fds, n as usize) };
    if !poll::any_ours(set) {
        // SAFETY: the program's call.
        return unsafe { next::poll(fds, n, timeout) };
    }
    poll::poll_ours(set, ms_timeout(timeout), &mut |set, left| {
        // SAFETY: the program's (unchanged) array.
        unsafe { next::poll(set.as_mut_ptr(), set.len() as nfds_t, to_ms(left)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut pollfd,
    n: nfds_t,
    ts: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    if fds.is_null() || n == 0 {
        // SAFETY: the program's call.
        return unsafe { next::ppoll(fds, n, ts, mask) };
    }
    // SAFETY: the program's array of `n` pollfds.
    let set = unsafe { std::slice::from_raw_parts_mut(fds, n as usize) };
    if !poll::any_ours(set) {
        // SAFETY: the program's call.
        return unsafe { next::ppoll(fds, n, ts, mask) };
    }
    // SAFETY: a non-null `ts` is the program's valid timespec.
    let timeout = (!ts.is_null()).then(|| poll::from_timespec(unsafe { &*ts }));
    poll::poll_ours(set, timeout, &mut |set, left| {
        let t = left.map(to_timespec);
        let tp = t
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const timespec);
        // SAFETY: the program's array and signal mask, our timespec.
        unsafe { next::ppoll(set.as_mut_ptr(), set.len() as nfds_t, tp, mask) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    tv: *mut timeval,
) -> c_int {
    // SAFETY: the program's sets.
    if !unsafe { poll::select_has_ours(nfds, r, w, e) } {
        // SAFETY: the program's call.
        return unsafe { next::select(nfds, r, w, e, tv) };
    }
    let timeout = (!tv.is_null()).then(|| {
        // SAFETY: the program's timeval.
        let tv = unsafe { &*tv };
        std::time::Duration::from_secs(tv.tv_sec.max(0) as u64)
            + std::time::Duration::from_micros(tv.tv_usec.max(0) as u64)
    });
    // SAFETY: the program's sets.
    unsafe {
        poll::select_ours(nfds, r, w, e, timeout, &mut |set, left| {
            next::poll(set.as_mut_ptr(), set.len() as nfds_t, to_ms(left))
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    ts: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    // SAFETY: the program's sets.
    if !unsafe { poll::select_has_ours(nfds, r, w, e) } {
        // SAFETY: the program's call.
        return unsafe { next::pselect(nfds, r, w, e, ts, mask) };
    }
    // SAFETY: a non-null `ts` is the program's valid timespec.
    let timeout = (!ts.is_null()).then(|| poll::from_timespec(unsafe { &*ts }));
    // SAFETY: the program's sets and mask.
    unsafe {
        poll::select_ours(nfds, r, w, e, timeout, &mut |set, left| {
            let t = left.map(to_timespec);
            let tp = t
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const timespec);
            next::ppoll(set.as_mut_ptr(), set.len() as nfds_t, tp, mask)
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    ev: *mut epoll_event,
) -> c_int {
    let Some(s) = table::sock(fd) else {
        // SAFETY: the program's call.
        return unsafe { next::epoll_ctl(epfd, op, fd, ev) };
    };
    let r = s.epoll_ctl(epfd, op, fd, ev);
    if r == 0 && op == libc::EPOLL_CTL_ADD && !table::is_epoll(epfd) && !table::is_ours(epfd) {
        if let Ok(old) = table::insert(epfd, Entry::Epoll) {
            drop(old);
        }
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    evs: *mut epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    // SAFETY: the program's call.
    unsafe { epoll_pwait(epfd, evs, max, timeout, std::ptr::null()) }
}

#[no_mangle]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    evs: *mut epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const sigset_t,
) -> c_int {
    if !table::is_ours(epfd) || !table::is_epoll(epfd) {
        // SAFETY: the program's call.
        return unsafe { next::epoll_pwait(epfd, evs, max, timeout, mask) };
    }
    // SAFETY: `evs` holds `max` entries per the program's call.
    unsafe {
        poll::epoll_wait_ours(epfd, evs, ms_timeout(timeout), &mut |left| {
            next::epoll_pwait(epfd, evs, max, to_ms(left), mask)
        })
    }
}

// ----- fortified variants (_FORTIFY_SOURCE) ----------------------------------------------------

extern "C" {
    fn __chk_fail() -> !;
}

#[no_mangle]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: glibc's fortify failure report; does not return.
        unsafe { __chk_fail() }
    }
    // SAFETY: the program's call.
    unsafe { read(fd, buf, n) }
}

#[no_mangle]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    if n > buflen {
        // SAFETY: as in __read_chk.
        unsafe { __chk_fail() }
    }
    // SAFETY: the program's call.
    unsafe { recv(fd, buf, n, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut pollfd,
    n: nfds_t,
    timeout: c_int,
    fdslen: size_t,
) -> c_int {
    if fdslen / size_of::<pollfd>() < n as usize {
        // SAFETY: as in __read_chk.
        unsafe { __chk_fail() }
    }
    // SAFETY: the program's call.
    unsafe { poll(fds, n, timeout) }
}
