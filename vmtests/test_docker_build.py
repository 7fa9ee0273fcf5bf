"""dmimage builds, dockerd reads: a data root built offline by ``layout =
"docker-devicemapper"`` (a docker save tarball and an OCI layout, layers with owners,
setuid, symlinks, hard links, a FIFO, a device node, xattrs, whiteouts and an opaque
directory) is put on an ext4 disk; Debian 12's dockerd 20.10 must start on it, list the
images, ``docker save`` them with the inputs' digests (its tar assembly checks every file's
CRC-64 against the tar-split), create containers and copy files in and out. ``docker
export`` of a container must show each file as the layer tars say (type, mode, owner,
content, link target, security.capability). Then, offline, ``dmimage docker ls/check/save``
read the store dockerd used."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker_inputs import Inputs, expected_tree, layers, spec_text, write_inputs

from dmimage.docker.check import check_store
from dmimage.docker.report import ls_data, read_pool_view
from dmimage.docker.save import save
from dmimage.docker.store import open_store
from dmimage.guest.docker import DockerGuest, DockerUnavailable
from dmimage.guest.kernels import selected_names
from dmimage.guest.pytest_plugin import unavailable
from dmimage.image.docker_store import build_docker_store, load_docker_spec
from vmtests.docker_scenario import cp_tar, extract_root, ops, save_path, save_record

pytestmark = [pytest.mark.vm, pytest.mark.vm_one_kernel]  # dockerd is the oracle (conftest.py)


@pytest.fixture(scope="module", params=selected_names())
def guest(request: pytest.FixtureRequest) -> Iterator[DockerGuest]:
    """One guest per selected kernel ($DMIMAGE_VM_KERNELS)."""
    try:
        dg = DockerGuest.boot(request.param)
    except DockerUnavailable as exc:
        unavailable(str(exc))
    with dg:
        yield dg


def _data_disk(root: Path, disk: Path) -> Path:
    """An ext4 disk holding the data root (mke2fs -d keeps the loop files sparse)."""
    with open(disk, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-F", "-m", "0", "-E", "root_owner=0:0",
                    "-d", str(root), str(disk)], check=True, capture_output=True)
    return disk


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Inputs]:
    work = tmp_path_factory.mktemp("docker-build")
    inp = write_inputs(work / "inputs")
    spec_file = work / "seed.toml"
    spec_file.write_text(spec_text("seed", ["inputs/rich.tar", "inputs/other-oci"]))
    build_docker_store(load_docker_spec(spec_file), work / "root")
    return work, inp


def _members(raw: bytes) -> dict[str, tarfile.TarInfo | str]:
    """A tar's members by name, and the sha256 of each regular file's content under
    "NAME\0sha256"."""
    out: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), encoding="utf-8",
                      errors="surrogateescape") as t:
        for ti in t.getmembers():
            name = ti.name.rstrip("/")
            out[name] = ti
            if ti.isreg():
                f = t.extractfile(ti)
                assert f is not None
                out[name + "\0sha256"] = hashlib.sha256(f.read()).hexdigest()
    return out


def _compare(exp: dict[str, Any], want: dict[str, dict[str, Any]], label: str) -> None:
    problems = []
    for path, w in sorted(want.items()):
        ti = exp.get(path)
        if ti is None:
            problems.append(f"{path}: missing")
            continue
        kind = ("d" if ti.isdir() else "l" if ti.issym() else "p" if ti.isfifo() else
                "c" if ti.ischr() else "f" if ti.isreg() or ti.islnk() else "?")
        if ti.islnk():  # a hard link in the export: the content is its target's
            kind = "f"
            sha = exp.get(ti.linkname.rstrip("/") + "\0sha256")
        else:
            sha = exp.get(path + "\0sha256")
        got: dict[str, Any] = {"type": kind, "uid": ti.uid, "gid": ti.gid}
        if kind != "l":
            got["mode"] = ti.mode & 0o7777  # Docker's tar headers carry the type bits too
        if kind == "f":
            got["sha256"] = sha
        if kind == "l":
            got["link"] = ti.linkname
        if kind == "c":
            got["dev"] = (ti.devmajor, ti.devminor)
        cap = ti.pax_headers.get("SCHILY.xattr.security.capability")
        if cap is not None:
            got["cap"] = cap.encode("utf-8", "surrogateescape")
        ref = {k: v for k, v in w.items() if k in got and k != "xattrs"}
        if "security.capability" in w.get("xattrs", {}):
            ref["cap"] = w["xattrs"]["security.capability"]
        if {k: got[k] for k in ref} != ref:
            problems.append(f"{path}: docker export {got}, the layers say {ref}")
    assert not problems, f"{label}:\n" + "\n".join(problems)


#: The containers the test creates: (name, image).
CONTAINERS = (("c1", "rich:2"), ("c2", "other:1"), ("c3", "rich:1"))


def _tar_of(work: Path, name: str, data: bytes) -> Path:
    """``cp_tar`` in a host file."""
    path = work / f"cp-{name}.tar"
    path.write_bytes(cp_tar(name, data))
    return path


def test_dockerd_runs_built_store(guest: DockerGuest, built: tuple[Path, Inputs]) -> None:
    work, inp = built
    disk = _data_disk(work / "root", work / "data-root.ext4")
    dg = guest
    dg.start(disk)
    try:
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
        dg.calls([*(ops.create(name, tag) for name, tag in CONTAINERS),
                  ops.cp("/tmp/cp-note.tar", "c1", "/app/note.txt")],
                 files={"/tmp/cp-note.tar": _tar_of(work, "note.txt", note)})
        # docker cp out of /app (GET .../archive: the tar the CLI extracts; it holds the file
        # copied in and one of layer l3), docker export of each container and docker ps -a,
        # in one guest command
        got_app, *exports, ps_json = dg.fetch(
            "/containers/c1/archive?path=/app",
            *(f"/containers/{name}/export" for name, _ in CONTAINERS),
            "/containers/json?all=1")
        app = _members(got_app)
        assert app["app/note.txt\0sha256"] == hashlib.sha256(note).hexdigest()
        data = next(m.data for m in layers()["l3"] if m.name == "app/data")
        assert app["app/data\0sha256"] == hashlib.sha256(data).hexdigest()

        for (name, tag), raw in zip(CONTAINERS, exports, strict=True):
            exp = _members(raw)
            want = expected_tree([inp.tars[x] for x in inp.images[tag]])
            _compare(exp, want, f"{name} ({tag})")
            if "l2" in inp.images[tag]:  # l2's whiteouts and opaque directory
                gone = {"etc/gone-later", "usr/share/old", "home/u", "home/u/file",
                        "usr/share/big"}
                assert not gone & set(exp), f"{name}: whiteouts not honoured: " \
                    f"{gone & set(exp)}"
        ps = [n for c in json.loads(ps_json) for n in c["Names"]]  # ps -a
        assert sorted(ps) == ["/c1", "/c2", "/c3"]
    except BaseException:
        (work / "dockerd.log").write_text(dg.log())
        raise
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
