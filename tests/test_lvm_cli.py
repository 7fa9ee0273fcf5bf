"""`dmimage lvm ...` on byte-built VGs (tests/lvmgen.py) with thin_restore-written pools."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess

import pytest

from dmimage.cli.main import main

import lvmgen
from test_lvm import EXT_B, PE_START, PV0_OFF, PV1_ID, THIN_MAP, build, expected_lv, scenario_text

needs_tools = pytest.mark.skipif(not shutil.which("thin_restore") or not shutil.which("thin_dump"),
                                 reason="needs thin-provisioning-tools")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["lvm", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def digest(*paths: str) -> list[str]:
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_ls_json_has_lvs_fields_and_values(tmp_path, capsys):
    sc = build(tmp_path)
    rc, out, _ = run(capsys, "ls", "--json", "-a", *sc.disks)
    assert rc == 0
    rows = {r["lv_name"]: r for r in json.loads(out)["report"][0]["lv"]}
    e = str(EXT_B)
    want = {  # lv_attr as lvm2's lv.c builds it for inactive LVs
        "lin": ("-wi-------", str(12 * EXT_B), "linear", "", "", "", ""),
        "str": ("-wi-------", str(8 * EXT_B), "striped", "", "", "", ""),
        "pool": ("twi---tz--", str(64 * EXT_B), "thin-pool", "", "", "", "2"),
        "thin1": ("Vwi---tz--", str(32 * EXT_B), "thin", "1", "pool", "", "0"),
        "snap": ("Vwi---tz--", str(32 * EXT_B), "thin", "2", "pool", "thin1", "1"),
        "[lvol0_pmspare]": ("ewi-------", str(64 * EXT_B), "linear", "", "", "", ""),
        "[pool_tmeta]": ("ewi-------", str(64 * EXT_B), "linear", "", "", "", ""),
        "[pool_tdata]": ("Twi-------", str(64 * EXT_B), "linear", "", "", "", ""),
    }
    assert e
    got = {k: (r["lv_attr"], r["lv_size"], r["segtype"], r["thin_id"], r["pool_lv"],
               r["origin"], r["transaction_id"]) for k, r in rows.items()}
    assert got == want
    rc, out, _ = run(capsys, "ls", "--json", *sc.disks)
    assert sorted(r["lv_name"] for r in json.loads(out)["report"][0]["lv"]) == [
        "lin", "pool", "snap", "str", "thin1"]


def test_ls_tree_draws_snapshot_lineage(tmp_path, capsys):
    sc = build(tmp_path)
    rc, out, _ = run(capsys, "ls", "--tree", *sc.disks)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "vg0/pool (transaction_id 2)"
    assert lines[1].strip() == "└─ thin1 (thin_id 1)"
    assert lines[2].startswith("    └─ snap (thin_id 2)")


@needs_tools
def test_check_is_clean(tmp_path, capsys):
    sc = build(tmp_path)
    rc, out, err = run(capsys, "check", *sc.disks)
    assert (rc, err) == (0, "")
    assert "vg0/pool: transaction_id VG 2, superblock 2; devices [1, 2]" in out


@needs_tools
@pytest.mark.parametrize("lv", ["lin", "str", "pool_tmeta", "pool_tdata", "thin1", "snap"])
def test_export_matches_the_extents_and_mappings(tmp_path, capsys, lv):
    sc = build(tmp_path)
    out = str(tmp_path / "out.bin")
    rc, _, err = run(capsys, "export", *sc.disks, f"vg0/{lv}", "-o", out)
    assert (rc, err) == (0, "")
    if lv in ("thin1", "snap"):
        tdata, bs = expected_lv(sc, "pool_tdata"), 128 * 512
        want = bytearray(32 * EXT_B)
        for v, d in THIN_MAP[1 if lv == "thin1" else 2].items():
            want[v * bs:(v + 1) * bs] = tdata[d * bs:(d + 1) * bs]
    else:
        want = expected_lv(sc, lv)
    assert open(out, "rb").read() == bytes(want)


def test_metadata_prints_the_committed_text(tmp_path, capsys):
    sc = build(tmp_path)
    rc, out, _ = run(capsys, "metadata", *sc.disks)
    assert rc == 0 and out == scenario_text()


@needs_tools
def test_dump_is_thin_dumps_view_of_tmeta(tmp_path, capsys):
    sc = build(tmp_path)
    out = str(tmp_path / "d.xml")
    rc, _, _ = run(capsys, "dump", *sc.disks, "vg0/pool", "-o", out)
    assert rc == 0
    text = open(out).read()
    assert 'transaction="2"' in text and 'dev_id="2"' in text and 'data_block="50"' in text


def _mda_records(path: str, region_off: int):
    """(rlocn offset, size, checksum, text) read with the independent lvmgen facts."""
    with open(path, "rb") as f:
        f.seek(region_off + 4096)
        hdr = f.read(512)
        assert struct.unpack_from("<I", hdr)[0] == lvmgen.crc_ref(hdr[4:])
        start, size = struct.unpack_from("<QQ", hdr, 24)
        off, tsize, csum, _ = struct.unpack_from("<QQII", hdr, 40)
        assert struct.unpack_from("<QQ", hdr, 64) == (0, 0)  # slot 1 cleared
        first = min(tsize, size - off)
        f.seek(region_off + 4096 + off)
        text = f.read(first)
        f.seek(region_off + 4096 + 512)
        text += f.read(tsize - first)
    assert lvmgen.crc_ref(text) == csum and text.endswith(b"\0")
    return off, tsize, text


@needs_tools
def test_transaction_id_mismatch_found_and_fixed_on_the_vg_side(tmp_path, capsys):
    sc = build(tmp_path, text=scenario_text(tid=5))
    rc, _, err = run(capsys, "check", *sc.disks)
    assert rc == 1
    assert "vg0/pool: transaction_id mismatch: VG metadata says 5, pool superblock says 2" in err
    before = digest(*sc.disks)
    rc, out, _ = run(capsys, "set-transaction-id", "--dry-run", *sc.disks, "vg0/pool")
    assert rc == 0 and "5 -> 2" in out and "dry run" in out
    assert digest(*sc.disks) == before
    rc, out, _ = run(capsys, "set-transaction-id", *sc.disks, "vg0/pool")
    assert rc == 0 and "seqno 7 -> 8" in out
    for path, off in ((sc.disk_a, PV0_OFF), (sc.disk_b, 0)):
        roff, _, text = _mda_records(path, off)
        assert roff % 512 == 0 and roff > 512  # after the old copy, sector aligned
        assert b"seqno = 8" in text and b"transaction_id = 2" in text
        assert b"transaction_id = 5" not in text
    rc, _, err = run(capsys, "check", *sc.disks)
    assert (rc, err) == (0, "")
    # nothing else changed in the model
    from dmimage.lvm.model import vg_from_tree
    from dmimage.lvm.text import parse
    from dmimage.lvm.vg import load_vgs
    (lvg,), _, _ = load_vgs(sc.disks)
    old = vg_from_tree(parse(scenario_text(tid=5)))
    old.seqno = 8
    old.lv("pool").segments[0].transaction_id = 2
    assert lvg.vg == old


@needs_tools
def test_transaction_id_fixed_on_the_pool_side(tmp_path, capsys):
    sc = build(tmp_path, text=scenario_text(tid=5))
    rc, out, _ = run(capsys, "set-transaction-id", "--side", "pool", *sc.disks, "vg0/pool")
    assert rc == 0 and "2 -> 5" in out
    meta = str(tmp_path / "tmeta.bin")
    with open(sc.disk_a, "rb") as f, open(meta, "wb") as g:
        f.seek(PV0_OFF + PE_START * 512 + 16 * EXT_B)
        g.write(f.read(64 * EXT_B))
    assert subprocess.run(["thin_check", meta], capture_output=True).returncode == 0
    dump = subprocess.run(["thin_dump", meta], capture_output=True, text=True, check=True)
    assert 'transaction="5"' in dump.stdout
    rc, _, err = run(capsys, "check", *sc.disks)
    assert (rc, err) == (0, "")


@needs_tools
def test_new_generation_wraps_around_the_circular_buffer(tmp_path, capsys):
    size = 16 * 1024
    text = scenario_text(tid=5)
    sc = build(tmp_path, text=text, text_off=size - 4096 - 512 * 2, mda_size=size)
    rc, _, _ = run(capsys, "set-transaction-id", *sc.disks, "vg0/pool")
    assert rc == 0
    for path, off in ((sc.disk_a, PV0_OFF), (sc.disk_b, 0)):
        roff, tsize, body = _mda_records(path, off)
        assert roff + tsize > size  # wrapped
        assert b"seqno = 8" in body
    rc, _, err = run(capsys, "check", *sc.disks)
    assert (rc, err) == (0, "")


@needs_tools
def test_orphan_and_unknown_device_named(tmp_path, capsys):
    text = scenario_text().replace("device_id = 2", "device_id = 9")
    sc = build(tmp_path, text=text)
    rc, _, err = run(capsys, "check", *sc.disks)
    assert rc == 1
    assert "thin LV snap has device_id 9, which the pool does not have" in err
    assert "pool device 2 (11 mapped blocks, transaction 1) is named by no LV (orphan)" in err


# -- bad input ---------------------------------------------------------------------------

def _one_line(err: str) -> None:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_not_a_pv(tmp_path, capsys):
    p = tmp_path / "zero.img"
    p.write_bytes(bytes(1 << 20))
    rc, _, err = run(capsys, "ls", str(p))
    assert rc == 1
    _one_line(err)
    rc, _, err = run(capsys, "check", str(p))
    assert rc == 1 and "no LVM physical volume label" in err


def test_missing_file_is_an_io_error(tmp_path, capsys):
    rc, _, err = run(capsys, "ls", str(tmp_path / "nope.img"))
    assert rc == 2
    _one_line(err)


@pytest.mark.parametrize("bad,what", [
    ("}", "unbalanced braces"), ('"', "unterminated string"),
    ("TRUNCATE", "unbalanced braces: end of text inside a section")])
def test_broken_text_is_named(tmp_path, capsys, bad, what):
    full = scenario_text()
    text = full[:full.index("\n", 900) + 1] if bad == "TRUNCATE" else full + bad
    sc = build(tmp_path, text=text)  # the area's checksum is right: the text itself is bad
    rc, _, err = run(capsys, "check", *sc.disks)
    assert rc == 1 and what in err
    rc, _, err = run(capsys, "export", *sc.disks, "vg0/lin", "-o", str(tmp_path / "x"))
    assert rc == 1
    _one_line(err)
    assert not (tmp_path / "x").exists()


def test_missing_pv_partial_vg(tmp_path, capsys):
    sc = build(tmp_path)
    rc, _, err = run(capsys, "export", sc.disk_a, "vg0/lin", "-o", str(tmp_path / "x"))
    assert rc == 1 and PV1_ID in err
    _one_line(err)
    assert not (tmp_path / "x").exists()
    rc, _, _ = run(capsys, "export", sc.disk_a, "vg0/pool_tmeta", "-o", str(tmp_path / "m"))
    assert rc == 0 and open(tmp_path / "m", "rb").read() == expected_lv(sc, "pool_tmeta")
    rc, out, _ = run(capsys, "ls", "--json", "-a", sc.disk_a)
    rows = {r["lv_name"]: r["lv_attr"] for r in json.loads(out)["report"][0]["lv"]}
    assert rows["lin"][8] == "p" and rows["[pool_tmeta]"][8] == "-"
    rc, _, err = run(capsys, "check", sc.disk_a)
    assert rc == 1 and PV1_ID in err


def test_overlapping_segments_within_an_lv(tmp_path, capsys):
    text = scenario_text().replace("start_extent = 8\n", "start_extent = 6\n", 1)
    sc = build(tmp_path, text=text)
    rc, _, err = run(capsys, "check", *sc.disks)
    assert rc == 1 and "vg0/lin segment2: start_extent 6, expected 8" in err
    rc, _, err = run(capsys, "export", *sc.disks, "vg0/lin", "-o", str(tmp_path / "x"))
    assert rc == 1 and "overlap" in err and not (tmp_path / "x").exists()
    _one_line(err)


def test_overlapping_extents_and_origin_loop(tmp_path, capsys):
    text = (scenario_text().replace('"pv0", 112', '"pv0", 100')
            .replace('device_id = 1', 'device_id = 1\norigin = "snap"'))
    sc = build(tmp_path, text=text)
    rc, _, err = run(capsys, "check", *sc.disks)
    assert rc == 1
    assert "pv0 extents 100..111 are used by both pool_tdata and lvol0_pmspare" in err
    assert "origin chain loops back" in err


def test_wrong_lv_name_is_usage_error(tmp_path, capsys):
    sc = build(tmp_path)
    rc, _, err = run(capsys, "export", *sc.disks, "vg0/nope", "-o", str(tmp_path / "x"))
    assert rc == 2 and "no LV 'nope'" in err


@needs_tools
def test_second_metadata_area_at_the_end_of_the_pv(tmp_path, capsys):
    """pvcreate --pvmetadatacopies 2 puts an area at the end: it is read, an older copy
    there is reported, and a new generation is written to both areas."""
    from test_lvm import PE_START as _PE
    from test_lvm import PV1_SIZE
    sc = build(tmp_path, text=scenario_text(tid=5))
    end_off = PV1_SIZE - 64 * 1024
    with open(sc.disk_b, "r+b") as f:
        lvmgen.write_pv(f, 0, PV1_ID, PV1_SIZE, _PE * 512, scenario_text(tid=5),
                        second_mda=(end_off, 64 * 1024, scenario_text(seqno=6, tid=5)))
    from dmimage.lvm.vg import load_vgs
    (lvg,), _, _ = load_vgs(sc.disks)
    assert len(lvg.mdas) == 3
    assert any(f"metadata area at byte {end_off}: VG vg0 seqno 6, the newest is 7" in p
               for p in lvg.problems)
    rc, out, _ = run(capsys, "set-transaction-id", *sc.disks, "vg0/pool")
    assert rc == 0 and out.count("written:") == 3
    (lvg,), _, _ = load_vgs(sc.disks)
    assert lvg.problems == [] and lvg.vg.seqno == 8
    with open(sc.disk_b, "rb") as f:
        f.seek(end_off)
        hdr = f.read(512)
    assert struct.unpack_from("<I", hdr)[0] == lvmgen.crc_ref(hdr[4:])


@needs_tools
def test_delete_orphans(tmp_path, capsys):
    from test_lvm import EXT, PV0_PE, PV0_SIZE, PV1_PE, PV1_SIZE, VG_ID, lvs_spec
    from test_lvm import PV0_ID as P0
    text = lvmgen.vg_text("vg0", VG_ID, 7, EXT,
                          [("pv0", P0, PV0_SIZE // 512, PE_START, PV0_PE),
                           ("pv1", PV1_ID, PV1_SIZE // 512, PE_START, PV1_PE)],
                          [t for t in lvs_spec() if t.name != "snap"])
    sc = build(tmp_path, text=text)
    rc, _, err = run(capsys, "check", *sc.disks)
    assert rc == 1 and "pool device 2 (11 mapped blocks, transaction 1)" in err
    before = digest(*sc.disks)
    rc, out, _ = run(capsys, "delete-orphans", "--dry-run", *sc.disks, "vg0/pool")
    assert rc == 0 and "delete orphan thin device 2 [dry run]" in out
    assert digest(*sc.disks) == before
    rc, out, _ = run(capsys, "delete-orphans", *sc.disks, "vg0/pool")
    assert rc == 0 and "block 0 last" in out
    rc, _, err = run(capsys, "check", *sc.disks)
    assert (rc, err) == (0, "")
    meta = str(tmp_path / "tmeta.bin")
    with open(sc.disk_a, "rb") as f, open(meta, "wb") as g:
        f.seek(PV0_OFF + PE_START * 512 + 16 * EXT_B)
        g.write(f.read(64 * EXT_B))
    assert subprocess.run(["thin_check", meta], capture_output=True).returncode == 0
    dump = subprocess.run(["thin_dump", meta], capture_output=True, text=True, check=True)
    assert 'dev_id="1"' in dump.stdout and 'dev_id="2"' not in dump.stdout
    out_file = str(tmp_path / "t1")
    assert run(capsys, "export", *sc.disks, "vg0/thin1", "-o", out_file)[0] == 0
    tdata, bs = expected_lv(sc, "pool_tdata"), 128 * 512
    want = bytearray(32 * EXT_B)
    for v, d in THIN_MAP[1].items():
        want[v * bs:(v + 1) * bs] = tdata[d * bs:(d + 1) * bs]
    assert open(out_file, "rb").read() == bytes(want)


ODD = "ev\"il\nna\x1bme\u202e"  # a quote, a newline, an escape, a bidi override


@needs_tools
def test_odd_lv_names_print_one_line_per_item(tmp_path, capsys):
    """An LV name with a newline, control characters and a bidi override (possible in a
    damaged or hostile VG text) prints escaped: one line per row, problem and error."""
    from dmimage.lvm.report import one_line
    from dmimage.lvm.text import quote

    text = scenario_text().replace("snap {", quote(ODD) + " {").replace(
        "origin = \"thin1\"\ndevice_id = 2", "origin = \"thin1\"\ndevice_id = 9")
    assert ODD not in scenario_text() and quote(ODD) in text and "device_id = 9" in text
    sc = build(tmp_path, text=text)
    shown = one_line(ODD)
    assert shown == 'ev"il\\nna\\x1bme\\u202e'
    rc, out, err = run(capsys, "ls", *sc.disks)
    assert rc == 0 and shown in out and len(out.splitlines()) == 1 + 5, out
    rc, out, _ = run(capsys, "ls", "--json", *sc.disks)
    assert ODD in [r["lv_name"] for r in json.loads(out)["report"][0]["lv"]]  # JSON escapes
    rc, out, _ = run(capsys, "ls", "--tree", *sc.disks)
    assert shown in out and "\x1b" not in out
    rc, out, err = run(capsys, "check", *sc.disks)
    assert rc == 1
    lines = err.splitlines()
    assert any(f"thin LV {shown} has device_id 9" in x for x in lines), err
    assert any("pool device 2" in x for x in lines) and len(lines) == 2, err
    rc, out, err = run(capsys, "export", *sc.disks, "vg0/" + ODD, "-o", str(tmp_path / "o"))
    assert rc == 2 and err.count("\n") == 1 and shown in err, err


def test_one_line_escapes_bytes_that_are_not_utf8():
    from dmimage.lvm.report import one_line

    raw = b"lv\xff\x00x".decode("utf-8", errors="surrogateescape")
    assert one_line(raw) == "lv\\xff\\x00x"
    assert one_line("plain-name_1.2+") == "plain-name_1.2+"


@needs_tools
@pytest.mark.parametrize("vg_tid,clean,says", [
    (2, True, None),
    (3, True, "one ahead of the superblock's 2 with no pending message"),
    (0, True, "VG transaction_id 0: lvm2 does not validate it"),
    (1, False, "transaction_id mismatch: VG metadata says 1, pool superblock says 2"),
    (4, False, "transaction_id mismatch: VG metadata says 4, pool superblock says 2"),
])
def test_transaction_id_rule_as_lvm2_activates(tmp_path, capsys, vg_tid, clean, says):
    """The rule of lvm2 2.03.16's activation (the guest proof is vmtests/
    test_lvm_rules_guest.py): the superblock here says 2."""
    sc = build(tmp_path, text=scenario_text(tid=vg_tid))
    rc, out, err = run(capsys, "check", *sc.disks)
    assert rc == (0 if clean else 1), err
    if says:
        assert says in (out if clean else err), (out, err)
