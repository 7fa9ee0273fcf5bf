"""The values thin's btrees hold: device details records and mapping values.

The only code that packs or unpacks their fields. Device details go through
``layouts.DEVICE_DETAILS_DTYPE`` (the numpy twin of ``layouts.DeviceDetails``), a whole leaf at
a time; a mapping value is ``(data block << 24) | time`` (thin-format.md §3.3), with a scalar
form for the copy-on-write path and an array form for the bulk paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from dmimage.format.constants import TIME_BITS, TIME_MASK
from dmimage.format.layouts import DEVICE_DETAILS_DTYPE

__all__ = [
    "DEVICE_DETAILS_DTYPE", "DeviceDetails", "pack_details", "unpack_details",
    "MAPPING_VALUE_DTYPE", "pack_mapping", "unpack_mapping", "pack_mappings",
    "unpack_mappings", "mapping_blocks",
]

#: A mapping value (and a top-level value, a bottom tree's root) is one u64.
MAPPING_VALUE_DTYPE = np.dtype("<u8")
_SHIFT = np.uint64(TIME_BITS)
_MASK = np.uint64(TIME_MASK)


@dataclass(slots=True)
class DeviceDetails:
    """One thin device's record in the details tree (24 bytes on disk)."""

    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int

    def pack(self) -> bytes:
        return pack_details([self]).tobytes()

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> DeviceDetails:
        return unpack_details(raw)[0]


def pack_details(details: Iterable[DeviceDetails]) -> np.ndarray:
    """Records -> a DEVICE_DETAILS_DTYPE array (a leaf's values, as the bulk writer takes them)."""
    return np.array([(d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time)
                     for d in details], dtype=DEVICE_DETAILS_DTYPE)


def unpack_details(values: bytes | memoryview | np.ndarray) -> list[DeviceDetails]:
    """A leaf's raw values (or a DEVICE_DETAILS_DTYPE array) -> records, in order."""
    if not isinstance(values, np.ndarray) or values.dtype != DEVICE_DETAILS_DTYPE:
        values = np.frombuffer(values, dtype=DEVICE_DETAILS_DTYPE)
    # tolist() gives Python ints already: no per-field conversion (17,000-thin pools)
    return [DeviceDetails(*rec) for rec in values.tolist()]


def pack_mapping(data_block: int, time: int) -> int:
    return (data_block << TIME_BITS) | time


def unpack_mapping(value: int) -> tuple[int, int]:
    """(data block, time) of one mapping value."""
    return value >> TIME_BITS, value & TIME_MASK


def pack_mappings(data_blocks: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Mapping values (u64) for parallel arrays of data blocks and times."""
    return (np.asarray(data_blocks, dtype=np.uint64) << _SHIFT) | np.asarray(times).astype(
        np.uint64)


def unpack_mappings(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data blocks as u64, times as u32) of an array of mapping values."""
    v = np.asarray(values, dtype=np.uint64)
    return v >> _SHIFT, (v & _MASK).astype(np.uint32)


def mapping_blocks(values: np.ndarray) -> np.ndarray:
    """Only the data blocks (u64) of an array of mapping values: the reference census's need."""
    return np.asarray(values, dtype=np.uint64) >> _SHIFT
