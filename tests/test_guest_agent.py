"""The guest agent's loop (``AGENT_SCRIPT``) run by the host's static busybox against the host
side (``AgentChannel``) over a socket pair: the protocol without booting a VM. The loop's files
move from /tmp to a private directory; everything else is the script the guest runs."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmimage.guest.agent import AgentChannel
from dmimage.guest.appliance import AGENT_SCRIPT, BUSYBOX_CANDIDATES

BUSYBOX = next((p for p in BUSYBOX_CANDIDATES if shutil.which(p)), None)
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="busybox not installed")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentChannel]:
    assert BUSYBOX is not None
    script = tmp_path / "agent.sh"
    # /diag (the guest's state at a timeout) is a stand-in the tests write: the real one reads
    # the guest kernel's /proc and pokes sysrq (vmtests/test_harness.py runs it).
    (tmp_path / "diag").write_text("echo state of $1\n")
    script.write_text(AGENT_SCRIPT.replace("/tmp", str(tmp_path))
                      .replace("sh /diag", f"sh {tmp_path}/diag"))
    host, guest = socket.socketpair()
    console = (tmp_path / "console").open("wb")  # the guest's /dev/console
    proc = subprocess.Popen([BUSYBOX, "sh", str(script)], stdin=guest.fileno(),
                            stdout=guest.fileno(), stderr=console, start_new_session=True)
    guest.close()
    chan = AgentChannel(host)
    try:
        chan.wait_ready(30)
        yield chan
    finally:
        host.close()
        proc.kill()
        proc.wait()
        console.close()
    # Nothing per command on the console (ash reports killed jobs there unless told not to).
    assert (tmp_path / "console").read_bytes() == b""


def test_outputs_rc_and_script_bytes_are_exact(agent: AgentChannel) -> None:
    r = agent.run("printf 'a\\000b\\377'; printf 'err\\n' >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr, r.timed_out) == (3, b"a\0b\xff", b"err\n", False)
    r = agent.run("true")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    # Leading blanks, backslashes, a lone "-n", quotes and non-ASCII reach sh unchanged.
    text = "  \\t x\\\\y\n-n\n'q' \"é\"\r"
    script = "cat <<'EOF'\n" + text + "\nEOF\n"
    assert agent.run(script).stdout == (text + "\n").encode()
    assert agent.run(b"printf %s '\xfe\xfa'").stdout == b"\xfe\xfa"
    assert agent.run("").returncode == 0
    with pytest.raises(ValueError):
        agent.run(b"echo \0")


def test_timeout_kills_the_process_group_and_only_that_command(agent: AgentChannel,
                                                                 tmp_path: Path) -> None:
    t = time.monotonic()
    r = agent.run(f"sleep 30 & echo $! > {tmp_path}/bg; sleep 30; echo never", timeout=1)
    assert r.timed_out and r.returncode == 137 and r.stdout == b""
    assert time.monotonic() - t < 10
    bg = int((tmp_path / "bg").read_text())
    time.sleep(0.2)
    stat = Path(f"/proc/{bg}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z"
    # Commands that end in time are not marked, however many follow one another.
    for i in range(30):
        assert agent.run(f"echo {i}", timeout=1).stdout == f"{i}\n".encode()


def test_timeout_brings_the_diagnostics_apart_from_stderr(agent: AgentChannel,
                                                         tmp_path: Path) -> None:
    r = agent.run("echo out; printf err >&2; sleep 30", timeout=1)
    assert r.timed_out and (r.stdout, r.stderr) == (b"out\n", b"err")
    assert re.fullmatch(rb"state of \d+\n", r.diagnostics), r.diagnostics
    assert agent.run("echo late >&2; exit 4", timeout=5).diagnostics == b""
    # A diagnostic that blocks does not hold the kill up for more than its 8 s: the reply
    # carries what it wrote by then.
    (tmp_path / "diag").write_text("echo partial; sleep 60\n")
    t = time.monotonic()
    r = agent.run("sleep 30", timeout=1)
    assert r.timed_out and r.diagnostics == b"partial\n" and r.stderr == b""
    assert 8 <= time.monotonic() - t < 15
    assert agent.run("echo next").stdout == b"next\n"


def test_noise_lines_are_skipped(agent: AgentChannel) -> None:
    agent._send(b"garbage line\n@@X 1 2 3\n", time.monotonic() + 5)
    assert agent.run("echo ok").stdout == b"ok\n"


class _Gone(Exception):
    pass


def test_a_peer_gone_before_the_send_is_the_broken_hook_not_a_broken_pipe() -> None:
    """QEMU killed between two commands: the host's send gets EPIPE (or ECONNRESET) before any
    read sees EOF. That must reach ``on_broken`` (the machine turns it into MachineDied), as an
    EOF does, not escape as BrokenPipeError (test_dead_qemu_is_a_clear_error... saw it)."""
    host, guest = socket.socketpair()
    guest.close()
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise _Gone

    chan = AgentChannel(host, on_broken=broken)
    try:
        with pytest.raises(_Gone):
            chan.run("echo hi", timeout=5)
    finally:
        host.close()
    assert calls == ["broken"]
