"""dm-era: the kernel writes the metadata through eras and checkpoints; dmimage reads it exactly
(era_dump 1.1's bytes, plain and --logical) and `era invalidate --written-since E` lists
exactly the blocks the test wrote in eras >= E; `era repair` of that metadata, as it is and
damaged, keeps every one of them listed; the kernel activates what `era repair` wrote from
damaged metadata, serves the origin through it and carries its history on.

Oracles: the test's own record of which blocks it wrote in which era, the guest's `dmsetup
status` (current era), and era_dump / era_invalidate / era_check 1.1 on the same metadata."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dmimage.guest.machine import Machine
from vmtests.kept_disks import KeptDisks, kept_disks, parametrize_kernel

import oracles
from cli_run import run_cli

pytestmark = pytest.mark.vm

BLOCK = 128  # sectors: 64 KiB era blocks
NR_BLOCKS = 256

#: Each kernel's guest keeps the metadata and origin disks for the whole module
#: (vmtests/kept_disks.py: a hot-plug and unplug costs ~0.5-1 QEMU CPU-s); each test zeroes
#: them first.
kept_sets, kept = kept_disks([4 << 20, NR_BLOCKS * BLOCK * 512])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_kernel(metafunc)


def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    if argv[:3] == (sys.executable, "-m", "dmimage"):
        return run_cli(*argv[3:])  # ours in this process (no Python start-up)
    return subprocess.run(list(argv), capture_output=True, timeout=300)


def _blocks(xml: bytes) -> set[int]:
    out: set[int] = set()
    for m in re.finditer(rb'<block block="(\d+)"/>|<range begin="(\d+)" end="(\d+)"/>', xml):
        if m.group(1) is not None:
            out.add(int(m.group(1)))
        else:
            out.update(range(int(m.group(2)), int(m.group(3))))
    return out


def test_kernel_era_metadata(kept: KeptDisks) -> None:
    tools = oracles.tools_11()
    meta, origin = kept.files
    kept.zero()
    rng = random.Random(2026)
    rounds = [set(rng.sample(range(NR_BLOCKS), rng.randrange(5, 40))) for _ in range(4)]
    vm = kept.vm
    m, o = kept.paths
    t = f"0 {NR_BLOCKS * BLOCK} era {m} {o} {BLOCK}"
    try:
        eras = _era_rounds(vm, f"{kept.flush}dmsetup create kera --table {shlex.quote(t)}",
                           rounds, "urandom")
    finally:
        _remove(vm, "kera")
    written: dict[int, set[int]] = {}
    for era, blocks in zip(eras, rounds, strict=False):
        written.setdefault(era, set()).update(blocks)
    final_era = eras[-1]

    assert _run(str(tools.bindir / "era_check"), str(meta)).returncode == 0
    res = _run(sys.executable, "-m", "dmimage", "era", "check", str(meta))
    assert res.returncode == 0, res.stdout + res.stderr
    for extra in ([], ["--logical"]):
        theirs = _run(str(tools.bindir / "era_dump"), *extra, str(meta))
        ours = _run(sys.executable, "-m", "dmimage", "era", "dump", *extra, str(meta))
        assert theirs.returncode == 0 and ours.stdout == theirs.stdout
    assert f'current_era="{final_era}"'.encode() in ours.stdout
    for since in sorted(written):
        want = set().union(*(b for e, b in written.items() if e >= since))
        ours = _run(sys.executable, "-m", "dmimage", "era", "invalidate", "--written-since",
                    str(since), str(meta))
        theirs = _run(str(tools.bindir / "era_invalidate"), "--written-since", str(since),
                      str(meta))
        assert ours.returncode == 0 and ours.stdout == theirs.stdout
        assert _blocks(ours.stdout) == want, since


def _era_xml(restored: dict[int, set[int]], current_era: int) -> str:
    """era_restore input: a writeset per era of ``restored``, an era array naming era 1 for
    every third block and 0 for the rest."""
    lines = [f'<superblock uuid="" block_size="{BLOCK}" nr_blocks="{NR_BLOCKS}" '
             f'current_era="{current_era}">']
    for era, blocks in restored.items():
        lines.append(f'  <writeset era="{era}" nr_bits="{NR_BLOCKS}">')
        lines += [f'    <bit block="{b}" value="{"true" if b in blocks else "false"}"/>'
                  for b in range(NR_BLOCKS)]
        lines.append("  </writeset>")
    lines += ["  <era_array>"] + [f'    <era block="{b}" era="{1 if b % 3 == 0 else 0}"/>'
                                  for b in range(NR_BLOCKS)] + ["  </era_array>", "</superblock>"]
    return "\n".join(lines)


def _remove(vm: Machine, name: str) -> None:
    """Remove dm device *name* and check the kernel log: one guest command."""
    out = vm.sh(f"set -e; dmsetup remove {name}; echo @@dmesg@@; {vm.dmesg_since_command()}")
    vm.check_dmesg(log=out.partition("@@dmesg@@\n")[2])


def _era_rounds(vm: Machine, first: str, rounds: list[set[int]], source: str) -> list[int]:
    """One guest command (a round trip each cost ~0.05 QEMU CPU-s): *first*, then per round
    of blocks the era target kera is in, a write of each block (64 KiB from /dev/*source*,
    one dd each, synced) and a checkpoint; then its era once more. Returns the eras."""
    script = [f"set -e; {first}"]
    status = "set -- $(dmsetup status kera); echo \"@era $6\""
    for blocks in rounds:
        script.append(status)
        script += [f"dd if=/dev/{source} of=/dev/mapper/kera bs=64k seek={b} count=1 "
                   "conv=fsync status=none" for b in sorted(blocks)]
        script.append("dmsetup message kera 0 checkpoint")
    script.append(status)
    out = vm.sh("\n".join(script), timeout=300)
    eras = [int(line.split()[1]) for line in out.splitlines() if line.startswith("@era ")]
    assert len(eras) == len(rounds) + 1, out
    return eras


def _activate_and_write(kept: KeptDisks, rng: random.Random,
                        written: dict[int, set[int]]) -> tuple[int, str]:
    """Activate an era target on the kept metadata disk, hash what it serves, then write 15
    random blocks and checkpoint, twice; ``written`` gains each era's blocks. Returns the
    first era and the hash."""
    rounds = [set(rng.sample(range(NR_BLOCKS), 15)) for _ in range(2)]
    vm = kept.vm
    m, o = kept.paths
    t = f"0 {NR_BLOCKS * BLOCK} era {m} {o} {BLOCK}"
    try:
        first = int(vm.sh(f"{kept.flush}dmsetup create kera --table {shlex.quote(t)} && "
                          "dmsetup status kera").split()[5])
        served = vm.sha256_of("/dev/mapper/kera")
        eras = _era_rounds(vm, "true", rounds, "zero")
    finally:
        _remove(vm, "kera")
    for era, blocks in zip(eras, rounds, strict=False):
        written.setdefault(era, set()).update(blocks)
    return first, served


def test_kernel_takes_restored_era(kept: KeptDisks, tmp_path: Path) -> None:
    """`era restore` metadata with archived writesets and an era array: the kernel activates
    it at the restored era and carries on through checkpoints; afterwards era_dump 1.1 and
    dmimage agree, and invalidate lists the restored writesets' blocks plus the new writes."""
    tools = oracles.tools_11()
    rng = random.Random(77)
    restored = {era: set(rng.sample(range(NR_BLOCKS), 20)) for era in (2, 3, 4)}
    xml = tmp_path / "in.xml"
    meta, origin = kept.files
    xml.write_text(_era_xml(restored, 4))
    kept.zero()
    res = _run(sys.executable, "-m", "dmimage", "era", "restore", "-i", str(xml), "-o",
               str(meta))
    assert res.returncode == 0, res.stderr
    written = {e: set(b) for e, b in restored.items()}
    first, served = _activate_and_write(kept, rng, written)
    assert first >= 4
    assert served == hashlib.sha256(bytes(NR_BLOCKS * BLOCK * 512)).hexdigest()
    assert _run(str(tools.bindir / "era_check"), str(meta)).returncode == 0
    theirs = _run(str(tools.bindir / "era_dump"), str(meta))
    ours = _run(sys.executable, "-m", "dmimage", "era", "dump", str(meta))
    assert theirs.returncode == 0 and ours.stdout == theirs.stdout
    for since in (2, 3, 4, first):
        want = set().union(*(b for e, b in written.items() if e >= since))
        out = _run(sys.executable, "-m", "dmimage", "era", "invalidate", "--written-since",
                   str(since), str(meta))
        assert _blocks(out.stdout) == want, since
        # The kernel folded every writeset into the era array: 1.1 then lists nothing.
        archived = json.loads(_run(sys.executable, "-m", "dmimage", "era", "check", "--json",
                                   str(meta)).stdout)["archived_eras"]
        theirs11 = _run(str(tools.bindir / "era_invalidate"), "--written-since", str(since),
                        str(meta)).stdout
        assert theirs11 == (out.stdout if archived else b"<blocks>\n</blocks>")
    _repairs_keep_the_history(tmp_path, meta, written)


def _repairs_keep_the_history(tmp_path: Path, meta: Path, written: dict[int, set[int]]) -> None:
    """`era repair` of the kernel's metadata, as it is and damaged (a bad superblock
    checksum, the bitset block of an archived era zeroed): era_check 1.1 passes the result,
    and `era invalidate --written-since E` still lists every block the test wrote in eras
    >= E: exactly those where nothing was lost, all blocks (every bit set) where the damaged
    writeset counts."""
    from dmimage.era.metadata import parse_superblock, read_writeset_tree
    from dmimage.pdata.array import read_array
    from dmimage.pdata.block import BlockReader
    from dmimage.pdata.btree import BtreeWalker

    tools = oracles.tools_11()
    with BlockReader(str(meta)) as r:
        sb = parse_superblock(r.block(0))
        w = BtreeWalker(r)
        tree = read_writeset_tree(w, sb.writeset_tree_root)
        # When the kernel has folded every writeset into the era array (it may by the
        # time the pool is torn down), no archived era is left to damage: the checksum only.
        hit = sorted(tree)[len(tree) // 2] if tree else None
        hit_block = (read_array(w, tree[hit][1], 8, "writeset").blocks[0]
                     if hit is not None else None)
    buf = bytearray(meta.read_bytes())
    buf[0] ^= 1  # the stored checksum only: every field still says what it said
    if hit_block is not None:
        buf[hit_block * 4096:(hit_block + 1) * 4096] = bytes(4096)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(buf))
    for src, damaged in ((meta, None), (bad, hit)):
        out = tmp_path / "repaired"
        with open(out, "wb") as f:
            f.truncate(4 << 20)
        res = _run(sys.executable, "-m", "dmimage", "era", "repair", "-i", str(src), "-o",
                   str(out))
        assert res.returncode == 0, res.stdout + res.stderr
        assert _run(str(tools.bindir / "era_check"), str(out)).returncode == 0
        for since in sorted(written):
            want = set().union(*(b for e, b in written.items() if e >= since))
            got = _blocks(_run(sys.executable, "-m", "dmimage", "era", "invalidate",
                               "--written-since", str(since), str(out)).stdout)
            if damaged is not None and since <= damaged:
                assert got == set(range(NR_BLOCKS)), (since, damaged)
            else:
                assert got == want, (src.name, since)


def test_kernel_takes_repaired_era(kept: KeptDisks, tmp_path: Path) -> None:
    """`era restore` metadata (archived writesets of eras 2-4, an era array), damaged: a bad
    superblock checksum and era 3's writeset bitset zeroed. `era repair` writes fresh
    metadata from it (era 3 every bit set, the rest as restored); the kernel activates that
    at the repaired era or later, serves the origin's bytes through it, and carries on
    through checkpoints. Afterwards both checkers pass the kernel's metadata, era_dump 1.1
    and dmimage agree, and `era invalidate --written-since E` lists the surviving history
    plus the kernel's new writes (every block for E <= 3, the damaged era)."""
    from dmimage.era.metadata import parse_superblock, read_writeset_tree
    from dmimage.pdata.array import read_array
    from dmimage.pdata.block import BlockReader
    from dmimage.pdata.btree import BtreeWalker

    tools = oracles.tools_11()
    rng = random.Random(78)
    restored = {era: set(rng.sample(range(NR_BLOCKS), 20)) for era in (2, 3, 4)}
    xml, pristine = tmp_path / "in.xml", tmp_path / "pristine"
    meta, origin = kept.files
    xml.write_text(_era_xml(restored, 4))
    kept.zero()
    with open(pristine, "wb") as f:
        f.truncate(4 << 20)
    origin_bytes = rng.randbytes(NR_BLOCKS * BLOCK * 512)
    origin.write_bytes(origin_bytes)
    res = _run(sys.executable, "-m", "dmimage", "era", "restore", "-i", str(xml), "-o",
               str(pristine))
    assert res.returncode == 0, res.stderr
    with BlockReader(str(pristine)) as r:
        sb = parse_superblock(r.block(0))
        w = BtreeWalker(r)
        era3 = read_array(w, read_writeset_tree(w, sb.writeset_tree_root)[3][1], 8,
                          "writeset").blocks[0]
    buf = bytearray(pristine.read_bytes())
    buf[0] ^= 1  # the stored superblock checksum
    buf[era3 * 4096:(era3 + 1) * 4096] = bytes(4096)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(buf))
    assert _run(str(tools.bindir / "era_check"), str(bad)).returncode != 0
    res = _run(sys.executable, "-m", "dmimage", "era", "repair", "-i", str(bad), "-o",
               str(meta))
    assert res.returncode == 0, res.stdout + res.stderr
    assert _run(str(tools.bindir / "era_check"), str(meta)).returncode == 0
    written = {e: set(b) for e, b in restored.items()}
    written[3] = set(range(NR_BLOCKS))  # what the repair must claim of the lost writeset
    first, served = _activate_and_write(kept, rng, written)
    assert first >= 4
    assert served == hashlib.sha256(origin_bytes).hexdigest()
    assert _run(str(tools.bindir / "era_check"), str(meta)).returncode == 0
    res = _run(sys.executable, "-m", "dmimage", "era", "check", str(meta))
    assert res.returncode == 0, res.stdout + res.stderr
    theirs = _run(str(tools.bindir / "era_dump"), str(meta))
    ours = _run(sys.executable, "-m", "dmimage", "era", "dump", str(meta))
    assert theirs.returncode == 0 and ours.stdout == theirs.stdout
    for since in sorted({2, 3, 4, 5, first, *written}):
        want = set().union(*(b for e, b in written.items() if e >= since))
        out = _run(sys.executable, "-m", "dmimage", "era", "invalidate", "--written-since",
                   str(since), str(meta))
        assert out.returncode == 0 and _blocks(out.stdout) == want, since
