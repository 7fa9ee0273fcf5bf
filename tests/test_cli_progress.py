"""The CLI's one progress bar (dmimage/cli/_progress.py): drawn on stderr only when stderr is a
terminal and the command wants it, never on stdout (which may be the command's output)."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from typing import Any

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
    else:  # the volume's 256 KiB (content read, holes scanned) became the bar's total
        assert "build p" in drawn and "262.1/262.1 kB" in drawn and ETA.search(drawn), drawn


# -- the read, repair, pack and trim commands ---------------------------------------------

#: every threshold lowered, so a small pool is worth a bar (the defaults keep small tasks quiet)
LOWERED = ("MIN_MAPPINGS", "MIN_BLOCKS", "MIN_BYTES", "MIN_PACKED_BYTES", "MIN_RANGES",
           "MIN_DUMP_BYTES")


def _lower_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmimage.cli import _progress

    for name in LOWERED:
        monkeypatch.setattr(_progress, name, 1)


class _Stdout(io.TextIOWrapper):
    """A pipe-like stdout with the binary ``buffer`` the commands write to."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8")

    def output(self) -> bytes:
        self.flush()
        return self.buffer.getvalue()  # type: ignore[attr-defined, no-any-return]


def _commands(meta: Path, tmp: Path, data_bytes: int) -> dict[str, tuple[str, list[str]]]:
    """Each command with its bar's label and argv (outputs under ``tmp``)."""
    data = tmp / "data"
    if not data.exists():
        data.write_bytes(b"")
        os.truncate(data, data_bytes)
        (tmp / "repaired").write_bytes(bytes(8 << 20))
        (tmp / "unpacked").write_bytes(b"")
    pack = tmp / "pool.pack"
    if not pack.exists():
        assert main(["pack", str(meta), "-o", str(pack)]) == 0
    xml = tmp / "pool.xml"
    if not xml.exists():
        assert main(["dump", "-q", str(meta), "-o", str(xml)]) == 0
        (tmp / "restored").write_bytes(bytes(8 << 20))
    m = str(meta)
    return {
        "check": ("checking", ["check", m]),
        "check --auto-repair": ("checking", ["check", "--auto-repair", m]),
        "dump --repair": ("salvaging", ["dump", "--repair", m]),
        "restore": ("restoring", ["restore", "-i", str(xml), "-o", str(tmp / "restored")]),
        "dump": ("dumping", ["dump", m]),
        "ls": ("listing", ["ls", m, "-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS"]),
        "delta": ("comparing", ["delta", m, "--thin1", "1", "--thin2", "2"]),
        "rmap": ("mapping back", ["rmap", m, "--region", "0..1000000"]),
        "repair": ("repairing", ["repair", "-i", m, "-o", str(tmp / "repaired")]),
        "pack": ("packing", ["pack", m, "-o", str(tmp / "again.pack")]),
        "unpack": ("unpacking", ["unpack", "-i", str(pack), "-o", str(tmp / "unpacked")]),
        "trim": ("discarding", ["trim", m, str(data)]),
    }


#: a bar past its start: a percentage above 0, or some bytes done
ADVANCED = re.compile(r"(?<![\d.])([1-9]\d?|100)%|(?<![\d.])(0\.[1-9]|[1-9])[\d.]*/[\d.]+ [kM]?B")
COMMANDS = ["check", "check --auto-repair", "dump", "dump --repair", "ls", "delta", "rmap",
            "repair", "restore", "pack", "unpack", "trim"]


@pytest.fixture
def snapshot_pool(snapshot_meta: Any, tmp_path: Path) -> tuple[Path, int]:
    """A private copy of the snapshot pool (devices share leaves) and its data size."""
    from dmimage.thin.pool import open_pool

    meta = snapshot_meta.copy_to(tmp_path / "pool.meta")
    with open_pool(meta) as pool:
        sb = pool.live_superblock
        assert {1, 2} <= set(pool.devices())
        return meta, sb.nr_data_blocks * sb.data_block_size * 512


@pytest.mark.parametrize("command", COMMANDS)
def test_command_draws_on_a_terminal_and_leaves_stdout_alone(
        command: str, snapshot_pool: tuple[Path, int], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With stderr a terminal: the command's bar (label, percentage or bytes, time left) on
    stderr, and stdout byte for byte what the same command writes with stderr piped."""
    meta, data_bytes = snapshot_pool
    label, argv = _commands(meta, tmp_path, data_bytes)[command]
    piped = _Stdout()
    monkeypatch.setattr(sys, "stdout", piped)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    _lower_thresholds(monkeypatch)
    assert main(argv) == 0
    want, piped_err = piped.output(), sys.stderr.getvalue()
    assert label not in piped_err and "\x1b" not in piped_err

    err, _ = use_terminal(monkeypatch)
    out = _Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(argv) == 0
    drawn = err.getvalue()
    assert label in drawn and ETA.search(drawn), drawn
    assert ADVANCED.search(drawn), drawn  # the bar moved: work was reported as it was done
    assert out.output() == want


@pytest.mark.parametrize("command", COMMANDS)
def test_command_quiet_draws_nothing(command: str, snapshot_pool: tuple[Path, int],
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta, data_bytes = snapshot_pool
    label, argv = _commands(meta, tmp_path, data_bytes)[command]
    _lower_thresholds(monkeypatch)
    err, _ = use_terminal(monkeypatch)
    monkeypatch.setattr(sys, "stdout", _Stdout())
    assert main(argv + ["-q"]) == 0
    assert label not in err.getvalue() and "\x1b" not in err.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", ["check", "ls", "dump"])
def test_small_task_draws_nothing_by_default(command: str, snapshot_pool: tuple[Path, int],
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The default thresholds: a pool of a few hundred mappings ends long before a bar
    would help, so none is drawn even on a terminal."""
    meta, data_bytes = snapshot_pool
    label, argv = _commands(meta, tmp_path, data_bytes)[command]
    err, _ = use_terminal(monkeypatch)
    monkeypatch.setattr(sys, "stdout", _Stdout())
    assert main(argv) == 0
    assert label not in err.getvalue(), err.getvalue()


def test_bar_waits_for_a_total_worth_drawing(monkeypatch: pytest.MonkeyPatch) -> None:
    err, _ = use_terminal(monkeypatch)
    with progress_bar("small", unit="items", min_total=100) as advance:
        advance(5)
        advance.set_total(50)
        advance(45)
    assert err.getvalue() == ""
    with progress_bar("large", unit="items", min_total=100) as advance:
        advance(60)  # reported before the total was known: counted once it is
        advance.set_total(200)
        advance(40)
    drawn = err.getvalue()
    assert "large" in drawn and "50%" in drawn, drawn


def _pty_run(argv: list[str], *, quiet: bool = False) -> tuple[int, bytes, bytes]:
    """Run ``python -m dmimage argv`` with stderr on a pseudo-terminal (100 columns) and
    stdout on a pipe; (exit code, what reached the terminal, stdout)."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items()
           if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env["TERM"] = "xterm"
    proc = subprocess.Popen([sys.executable, "-m", "dmimage", *argv, *(["-q"] if quiet else [])],
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    drawn = bytearray()
    assert proc.stdout is not None
    out = bytearray()
    streams = [master, proc.stdout.fileno()]
    while streams:
        ready, _, _ = select.select(streams, [], [], 60)
        assert ready, "no output for 60 s"
        for fd in ready:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:  # EIO: the terminal's last writer is gone
                chunk = b""
            if not chunk:
                streams.remove(fd)
            elif fd == master:
                drawn += chunk
            else:
                out += chunk
    os.close(master)
    return proc.wait(timeout=60), bytes(drawn), bytes(out)


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory: pytest.TempPathFactory, tools11: Any) -> Path:
    """One thin of 250,000 mappings (above the default threshold), restored by thin_restore 1.1
    from one range mapping."""
    import numpy as np

    import oracles
    import poolgen

    n = 250_000
    m = np.stack([np.arange(n), np.arange(n), np.zeros(n)], axis=1).astype(np.uint64)
    pool = poolgen.Pool(nr_data_blocks=n, devices=[poolgen.Device(1, mappings=m)])
    path = tmp_path_factory.mktemp("big") / "pool.meta"
    oracles.restore(poolgen.to_xml(pool), path, tools11,
                    oracles.nr_meta_blocks_for(n, 1, n))
    return path


def test_real_terminal_shows_the_check_bar(big_pool: Path) -> None:
    """A real pseudo-terminal as stderr, the default thresholds: `dmimage check` draws its
    bar (label, percentage, time left) there; stdout carries only the report."""
    rc, drawn, out = _pty_run(["check", str(big_pool)])
    text = drawn.decode(errors="replace")
    assert rc == 0, text
    assert "checking" in text and "%" in text and ETA.search(text), text
    assert out.startswith(b"TRANSACTION_ID=") and b"checking" not in out


def test_real_terminal_quiet_and_pipe_draw_nothing(big_pool: Path) -> None:
    import subprocess

    rc, drawn, out = _pty_run(["check", str(big_pool)], quiet=True)
    assert rc == 0 and drawn == b"" and out == b""
    res = subprocess.run([sys.executable, "-m", "dmimage", "check", str(big_pool)],
                         capture_output=True, env=dict(os.environ, TERM="xterm"), check=False)
    assert res.returncode == 0 and res.stderr == b"", res.stderr


# -- tasks of several passes ----------------------------------------------------------------


class _Recorder:
    """A Progress that records its totals and the units done."""

    def __init__(self) -> None:
        self.totals: list[int] = []
        self.done = 0

    def __call__(self, n: int) -> None:
        self.done += n

    def set_total(self, total: int) -> None:
        self.totals.append(total)


def test_phases_extend_the_total() -> None:
    from dmimage.progress import Phases

    rec = _Recorder()
    p = Phases(rec)
    p.set_total(10)
    p(4)
    p(6)
    p.next_pass()
    p.set_total(5)
    p(5)
    assert rec.totals == [10, 15] and rec.done == 15


def test_auto_repair_reports_the_check_before_and_after(thins3_meta: Any,
                                                        tmp_path: Path) -> None:
    """A leak is fixed by a write, then checked again: one task of two passes, each the
    pool's mappings (thins3's own count, from the fixture's pool)."""
    from dmimage.thin.fix import fix_in_place

    import damage

    d = damage.leaked_block(thins3_meta.read(), 1)
    p = tmp_path / "leak.meta"
    p.write_bytes(d.data)
    rec = _Recorder()
    fixed = fix_in_place(p, auto_repair=True, progress=rec)
    assert fixed.written and fixed.after.ok()
    n = thins3_meta.pool.nr_mappings
    assert rec.totals == [n, 2 * n] and rec.done == 2 * n


def test_salvage_reports_the_scan_then_the_walk(thins3_meta: Any, tmp_path: Path) -> None:
    """A superblock with a bad checksum: roots are found by scanning (the blocks classified),
    then the devices are walked; repair then writes them: three passes of one task."""
    from dmimage.thin.repair import Overrides, repair

    data = bytearray(thins3_meta.read())
    data[200] ^= 0xFF  # in the superblock's space map roots: the checksum no longer matches
    p = tmp_path / "bad.meta"
    p.write_bytes(bytes(data))
    out = tmp_path / "out.meta"
    out.write_bytes(bytes(8 << 20))
    rec = _Recorder()
    res = repair(p, out, Overrides(data_block_size=thins3_meta.pool.data_block_size),
                 progress=rec)
    n = res.report.nr_mappings
    assert res.report.source == "scan" and n == thins3_meta.pool.nr_mappings
    scanned = rec.totals[0]
    assert len(rec.totals) == 3 and 0 < scanned <= os.path.getsize(p) // 4096
    assert rec.totals[1] - scanned >= n and rec.totals[2] - rec.totals[1] == n
    assert rec.done == rec.totals[2]
