"""``layout = "docker-devicemapper"``: a complete Docker data root (Engine <= 24, the
devicemapper storage driver, loop-lvm) pre-seeded with images, built offline without root.

    name = "seed"
    layout = "docker-devicemapper"
    [docker]
    images = ["app.tar", "oci-dir"]    # docker save tarballs or OCI image layouts
    base_size = "10G"                  # dm.basesize (every device's size)
    data_size = "100G"                 # the loop files (dm.loopdatasize, dm.loopmetadatasize)
    metadata_size = "2G"
    fs = "ext4"                        # dm.fs: "ext4" or "xfs"

The store is built as dockerd 20.10 would have built it: the base device (id 1, an ext4
made with dockerd's mkfs options), then per layer, parents first, a snapshot of its parent's
device with the layer applied (:mod:`dmimage.docker.ext4layer`: only the blocks the layer
changed are written, the rest stay shared), each a transaction of its own (the pool's
transaction id counts the devices). With ``fs = "xfs"`` the same devices, ids and
transactions are written by the kernel in the project's QEMU guest instead (no tool edits an
xfs offline in place; :mod:`dmimage.image.docker_xfs`: dockerd's mkfs.xfs, snapshots and
nouuid mounts, layers applied by :mod:`dmimage.docker.unpack`); the host formats the empty
pool and writes everything else. Then the device JSON, ``deviceset-metadata`` and
``transaction-metadata``, the layerdb (cache-id, diff, parent, size, tar-split.json.gz), the
imagedb and repositories.json. Self-check before anything lands in OUTDIR: the store is read
back with ``dmimage.docker``; ``check`` must be clean and every layer tar rebuilt from the
thin devices must hash to its diff id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dmimage.docker.errors import StoreError
from dmimage.docker.images import chain_ids
from dmimage.image.spec import SpecError, SpecFileError, _Table, human

if TYPE_CHECKING:
    from dmimage.guest.docker import DockerGuest

LAYOUT = "docker-devicemapper"
BLOCK = 64 << 10  # dm.blocksize
NAMESPACE = uuid.UUID("5b0b5c8e-4d7e-4c43-9f57-6d8d0c1f4a11")
READ = 8 << 20
#: mkfs.xfs (xfsprogs >= 5.19) refuses a filesystem under 300 MiB.
XFS_MIN = 300 << 20


@dataclass
class DockerSpec:
    source: Path
    name: str
    inputs: list[Path]
    base_size: int
    data_size: int
    metadata_size: int
    source_date_epoch: int
    base_uuid: str
    hash_seed: str
    #: dm.fs: "ext4" (built offline) or "xfs" (written by the kernel in a guest).
    fs: str = "ext4"
    #: Whether the spec named base_uuid (xfs: else the UUID is mkfs.xfs's, as dockerd's).
    base_uuid_given: bool = False


@dataclass
class DockerBuild:
    outdir: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def is_docker_spec(path: str | os.PathLike[str]) -> bool:
    """Whether the spec at *path* asks for this layout (errors are left to the loaders)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return data.get("layout") == LAYOUT


def load_docker_spec(path: str | os.PathLike[str]) -> DockerSpec:
    src = Path(path)
    try:
        data = tomllib.loads(src.read_text())
    except OSError as exc:
        raise SpecFileError("", f"{src}: {exc.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError("", f"{src}: {exc}") from None
    top = _Table(data, "")
    name = top.str_("name", required=True)
    assert name is not None
    top.str_("layout")
    epoch = top.int_("source_date_epoch", 1700000000, lo=1, hi=(1 << 32) - 1)
    assert epoch is not None
    d = _Table(top.get("docker") or {}, "docker")
    raw = d.get("images")
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) for x in raw):
        raise SpecError("docker.images", "give a list of docker save tarballs or OCI image "
                        "layouts")
    base = src.resolve().parent
    inputs = [(base / x) for x in raw]
    for i, p in enumerate(inputs):
        if not p.exists():
            raise SpecFileError(f"docker.images[{i}]", f"{p}: not found")
    base_size = d.size("base_size", 10 << 30)
    data_size = d.size("data_size", 100 << 30)
    meta_size = d.size("metadata_size", 2 << 30)
    assert base_size is not None and data_size is not None and meta_size is not None
    for key, v, unit in (("base_size", base_size, 4096), ("data_size", data_size, BLOCK),
                         ("metadata_size", meta_size, 4096)):
        if v % unit or v <= 0:
            raise SpecError(f"docker.{key}", f"{v}: must be a positive multiple of "
                            f"{human(unit)}")
    fs = d.str_("fs") or "ext4"
    if fs not in ("ext4", "xfs"):
        raise SpecError("docker.fs", f"{fs!r}: give \"ext4\" or \"xfs\" (dockerd's dm.fs)")
    if fs == "ext4" and base_size < 8 << 20:
        raise SpecError("docker.base_size", "at least 8 MiB (an ext4 with a journal)")
    if fs == "xfs" and base_size < XFS_MIN:
        raise SpecError("docker.base_size", "at least 300 MiB for xfs (mkfs.xfs refuses a "
                        "smaller filesystem)")
    given = d.str_("base_uuid")
    if given is not None and fs == "xfs":
        try:
            given = str(uuid.UUID(given))  # mkfs.xfs -m uuid= takes a UUID only
        except ValueError:
            raise SpecError("docker.base_uuid", f"{given!r}: not a UUID") from None
    u = given or str(uuid.uuid5(NAMESPACE, f"{name}\0base"))
    seed = d.str_("hash_seed") or str(uuid.uuid5(NAMESPACE, f"{name}\0hash"))
    d.done()
    top.done()
    return DockerSpec(src, name, inputs, base_size, data_size, meta_size, epoch, u, seed, fs,
                      given is not None)


def _hash(spec: DockerSpec, chain: str) -> str:
    """A layer's device hash (dockerd draws a random one; a build is reproducible)."""
    return hashlib.sha256(f"dmimage\0{spec.name}\0{chain}".encode()).hexdigest()


def _blocks_to_write(child: Path, parent: Path | None, size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(blocks to write, blocks to discard) making a snapshot of *parent* hold *child*."""
    from dmimage.extents import data_ranges

    writes: list[np.ndarray] = []
    discards: list[np.ndarray] = []
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in (child, parent) if p is not None]
    try:
        spans: set[int] = set()
        for fd in fds:
            for off, n in data_ranges(fd, 0, size):
                first, last = off // READ, (off + n - 1) // READ
                spans.update(range(first, last + 1))
        for span in sorted(spans):
            off = span * READ
            n = min(READ, size - off)
            a = np.zeros(READ, np.uint8)
            buf = os.pread(fds[0], n, off)
            a[:len(buf)] = np.frombuffer(buf, np.uint8)
            a2 = a.reshape(-1, BLOCK)
            nonzero = a2.any(axis=1)
            first = off // BLOCK
            if len(fds) == 1:
                writes.append(first + np.flatnonzero(nonzero))
                continue
            b = np.zeros(READ, np.uint8)
            buf = os.pread(fds[1], n, off)
            b[:len(buf)] = np.frombuffer(buf, np.uint8)
            differ = (a2 != b.reshape(-1, BLOCK)).any(axis=1)
            writes.append(first + np.flatnonzero(differ & nonzero))
            discards.append(first + np.flatnonzero(differ & ~nonzero))
    finally:
        for fd in fds:
            os.close(fd)

    def cat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs).astype(np.int64) if xs else np.empty(0, np.int64)
    return cat(writes), cat(discards)


def _write_blocks(wp: Any, dev: int, image: Path, writes: np.ndarray,
                  discards: np.ndarray) -> None:
    with open(image, "rb") as f:
        for blk in writes.tolist():
            f.seek(blk * BLOCK)
            buf = f.read(BLOCK)
            wp.write(dev, blk * BLOCK, buf + bytes(BLOCK - len(buf)))
    for blk in discards.tolist():
        wp.discard(dev, blk * BLOCK, BLOCK)


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)


def _go_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def build_docker_store(spec: DockerSpec, outdir: str | os.PathLike[str], *,
                       log: Callable[[str], None] | None = None,
                       guest: DockerGuest | None = None,
                       kernel: str = "deb12") -> DockerBuild:
    """Build the data root into *outdir* (new or empty); see the module docstring. xfs
    (``spec.fs``) is written in *guest* (a DockerGuest booted with ``host_share="/"``) or in
    one booted on *kernel* (:mod:`dmimage.image.docker_xfs`)."""
    from dmimage.docker.ext4layer import Tree, apply_layer, first_layer_setup, fsck, make_base
    from dmimage.docker.inputs import layer_file, read_inputs
    from dmimage.docker.tarsplit import disassemble
    from dmimage.thin.format_pool import format_pool
    from dmimage.thin.transaction import open_writable

    say = log or (lambda s: None)
    out = Path(outdir)
    if out.exists() and any(p.name != "lost+found" for p in out.iterdir()):
        raise SpecFileError("", f"{out}: not empty (the data root is built into a new or "
                            "empty directory)")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))
    root = tmp / "root"
    work = tmp / "work"
    work.mkdir()
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    ok = False
    try:
        images = read_inputs(spec.inputs, work / "layers")
        timings["inputs"] = time.monotonic() - t0
        # the layer graph, parents first
        layers: dict[str, tuple[str, str | None]] = {}  # chain -> (diff id, parent chain)
        for inp in images:
            chains = chain_ids(list(inp.diff_ids))
            for i, c in enumerate(chains):
                layers.setdefault(c, (inp.diff_ids[i], chains[i - 1] if i else None))
        children: dict[str | None, int] = {}
        for _d, parent in layers.values():
            children[parent] = children.get(parent, 0) + 1

        dm = root / "devicemapper"
        loop = dm / "devicemapper"
        loop.mkdir(parents=True)
        meta_file, data_file = loop / "metadata", loop / "data"
        with open(data_file, "wb") as f:
            f.truncate(spec.data_size)
        with open(meta_file, "wb") as f:
            f.truncate(spec.metadata_size)
        format_pool(meta_file, BLOCK // 512, spec.data_size // BLOCK)

        dev_json: dict[str, dict[str, Any]] = {}
        imgs: dict[str | None, Path] = {}
        trees: dict[str | None, Tree] = {}
        dev_ids: dict[str | None, int] = {}
        written = 0
        base_uuid = spec.base_uuid
        if spec.fs == "xfs":
            tid, next_id, last_hash, base_uuid, written = _xfs_devices(
                spec, layers, root, work, meta_file, data_file, dev_json, guest, kernel, say)
        else:
            with open_writable(meta_file, data_file) as wp:
                base_img = work / "base.img"
                make_base(base_img, spec.base_size, spec.base_uuid, spec.hash_seed,
                          spec.source_date_epoch)
                w, _ = _blocks_to_write(base_img, None, spec.base_size)
                tid = 1
                wp.create_thin(1)
                wp.commit()
                _write_blocks(wp, 1, base_img, w, np.empty(0, np.int64))
                wp.set_transaction_id(0, tid)
                wp.commit()
                written += len(w)
                dev_json["base"] = _device(1, spec.base_size, tid, initialized=True)
                imgs[None], trees[None], dev_ids[None] = base_img, Tree(), 1
                say(f"base: device 1, {human(spec.base_size)}, {len(w)} blocks")
                next_id = 1
                last_hash = ""
                for chain, (diff_id, parent) in layers.items():
                    h = _hash(spec, chain)
                    next_id += 1
                    tid += 1
                    img = work / f"{chain[7:19]}.img"
                    _copy_sparse(imgs[parent], img)
                    if parent is None:
                        first_layer_setup(img, h, work, spec.source_date_epoch)
                    lw = work / "apply"
                    lw.mkdir(exist_ok=True)
                    lf = layer_file(work / "layers", diff_id)
                    where = f"layer {diff_id}"
                    ts, members, applied = disassemble(str(lf), where)
                    tree = trees[parent].copy()
                    apply_layer(img, lf, members, tree, lw, epoch=spec.source_date_epoch,
                                where=where)
                    fsck(img, where)
                    w, d = _blocks_to_write(img, imgs[parent], spec.base_size)
                    wp.create_snap(next_id, dev_ids[parent])
                    wp.commit()
                    _write_blocks(wp, next_id, img, w, d)
                    wp.set_transaction_id(tid - 1, tid)
                    wp.commit()
                    written += len(w)
                    dev_json[h] = _device(next_id, spec.base_size, tid, initialized=False)
                    _layerdb(root, chain, h, diff_id, parent, applied, ts)
                    imgs[chain], trees[chain], dev_ids[chain] = img, tree, next_id
                    last_hash = h
                    say(f"layer {chain}: device {next_id}, {len(w)} blocks written, "
                        f"{len(d)} discarded, {len(members)} members")
                    # a parent's image is needed until its last child is built
                    children[parent] -= 1
                    if children[parent] == 0 and parent is not None:
                        imgs[parent].unlink()
                    if not children.get(chain):
                        img.unlink()
                    lf.unlink()
        timings["layers"] = time.monotonic() - t0 - sum(timings.values())

        md = dm / "metadata"
        md.mkdir()
        for name, obj in dev_json.items():
            _write(md / name, _go_json(obj))
        _write(md / "deviceset-metadata", _go_json({
            "next_device_id": next_id, "BaseDeviceUUID": base_uuid,
            "BaseDeviceFilesystem": spec.fs}))
        _write(md / "transaction-metadata", _go_json({
            "open_transaction_id": tid, "device_hash": last_hash, "device_id": next_id}))
        idb = root / "image/devicemapper/imagedb"
        repos: dict[str, dict[str, str]] = {}
        for im in images:
            _write(idb / "content/sha256" / im.id[7:], im.config)
            for t in im.tags:
                repos.setdefault(t.rpartition(":")[0], {})[t] = im.id
        (idb / "metadata/sha256").mkdir(parents=True, exist_ok=True)
        _write(root / "image/devicemapper/repositories.json",
               _go_json({"Repositories": repos}))
        (root / "image/devicemapper/layerdb/sha256").mkdir(parents=True, exist_ok=True)
        _self_check(root, images, work)
        timings["verify"] = time.monotonic() - t0 - sum(timings.values())

        manifest = {
            "format": "dmimage-build", "version": 1, "name": spec.name, "layout": LAYOUT,
            "spec": spec.source.name, "base_size": spec.base_size,
            "data_size": spec.data_size, "metadata_size": spec.metadata_size,
            "pool_transaction_id": tid, "data_blocks_written": written,
            "images": [{"id": i.id, "tags": list(i.tags), "layers": list(i.diff_ids)}
                       for i in images],
            "devices": {k: v["device_id"] for k, v in dev_json.items()}}
        (root / "dmimage-build.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for child in sorted(root.iterdir()):
            os.replace(child, out / child.name)
        timings["total"] = time.monotonic() - t0
        ok = True
        return DockerBuild(out, manifest, timings)
    except StoreError as exc:
        raise SpecError("docker.images", str(exc)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created:
            shutil.rmtree(out, ignore_errors=True)


def _device(device_id: int, size: int, tid: int, *, initialized: bool) -> dict[str, Any]:
    """A device's JSON under devicemapper/metadata/ (devmapper's DevInfo, in its order)."""
    return {"device_id": device_id, "size": size, "transaction_id": tid,
            "initialized": initialized, "deleted": False}


def _layerdb(root: Path, chain: str, h: str, diff_id: str, parent: str | None, applied: int,
             ts: bytes) -> None:
    """A layer's layerdb directory: cache-id, diff, parent, size, tar-split.json.gz."""
    ldir = root / "image/devicemapper/layerdb/sha256" / chain[7:]
    _write(ldir / "cache-id", h)
    _write(ldir / "diff", diff_id)
    if parent is not None:
        _write(ldir / "parent", parent)
    _write(ldir / "size", str(applied))
    _write(ldir / "tar-split.json.gz", ts)


def _xfs_devices(spec: DockerSpec, layers: dict[str, tuple[str, str | None]], root: Path,
                 work: Path, meta_file: Path, data_file: Path,
                 dev_json: dict[str, dict[str, Any]], guest: DockerGuest | None, kernel: str,
                 say: Callable[[str], None]) -> tuple[int, int, str, str, int]:
    """The xfs store's devices, written by the kernel in a guest (``docker_xfs``), with the
    same ids, transaction ids and layerdb as the ext4 path. Returns (pool transaction id,
    last device id, last device hash, base device UUID, data blocks used)."""
    from dmimage.docker.inputs import layer_file
    from dmimage.docker.tarsplit import disassemble
    from dmimage.image.docker_xfs import XfsLayer, write_devices
    from dmimage.thin.pool import open_pool

    dev_json["base"] = _device(1, spec.base_size, 1, initialized=True)
    dev_ids: dict[str | None, int] = {None: 1}
    todo: list[XfsLayer] = []
    next_id = tid = 1
    last_hash = ""
    for chain, (diff_id, parent) in layers.items():
        h = _hash(spec, chain)
        next_id += 1
        tid += 1
        lf = layer_file(work / "layers", diff_id)
        ts, members, applied = disassemble(str(lf), f"layer {diff_id}")
        todo.append(XfsLayer(h, next_id, dev_ids[parent], lf, parent is None))
        dev_ids[chain] = next_id
        dev_json[h] = _device(next_id, spec.base_size, tid, initialized=False)
        _layerdb(root, chain, h, diff_id, parent, applied, ts)
        last_hash = h
        say(f"layer {chain}: device {next_id}, {len(members)} members")
    mnt = work / "mnt"
    mnt.mkdir()
    uuid_ = write_devices(meta_file, data_file, spec.data_size, spec.base_size, todo, mnt,
                          base_uuid=spec.base_uuid if spec.base_uuid_given else None,
                          guest=guest, kernel=kernel, log=say)
    with open_pool(meta_file) as pool:
        used = pool.data_space_map().nr_allocated
    for lay in todo:
        lay.tar.unlink()
    return tid, next_id, last_hash, uuid_, used


def _copy_sparse(src: Path, dst: Path) -> None:
    from dmimage.image.sparse import copy_sparse

    size = src.stat().st_size
    with open(dst, "wb") as f:
        f.truncate(size)
    fi = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    fo = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
    try:
        copy_sparse(fi, 0, fo, 0, size)
    finally:
        os.close(fi)
        os.close(fo)


def _self_check(root: Path, images: list[Any], work: Path) -> None:
    """Read the store back: ``check`` clean, and ``docker save`` of every image (layer tars
    rebuilt from tar-split and the thin devices' files) gives the inputs' configs and layer
    digests."""
    import tarfile

    from dmimage.docker.check import check_store
    from dmimage.docker.save import save
    from dmimage.docker.store import open_store
    from dmimage.image.build import BuildError

    store = open_store(root)
    rep = check_store(store)
    if not rep.ok:
        raise BuildError("self-check: " + "; ".join(str(p) for p in rep.problems))
    ids = list(dict.fromkeys(i.id for i in images))
    if not ids:
        return
    out = work / "self-check.tar"
    with open(out, "wb") as f:
        save(store, ids, f)
    with tarfile.open(out) as tar:
        man = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        want = {i.id: i for i in images}
        for ent in man:
            cfg = tar.extractfile(ent["Config"]).read()  # type: ignore[union-attr]
            img = want["sha256:" + hashlib.sha256(cfg).hexdigest()]
            got = []
            for name in ent["Layers"]:
                h = hashlib.sha256()
                member = tar.extractfile(name)
                assert member is not None
                while b := member.read(1 << 20):
                    h.update(b)
                got.append("sha256:" + h.hexdigest())
            if got != list(img.diff_ids):
                raise BuildError(f"self-check: image {img.id} saves with layers {got}, "
                                 f"its inputs are {list(img.diff_ids)}")
    out.unlink()
