"""Packed metadata files, interchangeable with thin_metadata_pack / thin_metadata_unpack 1.1.

The format (read from thin-provisioning-tools 1.1.0's source; our own implementation):

* Header, four little-endian u64: magic 0xa537a0aa6309ef77, version 3, block size 4096,
  nr_blocks (the metadata file's size / 4096).
* Then frames until end of file: a u64 length and that many bytes of one zlib stream. The
  stream holds up to 1024 records: a raw u64 block number, then the block's 4096 bytes encoded
  for a small byte-code machine (below). Frames may come in any order.
* Only blocks whose checksum matches a known block type are packed (thin/cache/era superblock,
  btree node, space-map index, bitmap, dm-array); all others unpack as zeros.
* Encoding: superblocks, bitmaps, index and array blocks are one literal. A btree node is the
  32-byte header as a literal, its max_entries keys as a delta-coded u64 run, then the values:
  for internal nodes a delta-coded run; for leaves with 8-byte values a "shifted run" (the
  values' high bits >> 24 and low 24 bits as two delta-coded runs); for other leaves the rest
  of the block as a literal; and any bytes after the values as a literal.
* Byte code: one byte per instruction, tag in the high nibble, operand in the low nibble:
  0 SET (base = next 1/2/4/8-byte LE value, emit), 1 POS (base += nibble, emit), 2 POSW
  (base += 1/2/4/8-byte operand, emit), 3 NEG, 4 NEGW (likewise, subtracting), 5 CONST (emit
  base nibble times), 6 CONST8 (count = nibble << 8 | next byte), 7 COUNT (apply the next
  instruction nibble times), 8 COUNT8, 9 LIT (nibble bytes follow), 10 LITW (1/2/4/8-byte
  length, then the bytes), 11 SHIFTEDRUN (len = nibble << 8 | next byte; two runs of len u64s
  follow: high and low parts; emits high << 24 | low & 0xffffff). Every emitted number is a
  little-endian u64; arithmetic wraps at 2**64.
* The delta coder: the first number is a SET; then maximal runs of equal successive
  differences become POS/NEG (with a COUNT prefix when the run is longer than one) or CONST.

thin_metadata_pack 1.1 quirks we do not share: it splits the file into chunks of
clamp(nr_blocks / (jobs × 64), 128, 4096) blocks and never packs the last, smaller chunk's
worth of blocks when nr_blocks is not a multiple of the chunk size (after shuffling, the chunk
left out is a random one), and packs nothing at all below 128 blocks. Ours packs every block.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from dmimage import devlock
from dmimage.errors import DeviceError, DmimageError
from dmimage.format.constants import BLOCK_SIZE
from dmimage.pdata.block import BlockReader
from dmimage.pdata.writer import invalidate_superblock

if TYPE_CHECKING:
    from dmimage.progress import Progress

__all__ = ["MAGIC", "PACK_VERSION", "PackFormatError", "pack_metadata", "unpack_metadata",
           "encode_block", "decode_block", "known_block_kind", "read_pack"]

MAGIC = 0xA537A0AA6309EF77
PACK_VERSION = 3
BLOCKS_PER_FRAME = 1024
_U64_MASK = (1 << 64) - 1

SALTS = {
    160774: "thin superblock", 9031977: "cache superblock", 146538381: "era superblock",
    121107: "btree node", 160478: "index", 240779: "bitmap", 595846735: "array",
}
SET, POS, POSW, NEG, NEGW, CONST, CONST8, COUNT, COUNT8, LIT, LITW, SHIFTED = range(12)


class PackFormatError(DmimageError):
    """A pack file that cannot be read (bad header, truncated or corrupt frames)."""

    exit_code = 1


def known_block_kind(block: bytes | memoryview) -> str | None:
    """The block type whose salt makes the stored checksum match, as thin_metadata_pack
    decides what to pack; None for anything else."""
    from crc32c import crc32c

    salt = (crc32c(bytes(block[4:BLOCK_SIZE])) ^ 0xFFFFFFFF) ^ struct.unpack_from("<I", block)[0]
    return SALTS.get(salt)


# ----------------------------------------------------------------------------- encoding

def _tag(out: bytearray, tag: int, nibble: int) -> None:
    out.append((tag << 4) | nibble)


def _width(out: bytearray, tag: int, n: int) -> None:
    if n <= 0xFF:
        _tag(out, tag, 1)
        out.append(n)
    elif n <= 0xFFFF:
        _tag(out, tag, 2)
        out += struct.pack("<H", n)
    elif n <= 0xFFFFFFFF:
        _tag(out, tag, 4)
        out += struct.pack("<I", n)
    else:
        _tag(out, tag, 8)
        out += struct.pack("<Q", n)


def _count(out: bytearray, count: int) -> None:
    if count == 1:
        return
    if count < 16:
        _tag(out, COUNT, count)
    else:
        _tag(out, COUNT8, count >> 8)
        out.append(count & 0xFF)


def _literal(out: bytearray, data: bytes | memoryview) -> None:
    n = len(data)
    if n < 16:
        _tag(out, LIT, n)
    else:
        _width(out, LITW, n)
    out += data


def _u64s(out: bytearray, ns: np.ndarray) -> None:
    """Delta-code a run of u64s the way 1.1 does."""
    ns = np.asarray(ns, np.uint64)
    if len(ns) == 0:
        return
    _width(out, SET, int(ns[0]))
    if len(ns) == 1:
        return
    with np.errstate(over="ignore"):
        diffs = ns[1:] - ns[:-1]  # wrapping
    brk = np.ones(len(diffs), bool)
    brk[1:] = diffs[1:] != diffs[:-1]
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, len(diffs))).tolist()
    firsts = starts.tolist()
    nl = ns.tolist()
    for s, c in zip(firsts, counts, strict=True):
        prev, cur = nl[s], nl[s + 1]
        if cur == prev:
            if c < 16:
                _tag(out, CONST, c)
            else:
                _tag(out, CONST8, c >> 8)
                out.append(c & 0xFF)
            continue
        _count(out, c)
        if cur > prev:
            delta, small, wide = cur - prev, POS, POSW
        else:
            delta, small, wide = prev - cur, NEG, NEGW
        if delta < 16:
            _tag(out, small, delta)
        else:
            _width(out, wide, delta)


def encode_block(block: bytes | memoryview, kind: str) -> bytes:
    """One block's byte code (as thin_metadata_pack 1.1 encodes it)."""
    out = bytearray()
    block = bytes(block)
    if kind != "btree node":
        _literal(out, block)
        return bytes(out)
    flags, max_entries, value_size = struct.unpack_from("<I", block, 4)[0], \
        *struct.unpack_from("<II", block, 20)
    keys_end = 32 + 8 * max_entries
    is_leaf = flags == 2
    vals_end = keys_end + 8 * max_entries
    if keys_end > BLOCK_SIZE or ((not is_leaf or value_size == 8) and vals_end > BLOCK_SIZE):
        _literal(out, block)  # 1.1 would fail; any valid encoding decodes the same
        return bytes(out)
    _literal(out, block[:32])
    _u64s(out, np.frombuffer(block, "<u8", max_entries, 32))
    if is_leaf and value_size != 8:
        _literal(out, block[keys_end:])
        return bytes(out)
    values = np.frombuffer(block, "<u8", max_entries, keys_end)
    if is_leaf:
        n = len(values)
        _tag(out, SHIFTED, n >> 8)
        out.append(n & 0xFF)
        _u64s(out, values >> np.uint64(24))
        _u64s(out, values & np.uint64(0xFFFFFF))
    else:
        _u64s(out, values)
    if vals_end < BLOCK_SIZE:
        _literal(out, block[vals_end:])
    return bytes(out)


# ----------------------------------------------------------------------------- decoding

class _VM:
    __slots__ = ("buf", "pos", "base")

    def __init__(self, buf: bytes, pos: int):
        self.buf = buf
        self.pos = pos
        self.base = 0

    def _byte(self) -> int:
        if self.pos >= len(self.buf):
            raise PackFormatError("truncated block encoding")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def _operand(self, width: int) -> int:
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}.get(width)
        if fmt is None:
            raise PackFormatError(f"bad operand width {width}")
        if self.pos + width > len(self.buf):
            raise PackFormatError("truncated block encoding")
        v: int = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += width
        return v

    def instr(self, out: bytearray, count: int = 1) -> None:
        b = self._byte()
        tag, nib = b >> 4, b & 0xF
        if tag == SET:
            self.base = self._operand(nib)
            out += struct.pack("<Q", self.base) * count
        elif tag in (POS, POSW, NEG, NEGW):
            delta = nib if tag in (POS, NEG) else self._operand(nib)
            if tag in (NEG, NEGW):
                delta = -delta
            for _ in range(count):
                self.base = (self.base + delta) & _U64_MASK
                out += struct.pack("<Q", self.base)
        elif tag in (CONST, CONST8):
            n = nib if tag == CONST else (nib << 8) | self._byte()
            out += struct.pack("<Q", self.base) * n
        elif tag == COUNT:
            self.instr(out, nib)
        elif tag == COUNT8:
            self.instr(out, (nib << 8) | self._byte())
        elif tag in (LIT, LITW):
            n = nib if tag == LIT else self._operand(nib)
            if self.pos + n > len(self.buf):
                raise PackFormatError("truncated literal")
            out += self.buf[self.pos:self.pos + n]
            self.pos += n
        elif tag == SHIFTED:
            n = (nib << 8) | self._byte()
            high = self.run(8 * n)
            low = self.run(8 * n)
            h = np.frombuffer(bytes(high[:8 * n]), "<u8")
            lo = np.frombuffer(bytes(low[:8 * n]), "<u8")
            out += ((h << np.uint64(24)) | (lo & np.uint64(0xFFFFFF))).astype("<u8").tobytes()
        else:
            raise PackFormatError(f"bad instruction tag {tag}")

    def run(self, nbytes: int) -> bytearray:
        """Execute until at least nbytes were emitted (as 1.1's VM does)."""
        out = bytearray()
        while len(out) < nbytes:
            self.instr(out)
        return out


def decode_block(buf: bytes, pos: int = 0) -> tuple[bytes, int]:
    """Decode one block's byte code starting at ``pos``: (4096 bytes, position after)."""
    vm = _VM(buf, pos)
    out = vm.run(BLOCK_SIZE)
    if len(out) != BLOCK_SIZE:
        raise PackFormatError(f"a block decodes to {len(out)} bytes, not {BLOCK_SIZE}")
    return bytes(out), vm.pos


# ----------------------------------------------------------------------------- files

def _frames(blocks: Iterator[tuple[int, bytes]]) -> Iterator[bytes]:
    records = bytearray()
    n = 0
    for b, enc in blocks:
        records += struct.pack("<Q", b) + enc
        n += 1
        if n == BLOCKS_PER_FRAME:
            yield zlib.compress(bytes(records))
            records, n = bytearray(), 0
    if n:
        yield zlib.compress(bytes(records))


def pack_metadata(metadata: str | os.PathLike[str], out: BinaryIO,
                  progress: Progress | None = None) -> int:
    """Write the pack of a metadata file or device; returns the number of blocks packed.
    ``progress`` hears of the metadata bytes scanned."""
    with BlockReader(metadata) as reader:
        nr_blocks = reader.nr_blocks
        out.write(struct.pack("<4Q", MAGIC, PACK_VERSION, BLOCK_SIZE, nr_blocks))
        packed = 0
        if progress is not None:
            progress.set_total(nr_blocks * BLOCK_SIZE)

        def blocks() -> Iterator[tuple[int, bytes]]:
            nonlocal packed
            for b in range(nr_blocks):
                if progress is not None:
                    progress(BLOCK_SIZE)
                data = reader.block(b)
                kind = known_block_kind(data)
                if kind is not None:
                    packed += 1
                    yield b, encode_block(data, kind)

        for frame in _frames(blocks()):
            out.write(struct.pack("<Q", len(frame)))
            out.write(frame)
    return packed


def read_pack(f: BinaryIO, progress: Progress | None = None
              ) -> tuple[int, Iterator[tuple[int, bytes]]]:
    """(nr_blocks, iterator of (block number, 4096 bytes)) of a pack stream; ``progress``
    hears of the pack's bytes as each frame is read (its total is the file's size when
    ``f`` is a regular file)."""
    head = f.read(32)
    if len(head) < 32:
        raise PackFormatError("not a pack file (shorter than its header)")
    magic, version, block_size, nr_blocks = struct.unpack("<4Q", head)
    if magic != MAGIC:
        raise PackFormatError("not a pack file (bad magic)")
    if version != PACK_VERSION:
        raise PackFormatError(f"unsupported pack file version {version} (expected "
                              f"{PACK_VERSION})")
    if block_size != BLOCK_SIZE:
        raise PackFormatError(f"block size is {block_size}, not {BLOCK_SIZE}")
    if progress is not None:
        try:
            progress.set_total(os.fstat(f.fileno()).st_size)
        except (OSError, ValueError, AttributeError):  # not a file: no total, no bar
            pass
        progress(32)

    def gen() -> Iterator[tuple[int, bytes]]:
        frame_no = 0
        while True:
            lb = f.read(8)
            if not lb:
                return
            if len(lb) < 8:
                raise PackFormatError(f"frame {frame_no}: truncated length")
            (n,) = struct.unpack("<Q", lb)
            comp = f.read(n)
            if len(comp) != n:
                raise PackFormatError(f"frame {frame_no}: truncated ({len(comp)} of {n} bytes)")
            if progress is not None:
                progress(8 + n)
            try:
                raw = zlib.decompress(comp)
            except zlib.error as exc:
                raise PackFormatError(f"frame {frame_no}: {exc}") from None
            pos = 0
            while pos + 8 <= len(raw):
                (b,) = struct.unpack_from("<Q", raw, pos)
                block, pos = decode_block(raw, pos + 8)
                if b >= nr_blocks:
                    raise PackFormatError(f"frame {frame_no}: block {b} beyond nr_blocks "
                                          f"{nr_blocks}")
                if known_block_kind(block) is None:
                    raise PackFormatError(f"frame {frame_no}: block {b} unpacks to a block "
                                          "of no known type (bad checksum)")
                yield b, block
            if pos != len(raw):
                raise PackFormatError(f"frame {frame_no}: trailing bytes")
            frame_no += 1

    return nr_blocks, gen()


def unpack_metadata(packed: BinaryIO, output: str | os.PathLike[str],
                    progress: Progress | None = None) -> int:
    """Write the metadata a pack describes to ``output`` (a file, created or truncated to
    nr_blocks × 4096 bytes, sparse where nothing was packed; or a block device of at least
    that size). Returns the number of blocks written.

    Crash-safe like restore: block 0 is zeroed and flushed first, the packed superblock is
    written last, after a flush (a pack without block 0 leaves it zeroed). ``progress``:
    as :func:`read_pack`."""
    nr_blocks, blocks = read_pack(packed, progress)
    if nr_blocks == 0:
        raise PackFormatError("pack file describes 0 blocks")
    path = os.fspath(output)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    n = 0
    lock = None
    try:
        lock = devlock.acquire(path, exclusive=True)
        import stat as _stat

        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode) and \
                os.lseek(fd, 0, os.SEEK_END) < nr_blocks * BLOCK_SIZE:
            raise DeviceError(f"{path}: smaller than the {nr_blocks * BLOCK_SIZE} bytes "
                              "the pack describes")
        invalidate_superblock(fd)
        if _stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, 0)
            os.ftruncate(fd, nr_blocks * BLOCK_SIZE)
        superblock = None
        for b, block in blocks:
            if b == 0:
                superblock = block
            else:
                os.pwrite(fd, block, b * BLOCK_SIZE)
            n += 1
        os.fsync(fd)
        if superblock is not None:
            os.pwrite(fd, superblock, 0)
            os.fsync(fd)
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
        if lock is not None:
            lock.release()
    return n
