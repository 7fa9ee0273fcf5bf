"""The bulk row renderer (dmimage/textrows.py) against Python's own formatting of each row."""

from __future__ import annotations

import numpy as np
import pytest

from dmimage.textrows import render_rows


def _edge_values(rng: np.random.Generator, n: int, digits: int) -> np.ndarray:
    """Values of every width up to ``digits``, with zeros, powers of ten and their
    neighbours (where a group of four digits or a leading zero begins)."""
    hi = min(10**digits - 1, (1 << 64) - 1)
    edges = [0, 1, 9, 10, 99, 100, 9999, 10_000, 10_001, 99_999_999, 100_000_000, hi]
    edges += [10**k - 1 for k in range(1, digits + 1)] + [10**k for k in range(digits)]
    vals = [v for v in edges if v <= hi]
    widths = rng.integers(1, digits + 1, n)
    rand = [int(rng.integers(0, 10**int(w), dtype=np.uint64)) if w < 19 else
            int(rng.integers(0, 1 << 63, dtype=np.uint64)) * 2 + 1 for w in widths]
    return np.array((vals + rand)[:n] if n > len(vals) else vals[:n], np.uint64)


@pytest.mark.parametrize("digits", [1, 3, 4, 5, 8, 9, 10, 13, 19, 20])
def test_rows_as_python_formats_them(digits: int) -> None:
    rng = np.random.default_rng(digits)
    n = 3_000
    a = _edge_values(rng, n, digits)
    b = rng.permutation(a)
    if digits == 20:
        a[-1] = np.uint64((1 << 64) - 1)
    data, lengths = render_rows([b"<x a=\"", b"\" b=\"", b"\"/>\n"], [a, b], want_lengths=True)
    rows = [f'<x a="{x}" b="{y}"/>\n'.encode() for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    assert data.tobytes() == b"".join(rows)
    assert lengths is not None and lengths.tolist() == [len(r) for r in rows]


def test_alternative_parts_and_optional_columns() -> None:
    """The XML mapping layout: a pair of parts chosen per row, a column printed only where
    ``select`` holds."""
    rng = np.random.default_rng(5)
    n = 5_000
    o = rng.integers(0, 1 << 40, n, dtype=np.uint64)
    d = rng.integers(0, 10**7, n, dtype=np.uint64)
    ln = rng.integers(1, 3, n, dtype=np.uint64)
    t = rng.integers(0, 3, n, dtype=np.uint64)
    parts = [(b"  <single o=\"", b"  <range o=\""), (b"\" d=\"", b"\" db=\""), (b"", b"\" l=\""),
             b"\" t=\"", b"\"/>\n"]
    data, lengths = render_rows(parts, [o, d, ln, t], True, select=ln > 1, optional=(2,))
    rows = [(f'  <range o="{x}" db="{y}" l="{z}" t="{w}"/>\n' if z > 1 else
             f'  <single o="{x}" d="{y}" t="{w}"/>\n').encode()
            for x, y, z, w in zip(o.tolist(), d.tolist(), ln.tolist(), t.tolist(), strict=True)]
    assert data.tobytes() == b"".join(rows)
    assert lengths is not None and lengths.tolist() == [len(r) for r in rows]


def test_batches_reuse_the_matrix_without_leftovers() -> None:
    """Successive calls with one template (a dump's batches) share the row matrix: every
    digit written before must be replaced, shorter numbers too; a call whose alternatives
    NUL template parts must not leave them NULed for the next."""
    parts = [b"a=", b" b=", b"\n"]
    pairs = [(b"<", b"["), b"\n"]
    for vals in ([10**12, 5], [7, 123456], [0, 0], [10**12, 10**12 - 1]):
        a = np.array(vals * 4_096, np.uint64)  # one whole batch of rows
        b = a[::-1].copy()
        want = b"".join(f"a={x} b={y}\n".encode() for x, y in zip(a.tolist(), b.tolist(),
                                                                  strict=True))
        assert render_rows(parts, [a, b])[0].tobytes() == want
        sel = np.arange(len(a)) % 3 == 0
        got = render_rows(pairs, [a], select=sel)[0].tobytes()
        assert got == b"".join((b"[" if s else b"<") + f"{x}\n".encode()
                               for x, s in zip(a.tolist(), sel.tolist(), strict=True))
