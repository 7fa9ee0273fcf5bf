"""Apply a layer tar to an ext4 image file offline, as dockerd's devicemapper driver applies it
to a snapshot of the parent's device (moby ``pkg/archive/diff.go`` ``UnpackLayer``, below the
device's ``rootfs/``): an existing path is replaced unless both are directories (then only the
metadata changes); ``.wh.NAME`` removes NAME, ``.wh..wh..opq`` empties its directory of what
earlier layers put there; missing parents are created with mode 0600; then owner, mode,
extended attributes (``SCHILY.xattr.*``) and times (as moby's system.Chtimes: outside
1970..2262 the epoch, not for a symlink), directory times last (their atime the header's,
else the epoch); a hard link's owner, attributes, mode and times go to the inode it shares
with its target (mode and times not when that target is a symlink), as ``createTarFile``
does through the new name, and its lchown drops the inode's ``security.capability`` (the
kernel's killpriv) before the header's attributes are set. Before each layer, ``rootfs/``
is set back to 0755 and root if a parent layer's ``./`` changed it, as the driver's Get
does at every mount. The members are read as Go's archive/tar reads them
(``tarsplit.disassemble`` through ``gotar``): a global PAX header only removes an existing
path of its name, and a GNU header's atime counts.

Why debugfs: a snapshot keeps every unchanged block of its parent only if the layer is
applied to the parent's filesystem in place, as the kernel would; ``mke2fs -d`` makes a new
filesystem per layer instead (nothing shared), and fakeroot cannot give it device nodes,
foreign owners or security.* attributes. ``debugfs -w`` edits the image without root or a
mount: mkdir/write/symlink/mknod/ln/rm/rmdir, ``sif`` for owner, mode, times and link
counts, ``ea_set`` for attributes. The tree is mirrored in memory so whiteouts and
replacements know what to remove, and every command's output is checked; ``e2fsck -fn``
checks the result.
"""

from __future__ import annotations

import os
import posixpath
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from dmimage.docker.errors import StoreError
from dmimage.docker.gotar import chtimes_ns
from dmimage.docker.tarsplit import Member
from dmimage.docker.unpack import WH, WH_LINKDIR, WH_META, WH_OPAQUE

ROOTFS = "/rootfs"


@dataclass(slots=True)
class Tree:
    """What the image holds below rootfs/: path (b"" = rootfs itself) -> (kind, inode key),
    children per directory, and names per inode (hard links)."""

    kind: dict[bytes, str] = field(default_factory=lambda: {b"": "d"})
    ino: dict[bytes, int] = field(default_factory=dict)
    children: dict[bytes, set[bytes]] = field(default_factory=lambda: {b"": set()})
    links: dict[int, int] = field(default_factory=dict)
    next_ino: int = 1
    #: rootfs/ itself: (mode bits, uid, gid), as first made or as a layer's "./" left it.
    root: tuple[int, int, int] = (0o755, 0, 0)
    #: Inodes holding security.capability (a hard link's lchown drops it, as the kernel's
    #: killpriv does).
    caps: set[int] = field(default_factory=set)

    def copy(self) -> Tree:
        return Tree(dict(self.kind), dict(self.ino),
                    {k: set(v) for k, v in self.children.items()}, dict(self.links),
                    self.next_ino, self.root, set(self.caps))

    def add(self, path: bytes, kind: str, ino: int | None = None) -> None:
        parent = posixpath.dirname(path)
        self.kind[path] = kind
        self.children[parent].add(path)
        if kind == "d":
            self.children[path] = set()
        else:
            if ino is None:
                ino = self.next_ino
                self.next_ino += 1
            self.ino[path] = ino
            self.links[ino] = self.links.get(ino, 0) + 1

    def descendants_last(self, path: bytes) -> list[bytes]:
        """*path* and everything below it, deepest first."""
        out: list[bytes] = []
        stack = [(path, False)]
        while stack:
            p, done = stack.pop()
            if done or self.kind[p] != "d":
                out.append(p)
                continue
            stack.append((p, True))
            stack.extend((c, False) for c in sorted(self.children[p]))
        return out

    def forget(self, path: bytes) -> None:
        kind = self.kind.pop(path)
        self.children[posixpath.dirname(path)].discard(path)
        if kind == "d":
            del self.children[path]
        else:
            ino = self.ino.pop(path)
            self.links[ino] -= 1
            if not self.links[ino]:
                del self.links[ino]


def _chtimes(t: int) -> int:
    """:func:`gotar.chtimes_ns` for whole seconds (debugfs sets seconds)."""
    return chtimes_ns(t * 10**9) // 10**9


def _q(b: bytes) -> bytes:
    """A debugfs argument: double-quoted, a quote doubled."""
    if b"\n" in b or b"\0" in b:
        raise ValueError("newline or NUL")
    return b'"' + b.replace(b'"', b'""') + b'"'


def _abs(path: bytes) -> bytes:
    return ROOTFS.encode() + (b"/" + path if path else b"")


class _Script:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.cwd: bytes | None = None

    def cmd(self, *parts: bytes) -> None:
        self.lines.append(b" ".join(parts))

    def cd(self, path: bytes) -> None:
        if self.cwd != path:
            self.cmd(b"cd", _q(_abs(path)))
            self.cwd = path


_TYPE = {tarfile.DIRTYPE: "d", tarfile.REGTYPE: "f", tarfile.AREGTYPE: "f",
         tarfile.CONTTYPE: "f", tarfile.SYMTYPE: "l", tarfile.CHRTYPE: "c",
         tarfile.BLKTYPE: "b", tarfile.FIFOTYPE: "p", tarfile.LNKTYPE: "h"}
_IFMT = {"d": stat.S_IFDIR, "f": stat.S_IFREG, "l": stat.S_IFLNK, "c": stat.S_IFCHR,
         "b": stat.S_IFBLK, "p": stat.S_IFIFO}


def _clean(name: bytes) -> bytes | None:
    """The member's path below rootfs (b"" for the root), or None if it leaves it: refused
    (dockerd 20.10 unpacks in a chroot of rootfs/, where "../x" is "x"; a name that climbs
    out is an error here, never a write elsewhere)."""
    p = posixpath.normpath(name)
    if p == b".." or p.startswith(b"../"):
        return None
    p = p.lstrip(b"/")
    return b"" if p in (b"", b".") else p


def apply_layer(image: Path, layer_tar: Path, members: list[Member], tree: Tree, work: Path,
                *, epoch: int, where: str) -> None:
    """Apply *members* (read from *layer_tar*) to the ext4 *image*, updating *tree*."""
    s = _Script()
    files = work / "files"
    files.mkdir(exist_ok=True)
    unpacked: set[bytes] = set()
    dir_times: list[tuple[bytes, int, int]] = []
    value_no = 0
    # The driver's Get at the device's mount: MkdirAllAndChown(rootfs, 0755, root) chmods
    # rootfs/ if its permission bits differ and chowns it if its owner does.
    root_mode, root_uid, root_gid = tree.root
    if root_mode & 0o777 != 0o755:
        s.cd(b"")
        s.cmd(b"sif", b".", b"mode", b"040755")
        root_mode = 0o755
    if (root_uid, root_gid) != (0, 0):
        s.cd(b"")
        s.cmd(b"sif", b".", b"uid", b"0")
        s.cmd(b"sif", b".", b"gid", b"0")
    tree.root = (root_mode, 0, 0)

    def remove_all(path: bytes) -> None:
        if path not in tree.kind:
            return
        for p in tree.descendants_last(path):
            s.cd(posixpath.dirname(p))
            base = posixpath.basename(p)
            s.cmd(b"rmdir" if tree.kind[p] == "d" else b"rm", _q(base))
            tree.forget(p)

    def mkdir_all(path: bytes) -> None:
        if path in tree.kind:
            return
        mkdir_all(posixpath.dirname(path))
        s.cd(posixpath.dirname(path))
        s.cmd(b"mkdir", _q(posixpath.basename(path)))
        s.cmd(b"sif", _q(posixpath.basename(path)), b"mode", b"040600")
        tree.add(path, "d")

    def opaque(d: bytes) -> None:
        """Remove what is below *d* and was not unpacked by this layer (a walk, as Go's
        filepath.Walk in UnpackLayer)."""
        for c in sorted(tree.children.get(d, ())):
            if c not in unpacked:
                remove_all(c)
            elif tree.kind.get(c) == "d":
                opaque(c)

    with open(layer_tar, "rb") as src:
        for n, m in enumerate(members):
            ti = m.info
            path = _clean(m.name)
            if path is None:
                raise StoreError(where, f"{ti.name}: leaves the layer's root")
            base = posixpath.basename(path)
            parent = posixpath.dirname(path)
            if b"\n" in path or b"\0" in path:
                raise StoreError(where, f"{ti.name}: a name with a newline cannot be "
                                 "written with debugfs")
            if path:
                if parent in tree.kind and tree.kind[parent] != "d":
                    raise StoreError(where, f"{ti.name}: its parent is not a directory")
                mkdir_all(parent)
            if path.startswith(WH_META) and path != WH_OPAQUE:
                # UnpackLayer skips aufs's metadata but keeps plnk's regular files aside for
                # hard links into it: those are not supported here
                if path.startswith(WH_LINKDIR) and ti.isreg():
                    raise StoreError(where, f"{ti.name}: aufs hard-link files (.wh..wh.plnk) "
                                     "are not supported")
                continue
            if base.startswith(WH):
                if base == WH_OPAQUE:
                    opaque(parent)
                else:
                    remove_all(posixpath.join(parent, base[len(WH):]))
                continue
            kind = _TYPE.get(ti.type)
            if kind is None and ti.type != tarfile.XGLTYPE:
                raise StoreError(where, f"{ti.name}: tar member type {ti.type!r} is not "
                                 "supported")
            existing = tree.kind.get(path)
            if existing is not None and not (existing == "d" and kind == "d"):
                remove_all(path)
            if kind is None:  # a global header: createTarFile ignores it after the removal
                unpacked.add(path)
                continue
            s.cd(parent)
            q = _q(base) if path else b"."
            if kind == "d":
                if path not in tree.kind:
                    s.cmd(b"mkdir", q)
                    tree.add(path, "d")
            elif kind == "f":
                host = files / f"{n}"
                with open(host, "wb") as out:
                    src.seek(m.data_offset)
                    left = ti.size
                    while left:
                        buf = src.read(min(left, 1 << 20))
                        if not buf:
                            raise StoreError(where, f"{ti.name}: truncated data")
                        out.write(buf)
                        left -= len(buf)
                s.cmd(b"write", _q(str(host).encode()), q)
                tree.add(path, "f")
            elif kind == "l":
                s.cmd(b"symlink", q, _q(ti.linkname.encode("utf-8", "surrogateescape")))
                tree.add(path, "l")
            elif kind in ("c", "b"):
                s.cmd(b"mknod", q, kind.encode(), str(ti.devmajor).encode(),
                      str(ti.devminor).encode())
                tree.add(path, kind)
            elif kind == "p":
                s.cmd(b"mknod", q, b"p")
                tree.add(path, "p")
            else:  # a hard link to a member of this or an earlier layer
                target = _clean(ti.linkname.encode("utf-8", "surrogateescape"))
                if not target or tree.kind.get(target) in (None, "d"):
                    raise StoreError(where, f"{ti.name}: hard link to {ti.linkname!r}, which "
                                     "is not a file here")
                s.cmd(b"ln", _q(_abs(target)), q)
                tree.add(path, tree.kind[target], tree.ino[target])
                s.cmd(b"sif", q, b"links_count",
                      str(tree.links[tree.ino[target]]).encode())
            uid, gid = str(ti.uid).encode(), str(ti.gid).encode()
            s.cmd(b"sif", q, b"uid", uid)
            s.cmd(b"sif", q, b"gid", gid)
            real = tree.kind[path]
            ino = tree.ino.get(path)
            if kind == "h" and ino in tree.caps:
                # dockerd's lchown through the new name: the kernel drops the shared
                # inode's capability (the header's xattrs below may set it again)
                s.cmd(b"ea_rm", q, b"security.capability")
                tree.caps.discard(ino)
            # dockerd chmods (and then sets the times of) a hard link's name too, the inode
            # it shares with its target, unless that target is a symlink; never a symlink.
            if kind != "l" and real != "l":
                mode = _IFMT[real] | (ti.mode & 0o7777)
                s.cmd(b"sif", q, b"mode", f"0{mode:o}".encode())
            for key, value in sorted(ti.pax_headers.items()):
                if not key.startswith("SCHILY.xattr."):
                    continue
                vf = files / f"x{value_no}"
                value_no += 1
                vf.write_bytes(value.encode("utf-8", "surrogateescape"))
                s.cmd(b"ea_set", b"-f", _q(str(vf).encode()), q,
                      _q(key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")))
                if key == "SCHILY.xattr.security.capability" and ino is not None:
                    tree.caps.add(ino)
            mtime = int(ti.mtime)
            raw_atime = _atime_s(ti)
            atime = max(mtime if raw_atime is None else raw_atime, mtime)
            if kind == "d":
                # UnpackLayer's last loop: the header's own atime (none: the epoch)
                dir_times.append((path, _chtimes(-1 if raw_atime is None else raw_atime),
                                  _chtimes(mtime)))
            elif kind == "l":  # LUtimesNano: no range check
                s.cmd(b"sif", q, b"mtime", f"@{mtime}".encode())
                s.cmd(b"sif", q, b"atime", f"@{atime}".encode())
            elif real != "l":  # a hard link's times too, as its mode
                s.cmd(b"sif", q, b"mtime", f"@{_chtimes(mtime)}".encode())
                s.cmd(b"sif", q, b"atime", f"@{_chtimes(atime)}".encode())
            if not path and kind == "d":
                tree.root = (ti.mode & 0o7777, ti.uid, ti.gid)
            unpacked.add(path)
    for path, atime, mtime in dir_times:
        if path in tree.kind:
            s.cd(posixpath.dirname(path) if path else b"")
            q = _q(posixpath.basename(path)) if path else b"."
            s.cmd(b"sif", q, b"mtime", f"@{mtime}".encode())
            s.cmd(b"sif", q, b"atime", f"@{atime}".encode())
    run_debugfs(image, s.lines, work, epoch=epoch, where=where)
    for f in files.iterdir():
        f.unlink()


def _atime_s(ti: tarfile.TarInfo) -> int | None:
    """Go's Header.AccessTime in whole seconds: the PAX record (its fraction dropped), else
    the GNU header's field (``gotar``), else None (Go's zero time)."""
    raw = ti.pax_headers.get("atime")
    if raw is not None:
        return int(float(raw))
    return getattr(ti, "atime_s", None)


def _env(epoch: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(E2FSPROGS_FAKE_TIME=str(epoch), LC_ALL="C")
    return env


def run_debugfs(image: Path, lines: list[bytes], work: Path, *, epoch: int, where: str
                ) -> None:
    """Run a debugfs -w script; any output but its echo and "Allocated inode" is an error,
    reported with the command that caused it."""
    if not lines:
        return
    script = work / "debugfs.script"
    script.write_bytes(b"\n".join(lines) + b"\n")
    try:
        res = subprocess.run(["debugfs", "-w", "-f", str(script), str(image)],
                             capture_output=True, env=_env(epoch), check=False)
    except FileNotFoundError:
        raise StoreError(where, "debugfs not found (install e2fsprogs)") from None
    last = b""
    for line in res.stdout.splitlines() + res.stderr.splitlines():
        if line.startswith(b"debugfs: "):
            last = line[len(b"debugfs: "):]
            continue
        if not line.strip() or line.startswith(b"debugfs 1.") or \
                line.startswith(b"Allocated inode:"):
            continue
        raise StoreError(where, f"debugfs: {line.decode(errors='replace')} (at "
                         f"{last.decode(errors='replace')[:200]})")
    if res.returncode != 0:
        raise StoreError(where, f"debugfs exited {res.returncode}")


def make_base(image: Path, size: int, uuid: str, hash_seed: str, epoch: int) -> None:
    """The base device's filesystem, made as dockerd 20.10 makes it (``mkfs.ext4 -E
    nodiscard,lazy_itable_init=0,lazy_journal_init=0``, then ``tune2fs -c -1 -i 0``)."""
    with open(image, "wb") as f:
        f.truncate(size)
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-U", uuid, "-E",
           "nodiscard,lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0,"
           f"hash_seed={hash_seed}", str(image)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(epoch), check=False)
    if res.returncode != 0:
        raise StoreError(str(image), f"mke2fs: {' '.join(res.stderr.split())[:300]}")
    subprocess.run(["tune2fs", "-c", "-1", "-i", "0", str(image)], capture_output=True,
                   env=_env(epoch), check=True)


def first_layer_setup(image: Path, hash_: str, work: Path, epoch: int) -> None:
    """What the driver's Get does on a layer's first mount when the device lacks them:
    ``rootfs/`` (0755, root) and an ``id`` file (0600) holding the device hash."""
    idf = work / "id"
    idf.write_bytes(hash_.encode())
    run_debugfs(image, [b"cd /", b'mkdir "rootfs"', b'sif "rootfs" mode 040755',
                        b"write " + _q(str(idf).encode()) + b' "id"',
                        b'sif "id" mode 0100600'], work, epoch=epoch, where=str(image))
    idf.unlink()


def fsck(image: Path, where: str) -> None:
    res = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        raise StoreError(where, "e2fsck finds problems in the built filesystem: "
                         + " ".join(res.stdout.split())[:300])
