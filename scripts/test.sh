#!/usr/bin/env bash
# The whole test suite: installs what the tests need (scripts/install-test-deps.sh, which waits
# for another apt, dpkg or run of itself rather than failing), then runs every test in the
# workspace. Used by the README and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
# pip puts Go's `go` in Python's scripts directory.
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$scripts:$PATH"

cargo test --workspace "$@"
