"""Random damage for the fuzz harness (oracle side; independent of ``dmimage``).

A *recipe* is a list of mutations, each a tuple of plain ints and strings (so hypothesis can
shrink it and a failure prints a reproducible recipe). :func:`apply` turns (image, recipe) into
damaged bytes. Mutations:

* ``("named", i)``: the i-th case of :func:`damage.all_damage` (mod the number of cases);
* ``("flip", block_sel, offset, xor, fix)``: XOR one byte of a *used* block (block_sel picks
  among the blocks the pool uses), optionally recomputing that block's checksum;
* ``("zero", block_sel)``: zero a used block;
* ``("field", block_sel, field, value)``: set a btree header field (flags, nr_entries,
  max_entries, value_size) or the first key/value slot, checksum fixed;
* ``("sbroot", which, value_sel)``: point a superblock root (mapping, details, held_root,
  data/metadata SM bitmap_root, ref_count_root) at another used block or a huge number, or
  set an SM root's nr_blocks / nr_allocated to an extreme value; checksum fixed.

:func:`random_recipe` draws a recipe from a ``random.Random``: seeded per input by the
harness, so any input is replayed from (seed, index) alone.
"""

from __future__ import annotations

import random
import struct

import damage

BLOCK = damage.BLOCK
_SB_FIELDS = {
    "mapping_root": 320, "details_root": 328, "held_root": 56,
    "data_nr_blocks": 64, "data_nr_allocated": 72, "data_bitmap_root": 80, "data_rc_root": 88,
    "meta_nr_blocks": 192, "meta_nr_allocated": 200, "meta_bitmap_root": 208,
    "meta_rc_root": 216, "time": 44, "data_block_size": 336,
}
_EXTREMES = [0, 1, 2, 3, 255, 4096, 16320, 16321, 1 << 20, 1 << 32, (1 << 40) + 5,
             (1 << 63), (1 << 64) - 1]
_NODE_FIELDS = {"flags": (4, "<I"), "nr_entries": (16, "<I"), "max_entries": (20, "<I"),
                "value_size": (24, "<I"), "key0": (32, "<Q"), "value0": (2048, "<Q")}


def used_blocks(meta: bytes) -> list[int]:
    """Blocks with a recognisable type (any salt), in order: what mutations aim at."""
    return sorted(damage.scan(meta))


def _fix(out: bytearray, b: int) -> None:
    salt = damage.block_salt(bytes(out[b * BLOCK:(b + 1) * BLOCK]))
    if salt not in damage.SALTS:
        salt = damage.SALT_SUPERBLOCK if b == 0 else damage.SALT_BTREE
    damage.fix_checksum(out, b, salt)


def apply(meta: bytes, recipe: list[tuple], used: list[int] | None = None,
          named: list[damage.Damaged] | None = None) -> bytearray:
    out = bytearray(meta)
    used = used if used is not None else used_blocks(meta)
    for m in recipe:
        op = m[0]
        if op == "named":
            cases = named if named is not None else damage.all_damage(bytes(out))
            if cases:
                out = bytearray(cases[m[1] % len(cases)].data)
        elif op == "flip":
            _, sel, offset, xor, fix = m
            b = used[sel % len(used)]
            if len(out) < (b + 1) * BLOCK:  # an earlier truncation removed the block
                continue
            salt = damage.block_salt(bytes(out[b * BLOCK:(b + 1) * BLOCK]))
            out[b * BLOCK + offset % BLOCK] ^= (xor % 255) + 1
            if fix and salt in damage.SALTS:
                damage.fix_checksum(out, b, salt)
        elif op == "zero":
            b = used[m[1] % len(used)]
            if len(out) < (b + 1) * BLOCK:
                continue
            out[b * BLOCK:(b + 1) * BLOCK] = bytes(BLOCK)
        elif op == "field":
            _, sel, name, value = m
            b = used[sel % len(used)]
            if b == 0 or len(out) < (b + 1) * BLOCK:
                continue
            off, fmt = _NODE_FIELDS[name]
            v = value % (1 << (8 * struct.calcsize(fmt)))
            struct.pack_into(fmt, out, b * BLOCK + off, v)
            damage.fix_checksum(out, b, damage.SALT_BTREE)
        elif op == "sbroot":
            _, name, value_sel = m
            if len(out) < BLOCK:
                continue
            off = _SB_FIELDS[name]
            size = 4 if name in ("time", "data_block_size") else 8
            if value_sel < 0:
                v = _EXTREMES[(-value_sel) % len(_EXTREMES)]
            else:
                v = used[value_sel % len(used)]
            v %= 1 << (8 * size)
            struct.pack_into("<I" if size == 4 else "<Q", out, off, v)
            damage.fix_checksum(out, 0, damage.SALT_SUPERBLOCK)
        else:
            raise ValueError(op)
    return out


def random_recipe(rng: random.Random) -> list[tuple]:
    """1..3 mutations, each kind equally likely (flips of the first 64 bytes, where the
    headers are, as often as flips anywhere)."""
    out: list[tuple] = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        sel = rng.randint(0, 10_000)
        if kind == 0:
            out.append(("named", rng.randint(0, 100)))
        elif kind in (1, 2):
            offset = rng.randrange(BLOCK if kind == 1 else 64)
            out.append(("flip", sel, offset, rng.randint(0, 254), rng.random() < 0.5))
        elif kind == 3:
            out.append(("zero", sel))
        elif kind == 4:
            value = rng.randint(0, 300) if rng.random() < 0.5 else rng.choice(_EXTREMES)
            out.append(("field", sel, rng.choice(sorted(_NODE_FIELDS)), value))
        else:
            out.append(("sbroot", rng.choice(sorted(_SB_FIELDS)),
                        rng.randint(-len(_EXTREMES), 10_000)))
    return out
