#!/usr/bin/env python3
"""dmimage against thin-provisioning-tools 1.1 at real pool sizes (issue 11): time and memory.

For each size N (1M and 10M mappings; ``--big`` adds 100M) the pool is 10 thins of N/10
fragmented single mappings each (64 KiB blocks, every data block distinct and shuffled, so no
two mappings form a run), written as XML here and restored by thin_restore 1.1. Built pools are
cached under ~/.cache/dmimage/bench/. Then check, dump, ls, restore, delta and rmap of both
tools, and dmimage's export (1.1 has none), run REPEAT times each, interleaved run by run
(``--baseline DIR`` adds another dmimage tree, e.g. the code before a change); a cell is the
median wall time / median CPU time (user + system) / the largest peak RSS of the command's
process (GNU time's %U, %S, %M). The machine may be shared: each row also prints the load
average (1 min) before and after it, and the CPU time is the less load-dependent figure.

dmimage runs as installed: each tree's package is copied under ~/.cache/dmimage/bench/trees/
and byte-compiled there first (``--source``: run the trees in place; with
PYTHONDONTWRITEBYTECODE set, as on this project's machine, every run then compiles its ~60
modules from source, ~0.04 s of CPU, which no installed copy pays).

The outputs must be byte-identical to 1.1's in the same run (dump, ls, delta, rmap: sha256 of
stdout, hashed as it streams; restore: thin_dump 1.1 of both restored pools); a difference, or
a missed goal of the issue, makes the exit status 1.

    python benchmarks/scale_bench.py [--sizes 1M,10M] [--big] [--repeat 3] [--only CMD,...]
"""

from __future__ import annotations

import argparse
import atexit
import compileall
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path.home() / ".cache" / "dmimage" / "debian13" / "thin-provisioning-tools" / "usr" / "sbin"
CACHE = Path.home() / ".cache" / "dmimage" / "bench"
THINS = 10
BLOCK_SECTORS = 128  # 64 KiB
MiB = 1 << 20

#: command -> maximum time ratio dmimage / 1.1 (issue 11, at 1M and 10M).
TIME_GOALS = {"check": 0.5, "ls": 0.5, "dump": 0.8, "restore": 1.0, "delta": 1.0, "rmap": 1.0}
#: at 10M every command's peak RSS is at most this multiple of 1.1's
MEM_RATIO_AT_10M = 2.0
#: dump and export at any size
STREAM_LIMIT = 64 * MiB
#: at 100M every command
BIG_LIMIT = 4 << 30
LS_FIELDS = "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,HIGHEST_BLOCK"


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(t[-1:], 1)
    return int(float(t.rstrip("KMG")) * mult)


def label(n: int) -> str:
    return f"{n // 10**6}M" if n % 10**6 == 0 else f"{n // 1000}K"


# -- the pool ---------------------------------------------------------------------------------

def write_pool_xml(path: Path, total: int, seed: int = 0) -> None:
    """The issue's pool as thin_dump XML, written in chunks (formatting here is plain Python:
    the input does not depend on dmimage's renderer)."""
    per = total // THINS
    rng = np.random.default_rng(seed)
    perm = rng.permutation(total).astype(np.uint64).reshape(THINS, per)
    with open(path, "w") as f:
        f.write(f'<superblock uuid="" time="0" transaction="{THINS}" version="2" '
                f'data_block_size="{BLOCK_SECTORS}" nr_data_blocks="{total}">\n')
        for dev in range(THINS):
            d = perm[dev]
            # no accidental runs: data[i+1] == data[i] + 1 would merge two mappings
            for b in np.flatnonzero(d[1:] == d[:-1] + 1).tolist():
                j = (b + 2) % per
                d[b + 1], d[j] = d[j], d[b + 1]
            f.write(f'  <device dev_id="{dev}" mapped_blocks="{per}" transaction="0" '
                    f'creation_time="0" snap_time="0">\n')
            step = 1 << 20
            for s in range(0, per, step):
                rows = d[s:s + step].tolist()
                f.write("".join(f'    <single_mapping origin_block="{s + i}" data_block="{v}" '
                                f'time="0"/>\n' for i, v in enumerate(rows)))
            f.write("  </device>\n")
        f.write("</superblock>")


def meta_blocks(total: int) -> int:
    """A roomy metadata device: leaves at least a third full, internal levels, bitmaps."""
    leaves = -(-total // 84)
    n = 1024 + leaves + leaves // 40 + 2 * (total // 16320 + 1)
    return n + n // 8


@dataclass
class Built:
    total: int
    meta: Path  # restored by thin_restore 1.1
    xml: Path  # thin_dump 1.1 of it: the restore input
    data: Path  # sparse data device (for export)


def build(total: int) -> Built:
    d = CACHE / f"scale-{label(total)}"
    d.mkdir(parents=True, exist_ok=True)
    b = Built(total, d / "pool.meta", d / "pool.xml", d / "pool.data")
    if b.meta.exists() and b.xml.exists() and b.data.exists():
        return b
    t0 = time.perf_counter()
    src = d / "generated.xml"
    write_pool_xml(src, total)
    tmp = d / "pool.meta.tmp"
    with open(tmp, "wb") as f:
        f.truncate(meta_blocks(total) * 4096)
    subprocess.run([str(TOOLS / "thin_restore"), "-q", "-i", str(src), "-o", str(tmp)],
                   check=True)
    with open(b.xml, "wb") as f:
        subprocess.run([str(TOOLS / "thin_dump"), str(tmp)], check=True, stdout=f)
    src.unlink()
    with open(b.data, "wb") as f:
        f.truncate(total * BLOCK_SECTORS * 512)
    tmp.rename(b.meta)
    print(f"built {label(total)} pool in {time.perf_counter() - t0:.0f} s: {b.meta}",
          file=sys.stderr)
    return b


# -- measuring --------------------------------------------------------------------------------

@dataclass
class Measure:
    seconds: float
    cpu: float  # user + system seconds
    rss: int  # bytes
    digest: str  # sha256 of stdout ("" when not kept)


def run_once(argv: list[str], hashed: bool) -> Measure:
    """Wall time, peak RSS and (``hashed``) the sha256 of stdout of one command. Outputs are
    hashed as they stream, never stored: at 10M mappings a dump is 700 MB. The peak RSS comes
    from /usr/bin/time: a child forked from this (larger) process would start with this
    process's RSS as its high-water mark."""
    rss_file = CACHE / "rss.txt"
    h = hashlib.sha256()
    t0 = time.perf_counter()
    # not from the working directory: `python -m dmimage` puts it first on sys.path, ahead of
    # PYTHONPATH, so run from a checkout every column ran that checkout's package
    p = subprocess.Popen(["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), *argv],
                         stdout=subprocess.PIPE if hashed else subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd=CACHE)
    if p.stdout is not None:
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
    rc = p.wait()
    dt = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(argv)} exited {rc}")
    kib, user, system = rss_file.read_text().split()[-3:]
    return Measure(dt, float(user) + float(system), int(kib) * 1024,
                   h.hexdigest() if hashed else "")


def measure_interleaved(argvs: list[list[str] | None], repeat: int, hashed: bool
                        ) -> list[Measure | None]:
    """:func:`measure` of each command (None: not run), their runs interleaved (a, b, c,
    a, b, c, ...) so every command sees the same changes of the machine's load."""
    runs: list[list[Measure]] = [[] for _ in argvs]
    for _ in range(repeat):
        for i, argv in enumerate(argvs):
            if argv is not None:
                runs[i].append(run_once(argv, hashed))
    out: list[Measure | None] = []
    for got in runs:
        if not got:
            out.append(None)
            continue
        digests = {m.digest for m in got}
        out.append(Measure(statistics.median(m.seconds for m in got),
                           statistics.median(m.cpu for m in got), max(m.rss for m in got),
                           digests.pop() if len(digests) == 1 else "unstable"))
    return out


def installed_copy(tree: Path, name: str) -> Path:
    """A byte-compiled copy of ``tree``'s dmimage package (a directory to put on
    PYTHONPATH), made afresh for this run (several runs may share the cache) and removed at
    exit: what a wheel or distribution package runs."""
    (CACHE / "trees").mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=CACHE / "trees"))
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    shutil.copytree(tree / "dmimage", dest / "dmimage",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if not compileall.compile_dir(dest / "dmimage", quiet=1, workers=0):
        raise SystemExit(f"cannot byte-compile {tree / 'dmimage'}")
    return dest


def commands(b: Built, work: Path, dm: list[str] | None = None
             ) -> dict[str, tuple[list[str] | None, list[str], bool]]:
    """name -> (1.1 argv, dmimage argv, compare stdout) for one pool; ``dm``: how to run
    dmimage (default: this interpreter's)."""
    t = str(TOOLS)
    dm = dm or [sys.executable, "-m", "dmimage"]
    meta = str(b.meta)
    region = f"0..{b.total}"
    return {
        "check": ([f"{t}/thin_check", "-q", meta], [*dm, "check", "-q", meta], False),
        "dump": ([f"{t}/thin_dump", meta], [*dm, "dump", meta], True),
        "ls": ([f"{t}/thin_ls", "--format", LS_FIELDS, meta], [*dm, "ls", meta, "-o", LS_FIELDS],
               True),
        "restore": ([f"{t}/thin_restore", "-q", "-i", str(b.xml), "-o", str(work / "r11.meta")],
                    [*dm, "restore", "-q", "-i", str(b.xml), "-o", str(work / "rdm.meta")],
                    False),
        "delta": ([f"{t}/thin_delta", "--snap1", "0", "--snap2", "1", meta],
                  [*dm, "delta", meta, "--thin1", "0", "--thin2", "1"], True),
        "rmap": ([f"{t}/thin_rmap", "--region", region, meta],
                 [*dm, "rmap", meta, "--region", region], True),
        # the first 2 GiB of thin 0: the whole tree is still walked (validated, extent) first
        "export": (None, [*dm, "export", meta, str(b.data), "--dev-id", "0", "--size", "2G",
                          "-o", "-"], False),
    }


def dump_digest(meta: Path) -> str:
    h = hashlib.sha256()
    p = subprocess.Popen([f"{TOOLS}/thin_dump", str(meta)], stdout=subprocess.PIPE)
    assert p.stdout is not None
    while chunk := p.stdout.read(1 << 20):
        h.update(chunk)
    if p.wait():
        return "thin_dump failed"
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,10M", help="total mappings (comma-separated)")
    ap.add_argument("--big", action="store_true", help="add 100M mappings")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default=None, help="commands to run (comma-separated)")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--baseline", metavar="DIR", type=Path,
                    help="also run the dmimage package in DIR (e.g. an older checkout's tree, "
                         "put first on PYTHONPATH), interleaved, as a 'before' column")
    ap.add_argument("--source", action="store_true",
                    help="run the dmimage trees in place, not byte-compiled copies")
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",") if s]
    if a.big:
        sizes.append(100 * 10**6)
    only = set(a.only.split(",")) if a.only else None
    built = [build(n) for n in sizes]
    if a.build_only:
        return 0
    base_dm = ours_dm = None
    if a.baseline is not None:
        base = a.baseline.resolve() if a.source else installed_copy(a.baseline.resolve(),
                                                                    "baseline")
        base_dm = ["env", f"PYTHONPATH={base}", sys.executable, "-m", "dmimage"]
    ours_tree = REPO if a.source else installed_copy(REPO, "current")
    ours_dm = ["env", f"PYTHONPATH={ours_tree}", sys.executable, "-m", "dmimage"]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; dmimage "
          f"{'from source' if a.source else 'byte-compiled'}")
    before = "baseline | baseline time ratio | " if base_dm else ""
    print("| mappings | command | thin-provisioning-tools 1.1 | " + before + "dmimage | "
          "time ratio | CPU ratio | memory ratio | load | goals |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if base_dm else ""))
    missed: list[str] = []
    for b in built:
        work = CACHE / f"run-{label(b.total)}"
        work.mkdir(exist_ok=True)
        if only is None or "restore" in only:  # the restore targets, removed after it
            for path in (work / "r11.meta", work / "rdm.meta"):
                with open(path, "wb") as f:
                    f.truncate(b.meta.stat().st_size)
        base_cmds = commands(b, work, base_dm) if base_dm else {}
        for name, (theirs, ours, hashed) in commands(b, work, ours_dm).items():
            if only is not None and name not in only:
                continue
            load0 = os.getloadavg()[0]
            reps = 1 if name == "export" else a.repeat
            argvs = [theirs, base_cmds[name][1] if base_dm else None, ours]
            m11, mbase, mdm = measure_interleaved(argvs, reps, hashed)
            assert mdm is not None
            notes: list[str] = []
            if m11 and hashed and m11.digest != mdm.digest:
                notes.append("OUTPUT DIFFERS")
            if mbase and hashed and m11 and mbase.digest != m11.digest:
                notes.append("BASELINE OUTPUT DIFFERS")
            if name == "restore":
                if dump_digest(work / "r11.meta") != dump_digest(work / "rdm.meta"):
                    notes.append("RESTORED POOL DIFFERS")
                for path in (work / "r11.meta", work / "rdm.meta"):
                    path.unlink()
            tr = mr = cr = None
            if m11:
                tr, mr = mdm.seconds / m11.seconds, mdm.rss / m11.rss
                cr = mdm.cpu / m11.cpu if m11.cpu else None
                goal = TIME_GOALS.get(name)
                if goal is not None and b.total <= 10 * 10**6 and tr > goal:
                    notes.append(f"time > {goal}x")
                if b.total == 10 * 10**6 and mr > MEM_RATIO_AT_10M:
                    notes.append(f"memory > {MEM_RATIO_AT_10M:.0f}x")
            if name in ("dump", "export") and mdm.rss > STREAM_LIMIT:
                notes.append("memory > 64 MiB")
            if b.total >= 100 * 10**6 and mdm.rss > BIG_LIMIT:
                notes.append("memory > 4 GiB")
            missed += [f"{label(b.total)} {name}: {n}" for n in notes]
            c11 = f"{m11.seconds:.2f} / {m11.cpu:.2f} / {m11.rss / MiB:.0f}" if m11 else "-"
            if base_dm:
                cb = (f"{mbase.seconds:.2f} / {mbase.cpu:.2f} / {mbase.rss / MiB:.0f} | "
                      f"{mbase.seconds / m11.seconds:.2f}" if mbase and m11 else "- | -")
                c11 += f" | {cb}"
            print(f"| {label(b.total)} | {name} | {c11} | {mdm.seconds:.2f} / {mdm.cpu:.2f} / "
                  f"{mdm.rss / MiB:.0f} | {f'{tr:.2f}' if tr else '-'} | "
                  f"{f'{cr:.2f}' if cr else '-'} | {f'{mr:.1f}' if mr else '-'} | "
                  f"{load0:.1f}-{os.getloadavg()[0]:.1f} | {'; '.join(notes) or 'met'} |",
                  flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if missed:
        print(f"{len(missed)} goals missed or outputs differing:", *missed, sep="\n  ")
        return 1
    print("every goal met, every output identical to 1.1's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
