"""The build's one-pass fill (dmimage/image/fill.py) against the two-pass way it replaced:
plan every block first, then `WritablePool.write_file` per run of blocks. The metadata and
data files must come out byte for byte the same (the mapping tree's shape follows the batches
it is inserted in), thin_check 1.1 must pass, and every volume must read back as its
content. Small steps and chunks (patched) put runs across chunk and step boundaries, make
the pass move a part-gathered run between its buffers and meet cut blocks at both ends."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import pytest

import dmimage.image.fill as fill
from dmimage.image.build import _DataDevice
from dmimage.image.fill import Content, fill_volume
from dmimage.thin.export import export_thin
from dmimage.thin.format_pool import format_pool
from dmimage.thin.pool import open_pool
from dmimage.thin.transaction import WritablePool, open_writable

import oracles

BS = 64 << 10
NR_DATA = 700  # the three volumes below write about 560 blocks


def _content(path: Path, nbytes: int, seed: int, zero_p: float) -> bytes:
    """Random bytes with all-zero blocks, and blocks whose first 8 bytes alone are zero."""
    rng = random.Random(seed)
    buf = bytearray(rng.randbytes(nbytes))
    for i in range(-(-nbytes // BS)):
        x = rng.random()
        if x < zero_p:
            buf[i * BS:(i + 1) * BS] = bytes(len(buf[i * BS:(i + 1) * BS]))
        elif x < zero_p + 0.05:
            buf[i * BS:i * BS + 8] = bytes(8)
    path.write_bytes(bytes(buf))
    return bytes(buf)


def _layer(path: Path, base: bytes, nbytes: int, seed: int) -> bytes:
    """``base`` cut or padded to ``nbytes``, some blocks rewritten, some zeroed."""
    rng = random.Random(seed)
    buf = bytearray(base[:nbytes].ljust(nbytes, b"\0"))
    for i in range(-(-nbytes // BS)):
        x = rng.random()
        if x < 0.1:
            buf[i * BS:(i + 1) * BS] = rng.randbytes(len(buf[i * BS:(i + 1) * BS]))
        elif x < 0.2:
            buf[i * BS:(i + 1) * BS] = bytes(len(buf[i * BS:(i + 1) * BS]))
    path.write_bytes(bytes(buf))
    return bytes(buf)


def _two_pass(wp, dev: int, size: int, c: Content, base: Content | None) -> str:
    """The build before the one-pass fill: plan (numpy over the whole content), then
    write_file per run of blocks to write, zeros past the content, discards last."""
    bs = wp.block_bytes
    n = -(-size // bs)

    def blocks(cc: Content | None) -> np.ndarray:
        raw = Path(cc.path).read_bytes()[: min(cc.length, size)] if cc and cc.path else b""
        a = np.zeros(n * bs, np.uint8)
        a[: len(raw)] = np.frombuffer(raw, np.uint8)
        return a.reshape(n, bs)

    a = blocks(c)
    nz = a.any(axis=1)
    if base is None:
        writes, discards = np.flatnonzero(nz), np.empty(0, np.int64)
    else:
        differ = (a != blocks(base)).any(axis=1)
        writes, discards = np.flatnonzero(differ & nz), np.flatnonzero(differ & ~nz)
    with open(c.path, "rb") as f:  # type: ignore[arg-type]
        for first, count in fill.runs(writes):
            off = first * bs
            end = min((first + count) * bs, size)
            in_file = max(0, min(end, c.length) - off)
            if in_file:
                wp.write_file(dev, off, f.fileno(), off, in_file)
            if end - off > in_file:
                wp.write(dev, off + in_file, bytes(end - off - in_file))
    for first, count in fill.runs(discards):
        wp.discard(dev, first * bs, count * bs)
    return hashlib.sha256(a.reshape(-1)[:size].tobytes()).hexdigest()


def _build(tmp: Path, tag: str, vols: list[tuple[int, int | None, int, Content]],
           one_pass: bool, offset: int = 12345,
           direct: bool = False) -> tuple[Path, Path, list[str]]:
    meta, data = tmp / f"{tag}.meta", tmp / f"{tag}.data"
    with open(meta, "wb") as f:
        f.truncate(8 << 20)
    with open(data, "wb") as f:
        f.truncate(NR_DATA * BS + offset)
    format_pool(meta, BS // 512, NR_DATA)
    shas = []
    contents = {dev: c for dev, _o, _s, c in vols}
    with open_writable(meta, data, data_offset=offset, direct=direct) as wp:
        for dev, origin, size, c in vols:
            if origin is None:
                wp.create_thin(dev)
            else:
                wp.create_snap(dev, origin)
            wp.commit()
            base = contents[origin] if origin is not None else None
            if one_pass:
                shas.append(fill_volume(wp, dev, size, c, base).sha256)
            else:
                shas.append(_two_pass(wp, dev, size, c, base))
            wp.commit()
    return meta, data, shas


@pytest.mark.parametrize("step,chunk,direct", [(4, 3, False), (7, 2, False), (1, 1, False),
                                              (1024, 128, False), (4, 3, True),
                                              (1024, 128, True)])
def test_one_pass_equals_two_pass(tmp_path, monkeypatch, tools11, step, chunk, direct):
    """``direct``: the one-pass build writes its whole blocks with O_DIRECT (as a gpt build
    does) into a data device at an aligned offset; the two-pass build writes through the page
    cache. Where the file system refuses O_DIRECT (tmpfs) the case is skipped."""
    offset = 12345
    direct_bytes: list[int] = []
    if direct:
        offset = 1 << 20
        real = WritablePool._write_direct

        def counted(self, piece, dst):
            n = real(self, piece, dst)
            direct_bytes.append(n)
            return n

        monkeypatch.setattr(WritablePool, "_write_direct", counted)
    monkeypatch.setattr(fill, "FILE_STEP", step * BS)
    monkeypatch.setattr(fill, "CHUNK_BYTES", chunk * BS)
    monkeypatch.setattr("dmimage.thin.transaction.FILE_STEP", step * BS)
    base = _content(tmp_path / "base", 300 * BS + 1000, 1, 0.15)
    # the layer's cut block (250) differs from a non-zero origin block: its copy keeps the
    # origin's bytes past the layer's content unless they are overwritten with zeros
    base = base[:250 * BS] + random.Random(4).randbytes(BS) + base[251 * BS:]
    (tmp_path / "base").write_bytes(base)
    layer = _layer(tmp_path / "layer", base, 250 * BS + 77, 2)
    layer = layer[:250 * BS] + b"\x01" * 77
    (tmp_path / "layer").write_bytes(layer)
    # a content that ends mid-block in a volume that ends mid-block further on
    short = _content(tmp_path / "short", 40 * BS + 4096, 3, 0.0)
    vols = [(1, None, 301 * BS, Content(tmp_path / "base", len(base))),
            (2, 1, 250 * BS + 4096, Content(tmp_path / "layer", len(layer))),
            (3, None, 41 * BS + 512 * 9, Content(tmp_path / "short", len(short)))]
    m1, d1, s1 = _build(tmp_path, "one", vols, True, offset, direct)
    if direct and not sum(direct_bytes):
        pytest.skip(f"{tmp_path}: no O_DIRECT writes on this file system")
    m2, d2, s2 = _build(tmp_path, "two", vols, False, offset)
    assert s1 == s2
    assert m1.read_bytes() == m2.read_bytes()
    assert d1.read_bytes() == d2.read_bytes()
    rc, so, se = oracles.check(m1, tools11)
    assert rc == 0, (so, se)
    want = {1: base.ljust(301 * BS, b"\0"), 2: layer.ljust(250 * BS + 4096, b"\0"),
            3: short.ljust(41 * BS + 512 * 9, b"\0")}
    # the data device starts at the offset it was written at
    part = _DataDevice(d1, offset, NR_DATA * BS)
    try:
        with open_pool(m1) as pool:
            for dev, content in want.items():
                out = io.BytesIO()
                export_thin(pool, part, dev, out, size=len(content))
                assert out.getvalue() == content
                assert s1[dev - 1] == hashlib.sha256(content).hexdigest()
    finally:
        part.close()
