"""cache_restore: dm-cache metadata from cache_dump's XML.

The result is cache_restore 1.1's metadata block for block (build_content: the same blocks
in the same places with the same contents, its read-miss counter of 9 included), but for the
unused tails of array blocks and btree nodes, which 1.1 fills with whatever its buffers held
(pieces of the XML it read) and dmimage with zeros, and so the checksums. Every array is
sized to the cache (unmapped and hint-less entries zero), the discard bitset is empty, the
clean-shutdown flag is set unless asked otherwise, policy version 2.0.0. Like every dmimage
writer it is crash-safe: block 0 is zeroed first and the superblock written last, after a
flush; the output is never grown.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

import numpy as np

from dmimage.errors import InputError
from dmimage.format.cache import (
    CACHE_MAGIC,
    CACHE_SUPERBLOCK,
    FLAG_CLEAN_SHUTDOWN,
    M_DIRTY,
    M_VALID,
    MAPPING_FLAG_BITS,
    POLICY_NAME_SIZE,
    SALT_CACHE_SUPERBLOCK,
)
from dmimage.format.checksum import seal
from dmimage.format.constants import BLOCK_SIZE
from dmimage.pdata.writer import MetadataImage, write_metadata_space_map, write_new_metadata
from dmimage.xml_attrs import bool_attr, int_attr, known_attrs, xml_events

#: smq's policy version, which cache_restore 1.1 writes for every policy.
POLICY_VERSION = (2, 0, 0)
#: The read-miss counter cache_restore 1.1 writes (the kernel's statistics start from it).
READ_MISSES = 9


@dataclass
class CacheIR:
    """What cache_dump's XML says."""

    block_size: int
    nr_cache_blocks: int
    policy: str
    hint_width: int
    #: cache block -> (origin block, dirty)
    mappings: dict[int, tuple[int, bool]] = field(default_factory=dict)
    hints: dict[int, bytes] = field(default_factory=dict)


def parse_xml(path: str) -> CacheIR:
    """Stream the XML (iterparse); any malformation is an InputError naming what is wrong."""
    ir: CacheIR | None = None
    for _event, elem in xml_events(path):
        tag = elem.tag
        if tag == "superblock":
            if ir is not None:
                raise InputError("duplicated <superblock>")
            known_attrs(elem, {"uuid", "block_size", "nr_cache_blocks", "policy",
                               "hint_width"})
            ir = CacheIR(int_attr(elem, "block_size", 2**32),
                         int_attr(elem, "nr_cache_blocks", 2**32),
                         elem.get("policy", ""), int_attr(elem, "hint_width", 2**32))
            if len(ir.policy.encode()) > POLICY_NAME_SIZE:
                raise InputError(f"<superblock> policy {ir.policy!r}: longer than "
                                 f"{POLICY_NAME_SIZE} bytes")
        elif tag == "mapping":
            if ir is None:
                raise InputError("<mapping> outside <superblock>")
            known_attrs(elem, {"cache_block", "origin_block", "dirty"})
            c = int_attr(elem, "cache_block", ir.nr_cache_blocks)
            o = int_attr(elem, "origin_block", 2**(64 - MAPPING_FLAG_BITS))
            d = bool_attr(elem, "dirty")
            if c in ir.mappings:
                raise InputError(f"cache block {c} mapped twice")
            ir.mappings[c] = (o, d)
        elif tag == "hint":
            if ir is None:
                raise InputError("<hint> outside <superblock>")
            known_attrs(elem, {"cache_block", "data"})
            c = int_attr(elem, "cache_block", ir.nr_cache_blocks)
            try:
                data = base64.b64decode(elem.get("data", ""), validate=True)
            except (binascii.Error, ValueError):
                raise InputError(f"<hint cache_block=\"{c}\">: data is not base64") from None
            if len(data) != ir.hint_width:
                raise InputError(f"<hint cache_block=\"{c}\">: {len(data)} bytes, the hint "
                                 f"width is {ir.hint_width}")
            ir.hints[c] = data
        elif tag not in ("mappings", "hints", "discards", "discard"):
            raise InputError(f"unknown element <{tag}>")
    if ir is None:
        raise InputError(f"{path}: no <superblock>")
    return ir


@dataclass(frozen=True)
class BuiltCache:
    image: MetadataImage
    superblock: bytes


@dataclass(frozen=True)
class CacheContent:
    """What the metadata says, one array entry per cache block: what restore and repair
    write."""

    block_size: int
    policy: str
    hint_width: int
    origin: np.ndarray  # uint64
    valid: np.ndarray  # bool
    dirty: np.ndarray  # bool (only where valid)
    hints: np.ndarray  # uint8, (n, hint_width)
    #: cache blocks the XML gives a hint for (None: every mapped one, as cache_dump writes);
    #: only where 1.1 writes the hint array's blocks depends on it
    hinted: np.ndarray | None = None

    @property
    def nr_cache_blocks(self) -> int:
        return len(self.origin)


def ir_content(ir: CacheIR) -> CacheContent:
    n = ir.nr_cache_blocks
    origin = np.zeros(n, np.uint64)
    valid = np.zeros(n, bool)
    dirty = np.zeros(n, bool)
    if ir.mappings:
        at = np.fromiter(ir.mappings.keys(), np.int64, len(ir.mappings))
        od = np.array(list(ir.mappings.values()), dtype=np.uint64).reshape(-1, 2)
        origin[at], valid[at], dirty[at] = od[:, 0], True, od[:, 1].astype(bool)
    hints = np.zeros((n, ir.hint_width), np.uint8)
    hinted = np.zeros(n, bool)
    if ir.hints:
        at = np.fromiter(ir.hints.keys(), np.int64, len(ir.hints))
        hinted[at] = True
        if ir.hint_width:  # every hint is hint_width bytes (parse_xml checks)
            hints[at] = np.frombuffer(b"".join(ir.hints.values()), np.uint8).reshape(
                -1, ir.hint_width)
    return CacheContent(ir.block_size, ir.policy, ir.hint_width, origin, valid, dirty, hints,
                        hinted)


def build_cache(ir: CacheIR, nr_blocks: int, *, version: int = 2,
                clean_shutdown: bool = True) -> BuiltCache:
    return build_content(ir_content(ir), nr_blocks, version=version,
                         clean_shutdown=clean_shutdown)


def _emissions(pushes: np.ndarray, per: int, nblocks: int) -> np.ndarray:
    """For each array block, the index into ``pushes`` (ascending entry indices pushed one
    after another) of the push that makes 1.1's array builder write it: the first push into
    a later block; ``len(pushes)`` for blocks only completion writes."""
    first_later = np.searchsorted(pushes // per, np.arange(nblocks), side="right")
    return first_later.astype(np.int64)


def _dirty_words(dirty: np.ndarray) -> np.ndarray:
    """The dirty bitset's words (version 2) as little-endian u64 rows."""
    n = len(dirty)
    return np.packbits(np.concatenate([dirty, np.zeros(-n % 64, bool)]),
                       bitorder="little").reshape(-1, 8)


def build_content(cc: CacheContent, nr_blocks: int, *, version: int = 2,
                  clean_shutdown: bool = True) -> BuiltCache:
    """Metadata as cache_restore 1.1 lays it out, block for block, for XML in cache_dump's
    order (mappings, then hints, each in cache-block order).

    1.1 writes each array's blocks as the XML streams: an array block when the first entry
    of a later block arrives (gaps filled with empty entries), the rest when the superblock
    ends; then each array's btree, in the order mapping array, dirty bitset (version 2: its
    words pushed as dirty mappings move on to a later word), hint array (4-byte values even
    for hint width 0); the discard bitset (empty) right after the superblock; the space map
    last."""
    from dmimage.pdata.array import array_tree, max_entries, nr_array_blocks, put_array_blocks

    image = MetadataImage(nr_blocks)
    image.alloc()  # block 0: the superblock
    n = cc.nr_cache_blocks
    discard_root = array_tree(image, np.zeros(0, np.int64))
    dirty = cc.dirty & cc.valid
    flags = np.where(cc.valid, np.uint64(M_VALID), np.uint64(0))
    if version == 1:
        flags |= np.where(dirty, np.uint64(M_DIRTY), np.uint64(0))
    maps = np.where(cc.valid, cc.origin << np.uint64(MAPPING_FLAG_BITS), np.uint64(0)) | flags
    map_rows = maps.astype("<u8").view(np.uint8).reshape(n, 8)
    width = cc.hint_width
    hint_rows = np.ascontiguousarray(cc.hints, np.uint8) if width else \
        np.zeros((n, 4), np.uint8)  # 1.1 writes 4-byte hints whatever the width
    words = _dirty_words(dirty) if version >= 2 else np.zeros((0, 8), np.uint8)

    # the mapping section: per mapping, a dirty word push (version 2) then the mapping push
    mapped = np.flatnonzero(cc.valid)
    per8 = max_entries(8)
    nmap = nr_array_blocks(n, 8)
    map_at = _emissions(mapped, per8, nmap)
    events = [(map_at, np.ones(nmap, np.int64), np.zeros(nmap, np.int64),
               np.arange(nmap))]  # (time, order within a mapping, array, block)
    ndirty = nr_array_blocks(len(words), 8)
    if version >= 2:
        d = np.flatnonzero(cc.valid & dirty)
        w = d >> 6
        prev = np.concatenate([[0], w[:-1]])
        moves = np.flatnonzero(w != prev)  # a push of the word left behind
        when = np.searchsorted(mapped, d[moves])  # the mapping that makes it
        pushed = prev[moves]
        dirty_at = np.searchsorted(pushed // per8, np.arange(ndirty), side="right")
        dirty_time = np.where(dirty_at < len(when),
                              when[np.minimum(dirty_at, max(len(when) - 1, 0))]
                              if len(when) else len(mapped), len(mapped))
        events.append((dirty_time.astype(np.int64), np.zeros(ndirty, np.int64),
                       np.ones(ndirty, np.int64), np.arange(ndirty)))
    t = np.concatenate([e[0] for e in events])
    sub = np.concatenate([e[1] for e in events])
    arr = np.concatenate([e[2] for e in events])
    blk = np.concatenate([e[3] for e in events])
    during = t < len(mapped)
    order = np.lexsort((blk[during], sub[during], t[during]))
    map_locs = np.full(nmap, -1, np.int64)
    dirty_locs = np.full(ndirty, -1, np.int64)
    locs = image.alloc_many(int(during.sum()))
    for loc, a, b in zip(locs.tolist(), arr[during][order].tolist(), blk[during][order].tolist(),
                         strict=True):
        (map_locs if a == 0 else dirty_locs)[b] = loc
    # the hint section
    hvs = hint_rows.shape[1]
    perh = max_entries(hvs)
    nhint = nr_array_blocks(n, hvs)
    hinted = np.flatnonzero(cc.valid if cc.hinted is None else cc.hinted)
    hint_locs = np.full(nhint, -1, np.int64)
    early = np.flatnonzero(_emissions(hinted, perh, nhint) < len(hinted))
    hint_locs[early] = image.alloc_many(len(early))
    # the end of the superblock: each array completed, then its btree
    rest = np.flatnonzero(map_locs < 0)
    map_locs[rest] = image.alloc_many(len(rest))
    put_array_blocks(image, map_rows, map_locs)
    mapping_root = array_tree(image, map_locs)
    dirty_root = 0
    if version >= 2:
        # the last dirty word (or word 0) is pushed now: that only completes blocks
        rest = np.flatnonzero(dirty_locs < 0)
        dirty_locs[rest] = image.alloc_many(len(rest))
        put_array_blocks(image, words, dirty_locs)
        dirty_root = array_tree(image, dirty_locs)
    rest = np.flatnonzero(hint_locs < 0)
    hint_locs[rest] = image.alloc_many(len(rest))
    put_array_blocks(image, hint_rows, hint_locs)
    hint_root = array_tree(image, hint_locs)
    sm_root = write_metadata_space_map(image)
    sb = bytearray(BLOCK_SIZE)
    CACHE_SUPERBLOCK.pack_into(
        sb, 0, 0, FLAG_CLEAN_SHUTDOWN if clean_shutdown else 0, 0, bytes(16), CACHE_MAGIC,
        version, cc.policy.encode().ljust(POLICY_NAME_SIZE, b"\0"), width,
        sm_root.pack(), mapping_root, hint_root, discard_root, 0, 0, cc.block_size,
        BLOCK_SIZE // 512, n, 0, 0, 0, 0, READ_MISSES, 0, 0, *POLICY_VERSION, dirty_root)
    seal(sb, SALT_CACHE_SUPERBLOCK)
    return BuiltCache(image, bytes(sb))


def write_content(cc: CacheContent, output: str, *, version: int = 2,
                  clean_shutdown: bool = True) -> int:
    """Write ``cc`` to the existing file or device ``output``; returns its blocks used."""
    def build(nr_blocks: int) -> tuple[MetadataImage, bytes]:
        built = build_content(cc, nr_blocks, version=version, clean_shutdown=clean_shutdown)
        return built.image, built.superblock

    image, nr_blocks = write_new_metadata(output, build)
    return int(np.count_nonzero(image.counts[:nr_blocks]))


def restore_cache(ir: CacheIR, output: str, *, version: int = 2,
                  clean_shutdown: bool = True) -> int:
    """Write the metadata to the existing file or device ``output``; returns its blocks used."""
    return write_content(ir_content(ir), output, version=version,
                         clean_shutdown=clean_shutdown)
