"""Locks on metadata and data devices, so concurrent dmimage processes never lose an update
and a reader never sees blocks a concurrent commit is reusing.

* A regular file gets a ``flock``: exclusive for writers, shared for readers, taken before
  the superblock is read and held until the transaction or the read is over. By default a
  lock is waited for; :func:`policy` sets a limit (the CLI's ``--lock-timeout``). While
  waiting, the holder is named once on stderr when ``/proc/locks`` tells who it is.
* A block device gets the same ``flock`` on its device node (so dmimage processes queue as
  on a file) and, for writers, an extra ``O_EXCL`` open. The kernel refuses that open while
  anything claims the device -- a live pool's DM table, a mounted filesystem -- and the writer
  fails at once with :class:`DeviceBusy` naming the holders from sysfs. Readers do not use
  ``O_EXCL``: reading a live pool's metadata stays possible (as with thin_dump), but the kernel
  ignores flock, so such a read may see a half-written transaction.

Locks are counted per process and per file (device and inode, or device number for block
devices): a command that reads and writes the same file takes the lock once, and a library
call inside a command reuses the command's lock. A shared lock asked for while the process
holds the exclusive one is simply counted; an exclusive lock asked for while only a shared one
is held is converted (flock converts by releasing first, so do that only when no other
process's view matters). :func:`acquire_all` takes several locks in one global order (device,
inode), so two commands never wait for each other in a cycle. The counts are per process and
not guarded for threads: dmimage takes its locks from one thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from dmimage.errors import DeviceBusy, DeviceError, LockTimeout

Key = tuple[str, int, int]


class _Policy:
    """What :func:`policy` set: the wait limit and who hears the "waiting for" line.

    This module's classes are plain slotted ones, not dataclasses: every command takes its locks
    here, and making the two dataclasses (their generated methods unused) cost ~1 ms a process."""

    __slots__ = ("timeout", "notify")

    def __init__(self, timeout: float | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        self.timeout = timeout
        self.notify = notify


_policy = _Policy()


class _Held:
    """One file's lock in this process: its descriptor and how often it is held each way."""

    __slots__ = ("path", "fd", "is_blk", "rdev", "shared", "exclusive", "excl_fd")

    def __init__(self, path: str, fd: int, is_blk: bool, rdev: int) -> None:
        self.path = path
        self.fd = fd
        self.is_blk = is_blk
        self.rdev = rdev
        self.shared = 0
        self.exclusive = 0
        self.excl_fd: int | None = None


_held: dict[Key, _Held] = {}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def policy(timeout: float | None = None,
           notify: Callable[[str], None] | None = None) -> Iterator[None]:
    """Within the block, waits for a lock give up after ``timeout`` seconds (None: wait as
    long as it takes) and ``notify`` hears the one "waiting for ..." line (default: stderr)."""
    global _policy
    saved = _policy
    _policy = _Policy(timeout, notify)
    try:
        yield
    finally:
        _policy = saved


def _key(st: os.stat_result) -> Key | None:
    if stat.S_ISBLK(st.st_mode):
        return ("blk", os.major(st.st_rdev), os.minor(st.st_rdev))
    if stat.S_ISREG(st.st_mode):
        return ("file", st.st_dev, st.st_ino)
    return None


# ----------------------------------------------------------------------------- who holds it


def _proc_locks_holders(st: os.stat_result) -> list[int]:
    """Pids holding a lock on the inode of ``st`` (not the ones waiting), from /proc/locks."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return pids
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        # "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END"
        if fields[1] == "FLOCK" and fields[5] == want:
            try:
                pid = int(fields[4])
            except ValueError:
                continue
            if pid > 0 and pid != os.getpid() and pid not in pids:
                pids.append(pid)
    return pids


def describe_pid(pid: int) -> str:
    """``pid 123 (dmimage message META create_thin 1)``, or just ``pid 123``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    if argv and os.path.basename(argv[0]).startswith("python") and len(argv) > 1:
        argv = argv[1:]
    if argv:
        argv[0] = os.path.basename(argv[0])
        text = " ".join(" ".join(argv).split())  # one line, whatever the arguments hold
        if len(text) > 100:
            text = text[:97] + "..."
        return f"pid {pid} ({text})"
    return f"pid {pid}"


def lock_holders(path: str | os.PathLike[str]) -> list[str]:
    """The processes holding a flock on ``path``, described for a message (may be empty)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [describe_pid(p) for p in _proc_locks_holders(st)]


def device_holders(rdev: int) -> list[str]:
    """What claims block device ``rdev`` according to sysfs: ``dm-3 (pool)``, ..."""
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    out = []
    for name in names:
        try:
            with open(f"/sys/class/block/{name}/dm/name", encoding="utf-8") as f:
                dm_name = f.read().strip()
        except OSError:
            dm_name = ""
        out.append(f"{name} ({dm_name})" if dm_name else name)
    return out


# ----------------------------------------------------------------------------- flock


def _flock(h: _Held, op: int, st: os.stat_result, timeout: float | None) -> None:
    """flock ``op`` on h.fd, waiting as the policy says; LockTimeout when it runs out."""
    try:
        fcntl.flock(h.fd, op | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    except OSError as exc:
        raise DeviceError(f"{h.path}: cannot lock: {exc.strerror}") from None
    holders = [describe_pid(p) for p in _proc_locks_holders(st)]
    by = f" by {', '.join(holders)}" if holders else " by another process"
    if timeout is not None and timeout <= 0:
        raise LockTimeout(f"{h.path}: locked{by} (--lock-timeout {timeout:g})")
    notify = _policy.notify or _stderr
    mode = "exclusive" if op == fcntl.LOCK_EX else "shared"
    notify(f"dmimage: {h.path}: waiting for the {mode} lock, held{by}")
    if timeout is None:
        try:
            fcntl.flock(h.fd, op)
        except OSError as exc:
            raise DeviceError(f"{h.path}: cannot lock: {exc.strerror}") from None
        return
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            fcntl.flock(h.fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            holders = [describe_pid(p) for p in _proc_locks_holders(st)] or holders
            by = f" by {', '.join(holders)}" if holders else " by another process"
            raise LockTimeout(f"{h.path}: still locked{by} after {timeout:g} s "
                              "(--lock-timeout)")
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.2)


def _claim(h: _Held) -> None:
    """O_EXCL open of a block device: the kernel refuses it while anything claims the device."""
    try:
        h.excl_fd = os.open(h.path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise DeviceError(f"{h.path}: cannot open exclusively: {exc.strerror}") from None
        holders = device_holders(h.rdev)
        who = (f"held by {', '.join(holders)}" if holders
               else "in use (mounted, or opened exclusively by another program)")
        raise DeviceBusy(f"{h.path}: {who}; refusing to write to a device in use "
                         "(nothing was changed)", holders=holders) from None


class Lock:
    """One acquisition; :meth:`release` (idempotent) gives it back."""

    def __init__(self, key: Key | None, exclusive: bool):
        self._key = key
        self._exclusive = exclusive

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        h = _held[key]
        if self._exclusive:
            h.exclusive -= 1
        else:
            h.shared -= 1
        if h.exclusive == 0 and h.excl_fd is not None:
            os.close(h.excl_fd)
            h.excl_fd = None
        if h.exclusive == 0 and h.shared == 0:
            del _held[key]
            os.close(h.fd)  # drops the flock
        elif h.exclusive == 0 and self._exclusive:
            fcntl.flock(h.fd, fcntl.LOCK_SH)  # back to the reader lock still counted

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # A reader dropped without close() (a Pool left to the garbage collector) must not
        # keep other processes' writers waiting for the rest of this process's life.
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to do
            pass


class _FromPolicy:
    """Marker: take the timeout from :func:`policy`."""


FROM_POLICY = _FromPolicy()


def acquire(path: str | os.PathLike[str], *, exclusive: bool,
            timeout: float | None | _FromPolicy = FROM_POLICY) -> Lock:
    """Lock ``path`` (shared or exclusive) for this process; see the module docstring.

    A path that does not exist or is neither a regular file nor a block device gets a no-op
    lock: the caller's own open reports the problem. ``timeout`` defaults to the policy's.
    The lock has a descriptor of its own: a lock on a description the caller also uses (or
    that an mmap duplicates) would outlive :meth:`Lock.release`.
    """
    p = os.fspath(path)
    wait = _policy.timeout if isinstance(timeout, _FromPolicy) else timeout
    try:
        st = os.stat(p)
    except OSError:
        return Lock(None, exclusive)
    key = _key(st)
    if key is None:
        return Lock(None, exclusive)
    h = _held.get(key)
    new = h is None
    if h is None:
        try:
            lock_fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return Lock(None, exclusive)
        h = _Held(p, lock_fd, stat.S_ISBLK(st.st_mode), st.st_rdev)
    try:
        if new:
            _flock(h, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, st, wait)
        elif exclusive and h.exclusive == 0:
            _flock(h, fcntl.LOCK_EX, st, wait)
        if exclusive and h.is_blk and h.excl_fd is None:
            _claim(h)
    except BaseException:
        if new:
            os.close(h.fd)
        elif exclusive and h.exclusive == 0:
            fcntl.flock(h.fd, fcntl.LOCK_SH)
        raise
    if exclusive:
        h.exclusive += 1
    else:
        h.shared += 1
    _held[key] = h
    return Lock(key, exclusive)


@contextlib.contextmanager
def hold(path: str | os.PathLike[str], *, exclusive: bool) -> Iterator[None]:
    """``with hold(path, exclusive=...)``: :func:`acquire` for the block."""
    lock = acquire(path, exclusive=exclusive)
    try:
        yield
    finally:
        lock.release()


class Locks:
    """Several acquisitions, released together (in reverse order)."""

    def __init__(self, locks: list[Lock]):
        self._locks = locks

    def release(self) -> None:
        while self._locks:
            self._locks.pop().release()

    def __enter__(self) -> Locks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_all(requests: Iterable[tuple[str | os.PathLike[str] | None, bool]]) -> Locks:
    """Lock every ``(path, exclusive)`` (None paths skipped) in one global order; a path
    named twice is locked once, exclusively if either asks for it."""
    wanted: dict[Key, tuple[str, bool]] = {}
    for path, exclusive in requests:
        if path is None:
            continue
        p = os.fspath(path)
        try:
            key = _key(os.stat(p))
        except OSError:
            key = None
        if key is None:
            continue  # missing or not a file: the command's own open says what is wrong
        prev = wanted.get(key)
        wanted[key] = (p, exclusive or (prev is not None and prev[1]))
    locks = Locks([])
    try:
        for _k, (p, exclusive) in sorted(wanted.items()):
            locks._locks.append(acquire(p, exclusive=exclusive))
    except BaseException:
        locks.release()
        raise
    return locks


def held() -> dict[str, str]:
    """Paths this process holds locks on -> "shared" or "exclusive" (for tests)."""
    return {h.path: "exclusive" if h.exclusive else "shared" for h in _held.values()}
