"""main()'s argument parsing: its direct pass through a command's own parser gives what the
whole parser's ``parse_args`` gives (the namespace, or the same exit and messages)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest

from dmimage.cli import main as cli_main

ARGVS = [
    ["check", "--json", "/x/m"], ["check"], ["check", "--bogus", "/x"], ["check", "/x", "extra"],
    ["check", "-h"], ["check", "--version"], ["check", "--", "/x"], ["check", "/x", "--", "y"],
    ["check", "--lock-timeout", "soon", "/m"],
    ["dump", "--repair", "--data-block-size", "abc", "/x"], ["dump", "/x", "-o", "/y"],
    ["ls", "-o", "DEV", "/x"], ["delta", "--thin1", "1", "--thin2", "2", "/x"],
    ["rmap", "--region", "0..100", "/x"], ["repair", "-q", "-i", "/x", "-o", "/r"],
    ["export", "/x", "/d", "--dev-id", "1", "--size", "1M", "-o", "/e"],
    ["message", "/x", "create_thin 1"], ["lvm", "ls", "/x"], ["cache", "check", "/x"],
    ["bogus"], ["--version"], ["-h"], [],
    # The whole parser stops at a word its own options make ambiguous (--help, --version),
    # before the command's parser sees any word (which would print help and exit 0 here).
    ["cache", "--he", "--="], ["check", "--=x", "/x"], ["check", "/x", "--", "--=x"],
]


def _outcome(parse: Any, words: list[str]) -> tuple[object, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: object = {k: getattr(v, "__qualname__", v)
                              for k, v in vars(parse(list(words))).items()}
        except SystemExit as e:
            result = ("exit", e.code)
    return result, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("words", ARGVS, ids=" ".join)
def test_direct_parse_is_the_whole_parsers(words: list[str]) -> None:
    whole = _outcome(lambda w: cli_main._parser(w[0] if w else None).parse_args(w), words)
    assert _outcome(cli_main.parse_args, words) == whole
