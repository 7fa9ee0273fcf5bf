"""VM harness timings: launch to a ready agent, cold (boot) and warm (restored from the saved
VM state), then warm cycles of hot-plug (metadata + data), pool activation (first one formats),
a thin create + 1 MiB write + hash, teardown and unplug.

    python benchmarks/vm_bench.py [--kernel deb12] [--boots 2] [--restores 10] [--cycles 5]

Prints one line per measurement and a summary (median, min, max) per phase. The first
saved-state launch saves the state when the cache has none (reported as "cold boot + save").
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dmimage.guest.kernels import kernel_by_name
from dmimage.guest.machine import Machine


def _qemu_cpu(pid: int | None) -> float:
    """User + system CPU seconds QEMU has used so far (``/proc/PID/stat``)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="deb12")
    ap.add_argument("--boots", type=int, default=2, help="cold boots (no saved state)")
    ap.add_argument("--restores", type=int, default=10,
                    help="machines started from the saved state (the last one runs the cycles)")
    ap.add_argument("--cycles", type=int, default=5)
    args = ap.parse_args()
    kernel = kernel_by_name(args.kernel, fetch=True)
    phases: dict[str, list[float]] = {}

    def rec(name: str, t0: float) -> float:
        dt = time.monotonic() - t0
        phases.setdefault(name, []).append(dt)
        print(f"{name:<28} {dt * 1000:8.0f} ms", flush=True)
        return time.monotonic()

    for _ in range(args.boots):
        t = time.monotonic()
        cpu = time.process_time()
        with Machine(kernel, saved_state=False) as vm:
            rec("cold boot → agent ready", t)
            spent = time.process_time() - cpu + _qemu_cpu(vm.pid)
            phases.setdefault("cold boot CPU (QEMU+host)", []).append(spent)
            print(f"{'  (CPU, QEMU + host)':<28} {spent * 1000:8.0f} ms", flush=True)
            print(f"{'  (guest uptime)':<28} {vm.guest_uptime_at_ready * 1000:8.0f} ms "
                  f"[{vm.accel}]")
    for i in range(args.restores + 1):
        t = time.monotonic()
        cpu = time.process_time()
        vm = Machine(kernel, saved_state=True).start()
        if vm.start_kind == "restored":
            rec("restore → agent ready", t)
            # CPU seconds (QEMU + this process) until ready: what the restore costs whatever
            # the machine's load; the wall time above grows with the load.
            spent = time.process_time() - cpu + _qemu_cpu(vm.pid)
            phases.setdefault("restore CPU (QEMU+host)", []).append(spent)
            print(f"{'  (CPU, QEMU + host)':<28} {spent * 1000:8.0f} ms", flush=True)
        else:
            rec(f"{'cold boot + save' if vm.start_kind == 'cold+saved' else 'cold (no save)'}", t)
        if i < args.restores:
            vm.close()
    print(f"state file: {vm.state_file} "
          f"({os.path.getsize(vm.state_file) >> 20 if vm.state_file else 0} MiB); "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp, vm:
        t = time.monotonic()
        vm.run("true", check=True)
        rec("agent round trip", t)
        meta, data = Path(tmp) / "m", Path(tmp) / "d"
        for _ in range(args.cycles):
            for p, size in ((meta, 4 << 20), (data, 64 << 20)):
                with open(p, "wb") as f:
                    f.truncate(size)
            t = time.monotonic()
            m = vm.attach(meta, read_only=False)
            d = vm.attach(data, read_only=False)
            t = rec("attach 2 disks", t)
            table = f"0 131072 thin-pool {m.guest_path} {d.guest_path} 128 0"
            vm.sh(f"dmsetup create bench --table {shlex.quote(table)}")
            t = rec("pool activation (format)", t)
            vm.sh("dmsetup message bench 0 'create_thin 0' && dmsetup create bench-0 --table "
                  "'0 2048 thin /dev/mapper/bench 0' && dmsetup mknodes")
            t = rec("create_thin + activate", t)
            vm.sh("dd if=/dev/zero of=/dev/mapper/bench-0 bs=65536 count=16 conv=fsync "
                  "status=none")
            t = rec("write 1 MiB (fsync)", t)
            vm.sha256_of("/dev/mapper/bench-0")
            t = rec("sha256 of 1 MiB thin", t)
            vm.sh("dmsetup status bench && dmsetup remove bench-0 && dmsetup remove bench")
            t = rec("status + teardown", t)
            vm.detach(d)
            vm.detach(m)
            t = rec("detach 2 disks", t)
        vm.check_dmesg(since_last=False)
    print("\nphase                        median      min      max  (ms, n)")
    for name, v in phases.items():
        print(f"{name:<28} {statistics.median(v) * 1000:7.0f} {min(v) * 1000:8.0f} "
              f"{max(v) * 1000:8.0f}  ({len(v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
