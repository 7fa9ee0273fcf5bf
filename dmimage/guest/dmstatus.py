"""Parse ``dmsetup status`` lines of thin-pool and thin targets (kernel format, see
Documentation/admin-guide/device-mapper/thin-provisioning.rst)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PoolStatus:
    start: int
    length: int
    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_metadata_root: int | None  # None when "-"
    mode: str  # rw | ro | out_of_data_space
    discards: str  # discard_passdown | no_discard_passdown | ignore_discard
    no_space: str  # queue_if_no_space | error_if_no_space
    needs_check: bool
    metadata_low_watermark: int | None
    extra: list[str] = field(default_factory=list)
    failed: bool = False


def parse_pool_status(line: str) -> PoolStatus:
    """One ``dmsetup status POOL`` line (``start len thin-pool ...``)."""
    f = line.split()
    if len(f) < 3 or f[2] != "thin-pool":
        raise ValueError(f"not a thin-pool status line: {line!r}")
    start, length = int(f[0]), int(f[1])
    rest = f[3:]
    if rest and rest[0] == "Fail":
        return PoolStatus(start, length, 0, 0, 0, 0, 0, None, "Fail", "", "", False, None,
                          failed=True)
    tid = int(rest[0])
    um, tm = (int(x) for x in rest[1].split("/"))
    ud, td = (int(x) for x in rest[2].split("/"))
    held = None if rest[3] == "-" else int(rest[3])
    mode, discards, no_space, needs = rest[4], rest[5], rest[6], rest[7]
    lwm = int(rest[8]) if len(rest) > 8 and rest[8].isdigit() else None
    return PoolStatus(start, length, tid, um, tm, ud, td, held, mode, discards, no_space,
                      needs == "needs_check", lwm, rest[9:])


@dataclass
class ThinStatus:
    start: int
    length: int
    mapped_sectors: int
    highest_mapped_sector: int | None
    failed: bool = False


def parse_thin_status(line: str) -> ThinStatus:
    f = line.split()
    if len(f) < 3 or f[2] != "thin":
        raise ValueError(f"not a thin status line: {line!r}")
    if f[3] == "Fail":
        return ThinStatus(int(f[0]), int(f[1]), 0, None, failed=True)
    high = None if f[4] == "-" else int(f[4])
    return ThinStatus(int(f[0]), int(f[1]), int(f[3]), high)
