"""`dmimage docker`: Docker's devicemapper store (Engine <= 24), read offline.

    dmimage docker ls ROOT [--json] [--tree]
    dmimage docker check ROOT [--json]
    dmimage docker export ROOT NAME -o FILE
    dmimage docker save ROOT IMAGE... -o FILE.tar
    dmimage docker diff ROOT CONTAINER [--json] [-o FILE.tar]

ROOT is a data root (a copy of /var/lib/docker, or the directory itself); it is never written.
Every subcommand holds shared locks on the pool's metadata and data files (docs/locking.md).
See docs/docker.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from dmimage.cli._locking import add_lock_plan

if TYPE_CHECKING:
    from dmimage.docker.store import Store


def _pool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="Docker's data root (e.g. /var/lib/docker)")
    p.add_argument("--metadata", default=None,
                   help="the pool's metadata device (direct-lvm); default: the loop-lvm file "
                   "ROOT/devicemapper/devicemapper/metadata")
    p.add_argument("--data", default=None,
                   help="the pool's data device (direct-lvm); default: "
                   "ROOT/devicemapper/devicemapper/data")
    p.add_argument("--lvm", nargs="+", metavar="DISK... VG/POOL", default=None,
                   help="direct-lvm: the LVM thin pool dockerd used (dm.thinpooldev), read "
                   "from the disks or disk images holding its VG; instead of --metadata and "
                   "--data")
    add_lock_plan(p, _pool_locks)


def _pool_locks(args: argparse.Namespace) -> list[tuple[str | None, bool]]:
    """Shared on the pool's metadata and data: every subcommand only reads them."""
    import os

    from dmimage.docker.devices import LOOP_DIR

    if args.lvm:
        return [(d, False) for d in args.lvm[:-1]]
    loop = os.path.join(args.root, LOOP_DIR)
    return [(args.metadata or os.path.join(loop, "metadata"), False),
            (args.data or os.path.join(loop, "data"), False)]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "docker", help="list, check and export Docker's devicemapper store offline",
        description="Reads a Docker data root that used the devicemapper storage driver "
        "(Engine 24 and older), read-only. Exit codes: 0 ok, 1 problems or damaged input, "
        "2 usage or I/O error.")
    sub = p.add_subparsers(dest="docker_command", metavar="DOCKERCOMMAND")
    sub.required = True

    ls = sub.add_parser("ls", help="images, layers, containers, devices and the pool",
                        description="Lists images (id, tags, top layer device), layers (chain "
                        "id, diff id, device, mapped/exclusive/shared blocks), containers (id, "
                        "name, image, device, init device) and the pool (transaction ids, "
                        "free space, next_device_id).")
    _pool_args(ls)
    ls.add_argument("--json", action="store_true", help="one JSON document")
    ls.add_argument("--tree", action="store_true",
                    help="draw the lineage of layers, images and containers")
    ls.set_defaults(func=cmd_ls)

    ck = sub.add_parser("check", help="Docker's JSON files against the thin pool",
                        description="Reports leaked thin devices, JSON files whose device is "
                        "missing, deleted: true entries, duplicate ids, an open transaction and "
                        "what dockerd would do with it, transaction ids, layers or containers "
                        "without a device, and the pool metadata check. Exit 0 clean, 1 "
                        "problems (each named), 2 usage or I/O error.")
    _pool_args(ck)
    ck.add_argument("--json", action="store_true", help="one JSON document")
    ck.set_defaults(func=cmd_check)

    ex = sub.add_parser("export", help="write the filesystem image of an image, container, "
                        "layer or device (sparse)",
                        description="NAME is repo:tag, an image id or unique prefix, a "
                        "container name or id, a layer's chain or diff id, or a device hash "
                        "(base for the base device). Writes the device's whole size, holes "
                        "where nothing is mapped.")
    _pool_args(ex)
    ex.add_argument("name", metavar="NAME")
    ex.add_argument("-o", "--output", required=True, help="output file, or - for stdout")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("save", help="write a docker save tarball of images (bit-exact layers)",
                        description="Each layer.tar is rebuilt from the layer's tar-split and "
                        "the files of its thin device's ext4 filesystem; its sha256 must be the "
                        "diff id and the config is copied unchanged, so docker load on any "
                        "current Docker takes the result. Nothing is left behind on error.")
    _pool_args(sv)
    sv.add_argument("images", metavar="IMAGE", nargs="+",
                    help="repo:tag, image id or unique prefix")
    sv.add_argument("-o", "--output", required=True, help="output tar file")
    sv.add_argument("--no-verify", dest="verify", action="store_false",
                    help="do not check each rebuilt layer tar's sha256 against its diff id "
                    "(faster when the pool is in the page cache; an unchecked result: "
                    "docker load still checks the digests)")
    sv.set_defaults(func=cmd_save)

    df = sub.add_parser("diff", help="a container's own changes (as docker diff), or as a tar",
                        description="Compares the container's device with its init layer's "
                        "as docker diff does (A added, C changed, D deleted). With -o, writes "
                        "the changed and added files as a tar, deletions as .wh. whiteouts: "
                        "the container's data, rescued.")
    _pool_args(df)
    df.add_argument("container", metavar="CONTAINER", help="container name or id (prefix)")
    df.add_argument("--json", action="store_true", help="the changes as JSON")
    df.add_argument("-o", "--output", default=None, help="write the changes as a tar file")
    df.set_defaults(func=cmd_diff)


def _open(args: argparse.Namespace) -> Store:
    from dmimage.docker.store import open_store
    from dmimage.errors import UsageError

    if args.lvm:
        if args.metadata or args.data:
            raise UsageError("--lvm names the pool: leave out --metadata and --data")
        if len(args.lvm) < 2:
            raise UsageError("--lvm DISK... VG/POOL: give the disks, then the pool")
        return open_store(args.root, lvm=(args.lvm[:-1], args.lvm[-1]))
    return open_store(args.root, metadata=args.metadata, data=args.data)


class _OffsetSource:
    """The pool's data at an offset of a file (an LVM _tdata inside a PV)."""

    def __init__(self, path: str, offset: int) -> None:
        import os

        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.offset = offset
        self.size = os.fstat(self.fd).st_size - offset

    def pread(self, n: int, off: int, /) -> bytes:
        import os

        return os.pread(self.fd, n, self.offset + off)


def _json_text(doc: Any) -> str:
    """*doc* as JSON, one line per list item or key: json's indent= goes through its Python
    encoder (a store of 3,000 devices took 40 ms), one compact item at a time uses the C one."""
    def block(v: Any, pad: str) -> str:
        inner = pad + " "
        if isinstance(v, dict) and v:
            return "{\n" + ",\n".join(f"{inner}{json.dumps(k)}: {json.dumps(x)}"
                                       for k, x in v.items()) + f"\n{pad}}}"
        if isinstance(v, list) and v:
            return "[\n" + ",\n".join(inner + json.dumps(x) for x in v) + f"\n{pad}]"
        return json.dumps(v)

    if isinstance(doc, dict) and doc:
        return "{\n" + ",\n".join(f" {json.dumps(k)}: {block(v, ' ')}"
                                   for k, v in doc.items()) + "\n}\n"
    return block(doc, "") + "\n"


def cmd_ls(args: argparse.Namespace) -> int:
    from dmimage.docker.report import ls_data, ls_text, ls_tree, read_pool_view

    store = _open(args)
    doc = ls_data(store, read_pool_view(store))
    if args.json:
        sys.stdout.write(_json_text(doc))
    elif args.tree:
        sys.stdout.write(ls_tree(doc))
    else:
        sys.stdout.write(ls_text(doc))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from dmimage.docker.check import check_store

    rep = check_store(_open(args))
    if args.json:
        json.dump(rep.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for p in rep.problems:
            print(p)
        for n in rep.notes:
            print(f"note: {n}")
        print(f"pool transaction_id {rep.pool_transaction_id}, docker "
              f"{rep.docker_transaction_id}: "
              + ("clean" if rep.ok else f"{len(rep.problems)} problem(s)"))
    return 0 if rep.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from dmimage.cli._progress import progress_bar
    from dmimage.docker.store import resolve
    from dmimage.errors import UsageError
    from dmimage.thin.export import export_thin
    from dmimage.thin.pool import open_pool

    store = _open(args)
    target = resolve(store, args.name)
    dev = target.device
    pf = store.pool_files
    data: Any = _OffsetSource(pf.data, pf.data_offset) if pf.data_offset else pf.data
    with open_pool(pf.metadata) as pool:
        if dev.device_id not in pool.devices():
            raise UsageError(f"{args.name}: device {dev.device_id} ({dev.source}) is not in "
                             "the pool")
        if args.output == "-":
            export_thin(pool, data, dev.device_id, sys.stdout.buffer, size=dev.size)
            return 0
        with progress_bar("export") as advance:
            export_thin(pool, data, dev.device_id, args.output, size=dev.size,
                        progress=advance)
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from dmimage.cli._output import atomic_output
    from dmimage.docker.save import save

    store = _open(args)
    with atomic_output(args.output) as out:
        save(store, args.images, out, verify=args.verify)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    import os

    from dmimage import devlock
    from dmimage.cli._output import atomic_output
    from dmimage.docker.changes import changes_tar, container_changes
    from dmimage.docker.errors import StoreIOError
    from dmimage.thin.pool import open_pool

    store = _open(args)
    # The lock plan holds both files already (counted); the locks name the files the store
    # resolved, so a plan computed from other spellings of the paths still covers them.
    with devlock.acquire_all([(store.pool_files.metadata, False),
                              (store.pool_files.data, False)]):
        try:
            fd = os.open(store.pool_files.data, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreIOError(store.pool_files.data, exc.strerror or str(exc)) from None
        try:
            with open_pool(store.pool_files.metadata) as pool:
                changes, root = container_changes(store, pool, fd, args.container)
                if args.output:
                    with atomic_output(args.output) as out:
                        changes_tar(changes, root, out)
        finally:
            os.close(fd)
    if args.json:
        json.dump([{"kind": c.kind, "path": c.path} for c in changes], sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif not args.output:
        for c in changes:
            print(c)
    return 0
