"""`dmimage lvm ls` of a VG with 2,000 LVs (target: at most 0.5 s of the command's own work)
and `dmimage lvm export` of a linear LV against a sequential read of the same bytes (target:
at least 80%). Builds its PVs with tests/lvmgen.py in a temp dir.

    python benchmarks/bench_lvm.py
"""

from __future__ import annotations

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
        devnull = open(os.devnull, "w")  # noqa: SIM115
        saved, sys.stdout = sys.stdout, devnull
        try:
            t = time.perf_counter()
            rc = cli(["lvm", "ls", "--json", disk])
            t_ls = time.perf_counter() - t
        finally:
            sys.stdout = saved
        print(f"lvm ls, {n + 1} LVs, {len(text)} bytes of text: {t_ls:.3f} s (rc {rc}, "
              "target <= 0.5 s)")
        out = os.path.join(d, "big.bin")
        t = time.perf_counter()
        cli(["lvm", "export", disk, "vgb/big", "-o", out])
        t_exp = time.perf_counter() - t
        os.unlink(out)
        fd = os.open(disk, os.O_RDONLY)
        t = time.perf_counter()
        off = MiB + n * EXT * 512
        while os.pread(fd, 4 * MiB, off) and off < size:
            off += 4 * MiB
        t_read = time.perf_counter() - t
        os.close(fd)
        print(f"lvm export of {data_mib} MiB: {t_exp:.2f} s; sequential read {t_read:.2f} s; "
              f"export speed {t_read / t_exp:.0%} of the read (target >= 80%)")


if __name__ == "__main__":
    main()
