#!/usr/bin/env bash
# Runs kiln's fuzz targets (fuzz/, see fuzz/README.md) for SECONDS each, one after another, and
# prints per target the runs executed, the coverage and features reached, and the artifacts of
# any crash. Exits non-zero if a target crashed.
#
#   scripts/fuzz.sh [SECONDS]        (default: 60)
#
# Needs the nightly toolchain (rustup); installs cargo-fuzz when it is missing. New inputs go to
# fuzz/corpus/<target> (kept between runs, not committed); fuzz/seeds/<target> is read too.
set -euo pipefail

seconds=${1:-60}
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz
cargo +nightly fuzz build
# Unpacked archives are many small files: keep them off the disk where there is a tmpfs.
[ -d /dev/shm ] && export TMPDIR=/dev/shm

failed=0
for target in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$target" "seeds/$target"
  log="artifacts/$target.log"
  mkdir -p "artifacts/$target"
  status=ok
  cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 ||
    status=CRASHED
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  stats=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE '(cov|ft): [0-9]+' | paste -sd' ' - || true)
  echo "$target: $status, ${runs:-?} runs, ${stats:-no stats} ($log)"
  if [ "$status" != ok ]; then
    failed=1
    grep -oE 'Test unit written to [^ ]+' "$log" | sed 's/^/  /' || true
  fi
done
exit "$failed"
