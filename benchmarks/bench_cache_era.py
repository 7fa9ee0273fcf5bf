"""dm-cache and dm-era against thin-provisioning-tools 1.1 at scale: check and dump of a cache
of 1M cache blocks (80% mapped, 30% of those dirty), check, dump and invalidate of an era
device of 1M blocks. Issue 13's goal: check and dump at most 1.0x cache_check / cache_dump.

Times are whole processes (interpreter start-up included), best of three, on metadata written
by cache_restore / era_restore 1.1; outputs are compared byte for byte in the same run.

    python benchmarks/bench_cache_era.py [--nr-blocks N]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import restore_xml  # noqa: E402

import oracles  # noqa: E402


def best(cmd: list[str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nr-blocks", type=int, default=1_000_000)
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
        for name, theirs, ours in cases:
            a, b = best(theirs), best(ours)
            same = ""
            if "-o" in theirs:
                with open(o1, "rb") as f1, open(o2, "rb") as f2:
                    same = "identical" if f1.read() == f2.read() else "DIFFERENT"
            rows.append((name, a, b, same))
    print(f"{args.nr_blocks:,} blocks; load average {os.getloadavg()[0]:.1f}\n")
    print("| command | 1.1 (s) | dmimage (s) | ratio | output |")
    print("|---|---:|---:|---:|---|")
    for name, a, b, same in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} | {same} |")
    return 0 if all(r[3] != "DIFFERENT" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
