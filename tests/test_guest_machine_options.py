"""Machine options that trade the guest's faithfulness for speed, and where they apply (no VM:
QMP and the agent recorded). A disk the user gives (``dmimage vm run --disk``, ``vm verify``,
``build --vm-verify``) keeps every flush its guest asks for: ``cache.no-flush`` would let the
host write a thin pool's superblock back before the data it commits, which a host crash then
shows. Only scratch disks (the VM suite's, ``Machine.scratch_disks``) skip them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dmimage.guest.agent import CommandResult
from dmimage.guest.kernels import Kernel
from dmimage.guest.machine import Machine


class _Recorded(Machine):
    def __init__(self, **kw: Any) -> None:
        super().__init__(Kernel("fake", "0", Path("/nonexistent"), Path("/nonexistent")), **kw)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def qmp(self, command: str, arguments: dict[str, Any] | None = None, /, *,
            timeout: float = 30.0, **kwargs: Any) -> Any:
        self.calls.append((command, {**(arguments or {}), **kwargs}))
        return {}

    def run(self, command: str | bytes, **_: object) -> CommandResult:  # type: ignore[override]
        return CommandResult(str(command), 0, b"/dev/vdb\n", b"", 0.0)


def _no_flush(vm: _Recorded, tmp_path: Path, read_only: bool) -> tuple[bool, bool]:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    vm.attach(img, read_only=read_only)
    (args,) = [a for c, a in vm.calls if c == "blockdev-add"]
    return (bool(args.get("cache", {}).get("no-flush", False)),
            bool(args["file"].get("cache", {}).get("no-flush", False)))


@pytest.mark.parametrize("read_only", [False, True])
def test_a_users_disk_keeps_the_guests_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               read_only: bool) -> None:
    monkeypatch.setattr(Machine, "scratch_disks", False, raising=False)  # default (vmtests turn it on)
    assert _no_flush(_Recorded(), tmp_path, read_only) == (False, False)


def test_scratch_disks_skip_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Machine, "scratch_disks", False)
    assert _no_flush(_Recorded(scratch_disks=True), tmp_path, False) == (True, True)
    monkeypatch.setattr(Machine, "scratch_disks", True)
    assert _no_flush(_Recorded(), tmp_path, False) == (True, True)
    assert _no_flush(_Recorded(scratch_disks=False), tmp_path, False) == (False, False)


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_aslr_and_mitigations_are_off_under_tcg_only(tmp_path: Path, accel: str) -> None:
    """``norandmaps mitigations=off`` save TCG's retranslation; under KVM they save nothing,
    and a guest that runs the user's commands (``dmimage vm run``) keeps the defaults."""
    vm = _Recorded()
    vm.rundir, vm.console_log = tmp_path, tmp_path / "console.log"
    argv = vm.command_line(tmp_path / "initrd", tmp_path / "bzImage", accel)
    words = argv[argv.index("-append") + 1].split()
    assert ("norandmaps" in words, "mitigations=off" in words,
            "cryptomgr.notests" in words) == ((accel == "tcg",) * 3)
    assert "console=ttyS0" in words
