"""vmtests/docker_scenario.py without a VM: a Docker scenario that fails leaves its guest as
it found it. test_docker_store.py's three scenarios (and the kill) run one after another in
one module guest, so a dockerd left running with its data disk mounted by a failed scenario
would make every later scenario's start fail for a reason not its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import vmtests.docker_scenario as sc


class _FakeGuest:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, disk: Path, extra_opts: Any = ()) -> None:
        self.calls.append("start")

    def log(self) -> str:
        return "dockerd's log"

    def stop(self, *, kill: bool = False, unmount: bool = True, timeout: float = 120.0) -> None:
        self.calls.append(f"stop kill={kill} unmount={unmount}")


@pytest.mark.parametrize("fs,seed", [("ext4", None), ("ext4", 7), ("xfs", None)])
def test_a_failed_scenario_stops_its_dockerd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              fs: str, seed: int | None) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("a docker operation failed")

    monkeypatch.setattr(sc, "write_inputs", lambda work: {})
    monkeypatch.setattr(sc, "make_data_disk", lambda path: path)
    monkeypatch.setattr(sc, "run_docker_ops", boom)
    monkeypatch.setattr(sc, "run_random_ops", boom)
    dg = _FakeGuest()
    with pytest.raises(RuntimeError, match="a docker operation failed"):
        sc.make_store(dg, tmp_path, fs=fs, seed=seed)  # type: ignore[arg-type]
    assert dg.calls == ["start", "stop kill=True unmount=True"]
    assert (tmp_path / "dockerd.log").read_text() == "dockerd's log"
