"""Command start-up (issue 11): a command builds only its own parser and imports only what it
runs, and its parser is the whole parser's, option for option."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

import pytest

from dmimage.cli import main as cli_main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


FULL = _subparsers(cli_main.build_parser())


@pytest.mark.parametrize("name", sorted(FULL))
def test_one_command_parser_is_the_whole_parsers(name: str) -> None:
    """Same help text (every option, default and the prog line) as the whole parser's; a
    command its module does not name (``discard`` in write.py) gets the whole parser."""
    only = cli_main._parser(name)
    subs = _subparsers(only)
    assert name in subs
    assert subs[name].format_help() == FULL[name].format_help()
    own_module = importlib.util.find_spec(f"dmimage.cli.{name.replace('-', '_')}")
    if own_module is None:
        assert set(subs) == set(FULL)
    else:  # its module's commands only (write.py: write and discard)
        assert set(subs) < set(FULL)


def test_unknown_or_optional_first_word_gets_the_whole_parser() -> None:
    for word in (None, "--version", "no-such-command", "../x", "check.py"):
        assert set(_subparsers(cli_main._parser(word))) == set(FULL)


def test_unknown_command_message_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_check_imports_no_other_command_nor_construct(thins3_meta) -> None:  # type: ignore[no-untyped-def]
    """The modules a read command does not need stay unimported: the other subcommands,
    construct (layouts' descriptions), the crc32c package's ``__init__`` (importlib.metadata)
    and tempfile, shutil (argparse's default width); numpy started without huge pages nor
    OpenBLAS threads."""
    code = ("import os, sys; from dmimage.cli.main import main; "
            f"rc = main(['check', '-q', {str(thins3_meta.path)!r}]); "
            "import numpy; huge = numpy._core.multiarray._set_madvise_hugepage(False); "
            "print(rc, huge, len(os.listdir('/proc/self/task')), "
            "*sorted(m for m in sys.modules if m.split('.')[0] in "
            "('construct', 'crc32c', 'tempfile', 'dmimage', 'importlib', 'shutil', 'bz2', "
            "'lzma')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "0"
    assert out[1] == "False"  # numpy's arrays in 4 KiB pages (cli/main.py: _numpy_env)
    assert out[2] == "1"  # no OpenBLAS thread besides the main one (_numpy_env)
    mods = set(out[3:])
    assert "dmimage.cli.check" in mods and "dmimage.thin.check" in mods
    assert not {m for m in mods if m.startswith("dmimage.cli.")} - {
        "dmimage.cli.main", "dmimage.cli.check", "dmimage.cli._locking", "dmimage.cli._output",
        "dmimage.cli._meta_args", "dmimage.cli._units", "dmimage.cli._progress"}
    assert not mods & {"construct", "crc32c", "tempfile", "importlib.metadata"}
    assert not mods & {"shutil", "bz2", "lzma"}  # argparse's formatters get a width
    assert "crc32c._crc32c" in mods


def test_command_modules_are_pkgutils(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The whole parser lists the CLI package without pkgutil (whose import of inspect cost
    --help ~10%): the names pkgutil.iter_modules gives, for the package and for a directory
    with every kind of entry."""
    import pkgutil

    import dmimage.cli

    def pkgutils() -> list[str]:
        return sorted(m.name for m in pkgutil.iter_modules(dmimage.cli.__path__))

    assert cli_main._command_modules() == pkgutils()
    for name in ("a.py", "b.cpython-311-x86_64-linux-gnu.so", "c.abi3.so", "d.pyc", "x.y.py",
                 "__init__.py", "README.txt", "a.pyc"):
        (tmp_path / name).write_bytes(b"")
    for name in ("pkg", "nopkg", "__pycache__", "dot.ted"):
        (tmp_path / name).mkdir()
    (tmp_path / "pkg" / "__init__.py").write_bytes(b"")
    (tmp_path / "dot.ted" / "__init__.py").write_bytes(b"")
    monkeypatch.setattr(dmimage.cli, "__path__", [str(tmp_path), str(tmp_path / "missing")])
    assert cli_main._command_modules() == pkgutils() == ["a", "b", "c", "d", "pkg"]


@pytest.mark.parametrize("columns", ["57", "200", "0", "-3", "wide", None])
def test_help_width_is_shutils(monkeypatch: pytest.MonkeyPatch, columns: str | None) -> None:
    """The width cli/main.py gives argparse's formatters (so that shutil is not imported)
    is the one argparse would take from shutil.get_terminal_size()."""
    import shutil

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert cli_main._columns() == shutil.get_terminal_size().columns


#: command line (META: the pool) -> modules it must not import before it is done
UNNEEDED = {
    "check -q META": {"json", "dmimage.thin.dump", "dmimage.thin.pool"},
    "dump META": {"json", "dmimage.thin.dump.json", "dmimage.thin.dump.human",
                  "dmimage.thin.dump.xmlscan", "dmimage.thin.dump.fastxml"},
    "delta META --thin1 1 --thin2 2": {"json", "dmimage.thin.dump",
                                       "dmimage.thin.datarefs"},
    "ls META": {"json", "dmimage.thin.dump"},
}


@pytest.mark.parametrize("command", sorted(UNNEEDED))
def test_read_commands_import_only_what_they_run(command: str, thins3_meta) -> None:  # type: ignore[no-untyped-def]
    """The lazy imports of issue 11 stay lazy: an XML dump loads neither the JSON nor the
    human-readable emitter (nor json), check only loads json for --json, and none loads
    another command's module (a named command does not build the whole parser)."""
    argv = command.replace("META", str(thins3_meta.path)).split()
    code = ("import sys; from dmimage.cli.main import main; sys.stdout = open('/dev/null', 'w');"
            f" rc = main({argv!r}); sys.stdout = sys.__stdout__;"
            " print(rc, *sorted(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "0"
    mods = set(out[1:])
    assert f"dmimage.cli.{argv[0]}" in mods  # it did run
    assert not mods & UNNEEDED[command]
    others = {m for m in mods if m.startswith("dmimage.cli.") and
              not m.startswith("dmimage.cli._")} - {"dmimage.cli.main", f"dmimage.cli.{argv[0]}"}
    assert not others


def test_own_process_exit_finalizes_the_commands_garbage(thins3_meta) -> None:  # type: ignore[no-untyped-def]
    """main() in a process of its own freezes what is alive when the command is done, so the
    interpreter's exit does not traverse it again (cli/main.py: _exit_collected), but garbage
    the command left in a reference cycle is still finalized, as the exit would."""
    code = ("import gc, sys\n"
            "import dmimage.cli.main as m\n"
            "class Cycle:\n"
            "    def __del__(self): print('finalized', flush=True)\n"
            "run = m._run_locked\n"
            "def run_then_drop_a_cycle(args):\n"
            "    rc = run(args); c = Cycle(); c.me = c; del c; return rc\n"
            "m._run_locked = run_then_drop_a_cycle\n"
            f"sys.argv = ['dmimage', 'check', '-q', {str(thins3_meta.path)!r}]\n"
            "rc = m.main()\n"
            "print('frozen', gc.get_freeze_count() > 0, flush=True)\n"
            "sys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:2] == ["finalized", "frozen True"]
