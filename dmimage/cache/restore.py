"""cache_restore: dm-cache metadata from cache_dump's XML.

The result holds what cache_restore 1.1 writes (dump it and you get the same XML): every
array sized to the cache (unmapped and hint-less entries zero), an empty discard bitset, the
clean-shutdown flag unless asked otherwise, policy version 2.0.0. Unlike 1.1 it writes 0 for
the read-miss counter (1.1 writes 9). Block placement is dmimage's own. Like every dmimage
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
from dmimage.pdata.array import write_array
from dmimage.pdata.writer import MetadataImage, write_metadata_space_map, write_new_metadata
from dmimage.xml_attrs import bool_attr, int_attr, known_attrs, xml_events

#: smq's policy version, which cache_restore 1.1 writes for every policy.
POLICY_VERSION = (2, 0, 0)


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
    for c, data in ir.hints.items():
        hints[c] = np.frombuffer(data, np.uint8)
    return CacheContent(ir.block_size, ir.policy, ir.hint_width, origin, valid, dirty, hints)


def build_cache(ir: CacheIR, nr_blocks: int, *, version: int = 2,
                clean_shutdown: bool = True) -> BuiltCache:
    return build_content(ir_content(ir), nr_blocks, version=version,
                         clean_shutdown=clean_shutdown)


def build_content(cc: CacheContent, nr_blocks: int, *, version: int = 2,
                  clean_shutdown: bool = True) -> BuiltCache:
    image = MetadataImage(nr_blocks)
    image.alloc()  # block 0: the superblock
    n = cc.nr_cache_blocks
    discard_root = write_array(image, np.zeros((0, 8), np.uint8))
    dirty = cc.dirty & cc.valid
    flags = np.where(cc.valid, np.uint64(M_VALID), np.uint64(0))
    if version == 1:
        flags |= np.where(dirty, np.uint64(M_DIRTY), np.uint64(0))
    maps = np.where(cc.valid, cc.origin << np.uint64(MAPPING_FLAG_BITS), np.uint64(0)) | flags
    mapping_root = write_array(image, maps.astype("<u8").view(np.uint8).reshape(n, 8))
    dirty_root = 0
    if version >= 2:
        words = np.packbits(np.concatenate([dirty, np.zeros(-n % 64, bool)]),
                            bitorder="little").view("<u8")
        dirty_root = write_array(image, words.view(np.uint8).reshape(-1, 8))
    hint_root = 0
    if cc.hint_width:
        hint_root = write_array(image, np.ascontiguousarray(cc.hints, np.uint8))
    sm_root = write_metadata_space_map(image)
    sb = bytearray(BLOCK_SIZE)
    CACHE_SUPERBLOCK.pack_into(
        sb, 0, 0, FLAG_CLEAN_SHUTDOWN if clean_shutdown else 0, 0, bytes(16), CACHE_MAGIC,
        version, cc.policy.encode().ljust(POLICY_NAME_SIZE, b"\0"), cc.hint_width,
        sm_root.pack(), mapping_root, hint_root, discard_root, 0, 0, cc.block_size,
        BLOCK_SIZE // 512, n, 0, 0, 0, 0, 0, 0, 0, *POLICY_VERSION, dirty_root)
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
