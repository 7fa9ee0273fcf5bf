"""Many concurrent dmimage command processes, started cheaply: a fork server for the lock tests.

``python forkcli.py SPEC.json`` imports the CLI once (dmimage.cli.main, the commands' parsers
and ``preload`` modules), then forks one process per "shell" of the spec, all at once; a
shell runs its commands one after another, each in a process of its own forked from the
warm interpreter, which runs the console script's code path (``sys.exit(main())`` with
``sys.argv`` set) -- locks, reads and writes are the real CLI's, in separate processes with
their own open files, as with ``dmimage ...`` from a shell. Only Python's start-up and the
imports (~0.2 s of CPU per command here, 80 commands per lock test) are done once.

SPEC: ``{"preload": [module, ...], "unlocked": bool, "shells": [shell, ...], "done": [path,
n] or null}`` (``done``: the file is created once the first n shells have ended) where a shell is
``{"cmds": [[argv, stdout path or null], ...], "until": path or null, "min_rounds": n,
"stderr": path}``: its commands run in order, and again while ``until`` does not exist or
fewer than ``min_rounds`` rounds ran (``{n}`` in a stdout path: the round, from 1). A command
that exits non-zero ends the shell with exit 9 (``cmd || exit 9``). Output: one JSON line,
the shells' exit codes in order. ``unlocked``: every lock a no-op (test_locking's
demonstration that the concurrency test can fail).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import threading
from typing import Any


def _command(argv: list[str], stdout: str | None, stderr_fd: int) -> int:
    """Run one command in a forked process; its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            if stdout is not None:
                fd = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.close(fd)
            os.dup2(stderr_fd, 2)
            from dmimage.cli.main import main

            sys.argv = ["dmimage", *argv]
            try:
                code = main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # a traceback is a failure the test shows
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _shell(shell: dict[str, Any]) -> int:
    stderr_fd = os.open(shell["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rounds = 0
    while True:
        rounds += 1
        for argv, stdout in shell["cmds"]:
            out = stdout.replace("{n}", str(rounds)) if stdout is not None else None
            if _command(argv, out, stderr_fd) != 0:
                return 9
        until = shell.get("until")
        if until is None or (os.path.exists(until)
                             and rounds >= shell.get("min_rounds", 1)):
            return 0


def serve(spec: dict[str, Any]) -> list[int]:
    from dmimage.cli import main as cli_main

    cli_main._numpy_env()  # what main() sets before numpy is imported
    for name in spec.get("preload", []):
        importlib.import_module(name)
    for shell in spec["shells"]:
        for argv, _ in shell["cmds"]:
            cli_main._parser(argv[0])  # the command's module and parser, built once
    if spec.get("unlocked"):
        from dmimage import devlock

        devlock.acquire = lambda *a, **k: devlock.Lock(None, False)
    # fork() copies only the calling thread: the warm interpreter must have no other
    assert threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1
    # What the warm interpreter holds lives as long as every child: frozen (Python's advice
    # for a fork server), the collection main() runs when a command is done (cli/main.py:
    # _exit_collected) does not traverse it, nor copy its pages, in each child.
    gc.freeze()
    pids = []
    sys.stdout.flush()
    sys.stderr.flush()
    for shell in spec["shells"]:
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                code = _shell(shell)
            finally:
                os._exit(code)
        pids.append(pid)
    codes = []
    done = spec.get("done")
    for i, pid in enumerate(pids):
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        if done is not None and i + 1 == done[1]:
            open(done[0], "x").close()
    return codes


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(json.dumps(serve(json.load(f))), flush=True)
