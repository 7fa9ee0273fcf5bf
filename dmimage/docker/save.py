"""``dmimage docker save``: a ``docker save``-compatible tarball read offline.

Per image: ``<config hex>.json`` (the imagedb bytes, unchanged), per layer ``<id>/VERSION``,
``<id>/json`` and ``<id>/layer.tar``, plus ``manifest.json`` and ``repositories``. Each
layer.tar is rebuilt from the layer's tar-split with the file contents read from the layer's
thin device (ext4 or xfs, via dissect.extfs or dissect.xfs, below the device's ``rootfs/``,
where the devicemapper driver keeps a layer's tree), so its sha256 is the diff id; any
difference is an error and no output is left behind. The layer directories are named by the
legacy v1 ids dockerd 20.10 computes, with its ``json`` records (``v1id``); a layer saved
again under another id is a symlink to the first copy, as Docker writes it."""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from dmimage import devlock
from dmimage.docker.errors import StoreError, StoreIOError
from dmimage.docker.fs import open_filesystem
from dmimage.docker.images import Image
from dmimage.docker.layers import Layer
from dmimage.docker.store import Store, article, resolve
from dmimage.docker.tarsplit import assemble, read_entries, tar_size
from dmimage.docker.thinfile import ThinFile
from dmimage.docker.v1id import layer_records
from dmimage.errors import UsageError
from dmimage.thin.pool import Pool, open_pool

ROOTFS = "/rootfs/"


def _layer_tar(store: Store, pool: Pool, data_fd: int, layer: Layer
               ) -> tuple[int, Iterator[bytes]]:
    """(size, chunks) of the rebuilt layer tar; the chunks raise StoreError on any mismatch."""
    where = store.root.display(layer.tar_split or f"{layer.dir}/tar-split.json.gz")
    if layer.tar_split is None:
        raise StoreError(where, "missing: the layer tar cannot be rebuilt")
    entries = list(read_entries(store.root.read_bytes(layer.tar_split), where))
    dev = store.device(layer.cache_id)
    if dev is None:
        raise StoreError(where, f"layer {layer.chain_id} has no device JSON ({layer.cache_id})")
    if dev.device_id not in pool.devices():
        raise StoreError(where, f"device {dev.device_id} of layer {layer.chain_id} is not in "
                         "the pool")
    try:
        fs = open_filesystem(ThinFile(pool, data_fd, dev.device_id, dev.size,
                                           store.pool_files.data_offset))
    except Exception as exc:  # dissect raises its own types for damaged filesystems
        raise StoreError(where, f"device {dev.device_id}: no readable ext4 or xfs "
                         f"filesystem ({exc})") from None

    listings: dict[str, dict[str, Any]] = {}

    def lookup(rel: str) -> Any:
        """The node at *rel* below rootfs/, each directory listed once (a path lookup
        scans its directories: per file, that is quadratic in a directory's size)."""
        parent, _, base = rel.rpartition("/")
        listing = listings.get(parent)
        if listing is None:
            listing = listings[parent] = fs.get(ROOTFS + parent).listdir()
        return listing[base]

    def open_file(name: bytes) -> BinaryIO:
        rel = posixpath.normpath(name.decode("utf-8", "surrogateescape")).lstrip("/")
        try:
            f: BinaryIO = lookup(rel).open()
        except Exception:  # a missing path, or one that is not a regular file
            raise StoreError(where, f"{rel}: named by tar-split but not a file in the layer's "
                             f"filesystem (device {dev.device_id})") from None
        return f

    return tar_size(entries), assemble(entries, open_file, expect_digest=layer.diff_id,
                                       where=where)


def _add_stream(tar: tarfile.TarFile, ti: tarfile.TarInfo, chunks: Iterator[bytes],
                where: str) -> None:
    """A member of ``ti.size`` bytes written straight from *chunks* (no copy through a file
    object): the header, the chunks, the padding. The chunks' last step is the diff id
    check, so they are drained to the end."""
    assert tar.fileobj is not None
    tar.addfile(ti)  # the header only
    n = 0
    for c in chunks:
        n += len(c)
        if n > ti.size:
            raise StoreError(where, "the rebuilt layer tar is longer than its tar-split says")
        tar.fileobj.write(c)
    if n != ti.size:
        raise StoreError(where, "the rebuilt layer tar is shorter than its tar-split says")
    pad = -n % tarfile.BLOCKSIZE
    tar.fileobj.write(bytes(pad))
    tar.offset += n + pad


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    tar.addfile(ti, io.BytesIO(data))


def save(store: Store, names: list[str], out: BinaryIO) -> list[str]:
    """Write the tarball of the images *names* to *out*; return their ids."""
    images: dict[str, tuple[Image, list[str]]] = {}
    for name in names:
        t = resolve(store, name)
        if t.kind != "image":
            raise UsageError(f"{name}: is {article(t.kind)}, not an image")
        img = store.images[t.label]
        refs = images.setdefault(img.id, (img, []))[1]
        if name in store.tags and name not in refs:
            refs.append(name)
        elif ":" not in name and f"{name}:latest" in store.tags:
            refs.append(f"{name}:latest")
    # Shared locks on both pool files, in devlock's global order (a data lock taken before
    # the pool's metadata lock could wait in a cycle with a writer), for the whole save.
    with devlock.acquire_all([(store.pool_files.metadata, False),
                              (store.pool_files.data, False)]):
        return _save(store, images, out)


def _save(store: Store, images: dict[str, tuple[Image, list[str]]], out: BinaryIO) -> list[str]:
    try:
        data_fd = os.open(store.pool_files.data, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreIOError(store.pool_files.data, exc.strerror or str(exc)) from None
    manifest = []
    repos: dict[str, dict[str, str]] = {}
    written: set[str] = set()
    by_diff: dict[str, str] = {}  # diff id -> the v1 id its layer.tar was written under
    try:
        with open_pool(store.pool_files.metadata) as pool, \
                tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for img, refs in images.values():
                layer_paths = []
                parent = ""
                records = layer_records(img.config, list(img.chain_ids),
                                        store.root.display(f"image/devicemapper/imagedb/"
                                                           f"content/sha256/{img.id[7:]}"))
                for chain, (v1, v1_json) in zip(img.chain_ids, records, strict=True):
                    layer = store.layers.get(chain)
                    if layer is None:
                        raise StoreError(store.root.display("image/devicemapper/layerdb"),
                                         f"image {img.id} needs layer {chain}, which is "
                                         "missing")
                    layer_paths.append(f"{v1}/layer.tar")
                    if v1 not in written:
                        _add_bytes(tar, f"{v1}/VERSION", b"1.0")
                        _add_bytes(tar, f"{v1}/json", v1_json)
                        first = by_diff.get(layer.diff_id)
                        if first is not None:
                            # as docker save: the same layer under another v1 id is a link
                            ti = tarfile.TarInfo(f"{v1}/layer.tar")
                            ti.type = tarfile.SYMTYPE
                            ti.linkname = f"../{first}/layer.tar"
                            tar.addfile(ti)
                            written.add(v1)
                            parent = v1
                            continue
                        size, chunks = _layer_tar(store, pool, data_fd, layer)
                        ti = tarfile.TarInfo(f"{v1}/layer.tar")
                        ti.size = size
                        ti.mode = 0o644
                        _add_stream(tar, ti, chunks, store.root.display(layer.dir))
                        written.add(v1)
                        by_diff[layer.diff_id] = v1
                    parent = v1
                hexid = img.id.removeprefix("sha256:")
                _add_bytes(tar, f"{hexid}.json", img.config)
                manifest.append({"Config": f"{hexid}.json", "RepoTags": refs or None,
                                 "Layers": layer_paths})
                for ref in refs:
                    repo, _, tag = ref.rpartition(":")
                    repos.setdefault(repo, {})[tag] = parent
            if repos:
                _add_bytes(tar, "repositories", json.dumps(repos).encode() + b"\n")
            _add_bytes(tar, "manifest.json", json.dumps(manifest).encode() + b"\n")
    finally:
        os.close(data_fd)
    return list(images)
