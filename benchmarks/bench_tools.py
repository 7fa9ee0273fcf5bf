#!/usr/bin/env python3
"""dmimage against thin-provisioning-tools 1.1 on the same metadata, in one run.

Makes (or reuses) the benchmark pool of benchmarks/make_bench_pool.py — 10 thins x 100,000
single mappings, 64 KiB blocks, data blocks shuffled — then times `check`, `dump` and
`restore` of both tools, interleaved, REPEAT times each, and prints the median wall time, the
ratio dmimage/1.1 and the peak RSS of each command (whole process, start-up included).

    python benchmarks/bench_tools.py [--repeat 5] [--thins 10] [--mappings 100000]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import oracles  # noqa: E402


def run(argv: list[str]) -> float:
    """Wall seconds of one command (stdout discarded)."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr.decode()[-500:]}")
    return dt


def peak_rss(argv: list[str]) -> int:
    """Peak RSS in KiB of one run, measured in a forked child so maxima do not mix."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run the command, report its own children's peak
        os.close(r)
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.write(w, str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.waitpid(pid, 0)
    os.close(r)
    return int(out or b"0")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--thins", type=int, default=10)
    ap.add_argument("--mappings", type=int, default=100_000)
    a = ap.parse_args()
    out = REPO / "out" / "bench"
    xml = out / f"bench-{a.thins}x{a.mappings}.xml"
    meta = out / f"bench-{a.thins}x{a.mappings}.meta"
    if not meta.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_bench_pool.py"),
                        "--thins", str(a.thins), "--mappings", str(a.mappings)], check=True,
                       stdout=subprocess.DEVNULL)
    t11 = oracles.tools_11()
    dm = [sys.executable, "-m", "dmimage"]
    restored = out / "restored.meta"
    with open(restored, "wb") as f:
        f.truncate(meta.stat().st_size)
    cases = {
        "check": ([str(t11.thin_check), str(meta)], [*dm, "check", str(meta)]),
        "dump": ([str(t11.thin_dump), str(meta), "-o", str(out / "t.xml")],
                 [*dm, "dump", str(meta), "-o", str(out / "d.xml")]),
        "restore": ([str(t11.thin_restore), "-i", str(xml), "-o", str(restored)],
                    [*dm, "restore", "-i", str(xml), "-o", str(restored)]),
    }
    print(f"pool: {a.thins} thins x {a.mappings} single mappings, 64 KiB blocks, shuffled; "
          f"median of {a.repeat} interleaved runs")
    print(f"{'command':8} {'1.1 s':>8} {'dmimage s':>10} {'ratio':>6} {'1.1 MiB':>8} "
          f"{'dmimage MiB':>12}")
    for name, (theirs, ours) in cases.items():
        tt, to = [], []
        for _ in range(a.repeat):
            tt.append(run(theirs))
            to.append(run(ours))
        mt, mo = statistics.median(tt), statistics.median(to)
        rt, ro = peak_rss(theirs) / 1024, peak_rss(ours) / 1024
        print(f"{name:8} {mt:8.2f} {mo:10.2f} {mo / mt:6.2f} {rt:8.0f} {ro:12.0f}")
    # Same answers, not only the same speed: our dump is thin_dump 1.1's, byte for byte, and
    # thin_dump 1.1 of our restore's output is the dump we restored from.
    same_dump = (out / "t.xml").read_bytes() == (out / "d.xml").read_bytes()
    redump = subprocess.run([str(t11.thin_dump), str(restored)], capture_output=True).stdout
    same_restore = redump == (out / "t.xml").read_bytes()
    print(f"dump identical to thin_dump 1.1: {same_dump}; restore round trip identical: "
          f"{same_restore}")
    return 0 if same_dump and same_restore else 1


if __name__ == "__main__":
    sys.exit(main())
