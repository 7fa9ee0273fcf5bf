"""An optional appliance component: Debian 12's lvm2 in the guest (for the LVM proofs).

An optional component, so the base appliance (and its cache key) stays as it is: a second
cpio archive appended to the base initramfs (the kernel unpacks concatenated archives), and
:class:`LvmMachine` boots with the pair. Contents: ``/sbin/lvm`` from the lvm2 .deb
(downloaded with ``apt-get download`` into ``~/.cache/dmimage/lvm2`` and unpacked with
``dpkg-deb -x``, never installed on the host), the host libraries ``ldd`` names for it,
thin_check and cache_check (thin-provisioning-tools 0.9's pdata_tools from the host, which
lvm2 runs when it activates a thin pool or a cache) with its libraries, the raid, mirror, cache
and writecache targets when the kernel has them, and a minimal lvm.conf for a guest without
udev (and without lvm2's device hints: the tests rewrite PVs behind lvm2's back, the case
lvm.conf says to disable them for). :class:`LvmMachine` boots the machine's own base initrd
(so a host share works too), and a third small archive has the base init load the
component's modules at boot, so the saved VM state holds them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from pathlib import Path

from .appliance import (
    GUEST_MODULES,
    ApplianceError,
    CpioWriter,
    build_initramfs,
    cache_root,
    read_module,
    resolve_modules,
    shared_libraries,
)
from .debs import unpacked
from .errors import VMError
from .machine import Disk, Machine

LVM_CONF = """\
config { checks = 1 }
devices {
    dir = "/dev"
    scan = [ "/dev" ]
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    use_devicesfile = 0
    hints = "none"
    filter = [ "a|^/dev/vd|", "r|.*|" ]
    sysfs_scan = 1
    multipath_component_detection = 0
    md_component_detection = 0
    fw_raid_component_detection = 0
}
activation {
    udev_sync = 0
    udev_rules = 0
    verify_udev_operations = 0
    monitoring = 0
    checks = 0
}
global {
    thin_check_executable = "/sbin/thin_check"
    thin_check_options = [ "-q", "--clear-needs-check-flag" ]
    cache_check_executable = "/sbin/cache_check"
    use_lvmpolld = 0
    event_activation = 0
}
backup { backup = 0 archive = 0 }
log { verbose = 0 syslog = 0 }
"""

#: Modules lvm2 needs beyond the base appliance's (lvcreate -s checks for the snapshot target
#: even for thin snapshots); loaded at boot (:func:`_boot_setup`).
EXTRA_MODULES = ("dm-snapshot",)
#: Targets of the other segment types lvs reports (raid, mirror, cache, writecache); loaded
#: when the kernel has them, so the lv_attr proofs can create such LVs.
OPTIONAL_EXTRA_MODULES = ("dm-raid", "raid0", "raid1", "raid10", "dm-mirror", "dm-log",
                          "dm-region-hash", "dm-cache", "dm-cache-smq", "dm-writecache")

#: Directories lvm2 wants (locks, backups), made at boot (:func:`_boot_setup`).
RUN_DIRS = ("run/lvm", "run/lock/lvm", "etc/lvm/backup", "etc/lvm/archive")

#: lvm commands the tests call, as symlinks to the one binary.
COMMANDS = ("pvcreate", "vgcreate", "lvcreate", "lvs", "pvs", "vgs", "vgchange", "lvchange",
            "vgck", "vgcfgbackup", "vgcfgrestore", "lvremove", "lvrename", "lvextend",
            "vgremove", "pvremove", "vgscan", "pvscan", "lvconvert")


def lvm2_root() -> Path:
    """The unpacked lvm2 .deb (downloaded once into the cache; guest/debs.py)."""
    return unpacked(cache_root() / "lvm2", ("lvm2",),
                    lambda root: (root / "sbin" / "lvm").exists())


def _add_path(w: CpioWriter, made: set[str], rel: str, data: bytes, perm: int) -> None:
    parts = rel.split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        if d not in made:
            w.add_dir(d)
            made.add(d)
    w.add_file(rel, data, perm)


def _extra_modules(moddir: Path) -> list[str]:
    base = set(resolve_modules(moddir))
    return [m for m in resolve_modules(moddir, GUEST_MODULES + EXTRA_MODULES,
                                       OPTIONAL_EXTRA_MODULES)
            if m not in base]


def build_component(moddir: Path) -> Path:
    """The lvm2 cpio component for one kernel (cached by content)."""
    lvm = lvm2_root() / "sbin" / "lvm"
    thin = Path(os.path.realpath("/usr/sbin/thin_check"))
    if not thin.exists():
        raise ApplianceError("thin_check (thin-provisioning-tools) not found on the host")
    libs = sorted(set(shared_libraries(lvm)) | set(shared_libraries(thin)))
    h = hashlib.sha256(b"dmimage-lvm2-component-v1\0" + LVM_CONF.encode())
    mods = _extra_modules(moddir)
    for p in [lvm, thin, *map(Path, libs), *(moddir / m for m in mods)]:
        data = p.read_bytes()
        h.update(f"{p}\0{len(data)}\0".encode())
        h.update(data)
    out = cache_root() / "appliance" / f"lvm2-{h.hexdigest()[:20]}.cpio"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        w = CpioWriter(f)
        made = {"sbin", "lib", "lib64", "usr", "etc"}
        _add_path(w, made, "sbin/lvm", lvm.read_bytes(), 0o755)
        for c in COMMANDS:
            w.add_symlink(f"sbin/{c}", "lvm")
        _add_path(w, made, "sbin/pdata_tools", thin.read_bytes(), 0o755)
        for c in ("thin_check", "thin_dump", "cache_check"):
            w.add_symlink(f"sbin/{c}", "pdata_tools")
        for lib in libs:
            _add_path(w, made, lib.lstrip("/"), Path(lib).read_bytes(), 0o755)
        _add_path(w, made, "etc/lvm/lvm.conf", LVM_CONF.encode(), 0o644)
        names = []
        for m in mods:
            name = os.path.basename(m).rsplit(".ko", 1)[0] + ".ko"
            _add_path(w, made, f"lib/modules/lvm2/{name}", read_module(moddir / m), 0o644)
            names.append(name)
        _add_path(w, made, "etc/lvm2.modules", ("\n".join(names) + "\n").encode(), 0o644)
        w.close()
    os.replace(tmp, out)
    return out


def _cpio_member(archive: bytes, name: str) -> bytes | None:
    """The data of regular file *name* in a "newc" cpio *archive* (as :class:`CpioWriter`
    writes them), or None."""
    pos = 0
    while archive.startswith(b"070701", pos):
        fields = [int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        start = pos + 110
        entry = archive[start: start + namesize - 1].decode(errors="replace")
        data_at = start + namesize + (-(110 + namesize) % 4)
        if entry == name:
            return archive[data_at: data_at + size]
        if entry == CpioWriter.TRAILER:
            return None
        pos = data_at + size + (-size % 4)
    return None


def _boot_setup(base: bytes, comp: Path) -> bytes:
    """A third archive that makes the base init do :meth:`LvmMachine.lvm_setup`'s work at boot:
    its ``etc/modules.order`` (replacing the base's: the kernel unpacks a later archive's file
    over an earlier one) names the base's modules, then the component's; and it makes lvm2's
    run directories. So a saved VM state already holds them: a restored guest pays nothing
    (inserting them cost ~0.9 guest CPU-s per machine under TCG, raid6's benchmark the most)."""
    order = _cpio_member(base, "etc/modules.order")
    ours = _cpio_member(comp.read_bytes(), "etc/lvm2.modules")
    if order is None or ours is None:
        raise ApplianceError("the base appliance or the lvm2 component has no module list")
    names = order.decode().split()
    names += [f"lvm2/{m}" for m in ours.decode().split() if m not in names]
    buf = io.BytesIO()
    w = CpioWriter(buf)
    for d in RUN_DIRS:
        parts = d.split("/")
        for i in range(1, len(parts) + 1):
            w.add_dir("/".join(parts[:i]))
    w.add_file("etc/modules.order", ("\n".join(names) + "\n").encode())
    w.close()
    return buf.getvalue()


def combined_initramfs(moddir: Path, base: Path | None = None) -> Path:
    """The base appliance (``base``: the initrd the machine built, e.g. with the host-share
    modules) followed by the lvm2 component and the boot set-up (:func:`_boot_setup`), as one
    initrd file."""
    base = base or build_initramfs(moddir).path
    comp = build_component(moddir)
    key = hashlib.sha256(f"boot-setup-v1\0{base.name}\0{comp.name}".encode()).hexdigest()[:20]
    out = base.parent / f"initramfs-lvm2-{key}.cpio"
    if not out.exists():
        base_data = base.read_bytes()
        if base_data[:2] == b"\x1f\x8b":
            base_data = gzip.decompress(base_data)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            for data in (base_data, comp.read_bytes(), _boot_setup(base_data, comp)):
                f.write(data + bytes(-len(data) % 4))
        os.replace(tmp, out)
    return out


class LvmMachine(Machine):
    """A guest whose appliance carries lvm2 (and thin_check for pool activation)."""

    def command_line(self, initrd: Path, kernel_image: Path, accel: str) -> list[str]:
        return super().command_line(combined_initramfs(self.kernel.moddir, initrd),
                                    kernel_image, accel)

    def _scratch_disk(self) -> Disk:
        """The hashing scratch disk, hidden from lvm2 (its filter rejects it first): copies of
        LVs land there, and lvm2 must not scan them as PVs of its own."""
        first = self._scratch is None
        disk = super()._scratch_disk()
        if first:
            self.sh(f"sed -i 's#filter = \\[ #filter = [ \"r|^{disk.guest_path}$|\", #' "
                    f"/etc/lvm/lvm.conf && grep -q 'r|^{disk.guest_path}' /etc/lvm/lvm.conf")
        return disk

    def lvm_setup(self) -> None:
        """Check that the boot did lvm2's set-up (:func:`_boot_setup`): its directories
        exist and its modules are loaded (init only logs a failed insmod)."""
        out = self.sh("cat /etc/lvm2.modules; echo @@; cat /proc/modules; echo @@; "
                      "for d in " + " ".join(f"/{d}" for d in RUN_DIRS) + "; do "
                      "[ -d $d ] || echo $d; done")
        wanted, loaded, missing_dirs = out.split("@@\n")
        have = {line.split()[0] for line in loaded.splitlines() if line.strip()}
        missing = [m for m in wanted.split()
                   if m.rsplit(".ko", 1)[0].replace("-", "_") not in have]
        if missing or missing_dirs.strip():
            raise VMError(f"lvm2 set-up incomplete at boot: modules {missing} not loaded, "
                          f"directories missing: {missing_dirs.split()}", **self._ctx())
