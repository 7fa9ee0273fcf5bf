"""The reference model of a thin pool: plain-Python semantics, no metadata format at all.

Devices map virtual blocks to abstract data blocks; data blocks hold content. A snapshot copies
the origin's map (sharing its blocks); a write to a block another device also maps gets a new
block (copy-on-write), otherwise it changes the block in place; a discard unmaps whole blocks.
The offline writer (thin/transaction.py), the on-disk reader and the kernel in the VM tests
must all agree with this model on: device ids and details, pool time and transaction id, the
content of every thin, and how many data blocks are in use.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


class ModelError(Exception):
    """The operation is invalid in the model's state (the kernel would refuse it too)."""


@dataclass
class DeviceModel:
    transaction_id: int
    creation_time: int
    snapshotted_time: int
    blocks: dict[int, int] = field(default_factory=dict)  # vblock -> data block id


@dataclass
class PoolModel:
    block_size: int  # bytes per data block
    time: int = 0
    trans_id: int = 0
    devices: dict[int, DeviceModel] = field(default_factory=dict)
    content: dict[int, bytes] = field(default_factory=dict)  # data block id -> bytes
    _next_id: int = 0

    def clone(self) -> PoolModel:
        return copy.deepcopy(self)

    def _new_block(self, data: bytes) -> int:
        self._next_id += 1
        self.content[self._next_id] = data
        return self._next_id

    def _refs(self, block: int) -> int:
        return sum(block in d.blocks.values() for d in self.devices.values())

    def _gc(self) -> None:
        live = {b for d in self.devices.values() for b in d.blocks.values()}
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
        self.devices[dev] = DeviceModel(self.trans_id, self.time, self.time, dict(o.blocks))

    def delete(self, dev: int) -> None:
        if dev not in self.devices:
            raise ModelError(f"no device {dev}")
        del self.devices[dev]
        self._gc()

    def set_transaction_id(self, old: int, new: int) -> None:
        if old != self.trans_id:
            raise ModelError("transaction id mismatch")
        self.trans_id = new

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
            if old is not None and self._refs(old) == 1:
                self.content[old] = new_content
            else:
                d.blocks[vb] = self._new_block(new_content)
            pos += n
        self._gc()

    def discard(self, dev: int, offset: int, length: int) -> None:
        d = self.devices[dev]
        bs = self.block_size
        for vb in range(-(-offset // bs), (offset + length) // bs):
            d.blocks.pop(vb, None)
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
        return len({b for d in self.devices.values() for b in d.blocks.values()})
