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
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from dmimage import devlock
from dmimage.errors import InputError, OutputTooSmallError
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
from dmimage.format.constants import BLOCK_SIZE, MAX_METADATA_BLOCKS
from dmimage.pdata.array import write_array
from dmimage.pdata.writer import MetadataImage, open_output, write_metadata_space_map

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


def _int(elem: ET.Element, name: str, limit: int = 2**64) -> int:
    raw = elem.get(name)
    if raw is None:
        raise InputError(f"<{elem.tag}>: missing attribute {name}")
    try:
        v = int(raw, 10)
    except ValueError:
        raise InputError(f"<{elem.tag}> {name}={raw!r}: not a number") from None
    if not 0 <= v < limit:
        raise InputError(f"<{elem.tag}> {name}={v}: out of range")
    return v


def _known(elem: ET.Element, names: set[str]) -> None:
    extra = set(elem.attrib) - names
    if extra:
        raise InputError(f"<{elem.tag}>: unknown attribute {sorted(extra)[0]}")


def parse_xml(path: str) -> CacheIR:
    """Stream the XML (iterparse); any malformation is an InputError naming what is wrong."""
    ir: CacheIR | None = None
    try:
        for _event, elem in ET.iterparse(path, events=("start",)):
            tag = elem.tag
            if tag == "superblock":
                if ir is not None:
                    raise InputError("duplicated <superblock>")
                _known(elem, {"uuid", "block_size", "nr_cache_blocks", "policy", "hint_width"})
                ir = CacheIR(_int(elem, "block_size", 2**32), _int(elem, "nr_cache_blocks", 2**32),
                             elem.get("policy", ""), _int(elem, "hint_width", 2**32))
                if len(ir.policy.encode()) > POLICY_NAME_SIZE:
                    raise InputError(f"<superblock> policy {ir.policy!r}: longer than "
                                     f"{POLICY_NAME_SIZE} bytes")
            elif tag == "mapping":
                if ir is None:
                    raise InputError("<mapping> outside <superblock>")
                _known(elem, {"cache_block", "origin_block", "dirty"})
                c = _int(elem, "cache_block", ir.nr_cache_blocks)
                o = _int(elem, "origin_block", 2**(64 - MAPPING_FLAG_BITS))
                d = elem.get("dirty")
                if d not in ("true", "false"):
                    raise InputError(f"<mapping cache_block=\"{c}\">: dirty must be true or false")
                if c in ir.mappings:
                    raise InputError(f"cache block {c} mapped twice")
                ir.mappings[c] = (o, d == "true")
            elif tag == "hint":
                if ir is None:
                    raise InputError("<hint> outside <superblock>")
                _known(elem, {"cache_block", "data"})
                c = _int(elem, "cache_block", ir.nr_cache_blocks)
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
    except ET.ParseError as exc:
        raise InputError(f"{path}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    if ir is None:
        raise InputError(f"{path}: no <superblock>")
    return ir


@dataclass(frozen=True)
class BuiltCache:
    image: MetadataImage
    superblock: bytes


def build_cache(ir: CacheIR, nr_blocks: int, *, version: int = 2,
                clean_shutdown: bool = True) -> BuiltCache:
    image = MetadataImage(nr_blocks)
    image.alloc()  # block 0: the superblock
    n = ir.nr_cache_blocks
    discard_root = write_array(image, np.zeros((0, 8), np.uint8))
    maps = np.zeros(n, np.uint64)
    dirty = np.zeros(n, bool)
    for c, (o, d) in ir.mappings.items():
        flags = M_VALID | (M_DIRTY if d and version == 1 else 0)
        maps[c] = (o << MAPPING_FLAG_BITS) | flags
        dirty[c] = d
    mapping_root = write_array(image, maps.astype("<u8").view(np.uint8).reshape(n, 8))
    dirty_root = 0
    if version >= 2:
        words = np.packbits(np.concatenate([dirty, np.zeros(-n % 64, bool)]),
                            bitorder="little").view("<u8")
        dirty_root = write_array(image, words.view(np.uint8).reshape(-1, 8))
    hint_root = 0
    if ir.hint_width:
        hints = np.zeros((n, ir.hint_width), np.uint8)
        for c, data in ir.hints.items():
            hints[c] = np.frombuffer(data, np.uint8)
        hint_root = write_array(image, hints)
    sm_root = write_metadata_space_map(image)
    sb = bytearray(BLOCK_SIZE)
    CACHE_SUPERBLOCK.pack_into(
        sb, 0, 0, FLAG_CLEAN_SHUTDOWN if clean_shutdown else 0, 0, bytes(16), CACHE_MAGIC,
        version, ir.policy.encode().ljust(POLICY_NAME_SIZE, b"\0"), ir.hint_width,
        sm_root.pack(), mapping_root, hint_root, discard_root, 0, 0, ir.block_size,
        BLOCK_SIZE // 512, n, 0, 0, 0, 0, 0, 0, 0, *POLICY_VERSION, dirty_root)
    seal(sb, SALT_CACHE_SUPERBLOCK)
    return BuiltCache(image, bytes(sb))


def restore_cache(ir: CacheIR, output: str, *, version: int = 2,
                  clean_shutdown: bool = True) -> int:
    """Write the metadata to the existing file or device ``output``; returns its blocks used."""
    with devlock.hold(output, exclusive=True):
        fd, size = open_output(output)
        try:
            nr_blocks = min(size // BLOCK_SIZE, MAX_METADATA_BLOCKS)
            built = build_cache(ir, max(nr_blocks, 1), version=version,
                                clean_shutdown=clean_shutdown)
            if built.image.overflowed or nr_blocks < 1:
                need = max(built.image.high_water, len(np.flatnonzero(built.image.counts)))
                raise OutputTooSmallError(
                    f"{output} is too small: {size} bytes, the metadata needs at least "
                    f"{(need + 1) * BLOCK_SIZE} bytes", needed_bytes=(need + 1) * BLOCK_SIZE)
            built.image.flush_to(fd, built.superblock)
            return int(np.count_nonzero(built.image.counts[:nr_blocks]))
        finally:
            os.close(fd)
