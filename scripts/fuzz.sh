#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (see the README's "Fuzzing" section).
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Builds every target with nightly cargo-fuzz (optimized, with debug assertions and overflow
# checks), then runs each given target (default: all of them, one after another) for SECONDS
# (default 600) at the lowest CPU priority, starting from and adding new inputs to
# fuzz/corpus/<target>/, minimizes that corpus with `cargo fuzz cmin`, and prints the
# executions, wall time and corpus size per target. A crash stops that target; its input is
# in fuzz/artifacts/<target>/ and the script exits non-zero at the end. Logs go to
# fuzz/target/logs/<target>.log.
#
# Needs the nightly toolchain (`rustup toolchain list`); installs cargo-fuzz when missing.
# CI does not run this: it runs the stored corpora on stable through each crate's
# tests/fuzz_corpus.rs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds=${1:-600}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

build_flags=(--release --debug-assertions)
for t in "${targets[@]}"; do
    cargo +nightly fuzz build "${build_flags[@]}" "$t"
done

mkdir -p target/logs
summary=()
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="target/logs/$t.log"
    before=$(find "corpus/$t" -type f | wc -l)
    echo "==> $t: ${seconds}s from $before corpus inputs (log: fuzz/$log)"
    start=$(date +%s)
    status=0
    # One libFuzzer process (its default), at nice 19: the machine is shared.
    nice -n 19 cargo +nightly fuzz run "${build_flags[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    wall=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    # libFuzzer's own clock ("Done N runs in S second(s)"); wall_s adds the build check.
    fuzz_s=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        echo "    $t FAILED (exit $status); see fuzz/$log and fuzz/artifacts/$t/"
        grep -E "^(SUMMARY|==[0-9]+==|thread .* panicked)" "$log" | head -5 || true
    fi
    # Keep one input per covered edge (hit counts ignored): a corpus of tens to a few
    # hundred small files that the stable corpus tests replay in well under a second.
    nice -n 19 cargo +nightly fuzz cmin "${build_flags[@]}" "$t" "corpus/$t" -- -use_counters=0 \
        >>"$log" 2>&1 || true
    after=$(find "corpus/$t" -type f | wc -l)
    summary+=("$(printf '%-16s %12s %8s %8s %8s' "$t" "${execs:-?}" "${fuzz_s:-?}" "$wall" "$after")")
done

printf '\n%-16s %12s %8s %8s %8s\n' target executions fuzz_s wall_s corpus
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
    echo "crashed: ${failed[*]}"
    exit 1
fi
