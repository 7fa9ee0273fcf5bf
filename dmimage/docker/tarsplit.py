"""tar-split (github.com/vbatts/tar-split) as Docker keeps it per layer: gzip'd JSON lines,
``{"type": 1, "name", "size", "payload": crc64}`` for a file's content and ``{"type": 2,
"payload": base64 raw bytes}`` for headers and padding, in stream order. Writing the segments
and, for each file entry of nonzero size, that many bytes of the file rebuilds the layer tar
byte for byte; its sha256 is the layer's diff id, which :func:`assemble` checks."""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from dmimage.docker.errors import StoreError

FILE_TYPE = 1
SEGMENT_TYPE = 2
CHUNK = 1 << 20
_REST_CHUNK = 1 << 20  # tar-split's read size for what follows the end-of-archive blocks


class Entry(NamedTuple):
    """One tar-split line (a tuple: a layer has one per header, padding and file, and
    building 50,000 of them is part of every save)."""

    type: int
    name: bytes
    size: int
    payload: bytes


# A line exactly as Go's encoding/json writes tar-split's storage.Entry (fields in struct
# order, no spaces): a segment, or a file whose name is valid UTF-8 (no name_raw). A name
# holds no raw control character (JSON, and Go, escape them; \r would end a line there).
# A payload is matched as "anything up to the quote" (a tight loop in the regex engine, where
# a character class is checked byte by byte: a third of the match's time): its alphabet is
# checked by the strict base64 decoding every payload goes through, which refuses anything
# else (a newline included), sending the text to the JSON parsers as before.
_GO_LINE = re.compile(
    rb'^\{"type":(?:(2),"payload":"([^"]*)"'
    rb'|1,"name":"((?:[^"\\\x00-\x1f]|\\[^\x00-\x1f])*)"(?:,"size":(0|[1-9][0-9]{0,17}))?'
    rb',"payload":(?:"([^"]*)"|null)),"position":[0-9]+\}$', re.M)


class Layout(NamedTuple):
    """What save needs of a tar-split, by column: the files with content (name, size) and the
    literal tar bytes around them (headers, extended headers, padding, the end blocks), one
    more than the files: ``lits[0]``, file 0's content, ``lits[1]``, ..., ``lits[-1]``.
    Empty files are part of the literal bytes around them (no entry of their own)."""

    lits: list[bytes]
    names: list[bytes]
    sizes: list[int]

    @property
    def size(self) -> int:
        """Length of the tar it rebuilds."""
        return sum(map(len, self.lits)) + sum(self.sizes)


def layout_of(entries: list[Entry]) -> Layout:
    """The Layout of *entries*: consecutive segments joined, empty files dropped."""
    lits: list[bytes] = []
    names: list[bytes] = []
    sizes: list[int] = []
    cur: list[bytes] = []
    for e in entries:
        if e.type == SEGMENT_TYPE:
            cur.append(e.payload)
        elif e.size:
            lits.append(b"".join(cur))
            cur = []
            names.append(e.name)
            sizes.append(e.size)
    lits.append(b"".join(cur))
    return Layout(lits, names, sizes)


def _gunzip(raw: bytes, where: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise StoreError(where, f"not a complete gzip stream ({exc})") from None


def read_layout(raw: bytes, where: str) -> Layout:
    """:func:`read_entries`' result as a Layout (save's reading): lines as Go writes them go
    straight to the columns, with no Entry per line; anything else through read_entries'
    parsers, which accept and refuse exactly as there."""
    text = _gunzip(raw, where)
    try:
        fast = _go_layout(text)
    except (ValueError, binascii.Error):
        fast = None
    if fast is not None:
        return fast
    return layout_of(list(_read_text(text, where)))


def read_entries(raw: bytes, where: str) -> Iterator[Entry]:
    """Entries in stream order; malformed or truncated input raises StoreError naming *where*
    (and the line). Lines as Go writes them (every tar-split dockerd made) are matched with
    one regular expression; otherwise they are parsed as one JSON array (a layer of 50,000
    files has 150,000 lines: one call, not one per line); only when that fails is each line
    parsed alone, to name the bad one."""
    return _read_text(_gunzip(raw, where), where)


def _read_text(text: bytes, where: str) -> Iterator[Entry]:
    try:
        fast = _go_lines(text)
    except (ValueError, binascii.Error):
        fast = None
    if fast is not None:
        return iter(fast)
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        # each line in a one-element array of its own, the arrays apart by a raw newline (no
        # string may span it): a line that is not exactly one JSON value cannot pass by
        # joining its neighbour, as it could with plain commas
        rows = json.loads(b"[[" + b"]\n,[".join(lines) + b"]]") if lines else []
        if len(rows) != len(lines) or any(len(row) != 1 for row in rows):
            raise ValueError("a line is not one entry")
        return iter(_entries([row[0] for row in rows]))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError,
            binascii.Error):
        return _read_lines(text, where)  # names the bad line


def _go_lines(text: bytes) -> list[Entry] | None:
    """The entries of a tar-split whose every line is as Go writes it, matched with one
    regular expression (no JSON objects built); None when any line is not, for the JSON
    parsers to read (or reject naming the line)."""
    found = _GO_LINE.findall(text)
    nlines = text.count(b"\n") + (0 if text.endswith(b"\n") or not text else 1)
    if len(found) != nlines:
        return None
    a2b = binascii.a2b_base64
    out = []
    for seg, seg_payload, name, size, payload in found:
        if seg:
            out.append(Entry(SEGMENT_TYPE, b"", 0, a2b(seg_payload, strict_mode=True)))
            continue
        out.append(Entry(FILE_TYPE, _go_name(name), int(size) if size else 0,
                         a2b(payload, strict_mode=True)))
    return out


def _go_name(name: bytes) -> bytes:
    """A file name as the Go-line pattern captured it, as JSON reads it (ValueError for what
    JSON refuses)."""
    if b"\\" in name:  # escapes: as JSON reads them
        return str(json.loads(b'"' + name + b'"')).encode()
    if not name.isascii():
        name.decode()  # JSON text is UTF-8: anything else is for the parsers to reject
    return name


def _go_layout(text: bytes) -> Layout | None:
    """The Layout of a tar-split whose every line is as Go writes it (what _go_lines reads,
    accepted and refused alike), built without an Entry per line; None as _go_lines."""
    found = _GO_LINE.findall(text)
    nlines = text.count(b"\n") + (0 if text.endswith(b"\n") or not text else 1)
    if len(found) != nlines:
        return None
    a2b = binascii.a2b_base64
    lits: list[bytes] = []
    names: list[bytes] = []
    sizes: list[int] = []
    cur: list[bytes] = []
    for seg, seg_payload, name, size, payload in found:
        if seg:
            cur.append(a2b(seg_payload, strict_mode=True))
            continue
        name = _go_name(name)
        a2b(payload, strict_mode=True)  # checked as _go_lines checks it, not needed here
        if size and size != b"0":
            lits.append(cur[0] if len(cur) == 1 else b"".join(cur))
            cur = []
            names.append(name)
            sizes.append(int(size))
    lits.append(b"".join(cur))
    return Layout(lits, names, sizes)


def _entries(objs: list[dict[str, object]]) -> list[Entry]:
    """Well-formed entries, fast (most are segments); anything unusual raises, and the
    caller parses line by line to name it."""
    out = []
    a2b = binascii.a2b_base64
    for obj in objs:
        kind = obj["type"]
        if kind == SEGMENT_TYPE and len(obj) <= 3:  # type, payload, position
            p = obj["payload"]
            if not isinstance(p, str):
                raise TypeError("payload")
            out.append(Entry(SEGMENT_TYPE, b"", 0, a2b(p, strict_mode=True)))
        elif kind == FILE_TYPE and "name_raw" not in obj:
            name, size, p = obj["name"], obj.get("size", 0), obj.get("payload") or ""
            if not isinstance(name, str) or type(size) is not int or size < 0 \
                    or not isinstance(p, str):
                raise TypeError("file entry")
            out.append(Entry(FILE_TYPE, name.encode(), size, a2b(p, strict_mode=True)))
        else:
            raise ValueError("another kind of entry")
    return out


def _read_lines(text: bytes, where: str) -> Iterator[Entry]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise StoreError(where, f"line {lineno}: malformed entry ({exc})") from None
        yield _entry(obj, lineno, where)


def _b64(s: object) -> bytes:
    if not isinstance(s, str):
        raise TypeError("not a string")
    return binascii.a2b_base64(s, strict_mode=True)


def _entry(obj: object, lineno: int, where: str) -> Entry:
    try:
        if not isinstance(obj, dict):
            raise TypeError("not an object")
        kind = obj["type"]
        payload = _b64(obj.get("payload") or "")
        if "name_raw" in obj and obj["name_raw"]:
            name = _b64(obj["name_raw"])
        else:
            name = str(obj.get("name", "")).encode()
        size = int(obj.get("size", 0))
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise StoreError(where, f"line {lineno}: malformed entry ({exc})") from None
    if kind not in (FILE_TYPE, SEGMENT_TYPE) or size < 0:
        raise StoreError(where, f"line {lineno}: entry type {kind!r} size {size}")
    return Entry(kind, name, size, payload)


def tar_size(entries: list[Entry]) -> int:
    """Length of the tar the entries rebuild (known before any file is read)."""
    return sum(len(e.payload) if e.type == SEGMENT_TYPE else e.size for e in entries)


def assemble(entries: list[Entry], open_file: Callable[[bytes], BinaryIO], *,
             expect_digest: str, where: str) -> Iterator[bytes]:
    """The rebuilt tar in chunks. Its sha256 must be *expect_digest* (``sha256:...``): the
    last step raises StoreError otherwise, so a consumer that stops on the error never
    completes a wrong tar."""
    h = hashlib.sha256()
    for e in entries:
        if e.type == SEGMENT_TYPE:
            h.update(e.payload)
            yield e.payload
            continue
        if e.size == 0:
            continue
        f = open_file(e.name)
        left = e.size
        while left:
            buf = f.read(min(CHUNK, left))
            if not buf:
                raise StoreError(where, f"{e.name.decode(errors='replace')}: the layer's file "
                                 f"is {e.size - left} bytes, tar-split says {e.size}")
            h.update(buf)
            left -= len(buf)
            yield buf
    got = "sha256:" + h.hexdigest()
    if got != expect_digest:
        raise StoreError(where, f"rebuilt layer tar has {got}, the layer's diff id is "
                         f"{expect_digest}")


@dataclass(frozen=True, slots=True)
class Member:
    """One tar member as a layer applies it (names raw bytes, as Go's tar reader has them)."""

    info: tarfile.TarInfo
    name: bytes
    data_offset: int


# Go's encoding/json string escapes (json.Encoder, HTML escaping on, as tar-split's packer
# uses it; Go before 1.22, which dockerd 20.10 was built with, has no short \b and \f):
# UTF-8 written as is, U+2028/2029 and <, >, & escaped.
_GO_ESCAPES = {c: f"\\u{c:04x}" for c in range(0x20)} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", ord('"'): '\\"',
    ord("\\"): "\\\\", ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
    0x2028: "\\u2028", 0x2029: "\\u2029"}


def _go_name_field(name: bytes) -> bytes:
    """``,"name":...`` as tar-split's ``Entry.SetName`` and Go's encoder write it: a valid
    UTF-8 name as a string, anything else base64 in ``name_raw``, an empty one omitted."""
    if not name:
        return b""
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return b',"name_raw":"' + base64.b64encode(name) + b'"'
    return b',"name":"' + text.translate(_GO_ESCAPES).encode() + b'"'


def disassemble(path: str, where: str) -> tuple[bytes, list[Member], int]:
    """(tar-split.json.gz, members, applied size) of the layer tar at *path*.

    The lines are the ones tar-split's ``asm.NewInputTarStream`` writes (dockerd's, checked
    line for line against it in the guest): per member, one segment of the raw bytes Go's
    reader consumed to reach its data (the previous member's padding, extended headers, its
    header), then its file entry (``hdr.Name`` as Go has it, a directory's trailing slash
    kept; the size; the CRC-64/ISO of a regular file's data, else null); after the last, one
    segment with its padding and the end-of-archive blocks, then whatever follows them (in
    1 MiB segments), then an empty segment. Every member is a file entry (tar-split's packer
    refuses a name seen twice, so this does too). The members are read as Go's archive/tar
    reads them (``gotar``): a global PAX header is a member of its own with no data, its
    records in its segment and their padding in the next. The applied size is what dockerd
    records in the layerdb's ``size``: the sum of the members' header sizes.
    """
    from dmimage.docker.gotar import open_tar

    members: list[Member] = []
    # a segment's payload, or the index of a member whose file entry goes there
    items: list[bytes | int] = []
    pos = 0  # bytes of the file already covered by entries
    seen: set[str] = set()
    applied = 0
    with open(path, "rb") as raw:
        try:
            tar = open_tar(fileobj=raw)
            infos = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise StoreError(where, f"not a readable tar ({exc})") from None
        # CRCs: small files batched (crc64_many), flushed every _CRC_BATCH bytes; a large
        # file a _CRC_CHUNK at a time (crc64_update): memory stays bounded on any layer
        payloads: list[bytes | None] = []
        small: list[int] = []
        pending: list[bytes] = []
        pending_bytes = 0
        for ti in infos:
            if ti.sparse is not None or ti.type in (tarfile.GNUTYPE_SPARSE,):
                raise StoreError(where, f"{ti.name}: sparse members are not supported")
            size = ti.size
            if not ti.isreg() and size:
                raise StoreError(where, f"{ti.name}: a {ti.type!r} member with {size} bytes "
                                 "of data")
            clean = posixpath.normpath(ti.name)
            if clean.startswith("//"):  # Go's filepath.Clean keeps one leading slash
                clean = "/" + clean.lstrip("/")
            if clean in seen:
                raise StoreError(where, f"{ti.name}: named twice (tar-split refuses "
                                 "duplicate paths)")
            seen.add(clean)
            head_end = getattr(ti, "go_end", None) or ti.offset_data
            raw.seek(pos)
            items.append(raw.read(head_end - pos))
            payloads.append(None)
            if size >= 1 << 16:
                payloads[-1] = _file_crc(raw, ti, where).to_bytes(8, "big")
            elif size:
                raw.seek(ti.offset_data)
                data = raw.read(size)
                if len(data) != size:
                    raise StoreError(where, f"{ti.name}: truncated data")
                small.append(len(payloads) - 1)
                pending.append(data)
                pending_bytes += size
                if pending_bytes >= _CRC_BATCH:
                    _flush_crcs(payloads, small, pending)
                    pending_bytes = 0
            members.append(Member(ti, ti.name.encode("utf-8", "surrogateescape"),
                                  ti.offset_data))
            items.append(len(members) - 1)
            applied += size
            pos = head_end + size
        # Go's reader at the end: the last padding, then two zero blocks (or what is left);
        # then tar-split reads the rest in chunks of up to 1 MiB, a segment per read,
        # until a read of nothing (EOF): the empty segment that ends every tar-split. How
        # many reads the rest takes depends on the reader under dockerd (one, for the
        # rest of a docker-save layer); this takes as few as the chunks allow.
        raw.seek(pos)
        items.append(raw.read(-pos % 512 + 1024))
        while chunk := raw.read(_REST_CHUNK):
            items.append(chunk)
        items.append(b"")
    _flush_crcs(payloads, small, pending)
    b64 = base64.b64encode
    lines = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            lines.append(b'{"type":2,"payload":"%s","position":%d}\n' % (b64(item), i))
            continue
        m = members[item]
        ti = m.info
        name = getattr(ti, "go_name", ti.name).encode("utf-8", "surrogateescape")
        size_f = b',"size":%d' % ti.size if ti.size else b""
        p = payloads[item]
        pay = b'"' + b64(p) + b'"' if p is not None else b"null"
        lines.append(b'{"type":1%s%s,"payload":%s,"position":%d}\n'
                     % (_go_name_field(name), size_f, pay, i))
    return gzip.compress(b"".join(lines), mtime=0), members, applied


_CRC_BATCH = 64 << 20  # small files' bytes held before their CRCs are taken (fewer, and files
# of 8..64 KiB get too few lanes per batch: +25% CPU at 64 MiB, +60% at 32, on 4,000 files)
_CRC_CHUNK = 16 << 20  # a large file's bytes held at a time


def _flush_crcs(payloads: list[bytes | None], small: list[int], pending: list[bytes]) -> None:
    """The CRC-64s of the *pending* small files into *payloads* at *small*; both emptied."""
    from dmimage.docker.crc64 import crc64_many

    for i, c in zip(small, crc64_many(pending), strict=True):
        payloads[i] = c.to_bytes(8, "big")
    small.clear()
    pending.clear()


def _file_crc(raw: BinaryIO, ti: tarfile.TarInfo, where: str) -> int:
    """CRC-64/ISO of a member's data, read a _CRC_CHUNK at a time (the odd-sized part
    first, so every later chunk has one length and crc64_update's constants are cached)."""
    from dmimage.docker.crc64 import crc64, crc64_update

    raw.seek(ti.offset_data)
    crc = None
    first = ti.size % _CRC_CHUNK or _CRC_CHUNK
    for n in (first, *(_CRC_CHUNK,) * ((ti.size - first) // _CRC_CHUNK)):
        buf = raw.read(n)
        if len(buf) != n:
            raise StoreError(where, f"{ti.name}: truncated data")
        crc = crc64(buf) if crc is None else crc64_update(crc, buf)
    assert crc is not None
    return crc
