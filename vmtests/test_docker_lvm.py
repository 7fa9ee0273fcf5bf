"""direct-lvm: dockerd 20.10 with ``dm.thinpooldev`` on an LVM thin pool lvm2 made in the guest
(as Docker's direct-lvm guide makes it: VG "docker", pool "thinpool"); then, offline, ``dmimage
docker ls/check/save --lvm DISK docker/thinpool`` read the data root and the VG's disk and must
agree with ``docker inspect`` and the guest's ``docker save``."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmimage.docker.check import check_store
from dmimage.docker.report import ls_data, read_pool_view
from dmimage.docker.save import save
from dmimage.docker.store import open_store
from dmimage.guest.docker import DockerGuest, DockerUnavailable, make_data_disk
from dmimage.guest.kernels import selected_names
from dmimage.guest.pytest_plugin import unavailable
from vmtests.docker_scenario import (
    cp_tar,
    extract_root,
    guest_save,
    input_files,
    inspect_all,
    ops,
    write_inputs,
)

pytestmark = [pytest.mark.vm, pytest.mark.vm_one_kernel]  # dockerd is the oracle (conftest.py)


@pytest.fixture(scope="module", params=selected_names())
def guest(request: pytest.FixtureRequest) -> Iterator[DockerGuest]:
    try:
        dg = DockerGuest.boot(request.param, lvm=True)
    except DockerUnavailable as exc:
        unavailable(str(exc))
    with dg:
        yield dg


def test_direct_lvm_store(guest: DockerGuest, tmp_path: Path) -> None:
    dg = guest
    inputs = write_inputs(tmp_path / "inputs")
    vgdisk = tmp_path / "vg.img"
    with open(vgdisk, "wb") as f:
        f.truncate(256 << 20)
    vg = dg.vm.attach(vgdisk, read_only=False, serial="dockervg")
    dev = vg.guest_path
    dg.vm.sh(f"lvm pvcreate -y {dev} && lvm vgcreate docker {dev} && "
             "lvm lvcreate -y --wipesignatures y -n thinpool docker -l 80%VG && "
             "lvm lvcreate -y --wipesignatures y -n thinpoolmeta docker -l 5%VG && "
             "lvm lvconvert -y --zero n -c 64K --thinpool docker/thinpool "
             "--poolmetadata docker/thinpoolmeta && lvm lvs", timeout=300)
    disk = make_data_disk(tmp_path / "data-root.ext4")
    try:
        dg.start(disk, extra_opts=("dm.thinpooldev=/dev/mapper/docker-thinpool",))
        dg.calls([ops.load("/tmp/app.in"), ops.import_("/tmp/base.in", "base:1"),
                  ops.create("c1", "app:1"),
                  ops.cp("/tmp/cp-note.tar", "c1", "/app/note.txt")],
                 files=input_files(inputs, {"/tmp/cp-note.tar": cp_tar("note.txt")}))
        images, containers, _ = inspect_all(dg)
        rec = guest_save(dg, ["app:1", "base:1"])
    except BaseException:
        (tmp_path / "dockerd.log").write_text(dg.log())
        raise
    dg.stop(unmount=False)
    dg.detach_data(before="lvm vgchange -an docker")
    dg.vm.detach(vg)

    root = extract_root(disk, tmp_path / "root")
    assert not (root / "devicemapper/devicemapper/data").exists()  # no loop files here
    store = open_store(root, lvm=([str(vgdisk)], "docker/thinpool"))
    rep = check_store(store)
    assert rep.ok, [str(p) for p in rep.problems]
    doc = ls_data(store, read_pool_view(store))
    ours = {i["id"]: (sorted(i["tags"]), i["device_id"]) for i in doc["images"]}
    theirs = {i["Id"]: (sorted(i["RepoTags"]), int(i["GraphDriver"]["Data"]["DeviceId"]))
              for i in images}
    assert ours == theirs
    assert {c["id"]: c["device_id"] for c in doc["containers"]} == \
        {c["Id"]: int(c["GraphDriver"]["Data"]["DeviceId"]) for c in containers}
    out = tmp_path / "s.tar"
    with open(out, "wb") as f:
        save(store, ["app:1", "base:1"], f)
    with tarfile.open(out) as t:
        man = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        for m in man:
            for p in [m["Config"], *m["Layers"]]:
                got = hashlib.sha256(t.extractfile(p).read()).hexdigest()  # type: ignore[union-attr]
                assert got == rec["sha256"][p], p
    assert sorted(m["Layers"] for m in man) == sorted(m["Layers"] for m in rec["manifest"])
