"""Shared pytest fixtures: the thin-provisioning-tools oracles and restored metadata pools.

* ``tools09`` / ``tools11`` (session): :class:`oracles.Tools`.  A missing tool *fails* the test
  with a message saying what was looked for (set ``DMIMAGE_SKIP_MISSING_ORACLES=1`` to skip
  instead).  Tests using any oracle fixture get the ``oracle`` marker automatically, so
  ``-m "not oracle"`` deselects them.
* ``restored_pool`` (function): factory ``restored_pool(pool, tools="1.1", nr_meta_blocks=None)
  -> RestoredPool`` restoring a :class:`poolgen.Pool` into a fresh file under ``tmp_path``.
* session pools (made once with thin_restore 1.1; treat the files as read-only, use
  ``.copy_to(path)`` or ``.read()`` before modifying): ``empty_pool_meta``, ``thins3_meta``,
  ``multilevel_meta`` (one thin, 5000 mappings: 2-level bottom tree), ``snapshot_meta``
  (data blocks shared by 2-3 devices), ``overflow_meta`` (blocks mapped by 5 devices:
  data ref count 5 -> overflow tree).
* No held-metadata-snapshot fixture: neither thin_restore can make one (the tools cannot
  reserve a metadata snapshot); the writer under test will have to produce those.

* ``shm_path`` (function): like ``tmp_path``, but on tmpfs (/dev/shm) when there is one, and
  removed after the test: for pools the oracles read many times. thin_check reads a file on
  this machine's virtio disk block by block through the kernel's I/O path, which costs CPU
  per read; from tmpfs the same checks cost a fraction (17,000-thin pool: thin_check 1.1
  0.76 -> 0.13 CPU-s, 0.9 1.55 -> 0.47). For files of up to a few hundred MB (RAM).
* A run of tests/ alone keeps its temporary files (``tmp_path``, ``tmp_path_factory``) on
  tmpfs (/dev/shm) unless ``--basetemp`` is given or ``DMIMAGE_TEST_TMPFS=0`` is set: the
  oracles and dmimage read and write their pools there without this machine's virtio disk
  I/O, whose per-request kernel work was a fifth of the unit suite's CPU (sys time 76 -> 43 s, the suite without the
  fuzz 227 -> 186 CPU-s). A passed test's ``tmp_path`` is removed when it ends (a few tests
  write hundreds of MB: kept, the run would hold ~7 GB of RAM), the whole directory when the
  run passed; a failed run keeps its failed tests' files and says where.
* Under ``PYTHONDONTWRITEBYTECODE`` (set in this machine's shells) a run of the suite keeps
  its bytecode in ``$XDG_CACHE_HOME/dmimage/pycache`` (``PYTHONPYCACHEPREFIX``, default
  ``~/.cache``) for its workers and the commands they start, never in the source tree:
  without it every process compiled, and pytest assertion-rewrote, each module it imported
  (the tests and, through the ``dmimage_vm`` plugin's distribution, all of dmimage) from
  source: a worker's collection 5.5 -> 1.7 CPU-s. An explicit ``PYTHONPYCACHEPREFIX`` or
  ``DMIMAGE_TEST_PYCACHE=0`` leaves the environment alone.
* ``fuzz_seed`` (session): the seed of this run's fuzz inputs (tests/test_fuzz.py): fresh per
  run, or ``$DMIMAGE_FUZZ_SEED``; shared with xdist workers; printed in the terminal summary
  (also under ``-q``) with the fuzz statistics.

The helper modules (oracles, poolgen, semantic, damage) are importable as top-level modules
because pyproject.toml sets pytest's ``pythonpath = ["tests"]`` (vmtests/ imports them the same
way); importing them never runs a tool.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

import oracles
import poolgen

# Property tests judge results, not speed: on a loaded 2-core CI machine one example can take
# longer than hypothesis's default 200 ms deadline and would fail as "flaky" for no fault.
settings.register_profile("dmimage", deadline=None)
settings.load_profile("dmimage")

ORACLE_FIXTURES = {
    "tools09",
    "tools11",
    "restored_pool",
    "empty_pool_meta",
    "thins3_meta",
    "multilevel_meta",
    "snapshot_meta",
    "overflow_meta",
}


FUZZ_SEED = pytest.StashKey[int]()


#: the run's base temporary directory when this conftest put it on tmpfs (controller only)
_TMPFS_BASE: list[Path] = []
_CALL_PASSED = pytest.StashKey[bool]()


def _tmpfs_basetemp(config: pytest.Config) -> None:
    """Put the run's temporary files on tmpfs (module docstring), before pytest's tmpdir
    plugin reads --basetemp; xdist's workers get their directories inside it."""
    if (config.option.basetemp is not None or hasattr(config, "workerinput")
            or os.environ.get("DMIMAGE_TEST_TMPFS") == "0"):
        return
    # only a run of tests/ alone: the VM tests' files (disk images) stay on disk
    here = Path(__file__).parent.resolve()
    run = [(config.invocation_params.dir / str(a).split("::")[0]).resolve() for a in config.args]
    if not run or not all(a.is_relative_to(here) for a in run):
        return
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        return
    d = Path(tempfile.mkdtemp(prefix="dmimage-pytest-", dir=shm))
    config.option.basetemp = str(d)
    _TMPFS_BASE.append(d)


def _bytecode_cache() -> None:
    """Bytecode into a cache outside the tree when the environment forbids writing it
    (module docstring); set before xdist starts its workers, which inherit it."""
    if (not sys.dont_write_bytecode or os.environ.get("PYTHONPYCACHEPREFIX")
            or os.environ.get("DMIMAGE_TEST_PYCACHE") == "0"):
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    prefix = os.path.join(base, "dmimage", "pycache")
    try:
        os.makedirs(prefix, exist_ok=True)
    except OSError:
        return
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.pycache_prefix = prefix
    sys.dont_write_bytecode = False


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    _tmpfs_basetemp(config)
    _bytecode_cache()
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "dmimage_fuzz_seed" in workerinput:
        seed = int(workerinput["dmimage_fuzz_seed"])
    elif os.environ.get("DMIMAGE_FUZZ_SEED"):
        seed = int(os.environ["DMIMAGE_FUZZ_SEED"])
    else:
        seed = secrets.randbits(32)
    config.stash[FUZZ_SEED] = seed


def _on_tmpfs(config: pytest.Config) -> bool:
    base = config.option.basetemp
    return base is not None and Path(base).resolve().is_relative_to(Path("/dev/shm").resolve())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    rep = yield
    if rep.when == "call":
        item.stash[_CALL_PASSED] = rep.passed
    return rep


@pytest.fixture(autouse=True)
def _tmpfs_tmp_path_removed(request: pytest.FixtureRequest) -> Iterator[None]:
    """On tmpfs, a passed test's tmp_path goes when the test ends (it is RAM)."""
    yield
    path = getattr(request.node, "funcargs", {}).get("tmp_path")
    if (path is not None and request.node.stash.get(_CALL_PASSED, False)
            and _on_tmpfs(request.config)):
        shutil.rmtree(path, ignore_errors=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    for d in _TMPFS_BASE:
        failed = getattr(config, "_dmimage_failed", True)
        if failed and any(f.is_file() for f in d.rglob("*")):
            print(f"dmimage tests: the failed tests' files are in {d} (tmpfs: remove it when "
                  "done)", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._dmimage_failed = exitstatus != 0  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: every worker fuzzes with the controller's seed."""
    node.workerinput["dmimage_fuzz_seed"] = node.config.stash[FUZZ_SEED]


#: statistics of the fuzz runs in this session (sent with the report under xdist)
_stats_sink: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for key, value in report.user_properties:
        if key == "dmimage_fuzz" and report.when == "call":
            _stats_sink.append(value)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for st in _stats_sink:
        rate = st["inputs"] / st["seconds"] if st["seconds"] else 0.0
        terminalreporter.write_line(
            f"fuzz: seed {st['seed']} (replay: DMIMAGE_FUZZ_SEED={st['seed']}), "
            f"{st['inputs']} damaged inputs ({st.get('repeats', 0)} repeating an earlier "
            f"one's bytes) in {st['seconds']} s on {st['jobs']} workers "
            f"({rate:.0f}/s, {st['cpu_seconds']} CPU-s); {st['damaged']} damaged per check, "
            f"{st['repaired']} repaired "
            f"({st['repaired_oracle']} distinct outputs through thin_check 1.1); stricter "
            f"verdicts: {st['stricter'] or 'none'}")
        for line in st.get("unnamed_stricter", []):
            terminalreporter.write_line(f"fuzz: unnamed stricter verdict (triage): {line}")


@pytest.fixture
def shm_path(tmp_path: Path) -> Iterator[Path]:
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="dmimage-test-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def fuzz_seed(request: pytest.FixtureRequest) -> int:
    return request.config.stash[FUZZ_SEED]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ORACLE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.oracle)
    _order(items)


#: tests that take longest after test_fuzz, with their wall time (s, one item) in a run of the
#: suite under load (2026-12-02, before the 1.1 tools' sleep was capped; the lock tests and
#: the cache/era damage tests as measured after their forked/sparse rework): serial
#: subprocess chains, oracle runs on big pools, big property runs. Only the order they imply
#: matters.
LONG_TESTS = {
    "test_random_transactions_pass_both_thin_checks": 100,
    "test_eight_writers_lose_no_update": 10, "test_damaged_verdicts_agree": 3,
    "test_repair_quality_at_least_thin_repair_11": 30, "test_every_crash_image_is_old_or_new": 26,
    "test_shared_leaves_identical": 26, "test_stateful_against_model": 24,
    "test_dump_invalidate_identical": 19, "test_readers_see_only_committed_states": 4,
    "test_repair_at_least_thin_repair_11_on_kernel_pools": 12,
    "test_uncommitted_changes_leave_visible_state_identical": 12, "test_generated_pools": 11,
    "test_many_inserts_and_removes": 10, "test_writeback_clears_dirty_bits_as_1_1": 9,
    "test_concurrent_lvm_writers_lose_no_generation": 8, "test_text_round_trip_property": 8,
    "test_docs_rescue_and_migrate": 8, "test_range_items_equals_filtered_items": 7,
    "test_generated_pools_roundtrip": 7, "test_snapshot_pool_exports_shared_blocks": 7,
    "test_repair_corpus": 7, "test_direct_lvm_pool": 6, "test_fuzz_reader_never_crashes": 5,
    "test_model_fuzz_on_mutated_scenario_text": 5, "test_label_and_area_reader_fuzz": 3,
    "test_plugin_can_be_disabled": 4, "test_plugin_is_loaded_and_lazy": 4,
    "test_docs_example_collects_in_another_project": 3}


def _order(items: list[pytest.Item]) -> None:
    """test_fuzz first, and the long tests, longest first, at the start of the second half.

    xdist (worksteal, see pytest_xdist_make_scheduler) first gives each of N workers one
    contiguous 1/N of this list, so the worker that runs test_fuzz (the longest) is given
    the first part, and another worker starts on the long tests while the fuzz runs,
    instead of one of them starting late and being run alone at the end; a worker that runs
    dry takes the *end* of another's queue. Without xdist the order does not matter."""
    fuzz = [i for i in items if i.name == "test_fuzz"]
    rest = [i for i in items if i.name != "test_fuzz"]
    long = sorted((i for i in rest if getattr(i, "originalname", i.name) in LONG_TESTS),
                  key=lambda i: -LONG_TESTS[getattr(i, "originalname", i.name)])
    short = [i for i in rest if getattr(i, "originalname", i.name) not in LONG_TESTS]
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "2"))  # set in xdist's workers
    half = max(0, len(items) // max(2, workers) - len(fuzz))
    items[:] = fuzz + short[:half] + long + short[half:]


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``-n N`` (xdist's "load" distribution) steals work instead: "load" hands each worker
    fixed batches up front, so the worker that starts on test_fuzz keeps a queue of other
    tests behind it while the other worker runs dry and then idles; with stealing, the idle
    worker takes the tests still queued behind the fuzz, and both cores stay busy until the
    end. An explicit other ``--dist`` is left alone."""
    if config.getvalue("dist") != "load":
        return None
    try:
        from xdist.scheduler import WorkStealingScheduling  # pytest-xdist >= 3.2
    except ImportError:
        return None
    return WorkStealingScheduling(config, log)


def _get_tools(getter, what: str) -> oracles.Tools:
    try:
        return getter()
    except oracles.OracleUnavailable as e:
        msg = f"oracle {what} unavailable: {e}"
        if os.environ.get("DMIMAGE_SKIP_MISSING_ORACLES") == "1":
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)


@pytest.fixture(scope="session")
def tools09() -> oracles.Tools:
    return _get_tools(oracles.tools_09, "thin-provisioning-tools 0.9 (C++)")


@pytest.fixture(scope="session")
def tools11() -> oracles.Tools:
    return _get_tools(oracles.tools_11, "thin-provisioning-tools 1.1 (Rust)")


@dataclass
class RestoredPool:
    pool: poolgen.Pool
    path: Path
    xml: str
    tools: oracles.Tools
    nr_meta_blocks: int

    def read(self) -> bytearray:
        return bytearray(self.path.read_bytes())

    def copy_to(self, dst: Path | str) -> Path:
        dst = Path(dst)
        if dst.is_dir():
            dst = dst / self.path.name
        shutil.copyfile(self.path, dst)
        return dst


def _restore(
    pool: poolgen.Pool, tools: oracles.Tools, path: Path, nr_meta_blocks: int | None
) -> RestoredPool:
    pool.validate()
    if nr_meta_blocks is None:
        nr_meta_blocks = oracles.nr_meta_blocks_for(
            pool.nr_mappings, len(pool.devices), pool.nr_data_blocks
        )
    xml = poolgen.to_xml(pool)
    oracles.restore(xml, path, tools, nr_meta_blocks)
    return RestoredPool(pool, path, xml, tools, nr_meta_blocks)


@pytest.fixture
def restored_pool(request, tmp_path):
    """Factory: restored_pool(pool, tools="1.1" | "0.9" | Tools, nr_meta_blocks=None, name=None)."""
    counter = iter(range(10**9))

    def make(
        pool: poolgen.Pool, tools="1.1", nr_meta_blocks: int | None = None, name: str | None = None
    ) -> RestoredPool:
        if isinstance(tools, str):
            tools = request.getfixturevalue({"1.1": "tools11", "0.9": "tools09"}[tools])
        path = tmp_path / (name or f"pool{next(counter)}-{tools.series}.meta")
        return _restore(pool, tools, path, nr_meta_blocks)

    return make


def _session_pool(tmp_path_factory, tools, name: str, pool: poolgen.Pool) -> RestoredPool:
    d = tmp_path_factory.mktemp("pools")
    return _restore(pool, tools, d / f"{name}.meta", None)


@pytest.fixture(scope="session")
def empty_pool_meta(tmp_path_factory, tools11) -> RestoredPool:
    return _session_pool(tmp_path_factory, tools11, "empty", poolgen.empty_pool())


@pytest.fixture(scope="session")
def thins3_meta(tmp_path_factory, tools11) -> RestoredPool:
    return _session_pool(tmp_path_factory, tools11, "thins3", poolgen.thins_pool(3))


@pytest.fixture(scope="session")
def multilevel_meta(tmp_path_factory, tools11) -> RestoredPool:
    return _session_pool(tmp_path_factory, tools11, "multilevel", poolgen.multilevel_pool(5000))


@pytest.fixture(scope="session")
def snapshot_meta(tmp_path_factory, tools11) -> RestoredPool:
    return _session_pool(tmp_path_factory, tools11, "snapshot", poolgen.snapshot_pool())


@pytest.fixture(scope="session")
def overflow_meta(tmp_path_factory, tools11) -> RestoredPool:
    return _session_pool(tmp_path_factory, tools11, "overflow", poolgen.overflow_pool(5))
