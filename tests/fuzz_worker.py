"""The fuzz harness's sandboxed worker: runs dmimage commands in-process, one job per line.

Started as ``python fuzz_worker.py MEMORY_MB TIMEOUT_S`` by :class:`fuzz_run.Worker`. The
whole process runs under RLIMIT_AS (a runaway allocation fails as MemoryError instead of
swapping the machine) and each command under a SIGALRM timer, so one long-lived process
guards thousands of inputs without a fork per input. A command that ignores the alarm
(stuck in C code) is caught by the parent's read timeout, which kills and restarts the worker.

Protocol: the first line out is ``{"ready": true}``; then for each JSON job in (``cmds``: a
list of ``[name, argv, requires]``, run in order, a command only when every command named in
``requires`` ran and returned 0; ``capture``: names whose stdout to return; ``share_salvage``:
the job's commands share one salvage per input, see :class:`SharedSalvage`) one JSON line
out: name -> ``{"rc", "exc", "error", "stdout"}`` for the commands that ran. ``rc`` is main()'s
return value or the SystemExit code; ``exc`` the class of a DmimageError that escaped; ``error`` a traceback
or ``"hang"`` (both are failures the parent reports).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import pickle
import resource
import signal
import sys
import traceback
from types import FrameType
from typing import Any

import dmimage.thin.repair as thin_repair
from dmimage.cli.main import main
from dmimage.errors import DmimageError

#: glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(on: bool = True) -> None:
    """Let glibc's malloc keep freed buffers of up to 32 MiB for reuse instead of unmapping
    them (``on=False``: its initial 128 KiB thresholds). Every input allocates several 2 MiB
    copies of a pool, and the commands their arrays: each fresh mapping was ~500 page faults
    the kernel zero-fills, which made half of the fuzz parent's CPU. Behaviour is otherwise
    the same. A no-op without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mmap_at, trim_at = (32 << 20, 64 << 20) if on else (128 << 10, 128 << 10)
    mallopt(_M_MMAP_THRESHOLD, mmap_at)
    mallopt(_M_TRIM_THRESHOLD, trim_at)


class Hang(BaseException):
    """Raised by the alarm: a command took longer than the timeout."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang()


class SharedSalvage:
    """While active, ``dmimage.thin.repair.salvage`` computes each (input, overrides) once
    and hands every later caller a copy of that result (or raises the same error again).

    ``dump --repair`` and ``repair`` of one input both salvage it, the same function on the
    same bytes (it opens the input read-only): ~3 ms of CPU each, a fifth of an input's.
    Sharing it keeps everything else of both commands -- their arguments, locks, the
    rendering of the dump, repair's writing of the output -- and their exit codes are still
    judged against each other. The salvaged pool is pickled before its first user sees it
    (callers may change the pool they are given: dump's --dev-id selection does), so each
    caller gets the pool as salvage() returned it. What sharing would hide, a salvage that
    answers differently when run twice, stays covered by the jobs the harness runs unshared
    (fuzz_run.UNSHARED_SALVAGE_EVERY)."""

    def __init__(self) -> None:
        self.results: dict[tuple[str, str], bytes | BaseException] = {}
        self.real = thin_repair.salvage

    def salvage(self, path: Any, overrides: Any = None, progress: Any = None) -> Any:
        key = (os.fspath(path), repr(overrides))
        known = self.results.get(key)
        if isinstance(known, BaseException):
            raise known
        if known is not None:
            return pickle.loads(known)
        try:
            result = self.real(path, overrides, progress)
        except Exception as e:
            self.results[key] = e
            raise
        self.results[key] = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
        return result

    def __enter__(self) -> SharedSalvage:
        thin_repair.salvage = self.salvage  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        thin_repair.salvage = self.real  # type: ignore[assignment]


def run_command(argv: list[str], timeout: float, capture: bool) -> dict[str, Any]:
    """main(argv) under the alarm; never raises (except KeyboardInterrupt)."""
    out: dict[str, Any] = {"rc": None, "exc": None, "error": None, "stdout": None}
    saved = sys.stdout
    # captured: check --json's text report (json.dump writes it in hundreds of pieces,
    # which a StringIO takes without an encoder per write)
    buf = io.StringIO()
    if capture:
        sys.stdout = buf
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        out["rc"] = main(argv)
    except Hang:
        out["error"] = "hang"
    except SystemExit as e:
        out["rc"] = e.code if isinstance(e.code, int) else 2
    except DmimageError as e:  # main() maps these; one escaping is worth knowing about
        out["rc"], out["exc"] = e.exit_code, type(e).__name__
        out["error"] = f"{type(e).__name__} escaped main(): {e}"
    except KeyboardInterrupt:
        raise
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if capture:
            sys.stdout = saved
            out["stdout"] = buf.getvalue()
    return out


def serve(memory_mb: int, timeout: float) -> None:
    keep_freed_memory()
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    proto = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    signal.signal(signal.SIGALRM, _on_alarm)
    print(json.dumps({"ready": True}), file=proto, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        capture = set(job.get("capture", ()))
        results: dict[str, dict[str, Any]] = {}
        with SharedSalvage() if job.get("share_salvage") else contextlib.nullcontext():
            for name, argv, requires in job["cmds"]:
                if all(r in results and results[r]["rc"] == 0 for r in requires):
                    results[name] = run_command(argv, timeout, name in capture)
        print(json.dumps(results), file=proto, flush=True)


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]))
