"""``cache`` (dm-cache-target.c) and ``era`` (dm-era-target.c): targets with pdata metadata.

dm-cache prints its devices as ``major:minor`` and every word after them exactly as it was
given (it keeps a copy of its constructor arguments), so features and policy words keep
their case and order here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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

CACHE_FEATURES = ("writeback", "writethrough", "passthrough", "metadata2",
                  "no_discard_passdown")
_IO_MODES = ("writeback", "writethrough", "passthrough")
#: DATA_DEV_BLOCK_SIZE_MIN/MAX_SECTORS: 32 KiB .. 1 GiB, a multiple of 32 KiB.
CACHE_MIN_BLOCK, CACHE_MAX_BLOCK = 64, 2097152
#: Policies Debian's kernels build (smq; mq is an alias of smq; cleaner; default = smq).
CACHE_POLICIES = ("smq", "mq", "cleaner", "default")
#: Policy keys: the core's migration_threshold, and the tunables mq accepts and ignores.
CORE_POLICY_KEYS = ("migration_threshold",)
MQ_POLICY_KEYS = ("random_threshold", "sequential_threshold", "discard_promote_adjustment",
                  "read_promote_adjustment", "write_promote_adjustment")
#: dm-era-target.c MIN_BLOCK_SIZE.
ERA_MIN_BLOCK = 8


@dataclass(frozen=True)
class Cache:
    """``cache <metadata> <cache> <origin> <block_size> <#features> <feature>* <policy>
    <#policy_args> <policy_arg>*``."""

    type_name: ClassVar[str] = "cache"
    metadata_dev: str
    cache_dev: str
    origin_dev: str
    block_size: int
    features: tuple[str, ...] = ()
    policy: str = "default"
    policy_args: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Cache:
        t = cls.type_name
        usage = ("<metadata_dev> <cache_dev> <origin_dev> <block_size> <#features> "
                 "<feature>* <policy> <#policy_args> <policy_arg>*")
        check_count(args, lambda n: n >= 7, usage + " (dm-cache: Insufficient args)",
                    target=t, line=line)
        block = parse_number(args[3], target=t, field="block_size", line=line)
        nf = parse_number(args[4], target=t, field="#features", line=line,
                          limit=(1 << 32) - 1)
        if 5 + nf + 2 > len(args):
            raise TableError(f"{nf} features leave no <policy> <#policy_args> (dm-cache: "
                             "Insufficient args)", line=line, field="#features", target=t)
        feats = tuple(args[5:5 + nf])
        policy = args[5 + nf]
        np_ = parse_number(args[6 + nf], target=t, field="#policy_args", line=line,
                           limit=(1 << 32) - 1)
        rest = tuple(args[7 + nf:])
        if np_ != len(rest):
            raise TableError(f"count says {np_} policy arguments, {len(rest)} follow",
                             line=line, field="#policy_args", target=t)
        return cls(device_arg(args[0], target=t, field="metadata_dev", line=line),
                   device_arg(args[1], target=t, field="cache_dev", line=line),
                   device_arg(args[2], target=t, field="origin_dev", line=line),
                   block, feats, policy, rest)

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        words = [self.metadata_dev, self.cache_dev, self.origin_dev, str(self.block_size),
                 str(len(self.features)), *self.features, self.policy,
                 str(len(self.policy_args)), *self.policy_args]
        return " ".join(words)

    def devices(self) -> list[str]:
        return [self.metadata_dev, self.cache_dev, self.origin_dev]

    def areas(self, length: int) -> list[tuple[str, str, int, int]]:
        return [("origin_dev", self.origin_dev, 0, length),
                ("cache_dev", self.cache_dev, 0, self.block_size)]

    def kernel_form(self, kernel: KernelVersion | None = None) -> Cache:
        return self

    def rules(self, length: int, kernel: KernelVersion | None
              ) -> Iterator[tuple[str, str, bool]]:
        b = self.block_size
        if not (CACHE_MIN_BLOCK <= b <= CACHE_MAX_BLOCK) or b % CACHE_MIN_BLOCK:
            yield ("block_size", f"{b} sectors: a multiple of {CACHE_MIN_BLOCK} from "
                   f"{CACHE_MIN_BLOCK} to {CACHE_MAX_BLOCK} (dm-cache: Invalid data block "
                   "size)", False)
        if len(self.features) > 3:
            yield ("features", f"{len(self.features)} features, at most 3 (dm-cache: Invalid "
                   "number of cache feature arguments)", False)
        low = [f.lower() for f in self.features]
        for f in low:
            if f not in CACHE_FEATURES:
                yield ("features", f"unknown feature {f!r} (dm-cache: Unrecognised cache "
                       "feature requested)", False)
        if sum(low.count(m) for m in _IO_MODES) > 1:
            yield ("features", "more than one io mode (dm-cache: Duplicate cache io_mode "
                   "features requested)", False)
        if self.policy not in CACHE_POLICIES:
            yield ("policy", f"policy {self.policy!r} is not one of {', '.join(CACHE_POLICIES)}"
                   " (dm-cache: Error creating cache's policy)", False)
        if len(self.policy_args) > 1024:
            yield ("policy_args", "more than 1024 policy arguments (dm-cache: Invalid number "
                   "of policy arguments)", False)
        elif len(self.policy_args) % 2:
            yield ("policy_args", "policy arguments must be <key> <value> pairs (dm-cache: "
                   "Error setting cache policy's config values)", False)
        else:
            keys = CORE_POLICY_KEYS + (MQ_POLICY_KEYS if self.policy == "mq" else ())
            for k in range(0, len(self.policy_args), 2):
                key, value = self.policy_args[k], self.policy_args[k + 1]
                if key.lower() not in keys or not value.isdigit():
                    yield ("policy_args", f"{key} {value}: the {self.policy} policy takes "
                           f"{', '.join(keys)} with a decimal value (dm-cache: Error setting "
                           "cache policy's config values)", False)
        if len({self.metadata_dev, self.cache_dev, self.origin_dev}) < 3:
            yield ("cache_dev", "metadata, cache and origin devices must differ", True)


@dataclass(frozen=True)
class Era:
    """``era <metadata_dev> <origin_dev> <block_size>`` (block size in sectors)."""

    type_name: ClassVar[str] = "era"
    metadata_dev: str
    origin_dev: str
    block_size: int

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Era:
        t = cls.type_name
        check_count(args, lambda n: n == 3, "<metadata_dev> <origin_dev> <block_size> "
                    "(dm-era: Invalid argument count)", target=t, line=line)
        return cls(device_arg(args[0], target=t, field="metadata_dev", line=line),
                   device_arg(args[1], target=t, field="origin_dev", line=line),
                   parse_number(args[2], target=t, field="block_size", line=line,
                                limit=(1 << 32) - 1))

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        return f"{self.metadata_dev} {self.origin_dev} {self.block_size}"

    def devices(self) -> list[str]:
        return [self.metadata_dev, self.origin_dev]

    def areas(self, length: int) -> list[tuple[str, str, int, int]]:
        return [("origin_dev", self.origin_dev, 0, length)]

    def kernel_form(self, kernel: KernelVersion | None = None) -> Era:
        return self

    def rules(self, length: int, kernel: KernelVersion | None
              ) -> Iterator[tuple[str, str, bool]]:
        b = self.block_size
        if b == 0 or b % ERA_MIN_BLOCK:
            yield ("block_size", f"{b} sectors: a non-zero multiple of {ERA_MIN_BLOCK} "
                   "(dm-era: Invalid block size)", False)
