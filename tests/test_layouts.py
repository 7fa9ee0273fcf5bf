"""Format layer: checksum test vectors (thin-format.md §1), layout sizes and round trips."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmimage.format import constants as C
from dmimage.format import layouts as L
from dmimage.format.checksum import block_checksum, checksum_ok, seal, sniff_block_type
from dmimage.pdata.spacemap import BITMAP_LUT, decode_bitmap


def test_crc32c_standard_vector():
    from crc32c import crc32c

    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize(
    ("salt", "expected"),
    [
        (C.SALT_SUPERBLOCK, 0x58CFD397),
        (C.SALT_BTREE_NODE, 0x58CC7E82),
        (C.SALT_BITMAP, 0x58CE0B1A),
        (C.SALT_METADATA_INDEX, 0x58CFD54F),
    ],
)
def test_zero_block_checksums(salt, expected):
    block = bytearray(C.BLOCK_SIZE)
    assert block_checksum(block, salt) == expected
    seal(block, salt)
    assert struct.unpack_from("<I", block)[0] == expected
    assert checksum_ok(block, salt)
    assert sniff_block_type(block) is not None


def test_checksum_covers_whole_block_tail():
    block = bytearray(C.BLOCK_SIZE)
    seal(block, C.SALT_SUPERBLOCK)
    block[4095] = 1
    assert not checksum_ok(block, C.SALT_SUPERBLOCK)


def test_sizes_match_the_kernel():
    assert L.Superblock.sizeof() == 364
    assert L.SpaceMapRoot.sizeof() == 128
    assert L.BtreeNodeHeader.sizeof() == 32
    assert L.IndexEntry.sizeof() == 16
    assert L.DeviceDetails.sizeof() == 24
    assert L.MetadataIndexBlock.sizeof() == 16 + 255 * 16
    assert C.ENTRIES_PER_BITMAP == 16320
    assert C.MAX_METADATA_BLOCKS == 4_161_600
    # capacities from thin-format.md §3.1
    assert [C.max_entries(v) for v in (8, 24, 16, 4)] == [252, 126, 168, 336]


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_index_entry_struct_and_dtype_agree(blocknr, nr_free, nfb):
    raw = L.IndexEntry.build({"blocknr": blocknr, "nr_free": nr_free, "none_free_before": nfb})
    a = np.frombuffer(raw, L.INDEX_ENTRY_DTYPE)[0]
    assert (int(a["blocknr"]), int(a["nr_free"]), int(a["none_free_before"])) == (
        blocknr, nr_free, nfb)
    assert L.IndexEntry.parse(raw) == L.IndexEntry.parse(a.tobytes())


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1))
def test_device_details_struct_and_dtype_agree(mapped, trans, ctime, stime):
    raw = L.DeviceDetails.build({"mapped_blocks": mapped, "transaction_id": trans,
                                 "creation_time": ctime, "snapshotted_time": stime})
    a = np.frombuffer(raw, L.DEVICE_DETAILS_DTYPE)[0]
    assert int(a["mapped_blocks"]) == mapped and int(a["transaction_id"]) == trans
    assert int(a["creation_time"]) == ctime and int(a["snapshotted_time"]) == stime


@given(st.binary(min_size=32, max_size=32))
def test_btree_header_struct_twin(raw):
    parsed = L.BtreeNodeHeader.parse(raw)
    assert L.BTREE_HEADER_STRUCT.unpack(raw) == (
        parsed.csum, parsed.flags, parsed.blocknr, parsed.nr_entries, parsed.max_entries,
        parsed.value_size, parsed.padding)


@given(st.binary(min_size=32, max_size=32))
def test_btree_header_dtype_twin(raw):
    parsed = L.BtreeNodeHeader.parse(raw)
    a = np.frombuffer(raw, L.BTREE_HEADER_DTYPE)[0]
    assert {name: int(a[name]) for name in L.BTREE_HEADER_DTYPE.names} == {
        name: parsed[name] for name in L.BTREE_HEADER_DTYPE.names}


@given(st.binary(min_size=364, max_size=364))
def test_superblock_round_trip(raw):
    assert L.Superblock.build(L.Superblock.parse(raw)) == raw


@given(st.binary(min_size=364, max_size=364))
def test_superblock_struct_twin(raw):
    """The struct twin that format/superblock.py packs with reads what construct describes."""
    parsed = L.Superblock.parse(raw)
    names = [k for k in parsed if not k.startswith("_")]
    assert list(L.SUPERBLOCK_STRUCT.unpack(raw)) == [parsed[k] for k in names]
    assert L.SUPERBLOCK_STRUCT.pack(*(parsed[k] for k in names)) == raw


@given(st.binary(min_size=364, max_size=364))
def test_superblock_value_matches_construct(raw):
    """Superblock.unpack (format/superblock.py) and the construct description agree."""
    from dmimage.format.superblock import Superblock

    parsed = L.Superblock.parse(raw)
    sb = Superblock.unpack(raw)
    for k in parsed:
        if k.startswith("_") or k == "csum":
            continue
        if k in ("data_space_map_root", "metadata_space_map_root"):
            sm = L.SpaceMapRoot.parse(parsed[k])
            got = sb.data_sm if k.startswith("data") else sb.metadata_sm
            assert (got.nr_blocks, got.nr_allocated, got.bitmap_root, got.ref_count_root) == (
                sm.nr_blocks, sm.nr_allocated, sm.bitmap_root, sm.ref_count_root)
        else:
            assert getattr(sb, k) == parsed[k], k


def test_bitmap_bit_order_vectors():
    # thin-format.md §4.4: count 1 x4 = 0xAA, 2 x4 = 0x55, 3 x4 = 0xFF, (3,2,2,2) = 0x57
    assert BITMAP_LUT[0xAA].tolist() == [1, 1, 1, 1]
    assert BITMAP_LUT[0x55].tolist() == [2, 2, 2, 2]
    assert BITMAP_LUT[0xFF].tolist() == [3, 3, 3, 3]
    assert BITMAP_LUT[0x57].tolist() == [3, 2, 2, 2]
    # §15: a pool using blocks 0-25 with count 1 starts AA AA AA AA AA AA 0A
    counts = decode_bitmap(np.array([0xAA] * 6 + [0x0A], np.uint8))
    assert counts.tolist() == [1] * 26 + [0, 0]


def test_bitmap_decode_matches_a_bitwise_oracle():
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, 4080, dtype=np.uint8)
    words = np.frombuffer(raw.tobytes(), "<u8")
    expect = []
    for w in words.tolist():
        for j in range(32):
            hi = (w >> (2 * j)) & 1
            lo = (w >> (2 * j + 1)) & 1
            expect.append(hi << 1 | lo)
    assert decode_bitmap(raw).tolist() == expect
