"""The CLI's one progress bar (dmimage/cli/_progress.py): drawn on stderr only when stderr is a
terminal and the command wants it, never on stdout (which may be the command's output)."""

from __future__ import annotations

import io
import sys

import pytest

from dmimage.cli._progress import progress_bar


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
