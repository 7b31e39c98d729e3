//! Short-lived scratch directories with short paths: the workspace's one implementation,
//! from `domsock_host::test_utils` (Unix socket paths must stay below 108 bytes, so these
//! live in the system temp dir rather than under `target/`).

pub use domsock_host::test_utils::TempDir;
