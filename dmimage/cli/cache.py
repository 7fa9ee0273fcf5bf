"""`dmimage cache ...`: dm-cache metadata, offline (cache_check and cache_dump's verdicts and
XML, as thin-provisioning-tools 1.1 gives them).

Exit codes: 0 ok, 1 damaged metadata, 2 usage or I/O error. The commands read META under a
shared lock (docs/locking.md).
"""

from __future__ import annotations

import argparse
import json

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._output import atomic_output, write_text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="check and dump dm-cache metadata", description=__doc__)
    csub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    csub.required = True

    ck = csub.add_parser("check", help="check dm-cache metadata (cache_check's verdict)",
                         description="The superblock, the mapping, dirty, hint and discard "
                         "arrays, and the metadata space map against every reference. Exit 0 "
                         "clean, 1 damaged, 2 usage or I/O error.")
    ck.add_argument("metadata", metavar="META")
    ck.add_argument("--json", action="store_true", help="print a JSON report")
    ck.add_argument("-q", "--quiet", action="store_true", help="only set the exit code")
    add_lock_plan(ck, lambda a: [(a.metadata, False)])
    ck.set_defaults(func=run_check)

    dp = csub.add_parser("dump", help="dump dm-cache metadata as cache_dump 1.1's XML")
    dp.add_argument("metadata", metavar="META")
    dp.add_argument("-o", "--output", help="write to FILE (atomically) instead of stdout")
    add_lock_plan(dp, lambda a: [(a.metadata, False)])
    dp.set_defaults(func=run_dump)

    wb = csub.add_parser("writeback", help="copy dirty cache blocks to the origin, offline",
                         description="The rescue before a cache device is removed: every dirty "
                         "block is copied from FAST to ORIGIN, then ORIGIN is flushed. The "
                         "metadata is not changed (cache_writeback --no-metadata-update): "
                         "activated again, the kernel would only write the same data back.")
    wb.add_argument("metadata", metavar="META")
    wb.add_argument("fast", metavar="FAST", help="the cache (fast) device")
    wb.add_argument("origin", metavar="ORIGIN", help="the origin (slow) device")
    wb.add_argument("--dry-run", action="store_true", help="count the dirty blocks only")
    add_lock_plan(wb, lambda a: [(a.metadata, False), (a.fast, False),
                                 (a.origin, not a.dry_run)])
    wb.set_defaults(func=run_writeback)


def run_check(args: argparse.Namespace) -> int:
    from dmimage.cache.check import check_cache

    rep = check_cache(args.metadata)
    if args.json:
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
    from dmimage.cache.dump import cache_xml
    from dmimage.cache.metadata import read_cache
    from dmimage.pdata.block import BlockReader

    with BlockReader(args.metadata) as reader:
        text = cache_xml(read_cache(reader))
    if args.output:
        with atomic_output(args.output) as f:
            f.write(text.encode())
    else:
        write_text(text)
    return 0


def run_writeback(args: argparse.Namespace) -> int:
    import os

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
    finally:
        for fd in fds:
            os.close(fd)
    write_text(f"copied {n} dirty blocks to {args.origin}\n")
    return 0
