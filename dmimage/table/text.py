"""The text form of tables: what ``dmsetup table`` prints and ``dmsetup load`` reads.

Reading follows dmsetup's table files: blank lines and lines whose first non-blank character
is ``#`` are skipped; each other line is ``start length type params``. Writing reproduces the
kernel's output exactly: dmsetup prints ``"%llu %llu %s %s"`` with the target's status text,
so a target with no parameters (``zero``) ends in a space, and a thin-pool's feature list
ends in one too (dm-thin.c emit_flags()).
"""

from __future__ import annotations

import re

from dmimage.table.args import DEFAULT_STYLE, Style
from dmimage.table.errors import TableError
from dmimage.table.model import Entry, Table
from dmimage.table.targets import parse_number, target_from_params

_LINE = re.compile(r"\s*(\S+)\s+(\S+)\s+(\S+)(?:[ \t]+(.*))?\Z", re.S)
_DEVICE_PREFIX = re.compile(r"(\S+): (.*)\Z", re.S)


def parse_entry(text: str, line: int | None = None) -> Entry:
    """Parse one ``start length type params`` line."""
    m = _LINE.match(text)
    if not m:
        raise TableError("expected 'start length target [args...]'", line=line)
    start_s, length_s, type_name, params = m.groups()
    start = parse_number(start_s, target=None, field="start", line=line)
    length = parse_number(length_s, target=None, field="length", line=line)
    target = target_from_params(type_name, params or "", line)
    return Entry(start, length, target)


def _lines(text: str) -> list[tuple[int, str]]:
    out = []
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        out.append((number, raw))
    return out


def parse_table(text: str) -> Table:
    """Parse a table: ``dmsetup table`` output, or a table file with comments and blanks.

    Raises :class:`TableError` naming the line for anything the model cannot hold; rules
    about values (gaps, block sizes ...) are checked by :meth:`Table.validate`.
    """
    entries, lines = [], []
    for number, raw in _lines(text):
        entries.append(parse_entry(raw, number))
        lines.append(number)
    return Table(tuple(entries), tuple(lines))


def parse_tables(text: str) -> dict[str, Table]:
    """Parse ``dmsetup table`` output for several devices (``name: start length ...``)."""
    found: dict[str, tuple[list[Entry], list[int]]] = {}
    for number, raw in _lines(text):
        m = _DEVICE_PREFIX.match(raw.strip("\r"))
        if not m:
            raise TableError("expected 'name: start length target [args...]'", line=number)
        name, rest = m.groups()
        entries, lines = found.setdefault(name, ([], []))
        entries.append(parse_entry(rest, number))
        lines.append(number)
    return {name: Table(tuple(e), tuple(n)) for name, (e, n) in found.items()}


def format_entry(entry: Entry, style: Style = DEFAULT_STYLE) -> str:
    """One line, without newline, exactly as dmsetup prints it."""
    return f"{entry.start} {entry.length} {entry.type_name} {entry.target.params(style)}"


def format_table(table: Table, style: Style = DEFAULT_STYLE) -> str:
    """The table as ``dmsetup table`` prints it: one line per target, each ending in newline.

    By default crypt hex keys print as zeros, as ``dmsetup table`` shows them; pass
    ``Style(show_keys=True)`` for the real key (``dmsetup table --showkeys``), and
    ``Style(kernel=(6, 1))`` for an older kernel's spelling where it differs (flakey).
    """
    return "".join(format_entry(e, style) + "\n" for e in table.entries)
