"""`dmimage era ...`: dm-era metadata, offline (era_check, era_dump and era_invalidate's
verdicts and output, as thin-provisioning-tools 1.1 gives them).

Exit codes: 0 ok, 1 damaged metadata, 2 usage or I/O error. META is read under a shared lock
(docs/locking.md).
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
from dmimage.cli._output import write_text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("era", help="check, dump and query dm-era metadata", description=__doc__)
    esub = p.add_subparsers(dest="era_command", metavar="SUBCOMMAND")
    esub.required = True

    add_check(esub, run_check, help="check dm-era metadata (era_check's verdict)")
    dp = add_reader(esub, "dump", run_dump, help="dump dm-era metadata as era_dump 1.1's XML")
    dp.add_argument("--logical", action="store_true",
                    help="fold the writesets into the era array")
    iv = add_reader(esub, "invalidate", run_invalidate,
                    help="list blocks written since an era (era_invalidate's XML)",
                    description="Reads the archived writesets (checkpoint the era first) and, "
                    "for eras already folded into it, the era array.")
    iv.add_argument("--written-since", type=int, required=True, metavar="ERA")
    add_restore(esub, run_restore, what="dm-era")
    add_repair(esub, run_repair, what="dm-era", description="Keeps every writeset and era "
               "still readable and errs towards 'written' where something is lost (lost "
               "writeset bits are set, lost era-array entries get the current era), so "
               "invalidate never misses a changed block. docs/era.md lists the rules.")


def run_check(args: argparse.Namespace) -> int:
    from dmimage.era.check import check_era

    rep = check_era(args.metadata)
    if args.json:
        import json

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
    from dmimage.era.dump import era_xml_chunks
    from dmimage.era.metadata import parse_superblock, read_era
    from dmimage.pdata.block import BlockReader
    from dmimage.pdata.btree import BtreeWalker

    with BlockReader(args.metadata) as reader:
        sb = parse_superblock(reader.block(0))
        md = read_era(BtreeWalker(reader), sb)
    emit(era_xml_chunks(md, logical=args.logical), args.output)
    return 0


def run_invalidate(args: argparse.Namespace) -> int:
    from dmimage.era.invalidate import blocks_written_since, invalidate_xml
    from dmimage.era.metadata import parse_superblock
    from dmimage.pdata.block import BlockReader
    from dmimage.pdata.btree import BtreeWalker

    with BlockReader(args.metadata) as reader:
        sb = parse_superblock(reader.block(0))
        marked = blocks_written_since(BtreeWalker(reader), sb, args.written_since)
    emit(invalidate_xml(marked), args.output)
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from dmimage.era.restore import parse_xml, restore_era

    restore_era(parse_xml(args.input), args.output)
    return 0


def run_repair(args: argparse.Namespace) -> int:
    from dmimage.era.repair import repair_era

    rep = repair_era(args.input, args.output)
    report_losses(rep.losses, args.quiet)
    if not args.quiet:
        write_text(f"repaired: current era {rep.current_era}, {len(rep.eras)} writesets, "
                   f"{len(rep.losses)} losses\n")
    return 0
