//! Serving one VM: accept its frontend (QEMU) on the vhost-user socket, run the device
//! until the frontend goes away, and wait for the next one. The host listener and counters
//! persist, so a restarted QEMU is served without restarting domsockd.
//!
//! The frontend's connection reaches vhost-user-backend's request handler through a
//! [`relay`], so that a device unplugged and plugged back on the same connection is served
//! as a fresh device ([`replug`]).

pub mod device;
pub mod relay;
pub mod replug;

use crate::config::VmConfig;
use crate::router::Router;
use crate::virtio::GuestPort;
use crate::vm::VmShared;
use device::{VsockDevice, BACKEND_EVENT};
use domsock_proto::Cid;
use relay::{PrivateListener, Relay};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tracing::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

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
        let listener = Listener::new(&cfg.socket, true).map_err(|source| ServeError::Listen {
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

    /// Serves frontends one after another, forever, routing to other guests through
    /// `router`.
    pub fn run(mut self, router: Arc<Router>) {
        let name = self.shared.name.clone();
        loop {
            if let Err(e) = self.serve_one(&router) {
                error!(vm = %name, error = %e, "frontend session failed");
                // Avoid a hot loop if something is persistently wrong.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn serve_one(&mut self, router: &Arc<Router>) -> Result<(), Box<dyn std::error::Error>> {
        let device = Arc::new(VsockDevice::new(
            self.shared.clone(),
            self.queue_size,
            router.clone(),
            self.port.clone(),
        )?);
        let mut daemon = VhostUserDaemon::new(
            format!("domsock-{}", self.shared.name),
            device.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| format!("creating daemon: {e}"))?;
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(device.backend_fd(), EventSet::IN, u64::from(BACKEND_EVENT))
                .map_err(|e| format!("registering backend fd: {e}"))?;
        }
        info!(vm = %self.shared.name, cid = %self.shared.cid, "waiting for frontend");
        let frontend = loop {
            if let Some(s) = self
                .listener
                .accept()
                .map_err(|e| format!("accepting frontend: {e}"))?
            {
                break s;
            }
        };
        info!(vm = %self.shared.name, "frontend connected");
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
