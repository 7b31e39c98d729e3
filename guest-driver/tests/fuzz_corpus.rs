//! The corpus and regression inputs of this crate's fuzz target (`bus_member`), run on
//! stable Rust through the body the cargo-fuzz target calls (see the README's "Fuzzing"
//! section).

use domsock_proto::fuzzing::corpus;

#[test]
fn bus_member_corpus() {
    let dir = corpus::fuzz_dir(env!("CARGO_MANIFEST_DIR"));
    let n = corpus::run(&dir, "bus_member", domsock_guest::fuzzing::bus_member);
    eprintln!("bus_member: {n} inputs");
}
