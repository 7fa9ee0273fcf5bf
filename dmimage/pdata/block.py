"""Read-only block access to a metadata file or block device through one mmap.

Every block handed out is a zero-copy memoryview of the mapping; validation (checksum, blocknr)
is the caller's business because it depends on the block's type.
"""

from __future__ import annotations

import mmap
import os
import stat
from types import TracebackType

from dmimage import devlock
from dmimage.errors import DeviceError, MetadataError
from dmimage.format.constants import BLOCK_SIZE


def device_size(fd: int) -> int:
    """Size in bytes of an open regular file or block device."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise DeviceError("not a regular file or block device")


class BlockReader:
    """A metadata device opened read-only; blocks are 4 KiB and numbered from 0.

    ``window`` = (byte offset, length) maps only that part of the file (offset page-aligned):
    metadata held inside a larger file, such as an LVM pool's ``_tmeta`` within a PV.

    Holds a shared lock on the device (``dmimage.devlock``) from before the superblock is
    read until :meth:`close`, so no writer commits underneath it.
    """

    def __init__(self, path: str | os.PathLike[str], *, fd: int | None = None,
                 window: tuple[int, int] | None = None):
        """``fd``: map this already open descriptor of ``path`` (left open) instead of
        opening the path again."""
        self.path = os.fspath(path)
        own_fd = fd is None
        if fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except IsADirectoryError:
                raise DeviceError(f"{self.path}: is a directory") from None
            except OSError as exc:
                raise DeviceError(f"{self.path}: {exc.strerror}") from None
        self._lock: devlock.Lock | None = None
        try:
            self._lock = devlock.acquire(self.path, exclusive=False)
            try:
                size = device_size(fd)
            except DeviceError as exc:
                raise DeviceError(f"{self.path}: {exc}") from None
            offset = 0
            if window is not None:
                offset, length = window
                if offset % mmap.ALLOCATIONGRANULARITY or offset + length > size:
                    raise DeviceError(f"{self.path}: window {offset}+{length} is unaligned or "
                                      f"past the end ({size} bytes)")
                size = length
            self.size = size
            self.nr_blocks = size // BLOCK_SIZE
            if self.nr_blocks == 0:
                raise MetadataError(
                    f"{self.path}: too small to hold metadata ({size} bytes; a superblock "
                    f"needs {BLOCK_SIZE})",
                    block=0,
                    field="superblock",
                )
            self._mmap = mmap.mmap(fd, self.nr_blocks * BLOCK_SIZE, prot=mmap.PROT_READ,
                                   offset=offset)
        except BaseException:
            if own_fd:
                os.close(fd)
            if self._lock is not None:
                self._lock.release()
            raise
        if own_fd:
            os.close(fd)
        self._view = memoryview(self._mmap)

    def block(self, blocknr: int) -> memoryview:
        """The 4 KiB block ``blocknr``; MetadataError when it lies beyond the device."""
        if not 0 <= blocknr < self.nr_blocks:
            raise MetadataError(
                f"block number out of range (the device has {self.nr_blocks} blocks)",
                block=blocknr,
            )
        start = blocknr * BLOCK_SIZE
        return self._view[start : start + BLOCK_SIZE]

    def drop_pages(self, first: int = 0, last: int | None = None) -> None:
        """Let go of the mapped pages read so far (they stay in the page cache): a walk
        over a metadata device of any size then keeps only what it reads next resident.
        ``first``..``last`` (block numbers): only those blocks' pages; the kernel walks
        the page tables of the whole range, which for a big device costs more than
        reading a small batch of blocks."""
        if hasattr(mmap, "MADV_DONTNEED") and not self._mmap.closed:
            if last is None:
                self._mmap.madvise(mmap.MADV_DONTNEED)
            else:
                start = max(first, 0) * BLOCK_SIZE
                end = min(last + 1, self.nr_blocks) * BLOCK_SIZE
                if end > start:
                    self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def buffer(self) -> memoryview:
        """The whole device as one read-only buffer (for numpy views over many blocks)."""
        return self._view

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
        view, self._view = self._view, memoryview(b"")
        try:
            view.release()
            self._mmap.close()
        except BufferError:
            # A numpy view still references the map; it is unmapped when the last view dies.
            pass

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
