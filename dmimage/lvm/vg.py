"""Assemble volume groups from the PV labels found on the inputs.

Every metadata area whose text checks is parsed; areas are grouped by VG id and the highest
seqno wins, as lvm2 does. Lower seqnos, or a different text under the same seqno, are
reported as disagreements. A PV the VG lists but no input carries is *missing*: the VG loads
partially and LVs that need it are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dmimage import devlock
from dmimage.errors import DmimageError, MetadataError, UsageError
from dmimage.lvm.model import PhysicalVolume, VolumeGroup, vg_from_tree
from dmimage.lvm.ondisk import MetadataArea, PvLabel, ScanResult, scan
from dmimage.lvm.text import Section, TextError, parse


@dataclass
class LoadedVG:
    vg: VolumeGroup
    tree: Section
    text: bytes
    #: PV name (pv0...) -> its label on an input.
    labels: dict[str, PvLabel]
    missing: list[PhysicalVolume]
    #: Every metadata area of this VG's PVs that holds a text (the ones a new generation
    #: is written to).
    mdas: list[MetadataArea]
    problems: list[str] = field(default_factory=list)

    def pv_paths(self) -> list[str]:
        """The files or block devices that carry this VG's PVs (each once)."""
        return sorted({lab.region.path for lab in self.labels.values()})

    def lock(self, exclusive: bool = True) -> devlock.Locks:
        """Exclusive (or shared) locks on every file that carries a PV of this VG (O_EXCL on block
        devices, so a PV that an active LV holds is refused): a writer may touch any of
        them (metadata areas on every PV, ``_tmeta`` extents anywhere). Counted per process,
        so a CLI command that already holds them does not wait for itself."""
        return devlock.acquire_all([(p, exclusive) for p in self.pv_paths()])


@dataclass
class Candidate:
    mda: MetadataArea
    label: PvLabel
    tree: Section
    vg: VolumeGroup


def _candidates(result: ScanResult, problems: list[str]) -> list[Candidate]:
    out = []
    for label in result.labels:
        for mda in label.mdas:
            problems.extend(mda.problems)
            if mda.text is None:
                continue
            try:
                tree = parse(mda.text, source=mda.where)
                vg = vg_from_tree(tree)
            except TextError as exc:  # names the area and the line already
                problems.append(str(exc))
                continue
            except MetadataError as exc:
                problems.append(f"{mda.where}: {exc}")
                continue
            out.append(Candidate(mda, label, tree, vg))
    return out


def load_vgs(paths: list[str]) -> tuple[list[LoadedVG], ScanResult, list[str]]:
    """Every VG found on ``paths``; general problems (bad labels, bad areas) separately."""
    result = scan(paths)
    problems = list(result.problems)
    cands = _candidates(result, problems)
    groups: dict[str, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(c.vg.id, []).append(c)
    loaded = []
    for group in groups.values():
        best = max(group, key=lambda c: c.vg.seqno)
        vg_problems = []
        for c in group:
            if c.vg.seqno != best.vg.seqno:
                vg_problems.append(f"{c.mda.where}: VG {c.vg.name} seqno {c.vg.seqno}, "
                                   f"the newest is {best.vg.seqno}")
            elif c.mda.text != best.mda.text:
                vg_problems.append(f"{c.mda.where}: VG {c.vg.name} seqno {c.vg.seqno} text "
                                   f"differs from {best.mda.where}")
        by_uuid = {lab.uuid: lab for lab in result.labels}
        labels, missing = {}, []
        for pv in best.vg.pvs:
            lab = by_uuid.get(pv.id)
            if lab is None:
                missing.append(pv)
            else:
                labels[pv.name] = lab
        mdas = [m for lab in labels.values() for m in lab.mdas if m.text is not None]
        for pv in missing:
            vg_problems.append(f"VG {best.vg.name}: PV {pv.name} (uuid {pv.id}, last seen as "
                               f"{pv.device or 'unknown device'}) is missing")
        loaded.append(LoadedVG(best.vg, best.tree, best.mda.text or b"", labels, missing,
                               mdas, vg_problems))
    loaded.sort(key=lambda lv: lv.vg.name)
    return loaded, result, problems


def find_vg(loaded: list[LoadedVG], name: str | None,
            problems: list[str] | None = None) -> LoadedVG:
    """The VG called ``name``, or the only one when ``name`` is None; with none readable,
    NoVolumeGroupError (exit 1) names the first problem met."""
    if not loaded:
        why = f" ({problems[0]})" if problems else ""
        raise NoVolumeGroupError(f"no readable LVM volume group on the inputs{why}")
    if name is None:
        if len(loaded) == 1:
            return loaded[0]
        raise UsageError("several volume groups found (" + ", ".join(v.vg.name for v in loaded)
                         + "): name one as VG/LV")
    for v in loaded:
        if v.vg.name == name:
            return v
    raise UsageError(f"no volume group {name!r} on the inputs (found: "
                     + (", ".join(v.vg.name for v in loaded) or "none") + ")")


class NoVolumeGroupError(DmimageError):
    """No input carries readable LVM metadata."""

    exit_code = 1
