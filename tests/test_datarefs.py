"""The data-reference census counted in a forked child (thin/datarefs.py) against the same
census in process: check's report and ls's table must not depend on where the counting ran.

The pools are the fuzzer's three bases (a root-leaf pool, a two-level tree whose leaves are
validated in groups and handed to the child by block number, snapshots sharing leaves),
clean and under the fuzzer's random damage, so the child also meets leaves given as values
(lone leaves, parts of damaged ones), mappings past the data device and walks that stop.
"""

from __future__ import annotations

import gc
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmimage.errors import DmimageError
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import leaves_in_order, tree_items
from dmimage.thin import datarefs
from dmimage.thin.check import check_metadata
from dmimage.thin.ls import FIELDS, ls_table
from dmimage.thin.pool import open_pool
from dmimage.thin.superblock import read_superblock

import damage
import fuzz_damage
import fuzz_run
import oracles
import poolgen

INPUTS = 60
SB_DATA_NR_BLOCKS = 64  # the superblock's data space map root: nr_blocks
LS_FIELDS = [f for f in FIELDS if f not in ("MAPPED", "EXCLUSIVE", "SHARED", "HIGHEST_MAPPED")]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, tools11: oracles.Tools) -> list[bytes]:
    d = tmp_path_factory.mktemp("census")
    out = []
    for name, pool in fuzz_run.base_pools():
        p = d / f"{name}.meta"
        oracles.restore(poolgen.to_xml(pool), p, tools11, 512)
        out.append(p.read_bytes())
    return out


def _ls(meta: Path) -> object:
    try:
        with open_pool(meta) as pool:
            return ls_table(pool, LS_FIELDS)
    except DmimageError as exc:
        return f"{type(exc).__name__}: {exc}"


def _both(meta: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """(check's report, ls's table or error) with the census forked, then in process."""
    got = []
    for fork_min in (0, 1 << 62):
        monkeypatch.setattr(datarefs, "FORK_MIN_BLOCKS", fork_min)
        got.append((check_metadata(meta).to_json(), _ls(meta)))
    assert got[0] == got[1]
    return got[0]


def test_forked_census_agrees_on_clean_pools(bases: list[bytes], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for i, meta in enumerate(bases):
        path = tmp_path / f"base{i}.meta"
        path.write_bytes(meta)
        report, table = _both(path, monkeypatch)
        assert isinstance(report, dict) and report["ok"] and report["nr_mappings"] > 0
        assert isinstance(table, list) and len(table) > 1


def test_forked_census_agrees_on_damaged_pools(bases: list[bytes], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    damaged = 0
    for i in range(INPUTS):
        base = bases[i % len(bases)]
        try:
            meta = fuzz_damage.apply(base, fuzz_damage.random_recipe(rng))
        except Exception:  # a recipe that finds no target in this (already damaged) input
            continue
        path = tmp_path / f"bad{i}.meta"
        path.write_bytes(meta)
        report, _ = _both(path, monkeypatch)
        assert isinstance(report, dict)
        damaged += not report["ok"]
    assert damaged > INPUTS // 4  # the damage reached the checker


def test_mappings_past_the_data_device_tallied_alike(bases: list[bytes], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A data device shrunk under the mappings (the superblock's data nr_blocks): every
    device's mappings past it are tallied aside, with the first one met, in either census."""
    meta = bytearray(bases[1])
    nr = struct.unpack_from("<Q", meta, SB_DATA_NR_BLOCKS)[0]
    struct.pack_into("<Q", meta, SB_DATA_NR_BLOCKS, nr // 2)
    damage.fix_checksum(meta, 0, damage.SALT_SUPERBLOCK)
    path = tmp_path / "short.meta"
    path.write_bytes(meta)
    report, _ = _both(path, monkeypatch)
    assert isinstance(report, dict)
    assert any("point beyond the data device" in p["message"] for p in report["problems"])


def test_a_failed_child_is_counted_again_in_process(bases: list[bytes], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that dies leaves the answer to the in-process census."""
    path = tmp_path / "pool.meta"
    path.write_bytes(bases[1])
    want = check_metadata(path).to_json()
    monkeypatch.setattr(datarefs, "FORK_MIN_BLOCKS", 0)

    def die(self: datarefs.ForkedCensus, cmd: int, res: int) -> None:
        raise RuntimeError("child failure")

    monkeypatch.setattr(datarefs.ForkedCensus, "_serve", die)
    forked = []
    real = datarefs.ForkedCensus.finish

    def finish(self: datarefs.ForkedCensus) -> object:
        forked.append(self)
        return real(self)

    monkeypatch.setattr(datarefs.ForkedCensus, "finish", finish)
    assert check_metadata(path).to_json() == want
    assert forked  # the child was tried, and failed


def test_a_count_past_255_is_counted_again_in_process(bases: list[bytes],
                                                      tmp_path: Path) -> None:
    """The child counts in bytes; a block referenced 256 times or more wraps its count,
    which finish() must notice (and the callers then count in process, in u32)."""
    path = tmp_path / "pool.meta"
    path.write_bytes(bases[0])
    with BlockReader(path) as reader:
        for times, wraps in ((254, False), (255, True), (300, True)):  # and one more below
            c = datarefs.ForkedCensus(reader, 10)
            c.values(0, np.full(times, 5, np.uint64))
            c.values(0, np.arange(10, dtype=np.uint64))
            if wraps:
                with pytest.raises(datarefs.CensusFailed):
                    c.finish()
            else:
                counts, tallies = c.finish()
                assert counts.tolist() == [1] * 5 + [times + 1] + [1] * 4 and not tallies
            c.close()


def _census_of(census: datarefs.Census, messages: list[tuple[bool, np.ndarray]]
               ) -> tuple[list[int], dict[int, tuple[int, int]]]:
    for by_block, items in messages:
        if by_block:
            census.leaves(0, items)
        else:
            census.values(0, items)
    counts, tallies = census.finish()
    census.close()
    return counts.tolist(), {k: (t.count, t.first) for k, t in tallies.items()}


def test_blocks_met_twice_are_counted_not_marked(bases: list[bytes], tmp_path: Path) -> None:
    """The child marks data blocks while each is met once (datarefs._Marks); a block met
    again, among a message's first blocks or past them (found only when the counts are
    settled), or a leaf sent twice, makes it count every message again: the counts are the
    in-process census's in every case."""
    path = tmp_path / "pool.meta"
    path.write_bytes(bases[1])
    with BlockReader(path) as reader:
        sb = read_superblock(reader)
        nr = sb.data_sm.nr_blocks
        roots = tree_items(reader, sb.data_mapping_root, 8, np.uint64)[1]
        leaves = np.array([leaf.blocknr for leaf in leaves_in_order(reader, int(roots[0]), 8)],
                          np.int64)
        data = np.concatenate([leaf.values(np.uint64) >> np.uint64(24)
                               for leaf in leaves_in_order(reader, int(roots[0]), 8)])
        assert len(leaves) > 2 and len(data) > datarefs.MARK_PROBE
        unused = np.setdiff1d(np.arange(nr, dtype=np.uint64), data)
        assert len(unused) > datarefs.MARK_PROBE
        fresh = unused[:datarefs.MARK_PROBE]
        cases = {
            "once": [(True, leaves), (False, unused[-3:])],
            "past the probe": [(True, leaves), (False, np.append(fresh, data[:2]))],
            "in the probe": [(False, fresh), (True, leaves), (False, data[-1:])],
            "a leaf twice": [(True, leaves), (True, leaves[:1])],
            "beyond the device": [(True, leaves), (False, np.array([nr + 5, nr], np.uint64)),
                                  (True, leaves[-1:])],
        }
        for name, messages in cases.items():
            forked = _census_of(datarefs.ForkedCensus(reader, nr), messages)
            in_process = _census_of(datarefs.Census(reader, nr), messages)
            assert forked == in_process, name
            assert (max(forked[0]) == 1) == (name == "once"), name


@pytest.mark.parametrize("probe,keep", [(0, 0), (0, 1 << 20), (1, 7), (64, 1 << 20)])
def test_marking_counts_as_in_process_on_random_streams(bases: list[bytes], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        probe: int, keep: int) -> None:
    """Random message streams (leaves once or again, data blocks repeated or past the device)
    under every probe width and keep limit, so that each way out of marking is taken (a probe
    hit, a recount once MARKED_VALUES are kept, the final settle) and none: the forked
    census's counts and tallies are the in-process census's."""
    monkeypatch.setattr(datarefs, "MARK_PROBE", probe)  # the child is forked: it sees them
    monkeypatch.setattr(datarefs, "MARKED_VALUES", keep)
    rng = random.Random(probe * 1000 + keep)
    for base in bases:
        path = tmp_path / "pool.meta"
        path.write_bytes(base)
        with BlockReader(path) as reader:
            sb = read_superblock(reader)
            nr = sb.data_sm.nr_blocks
            roots = tree_items(reader, sb.data_mapping_root, 8, np.uint64)[1]
            leaves = sorted({leaf.blocknr for r in roots.tolist()
                             for leaf in leaves_in_order(reader, int(r), 8)})
            for _ in range(12):
                messages: list[tuple[bool, np.ndarray]] = []
                unsent = list(leaves)
                rng.shuffle(unsent)
                for _ in range(rng.randint(1, 6)):
                    if rng.random() < 0.5 and unsent:
                        k = rng.randint(1, len(unsent))
                        messages.append((True, np.array(unsent[:k], np.int64)))
                        if rng.random() < 0.7:  # most leaves sent once, as a walk sends them
                            unsent = unsent[k:]
                    else:
                        hi = nr + 3 if rng.random() < 0.3 else nr
                        values = rng.sample(range(hi), min(rng.randint(1, 40), hi))
                        if rng.random() < 0.3:
                            values += values[:2]
                        messages.append((False, np.array(values, np.uint64)))
                forked = _census_of(datarefs.ForkedCensus(reader, nr), messages)
                assert forked == _census_of(datarefs.Census(reader, nr), messages), messages


def _open_fds() -> dict[str, str]:
    """This process's descriptors and what they are (the listing's own left out; maps of
    a closed reader that numpy views in reference cycles still hold collected first)."""
    gc.collect()
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[name] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass
    return out


def test_a_refused_fork_is_counted_in_process(bases: list[bytes], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """fork() refused (EAGAIN: a process limit; ENOMEM: strict overcommit under a big
    check) is the in-process census's job, not an I/O error; no descriptor is left open."""
    path = tmp_path / "pool.meta"
    path.write_bytes(bases[1])
    want = (check_metadata(path).to_json(), _ls(path))
    monkeypatch.setattr(datarefs, "FORK_MIN_BLOCKS", 0)

    def refuse() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(datarefs.os, "fork", refuse)
    fds = _open_fds()
    assert (check_metadata(path).to_json(), _ls(path)) == want
    assert _open_fds() == fds


CHILD_INTERRUPTED = """
import os, signal, sys
import numpy as np
# Ctrl-C's action, whatever this test's parent left (a background job ignores SIGINT)
signal.signal(signal.SIGINT, signal.default_int_handler)
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import leaves_in_order, tree_items
from dmimage.thin import datarefs

real_fork = os.fork

def fork():
    pid = real_fork()
    if pid == 0:  # Ctrl-C reaching the child before it is in its own code
        os.kill(os.getpid(), signal.SIGINT)
    return pid

datarefs.os.fork = fork
try:
    with BlockReader(sys.argv[1]) as reader:
        c = datarefs.ForkedCensus(reader, 10)
        c.values(0, np.arange(10, dtype=np.uint64))
        try:
            c.finish()
            print("counted", flush=True)
        except datarefs.CensusFailed:
            print("counted in process", flush=True)
except KeyboardInterrupt:
    print(f"{os.getpid()} ran the parent's code on", flush=True)
"""


def test_an_interrupt_never_runs_the_parent_code_in_the_child(bases: list[bytes],
                                                              tmp_path: Path) -> None:
    """Ctrl-C reaches the child too: landing between fork() and the child's own try, it
    must not send the child back up the parent's stack (its clean-up, its output)."""
    path = tmp_path / "pool.meta"
    path.write_bytes(bases[0])
    script = tmp_path / "child.py"
    script.write_text(CHILD_INTERRUPTED)
    r = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                       text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "counted in process\n"
