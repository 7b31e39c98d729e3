//! The main job, end to end: domsockd serving a real Debian guest under QEMU that exchanges
//! checksummed data with host processes over the hybrid vsock convention, then prints what
//! happened. Run through `scripts/demo.sh`, which prepares the guest kernel and initramfs.
//!
//! Two guests, `web` (CID 3) and `db` (CID 4), on one domsockd configured by a TOML file
//! whose policy lets `web` reach `db` on port 7000 only. Steps on `web`: it streams 64 MiB
//! to a host listener on `<uds>_5000`; a host process connects to guest port 6000 with
//! `CONNECT 6000` and streams 16 MiB back; it exchanges seqpacket messages of 1 B to 64 KiB
//! with a host seqpacket socket and checks every boundary; it connects to a port nobody
//! listens on and must fail at once; 1000 round trips of 64 bytes measure latency. Then,
//! once `db` listens (a host gate holds `web` until then), `web` finds `db` by name and the
//! two stream 64 MiB to each other at once (checksums
//! cross-checked), and `web`'s connection to `db` port 7001, which the policy denies,
//! must fail at once.
#![forbid(unsafe_code)]

use std::net::Shutdown;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use domsock_guest::pattern::pattern_checksum;
use domsock_tests::artifacts::{self, REQUIRED_KERNEL};
use domsock_tests::backend::{Backend, VmSpec};
use domsock_tests::host;
use domsock_tests::report;
use domsock_tests::tmp::TempDir;
use domsock_tests::vm::{Vm, VmConfig};

const TIMEOUT: Duration = Duration::from_secs(120);
const TO_HOST_BYTES: u64 = 64 << 20;
const TO_GUEST_BYTES: u64 = 16 << 20;
const CHUNK: usize = 64 << 10;
const G2G_BYTES: u64 = 64 << 20;
const G2G_CHUNK: usize = 1 << 20;
/// db's duplex listener, and the port web waits on until db listens there.
const G2G_PORT: u32 = 7000;
const GATE_PORT: u32 = 6990;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(ok: bool, what: &str) -> Result<&'static str, String> {
    if ok {
        Ok("ok")
    } else {
        Err(format!("{what} does not match"))
    }
}

fn run() -> Result<(), String> {
    let kernel = artifacts::kernel(REQUIRED_KERNEL)
        .ok_or("guest kernel missing: run tests/vm/setup.sh first")?;
    let tmp = TempDir::new("demo").map_err(|e| e.to_string())?;
    let log_dir = artifacts::log_root().join("demo");
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let spec = VmSpec::in_dir(tmp.path(), 3);
    let db = VmSpec::in_dir(tmp.path(), 4);
    let sink = host::listen_stream(&spec.uds, 5000).map_err(|e| e.to_string())?;
    let echo = host::listen_stream(&spec.uds, 5001).map_err(|e| e.to_string())?;
    let seq = host::listen_seqpacket(&spec.uds, 5002).map_err(|e| e.to_string())?;
    let config = format!(
        "[[vm]]\nguest-cid = 3\nsocket = {:?}\nuds-path = {:?}\nname = \"web\"\n\n\
         [[vm]]\nguest-cid = 4\nsocket = {:?}\nuds-path = {:?}\nname = \"db\"\n\n\
         [[policy.allow]]\nfrom = \"web\"\nto = \"db\"\nports = \"7000\"\ntypes = [\"stream\"]\n",
        spec.socket, spec.uds, db.socket, db.uds
    );
    let config_path = tmp.path().join("domsockd.toml");
    std::fs::write(&config_path, &config).map_err(|e| e.to_string())?;

    println!(
        "domsock demo: domsockd + two Debian {} guests, web and db (QEMU, TCG)",
        kernel.name
    );
    println!("  backend : {}", artifacts::backend_binary().display());
    println!(
        "  sockets : vhost-user {}, host {}",
        spec.socket.display(),
        spec.uds.display()
    );
    println!(
        "  policy  : web -> db port 7000 (stream) only; everything else between guests denied"
    );
    let backend = Backend::spawn_config(&config_path, &[], &[spec.clone(), db.clone()], &log_dir);
    let cfg = VmConfig::new("demo", &kernel, &spec.socket, &log_dir)
        .cmd(&format!(
            "send --cid 2 --port 5000 --bytes {TO_HOST_BYTES} --chunk {CHUNK} --seed 7"
        ))
        .cmd("recv --port 6000")
        .cmd("seq-echo-client --cid 2 --port 5002 --sizes 1,2,7,4095,4096,4097,32768,65535,65536")
        .cmd("connect-expect-fail --cid 2 --port 5999")
        .cmd("rr --cid 2 --port 5001 --count 1000 --size 64")
        .cmd(&format!("recv --port {GATE_PORT}"))
        .cmd(&format!(
            "duplex-client --peer db --port {G2G_PORT} --bytes {G2G_BYTES} --chunk {G2G_CHUNK} --timeout-ms 120000"
        ))
        .cmd("connect-expect-fail --peer db --port 7001");
    let cfg_db = VmConfig::new("demo-db", &kernel, &db.socket, &log_dir).cmd(&format!(
        "duplex-server --port {G2G_PORT} --bytes {G2G_BYTES} --chunk {G2G_CHUNK} --timeout-ms 120000"
    ));
    let vm_db = Vm::boot(&cfg_db);
    let vm = Vm::boot(&cfg);
    let cid = vm.expect_cid(TIMEOUT);
    println!(
        "\nguest booted to vsock ready in {} (CID {cid})\n",
        report::ms(vm.uptime())
    );

    // 1. guest -> host stream.
    let mut conn =
        host::accept(&sink, TIMEOUT, TIMEOUT).map_err(|e| format!("accept 5000: {e}"))?;
    let got = host::read_to_eof(&mut conn).map_err(|e| e.to_string())?;
    drop(conn);
    let res = vm.expect_result("send", TIMEOUT);
    let want = pattern_checksum(7, TO_HOST_BYTES);
    let verdict = check(
        got.sum.hex() == want.hex() && res.str("xxh3") == want.hex(),
        "guest->host checksum",
    )?;
    println!(
        "guest -> host  {:>4} MiB  xxh3 {}  {:>6.1} MB/s   checksum {verdict}",
        TO_HOST_BYTES >> 20,
        got.sum.hex(),
        res.f64("mbps")
    );

    // 2. host -> guest stream through CONNECT.
    vm.expect_ready(6000, TIMEOUT);
    let t = Instant::now();
    let mut conn = host::connect_guest_ok(&spec.uds, 6000, TIMEOUT).map_err(|e| e.to_string())?;
    let handshake = t.elapsed();
    let sent =
        host::write_pattern(&mut conn, 8, TO_GUEST_BYTES, CHUNK).map_err(|e| e.to_string())?;
    conn.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    host::read_to_eof(&mut conn).map_err(|e| e.to_string())?;
    let res = vm.expect_result("recv", TIMEOUT);
    let verdict = check(res.str("xxh3") == sent.sum.hex(), "host->guest checksum")?;
    println!(
        "host -> guest  {:>4} MiB  xxh3 {}  {:>6.1} MB/s   checksum {verdict} (CONNECT 6000 -> OK in {})",
        TO_GUEST_BYTES >> 20,
        sent.sum.hex(),
        res.f64("mbps"),
        report::ms(handshake)
    );

    // 3. seqpacket boundaries.
    let seq_thread = thread::spawn(move || {
        let mut c = host::accept(&seq, TIMEOUT, TIMEOUT)?;
        host::seqpacket_echo(&mut c)
    });
    let res = vm.expect_result("seq-echo-client", TIMEOUT);
    let sizes = seq_thread
        .join()
        .map_err(|_| "seqpacket thread panicked")?
        .map_err(|e| e.to_string())?;
    println!(
        "seqpacket      {} messages of 1 B..64 KiB echoed, boundaries checked both ways: {} ok",
        sizes.len(),
        res.u64("ok")
    );

    // 4. refused connection.
    let res = vm.expect_result("connect-expect-fail", TIMEOUT);
    println!(
        "closed port    guest connect to 2:5999 failed with {} after {} ms",
        res.str("errno"),
        res.str("ms")
    );

    // 5. round trips.
    let echo_thread = thread::spawn(move || {
        let mut c = host::accept(&echo, TIMEOUT, TIMEOUT)?;
        host::stream_echo(&mut c)
    });
    let res = vm.expect_result("rr", TIMEOUT);
    let _ = echo_thread.join();
    println!(
        "round trips    {}",
        res.raw.trim_start_matches("DS-RESULT cmd=rr ")
    );

    // 6. guest to guest, by name, both ways at once. db boots alongside web and may still
    //    be booting on a busy machine: web waits at a gate until db listens.
    let db_cid = vm_db.expect_cid(TIMEOUT);
    vm_db.expect_ready(G2G_PORT, TIMEOUT);
    vm.expect_ready(GATE_PORT, TIMEOUT);
    let mut gate =
        host::connect_guest_ok(&spec.uds, GATE_PORT, TIMEOUT).map_err(|e| e.to_string())?;
    gate.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    host::read_to_eof(&mut gate).map_err(|e| e.to_string())?;
    drop(gate);
    let web_side = vm.expect_result("duplex-client", TIMEOUT);
    let db_side = vm_db.expect_result("duplex-server", TIMEOUT);
    let web_sent = pattern_checksum(u64::from(cid), G2G_BYTES);
    let db_sent = pattern_checksum(u64::from(db_cid), G2G_BYTES);
    let verdict = check(
        web_side.str("sent_xxh3") == web_sent.hex()
            && db_side.str("recv_xxh3") == web_sent.hex()
            && db_side.str("sent_xxh3") == db_sent.hex()
            && web_side.str("recv_xxh3") == db_sent.hex(),
        "guest<->guest checksums",
    )?;
    println!(
        "guest <-> guest {:>3} MiB each way at once, web found db (CID {db_cid}) by name in {} ms: \
         web sent {:.1} MB/s, db sent {:.1} MB/s, checksums {verdict}",
        G2G_BYTES >> 20,
        web_side.str("resolve_ms"),
        web_side.f64("send_mbps"),
        db_side.f64("send_mbps"),
    );

    // 7. denied by the policy.
    let res = vm.expect_result("connect-expect-fail", TIMEOUT);
    println!(
        "policy         web -> db:7001 (no rule) failed with {} after {} ms",
        res.str("errno"),
        res.str("ms")
    );

    vm.expect_done(TIMEOUT);
    vm_db.expect_done(TIMEOUT);
    drop(vm);
    drop(vm_db);
    drop(backend);
    let log = std::fs::read_to_string(log_dir.join("backend.log")).unwrap_or_default();
    println!();
    for name in ["web", "db"] {
        let needle = format!("vm={name} ");
        if let Some(line) = log
            .lines()
            .rev()
            .find(|l| l.contains("counters") && l.contains(&needle))
        {
            let counters = line.split("stats=").nth(1).unwrap_or(line);
            println!("domsockd counters of {name}: {counters}");
        }
    }
    println!("logs: {}", log_dir.display());
    Ok(())
}
