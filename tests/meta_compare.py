"""Comparing metadata images block for block with thin-provisioning-tools 1.1's."""

from __future__ import annotations

import struct

import numpy as np


def used_bytes(img: bytes, nr_blocks: int) -> list[bytes]:
    """Each block's bytes that carry meaning: everything but the checksum and, in array
    blocks and btree nodes, the unused space after the entries (cache_restore and era_restore
    1.1 leave whatever its buffers held there, e.g. pieces of the XML it read)."""
    from dmimage.format.checksum import sniff_block_type

    out = []
    for b in range(nr_blocks):
        raw = img[b * 4096:(b + 1) * 4096]
        kind = sniff_block_type(raw)
        if kind == "dm-array":
            _c, _mx, nr, vs, _bn = struct.unpack_from("<IIIIQ", raw)
            out.append(raw[4:24 + nr * vs])
        elif kind == "btree node":
            nr, mx, vs = struct.unpack_from("<III", raw, 16)
            vals = 32 + mx * 8
            out.append(raw[4:32 + nr * 8] + raw[vals:vals + nr * vs])
        else:
            out.append(raw[4:])
    return out


def differing_blocks(a: bytes, b: bytes) -> list[int]:
    """Blocks whose meaningful bytes differ between two images of one size."""
    assert len(a) == len(b)
    used = max(int(np.flatnonzero(np.frombuffer(x, np.uint8).reshape(-1, 4096).any(axis=1))
                   .max()) + 1 for x in (a, b))
    ua, ub = used_bytes(a, used), used_bytes(b, used)
    return [i for i in range(used) if ua[i] != ub[i]]
