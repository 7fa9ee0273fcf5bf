"""`dmimage table` meets the kernel: every modelled target, loaded by dmsetup in the guest.

1. Random valid tables (vmtests/tablegen.py, seeded: the seed is printed; replay with
   ``DMIMAGE_TABLE_SEED``) go through `dmimage table format --show-keys` and
   `dmimage table check --kernel`, then `dmsetup create` on hot-plugged virtio disks (no loop
   devices). `dmsetup table --showkeys` must print exactly `format_table(kernel_form)`, and
   plain `dmsetup table` exactly the redacted form (keys as zeros), byte for byte; both must
   parse back to the same table.
2. Near misses (one rule each): `dmimage table check` must refuse exactly the tables the
   kernel refuses. The kernel's reason is taken from dmesg; where dmimage knowingly differs the
   case is listed in KNOWN_DIFFERENCES (and docs/tables.md), so a change on either side shows.
   `dmimage table check --kernel` gets the guest's version, so rules that changed between
   kernels (docs/vm.md, "Kernels") are judged per kernel. A case that makes a kernel oops or
   warn (``tablegen.KERNEL_BUGS``) is not loaded in this shared guest on that kernel:
   test_kernel_quirks.py loads it in a guest of its own.
3. A verity hash tree built on the host verifies in the guest; a wrong root digest fails reads.
4. A crypt key referenced in the kernel keyring (``:<size>:logon:<desc>``) loads and reads back.

Everything runs in a few batched guest commands per kernel.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shlex
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dmimage.cli.main import main as dmimage_main
from dmimage.guest.appliance import cache_root
from dmimage.guest.machine import Machine
from dmimage.table import parse_table, parse_tables
from dmimage.table.args import Style
from dmimage.table.text import format_table
from vmtests import tablegen, verity_tree

pytestmark = pytest.mark.vm

SEED = int(os.environ.get("DMIMAGE_TABLE_SEED", "0")) or random.SystemRandom().randrange(1 << 32)
#: Valid tables per target type and kernel.
PER_TYPE = int(os.environ.get("DMIMAGE_TABLE_PER_TYPE", "3"))
DISK_SECTORS = 64 << 11  # 64 MiB raw scratch disk
HELPER_SECTORS = 8192  # 4 MiB fresh zeroed helper devices
#: Fresh helper devices: 8 per round of valid tables (pools, COW stores, cache and era
#: metadata) or 37 for the near misses (the same devices, zeroed again between the two: each
#: dm device costs the guest ~15 ms of CPU to create and remove), 2 for the live pool.
HELPERS = max(8 * PER_TYPE, 37) + 2
THIN_IDS = 4

#: label -> (dmimage refuses, kernel refuses, why), for the near misses where they differ on
#: purpose. Kernel versions where the kernel's verdict differs are listed per version.
KNOWN_DIFFERENCES: dict[str, tuple[bool, bool, str]] = {
    "thin-pool: read_only on blank metadata": (
        False, True, "a read-only pool cannot format blank metadata; dmimage does not read the "
        "metadata device"),
    "verity: unknown hash": (
        False, True, "which hashes exist is up to the kernel's crypto API; dmimage warns"),
    "verity: not read-only": (
        False, True, "read-only is how the table is loaded, not part of it; dmimage warns"),
    "snapshot: store Nx": (
        True, False, "the kernel reads only the first letter of a transient store's type"),
    "error: three arguments": (
        True, False, "the error target ignores arguments other than <dev> <offset>"),
    "thin-pool: a word after the features": (
        True, False, "pool_ctr ignores words after the features; dmimage refuses a likely "
        "mistake"),
}


def _cli(*args: str) -> tuple[int, str]:
    """`dmimage ARGS` in this process (the real CLI path, without a Python start per table)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = dmimage_main(list(args))
    return rc, out.getvalue() + err.getvalue()


@dataclass
class Guest:
    vm: Machine
    backing: tablegen.Backing
    sizes: dict[str, int]
    tmp: Path
    #: the host file behind the helper devices (the live pool's two last)
    helpers: Path

    def zero_helpers(self) -> None:
        """Every helper but the pool's back to zeros, on the host. Nothing in the guest can
        hold stale bytes of them: the targets stacked on them read with bios (bufio, dm-io,
        remaps), not through a page cache, and QEMU reads the file through the host's."""
        subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length",
                        str((HELPERS - 2) * HELPER_SECTORS * 512), str(self.helpers)],
                       check=True)


def _keyutils_tar(tmp: Path) -> Path | None:
    """keyctl (from the keyutils .deb, unpacked, never installed) and libkeyutils, as a tar
    the guest unpacks from a hot-plugged disk; None if the package cannot be had."""
    cache = cache_root() / "keyutils"
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / "root"
    if not (root / "bin" / "keyctl").exists():
        if not sorted(cache.glob("keyutils_*.deb")):
            try:
                subprocess.run(["apt-get", "download", "keyutils"], cwd=cache, check=True,
                               capture_output=True, timeout=300)
            except (OSError, subprocess.SubprocessError):
                return None
        deb = sorted(cache.glob("keyutils_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    lib = next(iter(Path("/").glob("usr/lib/x86_64-linux-gnu/libkeyutils.so.1")), None) or \
        next(iter(Path("/").glob("lib/x86_64-linux-gnu/libkeyutils.so.1")), None)
    if lib is None:
        return None
    out = tmp / "keyutils.tar"
    with tarfile.open(out, "w") as t:
        t.add(root / "bin" / "keyctl", "keyctl")
        t.add(lib.resolve(), "libkeyutils.so.1")
    with open(out, "ab") as f:  # a whole number of sectors for the block device
        f.write(b"\0" * (-f.tell() % 4096))
    return out


#: Keyring keys the round trips may reference: (``type:description``, size in bytes).
KEYS = [("logon:dmimage:k16", 16), ("logon:dmimage:k32", 32), ("logon:dmimage:k64", 64),
        ("user:dmimage-u32", 32)]


def _load_keys_script(tar: str) -> list[str]:
    """Guest shell lines: keyctl unpacked from the disk *tar*, ``KEYS`` added to the user
    session keyring."""
    script = [f"mkdir -p /tmp/ku && tar -xf {tar} -C /tmp/ku",
              "export LD_LIBRARY_PATH=/tmp/ku"]
    for name, size in KEYS:
        ktype, _, desc = name.partition(":")
        script.append(f"head -c {size} /dev/urandom | /tmp/ku/keyctl padd {ktype} {desc} @us "
                      ">/dev/null")
    return script


@pytest.fixture
def guest(dm_vm: Machine, tmp_path: Path) -> Iterator[Guest]:
    """Scratch disk, helpers, a pool with thin ids, keyring keys; all torn down after.

    The disks go in with one hot-plug and the rest is set up in one guest command (a
    hot-plug costs ~0.3-0.6 QEMU CPU-s, a command's round trip ~0.05)."""
    vm = dm_vm
    disk, helpers = tmp_path / "disk.img", tmp_path / "helpers.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SECTORS * 512)
    with open(helpers, "wb") as f:
        f.truncate(HELPERS * HELPER_SECTORS * 512)
    tar = _keyutils_tar(tmp_path)
    files = [disk, helpers] + ([tar] if tar is not None else [])
    attached = vm.attach_many(files, read_only=[False, False] + [True] * (tar is not None))
    dd, hd = attached[:2]
    spec = ";".join(f"tg_h{i},,,rw,0 {HELPER_SECTORS} linear {hd.guest_path} "
                    f"{i * HELPER_SECTORS}" for i in range(HELPERS))
    pool_meta, pool_data = (f"/dev/mapper/tg_h{i}" for i in (HELPERS - 2, HELPERS - 1))
    script = [f"set -e; dmsetup create --concise '{spec}'",
              f"dmsetup create tg_pool --table '0 {HELPER_SECTORS} thin-pool {pool_meta} "
              f"{pool_data} 128 0'"]
    script += [f"dmsetup message tg_pool 0 'create_thin {i}'" for i in range(THIN_IDS)]
    script += [f"read -r d </sys/block/{dd.guest_path.rsplit('/', 1)[1]}/dev; echo \"@disk $d\"",
               "echo \"@uname $(uname -r)\"",
               "dmsetup info -c --noheadings -o name,major,minor --separator ' '"]
    if tar is not None:
        script += _load_keys_script(attached[2].guest_path)
    try:
        out = vm.sh("\n".join(script), timeout=300)
        numbers, disk_dev, uname = {}, "", ""
        for line in out.split("\n"):
            parts = line.split()
            if parts[:1] == ["@disk"]:
                disk_dev = parts[1]
            elif parts[:1] == ["@uname"]:
                uname = parts[1]
            elif len(parts) == 3:
                numbers[parts[0]] = f"{parts[1]}:{parts[2]}"
        helper_devs = [numbers[f"tg_h{i}"] for i in range(HELPERS)]
        major, minor = uname.split(".")[:2]
        backing = tablegen.Backing((int(major), int(minor)), disk_dev, DISK_SECTORS,
                                   helper_devs[:-2], HELPER_SECTORS, numbers["tg_pool"],
                                   THIN_IDS, KEYS if tar is not None else [])
        sizes = {disk_dev: DISK_SECTORS, **{h: HELPER_SECTORS for h in helper_devs}}
        yield Guest(vm, backing, sizes, tmp_path, helpers)
    finally:
        vm.run("dmsetup remove tg_pool; dmsetup remove " +
               " ".join(f"tg_h{i}" for i in range(HELPERS)) +
               "\n[ -x /tmp/ku/keyctl ] && LD_LIBRARY_PATH=/tmp/ku /tmp/ku/keyctl clear @us",
               timeout=300)
        vm.detach_many(list(reversed(attached)))


def _create_script(cases: list[tablegen.Case], prefix: str) -> str:
    """One guest script: each table from a heredoc file, a kmsg marker before each create."""
    lines = []
    for i, c in enumerate(cases):
        name = f"{prefix}{i}"
        # printf is a shell builtin: no process per table besides dmsetup itself
        lines.append(f"printf '%s' {shlex.quote(c.render())} > /tmp/{name}.table")
        lines.append(f"echo 'dmimage-table-case {name}' > /dev/kmsg")
        ro = " --readonly" if c.readonly else ""
        lines.append(f"dmsetup create {name}{ro} /tmp/{name}.table 2>/dev/null; "
                     f"echo \"@rc {name} $?\"")
    return "\n".join(lines)


def _concise(cases: list[tablegen.Case], prefix: str) -> str:
    """All cases in one `dmsetup create --concise` (one exec: a dmsetup start costs ~0.3 s
    under TCG). It stops at the first failure, so the caller retries one by one then."""
    specs = []
    for i, c in enumerate(cases):
        lines = c.render().rstrip("\n").split("\n")
        specs.append(f"{prefix}{i},,,{'ro' if c.readonly else 'rw'}," + ",".join(lines))
    return f"dmsetup create --concise {shlex.quote(';'.join(specs))}"


def _remove_all(vm: Machine, prefix: str) -> None:
    # the names picked with shell builtins: two processes (dmsetup ls, remove), not four
    vm.run(f"l=; for n in $(dmsetup ls); do case $n in {prefix}*) l=\"$l $n\";; esac; done; "
           "[ -z \"$l\" ] || dmsetup remove $l", timeout=300)


def _logged(script: str) -> str:
    """*script*, then the kernel log lines it added, after a ``@@dmesg@@`` line (only those
    cross the agent's line, not the whole log)."""
    return f"n=$(dmesg | wc -l)\n{script}\necho @@dmesg@@; dmesg | tail -n +$((n + 1))"


def _reasons(dmesg: str) -> dict[str, str]:
    """Per case, the kernel's table error (``device-mapper: table: 253:N: <target>: ...``)."""
    out: dict[str, str] = {}
    current = None
    for line in dmesg.splitlines():
        m = re.search(r"dmimage-table-case (\S+)", line)
        if m:
            current = m.group(1)
            continue
        if current and "device-mapper:" in line and current not in out:
            text = line.split("device-mapper:", 1)[1].strip()
            if "ioctl: error adding target" not in text and "using implementation" not in text:
                out[current] = re.sub(r"^table: \d+:\d+: ", "", text)
    return out


def _rcs(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"@rc (\S+) (\d+)", out)}


def _format_via_cli(g: Guest, case: tablegen.Case, name: str) -> str:
    path = g.tmp / f"{name}.table"
    path.write_text(case.render())
    rc, out = _cli("table", "format", str(path), "--show-keys")
    assert rc == 0, out
    return out


def _round_trip(g: Guest, gen: tablegen.Generator) -> list[str]:
    """Valid tables: loaded, printed back exactly as dmimage's kernel form. Returns failures."""
    kernel = g.backing.kernel
    ver = f"{kernel[0]}.{kernel[1]}"
    cases = [gen.valid(kind) for kind in tablegen.TARGET_TYPES for _ in range(PER_TYPE)]
    sizes = [a for dev, n in g.sizes.items() for a in ("--size", f"{dev}={n}")]
    problems = []
    for i, c in enumerate(cases):
        text = _format_via_cli(g, c, f"v{i}")
        if text != c.render():
            problems.append(f"format is not idempotent on case {i} ({c.label})")
        rc, out = _cli("table", "check", str(g.tmp / f"v{i}.table"), "--kernel", ver, *sizes)
        if rc != 0:
            problems.append(f"dmimage refuses generated {c.label} table:\n{out}")
    try:
        readback = "\necho @@table\ndmsetup table\necho @@showkeys\ndmsetup table --showkeys"
        res = g.vm.run(_concise(cases, "tv") + '; echo "@concise $?"' + readback, timeout=600)
        if not res.out.startswith("@concise 0"):
            _remove_all(g.vm, "tv")  # find which: one create each, with dmesg markers
            res = g.vm.run(_logged(_create_script(cases, "tv") + readback), timeout=600)
            out, _, log = res.out.partition("@@dmesg@@\n")
            res.stdout = out.encode()
            reasons = _reasons(log)
            for n, rc in _rcs(res.out).items():
                if rc:
                    c = cases[int(n[2:])]
                    problems.append(f"the kernel refused valid {c.label} table "
                                    f"({reasons.get(n, '?')}):\n  {c.render().strip()}")
        redacted_out, shown_out = res.out.split("@@table\n", 1)[1].split("@@showkeys\n", 1)
        for label, text, show in (("dmsetup table", redacted_out, False),
                                  ("dmsetup table --showkeys", shown_out, True)):
            by_name: dict[str, str] = {}
            for line in text.splitlines(keepends=True):
                name, _, rest = line.partition(": ")
                by_name[name] = by_name.get(name, "") + rest
            parsed = parse_tables(text)
            for i, c in enumerate(cases):
                name = f"tv{i}"
                if name not in by_name:
                    continue  # refused, reported above
                want = c.table.kernel_form(kernel)
                expect = format_table(want, Style(kernel=kernel, show_keys=show))
                # and it parses back to the same table (keys zeroed where dmsetup hid them)
                model = want if show else parse_table(expect)
                if by_name[name] != expect or parsed[name] != model:
                    problems.append(f"case {i} ({c.label}): {label} printed\n  "
                                    f"{by_name[name]!r}\ndmimage expects\n  {expect!r}")
    finally:
        _remove_all(g.vm, "tv")
    return problems


def _refusals(g: Guest, gen: tablegen.Generator) -> tuple[list[str], list[str]]:
    """Near misses: dmimage's verdict against the kernel's. Returns (report, failures)."""
    kernel = g.backing.kernel
    ver = f"{kernel[0]}.{kernel[1]}"
    cases = gen.invalid_cases()
    sizes = [a for dev, n in g.sizes.items() for a in ("--size", f"{dev}={n}")]
    ours: dict[str, tuple[bool, str]] = {}
    for i, c in enumerate(cases):
        path = g.tmp / f"x{i}.table"
        path.write_text(c.render())
        rc, out = _cli("table", "check", str(path), "--kernel", ver, *sizes)
        assert rc in (0, 1), out
        ours[f"tx{i}"] = (rc == 1, out.strip())
    # The cases dmimage accepts go in one `dmsetup create --concise` (each dmsetup start costs
    # ~0.3 s under TCG); if that fails, they are retried one by one like the rest.
    # A kernel bug (oops, WARNING) on a case is pinned in a guest of its own instead.
    buggy = {i for i, c in enumerate(cases)
             if tablegen.KERNEL_BUGS.get(c.label, ((0, 0), ""))[0] == kernel}
    accepted = [i for i in range(len(cases))
                if not ours[f"tx{i}"][0] and cases[i].label not in KNOWN_DIFFERENCES
                and i not in buggy]
    rcs: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for i in buggy:
        rcs[f"tx{i}"] = 1
        reasons[f"tx{i}"] = "not loaded here: " + tablegen.KERNEL_BUGS[cases[i].label][1]
    try:
        batch = [cases[i] for i in accepted]
        res = g.vm.run(_concise(batch, "txa") + '; echo "@concise $?"', timeout=600)
        if res.out.startswith("@concise 0"):
            print(f"{len(accepted)} near misses dmimage accepts loaded in one dmsetup call")
            rcs.update({f"tx{i}": 0 for i in accepted})
            single = [i for i in range(len(cases)) if i not in accepted and i not in buggy]
        else:
            _remove_all(g.vm, "txa")
            single = [i for i in range(len(cases)) if i not in buggy]
        res = g.vm.run(_logged(_create_script([cases[i] for i in single], "txs")),
                       timeout=600)
        out, _, log = res.out.partition("@@dmesg@@\n")
        rcs.update({f"tx{single[int(n[3:])]}": rc for n, rc in _rcs(out).items()})
        reasons.update({f"tx{single[int(n[3:])]}": r
                        for n, r in _reasons(log).items() if n.startswith("txs")})
    finally:
        _remove_all(g.vm, "tx")
    assert len(rcs) == len(cases), res.out + res.err
    report, mismatches = [], []
    for i, c in enumerate(cases):
        name = f"tx{i}"
        kernel_refuses = rcs[name] != 0
        we_refuse, why = ours[name]
        reason = reasons.get(name, "") if kernel_refuses else "loaded"
        report.append(f"{c.label}: kernel {'refuses' if kernel_refuses else 'loads'}"
                      f" ({reason}); dmimage {'refuses' if we_refuse else 'accepts'}")
        known = KNOWN_DIFFERENCES.get(c.label)
        if known is not None:
            if (we_refuse, kernel_refuses) != known[:2]:
                mismatches.append(f"{c.label}: the documented difference changed: dmimage "
                                  f"refuses={we_refuse}, kernel refuses={kernel_refuses} "
                                  f"({reason})")
            continue
        if we_refuse != kernel_refuses:
            mismatches.append(f"{c.label}: kernel {'refuses' if kernel_refuses else 'loads'} "
                              f"({reason}); dmimage says: {why or 'ok'}\n  {c.render().strip()}")
    return report, mismatches


def test_tables_against_the_kernel(guest: Guest) -> None:
    """Both halves on one set-up (helpers, pool, keys): valid round trips, then near misses."""
    kernel = guest.backing.kernel
    ver = f"{kernel[0]}.{kernel[1]}"
    print(f"DMIMAGE_TABLE_SEED={SEED} (kernel {ver})")
    gen = tablegen.Generator(random.Random(SEED), guest.backing)
    round_trip = _round_trip(guest, gen)
    guest.zero_helpers()  # the round trip's devices are gone: the near misses reuse them
    gen.reuse_helpers()
    report, refusals = _refusals(guest, gen)
    print("\n".join(report))
    assert not round_trip + refusals, f"DMIMAGE_TABLE_SEED={SEED}, kernel {ver}:\n" + \
        "\n".join(round_trip + refusals)


@pytest.mark.parametrize("hash_block_size", [4096, 512])
def test_verity_hash_tree_verifies(dm_vm: Machine, tmp_path: Path,
                                   hash_block_size: int) -> None:
    """A real tree: the device reads back the data; a wrong root digest fails the read."""
    rng = random.Random(SEED)
    data = rng.randbytes(64 * 4096)
    salt = rng.randbytes(16)
    tree = verity_tree.build(data, hash_block_size=hash_block_size, salt=salt)
    hash_start = len(data) // hash_block_size
    image = tmp_path / "verity.img"
    image.write_bytes(data + tree.blocks + b"\0" * 4096)
    import hashlib

    want = hashlib.sha256(data).hexdigest()
    with dm_vm.disk(image) as d:
        # $dev: the disk's major:minor, read in the guest (one command for it and both
        # devices; each command is a round trip)
        good = (f"0 {len(data) // 512} verity 1 $dev $dev 4096 {hash_block_size} 64 "
                f"{hash_start} sha256 {tree.root.hex()} {salt.hex()}")
        bad_root = bytes([tree.root[0] ^ 1]) + tree.root[1:]
        bad = good.replace(tree.root.hex(), bad_root.hex())
        try:
            dm_vm.sh(f"set -e; read -r dev </sys/block/{d.guest_path.rsplit('/', 1)[1]}/dev\n"
                     f"dmsetup create tvg --readonly --table \"{good}\"\n"
                     f"dmsetup create tvb --readonly --table \"{bad}\"")
            assert dm_vm.sha256_of("/dev/mapper/tvg") == want
            out = dm_vm.sh("dd if=/dev/mapper/tvb of=/dev/null bs=4096 count=1 "
                           "iflag=direct 2>/dev/null; echo \"@rc $?\"; dmsetup status tvb")
            rc, status = out.split("\n", 1)
            assert rc != "@rc 0", "a verity device with a wrong root digest read without error"
            assert rc.startswith("@rc ") and status.split()[3] == "C", out
        finally:
            dm_vm.run("dmsetup remove tvb; dmsetup remove tvg")


def test_crypt_keyring_reference(dm_vm: Machine, tmp_path: Path) -> None:
    """``:32:logon:<desc>`` loads, reads back as written, and encrypts like the hex key."""
    tar = _keyutils_tar(tmp_path)
    if tar is None:
        pytest.skip("keyutils (keyctl) not available for the guest")
    disk = tmp_path / "c.img"
    disk.write_bytes(b"\0" * (1 << 20))
    # both disks in one hot-plug, and one guest command ($dev: the disk's major:minor)
    with dm_vm.disks_attached([tar, disk], read_only=[True, False]) as (ku, d):
        key = random.Random(SEED).randbytes(32)
        ref = "0 2048 crypt aes-xts-plain64 :32:logon:dmimage:kt 0 {dev} 0"
        hexed = f"0 2048 crypt aes-xts-plain64 {key.hex()} 0 {{dev}} 0"
        keyhex = "".join(f"\\x{b:02x}" for b in key)
        try:
            out = dm_vm.sh(
                f"read -r dev </sys/block/{d.guest_path.rsplit('/', 1)[1]}/dev; echo $dev\n"
                f"mkdir -p /tmp/ku && tar -xf {ku.guest_path} -C /tmp/ku\n"
                "export LD_LIBRARY_PATH=/tmp/ku\n"
                f"printf '{keyhex}' | /tmp/ku/keyctl padd logon dmimage:kt @us >/dev/null\n"
                f"dmsetup create tkr --table \"{ref.format(dev='$dev')}\"\n"
                f"dmsetup create tkh --table \"{hexed.format(dev='$dev')}\"\n"
                "dmsetup table tkr\n"
                "dd if=/dev/urandom of=/dev/mapper/tkr bs=4096 count=4 oflag=direct 2>/dev/null\n"
                "sha256sum /dev/mapper/tkr /dev/mapper/tkh | cut -d' ' -f1")
            lines = out.split("\n")
            table = parse_table(ref.format(dev=lines[0]))
            assert lines[1] + "\n" == format_table(table), lines[1]
            assert parse_table(lines[1]) == table
            assert lines[2] == lines[3], "the keyring key and the same key in hex disagree"
        finally:
            dm_vm.run("dmsetup remove tkr; dmsetup remove tkh; "
                      "LD_LIBRARY_PATH=/tmp/ku /tmp/ku/keyctl clear @us")
