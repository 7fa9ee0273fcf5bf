"""Offline transactions (WritablePool) against the reference model and thin-provisioning-tools:
random operation sequences committed at random points; after each commit the on-disk pool, read
back by dmimage's reader and by thin_dump 1.1, equals the model, and both checkers pass."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dmimage import open_pool
from dmimage.thin.check import check_metadata
from dmimage.thin.export import export_thin
from dmimage.thin.model import PoolModel
from dmimage.thin.transaction import PoolStateError, open_writable

import oracles
import poolgen
import semantic

BS = 128 * 512
NR_DATA = 192
VBLOCKS = 24  # writes land in the first VBLOCKS blocks of a device


def fresh_pool(tmp, tools11, nr_data=NR_DATA, meta_blocks=256):
    meta = tmp / "pool.meta"
    data = tmp / "pool.data"
    oracles.restore(poolgen.to_xml(poolgen.empty_pool(nr_data)), meta, tools11, meta_blocks)
    with open(data, "wb") as f:
        f.truncate(nr_data * BS)
    return meta, data


def assert_disk_equals_model(meta, data, model: PoolModel, tools11, tmp):
    report = check_metadata(meta)
    assert report.ok(), [str(p) for p in report.problems]
    rc, out, err = oracles.check(meta, tools11)
    assert rc == 0, err
    dumped = semantic.parse_xml(oracles.dump(meta, tools11))
    assert dumped.time == model.time and dumped.transaction == model.trans_id
    assert sorted(d.dev_id for d in dumped.devices) == sorted(model.devices)
    for d in dumped.devices:
        m = model.devices[d.dev_id]
        assert (d.mapped_blocks, d.transaction, d.creation_time, d.snap_time) == (
            len(m.blocks), m.transaction_id, m.creation_time, m.snapshotted_time)
        assert sorted(d.mappings[:, 0].tolist()) == sorted(m.blocks)
    with open_pool(meta) as pool:
        assert pool.data_space_map().nr_allocated == model.used_data_blocks()
        for dev in model.devices:
            size = model.highest_mapped_end(dev)
            out_path = tmp / f"export{dev}.img"
            export_thin(pool, data, dev, out_path)
            assert out_path.read_bytes() == model.read(dev, 0, size), f"device {dev}"


class PoolMachine(RuleBasedStateMachine):
    tools11 = None
    tmp = None

    def __init__(self):
        super().__init__()
        d = self.tmp / f"m{random.getrandbits(32)}"
        d.mkdir()
        self.dir = d
        self.meta, self.data = fresh_pool(d, self.tools11)
        self.pool = open_writable(self.meta, self.data)
        self.model = PoolModel(BS)
        self.committed = self.model.clone()
        self.snap_held = False

    def teardown(self):
        self.pool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    ids = st.integers(0, 6)

    @rule(dev=ids)
    def create_thin(self, dev):
        if dev in self.model.devices:
            with pytest.raises(PoolStateError):
                self.pool.create_thin(dev)
            return
        self.pool.create_thin(dev)
        self.model.create_thin(dev)

    @rule(dev=ids, origin=ids)
    def create_snap(self, dev, origin):
        if dev in self.model.devices or origin not in self.model.devices:
            with pytest.raises(PoolStateError):
                self.pool.create_snap(dev, origin)
            return
        self.pool.create_snap(dev, origin)
        self.model.create_snap(dev, origin)

    @rule(dev=ids)
    def delete(self, dev):
        if dev not in self.model.devices:
            with pytest.raises(PoolStateError):
                self.pool.delete(dev)
            return
        self.pool.delete(dev)
        self.model.delete(dev)

    @precondition(lambda self: self.model.devices)
    @rule(data=st.data(), length=st.integers(1, 3 * BS), seed=st.integers(0, 2**32 - 1))
    def write(self, data, length, seed):
        dev = data.draw(st.sampled_from(sorted(self.model.devices)))
        offset = data.draw(st.integers(0, VBLOCKS * BS - length))
        if self.model.used_data_blocks() + 4 >= NR_DATA:
            return
        buf = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
        self.pool.write(dev, offset, buf)
        self.model.write(dev, offset, buf)

    @precondition(lambda self: self.model.devices)
    @rule(data=st.data())
    def discard(self, data):
        dev = data.draw(st.sampled_from(sorted(self.model.devices)))
        offset = data.draw(st.integers(0, VBLOCKS * BS))
        length = data.draw(st.integers(0, 6 * BS))
        self.pool.discard(dev, offset, length)
        self.model.discard(dev, offset, length)

    @rule(new=st.integers(0, 2**40))
    def set_transaction_id(self, new):
        self.pool.set_transaction_id(self.model.trans_id, new)
        self.model.set_transaction_id(self.model.trans_id, new)

    @rule()
    def reserve_or_release_metadata_snap(self):
        if self.snap_held:
            self.pool.release_metadata_snap()
            self.model.release_metadata_snap()
        else:
            self.pool.reserve_metadata_snap()
            self.committed = self.model.clone()  # reserve commits first
            self.model.reserve_metadata_snap()
        self.snap_held = not self.snap_held

    @rule()
    def commit(self):
        self.pool.commit()
        self.committed = self.model.clone()
        assert_disk_equals_model(self.meta, self.data, self.model, self.tools11, self.dir)

    @rule()
    def abandon_uncommitted(self):
        """Close without commit: the metadata file must still hold the committed state."""
        before = self.meta.read_bytes()
        self.pool.close()
        assert self.meta.read_bytes() == before
        self.pool = open_writable(self.meta, self.data)
        self.model = self.committed.clone()
        self.snap_held = bool(self.pool.held_root)
        assert self.snap_held == (self.model.pinned is not None)

    @invariant()
    def live_view_matches(self):
        for dev in self.model.devices:
            assert self.pool.details[dev].mapped_blocks == self.model.mapped_blocks(dev)
        assert self.pool.time == self.model.time


@pytest.mark.slow
def test_stateful_against_model(tools11, tmp_path):
    PoolMachine.tools11 = tools11
    PoolMachine.tmp = tmp_path
    run = PoolMachine.TestCase
    run.settings = settings(max_examples=20, stateful_step_count=25, deadline=None,
                            suppress_health_check=list(HealthCheck))
    run().runTest()


def test_bulk_writes_match_model(tools11, tmp_path):
    """Writes of hundreds of whole blocks (the bulk path: range lookup, runs of data blocks,
    one multi-key insert that splits leaves and grows the tree) into a fresh thin, over a
    snapshot's shared blocks and over private ones, with partial blocks at both ends."""
    meta, data = fresh_pool(tmp_path, tools11, nr_data=2400, meta_blocks=1024)
    model = PoolModel(BS)
    rng = np.random.default_rng(5)
    with open_writable(meta, data) as pool:
        pool.create_thin(1)
        model.create_thin(1)
        steps = [(1, 3 * BS + 100, 600 * BS), None, ("snap", 2, 1), (2, 100 * BS, 300 * BS + 7),
                 (1, 50 * BS - 3, 200 * BS), None, (1, 1000 * BS, 260 * BS), (2, 0, 80 * BS),
                 None]
        for step in steps:
            if step is None:
                pool.commit()
                assert_disk_equals_model(meta, data, model, tools11, tmp_path)
            elif step[0] == "snap":
                pool.create_snap(step[1], step[2])
                model.create_snap(step[1], step[2])
            else:
                dev, off, n = step
                buf = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                pool.write(dev, off, buf)
                model.write(dev, off, buf)


def test_write_file_matches_model(tools11, tmp_path, monkeypatch):
    """write_file (whole blocks copied file to file by the kernel, in steps of FILE_STEP):
    into a fresh thin, over a snapshot's shared blocks and over committed private blocks,
    with partial blocks at both ends and a source offset; same result as the model."""
    from dmimage.thin import transaction

    monkeypatch.setattr(transaction, "FILE_STEP", 7 * BS)  # many steps, a short last one
    meta, data = fresh_pool(tmp_path, tools11, nr_data=400, meta_blocks=512)
    src = tmp_path / "src.bin"
    raw = np.random.default_rng(9).integers(0, 256, 90 * BS, dtype=np.uint8).tobytes()
    src.write_bytes(raw)
    model = PoolModel(BS)
    with open_writable(meta, data) as pool, open(src, "rb") as f:
        pool.create_thin(1)
        model.create_thin(1)
        for step in [(1, 2 * BS + 9, 11, 40 * BS), "commit", ("snap", 2, 1),
                     (2, 10 * BS, 0, 20 * BS + 1), (1, 0, 5 * BS, 30 * BS - 3), "commit",
                     (1, 0, 7, 3), (1, BS, 3 * BS, 10 * BS)]:  # over committed private
            if step == "commit":
                pool.commit()
                assert_disk_equals_model(meta, data, model, tools11, tmp_path)
            elif step[0] == "snap":
                pool.create_snap(step[1], step[2])
                model.create_snap(step[1], step[2])
            else:
                dev, off, src_off, n = step
                pool.write_file(dev, off, f.fileno(), src_off, n)
                model.write(dev, off, raw[src_off : src_off + n])
        pool.commit()
    assert_disk_equals_model(meta, data, model, tools11, tmp_path)
