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

    def locate(self, starts: np.ndarray, lengths: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where device byte ranges lie in the data file, all ranges at once: (range index,
        length, data file offset or -1 for unmapped bytes) per piece, in device order within
        each range; a range is split where the thin mapping breaks. What readinto would read,
        so a caller can read large runs itself (save's hot path)."""
        bs = self._bs
        starts = np.asarray(starts, np.int64)
        ends = starts + np.asarray(lengths, np.int64)
        if ends.size and int(ends.max()) > self._size:
            raise DeviceError(f"a read ends at byte {int(ends.max())}, past the device's "
                              f"{self._size}")
        vb = self._vbegin * bs
        ve = (self._vbegin + self._len) * bs
        db = self._dbegin * bs + self._base
        cuts = np.unique(np.concatenate([vb, ve]))
        lo = np.searchsorted(cuts, starts, side="right")
        hi = np.searchsorted(cuts, ends, side="left")
        npieces = np.maximum(hi - lo, 0) + 1
        which = np.repeat(np.arange(starts.size, dtype=np.int64), npieces)
        j = np.arange(which.size, dtype=np.int64) - np.repeat(np.cumsum(npieces) - npieces,
                                                               npieces)
        if cuts.size:
            inner_lo = cuts[np.clip(lo[which] + j - 1, 0, cuts.size - 1)]
            inner_hi = cuts[np.clip(lo[which] + j, 0, cuts.size - 1)]
            pstart = np.where(j == 0, starts[which], inner_lo)
            pend = np.where(j == npieces[which] - 1, ends[which], inner_hi)
        else:
            pstart, pend = starts, ends
        run = np.searchsorted(vb, pstart, side="right") - 1
        rc = np.clip(run, 0, None)
        if vb.size:
            mapped = (run >= 0) & (pstart < ve[rc])
            src = np.where(mapped, db[rc] + (pstart - vb[rc]), -1)
        else:
            src = np.full(pstart.size, -1, np.int64)
        return which, pend - pstart, src
