"""Read-only view of a thin pool's metadata: superblock, devices, mappings, space maps.

Everything is read lazily and validated strictly: the first damaged structure on the path
raises a MetadataError naming the block. `dmimage check` (thin/check.py) is the tolerant,
exhaustive walker; this module serves dump, export, ls and the Python API.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from dmimage.errors import FormatError, MetadataError, UsageError
from dmimage.format.constants import DEVICE_DETAILS_SIZE, MAPPING_VALUE_SIZE
from dmimage.format.values import DEVICE_DETAILS_DTYPE, unpack_details, unpack_mappings
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import U64, BtreeWalker, leaves_in_order, tree_items
from dmimage.pdata.spacemap import SpaceMap, read_space_map
from dmimage.thin.superblock import Superblock, read_superblock

__all__ = ["MAPPING_VALUE_SIZE", "DeviceDetails", "Mappings", "Pool", "open_pool"]


@dataclass(slots=True, frozen=True)
class DeviceDetails:
    """One thin device: its id and its details record (unpacked by format/values.py)."""

    dev_id: int
    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int


@dataclass(slots=True)
class Mappings:
    """A thin device's mappings in ascending virtual-block order (parallel arrays)."""

    origin: np.ndarray  # uint64 virtual block
    data: np.ndarray  # uint64 data block
    time: np.ndarray  # uint32

    def __len__(self) -> int:
        return len(self.origin)

    @classmethod
    def from_values(cls, keys: np.ndarray, values: np.ndarray) -> Mappings:
        return cls(keys, *unpack_mappings(values))


class Pool:
    """A thin pool's metadata opened read-only. Use :func:`open_pool`."""

    def __init__(self, reader: BlockReader, superblock: Superblock, live: Superblock):
        self.reader = reader
        #: The superblock whose trees we read (the held copy with ``metadata_snap``).
        self.superblock = superblock
        #: Block 0: space maps and nr_data_blocks always come from the live superblock.
        self.live_superblock = live
        self._devices: dict[int, DeviceDetails] | None = None
        self._roots: dict[int, int] | None = None

    def nr_data_blocks(self) -> int:
        """The data device's size in blocks, from the live data space map's root: refused when
        its bitmaps could not fit on the metadata device (a damaged field that would size
        whole-device arrays in the petabytes)."""
        root = self.live_superblock.data_sm
        if root.nr_bitmaps > self.reader.nr_blocks:
            raise MetadataError(f"data space map: nr_blocks {root.nr_blocks} needs more bitmaps "
                                "than the metadata device has blocks", block=0,
                                field="data space map root nr_blocks")
        return root.nr_blocks

    # -- devices ---------------------------------------------------------------------------
    def devices(self) -> dict[int, DeviceDetails]:
        """Details of every thin device, by id (ascending)."""
        if self._devices is None:
            keys, vals = tree_items(self.reader, self.superblock.device_details_root,
                                    DEVICE_DETAILS_SIZE, DEVICE_DETAILS_DTYPE,
                                    what="device details tree")
            self._devices = {
                k: DeviceDetails(k, v.mapped_blocks, v.transaction_id, v.creation_time,
                                 v.snapshotted_time)
                for k, v in zip(keys.tolist(), unpack_details(vals), strict=True)
            }
        return self._devices

    def mapping_roots(self) -> dict[int, int]:
        """Root block of each device's bottom-level mapping tree, by id."""
        if self._roots is None:
            keys, vals = tree_items(self.reader, self.superblock.data_mapping_root,
                                    MAPPING_VALUE_SIZE, U64, what="mapping tree (top level)")
            self._roots = dict(zip(keys.tolist(), vals.tolist(), strict=True))
            details = self.devices()
            if set(self._roots) != set(details):
                only_map = sorted(set(self._roots) - set(details))
                only_det = sorted(set(details) - set(self._roots))
                raise MetadataError(
                    "details tree and mapping tree disagree on device ids "
                    f"(mapping only: {only_map[:5]}, details only: {only_det[:5]})",
                    block=self.superblock.data_mapping_root, field="data_mapping_root")
        return self._roots

    def mapping_root(self, dev_id: int) -> int:
        """Root block of one device's mapping tree; UsageError for an unknown id."""
        roots = self.mapping_roots()
        if dev_id not in roots:
            raise UsageError(f"no thin device with id {dev_id}")
        return roots[dev_id]

    _root_of = mapping_root

    def mappings(self, dev_id: int) -> Mappings:
        """All mappings of one device."""
        keys, vals = tree_items(self.reader, self._root_of(dev_id), MAPPING_VALUE_SIZE, U64,
                                what=f"mapping tree of device {dev_id}")
        return Mappings.from_values(keys, vals)

    def mapping_leaves(self, dev_id: int) -> list[tuple[int, Mappings]]:
        """A device's mappings leaf by leaf: (leaf block, mappings), for sharing analysis."""
        leaves = leaves_in_order(self.reader, self._root_of(dev_id), MAPPING_VALUE_SIZE,
                                 what=f"mapping tree of device {dev_id}")
        return [(leaf.blocknr, Mappings.from_values(leaf.keys, leaf.values(U64)))
                for leaf in leaves]

    # -- space maps ------------------------------------------------------------------------
    def data_space_map(self) -> SpaceMap:
        walker = BtreeWalker(self.reader)
        return read_space_map(self.reader, self.live_superblock.data_sm, walker, metadata=False)

    def metadata_space_map(self) -> SpaceMap:
        walker = BtreeWalker(self.reader)
        return read_space_map(self.reader, self.live_superblock.metadata_sm, walker,
                              metadata=True)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_pool(metadata: str | os.PathLike[str], *, metadata_snap: bool | int = False,
              window: tuple[int, int] | None = None) -> Pool:
    """Open thin-pool metadata read-only.

    ``metadata_snap``: True reads through the held metadata snapshot named by the superblock;
    an int reads the snapshot superblock at that block. The live superblock is always
    validated first, as the kernel and thin_dump do. ``window``: see :class:`BlockReader`.
    """
    reader = BlockReader(metadata, window=window)
    try:
        return read_pool(reader, metadata_snap=metadata_snap)
    except BaseException:
        reader.close()
        raise


def read_pool(reader: BlockReader, *, metadata_snap: bool | int = False) -> Pool:
    """The Pool on an open reader (see :func:`open_pool`); closing the Pool closes it."""
    live = read_superblock(reader, 0)
    if live.incompat_flags:
        # an incompatible feature changes how the metadata must be read: not guessed at
        raise FormatError(f"incompat_flags {live.incompat_flags:#x}: a feature this reader "
                          "does not know (the kernel refuses to open this pool too)",
                          block=0, field="incompat_flags")
    sb = live
    if metadata_snap is not False:
        loc = live.held_root if metadata_snap is True else int(metadata_snap)
        if loc == 0:
            raise UsageError("the pool has no metadata snapshot (held_root is 0)")
        sb = read_superblock(reader, loc)
    return Pool(reader, sb, live)
