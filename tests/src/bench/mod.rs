//! The side-by-side benchmark: domsockd against vhost-device-vsock 0.3.0 and host-only
//! baselines (a Unix socket pair, TCP loopback), all measured in one run with the same
//! workloads, printed as a table with ratios and written as JSON.
//!
//! Every vsock measurement drives the backend with the user-space virtio-vsock driver of
//! `domsock-guest` (a native-speed simulated guest), so both backends see the same guest.
//! Backend CPU time comes from `/proc/<pid>/stat` around each measurement. Nothing here opens
//! an AF_VSOCK socket.

pub mod baseline;
pub mod bus;
pub mod peer;
pub mod relayed;
pub mod report;
pub mod tunnel;
pub mod vsock;

use std::time::Duration;

/// Write sizes of the throughput scenarios.
pub const WRITE_SIZES: [usize; 4] = [64, 4 << 10, 64 << 10, 1 << 20];
/// Payload of the latency scenario.
pub const RR_SIZE: usize = 64;
/// domsockd's busy-poll window in the extra latency scenario.
pub const BUSY_POLL_US: u32 = 50;
/// Guest counts of the concurrency scenario.
pub const GUEST_COUNTS: [usize; 3] = [1, 8, 32];

/// How long and how much.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Duration of one throughput measurement.
    pub duration: Duration,
    /// Round trips per latency measurement.
    pub round_trips: usize,
    /// Repetitions of each measurement; the median is reported.
    pub repeats: usize,
}

impl Plan {
    /// The full run (a few minutes).
    pub fn full() -> Self {
        Self {
            duration: Duration::from_millis(1500),
            round_trips: 20_000,
            repeats: 3,
        }
    }

    /// A quick run for smoke tests (seconds).
    pub fn quick() -> Self {
        Self {
            duration: Duration::from_millis(250),
            round_trips: 2_000,
            repeats: 1,
        }
    }
}

/// Which transport a measurement used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// domsockd with the user-space guest.
    Domsockd,
    /// vhost-device-vsock 0.3.0 with the user-space guest.
    VhostDeviceVsock,
    /// `UnixStream::pair`.
    UnixPair,
    /// TCP over 127.0.0.1.
    TcpLoopback,
}

impl Transport {
    /// Short name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Domsockd => "domsockd",
            Transport::VhostDeviceVsock => "vhost-device-vsock",
            Transport::UnixPair => "unix-pair",
            Transport::TcpLoopback => "tcp-loopback",
        }
    }

    /// All, in table order.
    pub const ALL: [Transport; 4] = [
        Transport::Domsockd,
        Transport::VhostDeviceVsock,
        Transport::UnixPair,
        Transport::TcpLoopback,
    ];
}

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// One stream, guest (or writer) to host (or reader), `size`-byte writes.
    GuestToHost {
        /// Write size.
        size: usize,
    },
    /// One stream, host to guest, `size`-byte writes.
    HostToGuest {
        /// Write size.
        size: usize,
    },
    /// One stream between two guests on the same backend, `size`-byte writes.
    GuestToGuest {
        /// Write size.
        size: usize,
    },
    /// Like [`Scenario::GuestToHost`] over a resumable session the guest opened through
    /// the session port (domsockd only).
    SessionGuestToHost {
        /// Write size.
        size: usize,
    },
    /// Like [`Scenario::HostToGuest`] over a session: the guest registered its listener
    /// with `LISTEN`, so the host's connection starts with OFFERED (domsockd only).
    SessionHostToGuest {
        /// Write size.
        size: usize,
    },
    /// `guests` guests each streaming to the host at once, 64 KiB writes.
    Concurrent {
        /// Number of guests.
        guests: usize,
    },
    /// Ping-pong of `size` bytes.
    RoundTrip {
        /// Message size.
        size: usize,
    },
    /// The same ping-pong with domsockd's `--busy-poll-us` window (domsockd only; compared
    /// with the other backends' plain round trip).
    RoundTripBusyPoll {
        /// Message size.
        size: usize,
        /// Busy-poll window in microseconds.
        us: u32,
    },
}

impl Scenario {
    /// Human-readable label.
    pub fn label(&self) -> String {
        match self {
            Scenario::GuestToHost { size } => format!("guest->host {}", fmt_size(*size)),
            Scenario::HostToGuest { size } => format!("host->guest {}", fmt_size(*size)),
            Scenario::GuestToGuest { size } => format!("guest->guest {}", fmt_size(*size)),
            Scenario::SessionGuestToHost { size } => {
                format!("session g->h {}", fmt_size(*size))
            }
            Scenario::SessionHostToGuest { size } => {
                format!("session h->g {}", fmt_size(*size))
            }
            Scenario::Concurrent { guests } => format!("{guests} guests->host 64K"),
            Scenario::RoundTrip { size } => format!("round trip {}", fmt_size(*size)),
            Scenario::RoundTripBusyPoll { size, us } => {
                format!("round trip {}, poll {us}us", fmt_size(*size))
            }
        }
    }

    /// Machine-readable name.
    pub fn key(&self) -> String {
        match self {
            Scenario::GuestToHost { size } => format!("guest_to_host/{size}"),
            Scenario::HostToGuest { size } => format!("host_to_guest/{size}"),
            Scenario::GuestToGuest { size } => format!("guest_to_guest/{size}"),
            Scenario::SessionGuestToHost { size } => format!("session_guest_to_host/{size}"),
            Scenario::SessionHostToGuest { size } => format!("session_host_to_guest/{size}"),
            Scenario::Concurrent { guests } => format!("concurrent/{guests}"),
            Scenario::RoundTrip { size } => format!("round_trip/{size}"),
            Scenario::RoundTripBusyPoll { size, us } => {
                format!("round_trip_busy_poll_{us}us/{size}")
            }
        }
    }
}

/// `64 B`, `4K`, `1M`.
pub fn fmt_size(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}M", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}K", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// One throughput measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Payload bytes delivered.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Backend CPU time during the measurement (vsock transports only).
    pub backend_cpu: Option<Duration>,
}

impl Throughput {
    /// MB/s (10^6 bytes per second).
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }

    /// Backend CPU-seconds per GiB moved.
    pub fn cpu_s_per_gib(&self) -> Option<f64> {
        let cpu = self.backend_cpu?;
        Some(cpu.as_secs_f64() * (1u64 << 30) as f64 / self.bytes.max(1) as f64)
    }
}

/// One latency measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Median round trip.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Backend CPU time per round trip (vsock transports only).
    pub backend_cpu_per_rt: Option<Duration>,
}

/// What one transport did in one scenario.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Bytes per second.
    Throughput(Throughput),
    /// Round-trip times.
    Latency(Latency),
    /// Not run, with the reason (e.g. not supported by this transport).
    Skipped(String),
    /// Ran and failed (a stall, an error): the reason is part of the result.
    Failed(String),
}

/// One cell of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Workload.
    pub scenario: Scenario,
    /// Transport.
    pub transport: Transport,
    /// Result.
    pub outcome: Outcome,
}

/// Median of repeated throughput runs (by MB/s).
pub fn median_throughput(mut runs: Vec<Throughput>) -> Option<Throughput> {
    if runs.is_empty() {
        return None;
    }
    runs.sort_by(|a, b| a.mbps().total_cmp(&b.mbps()));
    Some(runs[runs.len() / 2])
}

/// Median of repeated latency runs (by p50).
pub fn median_latency(mut runs: Vec<Latency>) -> Option<Latency> {
    if runs.is_empty() {
        return None;
    }
    runs.sort_by_key(|l| l.p50);
    Some(runs[runs.len() / 2])
}

/// `DOMSOCK_BENCH_ROWS=key,key,..`: the tunnel and relayed sections run only these rows
/// (e.g. `tunnel_1` or `relayed_g2h`, the keys of the JSON report), to profile one.
pub fn row_wanted(key: &str) -> bool {
    std::env::var("DOMSOCK_BENCH_ROWS")
        .ok()
        .is_none_or(|o| o.split(',').any(|k| k == key))
}

/// CPU time the hypervisor gave to others while this machine's CPUs wanted it (`steal`
/// in `/proc/stat`), as a share of all CPU time over a span of the run. On a shared
/// cloud VM it was 0.3-14% from one run of the tunnel rows to the next (seconds apart),
/// and the rows' rates moved with it: the tables print it so a reader can tell a slow
/// machine from a slow path.
#[derive(Debug, Clone, Copy)]
pub struct StealMeter {
    start: Option<(u64, u64)>,
}

impl StealMeter {
    /// Starts the span now.
    pub fn start() -> Self {
        Self { start: cpu_times() }
    }

    /// The steal share of the span so far (0.0-1.0), when `/proc/stat` is readable.
    pub fn share(&self) -> Option<f64> {
        let (s0, t0) = self.start?;
        let (s1, t1) = cpu_times()?;
        (t1 > t0).then(|| s1.saturating_sub(s0) as f64 / (t1 - t0) as f64)
    }
}

/// `(steal, total)` ticks of all CPUs.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(stat.lines().next()?)
}

/// `(steal, total)` of the aggregate `cpu` line of `/proc/stat` (user nice system idle
/// iowait irq softirq steal [guest guest_nice]; guest time is already in user and nice,
/// so it is not added again).
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(8).map(str::parse).collect::<Result<_, _>>().ok()?;
    if v.len() < 8 {
        return None;
    }
    Some((v[7], v.iter().sum()))
}

/// `v` as a JSON number with four decimals, or `null`.
pub fn json_f64(v: Option<f64>) -> String {
    v.map_or_else(|| "null".to_owned(), |x| format!("{x:.4}"))
}

/// `share` as the tables print it.
pub fn steal_text(share: Option<f64>) -> String {
    share.map_or_else(
        || "steal unknown".to_owned(),
        |s| format!("{:.1}% of CPU time stolen by the hypervisor", s * 100.0),
    )
}

/// p50 and p99 of samples (sorted in place).
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_field_of_the_cpu_line() {
        let line = "cpu  52756 0 21607 234633 6899 0 5155 4590 7 0";
        assert_eq!(
            parse_cpu_line(line),
            Some((4590, 52756 + 21607 + 234633 + 6899 + 5155 + 4590))
        );
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_cpu_line("cpu 1 2 3"), None);
        assert_eq!(parse_cpu_line("cpu 1 2 3 x 5 6 7 8"), None);
        assert_eq!(json_f64(Some(0.10049)), "0.1005");
        assert_eq!(json_f64(None), "null");
        assert_eq!(
            steal_text(Some(0.125)),
            "12.5% of CPU time stolen by the hypervisor"
        );
    }

    #[test]
    fn percentiles_of_known_samples() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let (p50, p99) = percentiles(&mut v);
        assert_eq!(p50, Duration::from_micros(51));
        assert_eq!(p99, Duration::from_micros(99));
    }

    #[test]
    fn throughput_units() {
        let t = Throughput {
            bytes: 1 << 30,
            elapsed: Duration::from_secs(2),
            backend_cpu: Some(Duration::from_millis(500)),
        };
        assert!((t.mbps() - 536.870912).abs() < 1e-6);
        assert_eq!(t.cpu_s_per_gib(), Some(0.5));
        assert_eq!(fmt_size(64), "64 B");
        assert_eq!(fmt_size(4096), "4K");
        assert_eq!(fmt_size(1 << 20), "1M");
    }
}
