//! `poll`, `ppoll`, `select`, `pselect`, `epoll_wait` and `epoll_pwait` when one of the
//! shim's sockets is involved (otherwise the wrappers call libc directly).
//!
//! What the program must not see, and how it is kept from it:
//! - the dead connection's POLLERR between the transport breaking and the outage
//!   placeholder going in: on a live session, POLLERR starts the outage and the event is
//!   dropped;
//! - the placeholder's POLLHUP when the connection is swapped back in: the socket's
//!   generation moved during the call, so its events are dropped and the call polls again
//!   (with what is left of its timeout) on the new connection.
//!
//! `epoll_wait` needs less: registrations are re-added to every new file, and a sleeping
//! `epoll_wait` wakes when a ready file is added. Only error events (EPOLLERR/EPOLLHUP) are
//! looked at, and matched to the shim's sockets by their registered user data.

use crate::next;
use crate::sock::{PollView, Sock};
use crate::table;
use libc::{c_int, epoll_event, fd_set, pollfd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a poll waits before looking again at a socket caught between two states.
const SETTLE: Duration = Duration::from_millis(1);
/// The longest one kernel poll may sleep while one of the shim's sockets is not live (its fd
/// is a placeholder or about to be swapped). Linux registers a poll on its files' wait
/// queues only in its first pass: woken when the shim `dup3`s the new connection over the
/// fd, it looks at the new connection without registering on it and, if that is not ready
/// yet (no credit after a full-window retransmission, no data), sleeps again on the old
/// file's queue, which never wakes it. Polling in short slices while a socket is between
/// states makes the next call register on whatever the fd is then.
const TRANSIENT_SLICE: Duration = Duration::from_millis(5);

/// Whether any of `fds` is the shim's.
pub(crate) fn any_ours(fds: &[pollfd]) -> bool {
    fds.iter().any(|p| table::is_ours(p.fd))
}

fn left(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

/// Runs `call(fds, timeout left)` until it reports something the program should see, or
/// the timeout passes. Returns like poll(2).
pub(crate) fn poll_ours(
    fds: &mut [pollfd],
    timeout: Option<Duration>,
    call: &mut dyn FnMut(&mut [pollfd], Option<Duration>) -> c_int,
) -> c_int {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut transient = false;
        let ours: Vec<(usize, Arc<Sock>, u64)> = fds
            .iter()
            .enumerate()
            .filter_map(|(i, p)| table::sock(p.fd).map(|s| (i, s)))
            .map(|(i, s)| {
                let (gen, view) = s.poll_view();
                transient |= matches!(view, PollView::Transient);
                (i, s, gen)
            })
            .collect();
        let wait = match (left(deadline), transient) {
            (None, true) => Some(TRANSIENT_SLICE),
            (Some(l), true) => Some(l.min(TRANSIENT_SLICE)),
            (l, false) => l,
        };
        let r = call(fds, wait);
        if r == 0 && transient && left(deadline).is_none_or(|l| !l.is_zero()) {
            // A slice ended, not the program's timeout: look again.
            continue;
        }
        if r <= 0 {
            return r;
        }
        let mut settle = false;
        for (i, s, gen) in &ours {
            let revents = fds[*i].revents;
            if revents == 0 {
                continue;
            }
            let (now, view) = s.poll_view();
            if now != *gen {
                crate::log::debug!(
                    "poll: fd {} revents {:#x} of generation {gen} dropped (now {now})",
                    fds[*i].fd,
                    revents
                );
                fds[*i].revents = 0;
                continue;
            }
            match view {
                PollView::Live if revents & libc::POLLERR != 0 => {
                    s.begin_outage(*gen, libc::ECONNRESET);
                    fds[*i].revents = 0;
                }
                PollView::Transient => {
                    crate::log::debug!(
                        "poll: fd {} revents {:#x} while between states (generation {gen})",
                        fds[*i].fd,
                        revents
                    );
                    fds[*i].revents = 0;
                    settle = true;
                }
                _ => {}
            }
        }
        let n = fds.iter().filter(|p| p.revents != 0).count();
        if n > 0 {
            return n as c_int;
        }
        if left(deadline).is_some_and(|l| l.is_zero()) {
            return 0;
        }
        if settle {
            std::thread::sleep(SETTLE);
        }
    }
}

/// A poll(2) timeout in ms as a duration (`None`: forever).
pub(crate) fn ms_timeout(ms: c_int) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// A duration as a poll(2) timeout, rounded up so a wait never ends early.
pub(crate) fn to_ms(d: Option<Duration>) -> c_int {
    match d {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            ms.min(c_int::MAX as u128) as c_int
        }
    }
}

/// A duration as a timespec.
pub(crate) fn to_timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
    }
}

/// A timespec as a duration.
pub(crate) fn from_timespec(ts: &libc::timespec) -> Duration {
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// select(2)/pselect(2) with one of the shim's fds in a set: done as a poll over the same
/// fds (`call` is the poll or ppoll to use), then written back into the sets.
///
/// # Safety
/// The sets are null or valid `fd_set`s covering `nfds`.
pub(crate) unsafe fn select_ours(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
    timeout: Option<Duration>,
    call: &mut dyn FnMut(&mut [pollfd], Option<Duration>) -> c_int,
) -> c_int {
    // SAFETY: the sets are valid per the contract; FD_ISSET reads within `nfds`.
    let isset = |set: *mut fd_set, fd: c_int| !set.is_null() && unsafe { libc::FD_ISSET(fd, set) };
    let mut pfds = Vec::new();
    for fd in 0..nfds.clamp(0, libc::FD_SETSIZE as c_int) {
        let mut events = 0;
        if isset(r, fd) {
            events |= libc::POLLIN;
        }
        if isset(w, fd) {
            events |= libc::POLLOUT;
        }
        if isset(e, fd) {
            events |= libc::POLLPRI;
        }
        if events != 0 {
            pfds.push(pollfd {
                fd,
                events,
                revents: 0,
            });
        }
    }
    let n = poll_ours(&mut pfds, timeout, call);
    if n < 0 {
        return n;
    }
    for set in [r, w, e] {
        if !set.is_null() {
            // SAFETY: a valid set per the contract.
            unsafe { libc::FD_ZERO(set) };
        }
    }
    let mut count = 0;
    for p in &pfds {
        if p.revents & libc::POLLNVAL != 0 {
            next::set_errno(libc::EBADF);
            return -1;
        }
        let mut mark = |set: *mut fd_set, wanted: i16, got: i16| {
            if !set.is_null() && p.events & wanted != 0 && p.revents & got != 0 {
                // SAFETY: `p.fd < nfds <= FD_SETSIZE` and the set is valid.
                unsafe { libc::FD_SET(p.fd, set) };
                count += 1;
            }
        };
        mark(
            r,
            libc::POLLIN,
            libc::POLLIN | libc::POLLHUP | libc::POLLERR,
        );
        mark(w, libc::POLLOUT, libc::POLLOUT | libc::POLLERR);
        mark(e, libc::POLLPRI, libc::POLLPRI);
    }
    count
}

/// Whether any fd below `nfds` in the three sets is the shim's.
///
/// # Safety
/// As for [`select_ours`].
pub(crate) unsafe fn select_has_ours(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    e: *mut fd_set,
) -> bool {
    (0..nfds.clamp(0, libc::FD_SETSIZE as c_int)).any(|fd| {
        table::is_ours(fd)
            && [r, w, e].iter().any(|&set| {
                // SAFETY: a valid set per the contract.
                !set.is_null() && unsafe { libc::FD_ISSET(fd, set) }
            })
    })
}

enum Verdict {
    Keep,
    Drop { settle: bool },
}

fn judge(epfd: c_int, data: u64) -> Verdict {
    for s in table::all_socks() {
        let fds = s.registered(epfd, data);
        let Some(&fd) = fds.first() else { continue };
        let (gen, view) = s.poll_view();
        match view {
            PollView::Live => {
                let mut p = pollfd {
                    fd,
                    events: 0,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, no wait.
                let n = unsafe { next::poll(&mut p, 1, 0) };
                if n > 0 && p.revents & libc::POLLERR != 0 {
                    s.begin_outage(gen, libc::ECONNRESET);
                    return Verdict::Drop { settle: false };
                }
            }
            PollView::Transient => return Verdict::Drop { settle: true },
            PollView::Plain => {}
        }
    }
    Verdict::Keep
}

/// epoll_wait(2) on an epoll instance with a registration of the shim's: `call(timeout
/// left)` fills `events` and returns like epoll_wait.
///
/// # Safety
/// `events` is valid for `max` entries.
pub(crate) unsafe fn epoll_wait_ours(
    epfd: c_int,
    events: *mut epoll_event,
    timeout: Option<Duration>,
    call: &mut dyn FnMut(Option<Duration>) -> c_int,
) -> c_int {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let r = call(left(deadline));
        if r <= 0 {
            return r;
        }
        // SAFETY: the kernel filled `r <= max` entries.
        let evs = unsafe { std::slice::from_raw_parts_mut(events, r as usize) };
        let mut kept = 0;
        let mut settle = false;
        for i in 0..evs.len() {
            let ev = evs[i];
            let verdict = if ev.events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                judge(epfd, ev.u64)
            } else {
                Verdict::Keep
            };
            match verdict {
                Verdict::Keep => {
                    evs[kept] = ev;
                    kept += 1;
                }
                Verdict::Drop { settle: s } => settle |= s,
            }
        }
        if kept > 0 {
            return kept as c_int;
        }
        if left(deadline).is_some_and(|l| l.is_zero()) {
            return 0;
        }
        if settle {
            std::thread::sleep(SETTLE);
        }
    }
}
