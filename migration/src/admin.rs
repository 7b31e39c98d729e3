//! The domsockd side of a live migration, as the orchestrator ([`crate::orchestrate`]) sees
//! it: the [`HostAgent`] trait, and [`AdminSocket`], its client of domsockd's admin socket.
//!
//! # Admin socket protocol, version 1
//! A Unix stream socket; one JSON object per line in each direction; one request, one reply.
//! Every request carries `"v":1` and `"op"`; every reply carries `"v":1` and `"ok"`:
//! `{"v":1,"ok":true,...}` or `{"v":1,"ok":false,"error":"<text>"}`.
//!
//! | request | reply fields (with `ok:true`) | who, when |
//! |---|---|---|
//! | `{"op":"status"}` | `"vms":[{"name","namespace","cid","frontend","device_running","sessions_live","sessions_parked"}]` | any |
//! | `{"op":"adopt","vm":NAME,"from":HOST}` | none | destination, before the move: expect this domain from HOST |
//! | `{"op":"export","vm":NAME,"to":HOST}` | `"sessions":n` | source, after the migration completed: hand the domain's parked sessions to HOST |
//!
//! A reply line is bounded ([`MAX_REPLY_BYTES`]) and validated field by field; anything else
//! is [`AgentError::BadReply`]. The server side belongs to domsockd; until it exists, tests
//! use [`fake::FakeAdmin`] (feature `test-utils`), which speaks this protocol.
//!
//! What this module does not do: decide anything about the migration, or talk to QEMU.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;

/// Protocol version this client speaks.
pub const ADMIN_PROTOCOL_VERSION: u64 = 1;
/// Longest reply line accepted (a status of a few thousand VMs fits).
pub const MAX_REPLY_BYTES: u64 = 1 << 20;

/// What one VM looks like to its domsockd (`status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// The domain's name (the key the orchestrator uses).
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its CID on this host.
    pub cid: u64,
    /// A QEMU (vhost-user frontend) is connected.
    pub frontend: bool,
    /// The vsock device is initialised and its rings run.
    pub device_running: bool,
    /// Sessions with a working guest end.
    pub sessions_live: u64,
    /// Sessions waiting for the guest end to come back.
    pub sessions_parked: u64,
}

/// A failed admin request.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The socket could not be reached or read/written.
    #[error("admin socket {path}: {what}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// What we were doing.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The reply was not a valid v1 reply.
    #[error("admin socket {path}: bad reply to {op}: {why}")]
    BadReply {
        /// Socket path.
        path: PathBuf,
        /// The request's op.
        op: &'static str,
        /// What was wrong.
        why: String,
    },
    /// domsockd refused the request (`"ok":false`).
    #[error("domsockd refused {op}: {error}")]
    Refused {
        /// The request's op.
        op: &'static str,
        /// Its `error` text.
        error: String,
    },
    /// Any other agent's failure (implementations other than [`AdminSocket`]).
    #[error("{0}")]
    Other(String),
}

/// What the orchestrator asks of the domsockd on one host.
pub trait HostAgent {
    /// Every VM the daemon serves.
    fn status(&mut self) -> Result<Vec<VmStatus>, AgentError>;
    /// Destination, before the move: expect domain `vm` from host `from`.
    fn adopt(&mut self, vm: &str, from: &str) -> Result<(), AgentError>;
    /// Source, after the migration completed: hand `vm`'s parked sessions to host `to`;
    /// returns how many were handed over.
    fn export(&mut self, vm: &str, to: &str) -> Result<u64, AgentError>;
}

impl<T: HostAgent + ?Sized> HostAgent for Box<T> {
    fn status(&mut self) -> Result<Vec<VmStatus>, AgentError> {
        (**self).status()
    }
    fn adopt(&mut self, vm: &str, from: &str) -> Result<(), AgentError> {
        (**self).adopt(vm, from)
    }
    fn export(&mut self, vm: &str, to: &str) -> Result<u64, AgentError> {
        (**self).export(vm, to)
    }
}

/// [`HostAgent`] over domsockd's admin socket: one connection per request.
#[derive(Debug, Clone)]
pub struct AdminSocket {
    path: PathBuf,
    timeout: Duration,
}

impl AdminSocket {
    /// A client of the socket at `path`; every request (connect, write, reply) is bounded by
    /// `timeout`.
    pub fn new(path: &Path, timeout: Duration) -> Self {
        Self {
            path: path.to_path_buf(),
            timeout,
        }
    }

    /// Sends `request` (an object; `v` is added) and returns the `ok:true` reply.
    fn call(&self, op: &'static str, mut request: Value) -> Result<Value, AgentError> {
        let io_err = |what, source| AgentError::Io {
            path: self.path.clone(),
            what,
            source,
        };
        request["v"] = json!(ADMIN_PROTOCOL_VERSION);
        request["op"] = json!(op);
        let mut line = request.to_string();
        line.push('\n');
        let mut stream = UnixStream::connect(&self.path).map_err(|e| io_err("connect", e))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| io_err("set timeouts", e))?;
        stream
            .write_all(line.as_bytes())
            .map_err(|e| io_err("write request", e))?;
        let mut reply = Vec::new();
        BufReader::new(stream.take(MAX_REPLY_BYTES + 1))
            .read_until(b'\n', &mut reply)
            .map_err(|e| io_err("read reply", e))?;
        let bad = |why: String| AgentError::BadReply {
            path: self.path.clone(),
            op,
            why,
        };
        if reply.is_empty() {
            return Err(io_err(
                "read reply",
                io::Error::new(ErrorKind::UnexpectedEof, "closed without a reply"),
            ));
        }
        if !reply.ends_with(b"\n") {
            return Err(bad(format!(
                "no complete line within {MAX_REPLY_BYTES} bytes"
            )));
        }
        parse_reply(op, &reply).map_err(bad)?
    }
}

/// Checks a reply line: JSON object, `v` 1, `ok` bool; `ok:false` becomes
/// [`AgentError::Refused`]. The outer error is "malformed".
fn parse_reply(op: &'static str, line: &[u8]) -> Result<Result<Value, AgentError>, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    match v.get("v").and_then(Value::as_u64) {
        Some(ADMIN_PROTOCOL_VERSION) => {}
        other => return Err(format!("version {other:?}, want {ADMIN_PROTOCOL_VERSION}")),
    }
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(Ok(v)),
        Some(false) => {
            let error = v
                .get("error")
                .and_then(Value::as_str)
                .ok_or("ok:false without an error string")?;
            Ok(Err(AgentError::Refused {
                op,
                error: error.chars().take(1024).collect(),
            }))
        }
        None => Err("no boolean \"ok\"".into()),
    }
}

/// The `vms` array of a status reply.
fn parse_vms(reply: &Value) -> Result<Vec<VmStatus>, String> {
    let vms = reply
        .get("vms")
        .and_then(Value::as_array)
        .ok_or("no \"vms\" array")?;
    vms.iter()
        .enumerate()
        .map(|(i, vm)| {
            let s = |k: &str| {
                vm.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or(format!("vms[{i}].{k}: not a string"))
            };
            let n = |k: &str| {
                vm.get(k)
                    .and_then(Value::as_u64)
                    .ok_or(format!("vms[{i}].{k}: not a non-negative integer"))
            };
            let b = |k: &str| {
                vm.get(k)
                    .and_then(Value::as_bool)
                    .ok_or(format!("vms[{i}].{k}: not a boolean"))
            };
            Ok(VmStatus {
                name: s("name")?,
                namespace: s("namespace")?,
                cid: n("cid")?,
                frontend: b("frontend")?,
                device_running: b("device_running")?,
                sessions_live: n("sessions_live")?,
                sessions_parked: n("sessions_parked")?,
            })
        })
        .collect()
}

impl HostAgent for AdminSocket {
    fn status(&mut self) -> Result<Vec<VmStatus>, AgentError> {
        let reply = self.call("status", json!({}))?;
        parse_vms(&reply).map_err(|why| AgentError::BadReply {
            path: self.path.clone(),
            op: "status",
            why,
        })
    }

    fn adopt(&mut self, vm: &str, from: &str) -> Result<(), AgentError> {
        self.call("adopt", json!({ "vm": vm, "from": from }))
            .map(drop)
    }

    fn export(&mut self, vm: &str, to: &str) -> Result<u64, AgentError> {
        let reply = self.call("export", json!({ "vm": vm, "to": to }))?;
        reply
            .get("sessions")
            .and_then(Value::as_u64)
            .ok_or_else(|| AgentError::BadReply {
                path: self.path.clone(),
                op: "export",
                why: "no non-negative integer \"sessions\"".into(),
            })
    }
}

/// A stand-in domsockd admin server for tests, until domsockd serves the socket itself.
#[cfg(any(test, feature = "test-utils"))]
pub mod fake {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::{self, JoinHandle};
    use std::time::SystemTime;

    /// How the fake answers `status` for its one VM: called per request, returns
    /// `(device_running, sessions_live)`. Tests probe the guest "by other means" here.
    pub type Probe = Box<dyn FnMut() -> (bool, u64) + Send>;

    /// Every request the fake served, in order (op and the whole request).
    #[derive(Debug, Default, Clone)]
    pub struct Log {
        /// `(op, request)` pairs.
        pub requests: Vec<(String, Value)>,
        /// When `status` first said `device_running` (wall clock: to line up with the
        /// orchestrator's `started_unix_ms`).
        pub first_running: Option<SystemTime>,
    }

    /// Serves protocol v1 for one VM at a socket path: `adopt` and `export` succeed and do
    /// nothing (`export` reports `sessions:0`), `status` asks the probe. Stops on drop.
    #[derive(Debug)]
    pub struct FakeAdmin {
        stop: Arc<AtomicBool>,
        log: Arc<Mutex<Log>>,
        thread: Option<JoinHandle<()>>,
        path: PathBuf,
    }

    impl FakeAdmin {
        /// Binds `path` (replacing a stale socket) and serves until dropped.
        ///
        /// # Errors
        /// If the socket cannot be bound.
        pub fn spawn(
            path: &Path,
            vm: &str,
            namespace: &str,
            cid: u64,
            mut probe: Probe,
        ) -> io::Result<Self> {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)?;
            listener.set_nonblocking(true)?;
            let stop = Arc::new(AtomicBool::new(false));
            let log = Arc::new(Mutex::new(Log::default()));
            let (vm, namespace) = (vm.to_owned(), namespace.to_owned());
            let (stop2, log2) = (Arc::clone(&stop), Arc::clone(&log));
            let thread = thread::spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    let conn = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        Err(_) => break,
                    };
                    let _ = serve_one(conn, &vm, &namespace, cid, &mut probe, &log2);
                }
            });
            Ok(Self {
                stop,
                log,
                thread: Some(thread),
                path: path.to_path_buf(),
            })
        }

        /// What was served so far.
        pub fn log(&self) -> Log {
            self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }

        /// How many requests had `op`.
        pub fn count(&self, op: &str) -> usize {
            self.log().requests.iter().filter(|(o, _)| o == op).count()
        }
    }

    fn serve_one(
        conn: UnixStream,
        vm: &str,
        namespace: &str,
        cid: u64,
        probe: &mut Probe,
        log: &Mutex<Log>,
    ) -> io::Result<()> {
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = Vec::new();
        BufReader::new((&conn).take(MAX_REPLY_BYTES)).read_until(b'\n', &mut line)?;
        let req: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
        let op = req
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let reply = if req.get("v").and_then(Value::as_u64) != Some(ADMIN_PROTOCOL_VERSION) {
            json!({"v": 1, "ok": false, "error": "unsupported protocol version"})
        } else {
            match op.as_str() {
                "status" => {
                    let (running, live) = probe();
                    if running {
                        let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                        l.first_running.get_or_insert_with(SystemTime::now);
                    }
                    json!({"v": 1, "ok": true, "vms": [{
                        "name": vm, "namespace": namespace, "cid": cid, "frontend": true,
                        "device_running": running, "sessions_live": live,
                        "sessions_parked": 0,
                    }]})
                }
                "adopt" | "export" if req.get("vm").and_then(Value::as_str) != Some(vm) => {
                    json!({"v": 1, "ok": false, "error": "no such vm"})
                }
                "adopt" => json!({"v": 1, "ok": true}),
                "export" => json!({"v": 1, "ok": true, "sessions": 0}),
                _ => json!({"v": 1, "ok": false, "error": "unknown op"}),
            }
        };
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
            .push((op, req));
        let mut out = reply.to_string();
        out.push('\n');
        (&conn).write_all(out.as_bytes())
    }

    impl Drop for FakeAdmin {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeAdmin;
    use super::*;

    #[test]
    fn client_and_fake_server_speak_v1() {
        let dir = crate::test_dir::TestDir::new("admin");
        let path = dir.path().join("admin.sock");
        let mut calls = 0;
        let fake = FakeAdmin::spawn(
            &path,
            "web",
            "red",
            3,
            Box::new(move || {
                calls += 1;
                (calls > 1, 0)
            }),
        )
        .unwrap();
        let mut c = AdminSocket::new(&path, Duration::from_secs(5));
        c.adopt("web", "a").unwrap();
        assert_eq!(c.export("web", "b").unwrap(), 0);
        let e = c.adopt("db", "a").unwrap_err();
        assert!(
            matches!(&e, AgentError::Refused { op: "adopt", error } if error == "no such vm"),
            "{e}"
        );
        let first = c.status().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].name, "web");
        assert!(!first[0].device_running);
        assert!(c.status().unwrap()[0].device_running);
        assert_eq!(fake.count("status"), 2);
        let log = fake.log();
        assert_eq!(log.requests[0].1["from"], "a");
        assert_eq!(log.requests[1].1["to"], "b");
        assert!(log.first_running.is_some());
    }

    #[test]
    fn malformed_replies_are_rejected() {
        let bad = |line: &str| parse_reply("status", line.as_bytes()).unwrap_err();
        assert!(bad("[1]").contains("object"));
        assert!(bad(r#"{"v":2,"ok":true}"#).contains("version"));
        assert!(bad(r#"{"v":1}"#).contains("ok"));
        assert!(bad(r#"{"v":1,"ok":false}"#).contains("error"));
        assert!(bad("{").contains("JSON"));
        let refused = parse_reply("export", br#"{"v":1,"ok":false,"error":"busy"}"#).unwrap();
        assert!(matches!(refused, Err(AgentError::Refused { error, .. }) if error == "busy"));
        let vm = json!({"vms":[{"name":"a","namespace":"n","cid":3,"frontend":true,
            "device_running":true,"sessions_live":-1,"sessions_parked":0}]});
        assert!(parse_vms(&vm).unwrap_err().contains("sessions_live"));
        assert!(parse_vms(&json!({})).unwrap_err().contains("vms"));
    }

    #[test]
    fn a_server_that_never_ends_its_line_is_cut_off() {
        let dir = crate::test_dir::TestDir::new("admin-long");
        let path = dir.path().join("admin.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let junk = vec![b'x'; (MAX_REPLY_BYTES as usize) + 10];
            let _ = s.write_all(&junk);
        });
        let e = AdminSocket::new(&path, Duration::from_secs(5))
            .status()
            .unwrap_err();
        assert!(matches!(e, AgentError::BadReply { .. }), "{e}");
        t.join().unwrap();
    }
}
