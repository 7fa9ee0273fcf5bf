"""Read layer tars as Go's ``archive/tar`` reads them (dockerd's ``UnpackLayer`` and
tar-split both sit on it), where Python's ``tarfile`` differs:

- a global PAX header (typeflag ``g``) is an entry of its own, with its records and no
  size (its name the ``path`` record if it has one), and it changes no later entry; Python
  merges its records (``mtime``, ``uid``, ``path``...) into every later member and hides it;
- a GNU-format header (magic ``"ustar "``, version ``" \\0"``) has no name prefix: bytes
  345..356 and 357..368 are its atime and ctime (read when their first byte is not NUL; if
  they do not parse, the pre-Go-1.8 fallback takes them as an ASCII prefix); a star header
  (``"ustar\\0"`` and ``"tar\\0"`` at 508) has a 131-byte prefix, then atime and ctime at
  476 and 488; a v7 header has no prefix. Python reads bytes 345..499 as a prefix for all of
  them (a GNU atime becomes a directory in the name) and never reads atime;
- extended headers merge as Go 1.19's next()/mergePAX merge them (the last ``x`` header
  wins, a GNU long name or link wins over a PAX path or linkpath, empty values are no
  records, typeflag NUL is a directory by its final name), and what Go refuses is
  refused: a bad header after the first (tarfile ends the archive there), numbers Go
  cannot parse (tarfile takes 0, a sign, an underscore), malformed records, special
  headers over 1 MiB.

Only the standard library is imported: the xfs applier runs this in the guest.
"""

from __future__ import annotations

import re
import tarfile
from typing import IO, Any

_GNU = b"ustar  \0"
_USTAR = b"ustar\0"
_STAR_TRAILER = b"tar\0"
# tarfile's header errors (not in its type stubs): HeaderError's subclasses
_tf: Any = tarfile
_EOF_HEADER: type[Exception] = _tf.EOFHeaderError
_INVALID_HEADER: type[Exception] = _tf.InvalidHeaderError
_TRUNCATED_HEADER: type[Exception] = _tf.TruncatedHeaderError
_SUBSEQUENT_HEADER: type[Exception] = _tf.SubsequentHeaderError
# v7 numeric fields Go parses with parseNumeric for every member
_NUMERIC = (("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124), ("size", 124, 136),
            ("mtime", 136, 148))
_SPECIAL = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK}
_MAX_SPECIAL = 1 << 20  # Go's maxSpecialFileSize


class GoTarInfo(tarfile.TarInfo):
    """A TarInfo read with Go's rules (``tarfile.open(..., tarinfo=GoTarInfo)``).

    ``atime_s``/``ctime_s``: the header's own access and change times in whole seconds (GNU
    or star format), else None; a PAX ``atime`` record overrides it (``atime_ns``).

    ``go_name``: Go's ``hdr.Name`` exactly (what tar-split records): ``name`` is tarfile's,
    which drops a directory's trailing slashes (in the header, a GNU long name and a PAX
    ``path``; Go keeps them), and lets a PAX ``path`` override a GNU long name (in Go the
    long name wins, in either order). ``go_end``: where Go's raw header bytes end (a global
    header's records end there, before their padding); None: at ``offset_data``."""

    atime_s: int | None
    ctime_s: int | None
    go_name: str
    go_end: int | None
    _go_long: bool
    _go_link: bool
    _go_pax: bool
    _go_rega: bool

    @classmethod
    def frombuf(cls, raw: bytes | bytearray, encoding: str, errors: str) -> GoTarInfo:
        obj = super().frombuf(raw, encoding, errors)
        buf = bytes(raw)
        for attr, lo, hi in _NUMERIC:  # tarfile cuts at the first NUL, then int(s, 8)
            field = buf[lo:hi]
            if field[0] and not field.translate(None, b"01234567 \0"):
                continue  # no leading NUL, only octal digits and padding: read alike
            value = _numeric(field)
            if value is None:
                raise _INVALID_HEADER(f"invalid {attr} field {buf[lo:hi]!r}")
            setattr(obj, attr, value)
        if obj.size < 0 and obj.type not in _HEADER_ONLY:
            raise _INVALID_HEADER("negative size")  # Go's handleRegularFile
        obj.atime_s = obj.ctime_s = None
        name = _nts(bytes(buf[0:100]), encoding, errors)
        obj.go_end = None
        obj._go_long = obj._go_link = obj._go_pax = False
        magic = buf[257:263]
        prefix = b""
        if magic == _USTAR and buf[508:512] == _STAR_TRAILER:
            prefix = buf[345:476]
            obj.atime_s = _numeric(buf[476:488]) or 0
            obj.ctime_s = _numeric(buf[488:500]) or 0
        elif magic == _USTAR:
            prefix = buf[345:500]
        elif buf[257:265] == _GNU:
            a, c = buf[345:357], buf[357:369]
            at = _numeric(a) if a[0] else 0
            ct = _numeric(c) if c[0] else 0
            if at is None or ct is None:  # Go's fallback for its own pre-1.8 files
                p = buf[345:500].split(b"\0", 1)[0]
                if p.isascii():
                    prefix = p
            else:
                obj.atime_s = at if a[0] else None
                obj.ctime_s = ct if c[0] else None
        text = _nts(bytes(prefix), encoding, errors)
        if text and obj.type not in tarfile.GNU_TYPES:
            name = text + "/" + name
        obj.go_name = name
        obj._go_rega = buf[156:157] == tarfile.AREGTYPE
        obj._go_type()
        return obj

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> GoTarInfo:
        """The next member, with Go's readHeader's ends: EOF, one zero block then EOF, or two
        zero blocks. Anything else that is no valid header (a bad checksum, a partial block,
        a zero block then a header) is an error there (dockerd refuses the layer), where
        tarfile would take it, after the first member, as the end of the archive."""
        try:
            return super().fromtarfile(tarfile_)
        except _EOF_HEADER:
            fileobj: Any = tarfile_.fileobj
            second = fileobj.read(tarfile.BLOCKSIZE)
            if second and second != bytes(tarfile.BLOCKSIZE):
                raise _SUBSEQUENT_HEADER(
                    "a zero block, then no second one") from None
            raise
        except (_INVALID_HEADER, _TRUNCATED_HEADER) as exc:
            raise _SUBSEQUENT_HEADER(str(exc)) from None

    def _go_type(self) -> bool:
        """Go's next() once hdr.Name is final: typeflag NUL becomes a directory if the name
        ends in a slash, else a regular file (tarfile judges by the header's name field
        alone); the name without a directory's trailing slashes. True if the type
        changed."""
        old = self.type
        if self._go_rega:
            self.type = tarfile.DIRTYPE if self.go_name.endswith("/") else tarfile.REGTYPE
        self.name = self.go_name.rstrip("/") if self.isdir() else self.go_name
        return self.type != old

    def _proc_gnulong(self, tarfile_: tarfile.TarFile) -> Any:
        """A GNU long name or link as Go has it: trailing slashes kept, and no PAX path or
        linkpath overrides it, before or after it (Go 1.19's next() sets them last)."""
        fileobj: Any = tarfile_.fileobj
        at = fileobj.tell()
        buf = fileobj.read(self.size)
        fileobj.seek(at)
        nxt = tarfile.TarInfo._proc_gnulong(self, tarfile_)  # type: ignore[attr-defined]
        if self.type == tarfile.GNUTYPE_LONGNAME:
            nxt.go_name = _nts(buf, tarfile_.encoding or "utf-8", tarfile_.errors)
            nxt._go_long = True
        elif self.type == tarfile.GNUTYPE_LONGLINK:
            nxt._go_link = True
        return nxt

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        """A global header is returned as itself (tarfile's documented override point); an
        extended header's records are checked as Go's parsePAX checks them (tarfile stops
        at the first it cannot read and keeps the ones before). Such a header, or a GNU long
        name or link, of over 1 MiB is refused, as Go's readSpecialFile refuses it."""
        if self.type in _SPECIAL and self.size > _MAX_SPECIAL:
            raise _INVALID_HEADER(f"a {self.type!r} header of {self.size} bytes")
        if self.type == tarfile.XHDTYPE:
            fileobj: Any = tarfile_.fileobj
            at = fileobj.tell()
            data = fileobj.read(self.size)
            fileobj.seek(at)
            if _pax_records(data, "utf-8", "surrogateescape") is None:
                raise _INVALID_HEADER("invalid extended header records")
        if self.type != tarfile.XGLTYPE:
            out = tarfile.TarInfo._proc_member(self, tarfile_)  # type: ignore[attr-defined]
            if out is not self and out._go_type():
                # its data: tarfile skipped it by the type the header's own name gave
                tarfile_.offset = out.offset_data + (0 if out.isdir() else
                                                     out._block(out.size))
            return out
        fileobj = tarfile_.fileobj
        data = fileobj.read(self.size)
        if len(data) != self.size:
            raise tarfile.ReadError("truncated global header")
        records = _pax_records(data, tarfile_.encoding or "utf-8", tarfile_.errors)
        if records is None:
            raise tarfile.ReadError("invalid global header records")
        self.pax_headers = records
        if "path" in records:  # Go's mergePAX on the global header itself
            self.name = self.go_name = records["path"]
        self.go_end = self.offset + tarfile.BLOCKSIZE + self.size
        self.offset_data = self.offset + tarfile.BLOCKSIZE + -(-self.size // 512) * 512
        tarfile_.offset = self.offset_data
        self.size = 0
        return self

    def _proc_builtin(self, tarfile_: tarfile.TarFile) -> Any:
        """tarfile's, whose call of _apply_pax_info (with no records: globals are not
        merged) is no extended header's."""
        out = tarfile.TarInfo._proc_builtin(self, tarfile_)  # type: ignore[attr-defined]
        self._go_pax = False
        return out

    def _apply_pax_info(self, pax_headers: dict[str, str], encoding: str,
                        errors: str) -> None:
        """Go 1.19's mergePAX, in place of tarfile's: only the last extended header before
        a member applies (an earlier one here is applied after it, and is dropped; before
        a global one, none); an empty value keeps the header's field and is no record; a
        GNU long name or link wins; uid, gid, size and the times parse as Go parses them
        or the member is refused (tarfile takes a bad number as 0); ``GNU.sparse.*`` is
        not a name or a size (tarfile's sparse readers, which build refuses, see it)."""
        if self.type == tarfile.XGLTYPE or self._go_pax:
            return
        self._go_pax = True
        records = {k: v for k, v in pax_headers.items() if v}
        for k, v in records.items():
            if k == "path":
                if not self._go_long:
                    self.go_name = v
            elif k == "linkpath":
                if not self._go_link:
                    self.linkname = v
            elif k in ("uname", "gname"):
                setattr(self, k, v)
            elif k in ("uid", "gid", "size"):
                setattr(self, k, _go_int(v))
            elif k in ("mtime", "atime", "ctime"):
                _go_time(v)
                if k == "mtime":
                    self.mtime = float(v)
        if self.size < 0 and self.type not in _HEADER_ONLY:
            raise _INVALID_HEADER("negative size")
        self.pax_headers = records


# Go's isHeaderOnlyType: no data section, whatever the size says
_HEADER_ONLY = {tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                tarfile.DIRTYPE, tarfile.FIFOTYPE}


_GO_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)


def _go_int(v: str) -> int:
    """strconv.ParseInt(v, 10, 64); InvalidHeaderError (Go's ErrHeader) if it fails."""
    if not _GO_INT.fullmatch(v) or not -(1 << 63) <= int(v) < 1 << 63:
        raise _INVALID_HEADER(f"invalid PAX number {v!r}")
    return int(v)


def _go_time(v: str) -> None:
    """Go's parsePAXTime accepts *v* (seconds as ParseInt, then digits), else
    InvalidHeaderError."""
    secs, dot, frac = v.partition(".")
    _go_int(secs)
    if dot and frac and not (frac.isascii() and frac.isdigit()):
        raise _INVALID_HEADER(f"invalid PAX time {v!r}")


def _nts(b: bytes, encoding: str, errors: str) -> str:
    """A NUL-terminated field as text (Go's parseString)."""
    return b.split(b"\0", 1)[0].decode(encoding, errors)


def _numeric(b: bytes) -> int | None:
    """Go's parseNumeric: base-256 when the high bit is set, else octal (NULs and spaces
    trimmed); None if it does not parse."""
    if b[0] & 0x80:
        inv = 0xFF if b[0] & 0x40 else 0
        x = 0
        for i, c in enumerate(b):
            c ^= inv
            x = x << 8 | (c & 0x7F if i == 0 else c)
        if x >> 63:
            return None
        return ~x if inv else x
    s = b.strip(b" \0").split(b"\0", 1)[0]
    if not s:
        return 0
    if s.strip(b"01234567"):
        return None
    return int(s, 8)


def _pax_records(data: bytes, encoding: str, errors: str) -> dict[str, str] | None:
    """Go's parsePAX records, ``"%d %s=%s\\n"``; None if one is malformed."""
    out: dict[str, str] = {}
    while data:
        sp = data.find(b" ")
        if sp < 1 or not data[:sp].isdigit():
            return None
        n = int(data[:sp])
        if n < 5 or n > len(data) or data[n - 1:n] != b"\n":
            return None
        key, eq, value = data[sp + 1:n - 1].partition(b"=")
        if not eq or not key or b"\0" in (
                value if key in (b"path", b"linkpath", b"uname", b"gname") else key):
            return None  # validPAXRecord
        k = key.decode("utf-8", errors)
        if value:
            out[k] = value.decode(encoding, errors)
        else:  # "a value is stored only if it is non-empty; otherwise the key is deleted"
            out.pop(k, None)
        data = data[n:]
    return out


def open_tar(path: str | None = None, *, fileobj: IO[bytes] | None = None) -> tarfile.TarFile:
    """An uncompressed tar (a layer, or a docker-save archive) opened to be read with Go's
    rules (names kept as bytes through surrogateescape)."""
    return tarfile.open(path, mode="r:", fileobj=fileobj, tarinfo=GoTarInfo,
                        encoding="utf-8", errors="surrogateescape")


def pax_ns(ti: tarfile.TarInfo, key: str) -> int | None:
    """The PAX time *key* in nanoseconds, exactly (the float ``TarInfo.mtime`` rounds)."""
    raw = ti.pax_headers.get(key)
    if raw is None:
        return None
    whole, _, frac = raw.partition(".")
    neg = whole.startswith("-")
    n = abs(int(whole or "0")) * 10**9 + int((frac + "000000000")[:9])
    return -n if neg else n


def atime_ns(ti: tarfile.TarInfo) -> int | None:
    """Go's Header.AccessTime in ns: the PAX record, else the GNU/star header field, else
    None (Go's zero time)."""
    ns = pax_ns(ti, "atime")
    if ns is not None:
        return ns
    secs = getattr(ti, "atime_s", None)
    return None if secs is None else secs * 10**9


#: The last time moby's system.Chtimes sets (a 64-bit timespec: time.Unix(0, 1<<63-1)).
MAX_NS = (1 << 63) - 1


def chtimes_ns(t: int) -> int:
    """What moby's system.Chtimes gives a file, directory or hard link (not a symlink) for
    the time *t* in ns: a time before 1970 or past :data:`MAX_NS` becomes the epoch."""
    return t if 0 <= t <= MAX_NS else 0
