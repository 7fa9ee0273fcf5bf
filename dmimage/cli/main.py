"""Entry point: builds the parser from every subcommand module and maps errors to exit codes.

Exit codes (docs/cli.md): 0 success, 1 metadata damaged / verification failed,
2 usage or I/O error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import itertools
import os
import sys
from collections.abc import Sequence

import dmimage.cli as cli_pkg
from dmimage.errors import DmimageError


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it ($COLUMNS, else the
    terminal of stdout, else 80), without importing shutil (and with it zlib, bz2, lzma)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its help formatters given the width argparse would compute: every
    ``add_argument`` makes a formatter, and a formatter without a width imports shutil."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        return self.formatter_class(prog=self.prog, width=_columns() - 2)  # type: ignore[call-arg]


def _command_modules() -> list[str]:
    """The CLI package's modules and subpackages, sorted, as ``pkgutil.iter_modules`` names
    them, without pkgutil: it strips the suffixes with inspect, whose import (ast, dis,
    tokenize) was ~10% of `dmimage --help` (and of any command line the whole parser answers)."""
    import importlib.machinery

    suffixes = sorted(importlib.machinery.all_suffixes(), key=len, reverse=True)
    names: set[str] = set()
    for directory in cli_pkg.__path__:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            name = next((entry[:-len(s)] for s in suffixes if entry.endswith(s)), None)
            if name is None and os.path.isfile(os.path.join(directory, entry, "__init__.py")):
                name = entry
            if name and "." not in name and name != "__init__":
                names.add(name)
    return sorted(names)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; ``only``: the parser of just that subcommand module (same prog,
    options and messages for that command), None when no such module registers it."""
    parser = _Parser(
        prog="dmimage",
        description="Offline tools for device-mapper thin-pool metadata, tables and disk images.",
    )
    from dmimage import __version__

    parser.add_argument("--version", action="version", version=f"dmimage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    names = [only.replace("-", "_")] if only is not None else _command_modules()
    for name in names:
        if name.startswith("_") or name == "main":
            continue
        module = importlib.import_module(f"dmimage.cli.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser

def _run_locked(args: argparse.Namespace) -> int:
    """Run the command holding the locks of its plan (cli/_locking.py) for its whole run."""
    from dmimage import devlock

    plan = getattr(args, "lock_plan", None)
    with devlock.policy(timeout=getattr(args, "lock_timeout", None)):
        with devlock.acquire_all(plan(args) if plan is not None else []):
            return int(args.func(args) or 0)

@functools.cache
def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """One parser per process and command: building the whole one imports every subcommand
    module (~55 ms of CPU here, more than many commands take), and in-process callers (the fuzz
    harness, the Python API's users) run main() thousands of times.

    ``command``: the first word of the command line. When a module of that name registers it,
    only that module is imported; anything else (options first, help, an unknown or
    differently named command) gets the whole parser, so messages do not change."""
    if command is not None and not command.startswith("-") and all(
            c.isalnum() or c in "-_" for c in command):
        if importlib.util.find_spec(f"dmimage.cli.{command.replace('-', '_')}") is not None:
            parser = build_parser(command)
            sub = next(a for a in parser._actions
                       if isinstance(a, argparse._SubParsersAction))
            if command in sub.choices:
                return parser
    return build_parser()


@functools.cache
def _subparser(command: str) -> argparse.ArgumentParser | None:
    """The parser of the subcommand ``command`` in :func:`_parser`'s (None: no such name)."""
    sub = next(a for a in _parser(command)._actions
               if isinstance(a, argparse._SubParsersAction))
    return sub.choices.get(command)


def parse_args(words: list[str]) -> argparse.Namespace:
    """``words`` parsed as :func:`_parser`'s ``parse_args`` does, with its top-level pass
    done here: for a command named exactly, that pass only hands the words after the name to
    the command's parser and copies its namespace over ``command`` (argparse's
    ``_SubParsersAction``), and it was about half of a small command's argparse CPU for
    in-process callers that run main() thousands of times. Words left over get the
    top-level parser's message, as before."""
    command = words[0] if words else None
    sub = _subparser(command) if command is not None and not command.startswith("-") else None
    if sub is None:
        return _parser(command).parse_args(words)
    # The whole parser first sorts every word before "--" into option or not by its own
    # options, and stops at an ambiguous prefix ("--=x" could be --help or --version) with
    # its message, whatever the command would make of that word.
    top = _parser(command)
    for word in itertools.takewhile(lambda w: w != "--", words[1:]):
        if word.startswith("-"):
            top._parse_optional(word)
    args = argparse.Namespace(command=command)
    parsed, extras = sub.parse_known_args(words[1:])
    for key, value in vars(parsed).items():
        setattr(args, key, value)
    if extras:
        _parser(command).error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _numpy_env() -> None:
    """Settings numpy reads at its import, unless the user set them.

    Ask numpy not to madvise its large arrays into transparent huge pages. With the
    kernel's THP defrag policy "madvise" (the default), every first touch of such an array
    may compact memory synchronously: on this project's machine that made a 10M-block
    space map's decode spend 0.1-0.5 s in the kernel against 0.03 s with 4 KiB pages, and
    the commands' arrays are touched once, so huge pages save no TLB misses worth it.

    One OpenBLAS thread: numpy's import starts OpenBLAS, which sets up a thread and its
    buffers per core (~20 ms of CPU per process here); no command does linear algebra."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    elif os.environ.get("NUMPY_MADVISE_HUGEPAGE") is None:
        numpy._core.multiarray._set_madvise_hugepage(False)


def _collect_less() -> None:
    """Run the cyclic garbage collector every 100,000 new container objects instead of every
    700: a command's start-up (numpy's import above all) allocates hundreds of thousands of
    objects that live until exit, and the default threshold makes the collector traverse
    them again and again (~5% of numpy's import here). Garbage is still collected; only for
    a process of our own (``argv`` None), not for callers that run main() in theirs."""
    import gc

    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(100_000, gen1, gen2)


def _exit_collected() -> None:
    """Collect the garbage the command left once, as the interpreter's exit would, then
    freeze every object still alive (gc.freeze), so that the two or three collections of the
    interpreter's finalization skip the tens of thousands of objects (numpy's and our
    modules') that live until exit anyway: a 10M-mapping delta spent ~23 ms of its ~165 ms
    of CPU exiting, ~13 with this. Garbage of the command is finalized as before; only
    cycles that module teardown itself uncovers are left to the end of the process. For a
    process of our own only (``argv`` None)."""
    import gc

    gc.collect()
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    _numpy_env()
    if argv is None:
        _collect_less()
    words = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(words)
    rc = _run_reporting(args)
    if argv is None:
        _exit_collected()
    return rc


def _run_reporting(args: argparse.Namespace) -> int:
    """The command's exit code, its errors as one line on stderr (docs/cli.md)."""
    try:
        return _run_locked(args)
    except DmimageError as exc:
        print(f"dmimage {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"dmimage {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Reader went away (e.g. `| head`): not an error worth a traceback.
        sys.stdout = None
        return 0
    except MemoryError:
        print(f"dmimage {args.command}: out of memory", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
