"""The GPT disk layout of a built image: partition table by pyparted, deterministic GUIDs.

Layout (512-byte sectors, 1 MiB alignment): partition 1 = thin-pool metadata from 1 MiB,
partition 2 = data right after it (1 MiB aligned), 1 MiB reserved at the end for the backup
GPT. pyparted (libparted) writes the protective MBR and both GPT headers and entry arrays;
libparted gives random GUIDs, so :func:`set_guids` then rewrites the disk GUID and each
partition's unique GUID (PARTUUID) with values derived from the spec and recomputes the CRC32s
of the entry arrays and headers (UEFI spec 2.10 §5.3). :func:`read_gpt` reads them back.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

from dmimage.errors import DeviceError

SECTOR = 512
ALIGN = 1 << 20
#: "Linux filesystem data" (the type libparted gives a new partition).
LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")

_HDR = struct.Struct("<8sIIIIQQQQ16sQIII")


@dataclass(frozen=True)
class Layout:
    meta_start: int  # bytes
    meta_size: int
    data_start: int
    data_size: int
    disk_bytes: int  # smallest disk that holds both


def _up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def plan_layout(meta_size: int, data_size: int, disk_bytes: int | None = None) -> Layout:
    meta_start = ALIGN
    data_start = _up(meta_start + meta_size)
    need = _up(data_start + data_size) + ALIGN  # backup GPT: 33 sectors, kept aligned
    return Layout(meta_start, meta_size, data_start, data_size, max(need, disk_bytes or 0))


@dataclass(frozen=True)
class GptPartition:
    number: int
    name: str
    partuuid: str
    type_uuid: str
    start: int  # bytes
    size: int  # bytes


def create_gpt(path: str, layout: Layout, parts: list[tuple[str, uuid.UUID]],
               disk_guid: uuid.UUID) -> None:
    """Write a GPT with the metadata and data partitions onto the (sized) file at *path*."""
    import parted

    with open(path, "r+b") as f:
        f.truncate(layout.disk_bytes)
    dev = parted.getDevice(path)
    try:
        disk = parted.freshDisk(dev, "gpt")
        spans = [(layout.meta_start, layout.meta_size), (layout.data_start, layout.data_size)]
        for (start, size), (name, _) in zip(spans, parts, strict=True):
            geom = parted.Geometry(device=dev, start=start // SECTOR, length=size // SECTOR)
            part = parted.Partition(disk=disk, type=parted.PARTITION_NORMAL, geometry=geom)
            disk.addPartition(part, constraint=parted.Constraint(exactGeom=geom))
            part.set_name(name)
        disk.commit()
    except parted.PartedException as exc:  # pragma: no cover - libparted refusals
        raise DeviceError(f"{path}: libparted: {exc}") from None
    set_guids(path, disk_guid, [u for _, u in parts])


def _read(fd: int, off: int, n: int) -> bytes:
    b = os.pread(fd, n, off)
    if len(b) != n:
        raise DeviceError(f"short read at byte {off}")
    return b


def _header(fd: int, lba: int) -> tuple[bytearray, tuple[Any, ...]]:
    raw = bytearray(_read(fd, lba * SECTOR, SECTOR))
    fields = _HDR.unpack_from(raw)
    if fields[0] != b"EFI PART":
        raise DeviceError(f"no GPT header at LBA {lba}")
    return raw, fields


def set_guids(path: str, disk_guid: uuid.UUID, partuuids: list[uuid.UUID]) -> None:
    """Rewrite the disk GUID and the partitions' unique GUIDs in both GPT copies."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        _, prim = _header(fd, 1)
        alt_lba = prim[6]
        for lba in (1, alt_lba):
            raw, h = _header(fd, lba)
            hsize, entries_lba, n_entries, esize = h[2], h[10], h[11], h[12]
            table = bytearray(_read(fd, entries_lba * SECTOR, n_entries * esize))
            for i, u in enumerate(partuuids):
                table[i * esize + 16: i * esize + 32] = u.bytes_le
            raw[56:72] = disk_guid.bytes_le
            struct.pack_into("<I", raw, 88, zlib.crc32(table))
            struct.pack_into("<I", raw, 16, 0)
            struct.pack_into("<I", raw, 16, zlib.crc32(bytes(raw[:hsize])))
            os.pwrite(fd, bytes(table), entries_lba * SECTOR)
            os.pwrite(fd, bytes(raw), lba * SECTOR)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_gpt(path: str) -> tuple[str, list[GptPartition]]:
    """(disk GUID, partitions) read from the primary GPT, CRCs verified."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw, h = _header(fd, 1)
        hsize, entries_lba, n_entries, esize, ecrc = h[2], h[10], h[11], h[12], h[13]
        check = bytearray(raw[:hsize])
        struct.pack_into("<I", check, 16, 0)
        if zlib.crc32(check) != h[3]:
            raise DeviceError("GPT header CRC32 mismatch")
        table = _read(fd, entries_lba * SECTOR, n_entries * esize)
        if zlib.crc32(table) != ecrc:
            raise DeviceError("GPT partition entry array CRC32 mismatch")
        parts = []
        for i in range(n_entries):
            e = table[i * esize:(i + 1) * esize]
            if e[:16] == bytes(16):
                continue
            first, last = struct.unpack_from("<QQ", e, 32)
            name = e[56:128].decode("utf-16-le").rstrip("\0")
            parts.append(GptPartition(i + 1, name, str(uuid.UUID(bytes_le=e[16:32])),
                                      str(uuid.UUID(bytes_le=e[:16])), first * SECTOR,
                                      (last - first + 1) * SECTOR))
        return str(uuid.UUID(bytes_le=bytes(raw[56:72]))), parts
    finally:
        os.close(fd)


def extract(image: str, start: int, size: int, out: str) -> None:
    """Copy bytes [start, start+size) of *image* to a new sparse file *out*."""
    from dmimage.image.sparse import copy_sparse

    fd_in = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd_out, size)
            copy_sparse(fd_in, start, fd_out, 0, size)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
