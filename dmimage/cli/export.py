"""`dmimage export META DATA --dev-id N -o FILE`: a thin volume's content, offline."""

from __future__ import annotations

import argparse
import sys

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._progress import progress_bar
from dmimage.cli._units import parse_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="write a thin volume's content to a file (sparse)",
                       description="Reads as the kernel's thin device would: unmapped blocks are "
                       "zeros (holes in the output file).")
    p.add_argument("metadata", metavar="META")
    p.add_argument("data", metavar="DATA", help="the pool's data file or block device")
    p.add_argument("--dev-id", type=int, required=True, help="thin device id")
    p.add_argument("--size", type=parse_size, default=None,
                   help="bytes to export (suffixes K, M, G, T, s for sectors); default: up to the "
                   "end of the highest mapped block")
    p.add_argument("-m", "--metadata-snap", action="store_true",
                   help="read the mappings through the held metadata snapshot")
    p.add_argument("-o", "--output", required=True, help="output file, or - for stdout")
    add_lock_plan(p, lambda a: [(a.metadata, False), (a.data, False)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.thin.export import export_thin
    from dmimage.thin.pool import open_pool

    with open_pool(args.metadata, metadata_snap=args.metadata_snap) as pool:
        pool.devices()
        if args.output == "-":
            export_thin(pool, args.data, args.dev_id, sys.stdout.buffer, size=args.size)
            return 0
        with progress_bar("export") as advance:
            export_thin(pool, args.data, args.dev_id, args.output, size=args.size,
                        progress=advance)
    return 0
