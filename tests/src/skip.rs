//! Tests whose part is missing (a guest kernel, `DOMSOCK_SKIP_VM=1`) never pass silently:
//! under CI they fail; elsewhere they say "skipped" and are listed in a summary.
//!
//! Stable Rust's test harness has no run-time skip: a test that returns early reports `ok`.
//! So a skipped test writes `SKIPPED: <binary>::<test>: <why>` to stderr (past libtest's
//! output capture) and appends the same line to `target/test-skips.txt`, which
//! `scripts/test.sh` empties before the tests and prints after them. The user-space guest
//! tests (`guest-driver/tests/support`) write the same lines to the same file.

use std::io::Write;

use crate::artifacts;

/// True when running under CI (`CI` set to anything but empty, `0` or `false`), as CI sets
/// `CI=true`: there a missing part fails the test.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Where skipped tests are listed: `<workspace>/target/test-skips.txt`.
pub fn summary_file() -> std::path::PathBuf {
    artifacts::workspace_root()
        .join("target")
        .join("test-skips.txt")
}

/// Records that the current test (its thread name, as libtest sets it) is skipped because
/// of `why`; the caller then returns without doing the test's work.
///
/// # Panics
/// Under CI ([`under_ci`]): a missing part must fail the run there.
pub fn skip(why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| {
            s.rsplit_once('-')
                .map_or(s.clone(), |(name, _hash)| name.to_string())
        })
        .unwrap_or_default();
    if under_ci() {
        panic!("{binary}::{test}: missing under CI (CI is set): {why}");
    }
    let line = format!("SKIPPED: {binary}::{test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    let file = summary_file();
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
    {
        // One write of one short line: O_APPEND keeps concurrent tests' lines whole.
        let _ = f.write_all(line.as_bytes());
    }
}
