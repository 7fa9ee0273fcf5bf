"""Restore: a pool IR (from a thin_dump XML or JSON dump) -> fresh thin-pool metadata.

The layout follows thin_restore 1.x block for block (thin-format.md §5, §8): block 0 for the
superblock, then each ``<def>``'s leaves and each device's bottom tree in input order (leaves
first, then its internal levels), the details tree, the top-level mapping tree, the data space
map (bitmaps, overflow tree, index btree) and the metadata space map (bitmaps, overflow tree,
index block). Everything is built in memory, checked against the output size, and only then
written: all blocks, fsync, the superblock, fsync.

Public API:

* :func:`restore` (IR -> metadata file or block device),
* :func:`build_metadata` (IR -> :class:`~dmimage.pdata.writer.MetadataImage` + superblock),
* :func:`validate_ir`, :func:`apply_overrides`,
* :func:`read_input` / :func:`read_xml` (dump file -> IR).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dmimage import devlock
from dmimage.errors import InputError, OutputTooSmallError, UsageError
from dmimage.format.constants import (
    BLOCK_SIZE,
    ENTRIES_PER_BITMAP,
    MAX_DATA_BLOCK,
    MAX_DUMP_DEV_ID,
    MAX_METADATA_BLOCKS,
    TIME_MASK,
    valid_data_block_size,
)
from dmimage.format.superblock import Superblock
from dmimage.format.values import (
    DEVICE_DETAILS_DTYPE,
    DeviceDetails,
    pack_details,
    pack_mappings,
)
from dmimage.pdata.writer import (
    INTERNAL,
    MAPPING_LEAF,
    MetadataImage,
    NodeBuilder,
    NodeKind,
    NodeSummary,
    SparseCounts,
    build_btree,
    build_tree,
    decode_node,
    open_output,
    write_data_space_map,
    write_metadata_space_map,
)
from dmimage.thin.ir import U64, DeviceIR, PoolIR, Runs, SuperblockIR

DETAILS_LEAF = NodeKind(True, DEVICE_DETAILS_DTYPE)
TOP_LEAF = NodeKind(True, U64)
assert DETAILS_LEAF.max_entries == 126 and INTERNAL.max_entries == 252

MAX_U32 = (1 << 32) - 1
MAX_U64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- validation


def apply_overrides(ir: PoolIR, *, transaction_id: int | None = None,
                    data_block_size: int | None = None,
                    nr_data_blocks: int | None = None) -> PoolIR:
    """Replace superblock facts of the input (thin_restore's --transaction-id etc.)."""
    sb = ir.superblock
    if transaction_id is not None:
        sb.transaction = int(transaction_id)
    if data_block_size is not None:
        sb.data_block_size = int(data_block_size)
    if nr_data_blocks is not None:
        sb.nr_data_blocks = int(nr_data_blocks)
    return ir


def validate_superblock(sb: SuperblockIR) -> None:
    if not valid_data_block_size(int(sb.data_block_size)):
        raise InputError(
            f"invalid data block size {sb.data_block_size} sectors: it must be a multiple of "
            "128 sectors (64 KiB) between 128 and 2097152 (1 GiB)")
    if not 0 <= int(sb.nr_data_blocks) <= MAX_DATA_BLOCK + 1:
        raise InputError(f"nr_data_blocks {sb.nr_data_blocks} is out of range "
                         f"(at most 2^40 data blocks fit a mapping)")
    if not 0 <= int(sb.time) <= MAX_U32:
        raise InputError(f"superblock time {sb.time} does not fit 32 bits")
    if not 0 <= int(sb.transaction) <= MAX_U64:
        raise InputError(f"transaction id {sb.transaction} does not fit 64 bits")


def _check_runs(runs: Runs, what: str, nr_data_blocks: int) -> None:
    if not len(runs):
        return
    if bool(np.any(runs.length == 0)):
        raise InputError(f"{what}: a range mapping has length 0")
    last_data = runs.data_begin + runs.length - np.uint64(1)
    if bool(np.any(last_data < runs.data_begin)):
        raise InputError(f"{what}: a range mapping's data blocks overflow 64 bits")
    hi = int(last_data.max())
    if hi >= nr_data_blocks:
        i = int(np.argmax(last_data >= np.uint64(nr_data_blocks)))
        raise InputError(
            f"{what}: mapping of virtual block {int(runs.origin_begin[i])} to data block "
            f"{max(int(runs.data_begin[i]), nr_data_blocks)} is beyond nr_data_blocks "
            f"{nr_data_blocks}")
    if int(runs.time.max()) > TIME_MASK:
        i = int(np.argmax(runs.time > TIME_MASK))
        raise InputError(f"{what}: mapping time {int(runs.time[i])} does not fit 24 bits "
                         f"(virtual block {int(runs.origin_begin[i])})")
    last_origin = runs.origin_begin + runs.length - np.uint64(1)
    if bool(np.any(last_origin < runs.origin_begin)):
        raise InputError(f"{what}: a range mapping's virtual blocks overflow 64 bits")
    if len(runs) > 1 and not bool(np.all(runs.origin_begin[1:] > last_origin[:-1])):
        i = int(np.argmin(runs.origin_begin[1:] > last_origin[:-1])) + 1
        raise InputError(f"{what}: mappings are not in ascending virtual block order "
                         f"(virtual block {int(runs.origin_begin[i])})")


def validate_ir(ir: PoolIR) -> None:
    """Everything thin_restore (and the kernel) would refuse, as one clear InputError."""
    sb = ir.superblock
    validate_superblock(sb)
    nr_data = int(sb.nr_data_blocks)
    def_sizes: dict[str, int] = {}
    for name, runs in ir.defs.items():
        def_sizes[name] = validate_def(name, runs, nr_data)
    seen: set[int] = set()
    for dev in ir.devices:
        validate_device(dev, def_sizes, seen, nr_data)


def validate_def(name: str, runs: Runs, nr_data: int) -> int:
    """Check a ``<def>``'s runs; its number of mappings."""
    _check_runs(runs, f"<def name=\"{name}\">", nr_data)
    return runs.nr_blocks


def validate_device(dev: DeviceIR, def_sizes: dict[str, int], seen: set[int],
                    nr_data: int) -> None:
    """Check one device (``seen``: the ids before it, this one added)."""
    did = int(dev.dev_id)
    if not 0 <= did <= MAX_DUMP_DEV_ID:
        raise InputError(f"device id {did} does not fit 32 bits")
    if did in seen:
        raise InputError(f"device {did} appears more than once")
    seen.add(did)
    for field_name, value, limit in (("transaction", dev.transaction, MAX_U64),
                                     ("creation_time", dev.creation_time, MAX_U32),
                                     ("snap_time", dev.snap_time, MAX_U32)):
        if not 0 <= int(value) <= limit:
            raise InputError(f"device {did}: {field_name} {value} is out of range")
    total = 0
    for item in dev.items:
        if isinstance(item, str):
            if item not in def_sizes:
                raise InputError(f"device {did}: <ref name=\"{item}\"> names no <def>")
            total += def_sizes[item]
        else:
            _check_runs(item, f"device {did}", nr_data)
            total += item.nr_blocks
    if int(dev.mapped_blocks) != total:
        raise InputError(f"device {did}: mapped_blocks is {dev.mapped_blocks} but it has "
                         f"{total} mappings")


# ----------------------------------------------------------------------------- building


def _mapping_arrays(runs: Runs) -> tuple[np.ndarray, np.ndarray]:
    if runs.nr_blocks == len(runs):  # single mappings only (a fragmented pool): as they are
        return runs.origin_begin, pack_mappings(runs.data_begin, runs.time)
    origin, data, time = runs.expand()
    return origin, pack_mappings(data, time)


@dataclass(slots=True)
class BuiltMetadata:
    image: MetadataImage
    #: the sealed block 0 (empty when nothing was laid out)
    superblock: bytes
    #: Blocks the image needs on the device (it fits when <= image.nr_blocks).
    blocks_needed: int
    #: False when the device was too small to lay anything out: blocks_needed is a lower bound.
    exact: bool = True


#: Up to this many metadata blocks (1 GiB) a too-small output is told the exact size needed.
_EXACT_NEED_LIMIT = 1 << 18


def _data_bitmap_floor(ir: PoolIR) -> int:
    """Metadata blocks the data space map's bitmaps alone take (one per 16320 data blocks).

    Checked before anything is laid out, so an absurd nr_data_blocks fails at once instead
    of building millions of bitmaps in memory."""
    nb = -(-int(ir.superblock.nr_data_blocks) // ENTRIES_PER_BITMAP)
    if nb > MAX_METADATA_BLOCKS:
        raise InputError(f"nr_data_blocks {ir.superblock.nr_data_blocks}: its space map alone "
                         f"needs {nb} metadata blocks, more than the {MAX_METADATA_BLOCKS} "
                         "the format allows")
    return nb


def build_metadata(ir: PoolIR, nr_metadata_blocks: int, *, validate: bool = True,
                   progress: Callable[[int], None] | None = None) -> BuiltMetadata:
    """Lay out the whole pool in memory for a metadata device of ``nr_metadata_blocks``."""
    if validate:
        validate_ir(ir)
    image = MetadataImage(max(int(nr_metadata_blocks), 1))
    floor = 1 + _data_bitmap_floor(ir) + sum(int(d.mapped_blocks) for d in ir.devices) // 252
    if floor > image.nr_blocks and floor > _EXACT_NEED_LIMIT:
        # Too big to lay out in memory only to say by how much it does not fit.
        return BuiltMetadata(image, bytes(BLOCK_SIZE), floor, exact=False)
    layout = Layout(ir.superblock, image)
    for name, runs in ir.defs.items():
        layout.add_def(name, runs)
    for dev in ir.devices:
        layout.add_device(dev)
        if progress:
            progress(int(dev.mapped_blocks))
    return layout.finish()


class Layout:
    """The pool laid out in input order (thin_restore's placement): ``<def>`` leaves first,
    then each device's tree as it comes, then the details and top-level trees and the space
    maps (:meth:`finish`). A device's mappings are not kept once its tree is built."""

    def __init__(self, sb: SuperblockIR, image: MetadataImage) -> None:
        self.sb = sb
        self.image = image
        if image.alloc() != 0:
            raise AssertionError("the superblock must be block 0")
        self.data_rc = SparseCounts(int(sb.nr_data_blocks))
        #: shared leaves from <def>s, each holding a temporary reference
        self.sub_trees: dict[str, list[NodeSummary]] = {}
        self.roots: dict[int, int] = {}
        self.details: dict[int, DeviceDetails] = {}

    def add_def(self, name: str, runs: Runs) -> None:
        b = NodeBuilder(self.image, MAPPING_LEAF, self.data_rc.mapping_rc, shared=True)
        b.push_values(*_mapping_arrays(runs))
        self.sub_trees[name] = b.complete()

    def add_device(self, dev: DeviceIR) -> None:
        b = NodeBuilder(self.image, MAPPING_LEAF, self.data_rc.mapping_rc)
        pending: list[Runs] = []
        try:
            for item in dev.items:
                if isinstance(item, str):
                    if pending:
                        b.push_values(*_mapping_arrays(Runs.concat(pending)))
                        pending = []
                    b.push_nodes(self.sub_trees[item])
                else:
                    pending.append(item)
            if pending:
                b.push_values(*_mapping_arrays(Runs.concat(pending)))
        except ValueError as exc:
            raise InputError(f"device {dev.dev_id}: {exc}") from None
        did = int(dev.dev_id)
        self.roots[did] = build_btree(self.image, b.complete())
        self.details[did] = DeviceDetails(int(dev.mapped_blocks), int(dev.transaction),
                                          int(dev.creation_time), int(dev.snap_time))

    def finish(self) -> BuiltMetadata:
        image, sb, roots = self.image, self.sb, self.roots
        ids = np.array(sorted(roots), dtype=U64)
        details = pack_details(self.details[did] for did in ids.tolist())
        details_root = build_tree(image, DETAILS_LEAF, ids, details)
        mapping_root = build_tree(image, TOP_LEAF, ids,
                                  np.array([roots[i] for i in ids.tolist()], dtype=U64))

        # drop the temporary references of the <def> leaves; unused leaves release their values
        for name in sorted(self.sub_trees):
            for n in self.sub_trees[name]:
                if image.dec(n.block):
                    _, vals = decode_node(MAPPING_LEAF, image.get(n.block))
                    self.data_rc.mapping_rc(vals, -1)

        blocks, counts = self.data_rc.totals()
        data_sm = write_data_space_map(image, int(sb.nr_data_blocks), blocks, counts)
        pre_meta_sm = image.high_water
        meta_sm = write_metadata_space_map(image)
        superblock = Superblock(
            time=int(sb.time), trans_id=int(sb.transaction), data_sm=data_sm,
            metadata_sm=meta_sm, data_mapping_root=mapping_root,
            device_details_root=details_root, data_block_size=int(sb.data_block_size),
            metadata_nr_blocks=image.nr_blocks).pack()
        needed = image.high_water
        if image.overflowed or needed > image.nr_blocks:
            needed = _blocks_needed(pre_meta_sm, image)
        return BuiltMetadata(image, superblock, needed)


def _blocks_needed(pre_meta_sm: int, image: MetadataImage) -> int:
    """Smallest device (blocks) that holds the image: the metadata space map's own size
    (one bitmap per 16320 blocks, overflow nodes, index block) grows with the device."""
    ov = int(np.count_nonzero(image.counts >= 3))
    ov_nodes = 1 if ov <= 336 else -(-ov // 168) + 2
    n = pre_meta_sm + 2 + ov_nodes
    for _ in range(64):
        need = pre_meta_sm + -(-n // ENTRIES_PER_BITMAP) + ov_nodes + 1
        if need <= n:
            break
        n = need
    return n


# ----------------------------------------------------------------------------- output


@dataclass(slots=True)
class RestoreResult:
    metadata_blocks: int
    blocks_written: int
    nr_allocated: int


def restore(ir: PoolIR, output: str | os.PathLike[str], *,
            progress: Callable[[int], None] | None = None) -> RestoreResult:
    """Write fresh metadata for ``ir`` to an existing file or block device.

    The device is never grown; metadata nr_blocks = its size / 4096, clamped to 4,161,600.
    Validation and layout happen in memory first: an invalid input or a too small output
    raises before a single byte is written. ``progress(n)`` hears of each device's mappings
    as its tree is built.
    """
    validate_ir(ir)
    with devlock.hold(output, exclusive=True):
        return _restore_locked(ir, output, progress)


def _restore_locked(ir: PoolIR, output: str | os.PathLike[str],
                    progress: Callable[[int], None] | None) -> RestoreResult:
    fd, size = open_output(output)
    try:
        nr_blocks = min(size // BLOCK_SIZE, MAX_METADATA_BLOCKS)
        if nr_blocks < 1:
            raise OutputTooSmallError(f"{os.fspath(output)}: {size} bytes is too small",
                                      needed_bytes=_min_bytes(ir))
        built = build_metadata(ir, nr_blocks, validate=False, progress=progress)
        if built.blocks_needed > nr_blocks:
            needed = built.blocks_needed * BLOCK_SIZE
            qualifier = "" if built.exact else "at least "
            raise OutputTooSmallError(
                f"{os.fspath(output)} is too small: {size} bytes, the metadata needs "
                f"{qualifier}{needed} bytes ({built.blocks_needed} blocks of 4 KiB)",
                needed_bytes=needed)
        built.image.flush_to(fd, built.superblock)
        return RestoreResult(nr_blocks, built.image.high_water,
                             int(np.count_nonzero(built.image.counts[:nr_blocks])))
    finally:
        os.close(fd)


def _min_bytes(ir: PoolIR) -> int:
    return build_metadata(ir, 64, validate=False).blocks_needed * BLOCK_SIZE


# ----------------------------------------------------------------------------- input


def read_input(path: str | os.PathLike[str] | BinaryIO) -> PoolIR:
    """An XML (thin_dump 0.9 or 1.x) or JSON (dmimage) dump file -> IR, by the dump module's
    parsers (XML in thin_dump's own layout takes their bulk path). ``path`` may be a file
    already open (read from its start: dump/source.py's open_dump, for a pipe)."""
    from dmimage.thin.dump import parse_dump

    if not isinstance(path, (str, os.PathLike)):
        path.seek(0)
        return parse_dump(path)
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{p}: is a directory")
    if not p.exists():
        raise UsageError(f"{p}: no such file")
    return parse_dump(p)

