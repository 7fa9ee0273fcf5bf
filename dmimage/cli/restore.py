"""`dmimage restore`: write fresh metadata from a thin_dump XML (0.9 or 1.x) or JSON dump."""

from __future__ import annotations

import argparse

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._progress import progress_bar
from dmimage.cli._units import parse_uint

#: Below this many mappings a restore takes well under a second: no progress bar.
PROGRESS_THRESHOLD = 200_000


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "restore",
        help="write thin-pool metadata from an XML or JSON dump (like thin_restore)",
        description="Write fresh thin-pool metadata from a thin_dump XML (0.9 or 1.x form) or a "
                    "dmimage JSON dump. The output must exist (a file or block device) and is "
                    "never grown; its size sets the metadata size (at most 4,161,600 blocks of "
                    "4 KiB). Input and size are checked before anything is written; the "
                    "superblock is written last.")
    p.add_argument("-i", "--input", required=True, metavar="DUMP", help="XML or JSON dump")
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
    from dmimage.thin.restore import apply_overrides, read_input, restore, validate_ir

    ir = read_input(args.input)
    apply_overrides(ir, transaction_id=args.transaction_id,
                    data_block_size=args.data_block_size, nr_data_blocks=args.nr_data_blocks)
    validate_ir(ir)
    total = sum(int(d.mapped_blocks) for d in ir.devices)
    show = not args.quiet and total >= PROGRESS_THRESHOLD
    with progress_bar("restoring", total, unit="items", enabled=show) as advance:
        restore(ir, args.output, progress=advance)
    return 0
