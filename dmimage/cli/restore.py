"""`dmimage restore`: write fresh metadata from a thin_dump XML (0.9 or 1.x) or JSON dump."""

from __future__ import annotations

import argparse
import os

from dmimage.cli import _progress
from dmimage.cli._locking import add_lock_plan
from dmimage.cli._units import parse_uint


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "restore",
        help="write thin-pool metadata from an XML or JSON dump (like thin_restore)",
        description="Write fresh thin-pool metadata from a thin_dump XML (0.9 or 1.x form) or a "
                    "dmimage JSON dump. The output must exist (a file or block device) and is "
                    "never grown; its size sets the metadata size (at most 4,161,600 blocks of "
                    "4 KiB). Input and size are checked before anything is written; the "
                    "superblock is written last.")
    p.add_argument("-i", "--input", required=True, metavar="DUMP",
                   help="XML or JSON dump: a file, or a pipe such as /dev/stdin (kept in a "
                        "temporary file in $TMPDIR as it is read)")
    p.add_argument("-o", "--output", required=True, metavar="META",
                   help="metadata file or block device to overwrite")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--transaction-id", type=parse_uint, metavar="N",
                   help="override the superblock's transaction id")
    p.add_argument("--data-block-size", type=parse_uint, metavar="SECTORS",
                   help="override the data block size (sectors)")
    p.add_argument("--nr-data-blocks", type=parse_uint, metavar="N",
                   help="override the number of data blocks")
    add_lock_plan(p, lambda a: [(a.output, True)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.thin.restore_stream import restore_file

    _keep_freed_memory()
    try:
        size = os.stat(args.input).st_size
    except OSError:
        size = 0
    with _progress.progress_bar("restoring", size, unit="bytes", enabled=not args.quiet,
                                min_total=_progress.MIN_DUMP_BYTES) as advance:
        restore_file(args.input, args.output, transaction_id=args.transaction_id,
                     data_block_size=args.data_block_size, nr_data_blocks=args.nr_data_blocks,
                     progress=advance)
    return 0


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of handing it back at once: restore
    makes and drops many arrays of about a megabyte, and with glibc's defaults each one came
    from fresh pages of the kernel (mmap or a trimmed heap) whose first touch costs more than
    the numpy operation filling them (the XML scan took ~1.7x as long)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: only slower


#: mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
