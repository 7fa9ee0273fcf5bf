"""The shell that puts build's scripts into the guest (image/guest.py ``_put_files``), run by
the host's sh: each file arrives with its exact text, also one whose last line lacks a newline
(else the end marker joins that line, the here-document never ends and swallows the rest)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dmimage.image import guest


def test_files_arrive_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "GUEST_DIR", str(tmp_path / "g"))
    files = {str(tmp_path / "g" / "a.sh"): "echo a\n", str(tmp_path / "g" / "b.sh"): "echo b"}
    script = guest._put_files(files) + "echo after\n"
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "after\n"  # the commands after the files still run
    assert (tmp_path / "g" / "a.sh").read_text() == "echo a\n"
    assert (tmp_path / "g" / "b.sh").read_text() == "echo b\n"
    assert (tmp_path / "g" / "b.sh").stat().st_mode & 0o777 == 0o755
