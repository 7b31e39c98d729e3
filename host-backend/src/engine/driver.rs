//! The engine's driver: what the vhost-user worker thread runs on every wake-up.
//!
//! It is the only part of the engine that reads the clock: [`DataPlane::pump_for`] takes
//! `Instant::now()` once and hands it to [`DataPlane::pump_at`], which runs everything that
//! can make progress at that instant. Tests call `pump_at` with a simulated `now`. Busy-poll
//! (opt-in) also lives here: it keeps polling the TX ring and the host sockets for a window
//! after the last activity instead of going back to sleep.
//!
//! What it does not do: protocol work (the TX/RX paths and the endpoint do) or epoll
//! bookkeeping (the poller does).

use super::poller::{Target, TOKEN_LISTENER, TOKEN_TIMER, TOKEN_WAKE};
use super::DataPlane;
use crate::tunables::BUSY_POLL_MAX_WINDOWS;
use crate::virtio::{Vring, RX_QUEUE, TX_QUEUE};
use std::time::Instant;
use tracing::{info, warn};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

/// Why the worker thread runs the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The guest added RX buffers.
    RxKick,
    /// The guest added TX packets.
    TxKick,
    /// A host socket, the host listener or the timer is ready.
    Sockets,
    /// Everything (tests, and any caller that does not know why).
    All,
}

fn queue_running(vring: &Vring) -> bool {
    let state = vring.get_ref();
    state.get_queue().ready() && state.is_enabled()
}

impl DataPlane {
    /// Runs everything that can make progress now.
    pub fn pump(&mut self, vrings: &[Vring]) {
        self.pump_for(vrings, Wake::All);
    }

    /// Runs what `wake` can have made possible, at the current time, then busy-polls if
    /// configured. Host socket events stay pending in the nested epoll (whose fd the
    /// worker watches level-triggered) until a [`Wake::Sockets`] pump, and TX chains stay
    /// in their ring until a [`Wake::TxKick`] pump, so skipping either here loses nothing;
    /// it saves a syscall or a ring walk on every wake-up.
    pub fn pump_for(&mut self, vrings: &[Vring], wake: Wake) {
        self.pump_at(vrings, wake, Instant::now());
        if !self.shared.busy_poll.is_zero() && self.guest_running && wake != Wake::All {
            self.busy_poll(vrings);
        }
    }

    /// Runs what `wake` can have made possible at `now` (which may be simulated: every
    /// deadline is compared with it, nothing here reads the clock).
    pub fn pump_at(&mut self, vrings: &[Vring], wake: Wake, now: Instant) {
        if self.ended {
            return;
        }
        // Entering a span costs ~0.15 s/GiB on host->guest 4K (measured); warnings and info
        // lines name the VM themselves, so the span is entered only for debug logging.
        let _span = tracing::enabled!(tracing::Level::DEBUG).then(|| self.span.clone().entered());
        self.guest_running = self.mem.is_some()
            && vrings.get(RX_QUEUE).is_some_and(queue_running)
            && vrings.get(TX_QUEUE).is_some_and(queue_running);
        if self.guest_running {
            self.stopped = false;
            if !self.attached {
                if let Some(mem) = self.mem.clone() {
                    self.port.attach(vrings[RX_QUEUE].clone(), mem);
                    self.attached = true;
                    // The guest's driver set up both rings: the time an operator (or a
                    // blackout measurement) wants between `device_add` and the guest's
                    // first RESUME.
                    info!(vm = %self.shared.name, parked = self.sessions.parked(), "device running");
                }
            }
        }
        if matches!(wake, Wake::Sockets | Wake::All) {
            let _ = self.drain_socket_events(now);
        }
        if let (Some(atomic), true) = (self.mem.clone(), self.guest_running) {
            if matches!(wake, Wake::TxKick | Wake::All) {
                self.process_tx(&vrings[TX_QUEUE], &atomic);
            }
            self.handle_timers(now);
            self.fill_rx(now);
        } else {
            self.handle_timers(now);
        }
        let next = self.next_deadline();
        if let Err(e) = self.poller.arm(now, next) {
            warn!(vm = %self.shared.name, error = %e, "timerfd");
        }
    }

    /// Polls the TX ring and the host sockets for [`crate::vm::VmShared::busy_poll`] after
    /// the last activity, handling what comes without going back to sleep. Bounded overall
    /// so the vhost-user thread (which takes this data plane's lock to stop a device) never
    /// waits long.
    fn busy_poll(&mut self, vrings: &[Vring]) {
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let _span = tracing::enabled!(tracing::Level::DEBUG).then(|| self.span.clone().entered());
        let window = self.shared.busy_poll;
        let start = Instant::now();
        let hard_stop = start + window * BUSY_POLL_MAX_WINDOWS;
        let mut deadline = start + window;
        loop {
            let now = Instant::now();
            if now >= deadline || now >= hard_stop {
                return;
            }
            let tx = &vrings[TX_QUEUE];
            let tx_pending = {
                let state = tx.get_ref();
                let q = state.get_queue();
                let mem = atomic.memory();
                q.ready()
                    && state.is_enabled()
                    && q.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                        .is_ok_and(|idx| idx.0 != q.next_avail())
            };
            let mut busy = self.drain_socket_events(now);
            if tx_pending {
                self.process_tx(tx, &atomic);
                busy = true;
            }
            if busy {
                crate::metrics::VmStats::inc(&self.shared.stats.busy_poll_hits);
                self.fill_rx(now);
                let next = self.next_deadline();
                let _ = self.poller.arm(now, next);
                deadline = Instant::now() + window;
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Handles every ready event of the nested epoll; `true` if there was any.
    fn drain_socket_events(&mut self, now: Instant) -> bool {
        let mut any = false;
        loop {
            let n = match self.poller.poll_now() {
                Ok(n) => n,
                Err(e) => {
                    warn!(vm = %self.shared.name, error = %e, "nested epoll wait failed");
                    return any;
                }
            };
            any |= n > 0;
            for i in 0..n {
                let ev = self.poller.events[i];
                self.socket_event(now, ev.data(), ev.event_set());
            }
            if n < self.poller.events.len() {
                return any;
            }
        }
    }

    fn socket_event(&mut self, now: Instant, token: u64, set: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept_host_connections(now),
            TOKEN_TIMER => self.poller.timer_fired(),
            TOKEN_WAKE => {
                let _ = self.shared.wake.read();
                self.recheck_policy();
                self.start_proxy_dials(now);
            }
            _ => match self.poller.target(token) {
                Some(Target::Handshake) => self.read_handshake(now, token),
                // A reload this engine has not rechecked yet comes first: the other half
                // of a sibling pair that another engine just reset for it must be reset
                // too, not read as its peer's end of stream.
                Some(_) if self.router.generation() != self.policy_generation => {
                    self.recheck_policy();
                    self.socket_event(now, token, set);
                }
                Some(Target::Parked(id)) => self.parked_event(id, set),
                Some(Target::Conn(key)) => {
                    let Some(hc) = self.conns.get_mut(&key) else {
                        return;
                    };
                    if hc.dialing() {
                        self.dial_progress(key);
                        return;
                    }
                    hc.note_event(
                        set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP),
                        set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP),
                        set.contains(EventSet::HANG_UP),
                    );
                    if set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                        self.flush_outbox(key);
                    }
                    self.after_change(key);
                }
                None => {}
            },
        }
    }
}
