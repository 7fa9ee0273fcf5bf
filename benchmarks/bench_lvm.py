"""`dmimage lvm ls` of a VG with 2,000 LVs (target: at most 0.5 s of the command's own work)
and `dmimage lvm export` of a linear LV against a sequential read of the same bytes (target:
at least 80%). Builds its PVs with tests/lvmgen.py in a temp dir.

    python benchmarks/bench_lvm.py
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import lvmgen  # noqa: E402

MiB = 1 << 20
EXT = 8192  # 4 MiB extents, lvm2's default


def main() -> None:
    from dmimage.cli.main import main as cli

    n = 2000
    lv_ext = 1
    data_mib = 256
    pe_count = n * lv_ext + data_mib // 4
    with tempfile.TemporaryDirectory() as d:
        disk = os.path.join(d, "pv.img")
        size = MiB + pe_count * EXT * 512
        lvmgen.blank(disk, size)
        lvs = [lvmgen.TLv(f"lv{i:04d}", [lvmgen.striped(0, lv_ext, [("pv0", i)])])
               for i in range(n)]
        lvs.append(lvmgen.TLv("big", [lvmgen.striped(0, data_mib // 4, [("pv0", n)])]))
        pid = "benchx-1111-2222-3333-4444-5555-666666"
        text = lvmgen.vg_text("vgb", "vgbvgb-1111-2222-3333-4444-5555-666666", 1, EXT,
                              [("pv0", pid, size // 512, 2048, pe_count)], lvs)
        with open(disk, "r+b") as f:
            lvmgen.write_pv(f, 0, pid, size, MiB, text, mda_size=MiB - 4096)
        with open(disk, "r+b") as f:
            f.seek(MiB + n * EXT * 512)
            for _ in range(data_mib // 4):
                f.write(os.urandom(4 * MiB))
        sink = io.TextIOWrapper(open(os.devnull, "wb"), write_through=True)  # noqa: SIM115

        def timed(argv: list[str]) -> float:
            """Best of three, stdout to /dev/null (the command's own work, imports cached)."""
            best = float("inf")
            for _ in range(3):
                saved, sys.stdout = sys.stdout, sink
                try:
                    t = time.perf_counter()
                    assert cli(argv) == 0
                    best = min(best, time.perf_counter() - t)
                finally:
                    sys.stdout = saved
            return best

        t_ls = timed(["lvm", "ls", "--json", disk])
        print(f"lvm ls --json, {n + 1} LVs, {len(text)} bytes of text: {t_ls:.3f} s "
              "(target <= 0.5 s)")
        fd = os.open(disk, os.O_RDONLY)
        best_read = float("inf")
        buf = bytearray(4 * MiB)
        for _ in range(3):  # the fastest plain read: one reused buffer, 4 MiB at a time
            t = time.perf_counter()
            off, end = MiB + n * EXT * 512, size
            while off < end:
                off += os.preadv(fd, [buf], off)
            best_read = min(best_read, time.perf_counter() - t)
        os.close(fd)
        from dmimage.lvm.export import export_lv
        from dmimage.lvm.vg import load_vgs

        (lvg,), _, _ = load_vgs([disk])
        t_exp = float("inf")
        for _ in range(3):
            with open(os.devnull, "wb") as out:
                t = time.perf_counter()
                export_lv(lvg, lvg.vg.lv("big"), out)
                t_exp = min(t_exp, time.perf_counter() - t)
        print(f"lvm export of {data_mib} MiB to /dev/null (VG loaded): {t_exp:.3f} s; "
              "sequential read of the "
              f"same bytes {best_read:.3f} s: {best_read / t_exp:.0%} of the read speed "
              "(target >= 80%)")

if __name__ == "__main__":
    main()
