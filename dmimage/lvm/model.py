"""A typed model of one volume group's metadata, built from and back to the text tree.

Known keys become typed fields; every other key is kept in ``extra`` (in order), so a
generation we write back carries everything lvm2 wrote. Segment types follow lvm2's
lib/metadata/segtype names: ``striped`` (linear is one stripe), ``thin-pool``, ``thin``; any
other type is an :class:`UnknownSegment` that keeps its keys and is listed, not fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dmimage.errors import MetadataError
from dmimage.lvm.text import Scalar, Section, Value

#: Top-level keys lvm2 writes before the VG section.
HEADER_KEYS = ("contents", "version", "description", "creation_host", "creation_time")


def _where(vg: str, *parts: str) -> str:
    return "/".join((vg, *parts))


def _int(sec: Section, key: str, where: str) -> int:
    v = sec.get(key)
    if not isinstance(v, int):
        raise MetadataError(f"missing or non-integer {key!r}", field=where)
    return v


def _opt_int(sec: Section, key: str, where: str) -> int | None:
    if key not in sec:
        return None
    return _int(sec, key, where)


def _str(sec: Section, key: str, where: str) -> str:
    v = sec.get(key)
    if not isinstance(v, str):
        raise MetadataError(f"missing or non-string {key!r}", field=where)
    return v


def _opt_str(sec: Section, key: str, where: str) -> str | None:
    if key not in sec:
        return None
    return _str(sec, key, where)


def _strs(sec: Section, key: str, where: str) -> list[str]:
    v = sec.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise MetadataError(f"{key!r} is not a list of strings", field=where)
    return [str(x) for x in v]


def _extra(sec: Section, known: set[str]) -> Section:
    return Section((k, v) for k, v in sec.items() if k not in known)


def _put(out: Section, key: str, value: Value | None) -> None:
    if value is not None:
        out[key] = value


@dataclass
class Message:
    """A pending thin-pool message: ``create = "lv"`` or ``delete = device_id``."""

    name: str  # message1, ...
    create: str | None = None
    delete: int | None = None
    extra: Section = field(default_factory=Section)


@dataclass
class Segment:
    name: str  # segment1, ...
    start_extent: int
    extent_count: int
    type: str
    extra: Section = field(default_factory=Section)

    def _base(self) -> Section:
        return Section(start_extent=self.start_extent, extent_count=self.extent_count,
                       type=self.type)

    def to_tree(self) -> Section:
        out = self._base()
        out.update(self.extra)
        return out


@dataclass
class StripedSegment(Segment):
    stripe_size: int | None = None  # sectors; absent for one stripe
    stripes: list[tuple[str, int]] = field(default_factory=list)  # (pvN, first PE)

    def to_tree(self) -> Section:
        out = self._base()
        out["stripe_count"] = len(self.stripes)
        _put(out, "stripe_size", self.stripe_size)
        flat: list[Scalar] = []
        for pv, pe in self.stripes:
            flat += [pv, pe]
        out["stripes"] = flat
        out.update(self.extra)
        return out


@dataclass
class ThinPoolSegment(Segment):
    metadata: str = ""
    pool: str = ""
    transaction_id: int = 0
    chunk_size: int = 0  # sectors
    discards: str | None = None
    zero_new_blocks: int | None = None
    messages: list[Message] = field(default_factory=list)

    def to_tree(self) -> Section:
        out = self._base()
        out["metadata"] = self.metadata
        out["pool"] = self.pool
        out["transaction_id"] = self.transaction_id
        out["chunk_size"] = self.chunk_size
        _put(out, "discards", self.discards)
        _put(out, "zero_new_blocks", self.zero_new_blocks)
        out.update(self.extra)
        for m in self.messages:
            sec = Section()
            _put(sec, "create", m.create)
            _put(sec, "delete", m.delete)
            sec.update(m.extra)
            out[m.name] = sec
        return out


@dataclass
class ThinSegment(Segment):
    thin_pool: str = ""
    transaction_id: int = 0
    device_id: int = 0
    origin: str | None = None
    external_origin: str | None = None
    merge: str | None = None

    def to_tree(self) -> Section:
        out = self._base()
        out["thin_pool"] = self.thin_pool
        out["transaction_id"] = self.transaction_id
        _put(out, "origin", self.origin)
        _put(out, "merge", self.merge)
        _put(out, "external_origin", self.external_origin)
        out["device_id"] = self.device_id
        out.update(self.extra)
        return out


@dataclass
class UnknownSegment(Segment):
    """A segment type this model does not know (raid, cache, vdo...): kept verbatim."""


@dataclass
class LogicalVolume:
    name: str
    id: str
    status: list[str]
    segments: list[Segment]
    flags: list[str] = field(default_factory=list)
    extra: Section = field(default_factory=Section)

    @property
    def visible(self) -> bool:
        return "VISIBLE" in self.status

    @property
    def extent_count(self) -> int:
        return sum(s.extent_count for s in self.segments)

    @property
    def segtype(self) -> str:
        return self.segments[0].type if self.segments else ""

    def to_tree(self) -> Section:
        out = Section(id=self.id, status=list[Scalar](self.status),
                      flags=list[Scalar](self.flags))
        out.update(self.extra)
        out["segment_count"] = len(self.segments)
        for s in self.segments:
            out[s.name] = s.to_tree()
        return out


@dataclass
class PhysicalVolume:
    name: str  # pv0, ...
    id: str
    device: str | None
    status: list[str]
    dev_size: int | None  # sectors
    pe_start: int  # sectors
    pe_count: int
    flags: list[str] = field(default_factory=list)
    extra: Section = field(default_factory=Section)

    def to_tree(self) -> Section:
        out = Section(id=self.id)
        _put(out, "device", self.device)
        out["status"] = list[Scalar](self.status)
        out["flags"] = list[Scalar](self.flags)
        _put(out, "dev_size", self.dev_size)
        out["pe_start"] = self.pe_start
        out["pe_count"] = self.pe_count
        out.update(self.extra)
        return out


@dataclass
class VolumeGroup:
    name: str
    id: str
    seqno: int
    extent_size: int  # sectors
    status: list[str]
    pvs: list[PhysicalVolume]
    lvs: list[LogicalVolume]
    flags: list[str] = field(default_factory=list)
    format: str | None = None
    extra: Section = field(default_factory=Section)
    #: Top-level keys outside the VG section (contents, version, description, ...).
    header: Section = field(default_factory=Section)

    def lv(self, name: str) -> LogicalVolume | None:
        for lv in self.lvs:
            if lv.name == name:
                return lv
        return None

    def pv(self, name: str) -> PhysicalVolume | None:
        for pv in self.pvs:
            if pv.name == name:
                return pv
        return None

    def to_tree(self) -> Section:
        vg = Section(id=self.id, seqno=self.seqno)
        _put(vg, "format", self.format)
        vg["status"] = list[Scalar](self.status)
        vg["flags"] = list[Scalar](self.flags)
        vg["extent_size"] = self.extent_size
        vg.update(self.extra)
        vg["physical_volumes"] = Section((pv.name, pv.to_tree()) for pv in self.pvs)
        if self.lvs:
            vg["logical_volumes"] = Section((lv.name, lv.to_tree()) for lv in self.lvs)
        root = Section()
        root[self.name] = vg
        root.update(self.header)
        return root


# -- from the tree ------------------------------------------------------------------------

def _segment(name: str, sec: Section, where: str) -> Segment:
    start = _int(sec, "start_extent", where)
    count = _int(sec, "extent_count", where)
    typ = _str(sec, "type", where)
    if typ == "striped":
        flat = sec.get("stripes")
        n = _int(sec, "stripe_count", where)
        pvs = flat[0::2] if isinstance(flat, list) else []
        pes = flat[1::2] if isinstance(flat, list) else []
        if (not isinstance(flat, list) or len(flat) != 2 * n or n < 1
                or not all(type(x) is str for x in pvs)
                or not all(type(x) is int for x in pes)):
            raise MetadataError("stripes must be stripe_count (\"pvN\", first_pe) pairs",
                                field=where)
        stripes: list[tuple[str, int]] = list(zip(pvs, pes, strict=True))  # type: ignore[arg-type]
        return StripedSegment(name, start, count, typ,
                              _extra(sec, {"start_extent", "extent_count", "type",
                                           "stripe_count", "stripe_size", "stripes"}),
                              _opt_int(sec, "stripe_size", where), stripes)
    if typ == "thin-pool":
        messages = []
        for k, v in sec.items():
            if isinstance(v, Section) and k.startswith("message"):
                messages.append(Message(k, _opt_str(v, "create", f"{where}/{k}"),
                                        _opt_int(v, "delete", f"{where}/{k}"),
                                        _extra(v, {"create", "delete"})))
        known = {"start_extent", "extent_count", "type", "metadata", "pool", "transaction_id",
                 "chunk_size", "discards", "zero_new_blocks"} | {m.name for m in messages}
        return ThinPoolSegment(name, start, count, typ, _extra(sec, known),
                               _str(sec, "metadata", where), _str(sec, "pool", where),
                               _int(sec, "transaction_id", where),
                               _int(sec, "chunk_size", where),
                               _opt_str(sec, "discards", where),
                               _opt_int(sec, "zero_new_blocks", where), messages)
    if typ == "thin":
        known = {"start_extent", "extent_count", "type", "thin_pool", "transaction_id",
                 "device_id", "origin", "external_origin", "merge"}
        return ThinSegment(name, start, count, typ, _extra(sec, known),
                           _str(sec, "thin_pool", where), _int(sec, "transaction_id", where),
                           _int(sec, "device_id", where), _opt_str(sec, "origin", where),
                           _opt_str(sec, "external_origin", where),
                           _opt_str(sec, "merge", where))
    return UnknownSegment(name, start, count, typ,
                          _extra(sec, {"start_extent", "extent_count", "type"}))


def _lv(name: str, sec: Section, vgname: str) -> LogicalVolume:
    where = _where(vgname, "logical_volumes", name)
    segs = [(k, v) for k, v in sec.items() if isinstance(v, Section) and k.startswith("segment")]
    count = _opt_int(sec, "segment_count", where)
    if count is not None and count != len(segs):
        raise MetadataError(f"segment_count is {count} but {len(segs)} segments follow",
                            field=where)
    segments = [_segment(k, v, f"{where}/{k}") for k, v in segs]
    known = {"id", "status", "flags", "segment_count"} | {k for k, _ in segs}
    return LogicalVolume(name, _str(sec, "id", where), _strs(sec, "status", where), segments,
                         _strs(sec, "flags", where), _extra(sec, known))


def _pv(name: str, sec: Section, vgname: str) -> PhysicalVolume:
    where = _where(vgname, "physical_volumes", name)
    known = {"id", "device", "status", "flags", "dev_size", "pe_start", "pe_count"}
    return PhysicalVolume(name, _str(sec, "id", where), _opt_str(sec, "device", where),
                          _strs(sec, "status", where), _opt_int(sec, "dev_size", where),
                          _int(sec, "pe_start", where), _int(sec, "pe_count", where),
                          _strs(sec, "flags", where), _extra(sec, known))


def vg_from_tree(tree: Section) -> VolumeGroup:
    """The typed VG of a parsed text (exactly one top-level section: the VG)."""
    sections = [(k, v) for k, v in tree.items() if isinstance(v, Section)]
    if len(sections) != 1:
        raise MetadataError(f"expected one volume group section, found {len(sections)}",
                            field="metadata text")
    name, sec = sections[0]
    pvsec = sec.get("physical_volumes", Section())
    lvsec = sec.get("logical_volumes", Section())
    if not isinstance(pvsec, Section) or not isinstance(lvsec, Section):
        raise MetadataError("physical_volumes and logical_volumes must be sections", field=name)
    pvs = [_pv(k, v, name) for k, v in pvsec.items() if isinstance(v, Section)]
    lvs = [_lv(k, v, name) for k, v in lvsec.items() if isinstance(v, Section)]
    known = {"id", "seqno", "format", "status", "flags", "extent_size", "physical_volumes",
             "logical_volumes"}
    extent = _int(sec, "extent_size", name)
    if extent <= 0:
        raise MetadataError(f"extent_size {extent} must be positive", field=name)
    return VolumeGroup(name, _str(sec, "id", name), _int(sec, "seqno", name), extent,
                       _strs(sec, "status", name), pvs, lvs, _strs(sec, "flags", name),
                       _opt_str(sec, "format", name), _extra(sec, known),
                       Section((k, v) for k, v in tree.items() if not isinstance(v, Section)))
