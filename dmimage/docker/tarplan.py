"""Where each byte of a rebuilt layer tar comes from, worked out before any file byte is read.

The filesystem reader (dissect.extfs or dissect.xfs) is asked only for each file's runs of
filesystem blocks; the thin mapping turns those into byte ranges of the pool's data file, all
at once with numpy (:meth:`ThinFile.locate`). The result is a list of pieces in tar order:
literal bytes (tar-split's headers and padding, and the content of small inline files), zeros
(holes) and data file ranges, which :mod:`dmimage.docker.tarcopy` reads in large runs. The
per-file Python work (a directory lookup and an inode) happens here once, not per chunk of
file data."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from dissect.util.stream import RunlistStream

from dmimage.docker.errors import StoreError
from dmimage.docker.ext4runs import Ext4Files, Runs, rel_path
from dmimage.docker.tarsplit import SEGMENT_TYPE, Entry
from dmimage.docker.thinfile import ThinFile
from dmimage.errors import DeviceError

# A piece: (length, source) with source bytes (literal), None (zeros) or an int (an offset
# in the pool's data file).
Piece = tuple[int, "bytes | int | None"]


@dataclass(slots=True)
class Plan:
    size: int
    pieces: list[Piece]
    files: int  # file entries with content, for the record

    def data_ranges(self) -> list[tuple[int, int]]:
        """The data file ranges the plan reads, sorted and merged (what a plain read of "the
        same bytes" reads: the benchmark's baseline)."""
        rs = sorted((s, n) for n, s in self.pieces if isinstance(s, int))
        out: list[tuple[int, int]] = []
        for s, n in rs:
            if out and out[-1][0] + out[-1][1] >= s:
                ps, pn = out[-1]
                out[-1] = (ps, max(pn, s + n - ps))
            else:
                out.append((s, n))
        return out


def plan_layer(entries: list[Entry], thin: ThinFile, lookup: Callable[[str], Any],
               *, where: str, device_id: int, ext4: Ext4Files | None = None) -> Plan:
    """The pieces of the layer tar *entries* rebuild, file contents taken from the layer's
    filesystem (read through *thin*): through *ext4* for all files at once where it can,
    else one by one with *lookup*, which maps a path below the layer's root to the
    filesystem's node. A file
    tar-split names that is missing, not a regular file or shorter than tar-split says is a
    StoreError naming it, as the streaming reader reported it."""
    files = [e for e in entries if e.type != SEGMENT_TYPE and e.size]
    fast: list[tuple[int, Runs] | None] = [None] * len(files)
    if ext4 is not None:
        try:
            fast = ext4.contents([rel_path(e.name) for e in files])
        except Exception:  # damaged tables, or a dissect.extfs whose internals moved:
            fast = [None] * len(files)  # each file through the reader on its own
    # items: bytes (literal), int n >= 0 (n zeros), or -(k + 1) for device range k
    items: list[bytes | int] = []
    dev_starts: list[int] = []
    dev_lens: list[int] = []
    j = 0
    for e in entries:
        if e.type == SEGMENT_TYPE:
            if e.payload:
                items.append(e.payload)
            continue
        if e.size == 0:
            continue
        got = fast[j]
        j += 1
        content = got if got is not None else _one_file(e, thin, lookup, where, device_id)
        if isinstance(content, bytes):
            items.append(content)
            continue
        have, runs = content
        if have < e.size:
            raise StoreError(where, f"{e.name.decode(errors='replace')}: the layer's file "
                             f"is {have} bytes, tar-split says {e.size}")
        left = e.size
        for dev, n in runs:
            n = min(n, left)
            if dev is None:
                items.append(n)
            else:
                items.append(-(len(dev_starts) + 1))
                dev_starts.append(dev)
                dev_lens.append(n)
            left -= n
            if not left:
                break
        if left:
            raise StoreError(where, f"{e.name.decode(errors='replace')}: the layer's "
                             f"file is {e.size - left} bytes, tar-split says {e.size}")
    try:
        which, lens, srcs = thin.locate(np.array(dev_starts, np.int64),
                                        np.array(dev_lens, np.int64))
    except DeviceError as exc:
        raise StoreError(where, f"device {device_id}: {exc}") from None
    # pieces of device range k: first[k] .. first[k + 1]
    first = np.searchsorted(which, np.arange(len(dev_starts) + 1)).tolist()
    lens_l = lens.tolist()
    srcs_l = srcs.tolist()
    pieces: list[Piece] = []
    size = 0
    lit: list[bytes] = []  # literal items in a row (padding, then the next header): one piece
    for it in items:
        if isinstance(it, bytes):
            if it:
                lit.append(it)
            continue
        if lit:
            b = lit[0] if len(lit) == 1 else b"".join(lit)
            pieces.append((len(b), b))
            size += len(b)
            lit = []
        if it >= 0:
            if it:
                pieces.append((it, None))
                size += it
        else:
            k = -it - 1
            for p in range(first[k], first[k + 1]):
                n, s = lens_l[p], srcs_l[p]
                src = None if s < 0 else s
                last = pieces[-1] if pieces else None
                if last is not None and src is not None and isinstance(last[1], int) \
                        and last[1] + last[0] == src:
                    pieces[-1] = (last[0] + n, last[1])  # contiguous: one read
                else:
                    pieces.append((n, src))
                size += n
    if lit:
        b = b"".join(lit)
        pieces.append((len(b), b))
        size += len(b)
    return Plan(size, pieces, len(files))


def _one_file(e: Entry, thin: ThinFile, lookup: Callable[[str], Any], where: str,
              device_id: int) -> tuple[int, Runs] | bytes:
    """A file's (size, runs) through the filesystem reader's own stream (its run list when
    it reads through *thin*), or its bytes (inline data, other streams)."""
    rel = posixpath.normpath(e.name.decode("utf-8", "surrogateescape")).lstrip("/")
    try:
        stream = lookup(rel).open()
    except Exception:  # a missing path, or one that is not a regular file
        raise StoreError(where, f"{rel}: named by tar-split but not a file in the layer's "
                         f"filesystem (device {device_id})") from None
    have = getattr(stream, "size", None)
    if isinstance(stream, RunlistStream) and getattr(stream, "_fh", None) is thin:
        bs = stream.block_size
        runs = [(None if blk is None else blk * bs, count * bs)
                for blk, count in stream.runlist]
        return (e.size if have is None else have), runs
    try:
        data: bytes = stream.read(e.size)
    except (OSError, DeviceError) as exc:
        raise StoreError(where, f"{rel}: cannot read it ({exc})") from None
    if len(data) != e.size:
        raise StoreError(where, f"{e.name.decode(errors='replace')}: the layer's "
                         f"file is {len(data)} bytes, tar-split says {e.size}")
    return data
