"""Sizes of a thin pool's hidden LVs as lvm2 2.03.16 chooses them for ``lvcreate --type
thin-pool``, so a built VG looks like one lvm2 made.

Facts (lib/metadata/thin_manip.c update_thin_pool_params, pool_manip.c
update_pool_metadata_min_max and handle_pool_metadata_spare, config/defaults.h), all in
512-byte sectors:

- estimate = data_extents * extent_size // (chunk_size * 8): 64 bytes of metadata per chunk;
- without a chunk size, the chunk starts at 64 KiB and doubles (the estimate halving) while the
  estimate exceeds 128 MiB and the chunk is below 1 GiB;
- the estimate, or a size the user gave, is rounded up to whole extents, then held between the
  minimum (2 MiB) and the maximum (255 * (16384 - 64) * 4 KiB, just under 15.88 GiB; the
  default does not crop metadata), both themselves rounded up to whole extents;
- with a metadata size but no chunk size, the chunk is data // (metadata * 8) sectors, above
  2 MiB rounded up to a multiple of 2 MiB, else up to a power of 2, held within 64 KiB..1 GiB;
- the spare (``lvol0_pmspare``) has as many extents as the largest pool metadata LV, at most
  16 GiB worth of extents.

tests/fixtures/lvm/thin_pool_sizes.json holds what the real lvm2 chose for a table of cases.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB_SECTORS = 2  # sectors per KiB
DEFAULT_CHUNK = 64 * KiB_SECTORS
MIN_CHUNK = 64 * KiB_SECTORS  # DM_THIN_MIN_DATA_BLOCK_SIZE
MAX_CHUNK = 1024 * 1024 * KiB_SECTORS  # DM_THIN_MAX_DATA_BLOCK_SIZE, 1 GiB
OPTIMAL_METADATA = 128 * 1024 * KiB_SECTORS
MIN_METADATA = 2048 * KiB_SECTORS
MAX_METADATA = 255 * ((1 << 14) - 64) * 4 * KiB_SECTORS
MAX_SPARE = 16 * 1024 * 1024 * KiB_SECTORS


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _chunk_for(data: int, meta: int) -> int:
    """The chunk lvm2 derives from given data and metadata sizes (_estimate_chunk_size, for a
    kernel whose thin target takes any multiple of 64 KiB): above 2 MiB rounded up to a
    multiple of 2 MiB, else up to a power of 2; within 64 KiB..1 GiB."""
    chunk = data // (meta * 8)
    big = 2 * 1024 * KiB_SECTORS
    if chunk > big - 1:
        chunk = _round_up(chunk, big)
    else:
        chunk = 1 << max(chunk - 1, 0).bit_length()
    return min(max(chunk, MIN_CHUNK), MAX_CHUNK)


@dataclass(frozen=True)
class PoolSizes:
    chunk_size: int  # sectors
    tmeta_extents: int
    pmspare_extents: int


def thin_pool_sizes(data_extents: int, extent_size: int, chunk_size: int | None = None,
                    metadata_size: int | None = None) -> PoolSizes:
    """lvm2's choice for a new pool of ``data_extents`` extents of ``extent_size`` sectors;
    ``chunk_size`` (``-c``) and ``metadata_size`` (``--poolmetadatasize``) in sectors, None
    when not given."""
    if metadata_size is None:
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK
            meta = data_extents * extent_size // (chunk_size * 8)
            while meta > OPTIMAL_METADATA and chunk_size < MAX_CHUNK:
                chunk_size <<= 1
                meta >>= 1
        else:
            meta = data_extents * extent_size // (chunk_size * 8)
        meta = _round_up(meta, extent_size)
    else:
        meta = _round_up(metadata_size, extent_size)
        if chunk_size is None:
            chunk_size = _chunk_for(data_extents * extent_size, meta)
    meta = min(max(meta, _round_up(MIN_METADATA, extent_size)),
               _round_up(MAX_METADATA, extent_size))
    tmeta = -(-meta // extent_size)
    return PoolSizes(chunk_size, tmeta, pmspare_extents(tmeta, extent_size))


def pmspare_extents(tmeta_extents: int, extent_size: int) -> int:
    """The spare's extents for a VG whose largest pool metadata LV has ``tmeta_extents``."""
    return min(tmeta_extents, -(-MAX_SPARE // extent_size))
