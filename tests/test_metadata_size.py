"""dmimage metadata-size against thin_metadata_size 1.1: same answers, units and rounding."""

from __future__ import annotations

import itertools
import random

import pytest

from dmimage.cli.main import main
from dmimage.errors import UsageError
from dmimage.thin.metadata_size import format_size, metadata_size, parse_size, parse_unit

import oracles

UNITS = ["b", "s", "k", "m", "g", "t", "p", "e", "K", "M", "G", "T", "P", "E", "sector",
         "byte", "KiB", "MiB", "GiB", "TiB", "kB", "MB", "GB", "TB", "kibibyte", "gigabyte"]


def _cases() -> list[list[str]]:
    rng = random.Random(7)
    cases = [
        ["-b", "64k", "-s", "1t", "-m", "100"],
        ["-b", "128", "-s", "2097152", "-m", "3"],
        ["-b", "64k", "-s", "1e", "-m", "1"],  # clamped to 4,161,600 blocks
        ["-b", "1g", "-s", "15e", "-m", "5", "-n=short"],
    ]
    # exact ties at two decimals (x.125 MiB): rounding must be half-even like Rust's
    cases += [["-b", "64k", "-s", "64k", "-m", str(m), "-u", "m"] for m in (30, 286, 350, 414, 478)]
    sizes = ["64k", "128k", "1m", "512k", "1g", "2048", "65536b", "1048576b"]
    pools = ["64k", "1m", "100m", "1g", "10g", "1t", "7t", "1p", "123456789", "999999999999b",
             "3T", "5G", "17M", "1E", "12345k"]
    for b, s in itertools.product(sizes, pools):
        m = rng.choice([0, 1, 7, 100, 1000, 99999])
        args = ["-b", b, "-s", s, "-m", str(m)]
        if rng.random() < 0.8:
            args += ["-u", rng.choice(UNITS)]
        opt = rng.choice([None, None, "-n", "-n=short", "-n=long", "--numeric-only"])
        if opt:
            args.append(opt)
        cases.append(args)
    return cases


CASES = _cases()


def test_answers_match_thin_metadata_size_11(tools11, capsys):
    mismatches = []
    for args in CASES:
        p = oracles.run(tools11, "thin_metadata_size", *args)
        rc = main(["metadata-size", *args])
        out = capsys.readouterr().out
        if p.returncode == 0:
            if rc != 0 or out != p.stdout:
                mismatches.append((args, p.stdout, out))
        elif rc == 0:
            mismatches.append((args, p.stderr, out))
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("args,message", [
    (["-b", "100k", "-s", "1t", "-m", "1"], "block size must be a multiple of 64 KiB"),
    (["-b", "2g", "-s", "10t", "-m", "1"], "maximum block size is 1 GiB"),
    (["-b", "64k", "-s", "32k", "-m", "1"], "pool size must be larger than block size"),
])
def test_errors_match(tools11, capsys, args, message):
    p = oracles.run(tools11, "thin_metadata_size", *args)
    assert p.returncode != 0 and message in p.stderr
    assert main(["metadata-size", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["-b", "64k", "-s", "1t"],
    ["-b", "64k", "-s", "1t", "-m", "1", "-u", "x"],
    ["-b", "1.5k", "-s", "1t", "-m", "1"],
    ["-b", "64k", "-s", "18446744073709551616b", "-m", "1"],
    ["-b", "64k", "-s", "1t", "-m", "-1"],
    ["-b", "64k", "-s", "1t", "-m", "1", "-n=foo"],
])
def test_bad_arguments_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["metadata-size", *args])
    assert exc.value.code == 2


def test_api():
    assert metadata_size(64 << 10, 1 << 40, 100) == 1066032 * 512
    assert metadata_size(64 << 10, 1 << 60, 0) == 4_161_600 * 4096
    assert parse_size("64k") == 65536 and parse_size("2048") == 2048 * 512
    assert parse_size("1T") == 10 ** 12
    with pytest.raises(UsageError):
        parse_size("16e")
    assert format_size(1066032 * 512, parse_unit("s")) == "1066032 sectors"
    assert format_size(4096 * 288, parse_unit("m")) == "1.12 mebibytes"
    assert format_size(4096 * 32, parse_unit("t"), "short") == "0.00000011920928955078125t"
    assert format_size(4096 * 32, parse_unit("K"), "long") == "131.07kilobytes"
    assert format_size(4096 * 32, parse_unit("K"), "plain") == "131.07"
