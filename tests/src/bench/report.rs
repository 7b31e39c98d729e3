//! The benchmark table (with ratios against vhost-device-vsock and the Unix socket pair)
//! and its JSON form.

use super::{Latency, Measurement, Outcome, Scenario, Transport};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// All measurements of one run.
#[derive(Debug, Default, Clone)]
pub struct Results {
    cells: BTreeMap<(Scenario, Transport), Outcome>,
    /// Free-form facts about the run (machine, versions, plan).
    pub meta: Vec<(String, String)>,
}

impl Results {
    /// Records one measurement.
    pub fn push(&mut self, m: Measurement) {
        self.cells.insert((m.scenario, m.transport), m.outcome);
    }

    /// A recorded outcome.
    pub fn get(&self, s: Scenario, t: Transport) -> Option<&Outcome> {
        self.cells.get(&(s, t))
    }

    fn scenarios(&self) -> Vec<Scenario> {
        let mut v: Vec<Scenario> = self.cells.keys().map(|(s, _)| *s).collect();
        v.dedup();
        v
    }

    fn mbps(&self, s: Scenario, t: Transport) -> Option<f64> {
        match self.get(s, t)? {
            Outcome::Throughput(x) => Some(x.mbps()),
            _ => None,
        }
    }

    fn cpu(&self, s: Scenario, t: Transport) -> Option<f64> {
        match self.get(s, t)? {
            Outcome::Throughput(x) => x.cpu_s_per_gib(),
            _ => None,
        }
    }

    /// The table, as printed.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let ds = Transport::Domsockd;
        let vdv = Transport::VhostDeviceVsock;
        let _ = writeln!(
            out,
            "{:<22} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>8}",
            "throughput (MB/s)",
            "domsockd",
            "vdv-0.3.0",
            "unix-pair",
            "tcp-lo",
            "ds/vdv",
            "ds/unix",
            "ds cpu",
            "vdv cpu",
            "cpu ratio"
        );
        let _ = writeln!(
            out,
            "{:<22} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>8}",
            "", "", "", "", "", "", "", "s/GiB", "s/GiB", "ds/vdv"
        );
        let mut notes = Vec::new();
        for s in self.scenarios() {
            if matches!(
                s,
                Scenario::RoundTrip { .. } | Scenario::RoundTripBusyPoll { .. }
            ) {
                continue;
            }
            let mut cell = |t: Transport| match self.get(s, t) {
                Some(Outcome::Throughput(x)) => format!("{:.1}", x.mbps()),
                Some(Outcome::Skipped(_)) | None => "-".into(),
                Some(Outcome::Failed(why)) => {
                    notes.push(format!("{} / {}: {why}", s.label(), t.name()));
                    "FAIL".into()
                }
                Some(Outcome::Latency(_)) => "?".into(),
            };
            let row: Vec<String> = Transport::ALL.iter().map(|&t| cell(t)).collect();
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let fmt_cpu = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.3}"));
            let _ = writeln!(
                out,
                "{:<22} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>8}",
                s.label(),
                row[0],
                row[1],
                row[2],
                row[3],
                ratio(self.mbps(s, ds), self.mbps(s, vdv)),
                ratio(self.mbps(s, ds), self.mbps(s, Transport::UnixPair)),
                fmt_cpu(self.cpu(s, ds)),
                fmt_cpu(self.cpu(s, vdv)),
                ratio(self.cpu(s, ds), self.cpu(s, vdv)),
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<26} {:>14} {:>14} {:>14} {:>14} {:>7} {:>9} {:>9}",
            "latency p50/p99 (us)",
            "domsockd",
            "vdv-0.3.0",
            "unix-pair",
            "tcp-lo",
            "ds/vdv",
            "ds cpu",
            "vdv cpu"
        );
        let _ = writeln!(
            out,
            "{:<26} {:>14} {:>14} {:>14} {:>14} {:>7} {:>9} {:>9}",
            "", "", "", "", "", "p50", "us/rt", "us/rt"
        );
        for s in self.scenarios() {
            // A busy-poll row is compared with the other backends' plain round trip.
            let plain = match s {
                Scenario::RoundTrip { .. } => s,
                Scenario::RoundTripBusyPoll { size, .. } => Scenario::RoundTrip { size },
                _ => continue,
            };
            let mut cell = |t: Transport| match self.get(s, t) {
                Some(Outcome::Latency(l)) => format!(
                    "{:.1}/{:.1}",
                    l.p50.as_secs_f64() * 1e6,
                    l.p99.as_secs_f64() * 1e6
                ),
                Some(Outcome::Failed(why)) => {
                    notes.push(format!("{} / {}: {why}", s.label(), t.name()));
                    "FAIL".into()
                }
                _ => "-".into(),
            };
            let latency = |s, t| match self.get(s, t) {
                Some(Outcome::Latency(l)) => Some(*l),
                _ => None,
            };
            let ratio = match (latency(s, ds), latency(plain, vdv)) {
                (Some(a), Some(b)) if !b.p50.is_zero() => {
                    format!("{:.2}x", a.p50.as_secs_f64() / b.p50.as_secs_f64())
                }
                _ => "-".into(),
            };
            let cpu = |l: Option<Latency>| {
                l.and_then(|l| l.backend_cpu_per_rt)
                    .map_or("-".into(), |c| format!("{:.1}", c.as_secs_f64() * 1e6))
            };
            let mut row: Vec<String> = Transport::ALL.iter().map(|&t| cell(t)).collect();
            if s != plain {
                // Only domsockd has this row; show the others' plain numbers beside it.
                for (i, &t) in Transport::ALL.iter().enumerate().skip(1) {
                    if let Some(l) = latency(plain, t) {
                        row[i] = format!(
                            "{:.1}/{:.1}",
                            l.p50.as_secs_f64() * 1e6,
                            l.p99.as_secs_f64() * 1e6
                        );
                    }
                }
            }
            let _ = writeln!(
                out,
                "{:<26} {:>14} {:>14} {:>14} {:>14} {:>7} {:>9} {:>9}",
                s.label(),
                row[0],
                row[1],
                row[2],
                row[3],
                ratio,
                cpu(latency(s, ds)),
                cpu(latency(plain, vdv)),
            );
        }
        self.session_table(&mut out);
        for (s, t, why) in self.cells.iter().filter_map(|((s, t), o)| match o {
            Outcome::Skipped(why) => Some((s, t, why)),
            _ => None,
        }) {
            notes.push(format!("{} / {}: skipped: {why}", s.label(), t.name()));
        }
        if !notes.is_empty() {
            let _ = writeln!(out, "\nnotes:");
            for n in notes {
                let _ = writeln!(out, "  {n}");
            }
        }
        out
    }

    /// Sessions against raw connections, domsockd only: throughput and backend CPU per GiB
    /// of each session row over its raw twin from the same run.
    fn session_table(&self, out: &mut String) {
        let ds = Transport::Domsockd;
        let pairs: Vec<(Scenario, Scenario)> = self
            .scenarios()
            .into_iter()
            .filter_map(|s| match s {
                Scenario::SessionGuestToHost { size } => Some((s, Scenario::GuestToHost { size })),
                Scenario::SessionHostToGuest { size } => Some((s, Scenario::HostToGuest { size })),
                _ => None,
            })
            .collect();
        if pairs.is_empty() {
            return;
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<22} {:>10} {:>10} {:>8} {:>9} {:>9} {:>8}",
            "sessions (domsockd)", "raw MB/s", "session", "ses/raw", "raw cpu", "ses cpu", "cpu"
        );
        let _ = writeln!(
            out,
            "{:<22} {:>10} {:>10} {:>8} {:>9} {:>9} {:>8}",
            "", "", "MB/s", "", "s/GiB", "s/GiB", "ses/raw"
        );
        for (session, raw) in pairs {
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let num = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
            let _ = writeln!(
                out,
                "{:<22} {:>10} {:>10} {:>8} {:>9} {:>9} {:>8}",
                session.label(),
                num(self.mbps(raw, ds), 1),
                num(self.mbps(session, ds), 1),
                ratio(self.mbps(session, ds), self.mbps(raw, ds)),
                num(self.cpu(raw, ds), 3),
                num(self.cpu(session, ds), 3),
                ratio(self.cpu(session, ds), self.cpu(raw, ds)),
            );
        }
    }

    /// JSON: `{"meta": {...}, "results": [{"scenario", "transport", ...}]}`.
    pub fn json(&self) -> String {
        let mut out = String::from("{\n  \"meta\": {");
        for (i, (k, v)) in self.meta.iter().enumerate() {
            let _ = write!(
                out,
                "{}\n    {}: {}",
                if i > 0 { "," } else { "" },
                q(k),
                q(v)
            );
        }
        out.push_str("\n  },\n  \"results\": [");
        for (i, ((s, t), o)) in self.cells.iter().enumerate() {
            let body = match o {
                Outcome::Throughput(x) => format!(
                    "\"mbps\": {:.3}, \"bytes\": {}, \"seconds\": {:.6}, \"backend_cpu_s_per_gib\": {}",
                    x.mbps(),
                    x.bytes,
                    x.elapsed.as_secs_f64(),
                    x.cpu_s_per_gib().map_or("null".into(), |c| format!("{c:.6}"))
                ),
                Outcome::Latency(l) => format!(
                    "\"p50_us\": {:.3}, \"p99_us\": {:.3}, \"backend_cpu_us_per_rt\": {}",
                    l.p50.as_secs_f64() * 1e6,
                    l.p99.as_secs_f64() * 1e6,
                    l.backend_cpu_per_rt
                        .map_or("null".into(), |c| format!("{:.3}", c.as_secs_f64() * 1e6))
                ),
                Outcome::Skipped(why) => format!("\"skipped\": {}", q(why)),
                Outcome::Failed(why) => format!("\"failed\": {}", q(why)),
            };
            let _ = write!(
                out,
                "{}\n    {{\"scenario\": {}, \"transport\": {}, {body}}}",
                if i > 0 { "," } else { "" },
                q(&s.key()),
                q(t.name())
            );
        }
        out.push_str("\n  ]\n}\n");
        out
    }
}

/// A JSON string literal.
fn q(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
mod tests {
    use super::super::Throughput;
    use super::*;
    use std::time::Duration;

    #[test]
    fn table_and_json_carry_ratios_and_failures() {
        let mut r = Results::default();
        let s = Scenario::GuestToHost { size: 64 };
        let tp = |mb: u64, cpu_ms: Option<u64>| {
            Outcome::Throughput(Throughput {
                bytes: mb * 1_000_000,
                elapsed: Duration::from_secs(1),
                backend_cpu: cpu_ms.map(Duration::from_millis),
            })
        };
        r.push(Measurement {
            scenario: s,
            transport: Transport::Domsockd,
            outcome: tp(300, Some(100)),
        });
        r.push(Measurement {
            scenario: s,
            transport: Transport::VhostDeviceVsock,
            outcome: tp(100, Some(400)),
        });
        r.push(Measurement {
            scenario: s,
            transport: Transport::UnixPair,
            outcome: tp(600, None),
        });
        r.push(Measurement {
            scenario: s,
            transport: Transport::TcpLoopback,
            outcome: Outcome::Failed("stalled \"x\"".into()),
        });
        let t = r.table();
        assert!(t.contains("3.00x"), "{t}");
        assert!(t.contains("0.50x"), "{t}");
        assert!(t.contains("0.08x"), "{t}"); // 0.1 s per 300 MB vs 0.4 s per 100 MB
        assert!(t.contains("FAIL"), "{t}");
        let j = r.json();
        assert!(j.contains("\"failed\": \"stalled \\\"x\\\"\""), "{j}");
        assert!(j.contains("\"mbps\": 300.000"), "{j}");
    }
}
