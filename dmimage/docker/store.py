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
    #: where the pool's data starts in *data* (an LVM ``_tdata`` inside a PV), bytes
    data_offset: int = 0
    #: the PVs read for ``--lvm`` (what a lock plan must hold)
    disks: tuple[str, ...] = ()


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
               data: str | None = None, lvm: tuple[list[str], str] | None = None) -> Store:
    """Read every bookkeeping file under *root*; the pool files are located, not yet read.
    With *lvm* (disks, "VG/POOL"), the pool is an LVM thin pool (direct-lvm,
    ``dm.thinpooldev``): see :func:`lvm_pool_files`."""
    r = Root(root)
    if lvm is not None:
        pf = lvm_pool_files(*lvm)
        return Store(r, read_devices(r), read_layers(r), read_mounts(r), read_images(r),
                     read_tags(r), read_containers(r), pf)
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


def lvm_pool_files(disks: list[str], vg_pool: str) -> PoolFiles:
    """The pool VG/POOL found on *disks* with dmimage's LVM reader: its ``_tmeta`` copied to
    a temporary file (removed when the process exits; metadata is small), its ``_tdata``
    read in place, which must be one run of one PV (what lvcreate allocates unless the pool
    was extended onto other extents)."""
    import atexit
    import tempfile

    from dmimage.errors import UsageError
    from dmimage.lvm.thin import data_view, metadata_source, pool_segment
    from dmimage.lvm.vg import find_vg, load_vgs

    vgname, _, poolname = vg_pool.partition("/")
    if not vgname or not poolname:
        raise UsageError(f"--lvm: {vg_pool!r}: give the pool as VG/POOL after the disks")
    loaded, _, problems = load_vgs(disks)
    lvg = find_vg(loaded, vgname, problems)
    lv = lvg.vg.lv(poolname)
    if lv is None:
        raise UsageError(f"--lvm: VG {vgname} has no LV {poolname}")
    pool_segment(lv)  # a thin pool, or a usage error naming it
    view = data_view(lvg, lv)
    try:
        run = view.contiguous()
    finally:
        view.close()
    if run is None:
        raise UsageError(f"--lvm: {vg_pool}'s data LV is in several pieces; not supported "
                         "(give --metadata and --data of an activated pool instead)")
    fd, tmp = tempfile.mkstemp(prefix="dmimage-docker-tmeta-")
    os.close(fd)

    def _remove() -> None:
        if os.path.exists(tmp):
            os.unlink(tmp)

    atexit.register(_remove)
    with metadata_source(lvg, lv) as src:
        with open(src.path, "rb") as fi, open(tmp, "wb") as fo:
            start, length = src.window or (0, os.fstat(fi.fileno()).st_size)
            fi.seek(start)
            left = length
            while left:
                buf = fi.read(min(left, 4 << 20))
                if not buf:
                    break
                fo.write(buf)
                left -= len(buf)
    return PoolFiles(tmp, run[0], run[1], tuple(disks))
