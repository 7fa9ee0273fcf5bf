"""One QEMU guest: process, QMP, guest agent, disk hot-plug.

    with Machine(kernel_by_name("deb12")) as vm:
        print(vm.run("uname -r").out)
        with vm.disk("/tmp/meta.bin", read_only=False) as d:
            vm.run(f"blockdev --getsize64 {d.guest_path}", check=True)

QEMU runs in its own process group with a parent-death signal (``setpriv --pdeathsig KILL``)
and every live machine is killed at interpreter exit, so no QEMU outlives its Python process.
QMP is spoken with ``qemu.qmp.QMPClient`` on an asyncio loop in a private thread; the public API
is synchronous.

Saved state (``vmstate.py``): the first machine of a configuration boots cold, waits for the
agent, and saves itself (QMP ``migrate`` to a file descriptor) into the cache; every later
machine of that configuration starts QEMU with ``-incoming fd:N`` on that file, resumes, and is
ready once the agent answers a first command (which also sets the guest clock and stirs its
random pool). Disks are hot-plugged after that, as always. A state that fails to restore is
removed and the machine boots cold, with a warning in the log.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypedDict, TypeVar

from . import vmstate
from .agent import AgentChannel, CommandResult, check_kernel_log
from .appliance import HOST_SHARE_MODULES, build_initramfs
from .errors import (
    GuestCommandError,
    GuestTimeout,
    HarnessUnavailable,
    HotplugError,
    MachineDied,
    QMPCommandError,
    VMError,
)
from .kernels import Kernel, boot_image, qemu_binary

#: Kernel command line. loglevel=5 keeps the console quiet but shows warnings and worse.
BASE_CMDLINE = ("console=ttyS0 loglevel=5 panic=-1 rdinit=/init edd=off "
                "i8042.noaux i8042.nomux i8042.nopnp")
#: Added under TCG only. ``norandmaps``: TCG keys a translated block by its virtual address,
#: so with address-space randomisation every process start translates ld.so and its
#: libraries afresh; at fixed addresses one translation serves every process (100 ``dmsetup
#: version`` runs: 7.6 -> 2.0 QEMU CPU-s). ``mitigations=off``: retpolines and RSB filling
#: cost TCG another ~15% on process-heavy work. Neither changes a device-mapper code path.
#: ``cryptomgr.notests``: no crypto self-tests when an algorithm is first instantiated (at
#: boot and when a crypt or verity table first names a cipher or hash); they checked the
#: kernel's own implementations, not a device-mapper path (a cold boot: ~0.9 QEMU CPU-s less).
#: Under KVM none of these saves anything, so a KVM guest keeps the kernel's defaults (ASLR,
#: mitigations and self-tests on) for whatever ``dmimage vm run`` runs in it.
TCG_CMDLINE = "norandmaps mitigations=off cryptomgr.notests"

#: The CPU model under TCG: everything QEMU emulates except ERMS ("enhanced rep movsb"). With
#: ERMS the guest kernel copies and clears memory with ``rep movsb``/``stosb``, which TCG runs
#: one byte per loop iteration (a translation block each); without it, ``rep movsq``/``stosq``
#: moves eight bytes per iteration. ~28% less QEMU CPU on page-cache copies, process starts and
#: dm work (docs/vm.md, "The machine").
TCG_CPU = "max,erms=off"

#: The name of the agent's virtio-serial port (the guest's init finds it in
#: /sys/class/virtio-ports/*/name).
AGENT_PORT = "dmimage.agent"

#: The virtio-9p mount tag (and fsdev id) of the optional read-only host share.
HOST_SHARE_TAG = "hostshare"

_LIVE: weakref.WeakSet[Machine] = weakref.WeakSet()

log = logging.getLogger("dmimage.guest")

#: Seconds a restore may take (QEMU loading the state + the agent's first answer) before the
#: state is declared bad and the machine boots cold. A good restore takes ~1 s, or a few
#: seconds on a loaded host.
RESTORE_TIMEOUT = 60.0


@atexit.register
def _kill_all() -> None:
    for m in list(_LIVE):
        with contextlib.suppress(Exception):
            m.kill()


@lru_cache(maxsize=1)
def _sha256_exact(f: BinaryIO, n: int, what: str) -> str:
    """sha256 of the next *n* bytes of *f* (a scratch copy of guest path *what*)."""
    h = hashlib.sha256()
    left = n
    while left:
        chunk = f.read(min(left, 8 << 20))
        if not chunk:
            raise VMError(f"the scratch copy of {what} is short: {n - left} of {n} bytes")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def kvm_usable(qemu: str | None = None) -> bool:
    """True when /dev/kvm opens *and* QEMU can start a vCPU with it (a nested /dev/kvm may
    exist yet abort QEMU on MSR setup, as on this project's build machines)."""
    qemu = qemu or qemu_binary()
    if not qemu or not os.path.exists("/dev/kvm"):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError:
        return False
    try:
        res = subprocess.run(
            [qemu, "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-nodefaults",
             "-display", "none", "-S", "-qmp", "stdio"],
            input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
            capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def choose_accel() -> str:
    """``DMIMAGE_VM_ACCEL`` (kvm|tcg) if set, else kvm when usable, else tcg."""
    forced = os.environ.get("DMIMAGE_VM_ACCEL")
    if forced:
        return forced
    return "kvm" if kvm_usable() else "tcg"


# --------------------------------------------------------------------------------------------
# QMP on a private event loop thread


_T = TypeVar("_T")


class _Ctx(TypedDict):
    """What every harness error carries about the guest (``VMError`` keyword arguments)."""

    console_tail: str
    log_path: str | None


class _QMP:
    def __init__(self) -> None:
        from qemu.qmp import QMPClient

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dmimage-qmp",
                                       daemon=True)
        self.thread.start()
        self.client = QMPClient("dmimage-vm")
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self._pump: Any = None

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def listen(self, path: str) -> None:
        self.call(self.client.start_server(path), 10)

    async def _accept_and_pump(self) -> None:
        from qemu.qmp import EventListener

        listener = EventListener()
        self.client.register_listener(listener)
        await self.client.accept()

        async def pump() -> None:
            async for ev in listener:
                with self.cond:
                    self.events.append(dict(ev))
                    self.cond.notify_all()

        self._pump = asyncio.ensure_future(pump())

    def accept(self, timeout: float) -> None:
        self.call(self._accept_and_pump(), timeout)

    def execute(self, cmd: str, args: dict[str, Any] | None, timeout: float) -> object:
        return self.call(self.client.execute(cmd, args), timeout)

    def send_fd(self, fd: int, name: str, timeout: float) -> None:
        """Pass *fd* to QEMU (SCM_RIGHTS) and name it *name* for commands like ``migrate``."""
        async def _send() -> object:
            self.client.send_fd_scm(fd)
            return await self.client.execute("getfd", {"fdname": name})

        self.call(_send(), timeout)

    def wait_event(self, name: str, match: dict[str, Any], deadline: float,
                   health: Callable[[], None]) -> dict[str, Any]:
        with self.cond:
            while True:
                for i, ev in enumerate(self.events):
                    data = ev.get("data", {})
                    if ev.get("event") == name and all(data.get(k) == v for k, v in match.items()):
                        return self.events.pop(i)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(name)
                self.cond.wait(min(remaining, 0.25))
                health()

    def close(self) -> None:
        async def _close() -> None:
            if self._pump is not None:
                self._pump.cancel()
            with contextlib.suppress(Exception):
                await self.client.disconnect()

        with contextlib.suppress(Exception):
            self.call(_close(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


# --------------------------------------------------------------------------------------------


@dataclass
class Disk:
    """A host file attached to the guest as a virtio-blk disk."""

    host_path: Path
    guest_path: str  # e.g. /dev/vda
    serial: str
    device_id: str  # QEMU device id (for device_del)
    node_name: str  # QEMU block node (for blockdev-del)
    read_only: bool


class Machine:
    """A QEMU guest booted from the dmimage appliance, driven via QMP and the guest agent.

    Use as a context manager (or call ``start()`` / ``close()``). ``boot_time`` is the seconds
    from launching QEMU to the agent's first answer.
    """

    #: Hot-plugged disks are scratch files (a test suite's images): the guest's flushes
    #: complete without an fdatasync of the host file (QEMU's ``cache.no-flush``), which only a
    #: host crash could tell apart. Off by default: a disk the user gives (``dmimage vm run
    #: --disk``) gets every flush its guest asks for, in order; the VM suite turns it on
    #: (its conftest.py). ``Machine(scratch_disks=...)`` sets it for one machine.
    scratch_disks: bool = False

    def __init__(self, kernel: Kernel, *, memory_mb: int = 256, cpus: int = 1,
                 accel: str | None = None, boot_timeout: float = 180.0,
                 cmdline_extra: str = "", keep_logs: bool | None = None,
                 qemu: str | None = None,
                 host_share: str | os.PathLike[str] | None = None,
                 saved_state: bool | None = None,
                 scratch_disks: bool | None = None) -> None:
        """``host_share``: a host directory the guest may mount read-only over virtio-9p
        (:meth:`mount_host_share`); None (the default) adds neither the device nor modules.
        ``saved_state``: start from (or create) the cached saved state of this configuration;
        default on unless ``DMIMAGE_VM_SNAPSHOT=0``. ``scratch_disks``: see the class
        attribute (None: its value)."""
        self.kernel = kernel
        if scratch_disks is not None:
            self.scratch_disks = scratch_disks
        self.host_share = os.fspath(host_share) if host_share is not None else None
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.accel = accel
        self.boot_timeout = boot_timeout
        self.cmdline_extra = cmdline_extra
        self.keep_logs = (os.environ.get("DMIMAGE_VM_KEEP") == "1") if keep_logs is None \
            else keep_logs
        self.qemu = qemu or qemu_binary()
        self.saved_state = vmstate.enabled() if saved_state is None else saved_state
        #: "restored" (from a saved state), "cold" (booted; no state used) or "cold+saved"
        #: (booted, then saved its state for later machines); None before start().
        self.start_kind: str | None = None
        #: The state file this machine was restored from or saved to.
        self.state_file: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.rundir: Path | None = None
        self.console_log: Path | None = None
        self.boot_time: float | None = None
        self.guest_uptime_at_ready: float | None = None
        self._qmp: _QMP | None = None
        self._agent: AgentChannel | None = None
        self._agent_sock: socket.socket | None = None
        self._disks: dict[str, Disk] = {}
        self._scratch: Disk | None = None
        self._counter = 0
        self._dmesg_seen = 0
        self._dmesg_last = ""
        self._lock = threading.RLock()
        self._failed = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def command_line(self, initrd: Path, kernel_image: Path, accel: str) -> list[str]:
        assert self.rundir is not None and self.console_log is not None
        cpu = "host" if accel == "kvm" else TCG_CPU
        cmdline = BASE_CMDLINE + ("" if accel == "kvm" else " " + TCG_CMDLINE) \
            + (" " + self.cmdline_extra if self.cmdline_extra else "")
        return [
            self.qemu or "qemu-system-x86_64",
            "-name", f"dmimage-{self.kernel.name},debug-threads=on",  # named threads: diagnostics
            "-machine", "pc", "-accel", accel, "-cpu", cpu,
            "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-nodefaults", "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(kernel_image), "-initrd", str(initrd), "-append", cmdline,
            "-chardev", f"file,id=con,path={self.console_log}", "-serial", "chardev:con",
            # The agent's channel: a virtio-serial port, not a second UART (a byte through
            # the emulated 16550 cost ~27 us of TCG CPU; the console stays on serial 0).
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent,path={self.rundir / 'agent.sock'}",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT}",
            "-chardev", f"socket,id=qmp,path={self.rundir / 'qmp.sock'}",
            "-mon", "chardev=qmp,mode=control",
            *self._host_share_args(),
        ]

    def _host_share_args(self) -> list[str]:
        if self.host_share is None:
            return []
        path = self.host_share.replace(",", ",,")
        # multidevs=remap: the share's inode numbers made unique across the host's file
        # systems. Without it /dev, /proc and /sys (each inode 1 of its own file system) were
        # one inode to the guest's 9p cache, and mount_host_share's binds landed on the wrong
        # directories (/proc under the chroot's /sys, its /proc left as the host's).
        return ["-fsdev", f"local,id={HOST_SHARE_TAG},path={path},security_model=none,"
                          "multidevs=remap,readonly=on",
                "-device", f"virtio-9p-pci,fsdev={HOST_SHARE_TAG},mount_tag={HOST_SHARE_TAG}"]

    def mount_host_share(self, guest_dir: str = "/tmp/host", *, timeout: float = 60.0,
                         cache: str = "loose") -> str:
        """Mount the host share read-only at ``guest_dir`` with the guest's /dev, /proc and
        /sys bound under it, so ``chroot guest_dir PROGRAM`` runs a host program against the
        guest's devices. Returns ``guest_dir``; idempotent.

        ``cache="loose"`` (default) lets the guest keep what it read (pages, dentries): a
        Python start-up reads hundreds of files, and without a cache each read is a 9p round
        trip through a TCG guest, again for every command (3-4x slower). It suits a tree the
        host leaves alone while mounted (a program run in the chroot); pass ``cache="none"``
        to see host changes at once. ``msize`` 512000 (under 5.10's virtio limit of 128
        pages) moves big reads in one message instead of 8 KiB ones."""
        if self.host_share is None:
            raise VMError("this machine has no host share (Machine(host_share=...))")
        d = shlex.quote(guest_dir)
        opts = f"ro,trans=virtio,version=9p2000.L,msize=512000,cache={shlex.quote(cache)}"
        self.sh(f"mountpoint -q {d} && exit 0; mkdir -p {d} && "
                f"mount -t 9p -o {opts} {HOST_SHARE_TAG} {d} && "
                f"for m in dev proc sys; do mount --bind /$m {d}/$m || exit 1; done; "
                f"[ -c {d}/dev/null ] && [ -e {d}/proc/self/mounts ] && [ -d {d}/sys/block ] "
                "|| { echo 'the binds of /dev, /proc and /sys missed their directories' >&2; "
                "exit 1; }", timeout=timeout)
        return guest_dir

    def start(self) -> Machine:
        if self.proc is not None:
            raise VMError("machine already started")
        if not self.qemu or not shutil.which(self.qemu):
            raise HarnessUnavailable("qemu-system-x86_64 not found (apt-get install "
                                     "qemu-system-x86, or set DMIMAGE_QEMU)")
        accel = self.accel or choose_accel()
        self.accel = accel
        extra = HOST_SHARE_MODULES if self.host_share is not None else ()
        initrd = build_initramfs(self.kernel.moddir, extra_modules=extra).path
        image = boot_image(self.kernel)
        self.rundir = Path(tempfile.mkdtemp(prefix="dmimage-vm-"))
        self.console_log = self.rundir / "console.log"
        self.console_log.touch()
        t0 = time.monotonic()
        try:
            self._boot(self.command_line(initrd, image, accel), t0)
        except BaseException:
            self._failed = True
            self.close()
            raise
        return self

    def _state_key(self, argv: list[str]) -> str | None:
        if not self.saved_state:
            return None
        assert self.rundir is not None
        placeholders = {str(self.rundir): "@RUNDIR@"}
        if self.host_share is not None:
            placeholders[self.host_share.replace(",", ",,")] = "@HOSTSHARE@"
        try:
            return vmstate.state_key(argv, placeholders)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("dmimage-vm: no saved state (cannot compute its key: %s)", exc)
            return None

    def _boot(self, argv: list[str], t0: float) -> None:
        """Restore from the saved state if there is one, else boot cold (and save)."""
        key = self._state_key(argv)
        if key is not None:
            path = vmstate.state_path(key)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                ino = os.fstat(fd).st_ino
                try:
                    self._launch(argv + ["-incoming", f"fd:{fd}"], pass_fds=(fd,))
                    self._resume_restored(time.monotonic() + RESTORE_TIMEOUT)
                    self.boot_time = time.monotonic() - t0
                    self.start_kind, self.state_file = "restored", path
                    return
                except VMError as exc:
                    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    log.warning("dmimage-vm: restoring the saved state %s failed (%s); "
                                "removed it, booting cold", path, first)
                    vmstate.discard(path, ino)
                    self._teardown_process()
                finally:
                    os.close(fd)
        self._launch(argv)
        assert self._agent is not None
        self.guest_uptime_at_ready = self._agent.wait_ready(self.boot_timeout)
        self.boot_time = time.monotonic() - t0
        self.start_kind = "cold"
        if key is not None and self._save_state(key):
            self.start_kind = "cold+saved"

    def _resume_restored(self, deadline: float) -> None:
        """Wait until QEMU has loaded the state, resume the vCPUs, and wait for the agent."""
        assert self._qmp is not None and self._agent is not None
        while True:
            self._health()
            status = self.qmp("query-status", timeout=max(1.0, deadline - time.monotonic()))
            state = status.get("status")
            if state == "paused":  # saved while stopped: QEMU does not resume on its own
                self.qmp("cont")
                break
            if state == "running":
                break
            if state != "inmigrate":
                raise VMError(f"QEMU is {state!r} after loading the saved state")
            if time.monotonic() > deadline:
                raise GuestTimeout("QEMU did not finish loading the saved state",
                                   **self._ctx())
            time.sleep(0.01)
        # The first command proves the agent is alive; it also moves the guest clock (frozen
        # at save time) to now and stirs host randomness into the pool every restored guest
        # shares.
        seed = os.urandom(32).hex()
        # timeout=0: no watchdog process in the guest (the host deadline still holds); only
        # builtins but date, as every process is slow to start on a cold translation cache.
        res = self._agent.run(f"date -s @{int(time.time())} >/dev/null; "
                              f"echo {seed} > /dev/urandom; read -r up _ < /proc/uptime; "
                              "echo $up", timeout=0, check=True,
                              host_timeout=max(1.0, deadline - time.monotonic()))
        self.guest_uptime_at_ready = float(res.out.strip() or "nan")

    def _save_state(self, key: str) -> bool:
        """Save this freshly booted, idle guest as the state of its configuration; True when
        it was saved. Failures only cost the speed-up: logged, never raised."""
        assert self._qmp is not None
        tmp = vmstate.temp_path(key)
        t0 = time.monotonic()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                self._qmp.send_fd(fd, "dmimage-vmstate", 30)
            finally:
                os.close(fd)
            self.qmp("stop")
            try:
                self.qmp("migrate", uri="fd:dmimage-vmstate")
                deadline = time.monotonic() + 120
                while True:
                    info = self.qmp("query-migrate")
                    status = info.get("status")
                    if status == "completed":
                        break
                    if status in ("failed", "cancelled") or time.monotonic() > deadline:
                        raise VMError(f"migrate {status}: {info.get('error-desc', '')}")
                    time.sleep(0.02)
            finally:
                self.qmp("cont")
            self.state_file = vmstate.publish(tmp, key)
        except (VMError, OSError) as exc:
            log.warning("dmimage-vm: could not save the VM state (%s); later machines boot "
                        "cold", exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        log.info("dmimage-vm: saved VM state %s in %.2f s", self.state_file,
                 time.monotonic() - t0)
        return True

    def _teardown_process(self) -> None:
        """Undo a failed launch so that ``_launch`` can start over in the same run dir."""
        self.kill()
        _LIVE.discard(self)
        if self._agent_sock is not None:
            self._agent_sock.close()
            self._agent_sock = None
        self._agent = None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        assert self.rundir is not None
        for s in ("qmp.sock", "agent.sock"):
            with contextlib.suppress(OSError):
                (self.rundir / s).unlink()
        self.proc = None
        self._failed = False

    def _launch(self, argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        """Start QEMU with *argv* and connect QMP and the agent channel (not yet ready)."""
        assert self.rundir is not None
        self._qmp = _QMP()
        self._qmp.listen(str(self.rundir / "qmp.sock"))
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(self.rundir / "agent.sock"))
        lsock.listen(1)
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--"] + argv
        with open(self.rundir / "cmdline", "a") as f:
            f.write(shlex.join(argv) + "\n")
        stderr = open(self.rundir / "qemu.stderr", "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr,
                                         stderr=stderr, start_new_session=True,
                                         pass_fds=pass_fds)
        finally:
            stderr.close()
        _LIVE.add(self)
        lsock.settimeout(0.25)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    self._agent_sock, _ = lsock.accept()
                    break
                except TimeoutError:
                    self._health()
                    if time.monotonic() > deadline:
                        raise GuestTimeout("QEMU did not connect the agent channel",
                                           **self._ctx()) from None
        finally:
            lsock.close()
        try:
            self._qmp.accept(30)
        except TimeoutError:
            self._health()
            raise GuestTimeout("QEMU did not connect QMP", **self._ctx()) from None
        except Exception as exc:
            # qemu.qmp's ConnectError, or its runstate assertion when QEMU hangs up right
            # after the greeting (it exits there on an -incoming stream it cannot load): a
            # VMError, so a failed restore falls back to a cold boot
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            self._health()
            raise VMError(f"QEMU's QMP session failed ({type(exc).__name__}: {exc})",
                          **self._ctx()) from None
        self._agent = AgentChannel(self._agent_sock, health=self._health,
                                   context=lambda: (self.console_tail(), self._log_str()),
                                   on_broken=self._broken)

    def _log_str(self) -> str | None:
        return str(self.console_log) if self.console_log else None

    def _ctx(self) -> _Ctx:
        self._failed = True
        return {"console_tail": self.console_tail(), "log_path": self._log_str()}

    def _health(self) -> None:
        """Raise ``MachineDied`` if QEMU has exited."""
        if self.proc is None:
            raise MachineDied("machine not started")
        rc = self.proc.poll()
        if rc is not None:
            self._failed = True
            err = ""
            if self.rundir and (self.rundir / "qemu.stderr").exists():
                err = (self.rundir / "qemu.stderr").read_text(errors="replace").strip()[-2000:]
            raise MachineDied(f"QEMU exited with status {rc}" + (f": {err}" if err else ""),
                              console_tail=self.console_tail(), log_path=self._log_str())

    def _broken(self) -> None:
        """The agent channel broke: QEMU is probably exiting; give it a moment, then check."""
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._failed = True
        self._health()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def console_tail(self, lines: int = 40) -> str:
        if not self.console_log or not self.console_log.exists():
            return ""
        with open(self.console_log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])

    def shutdown(self, timeout: float = 20.0) -> None:
        """Power the guest off (sync + poweroff via the agent, then QMP quit), waiting at most
        *timeout* seconds before killing QEMU."""
        if not self.alive:
            return
        deadline = time.monotonic() + timeout
        with contextlib.suppress(Exception):
            for d in list(self._disks.values()):
                self.detach(d, timeout=max(1.0, deadline - time.monotonic()) / 2)
        with contextlib.suppress(Exception):
            if self._agent is not None:
                self.run("sync", timeout=max(1.0, deadline - time.monotonic()) / 2)
        with contextlib.suppress(Exception):
            if self._qmp is not None:
                self._qmp.execute("quit", None, max(0.5, deadline - time.monotonic()))
        assert self.proc is not None
        try:
            self.proc.wait(max(0.5, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL QEMU's process group and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def close(self) -> None:
        """Shut down (or kill) QEMU, stop the QMP thread, remove the run directory (kept when
        something failed or ``DMIMAGE_VM_KEEP=1``)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.alive:
                self.shutdown()
        finally:
            self.kill()
            _LIVE.discard(self)
            if self._agent_sock is not None:
                self._agent_sock.close()
            if self._qmp is not None:
                self._qmp.close()
            if self.rundir is not None:
                for s in ("qmp.sock", "agent.sock", "hash-scratch.img"):
                    with contextlib.suppress(OSError):
                        (self.rundir / s).unlink()
                if not (self._failed or self.keep_logs):
                    shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> Machine:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._failed = True
        self.close()

    # -- QMP ---------------------------------------------------------------------------------
    def qmp(self, command: str, arguments: dict[str, Any] | None = None, /, *,
            timeout: float = 30.0, **kwargs: Any) -> Any:
        """Execute a QMP command with *arguments* (a dict, for names like ``node-name``) and/or
        keyword arguments; errors become ``QMPCommandError``."""
        from qemu.qmp import ExecuteError, QMPError

        args = {**(arguments or {}), **kwargs}

        self._health()
        assert self._qmp is not None
        try:
            return self._qmp.execute(command, args or None, timeout)
        except ExecuteError as exc:
            raise QMPCommandError(f"QMP {command} failed: {exc}") from exc
        except QMPError as exc:  # disconnected: QEMU is exiting (e.g. a restore failed)
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            self._health()
            raise VMError(f"QMP {command}: {exc!r}", **self._ctx()) from exc
        except TimeoutError:
            self._health()
            raise GuestTimeout(f"QMP {command} did not answer in {timeout} s",
                               **self._ctx()) from None

    def wait_event(self, name: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        assert self._qmp is not None
        try:
            return self._qmp.wait_event(name, match, time.monotonic() + timeout, self._health)
        except TimeoutError:
            raise GuestTimeout(f"no QMP event {name} {match or ''} within {timeout} s",
                               **self._ctx()) from None

    # -- agent -------------------------------------------------------------------------------
    def run(self, command: str | bytes, *, timeout: float = 60.0, check: bool = False,
            host_grace: float | None = None) -> CommandResult:
        """Run a shell command in the guest (busybox sh, PATH=/sbin:/bin, cwd /tmp,
        DM_DISABLE_UDEV=1). See ``AgentChannel.run``; *host_grace* overrides how long past
        *timeout* the host waits before raising ``GuestTimeout``."""
        if self._agent is None:
            raise VMError("machine not started")
        with self._lock:
            saved = self._agent.host_grace
            if host_grace is not None:
                self._agent.host_grace = host_grace
            try:
                res = self._agent.run(command, timeout=timeout)
            except GuestTimeout:
                self._failed = True
                raise
            finally:
                self._agent.host_grace = saved
            if res.timed_out:
                res.diagnostics += self._disk_queues()
            if check and not res.ok:
                raise GuestCommandError(res, log_path=self._log_str())
            return res

    def _disk_queues(self) -> bytes:
        """QEMU's side of each disk's virtio queues, for a timed-out command's diagnostics:
        requests QEMU took and has not completed ("in use"), and completions it posted (used)
        and signalled. With the guest's requests in flight this tells a host I/O that never
        ended from a completion the guest never saw; then QEMU's threads and their waits."""
        parts = []
        for d in self.disks:
            for q in range(self.cpus):  # virtio-blk's num-queues defaults to the vCPU count
                try:
                    st = self.qmp("x-query-virtio-queue-status", timeout=5, queue=q,
                                  path=f"/machine/peripheral/{d.device_id}/virtio-backend")
                except VMError:
                    break
                parts.append(f" {d.serial} {d.guest_path} q{q} {st['inuse']} {st['used-idx']} "
                             f"{st['signalled-used']};")
        threads = []  # a worker blocked in the host's file I/O shows here (state D)
        for task in sorted(Path(f"/proc/{self.pid}/task").glob("*")) if self.pid else ():
            try:
                stat = (task / "stat").read_text()
                wchan = (task / "wchan").read_text().strip() or "-"
            except OSError:
                continue
            name, state = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2]
            threads.append(f" {name} {state} {wchan};")
        return ("QEMU disk queues (serial guest-path queue in-use used signalled):"
                + ("".join(parts) or " none") + "\nQEMU threads (name state wchan):"
                + "".join(threads) + "\n").encode()

    def sh(self, command: str, *, timeout: float = 60.0) -> str:
        """Run *command*, raise ``GuestCommandError`` unless it exits 0, return stdout text."""
        return self.run(command, timeout=timeout, check=True).out

    def dmesg(self) -> str:
        return self.run("dmesg", timeout=30, check=True).out

    def dmesg_since_command(self) -> str:
        """Shell command printing the kernel log from the last line :meth:`check_dmesg` saw
        (that line first, as an anchor) to the end.

        The log is ~25 KB after boot: on the old serial line, reading all of it after every
        test cost ~0.5 s and ~0.2 QEMU CPU-s."""
        if not self._dmesg_seen:
            return "dmesg"
        return f"dmesg | tail -n +{self._dmesg_seen}"

    def check_dmesg(self, *, allow: tuple[str, ...] = (), since_last: bool = True,
                    log: str | None = None) -> None:
        """Raise ``KernelProblem`` if the guest's kernel log shows BUG/WARNING/Call Trace.
        With *since_last*, only lines added since the previous check are looked at. *log*:
        the output of :meth:`dmesg_since_command` if the caller already ran it (in a command
        of its own)."""
        if not since_last:
            lines = self.dmesg().splitlines()
            self._note_dmesg(lines)
            check_kernel_log("\n".join(lines), allow=allow, log_path=self._log_str())
            return
        if log is None:
            log = self.run(self.dmesg_since_command(), timeout=30, check=True).out
        lines = log.splitlines()
        if not self._dmesg_seen:
            new = lines
        elif lines and lines[0] == self._dmesg_last:
            new = lines[1:]
            lines = [""] * (self._dmesg_seen - 1) + lines  # the log as a whole, for its length
        else:
            # The ring buffer wrapped (or was cleared): the new lines follow the anchor's last
            # occurrence; with the anchor gone, every line still in the buffer is checked.
            lines = self.dmesg().splitlines()
            at = max((i for i, x in enumerate(lines) if x == self._dmesg_last), default=-1)
            new = lines[at + 1:]
        self._note_dmesg(lines)
        check_kernel_log("\n".join(new), allow=allow, log_path=self._log_str())

    def _note_dmesg(self, lines: list[str]) -> None:
        self._dmesg_seen = len(lines)
        self._dmesg_last = lines[-1] if lines else ""

    #: Below this many bytes the guest hashes by itself (one ``sha256sum``).
    HASH_IN_GUEST_BELOW = 1 << 20
    #: Virtual size of the scratch disk that larger hashes go through (a sparse host file).
    SCRATCH_BYTES = 64 << 30

    def sha256_of(self, guest_path: str, size: int | None = None, *, timeout: float = 600.0
                  ) -> str:
        """sha256 (hex) of the first *size* bytes of a guest file or device (all if None).

        The guest reads the bytes (through its kernel: a dm device serves what the kernel
        maps); busybox's sha256 runs at ~8-10 MB/s under TCG, a copy at ~100 MB/s. So from
        ``HASH_IN_GUEST_BELOW`` bytes on, the guest copies them with O_DIRECT onto a scratch
        disk of this machine (attached on first use, kept out of :attr:`disks`) and the host
        hashes the copy, then zeroes it: 32 MiB in ~0.4 s instead of ~4 s. Smaller (or not
        sector-sized) ranges are hashed in the guest by ``dd bs=1M | sha256sum`` (busybox
        ``head -c`` copies in small pieces, 3-4x slower under TCG)."""
        return self.sha256_many([(guest_path, size)], timeout=timeout)[0]

    def sha256_many(self, items: list[tuple[str, int | None]], *, timeout: float = 600.0
                    ) -> list[str]:
        """:meth:`sha256_of` of each ``(guest path, size or None)``, in one guest command."""
        scratch = self._scratch_disk()
        lines = ["set -o pipefail; o=0"]
        for guest_path, size in items:
            q = shlex.quote(guest_path)
            limit = f"[ $n -gt {int(size)} ] && n={int(size)}; " if size is not None else ""
            lines.append(
                f"if [ -b {q} ]; then n=$(blockdev --getsize64 {q}); "
                f"else n=$(stat -L -c %s {q}); fi; {limit}"
                f"if [ $n -ge {self.HASH_IN_GUEST_BELOW} ] && [ $((n % 512)) -eq 0 ] && "
                f"[ $((o + n)) -le {self.SCRATCH_BYTES} ]; then "
                f"dd if={q} of={scratch.guest_path} bs=1048576 count=$n seek=$o "
                "iflag=count_bytes,fullblock oflag=seek_bytes,direct conv=notrunc status=none "
                "&& echo copied $o $n && o=$(( (o + n + 1048575) / 1048576 * 1048576 )); "
                f"else dd if={q} bs=1048576 count=$n iflag=count_bytes,fullblock status=none "
                "| sha256sum; fi || exit 1")
        digests: list[str] = []
        try:
            out = self.sh("\n".join(lines), timeout=timeout).splitlines()
            if len(out) != len(items):
                raise VMError(f"sha256 of {len(items)} guest paths: {len(out)} answers: {out!r}")
            with open(scratch.host_path, "rb") as f:
                for (guest_path, _), line in zip(items, out, strict=True):
                    words = line.split()
                    if words[0] != "copied":
                        digests.append(words[0])
                        continue
                    f.seek(int(words[1]))
                    digests.append(_sha256_exact(f, int(words[2]), guest_path))
        finally:
            # Back to zeros (and no host space): the guest never reads the scratch disk.
            os.truncate(scratch.host_path, 0)
            os.truncate(scratch.host_path, self.SCRATCH_BYTES)
        return digests

    def _scratch_disk(self) -> Disk:
        """The hashing scratch disk, attached writable on first use; not in :attr:`disks`, so
        the per-test cleanup leaves it attached."""
        if self._scratch is None:
            assert self.rundir is not None
            path = self.rundir / "hash-scratch.img"
            with open(path, "wb") as f:
                f.truncate(self.SCRATCH_BYTES)
            disk = self.attach(path, read_only=False, serial="dmimage-scratch")
            with self._lock:
                del self._disks[disk.device_id]
            self._scratch = disk
        return self._scratch

    def read_bytes(self, guest_path: str, offset: int = 0, size: int = 4096, *,
                   timeout: float = 120.0) -> bytes:
        """*size* bytes of a guest file or device from *offset* (small reads: the agent channel
        moves ~1-2 MB/s under TCG; hash big ranges with ``sha256_of``)."""
        q = shlex.quote(guest_path)
        res = self.run(f"dd if={q} bs=65536 skip={int(offset)} count={int(size)} "
                       "iflag=skip_bytes,count_bytes,fullblock status=none",
                       timeout=timeout, check=True)
        return res.stdout

    # -- disks -------------------------------------------------------------------------------
    def attach(self, path: str | os.PathLike[str], *, read_only: bool = True,
               serial: str | None = None, timeout: float = 60.0) -> Disk:
        """Hot-plug *path* as a virtio-blk disk; returns once the guest sees it.

        ``blockdev-add`` (file + raw) → ``device_add virtio-blk-pci`` with ``serial=`` → wait in
        the guest for ``/sys/block/*/serial`` to match.
        """
        return self.attach_many([path], read_only=read_only,
                                serials=[serial] if serial else None, timeout=timeout)[0]

    #: Polls (0.1 s each) before the guest rescans its PCI bus for disks it has not seen: a
    #: plug right after an unplug was once missed by the guest's ACPI hot-plug (the disk never
    #: showed up within 60 s; seen under load, on the unchanged harness too), and a rescan
    #: finds a device in its slot whatever happened to the notification.
    RESCAN_AFTER_TRIES = 50

    def attach_many(self, paths: Sequence[str | os.PathLike[str]], *,
                    read_only: bool | Sequence[bool] = True,
                    serials: Sequence[str] | None = None, timeout: float = 60.0) -> list[Disk]:
        """:meth:`attach` of each path (*read_only* one flag for all, or one per path), with
        one wait in the guest for all of them: the guest's ACPI hot-plug handles the new
        slots in one rescan (3 disks: ~1.0-1.2 QEMU CPU-s instead of ~1.3-1.6, load ~10)."""
        flags = [read_only] * len(paths) if isinstance(read_only, bool) else list(read_only)
        if len(flags) != len(paths) or (serials is not None and len(serials) != len(paths)):
            raise ValueError("attach_many: one read_only flag and serial per path")
        disks = [self._plug(Path(p).resolve(), ro, serials[k] if serials else None)
                 for k, (p, ro) in enumerate(zip(paths, flags, strict=True))]
        if not disks:
            return []
        self._wait_for_disks(disks, timeout)
        return disks

    def _wait_for_disks(self, disks: Sequence[Disk], timeout: float) -> None:
        """Wait until the guest shows each disk (by serial); set their ``guest_path``."""
        tries = max(1, int(timeout * 10))
        # Builtins only (~10 ms of TCG CPU per process start): ``read`` for the serial (which
        # has no newline: read's status is 1), and for the pause a ``read -t`` on the agent's
        # fifo that nobody writes. Prints the disks' device nodes in order once all are there.
        # A disk counts once its node opens (``true <node``, a plain builtin: a failed redirection
        # on a special one such as ``:`` ends the shell): devtmpfs makes the node before the
        # kernel's first partition scan, which holds the disk's open mutex, so an open that
        # succeeds returns after the scan and the partitions' nodes exist (CI once saw
        # /dev/vda without /dev/vda1 right after the attach). That holds from 6.1 on (the
        # flag that makes the first open scan is set before the disk can be opened); 5.10's
        # register_disk opens the disk for its scan only after device_add, so an open can
        # slip in before it (a poller in a deb11 guest opened /dev/vda without /dev/vda1 in
        # 5 of 6 hot-plugs), but there the disk's queue/ directory is made after that scan
        # (blk_register_queue follows register_disk): the disk also waits for queue/, which
        # 6.x makes before the disk can be opened at all.
        wanted = " ".join(shlex.quote(d.serial) for d in disks)
        script = (
            f"i=0; while [ $i -lt {tries} ]; do out=; for w in {wanted}; do f=; "
            f"for d in /sys/block/vd*; do s=; read -r s <$d/serial 2>/dev/null; "
            f"[ \"$s\" = \"$w\" ] && [ -b /dev/${{d##*/}} ] && [ -d $d/queue ] && "
            f"true 2>/dev/null </dev/${{d##*/}} "
            f"&& {{ f=/dev/${{d##*/}}; break; }}; "
            f"done; [ -n \"$f\" ] || break; out=\"$out $f\"; done; "
            f"[ -n \"$f\" ] && {{ echo $out; exit 0; }}; "
            f"[ $i -eq {self.RESCAN_AFTER_TRIES} ] && echo 1 >/sys/bus/pci/rescan && "
            "echo rescanned >&2; "
            f"read -t 0.1 s <>/tmp/.wd; i=$((i+1)); done; exit 1")
        res = self.run(script, timeout=timeout + 5)
        if "rescanned" in res.err:
            log.warning("dmimage-vm: the guest had not seen %s after %.0f s; rescanned its PCI "
                        "bus (%s)", ", ".join(d.serial for d in disks),
                        self.RESCAN_AFTER_TRIES / 10, "found" if res.ok else "still missing")
        found = res.out.split()
        if not res.ok or len(found) != len(disks):
            names = ", ".join(f"{d.serial} ({d.host_path})" for d in disks)
            raise HotplugError(f"guest did not see disk {names} within {timeout} s",
                               **self._ctx())
        for d, node in zip(disks, found, strict=True):
            d.guest_path = node

    def _plug(self, host: Path, read_only: bool, serial: str | None) -> Disk:
        """``blockdev-add`` + ``device_add`` of one disk (the guest is not waited for)."""
        if not host.exists():
            raise HotplugError(f"{host}: no such file")
        with self._lock:
            self._counter += 1
            n = self._counter
        serial = serial or f"dmimage{n}"
        if len(serial) > 20:
            raise HotplugError(f"serial {serial!r} longer than virtio-blk's 20 bytes")
        node, dev = f"dmimage-node{n}", f"dmimage-disk{n}"
        # ``no-flush`` (scratch disks only): a guest flush (every fsync, every pool commit)
        # would otherwise be an fdatasync of the host file, i.e. a disk round trip and journal
        # work on the host. The guest's kernel still issues its flushes and sees them complete;
        # what it wrote is in the host's page cache at once, where every host-side reader finds
        # it. Only a host crash could lose it: fine for a test's scratch image, not for a
        # user's disk, whose pool commits rely on the flush ordering data before superblock.
        cache = {"direct": False, "no-flush": self.scratch_disks}
        self.qmp("blockdev-add", {"driver": "raw", "node-name": node, "read-only": read_only,
                                  "cache": cache,
                                  "file": {"driver": "file", "filename": str(host),
                                           "read-only": read_only, "cache": cache}})
        try:
            self.qmp("device_add", driver="virtio-blk-pci", id=dev, drive=node, serial=serial)
        except BaseException:
            with contextlib.suppress(Exception):
                self.qmp("blockdev-del", {"node-name": node})
            raise
        disk = Disk(host, "", serial, dev, node, read_only)
        self._disks[dev] = disk
        return disk

    def detach(self, disk: Disk, *, timeout: float = 60.0) -> None:
        """``device_del`` → wait for DEVICE_DELETED → ``blockdev-del``."""
        self.detach_many([disk], timeout=timeout)

    def detach_many(self, disks: Sequence[Disk], *, timeout: float = 60.0) -> None:
        """:meth:`detach` of each disk: one flush command in the guest, every ``device_del``
        sent before the first wait."""
        disks = [d for d in disks if d.device_id in self._disks]
        if not disks:
            return
        # Write back what the guest's page cache still holds for the devices.
        paths = " ".join(shlex.quote(d.guest_path) for d in disks if d.guest_path)
        self.run(f"for d in {paths}; do blockdev --flushbufs $d; done 2>/dev/null; sync"
                 if paths else "sync", timeout=timeout)
        for d in disks:
            self.qmp("device_del", id=d.device_id)
        for d in disks:
            try:
                self.wait_event("DEVICE_DELETED", timeout, device=d.device_id)
            except GuestTimeout as exc:
                raise HotplugError(f"guest did not release disk {d.serial} within {timeout} s",
                                   console_tail=exc.console_tail,
                                   log_path=exc.log_path) from None
            del self._disks[d.device_id]
            self.qmp("blockdev-del", {"node-name": d.node_name})

    @contextlib.contextmanager
    def disks_attached(self, paths: Sequence[str | os.PathLike[str]], *,
                       read_only: bool | Sequence[bool] = True, timeout: float = 60.0
                       ) -> Iterator[list[Disk]]:
        """:meth:`attach_many` for the duration of a ``with`` block."""
        ds = self.attach_many(paths, read_only=read_only, timeout=timeout)
        try:
            yield ds
        finally:
            if self.alive:
                self.detach_many(list(reversed(ds)), timeout=timeout)

    @contextlib.contextmanager
    def disk(self, path: str | os.PathLike[str], *, read_only: bool = True,
             serial: str | None = None, timeout: float = 60.0) -> Iterator[Disk]:
        """Attach *path* for the duration of a ``with`` block."""
        d = self.attach(path, read_only=read_only, serial=serial, timeout=timeout)
        try:
            yield d
        finally:
            if self.alive:
                self.detach(d, timeout=timeout)

    @property
    def disks(self) -> list[Disk]:
        return list(self._disks.values())
