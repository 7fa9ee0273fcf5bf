"""``dmimage docker check``: Docker's bookkeeping against the thin pool, and against itself.

What dockerd 20.10 would do with an open transaction at its next start (deviceset.go,
``processPendingTransaction``): nothing when its id equals the pool's transaction id; a
rollback (delete that device and its JSON) when it is greater; an error when it is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dmimage.docker.store import Store
from dmimage.thin.check import check_metadata
from dmimage.thin.pool import open_pool


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # leak, missing, deleted, duplicate-id, transaction, no-device, ...
    message: str
    device_id: int | None = None
    hash: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(slots=True)
class StoreReport:
    problems: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pool_transaction_id: int | None = None
    docker_transaction_id: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "pool_transaction_id": self.pool_transaction_id,
                "docker_transaction_id": self.docker_transaction_id,
                "problems": [{"kind": p.kind, "message": p.message, "device_id": p.device_id,
                              "hash": p.hash} for p in self.problems],
                "notes": self.notes}


def check_store(store: Store) -> StoreReport:
    rep = StoreReport()
    add = rep.problems.append
    meta = check_metadata(store.pool_files.metadata)
    for p in meta.problems:
        add(Finding("pool-metadata", f"{store.pool_files.metadata}: {p}"))
    if not meta.ok():
        return rep  # the pool cannot be trusted for the cross-checks
    with open_pool(store.pool_files.metadata) as pool:
        pool_ids = set(pool.devices())
        pool_tid = pool.live_superblock.trans_id
    rep.pool_transaction_id = pool_tid
    devs = store.devices.devices

    by_id: dict[int, list[str]] = {}
    for d in devs.values():
        by_id.setdefault(d.device_id, []).append(d.name)
    for dev_id, names in sorted(by_id.items()):
        if len(names) > 1:
            add(Finding("duplicate-id", f"device id {dev_id} is claimed by "
                        f"{', '.join(names)}", dev_id))
    for d in devs.values():
        if d.deleted:
            add(Finding("deleted", f"{d.source} is marked deleted: true (a deferred deletion "
                        "dockerd has not finished)", d.device_id, d.name))
        if d.device_id not in pool_ids and not d.deleted:
            add(Finding("missing", f"{d.source} names device id {d.device_id}, which the pool "
                        "does not have", d.device_id, d.name))
        if d.transaction_id > pool_tid:
            add(Finding("transaction", f"{d.source} has transaction_id {d.transaction_id}, "
                        f"ahead of the pool's {pool_tid}", d.device_id, d.name))
    for dev_id in sorted(pool_ids - set(by_id)):
        add(Finding("leak", f"thin device {dev_id} is in the pool but no device JSON names it",
                    dev_id))

    tr = store.devices.transaction
    if tr is not None:
        rep.docker_transaction_id = tr.open_transaction_id
        if tr.open_transaction_id > pool_tid:
            add(Finding("transaction", f"open transaction {tr.open_transaction_id} is ahead of "
                        f"the pool's {pool_tid}: dockerd will roll it back at its next start "
                        f"(delete device {tr.device_id}, {tr.device_hash or 'base'})",
                        tr.device_id, tr.device_hash))
        elif tr.open_transaction_id < pool_tid:
            add(Finding("transaction", f"open transaction {tr.open_transaction_id} is behind "
                        f"the pool's {pool_tid}: dockerd reports an error at its next start",
                        tr.device_id, tr.device_hash))
    if store.devices.legacy_unmigrated:
        rep.notes.append("devicemapper/devicemapper/json is not migrated yet (dockerd "
                         "migrates it at its next start)")

    referenced: set[str] = {""}
    for layer in store.layers.values():
        referenced.add(layer.cache_id)
        if layer.cache_id not in devs:
            add(Finding("no-device", f"layer {layer.chain_id} names device {layer.cache_id}, "
                        "which has no device JSON", hash=layer.cache_id))
        if layer.parent and layer.parent not in store.layers:
            add(Finding("layer", f"layer {layer.chain_id} has parent {layer.parent}, which is "
                        "not in the layerdb"))
    for m in store.mounts.values():
        for h in (m.mount_id, m.init_id):
            if h is None:
                continue
            referenced.add(h)
            if h not in devs:
                add(Finding("no-device", f"container {m.container_id} names device {h}, which "
                            "has no device JSON", hash=h))
    for d in devs.values():
        if d.hash not in referenced and not d.deleted:
            add(Finding("unreferenced", f"{d.source} (device {d.device_id}) belongs to no "
                        "layer or container", d.device_id, d.name))
    for img in store.images.values():
        if not img.digest_ok:
            add(Finding("image", f"image {img.id}: the config's sha256 differs from its name"))
        for cid in img.chain_ids:
            if cid not in store.layers:
                add(Finding("image", f"image {img.id} needs layer {cid}, which is not in the "
                            "layerdb"))
                break
    for ref, image_id in sorted(store.tags.items()):
        if image_id not in store.images:
            add(Finding("tag", f"{ref} names image {image_id}, which is not in the imagedb"))
    for c in store.containers.values():
        if c.id not in store.mounts:
            add(Finding("no-device", f"container {c.id} ({c.name}) has no layerdb mount"))
        if c.image and c.image not in store.images:
            add(Finding("container", f"container {c.id} ({c.name}) uses image {c.image}, "
                        "which is not in the imagedb"))
    return rep
