"""Thin pools inside a VG: their metadata (``_tmeta``) and data (``_tdata``) as LV views.

The thin code reads metadata through one mmap of a file (pdata/block.py). The least invasive
bridge: when ``_tmeta`` is one run of one file at a page-aligned offset (what lvm2 allocates
unless the metadata LV was extended onto other extents), BlockReader maps just that window,
zero-copy. Otherwise the LV's bytes are assembled once into a temporary file (metadata is
small: at most 16 GiB, usually a few MiB), removed on close. Data is read through the
``_tdata`` view directly (export_thin accepts any object with ``pread``), so a pool extended
over several segments or PVs costs no copy.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from dmimage.errors import MetadataError, UsageError
from dmimage.lvm.model import LogicalVolume, ThinPoolSegment, ThinSegment
from dmimage.lvm.vg import LoadedVG
from dmimage.lvm.view import LvView
from dmimage.thin.pool import Pool, open_pool

_COPY = 4 << 20


def pool_segment(lv: LogicalVolume) -> ThinPoolSegment:
    segs = [s for s in lv.segments if isinstance(s, ThinPoolSegment)]
    if len(segs) != 1:
        raise UsageError(f"{lv.name} is not a thin pool")
    return segs[0]


def thin_segment(lv: LogicalVolume) -> ThinSegment:
    segs = [s for s in lv.segments if isinstance(s, ThinSegment)]
    if len(segs) != 1:
        raise UsageError(f"{lv.name} is not a thin volume")
    return segs[0]


def sub_lv(lvg: LoadedVG, name: str, owner: str) -> LogicalVolume:
    lv = lvg.vg.lv(name)
    if lv is None:
        raise MetadataError(f"names LV {name!r}, which the VG does not have",
                            field=f"{lvg.vg.name}/{owner}")
    return lv


@dataclass
class MetadataSource:
    """Where BlockReader finds a pool's metadata: a path and an optional window."""

    path: str
    window: tuple[int, int] | None


@contextmanager
def metadata_source(lvg: LoadedVG, pool_lv: LogicalVolume) -> Iterator[MetadataSource]:
    seg = pool_segment(pool_lv)
    view = LvView(lvg, sub_lv(lvg, seg.metadata, pool_lv.name))
    try:
        run = view.contiguous()
        if run is not None and run[1] % mmap.ALLOCATIONGRANULARITY == 0:
            yield MetadataSource(run[0], (run[1], view.size))
            return
        fd, tmp = tempfile.mkstemp(prefix="dmimage-tmeta-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.truncate(view.size)
                for off in range(0, view.size, _COPY):
                    buf = view.pread(min(_COPY, view.size - off), off)
                    if np.frombuffer(buf, np.uint8).any():
                        f.seek(off)
                        f.write(buf)
            yield MetadataSource(tmp, None)
        finally:
            os.unlink(tmp)
    finally:
        view.close()


@contextmanager
def open_lv_pool(lvg: LoadedVG, pool_lv: LogicalVolume) -> Iterator[Pool]:
    with metadata_source(lvg, pool_lv) as src, open_pool(src.path, window=src.window) as pool:
        yield pool


def data_view(lvg: LoadedVG, pool_lv: LogicalVolume) -> LvView:
    return LvView(lvg, sub_lv(lvg, pool_segment(pool_lv).pool, pool_lv.name))
