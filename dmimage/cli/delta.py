"""``dmimage delta``: differences between two thin devices, as thin_delta 1.1 prints them."""

from __future__ import annotations

import argparse

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._meta_args import add_metadata_snap, resolve_meta
from dmimage.cli._output import write_text
from dmimage.cli._units import parse_uint
from dmimage.errors import UsageError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "delta", help="differences between two thin devices (like thin_delta 1.1)",
        description="Compare the mappings of two thin devices (or two mapping-tree roots). "
                    "The XML is byte-identical to thin_delta 1.1.")
    p.add_argument("meta", metavar="META", nargs="?", help="metadata file or device")
    g1 = p.add_mutually_exclusive_group()
    g1.add_argument("--thin1", "--snap1", dest="thin1", metavar="DEV_ID", type=parse_uint)
    g1.add_argument("--root1", metavar="BLOCKNR", type=parse_uint,
                    help="the first side is the mapping tree at this block")
    g2 = p.add_mutually_exclusive_group()
    g2.add_argument("--thin2", "--snap2", dest="thin2", metavar="DEV_ID", type=parse_uint)
    g2.add_argument("--root2", metavar="BLOCKNR", type=parse_uint)
    p.add_argument("--verbose", action="store_true", help="data blocks of each range")
    p.add_argument("--json", action="store_true", help="JSON instead of XML")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_metadata_snap(p)
    add_lock_plan(p, lambda a: [(a.meta, False)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.cli import _progress
    from dmimage.thin.delta import delta_json, delta_xml, side_batches, stream_diff
    from dmimage.thin.pool import open_pool

    meta, snap = resolve_meta(args.meta, args.metadata_snap)
    if args.thin1 is None and args.root1 is None:
        raise UsageError("--thin1 or --root1 not specified")
    if args.thin2 is None and args.root2 is None:
        raise UsageError("--thin2 or --root2 not specified")
    with open_pool(meta, metadata_snap=snap) as pool, _progress.progress_bar(
            "comparing", unit="items", enabled=not args.quiet,
            min_total=_progress.MIN_MAPPINGS) as advance:
        sides = []
        labels = []
        for name, dev, root in (("left", args.thin1, args.root1),
                                ("right", args.thin2, args.root2)):
            if dev is not None:
                sides.append(side_batches(pool, dev_id=dev, progress=advance))
                labels.append((name, dev))
            else:
                sides.append(side_batches(pool, root=root, progress=advance))
                labels.append((f"{name}_root", root))
        if args.root1 is None and args.root2 is None:  # else the size is not known: no bar
            details = pool.devices()
            advance.set_total(sum(details[d].mapped_blocks for d in (args.thin1, args.thin2)
                                  if d in details))
        d = stream_diff(sides[0], sides[1])
        if args.json:
            text = delta_json(pool, labels[0], labels[1], d)
        else:
            text = delta_xml(pool, labels[0], labels[1], d, verbose=args.verbose)
    write_text(text)
    return 0
