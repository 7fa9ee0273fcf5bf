"""Attribute readers for the XML inputs of the restore commands (cache, era): every
malformation is an InputError naming the element and attribute, never a traceback."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Literal

from dmimage.errors import InputError


def xml_events(path: str, events: tuple[Literal["start", "end"], ...] = ("start",)
               ) -> Iterator[tuple[str, ET.Element]]:
    """iterparse (streaming) with a malformed or unreadable file turned into an InputError
    naming it."""
    try:
        yield from ET.iterparse(path, events=events)
    except ET.ParseError as exc:
        raise InputError(f"{path}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None


def int_attr(elem: ET.Element, name: str, limit: int = 2**64) -> int:
    """A decimal attribute in ``[0, limit)``."""
    raw = elem.get(name)
    if raw is None:
        raise InputError(f"<{elem.tag}>: missing attribute {name}")
    try:
        v = int(raw, 10)
    except ValueError:
        raise InputError(f"<{elem.tag}> {name}={raw!r}: not a number") from None
    if not 0 <= v < limit:
        raise InputError(f"<{elem.tag}> {name}={v}: out of range")
    return v


def bool_attr(elem: ET.Element, name: str) -> bool:
    raw = elem.get(name)
    if raw not in ("true", "false"):
        raise InputError(f"<{elem.tag}>: {name} must be true or false, not {raw!r}")
    return raw == "true"


def known_attrs(elem: ET.Element, names: set[str]) -> None:
    extra = set(elem.attrib) - names
    if extra:
        raise InputError(f"<{elem.tag}>: unknown attribute {sorted(extra)[0]}")
