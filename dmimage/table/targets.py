"""Target types: each knows its constructor arguments and prints them as the kernel does.

``params()`` reproduces the target's STATUSTYPE_TABLE output (what ``dmsetup table`` shows),
byte for byte, so formatting a parsed canonical table gives the same text back. Arguments that
the model cannot hold (wrong count, not a number, unknown feature) are refused here, at parse
time; values the model can hold but the kernel refuses (block size 100) are left to
:mod:`dmimage.table.validate`, so a table can be built, inspected and reported on whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dmimage.table.args import (
    DEFAULT_STYLE,
    Style,
    check_count,
    device_arg,
    parse_number,
    split_args,
)
from dmimage.table.cache import Cache, Era
from dmimage.table.crypt import Crypt
from dmimage.table.errors import TableError
from dmimage.table.faults import Delay, Flakey
from dmimage.table.kernel import POOL_FEATURES
from dmimage.table.snapshot import Snapshot, SnapshotMerge, SnapshotOrigin
from dmimage.table.verity import Verity

__all__ = [
    "TYPED", "Cache", "Crypt", "Delay", "Era", "Error", "Flakey", "Generic", "Linear", "Snapshot",
    "SnapshotMerge", "SnapshotOrigin", "Stripe", "Striped", "Target", "Thin", "ThinPool",
    "Verity", "Zero", "parse_number", "split_args", "target_from_params",
]


@dataclass(frozen=True)
class Linear:
    """``linear <dev> <offset>`` (dm-linear.c)."""

    type_name: ClassVar[str] = "linear"
    device: str
    offset: int

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Linear:
        t = cls.type_name
        check_count(args, lambda n: n == 2, "<dev> <offset>", target=t, line=line)
        return cls(device_arg(args[0], target=t, field="device", line=line),
                   parse_number(args[1], target=t, field="offset", line=line))

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        return f"{self.device} {self.offset}"

    def devices(self) -> list[str]:
        return [self.device]


@dataclass(frozen=True)
class Stripe:
    """One ``<dev> <offset>`` pair of a striped target."""

    device: str
    offset: int


@dataclass(frozen=True)
class Striped:
    """``striped <#stripes> <chunk_size> [<dev> <offset>]+`` (dm-stripe.c)."""

    type_name: ClassVar[str] = "striped"
    chunk_size: int
    stripes: tuple[Stripe, ...]

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Striped:
        t = cls.type_name
        check_count(args, lambda n: n >= 2, "<#stripes> <chunk_size> [<dev> <offset>]+",
               target=t, line=line)
        count = parse_number(args[0], target=t, field="stripes", line=line, limit=(1 << 32) - 1)
        chunk = parse_number(args[1], target=t, field="chunk_size", line=line,
                             limit=(1 << 32) - 1)
        if len(args) != 2 + 2 * count:
            raise TableError(f"{count} stripes need {2 * count} device arguments, got "
                             f"{len(args) - 2} (dm-stripe.c: Not enough destinations specified)",
                             line=line, field="stripes", target=t)
        stripes = tuple(
            Stripe(device_arg(args[i], target=t, field=f"stripe {k} device", line=line),
                   parse_number(args[i + 1], target=t, field=f"stripe {k} offset", line=line))
            for k, i in enumerate(range(2, len(args), 2))
        )
        return cls(chunk, stripes)

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        pairs = "".join(f" {s.device} {s.offset}" for s in self.stripes)
        return f"{len(self.stripes)} {self.chunk_size}{pairs}"

    def devices(self) -> list[str]:
        return [s.device for s in self.stripes]


@dataclass(frozen=True)
class Zero:
    """``zero`` (dm-zero.c: "No arguments required")."""

    type_name: ClassVar[str] = "zero"

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Zero:
        check_count(args, lambda n: n == 0, "none", target=cls.type_name, line=line)
        return cls()

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        return ""

    def devices(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Error:
    """``error`` with no arguments, or ``<dev> <offset>`` (newer kernels, for zoned limits)."""

    type_name: ClassVar[str] = "error"
    device: str | None = None
    offset: int | None = None

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Error:
        t = cls.type_name
        check_count(args, lambda n: n in (0, 2), "none or <dev> <offset>", target=t, line=line)
        if not args:
            return cls()
        return cls(device_arg(args[0], target=t, field="device", line=line),
                   parse_number(args[1], target=t, field="offset", line=line))

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        if self.device is None:
            return ""
        return f"{self.device} {self.offset}"

    def devices(self) -> list[str]:
        return [] if self.device is None else [self.device]

    def kernel_form(self, kernel: tuple[int, int] | None = None) -> Error:
        """The kernel never prints the device back (dm-target.c has no status function)."""
        return Error()


@dataclass(frozen=True)
class ThinPool:
    """``thin-pool <metadata_dev> <data_dev> <block_size> <low_water_mark> [<#f> <f>*]``.

    ``features`` is a set: the kernel keeps flags, not the order or repeats it was given, and
    prints them back with their count in emit_flags() order, each followed by a space.
    """

    type_name: ClassVar[str] = "thin-pool"
    metadata_dev: str
    data_dev: str
    data_block_size: int
    low_water_mark: int
    features: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        unknown = set(self.features) - set(POOL_FEATURES)
        if unknown:
            raise TableError(f"unknown feature {sorted(unknown)[0]!r} (known: "
                             f"{', '.join(POOL_FEATURES)})", field="features",
                             target=self.type_name)
        object.__setattr__(self, "features", frozenset(self.features))

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> ThinPool:
        t = cls.type_name
        check_count(args, lambda n: n >= 4, "<metadata_dev> <data_dev> <data_block_size> "
               "<low_water_mark> [<#feature_args> [<arg>]*]", target=t, line=line)
        block = parse_number(args[2], target=t, field="data_block_size", line=line)
        lwm = parse_number(args[3], target=t, field="low_water_mark", line=line)
        features: set[str] = set()
        if len(args) > 4:
            count = parse_number(args[4], target=t, field="#feature_args", line=line,
                                 limit=(1 << 32) - 1)
            rest = args[5:]
            if count != len(rest):
                # fewer: the kernel refuses; more: it silently ignores the extra words.
                raise TableError(f"count says {count} feature arguments, {len(rest)} follow",
                                 line=line, field="#feature_args", target=t)
            for word in rest:
                name = word.lower()  # parse_pool_features() uses strcasecmp
                if name not in POOL_FEATURES:
                    raise TableError(f"unknown feature {word!r} (dm-thin.c: Unrecognised pool "
                                     "feature requested)", line=line, field="features",
                                     target=t)
                features.add(name)
        return cls(device_arg(args[0], target=t, field="metadata_dev", line=line),
                   device_arg(args[1], target=t, field="data_dev", line=line), block, lwm,
                   frozenset(features))

    def ordered_features(self) -> list[str]:
        """The features in the order the kernel prints them."""
        return [f for f in POOL_FEATURES if f in self.features]

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        flags = "".join(f"{f} " for f in self.ordered_features())
        return (f"{self.metadata_dev} {self.data_dev} {self.data_block_size} "
                f"{self.low_water_mark} {len(self.features)} {flags}")

    def devices(self) -> list[str]:
        return [self.metadata_dev, self.data_dev]


@dataclass(frozen=True)
class Thin:
    """``thin <pool_dev> <dev_id> [<external_origin_dev>]`` (dm-thin.c thin_ctr)."""

    type_name: ClassVar[str] = "thin"
    pool_dev: str
    dev_id: int
    external_origin_dev: str | None = None

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Thin:
        t = cls.type_name
        check_count(args, lambda n: n in (2, 3), "<pool_dev> <dev_id> [<external_origin_dev>]",
               target=t, line=line)
        origin = (device_arg(args[2], target=t, field="external_origin_dev", line=line)
                  if len(args) == 3 else None)
        return cls(device_arg(args[0], target=t, field="pool_dev", line=line),
                   parse_number(args[1], target=t, field="dev_id", line=line), origin)

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        origin = f" {self.external_origin_dev}" if self.external_origin_dev is not None else ""
        return f"{self.pool_dev} {self.dev_id}{origin}"

    def devices(self) -> list[str]:
        return [self.pool_dev] + ([self.external_origin_dev] if self.external_origin_dev else [])


@dataclass(frozen=True)
class Generic:
    """Any other target: its parameter text kept verbatim, so it prints back unchanged."""

    type_name: str
    params_text: str = ""

    def __post_init__(self) -> None:
        if not self.type_name or any(c.isspace() for c in self.type_name):
            raise TableError(f"bad target type {self.type_name!r}", field="type")
        if "\n" in self.params_text or "\r" in self.params_text:
            raise TableError("parameters span lines", field="params", target=self.type_name)

    @classmethod
    def from_params(cls, type_name: str, params: str) -> Generic:
        return cls(type_name, params)

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        return self.params_text

    @property
    def args(self) -> list[str]:
        """The arguments the kernel's constructor would see (raw tokens)."""
        return split_args(self.params_text)

    def devices(self) -> list[str]:
        return []


Target = (Linear | Striped | Zero | Error | ThinPool | Thin | Crypt | Delay | Flakey | Snapshot
          | SnapshotOrigin | SnapshotMerge | Verity | Cache | Era | Generic)

#: Target types with a typed model; everything else parses as :class:`Generic`.
TYPED: dict[str, Any] = {
    c.type_name: c for c in (Linear, Striped, Zero, Error, ThinPool, Thin, Crypt, Delay, Flakey,
                             Snapshot, SnapshotOrigin, SnapshotMerge, Verity, Cache, Era)
}


def target_from_params(type_name: str, params: str, line: int | None = None) -> Target:
    """Build the model of one target from its type and parameter text."""
    cls = TYPED.get(type_name)
    if cls is None:
        return Generic(type_name, params)
    result: Target = cls.from_args(split_args(params), line)
    return result
