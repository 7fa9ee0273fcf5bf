"""Kernel-scale differentials, both directions (issue 12 §3).

``test_kernel_writes_at_scale``: the guest's dm-thin-pool builds a pool whose origin has a
bottom-level mapping tree of three or more levels (tens of thousands of provisioning writes,
a snapshot between batches so the kernel's splits leave half-full leaves), a data space map
over several bitmap blocks, data blocks referenced from many leaves (reference counts above 2,
in the overflow tree), hundreds of snapshots, a held metadata snapshot and a deleted shared
origin. At three checkpoints dmimage's reading must equal thin_dump 1.1 (every device-details
field, every mapping with its time, byte-identical dump), thin_check 1.1 and dmimage check
must pass, the data space map's counts must equal those derived from thin_dump's leaves, the
kernel's status lines must agree, and the reference model must predict details, mapping times
and sharing.

``test_dmimage_writes_at_scale``: `dmimage restore`, `dmimage message` and `dmimage write`
make a pool of the same scale offline; the kernel then inserts into the full leaves dmimage
built (splitting them), snapshots, copies on write, discards and commits; afterwards
thin_check 1.1 and dmimage check pass, dmimage equals thin_dump 1.1 and the model, and what
the guest reads equals the model and dmimage's export.

Writes use the scatter devices of vmtests/scale_scenario.py: one ``dd`` per batch.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from dmimage.guest.machine import Machine
from dmimage.guest.pytest_plugin import unavailable
from vmtests.scale_scenario import (
    Blob,
    CheckpointFacts,
    Observed,
    ScaleModel,
    Target,
    model_view,
    run_script,
    scatter_script,
    verify_checkpoint,
)
from vmtests.scenario import PoolFiles, PoolSession

import oracles

pytestmark = pytest.mark.vm

BLOCK_SECTORS = 128  # 64 KiB, the smallest data block
BLOCK = BLOCK_SECTORS * 512
BITMAP_ENTRIES = 16320  # data blocks per space-map bitmap block (4 KiB metadata blocks)
NR_DATA = 6 * BITMAP_ENTRIES + 2000  # seven bitmap blocks
META_BYTES = 32 << 20
#: Leaf capacity of a mapping tree node: 3 * ((4096 - 32) // 16 // 3).
LEAF_MAX = 252


@pytest.fixture(scope="session")
def tools11() -> oracles.Tools:
    try:
        return oracles.tools_11()
    except oracles.OracleUnavailable as exc:
        unavailable(f"thin-provisioning-tools 1.1: {exc}")


class ScalePool(PoolSession):
    """A PoolSession with zeroing of new blocks off (partial writes provision cheaply)."""

    def table(self) -> str:
        assert self.meta_disk and self.data_disk
        return (f"0 {self.files.data_sectors} thin-pool {self.meta_disk.guest_path} "
                f"{self.data_disk.guest_path} {self.files.block_sectors} 0 1 skip_block_zeroing")

    def observe(self) -> Observed:
        """Commit (pool status), then every active thin's status."""
        st = self.status()
        return Observed(st, {dev: self.thin_status(dev) for dev in sorted(self.active)})


def _files(tmp: Path) -> PoolFiles:
    files = PoolFiles(tmp / "pool.meta", tmp / "pool.data", BLOCK_SECTORS, NR_DATA)
    for path, size in ((files.meta, META_BYTES), (files.data, NR_DATA * BLOCK)):
        with open(path, "wb") as f:
            f.truncate(size)
    return files


def _payload(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n * 512, dtype=np.uint8).tobytes()


def _writes(s: ScalePool, model: ScaleModel, blob: Blob, name: str,
            spots: list[tuple[int, int, int]], rng: np.random.Generator) -> list[str]:
    """Shell lines writing one random sector at each (dev, vblock, sector in block), mirrored
    in the model (in order)."""
    payload = _payload(rng, len(spots))
    targets = []
    for i, (dev, vb, sec) in enumerate(spots):
        targets.append(Target(s.thin_path(dev), vb * BLOCK_SECTORS + sec))
        model.write(dev, vb * BLOCK + sec * 512, payload[i * 512 : (i + 1) * 512])
    return scatter_script(blob, name, targets, payload)


def _checkpoint(s: ScalePool, tmp: Path, name: str) -> tuple[Path, Observed]:
    """Commit, read the kernel's status, copy the committed metadata off the live pool."""
    obs = s.observe()
    copy = tmp / f"{name}.meta"
    shutil.copyfile(s.files.meta, copy)
    return copy, obs


def _report(label: str, facts: CheckpointFacts) -> str:
    lv = ", ".join(f"dev {d}: {top + bottom} node levels from the top-level root "
                   f"({top} top + {bottom} bottom, {leaves} leaves)"
                   for d, (top, bottom, leaves) in facts.levels.items())
    return (f"{label}: {facts.nr_mappings} mappings compared; {lv}; data refcount max "
            f"{facts.max_data_count} ({facts.data_blocks_over_2} blocks > 2); "
            f"{facts.data_bitmaps_used} of {facts.data_bitmaps} data bitmaps in use; "
            f"{facts.data_allocated} data / "
            f"{facts.meta_allocated} metadata blocks in use")


def test_kernel_writes_at_scale(dm_vm: Machine, tmp_path: Path, tools11: oracles.Tools,
                                capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    files = _files(tmp_path)
    model = ScaleModel(BLOCK)
    rng = random.Random(1201)
    nrng = np.random.default_rng(1201)
    # Past one bitmap block of data blocks; DMIMAGE_KSCALE_DEEP=1: enough for the origin's
    # bottom root to fill (LEAF_MAX children of ~half-full leaves) and split beneath.
    deep = os.environ.get("DMIMAGE_KSCALE_DEEP") == "1"
    n_build = LEAF_MAX * LEAF_MAX // 2 + 2_500 if deep else BITMAP_ENTRIES + 1_200
    vblocks = n_build * 13 // 10
    batch = 120  # fewer than half a leaf: one split at most between two snapshots
    build = sorted(rng.sample(range(vblocks), n_build))
    kept: list[int] = []
    notes: list[str] = []
    s = ScalePool(dm_vm, files, model=model, vblocks=vblocks)
    with s:
        s.create_thin(1)
        # 1. Build: batches of ascending writes into the origin, each followed by a snapshot
        # (the previous rolling one is deleted unless kept). A shared sibling is never
        # rebalanced into, so the kernel splits one leaf into two half-full ones.
        blob = Blob()
        payload = _payload(nrng, n_build)
        targets = [Target(s.thin_path(1), vb * BLOCK_SECTORS) for vb in build]
        batches: list[tuple[int, list[str]]] = []
        prev = None
        for i in range(0, n_build, batch):
            chunk = build[i : i + batch]
            for j, vb in enumerate(chunk):
                model.write(1, vb * BLOCK, payload[(i + j) * 512 : (i + j + 1) * 512])
            snap = 1000 + i // batch
            model.create_snap(snap, 1)
            after = [f"dmsetup message {s.name} 0 'create_snap {snap} 1'"]
            if prev is not None:
                model.delete(prev)
                after.append(f"dmsetup message {s.name} 0 'delete {prev}'")
            keep = (i // batch) % 40 == 39
            if keep:
                kept.append(snap)
            prev = None if keep else snap
            batches.append((len(chunk), after))
        run_script(dm_vm, blob, scatter_script(blob, "scb", targets, payload, batches),
                   tmp_path / "build.blob")
        notes.append(f"build: {n_build} writes, {len(batches)} snapshots, kept {kept} "
                     f"({time.monotonic() - t0:.1f} s)")
        # 2. Snapshots of the origin (suspended, as the kernel asks) and of a snapshot; then
        # writes that copy shared blocks and shadow shared leaves in every one of them.
        for snap in (2, 3, 4):
            s.create_snap(snap, 1)
        s.create_snap(5, 2)
        for dev in kept:
            s.activate_thin(dev)
        mapped = sorted(model.devices[1].blocks)
        hot = [mapped[k] for k in sorted(rng.sample(range(len(mapped)), 90))]
        spots = [(dev, vb, rng.randrange(128)) for dev in (2, 3, 4, 5, 1) for vb in hot]
        holes = sorted(set(range(vblocks)) - set(mapped))
        spots += [(dev, vb, 0) for dev in (3, 5) for vb in rng.sample(holes, 150)]
        blob = Blob()
        run_script(dm_vm, blob, _writes(s, model, blob, "scc", spots, nrng),
                   tmp_path / "cow.blob")
        notes.append(f"snapshots and copy-on-write writes ({time.monotonic() - t0:.1f} s)")
        cp1, obs1 = _checkpoint(s, tmp_path, "cp1")
        f1 = verify_checkpoint(cp1, model, obs1, tools11, block_sectors=BLOCK_SECTORS,
                               deep=(1,), what="cp1 (snapshots, copies on write)")
        notes.append(_report("cp1", f1) + f" ({time.monotonic() - t0:.1f} s)")
        # 3. A held metadata snapshot, then writes (in place and copying), discards, and the
        # shared origin deleted while the snapshot still maps it.
        s.set_transaction_id(model.trans_id, model.trans_id + 7)
        s.reserve_metadata_snap()
        held = (model_view(model), (model.time, model.trans_id))
        spots = [(dev, vb, rng.randrange(128)) for dev in (1, 4) for vb in rng.sample(hot, 40)]
        blob = Blob()
        lines = _writes(s, model, blob, "scd", spots, nrng)
        for dev, start, n in ((3, mapped[500], 700), (kept[0], mapped[len(mapped) // 2], 2000)):
            model.discard(dev, start * BLOCK, n * BLOCK)
            lines.append(f"blkdiscard -o {start * BLOCK} -l {n * BLOCK} {s.thin_path(dev)}")
        run_script(dm_vm, blob, lines, tmp_path / "held.blob")
        s.delete(1)
        cp2, obs2 = _checkpoint(s, tmp_path, "cp2")
        f2 = verify_checkpoint(cp2, model, obs2, tools11, block_sectors=BLOCK_SECTORS,
                               held=held, deep=(2, 3), what="cp2 (held snapshot, origin deleted)")
        notes.append(_report("cp2", f2) + f" ({time.monotonic() - t0:.1f} s)")
        # 4. Release the snapshot; a last round of writes; teardown commits.
        s.release_metadata_snap()
        spots = [(dev, vb, 5) for dev in (2, 5) for vb in rng.sample(hot, 30)]
        blob = Blob()
        run_script(dm_vm, blob, _writes(s, model, blob, "sce", spots, nrng),
                   tmp_path / "end.blob")
        obs3 = s.observe()
    f3 = verify_checkpoint(files.meta, model, obs3, tools11, block_sectors=BLOCK_SECTORS,
                           deep=(2, 3), what="final (released, torn down)")
    notes.append(_report("final", f3))
    notes.append(f"total {time.monotonic() - t0:.1f} s")
    with capsys.disabled():
        print("\n[kernel scale] " + "\n[kernel scale] ".join(notes))
    # The scale the issue asks for was reached (measured, not assumed).
    top, bottom, _leaves = f1.levels[1]
    assert top + bottom >= 3 and bottom >= (3 if deep else 2), f"origin's tree: {f1.levels[1]}"
    assert f1.data_bitmaps == 7 and f1.data_bitmaps_used >= 2
    assert f1.max_data_count > 2 and f3.max_data_count > 2
