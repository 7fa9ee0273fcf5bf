"""`dmimage check META`: verify thin-pool metadata (thin_check's options where they overlap)."""

from __future__ import annotations

import argparse
import sys

from dmimage.cli._locking import add_lock_plan


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="check thin-pool metadata for damage (read-only)",
                       description="Exit 0 if clean, 1 if damaged, 2 on usage or I/O errors.")
    p.add_argument("metadata", metavar="META", help="metadata file or block device")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing, only set the exit code")
    p.add_argument("--super-block-only", action="store_true", help="check the superblock only")
    p.add_argument("--skip-mappings", action="store_true",
                   help="do not walk the per-device mapping trees (nor compare space maps)")
    p.add_argument("-m", "--metadata-snap", action="store_true",
                   help="require and check the held metadata snapshot (always checked if present)")
    p.add_argument("--ignore-non-fatal-errors", action="store_true",
                   help="pass despite leaked blocks")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    p.add_argument("--clear-needs-check-flag", action="store_true",
                   help="clear NEEDS_CHECK if the check passes (rewrites the superblock only)")
    p.add_argument("--auto-repair", action="store_true",
                   help="fix leaked blocks and wrong nr_allocated, clear NEEDS_CHECK (only if "
                        "nothing fatal is wrong; space maps rewritten crash-safely)")
    add_lock_plan(p, lambda a: [(a.metadata, a.auto_repair or a.clear_needs_check_flag)])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    actions: list[str] = []
    if getattr(args, "auto_repair", False) or getattr(args, "clear_needs_check_flag", False):
        from dmimage.errors import UsageError
        from dmimage.thin.fix import fix_in_place

        if args.super_block_only or args.skip_mappings:
            raise UsageError("--auto-repair/--clear-needs-check-flag need a full check")
        from dmimage.cli import _progress

        with _progress.progress_bar("checking", unit="items", enabled=not args.quiet,
                                    min_total=_progress.MIN_MAPPINGS) as advance:
            fixed = fix_in_place(args.metadata, auto_repair=args.auto_repair,
                                 clear_needs_check_flag=args.clear_needs_check_flag,
                                 ignore_non_fatal=args.ignore_non_fatal_errors,
                                 progress=advance)
        report, actions = fixed.after, fixed.actions
    else:
        from dmimage.cli import _progress
        from dmimage.thin.check import check_metadata

        with _progress.progress_bar("checking", unit="items", enabled=not args.quiet,
                                    min_total=_progress.MIN_MAPPINGS) as advance:
            report = check_metadata(args.metadata, super_block_only=args.super_block_only,
                                    skip_mappings=args.skip_mappings,
                                    metadata_snap=args.metadata_snap, progress=advance)
    ok = report.ok(args.ignore_non_fatal_errors)
    if args.json:
        import json  # only here: a check without --json does not pay for its import

        doc = report.to_json()
        doc["ok"] = ok
        if actions:
            doc["repairs"] = actions
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        for a in actions:
            print(f"{args.metadata}: {a}", file=sys.stderr)
        for p in report.problems:
            kind = "" if p.fatal else " (non-fatal)"
            print(f"{args.metadata}: {p}{kind}", file=sys.stderr)
        if report.transaction_id is not None:
            print(f"TRANSACTION_ID={report.transaction_id}")
            print(f"METADATA_FREE_BLOCKS={report.metadata_free_blocks}")
    return 0 if ok else 1
