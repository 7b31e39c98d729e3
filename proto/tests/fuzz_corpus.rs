//! The fuzz corpora and regression inputs of this crate's fuzz targets, run on stable Rust
//! through the same bodies the cargo-fuzz targets in `fuzz/` call (see the README's
//! "Fuzzing" section).

use domsock_proto::fuzzing::{self, corpus};

fn run(target: &str, body: fn(&[u8])) {
    let n = corpus::run(&corpus::fuzz_dir(env!("CARGO_MANIFEST_DIR")), target, body);
    eprintln!("{target}: {n} inputs");
}

#[test]
fn header_corpus() {
    run("header", fuzzing::header);
}

#[test]
fn hybrid_connect_corpus() {
    run("hybrid_connect", fuzzing::hybrid);
}

#[test]
fn control_corpus() {
    run("control", fuzzing::control);
}

#[test]
fn endpoint_corpus() {
    run("endpoint", fuzzing::endpoint);
}

#[test]
fn relay_corpus() {
    run("relay", fuzzing::relay);
}

#[test]
fn bus_wire_corpus() {
    run("bus_wire", fuzzing::bus_wire);
}

#[test]
fn bus_fanout_corpus() {
    run("bus_fanout", fuzzing::bus_fanout);
}
