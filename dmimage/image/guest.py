"""Proof in a guest: a built image, activated by its own activate.sh under a real kernel.

:func:`verify_build` (on a running :class:`dmimage.guest.machine.Machine`) attaches the image (or
the two files), copies activate.sh/deactivate.sh into the guest and runs activate.sh — for a
GPT image without arguments, so the partitions are found by PARTUUID as on a real machine —
then checks:

- every thin's sha256 in the guest equals the manifest's (computed offline at build time);
- every table read back by ``dmsetup table`` parses (dmimage.table) to the model of the table
  we emitted, with device paths replaced by the major:minor the kernel resolved;
- every ext4 volume mounts (read-only) and its files are exactly the manifest's, by sha256;
- the pool status is healthy; deactivate.sh removes everything; the kernel log is clean.

``read_only=True`` attaches the disk read-only and activates with ``activate.sh -r`` (the
thin-pool ``read_only`` feature), so the image is not changed.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from dmimage.guest.machine import Machine

GUEST_DIR = "/tmp/dmimage-build"


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class GuestReport:
    outdir: str
    kernel: str = ""
    checks: list[Check] = field(default_factory=list)
    pool_status: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(what, ok, detail))
        return ok

    def lines(self) -> list[str]:
        out = [f"guest verification of {self.outdir} ({self.kernel}): "
               f"{'OK' if self.ok else 'FAILED'}"]
        for c in self.checks:
            out.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.what}" + (f": {c.detail}"
                                                                   if c.detail else ""))
        if self.timings:
            out.append("  timings: " + ", ".join(f"{k} {v:.1f} s"
                                                 for k, v in self.timings.items()))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "outdir": self.outdir, "kernel": self.kernel,
                "pool_status": self.pool_status, "timings": self.timings,
                "checks": [c.__dict__ for c in self.checks]}


def _put_file(vm: Machine, text: str, guest_path: str) -> None:
    marker = "DMIMAGE_EOF_7f3a"
    assert marker not in text
    vm.sh(f"mkdir -p {GUEST_DIR} && cat > {shlex.quote(guest_path)} <<'{marker}'\n{text}"
          f"{marker}\nchmod 755 {shlex.quote(guest_path)}")


def _devnum(vm: Machine, node: str) -> str:
    out = vm.sh(f"cat /sys/class/block/$(basename $(readlink -f {shlex.quote(node)}))/dev")
    return out.strip()


def _expected_tables(outdir: Path, m: dict[str, Any], meta_mm: str, data_mm: str,
                     pool_mm: str, read_only: bool) -> dict[str, Any]:
    from dmimage.table import Entry, Table, Thin, ThinPool, parse_table

    pool = m["pool"]
    out: dict[str, Any] = {}
    t = parse_table((outdir / pool["table"]).read_text())
    e = t.entries[0]
    tp = e.target
    assert isinstance(tp, ThinPool)
    feats = tp.features | ({"read_only"} if read_only else set())
    out[pool["name"]] = Table((Entry(e.start, e.length, ThinPool(
        meta_mm, data_mm, tp.data_block_size, tp.low_water_mark, frozenset(feats))),))
    for d in m["devices"]:
        t = parse_table((outdir / d["table"]).read_text())
        e = t.entries[0]
        th = e.target
        assert isinstance(th, Thin)
        out[d["dm_name"]] = Table((Entry(e.start, e.length, Thin(pool_mm, th.dev_id)),))
    return out


def verify_build(vm: Machine, outdir: str | Path, *, read_only: bool = True,
                 image: str | Path | None = None,
                 while_active: Callable[[Machine], None] | None = None) -> GuestReport:
    """Verify the build in *outdir* on a running machine. *image*: attach this file instead
    of the built image (e.g. a writable copy). *while_active*: called after the checks, with
    every volume still active, before deactivate.sh (e.g. a write through a volume: one
    activation instead of two; what it raises is raised after the clean-up)."""
    from dmimage.guest.dmstatus import parse_pool_status
    from dmimage.table import parse_tables

    outdir = Path(outdir)
    m = json.loads((outdir / "manifest.json").read_text())
    rep = GuestReport(str(outdir), kernel=str(vm.kernel))
    t0 = time.monotonic()
    pool = m["pool"]["name"]
    disks = []
    try:
        if m["layout"] == "gpt":
            path = Path(image) if image else outdir / m["image"]["file"]
            disks.append(vm.attach(path, read_only=read_only))
            dev_args = ""
        else:
            disks.append(vm.attach(outdir / m["files"]["metadata"]["file"],
                                   read_only=read_only))
            disks.append(vm.attach(outdir / m["files"]["data"]["file"], read_only=read_only))
            dev_args = f" {disks[0].guest_path} {disks[1].guest_path}"
        rep.timings["attach"] = time.monotonic() - t0
        _put_file(vm, (outdir / m["activate"]).read_text(), f"{GUEST_DIR}/activate.sh")
        _put_file(vm, (outdir / m["deactivate"]).read_text(), f"{GUEST_DIR}/deactivate.sh")
        t1 = time.monotonic()
        res = vm.run(f"sh {GUEST_DIR}/activate.sh{' -r' if read_only else ''}{dev_args}",
                     timeout=120)
        rep.timings["activate"] = time.monotonic() - t1
        if not rep.add("activate.sh", res.ok, (res.err or res.out).strip()[-300:]
                       if not res.ok else res.out.strip().splitlines()[0]):
            vm.run(f"sh {GUEST_DIR}/deactivate.sh", timeout=60)
            return rep
        try:
            first = res.out.split()
            meta_node, data_node = first[2].rstrip(","), first[4]
            status = vm.sh(f"dmsetup status {shlex.quote(pool)}").strip()
            rep.pool_status = status
            st = parse_pool_status(status)
            rep.add("pool status", not st.failed and not st.needs_check
                    and st.mode == ("ro" if read_only else "rw"), status)
            # tables round trip
            got = parse_tables(vm.sh("dmsetup table"))
            pool_mm = vm.sh(f"dmsetup info -c --noheadings -o major,minor "
                            f"{shlex.quote(pool)}").strip()
            want = _expected_tables(outdir, m, _devnum(vm, meta_node), _devnum(vm, data_node),
                                    pool_mm, read_only)
            for name, table in want.items():
                rep.add(f"table {name}", got.get(name) == table,
                        "" if got.get(name) == table else f"kernel: {got.get(name)}, "
                        f"expected {table}")
            # thin contents
            t2 = time.monotonic()
            shas = vm.sha256_many([(f"/dev/mapper/{d['dm_name']}", d["size"])
                                   for d in m["devices"]], timeout=300)
            for d, sha in zip(m["devices"], shas, strict=True):
                rep.add(f"sha256 {d['dm_name']}", sha == d["sha256"],
                        sha[:16] if sha == d["sha256"] else f"guest {sha}, manifest "
                        f"{d['sha256']}")
            rep.timings["hash"] = time.monotonic() - t2
            # ext4 files
            t3 = time.monotonic()
            for i, d in enumerate(m["devices"]):
                files = d["content"].get("files")
                if files is None:
                    continue
                mnt = f"/mnt/v{i}"
                r = vm.run(f"mkdir -p {mnt} && mount -t ext4 -o ro,noload "
                           f"/dev/mapper/{d['dm_name']} {mnt} && cd {mnt} && "
                           "find . -type f | sort | while IFS= read -r f; do "
                           "sha256sum \"$f\"; done; rc=$?; cd /; umount " + mnt + "; exit $rc",
                           timeout=180)
                if not rep.add(f"mount {d['dm_name']}", r.ok, r.err.strip()[-200:]):
                    continue
                seen = {}
                for line in r.out.splitlines():
                    sha, _, p = line.partition("  ")
                    seen[p[1:] if p.startswith(".") else p] = sha
                want_files = {f["path"]: f["sha256"] for f in files}
                bad = sorted(k for k in set(seen) | set(want_files)
                             if seen.get(k) != want_files.get(k))
                rep.add(f"files {d['dm_name']}", not bad,
                        f"{len(want_files)} files match" if not bad else
                        "differ: " + ", ".join(bad[:5]))
            rep.timings["ext4"] = time.monotonic() - t3
            if while_active is not None:
                while_active(vm)
        finally:
            r = vm.run(f"sh {GUEST_DIR}/deactivate.sh && dmsetup ls", timeout=60)
            rep.add("deactivate.sh", r.ok and "No devices found" in r.out,
                    (r.err + r.out).strip()[-200:] if not r.ok else "")
    finally:
        for d in disks:
            if vm.alive:
                vm.detach(d)
    try:
        vm.check_dmesg()
        rep.add("kernel log", True)
    except Exception as exc:
        rep.add("kernel log", False, str(exc)[:300])
    rep.timings["total"] = time.monotonic() - t0
    return rep


def verify_build_vm(outdir: str | Path, *, kernel: str = "deb12") -> GuestReport:
    """Boot a guest, verify the build read-only (image unchanged), shut down."""
    from dmimage.guest.kernels import kernel_by_name
    from dmimage.guest.machine import Machine

    t0 = time.monotonic()
    with Machine(kernel_by_name(kernel, fetch=True)) as vm:
        boot = time.monotonic() - t0
        rep = verify_build(vm, outdir, read_only=True)
    rep.timings = {"boot": boot, **rep.timings}
    return rep
