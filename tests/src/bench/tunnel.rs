//! The tunnel rows: one channel through the domsockd tunnel against a plain rustls TLS
//! stream (same certificates and rustls configuration) and raw TCP, all with 64 KiB
//! writes between two network namespaces joined by a veth pair; then 64 channels sharing
//! one tunnel, and 63 busy channels beside one stalled one.
//!
//! The namespaces are `ds-bench-a` and `ds-bench-b` (veth `ds-bench-va`/`ds-bench-vb`,
//! 198.18.0.1 and 198.18.0.2, the RFC 2544 benchmarking range, reachable only between the
//! two namespaces), created for the run and deleted afterwards. Each side is this binary
//! re-executed in its namespace (`--tunnel-role ...`), so no thread changes namespace.
//! Without `ip netns` (not root, no iproute2), both sides run on 127.0.0.1 and the table
//! says so.
//!
//! Each measurement: the sender writes for the plan's duration, shuts its write side, and
//! stops the clock when the receiver has confirmed the byte count (an 8-byte reply), so
//! everything counted was delivered. Each side runs on its own half of the CPUs
//! ([`pin_host`]), as two hosts would.

use super::Plan;
use domsock_host::test_utils::TempDir;
use domsock_host::tunnel::{
    certs, tls::TlsMaterial, Acceptor, ChannelEnd, ChannelKind, ReadyGroup, Refusal, TunnelConfig,
    TunnelService,
};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WRITE_BYTES: usize = 64 << 10;
const NS_A: &str = "ds-bench-a";
const NS_B: &str = "ds-bench-b";
const VETH_A: &str = "ds-bench-va";
const VETH_B: &str = "ds-bench-vb";
const ADDR_A: &str = "198.18.0.1";
const ADDR_B: &str = "198.18.0.2";
const PORT: u16 = 47_000;
/// Channels of the sharing rows.
pub const CHANNELS: usize = 64;

/// One row of the tunnel table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Label.
    pub label: String,
    /// Machine-readable key.
    pub key: String,
    /// Payload MB/s (10^6 bytes per second), or why not.
    pub mbps: Result<f64, String>,
    /// CPU seconds per GiB moved of the processes the row names (its median run's).
    pub cpu_s_per_gib: Option<f64>,
    /// Every round's MB/s in round order (empty when a round failed), for ratios of
    /// rows measured in the same round ([`Report::ratio`]).
    pub rounds_mbps: Vec<f64>,
}

/// One measurement of a row.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Payload MB/s.
    pub mbps: f64,
    /// CPU seconds per GiB, when known.
    pub cpu_s_per_gib: Option<f64>,
}

impl Measured {
    /// `bytes` in `secs`, with `cpu` spent on them.
    pub fn new(bytes: f64, secs: f64, cpu: Option<Duration>) -> Measured {
        Measured {
            mbps: bytes / secs / 1e6,
            cpu_s_per_gib: cpu
                .filter(|_| bytes > 0.0)
                .map(|c| c.as_secs_f64() / (bytes / f64::from(1u32 << 30))),
        }
    }
}

impl Row {
    /// The row of `runs` (one per round): the median round's rate and CPU, or the first
    /// failure.
    pub fn median(label: &str, key: &str, runs: Vec<Result<Measured, String>>) -> Row {
        let mut rounds_mbps = Vec::new();
        let (mbps, cpu_s_per_gib) = match runs.into_iter().collect::<Result<Vec<_>, String>>() {
            Ok(mut v) if !v.is_empty() => {
                rounds_mbps = v.iter().map(|m| m.mbps).collect();
                v.sort_by(|a, b| a.mbps.total_cmp(&b.mbps));
                let m = v[v.len() / 2];
                (Ok(m.mbps), m.cpu_s_per_gib)
            }
            Ok(_) => (Err("no runs".to_owned()), None),
            Err(e) => (Err(e), None),
        };
        Row {
            label: label.to_owned(),
            key: key.to_owned(),
            mbps,
            cpu_s_per_gib,
            rounds_mbps,
        }
    }
}

/// `rows` as table lines (label, MB/s, CPU s/GiB), labels `width` wide.
pub fn rows_table(out: &mut String, rows: &[Row], width: usize, cpu_header: &str) {
    let _ = writeln!(out, "{:<width$} {:>10} {:>10}", "", "MB/s", cpu_header);
    for r in rows {
        let v = match &r.mbps {
            Ok(v) => format!("{v:.1}"),
            Err(e) => format!("FAIL ({e})"),
        };
        let cpu = r
            .cpu_s_per_gib
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"));
        let _ = writeln!(out, "{:<width$} {:>10} {:>10}", r.label, v, cpu);
    }
}

/// A section as JSON: `link`, `rounds` and every row.
pub fn rows_json(link: &str, rounds: usize, steal: Option<f64>, rows: &[Row]) -> String {
    let steal = super::json_f64(steal);
    let mut out = format!(
        "{{\"link\": {link:?}, \"rounds\": {rounds}, \"steal_share\": {steal}, \"rows\": ["
    );
    for (i, r) in rows.iter().enumerate() {
        let v = match &r.mbps {
            Ok(v) => format!("\"mbps\": {v:.3}"),
            Err(e) => format!("\"failed\": {e:?}"),
        };
        let cpu = super::json_f64(r.cpu_s_per_gib);
        let rounds: Vec<String> = r.rounds_mbps.iter().map(|m| format!("{m:.3}")).collect();
        let _ = write!(
            out,
            "{}{{\"key\": {:?}, \"label\": {:?}, {v}, \"cpu_s_per_gib\": {cpu}, \
             \"rounds_mbps\": [{}]}}",
            if i > 0 { ", " } else { "" },
            r.key,
            r.label,
            rounds.join(", ")
        );
    }
    out.push_str("]}");
    out
}

/// The tunnel section of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Where it ran (veth between namespaces, or the loopback fallback and why).
    pub link: String,
    /// Rows in order.
    pub rows: Vec<Row>,
    /// Rounds of all rows (each row's median is reported).
    pub rounds: usize,
    /// The hypervisor's steal share while the rows ran ([`super::StealMeter`]).
    pub steal: Option<f64>,
}

impl Report {
    /// The MB/s of row `key`, if it has one.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.key == key)
            .and_then(|r| r.mbps.as_ref().ok().copied())
    }

    /// Row `a` against row `b`: the median over rounds of the ratio of the two in the
    /// same round (they ran within seconds of each other, so a machine that speeds up
    /// or slows down between rounds moves both), or `-`. With a row's rounds missing,
    /// the ratio of the medians.
    pub fn ratio(&self, a: &str, b: &str) -> String {
        let row = |k: &str| self.rows.iter().find(|r| r.key == k);
        if let (Some(ra), Some(rb)) = (row(a), row(b)) {
            if !ra.rounds_mbps.is_empty() && ra.rounds_mbps.len() == rb.rounds_mbps.len() {
                return match paired_median(&ra.rounds_mbps, &rb.rounds_mbps) {
                    Some(r) => format!("{r:.2}x"),
                    None => "-".into(),
                };
            }
        }
        match (self.get(a), self.get(b)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        }
    }

    /// The table, with the target ratios.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "tunnel ({}), 64 KiB writes, median of {} rounds (a ratio: the median of each round's own); {}",
            self.link,
            self.rounds,
            super::steal_text(self.steal)
        );
        rows_table(&mut out, &self.rows, 44, "CPU s/GiB");
        let _ = writeln!(
            out,
            "tunnel/tls {} (target >= 0.80x); tunnel/tcp {}; 64ch/1ch {} (target >= 0.90x); \
             63+stalled/64ch {} (target >= 0.90x)",
            self.ratio("tunnel_1", "tls_1"),
            self.ratio("tunnel_1", "tcp_1"),
            self.ratio("tunnel_64", "tunnel_1"),
            self.ratio("tunnel_63_stalled", "tunnel_64"),
        );
        out
    }

    /// JSON object.
    pub fn json(&self) -> String {
        rows_json(&self.link, self.rounds, self.steal, &self.rows)
    }
}

/// The median of `a[i] / b[i]` over the rounds where `b[i] > 0`.
pub fn paired_median(a: &[f64], b: &[f64]) -> Option<f64> {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, &b)| b > 0.0)
        .map(|(a, b)| a / b)
        .collect();
    if r.is_empty() {
        return None;
    }
    r.sort_by(f64::total_cmp);
    let n = r.len();
    Some(if n % 2 == 1 {
        r[n / 2]
    } else {
        (r[n / 2 - 1] + r[n / 2]) / 2.0
    })
}

/// Runs the tunnel rows.
pub fn run_all(plan: &Plan) -> Report {
    let dir = match TempDir::new("bench-tunnel") {
        Ok(d) => d,
        Err(e) => {
            return Report {
                link: format!("no scratch dir: {e}"),
                ..Report::default()
            }
        }
    };
    if let Err(e) = certs::make_test_pki(dir.path(), ["a", "b"]) {
        return Report {
            link: format!("no certificates: {e}"),
            ..Report::default()
        };
    }
    let net = Net::create();
    let link = match &net {
        Ok(_) => format!(
            "veth {NS_A} {ADDR_A} <-> {NS_B} {ADDR_B}, each side on its own half of the CPUs"
        ),
        Err(e) => format!("loopback fallback: netns unavailable ({e})"),
    };
    let ns = net.is_ok();
    let server_addr: SocketAddr = if ns {
        format!("{ADDR_B}:{PORT}")
    } else {
        format!("127.0.0.1:{PORT}")
    }
    .parse()
    .expect("address");
    let mut rows = Vec::new();
    let scenarios: [(&str, &str, &str, usize, bool); 5] = [
        ("raw TCP, 1 stream", "tcp_1", "tcp", 1, false),
        ("rustls TLS 1.3, 1 stream", "tls_1", "tls", 1, false),
        ("tunnel, 1 channel", "tunnel_1", "tunnel", 1, false),
        (
            "tunnel, 64 channels (aggregate)",
            "tunnel_64",
            "tunnel",
            CHANNELS,
            false,
        ),
        (
            "tunnel, 63 channels + 1 stalled (aggregate)",
            "tunnel_63_stalled",
            "tunnel",
            CHANNELS - 1,
            true,
        ),
    ];
    // Rounds of all rows, so that load from elsewhere on the machine falls on every row
    // alike; the median round of each row is reported.
    let repeats = plan.repeats.max(if plan.repeats > 1 { 5 } else { 1 });
    let mut runs: Vec<Vec<Result<Measured, String>>> = vec![Vec::new(); scenarios.len()];
    let steal = super::StealMeter::start();
    for round in 0..repeats {
        for (i, &(label, key, mode, channels, stalled)) in scenarios.iter().enumerate() {
            if !super::row_wanted(key) {
                continue;
            }
            let r = measure(
                ns,
                dir.path(),
                server_addr,
                mode,
                channels,
                stalled,
                plan.duration,
            );
            eprintln!("  round {round} {label}: {r:?}");
            runs[i].push(r);
        }
    }
    for ((label, key, ..), results) in scenarios.iter().zip(runs) {
        rows.push(Row::median(label, key, results));
    }
    drop(net);
    Report {
        link,
        rows,
        rounds: repeats,
        steal: steal.share(),
    }
}

/// The two namespaces and their veth pair; deleted on drop.
struct Net;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    fn create() -> Result<Net, String> {
        // Leftovers of an interrupted run.
        let _ = ip(&["netns", "del", NS_A]);
        let _ = ip(&["netns", "del", NS_B]);
        ip(&["netns", "add", NS_A])?;
        let net = Net;
        ip(&["netns", "add", NS_B])?;
        // Created inside A, so the root namespace never holds an end.
        ip(&[
            "-n", NS_A, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B,
        ])?;
        ip(&["-n", NS_A, "link", "set", VETH_B, "netns", NS_B])?;
        ip(&[
            "-n",
            NS_A,
            "addr",
            "add",
            &format!("{ADDR_A}/30"),
            "dev",
            VETH_A,
        ])?;
        ip(&[
            "-n",
            NS_B,
            "addr",
            "add",
            &format!("{ADDR_B}/30"),
            "dev",
            VETH_B,
        ])?;
        for (ns, dev) in [(NS_A, VETH_A), (NS_B, VETH_B)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", NS_A]);
        let _ = ip(&["netns", "del", NS_B]);
    }
}

/// Re-executes this binary as one side of a row, after `wrapper` (the words that put it
/// in its network namespace; none: here).
fn spawn_role(wrapper: &[String], args: &[String]) -> io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.arg("--tunnel-role")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
}

fn netns_wrapper(ns: bool, name: &str) -> Vec<String> {
    if ns {
        ["ip", "netns", "exec", name]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    } else {
        Vec::new()
    }
}

fn measure(
    ns: bool,
    certs: &Path,
    server: SocketAddr,
    mode: &str,
    channels: usize,
    stalled: bool,
    duration: Duration,
) -> Result<Measured, String> {
    measure_with(
        &netns_wrapper(ns, NS_B),
        &netns_wrapper(ns, NS_A),
        certs,
        server,
        mode,
        channels,
        stalled,
        duration,
    )
}

/// One rustls TLS stream (the TLS row's roles) from a client run after `client` to a
/// server at `server` run after `server_wrapper`; certificates `a` (client) and `b`
/// (server) from `certs`. MB/s.
pub(super) fn tls_between(
    server_wrapper: &[String],
    client: &[String],
    certs: &Path,
    server: SocketAddr,
    duration: Duration,
) -> Result<Measured, String> {
    measure_with(
        server_wrapper,
        client,
        certs,
        server,
        "tls",
        1,
        false,
        duration,
    )
}

#[allow(clippy::too_many_arguments)]
fn measure_with(
    server_wrapper: &[String],
    client_wrapper: &[String],
    certs: &Path,
    server: SocketAddr,
    mode: &str,
    channels: usize,
    stalled: bool,
    duration: Duration,
) -> Result<Measured, String> {
    let common = [
        mode.to_owned(),
        server.to_string(),
        certs.display().to_string(),
        channels.to_string(),
        u8::from(stalled).to_string(),
        duration.as_millis().to_string(),
    ];
    let mut server_args = vec!["serve".to_owned()];
    server_args.extend(common.iter().cloned());
    let mut srv = spawn_role(server_wrapper, &server_args).map_err(|e| e.to_string())?;
    let result = (|| {
        let mut lines = BufReader::new(srv.stdout.take().ok_or("no stdout")?).lines();
        match lines.next() {
            Some(Ok(l)) if l == "READY" => {}
            other => return Err(format!("server did not start: {other:?}")),
        }
        let mut client_args = vec!["send".to_owned()];
        client_args.extend(common.iter().cloned());
        let out = spawn_role(client_wrapper, &client_args)
            .and_then(|c| c.wait_with_output())
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .ok_or_else(|| format!("client failed ({})", out.status))?;
        let mut it = line.split_whitespace();
        let bytes: f64 = it.next().and_then(|v| v.parse().ok()).ok_or("bad RESULT")?;
        let secs: f64 = it.next().and_then(|v| v.parse().ok()).ok_or("bad RESULT")?;
        // The client's CPU (it reports its own: it has exited) and the server's, read
        // while it still runs: it answered the byte count, so its work is done.
        let client_cpu: Option<f64> = it.next().and_then(|v| v.parse().ok());
        let server_cpu = domsock_host::test_utils::cpu_time_of(srv.id());
        let cpu = client_cpu.map(|c| Duration::from_secs_f64(c) + server_cpu);
        Ok(Measured::new(bytes, secs, cpu))
    })();
    let _ = srv.kill();
    let _ = srv.wait();
    result
}

/// Gives this side, one of the two "hosts", its own half of the CPUs this process may
/// use (host a, the sender, the first half; host b the second), as two real hosts have
/// their own CPUs. Both sides of every row are placed alike (raw TCP, TLS and the tunnel).
/// Without it, on two cores the scheduler mixed the hosts' threads: one tunnel channel
/// ran at 0.38-0.93x of TLS from round to round, with the copies between a host's own
/// threads crossing CPUs; with it, 0.82-1.05x. One CPU only: nothing to split.
fn pin_host(first_half: bool) {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let Ok(allowed) = sched_getaffinity(Pid::from_raw(0)) else {
        return;
    };
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&i| allowed.is_set(i).unwrap_or(false))
        .collect();
    let Some(mine) = host_cpus(&cpus, first_half) else {
        return;
    };
    let mut set = CpuSet::new();
    for &c in mine {
        let _ = set.set(c);
    }
    if let Err(e) = sched_setaffinity(Pid::from_raw(0), &set) {
        eprintln!("    could not place this host on its CPUs: {e}");
    }
}

/// One host's share of the CPUs `allowed` (in order): the first half (rounded down) or
/// the rest; `None` with fewer than two, when there is nothing to split.
fn host_cpus(allowed: &[usize], first_half: bool) -> Option<&[usize]> {
    if allowed.len() < 2 {
        return None;
    }
    let (a, b) = allowed.split_at(allowed.len() / 2);
    Some(if first_half { a } else { b })
}

/// Entry point of a re-executed side: `serve|send MODE ADDR CERTS CHANNELS STALLED MS`.
pub fn role(args: &[String]) -> Result<(), String> {
    let [side, mode, addr, certs, channels, stalled, ms] = args else {
        return Err(format!("bad --tunnel-role arguments {args:?}"));
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let certs = PathBuf::from(certs);
    let channels: usize = channels.parse().map_err(|_| "channels")?;
    let stalled = stalled == "1";
    let duration = Duration::from_millis(ms.parse().map_err(|_| "ms")?);
    pin_host(side == "send");
    let r = match (side.as_str(), mode.as_str()) {
        ("serve", "tcp") => serve_stream(addr, None),
        ("serve", "tls") => serve_stream(addr, Some(&certs)),
        ("serve", "tunnel") => serve_tunnel(addr, &certs),
        ("send", "tcp") => send_stream(addr, None, duration),
        ("send", "tls") => send_stream(addr, Some(&certs), duration),
        ("send", "tunnel") => send_tunnel(addr, &certs, channels, stalled, duration),
        _ => return Err(format!("unknown role {side} {mode}")),
    };
    r.map_err(|e| e.to_string())
}

fn material(certs: &Path, host: &str) -> io::Result<TlsMaterial> {
    TlsMaterial::load(
        &certs.join(format!("{host}.pem")),
        &certs.join(format!("{host}.key")),
        &certs.join("ca.pem"),
    )
    .map_err(io::Error::other)
}

/// The client's answer: bytes, seconds, and its own CPU seconds so far.
fn result_line(bytes: u64, secs: f64) {
    let cpu = domsock_host::test_utils::cpu_time_of(std::process::id());
    println!("RESULT {bytes} {secs} {}", cpu.as_secs_f64());
}

fn ready() {
    println!("READY");
    let _ = io::stdout().flush();
}

fn read_count<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn serve_stream(addr: SocketAddr, certs: Option<&Path>) -> io::Result<()> {
    let l = TcpListener::bind(addr)?;
    let tls = certs.map(|c| material(c, "b")).transpose()?;
    ready();
    let (sock, _) = l.accept()?;
    sock.set_nodelay(true)?;
    match tls {
        None => {
            let mut s = sock;
            let n = read_count(&mut s)?;
            s.write_all(&n.to_le_bytes())?;
        }
        Some(m) => {
            let conn = rustls::ServerConnection::new(m.server).map_err(io::Error::other)?;
            let mut s = rustls::StreamOwned::new(conn, sock);
            let n = read_count(&mut s)?;
            s.write_all(&n.to_le_bytes())?;
            s.conn.send_close_notify();
            s.flush()?;
        }
    }
    Ok(())
}

fn write_for<W: Write>(w: &mut W, duration: Duration) -> io::Result<u64> {
    let buf = vec![0xa5u8; WRITE_BYTES];
    let until = Instant::now() + duration;
    let mut total = 0;
    while Instant::now() < until {
        w.write_all(&buf)?;
        total += WRITE_BYTES as u64;
    }
    Ok(total)
}

fn confirm(total: u64, reply: [u8; 8]) -> io::Result<()> {
    let got = u64::from_le_bytes(reply);
    if got != total {
        return Err(io::Error::other(format!(
            "sent {total}, receiver counted {got}"
        )));
    }
    Ok(())
}

fn send_stream(addr: SocketAddr, certs: Option<&Path>, duration: Duration) -> io::Result<()> {
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let start;
    let total;
    match certs {
        None => {
            let mut s = sock;
            start = Instant::now();
            total = write_for(&mut s, duration)?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut reply = [0u8; 8];
            s.read_exact(&mut reply)?;
            confirm(total, reply)?;
        }
        Some(c) => {
            let m = material(c, "a")?;
            let name = rustls::pki_types::ServerName::try_from("b").map_err(io::Error::other)?;
            let conn = rustls::ClientConnection::new(m.client, name).map_err(io::Error::other)?;
            let mut s = rustls::StreamOwned::new(conn, sock);
            // Handshake before the clock starts, as the tunnel's is.
            s.flush()?;
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock)?;
            }
            start = Instant::now();
            total = write_for(&mut s, duration)?;
            s.conn.send_close_notify();
            s.flush()?;
            let mut reply = [0u8; 8];
            s.read_exact(&mut reply)?;
            confirm(total, reply)?;
        }
    }
    result_line(total, start.elapsed().as_secs_f64());
    Ok(())
}

fn tunnel_config(
    host: &str,
    peer: &str,
    certs: &Path,
    listen: SocketAddr,
    peer_addr: Option<SocketAddr>,
) -> TunnelConfig {
    let mut c = TunnelConfig::new(
        host,
        listen,
        certs.join(format!("{host}.pem")),
        certs.join(format!("{host}.key")),
        certs.join("ca.pem"),
    );
    c.peers = BTreeMap::from([(peer.to_owned(), peer_addr)]);
    c
}

#[derive(Default)]
struct Queue {
    ends: Mutex<Vec<(ChannelEnd, Vec<u8>)>>,
}

impl Acceptor for Queue {
    fn on_open(&self, _: &str, _: &[u8], _: ChannelKind) -> Result<(), Refusal> {
        Ok(())
    }
    fn accepted(&self, end: ChannelEnd, metadata: Vec<u8>) {
        self.ends.lock().expect("queue").push((end, metadata));
    }
}

/// The channel ends of one side in one [`ReadyGroup`], as an event loop that serves many
/// channels holds them: the driver writes the group's eventfd once per batch of changes
/// (one eventfd per end woke this thread once per channel: on a host's one core each
/// wakeup preempted the driver, twice the context switches per byte at 64 channels),
/// and the wait is edge-triggered epoll on that one eventfd, so it is never reset.
struct Interest {
    group: Arc<ReadyGroup>,
    epoll: Epoll,
    events: [EpollEvent; 1],
    keys: Vec<u64>,
}

impl Interest {
    fn new() -> io::Result<Self> {
        let group = ReadyGroup::new()?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 0);
        epoll.add(group.as_fd(), ev)?;
        Ok(Self {
            group,
            epoll,
            events: [EpollEvent::empty()],
            keys: Vec::with_capacity(2 * CHANNELS),
        })
    }

    /// Watches `end`, reported as `key`.
    fn add(&self, end: &ChannelEnd, key: usize) {
        end.join_group(&self.group, key as u64);
    }

    /// Waits up to `ms` for a change (none if one is already listed) and calls `ready`
    /// with the key of each end that changed.
    fn wait(&mut self, ms: u16, mut ready: impl FnMut(usize)) {
        self.group.take_ready(&mut self.keys);
        if self.keys.is_empty() {
            let _ = self.epoll.wait(&mut self.events, EpollTimeout::from(ms));
            self.group.take_ready(&mut self.keys);
        }
        for k in self.keys.drain(..) {
            ready(k as usize);
        }
    }
}

/// Receives every channel (but the one opened as "stall") to EOF on one thread and
/// answers each with its byte count.
fn serve_tunnel(addr: SocketAddr, certs: &Path) -> io::Result<()> {
    let q = Arc::new(Queue::default());
    let _svc = TunnelService::start(tunnel_config("b", "a", certs, addr, None), q.clone())
        .map_err(io::Error::other)?;
    ready();
    struct Rx {
        end: ChannelEnd,
        total: u64,
        done: bool,
        /// Its eventfd was set (or it is new): read it.
        ready: bool,
    }
    let mut rx: Vec<Rx> = Vec::new();
    // The stalled channel's end: held open, never read.
    let mut held = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut interest = Interest::new()?;
    loop {
        for (end, meta) in q.ends.lock().expect("queue").drain(..) {
            if meta != b"stall" {
                interest.add(&end, rx.len());
                rx.push(Rx {
                    end,
                    total: 0,
                    done: false,
                    ready: true,
                });
            } else {
                held.push(end);
            }
        }
        let mut progress = false;
        for r in rx.iter_mut().filter(|r| !r.done && r.ready) {
            // Edge-triggered: every notification after this read is a new event, so the
            // eventfd is never reset (a syscall per wakeup saved).
            r.ready = false;
            loop {
                match r.end.read(&mut buf) {
                    Ok(0) => {
                        r.done = true;
                        let _ = r.end.write(&r.total.to_le_bytes());
                        progress = true;
                        break;
                    }
                    Ok(n) => {
                        r.total += n as u64;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        // Only channels whose eventfd fired are read next round (the eventfd is cleared
        // before a channel is drained, so nothing that arrives later is missed).
        if rx.iter().all(|r| r.done) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        interest.wait(if progress { 0 } else { 20 }, |k| {
            if let Some(r) = rx.get_mut(k) {
                r.ready = true;
            }
        });
    }
}

/// Opens the channels, writes 64 KiB writes round-robin on one thread for `duration`,
/// shuts them, and waits for every receiver's count.
fn send_tunnel(
    addr: SocketAddr,
    certs: &Path,
    channels: usize,
    stalled: bool,
    duration: Duration,
) -> io::Result<()> {
    let listen: SocketAddr = SocketAddr::new(
        if addr.ip().is_loopback() {
            addr.ip()
        } else {
            ADDR_A.parse().expect("address")
        },
        0,
    );
    let svc = TunnelService::start(
        tunnel_config("a", "b", certs, listen, Some(addr)),
        Arc::new(Queue::default()),
    )
    .map_err(io::Error::other)?;
    let until = Instant::now() + Duration::from_secs(30);
    while !svc.is_up("b") {
        if Instant::now() > until {
            return Err(io::Error::other("tunnel did not come up"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let open = |meta: &[u8]| {
        svc.open("b", meta, ChannelKind::Stream)
            .map_err(io::Error::other)
    };
    let ends: Vec<ChannelEnd> = (0..channels)
        .map(|i| open(format!("c{i}").as_bytes()))
        .collect::<io::Result<_>>()?;
    let stall = if stalled { Some(open(b"stall")?) } else { None };
    while ends
        .iter()
        .chain(&stall)
        .any(|e| e.state() != domsock_host::tunnel::ChannelState::Open)
    {
        if Instant::now() > until {
            return Err(io::Error::other("channels did not open"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let buf = vec![0xa5u8; WRITE_BYTES];
    if let Some(s) = &stall {
        // Fill its window: it holds credit and buffers at the receiver from now on.
        while s.write(&buf).is_ok() {}
    }
    let mut interest = Interest::new()?;
    for (i, e) in ends.iter().enumerate() {
        interest.add(e, i);
    }
    let mut sent = vec![0u64; channels];
    // Partial writes continue at this offset of `buf`, so every write is 64 KiB.
    let mut pos = vec![0usize; channels];
    // A channel without credit waits for its eventfd (one epoll wait for all of them, as
    // an engine's would; edge-triggered, so the eventfd is never reset), so a round costs
    // no syscall per channel.
    let mut blocked = vec![false; channels];
    let start = Instant::now();
    let stop_at = start + duration;
    while Instant::now() < stop_at {
        let mut progress = false;
        for (i, e) in ends.iter().enumerate() {
            if blocked[i] {
                continue;
            }
            match e.write(&buf[pos[i]..]) {
                Ok(n) => {
                    sent[i] += n as u64;
                    pos[i] = (pos[i] + n) % WRITE_BYTES;
                    progress = true;
                }
                // Credit that comes in after this look writes the eventfd: a new edge.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => blocked[i] = true,
                Err(err) => return Err(err),
            }
        }
        if blocked.iter().any(|&b| b) {
            interest.wait(if progress { 0 } else { 5 }, |i| {
                if let Some(b) = blocked.get_mut(i) {
                    *b = false;
                }
            });
        }
    }
    for e in &ends {
        e.shutdown(std::net::Shutdown::Write)?;
    }
    let mut confirmed = vec![false; channels];
    let mut reply = [0u8; 8];
    let until = Instant::now() + Duration::from_secs(60);
    while confirmed.iter().any(|c| !c) {
        if Instant::now() > until {
            return Err(io::Error::other("receivers did not confirm"));
        }
        for (i, e) in ends.iter().enumerate() {
            if confirmed[i] {
                continue;
            }
            e.clear_wakeup();
            match e.read(&mut reply) {
                Ok(8) => {
                    confirm(sent[i], reply)?;
                    confirmed[i] = true;
                }
                Ok(n) => return Err(io::Error::other(format!("short reply of {n} bytes"))),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        if confirmed.iter().any(|c| !c) {
            interest.wait(5, |_| {});
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // What autotuning made of the receivers' windows (the sender's view of them).
    let windows: Vec<u32> = ends.iter().map(|e| e.counters().peer_buf_alloc).collect();
    let frames = svc.counters("b").unwrap_or_default();
    eprintln!(
        "    windows at the end: {} KiB .. {} KiB; frames sent {}, received {}",
        windows.iter().min().unwrap_or(&0) >> 10,
        windows.iter().max().unwrap_or(&0) >> 10,
        frames.frames_sent,
        frames.frames_received,
    );
    result_line(sent.iter().sum::<u64>(), elapsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, rounds: &[f64]) -> Row {
        let runs = rounds
            .iter()
            .map(|&mbps| {
                Ok(Measured {
                    mbps,
                    cpu_s_per_gib: None,
                })
            })
            .collect();
        Row::median(key, key, runs)
    }

    #[test]
    fn a_ratio_pairs_rows_of_the_same_round() {
        // The machine doubles its speed after two rounds: each round's own ratio is 0.5,
        // while the medians of the rows (400 over 1000) would say 0.4.
        let r = Report {
            link: String::new(),
            rows: vec![
                row("a", &[200.0, 200.0, 400.0, 400.0, 400.0]),
                row("b", &[400.0, 400.0, 800.0, 800.0, 1000.0]),
            ],
            rounds: 5,
            steal: None,
        };
        assert_eq!(r.ratio("a", "b"), "0.50x");
        assert_eq!(paired_median(&[1.0, 3.0], &[1.0, 1.0]), Some(2.0));
        assert_eq!(paired_median(&[1.0], &[0.0]), None);
    }

    #[test]
    fn each_host_gets_its_own_cpus() {
        assert_eq!(host_cpus(&[0, 1], true), Some(&[0][..]));
        assert_eq!(host_cpus(&[0, 1], false), Some(&[1][..]));
        // A cpuset with holes, odd count: the second host gets the extra CPU.
        assert_eq!(host_cpus(&[2, 5, 7], true), Some(&[2][..]));
        assert_eq!(host_cpus(&[2, 5, 7], false), Some(&[5, 7][..]));
        assert_eq!(host_cpus(&[3], true), None);
        assert_eq!(host_cpus(&[], false), None);
    }

    #[test]
    fn a_ratio_without_every_round_falls_back_to_the_medians() {
        let mut failed = row("a", &[300.0]);
        failed.rounds_mbps.clear();
        let r = Report {
            link: String::new(),
            rows: vec![failed, row("b", &[100.0, 600.0, 600.0])],
            rounds: 3,
            steal: None,
        };
        assert_eq!(r.ratio("a", "b"), "0.50x");
        assert_eq!(r.ratio("a", "missing"), "-");
    }
}
