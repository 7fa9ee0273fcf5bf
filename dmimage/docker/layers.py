"""The layer store: ``image/devicemapper/layerdb/sha256/<chain-id>/`` (read-only layers) and
``layerdb/mounts/<container-id>/`` (a container's read-write layer), as moby's
``layer/filestore.go`` lays them out. For devicemapper a layer's cache-id is its device hash;
a container's devices are ``<mount-id>`` and ``<mount-id>-init``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dmimage.docker.errors import StoreError
from dmimage.docker.paths import Root, check_component

LAYERDB = "image/devicemapper/layerdb"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Layer:
    chain_id: str  # sha256:...
    diff_id: str
    cache_id: str  # the device hash
    parent: str | None
    size: int | None
    tar_split: str | None  # path of tar-split.json.gz relative to ROOT, when present

    @property
    def dir(self) -> str:
        return f"{LAYERDB}/sha256/{self.chain_id.removeprefix('sha256:')}"


@dataclass(frozen=True, slots=True)
class Mount:
    container_id: str
    mount_id: str  # device hash of the writable layer
    init_id: str | None  # device hash of the init layer
    parent: str | None  # chain id of the image's top layer


def digest(text: str, where: str, what: str) -> str:
    text = text.strip()
    if not DIGEST.fullmatch(text):
        raise StoreError(where, f"{what} {text[:80]!r} is not a sha256 digest")
    return text


def _opt(root: Root, rel: str) -> str | None:
    return root.read_text(rel) if root.exists(rel) else None


def read_layers(root: Root) -> dict[str, Layer]:
    layers: dict[str, Layer] = {}
    base = f"{LAYERDB}/sha256"
    for name in root.listdir(base):
        if not HEX64.fullmatch(name) or not root.is_dir(f"{base}/{name}"):
            continue  # dockerd skips what is not a digest directory too
        d = f"{base}/{name}"
        cache = _opt(root, f"{d}/cache-id")
        if cache is None:
            raise StoreError(root.display(f"{d}/cache-id"), "missing (a layer without a device)")
        cache_id = check_component(cache.strip(), root.display(f"{d}/cache-id"))
        diff_t = _opt(root, f"{d}/diff")
        if diff_t is None:
            raise StoreError(root.display(f"{d}/diff"), "missing")
        diff = digest(diff_t, root.display(f"{d}/diff"), "diff id")
        parent_t = _opt(root, f"{d}/parent")
        parent = digest(parent_t, root.display(f"{d}/parent"), "parent") if parent_t else None
        size_t = _opt(root, f"{d}/size")
        size = None
        if size_t is not None:
            try:
                size = int(size_t.strip())
            except ValueError:
                raise StoreError(root.display(f"{d}/size"),
                                 f"{size_t[:40]!r} is not a number") from None
        ts = f"{d}/tar-split.json.gz"
        layers["sha256:" + name] = Layer("sha256:" + name, diff, cache_id, parent, size,
                                         ts if root.exists(ts) else None)
    return layers


def read_mounts(root: Root) -> dict[str, Mount]:
    mounts: dict[str, Mount] = {}
    base = f"{LAYERDB}/mounts"
    for name in root.listdir(base):
        d = f"{base}/{check_component(name, root.display(base))}"
        if not root.is_dir(d):
            continue
        mid = _opt(root, f"{d}/mount-id")
        if mid is None:
            raise StoreError(root.display(f"{d}/mount-id"), "missing")
        mount_id = check_component(mid.strip(), root.display(f"{d}/mount-id"))
        iid = _opt(root, f"{d}/init-id")
        init_id = check_component(iid.strip(), root.display(f"{d}/init-id")) if iid else None
        pt = _opt(root, f"{d}/parent")
        parent = digest(pt, root.display(f"{d}/parent"), "parent") if pt else None
        mounts[name] = Mount(name, mount_id, init_id, parent)
    return mounts
