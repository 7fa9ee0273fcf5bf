"""Images and tags: ``image/devicemapper/imagedb/content/sha256/<id>`` (the config JSON whose
sha256 is the image id), ``imagedb/metadata/sha256/<id>/parent`` and ``repositories.json``;
and containers: ``containers/<id>/config.v2.json``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from dmimage.docker.errors import StoreError
from dmimage.docker.layers import HEX64, digest
from dmimage.docker.paths import Root, check_component

IMAGEDB = "image/devicemapper/imagedb"
REPOSITORIES = "image/devicemapper/repositories.json"
CONTAINERS = "containers"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Chain ids of a layer stack: the first is its diff id, then sha256("<parent> <diff>")."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


@dataclass(frozen=True, slots=True)
class Image:
    id: str  # sha256:...
    config: bytes = field(repr=False)
    diff_ids: tuple[str, ...]
    chain_ids: tuple[str, ...]
    parent: str | None
    digest_ok: bool  # sha256(config) == id

    @property
    def top_chain_id(self) -> str | None:
        return self.chain_ids[-1] if self.chain_ids else None


@dataclass(frozen=True, slots=True)
class Container:
    id: str
    name: str  # without the leading "/"
    image: str
    driver: str


def read_images(root: Root) -> dict[str, Image]:
    images: dict[str, Image] = {}
    base = f"{IMAGEDB}/content/sha256"
    for name in root.listdir(base):
        if not HEX64.fullmatch(name):
            continue
        rel = f"{base}/{name}"
        raw = root.read_bytes(rel)
        where = root.display(rel)
        obj = root.read_json_object(rel)
        rootfs = obj.get("rootfs") or {}
        diffs = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if diffs is None:
            diffs = []
        if not isinstance(diffs, list):
            raise StoreError(where, "rootfs.diff_ids is not a list")
        diff_ids = [digest(d if isinstance(d, str) else repr(d), where, "rootfs.diff_ids entry")
                    for d in diffs]
        prel = f"{IMAGEDB}/metadata/sha256/{name}/parent"
        parent = digest(root.read_text(prel), root.display(prel), "parent") \
            if root.exists(prel) else None
        images["sha256:" + name] = Image(
            "sha256:" + name, raw, tuple(diff_ids), tuple(chain_ids(diff_ids)), parent,
            hashlib.sha256(raw).hexdigest() == name)
    return images


def read_tags(root: Root) -> dict[str, str]:
    """``{"repo:tag" or "repo@digest": image id}``."""
    if not root.exists(REPOSITORIES):
        return {}
    obj = root.read_json_object(REPOSITORIES)
    where = root.display(REPOSITORIES)
    repos = obj.get("Repositories") or {}
    if not isinstance(repos, dict):
        raise StoreError(where, "Repositories is not an object")
    tags: dict[str, str] = {}
    for repo, refs in repos.items():
        if not isinstance(refs, dict):
            raise StoreError(where, f"Repositories[{repo!r}] is not an object")
        for ref, image_id in refs.items():
            if not isinstance(image_id, str):
                raise StoreError(where, f"{ref!r} does not name an image id")
            tags[ref] = digest(image_id, where, f"image of {ref}")
    return tags


def read_containers(root: Root) -> dict[str, Container]:
    out: dict[str, Container] = {}
    for name in root.listdir(CONTAINERS):
        check_component(name, root.display(CONTAINERS))
        rel = f"{CONTAINERS}/{name}/config.v2.json"
        if not root.is_dir(f"{CONTAINERS}/{name}"):
            continue
        if not root.exists(rel):
            raise StoreError(root.display(rel), "missing")
        obj = root.read_json_object(rel)
        where = root.display(rel)
        cid, cname, image = obj.get("ID"), obj.get("Name", ""), obj.get("Image", "")
        if cid != name:
            raise StoreError(where, f"ID {cid!r} differs from the directory name")
        if not isinstance(cname, str) or not isinstance(image, str):
            raise StoreError(where, "Name or Image is not a string")
        out[name] = Container(name, cname.removeprefix("/"), image,
                              str(obj.get("Driver", "")))
    return out
