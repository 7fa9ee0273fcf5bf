"""Kernel writes, dmimage reads: seeded random sequences of pool messages, writes, partial-block
writes and discards run by the guest's dm-thin-pool, mirrored in the reference model; after
teardown dmimage's check, dump, export and space-map counts must agree with the model, the
guest's own reads and thin_dump/thin_check 1.1.

The seed is in the test id and in the failure message; rerun one with
``DMIMAGE_VM_SEEDS=SEED pytest vmtests/test_kernel_writes.py``. ``DMIMAGE_SAVE_KERNEL_FIXTURES=DIR``
saves each run's metadata and facts (used to make tests/fixtures/kernel/).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from dmimage.guest.machine import Machine
from dmimage.guest.pytest_plugin import unavailable
from vmtests.scenario import (
    OpLimits,
    PoolSession,
    apply_op,
    make_pattern,
    make_pool_files,
    metadata_reserve,
    model_facts,
    random_ops,
    seeds_from_env,
    verify_offline,
)

import oracles

pytestmark = pytest.mark.vm

#: (seed, block sectors, metadata bytes, data blocks, operations)
CASES = [
    (101, 128, 4 << 20, 256, 40),
    (202, 256, 2 << 20, 192, 40),
]


def _cases() -> list[tuple[int, int, int, int, int]]:
    seeds = seeds_from_env([c[0] for c in CASES])
    by_seed = {c[0]: c for c in CASES}
    return [by_seed.get(s, (s, 128, 4 << 20, 256, 40)) for s in seeds]


@pytest.fixture(scope="session")
def tools11() -> oracles.Tools:
    try:
        return oracles.tools_11()
    except oracles.OracleUnavailable as exc:
        unavailable(f"thin-provisioning-tools 1.1: {exc}")


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"seed{c[0]}")
def test_random_kernel_sequence(dm_vm: Machine, tmp_path: Path, tools11: oracles.Tools,
                                case: tuple[int, int, int, int, int]) -> None:
    seed, block_sectors, meta_bytes, nr_data, n_ops = case
    files = make_pool_files(tmp_path, meta_bytes=meta_bytes, nr_data_blocks=nr_data,
                            block_sectors=block_sectors)
    pat_path = tmp_path / "pattern.bin"
    pattern = make_pattern(pat_path, seed)
    rng = random.Random(seed)
    limits = OpLimits(vblocks=16)
    done: list[str] = []
    try:
        with PoolSession(dm_vm, files, (pat_path, pattern), vblocks=limits.vblocks) as s:
            st0 = s.status()
            # A fresh pool: the kernel formatted it; its status counts the reserve.
            assert st0.used_metadata_blocks > metadata_reserve(files.nr_metadata_blocks)
            # Batched: the ops' commands reach the guest with the next status read (in
            # order, one agent round trip for all); a failing one is named in the error.
            with s.batched():
                for op in random_ops(rng, s.model, n_ops, limits=limits,
                                     pattern_size=len(pattern), held=s.held):
                    apply_op(s, op)
                    done.append(str(op))
                    if rng.random() < 0.2:
                        s.check_status()
                s.check_status()
            hashes = s.hashes()
            final = s.status()
            held = s.held
        rep = verify_offline(files, s.model, size=s.size_bytes, guest_hashes=hashes,
                             status=final, held=held, tools11=tools11)
    except BaseException as exc:
        raise AssertionError(f"seed {seed} failed after {len(done)} ops: {done[-8:]}: "
                             f"{exc}") from exc
    out = os.environ.get("DMIMAGE_SAVE_KERNEL_FIXTURES")
    if out:
        _save_fixture(Path(out), f"{dm_vm.kernel.name}-seed{seed}", files.meta, tools11, {
            "seed": seed, "kernel": str(dm_vm.kernel), "ops": done,
            "block_sectors": block_sectors, "nr_data_blocks": nr_data,
            "nr_metadata_blocks": files.nr_metadata_blocks,
            "status": {"transaction_id": final.transaction_id,
                       "used_metadata_blocks": final.used_metadata_blocks,
                       "total_metadata_blocks": final.total_metadata_blocks,
                       "used_data_blocks": final.used_data_blocks,
                       "total_data_blocks": final.total_data_blocks,
                       "held_metadata_root": final.held_metadata_root},
            "metadata_nr_allocated": rep.nr_allocated_metadata,
            "export_sha256": hashes, "thin_size": s.size_bytes,
            "model": model_facts(s.model)})


def _save_fixture(out: Path, name: str, meta: Path, tools11: oracles.Tools,
                  facts: dict[str, Any]) -> None:
    import lzma

    out.mkdir(parents=True, exist_ok=True)
    with open(meta, "rb") as f, lzma.open(out / f"{name}.meta.xz", "wb", preset=9) as g:
        shutil.copyfileobj(f, g)
    (out / f"{name}.thin_dump-1.1.xml").write_text(oracles.dump(meta, tools11))
    (out / f"{name}.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")


def test_fresh_pool_status_and_reserve(dm_vm: Machine, tmp_path: Path) -> None:
    """The kernel formats zeroed metadata on first activation; the status line's used metadata
    is the space map's nr_allocated plus min(4096, nr_blocks // 10)."""
    files = make_pool_files(tmp_path, meta_bytes=8 << 20, nr_data_blocks=64)
    with PoolSession(dm_vm, files) as s:
        st = s.check_status()
        assert (st.total_metadata_blocks, st.total_data_blocks) == (2048, 64)
    verify_offline(files, s.model, size=0, status=st, held=False)
