"""Size arguments: plain bytes, or a number with a binary suffix (K, M, G, T) or 's' sectors."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50}
_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]?)(?:i?[bB])?\s*$")


def parse_size(text: str) -> int:
    m = _RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 64K, 2G, 128s)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_uint(text: str) -> int:
    """A non-negative decimal integer (ids, block counts, sector sizes)."""
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return v
