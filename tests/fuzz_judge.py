"""Rules the fuzz harness judges dmimage's answers by (pure functions, no I/O).

Three judgements per damaged input, all starting from ``dmimage check``'s report (whose own
verdict is judged against thin_check 1.1):

1. **Readers agree with check** (:func:`reader_failures`). ``dump``, ``ls``, ``delta``,
   ``rmap`` and ``export`` validate every tree node they read as strictly as check does, but
   they read only part of the metadata and check nothing about the *values* they print. So:

   * a fatal check problem in a structure the command reads (:meth:`Reader.reads`: the
     superblock, details and top-level trees, and its devices' trees; the problem's
     ``scope`` says where check met it) -> the command exits 1;
   * otherwise it exits 0. That covers damage only in the space maps (no reader opens them:
     dump + restore is the way out of a damaged space map, so dump must work then), in the held
     metadata snapshot (read only with ``-m``), in a device the command does not read
     (``delta`` and ``export`` read the devices they name), and two value-only problems
     (:data:`VALUE_ONLY`): a details ``mapped_blocks`` that disagrees with the tree, and a
     mapping beyond the data device, which the readers print as they are (so does thin_dump
     1.1) -- except ``export``, which would read data at that block and so must exit 1;
   * ``ls`` and ``rmap`` also answer despite an underfull node (documented in docs/tools.md);
   * ``export`` may also exit 2 (data device too small) when the superblock's nr_data_blocks
     x data_block_size, read from the raw bytes by the harness, exceeds the data file (sized
     for the base pool at the kernel's largest data block size, 1 GiB).

   Check reports a node shared by several trees under the first walk that meets it (devices in
   ascending id order), so the device-scoped commands name the lowest ids (export 1's scope is
   {1}, delta 1 2's is {1, 2}): a node of device 2 that device 1 shares is then in scope.
2. **Repair** (:func:`repair_failures`): ``repair`` and ``dump --repair`` (the same salvage)
   agree; a clean input is repaired (exit 0) without changing its dump; every repaired output
   checks clean with dmimage (and thin_check 1.1: the caller's part).
3. **Check vs thin_check 1.1** (:func:`verdict_failure`): equal verdicts, or dmimage stricter
   under exactly one :class:`StricterRule` that explains *every* problem reported (a
   counterfactual rule: see :attr:`StricterRule.counterfactual`; a rule with
   :attr:`StricterRule.consistent` also checks that the problems' numbers add up). Inputs of several
   mutations are split by the harness (fuzz_run.Run.decompose) when no single rule does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Problem = Mapping[str, Any]  # one entry of ``check --json``'s "problems"
Result = Mapping[str, Any]  # one command's result from fuzz_worker

#: Exit codes (docs/cli.md).
OK, DAMAGED, IO_ERROR = 0, 1, 2

READERS = ("dump", "ls", "delta", "rmap", "export")
#: (field, message pattern) of problems that concern values the readers print but never use
#: to find anything: they do not stop dump/ls/delta/rmap (export: see ``reads_values``).
#: ls and rmap list a tree with underfull nodes (docs/tools.md: the node is sound, only thin_check's
#: fill rule fails; thin_ls 1.1 refuses it); dump refuses it like thin_dump's restore would.
UNDERFULL = "underfull node"
VALUE_ONLY = (("mapped_blocks", "details say"), ("mapping value", "point beyond the data device"))


@dataclass(frozen=True)
class Reader:
    """A read-only command as the harness runs it."""

    name: str
    #: device ids it reads; None: every device
    devices: tuple[int, ...] | None
    #: reads the data at each mapping (a mapping beyond the data device is then fatal)
    reads_values: bool = False
    #: counts underfull nodes like any other (ls, rmap: docs/tools.md)
    lenient_fill: bool = False

    def reads(self, p: Problem) -> bool:
        scope = p.get("scope") or ""
        if scope in ("superblock", "details", "top-level"):
            return True
        if not scope.startswith("device:"):
            return False
        return self.devices is None or int(scope.split(":")[1]) in self.devices

    def stopped_by(self, p: Problem) -> bool:
        """Must this problem make the command exit 1?"""
        if not p.get("fatal", True) or not self.reads(p):
            return False
        if self.lenient_fill and p.get("field") == "nr_entries" and UNDERFULL in p["message"]:
            return False
        for field, pattern in VALUE_ONLY:
            if p.get("field") == field and pattern in p.get("message", ""):
                return self.reads_values and field == "mapping value"
        return True


def reader_failures(readers: Sequence[Reader], problems: Sequence[Problem],
                    results: Mapping[str, Result], *, data_short: bool = False) -> list[str]:
    """``data_short``: the superblock says the data device is bigger than the data file the
    harness gave export (a damaged nr_data_blocks or data_block_size); export may then also
    exit 2, the documented I/O error "data device has N bytes, the mappings need M"."""
    out = []
    for r in readers:
        res = results.get(r.name)
        if res is None:
            out.append(f"{r.name}: did not run")
            continue
        if res["error"]:
            continue  # reported as a traceback/hang already
        stoppers = [p for p in problems if r.stopped_by(p)]
        want = DAMAGED if stoppers else OK
        if res["rc"] == IO_ERROR and data_short and r.reads_values:
            continue
        if res["rc"] != want:
            why = (f"check reports {short(stoppers[0])} in what it reads" if stoppers
                   else "check reports nothing in what it reads"
                   + (f" (only: {short(problems[0])})" if problems else ""))
            out.append(f"{r.name}: exit {res['rc']}, expected {want}: {why}")
    return out


def repair_failures(problems: Sequence[Problem], results: Mapping[str, Result],
                    repaired_report: Mapping[str, Any] | None,
                    dumps_equal: bool | None) -> list[str]:
    out: list[str] = []
    rep, dump_rep = results.get("repair"), results.get("dump --repair")
    if rep is None or dump_rep is None or rep["error"] or dump_rep["error"]:
        return out
    if rep["rc"] not in (OK, DAMAGED):
        out.append(f"repair: exit {rep['rc']} (0 or 1 expected)")
    if rep["rc"] != dump_rep["rc"]:
        out.append(f"repair exit {rep['rc']} but dump --repair exit {dump_rep['rc']} (the same "
                   "salvage)")
    fatal = [p for p in problems if p.get("fatal", True)]
    if not fatal and rep["rc"] != OK:
        out.append(f"repair: exit {rep['rc']} on an input check finds no fatal problem in")
    if rep["rc"] == OK:
        if repaired_report is None:
            out.append("repair succeeded but its output was not checked")
        elif not repaired_report.get("ok"):
            out.append("repair's output does not check clean: "
                       + "; ".join(short(p) for p in repaired_report.get("problems", [])[:3]))
        if not fatal and dumps_equal is False:
            out.append("repair changed the dump of an input without fatal problems")
    return out


@dataclass(frozen=True)
class StricterRule:
    """One documented case where dmimage's check fails metadata thin_check 1.1 passes.

    ``matchers`` are (field regex, message regex) pairs: the problem(s) this one rule produces --
    the wrong field itself and, where one wrong field is necessarily seen from more than one
    side, each of those views, named one by one.
    """

    name: str
    why: str
    matchers: tuple[tuple[str, str], ...]
    #: the rule's consequences are checked, not named: the harness rewrites the one field
    #: to what 1.1 reads it as (fuzz_run.normalize_headers) and dmimage must then find nothing
    counterfactual: bool = False
    #: the numbers in the problems must also add up (all of them, together)
    consistent: Callable[[Sequence[Problem]], bool] | None = None

    def explains(self, p: Problem) -> bool:
        field = p.get("field") or ""
        msg = p.get("message", "")
        return any(re.fullmatch(f, field) and re.search(m, msg) for f, m in self.matchers)

    def explains_all(self, problems: Sequence[Problem]) -> bool:
        return all(self.explains(p) for p in problems) and (
            self.consistent is None or self.consistent(problems))


_DATA_NR_BLOCKS = (
    ("mapping value", r"mappings point beyond the data device"),
    (r"data space map bitmap \d+", r"^data space map: bitmap entries set beyond nr_blocks"),
    ("data space map index", r"^data space map index has \d+ entries, expected \d+"),
    ("data space map root nr_allocated", r"nr_allocated is \d+ but \d+ blocks are in use"),
)

_KEY_AT_END = re.compile(r"keys (\d+)\.\.(\d+) outside (?:the )?parent(?:'s)? range (\d+)\.\.(\d+)")
_MAPPED_SHORT = re.compile(r"details say (\d+) mapped blocks, its mapping tree holds (\d+)")
_DATA_LEAKS = re.compile(r"^data space map: (\d+) leaked blocks")
_DATA_WRONG = re.compile(r"^data space map: (\d+) blocks with wrong reference counts \((.*)\)$")
_STORED = re.compile(r"stored (\d+), expected (\d+)")


def _key_at_range_end(problems: Sequence[Problem]) -> bool:
    """Each key problem is a child's last key equal to the parent's next key (one past the
    range: what 1.1 lets through), so each loses exactly one mapping; the consequences are
    no more than those mappings: a device's mapping tree short by at most that many (by
    exactly as many as its own key problems), their data blocks counted once too often."""
    lost: dict[str, int] = {}
    for p in problems:
        if p.get("field") != "keys":
            continue
        m = _KEY_AT_END.search(p.get("message", ""))
        if m is None:
            return False
        first, last, lo, top = (int(x) for x in m.groups())
        if first < lo or last != top + 1:
            return False
        scope = p.get("scope") or ""
        lost[scope] = lost.get(scope, 0) + 1
    total = sum(lost.values())
    short_by: dict[str, int] = {}
    data = 0
    for p in problems:
        msg = p.get("message", "")
        if p.get("field") == "mapped_blocks":
            m = _MAPPED_SHORT.search(msg)
            if m is None:
                return False
            short_by[p.get("scope") or ""] = int(m[1]) - int(m[2])
        elif (m := _DATA_LEAKS.search(msg)) is not None:
            data += int(m[1])
        elif (m := _DATA_WRONG.search(msg)) is not None:
            data += int(m[1])
            if any(int(st) != int(ex) + 1 for st, ex in _STORED.findall(m[2])):
                return False
    return (total > 0 and data <= total
            and all(1 <= d <= total for d in short_by.values())
            and all(short_by.get(scope) == n for scope, n in lost.items()
                    if scope.startswith("device:")))


def _data_index_root_seen(problems: Sequence[Problem]) -> bool:
    """One data index root met before in another tree, and only what an unreadable data
    index leaves: no bitmap found (counts read as 0), so every referenced data block is
    short and nr_allocated disagrees."""
    roots = [p for p in problems if "node shared between trees of different value sizes"
             in p.get("message", "")]
    return (len(roots) == 1 and all(p.get("scope") == "data-space-map" for p in problems)
            and all(int(st) == 0 for p in problems
                    for st, _ in _STORED.findall(p.get("message", ""))))


STRICTER_RULES = (
    StricterRule("nr_allocated", "1.1 does not compare nr_allocated with the counts; the "
                 "kernel's free-space accounting trusts it (non-fatal, --auto-repair fixes it)",
                 (("(meta)?data space map root nr_allocated",
                   r"space map: nr_allocated is \d+ but \d+ blocks are in use"),)),
    StricterRule("superblock-magic", "1.1 does not look at the magic; the kernel refuses it",
                 (("magic", r"^bad magic"),)),
    StricterRule("superblock-blocknr", "1.1 does not check block 0's self-location; the "
                 "kernel's validator does", (("blocknr", r"^superblock says it is block"),)),
    StricterRule("bitmap-blocknr", "1.1 ignores a bitmap's self-location; the kernel's bitmap "
                 "validator refuses it", (("blocknr", r"bitmap \d+: bitmap says it is block"),)),
    StricterRule("incompat-flags", "1.1 ignores incompat_flags; the kernel refuses to open "
                 "the pool", (("incompat_flags", r"^incompat_flags"),)),
    StricterRule("data-nr-blocks-too-small", "the data space map's nr_blocks (superblock) is "
                 "smaller than what the pool uses: 1.1 does not look at the data device size, "
                 "the kernel fails; seen as mappings beyond it, bitmap entries beyond it, too "
                 "many index entries and the nr_allocated those entries imply",
                 _DATA_NR_BLOCKS),
    StricterRule("metadata-nr-blocks-too-small", "the metadata space map's nr_blocks is "
                 "smaller than the blocks in use: 1.1 reads what exists, the kernel fails",
                 ((r"metadata space map bitmap \d+",
                   r"^metadata space map: bitmap entries set beyond nr_blocks"),
                  ("", r"^metadata space map: \d+ referenced blocks lie beyond its nr_blocks"),
                  ("metadata space map root nr_allocated",
                   r"nr_allocated is \d+ but \d+ blocks are in use"))),
    StricterRule("space-map-too-big", "a space map's nr_blocks needs more bitmaps than its "
                 "index or the device holds: 1.1 reads the entries that exist, the kernel's "
                 "resume fails",
                 (("metadata_space_map_root.nr_blocks", r"more than the 255 an index block"),
                  ("data space map root nr_blocks",
                   r"needs more bitmaps than the metadata device has blocks"),
                  ("metadata space map root nr_blocks",
                   r"needs more bitmaps than the metadata device has blocks"))),
    StricterRule("missing-overflow-entry", "a count of 3 with no ref-count tree entry: 1.1 "
                 "accepts it when the true count is >= 3, the kernel's lookup fails (ENODATA)",
                 (("ref_count_root", r"has bitmap count 3 but no ref-count tree entry"),)),
    StricterRule("ref-count-child-beyond-device", "a data ref-count tree child pointer beyond "
                 "the metadata device: 1.1 passes it (the subtree is skipped), the kernel's "
                 "count lookups through it fail; the counts that subtree held are then missing",
                 (("", r"^data space map ref-count tree: block number out of range"),
                  ("ref_count_root", r"has bitmap count 3 but no ref-count tree entry"))),
    StricterRule("data-index-keys", "1.1 reads the data index entries in order and ignores "
                 "their keys; the kernel looks bitmaps up by key",
                 (("data space map index", r"^data space map index keys are not"),)),
    StricterRule("key-at-range-end", "a child's last key equal to its parent's next key: "
                 "1.1 compares the child's highest key with the range's end as if the end were "
                 "inclusive, the kernel routes that key to the next child and never finds it; "
                 "the one lost mapping per such key shows in mapped_blocks and the data counts "
                 "(checked: the numbers must add up)",
                 (("keys", r"keys \d+\.\.\d+ outside (the )?parent('s)? range"),
                  ("mapped_blocks", r"details say \d+ mapped blocks, its mapping tree holds"),
                  ("", r"^data space map: \d+ leaked blocks"),
                  ("", r"^data space map: \d+ blocks with wrong reference counts")),
                 consistent=_key_at_range_end),
    StricterRule("data-index-root-seen", "the data space map's index root is a node of "
                 "another tree: 1.1 walks the index skipping nodes it has seen, so it reads an "
                 "empty index and checks no data counts; the kernel looks the bitmaps up in "
                 "that node and fails. Seen as the shared node, the missing index entries and "
                 "bitmaps, and the counts and nr_allocated they leave",
                 (("", r"^data space map index: node shared between trees of different value"),
                  ("data space map index", r"^data space map index has \d+ entries, expected"),
                  ("csum", r"^data space map bitmap \d+: bitmap checksum mismatch"),
                  ("", r"^data space map: \d+ blocks with wrong reference counts"),
                  ("data space map root nr_allocated",
                   r"nr_allocated is \d+ but \d+ blocks are in use")),
                 consistent=_data_index_root_seen),
    StricterRule("node-flags", "node flags other than exactly 1 or 2: 1.1 reads 'not 2' as "
                 "internal, the kernel refuses a node with neither bit; what the lost subtree "
                 "held shows up in the space-map counts, so the input with those flags set to 1 "
                 "must check clean",
                 (("flags", r"btree node flags \d+ \(expected 1 or 2\)"),), counterfactual=True),
    StricterRule("internal-value-size-wraps", "an internal node's value_size so large that "
                 "1.1's u32 size bound wraps; the kernel computes it in 64 bits; the lost "
                 "subtree shows in the space-map counts, so the input with that value_size "
                 "set to 8 must check clean",
                 (("max_entries", r"max_entries \d+ does not fit a block"),), counterfactual=True),
    StricterRule("child-pointer-high-bits", "an internal node's child pointer with bits "
                 "above the low 32 set: 1.1 reads only the low 32 bits (it passes when they "
                 "name the right child), thin_check 0.9 and the kernel read all 64 and fail; "
                 "the lost subtree shows in mapped_blocks and the space-map counts, so the "
                 "input with the pointer cut to its low 32 bits must check clean",
                 (("", r"block number out of range"),), counterfactual=True),
)


def explaining_rule(problems: Sequence[Problem],
                    normalized: Sequence[Problem] | None = None) -> StricterRule | None:
    """The one stricter rule that explains every problem, if there is one.

    ``normalized``: dmimage's problems with the node headers 1.1 reads differently rewritten
    to what 1.1 reads (None: the input has none). A counterfactual rule holds when they are
    gone (:func:`verdict_failure` also accepts them explained by one further named rule)."""
    if not problems:
        return None
    counterfactual = _counterfactual(problems)
    if normalized is not None and not normalized and counterfactual is not None:
        return counterfactual
    for rule in STRICTER_RULES:
        if not rule.counterfactual and rule.explains_all(problems):
            return rule
    return None


def _counterfactual(problems: Sequence[Problem]) -> StricterRule | None:
    """The one counterfactual rule some problem falls under (None: none, or several)."""
    hit = [r for r in STRICTER_RULES if r.counterfactual and any(r.explains(p) for p in problems)]
    return hit[0] if len(hit) == 1 else None


#: the start of the failure line of an input dmimage fails, 1.1 passes and no rule explains
UNNAMED_STRICTER = "thin_check 1.1 passes it, dmimage check fails it"


def verdict_failure(ours_ok: bool, theirs_ok: bool, problems: Sequence[Problem],
                    normalized: Sequence[Problem] | None = None
                    ) -> tuple[str | None, str | None]:
    """(failure, name of the stricter rule used): check's verdict against thin_check 1.1's.

    With a counterfactual rule, the rewritten input's remaining problems may be explained by
    one more rule (e.g. a ref-count leaf relabelled internal whose "children" lie beyond the
    device): the excuse then names both, "node-flags>RULE"."""
    if ours_ok == theirs_ok:
        return None, None
    if ours_ok:
        return "thin_check 1.1 fails it, dmimage check passes it", None
    rule = explaining_rule(problems, normalized)
    if rule is None and normalized:
        first, then = _counterfactual(problems), explaining_rule(normalized)
        if first is not None and then is not None:
            return None, f"{first.name}>{then.name}"
    if rule is not None:
        return None, rule.name
    return (UNNAMED_STRICTER + " and no single stricter rule explains all of: " + "; ".join(short(p) for p in problems[:4])), None


def short(p: Problem) -> str:
    where = ", ".join(str(x) for x in (p.get("scope"), p.get("block"), p.get("field")) if x
                      is not None and x != "")
    return f"[{where}] {p.get('message', '')}"
