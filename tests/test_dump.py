"""dmimage dump against thin_dump 1.1 (byte-identical XML and human_readable), thin_dump 0.9
(semantically equal), thin_restore 0.9/1.1 (our expanded XML restores), JSON and XML round
trips through the parsers, CLI behaviour (-o atomic, -m, --dev-id, --skip-mappings) and
damaged metadata (exit 1, one line on stderr)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmimage.cli.main import main
from dmimage.format.checksum import block_checksum
from dmimage.format.constants import SALT_SUPERBLOCK
from dmimage.thin.dump import (
    DumpFormatError,
    DumpVisitor,
    expand_shared,
    gather_runs,
    human_bytes,
    json_bytes,
    parse_dump,
    parse_json,
    parse_xml,
    walk,
    write_dump,
    xml_bytes,
)
from dmimage.thin.ir import DeviceIR, PoolIR, Runs, SuperblockIR

import damage
import oracles
import poolgen
import semantic

HYP = settings(max_examples=12, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])


# ------------------------------------------------------------------------------- helpers

def ours(path, *args: str) -> bytes:
    """`dmimage dump` in-process, stdout as bytes."""
    buf = io.BytesIO()

    class Out:
        buffer = buf

    import sys
    saved = sys.stdout
    sys.stdout = Out  # type: ignore[assignment]
    try:
        rc = main(["dump", str(path), *args])
    finally:
        sys.stdout = saved
    assert rc == 0
    return buf.getvalue()


def thin_dump(path, tools, *args) -> bytes:
    p = oracles.run(tools, "thin_dump", *args, path, check=True)
    return p.stdout.encode()


def shared_xml(seed: int, n_devices: int = 4, max_def: int = 700) -> str:
    """A pool whose devices reference shared <def>s (so thin_restore shares leaves), mixed
    with their own mappings before, between and after the shared regions."""
    rng = np.random.default_rng(seed)
    n_defs = int(rng.integers(1, 5))
    nr_data = 200_000
    free = iter(rng.permutation(nr_data // 2).tolist())
    contiguous_next = nr_data // 2
    lines = []
    regions = []
    origin = int(rng.integers(0, 50))
    for _ in range(n_defs):
        n = int(rng.integers(1, max_def))
        gap = int(rng.integers(0, 400))
        start = origin + gap
        if rng.random() < 0.3:  # contiguous data: from the top half, never reused
            data = list(range(contiguous_next, contiguous_next + n))
            contiguous_next += n
        else:
            data = [next(free) for _ in range(n)]
        times = rng.integers(0, 3, n).tolist() if rng.random() < 0.5 else [0] * n
        regions.append((start, n, data, times))
        origin = start + n
    used = {d for r in regions for d in r[2]}
    free = iter([b for b in rng.permutation(nr_data).tolist() if b not in used])
    lines.append('<superblock uuid="" time="5" transaction="9" flags="0" version="2" '
                 f'data_block_size="128" nr_data_blocks="{nr_data}">')
    for i, (start, n, data, times) in enumerate(regions):
        lines.append(f'  <def name="d{i}">')
        for j in range(n):
            lines.append(f'    <single_mapping origin_block="{start + j}" data_block="{data[j]}" '
                         f'time="{times[j]}"/>')
        lines.append("  </def>")
    for dev in range(n_devices):
        body = []
        count = 0
        prev_end = 0
        for i, (start, n, _data, _times) in enumerate(regions):
            k = int(rng.integers(0, max(1, min(60, start - prev_end))))  # own, before the def
            if k:
                for o in sorted(rng.choice(np.arange(prev_end, start), k, replace=False).tolist()):
                    body.append(f'    <single_mapping origin_block="{o}" data_block="{next(free)}" time="1"/>')
                    count += 1
            if dev == 0 or rng.random() < 0.7:  # every def is used
                body.append(f'    <ref name="d{i}"/>')
                count += n
            prev_end = start + n
        k = int(rng.integers(0, 300))
        for j in range(k):
            body.append(f'    <single_mapping origin_block="{prev_end + 3 + j}" data_block="{next(free)}" time="2"/>')
        count += k
        lines.append(f'  <device dev_id="{dev * 3 + 1}" mapped_blocks="{count}" transaction="{dev}" '
                     f'creation_time="{dev % 3}" snap_time="{dev % 4}">')
        lines.extend(body)
        lines.append("  </device>")
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


def add_held_snapshot(path: Path, loc: int | None = None) -> int:
    """Make the superblock copy a kernel metadata snapshot would make (space-map roots zeroed)
    in a free block at the end of the file, and point held_root at it. Space-map counts are
    not adjusted (thin_dump does not look at them)."""
    b = bytearray(path.read_bytes())
    if loc is None:
        loc = len(b) // 4096 - 1
    sb = bytearray(b[:4096])
    struct.pack_into("<Q", sb, 8, loc)
    sb[64:192] = bytes(128)
    struct.pack_into("<I", sb, 0, block_checksum(sb, SALT_SUPERBLOCK))
    b[loc * 4096:(loc + 1) * 4096] = sb
    struct.pack_into("<Q", b, 56, loc)
    struct.pack_into("<I", b, 0, block_checksum(bytes(b[:4096]), SALT_SUPERBLOCK))
    path.write_bytes(bytes(b))
    return loc


def assert_all_formats(path: Path, tools11, *args: str) -> bytes:
    """XML and human_readable byte-identical to 1.1; JSON and XML parse back to the same."""
    want = thin_dump(path, tools11, *args)
    got = ours(path, *args)
    assert got == want, _first_diff(got, want)
    want_h = thin_dump(path, tools11, "-f", "human_readable", *args)
    assert ours(path, "-f", "human_readable", *args) == want_h
    ir = parse_xml(want)
    assert xml_bytes(ir) == want
    assert xml_bytes(parse_json(json_bytes(ir))) == want
    assert human_bytes(ir) == want_h
    return got


def _first_diff(a: bytes, b: bytes) -> str:
    la, lb = a.split(b"\n"), b.split(b"\n")
    for i, (x, y) in enumerate(zip(la, lb, strict=False)):
        if x != y:
            return f"line {i + 1}: ours {x!r} vs 1.1 {y!r}"
    return f"lengths differ: {len(la)} vs {len(lb)} lines"


# ------------------------------------------------------------------------------- the rule

def test_gather_runs_rule():
    """thin_dump 1.1's atomic leaf runs (cases from its own unit test, results recomputed)."""
    def g(seqs):
        return sorted((seq, sh) for seq, sh in gather_runs(seqs).values())

    assert g([]) == []
    assert g([[1, 2, 3]]) == [([1, 2, 3], False)]
    assert g([[1, 2], [1, 2, 3]]) == [([1, 2], True), ([3], False)]
    assert g([[2, 3], [1, 2, 3]]) == [([1], False), ([2, 3], True)]
    assert g([[1, 2, 3, 4], [2, 3, 4, 5]]) == [([1], False), ([2, 3, 4], True), ([5], False)]
    assert g([[1, 2, 3, 4], [2, 3, 4, 5, 6], [3, 4], [5, 6]]) == [
        ([1], False), ([2], True), ([3, 4], True), ([5, 6], True)]
    assert g([[2, 3, 4, 5], [2, 3, 4, 6], [1, 3, 4, 5]]) == [
        ([1], False), ([2], True), ([3, 4], True), ([5], True), ([6], False)]
    assert g([[1, 2], [2, 1]]) == [([1], True), ([2], True)]


# --------------------------------------------------------------------- one walk, three emitters

class EventLog(DumpVisitor):
    """The walk's events as plain tuples; consecutive runs are joined into one list of
    (origin, data, length, time) rows, since no format marks where one run list ends and the
    next begins."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def superblock_begin(self, sb) -> None:
        self.events.append(("superblock", sb.uuid, sb.time, sb.transaction, sb.flags,
                            sb.version, sb.data_block_size, sb.nr_data_blocks,
                            sb.metadata_snap))

    def def_begin(self, name) -> None:
        self.events.append(("def", name))

    def def_end(self, name) -> None:
        self.events.append(("/def",))

    def device_begin(self, dev) -> None:
        self.events.append(("device", dev.dev_id, dev.mapped_blocks, dev.transaction,
                            dev.creation_time, dev.snap_time))

    def runs(self, runs) -> None:
        self.add_rows(zip(*(a.tolist() for a in (runs.origin_begin, runs.data_begin,
                                                   runs.length, runs.time)), strict=True))

    def add_rows(self, rows) -> None:
        rows = [tuple(int(x) for x in r) for r in rows]
        if self.events and self.events[-1][0] == "runs":
            self.events[-1][1].extend(rows)
        else:
            self.events.append(("runs", rows))

    def ref(self, name) -> None:
        self.events.append(("ref", name))

    def device_end(self, dev) -> None:
        self.events.append(("/device",))

    def superblock_end(self) -> None:
        self.events.append(("/superblock",))


def events_of_ir(ir) -> list[tuple]:
    log = EventLog()
    walk(ir, log)
    return log.events


def events_of_json(text: bytes) -> list[tuple]:
    """Read with the standard json module, not dmimage's parser."""
    import json

    doc = json.loads(text)
    sb = doc["superblock"]
    log = EventLog()
    log.events.append(("superblock", *(sb[k] for k in (
        "uuid", "time", "transaction", "flags", "version", "data_block_size",
        "nr_data_blocks", "metadata_snap"))))
    for d in doc["defs"]:
        log.def_begin(d["name"])
        if d["runs"]:
            log.add_rows(d["runs"])
        log.def_end(d["name"])
    for dv in doc["devices"]:
        log.events.append(("device", *(dv[k] for k in (
            "dev_id", "mapped_blocks", "transaction", "creation_time", "snap_time"))))
        for m in dv["mappings"]:
            if isinstance(m, dict):
                log.ref(m["ref"])
            else:
                log.add_rows([m])
        log.device_end(None)
    log.superblock_end()
    return log.events


def events_of_human(text: bytes) -> list[tuple]:
    """A parser of thin_dump's human_readable form written for this test."""
    import re

    lines = text.decode().split("\n")
    assert lines.pop() == "", "human_readable ends with a newline"
    log = EventLog()
    m = re.fullmatch(r'begin superblock: "(.*)", (\d+), (\d+), (\d+), (\d+), (\d+), (\d+)'
                     r"(?:, (\d+))?", lines[0])
    assert m, lines[0]
    log.events.append(("superblock", m[1], *map(int, m.groups()[1:7]),
                       None if m[8] is None else int(m[8])))
    assert lines[-1] == "end superblock"
    inside = None
    i = 1
    while i < len(lines) - 1:
        line = lines[i]
        if line.startswith("def: "):
            inside = "/def"
            log.def_begin(line[5:])
        elif line.startswith("device: "):
            inside = "/device"
            fields = [int(x.split(": ")[1]) for x in lines[i:i + 5]]
            assert [x.split(": ")[0] for x in lines[i:i + 5]] == [
                "device", "mapped_blocks", "transaction", "creation time", "snap time"]
            log.events.append(("device", *fields))
            i += 4
        elif line.startswith("    ref: "):
            log.ref(line[9:])
        elif line == "":
            assert inside is not None
            log.events.append((inside,))
            inside = None
        else:
            r = re.fullmatch(r"    \((\d+)\.\.(\d+)\) -> \((\d+)\.\.(\d+)\), (\d+)", line)
            assert r, line
            o, oe, d, de, t = map(int, r.groups())
            assert oe - o == de - d >= 0
            log.add_rows([(o, d, oe - o + 1, t)])
        i += 1
    log.superblock_end()
    return log.events


def _edge_ir():
    """What the generated pools lack: an empty def, devices without items, with only a ref,
    ending in a ref, ranges and singles in one list, a uuid to escape, a metadata_snap."""
    r = Runs.from_blocks(np.array([5, 6, 7, 9]), np.array([20, 21, 22, 3]), np.zeros(4))
    return PoolIR(SuperblockIR('a&b<"c">', 3, 4, 1, 2, 128, 1000, 17),
                  [DeviceIR(0, 0, 0, 0, 0), DeviceIR(1, 1, 0, 0, 0, ["a"]),
                   DeviceIR(2, 6, 1, 2, 3, [r, "a", "empty"]),
                   DeviceIR(7, 5, 1, 2, 3, ["a", Runs.empty(), r])],
                  {"a": Runs.from_blocks(np.array([1]), np.array([2]), np.array([1])),
                   "empty": Runs.empty()})


@pytest.mark.parametrize("case", ["edge", *range(6)])
def test_three_emitters_write_one_event_stream(case):
    """Each format, read back by a reader independent of its emitter, yields exactly the event
    stream the walk produced: every def, device, ref and run, in the same order, in all three."""
    ir = _edge_ir() if case == "edge" else parse_xml(
        shared_xml(case, n_devices=1 + case % 4, max_def=3 + 150 * case).encode())
    want = events_of_ir(ir)
    assert ("ref", "a" if case == "edge" else "d0") in want
    assert events_of_ir(parse_xml(xml_bytes(ir))) == want
    assert events_of_json(json_bytes(ir)) == want
    assert events_of_human(human_bytes(ir)) == want
    for fmt, whole in (("xml", xml_bytes), ("human_readable", human_bytes), ("json", json_bytes)):
        out = io.BytesIO()  # write_dump's joined writes give the same bytes as the document
        write_dump(ir, out, fmt)
        assert out.getvalue() == whole(ir)


# ------------------------------------------------------------------------------- fixtures

@pytest.mark.parametrize("fixture", ["empty_pool_meta", "thins3_meta", "multilevel_meta",
                                     "snapshot_meta", "overflow_meta"])
def test_fixture_pools_identical(fixture, request, tools11, tools09):
    rp = request.getfixturevalue(fixture)
    got = assert_all_formats(rp.path, tools11)
    # 0.9 agrees on content, and so does the description the pool was made from.
    semantic.assert_same_pool(semantic.parse_xml(got), semantic.parse_xml(
        thin_dump(rp.path, tools09)), ignore=("flags", "version"))
    semantic.assert_same_pool(semantic.parse_xml(got), rp.pool, ignore=("version",))


@given(pool=poolgen.pools(max_devices=5, max_mappings=400, allow_big=True))
@HYP
def test_generated_pools_identical(pool, restored_pool, tools11, tools09):
    for tools in ("1.1", "0.9"):
        rp = restored_pool(pool, tools)
        got = assert_all_formats(rp.path, tools11)
        semantic.assert_same_pool(semantic.parse_xml(got), pool, ignore=("version", "flags"))
    semantic.assert_same_pool(semantic.parse_xml(got),
                              semantic.parse_xml(thin_dump(rp.path, tools09)),
                              ignore=("flags", "version"))
    ids = [d.dev_id for d in pool.devices]
    if ids:
        pick = ids[:: 2] + [123456789]
        sel = [a for i in pick for a in ("--dev-id", str(i))]
        assert_all_formats(rp.path, tools11, *sel)
    assert_all_formats(rp.path, tools11, "--skip-mappings")


@given(seed=st.integers(0, 2**32 - 1), n_devices=st.integers(1, 5),
       max_def=st.sampled_from([3, 100, 700, 2000]))
@HYP
def test_shared_leaves_identical(seed, n_devices, max_def, tmp_path_factory, tools11, tools09):
    d = tmp_path_factory.mktemp("shared")
    xml = shared_xml(seed, n_devices, max_def)
    meta = oracles.restore(xml, d / "s.meta", tools11, 2048)
    assert oracles.check(meta, tools11)[0] == 0, "the generator made a bad pool"
    first = assert_all_formats(meta, tools11)
    # Dumping twice: restore 1.1's own def/ref dump, dump again.
    (d / "s1.xml").write_bytes(first)
    meta2 = oracles.restore_file(d / "s1.xml", d / "s2.meta", tools11, 2048)
    assert_all_formats(meta2, tools11)
    devs = [dv.dev_id for dv in parse_xml(first).devices]
    assert_all_formats(meta, tools11, "--dev-id", str(devs[-1]), "--dev-id", str(devs[0]))
    # Expanded form: no defs, same content as 0.9's dump, accepted by both restores.
    expanded = ours(meta, "--expand-shared")
    assert b"<def" not in expanded and b"<ref" not in expanded
    sem = semantic.parse_xml(expanded)
    semantic.assert_same_pool(sem, semantic.parse_xml(first))
    semantic.assert_same_pool(sem, semantic.parse_xml(thin_dump(meta, tools09)),
                              ignore=("flags",))
    for tools in (tools09, tools11):
        out = oracles.restore(expanded.decode(), d / f"e{tools.series}.meta", tools, 2048)
        assert oracles.check(out, tools)[0] == 0
        semantic.assert_same_pool(semantic.parse_xml(thin_dump(out, tools11)), sem,
                                  ignore=("version",))


def test_metadata_snap(tmp_path, snapshot_meta, tools11):
    meta = snapshot_meta.copy_to(tmp_path / "m.meta")
    loc = add_held_snapshot(meta)
    got = assert_all_formats(meta, tools11, "-m")
    assert b'nr_data_blocks="0"' in got.split(b"\n")[0]
    assert ours(meta, f"--metadata-snap={loc}") == got
    assert ours(meta, "-m", str(loc)) == got
    assert ours(meta) == thin_dump(meta, tools11)


def test_expand_shared_of_plain_pool_equals_default(thins3_meta):
    assert ours(thins3_meta.path, "--expand-shared") == ours(thins3_meta.path)


# ------------------------------------------------------------------------------- parsers

def test_parse_0_9_form_and_dump_sniffing(snapshot_meta, tools09, tools11):
    x09 = thin_dump(snapshot_meta.path, tools09)
    ir = parse_xml(x09)
    assert ir.superblock.flags == 0 and not ir.defs
    want = thin_dump(snapshot_meta.path, tools11)
    assert xml_bytes(ir) == want
    assert xml_bytes(parse_dump(json_bytes(ir))) == want
    assert xml_bytes(parse_dump(io.BytesIO(x09))) == want


def test_expand_shared_merges_across_refs():
    xml = (b'<superblock uuid="" time="0" transaction="0" data_block_size="128" '
           b'nr_data_blocks="100">\n<def name="a">\n'
           b'<range_mapping origin_begin="2" data_begin="12" length="3" time="0"/>\n</def>\n'
           b'<device dev_id="1" mapped_blocks="6" transaction="0" creation_time="0" snap_time="0">\n'
           b'<range_mapping origin_begin="0" data_begin="10" length="2" time="0"/>\n<ref name="a"/>\n'
           b'<single_mapping origin_block="5" data_block="15" time="0"/>\n</device>\n</superblock>')
    ir = parse_xml(xml)
    assert [type(i).__name__ for i in ir.devices[0].items] == ["Runs", "str", "Runs"]
    out = xml_bytes(ir, expand=True)
    assert b'<range_mapping origin_begin="0" data_begin="10" length="6" time="0"/>' in out
    assert not expand_shared(ir).defs


@pytest.mark.parametrize("text,needle", [
    (b"<superblock", "line 1"),
    (b'<superblock uuid="" time="0" transaction="0" data_block_size="128">\n</superblock>',
     "nr_data_blocks"),
    (b'<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="1">\n'
     b'<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">\n'
     b'<ref name="nope"/>\n</device>\n</superblock>', "line 3"),
    (b'<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="1">\n'
     b'<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">\n'
     b'<single_mapping origin_block="x" data_block="1" time="0"/>\n</device>\n</superblock>',
     "line 3"),
    (b'<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="1">\n'
     b'<single_mapping origin_block="0" data_block="1" time="0"/>\n</superblock>', "line 2"),
    (b'{"format": "dmimage-thin-dump", "version": 2}', "version"),
    (b'{"format": "dmimage-thin-dump", "version": 1, "superblock": {"time": 0, '
     b'"transaction": 0, "data_block_size": 128, "nr_data_blocks": 1}, "devices": '
     b'[{"dev_id": 1, "mapped_blocks": 1, "transaction": 0, "creation_time": 0, '
     b'"snap_time": 0, "mappings": [[0, 1, 0, 0]]}]}', "length 0"),
    (b"hello", "neither"),
])
def test_parse_errors(text, needle):
    with pytest.raises(DumpFormatError) as ei:
        parse_dump(text)
    assert needle in str(ei.value)
    assert "\n" not in str(ei.value)


# ------------------------------------------------------------------------------- CLI

def test_output_file_atomic(tmp_path, thins3_meta, capsys):
    out = tmp_path / "out.xml"
    assert main(["dump", str(thins3_meta.path), "-o", str(out)]) == 0
    assert out.read_bytes() == ours(thins3_meta.path)
    # A failing dump leaves the previous file alone and no temporary behind.
    bad = tmp_path / "zero.meta"
    bad.write_bytes(bytes(4096 * 4))
    assert main(["dump", str(bad), "-o", str(out)]) == 1
    assert out.read_bytes() == ours(thins3_meta.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.xml", "zero.meta"]
    assert main(["dump", str(thins3_meta.path), "-f", "json", "-o", str(tmp_path / "o.json")]) == 0
    assert xml_bytes(parse_json(tmp_path / "o.json")) == out.read_bytes()
    capsys.readouterr()


def test_usage_errors(tmp_path, capsys):
    assert main(["dump", str(tmp_path / "missing.meta")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.meta" in err
    with pytest.raises(SystemExit):
        main(["dump", "x", "-f", "yaml"])


def _damaged(meta: bytes) -> list:
    return [
        damage.flip_byte(meta, "btree_leaf", role="bottom"),
        damage.flip_byte(meta, "btree_leaf", role="details", fix_csum=True),
        damage.flip_byte(meta, "btree_leaf", role="top", fix_csum=True),
        damage.wrong_blocknr(meta, "btree_internal", role="bottom"),
        damage.flip_byte(meta, "superblock"),
        damage.cycle(meta, "bottom"),
        damage.out_of_range_pointer(meta, "bottom"),
        damage.truncate(meta, 8),
    ]


def test_damaged_metadata_exit_1(tmp_path, multilevel_meta, capsys):
    meta = multilevel_meta.read()
    cases = _damaged(bytes(meta))
    for i, dm in enumerate(cases):
        data = dm.data
        p = tmp_path / f"d{i}.meta"
        p.write_bytes(bytes(data))
        rc = main(["dump", str(p), "-o", str(tmp_path / f"d{i}.xml")])
        err = capsys.readouterr().err
        assert rc == 1, (dm, err)
        assert err.count("\n") == 1 and err.startswith("dmimage dump: "), err
        assert "block" in err, err
        assert not (tmp_path / f"d{i}.xml").exists()


def _alias_device(meta: Path, src: int, dst: int) -> None:
    """Point device dst's top-level entry at device src's bottom tree (a whole shared tree,
    as a fresh snapshot has) and copy src's mapped_blocks; checksums fixed."""
    b = bytearray(meta.read_bytes())
    sb = b[:4096]
    map_root, det_root = struct.unpack_from("<QQ", sb, 320)

    def leaf_index(root: int, key: int) -> tuple[int, int, int]:
        off = root * 4096
        flags, _, nr, mx, vs = struct.unpack_from("<IQIII", b, off + 4)
        assert flags == 2, "test expects a single-leaf tree"
        keys = struct.unpack_from(f"<{nr}Q", b, off + 32)
        return off, off + 32 + 8 * mx, keys.index(key)

    off, vals, i = leaf_index(map_root, src)
    _, _, j = leaf_index(map_root, dst)
    struct.pack_into("<Q", b, vals + 8 * j, struct.unpack_from("<Q", b, vals + 8 * i)[0])
    damage.fix_checksum(b, map_root, damage.SALT_BTREE)
    off, vals, i = leaf_index(det_root, src)
    _, _, j = leaf_index(det_root, dst)
    struct.pack_into("<Q", b, vals + 24 * j, struct.unpack_from("<Q", b, vals + 24 * i)[0])
    damage.fix_checksum(b, det_root, damage.SALT_BTREE)
    meta.write_bytes(bytes(b))


@pytest.mark.parametrize("n_mappings", [50, 5000])
def test_whole_shared_bottom_tree(n_mappings, restored_pool, tools11):
    big = poolgen.multilevel_pool(n_mappings, dev_id=1)
    pool = poolgen.Pool(time=4, transaction=7, nr_data_blocks=big.nr_data_blocks + 10,
                        devices=[big.devices[0],
                                 poolgen.Device(2, [(0, big.nr_data_blocks + 1, 0)]),
                                 poolgen.Device(3, [(7, big.nr_data_blocks + 2, 1)])])
    rp = restored_pool(pool)
    _alias_device(rp.path, 1, 3)
    got = assert_all_formats(rp.path, tools11)
    assert got.count(b"<def ") == 1 and got.count(b"<ref ") == 2
    assert_all_formats(rp.path, tools11, "--dev-id", "3")
    assert b"<def" not in ours(rp.path, "--dev-id", "3")
