"""era_restore: dm-era metadata from era_dump's XML (<bit> or <marked> writesets).

As era_restore 1.1 writes it: every writeset archived in the writeset tree, the current
writeset empty (nr_bits = nr_blocks, no bitset), the era array, the clean-shutdown flag, in
era_restore 1.1's block placement (build_era; the unused tails of array blocks and btree
nodes aside, which 1.1 fills with whatever its buffers held). Crash-safe like every dmimage
writer (block 0 zeroed first, the superblock last after a flush); the output is never grown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dmimage.errors import InputError
from dmimage.format.checksum import seal
from dmimage.format.constants import BLOCK_SIZE
from dmimage.format.era import ERA_MAGIC, ERA_SUPERBLOCK, SALT_ERA_SUPERBLOCK, WRITESET_DTYPE
from dmimage.pdata.array import (
    array_tree,
    max_entries,
    nr_array_blocks,
    put_array_blocks,
    write_array,
)
from dmimage.pdata.writer import (
    MetadataImage,
    NodeKind,
    build_tree,
    write_metadata_space_map,
    write_new_metadata,
)
from dmimage.xml_attrs import bool_attr, int_attr, xml_events

WRITESET_LEAF = NodeKind(True, WRITESET_DTYPE)
FLAG_CLEAN_SHUTDOWN = 1


@dataclass
class EraIR:
    block_size: int
    nr_blocks: int
    current_era: int
    #: era -> (nr_bits, marked bits)
    writesets: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)
    eras: dict[int, int] = field(default_factory=dict)
    #: the whole era array at once (repair); overrides ``eras`` when given
    era_values: np.ndarray | None = None


def parse_xml(path: str) -> EraIR:
    ir: EraIR | None = None
    current: tuple[int, np.ndarray] | None = None
    for event, elem in xml_events(path, ("start", "end")):
        tag = elem.tag
        if event == "end":
            if tag == "writeset":
                current = None
            elem.clear()
            continue
        if tag == "superblock":
            if ir is not None:
                raise InputError("duplicated <superblock>")
            ir = EraIR(int_attr(elem, "block_size", 2**32),
                       int_attr(elem, "nr_blocks", 2**32),
                       int_attr(elem, "current_era", 2**32))
        elif ir is None:
            raise InputError(f"<{tag}> outside <superblock>")
        elif tag == "writeset":
            era, nr = int_attr(elem, "era", 2**32), int_attr(elem, "nr_bits", 2**32)
            if era in ir.writesets:
                raise InputError(f"writeset of era {era} given twice")
            current = (nr, np.zeros(nr, bool))
            ir.writesets[era] = current
        elif tag in ("bit", "marked"):
            if current is None:
                raise InputError(f"<{tag}> outside <writeset>")
            nr, bits = current
            if tag == "bit":
                b = int_attr(elem, "block", nr)
                bits[b] = bool_attr(elem, "value")
            else:
                b, n = int_attr(elem, "block_begin", 2**32), int_attr(elem, "len", 2**32)
                if n == 0 or b + n > nr:
                    raise InputError(f"<marked block_begin=\"{b}\" len=\"{n}\">: outside "
                                     f"the writeset's {nr} bits")
                bits[b:b + n] = True
        elif tag == "era":
            ir.eras[int_attr(elem, "block", ir.nr_blocks)] = int_attr(elem, "era", 2**32)
        elif tag != "era_array":
            raise InputError(f"unknown element <{tag}>")
    if ir is None:
        raise InputError(f"{path}: no <superblock>")
    return ir


def _bitset_words(bits: np.ndarray) -> np.ndarray:
    padded = np.concatenate([bits, np.zeros(-len(bits) % 64, bool)])
    return np.packbits(padded, bitorder="little").reshape(-1, 8)


def build_era(ir: EraIR, nr_blocks: int) -> tuple[MetadataImage, bytes]:
    """Metadata as era_restore 1.1 lays it out, block for block, for XML in era_dump's
    order: each writeset's bitset (blocks, then its btree) as its section ends; the era
    array's blocks as the entries stream (a block when the first entry of a later block
    arrives); at the superblock's end the writeset tree, the era array's remaining blocks
    and btree, the space map."""
    image = MetadataImage(nr_blocks)
    image.alloc()  # block 0: the superblock
    keys, values = [], []
    for era in sorted(ir.writesets):
        nr, bits = ir.writesets[era]
        keys.append(era)
        values.append((nr, write_array(image, _bitset_words(bits))))
    eras = np.zeros(ir.nr_blocks, "<u4")
    if ir.era_values is not None:
        eras[:] = ir.era_values
    for b, e in ir.eras.items():
        eras[b] = e
    per = max_entries(4)
    era_locs = np.full(nr_array_blocks(ir.nr_blocks, 4), -1, np.int64)
    pushed = ir.nr_blocks - 1 if ir.era_values is not None else max(ir.eras, default=-1)
    if pushed >= 0:  # blocks before the last entry's are written while the XML streams
        era_locs[:pushed // per] = image.alloc_many(pushed // per)
    ws_values = np.array(values, dtype=WRITESET_DTYPE) if values else \
        np.zeros(0, WRITESET_DTYPE)
    ws_root = build_tree(image, WRITESET_LEAF, np.array(keys, dtype=np.uint64), ws_values)
    rest = np.flatnonzero(era_locs < 0)
    era_locs[rest] = image.alloc_many(len(rest))
    put_array_blocks(image, eras.view(np.uint8).reshape(-1, 4), era_locs)
    era_root = array_tree(image, era_locs)
    sm_root = write_metadata_space_map(image)
    sb = bytearray(BLOCK_SIZE)
    ERA_SUPERBLOCK.pack_into(sb, 0, 0, FLAG_CLEAN_SHUTDOWN, 0, bytes(16), ERA_MAGIC, 1,
                             sm_root.pack(), ir.block_size, BLOCK_SIZE // 512, ir.nr_blocks,
                             ir.current_era, ir.nr_blocks, 0, ws_root, era_root, 0)
    seal(sb, SALT_ERA_SUPERBLOCK)
    return image, bytes(sb)


def restore_era(ir: EraIR, output: str) -> None:
    write_new_metadata(output, lambda nr_blocks: build_era(ir, nr_blocks))
