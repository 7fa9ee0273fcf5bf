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


def _put_files(files: dict[str, str]) -> str:
    """Shell lines writing each ``{guest path: text}`` (mode 755) under :data:`GUEST_DIR`."""
    marker = "DMIMAGE_EOF_7f3a"
    out = f"mkdir -p {GUEST_DIR} || exit 1\n"
    for guest_path, text in files.items():
        assert marker not in text
        q = shlex.quote(guest_path)
        if text and not text.endswith("\n"):  # else the marker ends the text's last line
            text += "\n"
        out += f"cat > {q} <<'{marker}' || exit 1\n{text}{marker}\nchmod 755 {q} || exit 1\n"
    return out


def _sections(out: str, n: int, what: str) -> list[str]:
    """*out* split at the ``@@@@`` lines the guest printed between *n* outputs."""
    from dmimage.guest.errors import VMError

    parts = ("\n" + out).split("\n@@@@\n")
    if len(parts) != n:
        raise VMError(f"{what}: {len(parts)} sections in the guest's output, not {n}")
    return [parts[0][1:], *parts[1:]]


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
            # one hot-plug wait for both (``Machine.attach_many``), as vm verify does
            disks += vm.attach_many([outdir / m["files"]["metadata"]["file"],
                                     outdir / m["files"]["data"]["file"]], read_only=read_only)
            dev_args = f" {disks[0].guest_path} {disks[1].guest_path}"
        rep.timings["attach"] = time.monotonic() - t0
        # Under TCG each guest command costs ~0.05 QEMU CPU-s or more and each process start
        # ~10 ms: the scripts go with activate.sh, the kernel's view is read in one command,
        # the ext4 volumes are checked in one, and the kernel log after the unplug.
        put = _put_files({f"{GUEST_DIR}/activate.sh": (outdir / m["activate"]).read_text(),
                          f"{GUEST_DIR}/deactivate.sh": (outdir / m["deactivate"]).read_text()})
        t1 = time.monotonic()
        res = vm.run(f"{put}sh {GUEST_DIR}/activate.sh{' -r' if read_only else ''}{dev_args}",
                     timeout=120)
        rep.timings["activate"] = time.monotonic() - t1
        if not rep.add("activate.sh", res.ok, (res.err or res.out).strip()[-300:]
                       if not res.ok else res.out.strip().splitlines()[0]):
            vm.run(f"sh {GUEST_DIR}/deactivate.sh", timeout=60)
            return rep
        try:
            first = res.out.split()
            meta_node, data_node = first[2].rstrip(","), first[4]

            def devnum(node: str) -> str:
                return (f"n=$(readlink -f {shlex.quote(node)}) && "
                        "read -r mm </sys/class/block/${n##*/}/dev && echo $mm")

            view = vm.sh(" && echo @@@@ && ".join([
                f"dmsetup status {shlex.quote(pool)}", "dmsetup table",
                f"dmsetup info -c --noheadings -o major,minor {shlex.quote(pool)}",
                devnum(meta_node), devnum(data_node)]))
            status, tables, pool_mm, meta_mm, data_mm = (
                x.strip() for x in _sections(view, 5, "pool status, tables, device numbers"))
            rep.pool_status = status
            st = parse_pool_status(status)
            rep.add("pool status", not st.failed and not st.needs_check
                    and st.mode == ("ro" if read_only else "rw"), status)
            # tables round trip
            got = parse_tables(tables + "\n")
            want = _expected_tables(outdir, m, meta_mm, data_mm, pool_mm, read_only)
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
            _check_ext4(vm, rep, m)
            rep.timings["ext4"] = time.monotonic() - t3
            if while_active is not None:
                while_active(vm)
        finally:
            r = vm.run(f"sh {GUEST_DIR}/deactivate.sh && dmsetup ls", timeout=60)
            rep.add("deactivate.sh", r.ok and "No devices found" in r.out,
                    (r.err + r.out).strip()[-200:] if not r.ok else "")
    finally:
        if vm.alive:
            vm.detach_many(list(reversed(disks)))
    try:
        vm.check_dmesg()  # after the unplug: a warning it logs counts too
        rep.add("kernel log", True)
    except Exception as exc:
        rep.add("kernel log", False, str(exc)[:300])
    rep.timings["total"] = time.monotonic() - t0
    return rep


def _check_ext4(vm: Machine, rep: GuestReport, m: dict[str, Any]) -> None:
    """Mount every ext4 volume read-only (one guest command for all) and compare its files'
    sha256 with the manifest's."""
    vols = [(i, d) for i, d in enumerate(m["devices"]) if d["content"].get("files") is not None]
    if not vols:
        return
    script = []
    for i, d in vols:
        mnt = f"/mnt/v{i}"
        # "@@@@" between volumes; each ends with "@@rc RC STDERR" (stderr on one line):
        # RC 1 the mount failed, 2 the hashing.
        script.append(f": >/tmp/.me; rc=0; mkdir -p {mnt} && mount -t ext4 -o ro,noload "
                      f"/dev/mapper/{d['dm_name']} {mnt} 2>>/tmp/.me || rc=1\n"
                      f"if [ $rc = 0 ]; then (cd {mnt} && find . -type f -exec sha256sum {{}} +) "
                      f"2>>/tmp/.me || rc=2; umount {mnt}; fi\n"
                      f"echo \"@@rc $rc $(tr '\\n' ' ' </tmp/.me)\"")
    out = vm.run("\necho @@@@\n".join(script), timeout=180 * len(vols)).out
    for (_i, d), part in zip(vols, _sections(out, len(vols), "ext4 volumes"), strict=True):
        lines = part.strip("\n").splitlines()
        last = lines[-1] if lines else ""
        words = last.split(None, 2)
        ok = len(words) >= 2 and words[0] == "@@rc" and words[1] == "0"
        if not rep.add(f"mount {d['dm_name']}", ok,
                       "" if ok else (words[2] if len(words) > 2 else last)[-200:]):
            continue
        seen = {}
        for line in lines[:-1]:
            sha, _, path = line.partition("  ")
            seen[path[1:] if path.startswith(".") else path] = sha
        want_files = {f["path"]: f["sha256"] for f in d["content"]["files"]}
        bad = sorted(k for k in set(seen) | set(want_files)
                     if seen.get(k) != want_files.get(k))
        rep.add(f"files {d['dm_name']}", not bad,
                f"{len(want_files)} files match" if not bad else "differ: " + ", ".join(bad[:5]))


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
