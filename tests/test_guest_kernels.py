"""Guest kernels without a VM: names and selection, the two Debian package layouts, module
compression, and the appliance built from each real kernel that is here.

The appliance checks use independent oracles: the host's ``cpio`` unpacks the archive, and
kmod's ``modinfo`` reads each module's own ``depends``/``vermagic`` (not modules.dep, which
the appliance uses) to prove the load order and that the module belongs to that kernel.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmimage.guest.appliance import (
    CRYPTO_PROVIDERS,
    FOLDED_INTO_CORE,
    GUEST_MODULES,
    HOST_SHARE_MODULES,
    ApplianceError,
    build_initramfs,
    read_module,
    resolve_modules,
)
from dmimage.guest.kernels import (
    KNOWN,
    Kernel,
    KernelNotFound,
    config_file,
    find_fetched,
    kernel_by_name,
    list_kernels,
    selected_names,
)

# --------------------------------------------------------------------------------------------
# Names


def test_all_selects_the_four_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    assert KNOWN == ("deb11", "deb12", "deb13", "deb13-backports")
    monkeypatch.setenv("DMIMAGE_VM_KERNELS", "all")
    assert selected_names() == list(KNOWN)
    assert selected_names("deb13, all,deb12") == ["deb13", "deb11", "deb12", "deb13-backports"]
    assert selected_names("deb11") == ["deb11"]


def test_unknown_name_is_refused() -> None:
    with pytest.raises(KernelNotFound, match="deb13-backports"):
        kernel_by_name("deb10")


def _fake_tree(root: Path, version: str, *, layout: str) -> Path:
    """A package tree as Debian ships it: ``boot/vmlinuz-V`` + ``config-V`` (up to 6.x), or
    everything in ``usr/lib/modules/V/`` (7.x)."""
    moddir = root / ("lib/modules" if layout == "boot" else "usr/lib/modules") / version
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text("kernel/drivers/md/dm-mod.ko:\n")
    if layout == "boot":
        (root / "boot").mkdir()
        (root / "boot" / f"vmlinuz-{version}").write_bytes(b"bz")
        (root / "boot" / f"config-{version}").write_text("CONFIG_PVH=y\n")
    else:
        (moddir / "vmlinuz").write_bytes(b"bz")
        (moddir / "config").write_text("CONFIG_PVH=y\n")
    return moddir


def test_fetched_layouts_and_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "dmimage"
    old = _fake_tree(cache / "debian11/linux-image-5.10.0-31-amd64", "5.10.0-31-amd64",
                     layout="boot")
    new = _fake_tree(cache / "debian11/linux-image-5.10.0-32-amd64", "5.10.0-32-amd64",
                     layout="boot")
    split = _fake_tree(cache / "debian13-backports/linux-image-7.3.4+deb13-amd64",
                       "7.3.4+deb13-amd64", layout="modules")
    k11 = kernel_by_name("deb11", fetch=False)
    assert (k11.name, k11.version, k11.moddir) == ("deb11", "5.10.0-32-amd64", new)
    assert old != new and config_file(k11) == new.parents[2] / "boot/config-5.10.0-32-amd64"
    kb = kernel_by_name("deb13-backports", fetch=False)
    assert (kb.version, kb.vmlinuz, kb.moddir) == ("7.3.4+deb13-amd64", split / "vmlinuz", split)
    assert config_file(kb) == split / "config"
    # A path to a 7.x vmlinuz brings its module directory.
    assert kernel_by_name(str(split / "vmlinuz")).moddir == split
    assert find_fetched("deb13") is None
    with pytest.raises(KernelNotFound, match="vm kernels --fetch deb13"):
        kernel_by_name("deb13", fetch=False)
    rows = {r.name: r for r in list_kernels(["deb11", "deb13", "deb13-backports"])}
    assert rows["deb11"].state == "fetched" and rows["deb11"].where == k11.vmlinuz
    assert rows["deb13"].state == "not fetched" and rows["deb13"].kernel is None
    assert rows["deb13"].where == cache / "debian13"


def test_cli_kernels_lists_state(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    _fake_tree(tmp_path / "dmimage/debian13-backports/linux-image-7.3.4+deb13-amd64",
               "7.3.4+deb13-amd64", layout="modules")
    out = subprocess.run([sys.executable, "-m", "dmimage", "vm", "kernels", "deb11",
                          "deb13-backports"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].split("\t") == ["NAME", "VERSION", "STATE", "PATH"]
    assert out[1].split("\t") == ["deb11", "-", "not fetched", str(tmp_path / "dmimage/debian11")]
    assert out[2].split("\t")[:3] == ["deb13-backports", "7.3.4+deb13-amd64", "fetched"]
    bad = subprocess.run([sys.executable, "-m", "dmimage", "vm", "kernels", "deb10"], env=env,
                         capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "deb10" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------------------------
# Modules


@pytest.mark.parametrize("suffix,tool", [("", None), (".xz", ["xz", "-z", "--check=crc32"]),
                                         (".zst", ["zstd", "-q", "-c"]),
                                         (".gz", ["gzip", "-c"])])
def test_module_compression(suffix: str, tool: list[str] | None, tmp_path: Path) -> None:
    """Each compression Debian kernels use (or may), compressed by the real tools."""
    payload = b"\x7fELF" + os.urandom(5000) + bytes(20000)
    path = tmp_path / f"dm-x.ko{suffix}"
    if tool is None:
        path.write_bytes(payload)
    else:
        if shutil.which(tool[0]) is None:
            pytest.skip(f"{tool[0]} not installed")
        path.write_bytes(subprocess.run(tool, input=payload, capture_output=True,
                                        check=True).stdout)
        assert path.read_bytes() != payload
    assert read_module(path) == payload


def test_modules_folded_into_core_may_be_absent(tmp_path: Path) -> None:
    """7.x has no libcrc32c or crc32c_generic: skipped; any other missing module is refused."""
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/md/dm-mod.ko.xz:\n"
        "kernel/drivers/md/dm-thin-pool.ko.xz: kernel/drivers/md/dm-mod.ko.xz\n")
    (tmp_path / "modules.builtin").write_text("kernel/lib/crc/crc32.ko\n")
    assert FOLDED_INTO_CORE == {"crc32c_generic", "libcrc32c"}
    order = resolve_modules(tmp_path, ["crc32c_generic", "libcrc32c", "dm-thin-pool"], ())
    assert order == ["kernel/drivers/md/dm-mod.ko.xz", "kernel/drivers/md/dm-thin-pool.ko.xz"]
    with pytest.raises(ApplianceError, match="dm-bufio"):
        resolve_modules(tmp_path, ["dm-bufio"], ())


def _present_kernels() -> list[Kernel]:
    found = []
    for name in KNOWN:
        try:
            found.append(kernel_by_name(name, fetch=False))
        except KernelNotFound:
            pass
    return found


def _modinfo(path: Path, field: str) -> str:
    return subprocess.run(["modinfo", "-F", field, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("name", KNOWN)
def test_appliance_for_each_kernel(name: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every module in the appliance is an uncompressed ELF built for this kernel (vermagic),
    and kmod's own reading of each module's dependencies agrees with the load order."""
    kernel = next((k for k in _present_kernels() if k.name == name), None)
    if kernel is None:
        pytest.skip(f"{name} is not here (dmimage vm kernels --fetch {name})")
    if shutil.which("modinfo") is None or shutil.which("cpio") is None:
        pytest.skip("modinfo (kmod) or cpio not installed")
    # A private cache for the archive, but the real kernel tree (its path is not in the cache).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    app = build_initramfs(kernel.moddir, compress=True, extra_modules=HOST_SHARE_MODULES)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "lib/modules/*", "etc/modules.order"],
                   input=gzip.decompress(app.path.read_bytes()), cwd=out, capture_output=True,
                   check=True)
    order = (out / "etc/modules.order").read_text().split()
    assert order == app.modules and len(order) == len(set(order))
    builtin = {Path(p).name.removesuffix(".ko").replace("-", "_")
               for p in (kernel.moddir / "modules.builtin").read_text().split()}
    loaded: set[str] = set()
    for mod in order:
        path = out / "lib/modules" / mod
        assert path.read_bytes()[:4] == b"\x7fELF", mod
        assert _modinfo(path, "vermagic").split()[0] == kernel.version, mod
        for dep in filter(None, _modinfo(path, "depends").split(",")):
            dep = dep.replace("-", "_")
            assert dep in loaded or dep in builtin, f"{mod} needs {dep} first"
        loaded.add(mod.removesuffix(".ko").replace("-", "_"))
    wanted = {m.replace("-", "_") for m in GUEST_MODULES + HOST_SHARE_MODULES}
    missing = wanted - loaded - builtin
    assert missing <= FOLDED_INTO_CORE, missing
    if "libcrc32c" in loaded:  # its crc32c provider must be there before it (soft dependency)
        assert order.index("crc32c_generic.ko") < order.index("libcrc32c.ko")
    for mod in ("dm_thin_pool", "dm_persistent_data", "ext4", "9p", "9pnet_virtio"):
        assert mod in loaded, mod
    # The guest cannot load a crypto module on demand (no modprobe): each algorithm the crypt
    # and verity tables name must be built in or loaded (5.10 ships aes and cbc as modules).
    for alg, providers in CRYPTO_PROVIDERS.items():
        assert set(providers) & (loaded | builtin), f"{alg}: none of {providers} is here"
