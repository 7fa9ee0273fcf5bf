"""``dmimage ARGS`` in the test's own process: main() with stdout and stderr captured.

The same code path and exit code as the console script (``sys.exit(main())``) without a
Python start-up per command (~0.2 s of CPU here, numpy's import most of it), for tests that
compare a command's output with an oracle's many times. Tests about the process itself (its
imports, signals, exit on a closed pipe, locks between processes) keep real subprocesses.
"""

from __future__ import annotations

import io
import subprocess
import sys

from dmimage.cli.main import main


def run_cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Like ``subprocess.run(["dmimage", *argv], capture_output=True)``."""
    out, err = io.BytesIO(), io.BytesIO()
    # write_through: text and ``sys.stdout.buffer`` writes land in the order made
    so = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    se = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = so, se
    try:
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse: usage errors (2), --help (0)
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        so.flush()
        se.flush()
    finally:
        sys.stdout, sys.stderr = saved
    return subprocess.CompletedProcess(["dmimage", *argv], rc, out.getvalue(), err.getvalue())
