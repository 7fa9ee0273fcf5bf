"""Write test images with holes for their all-zero 4 KiB blocks (oracle side; no dmimage).

Metadata images are mostly zeros: a cache_restore pool is a 32 MiB file of which a few dozen
blocks are used, and the damage tests write hundreds of damaged copies. Writing the zeros
made most of those tests' CPU (and gigabytes of disk writes per suite run); a sparse file
reads back byte for byte the same (tests/test_fuzz.py checks it).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

BLOCK = 4096


def nonzero_blocks(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Indices of the 4 KiB blocks of ``data`` that hold anything but zeros (a partial last
    block counts as a block)."""
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    whole = len(buf) // BLOCK
    nz = np.flatnonzero(buf[:whole * BLOCK].view(np.uint64)
                        .reshape(whole, BLOCK // 8).any(axis=1))
    if len(buf) > whole * BLOCK and buf[whole * BLOCK:].any():
        nz = np.append(nz, whole)
    return nz


def write_sparse(path: str | os.PathLike[str], data: bytes | bytearray | memoryview,
                 blocks: np.ndarray | list[int] | None = None, size: int | None = None) -> None:
    """Write ``data`` to ``path`` (created or truncated), its all-zero blocks left as holes.
    ``blocks``: the only blocks that may hold anything but zeros, when the caller knows
    (sorted; saves scanning a big image per copy). ``size``: the file's size when more than
    ``data`` (zeros follow it)."""
    view = memoryview(data).cast("B")
    with open(path, "wb") as f:
        f.truncate(max(len(view), size or 0))
        nz = nonzero_blocks(view) if blocks is None else np.asarray(blocks, np.int64)
        if not len(nz):
            return
        cut = np.flatnonzero(np.diff(nz) != 1) + 1  # runs of consecutive blocks: one write
        firsts, lasts = nz[np.r_[0, cut]].tolist(), nz[np.r_[cut - 1, len(nz) - 1]].tolist()
        for first, last in zip(firsts, lasts, strict=True):
            f.seek(first * BLOCK)
            f.write(view[first * BLOCK:(last + 1) * BLOCK])


def digest(data: bytes | bytearray | np.ndarray) -> bytes:
    """A hash of the bytes (length, and the non-zero blocks with their positions): equal
    digests are equal contents, at a fraction of hashing the zeros."""
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    h = hashlib.blake2b(len(buf).to_bytes(8, "little"), digest_size=16)
    for b in nonzero_blocks(buf).tolist():
        h.update(b.to_bytes(8, "little"))
        h.update(buf[b * BLOCK:(b + 1) * BLOCK].data)
    return h.digest()


def file_digest(path: str | os.PathLike[str]) -> bytes:
    """:func:`digest` of a file's contents, reading only its data extents (a repaired
    output is a 512-block sparse file of which repair writes a few dozen blocks)."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    with open(path, "rb") as f:
        fd, pos = f.fileno(), 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA) // BLOCK * BLOCK
            except OSError:  # ENXIO: only a hole is left
                break
            end = min(size, -(-os.lseek(fd, start, os.SEEK_HOLE) // BLOCK)
                      * BLOCK)
            f.seek(start)
            chunk = np.frombuffer(f.read(end - start), np.uint8)
            for b in nonzero_blocks(chunk).tolist():
                h.update((start // BLOCK + b).to_bytes(8, "little"))
                h.update(chunk[b * BLOCK:(b + 1) * BLOCK].data)
            pos = end
    return h.digest()


def same_contents(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Do two files hold the same bytes? Reads only their data extents (big sparse images)."""
    return file_digest(a) == file_digest(b)
