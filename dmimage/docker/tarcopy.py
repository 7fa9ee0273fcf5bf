"""Copy a planned layer tar (:mod:`dmimage.docker.tarplan`) out of the pool's data file, hashing
it on the way: the hot path of ``docker save``.

Pieces are laid into 1 MiB buffers (small enough to be hashed from the cache the read
left them in). Data file ranges that follow each other (gaps of up to
64 KiB, a file's slack, are read into a scratch buffer and dropped) go in one ``preadv``
with an iovec per piece, so a run of small files costs one system call, not one per file.
One thread fills the next buffer while the caller hashes the previous one and writes it;
``preadv``, ``hashlib`` (on buffers of 2 KiB and more) and ``pwrite`` all release the GIL, so
the read and the hash run on two cores.

From a cold cache the reads wait for the device: the filler keeps ``AHEAD`` bytes of the
coming data file ranges requested with ``posix_fadvise(WILLNEED)`` (the kernel reads them
asynchronously), so the device always has work queued while a buffer is hashed; and each
copy reads through a descriptor of its own, so parallel copies do not share (and defeat)
one file's readahead state."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable

from dmimage.docker.errors import StoreError
from dmimage.docker.tarplan import Plan
from dmimage.errors import DeviceError

BATCH = 1 << 20
GAP = 64 << 10
BUFFERS = 4
AHEAD = 32 << 20  # data file bytes requested ahead of the reads
HINT_GAP = 256 << 10  # ranges closer than this are requested as one (the gap is cheap)
HINT_MAX = 8 << 20  # the largest single request
try:
    IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024

_ZEROS = memoryview(bytes(BATCH))
_SCRATCH = memoryview(bytearray(GAP))  # gap bytes land here and are never looked at

# where the bytes go: (chunk, its offset in the layer tar)
Sink = Callable[[memoryview, int], object]


_spare: list[bytearray] = []  # buffers of finished copies, reused (list ops are atomic)


def _buffer() -> bytearray:
    while _spare:
        try:
            b = _spare.pop()
        except IndexError:  # another thread took the last one
            break
        if len(b) == BATCH:
            return b
    return bytearray(BATCH)


class Aborted(Exception):
    """The copy stopped because another one failed (or the consumer gave up): not an error
    of its own."""


def _preadv_all(fd: int, iov: list[memoryview], off: int) -> None:
    """Fill every buffer of *iov* from *off*; a short read (the data file ends) is an
    error, a partial one is resumed."""
    want = sum(len(v) for v in iov)
    while iov:
        got = os.preadv(fd, iov, off)
        if got <= 0:
            raise DeviceError(f"data device ends before byte {off + want}")
        off += got
        want -= got
        while iov and got >= len(iov[0]):
            got -= len(iov[0])
            iov = iov[1:]
        if iov and got:
            iov = [iov[0][got:], *iov[1:]]


class _Hints:
    """Requests the plan's data file ranges ``AHEAD`` bytes before they are read. A hint
    is only advice: any error (a descriptor that refuses it) just stops the hints."""

    def __init__(self, plan: Plan, fd: int) -> None:
        spans: list[list[int]] = []
        for n, src in plan.pieces:
            if isinstance(src, int):
                if spans and spans[-1][1] <= src <= spans[-1][1] + HINT_GAP:
                    spans[-1][1] = max(spans[-1][1], src + n)
                else:
                    spans.append([src, src + n])
        self.spans = spans
        self.fd = fd
        self.i = 0  # next span to request (from self.at)
        self.at = spans[0][0] if spans else 0
        self.hinted = 0  # bytes requested so far

    def advance(self, read: int) -> None:
        """Request more, up to AHEAD bytes beyond *read* data bytes already read."""
        spans = self.spans
        while self.i < len(spans) and self.hinted < read + AHEAD:
            end = spans[self.i][1]
            n = min(end - self.at, HINT_MAX)
            try:
                os.posix_fadvise(self.fd, self.at, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                self.i = len(spans)
                return
            self.hinted += n
            self.at += n
            if self.at >= end:
                self.i += 1
                if self.i < len(spans):
                    self.at = spans[self.i][0]


def _fill(plan: Plan, fd: int, free: queue.Queue[bytearray],
          full: queue.Queue[tuple[bytearray, int] | BaseException | None],
          stop: threading.Event) -> None:
    try:
        hints = _Hints(plan, fd)
        hints.advance(0)
        read = 0  # data file bytes read so far
        buf = free.get()
        mv = memoryview(buf)
        pos = 0
        iov: list[memoryview] = []
        run_src = run_end = 0
        for n, src in plan.pieces:
            end = pos + n
            if end < BATCH:  # the common piece: it fits, and the buffer is not full after it
                if isinstance(src, int):
                    if iov and run_end <= src <= run_end + GAP and len(iov) < IOV_MAX - 1:
                        if src > run_end:
                            iov.append(_SCRATCH[:src - run_end])
                        iov.append(mv[pos:end])
                    else:
                        if iov:
                            _preadv_all(fd, iov, run_src)
                        iov = [mv[pos:end]]
                        run_src = src
                    run_end = src + n
                    read += n
                elif src is None:
                    mv[pos:end] = _ZEROS[:n]
                else:
                    mv[pos:end] = src
                pos = end
                continue
            off = 0
            while off < n:
                take = min(n - off, BATCH - pos)
                if src is None:
                    mv[pos:pos + take] = _ZEROS[:take]
                elif isinstance(src, bytes):
                    mv[pos:pos + take] = memoryview(src)[off:off + take]
                else:
                    s = src + off
                    if iov and run_end <= s <= run_end + GAP and len(iov) < IOV_MAX - 1:
                        if s > run_end:
                            iov.append(_SCRATCH[:s - run_end])
                        iov.append(mv[pos:pos + take])
                    else:
                        if iov:
                            _preadv_all(fd, iov, run_src)
                        iov = [mv[pos:pos + take]]
                        run_src = s
                    run_end = s + take
                    read += take
                pos += take
                off += take
                if pos == BATCH:
                    if iov:
                        _preadv_all(fd, iov, run_src)
                        iov = []
                    full.put((buf, pos))
                    hints.advance(read)
                    buf = free.get()
                    if stop.is_set():
                        raise Aborted
                    mv = memoryview(buf)
                    pos = 0
        if iov:
            _preadv_all(fd, iov, run_src)
        if pos:
            full.put((buf, pos))
        full.put(None)
    except Aborted:
        pass
    except BaseException as exc:  # handed to the consumer, which raises it
        full.put(exc)


def _own_descriptor(fd: int) -> int:
    """A new open file description of *fd*'s file (its own readahead state), or *fd* itself
    if /proc cannot give one."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # pragma: no cover - no /proc
        return fd


def copy_plan(plan: Plan, fd: int, sink: Sink, *, expect_digest: str, where: str,
              abort: threading.Event | None = None, verify: bool = True) -> None:
    """Write the layer tar of *plan* to *sink*, reading the pool's data file *fd*; its
    sha256 must be *expect_digest* (``sha256:...``), or StoreError once all is written (the
    caller removes the output). *abort* set by another thread stops the copy early. With
    *verify* false nothing is hashed: the copy is then bounded by the reads, not by sha256,
    and only the plan's structure (sizes, names, extents) was checked."""
    own = _own_descriptor(fd)
    try:
        _copy_plan(plan, own, sink, expect_digest=expect_digest, where=where, abort=abort,
                   verify=verify)
    finally:
        if own != fd:
            os.close(own)


def _copy_plan(plan: Plan, fd: int, sink: Sink, *, expect_digest: str, where: str,
               abort: threading.Event | None = None, verify: bool = True) -> None:
    free: queue.Queue[bytearray] = queue.Queue()
    bufs = [_buffer() for _ in range(BUFFERS)]
    for b in bufs:
        free.put(b)
    full: queue.Queue[tuple[bytearray, int] | BaseException | None] = queue.Queue()
    stop = threading.Event()
    filler = threading.Thread(target=_fill, args=(plan, fd, free, full, stop),
                              name="save-read", daemon=True)
    filler.start()
    h = hashlib.sha256() if verify else None
    done = 0
    try:
        while True:
            item = full.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                if isinstance(item, DeviceError):
                    raise StoreError(where, str(item)) from None
                raise item
            if abort is not None and abort.is_set():
                raise Aborted
            buf, n = item
            chunk = memoryview(buf)[:n]
            if h is not None:
                h.update(chunk)
            sink(chunk, done)
            done += n
            free.put(buf)
    except BaseException:
        stop.set()
        free.put(bytearray(0))  # wakes a filler waiting for a buffer
        raise
    finally:
        filler.join()
        _spare.extend(bufs)
    if done != plan.size:  # pragma: no cover - the plan's pieces add up to its size
        raise StoreError(where, f"rebuilt {done} bytes, tar-split says {plan.size}")
    if h is None:
        return
    got = "sha256:" + h.hexdigest()
    if got != expect_digest:
        raise StoreError(where, f"rebuilt layer tar has {got}, the layer's diff id is "
                         f"{expect_digest}")


def positional_sink(fd: int, base: int) -> Sink:
    """Chunks written at *base* + their offset with ``pwrite`` (layers in parallel)."""

    def write(chunk: memoryview, off: int) -> None:
        while chunk:
            n = os.pwrite(fd, chunk, base + off)
            chunk = chunk[n:]
            off += n

    return write
