"""Crash safety of every metadata writer, on a disk model that can reorder and lose writes.

Each step of a sequence runs one writer (a WritablePool transaction, restore, format, unpack,
check's in-place fixes) under :class:`crashsim.Recorder`, which records every block write and
flush it issues. Every crash image the model allows (tests/crashsim.py: the state at the last
flush plus any subset of the writes since, per block any one write or none) must

* open and pass ``dmimage check`` and thin_check 1.1, and
* hold exactly the pool before the step or the pool after it (superblock fields, held
  metadata snapshot, every device's details and mappings), never a mix.

The pools before and after each step are read by thin_dump 1.1 as well and must agree with
dmimage's reading, so "old" and "new" are not only our own word. Writers that replace a pool
(restore, format, unpack) may also leave block 0 zeroed: no pool at all, which both checkers
refuse; a mixture of the two pools is never allowed.

Two mutations of the writers' I/O (a dropped flush before the superblock write, the
superblock written before the other blocks) must be caught with a concrete crash image.

The random part is seeded: ``DMIMAGE_CRASH_SEED`` replays a run (the seed is printed).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmimage import open_pool
from dmimage.errors import DmimageError
from dmimage.thin.check import check_metadata
from dmimage.thin.dump import parse_dump
from dmimage.thin.fix import fix_in_place
from dmimage.thin.format_pool import format_pool
from dmimage.thin.pack import pack_metadata, unpack_metadata
from dmimage.thin.pool import Mappings
from dmimage.thin.repair import repair
from dmimage.thin.restore import restore
from dmimage.thin.transaction import WritablePool, open_writable

import crashsim
import damage
import oracles
import poolgen
import semantic

SEED = int(os.environ.get("DMIMAGE_CRASH_SEED", "90210"))
BS = 128 * 512
#: thin_check 1.1 takes 0.5 s of wall time and almost no CPU: run this many at once
ORACLE_BATCH = 64

State = tuple[Any, ...]


# ----------------------------------------------------------------------------- pool states


def _mapping_digest(m: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(m, dtype=np.uint64).tobytes()).hexdigest()


def _rows(m: Mappings) -> np.ndarray:
    return np.stack([m.origin, m.data, m.time.astype(np.uint64)], axis=1)


def _canon(time: int, trans: int, dbs: int, nr_data: int, flags: int, snap: int | None,
           devices: list[tuple[int, int, int, int, int, str]]) -> State:
    return (time, trans, dbs, nr_data, flags, snap, tuple(devices))


def state_of(path: Path) -> tuple[State, State | None, str]:
    """dmimage's reading of the pool: (live state, held snapshot's devices or None, digest of
    both space maps' counts: a repaired leak changes nothing else).

    Raises DmimageError when the metadata does not open."""
    with open_pool(path) as pool:
        counts = hashlib.sha1(pool.metadata_space_map().counts.tobytes())
        counts.update(pool.data_space_map().counts.tobytes())
        sb, live = pool.superblock, pool.live_superblock
        devs = []
        for dev_id, d in pool.devices().items():
            devs.append((dev_id, d.mapped_blocks, d.transaction_id, d.creation_time,
                         d.snapshotted_time, _mapping_digest(_rows(pool.mappings(dev_id)))))
        st = _canon(sb.time, sb.trans_id, sb.data_block_size, live.data_sm.nr_blocks, sb.flags,
                    sb.held_root or None, devs)
    held = None
    if st[5] is not None:
        with open_pool(path, metadata_snap=True) as snap:
            held = tuple(
                (dev_id, d.mapped_blocks, d.transaction_id, d.creation_time,
                 d.snapshotted_time, _mapping_digest(_rows(snap.mappings(dev_id))))
                for dev_id, d in snap.devices().items())
    return st, held, counts.hexdigest()


def state_by_thin_dump(path: Path, tools11: oracles.Tools,
                       held_root: int | None) -> tuple[State, State | None]:
    """thin_dump 1.1's reading of the same (the independent anchor for old and new). Its XML
    does not name the held snapshot's block: ``held_root`` (from the superblock) is used for
    that field, and the snapshot itself is dumped with ``-m``."""
    p = semantic.parse_xml(oracles.dump(path, tools11))
    devs = [(d.dev_id, d.mapped_blocks, d.transaction, d.creation_time, d.snap_time,
             _mapping_digest(d.mappings)) for d in p.devices]
    st = _canon(p.time, p.transaction, p.data_block_size, p.nr_data_blocks, p.flags,
                held_root, devs)
    held = None
    if held_root is not None:
        h = semantic.parse_xml(oracles.dump(path, tools11, f"--metadata-snap={held_root}"))
        held = tuple((d.dev_id, d.mapped_blocks, d.transaction, d.creation_time, d.snap_time,
                      _mapping_digest(d.mappings)) for d in h.devices)
    return st, held


@dataclass
class Committed:
    """A pool as it stands between two steps: its state and both checkers' verdicts."""

    state: tuple[State, State | None, str]
    problems: tuple[str, ...]
    thin_check_rc: int


def committed(path: Path, tools11: oracles.Tools) -> Committed:
    st = state_of(path)
    assert st[:2] == state_by_thin_dump(path, tools11, st[0][5]), \
        "dmimage and thin_dump 1.1 disagree"
    problems = tuple(str(p) for p in check_metadata(path).problems)
    return Committed(st, problems, oracles.check(path, tools11, "-q")[0])


# ----------------------------------------------------------------------------- the judge


@dataclass
class Verdict:
    step: str
    epochs: list[int]  # writes per epoch of the metadata file
    exhaustive: set[int] = field(default_factory=set)  # epochs enumerated completely
    images: int = 0  # crash images built
    distinct: int = 0  # distinct images judged in-process
    oracle: int = 0  # of which thin_check 1.1 judged
    seen: dict[str, int] = field(default_factory=lambda: {"old": 0, "new": 0, "blank": 0})
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        full = "all" if len(self.exhaustive) == len(self.epochs) else \
            f"{sorted(e + 1 for e in self.exhaustive)}"
        return (f"{self.step}: writes per epoch {self.epochs} (enumerated completely: {full}), "
                f"{self.images} crash images, "
                f"{self.distinct} distinct ({self.oracle} through thin_check 1.1), "
                f"{self.seen}, {len(self.failures)} failures")


def _write_image(path: Path, img: bytearray) -> None:
    """Write a crash image sparsely (they are mostly zeros)."""
    a = np.frombuffer(img, np.uint8).reshape(-1, crashsim.BLOCK)
    used = np.flatnonzero(a.any(axis=1))
    with open(path, "wb") as f:
        for b in used.tolist():
            f.seek(b * crashsim.BLOCK)
            f.write(a[b].tobytes())
        f.truncate(len(img))


def _thin_check_batch(paths: list[Path], tools11: oracles.Tools) -> list[int]:
    env = oracles.tool_env(tools11)
    procs = [subprocess.Popen([str(tools11.thin_check), "-q", str(p)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
             for p in paths]
    return [p.wait(timeout=300) for p in procs]


def judge(step: str, rec: crashsim.Recording, meta: Path, old: Committed | None,
          new: Committed, tmp: Path, tools11: oracles.Tools, rng: random.Random, *,
          blank_ok: bool = False) -> Verdict:
    """Build every crash image of ``meta`` the model allows and judge each."""
    file = os.path.realpath(meta)
    assert rec.replay_matches(file), f"{step}: a write escaped the recorder"
    eps = crashsim.epochs(rec, file)
    v = Verdict(step, [len(e) for e in eps])
    assert new.problems == () and new.thin_check_rc == 0, (step, new.problems)
    done: set[bytes] = set()
    batch: list[tuple[Path, str, int | None]] = []  # image, description, expected rc

    def flush_batch() -> None:
        rcs = _thin_check_batch([p for p, _, _ in batch], tools11)
        for (p, what, want), rc in zip(batch, rcs, strict=True):
            if want is None and rc == 0:
                v.failures.append(f"{what}: thin_check 1.1 accepts block 0 full of zeros")
            elif want is not None and rc != want:
                v.failures.append(f"{what}: thin_check 1.1 exit {rc}, expected {want}")
            p.unlink()
        batch.clear()

    # an image is the contents before the writer with some of its writes applied: it is
    # known by its length and the blocks those writes touch (hashing the whole image, mostly
    # blocks no write touched, was most of the judge's own time)
    touched = sorted({w.block for ep in eps for w in ep})

    def key(img: bytearray) -> bytes:
        h = hashlib.sha1(len(img).to_bytes(8, "little"))
        view = memoryview(img)
        for b in touched:
            h.update(view[b * crashsim.BLOCK:(b + 1) * crashsim.BLOCK])
        return h.digest()

    for choice in crashsim.crash_choices(eps, rng):
        img = crashsim.apply_choice(rec.before[file], eps, choice)
        v.images += 1
        if choice.why == "exhaustive":
            v.exhaustive.add(choice.epoch)
        h = key(img)
        if h in done:
            continue
        done.add(h)
        v.distinct += 1
        what = f"{step}: {crashsim.describe_choice(eps, choice)}"
        path = tmp / f"crash{v.distinct}.meta"
        _write_image(path, img)
        verdict = _judge_in_process(path, img, what, old, new, v, blank_ok)
        if verdict is not None:
            v.oracle += 1
        else:
            path.unlink()
            continue
        batch.append((path, what, verdict[0]))
        if len(batch) >= ORACLE_BATCH:
            flush_batch()
    if batch:
        flush_batch()
    return v


def _judge_in_process(path: Path, img: bytearray, what: str, old: Committed | None,
                      new: Committed, v: Verdict,
                      blank_ok: bool) -> tuple[int | None] | None:
    """dmimage's verdict on one image: (thin_check 1.1's expected exit code, None: must fail),
    or None when thin_check need not see it (already failed, or another blank image)."""
    if blank_ok and not any(img[:crashsim.BLOCK]):
        v.seen["blank"] += 1
        if check_metadata(path).ok():
            v.failures.append(f"{what}: dmimage check accepts block 0 full of zeros")
        # thin_check reads no further than block 0 here: once per step is enough
        return (None,) if v.seen["blank"] == 1 else None
    try:
        st = state_of(path)
    except DmimageError as exc:
        v.failures.append(f"{what}: does not open: {exc}")
        return None
    problems = tuple(str(p) for p in check_metadata(path).problems)
    for name, c in (("new", new), ("old", old)):
        if c is not None and st == c.state:
            if problems != c.problems:
                v.failures.append(f"{what}: the {name} pool, but dmimage check finds "
                                  f"{list(problems)[:3]} (the {name} pool has "
                                  f"{list(c.problems)[:3]})")
                return None
            v.seen[name] += 1
            return (c.thin_check_rc,)
    v.failures.append(f"{what}: neither the old nor the new pool "
                      f"(dmimage check: {list(problems)[:3] or 'clean'})")
    return None


# ----------------------------------------------------------------------------- sequences


Step = tuple[str, Callable[[Path, Path], None], bool]  # name, writer(meta, data), blank_ok


def tx(*ops: Callable[[WritablePool], object]) -> Callable[[Path, Path], None]:
    """A WritablePool transaction: the operations, then the commit."""

    def run(meta: Path, data: Path) -> None:
        with open_writable(meta, data) as pool:
            for op in ops:
                op(pool)
            assert pool.commit()

    return run


def _restored(desc: poolgen.Pool, tmp: Path, tools11: oracles.Tools, name: str,
              nr_meta: int | None = None) -> tuple[Path, Path]:
    meta, data = tmp / f"{name}.meta", tmp / f"{name}.data"
    if nr_meta is None:
        nr_meta = oracles.nr_meta_blocks_for(desc.nr_mappings, len(desc.devices),
                                             desc.nr_data_blocks)
    oracles.restore(poolgen.to_xml(desc), meta, tools11, nr_meta)
    with open(data, "wb") as f:
        f.truncate(desc.nr_data_blocks * BS)
    return meta, data


def _payload(tag: int, n: int) -> bytes:
    return bytes([tag]) * n


def seq_small(tmp: Path, tools11: oracles.Tools) -> tuple[Path, Path, list[Step]]:
    """A small pool from empty: thin, snapshot sharing its root, overwrite, delete."""
    meta, data = _restored(poolgen.empty_pool(64), tmp, tools11, "small", 64)
    return meta, data, [
        ("create+write", tx(lambda p: p.create_thin(1),
                            lambda p: p.write(1, 0, _payload(1, 3 * BS + 17))), False),
        ("snap+overwrite", tx(lambda p: p.create_snap(2, 1),
                              lambda p: p.write(1, BS, _payload(2, BS))), False),
        ("delete origin", tx(lambda p: p.delete(1)), False),
    ]


def seq_thins(tmp: Path, tools11: oracles.Tools) -> tuple[Path, Path, list[Step]]:
    """Three thins with 2-level trees: create, write, snapshot, discard, delete, set id."""
    meta, data = _restored(poolgen.thins_pool(3, mappings_per_thin=300), tmp, tools11, "thins")
    return meta, data, [
        ("mixed", tx(lambda p: p.create_thin(7),
                     lambda p: p.write(7, 0, _payload(3, 3 * BS + 100)),
                     lambda p: p.create_snap(8, 1),
                     lambda p: p.write(8, 5 * BS, _payload(4, BS)),
                     lambda p: p.discard(1, 0, 2 * BS),
                     lambda p: p.delete(2),
                     lambda p: p.set_transaction_id(p.trans_id, p.trans_id + 1)), False),
    ]


def seq_multilevel(tmp: Path, tools11: oracles.Tools) -> tuple[Path, Path, list[Step]]:
    """One thin with a 3-level mapping tree (70,000 mappings); a snapshot shares all of it,
    then writes break sharing down three levels and a discard spans leaves."""
    desc = poolgen.multilevel_pool(70000)
    meta, data = _restored(desc, tmp, tools11, "multilevel")
    origins = desc.devices[0].mappings[:, 0]
    rng = np.random.default_rng(SEED)
    mapped = [int(x) for x in rng.choice(origins, 6, replace=False)]
    unmapped = [int(x) for x in rng.choice(np.setdiff1d(np.arange(int(origins[-1])), origins),
                                           6, replace=False)]

    def writes(p: WritablePool) -> None:
        for i, vb in enumerate(mapped + unmapped):
            p.write(1, vb * BS, _payload(10 + i, 512))

    lo = int(origins[len(origins) // 2])
    return meta, data, [
        ("snapshot+cow", tx(lambda p: p.create_snap(2, 1), writes), False),
        ("discard", tx(lambda p: p.discard(2, lo * BS, 600 * BS)), False),
    ]


def seq_snapshots(tmp: Path, tools11: oracles.Tools) -> tuple[Path, Path, list[Step]]:
    """Snapshots sharing subtrees and data: snapshot of a snapshot, writes, deletes."""
    meta, data = _restored(poolgen.snapshot_pool(), tmp, tools11, "snapshots")
    return meta, data, [
        ("snap-of-snap", tx(lambda p: p.create_snap(4, 3),
                            lambda p: p.write(3, 0, _payload(5, 2 * BS)),
                            lambda p: p.write(4, 40 * BS, _payload(6, BS))), False),
        ("delete shared", tx(lambda p: p.delete(2), lambda p: p.delete(3),
                             lambda p: p.discard(4, 0, 100 * BS)), False),
    ]


def seq_held(tmp: Path, tools11: oracles.Tools) -> tuple[Path, Path, list[Step]]:
    """A held metadata snapshot: reserved, written under, released."""
    meta, data = _restored(poolgen.thins_pool(2, mappings_per_thin=200), tmp, tools11, "held")
    return meta, data, [
        ("reserve", tx(lambda p: p.reserve_metadata_snap(),
                       lambda p: p.write(1, 0, _payload(7, BS))), False),
        ("write while held", tx(lambda p: p.write(2, 0, _payload(8, 4 * BS)),
                                lambda p: p.create_snap(3, 1),
                                lambda p: p.discard(1, 0, 50 * BS)), False),
        ("release", tx(lambda p: p.release_metadata_snap(),
                       lambda p: p.write(3, 0, _payload(9, BS))), False),
    ]


def seq_fixes(tmp: Path, tools11: oracles.Tools) -> tuple[Path, Path, list[Step]]:
    """check's in-place fixes: a leaked metadata block freed by --auto-repair (the space
    maps rewritten through a transaction); NEEDS_CHECK set by a transaction, then cleared by
    rewriting block 0 alone."""
    meta, data = _restored(poolgen.thins_pool(2, mappings_per_thin=100), tmp, tools11, "fixes")
    meta.write_bytes(damage.leaked_block(meta.read_bytes()).data)
    return meta, data, [
        ("auto-repair a leak", lambda m, d: _assert_written(fix_in_place(
            m, auto_repair=True).written), False),
        ("set needs_check", tx(lambda p: p.set_needs_check(True)), False),
        ("clear needs_check", lambda m, d: _assert_written(fix_in_place(
            m, clear_needs_check_flag=True).written), False),
    ]


def _assert_written(written: bool) -> None:
    assert written


def seq_replace(tmp: Path, tools11: oracles.Tools) -> tuple[Path, Path, list[Step]]:
    """Writers that replace whatever pool the file holds: restore, format, unpack, repair -o."""
    meta, data = _restored(poolgen.thins_pool(3, mappings_per_thin=300), tmp, tools11,
                           "replace", 256)
    other = _restored(poolgen.snapshot_pool(), tmp, tools11, "other", 256)[0]
    _restored(poolgen.thins_pool(3, mappings_per_thin=20), tmp, tools11, "thins3", 128)
    packed = io.BytesIO()
    pack_metadata(other, packed)
    snap_ir = parse_dump(oracles.dump(tmp / "other.meta", tools11).encode())

    def unpack(m: Path, d: Path) -> None:
        packed.seek(0)
        unpack_metadata(packed, m)

    return meta, data, [
        ("restore onto a pool", lambda m, d: _ignore(restore(snap_ir, m)), True),
        ("format onto a pool", lambda m, d: _ignore(format_pool(m, 128, 4096)), True),
        ("unpack onto a pool", unpack, True),
        ("repair -o onto a pool", lambda m, d: _ignore(repair(tmp / "thins3.meta", m)), True),
    ]


def _ignore(_: object) -> None:
    return None


SEQUENCES: dict[str, Callable[[Path, oracles.Tools], tuple[Path, Path, list[Step]]]] = {
    "small": seq_small, "thins": seq_thins, "multilevel": seq_multilevel,
    "snapshots": seq_snapshots, "held": seq_held, "fixes": seq_fixes, "replace": seq_replace,
}


def run_step(name: str, writer: Callable[[Path, Path], None], meta: Path, data: Path,
             tmp: Path, tools11: oracles.Tools, rng: random.Random, *, blank_ok: bool,
             old: Committed | None = None,
             mutation: str | None = None) -> tuple[Verdict, crashsim.Recording, Committed]:
    """Run one writer under the recorder and judge its crash images. ``old``: the pool as the
    previous step left it (read again when not given)."""
    old = old or committed(meta, tools11)
    with crashsim.Recorder([meta, data], images=[meta],
                           drop_flush_before_superblock=mutation == "drop_flush_before_superblock",
                           superblock_first=mutation == "superblock_first",
                           drop_other_flushes=mutation == "drop_data_flush") as rec:
        writer(meta, data)
    new = committed(meta, tools11)
    assert new.state != old.state, f"{name}: the step changed nothing"
    v = judge(name, rec, meta, old, new, tmp, tools11, rng, blank_ok=blank_ok)
    return v, rec, new


def superblock_alone_at_the_end(rec: crashsim.Recording, meta: Path) -> bool:
    """The writer's last epoch is the superblock alone, and it is flushed."""
    m = os.path.realpath(meta)
    eps = crashsim.epochs(rec, m)
    last = [e for e in rec.events if e.file == m][-1]
    return isinstance(last, crashsim.Flush) and [w.block for w in eps[-1]] == [0]


def data_durable_before_superblock(rec: crashsim.Recording, meta: Path, data: Path) -> bool:
    """Every data write was flushed before the metadata's superblock was written."""
    m, d = os.path.realpath(meta), os.path.realpath(data)
    unflushed = 0
    for e in rec.events:
        if e.file == d:
            unflushed = 0 if isinstance(e, crashsim.Flush) else unflushed + 1
        elif e.file == m and isinstance(e, crashsim.Write) and e.block == 0:
            if unflushed:
                return False
    return True


@pytest.fixture
def crash_images(shm_path: Path) -> Path:
    """Where the judge writes the crash images (hundreds per step, each removed once
    judged): on tmpfs when there is one, where writing and removing them costs least."""
    return shm_path


@pytest.mark.parametrize("seq", sorted(SEQUENCES))
def test_every_crash_image_is_old_or_new(seq: str, tmp_path: Path, crash_images: Path,
                                         tools11: oracles.Tools) -> None:
    rng = random.Random(f"{SEED}-{seq}")
    print(f"DMIMAGE_CRASH_SEED={SEED}")
    meta, data, steps = SEQUENCES[seq](tmp_path, tools11)
    failures: list[str] = []
    prev = None
    for name, writer, blank_ok in steps:
        v, rec, prev = run_step(name, writer, meta, data, crash_images, tools11, rng,
                                blank_ok=blank_ok, old=prev)
        print(v.line())
        failures += v.failures
        assert v.seen["new"] >= 1 and v.seen["old"] >= 1, v.line()
        assert superblock_alone_at_the_end(rec, meta), f"{name}: epochs {v.epochs}"
        if not blank_ok:
            assert data_durable_before_superblock(rec, meta, data), name
    assert not failures, f"{len(failures)} bad crash images (seed {SEED}):\n" + \
        "\n".join(failures[:10])


# ----------------------------------------------------------------------------- mutations


@pytest.mark.parametrize("mutation", ["drop_flush_before_superblock", "superblock_first"])
@pytest.mark.parametrize("seq", ["thins", "replace"])
def test_mutated_writer_is_caught(seq: str, mutation: str, tmp_path: Path, crash_images: Path,
                                  tools11: oracles.Tools) -> None:
    """The same judge, with the writer's I/O mutated at the seam: it must find bad images."""
    rng = random.Random(f"{SEED}-{seq}-{mutation}")
    print(f"DMIMAGE_CRASH_SEED={SEED}")
    meta, data, steps = SEQUENCES[seq](tmp_path, tools11)
    name, writer, blank_ok = steps[0]
    v, rec, _ = run_step(name, writer, meta, data, crash_images, tools11, rng, blank_ok=blank_ok,
                         mutation=mutation)
    print(v.line())
    if mutation == "drop_flush_before_superblock":
        assert rec.dropped_flushes >= 1
    else:
        assert rec.reordered_writes >= 1
    assert v.failures, f"mutation {mutation} not caught: {v.line()}"
    print("caught, e.g.:", v.failures[0])


def test_missing_data_flush_is_caught(tmp_path: Path, tools11: oracles.Tools) -> None:
    """Without the data device's flush, a crash could expose the new mappings over data that
    never landed: the ordering check holds for the writer and fails for the mutant."""
    verdicts = []
    for mutant in (False, True):
        where = tmp_path / f"mutant{int(mutant)}"
        where.mkdir()
        meta, data, steps = seq_thins(where, tools11)
        with crashsim.Recorder([meta, data], images=[meta], drop_other_flushes=mutant) as rec:
            steps[0][1](meta, data)
        assert rec.dropped_flushes == (1 if mutant else 0)
        verdicts.append(data_durable_before_superblock(rec, meta, data))
    assert verdicts == [True, False]


def test_crash_model_enumerates_every_image(tmp_path: Path) -> None:
    """The model itself, on a hand-made write stream: two writes to block 1 and one to block 2,
    a flush, then block 0. Epoch 1 leaves 3 x 2 images (block 1: old, first or second write;
    block 2: old or new), epoch 2 two (block 0 old or new); the sampled path covers the
    adversarial picks."""
    f = tmp_path / "f"
    f.write_bytes(bytes(3 * crashsim.BLOCK))
    fd = os.open(f, os.O_RDWR)
    try:
        with crashsim.Recorder([f]) as rec:
            os.pwrite(fd, b"a" * crashsim.BLOCK, crashsim.BLOCK)
            os.pwritev(fd, [b"b" * crashsim.BLOCK, b"c" * crashsim.BLOCK], crashsim.BLOCK)
            os.fsync(fd)
            os.pwrite(fd, b"s", 0)
            os.fsync(fd)
    finally:
        os.close(fd)
    file = os.path.realpath(f)
    assert rec.replay_matches(file)
    eps = crashsim.epochs(rec, file)
    assert [[(w.block, w.data[:1]) for w in e] for e in eps] == \
        [[(1, b"a"), (1, b"b"), (2, b"c")], [(0, b"s")]]
    rng = random.Random(SEED)
    images = {bytes(crashsim.apply_choice(rec.before[file], eps, c)[::crashsim.BLOCK])
              for c in crashsim.crash_choices(eps, rng)}
    assert images == {b"\0\0\0", b"\0a\0", b"\0b\0", b"\0\0c", b"\0ac", b"\0bc",
                      b"sbc"}
    sampled = {bytes(crashsim.apply_choice(rec.before[file], eps, c)[crashsim.BLOCK::
                                                                      crashsim.BLOCK])
               for c in crashsim.crash_choices(eps, rng, exhaustive=1, samples=50)
               if c.epoch == 0}
    assert sampled == {b"\0\0", b"a\0", b"b\0", b"\0c", b"ac", b"bc"}


def test_uncommitted_changes_leave_visible_state_identical(tmp_path: Path,
                                                           tools11: oracles.Tools) -> None:
    """Metadata byte-identical; data identical in every block the committed pool uses (new
    blocks may have been filled, but nothing maps them)."""
    meta, data = _restored(poolgen.thins_pool(3, mappings_per_thin=300), tmp_path, tools11,
                           "base")
    before_meta, before_data = meta.read_bytes(), data.read_bytes()
    used = damage.data_counts(before_meta) > 0
    with open_writable(meta, data) as pool:
        pool.create_thin(7)
        pool.write(7, 0, b"\xab" * (3 * BS + 100))
        pool.create_snap(8, 1)
        pool.delete(2)
        pool.write(1, 0, b"\x11" * 70000)  # overwrite mapped blocks of the committed pool
    assert meta.read_bytes() == before_meta
    after = np.frombuffer(data.read_bytes(), np.uint8).reshape(-1, BS)
    assert used.any()
    before = np.frombuffer(before_data, np.uint8).reshape(-1, BS)
    assert np.array_equal(after[used], before[used])
