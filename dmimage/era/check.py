"""era_check: the superblock, the writeset tree and its bitsets, and the era array (no entry
may be newer than the current era), with era_check 1.1's verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dmimage.era.metadata import parse_superblock, read_writeset_tree
from dmimage.errors import MetadataError
from dmimage.pdata.array import read_array, read_bitset
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker


@dataclass
class EraCheckReport:
    problems: list[str] = field(default_factory=list)
    current_era: int = 0
    nr_blocks: int = 0
    archived_eras: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_era(path: str) -> EraCheckReport:
    rep = EraCheckReport()
    with BlockReader(path) as reader:
        sb = parse_superblock(reader.block(0))
        rep.current_era, rep.nr_blocks = sb.current_era, sb.nr_blocks
        walker = BtreeWalker(reader)
        tree = read_writeset_tree(walker, sb.writeset_tree_root)
        rep.archived_eras = list(tree)
        for era, (nr_bits, root) in tree.items():
            try:
                read_bitset(walker, root, nr_bits, f"writeset of era {era}")
            except MetadataError as err:
                rep.problems.append(str(err))
        try:
            arr = read_array(walker, sb.era_array_root, 4, "era array").values
        except MetadataError as err:
            rep.problems.append(str(err))
            return rep
        eras = arr.reshape(-1).view("<u4") if len(arr) else np.zeros(0, "<u4")
        bad = np.flatnonzero(eras > sb.current_era)
        if len(bad):
            b = int(bad[0])
            rep.problems.append(f"era array: {len(bad)} blocks with an era after the current "
                                f"era {sb.current_era} (e.g. block {b}: era {int(eras[b])})")
    return rep
