"""Where commands write their results: text to stdout in one write; output files whole or not
at all (``atomic_output``, see dmimage/output_file.py)."""

from __future__ import annotations

import sys

from dmimage.output_file import replaced_when_complete as atomic_output

__all__ = ["atomic_output", "write_text"]


def write_text(text: str) -> None:
    """The whole of a command's text result to stdout, encoded, in one write."""
    out = sys.stdout.buffer
    out.write(text.encode())
    out.flush()
