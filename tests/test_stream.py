"""Streaming readers (issue 11) against thin-provisioning-tools 1.1 and the whole-pool path.

The pool is a multi-level mapping tree restored by thin_restore 1.1, then snapshotted and
written through offline transactions, so devices share whole trees, internal subtrees and
single leaves, as a kernel's snapshots do. Every streaming reader runs with tiny batches (a
few leaves, a few hundred rows), so runs, documents and counts cross many batch boundaries;
the output must be byte-identical to 1.1's and to the whole-pool path's.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmimage.pdata import leaves
from dmimage.thin import check as check_mod
from dmimage.thin.dump import EMITTERS, pool_to_ir, render, stream_dump, write_dump
from dmimage.thin.pool import open_pool
from dmimage.thin.transaction import open_writable

import oracles
import poolgen

BS = 128 * 512
LS_FIELDS = ("DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,HIGHEST_BLOCK,"
             "MAPPED_SECTORS,TRANSACTION,CREATE_TIME,SNAP_TIME")


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory: pytest.TempPathFactory, tools11: oracles.Tools
                ) -> tuple[Path, Path]:
    """Device 1: 40,000 scattered mappings (a 2-level tree of ~160 full leaves, as
    thin_restore 1.1 lays it out); 2: a snapshot of 1 with a few writes (shares most leaves
    with 1); 3: a snapshot of 2, untouched (2's whole tree); 4: a snapshot of 1 with writes
    spread over its range; 5: an empty thin; 6: long runs."""
    d = tmp_path_factory.mktemp("stream")
    pool = poolgen.multilevel_pool(40_000, dev_id=1, seed=11)
    # 6: long runs (origin and data contiguous, some time changes) spanning many leaves, so
    # runs cross batch boundaries
    n6 = 5_000
    base = pool.nr_data_blocks
    times6 = (np.arange(n6) // 1_700) % 2
    pool.devices.append(poolgen.Device(dev_id=6, mappings=np.stack(
        [np.arange(n6) + 7, np.arange(n6) + base, times6], axis=1)))
    pool.nr_data_blocks += n6
    meta = d / "pool.meta"
    xml = d / "pool.xml"
    xml.write_text(poolgen.to_xml(pool))
    oracles.restore_file(xml, meta, tools11, 4096)
    data = d / "pool.data"
    with open(data, "wb") as f:
        f.truncate(pool.nr_data_blocks * 2 * BS)
    with open_writable(meta, data) as wp:
        wp.create_snap(2, 1)
        for v in (5, 6, 7, 300, 3000, 3001, 90_000):
            wp.write(2, v * BS, b"two" * 7)
        wp.create_snap(3, 2)
        wp.create_snap(4, 1)
        for v in range(10, 120_000, 9_000):
            wp.write(4, v * BS + 512, b"four")
        wp.create_thin(5)
        wp.commit()
    rc, out, err = oracles.check(meta, tools11)
    assert rc == 0, err
    return meta, data


@pytest.fixture
def tiny_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leaves, "BATCH_LEAVES", 3)
    monkeypatch.setattr(render, "FLUSH_ROWS", 100)
    monkeypatch.setattr(render, "CHUNK_ROWS", 37)
    monkeypatch.setattr(check_mod, "DATA_BATCH", 50)


def _tool(tools: oracles.Tools, name: str, *args: str) -> bytes:
    return subprocess.run([str(tools.bindir / name), *args], check=True,
                          capture_output=True).stdout


def _ours(*args: str) -> bytes:
    """dmimage in this process, so the tiny batches apply."""
    from dmimage.cli.main import main

    buf = io.BytesIO()
    real = sys.stdout
    wrapper = io.TextIOWrapper(buf, write_through=True)
    sys.stdout = wrapper
    try:
        rc = main(list(args))
        wrapper.flush()
    finally:
        sys.stdout = real
        wrapper.detach()
    assert rc == 0
    return buf.getvalue()


def test_pool_shares_subtrees(shared_pool: tuple[Path, Path]) -> None:
    """The fixture really has the sharing the test is about: a whole tree (3 and 2), and
    leaves under different roots (2 and 1, 4 and 1)."""
    meta, _ = shared_pool
    with open_pool(meta) as pool:
        roots = pool.mapping_roots()
        assert roots[2] == roots[3]
        lists = {dev: set(leaves.leaf_blocks(pool.reader, r, 8).tolist())
                 for dev, r in roots.items()}
    assert len(lists[1]) > 100 and lists[1] & lists[2] and lists[1] & lists[4]
    assert lists[1] != lists[2] and lists[1] != lists[4]


@pytest.mark.parametrize("args", [(), ("--dev-id", "2", "--dev-id", "4"), ("--dev-id", "3")])
@pytest.mark.parametrize("fmt", ["xml", "human_readable"])
def test_dump_identical_to_thin_dump_11(shared_pool: tuple[Path, Path], tools11: oracles.Tools,
                                        tiny_batches: None, fmt: str, args: tuple[str, ...]
                                        ) -> None:
    meta, _ = shared_pool
    want = _tool(tools11, "thin_dump", "-f", fmt, *args, str(meta))
    assert b"<ref " in want or b"ref:" in want or args == ("--dev-id", "3")
    assert _ours("dump", str(meta), "-f", fmt, *args) == want


@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("fmt", ["xml", "human_readable", "json"])
def test_dump_identical_to_whole_pool_path(shared_pool: tuple[Path, Path], tiny_batches: None,
                                           fmt: str, expand: bool) -> None:
    meta, _ = shared_pool
    with open_pool(meta) as pool:
        whole = io.BytesIO()
        write_dump(pool_to_ir(pool, share=not expand), whole, fmt, expand=expand)
        streamed = io.BytesIO()
        stream_dump(pool, streamed, EMITTERS[fmt](), expand=expand)
    assert streamed.getvalue() == whole.getvalue()
    assert len(whole.getvalue()) > 40 * render.FLUSH_ROWS  # many flushes happened
    # device 6's first run: 1,700 blocks over several leaves and batches, at data block
    # 80,000 (multilevel_pool's nr_data_blocks: twice its 40,000 mappings)
    first_run = {"xml": b'<range_mapping origin_begin="7" data_begin="80000" length="1700" '
                        b'time="0"/>',
                 "human_readable": b"(7..1706) -> (80000..81699), 0",
                 "json": b"[7, 80000, 1700, 0]"}[fmt]
    assert first_run in streamed.getvalue()


def test_ls_identical_to_thin_ls_11(shared_pool: tuple[Path, Path], tools11: oracles.Tools,
                                    tiny_batches: None) -> None:
    meta, _ = shared_pool
    want = _tool(tools11, "thin_ls", "--format", LS_FIELDS, str(meta))
    got = _ours("ls", str(meta), "-o", LS_FIELDS)
    assert got == want
    rows = [line.split() for line in got.decode().splitlines()[1:]]
    assert any(int(r[3]) not in (0, int(r[1])) for r in rows)  # partly shared devices


@pytest.mark.parametrize("regions", [["0..80000"], ["0..7", "100..30000", "50000..50001"]])
def test_rmap_identical_to_thin_rmap_11(shared_pool: tuple[Path, Path], tools11: oracles.Tools,
                                        tiny_batches: None, regions: list[str]) -> None:
    meta, _ = shared_pool
    args = [a for r in regions for a in ("--region", r)]
    want = _tool(tools11, "thin_rmap", *args, str(meta))
    assert want.count(b"\n") > 10
    assert _ours("rmap", str(meta), *args) == want


def test_check_same_report_in_tiny_batches(shared_pool: tuple[Path, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting data references a few mappings at a time gives the report of one batch;
    a mis-counted reference would show as a count mismatch in the data space map."""
    meta, _ = shared_pool
    whole = check_mod.check_metadata(meta).to_json()
    assert whole["ok"] and whole["nr_mappings"] > 80_000
    monkeypatch.setattr(check_mod, "DATA_BATCH", 7)
    assert check_mod.check_metadata(meta).to_json() == whole


def test_export_runs_identical_to_whole_tree(shared_pool: tuple[Path, Path],
                                            tiny_batches: None) -> None:
    """The runs export copies, read three leaves at a time, are the runs of the device's
    whole mapping tree at once (runs crossing batch boundaries merged back)."""
    meta, _ = shared_pool
    from dmimage.thin.dump.stream import leaf_runs
    from dmimage.thin.export import _extent
    from dmimage.thin.ir import Runs

    with open_pool(meta) as pool:
        for dev in (1, 2, 3, 4, 5, 6):
            ext = _extent(pool, dev)
            assert len(ext.leaves) > 3 * leaves.BATCH_LEAVES or dev == 5
            m = pool.mappings(dev)
            want = Runs.from_blocks(m.origin, m.data, m.time)
            got = Runs.concat(list(leaf_runs(pool.reader, ext.leaves)))
            for f in ("origin_begin", "data_begin", "length", "time"):
                assert np.array_equal(getattr(got, f), getattr(want, f)), (dev, f)
            assert ext.end_block == (int(m.origin[-1]) + 1 if len(m) else 0)


def test_export_identical_to_transaction_reads(shared_pool: tuple[Path, Path],
                                               tiny_batches: None, tmp_path: Path) -> None:
    """The first 400 blocks of each device, exported in tiny batches, equal what
    WritablePool.read (the transaction's own lookups) returns."""
    meta, data = shared_pool
    from dmimage.thin.export import export_thin

    size = 400 * BS
    with open_pool(meta) as pool:
        for dev in (1, 2, 4):
            export_thin(pool, data, dev, tmp_path / f"{dev}.img", size=size)
    with open_writable(meta, data) as wp:
        for dev in (1, 2, 4):
            want = wp.read(dev, 0, size)
            assert (tmp_path / f"{dev}.img").read_bytes() == want
            assert (b"two" in want) == (dev == 2) and (b"four" in want) == (dev == 4)


@pytest.mark.parametrize("pair", [(1, 2), (1, 4), (2, 3), (6, 1), (5, 4)])
def test_delta_identical_to_thin_delta_11(shared_pool: tuple[Path, Path],
                                          tools11: oracles.Tools, tiny_batches: None,
                                          pair: tuple[int, int]) -> None:
    meta, _ = shared_pool
    a, b = (str(x) for x in pair)
    for verbose in ((), ("--verbose",)):
        want = _tool(tools11, "thin_delta", "--snap1", a, "--snap2", b, *verbose, str(meta))
        assert _ours("delta", str(meta), "--thin1", a, "--thin2", b, *verbose) == want


@pytest.mark.parametrize("block", [61, 4096])
def test_restore_input_streamed(shared_pool: tuple[Path, Path], tools11: oracles.Tools,
                                tmp_path: Path, block: int) -> None:
    """thin_dump 1.1's XML of the shared pool (defs, refs, long runs), parsed by the bulk
    path ``block`` bytes at a time, is the pool the whole-input parse gives, and restores to
    what thin_restore 1.1 makes of it (as thin_dump 1.1 sees both)."""
    from dmimage.thin.dump import xml_bytes
    from dmimage.thin.dump.fastxml import parse_canonical_file
    from dmimage.thin.dump.xml import _XmlParser, parse_xml
    from dmimage.thin.restore import restore

    meta, _ = shared_pool
    text = _tool(tools11, "thin_dump", str(meta))
    assert b"<ref " in text and b"<range_mapping" in text
    src = tmp_path / "in.xml"
    src.write_bytes(text)
    p = _XmlParser(str(src))
    with open(src, "rb") as f:
        parse_canonical_file(f, p, block)  # NotCanonical would fail the test
    assert xml_bytes(p.result()) == text
    ir = parse_xml(src)
    assert xml_bytes(ir) == text
    out, theirs = tmp_path / "out.meta", tmp_path / "theirs.meta"
    for path in (out, theirs):
        with open(path, "wb") as f:
            f.truncate(4096 * 4096)
    restore(ir, out)
    _tool(tools11, "thin_restore", "-i", str(src), "-o", str(theirs))
    # def names are leaf block numbers: both restores place the leaves alike
    assert _tool(tools11, "thin_dump", str(out)) == _tool(tools11, "thin_dump", str(theirs))
