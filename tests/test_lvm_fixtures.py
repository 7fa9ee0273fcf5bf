"""PV heads written by the real lvm2 2.03.16 in the guest (vmtests/test_lvm_guest.py,
DMIMAGE_SAVE_LVM_FIXTURES): the first MiB of a GPT-partition PV and of a bare-disk PV of one VG.

The checksums in these bytes were computed by lvm2 itself, so they test our layouts and CRC
against an independent writer; the struct offsets read here come from lvm2's headers.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest

from dmimage.format import lvm as fmt
from dmimage.lvm.model import ThinPoolSegment, ThinSegment, vg_from_tree
from dmimage.lvm.ondisk import scan
from dmimage.lvm.text import format_section, parse
from dmimage.lvm.vg import load_vgs

import lvmgen

FIX = Path(__file__).parent / "fixtures" / "lvm"
FILES = sorted(FIX.glob("lvm2-*.bin.gz"))


@pytest.fixture
def pvs(tmp_path) -> list[str]:
    out = []
    for f in FILES:
        p = tmp_path / f.name.removesuffix(".gz")
        p.write_bytes(gzip.decompress(f.read_bytes()))
        out.append(str(p))
    return out


def test_fixtures_present():
    assert len(FILES) == 4  # deb12 and deb13 guests, each a GPT-partition PV and a bare one


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_lvm2_checksums_equal_ours(path):
    raw = gzip.decompress(path.read_bytes())
    label = raw[512:1024]
    assert label[:8] == b"LABELONE" and label[24:32] == b"LVM2 001"
    stored = struct.unpack_from("<I", label, 16)[0]
    assert stored == fmt.lvm_crc(label[20:]) == lvmgen.crc_ref(label[20:])
    mda_off = struct.unpack_from("<Q", label, 72 + 32)[0]  # after one data area + terminator
    hdr = raw[mda_off:mda_off + 512]
    assert hdr[4:20] == fmt.MDA_MAGIC
    assert struct.unpack_from("<I", hdr)[0] == fmt.lvm_crc(hdr[4:])
    off, size, csum, _ = struct.unpack_from("<QQII", hdr, 40)
    text = raw[mda_off + off:mda_off + off + size]
    assert text.endswith(b"\0") and csum == fmt.lvm_crc(text) == lvmgen.crc_ref(text)


@pytest.fixture(params=["deb12", "deb13"])
def vg_pvs(request, pvs) -> list[str]:
    return [p for p in pvs if f"-{request.param}-" in p]


def test_scan_and_model(vg_pvs):
    pvs = vg_pvs
    res = scan(pvs)
    assert res.problems == []
    assert len(res.labels) == 2
    (lvg,), _, problems = load_vgs(pvs)
    assert problems == [] and lvg.problems == []
    vg = lvg.vg
    assert vg.name == "vgt" and vg.extent_size == 2048
    assert sorted(pv.id for pv in vg.pvs) == sorted(lab.uuid for lab in res.labels)
    pool = vg.lv("pool").segments[0]
    assert isinstance(pool, ThinPoolSegment) and pool.metadata == "pool_tmeta"
    assert len(vg.lv("pool_tdata").segments) == 2  # lvextend onto the second PV
    snap2 = vg.lv("snap2").segments[0]
    assert isinstance(snap2, ThinSegment) and snap2.origin == "snap1"
    assert vg.lv("thin2") is None and vg.lv("base") is not None


def test_lvm2_text_round_trips(vg_pvs):
    (lvg,), _, _ = load_vgs(vg_pvs)
    tree = parse(lvg.text)
    assert parse(format_section(tree)) == tree
    vg = vg_from_tree(tree)
    assert vg_from_tree(parse(format_section(vg.to_tree()))) == vg
