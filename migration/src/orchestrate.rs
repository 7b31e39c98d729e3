//! The whole live migration of one guest with a vhost-user vsock device, over QMP for both
//! QEMUs and the [`HostAgent`] of both domsockd instances, with a timed report of every
//! step and a rollback when a step fails. `domsock migrate` is a thin CLI over [`migrate`].
//!
//! Stock QEMU refuses to migrate a guest while a vhost-user vsock device is plugged, so the
//! device leaves the guest for the move and the destination plugs its own:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant O as orchestrator
//!     participant SQ as source QEMU
//!     participant SD as source domsockd
//!     participant DQ as destination QEMU (-incoming, chardev, no device)
//!     participant DD as destination domsockd
//!     O->>SQ: query-status, qom-list (running, device plugged)
//!     O->>DQ: query-status, qom-list (inmigrate, no device)
//!     O->>DD: adopt {vm, from}
//!     Note over O: prepare
//!     O->>SQ: device_del vsock0
//!     SQ-->>O: DEVICE_DELETED (device: vsock0)
//!     Note over O: unplug
//!     O->>SQ: migrate {uri}
//!     SQ->>DQ: RAM and device state
//!     O->>SQ: query-migrate ... completed (source paused)
//!     Note over O: migrate
//!     O->>DQ: query-status ... not inmigrate (its last state loaded)
//!     Note over O: settle
//!     O->>SD: export {vm, to}
//!     SD-->>O: sessions n
//!     O->>DQ: device_add vhost-user-vsock-pci
//!     O->>DD: status ... device_running, sessions_live >= n
//!     Note over O: plug, confirm
//!     O->>SQ: quit
//! ```
//!
//! # What a failure rolls back
//! The goal of every rollback is the guest running on the source with its vsock device, and
//! nothing lost that the source still holds:
//! - `prepare` fails: nothing was changed (a destination that accepted `adopt` just expects
//!   a domain that never comes).
//! - `unplug` or `migrate` fails (including a timeout, which cancels the migration): the
//!   source never stopped running for good (QEMU resumes a source whose migration failed);
//!   rollback resumes it if it is paused, plugs the device back, and confirms through the
//!   source's domsockd that the device runs. Sessions were never exported, so they resume
//!   on the source like after any unplug.
//! - `settle`, `export`, `plug` or `confirm` fails, after the migration completed: the
//!   source QEMU is paused in `postmigrate` with the guest's whole state as of the
//!   switchover, and the destination runs a copy of it. Rollback quits the destination QEMU
//!   first (so two copies never run), asks the destination's domsockd to hand the exported
//!   sessions back (when any were exported), then `cont`s the source, plugs its device back
//!   and confirms. What
//!   the guest did on the destination between switchover and rollback (at most the plug and
//!   confirm time) is discarded: its memory changes, and anything it wrote to shared
//!   storage or sent over a network in that window, are not undone, and its clock jumps
//!   forward. No vsock byte is lost to the rollback when the destination's device never ran
//!   (the usual reason for `confirm` to fail); bytes of raw (not session) connections the
//!   guest made on the destination are.
//! - `quit-source` fails: the guest runs on the destination; nothing is rolled back and the
//!   outcome is still `migrated` (the paused source must be quit by hand).
//!
//! What this module does not do: start or stop QEMU processes other than by QMP `quit`,
//! choose the destination, or move disks.

use std::fmt::Write as _;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::admin::{AgentError, HostAgent};
use crate::qmp::{Qmp, QmpError};

/// Pause between `query-status` polls of a destination still loading.
const SETTLE_POLL_MS: u64 = 5;
/// Pause between `query-migrate` polls.
const MIGRATE_POLL_MS: u64 = 20;
/// Pause between `status` polls of the confirm steps.
const CONFIRM_POLL_MS: u64 = 10;
/// How long a cancelled migration may take to stop.
const CANCEL_TIMEOUT_MS: u64 = 10_000;

/// One host of the move: its name (as the domsockd instances know each other), its QEMU and
/// its domsockd.
#[derive(Debug)]
pub struct Side<A> {
    /// Host name (`adopt`'s `from`, `export`'s `to`).
    pub host: String,
    /// This host's QEMU of the guest.
    pub qmp: Qmp,
    /// This host's domsockd.
    pub agent: A,
}

/// Bounds of the steps.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Every single QMP command.
    pub qmp: Duration,
    /// `device_del` until `DEVICE_DELETED`.
    pub unplug: Duration,
    /// `migrate` until `completed`.
    pub migrate: Duration,
    /// After that, until the destination has loaded the state (leaves `inmigrate`).
    pub settle: Duration,
    /// `device_add` until domsockd says the device runs (and sessions resumed).
    pub confirm: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            qmp: Duration::from_secs(10),
            unplug: Duration::from_secs(10),
            migrate: Duration::from_secs(120),
            settle: Duration::from_secs(10),
            confirm: Duration::from_secs(10),
        }
    }
}

/// What to move and how.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The domain's name at both domsockd instances.
    pub vm: String,
    /// Where the destination QEMU listens (`-incoming` of it, e.g. `tcp:10.0.0.2:4444`).
    pub migrate_uri: String,
    /// QEMU id of the vsock device on both sides.
    pub device_id: String,
    /// `device_add` arguments on the destination (and on the source, to roll back).
    pub device_args: Value,
    /// Step bounds.
    pub timeouts: Timeouts,
    /// `quit` the source QEMU after a confirmed move (what libvirt does).
    pub quit_source: bool,
}

impl Plan {
    /// A plan with the device and chardev ids of a `vhost-user-vsock-pci` device.
    pub fn vsock(vm: &str, migrate_uri: &str, device_id: &str, chardev_id: &str) -> Self {
        Self {
            vm: vm.to_owned(),
            migrate_uri: migrate_uri.to_owned(),
            device_id: device_id.to_owned(),
            device_args: json!({
                "driver": "vhost-user-vsock-pci",
                "chardev": chardev_id,
                "id": device_id,
            }),
            timeouts: Timeouts::default(),
            quit_source: true,
        }
    }
}

/// How a move ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest runs on the destination with its device, confirmed.
    Migrated,
    /// A step failed; the guest runs on the source with its device again, confirmed.
    RolledBack,
    /// A step failed and so did the rollback: see the report's steps.
    RollbackFailed,
}

impl Outcome {
    /// `migrated`, `rolled_back`, `rollback_failed`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Migrated => "migrated",
            Outcome::RolledBack => "rolled_back",
            Outcome::RollbackFailed => "rollback_failed",
        }
    }
}

/// One timed step.
#[derive(Debug, Clone)]
pub struct Step {
    /// Its name (`prepare`, `unplug`, `migrate`, `export`, `plug`, `confirm`, `quit-source`;
    /// rollback steps: `cancel-migration`, `quit-destination`, `return-sessions`,
    /// `source-resume`, `source-plug`, `source-confirm`).
    pub name: &'static str,
    /// Wall-clock start, milliseconds since the Unix epoch (to line up with other logs).
    pub started_unix_ms: u64,
    /// Duration.
    pub elapsed: Duration,
    /// `None` when it succeeded.
    pub error: Option<String>,
    /// Step-specific numbers and states.
    pub detail: Map<String, Value>,
}

/// Everything [`migrate`] did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The domain.
    pub vm: String,
    /// Source and destination host names.
    pub from: String,
    /// Destination host name.
    pub to: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The forward steps, in order, up to the one that failed.
    pub steps: Vec<Step>,
    /// The rollback steps, if a step failed.
    pub rollback: Vec<Step>,
    /// From start to end, rollback included.
    pub total: Duration,
}

impl Report {
    /// The step that failed, if one did.
    pub fn failed_step(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.error.is_some())
    }

    /// A forward step by name.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The report as one JSON object (`domsock migrate --json`).
    pub fn to_json(&self) -> Value {
        let steps = |v: &[Step]| -> Vec<Value> {
            v.iter()
                .map(|s| {
                    let mut o = Map::new();
                    o.insert("step".into(), json!(s.name));
                    o.insert("ok".into(), json!(s.error.is_none()));
                    o.insert("started_unix_ms".into(), json!(s.started_unix_ms));
                    o.insert("ms".into(), json!(ms(s.elapsed)));
                    if let Some(e) = &s.error {
                        o.insert("error".into(), json!(e));
                    }
                    for (k, v) in &s.detail {
                        o.insert(k.clone(), v.clone());
                    }
                    Value::Object(o)
                })
                .collect()
        };
        let failed = self.failed_step();
        json!({
            "v": 1,
            "vm": self.vm,
            "from": self.from,
            "to": self.to,
            "outcome": self.outcome.name(),
            "failed_step": failed.map(|s| s.name),
            "error": failed.and_then(|s| s.error.clone()),
            "total_ms": ms(self.total),
            "steps": steps(&self.steps),
            "rollback": steps(&self.rollback),
        })
    }

    /// One line per step, for people.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "migrate {} {} -> {}: {} in {:.1} ms\n",
            self.vm,
            self.from,
            self.to,
            self.outcome.name(),
            ms(self.total)
        );
        for (label, list) in [("", &self.steps), ("rollback ", &self.rollback)] {
            for s in list.iter() {
                let _ = write!(out, "  {label}{:<16} {:>9.1} ms", s.name, ms(s.elapsed));
                match &s.error {
                    Some(e) => {
                        let _ = write!(out, "  FAILED: {e}");
                    }
                    None if !s.detail.is_empty() => {
                        let _ = write!(out, "  {}", Value::Object(s.detail.clone()));
                    }
                    None => {}
                }
                out.push('\n');
            }
        }
        out
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A step's failure, with its cause chain in the text.
#[derive(Debug)]
struct StepFailed(String);

impl From<QmpError> for StepFailed {
    fn from(e: QmpError) -> Self {
        StepFailed(chain(&e))
    }
}

impl From<AgentError> for StepFailed {
    fn from(e: AgentError) -> Self {
        StepFailed(chain(&e))
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

/// How far the forward path got: what a rollback must undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reached {
    /// Nothing changed on the source.
    Nothing,
    /// `device_del` was sent.
    Unplugging,
    /// `migrate` was sent.
    Migrating,
    /// The migration completed: the source is paused, the destination runs.
    Completed,
    /// The source's sessions were handed to the destination.
    Exported,
}

/// Records timed steps.
struct Recorder {
    steps: Vec<Step>,
}

impl Recorder {
    fn run<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut Map<String, Value>) -> Result<T, StepFailed>,
    ) -> Result<T, StepFailed> {
        let started_unix_ms = unix_ms();
        let t = Instant::now();
        let mut detail = Map::new();
        let r = f(&mut detail);
        self.steps.push(Step {
            name,
            started_unix_ms,
            elapsed: t.elapsed(),
            error: r.as_ref().err().map(|e| e.0.clone()),
            detail,
        });
        r
    }
}

/// Moves `plan.vm` from `src` to `dst`; on a failed step rolls back as the module doc says.
/// Never panics on what QEMU or domsockd answer; every wait is bounded by `plan.timeouts`.
pub fn migrate<S: HostAgent, D: HostAgent>(
    plan: &Plan,
    src: &mut Side<S>,
    dst: &mut Side<D>,
) -> Report {
    let start = Instant::now();
    let mut fwd = Recorder { steps: Vec::new() };
    let mut reached = Reached::Nothing;
    let mut exported = 0;
    let ok = forward(plan, src, dst, &mut fwd, &mut reached, &mut exported).is_ok();
    let mut back = Recorder { steps: Vec::new() };
    let outcome = if ok {
        Outcome::Migrated
    } else if rollback(plan, src, dst, &mut back, reached, exported) {
        Outcome::RolledBack
    } else {
        Outcome::RollbackFailed
    };
    if ok && plan.quit_source {
        // Not rolled back if it fails: the guest runs on the destination.
        let _ = fwd.run("quit-source", |_| {
            src.qmp.execute("quit", json!({}), plan.timeouts.qmp)?;
            Ok(())
        });
    }
    Report {
        vm: plan.vm.clone(),
        from: src.host.clone(),
        to: dst.host.clone(),
        outcome,
        steps: fwd.steps,
        rollback: back.steps,
        total: start.elapsed(),
    }
}

fn forward<S: HostAgent, D: HostAgent>(
    plan: &Plan,
    src: &mut Side<S>,
    dst: &mut Side<D>,
    rec: &mut Recorder,
    reached: &mut Reached,
    exported: &mut u64,
) -> Result<(), StepFailed> {
    let t = plan.timeouts;
    let id = plan.device_id.as_str();
    rec.run("prepare", |d| {
        let src_state = src.qmp.run_state(t.qmp)?;
        d.insert("source_state".into(), json!(src_state));
        if src_state != "running" {
            return Err(StepFailed(format!(
                "source QEMU is {src_state:?}, not running"
            )));
        }
        if !src.qmp.has_device(id, t.qmp)? {
            return Err(StepFailed(format!("source has no device {id:?}")));
        }
        let mig = src.qmp.execute("query-migrate", json!({}), t.qmp)?;
        if let Some(s) = mig.get("status").and_then(Value::as_str) {
            if !matches!(s, "completed" | "failed" | "cancelled" | "none") {
                return Err(StepFailed(format!("source has a migration in state {s:?}")));
            }
        }
        let dst_state = dst.qmp.run_state(t.qmp)?;
        d.insert("destination_state".into(), json!(dst_state));
        if dst_state != "inmigrate" {
            return Err(StepFailed(format!(
                "destination QEMU is {dst_state:?}, not waiting for an incoming migration"
            )));
        }
        if dst.qmp.has_device(id, t.qmp)? {
            return Err(StepFailed(format!(
                "destination already has a device {id:?} (it must start without it)"
            )));
        }
        dst.agent.adopt(&plan.vm, &src.host)?;
        Ok(())
    })?;

    *reached = Reached::Unplugging;
    rec.run("unplug", |d| {
        let took = src.qmp.unplug(id, t.unplug)?;
        d.insert("device_deleted_ms".into(), json!(ms(took)));
        Ok(())
    })?;

    *reached = Reached::Migrating;
    rec.run("migrate", |d| {
        src.qmp
            .execute("migrate", json!({ "uri": plan.migrate_uri }), t.qmp)?;
        let deadline = Instant::now() + t.migrate;
        let mut polls = 0u64;
        loop {
            let info = src.qmp.execute("query-migrate", json!({}), t.qmp)?;
            polls += 1;
            let status = info
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_owned();
            match status.as_str() {
                "completed" => {
                    for (k, path) in [
                        ("qemu_total_ms", "/total-time"),
                        ("downtime_ms", "/downtime"),
                        ("setup_ms", "/setup-time"),
                        ("transferred_bytes", "/ram/transferred"),
                        ("mbps", "/ram/mbps"),
                    ] {
                        if let Some(v) = info.pointer(path) {
                            d.insert(k.into(), v.clone());
                        }
                    }
                    d.insert("polls".into(), json!(polls));
                    return Ok(());
                }
                "failed" | "cancelled" => {
                    let why = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no error-desc");
                    return Err(StepFailed(format!("migration {status}: {why}")));
                }
                _ if Instant::now() >= deadline => {
                    return Err(StepFailed(format!(
                        "migration still {status:?} after {:?}",
                        t.migrate
                    )));
                }
                _ => thread::sleep(Duration::from_millis(MIGRATE_POLL_MS)),
            }
        }
    })?;
    *reached = Reached::Completed;

    // The source says `completed` when it has sent everything; the destination may still
    // be loading the last device state. A `device_add` then is accepted, but the guest
    // may never see the device (its hot-plug event, it seems, goes under the state loaded
    // after it): found in a fresh-clone CI run, where `plug` found the destination
    // `inmigrate` and `confirm` waited 15 s for a device that never ran.
    rec.run("settle", |d| {
        let deadline = Instant::now() + t.settle;
        let mut polls = 0u64;
        loop {
            let state = dst.qmp.run_state(t.qmp)?;
            polls += 1;
            if state != "inmigrate" {
                d.insert("destination_state".into(), json!(state));
                d.insert("polls".into(), json!(polls));
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StepFailed(format!(
                    "the destination is still loading the migration (inmigrate) {:?} after the source completed",
                    t.settle
                )));
            }
            thread::sleep(Duration::from_millis(SETTLE_POLL_MS));
        }
    })?;

    rec.run("export", |d| {
        *exported = src.agent.export(&plan.vm, &dst.host)?;
        d.insert("sessions".into(), json!(*exported));
        Ok(())
    })?;
    *reached = Reached::Exported;

    rec.run("plug", |d| {
        let state = dst.qmp.run_state(t.qmp)?;
        d.insert("destination_state".into(), json!(state));
        if state == "paused" {
            dst.qmp.execute("cont", json!({}), t.qmp)?;
        }
        dst.qmp.plug(plan.device_args.clone(), t.qmp)?;
        Ok(())
    })?;

    rec.run("confirm", |d| {
        confirm(&mut dst.agent, &plan.vm, *exported, t.confirm, d)
    })?;
    Ok(())
}

/// Polls `agent`'s status until `vm`'s device runs with at least `sessions` live sessions.
fn confirm<A: HostAgent>(
    agent: &mut A,
    vm: &str,
    sessions: u64,
    timeout: Duration,
    d: &mut Map<String, Value>,
) -> Result<(), StepFailed> {
    let deadline = Instant::now() + timeout;
    let mut polls = 0u64;
    let last = loop {
        polls += 1;
        let seen = match agent.status() {
            Ok(vms) => match vms.into_iter().find(|v| v.name == vm) {
                Some(v) if v.device_running && v.sessions_live >= sessions => {
                    d.insert("polls".into(), json!(polls));
                    d.insert("sessions_live".into(), json!(v.sessions_live));
                    return Ok(());
                }
                Some(v) => format!(
                    "device_running {}, sessions_live {} of {sessions}",
                    v.device_running, v.sessions_live
                ),
                None => format!("domsockd does not know {vm:?}"),
            },
            Err(e) => chain(&e),
        };
        if Instant::now() >= deadline {
            break seen;
        }
        thread::sleep(Duration::from_millis(CONFIRM_POLL_MS));
    };
    d.insert("polls".into(), json!(polls));
    Err(StepFailed(format!(
        "not confirmed within {timeout:?}: {last}"
    )))
}

/// Undoes what `reached` says was done; true when the guest runs on the source with its
/// device again, confirmed.
fn rollback<S: HostAgent, D: HostAgent>(
    plan: &Plan,
    src: &mut Side<S>,
    dst: &mut Side<D>,
    rec: &mut Recorder,
    reached: Reached,
    exported: u64,
) -> bool {
    let t = plan.timeouts;
    if reached == Reached::Nothing {
        return true;
    }
    let mut ok = true;
    if reached == Reached::Migrating {
        ok &= rec
            .run("cancel-migration", |d| {
                let info = src.qmp.execute("query-migrate", json!({}), t.qmp)?;
                let status = info.get("status").and_then(Value::as_str).unwrap_or("none");
                d.insert("status".into(), json!(status));
                if matches!(status, "failed" | "cancelled" | "none") {
                    return Ok(());
                }
                src.qmp.execute("migrate_cancel", json!({}), t.qmp)?;
                let deadline = Instant::now() + Duration::from_millis(CANCEL_TIMEOUT_MS);
                loop {
                    let info = src.qmp.execute("query-migrate", json!({}), t.qmp)?;
                    let s = info.get("status").and_then(Value::as_str).unwrap_or("none");
                    if matches!(s, "cancelled" | "failed" | "none") {
                        d.insert("status".into(), json!(s));
                        return Ok(());
                    }
                    if s == "completed" {
                        // Too late to cancel: the rollback of a completed migration follows.
                        return Err(StepFailed(
                            "the migration completed before the cancel".into(),
                        ));
                    }
                    if Instant::now() >= deadline {
                        return Err(StepFailed(format!("migration still {s:?} after cancel")));
                    }
                    thread::sleep(Duration::from_millis(MIGRATE_POLL_MS));
                }
            })
            .is_ok();
    }
    let completed = reached >= Reached::Completed
        || matches!(src.qmp.run_state(t.qmp).as_deref(), Ok("postmigrate"));
    if completed {
        ok &= rec
            .run("quit-destination", |_| {
                dst.qmp.execute("quit", json!({}), t.qmp)?;
                Ok(())
            })
            .is_ok();
    }
    if reached >= Reached::Exported && exported > 0 {
        ok &= rec
            .run("return-sessions", |d| {
                src.agent.adopt(&plan.vm, &dst.host)?;
                let n = dst.agent.export(&plan.vm, &src.host)?;
                d.insert("sessions".into(), json!(n));
                Ok(())
            })
            .is_ok();
    }
    ok &= rec
        .run("source-resume", |d| {
            let state = src.qmp.run_state(t.qmp)?;
            d.insert("source_state".into(), json!(state));
            if state != "running" {
                src.qmp.execute("cont", json!({}), t.qmp)?;
            }
            Ok(())
        })
        .is_ok();
    ok &= rec
        .run("source-plug", |d| {
            let present = src.qmp.has_device(&plan.device_id, t.qmp)?;
            d.insert("was_plugged".into(), json!(present));
            if !present {
                src.qmp.plug(plan.device_args.clone(), t.qmp)?;
            }
            Ok(())
        })
        .is_ok();
    ok &= rec
        .run("source-confirm", |d| {
            confirm(&mut src.agent, &plan.vm, 0, t.confirm, d)
        })
        .is_ok();
    ok
}

#[cfg(test)]
mod tests;
