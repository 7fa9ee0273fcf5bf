"""era repair: salvage damaged dm-era metadata into fresh metadata on another device.

era_repair 1.1 recovers little: of tests/test_era_repair.py's damages, only a damaged space
map, and it fails on era_restore's own undamaged metadata ("array index out of bounds").
dmimage keeps everything still readable and, where something is lost, errs towards
"written": era metadata exists to tell a backup which blocks changed, and a block wrongly
called unchanged is a corrupt backup.
- the superblock: a bad checksum is forgiven when its location, magic and version are right;
  otherwise nothing can be found (exit 1);
- the writeset tree: writesets under a damaged node are lost; an era missing between the
  oldest and newest found gets a writeset with every bit set, and so does the era just
  before the oldest found (or the current era when none is) once the tree is damaged at all,
  since older writesets may be gone with it; the current writeset (the
  kernel's, not yet archived) is archived under the current era, as era_dump plus
  era_restore would;
- a writeset's lost bitset words: every bit set;
- the era array: lost entries get the current era, entries after the current era are
  clamped to it.
The output is written as restore writes it (crash-safe, superblock last); the input is only
read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dmimage import devlock
from dmimage.era.metadata import EraSuperblock, parse_superblock, read_writeset_tree
from dmimage.era.restore import EraIR, restore_era
from dmimage.errors import ChecksumError, MetadataError
from dmimage.output_file import refuse_writing_input
from dmimage.pdata.array import max_entries, salvage_array
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import BtreeWalker


@dataclass
class EraRepairReport:
    losses: list[str] = field(default_factory=list)
    current_era: int = 0
    eras: list[int] = field(default_factory=list)


def _superblock(reader: BlockReader, rep: EraRepairReport) -> EraSuperblock:
    block = reader.block(0)
    try:
        return parse_superblock(block)
    except ChecksumError:
        sb = parse_superblock(block, verify_checksum=False)
        rep.losses.append("block 0, superblock: bad checksum; its location, magic and version "
                          "are right, so its fields are used as they are")
        return sb


def _writeset(reader: BlockReader, era: int, nr_bits: int, root: int,
              rep: EraRepairReport) -> np.ndarray:
    what = f"writeset of era {era}"
    words = salvage_array(reader, root, 8, -(-nr_bits // 64), what)
    rep.losses += words.problems
    bits = np.unpackbits(words.values.reshape(-1), bitorder="little")[:nr_bits].astype(bool)
    lost = np.repeat(~words.present, 64)[:nr_bits]
    if lost.any():
        rep.losses.append(f"{what}: {int(lost.sum())} bits lost: set (counted as written)")
    out: np.ndarray = bits | lost
    return out


def salvage_era(reader: BlockReader) -> tuple[EraIR, EraRepairReport]:
    """Everything still readable; MetadataError only when the superblock is unusable."""
    rep = EraRepairReport()
    sb = _superblock(reader, rep)
    n = sb.nr_blocks
    if -(-n // max_entries(4)) > reader.nr_blocks:
        raise MetadataError(f"{n} blocks: more than the metadata device's era array could "
                            "hold", block=0, field="superblock nr_blocks")
    rep.current_era = sb.current_era
    walker = BtreeWalker(reader, on_error=lambda err: rep.losses.append(str(err)))
    tree: dict[int, tuple[int, int]] = {}
    before = len(rep.losses)
    if sb.writeset_tree_root:
        try:
            tree = read_writeset_tree(walker, sb.writeset_tree_root)
        except MetadataError as err:
            rep.losses.append(f"{err}: every archived writeset is lost")
    tree_damaged = len(rep.losses) > before
    sets: dict[int, tuple[int, np.ndarray]] = {}
    found = dict(tree)
    ws_bits, ws_root = sb.current_writeset
    if ws_root:
        found.setdefault(sb.current_era, (ws_bits, 0))
    for era, (nr_bits, root) in sorted(found.items()):
        if nr_bits > n:
            rep.losses.append(f"writeset of era {era}: {nr_bits} bits for {n} blocks: dropped")
            continue
        bits = _writeset(reader, era, nr_bits, root, rep) if root else np.zeros(nr_bits, bool)
        if era == sb.current_era and ws_root and ws_bits <= n:
            bits = bits | _writeset(reader, era, ws_bits, ws_root, rep)[:nr_bits]
        sets[era] = (nr_bits, bits)
    if tree_damaged:
        # writesets older than the oldest found may be gone, with the only record of their
        # writes (the era array has not folded them in): one all-set writeset just below
        # stands for them
        era = max(min(sets, default=sb.current_era + 1) - 1, 0)
        rep.losses.append(f"writeset tree: writesets before the oldest found may be lost: "
                          f"era {era} gets every bit set (counted as written)")
        sets[era] = (n, np.ones(n, bool))
    if sets:
        for era in range(min(sets), max(sets)):
            if era not in sets:
                rep.losses.append(f"writeset of era {era}: lost, recreated with every bit "
                                  "set (counted as written)")
                sets[era] = (n, np.ones(n, bool))
    arr = salvage_array(reader, sb.era_array_root, 4, n, "era array")
    rep.losses += arr.problems
    eras = arr.values.reshape(-1).view("<u4").astype(np.uint32)
    if not arr.present.all():
        rep.losses.append(f"era array: blocks {arr.lost_runs()} lost: given the current era "
                          f"{sb.current_era} (counted as written)")
        eras[~arr.present] = sb.current_era
    late = np.flatnonzero(eras > sb.current_era)
    if len(late):
        rep.losses.append(f"era array: {len(late)} blocks with an era after the current one "
                          f"(e.g. block {int(late[0])}): clamped to {sb.current_era}")
        eras[late] = sb.current_era
    rep.eras = sorted(sets)
    ir = EraIR(sb.data_block_size, n, sb.current_era, dict(sorted(sets.items())),
               era_values=eras)
    return ir, rep


def repair_era(input_path: str, output_path: str) -> EraRepairReport:
    """Salvage ``input_path`` (read only) and write fresh metadata to the existing file or
    device ``output_path``; MetadataError (exit 1) when the superblock is unusable."""
    refuse_writing_input(input_path, output_path)
    with devlock.hold(input_path, exclusive=False), BlockReader(input_path) as reader:
        try:
            ir, rep = salvage_era(reader)
        except MetadataError as err:
            raise MetadataError(f"{input_path}: nothing to salvage: {err}") from None
    restore_era(ir, output_path)
    return rep
