"""`dmimage repair -i META -o NEW`: salvage damaged thin-pool metadata into fresh metadata."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._units import parse_uint

if TYPE_CHECKING:
    from dmimage.thin.repair import SalvageReport


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "repair", help="salvage damaged metadata into a new metadata file (like thin_repair)",
        description="Read damaged thin-pool metadata (never written) and write the pool that "
                    "can be recovered to NEW, an existing file or block device, as fresh "
                    "metadata with rebuilt space maps. Damaged subtrees are skipped; when the "
                    "superblock or a root is damaged, roots are found by scanning every block. "
                    "Exit 0 on success, 1 if nothing could be salvaged, 2 on usage/I/O errors.")
    p.add_argument("-i", "--input", required=True, metavar="META", help="damaged metadata")
    p.add_argument("-o", "--output", required=True, metavar="NEW",
                   help="metadata file or block device to overwrite")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing on success, no progress bar")
    p.add_argument("--transaction-id", type=parse_uint, metavar="N",
                   help="transaction id (at least this; needed if the superblock is lost)")
    p.add_argument("--data-block-size", type=parse_uint, metavar="SECTORS",
                   help="data block size in sectors (required if the superblock is lost)")
    p.add_argument("--nr-data-blocks", type=parse_uint, metavar="N",
                   help="number of data blocks (at least this)")
    add_lock_plan(p, lambda a: [(a.input, False), (a.output, True)])
    p.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    from dmimage.cli import _progress
    from dmimage.thin.repair import Overrides, repair

    with _progress.progress_bar("repairing", unit="items", enabled=not args.quiet,
                                min_total=_progress.MIN_MAPPINGS) as advance:
        res = repair(args.input, args.output,
                     Overrides(args.transaction_id, args.data_block_size, args.nr_data_blocks),
                     advance)
    if not args.quiet:
        print_report("dmimage repair", res.report)
    return 0


def print_report(prefix: str, r: SalvageReport) -> None:
    """The salvage's notes (per device: where its tree came from) and summary, on stderr."""
    for note in r.notes:
        print(f"{prefix}: {note}", file=sys.stderr)
    if r.ambiguous_devices:
        print(f"{prefix}: ambiguous: several trees fit devices {r.ambiguous_devices} (see the "
              "notes above for the one taken, or why the device was left out)", file=sys.stderr)
    print(f"{prefix}: salvaged {r.nr_devices} devices, {r.nr_mappings} mappings "
          f"(roots from the {r.source}; {r.lost_nodes} unreadable nodes skipped, "
          f"{r.dropped_mappings} mappings dropped)", file=sys.stderr)
