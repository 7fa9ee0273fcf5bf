"""A Docker devicemapper store written by the real dockerd in the guest, plus what the guest
said about it: the fixture the offline ``dmimage docker`` readers are checked against.

The host writes the inputs (a rootfs tarball for ``docker import``, a two-layer ``docker save``
tarball for ``docker load``); the guest imports, loads, creates containers, copies a file into
one, commits it, removes a container and an image; then records ``docker inspect`` of every
image and container, stops dockerd and hashes every thin device Docker's JSON names with the
kernel's thin target (the pool loop files attached read-only). The data-root disk image is the
result; ``extract_root`` copies the data root out of it with debugfs (no mount, no root), the
pool's sparse loop files by their extents.

The operations are the Engine API requests the docker CLI sends for them (``ops``), sent in
one guest command (``DockerGuest.calls``): dockerd does the same work, without a CLI start-up
(about a second of the guest's CPU under TCG) per operation.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shlex
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from dmimage.guest.docker import (
    API_CLIENT,
    DATA_ROOT,
    WAIT_FIFO,
    Call,
    DockerGuest,
    make_data_disk,
)


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
    (work / "note.txt").write_bytes(NOTE)
    return {"base": work / "base.tar", "app": work / "app.tar", "note": work / "note.txt"}


#: The file the scenarios copy into containers.
NOTE = b"written by docker cp\n"


def cp_tar(name: str, data: bytes = NOTE) -> bytes:
    """The archive ``docker cp FILE CONTAINER:DIR/NAME`` sends (``PUT .../archive?path=DIR``):
    one regular file, renamed to the destination's base name as the CLI renames it."""
    return _tar({name: data})


class ops:  # noqa: N801 (a namespace of Call builders, read as ops.create(...))
    """The Engine API request the docker CLI (20.10) sends for each operation; *label* is
    the docker command it stands for. Query parameters are the CLI's."""

    @staticmethod
    def import_(src: str, ref: str) -> Call:
        q = urlencode({"fromSrc": "-", "repo": ref, "tag": "", "message": ""})
        return Call("POST", f"/images/create?{q}", f"import {src} {ref}", body=src)

    @staticmethod
    def load(src: str) -> Call:
        return Call("POST", "/images/load?quiet=1", f"load -i {src}", body=src,
                    ctype="application/x-tar")

    @staticmethod
    def create(name: str, image: str, *cmd: str) -> Call:
        config: dict[str, Any] = {"Image": image, "AttachStdout": True, "AttachStderr": True,
                                  "HostConfig": {"NetworkMode": "default"},
                                  "NetworkingConfig": {"EndpointsConfig": {}}}
        if cmd:
            config["Cmd"] = list(cmd)
        return Call("POST", f"/containers/create?{urlencode({'name': name})}",
                    f"create --name {name} {image} {' '.join(cmd)}".rstrip(),
                    data=json.dumps(config), ctype="application/json")

    @staticmethod
    def cp(tar: str, container: str, dest: str) -> Call:
        """*tar*: a guest file made by ``cp_tar`` with *dest*'s base name."""
        q = urlencode({"path": dest.rsplit("/", 1)[0] or "/", "noOverwriteDirNonDir": "true"})
        return Call("PUT", f"/containers/{container}/archive?{q}",
                    f"cp {tar} {container}:{dest}", body=tar)

    @staticmethod
    def commit(container: str, ref: str) -> Call:
        repo, tag = ref.rsplit(":", 1)
        q = urlencode({"container": container, "repo": repo, "tag": tag, "comment": "",
                       "author": ""})
        return Call("POST", f"/commit?{q}", f"commit {container} {ref}")

    @staticmethod
    def tag(image: str, ref: str) -> Call:
        repo, tag = ref.rsplit(":", 1)
        return Call("POST", f"/images/{image}/tag?{urlencode({'repo': repo, 'tag': tag})}",
                    f"tag {image} {ref}")

    @staticmethod
    def rm(container: str) -> Call:
        return Call("DELETE", f"/containers/{container}", f"rm {container}")

    @staticmethod
    def rmi(image: str) -> Call:
        """A refusal (409: a container uses the image) is an answer, as the CLI's exit 1."""
        return Call("DELETE", f"/images/{image}", f"rmi {image}", refusal_ok=True)


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


def inspect_all(dg: DockerGuest, *, diffs: bool = False
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, list[str]]]:
    """``docker inspect`` of every image (``image ls -a``) and every container (``ps -a``),
    from dockerd's API: the same JSON objects the CLI prints; with *diffs*, also ``docker
    diff`` of every container (by name), in the same guest command as the inspects."""
    images, containers = dg.api("/images/json?all=1", "/containers/json?all=1")
    ids = list(dict.fromkeys(i["Id"] for i in images))
    cids = [c["Id"] for c in containers]
    docs = dg.api(*(f"/images/{i}/json" for i in ids),
                  *(f"/containers/{c}/json" for c in cids),
                  *(f"/containers/{c}/changes" for c in (cids if diffs else [])))
    n = len(ids) + len(cids)
    inspected = docs[len(ids):n]
    changes = {c["Name"].lstrip("/"): _diff_lines(ch)
               for c, ch in zip(inspected, docs[n:], strict=False)}
    return docs[:len(ids)], inspected, changes


def _diff_lines(changes: list[dict[str, Any]] | None) -> list[str]:
    """``docker diff`` lines ("A /path", "C ...", "D ...") from the API's changes."""
    return [f"{'CAD'[c['Kind']]} {c['Path']}" for c in changes or []]


def input_files(inputs: dict[str, Path], extra: dict[str, bytes] | None = None
                ) -> dict[str, Path]:
    """``{guest path: host file}`` for ``DockerGuest.put`` or ``calls``: the inputs as
    /tmp/NAME.in, and *extra* ``{guest path: bytes}`` (the archives ``docker cp`` sends)."""
    files = {f"/tmp/{name}.in": p for name, p in inputs.items()}
    work = next(iter(inputs.values())).parent
    for i, (guest, data) in enumerate((extra or {}).items()):
        host = work / f"extra.{i}"
        host.write_bytes(data)
        files[guest] = host
    return files


def run_docker_ops(dg: DockerGuest, inputs: dict[str, Path], *, full: bool = True) -> None:
    """import, load, create, cp (a new file, an overwrite), commit, rm, rmi: leaves 3 images,
    2 containers, 1 rmi'd. Without *full*, only what puts files on the devices' filesystems
    (import, load with its whiteout, create, cp, commit, tag): the xfs run, where removing a
    device (rm, rmi) is the same pool message as with ext4 and the store run has it."""
    files = input_files(inputs, {"/tmp/cp-note.tar": cp_tar("note.txt"),
                                 "/tmp/cp-two.tar": cp_tar("two.txt")})
    seq = [ops.import_("/tmp/base.in", "base:1"), ops.load("/tmp/app.in")]
    if full:
        seq.append(ops.import_("/tmp/base.in", "gone:1"))
    seq += [ops.create("c1", "app:1"), ops.cp("/tmp/cp-note.tar", "c1", "/app/note.txt"),
            ops.commit("c1", "app:2")]
    if full:
        seq.append(ops.create("c2", "base:1", "/bin/hello"))
    seq += [ops.create("c3", "app:2"), ops.cp("/tmp/cp-two.tar", "c3", "/app/two.txt")]
    if full:
        seq.append(ops.rm("c2"))
    seq.append(ops.tag("app:2", "app:latest"))
    if full:
        seq.append(ops.rmi("gone:1"))
    for call, reply in zip(seq, dg.calls(seq, files=files), strict=True):
        if not reply.ok:  # an rmi refused: not expected here
            raise AssertionError(f"docker {call.label}: {reply.status} {reply.body!r}")


def random_ops(seed: int, n: int = 12) -> list[Call]:
    """*n* operations drawn from import, load, create, cp, commit, rm and rmi (seeded), then
    an import (at least one tag for ``docker save``). The draw does not depend on dockerd's
    answers, so the whole sequence is known in advance; an operation Docker refuses (rmi of
    an image a container uses) is part of the run."""
    import random

    rng = random.Random(seed)
    tags: list[str] = []
    containers: list[str] = []
    seq: list[Call] = []
    for i in range(n):
        choices = ["import", "load"]
        if tags:
            choices += ["create"] * 3 + ["rmi"]
        if containers:
            choices += ["cp", "cp", "commit", "commit", "rm"]
        op = rng.choice(choices)
        if op == "import":
            tags.append(f"imp{i}:1")
            seq.append(ops.import_("/tmp/base.in", tags[-1]))
        elif op == "load":
            seq.append(ops.load("/tmp/app.in"))
            if "app:1" not in tags:
                tags.append("app:1")
        elif op == "create":
            containers.append(f"r{i}")
            seq.append(ops.create(f"r{i}", rng.choice(tags), "/bin/hello"))
        elif op == "rmi":
            seq.append(ops.rmi(tags.pop(rng.randrange(len(tags)))))
        elif op == "cp":
            seq.append(ops.cp(f"/tmp/cp{i}.tar", rng.choice(containers), f"/note{i}.txt"))
        elif op == "commit":
            tags.append(f"com{i}:1")
            seq.append(ops.commit(rng.choice(containers), tags[-1]))
        else:
            seq.append(ops.rm(containers.pop(rng.randrange(len(containers)))))
    seq.append(ops.import_("/tmp/base.in", "last:1"))
    return seq


def run_random_ops(dg: DockerGuest, inputs: dict[str, Path], seed: int, n: int = 12
                   ) -> list[str]:
    """``random_ops`` in the guest, in one command. Returns the commands with the CLI's exit
    code each would have given, for the failure message."""
    seq = random_ops(seed, n)
    tars = {c.body: cp_tar(c.label.rsplit("/", 1)[1])  # "cp TAR CONTAINER:/NAME"
            for c in seq if c.method == "PUT" and c.body}
    try:
        replies = dg.calls(seq, files=input_files(inputs, tars))
    except Exception as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc
    return [f"docker {c.label} -> {0 if r.ok else 1}" for c, r in zip(seq, replies, strict=True)]


def save_record(tar: bytes) -> dict[str, Any]:
    """A ``docker save`` tarball's manifest and the sha256 of every member file; a layer
    whose diff id was already saved is a symlink to the first copy, hashed as its target."""
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = {m.name.removeprefix("./"): m for m in t.getmembers()}

        def content(name: str, hops: int = 0) -> bytes:
            m = members[name]
            if m.issym() and hops < 8:
                return content(posixpath.normpath(posixpath.join(posixpath.dirname(name),
                                                                 m.linkname)), hops + 1)
            f = t.extractfile(m)
            if f is None:
                raise ValueError(f"docker save: {name} is not a file")
            return f.read()

        sums = {n: hashlib.sha256(content(n)).hexdigest()
                for n, m in members.items() if m.isfile() or m.issym()}
        manifest = json.loads(content("manifest.json"))
    return {"manifest": manifest, "sha256": sums}


def save_path(refs: list[str]) -> str:
    """The API request of ``docker save REFS...``."""
    return "/images/get?" + "&".join(f"names={quote(r)}" for r in refs)


def guest_save(dg: DockerGuest, refs: list[str]) -> dict[str, Any]:
    """`docker save` in the guest (dockerd's ``GET /images/get``, which the CLI calls),
    brought to the host: ``save_record`` of it."""
    return save_record(dg.fetch(save_path(refs))[0])


def hash_devices(dg: DockerGuest) -> tuple[dict[int, str], dict[int, int]]:
    """With dockerd stopped and the data root mounted: activate the loop-lvm pool read-only
    and every device the JSON files name (deleted ones too, while they exist), and hash them
    through the kernel's thin target (``Machine.sha256_many``: the guest copies each device
    to a scratch disk, the host hashes the copy). The devices stay active until
    ``unhash_devices`` (run with the next guest command)."""
    script = f"""
set -e
cd {DATA_ROOT}/devicemapper
d=$(losetup -f); losetup -r $d devicemapper/data
m=$(losetup -f); losetup -r $m devicemapper/metadata
echo "$d $m" > /tmp/hpool.loops
sectors=$(($(blockdev --getsize64 $d) / 512))
dmsetup create hpool --table "0 $sectors thin-pool $m $d 128 0 2 read_only skip_block_zeroing"
# Every device JSON's id and size (read with shell builtins: no process per file), then all
# thins in one dmsetup; if one of them is not in the pool, one at a time, skipping it.
spec=; list=
for f in metadata/*; do
  case ${{f##*/}} in deviceset-metadata|transaction-metadata|.*) continue;; esac
  read -r j < $f || true
  id=${{j#*'"device_id":'}}; id=${{id%%[!0-9]*}}
  size=${{j#*'"size":'}}; size=${{size%%[!0-9]*}}
  spec="$spec;ht$id,,,,0 $((size / 512)) thin /dev/mapper/hpool $id"
  list="$list $id:$size"
done
if [ -n "$list" ] && dmsetup create --concise "${{spec#;}}" 2>/dev/null; then
  for x in $list; do echo "${{x%:*}} ${{x#*:}}"; done
else
  for x in $list; do
    id=${{x%:*}}; size=${{x#*:}}
    dmsetup remove ht$id 2>/dev/null || true
    if dmsetup create ht$id --table "0 $((size / 512)) thin /dev/mapper/hpool $id" 2>/dev/null
    then echo "$id $size"
    fi
  done
fi
"""
    sizes: dict[int, int] = {}
    for line in dg.sh(script, timeout=600).splitlines():
        i, size = line.split()
        sizes[int(i)] = int(size)
    ids = sorted(sizes)
    digests = dg.vm.sha256_many([(f"/dev/mapper/ht{i}", sizes[i]) for i in ids])
    return dict(zip(ids, digests, strict=True)), sizes


#: Removes what ``hash_devices`` activated.
UNHASH_DEVICES = ('cd /dev/mapper; set -- ht*; [ -e "$1" ] || set --; dmsetup remove "$@" hpool; '
                  "cd /tmp; read -r d m < /tmp/hpool.loops; losetup -d $d; losetup -d $m")


#: The ext4 scenarios' devices: 8 MiB (the default 16 MiB of ``STORAGE_OPTS`` is what the
#: built stores of ``test_dockerd_runs_built_store`` carry). Every device is copied out of the
#: guest whole to be hashed: half the size, half that copy; the files put on them take well
#: under 1 MiB.
EXT4_OPTS = ("dm.basesize=8M",)

#: dm.fs=xfs: mkfs.xfs (xfsprogs 6.1) wants at least 300 MB, so the devices are bigger and not
#: hashed (that would read gigabytes under TCG); ls, save and diff are still compared.
XFS_OPTS = ("dm.fs=xfs", "dm.basesize=320M")


@contextlib.contextmanager
def stopped_on_failure(dg: DockerGuest, work: Path) -> Iterator[None]:
    """On an error in the block: dockerd's log to *work*/dockerd.log, and the guest as the
    block found it (dockerd gone, its pool, loops and mounts too, the data disk detached):
    every Docker test shares one guest (test_docker_store.py), and a dockerd left running
    would fail the next one's start for a reason not its own."""
    try:
        yield
    except BaseException:
        (work / "dockerd.log").write_text(dg.log())
        try:
            dg.stop(kill=True)
        except Exception:  # noqa: S110 - already failing: that error is the one reported
            pass
        raise


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
    dg.start(disk, extra_opts=XFS_OPTS if fs == "xfs" else EXT4_OPTS)
    lap("start dockerd")
    with stopped_on_failure(dg, work):
        if seed is None:
            run_docker_ops(dg, inputs, full=fs == "ext4")
        else:
            rec.ops = run_random_ops(dg, inputs, seed)
        lap("docker operations")
        # `docker diff` (dockerd mounts each container's device and its image's to compare
        # them) for the fixed scenarios only: test_diff_agrees_with_docker_diff's
        rec.images, rec.containers, rec.diffs = inspect_all(dg, diffs=seed is None)
        lap("inspect")
        rec.save = guest_save(dg, sorted({t for i in rec.images for t in i["RepoTags"]}))
        lap("docker save")
        dg.stop(unmount=False)
        lap("stop dockerd")
        # still in the block: a failed hash leaves no data root mounted for the next test
        if fs == "ext4":
            rec.device_sha256, rec.device_size = hash_devices(dg)
            lap("hash devices")
        dg.unmount_data(before=UNHASH_DEVICES if fs == "ext4" else "")
    rec.seconds["total"] = round(time.monotonic() - t[0], 1)
    (work / "guest-record.json").write_text(json.dumps(rec.__dict__, indent=1))
    return disk, rec


def kill_during_import(dg: DockerGuest, work: Path, disk: Path, delay: float, *,
                       extra_opts: tuple[str, ...] = ()) -> None:
    """dockerd started again on *disk*, a store it wrote and stopped cleanly (a scenario's,
    already extracted: its images are what the store had before), and killed (SIGKILL)
    *delay* seconds into a `docker import` of an 8 MB tarball of random bytes. A restart
    rather than a fresh store: dockerd's first start on an empty disk (pool, base device,
    mkfs) and a first import cost the guest about twice the CPU of a restart, and prove
    nothing the kill needs."""
    (work / "k").mkdir()
    (work / "k/blob").write_bytes(os.urandom(8_000_000))
    with tarfile.open(work / "big.tar", "w") as t:
        t.add(work / "k/blob", "data/blob")
    dg.start(disk, extra_opts=extra_opts)
    dg.put({"/tmp/big.in": work / "big.tar"})
    big = ops.import_("/tmp/big.in", "big:1")
    args = " ".join(shlex.quote(a) for a in ("001", big.method, big.path, big.body or "",
                                              "", "0"))
    dg.sh(f"{API_CLIENT}\n(dreq {args} >/dev/null 2>&1 &); read -t {delay:.2f} x <> {WAIT_FIFO}; "
          "read -r p < /tmp/dockerd.pid; kill -KILL $p", timeout=60)
    dg.stop(kill=True)


def restart_and_inspect(dg: DockerGuest, disk: Path, *, extra_opts: tuple[str, ...] = ()
                        ) -> GuestRecord:
    """Start dockerd on *disk* again (it processes what the kill left), inspect, stop."""
    rec = GuestRecord()
    dg.start(disk, extra_opts=extra_opts)
    rec.images, rec.containers, _ = inspect_all(dg)
    dg.stop()
    return rec


#: The pool's loop files in a data root: sparse (128 MiB and 16 MiB, mostly holes).
LOOP_FILES = ("devicemapper/devicemapper/data", "devicemapper/devicemapper/metadata")


def _debugfs(disk: Path, *commands: str) -> str:
    """Run debugfs *commands* on the ext4 image *disk* (read-only); its standard output. A
    failing command does not change debugfs's exit status, only its standard error: anything
    there but the version line fails."""
    res = subprocess.run(["debugfs", "-f", "-", str(disk)], input="\n".join(commands) + "\n",
                         capture_output=True, text=True, check=False)
    errors = [x for x in res.stderr.splitlines() if x.strip() and not re.match(r"debugfs \d", x)]
    if res.returncode != 0 or errors:
        raise RuntimeError(f"debugfs on {disk} failed: {' '.join(errors)[-500:]}")
    return res.stdout


def _names(listing: str) -> dict[str, int]:
    """The entries of a debugfs ``ls -p`` listing ("/ino/mode/uid/gid/name/size/"): name ->
    permission bits, "." included."""
    return {parts[5]: int(parts[2], 8) & 0o7777 for line in listing.splitlines()
            if len(parts := line.split("/")) >= 7 and parts[5] != ".."}


def _copy_extents(disk: Path, path: str, out: Path) -> None:
    """The file *path* of the ext4 image *disk* copied to *out* sparse: only its initialized
    extents (``dump_extents``), at their offsets; debugfs ``rdump`` would write every hole of a
    128 MiB loop file as zeros."""
    info = _debugfs(disk, "stats -h", f"stat {path}", f"dump_extents -l {path}")
    bs = re.search(r"^Block size:\s+(\d+)", info, re.M)
    size = re.search(r"\bSize: (\d+)", info)
    if bs is None or size is None or "Level Entries" not in info:
        raise RuntimeError(f"debugfs on {disk}: no block size, size or extents for {path}")
    block = int(bs.group(1))
    with open(disk, "rb") as src, open(out, "wb") as dst:
        for m in re.finditer(r"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+) -\s*\d+\s+(\d+) -\s*\d+"
                             r"\s+(\d+)( Uninit)?", info, re.M):
            if m.group(4):  # allocated, never written: reads as zeros
                continue
            logical, physical, length = (int(x) * block for x in m.group(1, 2, 3))
            done = 0
            while done < length:
                n = os.copy_file_range(src.fileno(), dst.fileno(), length - done,
                                       physical + done, logical + done)
                if n <= 0:
                    raise RuntimeError(f"{disk}: {path} extent at block {physical // block} "
                                       "lies beyond the image")
                done += n
        dst.truncate(int(size.group(1)))
    out.chmod(0o600)


def extract_root(disk: Path, dest: Path) -> Path:
    """Copy the data root out of the ext4 disk image with debugfs ``rdump`` (no mount); the
    pool's loop files are copied sparse, by their extents (``_copy_extents``)."""
    dest.mkdir(parents=True, exist_ok=True)
    top = _names(_debugfs(disk, "ls -p /"))
    if "devicemapper" not in top:
        raise RuntimeError(f"{disk}: no devicemapper directory in the data root")
    dm = _names(_debugfs(disk, "ls -p /devicemapper"))
    loops = _names(_debugfs(disk, "ls -p /devicemapper/devicemapper")) \
        if "devicemapper" in dm else {}
    cmds = [f"rdump /{n} {dest}" for n in top if n not in (".", "devicemapper")]
    (dest / "devicemapper/devicemapper").mkdir(parents=True, exist_ok=True)
    (dest / "devicemapper").chmod(dm["."])
    if loops:
        (dest / "devicemapper/devicemapper").chmod(loops["."])
    cmds += [f"rdump /devicemapper/{n} {dest / 'devicemapper'}" for n in dm
             if n not in (".", "devicemapper")]
    cmds += [f"rdump /devicemapper/devicemapper/{n} {dest / 'devicemapper/devicemapper'}"
             for n in loops if n != "." and f"devicemapper/devicemapper/{n}" not in LOOP_FILES]
    if any(" " in c.split(" ", 2)[1] for c in cmds):
        raise RuntimeError(f"{disk}: a name with a space in the data root")
    _debugfs(disk, *cmds)
    for rel in LOOP_FILES:
        if rel.rsplit("/", 1)[1] in loops:
            _copy_extents(disk, "/" + rel, dest / rel)
    if not (dest / "devicemapper").is_dir():
        raise RuntimeError(f"debugfs rdump of {disk} failed")
    return dest
