#!/usr/bin/env python3
"""Local compiler-cache benchmark: plain compiler vs ccache vs sccache vs kiln.

Fetches real third-party C/C++ sources from Debian at run time (lua5.4 and
leveldb), derives one compile command per file, and for each tool runs a cold
pass (empty cache) and a warm pass (same commands again), one compile process
at a time, timing every compile.  Warm-pass objects of each cache tool are
compared byte for byte with the plain compiler's objects.

Python 3.11+, standard library only.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import filecmp
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ALL_PROJECTS = ("lua", "leveldb")
CACHE_TOOLS = ("ccache", "sccache", "kiln")
DEBIAN_PACKAGE = {"lua": "lua5.4", "leveldb": "leveldb"}
# File that proves an unpacked source tree is complete.
SOURCE_MARKER = {"lua": "src/lapi.c", "leveldb": "CMakeLists.txt"}
LUA_FLAGS = ["-std=gnu99", "-O2", "-Wall", "-Wextra",
             "-DLUA_COMPAT_5_3", "-DLUA_USE_LINUX", "-c"]
LUA_EXCLUDE = {"lua.c", "luac.c"}
SRC_FILE = Path("/etc/apt/sources.list.d/kiln-bench-src.sources")
SCCACHE_PORT = "4391"          # private port: never touch a user's own sccache server
COMPILE_TIMEOUT = 900          # seconds per compile before we call it hung
TARGET_WARM_VS_CCACHE = 0.35   # kiln warm median <= 0.35 x ccache warm median
TARGET_COLD_VS_PLAIN = 1.03    # kiln cold total  <= 1.03 x plain


class BenchError(Exception):
    """Setup problem we can explain to the user; aborts the run."""


class CompileFailed(Exception):
    pass


def log(msg: str = "") -> None:
    print(msg, flush=True)


def banner(msg: str) -> None:
    log(f"\n=== {msg} ===")


def loud(msg: str) -> None:
    bar = "!" * 78
    log(f"{bar}\n!!! {msg}\n{bar}")


def run_cmd(cmd: list[str], what: str, *, cwd: Path | None = None,
            env: dict | None = None, check: bool = True,
            quiet: bool = False) -> subprocess.CompletedProcess:
    """Run a setup command, capturing output; raise BenchError on failure."""
    if not quiet:
        log(f"$ {shlex.join(cmd)}" + (f"   (in {cwd})" if cwd else ""))
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError as e:
        raise BenchError(f"{what}: command not found: {cmd[0]} ({e})") from e
    if check and p.returncode != 0:
        tail = "\n".join(p.stdout.strip().splitlines()[-25:])
        raise BenchError(f"{what} failed (exit {p.returncode}): {shlex.join(cmd)}\n{tail}")
    return p


def is_root() -> bool:
    return os.geteuid() == 0


def need_root(what: str) -> None:
    if not is_root():
        raise BenchError(f"{what} needs root (apt). Re-run as root, or do it by hand first.")


# --------------------------------------------------------------------------
# Sources from Debian
# --------------------------------------------------------------------------

def _deb822_stanzas(text: str) -> list[list[str]]:
    stanzas, cur = [], []
    for line in text.splitlines():
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur = []
        elif not line.lstrip().startswith("#"):
            cur.append(line)
    if cur:
        stanzas.append(cur)
    return stanzas


def _stanza_field(stanza: list[str], name: str) -> str | None:
    for line in stanza:
        if line[:1].isspace():
            continue
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def apt_source_files() -> list[Path]:
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    return [f for f in files if f.is_file()]


def has_deb_src() -> bool:
    for f in apt_source_files():
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for st in _deb822_stanzas(text):
                types = (_stanza_field(st, "Types") or "").split()
                if "deb-src" in types and (_stanza_field(st, "Enabled") or "yes").lower() != "no":
                    return True
        else:
            if any(l.split()[:1] == ["deb-src"] for l in text.splitlines()):
                return True
    return False


def enable_deb_src() -> None:
    """Add deb-src entries mirroring the existing deb entries, then apt-get update."""
    if has_deb_src():
        return
    need_root("Enabling deb-src entries")
    out_stanzas: list[str] = []
    list_lines: list[str] = []
    for f in apt_source_files():
        if f == SRC_FILE:
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for st in _deb822_stanzas(text):
                types = (_stanza_field(st, "Types") or "").split()
                if "deb" not in types or (_stanza_field(st, "Enabled") or "yes").lower() == "no":
                    continue
                lines = ["Types: deb-src" if re.match(r"(?i)types\s*:", l) else l for l in st]
                out_stanzas.append("\n".join(lines))
        else:
            for l in text.splitlines():
                if l.split()[:1] == ["deb"]:
                    list_lines.append("deb-src" + l.strip()[3:])
    if out_stanzas:
        SRC_FILE.write_text("# Added by kiln bench/local-cache.py (source packages for benchmarking)\n"
                            + "\n\n".join(out_stanzas) + "\n")
        log(f"Wrote {SRC_FILE} ({len(out_stanzas)} deb-src entries)")
    elif list_lines:
        lf = SRC_FILE.with_suffix(".list")
        lf.write_text("# Added by kiln bench/local-cache.py\n" + "\n".join(list_lines) + "\n")
        log(f"Wrote {lf} ({len(list_lines)} deb-src lines)")
    else:
        raise BenchError("Found no 'deb' apt entries to mirror as 'deb-src'; "
                         "add a deb-src entry by hand and re-run.")
    run_cmd(["apt-get", "update"], "apt-get update")


def find_source_dir(src_root: Path, project: str) -> Path | None:
    pkg = DEBIAN_PACKAGE[project]
    for d in sorted(src_root.glob(f"{pkg}-*")):
        if d.is_dir() and (d / SOURCE_MARKER[project]).is_file():
            return d
    return None


def fetch_source(src_root: Path, project: str) -> Path:
    d = find_source_dir(src_root, project)
    if d:
        log(f"{project}: using already-downloaded sources in {d}")
        return d
    src_root.mkdir(parents=True, exist_ok=True)
    if not shutil.which("dpkg-source"):
        need_root("Installing dpkg-dev (needed by apt-get source)")
        run_cmd(["apt-get", "install", "-y", "dpkg-dev"], "apt-get install dpkg-dev")
    enable_deb_src()
    pkg = DEBIAN_PACKAGE[project]
    cmd = ["apt-get", "source", pkg]
    p = run_cmd(cmd, f"apt-get source {pkg}", cwd=src_root, check=False)
    if p.returncode != 0 and ("deb-src" in p.stdout or "Unable to find a source package" in p.stdout):
        log("apt-get source failed; refreshing package lists and retrying once")
        need_root("apt-get update")
        run_cmd(["apt-get", "update"], "apt-get update")
        p = run_cmd(cmd, f"apt-get source {pkg}", cwd=src_root, check=False)
    if p.returncode != 0:
        tail = "\n".join(p.stdout.strip().splitlines()[-20:])
        raise BenchError(f"apt-get source {pkg} failed (exit {p.returncode}):\n{tail}")
    d = find_source_dir(src_root, project)
    if not d:
        raise BenchError(f"apt-get source {pkg} succeeded but no {pkg}-*/{SOURCE_MARKER[project]} "
                         f"found under {src_root}")
    return d


# --------------------------------------------------------------------------
# Compile commands
# --------------------------------------------------------------------------

@dataclass
class Compile:
    project: str
    name: str                 # display name / key, relative to the build dir
    args: list[str]           # args[0] is the absolute compiler
    cwd: Path
    obj: Path                 # absolute object path
    outputs: list[Path]       # obj + depfile (if any), absolute
    build_dir: Path


def _opt_value(args: list[str], opt: str) -> str | None:
    for i, a in enumerate(args):
        if a == opt and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(opt) and len(a) > len(opt) and opt in ("-o", "-MF"):
            return a[len(opt):]
    return None


def debian_lua_configure(srcdir: Path) -> None:
    """Debian's lua5.4 patches make luaconf.h include a header that debian/rules
    generates in its configure step; generate it the same way."""
    luaconf = srcdir / "luaconf.h"
    m = re.search(r'#include "(lua[\d.]*-deb-multiarch\.h)"', luaconf.read_text(errors="replace"))
    if not m or (srcdir / m.group(1)).is_file():
        return
    p = subprocess.run(["dpkg-architecture", "-qDEB_HOST_MULTIARCH"], capture_output=True, text=True)
    arch = p.stdout.strip() if p.returncode == 0 else ""
    if not arch:
        p = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True)
        arch = p.stdout.strip() or f"{platform.machine()}-linux-gnu"
    (srcdir / m.group(1)).write_text("#ifndef _LUA_DEB_MULTIARCH_\n#define _LUA_DEB_MULTIARCH_\n"
                                     f'#define DEB_HOST_MULTIARCH "{arch}"\n#endif\n')
    log(f"lua: generated {srcdir / m.group(1)} (as debian/rules does)")


def lua_commands(src: Path, build: Path, cc: str) -> list[Compile]:
    srcdir = src / "src"
    debian_lua_configure(srcdir)
    files = sorted(p for p in srcdir.glob("*.c") if p.name not in LUA_EXCLUDE)
    if not files:
        raise BenchError(f"no C files in {srcdir}")
    out = []
    for f in files:
        obj = build / (f.stem + ".o")
        out.append(Compile("lua", obj.name, [cc, *LUA_FLAGS, f.name, "-o", str(obj)],
                           srcdir, obj, [obj], build))
    return out


def leveldb_commands(src: Path, build: Path, cc: str, cxx: str) -> list[Compile]:
    """Configure leveldb with CMake; return its library's C++ compile commands.

    compile_commands.json gives the file list, but CMake leaves the dependency
    flags (-MD -MT <obj> -MF <obj>.d) out of it even though the real build
    passes them.  With Ninja we therefore take each command exactly as the
    build would run it (`ninja -t commands leveldb`)."""
    if not shutil.which("cmake"):
        raise BenchError("cmake not found (apt-get install cmake)")
    gen = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
    ccj = build / "compile_commands.json"
    stamp = build / "kiln-bench-config.txt"
    want = f"{cc}\n{cxx}\n{gen}\n"
    if not (ccj.is_file() and stamp.is_file() and stamp.read_text() == want):
        if build.exists():
            shutil.rmtree(build)
        build.mkdir(parents=True)
        run_cmd(["cmake", "-S", str(src), "-B", str(build), "-G", gen,
                 "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_CXX_COMPILER={cxx}",
                 "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
                 "-DLEVELDB_BUILD_TESTS=OFF", "-DLEVELDB_BUILD_BENCHMARKS=OFF",
                 "-DLEVELDB_INSTALL=OFF"],
                "cmake configure of leveldb")
        if not ccj.is_file():
            raise BenchError(f"cmake did not write {ccj}")
        stamp.write_text(want)

    real: dict[str, list[str]] = {}       # object (relative to build) -> real build command
    if gen == "Ninja":
        p = run_cmd(["ninja", "-C", str(build), "-t", "commands", "leveldb"],
                    "ninja -t commands", check=False, quiet=True)
        if p.returncode == 0:
            for line in p.stdout.splitlines():
                try:
                    a = shlex.split(line)
                except ValueError:
                    continue
                o = _opt_value(a, "-o")
                if a and a[0] == cxx and "-c" in a and o:
                    real[o] = a
        else:
            log("warning: `ninja -t commands` failed; using compile_commands.json as is")

    out = []
    for e in json.loads(ccj.read_text()):
        args = e.get("arguments") or shlex.split(e["command"])
        o = e.get("output") or _opt_value(args, "-o")
        if not o or "leveldb.dir/" not in o.replace("\\", "/"):
            continue
        if not e["file"].endswith((".cc", ".cpp", ".cxx")):
            continue
        args = real.get(o, args)
        cwd = Path(e["directory"])
        args = [cxx, *args[1:]]
        obj = (cwd / o).resolve()
        outputs = [obj]
        mf = _opt_value(args, "-MF")
        if mf:
            outputs.append((cwd / mf).resolve())
        name = str(obj.relative_to(build)) if obj.is_relative_to(build) else str(obj)
        out.append(Compile("leveldb", name, args, cwd, obj, outputs, build))
    if not out:
        raise BenchError(f"no leveldb library C++ compile commands in {ccj}")
    if not 30 <= len(out) <= 80:
        log(f"warning: expected ~40-60 leveldb library files, found {len(out)}")
    ndep = sum(len(c.outputs) > 1 for c in out)
    log(f"leveldb: {gen} build; {ndep}/{len(out)} commands carry -MD -MT -MF depfile flags")
    out.sort(key=lambda c: c.name)
    return out


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------

def clean_env() -> dict:
    """Our environment minus anything that would configure a cache tool."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CCACHE_", "SCCACHE_", "KILN_", "RUSTC_WRAPPER"))}
    env["LC_ALL"] = "C"
    return env


def _int(x) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return 0


class Tool:
    name = "plain"
    note = ""

    def __init__(self, exe: str | None = None):
        self.exe = exe
        self.env = clean_env()
        self.cache_dir: Path | None = None

    @property
    def prefix(self) -> list[str]:
        return [self.exe] if self.exe else []

    def version(self) -> str:
        if not self.exe:
            return ""
        p = subprocess.run([self.exe, "--version"], capture_output=True, text=True, env=self.env)
        return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr).strip() else "?"

    def setup(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        cache_dir.mkdir(parents=True)

    def empty_config(self) -> str:
        """An empty config file next to the cache dir: default settings, whatever ~/.config holds."""
        f = self.cache_dir.with_name(self.cache_dir.name + ".empty.toml")
        f.write_text("")
        return str(f)

    def before_cold(self) -> None: ...
    def teardown(self) -> None: ...

    def stats(self) -> dict | None:
        """Tool's own counters: {'hits': int, 'misses': int, 'raw': ...} or None."""
        return None


class Plain(Tool):
    name = "plain"


class Ccache(Tool):
    name = "ccache"

    def setup(self, cache_dir):
        super().setup(cache_dir)
        self.env["CCACHE_DIR"] = str(cache_dir)

    def stats(self):
        p = subprocess.run([self.exe, "--print-stats"], capture_output=True, text=True, env=self.env)
        if p.returncode == 0 and "\t" in p.stdout:
            raw = dict(l.split("\t", 1) for l in p.stdout.splitlines() if "\t" in l)
            raw = {k: _int(v) for k, v in raw.items()}
            hits = raw.get("direct_cache_hit", 0) + raw.get("preprocessed_cache_hit", 0)
            return {"hits": hits, "misses": raw.get("cache_miss", 0),
                    "direct_hits": raw.get("direct_cache_hit", 0),
                    "preprocessed_hits": raw.get("preprocessed_cache_hit", 0), "raw": raw}
        p = subprocess.run([self.exe, "-s"], capture_output=True, text=True, env=self.env)
        m_h = re.search(r"Hits:\s+(\d+)", p.stdout)
        m_m = re.search(r"Misses:\s+(\d+)", p.stdout)
        return {"hits": _int(m_h and m_h.group(1)), "misses": _int(m_m and m_m.group(1)),
                "raw": p.stdout}


class Sccache(Tool):
    name = "sccache"
    note = "sccache cold pass includes its server start-up (first compile)"

    def setup(self, cache_dir):
        super().setup(cache_dir)
        self.env.update(SCCACHE_DIR=str(cache_dir), SCCACHE_CACHE_SIZE="10G",
                        SCCACHE_SERVER_PORT=SCCACHE_PORT, SCCACHE_CONF=self.empty_config())

    def stop(self):
        subprocess.run([self.exe, "--stop-server"], capture_output=True, env=self.env)

    def before_cold(self):
        self.stop()

    def teardown(self):
        self.stop()

    def stats(self):
        p = subprocess.run([self.exe, "--show-stats", "--stats-format=json"],
                           capture_output=True, text=True, env=self.env)
        try:
            raw = json.loads(p.stdout)
            st = raw.get("stats", raw)

            def total(key):
                v = st.get(key, {})
                return sum(_int(x) for x in v.get("counts", {}).values()) if isinstance(v, dict) else _int(v)
            return {"hits": total("cache_hits"), "misses": total("cache_misses"),
                    "errors": total("cache_errors"), "raw": raw}
        except (json.JSONDecodeError, AttributeError):
            p = subprocess.run([self.exe, "-s"], capture_output=True, text=True, env=self.env)
            m_h = re.search(r"^Cache hits\s+(\d+)", p.stdout, re.M)
            m_m = re.search(r"^Cache misses\s+(\d+)", p.stdout, re.M)
            return {"hits": _int(m_h and m_h.group(1)), "misses": _int(m_m and m_m.group(1)),
                    "raw": p.stdout}


class Kiln(Tool):
    name = "kiln"

    def setup(self, cache_dir):
        super().setup(cache_dir)
        self.env["KILN_DIR"] = str(cache_dir)
        self.env["KILN_CONFIG"] = self.empty_config()

    def before_cold(self):
        p = subprocess.run([self.exe, "stats", "--zero"], capture_output=True, text=True, env=self.env)
        if p.returncode != 0:
            log(f"warning: `kiln stats --zero` exited {p.returncode}: {p.stderr.strip()[:300]}")

    def stats(self):
        p = subprocess.run([self.exe, "stats", "--json"], capture_output=True, text=True, env=self.env)
        try:
            raw = json.loads(p.stdout)
        except json.JSONDecodeError:
            log(f"warning: `kiln stats --json` did not print JSON (exit {p.returncode}): "
                f"{(p.stdout + p.stderr).strip()[:300]}")
            return None
        return {"hits": _int(raw.get("hits")), "misses": _int(raw.get("misses")), "raw": raw}


def binary_id(path: str) -> str:
    """sha256 prefix + mtime: identifies exactly which build of a binary was measured."""
    try:
        h = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        mt = _dt.datetime.fromtimestamp(Path(path).stat().st_mtime).isoformat(timespec="seconds")
        return f"sha256:{h} mtime:{mt}"
    except OSError as e:
        return f"unreadable ({e})"


def find_sccache() -> str | None:
    exe = shutil.which("sccache")
    if exe:
        return exe
    cand = Path.home() / ".cargo" / "bin" / "sccache"
    return str(cand) if cand.is_file() and os.access(cand, os.X_OK) else None


def resolve_tools(args) -> list[Tool]:
    tools: list[Tool] = []
    # Check kiln first so a missing binary fails fast, before any slow install.
    for name in sorted(args.tools, key=lambda n: n != "kiln"):
        if name == "ccache":
            exe = shutil.which("ccache")
            if not exe:
                if args.skip_missing or not is_root():
                    log("ccache not found: install it with `apt-get install ccache`; skipping ccache")
                    continue
                run_cmd(["apt-get", "install", "-y", "ccache"], "apt-get install ccache")
                exe = shutil.which("ccache")
            tools.append(Ccache(exe))
        elif name == "sccache":
            exe = args.sccache or find_sccache()
            if not exe:
                if args.skip_missing:
                    log("sccache not found: install it with `cargo install sccache --locked` "
                        "(~10-15 min on 2 cores); skipping sccache")
                    continue
                if not shutil.which("cargo"):
                    raise BenchError("sccache not found and cargo not available to install it; "
                                     "install sccache or pass --skip-missing / --tools")
                log("sccache not found; installing with `cargo install sccache --locked` "
                    "(this takes ~10-15 minutes; use --skip-missing to skip instead)")
                run_cmd(["cargo", "install", "sccache", "--locked"], "cargo install sccache")
                exe = find_sccache()
                if not exe:
                    raise BenchError("cargo install sccache succeeded but sccache is not on PATH "
                                     "or in ~/.cargo/bin")
            tools.append(Sccache(exe))
        elif name == "kiln":
            k = Path(args.kiln)
            if not (k.is_file() and os.access(k, os.X_OK)):
                msg = (f"kiln binary not found at {k}: build it with "
                       "`cargo build --release -p kiln-client` or pass --kiln PATH")
                if args.skip_missing:
                    log(msg + "; skipping kiln")
                    continue
                raise BenchError(msg + " (or --skip-missing, or --tools without kiln)")
            if k.name != "kiln":
                log(f"warning: {k} is not named 'kiln'; kiln picks its mode from its own name "
                    "(a differently named link acts as a compiler), so compiles may fail")
            # abspath, not resolve(): keep the name even if PATH is a symlink
            tools.append(Kiln(os.path.abspath(k)))
    order = {n: i for i, n in enumerate(args.tools)}
    return sorted(tools, key=lambda t: order[t.name])


# --------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------

def prepare_outputs(compiles: list[Compile]) -> None:
    for c in compiles:
        for o in c.outputs:
            o.parent.mkdir(parents=True, exist_ok=True)
            if o.exists():
                o.unlink()


def run_pass(tool: Tool, compiles: list[Compile]) -> list[float]:
    """One compile at a time; returns wall seconds per compile."""
    prepare_outputs(compiles)
    times = []
    for c in compiles:
        cmd = tool.prefix + c.args
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=c.cwd, env=tool.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=COMPILE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CompileFailed(f"{tool.name}: compile of {c.project}/{c.name} timed out after "
                                f"{COMPILE_TIMEOUT}s\n  cmd: {shlex.join(cmd)}")
        except OSError as e:
            raise CompileFailed(f"{tool.name}: could not run {shlex.join(cmd)}: {e}")
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            err = (p.stderr or b"").decode(errors="replace").strip().splitlines()[-15:]
            raise CompileFailed(f"{tool.name}: compile of {c.project}/{c.name} exited {p.returncode}\n"
                                f"  cwd: {c.cwd}\n  cmd: {shlex.join(cmd)}\n  " + "\n  ".join(err))
        missing = [str(o) for o in c.outputs if not o.is_file()]
        if missing:
            raise CompileFailed(f"{tool.name}: compile of {c.project}/{c.name} exited 0 but did not "
                                f"write {', '.join(missing)}\n  cmd: {shlex.join(cmd)}")
        times.append(dt)
    return times


def save_outputs(compiles: list[Compile], dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    for c in compiles:
        for o in c.outputs:
            rel = o.relative_to(c.build_dir) if o.is_relative_to(c.build_dir) else Path(o.name)
            t = dest / c.project / rel
            t.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(o, t)


def compare_outputs(compiles: list[Compile], ref: Path, got: Path) -> list[str]:
    bad = []
    for c in compiles:
        for o in c.outputs:
            rel = o.relative_to(c.build_dir) if o.is_relative_to(c.build_dir) else Path(o.name)
            a, b = ref / c.project / rel, got / c.project / rel
            kind = "object" if o == c.obj else "depfile"
            if not b.is_file():
                bad.append(f"{c.project}/{rel} ({kind}): missing")
            elif not filecmp.cmp(a, b, shallow=False):
                bad.append(f"{c.project}/{rel} ({kind}): differs from plain "
                           f"({a.stat().st_size} vs {b.stat().st_size} bytes)")
    return bad


@dataclass
class Run:
    label: str                    # plain / ccache / sccache / kiln / plain-after
    tool: str
    round: int
    cold: dict = field(default_factory=dict)          # project -> [s]
    warm: list = field(default_factory=list)          # [project -> [s]] per repeat
    stats_cold: dict | None = None
    stats_warm: dict | None = None
    error: str | None = None
    saved: str | None = None
    binary: str | None = None         # identity of the tool binary measured (kiln)
    loadavg: list | None = None       # 1-min load average before / after


def by_project(compiles: list[Compile], times: list[float]) -> dict:
    out: dict[str, list[float]] = {}
    for c, t in zip(compiles, times):
        out.setdefault(c.project, []).append(t)
    return out


def run_tool(tool: Tool, label: str, rnd: int, compiles: list[Compile], work: Path,
             repeat: int) -> Run:
    r = Run(label, tool.name, rnd)
    banner(f"{label} (round {rnd})")
    tool.setup(work / "caches" / f"{label}-r{rnd}")
    bin_before = binary_id(tool.exe) if tool.name == "kiln" else None
    load_before = os.getloadavg()[0]
    try:
        tool.before_cold()
        t0 = time.perf_counter()
        cold = run_pass(tool, compiles)
        r.cold = by_project(compiles, cold)
        log(f"  cold pass: {sum(cold):8.2f} s  ({len(cold)} compiles"
            + (f"; first compile {cold[0]*1000:.0f} ms" if tool.name == "sccache" else "") + ")")
        r.stats_cold = tool.stats()
        for i in range(repeat):
            warm = run_pass(tool, compiles)
            r.warm.append(by_project(compiles, warm))
            log(f"  warm pass{f' {i+1}/{repeat}' if repeat > 1 else ''}: {sum(warm):8.2f} s  "
                f"(median {statistics.median(warm)*1000:.1f} ms)")
        r.stats_warm = tool.stats()
        dest = work / "objs" / f"{label}-r{rnd}"
        save_outputs(compiles, dest)
        r.saved = str(dest)
        log(f"  elapsed {time.perf_counter() - t0:.1f} s")
    except CompileFailed as e:
        r.error = str(e)
        loud(f"COMPILE FAILED under {label}")
        log(str(e))
    finally:
        tool.teardown()
    r.loadavg = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if r.loadavg[0] > 1.5 or r.loadavg[1] > 1.5:
        log(f"  warning: load average {r.loadavg[0]} -> {r.loadavg[1]}: "
            "something else is using the CPUs, timings are noisy")
    if bin_before is not None:
        r.binary = bin_before
        after = binary_id(tool.exe)
        if after != bin_before and not r.error:
            r.error = (f"kiln binary changed while it was being measured "
                       f"({bin_before} -> {after}); re-run")
            loud(r.error)
    if r.stats_warm is not None:
        s = r.stats_warm
        log(f"  {tool.name} stats after warm pass: hits={s['hits']} misses={s['misses']}"
            + "".join(f" {k}={v}" for k, v in s.items() if k not in ("hits", "misses", "raw")))
    return r


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def _mean(xs):
    return statistics.fmean(xs) if xs else None


def summarize(runs: list[Run], projects: list[str]) -> dict:
    """summary[scope][label] = {cold_total, warm_total, warm_median_ms, n_files}."""
    scopes = projects + ["overall"]
    summary: dict = {s: {} for s in scopes}
    labels = []
    for r in runs:
        if r.label not in labels:
            labels.append(r.label)
    for scope in scopes:
        projs = projects if scope == "overall" else [scope]
        for label in labels:
            rs = [r for r in runs if r.label == label and not r.error]
            if not rs:
                continue
            colds = [sum(sum(r.cold[p]) for p in projs) for r in rs]
            warm_totals, warm_samples = [], []
            for r in rs:
                for w in r.warm:
                    warm_totals.append(sum(sum(w[p]) for p in projs))
                    for p in projs:
                        warm_samples += w[p]
            summary[scope][label] = {
                "cold_total_s": _mean(colds),
                "warm_total_s": _mean(warm_totals),
                "warm_median_ms": statistics.median(warm_samples) * 1000 if warm_samples else None,
                "n_files": sum(len(rs[0].cold[p]) for p in projs),
            }
        # Plain baseline: every plain pass (before & after, cold & warm) is a plain compile.
        plain_totals = []
        for r in runs:
            if r.tool == "plain" and not r.error:
                plain_totals.append(sum(sum(r.cold[p]) for p in projs))
                plain_totals += [sum(sum(w[p]) for p in projs) for w in r.warm]
        summary[scope]["_plain_baseline_s"] = _mean(plain_totals)
    return summary


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_tables(summary: dict, notes: list[str]) -> None:
    for scope, rows in summary.items():
        base = rows.get("_plain_baseline_s")
        cc = rows.get("ccache", {}).get("warm_median_ms")
        n = next((v["n_files"] for k, v in rows.items() if not k.startswith("_")), 0)
        banner(f"{scope} ({n} files)")
        log(f"{'tool':<12} {'cold total s':>12} {'warm total s':>12} {'warm median ms':>15} "
            f"{'cold/plain':>11} {'warm med/ccache':>16}")
        for label, v in rows.items():
            if label.startswith("_"):
                continue
            cr = v["cold_total_s"] / base if base else None
            wr = v["warm_median_ms"] / cc if cc and v["warm_median_ms"] is not None else None
            log(f"{label:<12} {fmt(v['cold_total_s'], '12.2f')} {fmt(v['warm_total_s'], '12.2f')} "
                f"{fmt(v['warm_median_ms'], '15.1f')} {fmt(cr, '10.3f')}x {fmt(wr, '15.3f')}x")
        log(f"(plain baseline for cold/plain = mean of all plain pass totals: {fmt(base, '.2f')} s)")
        pb, pa = rows.get("plain"), rows.get("plain-after")
        if pb and pa:
            log(f"machine drift, plain-after vs plain: cold total "
                f"{(pa['cold_total_s'] / pb['cold_total_s'] - 1) * 100:+.1f}%, warm median "
                f"{(pa['warm_median_ms'] / pb['warm_median_ms'] - 1) * 100:+.1f}%  "
                "(cold/plain differences smaller than this are noise)")
    for n in notes:
        log(f"note: {n}")


def evaluate_targets(summary: dict) -> dict:
    res = {}
    for scope, rows in summary.items():
        k = rows.get("kiln")
        if not k:
            continue
        base = rows.get("_plain_baseline_s")
        cc = rows.get("ccache", {}).get("warm_median_ms")
        warm = (k["warm_median_ms"] / cc) if cc else None
        cold = (k["cold_total_s"] / base) if base else None
        res[scope] = {
            "warm_median_vs_ccache": warm,
            "warm_pass": None if warm is None else warm <= TARGET_WARM_VS_CCACHE,
            "cold_total_vs_plain": cold,
            "cold_pass": None if cold is None else cold <= TARGET_COLD_VS_PLAIN,
        }
    return res


def print_targets(targets: dict) -> None:
    banner("targets (kiln)")
    if not targets:
        log("kiln not measured: no targets evaluated")
        return

    def pf(ok):
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")
    for scope, t in targets.items():
        log(f"{scope:<9} warm median <= {TARGET_WARM_VS_CCACHE}x ccache: "
            f"{fmt(t['warm_median_vs_ccache'], '.3f')}x  {pf(t['warm_pass'])}   |   "
            f"cold total <= {TARGET_COLD_VS_PLAIN}x plain: "
            f"{fmt(t['cold_total_vs_plain'], '.3f')}x  {pf(t['cold_pass'])}")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def csv_list(allowed):
    def parse(s):
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (got {s!r})")
        return list(dict.fromkeys(items))
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark kiln against a plain compiler, ccache and sccache on real "
                    "Debian sources (lua5.4, leveldb): cold and warm passes, one compile at "
                    "a time, plus a byte-for-byte check of cached objects.",
        epilog="Exit status: 0 ok; 1 a compile failed, an object mismatched, or a tool's stats "
               "showed too few warm hits; 2 setup error; 3 kiln missed a target (--strict only).")
    ap.add_argument("--work", default="/tmp/kiln-bench", type=Path,
                    help="work directory for sources, builds, caches (default: %(default)s)")
    ap.add_argument("--kiln", default=str(Path(__file__).resolve().parent.parent / "target/release/kiln"),
                    help="kiln binary; must be named 'kiln' (default: %(default)s)")
    ap.add_argument("--sccache", help="sccache binary (default: from PATH or ~/.cargo/bin)")
    ap.add_argument("--tools", type=csv_list(("plain",) + CACHE_TOOLS),
                    default=list(CACHE_TOOLS),
                    help="cache tools to measure, comma separated (default: ccache,sccache,kiln); "
                         "plain always runs, it is the baseline and the reference")
    ap.add_argument("--projects", type=csv_list(ALL_PROJECTS), default=list(ALL_PROJECTS),
                    help="projects, comma separated (default: lua,leveldb)")
    ap.add_argument("--cc", default="gcc", help="C compiler (default: %(default)s)")
    ap.add_argument("--cxx", default="g++", help="C++ compiler (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="warm passes per tool; all samples feed the median (default: 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole tool sequence (fresh caches each round) to interleave "
                         "tools and average cold totals (default: 1)")
    ap.add_argument("--json", metavar="OUT", type=Path, help="write raw numbers as JSON to OUT")
    ap.add_argument("--skip-missing", action="store_true",
                    help="skip sccache/ccache/kiln if not installed instead of installing "
                         "(sccache, ccache) or failing (kiln)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed plain warm-up pass (page cache) before measuring")
    ap.add_argument("--prepare-only", action="store_true",
                    help="fetch sources, derive compile commands, print them and stop")
    ap.add_argument("--strict", action="store_true",
                    help="exit 3 if kiln misses a target")
    a = ap.parse_args(argv)
    a.tools = [t for t in a.tools if t != "plain"]
    if a.repeat < 1 or a.rounds < 1:
        ap.error("--repeat and --rounds must be >= 1")
    return a


def which_abs(name: str, what: str) -> str:
    p = shutil.which(name)
    if not p:
        raise BenchError(f"{what} {name!r} not found on PATH")
    return os.path.abspath(p)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cc = which_abs(args.cc, "C compiler")
    cxx = which_abs(args.cxx, "C++ compiler")
    ccname, cxxname = Path(cc).name, Path(cxx).name

    log(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  ({os.cpu_count()} CPUs)")
    banner("tools")
    tools = [] if args.prepare_only else resolve_tools(args)
    plain = Plain()
    log(f"cc={cc}  cxx={cxx}")
    kiln_ids = {}
    for t in tools:
        log(f"{t.name}: {t.exe}  [{t.version()}]")
        if t.name == "kiln":
            kiln_ids["at_start"] = binary_id(t.exe)
            log(f"kiln binary: {kiln_ids['at_start']}")

    banner("sources and compile commands")
    compiles: list[Compile] = []
    projects: list[str] = []
    src_dirs = {}
    for proj in args.projects:
        if proj == "lua":
            d = fetch_source(work / "src", "lua")
            cmds = lua_commands(d, work / "build" / f"lua-{ccname}", cc)
        else:
            try:
                d = fetch_source(work / "src", "leveldb")
                cmds = leveldb_commands(d, work / "build" / f"leveldb-{cxxname}", cc, cxx)
            except BenchError as e:
                loud(f"leveldb unavailable, continuing without it: {e}")
                continue
        src_dirs[proj] = str(d)
        log(f"{proj}: {len(cmds)} compile commands from {d}")
        compiles += cmds
        projects.append(proj)
    if not compiles:
        raise BenchError("no projects left to benchmark")
    if args.prepare_only:
        for c in compiles:
            log(f"[{c.project}] (cd {c.cwd} && {shlex.join(c.args)})")
        return 0

    if not args.no_warmup:
        banner("warm-up (plain, untimed)")
        plain.setup(work / "caches" / "warmup")
        try:
            run_pass(plain, compiles)
        except CompileFailed as e:
            raise BenchError(f"plain compile failed during warm-up; fix the toolchain first:\n{e}")
        log("done")

    runs: list[Run] = []
    for rnd in range(1, args.rounds + 1):
        for t in [plain] + tools:
            runs.append(run_tool(t, t.name, rnd, compiles, work, args.repeat))
            if t is plain and runs[-1].error:
                raise BenchError("plain compile failed; cannot benchmark")
    runs.append(run_tool(plain, "plain-after", args.rounds, compiles, work, args.repeat))

    failures = [f"{r.label} round {r.round}: {r.error.splitlines()[0]}" for r in runs if r.error]
    measured = sorted({r.binary for r in runs if r.binary})
    if measured:
        log(f"kiln build(s) measured: {', '.join(measured)}")
        if len(measured) > 1:
            loud("different kiln builds were measured in different rounds; re-run")
            failures.append("kiln binary differs between rounds")

    # ---- correctness
    banner("correctness (warm-pass outputs vs plain, byte for byte)")
    ref = Path(runs[0].saved)
    mismatches: dict[str, list[str]] = {}
    for r in runs[1:]:
        if r.error or not r.saved:
            continue
        bad = compare_outputs(compiles, ref, Path(r.saved))
        key = f"{r.label}-r{r.round}"
        if bad:
            mismatches[key] = bad
            loud(f"{key}: {len(bad)} OUTPUT MISMATCH(ES) vs plain")
            for b in bad[:30]:
                log(f"    {b}")
            if len(bad) > 30:
                log(f"    ... and {len(bad) - 30} more")
        else:
            log(f"{key}: all {sum(len(c.outputs) for c in compiles)} outputs identical to plain")

    # ---- tool stats sanity
    stat_problems = []
    expected = len(compiles) * args.repeat
    for r in runs:
        if r.tool == "plain" or r.error:
            continue
        s = r.stats_warm
        if s is None:
            stat_problems.append(f"{r.label} round {r.round}: could not read the tool's stats")
        elif s["hits"] < expected:
            stat_problems.append(f"{r.label} round {r.round}: stats show {s['hits']} hits, "
                                 f"expected >= {expected} after the warm pass(es)")
    for p in stat_problems:
        loud(f"STATS CHECK: {p}")

    # ---- tables
    summary = summarize(runs, projects)
    notes = [t.note for t in tools if t.note]
    notes.append("plain-after reruns plain at the end; compare it with plain to see machine drift")
    print_tables(summary, notes)
    targets = evaluate_targets(summary)
    print_targets(targets)

    elapsed = time.perf_counter() - t_start
    ok = not (mismatches or failures or stat_problems)
    banner("result")
    for f in failures:
        log(f"FAILED: {f}")
    log(f"correctness: {'OK' if not mismatches else 'MISMATCHES in ' + ', '.join(mismatches)}")
    log(f"total benchmark time: {elapsed:.0f} s")

    if args.json:
        data = {
            "meta": {
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "platform": platform.platform(),
                "cpus": os.cpu_count(), "python": platform.python_version(),
                "cc": cc, "cxx": cxx, "argv": sys.argv[1:], "repeat": args.repeat,
                "rounds": args.rounds, "work": str(work), "elapsed_s": elapsed,
                "versions": {t.name: t.version() for t in tools},
                "tool_paths": {t.name: t.exe for t in tools}, "kiln_binary": kiln_ids | {"measured": measured},
            },
            "projects": {p: {"source": src_dirs[p],
                             "files": [c.name for c in compiles if c.project == p]}
                         for p in projects},
            "runs": [r.__dict__ for r in runs],
            "summary": summary, "targets": targets,
            "mismatches": mismatches, "failures": failures, "stat_problems": stat_problems,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1, default=str) + "\n")
        log(f"raw numbers written to {args.json}")

    if not ok:
        return 1
    if args.strict and any(v is False for t in targets.values()
                           for k, v in t.items() if k.endswith("_pass")):
        return 3
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
