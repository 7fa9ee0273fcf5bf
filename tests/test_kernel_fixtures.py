"""Metadata written by the real kernel (no VM needed): tests/fixtures/kernel/ holds pools that
Debian 12's and 13's dm-thin-pool wrote during seeded random sequences
(vmtests/test_kernel_writes.py, saved with DMIMAGE_SAVE_KERNEL_FIXTURES=DIR), each as

- NAME.meta.xz: the metadata device after teardown (xz; sparse 2-4 MiB),
- NAME.thin_dump-1.1.xml: thin_dump 1.1's dump of it,
- NAME.json: the seed, the operations, the pool's last status line and the model's facts.

dmimage check passes, dmimage dump equals thin_dump 1.1's byte for byte, thin_check 1.1
passes, and dmimage's reader agrees with the model and with the kernel's status line (used
metadata = the space map's nr_allocated + min(4096, nr_blocks // 10)).
"""

from __future__ import annotations

import io
import json
import lzma
from pathlib import Path

import pytest

from dmimage import open_pool
from dmimage.thin.check import check_metadata
from dmimage.thin.dump import dump_pool

import oracles

FIXTURES = Path(__file__).parent / "fixtures" / "kernel"
NAMES = sorted(p.name[: -len(".meta.xz")] for p in FIXTURES.glob("*.meta.xz"))


def test_fixtures_present():
    assert len(NAMES) >= 2, NAMES


@pytest.fixture(params=NAMES)
def fixture(request, tmp_path):
    name = request.param
    meta = tmp_path / f"{name}.meta"
    with lzma.open(FIXTURES / f"{name}.meta.xz") as f:
        meta.write_bytes(f.read())
    facts = json.loads((FIXTURES / f"{name}.json").read_text())
    xml = (FIXTURES / f"{name}.thin_dump-1.1.xml").read_bytes()
    return name, meta, facts, xml


def test_check_passes(fixture):
    _, meta, _, _ = fixture
    report = check_metadata(meta)
    assert report.ok(), [str(p) for p in report.problems]


def test_dump_matches_thin_dump_11_bytes(fixture):
    _, meta, _, xml = fixture
    buf = io.BytesIO()
    dump_pool(meta, buf)
    assert buf.getvalue() == xml


def test_reader_agrees_with_model_and_status(fixture):
    _, meta, facts, _ = fixture
    model, status = facts["model"], facts["status"]
    with open_pool(meta) as pool:
        sb = pool.superblock
        assert (sb.time, sb.trans_id) == (model["time"], model["transaction"])
        assert sb.trans_id == status["transaction_id"]
        assert (sb.held_root or None) == status["held_metadata_root"]
        devs = pool.devices()
        assert sorted(devs) == sorted(int(d) for d in model["devices"])
        for dev, want in model["devices"].items():
            d = devs[int(dev)]
            assert (d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time) == (
                want["mapped_blocks"], want["transaction"], want["creation_time"],
                want["snap_time"])
            assert pool.mappings(int(dev)).origin.tolist() == want["mapped"]
        meta_sm = pool.metadata_space_map()
        data_sm = pool.data_space_map()
        assert data_sm.nr_allocated == status["used_data_blocks"] == model["used_data_blocks"]
        nr_blocks = status["total_metadata_blocks"]
        assert nr_blocks == sb.metadata_sm.nr_blocks == facts["nr_metadata_blocks"]
        reserve = min(4096, nr_blocks // 10)
        assert meta_sm.nr_allocated + reserve == status["used_metadata_blocks"]


@pytest.mark.oracle
def test_thin_check_11_passes(fixture, tools11):
    _, meta, _, _ = fixture
    rc, _out, err = oracles.check(meta, tools11)
    assert rc == 0, err
