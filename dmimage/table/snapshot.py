"""The classic snapshot targets (dm-snap.c): ``snapshot-origin``, ``snapshot``, ``snapshot-merge``.

``snapshot`` and ``snapshot-merge`` take ``<origin> <COW> <store> <chunk_size>
[<#features> <feature>*]`` where the store is ``P`` (persistent), ``PO`` (persistent, the
user copes with overflow) or ``N`` (transient), read case-insensitively and printed upper case.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from dmimage.table.args import (
    DEFAULT_STYLE,
    KernelVersion,
    Style,
    check_count,
    device_arg,
    parse_number,
)
from dmimage.table.errors import TableError
from dmimage.table.features import (
    Feature,
    FeatureDef,
    feature_words,
    names,
    ordered,
    parse_features,
)

#: snapshot_status() order.
SNAPSHOT_FEATURES = (FeatureDef("discard_zeroes_cow"), FeatureDef("discard_passdown_origin"))
STORES = ("P", "PO", "N")
#: dm-exception-store.c: chunk_size > INT_MAX >> SECTOR_SHIFT is "too high".
MAX_CHUNK = ((1 << 31) - 1) >> 9


@dataclass(frozen=True)
class SnapshotOrigin:
    """``snapshot-origin <origin>``: the origin, with copy-out to its snapshots on write."""

    type_name: ClassVar[str] = "snapshot-origin"
    device: str

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> SnapshotOrigin:
        t = cls.type_name
        check_count(args, lambda n: n == 1, "<origin_dev> (dm-snap.c origin_ctr: "
                    "origin: incorrect number of arguments)", target=t, line=line)
        return cls(device_arg(args[0], target=t, field="device", line=line))

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        return self.device

    def devices(self) -> list[str]:
        return [self.device]

    def areas(self, length: int) -> list[tuple[str, str, int, int]]:
        return [("device", self.device, 0, length)]

    def kernel_form(self, kernel: KernelVersion | None = None) -> SnapshotOrigin:
        return self

    def rules(self, length: int, kernel: KernelVersion | None
              ) -> Iterator[tuple[str, str, bool]]:
        return iter(())


@dataclass(frozen=True)
class Snapshot:
    """``snapshot <origin> <COW> <P|PO|N> <chunk_size> [<#features> <feature>*]``."""

    type_name: ClassVar[str] = "snapshot"
    origin: str
    cow: str
    store: str
    chunk_size: int
    features: tuple[Feature, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", ordered(self.features, SNAPSHOT_FEATURES))

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Snapshot:
        t = cls.type_name
        check_count(args, lambda n: n >= 4, "<origin> <COW device> <P|PO|N> <chunk_size> "
                    "[<#features> <feature>*] (dm-snap.c: requires 4 or more arguments)",
                    target=t, line=line)
        store = args[2].upper()
        if store not in STORES:
            raise TableError(f"exception store {args[2]!r} is not P, PO or N (dm-exception-"
                             "store.c: Exception store type is not P or N)", line=line,
                             field="store", target=t)
        chunk = parse_number(args[3], target=t, field="chunk_size", line=line,
                             limit=(1 << 32) - 1)
        return cls(device_arg(args[0], target=t, field="origin", line=line),
                   device_arg(args[1], target=t, field="cow", line=line), store, chunk,
                   parse_features(args[4:], SNAPSHOT_FEATURES, target=t, line=line))

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        base = f"{self.origin} {self.cow} {self.store} {self.chunk_size}"
        if not self.features:
            return base
        words = feature_words(self.features, SNAPSHOT_FEATURES)
        return f"{base} {len(words)} {' '.join(words)}"

    def devices(self) -> list[str]:
        return [self.origin, self.cow]

    def areas(self, length: int) -> list[tuple[str, str, int, int]]:
        return [("origin", self.origin, 0, length)]

    def kernel_form(self, kernel: KernelVersion | None = None) -> Snapshot:
        dedup = tuple(dict.fromkeys(self.features))
        return type(self)(self.origin, self.cow, self.store, self.chunk_size, dedup)

    def rules(self, length: int, kernel: KernelVersion | None
              ) -> Iterator[tuple[str, str, bool]]:
        c = self.chunk_size
        if c == 0 and self.store != "N":
            yield ("chunk_size", "chunk size 0: the persistent store's header decides (32 "
                   "sectors for a new store; dm-snap-persistent.c), so `dmsetup table` will "
                   "not print 0", True)
        elif c and c & (c - 1):
            yield ("chunk_size", f"chunk size {c} is not a power of 2 (dm-exception-store.c: "
                   "Chunk size is not a power of 2)", False)
        elif c > MAX_CHUNK:
            yield ("chunk_size", f"chunk size {c} above {MAX_CHUNK} (dm-exception-store.c: "
                   "Chunk size is too high)", False)
        if c == 0 and self.store == "N":
            yield ("chunk_size", "a transient store needs a chunk size (dm-snap.c: Chunk size "
                   "not set)", False)
        if self.origin == self.cow:
            yield ("cow", "COW device is the origin (dm-snap.c: COW device cannot be the same "
                   "as origin device)", False)
        if len(self.features) > 2:
            yield ("features", f"{len(self.features)} feature arguments, at most 2 (dm-snap.c:"
                   " Invalid number of feature arguments)", False)
        have = names(self.features)
        if "discard_passdown_origin" in have and "discard_zeroes_cow" not in have:
            yield ("features", "discard_passdown_origin needs discard_zeroes_cow (dm-snap.c: "
                   "discard_passdown_origin feature depends on discard_zeroes_cow)", False)
        if self.type_name == "snapshot-merge" and self.store == "N":
            yield ("store", "a transient store cannot merge (dm-snap.c: Snapshot exception "
                   "store does not support snapshot-merge.)", False)


@dataclass(frozen=True)
class SnapshotMerge(Snapshot):
    """``snapshot-merge``: the same arguments; merges the COW back into the origin."""

    type_name: ClassVar[str] = "snapshot-merge"

