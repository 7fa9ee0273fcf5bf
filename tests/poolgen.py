"""Plain-Python description of a thin pool, its thin_dump XML rendering, and generators.

Independent of ``dmimage`` (oracle side).  A :class:`Pool` is also the canonical form that
``tests/semantic.py`` parses thin_dump output into, so "description == dump" is a direct
comparison.

Mappings of a device are a numpy ``uint64`` array of shape (n, 3): columns origin (virtual
block), data block, time; sorted by origin, origins unique.  Build one from any iterable of
triples with :func:`as_mappings`.

Facts the generators respect (thin-format.md):
* data block ids < nr_data_blocks; time < 2**24; dev_id < 2**24;
* mapped_blocks = number of mappings (thin_restore writes it verbatim, Rust thin_check checks it);
* restoring the *expanded* XML (no <def>/<ref>) gives a data block that appears in k devices'
  mappings a ref count of k (one per distinct leaf), so k >= 3 lands in the overflow tree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Device",
    "Pool",
    "as_mappings",
    "to_xml",
    "runs",
    "data_ref_counts",
    "empty_pool",
    "thins_pool",
    "multilevel_pool",
    "snapshot_pool",
    "overflow_pool",
    "fragmented_pool",
    "random_pool",
    "pools",
    "MAX_TIME",
    "MAX_DEV_ID",
]

MAX_TIME = (1 << 24) - 1
MAX_DEV_ID = (1 << 24) - 1
MAPPING_DTYPE = np.uint64


def as_mappings(m: Iterable | np.ndarray | None) -> np.ndarray:
    """(n, 3) uint64 array [origin, data, time], sorted by origin.  Raises on duplicate origins."""
    if m is None:
        return np.zeros((0, 3), dtype=MAPPING_DTYPE)
    a = np.asarray(m if isinstance(m, np.ndarray) else list(m), dtype=MAPPING_DTYPE)
    if a.size == 0:
        return np.zeros((0, 3), dtype=MAPPING_DTYPE)
    a = a.reshape(-1, 3)
    if len(a) > 1 and not np.all(a[1:, 0] > a[:-1, 0]):
        a = a[np.argsort(a[:, 0], kind="stable")]
        if np.any(a[1:, 0] == a[:-1, 0]):
            raise ValueError("duplicate origin block in mappings")
    return np.ascontiguousarray(a)


@dataclass
class Device:
    dev_id: int
    mappings: np.ndarray = field(default_factory=lambda: as_mappings(None))
    transaction: int = 0
    creation_time: int = 0
    snap_time: int = 0
    #: None = len(mappings).  Set explicitly only to describe deliberately wrong metadata.
    mapped_blocks_override: int | None = None

    def __post_init__(self):
        self.mappings = as_mappings(self.mappings)

    @property
    def mapped_blocks(self) -> int:
        if self.mapped_blocks_override is not None:
            return self.mapped_blocks_override
        return int(len(self.mappings))

    def details(self) -> dict[str, int]:
        """The <device> attributes, as ints (same keys as the XML)."""
        return {
            "dev_id": int(self.dev_id),
            "mapped_blocks": self.mapped_blocks,
            "transaction": int(self.transaction),
            "creation_time": int(self.creation_time),
            "snap_time": int(self.snap_time),
        }

    def mapping_list(self) -> list[tuple[int, int, int]]:
        return [tuple(int(x) for x in row) for row in self.mappings]


@dataclass
class Pool:
    time: int = 0
    transaction: int = 0
    data_block_size: int = 128
    nr_data_blocks: int = 0
    devices: list[Device] = field(default_factory=list)
    flags: int = 0
    #: None = unspecified (0.9's thin_restore writes version 1, 1.1 writes 2).
    version: int | None = None
    #: block of the held metadata snapshot (XML attribute metadata_snap), None = none
    metadata_snap: int | None = None
    uuid: str = ""

    def __post_init__(self):
        self.devices = sorted(self.devices, key=lambda d: d.dev_id)

    def superblock(self) -> dict[str, int | str | None]:
        """The <superblock> attributes (ints; uuid str; version/metadata_snap may be None)."""
        return {
            "uuid": self.uuid,
            "time": int(self.time),
            "transaction": int(self.transaction),
            "flags": int(self.flags),
            "version": None if self.version is None else int(self.version),
            "data_block_size": int(self.data_block_size),
            "nr_data_blocks": int(self.nr_data_blocks),
            "metadata_snap": None if self.metadata_snap is None else int(self.metadata_snap),
        }

    def device(self, dev_id: int) -> Device:
        for d in self.devices:
            if d.dev_id == dev_id:
                return d
        raise KeyError(dev_id)

    @property
    def nr_mappings(self) -> int:
        return sum(len(d.mappings) for d in self.devices)

    def validate(self) -> None:
        """Raise ValueError unless this describes metadata both thin_checks accept."""
        ids = [d.dev_id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate dev_id")
        if not (128 <= self.data_block_size <= 2_097_152 and self.data_block_size % 128 == 0):
            raise ValueError(f"bad data_block_size {self.data_block_size}")
        for d in self.devices:
            if not 0 <= d.dev_id <= MAX_DEV_ID:
                raise ValueError(f"dev_id {d.dev_id} out of range")
            m = d.mappings
            if len(m):
                if int(m[:, 1].max()) >= self.nr_data_blocks:
                    raise ValueError(f"dev {d.dev_id}: data block >= nr_data_blocks")
                if int(m[:, 2].max()) > MAX_TIME:
                    raise ValueError(f"dev {d.dev_id}: mapping time >= 2**24")
            if d.mapped_blocks != len(m):
                raise ValueError(f"dev {d.dev_id}: mapped_blocks {d.mapped_blocks} != {len(m)}")


# ----------------------------------------------------------------------------- rendering


def runs(m: np.ndarray) -> np.ndarray:
    """Split mappings into maximal runs (origin+1, data+1, same time).

    Returns an (k, 4) uint64 array [origin_begin, data_begin, length, time].
    """
    m = as_mappings(m)
    n = len(m)
    if n == 0:
        return np.zeros((0, 4), dtype=np.uint64)
    o, d, t = m[:, 0], m[:, 1], m[:, 2]
    brk = np.ones(n, dtype=bool)
    brk[1:] = (o[1:] != o[:-1] + 1) | (d[1:] != d[:-1] + 1) | (t[1:] != t[:-1])
    starts = np.flatnonzero(brk)
    lengths = np.diff(np.append(starts, n)).astype(np.uint64)
    return np.stack([o[starts], d[starts], lengths, t[starts]], axis=1)


def _device_lines(d: Device, indent: str) -> list[str]:
    out = []
    r = runs(d.mappings)
    for ob, db, ln, t in r.tolist():
        if ln == 1:
            out.append(
                f'{indent}<single_mapping origin_block="{ob}" data_block="{db}" time="{t}"/>'
            )
        else:
            out.append(
                f'{indent}<range_mapping origin_begin="{ob}" data_begin="{db}" '
                f'length="{ln}" time="{t}"/>'
            )
    return out


def to_xml(pool: Pool, style: str = "0.9") -> str:
    """Render the expanded thin_dump XML (no <def>/<ref>).

    style "0.9": always flags="..", version (default 2) -- what thin_dump 0.9 prints.
    style "1.1": flags only when non-zero -- what thin_dump 1.1 prints.
    Both thin_restore versions accept either.  Ends with a newline.
    """
    sb = pool.superblock()
    attrs = [f'uuid="{sb["uuid"]}"', f'time="{sb["time"]}"', f'transaction="{sb["transaction"]}"']
    if style == "0.9" or sb["flags"]:
        attrs.append(f'flags="{sb["flags"]}"')
    attrs.append(f'version="{2 if sb["version"] is None else sb["version"]}"')
    attrs.append(f'data_block_size="{sb["data_block_size"]}"')
    attrs.append(f'nr_data_blocks="{sb["nr_data_blocks"]}"')
    if sb["metadata_snap"] is not None:
        attrs.append(f'metadata_snap="{sb["metadata_snap"]}"')
    lines = [f"<superblock {' '.join(attrs)}>"]
    for d in pool.devices:
        det = d.details()
        lines.append(
            f'  <device dev_id="{det["dev_id"]}" mapped_blocks="{det["mapped_blocks"]}" '
            f'transaction="{det["transaction"]}" creation_time="{det["creation_time"]}" '
            f'snap_time="{det["snap_time"]}">'
        )
        lines.extend(_device_lines(d, "    "))
        lines.append("  </device>")
    lines.append("</superblock>")
    return "\n".join(lines) + "\n"


def data_ref_counts(pool: Pool) -> np.ndarray:
    """Expected data space-map counts after thin_restore of the *expanded* XML:
    count[b] = number of mappings (over all devices) that name data block b.
    Length nr_data_blocks."""
    counts = np.zeros(pool.nr_data_blocks, dtype=np.uint32)
    for d in pool.devices:
        if len(d.mappings):
            np.add.at(counts, d.mappings[:, 1].astype(np.int64), 1)
    return counts


# ----------------------------------------------------------------------------- fixed pools


def empty_pool(nr_data_blocks: int = 1024, data_block_size: int = 128) -> Pool:
    return Pool(
        time=0, transaction=0, data_block_size=data_block_size, nr_data_blocks=nr_data_blocks
    )


def thins_pool(n: int = 3, mappings_per_thin: int = 20, seed: int = 1) -> Pool:
    """n thins, each half a contiguous data run, half scattered singles; no sharing."""
    rng = np.random.default_rng(seed)
    k = mappings_per_thin // 2
    nr_data = max(1024, n * mappings_per_thin * 4)
    scattered = (n * k + rng.permutation(nr_data - n * k))[: n * (mappings_per_thin - k)]
    scattered = scattered.reshape(n, mappings_per_thin - k)
    devs = []
    for i in range(n):
        off = int(rng.integers(0, 100))
        tail = (
            off
            + k
            + 1
            + np.sort(rng.choice((mappings_per_thin - k) * 3, mappings_per_thin - k, replace=False))
        )
        origins = np.concatenate([np.arange(off, off + k), tail])
        data = np.concatenate([np.arange(i * k, i * k + k), scattered[i]])
        times = np.where(np.arange(mappings_per_thin) < k, 0, i % 3)
        devs.append(
            Device(
                dev_id=i + 1,
                transaction=i,
                creation_time=i % 3,
                snap_time=i % 3,
                mappings=np.stack([origins, data, times], axis=1),
            )
        )
    return Pool(time=2, transaction=n, nr_data_blocks=nr_data, devices=devs)


def multilevel_pool(n_mappings: int = 5000, dev_id: int = 1, seed: int = 2) -> Pool:
    """One thin with n_mappings scattered mappings (5000 -> a 2-level bottom tree)."""
    rng = np.random.default_rng(seed)
    nr_data = n_mappings * 2
    origins = np.sort(rng.choice(n_mappings * 3, n_mappings, replace=False))
    data = rng.choice(nr_data, n_mappings, replace=False)
    times = rng.integers(0, 5, n_mappings)
    return Pool(
        time=4,
        transaction=7,
        nr_data_blocks=nr_data,
        devices=[
            Device(
                dev_id=dev_id,
                transaction=1,
                creation_time=0,
                snap_time=3,
                mappings=np.stack([origins, data, times], axis=1),
            )
        ],
    )


def snapshot_pool(n_mappings: int = 600, seed: int = 3) -> Pool:
    """origin 1, snapshot 2 of it (diverged in ~1/4 of the blocks), snapshot 3 of 2.

    Data blocks are shared between the devices (counts 2 and 3 after restore)."""
    rng = np.random.default_rng(seed)
    nr_data = n_mappings * 4
    origins = np.arange(n_mappings, dtype=np.uint64) * 2
    data = rng.permutation(n_mappings).astype(np.uint64)  # ids < n_mappings
    base = np.stack([origins, data, np.zeros(n_mappings, np.uint64)], axis=1)
    nxt = n_mappings
    # snapshot 2 at time 1; origin 1 then overwrites some blocks at time 1 (CoW)
    o1 = base.copy()
    sel = rng.choice(n_mappings, n_mappings // 4, replace=False)
    o1[sel, 1] = np.arange(nxt, nxt + len(sel))
    nxt += len(sel)
    o1[sel, 2] = 1
    s2 = base.copy()
    # snapshot 3 of 2 at time 2; 2 then overwrites some blocks
    s3 = s2.copy()
    sel = rng.choice(n_mappings, n_mappings // 5, replace=False)
    s2 = s2.copy()
    s2[sel, 1] = np.arange(nxt, nxt + len(sel))
    nxt += len(sel)
    s2[sel, 2] = 2
    return Pool(
        time=2,
        transaction=3,
        nr_data_blocks=nr_data,
        devices=[
            Device(1, o1, transaction=0, creation_time=0, snap_time=1),
            Device(2, s2, transaction=1, creation_time=1, snap_time=2),
            Device(3, s3, transaction=2, creation_time=2, snap_time=2),
        ],
    )


def overflow_pool(n_devices: int = 5, n_mappings: int = 100) -> Pool:
    """n_devices devices that all map the same data blocks (count n_devices >= 3 -> overflow tree),
    plus a few private blocks per device."""
    shared = np.stack(
        [np.arange(n_mappings), np.arange(n_mappings) + 10, np.zeros(n_mappings)], axis=1
    )
    devs = []
    for i in range(n_devices):
        priv = np.array([[n_mappings + 5 + i, 10 + n_mappings + i, 1]])
        devs.append(
            Device(
                i + 1,
                np.concatenate([shared, priv]),
                transaction=i,
                creation_time=min(i, 1),
                snap_time=1,
            )
        )
    return Pool(
        time=1,
        transaction=n_devices,
        nr_data_blocks=10 + n_mappings + n_devices + 100,
        devices=devs,
    )


def fragmented_pool(
    n_thins: int = 10,
    n_mappings: int = 100_000,
    seed: int = 0,
    data_block_size: int = 128,
    nr_data_blocks: int | None = None,
) -> Pool:
    """Benchmark pool: n_thins × n_mappings single mappings (origins 0..M-1), every data block
    distinct and globally shuffled, so every mapping renders as a <single_mapping>.

    Deterministic for a given seed."""
    total = n_thins * n_mappings
    if nr_data_blocks is None:
        nr_data_blocks = total
    if nr_data_blocks < total:
        raise ValueError("nr_data_blocks < total mappings")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(nr_data_blocks)[:total].astype(np.uint64)
    # guarantee no accidental runs (d[i+1] == d[i]+1 with same time): fix by swapping
    perm = perm.reshape(n_thins, n_mappings)
    origins = np.arange(n_mappings, dtype=np.uint64)
    devs = []
    for i in range(n_thins):
        d = perm[i]
        bad = np.flatnonzero(d[1:] == d[:-1] + 1)
        for b in bad:  # rare (~1/nr_data per pair); rotate the offender
            j = (b + 2) % n_mappings
            d[b + 1], d[j] = d[j], d[b + 1]
        times = np.zeros(n_mappings, dtype=np.uint64)
        devs.append(
            Device(
                dev_id=i,
                transaction=0,
                creation_time=0,
                snap_time=0,
                mappings=np.stack([origins, d, times], axis=1),
            )
        )
    return Pool(
        time=0,
        transaction=n_thins,
        data_block_size=data_block_size,
        nr_data_blocks=nr_data_blocks,
        devices=devs,
    )


def random_pool(
    seed: int,
    n_devices: int = 3,
    max_mappings: int = 300,
    p_snapshot: float = 0.4,
    nr_data_blocks: int | None = None,
    max_time: int = 10,
    data_block_size: int = 128,
    flags: int = 0,
) -> Pool:
    """A valid pool built by simulating create_thin / create_snap / writes with a seeded RNG."""
    rng = np.random.default_rng(seed)
    cap = max(16, n_devices * max_mappings * 2) if nr_data_blocks is None else nr_data_blocks
    next_free = 0
    order = rng.permutation(cap).astype(np.uint64)

    def alloc(k: int) -> np.ndarray:
        nonlocal next_free
        k = min(k, cap - next_free)
        out = order[next_free : next_free + k]
        next_free += k
        return out

    time = 0
    trans = 0
    devs: dict[int, Device] = {}
    used_ids: set[int] = set()
    for _ in range(n_devices):
        while True:
            dev_id = (
                int(rng.integers(0, 1 << 10))
                if rng.random() < 0.8
                else int(rng.integers(0, MAX_DEV_ID + 1))
            )
            if dev_id not in used_ids:
                break
        used_ids.add(dev_id)
        if devs and rng.random() < p_snapshot and time < max_time:
            origin = devs[int(rng.choice(list(devs)))]
            time += 1
            origin.snap_time = time
            d = Device(
                dev_id,
                origin.mappings.copy(),
                transaction=trans,
                creation_time=time,
                snap_time=time,
            )
            # diverge: CoW some of the snapshot's and origin's blocks at the new time
            for victim in (d, origin):
                n = len(victim.mappings)
                if n:
                    k = int(rng.integers(0, n // 2 + 1))
                    sel = rng.choice(n, k, replace=False)
                    new = alloc(k)
                    sel = sel[: len(new)]
                    victim.mappings[sel, 1] = new
                    victim.mappings[sel, 2] = time
        else:
            n = int(rng.integers(0, max_mappings + 1))
            span = max(n, int(n * rng.uniform(1, 4)))
            origins = (
                np.sort(rng.choice(span, n, replace=False)).astype(np.uint64)
                if n
                else np.zeros(0, np.uint64)
            )
            data = alloc(n)
            origins = origins[: len(data)]
            if rng.random() < 0.5 and len(data):  # make contiguous runs
                data = np.sort(data)
            times = rng.integers(0, time + 1, len(data)).astype(np.uint64)
            d = Device(
                dev_id,
                np.stack([origins, data, times], axis=1),
                transaction=trans,
                creation_time=time,
                snap_time=time,
            )
        devs[dev_id] = d
        trans += int(rng.integers(0, 3))
    if nr_data_blocks is None:
        nr_data_blocks = max(next_free + int(rng.integers(0, 100)), 1)
        # ids handed out come from a permutation of [0, cap) -> need nr_data_blocks > max id
        mx = max(
            (int(d.mappings[:, 1].max()) for d in devs.values() if len(d.mappings)), default=-1
        )
        nr_data_blocks = max(nr_data_blocks, mx + 1)
    pool = Pool(
        time=time,
        transaction=trans,
        data_block_size=data_block_size,
        nr_data_blocks=nr_data_blocks,
        devices=list(devs.values()),
        flags=flags,
    )
    pool.validate()
    return pool


# ----------------------------------------------------------------------------- hypothesis


def pools(max_devices: int = 6, max_mappings: int = 400, allow_big: bool = False):
    """Hypothesis strategy of valid pools.

    Draws the shape (device count, mappings, snapshot probability, data block size, flags,
    spare data blocks) and a seed; the bulk content comes from :func:`random_pool`.
    With ``allow_big`` some pools have thousands of mappings per thin (multi-level trees).
    Includes empty pools, shared (snapshot) data blocks, counts >= 3.
    """
    from hypothesis import strategies as st

    @st.composite
    def _pools(draw):
        n_devices = draw(st.integers(0, max_devices))
        mm = draw(st.sampled_from([0, 1, 5, max_mappings] + ([4000] if allow_big else [])))
        seed = draw(st.integers(0, 2**32 - 1))
        p_snap = draw(st.sampled_from([0.0, 0.5, 0.9]))
        dbs = draw(st.sampled_from([128, 256, 1024, 2_097_152]))
        flags = draw(st.sampled_from([0, 0, 1]))
        return random_pool(
            seed,
            n_devices=n_devices,
            max_mappings=mm,
            p_snapshot=p_snap,
            data_block_size=dbs,
            flags=flags,
            max_time=draw(st.sampled_from([3, 50, MAX_TIME])),
        )

    return _pools()
