//! `domsock-bench`: domsockd against vhost-device-vsock 0.3.0 and host-only baselines, in
//! one run, with the same native-speed user-space guest driving both backends. Prints a
//! table with ratios and writes JSON.
//!
//! ```text
//! domsock-bench [--quick] [--json PATH] [--no-peer] [--no-baselines] [--no-tunnel]
//!               [--tunnel-only] [--relayed-only] [--no-bus] [--bus-only]
//! ```
//! The tunnel rows (one channel through the domsockd tunnel against plain rustls TLS and
//! raw TCP over a veth pair between two network namespaces, then 64 channels and 63 with
//! one stalled) need root for `ip netns`; without it they run over loopback and say so.
//! `--tunnel-only` runs just them. With them (root only) come the relayed-session rows
//! (`domsock_tests::bench::relayed`): one session whose guest moved to another host,
//! through two domsockd and their tunnel, against rustls TLS between the same two hosts
//! and a session at home; `--relayed-only` runs just those. The bus rows
//! (`domsock_tests::bench::bus`: one publisher guest to 1-8 subscriber guests on a hub bus
//! against a host broker process relaying to N streams) run in a full run; `--bus-only`
//! runs just them, `--no-bus` skips them.
//! `--quick` runs every scenario briefly (smoke test); `--no-peer` skips vhost-device-vsock;
//! `--no-baselines` skips the Unix-pair and TCP runs (for profiling one backend);
//! `DOMSOCKD=<path>` picks the domsockd binary (default `target/release/domsockd`);
//! `DOMSOCK_BENCH_ROWS=key,..` runs only those rows of the tunnel and relayed sections (to
//! profile one, e.g. `tunnel_1`, `relayed_g2h`).
//! `DOMSOCK_BENCH_ONLY=<text>` runs only the vsock scenarios whose key contains it
//! (e.g. `host_to_guest/64`, `round_trip`, `concurrent`);
//! (otherwise it is installed into .cache/peer with `cargo install` when missing).
#![forbid(unsafe_code)]

use domsock_tests::artifacts;
use domsock_tests::bench::report::Results;
use domsock_tests::bench::{
    baseline, bus, median_latency, median_throughput, peer, relayed, tunnel, vsock, Measurement,
    Outcome, Plan, Scenario, Transport, RR_SIZE, WRITE_SIZES,
};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

struct Args {
    quick: bool,
    json: PathBuf,
    peer: bool,
    baselines: bool,
    tunnel: bool,
    relayed: bool,
    bus: bool,
    vsock: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        quick: false,
        json: artifacts::workspace_root().join("target/bench/bench.json"),
        peer: true,
        baselines: true,
        tunnel: true,
        relayed: true,
        bus: true,
        vsock: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--no-peer" => args.peer = false,
            "--no-baselines" => args.baselines = false,
            "--no-tunnel" => {
                args.tunnel = false;
                args.relayed = false;
            }
            "--relayed-only" => {
                args.vsock = false;
                args.baselines = false;
                args.tunnel = false;
                args.bus = false;
            }
            "--tunnel-only" => {
                args.vsock = false;
                args.baselines = false;
                args.bus = false;
            }
            "--no-bus" => args.bus = false,
            "--bus-only" => {
                args.vsock = false;
                args.baselines = false;
                args.tunnel = false;
                args.relayed = false;
            }
            "--json" => args.json = it.next().ok_or("--json needs a path")?.into(),
            "-h" | "--help" => {
                return Err("usage: domsock-bench [--quick] [--json PATH] [--no-peer]".into())
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn baselines(plan: &Plan, results: &mut Results) {
    for &size in &WRITE_SIZES {
        for (t, run) in [
            (
                Transport::UnixPair,
                baseline::throughput::<UnixStream> as fn(_, &_) -> _,
            ),
            (Transport::TcpLoopback, baseline::throughput::<TcpStream>),
        ] {
            let runs: Result<Vec<_>, _> = (0..plan.repeats).map(|_| run(size, plan)).collect();
            let outcome = match runs {
                Ok(v) => Outcome::Throughput(median_throughput(v).expect("repeats >= 1")),
                Err(e) => Outcome::Failed(e.to_string()),
            };
            // A socket pair has no direction: the same writer->reader run is the baseline
            // of both guest->host and host->guest.
            results.push(Measurement {
                scenario: Scenario::HostToGuest { size },
                transport: t,
                outcome: outcome.clone(),
            });
            results.push(Measurement {
                scenario: Scenario::GuestToHost { size },
                transport: t,
                outcome,
            });
        }
    }
    for (t, run) in [
        (
            Transport::UnixPair,
            baseline::latency::<UnixStream> as fn(_, &_) -> _,
        ),
        (Transport::TcpLoopback, baseline::latency::<TcpStream>),
    ] {
        let runs: Result<Vec<_>, _> = (0..plan.repeats).map(|_| run(RR_SIZE, plan)).collect();
        let outcome = match runs {
            Ok(v) => Outcome::Latency(median_latency(v).expect("repeats >= 1")),
            Err(e) => Outcome::Failed(e.to_string()),
        };
        results.push(Measurement {
            scenario: Scenario::RoundTrip { size: RR_SIZE },
            transport: t,
            outcome,
        });
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--tunnel-role") {
        // One side of a tunnel row, re-executed in its network namespace.
        return match tunnel::role(&argv[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tunnel role {:?}: {e}", &argv[2..]);
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let mut results = Results::default();
    results.meta.push((
        "command".into(),
        std::env::args().collect::<Vec<_>>().join(" "),
    ));
    results.meta.push(("plan".into(), format!("{plan:?}")));
    results.meta.push((
        "cpus".into(),
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string()),
    ));

    if args.baselines {
        eprintln!("baselines (unix pair, tcp loopback) ...");
        baselines(&plan, &mut results);
    }

    let domsockd = std::env::var_os("DOMSOCKD").map_or_else(
        || artifacts::workspace_root().join("target/release/domsockd"),
        PathBuf::from,
    );
    let mut backends = vec![(Transport::Domsockd, Ok(domsockd))];
    if !args.vsock {
        backends.clear();
    }
    if args.peer && args.vsock {
        backends.push((Transport::VhostDeviceVsock, peer::ensure_peer()));
    }
    for (transport, binary) in backends {
        match binary {
            Ok(bin) if bin.is_file() => {
                eprintln!("{} ({}) ...", transport.name(), bin.display());
                vsock::run_all(transport, &bin, &plan, &mut results);
            }
            Ok(bin) => eprintln!(
                "{}: {} not found (build it first)",
                transport.name(),
                bin.display()
            ),
            Err(e) => eprintln!("{}: unavailable: {e}", transport.name()),
        }
    }

    let tunnel_report = args.tunnel.then(|| {
        eprintln!("tunnel (veth between network namespaces) ...");
        tunnel::run_all(&plan)
    });

    let relayed_report = args.relayed.then(|| {
        eprintln!("relayed session (two hosts, each with domsockd) ...");
        relayed::run_all(&plan)
    });

    let bus_report = args.bus.then(|| {
        let bin = artifacts::backend_binary();
        eprintln!("bus ({}) ...", bin.display());
        // The bench's guests may create (and use) the bench bus.
        bus::run_all(&bin, &plan, &|_| {
            "[[policy.bus-create]]\nfrom = \"*\"\n".to_owned()
        })
    });

    println!("{}", results.table());
    if let Some(t) = &tunnel_report {
        println!("{}", t.table());
    }
    if let Some(r) = &relayed_report {
        println!("{}", relayed::table(r));
    }
    if let Some(r) = &bus_report {
        println!("{}", r.table());
    }
    if let Some(dir) = args.json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let mut json = results.json();
    if let Some(t) = &tunnel_report {
        // One more top-level member before the closing brace.
        if let Some(at) = json.rfind('}') {
            json.replace_range(at.., &format!(",\n  \"tunnel\": {}\n}}\n", t.json()));
        }
    }
    if let Some(r) = &relayed_report {
        if let Some(at) = json.rfind('}') {
            json.replace_range(at.., &format!(",\n  \"relayed\": {}\n}}\n", r.json()));
        }
    }
    if let Some(r) = &bus_report {
        if let Some(at) = json.rfind('}') {
            json.replace_range(at.., &format!(",\n  \"bus\": {}\n}}\n", r.json()));
        }
    }
    match std::fs::write(&args.json, json) {
        Ok(()) => println!("JSON: {}", args.json.display()),
        Err(e) => eprintln!("cannot write {}: {e}", args.json.display()),
    }
    ExitCode::SUCCESS
}
