//! The orchestrator against fake QEMUs (QMP over real Unix sockets, state machines behind
//! them) and fake agents: the forward path and every kind of rollback.

use super::*;
use crate::admin::VmStatus;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What a fake QEMU's migration does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MigrateBehaviour {
    /// `migrate` succeeds, `query-migrate` says `active` once, then `completed`.
    Complete,
    /// `query-migrate` says `failed` (as with a wrong port).
    Fail,
}

#[derive(Debug)]
struct QemuState {
    run_state: String,
    device: bool,
    migrate: MigrateBehaviour,
    migration: &'static str,
    queries: u32,
    /// While `inmigrate`: how many more `query-status` calls say so before the state
    /// is loaded and it runs (`None`: never). The first comes from `prepare`.
    loading: Option<u32>,
    /// Every command received, in order.
    commands: Vec<String>,
}

type Shared = Arc<Mutex<QemuState>>;

/// A fake QEMU at `<dir>/<name>.qmp`; returns its state.
fn fake_qemu(
    dir: &Path,
    name: &str,
    run_state: &str,
    device: bool,
    migrate: MigrateBehaviour,
) -> (Shared, PathBuf) {
    let path = dir.join(format!("{name}.qmp"));
    let listener = UnixListener::bind(&path).unwrap();
    let state = Arc::new(Mutex::new(QemuState {
        run_state: run_state.into(),
        device,
        migrate,
        migration: "none",
        queries: 0,
        loading: Some(0),
        commands: Vec::new(),
    }));
    let st = Arc::clone(&state);
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let req: Value = serde_json::from_str(&line).unwrap();
            line.clear();
            let cmd = req["execute"].as_str().unwrap().to_owned();
            let mut q = st.lock().unwrap();
            q.commands.push(cmd.clone());
            let err = |desc: &str| vec![json!({"error": {"class": "GenericError", "desc": desc}})];
            let ok = |v: Value| vec![json!({ "return": v })];
            let out = match cmd.as_str() {
                "qmp_capabilities" => ok(json!({})),
                "query-status" => {
                    let status = q.run_state.clone();
                    if status == "inmigrate" {
                        match q.loading {
                            Some(0) => q.run_state = "running".into(),
                            Some(n) => q.loading = Some(n - 1),
                            None => {}
                        }
                    }
                    ok(json!({"status": status, "running": status == "running"}))
                }
                "qom-list" => {
                    let mut l = vec![json!({"name": "type", "type": "string"})];
                    if q.device {
                        l.push(json!({"name": "vsock0", "type": "child<vhost-user-vsock-pci>"}));
                    }
                    ok(json!(l))
                }
                "device_del" if q.device => {
                    q.device = false;
                    vec![
                        json!({"return": {}}),
                        json!({"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/vsock0/virtio-backend"}}),
                        json!({"event": "DEVICE_DELETED", "data": {"device": "vsock0", "path": "/machine/peripheral/vsock0"}}),
                    ]
                }
                "device_add" if q.device => err("Duplicate device ID 'vsock0'"),
                "device_add" => {
                    q.device = true;
                    ok(json!({}))
                }
                "migrate" => {
                    q.migration = "active";
                    ok(json!({}))
                }
                "query-migrate" => {
                    q.queries += 1;
                    if q.migration == "active" && q.queries > 2 {
                        match q.migrate {
                            MigrateBehaviour::Complete => {
                                q.migration = "completed";
                                q.run_state = "postmigrate".into();
                            }
                            MigrateBehaviour::Fail => q.migration = "failed",
                        }
                    }
                    match q.migration {
                        "none" => ok(json!({})),
                        "completed" => ok(
                            json!({"status": "completed", "total-time": 1200, "downtime": 40, "setup-time": 3, "ram": {"transferred": 106_000_000, "mbps": 650.0}}),
                        ),
                        "failed" => ok(
                            json!({"status": "failed", "error-desc": "Failed to connect to '10.0.0.2:4445': Connection refused"}),
                        ),
                        s => ok(json!({"status": s})),
                    }
                }
                "migrate_cancel" => {
                    q.migration = "cancelled";
                    ok(json!({}))
                }
                "cont" => {
                    q.run_state = "running".into();
                    ok(json!({}))
                }
                "quit" => {
                    q.run_state = "quit".into();
                    ok(json!({}))
                }
                _ => err("unknown command"),
            };
            drop(q);
            for m in out {
                s.write_all(format!("{m}\r\n").as_bytes()).unwrap();
            }
        }
    });
    (state, path)
}

/// An agent whose answers tests set, recording every call.
#[derive(Debug, Default, Clone)]
struct Agent {
    calls: Arc<Mutex<Vec<String>>>,
    /// `status` says the device runs once this many polls happened (`None`: never).
    running_after: Option<u32>,
    polls: Arc<Mutex<u32>>,
    exports: u64,
    fail_adopt: bool,
    live: u64,
}

impl Agent {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn called(&self, call: &str) -> bool {
        self.calls.lock().unwrap().iter().any(|c| c == call)
    }
}

impl HostAgent for Agent {
    fn status(&mut self) -> Result<Vec<VmStatus>, AgentError> {
        self.record("status".into());
        let mut p = self.polls.lock().unwrap();
        *p += 1;
        Ok(vec![VmStatus {
            name: "web".into(),
            namespace: "red".into(),
            cid: 3,
            frontend: true,
            device_running: self.running_after.is_some_and(|n| *p >= n),
            sessions_live: self.live,
            sessions_parked: 0,
        }])
    }
    fn adopt(&mut self, vm: &str, from: &str) -> Result<(), AgentError> {
        self.record(format!("adopt {vm} {from}"));
        if self.fail_adopt {
            return Err(AgentError::Other("adopt refused".into()));
        }
        Ok(())
    }
    fn export(&mut self, vm: &str, to: &str) -> Result<u64, AgentError> {
        self.record(format!("export {vm} {to}"));
        Ok(self.exports)
    }
}

struct Rig {
    _dir: crate::test_dir::TestDir,
    src_q: Shared,
    dst_q: Shared,
    src: Side<Agent>,
    dst: Side<Agent>,
}

fn rig(migrate: MigrateBehaviour, src_agent: Agent, dst_agent: Agent) -> Rig {
    let dir = crate::test_dir::TestDir::new("orch");
    let (src_q, sp) = fake_qemu(dir.path(), "a", "running", true, migrate);
    let (dst_q, dp) = fake_qemu(dir.path(), "b", "inmigrate", false, migrate);
    // prepare sees it inmigrate, and so does the first settle poll.
    dst_q.lock().unwrap().loading = Some(1);
    let t = Duration::from_secs(5);
    let src = Side {
        host: "a".into(),
        qmp: Qmp::connect(&sp, t).unwrap(),
        agent: src_agent,
    };
    let dst = Side {
        host: "b".into(),
        qmp: Qmp::connect(&dp, t).unwrap(),
        agent: dst_agent,
    };
    Rig {
        _dir: dir,
        src_q,
        dst_q,
        src,
        dst,
    }
}

fn plan() -> Plan {
    let mut p = Plan::vsock("web", "tcp:10.0.0.2:4444", "vsock0", "vhu0");
    p.timeouts.confirm = Duration::from_millis(500);
    p.timeouts.settle = Duration::from_millis(300);
    p
}

fn names(steps: &[Step]) -> Vec<&'static str> {
    steps.iter().map(|s| s.name).collect()
}

fn running_after(n: u32) -> Agent {
    Agent {
        running_after: Some(n),
        ..Agent::default()
    }
}

#[test]
fn a_move_runs_every_step_in_order() {
    let mut r = rig(
        MigrateBehaviour::Complete,
        running_after(1),
        running_after(3),
    );
    let rep = migrate(&plan(), &mut r.src, &mut r.dst);
    assert_eq!(rep.outcome, Outcome::Migrated, "{}", rep.to_text());
    assert_eq!(
        names(&rep.steps),
        [
            "prepare",
            "unplug",
            "migrate",
            "settle",
            "export",
            "plug",
            "confirm",
            "quit-source"
        ]
    );
    assert!(rep.rollback.is_empty());
    assert!(rep.steps.iter().all(|s| s.error.is_none()));
    let j = rep.to_json();
    assert_eq!(j["outcome"], "migrated");
    assert_eq!(j["steps"][2]["downtime_ms"], 40);
    assert_eq!(
        j["steps"][3]["polls"], 2,
        "settle waited for the state to load"
    );
    assert_eq!(j["steps"][3]["destination_state"], "running");
    assert_eq!(j["steps"][6]["polls"], 3);
    assert!(j["steps"][1]["ms"].as_f64().is_some());
    assert_eq!(
        *r.dst.agent.calls.lock().unwrap().first().unwrap(),
        "adopt web a"
    );
    assert!(r.src.agent.called("export web b"));
    let s = r.src_q.lock().unwrap();
    assert!(!s.device);
    assert_eq!(s.run_state, "quit");
    let d = r.dst_q.lock().unwrap();
    assert!(d.device, "the destination got the device");
    // device_del strictly before migrate, device_add only on the destination.
    let pos = |c: &str| s.commands.iter().position(|x| x == c).unwrap();
    assert!(pos("device_del") < pos("migrate"));
    assert!(!s.commands.contains(&"device_add".to_owned()));
}

#[test]
fn a_failed_migration_plugs_the_device_back_on_the_source() {
    let mut r = rig(MigrateBehaviour::Fail, running_after(1), running_after(1));
    let rep = migrate(&plan(), &mut r.src, &mut r.dst);
    assert_eq!(rep.outcome, Outcome::RolledBack, "{}", rep.to_text());
    assert_eq!(rep.failed_step().unwrap().name, "migrate");
    assert!(rep
        .failed_step()
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .contains("Connection refused"));
    assert_eq!(
        names(&rep.rollback),
        [
            "cancel-migration",
            "source-resume",
            "source-plug",
            "source-confirm"
        ]
    );
    let s = r.src_q.lock().unwrap();
    assert!(s.device, "device plugged back on the source");
    assert_eq!(s.run_state, "running");
    assert!(!s.commands.contains(&"quit".to_owned()));
    let d = r.dst_q.lock().unwrap();
    assert!(
        !d.commands.contains(&"quit".to_owned()),
        "destination untouched"
    );
    assert!(!d.device);
    assert_eq!(rep.to_json()["failed_step"], "migrate");
}

#[test]
fn a_destination_that_never_confirms_is_quit_and_the_source_resumes() {
    let src = running_after(1);
    let dst = Agent {
        running_after: None,
        exports: 0,
        ..Agent::default()
    };
    let mut src = src;
    src.exports = 2;
    let mut r = rig(MigrateBehaviour::Complete, src, dst);
    let rep = migrate(&plan(), &mut r.src, &mut r.dst);
    assert_eq!(rep.outcome, Outcome::RolledBack, "{}", rep.to_text());
    assert_eq!(rep.failed_step().unwrap().name, "confirm");
    assert_eq!(
        names(&rep.rollback),
        [
            "quit-destination",
            "return-sessions",
            "source-resume",
            "source-plug",
            "source-confirm"
        ]
    );
    let s = r.src_q.lock().unwrap();
    assert_eq!(s.run_state, "running", "cont after postmigrate");
    assert!(s.device);
    assert!(!s.commands.contains(&"quit".to_owned()));
    assert_eq!(r.dst_q.lock().unwrap().run_state, "quit");
    assert!(r.src.agent.called("adopt web b"));
    assert!(r.dst.agent.called("export web a"));
}

#[test]
fn exported_sessions_must_be_live_before_the_move_is_confirmed() {
    let mut src = running_after(1);
    src.exports = 3;
    let dst = Agent {
        running_after: Some(1),
        live: 2,
        ..Agent::default()
    };
    let mut r = rig(MigrateBehaviour::Complete, src, dst);
    let rep = migrate(&plan(), &mut r.src, &mut r.dst);
    assert_eq!(
        rep.failed_step().unwrap().name,
        "confirm",
        "{}",
        rep.to_text()
    );
    assert!(rep
        .failed_step()
        .unwrap()
        .error
        .as_ref()
        .unwrap()
        .contains("sessions_live 2 of 3"));
}

#[test]
fn a_refused_prepare_changes_nothing() {
    let dst = Agent {
        fail_adopt: true,
        ..Agent::default()
    };
    let mut r = rig(MigrateBehaviour::Complete, running_after(1), dst);
    let rep = migrate(&plan(), &mut r.src, &mut r.dst);
    assert_eq!(rep.outcome, Outcome::RolledBack);
    assert_eq!(names(&rep.steps), ["prepare"]);
    assert!(rep.rollback.is_empty());
    let s = r.src_q.lock().unwrap();
    assert!(s.device && s.run_state == "running");
    assert!(!s
        .commands
        .iter()
        .any(|c| c == "device_del" || c == "migrate"));
}

#[test]
fn a_rollback_that_cannot_confirm_is_reported() {
    let src = Agent {
        running_after: None,
        ..Agent::default()
    };
    let mut r = rig(MigrateBehaviour::Fail, src, running_after(1));
    let rep = migrate(&plan(), &mut r.src, &mut r.dst);
    assert_eq!(rep.outcome, Outcome::RollbackFailed, "{}", rep.to_text());
    assert_eq!(rep.to_json()["outcome"], "rollback_failed");
    assert!(rep.rollback.last().unwrap().error.is_some());
}

#[test]
fn the_device_is_plugged_only_once_the_destination_has_loaded_the_state() {
    let mut r = rig(
        MigrateBehaviour::Complete,
        running_after(1),
        running_after(1),
    );
    r.dst_q.lock().unwrap().loading = Some(6);
    let rep = migrate(&plan(), &mut r.src, &mut r.dst);
    assert_eq!(rep.outcome, Outcome::Migrated, "{}", rep.to_text());
    let d = r.dst_q.lock().unwrap();
    // prepare's query-status and six more said inmigrate; device_add came after the one
    // that said running.
    let statuses = d.commands.iter().filter(|c| *c == "query-status").count();
    let add = d.commands.iter().position(|c| c == "device_add").unwrap();
    let last_status = d
        .commands
        .iter()
        .rposition(|c| c == "query-status")
        .unwrap();
    assert!(statuses >= 8, "{:?}", d.commands);
    assert!(last_status < add, "{:?}", d.commands);
    assert_eq!(rep.to_json()["steps"][3]["polls"], 7);
}

#[test]
fn a_destination_that_never_loads_the_state_is_quit_and_the_source_resumes() {
    let mut r = rig(
        MigrateBehaviour::Complete,
        running_after(1),
        running_after(1),
    );
    r.dst_q.lock().unwrap().loading = None;
    let rep = migrate(&plan(), &mut r.src, &mut r.dst);
    assert_eq!(rep.outcome, Outcome::RolledBack, "{}", rep.to_text());
    let failed = rep.failed_step().unwrap();
    assert_eq!(failed.name, "settle");
    assert!(
        failed.error.as_ref().unwrap().contains("still loading"),
        "{failed:?}"
    );
    assert_eq!(
        names(&rep.rollback),
        [
            "quit-destination",
            "source-resume",
            "source-plug",
            "source-confirm"
        ]
    );
    let d = r.dst_q.lock().unwrap();
    assert!(
        !d.commands.contains(&"device_add".to_owned()),
        "never plugged there"
    );
    assert_eq!(d.run_state, "quit");
    let s = r.src_q.lock().unwrap();
    assert_eq!(s.run_state, "running");
    assert!(s.device, "plugged back on the source");
}
