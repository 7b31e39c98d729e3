//! The engine's nested epoll and timerfd: the one owner of every host fd's epoll interest.
//!
//! The VM's `<uds>` listener, the timerfd, the wake eventfd and every host socket are
//! registered here, edge-triggered, under a token; the vhost-user worker thread watches the
//! epoll's own fd and runs the engine's driver when it is readable. Host sockets ask for
//! EPOLLOUT only while their outbox holds data ([`Interest`]).
//!
//! What it does not do: read or write sockets, or decide deadlines (the engine computes
//! them; this only arms the timerfd for the earliest).

use super::conn::Interest;
use crate::vm::VmShared;
use domsock_proto::hash::KeyedState;
use domsock_proto::ConnKey;
use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

/// The VM's `<uds>` listener.
pub(super) const TOKEN_LISTENER: u64 = 1;
/// The timerfd.
pub(super) const TOKEN_TIMER: u64 = 2;
/// The VM's wake eventfd (policy reload).
pub(super) const TOKEN_WAKE: u64 = 3;
const FIRST_DYNAMIC_TOKEN: u64 = 16;

/// What a dynamic token stands for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target {
    /// A host socket of a connection.
    Conn(ConnKey),
    /// A host connection still in its `CONNECT` handshake.
    Handshake,
    /// The host socket of a parked session.
    Parked(domsock_migration::session::SessionId),
}

/// The nested epoll, its tokens, and the timerfd.
#[derive(Debug)]
pub(super) struct Poller {
    epoll: Epoll,
    timer: TimerFd,
    /// The deadline the timerfd is armed for.
    timer_armed: Option<Instant>,
    targets: HashMap<u64, Target, KeyedState>,
    next_token: u64,
    pub(super) events: Vec<EpollEvent>,
}

/// Epoll interest of every host socket: readable and peer hang-up, edge-triggered.
fn read_interest() -> EventSet {
    EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Poller {
    /// An epoll with `shared`'s listener and wake eventfd and a fresh timerfd registered.
    pub(super) fn new(shared: &VmShared, hash_seed: u64) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        let edge_in = EventSet::IN | EventSet::EDGE_TRIGGERED;
        epoll.ctl(
            ControlOperation::Add,
            shared.listener.as_raw_fd(),
            EpollEvent::new(edge_in, TOKEN_LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(edge_in, TOKEN_TIMER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            shared.wake.as_raw_fd(),
            EpollEvent::new(edge_in, TOKEN_WAKE),
        )?;
        Ok(Self {
            epoll,
            timer,
            timer_armed: None,
            targets: HashMap::with_hasher(KeyedState::new(hash_seed)),
            next_token: FIRST_DYNAMIC_TOKEN,
            events: vec![EpollEvent::default(); 64],
        })
    }

    /// The epoll's own fd, for the worker thread to watch.
    pub(super) fn fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    /// Registers `fd` for reading under a new token.
    pub(super) fn register(&mut self, fd: i32, target: Target) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token += 1;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(read_interest(), token),
        )?;
        self.targets.insert(token, target);
        Ok(token)
    }

    /// Points an existing token at another target (a handshake became a connection).
    pub(super) fn retarget(&mut self, token: u64, target: Target) {
        self.targets.insert(token, target);
    }

    /// Changes what `fd` is watched for.
    pub(super) fn set_interest(&self, fd: i32, token: u64, interest: Interest) -> io::Result<()> {
        let set = match interest {
            Interest::Read => read_interest(),
            Interest::ReadWrite => read_interest() | EventSet::OUT,
        };
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(set, token))
    }

    /// Stops watching `fd` and forgets its token.
    pub(super) fn unregister(&mut self, fd: i32, token: u64) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.targets.remove(&token);
    }

    /// What `token` stands for.
    pub(super) fn target(&self, token: u64) -> Option<Target> {
        self.targets.get(&token).copied()
    }

    /// Fills `events` with what is ready now (never blocks); returns how many.
    pub(super) fn poll_now(&mut self) -> io::Result<usize> {
        loop {
            match self.epoll.wait(0, &mut self.events) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// The timerfd fired: its deadline is gone.
    pub(super) fn timer_fired(&mut self) {
        // Expiry count is irrelevant; timers are re-derived from the engine.
        let _ = self.timer.clear();
        self.timer_armed = None;
    }

    /// Arms the timerfd for `next` (or disarms it).
    pub(super) fn arm(&mut self, now: Instant, next: Option<Instant>) -> io::Result<()> {
        // A timerfd_settime per pump would be a syscall per packet batch for nothing: the
        // deadline rarely changes. An expired timer clears `timer_armed` (TOKEN_TIMER).
        if next == self.timer_armed {
            return Ok(());
        }
        match next {
            Some(t) => self.timer.reset(
                t.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None,
            )?,
            None => self.timer.clear()?,
        }
        self.timer_armed = next;
        Ok(())
    }
}
