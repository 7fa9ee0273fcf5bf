"""thin_dump ``--format human_readable``, byte-identical to thin_dump 1.1.

    begin superblock: "UUID", TIME, TRANSACTION, FLAGS, VERSION, DATA_BLOCK_SIZE,
        NR_DATA_BLOCKS[, METADATA_SNAP]
    def: NAME
        (V..V_END) -> (D..D_END), TIME
    <blank>
    device: ID
    mapped_blocks: M
    transaction: X
    creation time: C
    snap time: S
        ref: NAME
        (V..V_END) -> (D..D_END), TIME
    <blank>
    end superblock

Ends are inclusive; single mappings print as one-block ranges; the text ends with a newline.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from dmimage.thin.dump.render import Document, render_rows
from dmimage.thin.dump.walk import Emitter
from dmimage.thin.ir import DeviceIR, PoolIR, SuperblockIR

__all__ = ["HumanEmitter", "human_document", "write_human", "human_bytes"]

_PARTS = [b"    (", b"..", b") -> (", b"..", b"), ", b"\n"]


def _render(origin: np.ndarray, data: np.ndarray, length: np.ndarray, time: np.ndarray,
            want_lengths: bool) -> tuple[np.ndarray, np.ndarray | None]:
    last = length - np.uint64(1)
    return render_rows(_PARTS, [origin, origin + last, data, data + last, time], want_lengths)


class HumanEmitter(Emitter):
    render_runs = staticmethod(_render)

    def superblock_begin(self, sb: SuperblockIR) -> None:
        head = (f'begin superblock: "{sb.uuid}", {sb.time}, {sb.transaction}, {sb.flags}, '
                f"{sb.version}, {sb.data_block_size}, {sb.nr_data_blocks}")
        if sb.metadata_snap is not None:
            head += f", {sb.metadata_snap}"
        self.doc.text(head + "\n")

    def def_begin(self, name: str) -> None:
        self.doc.text(f"def: {name}\n")

    def def_end(self, name: str) -> None:
        self.doc.text("\n")

    def device_begin(self, dev: DeviceIR) -> None:
        self.doc.text(f"device: {dev.dev_id}\nmapped_blocks: {dev.mapped_blocks}\n"
                      f"transaction: {dev.transaction}\ncreation time: {dev.creation_time}\n"
                      f"snap time: {dev.snap_time}\n")

    def ref(self, name: str) -> None:
        self.doc.text(f"    ref: {name}\n")

    def device_end(self, dev: DeviceIR) -> None:
        self.doc.text("\n")

    def superblock_end(self) -> None:
        self.doc.text("end superblock\n")


def human_document(ir: PoolIR) -> Document:
    return HumanEmitter.document(ir)


def write_human(ir: PoolIR, out: BinaryIO) -> None:
    human_document(ir).write_to(out)


def human_bytes(ir: PoolIR) -> bytes:
    return human_document(ir).getvalue()
