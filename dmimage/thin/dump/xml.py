"""thin_dump XML: writer (byte-identical to thin_dump 1.1) and a streaming parser into the IR.

Writer facts (thin_dump 1.1.0, quick-xml with two-space indentation):
* ``<superblock uuid time transaction [flags] version data_block_size nr_data_blocks
  [metadata_snap]>``; flags only when non-zero; no newline after the final ``</superblock>``;
* ``<def name>`` blocks first, then devices in id order; an empty device prints its start and
  end tags on two lines;
* runs of length 1 print as ``<single_mapping origin_block data_block time/>``, longer ones as
  ``<range_mapping origin_begin data_begin length time/>``.

The parser accepts thin_dump 0.9 and 1.x output (flags always / only when set, def/ref), with
expat, streaming the input, and reports problems as :class:`DumpFormatError` with line numbers.
"""

from __future__ import annotations

import os
from array import array
from typing import IO, Any, BinaryIO

import numpy as np

from dmimage.errors import InputError
from dmimage.thin.dump.render import Document, render_rows
from dmimage.thin.dump.walk import Emitter
from dmimage.thin.ir import U32, U64, DeviceIR, PoolIR, Runs, SuperblockIR

__all__ = ["XmlEmitter", "xml_document", "write_xml", "xml_bytes", "parse_xml", "expand_shared",
           "DumpFormatError"]


class DumpFormatError(InputError):
    """A dump (XML or JSON) that cannot be read: syntax, missing or bad attributes, bad refs."""

    exit_code = 1

    def __init__(self, message: str, *, line: int | None = None, source: str | None = None):
        self.line = line
        self.source = source
        where = []
        if source:
            where.append(source)
        if line is not None:
            where.append(f"line {line}")
        super().__init__(f"{':'.join(where)}: {message}" if where else message)


_MAP_PARTS: list[bytes | tuple[bytes, bytes]] = [
    (b'    <single_mapping origin_block="', b'    <range_mapping origin_begin="'),
    (b'" data_block="', b'" data_begin="'),
    (b"", b'" length="'),
    b'" time="',
    b'"/>\n',
]


def _render_xml_runs(origin: np.ndarray, data: np.ndarray, length: np.ndarray,
                     time: np.ndarray, want_lengths: bool) -> tuple[np.ndarray, np.ndarray | None]:
    # Inside <def> and <device> alike the indentation is four spaces.
    return render_rows(_MAP_PARTS, [origin, data, length, time], want_lengths,
                       select=length > 1, optional=(2,))


def _esc(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&apos;"))


def superblock_start(sb: SuperblockIR) -> str:
    attrs = f'<superblock uuid="{_esc(sb.uuid)}" time="{sb.time}" transaction="{sb.transaction}"'
    if sb.flags:
        attrs += f' flags="{sb.flags}"'
    attrs += (f' version="{sb.version}" data_block_size="{sb.data_block_size}"'
              f' nr_data_blocks="{sb.nr_data_blocks}"')
    if sb.metadata_snap is not None:
        attrs += f' metadata_snap="{sb.metadata_snap}"'
    return attrs + ">\n"


def expand_shared(ir: PoolIR) -> PoolIR:
    """The same pool with every ref spliced in and runs re-merged across the seams (no defs)."""
    devices = []
    for d in ir.devices:
        r = d.runs(ir.defs)
        items: list[Runs | str] = [merge_runs(r)] if len(r) else []
        devices.append(DeviceIR(d.dev_id, d.mapped_blocks, d.transaction, d.creation_time,
                                d.snap_time, items))
    return PoolIR(ir.superblock, devices, {})


def merge_runs(r: Runs) -> Runs:
    """Join runs that continue each other (origin and data contiguous, same time)."""
    n = len(r)
    if n < 2:
        return r
    end_o = r.origin_begin[:-1] + r.length[:-1]
    end_d = r.data_begin[:-1] + r.length[:-1]
    cont = (end_o == r.origin_begin[1:]) & (end_d == r.data_begin[1:]) & (r.time[:-1] == r.time[1:])
    if not cont.any():
        return r
    starts = np.flatnonzero(np.concatenate([[True], ~cont]))
    lengths = np.add.reduceat(r.length, starts)
    return Runs(r.origin_begin[starts], r.data_begin[starts], lengths.astype(U64), r.time[starts])


class XmlEmitter(Emitter):
    """thin_dump 1.1's XML."""

    render_runs = staticmethod(_render_xml_runs)

    def superblock_begin(self, sb: SuperblockIR) -> None:
        self.doc.text(superblock_start(sb))

    def def_begin(self, name: str) -> None:
        self.doc.text(f'  <def name="{_esc(name)}">\n')

    def def_end(self, name: str) -> None:
        self.doc.text("  </def>\n")

    def device_begin(self, dev: DeviceIR) -> None:
        self.doc.text(f'  <device dev_id="{dev.dev_id}" mapped_blocks="{dev.mapped_blocks}" '
                      f'transaction="{dev.transaction}" creation_time="{dev.creation_time}" '
                      f'snap_time="{dev.snap_time}">\n')

    def ref(self, name: str) -> None:
        self.doc.text(f'    <ref name="{_esc(name)}"/>\n')

    def device_end(self, dev: DeviceIR) -> None:
        self.doc.text("  </device>\n")

    def superblock_end(self) -> None:
        self.doc.text("</superblock>")


def xml_document(ir: PoolIR, *, expand: bool = False) -> Document:
    return XmlEmitter.document(expand_shared(ir) if expand else ir)


def write_xml(ir: PoolIR, out: BinaryIO, *, expand: bool = False) -> None:
    """Write thin_dump XML to a binary stream (no final newline, like thin_dump 1.1)."""
    xml_document(ir, expand=expand).write_to(out)


def xml_bytes(ir: PoolIR, *, expand: bool = False) -> bytes:
    return xml_document(ir, expand=expand).getvalue()


# --------------------------------------------------------------------------------- parsing

_SB_REQUIRED = ("uuid", "time", "transaction", "data_block_size", "nr_data_blocks")
_SB_INTS = ("time", "transaction", "flags", "version", "data_block_size", "nr_data_blocks",
            "metadata_snap")
_DEV_ATTRS = ("dev_id", "mapped_blocks", "transaction", "creation_time", "snap_time")
_SINGLE = ("origin_block", "data_block", "time")
_RANGE = ("origin_begin", "data_begin", "length", "time")
_MAX = {"time": (1 << 32) - 1, "flags": (1 << 32) - 1, "version": (1 << 32) - 1,
        "data_block_size": (1 << 32) - 1, "dev_id": (1 << 32) - 1,
        "creation_time": (1 << 32) - 1, "snap_time": (1 << 32) - 1}
_U64_MAX = (1 << 64) - 1


class _Builder:
    """Collects runs in four typed arrays (cheap appends, one numpy conversion at the end), or
    as whole Runs from the bulk path (dump/fastxml.py); one builder never gets both."""

    __slots__ = ("o", "d", "n", "t", "parts")

    def __init__(self) -> None:
        self.o, self.d, self.n, self.t = array("Q"), array("Q"), array("Q"), array("L")
        self.parts: list[Runs] = []

    def add(self, runs: Runs) -> None:
        self.parts.append(runs)

    def runs(self) -> Runs:
        if self.parts:
            return Runs.concat(self.parts)
        if not self.o:
            return Runs.empty()
        return Runs(np.frombuffer(self.o, U64).copy(), np.frombuffer(self.d, U64).copy(),
                    np.frombuffer(self.n, U64).copy(),
                    np.frombuffer(self.t, np.dtype(f"={self.t.typecode}")).astype(U32))


class _XmlParser:
    def __init__(self, source: str | None):
        import xml.parsers.expat

        self.expat = xml.parsers.expat
        self.p = xml.parsers.expat.ParserCreate()
        self.p.buffer_text = True
        self.p.StartElementHandler = self.start
        self.p.EndElementHandler = self.end
        self.source = source
        self.sb: SuperblockIR | None = None
        self.sb_closed = False
        self.defs: dict[str, Runs] = {}
        self.devices: list[DeviceIR] = []
        self.dev: DeviceIR | None = None
        self.def_name: str | None = None
        self.cur: _Builder | None = None
        self.seen_ids: set[int] = set()

    def err(self, msg: str) -> DumpFormatError:
        return DumpFormatError(msg, line=self.p.CurrentLineNumber, source=self.source)

    def num(self, tag: str, a: dict[str, str], k: str) -> int:
        v = a.get(k)
        if v is None:
            raise self.err(f"<{tag}> lacks the {k} attribute")
        try:
            x = int(v, 10)
        except ValueError:
            raise self.err(f'<{tag}> {k}="{v}" is not a number') from None
        if x < 0 or x > _MAX.get(k, _U64_MAX):
            raise self.err(f'<{tag}> {k}="{v}" is out of range')
        if not (v.isascii() and v.isdigit()):  # int() also takes spaces, _ and other digits
            raise self.err(f'<{tag}> {k}="{v}" is not a number')
        return x

    def check_attrs(self, tag: str, a: dict[str, str], allowed: tuple[str, ...]) -> None:
        for k in a:
            if k not in allowed:
                raise self.err(f"<{tag}> has an unknown attribute {k}")

    def flush(self) -> None:
        if self.cur is not None and (self.cur.o or self.cur.parts):
            assert self.dev is not None
            self.dev.items.append(self.cur.runs())
        self.cur = _Builder() if self.dev is not None else None

    def start(self, tag: str, a: dict[str, str]) -> None:
        cur = self.cur
        if tag == "single_mapping":
            if cur is None:
                raise self.err("<single_mapping> outside <device> or <def>")
            try:  # fast path; the checked path below explains any problem
                if len(a) != 3:
                    raise KeyError
                os_, ds, ts = a["origin_block"], a["data_block"], a["time"]
                digits = os_ + ds + ts  # int() also takes spaces, _ and other scripts' digits
                if not (digits.isascii() and digits.isdigit()):
                    raise ValueError
                o, d, t = int(os_), int(ds), int(ts)
                if t > _MAX["time"]:  # the array holds 64 bits: the checked path says why
                    raise OverflowError
                cur.o.append(o)
                cur.d.append(d)
                cur.t.append(t)
                cur.n.append(1)
                return
            except (KeyError, ValueError, OverflowError):
                del cur.o[len(cur.n):], cur.d[len(cur.n):], cur.t[len(cur.n):]
            self.check_attrs(tag, a, _SINGLE)
            cur.o.append(self.num(tag, a, "origin_block"))
            cur.d.append(self.num(tag, a, "data_block"))
            cur.n.append(1)
            cur.t.append(self.num(tag, a, "time"))
        elif tag == "range_mapping":
            if cur is None:
                raise self.err("<range_mapping> outside <device> or <def>")
            if len(a) != 4:
                self.check_attrs(tag, a, _RANGE)
            n = self.num(tag, a, "length")
            if n == 0:
                raise self.err("<range_mapping> with length 0")
            cur.o.append(self.num(tag, a, "origin_begin"))
            cur.d.append(self.num(tag, a, "data_begin"))
            cur.n.append(n)
            cur.t.append(self.num(tag, a, "time"))
        elif tag == "ref":
            if self.dev is None:
                raise self.err("<ref> outside <device>")
            self.check_attrs(tag, a, ("name",))
            name = a.get("name")
            if name is None:
                raise self.err("<ref> lacks the name attribute")
            if name not in self.defs:
                raise self.err(f'<ref name="{name}"> names no earlier <def>')
            self.flush()
            self.dev.items.append(name)
        elif tag == "device":
            if self.sb is None or self.sb_closed:
                raise self.err("<device> outside <superblock>")
            if self.dev is not None or self.def_name is not None:
                raise self.err("<device> nested in <device> or <def>")
            self.check_attrs(tag, a, _DEV_ATTRS)
            dev = DeviceIR(dev_id=self.num(tag, a, "dev_id"),
                           mapped_blocks=self.num(tag, a, "mapped_blocks"),
                           transaction=self.num(tag, a, "transaction"),
                           creation_time=self.num(tag, a, "creation_time"),
                           snap_time=self.num(tag, a, "snap_time"))
            if dev.dev_id in self.seen_ids:
                raise self.err(f"device {dev.dev_id} appears twice")
            self.seen_ids.add(dev.dev_id)
            self.dev = dev
            self.cur = _Builder()
        elif tag == "def":
            if self.sb is None or self.sb_closed:
                raise self.err("<def> outside <superblock>")
            if self.dev is not None or self.def_name is not None:
                raise self.err("<def> nested in <device> or <def>")
            self.check_attrs(tag, a, ("name",))
            name = a.get("name")
            if name is None:
                raise self.err("<def> lacks the name attribute")
            if name in self.defs:
                raise self.err(f'<def name="{name}"> defined twice')
            self.def_name = name
            self.cur = _Builder()
        elif tag == "superblock":
            if self.sb is not None:
                raise self.err("a second <superblock>")
            self.check_attrs(tag, a, ("uuid",) + _SB_INTS)
            for k in _SB_REQUIRED:
                if k not in a:
                    raise self.err(f"<superblock> lacks the {k} attribute")
            ints = {k: self.num(tag, a, k) for k in _SB_INTS if k in a}
            self.sb = SuperblockIR(uuid=a["uuid"], time=ints["time"],
                                   transaction=ints["transaction"], flags=ints.get("flags", 0),
                                   version=ints.get("version", 2),
                                   data_block_size=ints["data_block_size"],
                                   nr_data_blocks=ints["nr_data_blocks"],
                                   metadata_snap=ints.get("metadata_snap"))
        else:
            raise self.err(f"unexpected element <{tag}>")

    def end(self, tag: str) -> None:
        if tag == "device":
            self.flush()
            assert self.dev is not None
            self.devices.append(self.dev)
            self.dev = None
            self.cur = None
        elif tag == "def":
            assert self.cur is not None and self.def_name is not None
            self.defs[self.def_name] = self.cur.runs()
            self.def_name = None
            self.cur = None
        elif tag == "superblock":
            self.sb_closed = True

    def feed_file(self, f: IO[bytes]) -> None:
        try:
            self.p.ParseFile(f)
        except self.expat.ExpatError as exc:
            raise self._syntax_error(exc) from None

    def feed_bytes(self, data: bytes) -> None:
        try:
            self.p.Parse(data, True)
        except self.expat.ExpatError as exc:
            raise self._syntax_error(exc) from None

    def _syntax_error(self, exc: Any) -> DumpFormatError:
        text = self.expat.ErrorString(exc.code)
        if text == self.expat.errors.XML_ERROR_NO_ELEMENTS:
            text = "the XML ends before </superblock> (truncated?)"
        return DumpFormatError(text, line=exc.lineno, source=self.source)

    def result(self) -> PoolIR:
        if self.sb is None:
            raise DumpFormatError("no <superblock> element", source=self.source)
        return PoolIR(self.sb, self.devices, self.defs)


def parse_xml(source: str | os.PathLike[str] | bytes | IO[bytes]) -> PoolIR:
    """Parse thin_dump XML (0.9 or 1.x form, def/ref allowed) into the IR.

    ``source``: a path, the XML itself as bytes, or a binary file object (read in chunks,
    from where it stands). Paths, seekable files and bytes in thin_dump's own layout take the
    bulk path (dump/fastxml.py, several times faster on big pools); everything else, and
    every error, goes through expat.
    """
    from dmimage.thin.dump.fastxml import NotCanonical, parse_canonical

    if isinstance(source, (str, os.PathLike)):
        # read in blocks (fastxml), never whole: a dump of 100M mappings is 7 GB
        name: str | None = os.fspath(source)
        try:
            with open(name, "rb") as f:  # type: ignore[arg-type]
                return _parse_xml_file(f, name)
        except OSError as exc:
            from dmimage.errors import DeviceError
            raise DeviceError(f"{name}: {exc.strerror}") from None
    if not isinstance(source, (bytes, bytearray, memoryview)):
        named = getattr(source, "name", None)
        name = named if isinstance(named, str) else None
        if source.seekable():  # a file opened by the caller (e.g. dump/source.py's)
            try:
                return _parse_xml_file(source, name)
            except OSError as exc:
                from dmimage.errors import DeviceError
                raise DeviceError(f"{name or 'input'}: {exc.strerror}") from None
        p = _XmlParser(name)
        p.feed_file(source)
        return p.result()
    name, data = None, bytes(source)
    try:
        fast = _XmlParser(name)
        parse_canonical(data, fast)
        return fast.result()
    except NotCanonical:
        pass
    p = _XmlParser(name)
    p.feed_bytes(data)
    return p.result()


def _parse_xml_file(f: IO[bytes], name: str | None) -> PoolIR:
    """:func:`parse_xml` of a seekable binary file from where it stands: the bulk path,
    then, when it declines, expat from the same place."""
    from dmimage.thin.dump.fastxml import NotCanonical, parse_canonical_file

    start = f.tell()
    try:
        fast = _XmlParser(name)
        parse_canonical_file(f, fast)
        return fast.result()
    except NotCanonical:
        pass
    f.seek(start)
    p = _XmlParser(name)
    p.feed_file(f)
    return p.result()
