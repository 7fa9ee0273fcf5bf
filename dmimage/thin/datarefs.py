"""Counting data-block references (check's and ls's census), in this process or on the
second core.

A census adds one to ``counts[b]`` for every mapping naming data block ``b`` in the leaves it
is given; blocks at or past ``len(counts)`` (damaged metadata) are tallied aside per *tag*
(check: the tree being walked). At 10M mappings the counting, random increments into an
array the size of the data device, is about a third of a check's own work.

:class:`ForkedCensus` does it in a child process forked once the metadata is mapped. The
child shares the metadata mapping (its pages are the page cache's) and the count array (an
anonymous shared mapping), so all that crosses the pipe is *leaf block numbers*, 8 bytes a
leaf: the child gathers the mapping values from the leaves itself. Leaves handed over must be
validated already (the parent does that as it walks); anything else (a lone leaf, part of a
damaged one) goes over as data block numbers. Messages are counted in the order they were
sent, so the tallies aside (their first example included) are the in-process census's.

If the child fails, :meth:`ForkedCensus.finish` raises :class:`CensusFailed` and the caller
starts over in process (:class:`Census`): the answer never depends on the child.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct

import numpy as np

from dmimage.errors import DmimageError
from dmimage.format.constants import TIME_BITS
from dmimage.format.values import mapping_blocks
from dmimage.pdata.block import BlockReader
from dmimage.pdata.leaves import leaf_values

__all__ = ["Census", "CensusFailed", "ForkedCensus", "Tally", "FORK_MIN_BLOCKS", "census"]

#: Fork a counting child when the data device has at least this many blocks in use (below
#: it the fork and the child's start cost about what the counting does).
FORK_MIN_BLOCKS = 1 << 20
#: Leaves sent to the child in one message (~250,000 mappings: a few MB of arrays there).
LEAVES_PER_MESSAGE = 1024
#: Data block numbers counted at once in process.
VALUES_BATCH = 1 << 16
#: Blocks of each message looked up before the child marks them (:class:`_Marks`).
MARK_PROBE = 64
#: Data block numbers sent as such that the child keeps while marking (8 bytes each).
MARKED_VALUES = 1 << 20

_HEADER = struct.Struct("<qIi")  # items, tag, kind
_SHIFT = np.uint64(TIME_BITS)
_LEAVES, _VALUES = 0, 1


class CensusFailed(DmimageError):
    """The counting child died or answered nonsense (the caller counts again in process)."""


class Tally:
    """Mappings of one tag naming blocks past the count array: how many, the first one met,
    and (when kept) all of them."""

    __slots__ = ("count", "first", "values")

    def __init__(self, first: int) -> None:
        self.count = 0
        self.first = first
        self.values: list[np.ndarray] = []


def _inside(limit: int, data: np.ndarray, tag: int, tallies: dict[int, Tally],
            keep: bool) -> np.ndarray:
    """``data`` (u64 data block numbers) below ``limit``; the others go to the tag's tally."""
    beyond = data >= np.uint64(limit)
    if beyond.any():
        far = data[beyond]
        t = tallies.get(tag)
        if t is None:
            t = tallies[tag] = Tally(int(far[0]))
        t.count += len(far)
        if keep:
            t.values.append(far)
        data = data[~beyond]
    return data


def _count(counts: np.ndarray, limit: int, data: np.ndarray, tag: int,
           tallies: dict[int, Tally], keep: bool) -> int:
    """Add ``data`` (u64 data block numbers) to ``counts`` (empty: not counted); blocks at
    or past ``limit`` to the tag's tally instead. Returns how many were counted."""
    data = _inside(limit, data, tag, tallies, keep)
    if not len(counts):
        return 0
    # below limit == len(counts), so the u64 values are their own int64 view (no copy); an
    # increment of the array's own type keeps add.at on its fast path
    np.add.at(counts, data.view(np.int64), counts.dtype.type(1))
    return len(data)


class Census:
    """The census in this process: data block numbers counted ``VALUES_BATCH`` at a time."""

    def __init__(self, reader: BlockReader, nr_blocks: int, *, counting: bool = True,
                 keep_beyond: bool = False, batch: int | None = None) -> None:
        """``nr_blocks``: the data device's size (``counts``' length, the limit past which
        mappings are tallied aside); ``counting=False``: tally only (``counts`` empty);
        ``keep_beyond``: keep the blocks tallied aside, not just their number;
        ``batch``: data block numbers counted at once (default :data:`VALUES_BATCH`)."""
        self.reader = reader
        self.limit = max(nr_blocks, 0)
        self.counts = np.zeros(self.limit if counting else 0, np.uint32)
        self.tallies: dict[int, Tally] = {}
        self.keep = keep_beyond
        self.batch = batch or VALUES_BATCH
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._tag = 0

    #: whether leaves may be handed over by block number alone (:meth:`leaves`)
    by_block = False

    def values(self, tag: int, data: np.ndarray) -> None:
        """Count data block numbers (u64) of mappings under ``tag``."""
        if self._pending and tag != self._tag:
            self._flush()
        self._tag = tag
        self._pending.append(data)
        self._pending_n += len(data)
        if self._pending_n >= self.batch:
            self._flush()

    def leaves(self, tag: int, blocks: np.ndarray) -> None:
        """Count the mappings of validated leaves given by block number."""
        if len(blocks):
            self.values(tag, mapping_blocks(leaf_values(self.reader, blocks)))

    def _flush(self) -> None:
        if not self._pending:
            return
        data = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_n = [], 0
        self.reader.drop_pages()  # the leaves counted here are not read again
        _count(self.counts, self.limit, data, self._tag, self.tallies, self.keep)

    def finish(self) -> tuple[np.ndarray, dict[int, Tally]]:
        """The counts and the tallies aside, by tag."""
        self._flush()
        return self.counts, self.tallies

    def close(self) -> None:
        """Let go of a census not finished (nothing to do in process)."""


class ForkedCensus(Census):
    """The census in a forked child (module docstring): leaves by block number, other
    mappings as data block numbers, counted there in the order given.

    The shared counts are bytes (a quarter of the memory to fault in and scatter into than
    u32): a count wraps at 256, which the sum of the counts against the number of
    increments tells exactly (each wrap loses 256), and :meth:`finish` then raises
    :class:`CensusFailed` so the caller counts again in process, in u32."""

    by_block = True

    def __init__(self, reader: BlockReader, nr_blocks: int, *, counting: bool = True,
                 keep_beyond: bool = False) -> None:
        self.limit = max(nr_blocks, 0)
        n = self.limit if counting else 0
        self.reader = reader
        self.tallies = {}
        self.keep = keep_beyond
        self._leaves: list[np.ndarray] = []
        self._leaves_n = 0
        self._tag = 0
        fds: list[int] = []
        held = _hold_interrupts()  # until the child is inside its own try (below)
        try:
            try:
                self._shared = mmap.mmap(-1, max(n, 1))  # anonymous, shared with the child
                fds += os.pipe()
                fds += os.pipe()
                pid = os.fork()
            except OSError as exc:  # no memory, descriptors or processes: count in process
                for fd in fds:
                    os.close(fd)
                raise CensusFailed(f"no counting process: {exc}") from None
            if pid == 0:  # pragma: no cover (the child; coverage does not follow it)
                code = 1
                try:
                    _release_interrupts(held)  # a Ctrl-C now ends the child here
                    cmd_r, cmd_w, res_r, res_w = fds
                    os.close(cmd_w)
                    os.close(res_r)
                    self.counts = np.frombuffer(self._shared, np.uint8, n)
                    self._serve(cmd_r, res_w)
                    code = 0
                except BaseException:
                    pass
                finally:
                    os._exit(code)
        finally:
            _release_interrupts(held)  # the parent (the child never returns here)
        cmd_r, cmd_w, res_r, res_w = fds
        self.counts = np.frombuffer(self._shared, np.uint8, n)
        os.close(cmd_r)
        os.close(res_w)
        self._pid: int | None = pid
        self._cmd: int | None = cmd_w
        self._res = res_r

    # -- the parent --------------------------------------------------------------------
    def leaves(self, tag: int, blocks: np.ndarray) -> None:
        if self._leaves and tag != self._tag:
            self._send_leaves()
        self._tag = tag
        self._leaves.append(blocks)
        self._leaves_n += len(blocks)
        if self._leaves_n >= LEAVES_PER_MESSAGE:
            self._send_leaves()

    def values(self, tag: int, data: np.ndarray) -> None:
        self._send_leaves()
        self._send(_VALUES, tag, np.asarray(data, np.uint64))

    def _send_leaves(self) -> None:
        if self._leaves:
            blocks = np.concatenate(self._leaves) if len(self._leaves) > 1 else self._leaves[0]
            self._leaves, self._leaves_n = [], 0
            self._send(_LEAVES, self._tag, np.asarray(blocks, np.int64))

    def _send(self, kind: int, tag: int, items: np.ndarray) -> None:
        if self._cmd is None or not len(items):
            return
        msg = memoryview(_HEADER.pack(len(items), tag, kind) + items.tobytes())
        try:
            while msg:
                msg = msg[os.write(self._cmd, msg):]
        except OSError:  # the child is gone: finish() reports it
            os.close(self._cmd)
            self._cmd = None

    def finish(self) -> tuple[np.ndarray, dict[int, Tally]]:
        self._send_leaves()
        if self._cmd is not None:
            os.close(self._cmd)
            self._cmd = None
        chunks = []
        while chunk := os.read(self._res, 1 << 16):
            chunks.append(chunk)
        status = self._wait()
        if status != 0 or not chunks:
            raise CensusFailed(f"the counting process failed (status {status})")
        try:
            counted, self.tallies = pickle.loads(b"".join(chunks))
        except Exception as exc:
            raise CensusFailed(f"the counting process answered nonsense: {exc}") from None
        if int(self.counts.sum(dtype=np.uint64)) != counted:
            raise CensusFailed("a data block is referenced 256 times or more")
        return self.counts, self.tallies

    def _wait(self) -> int:
        pid, self._pid = self._pid, None
        if pid is None:
            return -1
        os.close(self._res)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        """Stop the child of a census not finished (an error in the walk)."""
        if self._cmd is not None:
            os.close(self._cmd)
            self._cmd = None
        if self._pid is not None:
            self._wait()

    # -- the child ---------------------------------------------------------------------
    def _serve(self, cmd: int, res: int) -> None:  # pragma: no cover (runs in the child)
        tallies: dict[int, Tally] = {}
        counted = 0
        reader, counts, limit, keep = self.reader, self.counts, self.limit, self.keep
        marks = _Marks(reader, counts)
        with open(cmd, "rb") as f:
            while head := f.read(_HEADER.size):
                n, tag, kind = _HEADER.unpack(head)
                body = f.read(n * 8)
                if len(body) != n * 8:
                    raise EOFError("short message")
                if kind == _LEAVES:
                    blocks = np.frombuffer(body, np.int64)
                    data = _leaf_blocks(reader, blocks)
                    reader.drop_pages(int(blocks.min()), int(blocks.max()))
                else:
                    blocks = None
                    data = np.frombuffer(body, np.uint64)
                if not len(counts):
                    _inside(limit, data, tag, tallies, keep)
                    continue
                inside = _inside(limit, data, tag, tallies, keep).view(np.int64)
                marks.add(inside, blocks)
                counted += len(inside)
        marks.settle(counted)
        out = memoryview(pickle.dumps((counted, tallies), protocol=pickle.HIGHEST_PROTOCOL))
        while out:
            out = out[os.write(res, out):]
        os.close(res)


def _leaf_blocks(reader: BlockReader, blocks: np.ndarray) -> np.ndarray:
    """The data blocks the mappings of validated leaves name (a fresh u64 array)."""
    data = leaf_values(reader, blocks)
    data >>= _SHIFT  # the data blocks, in place
    return data


class _Marks:  # pragma: no cover (runs in the child)
    """The child's counting: marks while no data block has been met twice, then counts.

    Setting ``counts[b] = 1`` costs half of ``np.add.at`` (a store does not wait for the
    random read an increment needs: ~26 against ~61 ms for 10M blocks of a 10 MB array
    here), and it is the exact count as long as every block is met once, as in a pool
    without snapshots: the number of marked blocks equals the number of mappings then, which
    :meth:`settle` checks. A block met again (snapshots share data blocks between leaves)
    turns marking off for good: the messages marked so far are counted again with
    ``np.add.at`` from what was kept of them (leaf block numbers; data block numbers sent as
    such, up to :data:`MARKED_VALUES`), so the counts are always exact. Each message's first
    :data:`MARK_PROBE` blocks are looked up before marking, which catches sharing early."""

    def __init__(self, reader: BlockReader, counts: np.ndarray) -> None:
        self.reader = reader
        self.counts = counts
        #: what was marked, to count again: leaf block numbers (i64) or data blocks (i64)
        self.marked: list[tuple[bool, np.ndarray]] | None = []
        self.values = 0  # data blocks kept in ``marked``

    def add(self, inside: np.ndarray, blocks: np.ndarray | None) -> None:
        """Count ``inside`` (i64 data blocks below the limit), from the leaves ``blocks``
        (None: sent as data blocks)."""
        counts, marked = self.counts, self.marked
        if marked is not None and bool(counts[inside[:MARK_PROBE]].any()):
            self._recount()
            marked = None
        if marked is None:
            np.add.at(counts, inside, counts.dtype.type(1))
            return
        counts[inside] = 1
        if blocks is not None:
            marked.append((True, blocks))
        else:
            marked.append((False, inside))
            self.values += len(inside)
            if self.values > MARKED_VALUES:
                self._recount()

    def settle(self, counted: int) -> None:
        """Make the counts exact: with ``counted`` increments marked, unless every one
        marked a different block, count them all again."""
        if self.marked is not None and int(np.count_nonzero(self.counts)) != counted:
            self._recount()

    def _recount(self) -> None:
        marked, self.marked = self.marked, None
        if marked is None:
            return
        counts, reader = self.counts, self.reader
        counts[:] = 0
        one = counts.dtype.type(1)
        limit = np.uint64(len(counts))
        for is_leaves, items in marked:
            if is_leaves:
                data = _leaf_blocks(reader, items)
                reader.drop_pages(int(items.min()), int(items.max()))
                items = data[data < limit].view(np.int64)
            np.add.at(counts, items, one)


def _hold_interrupts() -> set[int | signal.Signals] | None:
    """Block SIGINT in this thread (the fork's child inherits the mask): a Ctrl-C between
    fork() and the child's try would otherwise run the parent's code on in the child (its
    exception handlers and clean-up: output printed twice). Returns the mask to restore."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not POSIX
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _release_interrupts(held: set[int | signal.Signals] | None) -> None:
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def census(reader: BlockReader, nr_blocks: int, blocks_in_use: int, *, counting: bool = True,
           keep_beyond: bool = False, batch: int | None = None, fork: bool = True) -> Census:
    """A forked census for a pool with at least :data:`FORK_MIN_BLOCKS` data blocks in use
    (``fork`` and where ``os.fork`` exists and succeeds), else one in process
    (:class:`Census`, whose other arguments these are)."""
    if fork and blocks_in_use >= FORK_MIN_BLOCKS and hasattr(os, "fork"):
        try:
            return ForkedCensus(reader, nr_blocks, counting=counting, keep_beyond=keep_beyond)
        except CensusFailed:
            pass
    return Census(reader, nr_blocks, counting=counting, keep_beyond=keep_beyond, batch=batch)
