"""Metadata device size estimates, with thin_metadata_size 1.x's answers, units and rounding.

Estimate (thin-format.md §10): one block for the superblock, one leaf per 126 data blocks
(mapping leaves assumed half full) and one root per thin, capped at the 4,161,600 blocks a
metadata device can use; times 4 KiB.

Public API: :func:`metadata_size` (bytes), :func:`parse_size`, :func:`parse_unit`,
:func:`format_size` and :data:`UNITS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from dmimage.errors import UsageError
from dmimage.format.constants import BLOCK_SIZE, MAX_METADATA_BLOCKS, max_entries

MIN_DATA_BLOCK_BYTES = 64 << 10
MAX_DATA_BLOCK_BYTES = 1 << 30
U64_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Unit:
    bytes: int
    #: thin_metadata_size's long name (it calls TiB "terabyte"; kept for identical output)
    name: str
    letter: str


_B, _S = Unit(1, "byte", "b"), Unit(512, "sector", "s")
_BIN = [Unit(1 << (10 * i), n, ltr) for i, n, ltr in (
    (1, "kibibyte", "k"), (2, "mebibyte", "m"), (3, "gibibyte", "g"), (4, "terabyte", "t"),
    (5, "pebibyte", "p"), (6, "exbibyte", "e"))]
_DEC = [Unit(10 ** (3 * i), n, ltr) for i, n, ltr in (
    (1, "kilobyte", "K"), (2, "megabyte", "M"), (3, "gigabyte", "G"), (4, "terabyte", "T"),
    (5, "petabyte", "P"), (6, "exabyte", "E"))]

#: Every spelling thin_metadata_size accepts, for -u and as a size suffix.
UNITS: dict[str, Unit] = {"byte": _B, "b": _B, "sector": _S, "s": _S}
for _u, _long, _iec in zip(_BIN, ("kibibyte", "mebibyte", "gibibyte", "tebibyte", "pebibyte",
                                  "exbibyte"), ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"),
                           strict=True):
    UNITS.update({_long: _u, _iec: _u, _u.letter: _u})
for _u, _si in zip(_DEC, ("kB", "MB", "GB", "TB", "PB", "EB"), strict=True):
    UNITS.update({_u.name: _u, _si: _u, _u.letter: _u})


def parse_unit(text: str) -> Unit:
    try:
        return UNITS[text]
    except KeyError:
        raise UsageError("Invalid unit specifier") from None


def parse_size(text: str) -> int:
    """'64k', '1t', '2048' (sectors by default), '1024b' ... -> bytes."""
    i = 0
    while i < len(text) and text[i].isascii() and text[i].isdigit():
        i += 1
    digits, suffix = text[:i], text[i:]
    if not digits:
        raise UsageError("cannot parse integer from empty string" if not text or i == 0
                         and not suffix[:1].isdigit() else "invalid digit found in string")
    multiple = int(digits)
    if multiple > U64_MAX:
        raise UsageError("number too large to fit in target type")
    unit = parse_unit(suffix) if suffix else _S
    if multiple > U64_MAX // unit.bytes:
        raise UsageError("value out of bounds")
    return multiple * unit.bytes


def check_data_block_size(block_bytes: int) -> None:
    if block_bytes == 0 or block_bytes % MIN_DATA_BLOCK_BYTES:
        raise UsageError("block size must be a multiple of 64 KiB")
    if block_bytes > MAX_DATA_BLOCK_BYTES:
        raise UsageError("maximum block size is 1 GiB")


def metadata_size(block_size: int, pool_size: int, max_thins: int) -> int:
    """Estimated metadata device size in bytes (block_size, pool_size in bytes)."""
    check_data_block_size(block_size)
    if pool_size < block_size:
        raise UsageError("pool size must be larger than block size")
    nr_blocks = pool_size // block_size
    per_leaf = max_entries(8) // 2
    blocks = 1 + -(-nr_blocks // per_leaf) + max_thins
    return min(blocks, MAX_METADATA_BLOCKS) * BLOCK_SIZE


def _shortest(x: float) -> str:
    """Rust's ``{}`` for f64: shortest round-trip digits, never an exponent."""
    if x == int(x):
        return str(int(x))
    s = format(Decimal(repr(x)), "f")
    return s


def format_size(nbytes: int, unit: Unit, numeric: str | None = None) -> str:
    """The printed answer. ``numeric``: None (value and plural unit name), "plain" (value
    only), "short" (value and unit letter), "long" (value and plural name, no space)."""
    size = nbytes / unit.bytes
    text = _shortest(size) if size < 1.0 or size == int(size) else f"{size:.2f}"
    if numeric is None:
        return f"{text} {unit.name}s"
    if numeric == "short":
        return text + unit.letter
    if numeric == "long":
        return f"{text}{unit.name}s"
    return text
