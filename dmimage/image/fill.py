"""One pass over a volume's content: plan its blocks, write them through the pool, hash it.

A build used to read every content file twice before writing it (a plan pass that found the
blocks to write and hashed them, then the copy); here each chunk is read once into memory and
then, in that order: its sha256 is handed to a hashing thread (hashlib lets go of the GIL on
big buffers, so it runs on the second core), its blocks are compared with zeros (or with the
origin's content, for a layer), and the runs of blocks to write go to
:meth:`WritablePool.write` straight from the buffer.

The pool's metadata must come out exactly as the two-pass build made it, because the mapping
tree's shape follows the batches it was inserted in: every run of blocks to write is mapped in
steps of ``step`` whole blocks counted from the run's start (what ``write_file`` did), a
partial last block of the content (or of the volume) on its own, and the discards after all
the writes. Reads stop at the next step boundary of the run being gathered, so a step always
lies in one buffer; two buffers alternate so the hash of one overlaps the reads into the other.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmimage.errors import DeviceError
from dmimage.image.ext4 import FileEntry
from dmimage.thin.transaction import FILE_STEP, WritablePool

#: Bytes read per step of the pass (at least one block).
CHUNK_BYTES = 8 << 20
#: Above this a buffer is not doubled (huge data blocks): the pass waits for the hash instead.
DOUBLE_BUFFER_MAX = 256 << 20

Progress = Callable[[int], None]


@dataclass
class Content:
    """A volume's visible content: *length* bytes from *path* (None: zeros), then zeros."""

    path: Path | None
    length: int
    files: list[FileEntry] | None = None


@dataclass
class Filled:
    """What one pass over a volume did: the blocks written and discarded, the content's hash."""

    writes: np.ndarray  # int64 virtual blocks written
    discards: np.ndarray  # int64 virtual blocks unmapped (became all zero in a layer)
    sha256: str  # of the content over the volume's size


class Hasher:
    """sha256 of the buffers fed to it, in order, on a thread of its own. A caller must
    :meth:`wait` for a buffer before it overwrites it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self._h = hashlib.sha256()
        self._last: dict[int, Future[None]] = {}

    def feed(self, buffer_id: int, view: memoryview) -> None:
        self._last[buffer_id] = self._pool.submit(self._h.update, view)

    def wait(self, buffer_id: int) -> None:
        f = self._last.pop(buffer_id, None)
        if f is not None:
            f.result()

    def hexdigest(self) -> str:
        for k in list(self._last):
            self.wait(k)
        return self._h.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _page_aligned(n: int) -> np.ndarray:
    """A byte buffer whose every block starts on a page (an anonymous mapping): the pool
    can hand its whole blocks to ``O_DIRECT`` writes (see ``WritablePool(direct=True)``)."""
    return np.frombuffer(mmap.mmap(-1, n), np.uint8)


def read_into(fd: int | None, length: int, off: int, out: np.ndarray) -> None:
    """``out`` = the content's bytes from ``off`` (zeros past ``length`` or with no file)."""
    n = max(0, min(len(out), length - off)) if fd is not None else 0
    done = 0
    mv = out.data
    while done < n:
        try:
            got = os.preadv(fd, [mv[done:n]], off + done)  # type: ignore[arg-type]
        except OSError as exc:
            raise DeviceError(f"read of the content at byte {off + done} failed: "
                              f"{exc.strerror}") from None
        if got == 0:
            raise DeviceError(f"content ended at byte {off + done}, expected {length}")
        done += got
    if n < len(out):
        out[n:] = 0


def nonzero_blocks(a: np.ndarray) -> np.ndarray:
    """Which rows of ``a`` (blocks as rows of uint64) hold a non-zero byte. A row whose first
    word is non-zero needs no scan (most blocks of real content)."""
    first: np.ndarray = a[:, 0] != 0
    rest = np.flatnonzero(~first)
    if len(rest) * 4 > len(a):
        return np.asarray(a.any(axis=1))
    if len(rest):
        first[rest] = a[rest].any(axis=1)
    return first


class _Pass:
    """The state of one volume's pass (see the module docstring)."""

    def __init__(self, wp: WritablePool, dev: int, size: int, content: Content,
                 hasher: Hasher) -> None:
        self.wp, self.dev, self.size = wp, dev, size
        self.bs = bs = wp.block_bytes
        self.hasher = hasher
        self.nblocks = -(-size // bs)
        self.step = max(1, FILE_STEP // bs)
        self.chunk = max(1, CHUNK_BYTES // bs)
        #: Bytes of the volume that hold content; a block that this cuts (or the volume's
        #: own end cuts) is written on its own, as a partial block.
        self.end = end = min(size, content.length)
        self.whole_end = end // bs  # blocks before it are written as whole blocks
        cap = self.step + self.chunk
        first = _page_aligned(cap * bs)
        self.bufs = [first, _page_aligned(cap * bs)
                     if cap * bs <= DOUBLE_BUFFER_MAX else first]
        self.cur = 0
        self.buf_first = 0  # virtual block at the start of the current buffer
        self.n = 0  # blocks held in the current buffer
        self.run_start: int | None = None  # first block of the gathered run not yet written
        self.run_end = 0

    def _view(self, first: int, end: int) -> memoryview:
        """Bytes of blocks [first, end) in the current buffer, cut where the content ends
        (:meth:`flush_steps` writes the zeros after it apart, as the two-pass build did)."""
        bs = self.bs
        a = (first - self.buf_first) * bs
        z = (end - self.buf_first) * bs - max(0, end * bs - self.end)
        return self.bufs[self.cur].data[a:z]

    def next_read(self, v: int) -> tuple[int, np.ndarray]:
        """(blocks, buffer slice) for the read at block ``v``: the current buffer, or the
        other one with the unwritten part of the run moved to its start."""
        k = self.chunk
        if self.run_start is not None:
            k = min(k, self.run_start + self.step - v)
        k = min(k, self.nblocks - v)
        keep = v - self.run_start if self.run_start is not None else 0
        if keep == 0 or self.n + k > len(self.bufs[0]) // self.bs:
            other = 1 - self.cur
            if self.bufs[other] is self.bufs[self.cur]:
                self.hasher.wait(0)
                self.hasher.wait(1)
            else:
                self.hasher.wait(other)
            src = self.bufs[self.cur]
            dst = self.bufs[other]
            if keep:
                a = (v - keep - self.buf_first) * self.bs
                dst[: keep * self.bs] = src[a : a + keep * self.bs]
            self.cur, self.buf_first, self.n = other, v - keep, keep
        a = self.n * self.bs
        self.n += k
        return k, self.bufs[self.cur][a : a + k * self.bs]

    def flush_steps(self, final: bool) -> None:
        """Write the gathered run's whole steps (all of it when ``final``: the run ended)."""
        assert self.run_start is not None
        whole = min(self.run_end, self.whole_end)
        while self.run_start + self.step <= whole:
            self._write(self.run_start, self.run_start + self.step)
            self.run_start += self.step
        if not final:
            return
        if self.run_start < whole:
            self._write(self.run_start, whole)
        if self.run_end > whole:  # the cut block: a partial write, mapped on its own,
            self._write(whole, self.run_end)
            zeros = min(self.run_end * self.bs, self.size) - self.end
            if zeros > 0:  # then zeros to its end: a layer's block kept its origin's bytes
                self.wp.write(self.dev, self.end, bytes(zeros))
        self.run_start = None

    def _write(self, first: int, end: int) -> None:
        self.wp.write(self.dev, first * self.bs, self._view(first, end))

    def add_runs(self, v: int, k: int, writes: np.ndarray) -> None:
        """Blocks ``v + writes`` (sorted, within [v, v+k)) are to be written."""
        if self.run_start is not None and (not len(writes) or writes[0] != 0):
            self.flush_steps(final=True)
        if not len(writes):
            return
        brk = np.flatnonzero(np.diff(writes) != 1) + 1
        starts = writes[np.r_[0, brk]].tolist()
        ends = (writes[np.r_[brk - 1, len(writes) - 1]] + 1).tolist()
        for s, e in zip(starts, ends, strict=True):
            if self.run_start is None:
                self.run_start = v + s
            self.run_end = v + e
            # a run ends inside the chunk, or at the cut block (only zeros come after it)
            self.flush_steps(final=e < k or v + e > self.whole_end)


def fill_volume(wp: WritablePool, dev: int, size: int, content: Content,
                base: Content | None, progress: Progress | None = None) -> Filled:
    """Write volume ``dev`` (already created, ``size`` bytes) so that it reads as
    ``content``: a volume without origin gets its non-zero blocks; a layer (``base``: its
    origin's content) the blocks that differ from it, and discards those that became zero."""
    hasher = Hasher()
    p = _Pass(wp, dev, size, content, hasher)
    bs = p.bs
    fd = bfd = None
    written: list[np.ndarray] = []
    discards: list[np.ndarray] = []
    scratch = np.empty(0, np.uint8)
    try:
        if content.path is not None:
            fd = os.open(content.path, os.O_RDONLY | os.O_CLOEXEC)
        if base is not None and base.path is not None:
            bfd = os.open(base.path, os.O_RDONLY | os.O_CLOEXEC)
        if base is not None:
            scratch = np.empty(p.chunk * bs, np.uint8)
        v = 0
        while v < p.nblocks:
            k, buf = p.next_read(v)
            read_into(fd, min(content.length, size), v * bs, buf)
            inside = min(k * bs, size - v * bs)
            hasher.feed(p.cur, buf.data[:inside])
            a = buf.view(np.uint64).reshape(k, bs // 8)
            nz = nonzero_blocks(a)
            if base is None:
                w = np.flatnonzero(nz)
            else:
                b = scratch[: k * bs]
                read_into(bfd, min(base.length, size), v * bs, b)
                differ = (a != b.view(np.uint64).reshape(k, bs // 8)).any(axis=1)
                w = np.flatnonzero(differ & nz)
                discards.append(v + np.flatnonzero(differ & ~nz))
            written.append(v + w)
            p.add_runs(v, k, w)
            v += k
            if progress:
                progress(inside)
        if p.run_start is not None:
            p.flush_steps(final=True)
        drop = np.concatenate(discards) if discards else np.empty(0, np.int64)
        for first, count in runs(drop):
            wp.discard(dev, first * bs, count * bs)
        return Filled(_cat(written), drop.astype(np.int64), hasher.hexdigest())
    finally:
        hasher.close()
        for f in (fd, bfd):
            if f is not None:
                os.close(f)


def _cat(xs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(xs).astype(np.int64) if xs else np.empty(0, np.int64)


def runs(blocks: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of the consecutive runs in a sorted index array."""
    if not len(blocks):
        return []
    brk = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = blocks[np.r_[0, brk]].tolist()
    ends = (blocks[np.r_[brk - 1, len(blocks) - 1]] + 1).tolist()
    return [(s, e - s) for s, e in zip(starts, ends, strict=True)]
