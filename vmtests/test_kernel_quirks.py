"""Kernel differences the VM suite found, each pinned by a test (docs/vm.md, "Kernels").

Debian's 7.3 kernel (deb13-backports) oopses with a divide error in ``blk_stack_limits`` (from
``dm_calculate_queue_limits``) when a ``snapshot`` or ``snapshot-merge`` table with the
``discard_zeroes_cow`` feature is loaded: ``dmsetup`` dies with SIGSEGV (exit 139) and the
kernel log shows the oops. 5.10, 6.1 and 6.12 load the same tables. dmimage accepts them
(they are valid by the target's documentation); ``vmtests/tablegen.py`` leaves the feature out
of snapshot tables on 7.x so the round trip does not crash the shared guest. When Debian
ships a fixed 7.x this test fails: drop the exception there and here.

Debian 11's 5.10.223 (the newest 5.10 Debian 11 ships) has two bugs on tables the other
kernels refuse cleanly:

- ``snapshot-merge`` on a transient (``N``) store: 6.1 and later refuse it in ``snapshot_ctr``
  ("Snapshot exception store does not support snapshot-merge."); 5.10.223 has no such check
  and oopses (NULL pointer call from ``snapshot_merge_next_chunks`` on resume).
- ``cache`` with a policy the kernel does not have, an odd number of policy words or a key
  the policy does not know: every kernel refuses them, but 5.10.223's ``cache_ctr`` error
  path then flushes a work item it never initialised: a ``WARNING`` in ``__flush_work``
  ("dm cache: fix flushing uninitialized delayed_work on cache_ctr error", upstream in 2024,
  queued for the 5.10 stable series in 2025).

dmimage refuses all of these tables. The shared-guest near-miss run (``test_tables_guest.py``)
does not load them on 5.10 (``KERNEL_BUGS`` in ``vmtests/tablegen.py``); the tests below load
each in a guest of its own and pin what every kernel does, so a fixed 5.10 (or a 6.x that
regresses) shows.

A case that oopses on a kernel boots a guest of its own there (a restored state, about a
second; the oops taints it); the others share one guest per kernel, each on fresh disks and
judged on the kernel log lines it added.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmimage.guest.agent import find_kernel_problems
from dmimage.guest.kernels import selected_names
from dmimage.guest.machine import Machine
from dmimage.guest.pytest_plugin import unavailable
from dmimage.table import parse_table
from dmimage.table.args import KernelVersion
from vmtests.tablegen import KERNEL_BUGS

pytestmark = pytest.mark.vm

SECTORS = 4792  # any size; the first generated case that hit it had this one
DISK_BYTES = 4 << 20


def _boot(name: str) -> Machine:
    from dmimage.guest.errors import HarnessUnavailable
    from dmimage.guest.kernels import KernelNotFound, kernel_by_name

    try:
        return Machine(kernel_by_name(name, fetch=True)).start()
    except (KernelNotFound, HarnessUnavailable) as exc:
        unavailable(str(exc))


def _series(name: str) -> KernelVersion:
    from dmimage.guest.kernels import KernelNotFound, kernel_by_name

    try:
        version = kernel_by_name(name, fetch=True).version
    except KernelNotFound as exc:
        unavailable(str(exc))
    major, minor = re.split(r"[.-]", version)[:2]
    return int(major), int(minor)


@pytest.fixture(scope="module")
def quiet_guests() -> Iterator[dict[str, Machine]]:
    """One guest per kernel for the cases that do not oops there, started on first use."""
    guests: dict[str, Machine] = {}
    yield guests
    for vm in guests.values():
        vm.close()


def _refused(table: str, kernel: str) -> bool:
    """dmimage's verdict for that kernel: an error, not only a warning."""
    return any(not p.warning for p in parse_table(table).problems(kernel=_series(kernel)))


class Case:
    """One table on fresh disks in *vm*: returns the dmsetup result and the new log lines."""

    def __init__(self, vm: Machine, tmp_path: Path, disks: int) -> None:
        self.vm = vm
        files = []
        for i in range(disks):
            p = tmp_path / f"d{i}.img"
            with open(p, "wb") as f:
                f.truncate(DISK_BYTES)
            files.append(p)
        self.paths = [d.guest_path for d in vm.attach_many(files, read_only=False)]

    def load(self, name: str, table: str) -> tuple[int, str]:
        # One guest command; only the lines the create added cross the agent's line.
        r = self.vm.run(f"n=$(dmesg | wc -l); dmsetup create {name} --table '{table}'; rc=$?; "
                        "echo @@dmesg@@; dmesg | tail -n +$((n + 1)); exit $rc", timeout=120)
        return r.returncode, "\n".join(r.out.partition("@@dmesg@@\n")[2].splitlines())


def _guest_for(kernel: str, oopses: bool, guests: dict[str, Machine]
               ) -> contextlib.AbstractContextManager[Machine]:
    if oopses:
        return _boot(kernel)
    if kernel not in guests:
        guests[kernel] = _boot(kernel)
    return contextlib.nullcontext(guests[kernel])


@pytest.mark.parametrize("target,store,sectors", [("snapshot-merge", "P", SECTORS),
                                                   ("snapshot", "PO", 40)])
@pytest.mark.parametrize("kernel", selected_names())
def test_snapshot_discard_zeroes_cow(kernel: str, target: str, store: str, sectors: int,
                                     quiet_guests: dict[str, Machine], tmp_path: Path) -> None:
    oopses = _series(kernel) >= (7, 0)
    with _guest_for(kernel, oopses, quiet_guests) as vm:
        case = Case(vm, tmp_path, 2)
        o, c = case.paths
        table = f"0 {sectors} {target} {o} {c} {store} 8"
        # Without the feature every kernel loads it: the crash is the feature's.
        plain = vm.run(f"dmsetup create q0 --table '{table} 0' && dmsetup remove q0",
                       timeout=120)
        assert plain.returncode == 0, plain
        rc, log = case.load("q1", f"{table} 1 discard_zeroes_cow")
        if oopses:
            assert rc == 139, (rc, log[-3000:])
            assert "divide error" in log and "blk_stack_limits" in log, log[-3000:]
        else:
            assert rc == 0, (rc, log[-3000:])
            assert "discard_zeroes_cow" in vm.sh("dmsetup table q1")
            vm.sh("dmsetup remove q1")
            assert not find_kernel_problems(log), log


@pytest.mark.parametrize("kernel", selected_names())
def test_snapshot_merge_transient_store(kernel: str, quiet_guests: dict[str, Machine],
                                        tmp_path: Path) -> None:
    oopses = _series(kernel) == KERNEL_BUGS["snapshot-merge: transient store"][0]
    with _guest_for(kernel, oopses, quiet_guests) as vm:
        case = Case(vm, tmp_path, 2)
        table = f"0 64 snapshot-merge {case.paths[0]} {case.paths[1]} N 8"
        assert _refused(table, kernel), "dmimage accepts it"
        rc, log = case.load("q2", table)
        assert rc != 0, (rc, log[-3000:])
        if oopses:
            assert "NULL pointer dereference" in log and "snapshot_merge_next_chunks" in log, \
                log[-3000:]
        else:
            assert "does not support snapshot-merge" in log, log[-3000:]
            assert not find_kernel_problems(log), log


#: The cache near misses that fail inside cache_create (test_tables_guest.py's labels), with
#: the policy words and the kernel's reason.
CACHE_CTR_ERRORS = {
    "cache: unknown policy": ("lru 0", "unknown policy type"),
    "cache: odd policy args": ("smq 1 migration_threshold", "Odd number of policy arguments"),
    "cache: unknown policy key": ("smq 2 sequential_threshold 4",
                                  "bad config value for sequential_threshold"),
}


@pytest.mark.parametrize("label", sorted(CACHE_CTR_ERRORS))
@pytest.mark.parametrize("kernel", selected_names())
def test_cache_ctr_error_path(kernel: str, label: str, quiet_guests: dict[str, Machine],
                              tmp_path: Path) -> None:
    """A WARNING does not break the guest: every kernel runs these in its shared guest."""
    policy, reason = CACHE_CTR_ERRORS[label]
    with _guest_for(kernel, False, quiet_guests) as vm:
        case = Case(vm, tmp_path, 3)
        table = f"0 1024 cache {' '.join(case.paths)} 64 0 {policy}"
        assert _refused(table, kernel), "dmimage accepts it"
        rc, log = case.load("q3", table)
        assert rc != 0, (rc, log[-3000:])
        assert reason in log, log[-3000:]
        if _series(kernel) == KERNEL_BUGS[label][0]:
            assert "WARNING" in log and "__flush_work" in log, log[-3000:]
        else:
            assert not find_kernel_problems(log), log
