"""The dm-cache superblock: its fields as one typed value, read and checked as every reader
must. Apart from cache/metadata.py (which reads the arrays through pdata's walker), so that
cache check's clean path (cache/quick_check.py) imports none of pdata's tree modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmimage.errors import BlockNumberError, ChecksumError, FormatError
from dmimage.format.cache import (
    CACHE_MAGIC,
    CACHE_SUPERBLOCK,
    FLAG_CLEAN_SHUTDOWN,
    FLAG_NEEDS_CHECK,
    SALT_CACHE_SUPERBLOCK,
)
from dmimage.format.checksum import checksum_ok
from dmimage.format.superblock import SpaceMapRoot


@dataclass(frozen=True, kw_only=True)
class CacheSuperblock:
    flags: int
    blocknr: int
    uuid: bytes
    magic: int
    version: int
    policy_name: str
    policy_hint_size: int
    metadata_sm: SpaceMapRoot
    mapping_root: int
    hint_root: int
    discard_root: int
    discard_block_size: int
    discard_nr_blocks: int
    data_block_size: int
    metadata_block_size: int
    cache_blocks: int
    compat_flags: int
    compat_ro_flags: int
    incompat_flags: int
    read_hits: int
    read_misses: int
    write_hits: int
    write_misses: int
    policy_version: tuple[int, int, int]
    dirty_root: int  # version 2 only; 0 otherwise

    @property
    def clean_shutdown(self) -> bool:
        return bool(self.flags & FLAG_CLEAN_SHUTDOWN)

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & FLAG_NEEDS_CHECK)


def parse_superblock(block: memoryview | bytes, *, verify_checksum: bool = True
                     ) -> CacheSuperblock:
    """Block 0, checked as every reader must: checksum, location, magic, version (repair
    alone may skip the checksum and rely on the other three)."""
    if verify_checksum and not checksum_ok(block, SALT_CACHE_SUPERBLOCK):
        raise ChecksumError("bad checksum (not a dm-cache superblock?)", block=0,
                            field="superblock")
    f = CACHE_SUPERBLOCK.unpack_from(block)
    (_csum, flags, blocknr, uuid, magic, version, policy, hint_size, sm_root, mapping_root,
     hint_root, discard_root, discard_bs, discard_nr, data_bs, meta_bs, cache_blocks, compat,
     compat_ro, incompat, rh, rm, wh, wm, pv0, pv1, pv2, dirty_root) = f
    if blocknr != 0:
        raise BlockNumberError(f"superblock says it lives at block {blocknr}", block=0,
                               field="superblock blocknr")
    if magic != CACHE_MAGIC:
        raise FormatError(f"magic {magic:#x}, expected {CACHE_MAGIC:#x}", block=0,
                          field="superblock magic")
    if version not in (1, 2):
        raise FormatError(f"unsupported metadata version {version}", block=0,
                          field="superblock version")
    return CacheSuperblock(
        flags=flags, blocknr=blocknr, uuid=uuid, magic=magic, version=version,
        policy_name=policy.split(b"\0", 1)[0].decode("utf-8", "replace"),
        policy_hint_size=hint_size, metadata_sm=SpaceMapRoot.unpack(sm_root),
        mapping_root=mapping_root, hint_root=hint_root, discard_root=discard_root,
        discard_block_size=discard_bs, discard_nr_blocks=discard_nr, data_block_size=data_bs,
        metadata_block_size=meta_bs, cache_blocks=cache_blocks, compat_flags=compat,
        compat_ro_flags=compat_ro, incompat_flags=incompat, read_hits=rh, read_misses=rm,
        write_hits=wh, write_misses=wm, policy_version=(pv0, pv1, pv2),
        dirty_root=dirty_root if version >= 2 else 0)
