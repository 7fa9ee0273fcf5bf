"""era_dump's XML, byte for byte as thin-provisioning-tools 1.1 writes it: every writeset (one
<bit> per block, true or false) and the era array; ``logical`` folds the writesets into the
era array instead (a block's era is that of the newest writeset holding it). Rows are
rendered in bulk (numpy), not one Python string at a time."""

from __future__ import annotations

import numpy as np

from dmimage.era.metadata import EraMetadata
from dmimage.textrows import render_rows


def _head(md: EraMetadata) -> bytes:
    sb = md.sb
    return (f'<superblock uuid="" block_size="{sb.data_block_size}" nr_blocks="{sb.nr_blocks}" '
            f'current_era="{sb.current_era}">\n').encode()


def era_xml(md: EraMetadata, *, logical: bool = False) -> bytes:
    out = [_head(md)]
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
            out.append(f'  <writeset era="{era}" nr_bits="{nr_bits}">\n'.encode())
            marked = np.flatnonzero(bits)
            end = max(nb, int(marked[-1]) + 1 if len(marked) else 0)
            values = np.zeros(end, bool)
            values[marked] = True
            rows, _ = render_rows([b'    <bit block="', (b'" value="false"/>\n',
                                                        b'" value="true"/>\n')],
                                  [np.arange(end, dtype=np.uint64)], select=values)
            out += [rows.tobytes(), b"  </writeset>\n"]
    out.append(b"  <era_array>\n")
    rows, _ = render_rows([b'    <era block="', b'" era="', b'"/>\n'],
                          [np.arange(len(eras), dtype=np.uint64), eras])
    out += [rows.tobytes(), b"  </era_array>\n</superblock>"]
    return b"".join(out)
