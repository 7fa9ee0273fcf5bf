"""vmtests/conftest.py without a VM: which kernels a ``vm_one_kernel`` test runs on, how tests
are grouped for xdist, and that a fresh checkout orders groups by the committed durations."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
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

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    for it in items:
        m = it.get_closest_marker("xdist_group")
        print("G", it.nodeid, m.args[0] if m else "-")
'''


def _collect(tmp_path: Path, env: dict[str, str], weights: dict[str, float]) -> list[list[str]]:
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
         "-p", "no:cacheprovider", "-p", "no:randomly", str(d)],
        cwd=d, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{d}:{ROOT}", **env})
    assert out.returncode == 0, out.stdout + out.stderr
    return [ln.split()[1:] for ln in out.stdout.splitlines() if ln.startswith("G ")]


def test_strip_kernel() -> None:
    assert strip_kernel("f.py::t[deb12]", "deb12") == "f.py::t"
    assert strip_kernel("f.py::t[deb12-seed10]", "deb12") == "f.py::t[seed10]"
    assert strip_kernel("f.py::t[2-deb13-backports]", "deb13-backports") == "f.py::t[2]"
    assert strip_kernel("f.py::t[a-deb11-b]", "deb11") == "f.py::t[a-b]"
    assert strip_kernel("f.py::t[x]", None) == "f.py::t[x]"


def test_one_kernel_and_groups(tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    rows = _collect(tmp_path, {"DMIMAGE_VM_KERNELS": "deb12,deb13"},
                    {"test_fake.py::test_kernel_alone": 100.0})
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


def test_a_group_runs_on_one_worker(tmp_path: Path) -> None:
    """Under ``-n 2 --dist loadgroup`` the tests sharing a module fixture run on one worker
    (the scheduler in conftest.py; xdist's own loadgroup loses the groups here)."""
    pytest.importorskip("xdist")
    d = tmp_path / "proj"
    d.mkdir()
    shutil.copy(ROOT / "vmtests" / "conftest.py", d / "conftest.py")
    (d / "vm_durations.json").write_text("{}")
    (d / "test_fake.py").write_text(FAKE_TESTS)
    (d / "__init__.py").write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v",
         "-p", "no:cacheprovider", "-p", "no:randomly", str(d)],
        cwd=d, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{d}:{ROOT}",
             "DMIMAGE_VM_KERNELS": "deb12,deb13"})
    assert out.returncode == 0, out.stdout + out.stderr
    workers: dict[str, set[str]] = {}
    for m in re.finditer(r"^\[(gw\d+)\] \[ *\d+%\] PASSED \S+::(\S+)", out.stdout, re.M):
        workers.setdefault(m.group(2), set()).add(m.group(1))
    for kernel in ("deb11", "deb12", "deb13"):
        assert len(workers[f"test_kernel_a[{kernel}]"] | workers[f"test_kernel_b[{kernel}]"]) == 1
    assert len({w for ws in workers.values() for w in ws}) == 2  # both cores were used
