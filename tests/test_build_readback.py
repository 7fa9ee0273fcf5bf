"""The gpt build's read-back of its data partition (dmimage/image/readback.py): every pread
returns the file's bytes (views inside a window, joins across two, plain reads behind the
window the export is in, short at the partition's end), and the hash it feeds sees every byte
of the partition exactly once, in order, whatever the reads skipped. Small windows (patched)
put the reads across many of them."""

from __future__ import annotations

import hashlib
import random

import pytest

import dmimage.image.readback as rb
from dmimage.image.readback import ReadBack


@pytest.mark.parametrize("start", [1 << 20, 12345])  # aligned (O_DIRECT), unaligned (refused)
def test_reads_and_hash_equal_the_file(tmp_path, monkeypatch, start):
    monkeypatch.setattr(rb, "WINDOW", 16 << 10)
    rng = random.Random(7)
    size = 37 * (16 << 10) + 8192  # a short last window
    body = rng.randbytes(size)
    path = tmp_path / "img"
    path.write_bytes(rng.randbytes(start) + body + rng.randbytes(5000))
    h = hashlib.sha256()
    data = ReadBack(path, start, size, h.update)
    try:
        # forward reads inside windows and across two, a skip over windows, a read behind the
        # current window, one past the partition's end
        reads = [(0, 4096), (4096, 20000), (24096, 100), (200000, 30000), (5000, 70000),
                 (230000, 16 << 10), (size - 1000, 4096)]
        for off, n in reads:
            got = bytes(data.pread(n, off))
            assert got == body[off:off + n], (off, n)
        assert data.pread(10, size) == b""
        data.finish()
    finally:
        data.close()
    assert h.hexdigest() == hashlib.sha256(body).hexdigest()


def test_finish_alone_hashes_the_whole_range(tmp_path, monkeypatch):
    """A self-check that reads nothing (no volume maps a block) still feeds every byte."""
    monkeypatch.setattr(rb, "WINDOW", 8 << 10)
    body = random.Random(3).randbytes(11 * (8 << 10))
    path = tmp_path / "img"
    path.write_bytes(bytes(4096) + body)
    h = hashlib.sha256()
    data = ReadBack(path, 4096, len(body), h.update)
    try:
        data.finish()
    finally:
        data.close()
    assert h.hexdigest() == hashlib.sha256(body).hexdigest()


def test_a_failed_constructor_leaves_no_descriptor(tmp_path, monkeypatch):
    """A reader whose set-up fails after opening the file (here: no memory for its ring)
    closes what it opened: the caller never gets an object to close."""
    import os

    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 16))

    def no_memory(*_a, **_k):
        raise MemoryError("ring")

    monkeypatch.setattr(rb.mmap, "mmap", no_memory)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(MemoryError):
        ReadBack(path, 0, 1 << 16, lambda _v: None)
    assert set(os.listdir("/proc/self/fd")) <= before
