"""Shared scenario helpers: drive a thin pool in the guest with dmsetup, mirror every operation
in the reference model (`dmimage.thin.model.PoolModel`), and compare the kernel's view, the
model and dmimage's offline view.

    files = make_pool_files(tmp, meta_bytes=4 << 20, nr_data_blocks=256, block_sectors=128)
    pattern = make_pattern(tmp / "pattern.bin", seed)
    with PoolSession(vm, files, pattern) as s:
        s.create_thin(1); s.write(1, 4096, 10000, pat_offset=123); s.create_snap(2, 1)
        s.check_status()
        hashes = s.hashes()
    verify_offline(files, s.model, hashes, status=s.last_status, tools11=...)

Writes copy bytes from a host-made *pattern disk* (attached read-only) with ``dd``: the
content is random yet known on the host, and no data crosses the agent channel.
Random operation sequences (`random_ops`) are reproducible from a seed; apply them with
`apply_op` to a `PoolSession` (the kernel) or an `OfflineSession` (dmimage's WritablePool).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import random
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from dmimage.guest.dmstatus import PoolStatus, ThinStatus, parse_pool_status, parse_thin_status
from dmimage.guest.errors import GuestCommandError
from dmimage.guest.machine import Disk, Machine
from dmimage.thin.model import PoolModel

import oracles
import semantic

SECTOR = 512
META_BLOCK = 4096
#: The kernel keeps back min(4096, nr_blocks // 10) metadata blocks (`__set_metadata_reserve`
#: in dm-thin-metadata.c) and reports them as used in the pool's status line.
MAX_METADATA_RESERVE = 4096
#: THIN_METADATA_MAX_SECTORS (dm-thin-metadata.h): 255 * (1 << 14) * 8 sectors.
MAX_METADATA_BLOCKS = 255 * (1 << 14) * 8 // 8


def metadata_reserve(nr_metadata_blocks: int) -> int:
    return min(MAX_METADATA_RESERVE, nr_metadata_blocks // 10)


# --------------------------------------------------------------------------------------------
# The model, with what the kernel does beyond PoolModel


#: The reference model already follows the kernel's sharing and metadata-snapshot rules.
KernelModel = PoolModel


# --------------------------------------------------------------------------------------------
# Host files


@dataclass
class PoolFiles:
    meta: Path
    data: Path
    block_sectors: int
    nr_data_blocks: int

    @property
    def block_bytes(self) -> int:
        return self.block_sectors * SECTOR

    @property
    def data_sectors(self) -> int:
        return self.nr_data_blocks * self.block_sectors

    @property
    def nr_metadata_blocks(self) -> int:
        return min(self.meta.stat().st_size // META_BLOCK, MAX_METADATA_BLOCKS)


def make_pool_files(directory: Path, *, meta_bytes: int = 4 << 20, nr_data_blocks: int = 256,
                    block_sectors: int = 128, name: str = "pool") -> PoolFiles:
    """Sparse, all-zero metadata and data files (the kernel formats zeroed metadata)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta, data = directory / f"{name}.meta", directory / f"{name}.data"
    for path, size in ((meta, meta_bytes), (data, nr_data_blocks * block_sectors * SECTOR)):
        with open(path, "wb") as f:
            f.truncate(size)
    return PoolFiles(meta, data, block_sectors, nr_data_blocks)


def make_pattern(path: Path, seed: int, size: int = 2 << 20) -> bytes:
    """A file of *size* pseudo-random bytes from *seed* (numpy PCG64: reproducible)."""
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------------------------
# Operations


@dataclass(frozen=True)
class Op:
    kind: str  # create_thin create_snap delete write discard set_transaction_id reserve release
    args: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(map(str, self.args))})"


@dataclass
class OpLimits:
    max_devices: int = 5
    dev_ids: int = 12  # ids drawn from 0..dev_ids-1
    vblocks: int = 16  # each thin's size in data blocks
    max_write_blocks: float = 2.5  # longest write, in blocks


def random_ops(rng: random.Random, model: PoolModel, n: int, *, limits: OpLimits | None = None,
               pattern_size: int = 2 << 20, held: bool = False,
               kinds: dict[str, int] | None = None) -> Iterator[Op]:
    """Yield *n* valid operations for the model's current state; the caller applies each one
    (to the model too) before asking for the next."""
    lim = limits or OpLimits()
    weights = kinds or {"create_thin": 3, "create_snap": 3, "delete": 1, "write": 8,
                        "discard": 2, "set_transaction_id": 1, "reserve": 1, "release": 1}
    bs = model.block_size
    size = lim.vblocks * bs
    for _ in range(n):
        devs = sorted(model.devices)
        free = [d for d in range(lim.dev_ids) if d not in model.devices]
        ok = dict(weights)
        if not devs:
            ok = {"create_thin": 1}
        if len(devs) >= lim.max_devices:
            ok.pop("create_thin", None)
            ok.pop("create_snap", None)
        if held:
            ok.pop("reserve", None)
        else:
            ok.pop("release", None)
        kind = rng.choices(list(ok), weights=list(ok.values()))[0]
        if kind == "create_thin":
            yield Op(kind, (rng.choice(free),))
        elif kind == "create_snap":
            yield Op(kind, (rng.choice(free), rng.choice(devs)))
        elif kind == "delete":
            yield Op(kind, (rng.choice(devs),))
        elif kind == "write":
            longest = int(lim.max_write_blocks * bs)
            length = rng.choice([rng.randint(1, 4096), rng.randint(1, longest), bs,
                                 512 * rng.randint(1, 16)])
            if rng.random() < 0.5:  # block- or sector-aligned start
                offset = rng.randrange(0, size - length + 1, 512 if rng.random() < 0.5 else bs)
            else:
                offset = rng.randrange(0, size - length + 1)
            dev = rng.choice(devs)
            yield Op(kind, (dev, offset, length, rng.randrange(0, pattern_size - length)))
        elif kind == "discard":
            # sector-granular (blkdiscard needs 512-byte alignment); may cover partial blocks
            start = rng.randrange(0, size // 512) * 512
            length = rng.randint(1, min(3 * bs, size - start) // 512) * 512
            yield Op(kind, (rng.choice(devs), start, length))
        elif kind == "set_transaction_id":
            yield Op(kind, (model.trans_id, model.trans_id + rng.randint(1, 3)))
        elif kind == "reserve":
            held = True
            yield Op(kind)
        elif kind == "release":
            held = False
            yield Op(kind)


def apply_op(session: PoolSession | OfflineSession, op: Op) -> None:
    """Apply *op* to the session (which mirrors it into its model)."""
    a = op.args
    if op.kind == "create_thin":
        session.create_thin(a[0])
    elif op.kind == "create_snap":
        session.create_snap(a[0], a[1])
    elif op.kind == "delete":
        session.delete(a[0])
    elif op.kind == "write":
        session.write(a[0], a[1], a[2], pat_offset=a[3])
    elif op.kind == "discard":
        session.discard(a[0], a[1], a[2])
    elif op.kind == "set_transaction_id":
        session.set_transaction_id(a[0], a[1])
    elif op.kind == "reserve":
        session.reserve_metadata_snap()
    elif op.kind == "release":
        session.release_metadata_snap()
    else:
        raise ValueError(op.kind)


# --------------------------------------------------------------------------------------------
# The kernel side


def after_queued(queued: list[tuple[str, float]], cmd: str, timeout: float
                 ) -> tuple[str, float]:
    """One guest script: the *queued* ``(command, timeout)`` pairs, run for their effect, then
    *cmd*; and its timeout. Each queued command runs in a subshell (one may ``exit``) with its
    output dropped; the first that fails stops the script and names its index on stderr
    (:func:`run_after_queued` names the command: its text crosses the serial line once, at
    ~30 us of TCG CPU a byte)."""
    lines = [f"( {c}\n) >/dev/null || {{ echo 'queued command {i} failed' >&2; exit 1; }}"
             for i, (c, _) in enumerate(queued)]
    return "\n".join([*lines, cmd]), timeout + sum(t for _, t in queued)


def run_after_queued(vm: Machine, queued: list[tuple[str, float]], cmd: str,
                     timeout: float) -> str:
    """:func:`after_queued` run in *vm*: stdout of *cmd*; a failing queued command raises
    ``GuestCommandError`` whose stderr names it (``queued command I failed: TEXT``)."""
    script, total = after_queued(queued, cmd, timeout)
    res = vm.run(script, timeout=total)
    if not res.ok:
        def name(m: re.Match[bytes]) -> bytes:
            return m[0] + b": " + queued[int(m[1])][0].encode()

        err = re.sub(rb"queued command (\d+) failed$", name, res.stderr, flags=re.M)
        raise GuestCommandError(dataclasses.replace(res, stderr=err))
    return res.out


class UnexpectedPoolStatus(AssertionError):
    pass


def check_healthy(st: PoolStatus, expect_mode: str = "rw") -> None:
    """Fail on a pool status the scenario did not ask for (Fail, needs_check, other mode)."""
    if st.failed:
        raise UnexpectedPoolStatus("pool status is Fail")
    if st.needs_check:
        raise UnexpectedPoolStatus(f"pool needs_check: {st}")
    if st.mode != expect_mode:
        raise UnexpectedPoolStatus(f"pool mode {st.mode!r}, expected {expect_mode!r}: {st}")


class PoolSession:
    """A pool activated in the guest, its thins, and the model mirroring it."""

    def __init__(self, vm: Machine, files: PoolFiles, pattern: tuple[Path, bytes] | None = None,
                 *, model: PoolModel | None = None, name: str = "pool", vblocks: int = 16,
                 read_only: bool = False, held: bool = False) -> None:
        self.vm = vm
        self.files = files
        self.pattern_path: Path | None = pattern[0] if pattern else None
        self.pattern = pattern[1] if pattern else b""
        self.model = model if model is not None else KernelModel(files.block_bytes)
        self.name = name
        self.vblocks = vblocks
        self.read_only = read_only
        self.held = held
        self.active: dict[int, int] = {}  # dev -> size in sectors
        self.log: list[str] = []
        self.last_status: PoolStatus | None = None
        self.meta_disk: Disk | None = None
        self.data_disk: Disk | None = None
        self.pat_disk: Disk | None = None
        self.pool_active = False
        #: Commands queued by :meth:`do` inside :meth:`batched` (with their timeouts).
        self._queue: list[tuple[str, float]] | None = None

    # -- lifetime ----------------------------------------------------------------------------
    def __enter__(self) -> PoolSession:
        self.attach()
        try:
            self.activate()
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.teardown()
        else:  # best effort; the plugin guard clears what is left
            try:
                self.teardown()
            except Exception:
                pass

    def attach(self) -> None:
        ro = self.read_only
        paths = [self.files.meta, self.files.data]
        if self.pattern_path is not None:
            paths.append(self.pattern_path)
        disks = self.vm.attach_many(paths, read_only=[ro, ro, True][:len(paths)])
        self.meta_disk, self.data_disk = disks[0], disks[1]
        if self.pattern_path is not None:
            self.pat_disk = disks[2]

    def table(self) -> str:
        assert self.meta_disk and self.data_disk
        feats = " 1 read_only" if self.read_only else " 0"
        return (f"0 {self.files.data_sectors} thin-pool {self.meta_disk.guest_path} "
                f"{self.data_disk.guest_path} {self.files.block_sectors} 0{feats}")

    def activate(self) -> None:
        self.sh(f"dmsetup create {self.name} --table {shlex.quote(self.table())}")
        self.pool_active = True
        self.status(expect_mode="ro" if self.read_only else "rw")

    def teardown(self) -> None:
        """Remove the thins and the pool, detach the disks (writes reach the host files)."""
        # One dmsetup for all, in this order (it stops at the first that fails, as a chain
        # of one dmsetup each would).
        names = [self.thin_name(d) for d in sorted(self.active)]
        if self.pool_active:
            names.append(self.name)
        if names:
            self.sh(f"dmsetup remove {' '.join(names)}")
        self.active.clear()
        self.pool_active = False
        self.detach()

    def detach(self) -> None:
        if self.vm.alive:
            self.flush()
        if self.vm.alive:
            self.vm.detach_many([d for d in (self.pat_disk, self.data_disk, self.meta_disk)
                                 if d is not None])
        self.pat_disk = self.data_disk = self.meta_disk = None

    # -- guest commands ----------------------------------------------------------------------
    def sh(self, cmd: str, timeout: float = 120.0) -> str:
        """Run *cmd* in the guest (after whatever :meth:`do` queued, in the same command)."""
        self.log.append(cmd)
        queued, self._queue = self._queue, ([] if self._queue is not None else None)
        return run_after_queued(self.vm, queued or [], cmd, timeout)

    def do(self, cmd: str, timeout: float = 120.0) -> None:
        """Run *cmd* for its effect: at once, or inside :meth:`batched` with the next
        :meth:`sh` (the kernel sees the same commands in the same order, without a round
        trip to the host between them: ~0.1-0.5 s each under TCG)."""
        if self._queue is None:
            self.sh(cmd, timeout)
        else:
            self.log.append(cmd)
            self._queue.append((cmd, timeout))

    def flush(self) -> None:
        """Run what :meth:`do` queued."""
        if self._queue:
            self.sh(":")

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Queue the operations' commands until something reads the guest (a status, the
        hashes, the teardown) or the block ends."""
        self._queue = []
        try:
            yield
            self.flush()
        finally:
            self._queue = None

    def thin_name(self, dev: int) -> str:
        return f"{self.name}-t{dev}"

    def thin_path(self, dev: int) -> str:
        return f"/dev/mapper/{self.thin_name(dev)}"

    def message(self, text: str) -> None:
        self.do(f"dmsetup message {self.name} 0 {shlex.quote(text)}")

    def activate_thin(self, dev: int, sectors: int | None = None) -> str:
        sectors = sectors or self.vblocks * self.files.block_sectors
        table = f"0 {sectors} thin /dev/mapper/{self.name} {dev}"
        self.do(f"dmsetup create {self.thin_name(dev)} --table {shlex.quote(table)}")
        self.active[dev] = sectors
        return self.thin_path(dev)

    def activate_thins(self, devs: Iterable[int], sectors: int | None = None) -> None:
        """:meth:`activate_thin` of each of *devs* not active yet, in one ``dmsetup create
        --concise`` (a dmsetup start costs ~20 ms of TCG CPU)."""
        sectors = sectors or self.vblocks * self.files.block_sectors
        new = [dev for dev in dict.fromkeys(devs) if dev not in self.active]
        if not new:
            return
        spec = ";".join(f"{self.thin_name(dev)},,,rw,0 {sectors} thin /dev/mapper/{self.name} "
                        f"{dev}" for dev in new)
        self.do(f"dmsetup create --concise {shlex.quote(spec)}")
        for dev in new:
            self.active[dev] = sectors

    def deactivate_thin(self, dev: int) -> None:
        self.do(f"dmsetup remove {self.thin_name(dev)}")
        del self.active[dev]

    @property
    def size_bytes(self) -> int:
        return self.vblocks * self.files.block_bytes

    # -- operations (mirrored in the model) --------------------------------------------------
    def create_thin(self, dev: int, *, activate: bool = True) -> None:
        self.model.create_thin(dev)
        self.message(f"create_thin {dev}")
        if activate:
            self.activate_thin(dev)

    def create_snap(self, dev: int, origin: int, *, activate: bool = True) -> None:
        """Suspend an active origin around the message (the kernel requires it)."""
        self.model.create_snap(dev, origin)
        msg = shlex.quote(f"create_snap {dev} {origin}")
        if origin in self.active:
            o = self.thin_name(origin)
            self.do(f"dmsetup suspend {o} && dmsetup message {self.name} 0 {msg}; "
                    f"rc=$?; dmsetup resume {o}; exit $rc")
        else:
            self.do(f"dmsetup message {self.name} 0 {msg}")
        if activate:
            self.activate_thin(dev)

    def delete(self, dev: int) -> None:
        self.model.delete(dev)
        if dev in self.active:
            self.deactivate_thin(dev)
        self.message(f"delete {dev}")

    def set_transaction_id(self, old: int, new: int) -> None:
        self.model.set_transaction_id(old, new)
        self.message(f"set_transaction_id {old} {new}")

    def reserve_metadata_snap(self) -> None:
        self.model.reserve_metadata_snap()
        self.message("reserve_metadata_snap")
        self.held = True

    def release_metadata_snap(self) -> None:
        self.model.release_metadata_snap()
        self.message("release_metadata_snap")
        self.held = False

    def write(self, dev: int, offset: int, length: int, *, pat_offset: int) -> None:
        """Copy pattern[pat_offset:+length] to byte *offset* of thin *dev* (buffered + fsync)."""
        assert self.pat_disk is not None, "no pattern disk"
        data = self.pattern[pat_offset : pat_offset + length]
        assert len(data) == length
        self.model.write(dev, offset, data)
        path = self.thin_path(dev) if dev in self.active else self.activate_thin(dev)
        self.do(f"dd if={self.pat_disk.guest_path} of={path} bs=65536 skip={pat_offset} "
                f"seek={offset} count={length} iflag=skip_bytes,count_bytes,fullblock "
                "oflag=seek_bytes conv=notrunc,fsync status=none")

    def discard(self, dev: int, offset: int, length: int) -> None:
        self.model.discard(dev, offset, length)
        path = self.thin_path(dev) if dev in self.active else self.activate_thin(dev)
        self.do(f"blkdiscard -o {offset} -l {length} {path}")

    # -- observations ------------------------------------------------------------------------
    def status(self, *, expect_mode: str | None = "rw") -> PoolStatus:
        """The pool's status line (this commits the pool's metadata); unhealthy → fail."""
        st = parse_pool_status(self.sh(f"dmsetup status {self.name}").strip())
        if expect_mode is not None:
            check_healthy(st, expect_mode)
        self.last_status = st
        return st

    def thin_status(self, dev: int) -> ThinStatus:
        return parse_thin_status(self.sh(f"dmsetup status {self.thin_name(dev)}").strip())

    def statuses(self, *, expect_mode: str | None = "rw"
                 ) -> tuple[PoolStatus, dict[int, ThinStatus]]:
        """:meth:`status`, then :meth:`thin_status` of every active thin, in one guest command
        (the pool's line first: it commits). The thins' lines come from one ``dmsetup status``
        of every device ("NAME: LINE"; a dmsetup start costs ~20 ms of TCG CPU)."""
        devs = sorted(self.active)
        cmd = f"dmsetup status {self.name}"
        out = self.sh(f"{cmd} && dmsetup status" if devs else cmd).splitlines()
        wanted = {f"{self.thin_name(dev)}: ": dev for dev in devs}
        thins: dict[int, str] = {}
        for line in out[1:]:
            name, sep, _ = line.partition(": ")
            dev = wanted.get(name + sep)
            if dev is not None:
                if dev in thins:
                    raise AssertionError(f"two status lines for thin {dev}: {out!r}")
                thins[dev] = line[len(name) + 2:]
        if not out or sorted(thins) != devs:
            raise AssertionError(f"status lines of {self.name} and thins {devs}: {out!r}")
        st = parse_pool_status(out[0].strip())
        if expect_mode is not None:
            check_healthy(st, expect_mode)
        self.last_status = st
        return st, {dev: parse_thin_status(thins[dev].strip()) for dev in devs}

    def check_status(self) -> PoolStatus:
        """Pool and thin status lines agree with the model (data blocks, transaction id,
        held snapshot, per-thin mapped sectors and highest mapped sector)."""
        st, thins = self.statuses(expect_mode="ro" if self.read_only else "rw")
        m = self.model
        problems = []
        if st.transaction_id != m.trans_id:
            problems.append(f"transaction id {st.transaction_id} != model {m.trans_id}")
        if st.used_data_blocks != m.used_data_blocks():
            problems.append(f"used data blocks {st.used_data_blocks} != model "
                            f"{m.used_data_blocks()}")
        if st.total_data_blocks != self.files.nr_data_blocks:
            problems.append(f"data blocks {st.total_data_blocks} != {self.files.nr_data_blocks}")
        if st.total_metadata_blocks != self.files.nr_metadata_blocks:
            problems.append(f"metadata blocks {st.total_metadata_blocks} != "
                            f"{self.files.nr_metadata_blocks}")
        if (st.held_metadata_root is not None) != self.held:
            problems.append(f"held metadata root {st.held_metadata_root}, model held={self.held}")
        for dev, ts in thins.items():
            want = m.mapped_blocks(dev) * self.files.block_sectors
            high = (m.highest_mapped_end(dev) // SECTOR - 1) if m.devices[dev].blocks else None
            if (ts.mapped_sectors, ts.highest_mapped_sector) != (want, high):
                problems.append(f"thin {dev}: mapped {ts.mapped_sectors} highest "
                                f"{ts.highest_mapped_sector}, model {want} {high}")
        if problems:
            raise AssertionError("status differs from the model:\n  " + "\n  ".join(problems))
        return st

    def hashes(self) -> dict[int, str]:
        """sha256 of every model device, read in the guest (activating inactive ones)."""
        devs = sorted(self.model.devices)
        self.activate_thins(devs)
        self.flush()
        digests = self.vm.sha256_many([(self.thin_path(dev), None) for dev in devs])
        return dict(zip(devs, digests, strict=True))


# --------------------------------------------------------------------------------------------
# dmimage's side


class OfflineSession:
    """The same operations through dmimage's offline WritablePool (and the model)."""

    def __init__(self, files: PoolFiles, pattern: bytes, model: PoolModel | None = None) -> None:
        from dmimage.thin.transaction import open_writable

        self.files = files
        self.pattern = pattern
        self.model = model if model is not None else KernelModel(files.block_bytes)
        self.pool = open_writable(files.meta, files.data)
        self.held = bool(self.pool.held_root)

    def close(self) -> None:
        self.pool.close()

    def create_thin(self, dev: int) -> None:
        self.model.create_thin(dev)
        self.pool.create_thin(dev)

    def create_snap(self, dev: int, origin: int) -> None:
        self.model.create_snap(dev, origin)
        self.pool.create_snap(dev, origin)

    def delete(self, dev: int) -> None:
        self.model.delete(dev)
        self.pool.delete(dev)

    def set_transaction_id(self, old: int, new: int) -> None:
        self.model.set_transaction_id(old, new)
        self.pool.set_transaction_id(old, new)

    def reserve_metadata_snap(self) -> None:
        self.model.reserve_metadata_snap()
        self.pool.reserve_metadata_snap()
        self.held = True

    def release_metadata_snap(self) -> None:
        self.model.release_metadata_snap()
        self.pool.release_metadata_snap()
        self.held = False

    def write(self, dev: int, offset: int, length: int, *, pat_offset: int) -> None:
        data = self.pattern[pat_offset : pat_offset + length]
        self.model.write(dev, offset, data)
        self.pool.write(dev, offset, data)

    def discard(self, dev: int, offset: int, length: int) -> None:
        self.model.discard(dev, offset, length)
        self.pool.discard(dev, offset, length)

    def commit(self) -> None:
        self.pool.commit()


# --------------------------------------------------------------------------------------------
# Offline verification (after teardown)


@dataclass
class OfflineReport:
    nr_allocated_metadata: int
    nr_allocated_data: int
    held_root: int
    facts: dict[str, Any] = field(default_factory=dict)


def model_facts(model: PoolModel) -> dict[str, Any]:
    return {
        "time": model.time,
        "transaction": model.trans_id,
        "used_data_blocks": model.used_data_blocks(),
        "devices": {str(d): {"mapped_blocks": len(m.blocks), "transaction": m.transaction_id,
                             "creation_time": m.creation_time,
                             "snap_time": m.snapshotted_time,
                             "mapped": sorted(m.blocks)}
                    for d, m in sorted(model.devices.items())},
    }


def verify_offline(files: PoolFiles, model: KernelModel, *, size: int,
                   guest_hashes: dict[int, str] | None = None, status: PoolStatus | None = None,
                   held: bool | None = None, tools11: oracles.Tools | None = None,
                   byte_identical_dump: bool = True
                   ) -> OfflineReport:
    """dmimage check passes; dmimage's reader equals the model; exports equal the model and the
    guest's hashes; the status line equals what the metadata says (+ the kernel's reserve);
    with *tools11*: thin_check 1.1 passes and thin_dump 1.1 equals dmimage dump (semantically,
    and byte for byte when *byte_identical_dump*)."""
    from dmimage import open_pool
    from dmimage.thin.check import check_metadata
    from dmimage.thin.dump import dump_pool
    from dmimage.thin.export import export_thin

    report = check_metadata(files.meta)
    assert report.ok(), "dmimage check: " + "; ".join(str(p) for p in report.problems)
    with open_pool(files.meta) as pool:
        sb = pool.superblock
        assert (sb.time, sb.trans_id) == (model.time, model.trans_id), \
            f"superblock time/transaction {sb.time}/{sb.trans_id} != model " \
            f"{model.time}/{model.trans_id}"
        if held is not None:
            assert bool(sb.held_root) == held, f"held_root {sb.held_root}, expected held={held}"
        devs = pool.devices()
        assert sorted(devs) == sorted(model.devices), \
            f"devices {sorted(devs)} != model {sorted(model.devices)}"
        for dev, d in devs.items():
            m = model.devices[dev]
            details = (d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time)
            expected = (len(m.blocks), m.transaction_id, m.creation_time, m.snapshotted_time)
            assert details == expected, f"device {dev} details {details} != model {expected}"
            keys = sorted(int(k) for k in pool.mappings(dev).origin)
            assert keys == sorted(m.blocks), f"device {dev} mapped blocks differ from the model"
        meta_alloc = pool.metadata_space_map().nr_allocated
        data_alloc = pool.data_space_map().nr_allocated
        assert data_alloc == model.used_data_blocks(), \
            f"data space map {data_alloc} != model {model.used_data_blocks()}"
        for dev in sorted(model.devices):
            buf = io.BytesIO()
            export_thin(pool, files.data, dev, buf, size=size)
            got = sha256(buf.getvalue())
            want = sha256(model.read(dev, 0, size))
            assert got == want, f"export of thin {dev} differs from the model"
            if guest_hashes is not None:
                assert guest_hashes[dev] == want, f"guest's thin {dev} differs from the model"
        held_root = sb.held_root
    if status is not None:
        nr_meta = files.nr_metadata_blocks
        assert status.total_metadata_blocks == nr_meta
        want_used = meta_alloc + metadata_reserve(nr_meta)
        assert status.used_metadata_blocks == want_used, \
            f"status used metadata {status.used_metadata_blocks} != nr_allocated {meta_alloc} " \
            f"+ reserve {metadata_reserve(nr_meta)}"
        assert status.used_data_blocks == data_alloc
        assert status.transaction_id == model.trans_id
        assert (status.held_metadata_root or 0) == held_root
    if tools11 is not None:
        rc, _out, err = oracles.check(files.meta, tools11)
        assert rc == 0, f"thin_check 1.1: {err}"
        theirs = oracles.dump(files.meta, tools11)
        buf = io.BytesIO()
        dump_pool(files.meta, buf)
        ours = buf.getvalue().decode()
        semantic.assert_same_pool(semantic.parse_xml(ours), semantic.parse_xml(theirs))
        if byte_identical_dump:
            assert ours == theirs, "dmimage dump is not byte-identical to thin_dump 1.1"
    return OfflineReport(meta_alloc, data_alloc, held_root, model_facts(model))


def seeds_from_env(default: list[int]) -> list[int]:
    """``DMIMAGE_VM_SEEDS=1,2,3`` overrides a scenario's seeds."""
    env = os.environ.get("DMIMAGE_VM_SEEDS")
    return [int(s) for s in env.split(",")] if env else default


