"""`dmimage metadata-size`: estimate the metadata device size (thin_metadata_size 1.x)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from dmimage.thin.metadata_size import Unit

T = TypeVar("T")


def _typed(parse: Callable[[str], T]) -> Callable[[str], T]:
    def conv(text: str) -> T:
        from dmimage.errors import UsageError

        try:
            return parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return conv


def _size(text: str) -> int:
    from dmimage.thin.metadata_size import parse_size

    return parse_size(text)


def _unit(text: str) -> Unit:
    from dmimage.thin.metadata_size import parse_unit

    return parse_unit(text)


def _count(text: str) -> int:
    from dmimage.errors import UsageError

    if not text.isascii() or not text.isdigit():
        raise UsageError("invalid digit found in string")
    v = int(text)
    if v > (1 << 64) - 1:
        raise UsageError("number too large to fit in target type")
    return v


def _numeric_opt(text: str) -> str:
    if text not in ("short", "long", "plain"):
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (possible values: short, long)")
    return text


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "metadata-size",
        help="estimate the metadata device size for a pool (like thin_metadata_size)",
        description="Estimate the size of the metadata device needed for a given "
                    "configuration; same options and answers as thin_metadata_size 1.x.")
    p.add_argument("-b", "--block-size", required=True, type=_typed(_size),
                   metavar="SIZE[bskmg]", help="data block size (default unit: sectors)")
    p.add_argument("-s", "--pool-size", required=True, type=_typed(_size),
                   metavar="SIZE[bskmgtp]", help="size of the pool's data device")
    p.add_argument("-m", "--max-thins", required=True, type=_typed(_count), metavar="NUM",
                   help="maximum number of thin devices and snapshots")
    p.add_argument("-u", "--unit", type=_typed(_unit), default="sector", metavar="UNIT",
                   help="output unit in {bskKmMgG} (default: sector)")
    p.add_argument("-n", "--numeric-only", nargs="?", const="plain", type=_numeric_opt,
                   metavar="OPT", help="print the number only (=short: with the unit letter, "
                   "=long: with the unit name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dmimage.thin.metadata_size import format_size, metadata_size, parse_unit

    unit = parse_unit(args.unit) if isinstance(args.unit, str) else args.unit
    nbytes = metadata_size(args.block_size, args.pool_size, args.max_thins)
    print(format_size(nbytes, unit, args.numeric_only))
    return 0
