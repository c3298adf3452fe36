#!/usr/bin/env bash
# kiln's main job on one machine: build kiln, start a compile farm on loopback (kiln-scheduler
# and two kiln-builders running every compile in a Linux namespace jail, over TLS with tokens
# from `kiln-scheduler init`, as a real farm is deployed), then build a real
# third-party C project (Lua 5.4, fetched from Debian's source packages at run time): plain
# gcc; through `kiln --dist` with an empty cache (the first compiles run locally while kiln
# packages gcc for the farm); again with the cache emptied, every compile on a builder; and
# from scratch once more, served from the cache. It checks that the farm's objects are
# byte-identical to plain gcc's, shows which builder compiled what, and shuts the farm down.
#
#   scripts/demo.sh [WORK_DIR]      (default: target/demo)
#
# Needs root: the builders mount overlays and enter namespaces (and apt installs gcc, make and
# dpkg-dev, and enables Debian source packages, when they are missing).
set -euo pipefail
shopt -s inherit_errexit

root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$root/target/demo}
mkdir -p "$work"
work=$(cd "$work" && pwd)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

say "Checking tools"
need=()
for tool in gcc make dpkg-source; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc make dpkg-dev
fi

say "Building kiln (release, statically linked for the fastest start-up)"
"$root/scripts/build-release.sh"
kiln=$root/target/release/kiln

say "Fetching Lua 5.4 from Debian's source packages"
src=$(find "$work" -maxdepth 1 -type d -name 'lua5.4-*' | head -n1)
if [ -z "$src" ]; then
  if ! apt-get source --print-uris lua5.4 >/dev/null 2>&1; then
    # Enable deb-src entries beside the binary ones, in a file of our own.
    for f in /etc/apt/sources.list.d/*.sources; do
      grep -q '^Types:.*deb-src' "$f" && continue
      sed 's/^Types: deb$/Types: deb-src/' "$f"
      echo
    done | as_root tee /etc/apt/sources.list.d/kiln-src.sources >/dev/null
    as_root apt-get update -q
  fi
  (cd "$work" && apt-get source -q lua5.4 >/dev/null)
  src=$(find "$work" -maxdepth 1 -type d -name 'lua5.4-*' | head -n1)
fi
[ -n "$src" ] || { echo "could not fetch lua5.4 sources" >&2; exit 1; }
echo "sources: $src"

export KILN_DIR=$work/cache
rm -rf "$KILN_DIR"
"$kiln" stats --zero >/dev/null

say "Writing the farm's CA, certificates and tokens (kiln-scheduler init)"
bin=$root/target/release
secrets=$work/secrets
rm -rf "$secrets"
"$bin/kiln-scheduler" init "$secrets" | head -n1
export KILN_CA_FILE=$secrets/ca.pem KILN_TOKEN_FILE=$secrets/client.token

say "Starting the farm: kiln-scheduler and two kiln-builders on 127.0.0.1"
pids=()
stop_farm() {
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}
trap stop_farm EXIT
"$bin/kiln-scheduler" --listen 127.0.0.1:0 \
  --tls-cert "$secrets/server.pem" --tls-key "$secrets/server.key" \
  --client-tokens "$secrets/client-tokens" --builder-tokens "$secrets/builder-tokens" \
  >"$work/scheduler.out" 2>"$work/scheduler.log" &
pids+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$work/scheduler.out" 2>/dev/null && break; sleep 0.05; done
addr=$(sed -n 's/^kiln-scheduler: listening on //p' "$work/scheduler.out")
[ -n "$addr" ] || { cat "$work/scheduler.log" >&2; exit 1; }
export KILN_SCHEDULER=$addr
for n in 1 2; do
  "$bin/kiln-builder" --scheduler "$KILN_SCHEDULER" --jail linux --slots 2 \
    --work-dir "$work/builder$n" --name "builder$n" \
    --ca "$secrets/ca.pem" --token-file "$secrets/builder.token" 2>"$work/builder$n.log" &
  pids+=($!)
done
for _ in $(seq 200); do
  joined=$("$kiln" dist-status --json 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["builders"]))' 2>/dev/null || echo 0)
  [ "$joined" = 2 ] && break
  sleep 0.05
done
"$kiln" dist-status

# Debian's luaconf.h includes a header its packaging generates.
mkdir -p "$work/include"
multiarch_h=$work/include/lua5.4-deb-multiarch.h
[ -e "$multiarch_h" ] || echo "#define DEB_HOST_MULTIARCH \"$(gcc -dumpmachine)\"" > "$multiarch_h"

# Debian's Lua Makefile goes through libtool; a plain Makefile of our own compiles the same
# sources with the flags upstream uses for Linux, plus debug information (which the farm must
# reproduce exactly) and dependency files as real builds have.
cat > "$work/Makefile" <<MAKE
SRC := $src/src
OBJ := $work/obj
COMPILE := $kiln gcc
CFLAGS := -std=gnu99 -O2 -g -Wall -Wextra -DLUA_COMPAT_5_3 -DLUA_USE_LINUX -I$work/include -MD -MP
LIB := \$(filter-out \$(SRC)/lua.c \$(SRC)/luac.c,\$(wildcard \$(SRC)/*.c))
all: \$(OBJ)/lua
\$(OBJ)/%.o: \$(SRC)/%.c
	@mkdir -p \$(OBJ)
	\$(COMPILE) \$(CFLAGS) -c \$< -o \$@
\$(OBJ)/lua: \$(OBJ)/lua.o \$(patsubst \$(SRC)/%.c,\$(OBJ)/%.o,\$(LIB))
	\$(COMPILE) -o \$@ \$^ -lm -ldl -Wl,-E
clean:
	rm -rf \$(OBJ)
-include \$(wildcard \$(OBJ)/*.d)
MAKE

build() {
  make -C "$work" clean >/dev/null
  local t0 t1
  t0=$(date +%s%N)
  make -C "$work" -j4 all "$@" >/dev/null
  t1=$(date +%s%N)
  python3 -c "print(f'{($t1 - $t0) / 1e9:.2f}')"
}

say "Plain build with gcc, for comparison"
plain=$(build COMPILE=gcc)
echo "plain: ${plain} s"
rm -rf "$work/obj-plain" && cp -r "$work/obj" "$work/obj-plain"

same_as_plain() {
  local same=0 total=0
  for o in "$work"/obj-plain/*.o; do
    total=$((total + 1))
    cmp -s "$o" "$work/obj/$(basename "$o")" && same=$((same + 1))
  done
  echo "objects byte-identical to plain gcc's (with -g): $same of $total"
  [ "$same" = "$total" ] || { echo "the farm's objects differ from gcc's" >&2; exit 1; }
}
dist_compiles() {
  "$kiln" stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["dist_compiles"])'
}

say "Build through kiln --dist with an empty cache (the first compiles run here while kiln packages gcc for the farm)"
first=$(KILN_DIST=1 build)
echo "farm, first build: ${first} s"
same_as_plain

say "Again with the cache emptied: gcc is packaged and on the builders, so every compile goes to the farm"
"$kiln" clear >/dev/null
before=$(dist_compiles)
cold=$(KILN_DIST=1 build)
remote=$(( $(dist_compiles) - before ))
echo "farm: ${cold} s, ${remote} compiles on builders"
same_as_plain
for n in 1 2; do
  ran=$(grep -c ' compiled ' "$work/builder$n.log" || true)
  echo "builder$n compiled $ran files, e.g.:"
  grep ' compiled ' "$work/builder$n.log" | sed -n 's/.*source=\([^ ]*\).*run_ms=\([0-9]*\).*/    \1 (\2 ms in the jail)/p' | head -n 3
done

say "Rebuild from scratch (served from the cache)"
warm=$(KILN_DIST=1 build)
echo "warm: ${warm} s"
"$work/obj/lua" -e 'print("built lua says: " .. _VERSION)'

say "kiln stats"
"$kiln" stats
json=$("$kiln" stats --json)
hits=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["hits"])' "$json")
[ "$hits" -gt 0 ] || { echo "expected cache hits on the rebuild" >&2; exit 1; }
[ "$remote" -gt 0 ] || { echo "expected compiles on the farm" >&2; exit 1; }

say "Stopping the farm"
stop_farm
echo "scheduler and builders stopped"
echo
echo "Plain gcc ${plain} s; kiln --dist on a loopback farm ${cold} s (${remote} compiles on builders, objects identical; ${first} s for the very first build, which packages gcc); cached rebuild ${warm} s (${hits} hits)."
