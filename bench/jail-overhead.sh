#!/usr/bin/env bash
# What a Linux jail costs one job apart from the compiler: a pooled container taken, input files
# placed, the jail entered and left by a program that does nothing, an output read. Prints the
# medians, and `unshare` of the same namespaces as the floor the kernel sets. Needs root and gcc.
#
#   bench/jail-overhead.sh [JOBS] [FILES]     (default 100 jobs, 200 files of 8 KiB)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p kiln-jails --example overhead --bin kiln-jail
target/release/examples/overhead "${1:-100}" "${2:-200}"
start=$(date +%s%N)
for _ in $(seq 100); do unshare -m -p -f -n -i -u true; done
end=$(date +%s%N)
python3 -c "print(f'  floor: unshare -mpfniu true  {($end - $start) / 100 / 1e6:.2f} ms')"
