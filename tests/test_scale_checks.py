"""The kernel-scale VM tests' checkers (vmtests/scale_scenario.py) can fail: on a pool the
kernel wrote (tests/fixtures/kernel/, no VM needed) they accept the truth and reject a wrong
mapping time, a wrong details field, wrong sharing and a wrong reference count; and the
model's sector-patch content follows PoolModel's copy-on-write rules."""

from __future__ import annotations

import dataclasses
import lzma
from pathlib import Path

import numpy as np
import pytest

from dmimage import open_pool
from dmimage.thin.model import PoolModel
from vmtests.scale_scenario import DeviceView, ScaleModel, compare_views, read_dump, tree_shape

FIXTURES = Path(__file__).parent / "fixtures" / "kernel"
NAME = "deb12-seed202"  # five devices, shared leaves (<def>), no held snapshot


@pytest.fixture
def meta(tmp_path: Path) -> Path:
    out = tmp_path / "pool.meta"
    with lzma.open(FIXTURES / f"{NAME}.meta.xz") as f:
        out.write_bytes(f.read())
    return out


def _truth(text: str) -> tuple[dict[int, DeviceView], tuple[int, int]]:
    """A view built from thin_dump 1.1's XML (data block numbers serve as model ids)."""
    dump = read_dump(text)
    view = {}
    for dev, d in dump.devices.items():
        m = dump.mappings(dev)
        view[dev] = DeviceView((d.mapped_blocks, d.transaction, d.creation_time, d.snap_time),
                               {int(o): int(b) for o, b, _ in m.tolist()},
                               {int(o): int(t) for o, _, t in m.tolist()})
    return view, (dump.time, dump.transaction)


def test_checkers_accept_the_kernel_pool_and_reject_each_lie(meta: Path) -> None:
    text = (FIXTURES / f"{NAME}.thin_dump-1.1.xml").read_text()
    dump = read_dump(text)
    assert dump.defs, "the fixture should have shared leaves"
    with open_pool(meta) as pool:
        view, tt = _truth(text)
        assert compare_views("truth", pool, dump, view, tt) == sum(
            len(v.blocks) for v in view.values())
        counts = pool.data_space_map().counts.astype(np.int64)
        assert np.array_equal(counts, dump.data_ref_counts())
        # counting a shared leaf once per device that maps it would be wrong
        naive = np.zeros_like(counts)
        for each in dump.devices:
            np.add.at(naive, dump.mappings(each)[:, 1].astype(np.int64), 1)
        assert not np.array_equal(counts, naive)
        dev = max(view, key=lambda d: len(view[d].blocks))
        vb = sorted(view[dev].blocks)[-1]

        lie, _ = _truth(text)
        lie[dev].times[vb] += 1
        with pytest.raises(AssertionError, match="mapping times differ"):
            compare_views("time", pool, dump, lie, tt)
        for i in range(4):
            lie, _ = _truth(text)
            d = list(lie[dev].details)
            d[i] += 1
            lie[dev] = dataclasses.replace(lie[dev], details=(d[0], d[1], d[2], d[3]))
            with pytest.raises(AssertionError, match="details"):
                compare_views("details", pool, dump, lie, tt)
        lie, _ = _truth(text)
        first_vb = sorted(lie[dev].blocks)[0]
        lie[dev].blocks[first_vb] = lie[dev].blocks[vb]  # two mappings, one model block
        with pytest.raises(AssertionError, match="share a data block"):
            compare_views("sharing", pool, dump, lie, tt)
        with pytest.raises(AssertionError, match="time/transaction"):
            compare_views("pool time", pool, dump, view, (tt[0] + 1, tt[1]))
    top, bottom, leaves = tree_shape(meta, dev)
    assert (top, bottom) == (1, 1) and leaves == 1  # a small pool: root leaves only


def test_scale_model_content_and_sharing() -> None:
    """ScaleModel and PoolModel agree on content, mapping times and used blocks."""
    bs = 64 * 1024
    a, b = ScaleModel(bs), PoolModel(bs)
    rng = np.random.default_rng(5)
    for m in (a, b):
        m.create_thin(1)
    ops: list[tuple[str, tuple[int, ...]]] = [("w", (1, 0)), ("w", (1, 3)), ("s", (2, 1)),
                                              ("w", (2, 1)), ("w", (1, 0)), ("w", (1, 130)),
                                              ("s", (3, 2)), ("w", (3, 1)), ("d", (2,)),
                                              ("w", (3, 0))]
    for op, args in ops:
        if op == "w":
            dev, sector = args
            data = rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
            for m in (a, b):
                m.write(dev, sector * 512, data)
        elif op == "s":
            for m in (a, b):
                m.create_snap(*args)
        else:
            for m in (a, b):
                m.delete(*args)
    assert a.used_data_blocks() == b.used_data_blocks()
    for dev in b.devices:
        assert a.read(dev, 0, 3 * bs) == b.read(dev, 0, 3 * bs)
        assert a.devices[dev].times == b.devices[dev].times
    with pytest.raises(ValueError):
        a.write(1, 100, b"x" * 512)
