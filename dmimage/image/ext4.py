"""Directory trees → ext4 images, reproducibly and without root.

The directories of a content table are merged into a staging tree (later directories win; a
file named ``.wh.NAME`` deletes NAME coming from earlier ones, Docker's whiteout convention),
every timestamp is set to SOURCE_DATE_EPOCH, and ``mke2fs -t ext4 -d STAGING`` makes the
filesystem in a sparse file of the volume's size, with a fixed UUID (``-U``), directory hash
seed (``-E hash_seed=``), ``-E root_owner=0:0`` and ``E2FSPROGS_FAKE_TIME`` /
``SOURCE_DATE_EPOCH`` set, so the same inputs give the same bytes. When the builder is not
root, mke2fs copies its uid/gid into the inodes; ``debugfs -w`` then sets them to 0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dmimage.image.spec import Ext4Content, SpecError, SpecFileError

WHITEOUT = ".wh."


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute inside the filesystem, e.g. "/etc/hostname"
    size: int
    sha256: str
    mode: int

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256,
                "mode": f"{self.mode:04o}"}


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def merge_tree(dirs: list[Path], staging: Path, key: str) -> None:
    """Overlay *dirs* in order into *staging* (which must be an empty directory)."""
    for i, top in enumerate(dirs):
        for root, subdirs, files in os.walk(top):
            subdirs.sort()
            rel = Path(root).relative_to(top)
            dst_dir = staging / rel
            if dst_dir.is_symlink() or (dst_dir.exists() and not dst_dir.is_dir()):
                _remove(dst_dir)
            dst_dir.mkdir(exist_ok=True)
            shutil.copymode(root, dst_dir)
            for name in sorted(files) + [d for d in subdirs if os.path.islink(Path(root) / d)]:
                src = Path(root) / name
                if name.startswith(WHITEOUT):
                    _remove(dst_dir / name[len(WHITEOUT):])
                    continue
                dst = dst_dir / name
                if dst.exists() or dst.is_symlink():
                    _remove(dst)
                st = os.lstat(src)
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(src), dst)
                elif stat.S_ISREG(st.st_mode):
                    try:
                        shutil.copy2(src, dst)
                    except OSError as exc:
                        raise SpecFileError(f"{key}.dirs[{i}]",
                                            f"{src}: {exc.strerror}") from None
                else:
                    raise SpecError(f"{key}.dirs[{i}]", f"{src}: only regular files, "
                                    "directories and symlinks are supported")
            subdirs[:] = [d for d in subdirs if not os.path.islink(Path(root) / d)]


def _set_times(staging: Path, epoch: int) -> None:
    for root, dirs, files in os.walk(staging, topdown=False):
        for name in files + dirs:
            p = os.path.join(root, name)
            os.utime(p, (epoch, epoch), follow_symlinks=False)
    os.utime(staging, (epoch, epoch))


def file_list(staging: Path) -> list[FileEntry]:
    out = []
    for root, dirs, files in os.walk(staging):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while b := f.read(1 << 20):
                    h.update(b)
            out.append(FileEntry("/" + str(p.relative_to(staging)), st.st_size, h.hexdigest(),
                                 stat.S_IMODE(st.st_mode)))
    return sorted(out, key=lambda e: e.path)


def _env(epoch: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(E2FSPROGS_FAKE_TIME=str(epoch), SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C",
               MKE2FS_DEVICE_SECTSIZE="512", MKE2FS_DEVICE_PHYS_SECTSIZE="512")
    env.pop("MKE2FS_CONFIG", None)
    return env


def make_ext4(content: Ext4Content, size: int, out: Path, work: Path, epoch: int
              ) -> list[FileEntry]:
    """Make the filesystem in *out* (a new sparse file of *size* bytes); return its files."""
    staging = work / (out.name + ".tree")
    staging.mkdir()
    try:
        merge_tree(content.dirs, staging, content.path)
        _set_times(staging, epoch)
        files = file_list(staging)
        with open(out, "wb") as f:
            f.truncate(size)
        cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", content.label,
               "-U", content.uuid, "-E",
               f"hash_seed={content.hash_seed},root_owner=0:0,nodiscard",
               "-d", str(staging), str(out)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=_env(epoch),
                                 check=False)
        except FileNotFoundError:
            raise SpecFileError(content.path, "mke2fs not found (install e2fsprogs)") from None
        if res.returncode != 0:
            msg = " ".join((res.stderr or res.stdout).split())[:300]
            if "allocate" in msg or "No space" in msg or "too small" in msg:
                raise SpecError(content.path, f"the merged tree does not fit in an ext4 "
                                f"filesystem of {size} bytes (mke2fs: {msg})")
            raise SpecError(content.path, f"mke2fs failed: {msg}")
        _fix_inodes(out, staging, epoch)
        return files
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fix_inodes(image: Path, staging: Path, epoch: int) -> None:
    """mke2fs copies each source inode's ctime and atime (which utime cannot set, and reading
    changes) and, when not run by root, its owner: set them to the epoch and 0:0."""
    lines = []
    chown = os.getuid() != 0 or os.getgid() != 0
    for root, dirs, files in os.walk(staging):
        for name in dirs + files:
            rel = "/" + str((Path(root) / name).relative_to(staging))
            q = '"' + rel.replace('"', '\\"') + '"'
            lines += [f"sif {q} ctime @{epoch}", f"sif {q} atime @{epoch}"]
            if chown:
                lines += [f"sif {q} uid 0", f"sif {q} gid 0"]
    if not lines:
        return
    script = image.with_suffix(".debugfs")
    script.write_text("\n".join(lines) + "\n")
    try:
        subprocess.run(["debugfs", "-w", "-f", str(script), str(image)], capture_output=True,
                       env=_env(epoch), check=True)
    finally:
        script.unlink()
