"""A Docker devicemapper store written by the real dockerd in the guest, plus what the guest
said about it: the fixture the offline ``dmimage docker`` readers are checked against.

The host writes the inputs (a rootfs tarball for ``docker import``, a two-layer ``docker save``
tarball for ``docker load``); the guest imports, loads, creates containers, copies a file into
one, commits it, removes a container and an image; then records ``docker inspect`` of every
image and container, stops dockerd and hashes every thin device Docker's JSON names with the
kernel's thin target (the pool loop files attached read-only). The data-root disk image is the
result; ``extract_root`` copies the data root out of it with debugfs (no mount, no root).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dmimage.guest.docker import DATA_ROOT, ENV, DockerGuest, make_data_disk


def _tar(files: dict[str, bytes], *, dirs: tuple[str, ...] = ()) -> bytes:
    """A deterministic tar of *files* (mtime 0, root-owned)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            t.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def write_inputs(work: Path) -> dict[str, Path]:
    """base.tar (for import), app.tar (a ``docker save`` tarball with two layers: for load),
    note.txt (for cp)."""
    work.mkdir(parents=True, exist_ok=True)
    base = _tar({"etc/os-release": b"NAME=dmimage-test\n", "bin/hello": b"#!/bin/sh\necho hi\n",
                 "usr/share/blob": bytes(range(256)) * 300}, dirs=("etc", "bin", "usr",
                                                                    "usr/share"))
    (work / "base.tar").write_bytes(base)
    layers = [
        _tar({"app/one.txt": b"layer one\n" * 50}, dirs=("app",)),
        _tar({"app/two.txt": b"layer two\n" * 70, "app/.wh.one.txt": b""}, dirs=("app",)),
    ]
    diff_ids = ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/hello"], "Env": ["PATH=/bin"]},
        "created": "2024-01-01T00:00:00Z",
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "layer one"},
                    {"created": "2024-01-01T00:00:00Z", "created_by": "layer two"}],
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }, separators=(",", ":")).encode()
    cid = hashlib.sha256(config).hexdigest()
    files = {f"{cid}.json": config}
    names = []
    for i, layer in enumerate(layers):
        files[f"l{i}/layer.tar"] = layer
        files[f"l{i}/VERSION"] = b"1.0"
        names.append(f"l{i}/layer.tar")
    files["manifest.json"] = json.dumps(
        [{"Config": f"{cid}.json", "RepoTags": ["app:1"], "Layers": names}]).encode()
    (work / "app.tar").write_bytes(_tar(files, dirs=("l0", "l1")))
    (work / "note.txt").write_bytes(b"written by docker cp\n")
    return {"base": work / "base.tar", "app": work / "app.tar", "note": work / "note.txt"}


@dataclass
class GuestRecord:
    """What the guest said: ``docker inspect`` of images and containers, and the sha256 of
    every thin device (by device_id) read through the kernel's thin target."""

    images: list[dict[str, Any]] = field(default_factory=list)
    containers: list[dict[str, Any]] = field(default_factory=list)
    device_sha256: dict[int, str] = field(default_factory=dict)
    device_size: dict[int, int] = field(default_factory=dict)
    #: The random run's commands and exit codes.
    ops: list[str] = field(default_factory=list)
    #: `docker diff` of every container, by name.
    diffs: dict[str, list[str]] = field(default_factory=dict)
    #: `docker save` of every tagged image: {"manifest": [...], "sha256": {member: hex}}.
    save: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def inspect_all(dg: DockerGuest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``docker inspect`` of every image (``image ls -a``) and every container (``ps -a``),
    from dockerd's API: the same JSON objects the CLI prints."""
    images, containers = dg.api("/images/json?all=1", "/containers/json?all=1")
    ids = list(dict.fromkeys(i["Id"] for i in images))
    cids = [c["Id"] for c in containers]
    docs = dg.api(*(f"/images/{i}/json" for i in ids),
                  *(f"/containers/{c}/json" for c in cids))
    return docs[:len(ids)], docs[len(ids):]


def docker_diff(dg: DockerGuest, container: str) -> list[str]:
    """``docker diff`` lines ("A /path", "C ...", "D ...") from the API's changes."""
    changes = dg.api(f"/containers/{container}/changes")[0] or []
    return [f"{'CAD'[c['Kind']]} {c['Path']}" for c in changes]


def _put_inputs(dg: DockerGuest, inputs: dict[str, Path]) -> None:
    """The inputs as /tmp/NAME.in in the guest."""
    dg.put({f"/tmp/{name}.in": p for name, p in inputs.items()},
           next(iter(inputs.values())).parent)


def run_docker_ops(dg: DockerGuest, inputs: dict[str, Path], *, full: bool = True) -> None:
    """import, load, create, cp (a new file, an overwrite), commit, rm, rmi: leaves 3 images,
    2 containers, 1 rmi'd. Without *full*, only what puts files on the devices' filesystems
    (import, load with its whiteout, create, cp, commit, tag): the xfs run, where removing a
    device (rm, rmi) is the same pool message as with ext4 and the store run has it."""
    _put_inputs(dg, inputs)
    dg.docker("import /tmp/base.in base:1")
    dg.docker("load -i /tmp/app.in")
    if full:
        dg.docker("import /tmp/base.in gone:1")
    dg.docker("create --name c1 app:1")
    dg.docker("cp /tmp/note.in c1:/app/note.txt")
    dg.docker("commit c1 app:2")
    if full:
        dg.docker("create --name c2 base:1 /bin/hello")
    dg.docker("create --name c3 app:2")
    dg.docker("cp /tmp/note.in c3:/app/two.txt")
    if full:
        dg.docker("rm c2")
    dg.docker("tag app:2 app:latest")
    if full:
        dg.docker("rmi gone:1")


def run_random_ops(dg: DockerGuest, inputs: dict[str, Path], seed: int, n: int = 12
                   ) -> list[str]:
    """*n* operations drawn from import, load, create, cp, commit, rm and rmi (seeded); an
    operation Docker refuses (rmi of an image a container uses) is part of the run. Returns
    the commands, for the failure message."""
    import random

    rng = random.Random(seed)
    _put_inputs(dg, inputs)
    tags: list[str] = []
    containers: list[str] = []
    done: list[str] = []
    for i in range(n):
        ops = ["import", "load"]
        if tags:
            ops += ["create"] * 3 + ["rmi"]
        if containers:
            ops += ["cp", "cp", "commit", "commit", "rm"]
        op = rng.choice(ops)
        if op == "import":
            tags.append(f"imp{i}:1")
            cmd = f"import /tmp/base.in {tags[-1]}"
        elif op == "load":
            cmd = "load -i /tmp/app.in"
            if "app:1" not in tags:
                tags.append("app:1")
        elif op == "create":
            containers.append(f"r{i}")
            cmd = f"create --name r{i} {rng.choice(tags)} /bin/hello"
        elif op == "rmi":
            cmd = f"rmi {tags.pop(rng.randrange(len(tags)))}"
        elif op == "cp":
            cmd = f"cp /tmp/note.in {rng.choice(containers)}:/note{i}.txt"
        elif op == "commit":
            tags.append(f"com{i}:1")
            cmd = f"commit {rng.choice(containers)} {tags[-1]}"
        else:
            cmd = f"rm {containers.pop(rng.randrange(len(containers)))}"
        res = dg.vm.run(ENV + f"docker {cmd}", timeout=180)
        done.append(f"docker {cmd} -> {res.returncode}")
        if not res.ok and not cmd.startswith("rmi"):
            raise AssertionError(f"seed {seed}: {done[-1]}: {res.stderr!r}")
    dg.docker("import /tmp/base.in last:1")  # at least one tag for `docker save`
    done.append("docker import /tmp/base.in last:1 -> 0")
    return done


def guest_save(dg: DockerGuest, refs: list[str]) -> dict[str, Any]:
    """`docker save` in the guest (dockerd's ``GET /images/get``, which the CLI calls); its
    manifest and the sha256 of every member file (a layer whose diff id was already saved is
    a symlink to the first copy: sha256sum follows it)."""
    dg.download("/images/get?" + "&".join(f"names={quote(r)}" for r in refs), "/tmp/g.tar")
    out = dg.sh("rm -rf /tmp/gs && mkdir /tmp/gs && cd /tmp/gs && tar xf /tmp/g.tar && "
                "find . -type f -o -type l | sort | xargs sha256sum && rm -f /tmp/g.tar")
    sums = {}
    for line in out.splitlines():
        h, name = line.split(None, 1)
        sums[name.removeprefix("./")] = h
    manifest = json.loads(dg.sh("cat /tmp/gs/manifest.json && rm -rf /tmp/gs"))
    return {"manifest": manifest, "sha256": sums}


def hash_devices(dg: DockerGuest) -> tuple[dict[int, str], dict[int, int]]:
    """With dockerd stopped and the data root mounted: activate the loop-lvm pool read-only
    and hash every device the JSON files name (deleted ones too, while they exist)."""
    script = f"""
set -e
cd {DATA_ROOT}/devicemapper
d=$(losetup -f); losetup -r $d devicemapper/data
m=$(losetup -f); losetup -r $m devicemapper/metadata
sectors=$(($(blockdev --getsize64 $d) / 512))
dmsetup create hpool --table "0 $sectors thin-pool $m $d 128 0 2 read_only skip_block_zeroing"
for f in metadata/*; do
  case ${{f##*/}} in deviceset-metadata|transaction-metadata|.*) continue;; esac
  id=$(sed 's/.*"device_id":\\([0-9]*\\).*/\\1/' $f)
  size=$(sed 's/.*"size":\\([0-9]*\\).*/\\1/' $f)
  if dmsetup create ht$id --table "0 $((size / 512)) thin /dev/mapper/hpool $id" 2>/dev/null
  then echo "$id $size $(sha256sum < /dev/mapper/ht$id | cut -d' ' -f1)"; dmsetup remove ht$id
  fi
done
dmsetup remove hpool; losetup -d $d; losetup -d $m
"""
    hashes: dict[int, str] = {}
    sizes: dict[int, int] = {}
    for line in dg.sh(script, timeout=600).splitlines():
        i, size, h = line.split()
        hashes[int(i)] = h
        sizes[int(i)] = int(size)
    return hashes, sizes


#: dm.fs=xfs: mkfs.xfs (xfsprogs 6.1) wants at least 300 MB, so the devices are bigger and not
#: hashed (that would read gigabytes under TCG); ls, save and diff are still compared.
XFS_OPTS = ("dm.fs=xfs", "dm.basesize=320M")


def make_store(dg: DockerGuest, work: Path, *, fs: str = "ext4", seed: int | None = None
               ) -> tuple[Path, GuestRecord]:
    """Run the whole scenario; returns the data-root disk image and the guest's record.
    With *fs* "xfs" the devices hold xfs and are not hashed; with *seed*, a random sequence
    of operations replaces the fixed one."""
    t = [time.monotonic()]
    rec = GuestRecord()

    def lap(name: str) -> None:
        t.append(time.monotonic())
        rec.seconds[name] = round(t[-1] - t[-2], 1)

    inputs = write_inputs(work / "inputs")
    disk = make_data_disk(work / "data-root.ext4")
    dg.start(disk, extra_opts=XFS_OPTS if fs == "xfs" else ())
    lap("start dockerd")
    try:
        if seed is None:
            run_docker_ops(dg, inputs, full=fs == "ext4")
        else:
            rec.ops = run_random_ops(dg, inputs, seed)
        lap("docker operations")
        rec.images, rec.containers = inspect_all(dg)
        lap("inspect")
        rec.diffs = {c["Name"].lstrip("/"): docker_diff(dg, c["Id"]) for c in rec.containers}
        rec.save = guest_save(dg, sorted({t for i in rec.images for t in i["RepoTags"]}))
        lap("docker save")
    except BaseException:
        (work / "dockerd.log").write_text(dg.log())
        raise
    dg.stop(unmount=False)
    lap("stop dockerd")
    if fs == "ext4":
        rec.device_sha256, rec.device_size = hash_devices(dg)
        lap("hash devices")
    dg.detach_data()
    rec.seconds["total"] = round(time.monotonic() - t[0], 1)
    (work / "guest-record.json").write_text(json.dumps(rec.__dict__, indent=1))
    return disk, rec


def kill_during_import(dg: DockerGuest, work: Path, delay: float) -> Path:
    """A fresh store with one imported image; then dockerd is killed (SIGKILL) *delay* seconds
    into a second `docker import` of an 8 MB tarball made in the guest. Returns the disk."""
    inputs = write_inputs(work / "inputs")
    disk = make_data_disk(work / "killed.ext4")
    dg.start(disk)
    _put_inputs(dg, {"base": inputs["base"]})
    dg.docker("import /tmp/base.in base:1")
    dg.sh("rm -rf /tmp/k && mkdir -p /tmp/k/data && head -c 8000000 /dev/urandom > "
          "/tmp/k/data/blob && tar cf /tmp/big.tar -C /tmp/k data", timeout=120)
    dg.sh(f"(docker import /tmp/big.tar big:1 >/dev/null 2>&1 &); sleep {delay:.2f}; "
          "kill -KILL $(cat /tmp/dockerd.pid)", timeout=60)
    dg.stop(kill=True)
    return disk


def restart_and_inspect(dg: DockerGuest, disk: Path) -> GuestRecord:
    """Start dockerd on *disk* again (it processes what the kill left), inspect, stop."""
    rec = GuestRecord()
    dg.start(disk)
    rec.images, rec.containers = inspect_all(dg)
    dg.stop()
    return rec


def extract_root(disk: Path, dest: Path) -> Path:
    """Copy the data root out of the ext4 disk image with debugfs ``rdump`` (no mount)."""
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(disk)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0 or not (dest / "devicemapper").is_dir():
        raise RuntimeError(f"debugfs rdump of {disk} failed: {res.stderr.strip()[-500:]}")
    return dest
