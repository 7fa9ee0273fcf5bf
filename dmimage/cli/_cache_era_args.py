"""The sub-commands `dmimage cache` and `dmimage era` share (check, dump, restore, repair):
one spelling of their arguments, lock plans and output, so the two stay alike."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import TypeAlias

from dmimage.cli._locking import add_lock_plan
from dmimage.cli._output import atomic_output

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Run = Callable[[argparse.Namespace], int]


def add_check(sub: Sub, func: Run, *, help: str, description: str | None = None
              ) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("check", help=help, description=description)
    p.add_argument("metadata", metavar="META")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("-q", "--quiet", action="store_true", help="only set the exit code")
    add_lock_plan(p, lambda a: [(a.metadata, False)])
    p.set_defaults(func=func)
    return p


def add_reader(sub: Sub, name: str, func: Run, *, help: str,
               description: str | None = None) -> argparse.ArgumentParser:
    """META, ``-o FILE``, META read under a shared lock."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    p.add_argument("metadata", metavar="META")
    p.add_argument("-o", "--output", help="write to FILE (atomically) instead of stdout")
    add_lock_plan(p, lambda a: [(a.metadata, False)])
    p.set_defaults(func=func)
    return p


def add_restore(sub: Sub, func: Run, *, what: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "restore", help=f"write {what} metadata from its dump's XML",
        description="Writes onto an existing file or device (never grown); block 0 is zeroed "
        "first and the superblock written last, after a flush. Exit 1 on invalid XML, 2 on "
        "usage or I/O errors.")
    p.add_argument("-i", "--input", required=True, help="the XML")
    p.add_argument("-o", "--output", required=True, help="the metadata file or device")
    add_lock_plan(p, lambda a: [(a.output, True)])
    p.set_defaults(func=func)
    return p


def add_repair(sub: Sub, func: Run, *, what: str, description: str
               ) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "repair", help=f"salvage damaged {what} metadata onto another file or device",
        description=description + " The input is only read; the output (an existing file or "
        "device, never grown) is written as restore writes it, the superblock last after a "
        "flush. Each loss is one line on stderr. Exit 0 repaired, 1 nothing to salvage (the "
        "superblock is unusable), 2 usage or I/O error (e.g. the output is too small).")
    p.add_argument("-i", "--input", required=True, help="the damaged metadata")
    p.add_argument("-o", "--output", required=True, help="the metadata file or device to write")
    p.add_argument("-q", "--quiet", action="store_true", help="do not list the losses")
    add_lock_plan(p, lambda a: [(a.input, False), (a.output, True)])
    p.set_defaults(func=func)
    return p


def emit(data: str | bytes | Iterable[bytes | memoryview], output: str | None) -> None:
    """``data`` (or its pieces, written as they come) to ``output`` (atomically) or stdout."""
    if isinstance(data, str):
        data = data.encode()
    pieces = [data] if isinstance(data, bytes) else data
    if output:
        with atomic_output(output) as f:
            for piece in pieces:
                f.write(piece)
    else:
        import sys

        from dmimage.cli._output import widen_pipe

        widen_pipe(sys.stdout.buffer)
        for piece in pieces:
            sys.stdout.buffer.write(piece)
        sys.stdout.buffer.flush()


def report_losses(losses: list[str], quiet: bool) -> None:
    if losses and not quiet:
        import sys

        sys.stderr.write("".join(f"lost: {line}\n" for line in losses))
