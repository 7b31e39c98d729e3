//! The fuzz targets' corpus and regression inputs of this crate (`snapshot`,
//! `session_wire`, `session_machine`, `session_snapshot`, `session_relay`, `tunnel_wire`, `tunnel_model`), run on stable Rust through the bodies the cargo-fuzz
//! targets call (see the README's "Fuzzing" section).

use domsock_proto::fuzzing::corpus;

fn run(target: &str, body: fn(&[u8])) {
    let dir = corpus::fuzz_dir(env!("CARGO_MANIFEST_DIR"));
    let n = corpus::run(&dir, target, body);
    eprintln!("{target}: {n} inputs");
}

#[test]
fn snapshot_corpus() {
    run("snapshot", domsock_migration::fuzzing::snapshot);
}

#[test]
fn session_wire_corpus() {
    run("session_wire", domsock_migration::fuzzing::session_wire);
}

#[test]
fn session_machine_corpus() {
    run(
        "session_machine",
        domsock_migration::fuzzing::session_machine,
    );
}

#[test]
fn session_snapshot_corpus() {
    run(
        "session_snapshot",
        domsock_migration::fuzzing::session_snapshot,
    );
}

#[test]
fn session_relay_corpus() {
    run("session_relay", domsock_migration::fuzzing::session_relay);
}

#[test]
fn tunnel_wire_corpus() {
    run("tunnel_wire", domsock_migration::fuzzing::tunnel_wire);
}

#[test]
fn tunnel_model_corpus() {
    run("tunnel_model", domsock_migration::fuzzing::tunnel_model);
}
