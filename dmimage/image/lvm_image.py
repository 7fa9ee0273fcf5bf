"""``layout = "lvm"``: the built pool inside an LVM2 VG on a GPT disk image.

One GPT partition holds a PV (label, one metadata area, extents from 1 MiB); the VG has the
thin pool as ``lvcreate --type thin-pool`` lays it out (``lvol0_pmspare``, ``POOL_tmeta``,
``POOL_tdata``, each a linear LV, then the pool) and one thin LV per volume, device ids and
origins as the spec says. The pool's metadata and data files are copied into the tmeta and
tdata extents. ``activate.sh`` runs ``vgchange -ay`` (lvm2 then runs thin_check and loads the
tables itself); ``deactivate.sh`` runs ``vgchange -an``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dmimage.errors import DeviceError
from dmimage.image.gpt import SECTOR, set_guids
from dmimage.image.spec import LinearVolume, Spec
from dmimage.lvm.create import PE_START, ThinSpec, thin_pool_vg, vg_text, write_pv
from dmimage.lvm.model import StripedSegment

ALIGN = 1 << 20

ACTIVATE = """#!/bin/sh
# Activate VG {vg} built by dmimage: lvm2 checks the pool (thin_check) and creates the devices.
set -e
command -v vgchange >/dev/null || {{ echo "activate.sh: lvm2 (vgchange) is needed" >&2; exit 2; }}
vgchange -ay {vg}
lvs -a {vg}
"""

DEACTIVATE = """#!/bin/sh
set -e
vgchange -an {vg}
"""


def _gpt_one_partition(path: Path, disk_bytes: int, start: int, size: int, name: str) -> None:
    import parted

    with open(path, "r+b") as f:
        f.truncate(disk_bytes)
    dev = parted.getDevice(str(path))
    try:
        disk = parted.freshDisk(dev, "gpt")
        geom = parted.Geometry(device=dev, start=start // SECTOR, length=size // SECTOR)
        part = parted.Partition(disk=disk, type=parted.PARTITION_NORMAL, geometry=geom)
        disk.addPartition(part, constraint=parted.Constraint(exactGeom=geom))
        part.set_name(name)
        part.setFlag(parted.PARTITION_LVM)
        disk.commit()
    except parted.PartedException as exc:  # pragma: no cover - libparted refusals
        raise DeviceError(f"{path}: libparted: {exc}") from None


def _verify_linear(img: str, vgname: str,
                   linear: list[tuple[LinearVolume, Path | None, int, str]]) -> None:
    """The build's self-check for linear LVs: read back through the VG just written
    (dmimage.lvm's reader: label, metadata area, extent map), each must hash as planned."""
    import hashlib

    from dmimage.image.build import BuildError
    from dmimage.lvm.vg import load_vgs
    from dmimage.lvm.view import LvView

    if not linear:
        return
    loaded, _scan, problems = load_vgs([img])
    lvg = next((g for g in loaded if g.vg.name == vgname), None)
    if lvg is None or problems:
        raise BuildError(f"self-check: {img} does not read back as VG {vgname}: {problems}")
    for lv, _f, _n, want in linear:
        model = lvg.vg.lv(lv.name)
        assert model is not None
        h = hashlib.sha256()
        with LvView(lvg, model) as view:
            for off in range(0, view.size, 8 << 20):
                h.update(view.pread(min(8 << 20, view.size - off), off))
        if h.hexdigest() != want:
            raise BuildError(f"self-check: linear LV {lv.name} reads back as "
                             f"{h.hexdigest()}, its content is {want}")


def write_lvm_image(spec: Spec, tmp: Path, meta_tmp: Path, data_tmp: Path,
                    devices: list[Any], linear: list[tuple[LinearVolume, Path | None, int, str]]
                    ) -> dict[str, Any]:
    """The image, scripts and manifest part for ``layout = "lvm"``; returns the manifest.
    ``linear``: (volume, content file or None, content length, sha256 of the LV's bytes)."""
    from dmimage.image.sparse import copy_sparse

    assert spec.lvm is not None
    ps, ext = spec.pool, spec.lvm.extent_size
    vgname = spec.lvm.vg
    pool = ps.name.replace("/", "_")
    thins = [ThinSpec(v.name, v.id, v.size, v.origin) for v, _p, _m, _s in devices]
    lin_total = sum(lv.size for lv, _f, _n, _h in linear)
    need = PE_START + (ps.metadata_size + spec.lvm.pmspare_size + ps.data_size + lin_total)
    pv_size = -(-need // ALIGN) * ALIGN
    disk_bytes = spec.image_size or (ALIGN + pv_size + ALIGN)
    if disk_bytes < ALIGN + pv_size + ALIGN:
        from dmimage.image.spec import SpecError, human

        raise SpecError("image_size", f"{human(disk_bytes)} does not fit the PV "
                        f"({human(pv_size)}) and the GPT")
    pv_size = (disk_bytes - 2 * ALIGN) // ALIGN * ALIGN
    group, pv_id = thin_pool_vg(
        vg=vgname, seed=spec.uuid5("lvm").bytes, extent_size=ext, region_size=pv_size,
        pool=pool, tmeta_size=ps.metadata_size, tdata_size=ps.data_size,
        chunk_sectors=ps.block_sectors, transaction_id=ps.transaction_id, thins=thins,
        creation_time=spec.source_date_epoch, pmspare_size=spec.lvm.pmspare_size,
        linear=[(lv.name, lv.size) for lv, _f, _n, _h in linear])
    img_name = f"{spec.name}.img"
    img = tmp / img_name
    img.touch()
    part_uuid, disk_guid = spec.uuid5("partition:pv"), spec.uuid5("disk")
    pname = f"{spec.name}-pv"[:36]
    _gpt_one_partition(img, disk_bytes, ALIGN, pv_size, pname)
    set_guids(str(img), disk_guid, [part_uuid])
    lv_start = {lv.name: seg.stripes[0][1] for lv in group.lvs
                if isinstance(seg := lv.segments[0], StripedSegment)}
    copies: list[tuple[Path, str, int]] = [(meta_tmp, f"{pool}_tmeta", ps.metadata_size),
                                           (data_tmp, f"{pool}_tdata", ps.data_size)]
    copies += [(f, lv.name, min(n, lv.size)) for lv, f, n, _h in linear if f is not None]
    fd = os.open(img, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for src, lv, size in copies:
            sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
            try:
                copy_sparse(sfd, 0, fd, ALIGN + PE_START + lv_start[lv] * ext,
                            min(size, os.fstat(sfd).st_size))
            finally:
                os.close(sfd)
        os.fsync(fd)
        write_pv(fd, ALIGN, pv_size, pv_id, vg_text(group))
    finally:
        os.close(fd)
    _verify_linear(str(img), vgname, linear)
    for n, text in (("activate.sh", ACTIVATE), ("deactivate.sh", DEACTIVATE)):
        (tmp / n).write_text(text.format(vg=vgname))
        os.chmod(tmp / n, 0o755)
    from dmimage.image.build import _file_sha

    return {
        "_files": [img_name, "activate.sh", "deactivate.sh"],
        "image": {"file": img_name, "size": disk_bytes, "disk_guid": str(disk_guid),
                  "sha256": _file_sha(img)},
        "partitions": [{"number": 1, "role": "lvm-pv", "name": pname,
                        "partuuid": str(part_uuid), "start": ALIGN, "size": pv_size}],
        "lvm": {"vg": vgname, "vg_uuid": group.id, "pv_uuid": pv_id, "extent_size": ext,
                "pool": pool, "lvs": [lv.name for lv in group.lvs]},
        "pool": {"name": pool, "data_block_size": ps.block_sectors,
                 "data_block_bytes": ps.data_block_size, "nr_data_blocks": ps.nr_data_blocks,
                 "data_size": ps.data_size, "metadata_size": ps.metadata_size,
                 "transaction_id": ps.transaction_id},
        "linear": [{"name": lv.name, "lv": f"{vgname}/{lv.name}", "size": lv.size,
                    "sha256": sha} for lv, _f, _n, sha in linear],
        "devices": [{"name": v.name, "lv": f"{vgname}/{v.name}", "id": v.id, "size": v.size,
                     "origin": v.origin, "sha256": sha, "mapped_blocks": mapped}
                    for v, _p, mapped, sha in devices],
        "activate": "activate.sh",
        "deactivate": "deactivate.sh",
    }
