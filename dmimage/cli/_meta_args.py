"""The ``META`` argument and ``-m [BLOCK]`` of the commands that can read a pool through its held
metadata snapshot (dump, ls, delta, rmap): one spelling, one help text, one way to untangle
``-m META``."""

from __future__ import annotations

import argparse

from dmimage.errors import UsageError


def add_metadata_snap(p: argparse.ArgumentParser) -> None:
    """``-m [BLOCK]``: read through the held metadata snapshot."""
    p.add_argument("-m", "--metadata-snap", metavar="BLOCK", nargs="?", const=True,
                   default=False, help="read through the metadata snapshot (at BLOCK, default "
                                       "the one the superblock names)")


def resolve_meta(meta: str | None, snap: bool | str) -> tuple[str, bool | int]:
    """Untangle ``-m META`` (the optional BLOCK swallowing the path) and parse BLOCK."""
    if isinstance(snap, str):
        if snap.isdigit():
            snap_v: bool | int = int(snap)
        elif meta is None:
            meta, snap_v = snap, True
        else:
            raise UsageError(f"--metadata-snap: not a block number: {snap!r}")
    else:
        snap_v = snap
    if meta is None:
        raise UsageError("no metadata file given")
    return meta, snap_v
