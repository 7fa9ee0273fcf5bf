"""Hostile input: damaged metadata through every read-only command, in a sandboxed worker.

Each input (a thin_restore 1.1 pool damaged by a :mod:`fuzz_damage` recipe) goes through
``check``, ``dump``, ``dump --repair``, ``export``, ``repair`` and, when they exist, ``ls``,
``delta`` and ``rmap``, all via ``dmimage.cli.main.main``. Requirements:

* no traceback: any exception other than a DmimageError (which main() turns into an exit code)
  or argparse's SystemExit is a failure;
* no hang: each command gets ``DMIMAGE_FUZZ_TIMEOUT`` seconds (default 20, SIGALRM), and the
  worker as a whole is killed if it stops answering;
* bounded memory: the worker runs under RLIMIT_AS (``DMIMAGE_FUZZ_MEMORY_MB``, default 3072);
* a repair that succeeds writes metadata that checks clean;
* ``check``'s verdict equals thin_check 1.1's, except where dmimage is documented as stricter
  (tests/test_check.py STRICTER_THAN_11: nr_allocated, superblock magic/blocknr, bitmap blocknr).

CI runs ``DMIMAGE_FUZZ_EXAMPLES`` (default 120, about 55 s) derandomized examples; a long run:

    DMIMAGE_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz.py

(``DMIMAGE_FUZZ_SEED=N`` picks another random sequence instead of the derandomized one.)
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import damage
import fuzz_damage
import oracles
import poolgen

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("DMIMAGE_FUZZ_EXAMPLES", "120"))
TIMEOUT = int(os.environ.get("DMIMAGE_FUZZ_TIMEOUT", "20"))
MEMORY_MB = int(os.environ.get("DMIMAGE_FUZZ_MEMORY_MB", "3072"))
REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, resource, signal, sys, traceback
limit = int(sys.argv[1]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
timeout = int(sys.argv[2])
proto = os.fdopen(os.dup(1), "w")
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
from dmimage.cli.main import build_parser, main
from dmimage.errors import DmimageError
from dmimage.thin.check import check_metadata
commands = set(build_parser()._subparsers._group_actions[0].choices)

class Hang(BaseException):
    pass

def on_alarm(signum, frame):
    raise Hang()

signal.signal(signal.SIGALRM, on_alarm)

def guarded(fn):
    signal.alarm(timeout)
    try:
        return fn(), None
    except Hang:
        return None, "hang"
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 2), None
    except DmimageError as e:
        return e.exit_code, None
    except BaseException:
        return None, traceback.format_exc()
    finally:
        signal.alarm(0)

print(json.dumps({"commands": sorted(commands)}), file=proto, flush=True)
for line in sys.stdin:
    job = json.loads(line)
    results = []
    for argv in job["cmds"]:
        if argv[0] not in commands:
            continue
        rc, err = guarded(lambda: main(argv))
        results.append({"argv": argv, "rc": rc, "error": err})
    def verdict():
        r = check_metadata(job["meta"])
        return [r.ok(), [[p.field, str(p), p.fatal] for p in r.problems]]
    v, err = guarded(verdict)
    results.append({"argv": ["check_metadata"], "rc": 0 if v else None, "error": err})
    rep = job.get("repaired")
    clean = None
    if rep and any(x["argv"][0] == "repair" and x["rc"] == 0 for x in results):
        c, err = guarded(lambda: check_metadata(rep).ok())
        clean = c
        if err:
            results.append({"argv": ["check repaired"], "rc": None, "error": err})
    print(json.dumps({"results": results, "verdict": v, "repaired_clean": clean}),
          file=proto, flush=True)
"""


class Worker:
    """A long-lived sandboxed worker: one JSON job per line in, one result line out."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.commands: list[str] = []

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(MEMORY_MB), str(TIMEOUT)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=REPO)
        self.commands = json.loads(self._read(120))["commands"]

    def _read(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"worker exited with {self.proc.wait()}")
        return line

    def run(self, job: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        try:
            return json.loads(self._read(TIMEOUT * (len(job["cmds"]) + 3) + 30))
        except (TimeoutError, EOFError) as exc:
            self.stop()
            return {"died": f"{type(exc).__name__}: {exc}"}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


#: Problem fields of dmimage's stricter-than-1.1 verdicts (tests/test_check.py STRICTER_THAN_11):
#: nr_allocated, the superblock's magic and blocknr, bitmap blocknr; incompat_flags.
STRICTER_FIELDS = ("nr_allocated", "magic", "blocknr", "incompat_flags")
#: ... and the data device's size (thin-format.md §13: 1.1 does not look, the kernel fails):
#: mappings, space-map entries or referenced metadata blocks beyond a space map's nr_blocks.
STRICTER_MESSAGES = ("point beyond the data device", "bitmap entries set beyond nr_blocks",
                     "lie beyond its nr_blocks",
                     # a space map bigger than its index or the metadata device can describe
                     # (1.1 reads the entries that exist; the kernel's resume fails)
                     "more than the 255 an index block holds",
                     "needs more bitmaps than the metadata device has blocks",
                     # a bitmap count of 3 whose overflow entry is missing: 1.1 accepts it when
                     # the recomputed count is >= 3 too; the kernel's lookup of that block's
                     # count fails (ENODATA) on the next increment or decrement
                     "but no ref-count tree entry")
#: Stricter root causes whose consequences (space-map counts read from the wrong bitmap) are
#: reported too: 1.1 reads the data index entries in order and ignores their keys, the kernel
#: looks bitmaps up by key.
STRICTER_CAUSES = ("data space map index keys are not",
                   # node flags other than exactly 1 or 2: 1.1 reads "not 2" as internal, the
                   # kernel's node_check refuses a node with neither bit ("node is neither
                   # INTERNAL or LEAF"), and dmimage refuses any other value as damage
                   "btree node flags",
                   # an internal node's value_size so large that 1.1's u32 arithmetic wraps
                   # in the size bound (0xFFFFFFFF + 8 = 7); the kernel computes it in 64 bits
                   "does not fit a block")


#: ... and, when a space map's nr_blocks is too small (the messages above), the index entry
#: count that no longer matches it.
NR_BLOCKS_CONSEQUENCES = ("data space map index has",)


def stricter_only(problems: list) -> bool:
    if any(c in p[1] for p in problems for c in STRICTER_CAUSES):
        return True
    fatal = [p for p in problems if p[2]]
    allowed = STRICTER_MESSAGES
    if any(m in p[1] for p in fatal for m in STRICTER_MESSAGES):
        allowed = STRICTER_MESSAGES + NR_BLOCKS_CONSEQUENCES
    return all(any(f in (p[0] or "") for f in STRICTER_FIELDS)
               or any(m in p[1] for m in allowed) for p in fatal)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, request):
    tools = request.getfixturevalue("tools11")
    d = tmp_path_factory.mktemp("fuzzbase")
    out = []
    for name, pool in (("thins3", poolgen.thins_pool(3)),
                       ("multilevel", poolgen.multilevel_pool(1500)),
                       ("snapshot", poolgen.snapshot_pool(400))):
        p = d / f"{name}.meta"
        oracles.restore(poolgen.to_xml(pool), p, tools, 512)
        meta = p.read_bytes()
        out.append((name, pool, meta, fuzz_damage.used_blocks(meta), damage.all_damage(meta)))
    return out


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    w.start()
    yield w
    w.stop()


def jobs_for(meta_path: str, tmp: str, pool, commands: list[str]) -> dict:
    repaired = os.path.join(tmp, "repaired.meta")
    oracles.make_sparse(repaired, 512)
    data = os.path.join(tmp, "data")
    with open(data, "wb") as f:
        f.truncate(pool.nr_data_blocks * pool.data_block_size * 512)
    null = os.path.join(tmp, "out")
    cmds = [
        ["check", meta_path],
        ["dump", meta_path, "-o", null],
        ["dump", "--repair", meta_path, "-o", null],
        ["dump", "--repair", "--data-block-size", "128", "-f", "json", meta_path, "-o", null],
        ["export", meta_path, data, "--dev-id", "1", "-o", null],
        ["repair", "-q", "-i", meta_path, "-o", repaired, "--data-block-size", "128"],
        ["ls", meta_path],
        ["delta", "--thin1", "1", "--thin2", "2", meta_path],
        ["rmap", "--region", "0..100", meta_path],
    ]
    return {"meta": meta_path, "cmds": cmds, "repaired": repaired}


@settings(max_examples=EXAMPLES, deadline=None, derandomize="DMIMAGE_FUZZ_SEED" not in os.environ,
          suppress_health_check=list(HealthCheck), database=None,
          phases=[Phase.explicit, Phase.generate]
          + ([Phase.shrink] if os.environ.get("DMIMAGE_FUZZ_SHRINK") else []))
@seed(int(os.environ.get("DMIMAGE_FUZZ_SEED", "0")))
@given(base=st.integers(0, 2), recipe=fuzz_damage.recipes())
def test_fuzz(bases, worker, tools11, base, recipe):
    name, pool, meta, used, named = bases[base]
    bad = fuzz_damage.apply(meta, recipe, used, named)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bad.meta")
        with open(path, "wb") as f:
            f.write(bad)
        job = jobs_for(path, tmp, pool, worker.commands)
        res = worker.run(job)
        assert "died" not in res, f"{name} {recipe}: worker {res.get('died')}"
        failures = [f"{' '.join(r['argv'][:2])}: {r['error']}" for r in res["results"]
                    if r["error"]]
        assert not failures, f"{name} {recipe}:\n" + "\n".join(failures)
        assert res["repaired_clean"] in (None, True), \
            f"{name} {recipe}: repair succeeded but its output does not check clean"
        ours_ok, problems = res["verdict"]
        theirs_ok = oracles.check(path, tools11, timeout=60)[0] == 0
        if theirs_ok and not ours_ok and stricter_only(problems):
            return
        assert ours_ok == theirs_ok, (
            f"{name} {recipe}: thin_check 1.1 {'passes' if theirs_ok else 'fails'}, dmimage "
            f"{'passes' if ours_ok else 'fails'}: {[p[1] for p in problems][:4]}")
