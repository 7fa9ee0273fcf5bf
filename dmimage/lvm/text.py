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
from operator import itemgetter
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
#: One significant token per match, after any space and comments: a "string" (a backslash
#: takes the next character along, as libdm's tokenizer does), a 'string', punctuation, a bare
#: word, or (last group) a character that starts no token: an unterminated string.
_TOKEN = re.compile(r"""
    (?:[ \t\n\v\f\r]+|\#[^\n]*)*
    (?: ("(?:[^"\\]|\\.)*")
      | ('[^']*')
      | ([{}\[\]=,])
      | ([^ \t\n\v\f\r\#={}\[\],"']+)
      | \Z
      | (.) )
""", re.X | re.S)
_UNESCAPE = re.compile(r'\\(["\\])')
_DQ, _SQ, _PUNCT, _WORD, _BAD = range(5)
_NONE = ("", "", "", "", "")


class _Parser:
    """Recursive descent over findall's token tuples; positions only for error lines."""

    def __init__(self, text: str, source: str):
        end = text.find("\0")
        self.s = text if end < 0 else text[:end]
        self.source = source
        #: findall's 5-tuples (dq, sq, punct, word, bad): exactly one member is non-empty
        self.toks: list[tuple[str, str, str, str, str]] = _TOKEN.findall(self.s)
        while self.toks and self.toks[-1] == _NONE:  # only the end of the text matches empty
            self.toks.pop()
        self.i = 0
        if any(map(itemgetter(_BAD), self.toks)):
            bad = [i for i, t in enumerate(self.toks) if t[_BAD]]
            self.i = bad[0]
            tok = self.toks[bad[0]][_BAD]
            raise self.error("unterminated string" if tok in "\"'" else
                             f"unexpected character {tok!r}")

    def _pos(self, index: int) -> int:
        for i, m in enumerate(_TOKEN.finditer(self.s)):
            if i == index:
                return m.start(m.lastindex or 0)
        return len(self.s)

    def error(self, msg: str) -> TextError:
        pos = self._pos(self.i)
        return TextError(msg, self.s.count("\n", 0, pos) + 1, self.source)

    def _found(self) -> str:
        return repr("".join(self.toks[self.i])) if self.i < len(self.toks) else "end of text"

    @staticmethod
    def _string(t: tuple[str, str, str, str, str]) -> str:
        if t[_DQ]:
            body = t[_DQ][1:-1]
            return _UNESCAPE.sub(r"\1", body) if "\\" in body else body
        return t[_SQ][1:-1]

    def name(self) -> str:
        if self.i >= len(self.toks) or self.toks[self.i][_PUNCT]:
            raise self.error(f"expected a key or section name, found {self._found()}")
        t = self.toks[self.i]
        self.i += 1
        name = t[_WORD] or self._string(t)
        if not name:
            raise self.error("empty section identifier")
        return name

    def scalar(self) -> Scalar:
        if self.i >= len(self.toks) or self.toks[self.i][_PUNCT]:
            raise self.error(f"expected a value, found {self._found()}")
        t = self.toks[self.i]
        self.i += 1
        tok = t[_WORD]
        if not tok:
            return self._string(t)
        if tok[0] in _NUMBER_START:
            if _INT.match(tok):
                return int(tok)
            if _FLOAT.match(tok) and any(ch.isdigit() for ch in tok):
                return float(tok)
        return tok

    def punct(self) -> str:
        return self.toks[self.i][_PUNCT] if self.i < len(self.toks) else ""

    def value(self) -> Scalar | list[Scalar]:
        if self.punct() != "[":
            return self.scalar()
        self.i += 1
        items: list[Scalar] = []
        while True:
            p = self.punct()
            if p == "]":
                self.i += 1
                return items
            if self.i >= len(self.toks):
                raise self.error("unterminated list")
            items.append(self.scalar())
            if self.punct() == ",":
                self.i += 1

    def section_body(self, into: Section, closing: bool) -> None:
        """The items of ``into`` up to its '}' (``closing``) or the end of the text. One
        loop with an explicit stack and the common cases inlined: ``lvm ls`` of a VG with
        thousands of LVs spends most of its time here."""
        toks, n = self.toks, len(self.toks)
        stack = [into]
        cur = into
        i = self.i
        num_start, int_re = _NUMBER_START, _INT
        while True:
            if i >= n:
                self.i = i
                if closing or len(stack) > 1:
                    raise self.error("unbalanced braces: end of text inside a section")
                return
            t = toks[i]
            if t[_PUNCT] == "}":
                if len(stack) == 1:
                    if not closing:
                        self.i = i
                        raise self.error("unbalanced braces: '}' without a section")
                    self.i = i + 1
                    return
                stack.pop()
                cur = stack[-1]
                i += 1
                continue
            key = t[_WORD]
            if key:
                i += 1
            else:
                self.i = i
                key = self.name()
                i = self.i
            p = toks[i][_PUNCT] if i < n else ""
            if p == "{":
                i += 1
                sub = cur.get(key)
                if not isinstance(sub, Section):
                    sub = Section()
                    cur[key] = sub
                stack.append(sub)
                cur = sub
            elif p == "=":
                i += 1
                t = toks[i] if i < n else _NONE
                word = t[_WORD]
                if word and word[0] not in num_start:
                    cur[key] = word
                    i += 1
                elif word and int_re.match(word):
                    cur[key] = int(word)
                    i += 1
                elif t[_DQ] and "\\" not in t[_DQ]:
                    cur[key] = t[_DQ][1:-1]
                    i += 1
                elif t[_PUNCT] == "[" and i + 1 < n and toks[i + 1][_PUNCT] == "]":
                    cur[key] = []
                    i += 2
                else:
                    self.i = i
                    cur[key] = self.value()
                    i = self.i
            else:
                self.i = i
                raise self.error(f"expected '=', found {self._found()}")


def parse(text: str | bytes, source: str = "metadata text") -> Section:
    """Parse metadata (or vgcfgbackup) text into a tree; TextError names the line."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="surrogateescape")
    root = Section()
    _Parser(text, source).section_body(root, False)
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
