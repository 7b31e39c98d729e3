//! The relayed-session rows: one session whose guest runs on another host than its host
//! end, its bytes crossing the domsockd tunnel, against a plain rustls TLS stream between
//! the same two hosts, and the same kind of session with its guest at home.
//!
//! Two "hosts" of [`crate::hosts::Hosts`] (network namespaces on one bridge, each with its
//! own domsockd and runtime directory). Host a serves domains `g` and `h`, host b serves
//! `g`; a host process on a listens on one port for both. Guest `h` opens a session there
//! and stays (the **home** session: the local ring path). Guest `g` opens one too, goes
//! away and comes back on b, as `domsock migrate` moves it (adopt on b, export from a, the
//! guest on b resumes): its session is **relayed** (b's engine and guest relay, the TLS
//! tunnel, a's home relay, the host process). Both guests are this process's user-space
//! drivers (native speed), connected to each host's vhost-user socket.
//!
//! Each round measures, one after the other: TLS b -> a (the direction a relayed
//! guest->host byte crosses), both sessions guest->host, both host->guest; the median
//! round of each row is reported. A measurement writes 64 KiB writes for the plan's
//! duration and stops the clock when the receiver has counted every byte.
//!
//! Needs root (`ip netns`); without it the section says so and has no rows.

use super::tunnel::{self, rows_table, Measured, Report, Row};
use super::vsock::read_session_frame;
use super::Plan;
use crate::hosts::{ConfiguredVm, DaemonConfig, Hosts};
use crate::tmp::TempDir;
use domsock_guest::uvirtio::{
    Cid, ConnKey, GuestConfig, Port, SockError, SocketType, UserGuest, VsockAddr,
};
use domsock_host::test_utils::Process;
use domsock_migration::session::proof::ResumeClaim;
use domsock_migration::session::wire::{Closed, Frame};
use domsock_migration::session::{Nonce, Secret, SessionId, SESSION_PORT};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const WRITE_BYTES: usize = 64 << 10;
/// A transfer without progress for this long failed.
const STALL: Duration = Duration::from_secs(10);
const HOST_CID: u64 = 2;
const CID_G: u32 = 3;
const CID_H: u32 = 4;
const TARGET_PORT: u32 = 5900;
const TUNNEL_PORT: u16 = 47_100;
const TLS_PORT: u16 = 47_101;

/// The relayed-session section's table (its report is a [`tunnel::Report`]: link, rows,
/// rounds), with the ratios.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "one session relayed through the tunnel ({}), 64 KiB writes, median of {} rounds \
         (a ratio: the median of each round's own); {}",
        r.link,
        r.rounds,
        super::steal_text(r.steal)
    );
    rows_table(&mut out, &r.rows, 52, "CPU s/GiB");
    let _ = writeln!(
        out,
        "relayed/tls g->h {}, h->g {} (target >= 0.80x); relayed/home g->h {}, h->g {}",
        r.ratio("relayed_g2h", "tls_ba"),
        r.ratio("relayed_h2g", "tls_ba"),
        r.ratio("relayed_g2h", "home_g2h"),
        r.ratio("relayed_h2g", "home_h2g"),
    );
    out
}

/// One session as its guest and its host process hold it.
struct Session {
    guest: UserGuest,
    key: ConnKey,
    host: UnixStream,
}

/// What a guest must keep to resume its session elsewhere.
struct Resumable {
    id: SessionId,
    secret: Secret,
    nonce: Nonce,
}

/// Both hosts, their daemons and the two sessions.
struct Rig {
    hosts: Hosts,
    // Stopped (by PID, on drop) before `hosts` deletes the namespaces.
    daemons: Vec<Process>,
    home: Session,
    relayed: Session,
    _logs: TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.daemons.clear();
    }
}

/// Runs the section.
pub fn run_all(plan: &Plan) -> Report {
    let rig = match Rig::start() {
        Ok(r) => r,
        Err(e) => {
            return Report {
                link: format!("not run: {e}"),
                ..Report::default()
            }
        }
    };
    let link = format!(
        "host b {} -> host a {} over a bridge, domsockd on each",
        rig.hosts.host("b").ip,
        rig.hosts.host("a").ip
    );
    let mut rig = rig;
    let labels: [(&str, &str); 5] = [
        ("rustls TLS 1.3, 1 stream, b -> a", "tls_ba"),
        ("session at home, guest -> host", "home_g2h"),
        ("session relayed b -> a, guest -> host", "relayed_g2h"),
        ("session at home, host -> guest", "home_h2g"),
        ("session relayed a -> b, host -> guest", "relayed_h2g"),
    ];
    let repeats = plan.repeats.max(if plan.repeats > 1 { 5 } else { 1 });
    let mut runs: Vec<Vec<Result<Measured, String>>> = vec![Vec::new(); labels.len()];
    let steal = super::StealMeter::start();
    for round in 0..repeats {
        for (i, (label, key)) in labels.iter().enumerate() {
            if !super::row_wanted(key) {
                continue;
            }
            let r = match *key {
                "tls_ba" => rig.tls(plan.duration),
                k => {
                    // The CPU both domsockd spent on the session (the guests' drivers and
                    // the host process are not counted).
                    let before = rig.daemons_cpu();
                    let moved = match k {
                        "home_g2h" => guest_to_host(&mut rig.home, plan.duration),
                        "relayed_g2h" => guest_to_host(&mut rig.relayed, plan.duration),
                        "home_h2g" => host_to_guest(&mut rig.home, plan.duration),
                        _ => host_to_guest(&mut rig.relayed, plan.duration),
                    };
                    moved.map(|(bytes, secs)| {
                        Measured::new(bytes as f64, secs, Some(rig.daemons_cpu() - before))
                    })
                }
            };
            eprintln!("  round {round} {label}: {r:?}");
            runs[i].push(r);
        }
    }
    let rows = labels
        .iter()
        .zip(runs)
        .map(|((label, key), results)| Row::median(label, key, results))
        .collect();
    Report {
        link,
        rows,
        rounds: repeats,
        steal: steal.share(),
    }
}

fn vm(cid: u32, name: &str) -> ConfiguredVm {
    ConfiguredVm {
        cid,
        name: name.into(),
        namespace: "default".into(),
        groups: Vec::new(),
    }
}

fn admin_ok(hosts: &Hosts, host: &str, op: &str, fields: Value) -> Result<Value, String> {
    let r = hosts
        .host(host)
        .admin(op, fields)
        .map_err(|e| format!("{host} admin {op}: {e}"))?;
    if r["ok"] == true {
        Ok(r)
    } else {
        Err(format!("{host} admin {op}: {r}"))
    }
}

impl Rig {
    fn start() -> Result<Rig, String> {
        let hosts = Hosts::new(&["a", "b"]).map_err(|e| format!("hosts: {e}"))?;
        let logs = TempDir::new("bench-relayed").map_err(|e| format!("temp dir: {e}"))?;
        let daemon = |vms| DaemonConfig {
            vms,
            admin: true,
            tunnel_port: Some(TUNNEL_PORT),
            tables: "[policy]\nguest-to-host = \"allow\"\n".to_owned(),
        };
        let daemons = vec![
            hosts.spawn_domsockd_config(
                "a",
                &daemon(vec![vm(CID_G, "g"), vm(CID_H, "h")]),
                logs.path(),
            ),
            hosts.spawn_domsockd_config("b", &daemon(vec![vm(CID_G, "g")]), logs.path()),
        ];
        for h in ["a", "b"] {
            wait(&format!("tunnel of {h} up"), || {
                let t = hosts.host(h).tunnel_status().map_err(|e| e.to_string())?;
                Ok(t["peers"][0]["up"] == true)
            })?;
        }
        let a = hosts.host("a");
        let uds = a.local_spec(CID_G).uds;
        let path = format!("{}_{TARGET_PORT}", uds.display());
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| format!("listen {path}: {e}"))?;
        let uds_h = a.local_spec(CID_H).uds;
        let path_h = format!("{}_{TARGET_PORT}", uds_h.display());
        let _ = std::fs::remove_file(&path_h);
        let listener_h =
            UnixListener::bind(&path_h).map_err(|e| format!("listen {path_h}: {e}"))?;

        let mut gh = guest(&a.local_spec(CID_H).socket, CID_H)?;
        let (key, _) = open_session(&mut gh, TARGET_PORT)?;
        let host = accept(&listener_h)?;
        let home = Session {
            guest: gh,
            key,
            host,
        };

        let mut gg = guest(&a.local_spec(CID_G).socket, CID_G)?;
        let (_, mut resumable) = open_session(&mut gg, TARGET_PORT)?;
        let host = accept(&listener)?;
        // The move, as `domsock migrate` makes it: the destination adopts the domain, the
        // source's frontend goes away (its session parks), the source exports it.
        admin_ok(&hosts, "b", "adopt", json!({"vm": "g", "from": "a"}))?;
        drop(gg);
        wait("g's session parked and exported to b", || {
            let r = admin_ok(&hosts, "a", "export", json!({"vm": "g", "to": "b"}))?;
            Ok(r["sessions"].as_u64().unwrap_or(0) > 0)
        })?;
        let b = hosts.host("b");
        let mut gg = guest(&b.local_spec(CID_G).socket, CID_G)?;
        let key = resume(&mut gg, &mut resumable)?;
        let relayed = Session {
            guest: gg,
            key,
            host,
        };
        Ok(Rig {
            hosts,
            daemons,
            home,
            relayed,
            _logs: logs,
        })
    }

    /// CPU time of both domsockd so far.
    fn daemons_cpu(&self) -> Duration {
        self.daemons.iter().map(Process::cpu_time).sum()
    }

    /// One TLS stream from host b to host a (the bench's own roles, same certificates
    /// and rustls configuration as the tunnel rows).
    fn tls(&self, duration: Duration) -> Result<Measured, String> {
        let a = self.hosts.host("a");
        let b = self.hosts.host("b");
        let addr = SocketAddr::from((a.ip, TLS_PORT));
        tunnel::tls_between(
            &a.wrapper(),
            &b.wrapper(),
            &self.hosts.pki_dir(),
            addr,
            duration,
        )
    }
}

/// Polls `done` every 20 ms until it says yes, for at most [`STALL`].
fn wait(what: &str, mut done: impl FnMut() -> Result<bool, String>) -> Result<(), String> {
    let deadline = Instant::now() + STALL;
    let mut last = String::new();
    while Instant::now() < deadline {
        match done() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{what}: timed out {last}"))
}

fn guest(socket: &std::path::Path, cid: u32) -> Result<UserGuest, String> {
    UserGuest::connect(socket, GuestConfig::with_cid(Cid(u64::from(cid))))
        .map_err(|e| format!("guest {cid} on {}: {e}", socket.display()))
}

fn accept(l: &UnixListener) -> Result<UnixStream, String> {
    crate::host::accept(l, STALL, STALL).map_err(|e| format!("host accept: {e}"))
}

fn session_port(g: &mut UserGuest) -> Result<ConnKey, String> {
    g.connect_timeout(
        VsockAddr::new(Cid(HOST_CID), Port(SESSION_PORT.0)),
        SocketType::Stream,
        STALL,
    )
    .map_err(|e| format!("guest connect to the session port: {e}"))
}

fn open_session(g: &mut UserGuest, port: u32) -> Result<(ConnKey, Resumable), String> {
    let key = session_port(g)?;
    let open = Frame::Open {
        cid: Cid(HOST_CID),
        port: Port(port),
        socket_type: SocketType::Stream,
    };
    g.write_all(key, &open.encode(), STALL)
        .map_err(|e| format!("OPEN: {e}"))?;
    match read_session_frame(g, key)? {
        Frame::Opened {
            id,
            secret,
            next_nonce,
            ..
        } => Ok((
            key,
            Resumable {
                id,
                secret,
                nonce: next_nonce,
            },
        )),
        other => Err(format!("expected OPENED, got {other:?}")),
    }
}

/// Resumes `s` (nothing was sent or received on it yet) on `g`'s device.
fn resume(g: &mut UserGuest, s: &mut Resumable) -> Result<ConnKey, String> {
    let key = session_port(g)?;
    let claim = ResumeClaim {
        id: s.id,
        server_nonce: s.nonce,
        client_nonce: Nonce([0x5a; 16]),
        received: 0,
        closed: Closed::default(),
    };
    let frame = Frame::Resume {
        id: s.id,
        client_nonce: claim.client_nonce,
        received: 0,
        closed: claim.closed,
        proof: claim.prove(&s.secret),
    };
    g.write_all(key, &frame.encode(), STALL)
        .map_err(|e| format!("RESUME: {e}"))?;
    match read_session_frame(g, key)? {
        Frame::Resumed { next_nonce, .. } => {
            s.nonce = next_nonce;
            Ok(key)
        }
        other => Err(format!("expected RESUMED, got {other:?}")),
    }
}

/// Reads from `s` until `target` is known and reached; the instant the last byte came.
fn host_count(s: &mut UnixStream, target: &mpsc::Receiver<u64>) -> Result<(u64, Instant), String> {
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 << 10];
    let (mut got, mut want) = (0u64, None);
    let mut last = Instant::now();
    loop {
        if want.is_none() {
            want = target.try_recv().ok();
        }
        if want.is_some_and(|w| got >= w) {
            return Ok((got, last));
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("host process read EOF after {got} bytes")),
            Ok(n) => {
                got += n as u64;
                last = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if last.elapsed() > STALL {
                    return Err(format!("host receive stalled after {got} bytes"));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("host read after {got} bytes: {e}")),
        }
    }
}

/// The guest writes for `duration`; the bytes and the seconds until the host process had
/// every one.
fn guest_to_host(s: &mut Session, duration: Duration) -> Result<(u64, f64), String> {
    let mut host = s.host.try_clone().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || host_count(&mut host, &rx));
    let buf = vec![0xa5u8; WRITE_BYTES];
    let start = Instant::now();
    let mut total = 0u64;
    let mut blocked_since: Option<Instant> = None;
    let sent = loop {
        if Instant::now() >= start + duration {
            break Ok(total);
        }
        let mut off = 0;
        while off < buf.len() {
            match s.guest.send(s.key, &buf[off..]) {
                Ok(n) => {
                    off += n;
                    blocked_since = None;
                }
                Err(SockError::WouldBlock) => {
                    let since = *blocked_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STALL {
                        break;
                    }
                    let _ = s.guest.poll(Some(Duration::from_millis(50)));
                }
                Err(e) => return Err(format!("guest send after {total} bytes: {e}")),
            }
        }
        if off < buf.len() {
            break Err(format!("guest send stalled after {total} bytes"));
        }
        total += WRITE_BYTES as u64;
    };
    // A failed send still lets the reader end: it waits for what was sent.
    let _ = tx.send(total);
    // Keep the guest's device serviced while the host drains the path.
    let result = loop {
        if reader.is_finished() {
            break reader.join().map_err(|_| "reader panicked".to_string())?;
        }
        let _ = s.guest.poll(Some(Duration::from_millis(5)));
    };
    let sent = sent?;
    let (got, last) = result?;
    if got != sent {
        return Err(format!("sent {sent}, host process read {got}"));
    }
    Ok((sent, (last - start).as_secs_f64()))
}

/// The host process writes for `duration`; the bytes and the seconds until the guest had
/// every one.
fn host_to_guest(s: &mut Session, duration: Duration) -> Result<(u64, f64), String> {
    let mut host = s.host.try_clone().map_err(|e| e.to_string())?;
    host.set_write_timeout(Some(STALL))
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let writer = thread::spawn(move || -> Result<u64, String> {
        let buf = vec![0x5au8; WRITE_BYTES];
        let mut total = 0u64;
        while Instant::now() < start + duration {
            host.write_all(&buf)
                .map_err(|e| format!("host write after {total} bytes: {e}"))?;
            total += WRITE_BYTES as u64;
        }
        Ok(total)
    });
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    let mut want: Option<u64> = None;
    let mut writer = Some(writer);
    let mut blocked_since: Option<Instant> = None;
    loop {
        if want.is_none() && writer.as_ref().is_some_and(|w| w.is_finished()) {
            let w = writer.take().expect("writer");
            want = Some(w.join().map_err(|_| "writer panicked".to_string())??);
        }
        if want.is_some_and(|w| got >= w) {
            break;
        }
        match s.guest.recv(s.key, &mut buf) {
            Ok(0) => return Err(format!("guest read EOF after {got} bytes")),
            Ok(n) => {
                got += n as u64;
                blocked_since = None;
            }
            Err(SockError::WouldBlock) => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > STALL {
                    return Err(format!("guest receive stalled after {got} bytes"));
                }
                let _ = s.guest.poll(Some(Duration::from_millis(5)));
            }
            Err(e) => return Err(format!("guest receive after {got} bytes: {e}")),
        }
    }
    let elapsed = start.elapsed();
    match want {
        Some(w) if w == got => Ok((got, elapsed.as_secs_f64())),
        w => Err(format!("host process wrote {w:?}, guest read {got}")),
    }
}
