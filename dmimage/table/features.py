"""Optional feature arguments: ``<#args> <arg>*`` as the kernel's dm_read_arg_group reads them.

Each target lists its features in the order its status function prints them; a feature is a
name (matched with strcasecmp, printed in lower case) followed by a fixed number of value
words, or (crypt) one ``name:value`` word. A parsed feature is a tuple of words,
``("corrupt_bio_byte", "32", "r", "1", "0")``; the target keeps them in kernel print order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dmimage.table.args import KernelVersion, parse_number
from dmimage.table.errors import TableError

Feature = tuple[str, ...]


@dataclass(frozen=True)
class FeatureDef:
    """One optional argument a constructor knows.

    ``values`` names the value words after the name; ``colon`` marks the single-word
    ``name:value`` form. ``since`` is the first kernel we checked that accepts it (older
    ones refuse it as an unknown feature). ``numeric`` lists which values are decimals.
    """

    name: str
    values: tuple[str, ...] = ()
    colon: bool = False
    since: KernelVersion | None = None
    numeric: tuple[bool, ...] = ()

    @property
    def words(self) -> int:
        return 1 if self.colon else 1 + len(self.values)


def _find(word: str, defs: Sequence[FeatureDef]) -> FeatureDef | None:
    low = word.lower()
    for d in defs:
        if d.colon:
            if low.startswith(d.name + ":"):
                return d
        elif low == d.name:
            return d
    return None


def parse_features(args: Sequence[str], defs: Sequence[FeatureDef], *, target: str,
                   line: int | None, field: str = "#feature_args") -> tuple[Feature, ...]:
    """``args`` starts at the count word. Returns the features in the order given.

    The count must match the words that follow: fewer words is what the kernel refuses
    ("Not enough arguments"); more it silently ignores, which we refuse as a likely mistake.
    """
    if not args:
        return ()
    count = parse_number(args[0], target=target, field=field, line=line, limit=(1 << 32) - 1)
    rest = list(args[1:])
    if count != len(rest):
        raise TableError(f"count says {count} feature arguments, {len(rest)} follow", line=line,
                         field=field, target=target)
    out: list[Feature] = []
    i = 0
    while i < len(rest):
        d = _find(rest[i], defs)
        if d is None:
            raise TableError(f"unknown feature {rest[i]!r} (known: "
                             f"{', '.join(x.name for x in defs)})", line=line,
                             field="features", target=target)
        if d.colon:
            out.append((d.name, rest[i][len(d.name) + 1:]))
            i += 1
            continue
        vals = rest[i + 1:i + 1 + len(d.values)]
        if len(vals) != len(d.values):
            raise TableError(f"{d.name} needs {len(d.values)} values "
                             f"({' '.join(d.values)}), {len(vals)} follow", line=line,
                             field="features", target=target)
        words = [d.name]
        for k, (v, label) in enumerate(zip(vals, d.values, strict=True)):
            numeric = d.numeric[k] if k < len(d.numeric) else True
            words.append(str(parse_number(v, target=target, field=f"{d.name} {label}",
                                          line=line, limit=(1 << 64) - 1))
                         if numeric else v)
        out.append(tuple(words))
        i += d.words
    return tuple(out)


def ordered(features: Iterable[Feature], defs: Sequence[FeatureDef]) -> tuple[Feature, ...]:
    """Kernel print order (stable for repeats)."""
    rank = {d.name: k for k, d in enumerate(defs)}
    return tuple(sorted(features, key=lambda f: rank.get(f[0], len(rank))))


def feature_words(features: Iterable[Feature], defs: Sequence[FeatureDef]) -> list[str]:
    """The words the features print as."""
    colon = {d.name for d in defs if d.colon}
    out: list[str] = []
    for f in features:
        if f[0] in colon:
            out.append(f"{f[0]}:{f[1]}")
        else:
            out.extend(f)
    return out


def feature_text(f: Feature, defs: Sequence[FeatureDef]) -> str:
    """One feature as one string (the JSON form): ``sector_size:4096``, ``fec_roots 2``."""
    return " ".join(feature_words([f], defs))


def features_from_texts(texts: Sequence[str], defs: Sequence[FeatureDef], *, target: str,
                        line: int | None) -> tuple[Feature, ...]:
    """The inverse of :func:`feature_text` over a list (JSON reading)."""
    words = [w for t in texts for w in t.split()]
    return parse_features([str(len(words)), *words], defs, target=target, line=line,
                          field="features")


def names(features: Iterable[Feature]) -> list[str]:
    return [f[0] for f in features]
