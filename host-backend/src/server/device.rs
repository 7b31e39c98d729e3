//! The vhost-user vsock device of one VM connection: feature negotiation, config space
//! (the guest CID), and event dispatch into the [`DataPlane`].
//!
//! A new device is built for every frontend connection (QEMU start or restart); the VM's
//! [`VmShared`] state (host listener, counters) and its [`DataPlane`] (with the sessions
//! parked in it) outlive it. A device unplugged and plugged
//! back on the same connection (QMP `device_del`, `device_add`) stays the same
//! `VsockDevice`, with the same [`DataPlane`]: the unplug stops its rings, which stops the
//! data plane as a guest reset does, and the re-plug only resets the vhost-user state
//! ([`super::replug`]).

use super::relay::ReplugHook;
use crate::engine::{DataPlane, Wake};
use crate::metrics::VmStats;
use crate::virtio::chain::Mem;
use crate::virtio::{RX_QUEUE, TX_QUEUE};
use crate::vm::VmShared;
use domsock_proto::config_space::VsockConfig;
use domsock_proto::packet::VIRTIO_VSOCK_F_SEQPACKET;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Number of virtqueues: rx, tx, event.
pub const NUM_QUEUES: usize = 3;
/// Event id of the data plane's nested epoll fd (ids `0..=NUM_QUEUES` are reserved).
pub const BACKEND_EVENT: u16 = (NUM_QUEUES + 1) as u16;

/// One VM's device for one frontend connection.
#[derive(Debug)]
pub struct VsockDevice {
    shared: Arc<VmShared>,
    /// The VM's engine: it outlives this device (see [`crate::server`]).
    plane: Arc<Mutex<DataPlane>>,
    queue_size: u16,
    exit: (EventConsumer, EventNotifier),
    epoll_fd: i32,
    /// See [`VsockDevice::close_leaked_fds`].
    leaked_fds: Mutex<Vec<RawFd>>,
}

impl VsockDevice {
    /// Builds a device for the VM described by `shared`, driving its engine `plane`.
    pub fn new(
        shared: Arc<VmShared>,
        queue_size: u16,
        plane: Arc<Mutex<DataPlane>>,
    ) -> io::Result<Self> {
        let epoll_fd = lock_plane(&plane).epoll_fd();
        Ok(Self {
            shared,
            plane,
            queue_size,
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            epoll_fd,
            leaked_fds: Mutex::new(Vec::new()),
        })
    }

    /// The fd the worker thread must watch for host socket events.
    pub fn backend_fd(&self) -> i32 {
        self.epoll_fd
    }

    /// Ends every connection (guest reset); the device may run again.
    pub fn stop(&self) {
        self.plane().stop();
    }

    /// The frontend is gone (this device is about to be dropped): raw connections end,
    /// sessions stay parked in the engine, which outlives the device.
    pub fn end(&self) {
        self.plane().frontend_gone();
    }

    /// Closes the exit-event fds the vhost-user library took over and leaks. Call only
    /// after the daemon that used this device was dropped: dropping it joins the worker
    /// threads, the only users of these fds, and nothing else closes them, so their
    /// numbers cannot have been reused.
    pub fn close_leaked_fds(&self) {
        for fd in self
            .leaked_fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = nix::unistd::close(fd);
        }
    }

    /// Wakes the worker thread so it exits.
    pub fn signal_exit(&self) {
        let _ = self.exit.1.notify();
    }

    fn plane(&self) -> MutexGuard<'_, DataPlane> {
        lock_plane(&self.plane)
    }
}

/// Locks a VM's engine. A panic while holding the lock would be a bug; keep serving the
/// VM regardless.
pub fn lock_plane(plane: &Mutex<DataPlane>) -> MutexGuard<'_, DataPlane> {
    plane.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplugHook for VsockDevice {
    fn fresh_device(&self, device: u64) {
        // Nothing to stop: the old device's rings stopped (GET_VRING_BASE) before the
        // frontend let it go, and with them the data plane.
        VmStats::inc(&self.shared.stats.device_replugs);
        info!(vm = %self.shared.name, device, "device plugged again on the same frontend connection");
    }
}

impl VhostUserBackend for VsockDevice {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_VSOCK_F_SEQPACKET)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        debug!(vm = %self.shared.name, features = format_args!("{features:#x}"), "features acked");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&self) {
        self.stop();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // virtio-queue tracks EVENT_IDX per queue; the data plane always uses the
        // disable/enable_notification + needs_notification protocol, which honours it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = VsockConfig::new(self.shared.cid);
        let cfg = cfg.bytes();
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= cfg.len() => cfg[offset..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        self.plane().set_memory(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let consumer = self.exit.0.try_clone().ok()?;
        let notifier = self.exit.1.try_clone().ok()?;
        // vhost-user-backend 0.24 registers this consumer with `into_raw_fd()` and never
        // closes it: one fd per frontend session. Remember it for `close_leaked_fds`.
        self.leaked_fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.stop();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error: it would end the worker thread and with it the VM's
        // data plane. Data-plane faults are per connection and handled inside.
        match device_event {
            e if e as usize == RX_QUEUE => self.plane().pump_for(vrings, Wake::RxKick),
            e if e as usize == TX_QUEUE => self.plane().pump_for(vrings, Wake::TxKick),
            BACKEND_EVENT => self.plane().pump_for(vrings, Wake::Sockets),
            2 => {} // event queue: only the guest's buffers for transport events
            other => warn!(vm = %self.shared.name, event = other, ?evset, "unexpected event"),
        }
        Ok(())
    }
}
