"""The appliance strips module signatures only for a kernel whose config says it loads
unsigned modules: a kernel built with CONFIG_MODULE_SIG_FORCE (or one without a config to
tell) refuses unsigned modules, and its guest would have no agent port and no dm targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmimage.guest.appliance import MODULE_SIG_MAGIC, build_initramfs, signatures_optional
from dmimage.guest.kernels import KernelNotFound, debian12

NOT_FORCED = "CONFIG_MODULE_SIG=y\n# CONFIG_MODULE_SIG_FORCE is not set\n"
FORCED = "CONFIG_MODULE_SIG=y\nCONFIG_MODULE_SIG_FORCE=y\n"


def _tree(root: Path, lib: str, version: str, config: str | None, where: str) -> Path:
    moddir = root / lib / "modules" / version
    moddir.mkdir(parents=True)
    if config is not None:
        path = moddir / "config" if where == "moddir" else root / "boot" / f"config-{version}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config)
    return moddir


@pytest.mark.parametrize("lib", ["lib", "usr/lib"])
@pytest.mark.parametrize("where", ["boot", "moddir"])
def test_the_kernels_config_decides(tmp_path: Path, lib: str, where: str) -> None:
    assert signatures_optional(_tree(tmp_path / "a", lib, "6.1.0-1", NOT_FORCED, where))
    assert not signatures_optional(_tree(tmp_path / "b", lib, "6.1.0-1", FORCED, where))
    assert not signatures_optional(_tree(tmp_path / "c", lib, "6.1.0-1", None, where))


def _cpio_files(raw: bytes) -> dict[str, bytes]:
    """The regular files of a newc archive (the appliance's format), by name."""
    files, pos = {}, 0
    while True:
        head = raw[pos:pos + 110]
        assert head[:6] == b"070701", pos
        size, namesize = int(head[54:62], 16), int(head[94:102], 16)
        name = raw[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return files
        files[name] = raw[pos:pos + size]
        pos = (pos + size + 3) & ~3


def test_a_kernel_that_forces_signatures_keeps_them(tmp_path: Path) -> None:
    try:
        real = debian12().moddir
    except KernelNotFound as exc:
        pytest.skip(str(exc))
    moddir = tmp_path / "lib" / "modules" / real.name
    moddir.parent.mkdir(parents=True)
    moddir.symlink_to(real)
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / f"config-{real.name}").write_text(FORCED)
    files = _cpio_files(build_initramfs(moddir, cache_dir=tmp_path / "cache").path.read_bytes())
    mods = {n: d for n, d in files.items() if n.startswith("lib/modules/")}
    assert "lib/modules/dm-thin-pool.ko" in mods, sorted(mods)
    assert all(d.endswith(MODULE_SIG_MAGIC) for d in mods.values() if d[:4] == b"\x7fELF")
