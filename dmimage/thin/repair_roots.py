"""Rebuilding a lost top-level mapping tree, and choosing the newest generation, for salvage
(``dmimage repair``; docs/repair.md, "Lost top-level mapping tree").

A kernel-written metadata device holds stale copies of nodes from earlier transactions: every
commit shadows the path to what it changed, and blocks freed by transaction N are reused only
from N+1 on, so the previous generation's trees are intact next to the current ones. When the
top-level tree (device -> bottom-level root) is lost, each device's bottom-level tree is
found among the valid nodes on the device and matched to the device's details: its exact
``mapped_blocks``, mapping times no newer than the pool's, data blocks the data space map
counts as used, the roots stale top-level trees gave it (or another device), and which of
several versions is newer (a newer version of a tree only ever maps a key with a time at
least the older one's). When no single tree is left, the choice is noted as ambiguous.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dmimage.format.constants import MAPPING_VALUE_SIZE
from dmimage.format.values import DeviceDetails, unpack_mappings

if TYPE_CHECKING:
    from dmimage.thin.repair import SalvageReport, _Salvager

__all__ = ["Tree", "rebuild_top_level", "newest_first"]


@dataclass(slots=True)
class Tree:
    """A complete bottom-level tree found on the device (every node readable)."""

    root: int
    keys: np.ndarray
    blocks: np.ndarray
    times: np.ndarray
    signature: bytes

    @property
    def nr_mappings(self) -> int:
        return len(self.keys)

    @property
    def max_time(self) -> int:
        return int(self.times.max()) if len(self.times) else 0

    @property
    def max_block(self) -> int:
        return int(self.blocks.max()) if len(self.blocks) else -1


def read_tree(s: _Salvager, root: int) -> Tree | None:
    """The tree under ``root`` if every node of it is readable and every key in range."""
    saved = s.report.dropped_mappings
    leaves, lost = s.walk(root, MAPPING_VALUE_SIZE)
    dropped = s.report.dropped_mappings != saved
    s.report.dropped_mappings = saved
    if lost or dropped or any(lid >= s.n for lid, _, _ in leaves):
        return None
    if leaves:
        keys = np.concatenate([k for _, k, _ in leaves])
        vals = np.concatenate([v for _, _, v in leaves])
    else:
        keys = np.zeros(0, np.uint64)
        vals = np.zeros(0, np.uint64)
    blocks, times = unpack_mappings(vals)
    sig = hashlib.blake2b(keys.tobytes() + vals.tobytes(), digest_size=16).digest()
    return Tree(root, keys, blocks.astype(np.int64), times.astype(np.int64), sig)


def _newer(a: Tree, b: Tree) -> bool:
    """``a`` is a later version of ``b``: on every key both map, a's time is at least b's,
    and somewhere it is later (or a maps a data block b never saw, with the same times)."""
    common, ia, ib = np.intersect1d(a.keys, b.keys, assume_unique=True, return_indices=True)
    if not len(common):
        return False  # not versions of one tree
    ta, tb = a.times[ia], b.times[ib]
    if bool((ta < tb).any()):
        return False
    if bool((ta > tb).any()):
        return True
    # same times wherever both map: newer maps keys b does not have with later times
    only_a = np.setdiff1d(a.keys, common, assume_unique=True)
    only_b = np.setdiff1d(b.keys, common, assume_unique=True)
    if len(only_a) and len(only_b):
        return bool(a.times[np.isin(a.keys, only_a)].min()
                    > b.times[np.isin(b.keys, only_b)].max())
    return False


def newest_first(blocks: list[int], nr_blocks: int) -> list[int]:
    """Blocks ordered by how recently the kernel's metadata allocator handed them out, newest
    first: it allocates forward from a cursor and wraps at the end of the device, so the
    widest gap between the blocks (circularly) is where the cursor has not been."""
    if len(blocks) < 2:
        return list(blocks)
    srt = sorted(set(blocks))
    gaps = [(srt[(i + 1) % len(srt)] - srt[i]) % nr_blocks for i in range(len(srt))]
    start = (max(range(len(srt)), key=lambda i: gaps[i]) + 1) % len(srt)
    order = srt[start:] + srt[:start]  # oldest .. newest
    return order[::-1]


@dataclass(slots=True)
class Choice:
    tree: Tree | None
    how: str
    ambiguous: bool = False
    #: every distinct tree that fits the device (for the reference-count arbitration)
    options: list[Tree] = field(default_factory=list)


class TreeFinder:
    """Candidate bottom-level trees for devices, by mapping count (cached)."""

    def __init__(self, s: _Salvager, time_limit: int | None,
                 data_counts: np.ndarray | None) -> None:
        self.s = s
        self.time_limit = time_limit
        self.data_counts = data_counts
        self._trees: dict[int, Tree | None] = {}
        infos = s.infos()
        self.by_count: dict[int, list[int]] = {}
        for b, i in infos.items():
            if i is not None and i.kind == "map":
                self.by_count.setdefault(i.nr_mappings, []).append(b)

    def tree(self, b: int) -> Tree | None:
        if b not in self._trees:
            t = read_tree(self.s, b)
            if t is not None and not self.plausible(t):
                t = None
            self._trees[b] = t
        return self._trees[b]

    def plausible(self, t: Tree) -> bool:
        """No mapping newer than the pool, none of a data block the pool counts as free."""
        if self.time_limit is not None and t.max_time > self.time_limit:
            return False
        c = self.data_counts
        if c is not None and len(t.blocks):
            if t.max_block >= len(c) or not bool((c[t.blocks] > 0).all()):
                return False
        return True

    def candidates(self, count: int) -> list[Tree]:
        out = []
        for b in self.by_count.get(count, []):
            t = self.tree(b)
            if t is not None and t.nr_mappings == count:
                out.append(t)
        return out


def choose_tree(dev: int, want: int, cands: list[Tree], prior: int | None,
                others: set[int]) -> Choice:
    """One device's tree among the complete trees holding exactly its mapped_blocks.

    ``prior``: the root the best stale top-level tree gives this device; ``others``: roots
    stale top-level trees give other devices (and never this one) with their exact counts --
    those are the other devices' trees, not this one's."""
    own = [t for t in cands if t.root not in others or t.root == prior]
    if not own:
        own = cands
    groups: dict[bytes, list[Tree]] = {}
    for t in own:
        groups.setdefault(t.signature, []).append(t)
    if not groups:
        return Choice(None, "no tree on the device holds its mapped_blocks "
                      f"({want})")
    reps = [g[0] for g in groups.values()]
    options = [pick_of(g, prior) for g in groups.values()]
    choice = _choose(want, groups, reps, prior)
    choice.options = options
    return choice


def pick_of(group: list[Tree], prior: int | None) -> Tree:
    for t in group:
        if t.root == prior:
            return t
    return min(group, key=lambda t: t.root)


def _choose(want: int, groups: dict[bytes, list[Tree]], reps: list[Tree], prior: int | None
            ) -> Choice:
    """The stale top-level tree's root when it fits (a newer tree that fits too is another
    device's as often as this one's: only the data space map can tell, see _arbitrate);
    otherwise the one tree no other fitting tree is a newer version of."""
    prior_rep = next((r for r in reps if any(t.root == prior for t in groups[r.signature])),
                     None)
    if prior_rep is not None:
        t = pick_of(groups[prior_rep.signature], prior)
        newer = [r for r in reps if r is not prior_rep and _newer(r, prior_rep)]
        if newer:
            return Choice(t, f"ambiguous: {len(reps)} trees hold its {want} mappings, "
                          f"{len(newer)} of them newer; the stale top-level tree's root kept",
                          True)
        return Choice(t, "the stale top-level tree's root")
    if len(reps) > 1:  # older versions of a tree give way to newer ones
        reps = [a for a in reps if not any(b is not a and _newer(b, a) for b in reps)]
    if len(reps) == 1:
        t = pick_of(groups[reps[0].signature], prior)
        how = f"the only tree holding its {want} mappings"
        if prior is not None:
            how += f" (the stale top-level tree had block {prior})"
        return Choice(t, how)
    # nothing says which tree is this device's: a guess could return wrong mappings
    return Choice(None, f"ambiguous: {len(reps)} trees hold its {want} mappings and no "
                  "stale top-level tree names one", True)


def _arbitrate(finder: TreeFinder, sm: np.ndarray, out: dict[int, int],
               options: dict[int, list[Tree]], how: dict[int, str], ambiguous: list[int]
               ) -> None:
    """Where several trees fit a device, take the one with which every data block is mapped
    by as many devices as the data space map counts (the kernel commits both together)."""
    n = len(sm)
    ref = sm.astype(np.int64)

    def bc(t: Tree | None) -> np.ndarray:
        if t is None or not len(t.blocks):
            return np.zeros(n, np.int64)
        return np.bincount(t.blocks, minlength=n)[:n]

    chosen = {d: finder.tree(r) if r >= 0 else None for d, r in out.items()}
    counts = np.zeros(n, np.int64)
    for t in chosen.values():
        counts += bc(t)
    for _ in range(4):
        changed = False
        for dev, opts in sorted(options.items()):
            cur = chosen.get(dev)
            base = counts - bc(cur)
            costs = [(int(np.abs(base + bc(t) - ref).sum()), t is not cur, i)
                     for i, t in enumerate(opts)]
            costs.sort()
            best = opts[costs[0][2]]
            unique = len(costs) == 1 or costs[0][0] < costs[1][0]
            if best is not cur and unique:
                chosen[dev] = best
                counts = base + bc(best)
                out[dev] = best.root
                how[dev] = (f"{len(opts)} trees hold its mappings; the one the data space "
                            "map's reference counts agree with")
                changed = True
            if unique and dev in ambiguous:
                ambiguous.remove(dev)
                if best is cur:
                    how[dev] = (f"{len(opts)} trees hold its mappings; the stale top-level "
                                "tree's, which the data space map's reference counts agree "
                                "with")
        if not changed:
            break


def rebuild_top_level(s: _Salvager, report: SalvageReport, details: dict[int, DeviceDetails],
                      stale_tops: list[dict[int, int]], time_limit: int | None,
                      data_counts: np.ndarray | None) -> dict[int, int]:
    """device -> bottom-level root for every device of ``details`` that can be matched
    (-1: an empty tree); ``stale_tops``: the top-level trees found by scanning, best first."""
    finder = TreeFinder(s, time_limit, data_counts)

    def fits(dev: int, root: int) -> bool:
        t = finder.tree(root)
        return t is not None and t.nr_mappings == details[dev].mapped_blocks

    # the stale top-level tree agreeing with the details on the most devices is the prior
    prior: dict[int, int] = {}
    if stale_tops:
        scored = [(sum(1 for d, r in top.items() if d in details and fits(d, r)), -i)
                  for i, top in enumerate(stale_tops)]
        best = stale_tops[-max(scored)[1]]
        prior = {d: r for d, r in best.items() if d in details}
    claims: dict[int, set[int]] = {}
    for top in stale_tops:
        for d, r in top.items():
            if d in details and fits(d, r):
                claims.setdefault(r, set()).add(d)
    out: dict[int, int] = {}
    options: dict[int, list[Tree]] = {}
    how: dict[int, str] = {}
    ambiguous: list[int] = []
    for dev, det in sorted(details.items()):
        want = det.mapped_blocks
        if want == 0:
            out[dev] = -1
            how[dev] = "empty (mapped_blocks 0)"
            continue
        others = {r for r, devs in claims.items() if dev not in devs}
        choice = choose_tree(dev, want, finder.candidates(want), prior.get(dev), others)
        if choice.ambiguous:
            ambiguous.append(dev)
        if choice.tree is None:
            p = prior.get(dev)
            if p is not None and finder.tree(p) is not None:
                out[dev] = p
                how[dev] = f"{choice.how}; the stale top-level tree's root used"
                if dev not in ambiguous:
                    ambiguous.append(dev)
            else:
                report.dropped_devices.append(dev)
                report.notes.append(f"device {dev}: left out ({choice.how})")
            continue
        out[dev] = choice.tree.root
        how[dev] = choice.how
        if len(choice.options) > 1:
            options[dev] = choice.options
    if data_counts is not None and options:
        _arbitrate(finder, data_counts, out, options, how, ambiguous)
    # One new tree chosen for several devices that no stale tree shows sharing it: it is one
    # device's newer version (say a snapshot's copy-on-write) and the metadata cannot say
    # whose. Each falls back to its stale root, as the previous generation had it.
    users: dict[int, list[int]] = {}
    for dev, root in out.items():
        if root >= 0:
            users.setdefault(root, []).append(dev)
    for root, devs in users.items():
        if len(devs) > 1 and not all(prior.get(d) == root for d in devs):
            for dev in devs:
                p = prior.get(dev)
                if p == root:
                    continue
                if dev not in ambiguous:
                    ambiguous.append(dev)
                if p is not None and finder.tree(p) is not None:
                    out[dev] = p
                    how[dev] = (f"ambiguous: block {root} fits devices {devs}; the stale "
                                f"top-level tree's root kept")
                else:
                    del out[dev]
                    report.dropped_devices.append(dev)
                    report.notes.append(f"device {dev}: left out (ambiguous: block {root} "
                                        f"fits devices {devs})")
    report.dropped_devices.sort()
    for dev in sorted(out):
        where = "empty" if out[dev] < 0 else f"block {out[dev]}"
        report.tree_sources[dev] = f"{where}: {how[dev]}"
        report.notes.append(f"device {dev}: bottom-level tree {where} ({how[dev]})")
    report.ambiguous_devices.extend(sorted(ambiguous))
    if report.dropped_devices:
        report.notes.append(f"devices without a recognisable mapping tree, left out: "
                            f"{report.dropped_devices[:10]}")
    return out
