"""Fuzz the dm-cache and dm-era readers: byte mutations of metadata written by cache_restore /
era_restore 1.1. Every outcome is a result or a one-line DmimageError; never another
exception (a traceback for the user)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from restore_xml import cache_xml as cache_xml_in
from restore_xml import era_xml as era_xml_in

from dmimage.cache.check import check_cache
from dmimage.cache.dump import cache_xml
from dmimage.cache.metadata import read_cache
from dmimage.era.check import check_era
from dmimage.era.dump import era_xml
from dmimage.era.invalidate import blocks_written_since
from dmimage.era.metadata import parse_superblock, read_era
from dmimage.errors import DmimageError
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker

import oracles

TOOLS = oracles.tools_11()


def _restore(tool: str, xml: str, tmp: Path, name: str, *extra: str) -> bytes:
    src, meta = tmp / f"{name}.xml", tmp / f"{name}.meta"
    src.write_text(xml)
    with open(meta, "wb") as f:
        f.truncate(1 << 20)
    subprocess.run([str(TOOLS.bindir / tool), "-i", str(src), "-o", str(meta), *extra],
                   check=True, capture_output=True)
    data = meta.read_bytes()
    used = max(i for i in range(len(data) // 4096) if any(data[i * 4096:(i + 1) * 4096])) + 1
    return data[:used * 4096]


def _mutations(size: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    return st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), min_size=1,
                    max_size=8)


def _one_line(exc: DmimageError) -> None:
    assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("version", ["1", "2"])
def test_fuzz_cache_reader(tmp_path: Path, version: str) -> None:
    import random

    base = _restore("cache_restore", cache_xml_in(random.Random(1), 3000, 0.5), tmp_path,
                    f"c{version}", "--metadata-version", version)
    meta = tmp_path / "fuzz.meta"

    @settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_mutations(len(base)))  # type: ignore[misc]
    def one(muts: list[tuple[int, int]]) -> None:
        buf = bytearray(base)
        for off, val in muts:
            buf[off] = val
        meta.write_bytes(buf)
        try:
            check_cache(str(meta))
        except DmimageError as exc:
            _one_line(exc)
        try:
            with BlockReader(meta) as r:
                cache_xml(read_cache(r))
        except DmimageError as exc:
            _one_line(exc)

    one()


def test_fuzz_era_reader(tmp_path: Path) -> None:
    import random

    base = _restore("era_restore", era_xml_in(random.Random(2), 3000, [5, 6, 7], 7), tmp_path,
                    "e")
    meta = tmp_path / "fuzz.meta"

    @settings(max_examples=150)
    @given(_mutations(len(base)))  # type: ignore[misc]
    def one(muts: list[tuple[int, int]]) -> None:
        buf = bytearray(base)
        for off, val in muts:
            buf[off] = val
        meta.write_bytes(buf)
        try:
            check_era(str(meta))
        except DmimageError as exc:
            _one_line(exc)
        try:
            with BlockReader(meta) as r:
                sb = parse_superblock(r.block(0))
                era_xml(read_era(BtreeWalker(r), sb), logical=True)
                blocks_written_since(BtreeWalker(r), sb, 6)
        except DmimageError as exc:
            _one_line(exc)

    one()
