"""Canonical (semantic) form of thin_dump output, and pool comparison.

Parses the XML of thin_dump 0.9 (always flags="..", never <def>) and 1.1 (flags only when set,
<def name>/<ref name> for shared leaf runs), and the ``--format human_readable`` text of both
(0.9 prints singles as ``V -> D, T``; 1.1 as ``(V..V) -> (D..D), T``), into a
:class:`poolgen.Pool`: superblock attributes + per device details + mappings as a sorted
(n, 3) uint64 array [origin, data, time] with refs and ranges expanded.

Independent of ``dmimage`` (oracle side).
"""

from __future__ import annotations

import io
import itertools
import re
import xml.etree.ElementTree as ET

import numpy as np

try:  # imported as top-level module (tests/ on sys.path) or as tests.semantic
    from poolgen import Device, Pool
except ImportError:  # pragma: no cover
    from tests.poolgen import Device, Pool

__all__ = [
    "parse_xml",
    "parse_human",
    "parse_dump",
    "expand_runs",
    "diff_pools",
    "same_pool",
    "assert_same_pool",
    "SameResult",
]


def expand_runs(runs: list[tuple[int, int, int, int]] | np.ndarray) -> np.ndarray:
    """[(origin_begin, data_begin, length, time), ...] -> sorted (n, 3) uint64 mappings."""
    r = np.asarray(runs, dtype=np.uint64).reshape(-1, 4)
    if len(r) == 0:
        return np.zeros((0, 3), dtype=np.uint64)
    lengths = r[:, 2].astype(np.int64)
    if np.any(lengths <= 0):
        raise ValueError("run with length 0")
    total = int(lengths.sum())
    run_id = np.repeat(np.arange(len(r)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    off = (np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)).astype(np.uint64)
    out = np.empty((total, 3), dtype=np.uint64)
    out[:, 0] = r[run_id, 0] + off
    out[:, 1] = r[run_id, 1] + off
    out[:, 2] = r[run_id, 3]
    if total > 1:
        o = out[:, 0]
        if not np.all(o[1:] > o[:-1]):
            order = np.argsort(o, kind="stable")
            out = out[order]
            if np.any(out[1:, 0] == out[:-1, 0]):
                raise ValueError("duplicate origin block in dump")
    return out


_SB_INT = (
    "time",
    "transaction",
    "flags",
    "version",
    "data_block_size",
    "nr_data_blocks",
    "metadata_snap",
)


def _pool_from(sb: dict, devices: list[tuple[dict, list]]) -> Pool:
    def gi(k, default=None):
        v = sb.get(k)
        return default if v is None or v == "" else int(v)

    devs = []
    for det, runs in devices:
        m = expand_runs(runs)
        mb = int(det["mapped_blocks"])
        devs.append(
            Device(
                dev_id=int(det["dev_id"]),
                mappings=m,
                transaction=int(det["transaction"]),
                creation_time=int(det["creation_time"]),
                snap_time=int(det["snap_time"]),
                mapped_blocks_override=None if mb == len(m) else mb,
            )
        )
    return Pool(
        time=gi("time", 0),
        transaction=gi("transaction", 0),
        flags=gi("flags", 0),
        version=gi("version"),
        data_block_size=gi("data_block_size", 0),
        nr_data_blocks=gi("nr_data_blocks", 0),
        metadata_snap=gi("metadata_snap"),
        uuid=sb.get("uuid") or "",
        devices=devs,
    )


_F_SB = re.compile(r"<superblock\b([^>]*)>")
_F_SECTION = re.compile(r"<(device|def)\b([^>]*)>(.*?)</\1>", re.S)
_F_ATTR = re.compile(r'(\w+)="([^"]*)"')
_F_SINGLE = re.compile(r'<single_mapping origin_block="(\d+)" data_block="(\d+)" time="(\d+)"/>')
_F_RANGE = re.compile(
    r'<range_mapping origin_begin="(\d+)" data_begin="(\d+)" length="(\d+)" time="(\d+)"/>'
)
_F_REF = re.compile(r'<ref name="([^"]*)"/>')


def _nums(tuples: list[tuple[str, ...]], ncols: int) -> np.ndarray:
    flat = " ".join(itertools.chain.from_iterable(tuples))
    return np.fromstring(flat, dtype=np.uint64, sep=" ").reshape(-1, ncols)


def _parse_xml_fast(t: str) -> Pool | None:
    """Regex fast path for tool output (fixed attribute order).  None if anything is unusual."""
    m = _F_SB.search(t)
    if not m:
        return None
    sb = dict(_F_ATTR.findall(m.group(1)))
    defs: dict[str, np.ndarray] = {}
    devices = []
    seen = m.end()
    for sec in _F_SECTION.finditer(t):
        if t[seen : sec.start()].strip():
            return None
        seen = sec.end()
        kind, attrs, body = sec.group(1), dict(_F_ATTR.findall(sec.group(2))), sec.group(3)
        singles = _F_SINGLE.findall(body)
        ranges = _F_RANGE.findall(body)
        refs = _F_REF.findall(body)
        if body.count("<") != len(singles) + len(ranges) + len(refs):
            return None
        parts = []
        if singles:
            a = _nums(singles, 3)
            parts.append(np.stack([a[:, 0], a[:, 1], np.ones(len(a), np.uint64), a[:, 2]], axis=1))
        if ranges:
            parts.append(_nums(ranges, 4))
        for r in refs:
            if r not in defs:
                return None
            parts.append(defs[r])
        runs = np.concatenate(parts) if parts else np.zeros((0, 4), np.uint64)
        if kind == "def":
            defs[attrs["name"]] = runs
        else:
            devices.append((attrs, runs))
    if t[seen:].strip() != "</superblock>":
        return None
    return _pool_from(sb, devices)


def parse_xml(text: str | bytes) -> Pool:
    """thin_dump XML (0.9 or 1.1) -> Pool.  <ref>s are spliced in, ranges expanded.

    Tool output goes through a regex fast path; anything unusual (other attribute order,
    comments, ...) falls back to a full XML parse."""
    t = text.decode() if isinstance(text, bytes) else text
    fast = _parse_xml_fast(t)
    if fast is not None:
        return fast
    return _parse_xml_etree(t)


def _parse_xml_etree(text: str | bytes) -> Pool:
    data = text.encode() if isinstance(text, str) else text
    sb: dict = {}
    defs: dict[str, list] = {}
    devices: list[tuple[dict, list]] = []
    cur: list | None = None
    cur_dev: dict | None = None
    for ev, el in ET.iterparse(io.BytesIO(data), events=("start", "end")):
        tag = el.tag
        if ev == "start":
            a = el.attrib
            if tag == "single_mapping":
                cur.append((int(a["origin_block"]), int(a["data_block"]), 1, int(a["time"])))
            elif tag == "range_mapping":
                cur.append(
                    (int(a["origin_begin"]), int(a["data_begin"]), int(a["length"]), int(a["time"]))
                )
            elif tag == "ref":
                cur.extend(defs[a["name"]])
            elif tag == "device":
                cur_dev, cur = dict(a), []
            elif tag == "def":
                cur = defs.setdefault(a["name"], [])
            elif tag == "superblock":
                sb = dict(a)
            else:
                raise ValueError(f"unexpected element <{tag}>")
        else:
            if tag == "device":
                devices.append((cur_dev, cur))
                cur_dev = cur = None
            elif tag == "def":
                cur = None
            el.clear()
    return _pool_from(sb, devices)


_HR_SB = re.compile(r'^begin superblock: "([^"]*)"((?:,\s*\d+)*)\s*$')
_HR_RANGE = re.compile(r"^\s+\((\d+)\.\.(\d+)\) -> \((\d+)\.\.(\d+)\), (\d+)\s*$")
_HR_SINGLE = re.compile(r"^\s+(\d+) -> (\d+), (\d+)\s*$")
_HR_KV = re.compile(r"^(device|mapped_blocks|transaction|creation time|snap time): (\d+)\s*$")
_HR_KEYS = {
    "device": "dev_id",
    "mapped_blocks": "mapped_blocks",
    "transaction": "transaction",
    "creation time": "creation_time",
    "snap time": "snap_time",
}


def parse_human(text: str) -> Pool:
    """thin_dump --format human_readable (0.9 or 1.1) -> Pool."""
    sb: dict = {}
    defs: dict[str, list] = {}
    devices: list[tuple[dict, list]] = []
    cur: list | None = None
    cur_dev: dict | None = None

    def close():
        nonlocal cur, cur_dev
        if cur_dev is not None:
            devices.append((cur_dev, cur))
        cur_dev = cur = None

    for line in text.splitlines():
        if not line.strip():
            continue
        m = _HR_RANGE.match(line)
        if m:
            vb, ve, db, de, t = map(int, m.groups())
            if ve - vb != de - db or ve < vb:
                raise ValueError(f"bad range line {line!r}")
            cur.append((vb, db, ve - vb + 1, t))
            continue
        m = _HR_SINGLE.match(line)
        if m:
            v, d, t = map(int, m.groups())
            cur.append((v, d, 1, t))
            continue
        s = line.strip()
        if s.startswith("ref: "):
            cur.extend(defs[s[5:].strip()])
            continue
        if s.startswith("def: "):
            close()
            cur = defs.setdefault(s[5:].strip(), [])
            continue
        m = _HR_KV.match(s)
        if m:
            k, v = _HR_KEYS[m.group(1)], m.group(2)
            if k == "dev_id":
                close()
                cur_dev, cur = {}, []
            cur_dev[k] = v
            continue
        m = _HR_SB.match(s)
        if m:
            vals = [x.strip() for x in m.group(2).split(",") if x.strip()]
            keys = [
                "time",
                "transaction",
                "flags",
                "version",
                "data_block_size",
                "nr_data_blocks",
                "metadata_snap",
            ]
            sb = {"uuid": m.group(1), **dict(zip(keys, vals, strict=False))}
            continue
        if s == "end superblock":
            close()
            continue
        raise ValueError(f"unparsed human_readable line {line!r}")
    close()
    return _pool_from(sb, devices)


def parse_dump(text: str | bytes) -> Pool:
    """Either format, sniffed from the first non-blank character."""
    t = text.decode() if isinstance(text, bytes) else text
    return parse_xml(t) if t.lstrip().startswith("<") else parse_human(t)


# ----------------------------------------------------------------------------- comparison


class SameResult:
    """Truthy iff the pools are the same; ``str()`` / ``.message`` is the readable diff."""

    def __init__(self, diffs: list[str]):
        self.diffs = diffs

    def __bool__(self) -> bool:
        return not self.diffs

    @property
    def message(self) -> str:
        return (
            "pools are the same"
            if not self.diffs
            else "pools differ:\n  " + "\n  ".join(self.diffs)
        )

    __str__ = message.fget  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SameResult({self.message!r})"


def _mapping_diff(dev_id: int, a: np.ndarray, b: np.ndarray, limit: int) -> list[str]:
    out = []
    if len(a) != len(b):
        out.append(f"device {dev_id}: {len(a)} vs {len(b)} mappings")
    # compare by origin
    ao = {int(r[0]): (int(r[1]), int(r[2])) for r in a} if len(a) < 200_000 else None
    if ao is None:  # big: vectorised first-difference report
        n = min(len(a), len(b))
        neq = np.flatnonzero(np.any(a[:n] != b[:n], axis=1))
        for i in neq[:limit]:
            out.append(
                f"device {dev_id}: row {i}: {tuple(map(int, a[i]))} vs {tuple(map(int, b[i]))}"
            )
        if len(neq) > limit:
            out.append(f"device {dev_id}: ... {len(neq) - limit} more differing rows")
        return out
    bo = {int(r[0]): (int(r[1]), int(r[2])) for r in b}
    shown = 0
    for o in sorted(ao.keys() | bo.keys()):
        x, y = ao.get(o), bo.get(o)
        if x != y:
            if shown < limit:
                fx = "unmapped" if x is None else f"data {x[0]} time {x[1]}"
                fy = "unmapped" if y is None else f"data {y[0]} time {y[1]}"
                out.append(f"device {dev_id}: origin {o}: {fx} vs {fy}")
            shown += 1
    if shown > limit:
        out.append(f"device {dev_id}: ... {shown - limit} more differing origins")
    return out


def diff_pools(a: Pool, b: Pool, ignore: tuple[str, ...] = (), limit: int = 10) -> list[str]:
    """Human-readable differences (empty list = same).

    *ignore* names superblock or device-detail fields to skip (e.g. "version", "nr_data_blocks",
    "flags", "mapped_blocks", "uuid").  Superblock fields that are None on either side
    (version / metadata_snap unspecified) are skipped, except metadata_snap when only one side
    has it set.
    """
    out = []
    sa, sb = a.superblock(), b.superblock()
    for k in sa:
        if k in ignore:
            continue
        x, y = sa[k], sb[k]
        if k == "version" and (x is None or y is None):
            continue
        if x != y:
            out.append(f"superblock {k}: {x!r} vs {y!r}")
    ia, ib = [d.dev_id for d in a.devices], [d.dev_id for d in b.devices]
    if ia != ib:
        out.append(
            f"device ids: only left {sorted(set(ia) - set(ib))}, only right "
            f"{sorted(set(ib) - set(ia))}"
        )
    bd = {d.dev_id: d for d in b.devices}
    for da in a.devices:
        db = bd.get(da.dev_id)
        if db is None:
            continue
        xa, xb = da.details(), db.details()
        for k in xa:
            if k not in ignore and xa[k] != xb[k]:
                out.append(f"device {da.dev_id} {k}: {xa[k]} vs {xb[k]}")
        if not (
            da.mappings.shape == db.mappings.shape and np.array_equal(da.mappings, db.mappings)
        ):
            out.extend(_mapping_diff(da.dev_id, da.mappings, db.mappings, limit))
    return out


def same_pool(a: Pool, b: Pool, ignore: tuple[str, ...] = (), limit: int = 10) -> SameResult:
    """Compare two canonical pools; the result is truthy iff equal and prints as a diff."""
    return SameResult(diff_pools(a, b, ignore=ignore, limit=limit))


def assert_same_pool(a: Pool, b: Pool, ignore: tuple[str, ...] = (), limit: int = 10) -> None:
    r = same_pool(a, b, ignore=ignore, limit=limit)
    if not r:
        raise AssertionError(r.message)
