"""VM-suite selection and scheduling for ``pytest -n N --dist loadgroup`` (``./bootstrap.sh test``).

Kernels. A test marked ``vm_one_kernel`` has a userspace oracle (Debian 12's lvm2 or dockerd)
or proves dmimage's own code around the generic block layer, not a device-mapper target: it
runs on one kernel (deb12 when selected, else the first selected) unless every kernel is
asked for (``DMIMAGE_VM_KERNELS=all``, ``--vm-kernels all`` or ``DMIMAGE_VM_EVERY_KERNEL=1``;
``tox -e vm-all``). Thin, cache, era, table, snapshot, repair and scale proofs carry no mark
and run on every selected kernel.

Groups. Each test goes into the xdist group "<file>::<kernel>" (or "<file>" when it takes no
kernel), split further where no module-scoped fixture ties tests together: tests sharing a
module-scoped fixture (a scenario, a guest of the module) stay in one group, so it is made
once per worker, and every other test is its own group. A file marked ``vm_whole_file`` (its
tests reach module fixtures through ``request.getfixturevalue``, invisible here) is one group:
split, its tests went to both workers between other files' tests, and each return to the file
made its module fixtures again (a Docker scenario each time). test_docker_store.py's three
scenarios share its one module guest (one group): a guest per scenario ran them in parallel
but cost ~20 QEMU CPU-s more (boots, containerd and dockerd starts), and the suite is CPU-bound.

Order. Groups are handed out heaviest first, so the longest ones do not start last and both
cores stay busy to the end. The weight of a group is the sum of its tests' durations: from
pytest's cache (the previous run here) or, on a fresh checkout such as CI's, from the
committed ``vm_durations.json`` (seconds per test with the kernel taken out of the id,
the slower kernel's, from a quiet ``--durations=0`` run of the CI selection). Without
xdist the order is unchanged.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

#: Fixture parameters that name the kernel a test runs on.
KERNEL_PARAMS = ("dm_vm", "share_vm", "kernel", "guest")
#: The kernel of ``vm_one_kernel`` tests: Debian 12's lvm2 and docker.io are the real pairing.
ONE_KERNEL = "deb12"
EVERY_KERNEL_ENV = "DMIMAGE_VM_EVERY_KERNEL"
_DURATIONS = "dmimage/vm-test-durations"
_DEFAULTS = Path(__file__).with_name("vm_durations.json")
#: A test without a recorded duration (new, or quick).
_UNKNOWN = 5.0




def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm_one_kernel: the oracle is userspace (lvm2, dockerd) or the generic "
                   "block layer: run on one kernel unless every kernel is selected")
    config.addinivalue_line(
        "markers", "vm_whole_file: the file's tests reach its module fixtures through "
                   "request.getfixturevalue, which the grouping cannot see: one group per kernel")
    from dmimage.guest.machine import Machine

    # Every disk the suite hot-plugs is a scratch image under its tmp dirs: the guests'
    # flushes need not reach the host's disk (see Machine.scratch_disks).
    Machine.scratch_disks = True


def _params(item: pytest.Item) -> dict[str, object]:
    callspec = getattr(item, "callspec", None)
    return dict(callspec.params) if callspec is not None else {}


def _kernel(item: pytest.Item) -> str | None:
    params = _params(item)
    for p in KERNEL_PARAMS:
        if isinstance(params.get(p), str):
            return str(params[p])
    return None


def _key(item: pytest.Item) -> str:
    """The test's id with the kernel taken out: its duration is looked up by this."""
    return strip_kernel(item.nodeid, _kernel(item))


def strip_kernel(nodeid: str, kernel: str | None) -> str:
    m = re.fullmatch(r"(.*?)\[(.*)\]", nodeid)
    if not kernel or m is None:
        return nodeid
    head, ids = m.groups()
    if ids == kernel:
        return head
    if ids.startswith(kernel + "-"):
        ids = ids[len(kernel) + 1:]
    elif ids.endswith("-" + kernel):
        ids = ids[: -len(kernel) - 1]
    else:
        ids = ids.replace(f"-{kernel}-", "-", 1)
    return f"{head}[{ids}]"


def _module_fixtures(item: pytest.Item) -> set[str]:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {name for name, defs in info.name2fixturedefs.items()
            if defs and defs[-1].scope == "module"}


def every_kernel(config: pytest.Config) -> bool:
    raw = config.getoption("--vm-kernels", None) or os.environ.get("DMIMAGE_VM_KERNELS", "")
    flag = os.environ.get(EVERY_KERNEL_ENV, "")
    return "all" in [n.strip() for n in raw.split(",")] or flag not in ("", "0", "no", "false")


def _select_one_kernel(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    marked = [it for it in items if Path(str(it.fspath)).parent == here
              and it.get_closest_marker("vm_one_kernel") and _kernel(it)]
    if not marked or every_kernel(config):
        return
    from dmimage.guest.kernels import selected_names

    names = selected_names(config.getoption("--vm-kernels", None))
    chosen = ONE_KERNEL if ONE_KERNEL in names else names[0]
    drop = {id(it) for it in marked if _kernel(it) != chosen}
    if drop:
        config.hook.pytest_deselected(items=[it for it in items if id(it) in drop])
        items[:] = [it for it in items if id(it) not in drop]


def _find(parent: dict[str, str], x: str) -> str:
    """Union-find root of *x* (added as its own root when new)."""
    while parent.setdefault(x, x) != x:
        x = parent[x]
    return x


def _groups(items: list[pytest.Item]) -> dict[int, str]:
    """id(item) -> group: per file and kernel, joined by shared module-scoped fixtures."""
    out: dict[int, str] = {}
    by_unit: dict[str, list[pytest.Item]] = {}
    for it in items:
        name = Path(str(it.fspath)).name
        kernel = _kernel(it)
        unit = f"{name}::{kernel}" if kernel else name
        if it.get_closest_marker("vm_whole_file"):
            out[id(it)] = unit
        else:
            by_unit.setdefault(unit, []).append(it)
    for unit, members in by_unit.items():
        # Tests that share a module-scoped fixture form one group; the rest stand alone.
        parent: dict[str, str] = {}
        for it in members:
            for f in _module_fixtures(it):
                parent[_find(parent, "fixture:" + f)] = _find(parent, it.nodeid)
        roots = {id(it): _find(parent, it.nodeid) for it in members}
        # xdist reads the group after the last "@" only if no "]" follows it: no brackets.
        names = {r: re.sub(r"[^\w.:-]+", "_", min(it.name for it in members
                                                    if roots[id(it)] == r))
                 for r in set(roots.values())}
        for it in members:
            out[id(it)] = unit if len(names) == 1 else f"{unit}::{names[roots[id(it)]]}"
    return out


def _weights(config: pytest.Config) -> dict[str, float]:
    weights: dict[str, float] = {}
    try:
        weights.update(json.loads(_DEFAULTS.read_text()))
    except (OSError, ValueError):
        pass
    cache = getattr(config, "cache", None)
    if cache is not None:
        weights.update(cache.get(_DURATIONS, {}))
    return weights


def _groups_file(controller_pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"dmimage-vm-groups-{controller_pid}.json"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` with the groups the workers computed.

    xdist 3.8 marks a group by rewriting ``item._nodeid``, which the pytest in use no longer
    reads (``nodeid`` comes from ``item._id``): its own loadgroup sees no groups and spreads
    every test of a module scenario over both workers, making the scenario twice. The
    workers write ``nodeid -> group`` here at collection, before the controller schedules."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    path = _groups_file(os.getpid())

    class VmGroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:
                try:
                    self._groups = json.loads(path.read_text())
                except (OSError, ValueError):
                    self._groups = {}
            return self._groups.get(nodeid, nodeid)

    return VmGroupScheduling(config, log)


def _publish_groups(config: pytest.Config, groups: dict[str, str]) -> None:
    """From a worker: the groups for the controller's scheduler (atomic; workers agree)."""
    if not hasattr(config, "workerinput"):
        return
    path = _groups_file(os.getppid())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(groups))
    os.replace(tmp, path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    _select_one_kernel(config, items)
    if not config.pluginmanager.hasplugin("xdist"):
        return
    mine = [it for it in items if Path(str(it.fspath)).parent == here]
    groups = _groups(mine)
    for it in mine:
        it.add_marker(pytest.mark.xdist_group(groups[id(it)]))
        it.user_properties.append(("vm_key", _key(it)))
    _publish_groups(config, {it.nodeid: groups[id(it)] for it in mine})
    weights = _weights(config)
    total: dict[str, float] = {}
    for it in mine:
        total[groups[id(it)]] = total.get(groups[id(it)], 0.0) + weights.get(_key(it), _UNKNOWN)
    # Stable: the order inside a group (e.g. test_zz_guard_sees_clean_guest last) is kept.
    order = {id(it): -total[groups[id(it)]] for it in mine}
    slots = iter(sorted(mine, key=lambda it: order[id(it)]))
    items[:] = [next(slots) if id(it) in order else it for it in items]


#: nodeid -> (kernel-free key, seconds of setup + call + teardown), on the controller.
_TIMES: dict[str, tuple[str, float]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # On the controller: the key travels with the report from the worker.
    for key, value in report.user_properties:
        if key == "vm_key":
            _, spent = _TIMES.get(report.nodeid, ("", 0.0))
            _TIMES[report.nodeid] = (str(value), spent + report.duration)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):
        _groups_file(os.getpid()).unlink(missing_ok=True)
    cache = getattr(session.config, "cache", None)
    if cache is not None and _TIMES and not hasattr(session.config, "workerinput"):
        # One test on several kernels: the slowest kernel's time is its weight.
        per_key: dict[str, float] = {}
        for key, spent in _TIMES.values():
            per_key[key] = max(per_key.get(key, 0.0), round(spent, 1))
        merged = dict(cache.get(_DURATIONS, {}))
        merged.update(per_key)
        cache.set(_DURATIONS, merged)
