#!/usr/bin/env python3
"""waf all-hit rebuilds: waf's own file cache against kiln-cache over HTTP, in one run.

Generates a C project of --files sources, builds it once per cache to fill it, then times
`waf clean build` --runs times (every task a cache hit) with WAFCACHE=<dir> (waf's file cache)
and with WAFCACHE=http://127.0.0.1:PORT/files/ (kiln-cache), and prints medians and the ratio.
Needs the PyPI packages waflib and urllib3, gcc, and kiln-cache (scripts/build-release.sh).

    python3 bench/wafcache.py [--kiln-cache PATH] [--files N] [--runs N] [--jobs N]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

LAUNCHER = """#!/usr/bin/env python3
import os, waflib
from waflib import Scripting, Context
Scripting.waf_entry_point(os.getcwd(), Context.WAFVERSION, os.path.dirname(os.path.dirname(waflib.__file__)))
"""


def waf(proj, env, *args):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "waf", *args], cwd=proj, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"waf {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return dt, r.stdout + r.stderr


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kiln-cache", default=os.path.join(here, "..", "target", "release", "kiln-cache"))
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    try:
        import waflib  # noqa: F401
        import urllib3  # noqa: F401
    except ImportError:
        sys.exit("needs waflib and urllib3: python3 -m pip install waflib urllib3")
    server_bin = os.path.abspath(a.kiln_cache)
    if not os.access(server_bin, os.X_OK):
        sys.exit(f"no kiln-cache at {server_bin}: run scripts/build-release.sh")

    work = tempfile.mkdtemp(prefix="kiln-waf-bench-")
    try:
        proj = os.path.join(work, "proj")
        os.makedirs(proj)
        with open(os.path.join(proj, "waf"), "w") as f:
            f.write(LAUNCHER)
        names = [f"f{i}.c" for i in range(a.files)]
        for i, n in enumerate(names):
            with open(os.path.join(proj, n), "w") as f:
                f.write(f"#include <stdio.h>\nint f{i}(int x) {{ return x * {i} + printf(\"%d\", x); }}\n")
        with open(os.path.join(proj, "main.c"), "w") as f:
            f.write("int main(void) { return 0; }\n")
        with open(os.path.join(proj, "wscript"), "w") as f:
            f.write("def options(opt):\n    opt.load('compiler_c')\n"
                    "def configure(conf):\n    conf.load('compiler_c')\n"
                    "def build(bld):\n    bld.load('wafcache')\n"
                    f"    bld.program(source={names + ['main.c']!r}, target='app')\n")
        base = {k: v for k, v in os.environ.items() if not k.startswith("WAFCACHE")}
        waf(proj, base, "configure")

        # waf's wafcache client sends no credentials: a read-write cache for it runs --insecure.
        server = subprocess.Popen([server_bin, "--listen", "127.0.0.1:0", "--dir", os.path.join(work, "store"),
                                   "--insecure"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        addr = re.search(r"127\.0\.0\.1:\d+", server.stdout.readline()).group(0)
        caches = {
            "waf file cache": dict(base, WAFCACHE=os.path.join(work, "wafcache")),
            "kiln-cache (HTTP)": dict(base, WAFCACHE=f"http://{addr}/files/"),
        }
        medians = {}
        for name, env in caches.items():
            env = dict(env, WAFCACHE_STATS="1")
            cold, _ = waf(proj, env, "clean", "build", f"-j{a.jobs}")
            times = []
            for _ in range(a.runs):
                dt, log = waf(proj, env, "clean", "build", f"-j{a.jobs}")
                m = re.search(r"(\d+) requests, (\d+) hits", log)
                if not m or m.group(1) != m.group(2):
                    sys.exit(f"{name}: not every task was a hit: {m.group(0) if m else log}")
                times.append(dt)
            medians[name] = statistics.median(times)
            print(f"{name:18} fill {cold:6.2f} s   all-hit clean build median {medians[name]:6.3f} s "
                  f"({medians[name] / (a.files + 1) * 1000:.2f} ms per task; {m.group(0)})")
        server.terminate()
        server.wait()
        ratio = medians["kiln-cache (HTTP)"] / medians["waf file cache"]
        print(f"all-hit rebuild, kiln-cache / waf file cache: {ratio:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
