"""Docker's devicemapper store against Debian 12's dockerd 20.10, in one guest for every
Docker proof (its boot, containerd and dockerd's first start, whose code TCG translates once
per guest, are paid once).

dockerd writes, dmimage reads: dockerd writes a store in the guest (import, load, create, cp,
commit, rm, rmi; a fixed sequence, a seeded random one, the fixed one with dm.fs=xfs, and a
SIGKILL during an import), then dmimage reads the data-root disk offline on the host and must
agree with ``docker inspect``, ``docker diff``, ``docker save`` and with the kernel's view of
every thin device. The same on a direct-lvm pool lvm2 made in the guest (``dm.thinpooldev``,
read offline with ``--lvm``).

dmimage builds, dockerd reads: a data root built offline by ``layout =
"docker-devicemapper"`` (a docker save tarball and an OCI layout, layers with owners, setuid,
symlinks, hard links, a FIFO, a device node, xattrs, whiteouts and an opaque directory) is put
on an ext4 disk; dockerd must start on it, list the images, ``docker save`` them with the
inputs' digests (its tar assembly checks every file's CRC-64 against the tar-split), create
containers and copy files in and out. ``docker export`` of a container must show each file as
the layer tars say (type, mode, owner, content, link target, security.capability). Then,
offline, ``dmimage docker ls/check/save`` read the store dockerd used. The same with ``fs =
"xfs"``, built by ``dmimage build`` itself (its own guest's kernel writes the devices; the
guest is gone when it returns), dockerd started with ``dm.fs=xfs``."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_inputs import Inputs, expected_tree, layers, spec_text, write_one_layer_save
from docker_inputs import write_inputs as write_build_inputs

from dmimage.docker.check import check_store
from dmimage.docker.report import ls_data, read_pool_view
from dmimage.docker.save import save
from dmimage.docker.store import open_store
from dmimage.guest.docker import DockerGuest, DockerUnavailable, make_data_disk
from dmimage.guest.pytest_plugin import unavailable
from dmimage.image.docker_store import build_docker_store, load_docker_spec
from vmtests.docker_built import CONTAINERS, compare_export, data_disk, tar_members
from vmtests.docker_scenario import (
    XFS_OPTS,
    GuestRecord,
    cp_tar,
    extract_root,
    guest_save,
    input_files,
    inspect_all,
    kill_during_import,
    make_store,
    ops,
    restart_and_inspect,
    save_path,
    save_record,
    stopped_on_failure,
    write_inputs,
)

pytestmark = [pytest.mark.vm, pytest.mark.vm_whole_file]


@pytest.fixture(scope="module")
def guest() -> Iterator[DockerGuest]:
    """One guest (1 GiB, the Docker tools disk attached) for the module: every Docker proof
    runs in it (deb12 whatever the kernel selection: Debian 12's docker.io and lvm2 on
    Debian 12's kernel is the pairing Debian ships). The host's root is shared with it:
    ``test_xfs_build_failure_cleans_up`` builds a failing xfs store in it, to look at what
    the build's guest script leaves behind."""
    try:
        dg = DockerGuest.boot("deb12", host_share="/")
    except DockerUnavailable as exc:
        unavailable(str(exc))
    with dg:
        yield dg


@pytest.fixture(scope="module")
def store(guest: DockerGuest, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[Path, GuestRecord]:
    """(extracted data root, guest record): the scenario runs once per module."""
    work = tmp_path_factory.mktemp("docker")
    disk, rec = make_store(guest, work)
    return extract_root(disk, work / "root"), rec


@pytest.fixture(scope="module")
def xfs_made(guest: DockerGuest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path, GuestRecord]:
    """(data-root disk, extracted data root, guest record) of the scenario's filesystem part
    (import, load, create, cp, commit) with ``dm.fs=xfs``; ``test_kill_mid_import`` goes on
    with the disk once the root is extracted."""
    work = tmp_path_factory.mktemp("docker-xfs")
    disk, rec = make_store(guest, work, fs="xfs")
    return disk, extract_root(disk, work / "root"), rec


@pytest.fixture(scope="module")
def xfs_store(xfs_made: tuple[Path, Path, GuestRecord]) -> tuple[Path, GuestRecord]:
    """(extracted data root, guest record) of the xfs scenario."""
    return xfs_made[1], xfs_made[2]


@pytest.fixture(scope="module")
def random_store(guest: DockerGuest, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, GuestRecord]:
    """A seeded random sequence of operations (DMIMAGE_DOCKER_SEED replays one)."""
    import random

    seed = int(os.environ.get("DMIMAGE_DOCKER_SEED", "0")) or random.randrange(1, 1 << 30)
    work = tmp_path_factory.mktemp(f"docker-random-{seed}")
    disk, rec = make_store(guest, work, seed=seed)
    return extract_root(disk, work / "root"), rec


STORES = ["store", "random_store"]


def test_guest_store_written(store: tuple[Path, GuestRecord]) -> None:
    """The guest did what the scenario asked: the tags, containers and devices exist, and the
    kernel could read every device Docker's inspect names."""
    root, rec = store
    tags = sorted(t for img in rec.images for t in img["RepoTags"])
    assert tags == ["app:1", "app:2", "app:latest", "base:1"]
    assert sorted(c["Name"] for c in rec.containers) == ["/c1", "/c3"]
    for obj in rec.images + rec.containers:
        gd = obj["GraphDriver"]
        assert gd["Name"] == "devicemapper"
        assert int(gd["Data"]["DeviceId"]) in rec.device_sha256
    assert (root / "devicemapper/devicemapper/data").stat().st_size == 128 << 20
    assert json.loads((root / "devicemapper/metadata/base").read_text())["initialized"] is True


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from dmimage.cli.main import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("which", STORES)
def test_ls_agrees_with_docker_inspect(request: pytest.FixtureRequest, which: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """ids, tags, names, images of containers and GraphDriver DeviceIds: `dmimage docker ls
    --json` on the offline copy says what `docker inspect` said in the guest."""
    root, rec = request.getfixturevalue(which)
    rc, out, err = _run(capsys, "docker", "ls", str(root), "--json")
    assert rc == 0, err
    doc = json.loads(out)
    ours = {i["id"]: i for i in doc["images"]}
    theirs = {i["Id"]: i for i in rec.images}
    assert set(ours) == set(theirs)
    layers = {x["chain_id"]: x for x in doc["layers"]}
    for iid, img in theirs.items():
        assert ours[iid]["tags"] == sorted(img["RepoTags"])
        assert ours[iid]["device_id"] == int(img["GraphDriver"]["Data"]["DeviceId"])
        assert [layers[c]["diff_id"] for c in ours[iid]["layers"]] == img["RootFS"]["Layers"]
    ours_c = {c["id"]: c for c in doc["containers"]}
    theirs_c = {c["Id"]: c for c in rec.containers}
    assert set(ours_c) == set(theirs_c)
    for cid, c in theirs_c.items():
        assert "/" + ours_c[cid]["name"] == c["Name"]
        assert ours_c[cid]["image"] == c["Image"]
        assert ours_c[cid]["device_id"] == int(c["GraphDriver"]["Data"]["DeviceId"])
        # The init device is not in inspect's output; the kernel must at least have it.
        assert ours_c[cid]["init_device_id"] in rec.device_sha256
    # Every device the JSON names was readable by the guest's kernel, with Docker's size.
    assert {d["device_id"]: d["size"] for d in doc["devices"]} == rec.device_size
    assert doc["pool"]["transaction_id"] == doc["pool"]["docker_transaction_id"]


@pytest.mark.parametrize("which", STORES)
def test_export_matches_guest_hash(request: pytest.FixtureRequest, which: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Every device exported offline (by tag, container name, layer id or device hash) has
    the sha256 the guest's kernel computed through the thin target."""
    root, rec = request.getfixturevalue(which)
    rc, out, _ = _run(capsys, "docker", "ls", str(root), "--json")
    doc = json.loads(out)
    names: dict[int, str] = {}
    for d in doc["devices"]:
        names[d["device_id"]] = d["hash"]
    for i in doc["images"]:
        if i["tags"]:
            names[i["device_id"]] = i["tags"][0]
    for c in doc["containers"]:
        names[c["device_id"]] = c["name"]
    for x in doc["layers"]:
        names.setdefault(x["device_id"], x["chain_id"])
    assert set(names) == set(rec.device_sha256)
    for dev_id, name in sorted(names.items()):
        out_file = tmp_path / f"{dev_id}.img"
        rc, _, err = _run(capsys, "docker", "export", str(root), name, "-o", str(out_file))
        assert rc == 0, err
        h = hashlib.sha256(out_file.read_bytes()).hexdigest()
        assert h == rec.device_sha256[dev_id], f"device {dev_id} ({name})"
        out_file.unlink()


@pytest.mark.parametrize("which", STORES)
def test_check_clean(request: pytest.FixtureRequest, which: str,
                     capsys: pytest.CaptureFixture[str]) -> None:
    root, rec = request.getfixturevalue(which)
    rc, out, err = _run(capsys, "docker", "check", str(root))
    assert rc == 0, out + err + "\n".join(rec.ops)
    assert "clean" in out


def test_check_names_tampering(store: tuple[Path, GuestRecord], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """A thin created behind Docker's back, a removed device JSON and an entry marked
    deleted: check exits 1 and names each one; ROOT itself is unchanged."""
    import shutil
    import subprocess

    root, _ = store
    copy = tmp_path / "root"
    subprocess.run(["cp", "-a", "--sparse=always", str(root), str(copy)], check=True)
    meta_dir = copy / "devicemapper/metadata"
    doc = json.loads(_run(capsys, "docker", "ls", str(copy), "--json")[1])
    c = doc["containers"][0]
    removed = meta_dir / c["device_hash"]
    removed_id = c["device_id"]
    removed.unlink()
    marked = meta_dir / c["init_device_hash"]
    info = json.loads(marked.read_text())
    info["deleted"] = True
    marked.write_text(json.dumps(info))
    used = {d["device_id"] for d in doc["devices"]}
    leak = max(used) + 100
    rc, _, err = _run(capsys, "message", str(copy / "devicemapper/devicemapper/metadata"),
                      f"create_thin {leak}")
    assert rc == 0, err
    rc, out, err = _run(capsys, "docker", "check", str(copy), "--json")
    assert rc == 1, err
    rep = json.loads(out)
    kinds = {(p["kind"], p["device_id"]) for p in rep["problems"]}
    assert ("leak", leak) in kinds
    assert ("leak", removed_id) in kinds  # its thin is still in the pool
    assert ("no-device", None) in kinds  # the container's mount names a device without JSON
    assert ("deleted", c["init_device_id"]) in kinds
    texts = "\n".join(p["message"] for p in rep["problems"])
    assert c["device_hash"] in texts and c["init_device_hash"] in texts
    shutil.rmtree(copy)
    assert _run(capsys, "docker", "check", str(root))[0] == 0


def _members(tar_path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    sums: dict[str, str] = {}
    with tarfile.open(tar_path) as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        for m in t.getmembers():
            if m.isfile() or m.issym():  # a layer saved again is a symlink
                sums[m.name] = hashlib.sha256(t.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
    return manifest, sums


@pytest.mark.parametrize("which", ["store", "xfs_store", "random_store"])
def test_save_matches_guest_docker_save(request: pytest.FixtureRequest, which: str,
                                        tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Per image, the layer tars (rebuilt from tar-split and the ext4 or xfs on each thin
    device) and the config are bit-identical to what the guest's `docker save` wrote."""
    root, rec = request.getfixturevalue(which)
    refs = sorted({t for i in rec.images for t in i["RepoTags"]})
    out = tmp_path / "save.tar"
    rc, _, err = _run(capsys, "docker", "save", str(root), *refs, "-o", str(out))
    assert rc == 0, err
    ours_m, ours = _members(out)
    theirs = rec.save["sha256"]

    def per_image(manifest: list[dict[str, Any]], sums: dict[str, str]
                  ) -> dict[str, tuple[str, list[str]]]:
        return {m["Config"]: (sums[m["Config"]], [sums[x] for x in m["Layers"]])
                for m in manifest}

    assert per_image(ours_m, ours) == per_image(rec.save["manifest"], theirs)
    # the legacy v1 layer ids (the layer directories) are the ones dockerd computes, also
    # for committed images, whose configs carry a full container_config
    assert {m["Config"]: m["Layers"] for m in ours_m} == \
        {m["Config"]: m["Layers"] for m in rec.save["manifest"]}
    assert len(ours_m) == len({i["Id"] for i in rec.images if i["RepoTags"]})
    assert {t for m in ours_m for t in m["RepoTags"]} == set(refs)


@pytest.mark.parametrize("which", ["store", "xfs_store", "random_store"])
def test_tar_split_matches_dockerds(request: pytest.FixtureRequest, which: str,
                                    tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """For every layer of the tagged images, the tar-split dockerd wrote when it loaded,
    imported or committed it equals, line for line, what ``disassemble`` (``dmimage build``'s
    writer) makes of the same layer tar (the one ``save`` rebuilds, whose sha256 is the diff
    id dockerd computed over the tar it split). The gzip wrappers are not compared."""
    import gzip

    from dmimage.docker.tarsplit import disassemble

    root, rec = request.getfixturevalue(which)
    refs = sorted({t for i in rec.images for t in i["RepoTags"]})
    out = tmp_path / "save.tar"
    rc, _, err = _run(capsys, "docker", "save", str(root), *refs, "-o", str(out))
    assert rc == 0, err
    by_diff = {(d / "diff").read_text(): d
               for d in (root / "image/devicemapper/layerdb/sha256").iterdir()}
    layer = tmp_path / "layer.tar"
    compared = set()
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        for name in sorted({x for m in manifest for x in m["Layers"]}):
            f = t.extractfile(name)
            assert f is not None
            data = f.read()
            layer.write_bytes(data)
            diff = "sha256:" + hashlib.sha256(data).hexdigest()
            theirs = gzip.decompress((by_diff[diff] / "tar-split.json.gz").read_bytes())
            ours = gzip.decompress(disassemble(str(layer), diff)[0])
            assert ours.splitlines() == theirs.splitlines(), diff
            assert ours == theirs, diff
            compared.add(diff)
    # a random sequence may leave one tagged layer (seed 762379132 does)
    assert len(compared) >= (1 if which == "random_store" else 3)


@pytest.mark.parametrize("damage", ["truncated", "missing-file", "wrong-size"])
def test_save_bad_tar_split(store: tuple[Path, GuestRecord], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str], damage: str) -> None:
    """A truncated tar-split, a file it names that the layer's filesystem lacks, or content
    that does not rebuild the diff id: one line naming the file, exit 1, no output left."""
    import gzip
    import subprocess

    root, rec = store
    copy = tmp_path / "root"
    subprocess.run(["cp", "-a", "--sparse=always", str(root), str(copy)], check=True)
    ref = "app:1"
    image = next(i for i in rec.images if ref in i["RepoTags"])
    diff = image["RootFS"]["Layers"][-1]
    layerdb = copy / "image/devicemapper/layerdb/sha256"
    ldir = next(d for d in layerdb.iterdir() if (d / "diff").read_text() == diff)
    ts = ldir / "tar-split.json.gz"
    raw = ts.read_bytes()
    lines = gzip.decompress(raw).splitlines()
    if damage == "truncated":
        ts.write_bytes(raw[: len(raw) // 2])
    else:
        i = next(n for n, line in enumerate(lines)
                 if json.loads(line)["type"] == 1 and json.loads(line).get("size"))
        e = json.loads(lines[i])
        if damage == "missing-file":
            e["name"] = "app/no-such-file"
        else:
            e["size"] -= 1
        lines[i] = json.dumps(e).encode()
        ts.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    out = tmp_path / "save.tar"
    rc, _, err = _run(capsys, "docker", "save", str(copy), ref, "-o", str(out))
    assert rc == 1, err
    assert err.count("\n") == 1 and "tar-split.json.gz" in err and "Traceback" not in err
    if damage == "missing-file":
        assert "app/no-such-file" in err
    assert not out.exists() and not list(tmp_path.glob(".save.tar*"))


@pytest.mark.parametrize("which", ["store", "xfs_store"])
def test_diff_agrees_with_docker_diff(request: pytest.FixtureRequest, which: str,
                                      tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`dmimage docker diff` lists what the guest's `docker diff` listed, per container; the
    tar holds the added and changed files with the content the guest copied in."""
    root, rec = request.getfixturevalue(which)
    assert rec.diffs
    for name, lines in rec.diffs.items():
        rc, out, err = _run(capsys, "docker", "diff", str(root), name)
        assert rc == 0, err
        assert sorted(out.splitlines()) == sorted(lines), name
        tar = tmp_path / f"{name}.tar"
        assert _run(capsys, "docker", "diff", str(root), name, "-o", str(tar))[0] == 0
        with tarfile.open(tar) as t:
            names = {"/" + m.name.rstrip("/") for m in t.getmembers()}
            assert names == {line[2:] for line in lines if line[0] in "AC"}
            for m in t.getmembers():
                if m.isfile() and m.name.startswith("app/"):
                    f = t.extractfile(m)
                    assert f is not None
                    assert f.read() == b"written by docker cp\n"


def _ls_agrees(doc: dict[str, Any], rec: GuestRecord) -> None:
    ours = {i["id"]: i for i in doc["images"]}
    assert set(ours) == {i["Id"] for i in rec.images}
    for img in rec.images:
        assert ours[img["Id"]]["tags"] == sorted(img["RepoTags"])
        assert ours[img["Id"]]["device_id"] == int(img["GraphDriver"]["Data"]["DeviceId"])


def test_xfs_ls_agrees_with_docker_inspect(xfs_store: tuple[Path, GuestRecord],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """With dm.fs=xfs: ls agrees with inspect, the devices hold xfs, check is clean."""
    root, rec = xfs_store
    rc, out, err = _run(capsys, "docker", "ls", str(root), "--json")
    assert rc == 0, err
    doc = json.loads(out)
    _ls_agrees(doc, rec)
    assert doc["pool"]["base_filesystem"] == "xfs"
    rc, out, err = _run(capsys, "docker", "check", str(root))
    assert rc == 0, out + err


def test_kill_mid_import(guest: DockerGuest, xfs_made: tuple[Path, Path, GuestRecord],
                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """dockerd killed (SIGKILL) during `docker import` on a store it has written (the xfs
    scenario's disk, once extracted): check names what the kill left; after dockerd's own
    restart, a predicted rollback has happened (the device is gone from the pool), ls agrees
    with inspect again, and whatever check still names was named before."""
    import random

    from dmimage.thin.pool import open_pool

    seed = int(os.environ.get("DMIMAGE_DOCKER_KILL_SEED", "0")) or random.randrange(1, 1 << 30)
    delay = random.Random(seed).uniform(0.5, 12.0)
    disk = xfs_made[0]
    where = f"(DMIMAGE_DOCKER_KILL_SEED={seed}, kill after {delay:.2f} s)"
    try:
        kill_during_import(guest, tmp_path, disk, delay, extra_opts=XFS_OPTS)
    except Exception as exc:
        exc.add_note(where)
        raise
    before = extract_root(disk, tmp_path / "before")
    rc, out, err = _run(capsys, "docker", "check", str(before), "--json")
    assert rc in (0, 1) and not err, where + err
    found = json.loads(out)["problems"]
    rollback = {p["device_id"] for p in found
                if p["kind"] == "transaction" and "roll it back" in p["message"]}
    rec = restart_and_inspect(guest, disk, extra_opts=XFS_OPTS)
    after = extract_root(disk, tmp_path / "after")
    with open_pool(after / "devicemapper/devicemapper/metadata") as pool:
        assert not rollback & set(pool.devices()), where
    rc, out, err = _run(capsys, "docker", "ls", str(after), "--json")
    assert rc == 0, where + err
    _ls_agrees(json.loads(out), rec)
    rc, out, err = _run(capsys, "docker", "check", str(after), "--json")
    assert rc in (0, 1) and not err, where + err
    still = {(p["kind"], p["device_id"]) for p in json.loads(out)["problems"]}
    assert still <= {(p["kind"], p["device_id"]) for p in found}, (where, found, still)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Inputs]:
    """A store built by ``layout = "docker-devicemapper"`` from a docker save tarball and an
    OCI layout (tests/docker_inputs.py): (work directory holding root/, inputs)."""
    work = tmp_path_factory.mktemp("docker-build")
    inp = write_build_inputs(work / "inputs")
    spec_file = work / "seed.toml"
    spec_file.write_text(spec_text("seed", ["inputs/rich.tar", "inputs/other-oci"]))
    build_docker_store(load_docker_spec(spec_file), work / "root")
    return work, inp


def _children() -> set[int]:
    """This process's child processes (a guest's QEMU among them)."""
    me = str(os.getpid())
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if stat.rpartition(")")[2].split()[1] == me:
                out.add(int(d.name))
    return out


@pytest.fixture(scope="module")
def built_xfs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Inputs]:
    """The same inputs built with ``fs = "xfs"`` by the product's own command, ``dmimage
    build SEED.toml -o ROOT`` (in-process): it boots its Docker tools guest (the host's root
    shared with it), the guest's kernel writes the devices (mkfs.xfs, snapshots, layers
    applied by dmimage.docker.unpack), and it shuts the guest down: no QEMU of its own is
    left, nor anything but the data root in ROOT."""
    from dmimage.cli.main import main

    work = tmp_path_factory.mktemp("docker-build-xfs")
    inp = write_build_inputs(work / "inputs")
    spec_file = work / "seed.toml"
    spec_file.write_text(spec_text("seed", ["inputs/rich.tar", "inputs/other-oci"],
                                   base_size="320M") + 'fs = "xfs"\n')
    before = _children()
    assert main(["build", str(spec_file), "-o", str(work / "root"), "-q"]) == 0
    assert _children() <= before, "the build's guest is still running"
    assert sorted(p.name for p in (work / "root").iterdir()) == \
        ["devicemapper", "dmimage-build.json", "image"]
    _kernel_pool_as_dockerds(work / "root/devicemapper/devicemapper/metadata")
    return work, inp


def _kernel_pool_as_dockerds(meta: Path) -> None:
    """The metadata the guest's kernel committed, read by thin-provisioning-tools 1.1
    (independent of dmimage's reader): thin_check clean, transaction id 5 (the base and four
    layers, one transaction each), and every layer's device sharing most of its blocks with
    its parent, as dockerd's snapshots do."""
    import oracles

    tools = oracles.tools_11()
    rc, out, err = oracles.check(meta, tools)
    assert rc == 0, out + err
    assert 'transaction="5"' in oracles.dump(meta, tools).splitlines()[0]
    rows = [line.split() for line in oracles.thin_ls(
        meta, tools, "--no-headers", "-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS").splitlines()
        if line.strip() and line.split()[0].isdigit()]
    got = {int(d): (int(m), int(x)) for d, m, x in rows}
    assert sorted(got) == [1, 2, 3, 4, 5], got
    for dev, (mapped, excl) in got.items():
        assert mapped and excl < mapped // 4, (dev, mapped, excl)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_dockerd_runs_built_store(guest: DockerGuest, request: pytest.FixtureRequest,
                                  fs: str) -> None:
    """dockerd (``dm.fs=xfs`` for the xfs store) starts on the built store, lists its images,
    saves them with the inputs' digests, creates containers, copies in and out; each
    container's export is what the layer tars say (xfs: a hard link's header mode on the
    shared inode, as moby's createTarFile chmods it); offline ls, check and save agree."""
    work, inp = request.getfixturevalue("built" if fs == "ext4" else "built_xfs")
    disk = data_disk(work / "root", work / "data-root.ext4")
    dg = guest
    with stopped_on_failure(dg, work):
        dg.start(disk, extra_opts=XFS_OPTS if fs == "xfs" else ())
        # `docker images` (the API's image list: tags and ids) and `docker save`
        images_json, saved = dg.fetch("/images/json", save_path(sorted(inp.images)))
        listed = sorted(f"{t} {i['Id']}" for i in json.loads(images_json)
                        for t in i["RepoTags"] or ["<none>:<none>"])
        assert listed == sorted(f"{t} {inp.image_id(t)}" for t in inp.images), listed

        rec = save_record(saved)
        by_config = {m["Config"]: m for m in rec["manifest"]}
        for tag, ls in inp.images.items():
            cfg = inp.image_id(tag)[7:] + ".json"
            assert cfg in by_config, f"{tag}: docker save has no {cfg}"
            m = by_config[cfg]
            assert m["RepoTags"] == [tag]
            assert rec["sha256"][cfg] == inp.image_id(tag)[7:]  # the config, byte for byte
            got = [rec["sha256"][p] for p in m["Layers"]]
            assert got == [inp.diff_id(x)[7:] for x in ls], f"{tag}: layer digests"

        # docker create, and docker cp in (the API calls the CLI makes: DockerGuest.calls)
        note = b"copied in by docker cp\n"
        (work / "cp-note.tar").write_bytes(cp_tar("note.txt", note))
        dg.calls([*(ops.create(name, tag) for name, tag in CONTAINERS),
                  ops.cp("/tmp/cp-note.tar", "c1", "/app/note.txt")],
                 files={"/tmp/cp-note.tar": work / "cp-note.tar"})
        # docker cp out of /app (GET .../archive: the tar the CLI extracts; it holds the file
        # copied in and one of layer l3), docker export of each container and docker ps -a,
        # in one guest command
        got_app, *exports, ps_json = dg.fetch(
            "/containers/c1/archive?path=/app",
            *(f"/containers/{name}/export" for name, _ in CONTAINERS),
            "/containers/json?all=1")
        app = tar_members(got_app)
        assert app["app/note.txt\0sha256"] == hashlib.sha256(note).hexdigest()
        data = next(m.data for m in layers()["l3"] if m.name == "app/data")
        assert app["app/data\0sha256"] == hashlib.sha256(data).hexdigest()

        for (name, tag), raw in zip(CONTAINERS, exports, strict=True):
            exp = tar_members(raw)
            want = expected_tree([inp.tars[x] for x in inp.images[tag]])
            compare_export(exp, want, f"{name} ({tag})")
            if "l2" in inp.images[tag]:  # l2's whiteouts and opaque directory
                gone = {"etc/gone-later", "usr/share/old", "home/u", "home/u/file",
                        "usr/share/big"}
                assert not gone & set(exp), f"{name}: whiteouts not honoured: " \
                    f"{gone & set(exp)}"
        ps = [n for c in json.loads(ps_json) for n in c["Names"]]  # ps -a
        assert sorted(ps) == ["/c1", "/c2", "/c3"]
    dg.stop()
    guest_layers = {m["RepoTags"][0]: m["Layers"] for m in rec["manifest"]}

    # Offline, on the store dockerd has used: ls, check and save agree.
    root = extract_root(disk, work / "after")
    store = open_store(root)
    rep = check_store(store)
    assert rep.ok, [str(p) for p in rep.problems]
    js = ls_data(store, read_pool_view(store))
    assert sorted(t for i in js["images"] for t in i["tags"]) == sorted(inp.images)
    assert sorted(c["name"] for c in js["containers"]) == ["c1", "c2", "c3"]
    out_tar = work / "offline-save.tar"
    with open(out_tar, "wb") as f:
        save(store, sorted(inp.images), f)
    with tarfile.open(out_tar) as t:
        man = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        for m in man:
            tag = m["RepoTags"][0]
            config = t.extractfile(m["Config"]).read()  # type: ignore[union-attr]
            assert config == inp.configs[tag]
            got = [hashlib.sha256(t.extractfile(p).read()).hexdigest()  # type: ignore[union-attr]
                   for p in m["Layers"]]
            assert got == [inp.diff_id(x)[7:] for x in inp.images[tag]]
            # the legacy v1 layer ids (directory names) are the ones dockerd computes
            assert m["Layers"] == guest_layers[tag], tag


def test_xfs_build_failure_cleans_up(guest: DockerGuest, tmp_path: Path) -> None:
    """A layer only the guest can find wrong (a hard link to a name no layer has): the
    build stops with one line naming the layer (BuildError, exit 1), OUTDIR is removed, the
    input is untouched, and the guest is left as it was: no device-mapper device (the pool
    and the layer's device removed), nothing mounted on the share, no applier running."""
    import io

    from dmimage.image.build import BuildError

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        ti = tarfile.TarInfo("etc/x")
        ti.size = 2
        t.addfile(ti, io.BytesIO(b"x\n"))
        ti = tarfile.TarInfo("etc/y")
        ti.type, ti.linkname = tarfile.LNKTYPE, "etc/missing"
        t.addfile(ti)
    write_one_layer_save(tmp_path / "bad.tar", buf.getvalue(), "bad:1")
    before = (tmp_path / "bad.tar").read_bytes()
    spec_file = tmp_path / "bad.toml"
    spec_file.write_text(spec_text("bad", ["bad.tar"], base_size="320M") + 'fs = "xfs"\n')
    with pytest.raises(BuildError) as ei:
        build_docker_store(load_docker_spec(spec_file), tmp_path / "out", guest=guest)
    msg = str(ei.value)
    assert "\n" not in msg and "layer 1 (device 2)" in msg and "etc/missing" in msg, msg
    assert ei.value.exit_code == 1
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "bad.tar").read_bytes() == before
    left = guest.sh("dmsetup ls | grep -c dmimage-build- || true; "
                    f"grep -c ' /tmp/host{tmp_path}' /proc/mounts || true; "
                    "for p in /proc/[0-9]*; do tr '\\0' ' ' <$p/cmdline 2>/dev/null; echo; "
                    "done | grep -c '[d]mimage.docker.unpack' || true").split()
    assert left == ["0", "0", "0"], left


def test_direct_lvm_store(guest: DockerGuest, tmp_path: Path) -> None:
    """direct-lvm: dockerd with ``dm.thinpooldev`` on an LVM thin pool lvm2 made in the guest
    (as Docker's direct-lvm guide makes it: VG "docker", pool "thinpool"); then, offline,
    ``dmimage docker ls/check/save --lvm DISK docker/thinpool`` read the data root and the
    VG's disk and must agree with ``docker inspect`` and the guest's ``docker save``."""
    dg = guest
    inputs = write_inputs(tmp_path / "inputs")
    vgdisk = tmp_path / "vg.img"
    with open(vgdisk, "wb") as f:
        f.truncate(256 << 20)
    vg = dg.vm.attach(vgdisk, read_only=False, serial="dockervg")
    done = False
    try:
        dg.lvm_setup([vg])
        dg.sh(f"lvm pvcreate -y {vg.guest_path} && lvm vgcreate docker {vg.guest_path} && "
              "lvm lvcreate -y --wipesignatures y -n thinpool docker -l 80%VG && "
              "lvm lvcreate -y --wipesignatures y -n thinpoolmeta docker -l 5%VG && "
              "lvm lvconvert -y --zero n -c 64K --thinpool docker/thinpool "
              "--poolmetadata docker/thinpoolmeta && lvm lvs", timeout=300)
        disk = make_data_disk(tmp_path / "data-root.ext4")
        with stopped_on_failure(dg, tmp_path):
            dg.start(disk, extra_opts=("dm.thinpooldev=/dev/mapper/docker-thinpool",))
            dg.calls([ops.load("/tmp/app.in"), ops.import_("/tmp/base.in", "base:1"),
                      ops.create("c1", "app:1"),
                      ops.cp("/tmp/cp-note.tar", "c1", "/app/note.txt")],
                     files=input_files(inputs, {"/tmp/cp-note.tar": cp_tar("note.txt")}))
            images, containers, _ = inspect_all(dg)
            rec = guest_save(dg, ["app:1", "base:1"])
        dg.stop(unmount=False)
        # The pool's metadata committed, the VG's disk written back (its file then holds
        # every write: the host reads it, the disk stays attached as data disks do)
        dg.unmount_data(before=f"lvm vgchange -an docker && blockdev --flushbufs {vg.guest_path}")
        done = True
    finally:
        if not done and dg.vm.alive:  # the VG inactive for the tests after this one
            dg.sh("lvm vgchange -an docker >/dev/null 2>&1; true")

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
