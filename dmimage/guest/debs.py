"""Debian packages for the guest, downloaded into the cache and unpacked (never installed).

One mechanism for the lvm2 and the Docker trees, safe when several processes find the cache
incomplete at once (two pytest workers without bootstrap's set-up): each downloads into a
directory of its own and unpacks to a name of its own, and a tree goes into place only if the
one there is still incomplete; a complete tree is never replaced. Before, lvm2's rename onto a
full directory failed with ENOTEMPTY (2 of 3 tries of two processes started together), and the
Docker tree's rmtree could delete a tree another process had just put in place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .appliance import ApplianceError

__all__ = ["unpacked"]


def _newest(base: Path, package: str) -> Path | None:
    found = sorted(base.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def unpacked(base: Path, packages: Sequence[str], ready: Callable[[Path], bool], *,
             error: type[ApplianceError] = ApplianceError) -> Path:
    """``<base>/root``: the newest downloaded .deb of each of *packages* unpacked there, once
    *ready* says the tree there is incomplete (a cache from before a package was added is
    refreshed). .debs not in *base* yet are downloaded with ``apt-get download`` (apt's lists
    needed); failures raise *error*."""
    root = base / "root"
    if ready(root):
        return root
    base.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if _newest(base, p) is None]
    if missing:
        with tempfile.TemporaryDirectory(prefix="download.", dir=base) as dl:
            try:
                res = subprocess.run(["apt-get", "-o", "APT::Sandbox::User=root", "download",
                                      *missing], cwd=dl, capture_output=True, text=True,
                                     check=False, timeout=600)
            except (OSError, subprocess.SubprocessError) as exc:
                raise error(f"apt-get download {' '.join(missing)} failed: {exc}") from None
            if res.returncode != 0:
                raise error(f"apt-get download {' '.join(missing)} failed: "
                            f"{res.stderr.strip()[-500:]}")
            for got in Path(dl).glob("*.deb"):
                os.replace(got, base / got.name)
    debs = []
    for p in packages:
        deb = _newest(base, p)
        if deb is None:
            raise error(f"apt-get download {p}: no {p}_*.deb in {base}")
        debs.append(deb)
    tmp = Path(tempfile.mkdtemp(prefix="root.", dir=base))
    old: Path | None = None
    try:
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        if not ready(root):  # else another process put a complete tree there meanwhile
            if root.exists():  # incomplete: moved aside, as a rename cannot replace it
                old = Path(tempfile.mkdtemp(prefix="old.", dir=base))
                os.replace(root, old / "root")
            try:
                os.replace(tmp, root)
            except OSError:  # another process's tree arrived after the check
                if not ready(root):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return root
