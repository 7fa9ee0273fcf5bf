#!/usr/bin/env python3
"""Repair quality: dmimage repair vs thin_repair 1.1 on the same damaged metadata.

For every (pool, damage class) pair: damage a copy of the pool's metadata, run both repairs
into fresh files of the input's size, check both outputs with thin_check 1.1, dump them with
thin_dump 1.1 and count the mappings that are *correct* (same device, virtual block, data
block and time as the undamaged pool) and *wrong* (anything else). Prints a Markdown table
(the one in docs/repair.md) or, with --json, the rows.

Pools: metadata written by the real 6.1 and 6.12 kernels (tests/fixtures/repair/, made by
vmtests/repair_pools.py: multi-level trees, snapshots sharing subtrees, stale nodes of earlier
transactions) and three pools made by thin_restore 1.1 from tests/poolgen.py.

    python benchmarks/repair_quality.py [--json] [--out DIR] [--pool NAME ...]
"""

from __future__ import annotations

import argparse
import json
import lzma
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import damage  # noqa: E402
import oracles  # noqa: E402
import poolgen  # noqa: E402
import semantic  # noqa: E402

BLOCK = 4096


def _zero_block(meta: bytes, b: int, what: str, kind: str) -> damage.Damaged:
    out = bytearray(meta)
    out[b * BLOCK:(b + 1) * BLOCK] = bytes(BLOCK)
    return damage.Damaged(out, f"{what} (block {b}) zeroed", kind, b)


def _garbage_block(meta: bytes, b: int, what: str, kind: str) -> damage.Damaged:
    out = bytearray(meta)
    out[b * BLOCK:(b + 1) * BLOCK] = bytes((i * 37 + 11) & 0xFF for i in range(BLOCK))
    return damage.Damaged(out, f"{what} (block {b}) overwritten with garbage", kind, b)


FIXTURES = REPO / "tests" / "fixtures" / "repair"


@dataclass
class Case:
    """One undamaged pool: its metadata and the mappings it holds (the truth)."""

    name: str
    meta: bytes
    truth: set[tuple[int, int, int, int]]
    data_block_size: int
    transaction: int


GENERATED = ("thins3", "multilevel", "snapshots")


def generated_cases(workdir: Path, tools, only: list[str] | None = None) -> list[Case]:
    """The pools thin_restore 1.1 makes from tests/poolgen.py."""
    out = []
    for name, pool in (("thins3", poolgen.thins_pool(3)),
                       ("multilevel", poolgen.multilevel_pool(5000)),
                       ("snapshots", poolgen.snapshot_pool(2000))):
        if only and name not in only:
            continue
        src = workdir / f"{name}.meta"
        nr = oracles.nr_meta_blocks_for(pool.nr_mappings, len(pool.devices), pool.nr_data_blocks)
        oracles.restore(poolgen.to_xml(pool), src, tools, nr)
        out.append(Case(name, src.read_bytes(), _key_set(pool), pool.data_block_size,
                        pool.transaction))
    return out


def kernel_fixture_names() -> list[str]:
    return sorted(p.name[: -len(".meta.xz")] for p in FIXTURES.glob("*.meta.xz"))


def kernel_case(name: str) -> Case:
    """A kernel-written fixture; the truth is thin_dump 1.1's dump of it (committed)."""
    with lzma.open(FIXTURES / f"{name}.meta.xz") as f:
        meta = f.read()
    with lzma.open(FIXTURES / f"{name}.thin_dump-1.1.xml.xz", "rt") as x:
        pool = semantic.parse_dump(x.read())
    return Case(name, meta, _key_set(pool), pool.data_block_size, pool.transaction)


def _flip_leaves(meta: bytes, n: int) -> damage.Damaged:
    """n different bottom-level leaves with a bad checksum."""
    d = damage.flip_byte(meta, "btree_leaf", role="bottom")
    blocks = [d.block]
    for i in range(1, n):
        d2 = damage.flip_byte(bytes(d.data), "btree_leaf", role="bottom", which=3 * i)
        if d2.block in blocks:
            raise LookupError("not enough bottom leaves")
        blocks.append(d2.block)
        d = d2
    return damage.Damaged(d.data, f"bottom leaves {blocks}: bad checksum", "leaves", d.block)


def damage_classes(meta: bytes) -> list[damage.Damaged]:
    """The damage classes of the comparison (skipping those the pool has no target for)."""
    mm = damage.MetaMap(meta)
    out: list[damage.Damaged] = []

    def add(f, *a, **k):
        try:
            out.append(f(*a, **k))
        except LookupError:
            pass

    out.append(_zero_block(meta, 0, "superblock", "superblock zeroed"))
    out.append(_zero_block(meta, mm.mapping_root, "mapping root", "mapping root zeroed"))
    out.append(_garbage_block(meta, mm.mapping_root, "mapping root", "mapping root garbage"))
    out.append(_zero_block(meta, mm.details_root, "details root", "details root zeroed"))
    add(lambda: _kind(damage.flip_byte(meta, "btree_internal", role="bottom"),
                      "bottom internal node: bad checksum"))
    add(lambda: _kind(damage.flip_byte(meta, "btree_internal", role="bottom", fix_csum=True),
                      "bottom internal node: bad value_size"))
    add(lambda: _kind(damage.flip_byte(meta, "btree_leaf", role="bottom"),
                      "bottom leaf: bad checksum"))
    add(lambda: _kind(_flip_leaves(meta, 3), "three bottom leaves: bad checksum"))
    add(lambda: _kind(damage.wrong_blocknr(meta, "btree_leaf", role="bottom"),
                      "bottom leaf: wrong blocknr"))
    add(lambda: _kind(damage.flip_byte(meta, "bitmap", role="data"), "data bitmap damaged"))
    add(lambda: _kind(damage.flip_byte(meta, "bitmap", role="meta"), "metadata bitmap damaged"))
    add(lambda: _kind(damage.flip_byte(meta, "index"), "metadata SM index damaged"))
    add(lambda: _kind(damage.leaked_block(meta, 1), "leaked metadata block"))
    add(lambda: _kind(damage.out_of_range_pointer(meta), "out-of-range child pointer"))
    add(lambda: _kind(damage.cycle(meta), "cycle in a bottom tree"))
    return out


def _kind(d: damage.Damaged, kind: str) -> damage.Damaged:
    d.kind = kind
    return d


def _key_set(pool) -> set[tuple[int, int, int, int]]:
    out = set()
    for d in pool.devices:
        for o, b, t in d.mappings.tolist():
            out.add((d.dev_id, o, b, t))
    return out


@dataclass
class Outcome:
    ok: bool  # repair exited 0 and the output checks clean with thin_check 1.1
    correct: int
    wrong: int
    error: str = ""


@dataclass
class Row:
    pool: str
    damage: str
    total: int
    theirs: Outcome
    ours: Outcome


def _start_check(out: Path, rc: int, tools) -> subprocess.Popen[str] | None:
    """thin_check 1.1 on a repair's output, started in the background so that the rows'
    checks overlap (tests/oracles.py: the 1.1 tools' half-second exit)."""
    if rc != 0:
        return None
    return subprocess.Popen([str(tools.path("thin_check")), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=oracles.tool_env(tools))


def _evaluate(out: Path, rc: int, err: str, truth: set, tools,
              check: subprocess.Popen[str] | None = None) -> Outcome:
    if rc != 0:
        last = err.strip().splitlines()[-1][:120] if err.strip() else f"rc {rc}"
        return Outcome(False, 0, 0, last)
    if check is None:
        check = _start_check(out, rc, tools)
    assert check is not None
    _, cerr = check.communicate(timeout=300)
    crc = check.returncode
    try:
        got = _key_set(semantic.parse_dump(oracles.dump(out, tools)))
    except Exception as exc:  # noqa: BLE001 - a dump failure is a result here
        return Outcome(False, 0, 0, f"thin_dump failed: {exc}"[:120])
    return Outcome(crc == 0, len(got & truth), len(got - truth),
                   "" if crc == 0 else f"thin_check 1.1 rc {crc}: {cerr.strip()[:100]}")


def _ours(bad: Path, out: Path, extra: list[str], in_process: bool) -> tuple[int, str]:
    """dmimage repair's exit status and stderr: a ``python -m dmimage`` process, or (in the
    test suite, where the process boundary is not what is measured) ``cli.main.main`` called
    in this process, which runs the same code without a Python start-up per row."""
    argv = ["repair", "-q", "-i", str(bad), "-o", str(out), *extra]
    if not in_process:
        q = subprocess.run([sys.executable, "-m", "dmimage", *argv], capture_output=True,
                           text=True, cwd=REPO, timeout=600)
        return q.returncode, q.stderr
    import contextlib
    import io

    from dmimage.cli.main import main as dmimage_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = dmimage_main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
    return rc, err.getvalue()


def _superblock_args(c: Case, kind: str) -> list[str]:
    """What the user gives when the superblock is gone (thin_repair needs the same)."""
    if not kind.startswith("superblock"):
        return []
    return ["--data-block-size", str(c.data_block_size), "--transaction-id", str(c.transaction)]


def evaluate(c: Case, workdir: Path, tools, kinds: set[str] | None = None,
             in_process: bool = False) -> list[Row]:
    """Both repairs on every damage class of *c* (or only the *kinds* named). Every row's
    repairs run first, their outputs' thin_check runs in the background meanwhile; then each
    row is judged. ``in_process``: see :func:`_ours`."""
    pending = []
    for i, d in enumerate(damage_classes(c.meta)):
        if kinds is not None and d.kind not in kinds:
            continue
        bad = workdir / f"{c.name}-{i}.bad"
        bad.write_bytes(d.data)
        extra = _superblock_args(c, d.kind)
        nr_blocks = len(c.meta) // BLOCK
        theirs_out = workdir / f"{c.name}-{i}.theirs"
        p = oracles.repair(bad, theirs_out, tools, nr_blocks, *extra)
        theirs = (theirs_out, p.returncode, p.stderr,
                  _start_check(theirs_out, p.returncode, tools))
        ours_out = workdir / f"{c.name}-{i}.ours"
        oracles.make_sparse(ours_out, nr_blocks)
        rc, err = _ours(bad, ours_out, extra, in_process)
        ours = (ours_out, rc, err, _start_check(ours_out, rc, tools))
        bad.unlink()
        pending.append((d.kind, theirs, ours))
    rows = []
    for kind, theirs, ours in pending:
        results = [_evaluate(out, rc, err, c.truth, tools, check)
                   for out, rc, err, check in (theirs, ours)]
        rows.append(Row(c.name, kind, len(c.truth), *results))
        for out, *_ in (theirs, ours):
            out.unlink(missing_ok=True)
    return rows


def run_all(workdir: Path, only: list[str] | None = None) -> list[Row]:
    tools = oracles.tools_11()
    cases = [kernel_case(n) for n in kernel_fixture_names() if not only or n in only]
    if not only or set(only) & set(GENERATED):
        cases += generated_cases(workdir, tools, only)
    rows: list[Row] = []
    for c in cases:
        rows.extend(evaluate(c, workdir, tools))
    return rows


def _cells(o: Outcome) -> str:
    """correct | wrong; "fails" when the tool exited non-zero, "(not clean)" when its output
    fails thin_check 1.1."""
    if not o.ok and o.correct == 0 and o.wrong == 0 and o.error:
        return "fails | -"
    return f"{o.correct}{'' if o.ok else ' (not clean)'} | {o.wrong}"


def markdown(rows: list[Row]) -> str:
    lines = ["| pool | damage | mappings | thin_repair 1.1 correct | wrong "
             "| dmimage correct | wrong |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.pool} | {r.damage} | {r.total} | {_cells(r.theirs)} | "
                     f"{_cells(r.ours)} |")
    return "\n".join(lines)


def worse_than_thin_repair(r: Row) -> str | None:
    """Why dmimage's result is worse than thin_repair 1.1's on this row, or None."""
    if not r.ours.ok:
        return f"dmimage's repair failed or is not clean: {r.ours.error}"
    if r.ours.correct < r.theirs.correct:
        return f"{r.ours.correct} correct mappings < thin_repair's {r.theirs.correct}"
    if r.ours.wrong > (r.theirs.wrong if r.theirs.ok else 0):
        return f"{r.ours.wrong} wrong mappings > thin_repair's {r.theirs.wrong}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="work in this directory")
    ap.add_argument("--pool", action="append", help="only these pools (fixture or generated)")
    args = ap.parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        rows = run_all(args.out, args.pool)
    else:
        with tempfile.TemporaryDirectory() as d:
            rows = run_all(Path(d), args.pool)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        print(markdown(rows))
        for r in rows:
            for who, o in (("thin_repair", r.theirs), ("dmimage", r.ours)):
                if o.error:
                    print(f"<!-- {r.pool}/{r.damage}: {who}: {o.error} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
