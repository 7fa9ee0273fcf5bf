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

Each case boots its own guest (a restored state, about a second): an oops taints it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dmimage.guest.kernels import selected_names
from dmimage.guest.machine import Machine
from dmimage.guest.pytest_plugin import unavailable
from dmimage.table import parse_table
from vmtests.tablegen import KERNEL_BUGS

pytestmark = pytest.mark.vm

SECTORS = 4792  # any size; the first generated case that hit it had this one


def _guest(name: str) -> Machine:
    from dmimage.guest.errors import HarnessUnavailable
    from dmimage.guest.kernels import KernelNotFound, kernel_by_name

    try:
        return Machine(kernel_by_name(name, fetch=True)).start()
    except (KernelNotFound, HarnessUnavailable) as exc:
        unavailable(str(exc))


@pytest.mark.parametrize("target,store,sectors", [("snapshot-merge", "P", SECTORS),
                                                   ("snapshot", "PO", 40)])
@pytest.mark.parametrize("kernel", selected_names())
def test_snapshot_discard_zeroes_cow(kernel: str, target: str, store: str, sectors: int,
                                     tmp_path: Path) -> None:
    origin, cow = tmp_path / "origin.img", tmp_path / "cow.img"
    for p in (origin, cow):
        with open(p, "wb") as f:
            f.truncate(4 << 20)
    with _guest(kernel) as vm:
        o = vm.attach(origin, read_only=False)
        c = vm.attach(cow, read_only=False)
        table = f"0 {sectors} {target} {o.guest_path} {c.guest_path} {store} 8"
        # Without the feature every kernel loads it: the crash is the feature's.
        plain = vm.run(f"dmsetup create m0 --table '{table} 0' && dmsetup remove m0",
                       timeout=120)
        assert plain.returncode == 0, plain
        r = vm.run(f"dmsetup create m1 --table '{table} 1 discard_zeroes_cow'", timeout=120)
        log = vm.run("dmesg").out
        series = tuple(int(x) for x in vm.kernel.version.split(".")[:2])
        if series >= (7, 0):
            assert r.returncode == 139, r
            assert "divide error" in log and "blk_stack_limits" in log, log[-3000:]
        else:
            assert r.returncode == 0, r
            assert "discard_zeroes_cow" in vm.sh("dmsetup table m1")
            vm.sh("dmsetup remove m1")
            vm.check_dmesg()


def _series(vm: Machine) -> tuple[int, int]:
    major, minor = vm.kernel.version.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.parametrize("kernel", selected_names())
def test_snapshot_merge_transient_store(kernel: str, tmp_path: Path) -> None:
    origin, cow = tmp_path / "origin.img", tmp_path / "cow.img"
    for p in (origin, cow):
        with open(p, "wb") as f:
            f.truncate(4 << 20)
    with _guest(kernel) as vm:
        o = vm.attach(origin, read_only=False)
        c = vm.attach(cow, read_only=False)
        table = f"0 64 snapshot-merge {o.guest_path} {c.guest_path} N 8"
        assert parse_table(table).problems(kernel=_series(vm)), "dmimage accepts it"
        r = vm.run(f"dmsetup create m2 --table '{table}'", timeout=120)
        log = vm.run("dmesg").out
        assert r.returncode != 0, r
        if _series(vm) == KERNEL_BUGS["snapshot-merge: transient store"][0]:
            assert "NULL pointer dereference" in log and "snapshot_merge_next_chunks" in log, \
                log[-3000:]
        else:
            assert "does not support snapshot-merge" in log, log[-3000:]
            vm.check_dmesg()


#: The cache near misses that fail inside cache_create (test_tables_guest.py's labels), with
#: the policy words and the kernel's reason.
CACHE_CTR_ERRORS = {
    "cache: unknown policy": ("lru 0", "unknown policy type"),
    "cache: odd policy args": ("smq 1 migration_threshold", "Odd number of policy arguments"),
    "cache: unknown policy key": ("smq 2 sequential_threshold 4",
                                  "bad config value for sequential_threshold"),
}


@pytest.mark.parametrize("kernel", selected_names())
def test_cache_ctr_error_path(kernel: str, tmp_path: Path) -> None:
    """The three cases in one guest (a WARNING does not break it), each between log markers."""
    files = [tmp_path / f"{n}.img" for n in ("meta", "cache", "origin")]
    for p in files:
        with open(p, "wb") as f:
            f.truncate(4 << 20)
    with _guest(kernel) as vm:
        meta, cdev, origin = (vm.attach(p, read_only=False).guest_path for p in files)
        vm.check_dmesg()
        for label, (policy, reason) in CACHE_CTR_ERRORS.items():
            table = f"0 1024 cache {meta} {cdev} {origin} 64 0 {policy}"
            assert parse_table(table).problems(kernel=_series(vm)), f"dmimage accepts {label}"
            before = len(vm.dmesg().splitlines())
            r = vm.run(f"dmsetup create c1 --table '{table}'", timeout=120)
            log = "\n".join(vm.dmesg().splitlines()[before:])
            assert r.returncode != 0, (label, r)
            assert reason in log, (label, log[-3000:])
            buggy = _series(vm) == KERNEL_BUGS[label][0]
            assert ("WARNING" in log and "__flush_work" in log) == buggy, (label, log[-3000:])
        if not any(_series(vm) == KERNEL_BUGS[label][0] for label in CACHE_CTR_ERRORS):
            vm.check_dmesg()
