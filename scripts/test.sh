#!/usr/bin/env bash
# The whole domsock test suite, from a fresh Debian 12 machine:
#   1. installs what the real-VM tests need (QEMU, busybox, Debian guest kernels; see
#      tests/vm/setup.sh) and builds the static guest program and initramfs images;
#   2. checks formatting and lints;
#   3. builds domsockd and runs every test in the workspace: unit tests, simulated-time
#      protocol tests, hermetic data-plane tests, and end-to-end tests with real QEMU guests.
# .ci/run calls exactly this script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "setting up VM test prerequisites"
bash tests/vm/setup.sh

step "installing the peer backend (vhost-device-vsock 0.3.0) for the comparison tests"
# guest-driver/tests/peer.rs runs its cases against it; without it they only print a note.
# Only ever run with its Unix-socket backend (never its vsock-forwarding options).
if [ ! -x .cache/peer/bin/vhost-device-vsock ]; then
    cargo install --quiet vhost-device-vsock --version 0.3.0 --root .cache/peer ||
        echo "WARNING: could not install vhost-device-vsock; peer comparison tests will be skipped"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "building domsockd (release)"
cargo build --release --workspace --bins

step "running all tests"
cargo test --release --workspace -- --test-threads="${DOMSOCK_TEST_THREADS:-1}"
