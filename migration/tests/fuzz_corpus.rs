//! The snapshot fuzz target's corpus and regression inputs, run on stable Rust through the
//! body the cargo-fuzz target calls (see the README's "Fuzzing" section).

use domsock_proto::fuzzing::corpus;

#[test]
fn snapshot_corpus() {
    let dir = corpus::fuzz_dir(env!("CARGO_MANIFEST_DIR"));
    let n = corpus::run(&dir, "snapshot", domsock_migration::fuzzing::snapshot);
    eprintln!("snapshot: {n} inputs");
}
