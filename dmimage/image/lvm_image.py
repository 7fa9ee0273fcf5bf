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
from dmimage.image.spec import Spec
from dmimage.lvm.create import PE_START, ThinSpec, thin_pool_vg, vg_text, write_pv

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


def write_lvm_image(spec: Spec, tmp: Path, meta_tmp: Path, data_tmp: Path,
                    devices: list[Any]) -> dict[str, Any]:
    """The image, scripts and manifest part for ``layout = "lvm"``; returns the manifest."""
    from dmimage.image.sparse import copy_sparse

    assert spec.lvm is not None
    ps, ext = spec.pool, spec.lvm.extent_size
    vgname = spec.lvm.vg
    pool = ps.name.replace("/", "_")
    thins = [ThinSpec(v.name, v.id, v.size, v.origin) for v, _p, _m, _s in devices]
    need = PE_START + (2 * ps.metadata_size + ps.data_size)
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
        creation_time=spec.source_date_epoch)
    img_name = f"{spec.name}.img"
    img = tmp / img_name
    img.touch()
    part_uuid, disk_guid = spec.uuid5("partition:pv"), spec.uuid5("disk")
    pname = f"{spec.name}-pv"[:36]
    _gpt_one_partition(img, disk_bytes, ALIGN, pv_size, pname)
    set_guids(str(img), disk_guid, [part_uuid])
    lv_start = {lv.name: lv.segments[0].stripes[0][1]  # type: ignore[attr-defined]
                for lv in group.lvs if lv.name.endswith(("_tmeta", "_tdata"))}
    fd = os.open(img, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for src, lv, size in ((meta_tmp, f"{pool}_tmeta", ps.metadata_size),
                              (data_tmp, f"{pool}_tdata", ps.data_size)):
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
        "devices": [{"name": v.name, "lv": f"{vgname}/{v.name}", "id": v.id, "size": v.size,
                     "origin": v.origin, "sha256": sha, "mapped_blocks": mapped}
                    for v, _p, mapped, sha in devices],
        "activate": "activate.sh",
        "deactivate": "deactivate.sh",
    }
