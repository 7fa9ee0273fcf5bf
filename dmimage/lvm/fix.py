"""Fix a thin pool's transaction_id mismatch offline, on the side the user picks.

``vg``: a new VG metadata generation (lvm/commit.py) in which only seqno (+1) and the pool
segment's transaction_id change. ``pool``: the pool superblock's trans_id, rewritten in place
in its first sector (lvm/commit.py). Either way the pool metadata is checked first, and
nothing is written on --dry-run or when the sides already agree. The VG's PVs are held
exclusively (shared on --dry-run) from the check to the write, so the check still holds when
the write lands.
"""

from __future__ import annotations

from dmimage.errors import MetadataError, UsageError
from dmimage.lvm.commit import set_superblock_transaction_id, write_generation
from dmimage.lvm.model import LogicalVolume
from dmimage.lvm.text import Section
from dmimage.lvm.thin import metadata_source, pool_segment, sub_lv
from dmimage.lvm.vg import LoadedVG
from dmimage.lvm.view import LvView
from dmimage.thin.check import check_metadata


def _pool_section(tree: Section, vgname: str, pool: str, seg: str) -> Section:
    vg = tree[vgname]
    assert isinstance(vg, Section)
    lvs = vg["logical_volumes"]
    assert isinstance(lvs, Section)
    lv = lvs[pool]
    assert isinstance(lv, Section)
    s = lv[seg]
    assert isinstance(s, Section)
    return s


def set_transaction_id(lvg: LoadedVG, pool_lv: LogicalVolume, *, side: str,
                       to: int | None, dry_run: bool) -> list[str]:
    with lvg.lock(exclusive=not dry_run):
        return _set_transaction_id(lvg, pool_lv, side=side, to=to, dry_run=dry_run)


def _set_transaction_id(lvg: LoadedVG, pool_lv: LogicalVolume, *, side: str,
                        to: int | None, dry_run: bool) -> list[str]:
    seg = pool_segment(pool_lv)
    where = f"{lvg.vg.name}/{pool_lv.name}"
    if lvg.missing:
        raise UsageError(f"{where}: PV {lvg.missing[0].id} is missing; refusing to write a "
                         "generation that would not reach its metadata areas")
    with metadata_source(lvg, pool_lv) as src:
        report = check_metadata(src.path, window=src.window)
    fatal = [p for p in report.problems if p.fatal]
    if fatal or report.transaction_id is None:
        raise MetadataError(f"{where}: pool metadata is damaged ({fatal[0] if fatal else '?'});"
                            " repair it first")
    sb_tid, vg_tid = report.transaction_id, seg.transaction_id
    if side == "vg":
        new = sb_tid if to is None else to
        if new == vg_tid:
            return [f"{where}: VG transaction_id is already {vg_tid}; nothing to do"]
        line = (f"{where}: VG metadata transaction_id {vg_tid} -> {new} (seqno "
                f"{lvg.vg.seqno} -> {lvg.vg.seqno + 1}; superblock says {sb_tid})")
        if dry_run:
            return [line + " [dry run]"]
        tree = lvg.tree
        vgsec = tree[lvg.vg.name]
        assert isinstance(vgsec, Section)
        vgsec["seqno"] = lvg.vg.seqno + 1
        _pool_section(tree, lvg.vg.name, pool_lv.name, seg.name)["transaction_id"] = new
        areas = write_generation(lvg, tree)
        return [line] + [f"  written: {a}" for a in areas]
    new = vg_tid if to is None else to
    if new == sb_tid:
        return [f"{where}: superblock transaction id is already {sb_tid}; nothing to do"]
    line = f"{where}: pool superblock transaction id {sb_tid} -> {new} (VG says {vg_tid})"
    if dry_run:
        return [line + " [dry run]"]
    with LvView(lvg, sub_lv(lvg, seg.metadata, pool_lv.name)) as tmeta:
        path, offset, _ = tmeta.extents(0, 512)[0]
    set_superblock_transaction_id(path, offset, sb_tid, new)
    return [line]
