//! Bodies of the fuzz targets for this crate (feature `fuzzing`; not part of the API).
//!
//! Each function takes the fuzzer's raw bytes, never panics on any input unless it found a
//! bug, and checks the invariants written in its doc. The cargo-fuzz targets in `fuzz/` are
//! one-line calls of these functions, and `tests/fuzz_corpus.rs` runs every stored corpus
//! and regression input through the same functions on stable Rust. Structured inputs are
//! decoded with `arbitrary`, so a corpus file is just bytes either way.

mod bus;
mod codecs;
pub mod corpus;
mod endpoint;
mod input;
mod relay;

pub use bus::{bus_fanout, bus_wire};
pub use codecs::{control, header, hybrid};
pub use endpoint::endpoint;
pub use relay::relay;
