"""Entry point: builds the parser from every subcommand module and maps errors to exit codes.

Exit codes (docs/cli.md): 0 success, 1 metadata damaged / verification failed,
2 usage or I/O error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import dmimage.cli as cli_pkg
from dmimage.errors import DmimageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmimage",
        description="Offline tools for device-mapper thin-pool metadata, tables and disk images.",
    )
    from dmimage import __version__

    parser.add_argument("--version", action="version", version=f"dmimage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "main":
            continue
        module = importlib.import_module(f"dmimage.cli.{info.name}")
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
def _parser() -> argparse.ArgumentParser:
    """One parser per process: building it costs ~15 ms, more than many commands take, and
    in-process callers (the fuzz harness, the Python API's users) run main() thousands of times."""
    return build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
