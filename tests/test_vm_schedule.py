"""vmtests/conftest.py without a VM: which kernels a ``vm_one_kernel`` test runs on, how tests
are grouped for xdist, and that a fresh checkout orders groups by the committed durations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vmtests import conftest as vmconftest  # noqa: E402
from vmtests.conftest import strip_kernel  # noqa: E402

FAKE_TESTS = '''
import pytest

@pytest.fixture(scope="module")
def scenario():
    return 1

@pytest.mark.parametrize("kernel", ["deb11", "deb12", "deb13"])
def test_kernel_a(kernel, scenario): pass

@pytest.mark.parametrize("kernel", ["deb11", "deb12", "deb13"])
def test_kernel_b(kernel, scenario): pass

@pytest.mark.parametrize("kernel", ["deb11", "deb12", "deb13"])
def test_kernel_alone(kernel): pass

@pytest.mark.vm_one_kernel
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("kernel", ["deb11", "deb12", "deb13"])
def test_userspace(kernel, seed): pass
'''

WHOLE_FILE_TESTS = '''
import pytest

pytestmark = pytest.mark.vm_whole_file

@pytest.fixture(scope="module")
def store():
    return 1

def test_first(store): pass

@pytest.mark.parametrize("which", ["store"])
def test_dynamic(request, which): request.getfixturevalue(which)

def test_plain(): pass
'''

SHOW = '''
import pytest
from xdist.remote import WorkerInteractor

WORKER = bool(int(__import__("os").environ.get("FAKE_WORKER", "0")))

@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if WORKER:  # as in an xdist worker: vmtests/conftest.py publishes its groups
        config.workerinput = {}

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if WORKER:  # xdist's worker-side hook: the ids the worker sends are item.nodeid after it
        config.option.loadgroup = True
        WorkerInteractor.pytest_collection_modifyitems(None, config, items)
    for it in items:
        m = it.get_closest_marker("xdist_group")
        print("G", it.nodeid, m.args[0] if m else "-")
'''


def _collect(tmp_path: Path, env: dict[str, str], weights: dict[str, float],
             worker: bool = False) -> list[list[str]]:
    """``pytest --collect-only`` of the fake project with vmtests/conftest.py: [nodeid, group]
    per test. ``worker``: collect as an xdist worker does (the conftest publishes its groups
    for this process, the controller's scheduler; the ids are the ones a worker sends)."""
    d = tmp_path / "proj"
    d.mkdir(parents=True)
    shutil.copy(ROOT / "vmtests" / "conftest.py", d / "conftest.py")
    (d / "vm_durations.json").write_text(json.dumps(weights))
    (d / "test_fake.py").write_text(FAKE_TESTS)
    (d / "test_whole.py").write_text(WHOLE_FILE_TESTS)
    (d / "showgroups.py").write_text(SHOW)
    (d / "__init__.py").write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "showgroups",
         "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:hypothesispytest", str(d)],
        cwd=d, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{d}:{ROOT}",
             "FAKE_WORKER": str(int(worker)), **env})
    assert out.returncode == 0, out.stdout + out.stderr
    return [ln.split()[1:] for ln in out.stdout.splitlines() if ln.startswith("G ")]


@pytest.fixture(scope="module")
def worker_rows(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The fake project as a worker of ``DMIMAGE_VM_KERNELS=deb12,deb13 pytest -n 2 --dist
    loadgroup`` collects it (its groups published for this process); removed afterwards."""
    pytest.importorskip("xdist")
    rows = _collect(tmp_path_factory.mktemp("worker"), {"DMIMAGE_VM_KERNELS": "deb12,deb13"},
                    {"test_fake.py::test_kernel_alone": 100.0}, worker=True)
    yield rows
    vmconftest._groups_file(os.getpid()).unlink(missing_ok=True)


def test_strip_kernel() -> None:
    assert strip_kernel("f.py::t[deb12]", "deb12") == "f.py::t"
    assert strip_kernel("f.py::t[deb12-seed10]", "deb12") == "f.py::t[seed10]"
    assert strip_kernel("f.py::t[2-deb13-backports]", "deb13-backports") == "f.py::t[2]"
    assert strip_kernel("f.py::t[a-deb11-b]", "deb11") == "f.py::t[a-b]"
    assert strip_kernel("f.py::t[x]", None) == "f.py::t[x]"


def test_one_kernel_and_groups(worker_rows: list[list[str]]) -> None:
    rows = worker_rows
    ids = {r[0].split("::", 1)[1]: r[1] for r in rows}
    # one kernel for the marked test (deb12), every kernel for the others
    assert sorted(k for k in ids if k.startswith("test_userspace")) == [
        "test_userspace[deb12-1]", "test_userspace[deb12-2]"]
    assert {k for k in ids if k.startswith("test_kernel_a[")} == {
        "test_kernel_a[deb11]", "test_kernel_a[deb12]", "test_kernel_a[deb13]"}
    # a shared module fixture keeps tests together; the rest stand alone, per kernel
    assert ids["test_kernel_a[deb12]"] == ids["test_kernel_b[deb12]"] != ids["test_kernel_a[deb13]"]
    assert ids["test_kernel_alone[deb12]"] not in (ids["test_kernel_a[deb12]"],
                                                   ids["test_kernel_alone[deb13]"])
    assert ids["test_userspace[deb12-1]"] != ids["test_userspace[deb12-2]"]
    # a vm_whole_file module is one group, whatever its tests name as fixtures
    assert len({ids[k] for k in ("test_first", "test_dynamic[store]", "test_plain")}) == 1
    # xdist takes the group from after the last "@" only when no "]" follows it
    assert not [g for g in ids.values() if "]" in g or "@" in g or " " in g]
    # the committed weights put the heaviest groups first on a fresh checkout
    assert rows[0][0].split("::", 1)[1].startswith("test_kernel_alone")


def test_every_kernel_when_all_are_selected(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    for env in ({"DMIMAGE_VM_KERNELS": "all"},
                {"DMIMAGE_VM_KERNELS": "deb12,deb13", "DMIMAGE_VM_EVERY_KERNEL": "1"}):
        rows = _collect(tmp_path / env["DMIMAGE_VM_KERNELS"].replace(",", "_")
                        / env.get("DMIMAGE_VM_EVERY_KERNEL", "0"), env, {})
        assert sum(r[0].split("::")[1].startswith("test_userspace") for r in rows) == 6


class _Worker:
    """What xdist's scheduler sees of a worker (its WorkerController): test indexes sent."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.queue: list[int] = []
        self.shutting_down = False

    def send_runtest_some(self, indices: list[int]) -> None:
        self.queue.extend(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


def _run(sched: Any, ids: list[str]) -> dict[str, str]:
    """Drive *sched* as xdist's controller (DSession) does with two workers that collected
    *ids*, the workers finishing one test each in turn: nodeid -> worker that ran it."""
    workers = [_Worker("gw0"), _Worker("gw1")]
    for w in workers:
        sched.add_node(w)
    for w in workers:
        sched.add_node_collection(w, ids)
    assert sched.collection_is_completed
    sched.schedule()
    ran: dict[str, str] = {}
    while any(w.queue for w in workers):
        for w in workers:
            if w.queue:
                i = w.queue.pop(0)
                assert ids[i] not in ran, ids[i]
                ran[ids[i]] = w.gateway.id
                sched.mark_test_complete(w, i)
    assert sched.tests_finished and sorted(ran) == sorted(ids)
    return ran


def _split_groups(ran: dict[str, str], groups: dict[str, str]) -> list[str]:
    """The groups whose tests ran on more than one worker."""
    on: dict[str, set[str]] = {}
    for nodeid, worker in ran.items():
        on.setdefault(groups[nodeid], set()).add(worker)
    return sorted(g for g, ws in on.items() if len(ws) > 1)


def test_a_group_runs_on_one_worker(worker_rows: list[list[str]]) -> None:
    """Under ``-n 2 --dist loadgroup`` the tests sharing a module fixture run on one worker
    (the scheduler in conftest.py; xdist's own loadgroup loses the groups here).

    xdist's scheduler and vmtests/conftest.py's, in this process, fed what a run feeds them:
    the ids two workers send after collecting the fake project (worker_rows: a real
    collection, the worker-side xdist hook applied) and the groups the conftest published
    from it; the workers are stand-ins that run what they are sent, in turn."""
    ids = [r[0] for r in worker_rows]
    groups = {r[0]: r[1] for r in worker_rows}
    config = SimpleNamespace(
        getvalue=lambda name: {"dist": "loadgroup", "tx": ["2*popen"]}[name],
        option=SimpleNamespace(loadscopereorder=True))
    sched = vmconftest.pytest_xdist_make_scheduler(config, None)  # type: ignore[arg-type]
    assert sched is not None
    ran = _run(sched, ids)
    assert not _split_groups(ran, groups), ran
    by_name = {i.split("::", 1)[1]: w for i, w in ran.items()}
    for kernel in ("deb11", "deb12", "deb13"):
        assert by_name[f"test_kernel_a[{kernel}]"] == by_name[f"test_kernel_b[{kernel}]"]
    assert len(set(ran.values())) == 2  # both cores were used
    # the bug pinned: xdist's own loadgroup, given the same ids, splits a group
    from xdist.scheduler import LoadGroupScheduling

    assert _split_groups(_run(LoadGroupScheduling(config, None), ids), groups), (
        "xdist's loadgroup keeps the groups now: is VmGroupScheduling still needed?")
