"""``dmimage docker save``: a ``docker save``-compatible tarball read offline.

Per image: ``<config hex>.json`` (the imagedb bytes, unchanged), per layer ``<id>/VERSION``,
``<id>/json`` and ``<id>/layer.tar``, plus ``manifest.json`` and ``repositories``. Each
layer.tar is rebuilt from the layer's tar-split with the file contents read from the layer's
thin device (ext4 or xfs, via dissect.extfs or dissect.xfs, below the device's ``rootfs/``,
where the devicemapper driver keeps a layer's tree), so its sha256 is the diff id; any
difference is an error and no output is left behind. The layer directories are named by the
legacy v1 ids dockerd 20.10 computes, with its ``json`` records (``v1id``); a layer saved
again under another id is a symlink to the first copy, as Docker writes it.

Speed: each layer tar is planned first (the filesystem reader gives every file's block runs,
the thin mapping turns them into data file ranges: :mod:`tarplan`), then copied in large
``preadv`` runs while it is hashed (:mod:`tarcopy`). The headers and small members are
written first with each layer tar's place left open; when the output is a regular file the
layers are then rebuilt in parallel, one per core, each written at its offset."""

from __future__ import annotations

import fcntl
import gc
import io
import json
import os
import stat
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, cast

from dmimage import devlock
from dmimage.docker.errors import StoreError, StoreIOError
from dmimage.docker.ext4runs import Ext4Files
from dmimage.docker.fs import open_filesystem
from dmimage.docker.images import Image
from dmimage.docker.layers import Layer
from dmimage.docker.store import Store, article, resolve
from dmimage.docker.tarcopy import Aborted, Sink, copy_plan, positional_sink
from dmimage.docker.tarplan import Plan, plan_layer
from dmimage.docker.tarsplit import Layout, read_layout
from dmimage.docker.thinfile import ThinFile
from dmimage.docker.v1id import layer_records
from dmimage.errors import UsageError
from dmimage.thin.pool import Pool, open_pool

ROOTFS = "/rootfs/"


@dataclass(slots=True)
class _Job:
    """One layer tar to rebuild: what the main thread checked and read (the tar-split, the
    device, its thin mapping), and where the tar goes in the output."""

    layer: Layer
    where: str
    layout: Layout
    size: int
    device_id: int
    thin: ThinFile
    offset: int = 0  # of the member's data in the output (positional writes)


def _prepare(store: Store, pool: Pool, data_fd: int, layer: Layer) -> _Job:
    where = store.root.display(layer.tar_split or f"{layer.dir}/tar-split.json.gz")
    if layer.tar_split is None:
        raise StoreError(where, "missing: the layer tar cannot be rebuilt")
    layout = read_layout(store.root.read_bytes(layer.tar_split), where)
    dev = store.device(layer.cache_id)
    if dev is None:
        raise StoreError(where, f"layer {layer.chain_id} has no device JSON ({layer.cache_id})")
    if dev.device_id not in pool.devices():
        raise StoreError(where, f"device {dev.device_id} of layer {layer.chain_id} is not in "
                         "the pool")
    thin = ThinFile(pool, data_fd, dev.device_id, dev.size, store.pool_files.data_offset)
    return _Job(layer, where, layout, layout.size, dev.device_id, thin)


def _plan(job: _Job) -> Plan:
    """The layer's filesystem read (ext4 or xfs) and its tar planned; each directory below
    rootfs/ is listed once (a path lookup scans its directories: per file, that is
    quadratic in a directory's size)."""
    try:
        fs = open_filesystem(job.thin)
    except Exception as exc:  # dissect raises its own types for damaged filesystems
        raise StoreError(job.where, f"device {job.device_id}: no readable ext4 or xfs "
                         f"filesystem ({exc})") from None
    listings: dict[str, dict[str, Any]] = {}

    def lookup(rel: str) -> Any:
        parent, _, base = rel.rpartition("/")
        listing = listings.get(parent)
        if listing is None:
            listing = listings[parent] = fs.get(ROOTFS + parent).listdir()
        return listing[base]

    ext4 = None
    if type(fs).__name__ == "ExtFS":
        try:
            ext4 = Ext4Files(fs, ROOTFS)
        except Exception:  # no rootfs/: each file then fails on its own, naming itself
            ext4 = None
    plan = plan_layer(job.layout, job.thin, lookup, where=job.where,
                      device_id=job.device_id, ext4=ext4)
    if plan.size != job.size:  # pragma: no cover - both add up the same entries
        raise StoreError(job.where, f"planned {plan.size} bytes, tar-split says {job.size}")
    return plan


def _run(job: _Job, data_fd: int, sink: Sink, abort: threading.Event | None = None, *,
         verify: bool = True) -> None:
    copy_plan(_plan(job), data_fd, sink, expect_digest=job.layer.diff_id,
              where=job.where, abort=abort, verify=verify)


def _positional(out: BinaryIO) -> bool:
    """Can layer tars be written in parallel at their offsets? A regular file, or /dev/null
    (which ignores offsets); not a pipe or an in-memory file."""
    try:
        fd = out.fileno()
        st = os.fstat(fd)
        appends = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
    except (OSError, AttributeError, io.UnsupportedOperation):
        return False
    if appends:  # pwrite on an O_APPEND file appends (Linux): no writes at offsets
        return False
    if stat.S_ISREG(st.st_mode):
        return True
    try:
        null = os.stat(os.devnull)
    except OSError:  # pragma: no cover
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev


def _seekable(out: BinaryIO) -> bool:
    try:
        return bool(out.seekable())
    except (OSError, ValueError):
        return False


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Parallel:
    """Layer tars rebuilt at once, one per core, each written at its offset, started as soon
    as the main thread has placed them (its tar-split parse of the next layer then overlaps
    the copy of this one). The first failure in tar order is raised; once a copy has failed
    the others stop early."""

    def __init__(self, data_fd: int, out_fd: int, verify: bool) -> None:
        self.data_fd = data_fd
        self.out_fd = out_fd
        self.verify = verify
        self.abort = threading.Event()
        self.errors: dict[int, BaseException] = {}
        self.n = 0
        self.finished = False
        self.ex = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="save")

    def _one(self, i: int, job: _Job) -> None:
        try:
            _run(job, self.data_fd, positional_sink(self.out_fd, job.offset), self.abort,
                 verify=self.verify)
        except Aborted:
            pass
        except BaseException as exc:
            self.errors[i] = exc
            self.abort.set()

    def submit(self, job: _Job) -> None:
        if self.abort.is_set():  # a copy failed: nothing more is started
            raise self.errors[min(self.errors)]
        self.ex.submit(self._one, self.n, job)
        self.n += 1

    def finish(self, failed: BaseException | None = None) -> None:
        """Wait for the copies and raise the first failure in tar order. *failed*: the main
        thread's own error, which lies after every submitted layer: the copies still run to
        their end, so the error named is the one a save into a pipe (one layer after the
        other) names; an interrupt stops them at their next buffer."""
        self.finished = True
        if failed is not None and not isinstance(failed, Exception):
            self.abort.set()
        try:
            self.ex.shutdown(wait=True)
        except BaseException:  # Ctrl-C while waiting
            self.abort.set()
            self.ex.shutdown(wait=True)
            raise
        if self.errors:
            raise self.errors[min(self.errors)]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    tar.addfile(ti, io.BytesIO(data))


def save(store: Store, names: list[str], out: BinaryIO, *, verify: bool = True) -> list[str]:
    """Write the tarball of the images *names* to *out*; return their ids. Each layer tar's
    sha256 is checked against its diff id unless *verify* is false (faster from the page
    cache, where hashing is the bound; the result is then unchecked)."""
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
    # The cyclic garbage collector is paused meanwhile: a layer of 10,000 files makes
    # ~30,000 tar-split lines' worth of acyclic tuples and bytes, which set off collections
    # that walk every live object, again and again, for nothing (~10% of the CPU of a
    # save of small files).
    was = gc.isenabled()
    gc.disable()
    try:
        with devlock.acquire_all([(store.pool_files.metadata, False),
                                  (store.pool_files.data, False)]):
            return _save(store, images, out, verify)
    finally:
        if was:
            gc.enable()


def _save(store: Store, images: dict[str, tuple[Image, list[str]]], out: BinaryIO,
          verify: bool) -> list[str]:
    try:
        data_fd = os.open(store.pool_files.data, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreIOError(store.pool_files.data, exc.strerror or str(exc)) from None
    manifest = []
    repos: dict[str, dict[str, str]] = {}
    written: set[str] = set()
    by_diff: dict[str, str] = {}  # diff id -> the v1 id its layer.tar was written under
    parallel = _positional(out)
    copies = _Parallel(data_fd, out.fileno(), verify) if parallel else None
    try:
        # a pipe cannot tell() its position: tarfile's stream mode then
        mode: Literal["w", "w|"] = "w" if parallel or _seekable(out) else "w|"
        with open_pool(store.pool_files.metadata) as pool, \
                tarfile.open(fileobj=out, mode=mode, format=tarfile.PAX_FORMAT) as tar:
            fobj = tar.fileobj
            assert fobj is not None
            sink = cast(Any, fobj)
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
                        job = _prepare(store, pool, data_fd, layer)
                        ti = tarfile.TarInfo(f"{v1}/layer.tar")
                        ti.size = job.size
                        ti.mode = 0o644
                        tar.addfile(ti)  # the header only
                        job.offset = tar.offset
                        pad = -job.size % tarfile.BLOCKSIZE
                        if copies is not None:  # written by another thread, at its offset
                            copies.submit(job)
                            fobj.seek(job.offset + job.size)
                        else:
                            # through tarfile's file object: in stream mode it buffers
                            _run(job, data_fd, lambda chunk, _off: sink.write(chunk),
                                 verify=verify)
                        fobj.write(bytes(pad))
                        tar.offset += job.size + pad
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
            if copies is not None:
                out.flush()
                copies.finish()
    except BaseException as exc:
        if copies is not None and not copies.finished:
            copies.finish(exc)  # raises a copy's error of an earlier layer first
        raise
    finally:
        os.close(data_fd)
    return list(images)
