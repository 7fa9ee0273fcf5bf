"""Tar bytes built by hand from the format's layout (POSIX ustar/pax, GNU tar's old format),
not with tarfile: fixtures for how layer tars are read, whose expected values come from
the format and from Go's archive/tar, never from the reader under test.

Header block (512 bytes): name 0..100, mode 100, uid 108, gid 116, size 124, mtime 136
(octal, NUL-terminated), chksum 148 (6 octal digits, NUL, space: the sum of the block's
bytes with this field as 8 spaces), typeflag 156, linkname 157..257, magic 257, version
263, uname 265, gname 297, devmajor 329, devminor 337; then ustar's prefix 345..500, or
GNU's atime 345..357 and ctime 357..369.
"""

from __future__ import annotations

USTAR = (b"ustar\0", b"00")
GNU = (b"ustar ", b" \0")


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def header(name: bytes, typeflag: bytes, *, size: int = 0, mode: int = 0o644,
           uid: int = 0, gid: int = 0, mtime: int = 1_600_000_000,
           magic: tuple[bytes, bytes] = USTAR, atime: int | None = None,
           ctime: int | None = None) -> bytes:
    """One header block; *atime*/*ctime* only in the GNU format."""
    b = bytearray(512)
    b[0:len(name)] = name
    b[100:108] = _octal(mode, 8)
    b[108:116] = _octal(uid, 8)
    b[116:124] = _octal(gid, 8)
    b[124:136] = _octal(size, 12)
    b[136:148] = _octal(mtime, 12)
    b[156:157] = typeflag
    b[257:263], b[263:265] = magic
    b[265:269] = b"root"
    b[297:301] = b"root"
    if atime is not None:
        b[345:357] = _octal(atime, 12)
    if ctime is not None:
        b[357:369] = _octal(ctime, 12)
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def data(payload: bytes) -> bytes:
    """The payload padded to whole blocks."""
    return payload + b"\0" * (-len(payload) % 512)


def pax_records(records: list[tuple[str, str]]) -> bytes:
    """``"%d %s=%s\\n"`` records, the length counting itself."""
    out = b""
    for k, v in records:
        body = f" {k}={v}\n".encode()
        n = len(body) + 1
        while len(str(n).encode()) + len(body) != n:
            n = len(str(n).encode()) + len(body)
        out += str(n).encode() + body
    return out


def member(name: bytes, typeflag: bytes, payload: bytes = b"", **kw: object) -> bytes:
    return header(name, typeflag, size=len(payload), **kw) + data(payload)  # type: ignore[arg-type]


END = b"\0" * 1024
