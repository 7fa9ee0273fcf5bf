"""Export a thin volume's content as the kernel's thin device would return it.

Unmapped blocks read as zeros and stay holes in a regular output file; mapped runs are copied
from the data device in large chunks. Nothing is written under the final name until the export
is complete (temp file + rename), so an interrupted export leaves no half-written file.

The mapping tree is read twice, a batch of leaves at a time (pdata/leaves.py): once to
validate it and find its extent, once to copy; memory does not grow with the volume.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import numpy as np

from dmimage import devlock
from dmimage.errors import DeviceError, MetadataError, UsageError
from dmimage.format.constants import MAPPING_VALUE_SIZE, SECTOR_SIZE, TIME_BITS
from dmimage.output_file import replaced_when_complete
from dmimage.pdata.block import device_size
from dmimage.pdata.leaves import leaf_batches
from dmimage.thin.dump.stream import leaf_runs
from dmimage.thin.ir import Runs
from dmimage.thin.pool import Pool

CHUNK = 4 << 20

Progress = Callable[[int], None]


class ByteSink(Protocol):
    """Where a streamed export goes: a binary file, or anything that consumes bytes (a hash)."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


class DataSource(Protocol):
    """Random-access bytes of a pool's data device held somewhere else (an LVM ``_tdata``)."""

    size: int

    def pread(self, n: int, off: int, /) -> bytes: ...


class _FdSource:
    def __init__(self, fd: int, name: str):
        self.fd, self.name = fd, name

    def pread(self, n: int, off: int) -> bytes:
        return os.pread(self.fd, n, off)


@dataclass(slots=True)
class _Extent:
    """A device's leaves (validated, key order) and what the export checks first."""

    leaves: np.ndarray  # int64 leaf blocks
    end_block: int  # one past the highest mapped virtual block (0: nothing mapped)
    data_end: int  # one past the highest data block mapped (0: nothing mapped)


def _extent(pool: Pool, dev_id: int) -> _Extent:
    parts: list[np.ndarray] = []
    end = data_end = 0
    for lb in leaf_batches(pool.reader, pool.mapping_root(dev_id), MAPPING_VALUE_SIZE,
                           what=f"mapping tree of device {dev_id}"):
        parts.append(lb.blocks)
        if len(lb):
            end = int(lb.keys[-1]) + 1
            data_end = max(data_end, int(lb.values.max() >> np.uint64(TIME_BITS)) + 1)
    leaves = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return _Extent(leaves, end, data_end)


def default_size(pool: Pool, dev_id: int) -> int:
    """Bytes up to the end of the highest mapped block (0 for an empty volume)."""
    return _extent(pool, dev_id).end_block * pool.superblock.data_block_size * SECTOR_SIZE


def export_runs(pool: Pool, dev_id: int) -> Runs:
    m = pool.mappings(dev_id)
    return Runs.from_blocks(m.origin, m.data, m.time)


def _copy_range(data: DataSource | _FdSource, src: int, length: int,
                write: Callable[[int, bytes], None], dst: int, progress: Progress | None) -> None:
    done = 0
    while done < length:
        n = min(CHUNK, length - done)
        buf = data.pread(n, src + done)
        if len(buf) != n:
            raise DeviceError(f"data device ends at byte {src + done + len(buf)}, the mapping "
                              f"needs {src + length}")
        if np.frombuffer(buf, np.uint8).any():
            write(dst + done, buf)
        done += n
        if progress:
            progress(n)


def export_thin(
    pool: Pool,
    data_path: str | os.PathLike[str] | DataSource,
    dev_id: int,
    out: str | os.PathLike[str] | ByteSink,
    *,
    size: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Write thin device ``dev_id``'s first ``size`` bytes to ``out``; return the size.

    ``out`` is a path (written sparsely, atomically) or a byte sink such as a binary stream
    (holes become zeros). ``data_path`` is the data file, or a :class:`DataSource`.
    """
    bs = pool.superblock.data_block_size * SECTOR_SIZE
    ext = _extent(pool, dev_id)
    nr_data = pool.live_superblock.nr_data_blocks
    if ext.data_end > nr_data:
        # damaged metadata (check reports it), not a short data device: whatever lies there
        # is not this volume's data
        raise MetadataError(f"device {dev_id}: a mapping points at data block "
                            f"{ext.data_end - 1}, beyond the pool's {nr_data} data blocks",
                            field="mapping value")
    if size is None:
        size = ext.end_block * bs
    if size < 0:
        raise UsageError("size must not be negative")
    runs = _Runs(leaf_runs(pool.reader, ext.leaves), ext.data_end)
    if not isinstance(data_path, (str, os.PathLike)):
        src_name = str(getattr(data_path, "name", "data"))
        _export_from(data_path, data_path.size, src_name, runs, bs, size, out, progress)
        return size
    name = os.fspath(data_path)
    try:
        data_fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"{name}: {exc.strerror}") from None
    try:
        data_lock = devlock.acquire(data_path, exclusive=False)
    except BaseException:
        os.close(data_fd)
        raise
    try:
        try:
            data_size = device_size(data_fd)
        except DeviceError as exc:
            raise DeviceError(f"{name}: {exc}") from None
        _export_from(_FdSource(data_fd, name), data_size, name, runs, bs, size, out, progress)
    finally:
        os.close(data_fd)
        data_lock.release()
    return size


@dataclass(slots=True)
class _Runs:
    """A volume's runs as they are read, and the end of the data they need."""

    batches: Iterable[Runs]
    data_end: int


def _export_from(data: DataSource | _FdSource, data_size: int, name: str, runs: _Runs, bs: int,
                 size: int, out: str | os.PathLike[str] | ByteSink,
                 progress: Progress | None) -> None:
    need = runs.data_end * bs
    if need > data_size:
        raise DeviceError(f"{name}: data device has {data_size} bytes, the mappings need {need}")
    if isinstance(out, (str, os.PathLike)):
        _export_to_path(os.fspath(out), data, runs, bs, size, progress)
    else:
        _export_to_stream(out, data, runs, bs, size, progress)


def _clipped(runs: _Runs, bs: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(dst byte, src byte, length) of every mapped run, clipped to ``size``."""
    for batch in runs.batches:
        for o, d, n in zip(batch.origin_begin.tolist(), batch.data_begin.tolist(),
                           batch.length.tolist(), strict=True):
            dst = o * bs
            if dst >= size:
                return
            yield dst, d * bs, min(n * bs, size - dst)


def _export_to_path(path: str, data: DataSource | _FdSource, runs: _Runs, bs: int, size: int,
                    progress: Progress | None) -> None:
    """Sparse (only mapped runs are written) and whole-or-nothing; a pipe or character device
    named as the output gets the plain stream."""
    with replaced_when_complete(path) as f:
        if not f.seekable():
            _export_to_stream(f, data, runs, bs, size, progress)
            return
        fd = f.fileno()

        def write(off: int, buf: bytes) -> None:
            os.pwrite(fd, buf, off)

        for dst, src, n in _clipped(runs, bs, size):
            _copy_range(data, src, n, write, dst, progress)
        os.ftruncate(fd, size)


def _export_to_stream(stream: ByteSink, data: DataSource | _FdSource, runs: _Runs, bs: int,
                      size: int, progress: Progress | None) -> None:
    pos = 0
    zeros = bytes(CHUNK)

    def pad_to(target: int) -> None:
        nonlocal pos
        while pos < target:
            n = min(CHUNK, target - pos)
            stream.write(zeros[:n])
            pos += n

    def write(off: int, buf: bytes) -> None:
        nonlocal pos
        pad_to(off)
        stream.write(buf)
        pos += len(buf)

    for dst, src, n in _clipped(runs, bs, size):
        _copy_range(data, src, n, write, dst, progress)
    pad_to(size)
    stream.flush()


def stdout_binary() -> BinaryIO:
    return sys.stdout.buffer
