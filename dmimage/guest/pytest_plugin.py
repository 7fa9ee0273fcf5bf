"""pytest plugin (entry point ``pytest11: dmimage_vm``): the ``vm`` marker and VM fixtures.

Installing dmimage registers it in every pytest run of that environment, so any project can
use the fixtures without a conftest (docs/vm.md, "In another project"):

- ``dm_vm``: a booted ``Machine``, session-scoped and parametrized over the selected kernels
  (``--vm-kernels`` or ``$DMIMAGE_VM_KERNELS``, default deb12 plus deb13 when unpacked). One
  boot per kernel per session; scenarios hot-plug disks, never reboot.
- ``vm_disk``: ``vm_disk(path, read_only=True) -> Disk``, detached when the test ends.
- After every test that used ``dm_vm``: leftover dm devices are removed (with a warning),
  leftover disks are detached and the guest's kernel log
  (lines since the previous test) must show no BUG/WARNING/Call Trace. Allow expected lines
  with ``@pytest.mark.vm(allow_dmesg=[regex, ...])``.

Missing prerequisites (no QEMU, no kernel) skip the VM tests, unless ``DMIMAGE_VM_REQUIRED=1``
(or ``CI`` is set and ``DMIMAGE_VM_REQUIRED`` is not ``0``): then they are errors.
Because it is loaded into every pytest run, this module imports only pytest and the standard
library; the machinery (and QEMU's QMP library) is imported when a test first asks for
``dm_vm``. ``-p no:dmimage_vm`` disables it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn, Protocol

import pytest

if TYPE_CHECKING:
    from .machine import Disk, Machine

#: Per session: kernel name -> its booted machine, or the exception its boot raised.
_VMS = pytest.StashKey["dict[str, Machine | Exception]"]()


class DiskFactory(Protocol):
    """The ``vm_disk`` fixture: attach a host file to the session's guest."""

    def __call__(self, path: str | os.PathLike[str], read_only: bool = True,
                 serial: str | None = None) -> Disk: ...


def vm_required() -> bool:
    env = os.environ.get("DMIMAGE_VM_REQUIRED")
    if env is not None:
        return env not in ("", "0", "false", "no")
    return bool(os.environ.get("CI"))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dmimage-vm", "dmimage QEMU harness")
    group.addoption("--vm-kernels", default=None,
                    help="comma-separated guest kernels (deb11, deb12, deb13, deb13-backports, "
                         "all, or vmlinuz paths); default $DMIMAGE_VM_KERNELS or deb12 "
                         "(+deb13 when unpacked)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm(allow_dmesg=()): needs QEMU and a guest kernel (dmimage's QEMU harness)")
    config.stash[_VMS] = {}


def _kernel_names(config: pytest.Config) -> list[str]:
    from .kernels import selected_names

    return selected_names(config.getoption("--vm-kernels"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dm_vm" in metafunc.fixturenames:
        names = _kernel_names(metafunc.config)
        metafunc.parametrize("dm_vm", names, indirect=True, scope="session", ids=names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "dm_vm" in getattr(item, "fixturenames", ()) and item.get_closest_marker("vm") is None:
            item.add_marker(pytest.mark.vm)


def unavailable(message: str) -> NoReturn:
    """Skip for a missing prerequisite, or fail where the VM tests are required (CI)."""
    if vm_required():
        pytest.fail(f"VM harness required (DMIMAGE_VM_REQUIRED/CI) but unavailable: {message}",
                    pytrace=False)
    pytest.skip(f"VM harness unavailable: {message}")


def boot_machine(config: pytest.Config, name: str) -> Machine:
    """The session's machine for kernel *name*, booted on first use."""
    from .errors import HarnessUnavailable
    from .kernels import KernelNotFound, kernel_by_name, qemu_binary
    from .machine import Machine

    cache = config.stash[_VMS]
    if name in cache:
        cached = cache[name]
        if isinstance(cached, Exception):
            raise cached
        if not cached.alive:
            pytest.fail(f"the {name} guest died earlier in this session", pytrace=False)
        return cached
    if not qemu_binary():
        unavailable("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    try:
        kernel = kernel_by_name(name, fetch=True)
    except KernelNotFound as exc:
        unavailable(str(exc))
    try:
        vm = Machine(kernel).start()
    except HarnessUnavailable as exc:
        unavailable(str(exc))
    except Exception as exc:
        cache[name] = exc
        raise
    cache[name] = vm
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[dmimage-vm] {kernel} ready in {vm.boot_time:.2f} s "
                            f"({vm.start_kind}, {vm.accel}, guest uptime "
                            f"{vm.guest_uptime_at_ready:.2f} s)")
    return vm


def pytest_unconfigure(config: pytest.Config) -> None:
    for vm in config.stash.get(_VMS, {}).values():
        if not isinstance(vm, Exception):
            vm.close()


@pytest.fixture(scope="session")
def dm_vm(request: pytest.FixtureRequest) -> Machine:
    """A booted guest for one kernel (parametrized), shared by the whole session."""
    name = getattr(request, "param", None) or _kernel_names(request.config)[0]
    return boot_machine(request.config, name)


@pytest.fixture(autouse=True)
def _dm_vm_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used ``dm_vm``: detach leftovers, check the kernel log."""
    if "dm_vm" not in request.fixturenames:
        yield
        return
    yield
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("dm_vm") if callspec is not None else None
    vm = request.config.stash[_VMS].get(name) if name else None
    if vm is None or isinstance(vm, Exception) or not vm.alive:
        return
    # The usual case (nothing left) in one guest command: the dm devices, then the kernel log.
    log: str | None = None
    if vm.disks:
        left = vm.run("dmsetup ls", timeout=30).out
    else:
        left, _, log = vm.run(f"dmsetup ls; echo @@dmesg@@; {vm.dmesg_since_command()}",
                              timeout=30, check=True).out.partition("@@dmesg@@\n")
    if left.strip() and "No devices found" not in left:
        # A test left dm devices behind: clear them so later tests start clean.
        vm.run("dmsetup remove_all --force", timeout=60)
        log = None  # read again: the removal may have logged
        warnings.warn(f"{request.node.nodeid} left dm devices in the guest: "
                      f"{' '.join(line.split()[0] for line in left.splitlines() if line)}",
                      stacklevel=1)
    vm.detach_many(vm.disks)
    marker = request.node.get_closest_marker("vm")
    allow = tuple(marker.kwargs.get("allow_dmesg", ())) if marker else ()
    vm.check_dmesg(allow=allow, log=log)


@pytest.fixture
def vm_disk(dm_vm: Machine) -> Iterator[DiskFactory]:
    """Factory: ``vm_disk(path, read_only=True, serial=None) -> Disk``; detached at test end."""
    attached: list[Disk] = []

    def attach(path: str | os.PathLike[str], read_only: bool = True,
               serial: str | None = None) -> Disk:
        d = dm_vm.attach(path, read_only=read_only, serial=serial)
        attached.append(d)
        return d

    yield attach
    if dm_vm.alive:
        dm_vm.detach_many(list(reversed(attached)))
