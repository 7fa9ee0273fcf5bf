"""`dmimage export`: a thin volume's bytes, computed independently from the pool description
(mappings → data file offsets) for metadata restored by thin_restore 1.1."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from dmimage import open_pool
from dmimage.cli.main import main
from dmimage.errors import DeviceError
from dmimage.thin.export import export_thin

import poolgen

BS = 128 * 512


def expected_content(desc: poolgen.Pool, dev_id: int, data: bytes, size: int) -> bytes:
    out = bytearray(size)
    for origin, block, _t in desc.device(dev_id).mapping_list():
        start = origin * BS
        if start >= size:
            continue
        chunk = data[block * BS : (block + 1) * BS]
        out[start : start + BS] = chunk[: size - start]
    return bytes(out)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, 1024 * BS, dtype=np.uint8).tobytes()
    p = tmp_path_factory.mktemp("data") / "data.img"
    p.write_bytes(raw)
    return p, raw


def test_every_thin_exports_exactly(thins3_meta, data_file, tmp_path):
    path, raw = data_file
    desc = thins3_meta.pool
    with open_pool(thins3_meta.path) as pool:
        for d in desc.devices:
            size = (int(d.mappings[:, 0].max()) + 1) * BS
            out = tmp_path / f"thin{d.dev_id}.img"
            assert export_thin(pool, path, d.dev_id, out) == size
            assert out.read_bytes() == expected_content(desc, d.dev_id, raw, size)
            # unmapped blocks are holes, not written zeros
            assert os.stat(out).st_blocks * 512 <= len(d.mappings) * BS + 4096


def test_snapshot_pool_exports_shared_blocks(snapshot_meta, data_file, tmp_path):
    path, raw = data_file
    desc = snapshot_meta.pool
    with open_pool(snapshot_meta.path) as pool:
        for d in desc.devices:
            size = 3 * 1024 * BS + 12345  # not a block multiple, beyond the mapped end
            out = tmp_path / f"s{d.dev_id}.img"
            export_thin(pool, path, d.dev_id, out, size=size)
            assert out.read_bytes() == expected_content(desc, d.dev_id, raw, size)


def test_cli_stdout_and_size(thins3_meta, data_file, tmp_path, capfdbinary):
    path, raw = data_file
    dev = thins3_meta.pool.devices[0]
    rc = main(["export", str(thins3_meta.path), str(path), "--dev-id", str(dev.dev_id),
               "--size", "1M", "-o", "-"])
    out = capfdbinary.readouterr().out
    assert rc == 0
    assert hashlib.sha256(out).digest() == hashlib.sha256(
        expected_content(thins3_meta.pool, dev.dev_id, raw, 1 << 20)).digest()


def test_data_file_too_small(thins3_meta, tmp_path, capsys):
    small = tmp_path / "small.img"
    small.write_bytes(bytes(BS))
    with open_pool(thins3_meta.path) as pool, pytest.raises(DeviceError):
        export_thin(pool, small, thins3_meta.pool.devices[0].dev_id, tmp_path / "o.img")
    assert not (tmp_path / "o.img").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["small.img"]


def test_unknown_device_cli(thins3_meta, data_file, tmp_path, capsys):
    rc = main(["export", str(thins3_meta.path), str(data_file[0]), "--dev-id", "77", "-o",
               str(tmp_path / "x")])
    assert rc == 2 and "no thin device with id 77" in capsys.readouterr().err


def test_empty_volume_has_size_zero(empty_pool_meta, data_file, tmp_path):
    desc = poolgen.Pool(nr_data_blocks=1024, devices=[poolgen.Device(5)])
    from oracles import restore

    meta = tmp_path / "e.meta"
    restore(poolgen.to_xml(desc), meta, empty_pool_meta.tools, 64)
    with open_pool(meta) as pool:
        assert export_thin(pool, data_file[0], 5, tmp_path / "v.img") == 0
    assert (tmp_path / "v.img").stat().st_size == 0
