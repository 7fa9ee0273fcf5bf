"""The thin dumps' documents: literal text and mapping-run blocks rendered in numpy batches
(the row renderer itself is dmimage/textrows.py, shared with the cache and era dumps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np

from dmimage.textrows import render_rows
from dmimage.thin.ir import Runs

__all__ = ["CHUNK_ROWS", "FLUSH_ROWS", "WRITE_JOIN", "Document", "RunsRenderer", "render_rows",
           "split_offsets"]

#: Pieces shorter than this are joined before they are written.
WRITE_JOIN = 1 << 16
#: Mapping rows rendered at a time (one row matrix, ~80 bytes a row, and its squeezed copy).
#: 2,048 rather than textrows' 8,192: with 64-leaf batches a 10M dump's peak RSS is ~3.5 MiB
#: over the imports (~7 MiB with 8,192 rows and 128 leaves), and its CPU no higher (fewer
#: page faults: the smaller arrays come from the heap, not fresh mappings).
CHUNK_ROWS = 1 << 11
#: A streaming document writes out what it holds once this many rows are pending (one
#: CHUNK_ROWS rendering: more only holds more runs, ~32 bytes each, for no fewer writes).
FLUSH_ROWS = 1 << 11

#: ``(origin_begin, data_begin, length, time, want_lengths) -> (flat bytes, row lengths)``.
RunsRenderer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool],
                        tuple[np.ndarray, np.ndarray | None]]


def split_offsets(lengths: np.ndarray, counts: list[int]) -> list[int]:
    """Byte offsets that cut a rendered batch into consecutive groups of ``counts`` rows."""
    ends = np.cumsum(lengths)
    offs = [0]
    row = 0
    for c in counts:
        row += c
        offs.append(int(ends[row - 1]) if row else 0)
    return offs


class Document:
    """A text document of literal pieces and mapping-run blocks, rendered in one numpy batch.

    ``runs_renderer(origin_begin, data_begin, length, time, want_lengths)`` turns the
    concatenation of every block's runs into (flat bytes, row lengths); the result is cut
    back into blocks and interleaved with the literals.

    With a ``sink`` the document streams: whenever :data:`FLUSH_ROWS` rows are pending, what
    it holds so far is written to the sink and forgotten, so a dump of any size holds about
    one batch of rows; :meth:`write_to` then writes the rest.
    """

    def __init__(self, runs_renderer: RunsRenderer, sink: BinaryIO | None = None) -> None:
        self._render = runs_renderer
        self.pieces: list[bytes | int] = []  # literal bytes, or the index of a runs block
        self._blocks: list[Runs] = []
        self._rows = 0
        self.sink = sink

    def text(self, s: str | bytes) -> None:
        b = s.encode() if isinstance(s, str) else s
        if self.pieces and isinstance(self.pieces[-1], bytes):
            self.pieces[-1] += b
        else:
            self.pieces.append(b)

    def runs(self, r: Runs) -> None:
        if len(r):
            self.pieces.append(len(self._blocks))
            self._blocks.append(r)
            self._rows += len(r)
            if self.sink is not None and self._rows >= FLUSH_ROWS:
                self.write_to(self.sink)

    def chunks(self) -> Iterator[bytes | memoryview]:
        """Yield the document as bytes-like chunks, rendering the mapping rows in batches of
        about CHUNK_ROWS (whatever the block sizes), so memory stays small and many tiny
        blocks cost no more than a few big ones."""
        blocks = self._blocks
        if not blocks:
            yield from (p for p in self.pieces if isinstance(p, bytes))
            return
        if len(blocks) == 1:
            cols = [blocks[0].origin_begin, blocks[0].data_begin, blocks[0].length,
                    blocks[0].time]
        else:
            cols = [np.concatenate([getattr(b, f) for b in blocks]) for f in
                    ("origin_begin", "data_begin", "length", "time")]
        # Row index where each block ends; literal pieces sit between blocks.
        ends = np.cumsum([len(b) for b in blocks]).tolist()
        total = ends[-1]
        pieces = self.pieces
        pi = 0
        # literals before the first block
        while pi < len(pieces) and isinstance(lit := pieces[pi], bytes):
            yield lit
            pi += 1
        bi = 0  # the block whose rows come next
        nblocks = len(ends)
        for s in range(0, total, CHUNK_ROWS):
            e = min(total, s + CHUNK_ROWS)
            inner = ends[bi] < e  # a block ends inside this batch: need row offsets
            o, d, n, t = (c[s:e] for c in cols)
            data, lengths = self._render(o, d, n, t, inner)
            offs = np.cumsum(lengths) if inner and lengths is not None else None
            pos = 0
            while bi < nblocks and ends[bi] <= e:
                off = len(data) if offs is None or ends[bi] == e else int(offs[ends[bi] - s - 1])
                if off > pos:
                    yield data[pos:off].data
                pos = off
                bi += 1
                pi += 1  # the block's own piece
                while pi < len(pieces) and isinstance(lit := pieces[pi], bytes):
                    yield lit
                    pi += 1
            if pos < len(data):
                yield data[pos:].data

    def write_to(self, out: BinaryIO) -> None:
        """Write the document in few large writes: batches of rendered rows as they are,
        the small literal pieces between them joined up first."""
        small: list[bytes | memoryview] = []
        small_bytes = 0
        for c in self.chunks():
            n = len(c)
            if n >= WRITE_JOIN:
                if small:
                    out.write(b"".join(small))
                    small, small_bytes = [], 0
                out.write(c)
                continue
            small.append(c)
            small_bytes += n
            if small_bytes >= WRITE_JOIN:
                out.write(b"".join(small))
                small, small_bytes = [], 0
        if small:
            out.write(b"".join(small))
        self.pieces, self._blocks, self._rows = [], [], 0

    def getvalue(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks())
