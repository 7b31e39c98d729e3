//! Tests whose part is missing (a guest kernel, `DOMSOCK_SKIP_VM=1`) never pass silently:
//! under CI they fail; elsewhere they say "skipped" and are listed in a summary.
//!
//! Stable Rust's test harness has no run-time skip: a test that returns early reports `ok`.
//! So a skipped test writes `SKIPPED: <binary>::<test>: <why>` to stderr (past libtest's
//! output capture) and appends the same line to `target/test-skips.txt`, which
//! `scripts/test.sh` empties before the tests and prints after them. The user-space guest
//! tests (`guest-driver/tests/support`) write the same lines to the same file.

use crate::artifacts;

pub use domsock_host::test_utils::under_ci;

/// Where skipped tests are listed: `<workspace>/target/test-skips.txt`.
pub fn summary_file() -> std::path::PathBuf {
    artifacts::workspace_root()
        .join("target")
        .join("test-skips.txt")
}

/// Records that the current test is skipped because of `why`; the caller then returns
/// without doing the test's work (`domsock_host::test_utils::skip`).
///
/// # Panics
/// Under CI ([`under_ci`]): a missing part must fail the run there.
pub fn skip(why: &str) {
    domsock_host::test_utils::skip(why, &summary_file());
}
