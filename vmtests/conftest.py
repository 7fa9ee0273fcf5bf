"""VM-suite scheduling for ``pytest -n N --dist loadgroup`` (``./bootstrap.sh test``).

Each test goes into the xdist group "<file>::<kernel>" (or "<file>" when it takes no kernel):
a worker runs a whole group, so module-scoped guests and scenarios are made once per kernel,
while different kernels and files run on different workers, each with its own guests
(restored from the saved VM state in about a second). Groups are handed out heaviest first
(by the durations of the previous run in pytest's cache), so the longest file does not start
last. Without xdist nothing changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: Fixture parameters that name the kernel a test runs on.
KERNEL_PARAMS = ("dm_vm", "share_vm", "kernel")
_DURATIONS = "dmimage/vm-group-durations"


def _group(item: pytest.Item) -> str:
    name = Path(str(item.fspath)).name
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    for p in KERNEL_PARAMS:
        if isinstance(params.get(p), str):
            return f"{name}::{params[p]}"
    return name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return
    mine = [it for it in items if Path(str(it.fspath)).parent == Path(__file__).parent]
    for it in mine:
        it.add_marker(pytest.mark.xdist_group(_group(it)))
        it.user_properties.append(("vm_group", _group(it)))
    cache = getattr(config, "cache", None)
    weights: dict[str, float] = cache.get(_DURATIONS, {}) if cache is not None else {}
    if weights:
        # Stable: the order inside a group (e.g. test_zz_guard_sees_clean_guest last) is kept.
        order = {id(it): -weights.get(_group(it), 0.0) for it in mine}
        mine_sorted = sorted(mine, key=lambda it: order[id(it)])
        slots = iter(mine_sorted)
        items[:] = [next(slots) if id(it) in order else it for it in items]


_TIMES: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # On the controller: the group travels with the report from the worker.
    for key, value in report.user_properties:
        if key == "vm_group":
            _TIMES[str(value)] = _TIMES.get(str(value), 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    cache = getattr(session.config, "cache", None)
    if cache is not None and _TIMES and not hasattr(session.config, "workerinput"):
        cache.set(_DURATIONS, {k: round(v, 1) for k, v in _TIMES.items()})
