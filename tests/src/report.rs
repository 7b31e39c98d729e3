//! Per-case timing and throughput lines.
//!
//! libtest captures `print!`/`eprint!` output of passing tests; these lines are written to the
//! process's stderr directly, so they show up on every run, and are appended to
//! `target/vm-tests/report.log`.

use std::io::Write;
use std::time::Duration;

use crate::artifacts;

/// Writes `[<case>] <message>` to stderr (uncaptured) and to the report log.
pub fn line(case: &str, message: &str) {
    let text = format!("[{case}] {message}\n");
    let _ = std::io::stderr().write_all(text.as_bytes());
    let dir = artifacts::log_root();
    if std::fs::create_dir_all(&dir).is_ok() {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("report.log"))
        {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

/// MB/s with MB = 10^6 bytes.
pub fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

/// Milliseconds with one decimal, for messages.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
