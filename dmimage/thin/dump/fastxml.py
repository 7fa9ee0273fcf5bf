"""The bulk path for XML in thin_dump's own layout: whole device and def bodies are turned into
numbers with one translate and one ``np.fromstring`` each, instead of one callback per element.

It recognises only what thin_dump writes (known elements, plain ``name="value"`` attributes,
no entities, comments or odd spacing inside mapping elements) and hands structure to the exact
parser's state machine (:class:`dmimage.thin.dump.xml._XmlParser`), so both paths share one
set of rules. Anything unusual, including every error, raises :class:`NotCanonical`: the caller
then parses the same bytes with expat, which also reports problems with their line numbers.
"""

from __future__ import annotations

import re
from typing import IO, TYPE_CHECKING

import numpy as np

from dmimage.thin.ir import U32, U64, Runs

if TYPE_CHECKING:
    from dmimage.thin.dump.xml import _XmlParser


class NotCanonical(Exception):
    """Not thin_dump's own layout (or not valid): use the exact parser."""


_ATTR = re.compile(rb'([A-Za-z_][\w.-]*)\s*=\s*"([^"]*)"')
_TAG_AT = re.compile(rb"<(/?)(superblock|device|def|ref)\b([^>]*?)(/?)>")
_SINGLE_T = b'<single_mapping origin_block="" data_block="" time=""/>'
_RANGE_T = b'<range_mapping origin_begin="" data_begin="" length="" time=""/>'
_DIGITS = b"0123456789"
_KEEP = bytes(c if (chr(c).isdigit() or c == ord("-")) else 32 for c in range(256))
_WS = b" \t\r\n"
_I64_MAX = np.iinfo(np.int64).max
_TIME_MAX = (1 << 32) - 1


def _attrs(text: bytes) -> dict[str, str]:
    attrs = {k.decode(): v.decode() for k, v in _ATTR.findall(text)}
    if _ATTR.sub(b"", text).strip() or any("&" in v for v in attrs.values()):
        raise NotCanonical
    return attrs


def parse_canonical(data: bytes, parser: _XmlParser) -> None:
    """Feed ``data`` to ``parser`` (fresh) through the bulk path; NotCanonical if it can't."""
    from dmimage.thin.dump.xml import DumpFormatError

    try:
        _parse(data, parser)
    except DumpFormatError:
        raise NotCanonical from None
    if not parser.sb_closed:
        raise NotCanonical


#: Bytes read at a time by :func:`parse_canonical_file`.
READ_BLOCK = 1 << 24


def parse_canonical_file(f: IO[bytes], parser: _XmlParser, block: int = READ_BLOCK) -> None:
    """:func:`parse_canonical` of a file read ``block`` bytes at a time: a device's or def's
    body is parsed in pieces cut at line ends (each piece starts at a newline, so a body of
    single mappings keeps its one-line-repeated shape), so memory is a block, not the
    file. NotCanonical as :func:`parse_canonical` (the caller re-reads the file with expat).
    """
    from dmimage.thin.dump.xml import DumpFormatError

    try:
        _parse_stream(f, parser, block)
    except DumpFormatError:
        raise NotCanonical from None
    if not parser.sb_closed:
        raise NotCanonical


def _parse_stream(f: IO[bytes], p: _XmlParser, block: int) -> None:
    data = b""
    pos = 0
    eof = False
    body_end: bytes | None = None  # the closing tag of the body being read

    def more() -> bool:
        nonlocal data, pos, eof
        if eof:
            return False
        chunk = f.read(block)
        if not chunk:
            eof = True
            return False
        data = data[pos:] + chunk
        pos = 0
        return True

    while True:
        if body_end is not None:
            end = data.find(body_end, pos)
            if end >= 0:
                _body(data, pos, end, p)
                pos = end
                body_end = None
                continue
            cut = data.rfind(b"\n", pos)
            if cut > pos:
                _body(data, pos, cut, p)
                pos = cut
            if not more():
                raise NotCanonical
            continue
        while pos < len(data) and data[pos] in _WS:
            pos += 1
        if pos >= len(data):
            if not more():
                return
            continue
        if data.find(b">", pos) < 0:
            if not more():
                raise NotCanonical
            continue
        m = _TAG_AT.match(data, pos)
        if m is None:
            raise NotCanonical
        closing, tag, attr_text, selfclose = m.groups()
        tag_s = tag.decode()
        pos = m.end()
        if closing:
            if attr_text.strip() or selfclose:
                raise NotCanonical
            p.end(tag_s)
        else:
            p.start(tag_s, _attrs(attr_text))
            if selfclose:
                p.end(tag_s)
            elif tag_s in ("device", "def"):
                body_end = b"</" + tag + b">"


def _parse(data: bytes, p: _XmlParser) -> None:
    n = len(data)
    pos = n - len(data.lstrip())
    while pos < n:
        m = _TAG_AT.match(data, pos)
        if m is None:
            raise NotCanonical
        closing, tag, attr_text, selfclose = m.groups()
        tag_s = tag.decode()
        pos = m.end()
        if closing:
            if attr_text.strip() or selfclose:
                raise NotCanonical
            p.end(tag_s)
        else:
            p.start(tag_s, _attrs(attr_text))
            if selfclose:
                p.end(tag_s)
            elif tag_s in ("device", "def"):
                end = data.find(b"</" + tag + b">", pos)
                if end < 0:
                    raise NotCanonical
                _body(data, pos, end, p)
                pos = end
        while pos < n and data[pos] in _WS:
            pos += 1


def _body(data: bytes, pos: int, end: int, p: _XmlParser) -> None:
    """A device's or def's content: mapping elements, and refs between them."""
    body = data[pos:end]
    if _singles(body, p):
        return
    if body.find(b"<ref") < 0:
        _chunk(body, p)
        return
    inner = pos
    for r in _TAG_AT.finditer(data, pos, end):
        _chunk(data[inner : r.start()], p)
        inner = r.end()
        if r.group(2) != b"ref" or r.group(1) or not r.group(4):
            raise NotCanonical
        p.start("ref", _attrs(r.group(3)))
    _chunk(data[inner:end], p)


def _add(p: _XmlParser, origin: np.ndarray, data_b: np.ndarray, length: np.ndarray,
         time: np.ndarray) -> None:
    if p.cur is None or not len(origin):
        if len(origin):
            raise NotCanonical
        return
    if int(time.max()) > _TIME_MAX or int(length.min()) == 0:
        raise NotCanonical  # the exact parser names the element and its line
    p.cur.add(Runs(origin, data_b, length, time.astype(U32)))


def _singles(chunk: bytes, p: _XmlParser) -> bool:
    """The common body: single mappings only, one per line, all laid out alike (its digit-free
    text is one line repeated). False, having consumed nothing, for anything else."""
    rest = chunk.translate(None, _DIGITS)
    gt = rest.find(b">")
    if gt < 0:
        return not rest or rest.isspace()
    unit = rest[: gt + 1]
    if unit.lstrip(_WS) != _SINGLE_T:
        return False
    cnt = len(rest) // len(unit)
    tail = rest[cnt * len(unit) :]
    if (tail and not tail.isspace()) or rest[: cnt * len(unit)] != unit * cnt:
        return False
    arr = np.fromstring(chunk.translate(_KEEP), dtype=np.int64, sep=" ")
    if len(arr) != 3 * cnt or (cnt and int(arr.max()) == _I64_MAX):
        return False
    arr = arr.reshape(cnt, 3)
    _add(p, arr[:, 0].astype(U64), arr[:, 1].astype(U64), np.ones(cnt, U64), arr[:, 2])
    return True


def _chunk(chunk: bytes, p: _XmlParser) -> None:
    """Mixed single and range mappings between two structural tags, as numbers in bulk."""
    if not chunk or chunk.isspace() or _singles(chunk, p):
        return
    rest = chunk.translate(None, _DIGITS).replace(_SINGLE_T, b"").replace(_RANGE_T, b"")
    if rest.translate(None, _WS):
        raise NotCanonical
    text = chunk.replace(b"<single_mapping", b" -1 ").replace(b"<range_mapping", b" -2 ")
    arr = np.fromstring(text.translate(_KEEP), dtype=np.int64, sep=" ")
    if len(arr) and int(arr.max()) == _I64_MAX:
        raise NotCanonical  # a value saturated int64: the exact parser handles u64
    marks = np.flatnonzero(arr < 0)
    if not len(marks):
        return
    kind = arr[marks]
    reclen = np.diff(np.append(marks, len(arr)))
    if marks[0] != 0 or not bool(np.all(reclen == np.where(kind == -1, 4, 5))):
        raise NotCanonical
    single = kind == -1
    origin = arr[marks + 1].astype(U64)
    data_b = arr[marks + 2].astype(U64)
    length = np.where(single, 1, arr[np.minimum(marks + 3, len(arr) - 1)]).astype(U64)
    time = arr[marks + np.where(single, 3, 4)]
    _add(p, origin, data_b, length, time)
