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
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from dmimage.docker.errors import StoreError

FILE_TYPE = 1
SEGMENT_TYPE = 2
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Entry:
    type: int
    name: bytes
    size: int
    payload: bytes


def read_entries(raw: bytes, where: str) -> Iterator[Entry]:
    """Entries in stream order; malformed or truncated input raises StoreError naming *where*."""
    try:
        text = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise StoreError(where, f"not a complete gzip stream ({exc})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            kind = obj["type"]
            payload = base64.b64decode(obj.get("payload") or b"", validate=True)
            if "name_raw" in obj and obj["name_raw"]:
                name = base64.b64decode(obj["name_raw"], validate=True)
            else:
                name = str(obj.get("name", "")).encode()
            size = int(obj.get("size", 0))
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise StoreError(where, f"line {lineno}: malformed entry ({exc})") from None
        if kind not in (FILE_TYPE, SEGMENT_TYPE) or size < 0:
            raise StoreError(where, f"line {lineno}: entry type {kind!r} size {size}")
        yield Entry(kind, name, size, payload)


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
