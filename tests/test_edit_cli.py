"""`dmimage message`, `write`, `discard`: the CLI over WritablePool, judged by thin_dump 1.1,
thin_check 1.1 and the reference model."""

from __future__ import annotations

import numpy as np
import pytest

from dmimage.cli.main import main
from dmimage.thin.export import export_thin
from dmimage.thin.model import PoolModel
from dmimage.thin.pool import open_pool

import oracles
import poolgen
import semantic

BS = 65536


@pytest.fixture
def pool_files(tmp_path, tools11):
    meta, data = tmp_path / "p.meta", tmp_path / "p.data"
    oracles.restore(poolgen.to_xml(poolgen.empty_pool(256)), meta, tools11, 256)
    with open(data, "wb") as f:
        f.truncate(256 * BS)
    return meta, data


def test_messages_then_dump(pool_files, tools11, capsys):
    meta, _ = pool_files
    assert main(["message", str(meta), "create_thin 1", "create_thin 2", "create_snap 3 1",
                 "set_transaction_id 0 42", "delete 2"]) == 0
    assert oracles.check(meta, tools11)[0] == 0
    dumped = semantic.parse_xml(oracles.dump(meta, tools11))
    assert (dumped.time, dumped.transaction) == (1, 42)
    assert [(d.dev_id, d.creation_time, d.snap_time) for d in dumped.devices] == [
        (1, 0, 1), (3, 1, 1)]


@pytest.mark.parametrize(("msgs", "rc"), [
    (["create_thin 1", "create_thin 1"], 1),  # exists
    (["create_snap 2 9"], 1),  # no origin
    (["set_transaction_id 5 6"], 1),  # wrong old id
    (["frobnicate 1"], 2),
    (["create_thin"], 2),
    (["create_thin x"], 2),
    (["create_thin 16777216"], 2),
])
def test_refused_messages_write_nothing(pool_files, msgs, rc, capsys):
    meta, _ = pool_files
    before = meta.read_bytes()
    assert main(["message", str(meta), *msgs]) == rc
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert meta.read_bytes() == before


def test_write_and_discard_match_the_model(pool_files, tmp_path, tools11, capsys):
    meta, data = pool_files
    model = PoolModel(BS)
    main(["message", str(meta), "create_thin 5"])
    model.create_thin(5)
    rng = np.random.default_rng(3)
    for _ in range(6):
        n = int(rng.integers(1, 3 * BS))
        off = int(rng.integers(0, 10 * BS))
        buf = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        src = tmp_path / "in.bin"
        src.write_bytes(buf)
        assert main(["write", str(meta), str(data), "--dev-id", "5", "--offset", str(off),
                     "-i", str(src)]) == 0
        model.write(5, off, buf)
    assert main(["discard", str(meta), str(data), "--dev-id", "5", "--offset", str(BS // 2),
                 "--length", str(3 * BS)]) == 0
    model.discard(5, BS // 2, 3 * BS)
    assert oracles.check(meta, tools11)[0] == 0
    out = tmp_path / "v.img"
    with open_pool(meta) as pool:
        export_thin(pool, data, 5, out)
        assert pool.data_space_map().nr_allocated == model.used_data_blocks()
    assert out.read_bytes() == model.read(5, 0, model.highest_mapped_end(5))
