"""Tests of the QEMU harness itself: appliance, agent, hot-plug, faults, a thin-pool smoke test.

One boot per kernel for the shared ``dm_vm``; the fault tests boot their own short-lived
machine (deb12 only).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dmimage.guest.agent import (
    DUMP_BEGIN,
    DUMP_END,
    CommandResult,
    check_kernel_log,
    find_kernel_problems,
)
from dmimage.guest.appliance import DIAG_SCRIPT, CpioWriter, resolve_modules
from dmimage.guest.dmstatus import parse_pool_status, parse_thin_status
from dmimage.guest.errors import (
    GuestCommandError,
    GuestTimeout,
    KernelProblem,
    MachineDied,
)
from dmimage.guest.kernels import Kernel
from dmimage.guest.machine import Machine
from dmimage.guest.pytest_plugin import DiskFactory, unavailable

# --------------------------------------------------------------------------------------------
# No VM needed


def _sample_cpio() -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_dir("d")
    w.add_file("d/f", b"hello\x00\xff" * 3, 0o640)
    w.add_file("empty", b"")
    w.add_file("odd-name-length.bin", bytes(range(256)))
    w.add_symlink("d/link", "/d/f")
    w.add_chardev("console", 5, 1)
    w.close()
    return buf.getvalue()


@pytest.mark.parametrize("tool", [["cpio"], ["busybox", "cpio"]])
def test_cpio_writer_round_trip(tool: list[str], tmp_path: Path) -> None:
    if shutil.which(tool[0]) is None:
        unavailable(f"{tool[0]} not installed")
    data = _sample_cpio()
    assert len(data) % 4 == 0
    listing = subprocess.run(tool + ["-t"], input=data, capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert names == ["d", "d/f", "empty", "odd-name-length.bin", "d/link", "console"]
    # Extract regular files and the symlink (device nodes skipped: works without root).
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(tool + ["-i", "-d", "d/f", "d/link", "empty", "odd-name-length.bin"],
                   input=data, cwd=out, capture_output=True, check=True)
    assert (out / "d/f").read_bytes() == b"hello\x00\xff" * 3
    assert (out / "empty").read_bytes() == b""
    assert (out / "odd-name-length.bin").read_bytes() == bytes(range(256))
    assert os.readlink(out / "d/link") == "/d/f"
    assert (out / "d/f").stat().st_mode & 0o777 == 0o640


def test_cpio_writer_is_deterministic() -> None:
    assert _sample_cpio() == _sample_cpio()


def test_appliance_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmimage.guest.appliance import ApplianceError, build_initramfs
    from dmimage.guest.kernels import KernelNotFound, debian12

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        kernel = debian12()
        app = build_initramfs(kernel.moddir, compress=True)
    except (KernelNotFound, ApplianceError) as exc:
        unavailable(str(exc))
    assert app.path.is_relative_to(tmp_path / "dmimage" / "appliance")
    assert build_initramfs(kernel.moddir, compress=True).path == app.path  # cached
    listing = subprocess.run(["cpio", "-t"], input=gzip.decompress(app.path.read_bytes()),
                             capture_output=True, check=True).stdout.decode().split()
    for name in ("init", "agent", "bin/busybox", "bin/sh", "sbin/dmsetup", "dev/console",
                 "lib/modules/dm-thin-pool.ko", "etc/modules.order"):
        assert name in listing
    assert any(n.startswith("lib64/ld-linux") for n in listing)
    assert app.modules.index("dm-mod.ko") < app.modules.index("dm-thin-pool.ko")


def test_checkout_bytecode_goes_where_the_guest_reads_it(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """compile_checkout writes the guest's bytecode into the checkout's ``__pycache__``, not
    into this process's ``sys.pycache_prefix`` (the guest knows no prefix), and leaves that
    prefix in place."""
    import importlib.util

    from vmtests.guest_cli import CHECKOUT, compile_checkout

    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "prefix"))
    compile_checkout()
    assert sys.pycache_prefix == str(tmp_path / "prefix")
    assert not (tmp_path / "prefix").exists()
    monkeypatch.setattr(sys, "pycache_prefix", None)
    for mod in ("__init__.py", "cli/main.py", "guest/agent.py"):
        assert Path(importlib.util.cache_from_source(str(CHECKOUT / "dmimage" / mod))).exists()


def test_module_signatures_are_stripped(tmp_path: Path) -> None:
    """The appliance's modules lose exactly their appended signature (the kernel then skips
    the verification a TCG boot paid for); kmod's modinfo, the oracle, sees a signed module
    before and an unsigned one after, with the same name and vermagic."""
    from dmimage.guest.appliance import MODULE_SIG_MAGIC, strip_signature
    from dmimage.guest.kernels import KernelNotFound, debian12

    body = b"\x7fELF" + bytes(range(256)) * 3
    sig = os.urandom(300)
    info = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + len(sig).to_bytes(4, "big")  # PKCS#7, 300 bytes
    assert strip_signature(body + sig + info + MODULE_SIG_MAGIC) == body
    assert strip_signature(body) == body  # unsigned: unchanged
    if shutil.which("modinfo") is None:
        unavailable("modinfo (kmod) not installed")
    try:
        moddir = debian12().moddir
    except KernelNotFound as exc:
        unavailable(str(exc))
    signed = next(moddir.rglob("dm-thin-pool.ko*"))
    from dmimage.guest.appliance import read_module

    raw = read_module(signed)
    assert raw.endswith(MODULE_SIG_MAGIC)
    (tmp_path / "signed.ko").write_bytes(raw)
    (tmp_path / "plain.ko").write_bytes(strip_signature(raw))

    def modinfo(name: str) -> dict[str, str]:
        out = subprocess.run(["modinfo", str(tmp_path / name)], capture_output=True,
                             text=True, check=True).stdout
        return {k.strip(): v.strip() for k, _, v in
                (ln.partition(":") for ln in out.splitlines()) if not k.startswith(" ")}

    before, after = modinfo("signed.ko"), modinfo("plain.ko")
    assert "sig_id" in before and "sig_id" not in after and "signer" not in after
    assert (after["name"], after["vermagic"]) == (before["name"], before["vermagic"])


def test_cli_disk_spec() -> None:
    from dmimage.cli.vm import _parse_disk

    assert _parse_disk("a.img") == ("a.img", False)
    assert _parse_disk("a.img:ro") == ("a.img", True)
    assert _parse_disk("/x:y/a.img:rw") == ("/x:y/a.img", False)
    assert _parse_disk("/x:y/a.img") == ("/x:y/a.img", False)


def test_module_order_from_modules_dep(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/a.ko.xz: kernel/b.ko.xz kernel/c.ko.xz\n"
        "kernel/b.ko.xz: kernel/c.ko.xz\n"
        "kernel/c.ko.xz:\n"
        "kernel/d-e.ko:\n")
    (tmp_path / "modules.builtin").write_text("kernel/virtio_pci.ko\n")
    order = resolve_modules(tmp_path, ["a", "d_e", "virtio_pci"], optional=["nope"])
    assert order == ["kernel/c.ko.xz", "kernel/b.ko.xz", "kernel/a.ko.xz", "kernel/d-e.ko"]


def test_kernel_log_scanner() -> None:
    good = "[    1.0] device-mapper: thin: Data device (dm-1) discard unsupported\n"
    assert find_kernel_problems(good) == []
    bad = good + "[    2.0] WARNING: CPU: 0 PID: 1 at drivers/md/dm-thin.c:123\n" \
                 "[    2.0] Call Trace:\n"
    assert len(find_kernel_problems(bad)) == 2
    with pytest.raises(KernelProblem):
        check_kernel_log(bad)
    check_kernel_log(bad, allow=(r"dm-thin\.c", r"Call Trace"))


def test_kernel_log_scanner_skips_the_timeout_dump() -> None:
    """The sysrq 'w' dump DIAG_SCRIPT asks for at a command's timeout is no kernel problem
    (between its two markers); a trace outside them, or after an unterminated one, is."""
    assert DUMP_BEGIN in DIAG_SCRIPT and DUMP_END in DIAG_SCRIPT
    dump = [f"[ 9.0] {DUMP_BEGIN}", "[ 9.1] sysrq: Show Blocked State",
            "[ 9.1] task:sh  state:D stack:0 pid:170", "[ 9.1] Call Trace:",
            "[ 9.1]  <TASK>", "[ 9.2] </TASK>", f"[ 9.3] {DUMP_END}"]
    trace = "[ 9.4] Call Trace:"
    assert find_kernel_problems("\n".join(dump)) == []
    assert find_kernel_problems("\n".join([*dump, trace, *dump])) == [trace]
    assert find_kernel_problems("\n".join(dump[:-1])) == [dump[3]]


class _RingLog(Machine):
    """A Machine whose guest is a kernel ring buffer of *cap* lines (busybox dmesg/tail)."""

    def __init__(self, cap: int) -> None:
        super().__init__(Kernel("fake", "0", Path("/nonexistent"), Path("/nonexistent")))
        self.ring: list[str] = []
        self.cap = cap
        self.commands: list[str] = []

    def log(self, *lines: str) -> None:
        self.ring = (self.ring + list(lines))[-self.cap:]

    def run(self, command: str, **_: object) -> CommandResult:  # type: ignore[override]
        self.commands.append(command)
        m = re.fullmatch(r"dmesg(?: \| tail -n \+(\d+))?", command)
        assert m, command
        lines = self.ring[int(m[1]) - 1:] if m[1] else self.ring
        return CommandResult(command, 0, "".join(x + "\n" for x in lines).encode(), b"", 0.0)


def test_check_dmesg_reads_only_new_lines() -> None:
    vm = _RingLog(cap=1000)
    vm.log(*(f"[ {i}.0] boot line {i}" for i in range(30)))
    vm.check_dmesg()
    vm.log("[ 31.0] device-mapper: thin: fine")
    vm.check_dmesg()
    assert vm.commands == ["dmesg", "dmesg | tail -n +30"]
    vm.log("[ 32.0] WARNING: CPU: 0 PID: 1 at drivers/md/dm-thin.c:1")
    with pytest.raises(KernelProblem):
        vm.check_dmesg()
    vm.check_dmesg()  # seen: not reported twice
    vm.log("[ 33.0] WARNING: allowed here")
    vm.check_dmesg(allow=("allowed here",))
    vm.check_dmesg()
    # The ring wraps past the anchor: every line still in the buffer is looked at.
    vm.cap = 20
    vm.log("[ 34.0] WARNING: CPU: 0 PID: 2 at drivers/md/dm-thin.c:2",
           *(f"[ 35.{i}] filler" for i in range(15)))
    with pytest.raises(KernelProblem):
        vm.check_dmesg()
    # The ring wraps, the anchor still in it: only what follows it.
    vm.log("[ 36.0] WARNING: CPU: 0 PID: 3 at drivers/md/dm-thin.c:3", "[ 37.0] after")
    vm.log(*(f"[ 38.{i}] filler" for i in range(5)))
    with pytest.raises(KernelProblem) as exc:
        vm.check_dmesg()
    assert "dm-thin.c:3" in str(exc.value) and "dm-thin.c:2" not in str(exc.value)
    vm.check_dmesg(since_last=False, allow=("WARNING",))


def test_pool_status_parser() -> None:
    s = parse_pool_status("0 131072 thin-pool 1 213/2048 16/1024 - rw discard_passdown "
                          "queue_if_no_space - 1024")
    assert (s.transaction_id, s.used_metadata_blocks, s.total_metadata_blocks) == (1, 213, 2048)
    assert (s.used_data_blocks, s.total_data_blocks, s.mode) == (16, 1024, "rw")
    assert not s.needs_check and s.held_metadata_root is None
    assert s.metadata_low_watermark == 1024
    assert parse_pool_status("0 8 thin-pool Fail").failed
    t = parse_thin_status("0 2048 thin 1024 1023")
    assert (t.mapped_sectors, t.highest_mapped_sector) == (1024, 1023)


def _fake_qemu(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
    path.chmod(0o755)
    return str(path)


def test_queued_commands_run_in_order_and_name_the_failing_one() -> None:
    """vmtests/scenario.py's batching, in the guest's shell (busybox sh): queued commands run
    in order with their output dropped, the first failure stops the script and is named."""
    from vmtests.scenario import after_queued, run_after_queued

    sh = shutil.which("busybox")
    if sh is None:
        pytest.skip("busybox not installed")
    script, timeout = after_queued([("echo one >&2; echo hidden", 5), ("exit 0", 5),
                                    ("false", 5), ("echo never >&2", 5)], "echo last", 7)
    assert timeout == 27
    r = subprocess.run([sh, "sh", "-c", script], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "one\nqueued command 2 failed\n"
    script, _ = after_queued([("echo hidden", 1), ("exit 0", 1)], "echo shown", 1)
    r = subprocess.run([sh, "sh", "-c", script], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "shown\n", "")

    class HostShell:
        """The guest's run(), by the host's busybox sh."""

        def run(self, script: str, timeout: float) -> CommandResult:
            p = subprocess.run([str(sh), "sh", "-c", script], capture_output=True)
            return CommandResult(script, p.returncode, p.stdout, p.stderr, 0.0)

    # run_after_queued names the failing command (the script carries only its index).
    with pytest.raises(GuestCommandError) as ei:
        run_after_queued(HostShell(), [("echo one >&2", 5), ("false", 5)],  # type: ignore[arg-type]
                         "echo last", 7)
    assert ei.value.result.stderr == b"one\nqueued command 1 failed: false\n"
    assert run_after_queued(HostShell(), [("exit 0", 1)], "echo shown", 1) == "shown\n"  # type: ignore[arg-type]


def test_state_key_follows_every_input(tmp_path: Path) -> None:
    """The saved-state key changes with the appliance's content (same file name), the kernel
    image, the QEMU version and the machine options, and not with per-run paths."""
    from dmimage.guest.vmstate import state_key

    qemu = _fake_qemu(tmp_path / "qemu", "7.2.22")
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd.cpio"
    kernel.write_bytes(b"kernel-1")
    initrd.write_bytes(b"appliance-1")

    def argv(rundir: str, memory: str = "256", share: str = "/srv") -> list[str]:
        return [qemu, "-m", memory, "-kernel", str(kernel), "-initrd", str(initrd),
                "-chardev", f"socket,id=agent,path={rundir}/agent.sock",
                "-fsdev", f"local,id=hostshare,path={share},readonly=on"]

    def key(rundir: str = "/tmp/run-a", **kw: str) -> str:
        share = kw.get("share", "/srv")
        return state_key(argv(rundir, **kw), {rundir: "@RUNDIR@", share: "@HOSTSHARE@"})

    base = key()
    assert key("/tmp/run-b") == base and key(share="/other") == base
    assert key(memory="512") != base
    # Same names, new content (mtime moved on so the per-process memo cannot hide it).
    initrd.write_bytes(b"appliance-2")
    os.utime(initrd, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed_appliance = key()
    assert changed_appliance != base
    kernel.write_bytes(b"kernel-2")
    os.utime(kernel, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert key() not in (base, changed_appliance)
    before = key()
    _fake_qemu(Path(qemu), "8.2.0")
    os.utime(qemu, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert key() != before


# --------------------------------------------------------------------------------------------
# Shared guest (one boot per kernel)


@pytest.mark.vm
def test_boot_and_modules(dm_vm: Machine) -> None:
    assert dm_vm.alive and dm_vm.boot_time is not None
    assert dm_vm.run("uname -r", check=True).out.strip() == dm_vm.kernel.version
    mods = dm_vm.sh("cat /proc/modules; ls /sys/module")
    for m in ("dm_thin_pool", "dm_persistent_data", "dm_bufio", "dm_bio_prison", "virtio_blk"):
        assert m in mods
    assert "thin-pool" in dm_vm.sh("dmsetup targets")
    assert dm_vm.sh("test -c /dev/mapper/control && echo ok").strip() == "ok"


@pytest.mark.vm
def test_agent_round_trip(dm_vm: Machine) -> None:
    r = dm_vm.run("printf 'a\\000b\\377\\r\\n\\001'; printf 'E\\000\\n' >&2; exit 7")
    assert r.returncode == 7 and not r.timed_out
    assert r.stdout == b"a\x00b\xff\r\n\x01"
    assert r.stderr == b"E\x00\n"
    assert dm_vm.run("true").stdout == b""
    # 64 KiB of random bytes: compare with the guest's own sha256.
    r = dm_vm.run("head -c 65536 /dev/urandom > /tmp/r && cat /tmp/r", check=True)
    assert len(r.stdout) == 65536
    assert hashlib.sha256(r.stdout).hexdigest() == dm_vm.sha256_of("/tmp/r")
    # Scripts of many lines, quotes and non-ASCII survive.
    script = "x='it''s'\n" + "\n".join(f"echo line{i} \"$x\" é" for i in range(300))
    out = dm_vm.sh(script).splitlines()
    assert len(out) == 300 and out[-1] == "line299 its é"
    # A script over 1 KiB (~7 KB: read by dd, not line by line) arrives byte for byte; the
    # next frame too.
    body = "".join(f"{i:05d} {'ab' * (i % 40)} \\ $x `q` 'é'\n" for i in range(150))
    got = dm_vm.sh(f"cat > /tmp/b <<'EOF'\n{body}EOF\nsha256sum < /tmp/b").split()[0]
    assert got == hashlib.sha256(body.encode()).hexdigest()
    assert dm_vm.sh("echo small") == "small\n"
    with pytest.raises(GuestCommandError) as ei:
        dm_vm.run("echo boom >&2; false", check=True)
    assert b"boom" in ei.value.result.stderr


@pytest.mark.vm
def test_agent_timeout_kills_process_group(dm_vm: Machine) -> None:
    t = time.monotonic()
    r = dm_vm.run("sleep 300 & sleep 300; echo never", timeout=2)
    assert r.timed_out and r.returncode == 137 and b"never" not in r.stdout
    assert time.monotonic() - t < 15
    # The background sleep of the same command is gone too, and the agent still answers.
    # (The agent's own watchdog for this ps command is a "sleep 60": not counted.)
    assert dm_vm.sh("ps -o args | grep -c '^sleep 300' || true").strip() == "0"


@pytest.mark.vm
def test_timed_out_command_reports_the_guest_state(dm_vm: Machine, vm_disk: DiskFactory,
                                                   tmp_path: Path) -> None:
    """A dd waiting on a suspended device (in D state, in a loop with a timeout the hung-task
    detector never sees): the error names it with its stack, the memory, the dm devices and
    QEMU's disk queues, and the console has the sysrq 'w' dump (the level is raised around it:
    loglevel=5)."""
    (tmp_path / "d.img").write_bytes(bytes(4096))
    disk = vm_disk(tmp_path / "d.img")
    dm_vm.sh("dmsetup create hz --table '0 8 zero' && dmsetup suspend hz")
    try:
        with pytest.raises(GuestCommandError) as ei:
            dm_vm.run("echo started >&2; dd if=/dev/zero of=/dev/mapper/hz bs=512 count=1 "
                      "oflag=direct", timeout=3, check=True)
        res = ei.value.result
        assert res.timed_out and res.stderr == b"started\n"
        diag = res.diagnostics.decode()
        # (ash runs busybox's dd in its forked child: its arguments stay the script's)
        dd = re.search(r"^(\d+) D \d+ \S+ dd: sh /tmp/\.c\.sh.*\n((?:    .*\n)+)", diag, re.M)
        assert dd and "blkdev_write_iter" in dd.group(2), diag
        assert re.search(r"^MemTotal: \d+ MemFree: \d+ ", diag, re.M), diag
        assert re.search(r"^requests in flight \(device reads writes\): ", diag, re.M), diag
        assert re.search(r"^hz +253 +\d+ +L-s", diag, re.M), diag  # dmsetup info -c: suspended
        assert re.search(rf"^QEMU disk queues .*: {disk.serial} {disk.guest_path} q0 0 \d+ \d+;",
                         diag, re.M), diag
        assert "guest state at the timeout" in str(ei.value) and dd.group(0) in str(ei.value)
        assert dm_vm.console_log is not None
        console = dm_vm.console_log.read_text(errors="replace")
        # 5.10 pads the pid (pid:%5d), 6.x does not
        assert re.search(rf"task:dd +state:D .*pid: *{dd.group(1)} ", console), console[-3000:]
    finally:
        dm_vm.run("dmsetup resume hz; sleep 1; dmsetup remove hz", timeout=60)
    # The dump is no kernel problem for the harness's own log check; a trace outside it is.
    dm_vm.check_dmesg()


@pytest.mark.vm
def test_hung_guest_raises_timeout_with_console_tail(dm_vm: Machine) -> None:
    dm_vm.qmp("stop")  # freeze the vCPUs: the agent cannot answer
    try:
        with pytest.raises(GuestTimeout) as ei:
            dm_vm.run("echo hi", timeout=1, host_grace=1)
        assert "guest console" in str(ei.value) or ei.value.log_path
    finally:
        dm_vm.qmp("cont")
    # The stale reply is skipped; the next command gets its own answer.
    assert dm_vm.sh("echo again").strip() == "again"
    dm_vm._failed = False  # the timeout was provoked: keep the run dir tidy


@pytest.mark.vm
def test_hotplug_read_back(dm_vm: Machine, vm_disk: DiskFactory, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(3 << 20) + b"tail")
    size = img.stat().st_size
    t = time.monotonic()
    d = vm_disk(img)
    attach_s = time.monotonic() - t
    assert d.guest_path.startswith("/dev/vd")
    assert dm_vm.sh(f"cat /sys/block/{d.guest_path[5:]}/serial").strip() == d.serial
    # QEMU rounds a file's size up to whole 512-byte sectors (the guest reads zeros there).
    assert int(dm_vm.sh(f"blockdev --getsize64 {d.guest_path}")) == (size + 511) // 512 * 512
    d_sha = hashlib.sha256(img.read_bytes()).hexdigest()
    assert dm_vm.sha256_of(d.guest_path, size) == d_sha
    assert dm_vm.read_bytes(d.guest_path, size - 4, 4) == b"tail"
    assert dm_vm.read_bytes(d.guest_path, 1000, 16) == img.read_bytes()[1000:1016]
    t = time.monotonic()
    dm_vm.detach(d)
    detach_s = time.monotonic() - t
    assert dm_vm.run(f"test -e {d.guest_path}").returncode != 0
    print(f"hot-plug: attach {attach_s:.2f} s, detach {detach_s:.2f} s")
    # The same file can be plugged again (QEMU released it).
    with dm_vm.disk(img) as d2:
        assert dm_vm.sha256_of(d2.guest_path, size) == d_sha


@pytest.mark.vm
def test_a_disk_the_guest_missed_is_found_by_a_rescan(dm_vm: Machine, vm_disk: DiskFactory,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The wait for a plugged disk rescans the guest's PCI bus when the disk does not show up:
    the guest is made to forget a disk QEMU still has (sysfs ``remove``, as if its ACPI
    notification had been lost), and the wait finds it again, with a warning."""
    img = tmp_path / "missed.img"
    img.write_bytes(os.urandom(1 << 20))
    d = vm_disk(img)
    pci = dm_vm.sh(f"readlink -f /sys/block/{d.guest_path[5:]}/device/..").strip()
    dm_vm.sh(f"echo 1 > {pci}/remove")
    assert dm_vm.run(f"test -e /sys/block/{d.guest_path[5:]}").returncode != 0
    monkeypatch.setattr(dm_vm, "RESCAN_AFTER_TRIES", 3)
    with caplog.at_level("WARNING", logger="dmimage.guest"):
        dm_vm._wait_for_disks([d], 30)
    assert any("rescanned its PCI bus (found)" in r.getMessage() for r in caplog.records)
    assert dm_vm.sha256_of(d.guest_path) == hashlib.sha256(img.read_bytes()).hexdigest()


@pytest.mark.vm
def test_read_only_attach_refuses_writes(dm_vm: Machine, vm_disk: DiskFactory,
                                         tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(b"\x5a" * (1 << 20))
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    d = vm_disk(img, read_only=True)
    assert dm_vm.sh(f"blockdev --getro {d.guest_path}").strip() == "1"
    r = dm_vm.run(f"dd if=/dev/zero of={d.guest_path} bs=4096 count=1 conv=fsync")
    assert r.returncode != 0
    dm_vm.detach(d)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


@pytest.mark.vm
def test_writable_attach_writes_reach_host(dm_vm: Machine, vm_disk: DiskFactory,
                                           tmp_path: Path) -> None:
    img = tmp_path / "rw.img"
    img.write_bytes(bytes(1 << 20))
    d = vm_disk(img, read_only=False)
    dm_vm.sh(f"printf 'written-by-guest' | dd of={d.guest_path} bs=512 seek=3 conv=notrunc "
             "2>/dev/null")
    dm_vm.detach(d)
    assert img.read_bytes()[3 * 512:3 * 512 + 16] == b"written-by-guest"


def _thin_checks() -> list[str]:
    from dmimage.guest.kernels import debian13_dir

    found = []
    for p in ("/usr/sbin/thin_check",
              str(debian13_dir() / "thin-provisioning-tools/usr/sbin/thin_check")):
        if os.access(p, os.X_OK):
            found.append(p)
    return found


@pytest.mark.vm
def test_kernel_thin_pool_smoke(dm_vm: Machine, vm_disk: DiskFactory, tmp_path: Path) -> None:
    checkers = _thin_checks()
    if not checkers:
        unavailable("no thin_check installed")
    meta, data = tmp_path / "meta.bin", tmp_path / "data.bin"
    for f, size in ((meta, 8 << 20), (data, 64 << 20)):
        with open(f, "wb") as fh:
            fh.truncate(size)  # sparse; the kernel formats fresh (zeroed) metadata
    m = vm_disk(meta, read_only=False)
    dd = vm_disk(data, read_only=False)
    sectors = (64 << 20) // 512
    dm_vm.sh(textwrap.dedent(f"""\
        set -e
        dmsetup create pool --table "0 {sectors} thin-pool {m.guest_path} {dd.guest_path} 128 0"
        dmsetup message pool 0 "create_thin 0"
        dmsetup create thin --table "0 {sectors} thin /dev/mapper/pool 0"
        dmsetup mknodes
        dd if=/dev/urandom of=/dev/mapper/thin bs=65536 count=16 seek=4 conv=fsync 2>/dev/null
        """))
    pool = parse_pool_status(dm_vm.sh("dmsetup status pool"))
    thin = parse_thin_status(dm_vm.sh("dmsetup status thin"))
    assert pool.mode == "rw" and not pool.needs_check and not pool.failed
    assert pool.used_data_blocks == 16 and pool.total_data_blocks == sectors // 128
    assert pool.total_metadata_blocks == (8 << 20) // 4096
    assert 0 < pool.used_metadata_blocks < pool.total_metadata_blocks
    assert thin.mapped_sectors == 16 * 128
    assert thin.highest_mapped_sector == (4 + 16) * 128 - 1
    dm_vm.sh("dmsetup remove thin && dmsetup remove pool")
    dm_vm.detach(dd)
    dm_vm.detach(m)
    for checker in checkers:
        r = subprocess.run([checker, str(meta)], capture_output=True, text=True)
        assert r.returncode == 0, f"{checker}: {r.stdout}{r.stderr}"


# --------------------------------------------------------------------------------------------
# Faults and process hygiene (own short-lived machines, deb12)


def _own_machine() -> Machine:
    from dmimage.guest.kernels import kernel_by_name, qemu_binary
    from dmimage.guest.machine import Machine

    if not qemu_binary():
        unavailable("qemu-system-x86_64 missing")
    return Machine(kernel_by_name("deb12"))


def _pid_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie still answers kill(0): look at its state.
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
            if state in "ZX":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.vm
def test_dead_qemu_is_a_clear_error_and_context_manager_cleans_up() -> None:
    vm = _own_machine()
    with vm:
        pid, rundir = vm.pid, vm.rundir
        assert pid is not None and rundir is not None
        assert vm.sh("echo up").strip() == "up"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(MachineDied) as ei:
            vm.run("echo hi", timeout=5)
        assert "QEMU exited" in str(ei.value)
    assert _pid_gone(pid)
    shutil.rmtree(rundir, ignore_errors=True)  # kept for inspection after a failure
    vm2 = _own_machine()
    with vm2:
        pid2 = vm2.pid
        assert pid2 is not None
    assert _pid_gone(pid2), "QEMU survived the context manager"


@pytest.mark.vm
def test_no_orphan_qemu_when_python_is_killed(tmp_path: Path) -> None:
    _own_machine()  # skip/fail early like the others
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""\
            import sys, time
            from dmimage.guest.kernels import kernel_by_name
            from dmimage.guest.machine import Machine
            vm = Machine(kernel_by_name("deb12")).start()
            print(vm.pid, vm.rundir, flush=True)
            time.sleep(600)
            """)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line and line[0].isdigit(), "child did not boot a machine"
        qemu_pid, rundir = int(line[0]), line[1]
        os.kill(qemu_pid, 0)
        child.kill()  # SIGKILL: no atexit, no finally; only the parent-death signal is left
        child.wait(10)
        assert _pid_gone(qemu_pid), "QEMU outlived its killed parent"
        shutil.rmtree(rundir, ignore_errors=True)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@dataclass
class StateRace:
    """What two processes that created the same saved state at once left behind."""

    state_dir: Path
    returncodes: list[int]
    outputs: list[tuple[str, str]]  # (stdout, stderr) of each
    listing: list[str]  # the state directory right after both exited


@pytest.fixture(scope="module")
def state_race(tmp_path_factory: pytest.TempPathFactory) -> StateRace:
    """Two processes boot the same configuration (deb12) into an empty saved-state cache at
    the same moment; each saves, says how it started and that its saved machine goes on.
    The cache they leave is the module's: the restore tests start from it (one pair of cold
    boots serves all three tests; a boot of its own cost the module ~5 CPU-s more)."""
    _own_machine()  # skip/fail early like the others
    state_dir = tmp_path_factory.mktemp("vmstate")
    env = {**os.environ, "DMIMAGE_VM_STATE_DIR": str(state_dir)}
    code = textwrap.dedent("""\
        from dmimage.guest.kernels import kernel_by_name
        from dmimage.guest.machine import Machine
        with Machine(kernel_by_name("deb12")) as vm:
            print(vm.start_kind, vm.state_file.parent if vm.state_file else None,
                  vm.sh("echo up").strip(), flush=True)
        """)
    kids = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [k.communicate(timeout=600) for k in kids]
    return StateRace(state_dir, [k.returncode for k in kids], outs,
                     sorted(p.name for p in state_dir.iterdir()))


@pytest.fixture(scope="module")
def state_dir(state_race: StateRace) -> Path:
    """A private saved-state cache holding one deb12 state (booted cold, then saved)."""
    assert state_race.returncodes == [0, 0], state_race.outputs
    return state_race.state_dir


@pytest.mark.vm
def test_two_processes_create_the_state_at_once(state_race: StateRace,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes boot the same configuration into an empty cache at the same moment: both
    save, the renames leave exactly one complete state and no temporary file, and it restores."""
    outs = state_race.outputs
    assert state_race.returncodes == [0, 0], outs
    # Both boot cold and save (unless one child started so late that the other's state was
    # already there: then it restores); the machine that saved goes on serving commands.
    kinds = sorted(o.split()[0] for o, _ in outs)
    assert all(o.split()[1:] == [str(state_race.state_dir), "up"] for o, _ in outs), outs
    assert kinds in (["cold+saved", "cold+saved"], ["cold+saved", "restored"]), outs
    assert [n.endswith(".state") for n in state_race.listing] == [True], state_race.listing
    monkeypatch.setenv("DMIMAGE_VM_STATE_DIR", str(state_race.state_dir))
    with _own_machine() as vm:
        assert vm.start_kind == "restored"
        assert vm.state_file is not None and vm.state_file.name == state_race.listing[0]
        assert vm.sh("echo restored").strip() == "restored"


@pytest.mark.vm
def test_restored_guest_sees_hotplugged_disks(state_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMIMAGE_VM_STATE_DIR", str(state_dir))
    img, img2 = tmp_path / "disk.img", tmp_path / "disk2.img"
    img.write_bytes(os.urandom(1 << 20))
    img2.write_bytes(bytes(1 << 20))
    with _own_machine() as vm:
        assert vm.start_kind == "restored" and vm.state_file is not None
        assert vm.state_file.parent == state_dir
        assert vm.boot_time is not None and vm.guest_uptime_at_ready is not None
        # The restored guest's clock was moved from the save time to now.
        assert abs(int(vm.sh("date +%s")) - time.time()) < 30
        assert "thin-pool" in vm.sh("dmsetup targets")
        with vm.disk(img) as d, vm.disk(img2, read_only=False) as d2:
            assert d.guest_path != d2.guest_path
            assert vm.sha256_of(d.guest_path) == hashlib.sha256(img.read_bytes()).hexdigest()
            vm.sh(f"printf restored | dd of={d2.guest_path} bs=512 seek=1 conv=notrunc,fsync "
                  "2>/dev/null")
        assert img2.read_bytes()[512:520] == b"restored"
        vm.check_dmesg(since_last=False)


@pytest.mark.vm
def test_corrupt_state_falls_back_to_cold_boot(state_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DMIMAGE_VM_STATE_DIR", str(state_dir))
    (state,) = state_dir.glob("*.state")
    size = state.stat().st_size
    with open(state, "r+b") as f:  # a partial copy: the stream ends half-way
        f.truncate(size // 2)
    bad_ino = state.stat().st_ino
    with caplog.at_level("WARNING", logger="dmimage.guest"), _own_machine() as vm:
        assert vm.start_kind == "cold+saved", vm.start_kind
        assert vm.sh("echo cold").strip() == "cold"
    assert any("restoring the saved state" in r.getMessage() and "booting cold" in r.getMessage()
               for r in caplog.records), caplog.text
    # The bad file was replaced by a complete state that restores.
    assert state.stat().st_ino != bad_ino and state.stat().st_size > size // 2
    with _own_machine() as vm:
        assert vm.start_kind == "restored"


@pytest.mark.vm
@pytest.mark.vm_one_kernel  # the entry point and fixtures, not the kernel
def test_plugin_in_another_project(dm_vm: Machine, tmp_path: Path) -> None:
    """docs/vm.md's "another project" example, verbatim, as such a project runs it: its own
    directory outside this repository and pytest process, no conftest; the fixtures come from
    dmimage's pytest11 entry point. (*dm_vm* only selects the kernel; the child boots its own.)"""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "vm.md").read_text()
    example = re.search(r"```python\n(# test_thin_pool\.py.*?)```", doc, re.S)
    assert example, "docs/vm.md lost its test_thin_pool.py example"
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_thin_pool.py").write_text(example.group(1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(DMIMAGE_VM_KERNELS=dm_vm.kernel.name, DMIMAGE_VM_REQUIRED="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout + res.stderr


@pytest.mark.vm
def test_zz_guard_sees_clean_guest(dm_vm: Machine) -> None:
    # Runs after the other dm_vm tests of this kernel: nothing may be left behind.
    assert dm_vm.disks == []
    assert "No devices found" in dm_vm.run("dmsetup ls").out
