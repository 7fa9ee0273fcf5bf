"""Writing persistent-data metadata in bulk: an in-memory image, btrees built bottom-up,
both space maps, and a crash-safe flush to the output device.

The building blocks follow thin_restore 1.x's placement rules (thin-format.md §5 and §8), so a
restore lays blocks out the way the reference tool does:

* :class:`MetadataImage` hands out metadata blocks with a forward-moving cursor (a freed block
  is reused only after the cursor wrapped), keeps every block's reference count, and stores the
  written blocks as numpy arrays (whole 4 KiB rows) until :meth:`MetadataImage.flush_to`.
* :class:`NodeBuilder` packs sorted (key, value) arrays into leaves: full nodes while at least
  two nodes' worth of entries remain, the last two evened out; it can splice in pre-built
  (shared) leaves the way ``<ref>`` needs. :func:`build_btree` stacks internal levels on top.
* :func:`write_data_space_map` and :func:`write_metadata_space_map` write bitmaps, the overflow
  (ref count >= 3) tree and the index (a btree for data, one index block for metadata). The
  metadata space map counts its own blocks.

Nodes are made many at a time: keys and values are numpy arrays copied into a (nodes, 4096)
uint8 array, checksummed with the native crc32c (:func:`dmimage.format.checksum.seal`).
"""

from __future__ import annotations

import bisect
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from dmimage.errors import DeviceError, DmimageError
from dmimage.format.checksum import seal
from dmimage.format.constants import (
    BITMAP_HEADER_SIZE,
    BLOCK_SIZE,
    BTREE_HEADER_SIZE,
    BTREE_INTERNAL,
    BTREE_LEAF,
    ENTRIES_PER_BITMAP,
    MAX_METADATA_BITMAPS,
    MAX_METADATA_BLOCKS,
    SALT_BITMAP,
    SALT_BTREE_NODE,
    SALT_METADATA_INDEX,
    max_entries,
)
from dmimage.format.layouts import BTREE_HEADER_DTYPE, INDEX_ENTRY_DTYPE
from dmimage.format.superblock import SpaceMapRoot
from dmimage.format.values import mapping_blocks
from dmimage.ordered_write import Write, commit_last, fsync_all, pwrite_all

U8 = np.dtype("u1")
U32 = np.dtype("<u4")
U64 = np.dtype("<u8")


#: Raw 2-bit pair for a count (0, 1, 2, >=3): the even bit of each pair is the high bit.
_RAW_PAIR = np.array([0, 2, 1, 3], dtype=U8)


class OutOfMetadataSpace(DmimageError):
    """Internal signal: the image needs more blocks than the device has (see ``needed``)."""


@dataclass(slots=True)
class NodeKind:
    """What a tree's nodes hold: leaf flag, value dtype (its itemsize is the value size)."""

    is_leaf: bool
    dtype: np.dtype

    @property
    def value_size(self) -> int:
        return self.dtype.itemsize

    @property
    def max_entries(self) -> int:
        return max_entries(self.value_size)


INTERNAL = NodeKind(False, U64)
MAPPING_LEAF = NodeKind(True, U64)
REF_COUNT_LEAF = NodeKind(True, U32)
INDEX_LEAF = NodeKind(True, INDEX_ENTRY_DTYPE)


@dataclass(slots=True)
class NodeSummary:
    """A written node as its parent level sees it."""

    block: int
    key: int
    nr_entries: int
    #: Passed in pre-built (a <def> leaf): unpacking it must count its values again.
    shared: bool


# ----------------------------------------------------------------------------- the image


class MetadataImage:
    """Metadata blocks being built in memory, with their allocator and reference counts.

    ``nr_blocks`` is the metadata device size in blocks (clamped to the format's maximum).
    Allocation past it does not fail at once: the image grows virtually and :attr:`overflowed`
    is set, so the caller can report the size it would need before writing anything.
    """

    def __init__(self, nr_blocks: int):
        self.nr_blocks = min(int(nr_blocks), MAX_METADATA_BLOCKS)
        cap = max(self.nr_blocks, 64)
        self.counts = np.zeros(cap, dtype=U32)
        self._allocated = np.zeros(cap, dtype=bool)
        self.cursor = 0
        self.overflowed = False
        self._wrapped = False
        self._starts: list[int] = []
        self._segments: list[np.ndarray] = []

    # -- allocation ----------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        if need <= len(self.counts):
            return
        cap = max(need, 2 * len(self.counts))
        self.counts = np.concatenate([self.counts, np.zeros(cap - len(self.counts), U32)])
        self._allocated = np.concatenate(
            [self._allocated, np.zeros(cap - len(self._allocated), bool)])

    def alloc(self) -> int:
        """Allocate one block (count 1); its number."""
        return int(self._alloc_locs(1)[0])

    def alloc_many(self, k: int) -> np.ndarray:
        """Allocate ``k`` blocks (count 1 each); their numbers, an int64 array."""
        return self._alloc_locs(k)

    def _alloc_locs(self, k: int) -> np.ndarray:
        if k == 0:
            return np.empty(0, np.int64)
        start = self.cursor
        if not self._wrapped and start + k <= self.nr_blocks:
            locs = np.arange(start, start + k, dtype=np.int64)
            self.cursor = start + k
        else:
            locs = np.array([self._alloc_one() for _ in range(k)], dtype=np.int64)
        self.counts[locs] = 1
        self._allocated[locs] = True
        return locs

    def _alloc_one(self) -> int:
        """thin_restore's core space map: first free block from the cursor, then from 0."""
        n = self.nr_blocks
        if self.overflowed:  # the device is full: only the size still needed matters
            b = max(self.cursor, n)
            self._grow(b + 1)
            self.cursor = b + 1
            self.counts[b] = 1
            return b
        if self.cursor < n:
            free = np.flatnonzero(self.counts[self.cursor:n] == 0)
            if len(free):
                b = self.cursor + int(free[0])
                self.cursor = b + 1
                self.counts[b] = 1
                return b
        free = np.flatnonzero(self.counts[:min(self.cursor, n)] == 0)
        if len(free):
            self._wrapped = True
            b = int(free[0])
            self.cursor = b + 1
            self.counts[b] = 1
            return b
        # Out of space: keep going past the end so the caller can say how much is needed.
        self.overflowed = True
        b = max(self.cursor, n)
        self._grow(b + 1)
        self.cursor = b + 1
        self.counts[b] = 1
        return b

    def inc(self, block: int, by: int = 1) -> None:
        self.counts[block] += by

    def dec(self, block: int) -> bool:
        """Drop one reference; True when the block became free."""
        c = int(self.counts[block])
        if c == 0:
            raise AssertionError(f"metadata block {block} freed twice")
        self.counts[block] = c - 1
        return c == 1

    def take_allocations(self) -> np.ndarray:
        """Blocks allocated since the last call (freed ones included), ascending."""
        locs = np.flatnonzero(self._allocated)
        self._allocated[:] = False
        return locs

    @property
    def high_water(self) -> int:
        """One past the highest block allocated so far."""
        return self.cursor if not self._wrapped else max(self.cursor, self._highest())

    def _highest(self) -> int:
        nz = np.flatnonzero(self.counts)
        return int(nz[-1]) + 1 if len(nz) else 0

    # -- block contents ------------------------------------------------------------------
    def put(self, locs: np.ndarray | int, blocks: np.ndarray) -> None:
        """Store finished (sealed) blocks: ``blocks`` is (n, 4096) uint8, row i at locs[i]."""
        if isinstance(locs, (int, np.integer)):
            locs = np.array([locs], dtype=np.int64)
        blocks = blocks.reshape(-1, BLOCK_SIZE)
        n = len(locs)
        if n == 0:
            return
        # split into runs of consecutive locations
        brk = np.flatnonzero(np.diff(locs) != 1) + 1
        bounds = [0, *brk.tolist(), n]
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            start = int(locs[a])
            i = bisect.bisect_left(self._starts, start)
            self._starts.insert(i, start)
            self._segments.insert(i, blocks[a:b])

    def get(self, loc: int) -> np.ndarray:
        """The stored content of block ``loc`` (latest write wins)."""
        i = bisect.bisect_right(self._starts, loc) - 1
        while i >= 0:
            start, seg = self._starts[i], self._segments[i]
            if start <= loc < start + len(seg):
                block: np.ndarray = seg[loc - start]
                return block
            i -= 1
        raise KeyError(loc)

    def segments(self) -> list[tuple[int, np.ndarray]]:
        return list(zip(self._starts, self._segments, strict=True))

    # -- output --------------------------------------------------------------------------
    def flush_to(self, fd: int, superblock: np.ndarray | bytes | bytearray,
                 progress: Callable[[int], None] | None = None) -> None:
        """Crash-safe write: block 0 zeroed (see :func:`invalidate_superblock`), every block
        but the superblock, fsync, the superblock, fsync.

        The caller has checked that every block fits the device."""
        invalidate_superblock(fd)
        sb = bytes(superblock)
        assert len(sb) == BLOCK_SIZE
        commit_last([fd], self._body_writes(fd, progress), [Write(fd, 0, [memoryview(sb)])])

    def _body_writes(self, fd: int, progress: Callable[[int], None] | None
                     ) -> Iterator[Write]:
        """Every written block but block 0, as writes of up to 512 runs or 64 MiB each."""
        pending: list[memoryview] = []
        pending_off = -1
        pending_end = -1
        pending_bytes = 0
        for start, seg in self.segments():
            if start == 0:
                seg = seg[1:]
                start = 1
                if not len(seg):
                    continue
            off = start * BLOCK_SIZE
            if off != pending_end or len(pending) >= 512 or pending_bytes >= (64 << 20):
                if pending:
                    yield Write(fd, pending_off, pending)
                    if progress:
                        progress(pending_bytes)
                pending, pending_bytes = [], 0
                pending_off = off
            pending.append(np.ascontiguousarray(seg).data.cast("B"))
            pending_bytes += seg.nbytes
            pending_end = off + seg.nbytes
        if pending:
            yield Write(fd, pending_off, pending)
            if progress:
                progress(pending_bytes)


def open_output(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Open an existing file or block device for writing: (fd, size in bytes)."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DeviceError(f"{p}: no such file (create it with the metadata size you want, "
                          "e.g. truncate -s 16M FILE)") from None
    except OSError as exc:
        raise DeviceError(f"{p}: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DeviceError(f"{p}: not a regular file or block device")
    try:
        fd = os.open(p, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DeviceError(f"{p}: cannot open for writing: {exc.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else os.fstat(fd).st_size
    except OSError as exc:
        os.close(fd)
        raise DeviceError(f"{p}: {exc.strerror}") from None
    return fd, size


def write_new_metadata(output: str, build: Callable[[int], tuple[MetadataImage, bytes]]
                       ) -> tuple[MetadataImage, int]:
    """Build metadata for the existing file or device ``output`` (never grown) and write it
    crash-safely: ``build(nr_blocks)`` returns the image and its superblock; an image that
    does not fit raises OutputTooSmallError before anything is written. Holds the output's
    exclusive lock throughout. Returns the image and the device's size in blocks."""
    from dmimage import devlock
    from dmimage.errors import OutputTooSmallError

    with devlock.hold(output, exclusive=True):
        fd, size = open_output(output)
        try:
            nr_blocks = min(size // BLOCK_SIZE, MAX_METADATA_BLOCKS)
            image, superblock = build(max(nr_blocks, 1))
            if image.overflowed or nr_blocks < 1:
                need = (image.high_water + 1) * BLOCK_SIZE
                raise OutputTooSmallError(f"{output} is too small: {size} bytes, the metadata "
                                          f"needs at least {need} bytes", needed_bytes=need)
            image.flush_to(fd, superblock)
            return image, nr_blocks
        finally:
            os.close(fd)


def invalidate_superblock(fd: int) -> None:
    """Zero block 0 and flush, if it holds anything: the first step of writing a new pool over
    an old one. The new pool's blocks overwrite the old pool's, so until the new superblock
    lands, a crash must find no superblock rather than the old one pointing at a mixture."""
    try:
        old = os.pread(fd, BLOCK_SIZE, 0)
    except OSError as exc:
        raise DeviceError(f"read of block 0 failed: {exc.strerror}") from None
    if any(old):
        pwrite_all(fd, [memoryview(bytes(BLOCK_SIZE))], 0)
        _fsync(fd)


def _fsync(fd: int) -> None:
    fsync_all([fd])


# ----------------------------------------------------------------------------- nodes


def encode_nodes(kind: NodeKind, keys: np.ndarray, values: np.ndarray, sizes: list[int],
                 locs: np.ndarray) -> np.ndarray:
    """Sealed btree nodes: node i holds the next sizes[i] entries and lives at locs[i]."""
    m = len(sizes)
    out = np.zeros((m, BLOCK_SIZE), dtype=U8)
    maxe = kind.max_entries
    vs = kind.value_size
    voff = BTREE_HEADER_SIZE + 8 * maxe
    hdr = np.zeros(m, dtype=BTREE_HEADER_DTYPE)
    hdr["flags"] = BTREE_LEAF if kind.is_leaf else BTREE_INTERNAL
    hdr["blocknr"] = locs
    hdr["nr_entries"] = sizes
    hdr["max_entries"] = maxe
    hdr["value_size"] = vs
    out[:, :BTREE_HEADER_SIZE] = hdr.view(U8).reshape(m, BTREE_HEADER_SIZE)
    kbytes = np.ascontiguousarray(keys, dtype=U64).view(U8)
    vbytes = np.ascontiguousarray(values).view(U8)
    # groups of equal-sized consecutive nodes are copied with one reshape each
    i = pos = 0
    while i < m:
        s = sizes[i]
        j = i
        while j < m and sizes[j] == s:
            j += 1
        g = j - i
        if s:
            out[i:j, BTREE_HEADER_SIZE:BTREE_HEADER_SIZE + 8 * s] = \
                kbytes[8 * pos:8 * (pos + g * s)].reshape(g, 8 * s)
            out[i:j, voff:voff + vs * s] = vbytes[vs * pos:vs * (pos + g * s)].reshape(g, vs * s)
        pos += g * s
        i = j
    for r in range(m):
        seal(out[r], SALT_BTREE_NODE)
    return out


def decode_node(kind: NodeKind, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, values) of a node written by :func:`encode_nodes`."""
    nr = int(block[16:20].view(U32)[0])
    keys = block[BTREE_HEADER_SIZE:BTREE_HEADER_SIZE + 8 * nr].view(U64).copy()
    voff = BTREE_HEADER_SIZE + 8 * kind.max_entries
    values = block[voff:voff + kind.value_size * nr].view(kind.dtype).copy()
    return keys, values


class NodeBuilder:
    """Packs ascending (key, value) arrays into nodes of one level, as thin_restore 1.x does.

    Full nodes are emitted while more than two nodes' worth of entries are pending; the
    remainder becomes one node, or two evened-out ones. Pre-built leaves (``<def>`` runs) are
    spliced in by :meth:`push_nodes`, or unpacked when they would leave a neighbour underfull.

    ``value_rc(values, +1|-1)`` is told about every value that gains or loses a holder (the
    data space map for mapping leaves).
    """

    def __init__(self, image: MetadataImage, kind: NodeKind,
                 value_rc: Callable[[np.ndarray, int], None] | None = None,
                 shared: bool = False):
        self.w = image
        self.kind = kind
        self.value_rc = value_rc
        self.shared = shared
        self.max = kind.max_entries
        self.half = self.max // 2
        self.keys = np.empty(0, U64)
        self.vals = np.empty(0, kind.dtype)
        self.nodes: list[NodeSummary] = []
        self.last_key: int | None = None

    # -- values ---------------------------------------------------------------------------
    def push_values(self, keys: np.ndarray, values: np.ndarray) -> None:
        n = len(keys)
        if n == 0:
            return
        keys = np.asarray(keys, dtype=U64)
        if self.last_key is not None and int(keys[0]) <= self.last_key:
            raise ValueError("keys out of order")
        if n > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise ValueError("keys out of order")
        self.last_key = int(keys[-1])
        if len(self.nodes) == 1 and self.nodes[0].nr_entries < self.half:
            self._unshift()
        if self.value_rc is not None:
            self.value_rc(values, 1)
        self.keys = np.concatenate([self.keys, keys]) if len(self.keys) else keys
        self.vals = np.concatenate([self.vals, values]) if len(self.vals) else \
            np.asarray(values, dtype=self.kind.dtype)
        total = len(self.keys)
        if total > 2 * self.max:
            # one value at a time, a full node leaves whenever 2*max are pending
            k = -(-(total - 2 * self.max) // self.max)
            self._emit_sizes([self.max] * k)

    def push_value(self, key: int, value: int | bytes) -> None:
        self.push_values(np.array([key], dtype=U64), np.array([value], dtype=self.kind.dtype))

    # -- pre-built nodes ------------------------------------------------------------------
    def push_nodes(self, nodes: list[NodeSummary]) -> None:
        if not nodes:
            raise ValueError("no nodes to push")
        if len(nodes) == 1 and not self.nodes and not len(self.keys):
            self.w.inc(nodes[0].block)
            self.nodes.append(nodes[0])
            return
        if len(nodes) > 1 and any(n.nr_entries < self.half for n in nodes):
            raise ValueError("under populated shared node")
        if self.last_key is not None and nodes[0].key <= self.last_key:
            raise ValueError("keys out of order")
        if len(self.nodes) == 1 and self.nodes[0].nr_entries < self.half:
            self._unshift()
        if len(self.keys) and len(self.keys) < self.half:
            self._append_node_values(nodes[0])
            if len(nodes) > 1:
                self._emit_all()
                for n in nodes[1:]:
                    self.w.inc(n.block)
                    self.nodes.append(n)
        else:
            self._emit_all()
            if nodes[0].nr_entries < self.half:
                self._append_node_values(nodes[0])
            else:
                for n in nodes:
                    self.w.inc(n.block)
                    self.nodes.append(n)
        self.last_key = nodes[-1].key

    def complete(self) -> list[NodeSummary]:
        if len(self.keys) and len(self.keys) < self.half and self.nodes:
            self._unshift()
        self._emit_all()
        if not self.nodes:
            self._emit_sizes([0])
        return self.nodes

    # -- internals ------------------------------------------------------------------------
    def _read(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        return decode_node(self.kind, self.w.get(block))

    def _append_node_values(self, node: NodeSummary) -> None:
        keys, vals = self._read(node.block)
        if self.value_rc is not None:
            self.value_rc(vals, 1)
        self.keys = np.concatenate([self.keys, keys])
        self.vals = np.concatenate([self.vals, vals])

    def _unshift(self) -> None:
        last = self.nodes.pop()
        keys, vals = self._read(last.block)
        self.w.dec(last.block)
        if last.shared and self.value_rc is not None:
            self.value_rc(vals, 1)
        self.keys = np.concatenate([keys, self.keys])
        self.vals = np.concatenate([vals, self.vals])

    def _emit_all(self) -> None:
        n = len(self.keys)
        if n == 0:
            return
        if n <= self.max:
            self._emit_sizes([n])
        elif n <= 2 * self.max:
            self._emit_sizes([n // 2, n - n // 2])
        else:
            raise AssertionError("more than two nodes' worth of values pending")

    def _emit_sizes(self, sizes: list[int]) -> None:
        total = sum(sizes)
        locs = self.w.alloc_many(len(sizes))
        keys, vals = self.keys[:total], self.vals[:total]
        blocks = encode_nodes(self.kind, keys, vals, sizes, locs)
        self.w.put(locs, blocks)
        firsts = np.cumsum([0, *sizes[:-1]])
        for loc, s, f in zip(locs.tolist(), sizes, firsts.tolist(), strict=True):
            self.nodes.append(NodeSummary(loc, int(keys[f]) if s else 0, s, self.shared))
        self.keys, self.vals = self.keys[total:], self.vals[total:]


def build_btree(image: MetadataImage, leaves: list[NodeSummary]) -> int:
    """Stack internal levels (252 per node, last two evened out) on leaves; the root block."""
    nodes = leaves
    while len(nodes) > 1:
        b = NodeBuilder(image, INTERNAL)
        b.push_values(np.array([n.key for n in nodes], dtype=U64),
                      np.array([n.block for n in nodes], dtype=U64))
        nodes = b.complete()
    return nodes[0].block


def build_tree(image: MetadataImage, kind: NodeKind, keys: np.ndarray, values: np.ndarray) -> int:
    """A whole (unshared) btree from ascending keys; returns the root block."""
    b = NodeBuilder(image, kind)
    b.push_values(keys, values)
    return build_btree(image, b.complete())


# ----------------------------------------------------------------------------- space maps


def encode_bitmaps(raw_pairs: np.ndarray, locs: np.ndarray) -> np.ndarray:
    """Sealed bitmap blocks from raw 2-bit pair values (uint8, len = n * 16320)."""
    n = len(locs)
    out = np.zeros((n, BLOCK_SIZE), dtype=U8)
    q = raw_pairs.reshape(n, -1, 4)
    payload = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    out[:, BITMAP_HEADER_SIZE:] = payload
    out[:, 8:16] = np.asarray(locs, dtype=U64).reshape(n, 1).view(U8)
    for r in range(n):
        seal(out[r], SALT_BITMAP)
    return out


def _bitmap_stats(capped: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """nr_free and none_free_before of n bitmaps from per-entry counts (padded, capped)."""
    used = capped.reshape(n, ENTRIES_PER_BITMAP) != 0
    nr_free = ENTRIES_PER_BITMAP - used.sum(axis=1)
    free = ~used
    first = np.where(free.any(axis=1), free.argmax(axis=1), ENTRIES_PER_BITMAP)
    return nr_free.astype(U32), first.astype(U32)


class SparseCounts:
    """Reference counts of data blocks, accumulated as signed arrays and summed once."""

    def __init__(self, nr_blocks: int):
        self.nr_blocks = nr_blocks
        self._parts: list[tuple[np.ndarray, int]] = []

    def add(self, blocks: np.ndarray, sign: int) -> None:
        if len(blocks):
            self._parts.append((np.asarray(blocks, dtype=U64), sign))

    def mapping_rc(self, values: np.ndarray, sign: int) -> None:
        """RefCounter for mapping leaves: each value references its data block."""
        self.add(mapping_blocks(values), sign)

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(blocks, counts) with counts > 0, blocks ascending."""
        if not self._parts:
            return np.empty(0, U64), np.empty(0, np.int64)
        pos = [p for p, s in self._parts if s > 0]
        neg = [p for p, s in self._parts if s < 0]
        allp = np.concatenate(pos) if pos else np.empty(0, U64)
        if self.nr_blocks <= max(1 << 24, 4 * len(allp)):
            c = np.bincount(allp.astype(np.int64), minlength=self.nr_blocks)
            if neg:
                c -= np.bincount(np.concatenate(neg).astype(np.int64), minlength=self.nr_blocks)
            blocks = np.flatnonzero(c)
            return blocks.astype(U64), c[blocks]
        keys = np.concatenate([allp, *neg])
        w = np.concatenate([np.ones(len(allp), np.int64)] +
                           [-np.ones(len(n), np.int64) for n in neg])
        u, inv = np.unique(keys, return_inverse=True)
        c = np.bincount(inv, weights=w, minlength=len(u)).astype(np.int64)
        keep = c != 0
        return u[keep], c[keep]


def write_data_space_map(image: MetadataImage, nr_blocks: int, blocks: np.ndarray,
                         counts: np.ndarray) -> SpaceMapRoot:
    """Bitmaps (with overflow leaves emitted among them), overflow tree, index btree."""
    if len(counts) and int(counts.min()) < 0:
        raise AssertionError("negative data reference count")
    nb = -(-nr_blocks // ENTRIES_PER_BITMAP)
    ov = counts >= 3
    ov_blocks, ov_counts = blocks[ov], counts[ov].astype(U32)
    overflow = NodeBuilder(image, REF_COUNT_LEAF)
    if len(ov_blocks) <= 2 * overflow.max:
        overflow.push_values(ov_blocks, ov_counts)
        locs = image.alloc_many(nb)
    else:
        locs = np.empty(nb, np.int64)
        bm_of = (ov_blocks // np.uint64(ENTRIES_PER_BITMAP)).astype(np.int64)
        cuts = np.searchsorted(bm_of, np.arange(nb + 1))
        for bm in range(nb):
            a, b = cuts[bm], cuts[bm + 1]
            if b > a:
                overflow.push_values(ov_blocks[a:b], ov_counts[a:b])
            locs[bm] = image.alloc()
    nr_free = np.empty(nb, U32)
    nfb = np.empty(nb, U32)
    batch = 1024  # bitmaps per batch: bounds the per-entry scratch arrays
    for s in range(0, nb, batch):
        e = min(nb, s + batch)
        lo, hi = s * ENTRIES_PER_BITMAP, e * ENTRIES_PER_BITMAP
        capped = np.zeros(hi - lo, dtype=U8)
        i0, i1 = np.searchsorted(blocks, [lo, hi])
        capped[(blocks[i0:i1] - np.uint64(lo)).astype(np.int64)] = np.minimum(counts[i0:i1], 3)
        nr_free[s:e], nfb[s:e] = _bitmap_stats(capped, e - s)
        image.put(locs[s:e], encode_bitmaps(_RAW_PAIR[capped], locs[s:e]))
    ref_count_root = build_btree(image, overflow.complete())
    entries = np.zeros(nb, dtype=INDEX_ENTRY_DTYPE)
    entries["blocknr"] = locs
    entries["nr_free"] = nr_free
    entries["none_free_before"] = nfb
    bitmap_root = build_tree(image, INDEX_LEAF, np.arange(nb, dtype=U64), entries)
    return SpaceMapRoot(nr_blocks, int(len(blocks)), bitmap_root, ref_count_root)


def write_metadata_space_map(image: MetadataImage) -> SpaceMapRoot:
    """Bitmaps, overflow tree and index block of the metadata space map, counting themselves.

    Placement as thin_restore 1.x: a bitmap is allocated once the walk over the allocated
    blocks leaves it, then the bitmaps no allocation touched, the overflow tree, and the
    index block last.
    """
    nr_blocks = image.nr_blocks
    nb = -(-nr_blocks // ENTRIES_PER_BITMAP)
    if nb > MAX_METADATA_BITMAPS:
        raise AssertionError("metadata device larger than the index block can describe")
    allocated = image.take_allocations()
    counts_at = image.counts[allocated]
    ov_sel = counts_at >= 3
    ov_blocks = allocated[ov_sel].astype(U64)
    ov_counts = counts_at[ov_sel].astype(U32)
    overflow = NodeBuilder(image, REF_COUNT_LEAF)
    used_bms = np.unique(allocated // ENTRIES_PER_BITMAP) if len(allocated) else \
        np.zeros(1, np.int64)
    bm_locs: list[int] = []
    if len(ov_blocks) <= 2 * overflow.max:
        overflow.push_values(ov_blocks, ov_counts)
        for _ in used_bms:
            bm_locs.append(image.alloc())
    else:
        # interleave: the overflow leaves emitted while walking bitmap i come before it
        bm_of_ov = (ov_blocks // np.uint64(ENTRIES_PER_BITMAP)).astype(np.int64)
        for bm in used_bms.tolist():
            sel = bm_of_ov == bm
            overflow.push_values(ov_blocks[sel], ov_counts[sel])
            bm_locs.append(image.alloc())
    for _ in range(len(used_bms), nb):
        bm_locs.append(image.alloc())
    ref_count_root = build_btree(image, overflow.complete())
    index_loc = image.alloc()
    # final counts: everything allocated during this stage has count 1
    total = nb * ENTRIES_PER_BITMAP
    counts = image.counts[:min(len(image.counts), total)]
    capped = np.zeros(total, dtype=U8)
    capped[:len(counts)] = np.minimum(counts, 3)
    capped[nr_blocks:] = 0
    nr_free, nfb = _bitmap_stats(capped, nb)
    locs = np.array(bm_locs, dtype=np.int64)
    # bitmap i of the index describes blocks i*16320..; used_bms first, then the rest
    order = list(used_bms.tolist()) + [b for b in range(nb) if b not in set(used_bms.tolist())]
    loc_of_bm = np.empty(nb, np.int64)
    loc_of_bm[np.array(order[:nb], dtype=np.int64)] = locs[:nb]
    for bm in range(nb):
        image.put(int(loc_of_bm[bm]), encode_bitmaps(
            _RAW_PAIR[capped[bm * ENTRIES_PER_BITMAP:(bm + 1) * ENTRIES_PER_BITMAP]],
            loc_of_bm[bm:bm + 1]))
    index = np.zeros(BLOCK_SIZE, dtype=U8)
    index[8:16] = np.array([index_loc], dtype=U64).view(U8)
    entries = np.zeros(nb, dtype=INDEX_ENTRY_DTYPE)
    entries["blocknr"] = loc_of_bm
    entries["nr_free"] = nr_free
    entries["none_free_before"] = nfb
    index[16:16 + entries.nbytes] = entries.view(U8)
    seal(index, SALT_METADATA_INDEX)
    image.put(index_loc, index)
    nr_allocated = int(np.count_nonzero(image.counts[:nr_blocks]))
    return SpaceMapRoot(nr_blocks, nr_allocated, index_loc, ref_count_root)
