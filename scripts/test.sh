#!/usr/bin/env bash
# The whole domsock test suite, from a fresh Debian 12 machine:
#   1. installs what the real-VM tests need (QEMU, busybox, Debian guest kernels; see
#      tests/vm/setup.sh) and builds the static guest program and initramfs images;
#   2. checks formatting and lints;
#   3. builds domsockd and runs every test in the workspace: unit tests, simulated-time
#      protocol tests, hermetic data-plane tests, and end-to-end tests with real QEMU guests.
# .ci/run calls exactly this script.
#
# Parts some tests need (the peer backend, the 6.12 guest kernel): under CI (CI=true, as CI
# sets it) a missing one fails the run, and those tests fail too; elsewhere the tests that
# need it say "SKIPPED: ..." and are listed at the end ("N tests skipped"), never counted as
# a silent pass. DOMSOCK_SKIP_VM=1 skips every real-VM test the same way (a failure in CI).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }
ci() { [ -n "${CI:-}" ] && [ "${CI}" != 0 ] && [ "${CI}" != false ]; }
missing() {
    if ci; then
        echo "ERROR: $* (CI is set: a missing part fails the run)" >&2
        exit 1
    fi
    echo "WARNING: $*; the tests that need it will be reported as skipped" >&2
}
SKIPS=target/test-skips.txt

step "setting up VM test prerequisites"
bash tests/vm/setup.sh

step "installing the peer backend (vhost-device-vsock 0.3.0) for the comparison tests"
# guest-driver/tests/peer.rs runs its cases against it. Only ever run with its Unix-socket
# backend (never its vsock-forwarding options).
if [ ! -x .cache/peer/bin/vhost-device-vsock ]; then
    cargo install --quiet vhost-device-vsock --version 0.3.0 --root .cache/peer ||
        missing "could not install vhost-device-vsock 0.3.0 into .cache/peer"
fi
if [ ! -f .cache/vm/initramfs-6.12.cpio.gz ]; then
    missing "the optional 6.12 guest kernel is not set up (.cache/vm/initramfs-6.12.cpio.gz)"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "building domsockd (release)"
cargo build --release --workspace --bins

step "running all tests"
mkdir -p target && : >"$SKIPS"
status=0
cargo test --release --workspace -- --test-threads="${DOMSOCK_TEST_THREADS:-1}" || status=$?
if [ -s "$SKIPS" ]; then
    printf '\n%d tests skipped (they did not run; see above for why):\n' "$(wc -l <"$SKIPS")"
    sed 's/^SKIPPED: /  /' "$SKIPS"
fi
exit "$status"
