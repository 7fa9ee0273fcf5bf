"""What differs between the guest kernels (deb11, deb12, deb13, deb13-backports), seen from
inside each guest: the appliance's modules all load, and docs/vm.md's kernel table is true.

Run on one kernel with ``DMIMAGE_VM_KERNELS=deb11`` (or ``all``); see docs/vm.md "Kernels".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmimage.guest.machine import Machine

DOCS_VM = Path(__file__).resolve().parents[1] / "docs" / "vm.md"


def _modname(name: str) -> str:
    return re.sub(r"\.ko$", "", name).replace("-", "_")


@pytest.mark.vm
def test_every_appliance_module_loads(dm_vm: Machine) -> None:
    """Each module the appliance chose for this kernel (built-ins and modules folded into the
    core left out) is live in the guest, and /init reported no failed insmod."""
    # One guest command; of the kernel log only /init's lines cross the agent's line.
    order_text, modules, init_log, sys_ls = dm_vm.sh(
        "cat /etc/modules.order; echo @@; cat /proc/modules; echo @@; "
        "dmesg | grep dmimage-guest; echo @@; ls /sys/module").split("@@\n")
    order = order_text.split()
    assert order, "the appliance loads no modules"
    live = {line.split()[0] for line in modules.splitlines()}
    assert [m for m in order if _modname(m) not in live] == []
    assert "insmod" not in init_log
    # What the kernel has built in is not loaded as a module but is there (/sys/module).
    sys_module = set(sys_ls.split())
    for mod in ("virtio_pci", "dm_mod", "dm_thin_pool", "virtio_blk"):
        assert mod in sys_module, mod


def _documented_row(name: str) -> dict[str, str]:
    """The row of docs/vm.md's "Kernels" table for kernel *name*."""
    text = DOCS_VM.read_text()
    section = text[text.index("## Kernels"):]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] == f"`{name}`":
            return {"series": cells[1], "thin_pool": cells[4]}
    raise AssertionError(f"docs/vm.md's Kernels table has no row for {name}")


@pytest.mark.vm
def test_documented_kernel_facts(dm_vm: Machine) -> None:
    """docs/vm.md names each kernel's series and thin-pool target version: the guest must say
    the same (a Debian kernel update that changes them must update the table)."""
    name = dm_vm.kernel.name
    if "/" in name:
        pytest.skip("a kernel given by path has no documented row")
    row = _documented_row(name)
    uname, _, target_lines = dm_vm.sh("uname -r; dmsetup targets").partition("\n")
    assert uname.startswith(row["series"] + "."), (
        f"docs/vm.md says {name} is {row['series']}, the guest runs {uname}")
    targets = dict(line.split()[:2] for line in target_lines.splitlines())
    assert targets["thin-pool"] == row["thin_pool"], targets
    assert targets["thin"] == row["thin_pool"]
