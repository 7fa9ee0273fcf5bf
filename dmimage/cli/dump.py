"""``dmimage dump``: thin-pool metadata as thin_dump 1.1 XML, human-readable text or JSON."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from dmimage.errors import DeviceError, UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dump", help="dump thin-pool metadata (XML like thin_dump 1.1, human_readable, json)",
        description="Dump thin-pool metadata. The default XML is byte-identical to thin_dump "
                    "1.1 (shared leaves as <def>/<ref>).")
    p.add_argument("meta", metavar="META", nargs="?", help="metadata file or device")
    p.add_argument("-f", "--format", dest="fmt", default="xml",
                   choices=("xml", "human_readable", "json"), help="output format (xml)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE (atomically: temporary file + rename)")
    p.add_argument("--dev-id", dest="dev_ids", metavar="N", type=_uint, action="append",
                   help="dump only this device (repeatable)")
    p.add_argument("--skip-mappings", action="store_true", help="do not dump mappings")
    p.add_argument("-m", "--metadata-snap", metavar="BLOCK", nargs="?", const=True,
                   default=False, help="read through the metadata snapshot (at BLOCK, default "
                                       "the one the superblock names)")
    p.add_argument("--expand-shared", action="store_true",
                   help="no <def>/<ref>: every device fully expanded (thin_restore 0.9 form)")
    p.set_defaults(func=run)


def _uint(s: str) -> int:
    try:
        v = int(s, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"negative: {s!r}")
    return v


def run(args: argparse.Namespace) -> int:
    from dmimage.thin.dump import dump_pool

    meta, snap = args.meta, args.metadata_snap
    if isinstance(snap, str):
        if snap.isdigit():
            snap = int(snap)
        elif meta is None:  # `-m META`: the optional BLOCK swallowed the metadata path
            meta, snap = snap, True
        else:
            raise UsageError(f"--metadata-snap: not a block number: {snap!r}")
    if meta is None:
        raise UsageError("no metadata file given")
    kwargs = dict(metadata_snap=snap, dev_ids=args.dev_ids, skip_mappings=args.skip_mappings,
                  expand=args.expand_shared)
    if args.output is None:
        out = sys.stdout.buffer
        dump_pool(meta, out, args.fmt, **kwargs)
        out.flush()
        return 0
    target = os.path.abspath(args.output)
    directory = os.path.dirname(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as exc:
        raise DeviceError(f"{args.output}: cannot create a file in {directory}: "
                          f"{exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            dump_pool(meta, f, args.fmt, **kwargs)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as exc:
        _unlink(tmp)
        raise DeviceError(f"{args.output}: {exc.strerror}") from None
    except BaseException:
        _unlink(tmp)
        raise
    return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
