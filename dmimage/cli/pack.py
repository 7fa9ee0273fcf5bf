"""``dmimage pack``: metadata to a compact pack file, interchangeable with thin_metadata_pack."""

from __future__ import annotations

import argparse
import sys

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._output import atomic_output
from dmimage.errors import UsageError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "pack", help="pack metadata into a compressed file (thin_metadata_pack 1.1 format)",
        description="Pack every metadata block with a valid checksum into a compressed file "
                    "that thin_metadata_unpack 1.1 (and dmimage unpack) restores.")
    p.add_argument("meta", metavar="META", nargs="?", help="metadata file or device")
    p.add_argument("-i", "--input", metavar="META", help="same as META (the 1.1 spelling)")
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="pack file to write (atomically)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_lock_plan(p, lambda a: [(a.input or a.meta, False)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.cli import _progress
    from dmimage.thin.pack import pack_metadata

    meta = args.input or args.meta
    if meta is None:
        raise UsageError("no metadata file given")
    with atomic_output(args.output) as f, _progress.progress_bar(
            "packing", enabled=not args.quiet, min_total=_progress.MIN_BYTES) as advance:
        pack_metadata(meta, f, advance)
    sys.stdout.flush()
    return 0

