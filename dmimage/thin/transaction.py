"""Offline edits of a thin pool with the kernel's semantics: `WritablePool`.

The operations are the pool messages (create_thin, create_snap, delete, set_transaction_id,
reserve/release_metadata_snap) plus writes and discards through a thin device. Nothing reaches
the metadata device before :meth:`WritablePool.commit`, which follows the kernel's order:
every changed node and both space maps are written to blocks unused by the committed state,
flushed, and only then is the superblock (block 0) written and flushed again. A crash at any
point leaves either the old or the new pool.

Allocation policy (docs/allocation.md): metadata and data blocks are handed out first-fit from
a cursor that only moves forward within a transaction (wrapping once), skipping every block in
use at the last commit, as the kernel's space maps do.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType

import numpy as np

from dmimage import devlock
from dmimage.errors import DeviceError, DmimageError, MetadataError, UsageError
from dmimage.format.constants import (
    BLOCK_SIZE,
    DEVICE_DETAILS_SIZE,
    MAPPING_VALUE_SIZE,
    MAX_DEV_ID,
    NEEDS_CHECK_FLAG,
    SECTOR_SIZE,
)
from dmimage.format.superblock import ZERO_SPACE_MAP_ROOT, SpaceMapRoot
from dmimage.format.values import DeviceDetails, pack_mapping, pack_mappings, unpack_mapping
from dmimage.ordered_write import pwrite_all
from dmimage.pdata.block import BlockReader
from dmimage.pdata.cow import SpaceAccount, Transaction, TreeKind, Value
from dmimage.pdata.sm_update import (
    DATA_INDEX,
    REF_COUNT,
    update_data_space_map,
    update_metadata_space_map,
)
from dmimage.pdata.spacemap import SpaceMap
from dmimage.pdata.writer import (
    MetadataImage,
    write_data_space_map,
    write_metadata_space_map,
)
from dmimage.thin.pool import Pool, open_pool, read_pool
from dmimage.thin.superblock import Superblock, read_superblock

#: A device's details record, as the transaction edits it (format/values.py packs it).
Details = DeviceDetails


class PoolStateError(DmimageError):
    """An operation the kernel would refuse in the pool's current state (exists, missing...)."""

    exit_code = 1


def _data_block(v: Value) -> int:
    return unpack_mapping(int(v))[0]


def _data_inc(tx: Transaction, v: Value) -> None:
    tx.data.inc(_data_block(v))


def _data_dec(tx: Transaction, v: Value) -> None:
    tx.data.dec(_data_block(v))


BOTTOM = TreeKind("mapping", MAPPING_VALUE_SIZE, True, _data_inc, _data_dec)
TOP = TreeKind("top-level mapping", MAPPING_VALUE_SIZE, True,
               lambda tx, v: tx.meta.inc(int(v)),
               lambda tx, v: tx.dec_tree(int(v), BOTTOM))
DETAILS = TreeKind("device details", DEVICE_DETAILS_SIZE, False)


class _TxImage(MetadataImage):
    """A MetadataImage whose allocator is the transaction's (never reuses committed blocks)."""

    def __init__(self, account: SpaceAccount):
        super().__init__(account.nr_blocks)
        self.counts = account.counts
        self._allocated = account.counts > 0
        self._account = account

    def _alloc_locs(self, k: int) -> np.ndarray:
        locs = np.array([self._account.alloc() for _ in range(k)], dtype=np.int64)
        self._allocated[locs] = True
        return locs

    def _alloc_one(self) -> int:
        return int(self._alloc_locs(1)[0])


BlockWrite = Callable[[int, bytes], None]

#: Bytes of an input file mapped per step of :meth:`WritablePool.write_file`.
FILE_STEP = 64 << 20
#: Alignment of an ``O_DIRECT`` write's memory, offset and length (a page: enough for any
#: logical block size up to 4 KiB).
DIRECT_ALIGN = 4096


def _open_direct(path: str | os.PathLike[str]) -> int | None:
    """``path`` opened for ``O_DIRECT`` writes, or None where that is refused (tmpfs)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
    except (OSError, AttributeError):
        return None


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, n: int) -> None:
    """``n`` bytes file to file in the kernel (``copy_file_range``), or by read and write
    where the kernel cannot (a pipe, an old kernel, some filesystem pairs)."""
    done = 0
    try:
        while done < n:
            got = os.copy_file_range(src, dst, n - done, src_off + done, dst_off + done)
            if got == 0:
                raise DeviceError(f"input ended {n - done} bytes early")
            done += got
        return
    except OSError:
        pass  # fall back for what is left
    while done < n:
        try:
            buf = os.pread(src, min(n - done, 16 << 20), src_off + done)
        except OSError as exc:
            raise DeviceError(f"read of the input failed: {exc.strerror}") from None
        if not buf:
            raise DeviceError(f"input ended {n - done} bytes early")
        pwrite_all(dst, [memoryview(buf)], dst_off + done)
        done += len(buf)


class WritablePool:
    """A pool opened for offline changes. Use as a context manager; call :meth:`commit`.

    Holds exclusive locks on the metadata and data devices (``dmimage.devlock``) from before
    the superblock is read until :meth:`close`: concurrent writers queue, none loses an update.
    """

    def __init__(self, metadata: str | os.PathLike[str],
                 data: str | os.PathLike[str] | None = None, *,
                 fd: int | None = None, reader: BlockReader | None = None,
                 data_offset: int = 0, scratch: bool = False, direct: bool = False):
        """``fd`` (opened read-write) and ``reader`` reuse what the caller already opened of
        ``metadata``; both are left open. ``data_offset``: the byte of ``data`` where the data
        device starts (a partition inside a disk image that a build writes directly).
        ``scratch``: ``metadata`` is a work file the caller copies elsewhere once the data is
        flushed (a build's image): commits write in the same order but flush nothing.
        ``direct``: whole blocks written into new data blocks from page-aligned memory go
        through a second descriptor opened with ``O_DIRECT`` (a build writes gigabytes that
        would otherwise be copied into the page cache, then flushed; where the file system
        refuses ``O_DIRECT``, or a write is not aligned, they go the ordinary way)."""
        self.path = os.fspath(metadata)
        self._fd = -1
        self._own_fd = fd is None
        self._shared_reader = reader
        self._locks = devlock.acquire_all([(metadata, True), (data, True)])
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC) if fd is None else fd
        except OSError as exc:
            self._locks.release()
            raise DeviceError(f"{self.path}: {exc.strerror}") from None
        self._data_fd: int | None = None
        self._direct_fd: int | None = None
        self._data_base = data_offset
        self._scratch = scratch
        self._pool: Pool | None = None
        try:
            if data is not None:
                try:
                    self._data_fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
                except OSError as exc:
                    raise DeviceError(f"{os.fspath(data)}: {exc.strerror}") from None
                if direct:
                    self._direct_fd = _open_direct(data)
            self._load()
        except BaseException:
            self.close()
            raise

    # -- state ---------------------------------------------------------------------------
    def _load(self) -> None:
        if self._pool is not None and self._shared_reader is None:
            self._pool.close()
        self._pool = pool = (open_pool(self.path) if self._shared_reader is None
                             else read_pool(self._shared_reader))
        sb = pool.superblock
        if sb.incompat_flags or sb.compat_ro_flags:
            raise MetadataError("feature flags set that the kernel cannot write with",
                                block=0, field="incompat_flags/compat_ro_flags")
        self.sb: Superblock = sb
        self.reader: BlockReader = pool.reader
        self._meta_sm: SpaceMap = pool.metadata_space_map()
        self._data_sm: SpaceMap = pool.data_space_map()
        meta_counts = np.zeros(min(self.reader.nr_blocks, sb.metadata_sm.nr_blocks), np.uint32)
        meta_counts[:] = self._meta_sm.counts[: len(meta_counts)]
        self.tx = Transaction(self.reader, SpaceAccount(meta_counts, "metadata space map"),
                              SpaceAccount(self._data_sm.counts, "data space map"))
        self.time = sb.time
        self.trans_id = sb.trans_id
        self.flags = sb.flags
        self.held_root = sb.held_root
        self.mapping_root = sb.data_mapping_root
        self.details_root = sb.device_details_root
        self.details: dict[int, Details] = {
            d: Details(v.mapped_blocks, v.transaction_id, v.creation_time, v.snapshotted_time)
            for d, v in pool.devices().items()}
        pool.mapping_roots()  # validates that the two trees agree
        self._changed_details: set[int] = set()
        #: New contents of data blocks the committed pool maps, written at commit.
        #: Only the byte ranges written, in order: a small write into a big block neither reads
        #: nor holds the rest of it.
        self._pending: dict[int, list[tuple[int, bytes]]] = {}
        #: A snapshot reserved in this transaction: (block, its bytes, mapping root, details root).
        self._new_held: tuple[int, bytes, int, int] | None = None
        self._dirty = False
        self._zeros = memoryview(b"")

    @property
    def data_block_size(self) -> int:
        return self.sb.data_block_size

    @property
    def block_bytes(self) -> int:
        return self.sb.data_block_size * SECTOR_SIZE

    @property
    def nr_data_blocks(self) -> int:
        return self.tx.data.nr_blocks

    def _dev(self, dev: int) -> Details:
        if dev not in self.details:
            raise PoolStateError(f"thin device {dev} does not exist")
        return self.details[dev]

    def _touch(self, dev: int) -> None:
        self._changed_details.add(dev)
        self._dirty = True

    # -- pool messages -------------------------------------------------------------------
    def create_thin(self, dev: int) -> None:
        self._check_new_id(dev)
        root = self.tx.new_tree(BOTTOM)
        self.mapping_root, _ = self.tx.insert(self.mapping_root, dev, root, TOP)
        self.details[dev] = Details(0, self.trans_id, self.time, self.time)
        self._touch(dev)

    def create_snap(self, dev: int, origin: int) -> None:
        self._check_new_id(dev)
        o = self._dev(origin)
        root = self.tx.lookup(self.mapping_root, origin, TOP)
        if root is None:
            raise MetadataError(f"device {origin} has details but no mapping tree")
        self.tx.meta.inc(int(root))
        self.mapping_root, _ = self.tx.insert(self.mapping_root, dev, root, TOP)
        self.time += 1
        self.details[dev] = Details(o.mapped_blocks, self.trans_id, self.time, self.time)
        o.snapshotted_time = self.time
        self._touch(dev)
        self._touch(origin)

    def delete(self, dev: int) -> None:
        self._dev(dev)
        self.mapping_root, root = self.tx.remove(self.mapping_root, dev, TOP)
        if root is not None:
            self.tx.dec_tree(int(root), BOTTOM)
        del self.details[dev]
        self._touch(dev)

    def set_transaction_id(self, old: int, new: int) -> None:
        if old != self.trans_id:
            raise PoolStateError(f"transaction id is {self.trans_id}, not {old}")
        self.trans_id = new
        self._dirty = True

    def reserve_metadata_snap(self) -> int:
        """Freeze the current (committed) trees for readers; returns the copy's block."""
        if self.held_root:
            raise PoolStateError("a metadata snapshot is already held")
        self.commit()
        loc = self.tx.meta.alloc()
        self.tx.meta.inc(self.mapping_root)
        self.tx.meta.inc(self.details_root)
        self.held_root = loc
        self._new_held = (loc, self._superblock_bytes(loc, snapshot=True), self.mapping_root,
                          self.details_root)
        self._dirty = True
        return loc

    def release_metadata_snap(self) -> None:
        if not self.held_root:
            raise PoolStateError("no metadata snapshot is held")
        if self._new_held and self._new_held[0] == self.held_root:
            _, _, held_map, held_det = self._new_held
            self._new_held = None
        else:
            held = read_superblock(self.reader, self.held_root)
            held_map, held_det = held.data_mapping_root, held.device_details_root
        self.tx.dec_tree(held_map, TOP)
        self.tx.dec_tree(held_det, DETAILS)
        self.tx.meta.dec(self.held_root)
        self.held_root = 0
        self._dirty = True

    def message(self, text: str) -> None:
        """Apply one `dmsetup message` string meant for a thin-pool target."""
        words = text.split()
        if not words:
            raise UsageError("empty message")
        op, args = words[0], words[1:]
        table: dict[str, tuple[int, Callable[..., object]]] = {
            "create_thin": (1, self.create_thin),
            "create_snap": (2, self.create_snap),
            "delete": (1, self.delete),
            "set_transaction_id": (2, self.set_transaction_id),
            "reserve_metadata_snap": (0, self.reserve_metadata_snap),
            "release_metadata_snap": (0, self.release_metadata_snap),
        }
        if op not in table:
            raise UsageError(f"unknown pool message {op!r} (known: {', '.join(table)})")
        nargs, fn = table[op]
        if len(args) != nargs:
            raise UsageError(f"{op} takes {nargs} argument(s), got {len(args)}")
        try:
            ints = [int(a, 0) for a in args]
        except ValueError:
            raise UsageError(f"{op}: arguments must be integers: {' '.join(args)}") from None
        fn(*ints)

    def _check_new_id(self, dev: int) -> None:
        if not 0 <= dev <= MAX_DEV_ID:
            raise UsageError(f"thin id {dev} outside 0..{MAX_DEV_ID}")
        if dev in self.details:
            raise PoolStateError(f"thin device {dev} already exists")

    # -- data path -----------------------------------------------------------------------
    def _dev_root(self, dev: int) -> int:
        self._dev(dev)
        root = self.tx.lookup(self.mapping_root, dev, TOP)
        assert root is not None
        return int(root)

    def _set_root(self, dev: int, root: int) -> None:
        self.mapping_root, _ = self.tx.insert(self.mapping_root, dev, root, TOP)

    def _root_for_write(self, dev: int) -> int:
        """The device's bottom root, after shadowing the top-level path to it.

        The kernel shadows top-down: a top-level node shared with a metadata snapshot must be
        copied first, so that the bottom root it references is seen as shared (count > 1) and
        its own copy takes references on everything below.
        """
        root = self._dev_root(dev)
        self._set_root(dev, root)
        return root

    def lookup(self, dev: int, vblock: int) -> tuple[int, int] | None:
        """(data block, time) of a virtual block, or None if unmapped."""
        v = self.tx.lookup(self._dev_root(dev), vblock, BOTTOM)
        if v is None:
            return None
        return unpack_mapping(int(v))

    def _need_data(self) -> int:
        if self._data_fd is None:
            raise UsageError("this operation needs the pool's data device")
        return self._data_fd

    def _read_data_block(self, block: int) -> bytes:
        """A data block as this transaction sees it (its pending writes applied)."""
        fd = self._need_data()
        bs = self.block_bytes
        buf = os.pread(fd, bs, self._data_base + block * bs)
        if len(buf) != bs:
            raise DeviceError(f"data device too short for data block {block}")
        pending = self._pending.get(block)
        if pending:
            out = bytearray(buf)
            for off, piece in pending:
                out[off : off + len(piece)] = piece
            return bytes(out)
        return buf

    def _write_data(self, block: int, offset: int, buf: bytes | memoryview) -> None:
        """Blocks unused at the last commit are written at once (nobody can see them); a block
        the committed pool maps is changed in memory and written by :meth:`commit`, so an
        abandoned transaction leaves both devices' visible contents as they were."""
        if self.tx.data.committed_used[block]:
            self._need_data()
            pending = self._pending.setdefault(block, [])
            if offset == 0 and len(buf) == self.block_bytes:
                pending.clear()  # the whole block: earlier pieces are overwritten
            pending.append((offset, bytes(buf)))
            return
        fd = self._need_data()
        pwrite_all(fd, [memoryview(buf).cast("B")],
                   self._data_base + block * self.block_bytes + offset)

    def _write_new_block(self, block: int, within: int, chunk: bytes) -> None:
        """A new (zero-filled) block holding ``chunk`` at ``within``, in one pwritev."""
        bs = self.block_bytes
        if len(self._zeros) < bs:
            self._zeros = memoryview(bytes(bs))
        fd = self._need_data()
        z = self._zeros
        pwrite_all(fd, [z[:within], memoryview(chunk), z[: bs - within - len(chunk)]],
                   self._data_base + block * bs)

    def _is_shared(self, dev: int, time: int) -> bool:
        """The kernel's rule (`__snapshotted_since`): a mapping older than the device's last
        snapshot may be shared. Reference counts are not consulted: a leaf copied because a
        metadata snapshot holds it raises data counts without making the block shared."""
        return time < self.details[dev].snapshotted_time

    def write(self, dev: int, offset: int, data: bytes | memoryview) -> None:
        """Write bytes through thin device ``dev`` at byte ``offset``, as the kernel would:
        provision (zero-filled) blocks, break sharing by copying, overwrite private blocks.
        The whole blocks of a write go through :meth:`_write_whole_blocks` in bulk."""
        if offset < 0:
            raise UsageError("offset must not be negative")
        bs = self.block_bytes
        view = memoryview(data).cast("B")
        end = offset + len(view)
        head_end = min(end, -(-offset // bs) * bs)
        tail_start = max(head_end, end // bs * bs)
        root = self._root_for_write(dev)
        if head_end > offset:
            root = self._write_partial(dev, root, offset, view[: head_end - offset])
        if tail_start > head_end:
            root = self._write_whole_blocks(dev, root, head_end // bs,
                                            view[head_end - offset : tail_start - offset])
        if end > tail_start:
            root = self._write_partial(dev, root, tail_start, view[tail_start - offset :])
        self._set_root(dev, root)
        self._touch(dev)

    def _write_partial(self, dev: int, root: int, offset: int, data: memoryview) -> int:
        """Block by block (used for the partial blocks at either end of a write)."""
        bs = self.block_bytes
        d = self.details[dev]
        pos = 0
        while pos < len(data):
            vblock, within = divmod(offset + pos, bs)
            n = min(bs - within, len(data) - pos)
            chunk = bytes(data[pos : pos + n])
            found = self.tx.lookup(root, vblock, BOTTOM)
            if found is not None:
                old_block, old_time = unpack_mapping(int(found))
                if not self._is_shared(dev, old_time):
                    self._write_data(old_block, within, chunk)
                    pos += n
                    continue
                base = self._read_data_block(old_block)
                new = self.tx.data.alloc()
                self._write_data(new, 0, base[:within] + chunk + base[within + n :])
            else:
                new = self.tx.data.alloc()
                self._write_new_block(new, within, chunk)
            root, old = self.tx.insert(root, vblock, pack_mapping(new, self.time), BOTTOM)
            if old is None:
                d.mapped_blocks += 1
            else:
                self.tx.data.dec(_data_block(old))
            pos += n
        return root

    def _write_whole_blocks(self, dev: int, root: int, vfirst: int, data: memoryview) -> int:
        """Whole blocks from ``vfirst`` on, from memory (see :meth:`_map_whole_blocks`)."""
        bs = self.block_bytes
        fd = self._need_data()

        def put(i: int, k: int, dst: int) -> None:
            piece = data[i * bs : (i + k) * bs]
            done = self._write_direct(piece, dst)
            if done < len(piece):
                pwrite_all(fd, [piece[done:]], dst + done)

        return self._map_whole_blocks(dev, root, vfirst, len(data) // bs,
                                      lambda i: data[i * bs : (i + 1) * bs], put)

    def _write_direct(self, piece: memoryview, dst: int) -> int:
        """Write ``piece`` at ``dst`` through the ``O_DIRECT`` descriptor if there is one and
        the piece is aligned for it; return the bytes written (0: none, write it buffered).
        The first refusal (EINVAL) closes the descriptor: every later write goes buffered."""
        fd = self._direct_fd
        if (fd is None or dst % DIRECT_ALIGN or len(piece) % DIRECT_ALIGN
                or np.frombuffer(piece, np.uint8).ctypes.data % DIRECT_ALIGN):
            return 0
        try:
            return os.pwritev(fd, [piece], dst)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise DeviceError(f"write at byte {dst} failed: {exc.strerror}") from None
            self._direct_fd = None
            os.close(fd)
            return 0

    def write_file(self, dev: int, offset: int, src_fd: int, src_offset: int, length: int,
                   progress: Callable[[int], None] | None = None) -> None:
        """Write ``length`` bytes of the file ``src_fd`` (from ``src_offset``) through thin
        device ``dev`` at ``offset``, as :meth:`write` would; whole blocks that go to new data
        blocks are copied file to file by the kernel (``copy_file_range``), never through
        Python. ``progress(n)`` after every n bytes."""
        if offset < 0:
            raise UsageError("offset must not be negative")
        bs = self.block_bytes
        end = offset + length
        head_end = min(end, -(-offset // bs) * bs)
        tail_start = max(head_end, end // bs * bs)
        data_fd = self._need_data()

        def pread(pos: int, n: int) -> bytes:
            try:
                buf = os.pread(src_fd, n, src_offset + pos - offset)
            except OSError as exc:
                raise DeviceError(f"read of the input failed: {exc.strerror}") from None
            if len(buf) != n:
                raise DeviceError(f"input ended {n - len(buf)} bytes early")
            return buf

        root = self._root_for_write(dev)
        if head_end > offset:
            root = self._write_partial(dev, root, offset, memoryview(pread(offset, head_end
                                                                             - offset)))
            if progress:
                progress(head_end - offset)
        step = max(1, FILE_STEP // bs)
        for v in range(head_end // bs, tail_start // bs, step):
            k = min(step, tail_start // bs - v)
            base = v * bs

            def get(i: int, base: int = base) -> bytes:
                return pread(base + i * bs, bs)

            def put(i: int, n: int, dst: int, base: int = base) -> None:
                _copy_range(src_fd, src_offset + base + i * bs - offset, data_fd, dst, n * bs)

            root = self._map_whole_blocks(dev, root, v, k, get, put)
            if progress:
                progress(k * bs)
        if end > tail_start:
            root = self._write_partial(dev, root, tail_start,
                                       memoryview(pread(tail_start, end - tail_start)))
            if progress:
                progress(end - tail_start)
        self._set_root(dev, root)
        self._touch(dev)

    def _map_whole_blocks(self, dev: int, root: int, vfirst: int, n: int,
                          get: Callable[[int], bytes | memoryview],
                          put: Callable[[int, int, int], None]) -> int:
        """``n`` whole blocks from ``vfirst`` on: private mapped blocks are overwritten in
        place (``get(i)``: the bytes of block i of the range); every other block gets a new
        data block (no old content to keep), allocated, written in runs (``put(i, k, byte
        offset)``: blocks i..i+k of the range, one call per run of consecutive data blocks)
        and mapped with one bulk insert. The byte offset is the data file's (``data_offset``
        included)."""
        bs = self.block_bytes
        d = self.details[dev]
        keys, vals = self.tx.range_items(root, vfirst, vfirst + n, BOTTOM)
        private: set[int] = set()
        for k, v in zip(keys, vals, strict=True):
            block, time = unpack_mapping(int(v))
            if not self._is_shared(dev, time):
                private.add(k)
                self._write_data(block, 0, get(k - vfirst))
        vblocks = np.arange(vfirst, vfirst + n, dtype=np.int64)
        if private:
            vblocks = vblocks[~np.isin(vblocks, np.fromiter(private, np.int64, len(private)))]
        if not len(vblocks):
            return root
        blocks = self.tx.data.alloc_many(len(vblocks))
        # runs where both the virtual and the data blocks are consecutive
        brk = np.flatnonzero((np.diff(blocks) != 1) | (np.diff(vblocks) != 1)) + 1
        for a, z in zip([0, *brk.tolist()], [*brk.tolist(), len(blocks)], strict=True):
            put(int(vblocks[a]) - vfirst, z - a, self._data_base + int(blocks[a]) * bs)
        values = pack_mappings(blocks.astype(np.uint64),
                               np.full(len(blocks), self.time, np.uint64))
        root, replaced = self.tx.insert_many(root, vblocks.tolist(), values.tolist(), BOTTOM)
        d.mapped_blocks += len(vblocks) - len(replaced)
        for old in replaced:
            self.tx.data.dec(_data_block(old))
        return root

    def discard(self, dev: int, offset: int, length: int) -> int:
        """Unmap every block wholly inside [offset, offset+length); return how many."""
        bs = self.block_bytes
        first = -(-offset // bs)
        end = (offset + length) // bs
        root = self._root_for_write(dev)
        d = self.details[dev]
        count = 0
        for vblock in self._mapped_in(root, first, end):
            root, old = self.tx.remove(root, vblock, BOTTOM)
            if old is not None:
                self.tx.data.dec(_data_block(old))
                d.mapped_blocks -= 1
                count += 1
        self._set_root(dev, root)
        self._touch(dev)
        return count

    def _mapped_in(self, root: int, first: int, end: int) -> list[int]:
        """Mapped virtual blocks in [first, end): only the nodes over that range are read."""
        if end <= first:
            return []
        return self.tx.range_items(root, first, end, BOTTOM)[0]

    def read(self, dev: int, offset: int, length: int) -> bytes:
        """Bytes of thin device ``dev`` as the kernel would return them (zeros if unmapped)."""
        bs = self.block_bytes
        out = bytearray(length)
        root = self._dev_root(dev)
        pos = 0
        while pos < length:
            vblock, within = divmod(offset + pos, bs)
            n = min(bs - within, length - pos)
            found = self.tx.lookup(root, vblock, BOTTOM)
            if found is not None:
                blk = self._read_data_block(_data_block(found))
                out[pos : pos + n] = blk[within : within + n]
            pos += n
        return bytes(out)

    def mappings(self, dev: int) -> dict[int, tuple[int, int]]:
        return {k: unpack_mapping(int(v)) for k, v in self.tx.items(self._dev_root(dev), BOTTOM)}

    # -- commit --------------------------------------------------------------------------
    def _superblock_bytes(self, location: int, *, snapshot: bool = False,
                          data_root: SpaceMapRoot | None = None,
                          meta_root: SpaceMapRoot | None = None) -> bytes:
        """The committed superblock with the fields a kernel commit sets (the rest, uuid and
        block sizes included, is kept). A metadata-snapshot copy holds no space-map roots and
        no held_root (thin-format.md §2.5)."""
        return replace(
            self.sb,
            flags=self.flags,
            blocknr=location,
            time=self.time,
            trans_id=self.trans_id,
            held_root=0 if snapshot else self.held_root,
            data_sm=ZERO_SPACE_MAP_ROOT if snapshot or data_root is None else data_root,
            metadata_sm=ZERO_SPACE_MAP_ROOT if snapshot or meta_root is None else meta_root,
            data_mapping_root=self.mapping_root,
            device_details_root=self.details_root,
        ).pack()

    def _retire_space_maps(self) -> None:
        """Drop the committed space maps' own blocks: the commit writes them afresh."""
        tx = self.tx
        meta = self._meta_sm
        assert meta.index_block is not None
        tx.meta.dec(meta.index_block)
        for b in meta.index["blocknr"].tolist():
            tx.meta.dec(b)
        tx.dec_tree(meta.root.ref_count_root, REF_COUNT)
        data = self._data_sm
        for b in data.index["blocknr"].tolist():
            tx.meta.dec(b)
        tx.dec_tree(data.root.bitmap_root, DATA_INDEX)
        tx.dec_tree(data.root.ref_count_root, REF_COUNT)

    def _incremental_space_maps(self) -> bool:
        """Whether both maps keep their committed size (the usual case: they are updated in
        place); otherwise they are written whole at the new size."""
        return (len(self.tx.meta.counts) == self._meta_sm.root.nr_blocks
                and len(self.tx.data.counts) == self._data_sm.root.nr_blocks)

    def _update_space_maps(self) -> tuple[SpaceMapRoot, SpaceMapRoot, list[tuple[int, bytes]]]:
        """Both maps changed where their counts changed (pdata/sm_update.py); every block to
        write. The metadata map goes last: it must count every block the others allocate."""
        tx = self.tx
        data_root, blocks = update_data_space_map(tx, self._data_sm.root, self._data_sm.index,
                                                  self._data_sm.counts)
        meta_root, meta_blocks = update_metadata_space_map(
            tx, self._meta_sm.root, self._meta_sm.index, self._meta_sm.counts)
        blocks += meta_blocks
        blocks += [(b, bytes(buf)) for b, buf in tx.encoded_dirty()]
        return data_root, meta_root, blocks

    def _rewrite_space_maps(self) -> tuple[SpaceMapRoot, SpaceMapRoot, list[tuple[int, bytes]]]:
        """Both maps written whole, at the metadata device's current size."""
        tx = self.tx
        self._retire_space_maps()
        image = _TxImage(tx.meta)
        data_counts = tx.data.counts
        nz = np.flatnonzero(data_counts)
        data_root = write_data_space_map(image, tx.data.nr_blocks, nz.astype(np.uint64),
                                         data_counts[nz].astype(np.int64))
        # Node blocks must be known to the image before the metadata map is laid out.
        blocks: list[tuple[int, bytes]] = [(b, bytes(buf)) for b, buf in tx.encoded_dirty()]
        meta_root = write_metadata_space_map(image)
        for start, seg in image.segments():
            for i in range(len(seg)):
                blocks.append((start + i, seg[i].tobytes()))
        return data_root, meta_root, blocks

    def commit(self, write_block: BlockWrite | None = None,
               flush: Callable[[], None] | None = None) -> bool:
        """Write the transaction crash-safely; return False if there was nothing to write.

        ``write_block``/``flush`` replace the device I/O (tests inject crashes there).
        """
        if not self._dirty:
            return False
        tx = self.tx
        for dev in sorted(self._changed_details):
            if dev in self.details:
                self.details_root, _ = tx.insert(self.details_root, dev,
                                                 self.details[dev].pack(), DETAILS)
            else:
                self.details_root, _ = tx.remove(self.details_root, dev, DETAILS)
        if self._incremental_space_maps():
            data_root, meta_root, blocks = self._update_space_maps()
        else:
            data_root, meta_root, blocks = self._rewrite_space_maps()
        if self._new_held is not None:
            blocks.append(self._new_held[:2])
        sb = self._superblock_bytes(0, data_root=data_root, meta_root=meta_root)
        write_block = write_block or self._pwrite_block
        flush = flush or self._fsync
        if self._pending:
            fd = self._need_data()
            bs = self.block_bytes
            for b, pieces in sorted(self._pending.items()):
                for off, piece in pieces:
                    pwrite_all(fd, [memoryview(piece)], self._data_base + b * bs + off)
        if self._data_fd is not None and not self._scratch:
            os.fsync(self._data_fd)
        for b, buf in sorted(blocks):
            if b == 0:
                raise AssertionError("block 0 allocated to something other than the superblock")
            write_block(b, buf)
        flush()
        write_block(0, sb)
        flush()
        self._load()
        return True

    def _pwrite_block(self, b: int, buf: bytes) -> None:
        try:
            if os.pwrite(self._fd, buf, b * BLOCK_SIZE) != len(buf):
                raise DeviceError(f"{self.path}: short write at block {b}")
        except OSError as exc:
            raise DeviceError(f"{self.path}: write of block {b} failed: {exc.strerror}") from None

    def _fsync(self) -> None:
        if self._scratch:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise DeviceError(f"{self.path}: fsync failed: {exc.strerror}") from None

    def set_needs_check(self, value: bool) -> None:
        self.flags = (self.flags | NEEDS_CHECK_FLAG) if value else (self.flags & ~NEEDS_CHECK_FLAG)
        self._dirty = True

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Close without committing: the metadata device keeps its committed state."""
        if self._pool is not None:
            if self._shared_reader is None:
                self._pool.close()
            self._pool = None
        for fd in (self._fd if self._own_fd else None, self._data_fd, self._direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd = -1
        self._data_fd = self._direct_fd = None
        self._locks.release()

    def __enter__(self) -> WritablePool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_writable(metadata: str | os.PathLike[str],
                  data: str | os.PathLike[str] | None = None, *,
                  data_offset: int = 0, scratch: bool = False,
                  direct: bool = False) -> WritablePool:
    """Open a pool for offline edits (see :class:`WritablePool`)."""
    return WritablePool(metadata, data, data_offset=data_offset, scratch=scratch,
                        direct=direct)


__all__ = ["WritablePool", "open_writable", "PoolStateError", "Details", "replace",
           "SpaceMapRoot"]
