"""``dmimage unpack``: a pack file (thin_metadata_pack 1.1 format) back to metadata."""

from __future__ import annotations

import argparse

from dmimage.cli._locking import add_lock_plan
from dmimage.errors import DeviceError, UsageError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "unpack", help="unpack a thin_metadata_pack 1.1 file into metadata",
        description="Write the metadata a pack file describes (blocks not in the pack read "
                    "as zeros in a regular file; a block device keeps their old contents, as "
                    "with thin_metadata_unpack).")
    p.add_argument("-i", "--input", metavar="FILE", required=True, help="pack file")
    p.add_argument("-o", "--output", metavar="META", required=True,
                   help="metadata file (created or truncated) or device")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_lock_plan(p, lambda a: [(a.output, True)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.cli import _progress
    from dmimage.thin.pack import unpack_metadata

    if args.input == args.output:
        raise UsageError("input and output are the same file")
    try:
        f = open(args.input, "rb")
    except OSError as exc:
        raise DeviceError(f"{args.input}: {exc.strerror}") from None
    with f, _progress.progress_bar("unpacking", enabled=not args.quiet,
                                   min_total=_progress.MIN_PACKED_BYTES) as advance:
        unpack_metadata(f, args.output, advance)
    return 0
