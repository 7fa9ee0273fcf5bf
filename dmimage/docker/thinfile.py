"""A thin device as a read-only file object: what the kernel's thin target would return,
read straight from the pool's data file (unmapped blocks read as zeros). Filesystem readers
(dissect.extfs, dissect.xfs) open layers through it, with no export, mount or root."""

from __future__ import annotations

import io
import os

import numpy as np

from dmimage.errors import DeviceError
from dmimage.format.constants import SECTOR_SIZE
from dmimage.thin.export import export_runs
from dmimage.thin.pool import Pool


class ThinFile(io.RawIOBase):
    def __init__(self, pool: Pool, data_fd: int, dev_id: int, size: int,
                 data_offset: int = 0) -> None:
        super().__init__()
        self._bs = pool.superblock.data_block_size * SECTOR_SIZE
        runs = export_runs(pool, dev_id)
        self._vbegin = runs.origin_begin.astype(np.int64)
        self._dbegin = runs.data_begin.astype(np.int64)
        self._len = runs.length.astype(np.int64)
        self._fd = data_fd
        self._base = data_offset  # where the pool's data starts in the file (an LVM _tdata)
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self._size - self._pos))
        done = 0
        while done < n:
            pos = self._pos + done
            vblock, off = divmod(pos, self._bs)
            i = int(np.searchsorted(self._vbegin, vblock, side="right")) - 1
            if i >= 0 and vblock < self._vbegin[i] + self._len[i]:
                run_end = int(self._vbegin[i] + self._len[i]) * self._bs
                take = min(n - done, run_end - pos)
                src = int(self._dbegin[i] + (vblock - self._vbegin[i])) * self._bs + off \
                    + self._base
                got = os.preadv(self._fd, [mv[done:done + take]], src)
                if got != take:
                    raise DeviceError(f"data device ends before byte {src + take}")
            else:
                nxt = int(self._vbegin[i + 1]) * self._bs if i + 1 < len(self._vbegin) \
                    else self._size
                take = min(n - done, nxt - pos)
                mv[done:done + take] = bytes(take)
            done += take
        self._pos += n
        return n
