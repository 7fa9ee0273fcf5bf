"""How a thin_dump XML may spell a number, against thin_restore 0.9 and 1.1: both refuse
spaces around the digits and underscores between them, which Python's int() takes (the
single-mapping fast path of dmimage's XML parser read "1_0" as 10). dmimage must refuse what
both refuse, naming the element and its line, and read the same value where they accept.
('+10' is the one known difference: both tools read it as 10; dmimage refuses it.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from dmimage.cli.main import main

import oracles

SPELLINGS = [" 10", "10 ", "1_0", "\u0661\u0660", "10", "010"]  # \u0661\u0660: Arabic-Indic 10


def _xml(element: str, spelling: str) -> str:
    if element == "single_mapping":
        m = f'<single_mapping origin_block="{spelling}" data_block="5" time="0"/>'
        mapped = 1
    else:
        m = f'<range_mapping origin_begin="{spelling}" data_begin="5" length="2" time="0"/>'
        mapped = 2
    return ('<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
            'data_block_size="128" nr_data_blocks="100">\n'
            f'  <device dev_id="1" mapped_blocks="{mapped}" transaction="0" '
            'creation_time="0" snap_time="0">\n'
            f"    {m}\n"
            "  </device>\n"
            "</superblock>\n")


def _tool_accepts(xml: Path, tools: oracles.Tools, out: Path) -> bool:
    oracles.make_sparse(out, 1024)
    return oracles.run(tools, "thin_restore", "-q", "-i", xml, "-o", out).returncode == 0


@pytest.mark.parametrize("element", ["single_mapping", "range_mapping"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_number_spellings_like_thin_restore(element: str, spelling: str, tmp_path: Path,
                                            tools09: oracles.Tools, tools11: oracles.Tools,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    xml = tmp_path / "in.xml"
    xml.write_text(_xml(element, spelling), encoding="utf-8")
    verdicts = {_tool_accepts(xml, t, tmp_path / "tool.meta") for t in (tools09, tools11)}
    assert len(verdicts) == 1, "the two tools disagree: no oracle"
    meta = tmp_path / "out.meta"
    oracles.make_sparse(meta, 1024)
    rc = main(["restore", "-q", "-i", str(xml), "-o", str(meta)])
    err = capsys.readouterr().err
    assert (rc == 0) == verdicts.pop(), err
    if rc:
        assert rc == 1 and err.count("\n") == 1 and "line 3" in err and element in err
        assert not any(meta.read_bytes())  # nothing written
    else:  # read as the tool reads it: the same metadata
        oracles.restore_file(xml, tmp_path / "tool.meta", tools11, 1024)
        assert oracles.run(tools11, "thin_dump", meta).stdout == \
            oracles.run(tools11, "thin_dump", tmp_path / "tool.meta").stdout
