"""Helpers for the kernel-scale differentials (vmtests/test_kernel_scale.py).

* `ScaleModel`: the reference model (`PoolModel`'s rules) with block content kept as sparse
  512-byte sector patches over zeros, so pools of tens of thousands of 64 KiB blocks fit in
  memory, and no garbage collection per write (used blocks are counted on demand).
* `Blob` / `scatter_tables`: thousands of small writes in the guest from one ``dd``. A
  dm-linear "scatter" device maps its consecutive sectors onto scattered sectors of a thin
  device; one O_DIRECT ``dd`` into it becomes one bio per target. Tables, payloads and the
  shell script itself travel on one host-made disk (the *blob*), so a whole phase is one agent
  call: under TCG a process spawn costs milliseconds, a provisioning bio well under one.
* `read_dump`: thin_dump 1.1's XML read line by line (oracle side, no dmimage): details,
  mappings with ``<ref>``s expanded, and data-block reference counts derived from it (a
  ``<def>`` is one set of shared leaves, counted once).
* `tree_shape`: depth and leaf count of a bottom-level mapping tree, parsed from raw bytes
  (oracle side, no dmimage).
"""

from __future__ import annotations

import io
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmimage import open_pool
from dmimage.guest.dmstatus import PoolStatus, ThinStatus
from dmimage.guest.machine import Machine
from dmimage.thin.check import check_metadata
from dmimage.thin.dump import dump_pool
from dmimage.thin.model import PoolModel
from dmimage.thin.pool import Pool
from vmtests.scenario import metadata_reserve

import oracles

SECTOR = 512
META_BLOCK = 4096
BITMAP_ENTRIES = 16320  # data blocks per space-map bitmap block


# --------------------------------------------------------------------------------------------
# The model


@dataclass
class ScaleModel(PoolModel):
    """`PoolModel` whose block content is ``patches[block] = {sector in block: 512 bytes}``
    over zeros (`content` holds empty placeholders). Writes must be whole sectors. Dead blocks
    are never collected (no scan of every device per write): `used_data_blocks` counts live
    blocks when asked."""

    patches: dict[int, dict[int, bytes]] = field(default_factory=dict)

    def _gc(self) -> None:
        return None

    def write(self, dev: int, offset: int, data: bytes) -> None:
        if offset % SECTOR or len(data) % SECTOR:
            raise ValueError("ScaleModel writes whole sectors")
        d = self.devices[dev]
        bs = self.block_size
        for pos in range(0, len(data), SECTOR):
            vb, within = divmod(offset + pos, bs)
            old = d.blocks.get(vb)
            patch = data[pos : pos + SECTOR]
            sector = within // SECTOR
            if old is not None and d.times[vb] >= d.snapshotted_time:
                self.patches.setdefault(old, {})[sector] = patch
            else:
                new = self._new_block(b"")
                self.patches[new] = dict(self.patches.get(old, {})) if old is not None else {}
                self.patches[new][sector] = patch
                d.blocks[vb] = new
                d.times[vb] = self.time

    def block_bytes(self, block: int) -> bytes:
        out = bytearray(self.block_size)
        for sector, patch in self.patches.get(block, {}).items():
            out[sector * SECTOR : (sector + 1) * SECTOR] = patch
        return bytes(out)

    def read(self, dev: int, offset: int, length: int) -> bytes:
        d = self.devices[dev]
        bs = self.block_size
        out = bytearray(length)
        pos = 0
        while pos < length:
            vb, within = divmod(offset + pos, bs)
            n = min(bs - within, length - pos)
            b = d.blocks.get(vb)
            if b is not None:
                out[pos : pos + n] = self.block_bytes(b)[within : within + n]
            pos += n
        return bytes(out)


class Clock:
    """Wall time, and CPU time of the QEMU process and of this one: on a loaded machine the
    CPU seconds are what the test would take alone."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.t0 = time.monotonic()
        self.q0, self.h0 = self._qemu(), self._host()

    def _qemu(self) -> float:
        pid = self.vm.pid
        if pid is None:
            return 0.0
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _host() -> float:
        """This process and its finished children (thin_check, thin_dump)."""
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __str__(self) -> str:
        return (f"{time.monotonic() - self.t0:.1f} s wall, CPU {self._qemu() - self.q0:.1f} s "
                f"guest + {self._host() - self.h0:.1f} s host")


# --------------------------------------------------------------------------------------------
# The blob disk and scatter devices


@dataclass
class Blob:
    """Bytes for the guest, each piece at a 512-byte aligned offset of one host file."""

    parts: list[bytes] = field(default_factory=list)
    size: int = 0

    def add(self, data: bytes) -> tuple[int, int]:
        off = self.size
        pad = -len(data) % SECTOR
        self.parts.append(data + bytes(pad))
        self.size += len(data) + pad
        return off, len(data)

    def save(self, path: Path) -> Path:
        with open(path, "wb") as f:
            for p in self.parts:
                f.write(p)
        return path

    @staticmethod
    def extract(off: int, length: int) -> str:
        """Shell: the piece on stdout (``$B`` is the blob's guest device)."""
        return (f"dd if=$B bs=1048576 skip={off} count={length} iflag=skip_bytes,count_bytes "
                "status=none")


@dataclass(frozen=True)
class Target:
    """*sectors* sectors at *sector* of the guest block device *path*."""

    path: str
    sector: int
    sectors: int = 1


def scatter_table(targets: list[Target]) -> str:
    """A dm-linear table laying *targets* end to end."""
    lines, pos = [], 0
    for t in targets:
        lines.append(f"{pos} {t.sectors} linear {t.path} {t.sector}\n")
        pos += t.sectors
    return "".join(lines)


def scatter_script(blob: Blob, name: str, targets: list[Target], payload: bytes,
                   batches: list[tuple[int, list[str]]] | None = None) -> list[str]:
    """Shell lines: create scatter device *name* over *targets*, write *payload* (as many
    bytes as the targets hold) through it with O_DIRECT, remove it. *batches*: write in
    pieces of n targets, each followed by its shell lines (for messages between writes)."""
    total = sum(t.sectors for t in targets)
    assert len(payload) == total * SECTOR, (len(payload), total)
    toff, tlen = blob.add(scatter_table(targets).encode())
    poff, _ = blob.add(payload)
    out = [f"{Blob.extract(toff, tlen)} | dmsetup create {name}"]
    pieces = batches or [(len(targets), [])]
    done = 0  # in sectors
    i = 0
    for n, after in pieces:
        sectors = sum(t.sectors for t in targets[i : i + n])
        out.append(f"dd if=$B of=/dev/mapper/{name} bs=1048576 skip={poff + done * SECTOR} "
                   f"seek={done * SECTOR} count={sectors * SECTOR} "
                   "iflag=skip_bytes,count_bytes oflag=seek_bytes,direct status=none")
        out.extend(after)
        done += sectors
        i += n
    assert i == len(targets)
    out.append(f"dmsetup remove {name}")
    return out


def run_script(vm: Machine, blob: Blob, lines: list[str], path: Path, *,
               timeout: float = 600.0) -> None:
    """Save *blob* plus the script to *path*, attach it, run the script (set -e) in one agent
    call, detach."""
    soff, slen = blob.add(("set -e\n" + "\n".join(lines) + "\n").encode())
    blob.save(path)
    disk = vm.attach(path, read_only=True)
    try:
        vm.sh(f"B={disk.guest_path}; {Blob.extract(soff, slen)} > /tmp/scale.sh && "
              f"B={disk.guest_path} sh /tmp/scale.sh", timeout=timeout)
    finally:
        vm.detach(disk)


# --------------------------------------------------------------------------------------------
# Oracle side: thin_dump 1.1's XML, raw tree shape


@dataclass
class DumpDevice:
    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    inline: list[tuple[int, int, int, int]] = field(default_factory=list)  # runs
    refs: list[str] = field(default_factory=list)


@dataclass
class Dump:
    time: int
    transaction: int
    nr_data_blocks: int
    defs: dict[str, list[tuple[int, int, int, int]]]
    devices: dict[int, DumpDevice]

    def mappings(self, dev: int) -> np.ndarray:
        """(n, 3) uint64 [origin, data, time], ascending origin, refs expanded."""
        d = self.devices[dev]
        runs = list(d.inline)
        for r in d.refs:
            runs.extend(self.defs[r])
        return _expand(runs)

    def data_ref_counts(self) -> np.ndarray:
        """Per data block: leaf-entry occurrences across distinct leaves, as thin_dump 1.1
        shows them (each ``<def>`` once, every device's own mappings once)."""
        counts = np.zeros(self.nr_data_blocks, dtype=np.int64)
        runs = [r for d in self.devices.values() for r in d.inline]
        runs += [r for rs in self.defs.values() for r in rs]
        m = _expand(runs, sort=False)
        np.add.at(counts, m[:, 1].astype(np.int64), 1)
        return counts


def _expand(runs: list[tuple[int, int, int, int]], sort: bool = True) -> np.ndarray:
    if not runs:
        return np.zeros((0, 3), dtype=np.uint64)
    r = np.asarray(runs, dtype=np.uint64)
    lengths = r[:, 2].astype(np.int64)
    idx = np.repeat(np.arange(len(r)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    off = (np.arange(int(lengths.sum())) - np.repeat(starts, lengths)).astype(np.uint64)
    out = np.stack([r[idx, 0] + off, r[idx, 1] + off, r[idx, 3]], axis=1)
    if sort:
        out = out[np.argsort(out[:, 0], kind="stable")]
    return out


_ATTR = re.compile(r'(\w+)="([^"]*)"')


def read_dump(text: str) -> Dump:
    """Parse thin_dump 1.1 XML (one element per line, as it writes it)."""
    dump: Dump | None = None
    cur: list[tuple[int, int, int, int]] | None = None
    dev: DumpDevice | None = None
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        # The mapping lines (nearly all of them) by their fixed attribute order; a regex and
        # a dict per line cost ~2 s of a scale test's host CPU.
        if s.startswith("<single_mapping "):
            f = s.split('"')
            if len(f) == 7 and f[0] == "<single_mapping origin_block=" and \
                    f[2] == " data_block=" and f[4] == " time=" and f[6] == "/>":
                assert cur is not None
                cur.append((int(f[1]), int(f[3]), 1, int(f[5])))
                continue
        elif s.startswith("<range_mapping "):
            f = s.split('"')
            if len(f) == 9 and f[0] == "<range_mapping origin_begin=" and \
                    f[2] == " data_begin=" and f[4] == " length=" and f[6] == " time=" and \
                    f[8] == "/>":
                assert cur is not None
                cur.append((int(f[1]), int(f[3]), int(f[5]), int(f[7])))
                continue
        tag = s[1:].split(None, 1)[0].rstrip(">/")
        a = dict(_ATTR.findall(s))
        if tag == "superblock":
            dump = Dump(int(a["time"]), int(a["transaction"]), int(a["nr_data_blocks"]), {}, {})
        elif tag == "def":
            assert dump is not None
            cur = dump.defs.setdefault(a["name"], [])
        elif tag == "device":
            assert dump is not None
            dev = DumpDevice(int(a["dev_id"]), int(a["mapped_blocks"]), int(a["transaction"]),
                             int(a["creation_time"]), int(a["snap_time"]))
            dump.devices[dev.dev_id] = dev
            cur = dev.inline
        elif tag == "single_mapping":
            assert cur is not None
            cur.append((int(a["origin_block"]), int(a["data_block"]), 1, int(a["time"])))
        elif tag == "range_mapping":
            assert cur is not None
            cur.append((int(a["origin_begin"]), int(a["data_begin"]), int(a["length"]),
                        int(a["time"])))
        elif tag == "ref":
            assert dev is not None
            dev.refs.append(a["name"])
        elif tag in ("/def", "/device"):
            cur, dev = None, None
        elif tag == "/superblock":
            pass
        else:
            raise ValueError(f"unexpected thin_dump line: {s[:80]}")
    assert dump is not None, "no <superblock> in thin_dump output"
    return dump


#: Offsets in the superblock and a btree node header (dm-thin-metadata.c, dm-btree-internal.h).
SB_DATA_MAPPING_ROOT = 320
NODE_INTERNAL, NODE_LEAF = 1, 2


def _node(meta: bytes, b: int) -> tuple[int, np.ndarray, np.ndarray]:
    blk = meta[b * META_BLOCK : (b + 1) * META_BLOCK]
    flags, _blocknr, n, max_entries, _vsize = struct.unpack_from("<IQIII", blk, 4)
    keys = np.frombuffer(blk, "<u8", n, 32)
    values = np.frombuffer(blk, "<u8", n, 32 + 8 * max_entries)
    return flags, keys, values


def tree_shape(meta_path: Path, dev: int, *, superblock: int = 0) -> tuple[int, int, int]:
    """(top-level tree levels, bottom-level tree levels, bottom leaves) on the path to device
    *dev*'s mappings, read from raw bytes. Levels from the top-level root = the sum of the
    first two (the brief's count); a bottom tree of 2+ levels has kernel-built internal
    nodes."""
    meta = meta_path.read_bytes()
    (root,) = struct.unpack_from("<Q", meta, superblock * META_BLOCK + SB_DATA_MAPPING_ROOT)
    top = 1
    while True:  # top level: dev id -> bottom root
        flags, keys, values = _node(meta, root)
        i = int(np.searchsorted(keys, dev, side="right")) - 1
        if flags & NODE_LEAF:
            assert i >= 0 and int(keys[i]) == dev, f"device {dev} not in the top-level tree"
            root = int(values[i])
            break
        root = int(values[i])
        top += 1
    levels, frontier = 1, [root]
    while True:
        flags, _, _ = _node(meta, frontier[0])
        if flags & NODE_LEAF:
            return top, levels, len(frontier)
        frontier = [int(v) for b in frontier for v in _node(meta, b)[2]]
        levels += 1


# --------------------------------------------------------------------------------------------
# Checkpoints: dmimage's view against thin_dump 1.1, thin_check 1.1, the kernel and the model


@dataclass
class DeviceView:
    """What the model says a device's details and mappings are (for a held snapshot too)."""

    details: tuple[int, int, int, int]  # mapped_blocks, transaction, creation, snapshotted
    blocks: dict[int, int]  # vblock -> model block id
    times: dict[int, int]


def model_view(model: PoolModel) -> dict[int, DeviceView]:
    return {dev: DeviceView((len(d.blocks), d.transaction_id, d.creation_time,
                             d.snapshotted_time), dict(d.blocks), dict(d.times))
            for dev, d in model.devices.items()}


@dataclass
class Observed:
    """The kernel's status lines at the checkpoint (pool, and each active thin)."""

    pool: PoolStatus
    thins: dict[int, ThinStatus]


@dataclass
class CheckpointFacts:
    levels: dict[int, tuple[int, int, int]]  # dev -> tree_shape()
    nr_mappings: int
    max_data_count: int
    data_blocks_over_2: int
    data_bitmaps: int
    data_bitmaps_used: int  # bitmap blocks counting at least one block in use
    meta_allocated: int
    data_allocated: int


def compare_views(what: str, pool: Pool, dump: Dump, view: dict[int, DeviceView],
                  time_trans: tuple[int, int]) -> int:
    """dmimage's reading of *pool* equals thin_dump 1.1's *dump* in every device-details field
    and every mapping (origin, data block, time), and the model's *view* in details, mapped
    blocks, mapping times and which (device, block) pairs share a data block. Returns the
    number of mappings compared."""
    sb = pool.superblock
    assert (sb.time, sb.trans_id) == (dump.time, dump.transaction) == time_trans, \
        f"{what}: time/transaction dmimage {sb.time}/{sb.trans_id}, thin_dump " \
        f"{dump.time}/{dump.transaction}, model {time_trans}"
    devs = pool.devices()
    assert sorted(devs) == sorted(dump.devices) == sorted(view), \
        f"{what}: devices dmimage {sorted(devs)} thin_dump {sorted(dump.devices)} " \
        f"model {sorted(view)}"
    pairs: list[np.ndarray] = []  # (model block id, data block) of every mapping
    total = 0
    for dev, d in devs.items():
        t = dump.devices[dev]
        ours = (d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time)
        theirs = (t.mapped_blocks, t.transaction, t.creation_time, t.snap_time)
        assert ours == theirs == view[dev].details, \
            f"{what}: device {dev} details (mapped, transaction, creation, snapshotted) " \
            f"dmimage {ours} thin_dump {theirs} model {view[dev].details}"
        m = pool.mappings(dev)
        mine = np.stack([m.origin.astype(np.uint64), m.data.astype(np.uint64),
                         m.time.astype(np.uint64)], axis=1)
        dumped = dump.mappings(dev)
        if not np.array_equal(mine, dumped):
            bad = [i for i in range(min(len(mine), len(dumped)))
                   if not np.array_equal(mine[i], dumped[i])][:3]
            raise AssertionError(f"{what}: device {dev} mappings differ from thin_dump 1.1 "
                                 f"({len(mine)} vs {len(dumped)}; first rows "
                                 f"{[(mine[i].tolist(), dumped[i].tolist()) for i in bad]})")
        v = view[dev]
        vbs = np.array(sorted(v.blocks), dtype=np.uint64)
        assert np.array_equal(m.origin.astype(np.uint64), vbs), \
            f"{what}: device {dev} mapped blocks differ from the model"
        want_t = np.array([v.times[b] for b in vbs.tolist()], dtype=np.uint64)
        if not np.array_equal(m.time.astype(np.uint64), want_t):
            bad_i = np.flatnonzero(m.time.astype(np.uint64) != want_t)[:5]
            raise AssertionError(f"{what}: device {dev} mapping times differ from the model "
                                 f"at vblocks {vbs[bad_i].tolist()}: on disk "
                                 f"{m.time[bad_i].tolist()}, model {want_t[bad_i].tolist()}")
        mids = np.array([v.blocks[b] for b in vbs.tolist()], dtype=np.uint64)
        pairs.append(np.stack([mids, m.data.astype(np.uint64)], axis=1))
        total += len(vbs)
    if pairs:
        # sharing: model block ids and data blocks correspond one to one (each pair as one
        # 64-bit key: np.unique(axis=0) sorts rows as void records, ~1 s per checkpoint)
        both = np.concatenate(pairs)
        assert int(both.max(initial=0)) < 1 << 32
        keys = np.unique((both[:, 0] << np.uint64(32)) | both[:, 1])
        p = np.stack([keys >> np.uint64(32), keys & np.uint64(0xFFFFFFFF)], axis=1)
        n_ids, n_data = len(np.unique(p[:, 0])), len(np.unique(p[:, 1]))
        assert len(p) == n_ids == n_data, \
            f"{what}: which mappings share a data block differs from the model " \
            f"({len(p)} pairs, {n_ids} model blocks, {n_data} data blocks)"
    return total


def verify_checkpoint(meta: Path, model: PoolModel, obs: Observed, tools11: oracles.Tools, *,
                      block_sectors: int,
                      held: tuple[dict[int, DeviceView], tuple[int, int]] | None = None,
                      deep: tuple[int, ...] = (), what: str = "checkpoint") -> CheckpointFacts:
    """Everything the brief compares, on metadata the kernel committed (a copy or the file):
    dmimage check and thin_check 1.1 pass; dmimage dump is byte-identical to thin_dump 1.1;
    `compare_views` for the live metadata (and the held snapshot via ``thin_dump -m``); data
    space-map counts equal the counts derived from thin_dump's leaves (no snapshot held:
    then the held tree's leaves would count too); the kernel's pool and thin status lines
    equal dmimage's numbers."""
    report = check_metadata(meta)
    assert report.ok(), f"{what}: dmimage check: " + "; ".join(map(str, report.problems[:5]))
    rc, _out, err = oracles.check(meta, tools11)
    assert rc == 0, f"{what}: thin_check 1.1 exit {rc}: {err[-2000:]}"
    text = oracles.dump(meta, tools11)
    dump = read_dump(text)
    buf = io.BytesIO()
    dump_pool(meta, buf)
    assert buf.getvalue().decode() == text, f"{what}: dmimage dump != thin_dump 1.1 (bytes)"
    st = obs.pool
    with open_pool(meta) as pool:
        nr = compare_views(what, pool, dump, model_view(model), (model.time, model.trans_id))
        sb = pool.superblock
        dsm, msm = pool.data_space_map(), pool.metadata_space_map()
        counts = dsm.counts.astype(np.int64)
        assert dsm.nr_allocated == model.used_data_blocks(), \
            f"{what}: data space map {dsm.nr_allocated} blocks in use, model " \
            f"{model.used_data_blocks()}"
        if held is None:
            derived = dump.data_ref_counts()
            if not np.array_equal(counts, derived):
                bad = np.flatnonzero(counts != derived)[:5]
                raise AssertionError(f"{what}: data reference counts differ from thin_dump 1.1's "
                                     f"mappings at blocks {bad.tolist()}: dmimage "
                                     f"{counts[bad].tolist()} derived {derived[bad].tolist()}")
        assert bool(sb.held_root) == (held is not None), f"{what}: held_root {sb.held_root}"
        # the kernel's own account
        total_meta = st.total_metadata_blocks
        assert (total_meta, st.total_data_blocks) == (msm.root.nr_blocks, dsm.root.nr_blocks)
        kernel = (st.transaction_id, st.used_data_blocks, st.used_metadata_blocks,
                  st.held_metadata_root or 0)
        ours = (sb.trans_id, dsm.nr_allocated,
                msm.nr_allocated + metadata_reserve(total_meta), sb.held_root)
        assert kernel == ours, f"{what}: pool status (transaction, used data, used metadata, " \
            f"held root) kernel {kernel} != dmimage {ours} (metadata + reserve)"
        devs = pool.devices()
        for dev, ts in obs.thins.items():
            m = pool.mappings(dev)
            high = (int(m.origin[-1]) + 1) * block_sectors - 1 if len(m) else None
            want = (devs[dev].mapped_blocks * block_sectors, high)
            assert (ts.mapped_sectors, ts.highest_mapped_sector) == want, \
                f"{what}: thin {dev} status (mapped sectors, highest) " \
                f"{(ts.mapped_sectors, ts.highest_mapped_sector)} != dmimage {want}"
        meta_alloc, data_alloc = msm.nr_allocated, dsm.nr_allocated
        bitmaps = len(dsm.index)
        used_bitmaps = len(np.unique(np.flatnonzero(counts) // BITMAP_ENTRIES))
    if held is not None:
        dump_m = read_dump(oracles.dump(meta, tools11, "-m"))
        with open_pool(meta, metadata_snap=True) as snap:
            nr += compare_views(f"{what} (held metadata snapshot)", snap, dump_m, *held)
    levels = {dev: tree_shape(meta, dev) for dev in deep}
    return CheckpointFacts(levels, nr, int(counts.max(initial=0)),
                           int(np.count_nonzero(counts > 2)), bitmaps, used_bitmaps, meta_alloc,
                           data_alloc)
