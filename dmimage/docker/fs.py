"""The filesystem on a Docker device, read with dissect.extfs or dissect.xfs (``dm.fs``: ext4
or xfs), found by its magic number; and the few inode fields the two readers name
differently."""

from __future__ import annotations

import io
from typing import Any

EXT_MAGIC_OFFSET = 1024 + 0x38
EXT_MAGIC = b"\x53\xef"
XFS_MAGIC = b"XFSB"


class NotAFilesystem(ValueError):
    """Neither ext2/3/4 nor xfs."""


def open_filesystem(fh: io.RawIOBase) -> Any:
    """An ExtFS or XFS object (both have ``get(path)`` returning nodes with ``listdir``,
    ``open``, ``size``, ``mtime_ns``, ``link``)."""
    fh.seek(0)
    head = fh.read(EXT_MAGIC_OFFSET + 2)
    if head[:4] == XFS_MAGIC:
        from dissect.xfs import XFS

        return XFS(fh)
    if head[EXT_MAGIC_OFFSET:EXT_MAGIC_OFFSET + 2] == EXT_MAGIC:
        from dissect.extfs import ExtFS

        return ExtFS(fh)
    raise NotAFilesystem("neither ext4 nor xfs")


def owner_mode(node: Any) -> tuple[int, int, int]:
    """(mode with file type, uid, gid) of an ext or xfs node."""
    i = node.inode
    if hasattr(i, "di_mode"):
        return int(i.di_mode), int(i.di_uid), int(i.di_gid)
    uid = int(i.i_uid) | (int(getattr(getattr(i, "osd2", None), "l_i_uid_high", 0) or 0) << 16)
    gid = int(i.i_gid) | (int(getattr(getattr(i, "osd2", None), "l_i_gid_high", 0) or 0) << 16)
    return int(i.i_mode), uid, gid
