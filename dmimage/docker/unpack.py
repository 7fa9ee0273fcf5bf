"""Apply a layer tar to a mounted filesystem with real syscalls, as dockerd 20.10 applies it
(``docker-applyLayer``: moby ``pkg/archive/diff.go`` ``UnpackLayer`` and ``createTarFile``,
chrooted into the device's ``rootfs/``, umask 0). It runs as root in the project's guest on a
snapshot of the parent's thin device, so the kernel's xfs writes only what the layer changes
and the rest stays shared with the parent (``dmimage.image.docker_xfs``); ext4 layers are
applied offline instead (``dmimage.docker.ext4layer``, the same semantics).

The semantics: an existing path is replaced unless both are directories (then only the
metadata changes); ``.wh.NAME`` removes NAME; ``.wh..wh..opq`` removes what its directory holds
that this layer did not unpack; other top-level ``.wh..wh.*`` names are skipped (aufs's
``plnk`` regular files, kept aside by dockerd for hard links into them, are refused); missing
parents are made with mode 0600; then lchown, the ``SCHILY.xattr.*`` attributes, chmod (not
for a symlink; for a hard link if its target is not a symlink) and times (atime never before
mtime; times outside 1970..2262 become the epoch, except a symlink's), directory times last
(their atime the header's, else the epoch).

Members are read as Go's archive/tar reads them (``dmimage.docker.gotar``): a global PAX
header is an entry of its own that changes no later one (createTarFile ignores it once an
existing path of its name is removed), and a GNU header's atime counts.

Only the standard library (and ``gotar``, itself standard library only) is imported, and
the process chroots into ``rootfs/`` as dockerd's does: a symlink in the layer then
resolves inside the device, never into the guest.

    python -m dmimage.docker.unpack --jobs JOBS.json   # one line on stdin per job
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
import sys
import tarfile

from dmimage.docker.gotar import atime_ns, chtimes_ns, open_tar, pax_ns

WH = b".wh."
WH_META = b".wh..wh."
WH_OPAQUE = b".wh..wh..opq"
WH_LINKDIR = b".wh..wh.plnk"


class LayerError(Exception):
    """A member dockerd would refuse (one line, naming the member)."""




def _mtime(ti: tarfile.TarInfo) -> int:
    mtime = pax_ns(ti, "mtime")
    return int(ti.mtime) * 10**9 if mtime is None else mtime


def _times(ti: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns as createTarFile gives them to the syscall: atime never before
    mtime, then (not for a symlink: LUtimesNano) system.Chtimes's range."""
    mtime = _mtime(ti)
    atime = atime_ns(ti)
    if atime is None or atime < mtime:
        atime = mtime
    if ti.issym():
        return atime, mtime
    return chtimes_ns(atime), chtimes_ns(mtime)


def _dir_times(ti: tarfile.TarInfo) -> tuple[int, int]:
    """A directory's final (atime, mtime): UnpackLayer's last loop passes the header's
    AccessTime as it is (none: Go's zero time, so the epoch) to system.Chtimes."""
    atime = atime_ns(ti)
    return chtimes_ns(-1 if atime is None else atime), chtimes_ns(_mtime(ti))


def _clean(name: str) -> bytes:
    """Go's filepath.Clean of the member name, relative (b"." for the root)."""
    p = posixpath.normpath(name.encode("utf-8", "surrogateescape"))
    return p.lstrip(b"/") or b"."


def _remove_all(path: bytes) -> None:
    """os.RemoveAll: nothing if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _mkdir_all(path: bytes, mode: int) -> None:
    """Go's MkdirAll(path, mode) (umask 0)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            return
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
    parent = posixpath.dirname(path.rstrip(b"/"))
    if parent and parent != path:
        _mkdir_all(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def apply(tar: tarfile.TarFile, dest: bytes, *, chown: bool = True) -> int:
    """Apply the layer *tar* below *dest* (b"/" once chrooted); returns the bytes unpacked
    (the sum of member sizes, as UnpackLayer counts). *chown* False leaves owners alone (a
    test without root)."""
    unpacked: set[bytes] = set()
    dirs: list[tuple[bytes, tuple[int, int]]] = []
    size = 0

    def at(rel: bytes) -> bytes:
        return dest if rel == b"." else posixpath.join(dest, rel)

    for ti in tar:
        size += ti.size
        rel = _clean(ti.name)
        if rel == b".." or rel.startswith(b"../"):
            raise LayerError(f"{ti.name}: outside the layer's root")
        if rel != b".":
            parent = at(posixpath.dirname(rel) or b".")
            if not os.path.lexists(parent):
                _mkdir_all(parent, 0o600)
        if rel.startswith(WH_META):
            if rel.startswith(WH_LINKDIR) and ti.isreg():
                raise LayerError(f"{ti.name}: aufs hard-link files (.wh..wh.plnk) are not "
                                 "supported")
            if rel != WH_OPAQUE:
                continue
        path = at(rel)
        base = posixpath.basename(rel)
        if base.startswith(WH):
            d = posixpath.dirname(path)
            if base == WH_OPAQUE:
                _opaque(d, unpacked)
            else:
                _remove_all(posixpath.join(d, base[len(WH):]))
            continue
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not (stat.S_ISDIR(st.st_mode) and ti.isdir()):
            _remove_all(path)
        if ti.type == tarfile.XGLTYPE:  # createTarFile ignores it, after the removal
            unpacked.add(path)
            continue
        _create(tar, ti, path, dest, chown)
        if ti.isdir():
            dirs.append((path, _dir_times(ti)))
        unpacked.add(path)
    for path, (atime, mtime) in dirs:
        os.utime(path, ns=(atime, mtime))
    return size


def _opaque(d: bytes, unpacked: set[bytes]) -> None:
    """Remove what is below *d* and was not unpacked by this layer (filepath.Walk in lexical
    order, descending into what was kept). Walk lstats its root: a *d* that is a symlink,
    even to a directory, is not walked, so its target keeps its content."""
    try:
        if not stat.S_ISDIR(os.lstat(d).st_mode):
            return
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return
    for n in names:
        p = posixpath.join(d, n)
        if p not in unpacked:
            _remove_all(p)
        elif os.path.isdir(p) and not os.path.islink(p):
            _opaque(p, unpacked)


def _create(tar: tarfile.TarFile, ti: tarfile.TarInfo, path: bytes, dest: bytes,
            chown: bool) -> None:
    mode = ti.mode & 0o7777
    link_target: bytes | None = None
    if ti.isdir():
        if not os.path.isdir(path) or os.path.islink(path):
            os.mkdir(path, mode)
    elif ti.isreg():
        f = tar.extractfile(ti)
        assert f is not None
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                shutil.copyfileobj(f, out, 1 << 20)
        finally:
            os.close(fd)
    elif ti.ischr() or ti.isblk() or ti.isfifo():
        kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK if ti.isblk() else stat.S_IFIFO
        os.mknod(path, mode | kind, os.makedev(ti.devmajor, ti.devminor))
    elif ti.islnk():
        # filepath.Join cleans: "../x" below "/" is "/x" (chrooted, nothing leaves the
        # device); below another dest the cleaned target must stay inside it
        link_target = posixpath.normpath(posixpath.join(
            dest, ti.linkname.encode("utf-8", "surrogateescape").lstrip(b"/")))
        if not (link_target == dest.rstrip(b"/") or dest == b"/"
                or link_target.startswith(dest.rstrip(b"/") + b"/")):
            raise LayerError(f"{ti.name}: hard link {ti.linkname!r} leaves the layer's root")
        os.link(link_target, path, follow_symlinks=False)
    elif ti.issym():
        os.symlink(ti.linkname.encode("utf-8", "surrogateescape"), path)
    else:
        raise LayerError(f"{ti.name}: tar member type {ti.type!r} is not supported")
    if chown:
        os.lchown(path, ti.uid, ti.gid)
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
            try:
                os.setxattr(path, name, value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False)
            except OSError as exc:  # dockerd warns and goes on for these two
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
    atime, mtime = _times(ti)
    if ti.issym():
        os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        return
    if link_target is not None and os.path.islink(link_target):
        return
    os.chmod(path, mode)
    os.utime(path, ns=(atime, mtime))


def driver_get(mount: bytes, device_hash: str | None) -> None:
    """What the driver's Get does at every mount: ``rootfs/`` made, or its permissions set
    back to 0755 and its owner to root if they differ (MkdirAllAndChown's setPermissions: a
    parent layer's "./" entry does not reach its child's device); with *device_hash* (a
    device's first mount) an ``id`` file (0600) holding it, unless one exists."""
    rootfs = posixpath.join(mount, b"rootfs")
    try:
        st = os.stat(rootfs)
    except FileNotFoundError:
        os.mkdir(rootfs, 0o755)
        st = os.stat(rootfs)
    if stat.S_IMODE(st.st_mode) & 0o777 != 0o755:
        os.chmod(rootfs, 0o755)
    if (st.st_uid, st.st_gid) != (0, 0):
        os.chown(rootfs, 0, 0)
    if device_hash is None:
        return
    idf = posixpath.join(mount, b"id")
    if not os.path.lexists(idf):
        fd = os.open(idf, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        try:
            os.write(fd, device_hash.encode())
        finally:
            os.close(fd)


def apply_job(mount: bytes, layer: str, device_hash: str | None) -> None:
    """In a child process (the chroot cannot be undone): the driver's Get on MOUNT
    (*device_hash*: the device's first mount), then MOUNT/rootfs gets LAYER.tar applied."""
    os.umask(0)
    driver_get(mount, device_hash)
    with open_tar(layer) as tar:
        os.chroot(posixpath.join(mount, b"rootfs"))
        os.chdir("/")
        apply(tar, b"/")


def serve(jobs: list[list[str | None]]) -> int:
    """Apply *jobs* ([mount, layer tar, device hash or null]) in order, each when a line
    arrives on stdin (the guest's shell mounts the device first), in a forked child;
    answer each with "ok" or "error: MESSAGE" on stdout. One Python start for a whole
    store: under TCG a start with tarfile costs ~0.8 s of the guest's CPU."""
    for mount, layer, device_hash in jobs:
        assert mount is not None and layer is not None
        if not sys.stdin.readline():
            return 1
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child exits here)
            os.close(r)
            code = 0
            try:
                apply_job(os.fsencode(mount), layer, device_hash)
            except (OSError, LayerError, tarfile.TarError) as exc:
                os.write(w, f"{posixpath.basename(layer)}: {exc}".encode(errors="replace"))
                code = 1
            except BaseException as exc:
                os.write(w, f"{posixpath.basename(layer)}: {type(exc).__name__}: {exc}"
                         .encode(errors="replace"))
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        ok = os.waitstatus_to_exitcode(status) == 0
        line = "ok" if ok else "error: " + (" ".join(msg.split()) or f"status {status}")
        print(line, flush=True)
    return 0


def main(argv: list[str]) -> int:
    """Guest entry point: ``--jobs JOBS.json`` (``serve``)."""
    import json

    if len(argv) != 2 or argv[0] != "--jobs":
        print("usage: python -m dmimage.docker.unpack --jobs JOBS.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        return serve(json.load(f))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
