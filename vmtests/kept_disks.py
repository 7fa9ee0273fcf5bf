"""Scratch disks hot-plugged into the session's guest once per test module, kept across its tests.

Under TCG a hot-plug and unplug of a few disks costs the guest ~1 QEMU CPU-s (ACPI PCI
hot-plug, the virtio-blk probe, the removal), more than most of what a test then does with
them. The ``dm_vm`` guard detaches every disk after each test, so tests that keep disks
take their guest by kernel name instead (a ``kernel`` parameter and
:func:`dmimage.guest.pytest_plugin.boot_machine`: the same session guest) and
:func:`kept_disks` does the guard's work after each test itself: leftover dm devices are
removed (with a warning), the kernel log lines the test added are checked.

Each test rewrites or zeroes the disks' host files before use (their sizes never change).
The guest cannot serve it stale bytes: dm targets read their devices with bios, not through
the disks' page cache (which :attr:`KeptDisks.flush` drops anyway, for the test's first
guest command), and QEMU reads the raw files through the host's page cache, which the
host's writes go to. If a test of another file detached them in between (its guard), they
are attached again.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from dmimage.guest.kernels import selected_names
from dmimage.guest.machine import Disk, Machine
from dmimage.guest.pytest_plugin import boot_machine


class KeptDisks:
    """Sparse files of the given sizes, attached writable to *vm* in one hot-plug."""

    def __init__(self, vm: Machine, directory: Path, sizes: Sequence[int]) -> None:
        self.vm = vm
        self.files: list[Path] = []
        self.sizes = list(sizes)
        for i, size in enumerate(sizes):
            p = directory / f"kept{i}.img"
            with open(p, "wb") as f:
                f.truncate(size)
            self.files.append(p)
        self.disks: list[Disk] = []
        self.ensure()

    def ensure(self) -> None:
        """Attached (again, if a guard of another file's test detached them)."""
        ids = {d.device_id for d in self.vm.disks}
        if self.disks and all(d.device_id in ids for d in self.disks):
            return
        self.vm.detach_many([d for d in self.disks if d.device_id in ids])
        self.disks = self.vm.attach_many(self.files, read_only=False)

    @property
    def paths(self) -> list[str]:
        """The guest's device nodes, in the order of the sizes."""
        return [d.guest_path for d in self.disks]

    @property
    def flush(self) -> str:
        """Guest shell commands dropping the guest's page cache of every kept disk."""
        return "; ".join(f"blockdev --flushbufs {p}" for p in self.paths) + "; "

    def zero(self) -> None:
        """Every file back to zeros (and no space on the host)."""
        for p, size in zip(self.files, self.sizes, strict=True):
            os.truncate(p, 0)
            os.truncate(p, size)

    def close(self) -> None:
        if self.vm.alive:
            ids = {d.device_id for d in self.vm.disks}
            self.vm.detach_many([d for d in reversed(self.disks) if d.device_id in ids])
        for p in self.files:
            p.unlink(missing_ok=True)


def after_test(vm: Machine, nodeid: str) -> None:
    """The ``dm_vm`` guard's check, in one guest command: leftover dm devices are removed
    (with a warning), the kernel log lines since the last check must show no problem."""
    left, _, log = vm.run(f"dmsetup ls; echo @@dmesg@@; {vm.dmesg_since_command()}",
                          timeout=30, check=True).out.partition("@@dmesg@@\n")
    if left.strip() and "No devices found" not in left:
        vm.run("dmsetup remove_all --force", timeout=60)
        warnings.warn(f"{nodeid} left dm devices in the guest: "
                      f"{' '.join(line.split()[0] for line in left.splitlines() if line)}",
                      stacklevel=1)
        vm.check_dmesg()
        return
    vm.check_dmesg(log=log)


def parametrize_kernel(metafunc: pytest.Metafunc) -> None:
    """For a module's ``pytest_generate_tests``: ``kernel`` over the selected kernels, as
    ``dm_vm`` is (``--vm-kernels`` or ``$DMIMAGE_VM_KERNELS``)."""
    if "kernel" in metafunc.fixturenames:
        names = selected_names(metafunc.config.getoption("--vm-kernels", None))
        metafunc.parametrize("kernel", names, ids=names)


def kept_disks(sizes: Sequence[int]) -> tuple[Callable[..., object], Callable[..., object]]:
    """Fixtures ``(kept_sets, kept)`` for a test module: assign both at module level.

    ``kept`` (per test; the test takes a ``kernel`` parameter, see
    :func:`parametrize_kernel`) gives that kernel's :class:`KeptDisks` of *sizes*, attached
    on first use; ``kept_sets`` (per module) detaches them at the module's end."""

    @pytest.fixture(scope="module")
    def kept_sets() -> Iterator[dict[str, KeptDisks]]:
        sets: dict[str, KeptDisks] = {}
        yield sets
        for s in sets.values():
            s.close()

    @pytest.fixture
    def kept(kernel: str, request: pytest.FixtureRequest,
             kept_sets: dict[str, KeptDisks],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeptDisks]:
        vm = boot_machine(request.config, kernel)
        if kernel not in kept_sets:
            kept_sets[kernel] = KeptDisks(vm, tmp_path_factory.mktemp(f"kept-{kernel}"), sizes)
        k = kept_sets[kernel]
        k.ensure()
        yield k
        if vm.alive:
            after_test(vm, request.node.nodeid)

    return kept_sets, kept
