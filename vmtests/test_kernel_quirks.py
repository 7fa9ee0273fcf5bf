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
second; the oops taints it); the cases that warn on a kernel share a guest of their own per
kernel; the rest run in the session's guest. Each case is judged on the kernel log lines it
added, on three disks of its guest, attached once and zeroed for each case.
"""

from __future__ import annotations

import contextlib
import os
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
from vmtests.kept_disks import KeptDisks, kept_disks
from vmtests.tablegen import KERNEL_BUGS

pytestmark = pytest.mark.vm

SECTORS = 4792  # any size; the first generated case that hit it had this one
DISK_BYTES = 4 << 20
#: Disks per guest: the most a case needs (cache: metadata, fast, origin).
DISKS = 3

#: The session guest's disks for the cases that neither oops nor warn there
#: (vmtests/kept_disks.py: the test's guest is given by its ``kernel`` parameter).
kept_sets, kept = kept_disks([DISK_BYTES] * DISKS)


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


class Guest:
    """A guest with ``DISKS`` disks attached once (a hot-plug and unplug costs ~0.5-1 QEMU
    CPU-s); each case gets them fresh: :meth:`fresh` zeroes their files on the host, and the
    next command first drops the guest's page cache of them. The guest cannot see the old
    bytes: dm targets read their devices with bios, not through that page cache, and QEMU
    reads the files through the host's page cache."""

    def __init__(self, vm: Machine, files: list[Path], paths: list[str]) -> None:
        self.vm = vm
        self.files = files
        self.paths = paths
        self._flush = ""

    @classmethod
    def private(cls, vm: Machine, tmp: Path) -> Guest:
        """*vm* (a guest of the test's own) with ``DISKS`` fresh disks."""
        files = []
        for i in range(DISKS):
            p = tmp / f"d{i}.img"
            with open(p, "wb") as f:
                f.truncate(DISK_BYTES)
            files.append(p)
        return cls(vm, files, [d.guest_path for d in vm.attach_many(files, read_only=False)])

    def fresh(self, n: int) -> list[str]:
        """The first *n* disks, zeroed."""
        for p in self.files:
            os.truncate(p, 0)
            os.truncate(p, DISK_BYTES)
        self._flush = "; ".join(f"blockdev --flushbufs {d}" for d in self.paths) + "; "
        return self.paths[:n]

    def load(self, name: str, table: str, *, before: str = "", then: str = ""
             ) -> tuple[int, str, str]:
        """In one guest command: *before*, then create *name*; if that worked, *then* and
        remove it. Returns the create's exit code, what *before* and *then* printed, and the
        kernel log lines from the create on (only those cross the agent's line)."""
        flush, self._flush = self._flush, ""
        r = self.vm.run(f"{flush}{before}\n"
                        f"n=$(dmesg | wc -l); dmsetup create {name} --table '{table}'; rc=$?\n"
                        f"[ $rc -eq 0 ] && {{ {then or ':'}; dmsetup remove {name}; }}\n"
                        "echo @@dmesg@@; dmesg | tail -n +$((n + 1)); exit $rc", timeout=120)
        out, _, log = r.out.partition("@@dmesg@@\n")
        return r.returncode, out, "\n".join(log.splitlines())


@pytest.fixture(scope="module")
def quiet_guests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Guest]]:
    """One guest per kernel for the cases that warn there, started on first use."""
    guests: dict[str, Guest] = {}
    yield guests
    for g in guests.values():
        # Nothing in it is needed any more: no detach, sync and poweroff (~1 QEMU CPU-s).
        g.vm.kill()
        g.vm.close()


def _refused(table: str, kernel: str) -> bool:
    """dmimage's verdict for that kernel: an error, not only a warning."""
    return any(not p.warning for p in parse_table(table).problems(kernel=_series(kernel)))


@contextlib.contextmanager
def _guest_for(kernel: str, bug: str, kept: KeptDisks, guests: dict[str, Guest],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """Where a case runs on *kernel*, by what it does there (*bug*): "oops" in a guest of its
    own (killed after), "warn" in the module's guest of that kernel for such cases, "" in
    the session's guest (on its kept disks)."""
    if bug == "oops":
        vm = _boot(kernel)
        try:
            yield Guest.private(vm, tmp_path_factory.mktemp(f"oops-{kernel}"))
        finally:
            vm.kill()
            vm.close()
    elif bug == "warn":
        if kernel not in guests:
            guests[kernel] = Guest.private(_boot(kernel),
                                           tmp_path_factory.mktemp(f"quiet-{kernel}"))
        yield guests[kernel]
    else:
        yield Guest(kept.vm, kept.files, kept.paths)


@pytest.mark.parametrize("target,store,sectors", [("snapshot-merge", "P", SECTORS),
                                                   ("snapshot", "PO", 40)])
@pytest.mark.parametrize("kernel", selected_names())
def test_snapshot_discard_zeroes_cow(kernel: str, target: str, store: str, sectors: int,
                                     kept: KeptDisks, quiet_guests: dict[str, Guest],
                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    oopses = _series(kernel) >= (7, 0)
    with _guest_for(kernel, "oops" if oopses else "", kept, quiet_guests,
                    tmp_path_factory) as g:
        o, c = g.fresh(2)
        table = f"0 {sectors} {target} {o} {c} {store} 8"
        # Without the feature every kernel loads it: the crash is the feature's.
        rc, out, log = g.load("q1", f"{table} 1 discard_zeroes_cow",
                              before=f"dmsetup create q0 --table '{table} 0' && "
                                     "dmsetup remove q0; echo \"@plain $?\"",
                              then="dmsetup table q1")
        assert "@plain 0" in out, out
        if oopses:
            assert rc == 139, (rc, log[-3000:])
            assert "divide error" in log and "blk_stack_limits" in log, log[-3000:]
        else:
            assert rc == 0, (rc, log[-3000:])
            assert "discard_zeroes_cow" in out.split("@plain 0", 1)[1], out
            assert not find_kernel_problems(log), log


@pytest.mark.parametrize("kernel", selected_names())
def test_snapshot_merge_transient_store(kernel: str, kept: KeptDisks,
                                        quiet_guests: dict[str, Guest],
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    oopses = _series(kernel) == KERNEL_BUGS["snapshot-merge: transient store"][0]
    with _guest_for(kernel, "oops" if oopses else "", kept, quiet_guests,
                    tmp_path_factory) as g:
        o, c = g.fresh(2)
        table = f"0 64 snapshot-merge {o} {c} N 8"
        assert _refused(table, kernel), "dmimage accepts it"
        rc, _, log = g.load("q2", table)
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
def test_cache_ctr_error_path(kernel: str, label: str, kept: KeptDisks,
                              quiet_guests: dict[str, Guest],
                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """A WARNING does not break a guest: the kernels that warn run all three in one guest."""
    policy, reason = CACHE_CTR_ERRORS[label]
    warns = _series(kernel) == KERNEL_BUGS[label][0]
    with _guest_for(kernel, "warn" if warns else "", kept, quiet_guests,
                    tmp_path_factory) as g:
        table = f"0 1024 cache {' '.join(g.fresh(3))} 64 0 {policy}"
        assert _refused(table, kernel), "dmimage accepts it"
        rc, _, log = g.load("q3", table)
        assert rc != 0, (rc, log[-3000:])
        assert reason in log, log[-3000:]
        if warns:
            assert "WARNING" in log and "__flush_work" in log, log[-3000:]
        else:
            assert not find_kernel_problems(log), log
