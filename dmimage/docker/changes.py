"""A container's own changes: its read-write device against its init device (the layer below it),
compared as moby's ``pkg/archive/changes.go`` does for ``docker diff``: a path is added (A)
when only the container has it, deleted (D) when only the init layer has it (the top-most one
only), changed (C) when type, mode, uid, gid or device number differ, or, for non-directories,
size or mtime; a directory holding a change is listed as changed too. Extended attributes
(capabilities) are not compared, nor device numbers on xfs. ``changes_tar`` writes the changes
as a layer tar with ``.wh.`` whiteouts, so a container's data can be rescued and applied
elsewhere."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from dmimage.docker.errors import NameNotFound, StoreError
from dmimage.docker.fs import open_filesystem, owner_mode
from dmimage.docker.store import Store, article, resolve
from dmimage.docker.thinfile import ThinFile
from dmimage.thin.pool import Pool

ROOTFS = "/rootfs"


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # A, C or D
    path: str  # absolute in the container, e.g. /app/note.txt

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def _stat(node: Any) -> tuple[int, int, int, int, int, int, bytes]:
    """(type|mode, uid, gid, rdev, size, mtime_ns, link) of an ext4 or xfs node."""
    mode, uid, gid = owner_mode(node)
    link = node.link.encode("utf-8", "surrogateescape") if stat.S_ISLNK(mode) else b""
    rdev = 0
    if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and hasattr(node.inode, "i_block"):
        rdev = int.from_bytes(bytes(node.inode.i_block)[:8], "little")
    return (mode, uid, gid, rdev, int(node.size), int(node.mtime_ns), link)


def _children(node: Any) -> dict[str, Any]:
    return {n: c for n, c in node.listdir().items() if n not in (".", "..")}


def _walk_changes(old: Any | None, new: Any, path: str, out: list[Change]) -> None:
    """Changes below directory *new* (whose counterpart in the init layer is *old*)."""
    old_children = _children(old) if old is not None else {}
    for name, child in sorted(_children(new).items()):
        p = f"{path}/{name}"
        before = len(out)
        prev = old_children.get(name)
        st_new = _stat(child)
        is_dir = stat.S_ISDIR(st_new[0])
        if prev is None:
            out.append(Change("A", p))
        else:
            st_old = _stat(prev)
            changed = st_old[:4] != st_new[:4] or (not is_dir and st_old[4:] != st_new[4:])
            if changed:
                out.append(Change("C", p))
        if is_dir:
            own = len(out) > before
            same_type_dir = prev is not None and stat.S_ISDIR(_stat(prev)[0])
            _walk_changes(prev if same_type_dir else None, child, p, out)
            if not own and len(out) > before:
                out.insert(before, Change("C", p))  # a directory holding changes
    for name in sorted(set(old_children) - set(_children(new))):
        out.append(Change("D", f"{path}/{name}"))


def _open_fs(store: Store, pool: Pool, data_fd: int, hash_: str, what: str) -> Any:
    dev = store.device(hash_)
    if dev is None:
        raise StoreError(store.root.display("devicemapper/metadata"),
                         f"{what}: no device JSON for {hash_}")
    if dev.device_id not in pool.devices():
        raise StoreError(store.root.display(dev.source), f"{what}: device {dev.device_id} is "
                         "not in the pool")
    try:
        fs = open_filesystem(ThinFile(pool, data_fd, dev.device_id, dev.size,
                                           store.pool_files.data_offset))
        return fs.get(ROOTFS)
    except Exception as exc:  # dissect's own error types for damaged filesystems
        raise StoreError(store.root.display(dev.source), f"{what}: device {dev.device_id} "
                         f"has no readable ext4 or xfs with {ROOTFS} ({exc})") from None


def container_changes(store: Store, pool: Pool, data_fd: int, name: str
                      ) -> tuple[list[Change], Any]:
    """(changes, root node of the container's filesystem) for container *name*."""
    t = resolve(store, name)
    if t.kind != "container":
        raise NameNotFound(name, f"is {article(t.kind)}, not a container")
    m = store.mounts[t.label]
    new = _open_fs(store, pool, data_fd, m.mount_id, f"container {t.label}")
    old = _open_fs(store, pool, data_fd, m.init_id, f"container {t.label} init layer") \
        if m.init_id else None
    out: list[Change] = []
    _walk_changes(old, new, "", out)
    return out, new


def _lookup(root: Any, path: str) -> Any:
    node = root
    for part in path.strip("/").split("/"):
        node = _children(node)[part]
    return node


def _entries(changes: list[Change], root: Any) -> Iterator[tuple[tarfile.TarInfo, Any]]:
    for c in changes:
        rel = c.path.lstrip("/")
        if c.kind == "D":
            d, _, base = rel.rpartition("/")
            ti = tarfile.TarInfo(f"{d}/.wh.{base}" if d else f".wh.{base}")
            yield ti, None
            continue
        node = _lookup(root, c.path)
        mode, uid, gid, rdev, size, mtime_ns, link = _stat(node)
        ti = tarfile.TarInfo(rel)
        ti.mode = stat.S_IMODE(mode)
        ti.uid, ti.gid = uid, gid
        ti.mtime = mtime_ns // 1_000_000_000
        if stat.S_ISDIR(mode):
            ti.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            ti.type = tarfile.SYMTYPE
            ti.linkname = link.decode("utf-8", "surrogateescape")
        elif stat.S_ISREG(mode):
            ti.size = size
            yield ti, node
            continue
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            ti.type = {stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE,
                       stat.S_IFIFO: tarfile.FIFOTYPE}[stat.S_IFMT(mode)]
            ti.devmajor, ti.devminor = os.major(rdev), os.minor(rdev)
        else:
            continue  # sockets: tar has no type for them
        yield ti, None


def changes_tar(changes: list[Change], root: Any, out: BinaryIO) -> None:
    """The changes as a layer tar (whiteouts for deletions)."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, node in _entries(changes, root):
            tar.addfile(ti, node.open() if node is not None else io.BytesIO())
