"""What ``lvs`` shows, computed from the metadata alone (every LV inactive).

Field names and values follow lvm2's report (``lvs --reportformat json --units b --nosuffix``);
lv_attr follows lib/metadata/lv.c for an LV that is not active: state and open flags are '-'.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmimage.format.lvm import SECTOR_SIZE
from dmimage.lvm.model import (
    LogicalVolume,
    StripedSegment,
    ThinPoolSegment,
    ThinSegment,
    UnknownSegment,
    VolumeGroup,
)

_ALLOC = {"contiguous": "c", "cling": "l", "cling_by_tags": "l", "normal": "n",
          "anywhere": "a", "inherit": "i"}


@dataclass
class Roles:
    """Which LVs play which part in the VG's pools and snapshots."""

    tmeta: set[str]
    tdata: set[str]
    pool_of: dict[str, str]  # sub-LV -> pool
    external_origins: set[str]
    spares: set[str]


def roles(vg: VolumeGroup) -> Roles:
    r = Roles(set(), set(), {}, set(), set())
    for lv in vg.lvs:
        for s in lv.segments:
            if isinstance(s, ThinPoolSegment):
                r.tmeta.add(s.metadata)
                r.tdata.add(s.pool)
                r.pool_of[s.metadata] = lv.name
                r.pool_of[s.pool] = lv.name
            elif isinstance(s, ThinSegment) and s.external_origin:
                r.external_origins.add(s.external_origin)
        if "POOL_METADATA_SPARE" in lv.status or lv.name.endswith("_pmspare"):
            r.spares.add(lv.name)
    return r


def segtype(lv: LogicalVolume) -> str:
    if not lv.segments:
        return ""
    s = lv.segments[0]
    if isinstance(s, StripedSegment):
        return "linear" if len(s.stripes) == 1 else "striped"
    return s.type


def lv_attr(vg: VolumeGroup, lv: LogicalVolume, r: Roles, partial: bool) -> str:
    first = lv.segments[0] if lv.segments else None
    a = ["-"] * 10
    if lv.name in r.external_origins:
        a[0] = "o"
    elif lv.name in r.tmeta or lv.name in r.spares:
        a[0] = "e"
    elif isinstance(first, ThinSegment):
        a[0] = "V"
    elif isinstance(first, ThinPoolSegment):
        a[0] = "t"
    elif lv.name in r.tdata:
        a[0] = "T"
    a[1] = "w" if "WRITE" in lv.status else "r" if "READ" in lv.status else "-"
    alloc = lv.extra.get("allocation_policy", "inherit")
    a[2] = _ALLOC.get(str(alloc), "i")
    if "LOCKED" in lv.status:
        a[2] = a[2].upper()
    a[3] = "m" if "FIXED_MINOR" in lv.status else "-"
    if isinstance(first, (ThinSegment, ThinPoolSegment)):
        a[6] = "t"
    elif any(isinstance(s, UnknownSegment) for s in lv.segments):
        a[6] = "u"
    pool = first if isinstance(first, ThinPoolSegment) else None
    if isinstance(first, ThinSegment):
        pool_lv = vg.lv(first.thin_pool)
        if pool_lv is not None and isinstance(pool_lv.segments[0], ThinPoolSegment):
            pool = pool_lv.segments[0]
    if pool is not None and pool.zero_new_blocks == 1:
        a[7] = "z"
    if partial:
        a[8] = "p"
    if "ACTIVATION_SKIP" in lv.flags or "ACTIVATION_SKIP" in lv.status:
        a[9] = "k"
    return "".join(a)


def lv_rows(vg: VolumeGroup, all_lvs: bool,
            partial: set[str] | None = None) -> list[dict[str, str]]:
    """One lvs row per LV, sorted by name as lvs sorts; hidden LVs bracketed, only with -a."""
    r = roles(vg)
    rows = []
    ext = vg.extent_size * SECTOR_SIZE
    for lv in sorted(vg.lvs, key=lambda x: x.name):
        if not lv.visible and not all_lvs:
            continue
        first = lv.segments[0] if lv.segments else None
        thin = first if isinstance(first, ThinSegment) else None
        pool = first if isinstance(first, ThinPoolSegment) else None
        rows.append({
            "lv_name": lv.name if lv.visible else f"[{lv.name}]",
            "vg_name": vg.name,
            "lv_attr": lv_attr(vg, lv, r, lv.name in (partial or set())),
            "lv_size": str(lv.extent_count * ext),
            "pool_lv": thin.thin_pool if thin else "",
            "origin": (thin.origin or thin.external_origin or "") if thin else "",
            "segtype": segtype(lv),
            "thin_id": str(thin.device_id) if thin else "",
            # lvs shows a pool's transaction_id, and the one a thin was created in
            "transaction_id": str(pool.transaction_id) if pool else
                              str(thin.transaction_id) if thin else "",
            "lv_uuid": lv.id,
        })
    return rows


def lineage(vg: VolumeGroup) -> list[str]:
    """Thin snapshot trees, one block per pool: each thin under its origin."""
    lines: list[str] = []
    thins = [(lv, lv.segments[0]) for lv in vg.lvs
             if lv.segments and isinstance(lv.segments[0], ThinSegment)]
    for pool in sorted(vg.lvs, key=lambda x: x.name):
        if not pool.segments or not isinstance(pool.segments[0], ThinPoolSegment):
            continue
        lines.append(f"{vg.name}/{pool.name} (transaction_id "
                     f"{pool.segments[0].transaction_id})")
        mine = {lv.name: s for lv, s in thins if s.thin_pool == pool.name}
        children: dict[str | None, list[str]] = {}
        for name, s in mine.items():
            parent = s.origin if s.origin in mine else None
            children.setdefault(parent, []).append(name)

        for root in sorted(children.get(None, [])):
            _walk(lines, mine, children, root, 1, frozenset())
    return lines


def _walk(lines: list[str], mine: dict[str, ThinSegment], children: dict[str | None, list[str]],
          name: str, depth: int, seen: frozenset[str]) -> None:
    s = mine[name]
    ext = f", external origin {s.external_origin}" if s.external_origin else ""
    lines.append(f"{'  ' * depth}└─ {name} (thin_id {s.device_id}{ext})")
    if name in seen:
        lines.append(f"{'  ' * (depth + 1)}(origin loop)")
        return
    for child in sorted(children.get(name, [])):
        _walk(lines, mine, children, child, depth + 1, seen | {name})
