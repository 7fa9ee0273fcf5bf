"""cache_dump's XML, byte for byte as thin-provisioning-tools 1.1 writes it.

1.1 writes an empty uuid, the data block size, the cache size, the policy name and hint
width; every valid mapping in cache-block order (dirtiness from the dirty bitset in version
2); then the hints of the valid cache blocks, base64; no discards; no newline at the end.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np

from dmimage.cache.metadata import CacheMetadata
from dmimage.textrows import render_chunks

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;",
                          '"': "&quot;"})


def _attr(value: str) -> str:
    return value.translate(_ESCAPES)


def cache_xml(md: CacheMetadata) -> bytes:
    return b"".join(cache_xml_chunks(md))


def cache_xml_chunks(md: CacheMetadata) -> Iterator[bytes | memoryview]:
    """The XML as pieces to write one after another (rows rendered a batch at a time)."""
    sb = md.sb
    yield (f'<superblock uuid="" block_size="{sb.data_block_size}" '
           f'nr_cache_blocks="{sb.cache_blocks}" policy="{_attr(sb.policy_name)}" '
           f'hint_width="{sb.policy_hint_size}">\n  <mappings>\n').encode()
    valid = np.flatnonzero(md.valid)
    n = len(md.mappings)
    dirty = np.ones(n, bool)  # version 2: past the bitset's end counts as dirty, as in 1.1
    d = md.dirty
    dirty[:min(n, len(d))] = d[:n]
    yield from render_chunks([b'    <mapping cache_block="', b'" origin_block="',
                              (b'" dirty="false"/>\n', b'" dirty="true"/>\n')],
                             [valid, md.origin_blocks[valid]], select=dirty[valid])
    yield b"  </mappings>\n  <hints>\n"
    hinted = valid[valid < len(md.hints)]
    if len(hinted):
        # the base64 (fixed width) is a text column beside the cache block numbers
        yield from render_chunks([b'    <hint cache_block="', b'" data="', b'"/>\n'],
                                 [hinted, b64_matrix(md.hints[hinted])])
    yield b"  </hints>\n</superblock>"


def b64_matrix(rows: np.ndarray) -> np.ndarray:
    """Base64 of every row of a (n, width) uint8 array as an (n, chars) uint8 matrix, in one
    encoder call: rows padded to a multiple of 3 bytes encode independently, and the padding's
    characters become '='."""
    n, width = rows.shape
    pad = -width % 3
    padded = np.zeros((n, width + pad), np.uint8)
    padded[:, :width] = rows
    chars = (width + pad) // 3 * 4
    enc = np.frombuffer(base64.b64encode(padded.tobytes()), np.uint8).reshape(n, chars).copy()
    if pad:
        enc[:, chars - pad:] = ord("=")
    return enc
