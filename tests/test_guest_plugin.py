"""dmimage's pytest plugin (entry point ``pytest11: dmimage_vm``) as another project sees it.

It is loaded into every pytest run of the environment, so a run that never uses a VM must not
import the guest machinery; and a project without a conftest gets the fixtures. Each check runs
pytest in a fresh process in a directory outside this repository (its own rootdir and config).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOCS_VM = Path(__file__).resolve().parents[1] / "docs" / "vm.md"

PROBE = '''
import sys


def test_probe(pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("dmimage_vm")
    assert pytestconfig.getoption("--vm-kernels") == "deb12"
    loaded = sorted(m for m in sys.modules
                    if m.startswith(("dmimage.", "qemu")) or m in ("numpy", "construct"))
    print("LOADED", loaded)
    assert loaded == ["dmimage.guest", "dmimage.guest.pytest_plugin"], loaded
'''


def _docs_example() -> str:
    """The "another project" test of docs/vm.md, verbatim."""
    m = re.search(r"```python\n(# test_thin_pool\.py.*?)```", DOCS_VM.read_text(), re.S)
    assert m, "docs/vm.md lost its test_thin_pool.py example"
    return m.group(1)


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (project / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: none of our config
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "DMIMAGE_VM_")) and k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)


def test_plugin_is_loaded_and_lazy(tmp_path: Path) -> None:
    (tmp_path / "test_probe.py").write_text(PROBE)
    res = _pytest(tmp_path, "-q", "-s", "--vm-kernels", "deb12", "test_probe.py")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "LOADED ['dmimage.guest', 'dmimage.guest.pytest_plugin']" in res.stdout


def test_plugin_can_be_disabled(tmp_path: Path) -> None:
    (tmp_path / "test_off.py").write_text(
        "import sys\n\n\ndef test_off(pytestconfig):\n"
        "    assert not pytestconfig.pluginmanager.has_plugin('dmimage_vm')\n"
        "    assert 'dmimage.guest' not in sys.modules\n")
    res = _pytest(tmp_path, "-q", "-p", "no:dmimage_vm", "test_off.py")
    assert res.returncode == 0, res.stdout + res.stderr


def test_docs_example_collects_in_another_project(tmp_path: Path) -> None:
    (tmp_path / "test_thin_pool.py").write_text(_docs_example())
    res = _pytest(tmp_path, "--co", "-q", "--vm-kernels", "deb12,deb13", "-m", "vm")
    assert res.returncode == 0, res.stdout + res.stderr
    ids = [ln for ln in res.stdout.splitlines() if "::" in ln]
    assert ids == ["test_thin_pool.py::test_thin_pool_activates[deb12]",
                   "test_thin_pool.py::test_thin_pool_activates[deb13]"], res.stdout
