"""dmimage restore against thin_restore 1.1: both thin_checks pass on our output, thin_dump 1.1
of our output equals that of thin_restore 1.1's output, and the block layout is the same.

"Same layout" compares blocks after blanking what thin_restore leaves uninitialised (node slots
past nr_entries, the tail after the values, and hence the checksum): thin_restore 1.1 fills
those with leftovers of its input buffer, so whole-file ``cmp`` only matches when no node has
free slots (e.g. the empty pool).
"""

from __future__ import annotations

import filecmp
import os
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from dmimage.cli.main import main
from dmimage.errors import DeviceError, InputError, OutputTooSmallError
from dmimage.format.checksum import sniff_block_type
from dmimage.thin.dump import parse_xml as read_xml
from dmimage.thin.ir import DeviceIR, PoolIR, Runs, SuperblockIR
from dmimage.thin.restore import build_metadata, restore

import oracles
import poolgen

# ----------------------------------------------------------------------------- helpers


def canonical_blocks(path: Path) -> np.ndarray:
    a = np.fromfile(path, dtype=np.uint8).reshape(-1, 4096).copy()
    for blk in a:
        if not blk.any():
            continue
        kind = sniff_block_type(blk.tobytes())
        if kind == "btree node":
            _, _, _, nr, mx, vs, _ = struct.unpack_from("<IIQIIII", blk.tobytes())
            blk[32 + 8 * nr:32 + 8 * mx] = 0
            blk[32 + 8 * mx + vs * nr:] = 0
        if kind is not None:
            blk[0:4] = 0
    return a


def layout_diff(a: Path, b: Path) -> list[int]:
    x, y = canonical_blocks(a), canonical_blocks(b)
    assert x.shape == y.shape
    return [i for i in range(len(x)) if not np.array_equal(x[i], y[i])]


def restore_both(xml: str, tmp_path: Path, tools11, nr_meta_blocks: int = 1024,
                 extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    src = tmp_path / "in.xml"
    src.write_text(xml)
    ref = oracles.make_sparse(tmp_path / "ref.meta", nr_meta_blocks)
    oracles.run(tools11, "thin_restore", "-q", "-i", src, "-o", ref, *extra, check=True)
    ours = oracles.make_sparse(tmp_path / "ours.meta", nr_meta_blocks)
    assert main(["restore", "-q", "-i", str(src), "-o", str(ours), *extra]) == 0
    return ref, ours


def assert_like_thin_restore(xml: str, tmp_path: Path, tools09, tools11,
                             nr_meta_blocks: int = 1024, extra: tuple[str, ...] = (),
                             same_layout: bool = True) -> None:
    ref, ours = restore_both(xml, tmp_path, tools11, nr_meta_blocks, extra)
    for tools in (tools11, tools09):
        rc, out, err = oracles.check(ours, tools)
        assert rc == 0, f"thin_check {tools.series}: {err[-2000:]}"
    assert oracles.dump(ours, tools11) == oracles.dump(ref, tools11)
    if same_layout:
        assert layout_diff(ref, ours) == []


def defs_xml(seed: int) -> str:
    """Random <def>/<ref> pools: shared leaves referenced from several devices, own mappings
    before, between and after the refs (exercises splicing, unpacking and unshifting)."""
    rng = random.Random(seed)
    nd = rng.randint(1, 4)
    sizes = [rng.choice([1, 5, 50, 125, 126, 130, 252, 253, 300, 504, 505, 600, 1000])
             for _ in range(nd)]
    nxt = 0

    def data(n: int) -> int:
        nonlocal nxt
        s = nxt
        nxt += n + rng.randint(0, 3)
        return s

    lines, defs = [], []
    for k, sz in enumerate(sizes):
        base = (k + 1) * 100000
        d0 = data(sz)
        lines.append(f'  <def name="{k}">')
        lines.append(f'    <range_mapping origin_begin="{base}" data_begin="{d0}" length="{sz}" '
                     'time="0"/>' if sz > 1 else
                     f'    <single_mapping origin_block="{base}" data_block="{d0}" time="0"/>')
        lines.append("  </def>")
        defs.append((base, sz))
    for dev in range(rng.randint(1, 6)):
        body, count, cursor = [], 0, 0
        chosen = sorted(rng.sample(range(nd), rng.randint(0, nd)))
        for k in [*chosen, None]:
            end = (k + 1) * 100000 if k is not None else 10**6
            own = rng.choice([0, 0, 1, 3, 60, 130, 300, 700])
            if own:
                o = rng.randint(cursor, end - own - 1) if end - own - 1 > cursor else cursor
                body += [f'    <single_mapping origin_block="{o + j}" data_block="{data(1)}" '
                         f'time="{rng.randint(0, 2)}"/>' for j in range(own)]
                count += own
            if k is not None:
                body.append(f'    <ref name="{k}"/>')
                count += defs[k][1]
                cursor = defs[k][0] + defs[k][1]
        lines.append(f'  <device dev_id="{dev}" mapped_blocks="{count}" transaction="0" '
                     'creation_time="0" snap_time="2">')
        lines += body
        lines.append("  </device>")
    head = (f'<superblock uuid="" time="2" transaction="5" data_block_size="128" '
            f'nr_data_blocks="{nxt + 10}">')
    return "\n".join([head, *lines, "</superblock>"]) + "\n"


# ----------------------------------------------------------------------------- fixed pools


@pytest.mark.parametrize("name,pool,nr_meta", [
    ("empty", poolgen.empty_pool(), 1024),
    ("thins", poolgen.thins_pool(), 1024),
    ("multilevel", poolgen.multilevel_pool(5000), 1024),
    ("three_levels", poolgen.multilevel_pool(70000), 4096),
    ("snapshots", poolgen.snapshot_pool(), 1024),
    ("overflow", poolgen.overflow_pool(), 1024),
    ("many_thins", poolgen.random_pool(5, n_devices=400, max_mappings=3), 2048),
    ("fragmented", poolgen.fragmented_pool(3, 20000), 40000),
    ("huge_block_size", poolgen.random_pool(9, data_block_size=2_097_152), 1024),
])
def test_fixed_pools(name, pool, nr_meta, tmp_path, tools09, tools11):
    assert_like_thin_restore(poolgen.to_xml(pool, "1.1"), tmp_path, tools09, tools11, nr_meta)


def test_empty_pool_is_byte_identical(tmp_path, tools11):
    ref, ours = restore_both(poolgen.to_xml(poolgen.empty_pool()), tmp_path, tools11)
    assert filecmp.cmp(ref, ours, shallow=False)


@pytest.mark.parametrize("seed", range(12))
def test_shared_defs(seed, tmp_path, tools09, tools11):
    assert_like_thin_restore(defs_xml(seed), tmp_path, tools09, tools11, 2048)


def test_data_counts_per_distinct_leaf(tmp_path, tools11):
    """A <def> referenced by three devices: its data blocks count once, its leaf three times
    (metadata overflow tree), and a leaf nobody splices in releases its data blocks."""
    run = '<range_mapping origin_begin="0" data_begin="0" length="100" time="0"/>'
    devs = "".join(f'<device dev_id="{i}" mapped_blocks="100" transaction="0" creation_time="0"'
                   f' snap_time="0"><ref name="a"/></device>\n' for i in range(3))
    xml = ('<superblock uuid="" time="0" transaction="1" data_block_size="128" '
           f'nr_data_blocks="200">\n<def name="a">{run}</def>\n{devs}</superblock>\n')
    ref, ours = restore_both(xml, tmp_path, tools11)
    assert layout_diff(ref, ours) == []
    built = build_metadata(read_xml(tmp_path / "in.xml"), 1024)
    assert int(built.image.counts.max()) == 3


@pytest.mark.parametrize("extra", [("--transaction-id", "77"), ("--data-block-size", "256"),
                                   ("--nr-data-blocks", "100000")])
def test_overrides(extra, tmp_path, tools09, tools11):
    # thin_restore 1.1 sizes the data space map from the XML and only patches nr_blocks in the
    # superblock (one bitmap for 100000 blocks); we build the bitmaps the override needs.
    assert_like_thin_restore(poolgen.to_xml(poolgen.thins_pool()), tmp_path, tools09, tools11,
                             extra=extra, same_layout=extra[0] != "--nr-data-blocks")


def test_metadata_clamped_to_maximum(tmp_path):
    out = tmp_path / "big.meta"
    with open(out, "wb") as f:
        f.truncate(17 << 30)  # above the 4,161,600-block limit: sparse, nothing beyond is used
    restore(read_xml_text(poolgen.to_xml(poolgen.thins_pool()), tmp_path), out)
    assert os.path.getsize(out) == 17 << 30
    with open(out, "rb") as f:
        sb = f.read(4096)
    assert struct.unpack_from("<Q", sb, 344)[0] == 4_161_600


def read_xml_text(xml: str, tmp_path: Path) -> PoolIR:
    p = tmp_path / "x.xml"
    p.write_text(xml)
    return read_xml(p)


# ----------------------------------------------------------------------------- generated pools


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pool=poolgen.pools(max_devices=5, max_mappings=400))
def test_generated_pools(pool, tmp_path, tools09, tools11):
    assert_like_thin_restore(poolgen.to_xml(pool, "1.1"), tmp_path, tools09, tools11, 2048)


# ----------------------------------------------------------------------------- XML reading


def test_xml_general_path_equals_fast_path(tmp_path):
    pool = poolgen.snapshot_pool(200)
    xml = poolgen.to_xml(pool)
    fast = read_xml_text(xml, tmp_path)
    # a prologue, a comment and reordered attributes: same meaning, not thin_dump's layout
    odd = '<?xml version="1.0"?>\n<!-- c -->\n' + "\n".join(
        _reorder(line) for line in xml.splitlines()) + "\n"
    slow = read_xml_text(odd, tmp_path)
    assert _flat(fast) == _flat(slow)


def _reorder(line: str) -> str:
    s = line.strip()
    if s.startswith("<single_mapping"):
        attrs = dict(a.split("=") for a in s[len("<single_mapping "):-2].split())
        return "<single_mapping " + " ".join(f"{k}={v}" for k, v in reversed(attrs.items())) + "/>"
    return line


def _flat(ir: PoolIR) -> list:
    out = [(ir.superblock.time, ir.superblock.transaction, ir.superblock.nr_data_blocks)]
    for d in ir.devices:
        o, dd, t = d.runs(ir.defs).expand()
        out.append((d.dev_id, d.mapped_blocks, o.tolist(), dd.tolist(), t.tolist()))
    return out


def test_json_input_restores_like_xml(tmp_path):
    dump = pytest.importorskip("dmimage.thin.dump")
    xml = defs_xml(3)
    ir = read_xml_text(xml, tmp_path)
    (tmp_path / "in.json").write_bytes(dump.json_bytes(ir))
    a = oracles.make_sparse(tmp_path / "a.meta", 2048)
    b = oracles.make_sparse(tmp_path / "b.meta", 2048)
    assert main(["restore", "-q", "-i", str(tmp_path / "x.xml"), "-o", str(a)]) == 0
    assert main(["restore", "-q", "-i", str(tmp_path / "in.json"), "-o", str(b)]) == 0
    assert layout_diff(a, b) == []


# ----------------------------------------------------------------------------- bad input


SB = '<superblock uuid="" time="1" transaction="1" data_block_size="128" nr_data_blocks="10">'
DEV = '<device dev_id="{id}" mapped_blocks="{n}" transaction="0" creation_time="0" snap_time="0">'


@pytest.mark.parametrize("xml,message", [
    (SB + "\n" + DEV.format(id=1, n=1) + "\n<single_mapping origin_block=\"0\" ",
     "malformed|unclosed"),
    (SB + DEV.format(id=1, n=0) + "</device>" + DEV.format(id=1, n=0) + "</device></superblock>",
     "appears twice"),
    (SB + DEV.format(id=1, n=1) + '<single_mapping origin_block="0" data_block="10" time="0"/>'
     "</device></superblock>", "beyond nr_data_blocks"),
    (SB + DEV.format(id=1, n=1) + '<single_mapping origin_block="0" data_block="1" '
     'time="16777216"/></device></superblock>', "24 bits"),
    (SB + DEV.format(id=1, n=2) + '<single_mapping origin_block="0" data_block="1" time="0"/>'
     "</device></superblock>", "mapped_blocks"),
    (SB + DEV.format(id=1, n=2) + '<single_mapping origin_block="5" data_block="1" time="0"/>'
     '<single_mapping origin_block="4" data_block="2" time="0"/></device></superblock>',
     "ascending"),
    (SB.replace('"128"', '"192"') + "</superblock>", "data block size"),
    (SB.replace('"128"', '"4194304"') + "</superblock>", "data block size"),
    (SB + DEV.format(id=1, n=0) + '<ref name="x"/></device></superblock>', "no earlier <def>"),
    (SB, "ends before </superblock>"),
    ("<superblock/>", "lacks the uuid attribute"),
])
def test_bad_input_is_refused_before_writing(xml, message, tmp_path, capsys):
    src = tmp_path / "bad.xml"
    src.write_text(xml)
    out = tmp_path / "out.meta"
    out.write_bytes(b"\xa5" * (1024 * 4096))
    assert main(["restore", "-i", str(src), "-o", str(out)]) in (1, 2)
    assert re.search(message, capsys.readouterr().err)
    assert out.read_bytes() == b"\xa5" * (1024 * 4096)


def test_too_small_output_is_untouched_and_says_how_much(tmp_path, tools11):
    pool = poolgen.multilevel_pool(70000)
    ir = read_xml_text(poolgen.to_xml(pool), tmp_path)
    tiny = tmp_path / "tiny.meta"
    tiny.write_bytes(b"\x5a" * (16 * 4096))
    with pytest.raises(OutputTooSmallError) as exc:
        restore(ir, tiny)
    need = exc.value.needed_bytes // 4096
    assert str(need * 4096) in str(exc.value)
    assert tiny.read_bytes() == b"\x5a" * (16 * 4096)
    small = tmp_path / "small.meta"
    small.write_bytes(b"\x5a" * ((need - 1) * 4096))
    with pytest.raises(OutputTooSmallError):
        restore(ir, small)
    assert small.read_bytes() == b"\x5a" * ((need - 1) * 4096)
    restore(ir, oracles.make_sparse(tmp_path / "ours.meta", need))
    # thin_restore 1.1 agrees on the minimum
    ok = oracles.make_sparse(tmp_path / "ok.meta", need)
    assert oracles.run(tools11, "thin_restore", "-q", "-i", tmp_path / "x.xml",
                       "-o", ok).returncode == 0
    bad = oracles.make_sparse(tmp_path / "bad.meta", need - 1)
    assert oracles.run(tools11, "thin_restore", "-q", "-i", tmp_path / "x.xml",
                       "-o", bad).returncode != 0


def test_read_only_output(tmp_path, monkeypatch):
    ir = read_xml_text(poolgen.to_xml(poolgen.thins_pool()), tmp_path)
    out = tmp_path / "ro.meta"
    out.write_bytes(bytes(1024 * 4096))
    if os.geteuid() != 0:
        out.chmod(0o444)
    else:  # root may write anything: simulate the refusal a read-only device gives
        real_open = os.open

        def ro_open(path, flags, *a, **k):
            if os.fspath(path) == os.fspath(out) and flags & (os.O_RDWR | os.O_WRONLY):
                raise PermissionError(13, "Permission denied")
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(DeviceError, match="cannot open for writing"):
        restore(ir, out)
    assert out.read_bytes() == bytes(1024 * 4096)


def test_missing_output(tmp_path):
    ir = PoolIR(SuperblockIR("", 0, 0, 0, 2, 128, 10))
    with pytest.raises(DeviceError, match="no such file"):
        restore(ir, tmp_path / "nope")


def test_ir_api_validation():
    ir = PoolIR(SuperblockIR("", 0, 0, 0, 2, 128, 10), devices=[
        DeviceIR(1, 1, 0, 0, 0, [Runs(np.array([0], np.uint64), np.array([3], np.uint64),
                                      np.array([1], np.uint64), np.array([0], np.uint32))])])
    built = build_metadata(ir, 64)
    assert built.blocks_needed <= 64
    ir.devices[0].mapped_blocks = 5
    with pytest.raises(InputError, match="mapped_blocks"):
        build_metadata(ir, 64)


def test_absurd_nr_data_blocks_fails_fast(tmp_path, capsys):
    """A data space map larger than any metadata device could hold is refused before anything
    is laid out (no minutes of work, no gigabytes of memory)."""
    import time

    src = tmp_path / "huge.xml"
    src.write_text('<superblock uuid="" time="0" transaction="0" data_block_size="128" '
                   'nr_data_blocks="1099511627775">\n</superblock>\n')
    out = oracles.make_sparse(tmp_path / "out.meta", 1024)
    t0 = time.monotonic()
    assert main(["restore", "-i", str(src), "-o", str(out)]) == 1
    assert time.monotonic() - t0 < 10
    assert "more than the 4161600" in capsys.readouterr().err
    assert out.read_bytes() == bytes(1024 * 4096)


@pytest.fixture(scope="module")
def whole_ir_restores(tmp_path_factory):
    """source -> (its XML, the metadata restore() writes from the parsed IR): the reference
    of test_streamed_restore_equals_whole_ir_path, made once per source for both piece
    sizes (parsed with the default piece, so the small-piece stream is held to it too)."""
    made = {}

    def get(source: str) -> tuple[str, Path]:
        if source not in made:
            d = tmp_path_factory.mktemp(f"whole-{source}")
            xml = {"defs": lambda: defs_xml(5),
                   "multilevel": lambda: poolgen.to_xml(poolgen.multilevel_pool(70000), "1.1"),
                   "snapshots": lambda: poolgen.to_xml(poolgen.snapshot_pool(), "1.1")}[source]()
            whole = oracles.make_sparse(d / "whole.meta", 4096)
            restore(read_xml_text(xml, d), whole)
            made[source] = (xml, whole)
        return made[source]

    return get


@pytest.mark.parametrize("piece", [1 << 20, 300])
@pytest.mark.parametrize("source", ["defs", "multilevel", "snapshots"])
def test_streamed_restore_equals_whole_ir_path(source, piece, tmp_path, monkeypatch,
                                               whole_ir_restores):
    """`dmimage restore` of XML in thin_dump's layout is laid out device by device while a
    thread parses (thin/restore_stream.py; small pieces: the helper thread scans every other
    one, and ends of bodies and refs fall inside its pieces): the whole-IR path must not be
    taken, and the metadata must be byte for byte what restore() of the parsed IR writes."""
    from dmimage.thin import restore_stream
    from dmimage.thin.dump import fastxml

    xml, whole = whole_ir_restores(source)
    (tmp_path / "x.xml").write_text(xml)
    monkeypatch.setattr(fastxml, "PIECE", piece)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the whole-IR path was taken")

    monkeypatch.setattr(restore_stream, "read_input", no_fallback)
    streamed = oracles.make_sparse(tmp_path / "streamed.meta", 4096)
    seen = []
    restore_stream.restore_file(tmp_path / "x.xml", streamed, progress=seen.append)
    assert filecmp.cmp(whole, streamed, shallow=False)
    assert sum(seen) == len(xml)


def test_streamed_write_error_is_final(tmp_path, monkeypatch):
    """Once the streamed path starts writing, its errors are the restore's: the whole-IR path
    must not parse and write again."""
    from dmimage.pdata.writer import MetadataImage
    from dmimage.thin import restore_stream

    src = tmp_path / "x.xml"
    src.write_text(poolgen.to_xml(poolgen.thins_pool(), "1.1"))

    def failing_flush(self, fd, superblock, progress=None):
        raise DeviceError("write failed (test)")

    def no_fallback(*args, **kwargs):
        raise AssertionError("the whole-IR path was taken")

    monkeypatch.setattr(MetadataImage, "flush_to", failing_flush)
    monkeypatch.setattr(restore_stream, "read_input", no_fallback)
    with pytest.raises(DeviceError, match="write failed"):
        restore_stream.restore_file(src, oracles.make_sparse(tmp_path / "out.meta", 1024))


def test_streamed_parse_stops_when_the_layout_gives_up(tmp_path, monkeypatch):
    """A bad first device before a large one: the parser thread stops within a piece of the
    layout giving up instead of reading the rest (the whole-IR path then reports it)."""
    from dmimage.thin import restore_stream
    from dmimage.thin.dump import fastxml

    monkeypatch.setattr(fastxml, "PIECE", 4096)
    sizes = (100, 100_000)

    def dump(first_mapped: int) -> str:
        lines = ['<superblock uuid="" time="0" transaction="1" version="2" '
                 f'data_block_size="128" nr_data_blocks="{sum(sizes)}">']
        for d, n in enumerate(sizes):
            lines.append(f'  <device dev_id="{d}" mapped_blocks="{first_mapped if d == 0 else n}"'
                         ' transaction="0" creation_time="0" snap_time="0">')
            lines += [f'    <single_mapping origin_block="{i}" data_block="{d * sizes[0] + i}" '
                      'time="0"/>' for i in range(n)]
            lines.append("  </device>")
        return "\n".join(lines) + "\n</superblock>"

    pieces = []
    real = fastxml._Stream._body

    def counted(self, body_end):
        pieces.append(1)
        return real(self, body_end)

    monkeypatch.setattr(fastxml._Stream, "_body", counted)
    out = oracles.make_sparse(tmp_path / "out.meta", 8192)
    src = tmp_path / "in.xml"
    src.write_text(dump(sizes[0]))
    assert restore_stream._restore_streamed(src, out, {}, None) is not None
    whole = len(pieces)
    pieces.clear()
    src.write_text(dump(sizes[0] + 1))
    assert restore_stream._restore_streamed(src, out, {}, None) is None
    assert len(pieces) < whole // 10, (len(pieces), whole)
    with pytest.raises(InputError, match="mapped_blocks"):
        restore_stream.restore_file(src, out)
