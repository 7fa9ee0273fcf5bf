"""lvs's columns for the segment types beyond thin (raid, mirror, cache, cachevol, old-style
snapshots, allocation and activation flags), against what the real lvm2 2.03.16 printed for a VG
it made in the guest (tests/fixtures/lvm/segtypes-deb12.json and -deb13.json; rerun live by
vmtests/test_lvm_rules_guest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmimage.lvm.model import vg_from_tree
from dmimage.lvm.report import lv_attr, lv_rows, roles
from dmimage.lvm.text import parse

FIXTURES = {k: json.loads((Path(__file__).parent / "fixtures" / "lvm" /
                           f"segtypes-{k}.json").read_text()) for k in ("deb12", "deb13")}
FIXTURE = FIXTURES["deb12"]
COLUMNS = ("lv_attr", "segtype", "lv_size", "pool_lv", "origin")


@pytest.mark.parametrize("kernel", sorted(FIXTURES))
def test_every_column_matches_lvs(kernel: str) -> None:
    fixture = FIXTURES[kernel]
    vg = vg_from_tree(parse(fixture["vgcfgbackup"]))
    ours = {r["lv_name"]: r for r in lv_rows(vg, all_lvs=True)}
    theirs = {r["lv_name"]: r for r in fixture["lvs"]}
    assert set(ours) == set(theirs)
    diff = {n: {c: (ours[n][c], t[c]) for c in COLUMNS if ours[n][c] != t[c]}
            for n, t in theirs.items()}
    assert not any(diff.values()), {n: d for n, d in diff.items() if d}
    # the fixture covers the kinds this test is about
    attrs = {t["lv_attr"][0] for t in fixture["lvs"]}
    assert {"r", "m", "C", "I", "e", "l", "o", "s", "V", "t", "T"} <= attrs


def test_unknown_segment_type_is_shown_not_fatal() -> None:
    text = FIXTURE["vgcfgbackup"].replace('type = "raid5"', 'type = "raid77"')
    vg = vg_from_tree(parse(text))
    rows = {r["lv_name"]: r for r in lv_rows(vg, all_lvs=True)}
    assert rows["r5"]["segtype"] == "raid77"
    assert rows["r5"]["lv_attr"] == "-wi---u---"
    r = roles(vg)
    assert lv_attr(vg, vg.lv("r1"), r, partial=True).endswith("p-")  # type: ignore[arg-type]
