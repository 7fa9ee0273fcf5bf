"""``dmimage rmap``: which thin blocks map given data regions, as thin_rmap 1.1 prints it."""

from __future__ import annotations

import argparse
import sys

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._meta_args import add_metadata_snap, resolve_meta
from dmimage.cli._output import write_text


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "rmap", help="reverse map of data-block regions (like thin_rmap 1.1)",
        description="Print which thin blocks map the given data-block regions. Output is "
                    "byte-identical to thin_rmap 1.1 (shared leaves reported for the lowest "
                    "device only, as 1.1 does).")
    p.add_argument("meta", metavar="META", nargs="?", help="metadata file or device")
    p.add_argument("--region", dest="regions", metavar="BEGIN..END", action="append",
                   required=True, help="data blocks BEGIN to END-1 (repeatable)")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_metadata_snap(p)
    add_lock_plan(p, lambda a: [(a.meta, False)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.cli import _progress
    from dmimage.thin.pool import open_pool
    from dmimage.thin.rmap import parse_region, rmap, rmap_chunks, rmap_json

    meta, snap = resolve_meta(args.meta, args.metadata_snap)
    regions = [parse_region(r) for r in args.regions]
    with open_pool(meta, metadata_snap=snap) as pool, _progress.progress_bar(
            "mapping back", unit="items", enabled=not args.quiet,
            min_total=_progress.MIN_BLOCKS) as advance:
        runs = rmap(pool, regions, advance)
    if args.json:
        write_text(rmap_json(runs))
        return 0
    out = sys.stdout.buffer
    for chunk in rmap_chunks(runs):
        out.write(chunk)
    out.flush()
    return 0
