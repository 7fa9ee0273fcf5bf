"""`dmimage build`: specs, the built pool judged by dmimage check, thin_check 1.1, pyparted,
debugfs/e2fsck and the content it was built from; bad specs; interrupted builds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmimage.cli.main import main
from dmimage.image import build, load_spec, read_gpt
from dmimage.image.gpt import extract
from dmimage.thin.check import check_metadata
from dmimage.thin.export import export_thin
from dmimage.thin.pool import open_pool

import oracles

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "images" / "example.toml"
BS = 64 << 10
MiB = 1 << 20


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("example") / "out"
    rep = build(load_spec(EXAMPLE), out)
    return out, rep.manifest


def _parts(out: Path, m: dict) -> tuple[Path, Path]:
    """The metadata and data partitions extracted to files."""
    meta, data = out.parent / "meta.part", out.parent / "data.part"
    img = out / m["image"]["file"]
    for role, dst in (("metadata", meta), ("data", data)):
        p = next(p for p in m["partitions"] if p["role"] == role)
        if not dst.exists():
            extract(str(img), p["start"], p["size"], str(dst))
    return meta, data


# --------------------------------------------------------------------------------------------
# the example image


def test_example_outputs(example):
    out, m = example
    names = sorted(os.listdir(out))
    assert names == sorted(["example.img", "manifest.json", "activate.sh", "deactivate.sh",
                            "example-pool.table", "example-base.table", "example-layer1.table",
                            "example-layer2.table", "example-container.table"])
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["dm_mod_create"] is None and "thin-pool" in m["dm_mod_create_note"]
    assert (out / "example-pool.table").read_text().startswith(
        f"0 {m['pool']['nr_data_blocks'] * 128} thin-pool /dev/disk/by-partuuid/"
        f"{m['partitions'][0]['partuuid']} /dev/disk/by-partuuid/"
        f"{m['partitions'][1]['partuuid']} 128 0 1 skip_block_zeroing ")
    for f in ("activate.sh", "deactivate.sh"):
        assert os.access(out / f, os.X_OK)
        subprocess.run(["sh", "-n", str(out / f)], check=True)
    img = out / "example.img"
    assert os.stat(img).st_blocks * 512 < 4 * MiB  # sparse: ~1 MiB of 69 MiB allocated


def test_example_partition_table_pyparted(example):
    parted = pytest.importorskip("parted")
    out, m = example
    disk = parted.newDisk(parted.getDevice(str(out / "example.img")))
    assert disk.type == "gpt"
    got = [(p.number, p.name, p.geometry.start * 512, p.geometry.length * 512)
           for p in disk.partitions]
    assert got == [(p["number"], p["name"], p["start"], p["size"]) for p in m["partitions"]]
    assert all(p["start"] % MiB == 0 for p in m["partitions"])
    guid, parts = read_gpt(str(out / "example.img"))  # CRCs verified
    assert guid == m["image"]["disk_guid"]
    assert [p.partuuid for p in parts] == [p["partuuid"] for p in m["partitions"]]


def test_example_metadata_checks(example, tools11):
    out, m = example
    meta, _ = _parts(out, m)
    report = check_metadata(meta)
    assert report.ok(False), report.problems
    rc, so, se = oracles.check(meta, tools11)
    assert rc == 0, (so, se)
    assert main(["check", "-q", str(meta)]) == 0


def test_example_exports_equal_content(example, tmp_path):
    """Each thin exported offline: hash = manifest; e2fsck clean; the files debugfs reads
    out of it are the merged source tree (layers overlaid, whiteouts applied)."""
    out, m = example
    meta, data = _parts(out, m)
    src = EXAMPLE.parent
    with open_pool(meta) as pool:
        assert pool.superblock.trans_id == 4
        for d in m["devices"]:
            dst = tmp_path / f"{d['name']}.img"
            export_thin(pool, data, d["id"], str(dst), size=d["size"])
            assert _sha(dst) == d["sha256"]
            subprocess.run(["e2fsck", "-fn", str(dst)], check=True, capture_output=True)
            tree = tmp_path / f"{d['name']}.tree"
            tree.mkdir()
            subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(dst)], check=True,
                           capture_output=True)
            got = {str(p.relative_to(tree)): p.read_bytes() for p in tree.rglob("*")
                   if p.is_file()}
            # the intended tree, overlaid independently here
            layers = {"base": ["base"], "layer1": ["base", "layer1"],
                      "layer2": ["base", "layer1", "layer2"],
                      "container": ["base", "layer1", "layer2"]}[d["name"]]
            want: dict[str, bytes] = {}
            for layer in layers:
                root = src / "example" / layer
                for p in root.rglob("*"):
                    rel = str(p.relative_to(root))
                    if p.name.startswith(".wh."):
                        want.pop(str(p.parent.relative_to(root) / p.name[4:]), None)
                    elif p.is_file():
                        want[rel] = p.read_bytes()
            assert got == want, d["name"]
            listed = {f["path"].lstrip("/"): f["sha256"] for f in d["content"]["files"]}
            assert listed == {k: hashlib.sha256(v).hexdigest() for k, v in want.items()}


def test_example_layers_share_blocks(example):
    out, m = example
    meta, _ = _parts(out, m)
    devs = {d["name"]: d for d in m["devices"]}
    used = m["pool"]["data_blocks_used"]
    assert used == sum(d["blocks_written"] for d in m["devices"])
    assert used < sum(d["mapped_blocks"] for d in m["devices"])
    # a layer writes only what differs: fewer blocks than it maps
    assert 0 < devs["layer1"]["blocks_written"] < devs["layer1"]["mapped_blocks"]
    assert devs["container"]["blocks_written"] == 0
    with open_pool(meta) as pool:
        counts = pool.data_space_map().counts
        assert int(np.count_nonzero(counts)) == used
        shared = int(np.count_nonzero(counts > 1))
        assert shared > 0
        m3, m4 = pool.mappings(3), pool.mappings(4)
        assert (m3.data == m4.data).all()  # the container shares every block of layer 2


def test_reproducible(example, tmp_path):
    out, m = example
    rep = build(load_spec(EXAMPLE), tmp_path / "again")
    assert rep.manifest == m
    assert _sha(tmp_path / "again" / "example.img") == m["image"]["sha256"] == \
        _sha(out / "example.img")


def test_cli_summary(tmp_path, capsys):
    assert main(["build", str(EXAMPLE), "-o", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "built example" in text and "example-layer2: id 3" in text


# --------------------------------------------------------------------------------------------
# files layout, raw content, zero blocks, discards


def _write(path: Path, blocks: dict[int, int], nblocks: int) -> bytes:
    """A raw image of nblocks 64 KiB blocks; blocks[i] = fill byte (absent: zeros)."""
    buf = bytearray(nblocks * BS)
    for i, b in blocks.items():
        buf[i * BS:(i + 1) * BS] = bytes([b]) * BS
    path.write_bytes(bytes(buf))
    return bytes(buf)


def test_files_layout_raw_layers(tmp_path, tools11):
    base = _write(tmp_path / "base.img", {0: 1, 1: 2, 5: 3, 6: 4}, 16)
    layer = _write(tmp_path / "layer.img", {0: 1, 1: 9, 5: 3, 7: 5}, 16)  # 1 changed,
    # 6 became zero (a discard), 7 new
    spec = tmp_path / "s.toml"
    spec.write_text('''
name = "t"
layout = "files"
[pool]
data_size = "2MiB"
transaction_id = 7
features = ["skip_block_zeroing", "no_discard_passdown"]
low_water_mark = 3
[[volumes]]
name = "a"
id = 10
size = "1MiB"
content = "base.img"
[[volumes]]
name = "b"
id = 11
origin = "a"
content = { type = "raw", file = "layer.img" }
[[volumes]]
name = "empty"
id = 12
size = "3MiB"
''')
    out = tmp_path / "out"
    m = build(load_spec(spec), out).manifest
    assert sorted(os.listdir(out)) == sorted(["t.meta", "t.data", "manifest.json",
                                              "activate.sh", "deactivate.sh", "t-pool.table",
                                              "t-a.table", "t-b.table", "t-empty.table"])
    assert (out / "t-pool.table").read_text() == (
        "0 4096 thin-pool METADATA_DEV DATA_DEV 128 3 2 skip_block_zeroing "
        "no_discard_passdown \n")
    assert (out / "t-b.table").read_text() == "0 2048 thin /dev/mapper/t-pool 11\n"
    d = {x["name"]: x for x in m["devices"]}
    assert d["a"]["blocks_written"] == 4 and d["a"]["mapped_blocks"] == 4  # zeros skipped
    assert d["b"]["blocks_written"] == 2 and d["b"]["blocks_discarded"] == 1
    assert d["b"]["mapped_blocks"] == 4 and d["empty"]["mapped_blocks"] == 0
    assert m["pool"]["data_blocks_used"] == 6
    meta, data = out / "t.meta", out / "t.data"
    assert os.stat(data).st_blocks * 512 <= 6 * BS  # sparse
    assert check_metadata(meta).ok(False)
    assert oracles.check(meta, tools11)[0] == 0
    with open_pool(meta) as pool:
        assert pool.superblock.trans_id == 7
        for dev, want in ((10, base), (11, layer), (12, bytes(3 * MiB))):
            dst = tmp_path / f"{dev}.out"
            export_thin(pool, data, dev, str(dst), size=len(want))
            assert dst.read_bytes() == want


# --------------------------------------------------------------------------------------------
# bad specs: one message with the key path, exit 1 (invalid) or 2 (file), nothing written

GOOD = '''
name = "bad"
layout = "files"
[pool]
data_size = "4MiB"
[[volumes]]
name = "a"
id = 1
size = "1MiB"
content = "a.img"
[[volumes]]
name = "b"
id = 2
origin = "a"
'''

BAD = [
    ("unknown-top", GOOD + 'colour = "red"\n', 1, "colour: unknown key"),
    ("unknown-volume", GOOD.replace('origin = "a"', 'origin = "a"\nsizes = 3'), 1,
     "volumes[1].sizes: unknown key"),
    ("unknown-pool", GOOD.replace("[pool]", "[pool]\nblock = 1"), 1, "pool.block: unknown key"),
    ("unknown-content", GOOD.replace('content = "a.img"',
                                     'content = { type = "raw", file = "a.img", x = 1 }'),
     1, "volumes[0].content.x: unknown key"),
    ("missing-file", GOOD.replace('"a.img"', '"x.img"'), 2,
     "volumes[0].content: file not found: x.img"),
    ("missing-dir", GOOD.replace('content = "a.img"',
                                 'content = { type = "ext4", dirs = ["nope"] }'),
     2, "volumes[0].content.dirs[0]: directory not found: nope"),
    ("content-too-big", GOOD.replace('size = "1MiB"', 'size = "64KiB"'), 1,
     "volumes[0].content: a.img is 131072 bytes, larger than the volume (65536 bytes)"),
    ("duplicate-id", GOOD.replace("id = 2", "id = 1"), 1,
     "volumes[1].id: duplicate id 1 (also volumes[0])"),
    ("duplicate-name", GOOD.replace('name = "b"', 'name = "a"'), 1,
     "volumes[1].name: duplicate name 'a'"),
    ("cycle", GOOD.replace('content = "a.img"', 'content = "a.img"\norigin = "b"'), 1,
     "snapshot cycle: "),
    ("no-origin", GOOD.replace('origin = "a"', 'origin = "zz"'), 1,
     "volumes[1].origin: no volume named 'zz'"),
    ("bad-size", GOOD.replace('size = "1MiB"', 'size = "1 furlong"'), 1,
     "volumes[0].size: bad size '1 furlong'"),
    ("odd-size", GOOD.replace('size = "1MiB"', "size = 1000"), 1,
     "volumes[0].size: 1000 bytes: must be a positive multiple of 512"),
    ("block-size", GOOD.replace("[pool]", '[pool]\ndata_block_size = "96KiB"'), 1,
     "pool.data_block_size: 98304 bytes: must be a multiple of 64KiB"),
    ("data-size-align", GOOD.replace('data_size = "4MiB"', 'data_size = "100KiB"'), 1,
     "pool.data_size: 100KiB is not a positive multiple of the data block size"),
    ("metadata-small", GOOD.replace("[pool]", '[pool]\nmetadata_size = "8KiB"'), 1,
     "pool.metadata_size: 8KiB is too small"),
    ("feature", GOOD.replace("[pool]", '[pool]\nfeatures = ["turbo"]'), 1,
     "pool.features[0]: unknown feature 'turbo'"),
    ("image-size", GOOD.replace('layout = "files"', 'layout = "gpt"\nimage_size = "2MiB"'), 1,
     "image_size: 2MiB does not fit"),
    ("layout", GOOD.replace('"files"', '"zip"'), 1, "layout: 'zip': must be"),
    ("id-range", GOOD.replace("id = 2", "id = 16777216"), 1,
     "volumes[1].id: 16777216 is outside 0..16777215"),
    ("no-volumes", 'name = "x"\n', 1, "volumes: missing"),
    ("toml", GOOD + "[[[\n", 1, "TOML syntax"),
    ("data-does-not-fit", GOOD.replace('data_size = "4MiB"', 'data_size = "64KiB"'), 1,
     "pool.data_size: 64KiB (1 blocks of 64KiB) does not fit the content: 2 data blocks are "
     "needed"),
    ("metadata-exhausted", GOOD.replace("[pool]", '[pool]\nmetadata_size = "64KiB"')
     .replace('data_size = "4MiB"', 'data_size = "64MiB"'), 1,
     "pool.metadata_size: 64KiB is too small: metadata space map: no free blocks left"),
    ("ext4-too-small", GOOD.replace('content = "a.img"',
                                    'content = { type = "ext4", dirs = ["big"] }'), 1,
     "volumes[0].content: the merged tree does not fit"),
]


@pytest.mark.parametrize("text,rc,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec(tmp_path, capsys, text, rc, message):
    _write(tmp_path / "a.img", {0: 1, 1: 1}, 2)
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(2 * MiB))
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    assert main(["build", str(spec), "-o", str(out)]) == rc
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmimage build: ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_interrupted_build_leaves_previous_output(tmp_path, monkeypatch):
    """An interrupt while the image is written (its metadata partition, after the data): the
    earlier build stays as it was, no temp directory is left behind, nothing half-written
    appears under a final name."""
    out = tmp_path / "out"
    first = build(load_spec(EXAMPLE), out).manifest
    before = {n: _sha(out / n) for n in os.listdir(out)}
    import dmimage.image.sparse as sparse

    calls = {"n": 0}
    real = sparse.copy_sparse

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sparse, "copy_sparse", boom)
    spec = tmp_path / "changed.toml"
    text = EXAMPLE.read_text().replace("transaction_id = 4", "transaction_id = 5")
    spec.write_text(text.replace('"example/', f'"{EXAMPLE.parent}/example/'))
    with pytest.raises(KeyboardInterrupt):
        build(load_spec(spec), out)
    assert calls["n"] == 1
    assert {n: _sha(out / n) for n in os.listdir(out)} == before
    assert json.loads((out / "manifest.json").read_text()) == first


def test_image_data_flushed_before_metadata(tmp_path, monkeypatch):
    """gpt: the data partition reaches the disk (fsync of the image) before the metadata,
    superblock included, is written into the image; the image is flushed again after it. The
    manifest's image hash, computed while the data was flushed, is the final file's."""
    import sys
    import threading

    import dmimage.image.sparse as sparse

    b = sys.modules["dmimage.image.build"]
    events: list[str] = []
    real_fsync, real_copy = os.fsync, sparse.copy_sparse

    copied = threading.Event()

    def fsync(fd):  # the flush thread's is slow: a copy that does not wait for it comes first
        image = os.readlink(f"/proc/self/fd/{fd}").endswith("example.img")
        if image and threading.current_thread().name.startswith("flush"):
            copied.wait(2)
        real_fsync(fd)
        if image:
            events.append("fsync image")

    def copy(fd_in, in_off, fd_out, out_off, length, *a, **k):
        events.append(f"metadata into the image at {out_off}")
        copied.set()
        return real_copy(fd_in, in_off, fd_out, out_off, length, *a, **k)

    monkeypatch.setattr(b.os, "fsync", fsync)
    monkeypatch.setattr(sparse, "copy_sparse", copy)
    m = build(load_spec(EXAMPLE), tmp_path / "out").manifest
    meta = next(p for p in m["partitions"] if p["role"] == "metadata")
    assert events[-3:] == ["fsync image", f"metadata into the image at {meta['start']}",
                           "fsync image"], events
    assert _sha(tmp_path / "out" / "example.img") == m["image"]["sha256"]


def test_interrupt_during_self_check(tmp_path, monkeypatch):
    """An interrupt while the self-check thread still exports: the build stops it (no thread
    left running), removes the temp directory and leaves nothing in OUTDIR."""
    import sys
    import threading
    import time

    b = sys.modules["dmimage.image.build"]

    real = b._CompareSink.write
    started = threading.Event()

    def slow(self, data):
        started.set()
        time.sleep(0.01)
        return real(self, data)

    def boom(*a, **k):
        started.wait(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(b._CompareSink, "write", slow)
    monkeypatch.setattr(b, "_finish_image", boom)  # the main thread's work beside it
    out = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        build(load_spec(EXAMPLE), out)
    assert not out.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("self-check")]


def test_interrupt_while_the_image_is_hashed(tmp_path, monkeypatch):
    """An interrupt once the self-check's exports are done and the read-back hashes the rest
    of the data partition (gpt): the build stops that read too, it does not read and hash
    every window left (a large image's whole data partition) before the interrupt is seen."""
    import sys
    import threading
    import time

    import dmimage.image.readback as rb

    b = sys.modules["dmimage.image.build"]
    monkeypatch.setattr(rb, "WINDOW", 64 << 10)
    real_finish, real_read = rb.ReadBack.finish, rb.ReadBack._read_window
    finishing = threading.Event()
    reads: list[bool] = []  # one per window read: was finish() already running?

    def finish(self):
        finishing.set()
        return real_finish(self)

    def read(self, w):
        reads.append(finishing.is_set())
        time.sleep(0.005)
        return real_read(self, w)

    def boom(*a, **k):
        assert finishing.wait(60)
        raise KeyboardInterrupt

    monkeypatch.setattr(rb.ReadBack, "finish", finish)
    monkeypatch.setattr(rb.ReadBack, "_read_window", read)
    monkeypatch.setattr(b, "_finish_image", boom)
    out = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        build(load_spec(EXAMPLE), out)
    assert not out.exists()
    assert not [t for t in threading.enumerate()
                if t.name.startswith(("self-check", "read-back", "image-sha256"))]
    total = -(-load_spec(EXAMPLE).pool.data_size // rb.WINDOW)
    assert total > 100
    # the windows already in flight when the interrupt came, not all that were left
    assert len(reads) < total / 2, (len(reads), total)


def test_self_check_catches_a_wrong_block(tmp_path, monkeypatch, capsys):
    """A build whose pass wrote one wrong bit fails its self-check (exit 1, one line naming
    the thin and the byte) and leaves nothing."""
    import dmimage.image.fill as fill

    real = fill._Pass._write
    hit: list[int] = []

    def corrupt(self, first, end):
        real(self, first, end)
        if self.dev == 1 and not hit:  # the base's first write: one bit of its first block
            d = self.wp.lookup(self.dev, first)[0]
            fd = self.wp._need_data()
            at = self.wp._data_base + d * self.bs + 100
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)
            hit.append(first * self.bs + 100)

    monkeypatch.setattr(fill._Pass, "_write", corrupt)
    out = tmp_path / "out"
    assert main(["build", str(EXAMPLE), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"dmimage build: self-check: thin 1 (base) exports bytes that differ from "
                   f"its content at byte {hit[0]}"), err
    assert not out.exists()


def test_interrupted_first_build_leaves_nothing(tmp_path, monkeypatch):
    import sys

    b = sys.modules["dmimage.image.build"]

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(b, "_outputs", boom)
    out = tmp_path / "new" / "out"
    with pytest.raises(KeyboardInterrupt):
        build(load_spec(EXAMPLE), out)
    assert not out.exists()


def test_ext4_ownership_and_times(example, tmp_path):
    """Files are root-owned with the spec's timestamps, whoever builds."""
    out, m = example
    meta, data = _parts(out, m)
    with open_pool(meta) as pool:
        export_thin(pool, data, 1, str(tmp_path / "base.img"), size=16 * MiB)
    st = subprocess.run(["debugfs", "-R", "stat /etc/hostname", str(tmp_path / "base.img")],
                        capture_output=True, text=True, check=True).stdout
    assert "User:     0   Group:     0" in st
    assert st.count("0x6553f100") == 4  # ctime, atime, mtime, crtime = source_date_epoch


def test_self_check_compares_every_byte(tmp_path):
    """The build's self-check sink (image/build.py) finds the first byte an export gets wrong,
    including in the zeros past the end of the content file."""
    from dmimage.image.build import _CompareSink, _Content

    content = tmp_path / "c.bin"
    content.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes of a 16,384-byte volume
    want = content.read_bytes() + bytes(6144)
    for bad_at in (None, 0, 5000, 10_239, 10_240, 16_383):
        got = bytearray(want)
        if bad_at is not None:
            got[bad_at] ^= 1
        sink = _CompareSink(_Content(content, 10_240))
        for i in range(0, len(got), 3000):  # uneven pieces, as an export's chunks may be
            sink.write(bytes(got[i:i + 3000]))
        sink.close()
        assert sink.mismatch == bad_at and sink.pos == len(want)


def test_worker_threads_import_nothing(tmp_path):
    """A build's worker threads (self-check, read-back, hashing) find every module imported:
    CPython 3.11 before 3.11.5 can raise "AST constructor recursion depth mismatch" when two
    threads compile source at once (an import without a .pyc), which a user running from a
    fresh install, or with PYTHONDONTWRITEBYTECODE, would meet as a traceback."""
    script = f"""
import sys, threading
seen = []
def hook(event, args):
    if event == "import" and threading.current_thread() is not threading.main_thread():
        seen.append(args[0])
sys.addaudithook(hook)
from dmimage.image import build, load_spec
build(load_spec({str(EXAMPLE)!r}), {str(tmp_path / 'out')!r})
print(sorted(set(seen)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "[]", f"modules first imported on a build worker thread: {out}"
