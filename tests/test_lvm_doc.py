"""docs/lvm.md's worked example runs as written against a byte-built VG."""

import re
import shutil
from pathlib import Path

import pytest

from test_lvm import build, expected_lv, scenario_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "lvm.md"


@pytest.mark.skipif(not shutil.which("thin_restore"), reason="needs thin_restore")
def test_lvm_doc_example_runs(tmp_path):
    import hashlib

    sc = build(tmp_path, text=scenario_text(tid=1))  # the superblock says 2
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    ns = {"DISKS": sc.disks}
    exec(compile(code, str(DOC), "exec"), ns)
    assert ns["names"] == ["lin", "[lvol0_pmspare]", "pool", "[pool_tdata]", "[pool_tmeta]",
                           "snap", "str", "thin1"]
    assert ns["lin_sha"] == hashlib.sha256(expected_lv(sc, "lin")).hexdigest()
    assert ns["mismatch"] == ["vg0/pool: transaction_id mismatch: VG metadata says 1, pool "
                              "superblock says 2"]
    assert ns["after"].ok
