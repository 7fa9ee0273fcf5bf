"""Render docs/cli.md from the argument parsers, so the reference cannot drift from the code.

    python -m dmimage.cli._doc > docs/cli.md      (tests/test_cli_doc.py compares the two)
"""

from __future__ import annotations

import argparse
import os
import sys

HEADER = """# dmimage command reference

Generated from the argument parsers by `python -m dmimage.cli._doc > docs/cli.md`.

Exit codes for every command: **0** success; **1** damaged or invalid input (metadata, a
table, a spec) or a failed verification; **2** usage error or I/O error (missing file,
unreadable device, too-small output); **130** interrupted. Errors are one line on stderr,
prefixed with `dmimage COMMAND:`, never a traceback.

Commands that read metadata or data take a shared lock on the files, commands that write take
an exclusive one, for their whole run; they wait for another dmimage process's lock unless
`--lock-timeout SECONDS` says otherwise, and a block device a live pool holds is refused for
writing (exit 2). See docs/locking.md.
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _render(name: str, parser: argparse.ArgumentParser, out: list[str], level: int) -> None:
    out.append(f"{'#' * level} `{name}`\n")
    out.append("```")
    out.append(parser.format_help().rstrip())
    out.append("```\n")
    for sub_name, sub in _subparsers(parser).items():
        _render(f"{name} {sub_name}", sub, out, min(level + 1, 4))


def render() -> str:
    os.environ["COLUMNS"] = "100"
    from dmimage.cli.main import build_parser

    root = build_parser()
    out = [HEADER]
    for name, sub in _subparsers(root).items():
        _render(f"dmimage {name}", sub, out, 2)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
