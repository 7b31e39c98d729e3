//! The corpora and regression inputs of this crate's fuzz targets, run on stable Rust
//! through the same bodies the cargo-fuzz targets in `fuzz/` call (see the README's
//! "Fuzzing" section).

use domsock_proto::fuzzing::corpus;

fn run(target: &str, body: fn(&[u8])) {
    let n = corpus::run(&corpus::fuzz_dir(env!("CARGO_MANIFEST_DIR")), target, body);
    eprintln!("{target}: {n} inputs");
}

#[test]
fn chain_corpus() {
    run("chain", domsock_host::fuzzing::chain);
}

#[test]
fn policy_corpus() {
    run("policy", domsock_host::fuzzing::policy);
}
