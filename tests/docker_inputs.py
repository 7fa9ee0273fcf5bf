"""Inputs for ``layout = "docker-devicemapper"`` builds: layer tars with every kind of member
a layer can carry (owners, setuid, sticky, symlinks, hard links, a FIFO, a device node,
extended attributes, long and non-ASCII names, whiteouts, an opaque directory), packed as a
``docker save`` tarball and as an OCI image layout with a gzip'd layer; and ``expected_tree``,
a plain-dict reference of what a container of an image sees, computed from the layer tars
independently of the builder."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmimage.docker.gotar import open_tar

MTIME = 1_600_000_000


@dataclass(frozen=True)
class M:
    """One member: kind f(ile) d(ir) l(symlink) h(ardlink) p(fifo) c(har device)."""

    name: str
    kind: str = "f"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    xattrs: tuple[tuple[str, bytes], ...] = ()
    dev: tuple[int, int] = (0, 0)


def layer_tar(members: list[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as t:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.mode, ti.uid, ti.gid, ti.mtime = m.mode, m.uid, m.gid, MTIME
            ti.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
                       "h": tarfile.LNKTYPE, "p": tarfile.FIFOTYPE,
                       "c": tarfile.CHRTYPE}[m.kind]
            ti.linkname = m.link
            ti.devmajor, ti.devminor = m.dev
            if m.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                  for k, v in m.xattrs}
            if m.kind == "f":
                ti.size = len(m.data)
            t.addfile(ti, io.BytesIO(m.data) if m.kind == "f" else None)
    return buf.getvalue()


def _big(n: int, seed: bytes) -> bytes:
    out = bytearray()
    block = seed
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 8
    return bytes(out[:n])


CAP = b"\x01\x00\x00\x02\x00\x04\x00\x00" + bytes(12)  # cap_net_bind_service, permitted


def layers() -> dict[str, list[M]]:
    return {
        "l1": [
            M("etc/", "d", mode=0o755), M("etc/os-release", data=b"NAME=seeded\n"),
            M("etc/gone-later", data=b"x\n"),
            M("bin/", "d", mode=0o755),
            M("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755),
            M("bin/tool2", "h", link="bin/tool"),
            M("bin/sh", "l", link="tool"),
            M("bin/ping", data=b"ping\n", mode=0o755, xattrs=(("security.capability", CAP),)),
            # the kernel drops a file's capability when its hard link is lchowned, unless
            # the link's header sets it again
            M("bin/arping", data=b"arping\n", mode=0o755,
              xattrs=(("security.capability", CAP),)),
            M("bin/arping-link", "h", link="bin/arping", mode=0o755),
            M("bin/clockdiff", data=b"clockdiff\n", mode=0o755,
              xattrs=(("security.capability", CAP),)),
            M("bin/clockdiff-link", "h", link="bin/clockdiff", mode=0o755,
              xattrs=(("security.capability", CAP),)),
            M("usr/share/", "d", mode=0o755),
            M("usr/share/big", data=_big(300_000, b"big")),
            M("usr/share/old", data=b"old\n"),
            M("usr/share/ünï cöde.txt", data=b"utf-8 name\n"),
            M('usr/share/a "quoted" name', data=b"quotes\n"),
            M("usr/share/" + "long-" * 30 + "name", data=b"long name\n"),
            M("usr/share/empty"),
            M("home/u/", "d", mode=0o750, uid=1000, gid=1000),
            M("home/u/file", data=b"owned\n", mode=0o640, uid=1000, gid=1000),
            M("tmp/", "d", mode=0o1777),
            M("run/fifo", "p", mode=0o600),
            M("dev/", "d", mode=0o755), M("dev/zero0", "c", mode=0o666, dev=(1, 5)),
            M("attr", data=b"xattr\n", xattrs=(("user.note", b"hello"),)),
        ],
        "l2": [
            M("etc/.wh.gone-later"),
            M("etc/new", data=b"new in l2\n", uid=33, gid=33),
            M("bin/sh", data=b"now a file\n", mode=0o755),
            M("usr/share/", "d", mode=0o755),
            M("usr/share/.wh..wh..opq"),
            M("usr/share/only", data=b"opaque dir keeps only this\n"),
            M("home/.wh.u"),
        ],
        "l3": [M("app/", "d", mode=0o755), M("app/data", data=_big(70_000, b"app"))],
        "l4": [M("srv/", "d", mode=0o700, uid=5, gid=6),
               M("srv/oci", data=b"from an OCI layout\n")],
    }


def _config(diff_ids: list[str], tag: str) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "Labels": {"tag": tag}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"}
                    for i in range(len(diff_ids))]}, separators=(",", ":")).encode()


@dataclass
class Inputs:
    save_tar: Path  # rich:1 (l1, l2) and rich:2 (l1, l2, l3)
    oci_dir: Path  # other:1 (l1, l4 gzip'd)
    tars: dict[str, bytes]
    images: dict[str, list[str]]  # tag -> layer names
    configs: dict[str, bytes]  # tag -> config

    def diff_id(self, layer: str) -> str:
        return "sha256:" + hashlib.sha256(self.tars[layer]).hexdigest()

    def image_id(self, tag: str) -> str:
        return "sha256:" + hashlib.sha256(self.configs[tag]).hexdigest()


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
    t.addfile(ti, io.BytesIO(data))


def write_inputs(work: Path) -> Inputs:
    work.mkdir(parents=True, exist_ok=True)
    tars = {k: layer_tar(v) for k, v in layers().items()}
    images = {"rich:1": ["l1", "l2"], "rich:2": ["l1", "l2", "l3"], "other:1": ["l1", "l4"]}
    inp = Inputs(work / "rich.tar", work / "other-oci", tars, images, {})
    for tag, ls in images.items():
        inp.configs[tag] = _config([inp.diff_id(x) for x in ls], tag)
    manifest = []
    with tarfile.open(inp.save_tar, "w", format=tarfile.PAX_FORMAT) as t:
        for name in ("l1", "l2", "l3"):
            _add(t, f"{name}/layer.tar", tars[name])
            _add(t, f"{name}/VERSION", b"1.0")
        for tag in ("rich:1", "rich:2"):
            cfg = inp.image_id(tag)[7:] + ".json"
            _add(t, cfg, inp.configs[tag])
            manifest.append({"Config": cfg, "RepoTags": [tag],
                             "Layers": [f"{x}/layer.tar" for x in images[tag]]})
        _add(t, "manifest.json", json.dumps(manifest).encode())
    blobs = inp.oci_dir / "blobs/sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return "sha256:" + h

    layer_descs = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(tars["l1"]),
         "size": len(tars["l1"])}]
    gz = gzip.compress(tars["l4"], mtime=0)
    layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": blob(gz), "size": len(gz)})
    config = inp.configs["other:1"]
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest."
                      "v1+json", "config": {"mediaType": "application/vnd.oci.image.config."
                                            "v1+json", "digest": blob(config), "size": len(config)},
                      "layers": layer_descs}).encode()
    (inp.oci_dir / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (inp.oci_dir / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(man),
            "size": len(man), "annotations": {"org.opencontainers.image.ref.name":
                                              "other:1"}}]}))
    return inp


def spec_text(name: str, inputs: list[str], base_size: str = "16M",
              data_size: str = "128M", metadata_size: str = "16M") -> str:
    return (f'name = "{name}"\nlayout = "docker-devicemapper"\n[docker]\n'
            f"images = {json.dumps(inputs)}\nbase_size = \"{base_size}\"\n"
            f'data_size = "{data_size}"\nmetadata_size = "{metadata_size}"\n')


def expected_tree(tars: list[bytes]) -> dict[str, dict[str, Any]]:
    """What a container sees, by path: {type, mode, uid, gid, sha256 | link, xattrs}; the
    names of one inode (hard links) share one entry object."""
    tree: dict[str, dict[str, Any]] = {}

    def drop(p: str) -> None:
        for k in [k for k in tree if k == p or k.startswith(p + "/")]:
            del tree[k]

    for raw in tars:
        unpacked: set[str] = set()
        with open_tar(fileobj=io.BytesIO(raw)) as t:  # as Go's archive/tar reads
            for ti in t.getmembers():
                p = posixpath.normpath(ti.name)
                d, base = posixpath.split(p)
                up = d
                while up and up not in tree:  # dockerd makes missing parents with 0600
                    tree[up] = {"type": "d", "mode": 0o600, "uid": 0, "gid": 0, "xattrs": {}}
                    up = posixpath.dirname(up)
                if base == ".wh..wh..opq":
                    for k in [k for k in tree if k.startswith(d + "/")]:
                        top = d + "/" + k[len(d) + 1:].split("/")[0]
                        if top not in unpacked:
                            tree.pop(k, None)
                    continue
                if base.startswith(".wh."):
                    drop(posixpath.join(d, base[4:]))
                    continue
                if p in tree and not (ti.isdir() and tree[p]["type"] == "d"):
                    drop(p)
                if ti.type == tarfile.XGLTYPE:  # createTarFile: nothing made
                    unpacked.add(p)
                    continue
                x = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                     for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
                ent: dict[str, Any] = {"uid": ti.uid, "gid": ti.gid, "xattrs": x}
                if ti.islnk():
                    # moby's createTarFile: one inode for both names; its owner and the
                    # header's xattrs are set through the new name, and its mode (and times,
                    # not modelled here) too unless the target is a symlink. The lchown
                    # drops the inode's security.capability (the kernel's killpriv) before
                    # the header's xattrs are set.
                    target = posixpath.normpath(ti.linkname)
                    kept = {k: v for k, v in tree[target]["xattrs"].items()
                            if k != "security.capability" or tree[target]["type"] == "d"}
                    ent = {**tree[target], "uid": ti.uid, "gid": ti.gid,
                           "xattrs": {**kept, **x}}
                    if ent["type"] != "l":
                        ent["mode"] = ti.mode
                    old = tree[target]
                    for name, value in tree.items():
                        if value is old:
                            tree[name] = ent
                elif ti.isdir():
                    ent.update(type="d", mode=ti.mode)
                elif ti.issym():
                    ent.update(type="l", link=ti.linkname)
                elif ti.isfifo():
                    ent.update(type="p", mode=ti.mode)
                elif ti.ischr():
                    ent.update(type="c", mode=ti.mode, dev=(ti.devmajor, ti.devminor))
                else:
                    f = t.extractfile(ti)
                    assert f is not None
                    ent.update(type="f", mode=ti.mode,
                               sha256=hashlib.sha256(f.read()).hexdigest())
                tree[p] = ent
                unpacked.add(p)
    return tree


def write_one_layer_save(path: Path, layer: bytes, tag: str) -> None:
    """A minimal ``docker save`` tarball at *path*: one image tagged *tag* whose only layer
    is the tar *layer* (its config names the layer's digest as its one diff id)."""
    diff = "sha256:" + hashlib.sha256(layer).hexdigest()
    cfg = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
    cid = hashlib.sha256(cfg).hexdigest()
    manifest = [{"Config": f"{cid}.json", "RepoTags": [tag], "Layers": ["l/layer.tar"]}]
    with tarfile.open(path, "w") as t:
        for name, data in (("l/layer.tar", layer), (f"{cid}.json", cfg),
                           ("manifest.json", json.dumps(manifest).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
