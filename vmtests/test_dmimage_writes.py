"""dmimage writes, the kernel reads: pools made by `restore` (from poolgen descriptions) and by
the offline `WritablePool` (random operations, random commit points) are activated in the
guest; every thin reads back byte-identical to the model; then the kernel writes, snapshots and
discards more, and after teardown dmimage check, thin_check 1.1 and dmimage's view agree with
the model. Seeds are in the test ids; ``DMIMAGE_VM_SEEDS`` overrides them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmimage import open_pool
from dmimage.errors import DmimageError
from dmimage.guest.machine import Machine
from dmimage.guest.pytest_plugin import unavailable
from dmimage.thin.format_pool import format_pool
from dmimage.thin.restore import read_input, restore
from dmimage.thin.transaction import open_writable
from vmtests.scenario import (
    KernelModel,
    OfflineSession,
    OpLimits,
    PoolFiles,
    PoolSession,
    apply_op,
    make_pattern,
    metadata_reserve,
    random_ops,
    seeds_from_env,
    verify_offline,
)

import oracles
import poolgen

pytestmark = pytest.mark.vm


@pytest.fixture(scope="session")
def tools11() -> oracles.Tools:
    try:
        return oracles.tools_11()
    except oracles.OracleUnavailable as exc:
        unavailable(f"thin-provisioning-tools 1.1: {exc}")


def _poolgen_pool(name: str) -> poolgen.Pool:
    if name == "snapshots":
        return poolgen.snapshot_pool(n_mappings=30, seed=3)
    if name == "thins":
        return poolgen.thins_pool(n=3, mappings_per_thin=12, seed=1)
    raise ValueError(name)


def _model_of(desc: poolgen.Pool, block_bytes: int, data: np.memmap[Any, np.dtype[np.uint8]]
              ) -> KernelModel:
    """The model of a poolgen description (oracle side: independent of dmimage's reader)."""
    devices = {}
    for d in desc.devices:
        maps = {int(o): (int(b), int(t)) for o, b, t in d.mappings.tolist()}
        devices[d.dev_id] = (d.transaction, d.creation_time, d.snap_time, maps)
    return KernelModel.from_mappings(
        block_bytes, time=desc.time, transaction=desc.transaction, devices=devices,
        read_block=lambda b: bytes(data[b * block_bytes : (b + 1) * block_bytes]))


@pytest.mark.parametrize("name,seed", [("snapshots", 11), ("thins", 12)])
def test_restored_pool(dm_vm: Machine, tmp_path: Path, tools11: oracles.Tools, name: str,
                       seed: int) -> None:
    desc = _poolgen_pool(name)
    bs_sectors = desc.data_block_size
    files = PoolFiles(tmp_path / "pool.meta", tmp_path / "pool.data", bs_sectors,
                      desc.nr_data_blocks)
    xml = tmp_path / "pool.xml"
    xml.write_text(poolgen.to_xml(desc))
    with open(files.meta, "wb") as f:
        f.truncate(4 << 20)
    restore(read_input(xml), files.meta)
    # Data: random bytes in every mapped block, holes elsewhere.
    bb = files.block_bytes
    with open(files.data, "wb") as f:
        f.truncate(files.nr_data_blocks * bb)
    rng_np = np.random.default_rng(seed)
    data = np.memmap(files.data, np.uint8, "r+")
    for b in sorted({int(b) for d in desc.devices for b in d.mappings[:, 1].tolist()}):
        data[b * bb : (b + 1) * bb] = rng_np.integers(0, 256, bb, dtype=np.uint8)
    data.flush()
    model = _model_of(desc, bb, data)
    del data
    vblocks = max(int(d.mappings[:, 0].max()) + 1 for d in desc.devices if len(d.mappings))
    pat_path = tmp_path / "pattern.bin"
    pattern = make_pattern(pat_path, seed)
    rng = random.Random(seed)
    done: list[str] = []
    try:
        with PoolSession(dm_vm, files, (pat_path, pattern), model=model, vblocks=vblocks) as s:
            # What dmimage wrote reads back byte-identical through the kernel.
            with s.batched():  # commands reach the guest with each status read
                s.activate_thins(sorted(model.devices))
                s.check_status()
            before = s.hashes()
            for dev, h in before.items():
                assert h == _sha(model.read(dev, 0, s.size_bytes)), f"thin {dev} as restored"
            # Then the kernel changes it.
            lim = OpLimits(vblocks=vblocks, dev_ids=8, max_devices=5)
            with s.batched():
                for op in random_ops(rng, model, 25, limits=lim, pattern_size=len(pattern)):
                    apply_op(s, op)
                    done.append(str(op))
                s.check_status()
            hashes = s.hashes()
            final = s.status()
        verify_offline(files, model, size=s.size_bytes, guest_hashes=hashes, status=final,
                       held=s.held, tools11=tools11)
    except BaseException as exc:
        raise AssertionError(f"{name} seed {seed}: after {len(done)} kernel ops "
                             f"{done[-8:]}: {exc}") from exc


def _sha(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("seed", seeds_from_env([21, 22]))
def test_writable_pool(dm_vm: Machine, tmp_path: Path, tools11: oracles.Tools, seed: int
                       ) -> None:
    """Random offline operations with WritablePool (committed at random points), then the
    kernel reads every thin, continues with its own random operations, and dmimage reads it."""
    bs_sectors, nr_data = 128, 256
    files = PoolFiles(tmp_path / "pool.meta", tmp_path / "pool.data", bs_sectors, nr_data)
    with open(files.meta, "wb") as f:
        f.truncate(4 << 20)
    with open(files.data, "wb") as f:
        f.truncate(nr_data * files.block_bytes)
    format_pool(files.meta, bs_sectors, nr_data)
    pat_path = tmp_path / "pattern.bin"
    pattern = make_pattern(pat_path, seed)
    rng = random.Random(seed)
    lim = OpLimits(vblocks=16)
    done: list[str] = []
    offline_kinds = {"create_thin": 3, "create_snap": 3, "delete": 1, "write": 8, "discard": 2,
                     "set_transaction_id": 1, "reserve": 1, "release": 1}
    try:
        off = OfflineSession(files, pattern)
        try:
            for op in random_ops(rng, off.model, 40, limits=lim, pattern_size=len(pattern),
                                 held=off.held, kinds=offline_kinds):
                apply_op(off, op)
                done.append(str(op))
                # Commit at random points: several messages may share one transaction
                # (test_snapshot_of_uncommitted_thin covers the interesting case directly).
                if rng.random() < 0.25:
                    off.commit()
            off.commit()
        finally:
            off.close()
        model = off.model
        verify_offline(files, model, size=lim.vblocks * files.block_bytes, held=off.held,
                       tools11=tools11)
        done.append("-- kernel --")
        with PoolSession(dm_vm, files, (pat_path, pattern), model=model, vblocks=lim.vblocks,
                         held=off.held) as s:
            with s.batched():  # commands reach the guest with each status read
                s.activate_thins(sorted(model.devices))
                st = s.check_status()
            with open_pool(files.meta) as p:
                alloc = p.metadata_space_map().nr_allocated
            assert st.used_metadata_blocks == alloc + metadata_reserve(files.nr_metadata_blocks)
            before = s.hashes()
            for dev, h in before.items():
                assert h == _sha(model.read(dev, 0, s.size_bytes)), f"thin {dev} as written"
            with s.batched():
                for op in random_ops(rng, model, 20, limits=lim, pattern_size=len(pattern),
                                     held=s.held):
                    apply_op(s, op)
                    done.append(str(op))
                s.check_status()
            hashes = s.hashes()
            final = s.status()
        verify_offline(files, model, size=s.size_bytes, guest_hashes=hashes, status=final,
                       held=s.held, tools11=tools11)
    except BaseException as exc:
        raise AssertionError(f"seed {seed}: after {len(done)} ops {done[-8:]}: {exc}") from exc


def test_held_snapshot_write_in_place(dm_vm: Machine, tmp_path: Path) -> None:
    """Same operations in the kernel and in WritablePool, from identical metadata:
    create_thin 0; write vblock 1; commit; reserve_metadata_snap; write vblock 0 (unmapped:
    an insert, so the leaf shared with the held snapshot is shadowed and its data blocks
    gain a reference); write vblock 1 again (mapped at time 0, device never snapshotted).
    The kernel's rule (mapping time < snapshotted_time) says "not shared": it overwrites
    vblock 1 in place (2 data blocks used). WritablePool also asks the data block's
    reference count, now 2 through the shadowed leaf, and copies it (3 used)."""
    B = 64 * 1024

    def fresh(name: str) -> PoolFiles:
        f = PoolFiles(tmp_path / f"{name}.meta", tmp_path / f"{name}.data", 128, 64)
        with open(f.meta, "wb") as h:
            h.truncate(4 << 20)
        with open(f.data, "wb") as h:
            h.truncate(64 * B)
        format_pool(f.meta, 128, 64)
        return f

    pattern = b"\1" * B + b"\2" * B + b"\3" * B
    pat = tmp_path / "pattern.bin"
    pat.write_bytes(pattern)
    off = fresh("offline")
    with open_writable(off.meta, off.data) as p:
        p.create_thin(0)
        p.write(0, B, pattern[:B])
        p.commit()
        p.reserve_metadata_snap()
        p.write(0, 0, pattern[B : 2 * B])
        p.write(0, B, pattern[2 * B :])
        p.commit()
    kern = fresh("kernel")
    with PoolSession(dm_vm, kern, (pat, pattern), vblocks=4) as s:
        s.create_thin(0)
        s.write(0, B, B, pat_offset=0)
        s.status()  # commits
        s.reserve_metadata_snap()
        s.write(0, 0, B, pat_offset=B)
        s.write(0, B, B, pat_offset=2 * B)
        assert s.check_status().used_data_blocks == 2  # the kernel matches KernelModel
    views = []
    for f in (kern, off):
        with open_pool(f.meta) as p:
            m = p.mappings(0)
            views.append((p.data_space_map().nr_allocated,
                          dict(zip(m.origin.tolist(), m.data.tolist(), strict=True))))
    assert views[1] == views[0], f"kernel (used, mappings) {views[0]} != WritablePool {views[1]}"


def test_snapshot_of_uncommitted_thin(dm_vm: Machine, tmp_path: Path) -> None:
    """create_thin 1; create_snap 2 1; write to 2 — offline in one transaction, in the kernel
    message by message. The kernel leaves thin 1 empty; WritablePool writes the mapping into
    the root leaf that 1 and 2 share, so thin 1 gains a mapping its details do not count."""
    B = 64 * 1024
    files = {}
    for name in ("offline", "kernel"):
        f = PoolFiles(tmp_path / f"{name}.meta", tmp_path / f"{name}.data", 128, 64)
        with open(f.meta, "wb") as h:
            h.truncate(4 << 20)
        with open(f.data, "wb") as h:
            h.truncate(64 * B)
        format_pool(f.meta, 128, 64)
        files[name] = f
    pattern = bytes(range(256)) * 2
    pat = tmp_path / "pattern.bin"
    pat.write_bytes(pattern)
    with open_writable(files["offline"].meta, files["offline"].data) as p:
        p.create_thin(1)
        p.create_snap(2, 1)
        p.write(2, 0, pattern)
        p.commit()
    with PoolSession(dm_vm, files["kernel"], (pat, pattern), vblocks=4) as s:
        s.create_thin(1)
        s.create_snap(2, 1)
        s.write(2, 0, len(pattern), pat_offset=0)
        s.check_status()
    views = []
    for name in ("kernel", "offline"):
        with open_pool(files[name].meta) as p:
            views.append({d: p.mappings(d).origin.tolist() for d in (1, 2)})
    assert views[1] == views[0], f"kernel mapped vblocks {views[0]} != WritablePool {views[1]}"


def _small_pool(tmp_path: Path, seed: int) -> tuple[PoolFiles, KernelModel]:
    files = PoolFiles(tmp_path / "v.meta", tmp_path / "v.data", 128, 64)
    with open(files.meta, "wb") as h:
        h.truncate(2 << 20)
    with open(files.data, "wb") as h:
        h.truncate(64 * files.block_bytes)
    format_pool(files.meta, 128, 64)
    pattern = make_pattern(tmp_path / "pattern.bin", seed)
    off = OfflineSession(files, pattern)
    try:
        off.create_thin(1)
        off.write(1, 5000, 150000, pat_offset=7)
        off.commit()
        off.create_snap(2, 1)
        off.commit()
        off.write(2, 70000, 1000, pat_offset=99)
        off.create_thin(3)
        off.commit()
    finally:
        off.close()
    return files, off.model


def test_vm_verify(dm_vm: Machine, tmp_path: Path) -> None:
    """`dmimage vm verify`'s engine on the session guest: all agree (default sizes, an explicit
    odd size, an empty thin); a damaged superblock is reported, not crashed on."""
    from dmimage.vm.verify import verify_in

    files, model = _small_pool(tmp_path, 5)
    rep = verify_in(dm_vm, str(files.meta), str(files.data))
    assert rep.ok, rep.to_json()
    assert [(d.dev_id, d.size) for d in rep.devices] == [
        (1, 3 * files.block_bytes), (2, 3 * files.block_bytes), (3, 0)]
    for d in rep.devices:
        assert d.offline_sha256 == _sha(model.read(d.dev_id, 0, d.size))
    rep = verify_in(dm_vm, str(files.meta), str(files.data), {2: 100001})
    assert rep.ok and rep.devices[0].guest_sha256 == _sha(model.read(2, 0, 100001))
    bad = tmp_path / "bad.meta"
    buf = bytearray(files.meta.read_bytes())
    buf[44] ^= 1  # superblock time field; checksum now wrong
    bad.write_bytes(bytes(buf))
    with pytest.raises(DmimageError):  # dmimage itself refuses to read it
        verify_in(dm_vm, str(bad), str(files.data))


@pytest.mark.vm_one_kernel  # the command line around verify_in, which test_vm_verify runs
def test_vm_verify_cli(dm_vm: Machine, tmp_path: Path) -> None:  # on every kernel
    """The command line (boots its own guest, same kernel as dm_vm): exit 0 and a JSON report."""
    import json
    import subprocess
    import sys

    files, _ = _small_pool(tmp_path, 6)
    res = subprocess.run([sys.executable, "-m", "dmimage", "vm", "verify", str(files.meta),
                          str(files.data), "--kernel", dm_vm.kernel.name, "--json",
                          "--dev", "1", "--dev", "2:64K"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    assert rep["ok"] and [d["size"] for d in rep["devices"]] == [3 * 65536, 65536]
