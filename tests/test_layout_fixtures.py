"""format/superblock.py and format/values.py against bytes they did not make.

* Hand-built fixtures: a superblock block, device details records and mapping values written
  here field by field at the offsets of the kernel's ``struct thin_disk_superblock``,
  ``struct disk_sm_root`` and ``struct disk_device_details`` (drivers/md/dm-thin-metadata.c,
  thin-format.md §2.1, §3.4, §4.1), with the checksum from a bitwise CRC-32C written here too.
  The unpacker must read every field and the packer must give back the same bytes.
* Blocks written by thin_restore 1.1 and by the kernel (tests/fixtures/kernel) must survive
  unpack -> pack byte for byte.
"""

from __future__ import annotations

import lzma
from pathlib import Path

import numpy as np
import pytest

from dmimage.format.checksum import checksum_ok
from dmimage.format.superblock import SpaceMapRoot, Superblock
from dmimage.format.values import (
    DeviceDetails,
    mapping_blocks,
    pack_details,
    pack_mapping,
    pack_mappings,
    unpack_details,
    unpack_mapping,
    unpack_mappings,
)
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import leaves_in_order

import poolgen

FIXTURES = Path(__file__).parent / "fixtures" / "kernel"


# ----------------------------------------------------------------------- independent checksum

def _crc32c_kernel(data: bytes) -> int:
    """The kernel's crc32c (Castagnoli, reflected 0x82F63B78, seed ~0, no final inversion),
    bit by bit: independent of the crc32c package dmimage uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


def _seal(block: bytearray, salt: int) -> None:
    block[0:4] = (_crc32c_kernel(bytes(block[4:4096])) ^ salt).to_bytes(4, "little")


SALT_SUPERBLOCK = 160774  # thin-format.md §0


def test_own_crc_matches_the_documented_vector():
    # thin-format.md §1: bytes 4..4095 all zero -> stored superblock checksum 0x58CFD397
    block = bytearray(4096)
    _seal(block, SALT_SUPERBLOCK)
    assert block[0:4] == (0x58CFD397).to_bytes(4, "little")


# ----------------------------------------------------------------------- superblock fixture

def _put(block: bytearray, offset: int, size: int, value: int) -> None:
    block[offset:offset + size] = value.to_bytes(size, "little")


#: (offset, size, value) of every integer field; each value has distinct bytes so a field read
#: from the wrong offset or with the wrong width cannot match.
SB_INTS = {
    "flags": (4, 4, 0x00000001),
    "blocknr": (8, 8, 0x0000000000000000),
    "magic": (32, 8, 27022010),
    "version": (40, 4, 2),
    "time": (44, 4, 0x0A0B0C0D),
    "trans_id": (48, 8, 0x1122334455667788),
    "held_root": (56, 8, 0x0000_0000_0000_2A2B),
    "data_mapping_root": (320, 8, 0x0000_0000_0003_0405),
    "device_details_root": (328, 8, 0x0000_0000_0006_0708),
    "data_block_size": (336, 4, 0x00000480),
    "metadata_block_size": (340, 4, 8),
    "metadata_nr_blocks": (344, 8, 0x0000_0000_0009_0A0B),
    "compat_flags": (352, 4, 0x11000010),
    "compat_ro_flags": (356, 4, 0x22000020),
    "incompat_flags": (360, 4, 0x44000040),
}
SB_UUID = bytes(range(0xC1, 0xD1))
#: disk_sm_root: nr_blocks, nr_allocated, bitmap_root, ref_count_root (u64 each)
DATA_SM = (0x0000_00F1_F2F3_F4F5, 0x0000_00E1_E2E3_E4E5, 0x0000_0000_00D1_D2D3,
           0x0000_0000_00C1_C2C3)
META_SM = (0x0000_0000_00B1_B2B3, 0x0000_0000_00A1_A2A3, 0x0000_0000_0091_9293,
           0x0000_0000_0081_8283)


def _sm_root_bytes(values: tuple[int, int, int, int]) -> bytes:
    blob = bytearray(128)
    for i, v in enumerate(values):
        _put(blob, 8 * i, 8, v)
    return bytes(blob)


def _hand_built_superblock() -> bytearray:
    block = bytearray(4096)
    for offset, size, value in SB_INTS.values():
        _put(block, offset, size, value)
    block[16:32] = SB_UUID
    block[64:192] = _sm_root_bytes(DATA_SM)
    block[192:320] = _sm_root_bytes(META_SM)
    _seal(block, SALT_SUPERBLOCK)
    return block


def test_superblock_fixture_unpacks_field_by_field():
    block = _hand_built_superblock()
    sb = Superblock.unpack(bytes(block))
    for name, (_, _, value) in SB_INTS.items():
        assert getattr(sb, name) == value, name
    assert sb.uuid == SB_UUID
    assert sb.data_sm == SpaceMapRoot(*DATA_SM)
    assert sb.metadata_sm == SpaceMapRoot(*META_SM)
    assert sb.needs_check and sb.nr_data_blocks == DATA_SM[0]
    assert checksum_ok(block, SALT_SUPERBLOCK)


def test_superblock_fixture_packs_back_byte_for_byte():
    block = _hand_built_superblock()
    sb = Superblock.unpack(bytes(block))
    packed = sb.pack()
    assert len(packed) == 4096
    assert packed[0:4] == block[0:4], "checksum"
    assert packed == bytes(block)


def test_superblock_fixture_from_fields_packs_the_same_bytes():
    """Built from the field values alone (not from the bytes), the packer writes the fixture."""
    ints = {name: value for name, (_, _, value) in SB_INTS.items()}
    sb = Superblock(uuid=SB_UUID, data_sm=SpaceMapRoot(*DATA_SM),
                    metadata_sm=SpaceMapRoot(*META_SM), **ints)
    assert sb.pack() == bytes(_hand_built_superblock())


def test_superblock_pack_into_keeps_the_tail_and_reseals():
    """clear_needs_check rewrites block 0 through pack_into: only flags and checksum change."""
    block = _hand_built_superblock()
    block[1000] = 0x5A  # a non-zero tail byte, covered by the checksum
    _seal(block, SALT_SUPERBLOCK)
    sb = Superblock.unpack(block)
    out = bytearray(block)
    Superblock(**{**{f: getattr(sb, f) for f in sb.__dataclass_fields__}, "flags": 0}) \
        .pack_into(out)
    expect = bytearray(block)
    _put(expect, 4, 4, 0)
    _seal(expect, SALT_SUPERBLOCK)
    assert out == expect


def test_superblock_unpack_refuses_a_short_block():
    from dmimage.errors import FormatError

    with pytest.raises(FormatError):
        Superblock.unpack(bytes(100))


# ----------------------------------------------------------------------- device details fixture

#: (mapped_blocks u64 @0, transaction_id u64 @8, creation_time u32 @16, snapshotted_time u32 @20)
DETAILS = [
    (0x0000_0102_0304_0506, 0x1112_1314_1516_1718, 0x21222324, 0x31323334),
    (0, 0, 0, 0),
    (2**64 - 1, 2**64 - 2, 2**32 - 1, 2**32 - 2),
]


def _hand_built_details() -> bytes:
    out = bytearray()
    for mapped, tid, ctime, stime in DETAILS:
        rec = bytearray(24)
        _put(rec, 0, 8, mapped)
        _put(rec, 8, 8, tid)
        _put(rec, 16, 4, ctime)
        _put(rec, 20, 4, stime)
        out += rec
    return bytes(out)


def test_device_details_fixture_round_trip():
    raw = _hand_built_details()
    recs = unpack_details(raw)
    assert [(d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time)
            for d in recs] == DETAILS
    assert pack_details(recs).tobytes() == raw
    assert pack_details(DeviceDetails(*t) for t in DETAILS).tobytes() == raw
    for i, t in enumerate(DETAILS):
        one = raw[24 * i:24 * (i + 1)]
        assert DeviceDetails.unpack(one) == DeviceDetails(*t)
        assert DeviceDetails(*t).pack() == one


# ----------------------------------------------------------------------- mapping values

def test_mapping_value_fixture():
    # (data block << 24) | time: the low 3 bytes are the time, the next 5 the data block
    block, time = 0x01_0203_0405, 0x0A0B0C
    raw = bytes([0x0C, 0x0B, 0x0A, 0x05, 0x04, 0x03, 0x02, 0x01])
    value = int.from_bytes(raw, "little")
    assert pack_mapping(block, time) == value
    assert unpack_mapping(value) == (block, time)
    values = np.frombuffer(raw * 3, "<u8")
    blocks, times = unpack_mappings(values)
    assert blocks.tolist() == [block] * 3 and times.tolist() == [time] * 3
    assert times.dtype == np.uint32 and blocks.dtype == np.uint64
    assert mapping_blocks(values).tolist() == [block] * 3
    assert pack_mappings(blocks, times).astype("<u8").tobytes() == raw * 3
    top = (2**40 - 1, 2**24 - 1)
    assert unpack_mapping(pack_mapping(*top)) == top and pack_mapping(*top) == 2**64 - 1


# ----------------------------------------------------------------------- blocks others wrote

def _round_trips(meta: Path) -> int:
    """Every superblock (block 0, the held copy) and details leaf of ``meta`` through
    unpack -> pack; returns how many details records were compared."""
    with BlockReader(meta) as reader:
        locations = [0]
        live = Superblock.unpack(reader.block(0))
        if live.held_root:
            locations.append(live.held_root)
        compared = 0
        for loc in locations:
            raw = bytes(reader.block(loc))
            sb = Superblock.unpack(raw)
            assert sb.blocknr == loc
            assert sb.pack() == raw, f"superblock at block {loc}"
            for leaf in leaves_in_order(reader, sb.device_details_root, 24):
                values = bytes(leaf.raw_values)
                assert pack_details(unpack_details(values)).tobytes() == values
                compared += leaf.nr_entries
        return compared


@pytest.mark.parametrize("make", [lambda: poolgen.thins_pool(3), poolgen.snapshot_pool,
                                  lambda: poolgen.multilevel_pool(2000)],
                         ids=["thins3", "snapshot", "multilevel"])
def test_thin_restore_11_blocks_round_trip(restored_pool, make):
    rp = restored_pool(make(), tools="1.1")
    assert _round_trips(rp.path) == len(rp.pool.devices)


def test_empty_pool_from_thin_restore_11_round_trips(empty_pool_meta):
    assert _round_trips(empty_pool_meta.path) == 0


@pytest.mark.parametrize("name", sorted(p.name[:-len(".meta.xz")]
                                        for p in FIXTURES.glob("*.meta.xz")))
def test_kernel_written_blocks_round_trip(name, tmp_path):
    meta = tmp_path / f"{name}.meta"
    with lzma.open(FIXTURES / f"{name}.meta.xz") as f:
        meta.write_bytes(f.read())
    assert _round_trips(meta) >= 1


# ----------------------------------------------------------------------- what a commit writes

def test_commit_keeps_what_a_kernel_commit_keeps(restored_pool, tmp_path):
    """The kernel's commit rewrites time, trans_id, flags, held_root, both roots and both
    space-map roots in the superblock it read and keeps the rest (uuid, version, block sizes,
    metadata_nr_blocks, compat_flags); a metadata-snapshot copy is the committed superblock at
    its own block with held_root 0 and zero space-map roots (thin-format.md §2.5). Checked on
    the bytes, against offsets written out here."""
    from dmimage.thin.transaction import open_writable

    meta = restored_pool(poolgen.thins_pool(2), tools="1.1").path
    raw = bytearray(meta.read_bytes()[:4096])
    uuid = bytes(range(1, 17))
    raw[16:32] = uuid
    _put(raw, 352, 4, 0x80)  # a compat flag the kernel ignores and keeps
    _seal(raw, SALT_SUPERBLOCK)
    with open(meta, "r+b") as f:
        f.write(raw)
    with open_writable(meta) as wp:
        wp.create_thin(77)
        wp.commit()
        held = wp.reserve_metadata_snap()
        wp.commit()
    disk = meta.read_bytes()
    live, copy = disk[:4096], disk[held * 4096:(held + 1) * 4096]
    assert live[16:32] == uuid and int.from_bytes(live[352:356], "little") == 0x80
    assert live[40:44] == raw[40:44] and live[336:352] == raw[336:352]
    assert int.from_bytes(live[56:64], "little") == held
    assert int.from_bytes(copy[8:16], "little") == held
    assert int.from_bytes(copy[56:64], "little") == 0
    assert copy[64:320] == bytes(256), "a snapshot copy holds no space-map roots"
    assert copy[16:56] == live[16:56] and copy[320:364] == live[320:364]
    assert copy[4:8] == live[4:8]
    assert checksum_ok(live, SALT_SUPERBLOCK) and checksum_ok(copy, SALT_SUPERBLOCK)
    assert copy[364:] == bytes(4096 - 364) and live[364:] == bytes(4096 - 364)
