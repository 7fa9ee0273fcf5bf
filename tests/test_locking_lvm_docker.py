"""Locks of `dmimage lvm` and `dmimage docker` (docs/locking.md): lvm writers hold every DISK
exclusively, lvm and docker readers hold their files shared, for the whole run. Real
dmimage processes, as in test_locking.py (the concurrent writers forked from one warm
interpreter); the LVM fixture is test_lvm.py's two-PV VG (its pool metadata written by
thin_restore)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_docker_store import make_store
from test_locking import DMIMAGE, _hold, _release, _shells
from test_lvm_cli import needs_tools

from cli_run import run_cli
from test_lvm import build, scenario_text


def _digest(*paths: str) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def _lvm(*argv: str) -> tuple[int, str, str]:
    """``dmimage lvm ARGV`` in this process (cli_run), for reads once no other process holds
    a lock: the commands under test, and every lock contest, stay real processes."""
    r = run_cli("lvm", *argv)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def _seqno(disks: list[str]) -> int:
    rc, out, err = _lvm("metadata", *disks)
    assert rc == 0, err
    m = re.search(r"^\s*seqno = (\d+)$", out, re.M)
    assert m, out[:500]
    return int(m.group(1))


@needs_tools
def test_lvm_writer_times_out_naming_the_holder(tmp_path: Path) -> None:
    sc = build(tmp_path, text=scenario_text(tid=5))
    before = _digest(*sc.disks)
    # The second PV only: a writer must lock every DISK, not just the first.
    holder = _hold(Path(sc.disk_b))
    try:
        for cmd in (["set-transaction-id"], ["set-transaction-id", "--side", "pool"],
                    ["delete-orphans"]):
            t0 = time.monotonic()
            r = subprocess.run([DMIMAGE, "lvm", *cmd, *sc.disks, "vg0/pool",
                                "--lock-timeout", "0.5"], capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, (cmd, r.stdout, r.stderr)
            last = r.stderr.strip().splitlines()[-1]
            assert last.startswith("dmimage lvm: ") or last.startswith("dmimage: "), last
            assert sc.disk_b in last and f"pid {holder.pid}" in last, r.stderr
            assert "--lock-timeout" in last, last
            assert time.monotonic() - t0 >= 0.5
        # readers wait for a writer's (exclusive) lock too
        r = subprocess.run([DMIMAGE, "lvm", "ls", *sc.disks, "--lock-timeout", "0"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr, r.stderr
    finally:
        _release(holder)
    assert _digest(*sc.disks) == before


@needs_tools
def test_lvm_writer_waits_then_commits(tmp_path: Path) -> None:
    sc = build(tmp_path, text=scenario_text(tid=5))
    before = _digest(*sc.disks)
    holder = _hold(Path(sc.disk_a))
    try:
        w = subprocess.Popen([DMIMAGE, "lvm", "set-transaction-id", *sc.disks, "vg0/pool"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert w.stderr is not None
        line = w.stderr.readline()
        assert "waiting for the exclusive lock, held by" in line, line
        assert f"pid {holder.pid}" in line, line
        time.sleep(0.3)
        assert w.poll() is None, "the writer did not wait"
        assert _digest(*sc.disks) == before  # (a reader would wait for the holder too)
    finally:
        _release(holder)
    out, err = w.communicate(timeout=120)
    assert w.returncode == 0 and err == "", err
    assert "seqno 7 -> 8" in out
    assert _seqno(sc.disks) == 8


@needs_tools
def test_concurrent_lvm_writers_lose_no_generation(tmp_path: Path) -> None:
    """K writers at once, each setting another transaction_id: each must commit one new
    generation on top of the previous one (seqnos 8..7+K, each exactly once). Measured with
    devlock.acquire patched to a no-op (as test_locking's unlocked run does), 6 writers: 2 of them
    exited 1 (the stale-VG refusal in lvm/commit.py caught them), so this test fails."""
    sc = build(tmp_path, text=scenario_text(tid=5))
    k = 6
    # all at once, each a dmimage process forked from one warm interpreter (test_locking)
    outs = [tmp_path / f"writer{i}.out" for i in range(k)]
    results = _shells(tmp_path / "shells", [
        {"cmds": [[["lvm", "set-transaction-id", *sc.disks, "vg0/pool", "--to", str(100 + i)],
                   str(outs[i])]]} for i in range(k)],
        preload=["dmimage.lvm.fix", "dmimage.lvm.report", "dmimage.lvm.vg"])
    news = []
    values = {}
    for i, r in enumerate(results):
        assert r.returncode == 0, r.stderr
        for line in r.stderr.splitlines():
            assert "waiting for the exclusive lock, held by" in line, line
        out = outs[i].read_text()
        m = re.search(r"transaction_id (\d+) -> (\d+) \(seqno (\d+) -> (\d+);", out)
        assert m and int(m.group(2)) == 100 + i, out
        news.append(int(m.group(4)))
        values[int(m.group(4))] = (int(m.group(1)), int(m.group(2)))
    assert sorted(news) == list(range(8, 8 + k))
    # Each writer saw the value the previous generation committed: a chain, no lost link.
    prev = 5
    for s in range(8, 8 + k):
        old, new = values[s]
        assert old == prev, (s, values)
        prev = new
    assert _seqno(sc.disks) == 7 + k
    rc, out, err = _lvm("metadata", *sc.disks)
    assert rc == 0 and f"transaction_id = {prev}" in out, err
    # Both PVs' metadata areas carry the newest generation: check names no stale copy.
    rc, out, err = _lvm("check", *sc.disks)
    assert "seqno" not in err, err


@needs_tools
def test_lvm_reader_holds_a_shared_lock_while_it_runs(tmp_path: Path) -> None:
    """`lvm export -o -` into a pipe nobody reads stalls mid-run; meanwhile a writer is kept
    out (naming the reader) and another reader gets in."""
    sc = build(tmp_path, text=scenario_text(tid=5))
    before = _digest(*sc.disks)
    reader = subprocess.Popen([DMIMAGE, "lvm", "export", *sc.disks, "vg0/lin", "-o", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert reader.stdout is not None
        first = reader.stdout.read(4096)  # it has started, and it stalls on the full pipe
        assert len(first) == 4096
        r = subprocess.run([DMIMAGE, "lvm", "set-transaction-id", *sc.disks, "vg0/pool",
                            "--lock-timeout", "0.3"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stdout
        assert f"pid {reader.pid} (dmimage lvm export" in r.stderr, r.stderr
        assert _digest(*sc.disks) == before
        r = subprocess.run([DMIMAGE, "lvm", "check", "-q", *sc.disks, "--lock-timeout", "0"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr == "", r.stderr  # mismatch found, not locked
    finally:
        rest, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0
    assert len(first + rest) > 4096
    r = subprocess.run([DMIMAGE, "lvm", "set-transaction-id", *sc.disks, "vg0/pool",
                        "--lock-timeout", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_docker_reader_holds_the_pool_files_shared(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = make_store(tmp_path / "root", capsys)
    meta = root / "devicemapper/devicemapper/metadata"
    data = root / "devicemapper/devicemapper/data"
    reader = subprocess.Popen([DMIMAGE, "docker", "export", str(root), "img:1", "-o", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert reader.stdout is not None
        first = reader.stdout.read(4096)
        assert len(first) == 4096
        # a metadata writer and a data writer are both kept out, naming the reader
        for argv in (["message", str(meta), "create_thin 9"],
                     ["discard", str(meta), str(data), "--dev-id", "2", "--offset", "0",
                      "--length", "65536"]):
            r = subprocess.run([DMIMAGE, *argv, "--lock-timeout", "0.2"],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, (argv, r.stdout)
            assert f"pid {reader.pid} (dmimage docker export" in r.stderr, r.stderr
    finally:
        rest, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0 and len(first + rest) == 1 << 20


def test_docker_waits_for_a_writer(tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = make_store(tmp_path / "root", capsys)
    for name in ("metadata", "data"):
        holder = _hold(root / "devicemapper/devicemapper" / name)
        try:
            for cmd in (["ls"], ["check"], ["export", "-o", str(tmp_path / "x"), "img:1"],
                        ["save", "-o", str(tmp_path / "x.tar"), "img:1"]):
                r = subprocess.run([DMIMAGE, "docker", cmd[0], str(root), *cmd[1:],
                                    "--lock-timeout", "0"], capture_output=True, text=True, timeout=120)
                assert r.returncode == 2, (name, cmd, r.stdout)
                assert f"{name}: locked by pid {holder.pid}" in r.stderr, r.stderr
        finally:
            _release(holder)
    r = subprocess.run([DMIMAGE, "docker", "ls", str(root), "--lock-timeout", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@needs_tools
def test_library_writer_locks_and_refuses_a_stale_vg(tmp_path: Path) -> None:
    """An API caller's LoadedVG, read before another writer committed: the library writer
    takes the PV locks itself (waiting for a holder) and then refuses the stale VG."""
    from dmimage import devlock
    from dmimage.errors import LockTimeout, MetadataError
    from dmimage.lvm.fix import set_transaction_id
    from dmimage.lvm.vg import load_vgs

    sc = build(tmp_path, text=scenario_text(tid=5))
    (lvg,), _, _ = load_vgs(sc.disks)
    pool = lvg.vg.lv("pool")
    assert pool is not None
    holder = _hold(Path(sc.disk_b))
    try:
        with devlock.policy(timeout=0.2), pytest.raises(LockTimeout, match=f"pid {holder.pid}"):
            set_transaction_id(lvg, pool, side="vg", to=None, dry_run=False)
    finally:
        _release(holder)
    r = subprocess.run([DMIMAGE, "lvm", "set-transaction-id", *sc.disks, "vg0/pool"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    after = _digest(*sc.disks)
    with pytest.raises(MetadataError, match="changed since the VG was read"):
        set_transaction_id(lvg, pool, side="vg", to=9, dry_run=False)
    assert _digest(*sc.disks) == after
    assert devlock.held() == {}
