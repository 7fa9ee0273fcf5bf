"""Exception types of the QEMU harness (all are ``dmimage.errors.DmimageError``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmimage.errors import DmimageError

if TYPE_CHECKING:
    from .agent import CommandResult


class VMError(DmimageError):
    """Base of every harness error. ``console_tail`` holds the guest console's last lines."""

    exit_code = 2

    def __init__(self, message: str, *, console_tail: str = "", log_path: str | None = None):
        self.console_tail = console_tail
        self.log_path = log_path
        text = message
        if log_path:
            text += f"\n(console log: {log_path})"
        if console_tail:
            text += "\n--- guest console (tail) ---\n" + console_tail.rstrip() + "\n---"
        super().__init__(text)


class HarnessUnavailable(VMError):
    """A prerequisite is missing: no qemu-system-x86_64, no kernel, no busybox/dmsetup."""


class MachineDied(VMError):
    """The QEMU process exited while the harness still needed it."""


class GuestTimeout(VMError):
    """The guest did not answer in time (hung kernel, stuck agent, slow boot)."""


class QMPCommandError(VMError):
    """A QMP command returned an error."""


class HotplugError(VMError):
    """A disk could not be attached or detached."""


class GuestCommandError(VMError):
    """A guest command exited non-zero (or was killed by its timeout) under ``check=True``."""

    def __init__(self, result: CommandResult, *, console_tail: str = "",
                 log_path: str | None = None):
        self.result = result
        what = "timed out" if result.timed_out else f"exited {result.returncode}"
        msg = (f"guest command {what}: {result.command!r}\n"
               f"stdout: {result.stdout[-2000:].decode(errors='replace')}\n"
               f"stderr: {result.stderr[-2000:].decode(errors='replace')}")
        if result.diagnostics:
            d = result.diagnostics
            if len(d) > 8000:  # the tasks first, memory and dm devices last: keep both ends
                d = d[:5500] + b"\n[...]\n" + d[-2500:]
            msg += ("\n--- guest state at the timeout ---\n"
                    + d.decode(errors="replace").rstrip() + "\n---")
        super().__init__(msg, console_tail=console_tail, log_path=log_path)


class KernelProblem(VMError):
    """The guest kernel log shows a BUG, WARNING, oops or call trace."""

    def __init__(self, message: str, lines: list[str], *, console_tail: str = "",
                 log_path: str | None = None):
        self.lines = lines
        super().__init__(message + "\n" + "\n".join(lines), console_tail=console_tail,
                         log_path=log_path)
