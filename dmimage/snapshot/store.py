"""Read a persistent exception store (dm-snapshot's COW device) the way the kernel does.

The kernel's reading rules (format/snapshot_cow.py) decide which exceptions exist; this module
applies them to a file or block device and keeps what the kernel would keep, plus the
counters it reports in ``dmsetup status`` (sectors allocated, metadata sectors), so a test can
compare both directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

import numpy as np

from dmimage.errors import DeviceError, FormatError, MetadataError
from dmimage.format.snapshot_cow import (
    DISK_VERSION,
    EXCEPTION_DTYPE,
    HEADER,
    HEADER_CHUNKS,
    MAX_CHUNK_SECTORS,
    SECTOR_SIZE,
    SNAP_MAGIC,
    area_chunk,
    exceptions_per_area,
)


class StoreState(Enum):
    #: magic 0: never activated; the kernel would write a fresh header on first use.
    BLANK = "blank"
    VALID = "valid"
    #: valid flag 0: the snapshot overflowed or hit an I/O error; the kernel refuses it.
    INVALID = "invalid"


@dataclass(frozen=True)
class ExceptionStore:
    """The exceptions of one COW device, in the order the kernel reads them."""

    name: str
    cow_bytes: int
    state: StoreState
    version: int
    chunk_sectors: int  # 0 for a blank store (the table's chunk size would apply)
    old: np.ndarray  # uint64 origin chunk of each exception
    new: np.ndarray  # uint64 COW chunk holding its data
    #: Metadata areas read: the last one is the kernel's current (not full) area.
    areas: int
    #: Set when reading stopped at the end of the device instead of at a terminator (only
    #: for an invalidated store: a valid one reports this as damage).
    truncated: bool = False

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_sectors * SECTOR_SIZE

    @property
    def per_area(self) -> int:
        return exceptions_per_area(self.chunk_sectors)

    @property
    def nr_chunks(self) -> int:
        """Whole chunks on the COW device (the kernel ignores a partial last chunk)."""
        return self.cow_bytes // self.chunk_bytes if self.chunk_sectors else 0

    @property
    def next_free(self) -> int:
        """The kernel's next_free after reading the store: one past the highest new chunk
        (at least the chunk after the first area), moved off a metadata chunk."""
        nxt = HEADER_CHUNKS + 1
        if len(self.new):
            nxt = max(nxt, int(self.new.max()) + 1)
        if nxt % (self.per_area + 1) == HEADER_CHUNKS:
            nxt += 1
        return nxt

    @property
    def allocated_sectors(self) -> int:
        """``dmsetup status``'s first number for this snapshot."""
        return self.next_free * self.chunk_sectors

    @property
    def metadata_sectors(self) -> int:
        """``dmsetup status``'s third number: the header plus every area up to the current."""
        return (self.areas + HEADER_CHUNKS) * self.chunk_sectors


def device_bytes(fd: int, name: str) -> int:
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o170000 == 0o060000:  # block device
            return os.lseek(fd, 0, os.SEEK_END)
        return st.st_size
    except OSError as exc:
        raise DeviceError(f"{name}: {exc.strerror}") from None


def read_at(fd: int, n: int, off: int, name: str) -> bytes:
    """pread with the device named in the error."""
    try:
        buf = os.pread(fd, n, off)
    except OSError as exc:
        raise DeviceError(f"{name}: read of {n} bytes at byte {off} failed: "
                          f"{exc.strerror}") from None
    return buf


def read_store(fd: int, name: str) -> ExceptionStore:
    """Parse the store on ``fd``. Damage the kernel would refuse raises MetadataError
    (FormatError for the header) naming the chunk and field."""
    size = device_bytes(fd, name)
    head = read_at(fd, HEADER.size, 0, name)
    if len(head) < HEADER.size:
        raise FormatError(f"{name}: {size} bytes, too small for a snapshot header",
                          field="header")
    magic, valid, version, chunk = HEADER.unpack(head)
    empty = np.zeros(0, np.uint64)
    if magic == 0:
        return ExceptionStore(name, size, StoreState.BLANK, 0, 0, empty, empty, 0)
    if magic != SNAP_MAGIC:
        raise FormatError(f"magic {magic:#010x}, expected {SNAP_MAGIC:#010x}: not a persistent "
                          "snapshot store (a transient one, N, keeps nothing on disk)",
                          block=0, field="header.magic")
    if version != DISK_VERSION:
        raise FormatError(f"version {version}: the kernel reads only version {DISK_VERSION}",
                          block=0, field="header.version")
    if chunk == 0 or chunk & (chunk - 1) or chunk > MAX_CHUNK_SECTORS:
        raise FormatError(f"chunk size {chunk} sectors: must be a power of two up to "
                          f"{MAX_CHUNK_SECTORS}", block=0, field="header.chunk_size")
    state = StoreState.VALID if valid else StoreState.INVALID
    chunk_bytes = chunk * SECTOR_SIZE
    per = exceptions_per_area(chunk)
    olds: list[np.ndarray] = []
    news: list[np.ndarray] = []
    area = 0
    truncated = False
    while True:
        loc = area_chunk(area, per)
        raw = read_at(fd, chunk_bytes, loc * chunk_bytes, name)
        if len(raw) < chunk_bytes:
            if state is StoreState.INVALID:
                truncated = True
                break
            raise MetadataError(f"metadata area {area} lies past the end of the COW device "
                                f"({size} bytes); the area before it is full",
                                block=loc, field="exception area")
        ex = np.frombuffer(raw, EXCEPTION_DTYPE)
        ends = np.flatnonzero(ex["new_chunk"] == 0)
        n = int(ends[0]) if len(ends) else per
        olds.append(ex["old_chunk"][:n])
        news.append(ex["new_chunk"][:n])
        area += 1
        if n < per:
            break
    old = np.concatenate(olds) if olds else empty
    new = np.concatenate(news) if news else empty
    return ExceptionStore(name, size, state, version, chunk, old.astype(np.uint64),
                          new.astype(np.uint64), area, truncated)


def open_store(path: str) -> tuple[int, ExceptionStore]:
    """Open ``path`` read-only and parse it; the caller closes the descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"{path}: {exc.strerror}") from None
    try:
        return fd, read_store(fd, path)
    except BaseException:
        os.close(fd)
        raise
