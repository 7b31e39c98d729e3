//! Bodies of the fuzz targets for this crate (feature `fuzzing`; not part of the API): the
//! descriptor-chain walker against virtio-queue's mock driver and guest memory, and the
//! config file with its access policy. The cargo-fuzz targets in `fuzz/` call these, and
//! `tests/fuzz_corpus.rs` runs the stored inputs through them on stable Rust.

mod chain;
mod policy;

pub use chain::chain;
pub use policy::policy;
