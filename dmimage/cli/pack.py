"""``dmimage pack``: metadata to a compact pack file, interchangeable with thin_metadata_pack."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from dmimage.errors import DeviceError, UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pack", help="pack metadata into a compressed file (thin_metadata_pack 1.1 format)",
        description="Pack every metadata block with a valid checksum into a compressed file "
                    "that thin_metadata_unpack 1.1 (and dmimage unpack) restores.")
    p.add_argument("meta", metavar="META", nargs="?", help="metadata file or device")
    p.add_argument("-i", "--input", metavar="META", help="same as META (the 1.1 spelling)")
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="pack file to write (atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.thin.pack import pack_metadata

    meta = args.input or args.meta
    if meta is None:
        raise UsageError("no metadata file given")
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
            pack_metadata(meta, f)
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
    sys.stdout.flush()
    return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
