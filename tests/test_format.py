"""dmimage format: an empty pool in the kernel's bootstrap layout, accepted by both thin_checks."""

from __future__ import annotations

import struct

import pytest

from dmimage.cli.main import main
from dmimage.errors import OutputTooSmallError, UsageError
from dmimage.format.checksum import sniff_block_type
from dmimage.thin.format_pool import format_pool
from dmimage.thin.pool import open_pool

import oracles


def _node(block: bytes) -> tuple[int, int, int, int]:
    _, flags, blocknr, nr, mx, vs, _ = struct.unpack_from("<IIQIIII", block)
    return flags, nr, mx, vs


@pytest.mark.parametrize("meta_bytes,dbs,nr_data", [
    (4 << 20, 128, 1024),
    (4 << 20, 128, 0),
    (64 << 20, 1024, 100_000),
    (100 << 20, 128, 5_000_000),       # more data bitmaps than one index leaf holds
    (17 << 30, 2_097_152, 3_000_000),  # metadata clamped to 4,161,600 blocks: 255 bitmaps
])
def test_format_checks_and_dumps(meta_bytes, dbs, nr_data, tmp_path, tools09, tools11):
    meta = tmp_path / "pool.meta"
    with open(meta, "wb") as f:
        f.truncate(meta_bytes)
    assert main(["format", str(meta), "--data-block-size", str(dbs),
                 "--nr-data-blocks", str(nr_data)]) == 0
    for tools in (tools11, tools09):
        rc, _, err = oracles.check(meta, tools)
        assert rc == 0, f"thin_check {tools.series}: {err[-2000:]}"
    dump = oracles.dump(meta, tools11)
    assert dump.strip() == (f'<superblock uuid="" time="0" transaction="0" version="2" '
                            f'data_block_size="{dbs}" nr_data_blocks="{nr_data}">\n'
                            "</superblock>")
    nr_meta = min(meta_bytes // 4096, 4_161_600)
    nbm = -(-nr_meta // 16320)
    with open(meta, "rb") as f:
        blocks = [f.read(4096) for _ in range(3 + nbm + 4)]
    # kernel bootstrap order: index, metadata ref-count root, bitmaps, then the other roots
    assert sniff_block_type(blocks[0]) == "superblock"
    assert sniff_block_type(blocks[1]) == "metadata space map index"
    assert _node(blocks[2]) == (2, 0, 336, 4)
    assert all(sniff_block_type(b) == "space map bitmap" for b in blocks[3:3 + nbm])
    data_index, data_rc, mapping, details = blocks[3 + nbm:3 + nbm + 4]
    assert _node(data_rc) == (2, 0, 336, 4)
    assert _node(mapping) == (2, 0, 252, 8)
    assert _node(details) == (2, 0, 126, 24)
    ndb = -(-nr_data // 16320)
    if ndb <= 168:
        assert _node(data_index) == (2, ndb, 168, 16)
    with open_pool(meta) as pool:
        sb = pool.superblock
        assert sb.metadata_nr_blocks == nr_meta
        assert pool.devices() == {}
        if ndb <= 168:  # superblock, index, ref-count root, bitmaps, 4 roots, data bitmaps
            assert pool.metadata_space_map().nr_allocated == 3 + nbm + 4 + ndb


def test_format_refuses_to_overwrite_metadata(tmp_path, capsys):
    meta = tmp_path / "pool.meta"
    with open(meta, "wb") as f:
        f.truncate(4 << 20)
    format_pool(meta, 128, 1000)
    before = meta.read_bytes()
    assert main(["format", str(meta), "--data-block-size", "128", "--nr-data-blocks", "5"]) == 2
    assert "--force" in capsys.readouterr().err
    assert meta.read_bytes() == before
    assert main(["format", str(meta), "--data-block-size", "128", "--nr-data-blocks", "5",
                 "--force"]) == 0
    assert meta.read_bytes() != before


@pytest.mark.parametrize("dbs", [0, 64, 100, 129, 4_194_304])
def test_format_bad_block_size(dbs, tmp_path, capsys):
    meta = tmp_path / "pool.meta"
    meta.write_bytes(bytes(4 << 20))
    assert main(["format", str(meta), "--data-block-size", str(dbs),
                 "--nr-data-blocks", "5"]) == 2
    assert "data block size" in capsys.readouterr().err
    assert meta.read_bytes() == bytes(4 << 20)
    with pytest.raises(UsageError):
        format_pool(meta, dbs, 5)


def test_format_too_small(tmp_path):
    meta = tmp_path / "pool.meta"
    meta.write_bytes(b"\x11" * (8 * 4096))
    with pytest.raises(OutputTooSmallError):
        format_pool(meta, 128, 5)
    assert meta.read_bytes() == b"\x11" * (8 * 4096)
    meta.write_bytes(b"\x11" * (16 * 4096))
    with pytest.raises(OutputTooSmallError):
        format_pool(meta, 128, 16320 * 20)  # 20 data bitmaps do not fit 16 blocks
    assert meta.read_bytes() == b"\x11" * (16 * 4096)
