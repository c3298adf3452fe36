#!/usr/bin/env bash
# kiln's main job on one machine: build kiln, then build a real third-party C project (Lua 5.4,
# fetched from Debian's source packages at run time) through the cache twice: a cold build that
# fills the cache, and a rebuild from scratch that is served from it. Prints the times and
# `kiln stats`.
#
#   scripts/demo.sh [WORK_DIR]      (default: target/demo)
#
# Needs root (or sudo) once, to install gcc/make/dpkg-dev and enable Debian source packages.
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

# Debian's luaconf.h includes a header its packaging generates.
mkdir -p "$work/include"
multiarch_h=$work/include/lua5.4-deb-multiarch.h
[ -e "$multiarch_h" ] || echo "#define DEB_HOST_MULTIARCH \"$(gcc -dumpmachine)\"" > "$multiarch_h"

# Debian's Lua Makefile goes through libtool; a plain Makefile of our own compiles the same
# sources with the flags upstream uses for Linux, with dependency files as real builds have.
cat > "$work/Makefile" <<MAKE
SRC := $src/src
OBJ := $work/obj
COMPILE := $kiln gcc
CFLAGS := -std=gnu99 -O2 -Wall -Wextra -DLUA_COMPAT_5_3 -DLUA_USE_LINUX -I$work/include -MD -MP
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
  make -C "$work" -j"$(nproc)" all "$@" >/dev/null
  t1=$(date +%s%N)
  python3 -c "print(f'{($t1 - $t0) / 1e9:.2f}')"
}

say "Plain build with gcc, for comparison"
plain=$(build COMPILE=gcc)
echo "plain: ${plain} s"

say "Cold build through kiln (fills the cache)"
cold=$(build)
echo "cold: ${cold} s"
say "Rebuild from scratch (served from the cache)"
warm=$(build)
echo "warm: ${warm} s"
"$work/obj/lua" -e 'print("built lua says: " .. _VERSION)'

say "kiln stats"
"$kiln" stats
hits=$("$kiln" stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["hits"])')
[ "$hits" -gt 0 ] || { echo "expected cache hits on the rebuild" >&2; exit 1; }
echo
echo "Plain gcc ${plain} s; through kiln: cold ${cold} s, cached rebuild ${warm} s (${hits} compiles served from the cache)."
