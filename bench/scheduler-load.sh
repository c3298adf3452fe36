#!/usr/bin/env bash
# The scheduler under a fleet's load: simulated builders and clients on the real protocol
# against the real kiln-scheduler (tests/examples/loadgen.rs), on loopback, for a bounded time.
# The scheduler runs on core 0 and the load generator on core 1, so the scheduler's CPU per job
# is its own. Prints jobs/s, scheduler CPU per job, client latency p50/p99, scheduler memory per
# builder and how long the builders took to join, for each fleet size, with TLS and tokens and
# without, with a connection per job (as each kiln process makes today), with one kept per
# client, and with one connection shared by all clients' concurrent jobs (as a per-user agent).
#
#   bench/scheduler-load.sh [BUILDERS] [SECONDS]     (default 10,100,1000,5000 and 5 s)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v taskset >/dev/null || { echo "needs taskset (util-linux)" >&2; exit 1; }
cargo build --release -q -p kiln-scheduler --bin kiln-scheduler -p kiln-tests --example loadgen
# Two sockets per builder, one in each process.
ulimit -n "$(ulimit -Hn)"
for conn in "" --reuse --share; do
  taskset -c 1 target/release/examples/loadgen --scheduler target/release/kiln-scheduler \
    --builders "${1:-10,100,1000,5000}" --seconds "${2:-5}" --tls both $conn
done
