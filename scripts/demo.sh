#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install QEMU and a Debian guest kernel (see
# tests/vm/setup.sh), build domsockd, then boot a real guest whose AF_VSOCK sockets reach
# host processes through domsockd, and print what happened (bytes, checksums, throughput,
# latency, domsockd's counters).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DOMSOCK_VM_SKIP_6_12="${DOMSOCK_VM_SKIP_6_12:-1}" bash tests/vm/setup.sh
cargo build --release -p domsock-host -p domsock-tests --bins
exec target/release/domsock-demo
