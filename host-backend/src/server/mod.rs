//! Serving one VM: accept its frontend (QEMU) on the vhost-user socket, run the device
//! until the frontend goes away, and wait for the next one. The host listener, counters
//! and the VM's engine ([`DataPlane`]) persist, so a restarted QEMU is served without
//! restarting domsockd, and sessions parked when a frontend went (a migrated guest's
//! source QEMU quits; a QEMU restarts) wait for their guest in the engine. Between
//! frontends this thread drives the engine itself ([`standby`]): parked sessions keep
//! reading their host ends into their replay buffers, and time out.
//!
//! The frontend's connection reaches vhost-user-backend's request handler through a
//! [`relay`], so that a device unplugged and plugged back on the same connection is served
//! as a fresh device ([`replug`]).

pub mod device;
pub mod relay;
pub mod replug;

use crate::config::VmConfig;
use crate::engine::DataPlane;
use crate::router::Router;
use crate::virtio::GuestPort;
use crate::vm::VmShared;
use device::{lock_plane, VsockDevice, BACKEND_EVENT};
use domsock_proto::Cid;
use relay::{PrivateListener, Relay};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Why a VM could not be served at all.
#[derive(Debug, Error)]
pub enum ServeError {
    /// Binding the host-side `<uds>` socket failed.
    #[error("cannot bind host socket {path}")]
    BindHost {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Creating the vhost-user listener failed.
    #[error("cannot listen on vhost-user socket {path}")]
    Listen {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: vhost::vhost_user::Error,
    },
}

/// Prepared VM: bound sockets, ready to serve.
pub struct VmServer {
    shared: Arc<VmShared>,
    port: Arc<GuestPort>,
    listener: Listener,
    queue_size: u16,
}

impl std::fmt::Debug for VmServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmServer")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl VmServer {
    /// Binds the VM's sockets. Its RX port shares `backlog_total` (bytes queued for full
    /// RX rings) with every other VM's.
    pub fn bind(
        cfg: &VmConfig,
        queue_size: u16,
        busy_poll: Duration,
        backlog_total: &Arc<AtomicUsize>,
    ) -> Result<Self, ServeError> {
        let shared = VmShared::bind_with(
            Cid(cfg.guest_cid),
            cfg.display_name(),
            cfg.uds_path.clone(),
            busy_poll,
        )
        .map_err(|source| ServeError::BindHost {
            path: cfg.uds_path.display().to_string(),
            source,
        })?;
        let listener = Listener::new(&cfg.socket, true)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| ServeError::Listen {
                path: cfg.socket.display().to_string(),
                source,
            })?;
        Ok(Self {
            port: Arc::new(GuestPort::new(shared.clone(), backlog_total.clone())),
            shared,
            listener,
            queue_size,
        })
    }

    /// The VM's shared state (counters, paths).
    pub fn shared(&self) -> Arc<VmShared> {
        self.shared.clone()
    }

    /// The VM's RX port, for the router.
    pub fn port(&self) -> Arc<GuestPort> {
        self.port.clone()
    }

    /// The VM's engine, routing to other domains through `router`: it lives as long as
    /// the VM is served, across frontends ([`VmServer::run`]).
    pub fn engine(&self, router: Arc<Router>) -> std::io::Result<Arc<Mutex<DataPlane>>> {
        DataPlane::with_router(self.shared.clone(), router, self.port.clone())
            .map(|p| Arc::new(Mutex::new(p)))
    }

    /// Serves frontends one after another, forever, driving `plane` (from
    /// [`VmServer::engine`]).
    pub fn run(mut self, plane: Arc<Mutex<DataPlane>>) {
        let name = self.shared.name.clone();
        loop {
            if let Err(e) = self.serve_one(&plane) {
                error!(vm = %name, error = %e, "frontend session failed");
                // Avoid a hot loop if something is persistently wrong.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Waits for the next frontend, driving `plane` meanwhile.
    fn next_frontend(
        &self,
        plane: &Mutex<DataPlane>,
    ) -> Result<std::os::unix::net::UnixStream, Box<dyn std::error::Error>> {
        let standby = Standby::new(self.listener.as_raw_fd(), lock_plane(plane).epoll_fd())
            .map_err(|e| format!("standby epoll: {e}"))?;
        loop {
            let (frontend, engine) = standby.wait().map_err(|e| format!("standby wait: {e}"))?;
            if engine {
                lock_plane(plane).pump_standby(Instant::now());
            }
            if frontend {
                if let Some(s) = self
                    .listener
                    .accept()
                    .map_err(|e| format!("accepting frontend: {e}"))?
                {
                    return Ok(s);
                }
            }
        }
    }

    fn serve_one(
        &mut self,
        plane: &Arc<Mutex<DataPlane>>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let device = Arc::new(VsockDevice::new(
            self.shared.clone(),
            self.queue_size,
            plane.clone(),
        )?);
        let mut daemon = VhostUserDaemon::new(
            format!("domsock-{}", self.shared.name),
            device.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| format!("creating daemon: {e}"))?;
        info!(vm = %self.shared.name, cid = %self.shared.cid, "waiting for frontend");
        let frontend = self.next_frontend(plane)?;
        // From here on the device's worker thread drives the engine (its workers run
        // from `VhostUserDaemon::new`, so registering earlier would have two threads
        // wake for every event while no frontend exists).
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(device.backend_fd(), EventSet::IN, u64::from(BACKEND_EVENT))
                .map_err(|e| format!("registering backend fd: {e}"))?;
        }
        info!(vm = %self.shared.name, "frontend connected");
        self.shared
            .frontend
            .store(true, std::sync::atomic::Ordering::Release);
        let handler_end = {
            let private = PrivateListener::bind().map_err(|e| format!("relay socket: {e}"))?;
            let path = private
                .path()
                .to_str()
                .ok_or("relay socket path is not UTF-8")?;
            daemon
                .start_client(path)
                .map_err(|e| format!("connecting the device handler: {e}"))?;
            // The only connection: the directory is ours alone (0700). Dropping the
            // listener removes the socket file and the directory.
            private
                .accept()
                .map_err(|e| format!("accepting the device handler: {e}"))?
        };
        let relay = Relay::spawn(&self.shared.name, frontend, handler_end, device.clone())
            .map_err(|e| format!("starting the relay: {e}"))?;
        let result = daemon.wait();
        self.shared
            .frontend
            .store(false, std::sync::atomic::Ordering::Release);
        relay.shutdown();
        device.end();
        device.signal_exit();
        // Dropping the daemon joins its worker threads (the library's handler does on drop).
        drop(daemon);
        // Once per frontend connection, however many devices it had: the library creates
        // (and leaks) its exit-event fd per daemon, and a re-plug keeps the daemon.
        device.close_leaked_fds();
        match result {
            Ok(()) => info!(vm = %self.shared.name, "frontend disconnected"),
            // QEMU exiting or the guest powering off closes the socket mid-protocol.
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!(vm = %self.shared.name, "frontend disconnected"),
            Err(e) => warn!(vm = %self.shared.name, error = %e, "frontend session ended"),
        }
        Ok(())
    }
}

/// The wait between frontends: for a frontend to connect, or for the engine's nested
/// epoll to have events (host sockets, its timer). Level-triggered: the engine's events
/// stay pending until it is pumped.
struct Standby {
    epoll: Epoll,
}

impl Standby {
    const FRONTEND: u64 = 0;
    const ENGINE: u64 = 1;

    fn new(listener: RawFd, engine: RawFd) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        for (fd, token) in [(listener, Self::FRONTEND), (engine, Self::ENGINE)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Self { epoll })
    }

    /// Whether a frontend may be connecting, and whether the engine has events.
    fn wait(&self) -> std::io::Result<(bool, bool)> {
        let mut events = [EpollEvent::default(); 2];
        let n = loop {
            match self.epoll.wait(-1, &mut events) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        let ready = |token| events[..n].iter().any(|e| e.data() == token);
        Ok((ready(Self::FRONTEND), ready(Self::ENGINE)))
    }
}
