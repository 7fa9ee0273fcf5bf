"""dm-cache metadata against thin-provisioning-tools 1.1: metadata written by cache_restore 1.1
from seeded random XML (versions 1 and 2, several array blocks, multi-level array btrees);
`dmimage cache dump` must be byte-identical to cache_dump 1.1 and `cache check` must give
cache_check 1.1's verdict, on the pristine metadata and on damaged copies.

The kernel's own cache metadata is read in vmtests/test_cache_guest.py."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import restore_xml
from meta_compare import differing_blocks
from sparse import nonzero_blocks, same_contents, write_sparse

from dmimage.cli.main import main
from dmimage.format.cache import CACHE_SUPERBLOCK, CacheSuperblock

import oracles
from cli_run import run_cli

TOOLS = oracles.tools_11()




def restore(tmp: Path, xml: str, version: int, name: str) -> Path:
    src, meta = tmp / f"{name}.xml", tmp / f"{name}.meta"
    src.write_text(xml)
    with open(meta, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run([str(TOOLS.bindir / "cache_restore"), "-i", str(src), "-o", str(meta),
                    "--metadata-version", str(version)], check=True, capture_output=True)
    return meta


def ours(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """`dmimage cache ARGS`, in-process (tests/cli_run.py)."""
    return run_cli("cache", *argv)


def ours_process(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """`dmimage cache ARGS` as its own process (the console script's start-up and exit)."""
    return subprocess.run([sys.executable, "-m", "dmimage", "cache", *argv],
                          capture_output=True, timeout=120)


def theirs(tool: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(TOOLS.bindir / tool), *argv], capture_output=True, timeout=120)


CASES = [(1, 64, 0.5), (2, 64, 0.5), (1, 5000, 0.3), (2, 5000, 0.9), (2, 140_000, 0.05),
         (1, 140_000, 0.02), (2, 1000, 0.0)]


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("cache")
    rng = random.Random(20261201)
    return [restore(tmp, restore_xml.cache_xml(rng, n, fill), v, f"c{i}")
            for i, (v, n, fill) in enumerate(CASES)]


def test_layout_twins_agree() -> None:
    fields = dict(csum=1, flags=2, blocknr=3, uuid=bytes(range(16)), magic=4, version=5,
                  policy_name=b"smq".ljust(16, b"\0"), policy_hint_size=6,
                  metadata_space_map_root=bytes(range(128)), mapping_root=7, hint_root=8,
                  discard_root=9, discard_block_size=10, discard_nr_blocks=11,
                  data_block_size=12, metadata_block_size=13, cache_blocks=14,
                  compat_flags=15, compat_ro_flags=16, incompat_flags=17, read_hits=18,
                  read_misses=19, write_hits=20, write_misses=21, policy_version=[22, 23, 24],
                  dirty_root=25)
    raw = CacheSuperblock.build(fields)
    assert CACHE_SUPERBLOCK.unpack(raw)[5] == 5 and CACHE_SUPERBLOCK.unpack(raw)[-1] == 25
    assert len(raw) == CACHE_SUPERBLOCK.size


@pytest.mark.parametrize("i", range(len(CASES)))
def test_dump_identical_and_check_clean(pools: list[Path], i: int) -> None:
    meta = pools[i]
    want = theirs("cache_dump", str(meta))
    assert want.returncode == 0
    got = ours("dump", str(meta))
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    if i == 0:  # once as a process of its own: the same output
        assert ours_process("dump", str(meta)).stdout == got.stdout
    assert theirs("cache_check", str(meta)).returncode == 0
    res = ours("check", str(meta))
    assert res.returncode == 0, res.stdout + res.stderr


def _damage(pristine: bytes, dst: Path, rng: random.Random, used: int,
            nonzero: np.ndarray) -> str:
    """A damaged copy of ``pristine`` (non-zero blocks ``nonzero``) written to ``dst``."""
    buf = bytearray(pristine[:used * 4096])  # the blocks past ``used`` are zeros
    b = rng.randrange(used)
    kind = rng.choice(["zero", "byte", "csum-ok-field"])
    if kind == "zero":
        buf[b * 4096:(b + 1) * 4096] = bytes(4096)
    else:
        off = b * 4096 + rng.randrange(4096)
        buf[off] ^= 1 << rng.randrange(8)
    write_sparse(dst, buf, np.union1d(nonzero, [b]), size=len(pristine))
    return f"{kind} block {b}"


def test_damaged_verdicts_agree(pools: list[Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """Random single damages to used metadata blocks: the same exit status as cache_check 1.1
    (0 against non-0), except where dmimage is stricter for a rule the kernel also enforces
    (superblock magic and block number: 1.1 reads neither)."""
    rng = random.Random(7)
    disagreements = []
    for meta in pools[:5]:
        pristine = meta.read_bytes()
        nonzero = nonzero_blocks(pristine)
        used = int(nonzero.max()) + 1
        for k in range(12):
            dst = tmp_path / f"{meta.stem}-{k}"
            what = _damage(pristine, dst, rng, used, nonzero)
            t = theirs("cache_check", str(dst)).returncode != 0
            rc = main(["cache", "check", "-q", str(dst)])
            err = capsys.readouterr().err
            assert rc in (0, 1, 2) and "Traceback" not in err
            if (rc != 0) != t:
                disagreements.append(f"{meta.stem} {what}: 1.1 {'fails' if t else 'passes'}, "
                                     f"dmimage exit {rc} {err.strip()}")
    assert not disagreements, "\n".join(disagreements)


def test_writeback_copies_exactly_the_dirty_blocks(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A cache_restore 1.1 pool with a known dirty set: writeback copies those blocks (64 KiB
    each) from FAST to ORIGIN and nothing else; --dry-run counts without writing."""
    xml = ('<superblock uuid="" block_size="128" nr_cache_blocks="8" policy="smq" '
           'hint_width="4">\n  <mappings>\n'
           '    <mapping cache_block="0" origin_block="3" dirty="true"/>\n'
           '    <mapping cache_block="2" origin_block="1" dirty="false"/>\n'
           '    <mapping cache_block="5" origin_block="7" dirty="true"/>\n'
           '  </mappings>\n  <hints>\n  </hints>\n</superblock>')
    bs = 128 * 512
    for version in (1, 2):
        meta = restore(tmp_path, xml, version, f"wb{version}")
        fast, origin = tmp_path / "fast", tmp_path / "origin"
        fast_bytes = np.random.default_rng(1).integers(0, 256, 8 * bs, dtype=np.uint8).tobytes()
        org = np.random.default_rng(2).integers(0, 256, 10 * bs, dtype=np.uint8).tobytes()
        fast.write_bytes(fast_bytes)
        origin.write_bytes(org)
        assert main(["cache", "writeback", "--dry-run", str(meta), str(fast), str(origin)]) == 0
        assert "2 dirty blocks" in capsys.readouterr().out and origin.read_bytes() == org
        assert main(["cache", "writeback", str(meta), str(fast), str(origin)]) == 0
        want = bytearray(org)
        for c, o in ((0, 3), (5, 7)):
            want[o * bs:(o + 1) * bs] = fast_bytes[c * bs:(c + 1) * bs]
        assert origin.read_bytes() == bytes(want)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_restore_matches_cache_restore(pools: list[Path], tmp_path: Path, i: int) -> None:
    """dmimage's restore of cache_dump 1.1's XML: cache_check 1.1 passes and cache_dump 1.1
    gives the same XML as for 1.1's own restore; the flags and counters are 1.1's but for
    read_misses (1.1 writes 9)."""
    version = CASES[i][0]
    xml = tmp_path / "in.xml"
    xml.write_bytes(theirs("cache_dump", str(pools[i])).stdout)
    out = tmp_path / "ours.meta"
    with open(out, "wb") as f:
        f.truncate(32 << 20)
    res = ours("restore", "-i", str(xml), "-o", str(out), "--metadata-version", str(version))
    assert res.returncode == 0, res.stderr
    assert theirs("cache_check", str(out)).returncode == 0
    assert theirs("cache_dump", str(out)).stdout == xml.read_bytes()
    a = CACHE_SUPERBLOCK.unpack_from(out.read_bytes())
    b = CACHE_SUPERBLOCK.unpack_from(pools[i].read_bytes())
    names = ["csum", "flags", "blocknr", "uuid", "magic", "version", "policy", "hint_size",
             "sm_root", "mapping_root", "hint_root", "discard_root", "discard_bs", "discard_nr",
             "data_bs", "meta_bs", "cache_blocks", "compat", "compat_ro", "incompat", "rh", "rm",
             "wh", "wm", "pv0", "pv1", "pv2", "dirty_root"]
    differ = {n for n, x, y in zip(names, a, b, strict=True) if x != y}
    assert differ <= {"csum", "sm_root", "mapping_root", "hint_root", "discard_root",
                      "dirty_root", "rm"}, differ


@pytest.mark.parametrize("xml,needle", [
    ("<superblock uuid='' block_size='128' nr_cache_blocks='4' policy='smq' hint_width='4'>"
     "<mappings><mapping cache_block='9' origin_block='1' dirty='true'/></mappings>"
     "</superblock>", "cache_block=9: out of range"),
    ("<superblock uuid='' block_size='128' nr_cache_blocks='4' policy='smq' hint_width='4'>"
     "<mappings><mapping cache_block='1' origin_block='1' dirty='yes'/></mappings>"
     "</superblock>", "dirty must be true or false"),
    ("<superblock uuid='' block_size='128' nr_cache_blocks='4' policy='smq' hint_width='4'>"
     "<hints><hint cache_block='1' data='AAA='/></hints></superblock>", "the hint width is 4"),
    ("<superblock uuid='' block_size='128' nr_cache_blocks='4' policy='smq' hint_width='4'>"
     "<mappings>", "no element found"),
    ("<superblock bogus='1'/>", "unknown attribute bogus"),
])
def test_restore_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], xml: str,
                           needle: str) -> None:
    src, out = tmp_path / "in.xml", tmp_path / "out.meta"
    src.write_text(xml)
    out.write_bytes(b"\xaa" * (1 << 20))
    rc = main(["cache", "restore", "-i", str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and needle in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"\xaa" * (1 << 20)  # nothing written


def test_restore_output_too_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in.xml", tmp_path / "out.meta"
    src.write_text(restore_xml.cache_xml(random.Random(4), 200_000, 0.5))
    out.write_bytes(b"\xaa" * (64 << 10))
    rc = main(["cache", "restore", "-i", str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "too small" in err and out.read_bytes() == b"\xaa" * (64 << 10)


@pytest.mark.parametrize("args", [
    ["--nr-blocks", "1000000"], ["--block-size", "128", "--device-size", "1073741824"],
    ["--nr-blocks", "12345", "-u", "m"], ["--nr-blocks", "12345", "-u", "G", "-n"],
    ["--nr-blocks", "1", "--max-hint-width", "128", "-n=short"],
    ["--block-size", "64k", "--device-size", "100g", "-u", "k", "-n=long"],
    ["--nr-blocks", "999999999999"], ["--block-size", "32k", "--device-size", "1t"],
])
def test_metadata_size_matches_1_1(args: list[str]) -> None:
    want = theirs("cache_metadata_size", *args)
    got = ours("metadata-size", *args)
    assert want.returncode == got.returncode == 0
    assert got.stdout == want.stdout


@pytest.mark.parametrize("version", (1, 2))
def test_writeback_clears_dirty_bits_as_1_1(tmp_path: Path, version: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """After the copy, `cache writeback` clears the copied blocks' dirty bits: cache_dump 1.1
    of its metadata equals that of cache_writeback 1.1's on a copy of the same metadata, the
    origins are byte-identical, both checkers pass. --no-metadata-update leaves META
    untouched; a crash before the superblock leaves the old metadata whole."""
    rng = random.Random(version)
    meta = restore(tmp_path, restore_xml.cache_xml(rng, 600, 0.5), version, "wbm")
    before = meta.read_bytes()
    assert b'dirty="true"' in theirs("cache_dump", str(meta)).stdout
    bs = 128 * 512
    fast = tmp_path / "fast"
    fast.write_bytes(np.random.default_rng(3).integers(0, 256, 600 * bs, np.uint8).tobytes())
    runs = {}
    for who in ("ours", "theirs", "nometa"):
        m, origin = tmp_path / f"{who}.meta", tmp_path / f"{who}.origin"
        m.write_bytes(before)
        with open(origin, "wb") as f:
            f.truncate(4800 * bs)
        if who == "theirs":
            res = theirs("cache_writeback", "--metadata-device", str(m), "--fast-device",
                         str(fast), "--origin-device", str(origin))
            assert res.returncode == 0, res.stderr
        else:
            extra = ["--no-metadata-update"] if who == "nometa" else []
            assert main(["cache", "writeback", *extra, str(m), str(fast), str(origin)]) == 0
        runs[who] = (m, origin)
    # the origins are 300 MiB sparse files: compared by their data extents
    assert same_contents(runs["ours"][1], runs["theirs"][1])
    assert same_contents(runs["nometa"][1], runs["theirs"][1])
    assert runs["nometa"][0].read_bytes() == before
    dump = theirs("cache_dump", str(runs["ours"][0])).stdout
    assert dump == theirs("cache_dump", str(runs["theirs"][0])).stdout
    assert b'dirty="true"' not in dump and b"<mapping " in dump
    assert theirs("cache_check", str(runs["ours"][0])).returncode == 0
    assert main(["cache", "check", "-q", str(runs["ours"][0])]) == 0

    import dmimage.cache.clear_dirty as cd
    from dmimage.ordered_write import pwrite_all

    def crash(fds: object, body: list[object], commit: object) -> None:
        for w in body:  # every new block lands, then the power fails
            pwrite_all(w.fd, w.bufs, w.offset)  # type: ignore[attr-defined]
        raise OSError("simulated crash before the superblock")

    monkeypatch.setattr(cd, "commit_last", crash)
    m, origin = runs["nometa"]
    with pytest.raises(OSError):
        main(["cache", "writeback", str(m), str(fast), str(origin)])
    assert m.read_bytes() != before  # the new blocks were written ...
    assert theirs("cache_dump", str(m)).stdout == theirs("cache_dump", str(meta)).stdout
    assert theirs("cache_check", str(m)).returncode == 0  # ... where the old ones are not


@pytest.mark.parametrize("n,fill,version", [
    (64, 0.5, 1), (5000, 0.5, 1), (5000, 0.9, 2), (140_000, 0.3, 1), (140_000, 0.3, 2),
    (140_000, 0.02, 2), (1000, 0.0, 2), (40_000, 1.0, 2)])
def test_restore_places_blocks_as_1_1(tmp_path: Path, n: int, fill: float, version: int) -> None:
    """`cache restore` writes cache_restore 1.1's metadata block for block: the same blocks
    in the same places with the same contents (the superblock's read-miss counter 9
    included), checksums and the unused tails of array blocks and btree nodes aside."""
    xml = restore_xml.cache_xml(random.Random(n + version), n, fill)
    theirs_meta = restore(tmp_path, xml, version, "theirs")
    ours_meta = tmp_path / "ours.meta"
    with open(ours_meta, "wb") as f:
        f.truncate(32 << 20)
    assert main(["cache", "restore", "-i", str(tmp_path / "theirs.xml"), "-o", str(ours_meta),
                 "--metadata-version", str(version)]) == 0
    differ = differing_blocks(theirs_meta.read_bytes(), ours_meta.read_bytes())
    assert not differ, f"blocks {differ[:10]} differ"


def _reseal(buf: bytearray, b: int, salt: int) -> None:
    from dmimage.format.checksum import seal

    seal(memoryview(buf)[b * 4096:(b + 1) * 4096], salt)


def _salts() -> dict[str, int]:
    from dmimage.format.checksum import BLOCK_TYPE_NAMES

    return {name: salt for salt, name in BLOCK_TYPE_NAMES.items()}


def _full(path: Path) -> object:
    """check_cache's report, or the error it raises (the superblock unusable)."""
    from dmimage.cache.check import check_cache
    from dmimage.errors import DmimageError

    try:
        return check_cache(str(path))
    except DmimageError as exc:
        return exc


def test_quick_check_takes_every_clean_pool(pools: list[Path], tmp_path: Path) -> None:
    """The clean path (cache/quick_check.py) proves cache_restore 1.1's and `cache restore`'s
    metadata clean (versions 1 and 2, multi-level array btrees, an empty mapping array) with
    the full checker's report, and `cache check` of a clean pool imports none of pdata's
    walker, array or space-map modules."""
    from dmimage.cache.quick_check import quick_check

    ours_made = []
    for i, meta in enumerate(pools):
        xml = ours("dump", str(meta)).stdout
        (tmp_path / f"{i}.xml").write_bytes(xml)
        out = tmp_path / f"{i}.meta"
        with open(out, "wb") as f:
            f.truncate(32 << 20)
        res = ours("restore", "-i", str(tmp_path / f"{i}.xml"), "-o", str(out),
                   "--metadata-version", str(CASES[i][0]))
        assert res.returncode == 0, res.stderr
        ours_made.append(out)
    for meta in [*pools, *ours_made]:
        rep = quick_check(str(meta))
        assert rep is not None, meta
        assert rep == _full(meta) and rep.ok
    code = ("import sys; from dmimage.cli.main import main; "
            f"rc = main(['cache', 'check', '-q', {str(pools[3])!r}]); "
            "print(rc, *sorted(m for m in sys.modules if m.startswith('dmimage.pdata')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0", "dmimage.pdata", "dmimage.pdata.block"]


def test_quick_check_never_passes_what_the_full_check_fails(pools: list[Path],
                                                            tmp_path: Path) -> None:
    """Damage that keeps every checksum right (each mutated block resealed with its own
    type's salt), random and aimed at the mapping rules: whenever the clean path gives a
    report, the full checker gives the same, clean one."""
    from dmimage.cache.metadata import parse_superblock
    from dmimage.cache.quick_check import quick_check
    from dmimage.format.cache import SALT_ARRAY_BLOCK
    from dmimage.format.checksum import sniff_block_type
    from dmimage.pdata.array import read_array
    from dmimage.pdata.block import BlockReader
    from dmimage.pdata.btree import BtreeWalker

    salts = _salts()
    rng = random.Random(11)
    taken = refused = 0
    for meta in pools[:6]:
        pristine = meta.read_bytes()
        nonzero = nonzero_blocks(pristine)
        used = nonzero.tolist()
        blocks = np.frombuffer(pristine, np.uint8).reshape(-1, 4096)
        with BlockReader(str(meta)) as r:
            sb = parse_superblock(r.block(0))
            w = BtreeWalker(r)
            mapping = read_array(w, sb.mapping_root, 8, "m")
            maps = mapping.values.reshape(-1).view("<u8").copy()
            array_blocks = mapping.blocks
        valid = np.flatnonzero(maps & 1)
        # each trial changes one block: (block number, its damaged bytes)
        trials: list[tuple[int, bytearray]] = []
        for _ in range(30):  # a random byte of a random used block, resealed
            b = rng.choice(used)
            blk = bytearray(blocks[b])
            kind = sniff_block_type(blocks[b])
            blk[rng.randrange(4, 4096)] ^= 1 << rng.randrange(8)
            if kind is not None:
                _reseal(blk, 0, salts[kind])
            trials.append((b, blk))
        per = (4096 - 24) // 8
        aimed = []
        if len(valid) >= 2:  # an origin block mapped twice
            i, j = rng.sample(valid.tolist(), 2)
            aimed.append((j, (int(maps[i]) >> 16 << 16) | (int(maps[j]) & 0xFFFF)))
        unmapped = np.flatnonzero((maps & 1) == 0)
        if len(unmapped):
            k = int(unmapped[0])
            aimed += [(k, 7 << 16), (k, 2), (k, 1 << 8)]  # names a block; dirty; flag bit 8
        if len(valid):
            aimed.append((int(valid[-1]), int(maps[valid[-1]]) | 4))  # unknown flag
        for idx, value in aimed:
            b = array_blocks[idx // per]
            blk = bytearray(blocks[b])
            off = 24 + (idx % per) * 8
            blk[off:off + 8] = value.to_bytes(8, "little")
            _reseal(blk, 0, SALT_ARRAY_BLOCK)
            trials.append((b, blk))
        # one working copy of the used blocks: each trial's block swapped in, then back
        work = bytearray(pristine[:(int(nonzero.max()) + 1) * 4096])
        for k, (b, blk) in enumerate(trials):
            dst = tmp_path / f"{meta.stem}-{k}"
            work[b * 4096:(b + 1) * 4096] = blk
            write_sparse(dst, work, np.union1d(nonzero, [b]), size=len(pristine))
            work[b * 4096:(b + 1) * 4096] = pristine[b * 4096:(b + 1) * 4096]
            rep = quick_check(str(dst))
            full = _full(dst)
            if rep is None:
                refused += 1
            else:
                taken += 1
                assert full == rep and rep.ok, (meta.name, k)
            if k >= 30:  # the aimed ones are all damage the full checker names
                assert not getattr(full, "ok", False), (meta.name, k, full)
            dst.unlink()
    assert taken and refused
