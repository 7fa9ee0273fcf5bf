"""Argument helpers shared by the target models, and the output style (kernel, keys).

The kernel splits a target's parameter text with dm_split_args and parses numbers with
sscanf/kstrto*; canonical tables print plain decimals, which is all we accept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dmimage.table.errors import TableError

#: A kernel version as (major, minor); None means the newest behaviour dmimage knows.
KernelVersion = tuple[int, int]


@dataclass(frozen=True)
class Style:
    """How to print a table: which kernel's STATUSTYPE_TABLE text, and whether to show keys.

    ``show_keys=False`` prints a crypt hex key as zeros of the same length, which is what
    ``dmsetup table`` shows without ``--showkeys``; keyring references are never secret.
    """

    kernel: KernelVersion | None = None
    show_keys: bool = False


DEFAULT_STYLE = Style()
#: The style dm-mod.create= and other machine consumers need: the real key.
KEYS_STYLE = Style(show_keys=True)


def parse_kernel(text: str) -> KernelVersion:
    """``6.1`` / ``6.12.117`` -> (6, 1) / (6, 12)."""
    m = re.match(r"(\d+)\.(\d+)", text.strip())
    if not m:
        raise TableError(f"{text!r} is not a kernel version (like 6.1)", field="kernel")
    return int(m.group(1)), int(m.group(2))


def at_least(kernel: KernelVersion | None, version: KernelVersion) -> bool:
    """True if *kernel* (None: the newest) has what *version* introduced."""
    return kernel is None or kernel >= version


_DIGITS = re.compile(r"[0-9]+\Z")


def split_args(params: str) -> list[str]:
    """Split like the kernel's dm_split_args: whitespace separates, a backslash escapes.

    Tokens keep their backslashes (``/dev/a\\ b`` stays one raw token) so they print back
    unchanged.
    """
    out: list[str] = []
    i, n = 0, len(params)
    while True:
        while i < n and params[i].isspace():
            i += 1
        if i >= n:
            return out
        start = i
        while i < n and not params[i].isspace():
            i += 2 if params[i] == "\\" and i + 1 < n else 1
        out.append(params[start:min(i, n)])


def parse_number(text: str, *, target: str | None, field: str, line: int | None,
                 limit: int = (1 << 64) - 1) -> int:
    """A plain decimal number, as every canonical table prints them."""
    if not _DIGITS.match(text):
        raise TableError(f"{text!r} is not a decimal number", line=line, field=field,
                         target=target)
    value = int(text)
    if value > limit:
        raise TableError(f"{value} does not fit (at most {limit})", line=line, field=field,
                         target=target)
    return value


def device_arg(text: str, *, target: str, field: str, line: int | None) -> str:
    if not text:
        raise TableError("missing device", line=line, field=field, target=target)
    return text


def check_count(args: Sequence[str], allowed: Callable[[int], bool], usage: str, *, target: str,
           line: int | None) -> None:
    if not allowed(len(args)):
        raise TableError(f"{len(args)} arguments, expected {usage}", line=line, field="args",
                         target=target)
