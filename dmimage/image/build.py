"""`build(spec, outdir)`: a thin pool with its volumes, as a GPT disk or two files.

Order of work (nothing appears under a final name until everything is done):

1. content: ext4 volumes are made from their directories (:mod:`dmimage.image.ext4`), raw
   volumes read their file; a snapshot without content shows its origin's;
2. pool: ``format_pool`` on a temp metadata file; the data device is the GPT image's data
   partition itself (layout gpt: the image and its partition table are made first) or a temp
   data file. :class:`WritablePool` creates each thin or snapshot and commits, then one pass
   over its content (:mod:`dmimage.image.fill`) plans, writes and hashes it — a volume
   without an origin writes its non-zero blocks, a snapshot (a layer) the blocks that differ
   from its origin's content, and discards blocks that became all zero — and commits; last
   the transaction id. Content that does not fit is a spec error naming the blocks it needs.
   For gpt the metadata file is a work file (its commits flush nothing: step 4 orders the
   image's writes); otherwise every commit flushes the data before the superblock;
3. self-check, on a thread beside step 4 (and 5 for files and lvm): every thin is exported
   offline and compared, byte for byte while streaming, with the content it was built from
   (whose sha256 the pass computed); gpt: the export reads the data partition back from the
   disk (its data was written with O_DIRECT) through :mod:`dmimage.image.readback`, which
   also feeds that one read to the image's sha256 (the metadata file standing in for its
   partition);
4. gpt: the image is flushed, then the metadata is copied into its partition, flushed and
   compared with the file;
5. output: the files' sha256 (files layout), one table per device, activate.sh /
   deactivate.sh and manifest.json, renamed from ``OUTDIR/.tmp-*`` into OUTDIR at the end
   (manifest last), once the self-check has passed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from dmimage.errors import DmimageError, OutputTooSmallError
from dmimage.format.constants import SECTOR_SIZE
from dmimage.image.fill import Content as _Content
from dmimage.image.fill import fill_volume, read_into
from dmimage.image.readback import ReadBack
from dmimage.image.spec import Ext4Content, RawContent, Spec, SpecError, Volume, human
from dmimage.image.writeback import every
from dmimage.pdata.cow import OutOfSpaceError
from dmimage.thin.export import export_thin  # at import: _self_check runs on a worker thread
from dmimage.thin.pool import Pool

READ_BLOCKS_BYTES = 8 << 20
Progress = Callable[[int], None]


class BuildError(DmimageError):
    """The build's own self-check failed (a bug, not bad input)."""

    exit_code = 1


@dataclass
class _Plan:
    volume: Volume
    content: _Content
    writes: np.ndarray  # block indices written
    discards: np.ndarray  # block indices unmapped (became all zero)
    sha256: str = ""  # of the intended content over the volume size


@dataclass
class BuildReport:
    outdir: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _chunks(c: _Content, size: int, bs: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first block, array of shape (k, bs)) over the volume's first *size* bytes."""
    per = max(1, READ_BLOCKS_BYTES // bs)
    nblocks = -(-size // bs)
    f = open(c.path, "rb") if c.path is not None else None  # noqa: SIM115
    try:
        for first in range(0, nblocks, per):
            k = min(per, nblocks - first)
            buf = np.zeros(k * bs, np.uint8)
            off = first * bs
            if f is not None and off < c.length:
                n = min(k * bs, c.length - off)
                f.seek(off)
                raw = f.read(n)
                buf[:len(raw)] = np.frombuffer(raw, np.uint8)
            end = min(k * bs, size - off)
            if end < k * bs:
                buf[end:] = 0  # the tail of a partial last block is not part of the volume
            yield first, buf.reshape(k, bs)
    finally:
        if f is not None:
            f.close()


def _sha_of(c: _Content, size: int) -> str:
    h = hashlib.sha256()
    pos = 0
    if c.path is not None:
        with open(c.path, "rb") as f:
            while pos < min(c.length, size):
                b = f.read(min(4 << 20, min(c.length, size) - pos))
                if not b:
                    break
                h.update(b)
                pos += len(b)
    zero = bytes(1 << 20)
    while pos < size:
        n = min(len(zero), size - pos)
        h.update(zero[:n])
        pos += n
    return h.hexdigest()


def _needed_blocks(v: Volume, c: _Content, base: _Content | None, bs: int) -> int:
    """Data blocks the volume's content needs (counted again only to word a pool that is
    too small: the pass that writes stops at the first block that does not fit)."""
    n = 0
    if base is None:
        for _first, a in _chunks(c, v.size, bs):
            n += int(a.any(axis=1).sum())
    else:
        for (_first, a), (_, b) in zip(_chunks(c, v.size, bs), _chunks(base, v.size, bs),
                                       strict=True):
            n += int(((a != b).any(axis=1) & a.any(axis=1)).sum())
    return n


class _Cancelled(Exception):
    """The build stopped (an error or an interrupt elsewhere): the self-check gives up."""


class _CompareSink:
    """An export target that compares what it is given with the volume's content (the
    content's sha256 is known from the pass that wrote it: comparing bytes spares a second
    hash pass). ``mismatch`` is the first differing byte offset, or None. ``cancel``, once
    set, stops the export at its next write. The content is read into one reused buffer and
    compared a machine word at a time (numpy)."""

    def __init__(self, c: _Content, cancel: threading.Event | None = None) -> None:
        self.c = c
        self.fd = os.open(c.path, os.O_RDONLY | os.O_CLOEXEC) if c.path is not None else None
        self.pos = 0
        self.mismatch: int | None = None
        self.cancel = cancel
        self._buf = np.empty(0, np.uint8)

    def write(self, b: bytes | memoryview) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled
        n = len(b)
        if self.mismatch is None:
            got = np.frombuffer(b, np.uint8)
            want = self._content(self.pos, n)
            if not _equal(got, want):
                self.mismatch = self.pos + int(np.flatnonzero(got != want)[0])
        self.pos += n
        return n

    def _content(self, off: int, n: int) -> np.ndarray:
        if len(self._buf) < n:
            self._buf = np.empty(n, np.uint8)
        out = self._buf[:n]
        read_into(self.fd, self.c.length, off, out)
        return out

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte arrays of one length equal, compared 8 bytes at a time where they can be."""
    n = len(a) // 8 * 8
    return bool((a[:n].view(np.uint64) == b[:n].view(np.uint64)).all()
                and (a[n:] == b[n:]).all())


class _DataDevice:
    """The pool's data device as a byte range of a file (the image's data partition, or the
    whole data file): what ``export_thin`` reads the self-check from. The file (the build's
    own temp file) is mapped read-only and a read is a view of the mapping, not a copy: the
    export hands each one to its sink before it reads on."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        self.name = str(path)
        self.start, self.size = start, size
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            total = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, total, prot=mmap.PROT_READ) if total else None
        finally:
            os.close(fd)
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def pread(self, n: int, off: int) -> bytes:
        a = min(self.start + max(0, off), len(self._view))
        z = min(a + n, self.start + self.size, len(self._view))
        return cast(bytes, self._view[a:max(a, z)])  # a view: bytes to the export's eyes

    def close(self) -> None:
        try:
            self._view.release()
            if self._map is not None:
                self._map.close()
        except BufferError:  # a view still referenced somewhere: the collector unmaps it
            pass


def _self_check(pool: Pool, data: _DataDevice | ReadBack, plans: list[_Plan],
                cancel: threading.Event) -> None:
    """Every thin exported offline equals its content, byte for byte (BuildError if not)."""
    for p in plans:
        v = p.volume
        sink = _CompareSink(p.content, cancel)
        try:
            export_thin(pool, data, v.id, sink, size=v.size)
        finally:
            sink.close()
        if sink.mismatch is not None or sink.pos != v.size:
            where = sink.mismatch if sink.mismatch is not None else sink.pos
            raise BuildError(f"self-check: thin {v.id} ({v.name}) exports bytes "
                             f"that differ from its content at byte {where}")


def _make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _replace_into(tmp: Path, outdir: Path, names: list[str]) -> None:
    for n in names:
        os.replace(tmp / n, outdir / n)


@dataclass
class _DataTarget:
    """Where the pool's data device is written: ``path`` from byte ``start``."""

    path: Path
    start: int
    image: Any = None  # gpt: the Layout of the image at ``path``


def _data_target(spec: Spec, tmp: Path) -> _DataTarget:
    """gpt: the image with its partition table, its data partition the data device (the data
    is written once, in place); otherwise a temp data file."""
    from dmimage.image.gpt import create_gpt, plan_layout

    ps = spec.pool
    if spec.layout != "gpt":
        data_tmp = tmp / "data.bin"
        _make_file(data_tmp, ps.data_size)
        return _DataTarget(data_tmp, 0)
    layout = plan_layout(ps.metadata_size, ps.data_size, spec.image_size)
    img = tmp / f"{spec.name}.img"
    _make_file(img, layout.disk_bytes)
    create_gpt(str(img), layout, [(_part_name(spec, "metadata"), spec.uuid5("partition:metadata")),
                                  (_part_name(spec, "data"), spec.uuid5("partition:data"))],
               spec.uuid5("disk"))
    return _DataTarget(img, layout.data_start, layout)


def _part_name(spec: Spec, role: str) -> str:
    return f"{spec.name}-{role}"[:36]


def build(spec: Spec, outdir: str | os.PathLike[str], *, progress: Progress | None = None,
          log: Callable[[str], None] | None = None,
          progress_total: Progress | None = None) -> BuildReport:
    """Build *spec* into *outdir*; returns the manifest. See the module docstring.

    ``progress(n)`` is told of every n bytes of content the pass has written; ``progress_total``
    of the bytes it will go through."""
    from dmimage.image.ext4 import make_ext4
    from dmimage.thin.pool import open_pool

    say = log or (lambda s: None)
    out = Path(outdir)
    created_outdir = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from dmimage.errors import DeviceError

        raise DeviceError(f"{out}: {exc.strerror}") from None
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    ok = False
    cancel = threading.Event()
    checking: Future[Any] | None = None
    data: _DataDevice | ReadBack | None = None
    pool: Pool | None = None
    try:
        pool_spec = spec.pool
        # 1. content --------------------------------------------------------------------
        contents: dict[str, _Content] = {}
        own: dict[str, bool] = {}
        for v in spec.volumes:
            c = v.content
            if isinstance(c, Ext4Content):
                img = tmp / f"content-{v.name}.ext4"
                files = make_ext4(c, v.size, img, tmp, spec.source_date_epoch)
                contents[v.name] = _Content(img, v.size, files)
            elif isinstance(c, RawContent):
                contents[v.name] = _Content(c.file, c.size)
            elif v.origin is not None:
                contents[v.name] = contents[v.origin]
            else:
                contents[v.name] = _Content(None, 0)
            own[v.name] = c is not None
        for lv in spec.linear:  # linear LVs (layout = "lvm"): content as for thins
            c = lv.content
            if isinstance(c, Ext4Content):
                img = tmp / f"content-{lv.name}.ext4"
                files = make_ext4(c, lv.size, img, tmp, spec.source_date_epoch)
                contents[lv.name] = _Content(img, lv.size, files)
            elif isinstance(c, RawContent):
                contents[lv.name] = _Content(c.file, c.size)
            else:
                contents[lv.name] = _Content(None, 0)
        timings["content"] = time.monotonic() - t0
        # 2. pool: one pass per volume plans, writes and hashes its content ---------------
        if progress_total is not None:
            progress_total(sum(v.size for v in spec.volumes if own[v.name]))
        meta_tmp = tmp / "metadata.bin"
        _make_file(meta_tmp, pool_spec.metadata_size)
        target = _data_target(spec, tmp)
        try:
            plans = _fill_pool(spec, contents, own, meta_tmp, target, progress, say)
        except (OutOfSpaceError, OutputTooSmallError) as exc:
            raise _too_small(spec, contents, own, exc) from None
        timings["pool"] = time.monotonic() - t0 - sum(timings.values())
        # 3. self-check on a thread, beside 4 and 5 (files opened here: 5 may rename them) -
        pool = open_pool(meta_tmp)
        details = pool.devices()
        data_used = pool.data_space_map().nr_allocated
        meta_used = pool.metadata_space_map().nr_allocated
        devices = [(p.volume, p, details[p.volume.id].mapped_blocks, p.sha256) for p in plans]
        checker = ThreadPoolExecutor(1, thread_name_prefix="self-check")
        image_sha = ""
        if target.image is not None:
            # 3+4. gpt: the self-check's export and the image's sha256 share one read of the
            # data partition (written with O_DIRECT: not in the page cache); meanwhile the
            # data is flushed, then the metadata goes into its partition
            h = hashlib.sha256()
            data = _image_read_back(h, meta_tmp, target, cancel)
            checking = checker.submit(_self_check_and_hash, pool, data, plans, cancel, h,
                                      target)
            checker.shutdown(wait=False)
            _finish_image(meta_tmp, target)
            t_out = time.monotonic()
            image_sha = checking.result()
            timings["verify"] = time.monotonic() - t_out  # the wait after step 4
        else:
            data = _DataDevice(target.path, target.start, pool_spec.data_size)
            checking = checker.submit(_self_check, pool, data, plans, cancel)
            checker.shutdown(wait=False)
        # 5. outputs ---------------------------------------------------------------------
        linear = [(lv, contents[lv.name], _sha_of(contents[lv.name], lv.size))
                  for lv in spec.linear]
        manifest = _outputs(spec, tmp, meta_tmp, target, devices, data_used, meta_used,
                            linear, image_sha)
        t_out = time.monotonic()
        checking.result()
        timings["verify"] = timings.get("verify", 0.0) + time.monotonic() - t_out
        finals = manifest["_files"]
        del manifest["_files"]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_into(tmp, out, finals + ["manifest.json"])
        timings["output"] = time.monotonic() - t0 - sum(timings.values())
        timings["total"] = time.monotonic() - t0
        ok = True
        return BuildReport(out, manifest, timings)
    finally:
        if checking is not None and not ok:
            cancel.set()
            try:
                checking.result()
            except BaseException:  # noqa: S110 - already failing: that error is the one reported
                pass
        if pool is not None:
            pool.close()
        if data is not None:
            data.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created_outdir:
            try:
                out.rmdir()
            except OSError:
                pass


def _too_small(spec: Spec, contents: dict[str, _Content], own: dict[str, bool],
               exc: Exception) -> SpecError:
    """The spec error for a pool that ran out of space: the data blocks the content needs
    when the data device is short of them, else the device that filled up."""
    ps = spec.pool
    bs = ps.data_block_size
    needed = sum(_needed_blocks(v, contents[v.name],
                                contents[v.origin] if v.origin is not None else None, bs)
                 for v in spec.volumes if own[v.name])
    if needed > ps.nr_data_blocks:
        return SpecError("pool.data_size", f"{human(ps.data_size)} ({ps.nr_data_blocks} "
                         f"blocks of {human(bs)}) does not fit the content: {needed} data "
                         f"blocks are needed ({human(needed * bs)})")
    if str(exc).startswith("data space map"):
        return SpecError("pool.data_size", f"{human(ps.data_size)} is too small: {exc}")
    return SpecError("pool.metadata_size", f"{human(ps.metadata_size)} is too small: {exc}")


def _image_read_back(h: Any, meta_tmp: Path, target: _DataTarget,
                     cancel: threading.Event) -> ReadBack:
    """``h`` fed the image's bytes before its data partition (the metadata file in place of
    the metadata partition, compared with it once copied: the hash is the final image's);
    the data partition's read-back, which feeds ``h`` the partition as the self-check reads
    it (:mod:`dmimage.image.readback`), stopped by ``cancel``."""
    layout = target.image
    meta_end = layout.meta_start + layout.meta_size
    _hash_parts(h, [(target.path, 0, layout.meta_start), (meta_tmp, 0, layout.meta_size),
                    (target.path, meta_end, layout.data_start - meta_end)])
    return ReadBack(target.path, layout.data_start, layout.data_size, h.update, cancel)


def _self_check_and_hash(pool: Pool, data: ReadBack, plans: list[_Plan],
                         cancel: threading.Event, h: Any, target: _DataTarget) -> str:
    """The self-check through the read-back, then the rest of the data partition and the
    image's end fed to ``h``; returns the image's sha256."""
    _self_check(pool, data, plans, cancel)
    data.finish()
    layout = target.image
    data_end = layout.data_start + layout.data_size
    _hash_parts(h, [(target.path, data_end, layout.disk_bytes - data_end)])
    return cast(str, h.hexdigest())


def _finish_image(meta_tmp: Path, target: _DataTarget) -> None:
    """The data partition flushed, then the metadata copied into its partition and
    flushed: the image's superblock reaches the disk after its data."""
    layout = target.image
    _fsync_path(target.path)
    _copy_metadata(meta_tmp, target)
    if not _same_bytes(target.path, layout.meta_start, meta_tmp, 0, layout.meta_size):
        raise BuildError(f"self-check: the metadata partition of {target.path.name} differs "
                         "from the metadata written")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_metadata(meta_tmp: Path, target: _DataTarget) -> None:
    """The metadata file into the image's first partition, sparsely, then flushed (the data
    partition was flushed before: :func:`_finish_image`)."""
    from dmimage.image.sparse import copy_sparse

    layout = target.image
    fd = os.open(target.path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        sfd = os.open(meta_tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            copy_sparse(sfd, 0, fd, layout.meta_start, layout.meta_size)
        finally:
            os.close(sfd)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill_pool(spec: Spec, contents: dict[str, _Content], own: dict[str, bool],
               meta_tmp: Path, target: _DataTarget, progress: Progress | None,
               say: Callable[[str], None]) -> list[_Plan]:
    """format_pool, then every thin/snapshot, its content written in one pass
    (:func:`dmimage.image.fill.fill_volume`), one commit each; the plans it carried out."""
    from dmimage.thin.format_pool import format_pool
    from dmimage.thin.transaction import open_writable

    pool_spec = spec.pool
    format_pool(meta_tmp, pool_spec.block_sectors, pool_spec.nr_data_blocks)
    ids = {v.name: v.id for v in spec.volumes}
    plans: list[_Plan] = []
    shas: dict[tuple[int, int], str] = {}  # (id of a content, size) -> its sha256
    empty = np.empty(0, np.int64)
    kick = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)  # write-back started early
    progress = every(kick, progress)
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, kick)
        gpt = target.image is not None
        wp = stack.enter_context(open_writable(meta_tmp, target.path, data_offset=target.start,
                                               scratch=gpt, direct=gpt))
        for v in spec.volumes:
            vc = contents[v.name]
            if v.origin is None:
                wp.create_thin(v.id)
            else:
                wp.create_snap(v.id, ids[v.origin])
            wp.commit()
            if own[v.name]:
                base = contents[v.origin] if v.origin is not None else None
                done = fill_volume(wp, v.id, v.size, vc, base, progress)
                p = _Plan(v, vc, done.writes, done.discards, done.sha256)
                wp.commit()
            else:
                sha = shas.get((id(vc), v.size)) or _sha_of(vc, v.size)
                p = _Plan(v, vc, empty, empty, sha)
            shas[(id(vc), v.size)] = p.sha256
            plans.append(p)
            say(f"{v.dm_name}: id {v.id}, {human(v.size)}"
                + (f", snapshot of {v.origin}" if v.origin else "")
                + f", {len(p.writes)} blocks written"
                + (f", {len(p.discards)} discarded" if len(p.discards) else ""))
        if pool_spec.transaction_id != wp.trans_id:
            wp.set_transaction_id(wp.trans_id, pool_spec.transaction_id)
            wp.commit()
    return plans


def _outputs(spec: Spec, tmp: Path, meta_tmp: Path, target: _DataTarget, devices: list[Any],
             data_used: int, meta_used: int,
             linear: list[tuple[Any, _Content, str]] | None = None,
             image_sha: str = "") -> dict[str, Any]:
    from dmimage.image.scripts import activation_script, deactivation_script
    from dmimage.table import DmDevice, Entry, Table, Thin, ThinPool, dm_mod_create, format_table
    from dmimage.table.errors import TableError

    ps = spec.pool
    files: list[str] = []
    m: dict[str, Any] = {"format": "dmimage-build", "version": 1, "name": spec.name,
                         "spec": spec.source.name, "layout": spec.layout}
    if spec.layout == "lvm":
        from dmimage.image.lvm_image import write_lvm_image

        m.update(write_lvm_image(spec, tmp, meta_tmp, target.path, devices,
                                 [(lv, c.path, c.length, sha) for lv, c, sha in linear or []]))
        return m
    if spec.layout == "gpt":
        layout = target.image  # made, filled and flushed by then (build steps 2 and 3)
        meta_uuid, data_uuid = spec.uuid5("partition:metadata"), spec.uuid5("partition:data")
        disk_guid = spec.uuid5("disk")
        img = target.path
        img_name = img.name
        meta_pname, data_pname = _part_name(spec, "metadata"), _part_name(spec, "data")
        files.append(img_name)
        meta_ref = f"/dev/disk/by-partuuid/{meta_uuid}"
        data_ref = f"/dev/disk/by-partuuid/{data_uuid}"
        m["image"] = {"file": img_name, "size": layout.disk_bytes, "disk_guid": str(disk_guid),
                      "sha256": image_sha or _file_sha(img)}
        m["partitions"] = [
            {"number": 1, "role": "metadata", "name": meta_pname, "partuuid": str(meta_uuid),
             "start": layout.meta_start, "size": layout.meta_size},
            {"number": 2, "role": "data", "name": data_pname, "partuuid": str(data_uuid),
             "start": layout.data_start, "size": layout.data_size}]
        meta_file = data_file = ""
    else:
        meta_file, data_file = f"{spec.name}.meta", f"{spec.name}.data"
        os.replace(meta_tmp, tmp / meta_file)
        os.replace(target.path, tmp / data_file)
        files += [meta_file, data_file]
        meta_ref, data_ref = "METADATA_DEV", "DATA_DEV"
        m["files"] = {"metadata": {"file": meta_file, "size": ps.metadata_size,
                                   "sha256": _file_sha(tmp / meta_file)},
                      "data": {"file": data_file, "size": ps.data_size,
                               "sha256": _file_sha(tmp / data_file)}}
        meta_uuid = data_uuid = None  # type: ignore[assignment]

    pool_sectors = ps.nr_data_blocks * ps.block_sectors
    pool_target = ThinPool(meta_ref, data_ref, ps.block_sectors, ps.low_water_mark,
                           frozenset(ps.features))
    pool_table = Table((Entry(0, pool_sectors, pool_target),))
    pool_table.validate({meta_ref: ps.metadata_size // SECTOR_SIZE,
                         data_ref: ps.data_size // SECTOR_SIZE})
    ro_table = None
    if len(ps.features) < 4:
        ro_table = format_table(Table((Entry(0, pool_sectors, ThinPool(
            meta_ref, data_ref, ps.block_sectors, ps.low_water_mark,
            frozenset(ps.features) | {"read_only"})),)))
    pool_dev = f"/dev/mapper/{ps.name}"
    tables: dict[str, str] = {ps.name: format_table(pool_table)}
    thin_tables: list[tuple[str, str]] = []
    dm_devices = []
    for v, _p, _mapped, _sha in devices:
        t = Table((Entry(0, v.size // SECTOR_SIZE, Thin(pool_dev, v.id)),))
        t.validate()
        tables[v.dm_name] = format_table(t)
        thin_tables.append((v.dm_name, tables[v.dm_name]))
        dm_devices.append(DmDevice(v.dm_name, t))
    for dm, text in tables.items():
        (tmp / f"{dm}.table").write_text(text)
        files.append(f"{dm}.table")
    try:
        value: str | None = dm_mod_create([DmDevice(ps.name, pool_table), *dm_devices])
        note = None
    except TableError as exc:
        value = None
        note = (f"not expressible: {exc}. The kernel's dm-init (dm-mod.create=) refuses "
                "thin and thin-pool targets, so these devices must be created by dmsetup "
                "(activate.sh), e.g. from an initramfs.")
    act = activation_script(name=spec.name, layout=spec.layout, pool=ps.name,
                            pool_table=tables[ps.name], pool_table_ro=ro_table,
                            thins=thin_tables, meta_ref=meta_ref, data_ref=data_ref,
                            meta_uuid=meta_uuid, data_uuid=data_uuid, meta_file=meta_file,
                            data_file=data_file)
    deact = deactivation_script(name=spec.name, layout=spec.layout, pool=ps.name,
                                thins=[d for d, _ in thin_tables], meta_file=meta_file,
                                data_file=data_file)
    for n, text in (("activate.sh", act), ("deactivate.sh", deact)):
        (tmp / n).write_text(text)
        os.chmod(tmp / n, 0o755)
        files.append(n)
    bs = ps.data_block_size
    m["pool"] = {
        "name": ps.name, "table": f"{ps.name}.table", "data_block_size": ps.block_sectors,
        "data_block_bytes": bs, "nr_data_blocks": ps.nr_data_blocks,
        "data_size": ps.data_size, "metadata_size": ps.metadata_size,
        "transaction_id": ps.transaction_id, "features": ps.features,
        "low_water_mark": ps.low_water_mark, "data_blocks_used": data_used,
        "metadata_blocks_used": meta_used,
        "metadata_dev": meta_ref, "data_dev": data_ref}
    vols = []
    for v, p, mapped, sha in devices:
        d: dict[str, Any] = {
            "name": v.name, "dm_name": v.dm_name, "id": v.id, "size": v.size,
            "sectors": v.size // SECTOR_SIZE, "origin": v.origin,
            "table": f"{v.dm_name}.table", "sha256": sha, "mapped_blocks": mapped,
            "blocks_written": int(len(p.writes)), "blocks_discarded": int(len(p.discards))}
        c = v.content
        if isinstance(c, Ext4Content):
            d["content"] = {"type": "ext4", "uuid": c.uuid, "label": c.label,
                            "dirs": [str(x.relative_to(spec.source.parent))
                                     if x.is_relative_to(spec.source.parent) else str(x)
                                     for x in c.dirs],
                            "files": [f.to_json() for f in p.content.files or []]}
        elif isinstance(c, RawContent):
            d["content"] = {"type": "raw", "file": c.file.name, "size": c.size}
        else:
            d["content"] = {"type": "origin" if v.origin else "empty"}
            if v.origin and p.content.files is not None:
                d["content"]["files"] = [f.to_json() for f in p.content.files]
                d["content"]["type"] = "ext4"
                d["content"]["inherited"] = True
        vols.append(d)
    m["devices"] = vols
    m["activate"] = "activate.sh"
    m["deactivate"] = "deactivate.sh"
    m["dm_mod_create"] = value
    m["dm_mod_create_note"] = note
    m["_files"] = files
    return m


def _file_sha(path: Path) -> str:
    """sha256 of a (sparse) file (see :func:`_sha_of_parts`)."""
    return _sha_of_parts([(path, 0, os.stat(path).st_size)])


def _sha_of_parts(parts: list[tuple[Path, int, int]]) -> str:
    """sha256 of the bytes [offset, offset+length) of each (file, offset, length) in turn."""
    h = hashlib.sha256()
    _hash_parts(h, parts)
    return h.hexdigest()


def _hash_parts(h: Any, parts: list[tuple[Path, int, int]]) -> None:
    """Feed ``h`` the bytes [offset, offset+length) of each (file, offset, length) in turn.
    Holes are hashed as zeros without being read; data is hashed from a read-only mapping of
    the file (no copy into a buffer first)."""
    from dmimage.extents import data_ranges

    zero = memoryview(bytes(1 << 20))
    step = 16 << 20

    def zeros(n: int) -> None:
        while n > 0:
            k = min(n, len(zero))
            h.update(zero[:k])
            n -= k

    for path, start, length in parts:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            end = min(start + length, size)
            pos = start
            if end > start:
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                    view = memoryview(m)
                    try:
                        for off, n in data_ranges(fd, start, end - start):
                            zeros(off - pos)
                            for at in range(off, off + n, step):
                                h.update(view[at:min(at + step, off + n)])
                            pos = off + n
                    finally:
                        view.release()
            zeros(start + length - pos)
        finally:
            os.close(fd)


def _same_bytes(a: Path, a_off: int, b: Path, b_off: int, length: int) -> bool:
    """Whether two byte ranges of two (sparse) files are equal: only their data is read."""
    from dmimage.extents import data_ranges

    fa = os.open(a, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fb = os.open(b, os.O_RDONLY | os.O_CLOEXEC)
        try:
            spans = [(off - a_off, n) for off, n in data_ranges(fa, a_off, length)]
            spans += [(off - b_off, n) for off, n in data_ranges(fb, b_off, length)]
            for rel, n in sorted(spans):
                for at in range(rel, rel + n, 4 << 20):
                    k = min(4 << 20, rel + n - at)
                    x, y = os.pread(fa, k, a_off + at), os.pread(fb, k, b_off + at)
                    if x.ljust(k, b"\0") != y.ljust(k, b"\0"):
                        return False
        finally:
            os.close(fb)
    finally:
        os.close(fa)
    return True
