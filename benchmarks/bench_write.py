#!/usr/bin/env python3
"""Issue 11's write goals: offline transactions, `dmimage write` and `dmimage build` speed.

1. 10,000 single-block writes (4 KiB each at a random block of a random thin, half of them
   provisioning a new block) in one WritablePool transaction on a 10M-mapping pool (the
   scale benchmark's pool with 400,000 spare data blocks, restored by thin_restore 1.1), open
   and commit included: at most 10 s. The result must pass thin_check 1.1.
2. `dmimage write` of 1 GiB sequential into a fresh thin against `dd conv=notrunc` of the
   same file to the same data file (and, for reference, with `conv=notrunc,fsync`: dmimage
   flushes before its commit): at least 50% of dd's speed.
3. `dmimage build` of a 4 GiB raw volume (gpt layout, random bytes) against `dd` writing
   the same bytes to a new file: at least 50% of dd's speed. The goal's dd leaves its bytes
   dirty in the page cache; the build has them on the disk before it writes the superblock,
   so a reference row also times `dd conv=fsync` (not the goal, the durability cost).

Runs are interleaved (dd, dmimage, dd, ...), each after a ``sync`` (not timed) so that none
waits for the write-back of another's dirty pages; each cell is the median wall time with the
children's CPU time (user + system) beside it, and the load average is printed. Exit 1 on a
missed goal or a failed check. ``--baseline DIR`` also runs the dmimage of another source
tree (e.g. ``git archive`` of an older commit) in the same interleaved rounds, as its own
rows, to compare before and after under the same load; its rows do not count for the exit
status.

    python benchmarks/bench_write.py [--repeat 3] [--only tx,write,build] [--build-size 4G]
                                     [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_bench  # noqa: E402

TOOLS = scale_bench.TOOLS
CACHE = scale_bench.CACHE
PY = [sys.executable, "-m", "dmimage"]
GiB = 1 << 30
TX_MAPPINGS = 10_000_000
TX_SPARE = 400_000
TX_WRITES = 10_000
TX_LIMIT_S = 10.0
MIN_SPEED_RATIO = 0.5

#: The dmimage trees to time: "" is this one; --baseline adds another (label, PYTHONPATH).
TREES: list[tuple[str, str]] = [("", "")]

TX_SCRIPT = """
import random, sys
from dmimage.thin.transaction import WritablePool
meta, data, n, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(1)
buf = bytes(range(256)) * 16
with WritablePool(meta, data) as p:
    bs = p.block_bytes
    for _ in range(n):
        p.write(rng.randrange(10), rng.randrange(2 * per) * bs, buf)
    p.commit()
"""


def timed(argv: list[str], tree: str = "", **kw: object) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one command; it must succeed. ``tree``:
    the dmimage source tree to import (PYTHONPATH, run from /), "" for this one."""
    if tree:
        kw = {**kw, "env": {**os.environ, "PYTHONPATH": tree}, "cwd": "/"}
    os.sync()  # no run pays for the write-back of an earlier one's dirty pages
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload]
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def med(xs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)


def tx_pool() -> Path:
    """The 10M-mapping pool with spare data blocks (built once, cached)."""
    d = CACHE / "write-10M"
    meta = d / "pool.meta"
    if meta.exists():
        return meta
    d.mkdir(parents=True, exist_ok=True)
    src = scale_bench.build(TX_MAPPINGS).xml
    xml = d / "pool.xml"
    old = f'nr_data_blocks="{TX_MAPPINGS}"'
    new = f'nr_data_blocks="{TX_MAPPINGS + TX_SPARE}"'
    with open(src) as fin, open(xml, "w") as fout:
        first = fin.readline()
        if old not in first:
            raise SystemExit(f"{src}: unexpected first line {first!r}")
        fout.write(first.replace(old, new))
        shutil.copyfileobj(fin, fout, 16 << 20)
    tmp = d / "pool.meta.tmp"
    with open(tmp, "wb") as f:
        f.truncate(GiB)
    subprocess.run([str(TOOLS / "thin_restore"), "-q", "-i", str(xml), "-o", str(tmp)],
                   check=True)
    xml.unlink()
    tmp.rename(meta)
    return meta


def bench_tx(work: Path, repeat: int) -> tuple[list[str], bool]:
    meta0 = tx_pool()
    meta, data = work / "tx.meta", work / "tx.data"
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in TREES}
    ok = True
    for _ in range(repeat):
        for label, tree in TREES:
            subprocess.run(["cp", "--sparse=always", str(meta0), str(meta)], check=True)
            with open(data, "wb") as f:
                f.truncate((TX_MAPPINGS + TX_SPARE) * 64 * 1024)
            runs[label].append(timed([sys.executable, "-c", TX_SCRIPT, str(meta), str(data),
                                      str(TX_WRITES), str(TX_MAPPINGS // 10)], tree))
            rc = subprocess.run([str(TOOLS / "thin_check"), "-q", str(meta)]).returncode
            ok &= rc == 0
            data.unlink()
    meta.unlink()
    rows, met_all = [], True
    for label, _ in TREES:
        wall, cpu = med(runs[label])
        met = wall <= TX_LIMIT_S and ok
        met_all &= met or bool(label)
        rows.append(f"| 10,000 single-block writes, one commit, 10M mappings{label} | "
                    f"{wall:.2f} s (CPU {cpu:.2f} s) | ≤ {TX_LIMIT_S:.0f} s | - | thin_check 1.1 "
                    f"{'passed' if ok else 'FAILED'} | {'met' if met else 'MISSED'} |")
    return rows, met_all


def bench_write(work: Path, repeat: int, size: int) -> tuple[list[str], bool]:
    src, meta, data = work / "src.bin", work / "w.meta", work / "w.data"
    subprocess.run(["head", "-c", str(size), "/dev/urandom"], stdout=open(src, "wb"),
                   check=True)
    nr = size // (64 << 10) + 64
    with open(meta, "wb") as f:
        f.truncate(64 << 20)
    with open(data, "wb") as f:
        f.truncate(nr * (64 << 10))
    dd, ddf = [], []
    dm: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in TREES}
    ok = True
    for _ in range(repeat):
        dd.append(timed(["dd", f"if={src}", f"of={data}", "bs=4M", "conv=notrunc",
                         "status=none"]))
        for label, tree in TREES:
            subprocess.run([*PY, "format", "-f", "--data-block-size", "128",
                            "--nr-data-blocks", str(nr), str(meta)], check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run([*PY, "message", str(meta), "create_thin 0"], check=True)
            dm[label].append(timed([*PY, "write", str(meta), str(data), "--dev-id", "0", "-i",
                                    str(src)], tree))
            ok &= subprocess.run([str(TOOLS / "thin_check"), "-q", str(meta)]).returncode == 0
        ddf.append(timed(["dd", f"if={src}", f"of={data}", "bs=4M", "conv=notrunc,fsync",
                          "status=none"]))
    for p in (src, meta, data):
        p.unlink()
    (w_dd, c_dd), (w_ddf, c_ddf) = med(dd), med(ddf)
    gib = size / GiB
    rows, met_all = [], True
    for label, _ in TREES:
        w_dm, c_dm = med(dm[label])
        ratio = w_dd / w_dm
        met = ratio >= MIN_SPEED_RATIO and ok
        met_all &= met or bool(label)
        rows.append(
            f"| `dmimage write` {gib:g} GiB sequential, fresh thin{label} | {w_dm:.2f} s "
            f"(CPU {c_dm:.2f} s) | ≥ 50% of dd | dd conv=notrunc {w_dd:.2f} s (CPU "
            f"{c_dd:.2f} s): **{ratio:.0%}** | thin_check 1.1 {'passed' if ok else 'FAILED'} "
            f"| {'met' if met else 'MISSED'} |")
    w_dm = med(dm[""])[0]
    rows.append(f"| (reference) | | | dd conv=notrunc,fsync {w_ddf:.2f} s (CPU {c_ddf:.2f} s): "
                f"{w_ddf / w_dm:.0%} | | |")
    return rows, met_all


def bench_build(work: Path, repeat: int, size: int) -> tuple[list[str], bool]:
    content = work / "content.bin"
    subprocess.run(["head", "-c", str(size), "/dev/urandom"], stdout=open(content, "wb"),
                   check=True)
    spec = work / "big.toml"
    spec.write_text(f'name = "big"\nlayout = "gpt"\n[pool]\n'
                    f'data_size = "{size // (1 << 20) + 64}MiB"\n'
                    f'[[volumes]]\nname = "a"\nid = 1\nsize = "{size // (1 << 20)}MiB"\n'
                    f'content = {{ type = "raw", file = "{content}" }}\n')
    dd, ddf = [], []
    dm: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in TREES}
    images: dict[str, str] = {}
    for _ in range(repeat):
        out = work / "dd.out"
        dd.append(timed(["dd", f"if={content}", f"of={out}", "bs=4M", "status=none"]))
        out.unlink()
        ddf.append(timed(["dd", f"if={content}", f"of={out}", "bs=4M", "conv=fsync",
                          "status=none"]))
        out.unlink()
        for label, tree in TREES:
            outdir = work / "out"
            dm[label].append(timed([*PY, "build", str(spec), "-o", str(outdir), "-q"], tree))
            images[label] = json.loads((outdir / "manifest.json").read_text())["image"]["sha256"]
            shutil.rmtree(outdir)
    content.unlink()
    (w_dd, c_dd), (w_ddf, c_ddf) = med(dd), med(ddf)
    same = len(set(images.values())) == 1
    rows, met_all = [], True
    for label, _ in TREES:
        w_dm, c_dm = med(dm[label])
        ratio = w_dd / w_dm
        met = ratio >= MIN_SPEED_RATIO and same
        met_all &= met or bool(label)
        check = "self-check" + ("" if same else ", image differs from the baseline's")
        rows.append(f"| `dmimage build` {size / GiB:g} GiB raw volume, gpt{label} | "
                    f"{w_dm:.2f} s (CPU {c_dm:.2f} s) | ≥ 50% of dd | dd {w_dd:.2f} s (CPU "
                    f"{c_dd:.2f} s): **{ratio:.0%}** | {check} | {'met' if met else 'MISSED'} |")
    rows.append(f"| (reference, not the goal: dd that flushes, as the build does) | | | "
                f"dd conv=fsync {w_ddf:.2f} s (CPU {c_ddf:.2f} s): "
                f"{w_ddf / med(dm[''])[0]:.0%} | | |")
    return rows, met_all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="tx,write,build")
    ap.add_argument("--write-size", type=scale_bench.parse_size, default=GiB)
    ap.add_argument("--build-size", type=scale_bench.parse_size, default=4 * GiB)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="another dmimage source tree, timed in the same rounds (rows "
                    "marked 'baseline')")
    a = ap.parse_args()
    if a.baseline:
        TREES.append((" (baseline)", str(Path(a.baseline).resolve())))
    only = set(a.only.split(","))
    rows, ok = [], True
    work = Path(tempfile.mkdtemp(prefix="bench-write-", dir=a.workdir)).resolve()
    try:
        print(f"load average before: {load()}", file=sys.stderr)
        if "tx" in only:
            lines, met = bench_tx(work, a.repeat)
            rows += lines
            ok &= met
            print(f"load average: {load()}", file=sys.stderr)
        if "write" in only:
            lines, met = bench_write(work, a.repeat, a.write_size)
            rows += lines
            ok &= met
            print(f"load average: {load()}", file=sys.stderr)
        if "build" in only:
            lines, met = bench_build(work, a.repeat, a.build_size)
            rows += lines
            ok &= met
            print(f"load average: {load()}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| what | dmimage | target | reference: dmimage speed as a share of it | check | goal |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
