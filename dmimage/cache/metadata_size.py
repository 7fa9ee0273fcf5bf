"""cache_metadata_size 1.1's estimate: 4 MiB for transactions plus 16 bytes per cache block for
the mapping array and (hint width + 8) bytes per block for the hints, capped at the largest
metadata device."""

from __future__ import annotations

from dmimage.errors import UsageError
from dmimage.format.constants import BLOCK_SIZE, MAX_METADATA_BLOCKS

MIN_CACHE_BLOCK_BYTES = 32 << 10
MAX_CACHE_BLOCK_BYTES = 1 << 30
TRANSACTION_OVERHEAD = 4 << 20


def nr_cache_blocks(device_bytes: int, block_bytes: int) -> int:
    if block_bytes == 0 or block_bytes % MIN_CACHE_BLOCK_BYTES:
        raise UsageError("block size must be a multiple of 32 KiB")
    if block_bytes > MAX_CACHE_BLOCK_BYTES:
        raise UsageError("maximum block size is 1 GiB")
    if device_bytes < block_bytes:
        raise UsageError("pool size must be larger than block size")
    return -(-device_bytes // block_bytes)


def metadata_size(nr_blocks: int, max_hint_width: int = 4) -> int:
    """Estimated metadata device size in bytes."""
    size = TRANSACTION_OVERHEAD + (nr_blocks << 4) + nr_blocks * (max_hint_width + 8)
    return min(size, MAX_METADATA_BLOCKS * BLOCK_SIZE)
