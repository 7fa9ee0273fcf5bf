"""A dm-era metadata device: superblock, archived writesets and the era array."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmimage.errors import BlockNumberError, ChecksumError, FormatError, MetadataError
from dmimage.format.checksum import checksum_ok
from dmimage.format.era import (
    ERA_MAGIC,
    ERA_SUPERBLOCK,
    SALT_ERA_SUPERBLOCK,
    WRITESET_DTYPE,
    WRITESET_VALUE_SIZE,
)
from dmimage.format.superblock import SpaceMapRoot
from dmimage.pdata.array import read_array, read_bitset
from dmimage.pdata.btree import BtreeWalker, Node


@dataclass(frozen=True, kw_only=True)
class EraSuperblock:
    flags: int
    version: int
    metadata_sm: SpaceMapRoot
    data_block_size: int
    nr_blocks: int
    current_era: int
    current_writeset: tuple[int, int]  # (nr_bits, root)
    writeset_tree_root: int
    era_array_root: int
    metadata_snap: int


def parse_superblock(block: memoryview | bytes, where: int = 0, *,
                     verify_checksum: bool = True) -> EraSuperblock:
    """Checksum (unless repair skips it), location, magic, version."""
    if verify_checksum and not checksum_ok(block, SALT_ERA_SUPERBLOCK):
        raise ChecksumError("bad checksum (not a dm-era superblock?)", block=where,
                            field="superblock")
    (_c, flags, blocknr, _uuid, magic, version, sm_root, data_bs, _meta_bs, nr_blocks, era,
     ws_bits, ws_root, ws_tree, era_root, snap) = ERA_SUPERBLOCK.unpack_from(block)
    if blocknr != where:
        raise BlockNumberError(f"superblock says it lives at block {blocknr}", block=where,
                               field="superblock blocknr")
    if magic != ERA_MAGIC:
        raise FormatError(f"magic {magic:#x}, expected {ERA_MAGIC:#x}", block=where,
                          field="superblock magic")
    if version > 1:
        raise FormatError(f"unknown superblock version {version}", block=where,
                          field="superblock version")
    return EraSuperblock(flags=flags, version=version, metadata_sm=SpaceMapRoot.unpack(sm_root),
                         data_block_size=data_bs, nr_blocks=nr_blocks, current_era=era,
                         current_writeset=(ws_bits, ws_root), writeset_tree_root=ws_tree,
                         era_array_root=era_root, metadata_snap=snap)


def read_writeset_tree(walker: BtreeWalker, root: int) -> dict[int, tuple[int, int]]:
    """{era: (nr_bits, bitset root)} of every archived writeset."""
    out: dict[int, tuple[int, int]] = {}

    def leaf(node: Node) -> None:
        vals = np.frombuffer(node.raw_values, WRITESET_DTYPE, count=node.nr_entries)
        for k, b, r in zip(node.keys.tolist(), vals["nr_bits"].tolist(), vals["root"].tolist(),
                           strict=True):
            out[k] = (b, r)

    if walker.walk(root, WRITESET_VALUE_SIZE, leaf, what="writeset tree") is None:
        raise MetadataError("writeset tree: root unusable", block=root)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class EraMetadata:
    sb: EraSuperblock
    #: archived writesets in era order: era -> (nr_bits, bits as booleans)
    writesets: dict[int, tuple[int, np.ndarray]]
    eras: np.ndarray  # uint32 per origin block


def ordered_writesets(sb: EraSuperblock, tree: dict[int, tuple[int, int]]
                      ) -> list[tuple[int, tuple[int, int]]]:
    """The archived writesets plus the current one, consecutive eras ending at current_era,
    as era_dump 1.1 requires them."""
    sets = dict(tree)
    if sb.current_writeset[1] != 0:
        if sb.current_era in sets:
            raise MetadataError(f"era {sb.current_era} is both the current writeset and in the "
                                "writeset tree", field="current_writeset")
        sets[sb.current_era] = sb.current_writeset
    if not sets:
        return []
    first = (sb.current_era - (len(sets) - 1)) & 0xFFFFFFFF
    out = []
    era = first
    for _ in range(len(sets)):
        if era not in sets:
            raise MetadataError(f"writeset of era {era} is not present", field="writeset tree")
        out.append((era, sets[era]))
        era = (era + 1) & 0xFFFFFFFF
    return out


def read_era(walker: BtreeWalker, sb: EraSuperblock) -> EraMetadata:
    tree = read_writeset_tree(walker, sb.writeset_tree_root)
    sets = {era: (nr, read_bitset(walker, root, nr, f"writeset of era {era}"))
            for era, (nr, root) in ordered_writesets(sb, tree)}
    arr = read_array(walker, sb.era_array_root, 4, "era array").values
    eras = arr.reshape(-1).view("<u4").astype(np.uint32) if len(arr) else np.zeros(0, np.uint32)
    return EraMetadata(sb, sets, eras)
