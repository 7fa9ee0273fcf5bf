"""The bulk path for XML in thin_dump's own layout: device and def bodies are turned into
numbers a piece of lines at a time by whole-array operations (dump/xmlscan.py), instead of one
callback per element; a piece the scanner does not take (other spacing, long numbers) goes
through one translate and one ``np.fromstring``.

It recognises only what thin_dump writes (known elements, plain ``name="value"`` attributes,
no entities, comments or odd spacing inside mapping elements) and hands structure to the exact
parser's state machine (:class:`dmimage.thin.dump.xml._XmlParser`), so both paths share one
set of rules. Anything unusual, including every error, raises :class:`NotCanonical`: the caller
then parses the same bytes with expat, which also reports problems with their line numbers.
"""

from __future__ import annotations

import io
import queue
import re
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

import numpy as np

from dmimage.thin.dump.xmlscan import Buffer, Lines, scan_lines
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
    parse_canonical_file(io.BytesIO(data), parser)


#: Bytes read at a time by :func:`parse_canonical_file`.
READ_BLOCK = 1 << 22
#: Bytes of mapping lines handed to the scanner at a time: its scratch arrays stay in cache.
PIECE = 1 << 20


def parse_canonical_file(f: IO[bytes], parser: _XmlParser, block: int = READ_BLOCK, *,
                         progress: Callable[[int], None] | None = None,
                         helper: bool = False) -> None:
    """:func:`parse_canonical` of a file read ``block`` bytes at a time into one reused
    buffer: a device's or def's body is scanned in pieces of whole lines (dump/xmlscan.py),
    so memory is a block, not the file. NotCanonical as :func:`parse_canonical` (the caller
    re-reads the file with expat). ``progress`` hears of the bytes read. ``helper``: a
    second thread scans the piece after the current one (numpy releases the GIL), for a
    caller with a core to spare.
    """
    from dmimage.thin.dump.xml import DumpFormatError

    pool = _Helper() if helper else None
    try:
        _Stream(f, parser, block, progress, pool).run()
    except DumpFormatError:
        raise NotCanonical from None
    finally:
        if pool is not None:
            pool.close()
    if not parser.sb_closed:
        raise NotCanonical


class _Pending:
    """A piece handed to the helper: :meth:`result` waits for its scan."""

    def __init__(self, args: tuple[Buffer, int, int]) -> None:
        self.args = args
        self.done = threading.Event()
        self.value: Lines | None = None
        self.error: BaseException | None = None

    def result(self) -> Lines | None:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _Helper:
    """One thread scanning the pieces handed to it (concurrent.futures would import logging
    and more: a start-up cost a 1M-mapping restore notices)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="xmlscan", daemon=True)
        self.thread.start()

    def submit(self, src: Buffer, lo: int, hi: int) -> _Pending:
        job = _Pending((src, lo, hi))
        self.jobs.put(job)
        return job

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                job.value = scan_lines(*job.args)
            except BaseException as exc:  # handed to the waiting parser
                job.error = exc
            job.done.set()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


class _Stream:
    """The input as one buffer refilled in place: ``buf[pos:n]`` is what is left to parse."""

    def __init__(self, f: IO[bytes], p: _XmlParser, block: int,
                 progress: Callable[[int], None] | None = None,
                 pool: _Helper | None = None) -> None:
        self.f, self.p, self.block = f, p, max(int(block), 1)
        self.progress = progress
        self.pool = pool
        #: a piece the helper found the scanner refuses: not scanned again
        self.refused = (-1, -1)
        self._alloc(max(2 * self.block, 1 << 12))
        self.pos = self.n = 0
        self.eof = False

    def _alloc(self, size: int) -> None:
        old = getattr(self, "buf", None)
        self.buf = bytearray(size)
        if old is not None:
            self.buf[:self.n - self.pos] = old[self.pos:self.n]
        self.src = Buffer(self.buf)

    def more(self) -> bool:
        """Read another block after what is left (moved to the front); False at the end."""
        if self.eof:
            return False
        left = self.n - self.pos
        if left + self.block > len(self.buf):
            self._alloc(max(2 * len(self.buf), left + self.block))
        elif self.pos:
            self.buf[:left] = self.buf[self.pos:self.n]
        self.pos, self.n = 0, left
        got = self.f.readinto(memoryview(self.buf)[left:left + self.block])  # type: ignore[attr-defined]
        if not got:
            self.eof = True
            return False
        self.n += got
        if self.progress:
            self.progress(got)
        return True

    def run(self) -> None:
        p = self.p
        body_end: bytes | None = None  # the closing tag of the body being read
        while True:
            if body_end is not None:
                if self._body(body_end):
                    body_end = None
                continue
            buf, n = self.buf, self.n
            pos = self.pos
            while pos < n and buf[pos] in _WS:
                pos += 1
            self.pos = pos
            if pos >= n:
                if not self.more():
                    return
                continue
            if buf.find(b">", pos, n) < 0:
                if not self.more():
                    raise NotCanonical
                continue
            m = _TAG_AT.match(buf, pos, n)
            if m is None:
                raise NotCanonical
            closing, tag, attr_text, selfclose = m.groups()
            tag_s = tag.decode()
            self.pos = m.end()
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

    def _body(self, body_end: bytes) -> bool:
        """Parse the next piece of a body; True when its closing tag is next."""
        stop = getattr(self.p, "stop", None)  # a consumer that gave up (restore_stream.py)
        if stop is not None and stop.is_set():
            raise NotCanonical
        pos, n = self.pos, self.n
        lim = pos + PIECE
        cut = self.buf.find(b"\n", lim, n) if lim < n else -1
        if cut < 0:
            if self.more():
                return False
            pos, cut = self.pos, self.n  # moved to the front of the buffer
        ahead = self._ahead(cut)
        lines = None if (pos, cut) == self.refused else scan_lines(self.src, pos, cut)
        later = ahead.result() if ahead is not None else None  # the buffer stays as it is
        if lines is not None:
            _add_lines(self.p, lines)
            self.pos = cut
            if ahead is not None:
                assert self.ahead_cut is not None
                if later is not None:
                    _add_lines(self.p, later)
                    self.pos = self.ahead_cut
                else:
                    self.refused = (cut, self.ahead_cut)
            return False
        # the body's end, a ref, or text the scanner does not take
        buf = self.buf
        ends = [t for t in (buf.find(body_end, pos, cut), buf.find(b"<ref", pos, cut)) if t >= 0]
        if not ends:
            if cut == self.n and self.eof:
                raise NotCanonical
            _chunk(bytes(buf[pos:cut]), self.p)
            self.pos = cut
            return False
        t = min(ends)
        line = buf.rfind(b"\n", pos, t)
        if line > pos:
            lines = scan_lines(self.src, pos, line)
            if lines is not None:
                _add_lines(self.p, lines)
            else:
                _chunk(bytes(buf[pos:line]), self.p)
            pos = line
        _chunk(bytes(buf[pos:t]), self.p)
        self.pos = t
        if buf.startswith(body_end, t):
            return True
        r = _TAG_AT.match(buf, t, self.n)
        if r is None or r.group(2) != b"ref" or r.group(1) or not r.group(4):
            raise NotCanonical
        self.p.start("ref", _attrs(r.group(3)))
        self.pos = r.end()
        return False


    def _ahead(self, pos: int) -> _Pending | None:
        """The piece after ``pos`` (whole lines, in the buffer) handed to the helper."""
        self.ahead_cut: int | None = None
        if self.pool is None:
            return None
        lim = pos + PIECE
        cut = self.buf.find(b"\n", lim, self.n) if lim < self.n else -1
        if cut < 0:
            return None
        self.ahead_cut = cut
        return self.pool.submit(self.src, pos, cut)


def _add_lines(p: _XmlParser, lines: Lines) -> None:
    length = lines.length
    if length is None:
        length = np.ones(len(lines.origin), U64)
    _add(p, lines.origin, lines.data, length, lines.time)


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
