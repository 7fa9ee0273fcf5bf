"""``dmimage build`` with ``layout = "docker-devicemapper"``, offline: the built data root
read back by ``dmimage docker`` and by dissect.extfs must hold what the input layer tars say,
its tar-split must carry Go's CRC-64/ISO of every file (checked against a bit-by-bit CRC
written here and Go's published test vectors) and rebuild each layer tar byte for byte; bad
inputs fail with one line and leave nothing behind. dockerd reading a built store is in
vmtests/test_docker_build.py."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from docker_inputs import Inputs, expected_tree, spec_text, write_inputs, write_one_layer_save

from dmimage.docker.check import check_store
from dmimage.docker.crc64 import crc64, crc64_many
from dmimage.docker.fs import open_filesystem, owner_mode
from dmimage.docker.gotar import open_tar
from dmimage.docker.report import ls_data, read_pool_view
from dmimage.docker.save import save
from dmimage.docker.store import open_store, resolve
from dmimage.docker.thinfile import ThinFile
from dmimage.image.docker_store import build_docker_store, load_docker_spec
from dmimage.thin.pool import open_pool


def _crc_bitwise(data: bytes) -> int:
    c = (1 << 64) - 1
    for x in data:
        c ^= x
        for _ in range(8):
            c = (c >> 1) ^ 0xD800000000000000 if c & 1 else c >> 1
    return c ^ ((1 << 64) - 1)


def test_crc64_go_vectors_and_reference() -> None:
    # Go's hash/crc64 test table (ISO): "a", "ab", "abc"
    assert crc64(b"a") == 0x3420000000000000
    assert crc64(b"ab") == 0x36C4200000000000
    assert crc64(b"abc") == 0x3776C42000000000
    assert crc64(b"") == 0
    rnd = [os.urandom(n) for n in (1, 7, 8, 9, 100, 4095, 4096, 5000)]
    assert crc64_many(rnd) == [_crc_bitwise(x) for x in rnd]
    for n in (1 << 16, (1 << 16) + 13, 300_001):
        d = os.urandom(n)
        assert crc64(d) == _crc_bitwise(d), n


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Inputs]:
    work = tmp_path_factory.mktemp("dbuild")
    inp = write_inputs(work / "inputs")
    spec = work / "seed.toml"
    spec.write_text(spec_text("seed", ["inputs/rich.tar", "inputs/other-oci"]))
    build_docker_store(load_docker_spec(spec), work / "root")
    return work / "root", inp


def test_store_reads_back(built: tuple[Path, Inputs]) -> None:
    root, inp = built
    store = open_store(root)
    rep = check_store(store)
    assert rep.ok, [str(p) for p in rep.problems]
    doc = ls_data(store, read_pool_view(store))
    assert sorted(t for i in doc["images"] for t in i["tags"]) == sorted(inp.images)
    assert {i["id"] for i in doc["images"]} == {inp.image_id(t) for t in inp.images}
    # l1 is shared by all three images: one layer, one device
    l1 = inp.diff_id("l1")
    assert sum(1 for layer in store.layers.values() if layer.diff_id == l1) == 1
    assert len(store.devices.devices) == 1 + 4  # base + l1, l2, l3, l4
    ds = store.devices.deviceset
    assert ds is not None and ds.base_device_filesystem == "ext4"
    assert store.devices.transaction is not None
    with open_pool(store.pool_files.metadata) as pool:
        assert pool.live_superblock.trans_id == 5 == store.devices.transaction.open_transaction_id


def test_save_reproduces_inputs(built: tuple[Path, Inputs], tmp_path: Path) -> None:
    root, inp = built
    store = open_store(root)
    out = tmp_path / "s.tar"
    with open(out, "wb") as f:
        save(store, sorted(inp.images), f)
    with tarfile.open(out) as t:
        for m in json.load(t.extractfile("manifest.json")):  # type: ignore[arg-type]
            tag = m["RepoTags"][0]
            assert t.extractfile(m["Config"]).read() == inp.configs[tag]  # type: ignore[union-attr]
            for p, layer in zip(m["Layers"], inp.images[tag], strict=True):
                assert t.extractfile(p).read() == inp.tars[layer]  # type: ignore[union-attr]


def test_tar_split_crcs(built: tuple[Path, Inputs]) -> None:
    """Every file entry's payload is the CRC Go computes; names and sizes are the tar's."""
    root, inp = built
    store = open_store(root)
    by_diff = {layer.diff_id: layer for layer in store.layers.values()}
    for name, raw in inp.tars.items():
        layer = by_diff[inp.diff_id(name)]
        assert layer.tar_split is not None
        lines = gzip.decompress((root / layer.tar_split).read_bytes()).splitlines()
        files = {}
        with open_tar(fileobj=io.BytesIO(raw)) as t:  # names as Go's reader has them
            for ti in t.getmembers():
                if ti.isreg() and ti.size:
                    f = t.extractfile(ti)
                    assert f is not None
                    files[ti.name.encode("utf-8", "surrogateescape")] = f.read()
        seen = 0
        for line in lines:
            e = json.loads(line)
            if e["type"] != 1 or not e.get("size"):
                continue
            nm = e["name"].encode() if "name" in e else base64.b64decode(e["name_raw"])
            assert base64.b64decode(e["payload"]) == \
                _crc_bitwise(files[nm]).to_bytes(8, "big"), nm
            seen += 1
        assert seen == len(files)


def _walk(node: Any, path: str, out: dict[str, Any]) -> None:
    for n, c in node.listdir().items():
        if n in (".", ".."):
            continue
        p = f"{path}/{n}" if path else n
        out[p] = c
        mode = owner_mode(c)[0]
        if stat.S_ISDIR(mode):
            _walk(c, p, out)


@pytest.mark.parametrize("tag", ["rich:1", "rich:2", "other:1"])
def test_device_holds_layers(built: tuple[Path, Inputs], tag: str) -> None:
    """The image's top device, read by dissect.extfs, against the reference model of the
    layer tars (type, mode, owner, content, link target, device number, xattrs)."""
    root, inp = built
    store = open_store(root)
    dev = resolve(store, tag).device
    want = expected_tree([inp.tars[x] for x in inp.images[tag]])
    with open_pool(store.pool_files.metadata) as pool:
        fd = os.open(store.pool_files.data, os.O_RDONLY)
        try:
            fs = open_filesystem(ThinFile(pool, fd, dev.device_id, dev.size))
            top = fs.get("/")
            assert {"rootfs", "id", "lost+found"} <= set(top.listdir())
            nodes: dict[str, Any] = {}
            _walk(fs.get("/rootfs"), "", nodes)
            problems = []
            for p, w in want.items():
                n = nodes.get(p)
                if n is None:
                    problems.append(f"{p}: missing")
                    continue
                mode, uid, gid = owner_mode(n)
                got: dict[str, Any] = {"uid": uid, "gid": gid}
                t = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l",
                     stat.S_IFIFO: "p", stat.S_IFCHR: "c"}[stat.S_IFMT(mode)]
                got["type"] = t
                if t != "l":
                    got["mode"] = stat.S_IMODE(mode)
                if t == "f":
                    got["sha256"] = hashlib.sha256(n.open().read()).hexdigest()
                if t == "l":
                    got["link"] = n.link
                if t == "c":
                    rdev = int.from_bytes(bytes(n.inode.i_block)[:8], "little")
                    got["dev"] = (os.major(rdev), os.minor(rdev))
                got["xattrs"] = {x.name: x.value for x in n.xattr}  # none must be none
                ref = {k: v for k, v in w.items() if k in got}
                if {k: got[k] for k in ref} != ref:
                    problems.append(f"{p}: device {got}, layers {ref}")
            extra = sorted(set(nodes) - set(want))
            assert not problems and not extra, (problems, extra)
        finally:
            os.close(fd)


def test_blocks_shared_with_parent(built: tuple[Path, Inputs]) -> None:
    """Each layer device is a snapshot of its parent's: it shares the blocks the layer left
    alone and owns only those it changed."""
    root, _ = built
    store = open_store(root)
    doc = ls_data(store, read_pool_view(store))
    children = [layer for layer in doc["layers"] if layer.get("parent")]
    assert len(children) == 3
    for layer in children:
        assert 0 < layer["exclusive_blocks"] < layer["mapped_blocks"], layer
        assert layer["shared_blocks"] > 0, layer


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmimage", *args], capture_output=True,
                          text=True, check=False)


def test_cli_build_and_ls(tmp_path: Path) -> None:
    inp = write_inputs(tmp_path / "inputs")
    (tmp_path / "s.toml").write_text(spec_text("cli", ["inputs/rich.tar"]))
    res = _cli("build", str(tmp_path / "s.toml"), "-o", str(tmp_path / "root"))
    assert res.returncode == 0, res.stderr
    assert "2 images" in res.stdout
    res = _cli("docker", "ls", str(tmp_path / "root"), "--json")
    assert res.returncode == 0, res.stderr
    assert sorted(t for i in json.loads(res.stdout)["images"] for t in i["tags"]) == \
        ["rich:1", "rich:2"]
    res = _cli("docker", "check", str(tmp_path / "root"))
    assert res.returncode == 0, res.stdout + res.stderr
    del inp


def _bad_build(tmp_path: Path, mutate: Any) -> subprocess.CompletedProcess[str]:
    inp = write_inputs(tmp_path / "inputs")
    mutate(inp)
    (tmp_path / "s.toml").write_text(spec_text("bad", ["inputs/rich.tar", "inputs/other-oci"]))
    return _cli("build", str(tmp_path / "s.toml"), "-o", str(tmp_path / "out"))


def test_bad_layer_digest(tmp_path: Path) -> None:
    def corrupt(inp: Inputs) -> None:
        blobs = inp.oci_dir / "blobs/sha256"
        for b in blobs.iterdir():
            data = b.read_bytes()
            if data[:2] == b"\x1f\x8b":  # the gzip'd layer: same digest name, other content
                b.write_bytes(gzip.compress(b"not the layer"))
    res = _bad_build(tmp_path, corrupt)
    assert res.returncode in (1, 2), res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "blobs/sha256" in res.stderr
    assert not (tmp_path / "out").exists()


def test_duplicate_member_refused(tmp_path: Path) -> None:
    def dup(inp: Inputs) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for _ in range(2):
                ti = tarfile.TarInfo("etc/x")
                ti.size = 1
                t.addfile(ti, io.BytesIO(b"x"))
        write_one_layer_save(inp.save_tar, buf.getvalue(), "dup:1")
    res = _bad_build(tmp_path, dup)
    assert res.returncode in (1, 2)
    assert "etc/x: named twice" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_outdir_not_empty(tmp_path: Path) -> None:
    write_inputs(tmp_path / "inputs")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    (tmp_path / "s.toml").write_text(spec_text("x", ["inputs/rich.tar"]))
    res = _cli("build", str(tmp_path / "s.toml"), "-o", str(tmp_path / "out"))
    assert res.returncode == 2 and "not empty" in res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep"]


def _lvm_disk(root: Path, disk: Path) -> None:
    """The built pool moved into an LVM VG "docker" (thin pool "thinpool", as Docker's
    direct-lvm guide names it) on a whole-disk PV: dmimage's LVM writer, lvcreate's layout."""
    from dmimage.image.sparse import copy_sparse
    from dmimage.lvm.create import PE_START, thin_pool_vg, vg_text, write_pv

    meta = root / "devicemapper/devicemapper/metadata"
    data = root / "devicemapper/devicemapper/data"
    ext = 4 << 20
    msize, dsize = meta.stat().st_size, data.stat().st_size
    region = PE_START + 2 * msize + dsize + ext
    with open_pool(meta) as pool:
        tid = pool.live_superblock.trans_id
    group, pv_id = thin_pool_vg(vg="docker", seed=b"dmimage-test", extent_size=ext,
                                region_size=region, pool="thinpool", tmeta_size=msize,
                                tdata_size=dsize, chunk_sectors=128, transaction_id=tid,
                                thins=[], creation_time=1700000000)
    with open(disk, "wb") as f:
        f.truncate(region)
    fd = os.open(disk, os.O_WRONLY)
    try:
        for src, at, size in ((meta, PE_START + msize, msize),
                              (data, PE_START + 2 * msize, dsize)):
            sfd = os.open(src, os.O_RDONLY)
            try:
                copy_sparse(sfd, 0, fd, at, size)
            finally:
                os.close(sfd)
        write_pv(fd, 0, region, pv_id, vg_text(group))
    finally:
        os.close(fd)


def test_direct_lvm_pool(built: tuple[Path, Inputs], tmp_path: Path) -> None:
    """--lvm DISK VG/POOL reads the same store from an LVM thin pool: a data root without loop
    files, its pool in a VG; ls, check, save and export agree with the loop-lvm store."""
    import shutil

    root, inp = built
    disk = tmp_path / "pv.img"
    _lvm_disk(root, disk)
    bare = tmp_path / "root"
    shutil.copytree(root, bare, ignore=lambda d, names: (
        ["data", "metadata"] if d.endswith("devicemapper/devicemapper") else []))
    assert not (bare / "devicemapper/devicemapper/data").exists()
    lvm = ["--lvm", str(disk), "docker/thinpool"]
    res = _cli("docker", "ls", str(bare), "--json", *lvm)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    want = json.loads(_cli("docker", "ls", str(root), "--json").stdout)
    for doc in (got, want):
        doc["pool"].pop("metadata", None)
        doc["pool"].pop("data", None)
    assert got == want
    res = _cli("docker", "check", str(bare), *lvm)
    assert res.returncode == 0, res.stdout + res.stderr
    res = _cli("docker", "save", str(bare), "rich:2", "-o", str(tmp_path / "s.tar"), *lvm)
    assert res.returncode == 0, res.stderr
    with tarfile.open(tmp_path / "s.tar") as t:
        m = json.load(t.extractfile("manifest.json"))[0]  # type: ignore[arg-type]
        for p, layer in zip(m["Layers"], inp.images["rich:2"], strict=True):
            assert t.extractfile(p).read() == inp.tars[layer]  # type: ignore[union-attr]
    for args, out in ((["--lvm", str(disk), "docker/thinpool"], "a.ext4"), ([], "b.ext4")):
        r = bare if args else root
        res = _cli("docker", "export", str(r), "other:1", "-o", str(tmp_path / out), *args)
        assert res.returncode == 0, res.stderr
    assert (tmp_path / "a.ext4").read_bytes() == (tmp_path / "b.ext4").read_bytes()
    res = _cli("docker", "ls", str(bare), "--lvm", str(disk), "docker/nosuch")
    assert res.returncode == 2 and "nosuch" in res.stderr and "Traceback" not in res.stderr


def _save_tarball(path: Path, tag: str, files: dict[str, bytes]) -> bytes:
    """A `docker save` tarball of one image with one layer holding *files*; the layer tar."""
    lbuf = io.BytesIO()
    with tarfile.open(fileobj=lbuf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    layer = lbuf.getvalue()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [
        "sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode()
    cid = hashlib.sha256(config).hexdigest()
    with tarfile.open(path, "w") as t:
        for name, data in (("l/layer.tar", layer), (f"{cid}.json", config),
                           ("manifest.json", json.dumps([{"Config": f"{cid}.json",
                                                          "RepoTags": [tag],
                                                          "Layers": ["l/layer.tar"]}]).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return layer


def test_ext4_runs_match_dissect(tmp_path: Path) -> None:
    """save's bulk ext4 reader (ext4runs) against dissect.extfs, file by file, on a layer
    whose files debugfs writes with holes (it skips zero blocks): extents with gaps between
    them, a hole at the end, and a file of five extents (an extent tree of depth 1, left to
    dissect). Where the bulk reader answers, the bytes its runs name must be dissect's."""
    from dmimage.docker.ext4runs import Ext4Files

    rnd = os.urandom(1 << 20)
    z = bytes(8192)
    d = rnd[:4096]
    files = {
        "a/holes4": d + z + d + z + d + z + d,  # 4 extents, gaps between them
        "a/holes5": (d + z) * 4 + d,  # 5 extents: a tree of depth 1
        "a/tailhole": d + bytes(20000),
        "a/tiny": b"x",
        "a/odd": rnd[:123457],
        "b/big": rnd,
        **{f"c/f{i}": rnd[i:i + 100 + 37 * i] for i in range(200)},
    }
    layer = _save_tarball(tmp_path / "in.tar", "holes:1", files)
    (tmp_path / "s.toml").write_text(spec_text("holes", ["in.tar"]))
    build_docker_store(load_docker_spec(tmp_path / "s.toml"), tmp_path / "root")
    store = open_store(tmp_path / "root")
    dev = resolve(store, "holes:1").device
    fast = holes = 0
    with open_pool(store.pool_files.metadata) as pool:
        fd = os.open(store.pool_files.data, os.O_RDONLY)
        try:
            thin = ThinFile(pool, fd, dev.device_id, dev.size)
            fs = open_filesystem(thin)
            names = sorted(files)
            got = Ext4Files(fs, "/rootfs").contents([n.encode() for n in names])
            for name, g in zip(names, got, strict=True):
                want = fs.get("/rootfs/" + name).open().read()
                assert want == files[name], name
                if g is None:
                    continue
                fast += 1
                size, runs = g
                read = bytearray()
                for i, (at, n) in enumerate(runs):
                    if at is None:
                        holes += i + 1 < len(runs)
                        read += bytes(n)
                    else:
                        thin.seek(at)
                        read += thin.read(n)
                assert size == len(want) and bytes(read[:size]) == want, name
            assert got[names.index("a/holes5")] is None  # left to dissect
        finally:
            os.close(fd)
    assert fast == len(files) - 1 and holes >= 3
    out = tmp_path / "s.tar"
    with open(out, "wb") as f:
        save(store, ["holes:1"], f)
    with tarfile.open(out) as t:
        m = json.load(t.extractfile("manifest.json"))[0]  # type: ignore[arg-type]
        assert t.extractfile(m["Layers"][0]).read() == layer  # type: ignore[union-attr]


def test_save_parallel_stream_and_pipe_agree(built: tuple[Path, Inputs], tmp_path: Path) -> None:
    """The tarball is the same whether the layers are written in parallel at their offsets
    (a regular file), in order to an in-memory file, or by the CLI into a FIFO (which must
    stay a FIFO: a device or pipe given as -o is written to, never replaced)."""
    import threading

    root, inp = built
    store = open_store(root)
    names = sorted(inp.images)
    with open(tmp_path / "p.tar", "wb") as f:
        save(store, names, f)
    mem = io.BytesIO()
    save(store, names, mem)
    parallel = (tmp_path / "p.tar").read_bytes()
    assert mem.getvalue() == parallel
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def drain() -> None:
        with open(fifo, "rb") as r:
            while chunk := r.read(1 << 16):
                got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    res = _cli("docker", "save", str(root), *names, "-o", str(fifo))
    reader.join(timeout=60)
    assert res.returncode == 0, res.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert bytes(got) == parallel


def _one_byte_off(src: Path, inp: Inputs, tmp_path: Path) -> tuple[Path, Any]:
    """A copy of the built store whose layer l2 rebuilds one byte off (a bit flipped in its
    tar-split's first header segment); returns (root, the layer)."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(src, root, ignore=lambda d, names: (
        ["data"] if d.endswith("devicemapper/devicemapper") else []))
    subprocess.run(["cp", "--sparse=always", str(src / "devicemapper/devicemapper/data"),
                    str(root / "devicemapper/devicemapper/data")], check=True)
    store = open_store(root)
    l2 = next(x for x in store.layers.values() if x.diff_id == inp.diff_id("l2"))
    assert l2.tar_split is not None
    ts = root / l2.tar_split
    lines = gzip.decompress(ts.read_bytes()).splitlines()
    seg = json.loads(lines[0])
    raw = bytearray(base64.b64decode(seg["payload"]))
    raw[0] ^= 1
    seg["payload"] = base64.b64encode(bytes(raw)).decode()
    lines[0] = json.dumps(seg).encode()
    ts.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return root, l2


def test_save_error_in_a_parallel_layer(built: tuple[Path, Inputs], tmp_path: Path) -> None:
    """A layer whose file no longer matches its diff id fails the save naming that layer's
    tar-split, while the other layers are rebuilt in parallel; no output is left."""
    src, inp = built
    root, l2 = _one_byte_off(src, inp, tmp_path)
    out = tmp_path / "s.tar"
    res = _cli("docker", "save", str(root), *sorted(inp.images), "-o", str(out))
    assert res.returncode == 1, res.stderr
    err = res.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert l2.tar_split in err and "diff id" in err, err
    assert not out.exists() and not list(tmp_path.glob(".s.tar.*"))


def test_save_no_verify(built: tuple[Path, Inputs], tmp_path: Path) -> None:
    """``--no-verify`` writes the same tarball as the default on a sound store; on a layer
    that rebuilds one byte off it succeeds where the default fails, and the layer tar it
    wrote does not have the diff id: what the option gives up, shown."""
    root, inp = built
    store = open_store(root)
    names = sorted(inp.images)
    with open(tmp_path / "v.tar", "wb") as f:
        save(store, names, f)
    with open(tmp_path / "n.tar", "wb") as f:
        save(store, names, f, verify=False)
    assert (tmp_path / "n.tar").read_bytes() == (tmp_path / "v.tar").read_bytes()

    bad, l2 = _one_byte_off(root, inp, tmp_path)
    out = tmp_path / "s.tar"
    res = _cli("docker", "save", str(bad), "rich:2", "-o", str(out), "--no-verify")
    assert res.returncode == 0, res.stderr
    with tarfile.open(out) as t:
        m = json.load(t.extractfile("manifest.json"))[0]  # type: ignore[arg-type]
        sums = ["sha256:" + hashlib.sha256(t.extractfile(p).read()).hexdigest()  # type: ignore[union-attr]
                for p in m["Layers"]]
    want = [inp.diff_id(x) for x in inp.images["rich:2"]]
    assert [a == b for a, b in zip(sums, want, strict=True)] == \
        [x != "l2" for x in inp.images["rich:2"]]


def test_docs_rescue_and_migrate(built: tuple[Path, Inputs], tmp_path: Path) -> None:
    """docs/docker.md's second example (diff, diff -o, save) runs on a copy of a built store
    given a container by hand, as dockerd makes one: an init device and a writable device
    snapshotted from the image's top layer, the container's file changes written into its
    device with debugfs. diff must name them, the tar hold them, save reproduce the input."""
    import re
    import shlex
    import shutil

    src, inp = built
    root = tmp_path / "root"
    shutil.copytree(src, root, ignore=lambda d, names: (
        ["data"] if d.endswith("devicemapper/devicemapper") else []))
    loop = root / "devicemapper/devicemapper"
    subprocess.run(["cp", "--sparse=always", str(src / "devicemapper/devicemapper/data"),
                    str(loop / "data")], check=True)
    store = open_store(root)
    img = store.images[inp.image_id("rich:1")]
    top = resolve(store, "rich:1").device
    with open_pool(str(loop / "metadata")) as pool:
        tid = pool.live_superblock.trans_id
        init_id = max(pool.devices()) + 1
    rw_id = init_id + 1
    res = _cli("message", str(loop / "metadata"), f"create_snap {init_id} {top.device_id}",
               f"create_snap {rw_id} {init_id}", f"set_transaction_id {tid} {tid + 2}")
    assert res.returncode == 0, res.stderr
    md = root / "devicemapper/metadata"
    mount = "e" * 64
    for name, dev, trans in ((mount + "-init", init_id, tid + 1), (mount, rw_id, tid + 2)):
        (md / name).write_text(json.dumps({"device_id": dev, "size": top.size,
                                           "transaction_id": trans, "initialized": True,
                                           "deleted": False}))
    (md / "transaction-metadata").write_text(json.dumps(
        {"open_transaction_id": tid + 2, "device_hash": mount, "device_id": rw_id}))
    ds = json.loads((md / "deviceset-metadata").read_text())
    ds["next_device_id"] = rw_id
    (md / "deviceset-metadata").write_text(json.dumps(ds))
    cid = "d" * 64
    mdir = root / "image/devicemapper/layerdb/mounts" / cid
    mdir.mkdir(parents=True)
    (mdir / "mount-id").write_text(mount)
    (mdir / "init-id").write_text(mount + "-init")
    (mdir / "parent").write_text(img.chain_ids[-1])
    (root / "containers" / cid).mkdir(parents=True)
    (root / "containers" / cid / "config.v2.json").write_text(json.dumps(
        {"ID": cid, "Name": "/mycontainer", "Image": img.id, "Driver": "devicemapper"}))
    # the container's changes: a new file, a changed one, a removed one
    fsimg = tmp_path / "c.ext4"
    res = _cli("docker", "export", str(root), "mycontainer", "-o", str(fsimg))
    assert res.returncode == 0, res.stderr
    (tmp_path / "added").write_bytes(b"rescued data\n")
    script = (f"write {tmp_path / 'added'} /rootfs/etc/added\n"
              "rm /rootfs/etc/os-release\n"
              f"write {tmp_path / 'added'} /rootfs/etc/os-release\n"
              "rm /rootfs/attr\n")
    res2 = subprocess.run(["debugfs", "-w", "-f", "-", str(fsimg)], input=script,
                          capture_output=True, text=True, check=False)
    assert res2.returncode == 0, res2.stderr
    res = _cli("write", str(loop / "metadata"), str(loop / "data"), "--dev-id", str(rw_id),
               "-i", str(fsimg))
    assert res.returncode == 0, res.stderr
    res = _cli("docker", "check", str(root))
    assert res.returncode == 0, res.stdout + res.stderr

    doc = (Path(__file__).resolve().parents[1] / "docs/docker.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", doc, re.S) if "docker save" in b)
    cmds = [line.split("#")[0].strip() for line in block.splitlines()]
    cmds = [c for c in cmds if c]
    assert len(cmds) == 3
    outs = []
    for cmd in cmds:
        argv = shlex.split(cmd.replace("ROOT", str(root)).replace("app:1", "rich:1"))
        assert argv[0] == "dmimage"
        r = subprocess.run([sys.executable, "-m", "dmimage", *argv[1:]], cwd=tmp_path,
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, (cmd, r.stderr)
        outs.append(r.stdout)
    assert sorted(outs[0].splitlines()) == ["A /etc/added", "C /etc", "C /etc/os-release",
                                            "D /attr"]
    with tarfile.open(tmp_path / "changes.tar") as t:
        assert {"attr", ".wh.attr", "etc/added", "etc/os-release"} & set(t.getnames()) == \
            {".wh.attr", "etc/added", "etc/os-release"}
        f = t.extractfile("etc/added")
        assert f is not None and f.read() == b"rescued data\n"
    with tarfile.open(tmp_path / "app.tar") as t:
        m = json.load(t.extractfile("manifest.json"))[0]  # type: ignore[arg-type]
        assert m["RepoTags"] == ["rich:1"]
        for p, layer in zip(m["Layers"], inp.images["rich:1"], strict=True):
            assert t.extractfile(p).read() == inp.tars[layer]  # type: ignore[union-attr]


def test_save_without_bulk_reader(built: tuple[Path, Inputs], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """When the bulk ext4 reader fails (a dissect.extfs whose internals it reads moved, or
    damaged inode tables), every file goes through dissect.extfs on its own and the save is
    the same."""
    from dmimage.docker import ext4runs

    root, inp = built
    store = open_store(root)
    names = sorted(inp.images)
    with open(tmp_path / "a.tar", "wb") as f:
        save(store, names, f)

    def broken(self: Any, rels: list[bytes]) -> list[Any]:
        raise AttributeError("_read_group_desc")

    monkeypatch.setattr(ext4runs.Ext4Files, "contents", broken)
    with open(tmp_path / "b.tar", "wb") as f:
        save(store, names, f)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_aufs_metadata_directories_skipped(tmp_path: Path) -> None:
    """A layer from an aufs host (Docker <= 1.9 pushed them) with aufs's metadata: the
    ``.wh..wh.plnk/`` and ``.wh..wh.orph/`` directories and an empty ``.wh..wh.aufs``
    file. UnpackLayer skips every top-level ``.wh..wh.*`` member but the opaque marker (only
    regular files under plnk are kept aside, for hard links into it), so the store builds;
    the layer tar is rebuilt from tar-split (save reproduces its digest), and the device
    holds the layer's file and none of aufs's names."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, kind, data in ((".wh..wh.aufs", tarfile.REGTYPE, b""),
                                 (".wh..wh.orph/", tarfile.DIRTYPE, b""),
                                 (".wh..wh.plnk/", tarfile.DIRTYPE, b""),
                                 ("etc/", tarfile.DIRTYPE, b""),
                                 ("etc/motd", tarfile.REGTYPE, b"from aufs\n")):
            ti = tarfile.TarInfo(name)
            ti.type, ti.size, ti.mtime = kind, len(data), 1_400_000_000
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            t.addfile(ti, io.BytesIO(data) if data else None)
    layer = buf.getvalue()
    write_one_layer_save(tmp_path / "aufs.tar", layer, "old:aufs")
    (tmp_path / "s.toml").write_text(spec_text("aufs", ["aufs.tar"]))
    res = _cli("build", str(tmp_path / "s.toml"), "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    store = open_store(tmp_path / "out")
    with open(tmp_path / "save.tar", "wb") as f:
        save(store, ["old:aufs"], f)
    with tarfile.open(tmp_path / "save.tar") as t:
        man = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        got = t.extractfile(man[0]["Layers"][0]).read()  # type: ignore[union-attr]
    assert got == layer
    dev = resolve(store, "old:aufs").device
    with open_pool(store.pool_files.metadata) as pool:
        fd = os.open(store.pool_files.data, os.O_RDONLY)
        try:
            fs = open_filesystem(ThinFile(pool, fd, dev.device_id, dev.size))
            assert set(fs.get("/rootfs").listdir()) - {".", ".."} == {"etc"}
            assert set(fs.get("/rootfs/etc").listdir()) - {".", ".."} == {"motd"}
        finally:
            os.close(fd)
