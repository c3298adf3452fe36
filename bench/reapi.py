#!/usr/bin/env python3
"""REAPI benchmark: kiln-cache as a Remote Execution API cache, and kiln's REAPI remote tier.

Two parts, in one run:

1. Bazel (2.1, from npm) builds a generated workspace of genrules (chains of ten, each reading
   the one before) against a REAPI cache, runs `bazel clean`, and rebuilds: the rebuild is
   served entirely from the cache (checked in Bazel's own summary, "N remote cache hit"), and
   its wall time is measured. Against kiln-cache (`--remote_cache=grpc://`) and against
   BuildGrid's `bgd server` (CAS, ByteStream and action cache on disk), alternately, and with
   Bazel's own `--disk_cache` as the floor (the same rebuild with no server).
2. A second machine's cold build of real Debian sources (lua5.4, leveldb; shared-cache.py's
   setup) served from kiln-cache, one compile at a time, through:
     ccache      remote_storage=http://ADDR/ccache/ (ccache's HTTP storage; no TLS)
     kiln-http   KILN_REMOTE_CACHE=http://ADDR   (kiln's own gRPC, plain text)
     kiln-grpc   KILN_REMOTE_CACHE=grpc://ADDR   (REAPI, plain text)
     kiln        KILN_REMOTE_CACHE=https://ADDR  (kiln's own gRPC, TLS and a token)
     kiln-grpcs  KILN_REMOTE_CACHE=grpcs://ADDR  (REAPI, TLS and the same token)
   Every remote-hit object is compared with the plain compiler's.

Targets: kiln-cache's Bazel rebuild <= 0.5x BuildGrid's; a remote hit through REAPI <= 1.2x
kiln's own gRPC tier (kiln-grpcs / kiln and kiln-grpc / kiln-http, per-compile medians).
Needs bazel and bgd on PATH (scripts/install-test-deps.sh). Python 3.11+, standard library.

    scripts/build-release.sh && python3 bench/reapi.py [--rounds N]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, _HERE / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


lc = _load("kiln_bench_local_cache", "local-cache.py")
sc = _load("kiln_bench_shared_cache", "shared-cache.py")
log, banner, loud = lc.log, lc.banner, lc.loud

TOOLS = ("ccache", "kiln-http", "kiln-grpc", "kiln", "kiln-grpcs")


class Buildgrid:
    """A `bgd server` with CAS, ByteStream and an action cache on disk, on a free port."""

    def __init__(self, work: Path):
        store = work / "bgd"
        if store.exists():
            shutil.rmtree(store)
        store.mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = store / "bgd.yml"
        config.write_text(f"""server:
  - !channel
    address: "127.0.0.1:{self.port}"
    insecure-mode: true
authorization:
  method: none
storages:
  - !disk-storage &cas
    path: {store / "blobs"}
caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 1000000
    allow-updates: true
    cache-failed-actions: true
instances:
  - name: ""
    services:
      - !action-cache
        cache: *ac
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
""")
        self.log = open(work / "bgd.log", "w")
        self.proc = subprocess.Popen(["bgd", "server", "start", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # Ready when `bgd capabilities` gets an answer.
        for _ in range(300):
            p = subprocess.run(["bgd", "capabilities", "--remote", f"http://127.0.0.1:{self.port}"],
                               capture_output=True, text=True)
            if p.returncode == 0 and "cacheCapabilities" in p.stdout:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise lc.BenchError(f"bgd server did not answer; see {work / 'bgd.log'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Bazel:
    """Bazel in a generated genrule workspace; one server, its heap bounded, shut down at the end."""

    def __init__(self, work: Path, genrules: int):
        self.ws = work / "bazel-ws"
        self.root = work / "bazel-root"
        self.genrules = genrules
        if self.ws.exists():
            shutil.rmtree(self.ws)
        self.ws.mkdir(parents=True)
        (self.ws / "WORKSPACE").write_text("")
        rules = []
        for i in range(genrules):
            if i % 10 == 0:
                rules.append(f'genrule(name = "g{i}", outs = ["g{i}.txt"], cmd = "echo genrule {i} > $@")')
            else:
                rules.append(f'genrule(name = "g{i}", srcs = [":g{i - 1}"], outs = ["g{i}.txt"], '
                             f'cmd = "(cat $(SRCS); echo genrule {i}) > $@")')
        (self.ws / "BUILD").write_text("\n".join(rules) + "\n")
        self.env = lc.clean_env()
        self.env["HOME"] = str(work)

    def run(self, *args: str) -> tuple[float, str]:
        cmd = ["bazel", f"--output_user_root={self.root}", "--host_jvm_args=-Xmx1g",
               "--max_idle_secs=600", *args]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=self.ws, env=self.env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise lc.BenchError(f"{' '.join(cmd)} failed:\n{(p.stdout + p.stderr)[-2000:]}")
        return dt, p.stdout + p.stderr

    def build(self, cache_flag: str) -> tuple[float, str]:
        dt, out = self.run("build", "//...", "--spawn_strategy=standalone", cache_flag)
        m = re.search(rf"INFO: {self.genrules} processes: ([^\n]*)\.", out)
        return dt, m.group(1) if m else "?"

    def outputs(self) -> list[bytes]:
        return [(self.ws / "bazel-bin" / f"g{i}.txt").read_bytes() for i in range(self.genrules)]

    def shutdown(self) -> None:
        try:
            self.run("shutdown")
        except lc.BenchError as e:
            loud(str(e))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="kiln-cache as a REAPI cache against BuildGrid (Bazel clean rebuilds), and "
                    "kiln's REAPI remote tier against its own gRPC tier and ccache's HTTP storage.",
        epilog="Exit status: 0 ok; 1 a build or compile failed, a rebuild or remote-hit pass was "
               "not all remote hits, or an output differed; 2 setup error.")
    ap.add_argument("--work", default="/tmp/kiln-bench-reapi", type=Path,
                    help="work directory (default: %(default)s)")
    ap.add_argument("--src", type=Path, default=None,
                    help="where the Debian sources are or go (default: WORK/src)")
    ap.add_argument("--bin", default=_HERE.parent / "target" / "release", type=Path,
                    help="directory with kiln, kiln-cache and kiln-scheduler (default: %(default)s)")
    ap.add_argument("--genrules", type=int, default=300, help="genrules in the Bazel workspace (default: 300)")
    ap.add_argument("--tools", type=lc.csv_list(TOOLS), default=list(TOOLS),
                    help="remote tiers to time, comma separated (default: all)")
    ap.add_argument("--projects", type=lc.csv_list(lc.ALL_PROJECTS), default=list(lc.ALL_PROJECTS),
                    help="projects, comma separated (default: lua,leveldb)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of the compile part; medians over rounds (default: 1)")
    ap.add_argument("--bazel-rounds", type=int, default=3,
                    help="rounds of the Bazel part, the servers' order alternating (default: 3)")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.bazel_rounds < 1:
        ap.error("--rounds and --bazel-rounds must be >= 1")
    return a


def bazel_part(args, work: Path, bins: dict, problems: list[str]) -> dict[str, list[float]]:
    for tool in ("bazel", "bgd"):
        if not shutil.which(tool):
            raise lc.BenchError(f"{tool} is not on PATH: run scripts/install-test-deps.sh")
    bazel = Bazel(work, args.genrules)
    _, version = bazel.run("version")
    log(f"bazel: {version.splitlines()[0] if version else '?'}; {args.genrules} genrules")
    rebuild: dict[str, list[float]] = {}
    reference = None
    try:
        for rnd in range(1, args.bazel_rounds + 1):
            # Alternating, so neither server always meets a Bazel server still warming up.
            # Bazel's own disk cache is the floor: the same rebuild with no server at all.
            for name in ("kiln-cache", "buildgrid", "disk-cache")[:: 1 if rnd % 2 else -1]:
                banner(f"bazel against {name} (round {rnd})")
                if name == "kiln-cache":
                    server = sc.Server(bins["kiln-cache"], work / "store" / "bazel", ["--insecure"],
                                       work / "kiln-cache-bazel.log")
                    remote = f"--remote_cache=grpc://{server.addr}"
                elif name == "buildgrid":
                    server = Buildgrid(work)
                    remote = f"--remote_cache=grpc://127.0.0.1:{server.port}"
                else:
                    server = None
                    shutil.rmtree(work / "bazel-disk-cache", ignore_errors=True)
                    remote = f"--disk_cache={work / 'bazel-disk-cache'}"
                try:
                    bazel.run("clean")
                    t, what = bazel.build(remote)
                    log(f"  fill:    {t:6.2f} s  ({what})")
                    bazel.run("clean")
                    t, what = bazel.build(remote)
                    log(f"  rebuild: {t:6.2f} s  ({what})")
                    rebuild.setdefault(name, []).append(t)
                    if what != f"{args.genrules} remote cache hit":
                        problems.append(f"bazel against {name} round {rnd}: rebuild was {what!r}")
                    outs = bazel.outputs()
                    if reference is None:
                        reference = outs
                    elif outs != reference:
                        problems.append(f"bazel against {name} round {rnd}: outputs differ")
                finally:
                    if server:
                        server.stop()
    finally:
        bazel.shutdown()
    return rebuild


def compile_part(args, work: Path, bins: dict, problems: list[str]) -> dict[str, list[float]]:
    ccache = shutil.which("ccache")
    if "ccache" in args.tools and not ccache:
        raise lc.BenchError("ccache is not installed (apt-get install ccache), or leave it out with --tools")
    cc, cxx = lc.which_abs("gcc", "C compiler"), lc.which_abs("g++", "C++ compiler")
    banner("sources and compile commands")
    compiles = []
    src = args.src or work / "src"
    for proj in args.projects:
        d = lc.fetch_source(src, proj)
        cmds = (lc.lua_commands(d, work / "build" / "lua", cc) if proj == "lua"
                else lc.leveldb_commands(d, work / "build" / "leveldb", cc, cxx))
        log(f"{proj}: {len(cmds)} compile commands from {d}")
        compiles += cmds
    secrets = work / "secrets"
    if not (secrets / "ca.pem").exists():
        subprocess.run([str(bins["kiln-scheduler"]), "init", str(secrets)], check=True, capture_output=True)
    banner("plain (reference objects)")
    plain = lc.Plain()
    plain.setup(work / "caches" / "plain")
    lc.run_pass(plain, compiles)
    ref = work / "objs" / "plain"
    lc.save_outputs(compiles, ref)

    per_compile: dict[str, list[float]] = {}
    for rnd in range(1, args.rounds + 1):
        for tool in args.tools:
            banner(f"{tool} (round {rnd})")
            tls = tool in ("kiln", "kiln-grpcs")
            flags = (["--tls-cert", str(secrets / "server.pem"), "--tls-key", str(secrets / "server.key"),
                      "--tokens", str(secrets / "client-tokens")] if tls else ["--insecure"])
            server = sc.Server(bins["kiln-cache"], work / "store" / tool, flags, work / f"kiln-cache-{tool}.log")
            try:
                scheme = {"kiln-http": "http", "kiln-grpc": "grpc", "kiln": "https", "kiln-grpcs": "grpcs"}
                if tool == "ccache":
                    remote = {"CCACHE_REMOTE_STORAGE": f"http://{server.addr}/ccache/"}
                else:
                    # TLS names the server as its certificate does.
                    host = server.addr.replace("127.0.0.1", "localhost") if tls else server.addr
                    remote = {"KILN_REMOTE_CACHE": f"{scheme[tool]}://{host}"}
                    if tls:
                        remote.update(KILN_CA_FILE=str(secrets / "ca.pem"),
                                      KILN_TOKEN_FILE=str(secrets / "client.token"))
                exe = ccache if tool == "ccache" else str(bins["kiln"])
                for phase in ("fill", "remote-hit"):
                    m = sc.Machine(tool if tool == "ccache" else "kiln", exe, remote)
                    m.setup(work / "caches" / f"{tool}-{phase}-r{rnd}")
                    t = lc.run_pass(m, compiles)
                    c = m.counters()
                    log(f"  {phase:10}: {sum(t):7.2f} s  (median {statistics.median(t) * 1000:.1f} ms; "
                        f"remote hits {c['hits']}, remote errors {c['errors']})")
                    if c["errors"]:
                        problems.append(f"{tool} round {rnd} {phase}: {c['errors']} remote errors")
                    if phase == "remote-hit":
                        per_compile.setdefault(tool, []).extend(t)
                        if c["hits"] != len(compiles):
                            problems.append(f"{tool} round {rnd}: {c['hits']} remote hits of {len(compiles)}")
                        got = work / "objs" / tool
                        lc.save_outputs(compiles, got)
                        bad = lc.compare_outputs(compiles, ref, got)
                        if bad:
                            problems.append(f"{tool} round {rnd}: {len(bad)} outputs differ, first {bad[0]}")
            except lc.CompileFailed as e:
                problems.append(str(e))
            finally:
                server.stop()
    log(f"{len(compiles)} compiles of {', '.join(args.projects)}")
    return per_compile


def main(argv=None) -> int:
    args = parse_args(argv)
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  ({os.cpu_count()} CPUs)")
    bins = sc.binaries(args.bin, work)
    problems: list[str] = []
    rebuild = bazel_part(args, work, bins, problems)
    per_compile = compile_part(args, work, bins, problems)

    banner("results")
    med = {k: statistics.median(v) for k, v in rebuild.items()}
    for name, t in med.items():
        log(f"bazel clean rebuild against {name:10}: {t:6.2f} s (median over rounds)")
    if "kiln-cache" in med and "buildgrid" in med:
        r = med["kiln-cache"] / med["buildgrid"]
        log(f"  kiln-cache / buildgrid: {r:.3f}x  (target <= 0.5x: {'met' if r <= 0.5 else 'MISSED'})")
    pc = {k: statistics.median(v) * 1000 for k, v in per_compile.items()}
    for tool, ms in pc.items():
        log(f"remote hit per compile, {tool:10}: {ms:6.2f} ms (median)")
    for reapi, own in (("kiln-grpcs", "kiln"), ("kiln-grpc", "kiln-http")):
        if reapi in pc and own in pc:
            r = pc[reapi] / pc[own]
            log(f"  {reapi} / {own}: {r:.3f}x  (target <= 1.2x: {'met' if r <= 1.2 else 'MISSED'})")
    for tool in ("kiln-grpcs", "kiln-grpc"):
        if tool in pc and "ccache" in pc:
            log(f"  {tool} / ccache: {pc[tool] / pc['ccache']:.3f}x")
    for p in problems:
        loud(p)
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except lc.BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
