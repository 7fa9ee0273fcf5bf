"""Hostile input: damaged metadata through every command, outputs judged (docs/repair.md).

Each input is a thin_restore 1.1 pool damaged by a random :mod:`fuzz_damage` recipe. It goes
through ``check``, ``dump``, ``ls``, ``delta``, ``rmap``, ``export``, ``dump --repair`` and
``repair`` (then ``check`` and ``dump`` of the repaired output), in-process via
``dmimage.cli.main.main`` in sandboxed workers (:mod:`fuzz_worker`), and is judged by
:mod:`fuzz_judge`: no traceback, hang or runaway memory; check's verdict equal to thin_check
1.1's (or stricter under one named rule); the readers' exit codes as check's report requires;
repair's output clean for dmimage and thin_check 1.1.

Every run draws fresh inputs: the seed is printed in the terminal summary (also with ``-q``)
and in every failure. Environment:

* ``DMIMAGE_FUZZ_SEED=S``: replay run S; with ``DMIMAGE_FUZZ_INPUTS=i,j`` only those inputs;
* ``DMIMAGE_FUZZ_EXAMPLES`` (default 10000): inputs per run (long runs: 100000);
* ``DMIMAGE_FUZZ_JOBS`` (default: the usable cores, at most 2): worker processes;
* ``DMIMAGE_FUZZ_TIMEOUT`` (s per command, default 20), ``DMIMAGE_FUZZ_MEMORY_MB`` (3072).
* ``DMIMAGE_FUZZ_FORKSERVER=0``: thin_check 1.1 exec'd per input, not forked
  (:mod:`fuzz_oracle`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import fuzz_damage
import fuzz_judge
import fuzz_run
import oracles

EXAMPLES = int(os.environ.get("DMIMAGE_FUZZ_EXAMPLES", "10000"))
#: inputs per 10,000 whose only failure is an unnamed stricter verdict (dmimage fails, 1.1
#: passes, no single named rule explains it) that a run tolerates, listing each for triage:
#: multi-mutation inputs whose combined effect no rule names turn up about once per 10,000.
#: A systematic disagreement (a new class) exceeds it; any other failure fails at once.
UNNAMED_STRICTER_PER_10K = 5
INPUTS = [int(i) for i in os.environ.get("DMIMAGE_FUZZ_INPUTS", "").split(",") if i.strip()]
JOBS = int(os.environ.get("DMIMAGE_FUZZ_JOBS", "0")) or min(2, len(os.sched_getaffinity(0)))
TIMEOUT = float(os.environ.get("DMIMAGE_FUZZ_TIMEOUT", "20"))
MEMORY_MB = int(os.environ.get("DMIMAGE_FUZZ_MEMORY_MB", "3072"))


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """On tmpfs when there is one: every input writes a few files."""
    shm = "/dev/shm"
    d = tempfile.mkdtemp(prefix="dmimage-fuzz-",
                         dir=shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_fuzz(fuzz_seed: int, tools11: oracles.Tools, workdir: Path,
              request: pytest.FixtureRequest) -> None:
    bases = fuzz_run.make_bases(workdir, tools11)
    run = fuzz_run.Run(fuzz_seed, bases, workdir, tools11, jobs=JOBS, memory_mb=MEMORY_MB,
                       timeout=TIMEOUT)
    try:
        run.run(INPUTS or range(EXAMPLES))
    finally:  # the summary line names the seed whatever happened
        request.node.user_properties.append(("dmimage_fuzz",
                                             {"seed": fuzz_seed, **run.stats.as_dict()}))
    assert not run.failures, (f"fuzz seed {fuzz_seed}: {len(run.failures)} failing inputs "
                              f"(of {run.stats.inputs}):\n" + "\n".join(run.failures[:10]))
    unnamed = run.stats.unnamed_stricter
    budget = max(1, run.stats.inputs * UNNAMED_STRICTER_PER_10K // 10_000)
    assert len(unnamed) <= budget, (
        f"fuzz seed {fuzz_seed}: {len(unnamed)} unnamed stricter verdicts (of "
        f"{run.stats.inputs}; at most {budget}):\n" + "\n".join(unnamed[:10]))
    assert run.stats.inputs == len(INPUTS or range(EXAMPLES))


# -- the judge itself can fail ---------------------------------------------------------------

def _res(rc: int) -> dict[str, object]:
    return {"rc": rc, "error": None, "exc": None, "stdout": None}


def _problem(scope: str, field: str = "csum", message: str = "btree node checksum mismatch",
             fatal: bool = True) -> dict[str, object]:
    return {"scope": scope, "field": field, "message": message, "fatal": fatal, "block": 7}


READERS = [fuzz_judge.Reader("dump", None), fuzz_judge.Reader("ls", None),
           fuzz_judge.Reader("delta", (1, 2)),
           fuzz_judge.Reader("export", (1,), reads_values=True)]


def test_judge_readers_must_fail_on_damage_they_read() -> None:
    # device 2's tree is damaged: dump and delta (1 2) read it, export (1) does not
    results = {"dump": _res(0), "ls": _res(1), "delta": _res(1), "export": _res(1)}
    assert fuzz_judge.reader_failures(READERS, [_problem("device:2")], results) == [
        "dump: exit 0, expected 1: check reports [device:2, 7, csum] btree node checksum "
        "mismatch in what it reads",
        "export: exit 1, expected 0: check reports nothing in what it reads (only: "
        "[device:2, 7, csum] btree node checksum mismatch)"]
    results = {"dump": _res(1), "ls": _res(1), "delta": _res(1), "export": _res(0)}
    assert fuzz_judge.reader_failures(READERS, [_problem("device:2")], results) == []


def test_judge_space_map_and_value_damage_do_not_stop_readers() -> None:
    problems = [_problem("data-space-map", "csum", "data space map bitmap 0: bitmap checksum"),
                _problem("device:1", "mapping value",
                         "device 1: 3 mappings point beyond the data device")]
    ok = {"dump": _res(0), "ls": _res(0), "delta": _res(0), "export": _res(1)}
    assert fuzz_judge.reader_failures(READERS, problems, ok) == []
    ok["export"] = _res(0)  # export would read data at a block beyond the device
    assert fuzz_judge.reader_failures(READERS, problems, ok) == [
        "export: exit 0, expected 1: check reports [device:1, 7, mapping value] device 1: 3 "
        "mappings point beyond the data device in what it reads"]


def test_judge_stricter_rule_must_explain_every_problem() -> None:
    nr_alloc = _problem("data-space-map", "data space map root nr_allocated",
                        "data space map: nr_allocated is 5 but 4 blocks are in use", fatal=False)
    assert fuzz_judge.verdict_failure(False, True, [nr_alloc]) == (None, "nr_allocated")
    leak = _problem("metadata-space-map", "", "metadata space map: 1 leaked blocks", fatal=False)
    fail, rule = fuzz_judge.verdict_failure(False, True, [nr_alloc, leak])
    assert rule is None and fail is not None and "no single stricter rule" in fail
    fail, _ = fuzz_judge.verdict_failure(True, False, [])
    assert fail == "thin_check 1.1 fails it, dmimage check passes it"


def test_judge_key_at_range_end_adds_up() -> None:
    """Seed 3395293201 input 872: the one key 1.1 lets through is one lost mapping. The
    report check gave before the fix (the whole leaf dropped) is not excused, nor is a key
    two past the range, nor a lost mapping without its key problem."""
    def key(last: int, top: int) -> fuzz_judge.Problem:
        return _problem("device:1", "keys", f"mapping tree of device 1: keys 1506..{last} "
                        f"outside the parent's range 1506..{top}")

    def short(holds: int) -> fuzz_judge.Problem:
        return _problem("device:1", "mapped_blocks", "device 1: details say 1500 mapped "
                        f"blocks, its mapping tree holds {holds}")

    def leaks(n: int) -> fuzz_judge.Problem:
        return _problem("data-space-map", "", f"data space map: {n} leaked blocks (counted but "
                        "unreferenced, e.g. [906])", fatal=False)

    def rule(problems: list[fuzz_judge.Problem]) -> str | None:
        return fuzz_judge.verdict_failure(False, True, problems)[1]

    assert rule([key(2257, 2256), short(1499), leaks(1)]) == "key-at-range-end"
    shared = _problem("data-space-map", "", "data space map: 1 blocks with wrong reference "
                      "counts (block 906: stored 2, expected 1)")
    assert rule([key(2257, 2256), short(1499), shared]) == "key-at-range-end"
    assert rule([key(2257, 2256), short(1248), leaks(252)]) is None  # the old whole leaf
    assert rule([key(2257, 2256), short(1499), leaks(2)]) is None
    assert rule([key(2258, 2256), short(1499), leaks(1)]) is None  # 1.1 fails that one
    assert rule([key(2257, 2256), leaks(1)]) is None  # the lost mapping must show
    assert rule([short(1499), leaks(1)]) is None
    wrong = _problem("data-space-map", "", "data space map: 1 blocks with wrong reference "
                     "counts (block 906: stored 1, expected 2)")
    assert rule([key(2257, 2256), short(1499), wrong]) is None


def test_judge_data_index_root_seen() -> None:
    """Seed 2112707547 input 4987: the data index root set to a mapping leaf. Its problems
    are excused together; a count that is not 0 or a problem elsewhere is not."""
    shared = _problem("data-space-map", "", "data space map index: node shared between trees "
                      "of different value sizes")
    empty = _problem("data-space-map", "data space map index",
                     "data space map index has 0 entries, expected 1 (nr_blocks 3000)")

    def counts(stored: int) -> fuzz_judge.Problem:
        return _problem("data-space-map", "", "data space map: 1500 blocks with wrong reference "
                        f"counts (block 2: stored {stored}, expected 1)")

    def rule(problems: list[fuzz_judge.Problem]) -> str | None:
        return fuzz_judge.verdict_failure(False, True, problems)[1]

    assert rule([shared, empty, counts(0)]) == "data-index-root-seen"
    assert rule([shared, empty, counts(2)]) is None  # a bitmap was read: 1.1 compares it
    assert rule([empty, counts(0)]) is None  # no shared root: not what 1.1 skips
    assert rule([shared, shared, empty]) is None
    assert rule([shared, empty, _problem("device:1")]) is None


def test_judge_repair() -> None:
    results = {"repair": _res(0), "dump --repair": _res(1)}
    fails = fuzz_judge.repair_failures([], results, {"ok": False, "problems": []}, False)
    assert fails == ["repair exit 0 but dump --repair exit 1 (the same salvage)",
                     "repair's output does not check clean: ",
                     "repair changed the dump of an input without fatal problems"]


def test_inputs_replay_from_seed_and_index() -> None:
    import random
    a = [fuzz_damage.random_recipe(random.Random(f"7:{i}")) for i in range(50)]
    b = [fuzz_damage.random_recipe(random.Random(f"7:{i}")) for i in range(50)]
    c = [fuzz_damage.random_recipe(random.Random(f"8:{i}")) for i in range(50)]
    assert a == b and a != c
    assert {m[0] for r in a for m in r} == {"named", "flip", "zero", "field", "sbroot"}


def test_sparse_inputs_read_back_and_digests_tell_them_apart(tmp_path: Path) -> None:
    """The harness writes inputs with holes for their zero blocks and recognises repeated
    inputs by a digest of their non-zero blocks: both must be exact."""
    data = bytearray(5 * 4096 + 3)
    data[4096 + 7] = 1
    data[-1] = 9
    p = str(tmp_path / "x")
    fuzz_run.write_sparse(p, data)
    assert Path(p).read_bytes() == data
    other = bytearray(data)
    other[4096 + 7], other[2 * 4096 + 7] = 0, 1  # the same block content, another block
    assert fuzz_run.digest(data) == fuzz_run.digest(bytes(data))
    assert fuzz_run.digest(data, fuzz_run._nonzero_blocks(data)) == fuzz_run.digest(data)
    q = str(tmp_path / "y")  # the blocks given, as prepare() does
    fuzz_run.write_sparse(q, data, fuzz_run._nonzero_blocks(data))
    assert Path(q).read_bytes() == data
    assert fuzz_run.digest(data) != fuzz_run.digest(other)
    assert fuzz_run.digest(data) != fuzz_run.digest(data + bytes(4096))  # length counts
    assert fuzz_run.file_digest(p) == fuzz_run.digest(data)
    with open(p, "r+b") as f:  # a block written with zeros is still zeros
        f.seek(3 * 4096)
        f.write(bytes(4096))
    assert fuzz_run.file_digest(p) == fuzz_run.digest(data)


def test_a_repeated_input_gets_the_judgement_of_the_first(tmp_path: Path) -> None:
    """An input byte for byte equal to one already judged is counted with that judgement: a
    failure is listed again under the repeat's own replay line, an unnamed stricter verdict
    counts against the budget again."""
    from types import SimpleNamespace

    run = fuzz_run.Run(7, [], tmp_path, oracles.Tools.__new__(oracles.Tools), jobs=1,
                       memory_mb=64, timeout=1)
    base = SimpleNamespace(name="thins3")
    bad = fuzz_run.Outcome(3, ("dump: exit 0, expected 1",), False, None, True, 2, True)
    run.repeat(9, base, [("zero", 4)], bad)  # type: ignore[arg-type]
    unnamed = fuzz_run.Outcome(4, (fuzz_judge.UNNAMED_STRICTER + " ...",), True, None, True, 0,
                               False)
    run.repeat(10, base, [("zero", 5)], unnamed)  # type: ignore[arg-type]
    excused = fuzz_run.Outcome(5, (), False, "nr_allocated", False, 0, True)
    run.repeat(11, base, [("zero", 6)], excused)  # type: ignore[arg-type]
    assert len(run.failures) == 1 and "input 9 " in run.failures[0]
    assert "the bytes of input 3" in run.failures[0]
    assert "DMIMAGE_FUZZ_SEED=7 DMIMAGE_FUZZ_INPUTS=9" in run.failures[0]
    assert "dump: exit 0, expected 1" in run.failures[0]
    assert len(run.stats.unnamed_stricter) == 1 and "input 10 " in run.stats.unnamed_stricter[0]
    st = run.stats
    assert (st.inputs, st.repeats, st.damaged, st.reader_fails, st.repaired) == (3, 3, 2, 2, 2)
    assert st.stricter == {"nr_allocated": 1}


def test_forked_thin_check_answers_like_direct_runs(tools11: oracles.Tools,
                                                    workdir: Path) -> None:
    """fuzz_oracle's server (thin_check 1.1 forked per input, not exec'd) gives every input
    the exit status a direct run gives it: clean bases and damaged ones, checks in flight at
    once, statuses collected out of order."""
    import subprocess

    import fuzz_oracle

    bases = fuzz_run.make_bases(workdir, tools11)
    env = oracles.tool_env(tools11)
    server = fuzz_oracle.start(tools11.thin_check, env, bases[0].path, workdir)
    if server is None:
        pytest.skip("no C compiler for the fork server (the harness runs thin_check directly)")
    try:
        paths = [b.path for b in bases]
        for i in range(24):
            base, recipe = fuzz_run.draw(99, i, bases)
            p = str(workdir / f"forked-{i}.meta")
            fuzz_run.write_sparse(p, fuzz_damage.apply(base.meta, recipe, base.used, base.named))
            paths.append(p)
        checks = [server.check(p) for p in paths]
        forked = [c.wait() for c in reversed(checks)][::-1]
        direct = [subprocess.run([str(tools11.thin_check), "-q", p], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
                  for p in paths]
    finally:
        server.stop()
    assert forked == direct
    assert direct[:3] == [0, 0, 0] and any(rc != 0 for rc in direct[3:])
