#!/usr/bin/env python3
"""Make the benchmark pool: N thins × M single mappings, data blocks globally shuffled.

Writes <out>/bench-<N>x<M>.xml (thin_dump 0.9-compatible expanded XML, every mapping a
<single_mapping>) and restores it with thin_restore 1.1 into <out>/bench-<N>x<M>.meta, then
prints both paths (and timings on stderr).  Defaults: 10 thins × 100,000 mappings,
data_block_size 128 (64 KiB), seed 0.

    python benchmarks/make_bench_pool.py [--thins N] [--mappings M] [--seed S]
        [--data-block-size SECTORS] [--out DIR] [--tools 1.1|0.9] [--no-restore] [--check]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import oracles  # noqa: E402
import poolgen  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thins", type=int, default=10)
    ap.add_argument("--mappings", type=int, default=100_000, help="single mappings per thin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-block-size", type=int, default=128, help="sectors (128 = 64 KiB)")
    ap.add_argument(
        "--nr-data-blocks", type=int, default=None, help="default: exactly thins × mappings"
    )
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench")  # /out/ is git-ignored
    ap.add_argument("--tools", choices=["1.1", "0.9"], default="1.1")
    ap.add_argument("--no-restore", action="store_true")
    ap.add_argument("--check", action="store_true", help="run thin_check on the result")
    a = ap.parse_args(argv)

    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{a.thins}x{a.mappings}"
    if a.seed:
        stem += f"-s{a.seed}"
    xml_path, meta_path = a.out / f"{stem}.xml", a.out / f"{stem}.meta"

    t0 = time.perf_counter()
    pool = poolgen.fragmented_pool(
        a.thins,
        a.mappings,
        seed=a.seed,
        data_block_size=a.data_block_size,
        nr_data_blocks=a.nr_data_blocks,
    )
    xml = poolgen.to_xml(pool)
    xml_path.write_text(xml)
    t1 = time.perf_counter()
    print(f"xml: {len(xml):,} bytes in {t1 - t0:.1f}s", file=sys.stderr)
    print(xml_path)
    if a.no_restore:
        return 0
    tools = oracles.tools_11() if a.tools == "1.1" else oracles.tools_09()
    nr_meta = oracles.nr_meta_blocks_for(pool.nr_mappings, len(pool.devices), pool.nr_data_blocks)
    oracles.restore_file(xml_path, meta_path, tools, nr_meta)
    t2 = time.perf_counter()
    print(
        f"restore ({tools.version}): {nr_meta} metadata blocks in {t2 - t1:.1f}s", file=sys.stderr
    )
    print(meta_path)
    if a.check:
        rc, out, err = oracles.check(meta_path, tools)
        print(
            f"thin_check rc={rc} in {time.perf_counter() - t2:.1f}s {out.strip()}", file=sys.stderr
        )
        return 1 if rc else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
