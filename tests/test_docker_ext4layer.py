"""The ext4 layer writer (``dmimage.docker.ext4layer``) against moby's createTarFile where an
earlier version differed: times set through system.Chtimes (outside 1970..2262: the epoch;
a directory's final atime the header's own), and rootfs/ set back to 0755 and root at every
layer's mount, as the driver's Get does. The oracle is debugfs's own ``stat``."""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from dmimage.docker.ext4layer import Tree, apply_layer, first_layer_setup, make_base
from dmimage.docker.tarsplit import disassemble

EPOCH = 1_700_000_000
MTIME = 1_600_000_000


def _tar(members: list[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti in members:
            data = b"x\n" if ti.isreg() else b""
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def _ti(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, mtime: int = MTIME,
        pax: dict[str, str] | None = None, owner: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, mtime, owner, owner
    ti.pax_headers = dict(pax or {})
    return ti


def _stat(image: Path, path: str) -> dict[str, int]:
    """mode, uid, gid and the seconds of atime and mtime, as debugfs reads the inode."""
    out = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True,
                         text=True, check=True).stdout
    got: dict[str, int] = {}
    m = re.search(r"Mode:\s+0?(\d+)", out)
    assert m, out
    got["mode"] = int(m.group(1), 8)
    for key in ("User", "Group"):
        m = re.search(rf"{key}:\s+(\d+)", out)
        assert m, out
        got[key.lower()] = int(m.group(1))
    for key in ("atime", "mtime"):
        m = re.search(rf"\b{key}: 0x([0-9a-f]+)(?::([0-9a-f]+))?", out)
        assert m, out
        lo = int(m.group(1), 16)
        secs = lo - (1 << 32) if lo & (1 << 31) else lo
        if m.group(2):
            secs += (int(m.group(2), 16) & 3) << 32
        got[key] = secs
    return got


def _layers(tmp_path: Path, tars: list[list[tarfile.TarInfo]]) -> Path:
    return apply_raw_layers(tmp_path, [_tar(members) for members in tars])


def apply_raw_layers(tmp_path: Path, raws: list[bytes]) -> Path:
    """A base ext4 image (dockerd's mkfs, first layer's rootfs/) with the layer tars *raws*
    applied in order by the ext4 builder; the image's path."""
    tmp_path.mkdir(exist_ok=True)
    img = tmp_path / "base.img"
    make_base(img, 16 << 20, "0f8f0de5-8b5e-4d9b-9b2a-5d1b1a5f7c01",
              "5b0b5c8e-4d7e-4c43-9f57-6d8d0c1f4a11", EPOCH)
    first_layer_setup(img, "h" * 64, tmp_path, EPOCH)
    tree = Tree()
    work = tmp_path / "apply"
    work.mkdir()
    for i, raw in enumerate(raws):
        lf = tmp_path / f"l{i}.tar"
        lf.write_bytes(raw)
        _ts, ms, _n = disassemble(str(lf), f"layer {i}")
        apply_layer(img, lf, ms, tree, work, epoch=EPOCH, where=f"layer {i}")
    return img


def test_times_outside_unix_time_become_the_epoch(tmp_path: Path) -> None:
    img = _layers(tmp_path, [[
        _ti("old", mtime=-86400),
        _ti("d", tarfile.DIRTYPE, mode=0o755, mtime=-5),
        _ti("e", tarfile.DIRTYPE, mode=0o755),
        _ti("f", tarfile.DIRTYPE, mode=0o755, pax={"atime": "1500000000"}),
        _ti("far", pax={"mtime": "9300000000"}),
        _ti("new")]])

    def times(p: str) -> tuple[int, int]:
        st = _stat(img, f"/rootfs/{p}")
        return st["atime"], st["mtime"]

    assert times("old") == (0, 0)
    assert times("d") == (0, 0)
    assert times("e") == (0, MTIME)
    assert times("f") == (1_500_000_000, MTIME)
    assert times("far") == (0, 0)
    assert times("new") == (MTIME, MTIME)


@pytest.mark.parametrize("child_sets_root", [False, True])
def test_every_mount_resets_rootfs_as_dockerds_get(tmp_path: Path,
                                                   child_sets_root: bool) -> None:
    """A parent layer's "./" (0700, owner 1000) stays on its own device; the child's mount
    (the driver's Get: MkdirAllAndChown(rootfs, 0755, root)) sets it back before the
    child's layer is applied, unless that layer sets it again."""
    one = [_ti(".", tarfile.DIRTYPE, mode=0o700, owner=1000), _ti("x")]
    two = [_ti("y")]
    if child_sets_root:
        two.insert(0, _ti(".", tarfile.DIRTYPE, mode=0o750, owner=7))
    img = _layers(tmp_path, [one])
    st = _stat(img, "/rootfs")
    assert (st["mode"] & 0o7777, st["user"], st["group"]) == (0o700, 1000, 1000)
    img = _layers(tmp_path / "two", [one, two])
    st = _stat(img, "/rootfs")
    want = (0o750, 7, 7) if child_sets_root else (0o755, 0, 0)
    assert (st["mode"] & 0o7777, st["user"], st["group"]) == want
