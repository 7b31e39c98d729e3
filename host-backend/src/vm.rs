//! What one VM is for the whole daemon: its identity, its host-side `<uds>` listener, its
//! counters and the handles other threads use to reach its data plane.
//!
//! A [`VmShared`] lives as long as the daemon; every device instance the VM's QEMU
//! connects (boot, reboot, QEMU restart) and the router see the same one.
//!
//! What it does not do: any I/O beyond binding the listener. The VM's engine serves the
//! listener; the router reaches the guest's RX ring through the VM's port, never through
//! this. (A leaf module: it imports nothing of the daemon but counters, tunables and the
//! policy's denial reasons.)

use crate::metrics::VmStats;
use crate::policy::DenyReason;
use crate::tunables::MAX_GUEST_WARNINGS_PER_SEC;
use domsock_proto::{Cid, Port, SocketType};
use std::io::{self, ErrorKind};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A sibling's session asks this VM's engine to open a connection to its guest's `port`
/// that appears to come from `from` (the sibling), carried over `sock`. The engine writes
/// one status byte (0: connected) on `sock` before any data; an EOF instead means refused.
#[derive(Debug)]
pub struct ProxyDial {
    /// The sibling the connection appears to come from.
    pub from: Cid,
    /// The guest port to connect to.
    pub port: Port,
    /// The other end belongs to the sibling's session.
    pub sock: std::os::unix::net::UnixStream,
    /// That session: if the guest accepts on a session listener, the accepted connection
    /// becomes a session too, and the two are recorded as one sibling pair.
    pub session: Option<domsock_migration::session::SessionId>,
}

impl VmShared {
    /// Queues `dial` for this VM's engine and wakes it; gives it back if the queue is full.
    pub fn request_dial(&self, dial: ProxyDial) -> Result<(), ProxyDial> {
        let mut q = self.proxy_dials.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= crate::tunables::MAX_PENDING_PROXY_DIALS {
            return Err(dial);
        }
        q.push_back(dial);
        drop(q);
        let _ = self.wake.write(1);
        Ok(())
    }

    /// Takes every queued dial.
    pub fn take_dials(&self) -> Vec<ProxyDial> {
        let mut q = self.proxy_dials.lock().unwrap_or_else(|p| p.into_inner());
        q.drain(..).collect()
    }
}

/// What a VM is, shared by every device instance the VM's QEMU connects.
#[derive(Debug)]
pub struct VmShared {
    /// The guest's CID.
    pub cid: Cid,
    /// Name for logs.
    pub name: String,
    /// Host-side Unix socket prefix.
    pub uds_path: PathBuf,
    /// The `<uds>` listener for host-initiated connections.
    pub listener: UnixListener,
    /// Counters.
    pub stats: VmStats,
    /// After handling an event, keep polling the TX ring and host sockets this long
    /// before sleeping (0: never). Trades CPU for latency: a reply that arrives within
    /// the window costs no wake-up.
    pub busy_poll: Duration,
    /// Wakes the VM's data plane from other threads (policy reload).
    pub wake: EventFd,
    /// Open control-service connections.
    pub control_conns: AtomicUsize,
    /// Sessions of other guests asking this VM's engine to dial its guest (see
    /// [`ProxyDial`]); bounded by [`crate::tunables::MAX_PENDING_PROXY_DIALS`].
    pub proxy_dials: Mutex<std::collections::VecDeque<ProxyDial>>,
    /// How long a parked session waits for its guest, in ms (set from the config).
    pub park_timeout_ms: std::sync::atomic::AtomicU64,
    /// A frontend (QEMU) is connected.
    pub frontend: std::sync::atomic::AtomicBool,
    /// Rate limit of this VM's warnings (see [`VmShared::may_warn`]).
    warn_budget: Mutex<(Instant, u32)>,
}

impl VmShared {
    /// Binds `<uds>` (replacing a stale socket file) and builds the shared state.
    pub fn bind(cid: Cid, name: String, uds_path: PathBuf) -> io::Result<Arc<VmShared>> {
        Self::bind_with(cid, name, uds_path, Duration::ZERO)
    }

    /// Like [`VmShared::bind`], with a busy-poll window (see [`VmShared::busy_poll`]).
    pub fn bind_with(
        cid: Cid,
        name: String,
        uds_path: PathBuf,
        busy_poll: Duration,
    ) -> io::Result<Arc<VmShared>> {
        match std::fs::remove_file(&uds_path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&uds_path)?;
        listener.set_nonblocking(true)?;
        Ok(Arc::new(VmShared {
            cid,
            name,
            uds_path,
            listener,
            stats: VmStats::default(),
            busy_poll,
            wake: EventFd::new(EFD_NONBLOCK)?,
            control_conns: AtomicUsize::new(0),
            proxy_dials: Mutex::new(std::collections::VecDeque::new()),
            park_timeout_ms: std::sync::atomic::AtomicU64::new(u64::from(
                domsock_migration::session::DEFAULT_PARK_TIMEOUT_MS,
            )),
            frontend: std::sync::atomic::AtomicBool::new(false),
            warn_budget: Mutex::new((Instant::now(), 0)),
        }))
    }

    /// Whether a warning a guest can trigger at will (a denied connection, say) may be
    /// logged now: at most [`MAX_GUEST_WARNINGS_PER_SEC`] per VM, so a guest cannot flood
    /// the log. The counters still count every event. Reads the clock: log rate limiting
    /// is the one place where wall time, not the engine's `now`, is what matters.
    pub fn may_warn(&self) -> bool {
        let mut b = self.warn_budget.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(b.0) >= Duration::from_secs(1) {
            *b = (now, 0);
        }
        b.1 += 1;
        b.1 <= MAX_GUEST_WARNINGS_PER_SEC
    }

    /// Counts a connection of this VM's guest that the policy denied and warns about it
    /// (rate-limited, see [`VmShared::may_warn`]), naming both ends.
    pub fn note_denied(&self, to: &str, port: Port, ty: SocketType, why: DenyReason) {
        VmStats::inc(&self.stats.denied_connections);
        if self.may_warn() {
            warn!(from = %self.name, to = %to, port = port.0, socket_type = ?ty, %why, "connection denied by policy");
        }
    }

    /// The VM's own host socket for guest connections to host port `port`: `<uds>_<port>`.
    pub fn port_path(&self, port: Port) -> PathBuf {
        let mut p = self.uds_path.clone().into_os_string();
        p.push(format!("_{}", port.0));
        PathBuf::from(p)
    }

    /// A tracing span for this VM: every event logged inside names it.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("vm", vm = %self.name, cid = self.cid.0)
    }
}
