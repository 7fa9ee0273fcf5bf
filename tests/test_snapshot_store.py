"""dm-snapshot exception stores: hand-built byte fixtures (struct.pack of the kernel's layout,
written here, not by dmimage) against the reader, check, export and merge.

The kernel's own stores are read in vmtests/test_snapshot_guest.py."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmimage.cli.main import main
from dmimage.format.snapshot_cow import HEADER, DiskHeader
from dmimage.snapshot.store import StoreState, open_store

MAGIC = 0x70416E53


def kernel_chunks(n: int, per_area: int) -> list[int]:
    """The COW chunks the kernel hands out, in order: from 2, skipping each area's chunk."""
    out, nxt = [], 2
    while len(out) < n:
        if nxt % (per_area + 1) == 1:
            nxt += 1
        out.append(nxt)
        nxt += 1
    return out


def build_store(chunk_sectors: int, pairs: list[tuple[int, int]], cow_chunks: int, *,
                valid: int = 1, version: int = 1, magic: int = MAGIC) -> bytearray:
    cb = chunk_sectors * 512
    per = cb // 16
    buf = bytearray(cow_chunks * cb)
    struct.pack_into("<IIII", buf, 0, magic, valid, version, chunk_sectors)
    for i, (old, new) in enumerate(pairs):
        area, slot = divmod(i, per)
        struct.pack_into("<QQ", buf, (1 + area * (per + 1)) * cb + slot * 16, old, new)
        buf[new * cb:(new + 1) * cb] = chunk_pattern(old, new, cb)
    return buf


def chunk_pattern(old: int, new: int, cb: int) -> bytes:
    return hashlib.sha256(f"{old}:{new}".encode()).digest() * (cb // 32)


def origin_bytes(nr_chunks: int, cb: int) -> bytearray:
    rng = np.random.default_rng(7)
    return bytearray(rng.integers(0, 256, nr_chunks * cb, dtype=np.uint8).tobytes())


def expected_view(origin: bytes, pairs: list[tuple[int, int]], cb: int) -> bytes:
    view = bytearray(origin)
    for old, new in pairs:
        view[old * cb:(old + 1) * cb] = chunk_pattern(old, new, cb)
    return bytes(view)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def two_areas(tmp_path: Path) -> tuple[Path, Path, list[tuple[int, int]], bytes]:
    """Chunk size 1 sector: 32 exceptions per area; 40 exceptions fill area 0 and start 1."""
    per = 32
    olds = [int(x) for x in np.random.default_rng(3).permutation(100)[:40]]
    pairs = list(zip(olds, kernel_chunks(40, per), strict=True))
    cow, origin = tmp_path / "cow", tmp_path / "origin"
    cow.write_bytes(build_store(1, pairs, 120))
    org = origin_bytes(100, 512)
    origin.write_bytes(org)
    return cow, origin, pairs, bytes(org)


def test_layout_twins_agree() -> None:
    raw = DiskHeader.build({"magic": MAGIC, "valid": 1, "version": 1, "chunk_size": 16})
    assert HEADER.unpack(raw) == (MAGIC, 1, 1, 16)


def test_reader_follows_areas(two_areas: tuple[Path, Path, list[tuple[int, int]], bytes]) -> None:
    cow, _, pairs, _ = two_areas
    fd, store = open_store(str(cow))
    os.close(fd)
    assert store.state is StoreState.VALID and store.chunk_sectors == 1
    assert list(zip(store.old.tolist(), store.new.tolist(), strict=True)) == pairs
    assert store.areas == 2
    # As the kernel computes them (persistent_usage): next_free one past the last data chunk,
    # metadata = header + 2 areas.
    assert store.allocated_sectors == (pairs[-1][1] + 1) * 1
    assert store.metadata_sectors == 3


def test_check_clean_and_counts(capsys: pytest.CaptureFixture[str],
                                two_areas: tuple[Path, Path, list[tuple[int, int]], bytes]) -> None:
    cow, origin, pairs, _ = two_areas
    rc, out, _ = run(capsys, "snapshot", "check", str(cow), str(origin), "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["problems"] == []
    assert rep["exceptions"] == 40 and rep["areas"] == 2 and rep["total_sectors"] == 120


def test_dump_lists_pairs(capsys: pytest.CaptureFixture[str],
                          two_areas: tuple[Path, Path, list[tuple[int, int]], bytes]) -> None:
    cow, _, pairs, _ = two_areas
    rc, out, _ = run(capsys, "snapshot", "dump", str(cow))
    assert rc == 0
    rows = [tuple(map(int, line.split())) for line in out.splitlines()
            if line and line[0].isdigit()]
    assert rows == pairs


def test_export_is_origin_plus_exceptions(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          two_areas: tuple[Path, Path, list[tuple[int, int]],
                                                           bytes]) -> None:
    cow, origin, pairs, org = two_areas
    out = tmp_path / "view"
    rc, _, err = run(capsys, "snapshot", "export", str(cow), str(origin), "-o", str(out))
    assert rc == 0, err
    assert out.read_bytes() == expected_view(org, pairs, 512)
    # stdout gives the same bytes (a subprocess: main() writes to the real stdout buffer)
    res = subprocess.run([sys.executable, "-m", "dmimage", "snapshot", "export", str(cow),
                          str(origin), "-o", "-"], capture_output=True, check=True)
    assert res.stdout == out.read_bytes()


def test_export_leaves_holes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cb = 8 * 512
    cow, origin = tmp_path / "cow", tmp_path / "origin"
    pairs = [(1000, 2)]
    cow.write_bytes(build_store(8, pairs, 8))
    with open(origin, "wb") as f:
        f.truncate(64 << 20)  # sparse, all zeros
    out = tmp_path / "view"
    assert run(capsys, "snapshot", "export", str(cow), str(origin), "-o", str(out))[0] == 0
    assert out.stat().st_size == 64 << 20
    assert out.stat().st_blocks * 512 < 8 << 20
    with open(out, "rb") as f:
        f.seek(1000 * cb)
        assert f.read(cb) == chunk_pattern(1000, 2, cb)


def test_merge_makes_origin_the_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         two_areas: tuple[Path, Path, list[tuple[int, int]],
                                                          bytes]) -> None:
    cow, origin, pairs, org = two_areas
    want = expected_view(org, pairs, 512)
    before = cow.read_bytes()
    rc, out, _ = run(capsys, "snapshot", "merge", str(cow), str(origin), "--dry-run")
    assert rc == 0 and "40 chunks" in out
    assert cow.read_bytes() == before and origin.read_bytes() == org
    rc, _, err = run(capsys, "snapshot", "merge", str(cow), str(origin))
    assert rc == 0, err
    assert origin.read_bytes() == want
    fd, store = open_store(str(cow))
    os.close(fd)
    assert store.state is StoreState.VALID and len(store.old) == 0
    # the emptied store over the merged origin still shows the snapshot's content
    view = tmp_path / "view"
    assert run(capsys, "snapshot", "export", str(cow), str(origin), "-o", str(view))[0] == 0
    assert view.read_bytes() == want


def test_interrupted_merge_finishes_on_rerun(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        two_areas: tuple[Path, Path, list[tuple[int, int]], bytes]) -> None:
    import dmimage.ordered_write as view

    cow, origin, pairs, org = two_areas
    real = view.pwrite_all
    calls = 0

    def dying(fd: int, bufs: list[memoryview], off: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 17:
            raise KeyboardInterrupt
        real(fd, bufs, off)

    monkeypatch.setattr(view, "pwrite_all", dying)
    assert run(capsys, "snapshot", "merge", str(cow), str(origin))[0] == 130
    monkeypatch.setattr(view, "pwrite_all", real)
    assert origin.read_bytes() != org  # some chunks landed
    assert run(capsys, "snapshot", "merge", str(cow), str(origin))[0] == 0
    assert origin.read_bytes() == expected_view(org, pairs, 512)


def test_blank_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cow = tmp_path / "cow"
    cow.write_bytes(bytes(64 << 10))
    rc, out, _ = run(capsys, "snapshot", "check", str(cow))
    assert rc == 0 and "blank store" in out


@pytest.mark.parametrize("damage,field", [
    (dict(magic=0x12345678), "header.magic"),
    (dict(version=2), "header.version"),
    (dict(chunk=3), "header.chunk_size"),
])
def test_bad_header(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    damage: dict[str, int], field: str) -> None:
    cow = tmp_path / "cow"
    buf = build_store(damage.get("chunk", 8), [(5, 2)], 8, magic=damage.get("magic", MAGIC),
                      version=damage.get("version", 1))
    cow.write_bytes(buf)
    for cmd in ("check", "dump"):
        rc, out, err = run(capsys, "snapshot", cmd, str(cow))
        assert rc == 1 and field in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_full_last_area_without_successor(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """32 exceptions fill area 0 exactly; area 1 would be chunk 34, past a 34-chunk device."""
    pairs = list(zip(range(32), kernel_chunks(32, 32), strict=True))
    cow = tmp_path / "cow"
    cow.write_bytes(build_store(1, pairs, 34))
    rc, _, err = run(capsys, "snapshot", "check", str(cow))
    assert rc == 1 and "block 34" in err and "metadata area 1" in err


@pytest.mark.parametrize("pairs,needle", [
    ([(1, 2), (2, 50)], "past the end of the COW device"),
    ([(1, 2), (2, 34)], "metadata area's chunk"),
    ([(1, 2), (2, 2)], "already holds"),
    ([(1, 2), (1, 3)], "ambiguous"),
])
def test_problems_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        pairs: list[tuple[int, int]], needle: str) -> None:
    cow, origin = tmp_path / "cow", tmp_path / "origin"
    buf = build_store(1, pairs[:1], 40)
    struct.pack_into("<QQ", buf, 512 + 16, *pairs[1])  # second entry, without its data
    cow.write_bytes(buf)
    origin.write_bytes(bytes(100 * 512))
    rc, out, _ = run(capsys, "snapshot", "check", str(cow))
    assert rc == 1 and needle in out and "area 0 entry 1" in out
    before = origin.read_bytes()
    rc, _, err = run(capsys, "snapshot", "merge", str(cow), str(origin))
    assert rc == 1 and needle in err and origin.read_bytes() == before


def test_invalidated_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cow, origin = tmp_path / "cow", tmp_path / "origin"
    cow.write_bytes(build_store(1, [(1, 2)], 8, valid=0))
    origin.write_bytes(bytes(8 * 512))
    rc, out, _ = run(capsys, "snapshot", "check", str(cow))
    assert rc == 1 and "invalidated" in out
    rc, _, err = run(capsys, "snapshot", "export", str(cow), str(origin), "-o",
                     str(tmp_path / "v"))
    assert rc == 1 and "header.valid" in err and not (tmp_path / "v").exists()


def _mutations() -> object:
    from hypothesis import strategies as st

    return st.lists(st.tuples(st.integers(0, 40 * 512 - 1), st.integers(0, 255)), max_size=12)


def test_fuzz_reader_never_crashes(tmp_path: Path) -> None:
    """Byte mutations of a two-area store (header, areas, data): every outcome is a store or a
    DmimageError; a store's view and its problems are computed without any other exception."""
    from hypothesis import given, settings

    from dmimage.errors import DmimageError
    from dmimage.snapshot.check import store_problems
    from dmimage.snapshot.store import read_store
    from dmimage.snapshot.view import iter_view

    pairs = list(zip(range(40), kernel_chunks(40, 32), strict=True))
    base = bytes(build_store(1, pairs, 120))
    origin = tmp_path / "origin"
    origin.write_bytes(bytes(64 * 512))
    cow = tmp_path / "cow"

    @settings(max_examples=300)
    @given(_mutations())  # type: ignore[misc]
    def one(muts: list[tuple[int, int]]) -> None:
        buf = bytearray(base)
        for off, val in muts:
            buf[off] = val
        cow.write_bytes(buf)
        cfd = os.open(cow, os.O_RDONLY)
        ofd = os.open(origin, os.O_RDONLY)
        try:
            store = read_store(cfd, str(cow))
            store_problems(store, 64 * 512)
            for _ in iter_view(store, cfd, ofd, 64 * 512, str(origin)):
                pass
        except DmimageError as exc:
            assert str(exc) and "\n" not in str(exc)
        finally:
            os.close(cfd)
            os.close(ofd)

    one()
