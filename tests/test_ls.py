"""dmimage ls against thin_ls 1.1: byte-identical tables on the session pools, generated pools
(hypothesis, with snapshots), pools with shared leaves and a whole shared bottom tree, -m,
--no-headers, every field; human units; JSON; damaged metadata (exit 1, one line)."""

from __future__ import annotations

import io
import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dump import _alias_device, add_held_snapshot, shared_xml

from dmimage.cli.main import main
from dmimage.thin.ls import FIELDS, device_usage, pretty_size
from dmimage.thin.pool import open_pool

import damage
import oracles
import poolgen

HYP = settings(max_examples=8, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])
ALL = ",".join(FIELDS)


def run_ours(command: str, *args: str, rc: int = 0) -> bytes:
    """A dmimage subcommand in-process; stdout as bytes; asserts the exit status."""
    buf = io.BytesIO()

    class Out:
        buffer = buf

        @staticmethod
        def write(s):
            buf.write(s.encode())

        @staticmethod
        def flush():
            pass

    saved = sys.stdout
    sys.stdout = Out  # type: ignore[assignment]
    try:
        got = main([command, *map(str, args)])
    finally:
        sys.stdout = saved
    assert got == rc
    return buf.getvalue()


def theirs(tools, name: str, *args) -> bytes:
    return oracles.run(tools, name, *map(str, args), check=True).stdout.encode()


def same_ls(path, tools11, *args: str) -> bytes:
    want = theirs(tools11, "thin_ls", *args, path)
    got = run_ours("ls", *args, path)
    assert got == want, f"\nours:\n{got.decode()}\n1.1:\n{want.decode()}"
    return got


def all_ls_variants(path, tools11, default: bool = False) -> None:
    """Every field in one run (a counting thin_ls 1.1 run takes 0.5 s: its progress monitor),
    the details-only fields without headers, and optionally the default columns."""
    same_ls(path, tools11, "-o", ALL)
    same_ls(path, tools11, "--no-headers", "-o", "SNAP_TIME,DEV,TRANSACTION,CREATE_TIME")
    if default:
        same_ls(path, tools11)


# ------------------------------------------------------------------------------- units

@pytest.mark.parametrize("n,want", [  # the cases of 1.1's own unit tests
    (0, "0b"), (1, "1b"), (8192, "8192b"), (8193, "8KiB"), (8 * 1024 + 512, "9KiB"),
    (1023 * 1024 + 512, "1024KiB"), (8 << 20, "8192KiB"), ((8 << 20) + 1024, "8MiB"),
    (8 << 30, "8192MiB"), ((8 << 40) + (1 << 30), "8Tib"), (8 << 50, "8192Tib"),
    ((8 << 60) + (1 << 50), "8EiB"), ((1 << 64) - 1, "16EiB"),
])
def test_pretty_size(n, want):
    assert pretty_size(n) == want


# ------------------------------------------------------------------------------- oracle

@pytest.mark.parametrize("fixture", ["empty_pool_meta", "thins3_meta", "multilevel_meta",
                                     "snapshot_meta", "overflow_meta"])
def test_fixture_pools(fixture, request, tools11):
    all_ls_variants(request.getfixturevalue(fixture).path, tools11, default=True)


@given(pool=poolgen.pools(max_devices=5, max_mappings=400, allow_big=True))
@HYP
def test_generated_pools(pool, restored_pool, tools11):
    rp = restored_pool(pool)
    all_ls_variants(rp.path, tools11)


@given(seed=st.integers(0, 2**32 - 1), n_devices=st.integers(1, 5),
       max_def=st.sampled_from([3, 100, 700, 2000]))
@HYP
def test_shared_leaves(seed, n_devices, max_def, tmp_path_factory, tools11):
    d = tmp_path_factory.mktemp("shared")
    meta = oracles.restore(shared_xml(seed, n_devices, max_def), d / "s.meta", tools11, 2048)
    all_ls_variants(meta, tools11)


@pytest.mark.parametrize("n_mappings", [50, 5000])
def test_whole_shared_bottom_tree(n_mappings, restored_pool, tools11):
    big = poolgen.multilevel_pool(n_mappings, dev_id=1)
    pool = poolgen.Pool(time=4, transaction=7, nr_data_blocks=big.nr_data_blocks + 10,
                        devices=[big.devices[0],
                                 poolgen.Device(2, [(0, big.nr_data_blocks + 1, 0)]),
                                 poolgen.Device(3, [(7, big.nr_data_blocks + 2, 1)])])
    rp = restored_pool(pool)
    _alias_device(rp.path, 1, 3)
    all_ls_variants(rp.path, tools11)
    usage = {u.dev_id: u for u in device_usage(open_pool(rp.path))}
    assert usage[1].shared_blocks == usage[3].mapped_blocks == n_mappings


def test_metadata_snap(tmp_path, snapshot_meta, tools11):
    meta = snapshot_meta.copy_to(tmp_path / "m.meta")
    add_held_snapshot(meta)
    same_ls(meta, tools11, "-m", "-o", ALL)
    same_ls(meta, tools11, "-m")


def test_json(snapshot_meta):
    doc = json.loads(run_ours("ls", "--json", "-o", "DEV,SHARED_BLOCKS,MAPPED",
                              snapshot_meta.path))
    assert doc["fields"] == ["DEV", "SHARED_BLOCKS", "MAPPED"]
    assert [d["DEV"] for d in doc["devices"]] == [1, 2, 3]
    assert all(isinstance(d["MAPPED"], str) for d in doc["devices"])


# ------------------------------------------------------------------------------- errors

def test_usage_errors(tmp_path, thins3_meta, capsys):
    run_ours("ls", "-o", "DEV,NOPE", thins3_meta.path, rc=2)
    run_ours("ls", tmp_path / "missing", rc=2)
    run_ours("ls", "-m", thins3_meta.path, rc=2)  # no held snapshot
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "NOPE" in err


def test_damaged_metadata_exit_1(tmp_path, multilevel_meta, capsys):
    meta = bytes(multilevel_meta.read())
    cases = [
        damage.flip_byte(meta, "btree_leaf", role="bottom"),
        damage.flip_byte(meta, "btree_leaf", role="details", fix_csum=True),
        damage.wrong_blocknr(meta, "btree_internal", role="bottom"),
        damage.flip_byte(meta, "superblock"),
        damage.cycle(meta, "bottom"),
        damage.out_of_range_pointer(meta, "bottom"),
    ]
    for i, dm in enumerate(cases):
        p = tmp_path / f"d{i}.meta"
        p.write_bytes(bytes(dm.data))
        run_ours("ls", "-o", "DEV,MAPPED", p, rc=1)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dmimage ls: "), (dm, err)
