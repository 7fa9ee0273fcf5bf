"""Block checksums: crc32c over bytes 4..4095, kernel-seeded, XORed with the block type's salt."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeAlias

import numpy as np

from dmimage.format.constants import (
    BLOCK_SIZE,
    SALT_BITMAP,
    SALT_BTREE_NODE,
    SALT_METADATA_INDEX,
    SALT_SUPERBLOCK,
)


def _native_crc32c() -> Callable[..., int]:
    """The crc32c package's native function, loaded without the package's ``__init__``:
    that looks up the package's own version through importlib.metadata, which costs more
    start-up time (~35 ms) than checking a 1M-mapping pool's superblock and space maps."""
    import importlib.machinery
    import importlib.util
    import sys

    name = "crc32c._crc32c"
    module = sys.modules.get(name)
    if module is None:
        pkg = importlib.machinery.PathFinder.find_spec("crc32c")
        where = pkg.submodule_search_locations if pkg is not None else None
        spec = importlib.machinery.PathFinder.find_spec(name, list(where or []))
        if spec is None or spec.loader is None:
            from crc32c import crc32c as fallback

            return fallback
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module.crc32c  # type: ignore[no-any-return]


crc32c = _native_crc32c()

#: Salts of other persistent-data users, only for naming a block we find in the wrong place.
FOREIGN_SALTS = {595846735: "dm-array", 9031977: "cache superblock", 146538381: "era superblock"}

BLOCK_TYPE_NAMES = {
    SALT_SUPERBLOCK: "superblock",
    SALT_BTREE_NODE: "btree node",
    SALT_BITMAP: "space map bitmap",
    SALT_METADATA_INDEX: "metadata space map index",
    **FOREIGN_SALTS,
}

_U32 = struct.Struct("<I")

#: A block in memory: bytes-like, or a numpy uint8 array (1-D, contiguous).
Block: TypeAlias = bytes | bytearray | memoryview | np.ndarray
#: A block that :func:`seal` can write its checksum into.
WritableBlock: TypeAlias = bytearray | memoryview | np.ndarray


def byte_view(block: Block) -> memoryview:
    """Any in-memory block as a memoryview of its bytes (no copy)."""
    return block.data if isinstance(block, np.ndarray) else memoryview(block)


def block_checksum(block: Block, salt: int) -> int:
    """The value the kernel stores in bytes 0..3 of ``block`` for a block of type ``salt``.

    The standard crc32c finishes by inverting; the kernel's does not, hence the extra XOR.
    """
    return crc32c(byte_view(block)[4:BLOCK_SIZE]) ^ 0xFFFFFFFF ^ salt


def stored_checksum(block: Block) -> int:
    return int(_U32.unpack_from(byte_view(block), 0)[0])


def checksum_ok(block: Block, salt: int) -> bool:
    return block_checksum(block, salt) == stored_checksum(block)


def sniff_block_type(block: Block) -> str | None:
    """Name the block type whose salt makes the checksum match, or None (garbage or zeros)."""
    salt = crc32c(byte_view(block)[4:BLOCK_SIZE]) ^ 0xFFFFFFFF ^ stored_checksum(block)
    return BLOCK_TYPE_NAMES.get(salt)


def seal(block: WritableBlock, salt: int) -> None:
    """Store the checksum of ``block`` (in place): the last step before writing any block."""
    _U32.pack_into(byte_view(block), 0, block_checksum(block, salt))
