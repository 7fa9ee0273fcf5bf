"""The guest-side layer applier (``dmimage.docker.unpack``, what an xfs store's layers are
applied with in the guest), run here on a directory: the tree it leaves must be the one
``docker_inputs.expected_tree`` computes from the layer tars (an independent reading of
moby's UnpackLayer), whiteouts, opaque directories, hard links and all. Owners, device nodes
and security.* attributes need root; without it the test uses a layer of the caller's own.
And the spec's ``[docker] fs`` key, and the guest script's dockerd command lines."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
from docker_inputs import M, expected_tree, layer_tar, layers, spec_text

from dmimage.docker.gotar import open_tar
from dmimage.docker.unpack import LayerError, apply, driver_get, serve
from dmimage.image.docker_store import load_docker_spec
from dmimage.image.docker_xfs import XfsLayer, guest_script, jobs_json
from dmimage.image.spec import SpecError

ROOT = os.geteuid() == 0


def _apply_all(dest: Path, tars: list[bytes], *, chown: bool) -> None:
    for raw in tars:
        with open_tar(fileobj=io.BytesIO(raw)) as t:  # as apply_job opens it
            apply(t, os.fsencode(dest), chown=chown)


def _read_tree(dest: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(dest):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(dest))
            st = os.lstat(p)
            ent: dict[str, Any] = {"uid": st.st_uid, "gid": st.st_gid}
            names = os.listxattr(p, follow_symlinks=False)
            ent["xattrs"] = {k: os.getxattr(p, k, follow_symlinks=False) for k in names}
            m = st.st_mode
            if stat.S_ISDIR(m):
                ent.update(type="d", mode=stat.S_IMODE(m))
            elif stat.S_ISLNK(m):
                ent.update(type="l", link=os.readlink(p))
            elif stat.S_ISFIFO(m):
                ent.update(type="p", mode=stat.S_IMODE(m))
            elif stat.S_ISCHR(m):
                ent.update(type="c", mode=stat.S_IMODE(m),
                           dev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
            else:
                ent.update(type="f", mode=stat.S_IMODE(m),
                           sha256=hashlib.sha256(p.read_bytes()).hexdigest())
            out[rel] = ent
    return out


def _compare(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]], *,
             owners: bool) -> None:
    assert set(got) == set(want)
    for path, w in want.items():
        g = dict(got[path])
        w = dict(w)
        if not owners:
            for k in ("uid", "gid"):
                g.pop(k)
                w.pop(k)
        assert g == w, path


@pytest.mark.skipif(not ROOT, reason="owners, a device node and security.capability need root")
def test_rich_layers_as_dockerd(tmp_path: Path) -> None:
    """l1 (owners, setuid, hard link, symlink, FIFO, device node, security.capability, odd
    names) then l2 (a whiteout, a file replacing a symlink, an opaque directory, a whited-out
    directory) then l3: the tree is the reference's, owners included (bin/tool takes its
    hard link's header mode, as moby's createTarFile chmods a hard link); directory times
    are the tar's (set last)."""
    ls = layers()
    tars = [layer_tar(ls[x]) for x in ("l1", "l2", "l3")]
    dest = tmp_path / "rootfs"
    dest.mkdir()
    _apply_all(dest, tars, chown=True)
    _compare(_read_tree(dest), expected_tree(tars), owners=True)
    assert os.stat(dest / "bin/tool").st_ino != os.stat(dest / "bin/sh").st_ino
    for d in ("usr/share", "app", "tmp"):  # etc and bin change in l2 without an entry
        assert os.stat(dest / d).st_mtime_ns == 1_600_000_000 * 10**9, d


def test_semantics_without_root(tmp_path: Path) -> None:
    """A layer of the caller's own owner: missing parents 0600, a hard link to an earlier
    layer's file, a whiteout, an opaque directory keeping what this layer put there, a file
    replacing a directory, a directory merged (its metadata changed, its content kept)."""
    uid, gid = os.getuid(), os.getgid()
    one = [M("a/", "d", mode=0o755, uid=uid, gid=gid),
           M("a/keep", data=b"keep\n", uid=uid, gid=gid),
           M("a/old", data=b"old\n", uid=uid, gid=gid),
           M("deep/x/y", data=b"parents made\n", uid=uid, gid=gid),
           M("d/", "d", mode=0o755, uid=uid, gid=gid),
           M("d/inner", data=b"i\n", uid=uid, gid=gid),
           M("o/", "d", mode=0o755, uid=uid, gid=gid),
           M("o/gone", data=b"g\n", uid=uid, gid=gid),
           M("o/sub/", "d", mode=0o755, uid=uid, gid=gid),
           M("o/sub/gone2", data=b"g2\n", uid=uid, gid=gid)]
    two = [M("a/", "d", mode=0o700, uid=uid, gid=gid),
           M("a/.wh.old"),
           M("a/link", "h", link="a/keep", uid=uid, gid=gid),
           M("d", data=b"now a file\n", uid=uid, gid=gid),
           M("o/", "d", mode=0o755, uid=uid, gid=gid),
           M("o/.wh..wh..opq"),
           M("o/new", data=b"n\n", uid=uid, gid=gid)]
    tars = [layer_tar(one), layer_tar(two)]
    dest = tmp_path / "rootfs"
    dest.mkdir()
    _apply_all(dest, tars, chown=False)
    got = _read_tree(dest)
    want = expected_tree(tars)
    for path in ("deep", "deep/x"):
        assert got[path]["mode"] == 0o600
    for ent in got.values():
        ent["xattrs"] = {}
    _compare(got, want, owners=False)
    assert os.stat(dest / "a/link").st_ino == os.stat(dest / "a/keep").st_ino
    assert os.stat(dest / "a").st_mode & 0o777 == 0o700


@pytest.mark.parametrize("name", ["../escape", "a/../../escape"])
def test_member_outside_root_is_refused(tmp_path: Path, name: str) -> None:
    raw = layer_tar([M(name, data=b"x\n", uid=os.getuid(), gid=os.getgid())])
    with pytest.raises(LayerError, match="outside"):
        _apply_all(tmp_path, [raw], chown=False)
    assert not (tmp_path.parent / "escape").exists()


def test_first_mount(tmp_path: Path) -> None:
    """rootfs/ 0755 and id 0600 holding the hash; an existing id is left alone."""
    driver_get(os.fsencode(tmp_path), "abc")
    assert (tmp_path / "id").read_bytes() == b"abc"
    assert stat.S_IMODE(os.stat(tmp_path / "id").st_mode) == 0o600
    assert (tmp_path / "rootfs").is_dir()
    driver_get(os.fsencode(tmp_path), "other")
    assert (tmp_path / "id").read_bytes() == b"abc"


def _spec(tmp_path: Path, extra: str, base_size: str = "16M") -> Path:
    (tmp_path / "in.tar").write_bytes(b"")
    p = tmp_path / "s.toml"
    p.write_text(spec_text("s", ["in.tar"], base_size=base_size) + extra)
    return p


def test_spec_fs(tmp_path: Path) -> None:
    assert load_docker_spec(_spec(tmp_path, "")).fs == "ext4"
    s = load_docker_spec(_spec(tmp_path, 'fs = "xfs"\n', "320M"))
    assert (s.fs, s.base_uuid_given) == ("xfs", False)
    s = load_docker_spec(_spec(tmp_path, 'fs = "xfs"\nbase_uuid = '
                                          '"0F8F0DE5-8B5E-4D9B-9B2A-5D1B1A5F7C01"\n', "320M"))
    assert s.base_uuid == "0f8f0de5-8b5e-4d9b-9b2a-5d1b1a5f7c01" and s.base_uuid_given
    with pytest.raises(SpecError, match="docker.fs"):
        load_docker_spec(_spec(tmp_path, 'fs = "btrfs"\n'))
    with pytest.raises(SpecError, match="300 MiB"):
        load_docker_spec(_spec(tmp_path, 'fs = "xfs"\n', "256M"))
    with pytest.raises(SpecError, match="not a UUID"):
        load_docker_spec(_spec(tmp_path, 'fs = "xfs"\nbase_uuid = "random"\n', "320M"))


def test_guest_script_uses_dockerds_command_lines(tmp_path: Path) -> None:
    """mkfs.xfs without options (dockerd's createFilesystem), each layer's device mounted
    with nouuid (MountDevice), the snapshot taken of the parent before its transaction id
    is set, the pool's table as dockerd's."""
    lay = [XfsLayer("a" * 64, 2, 1, tmp_path / "l.tar", True),
           XfsLayer("b" * 64, 3, 2, tmp_path / "m.tar", False)]
    s = guest_script("/dev/vdb", "/dev/vdc", 128 << 20, 320 << 20, tmp_path / "mnt", lay, None,
                     tmp_path / "jobs.json")
    assert "mkfs.xfs /dev/mapper/dmimage-build-base" in s
    assert s.count("mount -t xfs -o nouuid ") == 2
    assert "'0 262144 thin-pool /dev/vdb /dev/vdc 128 32768 1 skip_block_zeroing'" in s
    assert s.index("'create_snap 2 1'") < s.index("'set_transaction_id 1 2'") < \
        s.index("'create_snap 3 2'") < s.index("'set_transaction_id 2 3'")
    assert s.count("echo go >&3") == 2 and s.count("-m dmimage.docker.unpack --jobs") == 1
    assert json.loads(jobs_json(tmp_path / "mnt", lay)) == [
        [str(tmp_path / "mnt"), str(tmp_path / "l.tar"), "a" * 64],  # rootfs/ and id made
        [str(tmp_path / "mnt"), str(tmp_path / "m.tar"), None]]
    s = guest_script("/dev/vdb", "/dev/vdc", 128 << 20, 320 << 20, tmp_path, lay, "u-u",
                     tmp_path / "jobs.json")
    assert "mkfs.xfs -m uuid=u-u /dev/mapper/" in s


@pytest.mark.skipif(not ROOT, reason="the applier chroots into rootfs/")
def test_serve_applies_a_job_per_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """serve: the first job makes rootfs/ and id, each job waits for its line, a failing
    job answers "error: ..." naming its tar and the next one still runs; a symlink in the
    layer cannot lead a later member out of rootfs/ (the child is chrooted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    good = tmp_path / "good.tar"
    good.write_bytes(layer_tar([M("esc", "l", link="/"), M("esc/inside", data=b"in\n")]))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(layer_tar([M("x", "h", link="missing")]))
    jobs: list[list[str | None]] = [[str(mnt), str(good), "h" * 64], [str(mnt), str(bad), None],
                                    [str(mnt), str(good), None]]
    monkeypatch.setattr("sys.stdin", io.StringIO("go\ngo\ngo\n"))
    assert serve(jobs) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ok" and out[2] == "ok", out
    assert out[1].startswith("error: ") and "bad.tar" in out[1], out
    assert (mnt / "id").read_bytes() == b"h" * 64
    assert (mnt / "rootfs/inside").read_bytes() == b"in\n"
    assert not (tmp_path.parent / "inside").exists() and not Path("/inside").exists()


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in members:
            ti.size = len(data) if ti.isreg() else 0
            t.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def _ti(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "", mode: int = 0o644,
        mtime: int = 1_600_000_000, pax: dict[str, str] | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = kind, link, mode, mtime
    ti.uid, ti.gid = os.getuid(), os.getgid()
    ti.pax_headers = dict(pax or {})
    return ti


def test_opaque_entry_under_a_symlink_removes_nothing(tmp_path: Path) -> None:
    """``a/.wh..wh..opq`` where ``a`` is a symlink to a directory: moby's filepath.Walk
    lstats its root, finds no directory and walks nothing, so the symlink's target keeps
    its content (the applier must not list the directory through the symlink)."""
    one = _tar([(_ti("real", tarfile.DIRTYPE, mode=0o755), b""),
                (_ti("real/x"), b"kept\n"),
                (_ti("a", tarfile.SYMTYPE, link="real"), b"")])
    two = _tar([(_ti("a/.wh..wh..opq"), b"")])
    dest = tmp_path / "rootfs"
    dest.mkdir()
    _apply_all(dest, [one, two], chown=False)
    assert (dest / "real/x").read_bytes() == b"kept\n"
    assert os.readlink(dest / "a") == "real"


def test_times_outside_unix_time_become_the_epoch(tmp_path: Path) -> None:
    """moby's system.Chtimes sets a time before 1970 (or past 2262) to the epoch, for
    files and directories; a directory's final times take the header's atime as it is (no
    atime: the zero time, so the epoch), a file's atime is never before its mtime first."""
    one = _tar([(_ti("old", mtime=-86400), b"1\n"),
                (_ti("d", tarfile.DIRTYPE, mode=0o755, mtime=-5), b""),
                (_ti("e", tarfile.DIRTYPE, mode=0o755), b""),
                (_ti("f", tarfile.DIRTYPE, mode=0o755,
                     pax={"atime": "1500000000.25"}), b""),
                (_ti("far", pax={"mtime": "9300000000"}), b"2\n"),
                (_ti("new"), b"3\n")])
    dest = tmp_path / "rootfs"
    dest.mkdir()
    _apply_all(dest, [one], chown=False)

    def times(p: str) -> tuple[int, int]:
        st = os.lstat(dest / p)
        return st.st_atime_ns, st.st_mtime_ns

    assert times("old") == (0, 0)
    assert times("d") == (0, 0)
    assert times("e") == (0, 1_600_000_000 * 10**9)
    assert times("f") == (1_500_000_000_250_000_000, 1_600_000_000 * 10**9)
    assert times("far") == (0, 0)
    assert times("new") == (1_600_000_000 * 10**9,) * 2


@pytest.mark.skipif(not ROOT, reason="the applier chroots into rootfs/")
def test_every_mount_resets_rootfs_as_dockerds_get(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The driver's Get runs MkdirAllAndChown(rootfs, 0755, root) at every mount, so a
    parent layer's "./" mode and owner do not reach its child's device unless the child's
    layer sets them again."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    one = tmp_path / "one.tar"
    root_dir = _ti(".", tarfile.DIRTYPE, mode=0o700)
    root_dir.uid = root_dir.gid = 1000
    one.write_bytes(_tar([(root_dir, b""), (_ti("x"), b"x\n")]))
    two = tmp_path / "two.tar"
    two.write_bytes(_tar([(_ti("y"), b"y\n")]))
    monkeypatch.setattr("sys.stdin", io.StringIO("go\ngo\n"))
    assert serve([[str(mnt), str(one), "h" * 64]]) == 0
    st = os.stat(mnt / "rootfs")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 1000, 1000)
    assert serve([[str(mnt), str(two), None]]) == 0
    assert capsys.readouterr().out.split() == ["ok", "ok"]
    st = os.stat(mnt / "rootfs")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)


def test_hard_link_out_of_dest_is_refused(tmp_path: Path) -> None:
    """Unchrooted (dest not "/"), a hard link's target is cleaned before moby's breakout
    check (filepath.Join): ``../outside`` is refused, the file outside is not linked,
    chmodded or touched."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"o\n")
    outside.chmod(0o600)
    before = os.stat(outside)
    dest = tmp_path / "rootfs"
    dest.mkdir()
    raw = _tar([(_ti("x", tarfile.LNKTYPE, link="../outside", mode=0o4777), b"")])
    with pytest.raises(LayerError, match="leaves the layer's root"):
        _apply_all(dest, [raw], chown=False)
    after = os.stat(outside)
    assert (after.st_nlink, after.st_mode, after.st_mtime_ns) == \
        (before.st_nlink, before.st_mode, before.st_mtime_ns)
    assert not (dest / "x").exists()


def test_aufs_metadata_skipped_plnk_files_refused(tmp_path: Path) -> None:
    """aufs's top-level ``.wh..wh.*`` directories and files are skipped as UnpackLayer
    skips them; a regular file under ``.wh..wh.plnk`` (dockerd keeps it aside for hard
    links into it) is refused with one line."""
    dest = tmp_path / "rootfs"
    dest.mkdir()
    raw = _tar([(_ti(".wh..wh.aufs"), b""), (_ti(".wh..wh.orph", tarfile.DIRTYPE), b""),
                (_ti(".wh..wh.plnk", tarfile.DIRTYPE), b""), (_ti("etc/motd"), b"m\n")])
    _apply_all(dest, [raw], chown=False)
    assert sorted(os.listdir(dest)) == ["etc"]
    raw = _tar([(_ti(".wh..wh.plnk/260.1"), b"linked\n")])
    with pytest.raises(LayerError, match="plnk"):
        _apply_all(dest, [raw], chown=False)
