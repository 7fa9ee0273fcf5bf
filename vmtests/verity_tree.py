"""A dm-verity hash tree built on the host (format version 1), for the guest to verify.

Written from Documentation/admin-guide/device-mapper/verity.rst and the constructor's level
arithmetic in dm-verity-target.c: version 1 prepends the salt to every hashed block and pads
each digest to a power of two; the levels are stored from the top (one block) down to the
leaves' level, starting at ``hash_start``; the root digest is the hash of the top block (or of
the only data block, when there is one block and so no level at all).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class HashTree:
    """The hash area (to write at ``hash_start * hash_block_size``) and the root digest."""

    blocks: bytes
    root: bytes


def _digest(alg: str, salt: bytes, data: bytes) -> bytes:
    return hashlib.new(alg, salt + data).digest()


def build(data: bytes, *, data_block_size: int = 4096, hash_block_size: int = 4096,
          alg: str = "sha256", salt: bytes = b"") -> HashTree:
    """The tree over *data* (a whole number of data blocks)."""
    if len(data) % data_block_size or not data:
        raise ValueError("data must be a non-empty whole number of blocks")
    digest_size = hashlib.new(alg).digest_size
    padded = 1 << (digest_size - 1).bit_length()
    per_block = 1 << ((hash_block_size // padded).bit_length() - 1)
    nblocks = len(data) // data_block_size
    hashes = [_digest(alg, salt, data[i * data_block_size:(i + 1) * data_block_size])
              for i in range(nblocks)]
    # dm-verity's level count: smallest L with (nblocks - 1) >> (bits * L) == 0
    bits = per_block.bit_length() - 1
    levels = 0
    while (nblocks - 1) >> (bits * levels):
        levels += 1
    stored: list[bytes] = []  # bottom level first
    for _ in range(levels):
        level = bytearray()
        for k in range(0, len(hashes), per_block):
            block = b"".join(h.ljust(padded, b"\0") for h in hashes[k:k + per_block])
            level += block.ljust(hash_block_size, b"\0")
        stored.append(bytes(level))
        hashes = [_digest(alg, salt, bytes(level[i:i + hash_block_size]))
                  for i in range(0, len(level), hash_block_size)]
    assert len(hashes) == 1
    return HashTree(b"".join(reversed(stored)), hashes[0])
