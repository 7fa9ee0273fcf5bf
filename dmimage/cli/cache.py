"""`dmimage cache ...`: dm-cache metadata, offline (cache_check and cache_dump's verdicts and
XML, as thin-provisioning-tools 1.1 gives them).

Exit codes: 0 ok, 1 damaged metadata, 2 usage or I/O error. The commands read META under a
shared lock (docs/locking.md).
"""

from __future__ import annotations

import argparse

from dmimage.cli._cache_era_args import (
    add_check,
    add_reader,
    add_repair,
    add_restore,
    emit,
    report_losses,
)
from dmimage.cli._locking import add_lock_plan
from dmimage.cli._output import write_text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="check and dump dm-cache metadata", description=__doc__)
    csub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    csub.required = True

    add_check(csub, run_check, help="check dm-cache metadata (cache_check's verdict)",
              description="The superblock, the mapping, dirty, hint and discard arrays, and "
              "the metadata space map against every reference. Exit 0 clean, 1 damaged, 2 "
              "usage or I/O error.")
    add_reader(csub, "dump", run_dump, help="dump dm-cache metadata as cache_dump 1.1's XML")
    rs = add_restore(csub, run_restore, what="dm-cache")
    rs.add_argument("--metadata-version", type=int, choices=(1, 2), default=2)
    rs.add_argument("--omit-clean-shutdown", action="store_true",
                    help="do not set the clean-shutdown flag")
    add_repair(csub, run_repair, what="dm-cache", description="Keeps every mapping, hint "
               "and dirty bit still readable (cache_repair 1.1 gives up on any damaged "
               "mapping or hint array block); lost dirty bits count as dirty; mappings no "
               "check would pass are dropped. docs/cache.md lists the rules.")

    ms = csub.add_parser("metadata-size", help="estimate the metadata size for a cache "
                         "(cache_metadata_size 1.1's answers)")
    ms.add_argument("--block-size", type=_size, metavar="SIZE[bskmg]",
                    help="cache block size (default unit: sectors)")
    ms.add_argument("--device-size", type=_size, metavar="SIZE[bskmgtp]",
                    help="size of the fast device")
    ms.add_argument("--nr-blocks", type=int, metavar="NUM", help="number of cache blocks")
    ms.add_argument("--max-hint-width", type=int, default=4, metavar="BYTES")
    ms.add_argument("-u", "--unit", default="sector", metavar="UNIT",
                    help="output unit in {bskKmMgG} (default: sector)")
    ms.add_argument("-n", "--numeric-only", nargs="?", const="plain",
                    choices=("short", "long", "plain"), metavar="OPT",
                    help="print the number only (=short: with the unit letter, =long: with the "
                    "unit name)")
    ms.set_defaults(func=run_metadata_size)

    wb = csub.add_parser("writeback", help="copy dirty cache blocks to the origin, offline",
                         description="The rescue before a cache device is removed: every dirty "
                         "block is copied from FAST to ORIGIN, ORIGIN is flushed, then the "
                         "copied blocks' dirty bits are cleared in META, as cache_writeback "
                         "does (a transaction: new blocks, a flush, the superblock last).")
    wb.add_argument("metadata", metavar="META")
    wb.add_argument("fast", metavar="FAST", help="the cache (fast) device")
    wb.add_argument("origin", metavar="ORIGIN", help="the origin (slow) device")
    wb.add_argument("--dry-run", action="store_true", help="count the dirty blocks only")
    wb.add_argument("--no-metadata-update", action="store_true",
                    help="leave META as it is (the blocks stay dirty: activated again, the "
                    "kernel would write the same data back)")
    add_lock_plan(wb, lambda a: [(a.metadata, not (a.dry_run or a.no_metadata_update)),
                                 (a.fast, False), (a.origin, not a.dry_run)])
    wb.set_defaults(func=run_writeback)


def _size(text: str) -> int:
    from dmimage.errors import UsageError
    from dmimage.thin.metadata_size import parse_size

    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_restore(args: argparse.Namespace) -> int:
    from dmimage.cache.restore import parse_xml, restore_cache

    ir = parse_xml(args.input)
    restore_cache(ir, args.output, version=args.metadata_version,
                  clean_shutdown=not args.omit_clean_shutdown)
    return 0


def run_metadata_size(args: argparse.Namespace) -> int:
    from dmimage.cache.metadata_size import metadata_size, nr_cache_blocks
    from dmimage.errors import UsageError
    from dmimage.thin.metadata_size import format_size, parse_unit

    if args.nr_blocks is not None:
        if args.block_size is not None or args.device_size is not None:
            raise UsageError("--nr-blocks conflicts with --block-size and --device-size")
        n = args.nr_blocks
    elif args.block_size is not None and args.device_size is not None:
        n = nr_cache_blocks(args.device_size, args.block_size)
    else:
        raise UsageError("Please specify either --device-size and --block-size, or --nr-blocks.")
    write_text(format_size(metadata_size(n, args.max_hint_width), parse_unit(args.unit),
                           args.numeric_only) + "\n")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from dmimage.cache.quick_check import quick_check

    rep = quick_check(args.metadata)  # clean, proved without numpy; else the full checker's
    if rep is None:
        from dmimage.cache.check import check_cache

        rep = check_cache(args.metadata)
    if args.json:
        import json

        write_text(json.dumps({"version": rep.version, "mappings": rep.nr_mappings,
                               "dirty": rep.nr_dirty, "metadata_used": rep.metadata_used,
                               "metadata_total": rep.metadata_total, "problems": rep.problems,
                               "leaked_metadata_blocks": rep.leaked_metadata_blocks},
                              indent=2) + "\n")
    elif not args.quiet:
        lines = [f"problem: {p}" for p in rep.problems]
        lines.append(f"version {rep.version}, {rep.nr_mappings} mappings, {rep.nr_dirty} dirty: "
                     + ("clean" if rep.ok else f"{len(rep.problems)} problems"))
        write_text("\n".join(lines) + "\n")
    return 0 if rep.ok else 1


def run_dump(args: argparse.Namespace) -> int:
    from dmimage.cache.dump import cache_xml_chunks
    from dmimage.cache.metadata import read_cache
    from dmimage.pdata.block import BlockReader

    with BlockReader(args.metadata) as reader:
        md = read_cache(reader)
    emit(cache_xml_chunks(md), args.output)
    return 0


def run_repair(args: argparse.Namespace) -> int:
    from dmimage.cache.repair import repair_cache

    rep = repair_cache(args.input, args.output)
    report_losses(rep.losses, args.quiet)
    if not args.quiet:
        write_text(f"repaired: version {rep.version}, {rep.nr_mappings} mappings, "
                   f"{rep.nr_dirty} dirty, {rep.metadata_blocks} metadata blocks, "
                   f"{len(rep.losses)} losses\n")
    return 0


def run_writeback(args: argparse.Namespace) -> int:
    import os

    from dmimage.cache.clear_dirty import clear_dirty, open_metadata_rw
    from dmimage.cache.metadata import read_cache
    from dmimage.cache.writeback import dirty_blocks, writeback
    from dmimage.cli._progress import progress_bar
    from dmimage.errors import DeviceError
    from dmimage.pdata.block import BlockReader

    with BlockReader(args.metadata) as reader:
        md = read_cache(reader)
    if args.dry_run:
        n = len(dirty_blocks(md)[0])
        write_text(f"{n} dirty blocks of {md.sb.data_block_size} sectors would be copied\n")
        return 0
    fds = []
    try:
        for path, mode in ((args.fast, os.O_RDONLY), (args.origin, os.O_RDWR)):
            try:
                fds.append(os.open(path, mode | os.O_CLOEXEC))
            except OSError as exc:
                raise DeviceError(f"{path}: {exc.strerror}") from None
        with progress_bar("writeback") as advance:
            n = writeback(md, fds[0], args.fast, fds[1], args.origin, advance)
        if not args.no_metadata_update and n:
            fds.append(open_metadata_rw(args.metadata))
            clear_dirty(args.metadata, fds[2], md, dirty_blocks(md)[0])
    finally:
        for fd in fds:
            os.close(fd)
    cleared = "" if args.no_metadata_update or not n else "; their dirty bits cleared"
    write_text(f"copied {n} dirty blocks to {args.origin}{cleared}\n")
    return 0
