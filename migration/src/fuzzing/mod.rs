//! Bodies of this crate's fuzz targets (feature `fuzzing`; not part of the API).
//!
//! Each function takes the fuzzer's raw bytes, never panics on any input unless it found a
//! bug, and checks the invariants written in its doc. The cargo-fuzz targets in `fuzz/`
//! are one-line calls of these functions, and `tests/fuzz_corpus.rs` runs every stored
//! corpus and regression input through the same functions on stable Rust.

mod session_machine;
mod session_relay;
mod session_snapshot;
mod session_wire;
mod snapshot;
mod tunnel_model;
mod tunnel_wire;

pub use session_machine::session_machine;
pub use session_relay::session_relay;
pub use session_snapshot::session_snapshot;
pub use session_wire::session_wire;
pub use snapshot::snapshot;
pub use tunnel_model::tunnel_model;
pub use tunnel_wire::tunnel_wire;
