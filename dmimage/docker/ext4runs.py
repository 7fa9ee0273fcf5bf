"""Where the contents of many files of one ext4 filesystem lie, found at once: save's plan asks
for every file of a layer, and per-file parsing through dissect.extfs (a cstruct inode and
extent header per file, ~100 us) was most of a save of small files.

dissect.extfs still opens the filesystem (superblock, group descriptors) and reads the
directories' contents; the directory entries are parsed here with ``struct`` and the inodes
of all files are read in a few large reads and decoded with numpy. Only the common case is
decoded here: a regular file mapped by extents held in the inode itself (depth 0, no
inline data). Anything else (deeper extent trees, inline data, block-mapped ext2/3 files)
is answered by dissect.extfs, file by file, as before. An uninitialized extent reads as
zeros where it lies (the kernel's view)."""

from __future__ import annotations

import posixpath
import stat
import struct
from collections.abc import Sequence
from typing import Any, cast, overload

import numpy as np
from dissect.extfs.c_ext import c_ext

EXTENTS_FL = 0x00080000
INLINE_DATA_FL = 0x10000000
EXTENT_MAGIC = 0xF30A
UNINIT = 0x8000
INODE_BYTES = 0x70  # through i_size_high

# A file's content: (size, runs) with runs of (device byte offset or None for zeros, bytes)
# covering at least size bytes; or None when the name is not a file this reader decodes.
Runs = list[tuple[int | None, int]]


class Ext4Files:
    """Files below *top* of an ExtFS (dissect.extfs), by path relative to *top*."""

    def __init__(self, fs: Any, top: str) -> None:
        self.fs = fs
        sb = fs.sb
        self.bs = int(fs.block_size)
        self.ipg = int(sb.s_inodes_per_group)
        self.isz = int(sb.s_inode_size)
        self.ninodes = int(sb.s_inodes_count)
        # as dissect.extfs: a one-byte name length when the filesystem records file types
        self.dirent = struct.Struct("<IHBB" if sb.s_feature_incompat
                                    & c_ext.EXT2_FEATURE_INCOMPAT_FILETYPE else "<IHH")
        self._top = int(fs.get(top).inum)
        self._dirs: dict[bytes, dict[bytes, int] | None] = {}

    def _listing(self, d: bytes) -> dict[bytes, int] | None:
        """Name -> inode of directory *d* (b"" is the top); None if it is not a directory."""
        if d in self._dirs:
            return self._dirs[d]
        if not d:
            inum: int | None = self._top
        else:
            parent, _, base = d.rpartition(b"/")
            up = self._listing(parent)
            inum = None if up is None else up.get(base)
        listing = None
        if inum is not None:
            node = self.fs.get_inode(inum)
            if node.filetype == stat.S_IFDIR:
                listing = self._parse_dir(node.open().read())
        self._dirs[d] = listing
        return listing

    def _parse_dir(self, data: bytes) -> dict[bytes, int]:
        """The entries of a directory's contents, walked as dissect.extfs walks them (every
        record in turn, htree nodes being records of inode 0)."""
        out: dict[bytes, int] = {}
        unpack = self.dirent.unpack_from
        off = 0
        end = len(data) - 12
        while off < end:
            inum, rec_len, name_len = unpack(data, off)[:3]
            if rec_len == 0:
                break
            if 0 < inum < self.ninodes:
                out[data[off + 8:off + 8 + name_len]] = inum
            off += rec_len
        return out

    def inode_of(self, rel: bytes) -> int | None:
        parent, _, base = rel.rpartition(b"/")
        listing = self._listing(parent)
        return None if listing is None else listing.get(base)

    def _read_inodes(self, inums: list[int]) -> np.ndarray:
        """The first INODE_BYTES of each inode, one row each: the inode table blocks they
        lie in are read in runs of consecutive blocks."""
        fs = self.fs
        groups, index = np.divmod(np.array(inums, np.int64) - 1, self.ipg)
        tables = {}
        for g in np.unique(groups).tolist():
            gd = fs._read_group_desc(g)
            if fs._group_desc_struct is c_ext.ext4_group_desc:
                tables[g] = (int(gd.bg_inode_table_hi) << 32) | int(gd.bg_inode_table_lo)
            else:
                tables[g] = int(gd.bg_inode_table_lo)
        table = np.array([tables[g] for g in groups.tolist()], np.int64)
        offs = table * self.bs + index * self.isz
        blocks, where = np.unique(offs // self.bs, return_inverse=True)
        buf = np.empty(blocks.size * self.bs, np.uint8)
        breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
        starts = np.concatenate([[0], breaks]).tolist()
        ends = np.concatenate([breaks, [blocks.size]]).tolist()
        fh = fs.fh
        for a, b in zip(starts, ends, strict=True):
            fh.seek(int(blocks[a]) * self.bs)
            data = fh.read((b - a) * self.bs)
            if len(data) != (b - a) * self.bs:
                raise OSError("the filesystem ends inside an inode table")
            buf[a * self.bs:b * self.bs] = np.frombuffer(data, np.uint8)
        # inodes lie at multiples of the inode size within a block (a power of two from 128,
        # dividing it): the buffer by inode slots, one row gathered per file (an index
        # matrix of INODE_BYTES per file would be 8 MB of fresh pages at 9,000 files)
        if self.bs % self.isz or self.isz < INODE_BYTES:
            raise ValueError(f"inode size {self.isz}: not a slot of a {self.bs}-byte block")
        slot = (where.reshape(-1) * self.bs + offs % self.bs) // self.isz
        rows: np.ndarray = buf.reshape(-1, self.isz)[slot, :INODE_BYTES]
        return rows

    def contents(self, rels: list[bytes]) -> Contents:
        """Per path: (size, runs) for regular files mapped by inode-held extents; None for
        the rest (missing, not a regular file, or a layout left to dissect.extfs). The
        common file (one extent from block 0) is kept by column, with no tuple of its own."""
        n = len(rels)
        single = np.zeros(n, bool)
        size_c = np.zeros(n, np.int64)
        start_c = np.zeros(n, np.int64)
        len_c = np.zeros(n, np.int64)
        rest: dict[int, tuple[int, Runs]] = {}
        inums: list[int | None] = []
        last = None
        listing: dict[bytes, int] | None = None
        for r in rels:  # a tar names a directory's files together: its listing looked up once
            parent, _, base = r.rpartition(b"/")
            if parent != last:
                listing = self._listing(parent)
                last = parent
            inums.append(None if listing is None else listing.get(base))
        if None in inums:
            found = [k for k, i in enumerate(inums) if i is not None]
            if not found:
                return Contents(single, size_c, start_c, len_c, rest)
            rows = self._read_inodes([i for i in inums if i is not None])
            idx = np.array(found, np.int64)
        else:
            found = list(range(n))
            rows = self._read_inodes(cast(list[int], inums))
            idx = np.arange(n, dtype=np.int64)

        def u16(at: int) -> np.ndarray:
            return np.ascontiguousarray(rows[:, at:at + 2]).view("<u2").ravel()

        def u32(at: int) -> np.ndarray:
            return np.ascontiguousarray(rows[:, at:at + 4]).view("<u4").ravel()

        mode = u16(0)
        size = u32(0x04).astype(np.int64) | (u32(0x6C).astype(np.int64) << 32)
        flags = u32(0x20)
        ok = ((mode & 0o170000) == stat.S_IFREG) & ((flags & EXTENTS_FL) != 0) \
            & ((flags & INLINE_DATA_FL) == 0) & (u16(0x28) == EXTENT_MAGIC) \
            & (u16(0x2E) == 0) & (u16(0x2A) <= 4)
        bs = self.bs
        # the common file: one initialized extent from block 0 holding all of it
        len0 = u16(0x38).astype(np.int64) * bs
        one = ok & (u16(0x2A) == 1) & (u32(0x34) == 0) & (u16(0x38) <= UNINIT) \
            & (len0 >= size)
        start0 = ((u16(0x3A).astype(np.int64) << 32) | u32(0x3C)) * bs
        single[idx] = one
        size_c[idx] = size
        start_c[idx] = start0
        len_c[idx] = len0
        others = np.flatnonzero(ok & ~one).tolist()
        if not others:
            return Contents(single, size_c, start_c, len_c, rest)
        nent = u16(0x2A).tolist()
        ext = [(u32(0x34 + 12 * j).tolist(), u16(0x38 + 12 * j).tolist(),
                u16(0x3A + 12 * j).tolist(), u32(0x3C + 12 * j).tolist()) for j in range(4)]
        size_l = size.tolist()
        for row in others:
            fsize = size_l[row]
            runs: Runs = []
            at = 0  # in blocks
            for j in range(nent[row]):
                eb, el, hi, lo = (ext[j][0][row], ext[j][1][row], ext[j][2][row],
                                  ext[j][3][row])
                if eb < at:  # overlapping or unsorted: not ours to guess
                    break
                if eb > at:
                    runs.append((None, (eb - at) * bs))
                uninit = el > UNINIT
                count = el - UNINIT if uninit else el
                runs.append((None if uninit else ((hi << 32) | lo) * bs, count * bs))
                at = eb + count
            else:
                if at * bs < fsize:
                    runs.append((None, fsize - at * bs))
                rest[found[row]] = (fsize, runs)
        return Contents(single, size_c, start_c, len_c, rest)


class Contents(Sequence[tuple[int, Runs] | None]):
    """:meth:`Ext4Files.contents`' answer: per path, (size, runs) or None. Files of one
    extent from block 0 (most) are held by column: *single* marks them, with their *size*,
    the extent's device byte offset *start* and its length *length*; the other files this
    reader decoded are in *rest* by index."""

    def __init__(self, single: np.ndarray, size: np.ndarray, start: np.ndarray,
                 length: np.ndarray, rest: dict[int, tuple[int, Runs]]) -> None:
        self.single = single
        self.size = size
        self.start = start
        self.length = length
        self.rest = rest

    def __len__(self) -> int:
        return int(self.single.size)

    @overload
    def __getitem__(self, k: int) -> tuple[int, Runs] | None: ...

    @overload
    def __getitem__(self, k: slice) -> list[tuple[int, Runs] | None]: ...

    def __getitem__(self, k: int | slice
                    ) -> tuple[int, Runs] | None | list[tuple[int, Runs] | None]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        if self.single[k]:
            return int(self.size[k]), [(int(self.start[k]), int(self.length[k]))]
        return self.rest.get(k)


def rel_paths(names: list[bytes]) -> list[bytes]:
    """:func:`rel_path` of each name; *names* itself when every name is plain (the usual
    case, checked on all of them at once)."""
    sep = b"\n"
    joined = sep.join(names)
    if names and joined.count(sep) == len(names) - 1 and names[0][:1] not in (b"", b"/", b".") \
            and names[-1][-1:] not in (b"", b"/") and not any(
                bad in joined for bad in (b"//", b"/.", b"\n.", b"\n/", b"/\n", b"\n\n")):
        return names
    return [rel_path(n) for n in names]


def rel_path(name: bytes) -> bytes:
    """A tar-split name as a path below the layer's root (normpath's result, which plain
    names, with no empty, ``.`` or ``..`` component, already are once the leading slashes
    go)."""
    plain = name.lstrip(b"/")
    if plain and b"//" not in plain and b"/." not in plain and plain[0] != 46 \
            and plain[-1] != 47:  # 46: ".", 47: "/"
        return plain
    return posixpath.normpath(name).lstrip(b"/")
