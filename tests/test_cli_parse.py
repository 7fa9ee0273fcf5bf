"""main()'s argument parsing: its direct pass through a command's own parser gives what the
whole parser's ``parse_args`` gives (the namespace, or the same exit and messages)."""

from __future__ import annotations

import contextlib
import io
import random
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


#: Words that reach argparse's corners: abbreviations (of the command's options and of the
#: top-level --help/--version, which the whole parser sorts first), explicit values, "--",
#: negative numbers, lone dashes, nested commands' names.
WORDS = ["--", "--=x", "-=x", "--=", "--json", "--js", "--j=1", "-h", "--he", "--help=2",
         "--v", "--version", "--vers=1", "-q", "-", "-1", "--lock-timeout=3", "--lock", "-o",
         "/x", "y", "ls", "check", "-x", "--bogus"]
COMMANDS = ["check", "dump", "ls", "repair", "lvm", "cache", "message", "export"]


def test_random_words_parse_as_the_whole_parser_does() -> None:
    """Against the parser of every command (build_parser(): what `dmimage` was before any
    per-command parser), for a fixed sample of command lines made of :data:`WORDS`."""
    whole = cli_main.build_parser()
    rng = random.Random(12)
    for _ in range(200):
        words = [rng.choice(COMMANDS)] + [rng.choice(WORDS) for _ in range(rng.randint(0, 4))]
        assert _outcome(cli_main.parse_args, words) == _outcome(whole.parse_args, words), words
