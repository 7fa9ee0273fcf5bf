"""The verdict of cache check: the full checker's (cache/check.py) or the clean path's
(cache/quick_check.py), which must agree."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheCheckReport:
    problems: list[str] = field(default_factory=list)
    #: leaks are listed in ``problems`` too; counted here for --json
    leaked_metadata_blocks: list[int] = field(default_factory=list)
    nr_mappings: int = 0
    nr_dirty: int = 0
    version: int = 0
    #: the metadata space map's nr_allocated and nr_blocks (dmsetup status's used/total)
    metadata_used: int = 0
    metadata_total: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems
