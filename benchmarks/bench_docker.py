"""`dmimage docker ls` on a big store: 500 images and 1,000 containers (goal: at most 1 s);
`dmimage docker save` of a built image against plain reads of the same bytes (goal: >= 50%).

Builds a synthetic data root (the pool by dmimage's own offline transaction: a base thin, one
snapshot per image layer, two per container; the JSON files as dockerd 20.10 lays them out),
then times the whole command, Python start-up included.

The save store is made by ``dmimage build`` (layout "docker-devicemapper") from one image of
two layers holding --save-mib MiB of files (a few large, many small); save is timed in-process
into /dev/null, and the baseline reads as many bytes from the pool's data file with preadv
into one reused 1 MiB buffer, and again hashing what it reads (sha256: the least a save that
checks every layer's diff id must do); all from the page cache (each is run once before
timing).

    python benchmarks/bench_docker.py [--images 500] [--containers 1000] [--repeat 5]
                                      [--save-mib 64]
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


def bench_save(tmp: Path, mib: int, repeat: int) -> None:
    import io
    import os
    import random
    import tarfile

    from dmimage.docker.save import save
    from dmimage.docker.store import open_store
    from dmimage.image.docker_store import build_docker_store, load_docker_spec

    rng = random.Random(1)
    layers = []
    for li in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            left = mib << 19  # half of the bytes per layer
            i = 0
            while left > 0:
                n = min(left, rng.choice([4 << 20, 300_000, 40_000, 3000, 200]))
                ti = tarfile.TarInfo(f"d{li}/{i // 100}/f{i}")
                ti.size = n
                t.addfile(ti, io.BytesIO(rng.randbytes(n)))
                left -= n
                i += 1
        layers.append(buf.getvalue())
    diffs = ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diffs}}).encode()
    cid = hashlib.sha256(config).hexdigest()
    src = tmp / "in.tar"
    with tarfile.open(src, "w") as t:
        members = [(f"l{i}/layer.tar", x) for i, x in enumerate(layers)]
        members += [(f"{cid}.json", config), ("manifest.json", json.dumps(
            [{"Config": f"{cid}.json", "RepoTags": ["big:1"],
              "Layers": [f"l{i}/layer.tar" for i in range(2)]}]).encode())]
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    spec = tmp / "big.toml"
    spec.write_text('name = "big"\nlayout = "docker-devicemapper"\n[docker]\n'
                    'images = ["in.tar"]\nbase_size = "1G"\ndata_size = "2G"\n'
                    'metadata_size = "64M"\n')
    t0 = time.perf_counter()
    if not (tmp / "bigroot").exists():
        build_docker_store(load_docker_spec(spec), tmp / "bigroot")
    print(f"save store: {len(layers[0]) + len(layers[1])} bytes of layer tars, built in "
          f"{time.perf_counter() - t0:.1f} s")
    store = open_store(tmp / "bigroot")
    total = sum(len(x) for x in layers)
    buf = bytearray(1 << 20)

    def read_plain() -> None:
        fd = os.open(store.pool_files.data, os.O_RDONLY)
        try:
            off = 0
            while off < total:
                n = os.preadv(fd, [memoryview(buf)[:min(len(buf), total - off)]], off)
                if not n:
                    off = 0  # the data file holds less than total: read it again
                off += n
        finally:
            os.close(fd)

    def read_hash() -> None:
        h = hashlib.sha256()
        fd = os.open(store.pool_files.data, os.O_RDONLY)
        try:
            off = 0
            while off < total:
                n = os.preadv(fd, [memoryview(buf)[:min(len(buf), total - off)]], off)
                if not n:
                    off = 0
                h.update(memoryview(buf)[:n])
                off += n
        finally:
            os.close(fd)

    def do_save() -> None:
        with open(os.devnull, "wb") as f:
            save(store, ["big:1"], f)

    for name, fn in (("plain read", read_plain), ("read + sha256", read_hash),
                     ("docker save", do_save)):
        fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        best = min(times)
        print(f"{name}: best {best:.3f} s, {total / best / 1e6:.0f} MB/s")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--save-mib", type=int, default=64)
    ap.add_argument("--only", choices=["ls", "save"])
    args = ap.parse_args()
    if args.only != "ls":
        with tempfile.TemporaryDirectory() as tmp:
            bench_save(Path(tmp), args.save_mib, args.repeat)
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
