"""cache_dump's XML, byte for byte as thin-provisioning-tools 1.1 writes it.

1.1 writes an empty uuid, the data block size, the cache size, the policy name and hint
width; every valid mapping in cache-block order (dirtiness from the dirty bitset in version
2); then the hints of the valid cache blocks, base64; no discards; no newline at the end.
"""

from __future__ import annotations

import base64

import numpy as np

from dmimage.cache.metadata import CacheMetadata

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;",
                          '"': "&quot;"})


def _attr(value: str) -> str:
    return value.translate(_ESCAPES)


def cache_xml(md: CacheMetadata) -> str:
    sb = md.sb
    out = [f'<superblock uuid="" block_size="{sb.data_block_size}" '
           f'nr_cache_blocks="{sb.cache_blocks}" policy="{_attr(sb.policy_name)}" '
           f'hint_width="{sb.policy_hint_size}">',
           "  <mappings>"]
    valid = np.flatnonzero(md.valid)
    oblocks = md.origin_blocks[valid].tolist()
    dirty = md.dirty
    dirty_list = dirty[valid[valid < len(dirty)]].tolist() if len(dirty) else []
    # version 2: a cache block past the bitset's end counts as dirty, as cache_dump 1.1 does
    dirty_list += [True] * (len(valid) - len(dirty_list))
    out += [f'    <mapping cache_block="{c}" origin_block="{o}" '
            f'dirty="{"true" if d else "false"}"/>'
            for c, o, d in zip(valid.tolist(), oblocks, dirty_list, strict=True)]
    out += ["  </mappings>", "  <hints>"]
    hints = md.hints
    for c in valid[valid < len(hints)].tolist():
        data = base64.b64encode(hints[c].tobytes()).decode()
        out.append(f'    <hint cache_block="{c}" data="{data}"/>')
    out += ["  </hints>", "</superblock>"]
    return "\n".join(out)
