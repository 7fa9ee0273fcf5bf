"""LVM reading: layouts and CRC against byte-built PVs (tests/lvmgen.py), text, views, thin."""

from __future__ import annotations

import atexit
import hashlib
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmimage.errors import MetadataError
from dmimage.format import lvm as fmt
from dmimage.lvm import text as lvmtext
from dmimage.lvm.model import StripedSegment, ThinPoolSegment, ThinSegment, vg_from_tree
from dmimage.lvm.ondisk import scan
from dmimage.lvm.thin import data_view, open_lv_pool
from dmimage.lvm.vg import load_vgs
from dmimage.lvm.view import LvView, MissingPvError
from dmimage.thin.export import export_thin

import lvmgen
from lvmgen import TLv, striped

MiB = 1 << 20
EXT = 128  # sectors: 64 KiB extents keep the images small
EXT_B = EXT * 512
PV0_ID = "pv0aaa-1111-2222-3333-4444-5555-666666"
PV1_ID = "pv1bbb-1111-2222-3333-4444-5555-666666"
VG_ID = "vgvgvg-1111-2222-3333-4444-5555-666666"
PV0_OFF, PV0_SIZE = 1 * MiB, 21 * MiB  # GPT partition 1 of disk A
PV1_OFF, PV1_SIZE = 0, 12 * MiB  # disk B is a bare PV
PE_START = 2048
PV0_PE, PV1_PE = (PV0_SIZE - MiB) // EXT_B, (PV1_SIZE - MiB) // EXT_B

THIN_XML = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="64">
  <device dev_id="1" mapped_blocks="11" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="10" time="0"/>
    <single_mapping origin_block="20" data_block="40" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="11" transaction="1" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="3" data_block="50" time="1"/>
    <range_mapping origin_begin="4" data_begin="4" length="6" time="0"/>
    <single_mapping origin_block="20" data_block="40" time="0"/>
  </device>
</superblock>
"""
#: (dev_id, virtual block) -> data block, as THIN_XML says.
THIN_MAP = {1: {**{v: v for v in range(10)}, 20: 40},
            2: {**{v: v for v in range(10)}, 3: 50, 20: 40}}


def lvs_spec(tid: int = 2) -> list[TLv]:
    return [
        TLv("lin", [striped(0, 8, [("pv0", 0)]), striped(8, 4, [("pv1", 0)])]),
        TLv("str", [striped(0, 8, [("pv0", 8), ("pv1", 4)], stripe_size=16)]),
        TLv("pool", ["start_extent = 0\nextent_count = 64\n\ntype = \"thin-pool\"\n"
                     "metadata = \"pool_tmeta\"\npool = \"pool_tdata\"\n"
                     f"transaction_id = {tid}\nchunk_size = 128\ndiscards = \"passdown\"\n"
                     "zero_new_blocks = 1"]),
        TLv("thin1", ["start_extent = 0\nextent_count = 32\n\ntype = \"thin\"\n"
                      "thin_pool = \"pool\"\ntransaction_id = 0\ndevice_id = 1"]),
        TLv("snap", ["start_extent = 0\nextent_count = 32\n\ntype = \"thin\"\n"
                     "thin_pool = \"pool\"\ntransaction_id = 1\norigin = \"thin1\"\n"
                     "device_id = 2"]),
        TLv("lvol0_pmspare", [striped(0, 64, [("pv0", 112)])], visible=False),
        TLv("pool_tmeta", [striped(0, 64, [("pv0", 16)])], visible=False),
        TLv("pool_tdata", [striped(0, 32, [("pv0", 80)]), striped(32, 32, [("pv1", 8)])],
            visible=False),
    ]


def scenario_text(seqno: int = 7, tid: int = 2) -> str:
    return lvmgen.vg_text("vg0", VG_ID, seqno, EXT,
                          [("pv0", PV0_ID, PV0_SIZE // 512, PE_START, PV0_PE),
                           ("pv1", PV1_ID, PV1_SIZE // 512, PE_START, PV1_PE)],
                          lvs_spec(tid))


@dataclass
class Scenario:
    disk_a: str
    disk_b: str
    meta_xml: str

    @property
    def disks(self) -> list[str]:
        return [self.disk_a, self.disk_b]

    def pv_bytes(self, pv: str, pe: int, n_ext: int) -> bytes:
        path, off = (self.disk_a, PV0_OFF) if pv == "pv0" else (self.disk_b, PV1_OFF)
        with open(path, "rb") as f:
            f.seek(off + PE_START * 512 + pe * EXT_B)
            return f.read(n_ext * EXT_B)


def expected_lv(sc: Scenario, name: str) -> bytes:
    """An LV's bytes from the spec, extent by extent (and chunk by chunk for stripes)."""
    lv = next(t for t in lvs_spec() if t.name == name)
    out = bytearray()
    for body in lv.segments:
        tree = lvmtext.parse(body)
        flat = tree["stripes"]
        stripes = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        count = tree["extent_count"]
        if len(stripes) == 1:
            out += sc.pv_bytes(stripes[0][0], stripes[0][1], count)
            continue
        chunk = tree["stripe_size"] * 512
        per = count // len(stripes)
        areas = [sc.pv_bytes(p, e, per) for p, e in stripes]
        for row in range(per * EXT_B // chunk):
            for a in areas:
                out += a[row * chunk:(row + 1) * chunk]
    return bytes(out)


#: build()'s files per (text, text_off, mda_size), made once per process and copied: a build
#: is deterministic (fixed texts and fill seeds), and each wrote ~30 MB of random bytes and ran
#: thin_restore (0.17 CPU-s; ~40 builds in the suite, a dozen distinct).
_BUILT: dict[tuple[str, int, int], str] = {}
_BUILT_FILES = ("a.img", "b.img", "meta.xml", "meta.bin")
_BUILT_DIR: list[str] = []  # on tmpfs when there is one; removed when the process ends


def build(tmp_path, text: str | None = None, text_off: int = 512,
          mda_size: int = 64 * 1024) -> Scenario:
    """The two-disk VG (disk A: GPT with PV0, disk B: a bare PV) in ``tmp_path``, with the
    pool's metadata written by thin_restore into pool_tmeta's extents."""
    text = text or scenario_text()
    key = (text, text_off, mda_size)
    src = _BUILT.get(key)
    if src is None or not os.path.isdir(src):
        if not _BUILT_DIR:
            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            _BUILT_DIR.append(tempfile.mkdtemp(prefix="dmimage-lvm-scenarios-", dir=shm))
            atexit.register(_remove_built, _BUILT_DIR[0], os.getpid())
        src = tempfile.mkdtemp(dir=_BUILT_DIR[0])
        _build_into(Path(src), text, text_off, mda_size)
        _BUILT[key] = src
    for name in _BUILT_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), tmp_path / name)
    return Scenario(str(tmp_path / "a.img"), str(tmp_path / "b.img"),
                    str(tmp_path / "meta.xml"))


def _remove_built(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a child forked from this process
        shutil.rmtree(path, ignore_errors=True)


def _build_into(tmp_path: Path, text: str, text_off: int, mda_size: int) -> Scenario:
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    lvmgen.blank(a, 24 * MiB)
    lvmgen.blank(b, PV1_SIZE)
    with open(a, "r+b") as f:
        lvmgen.write_gpt(f, 24 * MiB, [(PV0_OFF // 512, (PV0_OFF + PV0_SIZE) // 512 - 1)])
        lvmgen.write_pv(f, PV0_OFF, PV0_ID, PV0_SIZE, PE_START * 512, text, text_off=text_off,
                        mda_size=mda_size)
    with open(b, "r+b") as f:
        lvmgen.write_pv(f, PV1_OFF, PV1_ID, PV1_SIZE, PE_START * 512, text, text_off=text_off,
                        mda_size=mda_size)
    lvmgen.fill_random(a, PV0_OFF + PE_START * 512, PV0_PE * EXT_B, 1)
    lvmgen.fill_random(b, PV1_OFF + PE_START * 512, PV1_PE * EXT_B, 2)
    sc = Scenario(a, b, str(tmp_path / "meta.xml"))
    # the pool's metadata, written by thin_restore into the pool_tmeta extents
    if shutil.which("thin_restore"):
        meta = str(tmp_path / "meta.bin")
        lvmgen.blank(meta, 64 * EXT_B)
        with open(sc.meta_xml, "w") as f:
            f.write(THIN_XML)
        subprocess.run(["thin_restore", "-i", sc.meta_xml, "-o", meta], check=True,
                       capture_output=True)
        with open(meta, "rb") as f, open(a, "r+b") as out:
            out.seek(PV0_OFF + PE_START * 512 + 16 * EXT_B)
            out.write(f.read())
    return sc


@pytest.fixture
def sc(tmp_path) -> Scenario:
    return build(tmp_path)


# -- layouts and checksum ------------------------------------------------------------------

def test_crc_equals_bitwise_transcription_of_lvm2():
    rnd = random.Random(5)
    for n in (0, 1, 3, 4, 15, 16, 17, 492, 1000):
        data = rnd.randbytes(n)
        assert fmt.lvm_crc(data) == lvmgen.crc_ref(data)
        assert fmt.lvm_crc(data[n // 2:], fmt.lvm_crc(data[:n // 2])) == lvmgen.crc_ref(data)


def test_layout_sizes_match_lvm2_structs():
    # label_header 32 bytes (label.h), pv_header 32+8 then disk_locn 16, raw_locn 24, the
    # mda_header fixed part 4+16+4+8+8 (layout.h)
    assert (fmt.LABEL_HEADER_SIZE, fmt.PV_HEADER_SIZE, fmt.DISK_LOCN_SIZE, fmt.RAW_LOCN_SIZE,
            fmt.MDA_HEADER_FIXED_SIZE) == (32, 40, 16, 24, 40)


def test_hand_built_label_parses():
    raw = lvmgen.label_sector(b"A" * 32, 123456, [(1 << 20, 0)], [(4096, 1 << 20)])
    lh = fmt.LabelHeader.parse(raw[:32])
    assert (lh.id, lh.sector, lh.offset, lh.type) == (b"LABELONE", 1, 32, b"LVM2 001")
    assert lh.crc == fmt.lvm_crc(raw[20:])
    pvh = fmt.PvHeader.parse(raw[32:72])
    assert pvh.uuid == b"A" * 32 and pvh.device_size == 123456
    assert fmt.DiskLocn.parse(raw[72:88]).offset == 1 << 20


# -- discovery, areas, text ----------------------------------------------------------------

def test_scan_finds_gpt_partition_and_bare_pv(sc):
    res = scan(sc.disks)
    assert res.problems == []
    got = {(lab.region.name, lab.uuid, lab.region.offset) for lab in res.labels}
    assert got == {(f"{sc.disk_a}:p1", PV0_ID, PV0_OFF), (sc.disk_b, PV1_ID, 0)}
    for lab in res.labels:
        assert lab.data_areas == [(PE_START * 512, 0)]
        assert [(m.offset, m.size) for m in lab.mdas] == [(4096, 64 * 1024)]
        assert lab.mdas[0].text.rstrip(b"\0").decode() == scenario_text()


def test_mbr_partition_is_scanned(tmp_path):
    path = str(tmp_path / "mbr.img")
    lvmgen.blank(path, 8 * MiB)
    with open(path, "r+b") as f:
        mbr = bytearray(512)
        import struct
        struct.pack_into("<B3sB3sII", mbr, 446 + 16, 0, b"\0\0\0", 0x8E, b"\0\0\0", 4096, 8192)
        mbr[510:512] = b"\x55\xaa"
        f.write(mbr)
        lvmgen.write_pv(f, 4096 * 512, PV1_ID, 4 * MiB, MiB, "x { }")
    res = scan([path])
    assert [(lab.region.name, lab.region.offset) for lab in res.labels] == [
        (f"{path}:p2", 4096 * 512)]


def test_text_wrapping_around_the_circular_buffer(tmp_path):
    size = 16 * 1024
    text = scenario_text()
    off = size - 1000  # 1000 bytes before the end: the rest continues at byte 512
    assert len(text) > 1000
    sc = build(tmp_path, text_off=off, mda_size=size)
    res = scan(sc.disks)
    assert res.problems == []
    for lab in res.labels:
        assert lab.mdas[0].wraps
        assert lab.mdas[0].text.rstrip(b"\0").decode() == text


def test_highest_seqno_wins_and_the_older_area_is_reported(tmp_path):
    sc = build(tmp_path)
    with open(sc.disk_b, "r+b") as f:  # disk B keeps an older generation
        lvmgen.write_pv(f, PV1_OFF, PV1_ID, PV1_SIZE, PE_START * 512, scenario_text(seqno=6))
    vgs, _, problems = load_vgs(sc.disks)
    assert problems == []
    (lvg,) = vgs
    assert lvg.vg.seqno == 7
    assert any("seqno 6, the newest is 7" in p for p in lvg.problems)


@pytest.mark.parametrize("where,what", [(PV0_OFF + 512 + 40, "label"),
                                        (PV0_OFF + 4096 + 60, "mda_header checksum"),
                                        (PV0_OFF + 4096 + 600, "metadata text checksum")])
def test_damage_is_reported_and_the_other_pv_still_reads(tmp_path, where, what):
    sc = build(tmp_path)
    with open(sc.disk_a, "r+b") as f:
        f.seek(where)
        b = f.read(1)
        f.seek(where)
        f.write(bytes([b[0] ^ 0x40]))
    vgs, _, problems = load_vgs(sc.disks)
    assert any(what in p for p in problems), problems
    (lvg,) = vgs
    assert lvg.vg.name == "vg0"


def test_model_of_the_scenario(sc):
    (lvg,), _, _ = load_vgs(sc.disks)
    vg = lvg.vg
    assert (vg.name, vg.id, vg.seqno, vg.extent_size) == ("vg0", VG_ID, 7, EXT)
    assert [pv.id for pv in vg.pvs] == [PV0_ID, PV1_ID]
    pool = vg.lv("pool").segments[0]
    assert isinstance(pool, ThinPoolSegment)
    assert (pool.metadata, pool.pool, pool.transaction_id, pool.chunk_size, pool.discards,
            pool.zero_new_blocks) == ("pool_tmeta", "pool_tdata", 2, 128, "passdown", 1)
    snap = vg.lv("snap").segments[0]
    assert isinstance(snap, ThinSegment) and (snap.origin, snap.device_id) == ("thin1", 2)
    s = vg.lv("str").segments[0]
    assert isinstance(s, StripedSegment) and s.stripes == [("pv0", 8), ("pv1", 4)]
    assert not vg.lv("pool_tmeta").visible and vg.lv("lin").visible


def test_unknown_segment_type_is_kept(sc):
    text = scenario_text().replace('type = "thin-pool"', 'type = "cache-pool"')
    vg = vg_from_tree(lvmtext.parse(text))
    seg = vg.lv("pool").segments[0]
    assert seg.type == "cache-pool" and seg.extra["metadata"] == "pool_tmeta"
    again = vg_from_tree(lvmtext.parse(lvmtext.format_section(vg.to_tree())))
    assert again == vg


def test_format_then_parse_gives_the_same_model():
    vg = vg_from_tree(lvmtext.parse(scenario_text()))
    assert vg_from_tree(lvmtext.parse(lvmtext.format_section(vg.to_tree()))) == vg


def test_pending_messages_round_trip():
    text = scenario_text().replace('zero_new_blocks = 1',
                                   'zero_new_blocks = 1\nmessage1 {\ncreate = "thin2"\n}\n'
                                   'message2 {\ndelete = 7\n}')
    vg = vg_from_tree(lvmtext.parse(text))
    seg = vg.lv("pool").segments[0]
    assert [(m.name, m.create, m.delete) for m in seg.messages] == [
        ("message1", "thin2", None), ("message2", None, 7)]
    assert vg_from_tree(lvmtext.parse(lvmtext.format_section(vg.to_tree()))) == vg


_keys = st.text(st.sampled_from("abcxyz_09.-+"), min_size=1, max_size=6)
_strings = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                   max_size=12)
_scalars = st.one_of(st.integers(-2**63, 2**64), _strings)
_trees = st.recursive(
    st.dictionaries(_keys, st.one_of(_scalars, st.lists(_scalars, max_size=4)), max_size=4),
    lambda child: st.dictionaries(_keys, st.one_of(_scalars, child), max_size=4),
    max_leaves=20)


def _section(d):
    return lvmtext.Section((k, _section(v) if isinstance(v, dict) else v) for k, v in d.items())


@settings(max_examples=300, deadline=None)
@given(_trees)
def test_text_round_trip_property(tree):
    sec = _section(tree)
    assert lvmtext.parse(lvmtext.format_section(sec)) == sec


@pytest.mark.parametrize("text,what", [
    ("vg { a = 1 ", "unbalanced braces"), ("vg { a = 1 } }", "unbalanced braces"),
    ('vg { a = "abc }', "unterminated string"), ("vg { a = [1, 2 }", "expected a value"),
    ("vg { = 1 }", "expected a key"), ("vg { a 1 }", "expected '='")])
def test_text_errors_name_the_line(text, what):
    with pytest.raises(lvmtext.TextError, match=what) as e:
        lvmtext.parse(text)
    assert "line 1" in str(e.value)


def test_lvm2_parser_details():
    t = lvmtext.parse('a = "x\\"y\\\\z\\n" # c\nb = [1 2, "q"]\nc = \'s\\\'\n"d e" { f = -3 }')
    assert t["a"] == 'x"y\\z\\n' and t["b"] == [1, 2, "q"] and t["c"] == "s\\"
    assert t["d e"] == {"f": -3}


# -- views ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lin", "str", "pool_tmeta", "pool_tdata", "lvol0_pmspare"])
def test_view_bytes_follow_the_extents(sc, name):
    (lvg,), _, _ = load_vgs(sc.disks)
    with LvView(lvg, lvg.vg.lv(name)) as view:
        want = expected_lv(sc, name)
        assert view.size == len(want)
        assert view.read() == want
        view.seek(EXT_B - 100)
        assert view.read(300) == want[EXT_B - 100:EXT_B + 200]


def test_missing_pv_gives_a_partial_vg(sc):
    (lvg,), _, _ = load_vgs([sc.disk_a])
    assert [pv.id for pv in lvg.missing] == [PV1_ID]
    assert any(PV1_ID in p for p in lvg.problems)
    with pytest.raises(MissingPvError, match=PV1_ID):
        LvView(lvg, lvg.vg.lv("lin"))
    with LvView(lvg, lvg.vg.lv("pool_tmeta")) as v:
        assert v.read() == expected_lv(sc, "pool_tmeta")


def test_extents_past_the_end_of_a_pv_are_refused(tmp_path):
    text = scenario_text().replace('"pv1", 8', f'"pv1", {PV1_PE - 4}')
    sc = build(tmp_path, text=text)
    (lvg,), _, _ = load_vgs(sc.disks)
    with pytest.raises(MetadataError, match="past the end of pv1"):
        LvView(lvg, lvg.vg.lv("pool_tdata"))


# -- thin ----------------------------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("thin_restore"), reason="needs thin_restore")
@pytest.mark.parametrize("lv,dev", [("thin1", 1), ("snap", 2)])
def test_thin_export_reads_through_tmeta_and_tdata(sc, lv, dev):
    (lvg,), _, _ = load_vgs(sc.disks)
    pool_lv = lvg.vg.lv("pool")
    tdata = expected_lv(sc, "pool_tdata")
    want = bytearray(32 * EXT_B)
    bs = 128 * 512
    for v, d in THIN_MAP[dev].items():
        want[v * bs:(v + 1) * bs] = tdata[d * bs:(d + 1) * bs]
    class Sink:
        def __init__(self):
            self.h = hashlib.sha256()

        def write(self, b):
            self.h.update(b)

        def flush(self):
            pass

    h = Sink()
    with open_lv_pool(lvg, pool_lv) as pool, data_view(lvg, pool_lv) as data:
        assert pool.superblock.trans_id == 2
        export_thin(pool, data, dev, h, size=32 * EXT_B)
    assert h.h.hexdigest() == hashlib.sha256(want).hexdigest()


def test_tmeta_window_is_used_when_contiguous(sc):
    from dmimage.lvm.thin import metadata_source
    (lvg,), _, _ = load_vgs(sc.disks)
    with metadata_source(lvg, lvg.vg.lv("pool")) as src:
        assert src.path == sc.disk_a
        assert src.window == (PV0_OFF + PE_START * 512 + 16 * EXT_B, 64 * EXT_B)
    assert os.path.exists(sc.disk_a)


# -- fuzzing -------------------------------------------------------------------------------

_TEXT_ALPHABET = st.sampled_from(list('{}[]=,"\'#\\\n \t-+.0123456789abcxyz_') +
                                 ["segment1", "type", "stripes", "striped", "thin-pool"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_TEXT_ALPHABET, max_size=80).map("".join))
def test_text_parser_fuzz(text):
    try:
        tree = lvmtext.parse(text)
    except lvmtext.TextError:
        return
    assert lvmtext.parse(lvmtext.format_section(tree)) == tree
    try:
        vg_from_tree(tree)
    except MetadataError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(scenario_text()) - 1), st.text(max_size=8))
def test_model_fuzz_on_mutated_scenario_text(at, insert):
    original = scenario_text()
    text = original[:at] + insert + original[at + len(insert):]
    try:
        vg = vg_from_tree(lvmtext.parse(text))
    except MetadataError:
        return
    from dmimage.lvm.check import model_problems
    problems = model_problems(vg)
    # every problem names the VG it is in; the unmutated scenario has none
    assert all(p.startswith(vg.name) for p in problems), problems
    if text == original:
        assert problems == []


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[bytes, bytes]:
    sc = build(tmp_path_factory.mktemp("pristine"))
    return open(sc.disk_a, "rb").read(), open(sc.disk_b, "rb").read()


@pytest.fixture(scope="module")
def fuzz_disks(tmp_path_factory, pristine) -> list[str]:
    """The two pristine disks written once; each example rewrites only the window it damages
    (150 examples used to write 2 x 36 MB each: gigabytes of temp files per run)."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "a.img").write_bytes(pristine[0])
    (d / "b.img").write_bytes(pristine[1])
    return [str(d / "a.img"), str(d / "b.img")]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans())
def test_label_and_area_reader_fuzz(pristine, fuzz_disks, flips, fix_crcs):
    """Damaged labels, PV headers and area headers (optionally re-sealed so the damage gets
    past the checksums) give problems or a smaller VG, never an unexpected exception."""
    import struct as _struct

    from dmimage.errors import DmimageError
    from dmimage.lvm.check import check_lvm

    window = slice(PV0_OFF, PV0_OFF + 8192)  # every flip and re-sealed checksum lies in it
    a = bytearray(pristine[0][window])
    base = PV0_OFF
    for off, val in flips:
        a[off] = val
    if fix_crcs:
        lab = 512
        _struct.pack_into("<I", a, lab + 16, lvmgen.crc_ref(bytes(a[lab + 20:lab + 512])))
        mh = 4096
        _struct.pack_into("<I", a, mh, lvmgen.crc_ref(bytes(a[mh + 4:mh + 512])))
    with open(fuzz_disks[0], "r+b") as f:
        f.seek(base)
        f.write(a)
    paths = fuzz_disks
    try:
        vgs, _, _ = load_vgs(paths)
        check_lvm(paths)
        for lvg in vgs:
            for lv in lvg.vg.lvs:
                try:
                    with LvView(lvg, lv) as v:
                        v.pread(4096, 0)
                except DmimageError:
                    pass
    except DmimageError:
        pass


# -- the typed model round trip, generated ------------------------------------------------

_names = st.text(st.sampled_from("abcdefgh_0123456789+.-"), min_size=1, max_size=8).filter(
    lambda s: s[0] not in "0123456789+-.")
_txt = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=10)
_u64 = st.integers(0, 2**63)


@st.composite
def _segment(draw, i: int):
    from dmimage.lvm.model import Message, UnknownSegment

    name, start, count = f"segment{i}", draw(_u64), draw(_u64)
    kind = draw(st.sampled_from(["striped", "thin-pool", "thin", "other"]))
    if kind == "striped":
        stripes = draw(st.lists(st.tuples(_names, _u64), min_size=1, max_size=3))
        return StripedSegment(name, start, count, "striped", lvmtext.Section(),
                              draw(st.none() | _u64) if len(stripes) > 1 else None, stripes)
    if kind == "thin-pool":
        msgs = [Message(f"message{j + 1}", *draw(st.sampled_from([(c, None) for c in "ab"]
                                                                 + [(None, 5)])))
                for j in range(draw(st.integers(0, 2)))]
        return ThinPoolSegment(name, start, count, "thin-pool", lvmtext.Section(),
                               draw(_txt), draw(_txt), draw(_u64), draw(_u64),
                               draw(st.none() | st.sampled_from(["passdown", "nopassdown"])),
                               draw(st.none() | st.integers(0, 1)), msgs)
    if kind == "thin":
        return ThinSegment(name, start, count, "thin", lvmtext.Section(), draw(_txt),
                           draw(_u64), draw(_u64), draw(st.none() | _txt),
                           draw(st.none() | _txt), draw(st.none() | _txt))
    extra = lvmtext.Section(draw(st.dictionaries(
        _names.filter(lambda k: k not in ("start_extent", "extent_count", "type")),
        _txt | _u64, max_size=3)))
    return UnknownSegment(name, start, count, draw(_names), extra)


@st.composite
def _vgs(draw):
    from dmimage.lvm.model import LogicalVolume, PhysicalVolume, VolumeGroup

    pvs = [PhysicalVolume(f"pv{i}", draw(_txt), draw(st.none() | _txt), ["ALLOCATABLE"],
                          draw(st.none() | _u64), draw(_u64), draw(_u64))
           for i in range(draw(st.integers(1, 3)))]
    lvs = []
    for name in draw(st.lists(_names, unique=True, max_size=4)):
        segs = [draw(_segment(j + 1)) for j in range(draw(st.integers(1, 3)))]
        lvs.append(LogicalVolume(name, draw(_txt), draw(st.lists(_names, max_size=3)), segs,
                                 draw(st.lists(_names, max_size=2))))
    return VolumeGroup(draw(_names), draw(_txt), draw(_u64), draw(st.integers(1, 2**40)),
                       ["READ", "WRITE"], pvs, lvs, [], "lvm2",
                       lvmtext.Section(max_lv=0),
                       lvmtext.Section(contents="Text Format Volume Group", version=1))


@settings(max_examples=200, deadline=None)
@given(_vgs())
def test_model_round_trip_property(vg):
    text = lvmtext.format_section(vg.to_tree())
    assert vg_from_tree(lvmtext.parse(text)) == vg


# -- precommitted slot ---------------------------------------------------------------------

@pytest.mark.parametrize("damaged", [False, True], ids=["readable", "bad-crc"])
def test_precommitted_slot_is_reported_not_used(tmp_path, damaged):
    """raw_locn slot 1 (vg_precommit without vg_commit) is read and reported by check as a
    note; the committed slot 0 stays in force, as lvm2's readers use it."""
    from dmimage.lvm.check import check_lvm

    sc = build(tmp_path)
    newer = scenario_text(seqno=8).encode() + b"\0"
    area_off, area_size, slot0_off = PV0_OFF + 4096, 64 * 1024, 512
    old_len = len(scenario_text().encode()) + 1
    pre_off = -(-(slot0_off + old_len) // 512) * 512
    crc = lvmgen.crc_ref(newer) ^ (1 if damaged else 0)
    with open(sc.disk_a, "r+b") as f:
        f.seek(area_off + pre_off)
        f.write(newer)
        f.seek(area_off)
        committed = (slot0_off, old_len, lvmgen.crc_ref(scenario_text().encode() + b"\0"), 0)
        f.write(lvmgen.mda_header(4096, area_size, [committed, (pre_off, len(newer), crc, 0)]))
    (lvg,), _, problems = load_vgs([sc.disk_a, sc.disk_b])
    assert lvg.vg.seqno == 7 and not problems
    rep = check_lvm([sc.disk_a, sc.disk_b])
    notes = [n for n in rep.notes if "precommitted" in n]
    assert len(notes) == 1, rep.notes
    if damaged:
        assert "unreadable: metadata text checksum" in notes[0]
    else:
        assert "precommitted metadata seqno 8 (raw_locn 1) was never committed" in notes[0]
    assert "committed seqno 7" in notes[0]
    assert not any("precommitted" in p for p in rep.problems)


def test_generation_write_order(tmp_path, monkeypatch):
    """A new VG generation: every area's text, a flush of every PV, then the headers, then a
    flush (dmimage/ordered_write.py); no header write before the first flush."""
    from dmimage import ordered_write
    from dmimage.lvm.fix import set_transaction_id

    sc = build(tmp_path, text=scenario_text(tid=1))
    (lvg,), _, _ = load_vgs(sc.disks)
    log: list[tuple[str, int]] = []
    real_pwritev, real_fsync = os.pwritev, os.fsync

    def pwritev(fd, bufs, off):
        log.append(("write", off))
        return real_pwritev(fd, bufs, off)

    def fsync(fd):
        log.append(("fsync", fd))
        return real_fsync(fd)

    monkeypatch.setattr(ordered_write.os, "pwritev", pwritev)
    monkeypatch.setattr(ordered_write.os, "fsync", fsync)
    pool = lvg.vg.lv("pool")
    assert pool is not None
    set_transaction_id(lvg, pool, side="vg", to=None, dry_run=False)
    headers = {PV0_OFF + 4096, PV1_OFF + 4096}
    kinds = ["H" if k == "write" and v in headers else "T" if k == "write" else "F"
             for k, v in log]
    assert "".join(kinds) == "TTFFHHFF", kinds
