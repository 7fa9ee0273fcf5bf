"""``dmimage trim``: discard the unprovisioned space of a pool's data device (like thin_trim)."""

from __future__ import annotations

import argparse

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._output import write_text
from dmimage.errors import UsageError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "trim", help="discard unprovisioned data blocks (like thin_trim 1.1)",
        description="Discard every data range whose data-space-map count is 0: BLKDISCARD on "
                    "a block device, hole punching on a regular file. The metadata is checked "
                    "first; provisioned blocks are never touched.")
    p.add_argument("meta", metavar="META", nargs="?", help="metadata file or device")
    p.add_argument("data", metavar="DATA", nargs="?", help="data file or device")
    p.add_argument("--metadata-dev", metavar="FILE", help="same as META (thin_trim's spelling)")
    p.add_argument("--data-dev", metavar="FILE", help="same as DATA (thin_trim's spelling)")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="only print the ranges that would be discarded")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    add_lock_plan(p, _lock_plan)
    p.set_defaults(func=run)


def _paths(args: argparse.Namespace) -> tuple[str | None, str | None]:
    meta = args.metadata_dev or args.meta
    data = args.data_dev or args.data
    if args.metadata_dev and args.meta and not args.data:
        data = data or args.meta
    return meta, data


def _lock_plan(args: argparse.Namespace) -> list[tuple[str | None, bool]]:
    meta, data = _paths(args)
    return [(meta, False), (data, not args.dry_run)]


def run(args: argparse.Namespace) -> int:
    from dmimage.cli import _progress
    from dmimage.thin.trim import check_before_trim, trim_data

    meta, data = _paths(args)
    if meta is None or data is None:
        raise UsageError("need the metadata and the data device (META DATA)")
    # the check, then the discards, each with its own bar; main() holds both files' locks
    # across the two, as trim_data's own check would
    with _progress.progress_bar("checking", unit="items", enabled=not args.quiet,
                                min_total=_progress.MIN_MAPPINGS) as advance:
        check_before_trim(meta, advance)
    with _progress.progress_bar("discarding", unit="items", enabled=not args.quiet,
                                min_total=_progress.MIN_RANGES) as advance:
        ranges = trim_data(meta, data, dry_run=args.dry_run, check=False, progress=advance)
    if not args.quiet:
        verb = "would discard" if args.dry_run else "discarded"
        lines = [f"{verb} data blocks {r.begin}..{r.end} (bytes {r.offset}+{r.length})\n"
                 for r in ranges]
        total = sum(r.end - r.begin for r in ranges)
        lines.append(f"{len(ranges)} ranges, {total} blocks\n")
        write_text("".join(lines))
    return 0
