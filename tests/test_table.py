"""dmimage.table: dmsetup-exact text round trips, kernel validation rules, JSON, dm-mod.create=."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmimage.cli.main import main
from dmimage.table import (
    DmDevice,
    Entry,
    Error,
    Generic,
    Linear,
    Stripe,
    Striped,
    Table,
    TableError,
    Thin,
    ThinPool,
    Zero,
    dm_mod_create,
    dm_mod_create_param,
    format_table,
    parse_dm_mod_create,
    parse_table,
    parse_tables,
    split_args,
    table_from_json,
    table_to_json,
)
from dmimage.table.kernel import POOL_FEATURES

# ---------------------------------------------------------------- canonical round trips

# What the kernel's STATUSTYPE_TABLE prints, through dmsetup's "%llu %llu %s %s\n":
# targets without parameters end in a space, and so does a thin-pool (emit_flags()).
CANONICAL = [
    "0 2048 linear 8:16 0\n",
    "0 409600 linear 8:16 2048\n409600 204800 linear 253:7 0\n",
    "0 1638400 striped 4 4096 8:1 0 8:2 0 8:3 0 8:4 0\n",
    "0 1024 striped 1 8 259:0 100\n",
    "0 1000 zero \n",
    "0 1000 error \n",
    "0 1000 error 8:16 0\n",
    "0 20971520 thin-pool 253:0 253:1 128 0 0 \n",
    "0 20971520 thin-pool 253:0 253:1 1024 32768 1 skip_block_zeroing \n",
    "0 20971520 thin-pool 253:0 253:1 128 10 2 ignore_discard read_only \n",
    "0 2097152 thin 253:2 0\n",
    "0 2097152 thin 253:2 16777215 8:32\n",
    "0 8 crypt aes-xts-plain64 :64:logon:cryptsetup:x 0 8:3 4096 1 allow_discards\n",
    "0 100 delay 8:1 0 500\n",
    "0 10 linear 8:1 0\n10 10 zero \n20 10 error \n30 10 snapshot-origin 8:2\n",
    "0 100 foo a  b\\ c \n",  # unknown target: params verbatim, spaces and all
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_text_round_trips(text):
    table = parse_table(text)
    assert format_table(table) == text
    assert parse_table(format_table(table)) == table


@pytest.mark.parametrize("n", range(len(POOL_FEATURES) + 1))
def test_thin_pool_features_print_in_kernel_order(n):
    for combo in itertools.combinations(POOL_FEATURES, n):
        flags = "".join(f"{f} " for f in combo)
        text = f"0 2048 thin-pool 253:0 253:1 128 0 {n} {flags}\n"
        t = parse_table(text)
        assert t.entries[0].target.features == frozenset(combo)
        assert format_table(t) == text
        # any order or case on input normalises to the kernel's
        shuffled = " ".join(f.upper() for f in reversed(combo))
        assert format_table(parse_table(f"0 2048 thin-pool 253:0 253:1 128 0 {n} {shuffled}")) \
            == text


def test_typed_models():
    t = parse_table(
        "0 10 linear /dev/sda 5\n"
        "10 16 striped 2 8 8:1 0 8:2 3\n"
        "26 4 thin 253:4 9 7:0\n")
    assert [e.target for e in t.entries] == [
        Linear("/dev/sda", 5),
        Striped(8, (Stripe("8:1", 0), Stripe("8:2", 3))),
        Thin("253:4", 9, "7:0"),
    ]
    assert t.size == 30
    pool = parse_table("0 256 thin-pool 1:2 3:4 128 7").entries[0].target
    assert pool == ThinPool("1:2", "3:4", 128, 7, frozenset())
    assert format_table(Table((Entry(0, 256, pool),))) == "0 256 thin-pool 1:2 3:4 128 7 0 \n"


def test_file_syntax_comments_blank_lines_and_whitespace():
    text = ("# a pool\n\n   # indented comment\r\n"
            "0\t2048   linear  8:1\t0   \r\n"
            "\n2048 2048 zero\n")
    t = parse_table(text)
    assert t.source_lines == (4, 6)
    assert format_table(t) == "0 2048 linear 8:1 0\n2048 2048 zero \n"
    assert parse_table("") == Table(())
    assert format_table(Table(())) == ""


def test_backslash_escapes_kept_in_tokens():
    assert split_args(r" a\ b  c\\ d ") == [r"a\ b", r"c\\", "d"]
    t = parse_table(r"0 8 linear /dev/my\ disk 0")
    assert t.entries[0].target.device == r"/dev/my\ disk"
    assert format_table(t) == "0 8 linear /dev/my\\ disk 0\n"
    assert Generic("crypt", r"x\ y 1").args == [r"x\ y", "1"]


def test_dmsetup_multi_device_output():
    # shape of `dmsetup table` with no device argument (hand-written: no dm on this host)
    text = ("vg-pool: 0 20971520 linear 253:3 0\n"
            "vg-pool-tpool: 0 20971520 thin-pool 253:1 253:2 128 0 0 \n"
            "vg-thin1: 0 4194304 thin 253:3 1\n"
            "vg-span: 0 8 linear 8:1 0\n"
            "vg-span: 8 8 linear 8:2 0\n")
    tables = parse_tables(text)
    assert list(tables) == ["vg-pool", "vg-pool-tpool", "vg-thin1", "vg-span"]
    assert tables["vg-span"].size == 16
    assert "".join(f"{n}: {line}" for n, t in tables.items()
                   for line in format_table(t).splitlines(keepends=True)) == text
    with pytest.raises(TableError, match="line 1"):
        parse_tables("0 8 linear 8:1 0\n")


# ---------------------------------------------------------------- hypothesis

_dev = st.one_of(
    st.builds(lambda a, b: f"{a}:{b}", st.integers(0, 4095), st.integers(0, 1 << 20)),
    st.from_regex(r"/dev/[a-z][a-z0-9/_.-]{0,12}", fullmatch=True),
)
_u64 = st.integers(0, (1 << 64) - 1)
_word = st.from_regex(r"[!-~]{1,8}", fullmatch=True)  # printable, no spaces


def _generic_type(s: str) -> bool:
    return s not in ("linear", "striped", "zero", "error", "thin-pool", "thin")


_targets = st.one_of(
    st.builds(Linear, _dev, _u64),
    st.builds(lambda c, s: Striped(c, tuple(s)), st.integers(0, (1 << 32) - 1),
              st.lists(st.builds(Stripe, _dev, _u64), min_size=0, max_size=5)),
    st.just(Zero()),
    st.just(Error()),
    st.builds(Error, _dev, _u64),
    st.builds(ThinPool, _dev, _dev, _u64, _u64,
              st.frozensets(st.sampled_from(POOL_FEATURES))),
    st.builds(Thin, _dev, _u64, st.none() | _dev),
    st.builds(Generic,
              st.from_regex(r"[a-z][a-z0-9_-]{0,14}", fullmatch=True).filter(_generic_type),
              st.one_of(st.just(""),
                        st.from_regex(r"[!-~][ -~]{0,40}", fullmatch=True))),
)


@st.composite
def tables(draw, contiguous: bool = True):
    targets = draw(st.lists(_targets, min_size=0, max_size=6))
    entries, start = [], 0
    for t in targets:
        length = draw(st.integers(0, 1 << 40))
        s = start if contiguous else draw(st.integers(0, 1 << 41))
        entries.append(Entry(s, length, t))
        start += length
    return Table(tuple(entries))


@settings(max_examples=150, deadline=None)
@given(tables(contiguous=False))
def test_hypothesis_text_round_trip(table):
    text = format_table(table)
    again = parse_table(text)
    assert again == table
    assert format_table(again) == text


@settings(max_examples=100, deadline=None)
@given(tables(contiguous=False))
def test_hypothesis_json_round_trip(table):
    doc = json.loads(json.dumps(table_to_json(table)))
    assert table_from_json(doc) == table


@settings(max_examples=100, deadline=None)
@given(tables())
def test_hypothesis_validation_never_crashes(table):
    for p in table.problems({"8:1": 100}):
        assert str(p).startswith("line ") or not table.entries


# ---------------------------------------------------------------- parse errors


@pytest.mark.parametrize("text, line, field", [
    ("0 10", 1, None),
    ("x 10 linear 8:1 0", 1, "start"),
    ("0 -1 linear 8:1 0", 1, "length"),
    ("0 18446744073709551616 zero", 1, "length"),
    ("# c\n0 10 linear 8:1", 2, "args"),
    ("0 10 linear 8:1 0 9", 1, "args"),
    ("0 10 linear 8:1 +5", 1, "offset"),
    ("0 10 zero 1", 1, "args"),
    ("0 10 error 8:1", 1, "args"),
    ("0 10 striped", 1, "args"),
    ("0 10 striped 2 8 8:1 0", 1, "stripes"),
    ("0 10 striped 4294967296 8", 1, "stripes"),
    ("0 10 striped 1 x 8:1 0", 1, "chunk_size"),
    ("0 10 thin-pool 1:1 1:2 128", 1, "args"),
    ("0 10 thin-pool 1:1 1:2 bs 0", 1, "data_block_size"),
    ("0 10 thin-pool 1:1 1:2 128 lwm", 1, "low_water_mark"),
    ("0 10 thin-pool 1:1 1:2 128 0 2 read_only", 1, "#feature_args"),
    ("0 10 thin-pool 1:1 1:2 128 0 1 read_only extra", 1, "#feature_args"),
    ("0 10 thin-pool 1:1 1:2 128 0 1 discard_passdown", 1, "features"),
    ("0 10 thin 253:1", 1, "args"),
    ("0 10 thin 253:1 x", 1, "dev_id"),
    ("0 10 thin 253:1 1 2 3", 1, "args"),
])
def test_parse_errors_name_line_and_field(text, line, field):
    with pytest.raises(TableError) as info:
        parse_table(text)
    assert info.value.line == line
    assert info.value.field == field
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"line {line}")


# ---------------------------------------------------------------- validation


def _errors(text, sizes=None):
    return [(p.line, p.field, p.warning) for p in parse_table(text).problems(sizes)]


def test_valid_tables_have_no_problems():
    for text in CANONICAL:
        if "thin-pool" in text or text.startswith("0 8 crypt"):
            continue
        assert parse_table(text).validate() == []
    t = parse_table("0 2048 thin-pool 253:0 253:1 128 0 0")
    assert t.validate({"253:1": 2048, "253:0": 8192}) == []


def test_contiguity():
    assert _errors("5 10 zero") == [(1, "start", False)]
    assert _errors("0 10 zero\n11 10 zero") == [(2, "start", False)]
    assert _errors("0 10 zero\n9 10 zero") == [(2, "start", False)]
    assert _errors("0 0 zero") == [(1, "length", False)]
    with pytest.raises(TableError, match="gap: starts at 11"):
        parse_table("0 10 zero\n11 10 zero").validate()
    with pytest.raises(TableError, match="overlap"):
        parse_table("0 10 zero\n9 10 zero").validate()
    with pytest.raises(TableError, match="at least one target"):
        Table(()).validate()


def test_validate_collects_every_error():
    with pytest.raises(TableError) as info:
        parse_table("1 10 zero\n0 0 zero\n").validate()
    assert len(info.value.errors) == 3
    assert str(info.value).startswith("line 1, zero start:")


@pytest.mark.parametrize("bs, ok", [
    (0, False), (64, False), (100, False), (127, False), (128, True), (192, False),
    (256, True), (384, True), (1000, False), (2097152, True), (2097152 + 128, False),
    (4194304, False),
])
def test_thin_pool_block_size(bs, ok):
    found = _errors(f"0 {bs * 4 or 4} thin-pool 1:1 1:2 {bs} 0 0")
    assert ((1, "data_block_size", False) not in found) == ok


def test_thin_pool_rules():
    assert _errors("0 1024 thin-pool 1:1 1:1 128 0 0") == [(1, "data_dev", False)]
    assert _errors("0 1024 thin-pool 1:1 1:2 128 0 4 skip_block_zeroing ignore_discard "
                   "no_discard_passdown read_only") == []
    five = "5 " + " ".join(POOL_FEATURES)
    assert _errors(f"0 1024 thin-pool 1:1 1:2 128 0 {five}") == [(1, "features", False)]
    assert _errors("0 1000 thin-pool 1:1 1:2 128 0 0") == [(1, "length", True)]
    assert _errors("0 100 thin-pool 1:1 1:2 128 0 0") == [(1, "length", True),
                                                          (1, "length", False)]
    assert _errors("0 1024 thin-pool 1:1 1:2 128 8 0") == []
    assert _errors("0 1024 thin-pool 1:1 1:2 128 9 0") == [(1, "low_water_mark", True)]
    assert _errors("0 10 zero\n10 1024 thin-pool 1:1 1:2 128 0 0") == [(2, None, False)]
    assert _errors("0 1024 thin-pool 1:1 1:2 128 0 0", {"1:2": 1023}) == [(1, "data_dev", False)]
    assert _errors("0 1024 thin-pool 1:1 1:2 128 0 0", {"1:1": 1 << 40}) == \
        [(1, "metadata_dev", True)]


def test_thin_rules():
    assert _errors("0 8 thin 253:1 16777215") == []
    assert _errors("0 8 thin 253:1 16777216") == [(1, "dev_id", False)]
    assert _errors("0 8 thin 253:1 1 253:1") == [(1, "external_origin_dev", False)]


def test_striped_rules():
    # dm-stripe.c: length % stripes, then (length / stripes) % chunk; any non-zero chunk
    assert _errors("0 300 striped 3 100 8:1 0 8:2 0 8:3 0") == []  # chunk need not be 2^n
    assert _errors("0 301 striped 3 100 8:1 0 8:2 0 8:3 0") == [(1, "length", False)]
    assert _errors("0 330 striped 3 100 8:1 0 8:2 0 8:3 0") == [(1, "length", False)]
    assert _errors("0 8 striped 1 0 8:1 0") == [(1, "chunk_size", False)]
    assert _errors("0 8 striped 0 8") == [(1, "stripes", False)]
    assert _errors("0 8 striped 2 4 8:1 0 8:2 0") == [(1, "chunk_size", True)]
    assert _errors("0 256 striped 2 8 8:1 0 8:2 10", {"8:2": 137, "8:1": 128}) == \
        [(1, "stripe 1 device", False)]
    assert _errors("0 256 striped 2 8 8:1 0 8:2 10", {"8:2": 138}) == []


def test_lengths_against_device_sizes():
    text = "0 100 linear 8:1 50\n100 8 error 8:2 0\n"
    assert _errors(text, {"8:1": 150, "8:2": 8}) == []
    assert _errors(text, {"8:1": 149}) == [(1, "device", False)]
    assert _errors(text, {"8:2": 7}) == [(2, "device", False)]
    assert _errors(text, {}) == []


def test_in_memory_tables_name_target_index():
    t = Table((Entry(0, 8, Zero()), Entry(9, 8, Zero())))
    assert [str(p) for p in t.problems()][0].startswith("line 2, zero start")


def test_model_refuses_unknown_feature_and_bad_generic():
    with pytest.raises(TableError, match="unknown feature"):
        ThinPool("a", "b", 128, 0, frozenset({"discard_passdown"}))
    with pytest.raises(TableError):
        Generic("two words", "")
    with pytest.raises(TableError):
        Generic("x", "a\nb")


# ---------------------------------------------------------------- JSON


def test_json_shape():
    t = parse_table("0 2048 thin-pool 253:0 253:1 128 0 2 skip_block_zeroing read_only \n")
    assert table_to_json(t) == {"format": "dmimage-table", "version": 1, "targets": [
        {"start": 0, "length": 2048, "type": "thin-pool", "metadata_dev": "253:0",
         "data_dev": "253:1", "data_block_size": 128, "low_water_mark": 0,
         "features": ["skip_block_zeroing", "read_only"]}]}
    t2 = parse_table("0 8 thin 1:2 3\n8 8 error\n16 8 foo bar\n")
    assert table_to_json(t2)["targets"] == [
        {"start": 0, "length": 8, "type": "thin", "pool_dev": "1:2", "dev_id": 3},
        {"start": 8, "length": 8, "type": "error"},
        {"start": 16, "length": 8, "type": "foo", "params": "bar"}]
    assert table_from_json(table_to_json(t2)["targets"]) == t2  # bare list accepted


@pytest.mark.parametrize("doc, match", [
    ({"format": "other", "targets": []}, "not a dmimage-table"),
    ({"version": 2, "targets": []}, "unsupported version"),
    ({"targets": [], "extra": 1}, "unknown key 'extra'"),
    ({"targets": {}}, "must be a list"),
    ({"targets": [1]}, "JSON object"),
    ({"targets": [{"start": 0, "length": 1}]}, "type"),
    ({"targets": [{"start": 0, "length": 1, "type": "linear", "device": "a"}]}, "offset"),
    ({"targets": [{"start": 0, "length": 1, "type": "linear", "device": "a", "offset": -1}]},
     "non-negative"),
    ({"targets": [{"start": 0, "length": True, "type": "zero"}]}, "non-negative"),
    ({"targets": [{"start": 0, "length": 1, "type": "zero", "device": "a"}]}, "unknown key"),
    ({"targets": [{"start": 0, "length": 1, "type": "thin-pool", "metadata_dev": "a",
                   "data_dev": "b", "data_block_size": 128, "low_water_mark": 0,
                   "features": ["nope"]}]}, "unknown feature"),
    ({"targets": [{"start": 0, "length": 1, "type": "striped", "chunk_size": 8,
                   "stripes": [{"device": "a", "offset": 0, "x": 1}]}]}, "stripe 0"),
])
def test_json_reader_is_strict(doc, match):
    with pytest.raises(TableError, match=match):
        table_from_json(doc)


# ---------------------------------------------------------------- dm-mod.create=

# Documentation/admin-guide/device-mapper/dm-init.rst, the examples as written there ...
DOC_LROOT = 'dm-mod.create="lroot,,,rw, 0 4096 linear 98:16 0, 4096 4096 linear 98:32 0"'
DOC_MULTI = """dm-linear,,1,rw,
    0 32768 linear 8:1 0,
    32768 1024000 linear 8:2 0;
  dm-verity,,3,ro,
    0 1638400 verity 1 /dev/sdc1 /dev/sdc2 4096 4096 204800 1 sha256
    ac87db56303c9c1da433d7209b5a6ef3e4779df141200cbd7c157dcb8dd89c42
    5ebfe87f7df3235b80a117ebc4078e44f55045487ad4a96581d1adb564615b51"""
DOC_STRIPED = """dm-striped,,4,ro,0 1638400 striped 4 4096
  /dev/sda1 0 /dev/sda2 0 /dev/sda3 0 /dev/sda4 0"""
DOC_LINEAR = """dm-linear,,,rw,
    0 32768 linear /dev/sda1 0,
    32768 1024000 linear /dev/sda2 0,
    1056768 204800 linear /dev/sda3 0,
    1261568 512000 linear /dev/sda4 0"""
# ... and what dm_mod_create() emits for them (written by hand: no spaces around separators).
EXPECTED = {
    DOC_LROOT: 'lroot,,,rw,0 4096 linear 98:16 0,4096 4096 linear 98:32 0',
    DOC_MULTI: ("dm-linear,,1,rw,0 32768 linear 8:1 0,32768 1024000 linear 8:2 0;"
                "dm-verity,,3,ro,0 1638400 verity 1 /dev/sdc1 /dev/sdc2 4096 4096 204800 1 "
                "sha256 ac87db56303c9c1da433d7209b5a6ef3e4779df141200cbd7c157dcb8dd89c42 "
                "5ebfe87f7df3235b80a117ebc4078e44f55045487ad4a96581d1adb564615b51"),
    DOC_STRIPED: ("dm-striped,,4,ro,0 1638400 striped 4 4096 "
                  "/dev/sda1 0 /dev/sda2 0 /dev/sda3 0 /dev/sda4 0"),
    DOC_LINEAR: ("dm-linear,,,rw,0 32768 linear /dev/sda1 0,32768 1024000 linear /dev/sda2 0,"
                 "1056768 204800 linear /dev/sda3 0,1261568 512000 linear /dev/sda4 0"),
}


def _one_line(doc: str) -> str:
    return " ".join(part.strip() for part in doc.splitlines())


@pytest.mark.parametrize("doc", list(EXPECTED))
def test_dm_mod_create_matches_kernel_doc_examples(doc):
    devices = parse_dm_mod_create(_one_line(doc))
    assert dm_mod_create(devices) == EXPECTED[doc]
    assert parse_dm_mod_create(EXPECTED[doc]) == devices


def test_dm_mod_create_from_model():
    root = parse_table("0 4096 linear 98:16 0\n4096 4096 linear 98:32 0\n")
    data = parse_table("0 1638400 striped 4 4096 8:1 0 8:2 0 8:3 0 8:4 0\n")
    devices = [DmDevice("lroot", root),
               DmDevice("data", data, uuid="ab-cd", minor=7, read_only=True)]
    value = dm_mod_create(devices)
    assert value == ("lroot,,,rw,0 4096 linear 98:16 0,4096 4096 linear 98:32 0;"
                     "data,ab-cd,7,ro,0 1638400 striped 4 4096 8:1 0 8:2 0 8:3 0 8:4 0")
    assert dm_mod_create_param(devices) == f'dm-mod.create="{value}"'
    assert parse_dm_mod_create(f'dm-mod.create="{value}"') == devices


def _lin(n=1, length=8):
    return Table(tuple(Entry(i * length, length, Linear("8:1", 0)) for i in range(n)))


@pytest.mark.parametrize("devices, match", [
    ([], "at least one device"),
    ([DmDevice(f"d{i}", _lin()) for i in range(257)], "at most 256"),
    ([DmDevice("d", _lin(257))], "at most 256 per device"),
    ([DmDevice("d", _lin(256))] * 1 + [DmDevice("e", _lin(256))], "refuses 4096"),
    ([DmDevice("d", parse_table("0 8 thin 253:1 0"))], "'thin' is not allowed"),
    ([DmDevice("d", parse_table("0 256 thin-pool 1:1 1:2 128 0 0"))], "not allowed"),
    ([DmDevice("d", parse_table("0 8 zero"))], "not allowed"),
    ([DmDevice("a,b", _lin())], "comma"),
    ([DmDevice("a;b", _lin())], "semicolon"),
    ([DmDevice('a"', _lin())], "double quote"),
    ([DmDevice("", _lin())], "needs a name"),
    ([DmDevice("x" * 128, _lin())], "at most 127"),
    ([DmDevice("a/b", _lin())], "'/'"),
    ([DmDevice("d", _lin(), uuid="u,v")], "comma"),
    ([DmDevice("d", _lin(), uuid="u" * 129)], "at most 128"),
    ([DmDevice("d", _lin(), minor=1 << 20)], "minor"),
    ([DmDevice("d", _lin()), DmDevice("d", _lin())], "used twice"),
    ([DmDevice("d", parse_table("0 8 crypt aes-cbc-essiv:sha256 " + "ab" * 16 + " 0 8:1,2 0"))], "comma"),
    ([DmDevice("d", parse_table("0 8 linear 8:1 0\n9 8 linear 8:1 0"))], "Gap in table"),
])
def test_dm_mod_create_refusals(devices, match):
    with pytest.raises(TableError, match=match):
        dm_mod_create(devices)


def test_dm_mod_create_length_limit_is_4095():
    # dm-init.c refuses strlen(create) >= DM_MAX_STR_SIZE (4096)
    def value_of(pad):
        return [DmDevice("d", parse_table(f"0 8 linear /dev/{'x' * pad} 0"))]

    short = len(dm_mod_create(value_of(1)))
    pad = 1 + 4095 - short
    assert len(dm_mod_create(value_of(pad))) == 4095
    with pytest.raises(TableError, match="refuses 4096"):
        dm_mod_create(value_of(pad + 1))


_dm_dev = st.builds(
    DmDevice,
    st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True),
    st.lists(st.one_of(st.builds(Linear, _dev, _u64),
                       st.builds(lambda d: Striped(8, (Stripe(d, 0),)), _dev)),
             min_size=1, max_size=4).map(
        lambda ts: Table(tuple(Entry(8 * i, 8, t) for i, t in enumerate(ts)))),
    st.from_regex(r"[A-Za-z0-9-]{0,20}", fullmatch=True),
    st.none() | st.integers(0, (1 << 20) - 1),
    st.booleans(),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(_dm_dev, min_size=1, max_size=4, unique_by=lambda d: d.name))
def test_hypothesis_dm_mod_create_round_trip(devices):
    assert parse_dm_mod_create(dm_mod_create(devices)) == devices


# ---------------------------------------------------------------- CLI


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_cli_check(tmp_path, capsys):
    good = _write(tmp_path, "good", "# root\n0 2048 linear 8:1 0\n2048 2048 zero\n")
    assert main(["table", "check", good]) == 0
    assert capsys.readouterr().out == ""
    bad = _write(tmp_path, "bad", "0 2048 linear 8:1 0\n2049 10 thin 1:1 16777216\n")
    assert main(["table", "check", bad]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{bad}: line 2, thin start: gap: starts at 2049, the previous line ends at 2048 "
        "(dm-table.c: Gap in table)",
        f"{bad}: line 2, thin dev_id: 16777216 is above 16777215 (24-bit ids; dm-thin.c "
        "read_dev_id: Invalid device id)",
    ]
    unparsable = _write(tmp_path, "u", "0 8 linear 8:1\n")
    assert main(["table", "check", "-q", unparsable]) == 1
    assert capsys.readouterr().out == ""
    assert main(["table", "check", good, "--size", "8:1=100"]) == 1
    assert "beyond its end" in capsys.readouterr().out
    warn = _write(tmp_path, "w", "0 1000 thin-pool 1:1 1:2 128 0 0 \n")
    assert main(["table", "check", warn]) == 0
    assert "warning: line 1, thin-pool length" in capsys.readouterr().out
    assert main(["table", "check", str(tmp_path / "missing")]) == 2


def test_cli_format_and_json(tmp_path, capsys):
    src = _write(tmp_path, "t", "# x\n0   8 thin-pool 1:1 1:2 128 0 2 READ_ONLY "
                                "skip_block_zeroing\n")
    assert main(["table", "format", src]) == 0
    canonical = capsys.readouterr().out
    assert canonical == "0 8 thin-pool 1:1 1:2 128 0 2 skip_block_zeroing read_only \n"
    assert main(["table", "format", "--json", src]) == 0
    js = _write(tmp_path, "t.json", capsys.readouterr().out)
    assert main(["table", "format", "--from-json", js]) == 0
    assert capsys.readouterr().out == canonical
    broken = _write(tmp_path, "b.json", "{")
    assert main(["table", "format", "--from-json", broken]) == 1
    assert "bad JSON" in capsys.readouterr().err


def test_cli_dm_mod_create(tmp_path, capsys):
    a = _write(tmp_path, "a", "0 4096 linear 98:16 0\n4096 4096 linear 98:32 0\n")
    b = _write(tmp_path, "b", "0 8 linear 8:1 0\n")
    assert main(["table", "dm-mod-create", f"lroot={a}", f"b={b}", "--uuid", "b=U-1",
                 "--minor", "b=3"]) == 0
    assert capsys.readouterr().out == (
        'dm-mod.create="lroot,,,rw,0 4096 linear 98:16 0,4096 4096 linear 98:32 0;'
        'b,U-1,3,rw,0 8 linear 8:1 0"\n')
    assert main(["table", "dm-mod-create", "--ro", "--value-only", f"b={b}"]) == 0
    assert capsys.readouterr().out == "b,,,ro,0 8 linear 8:1 0\n"
    assert main(["table", "dm-mod-create", f"b={b}", "--uuid", "zz=1"]) == 2
    t = _write(tmp_path, "t", "0 8 thin 253:1 0\n")
    assert main(["table", "dm-mod-create", f"t={t}"]) == 1
    assert "not allowed" in capsys.readouterr().err


# ---------------------------------------------------------------- the guest test's generator


def _fake_backing(kernel):
    from vmtests.tablegen import Backing

    helpers = [f"253:{i}" for i in range(200)]
    return Backing(kernel, "254:0", 64 << 11, helpers, 8192, "253:250", 4,
                   [("logon:dmimage:k32", 32), ("user:dmimage-u32", 32)])


@pytest.mark.parametrize("kernel", [(6, 1), (6, 12)])
@pytest.mark.parametrize("seed", range(5))
def test_generated_valid_tables_check_and_round_trip(kernel, seed):
    """What vmtests/test_tables_guest.py feeds the kernel: valid by our rules (for that
    kernel), and stable through text, JSON and the kernel's canonical form."""
    import random

    from dmimage.table.args import Style
    from vmtests.tablegen import TARGET_TYPES, Generator

    backing = _fake_backing(kernel)
    gen = Generator(random.Random(seed), backing)
    sizes = {backing.disk: backing.disk_sectors, **{h: 8192 for h in backing.helpers}}
    for kind in TARGET_TYPES:
        for _ in range(3):
            case = gen.valid(kind)
            t = case.table
            assert [p for p in t.problems(sizes, kernel) if not p.warning] == [], (kind, t)
            shown = format_table(t, Style(show_keys=True))
            assert parse_table(shown) == t
            assert table_from_json(table_to_json(t, Style(show_keys=True))) == t
            k = t.kernel_form(kernel)
            assert k.kernel_form(kernel) == k
            assert parse_table(format_table(k, Style(kernel=kernel, show_keys=True))) == k


def test_generated_invalid_cases_parse_or_refuse():
    import random

    from vmtests.tablegen import Generator

    gen = Generator(random.Random(1), _fake_backing((6, 12)))
    labels = [c.label for c in gen.invalid_cases()]
    assert len(labels) == len(set(labels))


# ---------------------------------------------------------------- crypt, delay, flakey, snapshot,
# verity, cache, era

KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

#: As dmsetup printed them in the guest (deb12 6.1 unless noted): (kernel, --showkeys text).
KERNEL_PRINTED = [
    ((6, 1), f"0 2048 crypt aes-xts-plain64 {KEY} 0 254:0 0 2 allow_discards sector_size:4096\n"),
    ((6, 1), "0 2048 crypt cipher_null-ecb - 0 254:0 0\n"),
    ((6, 1), "0 2048 crypt aes-cbc-plain64 :32:logon:dmimage:k32 0 254:0 8\n"),
    ((6, 1), "0 2048 flakey 254:0 0 1 1 0 \n"),
    ((6, 1), "0 2048 flakey 254:0 0 1 1 1 drop_writes \n"),
    ((6, 1), "0 2048 flakey 254:0 0 1 1 5 corrupt_bio_byte 32 r 1 0 \n"),
    ((6, 12), "0 2048 flakey 254:0 0 1 1 2 error_reads error_writes\n"),
    ((6, 12), "0 2048 flakey 254:0 0 1 1 1 drop_writes\n"),
    ((6, 1), "0 2048 delay 254:0 0 10 254:0 100 20\n"),
    ((6, 1), "0 2048 snapshot-origin 254:0\n"),
    ((6, 1), "0 2048 snapshot 254:0 253:2 P 16 1 discard_zeroes_cow\n"),
    ((6, 1), "0 2048 snapshot-merge 254:0 253:2 PO 8\n"),
    ((6, 1), "0 8 verity 1 254:0 254:0 4096 4096 1 1 sha256 "
             "4392712ba01368efdf14b05c76f9e4df0d53664630b5d48632ed17a137f39076 1234 "
             "2 ignore_corruption ignore_zero_blocks\n"),
    ((6, 1), "0 2048 cache 253:10 253:5 254:0 64 1 WriteBack smq 2 migration_threshold 100\n"),
    ((6, 1), "0 2048 era 253:11 254:0 8\n"),
]


@pytest.mark.parametrize("kernel,text", KERNEL_PRINTED)
def test_kernel_printed_tables_round_trip(kernel, text):
    from dmimage.table.args import Style

    t = parse_table(text)
    assert format_table(t, Style(kernel=kernel, show_keys=True)) == text
    assert t.kernel_form(kernel) == t
    assert table_from_json(table_to_json(t, Style(show_keys=True))) == t


def test_kernel_forms():
    """What the kernels print for what they were given (seen in the guest)."""
    from dmimage.table.args import Style

    def printed(given, kernel):
        return format_table(parse_table(given).kernel_form(kernel),
                            Style(kernel=kernel, show_keys=True))

    # 6.12 fills in "error everything" for a flakey without fault features; 6.1 prints 0
    assert printed("0 8 flakey 8:0 0 1 1", (6, 12)) == \
        "0 8 flakey 8:0 0 1 1 2 error_reads error_writes\n"
    assert printed("0 8 flakey 8:0 0 1 1", (6, 1)) == "0 8 flakey 8:0 0 1 1 0 \n"
    assert printed("0 8 flakey 8:0 0 1 1 5 CORRUPT_bio_byte 32 R 1 0", (6, 12)) == \
        "0 8 flakey 8:0 0 1 1 5 corrupt_bio_byte 32 r 1 0\n"
    # a random_*_corrupt rate of 0 is not printed and is no fault (dm-flakey.c flakey_status)
    assert printed("0 8 flakey 8:0 0 1 1 2 random_read_corrupt 0", (7, 3)) == \
        "0 8 flakey 8:0 0 1 1 2 error_reads error_writes\n"
    assert printed("0 8 flakey 8:0 0 1 1 3 drop_writes random_write_corrupt 0", (6, 12)) == \
        "0 8 flakey 8:0 0 1 1 1 drop_writes\n"
    assert printed("0 8 flakey 8:0 0 1 1 4 random_read_corrupt 5 random_read_corrupt 0",
                   (6, 12)) == "0 8 flakey 8:0 0 1 1 2 error_reads error_writes\n"
    # crypt: hex lower case, an odd last digit dropped, sector_size:512 (the default) dropped,
    # repeated flags once, features in the kernel's order
    assert printed(f"0 8 crypt aes-xts-plain64 {KEY.upper()}f 0 8:0 0 3 sector_size:512 "
                   "no_write_workqueue allow_discards", (6, 1)) == \
        f"0 8 crypt aes-xts-plain64 {KEY} 0 8:0 0 2 allow_discards no_write_workqueue\n"
    assert printed("0 8 crypt aes-cbc-plain64 " + "ab" * 16 + " 0 8:0 0 2 allow_discards "
                   "allow_discards", (6, 1)).endswith(" 1 allow_discards\n")
    # the error target never prints a device; snapshot stores print upper case
    assert printed("0 8 error 8:0 0", (6, 12)) == "0 8 error \n"
    assert printed("0 8 snapshot 8:0 8:1 po 8", (6, 1)) == "0 8 snapshot 8:0 8:1 PO 8\n"
    # verity: hex lower case
    assert printed("0 8 verity 1 8:0 8:0 4096 4096 1 1 sha1 " + "AB" * 20 + " -", (6, 1)) == \
        "0 8 verity 1 8:0 8:0 4096 4096 1 1 sha1 " + "ab" * 20 + " -\n"


def test_crypt_key_never_shown_unless_asked(tmp_path, capsys):
    from dmimage.table.args import Style

    text = f"0 8 crypt aes-xts-plain64 {KEY} 0 8:0 0\n"
    t = parse_table(text)
    assert KEY not in repr(t) and KEY not in str(t.entries[0].target.key)
    assert format_table(t) == f"0 8 crypt aes-xts-plain64 {'0' * 64} 0 8:0 0\n"
    assert format_table(t, Style(show_keys=True)) == text
    assert KEY not in json.dumps(table_to_json(t))
    # "-" is zeroed too, as dmsetup does (it zeroes every key word but a keyring reference)
    assert format_table(parse_table("0 8 crypt cipher_null-ecb - 0 8:0 0")) == \
        "0 8 crypt cipher_null-ecb 0 0 8:0 0\n"
    ref = "0 8 crypt aes-xts-plain64 :64:logon:cryptsetup:x 0 8:0 0\n"
    assert format_table(parse_table(ref)) == ref
    # the CLI: format hides, --show-keys shows; check never prints the key, even on errors
    f = tmp_path / "t"
    bad = f"0 8 crypt aes-xts-plain64 {KEY[:-2]}zz 3 8:0 0 1 sector_size:4096\n"
    for content in (text, bad):
        f.write_text(content)
        main(["table", "format", str(f)])
        main(["table", "format", "--json", str(f)])
        main(["table", "check", str(f)])
        out = capsys.readouterr()
        assert KEY[:40] not in out.out + out.err
    f.write_text(text)
    main(["table", "format", "--show-keys", str(f)])
    assert capsys.readouterr().out == text
    # a word in the wrong place is not quoted either (it may be the key)
    with pytest.raises(TableError) as exc:
        parse_table(f"0 8 crypt aes-xts-plain64 0 {KEY} 8:0 0")
    assert KEY not in str(exc.value)


@pytest.mark.parametrize("text,kernel,field", [
    (f"0 8 crypt aes-xts-plain64 {KEY[:48]} 0 8:0 0", None, "key"),
    (f"0 8 crypt aes-xts-plain64 {KEY} 0 8:0 0 1 sector_size:1000", None, "features"),
    (f"0 8 crypt aes-xts-plain64 {KEY} 4 8:0 0 1 sector_size:4096", None, "iv_offset"),
    (f"0 8 crypt aes-xts-plain64 {KEY} 0 8:0 4 1 sector_size:4096", None, "offset"),
    (f"0 8 crypt aes-xts-plain64 {KEY} 0 8:0 0 1 high_priority", (6, 1), "features"),
    (f"0 8 crypt aes:3-cbc-plain64 {KEY[:96]} 0 8:0 0", None, "cipher"),
    ("0 8 crypt aes-xts-plain64 :0:logon:a:b 0 8:0 0", None, "key"),
    ("0 8 flakey 8:0 0 0 0", None, "down_interval"),
    ("0 8 flakey 8:0 0 1 1 2 drop_writes error_writes", None, "features"),
    ("0 8 flakey 8:0 0 1 1 1 error_reads", (6, 1), "features"),
    ("0 8 flakey 8:0 0 1 1 6 drop_writes corrupt_bio_byte 1 w 0 0", None, "features"),
    ("0 8 snapshot 8:0 8:1 P 24", None, "chunk_size"),
    ("0 8 snapshot 8:0 8:0 P 8", None, "cow"),
    ("0 8 snapshot 8:0 8:1 N 0", None, "chunk_size"),
    ("0 8 snapshot-merge 8:0 8:1 N 8", None, "store"),
    ("0 8 snapshot 8:0 8:1 P 8 1 discard_passdown_origin", None, "features"),
    ("0 8 verity 2 8:0 8:0 4096 4096 1 1 sha1 " + "ab" * 20 + " -", None, "version"),
    ("0 8 verity 1 8:0 8:0 8192 4096 1 1 sha1 " + "ab" * 20 + " -", None, "data_block_size"),
    ("0 16 verity 1 8:0 8:0 4096 4096 1 1 sha1 " + "ab" * 20 + " -", None, "num_data_blocks"),
    ("0 8 verity 1 8:0 8:0 4096 4096 1 1 sha1 " + "ab" * 19 + " -", None, "digest"),
    ("0 8 verity 1 8:0 8:0 4096 4096 1 1 sha1 " + "ab" * 20 + " abc", None, "salt"),
    ("0 4 verity 1 8:0 8:0 4096 4096 1 1 sha1 " + "ab" * 20 + " -", None, "length"),
    ("0 8 cache 8:0 8:1 8:2 100 0 smq 0", None, "block_size"),
    ("0 8 cache 8:0 8:1 8:2 64 2 writeback passthrough smq 0", None, "features"),
    ("0 8 cache 8:0 8:1 8:2 64 0 lru 0", None, "policy"),
    ("0 8 cache 8:0 8:1 8:2 64 0 smq 1 migration_threshold", None, "policy_args"),
    ("0 8 era 8:0 8:1 12", None, "block_size"),
    ("0 12 linear 8:0 0\n12 8 crypt aes-xts-plain64 " + KEY + " 0 8:0 0 1 sector_size:4096",
     None, "length"),
])
def test_new_target_rules(text, kernel, field):
    errors = [p for p in parse_table(text).problems(kernel=kernel) if not p.warning]
    assert [e.field for e in errors][:1] == [field], errors


_V = "0 8 verity 1 8:0 8:0 4096 4096 1 1 sha1 " + "ab" * 20 + " - "
_F = "0 8 flakey 8:0 0 1 1 "
_FEC13 = ("13 ignore_zero_blocks use_fec_from_device 8:0 fec_blocks 1 fec_start 1 fec_roots 2 "
          "root_hash_sig_key_desc k check_at_most_once ignore_corruption")


@pytest.mark.parametrize("text,refused_by", [
    # try_verify_in_tasklet is new in 6.0
    (_V + "1 try_verify_in_tasklet", {(5, 10)}),
    # "allow only one error handling mode" is 5.13's (Debian 11's 5.10.223 takes both)
    (_V + "2 ignore_corruption restart_on_corruption", {(6, 1), (6, 12), (7, 3)}),
    (_V + "2 ignore_corruption ignore_corruption", {(6, 1), (6, 12), (7, 3)}),
    # DM_VERITY_OPTS_MAX: 13 on 5.10, 14 from 6.0, 15 from 6.12 (13, 14 and 15 words here)
    (_V + _FEC13, set()),
    (_V + _FEC13.replace("13", "14", 1) + " ignore_zero_blocks", {(5, 10)}),
    (_V + _FEC13.replace("13", "15", 1) + " ignore_zero_blocks check_at_most_once",
     {(5, 10), (6, 1)}),
    # 6.16's flakey: a fault hides the corruption of its direction; valued features once
    (_F + "3 drop_writes random_write_corrupt 1000", {(5, 10), (6, 1), (7, 3)}),
    (_F + "3 drop_writes random_write_corrupt 0", {(5, 10), (6, 1)}),
    (_F + "6 error_reads corrupt_bio_byte 1 r 0 0", {(5, 10), (6, 1), (7, 3)}),
    (_F + "6 error_reads corrupt_bio_byte 1 w 0 0", {(5, 10), (6, 1)}),
    (_F + "6 drop_writes corrupt_bio_byte 1 r 0 0", set()),
    (_F + "10 corrupt_bio_byte 1 w 0 0 corrupt_bio_byte 2 r 1 0", {(5, 10), (6, 1), (7, 3)}),
    (_F + "4 random_read_corrupt 5 random_read_corrupt 6", {(5, 10), (6, 1), (7, 3)}),
    (_F + "4 random_read_corrupt 0 random_read_corrupt 6", {(5, 10), (6, 1)}),
])
def test_rules_by_kernel_version(text, refused_by):
    """The four guest kernels' verdicts (vmtests/test_tables_guest.py checks them against the
    kernels themselves); no kernel given means the newest rules."""
    kernels = [(5, 10), (6, 1), (6, 12), (7, 3)]
    table = parse_table(text)
    got = {k for k in kernels if any(not p.warning for p in table.problems(kernel=k))}
    assert got == refused_by
    newest = any(not p.warning for p in table.problems())
    assert newest == ((7, 3) in refused_by)


@pytest.mark.parametrize("text", [
    "0 8 crypt aes-xts-plain64 " + KEY,
    "0 8 delay 8:0 0 10 8:1",
    "0 8 flakey 8:0 0 1",
    "0 8 flakey 8:0 0 1 1 2 drop_writes",
    "0 8 flakey 8:0 0 1 1 1 nosuch",
    "0 8 snapshot 8:0 8:1 X 8",
    "0 8 snapshot-origin 8:0 8:1",
    "0 8 verity 1 8:0 8:0 4096 4096 1 1 sha1 ab",
    "0 8 cache 8:0 8:1 8:2 64 3 writeback smq 0",
    "0 8 cache 8:0 8:1 8:2 64 0 smq 2 migration_threshold",
    "0 8 era 8:0 8:1",
])
def test_new_target_parse_errors(text):
    with pytest.raises(TableError):
        parse_table(text)
