"""What ``lvs`` shows, computed from the metadata alone (every LV inactive).

Field names and values follow lvm2's report (``lvs --reportformat json --units b --nosuffix``).
lv_attr follows lvm2 2.03.16's lib/metadata/lv.c (lv_attr_dup_with_info_and_seg_status) for an
LV that is not active: state and open flags are '-', and the health flags that need a live
device (raid sync, cache/thin-pool status) stay '-', as lvs prints them for inactive LVs.
lvm2 derives most roles (raid image, mirror log, cache origin...) from the segments that name
a sub-LV, not from status flags; :func:`roles` does the same. Segment types lvm2 does not know
show 'u' in the volume-type column, as lvm2 shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dmimage.format.lvm import SECTOR_SIZE
from dmimage.lvm.model import (
    LogicalVolume,
    Segment,
    StripedSegment,
    ThinPoolSegment,
    ThinSegment,
    VolumeGroup,
)

_ALLOC = {"contiguous": "c", "cling": "l", "cling_by_tags": "l", "normal": "n",
          "anywhere": "a", "inherit": "i"}

#: Segment types lvm2 2.03.16 registers (lib/*/: striped, mirror, snapshot, thin, cache,
#: writecache, integrity, raid, vdo, zero/error/free); anything else is 'u'nknown to it.
RAID_TYPES = frozenset({
    "raid0", "raid0_meta", "raid1", "raid10", "raid10_near", "raid4", "raid5", "raid5_la",
    "raid5_ra", "raid5_ls", "raid5_rs", "raid5_n", "raid6", "raid6_zr", "raid6_nr", "raid6_nc",
    "raid6_ls_6", "raid6_rs_6", "raid6_la_6", "raid6_ra_6", "raid6_n_6"})
VIRTUAL_TYPES = frozenset({"zero", "error", "free", "vdo"})
KNOWN_TYPES = RAID_TYPES | VIRTUAL_TYPES | {
    "striped", "linear", "mirror", "snapshot", "thin", "thin-pool", "cache", "cache-pool",
    "writecache", "integrity", "vdo-pool"}


def one_line(text: str) -> str:
    """``text`` safe to print as one line: names read from a damaged or hostile VG text may
    hold newlines, control characters or bytes that are not UTF-8 (kept as surrogates); each
    such character becomes a backslash escape (``\\n``, ``\\x1b``, ``\\xff``)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def base_type(seg: Segment) -> str:
    """The segment type without lvm2's ``+FLAG`` suffixes (``cache+CACHE_USES_CACHEVOL``)."""
    return seg.type.split("+", 1)[0]


@dataclass
class Roles:
    """Which LVs play which part for other LVs of the VG (lvm2 sets these flags on import)."""

    tmeta: set[str] = field(default_factory=set)
    tdata: set[str] = field(default_factory=set)
    pool_of: dict[str, str] = field(default_factory=dict)  # thin sub-LV -> pool
    external_origins: set[str] = field(default_factory=set)
    spares: set[str] = field(default_factory=set)
    raid_image: set[str] = field(default_factory=set)
    raid_meta: set[str] = field(default_factory=set)
    mirror_image: set[str] = field(default_factory=set)
    mirror_log: set[str] = field(default_factory=set)
    cache_pool_meta: set[str] = field(default_factory=set)
    cache_pool_data: set[str] = field(default_factory=set)
    cache_vol: set[str] = field(default_factory=set)  # a cache pool or cachevol in use
    cache_origin: set[str] = field(default_factory=set)
    writecache_origin: set[str] = field(default_factory=set)
    integrity_meta: set[str] = field(default_factory=set)
    vdo_pool_data: set[str] = field(default_factory=set)
    thick_origin: set[str] = field(default_factory=set)  # origin of an old-style snapshot
    cow: dict[str, str] = field(default_factory=dict)  # COW LV -> its snapshot's origin
    snapshot_lvs: set[str] = field(default_factory=set)  # the internal snapshotN LVs
    visible_cow: set[str] = field(default_factory=set)
    by_name: dict[str, LogicalVolume] = field(default_factory=dict)


def _names(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _name(value: object) -> str | None:
    return value if isinstance(value, str) else None


def roles(vg: VolumeGroup) -> Roles:
    r = Roles()
    r.by_name = {lv.name: lv for lv in vg.lvs}
    for lv in vg.lvs:
        for s in lv.segments:
            t, x = base_type(s), s.extra
            if isinstance(s, ThinPoolSegment):
                r.tmeta.add(s.metadata)
                r.tdata.add(s.pool)
                r.pool_of[s.metadata] = lv.name
                r.pool_of[s.pool] = lv.name
            elif isinstance(s, ThinSegment):
                if s.external_origin:
                    r.external_origins.add(s.external_origin)
            elif t in RAID_TYPES:
                # raid0 without metadata LVs lists its images as raid0_lvs (raid_manip.c)
                r.raid_image.update(_names(x.get("raid0_lvs")))
                raids = _names(x.get("raids"))
                count = x.get("device_count")
                if isinstance(count, int) and len(raids) == 2 * count:  # (rmeta, rimage) pairs
                    r.raid_meta.update(raids[0::2])
                    r.raid_image.update(raids[1::2])
                else:
                    r.raid_image.update(raids)
            elif t == "mirror":
                r.mirror_image.update(_names(x.get("mirrors")))
                if (log := _name(x.get("mirror_log"))) is not None:
                    r.mirror_log.add(log)
            elif t == "cache-pool":
                for key, dest in (("metadata", r.cache_pool_meta), ("data", r.cache_pool_data)):
                    if (n := _name(x.get(key))) is not None:
                        dest.add(n)
            elif t == "cache":
                if (n := _name(x.get("cache_pool"))) is not None:
                    r.cache_vol.add(n)
                if (n := _name(x.get("origin"))) is not None:
                    r.cache_origin.add(n)
            elif t == "writecache":
                if (n := _name(x.get("writecache"))) is not None:
                    r.cache_vol.add(n)
                if (n := _name(x.get("origin"))) is not None:
                    r.writecache_origin.add(n)
            elif t == "integrity":
                if (n := _name(x.get("meta_dev"))) is not None:
                    r.integrity_meta.add(n)
            elif t == "vdo-pool":
                if (n := _name(x.get("data"))) is not None:
                    r.vdo_pool_data.add(n)
            elif t == "snapshot":
                r.snapshot_lvs.add(lv.name)
                origin, cow = _name(x.get("origin")), _name(x.get("cow_store"))
                if origin is not None:
                    r.thick_origin.add(origin)
                if cow is not None:
                    r.cow[cow] = origin or ""
                    if lv.visible:
                        r.visible_cow.add(cow)
        if "POOL_METADATA_SPARE" in lv.status or lv.name.endswith("_pmspare"):
            r.spares.add(lv.name)
        if "CACHE_VOL" in lv.flags:
            r.cache_vol.add(lv.name)
    return r


def _types(lv: LogicalVolume) -> set[str]:
    return {base_type(s) for s in lv.segments}


def visible(lv: LogicalVolume, r: Roles) -> bool:
    """As lvm2's lv_is_visible: a COW LV shows when its snapshot does."""
    return lv.visible or lv.name in r.visible_cow


def segtype(lv: LogicalVolume) -> str:
    if not lv.segments:
        return ""
    s = lv.segments[0]
    if isinstance(s, StripedSegment):
        return "linear" if len(s.stripes) == 1 else "striped"
    return base_type(s)


def lv_attr(vg: VolumeGroup, lv: LogicalVolume, r: Roles, partial: bool) -> str:
    first = lv.segments[0] if lv.segments else None
    types = _types(lv)
    name = lv.name
    is_raid = bool(types & RAID_TYPES)
    is_mirror = "mirror" in types
    is_thin = isinstance(first, ThinSegment)
    is_pool = isinstance(first, ThinPoolSegment)
    is_cache = "cache" in types
    is_cache_pool = "cache-pool" in types
    is_writecache = "writecache" in types
    is_virtual = bool(types & VIRTUAL_TYPES)
    not_synced = "NOTSYNCED" in lv.status
    a = ["-"] * 10
    if "PVMOVE" in lv.status:
        a[0] = "p"
    elif "CONVERTING" in lv.status:
        a[0] = "c"
    elif name in r.thick_origin or name in r.external_origins:
        a[0] = "o"
    elif (name in r.tmeta or name in r.spares or name in r.cache_pool_meta
          or name in r.raid_meta or name in r.integrity_meta):
        a[0] = "e"
    elif (is_cache or is_cache_pool or name in r.cache_pool_data or name in r.cache_vol
          or is_writecache):
        a[0] = "C"
    elif "integrity" in types:
        a[0] = "g"
    elif is_raid:
        a[0] = "R" if not_synced else "r"
    elif is_mirror:
        a[0] = "M" if not_synced else "m"
    elif is_thin:
        a[0] = "V"
    elif "vdo-pool" in types:
        a[0] = "d"
    elif name in r.vdo_pool_data:
        a[0] = "D"
    elif is_virtual:
        a[0] = "v"
    elif is_pool:
        a[0] = "t"
    elif name in r.tdata:
        a[0] = "T"
    elif name in r.mirror_image or name in r.raid_image:
        a[0] = "I"  # 'i' needs an in-sync live device
    elif name in r.mirror_log:
        a[0] = "l"
    elif name in r.cow:
        a[0] = "s"
    elif name in r.cache_origin or name in r.writecache_origin:
        a[0] = "o"
    if "PVMOVE" in lv.status:
        a[1] = "-"
    else:
        a[1] = "w" if "WRITE" in lv.status else "r" if "READ" in lv.status else "-"
    alloc = lv.extra.get("allocation_policy", "inherit")
    a[2] = _ALLOC.get(str(alloc), "i")
    if "LOCKED" in lv.status:
        a[2] = a[2].upper()
    a[3] = "m" if "FIXED_MINOR" in lv.status else "-"
    if is_pool or is_thin:
        a[6] = "t"
    elif (is_cache_pool or name in r.cache_vol or is_cache or name in r.cache_origin
          or is_writecache or name in r.writecache_origin):
        a[6] = "C"
    elif is_raid or name in r.raid_image or name in r.raid_meta:
        a[6] = "r"
    elif is_mirror or name in r.mirror_image or name in r.mirror_log or "PVMOVE" in lv.status:
        a[6] = "m"
    elif name in r.cow or name in r.thick_origin:
        a[6] = "s"
    elif types - KNOWN_TYPES:
        a[6] = "u"
    elif is_virtual:
        a[6] = "v"
    pool = first if is_pool else None
    if isinstance(first, ThinSegment):
        pool_lv = r.by_name.get(first.thin_pool) if r.by_name else vg.lv(first.thin_pool)
        if pool_lv is not None and pool_lv.segments and isinstance(pool_lv.segments[0],
                                                                     ThinPoolSegment):
            pool = pool_lv.segments[0]
    if isinstance(pool, ThinPoolSegment) and pool.zero_new_blocks == 1:
        a[7] = "z"
    if partial:
        a[8] = "p"
    if "ACTIVATION_SKIP" in lv.flags or "ACTIVATION_SKIP" in lv.status:
        a[9] = "k"
    return "".join(a)


def _shown(vg: VolumeGroup, r: Roles, name: str | None) -> str:
    """An LV name as lvs prints it in pool_lv/origin: hidden ones in brackets."""
    if not name:
        return ""
    lv = r.by_name.get(name)
    return name if lv is None or visible(lv, r) else f"[{name}]"


def lv_rows(vg: VolumeGroup, all_lvs: bool,
            partial: set[str] | None = None) -> list[dict[str, str]]:
    """One lvs row per LV, sorted by name as lvs sorts; hidden LVs bracketed, only with -a.
    The internal ``snapshotN`` LVs of old-style snapshots are never listed (lvs hides them;
    their COW LV stands for them)."""
    r = roles(vg)
    rows = []
    ext = vg.extent_size * SECTOR_SIZE
    for lv in sorted(vg.lvs, key=lambda x: x.name):
        shown = visible(lv, r)
        if lv.name in r.snapshot_lvs or (not shown and not all_lvs):
            continue
        first = lv.segments[0] if lv.segments else None
        thin = first if isinstance(first, ThinSegment) else None
        pool = first if isinstance(first, ThinPoolSegment) else None
        x = first.extra if first is not None else {}
        if thin is not None:
            pool_lv, origin = thin.thin_pool, thin.origin or thin.external_origin or ""
        else:
            pool_lv = _shown(vg, r, _name(x.get("cache_pool")) or _name(x.get("writecache"))
                             or _name(x.get("vdo_pool")))
            origin = (_shown(vg, r, _name(x.get("origin")))
                      if first is not None and base_type(first) in ("cache", "writecache")
                      else _shown(vg, r, r.cow.get(lv.name)))
        rows.append({
            "lv_name": lv.name if shown else f"[{lv.name}]",
            "vg_name": vg.name,
            "lv_attr": lv_attr(vg, lv, r, lv.name in (partial or set())),
            "lv_size": str(lv.extent_count * ext),
            "pool_lv": pool_lv,
            "origin": origin,
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
