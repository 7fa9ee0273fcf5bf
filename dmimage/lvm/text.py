"""lvm2's metadata text format: a tokenizer/parser to an ordered tree, and a formatter.

The grammar follows libdm's config parser (libdm/libdm-config.c): ``key = value`` and
``name { ... }`` items; values are integers, floats, "double-quoted" strings (``\\"`` and ``\\\\``
are the only escapes, any other backslash is kept), 'single-quoted' strings (no escapes),
bare words, and ``[ ... ]`` lists whose commas are optional; ``#`` starts a comment to the end
of the line. A repeated value key keeps the last value and a repeated section merges into the
first, as libdm does. The text on disk ends with a NUL, which ends the input.

The tree is plain Python: a :class:`Section` (an ordered dict) maps keys to scalars
(int, float, str), lists of scalars, or nested sections.
"""

from __future__ import annotations

import re
from typing import TypeAlias, Union

from dmimage.errors import MetadataError

Scalar: TypeAlias = int | float | str
Value: TypeAlias = Union[Scalar, list[Scalar], "Section"]


class Section(dict[str, Value]):
    """An ordered ``name { ... }`` block (the whole text is the top-level section)."""


class TextError(MetadataError):
    """The metadata text does not parse; names the line."""

    def __init__(self, message: str, line: int, source: str = "metadata text"):
        super().__init__(f"{source} line {line}: {message}")
        self.line = line


_SPACE = " \t\n\v\f\r"
_IDENT_STOP = set(_SPACE) | set("#={}")
_NUMBER_START = set("0123456789+-.")
_INT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT = re.compile(r"[+-]?[0-9]*\.[0-9]*\Z")


class _Lexer:
    def __init__(self, text: str, source: str):
        end = text.find("\0")
        self.s = text if end < 0 else text[:end]
        self.i = 0
        self.line = 1
        self.source = source

    def error(self, msg: str) -> TextError:
        return TextError(msg, self.line, self.source)

    def skip(self) -> None:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c == "\n":
                self.line += 1
                self.i += 1
            elif c in _SPACE:
                self.i += 1
            elif c == "#":
                j = s.find("\n", self.i)
                self.i = n if j < 0 else j
            else:
                break

    def peek(self) -> str:
        self.skip()
        return self.s[self.i] if self.i < len(self.s) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            got = repr(self.s[self.i]) if self.i < len(self.s) else "end of text"
            raise self.error(f"expected {ch!r}, found {got}")
        self.i += 1

    def quoted(self) -> str:
        s, q = self.s, self.s[self.i]
        j = self.i + 1
        out: list[str] = []
        while True:
            if j >= len(s):
                raise self.error("unterminated string")
            c = s[j]
            if c == q:
                break
            if c == "\n":
                self.line += 1
            if q == '"' and c == "\\" and j + 1 < len(s) and s[j + 1] in '"\\':
                out.append(s[j + 1])
                j += 2
                continue
            out.append(c)
            j += 1
        self.i = j + 1
        return "".join(out)

    def word(self) -> str:
        s, j = self.s, self.i
        while j < len(s) and s[j] not in _IDENT_STOP:
            j += 1
        w = s[self.i:j]
        self.i = j
        return w

    def name(self) -> str:
        c = self.peek()
        if c in ('"', "'"):
            name = self.quoted()
        elif c in ("", "{", "}", "=", "[", "]", ","):
            raise self.error(f"expected a key or section name, found {c or 'end of text'!r}")
        else:
            name = self.word()
        if not name:
            raise self.error("empty section identifier")
        return name

    def scalar(self) -> Scalar:
        c = self.peek()
        if c in ('"', "'"):
            return self.quoted()
        if c == "" or c in "{}=[],":
            raise self.error(f"expected a value, found {c or 'end of text'!r}")
        if c in _NUMBER_START:
            j = self.i + 1
            while j < len(self.s) and (self.s[j].isdigit() or self.s[j] == "."):
                j += 1
            tok = self.s[self.i:j]
            if _INT.match(tok):
                self.i = j
                return int(tok)
            if _FLOAT.match(tok) and any(ch.isdigit() for ch in tok):
                self.i = j
                return float(tok)
        # lvm2 reads anything else as a bare string up to a space, '#', '=', '{' or '}'
        j = self.i
        while j < len(self.s) and self.s[j] not in _IDENT_STOP and self.s[j] not in ",]":
            j += 1
        w = self.s[self.i:j]
        self.i = j
        return w

    def value(self) -> Scalar | list[Scalar]:
        if self.peek() != "[":
            return self.scalar()
        self.i += 1
        items: list[Scalar] = []
        while True:
            c = self.peek()
            if c == "]":
                self.i += 1
                return items
            if c == "":
                raise self.error("unterminated list")
            items.append(self.scalar())
            if self.peek() == ",":
                self.i += 1

    def section_body(self, into: Section, closing: bool) -> None:
        while True:
            c = self.peek()
            if c == "":
                if closing:
                    raise self.error("unbalanced braces: end of text inside a section")
                return
            if c == "}":
                if not closing:
                    raise self.error("unbalanced braces: '}' without a section")
                self.i += 1
                return
            key = self.name()
            if self.peek() == "{":
                self.i += 1
                sub = into.get(key)
                if not isinstance(sub, Section):
                    sub = Section()
                    into[key] = sub
                self.section_body(sub, True)
            else:
                self.expect("=")
                into[key] = self.value()


def parse(text: str | bytes, source: str = "metadata text") -> Section:
    """Parse metadata (or vgcfgbackup) text into a tree; TextError names the line."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="surrogateescape")
    root = Section()
    _Lexer(text, source).section_body(root, False)
    return root


def quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _scalar(v: Scalar) -> str:
    if isinstance(v, bool):
        raise TypeError("booleans are not a metadata value")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    return quote(v)


def _key(k: str) -> str:
    if not k or any(ch in _IDENT_STOP or ch in "\"'[]," for ch in k) or k[0] in _NUMBER_START:
        return quote(k)
    return k


def format_section(tree: Section, indent: int = 0) -> str:
    """Text lvm2 can parse: tab-indented, one item per line, strings always quoted."""
    out: list[str] = []
    pad = "\t" * indent
    for key, value in tree.items():
        if isinstance(value, Section):
            out.append(f"{pad}{_key(key)} {{\n")
            out.append(format_section(value, indent + 1))
            out.append(f"{pad}}}\n")
            if indent <= 1:
                out.append("\n")
        elif isinstance(value, list):
            out.append(f"{pad}{_key(key)} = [" + ", ".join(_scalar(x) for x in value) + "]\n")
        else:
            out.append(f"{pad}{_key(key)} = {_scalar(value)}\n")
    return "".join(out)
