"""era_invalidate: the blocks that may have changed since an era, as thin-provisioning-tools
1.1 lists them.

As 1.1: the archived writesets of every era >= the threshold, ORed, plus, when the oldest
archived writeset is newer than the threshold (older ones were folded into the era array),
every block whose era-array entry is >= the threshold. One deliberate difference: when the
kernel has folded every writeset into the era array (the tree is empty, as it is soon after
a few checkpoints), 1.1 lists nothing; dmimage reads the era array, which then holds the
whole history. The current, not yet archived, writeset is not read: checkpoint the era first,
as the kernel's documentation describes.
"""

from __future__ import annotations

import numpy as np

from dmimage.era.metadata import EraSuperblock, read_writeset_tree
from dmimage.pdata.array import read_array, read_bitset
from dmimage.pdata.btree import BtreeWalker


def blocks_written_since(walker: BtreeWalker, sb: EraSuperblock, threshold: int) -> np.ndarray:
    """Booleans per origin block (``sb.nr_blocks`` of them)."""
    n = sb.nr_blocks
    marked = np.zeros(n, bool)
    tree = read_writeset_tree(walker, sb.writeset_tree_root)
    for era, (nr_bits, root) in tree.items():
        if era < threshold:
            continue
        # 1.1 ORs whole 64-bit words: bits past nr_bits count too, up to nr_blocks
        words = -(-nr_bits // 64)
        bits = read_bitset(walker, root, words * 64, f"writeset of era {era}")
        m = min(n, len(bits))
        marked[:m] |= bits[:m]
    if not tree or min(tree) > threshold:
        arr = read_array(walker, sb.era_array_root, 4, "era array").values
        eras = arr.reshape(-1).view("<u4")[:n] if len(arr) else np.zeros(0, "<u4")
        marked[:len(eras)] |= eras >= threshold
    return marked


def invalidate_xml(marked: np.ndarray) -> str:
    """<blocks> with a <block> per single block and a <range begin end> (end exclusive) per
    longer run."""
    out = ["<blocks>"]
    if marked.any():
        edges = np.flatnonzero(np.diff(np.concatenate([[0], marked.astype(np.int8), [0]])))
        for b, e in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
            out.append(f'  <block block="{b}"/>' if e == b + 1 else
                       f'  <range begin="{b}" end="{e}"/>')
    out.append("</blocks>")
    return "\n".join(out)
