"""``dmimage dump``: thin-pool metadata as thin_dump 1.1 XML, human-readable text or JSON."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._meta_args import add_metadata_snap, resolve_meta
from dmimage.cli._output import atomic_output, widen_pipe
from dmimage.cli._units import parse_uint
from dmimage.errors import UsageError

if TYPE_CHECKING:
    from dmimage.thin.ir import PoolIR


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "dump", help="dump thin-pool metadata (XML like thin_dump 1.1, human_readable, json)",
        description="Dump thin-pool metadata. The default XML is byte-identical to thin_dump "
                    "1.1 (shared leaves as <def>/<ref>).")
    p.add_argument("meta", metavar="META", nargs="?", help="metadata file or device")
    p.add_argument("-f", "--format", dest="fmt", default="xml",
                   choices=("xml", "human_readable", "json"), help="output format (xml)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE (atomically: temporary file + rename)")
    p.add_argument("--dev-id", dest="dev_ids", metavar="N", type=parse_uint, action="append",
                   help="dump only this device (repeatable)")
    p.add_argument("--skip-mappings", action="store_true", help="do not dump mappings")
    add_metadata_snap(p)
    p.add_argument("--expand-shared", action="store_true",
                   help="no <def>/<ref>: every device fully expanded (thin_restore 0.9 form)")
    p.add_argument("-r", "--repair", action="store_true",
                   help="dump what `dmimage repair` would salvage from damaged metadata "
                        "(its notes on stderr: per device, where its tree came from)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--transaction-id", type=parse_uint, metavar="N",
                   help="with --repair: transaction id (at least this)")
    p.add_argument("--data-block-size", type=parse_uint, metavar="SECTORS",
                   help="with --repair: data block size (needed if the superblock is lost)")
    p.add_argument("--nr-data-blocks", type=parse_uint, metavar="N",
                   help="with --repair: number of data blocks (at least this)")
    add_lock_plan(p, lambda a: [(a.meta, False)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    meta, snap = resolve_meta(args.meta, args.metadata_snap)
    if getattr(args, "repair", False):
        if snap is not False:
            raise UsageError("--repair cannot read through the metadata snapshot")
        from dmimage.cli import _progress
        from dmimage.cli.repair import print_report
        from dmimage.thin.dump import write_dump
        from dmimage.thin.repair import Overrides, salvage

        with _progress.progress_bar("salvaging", unit="items", enabled=not args.quiet,
                                    min_total=_progress.MIN_MAPPINGS) as advance:
            ir, report = salvage(meta, Overrides(args.transaction_id, args.data_block_size,
                                                 args.nr_data_blocks), advance)
        print_report("dmimage dump --repair", report)
        picked = _select(ir, args)
        _write(args, lambda out: write_dump(picked, out, args.fmt, expand=args.expand_shared))
        return 0
    if any(getattr(args, k, None) is not None
           for k in ("transaction_id", "data_block_size", "nr_data_blocks")):
        raise UsageError("--transaction-id, --data-block-size, --nr-data-blocks go with --repair")
    from dmimage.cli import _progress
    from dmimage.thin.dump import dump_pool

    with _progress.progress_bar("dumping", unit="items", enabled=not args.quiet,
                                min_total=_progress.MIN_BLOCKS) as advance:
        _write(args, lambda out: dump_pool(
            meta, out, args.fmt, metadata_snap=snap, dev_ids=args.dev_ids,
            skip_mappings=args.skip_mappings, expand=args.expand_shared, progress=advance))
    return 0


def _write(args: argparse.Namespace, dump: Callable[[BinaryIO], None]) -> None:
    """``dump`` to stdout, or to ``-o FILE`` atomically."""
    if args.output is None:
        out = sys.stdout.buffer
        widen_pipe(out)
        dump(out)
        out.flush()
        return
    with atomic_output(args.output) as f:
        dump(f)


def _select(ir: PoolIR, args: argparse.Namespace) -> PoolIR:
    """--dev-id / --skip-mappings applied to a salvaged pool."""
    if args.skip_mappings:
        for d in ir.devices:
            d.items = []
        ir.defs = {}
    elif args.dev_ids is not None:
        wanted = set(args.dev_ids)
        ir.devices = [d for d in ir.devices if d.dev_id in wanted]
        used = {i for d in ir.devices for i in d.items if isinstance(i, str)}
        ir.defs = {k: v for k, v in ir.defs.items() if k in used}
    return ir

