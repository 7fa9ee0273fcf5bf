"""This checkout's dmimage, run inside a guest that shares the host's root over virtio-9p
(``Machine(host_share="/")``, mounted read-only at :data:`ROOT`), in a chroot of it.

The command line names this process's interpreter and the checkout this process imported
dmimage from (``PYTHONPATH``), so the guest runs the very code under test, in a worktree too
(the venv's ``dmimage`` script would import whatever the venv was installed from).
:func:`compile_checkout` writes the checkout's bytecode on the host first: the guest cannot
write it to the read-only share, and compiling dmimage's modules under TCG costs seconds at
every start."""

from __future__ import annotations

import compileall
import shlex
import sys
from pathlib import Path

import dmimage

#: Where the guest mounts the host's root.
ROOT = "/tmp/host"
#: The checkout whose dmimage this process imported.
CHECKOUT = Path(dmimage.__file__).resolve().parent.parent


def compile_checkout() -> None:
    """Bytecode for every module of the checkout's dmimage (``__pycache__``, git-ignored),
    where the guest's Python looks: in the tree, also when this process keeps its own in a
    ``sys.pycache_prefix`` (tests/conftest.py sets one when both test trees run together)."""
    prefix, sys.pycache_prefix = sys.pycache_prefix, None
    try:
        compileall.compile_dir(str(CHECKOUT / "dmimage"), quiet=1)
    finally:
        sys.pycache_prefix = prefix


def dmimage_command(args: str) -> str:
    """Guest shell: ``dmimage ARGS`` (already shell-quoted) in the chroot of the host share."""
    return (f"chroot {ROOT} env PYTHONPATH={shlex.quote(str(CHECKOUT))} "
            f"{shlex.quote(sys.executable)} -m dmimage {args}")
