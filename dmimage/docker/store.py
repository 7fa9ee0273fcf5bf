"""The whole store: Docker's files under ROOT plus the thin pool they describe."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dmimage.docker.devices import LOOP_DIR, DeviceInfo, DeviceTable, read_devices
from dmimage.docker.errors import AmbiguousName, NameNotFound, StoreIOError
from dmimage.docker.images import (
    Container,
    Image,
    read_containers,
    read_images,
    read_tags,
)
from dmimage.docker.layers import Layer, Mount, read_layers, read_mounts
from dmimage.docker.paths import Root


@dataclass(slots=True)
class PoolFiles:
    """The pool's metadata and data: loop-lvm files under ROOT by default, or the devices the
    user names for direct-lvm (``dm.thinpooldev``)."""

    metadata: str
    data: str


@dataclass(slots=True)
class Store:
    root: Root
    devices: DeviceTable
    layers: dict[str, Layer]
    mounts: dict[str, Mount]
    images: dict[str, Image]
    tags: dict[str, str]
    containers: dict[str, Container]
    pool_files: PoolFiles

    def device(self, hash_: str) -> DeviceInfo | None:
        return self.devices.devices.get(hash_)

    def tags_of(self, image_id: str) -> list[str]:
        return sorted(t for t, i in self.tags.items() if i == image_id)

    def container_by_name(self) -> dict[str, Container]:
        return {c.name: c for c in self.containers.values()}


def open_store(root: str | os.PathLike[str], *, metadata: str | None = None,
               data: str | None = None) -> Store:
    """Read every bookkeeping file under *root*; the pool files are located, not yet read."""
    r = Root(root)
    if metadata is None or data is None:
        loop = r.resolve(LOOP_DIR, must_exist=False)
        if loop is None and (metadata is None or data is None):
            raise StoreIOError(r.display(LOOP_DIR), "no loop-lvm pool files here (for "
                               "direct-lvm, name the pool's --metadata and --data)")
        assert loop is not None
        metadata = metadata or r.resolve(f"{LOOP_DIR}/metadata")
        data = data or r.resolve(f"{LOOP_DIR}/data")
    assert metadata is not None and data is not None
    return Store(r, read_devices(r), read_layers(r), read_mounts(r), read_images(r),
                 read_tags(r), read_containers(r), PoolFiles(metadata, data))


@dataclass(frozen=True, slots=True)
class Target:
    """What a NAME resolved to: a device, and how it was named."""

    kind: str  # image | container | layer | device
    label: str
    device: DeviceInfo


def resolve(store: Store, name: str) -> Target:
    """A NAME, tried in this order: repo:tag (":latest" implied), a container name, a full
    image, container, layer (chain or diff) id or device hash (``base``), then a unique prefix
    of an image or container id."""

    def dev(kind: str, label: str, hash_: str) -> Target:
        d = store.device(hash_)
        if d is None:
            raise NameNotFound(name, f"{kind} {label} has no device JSON for {hash_ or 'base'}")
        return Target(kind, label, d)

    def image(image_id: str) -> Target:
        img = store.images.get(image_id)
        if img is None:
            raise NameNotFound(name, f"names image {image_id}, which is not in the imagedb")
        top = img.top_chain_id
        layer = store.layers.get(top) if top else None
        if layer is None:
            raise NameNotFound(name, f"image {image_id} has no top layer in the layerdb")
        return dev("image", image_id, layer.cache_id)

    def container(cid: str) -> Target:
        m = store.mounts.get(cid)
        if m is None:
            raise NameNotFound(name, f"container {cid} has no layerdb mount")
        return dev("container", cid, m.mount_id)

    tagged = store.tags.get(name) or (None if ":" in name or "@" in name
                                      else store.tags.get(f"{name}:latest"))
    if tagged is not None:
        return image(tagged)
    byname = store.container_by_name()
    if name.removeprefix("/") in byname:
        return container(byname[name.removeprefix("/")].id)
    full = name if name.startswith("sha256:") else f"sha256:{name}"
    if full in store.images:
        return image(full)
    if name in store.containers:
        return container(name)
    for layer in store.layers.values():
        if full in (layer.chain_id, layer.diff_id):
            return dev("layer", layer.chain_id, layer.cache_id)
    if name == "base":
        return dev("device", "base", "")
    if name in store.devices.devices:
        return dev("device", name, name)
    if _hexish(name):
        bare = name.removeprefix("sha256:")
        hits = [("image", i) for i in store.images if i[7:].startswith(bare)]
        if not name.startswith("sha256:"):
            hits += [("container", c) for c in store.containers if c.startswith(bare)]
        if len(hits) > 1:
            raise AmbiguousName(name, f"ambiguous id prefix ({len(hits)} images and "
                                "containers match)")
        if hits:
            kind, ident = hits[0]
            return image(ident) if kind == "image" else container(ident)
    raise NameNotFound(name, "no image, container, layer or device has this name")


def article(kind: str) -> str:
    """"an image", "a container": for messages."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _hexish(name: str) -> bool:
    bare = name.removeprefix("sha256:")
    return bool(bare) and all(c in "0123456789abcdef" for c in bare)


def default_pool_paths(root: Path) -> PoolFiles:
    return PoolFiles(str(root / LOOP_DIR / "metadata"), str(root / LOOP_DIR / "data"))
