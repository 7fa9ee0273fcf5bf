"""Host side of the guest agent: a line protocol over a virtio-serial port of the guest.

Frames (the port is no tty: every byte arrives as sent):

- host → guest: ``@@C <id> <timeout_s> <nlines> <nbytes> <token>`` then the script's *nlines*
  lines, verbatim (*nbytes* in all)
- guest → host: ``@@R <id> <rc> <timed_out>``, a newline, then stdout's raw bytes, the line
  ``@@<token>.<id>``, stderr's raw bytes and the same line again; for a timed-out command,
  stderr is followed by the line ``@@<token>.<id>.diag`` and the guest's state as the
  watchdog found it before the kill (``DIAG_SCRIPT``; ``CommandResult.diagnostics``)
- guest → host: ``@@READY <uptime>`` once when the agent starts

*token* is 16 random hex digits of this channel, the agent's own variable: a command can
find only an earlier reply's separator (left in the agent's /tmp/.s), never its own id's, so
its output cannot hold its separator by anything but a 2**-64 chance, and a
reply to a command the host gave up on can still be skipped (its separator is known by id),
also when the host stopped reading it midway.
The guest side is the busybox sh script ``AGENT_SCRIPT`` in ``appliance.py``: it runs each
script with ``sh`` in its own session and, after *timeout_s*, kills that whole process group
(rc 137, timed_out 1). Lines that are not frames are ignored. Under TCG each guest process
costs ~10 ms of CPU, so the guest loop forks as little as it can: no decoding of the script,
one ``cat`` for both outputs (the old base64 frames took a ``stat`` and one ``base64`` each),
none for empty ones.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import GuestCommandError, GuestTimeout, KernelProblem, VMError

#: Extra seconds the host waits beyond a command's own timeout before declaring the guest hung.
HOST_GRACE = 20.0


@dataclass
class CommandResult:
    """What a guest shell command did. ``stdout``/``stderr`` are bytes, exactly as produced."""

    command: str
    returncode: int
    stdout: bytes
    stderr: bytes
    duration: float
    timed_out: bool = False
    #: For a timed-out command: the guest's tasks, memory and dm devices just before the kill.
    diagnostics: bytes = b""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")

    def check(self) -> CommandResult:
        """Return self, or raise ``GuestCommandError`` if the command failed or timed out."""
        if not self.ok:
            raise GuestCommandError(self)
        return self


class AgentChannel:
    """Talks to the guest agent over a connected stream socket (QEMU's serial chardev).

    *health* is called while waiting; it raises (e.g. ``MachineDied``) when waiting is
    pointless. *context* returns ``(console_tail, log_path)`` for error messages.
    """

    def __init__(self, sock: socket.socket, *, health: Callable[[], None] = lambda: None,
                 context: Callable[[], tuple[str, str | None]] = lambda: ("", None),
                 on_broken: Callable[[], None] | None = None):
        self._sock = sock
        self._sock.setblocking(False)
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._health = health
        self._context = context
        # Called when the channel breaks (EOF, reset): may wait for QEMU to exit and raise.
        self._on_broken = on_broken or health
        self._token = os.urandom(8).hex()
        # Separators still owed by a reply whose outputs the host stopped reading (it timed
        # out mid-reply): skipped before the next reply, or that reply's raw output would be
        # read as frames ("@@R ..." lines in it taken for replies).
        self._unread: list[bytes] = []
        self.ready_uptime: float | None = None
        self.host_grace = HOST_GRACE
        self.noise: list[bytes] = []

    # -- low level ---------------------------------------------------------------------------
    def _read_line(self, deadline: float, what: str) -> bytes:
        return self._read_until(b"\n", deadline, what).rstrip(b"\r")

    def _read_until(self, end: bytes, deadline: float, what: str) -> bytes:
        """The bytes before the next *end* (which is consumed too)."""
        searched = 0
        while True:
            at = self._buf.find(end, searched)
            if at >= 0:
                data = bytes(self._buf[:at])
                del self._buf[: at + len(end)]
                return data
            searched = max(0, len(self._buf) - len(end) + 1)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail, log = self._context()
                raise GuestTimeout(f"guest agent: no answer while {what}", console_tail=tail,
                                   log_path=log)
            r, _, _ = select.select([self._sock], [], [], min(remaining, 0.25))
            if not r:
                self._health()
                continue
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._on_broken()
                raise VMError(f"guest agent channel failed: {exc}") from exc
            if not data:
                self._on_broken()
                tail, log = self._context()
                raise VMError("guest agent channel closed", console_tail=tail, log_path=log)
            self._buf += data

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            if time.monotonic() > deadline:
                tail, log = self._context()
                raise GuestTimeout("guest agent: cannot send the command", console_tail=tail,
                                   log_path=log)
            _, w, _ = select.select([], [self._sock], [], 0.25)
            if not w:
                self._health()
                continue
            try:
                n = self._sock.send(view)
            except BlockingIOError:
                continue
            except OSError as exc:  # EPIPE, ECONNRESET: QEMU gone, as when a read sees EOF
                self._on_broken()
                raise VMError(f"guest agent channel failed: {exc}") from exc
            view = view[n:]

    # -- protocol ----------------------------------------------------------------------------
    def wait_ready(self, timeout: float) -> float:
        """Wait for the agent's ``@@READY`` line; returns the guest uptime it reported."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_line(deadline, "booting (waiting for @@READY)")
            if line.startswith(b"@@READY"):
                try:
                    self.ready_uptime = float(line.split()[1])
                except (IndexError, ValueError):
                    self.ready_uptime = float("nan")
                return self.ready_uptime
            self.noise.append(line)

    def run(self, script: str | bytes, *, timeout: float = 60.0, check: bool = False,
            host_timeout: float | None = None) -> CommandResult:
        """Run *script* with ``sh`` in the guest; stdin is /dev/null.

        After *timeout* seconds the guest kills the command's process group and the result has
        ``timed_out=True`` (``returncode`` 137). If the guest does not answer within
        *timeout* + ``host_grace`` (default ``HOST_GRACE``), ``GuestTimeout`` is raised (the
        guest is hung). *timeout* 0 runs without a guest-side watchdog (one process less);
        *host_timeout* then bounds the host's wait.
        """
        raw = script.encode() if isinstance(script, str) else script
        text = script if isinstance(script, str) else script.decode(errors="replace")
        if b"\0" in raw:
            raise ValueError("a guest shell script cannot contain NUL bytes")
        cid = next(self._ids)
        lines = raw.split(b"\n")
        if len(lines) > 1 and not lines[-1]:
            del lines[-1]  # the guest ends every line with a newline
        tmo = max(1, math.ceil(timeout)) if timeout and timeout > 0 else 0
        body = b"".join(ln + b"\n" for ln in lines)
        frame = b"@@C %d %d %d %d %s\n" % (cid, tmo, len(lines), len(body),
                                          self._token.encode()) + body
        start = time.monotonic()
        host_deadline = start + (tmo if tmo else 24 * 3600) + self.host_grace
        if host_timeout is not None:
            host_deadline = start + host_timeout
        self._send(frame, host_deadline)
        while self._unread:
            self._read_until(self._unread[0], host_deadline, "skipping an abandoned reply")
            del self._unread[0]
        while True:
            line = self._read_line(host_deadline, f"running {text[:200]!r}")
            if not line.startswith(b"@@R "):
                if line.startswith(b"@@READY"):
                    tail, log = self._context()
                    raise VMError("guest agent restarted while a command was running",
                                  console_tail=tail, log_path=log)
                self.noise.append(line)
                continue
            parts = line.split(b" ")
            if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
                raise VMError(f"guest agent: malformed reply {line[:200]!r}")
            _, rid, rc, to = parts
            sep = b"@@%s.%s\n" % (self._token.encode(), rid)
            self._unread = [sep, sep]
            out = self._read_until(sep, host_deadline, f"reading the output of {text[:200]!r}")
            del self._unread[0]
            err = self._read_until(sep, host_deadline, f"reading the output of {text[:200]!r}")
            del self._unread[0]
            if int(rid) != cid:
                continue  # reply to a command the host gave up on
            diag = b""
            if to == b"1":
                err, _, diag = err.partition(b"@@%s.%s.diag\n" % (self._token.encode(), rid))
            res = CommandResult(text, int(rc), out, err, time.monotonic() - start, to == b"1",
                                diag)
            if check and not res.ok:
                tail, log = self._context()
                raise GuestCommandError(res, log_path=log)
            return res


# --------------------------------------------------------------------------------------------
# Kernel log scanning

KERNEL_PROBLEM_PATTERNS = (
    r"\bkernel BUG\b",
    r"\bBUG:",
    r"\bWARNING:",
    r"\bCall Trace:",
    r"\bOops\b",
    r"general protection fault",
    r"Kernel panic",
    r"\bRIP: ",
)
_PROBLEM_RE = re.compile("|".join(KERNEL_PROBLEM_PATTERNS))


#: The lines DIAG_SCRIPT (appliance.py) puts around the sysrq 'w' dump it asks for when a
#: command times out: the call traces between them are that report, not a kernel problem.
DUMP_BEGIN = "dmimage-guest: blocked tasks (sysrq w) at a command's timeout"
DUMP_END = "dmimage-guest: end of blocked tasks"


def find_kernel_problems(dmesg: str, *, allow: tuple[str, ...] = ()) -> list[str]:
    """Lines of *dmesg* that show a kernel BUG/WARNING/oops/"Call Trace" (minus *allow*
    regexes, and the blocked-task dumps of timed-out commands: between ``DUMP_BEGIN`` and
    ``DUMP_END``, when both are there)."""
    allowed = [re.compile(a) for a in allow]
    lines = dmesg.splitlines()
    skip: set[int] = set()
    begin = None
    for i, ln in enumerate(lines):
        if ln.endswith(DUMP_BEGIN):
            begin = i
        elif ln.endswith(DUMP_END) and begin is not None:
            skip.update(range(begin, i))
            begin = None
    return [ln for i, ln in enumerate(lines) if i not in skip
            and _PROBLEM_RE.search(ln) and not any(a.search(ln) for a in allowed)]


def check_kernel_log(dmesg: str, *, allow: tuple[str, ...] = (), console_tail: str = "",
                     log_path: str | None = None) -> None:
    """Raise ``KernelProblem`` if *dmesg* shows a kernel BUG, WARNING or call trace."""
    bad = find_kernel_problems(dmesg, allow=allow)
    if bad:
        # Show some context around the first hit.
        lines = dmesg.splitlines()
        first = lines.index(bad[0])
        raise KernelProblem("guest kernel log shows a problem:",
                            lines[max(0, first - 5): first + 30],
                            console_tail=console_tail, log_path=log_path)
