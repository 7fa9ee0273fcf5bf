"""Repair of metadata the real kernel wrote (tests/fixtures/repair/, made in the guest by
vmtests/repair_pools.py: 6.1 and 6.12 kernels, multi-level trees, snapshots sharing subtrees,
stale nodes of earlier transactions), judged against thin_repair 1.1 on the same damage:
dmimage must recover at least as many correct mappings and no more wrong ones (the truth is
thin_dump 1.1's dump of the undamaged fixture). A sample of the damage classes runs here;
benchmarks/repair_quality.py runs them all (docs/repair.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dmimage.cli.main import main

import oracles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import repair_quality as q  # noqa: E402

NAMES = q.kernel_fixture_names()
#: the classes where the top-level tree or the superblock is lost, plus node damage
SAMPLE = {"superblock zeroed", "mapping root zeroed", "details root zeroed",
          "bottom leaf: bad checksum"}


def test_kernel_fixtures_present():
    assert len(NAMES) >= 4, NAMES
    assert {n[:4] for n in NAMES} >= {"k61-", "k612"}


@pytest.mark.parametrize("name", NAMES)
def test_repair_at_least_thin_repair_11_on_kernel_pools(name, tools11, tmp_path):
    case = q.kernel_case(name)
    rows = q.evaluate(case, tmp_path, tools11, SAMPLE, in_process=True)
    assert {r.damage for r in rows} == SAMPLE
    worse = [f"{r.damage}: {why} (ours {r.ours}, thin_repair 1.1 {r.theirs})"
             for r in rows if (why := q.worse_than_thin_repair(r))]
    assert not worse, "\n".join(worse)
    # on these pools: no wrong mapping at all, and with the top-level tree or the superblock
    # lost, the newest generation whole
    assert [r.damage for r in rows if r.ours.wrong] == []
    for r in rows:
        if r.damage in ("mapping root zeroed", "superblock zeroed"):
            assert r.ours.correct == len(case.truth), r


def test_dump_repair_says_where_each_tree_came_from(tmp_path, capsys, tools11):
    case = q.kernel_case(NAMES[0])
    d = next(d for d in q.damage_classes(case.meta) if d.kind == "mapping root zeroed")
    bad = tmp_path / "bad.meta"
    bad.write_bytes(d.data)
    assert main(["dump", "--repair", str(bad)]) == 0
    cap = capsys.readouterr()
    devices = sorted({k[0] for k in case.truth})
    for dev in devices:
        assert f"device {dev}: bottom-level tree " in cap.err
    assert "top-level mapping tree rebuilt" in cap.err
    out = tmp_path / "o.meta"
    oracles.make_sparse(out, len(case.meta) // 4096)
    assert main(["repair", "-q", "-i", str(bad), "-o", str(out)]) == 0
    assert cap.out.rstrip("\n") == oracles.dump(out, tools11).rstrip("\n")
