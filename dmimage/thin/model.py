"""The reference model of a thin pool: plain-Python semantics, no metadata format at all.

Devices map virtual blocks to abstract data blocks; data blocks hold content. The rules are the
kernel's (dm-thin.c, dm-thin-metadata.c):

* a snapshot copies the origin's map (sharing its blocks) and bumps the pool time;
* a write to a mapping older than the device's last snapshot (`__snapshotted_since`) takes a
  new block holding the old content plus the write, even if no other device still uses the old
  block; any other mapped block is written in place; an unmapped block is provisioned zeroed;
* a discard unmaps only blocks wholly inside the range;
* a held metadata snapshot keeps every data block it maps in use until it is released.

The offline writer (thin/transaction.py), the on-disk reader and the kernel in the VM tests
must all agree with this model on device ids and details, pool time and transaction id, every
thin's content, and how many data blocks are in use.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field


class ModelError(Exception):
    """The operation is invalid in the model's state (the kernel would refuse it too)."""


@dataclass
class DeviceModel:
    transaction_id: int
    creation_time: int
    snapshotted_time: int
    blocks: dict[int, int] = field(default_factory=dict)  # vblock -> data block id
    times: dict[int, int] = field(default_factory=dict)  # vblock -> pool time of the mapping


@dataclass
class PoolModel:
    block_size: int  # bytes per data block
    time: int = 0
    trans_id: int = 0
    devices: dict[int, DeviceModel] = field(default_factory=dict)
    content: dict[int, bytes] = field(default_factory=dict)  # data block id -> bytes
    #: Data blocks a held metadata snapshot maps (None: no snapshot held).
    pinned: set[int] | None = None
    _next_id: int = 0

    def clone(self) -> PoolModel:
        return copy.deepcopy(self)

    @classmethod
    def from_mappings(cls, block_size: int, *, time: int, transaction: int,
                      devices: dict[int, tuple[int, int, int, dict[int, tuple[int, int]]]],
                      read_block: Callable[[int], bytes]) -> PoolModel:
        """A model of an existing pool: devices = {dev: (transaction, creation_time,
        snapshotted_time, {vblock: (data block, time)})}; read_block(b) gives a block's bytes."""
        m = cls(block_size, time=time, trans_id=transaction)
        ids: dict[int, int] = {}
        for dev, (tid, ctime, stime, maps) in sorted(devices.items()):
            dm = DeviceModel(tid, ctime, stime)
            for vb, (b, t) in maps.items():
                if b not in ids:
                    ids[b] = m._new_block(read_block(b))
                dm.blocks[vb] = ids[b]
                dm.times[vb] = t
            m.devices[dev] = dm
        return m

    def _new_block(self, data: bytes) -> int:
        self._next_id += 1
        self.content[self._next_id] = data
        return self._next_id

    def _live(self) -> set[int]:
        live = {b for d in self.devices.values() for b in d.blocks.values()}
        return live | self.pinned if self.pinned is not None else live

    def _gc(self) -> None:
        live = self._live()
        for b in list(self.content):
            if b not in live:
                del self.content[b]

    def create_thin(self, dev: int) -> None:
        if dev in self.devices:
            raise ModelError(f"device {dev} exists")
        self.devices[dev] = DeviceModel(self.trans_id, self.time, self.time)

    def create_snap(self, dev: int, origin: int) -> None:
        if dev in self.devices:
            raise ModelError(f"device {dev} exists")
        if origin not in self.devices:
            raise ModelError(f"no origin {origin}")
        self.time += 1
        o = self.devices[origin]
        o.snapshotted_time = self.time
        self.devices[dev] = DeviceModel(self.trans_id, self.time, self.time, dict(o.blocks),
                                        dict(o.times))

    def delete(self, dev: int) -> None:
        if dev not in self.devices:
            raise ModelError(f"no device {dev}")
        del self.devices[dev]
        self._gc()

    def set_transaction_id(self, old: int, new: int) -> None:
        if old != self.trans_id:
            raise ModelError("transaction id mismatch")
        self.trans_id = new

    def reserve_metadata_snap(self) -> None:
        if self.pinned is not None:
            raise ModelError("a metadata snapshot is already held")
        self.pinned = {b for d in self.devices.values() for b in d.blocks.values()}

    def release_metadata_snap(self) -> None:
        if self.pinned is None:
            raise ModelError("no metadata snapshot is held")
        self.pinned = None
        self._gc()

    def write(self, dev: int, offset: int, data: bytes) -> None:
        d = self.devices[dev]
        bs = self.block_size
        pos = 0
        while pos < len(data):
            vb, within = divmod(offset + pos, bs)
            n = min(bs - within, len(data) - pos)
            old = d.blocks.get(vb)
            base = self.content[old] if old is not None else bytes(bs)
            new_content = base[:within] + data[pos : pos + n] + base[within + n :]
            if old is not None and d.times[vb] >= d.snapshotted_time:
                self.content[old] = new_content
            else:
                d.blocks[vb] = self._new_block(new_content)
                d.times[vb] = self.time
            pos += n
        self._gc()

    def discard(self, dev: int, offset: int, length: int) -> None:
        d = self.devices[dev]
        bs = self.block_size
        for vb in range(-(-offset // bs), (offset + length) // bs):
            d.blocks.pop(vb, None)
            d.times.pop(vb, None)
        self._gc()

    def read(self, dev: int, offset: int, length: int) -> bytes:
        d = self.devices[dev]
        bs = self.block_size
        out = bytearray(length)
        pos = 0
        while pos < length:
            vb, within = divmod(offset + pos, bs)
            n = min(bs - within, length - pos)
            b = d.blocks.get(vb)
            if b is not None:
                out[pos : pos + n] = self.content[b][within : within + n]
            pos += n
        return bytes(out)

    def mapped_blocks(self, dev: int) -> int:
        return len(self.devices[dev].blocks)

    def highest_mapped_end(self, dev: int) -> int:
        blocks = self.devices[dev].blocks
        return (max(blocks) + 1) * self.block_size if blocks else 0

    def used_data_blocks(self) -> int:
        return len(self._live())
