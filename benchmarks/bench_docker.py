"""`dmimage docker ls` on a big store: 500 images and 1,000 containers (goal: at most 1 s);
`dmimage docker save` of a built image against plain reads of the same bytes (goal: >= 50%).

Builds a synthetic data root (the pool by dmimage's own offline transaction: a base thin, one
snapshot per image layer, two per container; the JSON files as dockerd 20.10 lays them out),
then times the whole command, Python start-up included.

The save stores are made by ``dmimage build`` (layout "docker-devicemapper"), one image of
two layers holding --save-mib MiB of files, "large" (4 MiB and 300 KB files, a few small) and
"small" (a root filesystem's sizes); --workdir keeps them between runs. save is timed
in-process into /dev/null, and into a new file beside the store ("save -> file"; its pages
are written out and evicted, and the file removed, after each run, untimed); the baselines
read the same bytes (the data file ranges save copies file contents from, merged, in offset
order) with preadv into one reused 1 MiB buffer: plainly, as ``cat`` would (the goal's
baseline; the kernel's own readahead only), with the ranges 32 MiB ahead requested by
``posix_fadvise(WILLNEED)`` as save requests them ("read, hinted"), and hashing them with
sha256 on one core (the least a save that checks every layer's diff id must do); save runs
as by default (each layer tar checked against its diff id) and with ``--no-verify``
(nothing hashed). Hot: from the page cache (each is run once before timing). Cold (--cold):
every file of the data root and the output are evicted from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` before every run (no root needed, and nobody else's
cache is touched); ``fincore`` reports what of the data file was still cached. Runs are
interleaved; wall and CPU (all threads) are printed with the load average.

    python benchmarks/bench_docker.py [--images 500] [--containers 1000] [--repeat 5]
                                      [--save-mib 256] [--save-kinds large,small] [--cold]
                                      [--workdir DIR] [--only ls|save]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmimage.thin.format_pool import format_pool
from dmimage.thin.transaction import WritablePool


def h(*parts: object) -> str:
    return hashlib.sha256(" ".join(map(str, parts)).encode()).hexdigest()


def make_store(root: Path, images: int, containers: int) -> None:
    loop = root / "devicemapper/devicemapper"
    loop.mkdir(parents=True)
    with open(loop / "metadata", "wb") as f:
        f.truncate(64 << 20)
    with open(loop / "data", "wb") as f:
        f.truncate(1 << 30)
    format_pool(str(loop / "metadata"), data_block_size=128, nr_data_blocks=16384)
    md = root / "devicemapper/metadata"
    md.mkdir(parents=True)
    lay = root / "image/devicemapper/layerdb/sha256"
    mnt = root / "image/devicemapper/layerdb/mounts"
    idb = root / "image/devicemapper/imagedb/content/sha256"
    ctr = root / "containers"
    for d in (lay, mnt, idb, ctr):
        d.mkdir(parents=True)
    msgs = ["create_thin 1"]
    next_id = 2

    def dev(name: str, dev_id: int) -> None:
        (md / name).write_text(json.dumps({"device_id": dev_id, "size": 10 << 30,
                                           "transaction_id": dev_id, "initialized": False,
                                           "deleted": False}))

    dev("base", 1)
    tags = {}
    image_ids = []
    for i in range(images):
        diff = "sha256:" + h("diff", i)
        cache = h("cache", i)
        (lay / diff[7:]).mkdir()
        (lay / diff[7:] / "cache-id").write_text(cache)
        (lay / diff[7:] / "diff").write_text(diff)
        (lay / diff[7:] / "size").write_text("0")
        msgs.append(f"create_snap {next_id} 1")
        dev(cache, next_id)
        next_id += 1
        config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
        iid = hashlib.sha256(config).hexdigest()
        (idb / iid).write_bytes(config)
        tags[f"img{i}:1"] = "sha256:" + iid
        image_ids.append(("sha256:" + iid, diff))
    for c in range(containers):
        iid, chain = image_ids[c % images]
        cid = h("container", c)
        mount = h("mount", c)
        (mnt / cid).mkdir()
        (mnt / cid / "mount-id").write_text(mount)
        (mnt / cid / "init-id").write_text(mount + "-init")
        (mnt / cid / "parent").write_text(chain)
        layer_dev = 2 + (c % images)
        msgs += [f"create_snap {next_id} {layer_dev}", f"create_snap {next_id + 1} {next_id}"]
        dev(mount + "-init", next_id)
        dev(mount, next_id + 1)
        next_id += 2
        (ctr / cid).mkdir()
        (ctr / cid / "config.v2.json").write_text(json.dumps(
            {"ID": cid, "Name": f"/c{c}", "Image": iid, "Driver": "devicemapper"}))
    msgs.append(f"set_transaction_id 0 {next_id - 1}")
    with WritablePool(str(loop / "metadata")) as pool:
        for m in msgs:
            pool.message(m)
        pool.commit()
    (root / "image/devicemapper/repositories.json").write_text(json.dumps(
        {"Repositories": {t.split(":")[0]: {t: i} for t, i in tags.items()}}))
    (md / "deviceset-metadata").write_text(json.dumps({"next_device_id": next_id - 1}))


def _layer_tars(kind: str, mib: int) -> list[bytes]:
    """Two layer tars of *mib* MiB of files in all: "large" files (a few of 4 MiB, some of
    300 KB, a sprinkle of small ones) or "small" ones (sizes spread as in a distribution's
    root filesystem: median about 4 KiB, a few of a MiB)."""
    import io
    import random
    import tarfile

    rng = random.Random(1 if kind == "large" else 2)
    layers = []
    for li in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            left = mib << 19  # half of the bytes per layer
            i = 0
            while left > 0:
                if kind == "large":
                    n = rng.choice([4 << 20, 300_000, 40_000, 3000, 200])
                else:
                    n = int(min(2 << 20, rng.lognormvariate(8.3, 1.6)))
                n = min(left, n)
                ti = tarfile.TarInfo(f"d{li}/{i // 100}/f{i}")
                ti.size = n
                t.addfile(ti, io.BytesIO(rng.randbytes(n)))
                left -= n
                i += 1
        layers.append(buf.getvalue())
    return layers


def _save_store(work: Path, kind: str, mib: int) -> tuple[Path, int]:
    """A data root holding image big:1 built by ``dmimage build`` (kept in *work* between
    runs); and the number of files."""
    import io
    import tarfile

    from dmimage.image.docker_store import build_docker_store, load_docker_spec

    root = work / f"{kind}-{mib}"
    layers = _layer_tars(kind, mib)
    files = sum(len(tarfile.open(fileobj=io.BytesIO(x)).getmembers()) for x in layers)
    if root.exists():
        return root, files
    diffs = ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diffs}}).encode()
    cid = hashlib.sha256(config).hexdigest()
    src = work / f"{kind}-{mib}.tar"
    with tarfile.open(src, "w") as t:
        members = [(f"l{i}/layer.tar", x) for i, x in enumerate(layers)]
        members += [(f"{cid}.json", config), ("manifest.json", json.dumps(
            [{"Config": f"{cid}.json", "RepoTags": ["big:1"],
              "Layers": [f"l{i}/layer.tar" for i in range(2)]}]).encode())]
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    spec = work / f"{kind}-{mib}.toml"
    spec.write_text(f'name = "big"\nlayout = "docker-devicemapper"\n[docker]\n'
                    f'images = ["{src.name}"]\nbase_size = "{max(1, mib // 256 + 1)}G"\n'
                    'data_size = "8G"\nmetadata_size = "64M"\n')
    t0 = time.perf_counter()
    build_docker_store(load_docker_spec(spec), root)
    src.unlink()
    print(f"{kind}: built in {time.perf_counter() - t0:.1f} s")
    return root, files


def _files_under(root: Path) -> list[str]:
    """Every regular file of a data root (symlinks not followed): what save may read."""
    import os

    out = []
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(p)
    return out


def _evict(paths: list[str]) -> None:
    """Drop these files' pages from the page cache (``POSIX_FADV_DONTNEED``: no root, and
    only these files; dirty pages are written first, or the kernel keeps them), so the
    next reads come from the device."""
    import os

    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cached_bytes(path: str) -> int | None:
    """Bytes of *path* in the page cache, by util-linux ``fincore`` (mincore: it reads
    nothing, where a probing read would itself start the kernel's readahead); None without
    it."""
    try:
        res = subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES", path],
                             capture_output=True, text=True, check=True)
        return int(res.stdout.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def bench_save(work: Path, kinds: list[str], mib: int, repeat: int, cold: bool) -> None:
    for kind in kinds:
        root, files = _save_store(work, kind, mib)
        _bench_save_one(kind, root, files, repeat, cold)


def _bench_save_one(kind: str, root: Path, files: int, repeat: int, cold: bool) -> None:
    """save (into /dev/null, in process) against reads of the same bytes: the data file
    ranges save copies file contents from, merged and read in offset order, 1 MiB per
    ``preadv`` into one buffer; and the same read hashed with sha256 on one core (what
    checking the diff ids costs at the least). Runs interleaved; wall and CPU (all threads)."""
    import os

    from dmimage.docker import save as sv
    from dmimage.docker.store import open_store, resolve
    from dmimage.thin.pool import open_pool

    store = open_store(root)
    img = store.images[resolve(store, "big:1").label]
    fd = os.open(store.pool_files.data, os.O_RDONLY)
    with open_pool(store.pool_files.metadata) as pool:
        plans = [sv._plan(sv._prepare(store, pool, fd, store.layers[c]))
                 for c in img.chain_ids]
    ranges = sorted(r for p in plans for r in p.data_ranges())
    nbytes = sum(n for _, n in ranges)
    tar_bytes = sum(p.size for p in plans)
    buf = bytearray(1 << 20)
    mv = memoryview(buf)

    ahead = 32 << 20  # as save: 32 MiB ahead, in requests of at most 8 MiB
    hints = [(s + k, min(8 << 20, n - k)) for s, n in ranges for k in range(0, n, 8 << 20)]

    def read(hashed: bool, hinted: bool = False) -> None:
        h = hashlib.sha256()
        done = asked = i = 0
        for s, n in ranges:
            while hinted and i < len(hints) and asked < done + ahead:
                os.posix_fadvise(fd, hints[i][0], hints[i][1], os.POSIX_FADV_WILLNEED)
                asked += hints[i][1]
                i += 1
            o = 0
            while o < n:
                k = os.preadv(fd, [mv[:min(n - o, len(buf))]], s + o)
                if hashed:
                    h.update(mv[:k])
                o += k
            done += n

    out_path = root.parent / f"{root.name}.out.tar"

    def do_save(verify: bool, to: str = os.devnull) -> None:
        with open(to, "wb") as f:
            sv.save(store, ["big:1"], f, verify=verify)

    fns = {"read": lambda: read(False), "read, hinted": lambda: read(False, True),
           "read+sha256": lambda: read(True),
           "save": lambda: do_save(True), "save --no-verify": lambda: do_save(False),
           "save -> file": lambda: do_save(True, str(out_path)),
           "--no-verify -> file": lambda: do_save(False, str(out_path))}
    root_files = _files_under(root)
    print(f"{kind}: {files} files, {tar_bytes / 1e6:.1f} MB of layer tars, "
          f"{nbytes / 1e6:.1f} MB of file data in {len(ranges)} ranges of the data file")
    for mode in ["hot"] + (["cold"] if cold else []):
        if mode == "hot":
            for fn in fns.values():
                fn()
        out_path.unlink(missing_ok=True)
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
        resident: list[float] = []
        load0 = os.getloadavg()[0]
        for _ in range(repeat):
            for name, fn in fns.items():
                if mode == "cold":
                    # the whole data root (tar-splits, JSON, pool metadata, data file) and
                    # the last output leave the page cache before every run
                    for _try in range(5):  # pages still being read ahead are kept: retry
                        _evict([*root_files, str(out_path)])
                        left = _cached_bytes(store.pool_files.data)
                        if left is None or left < 0.01 * nbytes:
                            break
                        time.sleep(0.2)
                    if left is not None:
                        resident.append(left / nbytes)
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t = time.perf_counter()
                fn()
                w = time.perf_counter() - t
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                res[name].append((w, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime))
                if name.endswith("-> file"):  # its dirty pages written out, not timed
                    _evict([str(out_path)])
                    # and removed: the next save writes a new file, as the command does (a
                    # temporary file renamed into place), not a truncated one (freeing its
                    # blocks cost ~0.06 s of the timing)
                    out_path.unlink()
        load1 = os.getloadavg()[0]
        extra = (f"; before each run at most {100 * max(resident):.1f}% of those bytes' "
                 "worth of the data file was cached") if resident else ""
        print(f"{kind}, {mode} cache, {repeat} interleaved runs, load average "
              f"{load0:.1f} -> {load1:.1f}{extra}:")
        base = 0.0
        for name, v in res.items():
            wall = statistics.median(x[0] for x in v)
            cpu = statistics.median(x[1] for x in v)
            mbw = nbytes / wall / 1e6
            base = base or mbw
            best = nbytes / min(x[0] for x in v) / 1e6
            print(f"  {name:19s} wall median {wall:.3f} s ({mbw:.0f} MB/s, "
                  f"{100 * mbw / base:.0f}% of read; best {best:.0f} MB/s), CPU median "
                  f"{cpu:.3f} s ({nbytes / cpu / 1e6:.0f} MB/s of CPU)")
    out_path.unlink(missing_ok=True)
    os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--save-mib", type=int, default=256)
    ap.add_argument("--save-kinds", default="large,small")
    ap.add_argument("--cold", action="store_true",
                    help="also cold: the data root's files and the output evicted from the "
                    "page cache (posix_fadvise DONTNEED) before every run")
    ap.add_argument("--workdir", default=None,
                    help="keep the save stores here between runs (default: a temp dir)")
    ap.add_argument("--only", choices=["ls", "save"])
    args = ap.parse_args()
    if args.only != "ls":
        if args.workdir:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            bench_save(Path(args.workdir), args.save_kinds.split(","), args.save_mib,
                       args.repeat, args.cold)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                bench_save(Path(tmp), args.save_kinds.split(","), args.save_mib,
                           args.repeat, args.cold)
        if args.only == "save":
            return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        t0 = time.perf_counter()
        make_store(root, args.images, args.containers)
        print(f"store: {args.images} images, {args.containers} containers, "
              f"{1 + args.images + 2 * args.containers} thins, built in "
              f"{time.perf_counter() - t0:.1f} s")
        dm = str(Path(sys.executable).with_name("dmimage"))
        for cmd in (["ls", "--json"], ["check"]):
            times, cpu = [], []
            for _ in range(args.repeat):
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                res = subprocess.run([dm, "docker", cmd[0], str(root), *cmd[1:]],
                                     capture_output=True, check=False)
                times.append(time.perf_counter() - t)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
                if res.returncode != 0:
                    print(res.stderr.decode(), file=sys.stderr)
                    return 1
            # On a shared machine the wall time is mostly waiting for a core: the CPU time
            # (user + system) is what the command itself costs.
            print(f"docker {' '.join(cmd)}: wall median {statistics.median(times):.2f} s "
                  f"(min {min(times):.2f}), CPU median {statistics.median(cpu):.2f} s "
                  f"(min {min(cpu):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
