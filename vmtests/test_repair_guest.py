"""The kernel's word on repair: damaged metadata is repaired offline, the repaired pool is
activated in the guest, and every recovered mapping serves the content it had before the damage.

The pool is written offline (WritablePool) and mirrored in the reference model, so the expected
content of every virtual block is known independently of the repair. The guest hashes each
thin of the repaired pool (`dmimage.vm.verify.verify_in`) and must agree with the offline export;
the export of every recovered block must equal the model's content for that block.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmimage import open_pool
from dmimage.guest.machine import Machine
from dmimage.thin.check import check_metadata
from dmimage.thin.format_pool import format_pool
from dmimage.thin.model import PoolModel
from dmimage.thin.repair import Overrides, repair
from dmimage.thin.transaction import open_writable
from dmimage.vm.verify import verify_in
from vmtests.repair_pools import Spec, Written, read_back, write_pool

import damage
import oracles
import semantic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import repair_quality as q  # noqa: E402

pytestmark = pytest.mark.vm

BS_SECTORS = 128
BS = BS_SECTORS * 512
NR_DATA = 512


@pytest.fixture(scope="module")
def written_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, PoolModel]:
    """Three thins and a snapshot with random content, written offline; plus the model."""
    d = tmp_path_factory.mktemp("repairpool")
    meta, data = d / "pool.meta", d / "pool.data"
    with open(meta, "wb") as f:
        f.truncate(4 << 20)
    with open(data, "wb") as f:
        f.truncate(NR_DATA * BS)
    format_pool(meta, BS_SECTORS, NR_DATA)
    rng = np.random.default_rng(11)
    model = PoolModel(BS)
    with open_writable(meta, data) as pool:
        def both(op: str, *args: Any) -> None:
            getattr(pool, op)(*args)
            getattr(model, op)(*args)

        both("create_thin", 1)
        for vb in rng.choice(600, 300, replace=False).tolist():  # > 252: a two-level tree
            both("write", 1, vb * BS, rng.integers(0, 256, BS, dtype=np.uint8).tobytes())
        pool.commit()
        both("create_snap", 2, 1)
        for vb in rng.choice(600, 40, replace=False).tolist():
            both("write", 2, vb * BS + 100, rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
        both("create_thin", 3)
        for vb in range(0, 60, 3):
            both("write", 3, vb * BS, rng.integers(0, 256, BS, dtype=np.uint8).tobytes())
        pool.commit()
    return meta, data, model


def _damaged(meta: Path, kind: str) -> bytearray:
    raw = bytes(meta.read_bytes())
    if kind == "superblock zeroed":
        out = bytearray(raw)
        out[:4096] = bytes(4096)
        return out
    if kind == "bottom leaf corrupt":
        return damage.flip_byte(raw, "btree_leaf", role="bottom").data
    if kind == "bottom internal corrupt":
        return damage.flip_byte(raw, "btree_internal", role="bottom").data
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["superblock zeroed", "bottom leaf corrupt",
                                  "bottom internal corrupt"])
def test_repaired_pool_serves_recovered_mappings(
        dm_vm: Machine, written_pool: tuple[Path, Path, PoolModel], tmp_path: Path,
        kind: str) -> None:
    meta, data, model = written_pool
    bad = tmp_path / "bad.meta"
    bad.write_bytes(_damaged(meta, kind))
    assert not check_metadata(bad).ok()
    out = tmp_path / "repaired.meta"
    shutil.copyfile(meta, out)  # an existing output of the same size
    # With the superblock gone the user gives its facts, as thin_repair needs them too.
    ov = Overrides(data_block_size=BS_SECTORS, nr_data_blocks=NR_DATA) \
        if kind == "superblock zeroed" else None
    repair(bad, out, ov)
    report = check_metadata(out)
    assert report.ok(), [str(p) for p in report.problems]
    assert oracles.check(out, oracles.tools_11())[0] == 0
    recovered = 0
    raw = np.memmap(data, np.uint8, mode="r")
    with open_pool(out) as pool:
        devs = pool.devices()
        assert set(devs) <= set(model.devices)
        for dev in devs:
            m = pool.mappings(dev)
            for vb, block in zip(m.origin.tolist(), m.data.tolist(), strict=True):
                got = raw[block * BS : (block + 1) * BS].tobytes()
                assert got == model.read(dev, vb * BS, BS), (kind, dev, vb)
            recovered += len(m)
    total = sum(model.mapped_blocks(d) for d in model.devices)
    if kind == "bottom leaf corrupt":
        assert 0 < recovered < total  # the damaged leaf's mappings are gone, the rest kept
    else:
        # nothing below the superblock was lost; a damaged internal node still names its
        # children, each validated on its own (docs/repair.md)
        assert recovered == total
    verdict = verify_in(dm_vm, str(out), str(data))
    differ = [(d.dev_id, d.size, d.error, d.guest_sha256, d.offline_sha256)
              for d in verdict.devices if not d.ok]
    assert verdict.ok, (verdict.errors, verdict.pool_status, differ)
    assert {d.dev_id for d in verdict.devices} == set(devs)


# -------------------------------------------------------------- kernel-written pools (issue 14)

#: small enough to hash every block in the guest, big enough for two-level trees, snapshots
#: sharing them, a deleted thin and discards over many transactions
KERNEL_SPEC = Spec("vm-repair", "any", 14, thins=5, snapshots=2, vblocks=384, fill=0.85,
                   overwrite=0.1, batches=4, deletes=1, discards=3, nr_data_blocks=4096)


@pytest.fixture(scope="module")
def kernel_pool(dm_vm: Machine, tmp_path_factory: pytest.TempPathFactory) -> Written:
    """A pool the guest's kernel wrote, and every block of every thin as the kernel served
    it before any damage."""
    return write_pool(dm_vm, KERNEL_SPEC, tmp_path_factory.mktemp("kernelpool"), hashes=True)


@pytest.mark.parametrize("kind", ["mapping root zeroed", "superblock zeroed",
                                  "bottom leaf: bad checksum"])
def test_repaired_kernel_pool_serves_pre_damage_content(
        dm_vm: Machine, kernel_pool: Written, tmp_path: Path, kind: str) -> None:
    raw = kernel_pool.meta.read_bytes()
    truth = semantic.parse_dump(oracles.dump(kernel_pool.meta, oracles.tools_11()))
    total = sum(len(d.mappings) for d in truth.devices)
    d = next(x for x in q.damage_classes(raw) if x.kind == kind)
    bad = tmp_path / "bad.meta"
    bad.write_bytes(d.data)
    out = tmp_path / "repaired.meta"
    oracles.make_sparse(out, len(raw) // 4096)
    ov = Overrides(data_block_size=truth.data_block_size, transaction_id=truth.transaction) \
        if kind == "superblock zeroed" else None
    res = repair(bad, out, ov)
    assert check_metadata(out).ok()
    assert oracles.check(out, oracles.tools_11())[0] == 0
    with open_pool(out) as pool:
        recovered = {dev: pool.mappings(dev).origin.tolist() for dev in pool.devices()}
    nr = sum(len(v) for v in recovered.values())
    if kind == "bottom leaf: bad checksum":
        assert 0 < nr < total, (nr, total, res.report.notes)
    else:
        assert nr == total, (nr, total, res.report.notes)
    assert {(dev, vb) for dev, vbs in recovered.items() for vb in vbs} <= \
        {(dev, vb) for dev, h in kernel_pool.block_hashes.items() for vb in h}
    served = read_back(dm_vm, out, kernel_pool.data, KERNEL_SPEC, recovered)
    differ = [(dev, vb) for dev, vbs in recovered.items() for vb in vbs
              if served[dev][vb] != kernel_pool.block_hashes[dev][vb]]
    assert not differ, f"{len(differ)} recovered blocks serve other content: {differ[:10]}"
