"""Kernel-written pools for the repair comparison (issue 14): the real dm-thin-pool writes
multi-level bottom trees, snapshots sharing subtrees, deletions and discards over many
transactions, so stale copies of nodes from earlier transactions stay on the metadata device
(what thin_repair 1.1's scan, and ours, must see through).

A pool is a :class:`Spec`; :func:`write_pool` runs it in a booted guest and returns the files,
the pool's last status line and, per data-writing step, what was written where. The writes
copy 4 KiB pieces of a host-made pattern disk (so the content of every mapped block is known
and read back in the guest), with ``skip_block_zeroing`` so the data file stays small.

Regenerate the committed fixtures (tests/fixtures/repair/, read by tests/test_repair*.py and
benchmarks/repair_quality.py) with::

    .venv/bin/python vmtests/repair_pools.py --out tests/fixtures/repair [--only NAME]

Each fixture is NAME.meta.xz (the metadata device after teardown), NAME.thin_dump-1.1.xml.xz
(thin_dump 1.1 of it: the truth the repairs are judged against) and NAME.json (the spec, the
kernel, the status line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import lzma
import os
import random
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dmimage.guest.dmstatus import PoolStatus, parse_pool_status
from dmimage.guest.machine import Disk, Machine

SECTOR = 512
BLOCK_SECTORS = 128  # 64 KiB data blocks
BLOCK_BYTES = BLOCK_SECTORS * SECTOR
PIECE = 4096  # bytes written per data block (skip_block_zeroing: the rest stays zero)
PATTERN_PIECES = 2048  # an 8 MiB pattern disk
#: The pattern's size when pieces were drawn at random: the draws are still made, so that
#: a spec makes the same pool (the committed fixtures) as then.
PATTERN_PIECES_BEFORE = 512


@dataclass(frozen=True)
class Spec:
    """One pool: how many thins, how big, how much snapshotting (all seeded)."""

    name: str
    kernel: str  # deb12 (6.1) | deb13 (6.12)
    seed: int
    thins: int  # devices at the end (origins + snapshots)
    snapshots: int  # of them, snapshots
    vblocks: int  # virtual size of each thin, in data blocks
    fill: float  # fraction of an origin's blocks written
    overwrite: float  # fraction of a snapshot's blocks rewritten (breaking sharing)
    batches: int  # commits per device's writes (each batch ends with an fsync)
    deletes: int = 0  # extra thins created, written and deleted (their trees go stale)
    discards: int = 0  # discards of a few blocks here and there
    meta_bytes: int = 4 << 20
    nr_data_blocks: int = 16384


#: The fixture pools: the issue's three shapes on both kernels' sides.
SPECS = [
    Spec("k61-8thins", "deb12", 61, thins=8, snapshots=0, vblocks=96, fill=0.45,
         overwrite=0.0, batches=4, deletes=1, discards=3),
    Spec("k612-11thins-snaps", "deb13", 1211, thins=11, snapshots=6, vblocks=1024, fill=0.55,
         overwrite=0.12, batches=6, deletes=1, discards=4),
    Spec("k612-16thins-snaps", "deb13", 1216, thins=16, snapshots=10, vblocks=2048,
         fill=0.55, overwrite=0.08, batches=8, deletes=2, discards=6, meta_bytes=8 << 20),
    Spec("k61-12thins-snaps", "deb12", 6112, thins=12, snapshots=7, vblocks=1024, fill=0.5,
         overwrite=0.1, batches=6, deletes=1, discards=4),
]


@dataclass
class Written:
    """The pool after teardown and what the guest read back from it before teardown."""

    meta: Path
    data: Path
    status: PoolStatus
    #: dev -> {vblock: sha256 of the block as the kernel served it}, for every block written
    #: (of its first PIECE bytes: the rest of every block is zero, see _Pool.block_hashes)
    block_hashes: dict[int, dict[int, str]]
    ops: list[str]


class _Pool:
    """The pool in the guest: only the commands the generator needs."""

    def __init__(self, vm: Machine, meta: Path, data: Path, pattern: Path | None,
                 nr_data: int, *, data_read_only: bool = False,
                 scratch: Path | None = None) -> None:
        """``pattern`` None: no writes (a pool only read, e.g. a repaired one). ``scratch``:
        a sparse host file for :meth:`block_hashes`, hot-plugged with the others (one
        hot-plug of all the disks costs ~0.3 QEMU CPU-s less than two)."""
        self.vm = vm
        self.nr_data = nr_data
        paths = [meta, data] + ([pattern] if pattern is not None else [])
        flags = [data_read_only, data_read_only] + ([True] if pattern is not None else [])
        if scratch is not None:
            paths.append(scratch)
            flags.append(False)
        self.disks: list[Disk] = vm.attach_many(paths, read_only=flags)
        self.scratch: Disk | None = self.disks[-1] if scratch is not None else None
        self.meta_dev, self.data_dev = self.disks[0].guest_path, self.disks[1].guest_path
        self.pat_dev = self.disks[2].guest_path if pattern is not None else ""
        self.active: set[int] = set()
        self.next_piece = 0  # the pattern piece the next block written gets
        self.ops: list[str] = []
        self.trans_id = 0
        #: Commands run for their effect: sent with the next :meth:`sh` (one round trip to
        #: the guest instead of one each; the kernel sees the same commands in order).
        self.queue: list[tuple[str, float]] = []
        feats = "2 skip_block_zeroing read_only" if data_read_only else "1 skip_block_zeroing"
        table = (f"0 {nr_data * BLOCK_SECTORS} thin-pool {self.meta_dev} {self.data_dev} "
                 f"{BLOCK_SECTORS} 0 {feats}")
        self.sh(f"dmsetup create rpool --table {shlex.quote(table)}")

    def sh(self, cmd: str, timeout: float = 600.0) -> str:
        """Run what :meth:`do` queued, then *cmd*, in one guest command."""
        from vmtests.scenario import run_after_queued

        queued, self.queue = self.queue, []
        return run_after_queued(self.vm, queued, cmd, timeout)

    def do(self, cmd: str, timeout: float = 600.0) -> None:
        self.queue.append((cmd, timeout))

    def message(self, text: str) -> None:
        """One pool message, after a set_transaction_id as LVM sends with each change."""
        self.ops.append(text)
        tid = f"set_transaction_id {self.trans_id} {self.trans_id + 1}"
        self.trans_id += 1
        self.do(f"dmsetup message rpool 0 {shlex.quote(tid)} && "
                f"dmsetup message rpool 0 {shlex.quote(text)}")

    def path(self, dev: int, vblocks: int) -> str:
        if dev not in self.active:
            table = f"0 {vblocks * BLOCK_SECTORS} thin /dev/mapper/rpool {dev}"
            self.do(f"dmsetup create rthin{dev} --table {shlex.quote(table)}")
            self.active.add(dev)
        return f"/dev/mapper/rthin{dev}"

    def activate(self, devs: list[int], vblocks: int) -> None:
        """:meth:`path` of each of *devs*, in one ``dmsetup create --concise`` for those not
        active yet (a dmsetup start costs ~20 ms of TCG CPU)."""
        new = [dev for dev in devs if dev not in self.active]
        if new:
            self.do("dmsetup create --concise " + shlex.quote(";".join(
                f"rthin{dev},,,rw,0 {vblocks * BLOCK_SECTORS} thin /dev/mapper/rpool {dev}"
                for dev in new)))
            self.active.update(new)

    def deactivate(self, dev: int) -> None:
        if dev in self.active:
            self.do(f"dmsetup remove rthin{dev}")
            self.active.discard(dev)

    def write(self, dev: int, vblocks: int, blocks: list[int], rng: random.Random) -> None:
        """One transaction: 4 KiB pattern pieces into *blocks*, O_DIRECT, then an fsync
        (a flush: the pool commits).

        The thin sees one 4 KiB O_DIRECT write per block, in ascending order, one at a time,
        as from one ``dd`` per block; but they come from a single ``dd`` from the pattern
        disk into a dm-linear device the guest's shell lays out (builtins only) over the
        blocks' first 4 KiB, end to end. The pieces are the pattern's next ones in turn, so
        the blocks of a pool hold distinct content (up to ``PATTERN_PIECES`` writes). Under
        TCG a process start costs ~10-25 ms of CPU, and a pool writes ~1,000 blocks."""
        path = self.path(dev, vblocks)
        self.ops.append(f"write {dev} {len(blocks)} blocks")
        for _ in blocks:  # the draws of the random pieces this used to write (same pools)
            rng.randrange(PATTERN_PIECES_BEFORE)
        if self.next_piece + len(blocks) > PATTERN_PIECES:
            self.next_piece = 0
        start, self.next_piece = self.next_piece, self.next_piece + len(blocks)
        ps = PIECE // SECTOR
        self.do(f"n=0; for b in {' '.join(map(str, blocks))}; do "
                f"echo \"$((n*{ps})) {ps} linear {path} $((b*{BLOCK_SECTORS}))\"; "
                f"n=$((n+1)); done >/tmp/rdst.table && "
                f"dmsetup create rdst </tmp/rdst.table && "
                f"dd if={self.pat_dev} of=/dev/mapper/rdst bs={PIECE} skip={start} count=$n "
                f"iflag=direct oflag=direct status=none && "
                f"dmsetup remove rdst && "
                f"dd if={path} of={path} bs={PIECE} count=1 conv=notrunc,fsync 2>/dev/null")

    def discard(self, dev: int, vblocks: int, start: int, count: int) -> None:
        path = self.path(dev, vblocks)
        self.ops.append(f"discard {dev} {start}+{count}")
        self.do(f"blkdiscard -o {start * BLOCK_BYTES} -l {count * BLOCK_BYTES} {path} && "
                f"dd if={path} of={path} bs={PIECE} count=1 conv=notrunc,fsync 2>/dev/null")

    def snapshot(self, dev: int, origin: int) -> None:
        self.deactivate(origin)  # an active origin must be suspended; inactive is simpler
        self.message(f"create_snap {dev} {origin}")

    def status(self) -> PoolStatus:
        return parse_pool_status(self.sh("dmsetup status rpool").strip())

    def block_hashes(self, blocks: dict[int, list[int]], vblocks: int
                     ) -> dict[int, dict[int, str]]:
        """sha256 of the first :data:`PIECE` bytes of the given blocks of each thin, as the
        kernel serves them: the content of the whole block, since nothing but such a piece is
        ever written into a block (:func:`assert_tails_zero` checks the data file).

        The guest reads the pieces of all the blocks through one dm-linear device that lays
        them end to end, copying them onto the scratch disk with one O_DIRECT ``dd``; the
        host hashes the copy. The device's table travels on the scratch disk (each byte over
        the serial line costs ~30 us of TCG CPU). Copying every thin whole instead (24 MiB
        each here) cost ~1.5 QEMU CPU-s per read-back; a ``dd | sha256sum`` per block two
        process starts, ~40-60 ms under TCG, i.e. a minute for a pool's ~1,300 blocks."""
        import hashlib

        assert self.scratch is not None, "_Pool(scratch=...) is needed for block hashes"
        wanted = [(dev, vb) for dev in sorted(blocks) for vb in blocks[dev]]
        self.activate(sorted(blocks), vblocks)
        ps = PIECE // SECTOR
        table = "".join(f"{i * ps} {ps} linear {self.path(dev, vblocks)} {vb * BLOCK_SECTORS}\n"
                        for i, (dev, vb) in enumerate(wanted)).encode()
        out_bytes = len(wanted) * PIECE
        toff = -(-out_bytes // (1 << 20)) * (1 << 20)
        host = self.scratch.host_path
        if host.stat().st_size < toff + len(table):
            raise ValueError(f"{host}: scratch file too small for {len(wanted)} blocks")
        with open(host, "r+b") as f:
            f.seek(toff)
            f.write(table)
        sc = self.scratch.guest_path
        if wanted:
            # --flushbufs: the guest's cache of the scratch disk (read at hot-plug) must not
            # hide the table the host just wrote.
            self.sh(f"blockdev --flushbufs {sc} && dd if={sc} bs=1048576 skip={toff} "
                    f"count={len(table)} iflag=skip_bytes,count_bytes status=none | "
                    f"dmsetup create rscan && "
                    f"dd if=/dev/mapper/rscan of={sc} bs=1048576 count={out_bytes} "
                    f"iflag=direct,count_bytes oflag=direct status=none && "
                    f"dmsetup remove rscan", timeout=1800)
        out: dict[int, dict[int, str]] = {dev: {} for dev in blocks}
        with open(host, "rb") as f:  # the guest's O_DIRECT writes are in the file
            for dev, vb in wanted:
                out[dev][vb] = hashlib.sha256(f.read(PIECE)).hexdigest()
        return out

    def teardown(self) -> None:
        self.sh("dmsetup remove " + " ".join([f"rthin{d}" for d in sorted(self.active)]
                                             + ["rpool"]))
        self.active.clear()
        self.vm.detach_many(list(reversed(self.disks)))


def read_back(vm: Machine, meta: Path, data: Path, spec: Spec, blocks: dict[int, list[int]]
              ) -> dict[int, dict[int, str]]:
    """Activate the pool (read-only, e.g. a repaired one) and hash the given blocks of each
    thin."""
    with _scratch_file(spec) as scratch:
        pool = _Pool(vm, meta, data, None, spec.nr_data_blocks, data_read_only=True,
                     scratch=scratch)
        try:
            return pool.block_hashes(blocks, spec.vblocks)
        finally:
            pool.teardown()


@contextlib.contextmanager
def _scratch_file(spec: Spec) -> Iterator[Path]:
    """A sparse scratch file for :meth:`_Pool.block_hashes` of every block of *spec*'s thins
    (the pieces, then the table at the next MiB), removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="readback-", suffix=".img")
    path = Path(name)
    try:
        n = spec.thins * spec.vblocks
        os.ftruncate(fd, (n * (PIECE + 64) >> 20) + 2 << 20)
        os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)


def assert_tails_zero(data: Path) -> None:
    """Every data block of *data* is zero past its first :data:`PIECE` bytes: the premise of
    comparing blocks by their pieces (:meth:`_Pool.block_hashes`). Reads only the file's
    data extents (it is sparse)."""
    import numpy as np

    with open(data, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            stop = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            start -= start % BLOCK_BYTES
            stop = min(end, -(-stop // BLOCK_BYTES) * BLOCK_BYTES)
            f.seek(start)
            blocks = np.frombuffer(f.read(stop - start), np.uint8).reshape(-1, BLOCK_BYTES)
            bad = np.flatnonzero(blocks[:, PIECE:].any(axis=1))
            assert not len(bad), (f"{data}: data blocks "
                                  f"{(bad[:5] + start // BLOCK_BYTES).tolist()} hold bytes "
                                  f"past their first {PIECE}")
            pos = stop


def write_pool(vm: Machine, spec: Spec, directory: Path, *, hashes: bool = False) -> Written:
    """Run *spec* in *vm*; the metadata and data files end up in *directory*."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    meta, data, pattern = (directory / f"{spec.name}.{x}" for x in ("meta", "data", "pattern"))
    for path, size in ((meta, spec.meta_bytes), (data, spec.nr_data_blocks * BLOCK_BYTES)):
        with open(path, "wb") as f:
            f.truncate(size)
    pattern.write_bytes(np.random.default_rng(spec.seed).integers(
        0, 256, PATTERN_PIECES * PIECE, dtype=np.uint8).tobytes())
    rng = random.Random(spec.seed)
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(_scratch_file(spec)) if hashes else None
        return _write_pool(vm, spec, meta, data, pattern, rng, scratch)


def _write_pool(vm: Machine, spec: Spec, meta: Path, data: Path, pattern: Path,
                rng: random.Random, scratch: Path | None) -> Written:
    pool = _Pool(vm, meta, data, pattern, spec.nr_data_blocks, scratch=scratch)
    try:
        devs: dict[int, int] = {}  # live dev -> vblocks
        mapped: dict[int, set[int]] = {}  # dev -> virtual blocks written (the kernel maps them)
        next_id = 1

        def fill(dev: int, fraction: float) -> None:
            chosen = rng.sample(range(spec.vblocks), max(1, int(spec.vblocks * fraction)))
            mapped.setdefault(dev, set()).update(chosen)
            size = max(1, len(chosen) // spec.batches)
            for i in range(0, len(chosen), size):
                pool.write(dev, spec.vblocks, sorted(chosen[i:i + size]), rng)

        origins = spec.thins - spec.snapshots
        for _ in range(origins):
            pool.message(f"create_thin {next_id}")
            devs[next_id] = spec.vblocks
            fill(next_id, spec.fill * rng.uniform(0.6, 1.0))
            next_id += 1
        for _ in range(spec.deletes):  # a thin that lives for a few transactions
            dev = next_id
            next_id += 1
            pool.message(f"create_thin {dev}")
            fill(dev, spec.fill / 2)
            pool.deactivate(dev)
            pool.message(f"delete {dev}")
        for _ in range(spec.snapshots):
            origin = rng.choice(sorted(devs))
            dev = next_id
            next_id += 1
            pool.snapshot(dev, origin)
            devs[dev] = spec.vblocks
            mapped[dev] = set(mapped.get(origin, ()))
            if spec.overwrite:
                fill(dev, spec.overwrite)
            if rng.random() < 0.5:  # the origin moves on too
                fill(origin, spec.overwrite / 2 or 0.02)
        for _ in range(spec.discards):
            dev = rng.choice(sorted(devs))
            start = rng.randrange(spec.vblocks - 4)
            count = rng.randint(1, 4)
            pool.discard(dev, spec.vblocks, start, count)
            mapped.get(dev, set()).difference_update(range(start, start + count))
        got = pool.block_hashes({d: sorted(mapped.get(d, ())) for d in devs}, spec.vblocks) \
            if scratch is not None else {}
        status = pool.status()
        ops = pool.ops
    finally:
        try:
            pool.teardown()
        except Exception:  # noqa: BLE001 - best effort; the harness clears leftovers
            pass
    pattern.unlink()
    if scratch is not None:
        assert_tails_zero(data)
    return Written(meta, data, status, got, ops)


def save_fixture(out: Path, spec: Spec, w: Written, kernel: str) -> None:
    """NAME.meta.xz, NAME.thin_dump-1.1.xml, NAME.json (see the module docstring)."""
    import oracles

    tools = oracles.tools_11()
    rc, _, err = oracles.check(w.meta, tools)
    if rc != 0:
        raise RuntimeError(f"{spec.name}: thin_check 1.1 fails the kernel's pool: {err}")
    out.mkdir(parents=True, exist_ok=True)
    with open(w.meta, "rb") as f, lzma.open(out / f"{spec.name}.meta.xz", "wb", preset=9) as g:
        shutil.copyfileobj(f, g)
    with lzma.open(out / f"{spec.name}.thin_dump-1.1.xml.xz", "wt", preset=9) as x:
        x.write(oracles.dump(w.meta, tools))
    facts: dict[str, Any] = {
        "spec": asdict(spec), "kernel": kernel, "ops": w.ops,
        "status": {"transaction_id": w.status.transaction_id,
                   "used_metadata_blocks": w.status.used_metadata_blocks,
                   "used_data_blocks": w.status.used_data_blocks}}
    (out / f"{spec.name}.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    from dmimage.guest.kernels import kernel_by_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", action="append", help="only these spec names")
    args = ap.parse_args(argv)
    specs = [s for s in SPECS if not args.only or s.name in args.only]
    for kname in sorted({s.kernel for s in specs}):
        kernel = kernel_by_name(kname)
        with Machine(kernel, memory_mb=512).start() as vm, \
                tempfile.TemporaryDirectory() as tmp:
            for spec in (s for s in specs if s.kernel == kname):
                w = write_pool(vm, spec, Path(tmp))
                save_fixture(args.out, spec, w, str(kernel))
                size = (args.out / f"{spec.name}.meta.xz").stat().st_size
                print(f"{spec.name}: {len(w.ops)} ops, transaction {w.status.transaction_id}, "
                      f"{size} bytes compressed", flush=True)
                w.meta.unlink()
                w.data.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
