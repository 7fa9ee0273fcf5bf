"""Test targets that shape I/O: ``delay`` (dm-delay.c) and ``flakey`` (dm-flakey.c)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from dmimage.table.args import (
    DEFAULT_STYLE,
    KernelVersion,
    Style,
    at_least,
    check_count,
    device_arg,
    parse_number,
)
from dmimage.table.features import (
    Feature,
    FeatureDef,
    feature_words,
    names,
    ordered,
    parse_features,
)

_U32 = (1 << 32) - 1


@dataclass(frozen=True)
class DelayClass:
    """One ``<dev> <offset> <delay_ms>`` group."""

    device: str
    offset: int
    delay_ms: int


@dataclass(frozen=True)
class Delay:
    """``delay <dev> <offset> <delay> [<wdev> <woffset> <wdelay> [<fdev> <foffset> <fdelay>]]``.

    One group applies to reads, writes and flushes; two split writes (and flushes) off;
    three give flushes their own. The kernel prints back as many groups as it was given.
    """

    type_name: ClassVar[str] = "delay"
    classes: tuple[DelayClass, ...]

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Delay:
        t = cls.type_name
        check_count(args, lambda n: n in (3, 6, 9), "3, 6 or 9 (<dev> <offset> <delay> per "
                    "group) (dm-delay.c: Requires exactly 3, 6 or 9 arguments)", target=t,
                    line=line)
        labels = ("read", "write", "flush")
        groups = []
        for k in range(0, len(args), 3):
            who = labels[k // 3]
            groups.append(DelayClass(
                device_arg(args[k], target=t, field=f"{who} device", line=line),
                parse_number(args[k + 1], target=t, field=f"{who} offset", line=line),
                parse_number(args[k + 2], target=t, field=f"{who} delay", line=line,
                             limit=_U32)))
        return cls(tuple(groups))

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        return " ".join(f"{c.device} {c.offset} {c.delay_ms}" for c in self.classes)

    def devices(self) -> list[str]:
        return [c.device for c in self.classes]

    def areas(self, length: int) -> list[tuple[str, str, int, int]]:
        labels = ("read", "write", "flush")
        return [(f"{labels[k]} device", c.device, c.offset, length)
                for k, c in enumerate(self.classes)]

    def kernel_form(self, kernel: KernelVersion | None = None) -> Delay:
        return self

    def rules(self, length: int, kernel: KernelVersion | None
              ) -> Iterator[tuple[str, str, bool]]:
        if len(self.classes) not in (1, 2, 3):
            yield ("args", "needs 1, 2 or 3 <dev> <offset> <delay> groups (dm-delay.c: "
                   "Requires exactly 3, 6 or 9 arguments)", False)


#: dm-flakey.c flakey_status() order; error_reads and the random_* features are new since 6.1
#: (6.12 has them, 5.10 and 6.1 do not). 6.16 made the parser stricter (``Flakey._rules_616``).
FLAKEY_FEATURES = (
    FeatureDef("error_reads", since=(6, 12)),
    FeatureDef("drop_writes"),
    FeatureDef("error_writes"),
    FeatureDef("corrupt_bio_byte", ("nth_byte", "direction", "value", "flags"),
               numeric=(True, False, True, True)),
    FeatureDef("random_read_corrupt", ("probability",), since=(6, 12)),
    FeatureDef("random_write_corrupt", ("probability",), since=(6, 12)),
)
#: parse_features() ``{0, 6}`` on 6.1, ``{0, 11}`` on 6.12.
FLAKEY_MAX_ARGS_61, FLAKEY_MAX_ARGS = 6, 11
#: PROBABILITY_BASE: random_*_corrupt is out of 1000000000.
PROBABILITY_BASE = 1_000_000_000


@dataclass(frozen=True)
class Flakey:
    """``flakey <dev> <offset> <up> <down> [<#features> <feature>*]`` (intervals in seconds)."""

    type_name: ClassVar[str] = "flakey"
    device: str
    offset: int
    up_interval: int
    down_interval: int
    features: tuple[Feature, ...] = field(default=())

    def __post_init__(self) -> None:
        fixed = tuple(tuple(w.lower() for w in f) if f[0] == "corrupt_bio_byte" else f
                      for f in self.features)
        object.__setattr__(self, "features", ordered(fixed, FLAKEY_FEATURES))

    @classmethod
    def from_args(cls, args: Sequence[str], line: int | None = None) -> Flakey:
        t = cls.type_name
        check_count(args, lambda n: n >= 4, "<dev> <offset> <up interval> <down interval> "
                    "[<#features> <feature>*]", target=t, line=line)
        return cls(device_arg(args[0], target=t, field="device", line=line),
                   parse_number(args[1], target=t, field="offset", line=line),
                   parse_number(args[2], target=t, field="up_interval", line=line, limit=_U32),
                   parse_number(args[3], target=t, field="down_interval", line=line,
                                limit=_U32),
                   parse_features(args[4:], FLAKEY_FEATURES, target=t, line=line))

    def params(self, style: Style = DEFAULT_STYLE) -> str:
        head = f"{self.device} {self.offset} {self.up_interval} {self.down_interval}"
        words = feature_words(self.features, FLAKEY_FEATURES)
        count = len(words)
        if not at_least(style.kernel, (6, 12)):
            # 6.1 prints every field followed by a space, and always a count.
            return head + " " + "".join(f"{w} " for w in [str(count), *words])
        return " ".join([head, str(count), *words])

    def devices(self) -> list[str]:
        return [self.device]

    def areas(self, length: int) -> list[tuple[str, str, int, int]]:
        return [("device", self.device, self.offset, length)]

    def kernel_form(self, kernel: KernelVersion | None = None) -> Flakey:
        """6.12 turns "no fault feature" into error_reads + error_writes (error all I/O); a
        repeated corrupt_bio_byte or random_*_corrupt keeps the last (repeated flags are
        refused, so they are left for :meth:`rules` to report); a random_*_corrupt rate of
        0 is "not set": not printed, and no fault feature."""
        feats = self.features
        seen = names(feats)
        if not any(seen.count(f) > 1 for f in ("drop_writes", "error_writes", "error_reads")):
            last: dict[str, Feature] = {}
            for f in feats:
                last[f[0]] = f
            feats = tuple(last.values())
            feats = tuple(f for f in feats
                          if not (f[0].startswith("random_") and int(f[1]) == 0))
        if at_least(kernel, (6, 12)) and not set(names(feats)) & {
                "error_reads", "drop_writes", "error_writes", "corrupt_bio_byte",
                "random_read_corrupt", "random_write_corrupt"}:
            feats = feats + (("error_reads",), ("error_writes",))
        return Flakey(self.device, self.offset, self.up_interval, self.down_interval, feats)

    def rules(self, length: int, kernel: KernelVersion | None
              ) -> Iterator[tuple[str, str, bool]]:
        if (self.up_interval + self.down_interval) % (1 << 32) == 0:
            yield ("down_interval", "up + down interval is zero (modulo 2^32) (dm-flakey.c: "
                   "Total (up + down) interval is zero)", False)
        elif self.up_interval + self.down_interval > _U32:
            yield ("down_interval", "up + down interval overflows 32 bits (dm-flakey.c: "
                   "Interval overflow)", False)
        words = len(feature_words(self.features, FLAKEY_FEATURES))
        limit = FLAKEY_MAX_ARGS if at_least(kernel, (6, 12)) else FLAKEY_MAX_ARGS_61
        if words > limit:
            yield ("features", f"{words} feature arguments; the kernel takes at most {limit} "
                   "(dm-flakey.c: Invalid number of feature args)", False)
        seen = names(self.features)
        for d in FLAKEY_FEATURES:
            if kernel is not None and d.since is not None and not at_least(kernel, d.since) \
                    and d.name in seen:
                yield ("features", f"{d.name} is not known to kernel {kernel[0]}.{kernel[1]} "
                       "(dm-flakey.c: Unrecognised flakey feature requested)", False)
        for flag in ("drop_writes", "error_writes", "error_reads"):
            if seen.count(flag) > 1:
                yield ("features", f"{flag} given twice (dm-flakey.c: Feature {flag} "
                       "duplicated)", False)
        if "drop_writes" in seen and "error_writes" in seen:
            yield ("features", "drop_writes and error_writes conflict (dm-flakey.c: Feature "
                   "error_writes conflicts with feature drop_writes)", False)
        if at_least(kernel, (6, 16)):
            yield from self._rules_616(seen)
        write_corrupt = False
        for f in self.features:
            if f[0] == "corrupt_bio_byte":
                nth, direction, value = int(f[1]), f[2], int(f[3])
                if nth < 1 or nth > _U32:
                    yield ("features", f"corrupt_bio_byte {nth}: must be 1..{_U32} "
                           "(dm-flakey.c: Invalid corrupt bio byte)", False)
                if direction not in ("r", "w"):
                    yield ("features", f"corrupt_bio_byte direction {direction!r}: r or w "
                           "(dm-flakey.c: Invalid corrupt bio direction (r or w))", False)
                if value > 255:
                    yield ("features", f"corrupt_bio_byte value {value}: 0..255 (dm-flakey.c: "
                           "Invalid corrupt value to write into bio byte (0-255))", False)
                if int(f[4]) > _U32:
                    yield ("features", "corrupt bio flags exceed 32 bits (dm-flakey.c: Invalid "
                           "corrupt bio flags mask)", False)
                write_corrupt = direction == "w"
            elif f[0] in ("random_read_corrupt", "random_write_corrupt") and \
                    int(f[1]) > PROBABILITY_BASE:
                yield ("features", f"{f[0]} {f[1]}: at most {PROBABILITY_BASE} (dm-flakey.c: "
                       "Invalid random corrupt argument)", False)
        if not at_least(kernel, (6, 16)) and write_corrupt and (
                "drop_writes" in seen or "error_writes" in seen):
            # Up to 6.15 only the direction of the last corrupt_bio_byte counts.
            which = "drop_writes" if "drop_writes" in seen else "error_writes"
            yield ("features", f"{which} is incompatible with corrupt_bio_byte on writes "
                   f"(dm-flakey.c: {which} is incompatible with corrupt_bio_byte with the "
                   "WRITE flag set)", False)

    def _rules_616(self, seen: list[str]) -> Iterator[tuple[str, str, bool]]:
        """6.16's stricter parser ("dm-flakey: Clean up parsing messages", and its fix that
        checks corrupt_bio_byte only when given): a valued feature once, and no fault that
        hides the corruption of the same direction."""
        if seen.count("corrupt_bio_byte") > 1:
            yield ("features", "corrupt_bio_byte given twice (dm-flakey.c: Feature "
                   "corrupt_bio_byte duplicated; kernels before 6.16 keep the last)", False)
        rates: dict[str, list[int]] = {"random_read_corrupt": [], "random_write_corrupt": []}
        for f in self.features:
            if f[0] in rates:
                rates[f[0]].append(int(f[1]))
        for name, values in rates.items():
            # The kernel refuses a repeat only after a non-zero rate (0 means "not set").
            if any(values[:-1]):
                yield ("features", f"{name} given again after a non-zero rate (dm-flakey.c: "
                       f"Feature {name} duplicated; kernels before 6.16 keep the last)", False)
        directions = {f[2] for f in self.features if f[0] == "corrupt_bio_byte"}
        rated = {"w": any(rates["random_write_corrupt"]), "r": any(rates["random_read_corrupt"])}
        for which, direction, rate, label in (
                ("drop_writes", "w", "random_write_corrupt", "WRITE"),
                ("error_writes", "w", "random_write_corrupt", "WRITE"),
                ("error_reads", "r", "random_read_corrupt", "READ")):
            if which in seen and (direction in directions or rated[direction]):
                yield ("features", f"{which} is incompatible with {rate} or corrupt_bio_byte "
                       f"{direction!r} (dm-flakey.c: {which} is incompatible with {rate} or "
                       f"corrupt_bio_byte with the {label} flag set)", False)
