"""`dmimage build` with layout = "lvm": the image read back by dmimage lvm (the guest proof
with lvm2 is vmtests/test_lvm_guest.py::test_dmimage_builds_lvm2_reads)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dmimage.cli.main import main
from dmimage.image import build, load_spec

BS = 64 << 10
MiB = 1 << 20

SPEC = """
name = "lv"
layout = "lvm"
[lvm]
vg = "vgb"
extent_size = "1MiB"
[pool]
name = "tp"
data_size = "3MiB"
metadata_size = "1MiB"
transaction_id = 4
[[volumes]]
name = "a"
id = 3
size = "2MiB"
content = "base.img"
[[volumes]]
name = "b"
id = 5
origin = "a"
content = { type = "raw", file = "layer.img" }
[[volumes]]
name = "lin"
type = "linear"
size = "3MiB"
content = "lin.img"
[[volumes]]
name = "blank"
type = "linear"
size = "1MiB"
"""


def _write(path: Path, blocks: dict[int, int], nblocks: int) -> bytes:
    buf = bytearray(nblocks * BS)
    for i, b in blocks.items():
        buf[i * BS:(i + 1) * BS] = bytes([b]) * BS
    path.write_bytes(bytes(buf))
    return bytes(buf)


def write_inputs(tmp_path: Path) -> dict[str, bytes]:
    """The content files SPEC names; returns each volume's expected bytes."""
    base = _write(tmp_path / "base.img", {0: 1, 3: 2, 17: 3}, 32)
    layer = _write(tmp_path / "layer.img", {0: 1, 3: 9, 30: 5}, 32)
    lin = _write(tmp_path / "lin.img", {0: 7, 20: 8, 40: 9}, 41)  # shorter than the LV
    return {"a": base, "b": layer, "lin": lin + bytes(3 * MiB - len(lin)),
            "blank": bytes(MiB)}


def make(tmp_path: Path) -> tuple[dict, dict[str, bytes], Path]:
    content = write_inputs(tmp_path)
    (tmp_path / "s.toml").write_text(SPEC)
    out = tmp_path / "out"
    m = build(load_spec(tmp_path / "s.toml"), out).manifest
    return m, content, out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["lvm", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_lvm_layout_reads_back(tmp_path, capsys):
    m, content, out = make(tmp_path)
    img = str(out / "lv.img")
    assert m["layout"] == "lvm" and m["lvm"]["vg"] == "vgb"
    rc, text, err = run(capsys, "ls", "--json", "-a", img)
    assert rc == 0, err
    rows = {r["lv_name"]: r for r in json.loads(text)["report"][0]["lv"]}
    assert set(rows) == {"tp", "a", "b", "lin", "blank", "[tp_tmeta]", "[tp_tdata]",
                         "[lvol0_pmspare]"}
    assert (rows["lin"]["segtype"], rows["lin"]["lv_size"]) == ("linear", str(3 * MiB))
    # metadata_size = "1MiB" is raised to lvm2's minimum, 2 MiB; the spare matches it
    assert rows["[tp_tmeta]"]["lv_size"] == rows["[lvol0_pmspare]"]["lv_size"] == str(2 * MiB)
    assert (rows["b"]["origin"], rows["b"]["thin_id"], rows["tp"]["transaction_id"]) == (
        "a", "5", "4")
    rc, _, err = run(capsys, "check", img)
    assert (rc, err) == (0, "")
    for name, want in content.items():
        dest = tmp_path / f"{name}.out"
        rc, _, err = run(capsys, "export", img, f"vgb/{name}", "-o", str(dest))
        assert rc == 0, err
        assert dest.read_bytes() == want
        dev = next(d for d in m["devices"] + m["linear"] if d["name"] == name)
        assert dev["sha256"] == hashlib.sha256(want).hexdigest()
    assert (out / "activate.sh").read_text().count("vgchange -ay vgb") == 1


def test_lvm_layout_spec_errors(tmp_path, capsys):
    (tmp_path / "x.toml").write_text(SPEC.replace('extent_size = "1MiB"',
                                                  'extent_size = "3MiB"'))
    write_inputs(tmp_path)
    rc = main(["build", str(tmp_path / "x.toml"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "lvm.extent_size" in err and not (tmp_path / "o").exists()


def test_lvm_layout_image_too_small(tmp_path, capsys):
    (tmp_path / "x.toml").write_text(SPEC.replace('layout = "lvm"',
                                                  'layout = "lvm"\nimage_size = "4MiB"'))
    write_inputs(tmp_path)
    rc = main(["build", str(tmp_path / "x.toml"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "image_size" in err and not (tmp_path / "o").exists()


def test_linear_volume_spec_errors(tmp_path, capsys):
    write_inputs(tmp_path)
    for old, new, key in (
            ('layout = "lvm"', 'layout = "gpt"', "volumes[2].type"),
            ('type = "linear"\nsize = "3MiB"', 'type = "linear"\nsize = "3MiB"\nid = 9',
             "volumes[2].id"),
            ('type = "linear"\nsize = "1MiB"', 'type = "stripey"\nsize = "1MiB"',
             "volumes[3].type"),
            ('origin = "a"', 'origin = "lin"', "volumes[1].origin"),
            ('type = "linear"\nsize = "1MiB"', 'type = "linear"\nsize = "1536KiB"',
             "volumes[3].size")):
        assert old in SPEC
        (tmp_path / "x.toml").write_text(SPEC.replace(old, new))
        rc = main(["build", str(tmp_path / "x.toml"), "-o", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 1 and key in err and err.count("\n") == 1, (key, err)
        assert not (tmp_path / "o").exists()
