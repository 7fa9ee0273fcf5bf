"""dm-cache and dm-era against thin-provisioning-tools 1.1 at scale: check and dump of a cache
of 1M cache blocks (80% mapped, 30% of those dirty), check, dump and invalidate of an era
device of 1M blocks. Issue 13's goal: check and dump at most 1.0x cache_check / cache_dump.

Times are whole processes (interpreter start-up included) on metadata written by
cache_restore / era_restore 1.1, the two tools' runs interleaved (1.1, dmimage, 1.1, ...) so
that both see the same load; each cell is the median of the runs' wall time and of their CPU
time (user + system, from the children's rusage), and the load average is printed. Outputs
are compared byte for byte in the same run.

    python benchmarks/bench_cache_era.py [--nr-blocks N] [--runs R]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import restore_xml  # noqa: E402

import oracles  # noqa: E402


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall, user + system CPU) of one run of ``cmd``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def interleaved(a: list[str], b: list[str], runs: int
                ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (wall, CPU) of ``a`` and of ``b``, run alternately."""
    ta, tb = [], []
    for _ in range(runs):
        ta.append(timed(a))
        tb.append(timed(b))
    med = lambda xs: (statistics.median(x[0] for x in xs),  # noqa: E731
                      statistics.median(x[1] for x in xs))
    return med(ta), med(tb)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nr-blocks", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tools = oracles.tools_11()
    t11 = lambda name: str(tools.bindir / name)  # noqa: E731
    us = [sys.executable, "-m", "dmimage"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        n = args.nr_blocks
        cxml, cmeta = os.path.join(d, "c.xml"), os.path.join(d, "c.meta")
        with open(cxml, "w") as f:
            f.write(restore_xml.cache_xml(random.Random(1), n, 0.8))
        with open(cmeta, "wb") as f:
            f.truncate(256 << 20)
        subprocess.run([t11("cache_restore"), "-i", cxml, "-o", cmeta], check=True)
        exml, emeta = os.path.join(d, "e.xml"), os.path.join(d, "e.meta")
        with open(exml, "w") as f:
            f.write(restore_xml.era_xml(random.Random(2), n, [10, 11], 11))
        with open(emeta, "wb") as f:
            f.truncate(256 << 20)
        subprocess.run([t11("era_restore"), "-i", exml, "-o", emeta], check=True)
        o1, o2 = os.path.join(d, "o1"), os.path.join(d, "o2")
        cases = [
            ("cache check", [t11("cache_check"), cmeta], [*us, "cache", "check", "-q", cmeta]),
            ("cache dump", [t11("cache_dump"), cmeta, "-o", o1],
             [*us, "cache", "dump", cmeta, "-o", o2]),
            ("era check", [t11("era_check"), emeta], [*us, "era", "check", "-q", emeta]),
            ("era dump", [t11("era_dump"), emeta, "-o", o1], [*us, "era", "dump", emeta, "-o", o2]),
            ("era invalidate", [t11("era_invalidate"), "--written-since", "11", emeta, "-o", o1],
             [*us, "era", "invalidate", "--written-since", "11", emeta, "-o", o2]),
        ]
        loads = [os.getloadavg()[0]]
        for name, theirs, ours in cases:
            a, b = interleaved(theirs, ours, args.runs)
            loads.append(os.getloadavg()[0])
            same = ""
            if "-o" in theirs:
                with open(o1, "rb") as f1, open(o2, "rb") as f2:
                    same = "identical" if f1.read() == f2.read() else "DIFFERENT"
            rows.append((name, a, b, same))
    print(f"{args.nr_blocks:,} blocks, {args.runs} interleaved runs each, medians; load "
          f"average {min(loads):.1f}-{max(loads):.1f} (1 min)\n")
    print("| command | 1.1 wall (s) | dmimage wall (s) | wall ratio | 1.1 CPU (s) | "
          "dmimage CPU (s) | CPU ratio | output |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, a, b, same in rows:
        print(f"| {name} | {a[0]:.2f} | {b[0]:.2f} | {b[0] / a[0]:.2f} | {a[1]:.2f} | "
              f"{b[1]:.2f} | {b[1] / max(a[1], 1e-3):.2f} | {same} |")
    return 0 if all(r[3] != "DIFFERENT" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
