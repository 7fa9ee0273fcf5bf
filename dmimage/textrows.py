"""Bulk text rendering of integer tables with numpy: the row renderer every dump shares
(thin's XML, human and JSON dumps and rmap, cache_dump's and era_dump's XML).

A dump is millions of lines that differ only in a few integers, e.g.
``    <single_mapping origin_block="%d" data_block="%d" time="%d"/>\n``. Formatting them one by one
in Python costs about a microsecond a line; here every line of a batch is laid out in one
fixed-width uint8 matrix (template bytes + right-aligned decimal digits, four at a time from a
table of the groups 0000..9999, each column padded to whole groups), leading-zero positions are
NUL, and ``bytes.translate`` squeezes the NULs out. The matrix is kept for the next batch of
the same template. Templates must not contain NUL bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

U64 = np.dtype("<u8")
_P10 = [10**k for k in range(20)]
#: Rows per batch: bounds the temporary matrix (rows × line width bytes).
CHUNK_ROWS = 1 << 13


def _group_tables() -> tuple[np.ndarray, np.ndarray]:
    """Four-digit groups as text, one little-endian u32 of ASCII bytes per value 0..9999.
    Each table is two halves, indexed ``value + 10000 * (a higher group is non-zero)``: the
    second half prints every digit, the first turns leading zeros into NULs (squeezed out
    with the rest); in the lowest group's table a value of 0 with nothing above prints "0".
    (Built in u32 arithmetic: a few small temporaries at import.)"""
    v = np.arange(10_000, dtype=np.uint32)
    full = np.zeros(10_000, np.uint32)
    stripped = np.zeros(10_000, np.uint32)
    for i, p in enumerate((1000, 100, 10, 1)):
        digit = v // np.uint32(p) % np.uint32(10) + np.uint32(48)
        digit <<= np.uint32(8 * i)  # the i-th character is the i-th byte
        full |= digit
        stripped |= np.where(v >= np.uint32(p), digit, np.uint32(0))  # a leading zero: NUL
    last = stripped.copy()
    last[0] = np.uint32(ord("0") << 24)
    return (np.concatenate([stripped, full]).astype("<u4"),
            np.concatenate([last, full]).astype("<u4"))


_GROUP_MID, _GROUP_LOW = _group_tables()


#: The last row matrix (its row count, its template row, the bytearray holding it): reused
#: while the rows and the template stay the same, so a dump's batches do not map, fault in
#: and unmap a fresh matrix each time.
_last: tuple[int, bytes, bytearray] | None = None


def _scratch(rows: int, row: np.ndarray, keep: bool) -> tuple[bytearray, bool]:
    """A bytearray of ``rows`` × len(row) bytes, and whether every row already holds
    ``row``'s template (where the previous call left its digits: they are all rewritten).
    ``keep=False``: the caller will NUL parts of the template, so it is not remembered."""
    global _last
    template = row.tobytes()
    if _last is not None and _last[0] == rows and _last[1] == template:
        buf = _last[2]
        if not keep:
            _last = None
        return buf, True
    buf = bytearray(rows * len(template))
    _last = (rows, template, buf) if keep else None
    return buf, False


def _width(col: np.ndarray) -> int:
    return len(str(int(col.max()))) if len(col) else 1


def _padded(digits: int) -> int:
    """A numeric column's width in the matrix: whole groups of four digits (the leading
    ones NUL where the value is shorter, like any leading zero)."""
    return -(-digits // 4) * 4


def _place_digits(mat: np.ndarray, start: int, width: int, v: np.ndarray) -> None:
    """Write ``v`` (u32 or u64, every value below 10**width, ``width`` a multiple of 4)
    right-aligned into ``mat[:, start:start + width]`` with NULs for leading zeros: four
    digits a step, by table, each group one unaligned u32 store per row (a division and a
    lookup per four digits instead of a division per digit and a store per byte)."""
    groups = []  # least significant first
    rest = v
    for _ in range(width // 4 - 1):
        q = rest // v.dtype.type(10_000)
        groups.append(rest - q * v.dtype.type(10_000))
        rest = q
    groups.append(rest)
    signed = np.int32 if v.dtype == np.uint32 else np.int64  # each group is below 10000
    above: np.ndarray | None = None  # rows where a higher group is non-zero (0 or 1)
    rows, line = mat.shape
    for gi in range(len(groups) - 1, -1, -1):
        g = groups[gi].view(signed)
        table = _GROUP_LOW if gi == 0 else _GROUP_MID
        index = g if above is None else g + above * signed(10_000)
        cell = np.ndarray((rows,), "<u4", mat, start + 4 * (len(groups) - 1 - gi), (line,))
        cell[:] = table.take(index)
        if gi:
            nonzero = g != 0
            above = nonzero.astype(signed) if above is None else above | nonzero


def render_rows(parts: Sequence[bytes | tuple[bytes, bytes]], cols: list[np.ndarray],
                want_lengths: bool = False, select: np.ndarray | None = None,
                optional: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray | None]:
    """Render rows ``parts[0] + str(cols[0][i]) + parts[1] + ... + str(cols[-1][i]) + parts[-1]``.

    ``len(parts) == len(cols) + 1``; the columns are non-negative integer arrays of one length,
    or (n, w) uint8 matrices of text placed verbatim (fixed width, no NUL bytes).
    A part may be a pair ``(a, b)``: rows where ``select`` is False get ``a``, the others ``b``;
    a column whose index is in ``optional`` is printed only where ``select`` is True (the
    template part *after* it should then be a pair with ``a`` empty, as for the ``length``
    attribute of a range mapping).

    Returns the concatenated rows as a flat uint8 array and, if ``want_lengths``, each row's
    byte length (int64).
    """
    if len(parts) != len(cols) + 1:
        raise ValueError("need one more template part than columns")
    n = len(cols[0]) if cols else 0
    if n == 0:
        return np.empty(0, np.uint8), (np.empty(0, np.int64) if want_lengths else None)
    if select is not None:
        select = np.asarray(select, dtype=bool)
        if select.all() or not select.any():
            # Uniform: resolve the alternatives once.
            on = bool(select[0])
            plain = [(p[1] if on else p[0]) if isinstance(p, tuple) else p for p in parts]
            if not on:
                keep = [i for i in range(len(cols)) if i not in optional]
                plain = _drop_columns(plain, keep, len(cols))
                cols = [cols[i] for i in keep]
            parts = plain
            select = None
            optional = ()
    elif any(isinstance(p, tuple) for p in parts) or optional:
        raise ValueError("alternative parts need a select array")
    cols = [np.asarray(c) for c in cols]
    text = [c.ndim == 2 for c in cols]
    digits = [c.shape[1] if t else _width(c) for c, t in zip(cols, text, strict=True)]
    widths = [d if t else _padded(d) for d, t in zip(digits, text, strict=True)]
    # 32-bit arithmetic is about twice as fast; use it when every value fits.
    small = max((d for d, t in zip(digits, text, strict=True) if not t), default=1) <= 9
    dt = np.dtype(np.uint32) if small else U64
    cols = [c if t else c.astype(dt, copy=False) for c, t in zip(cols, text, strict=True)]
    p10 = np.array(_P10[:10 if small else 20], dt)
    row_parts = [p[0] + p[1] if isinstance(p, tuple) else p for p in parts]
    line_w = sum(len(p) for p in row_parts) + sum(widths)
    row = np.empty(line_w, np.uint8)
    starts = []
    part_at = []
    pos = 0
    for i, rp in enumerate(row_parts):
        row[pos:pos + len(rp)] = np.frombuffer(rp, np.uint8)
        part_at.append(pos)
        pos += len(rp)
        if i < len(cols):
            starts.append(pos)
            pos += widths[i]
    outs: list[bytes | bytearray] = []
    lens: list[np.ndarray] = []
    for s in range(0, n, CHUNK_ROWS):
        e = min(n, s + CHUNK_ROWS)
        m = e - s
        buf, filled = _scratch(m, row, keep=select is None)
        mat = np.frombuffer(buf, np.uint8).reshape(m, line_w)
        if not filled or select is not None:  # (select: the alternatives NULed last time)
            mat[:] = row
        length = np.full(m, line_w, np.int64) if want_lengths else None
        for col, start, w, t in zip(cols, starts, widths, text, strict=True):
            if t:
                mat[:, start:start + w] = col[s:e]
                continue
            v = col[s:e]
            _place_digits(mat, start, w, v)
            if length is not None:
                # the digits a value has: one plus the powers of ten up to it
                length -= (w - 1) - np.searchsorted(p10[1:], v, side="right")
        if select is not None:
            sel = select[s:e]
            unsel = ~sel
            for i, p in enumerate(parts):
                if isinstance(p, tuple):
                    a, b = p
                    at = part_at[i]
                    if a:
                        mat[sel, at:at + len(a)] = 0
                    if b:
                        mat[unsel, at + len(a):at + len(a) + len(b)] = 0
                    if length is not None:
                        length -= np.where(sel, len(a), len(b))
            for ci in optional:
                start, w = starts[ci], widths[ci]
                if length is not None:
                    length[unsel] -= np.count_nonzero(mat[unsel, start:start + w], axis=1)
                mat[unsel, start:start + w] = 0
        # the NULs squeezed out by bytes.translate: twice as fast as a boolean compress
        del mat
        outs.append(buf.translate(None, b"\0"))
        if length is not None:
            lens.append(length)
    data = np.frombuffer(outs[0] if len(outs) == 1 else b"".join(outs), np.uint8)
    return data, (np.concatenate(lens) if want_lengths else None)


def _drop_columns(parts: Sequence[bytes], keep: list[int], ncols: int) -> list[bytes]:
    """Template parts after removing columns not in ``keep`` (their text joins up)."""
    out = [parts[0]]
    for i in range(ncols):
        if i in keep:
            out.append(parts[i + 1])
        else:
            out[-1] = out[-1] + parts[i + 1]
    return out


def render_chunks(parts: Sequence[bytes | tuple[bytes, bytes]], cols: list[np.ndarray],
                  select: np.ndarray | None = None, rows: int = 1 << 16
                  ) -> Iterator[memoryview]:
    """:func:`render_rows` ``rows`` rows at a time, for writing as they come: a dump of
    millions of rows then never holds its whole text (fewer pages to fault in and copy)."""
    n = len(cols[0]) if cols else 0
    for s in range(0, n, rows):
        sl = slice(s, min(n, s + rows))
        data, _ = render_rows(parts, [c[sl] for c in cols],
                              select=None if select is None else select[sl])
        yield data.data
