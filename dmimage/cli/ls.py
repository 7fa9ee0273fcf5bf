"""``dmimage ls``: thin devices of a pool and their usage, as thin_ls 1.1 prints them."""

from __future__ import annotations

import argparse

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._meta_args import add_metadata_snap, resolve_meta
from dmimage.cli._output import write_text


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "ls", help="list thin devices and their usage (like thin_ls 1.1)",
        description="List the thin devices of a pool. The table is byte-identical to thin_ls "
                    "1.1 (fields: DEV, MAPPED_BLOCKS, EXCLUSIVE_BLOCKS, SHARED_BLOCKS, "
                    "HIGHEST_BLOCK, the _SECTORS and _BYTES variants, MAPPED, EXCLUSIVE, "
                    "SHARED, HIGHEST_MAPPED, TRANSACTION, CREATE_TIME, SNAP_TIME).")
    p.add_argument("meta", metavar="META", nargs="?", help="metadata file or device")
    p.add_argument("-o", "--format", dest="fields", metavar="FIELDS",
                   help="comma-separated fields (default DEV,MAPPED,CREATE_TIME,SNAP_TIME)")
    p.add_argument("--no-headers", action="store_true", help="no header row")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_metadata_snap(p)
    add_lock_plan(p, lambda a: [(a.meta, False)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.cli import _progress
    from dmimage.thin.ls import DEFAULT_FIELDS, ls_json, ls_table, parse_fields, render_grid
    from dmimage.thin.pool import open_pool

    meta, snap = resolve_meta(args.meta, args.metadata_snap)
    fields = parse_fields(args.fields) if args.fields is not None else list(DEFAULT_FIELDS)
    with open_pool(meta, metadata_snap=snap) as pool, _progress.progress_bar(
            "listing", unit="items", enabled=not args.quiet,
            min_total=_progress.MIN_BLOCKS) as advance:
        if args.json:
            text = ls_json(pool, fields, progress=advance)
        else:
            text = render_grid(ls_table(pool, fields, headers=not args.no_headers,
                                        progress=advance))
    write_text(text)
    return 0
