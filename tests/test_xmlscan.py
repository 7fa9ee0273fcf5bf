"""The vectorised reader of thin_dump's mapping lines (dump/xmlscan.py) against expat.

The oracle is the exact parser (expat, dump/xml.py's state machine): for canonical pieces the
scanner must give its numbers, and for any piece one byte away from canonical (changed,
inserted or deleted) it must either refuse it or give exactly what expat reads from it, so
no malformed or differently-meaning text is ever taken. Whole documents go through
``parse_xml`` (bulk path) and expat alone, with the same result or the same error.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest

from dmimage.errors import InputError
from dmimage.thin.dump import fastxml
from dmimage.thin.dump.xml import _XmlParser, parse_xml
from dmimage.thin.dump.xmlscan import Buffer, scan_lines

SB = (b'<superblock uuid="" time="0" transaction="1" data_block_size="128" '
      b'nr_data_blocks="100000000000000000">')


def _lines(rng: random.Random, n: int, ranges: float) -> tuple[bytes, list[tuple[int, ...]]]:
    """``n`` canonical lines (singles and, with probability ``ranges``, range mappings),
    numbers of 1 to 16 digits, and their (origin, data, length, time)."""
    out, rows = [], []
    for _ in range(n):
        o, d = (rng.randrange(10 ** rng.randint(1, 16)) for _ in range(2))
        t = rng.randrange(10 ** rng.randint(1, 9)) % (1 << 32)
        if rng.random() < ranges:
            ln = rng.randrange(1, 10 ** rng.randint(1, 6))
            out.append(f'\n    <range_mapping origin_begin="{o}" data_begin="{d}" length="{ln}" '
                       f'time="{t}"/>')
            rows.append((o, d, ln, t))
        else:
            out.append(f'\n    <single_mapping origin_block="{o}" data_block="{d}" time="{t}"/>')
            rows.append((o, d, 1, t))
    return "".join(out).encode(), rows


def _scan(piece: bytes) -> list[tuple[int, ...]] | None:
    got = scan_lines(Buffer(piece + bytes(64)), 0, len(piece))
    if got is None:
        return None
    length = got.length if got.length is not None else np.ones(len(got.origin), np.uint64)
    if len(got.time) and (int(got.time.max()) >> 32 or not int(length.min())):
        return None  # fastxml refuses these (the exact parser names the line)
    return list(zip(got.origin.tolist(), got.data.tolist(), length.tolist(), got.time.tolist(),
                    strict=True))


def _expat(piece: bytes) -> list[tuple[int, ...]] | str:
    """What the exact parser reads from the piece as a device body, or its error."""
    doc = (SB + b'<device dev_id="0" mapped_blocks="0" transaction="0" creation_time="0" '
           b'snap_time="0">' + piece + b"\n  </device>\n</superblock>")
    p = _XmlParser(None)
    try:
        p.feed_bytes(doc)
        ir = p.result()
    except InputError as exc:
        return str(exc)
    runs = ir.devices[0].runs(ir.defs)
    return list(zip(runs.origin_begin.tolist(), runs.data_begin.tolist(), runs.length.tolist(),
                    runs.time.tolist(), strict=True))


@pytest.mark.parametrize("ranges", [0.0, 1.0, 0.3])
def test_canonical_pieces_read_like_expat(ranges: float) -> None:
    rng = random.Random(int(ranges * 10))
    for n in (1, 2, 3, 7, 500):
        piece, rows = _lines(rng, n, ranges)
        assert _scan(piece) == rows == _expat(piece)
        # trailing indentation before an end tag is allowed
        assert _scan(piece + b"\n  ") == rows


def test_one_byte_off_is_refused_or_read_exactly() -> None:
    """Every one-byte change, insertion and deletion of a mixed piece: refused, or the same
    numbers expat reads (e.g. a digit changed into another digit)."""
    rng = random.Random(7)
    piece, _ = _lines(rng, 6, 0.5)
    alphabet = b'0123456789" =/<>\nabgnx_-&;'
    taken = refused = 0
    for i in range(len(piece)):
        variants = [piece[:i] + piece[i + 1:]]
        variants += [piece[:i] + bytes([c]) + piece[i + 1:] for c in alphabet if c != piece[i]]
        variants += [piece[:i] + bytes([c]) + piece[i:] for c in rng.sample(alphabet, 6)]
        for v in variants:
            got = _scan(v)
            if got is None:
                refused += 1
                continue
            taken += 1
            assert got == _expat(v), v
    assert refused > 10 * taken > 0


def test_long_numbers_and_odd_layouts_are_refused() -> None:
    base = b'\n    <single_mapping origin_block="1" data_block="2" time="3"/>'
    assert _scan(base) == [(1, 2, 1, 3)]
    for odd in (base.replace(b'"1"', b'"12345678901234567"'),  # 17 digits: the general path
                base.replace(b"    <", b"  <"), base.replace(b" data", b"  data"),
                base.replace(b'"2"', b'""'), base.replace(b'"2"', b'"+2"'),
                base.replace(b"/>", b"></single_mapping>"), base + b"x",
                base.replace(b'\n', b'\r\n'), base.replace(b'"3"', b"'3'")):
        assert _scan(odd) is None, odd


@pytest.mark.parametrize("seed,block,piece", [(0, 1 << 22, 1 << 20), (1, 61, 200),
                                              (2, 4096, 300), (3, 1000, 5000)])
def test_documents_parse_like_expat(seed: int, block: int, piece: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole documents with a def, refs and several devices, read ``block`` bytes at a time
    and scanned ``piece`` bytes at a time, one byte changed at random: the bulk path gives
    expat's IR or refuses (never takes what expat rejects); parse_xml gives expat's IR or
    its error."""
    monkeypatch.setattr(fastxml, "PIECE", piece)
    rng = random.Random(seed)
    body, _ = _lines(rng, 300, 0.3)
    lines = body.split(b"\n")[1:]
    origin = 0
    for i, line in enumerate(lines):  # ascending origins, as a device needs
        kind = b"origin_block" if b"single" in line else b"origin_begin"
        head, _, rest = line.partition(kind + b'="')
        lines[i] = head + kind + b'="' + str(origin).encode() + rest[rest.index(b'"'):]
        origin += 10**6
    body = b"".join(b"\n" + x for x in lines)
    doc = (SB + b'\n  <def name="7">\n    <single_mapping origin_block="999999999999" '
           b'data_block="5" time="0"/>\n  </def>\n' + b"".join(
               b'  <device dev_id="%d" mapped_blocks="0" transaction="0" creation_time="0" '
               b'snap_time="0">' % d + body + (b'\n    <ref name="7"/>' if d else b"")
               + b"\n  </device>\n" for d in range(3)) + b"</superblock>")
    for trial in range(25):
        text = doc
        if trial:
            i = rng.randrange(len(doc))
            text = doc[:i] + bytes([rng.choice(b'0123456789"= x<>/\n')]) + doc[i + 1:]
        expected: object
        p = _XmlParser(None)
        try:
            p.feed_bytes(text)
            expected = _flat(p.result())
        except InputError as exc:
            expected = str(exc)
        try:
            got: object = _flat(parse_xml(text))
        except InputError as exc:
            got = str(exc)
        assert got == expected
        for helper in (False, True):  # with a second thread scanning every other piece
            bulk = _XmlParser(None)
            try:
                fastxml.parse_canonical_file(io.BytesIO(text), bulk, block, helper=helper)
            except fastxml.NotCanonical:
                assert trial, "the unchanged document is canonical"
                continue
            assert _flat(bulk.result()) == expected


def _flat(ir: object) -> list[object]:
    out: list[object] = []
    for d in ir.devices:  # type: ignore[attr-defined]
        r = d.runs(ir.defs)  # type: ignore[attr-defined]
        out.append((d.dev_id, r.origin_begin.tolist(), r.data_begin.tolist(), r.length.tolist(),
                    r.time.tolist(), [i for i in d.items if isinstance(i, str)]))
    return out


@pytest.mark.parametrize("indent", [b"\n    ", b"\n"])
def test_time_beyond_32_bits_is_an_error(indent: bytes) -> None:
    """2^32 + 5 used to wrap to 5 on expat's path (its array of times held 64 bits and was
    cut to 32): both layouts now name the line."""
    doc = (SB + b'\n  <device dev_id="0" mapped_blocks="1" transaction="0" creation_time="0" '
           b'snap_time="0">' + indent + b'<single_mapping origin_block="0" data_block="1" '
           b'time="4294967301"/>\n  </device>\n</superblock>')
    with pytest.raises(InputError, match=r"line 3: .*time=\"4294967301\" is out of range"):
        parse_xml(doc)


def test_one_digit_times_read_from_their_byte() -> None:
    """Singles whose times are all one digit (thin_dump's usual time="0") take the byte
    path for the times; the numbers are still expat's."""
    rng = random.Random(11)
    piece = b"".join(
        b'\n    <single_mapping origin_block="%d" data_block="%d" time="%d"/>'
        % (i, rng.randrange(10**12), rng.randrange(10)) for i in range(300))
    got = _scan(piece)
    assert got is not None and {t for *_, t in got} == set(range(10))
    assert got == _expat(piece)
