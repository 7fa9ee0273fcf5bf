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
from dmimage.thin.ir import PoolIR

__all__ = ["human_document", "write_human", "human_bytes"]

_PARTS = [b"    (", b"..", b") -> (", b"..", b"), ", b"\n"]


def _render(origin, data, length, time, want_lengths):
    last = length - np.uint64(1)
    return render_rows(_PARTS, [origin, origin + last, data, data + last, time], want_lengths)


def human_document(ir: PoolIR) -> Document:
    sb = ir.superblock
    doc = Document(_render)
    head = (f'begin superblock: "{sb.uuid}", {sb.time}, {sb.transaction}, {sb.flags}, '
            f"{sb.version}, {sb.data_block_size}, {sb.nr_data_blocks}")
    if sb.metadata_snap is not None:
        head += f", {sb.metadata_snap}"
    doc.text(head + "\n")
    for name, runs in ir.defs.items():
        doc.text(f"def: {name}\n")
        doc.runs(runs)
        doc.text("\n")
    for d in ir.devices:
        doc.text(f"device: {d.dev_id}\nmapped_blocks: {d.mapped_blocks}\n"
                 f"transaction: {d.transaction}\ncreation time: {d.creation_time}\n"
                 f"snap time: {d.snap_time}\n")
        for item in d.items:
            if isinstance(item, str):
                doc.text(f"    ref: {item}\n")
            else:
                doc.runs(item)
        doc.text("\n")
    doc.text("end superblock\n")
    return doc


def write_human(ir: PoolIR, out: BinaryIO) -> None:
    human_document(ir).write_to(out)


def human_bytes(ir: PoolIR) -> bytes:
    return human_document(ir).getvalue()
