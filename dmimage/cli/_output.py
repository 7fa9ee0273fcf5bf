"""Where commands write their results: text to stdout in one write; output files whole or not
at all (``atomic_output``, see dmimage/output_file.py)."""

from __future__ import annotations

import os
import stat
import sys
from typing import IO

from dmimage.output_file import replaced_when_complete as atomic_output

__all__ = ["PIPE_BYTES", "atomic_output", "widen_pipe", "write_text"]

#: Capacity asked of a pipe that a long text stream goes into: Linux's unprivileged maximum
#: (/proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_BYTES = 1 << 20


def widen_pipe(out: IO[bytes]) -> None:
    """Give the pipe ``out`` writes to (if it is one) :data:`PIPE_BYTES` of capacity. With Linux's
    default 64 KiB a streaming dump blocks on nearly every write while its reader works
    (compresses, hashes) on what it read: a 1M dump read by a hashing reader
    waited ~1,000 times, 0.1-0.2 s of a 0.5 s run. A pipe already as large is left alone;
    a refusal (over the system's limit, no permission) only keeps the default."""
    try:
        fd = out.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        import fcntl  # lazily: only streams to a pipe need it

        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_BYTES:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (OSError, ValueError):  # also io.UnsupportedOperation: no descriptor
        pass


def write_text(text: str) -> None:
    """The whole of a command's text result to stdout, encoded, in one write."""
    out = sys.stdout.buffer
    out.write(text.encode())
    out.flush()
