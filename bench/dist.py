#!/usr/bin/env python3
"""Distributed-compilation benchmark: plain gcc vs sccache-dist, distcc, icecream and kiln.

Every farm runs on this machine over loopback (icecream's builder in a network
namespace, because icecc never compiles "remotely" on the submitting host).
The sources are the ones bench/local-cache.py fetches from Debian (lua5.4 and
leveldb), compiled with -g -O2.  For each --jobs level the script times the
wall clock of compiling all of a project's translation units (-c only),
sequentially or N at a time, with each tool, and checks:

  * that the compiles really ran on the farm (the tool's own counters or the
    builder's log), flagging any run where some fell back to local compiles;
  * every object (and .d file) byte for byte against plain gcc's.

Each dist run uses a fresh, empty local cache, and is preceded by one untimed
warm-up compile of a different file per language, so that the toolchain upload
to the builder is not in the timed figure.

Python 3.11+, standard library only.  Needs root (network namespace, overlay
mounts, daemons that drop privileges).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures as cf
import datetime as _dt
import filecmp
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Source fetching (apt-get source, deb-src entries, Debian's lua configure step)
# is shared with local-cache.py.
_LC_PATH = Path(__file__).resolve().with_name("local-cache.py")
_spec = importlib.util.spec_from_file_location("kiln_bench_local_cache", _LC_PATH)
lc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = lc
_spec.loader.exec_module(lc)

BenchError = lc.BenchError
log, banner, loud, run_cmd = lc.log, lc.banner, lc.loud, lc.run_cmd

ALL_PROJECTS = ("lua", "leveldb")
DIST_TOOLS = ("sccache-dist", "distcc", "distcc-pump", "icecc", "kiln", "kiln-plaintext", "kiln-wan")
LUA_FLAGS = ["-std=gnu99", "-g", "-O2", "-Wall", "-Wextra",
             "-DLUA_COMPAT_5_3", "-DLUA_USE_LINUX", "-c"]
LUA_EXCLUDE = {"lua.c", "luac.c"}
# CMake's RelWithDebInfo is "-O2 -g -DNDEBUG", the flags asked for here.
LEVELDB_BUILD_TYPE = "RelWithDebInfo"
COMPILE_TIMEOUT = 900
SCCACHE_DIST_ROOT = Path("/opt/kiln-bench/sccache-dist")
ICE_NETNS = "kbench-ice"
ICE_VETH = ("kbice0", "kbice1")
ICE_NET = ("10.77.0.1", "10.77.0.2")
ICE_NETNAME = "kilnbench"
ICE_RUN_DIR = Path("/var/run/icecc")       # the client finds the local iceccd here (root)

WARMUP_C = """#include <stdio.h>
#include <string.h>
int kiln_bench_warmup(const char *s) { char b[64]; snprintf(b, sizeof b, "%s!", s); return (int)strlen(b); }
"""
WARMUP_CXX = """#include <string>
#include <vector>
#include <algorithm>
int kiln_bench_warmup(std::vector<std::string> v) { std::sort(v.begin(), v.end()); return (int)v.size(); }
"""


class Skip(Exception):
    """A tool cannot be measured; the message says why."""


class CompileFailed(Exception):
    pass


# --------------------------------------------------------------------------
# Compile commands
# --------------------------------------------------------------------------

@dataclass
class Compile:
    project: str
    name: str                 # key, relative to the build dir
    args: list[str]           # args[0] is the absolute compiler
    cwd: Path
    obj: Path
    outputs: list[Path]       # obj + depfile (if any)
    build_dir: Path


def lua_commands(src: Path, build: Path, cc: str) -> list[Compile]:
    srcdir = src / "src"
    lc.debian_lua_configure(srcdir)
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
    """Configure leveldb with CMake (RelWithDebInfo: -O2 -g) and take each library
    compile exactly as `ninja -t commands` prints it (with its -MD -MT -MF flags)."""
    if not shutil.which("cmake"):
        raise BenchError("cmake not found (apt-get install cmake)")
    gen = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
    ccj = build / "compile_commands.json"
    stamp = build / "kiln-bench-config.txt"
    want = f"{cc}\n{cxx}\n{gen}\n{LEVELDB_BUILD_TYPE}\n"
    if not (ccj.is_file() and stamp.is_file() and stamp.read_text() == want):
        if build.exists():
            shutil.rmtree(build)
        build.mkdir(parents=True)
        run_cmd(["cmake", "-S", str(src), "-B", str(build), "-G", gen,
                 f"-DCMAKE_BUILD_TYPE={LEVELDB_BUILD_TYPE}",
                 f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_CXX_COMPILER={cxx}",
                 "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
                 "-DLEVELDB_BUILD_TESTS=OFF", "-DLEVELDB_BUILD_BENCHMARKS=OFF",
                 "-DLEVELDB_INSTALL=OFF"], "cmake configure of leveldb")
        if not ccj.is_file():
            raise BenchError(f"cmake did not write {ccj}")
        stamp.write_text(want)
    real: dict[str, list[str]] = {}
    if gen == "Ninja":
        p = run_cmd(["ninja", "-C", str(build), "-t", "commands", "leveldb"],
                    "ninja -t commands", check=False, quiet=True)
        for line in p.stdout.splitlines() if p.returncode == 0 else []:
            try:
                a = shlex.split(line)
            except ValueError:
                continue
            o = lc._opt_value(a, "-o")
            if a and a[0] == cxx and "-c" in a and o:
                real[o] = a
    out = []
    for e in json.loads(ccj.read_text()):
        args = e.get("arguments") or shlex.split(e["command"])
        o = e.get("output") or lc._opt_value(args, "-o")
        if not o or "leveldb.dir/" not in o or not e["file"].endswith((".cc", ".cpp")):
            continue
        args = [cxx, *real.get(o, args)[1:]]
        cwd = Path(e["directory"])
        obj = (cwd / o).resolve()
        outputs = [obj]
        mf = lc._opt_value(args, "-MF")
        if mf:
            outputs.append((cwd / mf).resolve())
        out.append(Compile("leveldb", str(obj.relative_to(build)), args, cwd, obj, outputs, build))
    if not out:
        raise BenchError(f"no leveldb library C++ compile commands in {ccj}")
    if not any("-g" in c.args and "-O2" in c.args for c in out):
        log("warning: leveldb commands do not carry -g -O2; check CMake's RelWithDebInfo flags")
    out.sort(key=lambda c: c.name)
    return out


def warmup_commands(work: Path, cc: str, cxx: str) -> list[Compile]:
    """One small file per language, not part of any project: compiled untimed before each
    dist run so that the toolchain upload (one per compiler) is not in the timed figure."""
    d = work / "warmup"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text, comp in (("warmup.c", WARMUP_C, cc), ("warmup.cc", WARMUP_CXX, cxx)):
        f = d / name
        if not f.is_file() or f.read_text() != text:
            f.write_text(text)
        obj = d / (name + ".o")
        out.append(Compile("warmup", obj.name, [comp, "-g", "-O2", "-c", name, "-o", str(obj)],
                           d, obj, [obj], d))
    return out


# --------------------------------------------------------------------------
# Processes we start (and only those)
# --------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def wait_log(path: Path, text: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if text in path.read_text(errors="replace"):
                return True
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def cpu_stall_us() -> int | None:
    """Microseconds some task has waited for a CPU since boot (Linux PSI), or None."""
    try:
        m = re.search(r"^some .*total=(\d+)", Path("/proc/pressure/cpu").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Procs:
    """Daemons this script starts, each in its own session (so its process group holds its
    children).  They are recorded in a state file so that a run killed hard can be cleaned
    up by the next one, by process id, and stopped in reverse order at exit."""

    def __init__(self, state: Path):
        self.state = state
        self.items: list[tuple[str, subprocess.Popen, Path]] = []

    def reap_leftovers(self) -> None:
        try:
            old = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return
        for it in old:
            pid = it.get("pid")
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if cmd.strip() == it.get("cmd", "").strip() and os.getpgid(pid) == pid:
                    log(f"stopping a daemon left by an earlier run: pid {pid} ({it['name']})")
                    os.killpg(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        self.state.unlink(missing_ok=True)

    def _save(self) -> None:
        items = []
        for name, p, _ in self.items:
            if p.poll() is None:
                try:
                    cmd = Path(f"/proc/{p.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    cmd = ""
                items.append({"name": name, "pid": p.pid, "cmd": cmd})
        self.state.parent.mkdir(parents=True, exist_ok=True)
        self.state.write_text(json.dumps(items))

    def start(self, name: str, cmd: list[str], logf: Path, *, env=None, cwd=None) -> subprocess.Popen:
        logf.parent.mkdir(parents=True, exist_ok=True)
        log(f"$ {shlex.join(cmd)}   > {logf}")
        with open(logf, "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=cwd, start_new_session=True)
        self.items.append((name, p, logf))
        time.sleep(0.05)
        self._save()
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 5) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        else:
            # The leader is gone but children may still be in its group.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.items = [it for it in self.items if it[1] is not p]
        self._save()

    def stop_all(self) -> None:
        for _, p, _ in reversed(list(self.items)):
            self.stop(p)


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------

def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CCACHE_", "SCCACHE_", "KILN_", "DISTCC_", "ICECC_",
                                "INCLUDE_SERVER_", "RUSTC_WRAPPER"))}
    env["LC_ALL"] = "C"
    return env


def _int(x) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return 0


class Log:
    """A log file read from an offset: count what a daemon logged during one run."""

    def __init__(self, path: Path):
        self.path, self.off = path, 0

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def mark(self) -> None:
        """Start counting here, once the daemon has finished logging what came before."""
        size, end = self.size(), time.monotonic() + 3
        while time.monotonic() < end:
            time.sleep(0.3)
            if self.size() == size:
                break
            size = self.size()
        self.off = size

    def since(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.off)
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class Tool:
    name = "plain"
    remote = False            # does it send compiles to a farm?

    def __init__(self, args, work: Path, procs: Procs):
        self.args, self.work, self.procs = args, work, procs
        self.env = clean_env()
        self.prefix: list[str] = []
        self.farm_dir = work / "farm" / self.name
        self.versions: dict[str, str] = {}
        self.notes: list[str] = []
        self.commands: list[str] = []       # the commands that set the farm up, for the report
        self.configs: dict[str, str] = {}   # config files written for the farm: path -> text

    def start_farm(self) -> None: ...
    def stop_farm(self) -> None: ...
    def before_run(self, run_dir: Path) -> None: ...
    def after_warmup(self) -> None: ...
    def end_run(self) -> dict:
        """Called once after every run, even a failed one; returns more counters."""
        return {}

    def counters(self) -> dict:
        """Cumulative {'remote': int|None, ...} since the warm-up."""
        return {}

    def settled_counters(self) -> dict:
        """counters(), once a daemon that logs a job after answering it has caught up."""
        c, end = self.counters(), time.monotonic() + 3
        while time.monotonic() < end:
            time.sleep(0.3)
            c2 = self.counters()
            if c2.get("remote") == c.get("remote"):
                return c2
            c = c2
        return c

    def stderr_hook(self, c: Compile, stderr: str) -> None: ...

    def sh(self, cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
        self.commands.append(shlex.join(cmd))
        return run_cmd(cmd, what, **kw)

    def daemon(self, name: str, cmd: list[str], logf: Path, **kw) -> subprocess.Popen:
        self.commands.append(shlex.join(cmd))
        return self.procs.start(f"{self.name}:{name}", cmd, logf, **kw)


class Plain(Tool):
    name = "plain"


# ---- sccache-dist -------------------------------------------------------------

class SccacheDist(Tool):
    name = "sccache-dist"
    remote = True

    def __init__(self, *a):
        super().__init__(*a)
        root = Path(self.args.sccache_dist_root)
        self.sccache = root / "bin" / "sccache"
        self.dist = root / "bin" / "sccache-dist"

    def install(self) -> None:
        if self.sccache.is_file() and self.dist.is_file():
            return
        if self.args.skip_missing:
            raise Skip(f"{self.dist} not found (cargo install sccache --locked --features dist-server "
                       f"--root {self.args.sccache_dist_root})")
        if not shutil.which("cargo"):
            raise Skip("sccache-dist not installed and cargo not available")
        log("sccache-dist not found; installing it (about 25 minutes on 2 cores)")
        run_cmd(["cargo", "install", "sccache", "--locked", "--features", "dist-server",
                 "--root", self.args.sccache_dist_root], "cargo install sccache (dist-server)")

    def start_farm(self) -> None:
        self.install()
        if not shutil.which("bwrap"):
            raise Skip("bubblewrap (bwrap) is needed by the overlay builder: apt-get install bubblewrap")
        d = self.farm_dir
        if d.exists():
            shutil.rmtree(d)
        (d / "toolchains").mkdir(parents=True)
        (d / "build").mkdir()
        sched_port, server_port = free_port(), free_port()
        self.client_port = str(free_port())
        self.sched_url = f"http://127.0.0.1:{sched_port}"
        (d / "scheduler.toml").write_text(
            f'public_addr = "127.0.0.1:{sched_port}"\n\n'
            '[client_auth]\ntype = "DANGEROUSLY_INSECURE"\n\n'
            '[server_auth]\ntype = "DANGEROUSLY_INSECURE"\n')
        (d / "server.toml").write_text(
            f'cache_dir = "{d / "toolchains"}"\n'
            f'public_addr = "127.0.0.1:{server_port}"\n'
            f'scheduler_url = "{self.sched_url}"\n\n'
            f'[builder]\ntype = "overlay"\nbuild_dir = "{d / "build"}"\n'
            f'bwrap_path = "{shutil.which("bwrap")}"\n\n'
            '[scheduler_auth]\ntype = "DANGEROUSLY_INSECURE"\n')
        (d / "client.toml").write_text(
            f'[dist]\nscheduler_url = "{self.sched_url}"\n'
            f'cache_dir = "{d / "client-toolchains"}"\n'
            'toolchain_cache_size = 10737418240\ntoolchains = []\n')
        # No [dist.auth]: the default client token is the one DANGEROUSLY_INSECURE expects.
        for f in ("scheduler.toml", "server.toml", "client.toml"):
            self.configs[str(d / f)] = (d / f).read_text()
        denv = clean_env() | {"SCCACHE_NO_DAEMON": "1", "SCCACHE_LOG": "info"}
        self.versions["sccache"] = subprocess.run([str(self.sccache), "--version"], capture_output=True,
                                                  text=True).stdout.strip()
        sp = self.daemon("scheduler", [str(self.dist), "scheduler", "--config", str(d / "scheduler.toml")],
                         d / "scheduler.log", env=denv)
        if not wait_port("127.0.0.1", sched_port, 20, sp):
            raise Skip(f"sccache-dist scheduler did not start:\n{tail(d / 'scheduler.log')}")
        srv = self.daemon("server", [str(self.dist), "server", "--config", str(d / "server.toml")],
                          d / "server.log", env=denv)
        if not wait_port("127.0.0.1", server_port, 30, srv):
            raise Skip(f"sccache-dist server did not start:\n{tail(d / 'server.log')}")
        self.env.update(SCCACHE_CONF=str(d / "client.toml"), SCCACHE_SERVER_PORT=self.client_port,
                        SCCACHE_CACHE_SIZE="100G", SCCACHE_ERROR_LOG=str(d / "client.log"), SCCACHE_LOG="warn")
        self.prefix = [str(self.sccache)]
        # The server registers with its first heartbeat; wait until the scheduler counts it.
        self.env["SCCACHE_DIR"] = str(d / "probe-cache")
        self._start_client()
        end, st = time.monotonic() + 60, None
        while time.monotonic() < end:
            st = self.dist_status()
            if st and st.get("num_servers", 0) >= 1:
                break
            time.sleep(1)
        self._stop_client()
        if not st or st.get("num_servers", 0) < 1:
            raise Skip(f"sccache --dist-status never showed the server: {st}\n{tail(d / 'server.log')}")
        cap = st.get("num_cpus", 0)
        self.notes.append(f"sccache-dist: 1 server, {cap} CPUs as the scheduler sees them; it places at "
                          f"most cores + 1 + cores/8 = {cap + 1 + cap // 8} jobs on it, and a compile "
                          "that finds no room is compiled locally")
        log(f"sccache --dist-status: {st}")

    def dist_status(self) -> dict | None:
        p = subprocess.run([str(self.sccache), "--dist-status"], capture_output=True, text=True,
                           env=self.env, timeout=60)
        try:
            j = json.loads(p.stdout)
            return j["SchedulerStatus"][1]
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def _start_client(self) -> None:
        p = subprocess.run([str(self.sccache), "--start-server"], capture_output=True, text=True,
                           env=self.env)
        if p.returncode != 0:
            raise Skip(f"sccache --start-server failed: {(p.stdout + p.stderr).strip()[-500:]}")

    def _stop_client(self) -> None:
        subprocess.run([str(self.sccache), "--stop-server"], capture_output=True, env=self.env)

    def before_run(self, run_dir: Path) -> None:
        self._stop_client()
        self.env["SCCACHE_DIR"] = str(run_dir / "sccache-cache")
        self._start_client()

    def after_warmup(self) -> None:
        subprocess.run([str(self.sccache), "--zero-stats"], capture_output=True, env=self.env)

    def stats(self) -> dict:
        p = subprocess.run([str(self.sccache), "--show-stats", "--stats-format=json"],
                           capture_output=True, text=True, env=self.env)
        try:
            raw = json.loads(p.stdout)
        except ValueError:
            return {}
        return raw.get("stats", raw)

    def counters(self) -> dict:
        st = self.stats()
        if not st:
            return {"remote": None}
        dc = st.get("dist_compiles", {}) or {}
        hits = st.get("cache_hits", {})
        hits = sum(_int(x) for x in hits.get("counts", {}).values()) if isinstance(hits, dict) else _int(hits)
        return {"remote": sum(_int(v) for v in dc.values()), "dist_errors": _int(st.get("dist_errors")),
                "compilations": _int(st.get("compilations")), "cache_hits": hits,
                "by_server": dict(dc)}

    def end_run(self) -> dict:
        self._stop_client()
        return {}

    def stop_farm(self) -> None:
        self._stop_client()


# ---- distcc ---------------------------------------------------------------------

class Distcc(Tool):
    name = "distcc"
    remote = True
    pump = False

    def start_farm(self) -> None:
        self.pump_cmd = self.args.distcc_pump or "distcc-pump"
        if self.pump and self.args.distcc_pump:
            if not os.access(self.pump_cmd, os.X_OK):
                raise Skip(f"--distcc-pump {self.pump_cmd} is not an executable")
            self.notes.append(f"distcc-pump: {self.pump_cmd} (given with --distcc-pump), not the distribution's")
        for exe in ("distcc", "distccd") + ((self.pump_cmd,) if self.pump else ()):
            if not shutil.which(exe):
                pkg = "distcc-pump" if exe == "distcc-pump" else "distcc"
                if self.args.skip_missing or not lc.is_root():
                    raise Skip(f"{exe} not found (apt-get install {pkg})")
                run_cmd(["apt-get", "install", "-y", pkg], f"apt-get install {pkg}")
        d = self.farm_dir
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        d.chmod(0o777)
        self.port = free_port()
        self.logf = d / "distccd.log"
        self.logf.touch()
        self.logf.chmod(0o666)    # distccd drops root for the 'distcc' user before it logs
        self.versions["distcc"] = subprocess.run(["distcc", "--version"], capture_output=True,
                                                 text=True).stdout.splitlines()[0]
        p = self.daemon("distccd", ["distccd", "--daemon", "--no-detach", "--listen", "127.0.0.1",
                                    "--allow", "127.0.0.1", "--port", str(self.port),
                                    "--jobs", str(self.args.slots), "--nice", "0", "--log-file", str(self.logf),
                                    "--log-level", "info"], d / "distccd.out")
        if not wait_port("127.0.0.1", self.port, 15, p):
            raise Skip(f"distccd did not start:\n{tail(d / 'distccd.out')}\n{tail(self.logf)}")
        self.notes.append(f"{self.name}: distccd runs with --nice 0 (the default is 5), as every other compile "
                          "here runs, so that load from outside the benchmark slows it no more than plain gcc")
        hosts = f"127.0.0.1:{self.port}/{self.args.slots}" + (",cpp,lzo" if self.pump else "")
        self.env["DISTCC_HOSTS"] = hosts
        self.prefix = ["distcc"]
        self.log = Log(self.logf)
        self.commands.append(f"DISTCC_HOSTS={hosts} distcc <compiler> ...")

    def before_run(self, run_dir: Path) -> None:
        self.env["DISTCC_DIR"] = str(run_dir / "distcc-dir")
        Path(self.env["DISTCC_DIR"]).mkdir(parents=True, exist_ok=True)
        self.local_fallbacks = 0
        self.pump_fallbacks = 0
        if self.pump:
            self._pump_start()

    def _pump_start(self) -> None:
        env = {k: v for k, v in self.env.items() if not k.startswith("INCLUDE_SERVER_")}
        p = subprocess.run([self.pump_cmd, "--startup"], capture_output=True, text=True, env=env)
        m = re.search(r"INCLUDE_SERVER_PORT='?([^'\s;]+)", p.stdout)
        m2 = re.search(r"INCLUDE_SERVER_PID='?(\d+)", p.stdout)
        if p.returncode != 0 or not m:
            raise Skip(f"distcc-pump --startup failed: {(p.stdout + p.stderr).strip()[-400:]}")
        self.env["INCLUDE_SERVER_PORT"] = m.group(1)
        if m2:
            self.env["INCLUDE_SERVER_PID"] = m2.group(1)
        if "--startup" not in " ".join(self.commands):
            self.commands.append(f"eval \"$({self.pump_cmd} --startup)\"   (per run; {self.pump_cmd} --shutdown after)")

    def _pump_stop(self) -> str:
        """Stop the include server; returns what it printed.  distcc-pump keeps the include
        server's stderr next to its socket and leaves that directory behind: read it, remove it."""
        port = self.env.get("INCLUDE_SERVER_PORT")
        if not port:
            return ""
        sock_dir = Path(port).parent
        try:
            text = (sock_dir / "stderr").read_text(errors="replace")
        except OSError:
            text = ""
        subprocess.run([self.pump_cmd, "--shutdown"], capture_output=True, text=True, env=self.env)
        self.env.pop("INCLUDE_SERVER_PORT", None)
        self.env.pop("INCLUDE_SERVER_PID", None)
        if sock_dir.name.startswith("distcc-pump.") and sock_dir.is_dir():
            shutil.rmtree(sock_dir, ignore_errors=True)
        return text

    def after_warmup(self) -> None:
        self.log.mark()
        self.local_fallbacks = self.pump_fallbacks = 0

    def stderr_hook(self, c: Compile, stderr: str) -> None:
        if re.search(r"failed to distribute|running locally instead|fallback to local", stderr, re.I):
            self.local_fallbacks += 1
        if "failed to get includes from include server" in stderr:
            self.pump_fallbacks += 1

    def counters(self) -> dict:
        text = self.log.since()
        out = {"remote": text.count("COMPILE_OK"), "remote_failed": len(re.findall(r"COMPILE_ERROR|ERROR:", text)),
               "local_fallbacks": self.local_fallbacks}
        if self.pump:
            out["pump_fallbacks"] = self.pump_fallbacks
            # distccd rewrites debug info only for jobs that came in pump mode
            out["pump_jobs_on_server"] = text.count("(dcc_fix_debug_info)")
        return out

    def end_run(self) -> dict:
        if not self.pump:
            return {}
        text = self._pump_stop()
        m = re.search(r"Include server internal error: (.*)", text)
        if not m:
            return {}
        err = m.group(1).strip()
        m2 = re.match(r"""'<class '(\w+)'>: \(["'](.*?)["'],\)'""", err)
        return {"pump_error": "include server " + (f"{m2.group(1)}: {m2.group(2)}" if m2 else err[:200])}

    def stop_farm(self) -> None:
        self._pump_stop()


class DistccPump(Distcc):
    name = "distcc-pump"
    pump = True


# ---- icecream -------------------------------------------------------------------

class Icecc(Tool):
    name = "icecc"
    remote = True

    def start_farm(self) -> None:
        for exe in ("icecc", "iceccd", "icecc-scheduler", "ip", "unshare"):
            if not shutil.which(exe):
                raise Skip(f"{exe} not found (apt-get install icecc iproute2 util-linux)")
        if not lc.is_root():
            raise Skip("icecc's farm needs root (network namespace, bind mount)")
        sock = ICE_RUN_DIR / "iceccd.socket"
        if sock.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                raise Skip(f"an iceccd already listens on {sock}; the icecc client would use it. "
                           "Stop it to measure icecc here.")
            except OSError:
                sock.unlink(missing_ok=True)          # stale, from a killed run
        d = self.farm_dir
        if d.exists():
            shutil.rmtree(d)
        for sub in ("local-env", "remote-env", "remote-run"):
            (d / sub).mkdir(parents=True)
            shutil.chown(d / sub, "icecc", "icecc")     # iceccd runs as 'icecc' and owns these
        d.chmod(0o777)
        self.created_run_dir = not ICE_RUN_DIR.exists()
        ICE_RUN_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(ICE_RUN_DIR, "icecc", "icecc")
        self._netns_down()                                # leftovers of a killed run
        h, r = ICE_NET
        a, b = ICE_VETH
        for cmd in (["ip", "netns", "add", ICE_NETNS],
                    ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
                    ["ip", "link", "set", b, "netns", ICE_NETNS],
                    ["ip", "addr", "add", f"{h}/24", "dev", a],
                    ["ip", "link", "set", a, "up"],
                    ["ip", "netns", "exec", ICE_NETNS, "ip", "addr", "add", f"{r}/24", "dev", b],
                    ["ip", "netns", "exec", ICE_NETNS, "ip", "link", "set", b, "up"],
                    ["ip", "netns", "exec", ICE_NETNS, "ip", "link", "set", "lo", "up"]):
            try:
                self.sh(cmd, "icecc network namespace")
            except BenchError as e:
                raise Skip(f"could not set up the network namespace: {e}")
        self.netns_up = True
        port = free_port(h)
        self.versions["icecc"] = subprocess.run(["icecc", "--version"], capture_output=True,
                                                text=True).stdout.strip().splitlines()[0]
        sched = f"{h}:{port}"
        slog = d / "scheduler.log"
        sp = self.daemon("scheduler", ["icecc-scheduler", "-n", ICE_NETNAME, "-p", str(port), "-i", a,
                                       "-l", str(slog), "-vv"], d / "scheduler.out")
        # Not a TCP probe: the scheduler serves one connection at a time and a probe that says
        # nothing holds up the daemons' logins for their 20 s timeout.
        if not wait_log(slog, "scheduler ready", 15, sp):
            raise Skip(f"icecc-scheduler did not start:\n{tail(d / 'scheduler.out')}\n{tail(slog)}")
        # The local daemon: what the client talks to (through /var/run/icecc); it takes no jobs.
        self.local = self.daemon("iceccd-local",
                                 ["iceccd", "-n", ICE_NETNAME, "-s", sched, "-m", "0", "--nice", "0",
                                  "-b", str(d / "local-env"),
                                  "-l", str(d / "local.log"), "-vv", "-N", "kbench-local"], d / "local.out")
        # The builder: a second iceccd in the network namespace, with its own /var/run/icecc.
        inner = (f"mount --bind {shlex.quote(str(d / 'remote-run'))} {ICE_RUN_DIR} && exec iceccd "
                 f"-n {ICE_NETNAME} -s {sched} -m {self.args.slots} --nice 0 -b {shlex.quote(str(d / 'remote-env'))} "
                 f"-l {shlex.quote(str(d / 'remote.log'))} -vvv -N kbench-remote")
        self.remote_d = self.daemon("iceccd-remote",
                                    ["ip", "netns", "exec", ICE_NETNS, "unshare", "-m", "--propagation", "private",
                                     "sh", "-c", inner], d / "remote.out")
        for p, n in ((self.local, "local"), (self.remote_d, "remote")):
            if not wait_log(d / f"{n}.log", "Connected to scheduler", 90, p):
                raise Skip(f"the {n} iceccd did not join icecc-scheduler within 90 s:\n{tail(d / (n + '.log'))}"
                           f"\n{tail(d / (n + '.out'))}")
        self.prefix = ["icecc"]
        self.remote_log = Log(d / "remote.log")
        self.local_log = Log(d / "local.log")
        self.env["ICECC_LOGFILE"] = str(d / "client.log")
        self.env["ICECC_DEBUG"] = "warnings"
        self.notes.append("icecc: both iceccd run with --nice 0 (the default is 5), as every other compile here "
                          "runs, so that load from outside the benchmark slows them no more than plain gcc")
        self.notes.append("icecc: the builder is a second iceccd in network namespace "
                          f"{ICE_NETNS} ({r}, veth to {h}); the local iceccd runs with -m 0")

    def before_run(self, run_dir: Path) -> None:
        self.remote_log.mark()

    def after_warmup(self) -> None:
        self.remote_log.mark()
        self.local_log.mark()

    def counters(self) -> dict:
        text = self.remote_log.since()
        ok = len(re.findall(r"Remote compilation completed with exit code 0", text))
        started = len(re.findall(r"remote compile for file", text))
        return {"remote": ok if ok or not started else started, "remote_started": started}

    def _netns_down(self) -> None:
        p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        if re.search(rf"^{re.escape(ICE_NETNS)}\b", p.stdout, re.M):
            subprocess.run(["ip", "netns", "del", ICE_NETNS], capture_output=True)
        if Path(f"/sys/class/net/{ICE_VETH[0]}").exists():
            subprocess.run(["ip", "link", "del", ICE_VETH[0]], capture_output=True)

    def stop_farm(self) -> None:
        for attr in ("remote_d", "local"):
            p = getattr(self, attr, None)
            if p is not None:
                self.procs.stop(p)
        self._netns_down()
        (ICE_RUN_DIR / "iceccd.socket").unlink(missing_ok=True)
        if getattr(self, "created_run_dir", False):
            try:
                ICE_RUN_DIR.rmdir()
            except OSError:
                pass


# ---- kiln -------------------------------------------------------------------------

def _walk(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, path + (str(k),))
    elif isinstance(obj, list):
        yield path, obj
    else:
        yield path, obj


DIST_WORDS = ("dist", "remote", "farm", "builder", "scheduler", "fallback", "toolchain", "upload")


def dist_part(obj):
    """The dist-related part of `kiln stats --json` (field names are not final)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if any(w in str(k).lower() for w in DIST_WORDS):
                out[k] = v
            else:
                sub = dist_part(v)
                if sub:
                    out[k] = sub
        return out
    return None


class Kiln(Tool):
    name = "kiln"
    plaintext = False
    remote = True

    def build(self) -> None:
        repo = Path(self.args.kiln_repo)
        if self.args.no_kiln_build:
            return
        # kiln-jail (the helper the builder starts per job, looked for beside kiln-builder) is a
        # binary of kiln-jails, which `-p kiln-builder` does not build.
        cmd = ["cargo", "build", "--release", "-p", "kiln-client", "-p", "kiln-scheduler", "-p", "kiln-builder",
               "-p", "kiln-jails"]
        logf = self.work / "kiln-build.log"
        log(f"$ {shlex.join(cmd)}   (in {repo}; output in {logf})")
        with open(logf, "w") as f:
            p = subprocess.run(cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            raise Skip(f"`{shlex.join(cmd)}` failed (exit {p.returncode}):\n{tail(logf, 12)}")

    def start_farm(self) -> None:
        self.build()
        built = Path(self.args.kiln_repo) / "target" / "release"
        names = ("kiln", "kiln-scheduler", "kiln-builder", "kiln-jail")
        for n in names:
            if not ((built / n).is_file() and os.access(built / n, os.X_OK)):
                raise Skip(f"{built / n} not built")
        d = self.farm_dir
        if d.exists():
            shutil.rmtree(d)
        # Measure a copy: a rebuild of target/release during the run must not change what is measured.
        bindir = d / "bin"
        bindir.mkdir(parents=True)
        for n in names:
            shutil.copy2(built / n, bindir / n)
            self.versions[n] = lc.binary_id(str(bindir / n))
        self.notes.append(f"kiln: measured copies of {built}/{{{','.join(names)}}} taken at the start, in {bindir}")
        self.kiln = bindir / "kiln"
        sched, builder = bindir / "kiln-scheduler", bindir / "kiln-builder"
        for b, flags in ((sched, ("--listen",)), (builder, ("--scheduler", "--jail", "--slots", "--work-dir"))):
            h = subprocess.run([str(b), "--help"], capture_output=True, text=True)
            missing = [f for f in flags if f not in h.stdout + h.stderr]
            if h.returncode != 0 or missing:
                raise Skip(f"{b.name} --help does not offer {', '.join(missing) or 'help'}")
        h = subprocess.run([str(self.kiln), "dist-status", "--help"], capture_output=True, text=True)
        if h.returncode != 0:
            raise Skip(f"`kiln dist-status` is not a command yet: {(h.stderr or h.stdout).strip()[:200]}")
        port = free_port()
        denv = clean_env()
        if self.plaintext:
            self.url = f"http://127.0.0.1:{port}"
            sched_auth, builder_auth, client_auth = ["--insecure"], ["--insecure"], {}
        else:
            # Deployed as a user would: TLS and tokens from `kiln-scheduler init`.
            secrets = d / "secrets"
            subprocess.run([str(sched), "init", str(secrets)], check=True, capture_output=True)
            self.url = f"https://127.0.0.1:{port}"
            sched_auth = ["--tls-cert", str(secrets / "server.pem"), "--tls-key", str(secrets / "server.key"),
                          "--client-tokens", str(secrets / "client-tokens"),
                          "--builder-tokens", str(secrets / "builder-tokens")]
            builder_auth = ["--ca", str(secrets / "ca.pem"), "--token-file", str(secrets / "builder.token")]
            client_auth = dict(KILN_CA_FILE=str(secrets / "ca.pem"), KILN_TOKEN_FILE=str(secrets / "client.token"))
        sp = self.daemon("scheduler", [str(sched), "--listen", f"127.0.0.1:{port}", *sched_auth],
                         d / "scheduler.log", env=denv)
        if not wait_port("127.0.0.1", port, 20, sp):
            raise Skip(f"kiln-scheduler did not listen on 127.0.0.1:{port}:\n{tail(d / 'scheduler.log')}")
        bp = self.daemon("builder", [str(builder), "--scheduler", self.url, "--jail", "linux",
                                     "--slots", str(self.args.slots), "--work-dir", str(d / "builder"),
                                     *builder_auth],
                         d / "builder.log", env=denv)
        self.env.update(KILN_SCHEDULER=self.url, KILN_DIST="1", **client_auth)
        end, last = time.monotonic() + 60, ""
        while time.monotonic() < end:
            if bp.poll() is not None:
                raise Skip(f"kiln-builder exited {bp.returncode}:\n{tail(d / 'builder.log')}")
            p = subprocess.run([str(self.kiln), "dist-status", "--json"], capture_output=True, text=True,
                               env=self.env, timeout=30)
            last = (p.stdout + p.stderr).strip()
            if p.returncode == 0 and self._lists_builder(p.stdout):
                log(f"kiln dist-status: {last[:400]}")
                break
            time.sleep(1)
        else:
            raise Skip(f"`kiln dist-status --json` did not list the builder within 60 s: {last[:400]}")
        self.prefix = [str(self.kiln)]

    @staticmethod
    def _lists_builder(out: str) -> bool:
        try:
            j = json.loads(out)
        except ValueError:
            return False
        for path, v in _walk(j):
            if path and "builder" in path[-1].lower():
                if (isinstance(v, list) and v) or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                    return True
        return False

    def before_run(self, run_dir: Path) -> None:
        cache = run_dir / "kiln-cache"
        cache.mkdir(parents=True, exist_ok=True)
        cfg = run_dir / "kiln.empty.toml"
        cfg.write_text("")
        self.env.update(KILN_DIR=str(cache), KILN_CONFIG=str(cfg))

    def after_warmup(self) -> None:
        subprocess.run([str(self.kiln), "stats", "--zero"], capture_output=True, env=self.env)

    def counters(self) -> dict:
        p = subprocess.run([str(self.kiln), "stats", "--json"], capture_output=True, text=True, env=self.env)
        try:
            raw = json.loads(p.stdout)
        except ValueError:
            return {"remote": None, "stats_error": (p.stdout + p.stderr).strip()[:300]}
        part = dist_part(raw) or {}
        remote = None
        ints = [(path, v) for path, v in _walk(part)
                if path and isinstance(v, int) and not isinstance(v, bool)]
        for key in ("dist_compiles", "remote_compiles", "compiles", "succeeded", "done", "completed"):
            hit = [v for path, v in ints if path[-1].lower() == key]
            if hit:
                remote = hit[0]
                break
        return {"remote": remote, "remote_guessed_from": "kiln stats --json" if remote is not None else None,
                "dist_stats": part}


class KilnPlaintext(Kiln):
    """kiln's farm with --insecure: no TLS, no tokens. Not a deployment; it prices TLS."""
    name = "kiln-plaintext"
    plaintext = True


class KilnWan(Kiln):
    """kiln's farm reached through a slow link (the `slowlink` relay: --link-rtt-ms, --link-mbit),
    as a laptop borrowing the farm over a WAN would. The relay counts the connections and bytes
    the client made, per run."""
    name = "kiln-wan"

    def build(self) -> None:
        super().build()
        if self.args.no_kiln_build:
            return
        cmd = ["cargo", "build", "--release", "-p", "kiln-tests", "--example", "slowlink"]
        logf = self.work / "slowlink-build.log"
        with open(logf, "w") as f:
            p = subprocess.run(cmd, cwd=Path(self.args.kiln_repo), stdout=f, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            raise Skip(f"`{shlex.join(cmd)}` failed (exit {p.returncode}):\n{tail(logf, 12)}")

    def start_farm(self) -> None:
        super().start_farm()
        relay = Path(self.args.kiln_repo) / "target" / "release" / "examples" / "slowlink"
        if not relay.is_file():
            raise Skip(f"{relay} not built")
        port = free_port()
        target = self.url.split("://", 1)[1]
        self.link_stats = self.farm_dir / "link.json"
        lp = self.daemon("slowlink", [str(relay), "--listen", f"127.0.0.1:{port}", "--target", target,
                                      "--rtt-ms", str(self.args.link_rtt_ms), "--mbit", str(self.args.link_mbit),
                                      "--stats", str(self.link_stats)],
                         self.farm_dir / "slowlink.log", env=clean_env())
        if not wait_port("127.0.0.1", port, 20, lp):
            raise Skip(f"slowlink did not listen:\n{tail(self.farm_dir / 'slowlink.log')}")
        self.url = self.url.replace(target, f"127.0.0.1:{port}")
        self.env.update(KILN_SCHEDULER=self.url)
        self.notes.append(f"kiln-wan: client to scheduler through a link of {self.args.link_rtt_ms} ms RTT, "
                          f"{self.args.link_mbit} Mbit/s each way")

    def _link(self) -> dict:
        try:
            return json.loads(self.link_stats.read_text())
        except (OSError, ValueError):
            return {}

    def after_warmup(self) -> None:
        super().after_warmup()
        time.sleep(0.5)     # the relay rewrites its stats file every 200 ms
        self.link_before = self._link()

    def counters(self) -> dict:
        out = super().counters()
        time.sleep(0.5)
        now = self._link()
        for k in ("connections", "bytes_up", "bytes_down"):
            if k in now:
                out[f"link_{k}"] = now[k] - self.link_before.get(k, 0)
        remote = out.get("remote")
        if remote:
            out["link_bytes_up_per_remote_compile"] = round(out.get("link_bytes_up", 0) / remote)
            out["link_bytes_down_per_remote_compile"] = round(out.get("link_bytes_down", 0) / remote)
        return out


TOOL_CLASSES = {"sccache-dist": SccacheDist, "distcc": Distcc, "distcc-pump": DistccPump,
                "icecc": Icecc, "kiln": Kiln, "kiln-plaintext": KilnPlaintext, "kiln-wan": KilnWan}


# --------------------------------------------------------------------------
# Running compiles
# --------------------------------------------------------------------------

def prepare_outputs(compiles: list[Compile]) -> None:
    for c in compiles:
        for o in c.outputs:
            o.parent.mkdir(parents=True, exist_ok=True)
            o.unlink(missing_ok=True)


def run_one(tool: Tool, c: Compile) -> tuple[float, str]:
    cmd = tool.prefix + c.args
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=c.cwd, env=tool.env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CompileFailed(f"{tool.name}: {c.project}/{c.name} timed out after {COMPILE_TIMEOUT}s\n"
                            f"  cmd: {shlex.join(cmd)}")
    except OSError as e:
        raise CompileFailed(f"{tool.name}: could not run {shlex.join(cmd)}: {e}")
    dt = time.perf_counter() - t0
    err = (p.stderr or b"").decode(errors="replace")
    if p.returncode != 0:
        raise CompileFailed(f"{tool.name}: {c.project}/{c.name} exited {p.returncode}\n  cwd: {c.cwd}\n"
                            f"  cmd: {shlex.join(cmd)}\n  " + "\n  ".join(err.strip().splitlines()[-15:]))
    missing = [str(o) for o in c.outputs if not o.is_file()]
    if missing:
        raise CompileFailed(f"{tool.name}: {c.project}/{c.name} exited 0 but did not write "
                            f"{', '.join(missing)}\n  cmd: {shlex.join(cmd)}")
    return dt, err


def run_batch(tool: Tool, compiles: list[Compile], jobs: int) -> float:
    """All compiles, `jobs` at a time; returns the wall-clock seconds for the whole batch."""
    prepare_outputs(compiles)
    t0 = time.perf_counter()
    if jobs == 1:
        for c in compiles:
            _, err = run_one(tool, c)
            tool.stderr_hook(c, err)
    else:
        with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
            futs = {ex.submit(run_one, tool, c): c for c in compiles}
            try:
                for f in cf.as_completed(futs):
                    _, err = f.result()
                    tool.stderr_hook(futs[f], err)
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
    return time.perf_counter() - t0


def save_outputs(compiles: list[Compile], dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    for c in compiles:
        for o in c.outputs:
            t = dest / c.project / o.relative_to(c.build_dir)
            t.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(o, t)


def strip_debug_equal(a: Path, b: Path) -> bool | None:
    """Are two objects identical once their debug sections are removed?"""
    if not shutil.which("objcopy"):
        return None
    with tempfile.TemporaryDirectory() as td:
        sa, sb = Path(td) / "a.o", Path(td) / "b.o"
        for src, dst in ((a, sa), (b, sb)):
            if subprocess.run(["objcopy", "--strip-debug", str(src), str(dst)], capture_output=True).returncode:
                return None
        return filecmp.cmp(sa, sb, shallow=False)


def first_debug_difference(a: Path, b: Path) -> str | None:
    """The first DWARF attribute (readelf --debug-dump=info, then =line) that differs."""
    for dump in ("info", "line"):
        out = []
        for f in (a, b):
            p = subprocess.run(["readelf", f"--debug-dump={dump}", str(f)], capture_output=True, text=True)
            lines = []
            for line in p.stdout.splitlines():
                if re.search(r"^\s*(Length|Offset|Abbrev Offset|Compilation Unit @|Contents of)|^\s*$", line):
                    continue
                line = re.sub(r"offset: (?:0x)?[0-9a-f]+|<[0-9a-f]+>|\[0x[0-9a-f]+\]|\b0x[0-9a-f]+\b", "", line)
                lines.append(line.strip())
            out.append(lines)
        for x, y in zip(*out):
            if x != y:
                return f"{x}  vs  {y}"
        if len(out[0]) != len(out[1]):
            return f"--debug-dump={dump}: {len(out[0])} vs {len(out[1])} lines"
    return None


def compare_outputs(compiles: list[Compile], ref: Path, got: Path) -> dict:
    """objects: {project/rel: 'same' | 'debug-only' | 'differs' | 'missing'}; 'debug-only' means
    identical once objcopy --strip-debug has removed the debug sections from both."""
    res = {"objects": {}, "depfiles": 0, "depfiles_same": 0, "example": None}
    for c in compiles:
        for o in c.outputs:
            rel = Path(c.project) / o.relative_to(c.build_dir)
            a, b = ref / rel, got / rel
            same = b.is_file() and filecmp.cmp(a, b, shallow=False)
            if o != c.obj:
                res["depfiles"] += 1
                res["depfiles_same"] += same
                continue
            if same:
                res["objects"][str(rel)] = "same"
                continue
            if not b.is_file():
                res["objects"][str(rel)] = "missing"
                continue
            res["objects"][str(rel)] = "debug-only" if strip_debug_equal(a, b) else "differs"
            if res["example"] is None and shutil.which("readelf"):
                res["example"] = {"object": str(rel), "first_difference": first_debug_difference(a, b)}
    return res


def count_objects(compare: dict, projs: list[str], states: tuple[str, ...]) -> int:
    return sum(1 for o, st in compare["objects"].items() if o.split("/", 1)[0] in projs and st in states)


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------

@dataclass
class Run:
    tool: str
    label: str
    jobs: int
    round: int
    wall: dict = field(default_factory=dict)        # project -> seconds
    remote: dict = field(default_factory=dict)      # project -> remote compiles (or None)
    counters: dict = field(default_factory=dict)    # the tool's counters after the run
    warmup_s: float | None = None
    compare: dict | None = None
    error: str | None = None
    flags: list = field(default_factory=list)       # why this is not a clean dist figure
    cpu_pressure: dict = field(default_factory=dict)  # project -> share of the wall time tasks waited for a CPU
    saved: str | None = None
    loadavg: list | None = None


def run_tool(tool: Tool, label: str, jobs: int, rnd: int, by_project: dict, warmups: list[Compile],
             work: Path) -> Run:
    r = Run(tool.name, label, jobs, rnd)
    banner(f"{label}  -j{jobs}  (round {rnd})")
    run_dir = work / "runs" / f"{label}-j{jobs}-r{rnd}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    load_before = os.getloadavg()[0]
    all_compiles = [c for cs in by_project.values() for c in cs]
    ended = False
    try:
        tool.before_run(run_dir)
        if tool.remote:
            t0 = time.perf_counter()
            for c in warmups:
                _, err = run_one(tool, c)
            r.warmup_s = time.perf_counter() - t0
            log(f"  untimed warm-up ({len(warmups)} compiles of other files, toolchain upload): {r.warmup_s:.2f} s")
        tool.after_warmup()
        before = tool.settled_counters().get("remote") if tool.remote else None
        for proj, compiles in by_project.items():
            st0 = cpu_stall_us()
            w = run_batch(tool, compiles, jobs)
            st1 = cpu_stall_us()
            r.wall[proj] = w
            if st0 is not None and st1 is not None:
                r.cpu_pressure[proj] = round((st1 - st0) / 1e6 / w, 3)
            after = tool.settled_counters().get("remote") if tool.remote else None
            r.remote[proj] = (after - (before or 0)) if after is not None else None
            before = after
            rem = "" if not tool.remote else (f", remote {r.remote[proj]}/{len(compiles)}"
                                              if r.remote[proj] is not None else ", remote ?")
            psi = (f"; CPU pressure {r.cpu_pressure[proj] * 100:.0f}%" if proj in r.cpu_pressure else "")
            log(f"  {proj:<8} {w:8.2f} s  ({len(compiles)} compiles{rem}{psi})")
        r.counters = tool.counters() if tool.remote else {}
        ended = True
        r.counters.update(tool.end_run())
        dest = work / "objs" / f"{label}-j{jobs}-r{rnd}"
        save_outputs(all_compiles, dest)
        r.saved = str(dest)
        if tool.remote:
            n = len(all_compiles)
            tot = sum(v for v in r.remote.values() if v is not None)
            if any(v is None for v in r.remote.values()):
                r.flags.append("remote count unknown: not verified that compiles went to the farm")
            elif tot < n:
                r.flags.append(f"LOCAL FALLBACK: only {tot}/{n} compiles ran on the farm")
            pj = r.counters.get("pump_jobs_on_server")
            if pj is not None and pj < n and not r.counters.get("pump_fallbacks"):
                r.flags.append(f"only {pj}/{n} compiles reached distccd in pump mode")
            if r.counters.get("pump_fallbacks"):
                r.flags.append(f"PUMP FELL BACK to local preprocessing on {r.counters['pump_fallbacks']}/{n} "
                               f"compiles ({r.counters.get('pump_error', 'include server failed')})")
            shown = {k: v for k, v in r.counters.items() if k != "dist_stats"}
            log(f"  counters: {json.dumps(shown, default=str)}")
            if "dist_stats" in r.counters:
                log(f"  kiln stats --json, dist part: {json.dumps(r.counters['dist_stats'], default=str)}")
            for f in r.flags:
                loud(f"{label} -j{jobs}: {f}")
    except CompileFailed as e:
        r.error = str(e)
        loud(f"COMPILE FAILED under {label}")
        log(str(e))
    finally:
        if not ended:
            try:
                tool.end_run()
            except Exception as e:      # noqa: BLE001 - cleaning up one run must not stop the benchmark
                log(f"warning: {label}: end-of-run step failed: {e}")
    r.loadavg = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return r


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def summarize(runs: list[Run], projects: list[str], jobs_levels: list[int], nfiles: dict) -> dict:
    """summary[jobs][scope] = {plain_baseline_s, files, rows: {label: {...}}}.  A row takes the
    median wall time over rounds (one round slowed by other work on the machine does not move it)
    and the worst round's identical-object and remote counts."""
    out: dict = {}
    for j in jobs_levels:
        out[j] = {}
        for scope in projects + ["overall"]:
            projs = projects if scope == "overall" else [scope]
            n = sum(nfiles[p] for p in projs)
            plain = [sum(r.wall[p] for p in projs) for r in runs
                     if r.tool == "plain" and r.jobs == j and not r.error]
            base = statistics.median(plain) if plain else None
            base_min = min(plain) if plain else None
            rows = {}
            for label in dict.fromkeys(r.label for r in runs if r.jobs == j):
                rs = [r for r in runs if r.label == label and r.jobs == j and not r.error]
                if not rs:
                    rows[label] = {"error": next(r.error for r in runs if r.label == label and r.jobs == j)}
                    continue
                walls = [sum(r.wall[p] for p in projs) for r in rs]
                remote = [sum(r.remote[p] for p in projs) if all(r.remote.get(p) is not None for p in projs)
                          else None for r in rs]
                cmps = [r.compare for r in rs if r.compare]
                psi = [statistics.fmean(r.cpu_pressure[p] for p in projs) for r in rs
                       if all(p in r.cpu_pressure for p in projs)]
                med = statistics.median(walls)
                rows[label] = {
                    "tool": rs[0].tool, "seconds": med, "min": min(walls), "max": max(walls),
                    "ratio": med / base if base else None,
                    "cpu_pressure": statistics.median(psi) if psi else None,
                    "ratio_best": min(walls) / base_min if base_min else None, "files": n,
                    "objects_same": min(count_objects(c, projs, ("same",)) for c in cmps) if cmps else None,
                    "objects_same_without_debug": (min(count_objects(c, projs, ("same", "debug-only"))
                                                       for c in cmps) if cmps else None),
                    "remote": None if None in remote else min(remote),
                    "flags": scope_flags(rs, projs, n), "runs": len(rs),
                }
            out[j][scope] = {"plain_baseline_s": base, "plain_best_s": base_min, "files": n, "rows": rows}
    return out


def scope_flags(rs: list[Run], projs: list[str], n: int) -> list[str]:
    """Why the rounds of one tool are not clean dist figures, for one table."""
    out = []
    fell = [sum(r.remote[p] for p in projs) for r in rs
            if r.remote and all(r.remote.get(p) is not None for p in projs)
            and sum(r.remote[p] for p in projs) < n]
    if fell:
        out.append(f"LOCAL FALLBACK in {len(fell)}/{len(rs)} rounds (as few as {min(fell)}/{n} remote)")
    for r in rs:
        for f in r.flags:
            if not f.startswith("LOCAL FALLBACK"):
                kind = f.split(" (")[0]
                if kind not in out:
                    out.append(kind)
    return out


def print_tables(summary: dict) -> None:
    for j, scopes in summary.items():
        for scope, s in scopes.items():
            banner(f"-j{j}: {scope} ({s['files']} files)")
            log(f"{'tool':<16} {'seconds':>8} {'vs plain':>9} {'best/best':>10} {'cpu wait':>9} "
                f"{'objects identical':>18} {'same w/o debug':>15} {'remote jobs':>12}  status")
            for label, v in s["rows"].items():
                if "error" in v:
                    log(f"{label:<16} {'FAILED':>8}  {v['error'].splitlines()[0][:90]}")
                    continue
                n = v["files"]
                objs = f"{v['objects_same']}/{n}" if v["objects_same"] is not None else "-"
                wod = (f"{v['objects_same_without_debug']}/{n}"
                       if v["objects_same_without_debug"] is not None else "-")
                rem = "-" if v["tool"] == "plain" else (f"{v['remote']}/{n}" if v["remote"] is not None else "?")
                spread = f" ({v['min']:.2f}-{v['max']:.2f})" if v["runs"] > 1 else ""
                status = "ok" if not v["flags"] else "NOT A DIST FIGURE: " + "; ".join(v["flags"])
                if v["tool"] == "plain":
                    status = "baseline" if v["runs"] else ""
                psi = "-" if v["cpu_pressure"] is None else f"{v['cpu_pressure'] * 100:.0f}%"
                log(f"{label:<16} {v['seconds']:8.2f} {fmt(v['ratio'], '8.3f')}x {fmt(v['ratio_best'], '9.3f')}x "
                    f"{psi:>9} {objs:>18} {wod:>15} {rem:>12}  {status}{spread}")
            log(f"(seconds: median over rounds; vs plain: ÷ the median of all plain runs at -j{j}, "
                f"{fmt(s['plain_baseline_s'], '.2f')} s; best/best: fastest round ÷ fastest plain run, "
                f"{fmt(s['plain_best_s'], '.2f')} s; cpu wait: share of the time some task waited for a "
                "CPU (PSI), which at -j1 is other work on the machine)")


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


def int_list(s):
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated job counts, like 1,4 (got {s!r})")
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError("job counts must be >= 1")
    return list(dict.fromkeys(v))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark distributed compilation through a loopback farm: plain gcc vs "
                    "sccache-dist, distcc (plain and pump), icecream and kiln, on real Debian sources "
                    "(lua5.4, leveldb) with -g -O2, at several -j levels, checking that compiles "
                    "really ran remotely and comparing every object with plain gcc's.",
        epilog="Exit status: 0 ok; 1 a compile failed or a dist run fell back to local compiles; "
               "2 setup error.  Object differences are reported, not errors.")
    ap.add_argument("--work", default="/tmp/kiln-bench", type=Path,
                    help="work directory; sources are shared with local-cache.py (default: %(default)s)")
    ap.add_argument("--tools", type=csv_list(DIST_TOOLS),
                    default=[t for t in DIST_TOOLS if t not in ("kiln-plaintext", "kiln-wan")],
                    help="tools to measure, comma separated (default: %(default)s); plain always runs; "
                         "kiln-plaintext is kiln's farm without TLS and tokens, to price them; kiln-wan "
                         "reaches the farm through a slow link, as a laptop would")
    ap.add_argument("--link-rtt-ms", type=int, default=60,
                    help="kiln-wan: the link's round-trip time in ms (default: %(default)s)")
    ap.add_argument("--link-mbit", type=float, default=50,
                    help="kiln-wan: the link's rate each way in Mbit/s (default: %(default)s)")
    ap.add_argument("--projects", type=csv_list(ALL_PROJECTS), default=list(ALL_PROJECTS),
                    help="projects, comma separated (default: lua,leveldb)")
    ap.add_argument("--jobs", type=int_list, default=[1, 4],
                    help="compiles at once, comma separated (default: 1,4)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds: every tool at every -j level, interleaved, fresh caches each (default: 1)")
    ap.add_argument("--slots", type=int, default=4,
                    help="job slots of the builder: distcc /N, icecc -m N, kiln --slots N "
                         "(sccache-dist takes its CPU count) (default: %(default)s)")
    ap.add_argument("--cc", default="gcc", help="C compiler (default: %(default)s)")
    ap.add_argument("--cxx", default="g++", help="C++ compiler (default: %(default)s)")
    ap.add_argument("--sccache-dist-root", default=str(SCCACHE_DIST_ROOT),
                    help="cargo install --root of sccache with dist-server (default: %(default)s)")
    ap.add_argument("--distcc-pump", metavar="PATH",
                    help="distcc-pump script to use for distcc-pump (default: from PATH); see bench/README.md "
                         "for a patched include server when the distribution's is broken")
    ap.add_argument("--kiln-repo", default=str(Path(__file__).resolve().parent.parent),
                    help="the kiln workspace to build and run (default: %(default)s)")
    ap.add_argument("--no-kiln-build", action="store_true",
                    help="use the kiln binaries in target/release as they are")
    ap.add_argument("--skip-missing", action="store_true",
                    help="skip tools that are not installed instead of installing them")
    ap.add_argument("--json", metavar="OUT", type=Path, help="write raw numbers as JSON to OUT")
    ap.add_argument("--prepare-only", action="store_true",
                    help="fetch sources, derive compile commands, print them and stop")
    a = ap.parse_args(argv)
    if a.repeat < 1 or a.slots < 1:
        ap.error("--repeat and --slots must be >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cc = os.path.abspath(shutil.which(args.cc) or args.cc)
    cxx = os.path.abspath(shutil.which(args.cxx) or args.cxx)
    if not (os.access(cc, os.X_OK) and os.access(cxx, os.X_OK)):
        raise BenchError(f"compilers not found: {args.cc}, {args.cxx}")
    la = os.getloadavg()
    log(f"load average: {' '.join(f'{x:.2f}' for x in la)}  ({os.cpu_count()} CPUs)")
    if la[0] > 1.0:
        loud(f"load average {la[0]:.2f} before the start: something else is using the CPUs; timings are noisy")
    log(f"cc={cc}  cxx={cxx}  jobs={args.jobs}  slots={args.slots}")

    banner("sources and compile commands")
    by_project: dict[str, list[Compile]] = {}
    src_dirs = {}
    for proj in args.projects:
        try:
            d = lc.fetch_source(work / "src", proj)
            if proj == "lua":
                cmds = lua_commands(d, work / "build" / f"lua-dist-{Path(cc).name}", cc)
            else:
                cmds = leveldb_commands(d, work / "build" / f"leveldb-dist-{Path(cxx).name}", cc, cxx)
        except BenchError as e:
            loud(f"{proj} unavailable, continuing without it: {e}")
            continue
        src_dirs[proj] = str(d)
        by_project[proj] = cmds
        log(f"{proj}: {len(cmds)} compile commands from {d}")
    if not by_project:
        raise BenchError("no projects left to benchmark")
    projects = list(by_project)
    nfiles = {p: len(v) for p, v in by_project.items()}
    all_compiles = [c for cs in by_project.values() for c in cs]
    if args.prepare_only:
        for c in all_compiles:
            log(f"[{c.project}] (cd {c.cwd} && {shlex.join(c.args)})")
        return 0
    if not lc.is_root():
        log("warning: not root: the farms (namespaces, overlay mounts, daemons) will probably fail")
    warmups = warmup_commands(work, cc, cxx)

    procs = Procs(work / "dist-daemons.json")
    procs.reap_leftovers()
    tools: list[Tool] = []
    running: list[Tool] = []        # farms to stop
    skipped: dict[str, str] = {}

    def teardown():
        for t in reversed(running):
            try:
                t.stop_farm()
            except Exception as e:      # noqa: BLE001
                log(f"warning: stopping {t.name}: {e}")
        running.clear()
        procs.stop_all()
    atexit.register(teardown)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    runs: list[Run] = []
    try:
        banner("farms")
        for name in args.tools:
            t = TOOL_CLASSES[name](args, work, procs)
            log(f"--- {name}")
            running.append(t)
            try:
                t.start_farm()
            except Skip as e:
                msg = f"{name} dist not available: {e}" if name == "kiln" else f"{name} skipped: {e}"
                loud(msg.splitlines()[0])
                if "\n" in msg:
                    log(msg.split("\n", 1)[1])
                skipped[name] = str(e)
                running.remove(t)
                try:
                    t.stop_farm()
                except Exception as e2:     # noqa: BLE001
                    log(f"warning: stopping {name}: {e2}")
                for item in [it for it in procs.items if it[0].startswith(f"{name}:")]:
                    procs.stop(item[1])
                continue
            tools.append(t)
            for k, v in t.versions.items():
                log(f"{k}: {v}")

        plain = Plain(args, work, procs)
        banner("warm-up (plain, untimed)")
        try:
            run_batch(plain, all_compiles, max(args.jobs))
        except CompileFailed as e:
            raise BenchError(f"plain compile failed during warm-up; fix the toolchain first:\n{e}")
        log("done")

        for rnd in range(1, args.repeat + 1):
            for j in args.jobs:
                for t in [plain] + tools:
                    r = run_tool(t, t.name, j, rnd, by_project, warmups, work)
                    runs.append(r)
                    if t is plain and r.error:
                        raise BenchError("plain compile failed; cannot benchmark")
        for j in args.jobs:
            runs.append(run_tool(plain, "plain-after", j, args.repeat, by_project, warmups, work))
    finally:
        banner("teardown")
        teardown()
        log("farms stopped" + (f"; network namespace {ICE_NETNS} removed" if "icecc" in args.tools else ""))

    # ---- objects vs plain
    banner("objects vs plain gcc, byte for byte")
    ref = Path(next(r.saved for r in runs if r.tool == "plain" and r.saved))
    for r in runs:
        if r.error or not r.saved:
            continue
        c = r.compare = compare_outputs(all_compiles, ref, Path(r.saved))
        st = list(c["objects"].values())
        line = (f"{r.label} -j{r.jobs} r{r.round}: objects {st.count('same')}/{len(st)} identical"
                + (f", depfiles {c['depfiles_same']}/{c['depfiles']}" if c["depfiles"] else ""))
        if len(st) > st.count("same"):
            line += (f"; of the {len(st) - st.count('same')} that differ, {st.count('debug-only')} are "
                     "identical after objcopy --strip-debug")
        log(line)
        if c["example"] and c["example"]["first_difference"]:
            log(f"    e.g. {c['example']['object']}, first DWARF difference (plain vs {r.label}): "
                f"{c['example']['first_difference']}")

    summary = summarize(runs, projects, args.jobs, nfiles)
    print_tables(summary)
    for t in tools:
        for n in t.notes:
            log(f"note: {n}")
    log("note: every dist run starts from an empty local cache and makes one untimed warm-up compile per "
        "language (C, C++) of a small file that is not part of the projects first, so the toolchain "
        "upload to the builder is not in the timed figures")
    log("note: plain-after reruns plain at the end; compare it with plain to see machine drift")
    for name, why in skipped.items():
        log(f"{'kiln dist not available' if name == 'kiln' else name + ' skipped'}: {why.splitlines()[0]}")
    banner("commands that set up each farm")
    for t in tools:
        log(f"[{t.name}]")
        for path, text in t.configs.items():
            log(f"  {path}:")
            for line in text.strip().splitlines():
                log(f"    | {line}")
        for c in t.commands:
            log(f"  {c}")
        if t.prefix:
            log(f"  compile: {shlex.join(t.prefix)} <compiler> <args>   with "
                + " ".join(f"{k}={v}" for k, v in sorted(t.env.items())
                           if k.startswith(("SCCACHE_", "KILN_", "DISTCC_", "ICECC_", "INCLUDE_SERVER_"))))

    failures = [f"{r.label} -j{r.jobs} r{r.round}: {r.error.splitlines()[0]}" for r in runs if r.error]
    flagged = [f"{r.label} -j{r.jobs} r{r.round}: {f}" for r in runs for f in r.flags]
    elapsed = time.perf_counter() - t_start
    banner("result")
    for f in failures:
        log(f"FAILED: {f}")
    for f in flagged:
        log(f"FLAGGED: {f}")
    log(f"total benchmark time: {elapsed:.0f} s")

    if args.json:
        data = {
            "meta": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
                     "cc": cc, "cxx": cxx, "argv": sys.argv[1:], "jobs": args.jobs, "slots": args.slots,
                     "repeat": args.repeat, "elapsed_s": elapsed,
                     "versions": {k: v for t in tools for k, v in t.versions.items()},
                     "skipped": skipped, "notes": [n for t in tools for n in t.notes],
                     "commands": {t.name: t.commands for t in tools},
                     "configs": {t.name: t.configs for t in tools}},
            "projects": {p: {"source": src_dirs[p], "files": [c.name for c in by_project[p]]} for p in projects},
            "runs": [r.__dict__ for r in runs], "summary": summary,
            "failures": failures, "flagged": flagged,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1, default=str) + "\n")
        log(f"raw numbers written to {args.json}")
    return 1 if failures or flagged else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
