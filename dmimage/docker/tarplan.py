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
from dmimage.docker.ext4runs import Contents, Ext4Files, Runs, rel_paths
from dmimage.docker.tarsplit import Layout
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


def plan_layer(layout: Layout, thin: ThinFile, lookup: Callable[[str], Any],
               *, where: str, device_id: int, ext4: Ext4Files | None = None) -> Plan:
    """The pieces of the layer tar *layout* rebuilds, file contents taken from the layer's
    filesystem (read through *thin*): through *ext4* for all files at once where it can,
    else one by one with *lookup*, which maps a path below the layer's root to the
    filesystem's node. A file tar-split names that is missing, not a regular file or shorter
    than tar-split says is a StoreError naming it, as the streaming reader reported it.

    By column: the common file (one extent holding all of it, where the thin mapping holds
    it in one run) becomes one data file range with no Python object of its own until the
    pieces are listed; only the others are worked out file by file."""
    names, sizes, lits = layout.names, layout.sizes, layout.lits
    n = len(names)
    want = np.array(sizes, np.int64)
    simple = np.zeros(n, bool)
    start = np.zeros(n, np.int64)
    got: Contents | None = None
    if ext4 is not None and n:
        try:
            got = ext4.contents(rel_paths(names))
        except Exception:  # damaged tables, or a dissect.extfs whose internals moved:
            got = None  # each file through the reader on its own
    if got is not None:
        simple = got.single & (got.size >= want)
        start = got.start
    # the other files' items: bytes (literal), int m >= 0 (m zeros), or (device offset, m)
    other: dict[int, list[bytes | int | tuple[int, int]]] = {}
    for k in np.flatnonzero(~simple).tolist():
        name = names[k]
        fast = got.rest.get(k) if got is not None and not got.single[k] else None
        if got is not None and got.single[k]:  # one extent, shorter than tar-split says
            fast = (int(got.size[k]), [(int(got.start[k]), int(got.length[k]))])
        content = fast if fast is not None else _one_file(name, sizes[k], thin, lookup,
                                                          where, device_id)
        other[k] = _file_items(name, sizes[k], content, where)
    # device ranges in tar order: one per simple file, the others' as they come
    if other:
        per = np.ones(n, np.int64)
        for k, items in other.items():
            per[k] = sum(1 for it in items if isinstance(it, tuple))
        first_range = np.concatenate([[0], np.cumsum(per)])
        dev_starts = np.zeros(int(first_range[-1]), np.int64)
        dev_lens = np.zeros(int(first_range[-1]), np.int64)
        at = first_range[:-1][simple]
        dev_starts[at] = start[simple]
        dev_lens[at] = want[simple]
        for k, items in other.items():
            j = int(first_range[k])
            for it in items:
                if isinstance(it, tuple):
                    dev_starts[j], dev_lens[j] = it
                    j += 1
    else:
        dev_starts, dev_lens = start, want
    try:
        which, lens, srcs = thin.locate(dev_starts, dev_lens)
    except DeviceError as exc:
        raise StoreError(where, f"device {device_id}: {exc}") from None
    lit_pieces: list[Piece] = [(len(b), b) for b in lits]
    size = sum(sizes) + sum(map(len, lits))
    if not other and which.size == n and bool((srcs >= 0).all()):
        # every file one range of the data file: literal, file, literal, ..., literal
        pieces: list[Piece] = [lit_pieces[0]] * (2 * n + 1)
        pieces[0::2] = lit_pieces
        pieces[1::2] = list(zip(lens.tolist(), srcs.tolist(), strict=True))
        return Plan(size, pieces, n)
    # pieces of device range r: first[r] .. first[r + 1]
    first = np.searchsorted(which, np.arange(dev_starts.size + 1)).tolist()
    lens_l = lens.tolist()
    srcs_l = srcs.tolist()
    pieces = []
    r = 0  # next device range
    for k in range(n + 1):
        lit = lit_pieces[k]
        if lit[0]:
            pieces.append(lit)
        if k == n:
            break
        for it in other.get(k, _ONE_RANGE):
            if isinstance(it, bytes):
                if it:
                    pieces.append((len(it), it))
                continue
            if isinstance(it, int):
                if it:
                    pieces.append((it, None))
                continue
            for p in range(first[r], first[r + 1]):
                m, src = lens_l[p], srcs_l[p]
                last = pieces[-1] if pieces else (0, None)
                if src >= 0 and isinstance(last[1], int) and last[1] + last[0] == src:
                    pieces[-1] = (last[0] + m, last[1])  # contiguous: one read
                else:
                    pieces.append((m, None if src < 0 else src))
            r += 1
    return Plan(size, pieces, n)


_ONE_RANGE: list[bytes | int | tuple[int, int]] = [(0, 0)]  # a simple file: its one device range


def _file_items(name: bytes, size: int, content: tuple[int, Runs] | bytes, where: str
                ) -> list[bytes | int | tuple[int, int]]:
    """A file's first *size* bytes as items: its bytes, zeros (an int) or device ranges
    ((offset, length))."""
    if isinstance(content, bytes):
        return [content]
    have, runs = content
    if have < size:
        raise StoreError(where, f"{name.decode(errors='replace')}: the layer's file "
                         f"is {have} bytes, tar-split says {size}")
    items: list[bytes | int | tuple[int, int]] = []
    left = size
    for dev, m in runs:
        m = min(m, left)
        items.append(m if dev is None else (dev, m))
        left -= m
        if not left:
            break
    if left:
        raise StoreError(where, f"{name.decode(errors='replace')}: the layer's "
                         f"file is {size - left} bytes, tar-split says {size}")
    return items


def _one_file(name: bytes, size: int, thin: ThinFile, lookup: Callable[[str], Any],
              where: str, device_id: int) -> tuple[int, Runs] | bytes:
    """A file's (size, runs) through the filesystem reader's own stream (its run list when
    it reads through *thin*), or its bytes (inline data, other streams)."""
    rel = posixpath.normpath(name.decode("utf-8", "surrogateescape")).lstrip("/")
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
        return (size if have is None else have), runs
    try:
        data: bytes = stream.read(size)
    except (OSError, DeviceError) as exc:
        raise StoreError(where, f"{rel}: cannot read it ({exc})") from None
    if len(data) != size:
        raise StoreError(where, f"{name.decode(errors='replace')}: the layer's "
                         f"file is {len(data)} bytes, tar-split says {size}")
    return data
