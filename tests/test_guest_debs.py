"""guest/debs.py: the cache's unpacked package trees, with real .debs (the lvm2 one bootstrap
fetched) and real dpkg-deb; no download (the .deb is in place), so no network."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import pytest

from dmimage.guest.appliance import cache_root
from dmimage.guest.debs import unpacked

DEBS = sorted((cache_root() / "lvm2").glob("lvm2_*.deb"))
pytestmark = pytest.mark.skipif(not DEBS or shutil.which("dpkg-deb") is None,
                                reason="no cached lvm2 .deb (bootstrap.sh setup fetches it)")


def _ready(root: Path) -> bool:
    return (root / "sbin" / "lvm").exists()


def _unpack(base: str) -> str:
    return str(unpacked(Path(base), ("lvm2",), _ready))


def test_processes_that_find_the_tree_missing_at_once_all_get_it(tmp_path: Path) -> None:
    """Four processes at once on a cache holding only the .deb: each returns the complete
    tree, and no download or unpack directory is left behind."""
    shutil.copy(DEBS[-1], tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        roots = pool.map(_unpack, [str(tmp_path)] * 4)
    assert roots == [str(tmp_path / "root")] * 4
    assert _ready(tmp_path / "root")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["root", DEBS[-1].name])


def test_an_incomplete_tree_is_replaced_and_a_complete_one_kept(tmp_path: Path) -> None:
    shutil.copy(DEBS[-1], tmp_path)
    stale = tmp_path / "root" / "etc"
    stale.mkdir(parents=True)
    (stale / "left-over").write_text("x")
    root = unpacked(tmp_path, ("lvm2",), _ready)
    assert _ready(root) and not (stale / "left-over").exists()
    marker = root / "marker"
    marker.write_text("kept")
    assert unpacked(tmp_path, ("lvm2",), _ready) == root and marker.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["root", DEBS[-1].name])
