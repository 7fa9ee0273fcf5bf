"""Limits and names the kernel enforces on tables, each with where it comes from.

Kept apart from the code that checks them so docs/tables.md and the checks cite one place.
"""

from __future__ import annotations

from dmimage.format.constants import MAX_DATA_BLOCK_SECTORS, MAX_DEV_ID, MIN_DATA_BLOCK_SECTORS

__all__ = [
    "DM_INIT_ALLOWED_TARGETS", "DM_INIT_MAX_DEVICES", "DM_INIT_MAX_STR", "DM_INIT_MAX_TARGETS",
    "DM_MAX_MINOR", "DM_NAME_LEN", "DM_UUID_LEN", "MAX_DEV_ID", "MAX_DATA_BLOCK_SECTORS",
    "MIN_DATA_BLOCK_SECTORS", "POOL_FEATURES", "POOL_MAX_FEATURE_ARGS", "SECTOR_MAX",
    "STRIPE_DOC_MIN_CHUNK", "THIN_METADATA_MAX_SECTORS",
]

#: dm-thin.c emit_flags(): the order in which the kernel prints the features it has set.
POOL_FEATURES = (
    "skip_block_zeroing",
    "ignore_discard",
    "no_discard_passdown",
    "read_only",
    "error_if_no_space",
)
#: dm-thin.c parse_pool_features(): ``{0, 4, "Invalid number of pool feature arguments"}``.
POOL_MAX_FEATURE_ARGS = 4
#: dm-thin-metadata.h: the metadata device beyond 255 index entries x 16368 blocks is unused.
THIN_METADATA_MAX_SECTORS = 255 * (1 << 14) * 8

#: Documentation/admin-guide/device-mapper/striped.rst: chunk "at least as large as the
#: system's PAGE_SIZE" (4 KiB pages: 8 sectors). dm-stripe.c itself only refuses 0.
STRIPE_DOC_MIN_CHUNK = 8

#: sector_t is 64-bit.
SECTOR_MAX = (1 << 64) - 1

#: drivers/md/dm-init.c.
DM_INIT_MAX_DEVICES = 256
DM_INIT_MAX_TARGETS = 256
#: ``strlen(create) >= DM_MAX_STR_SIZE`` is refused: at most 4095 characters.
DM_INIT_MAX_STR = 4096
DM_INIT_ALLOWED_TARGETS = ("crypt", "delay", "linear", "snapshot-origin", "striped", "verity")
#: include/uapi/linux/dm-ioctl.h: name and uuid buffers (NUL included); dm-init truncates.
DM_NAME_LEN = 128
DM_UUID_LEN = 129
#: MINORBITS is 20.
DM_MAX_MINOR = (1 << 20) - 1

_ = (MAX_DATA_BLOCK_SECTORS, MAX_DEV_ID, MIN_DATA_BLOCK_SECTORS)
