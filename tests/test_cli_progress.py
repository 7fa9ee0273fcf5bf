"""The CLI's one progress bar (dmimage/cli/_progress.py): drawn on stderr only when stderr is a
terminal and the command wants it, never on stdout (which may be the command's output)."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest

from dmimage.cli._progress import progress_bar
from dmimage.cli.main import main

BS = 128 * 512


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def use_terminal(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeTerminal, io.StringIO]:
    """A terminal as sys.stderr and a pipe as sys.stdout. Called in the test body: pytest's
    own capture re-installs its streams when the test call starts, after the fixtures."""
    monkeypatch.setenv("TERM", "xterm")  # rich draws nothing on a dumb terminal
    for var in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    err, out = FakeTerminal(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    return err, out


def test_silent_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()
    for unit in ("bytes", "items"):
        with progress_bar("exporting", 10, unit=unit) as advance:
            advance(4)
            advance(6)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("unit,shows", [("bytes", "10 bytes"), ("items", "100%")])
def test_drawn_on_a_terminal_stderr_only(unit: str, shows: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    err, out = use_terminal(monkeypatch)
    with progress_bar("restoring", 10, unit=unit) as advance:  # type: ignore[arg-type]
        advance(4)
        advance(6)
    drawn = err.getvalue()
    assert "restoring" in drawn and shows in drawn
    assert out.getvalue() == ""


def test_disabled_draws_nothing_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err, out = use_terminal(monkeypatch)
    with progress_bar("restoring", 10, unit="items", enabled=False) as advance:
        advance(10)
    assert err.getvalue() == out.getvalue() == ""


ETA = re.compile(r"\d+:\d\d:\d\d|-:--:--")


@pytest.mark.parametrize("unit", ["bytes", "items"])
def test_shows_time_left(unit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    err, _ = use_terminal(monkeypatch)
    with progress_bar("working", 10, unit=unit) as advance:  # type: ignore[arg-type]
        advance(10)
    assert ETA.search(err.getvalue()), err.getvalue()


def test_total_learnt_later(monkeypatch: pytest.MonkeyPatch) -> None:
    err, _ = use_terminal(monkeypatch)
    with progress_bar("build", None) as advance:
        advance.set_total(2048)
        advance(2048)
    assert "2.0/2.0 kB" in err.getvalue(), err.getvalue()


def _pool(tmp_path: Path) -> tuple[Path, Path, Path]:
    meta, data, src = tmp_path / "m", tmp_path / "d", tmp_path / "src"
    meta.write_bytes(bytes(4 << 20))
    data.write_bytes(b"")
    os.truncate(data, 64 * BS)
    assert main(["format", "--data-block-size", "128", "--nr-data-blocks", "64", str(meta)]) == 0
    assert main(["message", str(meta), "create_thin 1"]) == 0
    src.write_bytes(os.urandom(3 * BS + 5))
    return meta, data, src


@pytest.mark.parametrize("quiet", [False, True])
def test_write_command_draws_unless_quiet(quiet: bool, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    meta, data, src = _pool(tmp_path)
    err, out = use_terminal(monkeypatch)
    argv = ["write", str(meta), str(data), "--dev-id", "1", "-i", str(src)]
    assert main(argv + (["-q"] if quiet else [])) == 0
    drawn = err.getvalue()
    if quiet:
        assert drawn == ""
    else:
        assert "write" in drawn and "196.6 kB" in drawn and ETA.search(drawn), drawn
    assert out.getvalue() == ""


def test_write_command_silent_when_piped(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    meta, data, src = _pool(tmp_path)
    assert main(["write", str(meta), str(data), "--dev-id", "1", "-i", str(src)]) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("quiet", [False, True])
def test_build_command_total_and_quiet(quiet: bool, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.img").write_bytes(os.urandom(3 * BS))
    spec = tmp_path / "s.toml"
    spec.write_text('name = "p"\nlayout = "files"\n[pool]\ndata_size = "1MiB"\n'
                    '[[volumes]]\nname = "a"\nid = 1\nsize = "256KiB"\ncontent = "a.img"\n')
    err, _ = use_terminal(monkeypatch)
    argv = ["build", str(spec), "-o", str(tmp_path / "out")]
    assert main(argv + (["-q"] if quiet else [])) == 0
    drawn = err.getvalue()
    if quiet:
        assert drawn == ""
    else:  # the planned bytes became the bar's total
        assert "build p" in drawn and "196.6/196.6 kB" in drawn and ETA.search(drawn), drawn
