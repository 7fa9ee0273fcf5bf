"""`dmimage format`: write the metadata of an empty thin pool, as the kernel formats it."""

from __future__ import annotations

import argparse

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._units import parse_uint


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "format",
        help="write the metadata of an empty thin pool",
        description="Write the metadata of an empty thin pool to an existing file or block "
                    "device (never grown), laid out as the kernel formats it. The metadata "
                    "size is the device size (at most 4,161,600 blocks of 4 KiB). Refuses to "
                    "overwrite a valid thin-pool superblock unless --force is given.")
    p.add_argument("metadata", metavar="META", help="metadata file or block device")
    p.add_argument("--data-block-size", required=True, type=parse_uint, metavar="SECTORS",
                   help="data block size in 512-byte sectors (multiple of 128, 128..2097152)")
    p.add_argument("--nr-data-blocks", required=True, type=parse_uint, metavar="N",
                   help="number of data blocks in the pool")
    p.add_argument("-f", "--force", action="store_true",
                   help="overwrite even if META already holds thin-pool metadata")
    add_lock_plan(p, lambda a: [(a.metadata, True)])
    p.set_defaults(func=run)



def _holds_superblock(path: str) -> bool:
    from dmimage.format.checksum import checksum_ok
    from dmimage.format.constants import BLOCK_SIZE, SALT_SUPERBLOCK

    try:
        with open(path, "rb") as f:
            block = f.read(BLOCK_SIZE)
    except OSError:
        return False
    return len(block) == BLOCK_SIZE and any(block) and checksum_ok(block, SALT_SUPERBLOCK)


def run(args: argparse.Namespace) -> int:
    from dmimage.errors import UsageError
    from dmimage.format.constants import valid_data_block_size
    from dmimage.thin.format_pool import format_pool

    if not valid_data_block_size(args.data_block_size):
        raise UsageError(f"invalid data block size {args.data_block_size} sectors: it must be "
                         "a multiple of 128 sectors (64 KiB) between 128 and 2097152 (1 GiB)")
    if not args.force and _holds_superblock(args.metadata):
        raise UsageError(f"{args.metadata} already holds thin-pool metadata; "
                         "use --force to overwrite it")
    format_pool(args.metadata, args.data_block_size, args.nr_data_blocks)
    return 0
