"""This checkout's dmimage in a guest, one Python start for many commands: a fork server.

Under TCG a Python start with dmimage's imports costs the guest ~2-2.5 CPU-s (numpy's import
alone ~2), more than the commands the live-lock proofs run take themselves. The server (this
module, run as ``python -m vmtests.guest_forkserver DIR MODULE...`` in the chroot of
vmtests/guest_cli.py) imports dmimage's CLI and the named modules once, then forks one child
per command. Each command still runs in a process of its own (its own opens, ``O_EXCL``,
locks and exit code), with the client's own stdin, stdout and stderr (reopened through
``/proc/PID/fd/N`` of a proc mounted in DIR: the chroot's /proc is not reliably the guest's),
and calls ``dmimage.cli.main.main`` with the command's words as ``python -m dmimage`` does;
an exception that escapes is printed and exits 1, as Python's would.

The protocol, over two fifos in DIR (on the guest's devtmpfs, which the chroot shares): the
server writes ``ready`` to ``DIR/rc`` once its imports are done; a client writes one line
``PID BASE64-JSON-ARGV`` to ``DIR/req`` and reads the exit code from ``DIR/rc``. The agent
runs one command at a time, so clients never overlap. ``quit`` stops the server. A client
killed by the agent's timeout leaves the server waiting to hand over that exit code: the test
has failed then, and the guest is not reused.
"""

from __future__ import annotations

import base64
import gc
import importlib
import json
import os
import shlex
import sys
import sysconfig
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmimage.guest.machine import Machine

#: Where the fifos live in the guest (devtmpfs: writable, and the chroot binds /dev).
GUEST_DIR = "/dev/.dmimage-forkserver"


def _child(directory: str, pid: int, argv: list[str]) -> None:
    """In the forked child: the client's stdio, then the command; never returns."""
    rc = 1
    try:
        for n, flags in ((0, os.O_RDONLY), (1, os.O_WRONLY | os.O_APPEND),
                         (2, os.O_WRONLY | os.O_APPEND)):
            fd = os.open(f"{directory}/proc/{pid}/fd/{n}", flags)
            if fd != n:
                os.dup2(fd, n)
                os.close(fd)
        import dmimage
        from dmimage.cli.main import main

        sys.argv = [os.path.join(os.path.dirname(dmimage.__file__), "__main__.py"), *argv]
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's usage errors, as `python -m` would exit
            code = exc.code
            if isinstance(code, int):
                rc = code
            elif code is None:
                rc = 0
            else:
                print(code, file=sys.stderr)
                rc = 1
    except BaseException:  # noqa: BLE001 - printed and exit 1, as the interpreter does
        traceback.print_exc()
        rc = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(rc & 0xFF)


def serve(directory: str, preload: Sequence[str]) -> None:
    """Import *preload*, say ready, then run one forked command per request until ``quit``."""
    from dmimage.cli import main as climain

    climain._numpy_env()  # one OpenBLAS thread: nothing but the main thread crosses fork()
    for name in preload:
        importlib.import_module(name)
        if name.startswith("dmimage.cli.") and hasattr(climain, "_parser"):
            climain._parser(name.rsplit(".", 1)[1].replace("_", "-"))  # cached: main's own
    # The children's collector leaves what the server made alone: no copy-on-write of it.
    gc.freeze()
    req, rcfifo = os.path.join(directory, "req"), os.path.join(directory, "rc")
    with open(rcfifo, "w") as f:
        f.write("ready\n")
    while True:
        with open(req) as f:
            line = f.readline().strip()
        if not line:
            continue
        if line == "quit":
            return
        pid_text, payload = line.split(" ", 1)
        argv = [str(a) for a in json.loads(base64.b64decode(payload))]
        child = os.fork()
        if child == 0:
            _child(directory, int(pid_text), argv)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        with open(rcfifo, "w") as f:
            f.write(f"{code if code >= 0 else 128 - code}\n")


class GuestDmimage:
    """The fork server in a guest that shares the host's root (``Machine(host_share="/")``).

    :meth:`start` mounts the share, starts the server and waits until its imports are done;
    :meth:`command` is the guest shell for one ``dmimage ARGS`` (as
    ``vmtests.guest_cli.dmimage_command``; a redirection appended to it, e.g. ``< FILE``,
    becomes the command's stdin). The server ends with the guest, or with :meth:`stop`."""

    def __init__(self, vm: Machine, preload: Sequence[str]) -> None:
        self.vm = vm
        self.preload = list(preload)

    def start(self, *, timeout: float = 600.0) -> GuestDmimage:
        from vmtests.guest_cli import CHECKOUT, ROOT, compile_checkout

        compile_checkout()
        self.vm.mount_host_share(ROOT)
        d = GUEST_DIR
        # -S: no site module (the venv's .pth files, dmimage's editable finder: ~0.5 guest
        # CPU-s), its packages named on the path instead, after the checkout
        path = ":".join([str(CHECKOUT), *dict.fromkeys(
            sysconfig.get_paths()[k] for k in ("purelib", "platlib"))])
        server = (f"chroot {ROOT} env PYTHONPATH={shlex.quote(path)} "
                  f"{shlex.quote(sys.executable)} -S -m vmtests.guest_forkserver {d} "
                  + " ".join(shlex.quote(m) for m in self.preload))
        # proc is mounted where the chroot sees it (a mount under the guest's /dev does not
        # reach the chroot's bind of /dev)
        p = f"{ROOT}{d}/proc"
        self.vm.sh(f"mkdir -p {d}/proc && {{ mountpoint -q {p} || mount -t proc proc {p}; }} "
                   f"&& rm -f {d}/req {d}/rc && mkfifo {d}/req {d}/rc && "
                   f"{{ setsid {server} </dev/null >/dev/null 2>{d}/log & }} && "
                   f"read -r x < {d}/rc && [ \"$x\" = ready ] || {{ cat {d}/log >&2; exit 1; }}",
                   timeout=timeout)
        return self

    def command(self, args: str) -> str:
        """Guest shell: ``dmimage ARGS`` (shell words, as ``dmimage_command`` takes them) run
        by the server; exits with the command's exit code."""
        payload = base64.b64encode(json.dumps(shlex.split(args)).encode()).decode()
        d = GUEST_DIR
        return (f"{{ printf '%s %s\\n' $$ {payload} > {d}/req && read -r rc < {d}/rc; "
                "exit \"${rc:-255}\"; }")

    def stop(self) -> None:
        self.vm.sh(f"printf 'quit\\n' > {GUEST_DIR}/req", timeout=60)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:])
