"""DockerGuest keeps a data disk attached once plugged (a hot-plug costs the TCG guest ~0.3
CPU-s). QEMU holds the file it opened, so a new file put at the same path (a store made
again) must be attached afresh, never served from the old, unlinked inode. The machine here
records the QMP-level calls; the guest side of attach/detach is proven in vmtests."""

from __future__ import annotations

from pathlib import Path

from dmimage.guest.docker import DockerGuest


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def attach(self, path: Path, *, read_only: bool, serial: str) -> str:
        self.calls.append(("attach", serial))
        return serial

    def detach(self, disk: str) -> None:
        self.calls.append(("detach", disk))


def test_same_file_reuses_the_disk_a_new_file_replaces_it(tmp_path: Path) -> None:
    vm = _Recorder()
    g = DockerGuest(vm, kernel=None)  # type: ignore[arg-type]
    img = tmp_path / "data.img"
    img.write_bytes(b"a")
    first = g._data_disk(img)
    assert g._data_disk(tmp_path / "." / "data.img") == first  # same inode: no new plug
    new = tmp_path / "new.img"
    new.write_bytes(b"b")
    new.replace(img)  # another inode at the same path
    second = g._data_disk(img)
    assert second != first
    assert vm.calls == [("attach", first), ("detach", first), ("attach", second)]
