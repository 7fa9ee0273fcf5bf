"""Bulk text rendering of integer tables with numpy: the row renderer every dump shares
(thin's XML, human and JSON dumps and rmap, cache_dump's and era_dump's XML).

A dump is millions of lines that differ only in a few integers, e.g.
``    <single_mapping origin_block="%d" data_block="%d" time="%d"/>\n``. Formatting them one by one
in Python costs about a microsecond a line; here every line of a batch is laid out in one
fixed-width uint8 matrix (template bytes + right-aligned decimal digits, computed column by
column with vectorised division), leading-zero positions are set to NUL, and one boolean
compress squeezes the NULs out. Templates must not contain NUL bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

U64 = np.dtype("<u8")
_P10 = [10**k for k in range(20)]
#: Rows per batch: bounds the temporary matrix (rows × line width bytes).
CHUNK_ROWS = 1 << 13


def _width(col: np.ndarray) -> int:
    return len(str(int(col.max()))) if len(col) else 1


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
    widths = [c.shape[1] if t else _width(c) for c, t in zip(cols, text, strict=True)]
    # 32-bit arithmetic is about twice as fast; use it when every value fits.
    small = max((w for w, t in zip(widths, text, strict=True) if not t), default=1) <= 9
    dt = np.dtype(np.uint32) if small else U64
    cols = [c if t else c.astype(dt, copy=False) for c, t in zip(cols, text, strict=True)]
    p10 = [dt.type(x) for x in _P10[:10 if small else 20]]
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
    outs: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    ten = dt.type(10)
    for s in range(0, n, CHUNK_ROWS):
        e = min(n, s + CHUNK_ROWS)
        m = e - s
        mat = np.empty((m, line_w), np.uint8)
        mat[:] = row
        length = np.full(m, line_w, np.int64) if want_lengths else None
        for col, start, w, t in zip(cols, starts, widths, text, strict=True):
            if t:
                mat[:, start:start + w] = col[s:e]
                continue
            v = col[s:e]
            prev = None
            for j in range(w):
                k = w - 1 - j
                q = v // p10[k] if k else v
                digit = q if prev is None else q - prev * ten
                ch = digit.astype(np.uint8)
                ch += 48
                if k:
                    nonzero = q != 0
                    ch *= nonzero  # leading zero -> NUL, squeezed out below
                    if length is not None:
                        length -= ~nonzero
                mat[:, start + j] = ch
                prev = q
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
        flat = mat.reshape(-1)
        outs.append(flat[flat != 0])
        if length is not None:
            lens.append(length)
    data = outs[0] if len(outs) == 1 else np.concatenate(outs)
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
