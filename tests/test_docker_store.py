"""`dmimage docker` on small hand-built stores: the check's rules (transactions, duplicates,
leaks) and bad input (malformed JSON, missing files, path traversal, symlinks out of ROOT and
symlink loops). The real-dockerd proof is vmtests/test_docker_store.py."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from dmimage.cli.main import main

DIFF = "sha256:" + "a" * 64
LAYER_HASH = "f" * 64
CONFIG = json.dumps({"rootfs": {"type": "layers", "diff_ids": [DIFF]}}).encode()
IMAGE_HEX = hashlib.sha256(CONFIG).hexdigest()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def make_store(root: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A pool with base (1) and one layer snapshot (2), transaction id 2, and the JSON files
    dockerd 20.10 would keep for one image with that one layer, tagged img:1."""
    loop = root / "devicemapper/devicemapper"
    loop.mkdir(parents=True)
    meta = loop / "metadata"
    with open(meta, "wb") as f:
        f.truncate(4 << 20)
    with open(loop / "data", "wb") as f:
        f.truncate(64 << 20)
    assert run(capsys, "format", str(meta), "--data-block-size", "128",
               "--nr-data-blocks", "1024")[0] == 0
    assert run(capsys, "message", str(meta), "create_thin 1", "create_snap 2 1",
               "set_transaction_id 0 2")[0] == 0
    md = root / "devicemapper/metadata"
    md.mkdir(parents=True)

    def dev(name: str, dev_id: int, tid: int, **extra: object) -> None:
        (md / name).write_text(json.dumps({"device_id": dev_id, "size": 1 << 20,
                                           "transaction_id": tid, "initialized": True,
                                           "deleted": False, **extra}))

    dev("base", 1, 1)
    dev(LAYER_HASH, 2, 2)
    (md / "deviceset-metadata").write_text(json.dumps(
        {"next_device_id": 2, "BaseDeviceUUID": "u", "BaseDeviceFilesystem": "ext4"}))
    (md / "transaction-metadata").write_text(json.dumps(
        {"open_transaction_id": 2, "device_hash": LAYER_HASH, "device_id": 2}))
    ldir = root / "image/devicemapper/layerdb/sha256" / DIFF[7:]
    ldir.mkdir(parents=True)
    (ldir / "cache-id").write_text(LAYER_HASH)
    (ldir / "diff").write_text(DIFF)
    (ldir / "size").write_text("0")
    idb = root / "image/devicemapper/imagedb/content/sha256"
    idb.mkdir(parents=True)
    (idb / IMAGE_HEX).write_bytes(CONFIG)
    (root / "image/devicemapper/repositories.json").write_text(json.dumps(
        {"Repositories": {"img": {"img:1": "sha256:" + IMAGE_HEX}}}))
    return root


@pytest.fixture
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    return make_store(tmp_path / "root", capsys)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            p = Path(dirpath) / name
            h.update(str(p).encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_fifo():
                h.update(b"fifo")
            else:
                h.update(p.read_bytes())
    return h.hexdigest()


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_clean_store_ls_and_check(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_digest(store)
    rc, out, err = run(capsys, "docker", "check", str(store))
    assert rc == 0, out + err
    rc, out, _ = run(capsys, "docker", "ls", str(store), "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["images"][0]["id"] == "sha256:" + IMAGE_HEX
    assert doc["images"][0]["tags"] == ["img:1"]
    assert doc["images"][0]["device_id"] == 2
    assert doc["pool"]["transaction_id"] == 2
    assert doc["pool"]["next_device_id"] == 2
    assert tree_digest(store) == before


@pytest.mark.parametrize("open_id,expect", [
    (2, None), (3, "roll it back"), (1, "reports an error")])
def test_open_transaction(store: Path, capsys: pytest.CaptureFixture[str], open_id: int,
                          expect: str | None) -> None:
    """dockerd's processPendingTransaction: equal = nothing, greater = rollback, smaller =
    error."""
    (store / "devicemapper/metadata/transaction-metadata").write_text(json.dumps(
        {"open_transaction_id": open_id, "device_hash": LAYER_HASH, "device_id": 2}))
    rc, out, _ = run(capsys, "docker", "check", str(store))
    if expect is None:
        assert rc == 0, out
    else:
        assert rc == 1 and expect in out, out


def test_duplicate_id_and_leak(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = store / "devicemapper/metadata"
    (md / ("e" * 64)).write_text(json.dumps({"device_id": 2, "size": 1 << 20}))
    assert run(capsys, "message", str(store / "devicemapper/devicemapper/metadata"),
               "create_thin 7")[0] == 0
    rc, out, _ = run(capsys, "docker", "check", str(store), "--json")
    assert rc == 1
    kinds = {(p["kind"], p["device_id"]) for p in json.loads(out)["problems"]}
    assert {("duplicate-id", 2), ("leak", 7), ("unreferenced", 2)} <= kinds


def test_export_by_tag(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.img"
    rc, _, err = run(capsys, "docker", "export", str(store), "img:1", "-o", str(out))
    assert rc == 0, err
    assert out.stat().st_size == 1 << 20 and not out.read_bytes().strip(b"\0")
    rc, _, err = run(capsys, "docker", "export", str(store), "nope:1", "-o", str(out))
    assert rc == 1 and "nope:1" in one_line(err)


@pytest.mark.parametrize("case", ["traversal", "absolute", "symlink-out", "symlink-loop",
                                  "malformed", "missing-diff", "bad-field", "container-dir",
                                  "fifo"])
def test_bad_input(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   case: str) -> None:
    """One line naming the file, exit 1, no traceback, no hang; nothing under ROOT
    changes."""
    ldir = store / "image/devicemapper/layerdb/sha256" / DIFF[7:]
    md = store / "devicemapper/metadata"
    if case == "traversal":
        (ldir / "cache-id").write_text("../../etc")
        named = "cache-id"
    elif case == "absolute":
        (ldir / "cache-id").write_text("/etc/passwd")
        named = "cache-id"
    elif case == "symlink-out":
        outside = tmp_path / "outside.json"
        outside.write_text(json.dumps({"device_id": 9, "size": 1}))
        (md / ("d" * 64)).symlink_to(outside)
        named = "d" * 64
    elif case == "symlink-loop":
        (md / "loop1").symlink_to(md / "loop2")
        (md / "loop2").symlink_to(md / "loop1")
        named = "loop"
    elif case == "malformed":
        (md / LAYER_HASH).write_text('{"device_id": 2, "size":')
        named = LAYER_HASH
    elif case == "missing-diff":
        (ldir / "diff").unlink()
        named = "diff"
    elif case == "bad-field":
        (md / "base").write_text(json.dumps({"device_id": 1 << 24, "size": 1}))
        named = "base"
    elif case == "fifo":  # must not wait for a writer
        (md / LAYER_HASH).unlink()
        os.mkfifo(md / LAYER_HASH)
        named = LAYER_HASH
    else:
        (store / "containers" / ("c" * 64)).mkdir(parents=True)
        named = "config.v2.json"
    before = tree_digest(store)
    for argv in (["ls", str(store)], ["check", str(store)]):
        rc, out, err = run(capsys, "docker", *argv)
        assert rc == 1, (argv, out, err)
        assert named in one_line(err)
    assert tree_digest(store) == before


def test_io_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "docker", "ls", str(tmp_path / "absent"))
    assert rc == 2 and "absent" in one_line(err)
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "docker", "check", str(tmp_path / "empty"))
    assert rc == 2 and "devicemapper" in one_line(err)


def test_docs_walkthrough(store: Path, capsys: pytest.CaptureFixture[str],
                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/docker.md's walk-through runs on a store (ROOT replaced), each command exit 0."""
    import re
    import shlex

    doc = (Path(__file__).resolve().parents[1] / "docs/docker.md").read_text()
    block = re.search(r"```sh\n(.*?)```", doc, re.S)
    assert block is not None
    monkeypatch.chdir(tmp_path)
    cmds = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    cmds = [c for c in cmds if c]
    assert len(cmds) == 5
    for cmd in cmds:
        argv = shlex.split(cmd.replace("ROOT", str(store)))
        assert argv[0] == "dmimage"
        rc, out, err = run(capsys, *argv[1:])
        assert rc == 0, (cmd, err)
    assert (tmp_path / "img1.ext4").stat().st_size == 1 << 20


def test_thin_file_reads_like_export(store: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """ThinFile (what save's filesystem reader sees) returns the bytes `export` writes, at
    any offset: mapped runs from the data file, zeros elsewhere."""
    import random

    from dmimage.docker.thinfile import ThinFile
    from dmimage.thin.pool import open_pool

    meta = store / "devicemapper/devicemapper/metadata"
    data = store / "devicemapper/devicemapper/data"
    payload = random.Random(1).randbytes(200_000)
    (tmp_path / "in").write_bytes(payload)
    assert run(capsys, "write", str(meta), str(data), "--dev-id", "2", "--offset", "70000",
               "-i", str(tmp_path / "in"))[0] == 0
    out = tmp_path / "x.img"
    assert run(capsys, "docker", "export", str(store), "img:1", "-o", str(out))[0] == 0
    want = out.read_bytes()
    assert want[70000:270000] == payload
    fd = os.open(data, os.O_RDONLY)
    try:
        with open_pool(meta) as pool:
            f = ThinFile(pool, fd, 2, 1 << 20)
            rng = random.Random(2)
            for _ in range(200):
                off = rng.randrange(0, 1 << 20)
                n = rng.randrange(0, 300_000)
                f.seek(off)
                assert f.read(n) == want[off:off + n]
    finally:
        os.close(fd)


def _tar_and_split(files: dict[str, bytes]) -> tuple[bytes, list[bytes]]:
    """A tar and its tar-split lines, cut at the members' data offsets as tar-split does."""
    import base64
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    lines, pos = [], 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        for m in t.getmembers():
            seg = raw[pos:m.offset_data]
            lines.append(json.dumps({"type": 2, "payload": base64.b64encode(seg).decode()}))
            lines.append(json.dumps({"type": 1, "name": m.name, "size": m.size}))
            pos = m.offset_data + m.size
    lines.append(json.dumps({"type": 2, "payload": base64.b64encode(raw[pos:]).decode()}))
    return raw, [x.encode() for x in lines]


def test_tar_split_rebuilds_and_rejects(tmp_path: Path) -> None:
    import gzip
    import io

    from dmimage.docker.errors import StoreError
    from dmimage.docker.tarsplit import assemble, read_entries, tar_size

    files = {"a.txt": b"alpha\n" * 100, "d/b.bin": bytes(range(256)) * 9, "empty": b""}
    raw, lines = _tar_and_split(files)
    diff = "sha256:" + hashlib.sha256(raw).hexdigest()
    blob = gzip.compress(b"\n".join(lines) + b"\n")

    def opener(name: bytes) -> io.BytesIO:
        return io.BytesIO(files[name.decode()])

    entries = list(read_entries(blob, "ts"))
    assert tar_size(entries) == len(raw)
    assert b"".join(assemble(entries, opener, expect_digest=diff, where="ts")) == raw
    changed = dict(files, **{"a.txt": b"ALPHA\n" * 100})
    with pytest.raises(StoreError, match="diff id"):
        b"".join(assemble(entries, lambda n: io.BytesIO(changed[n.decode()]),
                          expect_digest=diff, where="ts"))
    short = dict(files, **{"a.txt": b"alpha\n"})
    with pytest.raises(StoreError, match="a.txt: the layer's file is 6 bytes"):
        b"".join(assemble(entries, lambda n: io.BytesIO(short[n.decode()]),
                          expect_digest=diff, where="ts"))
    with pytest.raises(StoreError, match="ts: not a complete gzip stream"):
        list(read_entries(blob[:-10], "ts"))
    with pytest.raises(StoreError, match="ts: line 2: malformed entry"):
        list(read_entries(gzip.compress(lines[0] + b"\n{\"type\": 1, \"size\": \n"), "ts"))


def _ext4(path: Path, tree: dict[str, bytes | None], mtime: int) -> None:
    """A 4 MiB ext4 image whose rootfs/ holds *tree* (None = directory), made by mke2fs -d."""
    import subprocess

    stage = path.with_suffix(".d")
    for name, data in tree.items():
        p = stage / "rootfs" / name
        if data is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    for dirpath, dirs, files in os.walk(stage):
        for n in dirs + files:
            os.utime(Path(dirpath) / n, ns=(mtime, mtime))
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-F", "-d", str(stage), str(path)],
                   check=True, capture_output=True, env={**os.environ, "E2FSPROGS_FAKE_TIME":
                                                         "1700000000"})


def test_diff_on_hand_built_container(store: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A container whose init layer has a, d/x, gone/y and whose own device has a changed a,
    d/x unchanged, a new n and no gone/: C /a, A /n, D /gone (the case the guest cannot make
    without runc), and the tar holds a, n and the whiteout .wh.gone."""
    import tarfile

    meta = store / "devicemapper/devicemapper/metadata"
    data = store / "devicemapper/devicemapper/data"
    t0 = 1_700_000_000 * 10**9
    init = {"a": b"old\n", "d": None, "d/x": b"x\n", "gone": None, "gone/y": b"y\n"}
    rw = {"a": b"new contents\n", "d": None, "d/x": b"x\n", "n": b"added\n"}
    _ext4(tmp_path / "init.img", init, t0)
    _ext4(tmp_path / "rw.img", rw, t0)
    assert run(capsys, "message", str(meta), "create_thin 3", "create_thin 4",
               "set_transaction_id 2 4")[0] == 0
    for dev, img in ((3, "init.img"), (4, "rw.img")):
        assert run(capsys, "write", str(meta), str(data), "--dev-id", str(dev),
                   "-i", str(tmp_path / img))[0] == 0
    md = store / "devicemapper/metadata"
    (md / "transaction-metadata").write_text(json.dumps(
        {"open_transaction_id": 4, "device_hash": "", "device_id": 4}))
    mount = "b" * 64
    for name, dev in ((mount + "-init", 3), (mount, 4)):
        (md / name).write_text(json.dumps({"device_id": dev, "size": 4 << 20,
                                           "transaction_id": dev}))
    cid = "c" * 64
    mdir = store / "image/devicemapper/layerdb/mounts" / cid
    mdir.mkdir(parents=True)
    (mdir / "mount-id").write_text(mount)
    (mdir / "init-id").write_text(mount + "-init")
    (mdir / "parent").write_text(DIFF)
    (store / "containers" / cid).mkdir(parents=True)
    (store / "containers" / cid / "config.v2.json").write_text(json.dumps(
        {"ID": cid, "Name": "/box", "Image": "sha256:" + IMAGE_HEX}))
    rc, out, _ = run(capsys, "docker", "check", str(store))
    assert rc == 0, out
    rc, out, err = run(capsys, "docker", "diff", str(store), "box")
    assert rc == 0, err
    assert out.splitlines() == ["C /a", "A /n", "D /gone"]
    tar = tmp_path / "box.tar"
    assert run(capsys, "docker", "diff", str(store), "box", "-o", str(tar))[0] == 0
    with tarfile.open(tar) as t:
        assert sorted(t.getnames()) == [".wh.gone", "a", "n"]
        f = t.extractfile("a")
        assert f is not None and f.read() == b"new contents\n"
    rc, _, err = run(capsys, "docker", "diff", str(store), "img:1")
    assert rc == 1 and "is an image, not a container" in one_line(err)


def test_output_targets(tmp_path: Path) -> None:
    """-o: a symlink's target is replaced and the link kept; a FIFO is written to, not
    replaced (a rename would turn -o /dev/null into a regular file); a failure leaves
    neither a file nor a temp behind."""
    import threading

    from dmimage.cli._output import atomic_output

    (tmp_path / "real").write_bytes(b"old")
    (tmp_path / "link").symlink_to("real")
    with atomic_output(str(tmp_path / "link")) as f:
        f.write(b"new")
    assert os.readlink(tmp_path / "link") == "real"
    assert (tmp_path / "real").read_bytes() == b"new"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    with atomic_output(str(fifo)) as f:
        f.write(b"through")
    reader.join(timeout=30)
    assert got == [b"through"] and os.path.exists(fifo) and not (tmp_path / "fifo").is_file()
    with pytest.raises(RuntimeError), atomic_output(str(tmp_path / "x")) as f:
        f.write(b"partial")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link", "real"]
