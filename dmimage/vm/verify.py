"""`dmimage vm verify`: does the real kernel read every thin exactly as dmimage's offline
export does?

The metadata and data files are attached to the guest read-only and the pool is activated
with the thin-pool ``read_only`` feature (the kernel then opens the metadata read-only and
never writes; a read-only table is refused for thin-pool, but a read-only feature is fine).
Each thin is activated, hashed in the guest (sha256 of its first SIZE bytes) and compared with
the sha256 of dmimage's export, computed while streaming (no file is written).
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dmimage.format.constants import SECTOR_SIZE

if TYPE_CHECKING:
    from dmimage.guest.machine import Machine


class _HashSink:
    """A binary stream that only hashes what is written to it."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


@dataclass
class DeviceResult:
    dev_id: int
    size: int
    offline_sha256: str
    guest_sha256: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.guest_sha256 == self.offline_sha256


@dataclass
class VerifyReport:
    metadata: str
    data: str
    kernel: str = ""
    pool_status: str = ""
    devices: list[DeviceResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(d.ok for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "metadata": self.metadata, "data": self.data,
                "kernel": self.kernel, "pool_status": self.pool_status, "errors": self.errors,
                "devices": [{**asdict(d), "ok": d.ok} for d in self.devices]}


def offline_hashes(metadata: str, data: str, devs: dict[int, int | None] | None
                   ) -> tuple[dict[int, tuple[int, str]], int, int]:
    """{dev: (size, sha256)} by dmimage's export, data block size (sectors), nr data blocks.
    *devs* maps dev id → size (None: up to the end of the highest mapped block); None: all."""
    from dmimage.thin.export import default_size, export_thin
    from dmimage.thin.pool import open_pool

    out = {}
    with open_pool(metadata) as pool:
        known = pool.devices()
        wanted = devs if devs is not None else {d: None for d in sorted(known)}
        for dev, size in wanted.items():
            if dev not in known:
                from dmimage.errors import UsageError

                raise UsageError(f"thin device {dev} does not exist in {metadata}")
            if size is None:
                size = default_size(pool, dev)
            sink = _HashSink()
            export_thin(pool, data, dev, sink, size=size)
            out[dev] = (size, sink.h.hexdigest())
        bs = pool.superblock.data_block_size
        nr_data = pool.superblock.data_sm.nr_blocks
    return out, bs, nr_data


def verify_in(vm: Machine, metadata: str, data: str, devs: dict[int, int | None] | None = None,
              *, timeout: float = 600.0) -> VerifyReport:
    """Verify on a running machine (attaches and detaches the two files itself).

    One hot-plug of both files and four guest commands, whatever the number of thins: under
    TCG each hot-plug costs ~0.3 QEMU CPU-s and each command ~0.05 or more (a process start
    is ~10 ms). The first command activates the pool and every thin, the second hashes every
    thin (``Machine.sha256_many``), the third removes them; the fourth reads the kernel log
    after the unplug, so that a warning the unplug logs counts too."""
    from dmimage.guest.dmstatus import parse_pool_status

    report = VerifyReport(str(metadata), str(data), kernel=str(vm.kernel))
    hashes, bs, nr_data = offline_hashes(metadata, data, devs)
    name = "dmimage-verify"
    thins = {dev: f"{name}-{dev}" for dev in hashes}
    with vm.disks_attached([metadata, data], read_only=True) as (m, d):
        table = f"0 {nr_data * bs} thin-pool {m.guest_path} {d.guest_path} {bs} 0 1 read_only"
        # The pool's status line first; then one line per thin: "@@ok DEV" or
        # "@@fail DEV RC STDERR" (its error on one line). All thins in one dmsetup (a start
        # costs ~20 ms of TCG CPU); if that fails, one by one, to say which thin fails.
        lines = [f"dmsetup create {name} --table {shlex.quote(table)} && "
                 f"dmsetup status {name} || exit 3"]
        tables = {dev: f"0 {max(1, -(-size // SECTOR_SIZE))} thin /dev/mapper/{name} {dev}"
                  for dev, (size, _sha) in hashes.items()}
        concise = ";".join(f"{thins[dev]},,,rw,{t}" for dev, t in tables.items())
        each = [f"dmsetup create {thins[dev]} --table {shlex.quote(t)} 2>/tmp/.ve; rc=$?; "
                f"if [ $rc = 0 ]; then echo @@ok {dev}; "
                f"else echo \"@@fail {dev} $rc $(tr '\\n' ' ' </tmp/.ve)\"; fi"
                for dev, t in tables.items()]
        if tables:
            lines += [f"if dmsetup create --concise {shlex.quote(concise)} 2>/dev/null; then",
                      *(f"echo @@ok {dev}" for dev in tables), "else",
                      *(f"dmsetup remove {thins[dev]} 2>/dev/null" for dev in tables),
                      *each, "fi"]
        try:
            res = vm.run("\n".join(lines), timeout=120 + 10 * len(hashes))
            if not res.ok:
                why = "timed out" if res.timed_out else res.err.strip()
                report.errors.append(f"the kernel refused the pool: {why}")
                for dev, (size, sha) in hashes.items():
                    report.devices.append(DeviceResult(dev, size, sha,
                                                       error="pool not activated"))
                return report
            out = res.out.splitlines()
            report.pool_status = out[0].strip() if out else ""
            activated: dict[int, str | None] = {}
            for line in out[1:]:
                words = line.split(None, 3)
                if len(words) >= 2 and words[0] in ("@@ok", "@@fail"):
                    activated[int(words[1])] = None if words[0] == "@@ok" else (
                        f"thin activation failed (exit {words[2]}): "
                        f"{words[3].strip() if len(words) > 3 else ''}")
            st = parse_pool_status(report.pool_status)
            if st.failed or st.needs_check or st.mode != "ro":
                report.errors.append(f"unexpected pool status: {report.pool_status}")
            for dev, (size, sha) in hashes.items():
                report.devices.append(DeviceResult(
                    dev, size, sha, error=activated.get(dev, "thin activation not reported")))
            _hash_thins(vm, [r for r in report.devices if r.error is None], thins, timeout)
        finally:
            names = [*thins.values(), name]
            one_by_one = "; ".join(f"dmsetup remove {n} 2>/dev/null" for n in names)
            vm.run(f"dmsetup remove {' '.join(names)} 2>/dev/null || {{ {one_by_one}; }}",
                   timeout=60 + 5 * len(thins))
    try:
        vm.check_dmesg()  # after the unplug: a warning it logs counts too
    except Exception as exc:
        report.errors.append(str(exc))
    return report


def _hash_thins(vm: Machine, results: list[DeviceResult], thins: dict[int, str],
                timeout: float) -> None:
    """Set ``guest_sha256`` of each result: all in one guest command, or one by one (to
    name the device whose read fails) if that command fails."""
    items: list[tuple[str, int | None]] = [(f"/dev/mapper/{thins[r.dev_id]}", r.size)
                                           for r in results]
    try:
        digests = vm.sha256_many(items, timeout=timeout)
    except Exception:  # noqa: BLE001 - retried per device below, which reports the error
        for r, (path, size) in zip(results, items, strict=True):
            try:
                r.guest_sha256 = vm.sha256_of(path, size, timeout=timeout)
            except Exception as exc:  # reported per device
                r.error = f"guest read failed: {exc}"
        return
    for r, digest in zip(results, digests, strict=True):
        r.guest_sha256 = digest
