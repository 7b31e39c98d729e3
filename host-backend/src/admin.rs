//! The admin service: a Unix socket (`--admin-socket`, config `admin-socket`) on which
//! the host's tools (`domsock migrate`, operators) ask domsockd what it serves.
//!
//! Protocol version 1: one JSON object per line each way. Every request has `"v": 1` and
//! an `"op"`; every reply has `"v": 1` and `"ok"`, and either the op's fields or
//! `"error"` (a sentence). A connection may send many requests; requests are handled one
//! at a time, in order.
//!
//! | op | request fields | reply fields |
//! |---|---|---|
//! | `status` | | `vms`: `[{name, namespace, cid, frontend, device_running, sessions_live, sessions_parked, counters}]` |
//! | `sessions` | `vm` | `parked`: session ids (hex) parked in that VM's engine |
//! | `adopt` | `vm`, `from` | (destination of a migration: expect the domain from host `from`) |
//! | `export` | `vm`, `to` | `sessions`: parked sessions handed to host `to` |
//! | `hold-joins` | `ms` | (fault injection for tests: each sibling-pair join that starts here waits `ms` on its placeholders before it drains; 0 ends it; needs a `[tunnel]` and domsockd `--fault-injection`, refused otherwise) |
//!
//! The `status` reply of domsockd also has `bus`: `{counters: {joins, rejoins,
//! refused_denied, refused_other, request_errors, removed_by_reload, slow_disconnects,
//! too_many_conns}, buses: [{namespace, name, policy, members, parked}]}`.
//!
//! With a `[tunnel]` configured, the `status` reply also has `tunnel`: `{host, listen,
//! refused_peers, peers: [{name, up, connections, reconnects, bytes_sent, bytes_received,
//! channels_open, link_errors}]}`.
//!
//! `frontend` says a QEMU is connected; `device_running` that the guest's driver runs the
//! device (both data queues), so a guest is really reachable only when both hold.
//!
//! Bounds: a request line is at most [`MAX_REQUEST_BYTES`]; at most
//! [`MAX_ADMIN_CONNS`] connections at once (more are closed at once); a connection idle
//! for [`ADMIN_IDLE`] is closed. The socket is created mode 0600: whoever may use it may
//! see every domain.
//!
//! What it does not do (yet): carry sessions to another host. `export` of a domain with
//! parked sessions is refused with the reason (so a migration rolls back rather than
//! stranding them) until the tunnel between hosts carries them.

use crate::metrics::VmStats;
use crate::relay::ServedVm;
use crate::server::device::lock_plane;
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Protocol version.
pub const ADMIN_VERSION: u64 = 1;
/// Longest request line.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Connections served at once.
pub const MAX_ADMIN_CONNS: usize = 16;
/// An idle connection is closed after this long.
pub const ADMIN_IDLE: Duration = Duration::from_secs(30);

/// This host's tunnel service, as the admin service reports it.
#[derive(Debug, Clone)]
pub struct AdminTunnel {
    /// The running service.
    pub service: Arc<crate::tunnel::TunnelService>,
    /// The session relays over it.
    pub relay: Arc<crate::relay::RelayService>,
    /// This host's name.
    pub host: String,
    /// The configured peers.
    pub peers: Vec<String>,
}

/// What the admin service reports on.
#[derive(Debug)]
struct Served {
    vms: Vec<ServedVm>,
    tunnel: Option<AdminTunnel>,
    bus: Option<Arc<crate::bus::BusHub>>,
}

/// Binds `path` (replacing a stale socket) and serves it on a thread of its own.
pub fn spawn(
    path: &Path,
    vms: Vec<ServedVm>,
    tunnel: Option<AdminTunnel>,
    bus: Option<Arc<crate::bus::BusHub>>,
) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    info!(path = %path.display(), "admin service listening");
    let vms = Arc::new(Served { vms, tunnel, bus });
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if open.fetch_add(1, Ordering::AcqRel) >= MAX_ADMIN_CONNS {
                    open.fetch_sub(1, Ordering::AcqRel);
                    continue; // dropped: closed at once
                }
                let (vms, open) = (vms.clone(), open.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("admin-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve(conn, &vms) {
                                tracing::debug!(error = %e, "admin connection ended");
                            }
                            open.fetch_sub(1, Ordering::AcqRel);
                        });
                if spawned.is_err() {
                    warn!("cannot start an admin connection thread");
                }
            }
        })?;
    Ok(())
}

fn serve(conn: UnixStream, served: &Served) -> io::Result<()> {
    conn.set_read_timeout(Some(ADMIN_IDLE))?;
    conn.set_write_timeout(Some(ADMIN_IDLE))?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let reply = error_reply(if n > MAX_REQUEST_BYTES {
                "request line too long"
            } else {
                "request line not terminated"
            });
            writeln!(out, "{reply}")?;
            return Ok(());
        }
        let mut reply = handle(
            &line,
            &served.vms,
            served.tunnel.as_ref().map(|t| &*t.relay),
        );
        let status = serde_json::from_slice::<Value>(&line)
            .ok()
            .and_then(|r| r.get("op").and_then(Value::as_str).map(str::to_owned))
            .is_some_and(|op| op == "status")
            && reply["ok"] == true;
        if let (Some(t), true) = (&served.tunnel, status) {
            reply["tunnel"] = tunnel_status(t);
        }
        if let (Some(hub), true) = (&served.bus, status) {
            reply["bus"] = bus_status(hub);
        }
        writeln!(out, "{reply}")?;
    }
}

/// The bus service's counters and buses.
fn bus_status(hub: &crate::bus::BusHub) -> Value {
    let counters: serde_json::Map<String, Value> = hub
        .stats
        .pairs()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), json!(v)))
        .collect();
    let buses: Vec<Value> = hub
        .buses()
        .into_iter()
        .map(|b| {
            json!({"namespace": b.namespace, "name": b.name, "policy": b.policy,
                   "members": b.members, "parked": b.parked})
        })
        .collect();
    json!({"counters": counters, "buses": buses})
}

fn error_reply(why: &str) -> Value {
    json!({"v": ADMIN_VERSION, "ok": false, "error": why})
}

/// Answers one request line; `relay` carries sessions between hosts when a tunnel is
/// configured.
pub fn handle(line: &[u8], vms: &[ServedVm], relay: Option<&crate::relay::RelayService>) -> Value {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_reply(&format!("not a JSON object: {e}")),
    };
    if req.get("v").and_then(Value::as_u64) != Some(ADMIN_VERSION) {
        return error_reply("unsupported or missing protocol version \"v\" (this build speaks 1)");
    }
    let Some(op) = req.get("op").and_then(Value::as_str) else {
        return error_reply("missing \"op\"");
    };
    let find = |req: &Value| -> Result<&ServedVm, Value> {
        let name = req
            .get("vm")
            .and_then(Value::as_str)
            .ok_or_else(|| error_reply("missing \"vm\""))?;
        vms.iter()
            .find(|v| v.shared.name == name)
            .ok_or_else(|| error_reply(&format!("no VM named {name:?}")))
    };
    match op {
        "status" => {
            let list: Vec<Value> = vms.iter().map(vm_status).collect();
            json!({"v": ADMIN_VERSION, "ok": true, "vms": list})
        }
        "sessions" => match find(&req) {
            Ok(vm) => {
                let ids: Vec<String> = lock_plane(&vm.plane)
                    .parked_session_ids()
                    .iter()
                    .map(|id| id.0.iter().map(|b| format!("{b:02x}")).collect())
                    .collect();
                json!({"v": ADMIN_VERSION, "ok": true, "vm": vm.shared.name, "parked": ids})
            }
            Err(e) => e,
        },
        // The migration steps of `domsock migrate`. Without a tunnel a domain moves with
        // its raw connections only (they break, as everywhere): `export` succeeds when it
        // has nothing parked and says why not otherwise, so that the orchestrator rolls
        // back instead of stranding sessions.
        "adopt" => match (find(&req), req.get("from").and_then(Value::as_str)) {
            (Ok(vm), Some(from)) => {
                info!(vm = %vm.shared.name, from, "admin: domain expected from another host");
                match relay.map(|r| r.adopt(&vm.shared.name)) {
                    Some(Err(why)) => error_reply(&why),
                    _ => json!({"v": ADMIN_VERSION, "ok": true, "vm": vm.shared.name}),
                }
            }
            (Err(e), _) => e,
            (Ok(_), None) => error_reply("missing \"from\""),
        },
        "export" => match (find(&req), req.get("to").and_then(Value::as_str)) {
            (Ok(vm), Some(to)) => {
                let parked = lock_plane(&vm.plane).parked_sessions();
                match relay {
                    _ if parked == 0 => {
                        json!({"v": ADMIN_VERSION, "ok": true, "vm": vm.shared.name, "sessions": 0})
                    }
                    Some(r) => match r.export(&vm.shared.name, to) {
                        Ok(n) => {
                            info!(vm = %vm.shared.name, to, sessions = n, "admin: sessions exported");
                            json!({"v": ADMIN_VERSION, "ok": true, "vm": vm.shared.name, "sessions": n})
                        }
                        Err(why) => error_reply(&why),
                    },
                    None => error_reply(&format!(
                        "{parked} parked sessions of {} cannot move to {to}: no [tunnel] is configured",
                        vm.shared.name
                    )),
                }
            }
            (Err(e), _) => e,
            (Ok(_), None) => error_reply("missing \"to\""),
        },
        "hold-joins" => match (relay, req.get("ms").and_then(Value::as_u64)) {
            (Some(r), Some(ms)) => match r.hold_joins(ms) {
                Ok(()) => json!({"v": ADMIN_VERSION, "ok": true, "ms": ms}),
                Err(why) => error_reply(&why),
            },
            (None, _) => error_reply("no [tunnel] is configured"),
            (_, None) => error_reply("missing \"ms\""),
        },
        other => error_reply(&format!("unknown op {other:?}")),
    }
}

fn tunnel_status(t: &AdminTunnel) -> Value {
    let peers: Vec<Value> = t
        .peers
        .iter()
        .map(|p| {
            let c = t.service.counters(p).unwrap_or_default();
            json!({
                "name": p,
                "up": t.service.is_up(p),
                "connections": c.connections,
                "reconnects": c.reconnects,
                "bytes_sent": c.bytes_sent,
                "bytes_received": c.bytes_received,
                "channels_open": c.channels_open,
                "link_errors": c.link_errors,
            })
        })
        .collect();
    let relays: Vec<Value> = t
        .relay
        .relays()
        .iter()
        .map(|r| json!({"session": r.session.hex(), "vm": r.vm, "role": r.role, "peer": r.peer}))
        .collect();
    let st = &t.relay.stats;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    json!({
        "host": t.host,
        "listen": t.service.local_addr().to_string(),
        "refused_peers": t.service.refused_peers(),
        "peers": peers,
        "relays": relays,
        "relay_counters": {
            "exported_home": n(&st.exported_home),
            "imported": n(&st.imported),
            "handed_off": n(&st.handed_off),
            "returned_home": n(&st.returned_home),
            "rerooted": n(&st.rerooted),
            "sent_back": n(&st.sent_back),
            "refused": n(&st.refused),
            "failed": n(&st.failed),
            "joined": n(&st.joined),
            "join_failed": n(&st.join_failed),
            "join_refused": n(&st.join_refused),
            "policy_resets": n(&st.policy_resets),
        },
    })
}

fn vm_status(vm: &ServedVm) -> Value {
    let (running, live, parked) = {
        let p = lock_plane(&vm.plane);
        (p.guest_running(), p.live_sessions(), p.parked_sessions())
    };
    json!({
        "name": vm.shared.name,
        "namespace": vm.namespace,
        "cid": vm.shared.cid.0,
        "frontend": vm.shared.frontend.load(Ordering::Acquire),
        "device_running": running,
        "sessions_live": live,
        "sessions_parked": parked,
        "counters": counters(&vm.shared.stats),
    })
}

fn counters(stats: &VmStats) -> Value {
    Value::Object(
        stats
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::from(v)))
            .collect(),
    )
}
