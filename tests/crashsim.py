"""A disk model for crash tests: record the writes and flushes a writer issues, then build
every image a crash could leave behind.

Independent of ``dmimage``: the recorder sits on the ``os`` functions every writer ends in
(``pwrite``, ``pwritev``, ``write``, ``ftruncate``, ``fsync``, ``fdatasync``, ``sync``), so a
writer cannot bypass it without the replay check (:meth:`Recording.replay_matches`) noticing.

The model is what disks with volatile write caches and the page cache allow:

* a flush (fsync/fdatasync/sync) of a file makes every write issued to it before the flush
  durable; nothing is promised about writes after it;
* a crash keeps the state at the last completed flush plus ANY subset of the writes issued
  since, landed in any order: of several writes to the same 4 KiB block, any one or none
  survives;
* a write is split at 4 KiB block boundaries and each block lands whole or not at all (the
  metadata writers only write whole blocks); shrinking a file (``ftruncate``) zeroes the blocks
  it cuts off, with the same lack of ordering as a write.

An *epoch* is the run of writes between two flushes. :func:`crash_choices` yields, per epoch,
the choices of surviving writes: every one when there are few, otherwise the adversarial ones
(none, all, each write alone, all but each write, each block alone) and a seeded random sample.

Mutations of the writer's I/O, applied at the recorder (the writer's own calls are what
change), show that the crash tests can fail: ``drop_flush_before_superblock`` skips the flush
that precedes a write of block 0, ``superblock_first`` holds back every other block until the
superblock has been written, ``drop_other_flushes`` forgets the flushes of the files that get
no crash images (the data device).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

Buffer = bytes | bytearray | memoryview

BLOCK = 4096

__all__ = [
    "BLOCK", "Write", "Flush", "Event", "Recording", "Recorder", "Choice",
    "epochs", "crash_choices", "apply_choice", "describe_choice",
]


@dataclass(frozen=True, slots=True)
class Write:
    """One piece of a write, inside one block: ``data`` at byte ``offset`` of ``block``."""

    file: str
    seq: int  # position in the whole event stream (over all files)
    block: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Flush:
    file: str
    seq: int


Event = Write | Flush


@dataclass(slots=True)
class Recording:
    """What one writer did to the watched files, and their contents before it ran."""

    before: dict[str, bytes]
    events: list[Event] = field(default_factory=list)
    dropped_flushes: int = 0
    reordered_writes: int = 0

    def writes(self, file: str) -> list[Write]:
        return [e for e in self.events if isinstance(e, Write) and e.file == file]

    def flushes(self, file: str) -> list[Flush]:
        return [e for e in self.events if isinstance(e, Flush) and e.file == file]

    def replay(self, file: str) -> bytearray:
        """The file as the recorded writes leave it, all landed in issue order."""
        img = bytearray(self.before[file])
        for w in self.writes(file):
            _apply(img, w)
        return img

    def replay_matches(self, file: str) -> bool:
        """True when the recorded writes explain the file's final contents exactly: no write
        path escaped the recorder."""
        with open(file, "rb") as f:
            now = f.read()
        img = self.replay(file)
        # a file grown by ftruncate reads as zeros beyond what was written
        return bytes(img) + bytes(max(0, len(now) - len(img))) == now


def _apply(img: bytearray, w: Write) -> None:
    start = w.block * BLOCK + w.offset
    end = start + len(w.data)
    if end > len(img):
        img.extend(bytes(end - len(img)))
    img[start:end] = w.data


def _as_bytes(buf: Buffer) -> bytes:
    return bytes(memoryview(buf).cast("B"))


class Recorder:
    """Context manager: while active, every write/flush to one of ``files`` is recorded (and
    performed, unless a mutation holds it back). Crash images can be built for the files in
    ``images`` (default: all), whose contents are read first."""

    def __init__(self, files: Sequence[str | os.PathLike[str]], *,
                 images: Sequence[str | os.PathLike[str]] | None = None,
                 drop_flush_before_superblock: bool = False,
                 superblock_first: bool = False,
                 drop_other_flushes: bool = False) -> None:
        self.files = [os.path.realpath(f) for f in files]
        wanted = self.files if images is None else [os.path.realpath(f) for f in images]
        self.rec = Recording({f: _read(f) for f in wanted})
        self._mutated = set(wanted)  # the mutations change the writes to these files only
        self._drop = drop_flush_before_superblock
        self._sb_first = superblock_first
        self._drop_other = drop_other_flushes
        self._saved: dict[str, Any] = {}
        self._seq = itertools.count()
        self._deferred: dict[str, int] = {}  # file -> fd of a flush held back (mutation 1)
        self._held: dict[str, list[tuple[int, bytes, int]]] = {}  # mutation 2: fd, data, off

    # -- fd -> watched file ------------------------------------------------------------
    def _file(self, fd: int) -> str | None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        return path if path in self.files else None

    # -- the events ----------------------------------------------------------------------
    def _record_write(self, file: str, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            block, within = divmod(offset + pos, BLOCK)
            n = min(BLOCK - within, len(data) - pos)
            self.rec.events.append(Write(file, next(self._seq), block, within,
                                         data[pos:pos + n]))
            pos += n

    def _before_write(self, file: str, offset: int, length: int) -> None:
        fd = self._deferred.pop(file, None)
        if fd is None:
            return
        if offset < BLOCK and length > 0:  # the write reaches block 0: the flush is dropped
            self.rec.dropped_flushes += 1
            return
        self._saved["fsync"](fd)
        self.rec.events.append(Flush(file, next(self._seq)))

    def _write(self, fd: int, data: bytes, offset: int) -> int:
        """Record and perform one positioned write of a watched file; returns bytes written."""
        file = self._file(fd)
        assert file is not None
        self._before_write(file, offset, len(data))
        if self._sb_first and offset >= BLOCK and file in self._mutated:
            self._held.setdefault(file, []).append((fd, data, offset))
            self.rec.reordered_writes += 1
            return len(data)
        n: int = self._saved["pwrite"](fd, data, offset)
        self._record_write(file, offset, data[:n])
        if self._sb_first and offset < BLOCK:
            self._release(file)
        return n

    def _release(self, file: str) -> None:
        for fd, data, off in self._held.pop(file, []):
            n = self._saved["pwrite"](fd, data, off)
            self._record_write(file, off, data[:n])

    def _flush(self, fd: int) -> None:
        file = self._file(fd)
        if file is None:
            return
        if self._drop and file in self._mutated:
            self._deferred[file] = fd
            return
        if self._drop_other and file not in self._mutated:
            self.rec.dropped_flushes += 1
            return
        self.rec.events.append(Flush(file, next(self._seq)))

    # -- patched os functions ------------------------------------------------------------
    def _pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        if self._file(fd) is None:
            return int(self._saved["pwrite"](fd, data, offset))
        return self._write(fd, _as_bytes(data), offset)

    def _pwritev(self, fd: int, bufs: Sequence[Buffer], offset: int, *args: Any) -> int:
        if self._file(fd) is None:
            return int(self._saved["pwritev"](fd, bufs, offset, *args))
        return self._write(fd, b"".join(_as_bytes(b) for b in bufs), offset)

    def _os_write(self, fd: int, data: Buffer) -> int:
        if self._file(fd) is None:
            return int(self._saved["write"](fd, data))
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        n = self._write(fd, _as_bytes(data), pos)
        os.lseek(fd, pos + n, os.SEEK_SET)
        return n

    def _ftruncate(self, fd: int, length: int) -> None:
        file = self._file(fd)
        if file is not None:
            size = os.fstat(fd).st_size
            if length < size:
                self._before_write(file, length, size - length)
                self._record_write(file, length, bytes(size - length))
        self._saved["ftruncate"](fd, length)

    def _fsync(self, fd: int) -> None:
        self._saved["fsync"](fd)
        self._flush(fd)

    def _fdatasync(self, fd: int) -> None:
        self._saved["fdatasync"](fd)
        self._flush(fd)

    def _sync(self) -> None:
        self._saved["sync"]()
        for file in self.files:
            if (self._drop and file in self._mutated) or \
                    (self._drop_other and file not in self._mutated):
                continue
            self.rec.events.append(Flush(file, next(self._seq)))

    def __enter__(self) -> Recording:
        patches: dict[str, Callable[..., Any]] = {
            "pwrite": self._pwrite, "pwritev": self._pwritev, "write": self._os_write,
            "ftruncate": self._ftruncate, "fsync": self._fsync, "fdatasync": self._fdatasync,
            "sync": self._sync,
        }
        for name, fn in patches.items():
            self._saved[name] = getattr(os, name)
            setattr(os, name, fn)
        return self.rec

    def __exit__(self, *exc: object) -> None:
        try:
            for file in list(self._held):
                self._release(file)
            for file, fd in list(self._deferred.items()):
                del self._deferred[file]
                try:
                    self._saved["fsync"](fd)
                except OSError:
                    pass  # the writer has closed it: its data reached the page cache anyway
                self.rec.events.append(Flush(file, next(self._seq)))
        finally:
            for name, fn in self._saved.items():
                setattr(os, name, fn)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


# ----------------------------------------------------------------------------- crash images


def epochs(rec: Recording, file: str) -> list[list[Write]]:
    """The writes to ``file`` between consecutive flushes (the last run may have no flush
    after it; empty runs are dropped)."""
    out: list[list[Write]] = [[]]
    for e in rec.events:
        if e.file != file:
            continue
        if isinstance(e, Flush):
            out.append([])
        else:
            out[-1].append(e)
    return [ep for ep in out if ep]


@dataclass(frozen=True, slots=True)
class Choice:
    """A crash inside epoch ``epoch``: every earlier epoch landed; of this epoch, the writes
    ``landed`` (indexes into the epoch's writes, at most one per block) and no other."""

    epoch: int
    landed: tuple[int, ...]
    why: str


def _groups(ep: list[Write]) -> list[list[int]]:
    """Indexes of the epoch's writes, grouped by block (in issue order)."""
    by_block: dict[int, list[int]] = {}
    for i, w in enumerate(ep):
        by_block.setdefault(w.block, []).append(i)
    return list(by_block.values())


def crash_choices(eps: list[list[Write]], rng: random.Random, *, exhaustive: int = 256,
                  samples: int = 48) -> Iterator[Choice]:
    """Every crash image worth checking, as choices per epoch (deduplicated).

    An epoch whose choices number at most ``exhaustive`` is enumerated completely (each block:
    none, or any one of its writes); otherwise the adversarial choices and ``samples`` random
    ones (density drawn per sample, so near-empty and near-full subsets both occur)."""
    for k, ep in enumerate(eps):
        seen: set[tuple[int, ...]] = set()
        for pick, why in _picks(_groups(ep), rng, exhaustive, samples):
            landed = tuple(sorted(i for i in pick if i >= 0))
            if landed not in seen:
                seen.add(landed)
                yield Choice(k, landed, why)


def _picks(groups: list[list[int]], rng: random.Random, exhaustive: int,
           samples: int) -> Iterator[tuple[Sequence[int], str]]:
    """Per block group, the index of the write that survives (-1: none of them)."""
    options = [[-1, *g] for g in groups]
    total = 1
    for o in options:
        total *= len(o)
    if total <= exhaustive:
        for pick in itertools.product(*options):
            yield pick, "exhaustive"
        return
    last = [g[-1] for g in groups]
    yield [], "none"
    yield last, "all"
    for j, g in enumerate(groups):
        for i in g:
            yield [i], "only one write"
            yield [*last[:j], i, *last[j + 1:]], "all, one block's write chosen"
        yield [*last[:j], *last[j + 1:]], "all but one block"
    for _ in range(samples):
        p = rng.choice((0.1, 0.5, 0.9))
        yield [rng.choice(g) if rng.random() < p else -1 for g in groups], "random"


def apply_choice(base: bytes, eps: list[list[Write]], choice: Choice) -> bytearray:
    """The image a crash described by ``choice`` leaves (``base``: contents before the writer)."""
    img = bytearray(base)
    for ep in eps[:choice.epoch]:
        for w in ep:
            _apply(img, w)
    ep = eps[choice.epoch]
    for i in choice.landed:
        _apply(img, ep[i])
    return img


def describe_choice(eps: list[list[Write]], choice: Choice) -> str:
    ep = eps[choice.epoch]
    landed = [ep[i].block for i in choice.landed]
    lost = sorted({w.block for i, w in enumerate(ep) if i not in choice.landed} - set(landed))
    return (f"crash in epoch {choice.epoch + 1} of {len(eps)} ({choice.why}): "
            f"earlier epochs landed; of this epoch's {len(ep)} writes, blocks "
            f"{_short(landed)} landed, blocks {_short(lost)} did not")


def _short(xs: list[int], n: int = 12) -> str:
    s = ", ".join(map(str, xs[:n]))
    return f"[{s}{', ...' if len(xs) > n else ''}] ({len(xs)})"
