"""The one intermediate representation of a pool that every reader produces and writer consumes.

XML (thin_dump 0.9 and 1.x forms), human-readable and JSON dumps, restore, repair and the VM
comparisons all meet here. Mappings are kept as *runs* (origin, data, length, time) in numpy
arrays: compact for contiguous volumes, and cheap to expand to per-block arrays.

A device's mappings are a sequence of items, each either its own :class:`Runs` or the name of a
shared :class:`Runs` in ``PoolIR.defs`` (thin_dump 1.x's ``<def>``/``<ref>``: leaves shared by
several devices). :meth:`DeviceIR.runs` splices refs back in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

U64 = np.dtype("<u8")
U32 = np.dtype("<u4")


@dataclass(slots=True)
class Runs:
    """Mapping runs: blocks origin_begin+i -> data_begin+i for i < length, all with one time."""

    origin_begin: np.ndarray
    data_begin: np.ndarray
    length: np.ndarray
    time: np.ndarray

    @classmethod
    def empty(cls) -> Runs:
        return cls(np.empty(0, U64), np.empty(0, U64), np.empty(0, U64), np.empty(0, U32))

    @classmethod
    def from_blocks(cls, origin: np.ndarray, data: np.ndarray, time: np.ndarray) -> Runs:
        """Merge per-block mappings (ascending origin) into maximal runs, as thin_dump does:
        a run continues while origin and data both advance by one and time is unchanged."""
        n = len(origin)
        if n == 0:
            return cls.empty()
        origin = origin.astype(U64, copy=False)
        data = data.astype(U64, copy=False)
        time = time.astype(U32, copy=False)
        brk = np.ones(n, dtype=bool)
        if n > 1:
            brk[1:] = ((origin[1:] - origin[:-1]) != 1) | ((data[1:] - data[:-1]) != 1) | (
                time[1:] != time[:-1])
        starts = np.flatnonzero(brk)
        lengths = np.diff(np.append(starts, n)).astype(U64)
        return cls(origin[starts], data[starts], lengths, time[starts])

    def __len__(self) -> int:
        return len(self.origin_begin)

    @property
    def nr_blocks(self) -> int:
        return int(self.length.sum()) if len(self.length) else 0

    def expand(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-block (origin, data, time) arrays."""
        total = self.nr_blocks
        if total == 0:
            return np.empty(0, U64), np.empty(0, U64), np.empty(0, U32)
        starts = np.repeat(np.cumsum(self.length) - self.length, self.length.astype(np.int64))
        offset = np.arange(total, dtype=U64) - starts.astype(U64)
        reps = self.length.astype(np.int64)
        origin = np.repeat(self.origin_begin, reps) + offset
        data = np.repeat(self.data_begin, reps) + offset
        time = np.repeat(self.time, reps)
        return origin, data, time

    @staticmethod
    def concat(parts: list[Runs]) -> Runs:
        if not parts:
            return Runs.empty()
        return Runs(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                      ("origin_begin", "data_begin", "length", "time")))


@dataclass(slots=True)
class SuperblockIR:
    uuid: str
    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int
    nr_data_blocks: int
    metadata_snap: int | None = None


@dataclass(slots=True)
class DeviceIR:
    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    #: In origin order: own runs, or the name of a shared run list in PoolIR.defs.
    items: list[Runs | str] = field(default_factory=list)

    def runs(self, defs: dict[str, Runs]) -> Runs:
        return Runs.concat([defs[i] if isinstance(i, str) else i for i in self.items])


@dataclass(slots=True)
class PoolIR:
    superblock: SuperblockIR
    devices: list[DeviceIR] = field(default_factory=list)
    defs: dict[str, Runs] = field(default_factory=dict)
