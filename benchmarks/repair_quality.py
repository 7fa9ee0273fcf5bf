#!/usr/bin/env python3
"""Repair quality: dmimage repair vs thin_repair 1.1 on the same damaged metadata.

For every (pool, damage class) pair: damage a thin_restore 1.1 image, run both repairs into
fresh files of the input's size, check both outputs with thin_check 1.1, dump them with
thin_dump 1.1 and count the mappings that are *correct* (same device, virtual block, data
block and time as the undamaged pool) and *wrong* (anything else). Prints a Markdown table
(the one in docs/repair.md) or, with --json, the rows.

    python benchmarks/repair_quality.py [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
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


def _evaluate(out: Path, rc: int, err: str, truth: set, tools) -> Outcome:
    if rc != 0:
        last = err.strip().splitlines()[-1][:120] if err.strip() else f"rc {rc}"
        return Outcome(False, 0, 0, last)
    crc, _, cerr = oracles.check(out, tools)
    try:
        got = _key_set(semantic.parse_dump(oracles.dump(out, tools)))
    except Exception as exc:  # noqa: BLE001 - a dump failure is a result here
        return Outcome(False, 0, 0, f"thin_dump failed: {exc}"[:120])
    return Outcome(crc == 0, len(got & truth), len(got - truth),
                   "" if crc == 0 else f"thin_check 1.1 rc {crc}: {cerr.strip()[:100]}")


def evaluate(pool_name: str, pool, workdir: Path, tools) -> list[Row]:
    src = workdir / f"{pool_name}.meta"
    nr = oracles.nr_meta_blocks_for(pool.nr_mappings, len(pool.devices), pool.nr_data_blocks)
    oracles.restore(poolgen.to_xml(pool), src, tools, nr)
    meta = src.read_bytes()
    truth = _key_set(pool)
    rows = []
    for i, d in enumerate(damage_classes(meta)):
        bad = workdir / f"{pool_name}-{i}.bad"
        bad.write_bytes(d.data)
        extra = ["--data-block-size", str(pool.data_block_size)] if d.kind.startswith(
            "superblock") else []
        theirs_out = workdir / f"{pool_name}-{i}.theirs"
        p = oracles.repair(bad, theirs_out, tools, len(meta) // BLOCK, *extra)
        theirs = _evaluate(theirs_out, p.returncode, p.stderr, truth, tools)
        ours_out = workdir / f"{pool_name}-{i}.ours"
        oracles.make_sparse(ours_out, len(meta) // BLOCK)
        q = subprocess.run([sys.executable, "-m", "dmimage", "repair", "-q", "-i", str(bad),
                            "-o", str(ours_out), *extra], capture_output=True, text=True,
                           cwd=REPO, timeout=600)
        ours = _evaluate(ours_out, q.returncode, q.stderr, truth, tools)
        rows.append(Row(pool_name, d.kind, len(truth), theirs, ours))
    return rows


def pools():
    return [("thins3", poolgen.thins_pool(3)),
            ("multilevel", poolgen.multilevel_pool(5000)),
            ("snapshots", poolgen.snapshot_pool(2000))]


def run_all(workdir: Path) -> list[Row]:
    tools = oracles.tools_11()
    rows: list[Row] = []
    for name, pool in pools():
        rows.extend(evaluate(name, pool, workdir, tools))
    return rows


def _cell(o: Outcome) -> str:
    if not o.ok and o.correct == 0 and o.error:
        return "fails"
    s = f"{o.correct}"
    if o.wrong:
        s += f" (+{o.wrong} wrong)"
    if not o.ok:
        s += " (output not clean)"
    return s


def markdown(rows: list[Row]) -> str:
    lines = ["| pool | damage | mappings | thin_repair 1.1 | dmimage repair |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.pool} | {r.damage} | {r.total} | {_cell(r.theirs)} | "
                     f"{_cell(r.ours)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="keep the images in this directory")
    args = ap.parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        rows = run_all(args.out)
    else:
        with tempfile.TemporaryDirectory() as d:
            rows = run_all(Path(d))
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
