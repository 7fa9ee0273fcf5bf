"""``dmimage lvm check``: labels, checksums, the VG model, and every thin pool against its VG.

Problems are lines naming both sides' values. Thin pools: the full metadata check on
``_tmeta``, the VG's transaction_id against the superblock's (lvm2 activates when they are
equal, when the VG is one ahead, or when the VG's is 0: libdm-deptree.c), every thin
LV's device_id present in the pool, pool devices no LV names (orphans), pending messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dmimage.errors import DmimageError, MetadataError
from dmimage.format.lvm import SECTOR_SIZE
from dmimage.lvm.model import StripedSegment, ThinPoolSegment, ThinSegment, VolumeGroup
from dmimage.lvm.ondisk import MetadataArea
from dmimage.lvm.thin import metadata_source, pool_segment
from dmimage.lvm.vg import LoadedVG, load_vgs
from dmimage.thin.check import check_metadata
from dmimage.thin.pool import open_pool


@dataclass
class PoolState:
    vg: str
    pool: str
    vg_transaction_id: int
    sb_transaction_id: int | None = None
    devices: list[int] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


@dataclass
class LvmReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pools: list[PoolState] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes,
                "pools": [p.__dict__ for p in self.pools]}


def model_problems(vg: VolumeGroup) -> list[str]:
    """Segments that overlap or leave gaps, extents past a PV's end or used twice, dangling
    references and origin loops."""
    out = []
    used: dict[str, list[tuple[int, int, str]]] = {}
    for lv in vg.lvs:
        expect = 0
        for seg in lv.segments:
            where = f"{vg.name}/{lv.name} {seg.name}"
            if seg.start_extent != expect:
                out.append(f"{where}: start_extent {seg.start_extent}, expected {expect}")
            expect = seg.start_extent + seg.extent_count
            if isinstance(seg, StripedSegment):
                n = len(seg.stripes)
                per = seg.extent_count // n if n else 0
                for pvname, pe in seg.stripes:
                    pv = vg.pv(pvname)
                    if pv is None:
                        out.append(f"{where}: stripe on unknown PV {pvname}")
                    elif pe + per > pv.pe_count:
                        out.append(f"{where}: extents {pe}..{pe + per - 1} lie past the end of "
                                   f"{pvname} ({pv.pe_count} extents)")
                    used.setdefault(pvname, []).append((pe, pe + per, lv.name))
            elif isinstance(seg, ThinPoolSegment):
                for sub in (seg.metadata, seg.pool):
                    if vg.lv(sub) is None:
                        out.append(f"{where}: names LV {sub}, which the VG does not have")
            elif isinstance(seg, ThinSegment):
                p = vg.lv(seg.thin_pool)
                if p is None or not p.segments or not isinstance(p.segments[0], ThinPoolSegment):
                    out.append(f"{where}: thin_pool {seg.thin_pool} is not a thin pool of the VG")
    for pvname, runs in used.items():
        runs.sort()
        for (_a0, a1, an), (b0, b1, bn) in zip(runs, runs[1:], strict=False):
            if b0 < a1:
                out.append(f"{vg.name}: {pvname} extents {b0}..{min(a1, b1) - 1} are used by "
                           f"both {an} and {bn}")
    origins = {lv.name: lv.segments[0].origin for lv in vg.lvs
               if lv.segments and isinstance(lv.segments[0], ThinSegment)}
    for name in origins:
        seen, cur = {name}, origins.get(name)
        while cur is not None:
            if cur in seen:
                out.append(f"{vg.name}/{name}: origin chain loops back to {cur}")
                break
            seen.add(cur)
            cur = origins.get(cur)
    return out


def precommitted_note(m: MetadataArea, committed_seqno: int) -> str:
    """lvm2 reads raw_locn slot 0; a slot 1 left by an uncommitted vg_precommit is reported,
    not used (format-text.c: vg_precommit fills slot 1, vg_commit moves it to 0)."""
    if m.precommitted is None:
        return (f"{m.where}: precommitted slot (raw_locn 1) unreadable: "
                f"{m.precommitted_problem}; lvm2 uses the committed seqno {committed_seqno}")
    found = re.search(rb"\bseqno\s*=\s*(\d+)", m.precommitted)
    seq = found.group(1).decode() if found else "?"
    return (f"{m.where}: precommitted metadata seqno {seq} (raw_locn 1) was never committed; "
            f"lvm2 uses the committed seqno {committed_seqno}")


def check_pool(lvg: LoadedVG, pool_name: str, report: LvmReport) -> None:
    vg = lvg.vg
    pool_lv = vg.lv(pool_name)
    assert pool_lv is not None
    seg = pool_segment(pool_lv)
    st = PoolState(vg.name, pool_name, seg.transaction_id)
    report.pools.append(st)
    where = f"{vg.name}/{pool_name}"
    st.pending = [f"{m.name}: " + (f"create {m.create}" if m.create is not None
                                   else f"delete {m.delete}") for m in seg.messages]
    for msg in st.pending:
        report.notes.append(f"{where}: pending {msg}")
    try:
        with metadata_source(lvg, pool_lv) as src:
            res = check_metadata(src.path, window=src.window)
            for p in res.problems:  # non-fatal ones (leaks) do not stop lvm2's thin_check
                (report.problems if p.fatal else report.notes).append(
                    f"{where} metadata ({seg.metadata}): {p}" + ("" if p.fatal else
                                                                 " (non-fatal)"))
            if any(p.fatal for p in res.problems):
                return
            with open_pool(src.path, window=src.window) as pool:
                sb_tid = pool.superblock.trans_id
                devices = pool.devices()
                bs = pool.superblock.data_block_size
                nr_data = pool.live_superblock.nr_data_blocks
    except DmimageError as exc:
        report.problems.append(f"{where}: {exc}")
        return
    st.sb_transaction_id = sb_tid
    st.devices = sorted(devices)
    if bs != seg.chunk_size:
        report.problems.append(f"{where}: VG chunk_size {seg.chunk_size} sectors, superblock "
                               f"data_block_size {bs}")
    tdata = vg.lv(seg.pool)
    if tdata is not None:
        tdata_blocks = tdata.extent_count * vg.extent_size // max(bs, 1)
        if nr_data > tdata_blocks:
            report.problems.append(f"{where}: superblock has {nr_data} data blocks, "
                                   f"{seg.pool} holds {tdata_blocks}")
    vg_tid = seg.transaction_id
    # lvm2 2.03.16 at activation (libdm-deptree.c, _thin_pool_node_send_messages, called with
    # send=0: a fresh activation only validates; messages go out only when lvm2 suspends an
    # already active pool, dev_manager.c): a VG id of 0 without messages is not validated at
    # all; equal ids pass; a VG one ahead passes; anything else is refused.
    pending_deletes_apply = vg_tid == sb_tid + 1  # messages still to be sent
    if vg_tid == sb_tid:
        if seg.messages:
            report.notes.append(f"{where}: transaction_id {vg_tid} matches the superblock; "
                                "lvm2 treats the pending messages as already committed and "
                                "never sends them")
    elif vg_tid == sb_tid + 1:
        if seg.messages:
            report.notes.append(f"{where}: VG transaction_id {vg_tid} is one ahead of the "
                                f"superblock's {sb_tid}; lvm2 activates the pool and sends the "
                                "pending messages the next time it suspends the active pool")
        else:
            # activation passes; lvm2 warns and refuses new thins (pool_below_threshold)
            report.notes.append(f"{where}: VG transaction_id {vg_tid} is one ahead of the "
                                f"superblock's {sb_tid} with no pending message: lvm2 "
                                "activates the pool but refuses new thins until the ids agree "
                                "(lvm set-transaction-id)")
    elif vg_tid == 0 and not seg.messages:
        report.notes.append(f"{where}: VG transaction_id 0: lvm2 does not validate it at "
                            f"activation (the superblock says {sb_tid})")
    else:
        report.problems.append(f"{where}: transaction_id mismatch: VG metadata says {vg_tid}, "
                               f"pool superblock says {sb_tid}")
    creates = {m.create for m in seg.messages if m.create}
    deletes = ({m.delete for m in seg.messages if m.delete is not None}
               if pending_deletes_apply else set())
    named: dict[int, str] = {}
    for lv in vg.lvs:
        s = lv.segments[0] if lv.segments else None
        if isinstance(s, ThinSegment) and s.thin_pool == pool_name:
            named[s.device_id] = lv.name
            if s.device_id not in devices:
                # a pending create is not sent at activation, so the LV cannot activate
                pending = ("" if lv.name not in creates else
                           " (its create message is pending; lvm2 sends it only when it "
                           "suspends the active pool)" if pending_deletes_apply else
                           " (its create message counts as committed; lvm2 never sends it)")
                report.problems.append(f"{where}: thin LV {lv.name} has device_id "
                                       f"{s.device_id}, which the pool does not have (pool "
                                       f"devices: {sorted(devices)[:10]}){pending}")
    st.orphans = sorted(set(devices) - set(named) - deletes)
    for dev in st.orphans:
        d = devices[dev]
        report.problems.append(f"{where}: pool device {dev} ({d.mapped_blocks} mapped blocks, "
                               f"transaction {d.transaction_id}) is named by no LV (orphan)")


def check_lvm(paths: list[str]) -> LvmReport:
    loaded, result, problems = load_vgs(paths)
    report = LvmReport(list(problems))
    if not result.labels:
        report.problems.append("no LVM physical volume label found on " + ", ".join(paths))
    elif not loaded:
        report.problems.append("no readable VG metadata on the PVs found")
    for lvg in loaded:
        report.problems.extend(lvg.problems)
        report.problems.extend(model_problems(lvg.vg))
        for lv in lvg.vg.lvs:
            if lv.segments and isinstance(lv.segments[0], ThinPoolSegment):
                try:
                    check_pool(lvg, lv.name, report)
                except MetadataError as exc:
                    report.problems.append(f"{lvg.vg.name}/{lv.name}: {exc}")
        for m in lvg.mdas:
            if m.precommitted is not None or m.precommitted_problem is not None:
                report.notes.append(precommitted_note(m, lvg.vg.seqno))
        for label in lvg.labels.values():
            pv = next(p for p in lvg.vg.pvs if p.id == label.uuid)
            end = (pv.pe_start + pv.pe_count * lvg.vg.extent_size) * SECTOR_SIZE
            if end > label.region.size:
                report.problems.append(f"{lvg.vg.name}: {pv.name} needs {end} bytes, "
                                       f"{label.region.name} has {label.region.size}")
    return report
