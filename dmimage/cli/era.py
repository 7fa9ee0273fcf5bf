"""`dmimage era ...`: dm-era metadata, offline (era_check, era_dump and era_invalidate's
verdicts and output, as thin-provisioning-tools 1.1 gives them).

Exit codes: 0 ok, 1 damaged metadata, 2 usage or I/O error. META is read under a shared lock
(docs/locking.md).
"""

from __future__ import annotations

import argparse
import json

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._output import atomic_output, write_text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("era", help="check, dump and query dm-era metadata", description=__doc__)
    esub = p.add_subparsers(dest="era_command", metavar="SUBCOMMAND")
    esub.required = True

    ck = esub.add_parser("check", help="check dm-era metadata (era_check's verdict)")
    ck.add_argument("metadata", metavar="META")
    ck.add_argument("--json", action="store_true", help="print a JSON report")
    ck.add_argument("-q", "--quiet", action="store_true", help="only set the exit code")
    add_lock_plan(ck, lambda a: [(a.metadata, False)])
    ck.set_defaults(func=run_check)

    dp = esub.add_parser("dump", help="dump dm-era metadata as era_dump 1.1's XML")
    dp.add_argument("metadata", metavar="META")
    dp.add_argument("--logical", action="store_true",
                    help="fold the writesets into the era array")
    dp.add_argument("-o", "--output", help="write to FILE (atomically) instead of stdout")
    add_lock_plan(dp, lambda a: [(a.metadata, False)])
    dp.set_defaults(func=run_dump)

    iv = esub.add_parser("invalidate", help="list blocks written since an era "
                         "(era_invalidate's XML)",
                         description="Reads the archived writesets (checkpoint the era first) "
                         "and, for eras already folded into it, the era array.")
    iv.add_argument("metadata", metavar="META")
    iv.add_argument("--written-since", type=int, required=True, metavar="ERA")
    iv.add_argument("-o", "--output", help="write to FILE (atomically) instead of stdout")
    add_lock_plan(iv, lambda a: [(a.metadata, False)])
    iv.set_defaults(func=run_invalidate)

    rs = esub.add_parser("restore", help="write dm-era metadata from era_dump's XML",
                         description="Writes onto an existing file or device (never grown); "
                         "block 0 is zeroed first and the superblock written last, after a "
                         "flush. Exit 1 on invalid XML, 2 on usage or I/O errors.")
    rs.add_argument("-i", "--input", required=True, help="the XML")
    rs.add_argument("-o", "--output", required=True, help="the metadata file or device")
    add_lock_plan(rs, lambda a: [(a.output, True)])
    rs.set_defaults(func=run_restore)


def _emit(data: str | bytes, output: str | None) -> None:
    raw = data.encode() if isinstance(data, str) else data
    if output:
        with atomic_output(output) as f:
            f.write(raw)
    else:
        import sys

        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()


def run_check(args: argparse.Namespace) -> int:
    from dmimage.era.check import check_era

    rep = check_era(args.metadata)
    if args.json:
        write_text(json.dumps({"current_era": rep.current_era, "nr_blocks": rep.nr_blocks,
                               "archived_eras": rep.archived_eras, "problems": rep.problems},
                              indent=2) + "\n")
    elif not args.quiet:
        lines = [f"problem: {p}" for p in rep.problems]
        lines.append(f"current era {rep.current_era}, {rep.nr_blocks} blocks, "
                     f"{len(rep.archived_eras)} archived writesets: "
                     + ("clean" if rep.ok else f"{len(rep.problems)} problems"))
        write_text("\n".join(lines) + "\n")
    return 0 if rep.ok else 1


def run_dump(args: argparse.Namespace) -> int:
    from dmimage.era.dump import era_xml
    from dmimage.era.metadata import parse_superblock, read_era
    from dmimage.pdata.block import BlockReader
    from dmimage.pdata.btree import BtreeWalker

    with BlockReader(args.metadata) as reader:
        sb = parse_superblock(reader.block(0))
        text = era_xml(read_era(BtreeWalker(reader), sb), logical=args.logical)
    _emit(text, args.output)
    return 0


def run_invalidate(args: argparse.Namespace) -> int:
    from dmimage.era.invalidate import blocks_written_since, invalidate_xml
    from dmimage.era.metadata import parse_superblock
    from dmimage.pdata.block import BlockReader
    from dmimage.pdata.btree import BtreeWalker

    with BlockReader(args.metadata) as reader:
        sb = parse_superblock(reader.block(0))
        marked = blocks_written_since(BtreeWalker(reader), sb, args.written_since)
    _emit(invalidate_xml(marked), args.output)
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from dmimage.era.restore import parse_xml, restore_era

    restore_era(parse_xml(args.input), args.output)
    return 0
