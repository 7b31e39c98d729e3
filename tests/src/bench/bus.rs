//! The bus rows (issue 11): one publisher guest to 1, 2, 4 and 8 subscriber guests, 64 B
//! and 1 KiB messages, through a domsockd hub bus and through a **broker** measured in the
//! same run: a host process that relays each message to N stream connections through the
//! same domsockd, the way people do it today without a bus.
//!
//! Every member is a user-space guest ([`domsock_guest::uvirtio::UserGuest`], native
//! speed) on its own VM of one domsockd; each subscriber runs in its own thread. Two
//! figures per cell:
//! - **delivered messages/s**: the publisher sends as fast as it may for the plan's
//!   duration; every message any subscriber received counts, up to the last one's arrival
//!   (a hub bus that drops for a slow subscriber delivers less than it was offered; the
//!   broker's blocking writes slow the publisher instead; both are what a user gets);
//! - **fan-out latency p50/p99**: one message at a time, from the publisher's send until
//!   the last subscriber has it (the next message waits for that).
//!
//! The messages carry their sequence number, which each subscriber checks (in order, none
//! twice; gaps only where the bus said it dropped); a cell with a violation fails.

use super::Plan;
use crate::backend::{Backend, VmSpec};
use crate::tmp::TempDir;
use domsock_guest::uvirtio::{
    Cid, ConnKey, GuestConfig, Port, SockError, SocketType, UserGuest, VsockAddr,
};
use domsock_proto::bus::wire::{
    BusName, CreateParams, Fields, MemberFrame, Policy, ServiceFrame, SlowPolicy, Want,
};
use domsock_proto::bus::BUS_PORT;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Subscriber counts of the rows.
pub const SUBSCRIBERS: [usize; 4] = [1, 2, 4, 8];
/// Message sizes of the rows.
pub const SIZES: [usize; 2] = [64, 1024];
const HOST_CID: u64 = 2;
const FIRST_CID: u32 = 3;
const BROKER_PORT: u32 = 5300;
const BUS_NAME: &str = "bench";
/// A member's queue on the bench bus.
const QUEUE_BYTES: u32 = 1 << 20;
/// Longest wait for one step (a join, a fan-out, a drain).
const STALL: Duration = Duration::from_secs(10);
/// The fan-out latency samples per cell.
const LATENCY_SAMPLES: usize = 2_000;
/// A message's head: sequence number (u64 LE), then padding to the message size.
const HEAD: usize = 8;

/// What one cell measured.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    /// Messages delivered per second (all subscribers together).
    pub delivered_per_s: f64,
    /// Messages the subscribers did not get of what was published to them.
    pub lost: u64,
    /// Fan-out latency, median.
    pub p50: Duration,
    /// Fan-out latency, 99th percentile.
    pub p99: Duration,
    /// domsockd CPU per million delivered messages, in seconds.
    pub cpu_s_per_m: Option<f64>,
}

/// One row: a subscriber count and a message size, on the bus and through the broker.
#[derive(Debug, Clone)]
pub struct Row {
    /// Subscribers.
    pub subscribers: usize,
    /// Message payload bytes.
    pub size: usize,
    /// Through the bus.
    pub bus: Result<Cell, String>,
    /// Through the broker.
    pub broker: Result<Cell, String>,
}

/// The stalled-member row of one message size: [`STALLED_FAST`] subscribers' delivered
/// rate alone and beside a member that joined and never reads (the bus drops for it once
/// its queue is full), medians of [`STALLED_ROUNDS`] alternating rounds.
#[derive(Debug, Clone)]
pub struct StalledRow {
    /// Message payload bytes.
    pub size: usize,
    /// The fast subscribers alone, messages/s.
    pub alone: Result<f64, String>,
    /// The same beside the stalled member.
    pub beside: Result<f64, String>,
}

/// Fast subscribers of the stalled-member rows.
pub const STALLED_FAST: usize = 2;
/// Rounds of the stalled-member rows (each one run alone and one beside the stalled one).
const STALLED_ROUNDS: usize = 3;

/// The bus section of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Rows in order.
    pub rows: Vec<Row>,
    /// The stalled-member rows, one per size.
    pub stalled: Vec<StalledRow>,
    /// The hypervisor's steal share while the rows ran ([`super::StealMeter`]).
    pub steal: Option<f64>,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Report {
    /// The table, with the ratios and the targets.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "bus: one publisher guest to N subscriber guests, hub bus vs a host broker process \
             relaying to N streams (same domsockd); {}",
            super::steal_text(self.steal)
        );
        let _ = writeln!(
            out,
            "{:<10} {:>13} {:>13} {:>8} {:>17} {:>17} {:>9} {:>9}",
            "subs/size",
            "bus msg/s",
            "broker msg/s",
            "bus/brk",
            "bus p50/p99 us",
            "brk p50/p99 us",
            "bus lost",
            "cpu s/M",
        );
        for r in &self.rows {
            let rate = |c: &Result<Cell, String>| match c {
                Ok(c) => format!("{:.0}", c.delivered_per_s),
                Err(e) => format!("FAIL({})", e.chars().take(40).collect::<String>()),
            };
            let lat = |c: &Result<Cell, String>| match c {
                Ok(c) => format!("{:.0}/{:.0}", us(c.p50), us(c.p99)),
                Err(_) => "-".into(),
            };
            let ratio = match (&r.bus, &r.broker) {
                (Ok(b), Ok(k)) if k.delivered_per_s > 0.0 => {
                    format!("{:.2}x", b.delivered_per_s / k.delivered_per_s)
                }
                _ => "-".into(),
            };
            let cpu = |c: &Result<Cell, String>| {
                c.as_ref()
                    .ok()
                    .and_then(|c| c.cpu_s_per_m)
                    .map_or_else(|| "-".into(), |v| format!("{v:.2}"))
            };
            let _ = writeln!(
                out,
                "{:<10} {:>13} {:>13} {:>8} {:>17} {:>17} {:>9} {:>9}",
                format!("{}/{}", r.subscribers, r.size),
                rate(&r.bus),
                rate(&r.broker),
                ratio,
                lat(&r.bus),
                lat(&r.broker),
                r.bus
                    .as_ref()
                    .map_or_else(|_| "-".into(), |c| c.lost.to_string()),
                format!("{}|{}", cpu(&r.bus), cpu(&r.broker)),
            );
        }
        let at4: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.subscribers == 4)
            .filter_map(|r| match (&r.bus, &r.broker) {
                (Ok(b), Ok(k)) if k.delivered_per_s > 0.0 => Some(format!(
                    "{} B {:.2}x, p99 {:.0} vs {:.0} us",
                    r.size,
                    b.delivered_per_s / k.delivered_per_s,
                    us(b.p99),
                    us(k.p99)
                )),
                _ => None,
            })
            .collect();
        let _ = writeln!(
            out,
            "at 4 subscribers (target >= 2x the broker's msg/s and a lower p99): {}",
            if at4.is_empty() {
                "-".to_owned()
            } else {
                at4.join("; ")
            }
        );
        if !self.stalled.is_empty() {
            let _ = writeln!(
                out,
                "bus: {STALLED_FAST} subscribers alone vs beside a member that never reads (median of {STALLED_ROUNDS} alternating rounds)"
            );
            let _ = writeln!(
                out,
                "{:<10} {:>13} {:>13} {:>8}",
                "size", "alone msg/s", "beside msg/s", "ratio"
            );
            for r in &self.stalled {
                let v = |x: &Result<f64, String>| match x {
                    Ok(v) => format!("{v:.0}"),
                    Err(e) => format!("FAIL({})", e.chars().take(30).collect::<String>()),
                };
                let ratio = match (&r.alone, &r.beside) {
                    (Ok(a), Ok(b)) if *a > 0.0 => format!("{:.2}x", b / a),
                    _ => "-".into(),
                };
                let _ = writeln!(
                    out,
                    "{:<10} {:>13} {:>13} {:>8}",
                    r.size,
                    v(&r.alone),
                    v(&r.beside),
                    ratio
                );
            }
            let _ = writeln!(out, "(target: beside >= 0.90x alone)");
        }
        out
    }

    /// JSON object.
    pub fn json(&self) -> String {
        let cell = |c: &Result<Cell, String>| {
            match c {
            Ok(c) => format!(
                "{{\"delivered_per_s\": {:.1}, \"lost\": {}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"cpu_s_per_m\": {}}}",
                c.delivered_per_s,
                c.lost,
                us(c.p50),
                us(c.p99),
                super::json_f64(c.cpu_s_per_m)
            ),
            Err(e) => format!("{{\"failed\": {e:?}}}"),
        }
        };
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"subscribers\": {}, \"size\": {}, \"bus\": {}, \"broker\": {}}}",
                    r.subscribers,
                    r.size,
                    cell(&r.bus),
                    cell(&r.broker)
                )
            })
            .collect();
        let num = |x: &Result<f64, String>| match x {
            Ok(v) => format!("{v:.1}"),
            Err(e) => format!("{{\"failed\": {e:?}}}"),
        };
        let stalled: Vec<String> = self
            .stalled
            .iter()
            .map(|r| {
                format!(
                    "{{\"size\": {}, \"alone_per_s\": {}, \"beside_stalled_per_s\": {}}}",
                    r.size,
                    num(&r.alone),
                    num(&r.beside)
                )
            })
            .collect();
        format!(
            "{{\"steal_share\": {}, \"rows\": [{}], \"stalled\": [{}]}}",
            super::json_f64(self.steal),
            rows.join(", "),
            stalled.join(", ")
        )
    }
}

/// Which way the messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Bus,
    Broker,
}

/// Runs the section with domsockd `binary`; `bus_config` is the config-file text that
/// lets the bench's VMs (names `m0`, `m1`, ...) create and use the bus (the daemon's
/// bus permissions).
pub fn run_all(binary: &Path, plan: &Plan, bus_config: &dyn Fn(usize) -> String) -> Report {
    let steal = super::StealMeter::start();
    let mut rows = Vec::new();
    for &subs in &SUBSCRIBERS {
        let bus = measure(binary, Via::Bus, subs, false, plan, bus_config);
        let broker = measure(binary, Via::Broker, subs, false, plan, bus_config);
        for (i, &size) in SIZES.iter().enumerate() {
            let pick = |r: &Result<Vec<Cell>, String>| r.clone().map(|v| v[i]);
            rows.push(Row {
                subscribers: subs,
                size,
                bus: pick(&bus),
                broker: pick(&broker),
            });
        }
    }
    // A stalled member beside fast ones: alternating rounds, each a daemon of its own.
    let mut alone: Vec<Vec<Result<f64, String>>> = vec![Vec::new(); SIZES.len()];
    let mut beside = alone.clone();
    for _ in 0..STALLED_ROUNDS {
        for (with_stalled, into) in [(false, &mut alone), (true, &mut beside)] {
            let r = measure(
                binary,
                Via::Bus,
                STALLED_FAST,
                with_stalled,
                plan,
                bus_config,
            );
            let rates: Result<Vec<String>, String> = r.clone().map(|v| {
                v.iter()
                    .map(|c| format!("{:.0}", c.delivered_per_s))
                    .collect()
            });
            eprintln!(
                "  bus, {STALLED_FAST} subscribers, stalled member {with_stalled}: {rates:?}"
            );
            for (i, cells) in into.iter_mut().enumerate() {
                cells.push(r.clone().map(|v| v[i].delivered_per_s));
            }
        }
    }
    let median = |v: Vec<Result<f64, String>>| -> Result<f64, String> {
        let mut v = v.into_iter().collect::<Result<Vec<f64>, String>>()?;
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2)
            .copied()
            .ok_or_else(|| "no rounds".to_owned())
    };
    let stalled = SIZES
        .iter()
        .zip(alone.into_iter().zip(beside))
        .map(|(&size, (a, b))| StalledRow {
            size,
            alone: median(a),
            beside: median(b),
        })
        .collect();
    Report {
        rows,
        stalled,
        steal: steal.share(),
    }
}

/// What the subscribers share with the publisher.
#[derive(Debug, Default)]
struct Tally {
    /// Messages received by all subscribers.
    received: AtomicU64,
    /// Nanoseconds since the run's epoch of the last receipt.
    last_ns: AtomicU64,
    /// Messages the bus told subscribers it dropped for them.
    lost: AtomicU64,
    /// A subscriber saw a message out of order or twice.
    disorder: AtomicU64,
    /// Subscribers stop.
    quit: AtomicBool,
}

/// Starts domsockd with `1 + subs` VMs; returns it, their specs and the scratch dir.
fn start(
    binary: &Path,
    subs: usize,
    bus_config: &dyn Fn(usize) -> String,
) -> Result<(Backend, Vec<VmSpec>, TempDir), String> {
    let tmp = TempDir::new("bench-bus").map_err(|e| format!("temp dir: {e}"))?;
    let specs: Vec<VmSpec> = (0..=subs as u32)
        .map(|i| VmSpec::in_dir(tmp.path(), FIRST_CID + i))
        .collect();
    let mut toml = String::new();
    for (i, s) in specs.iter().enumerate() {
        let _ = write!(
            toml,
            "[[vm]]\nguest-cid = {}\nsocket = \"{}\"\nuds-path = \"{}\"\nname = \"m{i}\"\n\n",
            s.cid,
            s.socket.display(),
            s.uds.display()
        );
    }
    toml.push_str(&bus_config(subs + 1));
    let config = tmp.path().join("domsockd.toml");
    std::fs::write(&config, toml).map_err(|e| format!("config: {e}"))?;
    let backend = Backend::spawn_binary_args(
        binary,
        &["--config".to_owned(), config.display().to_string()],
        &[],
        tmp.path(),
    );
    // The sockets of every VM exist once the daemon runs (spawned without `--vm`s, so
    // the wait above covered none).
    let deadline = Instant::now() + STALL;
    while !specs.iter().all(|s| s.socket.exists()) {
        if Instant::now() > deadline {
            return Err(format!("domsockd sockets: {}", backend.log_tail()));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok((backend, specs, tmp))
}

fn guest(spec: &VmSpec) -> Result<UserGuest, String> {
    UserGuest::connect(
        &spec.socket,
        GuestConfig::with_cid(Cid(u64::from(spec.cid))),
    )
    .map_err(|e| format!("guest {} setup: {e}", spec.cid))
}

fn host(port: u32) -> VsockAddr {
    VsockAddr::new(Cid(HOST_CID), Port(port))
}

/// A member's connection: a bus membership or a stream to the broker.
struct Member {
    g: UserGuest,
    key: ConnKey,
    via: Via,
    buf: Vec<u8>,
    /// Broker stream bytes not yet parsed.
    pending: Vec<u8>,
}

impl Member {
    fn join(spec: &VmSpec, via: Via, publisher: bool) -> Result<Member, String> {
        let mut g = guest(spec)?;
        let (port, ty) = match via {
            Via::Bus => (BUS_PORT.0, SocketType::SeqPacket),
            Via::Broker => (BROKER_PORT, SocketType::Stream),
        };
        let key = g
            .connect_timeout(host(port), ty, STALL)
            .map_err(|e| format!("guest {} connect: {e}", spec.cid))?;
        let mut m = Member {
            g,
            key,
            via,
            buf: vec![0; 128 << 10],
            pending: Vec::new(),
        };
        if via == Via::Bus {
            let mut frame = Vec::new();
            MemberFrame::Join {
                name: BusName::new(BUS_NAME).expect("name"),
                want: Want {
                    publish: publisher,
                    receive: !publisher,
                },
                create: publisher.then_some(CreateParams {
                    policy: Policy::Hub,
                    slow: SlowPolicy::Drop,
                    max_message: 64 << 10,
                    queue_bytes: QUEUE_BYTES,
                }),
                // Subscribers take BATCH frames unless DOMSOCK_BUS_BATCHES=0 (for A/B runs).
                batches: !publisher && std::env::var("DOMSOCK_BUS_BATCHES").as_deref() != Ok("0"),
            }
            .encode(&mut frame);
            m.g.send_msg_timeout(m.key, &frame, STALL)
                .map_err(|e| format!("JOIN: {e}"))?;
            let deadline = Instant::now() + STALL;
            loop {
                match m.g.recv_msg(m.key, &mut m.buf) {
                    Ok(Some(msg)) => match ServiceFrame::decode(&m.buf[..msg.len]) {
                        Ok(ServiceFrame::Joined(_)) => break,
                        other => return Err(format!("JOIN answered {other:?}")),
                    },
                    Ok(None) => return Err("bus service closed at JOIN".into()),
                    Err(SockError::WouldBlock) => {
                        let _ = m.g.poll(Some(Duration::from_millis(5)));
                    }
                    Err(e) => return Err(format!("JOIN: {e}")),
                }
                if Instant::now() > deadline {
                    return Err("no JOINED".into());
                }
            }
        }
        Ok(m)
    }

    /// Sends message `seq` of `size` bytes; false when it would block.
    fn publish(&mut self, seq: u64, size: usize, frame: &mut Vec<u8>) -> Result<bool, String> {
        let mut payload = [0u8; 1024];
        payload[..HEAD].copy_from_slice(&seq.to_le_bytes());
        let payload = &payload[..size];
        frame.clear();
        let r = match self.via {
            Via::Bus => {
                MemberFrame::Publish {
                    fields: Fields::None,
                    payload,
                }
                .encode(frame);
                self.g.send_msg(self.key, frame)
            }
            Via::Broker => {
                frame.extend_from_slice(&(size as u32).to_le_bytes());
                frame.extend_from_slice(payload);
                // A stream may take part of it: the rest goes before anything else.
                let mut off = 0;
                let deadline = Instant::now() + STALL;
                while off < frame.len() {
                    match self.g.send(self.key, &frame[off..]) {
                        Ok(n) => off += n,
                        Err(SockError::WouldBlock) if off == 0 => return Ok(false),
                        Err(SockError::WouldBlock) => {
                            if Instant::now() > deadline {
                                return Err("publisher stalled".into());
                            }
                            let _ = self.g.poll(Some(Duration::from_millis(1)));
                        }
                        Err(e) => return Err(format!("publish: {e}")),
                    }
                }
                Ok(())
            }
        };
        match r {
            Ok(()) => Ok(true),
            Err(SockError::WouldBlock) => Ok(false),
            Err(e) => Err(format!("publish: {e}")),
        }
    }

    /// Receives until `quit`, counting into `tally`.
    fn subscribe(mut self, tally: &Tally, epoch: Instant) -> Result<(), String> {
        let mut next_seq = 1u64;
        let mut count = |seq: u64, tally: &Tally| {
            if seq < next_seq {
                tally.disorder.fetch_add(1, Ordering::Relaxed);
            }
            next_seq = seq + 1;
            tally
                .last_ns
                .store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
            tally.received.fetch_add(1, Ordering::Release);
        };
        while !tally.quit.load(Ordering::Acquire) {
            let got = match self.via {
                Via::Bus => match self.g.recv_msg(self.key, &mut self.buf) {
                    Ok(Some(m)) => {
                        match ServiceFrame::decode(&self.buf[..m.len]) {
                            Ok(ServiceFrame::Message { payload, .. }) if payload.len() >= HEAD => {
                                count(seq_of(payload), tally);
                            }
                            Ok(ServiceFrame::Batch(b)) => {
                                for f in b.frames() {
                                    match ServiceFrame::decode(f) {
                                        Ok(ServiceFrame::Message { payload, .. })
                                            if payload.len() >= HEAD =>
                                        {
                                            count(seq_of(payload), tally)
                                        }
                                        other => return Err(format!("in a batch: {other:?}")),
                                    }
                                }
                            }
                            Ok(ServiceFrame::Loss { messages, .. }) => {
                                tally.lost.fetch_add(messages, Ordering::Relaxed);
                            }
                            other => return Err(format!("subscriber got {other:?}")),
                        }
                        true
                    }
                    Ok(None) => return Err("bus service closed".into()),
                    Err(SockError::WouldBlock) => false,
                    Err(e) => return Err(format!("subscriber: {e}")),
                },
                Via::Broker => match self.g.recv(self.key, &mut self.buf) {
                    Ok(0) => return Err("broker closed".into()),
                    Ok(n) => {
                        self.pending.extend_from_slice(&self.buf[..n]);
                        let mut at = 0;
                        while self.pending.len() >= at + 4 {
                            let len =
                                u32::from_le_bytes(self.pending[at..at + 4].try_into().unwrap())
                                    as usize;
                            if self.pending.len() < at + 4 + len {
                                break;
                            }
                            let p = &self.pending[at + 4..at + 4 + len];
                            count(seq_of(p), tally);
                            at += 4 + len;
                        }
                        self.pending.drain(..at);
                        true
                    }
                    Err(SockError::WouldBlock) => false,
                    Err(e) => return Err(format!("subscriber: {e}")),
                },
            };
            if !got {
                let _ = self.g.poll(Some(Duration::from_millis(1)));
            }
        }
        Ok(())
    }
}

/// The sequence number a bench message starts with (`HEAD` bytes).
fn seq_of(payload: &[u8]) -> u64 {
    u64::from_le_bytes(payload[..HEAD].try_into().expect("HEAD bytes"))
}

/// The broker: accepts the publisher's stream on its VM's listener and one per subscriber
/// on theirs, then relays every length-prefixed message to every subscriber (blocking
/// writes, in order) until the publisher's stream ends.
fn broker(listeners: Vec<UnixListener>) -> Result<(), String> {
    let mut streams = Vec::new();
    for l in &listeners {
        let s = crate::host::accept(l, STALL, STALL).map_err(|e| format!("broker accept: {e}"))?;
        s.set_read_timeout(None).map_err(|e| e.to_string())?;
        streams.push(s);
    }
    let mut subs: Vec<UnixStream> = streams.split_off(1);
    let mut publisher = streams.pop().expect("publisher stream");
    let mut msg = vec![0u8; 4 + 64 * 1024];
    loop {
        if publisher.read_exact(&mut msg[..4]).is_err() {
            return Ok(());
        }
        let len = u32::from_le_bytes(msg[..4].try_into().unwrap()) as usize;
        if !(HEAD..=64 * 1024).contains(&len) {
            return Err(format!("broker: message of {len} bytes"));
        }
        publisher
            .read_exact(&mut msg[4..4 + len])
            .map_err(|e| format!("broker read: {e}"))?;
        for s in &mut subs {
            s.write_all(&msg[..4 + len])
                .map_err(|e| format!("broker write: {e}"))?;
        }
    }
}

/// One transport with `subs` subscribers: a cell per size of [`SIZES`]. With `stalled`
/// (bus only) one more member joins to receive and never reads: its guest never services
/// its device, so its RX ring, its connection and then its queue on the bus fill, and the
/// bus drops for it from then on; it is not counted.
fn measure(
    binary: &Path,
    via: Via,
    subs: usize,
    stalled: bool,
    plan: &Plan,
    bus_config: &dyn Fn(usize) -> String,
) -> Result<Vec<Cell>, String> {
    let (backend, mut specs, _tmp) = start(binary, subs + usize::from(stalled), bus_config)?;
    let stalled_spec = stalled.then(|| specs.pop().expect("the stalled member's VM"));
    let broker_thread = match via {
        Via::Bus => None,
        Via::Broker => {
            let listeners = specs
                .iter()
                .map(|s| crate::host::listen_stream(&s.uds, BROKER_PORT).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, String>>()?;
            Some(thread::spawn(move || broker(listeners)))
        }
    };
    // The publisher first: on the bus it creates it.
    let mut publisher = Member::join(&specs[0], via, true)?;
    // Held, never read, until the end.
    let _stalled = match &stalled_spec {
        Some(spec) => Some(Member::join(spec, via, false)?),
        None => None,
    };
    let epoch = Instant::now();
    let tally = Arc::new(Tally::default());
    let ready = Arc::new(Barrier::new(subs + 1));
    let mut threads = Vec::new();
    for spec in &specs[1..] {
        let (tally, ready, spec) = (tally.clone(), ready.clone(), spec.clone());
        threads.push(thread::spawn(move || {
            let m = Member::join(&spec, via, false);
            ready.wait();
            m?.subscribe(&tally, epoch)
        }));
    }
    ready.wait();
    let result = (|| {
        let mut cells = Vec::new();
        let mut seq = 0u64;
        let mut frame = Vec::new();
        for &size in &SIZES {
            // Throughput.
            let before = tally.received.load(Ordering::Acquire);
            let lost_before = tally.lost.load(Ordering::Relaxed);
            let cpu0 = backend.cpu_time();
            let start_ns = epoch.elapsed().as_nanos() as u64;
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < plan.duration {
                if publisher.publish(seq + 1, size, &mut frame)? {
                    seq += 1;
                    sent += 1;
                } else {
                    let _ = publisher.g.poll(Some(Duration::from_millis(1)));
                }
            }
            // Drain: until every message arrived, or nothing moved for 200 ms.
            let want = before + sent * subs as u64;
            let mut last = (tally.received.load(Ordering::Acquire), Instant::now());
            loop {
                let now = tally.received.load(Ordering::Acquire);
                if now >= want {
                    break;
                }
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_millis(200) {
                    break;
                }
                let _ = publisher.g.poll(Some(Duration::from_millis(1)));
            }
            let cpu = backend.cpu_time() - cpu0;
            let delivered = tally.received.load(Ordering::Acquire) - before;
            let end_ns = tally.last_ns.load(Ordering::Relaxed).max(start_ns + 1);
            let secs = (end_ns - start_ns) as f64 / 1e9;
            let lost = want
                .saturating_sub(delivered + before)
                .max(tally.lost.load(Ordering::Relaxed) - lost_before);
            if via == Via::Broker && lost > 0 {
                return Err(format!("the broker lost {lost} messages"));
            }
            // Latency: one message at a time.
            let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
            for _ in 0..LATENCY_SAMPLES {
                let target = tally.received.load(Ordering::Acquire) + subs as u64;
                let t = Instant::now();
                while !publisher.publish(seq + 1, size, &mut frame)? {
                    let _ = publisher.g.poll(Some(Duration::from_millis(1)));
                }
                seq += 1;
                while tally.received.load(Ordering::Acquire) < target {
                    if t.elapsed() > STALL {
                        return Err("a message did not reach every subscriber".into());
                    }
                    // The publisher's device is serviced while it waits (its TX
                    // completions), as a real guest's would be by its kernel.
                    let _ = publisher.g.poll(Some(Duration::ZERO));
                    // Spinning without yielding kept the host's threads off this core
                    // until the next tick or a subscriber's poll timeout: on 2 cores that
                    // was a 1-3 ms tail in 1-3 % of the samples, bus and broker alike,
                    // moving with the subscribers' poll timeout (a bench artifact, not
                    // the path's latency).
                    thread::yield_now();
                }
                samples.push(t.elapsed());
            }
            let (p50, p99) = super::percentiles(&mut samples);
            cells.push(Cell {
                delivered_per_s: delivered as f64 / secs,
                lost,
                p50,
                p99,
                cpu_s_per_m: (delivered > 0).then(|| cpu.as_secs_f64() / (delivered as f64 / 1e6)),
            });
        }
        if tally.disorder.load(Ordering::Relaxed) > 0 {
            return Err(format!(
                "{} messages out of order or twice",
                tally.disorder.load(Ordering::Relaxed)
            ));
        }
        Ok(cells)
    })();
    tally.quit.store(true, Ordering::Release);
    let mut first_err = None;
    for t in threads {
        if let Err(e) = t
            .join()
            .map_err(|_| "subscriber panicked".to_string())
            .and_then(|r| r)
        {
            first_err.get_or_insert(e);
        }
    }
    drop(publisher);
    if let Some(b) = broker_thread {
        // The publisher's stream closed: the broker ends (or already failed).
        let _ = b.join();
    }
    drop(backend);
    match (result, first_err) {
        (Ok(cells), None) => Ok(cells),
        (Err(e), _) | (Ok(_), Some(e)) => Err(e),
    }
}
