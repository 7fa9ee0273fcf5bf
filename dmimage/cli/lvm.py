"""`dmimage lvm ...`: LVM volume groups inside disk images, offline (no lvm2, no root).

Every subcommand takes one or more DISK arguments: whole disk images (GPT or MBR), bare PVs,
partitions or block devices. Exit codes: 0 ok, 1 damage or problems found, 2 usage or I/O.
Readers hold a shared lock on every DISK, writers an exclusive one (O_EXCL on block devices)
from before the first read to the last write; see docs/locking.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from dmimage.cli._locking import add_lock_plan
from dmimage.errors import DmimageError

if TYPE_CHECKING:
    from dmimage.lvm.model import LogicalVolume
    from dmimage.lvm.vg import LoadedVG


def _readers(args: argparse.Namespace) -> list[tuple[str | None, bool]]:
    return [(d, False) for d in args.disks]


def _writers(args: argparse.Namespace) -> list[tuple[str | None, bool]]:
    """Every DISK exclusively: a new generation goes to the metadata areas of every PV, and
    ``_tmeta`` extents may lie on any of them. Shared on --dry-run."""
    return [(d, not args.dry_run) for d in args.disks]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lvm", help="read, check, export and fix LVM volume groups offline",
                       description=__doc__)
    lsub = p.add_subparsers(dest="lvm_command", metavar="SUBCOMMAND")
    lsub.required = True

    ls = lsub.add_parser("ls", help="list LVs as lvs would",
                         description="--json prints lvs's JSON report shape "
                         "(lvs --reportformat json --units b --nosuffix).")
    ls.add_argument("disks", metavar="DISK", nargs="+")
    ls.add_argument("--json", action="store_true", help="lvs's JSON report shape")
    ls.add_argument("-a", "--all", action="store_true", help="include hidden LVs, in brackets")
    ls.add_argument("--tree", action="store_true", help="draw the thin snapshot lineage")
    add_lock_plan(ls, _readers)
    ls.set_defaults(func=_one_line_errors(run_ls))

    ck = lsub.add_parser("check", help="check labels, checksums, the VG and every thin pool",
                         description="Exit 0 if clean, 1 if problems were found (each named "
                         "with both sides' values), 2 on usage or I/O errors.")
    ck.add_argument("disks", metavar="DISK", nargs="+")
    ck.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    ck.add_argument("-q", "--quiet", action="store_true", help="only set the exit code")
    add_lock_plan(ck, _readers)
    ck.set_defaults(func=_one_line_errors(run_check))

    ex = lsub.add_parser("export", help="write one LV's bytes to a file (sparse)",
                         description="Linear and striped LVs are read from their extents; "
                         "thin LVs through their pool.")
    ex.add_argument("disks", metavar="DISK", nargs="+")
    ex.add_argument("lv", metavar="VG/LV")
    ex.add_argument("-o", "--output", required=True, help="output file, or - for stdout")
    add_lock_plan(ex, _readers)
    ex.set_defaults(func=_one_line_errors(run_export))

    dp = lsub.add_parser("dump", help="dump a thin pool's metadata (as dmimage dump)")
    dp.add_argument("disks", metavar="DISK", nargs="+")
    dp.add_argument("lv", metavar="VG/POOL")
    dp.add_argument("-f", "--format", dest="fmt", default="xml",
                    choices=("xml", "human_readable", "json"), help="output format (xml)")
    dp.add_argument("-o", "--output", metavar="FILE", help="output file (default stdout)")
    add_lock_plan(dp, _readers)
    dp.set_defaults(func=_one_line_errors(run_dump))

    md = lsub.add_parser("metadata", help="print the committed VG metadata text",
                         description="The text of the newest generation that checks, as "
                         "vgcfgbackup would save it (vgcfgrestore -f accepts it).")
    md.add_argument("disks", metavar="DISK", nargs="+")
    md.add_argument("--vg", help="the VG to print when the disks hold several")
    md.add_argument("-o", "--output", metavar="FILE", help="output file (default stdout)")
    add_lock_plan(md, _readers)
    md.set_defaults(func=_one_line_errors(run_metadata))

    fx = lsub.add_parser(
        "set-transaction-id",
        help="fix a thin pool's transaction_id mismatch offline",
        description="--side vg (default) writes a new VG metadata generation (seqno + 1, "
        "every metadata area, headers last after a flush) whose pool transaction_id is the "
        "superblock's; --side pool rewrites the pool superblock's transaction id to the VG's. "
        "--to N sets that value instead. Nothing else changes.")
    fx.add_argument("disks", metavar="DISK", nargs="+")
    fx.add_argument("lv", metavar="VG/POOL")
    fx.add_argument("--side", choices=("vg", "pool"), default="vg",
                    help="which side to change (vg)")
    fx.add_argument("--to", type=int, metavar="N", help="the new value (default: the other "
                    "side's)")
    fx.add_argument("--dry-run", action="store_true", help="print the change, write nothing")
    add_lock_plan(fx, _writers)
    fx.set_defaults(func=_one_line_errors(run_set_transaction_id))

    do = lsub.add_parser(
        "delete-orphans", help="delete pool devices that no thin LV names",
        description="Runs the deletes through the offline writer on a copy of the pool's "
        "metadata, then writes the changed blocks back into the _tmeta extents, the "
        "superblock last after a flush. The VG metadata does not change.")
    do.add_argument("disks", metavar="DISK", nargs="+")
    do.add_argument("lv", metavar="VG/POOL")
    do.add_argument("--dry-run", action="store_true", help="print the deletes, write nothing")
    add_lock_plan(do, _writers)
    do.set_defaults(func=_one_line_errors(run_delete_orphans))


class _EscapedError(DmimageError):
    """An error whose message held characters that would break its line (escaped)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _one_line_errors(run: Callable[[argparse.Namespace], int]
                     ) -> Callable[[argparse.Namespace], int]:
    """Errors naming an LV or VG read from the disk print as one line, escaped."""
    def wrapper(args: argparse.Namespace) -> int:
        from dmimage.lvm.report import one_line

        try:
            return run(args)
        except DmimageError as exc:
            msg = str(exc)
            if one_line(msg) != msg:
                raise _EscapedError(one_line(msg), exc.exit_code) from None
            raise
    return wrapper


def _split(name: str) -> tuple[str | None, str]:
    from dmimage.errors import UsageError

    if name.count("/") > 1 or not name.strip("/"):
        raise UsageError(f"{name!r}: give VG/LV (or LV when there is one VG)")
    vg, _, lv = name.rpartition("/")
    return (vg or None), lv


def _target(disks: list[str], name: str) -> tuple[LoadedVG, LogicalVolume]:
    from dmimage.errors import UsageError
    from dmimage.lvm.vg import find_vg, load_vgs

    vgname, lvname = _split(name)
    loaded, _, problems = load_vgs(disks)
    lvg = find_vg(loaded, vgname, problems)
    lv = lvg.vg.lv(lvname)
    if lv is None:
        raise UsageError(f"VG {lvg.vg.name} has no LV {lvname!r}")
    return lvg, lv


def _partial(lvg: LoadedVG) -> set[str]:
    from dmimage.lvm.model import StripedSegment

    missing = {pv.name for pv in lvg.missing}
    return {lv.name for lv in lvg.vg.lvs
            if any(isinstance(s, StripedSegment) and any(p in missing for p, _ in s.stripes)
                   for s in lv.segments)}


def run_ls(args: argparse.Namespace) -> int:
    from dmimage.lvm.report import lineage, lv_rows, one_line
    from dmimage.lvm.vg import NoVolumeGroupError, load_vgs

    loaded, _, problems = load_vgs(args.disks)
    if not loaded:
        raise NoVolumeGroupError("no LVM volume group found on " + ", ".join(args.disks)
                                 + ("" if not problems else f" ({problems[0]})"))
    rows = [r for lvg in loaded for r in lv_rows(lvg.vg, args.all, _partial(lvg))]
    for lvg in loaded:
        for p in lvg.problems:
            print(f"dmimage lvm ls: warning: {one_line(p)}", file=sys.stderr)
    if args.json:
        sys.stdout.write(_lvs_json(rows))
    elif args.tree:
        for lvg in loaded:
            for line in lineage(lvg.vg):
                print(one_line(line))
    else:
        cols = ("lv_name", "vg_name", "lv_attr", "lv_size", "pool_lv", "origin", "segtype")
        heads = ("LV", "VG", "Attr", "Bytes", "Pool", "Origin", "Type")
        table = [heads] + [tuple(one_line(r[c]) for c in cols) for r in rows]
        widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
        for t in table:
            print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())
    return 0


def _lvs_json(rows: list[dict[str, str]]) -> str:
    """The report laid out as lvs lays it out: one row per line (and fast for 2,000 LVs)."""
    enc = json.JSONEncoder(separators=(", ", ":"), ensure_ascii=False).encode
    body = ",\n".join("                " + enc(r) for r in rows)
    return ("{\n    \"report\": [\n        {\n            \"lv\": [\n" + body
            + ("\n" if rows else "") + "            ]\n        }\n    ]\n}\n")


def run_check(args: argparse.Namespace) -> int:
    from dmimage.lvm.check import check_lvm
    from dmimage.lvm.report import one_line

    report = check_lvm(args.disks)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        for p in report.problems:
            print(one_line(p), file=sys.stderr)
        for n in report.notes:
            print(one_line(n))
        for st in report.pools:
            print(f"{one_line(st.vg)}/{one_line(st.pool)}: transaction_id VG "
                  f"{st.vg_transaction_id}, superblock {st.sb_transaction_id}; "
                  f"devices {st.devices}")
    return 0 if report.ok else 1


def run_export(args: argparse.Namespace) -> int:
    from dmimage.lvm.export import export_lv

    lvg, lv = _target(args.disks, args.lv)
    export_lv(lvg, lv, sys.stdout.buffer if args.output == "-" else args.output)
    return 0


def run_dump(args: argparse.Namespace) -> int:
    from dmimage.cli._output import atomic_output
    from dmimage.lvm.thin import open_lv_pool, pool_segment
    from dmimage.thin.dump import pool_to_ir, write_dump

    lvg, lv = _target(args.disks, args.lv)
    pool_segment(lv)
    with open_lv_pool(lvg, lv) as pool:
        ir = pool_to_ir(pool, dev_ids=None, skip_mappings=False, share=True)
    if args.output:
        with atomic_output(args.output) as f:
            write_dump(ir, f, args.fmt)
    else:
        write_dump(ir, sys.stdout.buffer, args.fmt)
        sys.stdout.buffer.flush()
    return 0


def run_metadata(args: argparse.Namespace) -> int:
    from dmimage.cli._output import atomic_output
    from dmimage.lvm.vg import find_vg, load_vgs

    loaded, _, problems = load_vgs(args.disks)
    lvg = find_vg(loaded, args.vg, problems)
    text = lvg.text.rstrip(b"\0")
    if args.output:
        with atomic_output(args.output) as f:
            f.write(text)
    else:
        sys.stdout.buffer.write(text)
        sys.stdout.buffer.flush()
    return 0


def run_set_transaction_id(args: argparse.Namespace) -> int:
    from dmimage.lvm.fix import set_transaction_id
    from dmimage.lvm.report import one_line

    lvg, lv = _target(args.disks, args.lv)
    for line in set_transaction_id(lvg, lv, side=args.side, to=args.to, dry_run=args.dry_run):
        print(one_line(line))
    return 0


def run_delete_orphans(args: argparse.Namespace) -> int:
    from dmimage.lvm.orphans import delete_orphans
    from dmimage.lvm.report import one_line

    lvg, lv = _target(args.disks, args.lv)
    for line in delete_orphans(lvg, lv, dry_run=args.dry_run):
        print(one_line(line))
    return 0
