"""Hidden thin-pool LV sizes against the table the real lvm2 2.03.16 produced in the guest
(tests/fixtures/lvm/thin_pool_sizes.json: each case's commands and lvs's output verbatim;
vmtests/test_lvm_rules_guest.py reruns them)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from dmimage.lvm.sizing import thin_pool_sizes

TABLE = json.loads((Path(__file__).parent / "fixtures" / "lvm" /
                    "thin_pool_sizes.json").read_text())["cases"]
_UNITS = {"k": 2, "m": 2048, "g": 2048 << 10, "t": 2048 << 20}


def _sectors(arg: str) -> int:
    return int(arg[:-1]) * _UNITS[arg[-1].lower()]


def parse_case(commands: list[str]) -> tuple[int, int, int | None, int | None]:
    """(extent size, data extents, chunk, metadata size) in sectors from the commands."""
    ext = _sectors(re.search(r"vgcreate -s (\S+)", commands[0]).group(1))  # type: ignore[union-attr]
    lvc = commands[1]

    def opt(flag: str) -> int | None:
        m = re.search(rf"{flag} (\S+)", lvc)
        return _sectors(m.group(1)) if m else None

    data = opt("-L")
    assert data is not None and data % ext == 0
    return ext, data // ext, opt("-c"), opt("--poolmetadatasize")


@pytest.mark.parametrize("case", TABLE, ids=lambda c: c["commands"][1].split("thin-pool ")[1])
def test_sizes_match_lvm2(case: dict[str, Any]) -> None:
    ext, data_extents, chunk, meta = parse_case(case["commands"])
    got = thin_pool_sizes(data_extents, ext, chunk, meta)
    lvs = case["lvs"]
    assert got.tmeta_extents * ext * 512 == int(lvs["[pool_tmeta]"]["lv_size"])
    assert got.pmspare_extents * ext * 512 == int(lvs["[lvol0_pmspare]"]["lv_size"])
    assert got.chunk_size * 512 == int(lvs["pool"]["chunk_size"])
    assert int(lvs["[pool_tdata]"]["lv_size"]) == data_extents * ext * 512


def test_table_covers_the_rules() -> None:
    """The recorded cases reach the minimum, the maximum, the chunk doubling and a derived
    chunk (so the test above exercises each rule)."""
    cmds = [c["commands"][1] for c in TABLE]
    assert any("poolmetadatasize 20g" in c for c in cmds)  # above the maximum
    assert any("-L 12m -n" in c for c in cmds)  # below the minimum
    assert any(re.search(r"-L \d+g -n", c) for c in cmds)  # no -c: the doubling
