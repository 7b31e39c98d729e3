//! End-to-end tests with real QEMU guests against the backend binary.
//!
//! Prepare once with `tests/vm/setup.sh`, build the backend (`cargo build --release -p
//! domsock-host`), then `cargo test --release -p domsock-tests --test vm`. Every case runs on
//! kernel 6.1 (`k6_1::*`) and, when set up, 6.12 (`k6_12::*`). Each case starts its own
//! backend process and guest(s); the VM tests run one at a time (see [`vm::exclusive`]).
//! Per-case timings are printed to stderr and appended to `target/vm-tests/report.log`; logs
//! of each case (console, QEMU, backend) are in `target/vm-tests/<kernel>/<case>/`.
//!
//! Data is the deterministic pattern stream of `domsock_guest::pattern`: the host checks what it
//! receives against the stream regenerated from the seed, and compares the guest's reported
//! byte counts and XXH3-64 checksums with what it sent.
#![forbid(unsafe_code)]

use std::net::Shutdown;
use std::path::PathBuf;
use std::sync::{Barrier, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use domsock_guest::pattern::{format_xxh3, pattern_checksum, Checksum};
use domsock_tests::artifacts::{self, Kernel};
use domsock_tests::backend::{Backend, VmSpec};
use domsock_tests::host::{self, Handshake};
use domsock_tests::report;
use domsock_tests::serial::DsLine;
use domsock_tests::tmp::TempDir;
use domsock_tests::vm::{self, After, Vm, VmConfig};

const HOST_CID: u32 = 2;
/// From QEMU start to the guest's CID line (~2.5 s measured under TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// For a 256 MiB transfer (~2 s measured under TCG).
const BIG_TRANSFER_TIMEOUT: Duration = Duration::from_secs(240);
/// For small steps: a short transfer, a handshake, the guest's next command.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Host-side socket read/write timeout.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How fast a connection to a port without listener must fail.
const REFUSE_WITHIN: Duration = Duration::from_millis(1000);
/// Size of the big single-stream transfers.
const BIG_BYTES: u64 = 256 << 20;
const CHUNK_BYTES: usize = 64 << 10;
const MIB: f64 = (1 << 20) as f64;
const GIB: f64 = (1 << 30) as f64;

/// One test case on one kernel: scratch dir, log dir, and the VM-test lock.
struct Case {
    name: String,
    kernel: Kernel,
    tmp: TempDir,
    log_dir: PathBuf,
    started: Instant,
    _exclusive: MutexGuard<'static, ()>,
}

impl Case {
    fn new(case: &str, kernel: &'static str) -> Option<Case> {
        let kernel = artifacts::kernel(kernel)?;
        let exclusive = vm::exclusive();
        let log_dir = artifacts::log_root().join(kernel.name).join(case);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).expect("create log dir");
        let c = Case {
            name: format!("{}/{case}", kernel.name),
            kernel,
            tmp: TempDir::new().expect("temp dir"),
            log_dir,
            started: Instant::now(),
            _exclusive: exclusive,
        };
        Some(c)
    }

    fn report(&self, msg: &str) {
        report::line(&self.name, msg);
    }

    fn spec(&self, cid: u32) -> VmSpec {
        VmSpec::in_dir(self.tmp.path(), cid)
    }

    fn vm(&self, name: &str, spec: &VmSpec) -> VmConfig {
        VmConfig::new(name, &self.kernel, &spec.socket, &self.log_dir)
    }

    /// Boots a guest and waits until its vsock transport is up; checks the CID.
    fn boot(&self, cfg: &VmConfig, spec: &VmSpec) -> Vm {
        let vm = Vm::boot(cfg);
        let cid = vm.expect_cid(BOOT_TIMEOUT);
        assert_eq!(cid, spec.cid, "guest CID should be the backend's guest-cid");
        self.report(&format!(
            "{}: booted to vsock ready in {}",
            cfg.name,
            report::ms(vm.uptime())
        ));
        vm
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        if !thread::panicking() {
            self.report(&format!("passed in {}", report::ms(self.started.elapsed())));
        }
    }
}

/// Asserts `got` is the first `len` bytes of the pattern stream for `seed`.
fn assert_pattern(what: &str, got: &Checksum, seed: u64, len: u64) {
    let want = pattern_checksum(seed, len);
    assert_eq!(got.bytes(), len, "{what}: byte count");
    assert_eq!(
        got.hex(),
        want.hex(),
        "{what}: XXH3-64 of {len} bytes differs from the pattern stream (seed {seed})"
    );
}

/// Asserts the guest's reported count and checksum (fields `<prefix>bytes`, `<prefix>xxh3`).
fn assert_guest_saw(what: &str, line: &DsLine, prefix: &str, sum: &Checksum) {
    assert_eq!(
        line.u64(&format!("{prefix}bytes")),
        sum.bytes(),
        "{what}: guest byte count ({})",
        line.raw
    );
    assert_eq!(
        line.str(&format!("{prefix}xxh3")),
        sum.hex(),
        "{what}: guest checksum ({})",
        line.raw
    );
}

fn finish(vm: &mut Vm) {
    vm.expect_done(STEP_TIMEOUT);
    let status = vm.wait_exit(STEP_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");
}

fn cpu_per_gib(cpu: Duration, bytes: u64) -> String {
    format!(
        "{:.0} ms/GiB",
        cpu.as_secs_f64() * 1000.0 * GIB / bytes as f64
    )
}

// ---------------------------------------------------------------------------------------------
// a. guest -> host stream

fn stream_guest_to_host(c: Case) {
    let spec = c.spec(3);
    let listener = host::listen_stream(&spec.uds, 5000).expect("listen on <uds>_5000");
    let backend = Backend::spawn(std::slice::from_ref(&spec), &c.log_dir);
    let cfg = c.vm("guest", &spec).cmd(&format!(
        "send --cid {HOST_CID} --port 5000 --bytes {BIG_BYTES} --chunk {CHUNK_BYTES} --seed 11"
    ));
    let mut vm = c.boot(&cfg, &spec);

    let cpu0 = backend.cpu_time();
    let mut conn = host::accept(&listener, STEP_TIMEOUT, IDLE_TIMEOUT)
        .expect("guest connects to host port 5000");
    // Exactly the announced length, then close: EOF propagation is half_close's business.
    let got = host::read_len(&mut conn, BIG_BYTES).expect("read the guest's stream");
    drop(conn);
    let cpu = backend.cpu_time() - cpu0;
    let res = vm.expect_result("send", BIG_TRANSFER_TIMEOUT);

    assert_pattern("host received", &got.sum, 11, BIG_BYTES);
    assert_guest_saw("guest sent", &res, "", &got.sum);
    assert_eq!(res.u64("reply_bytes"), 0, "no reply was sent");
    c.report(&format!(
        "guest->host {} MiB in {} KiB writes: host {:.1} MB/s ({}), guest {:.1} MB/s, backend CPU {}",
        BIG_BYTES as f64 / MIB,
        CHUNK_BYTES / 1024,
        report::mbps(BIG_BYTES, got.elapsed),
        report::ms(got.elapsed),
        res.f64("mbps"),
        cpu_per_gib(cpu, BIG_BYTES)
    ));
    finish(&mut vm);
}

// ---------------------------------------------------------------------------------------------
// b. host -> guest stream via CONNECT

fn stream_host_to_guest(c: Case) {
    let spec = c.spec(3);
    let backend = Backend::spawn(std::slice::from_ref(&spec), &c.log_dir);
    let mut vm = c.boot(&c.vm("guest", &spec).cmd("recv --port 6000"), &spec);
    vm.expect_ready(6000, STEP_TIMEOUT);

    let t = Instant::now();
    let mut conn = host::connect_guest_ok(&spec.uds, 6000, STEP_TIMEOUT).expect("CONNECT 6000");
    let handshake = t.elapsed();
    let cpu0 = backend.cpu_time();
    let sent =
        host::write_pattern(&mut conn, 12, BIG_BYTES, CHUNK_BYTES).expect("stream to the guest");
    conn.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let reply = host::read_to_eof(&mut conn).expect("EOF from the guest");
    let total = t.elapsed();
    let cpu = backend.cpu_time() - cpu0;
    let res = vm.expect_result("recv", BIG_TRANSFER_TIMEOUT);

    assert_eq!(reply.sum.bytes(), 0, "guest sent no reply");
    assert_guest_saw("guest received", &res, "", &sent.sum);
    c.report(&format!(
        "host->guest {} MiB: handshake {}, host {:.1} MB/s until EOF ({}), guest {:.1} MB/s, backend CPU {}",
        BIG_BYTES as f64 / MIB,
        report::ms(handshake),
        report::mbps(BIG_BYTES, total),
        report::ms(total),
        res.f64("mbps"),
        cpu_per_gib(cpu, BIG_BYTES)
    ));
    finish(&mut vm);
}

// ---------------------------------------------------------------------------------------------
// c. seqpacket messages, boundaries preserved both ways

const SEQ_SIZES: [usize; 11] = [1, 2, 3, 7, 64, 4095, 4096, 4097, 32768, 65535, 65536];
const SEQ_ROUNDS: usize = 2;

fn seqpacket_boundaries(c: Case) {
    let spec = c.spec(3);
    let listener = host::listen_seqpacket(&spec.uds, 5002).expect("seqpacket listen on <uds>_5002");
    let _backend = Backend::spawn(std::slice::from_ref(&spec), &c.log_dir);
    let sizes: Vec<String> = SEQ_SIZES.iter().map(usize::to_string).collect();
    let cfg = c.vm("guest", &spec).cmd(&format!(
        "seq-echo-client --cid {HOST_CID} --port 5002 --sizes {} --rounds {SEQ_ROUNDS} --seed 31",
        sizes.join(",")
    ));
    let mut vm = c.boot(&cfg, &spec);

    let echo = thread::spawn(move || {
        let mut conn = host::accept(&listener, STEP_TIMEOUT, IDLE_TIMEOUT)?;
        host::seqpacket_echo(&mut conn)
    });
    let res = vm.expect_result("seq-echo-client", STEP_TIMEOUT);
    let seen = echo
        .join()
        .expect("echo thread")
        .expect("host seqpacket echo");

    let want: Vec<usize> = SEQ_SIZES
        .iter()
        .copied()
        .cycle()
        .take(SEQ_SIZES.len() * SEQ_ROUNDS)
        .collect();
    assert_eq!(
        seen, want,
        "message sizes the host received (guest->host boundaries)"
    );
    assert_eq!(
        res.u64("ok"),
        want.len() as u64,
        "echoes the guest verified (host->guest boundaries)"
    );
    let total: usize = want.iter().sum();
    c.report(&format!(
        "seqpacket: {} messages of 1 B..64 KiB ({} bytes) echoed with boundaries intact in {:.1} ms",
        want.len(),
        total,
        res.f64("ms")
    ));
    finish(&mut vm);
}

// ---------------------------------------------------------------------------------------------
// d. connecting to a port without listener fails fast, both directions

fn closed_port_fails_fast(c: Case) {
    let spec = c.spec(3);
    let _backend = Backend::spawn(std::slice::from_ref(&spec), &c.log_dir);
    let cfg = c
        .vm("guest", &spec)
        .cmd(&format!(
            "connect-expect-fail --cid {HOST_CID} --port 5999 --max-ms {}",
            REFUSE_WITHIN.as_millis()
        ))
        .cmd("recv --port 6001");
    let mut vm = c.boot(&cfg, &spec);

    let g2h = vm.expect_result("connect-expect-fail", STEP_TIMEOUT);
    assert_eq!(
        g2h.str("ok"),
        "1",
        "guest connect to a closed host port: {}",
        g2h.raw
    );

    vm.expect_ready(6001, STEP_TIMEOUT);
    let t = Instant::now();
    let outcome =
        host::connect_guest(&spec.uds, 7777, REFUSE_WITHIN * 3).expect("CONNECT 7777 I/O");
    let h2g_ms = t.elapsed();
    match outcome {
        Handshake::Refused { reply } => {
            assert!(
                h2g_ms <= REFUSE_WITHIN,
                "host CONNECT to a closed guest port took {h2g_ms:?} to fail ({reply})"
            );
            c.report(&format!(
                "closed ports: guest->host {} in {:.1} ms; host->guest {reply:?} in {}",
                g2h.str("errno"),
                g2h.f64("ms"),
                report::ms(h2g_ms)
            ));
        }
        Handshake::Connected { reply, .. } => {
            panic!("CONNECT to guest port 7777 without listener got {reply:?}")
        }
    }

    // The failures left the device healthy: a real connection still works.
    let mut conn = host::connect_guest_ok(&spec.uds, 6001, STEP_TIMEOUT).expect("CONNECT 6001");
    let sent = host::write_pattern(&mut conn, 41, 1 << 20, CHUNK_BYTES).expect("write");
    conn.shutdown(Shutdown::Write).expect("shutdown");
    host::read_to_eof(&mut conn).expect("EOF");
    let res = vm.expect_result("recv", STEP_TIMEOUT);
    assert_guest_saw("guest received after the refusals", &res, "", &sent.sum);
    finish(&mut vm);
}

// ---------------------------------------------------------------------------------------------
// e. half-close both ways: after one side's shutdown(SHUT_WR) the other direction still works

const HALF_BYTES: u64 = 1 << 20;
const HALF_REPLY_BYTES: u64 = 3 << 20;

fn half_close(c: Case) {
    let spec = c.spec(3);
    let listener = host::listen_stream(&spec.uds, 5000).expect("listen");
    let _backend = Backend::spawn(std::slice::from_ref(&spec), &c.log_dir);
    let cfg = c
        .vm("guest", &spec)
        .cmd(&format!(
            "halfclose-client --cid {HOST_CID} --port 5000 --bytes {HALF_BYTES} --seed 21"
        ))
        .cmd(&format!(
            "recv --port 6000 --reply-bytes {HALF_REPLY_BYTES} --reply-seed 24"
        ));
    let mut vm = c.boot(&cfg, &spec);

    // Guest half-closes: the host sees EOF, then replies.
    let mut conn = host::accept(&listener, STEP_TIMEOUT, IDLE_TIMEOUT).expect("accept");
    let got = host::read_to_eof(&mut conn).expect("EOF after the guest's SHUT_WR");
    assert_pattern(
        "host received before guest SHUT_WR",
        &got.sum,
        21,
        HALF_BYTES,
    );
    let reply = host::write_pattern(&mut conn, 22, HALF_REPLY_BYTES, CHUNK_BYTES)
        .expect("reply after guest SHUT_WR");
    drop(conn);
    let res = vm.expect_result("halfclose-client", STEP_TIMEOUT);
    assert_guest_saw("guest sent", &res, "", &got.sum);
    assert_guest_saw(
        "guest got the reply after its SHUT_WR",
        &res,
        "reply_",
        &reply.sum,
    );

    // Host half-closes: the guest sees EOF, then replies.
    vm.expect_ready(6000, STEP_TIMEOUT);
    let mut conn = host::connect_guest_ok(&spec.uds, 6000, STEP_TIMEOUT).expect("CONNECT 6000");
    let sent = host::write_pattern(&mut conn, 23, HALF_BYTES, CHUNK_BYTES).expect("write");
    conn.shutdown(Shutdown::Write)
        .expect("host shutdown(Write)");
    let back = host::read_to_eof(&mut conn).expect("reply after host SHUT_WR");
    assert_pattern(
        "host got the reply after its SHUT_WR",
        &back.sum,
        24,
        HALF_REPLY_BYTES,
    );
    let res = vm.expect_result("recv", STEP_TIMEOUT);
    assert_guest_saw("guest received before host SHUT_WR", &res, "", &sent.sum);
    assert_eq!(res.str("reply_xxh3"), format_xxh3(back.sum.digest()));
    c.report("half-close: 1 MiB + 3 MiB reply after SHUT_WR, guest->host and host->guest");
    finish(&mut vm);
}

// ---------------------------------------------------------------------------------------------
// f. two VMs on one backend process, streaming at the same time

const TWO_VM_BYTES: u64 = 128 << 20;
const TWO_VM_REVERSE_BYTES: u64 = 8 << 20;

/// What one host thread of [`two_vms_concurrently`] saw.
struct VmTraffic {
    /// Guest->host stream, relative to the common start.
    stream_start: Duration,
    stream_end: Duration,
    got: Checksum,
    sent: Checksum,
    send_res: DsLine,
    recv_res: DsLine,
}

fn two_vms_concurrently(c: Case) {
    let specs = [c.spec(3), c.spec(4)];
    let listeners: Vec<_> = specs
        .iter()
        .map(|s| host::listen_stream(&s.uds, 5000).expect("listen on <uds>_5000"))
        .collect();
    let backend = Backend::spawn(&specs, &c.log_dir);
    // Each guest first receives from the host (which starts both at the same moment), then
    // streams to the host right away: both directions run on both guests at once, however
    // differently long the two boots took.
    let mut vms: Vec<Vm> = specs
        .iter()
        .map(|s| {
            let cfg = c.vm(&format!("guest{}", s.cid), s).cmd("recv --port 6000").cmd(&format!(
                "send --cid {HOST_CID} --port 5000 --bytes {TWO_VM_BYTES} --chunk {CHUNK_BYTES} --seed {}",
                100 + s.cid
            ));
            Vm::boot(&cfg)
        })
        .collect();
    for (vm, s) in vms.iter().zip(&specs) {
        assert_eq!(
            vm.expect_cid(BOOT_TIMEOUT),
            s.cid,
            "each guest gets its own CID"
        );
    }

    let cpu0 = backend.cpu_time();
    let both_ready = Barrier::new(specs.len());
    let t0 = Instant::now();
    let results: Vec<VmTraffic> = thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .iter()
            .zip(&specs)
            .zip(&vms)
            .map(|((listener, spec), vm)| {
                let both_ready = &both_ready;
                scope.spawn(move || {
                    vm.expect_ready(6000, STEP_TIMEOUT);
                    both_ready.wait();
                    let mut conn =
                        host::connect_guest_ok(&spec.uds, 6000, STEP_TIMEOUT).expect("CONNECT");
                    let sent = host::write_pattern(
                        &mut conn,
                        200 + u64::from(spec.cid),
                        TWO_VM_REVERSE_BYTES,
                        CHUNK_BYTES,
                    )
                    .expect("write");
                    conn.shutdown(Shutdown::Write).expect("shutdown");
                    host::read_to_eof(&mut conn).expect("EOF");
                    drop(conn);
                    // Console markers are consumed in order: the recv result comes first.
                    let recv_res = vm.expect_result("recv", STEP_TIMEOUT);

                    let mut conn =
                        host::accept(listener, STEP_TIMEOUT, IDLE_TIMEOUT).expect("accept");
                    let stream_start = t0.elapsed();
                    let got =
                        host::read_len(&mut conn, TWO_VM_BYTES).expect("read the guest's stream");
                    let stream_end = t0.elapsed();
                    drop(conn);
                    let send_res = vm.expect_result("send", BIG_TRANSFER_TIMEOUT);
                    VmTraffic {
                        stream_start,
                        stream_end,
                        got: got.sum,
                        sent: sent.sum,
                        send_res,
                        recv_res,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("host thread"))
            .collect()
    });
    let cpu = backend.cpu_time() - cpu0;

    for (spec, r) in specs.iter().zip(&results) {
        assert_pattern(
            &format!("host received from CID {}", spec.cid),
            &r.got,
            100 + u64::from(spec.cid),
            TWO_VM_BYTES,
        );
        assert_guest_saw("guest sent", &r.send_res, "", &r.got);
        assert_guest_saw(
            &format!("guest CID {} received its own stream", spec.cid),
            &r.recv_res,
            "",
            &r.sent,
        );
    }
    let (a, b) = (&results[0], &results[1]);
    let overlap = a
        .stream_end
        .min(b.stream_end)
        .saturating_sub(a.stream_start.max(b.stream_start));
    let span = a.stream_end.max(b.stream_end) - a.stream_start.min(b.stream_start);
    c.report(&format!(
        "two VMs: 2 x {} MiB host->guest, then 2 x {} MiB guest->host overlapping {} of {} \
         ({:.1} MB/s combined), backend CPU {}",
        TWO_VM_REVERSE_BYTES >> 20,
        TWO_VM_BYTES >> 20,
        report::ms(overlap),
        report::ms(span),
        report::mbps(2 * TWO_VM_BYTES, span),
        cpu_per_gib(cpu, 2 * (TWO_VM_BYTES + TWO_VM_REVERSE_BYTES))
    ));
    assert!(
        overlap > Duration::ZERO,
        "the two guests' streams should run at the same time"
    );
    for vm in &mut vms {
        finish(vm);
    }
}

// ---------------------------------------------------------------------------------------------
// g. guest reboot and QEMU restart with the backend left running

const REBOOT_BYTES: u64 = 16 << 20;

/// One round of work: guest sends to host port 5000, then receives via CONNECT to port 6000.
fn reboot_round(vm: &Vm, spec: &VmSpec, listener: &std::os::unix::net::UnixListener, round: u64) {
    let mut conn = host::accept(listener, STEP_TIMEOUT, IDLE_TIMEOUT).expect("guest connects");
    let got = host::read_len(&mut conn, REBOOT_BYTES).expect("read the guest's stream");
    drop(conn);
    assert_pattern(
        &format!("round {round}: host received"),
        &got.sum,
        51,
        REBOOT_BYTES,
    );
    vm.expect_result("send", STEP_TIMEOUT);

    vm.expect_ready(6000, STEP_TIMEOUT);
    let mut conn = host::connect_guest_ok(&spec.uds, 6000, STEP_TIMEOUT).expect("CONNECT 6000");
    let sent =
        host::write_pattern(&mut conn, 60 + round, REBOOT_BYTES, CHUNK_BYTES).expect("write");
    conn.shutdown(Shutdown::Write).expect("shutdown");
    host::read_to_eof(&mut conn).expect("EOF");
    let res = vm.expect_result("recv", STEP_TIMEOUT);
    assert_guest_saw(
        &format!("round {round}: guest received"),
        &res,
        "",
        &sent.sum,
    );
    vm.expect_done(STEP_TIMEOUT);
}

fn reboot_and_restart(c: Case) {
    let spec = c.spec(3);
    let listener = host::listen_stream(&spec.uds, 5000).expect("listen");
    let mut backend = Backend::spawn(std::slice::from_ref(&spec), &c.log_dir);
    let cmds = |cfg: VmConfig| {
        cfg.cmd(&format!(
            "send --cid {HOST_CID} --port 5000 --bytes {REBOOT_BYTES} --seed 51"
        ))
        .cmd("recv --port 6000")
    };

    // Guest reboots (reboot -f, QEMU resets the device); the backend must serve the new boot.
    let vm = Vm::boot(&cmds(c.vm("guest-reboot", &spec)).after(After::Reboot));
    let mut boot_ids = Vec::new();
    for round in 0..2 {
        let t = Instant::now();
        let boot = vm.expect_boot(BOOT_TIMEOUT);
        boot_ids.push(boot.str("boot_id").to_owned());
        assert_eq!(vm.expect_cid(BOOT_TIMEOUT), spec.cid);
        reboot_round(&vm, &spec, &listener, round);
        c.report(&format!(
            "reboot test: boot {} did its work in {}",
            round + 1,
            report::ms(t.elapsed())
        ));
    }
    assert_ne!(boot_ids[0], boot_ids[1], "the guest really rebooted");
    drop(vm); // kills QEMU, possibly in the middle of a third boot
    assert!(
        backend.is_running(),
        "backend survives the guest's reboots and QEMU being killed"
    );

    // A new QEMU process against the same backend socket.
    let t = Instant::now();
    let mut vm = c.boot(&cmds(c.vm("guest-restart", &spec)), &spec);
    reboot_round(&vm, &spec, &listener, 2);
    let status = vm.wait_exit(STEP_TIMEOUT);
    assert!(status.success(), "QEMU exit status {status}");
    c.report(&format!(
        "restart test: new QEMU on the same backend socket did its work in {}",
        report::ms(t.elapsed())
    ));
    assert!(
        backend.is_running(),
        "backend still running after the second QEMU exited"
    );
}

// ---------------------------------------------------------------------------------------------
// h. 64-byte round trips (latency)

fn round_trip_latency(c: Case) {
    let spec = c.spec(3);
    let listener = host::listen_stream(&spec.uds, 5001).expect("listen");
    let _backend = Backend::spawn(std::slice::from_ref(&spec), &c.log_dir);
    let mut vm = c.boot(
        &c.vm("guest", &spec).cmd(&format!(
            "rr --cid {HOST_CID} --port 5001 --count 2000 --size 64"
        )),
        &spec,
    );
    let echo = thread::spawn(move || {
        let mut conn = host::accept(&listener, STEP_TIMEOUT, IDLE_TIMEOUT)?;
        host::stream_echo(&mut conn)
    });
    let res = vm.expect_result("rr", STEP_TIMEOUT * 2);
    let echoed = echo.join().expect("echo thread").expect("host echo");
    assert_eq!(echoed, 2000 * 64);
    c.report(&format!(
        "64 B round trips: avg {:.0} us, p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        res.f64("avg_us"),
        res.f64("p50_us"),
        res.f64("p99_us"),
        res.f64("max_us")
    ));
    finish(&mut vm);
}

// ---------------------------------------------------------------------------------------------

macro_rules! per_kernel {
    ($($case:ident),* $(,)?) => {
        /// The cases on the required 6.1 kernel.
        mod k6_1 {
            $(
                #[test]
                fn $case() {
                    if let Some(c) = super::Case::new(stringify!($case), "6.1") {
                        super::$case(c);
                    }
                }
            )*
        }
        /// The cases on the optional 6.12 kernel (multi-descriptor TX for writes > 32 KiB).
        mod k6_12 {
            $(
                #[test]
                fn $case() {
                    if let Some(c) = super::Case::new(stringify!($case), "6.12") {
                        super::$case(c);
                    }
                }
            )*
        }
    };
}

per_kernel!(
    stream_guest_to_host,
    stream_host_to_guest,
    seqpacket_boundaries,
    closed_port_fails_fast,
    half_close,
    two_vms_concurrently,
    reboot_and_restart,
    round_trip_latency,
);
