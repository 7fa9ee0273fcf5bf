"""What dockerd must show of a store dmimage built (``layout = "docker-devicemapper"``): the
data-root disk it is put on, and the comparison of a ``docker export`` of a container with the
reference tree ``docker_inputs.expected_tree`` computes from the layer tars."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path
from typing import Any

#: The containers the built-store test creates: (name, image).
CONTAINERS = (("c1", "rich:2"), ("c2", "other:1"), ("c3", "rich:1"))


def data_disk(root: Path, disk: Path) -> Path:
    """An ext4 disk holding the data root (mke2fs -d keeps the loop files sparse)."""
    with open(disk, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-F", "-m", "0", "-E", "root_owner=0:0",
                    "-d", str(root), str(disk)], check=True, capture_output=True)
    return disk


def tar_members(raw: bytes) -> dict[str, Any]:
    """A tar's members by name, and the sha256 of each regular file's content under
    "NAME\\0sha256"."""
    out: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), encoding="utf-8",
                      errors="surrogateescape") as t:
        for ti in t.getmembers():
            name = ti.name.rstrip("/")
            out[name] = ti
            if ti.isreg():
                f = t.extractfile(ti)
                assert f is not None
                out[name + "\0sha256"] = hashlib.sha256(f.read()).hexdigest()
    return out


def compare_export(exp: dict[str, Any], want: dict[str, dict[str, Any]], label: str) -> None:
    """Every path of the reference *want* is in the export *exp* (``tar_members``) with its
    type, owner, mode, content, link target, device number and security.capability."""
    problems = []
    for path, w in sorted(want.items()):
        ti = exp.get(path)
        if ti is None:
            problems.append(f"{path}: missing")
            continue
        kind = ("d" if ti.isdir() else "l" if ti.issym() else "p" if ti.isfifo() else
                "c" if ti.ischr() else "f" if ti.isreg() or ti.islnk() else "?")
        if ti.islnk():  # a hard link in the export: the content is its target's
            kind = "f"
            sha = exp.get(ti.linkname.rstrip("/") + "\0sha256")
        else:
            sha = exp.get(path + "\0sha256")
        got: dict[str, Any] = {"type": kind, "uid": ti.uid, "gid": ti.gid}
        if kind != "l":
            got["mode"] = ti.mode & 0o7777  # Docker's tar headers carry the type bits too
        if kind == "f":
            got["sha256"] = sha
        if kind == "l":
            got["link"] = ti.linkname
        if kind == "c":
            got["dev"] = (ti.devmajor, ti.devminor)
        cap = ti.pax_headers.get("SCHILY.xattr.security.capability")
        got["cap"] = None if cap is None else cap.encode("utf-8", "surrogateescape")
        ref = {k: v for k, v in w.items() if k in got and k != "xattrs"}
        ref["cap"] = w.get("xattrs", {}).get("security.capability")  # none must be none
        if {k: got[k] for k in ref} != ref:
            problems.append(f"{path}: docker export {got}, the layers say {ref}")
    assert not problems, f"{label}:\n" + "\n".join(problems)
