"""bootstrap.sh's run_tests (the unit tests beside the VM tests), driven with a stand-in for
.venv/bin/python that prints, waits and exits as told: the exit status fails when either part
fails, the unit tests' output is printed, and an interrupt (Ctrl-C reaches the foreground
process group) stops the unit tests too, which run in the background and so ignore SIGINT."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BOOTSTRAP = Path(__file__).resolve().parent.parent / "bootstrap.sh"

#: .venv/bin/python: the last argument names the part (tests or vmtests); its pid in
#: pid-PART, its output on stdout, then it sleeps FAKE_SLEEP_PART and exits FAKE_RC_PART
#: (one process, as python under nice is)
FAKE_PYTHON = """#!{python}
import os, sys, time
part = sys.argv[-1]
with open(f"pid-{{part}}", "w") as f:
    f.write(str(os.getpid()))
print(f"output of {{part}}", flush=True)
time.sleep(float(os.environ.get(f"FAKE_SLEEP_{{part}}", "0")))
sys.exit(int(os.environ.get(f"FAKE_RC_{{part}}", "0")))
"""


def _script(tmp: Path) -> Path:
    """A script that runs bootstrap.sh's run_tests (the function as it stands) in *tmp*."""
    text = BOOTSTRAP.read_text()
    m = re.search(r"^run_tests\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert m is not None, "run_tests not found in bootstrap.sh"
    (tmp / ".venv/bin").mkdir(parents=True)
    py = tmp / ".venv/bin/python"
    py.write_text(FAKE_PYTHON.format(python=sys.executable))
    py.chmod(0o755)
    script = tmp / "run.sh"
    script.write_text("set -eu\n" + m.group(0) + "run_tests\n")
    (tmp / "tmp").mkdir()
    return script


def _env(tmp: Path, **fake: str) -> dict[str, str]:
    env = dict(os.environ, TMPDIR=str(tmp / "tmp"))
    env.update({f"FAKE_{k}": v for k, v in fake.items()})
    return env


@pytest.mark.parametrize("unit_rc, vm_rc", [(0, 0), (1, 0), (0, 3), (2, 5)])
def test_either_part_failing_fails_the_run(tmp_path: Path, unit_rc: int, vm_rc: int) -> None:
    script = _script(tmp_path)
    r = subprocess.run(["sh", str(script)], cwd=tmp_path, capture_output=True, text=True,
                       env=_env(tmp_path, RC_tests=str(unit_rc), RC_vmtests=str(vm_rc),
                                SLEEP_tests="0.3"), timeout=60)
    assert (r.returncode == 0) == (unit_rc == 0 and vm_rc == 0)
    assert "output of tests" in r.stdout and "output of vmtests" in r.stdout
    assert ("unit tests failed" in r.stderr) == (unit_rc != 0)
    assert ("VM tests failed" in r.stderr) == (vm_rc != 0)
    assert not list((tmp_path / "tmp").iterdir())  # the unit log removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("unit_sleep", ["60", "0"])  # unit tests running, or done already
def test_an_interrupt_stops_the_unit_tests_too(tmp_path: Path, unit_sleep: str) -> None:
    script = _script(tmp_path)
    # a shell started with SIGINT ignored can never trap it (POSIX), and this test itself may
    # run in a background job that ignores it (bootstrap.sh runs the unit tests so): start
    # the shell as a terminal's would be, with the default action
    p = subprocess.Popen(["sh", str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=_env(tmp_path, SLEEP_tests=unit_sleep, SLEEP_vmtests="60"),
                         preexec_fn=_default_sigint)
    unit = -1
    try:
        deadline = time.monotonic() + 20
        while not ((tmp_path / "pid-tests").exists() and (tmp_path / "pid-vmtests").exists()):
            assert time.monotonic() < deadline, "the parts did not start"
            time.sleep(0.05)
        time.sleep(0.5)
        unit = int((tmp_path / "pid-tests").read_text())
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C at the terminal
        out, _err = p.communicate(timeout=20)
        assert p.returncode != 0
        deadline = time.monotonic() + 10
        while _alive(unit) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(unit), "the unit tests ran on after the interrupt"
        assert "output of tests" in out  # what they printed so far is shown
        assert not list((tmp_path / "tmp").iterdir())  # the unit log removed
    finally:
        for pid in (p.pid, unit):
            if pid > 0 and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        p.wait()
