"""`dmimage build` proven under a real kernel: the example GPT image hot-plugged as one virtio
disk, activated by its own activate.sh (partitions found by PARTUUID, busybox only), every
thin's sha256 = manifest, tables round-trip through dmsetup, ext4 volumes mount and every
file matches; a writable copy takes a container write, after which dmimage check and
thin_check 1.1 pass on the metadata partition and the image layers are unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dmimage.guest.machine import Machine
from dmimage.guest.pytest_plugin import unavailable
from dmimage.image import build, load_spec
from dmimage.image.gpt import extract
from dmimage.image.guest import GuestReport, verify_build
from dmimage.thin.check import check_metadata
from dmimage.thin.export import export_thin
from dmimage.thin.pool import open_pool

import oracles

pytestmark = pytest.mark.vm

EXAMPLE = Path(__file__).resolve().parent.parent / "images" / "example.toml"


@pytest.fixture(scope="session")
def tools11() -> oracles.Tools:
    try:
        return oracles.tools_11()
    except oracles.OracleUnavailable as exc:
        unavailable(f"thin-provisioning-tools 1.1: {exc}")


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("build") / "example"
    m = build(load_spec(EXAMPLE), out).manifest
    return out, m


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_ok(rep: GuestReport) -> None:
    assert rep.ok, "\n".join(rep.lines())


def test_example_read_only(dm_vm: Machine, example: tuple[Path, dict[str, Any]]) -> None:
    """Read-only disk, `activate.sh -r` (thin-pool read_only): everything matches; the image
    is not changed."""
    out, m = example
    rep = verify_build(dm_vm, out, read_only=True)
    _assert_ok(rep)
    assert "ro" in rep.pool_status.split()
    names = {c.what for c in rep.checks}
    for d in m["devices"]:
        assert {f"sha256 {d['dm_name']}", f"table {d['dm_name']}",
                f"files {d['dm_name']}"} <= names
    assert f"table {m['pool']['name']}" in names
    assert _sha(out / "example.img") == m["image"]["sha256"]


def test_example_writable_copy(dm_vm: Machine, example: tuple[Path, dict[str, Any]],
                               tmp_path: Path, tools11: oracles.Tools) -> None:
    """A writable copy, pool read-write: the same checks; then a write through the container
    (mounted read-write); afterwards the metadata partition passes dmimage check and
    thin_check 1.1, the layers still export to their manifest hashes and the container holds
    the new file."""
    out, m = example
    img = tmp_path / "copy.img"
    shutil.copyfile(out / "example.img", img)
    written: list[str] = []

    def write_container(vm: Machine) -> None:
        """After the checks, before activate.sh's own deactivate.sh: one activation."""
        vm.sh("mkdir -p /mnt/c && mount -t ext4 /dev/mapper/example-container /mnt/c && "
              "echo 'written in the container' > /mnt/c/etc/motd && "
              "rm /mnt/c/etc/hostname && umount /mnt/c", timeout=120)
        written.append("container")

    rep = verify_build(dm_vm, out, read_only=False, image=img, while_active=write_container)
    _assert_ok(rep)
    assert " rw " in f" {rep.pool_status} "
    assert written == ["container"]
    assert "deactivate.sh" in {c.what for c in rep.checks}  # the pool was torn down after it

    meta, data = tmp_path / "meta", tmp_path / "data"
    for role, dst in (("metadata", meta), ("data", data)):
        p = next(p for p in m["partitions"] if p["role"] == role)
        extract(str(img), p["start"], p["size"], str(dst))
    report = check_metadata(meta)
    assert report.ok(False), report.problems
    rc, so, se = oracles.check(meta, tools11)
    assert rc == 0, (so, se)
    with open_pool(meta) as pool:
        assert pool.superblock.trans_id == m["pool"]["transaction_id"]
        for d in m["devices"]:
            dst = tmp_path / f"{d['name']}.img"
            export_thin(pool, data, d["id"], str(dst), size=d["size"])
            if d["name"] != "container":
                assert _sha(dst) == d["sha256"], d["name"]
            else:
                assert _sha(dst) != d["sha256"]
                subprocess.run(["e2fsck", "-fn", str(dst)], check=True, capture_output=True)
                cat = subprocess.run(["debugfs", "-R", "cat /etc/motd", str(dst)],
                                     capture_output=True, text=True, check=True).stdout
                assert cat == "written in the container\n"
                ls = subprocess.run(["debugfs", "-R", "ls -l /etc", str(dst)],
                                    capture_output=True, text=True, check=True).stdout
                assert "hostname" not in ls
    assert json.loads((out / "manifest.json").read_text()) == m


def test_files_layout(dm_vm: Machine, tmp_path: Path) -> None:
    """layout = "files": metadata and data attached as two disks, passed to activate.sh;
    a raw volume, an ext4 volume from a directory and a raw layer over the raw volume."""
    import os

    tree = tmp_path / "tree"
    (tmp_path / "tree" / "d").mkdir(parents=True)
    (tree / "d" / "f.bin").write_bytes(os.urandom(300_000))
    (tree / "hello").write_text("hello\n")
    raw = bytearray(os.urandom(4 << 20))
    raw[1 << 20:3 << 20] = bytes(2 << 20)  # a zero hole: not provisioned
    (tmp_path / "raw.img").write_bytes(bytes(raw))
    raw[0:131072] = bytes(131072)  # the layer zeroes data block 0 (discard), changes block 20
    raw[40 * 65536:41 * 65536] = os.urandom(65536)
    (tmp_path / "layer.img").write_bytes(bytes(raw))
    (tmp_path / "s.toml").write_text('''
name = "f"
layout = "files"
[pool]
data_block_size = "128KiB"
data_size = "16MiB"
[[volumes]]
name = "raw"
id = 0
size = "4MiB"
content = "raw.img"
[[volumes]]
name = "fs"
id = 5
size = "4MiB"
content = { type = "ext4", dirs = "tree" }
[[volumes]]
name = "layer"
id = 6
origin = "raw"
content = "layer.img"
''')
    out = tmp_path / "out"
    m = build(load_spec(tmp_path / "s.toml"), out).manifest
    d = {x["name"]: x for x in m["devices"]}
    assert d["layer"]["blocks_discarded"] == 1 and d["layer"]["blocks_written"] == 1
    rep = verify_build(dm_vm, out, read_only=True)
    _assert_ok(rep)
    assert "files f-fs: 2 files match" in "\n".join(rep.lines())
