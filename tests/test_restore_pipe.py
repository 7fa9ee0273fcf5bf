"""`dmimage restore -i <(thin_dump META)` and `thin_dump META | dmimage restore -i /dev/stdin`:
an input that cannot seek restores exactly as the same bytes in a regular file do, on the
streamed path and on the whole-IR path it falls back to (thin/dump/source.py keeps what it
reads). thin_restore 1.1 itself refuses a pipe ("Not a block device or regular file").
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dmimage.cli.main import main
from dmimage.thin.dump.source import open_dump

import oracles


@contextmanager
def fifo_of(tmp_path: Path, data: bytes) -> Iterator[Path]:
    """A named pipe that a thread fills with ``data`` (in pieces, as a producer would)."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        try:
            with open(fifo, "wb") as f:
                for i in range(0, len(data), 50_000):
                    f.write(data[i:i + 50_000])
        except BrokenPipeError:
            pass  # the reader gave up early (a bad input): nothing more to give

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        yield fifo
    finally:
        if t.is_alive():  # never opened for reading: unblock the writer's open()
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            t.join(10)
            os.close(fd)
        t.join(10)
        fifo.unlink()


def restore_via(tmp_path: Path, data: bytes, capsys: pytest.CaptureFixture[str],
                nr_blocks: int = 2048) -> tuple[int, str, Path, Path]:
    """Restore ``data`` from a regular file and from a pipe: (rc, stderr) of each, which
    must agree (the file's name replaced by the pipe's), and the two outputs."""
    src = tmp_path / "in.xml"
    src.write_bytes(data)
    from_file = oracles.make_sparse(tmp_path / "file.meta", nr_blocks)
    from_pipe = oracles.make_sparse(tmp_path / "pipe.meta", nr_blocks)
    rc = main(["restore", "-q", "-i", str(src), "-o", str(from_file)])
    err = capsys.readouterr().err
    with fifo_of(tmp_path, data) as fifo:
        rc_pipe = main_within(["restore", "-q", "-i", str(fifo), "-o", str(from_pipe)], fifo)
        err_pipe = capsys.readouterr().err
        assert (rc_pipe, err_pipe) == (rc, err.replace(str(src), str(fifo)))
    return rc, err, from_file, from_pipe


def main_within(argv: list[str], fifo: Path, timeout: float = 120) -> int:
    """main(argv) on a thread: a reader that opens the pipe again after its writer is gone
    (as restore once did) would wait forever; it fails the test instead."""
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(main(argv)), daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # its open() returns: EOF
        t.join(timeout)
        pytest.fail(f"restore from a pipe did not finish in {timeout:.0f} s (opened it again?)")
    return out[0]


@pytest.mark.parametrize("fixture", ["snapshot_meta", "multilevel_meta", "thins3_meta"])
def test_thin_dump_11_output_restores_from_a_pipe(fixture, request, tmp_path, capsys, tools11):
    """thin_dump 1.1's own output (defs and refs for the snapshot pool, a 2-level tree):
    through a pipe, the metadata written is byte for byte the file's, and thin_dump 1.1 of
    it is the input again."""
    meta = request.getfixturevalue(fixture)
    xml = oracles.dump(meta.path, tools11)
    rc, err, from_file, from_pipe = restore_via(tmp_path, xml.encode(), capsys)
    assert (rc, err) == (0, "")
    assert filecmp.cmp(from_file, from_pipe, shallow=False)
    assert oracles.dump(from_pipe, tools11) == xml


@pytest.mark.parametrize("case", ["reflowed", "json", "bad-count", "truncated", "not-a-dump",
                                  "empty"])
def test_pipe_input_taking_the_whole_ir_path(case, tmp_path, capsys, tools11, snapshot_meta):
    """Inputs the streamed path hands to the whole-IR path (another layout, JSON, damage,
    nothing): read again from what the pipe gave, with the file's result and message."""
    xml = oracles.dump(snapshot_meta.path, tools11)
    if case == "reflowed":  # not thin_dump's layout: expat parses it
        data = " ".join(line.strip() for line in xml.splitlines()).encode()
    elif case == "json":
        rc = main(["dump", "--format", "json", str(snapshot_meta.path), "-o",
                   str(tmp_path / "d.json")])
        assert rc == 0
        data = (tmp_path / "d.json").read_bytes()
    elif case == "bad-count":
        data = xml.replace('mapped_blocks="', 'mapped_blocks="1', 1).encode()
    elif case == "truncated":
        data = xml[:len(xml) * 2 // 3].encode()
    elif case == "not-a-dump":
        data = b"\n  hello\n"
    else:
        data = b""
    rc, err, from_file, from_pipe = restore_via(tmp_path, data, capsys)
    if case in ("reflowed", "json"):
        assert (rc, err) == (0, "")
        assert filecmp.cmp(from_file, from_pipe, shallow=False)
        assert oracles.dump(from_pipe, tools11) == xml
    else:
        assert rc == 1 and err.startswith("dmimage restore: "), err
        assert from_pipe.read_bytes() == bytes(len(from_pipe.read_bytes()))  # nothing written


def test_thin_dump_piped_into_restore_stdin(tmp_path, tools11, multilevel_meta):
    """The command line users type: `thin_dump META | dmimage restore -i /dev/stdin -o OUT`."""
    out = oracles.make_sparse(tmp_path / "out.meta", 2048)
    dump = subprocess.Popen([str(tools11.thin_dump), str(multilevel_meta.path)],
                            stdout=subprocess.PIPE)
    try:
        got = subprocess.run([sys.executable, "-m", "dmimage", "restore", "-q", "-i",
                              "/dev/stdin", "-o", str(out)], stdin=dump.stdout,
                             capture_output=True, text=True, timeout=120)
    finally:
        assert dump.stdout is not None
        dump.stdout.close()
        assert dump.wait(60) == 0
    assert (got.returncode, got.stderr) == (0, "")
    assert oracles.dump(out, tools11) == oracles.dump(multilevel_meta.path, tools11)


def test_open_dump_replays_a_pipe(tmp_path):
    """open_dump of a pipe: reads, seeks back and forward (past what was read, which reads
    on), and reading to the end, give the pipe's bytes; a regular file is opened as is."""
    data = bytes(range(256)) * 3000
    with fifo_of(tmp_path, data) as fifo:
        with open_dump(fifo) as f:
            assert f.seekable() and f.name == str(fifo)
            assert f.read(10) == data[:10]
            f.seek(0)
            assert f.read(5) == data[:5]
            f.seek(400_000)
            assert f.tell() == 400_000
            assert f.read(100) == data[400_000:400_100]
            f.seek(3)
            assert f.read() == data[3:]
            f.seek(0)
            assert f.read() == data
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    with open_dump(plain) as f:
        assert type(f.raw).__name__ == "FileIO"  # type: ignore[attr-defined]
