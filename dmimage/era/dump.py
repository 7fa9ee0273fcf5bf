"""era_dump's XML, byte for byte as thin-provisioning-tools 1.1 writes it: every writeset (one
<bit> per block, true or false) and the era array; ``logical`` folds the writesets into the
era array instead (a block's era is that of the newest writeset holding it)."""

from __future__ import annotations

import numpy as np

from dmimage.era.metadata import EraMetadata


def _head(md: EraMetadata) -> str:
    sb = md.sb
    return (f'<superblock uuid="" block_size="{sb.data_block_size}" nr_blocks="{sb.nr_blocks}" '
            f'current_era="{sb.current_era}">')


def era_xml(md: EraMetadata, *, logical: bool = False) -> str:
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
            out.append(f'  <writeset era="{era}" nr_bits="{nr_bits}">')
            marked = np.flatnonzero(bits)
            end = max(nb, int(marked[-1]) + 1 if len(marked) else 0)
            values = np.zeros(end, bool)
            values[marked] = True
            out += [f'    <bit block="{b}" value="{"true" if v else "false"}"/>'
                    for b, v in enumerate(values.tolist())]
            out.append("  </writeset>")
    out.append("  <era_array>")
    out += [f'    <era block="{b}" era="{e}"/>' for b, e in enumerate(eras.tolist())]
    out += ["  </era_array>", "</superblock>"]
    return "\n".join(out)
