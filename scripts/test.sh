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

# The jail tests again as an ordinary user, as a rootless builder runs them: `nobody`, root only
# in a user namespace of its own (with a mount namespace it owns, as kiln-builder makes itself).
# Built on its own first, with its output shown: a failure here says why.
cargo test -p kiln-jails --test linux --no-run
jail_tests=$(cargo test -p kiln-jails --test linux --no-run 2>&1 | grep -o 'target/[^ )]*/deps/linux-[0-9a-f]*' | tail -1)
echo "== jail tests without root ($jail_tests as nobody)"
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
if ! as_nobody test -x "$jail_tests"; then
  echo "nobody cannot run $jail_tests: the rootless tests need the checkout readable by others (chmod o+rx on it and its parents)" >&2
  exit 1
fi
as_nobody unshare --user --map-root-user --mount -- "$jail_tests"
