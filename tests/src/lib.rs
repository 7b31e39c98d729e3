//! Test harness shared by domsock's integration tests.
//!
//! The real-QEMU end-to-end tests (`tests/vm.rs`) use:
//! - [`artifacts`]: where the kernel, initramfs, QEMU and backend binaries are, and what to do
//!   when they are missing;
//! - [`backend`]: runs the backend process (`domsockd`, or a peer backend) with `--vm` specs;
//! - [`vm`]: boots a QEMU guest whose `/init` runs `domsock` guest program commands and follows
//!   its serial console ([`serial`] parses the `DS-*` lines);
//! - [`qmp`]: QEMU's control socket (hot-unplug and hot-plug of the vsock device), from
//!   `domsock-migration`;
//! - [`hosts`]: several "hosts" as network namespaces, each with its own view of its runtime
//!   directory, its own domsockd and QEMU (live migration between them);
//! - [`host`]: the host ends of hybrid vsock: listeners at `<uds-path>_<port>` and the
//!   `CONNECT <port>` handshake on `<uds-path>`;
//! - [`report`]: timing lines that bypass libtest's output capture;
//! - [`skip`]: what a test does when a part it needs is missing (fails under CI, else says
//!   "skipped" and is listed in `target/test-skips.txt`);
//! - [`bench`]: the side-by-side benchmark (`domsock-bench`).
//!
//! The byte streams and checksums are those of [`domsock_guest::pattern`], so host and guest
//! agree on every byte. Nothing here opens an AF_VSOCK socket on the host.
#![forbid(unsafe_code)]

pub mod artifacts;
pub mod backend;
pub mod bench;
pub mod host;
pub mod hosts;
/// QEMU's control socket; the client lives in `domsock-migration` (the orchestrator uses it).
pub use domsock_migration::qmp;
pub mod report;
pub mod serial;
pub mod skip;
pub mod tmp;
pub mod vm;
