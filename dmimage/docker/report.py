"""``dmimage docker ls``: images, layers, containers and devices of a store, joined with the
pool's view (device present, mapped / exclusive / shared blocks as thin_ls counts them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dmimage.docker.devices import DeviceInfo
from dmimage.docker.store import Store
from dmimage.format.constants import SECTOR_SIZE
from dmimage.thin.ls import DeviceUsage, device_usage
from dmimage.thin.pool import Pool, open_pool


@dataclass(slots=True)
class PoolView:
    transaction_id: int
    data_block_size: int  # bytes
    nr_data_blocks: int
    free_data_blocks: int
    usage: dict[int, DeviceUsage]


def pool_view(pool: Pool) -> PoolView:
    sb = pool.live_superblock
    usage = {u.dev_id: u for u in device_usage(pool)}
    return PoolView(sb.trans_id, pool.superblock.data_block_size * SECTOR_SIZE,
                    sb.nr_data_blocks, sb.nr_data_blocks - sb.data_sm.nr_allocated, usage)


def read_pool_view(store: Store) -> PoolView:
    with open_pool(store.pool_files.metadata) as pool:
        return pool_view(pool)


def _dev(store: Store, view: PoolView, hash_: str | None) -> dict[str, Any]:
    """The device fields for a layer/container entry."""
    if hash_ is None:
        return {"device_hash": None, "device_id": None}
    d = store.device(hash_)
    out: dict[str, Any] = {"device_hash": hash_, "device_id": d.device_id if d else None}
    u = view.usage.get(d.device_id) if d else None
    out["mapped_blocks"] = u.mapped_blocks if u else None
    out["exclusive_blocks"] = u.exclusive_blocks if u else None
    out["shared_blocks"] = u.shared_blocks if u else None
    return out


def _device(d: DeviceInfo, view: PoolView) -> dict[str, Any]:
    u = view.usage.get(d.device_id)
    return {"hash": d.name, "device_id": d.device_id, "size": d.size,
            "transaction_id": d.transaction_id, "initialized": d.initialized,
            "deleted": d.deleted, "in_pool": u is not None,
            "mapped_blocks": u.mapped_blocks if u else None,
            "exclusive_blocks": u.exclusive_blocks if u else None,
            "shared_blocks": u.shared_blocks if u else None}


def ls_data(store: Store, view: PoolView) -> dict[str, Any]:
    """The ``ls --json`` document."""
    images = []
    for img in store.images.values():
        top = store.layers.get(img.top_chain_id) if img.top_chain_id else None
        dev = _dev(store, view, top.cache_id if top else None)
        images.append({"id": img.id, "tags": store.tags_of(img.id), "parent": img.parent,
                       "top_layer": img.top_chain_id, "device_hash": dev["device_hash"],
                       "device_id": dev["device_id"], "layers": list(img.chain_ids)})
    layers = []
    for layer in store.layers.values():
        layers.append({"chain_id": layer.chain_id, "diff_id": layer.diff_id,
                       "parent": layer.parent, "size": layer.size,
                       **_dev(store, view, layer.cache_id)})
    containers = []
    for c in store.containers.values():
        m = store.mounts.get(c.id)
        rw = _dev(store, view, m.mount_id if m else None)
        init = _dev(store, view, m.init_id if m else None)
        containers.append({"id": c.id, "name": c.name, "image": c.image,
                           "device_hash": rw["device_hash"], "device_id": rw["device_id"],
                           "init_device_hash": init["device_hash"],
                           "init_device_id": init["device_id"],
                           "mapped_blocks": rw.get("mapped_blocks"),
                           "exclusive_blocks": rw.get("exclusive_blocks"),
                           "shared_blocks": rw.get("shared_blocks")})
    devices = [_device(d, view) for d in store.devices.devices.values()]
    ds, tr = store.devices.deviceset, store.devices.transaction
    pool = {"metadata": store.pool_files.metadata, "data": store.pool_files.data,
            "transaction_id": view.transaction_id,
            "docker_transaction_id": tr.open_transaction_id if tr else None,
            "open_transaction": ({"id": tr.open_transaction_id, "device_hash": tr.device_hash,
                                  "device_id": tr.device_id} if tr else None),
            "next_device_id": ds.next_device_id if ds else None,
            "base_filesystem": ds.base_device_filesystem if ds else None,
            "data_block_size": view.data_block_size, "nr_data_blocks": view.nr_data_blocks,
            "free_data_blocks": view.free_data_blocks,
            "free_bytes": view.free_data_blocks * view.data_block_size,
            "thin_devices": len(view.usage)}
    return {"images": images, "layers": layers, "containers": containers,
            "devices": devices, "pool": pool}


def _short(ident: str | None) -> str:
    return "-" if ident is None else ident.removeprefix("sha256:")[:12]


def ls_text(doc: dict[str, Any]) -> str:
    """A table per kind."""
    out = []
    p = doc["pool"]
    out.append(f"POOL transaction_id {p['transaction_id']} (docker {p['docker_transaction_id']}),"
               f" next_device_id {p['next_device_id']}, {p['thin_devices']} thin devices, "
               f"{p['free_data_blocks']} of {p['nr_data_blocks']} data blocks free")
    out.append("")
    out.append(f"{'IMAGE':<14}{'DEVICE':>7}  TAGS")
    for i in doc["images"]:
        out.append(f"{_short(i['id']):<14}{_cell(i['device_id']):>7}  "
                   f"{', '.join(i['tags']) or '<none>'}")
    out.append("")
    out.append(f"{'LAYER':<14}{'DIFF':<14}{'DEVICE':>7}{'MAPPED':>8}{'EXCL':>8}{'SHARED':>8}")
    for x in doc["layers"]:
        out.append(f"{_short(x['chain_id']):<14}{_short(x['diff_id']):<14}"
                   f"{_cell(x['device_id']):>7}{_cell(x['mapped_blocks']):>8}"
                   f"{_cell(x['exclusive_blocks']):>8}{_cell(x['shared_blocks']):>8}")
    out.append("")
    out.append(f"{'CONTAINER':<14}{'NAME':<16}{'IMAGE':<14}{'DEVICE':>7}{'INIT':>7}")
    for c in doc["containers"]:
        out.append(f"{_short(c['id']):<14}{c['name']:<16}{_short(c['image']):<14}"
                   f"{_cell(c['device_id']):>7}{_cell(c['init_device_id']):>7}")
    return "\n".join(out) + "\n"


def _cell(v: object) -> str:
    return "-" if v is None else str(v)


def ls_tree(doc: dict[str, Any]) -> str:
    """Lineage: layers from the base up, each with the images whose top it is and the
    containers built on it."""
    children: dict[str | None, list[dict[str, Any]]] = {}
    for x in doc["layers"]:
        children.setdefault(x["parent"], []).append(x)
    tops: dict[str, list[dict[str, Any]]] = {}
    for i in doc["images"]:
        if i["top_layer"]:
            tops.setdefault(i["top_layer"], []).append(i)
    by_image: dict[str, list[dict[str, Any]]] = {}
    for c in doc["containers"]:
        by_image.setdefault(c["image"], []).append(c)
    lines: list[str] = []

    def walk(parent: str | None, indent: str) -> None:
        for x in sorted(children.get(parent, []), key=lambda x: x["chain_id"]):
            lines.append(f"{indent}layer {_short(x['chain_id'])} device {_cell(x['device_id'])}")
            for i in tops.get(x["chain_id"], []):
                lines.append(f"{indent}  image {_short(i['id'])} "
                             f"{' '.join(i['tags']) or '<none>'}")
                for c in by_image.get(i["id"], []):
                    lines.append(f"{indent}    container {c['name']} device "
                                 f"{_cell(c['device_id'])} (init {_cell(c['init_device_id'])})")
            walk(x["chain_id"], indent + "  ")

    walk(None, "")
    return "\n".join(lines) + "\n"
