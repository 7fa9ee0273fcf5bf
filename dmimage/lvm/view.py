"""A read-only, file-like view of a linear or striped LV, built from PV extents.

Logical extent ``e`` of a stripe starting at physical extent ``pe`` of PV ``pvN`` lies at byte
``region.offset + (pe_start + pe * extent_size) * 512`` of the file holding that PV. A striped
segment interleaves ``stripe_size``-sector chunks over its stripes round-robin. Thin LVs are
not views (they go through the pool, see lvm/thin.py); a segment that needs a missing PV, or
extents past the end of a PV, is refused when the view is built.
"""

from __future__ import annotations

import bisect
import io
import os
from dataclasses import dataclass

from dmimage.errors import DeviceError, MetadataError, UsageError
from dmimage.format.lvm import SECTOR_SIZE
from dmimage.lvm.model import LogicalVolume, StripedSegment
from dmimage.lvm.vg import LoadedVG


class MissingPvError(MetadataError):
    """An LV needs a PV that no input carries."""


@dataclass(frozen=True)
class _Stripe:
    path: str
    start: int  # byte in the file of the stripe's first extent


@dataclass(frozen=True)
class _Seg:
    start: int  # LV byte
    length: int
    chunk: int  # stripe chunk in bytes (== length for one stripe)
    stripes: tuple[_Stripe, ...]


def _segments(lvg: LoadedVG, lv: LogicalVolume) -> list[_Seg]:
    vg = lvg.vg
    ext = vg.extent_size * SECTOR_SIZE
    out: list[_Seg] = []
    expect = 0
    for seg in lv.segments:
        where = f"{vg.name}/{lv.name} {seg.name}"
        if not isinstance(seg, StripedSegment):
            raise UsageError(f"{where}: segment type {seg.type!r} cannot be read as extents")
        if seg.start_extent != expect:
            raise MetadataError(f"starts at extent {seg.start_extent}, expected {expect} "
                                "(segments overlap or leave a gap)", field=where)
        expect += seg.extent_count
        n = len(seg.stripes)
        if seg.extent_count % n:
            raise MetadataError(f"{seg.extent_count} extents do not split over {n} stripes",
                                field=where)
        per = seg.extent_count // n
        if n > 1:
            if not seg.stripe_size or seg.stripe_size <= 0 or ext % (seg.stripe_size * 512):
                raise MetadataError(f"stripe_size {seg.stripe_size} is invalid", field=where)
            chunk = seg.stripe_size * SECTOR_SIZE
        else:
            chunk = seg.extent_count * ext
        stripes = []
        for pvname, pe in seg.stripes:
            pv = vg.pv(pvname)
            if pv is None:
                raise MetadataError(f"stripe on unknown PV {pvname!r}", field=where)
            label = lvg.labels.get(pvname)
            if label is None:
                raise MissingPvError(f"needs PV {pvname} (uuid {pv.id}), which is missing",
                                     field=where)
            if pe < 0 or pe + per > pv.pe_count:
                raise MetadataError(f"extents {pe}..{pe + per - 1} lie past the end of "
                                    f"{pvname} ({pv.pe_count} extents)", field=where)
            start = (pv.pe_start * SECTOR_SIZE) + pe * ext
            if start + per * ext > label.region.size:
                raise MetadataError(f"extents {pe}..{pe + per - 1} of {pvname} lie past the "
                                    f"end of {label.region.name} ({label.region.size} bytes)",
                                    field=where)
            stripes.append(_Stripe(label.region.path, label.region.offset + start))
        out.append(_Seg(seg.start_extent * ext, seg.extent_count * ext, chunk, tuple(stripes)))
    return out


class LvView(io.RawIOBase):
    """Read-only bytes of one linear/striped LV; ``pread`` for random access."""

    def __init__(self, lvg: LoadedVG, lv: LogicalVolume):
        super().__init__()
        self.name = f"{lvg.vg.name}/{lv.name}"
        self._segs = _segments(lvg, lv)
        self._starts = [s.start for s in self._segs]
        self.size = lv.extent_count * lvg.vg.extent_size * SECTOR_SIZE
        self._fds: dict[str, int] = {}
        self._pos = 0

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise DeviceError(f"{path}: {exc.strerror}") from None
            self._fds[path] = fd
        return fd

    def extents(self, off: int, n: int) -> list[tuple[str, int, int]]:
        """(path, file byte, length) pieces that hold LV bytes [off, off+n)."""
        out = []
        end = min(off + n, self.size)
        while off < end:
            seg = self._segs[bisect.bisect_right(self._starts, off) - 1]
            rel = off - seg.start
            k = len(seg.stripes)
            chunk_no, within = divmod(rel, seg.chunk)
            stripe = seg.stripes[chunk_no % k]
            take = min(seg.chunk - within, end - off, seg.start + seg.length - off)
            out.append((stripe.path, stripe.start + (chunk_no // k) * seg.chunk + within, take))
            off += take
        return out

    def contiguous(self) -> tuple[str, int] | None:
        """(path, byte offset) when the whole LV is one run of one file, else None."""
        pieces = self.extents(0, self.size)
        if not pieces:
            return None
        path, start, _ = pieces[0]
        pos = start
        for p, s, n in pieces:
            if p != path or s != pos:
                return None
            pos += n
        return path, start

    def pread(self, n: int, off: int) -> bytes:
        parts = []
        for path, start, length in self.extents(off, n):
            try:
                b = os.pread(self._fd(path), length, start)
            except OSError as exc:
                raise DeviceError(f"{path}: {exc.strerror}") from None
            if len(b) != length:
                raise DeviceError(f"{path}: ends at byte {start + len(b)}, {self.name} needs "
                                  f"{start + length}")
            parts.append(b)
        return b"".join(parts)

    def pread_into(self, buf: memoryview, off: int) -> int:
        """Fill ``buf`` with LV bytes from ``off`` (no allocation: the export hot path)."""
        done = 0
        for path, start, length in self.extents(off, len(buf)):
            try:
                got = os.preadv(self._fd(path), [buf[done:done + length]], start)
            except OSError as exc:
                raise DeviceError(f"{path}: {exc.strerror}") from None
            if got != length:
                raise DeviceError(f"{path}: ends at byte {start + got}, {self.name} needs "
                                  f"{start + length}")
            done += length
        return done

    # -- file-like ---------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.pread(len(b), self._pos)
        memoryview(b)[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        super().close()
