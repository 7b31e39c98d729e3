//! Guest data that outlives its device.
//!
//! When a device stops (QEMU killed, guest powered off), connections whose host side has
//! not taken everything the guest sent yet are handed to a thread that keeps flushing them
//! for at most [`LINGER_TIMEOUT_MS`], then closes them. The guest had these bytes
//! acknowledged (credit), so dropping them with the device would lose accepted data.
//! Nothing new is read from these sockets. Counted as `lingered_connections` and, for what
//! did not make it in time, `lingered_bytes_lost`.
//!
//! This thread reads the clock itself: it runs on its own, outside the engine's pump.
//!
//! What it does not do: anything for connections with nothing left to flush (they close
//! with the device).

use super::conn::HostConn;
use crate::metrics::VmStats;
use crate::tunables::LINGER_TIMEOUT_MS;
use crate::vm::VmShared;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

/// Starts the linger thread for `conns` (all with unflushed guest data).
pub(super) fn spawn(shared: Arc<VmShared>, mut conns: Vec<HostConn>) {
    let name = shared.name.clone();
    VmStats::add(&shared.stats.lingered_connections, conns.len() as u64);
    let spawned = std::thread::Builder::new()
        .name(format!("linger-{}", shared.name))
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_millis(LINGER_TIMEOUT_MS);
            while !conns.is_empty() && Instant::now() < deadline {
                let wait = deadline.saturating_duration_since(Instant::now());
                {
                    let mut fds: Vec<PollFd<'_>> = conns
                        .iter()
                        .map(|c| PollFd::new(c.sock.as_fd(), PollFlags::POLLOUT))
                        .collect();
                    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
                    if poll(&mut fds, PollTimeout::from(ms)).is_err() {
                        break;
                    }
                }
                conns.retain_mut(|c| match c.write_outbox() {
                    Ok(true) => {
                        c.sock.shutdown(std::net::Shutdown::Write);
                        false
                    }
                    Ok(false) => true,
                    Err(_) => {
                        VmStats::add(&shared.stats.lingered_bytes_lost, c.outbox_len() as u64);
                        false
                    }
                });
            }
            for c in &conns {
                VmStats::add(&shared.stats.lingered_bytes_lost, c.outbox_len() as u64);
            }
        });
    if spawned.is_err() {
        warn!(vm = %name, "cannot start a linger thread; host sockets with unsent guest data are closed");
    }
}
