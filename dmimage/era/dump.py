"""era_dump's XML, byte for byte as thin-provisioning-tools 1.1 writes it: every writeset (one
<bit> per block, true or false) and the era array; ``logical`` folds the writesets into the
era array instead (a block's era is that of the newest writeset holding it). Rows are
rendered in bulk (numpy), not one Python string at a time."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dmimage.era.metadata import EraMetadata
from dmimage.textrows import render_chunks


def _head(md: EraMetadata) -> bytes:
    sb = md.sb
    return (f'<superblock uuid="" block_size="{sb.data_block_size}" nr_blocks="{sb.nr_blocks}" '
            f'current_era="{sb.current_era}">\n').encode()


def era_xml(md: EraMetadata, *, logical: bool = False) -> bytes:
    return b"".join(era_xml_chunks(md, logical=logical))


def era_xml_chunks(md: EraMetadata, *, logical: bool = False) -> Iterator[bytes | memoryview]:
    """The XML as pieces to write one after another (rows rendered a batch at a time)."""
    yield _head(md)
    eras = md.eras
    if logical:
        eras = eras.copy()
        n = len(eras)
        for era, (_nr, bits) in md.writesets.items():
            m = min(n, len(bits))
            eras[:m][bits[:m]] = era
    else:
        nb = md.sb.nr_blocks
        for era, (nr_bits, bits) in md.writesets.items():
            yield f'  <writeset era="{era}" nr_bits="{nr_bits}">\n'.encode()
            marked = np.flatnonzero(bits)
            end = max(nb, int(marked[-1]) + 1 if len(marked) else 0)
            values = np.zeros(end, bool)
            values[marked] = True
            yield from render_chunks([b'    <bit block="', (b'" value="false"/>\n',
                                                           b'" value="true"/>\n')],
                                     [np.arange(end, dtype=np.uint32)], select=values)
            yield b"  </writeset>\n"
    yield b"  <era_array>\n"
    yield from render_chunks([b'    <era block="', b'" era="', b'"/>\n'],
                             [np.arange(len(eras), dtype=np.uint32), eras])
    yield b"  </era_array>\n</superblock>"
