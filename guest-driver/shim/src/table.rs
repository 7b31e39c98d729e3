//! Which fds are the shim's: a fixed array indexed by fd number.
//!
//! Every wrapped call first loads one slot ([`is_ours`]): a null slot means "not ours" and
//! the call goes straight to libc, so programs pay one atomic load per call on every other
//! fd. A slot holds a boxed [`Entry`]: a vsock socket the shim follows (several fd numbers
//! share one [`Sock`] after `dup`), or an epoll instance that has one of them registered.
//!
//! Slots change, and entries are cloned out, only under one spin lock, held for a few
//! instructions and never across a call; entries are freed after it is released (dropping a
//! socket closes fds, which re-enters `close`). A spin lock rather than a `Mutex` because
//! `fork` must be able to reset it in the child ([`after_fork_in_child`]).
//!
//! Fds at or above [`MAX_FDS`] are never tracked: such a vsock socket is an ordinary one.

use crate::sock::Sock;
use libc::c_int;
use std::cell::UnsafeCell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Weak};

/// Fd numbers the shim can follow.
pub(crate) const MAX_FDS: usize = 1 << 16;

/// What a tracked fd is.
#[derive(Debug)]
pub(crate) enum Entry {
    /// A vsock socket (session or not yet connected).
    Sock(Arc<Sock>),
    /// An epoll instance with a registration of one of the shim's sockets.
    Epoll,
}

static SLOTS: [AtomicPtr<Entry>; MAX_FDS] = [const { AtomicPtr::new(null_mut()) }; MAX_FDS];

struct SpinLock<T> {
    held: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is only reached through `with`, which holds `held` exclusively.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    fn acquire(&self) {
        while self
            .held
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
    }

    fn release(&self) {
        self.held.store(false, Ordering::Release);
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.acquire();
        // SAFETY: `held` is ours until `release`, so no other reference to `value` exists.
        let r = f(unsafe { &mut *self.value.get() });
        self.release();
        r
    }
}

/// Every live socket, for the rare scans (an epoll instance closed or reporting an error).
static LOCK: SpinLock<Vec<Weak<Sock>>> = SpinLock {
    held: AtomicBool::new(false),
    value: UnsafeCell::new(Vec::new()),
};

fn slot(fd: c_int) -> Option<&'static AtomicPtr<Entry>> {
    usize::try_from(fd).ok().and_then(|i| SLOTS.get(i))
}

/// Whether `fd` is tracked at all (the fast path of every wrapper).
#[inline]
pub(crate) fn is_ours(fd: c_int) -> bool {
    slot(fd).is_some_and(|s| !s.load(Ordering::Acquire).is_null())
}

/// The socket `fd` names, if the shim follows it.
pub(crate) fn sock(fd: c_int) -> Option<Arc<Sock>> {
    let s = slot(fd)?;
    if s.load(Ordering::Acquire).is_null() {
        return None;
    }
    LOCK.with(|_| {
        let p = s.load(Ordering::Acquire);
        // SAFETY: entries are freed only after being unlinked under LOCK, which we hold.
        match unsafe { p.as_ref() } {
            Some(Entry::Sock(sock)) => Some(Arc::clone(sock)),
            _ => None,
        }
    })
}

/// Whether `fd` is an epoll instance with a registration of one of the shim's sockets.
pub(crate) fn is_epoll(fd: c_int) -> bool {
    let Some(s) = slot(fd) else { return false };
    if s.load(Ordering::Acquire).is_null() {
        return false;
    }
    LOCK.with(|_| {
        // SAFETY: as in `sock`.
        let entry = unsafe { s.load(Ordering::Acquire).as_ref() };
        matches!(entry, Some(Entry::Epoll))
    })
}

/// Tracks `fd` as `entry`, replacing (and returning) whatever was there. An fd the table
/// cannot hold is not tracked (`Err` gives the entry back).
pub(crate) fn insert(fd: c_int, entry: Entry) -> Result<Option<Box<Entry>>, Entry> {
    let Some(s) = slot(fd) else { return Err(entry) };
    let weak = match &entry {
        Entry::Sock(sock) => Some(Arc::downgrade(sock)),
        Entry::Epoll => None,
    };
    let new = Box::into_raw(Box::new(entry));
    let old = LOCK.with(|all| {
        if let Some(w) = weak {
            all.retain(|w| w.strong_count() > 0);
            all.push(w);
        }
        s.swap(new, Ordering::AcqRel)
    });
    // SAFETY: `old` was created by `Box::into_raw` here and is unlinked now.
    Ok((!old.is_null()).then(|| unsafe { Box::from_raw(old) }))
}

/// Stops tracking `fd`; the caller drops the entry (outside the lock).
pub(crate) fn remove(fd: c_int) -> Option<Box<Entry>> {
    let s = slot(fd)?;
    if s.load(Ordering::Acquire).is_null() {
        return None;
    }
    let old = LOCK.with(|_| s.swap(null_mut(), Ordering::AcqRel));
    // SAFETY: as in `insert`.
    (!old.is_null()).then(|| unsafe { Box::from_raw(old) })
}

/// Every socket the shim follows.
pub(crate) fn all_socks() -> Vec<Arc<Sock>> {
    LOCK.with(|all| all.iter().filter_map(Weak::upgrade).collect())
}

extern "C" fn before_fork() {
    LOCK.acquire();
}

extern "C" fn after_fork_in_parent() {
    LOCK.release();
}

/// The child of a `fork` keeps the fds but not the sessions: its copies become ordinary
/// sockets (the parent alone resumes them). Entries are leaked, not dropped: their locks
/// may have been held by threads the child does not have.
extern "C" fn after_fork_in_child() {
    for s in &SLOTS {
        s.store(null_mut(), Ordering::Relaxed);
    }
    // SAFETY: LOCK is held by this (the forking) thread since `before_fork`.
    unsafe { std::mem::forget(std::mem::take(&mut *LOCK.value.get())) };
    LOCK.release();
}

/// Registers the fork handlers (from the library constructor).
pub(crate) fn install_fork_handlers() {
    // SAFETY: the three handlers are `extern "C" fn()` with static lifetime.
    unsafe {
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_in_parent),
            Some(after_fork_in_child),
        );
    }
}
