"""lvm2's own rules, checked against the real lvm2 2.03.16 in the guest (issue 10, second round):

- the hidden thin-pool LV sizes (``_tmeta``, ``lvol0_pmspare``, the chunk) of
  tests/fixtures/lvm/thin_pool_sizes.json: lvm2 must still produce the recorded table, and
  dmimage.lvm.sizing must equal it;
- ``lv_attr``/segtype/pool_lv/origin of raid, mirror, cache, cachevol, writecache, old-style
  snapshots and flag-carrying linear LVs: ``dmimage lvm ls --json -a`` equals lvs's JSON
  (``DMIMAGE_SAVE_LVM_FIXTURES=DIR`` saves the run as tests/fixtures/lvm/segtypes-KERNEL.json);
- the transaction-id rule at activation: for each VG/superblock combination, ``vgchange -ay``
  succeeds exactly when ``dmimage lvm check`` is clean;
- with the VG active, dmimage's LVM writers on the PV are refused (O_EXCL) naming the holder,
  and the PV's bytes do not change (host dmimage in the guest over 9p, as
  vmtests/test_live_pool_lock.py runs it, each command forked by vmtests/guest_forkserver.py);
- a built image with linear LVs: vgchange -ay, every LV's content hash as the manifest says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmimage.guest.lvm2 import LvmMachine
from vmtests.guest_forkserver import GuestDmimage
from vmtests.test_lvm_guest import FIELDS, _dmimage, _kernels, _put_texts, lvm_guest, lvm_guest_pool

pytestmark = [pytest.mark.vm, pytest.mark.vm_one_kernel]  # lvm2 is the oracle (conftest.py)

MiB = 1 << 20
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lvm"


@pytest.fixture(scope="module")
def lvm_guests() -> Iterator[dict[str, LvmMachine]]:
    """The lvm2 guests this module's tests share (see :func:`_guest`)."""
    yield from lvm_guest_pool()


@contextlib.contextmanager
def _guest(guests: dict[str, LvmMachine], kernel: str) -> Iterator[LvmMachine]:
    """This module's lvm2 guest for *kernel* (vmtests/test_lvm_guest.py's ``lvm_guest``), with
    the host share that :func:`test_live_vg_refuses_lvm_writers` runs dmimage from: one guest
    for all the module's tests."""
    with lvm_guest(guests, kernel, share=True) as vm:
        yield vm


def _sparse(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


# -- sizes -----------------------------------------------------------------------------------

def _json_reports(text: str) -> list[dict[str, Any]]:
    """Every ``{"report": ...}`` document in *text* (lvs --reportformat json output among
    other commands' messages and the shell's prompts), in order."""
    dec = json.JSONDecoder()
    out: list[dict[str, Any]] = []
    pos = text.find("{")
    while pos >= 0:
        try:
            doc, end = dec.raw_decode(text, pos)
        except ValueError:
            doc, end = None, pos + 1
        if isinstance(doc, dict) and "report" in doc:
            out.append(doc)
        else:
            end = pos + 1
        pos = text.find("{", end)
    return out


@pytest.mark.parametrize("kernel", _kernels())
def test_thin_pool_sizes_match_lvm2(tmp_path: Path, kernel: str,
                                    lvm_guests: dict[str, LvmMachine]) -> None:
    from dmimage.lvm.sizing import thin_pool_sizes

    from test_lvm_sizing import parse_case

    table = json.loads((FIXTURES / "thin_pool_sizes.json").read_text())["cases"]
    img = _sparse(tmp_path / "big.img", 2 << 40)
    with _guest(lvm_guests, kernel) as vm:
        dev = vm.attach(img, read_only=False).guest_path
        # Every case's commands (the recorded vgcreate, lvcreate and lvs, then vgremove) in
        # one lvm shell (`lvm` reading commands from stdin): one start of lvm2 for the table
        # instead of five per case (each ~0.4 s of guest CPU under TCG; lvm2 makes the
        # shell for this). lvm2 zeroes a new
        # pool's whole _tmeta (up to 16 GiB here) unless told not to, and activates the new
        # pool unless told not to (-an): the kernel then formats its metadata, and vgremove
        # takes it down again (4 guest CPU-s for the 20 GiB _tmeta case alone). lvm2 sizes
        # the hidden LVs and the chunk before it allocates, whatever it does next; the sizes
        # do not depend on either, the host's disk and CPU do. A case whose commands fail has
        # no report, or not the recorded one.
        lines = [f"pvcreate -y {dev}"]
        for case in table:
            vgcreate, lvcreate, lvs = case["commands"]
            lines += [vgcreate.replace("/dev/vda", dev),
                      lvcreate.replace("lvcreate ", "lvcreate --config "
                                       "allocation/zero_metadata=0 -an ", 1),
                      lvs, "vgremove -ff -y vgs"]
        # The shell ignores a command's --reportformat: its own lvm.conf asks for JSON.
        vm.sh("mkdir -p /tmp/lvmjson && cp /etc/lvm/lvm.conf /tmp/lvmjson/ && "
              "echo 'report { output_format = \"json\" }' >> /tmp/lvmjson/lvm.conf && "
              "cat > /tmp/sizes.lvm <<'DMIMAGE_EOF'\n" + "\n".join(lines) + "\nDMIMAGE_EOF")
        r = vm.run("LVM_SYSTEM_DIR=/tmp/lvmjson lvm < /tmp/sizes.lvm", timeout=900 * 2)
        reports = _json_reports(r.out)
        assert r.returncode == 0 and len(reports) == len(table), \
            (r.returncode, len(reports), r.stderr.decode()[-2000:])
        for case, report in zip(table, reports, strict=True):
            lvcreate = case["commands"][1]
            got = {row["lv_name"]: {"lv_size": row["lv_size"], "chunk_size": row["chunk_size"]}
                   for row in report["report"][0]["lv"]}
            assert got == case["lvs"], lvcreate  # lvm2 still makes the recorded table
            ext, data_extents, chunk, meta = parse_case(case["commands"])
            ours = thin_pool_sizes(data_extents, ext, chunk, meta)
            assert (ours.tmeta_extents * ext * 512, ours.pmspare_extents * ext * 512,
                    ours.chunk_size * 512) == (int(got["[pool_tmeta]"]["lv_size"]),
                                               int(got["[lvol0_pmspare]"]["lv_size"]),
                                               int(got["pool"]["chunk_size"])), lvcreate
        assert "vgs" not in vm.sh("vgs --noheadings -o vg_name"), "the last vgremove failed"


# -- lv_attr of other segment types ----------------------------------------------------------

SEGTYPE_COMMANDS = [
    "lvcreate -y --type raid1 -m 1 -L 8m -n r1 vga",
    "lvcreate -y --type raid5 -i 2 -L 8m -n r5 vga",
    "lvcreate -y --type raid0 -i 2 -L 8m -n r0 vga",
    "lvcreate -y --type raid10 -i 2 -m 1 -L 8m -n r10 vga",
    "lvcreate -y --type mirror -m 1 --mirrorlog core -L 8m -n mir vga",
    "lvcreate -y --type mirror -m 1 -L 8m -n mird vga",
    "lvcreate -y -L 16m -n corig vga",
    "lvcreate -y --type cache-pool -L 8m -n cpool vga",
    "lvconvert -y --type cache --cachepool vga/cpool vga/corig",
    "lvcreate -y -L 16m -n worig vga",
    "lvcreate -y -an -L 8m -n wfast vga",
    "lvconvert -y --type writecache --cachevol wfast vga/worig",
    "lvcreate -y -L 16m -n cvorig vga",
    "lvcreate -y -an -L 8m -n cvfast vga",
    "lvconvert -y --type cache --cachevol cvfast vga/cvorig",
    "lvcreate -y -L 8m -n plain vga",
    "lvcreate -y -s -L 4m -n oldsnap vga/plain",
    "lvcreate -y --type thin-pool -L 8m -n tp vga",
    "lvcreate -y -V 4m -T vga/tp -n th",
    "lvcreate -y -L 4m -n ro -pr vga",
    "lvcreate -y -L 4m -n cont -C y vga",
    "lvcreate -y -L 4m -n skip -ky vga",
    "lvcreate -y -L 4m -n minor -My --major 253 --minor 200 vga",
]


def _lvm_shell(vm: LvmMachine, commands: list[str], *, timeout: float
               ) -> list[dict[str, str | int]]:
    """Run *commands* in one ``lvm`` shell (one start of lvm2 instead of one per command);
    ``[{"cmd", "rc", "log"}]`` in order. With ``log/report_command_log`` the shell prints one
    JSON log report per command (``log`` holds its messages); a failed command's report ends
    with a ``cmd`` status record carrying the exit code its own process would have had (5).
    lvm2 2.03.16 leaves a trailing comma where it drops the success record, so the records
    are read one by one."""
    conf = ("mkdir -p /tmp/lvmlog && cp /etc/lvm/lvm.conf /tmp/lvmlog/ && "
            "printf 'report { output_format = \"json\" }\\nlog { report_command_log = 1 }\\n' "
            ">> /tmp/lvmlog/lvm.conf")
    r = vm.run(f"{conf} && cat > /tmp/cmds.lvm <<'DMIMAGE_EOF'\n" + "\n".join(commands)
               + "\nDMIMAGE_EOF\nLVM_SYSTEM_DIR=/tmp/lvmlog lvm < /tmp/cmds.lvm", timeout=timeout)
    assert r.returncode == 0, r
    reports = r.out.split('"log": [')[1:]
    # one report per command, and one for the shell's end of input
    assert len(reports) == len(commands) + 1, r.out[-3000:]
    out: list[dict[str, str | int]] = []
    for cmd, report in zip(commands, reports, strict=False):
        records = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", report)]
        rcs = [0 if rec["log_message"] == "success" else int(rec["log_ret_code"])
               for rec in records
               if rec["log_context"] == "shell" and rec["log_object_type"] == "cmd"]
        out.append({"cmd": cmd, "rc": rcs[-1] if rcs else 0,
                    "log": " | ".join(str(rec["log_message"]) for rec in records)[-300:]})
    return out


@pytest.mark.parametrize("kernel", _kernels())
def test_lv_attr_of_other_segment_types(tmp_path: Path, kernel: str,
                                        lvm_guests: dict[str, LvmMachine]) -> None:
    fields = FIELDS.replace(",lv_uuid", "")
    disks = [_sparse(tmp_path / f"d{i}.img", 256 * MiB) for i in range(4)]
    with _guest(lvm_guests, kernel) as vm:
        att = vm.attach_many(disks, read_only=False)
        devs = " ".join(a.guest_path for a in att)
        vm.sh(f"pvcreate -y {devs} && vgcreate -s 1m vga {devs}", timeout=180)
        ran = _lvm_shell(vm, SEGTYPE_COMMANDS, timeout=300 * len(SEGTYPE_COMMANDS))
        for c in ran:
            print(f"[{kernel}] rc {c['rc']}: {c['cmd']} {c['log']!r}")
        vm.sh("vgchange -an vga", timeout=300)
        lvs = json.loads(vm.sh(f"lvs -a --reportformat json --units b --nosuffix -o {fields} "
                               "vga", timeout=180))["report"][0]["lv"]
        backup = vm.sh("vgcfgbackup -f /tmp/v.txt vga >/dev/null && cat /tmp/v.txt")
        vm.detach_many(att)
    made = {str(c["cmd"]).split(" -n ")[-1].split()[0] for c in ran if c["rc"] == 0}
    # the kinds this test is about were all created (the guest has their targets): by the
    # commands' own status records and by lvs (a report that lost its record reads as rc 0)
    kinds = {"r1", "r5", "r0", "r10", "mir", "mird", "corig", "worig", "cvorig", "oldsnap", "th"}
    assert kinds <= made, ran
    assert kinds <= {str(lv["lv_name"]) for lv in lvs}, lvs
    dest = os.environ.get("DMIMAGE_SAVE_LVM_FIXTURES")
    if dest:
        Path(dest, f"segtypes-{kernel}.json").write_text(json.dumps(
            {"about": "recorded by vmtests/test_lvm_rules_guest.py::"
                      "test_lv_attr_of_other_segment_types (four 256 MiB disks, "
                      "vgcreate -s 1m vga, the commands, vgchange -an vga, lvs -a, "
                      "vgcfgbackup)",
             "commands": [{"cmd": c["cmd"], "rc": c["rc"]} for c in ran], "lvs": lvs,
             "vgcfgbackup": backup}, indent=1) + "\n")
    rc, out, err = _dmimage("ls", "--json", "-a", *disks)
    assert rc == 0, err
    ours = {r["lv_name"]: {k: r[k] for k in fields.split(",")}
            for r in json.loads(out)["report"][0]["lv"]}
    theirs = {r["lv_name"]: r for r in lvs}
    diff = {n: {k: (ours.get(n, {}).get(k), v) for k, v in row.items()
                if ours.get(n, {}).get(k) != v} for n, row in theirs.items()}
    assert set(ours) == set(theirs) and not any(diff.values()), \
        {n: d for n, d in diff.items() if d}
    rc, out, err = _dmimage("check", *disks)
    assert (rc, err) == (0, ""), err


# -- the transaction-id rule at activation ---------------------------------------------------

@dataclasses.dataclass
class TidCase:
    name: str
    delta: int  # VG transaction_id minus the superblock's
    messages: list[tuple[str, str | int]]  # ("create", lv name) / ("delete", device id)
    new_thin: int | None = None  # a thin LV "newt" with this device_id, named by a message
    lvm2_accepts: bool = True  # what lvm2 2.03.16's source says (libdm-deptree.c)


TID_CASES = [
    TidCase("equal", 0, []),
    TidCase("vg-one-ahead", 1, []),
    TidCase("vg-behind", -1, [], lvm2_accepts=False),
    TidCase("vg-two-ahead", 2, [], lvm2_accepts=False),
    # a VG id of 0 is not validated at activation (dm_tree_node_add_thin_pool_target_v1)
    TidCase("vg-zero", -2, []),
    # a fresh activation only validates the ids; the create is not sent, newt cannot load
    TidCase("ahead-create-new", 1, [("create", "newt")], new_thin=5, lvm2_accepts=False),
    TidCase("equal-create-new", 0, [("create", "newt")], new_thin=5, lvm2_accepts=False),
    TidCase("ahead-create-existing", 1, [("create", "thin1")]),
    TidCase("ahead-delete-missing", 1, [("delete", 9)]),
    TidCase("ahead-delete-existing", 1, [("delete", 2)], lvm2_accepts=True),
]


def _case_text(base: str, case: TidCase, sb_tid: int) -> str:
    from dmimage.lvm.create import make_id
    from dmimage.lvm.model import LogicalVolume, Message, ThinPoolSegment, ThinSegment, vg_from_tree
    from dmimage.lvm.text import Section, format_section, parse

    vg = vg_from_tree(parse(base))
    pool = vg.lv("pool")
    assert pool is not None and isinstance(pool.segments[0], ThinPoolSegment)
    seg = pool.segments[0]
    seg.transaction_id = sb_tid + case.delta
    seg.messages = [Message(f"message{i + 1}", create=v if isinstance(v, str) else None,
                            delete=v if isinstance(v, int) else None)
                    for i, (_kind, v) in enumerate(case.messages)]
    if case.new_thin is not None:
        thin1 = vg.lv("thin1")
        assert thin1 is not None
        tseg = ThinSegment("segment1", 0, thin1.extent_count, "thin", Section(), "pool",
                           sb_tid, case.new_thin)
        vg.lvs.append(LogicalVolume("newt", make_id(b"newt"), ["READ", "WRITE", "VISIBLE"],
                                    [tseg], [], Section(creation_time=1700000000,
                                                        creation_host="dmimage")))
    if any(k == "delete" and v == 2 for k, v in case.messages):  # thin2 removed from the VG
        vg.lvs = [lv for lv in vg.lvs if lv.name != "thin2"]
    vg.seqno += 1
    return format_section(vg.to_tree())


def _copy_in_place(src: str | Path, dst: str | Path) -> None:
    """*dst* (created if missing) gets *src*'s bytes in place, so a guest disk backed by *dst*
    keeps its file; only non-zero grains are written (a copy of the PV's 64 MiB is ~1 MiB)."""
    from dmimage.image.sparse import copy_sparse

    fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)  # not O_APPEND: pwrite must land
    try:
        with open(src, "rb") as fi:
            size = os.fstat(fi.fileno()).st_size
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            copy_sparse(fi.fileno(), 0, fd, 0, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kernel", _kernels())
def test_transaction_id_rule_matches_lvm2_activation(tmp_path: Path, kernel: str,
                                                     lvm_guests: dict[str, LvmMachine]) -> None:
    img = _sparse(tmp_path / "pv.img", 64 * MiB)
    pristine = tmp_path / "pristine.img"
    with _guest(lvm_guests, kernel) as vm:
        dev = vm.attach(img, read_only=False).guest_path
        vm.sh(f"pvcreate -y {dev} && vgcreate -s 1m vgt {dev} && "
              "lvcreate -y --type thin-pool -L 16m -n pool vgt && "
              "lvcreate -y -V 8m -T vgt/pool -n thin1 && "
              "lvcreate -y -V 8m -T vgt/pool -n thin2 && "
              "dd if=/dev/urandom of=/dev/vgt/thin1 bs=64k count=8 conv=fsync status=none",
              timeout=300)
        sb_tid = int(vm.sh("dmsetup status vgt-pool-tpool").split()[3])
        assert sb_tid == 2  # vg-zero's delta and vg-behind (1, validated) rely on it
        base = vm.sh("vgchange -an vgt >/dev/null && vgcfgbackup -f /tmp/base.txt vgt "
                     f">/dev/null && cat /tmp/base.txt && blockdev --flushbufs {dev} && sync",
                     timeout=180)
        # The PV as lvm2 left it: every case starts from these bytes. The disk stays attached
        # (a hot-plug and unplug cost more guest CPU than the case): the host puts the bytes
        # back in place between cases, with nothing of the PV active or cached in the guest
        # (lvm2 and thin_check read with O_DIRECT, the pool's buffers go with the pool, and
        # the guest drops the disk's page cache before each case).
        _copy_in_place(img, pristine)
        _put_texts(vm, {c.name: _case_text(base, c, sb_tid) for c in TID_CASES}, "/tmp/cases")
        verdicts = []
        for case in TID_CASES:
            _copy_in_place(pristine, img)
            vm.sh(f"blockdev --flushbufs {dev} && "
                  f"vgcfgrestore --force -y -f /tmp/cases/{case.name} vgt", timeout=180)
            rc, _out, err = _dmimage("check", img)
            # the verdict, then the pool and its LVs gone again, whatever the verdict: dmsetup
            # takes them down and rm the links lvm2 made (no udev here) without a second
            # start of lvm2; the next case starts from the pristine bytes again
            r = vm.run("vgchange -ay vgt; rc=$?; dmsetup remove_all; rm -rf /dev/vgt; exit $rc",
                       timeout=360)
            accepted = r.returncode == 0
            verdicts.append((case.name, accepted, rc, err.strip()))
            print(f"[{kernel}] {case.name}: lvm2 {'accepts' if accepted else 'refuses'} "
                  f"({r.stderr.decode().strip()[-160:]!r}); dmimage lvm check exit {rc}: "
                  f"{err.strip()!r}")
    for name, accepted, rc, err in verdicts:
        case = next(c for c in TID_CASES if c.name == name)
        assert accepted == case.lvm2_accepts, (name, "lvm2 did not do what its source says")
        assert (rc == 0) == accepted, (name, rc, err)
        if not accepted:
            assert rc == 1 and "vgt/pool: " in err, err


# -- live VG: dmimage's LVM writers are refused ------------------------------------------------

#: What the LVM writers import: the guest's fork server (vmtests/guest_forkserver.py) imports
#: it once, and each command is a process forked from it (one Python start instead of four:
#: each cost the TCG guest 1-5 CPU-s).
LVM_WRITERS_IMPORT = ("dmimage.cli.lvm", "dmimage.lvm.vg", "dmimage.lvm.fix",
                      "dmimage.lvm.orphans", "dmimage.lvm.report", "dmimage.lvm.check",
                      "dmimage.thin.check", "dmimage.thin.transaction")


@pytest.mark.parametrize("kernel", _kernels())
def test_live_vg_refuses_lvm_writers(tmp_path: Path, kernel: str,
                                     lvm_guests: dict[str, LvmMachine]) -> None:
    img = _sparse(tmp_path / "pv.img", 64 * MiB)
    with _guest(lvm_guests, kernel) as vm:
        server = GuestDmimage(vm, LVM_WRITERS_IMPORT).start()
        dev = vm.attach(img, read_only=False).guest_path
        name = os.path.basename(dev)
        vm.sh(f"pvcreate -y {dev} && vgcreate -s 1m vgt {dev} && "
              "lvcreate -y --type thin-pool -L 16m -n pool vgt && "
              "lvcreate -y -V 8m -T vgt/pool -n thin1", timeout=300)
        holders = vm.sh(f"for h in $(ls /sys/class/block/{name}/holders); do "
                        f"echo \"$h ($(cat /sys/class/block/$h/dm/name))\"; done").split("\n")
        holders = [h for h in holders if h]
        assert holders, "the active VG holds the PV"
        before = vm.sha256_of(dev)
        for args in (f"set-transaction-id --side pool --to 7 {dev} vgt/pool",
                     f"set-transaction-id --side vg --to 7 {dev} vgt/pool",
                     f"delete-orphans {dev} vgt/pool"):
            r = vm.run(server.command(f"lvm {args}"), timeout=600)
            err = r.stderr.decode()
            print(f"[{kernel}] lvm {args}: exit {r.returncode}: {err.strip()}")
            assert r.returncode == 2, (args, r)
            assert err.count("\n") == 1, err
            assert f"{dev}: held by " in err and any(h in err for h in holders), (err, holders)
            assert vm.sha256_of(dev) == before, args
        # once the VG is inactive, the same writer goes through
        vm.sh("vgchange -an vgt", timeout=180)
        r = vm.run(server.command(f"lvm set-transaction-id --side vg --to 7 {dev} vgt/pool"),
                   timeout=600)
        assert r.returncode == 0, r
        assert vm.sha256_of(dev) != before
        out = vm.sh("lvs --noheadings -o transaction_id vgt/pool")
        assert out.strip() == "7", out


# -- built image with linear LVs --------------------------------------------------------------

@pytest.mark.parametrize("kernel", _kernels())
def test_built_linear_lvs_activate(tmp_path: Path, kernel: str,
                                   lvm_guests: dict[str, LvmMachine]) -> None:
    from dmimage.image import build, load_spec

    from test_build_lvm import SPEC, write_inputs

    write_inputs(tmp_path)
    # room for lvm2 to extend a linear LV afterwards
    (tmp_path / "s.toml").write_text(SPEC.replace('layout = "lvm"',
                                                  'layout = "lvm"\nimage_size = "40MiB"'))
    m = build(load_spec(tmp_path / "s.toml"), tmp_path / "out").manifest
    img = str(tmp_path / "out" / "lv.img")
    assert {lv["name"] for lv in m["linear"]} == {"lin", "blank"}
    with _guest(lvm_guests, kernel) as vm:
        d = vm.attach(img, read_only=False)
        vm.sh(f"test -b {d.guest_path}1 && vgck vgb && vgchange -ay vgb", timeout=180)
        lvs = m["linear"] + m["devices"]
        got = vm.sha256_many([(f"/dev/mapper/vgb-{lv['name']}", None) for lv in lvs])
        for lv, sha in zip(lvs, got, strict=True):
            assert sha == lv["sha256"], lv
        sizes = {r["lv_name"]: r["lv_size"] for r in json.loads(vm.sh(
            "lvs -a --reportformat json --units b --nosuffix -o lv_name,lv_size vgb"))
            ["report"][0]["lv"]}
        assert sizes["lin"] == str(3 * MiB) and sizes["blank"] == str(MiB)
        # lvm2 itself extends a built linear LV and writes to it; dmimage reads it back
        vm.sh("lvextend -y -L +1m vgb/lin && dd if=/dev/urandom of=/dev/vgb/lin bs=64k "
              f"seek={3 * MiB // 65536} count=16 conv=fsync status=none", timeout=180)
        want = vm.sha256_of("/dev/mapper/vgb-lin")
        vm.sh("vgchange -an vgb", timeout=180)
        vm.detach(d)
    from vmtests.test_lvm_guest import _host_hash

    assert _host_hash([img], "lin", tmp_path, "vgb") == want
    rc, _, err = _dmimage("check", img)
    assert (rc, err) == (0, ""), err
