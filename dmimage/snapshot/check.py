"""What is wrong with an exception store beyond what stops the kernel reading it.

The kernel accepts any exception list it can read; these are the states in which its view of
the snapshot is nonetheless wrong or ambiguous (data chunks past the device, on metadata
chunks, shared between exceptions, or two exceptions for one origin chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmimage.format.snapshot_cow import HEADER_CHUNKS
from dmimage.snapshot.store import ExceptionStore, StoreState


@dataclass(frozen=True)
class Problem:
    """One finding; ``index`` is the exception's position in store order, when one applies."""

    what: str
    index: int | None = None

    def __str__(self) -> str:
        return self.what


def _where(store: ExceptionStore, i: int) -> str:
    return f"area {i // store.per_area} entry {i % store.per_area}"


def _first_duplicates(values: np.ndarray) -> list[int]:
    """Store-order positions of every value seen earlier in ``values``."""
    order = np.argsort(values, kind="stable")
    s = values[order]
    dup = np.flatnonzero(s[1:] == s[:-1]) + 1
    return sorted(int(order[d]) for d in dup)


def store_problems(store: ExceptionStore, origin_bytes: int | None = None,
                   limit: int = 50) -> list[Problem]:
    """Every problem, up to ``limit`` per kind (the rest are counted in one line)."""
    out: list[Problem] = []
    if store.state is StoreState.BLANK:
        return out
    if store.state is StoreState.INVALID:
        out.append(Problem("snapshot invalidated (header valid flag 0): it overflowed or hit an "
                           "I/O error, and the kernel refuses to serve it"))
    if store.truncated:
        out.append(Problem(f"the exception areas run past the end of the device after area "
                           f"{store.areas - 1}"))
    new, old = store.new, store.old
    stride = store.per_area + 1

    def report(kind: str, idx: np.ndarray | list[int], text: str) -> None:
        idx = [int(i) for i in idx]
        for i in idx[:limit]:
            what = text.format(old=int(old[i]), new=int(new[i]))
            out.append(Problem(f"{_where(store, i)}: {what}", i))
        if len(idx) > limit:
            out.append(Problem(f"... and {len(idx) - limit} more exceptions {kind}"))

    past = np.flatnonzero(new >= store.nr_chunks)
    report("past the end", past, "new chunk {new} lies past the end of the COW device "
           f"({store.nr_chunks} chunks)")
    on_meta = np.flatnonzero((new % stride) == HEADER_CHUNKS)
    report("on metadata chunks", on_meta, "new chunk {new} is a metadata area's chunk")
    report("sharing a COW chunk", _first_duplicates(new),
           "new chunk {new} already holds an earlier exception's data")
    report("for an origin chunk already excepted", _first_duplicates(old),
           "origin chunk {old} has an earlier exception: the snapshot's view is ambiguous")
    if origin_bytes is not None and store.chunk_sectors:
        nr = -(-origin_bytes // store.chunk_bytes)
        report("past the origin", np.flatnonzero(old >= nr),
               f"origin chunk {{old}} lies past the end of the origin ({nr} chunks)")
    return out
