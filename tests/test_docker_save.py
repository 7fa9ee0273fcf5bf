"""save's hot path in pieces: tar-split lines as Go writes them read by one regular expression
(checked against the json module's reading of the same lines), and the copy's read-ahead
hints and descriptor. The whole save against Docker's own output is in
vmtests/test_docker_store.py; against the build inputs in tests/test_docker_build.py."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from dmimage.docker import tarcopy, tarsplit
from dmimage.docker.errors import StoreError
from dmimage.docker.tarplan import Piece, Plan


def _go(entry: dict[str, object]) -> bytes:
    """A line as Go's encoding/json writes storage.Entry: struct order, no spaces, <>&
    escaped."""
    text = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
        .encode()


def _seg(data: bytes, pos: int) -> dict[str, object]:
    return {"type": 2, "payload": base64.b64encode(data).decode(), "position": pos}


def _file(name: str, size: int, pos: int) -> dict[str, object]:
    e: dict[str, object] = {"type": 1, "name": name}
    if size:
        e["size"] = size
    e["payload"] = base64.b64encode(os.urandom(8)).decode() if size else None
    e["position"] = pos
    return e


def _json_read(lines: list[bytes]) -> list[tarsplit.Entry]:
    """The reference: each line read by the json module, as the slower path reads it."""
    return tarsplit._entries([json.loads(line) for line in lines if line.strip()])


NAMES = ["etc/passwd", "a b/c\"d\\e", "x<y>&z", "ünï/çødé", "tab\there", "", "f" * 300]


def test_go_lines_read_as_json_reads_them() -> None:
    lines = []
    for i, name in enumerate(NAMES):
        lines.append(_go(_seg(os.urandom(512 + i), 2 * i)))
        lines.append(_go(_file(name, i * 1000, 2 * i + 1)))
    lines.append(_go(_seg(b"", len(lines))))
    text = b"\n".join(lines) + b"\n"
    fast = tarsplit._go_lines(text)
    assert fast is not None  # every line is Go's shape: no JSON parser involved
    assert fast == _json_read(lines)
    assert [e.name for e in fast if e.type == tarsplit.FILE_TYPE] == \
        [n.encode() for n in NAMES]
    assert list(tarsplit.read_entries(gzip.compress(text), "ts")) == fast
    # without the final newline too
    assert tarsplit._go_lines(text[:-1]) == fast


def test_layout_is_the_entries_by_column() -> None:
    """save reads a tar-split as a Layout (literal bytes around the files with content):
    straight from Go's lines, the same as the entries (read by the json module's path)
    joined; empty files (no size, or "size":0) are part of the bytes around them."""
    lines = [_go(_seg(b"H0", 0)), _go(_file("a", 3, 1)), _go(_seg(b"pad", 2)),
             _go(_seg(b"H1", 3)), _go(_file("empty", 0, 4)),
             b'{"type":1,"name":"zero","size":0,"payload":null,"position":5}',
             _go(_seg(b"H2", 6)), _go(_file("b/c", 5, 7)), _go(_file("d", 2, 8)),
             _go(_seg(b"end", 9))]
    text = b"\n".join(lines) + b"\n"
    entries = _json_read(lines)
    want = tarsplit.Layout([b"H0", b"padH1H2", b"", b"end"], [b"a", b"b/c", b"d"], [3, 5, 2])
    assert tarsplit.layout_of(entries) == want
    assert tarsplit._go_layout(text) == want
    assert tarsplit.read_layout(gzip.compress(text), "ts") == want
    assert want.size == tarsplit.tar_size(entries) == 2 + 7 + 3 + 3 + 5 + 2
    # a line only the json path reads: the same Layout through it
    odd = lines[:2] + [b'{"type": 2, "payload": "cGFk", "position": 2}'] + lines[3:]
    oddtext = b"\n".join(odd) + b"\n"
    assert tarsplit._go_layout(oddtext) is None
    assert tarsplit.read_layout(gzip.compress(oddtext), "ts") == want
    with pytest.raises(StoreError, match="ts: line 2: malformed entry"):
        tarsplit.read_layout(gzip.compress(lines[0] + b"\n{bad\n"), "ts")


@pytest.mark.parametrize("odd", [
    b'{"type":1,"name_raw":"/w==","size":3,"payload":"AAAAAAAAAAA=","position":1}',
    b'{"type": 2, "payload": "AAAA", "position": 1}',  # Python's spacing
    b'{"type":2,"payload":"AAAA","position":1,"extra":1}',
    b'',  # a blank line
])
def test_other_lines_go_to_the_json_reader(odd: bytes) -> None:
    lines = [_go(_seg(b"head", 0)), odd, _go(_file("a", 3, 2))]
    text = b"\n".join(lines) + b"\n"
    assert tarsplit._go_lines(text) is None
    got = list(tarsplit.read_entries(gzip.compress(text), "ts"))
    want = [tarsplit._entry(json.loads(line), 0, "ts") for line in lines if line.strip()]
    assert got == want


@pytest.mark.parametrize("bad", [
    b'{"type":2,"payload":"AAAA","position":1}x',  # trailing garbage
    b'x{"type":2,"payload":"AAAA","position":1}',  # leading garbage
    b'{"type":2,"payload":"AAA","position":1}',  # base64 of a wrong length
    # not base64's alphabet (the Go-line pattern leaves that to the strict decoding)
    b'{"type":2,"payload":"AA A","position":1}',
    b'{"type":2,"payload":"AA-_","position":1}',
    b'{"type":1,"name":"f","size":1,"payload":"AAAA*AA=","position":1}',
    b'{"type":1,"name":"\xff\xfe","size":1,"payload":null,"position":1}',  # not UTF-8
    b'{"type":1,"name":"a\\q","size":1,"payload":null,"position":1}',  # bad escape
    # raw control characters in a string (JSON wants them escaped, as Go writes them)
    b'{"type":1,"name":"tab\there","size":1,"payload":null,"position":1}',
    b'{"type":1,"name":"nul\x00","size":1,"payload":null,"position":1}',
    b'{"type":1,"name":"cr\rhere","size":1,"payload":null,"position":1}',
    # an entry broken over two lines (each line must be one entry on its own)
    b'{"type":2,"payload":"AAAA"\n"position":1}',
    b'{"type":2,"payload":"AAAA","position":1},{"type":2,"payload":"AAAA"\n"position":2}',
])
def test_bad_lines_are_named(bad: bytes) -> None:
    text = _go(_seg(b"head", 0)) + b"\n" + bad + b"\n"
    with pytest.raises(StoreError, match="ts: line 2: malformed entry"):
        list(tarsplit.read_entries(gzip.compress(text), "ts"))


def _data_file(tmp_path: Path, size: int) -> tuple[int, bytes]:
    data = os.urandom(size)
    p = tmp_path / "data"
    p.write_bytes(data)
    return os.open(p, os.O_RDONLY), data


def test_hints_cover_every_range_ahead_of_the_reads(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every data file range of a plan is requested before it is read, never more than
    AHEAD (plus one request) beyond the reads, and the copy's bytes are the plan's."""
    monkeypatch.setattr(tarcopy, "AHEAD", 3 << 20)
    monkeypatch.setattr(tarcopy, "HINT_MAX", 1 << 20)
    fd, data = _data_file(tmp_path, 24 << 20)
    try:
        # scattered ranges, out of order, some close enough to be requested as one
        ranges = [(20 << 20, 3 << 20), (1 << 20, 5000), ((1 << 20) + 9000, 70000),
                  (5 << 20, 2 << 20), (300, 100), (12 << 20, 5 << 20)]
        pieces: list[Piece] = []
        want = bytearray()
        for i, (s, n) in enumerate(ranges):
            pieces += [(512, b"h" * 512), (n, s), (i * 7, None)]
            want += b"h" * 512 + data[s:s + n] + bytes(i * 7)
        plan = Plan(len(want), pieces, len(ranges))
        hinted: list[tuple[int, int]] = []
        reads: list[tuple[int, int, int]] = []  # (offset, length, hinted bytes before)
        real_fadvise, real_preadv = os.posix_fadvise, os.preadv

        def fadvise(f: int, off: int, n: int, advice: int) -> None:
            assert advice == os.POSIX_FADV_WILLNEED
            hinted.append((off, n))
            real_fadvise(f, off, n, advice)

        def preadv(f: int, iov: list[memoryview], off: int) -> int:
            reads.append((off, sum(len(v) for v in iov), len(hinted)))
            return real_preadv(f, iov, off)

        monkeypatch.setattr(os, "posix_fadvise", fadvise)
        monkeypatch.setattr(os, "preadv", preadv)
        got = bytearray(len(want))

        def sink(chunk: memoryview, off: int) -> None:
            got[off:off + len(chunk)] = chunk

        tarcopy.copy_plan(plan, fd, sink, where="t",
                          expect_digest="sha256:" + hashlib.sha256(want).hexdigest())
        assert got == want
        assert all(n <= tarcopy.HINT_MAX for _, n in hinted)
        for off, n, before in reads:  # each read lies in ranges requested before it
            covered = sum(max(0, min(off + n, s + k) - max(off, s))
                          for s, k in hinted[:before])
            assert covered == n, (off, n)
        read_so_far = 0
        for _off, n, before in reads:
            ahead = sum(k for _, k in hinted[:before]) - read_so_far
            assert ahead <= tarcopy.AHEAD + tarcopy.HINT_MAX + tarcopy.HINT_GAP * len(ranges)
            read_so_far += n
    finally:
        os.close(fd)


def test_copy_reads_through_its_own_descriptor(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel copies must not share one open file (one readahead state): each reads
    through a descriptor of its own, closed afterwards."""
    fd, data = _data_file(tmp_path, 1 << 20)
    seen: set[int] = set()
    real = os.preadv

    def preadv(f: int, iov: list[memoryview], off: int) -> int:
        seen.add(f)
        return real(f, iov, off)

    monkeypatch.setattr(os, "preadv", preadv)
    try:
        plan = Plan(1000, [(1000, 4096)], 1)
        out = bytearray()
        tarcopy.copy_plan(plan, fd, lambda c, o: out.extend(c), where="t",
                          expect_digest="sha256:" + hashlib.sha256(data[4096:5096]).hexdigest())
        assert bytes(out) == data[4096:5096]
        assert seen and fd not in seen
        for f in seen:
            with pytest.raises(OSError):
                os.fstat(f)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def built_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from docker_inputs import spec_text, write_inputs

    from dmimage.image.docker_store import build_docker_store, load_docker_spec

    work = tmp_path_factory.mktemp("dsave")
    inp = write_inputs(work / "inputs")
    spec = work / "seed.toml"
    spec.write_text(spec_text("seed", ["inputs/rich.tar"]))
    build_docker_store(load_docker_spec(spec), work / "root")
    return work / "root", inp


def _copy_store(src: Path, dst: Path) -> None:
    import shutil
    import subprocess

    shutil.copytree(src, dst, ignore=lambda d, names: (
        ["data"] if d.endswith("devicemapper/devicemapper") else []))
    subprocess.run(["cp", "--sparse=always", str(src / "devicemapper/devicemapper/data"),
                    str(dst / "devicemapper/devicemapper/data")], check=True)


def _tar_split_of(root: Path, inp: Any, layer: str) -> Path:
    from dmimage.docker.store import open_store

    store = open_store(root)
    got = next(x for x in store.layers.values() if x.diff_id == inp.diff_id(layer))
    assert got.tar_split is not None
    return root / got.tar_split


def _flip_first_byte(ts: Path) -> None:
    lines = gzip.decompress(ts.read_bytes()).splitlines()
    seg = json.loads(lines[0])
    raw = bytearray(base64.b64decode(seg["payload"]))
    raw[0] ^= 1
    seg["payload"] = base64.b64encode(bytes(raw)).decode()
    lines[0] = json.dumps(seg, separators=(",", ":")).encode()
    ts.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))


@pytest.mark.parametrize("first_bad", [False, True])
def test_error_order_while_copies_run(built_root: tuple[Path, Any], tmp_path: Path,
                                      first_bad: bool) -> None:
    """Layer copies start while the next layer's tar-split is still being read: a later
    layer's unreadable tar-split is the error when the earlier copies are sound; when an
    earlier layer fails its diff id, that one is named (tar order), and no output is
    left either way."""
    import subprocess
    import sys

    src, inp = built_root
    root = tmp_path / "root"
    _copy_store(src, root)
    first = _tar_split_of(root, inp, "l1")
    later = _tar_split_of(root, inp, "l3")
    later.write_bytes(b"not gzip")
    if first_bad:
        _flip_first_byte(first)
    out = tmp_path / "s.tar"
    res = subprocess.run([sys.executable, "-m", "dmimage", "docker", "save", str(root),
                          "rich:2", "-o", str(out)], capture_output=True, text=True,
                         check=False)
    err = res.stderr.strip()
    assert res.returncode == 1 and "\n" not in err and "Traceback" not in err, err
    if first_bad:
        assert str(first.relative_to(root)) in err and "diff id" in err, err
    else:
        assert str(later.relative_to(root)) in err and "gzip" in err, err
    assert not out.exists() and not list(tmp_path.glob(".s.tar.*"))


def test_rel_path_is_normpath() -> None:
    """The plain-name shortcut gives what posixpath.normpath gives, on awkward names."""
    import posixpath

    from dmimage.docker.ext4runs import rel_path, rel_paths

    names = [b"a", b"/a/b", b"a/b/", b"a//b", b"./a", b"a/./b", b"a/../b", b"../a", b".",
             b"..", b"/", b"//a", b"///a/b", b"a/.hidden", b".hidden", b"a/b.", b"a.b/c",
             b"a/..b", b"a/b/..", b"\xff/\x00", b"a/.", b"etc/ssl/certs"]
    for n in names:
        assert rel_path(n) == posixpath.normpath(n).lstrip(b"/"), n
    # by the list: each awkward name spoils the shortcut wherever it stands in a plain list
    plain = [b"etc/passwd", b"a/b.c", b"usr/lib/x"]
    assert rel_paths(plain) is plain
    for n in [*names, b"", b"a\nb", b"a/\n/b"]:
        for at in range(len(plain) + 1):
            mixed = plain[:at] + [n] + plain[at:]
            assert rel_paths(mixed) == [posixpath.normpath(x).lstrip(b"/") for x in mixed], \
                (n, at)

