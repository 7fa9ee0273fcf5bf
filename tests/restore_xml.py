"""Seeded random XML inputs for cache_restore and era_restore 1.1 (the oracles write the
metadata dmimage's cache and era readers are tested on)."""

from __future__ import annotations

import base64
import random


def cache_xml(rng: random.Random, nr_cache_blocks: int, fill: float) -> str:
    n_map = int(nr_cache_blocks * fill)
    cblocks = sorted(rng.sample(range(nr_cache_blocks), n_map))
    oblocks = rng.sample(range(nr_cache_blocks * 8), n_map)
    lines = [f'<superblock uuid="" block_size="128" nr_cache_blocks="{nr_cache_blocks}" '
             'policy="smq" hint_width="4">', "  <mappings>"]
    lines += [f'    <mapping cache_block="{c}" origin_block="{o}" '
              f'dirty="{"true" if rng.random() < 0.3 else "false"}"/>'
              for c, o in zip(cblocks, oblocks, strict=True)]
    lines += ["  </mappings>", "  <hints>"]
    lines += [f'    <hint cache_block="{c}" '
              f'data="{base64.b64encode(rng.randbytes(4)).decode()}"/>'
              for c in cblocks if rng.random() < 0.8]
    lines += ["  </hints>", "</superblock>"]
    return "\n".join(lines)


def era_xml(rng: random.Random, nr_blocks: int, eras: list[int], current: int) -> str:
    lines = [f'<superblock uuid="" block_size="128" nr_blocks="{nr_blocks}" '
             f'current_era="{current}">']
    for era in eras:
        lines.append(f'  <writeset era="{era}" nr_bits="{nr_blocks}">')
        p = rng.random() * 0.4
        lines += [f'    <bit block="{b}" value="{"true" if rng.random() < p else "false"}"/>'
                  for b in range(nr_blocks)]
        lines.append("  </writeset>")
    lines.append("  <era_array>")
    low = eras[0] if eras else current
    lines += [f'    <era block="{b}" era="{rng.randrange(0, low)}"/>' for b in range(nr_blocks)]
    lines += ["  </era_array>", "</superblock>"]
    return "\n".join(lines)
