#!/usr/bin/env python3
"""Shared-cache benchmark: a second machine's cold build served from kiln-cache.

Fetches the same real Debian sources as local-cache.py (lua5.4, leveldb) and, for each tool,
plays two machines on one host: machine A builds with an empty local cache and fills the
shared cache (the "fill" pass), then machine B, with an empty local cache of its own, builds
the same commands and is answered by the shared cache (the "remote-hit" pass). One compile at
a time. Every remote-hit object is compared byte for byte with the plain compiler's.

Tools, all against kiln-cache on 127.0.0.1:
  plain       the compiler alone (the reference, and the cold time B would otherwise pay)
  ccache      remote_storage=http://ADDR/ccache/ (ccache's HTTP storage; it has no TLS)
  kiln-http   KILN_REMOTE_CACHE=http://ADDR (gRPC in plain text, no token)
  kiln        KILN_REMOTE_CACHE=https://ADDR with the CA and a client token from
              `kiln-scheduler init`: the deployment SECURITY.md describes

sccache is left out: its shared backends (S3, Redis, GCS, WebDAV...) are not protocols
kiln-cache serves. Python 3.11+, standard library only. See bench/README.md.

    scripts/build-release.sh && python3 bench/shared-cache.py [--rounds N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("kiln_bench_local_cache", _HERE / "local-cache.py")
lc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = lc
_spec.loader.exec_module(lc)
log, banner, loud = lc.log, lc.banner, lc.loud

TOOLS = ("ccache", "kiln-http", "kiln")


class Server:
    """One kiln-cache process, started on a free loopback port."""

    def __init__(self, exe: Path, store: Path, flags: list[str], logf: Path):
        if store.exists():
            shutil.rmtree(store)
        self.log = open(logf, "w")
        self.proc = subprocess.Popen([str(exe), "--listen", "127.0.0.1:0", "--dir", str(store), *flags],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        m = re.search(r"127\.0\.0\.1:\d+", line)
        if not m:
            self.stop()
            raise lc.BenchError(f"kiln-cache did not print its address (got {line!r}); see {logf}")
        self.addr = m.group(0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class Machine(lc.Tool):
    """A tool on one pretend machine: its own local cache, a shared remote one."""

    def __init__(self, name: str, exe: str, remote: dict[str, str]):
        super().__init__(exe)
        self.name = name
        self.remote = remote

    def setup(self, cache_dir: Path) -> None:
        super().setup(cache_dir)
        self.env.update(self.remote)
        if self.name == "ccache":
            self.env["CCACHE_DIR"] = str(cache_dir)
        else:
            self.env.update(KILN_DIR=str(cache_dir), KILN_CONFIG=self.empty_config())

    def counters(self) -> dict[str, int]:
        """Remote hits and errors, from the tool's own statistics."""
        if self.name == "ccache":
            p = subprocess.run([self.exe, "--print-stats"], capture_output=True, text=True, env=self.env)
            s = {k: lc._int(v) for k, v in (l.split("\t", 1) for l in p.stdout.splitlines() if "\t" in l)}
            return {"hits": s.get("remote_storage_hit", 0),
                    "errors": s.get("remote_storage_error", 0) + s.get("remote_storage_timeout", 0)}
        p = subprocess.run([self.exe, "stats", "--json"], capture_output=True, text=True, env=self.env)
        try:
            s = json.loads(p.stdout)
        except ValueError:
            raise lc.BenchError(f"`kiln stats --json` printed no JSON: {(p.stdout + p.stderr)[:300]}")
        return {"hits": lc._int(s.get("remote_hits")), "errors": lc._int(s.get("remote_errors"))}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="A second machine's cold build served from kiln-cache: ccache's HTTP remote "
                    "storage against kiln's remote tier (gRPC, with and without TLS), on real "
                    "Debian sources, one compile at a time.",
        epilog="Exit status: 0 ok; 1 a compile failed, an object differed from plain's, or a "
               "remote-hit pass was not all remote hits; 2 setup error.")
    ap.add_argument("--work", default="/tmp/kiln-bench-shared", type=Path,
                    help="work directory for sources, builds, caches (default: %(default)s)")
    ap.add_argument("--bin", default=_HERE.parent / "target" / "release", type=Path,
                    help="directory with kiln, kiln-cache and kiln-scheduler (default: %(default)s)")
    ap.add_argument("--tools", type=lc.csv_list(TOOLS), default=list(TOOLS),
                    help="tools besides plain, comma separated (default: ccache,kiln-http,kiln)")
    ap.add_argument("--projects", type=lc.csv_list(lc.ALL_PROJECTS), default=list(lc.ALL_PROJECTS),
                    help="projects, comma separated (default: lua,leveldb)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole sequence with fresh caches; medians over rounds (default: 1)")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    return a


def binaries(bindir: Path, work: Path) -> dict[str, Path]:
    """Copies of the binaries, so that a rebuild during the run changes nothing measured."""
    out = {}
    dest = work / "bin"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("kiln", "kiln-cache", "kiln-scheduler"):
        src = bindir / name
        if not (src.is_file() and os.access(src, os.X_OK)):
            raise lc.BenchError(f"no {name} in {bindir}: run scripts/build-release.sh or pass --bin")
        # A new file renamed over the old one: the old may still be running (ETXTBSY).
        shutil.copy2(src, dest / f".{name}.new")
        os.replace(dest / f".{name}.new", dest / name)
        out[name] = dest / name
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  ({os.cpu_count()} CPUs)")
    bins = binaries(args.bin, work)
    ccache = shutil.which("ccache")
    if "ccache" in args.tools and not ccache:
        raise lc.BenchError("ccache is not installed (apt-get install ccache), or leave it out with --tools")
    cc, cxx = lc.which_abs("gcc", "C compiler"), lc.which_abs("g++", "C++ compiler")
    for name, exe in [("kiln", str(bins["kiln"]))] + ([("ccache", ccache)] if ccache else []):
        log(f"{name}: {exe}  [{lc.Tool(exe).version()}]")

    banner("sources and compile commands")
    compiles, projects = [], []
    for proj in args.projects:
        d = lc.fetch_source(work / "src", proj)
        cmds = (lc.lua_commands(d, work / "build" / "lua", cc) if proj == "lua"
                else lc.leveldb_commands(d, work / "build" / "leveldb", cc, cxx))
        log(f"{proj}: {len(cmds)} compile commands from {d}")
        compiles += cmds
        projects.append(proj)

    secrets = work / "secrets"
    if not (secrets / "ca.pem").exists():
        subprocess.run([str(bins["kiln-scheduler"]), "init", str(secrets)], check=True, capture_output=True)

    banner("warm-up (plain, untimed)")
    plain = lc.Plain()
    plain.setup(work / "caches" / "warmup")
    lc.run_pass(plain, compiles)

    results: dict[str, dict[str, list[float]]] = {}
    per_compile: dict[str, list[float]] = {}   # remote-hit compile times, every round
    problems: list[str] = []
    for rnd in range(1, args.rounds + 1):
        banner(f"plain (round {rnd})")
        t = lc.run_pass(plain, compiles)
        results.setdefault("plain", {}).setdefault("cold", []).append(sum(t))
        ref = work / "objs" / "plain"
        lc.save_outputs(compiles, ref)
        log(f"  cold: {sum(t):.2f} s")
        for tool in args.tools:
            banner(f"{tool} (round {rnd})")
            store, logf = work / "store" / tool, work / f"kiln-cache-{tool}.log"
            if tool == "kiln":
                flags = ["--tls-cert", str(secrets / "server.pem"), "--tls-key", str(secrets / "server.key"),
                         "--tokens", str(secrets / "client-tokens")]
            else:
                flags = ["--insecure"]
            server = Server(bins["kiln-cache"], store, flags, logf)
            try:
                if tool == "ccache":
                    remote = {"CCACHE_REMOTE_STORAGE": f"http://{server.addr}/ccache/"}
                elif tool == "kiln-http":
                    remote = {"KILN_REMOTE_CACHE": f"http://{server.addr}"}
                else:
                    remote = {"KILN_REMOTE_CACHE": f"https://{server.addr}",
                              "KILN_CA_FILE": str(secrets / "ca.pem"),
                              "KILN_TOKEN_FILE": str(secrets / "client.token")}
                exe = ccache if tool == "ccache" else str(bins["kiln"])
                for phase in ("fill", "remote-hit"):
                    m = Machine(tool, exe, remote)
                    m.setup(work / "caches" / f"{tool}-{phase}-r{rnd}")
                    t = lc.run_pass(m, compiles)
                    results.setdefault(tool, {}).setdefault(phase, []).append(sum(t))
                    if phase == "remote-hit":
                        per_compile.setdefault(tool, []).extend(t)
                    c = m.counters()
                    hits, errors = c["hits"], c["errors"]
                    log(f"  {phase:10}: {sum(t):7.2f} s  (median {statistics.median(t) * 1000:.1f} ms; "
                        f"remote hits {hits}, remote errors {errors})")
                    if errors:
                        problems.append(f"{tool} round {rnd} {phase}: {errors} remote errors")
                    if phase == "remote-hit":
                        if hits != len(compiles):
                            problems.append(f"{tool} round {rnd}: {hits} remote hits of {len(compiles)}")
                        got = work / "objs" / tool
                        lc.save_outputs(compiles, got)
                        bad = lc.compare_outputs(compiles, ref, got)
                        if bad:
                            problems.append(f"{tool} round {rnd}: {len(bad)} outputs differ from plain, "
                                            f"first {bad[0]}")
            except lc.CompileFailed as e:
                problems.append(str(e))
            finally:
                server.stop()

    banner("results (seconds, median over rounds; one compile at a time)")
    n = len(compiles)
    log(f"{n} compiles of {', '.join(projects)}")
    log(f"{'tool':12} {'fill':>8} {'remote-hit':>11} {'per compile':>12}")
    med = {tool: {phase: statistics.median(v) for phase, v in phases.items()} for tool, phases in results.items()}
    log(f"{'plain':12} {med['plain']['cold']:8.2f} {'':>11} {'':>12}")
    for tool in args.tools:
        if tool in med and "remote-hit" in med[tool]:
            log(f"{tool:12} {med[tool]['fill']:8.2f} {med[tool]['remote-hit']:11.2f} "
                f"{statistics.median(per_compile[tool]) * 1000:9.1f} ms")

    def ratio(a: str, b: str, phase_a: str = "remote-hit", phase_b: str = "remote-hit") -> None:
        if phase_a in med.get(a, {}) and phase_b in med.get(b, {}):
            log(f"  {a} {phase_a} / {b} {phase_b}: {med[a][phase_a] / med[b][phase_b]:.3f}x")
    banner("ratios")
    ratio("kiln", "ccache")
    ratio("kiln-http", "ccache")
    ratio("kiln", "kiln-http")
    for tool in args.tools:
        ratio(tool, "plain", "remote-hit", "cold")
    for tool in args.tools:
        ratio(tool, "plain", "fill", "cold")
    for p in problems:
        loud(p)
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except lc.BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
