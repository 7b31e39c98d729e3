//! vsock measurements through a backend process, driven by the user-space guest
//! ([`domsock_guest::uvirtio::UserGuest`]) at native speed.
//!
//! Every measurement starts a fresh backend process (so one backend stalling cannot spoil
//! the next measurement) and fresh guests; the backend's CPU time is read from `/proc`
//! around the data transfer only. A stalled transfer (no progress for [`STALL`]) is
//! recorded as a failure with its reason, not retried.

use super::baseline::{echo, write_for};
use super::report::Results;
use super::{
    median_latency, median_throughput, percentiles, Latency, Measurement, Outcome, Plan, Scenario,
    Throughput, Transport, BUSY_POLL_US, GUEST_COUNTS, RR_SIZE, WRITE_SIZES,
};
use crate::backend::{Backend, VmSpec};
use crate::host;
use crate::tmp::TempDir;
use domsock_guest::uvirtio::{
    Cid, ConnKey, GuestConfig, Port, Shutdown, SockError, SocketType, UserGuest, VsockAddr,
};
use domsock_migration::session::wire::{self as session_wire, Frame};
use domsock_migration::session::SESSION_PORT;
use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// A transfer that makes no progress for this long has stalled.
pub const STALL: Duration = Duration::from_secs(5);
const HOST_CID: u64 = 2;
const FIRST_CID: u32 = 3;
const SINK_PORT: u32 = 5000;
const ECHO_PORT: u32 = 5001;
const GUEST_PORT: u32 = 6000;
const CONCURRENT_WRITE: usize = 64 << 10;

/// A backend with `n` VMs in a scratch directory.
struct Rig {
    backend: Backend,
    specs: Vec<VmSpec>,
    _tmp: TempDir,
}

impl Rig {
    fn start(binary: &Path, n: usize, log_dir: &Path) -> Result<Rig, String> {
        Self::start_with(binary, n, log_dir, &[], "")
    }

    /// `more` are extra domsockd flags on top of `DOMSOCKD_ARGS`; `vm_fields` is appended
    /// to every `--vm` (both backends take `groups=`).
    fn start_with(
        binary: &Path,
        n: usize,
        log_dir: &Path,
        more: &[String],
        vm_fields: &str,
    ) -> Result<Rig, String> {
        let tmp = TempDir::new("bench").map_err(|e| format!("temp dir: {e}"))?;
        let specs: Vec<VmSpec> = (0..n as u32)
            .map(|i| VmSpec::in_dir(tmp.path(), FIRST_CID + i))
            .collect();
        // Extra domsockd flags for experiments (e.g. `--busy-poll-us 50`); never given to
        // the peer backend, which would reject them.
        let is_domsockd = binary.ends_with("domsockd")
            || std::env::var_os("DOMSOCKD").is_some_and(|d| Path::new(&d) == binary);
        let extra: Vec<String> = if is_domsockd {
            std::env::var("DOMSOCKD_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .chain(more.iter().cloned())
                .collect()
        } else {
            Vec::new()
        };
        let backend = Backend::spawn_binary_vm_fields(binary, &extra, &specs, vm_fields, log_dir);
        Ok(Rig {
            backend,
            specs,
            _tmp: tmp,
        })
    }
}

fn guest(spec: &VmSpec) -> Result<UserGuest, String> {
    UserGuest::connect(
        &spec.socket,
        GuestConfig::with_cid(Cid(u64::from(spec.cid))),
    )
    .map_err(|e| format!("guest {} setup: {e}", spec.cid))
}

fn host_addr(port: u32) -> VsockAddr {
    VsockAddr::new(Cid(HOST_CID), Port(port))
}

/// Sends `size`-byte writes for `duration`, then shuts the send side and waits until the
/// device has taken everything. Returns the bytes sent.
fn guest_write_for(
    g: &mut UserGuest,
    key: ConnKey,
    size: usize,
    duration: Duration,
) -> Result<u64, String> {
    let buf = vec![0xa5u8; size];
    let deadline = Instant::now() + duration;
    let mut total = 0u64;
    // The clock is read only while blocked and every 64 writes: at millions of small
    // writes per second, reading it per write would be a measurable part of the guest.
    let mut blocked_since: Option<Instant> = None;
    let mut writes = 0u32;
    loop {
        writes = writes.wrapping_add(1);
        if writes % 64 == 0 && Instant::now() >= deadline {
            break;
        }
        let mut off = 0;
        while off < size {
            match g.send(key, &buf[off..]) {
                Ok(n) => {
                    off += n;
                    blocked_since = None;
                }
                Err(SockError::WouldBlock) => {
                    wait_unblocked(g, &mut blocked_since, "send", total)?;
                    if Instant::now() >= deadline + STALL {
                        return Err(format!("guest send overran its time after {total} bytes"));
                    }
                }
                Err(e) => return Err(format!("guest send after {total} bytes: {e}")),
            }
        }
        total += size as u64;
    }
    g.shutdown(key, Shutdown::SEND).map_err(|e| e.to_string())?;
    g.flush_timeout(STALL)
        .map_err(|e| format!("guest flush: {e}"))?;
    Ok(total)
}

/// A guest `what` (send or receive) would block: waits for the guest to make progress,
/// failing once it has been blocked since `blocked_since` for [`STALL`]. The caller
/// resets `blocked_since` on progress, so the clock is read only while blocked.
fn wait_unblocked(
    g: &mut UserGuest,
    blocked_since: &mut Option<Instant>,
    what: &str,
    total: u64,
) -> Result<(), String> {
    let since = *blocked_since.get_or_insert_with(Instant::now);
    if since.elapsed() > STALL {
        return Err(format!("guest {what} stalled after {total} bytes"));
    }
    g.poll(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())
}

/// Reads until end of stream; returns bytes and the time from the first byte's arrival
/// window start (the call) to EOF.
fn guest_read_to_eof(g: &mut UserGuest, key: ConnKey) -> Result<u64, String> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut blocked_since: Option<Instant> = None;
    loop {
        match g.recv(key, &mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                total += n as u64;
                blocked_since = None;
            }
            Err(SockError::WouldBlock) => wait_unblocked(g, &mut blocked_since, "receive", total)?,
            Err(e) => return Err(format!("guest receive after {total} bytes: {e}")),
        }
    }
}

/// The host end of a guest->host stream: reads until EOF or until it has `target` bytes
/// (set by the guest side once it knows how much it sent), whichever comes first. Not
/// every backend passes a guest's half-close on as EOF (vhost-device-vsock 0.3.0 does not),
/// and this measures the data path, not the close.
fn host_sink(
    listener: std::os::unix::net::UnixListener,
    target: Arc<AtomicU64>,
) -> Result<(u64, Instant), String> {
    let mut s = accept_one(&listener)?;
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; super::baseline::READ_BUF_BYTES];
    let mut got = 0u64;
    let mut progress = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok((got, Instant::now())),
            Ok(n) => {
                got += n as u64;
                progress = Instant::now();
                if got >= target.load(Ordering::Acquire) {
                    return Ok((got, progress));
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if got >= target.load(Ordering::Acquire) {
                    return Ok((got, progress));
                }
                if progress.elapsed() > STALL {
                    return Err(format!("host receive stalled after {got} bytes"));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("host read after {got} bytes: {e}")),
        }
    }
}

/// Accepts one connection on `listener` within [`STALL`].
fn accept_one(listener: &std::os::unix::net::UnixListener) -> Result<UnixStream, String> {
    let s = host::accept(listener, STALL, STALL).map_err(|e| format!("host accept: {e}"))?;
    Ok(s)
}

/// One guest->host stream; over a session the guest opened (`session`) or a raw
/// connection.
fn guest_to_host(
    binary: &Path,
    size: usize,
    plan: &Plan,
    log: &Path,
    session: bool,
) -> Result<Throughput, String> {
    let rig = Rig::start(binary, 1, log)?;
    let spec = &rig.specs[0];
    let listener = host::listen_stream(&spec.uds, SINK_PORT).map_err(|e| e.to_string())?;
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let t2 = target.clone();
    let reader = thread::spawn(move || host_sink(listener, t2));
    let mut g = guest(spec)?;
    let key = if session {
        open_session(&mut g, SINK_PORT)?
    } else {
        g.connect_timeout(host_addr(SINK_PORT), SocketType::Stream, STALL)
            .map_err(|e| format!("guest connect: {e}"))?
    };
    let cpu0 = rig.backend.cpu_time();
    let start = Instant::now();
    let sent = guest_write_for(&mut g, key, size, plan.duration);
    target.store(*sent.as_ref().unwrap_or(&0), Ordering::Release);
    let (got, end) = reader.join().map_err(|_| "host reader panicked")??;
    let sent = sent?;
    let cpu = rig.backend.cpu_time() - cpu0;
    if got != sent {
        return Err(format!("guest sent {sent} bytes, host received {got}"));
    }
    Ok(Throughput {
        bytes: got,
        elapsed: end - start,
        backend_cpu: Some(cpu),
    })
}

/// One host->guest stream the host opened (`CONNECT`); over a session (`session`: the
/// guest registered its listener with `LISTEN`, so the connection starts with OFFERED) or a
/// raw connection.
fn host_to_guest(
    binary: &Path,
    size: usize,
    plan: &Plan,
    log: &Path,
    session: bool,
) -> Result<Throughput, String> {
    let rig = Rig::start(binary, 1, log)?;
    let spec = &rig.specs[0];
    let mut g = guest(spec)?;
    g.listen(Port(GUEST_PORT), SocketType::Stream)
        .map_err(|e| e.to_string())?;
    if session {
        register_listener(&mut g, GUEST_PORT)?;
    }
    let uds = spec.uds.clone();
    let duration = plan.duration;
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let writer = thread::spawn(move || -> Result<u64, String> {
        let mut s = host::connect_guest_ok(&uds, GUEST_PORT, STALL)
            .map_err(|e| format!("host CONNECT: {e}"))?;
        go2.wait();
        let n = write_for(&mut s, size, duration).map_err(|e| format!("host write: {e}"))?;
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        Ok(n)
    });
    let key = g
        .accept_timeout(Port(GUEST_PORT), STALL)
        .map_err(|e| format!("guest accept: {e}"))?;
    if session {
        match read_session_frame(&mut g, key)? {
            Frame::Offered { .. } => {}
            other => return Err(format!("expected OFFERED, got {other:?}")),
        }
    }
    go.wait();
    let cpu0 = rig.backend.cpu_time();
    let start = Instant::now();
    let got = guest_read_to_eof(&mut g, key);
    let elapsed = start.elapsed();
    let cpu = rig.backend.cpu_time() - cpu0;
    let sent = writer.join().map_err(|_| "host writer panicked")??;
    let got = got?;
    if got != sent {
        return Err(format!("host sent {sent} bytes, guest received {got}"));
    }
    Ok(Throughput {
        bytes: got,
        elapsed,
        backend_cpu: Some(cpu),
    })
}

/// Reads one session frame on `key`, exactly (application bytes may follow it).
pub(super) fn read_session_frame(g: &mut UserGuest, key: ConnKey) -> Result<Frame, String> {
    let mut pre = [0u8; session_wire::PREAMBLE_LEN];
    g.read_exact(key, &mut pre, STALL)
        .map_err(|e| format!("session preamble: {e}"))?;
    let body_len = usize::from(u16::from_le_bytes([pre[6], pre[7]]));
    if body_len > session_wire::MAX_FRAME_LEN {
        return Err(format!("session frame of {body_len} bytes"));
    }
    let mut frame = pre.to_vec();
    frame.resize(pre.len() + body_len, 0);
    g.read_exact(key, &mut frame[pre.len()..], STALL)
        .map_err(|e| format!("session frame: {e}"))?;
    match Frame::decode(&frame) {
        Ok(Some((f, _))) => Ok(f),
        other => Err(format!("bad session frame: {other:?}")),
    }
}

/// Opens a session to host port `port` through the session port.
fn open_session(g: &mut UserGuest, port: u32) -> Result<ConnKey, String> {
    let key = g
        .connect_timeout(host_addr(SESSION_PORT.0), SocketType::Stream, STALL)
        .map_err(|e| format!("guest connect to the session port: {e}"))?;
    let open = Frame::Open {
        cid: Cid(HOST_CID),
        port: Port(port),
        socket_type: SocketType::Stream,
    };
    g.write_all(key, &open.encode(), STALL)
        .map_err(|e| format!("OPEN: {e}"))?;
    match read_session_frame(g, key)? {
        Frame::Opened { .. } => Ok(key),
        other => Err(format!("expected OPENED, got {other:?}")),
    }
}

/// Registers guest port `port` as a session listener (the connection stays open).
fn register_listener(g: &mut UserGuest, port: u32) -> Result<(), String> {
    let reg = g
        .connect_timeout(host_addr(SESSION_PORT.0), SocketType::Stream, STALL)
        .map_err(|e| format!("guest connect to the session port: {e}"))?;
    let listen = Frame::Listen {
        port: Port(port),
        socket_type: SocketType::Stream,
    };
    g.write_all(reg, &listen.encode(), STALL)
        .map_err(|e| format!("LISTEN: {e}"))?;
    match read_session_frame(g, reg)? {
        Frame::Listening { .. } => Ok(()),
        other => Err(format!("expected LISTENING, got {other:?}")),
    }
}

fn guest_to_guest(
    binary: &Path,
    size: usize,
    plan: &Plan,
    log: &Path,
) -> Result<Throughput, String> {
    // Siblings may connect only when they share a group (domsockd denies by default;
    // vhost-device-vsock puts every VM in group "default" unless told otherwise).
    let rig = Rig::start_with(binary, 2, log, &[], ",groups=bench")?;
    let (a, b) = (rig.specs[0].clone(), rig.specs[1].clone());
    let mut gb = guest(&b)?;
    gb.listen(Port(GUEST_PORT), SocketType::Stream)
        .map_err(|e| e.to_string())?;
    let duration = plan.duration;
    let writer = thread::spawn(move || -> Result<u64, String> {
        let mut ga = guest(&a)?;
        let peer = VsockAddr::new(Cid(u64::from(b.cid)), Port(GUEST_PORT));
        let key = ga
            .connect_timeout(peer, SocketType::Stream, STALL)
            .map_err(|e| format!("guest {} connect to guest {}: {e}", a.cid, b.cid))?;
        guest_write_for(&mut ga, key, size, duration)
    });
    let key = match gb.accept_timeout(Port(GUEST_PORT), STALL) {
        Ok(k) => k,
        Err(e) => {
            let why = writer
                .join()
                .map_err(|_| "writer panicked".to_string())?
                .err()
                .unwrap_or_default();
            return Err(format!("guest accept: {e}; {why}"));
        }
    };
    let cpu0 = rig.backend.cpu_time();
    let start = Instant::now();
    let got = guest_read_to_eof(&mut gb, key);
    let elapsed = start.elapsed();
    let cpu = rig.backend.cpu_time() - cpu0;
    let sent = writer.join().map_err(|_| "guest writer panicked")??;
    let got = got?;
    if got != sent {
        return Err(format!(
            "guest sent {sent} bytes, peer guest received {got}"
        ));
    }
    Ok(Throughput {
        bytes: got,
        elapsed,
        backend_cpu: Some(cpu),
    })
}

fn concurrent(binary: &Path, guests: usize, plan: &Plan, log: &Path) -> Result<Throughput, String> {
    let rig = Rig::start(binary, guests, log)?;
    let go = Arc::new(Barrier::new(guests + 1));
    // Guests stay up until every host reader saw EOF, as VMs would: a guest that vanishes
    // right after its last write is a different test (see the linger test in host-backend).
    let done = Arc::new(Barrier::new(guests + 1));
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for spec in rig.specs.iter().cloned() {
        let listener = host::listen_stream(&spec.uds, SINK_PORT).map_err(|e| e.to_string())?;
        let target = Arc::new(AtomicU64::new(u64::MAX));
        let t2 = target.clone();
        readers.push(thread::spawn(move || host_sink(listener, t2)));
        let go = go.clone();
        let done = done.clone();
        let duration = plan.duration;
        writers.push(thread::spawn(move || -> Result<u64, String> {
            let setup = (|| {
                let mut g = guest(&spec)?;
                let key = g
                    .connect_timeout(host_addr(SINK_PORT), SocketType::Stream, STALL)
                    .map_err(|e| format!("guest {} connect: {e}", spec.cid))?;
                Ok::<_, String>((g, key))
            })();
            go.wait();
            let result = setup.map(|(mut g, key)| {
                let r = guest_write_for(&mut g, key, CONCURRENT_WRITE, duration);
                target.store(*r.as_ref().unwrap_or(&0), Ordering::Release);
                (g, r)
            });
            done.wait();
            let (_guest, r) = result?;
            r
        }));
    }
    go.wait();
    let cpu0 = rig.backend.cpu_time();
    let start = Instant::now();
    let mut sent = 0u64;
    let mut first_err = None;
    let mut got = 0u64;
    let mut end = start;
    for r in readers {
        match r.join().map_err(|_| "host reader panicked".to_string()) {
            Ok(Ok((n, t))) => {
                got += n;
                end = end.max(t);
            }
            Ok(Err(e)) | Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let cpu = rig.backend.cpu_time() - cpu0;
    done.wait();
    for w in writers {
        match w.join().map_err(|_| "guest writer panicked".to_string()) {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) | Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if got != sent {
        return Err(format!("guests sent {sent} bytes, host received {got}"));
    }
    Ok(Throughput {
        bytes: got,
        elapsed: end - start,
        backend_cpu: Some(cpu),
    })
}

fn round_trip(
    binary: &Path,
    size: usize,
    plan: &Plan,
    log: &Path,
    more: &[String],
) -> Result<Latency, String> {
    let rig = Rig::start_with(binary, 1, log, more, "")?;
    let spec = &rig.specs[0];
    let listener = host::listen_stream(&spec.uds, ECHO_PORT).map_err(|e| e.to_string())?;
    let echo_thread = thread::spawn(move || -> Result<(), String> {
        let mut s = accept_one(&listener)?;
        echo(&mut s, size).map_err(|e| format!("host echo: {e}"))
    });
    let mut g = guest(spec)?;
    let key = g
        .connect_timeout(host_addr(ECHO_PORT), SocketType::Stream, STALL)
        .map_err(|e| format!("guest connect: {e}"))?;
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(plan.round_trips);
    let cpu0 = rig.backend.cpu_time();
    for i in 0..plan.round_trips {
        let t = Instant::now();
        g.write_all(key, &out, STALL)
            .map_err(|e| format!("round trip {i}: send: {e}"))?;
        g.read_exact(key, &mut back, STALL)
            .map_err(|e| format!("round trip {i}: receive: {e}"))?;
        rtts.push(t.elapsed());
    }
    let cpu = rig.backend.cpu_time() - cpu0;
    let _ = g.shutdown(key, Shutdown::SEND);
    let _ = g.flush_timeout(STALL);
    let _ = echo_thread.join();
    let (p50, p99) = percentiles(&mut rtts);
    Ok(Latency {
        p50,
        p99,
        backend_cpu_per_rt: Some(cpu / plan.round_trips.max(1) as u32),
    })
}

fn throughput_runs(plan: &Plan, mut run: impl FnMut() -> Result<Throughput, String>) -> Outcome {
    let mut v = Vec::new();
    for _ in 0..plan.repeats {
        match run() {
            Ok(t) => v.push(t),
            Err(e) => return Outcome::Failed(e),
        }
    }
    Outcome::Throughput(median_throughput(v).expect("repeats >= 1"))
}

/// Runs every vsock scenario against `binary`.
pub fn run_all(transport: Transport, binary: &Path, plan: &Plan, results: &mut Results) {
    let log_root: PathBuf = crate::artifacts::log_root()
        .join("bench")
        .join(transport.name());
    let only = std::env::var("DOMSOCK_BENCH_ONLY").ok();
    let wanted = |s: Scenario| only.as_deref().is_none_or(|o| s.key().contains(o));
    let mut record = |scenario: Scenario, outcome: Outcome| {
        if let Outcome::Failed(why) = &outcome {
            eprintln!("  {}: FAILED: {why}", scenario.label());
        } else {
            eprintln!("  {}: done", scenario.label());
        }
        results.push(Measurement {
            scenario,
            transport,
            outcome,
        });
    };
    for &size in &WRITE_SIZES {
        let log = log_root.join(format!("g2h-{size}"));
        if wanted(Scenario::GuestToHost { size }) {
            record(
                Scenario::GuestToHost { size },
                throughput_runs(plan, || guest_to_host(binary, size, plan, &log, false)),
            );
        }
        let log = log_root.join(format!("h2g-{size}"));
        if wanted(Scenario::HostToGuest { size }) {
            record(
                Scenario::HostToGuest { size },
                throughput_runs(plan, || host_to_guest(binary, size, plan, &log, false)),
            );
        }
    }
    if transport == Transport::Domsockd {
        for &size in &[4 << 10, 64 << 10] {
            let log = log_root.join(format!("session-g2h-{size}"));
            if wanted(Scenario::SessionGuestToHost { size }) {
                record(
                    Scenario::SessionGuestToHost { size },
                    throughput_runs(plan, || guest_to_host(binary, size, plan, &log, true)),
                );
            }
            let log = log_root.join(format!("session-h2g-{size}"));
            if wanted(Scenario::SessionHostToGuest { size }) {
                record(
                    Scenario::SessionHostToGuest { size },
                    throughput_runs(plan, || host_to_guest(binary, size, plan, &log, true)),
                );
            }
        }
    }
    for &size in &[4 << 10, 64 << 10] {
        if !wanted(Scenario::GuestToGuest { size }) {
            continue;
        }
        let log = log_root.join(format!("g2g-{size}"));
        let outcome = if transport == Transport::Domsockd && !siblings_supported(binary) {
            Outcome::Skipped("guest-to-guest routing lands with sibling routing (issue 4)".into())
        } else {
            throughput_runs(plan, || guest_to_guest(binary, size, plan, &log))
        };
        record(Scenario::GuestToGuest { size }, outcome);
    }
    for &guests in &GUEST_COUNTS {
        if !wanted(Scenario::Concurrent { guests }) {
            continue;
        }
        let log = log_root.join(format!("concurrent-{guests}"));
        record(
            Scenario::Concurrent { guests },
            throughput_runs(plan, || concurrent(binary, guests, plan, &log)),
        );
    }
    let mut latency_scenarios: Vec<(Scenario, Vec<String>)> =
        vec![(Scenario::RoundTrip { size: RR_SIZE }, Vec::new())];
    if transport == Transport::Domsockd {
        latency_scenarios.push((
            Scenario::RoundTripBusyPoll {
                size: RR_SIZE,
                us: BUSY_POLL_US,
            },
            vec!["--busy-poll-us".to_owned(), BUSY_POLL_US.to_string()],
        ));
    }
    for (scenario, more) in latency_scenarios {
        if !wanted(scenario) {
            continue;
        }
        let log = log_root.join(scenario.key().replace('/', "-"));
        let mut v = Vec::new();
        let mut failed = None;
        for _ in 0..plan.repeats {
            match round_trip(binary, RR_SIZE, plan, &log, &more) {
                Ok(l) => v.push(l),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let outcome = match failed {
            Some(e) => Outcome::Failed(e),
            None => Outcome::Latency(median_latency(v).expect("repeats >= 1")),
        };
        record(scenario, outcome);
    }
}

/// domsockd answers `--version`; sibling routing is announced in its help text once it
/// exists. Until then guest-to-guest is reported as not supported rather than run into a
/// certain RST.
fn siblings_supported(binary: &Path) -> bool {
    std::process::Command::new(binary)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("sibling"))
        .unwrap_or(false)
}
