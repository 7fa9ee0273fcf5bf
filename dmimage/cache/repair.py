"""cache repair: salvage damaged dm-cache metadata into fresh metadata on another device.

cache_repair 1.1 is a dump and a restore: it gives up on any damaged mapping or hint array
block or array btree node, and recovers only a damaged discard bitset, space map or (version
2) dirty bitset. dmimage keeps everything still readable:
- the superblock: a bad checksum is forgiven when its location, magic and version are right
  (its fields are then trusted as they are); otherwise nothing can be found (exit 1);
- the mapping array: a damaged node or array block loses the cache blocks under it (they come
  back unmapped; were any dirty, the origin is stale there, and the loss is reported);
  unknown flag bits are cleared (the mapping kept, as 1.1 keeps it); mappings no check would
  pass (past the origin's end, an origin block mapped twice: the lowest cache block keeps
  it) are dropped and reported;
- dirtiness: version 2's dirty bitset words that are lost count as dirty (as 1.1 does for a
  lost bitset); metadata not shut down cleanly has every mapping dirty, which is what the
  kernel assumes of it (1.1 trusts the flags there);
- hints: lost ones become zero (the policy relearns them);
- the discard bitset is written empty and the space map rebuilt, as restore does.
The output has the input's metadata version and the clean-shutdown flag; it is written as
restore writes (crash-safe, superblock last); the input is only read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dmimage import devlock
from dmimage.cache.metadata import CacheSuperblock, parse_superblock
from dmimage.cache.restore import CacheContent, write_content
from dmimage.errors import ChecksumError, MetadataError
from dmimage.format.cache import M_DIRTY, M_VALID, MAPPING_FLAG_BITS
from dmimage.output_file import refuse_writing_input
from dmimage.pdata.array import max_entries, salvage_array
from dmimage.pdata.block import BlockReader

#: The hint widths cache_check accepts (dm-cache's policies use 4 bytes or none).
HINT_WIDTHS = (0, 4)


@dataclass
class CacheRepairReport:
    """What was lost on the way: one line per loss (empty when nothing was)."""

    losses: list[str] = field(default_factory=list)
    version: int = 0
    nr_mappings: int = 0
    nr_dirty: int = 0
    metadata_blocks: int = 0


def _superblock(reader: BlockReader, rep: CacheRepairReport) -> CacheSuperblock:
    block = reader.block(0)
    try:
        return parse_superblock(block)
    except ChecksumError:
        sb = parse_superblock(block, verify_checksum=False)
        rep.losses.append("block 0, superblock: bad checksum; its location, magic and version "
                          "are right, so its fields are used as they are")
        return sb


def _drop(rep: CacheRepairReport, valid: np.ndarray, idx: np.ndarray, why: str) -> None:
    if len(idx):
        valid[idx] = False
        eg = ", ".join(str(i) for i in idx[:5].tolist())
        rep.losses.append(f"mapping array: {len(idx)} mappings dropped: {why} (e.g. cache "
                          f"block {eg})")


def salvage_cache(reader: BlockReader) -> tuple[CacheContent, CacheSuperblock, CacheRepairReport]:
    """Everything still readable of the metadata behind ``reader``; MetadataError only when
    the superblock itself is unusable."""
    rep = CacheRepairReport()
    sb = _superblock(reader, rep)
    rep.version = sb.version
    n = sb.cache_blocks
    if -(-n // max_entries(8)) > reader.nr_blocks:
        raise MetadataError(f"{n} cache blocks: more than the metadata device's mapping array "
                            "could hold", block=0, field="superblock cache_blocks")
    maps_arr = salvage_array(reader, sb.mapping_root, 8, n, "mapping array")
    rep.losses += maps_arr.problems
    if not maps_arr.present.all():
        rep.losses.append(f"mapping array: cache blocks {maps_arr.lost_runs()} lost "
                          f"({int((~maps_arr.present).sum())} of {n}: unmapped now; any that "
                          "were dirty leave their origin blocks stale)")
    maps = maps_arr.values.reshape(-1).view("<u8").astype(np.uint64)
    flags = maps & np.uint64((1 << MAPPING_FLAG_BITS) - 1)
    origin = maps >> np.uint64(MAPPING_FLAG_BITS)
    valid = (flags & np.uint64(M_VALID)).astype(bool)
    allowed = M_VALID | M_DIRTY if sb.version == 1 else M_VALID
    odd = np.flatnonzero(valid & (flags & np.uint64(~allowed & 0xFFFF) != 0))
    if len(odd):  # kept, as cache_repair 1.1 keeps them: the valid bit and origin still hold
        rep.losses.append(f"mapping array: unknown flags cleared on {len(odd)} mappings (e.g. "
                          f"cache block {', '.join(str(i) for i in odd[:5].tolist())})")
    if sb.clean_shutdown and sb.discard_block_size and sb.discard_nr_blocks and \
            sb.data_block_size:
        nr_origin = sb.discard_block_size * sb.discard_nr_blocks // sb.data_block_size
        _drop(rep, valid, np.flatnonzero(valid & (origin >= np.uint64(nr_origin))),
              f"past the origin's end ({nr_origin} blocks)")
    vi = np.flatnonzero(valid)
    _u, first = np.unique(origin[vi], return_index=True)
    dup = np.setdiff1d(np.arange(len(vi)), first)
    _drop(rep, valid, vi[dup], "origin block already mapped by a lower cache block")

    if sb.version >= 2:
        words = -(-n // 64)
        bits = salvage_array(reader, sb.dirty_root, 8, words, "dirty bitset")
        rep.losses += bits.problems
        dirty = np.unpackbits(bits.values.reshape(-1), bitorder="little")[:n].astype(bool)
        lost = np.repeat(~bits.present, 64)[:n]
        if (lost & valid).any():
            rep.losses.append(f"dirty bitset: {int((lost & valid).sum())} mapped cache blocks "
                              "of lost words count as dirty")
        dirty |= lost
    else:
        dirty = (flags & np.uint64(M_DIRTY)).astype(bool)
    if not sb.clean_shutdown:
        rep.losses.append("superblock: not shut down cleanly: every mapping counts as dirty "
                          "(as the kernel would assume)")
        dirty = np.ones(n, bool)
    dirty &= valid

    width = sb.policy_hint_size
    hints = np.zeros((n, width if width in HINT_WIDTHS else 0), np.uint8)
    if width not in HINT_WIDTHS:
        rep.losses.append(f"superblock: policy hint size {width} (not 0 or 4): hints dropped")
        width = 0
    elif width and sb.hint_root:
        h = salvage_array(reader, sb.hint_root, width, n, "hint array")
        rep.losses += h.problems
        lost_hints = int((~h.present & valid).sum())
        if lost_hints:
            rep.losses.append(f"hint array: {lost_hints} hints of mapped cache blocks lost "
                              "(zero now)")
        hints = h.values
    origin = np.where(valid, origin, np.uint64(0))
    rep.nr_mappings, rep.nr_dirty = int(valid.sum()), int(dirty.sum())
    content = CacheContent(sb.data_block_size, sb.policy_name, width, origin, valid, dirty,
                           hints)
    return content, sb, rep


def repair_cache(input_path: str, output_path: str) -> CacheRepairReport:
    """Salvage ``input_path`` (read only) and write fresh metadata to the existing file or
    device ``output_path``; MetadataError (exit 1) when the superblock is unusable."""
    refuse_writing_input(input_path, output_path)
    with devlock.hold(input_path, exclusive=False), BlockReader(input_path) as reader:
        try:
            content, sb, rep = salvage_cache(reader)
        except MetadataError as err:
            raise MetadataError(f"{input_path}: nothing to salvage: {err}") from None
    rep.metadata_blocks = write_content(content, output_path, version=sb.version)
    return rep
