"""pdata/leaves.py's batch validation against the one-node-at-a-time rules of pdata/btree.py.

Groups of sibling leaves are built byte by byte here (headers, keys, values, crc32c sealed),
sound or with one flaw each (checksum, flags, blocknr, value_size, max_entries, nr_entries,
fill, key order, key range, mixed max_entries), and :func:`validated_leaves` must accept a
group exactly when :func:`read_node`, :func:`fill_problem` and :func:`order_problem` accept
every leaf, returning the same keys and values.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from dmimage.errors import MetadataError
from dmimage.format.checksum import seal
from dmimage.format.constants import BLOCK_SIZE, KEY_END, SALT_BTREE_NODE
from dmimage.pdata.block import BlockReader
from dmimage.pdata.btree import fill_problem, order_problem, read_node
from dmimage.pdata.leaves import checksums_match, validated_leaves

LEAF, INTERNAL = 2, 1
FLAWS = ("none", "csum", "flags", "blocknr", "value_size", "max_entries", "nr_entries",
         "underfull", "order", "below_lo", "above_hi", "mixed_max", "empty")


def _leaf(blocknr: int, keys: list[int], values: list[int], max_entries: int, *,
          flags: int = LEAF, own: int | None = None, value_size: int = 8,
          nr: int | None = None) -> bytearray:
    b = bytearray(BLOCK_SIZE)
    hdr = np.frombuffer(b, np.uint32, 8)
    hdr[1] = flags
    hdr[2:4] = np.array([blocknr if own is None else own], np.uint64).view(np.uint32)
    hdr[4] = len(keys) if nr is None else nr
    hdr[5] = max_entries
    hdr[6] = value_size
    n = min(len(keys), max_entries)
    words = np.frombuffer(b, np.uint64)
    words[4:4 + n] = keys[:n]
    if 4 + max_entries + n <= BLOCK_SIZE // 8:
        words[4 + max_entries:4 + max_entries + n] = values[:n]
    seal(b, SALT_BTREE_NODE)
    return b


def _group(rng: random.Random, flaw: str, root: bool) -> tuple[list[bytearray], list[int], int]:
    """Blocks 1..n: sibling leaves and the parent's keys (``lo``) and ``hi``."""
    n = rng.randint(1, 12)
    mx = 252
    key = rng.randint(0, 1000)
    blocks, lo = [], []
    for i in range(n):
        count = rng.randint(mx // 3, mx)
        lo.append(key)
        key += rng.randint(0, 3)
        keys = []
        for _ in range(count):
            keys.append(key)
            key += rng.randint(1, 5)
        values = [rng.getrandbits(64) for _ in keys]
        blocks.append((i + 1, keys, values))
    hi = key + rng.randint(0, 3) if rng.random() < 0.7 else KEY_END
    victim = rng.randrange(n)
    out = []
    for blocknr, keys, values in blocks:
        kw: dict[str, int] = {}
        m = mx
        if blocknr - 1 == victim:
            if flaw == "flags":
                kw["flags"] = INTERNAL
            elif flaw == "blocknr":
                kw["own"] = blocknr + 100
            elif flaw == "value_size":
                kw["value_size"] = 16
            elif flaw == "max_entries":
                m = 251
            elif flaw == "nr_entries":
                kw["nr"] = mx + 3
            elif flaw == "underfull":
                keys, values = keys[:rng.randint(1, mx // 3 - 1)], values[:1]
            elif flaw == "order" and len(keys) > 1:
                j = rng.randrange(len(keys) - 1)
                keys = list(keys)
                keys[j], keys[j + 1] = keys[j + 1], keys[j]
            elif flaw == "below_lo":
                lo[victim] = keys[0] + 1
            elif flaw == "above_hi":
                if victim + 1 < n:
                    lo[victim + 1] = keys[-1]
                else:
                    hi = keys[-1]
            elif flaw == "mixed_max":
                m = 126
                keys, values = keys[:rng.randint(42, 126)], values[:126]
            elif flaw == "empty":
                keys, values = [], []
        out.append(_leaf(blocknr, keys, values, m, **kw))
    if flaw == "csum":
        out[victim][100] ^= 1
    return out, lo, hi


def _expected(reader: BlockReader, blocks: list[int], lo: list[int], hi: int, root: bool
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """Keys and values if every leaf passes the one-node rules, else None."""
    keys, values = [], []
    for i, b in enumerate(blocks):
        try:
            node = read_node(reader, b, 8)
        except MetadataError:
            return None
        if not node.is_leaf:
            return None
        upper = lo[i + 1] if i + 1 < len(blocks) else hi
        if (not root and fill_problem(node, False, "t")) or order_problem(node, lo[i], upper,
                                                                           "t"):
            return None
        keys.append(node.keys)
        values.append(node.values())
    return np.concatenate(keys), np.concatenate(values)


@pytest.mark.parametrize("flaw", FLAWS)
def test_validated_leaves_agree_with_one_node_rules(tmp_path: Path, flaw: str) -> None:
    rng = random.Random(f"leaves-{flaw}")
    accepted = rejected = 0
    for trial in range(40):
        root = trial % 4 == 0
        group, lo, hi = _group(rng, flaw, root)
        path = tmp_path / f"m{trial}"
        path.write_bytes(bytes(BLOCK_SIZE) + b"".join(group))
        with BlockReader(path) as reader:
            blocks = np.arange(1, len(group) + 1, dtype=np.int64)
            got = validated_leaves(reader, blocks, np.array(lo, np.uint64), hi, root=root,
                                   value_size=8)
            want = _expected(reader, blocks.tolist(), lo, hi, root)
            assert (got is None) == (want is None), (flaw, trial)
            if got is not None and want is not None:
                accepted += 1
                assert np.array_equal(got.keys, want[0])
                assert np.array_equal(got.values, want[1])
                assert got.counts.tolist() == [read_node(reader, b, 8).nr_entries
                                               for b in blocks.tolist()]
            else:
                rejected += 1
            del got
    # every flaw is both caught and (where it can be harmless, e.g. a root's fill) passed
    if flaw == "none" or flaw == "mixed_max":
        assert rejected == 0
    elif flaw not in ("underfull", "empty", "order"):
        assert accepted == 0
    assert accepted + rejected == 40


def test_checksums_match(tmp_path: Path) -> None:
    blocks = [_leaf(i, [1, 2, 3], [4, 5, 6], 252) for i in range(1, 6)]
    path = tmp_path / "m"
    path.write_bytes(bytes(BLOCK_SIZE) + b"".join(blocks))
    with BlockReader(path) as reader:
        assert checksums_match(reader, np.arange(1, 6), SALT_BTREE_NODE)
        assert not checksums_match(reader, np.arange(1, 6), SALT_BTREE_NODE ^ 1)
        assert not checksums_match(reader, np.arange(0, 6), SALT_BTREE_NODE)  # block 0: zeros


def _mapped_kib(addr: int) -> int:
    """Resident KiB of the mapping starting at ``addr`` (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{addr:x}":
            for field in lines[i + 1:]:
                if field.startswith("Rss:"):
                    return int(field.split()[1])
    raise AssertionError(f"no mapping at {addr:#x}")


def test_drop_pages_of_a_block_range(tmp_path: Path) -> None:
    """drop_pages(first, last) lets go of exactly those blocks' pages (the rest stay
    resident), takes ranges reaching past either end, and the bytes read afterwards are the
    file's."""
    nblocks = 64
    content = np.random.default_rng(5).integers(0, 256, nblocks * BLOCK_SIZE, np.uint8)
    path = tmp_path / "meta"
    path.write_bytes(content.tobytes())
    with BlockReader(path) as reader:
        words = np.frombuffer(reader.buffer(), np.uint8)
        addr = words.ctypes.data
        assert int(words.sum(dtype=np.int64)) == int(content.sum(dtype=np.int64))  # all read
        assert _mapped_kib(addr) == nblocks * 4
        reader.drop_pages(8, 23)
        assert _mapped_kib(addr) == (nblocks - 16) * 4
        reader.drop_pages(-5, 3)  # clipped at block 0
        reader.drop_pages(60, 10_000)  # clipped at the end
        reader.drop_pages(30, 20)  # empty: nothing
        assert _mapped_kib(addr) == (nblocks - 16 - 4 - 4) * 4
        assert bytes(reader.block(9)) == content[9 * BLOCK_SIZE:10 * BLOCK_SIZE].tobytes()
        reader.drop_pages()
        assert _mapped_kib(addr) <= 4
        assert bytes(reader.buffer()) == content.tobytes()
