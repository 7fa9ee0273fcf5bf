"""thin_dump's mapping lines turned into numbers by whole-array operations, every byte checked.

A run of lines in thin_dump's own layout (each ``\\n`` + four spaces + one mapping element)::

    <single_mapping origin_block="O" data_block="D" time="T"/>
    <range_mapping origin_begin="O" data_begin="D" length="L" time="T"/>

is fixed text with decimal numbers between its quotes. :func:`scan_lines` finds every number's
closing quote at once (a digit followed by ``"``), reads the 8-byte word after each to learn
which attribute comes next (so where each line ends and which element it is), then proves the
text around the numbers is exactly the layout (word and row gathers compared with the
constants) and that the numbers are all digits (their lengths add up to the digits counted in
the piece, and no other byte may be one). Each number is converted from the word that ends
at its closing quote by SWAR arithmetic (8 digits a word, two words up to 16 digits).

Anything else (other spacing or attribute order, entities, comments, longer numbers, refs and
end tags) is not accepted: the caller then takes its general path, so the answer for a valid
XML never depends on which path read it. Costs per 1M lines are a few passes over the bytes
(cache-sized pieces) and gathers of a few words per line, against one Python callback per
element for a SAX parser.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

U8 = np.dtype("u1")
U64 = np.dtype("<u8")
U32 = np.dtype("<u4")

HEAD_SINGLE = b'\n    <single_mapping origin_block="'
HEAD_RANGE = b'\n    <range_mapping origin_begin="'
TAIL = b'"/>'
#: A line's element start without the newline and indentation (what follows an end word).
_ELEM_SINGLE = HEAD_SINGLE[5:]
_ELEM_RANGE = HEAD_RANGE[5:]


def _word(text: bytes) -> np.uint64:
    return np.frombuffer(text, U64)[0]  # type: ignore[no-any-return]


#: The 8 bytes from a closing quote: which attribute (or the line's end) follows it.
W_DATA = _word(b'" data_b')
W_TIME = _word(b'" time="')
W_LENGTH = _word(b'" length')
W_END = _word(b'"/>\n    ')
#: The rest of ``" data_block="`` / ``" data_begin="`` (the word 6 bytes after the quote) and
#: of ``" length="`` (2 bytes after it).
_W_BLOCK_TAIL = _word(b'_block="')
_W_BEGIN_TAIL = _word(b'_begin="')
_W_LENGTH_TAIL = _word(b'length="')

#: Bytes from a closing quote to the next number, by the number's place in its line
#: (the last place: ``"/>`` plus the next line's head, added per line).
_GAP_SINGLE = np.array([14, 8, 3], np.int64)
_GAP_RANGE = np.array([14, 10, 8, 3], np.int64)
_EXPECT_SINGLE = np.array([W_DATA, W_TIME, W_END, 0], U64)
_EXPECT_RANGE = np.array([W_DATA, W_LENGTH, W_TIME, W_END], U64)

#: Longest number read here: two words. Longer ones (u64 has 20 digits) take the general path.
MAX_DIGITS = 16

_K0F = np.uint64(0x0F0F0F0F0F0F0F0F)
#: Low nibbles of the last ``n`` bytes of a word (the digits of an n-digit number ending there).
_DIGIT_MASK = np.array([0] + [(0x0F0F0F0F0F0F0F0F << (8 * (8 - n))) & (2**64 - 1)
                              for n in range(1, 9)], U64)
_M8 = np.uint64(0x00FF00FF00FF00FF)
_M16 = np.uint64(0x0000FFFF0000FFFF)
_M32 = np.uint64(0xFFFFFFFF)
_E8 = np.uint64(10**8)


class Lines(NamedTuple):
    """The mappings of a piece, one entry per line; ``length`` is None when every line is a
    single mapping (all lengths 1)."""

    origin: np.ndarray
    data: np.ndarray
    length: np.ndarray | None
    time: np.ndarray


class Buffer:
    """Views of one input buffer the scanner gathers from; made once per buffer, as the
    buffer is reused (its bytes change, not its address or size)."""

    def __init__(self, buf: bytes | bytearray) -> None:
        self.buf = buf
        self.bytes = np.frombuffer(buf, U8)
        n = len(buf)
        #: the 8 bytes at every offset (unaligned, overlapping)
        self.words = np.ndarray((max(n - 7, 0),), U64, buf, 0, (1,))
        self.elem_single = np.ndarray((max(n - len(_ELEM_SINGLE) + 1, 0), len(_ELEM_SINGLE)),
                                      U8, buf, 0, (1, 1))
        self.elem_range = np.ndarray((max(n - len(_ELEM_RANGE) + 1, 0), len(_ELEM_RANGE)),
                                     U8, buf, 0, (1, 1))


_ELEM_SINGLE_ROW = np.frombuffer(_ELEM_SINGLE, U8)
_ELEM_RANGE_ROW = np.frombuffer(_ELEM_RANGE, U8)


def _numbers(words: np.ndarray, ends: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The values of the numbers that end (exclusive) at ``ends``, ``lengths`` digits each
    (1..16, already known to be digits)."""
    short = np.minimum(lengths, 8)
    v: np.ndarray = words[ends - 8]
    v &= _DIGIT_MASK[short]
    _swar(v)
    long_ = np.flatnonzero(lengths > 8)
    if len(long_):
        hi = words[ends[long_] - 16]
        hi &= _DIGIT_MASK[lengths[long_] - 8]
        _swar(hi)
        v[long_] += hi * _E8
    return v


def _swar(v: np.ndarray) -> None:
    """In place: a word of digit values (most significant first in memory, leading zeros) ->
    its value: pairs, then quads, then the eight combined by multiply-and-add."""
    t = v * np.uint64(10)
    v >>= np.uint64(8)
    v += t
    v &= _M8
    np.multiply(v, np.uint64(100), out=t)
    v >>= np.uint64(16)
    v += t
    v &= _M16
    np.multiply(v, np.uint64(10000), out=t)
    v >>= np.uint64(32)
    v += t
    v &= _M32


def scan_lines(src: Buffer, lo: int, hi: int) -> Lines | None:
    """The mapping lines in ``src.buf[lo:hi]`` (each starting with its newline; trailing
    whitespace allowed), or None when the piece is not exactly in thin_dump's layout."""
    buf = src.buf
    while hi > lo and buf[hi - 1] in b" \t\r\n":
        hi -= 1
    if hi == lo:
        empty = np.empty(0, U64)
        return Lines(empty, empty, None, np.empty(0, U32))
    if buf[hi - 3:hi] != TAIL:
        return None
    piece = src.bytes[lo:hi]
    digit = piece - np.uint8(48)
    np.less(digit, 10, out=digit.view(bool))
    isdigit = digit.view(bool)
    closing = np.equal(piece[1:], 34)
    closing &= isdigit[:-1]
    ends = np.flatnonzero(closing)
    ends += lo + 1
    n = len(ends)
    if n < 3 or int(ends[-1]) != hi - 3:
        return None
    ndigits = int(np.count_nonzero(isdigit))
    words = src.words
    after = words[ends[:-1]]
    if n % 3 == 0 and buf[lo:lo + len(HEAD_SINGLE)] == HEAD_SINGLE:
        got = _singles(src, lo, ends, after, ndigits)
        if got is not None:
            return got
    return _mixed(src, lo, ends, after, ndigits)


def _singles(src: Buffer, lo: int, ends: np.ndarray, after: np.ndarray,
             ndigits: int) -> Lines | None:
    """Every line a single mapping: three numbers a line, fixed gaps."""
    words = src.words
    if not (bool(np.all(after[0::3] == W_DATA)) and bool(np.all(after[1::3] == W_TIME))
            and bool(np.all(after[2::3] == W_END))):
        return None
    last = ends[2::3]
    if not bool(np.all(words[ends[0::3] + 6] == _W_BLOCK_TAIL)):
        return None
    if len(last) > 1 and not bool(
            np.all(src.elem_single[last[:-1] + 8] == _ELEM_SINGLE_ROW)):
        return None
    starts = np.empty_like(ends)
    starts[0] = lo + len(HEAD_SINGLE)
    starts[1::3] = ends[0::3] + 14
    starts[2::3] = ends[1::3] + 8
    starts[3::3] = last[:-1] + len(TAIL) + len(HEAD_SINGLE)
    lengths = ends - starts
    if int(lengths.sum()) != ndigits or int(lengths.min()) < 1 or \
            int(lengths.max()) > MAX_DIGITS:
        return None
    origin = _numbers(words, ends[0::3], lengths[0::3])
    data = _numbers(words, ends[1::3], lengths[1::3])
    if int(lengths[2::3].max()) == 1:  # one-digit times (thin_dump's usual "0"): the digit
        time = src.bytes[last - 1] - np.uint8(48)
    else:
        time = _numbers(words, last, lengths[2::3])
    return Lines(origin, data, None, time)


def _finish(words: np.ndarray, ends: np.ndarray, starts: np.ndarray,
            ndigits: int) -> np.ndarray | None:
    """The numbers' values, once the text between them is proven: their lengths must add
    up to the digits of the piece (no other byte may be one) and fit two words."""
    lengths = ends - starts
    if int(lengths.sum()) != ndigits or int(lengths.min()) < 1 or \
            int(lengths.max()) > MAX_DIGITS:
        return None
    return _numbers(words, ends, lengths)


def _mixed(src: Buffer, lo: int, ends: np.ndarray, after: np.ndarray,
           ndigits: int) -> Lines | None:
    """Single and range mappings in any order: lines found by their end words."""
    buf, words = src.buf, src.words
    n = len(ends)
    line_end = np.empty(n, bool)
    np.equal(after, W_END, out=line_end[:-1])
    line_end[-1] = True
    last = np.flatnonzero(line_end)
    count = np.diff(last, prepend=-1)
    single = count == 3
    if not bool(np.all(single | (count == 4))):
        return None
    first = last - count + 1
    place = np.arange(n, dtype=np.int64) - np.repeat(first, count)
    single_n = np.repeat(single, count)
    expect = np.where(single_n, _EXPECT_SINGLE[place], _EXPECT_RANGE[place])
    if not bool(np.all(after == expect[:-1])):
        return None
    head0 = HEAD_SINGLE if single[0] else HEAD_RANGE
    if buf[lo:lo + len(head0)] != head0:
        return None
    # the rest of each data attribute's name, and of range lines' length attribute
    tail = words[ends[first] + 6]
    if not bool(np.all(tail == np.where(single, _W_BLOCK_TAIL, _W_BEGIN_TAIL))):
        return None
    rng = np.flatnonzero(~single)
    if len(rng) and not bool(np.all(words[ends[first[rng] + 1] + 2] == _W_LENGTH_TAIL)):
        return None
    # the next line's element start after each line's end word
    nxt_single = single[1:]
    line_end_at = ends[last[:-1]] + 8
    ok_s = src.elem_single[line_end_at[nxt_single]] == _ELEM_SINGLE_ROW
    ok_r = src.elem_range[line_end_at[~nxt_single]] == _ELEM_RANGE_ROW
    if not (bool(np.all(ok_s)) and bool(np.all(ok_r))):
        return None
    gap = np.where(single_n, _GAP_SINGLE[np.minimum(place, 2)], _GAP_RANGE[place])
    gap[last[:-1]] += np.where(nxt_single, len(HEAD_SINGLE), len(HEAD_RANGE))
    starts = np.empty_like(ends)
    starts[0] = lo + len(head0)
    starts[1:] = ends[:-1] + gap[:-1]
    values = _finish(words, ends, starts, ndigits)
    if values is None:
        return None
    origin = values[first]
    data = values[first + 1]
    length = np.ones(len(first), U64)
    length[rng] = values[first[rng] + 2]
    time = values[last]
    return Lines(origin, data, length, time)
