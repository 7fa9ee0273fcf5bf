"""Export one LV's bytes: linear/striped from their extents, thin LVs through the pool.

Output to a path is sparse (all-zero 4 MiB chunks become holes) and whole or nothing
(dmimage/output_file.py), so a failed export leaves nothing under the final name.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from dmimage.errors import UsageError
from dmimage.format.lvm import SECTOR_SIZE
from dmimage.lvm.model import LogicalVolume, ThinSegment
from dmimage.lvm.thin import data_view, open_lv_pool, sub_lv
from dmimage.lvm.vg import LoadedVG
from dmimage.lvm.view import LvView
from dmimage.output_file import replaced_when_complete
from dmimage.thin.export import export_thin

CHUNK = 4 << 20


def _copy_view(view: LvView, out: BinaryIO, sparse: bool) -> None:
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    words = np.frombuffer(buf, np.uint64)
    for off in range(0, view.size, CHUNK):
        n = view.pread_into(mv[:min(CHUNK, view.size - off)], off)
        if sparse:
            if not words[:n // 8].any() and not any(mv[n - n % 8:n]):
                continue
            out.seek(off)
        out.write(mv[:n])
    if sparse:
        out.truncate(view.size)


def _to_path(view: LvView, path: str) -> None:
    """Sparse and whole-or-nothing (dmimage/output_file.py); plain into a pipe."""
    with replaced_when_complete(path) as f:
        _copy_view(view, f, sparse=f.seekable())


def export_lv(lvg: LoadedVG, lv: LogicalVolume, out: str | BinaryIO) -> int:
    """Write the LV's bytes to a path or binary stream; returns the size."""
    size = lv.extent_count * lvg.vg.extent_size * SECTOR_SIZE
    first = lv.segments[0] if lv.segments else None
    if isinstance(first, ThinSegment):
        if len(lv.segments) != 1:
            raise UsageError(f"{lv.name}: a thin LV with {len(lv.segments)} segments")
        pool_lv = sub_lv(lvg, first.thin_pool, lv.name)
        with open_lv_pool(lvg, pool_lv) as pool, data_view(lvg, pool_lv) as data:
            if first.device_id not in pool.devices():
                raise UsageError(f"{lv.name}: device_id {first.device_id} is not in pool "
                                 f"{pool_lv.name}")
            export_thin(pool, data, first.device_id, out, size=size)
        return size
    with LvView(lvg, lv) as view:
        if isinstance(out, str):
            _to_path(view, out)
        else:
            _copy_view(view, out, sparse=False)
    return size
