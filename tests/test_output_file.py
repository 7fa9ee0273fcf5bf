"""Output files appear whole or not at all, and non-regular targets are never renamed over
(dmimage/output_file.py: dump/pack/export/lvm export/docker save/... write through it)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from dmimage.errors import DeviceError, UsageError
from dmimage.output_file import replaced_when_complete


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_new_file_appears_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "out.xml"
    with replaced_when_complete(out) as f:
        f.write(b"half")
        assert not out.exists()  # nothing under the final name yet
        f.write(b" and the rest")
    assert out.read_bytes() == b"half and the rest"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert leftovers(tmp_path) == []


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "out.xml"
    out.write_bytes(b"old")
    out.chmod(0o600)
    with pytest.raises(RuntimeError), replaced_when_complete(out) as f:
        f.write(b"new but broken")
        raise RuntimeError("the command failed half way")
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == []
    with replaced_when_complete(out) as f:
        f.write(b"new")
    assert out.read_bytes() == b"new"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # an existing file keeps its mode


def test_symlink_is_kept_and_its_file_replaced(tmp_path: Path) -> None:
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    with replaced_when_complete(link) as f:
        f.write(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_fifo_is_written_through_not_renamed_over(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    with replaced_when_complete(fifo) as f:
        assert not f.seekable()
        f.write(b"streamed")
    reader.join(10)
    assert got == [b"streamed"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the pipe, not a regular file


def test_block_device_is_refused_untouched(tmp_path: Path) -> None:
    node = tmp_path / "blk"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 200))
    except OSError as exc:
        pytest.skip(f"cannot make a block device node here: {exc.strerror}")
    with pytest.raises(UsageError, match="refusing to write onto a block device"), \
            replaced_when_complete(node):
        pass
    assert stat.S_ISBLK(os.lstat(node).st_mode)
    assert leftovers(tmp_path) == []


def test_unwritable_directory_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot create a file in"), \
            replaced_when_complete(tmp_path / "missing-dir" / "out"):
        pass


def test_repairs_refuse_their_input_as_output_by_any_name(tmp_path: Path) -> None:
    from dmimage.output_file import refuse_writing_input

    meta = tmp_path / "meta"
    meta.write_bytes(b"m")
    (tmp_path / "hard").hardlink_to(meta)
    (tmp_path / "soft").symlink_to(meta)
    for other in ("meta", "hard", "soft"):
        with pytest.raises(UsageError, match="never writes its input"):
            refuse_writing_input(meta, tmp_path / other)
    refuse_writing_input(meta, tmp_path / "new")  # not there yet: a different file
    (tmp_path / "copy").write_bytes(b"m")
    refuse_writing_input(meta, tmp_path / "copy")


def test_thin_repair_refuses_its_input(tmp_path: Path) -> None:
    from dmimage.cli.main import main

    meta = tmp_path / "meta"
    meta.write_bytes(bytes(4096 * 4))
    before = meta.read_bytes()
    assert main(["repair", "-i", str(meta), "-o", str(meta)]) == 2
    assert meta.read_bytes() == before


def test_widen_pipe_gives_a_pipe_a_megabyte_and_leaves_other_outputs_alone(tmp_path: Path) -> None:
    """dump's stdout: a pipe gets PIPE_BYTES of room (the system's limit allowing), a file,
    an in-memory stream or a closed pipe are left as they are, with no error."""
    import fcntl
    import io

    from dmimage.cli._output import PIPE_BYTES, widen_pipe

    r, w = os.pipe()
    try:
        before = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        with open(w, "wb", closefd=False) as out:
            widen_pipe(out)
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        want = PIPE_BYTES if (PIPE_BYTES <= limit or os.geteuid() == 0) else before
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == max(before, want)
    finally:
        os.close(r)
        os.close(w)
    with open(tmp_path / "f", "wb") as f:
        widen_pipe(f)
    widen_pipe(io.BytesIO())
    r, w = os.pipe()
    out = open(w, "wb")
    out.close()
    os.close(r)
    widen_pipe(out)  # closed: ValueError inside, swallowed


def test_streaming_commands_widen_their_stdout_pipe(tmp_path: Path, empty_pool_meta) -> None:
    """The dumps that stream long text to stdout (thin dump, cache dump; era dump takes the
    same call) leave the pipe they wrote to at PIPE_BYTES: read back from the pipe's other
    end once the process has exited. (The exports keep the pipe they are given: unmeasured,
    and tests/test_locking_lvm_docker.py holds an export mid-stream by its pipe.)"""
    import fcntl
    import random
    import subprocess
    import sys

    import restore_xml

    from dmimage.cli._output import PIPE_BYTES
    from dmimage.cli.main import main

    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    if PIPE_BYTES > limit and os.geteuid() != 0:
        pytest.skip("the system's pipe limit is below PIPE_BYTES")
    src = tmp_path / "c.xml"
    src.write_text(restore_xml.cache_xml(random.Random(1), 64, 0.5))
    cmeta = tmp_path / "cache.meta"
    cmeta.write_bytes(bytes(4 << 20))  # restore writes into an existing device or file
    assert main(["cache", "restore", "-i", str(src), "-o", str(cmeta)]) == 0
    for argv in (["dump", str(empty_pool_meta.path)], ["cache", "dump", str(cmeta)]):
        r, w = os.pipe()
        try:
            assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) < PIPE_BYTES
            proc = subprocess.run([sys.executable, "-m", "dmimage", *argv], stdout=w,
                                  stderr=subprocess.PIPE, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == PIPE_BYTES, argv
        finally:
            os.close(r)
            os.close(w)
