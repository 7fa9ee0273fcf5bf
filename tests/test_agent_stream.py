"""The agent channel's framing against a hand-driven guest end of a socket pair: replies the
host stopped reading must not be taken for frames later (their outputs are raw bytes)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from dmimage.guest.agent import AgentChannel
from dmimage.guest.errors import GuestTimeout


@pytest.fixture
def pair() -> Iterator[tuple[AgentChannel, socket.socket]]:
    host, guest = socket.socketpair()
    try:
        yield AgentChannel(host), guest
    finally:
        host.close()
        guest.close()


def test_a_reply_abandoned_mid_output_is_skipped_whole(
        pair: tuple[AgentChannel, socket.socket]) -> None:
    chan, guest = pair
    sep = {i: b"@@%s.%d\n" % (chan._token.encode(), i) for i in (1, 2)}
    # Command 1's header and the start of its stdout arrive; the host gives up before the rest.
    guest.sendall(b"@@R 1 0 0\nfirst half\n")
    with pytest.raises(GuestTimeout):
        chan.run("cat some-file", timeout=0, host_timeout=0.3)
    # The rest of command 1's output holds lines that look like frames; then command 2's reply.
    guest.sendall(b"@@R 2 0 0\n@@READY 1.0\ntail" + sep[1] + b"@@R 2 9 1\n" + sep[1]
                  + b"@@R 2 5 0\nreal\n" + sep[2] + b"e\n" + sep[2])
    r = chan.run("echo real; echo e >&2; exit 5", timeout=0, host_timeout=5)
    assert (r.returncode, r.timed_out, r.stdout, r.stderr) == (5, False, b"real\n", b"e\n")


def test_a_reply_abandoned_before_its_header_is_skipped(
        pair: tuple[AgentChannel, socket.socket]) -> None:
    chan, guest = pair
    sep = {i: b"@@%s.%d\n" % (chan._token.encode(), i) for i in (1, 2)}
    with pytest.raises(GuestTimeout):
        chan.run("sleep 9", timeout=0, host_timeout=0.3)
    guest.sendall(b"@@R 1 0 0\n@@R 2 0 0\nno newline" + sep[1] + sep[1]
                  + b"@@R 2 0 0\nx" + sep[2] + sep[2])
    r = chan.run("printf x", timeout=0, host_timeout=5)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"x", b"")
