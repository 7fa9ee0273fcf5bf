"""CRC-64/ISO as Go's ``hash/crc64`` computes it with ``crc64.MakeTable(crc64.ISO)``: the
checksum tar-split stores for every file of a layer (``payload``: the 8 bytes big-endian),
and that dockerd's tar assembly verifies before ``docker save`` writes a file.

The CRC is a byte-serial recurrence, so it is vectorised across lanes, eight bytes a step:
with a zero-initialised register, consuming a little-endian word w is ``r = S8(r ^ w)``
where ``S8`` (the register after eight zero bytes) is linear, applied with four 16-bit
tables. Many files run side by side, one per lane (front-padded with zeros, which leaves a
zero-initialised CRC unchanged); one large file runs in L interleaved lanes, each taking
every L-th word (``r = S(8L)(r ^ w)``, the last row ``S8``), whose registers are then
folded in order. Go's
register starts at ~0 and ends inverted: the same as XORing 0xff into the first eight bytes
of the message and inverting the zero-initialised CRC.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

POLY = 0xD800000000000000  # ISO 3309, reflected
ONES = (1 << 64) - 1
MAX_LANES = 1 << 14  # interleaved lanes for one large file
BIG = 1 << 16  # files at least this long run on their own


def _table() -> list[int]:
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        t.append(c)
    return t


_T = _table()


def _shift1(s: int) -> int:
    """The register after one zero byte."""
    return _T[s & 0xFF] ^ (s >> 8)


def _apply(cols: list[int], v: int) -> int:
    out = 0
    b = 0
    while v:
        if v & 1:
            out ^= cols[b]
        v >>= 1
        b += 1
    return out


def _shift_cols(nbytes: int) -> list[int]:
    """Columns of the linear map "register after *nbytes* zero bytes"."""
    result = [1 << b for b in range(64)]
    base = [_shift1(1 << b) for b in range(64)]
    k = nbytes
    while k:
        if k & 1:
            result = [_apply(base, c) for c in result]
        k >>= 1
        if k:
            base = [_apply(base, c) for c in base]
    return result


_TABLES: dict[int, np.ndarray] = {}


def _tables(nbytes: int) -> np.ndarray:
    """Four 65536-entry tables (shape (4, 65536), uint64) applying the shift by *nbytes*
    zero bytes to a register, 16 bits at a time."""
    hit = _TABLES.get(nbytes)
    if hit is not None:
        return hit
    cols = _shift_cols(nbytes)
    v = np.arange(1 << 16, dtype=np.uint64)
    out = np.zeros((4, 1 << 16), np.uint64)
    one = np.uint64(1)
    for k in range(4):
        for b in range(16):
            out[k] ^= ((v >> np.uint64(b)) & one) * np.uint64(cols[16 * k + b])
    _TABLES[nbytes] = out
    return out


def _run(words: np.ndarray, tables: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Registers after ``r = S(r ^ w)`` over the rows of *words* (shape (steps, lanes)),
    with the shift *tables* for every row but the last, which uses *last*."""
    reg = np.zeros(words.shape[1], np.uint64)
    x = np.empty_like(reg)
    i16 = np.empty(len(reg), np.uint16)
    for n, row in enumerate(words):
        t0, t1, t2, t3 = tables if n + 1 < len(words) else last
        np.bitwise_xor(reg, row, out=x)
        xv = x.view(np.uint16).reshape(-1, 4)  # little-endian 16-bit parts of each lane
        np.copyto(i16, xv[:, 0])
        reg = t0[i16]
        np.copyto(i16, xv[:, 1])
        reg ^= t1[i16]
        np.copyto(i16, xv[:, 2])
        reg ^= t2[i16]
        np.copyto(i16, xv[:, 3])
        reg ^= t3[i16]
    return reg


def _small(data: bytes) -> int:
    c = ONES
    for x in data:
        c = _T[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ ONES


def _prepared(data: bytes | memoryview, total: int) -> np.ndarray:
    """*data* front-padded with zeros to *total* bytes, its first 8 bytes inverted."""
    buf = np.zeros(total, np.uint8)
    n = len(data)
    buf[total - n:] = np.frombuffer(data, np.uint8)
    buf[total - n:total - n + 8] ^= 0xFF
    return buf


def crc64(data: bytes | memoryview) -> int:
    """Go's ``crc64.Checksum(data, crc64.MakeTable(crc64.ISO))``."""
    n = len(data)
    if n < BIG:
        return crc64_many([bytes(data)])[0]
    lanes = min(MAX_LANES, 1 << max(0, (n // 512).bit_length() - 1))
    row = 8 * lanes
    total = -(-n // row) * row
    words = _prepared(data, total).view("<u8").reshape(-1, lanes)
    regs = _run(words, _tables(row), _tables(8))
    # lane j's register is as of the end of its last word; fold the lanes in order
    acc = 0
    s8 = _shift_cols(8)
    for r in regs.tolist():
        acc = _apply(s8, acc) ^ r
    return acc ^ ONES


def crc64_many(items: Sequence[bytes]) -> list[int]:
    """CRCs of many byte strings, side by side in lanes (batched by length)."""
    out = [0] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    tables = _tables(8)
    pos = 0
    while pos < len(order):
        n0 = len(items[order[pos]])
        if n0 < 8:
            out[order[pos]] = _small(items[order[pos]])
            pos += 1
            continue
        if n0 >= BIG:
            out[order[pos]] = crc64(items[order[pos]])
            pos += 1
            continue
        end = pos
        limit = n0 * 2 + 64
        while (end < len(order) and end - pos < 4096 and len(items[order[end]]) <= limit
               and len(items[order[end]]) < BIG):
            end += 1
        batch = order[pos:end]
        width = -(-max(len(items[i]) for i in batch) // 8) * 8
        mat = np.empty((width // 8, len(batch)), np.uint64)
        for lane, i in enumerate(batch):
            mat[:, lane] = _prepared(items[i], width).view("<u8")
        regs = _run(mat, tables, tables)
        for lane, i in enumerate(batch):
            out[i] = int(regs[lane]) ^ ONES
        pos = end
    return out


@lru_cache(maxsize=4)
def _continue_consts(n: int) -> tuple[list[int], int]:
    """For n-byte continuations: the columns of "register after n zero bytes", and the CRC
    of n zero bytes."""
    return _shift_cols(n), crc64(bytes(n))


def crc64_update(crc: int, data: bytes | memoryview) -> int:
    """Go's ``crc64.Update(crc, table, data)``: the CRC of a message continued by *data*, so
    a large file's CRC is taken a chunk at a time (its memory bounded by the chunk). The
    register is linear: after *data* from register r it is ``S_n(r) ^ R(data)``, where
    ``R(data) = crc64(data) ^ crc64(zeros(n))`` (the initial ~0 cancels); the constants
    are cached per length, so chunks of one length cost one computation."""
    n = len(data)
    if not n:
        return crc
    cols, zeros = _continue_consts(n)
    return _apply(cols, crc ^ ONES) ^ crc64(data) ^ zeros ^ ONES
