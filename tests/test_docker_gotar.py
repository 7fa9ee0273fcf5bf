"""Layer tars read as Go's archive/tar (dockerd 20.10's UnpackLayer, tar-split) reads them,
on tar bytes built by hand (``handtar``). The expected values come from the formats and
from Go's reader and moby's applier, not from our code:

- a global PAX header (typeflag 'g') is returned by Go's Reader.Next as an entry of its own
  (its Name the ``path`` record when there is one, its PAXRecords the records, Size 0) and
  is merged into no later header; UnpackLayer removes an existing path of that name, then
  createTarFile ignores the entry ("PAX Global Extended Headers found and ignored"), and the
  path counts as unpacked;
- a GNU-format header (magic "ustar ", version " \\0") carries atime at 345 and ctime at
  357 (octal; read when the first byte is not NUL) and has no name prefix; createTarFile
  sets a file's atime to it unless it is before the mtime, and UnpackLayer's last loop sets
  a directory's atime to it (none: the epoch).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from docker_inputs import expected_tree
from handtar import END, GNU, header, member, pax_records
from handtar import data as data_block
from test_docker_ext4layer import _stat, apply_raw_layers

from dmimage.docker import tarsplit
from dmimage.docker.errors import StoreError
from dmimage.docker.gotar import atime_ns, open_tar
from dmimage.docker.inputs import _Source
from dmimage.docker.unpack import apply

UID, GID = os.getuid(), os.getgid()
T = 1_600_000_000
GLOBAL = [("mtime", "1234567890"), ("uid", "4242"), ("gid", "4343"),
          ("atime", "1999999999"), ("path", "gpath")]

#: a file the global header's path names, and one it does not
BEFORE = (member(b"gpath", b"0", b"old\n", uid=UID, gid=GID)
          + member(b"keep", b"0", b"keep\n", uid=UID, gid=GID) + END)
#: a global header, then a file and a directory of the caller's owner
WITH_GLOBAL = (member(b"pax_global_header", b"g", pax_records(GLOBAL), mtime=0)
               + member(b"file", b"0", b"hello\n", mode=0o640, uid=UID, gid=GID)
               + member(b"dir/", b"5", mode=0o755, uid=UID, gid=GID) + END)
#: GNU-format members: a file with atime past its mtime, a directory with one before, a
#: file without one
GNU_TIMES = (member(b"gnufile", b"0", b"g\n", magic=GNU, uid=UID, gid=GID,
                    atime=1_700_000_000, ctime=1_700_000_001)
             + member(b"gnudir/", b"5", mode=0o755, magic=GNU, uid=UID, gid=GID,
                      atime=1_500_000_000)
             + member(b"plain", b"0", b"p\n", magic=GNU, uid=UID, gid=GID) + END)


def _read(raw: bytes) -> list[tuple[str, bytes, int, int, int, int, dict[str, str]]]:
    with open_tar(fileobj=io.BytesIO(raw)) as t:
        return [(ti.name, ti.type, ti.size, int(ti.mtime), ti.uid, ti.gid,
                 dict(ti.pax_headers)) for ti in t.getmembers()]


def test_global_header_is_its_own_entry_and_changes_nothing_after_it() -> None:
    assert _read(WITH_GLOBAL) == [
        ("gpath", b"g", 0, 0, 0, 0, dict(GLOBAL)),
        ("file", b"0", 6, T, UID, GID, {}),
        ("dir", b"5", 0, T, UID, GID, {})]


def test_extended_header_before_a_global_one_applies_to_nothing() -> None:
    """Go's next(): the 'g' header's records replace the 'x' header's, then it returns."""
    raw = (member(b"PaxHeaders/x", b"x", pax_records([("path", "xpath"), ("uid", "7")]))
           + member(b"pax_global_header", b"g", pax_records([("comment", "c")]))
           + member(b"file", b"0", b"hello\n", uid=UID, gid=GID) + END)
    assert _read(raw) == [("pax_global_header", b"g", 0, T, 0, 0, {"comment": "c"}),
                          ("file", b"0", 6, T, UID, GID, {})]


def test_gnu_header_times_and_no_prefix() -> None:
    with open_tar(fileobj=io.BytesIO(GNU_TIMES)) as t:
        got = [(ti.name, atime_ns(ti), getattr(ti, "ctime_s", None)) for ti in t]
    assert got == [("gnufile", 1_700_000_000 * 10**9, 1_700_000_001),
                   ("gnudir", 1_500_000_000 * 10**9, None),
                   ("plain", None, None)]


def _times(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_atime_ns // 10**9, st.st_mtime_ns // 10**9


def test_xfs_applier(tmp_path: Path) -> None:
    dest = tmp_path / "rootfs"
    dest.mkdir()
    sizes = []
    for raw in (BEFORE, WITH_GLOBAL, GNU_TIMES):
        with open_tar(fileobj=io.BytesIO(raw)) as t:
            sizes.append(apply(t, os.fsencode(dest), chown=False))
    assert sizes == [9, 6, 4]
    assert sorted(os.listdir(dest)) == ["dir", "file", "gnudir", "gnufile", "keep", "plain"]
    assert _times(dest / "file") == (T, T)
    assert _times(dest / "dir") == (0, T)
    assert _times(dest / "gnufile") == (1_700_000_000, T)
    assert _times(dest / "gnudir") == (1_500_000_000, T)
    assert _times(dest / "plain") == (T, T)
    assert os.stat(dest / "file").st_mode & 0o7777 == 0o640
    assert (dest / "file").read_bytes() == b"hello\n"  # last: reading sets the atime


def test_reference_model(tmp_path: Path) -> None:
    """expected_tree follows the same reading: gpath removed, owners the members' own."""
    tree = expected_tree([BEFORE, WITH_GLOBAL])
    assert sorted(tree) == ["dir", "file", "keep"]
    assert (tree["file"]["uid"], tree["file"]["gid"], tree["file"]["mode"]) == \
        (UID, GID, 0o640)


def test_tarsplit_keeps_the_global_entry_and_rebuilds_the_bytes(tmp_path: Path) -> None:
    lf = tmp_path / "l.tar"
    lf.write_bytes(WITH_GLOBAL)
    ts, members, applied = tarsplit.disassemble(str(lf), "layer")
    assert applied == 6
    assert [(m.name, m.info.type) for m in members] == \
        [(b"gpath", b"g"), (b"file", b"0"), (b"dir", b"5")]
    files = [json.loads(line) for line in gzip.decompress(ts).splitlines()]
    files = [e for e in files if e["type"] == tarsplit.FILE_TYPE]
    assert [(e["name"], e.get("size")) for e in files][:2] == [("gpath", None), ("file", 6)]
    entries = list(tarsplit.read_entries(ts, "ts"))

    def open_file(name: bytes) -> io.BytesIO:
        assert name == b"file"
        return io.BytesIO(b"hello\n")

    digest = "sha256:" + hashlib.sha256(WITH_GLOBAL).hexdigest()
    assert b"".join(tarsplit.assemble(entries, open_file, expect_digest=digest,
                                      where="l")) == WITH_GLOBAL


def test_tarsplit_refuses_two_global_headers_of_one_name(tmp_path: Path) -> None:
    """tar-split's packer refuses a name seen twice, global headers' included."""
    g = member(b"pax_global_header", b"g", pax_records([("comment", "x")]))
    lf = tmp_path / "l.tar"
    lf.write_bytes(g + g + END)
    with pytest.raises(StoreError, match="named twice"):
        tarsplit.disassemble(str(lf), "layer")


def test_ext4_builder(tmp_path: Path) -> None:
    img = apply_raw_layers(tmp_path, [BEFORE, WITH_GLOBAL, GNU_TIMES])
    ls = subprocess.run(["debugfs", "-R", "ls -p /rootfs", str(img)], capture_output=True,
                        text=True, check=True).stdout
    names = sorted(f.split("/")[5] for f in ls.splitlines() if f.count("/") >= 6)
    assert names == [".", "..", "dir", "file", "gnudir", "gnufile", "keep", "plain"]

    def times(p: str) -> tuple[int, int, int]:
        st = _stat(img, f"/rootfs/{p}")
        return st["user"], st["atime"], st["mtime"]

    assert times("file") == (UID, T, T)
    assert times("dir") == (UID, 0, T)
    assert times("gnufile") == (UID, 1_700_000_000, T)
    assert times("gnudir") == (UID, 1_500_000_000, T)
    assert times("plain") == (UID, T, T)


def test_docker_save_archive_with_a_global_header(tmp_path: Path) -> None:
    """docker load reads the archive with Go's archive/tar: a global path renames nothing."""
    p = tmp_path / "in.tar"
    p.write_bytes(member(b"pax_global_header", b"g", pax_records([("path", "elsewhere")]))
                  + member(b"manifest.json", b"0", b"[]") + END)
    src = _Source(p)
    try:
        assert src.exists("manifest.json")
        assert src.read("manifest.json") == b"[]"
    finally:
        src.close()


def _prefixed(name: bytes, prefix: bytes, typeflag: bytes) -> bytes:
    """A ustar header whose name is split: *prefix* at 345, *name* at 0."""
    b = bytearray(header(name, typeflag))
    b[345:345 + len(prefix)] = prefix
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def test_tarsplit_lines_are_tar_splits(tmp_path: Path) -> None:
    """disassemble writes the lines tar-split's NewInputTarStream and JSON packer write:
    the name is Go's hdr.Name (a directory's trailing slash kept, from the header, a PAX
    path, a GNU long name, a ustar prefix joined with "/"), valid UTF-8 as a Go-escaped
    string (<, > and & as \\u escapes, UTF-8 as is), other bytes base64 in name_raw; one
    segment per member from the end of the previous data (its padding included) to this
    data; after the last, its padding and the two zero blocks, then the rest of the file
    (one read's worth), then the empty segment of the read that met EOF.
    The readers see tarfile's names (no trailing slash), as before."""
    from dmimage.docker.crc64 import crc64

    h_dir = header(b"dir/", b"5")
    h_file, pad = header(b"dir/a", b"0", size=3), b"\0" * 509
    pax = member(b"PaxHeaders/p", b"x", pax_records([("path", "p/")]))
    h_p = header(b"p", b"5")
    long = member(b"././@LongLink", b"L", b"long/\0", magic=GNU) + header(b"long", b"5",
                                                                          magic=GNU)
    h_pre = _prefixed(b"d/", b"pre", b"5")
    h_esc = header("x<&\u00e9".encode(), b"0")
    h_raw = header(b"\xff", b"0")
    raw = (h_dir + h_file + b"hi\n" + pad + pax + h_p + long + h_pre + h_esc + h_raw + END
           + b"\0" * 512)
    lf = tmp_path / "l.tar"
    lf.write_bytes(raw)
    ts, members, _ = tarsplit.disassemble(str(lf), "layer")

    def seg(i: int, b: bytes) -> bytes:
        return b'{"type":2,"payload":"%s","position":%d}' % (base64.b64encode(b), i)

    def ent(i: int, name: bytes) -> bytes:
        return b'{"type":1,%s,"payload":null,"position":%d}' % (name, i)

    crc = base64.b64encode(crc64(b"hi\n").to_bytes(8, "big"))
    assert gzip.decompress(ts).split(b"\n") == [
        seg(0, h_dir), ent(1, b'"name":"dir/"'),
        seg(2, h_file), b'{"type":1,"name":"dir/a","size":3,"payload":"%s","position":3}'
        % crc,
        seg(4, pad + pax + h_p), ent(5, b'"name":"p/"'),
        seg(6, long), ent(7, b'"name":"long/"'),
        seg(8, h_pre), ent(9, b'"name":"pre/d/"'),
        seg(10, h_esc), ent(11, '"name":"x\\u003c\\u0026\u00e9"'.encode()),
        seg(12, h_raw), ent(13, b'"name_raw":"/w=="'),
        seg(14, END), seg(15, b"\0" * 512), seg(16, b""), b""]
    assert [m.name for m in members] == [b"dir", b"dir/a", b"p", b"long", b"pre/d",
                                         "x<&\u00e9".encode(), b"\xff"]
    entries = list(tarsplit.read_entries(ts, "ts"))
    assert [e.name for e in entries if e.type == tarsplit.FILE_TYPE][-2:] == \
        ["x<&\u00e9".encode(), b"\xff"]
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    assert b"".join(tarsplit.assemble(entries, lambda n: io.BytesIO(b"hi\n"),
                                      expect_digest=digest, where="l")) == raw


# Go 1.19's archive/tar (dockerd 20.10.24 in Debian 12): next() keeps the *last* extended
# header's records (parsePAX replaces the map), lets a GNU long name/link win over the PAX
# path/linkpath whatever their order, and mergePAX skips empty values ("keep the original
# USTAR value"; parsePAX drops them from PAXRecords); GNU.sparse.name renames only a file
# that is sparse (major/minor or a map).
def _x(records: list[tuple[str, str]]) -> bytes:
    return member(b"PaxHeaders/x", b"x", pax_records(records))


def test_gnu_long_name_and_link_win_over_pax_path_and_linkpath() -> None:
    raw = (_x([("path", "paxname")]) + member(b"././@LongLink", b"L", b"longname\0")
           + member(b"short", b"0", b"a\n", uid=UID, gid=GID)
           + _x([("linkpath", "paxtarget")]) + member(b"././@LongLink", b"K", b"longname\0")
           + header(b"hard", b"1") + END)
    with open_tar(fileobj=io.BytesIO(raw)) as t:
        got = [(ti.name, ti.linkname) for ti in t.getmembers()]
    assert got == [("longname", ""), ("hard", "longname")]


def test_the_last_extended_header_is_the_one_that_applies() -> None:
    raw = (_x([("path", "first"), ("uid", "7")]) + _x([("path", "second")])
           + member(b"file", b"0", b"a\n", uid=UID, gid=GID) + END)
    assert _read(raw) == [("second", b"0", 2, T, UID, GID, {"path": "second"})]


def test_empty_pax_values_keep_the_header_fields() -> None:
    raw = (_x([("path", ""), ("uid", ""), ("SCHILY.xattr.user.a", "")])
           + member(b"file", b"0", b"a\n", uid=UID, gid=GID) + END)
    assert _read(raw) == [("file", b"0", 2, T, UID, GID, {})]


def test_gnu_sparse_name_renames_no_file_that_is_not_sparse() -> None:
    raw = (_x([("GNU.sparse.name", "other")]) + member(b"real", b"0", b"a\n", uid=UID,
                                                        gid=GID) + END)
    assert [r[0] for r in _read(raw)] == ["real"]


@pytest.mark.parametrize("records", [
    [("uid", "1.5")], [("gid", "x")], [("size", "-1")], [("size", "2abc")],
    [("uid", "1_0")], [("mtime", "1e5")], [("mtime", ".5")], [("atime", "1.5x")],
    [("path", "a\0b")]])
def test_pax_records_go_refuses_are_refused(records: list[tuple[str, str]]) -> None:
    """mergePAX: strconv.ParseInt / parsePAXTime failures are ErrHeader; handleRegularFile:
    a negative size is ErrHeader; validPAXRecord: no NUL in a path."""
    raw = (member(b"first", b"0", b"a\n") + _x(records) + member(b"file", b"0", b"a\n")
           + END)
    with pytest.raises(tarfile.ReadError):
        _read(raw)


def test_malformed_pax_records_are_refused() -> None:
    """parsePAXRecord: a record with no length is ErrHeader (tarfile stops at the first
    record it cannot match and keeps the ones before)."""
    raw = (member(b"first", b"0", b"a\n")
           + member(b"PaxHeaders/x", b"x", b"11 path=ab\ngarbage\n")
           + member(b"file", b"0", b"a\n") + END)
    with pytest.raises(tarfile.ReadError):
        _read(raw)


@pytest.mark.parametrize("kind", [b"x", b"g", b"L", b"K"])
def test_special_headers_over_one_mib_are_refused(kind: bytes) -> None:
    """readSpecialFile: over maxSpecialFileSize (1 << 20) is ErrFieldTooLong."""
    body = (pax_records([("comment", "c" * (1 << 20))]) if kind in b"xg"
            else b"n" * ((1 << 20) + 1))
    raw = member(b"first", b"0", b"a\n") + member(b"special", kind, body) + member(
        b"file", b"0", b"a\n") + END
    with pytest.raises(tarfile.ReadError):
        _read(raw)


def _bad_checksum(block: bytes) -> bytes:
    b = bytearray(block)
    b[148:156] = b"000001\0 "
    return bytes(b)


@pytest.mark.parametrize("tail", [
    _bad_checksum(header(b"second", b"0")) + END,  # readHeader: unknown format: ErrHeader
    b"\0" * 512 + member(b"second", b"0", b"b\n") + END,  # zero block, then a header
    header(b"second", b"0")[:300],  # io.ReadFull: ErrUnexpectedEOF
])
def test_a_bad_header_after_the_first_is_an_error_not_the_end(tail: bytes,
                                                               tmp_path: Path) -> None:
    """Go's readHeader ends the archive only at EOF, one zero block then EOF, or two zero
    blocks; tarfile takes any bad header after the first as the end, and the layer would
    be built without the members after it, where dockerd refuses the layer."""
    raw = member(b"first", b"0", b"a\n") + tail
    with pytest.raises(tarfile.ReadError):
        _read(raw)
    p = tmp_path / "l.tar"
    p.write_bytes(raw)
    with pytest.raises(StoreError):
        tarsplit.disassemble(str(p), "l.tar")


@pytest.mark.parametrize("tail", [b"", b"\0" * 512, END, END + b"junk after the end"])
def test_the_ends_go_accepts(tail: bytes) -> None:
    raw = member(b"first", b"0", b"a\n") + tail
    assert [r[0] for r in _read(raw)] == ["first"]


def test_crc64_update_continues_a_checksum() -> None:
    """Go's crc64.Update: CRC-64/ISO's check value ("123456789") in two pieces."""
    from dmimage.docker.crc64 import crc64, crc64_update
    assert crc64_update(crc64(b"1234"), b"56789") == 0xB90956C775A41001
    assert crc64_update(0, b"123456789") == 0xB90956C775A41001


def test_disassemble_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small files' data is not all held for one batch of CRCs, and a large file is not
    read whole: the peak stays far under the layer's size (the data is 20.5 MB; the
    batch and chunk sizes scaled down, with the data, to keep the test quick)."""
    import tracemalloc

    from dmimage.docker.crc64 import crc64, crc64_update
    monkeypatch.setattr(tarsplit, "_CRC_BATCH", 1 << 20)
    monkeypatch.setattr(tarsplit, "_CRC_CHUNK", 1 << 20)
    crc64_update(0, bytes(1 << 20))  # its cached constants, not the test's subject
    big = bytes(range(256)) * (10 << 12)  # 10 MiB
    small = [os.urandom(60_000) for _ in range(175)]
    p = tmp_path / "layer.tar"
    with open(p, "wb") as f:
        for i, d in enumerate(small):
            f.write(member(b"s%d" % i, b"0", d))
        f.write(member(b"big", b"0", big) + END)
    want_big = crc64(big).to_bytes(8, "big")
    want_s0 = crc64(small[0]).to_bytes(8, "big")
    del big, small
    tracemalloc.start()
    try:
        ts, _, applied = tarsplit.disassemble(str(p), "layer.tar")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert applied == 10 * (1 << 20) + 175 * 60_000
    files = {e.name: e.payload for e in tarsplit.read_entries(ts, "ts")
             if e.type == tarsplit.FILE_TYPE}
    assert files[b"big"] == want_big and files[b"s0"] == want_s0
    assert peak < 10 << 20, peak


def _with_field(block: bytes, lo: int, value: bytes) -> bytes:
    """*block* with bytes lo.. replaced by *value*, its checksum recomputed."""
    b = bytearray(block)
    b[lo:lo + len(value)] = value
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def test_numeric_fields_read_as_go_parses_them() -> None:
    """parseOctal trims leading and trailing NULs and spaces before parsing (tarfile cuts
    at the first NUL: a leading NUL reads as 0, and the data as the next header)."""
    blk = _with_field(header(b"f", b"0", uid=UID, gid=GID), 124, b"\0 0000000003")
    raw = blk + data_block(b"abc") + member(b"g", b"0", b"g\n", uid=UID, gid=GID) + END
    assert [(r[0], r[2]) for r in _read(raw)] == [("f", 3), ("g", 2)]
    with open_tar(fileobj=io.BytesIO(raw)) as t:
        f = t.extractfile("f")
        assert f is not None and f.read() == b"abc"


@pytest.mark.parametrize("lo,value", [
    (108, b"+000012\0"),  # uid: strconv.ParseUint takes no sign
    (116, b"-000012\0"),  # gid
    (124, b"0000_000003\0"),  # size: no underscores in base 8
    (136, b"\0\0zz\0\0\0\0\0\0\0\0"),  # mtime: after the trim, not octal
    (124, b"\xff" * 12),  # size -1 in base-256: handleRegularFile's nb < 0
])
def test_numeric_fields_go_refuses_are_refused(lo: int, value: bytes) -> None:
    blk = _with_field(header(b"f", b"0", size=3), lo, value)
    raw = member(b"first", b"0", b"a\n") + blk + data_block(b"abc") + END
    with pytest.raises(tarfile.ReadError):
        _read(raw)


def test_old_regular_type_is_a_directory_by_its_final_name() -> None:
    """Go's next(), after the PAX records and GNU long names: typeflag NUL (TypeRegA)
    becomes TypeDir if hdr.Name ends in a slash, else TypeReg (tarfile looks only at the
    header's own name field)."""
    raw = (_x([("path", "pd/")]) + header(b"pd", b"\0")
           + member(b"././@LongLink", b"L", b"ld/\0") + header(b"x", b"\0")
           + _x([("path", "pf")]) + member(b"hd/", b"\0", b"a\n") + END)
    with open_tar(fileobj=io.BytesIO(raw)) as t:
        got = [(ti.name, ti.type) for ti in t.getmembers()]
        f = t.extractfile("pf")
        assert f is not None and f.read() == b"a\n"
    assert got == [("pd", b"5"), ("ld", b"5"), ("pf", b"0")]


def test_tarsplit_refuses_names_go_cleans_alike(tmp_path: Path) -> None:
    """tar-split's packer refuses a name whose filepath.Clean it has seen: Go's Clean
    makes "//a" "/a" (posixpath.normpath keeps POSIX's two leading slashes)."""
    raw = member(b"/a", b"0", b"a\n") + member(b"//a", b"0", b"b\n") + END
    p = tmp_path / "l.tar"
    p.write_bytes(raw)
    with pytest.raises(StoreError, match="named twice"):
        tarsplit.disassemble(str(p), "l.tar")


def test_global_header_empty_values_delete_their_key() -> None:
    """parsePAX stores a record only if its value is not empty, else deletes the key; the
    global header's name is its path record only if one is left."""
    raw = (member(b"pax_global_header", b"g",
                  pax_records([("path", "gp"), ("comment", "c"), ("path", "")]))
           + member(b"file", b"0", b"a\n", uid=UID, gid=GID) + END)
    assert _read(raw)[0] == ("pax_global_header", b"g", 0, T, 0, 0, {"comment": "c"})
