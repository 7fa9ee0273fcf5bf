"""Restore streamed: a thin_dump XML laid out device by device while a second thread parses.

:func:`restore_file` is what ``dmimage restore`` runs. XML in thin_dump's own layout is parsed
(dump/fastxml.py) on a worker thread whose state machine hands each superblock, ``<def>`` and
finished ``<device>`` over a small queue; this thread validates and lays each one out as it
arrives (:class:`~dmimage.thin.restore.Layout`, the same placement as the whole-IR path), so
memory holds a few devices' mappings and the new metadata, not the whole dump, and the
parse's numpy work runs beside the layout's. Any other input, and any problem on the way (bad
input, an output too small, a ``<def>`` after a device), takes the whole-IR path
(:func:`~dmimage.thin.restore.read_input`, ``validate_ir``, ``restore``), so results and error
messages are the ones it gives; nothing is written before the whole layout is known to fit.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, cast

import numpy as np

from dmimage import devlock
from dmimage.errors import DmimageError
from dmimage.format.constants import BLOCK_SIZE, MAX_METADATA_BLOCKS
from dmimage.pdata.writer import MetadataImage, open_output
from dmimage.thin.dump.fastxml import NotCanonical, parse_canonical_file
from dmimage.thin.dump.source import open_dump
from dmimage.thin.dump.xml import _XmlParser
from dmimage.thin.ir import PoolIR
from dmimage.thin.restore import (
    BuiltMetadata,
    Layout,
    RestoreResult,
    _data_bitmap_floor,
    apply_overrides,
    read_input,
    restore,
    validate_def,
    validate_device,
    validate_ir,
    validate_superblock,
)


def restore_file(path: str | os.PathLike[str], output: str | os.PathLike[str], *,
                 transaction_id: int | None = None, data_block_size: int | None = None,
                 nr_data_blocks: int | None = None,
                 progress: Callable[[int], None] | None = None) -> RestoreResult:
    """Restore a dump file (XML or JSON) to ``output``, as :func:`read_input`,
    :func:`apply_overrides` and :func:`restore` would, with the same result and errors.

    XML in thin_dump's own layout is streamed: parsed on a second thread while this one lays
    out each device as it ends, so memory holds a device's mappings and the new metadata, not
    the whole dump, and the two cores share the work. Any other input, and any problem on
    the way (bad input, an output too small), takes the whole-IR path, whose message is the
    one reported; nothing is written before the whole layout is known to fit. ``progress``
    hears of the input bytes parsed.
    """
    overrides = {"transaction_id": transaction_id, "data_block_size": data_block_size,
                 "nr_data_blocks": nr_data_blocks}
    parsed = [0]

    def count(n: int) -> None:
        parsed[0] += n
        if progress:
            progress(n)

    try:
        source = open_dump(path)
    except OSError:  # read_input says why (no such file, a directory, not readable)
        source = None
    if source is None:
        ir = read_input(path)
    else:
        with source:
            done = _restore_streamed(source, output, overrides, count)
            if done is not None:
                return done
            ir = read_input(source)
    apply_overrides(ir, **overrides)
    validate_ir(ir)
    if progress:
        progress(max(_input_size(path) - parsed[0], 0))
    return restore(ir, output)


def _input_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class _Abandoned(Exception):
    """The streamed path gives up: the whole-IR path takes over."""


def _restore_streamed(source: BinaryIO | str | os.PathLike[str], output: str | os.PathLike[str],
                      overrides: dict[str, int | None],
                      progress: Callable[[int], None] | None) -> RestoreResult | None:
    """The restore done, or None when the whole-IR path is to take over (nothing written).
    ``source``: the dump, a path or a seekable file (read from its start)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            f = open(source, "rb")  # noqa: SIM115 (closed below)
        except OSError:
            return None
        with f:
            return _restore_streamed(f, output, overrides, progress)
    writing = False
    try:
        source.seek(0)
        head = source.read(4096)
        source.seek(0)
        if head.lstrip()[:1] != b"<":
            return None
        with devlock.hold(output, exclusive=True):
            fd, size = open_output(output)
            try:
                nr_blocks = min(size // BLOCK_SIZE, MAX_METADATA_BLOCKS)
                built = _build_streamed(source, nr_blocks, overrides, progress)
                if built.blocks_needed > nr_blocks:
                    return None
                writing = True  # errors from here on are the restore's own
                built.image.flush_to(fd, built.superblock)
                return RestoreResult(nr_blocks, built.image.high_water,
                                     int(np.count_nonzero(built.image.counts[:nr_blocks])))
            finally:
                os.close(fd)
    except (OSError, DmimageError, _Abandoned):
        if writing:
            raise
        return None


_END = object()


def _build_streamed(source: BinaryIO, nr_blocks: int, overrides: dict[str, int | None],
                    progress: Callable[[int], None] | None) -> BuiltMetadata:
    """Lay out the pool as a parser thread hands over the superblock, defs and devices
    (``source`` read from where it stands; the thread has ended when this returns)."""
    if nr_blocks < 1:
        raise _Abandoned
    events: queue.Queue[object] = queue.Queue(maxsize=4)
    stop = threading.Event()
    sink = _HandOver(str(source.name), events, stop)

    def parse() -> None:
        try:
            parse_canonical_file(source, sink, progress=progress, helper=_two_cores())
            events.put(_END)
        except BaseException as exc:  # handed over: the layout side decides
            events.put(exc)

    worker = threading.Thread(target=parse, name="restore-parse", daemon=True)
    worker.start()
    try:
        return _lay_out(events, nr_blocks, overrides)
    finally:
        stop.set()
        while worker.is_alive():  # unblock a worker waiting on the full queue
            try:
                events.get(timeout=0.01)
            except queue.Empty:
                pass
        worker.join()


def _lay_out(events: queue.Queue[object], nr_blocks: int,
             overrides: dict[str, int | None]) -> BuiltMetadata:
    layout: Layout | None = None
    def_sizes: dict[str, int] = {}
    seen: set[int] = set()
    nr_data = 0
    while True:
        item = events.get()
        if item is _END:
            break
        if isinstance(item, BaseException):
            raise _Abandoned
        kind, obj = cast("tuple[str, Any]", item)
        if kind == "superblock":
            ir = apply_overrides(PoolIR(obj), **overrides)
            validate_superblock(ir.superblock)
            _data_bitmap_floor(ir)
            nr_data = int(ir.superblock.nr_data_blocks)
            layout = Layout(ir.superblock, MetadataImage(nr_blocks))
        elif layout is None:
            raise _Abandoned
        elif kind == "def":
            name, runs = obj
            def_sizes[name] = validate_def(name, runs, nr_data)
            layout.add_def(name, runs)
        else:
            validate_device(obj, def_sizes, seen, nr_data)
            layout.add_device(obj)
        if layout.image.overflowed:
            raise _Abandoned  # the whole-IR path says how much is needed
    if layout is None:
        raise _Abandoned
    return layout.finish()


class _HandOver(_XmlParser):
    """The parser's state machine, handing the superblock, each def and each finished
    device to the layout thread instead of collecting them."""

    def __init__(self, source: str, events: queue.Queue[object], stop: threading.Event) -> None:
        super().__init__(source)
        self.events, self.stop = events, stop
        self.devices_started = False

    def start(self, tag: str, a: dict[str, str]) -> None:
        if self.stop.is_set():
            raise NotCanonical  # the layout side gave up: stop reading
        if tag == "def" and self.devices_started:
            raise NotCanonical  # laid out before the devices by the IR path only
        super().start(tag, a)
        if tag == "superblock":
            self.events.put(("superblock", self.sb))
        elif tag == "device":
            self.devices_started = True

    def end(self, tag: str) -> None:
        if tag == "device":
            self.flush()
            dev, self.dev, self.cur = self.dev, None, None
            self.events.put(("device", dev))
        elif tag == "def":
            assert self.cur is not None and self.def_name is not None
            runs = self.cur.runs()
            self.defs[self.def_name] = runs
            self.events.put(("def", (self.def_name, runs)))
            self.def_name, self.cur = None, None
        else:
            super().end(tag)


def _two_cores() -> bool:
    """Whether a helper thread may scan beside the parser (one core: it would only cost)."""
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) >= 2
