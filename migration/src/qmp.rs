//! A small client of QMP, QEMU's JSON control protocol, over a `-qmp unix:<path>` socket:
//! capabilities negotiation, commands, and waiting for events. Every call is bounded by a
//! timeout. Used by the migration orchestrator ([`crate::orchestrate`]) and the VM tests.
//! It does not start QEMU or know any device but by the id it is given.
//!
//! QMP is line-oriented here: QEMU writes one JSON object per line, a command's reply
//! (`{"return": ...}` or `{"error": {"class", "desc"}}`) or an event (`{"event": NAME,
//! "data": ...}`). Events that arrive while a command waits for its reply are kept, in
//! order, for [`Qmp::wait_event`].
//!
//! Hot-plug in QEMU 10.0 (measured): `device_del` returns at once; the device is gone when
//! `DEVICE_DELETED` with `"device": <id>` arrives (0.1-0.4 s under TCG, ACPI hot-unplug
//! needs no guest userspace). An earlier `DEVICE_DELETED` names only the path of the
//! device's `virtio-backend` child and must not be taken for it.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

/// Pause between attempts while QEMU has not created its QMP socket yet.
const CONNECT_RETRY_MS: u64 = 10;
/// Events kept for [`Qmp::wait_event`] while commands run; older ones are dropped first.
const MAX_KEPT_EVENTS: usize = 1024;

/// What went wrong talking to QEMU.
#[derive(Debug, Error)]
pub enum QmpError {
    /// Connecting to the QMP socket failed (after retrying until the timeout).
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O while {what}")]
    Io {
        /// What we were doing.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Nothing matching arrived in time.
    #[error("QMP: no {what} within {after:?}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// The timeout.
        after: Duration,
    },
    /// QEMU closed the socket.
    #[error("QMP socket closed while {what}")]
    Closed {
        /// What we were doing.
        what: String,
    },
    /// A line that is not a JSON object.
    #[error("QMP sent something that is not a JSON object: {line:?}")]
    BadMessage {
        /// The line.
        line: String,
    },
    /// The command failed.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// Command name.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's message.
        desc: String,
    },
}

/// A negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not complete yet (a read timed out inside it).
    partial: Vec<u8>,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects to `path` (retrying until QEMU has created it, at most `timeout`), reads the
    /// greeting and leaves capabilities negotiation mode (`qmp_capabilities`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                        && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(CONNECT_RETRY_MS));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let writer = stream.try_clone().map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message("reading the greeting", deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::BadMessage {
                line: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities", json!({}), timeout)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value; events that arrive
    /// meanwhile are kept for [`Qmp::wait_event`].
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        let what = format!("running {command}");
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        self.writer
            .set_write_timeout(Some(timeout))
            .and_then(|()| self.writer.write_all(line.as_bytes()))
            .map_err(|source| QmpError::Io {
                what: what.clone(),
                source,
            })?;
        loop {
            let mut m = self.read_message(&what, deadline)?;
            if m.get("event").is_some() {
                if self.events.len() >= MAX_KEPT_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(m);
            } else if let Some(r) = m.get_mut("return") {
                return Ok(r.take());
            } else if let Some(e) = m.get("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            } else {
                return Err(QmpError::BadMessage {
                    line: m.to_string(),
                });
            }
        }
    }

    /// The first event (kept or new) for which `matches` holds, within `timeout`; the
    /// events before it are dropped.
    pub fn wait_event(
        &mut self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        while let Some(e) = self.events.pop_front() {
            if matches(&e) {
                return Ok(e);
            }
        }
        let doing = format!("waiting for {what}");
        loop {
            let m = match self.read_message(&doing, deadline) {
                Err(QmpError::Timeout { .. }) => {
                    return Err(QmpError::Timeout {
                        what: what.to_owned(),
                        after: timeout,
                    })
                }
                other => other?,
            };
            if m.get("event").is_some() && matches(&m) {
                return Ok(m);
            }
        }
    }

    /// `device_del` of `id`, then waits for its `DEVICE_DELETED` (the one that names
    /// `id`). Returns how long the removal took.
    pub fn unplug(&mut self, id: &str, timeout: Duration) -> Result<Duration, QmpError> {
        let t = Instant::now();
        self.execute("device_del", json!({ "id": id }), timeout)?;
        let left = timeout.saturating_sub(t.elapsed());
        self.wait_event(&format!("DEVICE_DELETED of {id}"), left, |e| {
            is_device_deleted(e, id)
        })?;
        Ok(t.elapsed())
    }

    /// `device_add` with `arguments` (`driver`, `id`, ...).
    pub fn plug(&mut self, arguments: Value, timeout: Duration) -> Result<(), QmpError> {
        self.execute("device_add", arguments, timeout).map(drop)
    }

    /// QEMU's run state (`query-status`): `running`, `paused`, `inmigrate`, `postmigrate`,
    /// `finish-migrate`, ...
    pub fn run_state(&mut self, timeout: Duration) -> Result<String, QmpError> {
        let r = self.execute("query-status", json!({}), timeout)?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| QmpError::BadMessage {
                line: r.to_string(),
            })
    }

    /// Whether a device with the id `id` is plugged (`/machine/peripheral/<id>` exists).
    pub fn has_device(&mut self, id: &str, timeout: Duration) -> Result<bool, QmpError> {
        let r = self.execute(
            "qom-list",
            json!({ "path": "/machine/peripheral" }),
            timeout,
        )?;
        let list = r.as_array().ok_or_else(|| QmpError::BadMessage {
            line: r.to_string(),
        })?;
        Ok(list
            .iter()
            .any(|p| p.get("name").and_then(Value::as_str) == Some(id)))
    }

    /// Reads one message, waiting until `deadline`.
    fn read_message(&mut self, what: &str, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.to_owned(),
                    after: Duration::ZERO,
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|source| QmpError::Io {
                    what: what.to_owned(),
                    source,
                })?;
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        what: what.to_owned(),
                    })
                }
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    return parse_message(&line);
                }
                // EOF inside a line: the next read says 0.
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(QmpError::Io {
                        what: what.to_owned(),
                        source,
                    })
                }
            }
        }
    }
}

/// Whether `event` is the `DEVICE_DELETED` of the device `id` itself (not of a child).
pub fn is_device_deleted(event: &Value, id: &str) -> bool {
    event.get("event").and_then(Value::as_str) == Some("DEVICE_DELETED")
        && event.pointer("/data/device").and_then(Value::as_str) == Some(id)
}

fn parse_message(line: &[u8]) -> Result<Value, QmpError> {
    let text = String::from_utf8_lossy(line);
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(v) if v.is_object() => Ok(v),
        _ => Err(QmpError::BadMessage {
            line: text.trim().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greets, answers commands from a script, and sends events in between.
    pub(crate) fn fake_qemu(
        script: Vec<(&'static str, Vec<&'static str>)>,
    ) -> (crate::test_dir::TestDir, PathBuf) {
        let dir = crate::test_dir::TestDir::new("qmp");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\r\n")
                .unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            for (expect, answers) in script {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                assert!(line.contains(expect), "{line:?} is not {expect}");
                for a in answers {
                    // Split a line in two writes: a reader must join them.
                    let (x, y) = a.split_at(a.len() / 2);
                    s.write_all(x.as_bytes()).unwrap();
                    thread::sleep(Duration::from_millis(5));
                    s.write_all(y.as_bytes()).unwrap();
                    s.write_all(b"\r\n").unwrap();
                }
            }
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        (dir, path)
    }

    #[test]
    fn unplug_waits_for_the_event_that_names_the_device() {
        let (_d, path) = fake_qemu(vec![
            ("qmp_capabilities", vec![r#"{"return": {}}"#]),
            (
                "device_del",
                vec![
                    r#"{"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/vsock0/virtio-backend"}}"#,
                    r#"{"return": {}}"#,
                    r#"{"event": "DEVICE_DELETED", "data": {"device": "vsock0", "path": "/machine/peripheral/vsock0"}}"#,
                ],
            ),
            (
                "device_add",
                vec![r#"{"error": {"class": "GenericError", "desc": "Duplicate device ID"}}"#],
            ),
        ]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        q.unplug("vsock0", Duration::from_secs(5)).unwrap();
        let e = q
            .plug(
                json!({"driver": "x", "id": "vsock0"}),
                Duration::from_secs(5),
            )
            .unwrap_err();
        assert!(
            matches!(&e, QmpError::Command { class, desc, .. }
                if class == "GenericError" && desc == "Duplicate device ID"),
            "{e}"
        );
    }

    #[test]
    fn events_kept_during_a_command_are_bounded_oldest_first() {
        let mut answers: Vec<&'static str> = (0..MAX_KEPT_EVENTS + 5)
            .map(|i| &*format!(r#"{{"event": "E", "data": {{"i": {i}}}}}"#).leak())
            .collect();
        answers.push(r#"{"return": {}}"#);
        let (_d, path) = fake_qemu(vec![
            ("qmp_capabilities", vec![r#"{"return": {}}"#]),
            ("stop", answers),
        ]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        q.execute("stop", json!({}), Duration::from_secs(20))
            .unwrap();
        assert_eq!(q.events.len(), MAX_KEPT_EVENTS);
        let first = q
            .wait_event("any", Duration::from_secs(1), |_| true)
            .unwrap();
        assert_eq!(
            first.pointer("/data/i"),
            Some(&json!(5)),
            "the 5 oldest were dropped"
        );
    }

    #[test]
    fn waiting_for_an_event_that_never_comes_times_out() {
        let (_d, path) = fake_qemu(vec![("qmp_capabilities", vec![r#"{"return": {}}"#])]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let t = Instant::now();
        let e = q
            .wait_event("nothing", Duration::from_millis(100), |_| true)
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn child_deleted_events_are_not_the_device() {
        let child =
            json!({"event": "DEVICE_DELETED", "data": {"path": "/x/vsock0/virtio-backend"}});
        let dev = json!({"event": "DEVICE_DELETED", "data": {"device": "vsock0", "path": "/x"}});
        assert!(!is_device_deleted(&child, "vsock0"));
        assert!(is_device_deleted(&dev, "vsock0"));
        assert!(!is_device_deleted(&dev, "vsock1"));
    }
}
