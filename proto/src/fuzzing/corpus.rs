//! Runs stored fuzz inputs through a fuzz body on stable Rust: the regression side of the
//! fuzz targets, used by each crate's `tests/fuzz_corpus.rs`.
//!
//! Inputs live in the repository: `fuzz/corpus/<target>/` (the minimized corpus the fuzzer
//! grew) and `fuzz/regressions/<target>/` (one file per finding, named after it). Only the
//! files directly in those directories are run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The repository's `fuzz/` directory, from a crate's `CARGO_MANIFEST_DIR`.
pub fn fuzz_dir(manifest_dir: &str) -> PathBuf {
    Path::new(manifest_dir).join("..").join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn run_files(files: &[PathBuf], body: fn(&[u8])) -> Vec<String> {
    let mut failed = Vec::new();
    for file in files {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    failed
}

/// Runs every corpus and (fixed) regression input of `target` through `body` and panics
/// naming each input that panicked. Panics too if the corpus is missing or empty, so a
/// lost corpus cannot pass as a green test. Returns how many inputs ran.
pub fn run(fuzz_dir: &Path, target: &str, body: fn(&[u8])) -> usize {
    let corpus = files(&fuzz_dir.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "no corpus for fuzz target {target} in {}",
        fuzz_dir.display()
    );
    let regressions = files(&fuzz_dir.join("regressions").join(target));
    let all: Vec<PathBuf> = corpus.into_iter().chain(regressions).collect();
    let failed = run_files(&all, body);
    assert!(
        failed.is_empty(),
        "{target}: inputs failed:\n{}",
        failed.join("\n")
    );
    all.len()
}
